//! Decoding: KV caches, prompts run into caches of their own, and steps for sequences
//! at their own positions (continuous batching), on 8-bit copies of the weights.

use super::{Kv, Llama};
use crate::ops::{embedding, Linear};
use adapters_core::ForwardCtx;
use candle_core::{Result, Tensor};

/// Cached keys and values of earlier positions, one entry per layer, each
/// `[batch, positions, kv_heads * head_dim]` (the projections' layout, after RoPE).
#[derive(Clone)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers] }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers[0].as_ref().map_or(0, |(k, _)| k.dim(1).unwrap_or(0))
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
                        let (k, v) = kv.as_ref().expect("the forward filled every layer");
                        let n = virtual_tokens + p.len();
                        Ok(Some((k.narrow(0, i, 1)?.narrow(1, 0, n)?, v.narrow(0, i, 1)?.narrow(1, 0, n)?)))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(KvCache { layers })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((self.logits(&last)?, caches))
    }

    /// One decoding step for sequences that each have their own cache, at their own
    /// position (continuous batching: sequences join after their prompt ran with their
    /// own cache, and leave when done): `tokens[i]` continues `caches[i]`, which is
    /// extended. Rows may use different adapters (`ctx`'s row choices). Returns the next
    /// token's logits, `[rows, vocab]`, on the 8-bit copies if any (as [`Llama::last_logits`]).
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut KvCache], ctx: &ForwardCtx) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            candle_core::bail!("decode_step: {} tokens for {} caches", tokens.len(), caches.len());
        }
        if caches.iter().any(|c| c.is_empty() || c.layers.len() != self.layers.len()) {
            candle_core::bail!("decode_step: every sequence needs a cache of this model with its prompt in it");
        }
        if ctx.rows_by_stack.is_none() && self.adapters.parallel_width() > 1 {
            candle_core::bail!("a `parallel(...)` setup runs without a KV cache; generate with one adapter setup at a time");
        }
        let device = self.device();
        let positions: Vec<u32> = caches.iter().map(|c| c.len() as u32).collect();
        let longest = *positions.iter().max().expect("at least one row") as usize;
        if longest + 1 > self.config.max_position_embeddings {
            candle_core::bail!("{} positions exceed the model's context of {}", longest + 1, self.config.max_position_embeddings);
        }
        let at = Tensor::new(positions.as_slice(), device)?;
        let (cos, sin) = (self.cos.index_select(&at, 0)?, self.sin.index_select(&at, 0)?);
        // Row i sees its own positions 0..p_i and the new token (placed at `longest`).
        let mask: Vec<f32> = positions
            .iter()
            .flat_map(|&p| (0..=longest).map(move |j| if j < p as usize || j == longest { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (tokens.len(), 1, longest + 1), device)?;
        let mut x = embedding(&self.embed, &Tensor::new(tokens, device)?.unsqueeze(1)?)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let kv = Kv::PerRow(caches.iter_mut().map(|c| &mut c.layers[l]).collect());
            x = self.layer_forward(l, layer, &x, (&cos, &sin), Some(&mask), kv, &ctx.for_layer(l))?;
        }
        self.output.forward_decoding(&self.finish(&x, 0, ctx)?.squeeze(1)?)
    }

    /// Keeps 8-bit copies of every projection and the output layer for decoding steps (see
    /// [`Linear::forward_decoding`]): token-by-token generation then reads a quarter of the
    /// bytes. Prompts, training and forwards without a cache still use the f32 weights.
    pub fn quantize_for_decoding(&mut self) -> Result<()> {
        self.projections_mut().try_for_each(Linear::quantize)
    }

    /// Drops the 8-bit copies: every forward runs on the f32 weights.
    pub fn dequantize(&mut self) {
        self.projections_mut().for_each(Linear::dequantize);
    }

    /// Every projection of every layer, and the output layer.
    fn projections_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down])
            .chain(std::iter::once(&mut self.output))
    }

    /// Logits at the last position of each row, `[batch, vocab]`.
    /// A decoding step (after cached positions) runs on the 8-bit copies, if any.
    pub fn last_logits(&self, input_ids: &Tensor, cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> Result<Tensor> {
        let decoding = cache.as_ref().is_some_and(|c| !c.is_empty());
        let hidden = self.forward_hidden(input_ids, cache, ctx)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        if decoding {
            self.output.forward_decoding(&last)
        } else {
            self.logits(&last)
        }
    }

    /// Bytes one cached position takes (keys and values of every layer, f32): what a
    /// server's KV budget is counted in.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.config.num_key_value_heads * self.config.head_dim() * std::mem::size_of::<f32>()
    }

    /// A fresh cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }
}
