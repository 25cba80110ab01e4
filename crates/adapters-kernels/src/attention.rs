//! Scaled dot-product attention over heads kept in the projections' `[batch, seq, heads *
//! head_dim]` layout: no transposes or copies, one task per (row, head) on the thread pool
//! (the per-head matrices are too small to split well), and a backward that recomputes
//! the softmax probabilities from two numbers per query kept by the forward (keeping them
//! would hold `batch x heads x seq²` floats per layer until the backward: 25 MB for each
//! MiniLM layer at batch 32 x seq 128, for a recomputation costing ~1% of a step).
//! Keys that the mask hides from a whole block of queries (the future under a causal
//! mask, padding at the end of a row) are never multiplied: a causal SmolLM2 step at seq
//! 256 does 5/8 of the full square's products.

use super::simd::{self, exp, multiversion};
use super::{fused, gemm, output_buffer, slice, with_values, written, Mat, SharedMut};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// `softmax(q kᵀ · scale + mask) v` per head, on `q` `[batch, seq_q, heads * head_dim]`
/// and `k`, `v` `[batch, seq_k, kv_heads * head_dim]`; with fewer key/value heads than
/// query heads (grouped-query attention), each key/value head serves `heads / kv_heads`
/// consecutive query heads.
///
/// `mask` is an additive bias `[1 or batch, 1 or seq_q, seq_k]`: 0 where attended, very
/// negative where not (padding, the future); `None` attends to all.
/// `k` and `v` may be longer than `q` (a KV cache): then `mask` must say what is visible.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, kv_heads: usize, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let mut all = vec![q, k, v];
    all.extend(mask);
    if !fused(&all) {
        return composed(q, k, v, heads, kv_heads, mask, scale);
    }
    let (b, tq, width) = q.dims3()?;
    let tk = k.dim(1)?;
    let mask = match mask {
        None => None,
        Some(m) => {
            let (mb, mq, mk) = m.dims3()?;
            if !(mb == 1 || mb == b) || !(mq == 1 || mq == tq) || mk != tk {
                candle_core::bail!("attention: a mask of shape {:?} does not broadcast to [{b}, {tq}, {tk}]", m.dims());
            }
            Some(Mask { values: with_values([m], "attention", |[m]| m.to_vec())?, per_row: mb > 1, per_query: mq > 1 })
        }
    };
    let kv_width = width / heads.max(1) * kv_heads;
    if heads == 0
        || kv_heads == 0
        || width % heads != 0
        || !heads.is_multiple_of(kv_heads)
        || k.dims3()? != (b, tk, kv_width)
        || v.dims3()? != (b, tk, kv_width)
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {heads} query and {kv_heads} key/value heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let keep = q.track_op() || k.track_op() || v.track_op();
    let blocks = match &mask {
        None => vec![vec![Block { start: 0, end: tq, keys: tk }]],
        Some(m) => (0..if m.per_row { b } else { 1 }).map(|row| m.blocks(row, tq, tk)).collect(),
    };
    let op = Attention { heads, kv_heads, scale: scale as f32, mask, blocks, tq, tk, stats: Mutex::new(None), keep };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same maths from candle ops.
pub(super) fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, tq, width) = q.dims3()?;
    let tk = k.dim(1)?;
    let hd = width / heads;
    let split = |x: &Tensor, t: usize, n: usize| x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
    // Each key/value head repeated for the query heads it serves.
    let repeat = |x: Tensor| -> Result<Tensor> {
        let group = heads / kv_heads;
        if group == 1 {
            return Ok(x);
        }
        x.unsqueeze(2)?.expand((b, kv_heads, group, tk, hd))?.reshape((b, heads, tk, hd))
    };
    let (qh, kh, vh) = (split(q, tq, heads)?, repeat(split(k, tk, kv_heads)?)?, repeat(split(v, tk, kv_heads)?)?);
    let mut scores = (qh.matmul(&kh.t()?)? * scale)?;
    if let Some(m) = mask {
        let (mb, mq, mk) = m.dims3()?;
        scores = scores.broadcast_add(&m.reshape((mb, 1, mq, mk))?)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs.matmul(&vh)?.transpose(1, 2)?.reshape((b, tq, width))
}

/// An additive mask `[1 or batch, 1 or seq_q, seq_k]`.
struct Mask {
    values: Vec<f32>,
    per_row: bool,
    per_query: bool,
}

/// Queries per block when the mask differs between queries (a causal mask).
const QUERY_BLOCK: usize = 64;

/// Queries `start..end` of a row attend within its first `keys` keys: the mask hides the
/// rest from every one of them.
#[derive(Clone, Copy)]
struct Block {
    start: usize,
    end: usize,
    keys: usize,
}

impl Mask {
    /// The mask values (all `tk` keys) of query `query` in batch row `batch_row`.
    fn row(&self, batch_row: usize, query: usize, tq: usize, tk: usize) -> &[f32] {
        let rows_per_batch = if self.per_query { tq } else { 1 };
        let index = if self.per_row { batch_row * rows_per_batch } else { 0 } + if self.per_query { query } else { 0 };
        &self.values[index * tk..][..tk]
    }

