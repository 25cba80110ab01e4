//! The per-row path: rows of one batch that choose their own stacks (mixed-adapter
//! serving). Rows whose adapters share a batchable form run as one computation over
//! weights stacked per row; the others run group by group.

use super::{AdapterSet, LentBySite, Node};
use crate::adapter::{Adapter, FrozenLinear, LayerNormWeights, ProjectionIo, SublayerIo};
use crate::context::{ForwardCtx, StackRows};
use crate::point::Point;
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// One adapter of a batched computation at a point: its form's tensors there and its rows.
type BatchedAdapter<'a> = (Arc<dyn Adapter>, Vec<Tensor>, &'a StackRows);

/// How a point's row groups run: batched computations (by form key, two or more adapters
/// each) and the groups that run alone.
type Plan<'a> = (Vec<(String, Vec<BatchedAdapter<'a>>)>, Vec<(Node, &'a StackRows)>);

impl AdapterSet {
    /// Groups whose stack at `point` is one adapter with a batchable form go in one batched
    /// computation with the groups of the same key; the rest run group by group.
    fn plan<'a>(&self, point: Point, groups: &'a [StackRows], site: LentBySite) -> Result<Plan<'a>> {
        let mut batches: Vec<(String, Vec<BatchedAdapter>)> = Vec::new();
        let mut alone = Vec::new();
        for (group, node) in self.row_nodes(point, groups)? {
            // Input scales at a projection ran before its product ([`AdapterSet::projection`],
            // the only caller with a projection site): those rows are done.
            if matches!(site, LentBySite::Projection(_)) && super::input_scale(&node, point).is_some() {
                continue;
            }
            let single = node.single().cloned();
            let form = single.as_ref().and_then(|a| a.capabilities().row_batched?.batchable_form(point));
            match single.zip(form) {
                Some((adapter, form)) => match batches.iter_mut().find(|(key, _)| *key == form.key) {
                    Some((_, members)) => members.push((adapter, form.weights, group)),
                    None => batches.push((form.key, vec![(adapter, form.weights, group)])),
                },
                None => alone.push((node, group)),
            }
        }
        // A key with one adapter gains nothing from per-row weights.
        for (_, members) in batches.iter_mut().filter(|(_, m)| m.len() == 1) {
            let (adapter, _, group) = members.pop().expect("one member");
            alone.push((Node::Adapter(adapter), group));
        }
        batches.retain(|(_, m)| !m.is_empty());
        Ok((batches, alone))
    }

    /// The frozen product at a projection `point` when rows choose their adapters: rows
    /// whose adapter scales the input take the product of their scaled rows, the others of
    /// theirs, assembled (outputs are narrower than a feed-forward input).
    pub(super) fn rows_product(&self, point: Point, x: &Tensor, linear: &FrozenLinear, groups: &[StackRows]) -> Result<Tensor> {
        if !self.adapters.iter().any(|a| a.points.contains(&point) && a.adapter.capabilities().input_scaled.is_some()) {
            return (linear.apply)(x);
        }
        let mut pieces = Vec::new();
        let mut scaled = vec![false; x.dim(0)?];
        for (group, node) in self.row_nodes(point, groups)? {
            if let Some(l) = super::input_scale(&node, point) {
                let rows = RowPick::new(&group.indices, x.device())?.of(x)?;
                pieces.push((group.indices.clone(), (linear.apply)(&rows.broadcast_mul(&l)?)?));
                group.indices.iter().for_each(|&r| scaled[r as usize] = true);
            }
        }
        if pieces.is_empty() {
            return (linear.apply)(x);
        }
        let rest: Vec<u32> = (0..scaled.len() as u32).filter(|&r| !scaled[r as usize]).collect();
        if !rest.is_empty() {
            let rows = RowPick::new(&rest, x.device())?.of(x)?;
            pieces.push((rest, (linear.apply)(&rows)?));
        }
        assemble_all(pieces)
    }

    /// [`AdapterSet::hidden_add_layer_norm`] when rows choose their adapters: when every
    /// group runs alone with an adapter that has a fused form, each group's fused pass on
    /// its rows and the plain add-and-norm on the rows no adapter acts on, so a batch of a
    /// few kinds keeps the fused passes. `None` otherwise (batched forms serve many adapters
    /// of one form better).
    pub(super) fn rows_add_layer_norm(
        &self,
        point: Point,
        io: &SublayerIo,
        norm: LayerNormWeights,
        groups: &[StackRows],
        ctx: &ForwardCtx,
    ) -> Result<Option<Tensor>> {
        let Some(add_norm) = io.post_norm else { return Ok(None) };
        let (batches, alone) = self.plan(point, groups, LentBySite::Hidden(io.post_norm))?;
        if !batches.is_empty() || alone.is_empty() {
            return Ok(None);
        }
        let batch = io.output.dim(0)?;
        let mut pieces = Vec::new();
        let mut covered = vec![false; batch];
        for (node, group) in alone {
            let Some(fused) = node.single().and_then(|a| a.capabilities().fused_post_norm) else { return Ok(None) };
            let picked = RowPick::new(&group.indices, io.output.device())?;
            let (input, output) = (picked.of(io.input)?, picked.of(io.output)?);
            let rows_io = SublayerIo { input: &input, output: &output, post_norm: io.post_norm };
            let Some(rows) = fused.add_layer_norm(point, &rows_io, norm, &picked.ctx(ctx)?) else { return Ok(None) };
            group.indices.iter().for_each(|&r| covered[r as usize] = true);
            pieces.push((group.indices.clone(), rows?));
        }
        let rest: Vec<u32> = (0..batch as u32).filter(|&r| !covered[r as usize]).collect();
        if !rest.is_empty() {
            let picked = RowPick::new(&rest, io.output.device())?;
            pieces.push((rest, add_norm(&picked.of(io.output)?, &picked.of(io.input)?)?));
        }
        assemble(io.output, pieces).map(Some)
    }

    /// Applies the active setup, or each row group's stack when the context routes rows.
    pub(super) fn dispatch(&self, point: Point, input: &Tensor, output: &Tensor, site: LentBySite, ctx: &ForwardCtx) -> Result<Tensor> {
        let Some(groups) = &ctx.rows_by_stack else {
            return match self.resolved.get(&point) {
                None => Ok(output.clone()),
                Some(node) => self.run(node, point, input, output, site, ctx),
            };
        };
        let (batches, alone) = self.plan(point, groups, site)?;
        // Each computation's new rows, assembled into the result once at the end.
        let mut pieces: Vec<(Vec<u32>, Tensor)> = Vec::new();
        for (_, members) in batches {
            // Row r of the batch (in ascending order) takes member `member_of[r]`'s weights.
            let mut rows: Vec<(u32, u32)> =
                members.iter().enumerate().flat_map(|(m, (_, _, g))| g.indices.iter().map(move |&r| (r, m as u32))).collect();
            rows.sort_unstable();
            let member_of = Tensor::from_iter(rows.iter().map(|&(_, m)| m), output.device())?;
            let weights = (0..members[0].1.len())
                .map(|j| Tensor::stack(&members.iter().map(|(_, w, _)| &w[j]).collect::<Vec<_>>(), 0)?.index_select(&member_of, 0))
                .collect::<Result<Vec<_>>>()?;
            let Some(batched) = members[0].0.capabilities().row_batched else {
                candle_core::bail!("`{}` gave a batchable form but no per-row forward ({point})", members[0].0.kind())
            };
            let indices: Vec<u32> = rows.iter().map(|&(r, _)| r).collect();
            let picked = RowPick::new(&indices, output.device())?;
            let (rows_in, rows_out, rows_ctx) = (picked.of(input)?, picked.of(output)?, picked.ctx(ctx)?);
            let new_rows = match site {
                LentBySite::Hidden(post_norm) => batched.forward_hidden_rows(
                    point,
                    &SublayerIo { input: &rows_in, output: &rows_out, post_norm },
                    &weights,
                    &rows_ctx,
                )?,
                LentBySite::Projection(linear) => batched.forward_projection_rows(
                    point,
                    &ProjectionIo { input: &rows_in, output: &rows_out, linear },
                    &weights,
                    &rows_ctx,
                )?,
            };
            pieces.push((indices, new_rows));
        }
        for (node, group) in alone {
            let picked = RowPick::new(&group.indices, output.device())?;
            let new_rows = self.run(&node, point, &picked.of(input)?, &picked.of(output)?, site, &picked.ctx(ctx)?)?;
            pieces.push((group.indices.clone(), new_rows));
        }
        assemble(output, pieces)
    }
}

