//! Weights stored as 8-bit integers in blocks of 32 with one f32 scale per block, for
//! inference on few rows (token-by-token decoding), where reading the weights dominates:
//! a quarter of f32's memory traffic. Activations stay f32; each weight block is
//! dequantised once into registers and used for every row, so the weights are read once
//! per call whatever the number of rows.

use super::simd::multiversion;
use super::with_values;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Weights per block (one scale each).
pub const BLOCK: usize = 32;

/// A `[out, in]` weight in 8-bit blocks of [`BLOCK`] along `in`.
#[derive(Clone, Debug)]
pub struct Int8Weight {
    out: usize,
    inp: usize,
    /// `[out, in / BLOCK]`.
    scales: Vec<f32>,
    /// `[out, in]`.
    values: Vec<i8>,
}

impl Int8Weight {
    /// Quantises `weight` `[out, in]` (`in` a multiple of [`BLOCK`]): each block keeps
    /// `round(w / s)` with `s = max|w| / 127`, so an element is off by at most `s / 2`.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        if inp % BLOCK != 0 {
            candle_core::bail!("int8: the input width {inp} is not a multiple of {BLOCK}");
        }
        let w = weight.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
        let (scales, values) = with_values([&w], "int8", |[w]| {
            let mut scales = vec![0f32; out * inp / BLOCK];
            let mut values = vec![0i8; out * inp];
            scales.par_iter_mut().zip(values.par_chunks_mut(BLOCK)).zip(w.par_chunks(BLOCK)).for_each(|((s, q), w)| {
                let max = w.iter().fold(0f32, |a, &b| a.max(b.abs()));
                *s = max / 127.0;
                let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                for (q, &w) in q.iter_mut().zip(w) {
                    *q = (w * inv).round() as i8;
                }
            });
            (scales, values)
        })?;
        Ok(Int8Weight { out, inp, scales, values })
    }

    /// `x Wᵀ` for `x` `[..., in]` (f32, CPU); no gradient.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&self.inp) {
            candle_core::bail!("int8: input {:?} does not end in the weight's width {}", x.dims(), self.inp);
        }
        let rows = x.elem_count() / self.inp;
        let mut y = vec![0f32; rows * self.out];
        with_values([x], "int8", |[x]| {
            // Columns split over threads; each column's output for every row.
            let per_task = self.out.div_ceil(rayon::current_num_threads() * 4).max(1);
            let y_ptr = super::SharedMut(y.as_mut_ptr());
            (0..self.out).into_par_iter().step_by(per_task).for_each(|start| {
                let mut acc = vec![0f32; rows * 8];
                let mut col = vec![0f32; rows];
                for j in start..(start + per_task).min(self.out) {
                    column(
                        x,
                        &self.values[j * self.inp..(j + 1) * self.inp],
                        &self.scales[j * self.inp / BLOCK..(j + 1) * self.inp / BLOCK],
                        &mut acc,
                        &mut col,
                    );
                    for (r, v) in col.iter().enumerate() {
                        // SAFETY: column j of row r is written by this task only.
                        unsafe { *y_ptr.get().add(r * self.out + j) = *v };
                    }
                }
            });
        })?;
        *dims.last_mut().expect("x has a last dimension") = self.out;
        Tensor::from_vec(y, dims, x.device())
    }
}

multiversion! {
    /// One output column for every row: `col[r] = Σ_k x[r, k] · scale · q[k]`, with
    /// per-row 8-lane accumulators in `acc`.
    fn column(x: &[f32], q: &[i8], scales: &[f32], acc: &mut [f32], col: &mut [f32]) {
        let inp = q.len();
        acc.iter_mut().for_each(|a| *a = 0.0);
        let mut w = [0f32; BLOCK];
        for (b, (qb, &s)) in q.chunks_exact(BLOCK).zip(scales).enumerate() {
            for (w, &q) in w.iter_mut().zip(qb) {
                *w = q as f32 * s;
            }
            for (r, a) in acc.chunks_exact_mut(8).enumerate() {
                let xs = &x[r * inp + b * BLOCK..r * inp + (b + 1) * BLOCK];
                for l in 0..BLOCK / 8 {
                    for i in 0..8 {
                        a[i] += w[l * 8 + i] * xs[l * 8 + i];
                    }
                }
            }
        }
        for (c, a) in col.iter_mut().zip(acc.chunks_exact(8)) {
            *c = a.iter().sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the f32 product: the only error is the weights' rounding (≤ scale / 2 each).
    #[test]
    fn int8_matmul_matches_f32_within_the_rounding_bound() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (37, 64), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu)?;
        let q = Int8Weight::quantize(&w)?;
        let y = q.matmul(&x)?;
        let exact = x.matmul(&w.t()?)?;
        // Bound: Σ_k |x_k| · scale_k / 2.
        let max_scale = q.scales.iter().fold(0f32, |a, &b| a.max(b));
        let bound = x.abs()?.sum(1)?.max(0)?.to_scalar::<f32>()? * max_scale / 2.0;
        let err = (y - exact)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err <= bound + 1e-5, "error {err} above the bound {bound}");
        assert!(err > 0.0, "8-bit weights should not be exact");
        Ok(())
    }
}
