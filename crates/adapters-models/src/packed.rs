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
//!
//! A large weight (a 128k-token output layer is 1 GB in f32) is de-quantised a slab of
//! rows at a time, so the transient copy stays under [`SLAB_VALUES`]; the token embeddings
//! de-quantise only the rows looked up, and the language-model loss over a packed output
//! layer ([`linear_cross_entropy`]) never holds the `[tokens, vocab]` logits.

use adapters_kernels as kernels;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Storage, Tensor, D};
use std::sync::{Arc, Mutex};

/// The most f32 values a transient de-quantised slab of a weight holds (64 MiB): a whole
/// Llama-3.2-1B MLP projection, a sixteenth of its output layer.
pub const SLAB_VALUES: usize = 1 << 24;

/// A frozen `[out, in]` weight in quantized blocks.
#[derive(Clone, Debug)]
pub struct PackedWeight {
    blocks: Arc<QTensor>,
    /// The most values of a transient f32 slab ([`SLAB_VALUES`]; smaller in tests).
    slab_values: usize,
}

impl PackedWeight {
    /// Wraps quantized blocks of shape `[out, in]`.
    pub fn new(blocks: Arc<QTensor>) -> Result<Self> {
        if blocks.rank() != 2 {
            candle_core::bail!("a packed weight is a matrix; these blocks have shape {:?}", blocks.shape().dims());
        }
        Ok(PackedWeight { blocks, slab_values: SLAB_VALUES })
    }

    /// The same weight de-quantised in slabs of at most `values` values (to test slabs).
    #[cfg(test)]
    fn with_slab_values(mut self, values: usize) -> Self {
        self.slab_values = values;
        self
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
        self.dequantize_rows(0, self.dims().0)
    }

    /// Rows `start..start + len` of the weight in f32, de-quantised by all threads (a
    /// share of the rows each; candle de-quantises on one).
    pub fn dequantize_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        use rayon::prelude::*;
        let (out, inp) = self.dims();
        if start + len > out {
            candle_core::bail!("rows {start}..{} of a packed [{out}, {inp}] weight", start + len);
        }
        let (row_bytes, dtype) = (self.row_bytes(), self.dtype());
        let data = self.blocks.data()?;
        let per = len.div_ceil(candle_core::utils::get_num_threads().max(1)).max(1);
        let parts: Vec<Vec<f32>> = (start..start + len)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|s| {
                let n = per.min(start + len - s);
                let rows = blocks_of(data[s * row_bytes..(s + n) * row_bytes].to_vec(), n, inp, dtype)?;
                rows.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()
            })
            .collect::<Result<_>>()?;
        Tensor::from_vec(parts.concat(), (len, inp), &Device::Cpu)
    }

    /// The rows `ids` (u32, any shape) of the weight in f32, `[ids.len(), in]`: an
    /// embedding lookup that de-quantises only the rows it reads.
    pub fn gather_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let (out, _) = self.dims();
        let row_bytes = self.row_bytes();
        let data = self.blocks.data()?;
        let mut rows = Vec::with_capacity(ids.len() * row_bytes);
        for &id in &ids {
            let id = id as usize;
            if id >= out {
                candle_core::bail!("token id {id} is outside the embedding table of {out} rows");
            }
            rows.extend_from_slice(&data[id * row_bytes..(id + 1) * row_bytes]);
        }
        self.blocks_from_rows(rows, ids.len())?.dequantize(&Device::Cpu)
    }

    fn row_bytes(&self) -> usize {
        let dtype = self.dtype();
        self.dims().1 / dtype.block_size() * dtype.type_size()
    }

    fn blocks_from_rows(&self, bytes: Vec<u8>, rows: usize) -> Result<QTensor> {
        blocks_of(bytes, rows, self.dims().1, self.dtype())
    }

    /// The weight's rows in slabs of at most [`SLAB_VALUES`] values (one row at least):
    /// `(start, len)`.
    fn slabs(&self) -> Vec<(usize, usize)> {
        let (out, inp) = self.dims();
        let rows = (self.slab_values / inp.max(1)).max(1);
        (0..out).step_by(rows).map(|s| (s, rows.min(out - s))).collect()
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
        let row_bytes = self.row_bytes();
        let data = self.blocks.data()?;
        if order.len() != out || data.len() != out * row_bytes {
            candle_core::bail!("reordering {} rows of a packed [{out}, {inp}] weight", order.len());
        }
        let mut moved = Vec::with_capacity(data.len());
        for &r in order {
            moved.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
        }
        Self::new(Arc::new(self.blocks_from_rows(moved, out)?))
    }
}