/// Rows of a batch picked for one computation: a view when they are consecutive (a server
/// orders a forward's rows by adapter), a gather otherwise.
enum RowPick {
    Range(usize, usize),
    Gather(Tensor),
}

impl RowPick {
    fn new(indices: &[u32], device: &candle_core::Device) -> Result<Self> {
        let first = indices.first().copied().unwrap_or(0);
        let consecutive = indices.iter().enumerate().all(|(i, &r)| r as usize == first as usize + i);
        Ok(if consecutive {
            RowPick::Range(first as usize, indices.len())
        } else {
            RowPick::Gather(Tensor::from_slice(indices, indices.len(), device)?)
        })
    }

    fn of(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            RowPick::Range(start, len) if *start == 0 && *len == t.dim(0)? => Ok(t.clone()),
            RowPick::Range(start, len) => t.narrow(0, *start, *len),
            RowPick::Gather(index) => t.index_select(index, 0),
        }
    }

    fn ctx(&self, ctx: &ForwardCtx) -> Result<ForwardCtx> {
        match self {
            RowPick::Range(start, len) => ctx.for_range(*start, *len),
            RowPick::Gather(index) => ctx.for_rows(index),
        }
    }
}

/// `output` with the rows each piece computed put in their place (see [`assemble_rows`]).
fn assemble(output: &Tensor, pieces: Vec<(Vec<u32>, Tensor)>) -> Result<Tensor> {
    if pieces.is_empty() {
        return Ok(output.clone());
    }
    assemble_rows(output.dim(0)?, Some(output), pieces)
}

