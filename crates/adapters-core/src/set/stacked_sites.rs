//! The sites where adapters run as stacks only: the token embeddings (prompt tuning,
//! invertible adapters), attention's key/value prefixes (prefix tuning) and layer outputs
//! (position-selective interventions). Rows may choose their own stacks.

use super::{detached_without_grad, AdapterSet, Node};
use crate::adapter::{Adapter, EmbeddingIo, InterventionIo};
use crate::context::{ForwardCtx, StackRows};
use crate::point::Point;
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// The key/value prefix of one layer for every row of a batch.
pub struct PrefixKv {
    /// `[rows, prefix, kv_width]`, each row's prefix first, zeros after it.
    pub keys: Tensor,
    /// As `keys`.
    pub values: Tensor,
    /// `[rows, prefix]` (`u32`, 1 on a row's own prefix positions); `None` when every row
    /// has the whole prefix.
    pub valid: Option<Tensor>,
}

/// A stack of adapters for some rows of the batch (`None`: all of them).
type RowStack<'a> = (Option<&'a StackRows>, Vec<Arc<dyn Adapter>>);

impl AdapterSet {
    /// Runs the adapters at an embeddings site (`input_embeddings`, `lm_head_input`): the
    /// new embeddings, with virtual tokens prepended when the adapters add them. Rows that
    /// choose their own stacks must end up with the same number of positions.
    pub fn embeddings(&self, point: Point, io: &EmbeddingIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let run = |adapters: &[Arc<dyn Adapter>], x: &Tensor, mask: Option<&Tensor>, ctx: &ForwardCtx| {
            let mut x = x.clone();
            let mut mask = mask.cloned();
            for a in adapters {
                let before = x.dim(1)?;
                x = a.forward_embeddings(point, &EmbeddingIo { embeddings: &x, mask: mask.as_ref() }, ctx)?;
                let added = x.dim(1)?.checked_sub(before).ok_or_else(|| {
                    candle_core::Error::Msg(format!("`{}` at {point} dropped positions; an adapter may only prepend", a.kind()))
                })?;
                mask = mask.map(|m| EmbeddingIo::mask_with_virtual_tokens(&m, added)).transpose()?;
            }
            Ok::<_, candle_core::Error>(x)
        };
        let stacks = self.stacks_at(point, ctx)?;
        if stacks.is_empty() {
            return Ok(io.embeddings.clone());
        }
        let (batch, seq, _) = io.embeddings.dims3()?;
        let mut outputs = Vec::with_capacity(stacks.len());
        for (rows, adapters) in &stacks {
            outputs.push(match rows {
                None => run(adapters, io.embeddings, io.mask, ctx)?,
                Some(g) => {
                    let mask = io.mask.map(|m| m.index_select(&g.rows, 0)).transpose()?;
                    run(adapters, &io.embeddings.index_select(&g.rows, 0)?, mask.as_ref(), &ctx.for_rows(&g.rows)?)?
                }
            });
        }
        let lengths: Vec<usize> = outputs.iter().map(|o| o.dim(1)).collect::<Result<_>>()?;
        let longest = lengths.iter().copied().max().unwrap_or(seq);
        let covered: usize = stacks.iter().map(|(rows, _)| rows.map_or(batch, |g| g.indices.len())).sum();
        if lengths.iter().any(|&n| n != longest) || (longest != seq && covered != batch) {
            candle_core::bail!(
                "rows of one batch choose adapters that prepend different numbers of virtual tokens at {point} \
                 ({longest} and fewer positions); batch rows with the same prompt length together"
            );
        }
        let mut result = io.embeddings.clone();
        for ((rows, _), out) in stacks.iter().zip(outputs) {
            result = match rows {
                None => out,
                Some(g) if longest == seq => result.index_add(&g.rows, &(out - io.embeddings.index_select(&g.rows, 0)?)?, 0)?,
                Some(g) => {
                    let base = if result.dim(1)? == longest { result } else { result.zeros_like()?.pad_with_zeros(1, longest - seq, 0)? };
                    base.index_add(&g.rows, &out, 0)?
                }
            };
        }
        detached_without_grad(result, ctx)
    }