/// `rows` rows of `width` values in blocks of `dtype`, from their bytes.
fn blocks_of(bytes: Vec<u8>, rows: usize, width: usize, dtype: GgmlDType) -> Result<QTensor> {
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dtype)?;
    QTensor::new(storage, (rows, width))
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
        let slabs = self.weight.slabs();
        let y = match slabs.as_slice() {
            [_] => kernels::linear(&x, &self.weight.dequantize()?, None)?,
            _ => {
                let parts = slabs
                    .iter()
                    .map(|&(s, n)| kernels::linear(&x, &self.weight.dequantize_rows(s, n)?, None))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, D::Minus1)?
            }
        };
        Ok((f32_values(&y)?, y.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (out, inp) = self.weight.dims();
        let mut dims = dy.dims().to_vec();
        let rows = dy.elem_count() / out.max(1);
        *dims.last_mut().expect("a gradient has a last dimension") = inp;
        let dy = dy.reshape((rows, out))?;
        let mut dx: Option<Tensor> = None;
        for (s, n) in self.weight.slabs() {
            let part = dy.narrow(1, s, n)?.matmul(&self.weight.dequantize_rows(s, n)?)?;
            dx = Some(match dx {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
        Ok(Some(dx.expect("a weight has rows").reshape(dims)?))
    }
}

/// A tensor's values as CPU storage (a copy).
fn f32_values(t: &Tensor) -> Result<CpuStorage> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(values)) = &*storage else { candle_core::bail!("packed: expects f32 CPU tensors") };
    let (start, end) = layout.contiguous_offsets().expect("contiguous");
    Ok(CpuStorage::F32(values[start..end].to_vec()))
}

/// Mean over rows of `-log softmax(hidden · Wᵀ)[target]` for a packed output layer `W`
/// `[vocab, d]`: `hidden` `[n, d]`, `targets` `[n]`. Two passes over the weight's slabs
/// (the log-sum-exp of each row accumulated online, then the softmax's gradient), so
/// neither the f32 weight nor the `[n, vocab]` logits exist at once; the hidden states'
/// gradient is computed in the same passes, as [`kernels::linear_cross_entropy`] does.
pub fn linear_cross_entropy(hidden: &Tensor, weight: &PackedWeight, targets: &Tensor) -> Result<Tensor> {
    let (n, d) = hidden.dims2()?;
    if d != weight.dims().1 || targets.dims1()? != n {
        candle_core::bail!(
            "cross-entropy: hidden {:?}, packed weight {:?} and targets {:?} do not fit",
            hidden.dims(),
            weight.dims(),
            targets.dims()
        );
    }
    let op = PackedCrossEntropy {
        weight: weight.clone(),
        targets: targets.to_dtype(DType::U32)?,
        want_grad: hidden.track_op(),
        grad: Mutex::new(None),
    };
    hidden.contiguous()?.apply_op1(op)
}

struct PackedCrossEntropy {
    weight: PackedWeight,
    targets: Tensor,
    want_grad: bool,
    /// d loss / d hidden, from the forward pass.
    grad: Mutex<Option<Tensor>>,
}

impl CustomOp1 for PackedCrossEntropy {
    fn name(&self) -> &'static str {
        "packed-linear-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else { candle_core::bail!("packed cross-entropy: expects f32 hidden states") };
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("packed cross-entropy: a contiguous input".into()))?;
        let h = Tensor::from_slice(&values[start..end], layout.shape(), &Device::Cpu)?;
        let n = h.dim(0)?;
        if let Some(t) = self.targets.to_vec1::<u32>()?.iter().find(|&&t| t as usize >= self.weight.dims().0) {
            candle_core::bail!("cross-entropy: target {t} is outside the vocabulary of {}", self.weight.dims().0);
        }
        // Pass 1: each row's log-sum-exp, combined over slabs (running max and sum).
        let mut lse: Option<(Tensor, Tensor)> = None;
        for (s, len) in self.weight.slabs() {
            let logits = kernels::linear(&h, &self.weight.dequantize_rows(s, len)?, None)?;
            let max = logits.max_keepdim(1)?;
            let sum = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?;
            lse = Some(match lse {
                None => (max, sum),
                Some((m, z)) => {
                    let m2 = m.maximum(&max)?;
                    let z2 = ((z * m.sub(&m2)?.exp()?)? + (sum * max.sub(&m2)?.exp()?)?)?;
                    (m2, z2)
                }
            });
        }
        let (max, sum) = lse.expect("a weight has rows");
        let lse = (max + sum.log()?)?;
        let target_rows = self.weight.gather_rows(&self.targets)?;
        let target_logits = (&h * &target_rows)?.sum_keepdim(1)?;
        let loss = (&lse - target_logits)?.sum_all()?.affine(1.0 / n as f64, 0.0)?;
        if self.want_grad {
            // Pass 2: d loss / d hidden = (softmax − one-hot) W / n.
            let mut dh = target_rows.affine(-1.0 / n as f64, 0.0)?;
            for (s, len) in self.weight.slabs() {
                let w = self.weight.dequantize_rows(s, len)?;
                let p = (kernels::linear(&h, &w, None)?.broadcast_sub(&lse)?.exp()? / n as f64)?;
                dh = (dh + p.matmul(&w)?)?;
            }
            *self.grad.lock().expect("not poisoned") = Some(dh);
        }
        Ok((f32_values(&loss)?, Shape::from(())))
    }

    fn bwd(&self, _h: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dh = self.grad.lock().expect("not poisoned").take();
        dh.map(|dh| dh.broadcast_mul(grad)).transpose()
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
        // In slabs of 10 rows: the same products and gradients.
        let slabbed = packed.clone().with_slab_values(10 * 64);
        let y2 = slabbed.product(x.as_tensor())?;
        assert!((&y2 - &want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
        let g2 = (y2.sqr()?.sum_all()?).backward()?;
        assert!((g2.get(x.as_tensor()).expect("a gradient") - wanted)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-3);
        let order: Vec<usize> = (0..48).rev().collect();
        let reversed = packed.rows_reordered(&order)?.dequantize()?;
        assert_eq!(reversed.get(0)?.to_vec1::<f32>()?, dense.get(47)?.to_vec1::<f32>()?);
        Ok(())
    }

    /// Looked-up rows and row ranges are the de-quantised weight's rows.
    #[test]
    fn gathered_rows_are_the_dequantized_rows() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (20, 64), &Device::Cpu)?;
        let packed = PackedWeight::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?))?;
        let dense = packed.dequantize()?;
        let ids = Tensor::new(&[[3u32, 19, 0], [3, 7, 7]], &Device::Cpu)?;
        let got = packed.gather_rows(&ids)?;
        assert_eq!(got.dims(), &[6, 64]);
        let want = dense.index_select(&ids.flatten_all()?, 0)?;
        assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        assert_eq!(packed.dequantize_rows(5, 4)?.to_vec2::<f32>()?, dense.narrow(0, 5, 4)?.to_vec2::<f32>()?);
        assert!(packed.gather_rows(&Tensor::new(&[[20u32]], &Device::Cpu)?).is_err());
        Ok(())
    }

    /// The loss over a packed output layer, in slabs, equals the blocked f32 kernel's on
    /// the de-quantised weight, and so does the hidden states' gradient.
    #[test]
    fn cross_entropy_over_slabs_equals_the_dense_kernel() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (100, 64), &Device::Cpu)?;
        let packed = PackedWeight::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0)?))?.with_slab_values(16 * 64);
        let dense = packed.dequantize()?;
        let h = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 64), &Device::Cpu)?)?;
        let targets = Tensor::new(&[0u32, 99, 15, 16, 17, 50, 50, 3, 98], &Device::Cpu)?;
        let got = linear_cross_entropy(h.as_tensor(), &packed, &targets)?;
        let want = candle_nn::loss::cross_entropy(&h.as_tensor().matmul(&dense.t()?)?, &targets)?;
        let (g, w_) = (got.to_scalar::<f32>()?, want.to_scalar::<f32>()?);
        assert!((g - w_).abs() < 1e-4 * w_.abs().max(1.0), "{g} vs {w_}");
        let (dg, dw) = ((got * 3.0)?.backward()?, (want * 3.0)?.backward()?);
        let (a, b) = (dg.get(h.as_tensor()).expect("a gradient"), dw.get(h.as_tensor()).expect("a gradient"));
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        assert!(linear_cross_entropy(h.as_tensor(), &packed, &Tensor::new(&[100u32; 9], &Device::Cpu)?).is_err());
        Ok(())
    }
}