    /// The query blocks of batch row `row`: one block unless the mask differs between
    /// queries, each with the keys that some query in it may see.
    fn blocks(&self, row: usize, tq: usize, tk: usize) -> Vec<Block> {
        let size = if self.per_query { QUERY_BLOCK } else { tq };
        // Keys up to the last visible one; a query that sees nothing keeps them all (its
        // softmax over only hidden keys stays what the full row gives).
        let visible = |query: usize| self.row(row, query, tq, tk).iter().rposition(|&m| m > f32::MIN).map_or(tk, |last| last + 1);
        (0..tq)
            .step_by(size.max(1))
            .map(|start| {
                let end = (start + size).min(tq);
                Block { start, end, keys: (start..end).map(visible).max().unwrap_or(tk) }
            })
            .collect()
    }
}

struct Attention {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    mask: Option<Mask>,
    /// Query blocks per batch row (one list for all rows unless the mask is per row).
    blocks: Vec<Vec<Block>>,
    tq: usize,
    tk: usize,
    /// Each query's softmax maximum and 1 / normaliser, `[batch, heads, seq_q, 2]`, kept
    /// for the backward pass to recompute the probabilities.
    stats: Mutex<Option<Vec<f32>>>,
    /// Whether to keep them (some input trains).
    keep: bool,
}

multiversion! {
    /// Adds the mask row, then turns `row` into its softmax; returns the row's maximum and
    /// 1 / normaliser, from which [`softmax_row_again`] recomputes it.
    fn softmax_row(row: &mut [f32], mask: Option<&[f32]>) -> (f32, f32) {
        if let Some(m) = mask {
            for (x, m) in row.iter_mut().zip(m) {
                *x += m;
            }
        }
        let max = simd::max(row);
        for x in row.iter_mut() {
            *x = exp(*x - max);
        }
        let inv = 1.0 / simd::sum(row);
        for x in row.iter_mut() {
            *x *= inv;
        }
        (max, inv)
    }
}

multiversion! {
    /// [`softmax_row`] given the maximum and 1 / normaliser it returned: the same
    /// operations in the same order, so the same values.
    fn softmax_row_again(row: &mut [f32], mask: Option<&[f32]>, max: f32, inv: f32) {
        if let Some(m) = mask {
            for (x, m) in row.iter_mut().zip(m) {
                *x += m;
            }
        }
        for x in row.iter_mut() {
            *x = exp(*x - max) * inv;
        }
    }
}

multiversion! {
    /// `ds = p ⊙ (dp − Σ p·dp) · scale`, in place of `dp`, for one row.
    fn softmax_backward_row(p: &[f32], dp: &mut [f32], scale: f32) {
        let dot = simd::dot(p, dp);
        for (d, &p) in dp.iter_mut().zip(p) {
            *d = p * (*d - dot) * scale;
        }
    }
}

impl Attention {
    /// The first `keys` mask values of query `query` in batch row `batch_row`.
    fn mask_row(&self, batch_row: usize, query: usize, keys: usize) -> Option<&[f32]> {
        Some(&self.mask.as_ref()?.row(batch_row, query, self.tq, self.tk)[..keys])
    }

