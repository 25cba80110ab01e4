//! Decoding: KV caches, prompts run into caches of their own, and steps for sequences
//! at their own positions (continuous batching), on 8-bit copies of the weights.

use super::{Kv, Llama};
use crate::ops::Linear;
use adapters_core::{ForwardCtx, Point, Site};
use candle_core::{Result, Tensor};

/// Cached keys and values of earlier positions, one entry per layer (see `LayerKv`).
/// A clone is a copy (the buffers are written in place).
pub struct KvCache {
    pub(super) layers: Vec<Option<LayerKv>>,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let copy = |l: &LayerKv| -> LayerKv {
            LayerKv { keys: l.keys.copy().expect("a copy"), values: l.values.copy().expect("a copy"), len: l.len }
        };
        KvCache { layers: self.layers.iter().map(|l| l.as_ref().map(copy)).collect() }
    }
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| None).collect() }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers[0].as_ref().map_or(0, |l| l.len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for `positions` in all, so that appends up to there write in place
    /// without growing (a server knows each generation's prompt and token limit).
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        self.layers.iter_mut().flatten().try_for_each(|l| l.grow_to(positions))
    }

    /// Forgets the positions from `len` on (a step undone: what it wrote is past `len`).
    pub fn truncate(&mut self, len: usize) {
        for l in self.layers.iter_mut().flatten() {
            l.len = l.len.min(len);
        }
    }
}

/// One layer's cached keys and values (after RoPE): `[batch, capacity, kv_heads * head_dim]`
/// buffers whose first `len` positions are filled. Appends write in place and the buffers
/// grow by doubling, so a decoding step copies its new position only (concatenating
/// instead copied the whole cache every step: O(length) per token).
pub(super) struct LayerKv {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

impl LayerKv {
    /// A cache holding `k` and `v` `[batch, positions, width]`. Its buffers are exactly
    /// full (they may be views of the forward's own tensors), so the first append or
    /// [`KvCache::reserve`] moves them into buffers of its own before writing in place.
    pub(super) fn new(k: &Tensor, v: &Tensor) -> Result<Self> {
        let (keys, values) = (k.contiguous()?, v.contiguous()?);
        Ok(LayerKv { len: keys.dim(1)?, keys, values })
    }

    /// Appends the positions `k`, `v` `[batch, new, width]`.
    pub(super) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let end = self.len + k.dim(1)?;
        if end > self.capacity() {
            self.grow_to(end.max(2 * self.capacity()))?;
        }
        self.keys.slice_set(&k.contiguous()?, 1, self.len)?;
        self.values.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = end;
        Ok(())
    }

    /// The cached keys and values, `[batch, len, width]` (views of the buffers).
    pub(super) fn keys_values(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.keys.narrow(1, 0, self.len)?, self.values.narrow(1, 0, self.len)?))
    }

    /// The whole buffers and how many positions they hold (for [`adapters_kernels::attention_per_row`]).
    pub(super) fn buffers(&self) -> (&Tensor, &Tensor, usize) {
        (&self.keys, &self.values, self.len)
    }

    fn capacity(&self) -> usize {
        self.keys.dim(1).unwrap_or(0)
    }

    /// Moves the filled positions into buffers of `capacity` (no-op if already as large).
    fn grow_to(&mut self, capacity: usize) -> Result<()> {
        if capacity <= self.capacity() {
            return Ok(());
        }
        let grown = |t: &Tensor| -> Result<Tensor> {
            let (b, _, w) = t.dims3()?;
            let buffer = Tensor::zeros((b, capacity, w), t.dtype(), t.device())?;
            buffer.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            Ok(buffer)
        };
        (self.keys, self.values) = (grown(&self.keys)?, grown(&self.values)?);
        Ok(())
    }
}

