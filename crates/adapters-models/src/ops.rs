//! The layers the backbones are built from. Linear layers and norms run on the fused
//! kernels of [`crate::kernels`]; softmax and RoPE (Llama) still pick candle's fused kernel
//! for inference and a differentiable composition for training, because candle's fused
//! versions have no backward pass and would silently cut the gradient graph.

use crate::kernels;
use adapters_core::{AdapterSet, ForwardCtx, Point, ProjectionIo};
use candle_core::{Module, Result, Tensor, D};

/// A frozen linear layer `y = x W^T + b`, as stored by PyTorch (`W` is `[out, in]`).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, if the layer has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A layer from its weight and optional bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// The projection at `point`, passed through the adapters attached there.
    pub fn forward_with(&self, adapters: &AdapterSet, point: Point, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let y = self.forward(x)?;
        let apply = |t: &Tensor| self.forward(t);
        adapters.projection(point, &ProjectionIo { input: x, output: &y, linear: &apply }, ctx)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// Looks up rows of an embedding table: `ids` `[b, t]` to `[b, t, dim]`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, ()))
}

/// Layer norm over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale `[hidden]`.
    pub weight: Tensor,
    /// Shift `[hidden]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// RMS norm over the last dimension (Llama).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// Scale `[hidden]`.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::rms_norm(x, &self.weight, self.eps)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, train: bool) -> Result<Tensor> {
    if train {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// Rotary position embedding, half-split (Hugging Face) layout, on `[b, heads, t, d]`.
/// `cos` and `sin` are `[t, d/2]` for the positions of `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, train: bool) -> Result<Tensor> {
    if train {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(
            &[(x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?, (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?],
            D::Minus1,
        )?;
        Ok(rotated)
    } else {
        candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The training compositions compute the same function as the fused kernels.
    #[test]
    fn fused_and_composed_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        assert!(max_diff(&softmax_last(&x, true)?, &softmax_last(&x, false)?) < 1e-6);
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        assert!(max_diff(&rope(&x, &cos, &sin, true)?, &rope(&x, &cos, &sin, false)?) < 1e-5);
        Ok(())
    }
}
