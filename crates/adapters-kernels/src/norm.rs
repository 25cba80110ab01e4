//! Layer norm and RMS norm over the last dimension in one pass each way, keeping each
//! row's statistics for the backward pass.

use super::simd::{self, multiversion};
use super::{fused, output_buffer, slice, with_values, written, SharedMut};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rows per parallel task: enough work to amortise scheduling.
const CHUNK: usize = 64;

/// `(x − mean) / sqrt(var + eps) · weight + bias` over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(&[x, weight, bias]) {
        return composed_layer_norm(x, weight, bias, eps);
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, Norm::new(eps, true))
}

/// [`layer_norm`] of `x + residual`: the post-norm residual step of BERT in one pass (no
/// summed tensor in memory, no add node in the graph).
pub fn add_layer_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(&[x, residual, weight, bias]) || x.shape() != residual.shape() {
        return composed_layer_norm(&(x + residual)?, weight, bias, eps);
    }
    // Weight and bias travel as one [2, dim] input (a custom op takes at most three).
    let affine = Tensor::stack(&[weight, bias], 0)?;
    x.contiguous()?.apply_op3(&residual.contiguous()?, &affine, AddNorm(Norm::new(eps, true)))
}

/// `x / sqrt(mean(x²) + eps) · weight` over the last dimension (Llama).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(&[x, weight]) {
        return composed_rms_norm(x, weight, eps);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, Norm::new(eps, false))
}

/// [`layer_norm`] from candle ops.
pub(super) fn composed_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    let centered = x.broadcast_sub(&(x.sum_keepdim(D::Minus1)? / n)?)?;
    let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// [`rms_norm`] from candle ops.
pub(super) fn composed_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / x.dim(D::Minus1)? as f64)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

struct Norm {
    eps: f32,
    /// Layer norm (centres the row) rather than RMS norm.
    center: bool,
    /// Per row: mean (0 for RMS norm) and 1/std, kept for the backward pass.
    stats: Mutex<Vec<(f32, f32)>>,
}

/// A block of rows of `x` layer-normed into `y` (rows as wide as `w`): the fused post-norm
/// kernels norm their residual sums with it.
pub(super) fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let mut stat = (0f32, 0f32);
    for (x, y) in x.chunks_exact(w.len()).zip(y.chunks_exact_mut(w.len())) {
        normalize_row(x, w, Some(b), y, eps, true, &mut stat);
    }
}

multiversion! {
    /// Normalises one row into `y` and returns its (mean, 1/std).
    pub(super) fn normalize_row(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], eps: f32, center: bool, stat: &mut (f32, f32)) {
        let n = x.len() as f32;
        let mean = if center { simd::sum(x) / n } else { 0.0 };
        let mut centered = [0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                centered[i] += (c[i] - mean) * (c[i] - mean);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        let var = (simd::sum(&centered) + tail) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        match b {
            Some(b) => {
                for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - mean) * rstd * w + b;
                }
            }
            None => {
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = (x - mean) * rstd * w;
                }
            }
        }
        *stat = (mean, rstd);
    }
}

multiversion! {
    /// One row's input gradient into `dx`; adds its weight and bias gradients to `dw`, `db`.
    fn backward_row(x: &[f32], g: &[f32], w: &[f32], stat: (f32, f32), center: bool, dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
        let (mean, rstd) = stat;
        let n = x.len() as f32;
        let (mut sum_gw, mut sum_gw_x) = ([0f32; 8], [0f32; 8]);
        let (cx, cg, cw) = (x.chunks_exact(8), g.chunks_exact(8), w.chunks_exact(8));
        let (mut tail_gw, mut tail_gw_x) = (0f32, 0f32);
        for ((x, g), w) in cx.remainder().iter().zip(cg.remainder()).zip(cw.remainder()) {
            tail_gw += g * w;
            tail_gw_x += g * w * x;
        }
        for ((x, g), w) in cx.zip(cg).zip(cw) {
            for i in 0..8 {
                sum_gw[i] += g[i] * w[i];
                sum_gw_x[i] += g[i] * w[i] * x[i];
            }
        }
        let sum_gw = simd::sum(&sum_gw) + tail_gw;
        // Σ g·w·x̂ = rstd · (Σ g·w·x − mean · Σ g·w)
        let sum_gw_xhat = rstd * (simd::sum(&sum_gw_x) + tail_gw_x - mean * sum_gw);
        let c1 = if center { sum_gw / n } else { 0.0 };
        let c2 = sum_gw_xhat / n;
        for ((((dx, x), g), w), (dw, db)) in dx.iter_mut().zip(x).zip(g).zip(w).zip(dw.iter_mut().zip(db.iter_mut())) {
            let xhat = (x - mean) * rstd;
            *dx = rstd * (g * w - c1 - xhat * c2);
            *dw += g * xhat;
            *db += g;
        }
    }
}

impl Norm {
    fn new(eps: f64, center: bool) -> Self {
        Norm { eps: eps as f32, center, stats: Mutex::new(Vec::new()) }
    }