impl Llama {
    /// Runs several prompts in one forward pass (right-padded to the longest; rows may use
    /// different adapters through `ctx`'s row choices), each into a cache of its own: the
    /// logits after each prompt's last token, `[rows, vocab]`, and the caches, ready for
    /// [`Llama::decode_step`].
    pub fn prefill(&self, prompts: &[&[u32]], ctx: &ForwardCtx) -> Result<(Tensor, Vec<KvCache>)> {
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            candle_core::bail!("prefill: every prompt needs at least one token");
        }
        let padded: Vec<u32> = prompts.iter().flat_map(|p| p.iter().copied().chain(std::iter::repeat_n(0, longest - p.len()))).collect();
        let ids = Tensor::from_vec(padded, (prompts.len(), longest), self.device())?;
        let mut batch = self.new_cache();
        // Causal: a prompt's tokens never see the padding to their right.
        let hidden = self.forward_hidden(&ids, Some(&mut batch), ctx)?;
        // Virtual tokens of prompt tuning stay in the caches, before each prompt.
        let virtual_tokens = batch.len() - longest;
        let last: Vec<u32> = prompts.iter().enumerate().map(|(i, p)| (i * longest + p.len() - 1) as u32).collect();
        let last = hidden.reshape((prompts.len() * longest, ()))?.index_select(&Tensor::new(last.as_slice(), self.device())?, 0)?;
        let caches = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let layers = batch
                    .layers
                    .iter()
                    .map(|kv| {
                        let (k, v) = kv.as_ref().expect("the forward filled every layer").keys_values()?;
                        let n = virtual_tokens + p.len();
                        Ok(Some(LayerKv::new(&k.narrow(0, i, 1)?.narrow(1, 0, n)?, &v.narrow(0, i, 1)?.narrow(1, 0, n)?)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(KvCache { layers })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((self.logits(&last)?, caches))
    }

    /// One step for sequences that each have their own cache, at their own position
    /// (continuous batching): `tokens[i]` are sequence `i`'s new tokens, appended to
    /// `caches[i]`: one for a sequence that is decoding, or a chunk of the prompt of one
    /// that is joining (chunked prefill: an empty cache takes a prompt's first chunk).
    /// Every row's tokens go through the projections together, so a step reads the weights
    /// once for decoding and prompts alike. Sequences may use different adapters (`ctx`'s
    /// row choices, one per sequence). Returns the logits after each sequence's last new
    /// token, `[sequences, vocab]`; a step of single tokens runs on the 8-bit copies if any
    /// (as [`Llama::last_logits`]).
    pub fn decode_step(&self, tokens: &[&[u32]], caches: &mut [&mut KvCache], ctx: &ForwardCtx) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() || tokens.iter().any(|t| t.is_empty()) {
            candle_core::bail!("decode_step: {} token runs (each of at least one token) for {} caches", tokens.len(), caches.len());
        }
        if caches.iter().any(|c| c.layers.len() != self.layers.len()) {
            candle_core::bail!("decode_step: every sequence needs a cache of this model");
        }
        if ctx.rows_by_stack.is_none() && self.adapters.parallel_width() > 1 {
            candle_core::bail!("a `parallel(...)` setup runs without a KV cache; generate with one adapter setup at a time");
        }
        let fresh = caches.iter().any(|c| c.is_empty());
        if fresh && self.adapters.may_act_at(Point::new(0, Site::InputEmbeddings), ctx) {
            candle_core::bail!("decode_step: prompt tuning adds virtual tokens before a prompt; run prompts with Llama::prefill");
        }
        let device = self.device();
        let counts: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        // Row j of sequence i sits at position len_i + j and sees positions 0..=len_i + j.
        let positions: Vec<u32> = caches.iter().zip(&counts).flat_map(|(c, &n)| (c.len()..c.len() + n).map(|p| p as u32)).collect();
        let longest = *positions.iter().max().expect("at least one row") as usize;
        if longest + 1 > self.config.max_position_embeddings {
            candle_core::bail!("{} positions exceed the model's context of {}", longest + 1, self.config.max_position_embeddings);
        }
        // The masks are read only where the rows' caches are gathered padded (see `Kv::PerRow`).
        let positions: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let at = self.positions(&positions, longest + 1, true)?;
        let rows_ctx = ctx.with_rows_repeated(&counts, device)?;
        let ids: Vec<u32> = tokens.concat();
        let mut x = self.embed_tokens(&Tensor::new(ids.as_slice(), device)?.unsqueeze(1)?)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let kv = Kv::PerRow { caches: caches.iter_mut().map(|c| &mut c.layers[l]).collect(), counts: &counts };
            x = self.layer_forward(l, layer, &x, &at, kv, &rows_ctx.for_layer(l))?;
        }
        let last: Vec<u32> = counts.iter().scan(0, |end, &n| Some((std::mem::replace(end, *end + n) + n - 1) as u32)).collect();
        let x = if last.len() == positions.len() { x } else { x.index_select(&Tensor::new(last.as_slice(), device)?, 0)? };
        let hidden = self.finish(&x, 0, ctx)?.squeeze(1)?;
        if counts.iter().all(|&n| n == 1) {
            self.soft_capped(self.output.forward_decoding(&hidden)?)
        } else {
            self.logits(&hidden)
        }
    }

    /// Whether prompts must run through [`Llama::prefill`] rather than in chunks through
    /// [`Llama::decode_step`]: the active adapters add virtual tokens before a prompt
    /// (prompt tuning).
    pub fn prompts_need_prefill(&self) -> bool {
        self.adapters.may_act_at(Point::new(0, Site::InputEmbeddings), &ForwardCtx::inference())
    }

    /// Keeps 8-bit copies of every projection and the output layer for decoding steps (see
    /// [`Linear::forward_decoding`]): token-by-token generation then reads a quarter of the
    /// bytes. Prompts, training and forwards without a cache still use the f32 weights.
    pub fn quantize_for_decoding(&mut self) -> Result<()> {
        self.projections_mut().try_for_each(Linear::quantize)
    }

    /// Keeps every weight matrix (the layers' projections, the token embeddings and the
    /// output layer) as 8-bit blocks (Q8_0) instead of f32 ([`crate::BaseWeights::Q8_0`]).
    pub fn pack_q8_0(&mut self) -> Result<()> {
        self.layers.iter_mut().flat_map(|l| l.projections_mut()).try_for_each(Linear::pack_q8_0)?;
        self.embed.pack_q8_0()?;
        match self.tied {
            true => self.output = self.embed.clone(),
            false => self.output.pack_q8_0()?,
        }
        Ok(())
    }

    /// Bytes the base weights take in memory: f32 tensors at 4 bytes a value, packed
    /// ones at their blocks' size (tied embeddings counted once; the 8-bit decoding
    /// copies left out).
    pub fn weight_bytes(&self) -> usize {
        let projections: usize = self.layers.iter().flat_map(|l| l.projection_list()).map(Linear::weight_bytes).sum();
        let norms: usize = self.layers.iter().map(|l| 4 * l.norm_values()).sum();
        let head = if self.tied { 0 } else { self.output.weight_bytes() };
        projections + norms + head + self.embed.weight_bytes() + 4 * self.norm.weight.elem_count()
    }

    /// Drops the 8-bit copies: every forward runs on the f32 weights.
    pub fn dequantize(&mut self) {
        self.projections_mut().for_each(Linear::dequantize);
    }

    /// Every projection of every layer, and the output layer.
    fn projections_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|l| l.projections_mut()).chain(std::iter::once(&mut self.output))
    }

    /// Logits at the last position of each row, `[batch, vocab]`.
    /// A decoding step (after cached positions) runs on the 8-bit copies, if any.
    pub fn last_logits(&self, input_ids: &Tensor, cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> Result<Tensor> {
        let decoding = cache.as_ref().is_some_and(|c| !c.is_empty());
        let hidden = self.forward_hidden(input_ids, cache, ctx)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        if decoding {
            self.soft_capped(self.output.forward_decoding(&last)?)
        } else {
            self.logits(&last)
        }
    }

    /// Bytes one cached position takes (keys and values of every layer, f32): what a
    /// server's KV budget is counted in.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.config.num_kv_heads() * self.config.head_dim() * std::mem::size_of::<f32>()
    }

    /// A fresh cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn positions(from: u32, n: usize) -> Result<Tensor> {
        Tensor::arange(from * 4, from * 4 + n as u32 * 4, &Device::Cpu)?.to_dtype(candle_core::DType::F32)?.reshape((1, n, 4))
    }

    /// Appends grow the buffers and keep every position; a truncated step is overwritten by
    /// the next append; a clone is a copy that later appends do not touch.
    #[test]
    fn appends_write_in_place_and_truncation_undoes_a_step() -> Result<()> {
        let mut layer = LayerKv::new(&positions(0, 2)?, &positions(100, 2)?)?;
        for p in 2..7 {
            layer.append(&positions(p, 1)?, &positions(100 + p, 1)?)?;
        }
        assert!(layer.capacity() >= 7);
        let (k, v) = layer.keys_values()?;
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, positions(0, 7)?.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, positions(100, 7)?.flatten_all()?.to_vec1::<f32>()?);
        let mut cache = KvCache { layers: vec![Some(layer)] };
        let copy = cache.clone();
        cache.truncate(5);
        let layer = cache.layers[0].as_mut().expect("filled");
        layer.append(&positions(50, 1)?, &positions(150, 1)?)?;
        let (k, _) = layer.keys_values()?;
        assert_eq!(k.dim(1)?, 6);
        assert_eq!(k.narrow(1, 5, 1)?.flatten_all()?.to_vec1::<f32>()?, positions(50, 1)?.flatten_all()?.to_vec1::<f32>()?);
        let (k, _) = copy.layers[0].as_ref().expect("filled").keys_values()?;
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, positions(0, 7)?.flatten_all()?.to_vec1::<f32>()?, "the clone is untouched");
        Ok(())
    }
}
