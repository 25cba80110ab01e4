//! The per-row path: rows of one batch that choose their own stacks (mixed-adapter
//! serving). Rows whose adapters share a batchable form run as one computation over
//! weights stacked per row; the others run group by group.

use super::{AdapterSet, LentBySite, Node};
use crate::adapter::{Adapter, ProjectionIo, SublayerIo};
use crate::context::{ForwardCtx, StackRows};
use crate::point::Point;
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// One adapter of a batched computation at a point: its form's tensors there and its rows.
type BatchedAdapter<'a> = (Arc<dyn Adapter>, Vec<Tensor>, &'a StackRows);

impl AdapterSet {
    /// Applies the active setup, or each row group's stack when the context routes rows.
    pub(super) fn dispatch(&self, point: Point, input: &Tensor, output: &Tensor, site: LentBySite, ctx: &ForwardCtx) -> Result<Tensor> {
        let Some(groups) = &ctx.rows_by_stack else {
            return match self.resolved.get(&point) {
                None => Ok(output.clone()),
                Some(node) => self.run(node, point, input, output, site, ctx),
            };
        };
        // Groups whose stack here is one adapter with a batchable form go in one batched
        // computation with the groups of the same key; the rest run group by group.
        let mut batches: Vec<(String, Vec<BatchedAdapter>)> = Vec::new();
        let mut alone = Vec::new();
        for (group, node) in self.row_nodes(point, groups)? {
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
        let batch = output.dim(0)?;
        let whole = |indices: &[u32]| indices.len() == batch && indices.iter().enumerate().all(|(i, &r)| r as usize == i);
        let mut result = output.clone();
        let mut untouched = true;
        for (_, members) in batches.into_iter().filter(|(_, m)| !m.is_empty()) {
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
            let rows_of = |t: &Tensor, index: &Tensor| if rows.len() == batch { Ok(t.clone()) } else { t.index_select(index, 0) };
            let index = Tensor::from_iter(rows.iter().map(|&(r, _)| r), output.device())?;
            let (rows_in, rows_out) = (rows_of(input, &index)?, rows_of(output, &index)?);
            let rows_ctx = if rows.len() == batch { ctx.for_range(0, batch)? } else { ctx.for_rows(&index)? };
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
            result = if rows.len() == batch && untouched { new_rows } else { result.index_add(&index, &(new_rows - rows_out)?, 0)? };
            untouched = false;
        }
        for (node, group) in alone {
            if whole(&group.indices) && untouched {
                result = self.run(&node, point, input, output, site, &ctx.for_range(0, batch)?)?;
                untouched = false;
                continue;
            }
            let rows_in = input.index_select(&group.rows, 0)?;
            let rows_out = output.index_select(&group.rows, 0)?;
            let new_rows = self.run(&node, point, &rows_in, &rows_out, site, &ctx.for_rows(&group.rows)?)?;
            result = result.index_add(&group.rows, &(new_rows - rows_out)?, 0)?;
            untouched = false;
        }
        Ok(result)
    }
}
