//! The layers the backbones are built from, on the fused kernels of [`adapters_kernels`]
//! (which fall back to composed candle ops off the CPU).

use crate::packed::PackedWeight;
use adapters_core::{AdapterSet, ForwardCtx, FrozenLinear, Point};
use adapters_kernels as kernels;
use candle_core::{DType, Module, Result, Tensor};
use std::sync::Arc;

/// Decoding steps of at most this many rows use a layer's 8-bit copy, when it has one:
/// they read every weight for a handful of rows, so memory traffic dominates.
const QUANTIZED_MAX_ROWS: usize = 16;

/// A frozen linear layer `y = x W^T + b`, as stored by PyTorch (`W` is `[out, in]`).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`: f32, or quantized blocks (see [`crate::packed`]).
    weight: Weight,
    /// `[out]`, if the layer has one.
    pub bias: Option<Tensor>,
    /// An 8-bit copy of `weight` for inference on few rows.
    quantized: Option<Arc<kernels::Int8Weight>>,
    /// An 8-bit copy of `weight` (per channel) that every inference product runs on, with
    /// the activations quantised per row ([`Linear::use_int8`]).
    int8: Option<Arc<kernels::Int8Matrix>>,
}

/// Where a projection's weight lives.
#[derive(Clone, Debug)]
enum Weight {
    /// f32 (possibly kept transposed in memory, see [`Linear::store_transposed`]).
    Dense(Tensor),
    /// Quantized blocks, multiplied through without a lasting f32 copy.
    Packed(PackedWeight),
}