    /// The key/value prefix of attention at `point` for `rows` rows, the stacked adapters'
    /// prefixes one after the other; `None` when no adapter there has one.
    pub fn key_value_prefix(&self, point: Point, rows: usize, ctx: &ForwardCtx) -> Result<Option<PrefixKv>> {
        let stack_prefix = |adapters: &[Arc<dyn Adapter>], n: usize, ctx: &ForwardCtx| -> Result<Option<(Tensor, Tensor)>> {
            let mut parts = Vec::new();
            for a in adapters {
                if let Some(p) = a.key_value_prefix(point, n, ctx)? {
                    if p.keys.dims() != p.values.dims() || p.keys.dim(0)? != n {
                        candle_core::bail!(
                            "`{}` gave a prefix of keys {:?} and values {:?} for {n} rows at {point}",
                            a.kind(),
                            p.keys.dims(),
                            p.values.dims()
                        );
                    }
                    parts.push(p);
                }
            }
            if parts.is_empty() {
                return Ok(None);
            }
            let keys = Tensor::cat(&parts.iter().map(|p| &p.keys).collect::<Vec<_>>(), 1)?;
            let values = Tensor::cat(&parts.iter().map(|p| &p.values).collect::<Vec<_>>(), 1)?;
            Ok(Some((keys, values)))
        };
        let stacks = self.stacks_at(point, ctx)?;
        if stacks.is_empty() {
            return Ok(None);
        }
        if let [(None, adapters)] = stacks.as_slice() {
            return Ok(stack_prefix(adapters, rows, ctx)?.map(|(keys, values)| PrefixKv { keys, values, valid: None }));
        }
        let mut groups = Vec::new();
        for (g, adapters) in &stacks {
            let g = g.expect("row stacks name their rows");
            if let Some(kv) = stack_prefix(adapters, g.indices.len(), &ctx.for_rows(&g.rows)?)? {
                groups.push((g, kv));
            }
        }
        let Some(longest) = groups.iter().map(|(_, (k, _))| k.dim(1)).collect::<Result<Vec<_>>>()?.into_iter().max() else {
            return Ok(None);
        };
        let first = &groups[0].1 .0;
        let (width, dtype, device) = (first.dim(2)?, first.dtype(), first.device().clone());
        let mut keys = Tensor::zeros((rows, longest, width), dtype, &device)?;
        let mut values = keys.clone();
        let mut valid = vec![0u32; rows * longest];
        for (g, (k, v)) in groups {
            let p = k.dim(1)?;
            keys = keys.index_add(&g.rows, &k.pad_with_zeros(1, 0, longest - p)?, 0)?;
            values = values.index_add(&g.rows, &v.pad_with_zeros(1, 0, longest - p)?, 0)?;
            for &r in &g.indices {
                valid[r as usize * longest..r as usize * longest + p].iter_mut().for_each(|x| *x = 1);
            }
        }
        let valid = if valid.iter().all(|&x| x == 1) { None } else { Some(Tensor::from_vec(valid, (rows, longest), &device)?) };
        Ok(Some(PrefixKv { keys, values, valid }))
    }

    /// Runs the interventions at a layer-output site: the new residual stream.
    pub fn intervention(&self, point: Point, io: &InterventionIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let run = |adapters: &[Arc<dyn Adapter>], x: &Tensor, mask: Option<&Tensor>, ctx: &ForwardCtx| {
            let mut x = x.clone();
            for a in adapters {
                x = a.forward_intervention(point, &InterventionIo { hidden: &x, mask }, ctx)?;
            }
            Ok::<_, candle_core::Error>(x)
        };
        let stacks = self.stacks_at(point, ctx)?;
        if stacks.is_empty() {
            return Ok(io.hidden.clone());
        }
        let mut result = io.hidden.clone();
        for (rows, adapters) in stacks {
            result = match rows {
                None => run(&adapters, &result, io.mask, ctx)?,
                Some(g) => {
                    let before = result.index_select(&g.rows, 0)?;
                    let mask = io.mask.map(|m| m.index_select(&g.rows, 0)).transpose()?;
                    let after = run(&adapters, &before, mask.as_ref(), &ctx.for_rows(&g.rows)?)?;
                    result.index_add(&g.rows, &(after - before)?, 0)?
                }
            };
        }
        detached_without_grad(result, ctx)
    }

    /// The stacks that run at `point`: the active setup's (for all rows), or each row
    /// group's when rows choose their own. Other composition blocks are refused here.
    fn stacks_at<'a>(&self, point: Point, ctx: &'a ForwardCtx) -> Result<Vec<RowStack<'a>>> {
        let Some(groups) = &ctx.rows_by_stack else {
            return Ok(match self.resolved.get(&point) {
                None => Vec::new(),
                Some(node) => vec![(None, flatten(node, point)?)],
            });
        };
        self.row_nodes(point, groups)?.into_iter().map(|(group, node)| Ok((Some(group), flatten(&node, point)?))).collect()
    }
}

/// The adapters of a stack, in order; other blocks are refused at these sites.
fn flatten(node: &Node, point: Point) -> Result<Vec<Arc<dyn Adapter>>> {
    match node {
        Node::Adapter(a) => Ok(vec![a.clone()]),
        Node::Stack(children) => Ok(children.iter().map(|c| flatten(c, point)).collect::<Result<Vec<_>>>()?.concat()),
        _ => candle_core::bail!(
            "at {point} ({} site) adapters run as a stack only; fuse, parallel, average and split blocks combine adapters \
             at hidden and projection sites",
            point.site
        ),
    }
}
