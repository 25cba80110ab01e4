//! The language-model loss without the full logits: mean cross-entropy of `hidden · Wᵀ`
//! computed a block of rows at a time, with the gradients computed in the same pass, so a
//! `[tokens, vocab]` logits tensor (and its gradient) never exists at once.

use super::simd::{self, exp, multiversion};
use super::{fused, gemm, slice, Mat, SharedMut};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rows of logits alive at once: 256 x a 49152-token vocabulary is 50 MB. Fewer rows
/// per block mean more blocks, and each block's two products re-pack the whole `[vocab,
/// d]` weight (28 MB for SmolLM2): at 128 rows that packing was ~3% of a training step.
const ROWS: usize = 256;

/// Mean over rows of `-log softmax(hidden · Wᵀ)[target]`: `hidden` `[n, d]`, `weight`
/// `[vocab, d]`, `targets` `[n]` (u32).
pub fn linear_cross_entropy(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !fused(&[hidden, weight]) {
        return composed(hidden, weight, targets);
    }
    blocked(hidden, weight, targets, ROWS)
}

pub(super) fn blocked(hidden: &Tensor, weight: &Tensor, targets: &Tensor, rows: usize) -> Result<Tensor> {
    let (n, d) = hidden.dims2()?;
    let (vocab, d2) = weight.dims2()?;
    let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if d != d2 || targets.len() != n {
        candle_core::bail!(
            "cross-entropy: hidden {:?}, weight {:?} and {} targets do not fit",
            hidden.dims(),
            weight.dims(),
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target {t} is outside the vocabulary of {vocab}");
    }
    let op = LinearCrossEntropy { targets, rows, want_hidden: hidden.track_op(), want_weight: weight.track_op(), grads: Mutex::new(None) };
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// The same maths from candle ops (with the full logits).
pub(super) fn composed(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(&hidden.matmul(&weight.t()?)?, targets)
}

struct LinearCrossEntropy {
    targets: Vec<u32>,
    rows: usize,
    want_hidden: bool,
    want_weight: bool,
    /// d loss / d hidden and d loss / d weight (if wanted), from the forward pass.
    grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

multiversion! {
    /// Turns a row of logits into d loss / d logits (softmax − one-hot, over `n` rows) and
    /// returns the row's loss.
    fn softmax_grad_row(row: &mut [f32], target: usize, n: f32, want_grad: bool) -> f32 {
        let max = simd::max(row);
        let target_logit = row[target];
        // exp(x − max) in place (one exp per logit), summed in 8 independent lanes.
        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for i in 0..8 {
                c[i] = exp(c[i] - max);
                sums[i] += c[i];
            }
        }
        let mut tail = 0f32;
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            tail += *x;
        }
        let total = simd::sum(&sums) + tail;
        if want_grad {
            let scale = 1.0 / (total * n);
            for x in row.iter_mut() {
                *x *= scale;
            }
            row[target] -= 1.0 / n;
        }
        max + total.ln() - target_logit
    }
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, w) = (slice(hs, hl, "cross-entropy")?, slice(ws, wl, "cross-entropy")?);
        let (n, d) = hl.shape().dims2()?;
        let vocab = wl.shape().dims2()?.0;
        let want_grad = self.want_hidden || self.want_weight;
        let threads = candle_core::utils::get_num_threads();
        let mut logits = vec![0f32; self.rows.min(n) * vocab];
        let mut dh = vec![0f32; if self.want_hidden { n * d } else { 0 }];
        let mut dw = vec![0f32; if self.want_weight { vocab * d } else { 0 }];
        let mut total = 0f64;
        for start in (0..n).step_by(self.rows) {
            let m = self.rows.min(n - start);
            let hc = h[start * d..].as_ptr();
            // SAFETY: logits holds m x vocab; h rows start..start+m and W are in bounds.
            unsafe {
                gemm(
                    m,
                    vocab,
                    d,
                    SharedMut(logits.as_mut_ptr()),
                    vocab as isize,
                    Mat(hc, d as isize, 1),
                    Mat(w.as_ptr(), 1, d as isize),
                    1.0,
                    false,
                    threads,
                )
            };
            let losses: Vec<f32> = logits[..m * vocab]
                .par_chunks_mut(vocab)
                .enumerate()
                .map(|(i, row)| softmax_grad_row(row, self.targets[start + i] as usize, n as f32, want_grad))
                .collect();
            total += losses.iter().map(|&l| l as f64).sum::<f64>();
            // SAFETY: dh rows start..start+m, dW (vocab x d), logits (m x vocab) in bounds.
            unsafe {
                if self.want_hidden {
                    let dst = SharedMut(dh[start * d..].as_mut_ptr());
                    gemm(
                        m,
                        d,
                        vocab,
                        dst,
                        d as isize,
                        Mat(logits.as_ptr(), vocab as isize, 1),
                        Mat(w.as_ptr(), d as isize, 1),
                        1.0,
                        false,
                        threads,
                    );
                }
                if self.want_weight {
                    let dst = SharedMut(dw.as_mut_ptr());
                    gemm(
                        vocab,
                        d,
                        m,
                        dst,
                        d as isize,
                        Mat(logits.as_ptr(), 1, vocab as isize),
                        Mat(hc, d as isize, 1),
                        1.0,
                        start > 0,
                        threads,
                    );
                }
            }
        }
        if want_grad {
            *self.grads.lock().expect("cross-entropy gradients") = Some((dh, dw));
        }
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some((dh, dw)) = self.grads.lock().expect("cross-entropy gradients").take() else {
            candle_core::bail!("cross-entropy: backward without the forward's gradients (or run twice)")
        };
        let dh = if self.want_hidden { Some(Tensor::from_vec(dh, h.shape(), h.device())?.broadcast_mul(grad)?) } else { None };
        let dw = if self.want_weight { Some(Tensor::from_vec(dw, w.shape(), w.device())?.broadcast_mul(grad)?) } else { None };
        Ok((dh, dw))
    }
}