impl Linear {
    /// A layer from its weight and optional bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight: Weight::Dense(weight), bias, quantized: None, int8: None }
    }

    /// A layer whose weight stays in quantized blocks (QLoRA-style training and inference).
    pub fn packed(weight: PackedWeight, bias: Option<Tensor>) -> Self {
        Linear { weight: Weight::Packed(weight), bias, quantized: None, int8: None }
    }

    /// The weight `[out, in]` in f32: the layer's own tensor, or a transient de-quantised
    /// copy of a packed one.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Packed(p) => p.dequantize(),
        }
    }

    /// The f32 weight, unless the layer is packed: for the fused paths that read it in
    /// place (a packed layer takes the plain product instead).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Packed(_) => None,
        }
    }

    /// Rows `ids` `[b, t]` of the weight, `[b, t, in]`: the layer read as an embedding
    /// table (a packed one de-quantises only those rows).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => embedding(w, ids),
            Weight::Packed(p) => {
                let (b, t) = ids.dims2()?;
                p.gather_rows(ids)?.reshape((b, t, ()))
            }
        }
    }

    /// Bytes the weight and bias take: f32 at 4 bytes a value, packed at their blocks' size
    /// (the 8-bit decoding copies left out).
    pub fn weight_bytes(&self) -> usize {
        let weight = match &self.weight {
            Weight::Dense(w) => 4 * w.elem_count(),
            Weight::Packed(p) => p.size_in_bytes(),
        };
        weight + self.bias.as_ref().map_or(0, |b| 4 * b.elem_count())
    }

    /// The quantized blocks, if the layer is packed.
    pub fn packed_weight(&self) -> Option<&PackedWeight> {
        match &self.weight {
            Weight::Packed(p) => Some(p),
            Weight::Dense(_) => None,
        }
    }

    /// Keeps the weight as 8-bit blocks (Q8_0) instead of f32 (`--quantize q8_0` for
    /// training over a safetensors model); a no-op for a packed layer or widths that are
    /// not whole blocks.
    pub fn pack_q8_0(&mut self) -> Result<()> {
        if let Weight::Dense(w) = &self.weight {
            if w.device().is_cpu() && self.in_features().is_multiple_of(32) {
                self.weight = Weight::Packed(PackedWeight::quantize_q8_0(w)?);
                self.quantized = None;
                self.int8 = None;
            }
        }
        Ok(())
    }

    /// Replaces the weight (merging an adapter into it), kept in the storage the old one
    /// had ([`Linear::store_transposed`]; a packed layer becomes f32); drops the 8-bit copy.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        let transposed = self.stored_transposed();
        self.weight = Weight::Dense(if transposed { kernels::transposed_storage(&weight)? } else { weight });
        self.quantized = None;
        self.int8 = None;
        Ok(())
    }

    /// A layer of a loaded model: frozen ones on the CPU are kept transposed in memory
    /// ([`Linear::store_transposed`]); trainable ones (variables) stay as given.
    pub fn loaded(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let mut linear = Linear::new(weight, bias);
        if let Weight::Dense(w) = &linear.weight {
            if w.device().is_cpu() && !w.track_op() {
                linear.store_transposed()?;
            }
        }
        Ok(linear)
    }

    /// Keeps the weight transposed in memory (`[in, out]`, still seen as `[out, in]`):
    /// products over few rows (decoding steps, short prompts) then run 2-7x faster
    /// ([`kernels::transposed_storage`]), at the same memory. For a decoder's projections;
    /// a layer whose weight also serves as an embedding table keeps PyTorch's layout.
    pub fn store_transposed(&mut self) -> Result<()> {
        if let (false, Weight::Dense(w)) = (self.stored_transposed(), &self.weight) {
            self.weight = Weight::Dense(kernels::transposed_storage(w)?);
        }
        Ok(())
    }

    fn stored_transposed(&self) -> bool {
        matches!(&self.weight, Weight::Dense(w) if !w.is_contiguous() && w.t().is_ok_and(|t| t.is_contiguous()))
    }

    /// Keeps an 8-bit copy of the weight ([`kernels::Int8Weight`]), used by decoding steps
    /// ([`Linear::forward_decoding`]): a quarter of the f32 weight's memory traffic, at
    /// 8-bit weight precision. CPU only; a no-op for widths that are not whole blocks and
    /// for packed layers (their decoding steps multiply the blocks).
    pub fn quantize(&mut self) -> Result<()> {
        if let Weight::Dense(w) = &self.weight {
            if w.device().is_cpu() && self.in_features().is_multiple_of(kernels::INT8_BLOCK) {
                self.quantized = Some(Arc::new(kernels::Int8Weight::quantize(w)?));
            }
        }
        Ok(())
    }

    /// Drops the 8-bit copy (every input then runs on the f32 weight).
    pub fn dequantize(&mut self) {
        self.quantized = None;
    }

    /// Runs every inference product (no gradient, CPU) in 8 bits: the weight quantised
    /// per output channel once, each input row per call ([`kernels::Int8Matrix`]); products
    /// that need a gradient stay on the f32 weight. An encoder's `--quantize int8`.
    pub fn use_int8(&mut self) -> Result<()> {
        let w = self.weight()?;
        if !w.device().is_cpu() {
            candle_core::bail!("8-bit products run on the CPU; this model is on {:?}: drop --quantize int8 there", w.device());
        }
        self.int8 = Some(Arc::new(kernels::Int8Matrix::quantize(&w)?));
        Ok(())
    }

    /// `gelu(x) Wᵀ + b` without storing `gelu(x)` where it can: inside the 8-bit product's
    /// quantisation of the rows, or the f32 product's packing of them (with a bias).
    pub fn gelu_forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.int8 {
            if !x.track_op() && x.device().is_cpu() {
                return q.gelu_matmul(x, self.bias.as_ref());
            }
        }
        match (&self.bias, self.dense_weight()) {
            (Some(b), Some(w)) => kernels::gelu_linear(x, w, b),
            _ => self.forward(&kernels::gelu_erf(x)?),
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dim(1).unwrap_or(0),
            Weight::Packed(p) => p.dims().1,
        }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dim(0).unwrap_or(0),
            Weight::Packed(p) => p.dims().0,
        }
    }

    /// The number of weights and biases.
    pub fn num_parameters(&self) -> usize {
        self.in_features() * self.out_features() + self.bias.as_ref().map_or(0, Tensor::elem_count)
    }

    /// The projection at `point`, passed through the adapters attached there; `decoding`
    /// picks [`Linear::forward_decoding`] for the frozen product.
    pub fn forward_with(&self, adapters: &AdapterSet, point: Point, x: &Tensor, ctx: &ForwardCtx, decoding: bool) -> Result<Tensor> {
        // The low-rank term is added inside an f32 product: not with 8-bit or packed weights.
        if let (false, None, Some(w)) = (decoding, &self.int8, self.dense_weight()) {
            if let Some(y) = adapters.low_rank_projection(point, x, w, self.bias.as_ref(), ctx)? {
                return Ok(y);
            }
        }
        let apply = |t: &Tensor| if decoding { self.forward_decoding(t) } else { self.forward(t) };
        let weight = || self.weight();
        let linear = FrozenLinear { apply: &apply, weight: &weight, bias: self.bias.as_ref() };
        adapters.projection(point, x, linear, ctx)
    }

    /// The product for a decoding step: on the 8-bit copy (or a packed layer's blocks) when
    /// `x` has at most 16 rows and needs no gradient; the full-precision product otherwise.
    /// Prompts (prefill) and plain forwards stay on f32, where the golden tests hold.
    pub fn forward_decoding(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.in_features().max(1);
        let few = rows <= QUANTIZED_MAX_ROWS && !x.track_op() && x.device().is_cpu();
        let y = match (&self.quantized, &self.weight) {
            (Some(q), _) if few => q.matmul(x)?,
            (None, Weight::Packed(p)) if few => p.decode_product(x)?,
            _ => return self.forward(x),
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.int8 {
            if !x.track_op() && x.device().is_cpu() {
                return q.matmul(x, self.bias.as_ref());
            }
        }
        match &self.weight {
            Weight::Dense(w) => kernels::linear(x, w, self.bias.as_ref()),
            Weight::Packed(p) => match &self.bias {
                Some(b) => p.product(x)?.broadcast_add(b),
                None => p.product(x),
            },
        }
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

    /// Normalises `x + residual` (one fused step).
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        kernels::add_layer_norm(x, residual, &self.weight, &self.bias, self.eps)
    }
}

