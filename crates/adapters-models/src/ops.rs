//! The few tensor ops the backbones need, each with a fused inference kernel and a
//! differentiable composition for training.
//!
//! candle's fused kernels (layer norm, RMS norm, softmax, RoPE) have no backward pass and
//! silently cut the gradient graph, so in training mode we compose the same maths from
//! differentiable primitives. Both paths compute the same function.

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
        let y = match x.dims() {
            [b, t, i] => frozen_aware_matmul(&x.reshape((b * t, *i))?, &self.weight)?.reshape((*b, *t, ()))?,
            _ => frozen_aware_matmul(x, &self.weight)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x W^T`. When `x` carries a gradient but `W` is frozen (adapter training), the product
/// goes through [`FrozenMatmul`], whose backward computes only the input's gradient;
/// candle's matmul backward would also compute (and then drop) the weight's gradient,
/// a third of the layer's training FLOPs.
fn frozen_aware_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if x.track_op() && !weight.track_op() && x.device().is_cpu() && x.rank() == 2 && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(FrozenMatmul { weight_t: weight.t()? })
    } else {
        x.matmul(&weight.t()?)
    }
}

/// `x W^T` with a constant `W`: the backward pass returns `grad W` for `x` only.
struct FrozenMatmul {
    weight_t: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("frozen-matmul: input must be contiguous".into()))?;
        let x = match storage {
            candle_core::CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), &candle_core::Device::Cpu)?,
            _ => return Err(candle_core::Error::Msg("frozen-matmul: only f32 is supported".into())),
        };
        let y = x.matmul(&self.weight_t)?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(cpu) if layout.is_contiguous() && layout.start_offset() == 0 => {
                Ok((cpu.clone(), layout.shape().clone()))
            }
            _ => Err(candle_core::Error::Msg("frozen-matmul: unexpected output layout".into())),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.weight_t.t()?)?))
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
    /// Normalises the last dimension; `train` picks the differentiable composition.
    /// Normalises the last dimension; `train` picks the differentiable composition.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let n = x.dim(D::Minus1)? as f64;
            let centered = x.broadcast_sub(&(x.sum_keepdim(D::Minus1)? / n)?)?;
            let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / n)?;
            centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
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
    /// Normalises the last dimension; `train` picks the differentiable composition.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let n = x.dim(D::Minus1)? as f64;
            let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / n)?;
            x.broadcast_div(&(ms + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
        }
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
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 8, &dev)?;
        let ln = LayerNorm { weight: w.clone(), bias: b, eps: 1e-12 };
        assert!(max_diff(&ln.forward(&x, true)?, &ln.forward(&x, false)?) < 1e-5);
        let rms = RmsNorm { weight: w, eps: 1e-5 };
        assert!(max_diff(&rms.forward(&x, true)?, &rms.forward(&x, false)?) < 1e-5);
        assert!(max_diff(&softmax_last(&x, true)?, &softmax_last(&x, false)?) < 1e-6);
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        assert!(max_diff(&rope(&x, &cos, &sin, true)?, &rope(&x, &cos, &sin, false)?) < 1e-5);
        Ok(())
    }

    /// The frozen-weight matmul gives the input the same gradient as candle's matmul and
    /// computes none for the weight.
    #[test]
    fn frozen_matmul_matches_matmul_and_skips_the_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::new(&[[1f32, -2., 0.5], [3., 0.25, -1.]], &dev)?;
        let w = Tensor::new(&[[0.1f32, 0.2, 0.3], [-0.4, 0.5, 0.6], [0.7, -0.8, 0.9], [1.0, 1.1, -1.2]], &dev)?;
        let lin = Linear::new(w.clone(), None);
        let y = lin.forward(x.as_tensor())?;
        let reference = x.as_tensor().matmul(&w.t()?)?;
        assert_eq!(y.to_vec2::<f32>()?, reference.to_vec2::<f32>()?);
        let g = y.sqr()?.sum_all()?.backward()?;
        let g_ref = reference.sqr()?.sum_all()?.backward()?;
        assert_eq!(g.get(&x).unwrap().to_vec2::<f32>()?, g_ref.get(&x).unwrap().to_vec2::<f32>()?);
        // candle's matmul also stores a gradient for the (transposed) weight; ours does not.
        assert_eq!(g.get_ids().count() + 1, g_ref.get_ids().count());
        Ok(())
    }
}
