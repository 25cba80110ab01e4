//! One AdamW update of a parameter in place: three passes over memory (first moment,
//! second moment, parameter) instead of the ~15 allocating tensor ops of the composition.

use super::fused;
use super::simd::multiversion;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 15;

/// The hyper-parameters of one update. `c1`, `c2` are the bias corrections
/// `1 − β1ᵗ`, `1 − β2ᵗ`; `decay` the factor `1 − lr · weight_decay` (1 for no decay).
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub c1: f64,
    pub c2: f64,
    pub decay: f64,
}

/// Updates `param`, `m` and `v` in place from gradient `g` (PyTorch's `AdamW` maths).
/// Off the CPU, the same maths as candle ops that replace the three tensors' contents.
pub fn adamw(param: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: AdamWStep) -> Result<()> {
    let contiguous = [param, m, v, g].iter().all(|t| t.is_contiguous());
    if !fused(&[param, m, v, g]) || !contiguous {
        return composed(param, m, v, g, s);
    }
    m.inplace_op2(g, &Moment { beta: s.beta1 as f32, square: false })?;
    v.inplace_op2(g, &Moment { beta: s.beta2 as f32, square: true })?;
    param.inplace_op3(m, v, &Apply(s))
}

/// The same maths from candle ops; the results are copied into the given tensors' storage.
pub(super) fn composed(param: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: AdamWStep) -> Result<()> {
    let new_m = ((m * s.beta1)? + (g * (1.0 - s.beta1))?)?;
    let new_v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let update = ((&new_m / s.c1)? / ((&new_v / s.c2)?.sqrt()? + s.eps)?)?;
    let new_p = ((param * s.decay)? - (update * s.lr)?)?;
    for (dst, src) in [(m, new_m), (v, new_v), (param, new_p)] {
        dst.slice_set(&src, 0, 0)?;
    }
    Ok(())
}

fn values_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: expects f32") };
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: expects contiguous")))?;
    Ok(&mut v[start..end])
}

/// `x ← β x + (1 − β) g` (or `g²`).
struct Moment {
    beta: f32,
    square: bool,
}

multiversion! {
    fn moment_chunk(x: &mut [f32], g: &[f32], beta: f32, square: bool) {
        if square {
            for (x, g) in x.iter_mut().zip(g) {
                *x = beta * *x + (1.0 - beta) * g * g;
            }
        } else {
            for (x, g) in x.iter_mut().zip(g) {
                *x = beta * *x + (1.0 - beta) * g;
            }
        }
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let x = values_mut(s1, l1, self.name())?;
        let g = super::slice(s2, l2, self.name())?;
        x.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(x, g)| moment_chunk(x, g, self.beta, self.square));
        Ok(())
    }
}

/// `p ← p · decay − lr · (m / c1) / (sqrt(v / c2) + eps)`.
struct Apply(AdamWStep);

multiversion! {
    fn apply_chunk(p: &mut [f32], m: &[f32], v: &[f32], lr: f32, c1: f32, c2: f32, eps: f32, decay: f32) {
        for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
            *p = *p * decay - lr * (m / c1) / ((v / c2).sqrt() + eps);
        }
    }
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<()> {
        let p = values_mut(s1, l1, self.name())?;
        let (m, v) = (super::slice(s2, l2, self.name())?, super::slice(s3, l3, self.name())?);
        let s = self.0;
        let (lr, c1, c2, eps, decay) = (s.lr as f32, s.c1 as f32, s.c2 as f32, s.eps as f32, s.decay as f32);
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| apply_chunk(p, m, v, lr, c1, c2, eps, decay));
        Ok(())
    }
}