/// RMS norm over the last dimension (Llama; Gemma's scales by `1 + w`).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// The checkpoint's weight `[width]` (Gemma's: the `w` of `1 + w`).
    pub weight: Tensor,
    /// What multiplies the normalised values: `weight`, or `1 + weight` for Gemma.
    scale: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// A norm scaling by `weight`, or by `1 + weight` where `plus_one` (Gemma).
    pub fn new(weight: Tensor, eps: f64, plus_one: bool) -> Result<Self> {
        let scale = if plus_one { (&weight + 1.0)? } else { weight.clone() };
        Ok(RmsNorm { weight, scale, eps })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::rms_norm(x, &self.scale, self.eps)
    }
}

/// How many copies of the batch a forward runs: one per child of the active `parallel(...)`
/// block (child i's in rows `i·batch .. (i+1)·batch`); one when rows choose their stacks.
pub(crate) fn parallel_copies(adapters: &AdapterSet, ctx: &adapters_core::ForwardCtx) -> usize {
    if ctx.rows_by_stack.is_none() {
        adapters.parallel_width()
    } else {
        1
    }
}

/// `t` (`[batch, ...]`) with its rows repeated `copies` times, copy i in rows
/// `i·batch .. (i+1)·batch`.
pub(crate) fn repeat_rows(t: &Tensor, copies: usize) -> Result<Tensor> {
    if copies == 1 {
        return Ok(t.clone());
    }
    let mut times = vec![1; t.rank()];
    times[0] = copies;
    t.repeat(times.as_slice())
}

/// Token embeddings `x` `[copies · batch, seq, hidden]` plus the context's embedding
/// perturbation (given for `batch` rows, the same for every `parallel(...)` copy).
pub(crate) fn perturbed(x: Tensor, ctx: &adapters_core::ForwardCtx, copies: usize) -> Result<Tensor> {
    match &ctx.embedding_perturbation {
        None => Ok(x),
        Some(delta) => x + repeat_rows(delta, copies)?,
    }
}

/// The additive attention mask with a key/value prefix in front of the keys: `mask`
/// (`[1 or rows, 1 or queries, keys]`, `None`: every key visible) extended by `prefix`
/// positions, hidden (`hidden`, a large negative bias) where `valid` (`[rows, prefix]`,
/// `u32`) is 0; `[1 or rows, 1 or queries, prefix + keys]`.
pub fn mask_with_prefix(
    mask: Option<&Tensor>,
    valid: Option<&Tensor>,
    prefix: usize,
    rows: usize,
    keys: usize,
    hidden: f32,
) -> Result<Tensor> {
    let device = valid.or(mask).map_or(candle_core::Device::Cpu, |t| t.device().clone());
    let front = match valid {
        // 0 where valid, `hidden` where not (a product with 0 would be NaN for -inf).
        Some(v) => {
            v.eq(0u32)?.where_cond(&Tensor::full(hidden, v.shape(), v.device())?, &Tensor::zeros(v.shape(), DType::F32, v.device())?)?
        }
        None => Tensor::zeros((1, prefix), DType::F32, &device)?,
    }
    .unsqueeze(1)?;
    let rest = match mask {
        Some(m) => m.clone(),
        None => Tensor::zeros((1, 1, keys), DType::F32, &device)?,
    };
    let batch = if front.dim(0)? > 1 || rest.dim(0)? > 1 { rows } else { 1 };
    let queries = rest.dim(1)?;
    Tensor::cat(&[front.broadcast_as((batch, queries, prefix))?, rest.broadcast_as((batch, queries, rest.dim(2)?))?], 2)
}

/// Attention with Gemma 2's soft-capped scores, `softmax(cap · tanh(q kᵀ · scale / cap) +
/// mask) v`, on the layout of [`kernels::attention`] (grouped key/value heads, additive
/// `mask` `[1 or batch, 1 or queries, keys]`). In candle ops: no fused kernel caps scores.
#[allow(clippy::too_many_arguments)]
pub fn softcapped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
    cap: f64,
) -> Result<Tensor> {
    let (b, tq, width) = q.dims3()?;
    let (hd, tk, group) = (width / heads, k.dim(1)?, heads / kv_heads);
    let q = q.reshape((b, tq, heads, hd))?.transpose(1, 2)?.contiguous()?;
    // Key/value head j serves query heads j·group .. (j+1)·group, as transformers' repeat_kv.
    let repeated = |t: &Tensor| -> Result<Tensor> {
        t.reshape((b, tk, kv_heads, 1, hd))?
            .broadcast_as((b, tk, kv_heads, group, hd))?
            .reshape((b, tk, heads, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (k, v) = (repeated(k)?, repeated(v)?);
    let scores = ((q.matmul(&k.t()?)? * scale)? / cap)?.tanh()? * cap;
    let scores = match mask {
        Some(m) => scores?.broadcast_add(&m.unsqueeze(1)?)?,
        None => scores?,
    };
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?.transpose(1, 2)?.reshape((b, tq, width))
}
