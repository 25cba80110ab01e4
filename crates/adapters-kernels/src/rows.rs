//! Operations with weights that differ per row of the batch (mixed-adapter batches,
//! generated adapters): one batched product over the rows, never a loop of tensor ops
//! over them.

use super::{fused, gemm, output_buffer, slice, written, Mat, SharedMut};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `residual[i] + x[i] W[i]ᵀ + b[i]` for every row `i`: `x` `[rows, seq, in]`, `W`
/// `[rows, out, in]`, `b` `[rows, out]`, `residual` `[rows, seq, out]`. On the CPU the rows
/// run in parallel, each a single-threaded product (candle's batched matmul splits each
/// small product over threads instead: ~3x slower at MiniLM's adapter sizes).
pub fn row_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    let (rows, seq, k) = x.dims3()?;
    let (rows_w, n, k_w) = weight.dims3()?;
    if rows_w != rows || k_w != k || bias.is_some_and(|b| b.dims() != [rows, n]) || residual.is_some_and(|r| r.dims() != [rows, seq, n]) {
        candle_core::bail!(
            "row_linear: input {:?}, weight {:?}, bias {:?} and residual {:?} do not fit",
            x.shape(),
            weight.shape(),
            bias.map(Tensor::shape),
            residual.map(Tensor::shape)
        );
    }
    let mut tensors = vec![x, weight];
    tensors.extend(bias);
    tensors.extend(residual);
    if !fused(&tensors) {
        let y = x.matmul(&weight.transpose(1, 2)?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(&b.unsqueeze(1)?)?,
            None => y,
        };
        return match residual {
            Some(r) => r + y,
            None => Ok(y),
        };
    }
    // Weight and bias as one [rows, out, in + 1] operand: a custom op takes at most three inputs.
    let bias = match bias {
        Some(b) => b.unsqueeze(2)?,
        None => Tensor::zeros((rows, n, 1), x.dtype(), x.device())?,
    };
    let augmented = Tensor::cat(&[weight, &bias], 2)?;
    match residual {
        Some(r) => x.contiguous()?.apply_op3(&augmented, &r.contiguous()?, RowLinear),
        None => x.contiguous()?.apply_op2(&augmented, RowLinear),
    }
}

/// Layer norm over the last dimension with a weight and bias per row (`[rows, features]`).
pub fn row_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let features = x.dim(candle_core::D::Minus1)?;
    let (ones, zeros) = (Tensor::ones(features, x.dtype(), x.device())?, Tensor::zeros(features, x.dtype(), x.device())?);
    super::layer_norm(x, &ones, &zeros, eps)?.broadcast_mul(&weight.unsqueeze(1)?)?.broadcast_add(&bias.unsqueeze(1)?)
}

/// [`row_linear`] on the CPU: `x` `[rows, seq, k]`, the weight with its bias as a last
/// column `[rows, n, k + 1]`, and optionally the residual `[rows, seq, n]`.
struct RowLinear;

impl RowLinear {
    fn forward(x: &[f32], xl: &Layout, wb: &[f32], wl: &Layout, residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let ((rows, seq, k), (_, n, k1)) = (xl.shape().dims3()?, wl.shape().dims3()?);
        let mut y = output_buffer(rows * seq * n);
        y.par_chunks_mut(seq * n).enumerate().for_each(|(i, block)| {
            let w = &wb[i * n * k1..(i + 1) * n * k1];
            let bias: Vec<f32> = (0..n).map(|j| w[j * k1 + k]).collect();
            match residual {
                Some(r) => {
                    for (out, res) in block.chunks_exact_mut(n).zip(r[i * seq * n..(i + 1) * seq * n].chunks_exact(n)) {
                        for ((o, a), b) in out.iter_mut().zip(res).zip(&bias) {
                            *o = a + b;
                        }
                    }
                }
                None => block.chunks_exact_mut(n).for_each(|out| out.copy_from_slice(&bias)),
            }
            // SAFETY: row i's x (seq x k), W (the first k columns of the n x (k + 1)
            // operand, read as its transpose) and output block (seq x n), all in bounds.
            unsafe {
                gemm(
                    seq,
                    n,
                    k,
                    SharedMut(block.as_mut_ptr()),
                    n as isize,
                    Mat(x[i * seq * k..].as_ptr(), k as isize, 1),
                    Mat(w.as_ptr(), 1, k1 as isize),
                    1.0,
                    true,
                    1,
                )
            };
        });
        Ok((CpuStorage::F32(written(y, "row_linear")), Shape::from((rows, seq, n))))
    }

    /// Gradients of the input and the augmented weight, each only when it trains.
    fn grads(x: &Tensor, wb: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let k = x.dim(2)?;
        let gx = if x.track_op() { Some(grad.matmul(&wb.narrow(2, 0, k)?.detach())?) } else { None };
        let gw = if wb.track_op() {
            let gw = grad.transpose(1, 2)?.matmul(&x.detach())?;
            Some(Tensor::cat(&[gw, grad.sum_keepdim(1)?.transpose(1, 2)?], 2)?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

impl CustomOp2 for RowLinear {
    fn name(&self) -> &'static str {
        "row-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        RowLinear::forward(slice(xs, xl, "row-linear")?, xl, slice(ws, wl, "row-linear")?, wl, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        RowLinear::grads(x, w, grad)
    }
}

impl CustomOp3 for RowLinear {
    fn name(&self) -> &'static str {
        "row-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let r = slice(rs, rl, "row-linear")?;
        RowLinear::forward(slice(xs, xl, "row-linear")?, xl, slice(ws, wl, "row-linear")?, wl, Some(r))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = RowLinear::grads(x, w, grad)?;
        Ok((gx, gw, r.track_op().then(|| grad.clone())))
    }
}
