//! Exact (erf) GELU with a vectorised erf, and its derivative in one pass.

use super::simd::{erf, exp, multiversion};
use super::{fused, output_buffer, slice, with_values, written};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `x · Φ(x)`, Φ the standard normal CDF (PyTorch's `gelu`, approximate = "none").
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused(&[x]) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluErf)
}

struct GeluErf;

multiversion! {
    pub(super) fn forward_chunk(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    pub(super) fn backward_chunk(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            *dx = g * (cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x));
        }
    }
}

/// GELU of every value, in parallel chunks.
pub(super) fn values(x: &[f32]) -> Vec<f32> {
    let mut y = output_buffer(x.len());
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| forward_chunk(x, y));
    written(y, "gelu")
}

/// The gradient through GELU: `g ⊙ GELU'(x)`, in parallel chunks.
pub(super) fn backward_values(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut dx = output_buffer(x.len());
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|(dx, (x, g))| backward_chunk(x, g, dx));
    written(dx, "gelu backward")
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(values(slice(s, l, "gelu-erf")?)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_values([x, grad], "gelu-erf", |[xv, gv]| backward_values(xv, gv))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