    fn blocks(&self, batch_row: usize) -> &[Block] {
        &self.blocks[if self.blocks.len() > 1 { batch_row } else { 0 }]
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (slice(qs, ql, "attention")?, slice(ks, kl, "attention")?, slice(vs, vl, "attention")?);
        let (b, tq, width) = ql.shape().dims3()?;
        let (h, tk) = (self.heads, self.tk);
        let hd = width / h;
        let (group, kv_width) = (h / self.kv_heads, self.kv_heads * hd);
        // SAFETY (buffers below): every (row, head) task writes its whole part.
        let mut out = output_buffer(b * tq * width);
        let mut stats = output_buffer(if self.keep { b * h * tq * 2 } else { 0 });
        let (out_ptr, stats_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(stats.as_mut_ptr()));
        (0..b * h).into_par_iter().for_each_init(
            || vec![0f32; tq * tk],
            |scratch, task| {
                let (row, head) = (task / h, task % h);
                // SAFETY: task (row, head) writes only its scratch, its own [tq, 2] block of
                // stats and its own head's columns of out; reads stay in bounds.
                unsafe {
                    let p = scratch.as_mut_ptr();
                    let (w, kw) = (width as isize, kv_width as isize);
                    for &Block { start, end, keys } in self.blocks(row) {
                        let (n, kn) = (end - start, keys as isize);
                        let qo = q.as_ptr().add((row * tq + start) * width + head * hd);
                        let ko = k.as_ptr().add(row * tk * kv_width + head / group * hd);
                        let vo = v.as_ptr().add(row * tk * kv_width + head / group * hd);
                        gemm(n, keys, hd, SharedMut(p), kn, Mat(qo, w, 1), Mat(ko, 1, kw), self.scale, false, 1);
                        for i in 0..n {
                            let scores = std::slice::from_raw_parts_mut(p.add(i * keys), keys);
                            let (max, inv) = softmax_row(scores, self.mask_row(row, start + i, keys));
                            if self.keep {
                                let st = stats_ptr.get().add((task * tq + start + i) * 2);
                                (*st, *st.add(1)) = (max, inv);
                            }
                        }
                        let o = out_ptr.get().add((row * tq + start) * width + head * hd);
                        gemm(n, hd, keys, SharedMut(o), w, Mat(p, kn, 1), Mat(vo, kw, 1), 1.0, false, 1);
                    }
                }
            },
        );
        if self.keep {
            *self.stats.lock().expect("attention statistics") = Some(stats);
        }
        Ok((CpuStorage::F32(written(out, "attention")), Shape::from((b, tq, width))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("attention statistics").take();
        let Some(stats) = stats else { candle_core::bail!("attention: backward without the forward's statistics (or run twice)") };
        let (b, tq, width) = q.dims3()?;
        let (h, tk) = (self.heads, self.tk);
        let hd = width / h;
        let (group, kv_width) = (h / self.kv_heads, self.kv_heads * hd);
        // SAFETY (buffers below): each task zeroes its kv head's columns of dk and dv
        // before adding into them and writes every row of its query heads' columns of dq.
        let (mut dq, mut dk, mut dv) = (output_buffer(b * tq * width), output_buffer(b * tk * kv_width), output_buffer(b * tk * kv_width));
        let (dq_ptr, dk_ptr, dv_ptr) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        with_values([q, k, v, grad], "attention", |[q, k, v, g]| {
            // One task per (row, key/value head): it owns that head's dk and dv and
            // sums into them over the query heads of its group and their query blocks.
            (0..b * self.kv_heads).into_par_iter().for_each_init(
                || (vec![0f32; tq * tk], vec![0f32; tq * tk]),
                |(probs, ds), task| {
                    let (row, kv_head) = (task / self.kv_heads, task % self.kv_heads);
                    let (w, kw) = (width as isize, kv_width as isize);
                    let off_k = row * tk * kv_width + kv_head * hd;
                    // SAFETY: the task writes only its own kv head's columns of dk
                    // and dv, its group's query-head columns of dq, and its scratch.
                    unsafe {
                        for key in 0..tk {
                            std::ptr::write_bytes(dk_ptr.get().add(off_k + key * kv_width), 0, hd);
                            std::ptr::write_bytes(dv_ptr.get().add(off_k + key * kv_width), 0, hd);
                        }
                        let ko = k.as_ptr().add(off_k);
                        let vo = v.as_ptr().add(off_k);
                        for head in kv_head * group..(kv_head + 1) * group {
                            for &Block { start, end, keys } in self.blocks(row) {
                                let (n, kn) = (end - start, keys as isize);
                                let off_q = (row * tq + start) * width + head * hd;
                                let (qo, go) = (q.as_ptr().add(off_q), g.as_ptr().add(off_q));
                                // P again: the forward's scores, mask and softmax, from its statistics.
                                let p = probs.as_mut_ptr();
                                gemm(n, keys, hd, SharedMut(p), kn, Mat(qo, w, 1), Mat(ko, 1, kw), self.scale, false, 1);
                                for r in 0..n {
                                    let st = &stats[((row * h + head) * tq + start + r) * 2..][..2];
                                    let scores = std::slice::from_raw_parts_mut(p.add(r * keys), keys);
                                    softmax_row_again(scores, self.mask_row(row, start + r, keys), st[0], st[1]);
                                }
                                let p = p as *const f32;
                                // dV += Pᵀ dO
                                gemm(keys, hd, n, SharedMut(dv_ptr.get().add(off_k)), kw, Mat(p, 1, kn), Mat(go, w, 1), 1.0, true, 1);
                                // dP = dO Vᵀ, then dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale
                                gemm(n, keys, hd, SharedMut(ds.as_mut_ptr()), kn, Mat(go, w, 1), Mat(vo, 1, kw), 1.0, false, 1);
                                for r in 0..n {
                                    let pr = std::slice::from_raw_parts(p.add(r * keys), keys);
                                    softmax_backward_row(pr, &mut ds[r * keys..(r + 1) * keys], self.scale);
                                }
                                // dQ = dS K, dK += dSᵀ Q
                                let dq_block = SharedMut(dq_ptr.get().add(off_q));
                                gemm(n, hd, keys, dq_block, w, Mat(ds.as_ptr(), kn, 1), Mat(ko, kw, 1), 1.0, false, 1);
                                gemm(
                                    keys,
                                    hd,
                                    n,
                                    SharedMut(dk_ptr.get().add(off_k)),
                                    kw,
                                    Mat(ds.as_ptr(), 1, kn),
                                    Mat(qo, w, 1),
                                    1.0,
                                    true,
                                    1,
                                );
                            }
                        }
                    }
                },
            )
        })?;
        let dev = q.device();
        let grad_of = |t: &Tensor, g: Vec<f32>| -> Result<Option<Tensor>> {
            if t.track_op() {
                Ok(Some(Tensor::from_vec(written(g, "attention backward"), t.shape(), dev)?))
            } else {
                Ok(None)
            }
        };
        Ok((grad_of(q, dq)?, grad_of(k, dk)?, grad_of(v, dv)?))
    }
}