    fn forward(&self, x: &[f32], xl: &Layout, w: &[f32], b: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let dim = *xl.dims().last().unwrap_or(&0);
        if dim == 0 || w.len() != dim || b.is_some_and(|b| b.len() != dim) {
            candle_core::bail!("norm: input {:?} and weight of {} do not fit", xl.shape(), w.len());
        }
        let rows = x.len() / dim;
        let mut y = output_buffer(x.len());
        let mut stats = vec![(0f32, 0f32); rows];
        y.par_chunks_mut(dim * CHUNK).zip(x.par_chunks(dim * CHUNK)).zip(stats.par_chunks_mut(CHUNK)).for_each(|((y, x), st)| {
            for ((y, x), st) in y.chunks_mut(dim).zip(x.chunks(dim)).zip(st.iter_mut()) {
                normalize_row(x, w, b, y, self.eps, self.center, st);
            }
        });
        *self.stats.lock().expect("norm statistics") = stats;
        Ok((CpuStorage::F32(written(y, "norm")), xl.shape().clone()))
    }

    /// Gradients for x, weight and bias (each only if it trains).
    fn backward(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let want_affine = w.track_op() || b.is_some_and(Tensor::track_op);
        self.backward_with(x, w, b, grad, x.track_op(), want_affine)
    }

    /// Gradients for the normalised input (if `want_x`) and the weight and bias (if
    /// `want_affine`).
    fn backward_with(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
        want_x: bool,
        want_affine: bool,
    ) -> Result<[Option<Tensor>; 3]> {
        let stats = std::mem::take(&mut *self.stats.lock().expect("norm statistics"));
        let dim = x.dim(D::Minus1)?;
        let rows = x.elem_count() / dim;
        if stats.len() != rows {
            candle_core::bail!("norm: backward without the forward's statistics (or run twice)");
        }
        let mut dx = output_buffer(x.elem_count());
        let chunks = rows.div_ceil(CHUNK);
        let mut partial = vec![0f32; chunks * 2 * dim];
        let ptr = SharedMut(partial.as_mut_ptr());
        with_values([x, w, grad], "norm", |[xv, wv, gv]| {
            dx.par_chunks_mut(dim * CHUNK).enumerate().for_each(|(c, dx)| {
                // SAFETY: chunk c owns partial[c * 2 * dim .. (c + 1) * 2 * dim].
                let part = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(c * 2 * dim), 2 * dim) };
                let (dw, db) = part.split_at_mut(dim);
                for (r, dx) in dx.chunks_mut(dim).enumerate() {
                    let row = c * CHUNK + r;
                    let span = row * dim..(row + 1) * dim;
                    backward_row(&xv[span.clone()], &gv[span], wv, stats[row], self.center, dx, dw, db);
                }
            })
        })?;
        let dev = x.device();
        let sum_parts = |offset: usize| -> Result<Tensor> {
            let mut total = vec![0f32; dim];
            for c in 0..chunks {
                for (t, p) in total.iter_mut().zip(&partial[c * 2 * dim + offset..c * 2 * dim + offset + dim]) {
                    *t += p;
                }
            }
            Tensor::from_vec(total, dim, dev)
        };
        let gx = if want_x { Some(Tensor::from_vec(written(dx, "norm backward"), x.shape(), dev)?) } else { None };
        let gw = if want_affine { Some(sum_parts(0)?) } else { None };
        let gb = if want_affine && b.is_some() { Some(sum_parts(dim)?) } else { None };
        Ok([gx, gw, gb])
    }
}

/// Layer norm of the sum of its first two inputs; the third is `[weight; bias]`.
struct AddNorm(Norm);

impl CustomOp3 for AddNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, r) = (slice(xs, xl, self.name())?, slice(rs, rl, self.name())?);
        let sum: Vec<f32> = x.par_iter().zip(r.par_iter()).map(|(a, b)| a + b).collect();
        let affine = slice(ws, wl, self.name())?;
        let (w, b) = affine.split_at(affine.len() / 2);
        self.0.forward(&sum, xl, w, Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        affine: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sum = (x + r)?;
        let (w, b) = (affine.get(0)?, affine.get(1)?);
        let [gs, gw, gb] = self.0.backward_with(&sum, &w, Some(&b), grad, x.track_op() || r.track_op(), affine.track_op())?;
        let gaffine = match (gw, gb) {
            (Some(gw), Some(gb)) => Some(Tensor::stack(&[gw, gb], 0)?),
            _ => None,
        };
        let pick = |t: &Tensor| if t.track_op() { gs.clone() } else { None };
        Ok((pick(x), pick(r), gaffine))
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(slice(xs, xl, "layer-norm")?, xl, slice(ws, wl, "layer-norm")?, Some(slice(bs, bl, "layer-norm")?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [gx, gw, gb] = self.backward(x, w, Some(b), grad)?;
        Ok((gx, gw, gb))
    }
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(slice(xs, xl, "rms-norm")?, xl, slice(ws, wl, "rms-norm")?, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [gx, gw, _] = self.backward(x, w, None, grad)?;
        Ok((gx, gw))
    }
}