/// The batch from pieces that compute every one of its rows (see [`assemble_rows`]).
fn assemble_all(pieces: Vec<(Vec<u32>, Tensor)>) -> Result<Tensor> {
    let batch = pieces.iter().map(|(indices, _)| indices.len()).sum();
    assemble_rows(batch, None, pieces)
}

/// A batch of `batch` rows, each from the piece that computed it or else from `rest`, in
/// one copy: the rows in order as runs of consecutive rows of one source, concatenated.
fn assemble_rows(batch: usize, rest: Option<&Tensor>, pieces: Vec<(Vec<u32>, Tensor)>) -> Result<Tensor> {
    if let [(indices, rows)] = pieces.as_slice() {
        if indices.len() == batch {
            return Ok(rows.clone());
        }
    }
    // Source of each batch row: (piece + 1, row in it), or (0, row) for `rest`.
    let mut source: Vec<(usize, usize)> = (0..batch).map(|r| (0, r)).collect();
    for (p, (indices, _)) in pieces.iter().enumerate() {
        for (k, &r) in indices.iter().enumerate() {
            source[r as usize] = (p + 1, k);
        }
    }
    if rest.is_none() && source.iter().any(|&(s, _)| s == 0) {
        candle_core::bail!("assembling a batch of {batch} rows: some rows were computed by no piece");
    }
    let tensor = |s: usize| if s == 0 { rest.expect("checked above") } else { &pieces[s - 1].1 };
    let mut runs = Vec::new();
    let mut r = 0;
    while r < batch {
        let (s, first) = source[r];
        let mut len = 1;
        while r + len < batch && source[r + len] == (s, first + len) {
            len += 1;
        }
        runs.push(tensor(s).narrow(0, first, len)?);
        r += len;
    }
    Tensor::cat(&runs, 0)
}
