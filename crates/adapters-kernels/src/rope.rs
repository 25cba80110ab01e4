//! Rotary position embedding (Hugging Face's half-split layout) applied in the
//! projections' `[batch, seq, heads * head_dim]` layout; its backward is the inverse
//! rotation.

use super::simd::multiversion;
use super::{fused, output_buffer, slice, with_values, written};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Rotates each head's halves of `x` `[batch, seq, heads * head_dim]` by the angles of
/// `cos`, `sin` `[seq, head_dim / 2]` (the positions of `x`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    if !fused(&[x, cos, sin]) {
        return composed(x, cos, sin, heads);
    }
    let (_, t, width) = x.dims3()?;
    if heads == 0 || width % (2 * heads) != 0 || cos.dims2()? != (t, width / heads / 2) || sin.dims2()? != (t, width / heads / 2) {
        candle_core::bail!("rope: x {:?} with {heads} heads does not fit cos {:?} / sin {:?}", x.dims(), cos.dims(), sin.dims());
    }
    let (cos, sin) = with_values([cos, sin], "rope", |[c, s]| (c.to_vec(), s.to_vec()))?;
    x.contiguous()?.apply_op1(Rope { cos, sin, heads })
}

/// The same maths from candle ops.
pub(super) fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let hd = width / heads;
    let x = x.reshape((b, t, heads, hd))?;
    let (x1, x2) = (x.narrow(D::Minus1, 0, hd / 2)?, x.narrow(D::Minus1, hd / 2, hd / 2)?);
    let (cos, sin) = (cos.reshape((t, 1, hd / 2))?, sin.reshape((t, 1, hd / 2))?);
    let rotated = Tensor::cat(
        &[(x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?, (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?],
        D::Minus1,
    )?;
    rotated.reshape((b, t, width))
}

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    heads: usize,
}

multiversion! {
    /// One position's heads: `sign` −1 rotates backwards (the backward pass).
    fn rotate(x: &[f32], y: &mut [f32], cos: &[f32], sin: &[f32], half: usize, sign: f32) {
        for (x, y) in x.chunks(2 * half).zip(y.chunks_mut(2 * half)) {
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for i in 0..half {
                let s = sign * sin[i];
                y1[i] = x1[i] * cos[i] - x2[i] * s;
                y2[i] = x2[i] * cos[i] + x1[i] * s;
            }
        }
    }
}

impl Rope {
    fn apply(&self, x: &[f32], dims: &[usize], sign: f32) -> Result<Vec<f32>> {
        let [_, t, width] = dims else { candle_core::bail!("rope: expects [batch, seq, width]") };
        let half = width / self.heads / 2;
        let mut y = output_buffer(x.len());
        y.par_chunks_mut(*width).zip(x.par_chunks(*width)).enumerate().for_each(|(pos, (y, x))| {
            let p = pos % t;
            rotate(x, y, &self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half], half, sign)
        });
        Ok(written(y, "rope"))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.apply(slice(s, l, "rope")?, l.dims(), 1.0)?), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_values([grad], "rope", |[g]| self.apply(g, x.dims(), -1.0))??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
