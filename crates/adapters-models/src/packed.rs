//! Frozen weights kept in a file's quantized blocks (GGUF Q4_0, Q4_K, Q8_0, ...; or Q8_0
//! made at load from an f32 model): what QLoRA-style training multiplies through, so that
//! the base takes its quantized size in memory rather than four bytes a weight.
//!
//! A product de-quantises the one weight it needs into a transient f32 matrix, multiplies
//! with the f32 kernels, and drops it; its backward (the input's gradient, `dy W`) does the
//! same. Nothing f32 of the weight outlives the op: the autograd graph holds the packed
//! blocks only. This is QLoRA's arithmetic (bitsandbytes de-quantises 4-bit weights per
//! product the same way), so adapters trained over a packed base see exactly the products
//! of the de-quantised model. Decoding steps of a few rows multiply the blocks directly
//! (candle's quantized kernels, activations rounded to 8 bits as llama.cpp does).

use adapters_kernels as kernels;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Storage, Tensor};
use std::sync::Arc;

/// A frozen `[out, in]` weight in quantized blocks.
#[derive(Clone, Debug)]
pub struct PackedWeight {
    blocks: Arc<QTensor>,
}

impl PackedWeight {
    /// Wraps quantized blocks of shape `[out, in]`.
    pub fn new(blocks: Arc<QTensor>) -> Result<Self> {
        if blocks.rank() != 2 {
            candle_core::bail!("a packed weight is a matrix; these blocks have shape {:?}", blocks.shape().dims());
        }
        Ok(PackedWeight { blocks })
    }

    /// Quantises an f32 weight to 8-bit blocks (Q8_0: 32 weights and one scale a block).
    pub fn quantize_q8_0(weight: &Tensor) -> Result<Self> {
        Self::new(Arc::new(QTensor::quantize(&weight.contiguous()?, GgmlDType::Q8_0)?))
    }

    /// The block format.
    pub fn dtype(&self) -> GgmlDType {
        self.blocks.dtype()
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.blocks.shape().dims();
        (d[0], d[1])
    }

    /// Bytes the blocks take.
    pub fn size_in_bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes()
    }

    /// The weight in f32 (a transient copy; on the CPU).
    pub fn dequantize(&self) -> Result<Tensor> {
        self.blocks.dequantize(&Device::Cpu)
    }

    /// `x Wᵀ` with `x` `[.., in]`; the input's gradient flows through `dy W`.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(Product { weight: self.clone() })
    }

    /// `x Wᵀ` on the blocks themselves, for a decoding step of few rows without gradient.
    pub fn decode_product(&self, x: &Tensor) -> Result<Tensor> {
        QMatMul::from_arc(self.blocks.clone())?.forward(x)
    }

    /// The rows of `W` reordered so that row `i` is row `order[i]` (a q/k permutation),
    /// moving whole rows of blocks.
    pub fn rows_reordered(&self, order: &[usize]) -> Result<Self> {
        let (out, inp) = self.dims();
        let dtype = self.dtype();
        let row_bytes = inp / dtype.block_size() * dtype.type_size();
        let data = self.blocks.data()?;
        if order.len() != out || data.len() != out * row_bytes {
            candle_core::bail!("reordering {} rows of a packed [{out}, {inp}] weight", order.len());
        }
        let mut moved = Vec::with_capacity(data.len());
        for &r in order {
            moved.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(moved), &Device::Cpu, dtype)?;
        Self::new(Arc::new(QTensor::new(storage, (out, inp))?))
    }
}

/// `x Wᵀ` through a transient f32 copy of `W`, forward and backward.
struct Product {
    weight: PackedWeight,
}

impl CustomOp1 for Product {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else { candle_core::bail!("packed-linear: expects f32 inputs") };
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("packed-linear: a contiguous input".into()))?;
        let x = Tensor::from_slice(&values[start..end], layout.shape(), &Device::Cpu)?;
        let y = kernels::linear(&x, &self.weight.dequantize()?, None)?.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(values)) = &*storage else { candle_core::bail!("packed-linear: an f32 product") };
        let (start, end) = layout.contiguous_offsets().expect("contiguous");
        Ok((CpuStorage::F32(values[start..end].to_vec()), y.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let w = self.weight.dequantize()?;
        let (out, inp) = self.weight.dims();
        let mut dims = dy.dims().to_vec();
        let rows = dy.elem_count() / out.max(1);
        *dims.last_mut().expect("a gradient has a last dimension") = inp;
        Ok(Some(dy.reshape((rows, out))?.matmul(&w)?.reshape(dims)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward and input gradient equal those of the de-quantised weight; rows move whole.
    #[test]
    fn products_and_gradients_equal_the_dequantized_weights() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (48, 64), &Device::Cpu)?;
        let packed = PackedWeight::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0)?))?;
        let dense = packed.dequantize()?;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 64), &Device::Cpu)?)?;
        let (y, want) = (packed.product(x.as_tensor())?, x.as_tensor().broadcast_matmul(&dense.t()?)?);
        assert!((&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
        let g = (y.sqr()?.sum_all()?).backward()?;
        let g_want = (want.sqr()?.sum_all()?).backward()?;
        let (got, wanted) = (g.get(x.as_tensor()).expect("a gradient"), g_want.get(x.as_tensor()).expect("a gradient"));
        assert!((got - wanted)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-3);
        let order: Vec<usize> = (0..48).rev().collect();
        let reversed = packed.rows_reordered(&order)?.dequantize()?;
        assert_eq!(reversed.get(0)?.to_vec1::<f32>()?, dense.get(47)?.to_vec1::<f32>()?);
        Ok(())
    }
}
