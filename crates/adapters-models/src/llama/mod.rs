//! Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2/2.5/3, Gemma 2/3, Phi-3) with
//! adapter insertion points.
//!
//! Loads a GGUF file (weights de-quantised to f32, in Hugging Face's names and layout so
//! that projection-level adapters such as PEFT LoRA line up) or a Hugging Face folder
//! (`config.json`, `model.safetensors`). Pre-norm layers: each sublayer's output passes
//! through the adapter hook before the residual add (Gemma's after its output norm).
//! `config.rs` says what each architecture changes.

use crate::attached::HoldsAdapters;
use crate::error::Error;
use crate::ops::{Linear, RmsNorm};
use crate::weights::Weights;
use adapters_core::{AdapterSet, EmbeddingIo, ForwardCtx, InsertionPoint, InterventionIo, ModelInfo, Point, PointSpec, Site, SublayerIo};
use adapters_kernels as kernels;
use candle_core::{Device, Module, Result, Tensor};
use std::sync::Arc;

mod config;
mod decoding;
mod files;
pub use config::{supported_decoders, DecoderArch, LlamaConfig};
pub use decoding::KvCache;
use decoding::LayerKv;

/// The attention's input projections: three, or one fused (Phi-3's `qkv_proj`).
#[derive(Clone)]
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The feed-forward's gate and up projections: two, or one fused (Phi-3's `gate_up_proj`,
/// gate first).
#[derive(Clone)]
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

#[derive(Clone)]
struct Layer {
    attn_norm: RmsNorm,
    qkv: Qkv,
    /// Norms of each head's queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norms: Option<(RmsNorm, RmsNorm)>,
    o: Linear,
    /// The attention output's norm before the residual add (Gemma).
    post_attn_norm: Option<RmsNorm>,
    /// The norm before the feed-forward (Gemma's `pre_feedforward_layernorm`).
    ffn_norm: RmsNorm,
    gate_up: GateUp,
    down: Linear,
    /// The feed-forward output's norm before the residual add (Gemma).
    post_ffn_norm: Option<RmsNorm>,
    /// How many positions, itself included, a query sees (sliding-window attention);
    /// `None`: its whole past.
    window: Option<usize>,
}

impl Layer {
    /// Every weight by its Hugging Face name under `p` (`model.layers.L`).
    fn named(&self, p: &str, gemma: bool) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut lin = |name: &str, l: &Linear| {
            out.push((format!("{p}.{name}.weight"), l.weight().expect("a loaded weight de-quantises")));
            if let Some(b) = &l.bias {
                out.push((format!("{p}.{name}.bias"), b.clone()));
            }
        };
        match &self.qkv {
            Qkv::Separate { q, k, v } => {
                lin("self_attn.q_proj", q);
                lin("self_attn.k_proj", k);
                lin("self_attn.v_proj", v);
            }
            Qkv::Fused(qkv) => lin("self_attn.qkv_proj", qkv),
        }
        lin("self_attn.o_proj", &self.o);
        match &self.gate_up {
            GateUp::Separate { gate, up } => {
                lin("mlp.gate_proj", gate);
                lin("mlp.up_proj", up);
            }
            GateUp::Fused(gate_up) => lin("mlp.gate_up_proj", gate_up),
        }
        lin("mlp.down_proj", &self.down);
        let ffn_norm = if gemma { "pre_feedforward_layernorm" } else { "post_attention_layernorm" };
        let mut norms = vec![("input_layernorm", &self.attn_norm), (ffn_norm, &self.ffn_norm)];
        if let Some((qn, kn)) = &self.qk_norms {
            norms.extend([("self_attn.q_norm", qn), ("self_attn.k_norm", kn)]);
        }
        if let Some(n) = &self.post_attn_norm {
            norms.push(("post_attention_layernorm", n));
        }
        if let Some(n) = &self.post_ffn_norm {
            norms.push(("post_feedforward_layernorm", n));
        }
        out.extend(norms.into_iter().map(|(name, n)| (format!("{p}.{name}.weight"), n.weight.clone())));
        out
    }

    /// Every projection.
    fn projection_list(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = match &self.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        };
        out.push(&self.o);
        match &self.gate_up {
            GateUp::Separate { gate, up } => out.extend([gate, up]),
            GateUp::Fused(gate_up) => out.push(gate_up),
        }
        out.push(&self.down);
        out
    }

    /// Number of norm scale values.
    fn norm_values(&self) -> usize {
        let norms = [Some(&self.attn_norm), Some(&self.ffn_norm), self.post_attn_norm.as_ref(), self.post_ffn_norm.as_ref()];
        let qk = self.qk_norms.as_ref().map_or(0, |(q, k)| q.weight.elem_count() + k.weight.elem_count());
        norms.iter().flatten().map(|n| n.weight.elem_count()).sum::<usize>() + qk
    }

    /// Every projection, mutably.
    fn projections_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> = match &mut self.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        };
        out.push(&mut self.o);
        match &mut self.gate_up {
            GateUp::Separate { gate, up } => out.extend([gate, up]),
            GateUp::Fused(gate_up) => out.push(gate_up),
        }
        out.push(&mut self.down);
        out
    }
}

/// Where a layer's attention finds and keeps keys and values.
enum Kv<'a> {
    /// No cache: the keys are this forward's own.
    None,
    /// One cache for the whole batch (all rows at the same position).
    Shared(&'a mut Option<LayerKv>),
    /// One cache per sequence, each at its own position: sequence `i`'s new tokens are
    /// `counts[i]` consecutive rows of the batch, one token each (one for a decoding step,
    /// more for a chunk of a prompt), appended to its cache. Each row attends over its
    /// sequence's cache up to its own position, in place (padded to the longest, with the
    /// mask hiding the padding, only where prefix tuning's keys go first).
    PerRow { caches: Vec<&'a mut Option<LayerKv>>, counts: &'a [usize] },
}

/// Each row's keys and values (its sequence's cache up to its own position) as one
/// right-padded `[rows, longest, width]` pair (where attention needs them together:
/// prefix tuning's keys go before each row's).
fn gather_padded(caches: &[&mut Option<LayerKv>], counts: &[usize]) -> Result<(Tensor, Tensor)> {
    let mut held: Vec<(Tensor, Tensor)> = Vec::new();
    for (cache, &n) in caches.iter().zip(counts) {
        let (k, v) = cache.as_ref().ok_or_else(|| candle_core::Error::Msg("an empty cache".into()))?.keys_values()?;
        let len = k.dim(1)?;
        for j in 0..n {
            let seen = len - n + j + 1;
            held.push((k.narrow(1, 0, seen)?, v.narrow(1, 0, seen)?));
        }
    }
    let longest = held.iter().map(|(k, _)| k.dim(1).unwrap_or(0)).max().unwrap_or(0);
    let pad = |t: &Tensor| -> Result<Tensor> {
        let missing = longest - t.dim(1)?;
        Tensor::cat(&[t, &Tensor::zeros((1, missing, t.dim(2)?), t.dtype(), t.device())?], 1)
    };
    let keys = held.iter().map(|(k, _)| pad(k)).collect::<Result<Vec<_>>>()?;
    let values = held.iter().map(|(_, v)| pad(v)).collect::<Result<Vec<_>>>()?;
    Ok((Tensor::cat(&keys, 0)?, Tensor::cat(&values, 0)?))
}

/// The name under which a GGUF's RoPE divisors travel with the weights.
pub(crate) const ROPE_FREQS: &str = "rope_freqs.weight";

/// A Llama-family decoder with its causal-LM head.
#[derive(Clone)]
pub struct Llama {
    /// The model's configuration (boxed: it is large and rarely read).
    pub config: Box<LlamaConfig>,
    /// The token embeddings `[vocab, hidden]`, read a row per token.
    embed: Linear,
    /// What the token embeddings are multiplied by (Gemma: √hidden, rounded to f32).
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// The output projection: `lm_head`, or the token embeddings when `tied`.
    output: Linear,
    /// Whether `output` is the token embedding matrix.
    tied: bool,
    cos: Tensor,
    sin: Tensor,
    /// RoPE tables of sliding-window layers, where they differ (Gemma 3's local base).
    local_rope: Option<(Tensor, Tensor)>,
    /// A GGUF's per-frequency RoPE divisors (`rope_freqs.weight`), which `config` does not
    /// express.
    rope_divisors: Option<Tensor>,
    /// The adapters attached to this model: an immutable snapshot, replaced on change.
    adapters: Arc<AdapterSet>,
}

impl Llama {
    /// Builds the model from tensors named as in Hugging Face's `*ForCausalLM` of its
    /// architecture.
    pub fn from_weights(config: LlamaConfig, w: &Weights) -> std::result::Result<Self, Error> {
        config.check().map_err(|e| Error::Unsupported(format!("{}: {e}", w.source().display())))?;
        // The rotary tables are built for every position up front: refuse a context length
        // no model has before allocating them (2^21 positions take 512 MB at head size 64).
        const MAX_CONTEXT: usize = 1 << 21;
        if config.max_position_embeddings == 0 || config.max_position_embeddings > MAX_CONTEXT {
            return Err(Error::Unsupported(format!(
                "{}: a context length of {} positions is outside 1..={MAX_CONTEXT}",
                w.source().display(),
                config.max_position_embeddings
            )));
        }
        let arch = config.arch();
        let (nh, nkv) = (config.num_attention_heads, config.num_kv_heads());
        let (h, i, hd) = (config.hidden_size, config.intermediate_size, config.head_dim());
        let gemma = arch.is_gemma();
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> std::result::Result<Linear, Error> {
            let b = if bias { Some(w.get(&format!("{name}.bias"), &[out])?) } else { None };
            let weight = format!("{name}.weight");
            match w.get_packed(&weight, [out, inp])? {
                Some(packed) => Ok(Linear::packed(packed, b)),
                None => Ok(Linear::loaded(w.get(&weight, &[out, inp])?, b)?),
            }
        };
        let norm = |name: &str, width: usize| -> std::result::Result<RmsNorm, Error> {
            Ok(RmsNorm::new(w.get(&format!("{name}.weight"), &[width])?, config.rms_norm_eps, gemma)?)
        };
        let qkv_bias = config.attention_bias || arch == DecoderArch::Qwen2;
        let windows = config.layer_windows();
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let qkv = if arch.is_fused() {
                    Qkv::Fused(lin(&format!("{p}.self_attn.qkv_proj"), (nh + 2 * nkv) * hd, h, qkv_bias)?)
                } else {
                    Qkv::Separate {
                        q: lin(&format!("{p}.self_attn.q_proj"), nh * hd, h, qkv_bias)?,
                        k: lin(&format!("{p}.self_attn.k_proj"), nkv * hd, h, qkv_bias)?,
                        v: lin(&format!("{p}.self_attn.v_proj"), nkv * hd, h, qkv_bias)?,
                    }
                };
                let gate_up = if arch.is_fused() {
                    GateUp::Fused(lin(&format!("{p}.mlp.gate_up_proj"), 2 * i, h, config.mlp_bias)?)
                } else {
                    GateUp::Separate {
                        gate: lin(&format!("{p}.mlp.gate_proj"), i, h, config.mlp_bias)?,
                        up: lin(&format!("{p}.mlp.up_proj"), i, h, config.mlp_bias)?,
                    }
                };
                let qk_norms = match arch.has_qk_norm() {
                    true => Some((norm(&format!("{p}.self_attn.q_norm"), hd)?, norm(&format!("{p}.self_attn.k_norm"), hd)?)),
                    false => None,
                };
                let gemma_norm = |name: &str| match gemma {
                    true => norm(&format!("{p}.{name}"), h).map(Some),
                    false => Ok(None),
                };
                Ok(Layer {
                    attn_norm: norm(&format!("{p}.input_layernorm"), h)?,
                    qkv,
                    qk_norms,
                    o: lin(&format!("{p}.self_attn.o_proj"), h, nh * hd, config.attention_bias)?,
                    post_attn_norm: gemma_norm("post_attention_layernorm")?,
                    ffn_norm: norm(&format!("{p}.{}", if gemma { "pre_feedforward_layernorm" } else { "post_attention_layernorm" }), h)?,
                    gate_up,
                    down: lin(&format!("{p}.mlp.down_proj"), h, i, config.mlp_bias)?,
                    post_ffn_norm: gemma_norm("post_feedforward_layernorm")?,
                    window: windows[l],
                })
            })
            .collect::<std::result::Result<Vec<_>, Error>>()?;
        // The embedding table keeps PyTorch's layout (rows are read), so `Linear::new`.
        let table = |name: &str| -> std::result::Result<Linear, Error> {
            match w.get_packed(name, [config.vocab_size, h])? {
                Some(packed) => Ok(Linear::packed(packed, None)),
                None => Ok(Linear::new(w.get(name, &[config.vocab_size, h])?, None)),
            }
        };
        let embed = table("model.embed_tokens.weight")?;
        let lm_head = if w.contains("lm_head.weight") && !config.tie_word_embeddings { Some(table("lm_head.weight")?) } else { None };
        let norm = norm("model.norm", h)?;
        let device = norm.weight.device().clone();
        // A GGUF's Llama 3 RoPE scaling (llama.cpp's `rope_freqs.weight`).
        let rope_divisors = match w.contains(ROPE_FREQS) {
            true => Some(w.get(ROPE_FREQS, &[hd / 2])?),
            false => None,
        };
        let divisors = rope_divisors.as_ref().map(|t| t.to_vec1::<f32>()).transpose()?;
        let ((cos, sin), local_rope) = config.rope_tables(&device, divisors.as_deref())?;
        let tied = lm_head.is_none();
        let output = lm_head.unwrap_or_else(|| embed.clone());
        // transformers: `hidden_size**0.5` as an f32 tensor.
        let embed_scale = gemma.then(|| (h as f64).sqrt() as f32 as f64);
        Ok(Llama {
            norm,
            config: Box::new(config),
            embed,
            embed_scale,
            layers,
            output,
            tied,
            cos,
            sin,
            local_rope,
            rope_divisors,
            adapters: Arc::default(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.norm.weight.device()
    }

    /// Total number of base parameters (tied embeddings counted once), counted without
    /// de-quantising packed weights.
    pub fn num_parameters(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.norm_values() + l.projection_list().iter().map(|p| p.num_parameters()).sum::<usize>()).sum();
        let head = if self.tied { 0 } else { self.output.num_parameters() };
        let divisors = self.rope_divisors.as_ref().map_or(0, Tensor::elem_count);
        layers + head + divisors + self.embed.num_parameters() + self.norm.weight.elem_count()
    }

    /// The token embeddings of `ids` (scaled, for Gemma).
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.rows(ids)?;
        match self.embed_scale {
            Some(s) => x * s,
            None => Ok(x),
        }
    }

    /// Whether the output projection is the token embedding matrix.
    pub fn ties_embeddings(&self) -> bool {
        self.tied
    }

    /// The final hidden states `[batch, seq, hidden]` (after the final norm).
    ///
    /// With a cache, `input_ids` continue the cached positions and the cache is extended.
    /// Rows are assumed unpadded or right-padded (causal attention never looks right).
    pub fn forward_hidden(&self, input_ids: &Tensor, cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (mut x, inputs) = self.embed(input_ids, past, ctx)?;
        if cache.is_some() && x.dim(0)? != input_ids.dim(0)? {
            candle_core::bail!("a `parallel(...)` setup runs without a KV cache; generate with one adapter setup at a time");
        }
        let mut cache = cache;
        for (l, layer) in self.layers.iter().enumerate() {
            let kv = match cache.as_mut() {
                Some(c) => Kv::Shared(&mut c.layers[l]),
                None => Kv::None,
            };
            x = self.layer_forward(l, layer, &x, &inputs.positions, kv, &inputs.ctx.for_layer(l))?;
        }
        self.finish(&x, inputs.virtual_tokens, &inputs.ctx)
    }

    /// The embedded tokens `[rows, seq, hidden]` at positions after `past` cached ones
    /// (rows: `batch` times the number of `parallel(...)` copies), and what every layer
    /// needs besides them.
    pub(crate) fn embed(&self, input_ids: &Tensor, past: usize, ctx: &ForwardCtx) -> Result<(Tensor, LayerInputs)> {
        // A `parallel(...)` setup runs each child on its own copy of the batch (rows
        // `i·batch .. (i+1)·batch` are child i's).
        let copies = crate::ops::parallel_copies(&self.adapters, ctx);
        let input_ids = &crate::ops::repeat_rows(input_ids, copies)?;
        let (_, t) = input_ids.dims2()?;
        let x = crate::ops::perturbed(self.embed_tokens(input_ids)?, ctx, copies)?;
        // Prompt tuning's virtual tokens come first in a sequence (not in the steps that
        // continue a cache, which holds them): positions count them, outputs leave them out.
        let (x, ctx) = if past == 0 {
            let io = EmbeddingIo { embeddings: &x, mask: ctx.attention_mask.as_ref() };
            let x = self.adapters.embeddings(Point::new(0, Site::InputEmbeddings), &io, ctx)?;
            let added = x.dim(1)? - t;
            let ctx = match (&ctx.attention_mask, added) {
                (Some(m), 1..) => ctx.masked(&EmbeddingIo::mask_with_virtual_tokens(m, added)?),
                _ => ctx.clone(),
            };
            (x, ctx)
        } else {
            (x, ctx.clone())
        };
        let virtual_tokens = x.dim(1)? - t;
        let t = t + virtual_tokens;
        if past + t > self.config.max_position_embeddings {
            candle_core::bail!("{} positions exceed the model's context of {}", past + t, self.config.max_position_embeddings);
        }
        let positions: Vec<usize> = (past..past + t).collect();
        let inputs = LayerInputs { positions: self.positions(&positions, past + t, false)?, ctx, virtual_tokens };
        Ok((x, inputs))
    }

    /// Layer `l` on the residual stream `x`, without a cache; `ctx` is
    /// `inputs.ctx.for_layer(l)` or a variant of it.
    pub(crate) fn layer(&self, l: usize, x: &Tensor, inputs: &LayerInputs, ctx: &ForwardCtx) -> Result<Tensor> {
        self.layer_forward(l, &self.layers[l], x, &inputs.positions, Kv::None, ctx)
    }

    /// After the last layer: the virtual tokens left out, the final norm, and the
    /// adapters at the LM-head input (invertible adapters' inverse).
    pub(crate) fn finish(&self, x: &Tensor, virtual_tokens: usize, ctx: &ForwardCtx) -> Result<Tensor> {
        let x = if virtual_tokens > 0 { x.narrow(1, virtual_tokens, x.dim(1)? - virtual_tokens)? } else { x.clone() };
        let x = self.norm.forward(&x)?;
        let head_input = Point::new(self.layers.len() - 1, Site::LmHeadInput);
        if !self.adapters.may_act_at(head_input, ctx) {
            return Ok(x);
        }
        let mask = match (&ctx.attention_mask, virtual_tokens) {
            (Some(m), 1..) => Some(m.narrow(1, virtual_tokens, m.dim(1)? - virtual_tokens)?),
            (m, _) => m.clone(),
        };
        let io = EmbeddingIo { embeddings: &x, mask: mask.as_ref() };
        let y = self.adapters.embeddings(head_input, &io, ctx)?;
        if y.dims() != x.dims() {
            candle_core::bail!("an adapter at {head_input} changed the final hidden states from {:?} to {:?}", x.dims(), y.dims());
        }
        Ok(y)
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The residual stream `[batch, seq, hidden]` after the first `num_layers` layers
    /// (0: the token embeddings), without the final norm: for probing and parity checks.
    pub fn residual_stream(&self, input_ids: &Tensor, num_layers: usize, ctx: &ForwardCtx) -> Result<Tensor> {
        let (mut x, inputs) = self.embed(input_ids, 0, ctx)?;
        for l in 0..num_layers.min(self.layers.len()) {
            x = self.layer(l, &x, &inputs, &inputs.ctx.for_layer(l))?;
        }
        x.narrow(1, inputs.virtual_tokens, x.dim(1)? - inputs.virtual_tokens)
    }

    /// The output projection `[vocab, hidden]` (the token embeddings when tied): an f32
    /// copy when it is packed.
    pub fn lm_head_weight(&self) -> Result<Tensor> {
        self.output.weight()
    }

    /// Mean next-token cross-entropy of `hidden` `[n, hidden]` against `targets` `[n]`,
    /// without the `[n, vocab]` logits in memory at once (on the output layer's blocks
    /// when it is packed). Soft-capped logits (Gemma 2) are not covered: use [`Llama::logits`].
    pub fn output_cross_entropy(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self.output.packed_weight() {
            Some(packed) => crate::packed::linear_cross_entropy(hidden, packed, targets),
            None => adapters_kernels::linear_cross_entropy(hidden, &self.output.weight()?, targets),
        }
    }

    /// Logits `[batch, seq, vocab]` from final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.soft_capped(self.output.forward(hidden)?)
    }

    /// Gemma 2's final soft cap on the logits, `cap · tanh(logits / cap)`, where the
    /// config sets one ([`LlamaConfig::final_logit_softcapping`]).
    pub(crate) fn soft_capped(&self, logits: Tensor) -> Result<Tensor> {
        match self.config.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// The RoPE angles and attention masks of queries at `positions` over keys `0..keys`:
    /// the causal mask and that of sliding-window layers. The queries are one row's
    /// (masks `[1, queries, keys]`; no causal mask for a single query, which sees every
    /// key) or, `per_row`, one query in each row (masks `[rows, 1, keys]`).
    pub(crate) fn positions(&self, positions: &[usize], keys: usize, per_row: bool) -> Result<Positions> {
        let device = self.device();
        let at = Tensor::from_vec(positions.iter().map(|&p| p as u32).collect::<Vec<_>>(), positions.len(), device)?;
        let angles = |(c, s): (&Tensor, &Tensor)| -> Result<(Tensor, Tensor)> { Ok((c.index_select(&at, 0)?, s.index_select(&at, 0)?)) };
        let (cos, sin) = angles((&self.cos, &self.sin))?;
        let local = self.local_rope.as_ref().map(|(c, s)| angles((c, s))).transpose()?;
        let mask = |window: Option<usize>| -> Result<Tensor> {
            let visible = |p: usize, j: usize| j <= p && window.is_none_or(|w| j + w > p);
            let values: Vec<f32> =
                positions.iter().flat_map(|&p| (0..keys).map(move |j| if visible(p, j) { 0.0 } else { f32::NEG_INFINITY })).collect();
            match per_row {
                true => Tensor::from_vec(values, (positions.len(), 1, keys), device),
                false => Tensor::from_vec(values, (1, positions.len(), keys), device),
            }
        };
        let window = self.layers.iter().find_map(|l| l.window);
        let causal = if positions.len() == 1 && !per_row { None } else { Some(mask(None)?) };
        let windowed = match window {
            Some(w) if keys > w => Some(mask(Some(w))?),
            _ => causal.clone(),
        };
        Ok(Positions { cos, sin, local, causal, windowed })
    }

    fn project(&self, lin: &Linear, point: Point, x: &Tensor, ctx: &ForwardCtx, decoding: bool) -> Result<Tensor> {
        lin.forward_with(&self.adapters, point, x, ctx, decoding)
    }

    fn layer_forward(&self, l: usize, layer: &Layer, x: &Tensor, positions: &Positions, mut kv: Kv, ctx: &ForwardCtx) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.config.num_attention_heads, self.config.num_kv_heads(), self.config.head_dim());
        // A step after cached positions: few rows, weights dominate; see Linear::forward_decoding.
        let decoding = match &kv {
            Kv::None => false,
            Kv::Shared(c) => c.is_some(),
            // Prompt chunks run on the f32 weights, as whole prompts do.
            Kv::PerRow { counts, .. } => counts.iter().all(|&n| n == 1),
        };
        let (cos, sin) = positions.angles(layer);
        let mask = positions.mask(layer);
        // One position per row, each its own: RoPE sees the rows as positions of one row.
        let rope = |t: &Tensor, heads: usize| match &kv {
            Kv::PerRow { .. } => kernels::rope(&t.reshape((1, t.dim(0)?, ()))?, cos, sin, heads)?.reshape(t.shape()),
            _ => kernels::rope(t, cos, sin, heads),
        };
        let n = layer.attn_norm.forward(x)?;
        let (q, k, mut v) = match &layer.qkv {
            Qkv::Separate { q, k, v } => (
                self.project(q, Point::new(l, Site::Query), &n, ctx, decoding)?,
                self.project(k, Point::new(l, Site::Key), &n, ctx, decoding)?,
                self.project(v, Point::new(l, Site::Value), &n, ctx, decoding)?,
            ),
            Qkv::Fused(qkv) => {
                let all = self.project(qkv, Point::new(l, Site::QueryKeyValue), &n, ctx, decoding)?;
                let d = all.rank() - 1;
                (all.narrow(d, 0, nh * hd)?, all.narrow(d, nh * hd, nkv * hd)?, all.narrow(d, (nh + nkv) * hd, nkv * hd)?)
            }
        };
        let (q, k) = match &layer.qk_norms {
            Some((qn, kn)) => (per_head(qn, &q, nh)?, per_head(kn, &k, nkv)?),
            None => (q, k),
        };
        let q = rope(&q, nh)?;
        let mut k = rope(&k, nkv)?;
        match &mut kv {
            Kv::None => {}
            Kv::Shared(kv) => match kv {
                Some(cache) => {
                    cache.append(&k, &v)?;
                    (k, v) = cache.keys_values()?;
                }
                None => **kv = Some(LayerKv::new(&k, &v)?),
            },
            Kv::PerRow { caches, counts } => {
                let mut start = 0;
                for (cache, &n) in caches.iter_mut().zip(counts.iter()) {
                    let (k, v) = (k.narrow(0, start, n)?.reshape((1, n, ()))?, v.narrow(0, start, n)?.reshape((1, n, ()))?);
                    match cache.as_mut() {
                        Some(cache) => cache.append(&k, &v)?,
                        None => **cache = Some(LayerKv::new(&k, &v)?),
                    }
                    start += n;
                }
            }
        }
        let scale = self.config.attention_scale();
        let softcap = self.config.attn_logit_softcapping;
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>| match softcap {
            Some(cap) => crate::ops::softcapped_attention(q, k, v, nh, nkv, mask, scale, cap),
            None => kernels::attention(q, k, v, nh, nkv, mask, scale),
        };
        // Prefix tuning's keys and values: before every other key, never cached.
        let prefix = self.adapters.key_value_prefix(Point::new(l, Site::KeyValuePrefix), x.dim(0)?, ctx)?;
        let attn = match (kv, prefix) {
            // Each row over its sequence's cache up to its own position (the last `window`
            // of them), in place.
            (Kv::PerRow { caches, counts }, None) if softcap.is_none() => {
                let (mut keys, mut values, mut lens) = (Vec::new(), Vec::new(), Vec::new());
                for (cache, &n) in caches.iter().zip(counts) {
                    let (k, v, len) = cache.as_ref().expect("appended above").buffers();
                    for j in 0..n {
                        let seen = len - n + j + 1;
                        let from = layer.window.map_or(0, |w| seen.saturating_sub(w));
                        let width = k.dim(1)? - from;
                        keys.push(k.narrow(1, from, width)?);
                        values.push(v.narrow(1, from, width)?);
                        lens.push(seen - from);
                    }
                }
                let (keys, values): (Vec<&Tensor>, Vec<&Tensor>) = (keys.iter().collect(), values.iter().collect());
                kernels::attention_per_row(&q, &keys, &values, &lens, nh, nkv, scale)?
            }
            (kv, prefix) => {
                let (k, v) = match kv {
                    Kv::PerRow { caches, counts } => gather_padded(&caches, counts)?,
                    _ => (k, v),
                };
                let (k, v, mask) = match prefix {
                    None => (k, v, mask.cloned()),
                    Some(p) => {
                        let mask =
                            crate::ops::mask_with_prefix(mask, p.valid.as_ref(), p.keys.dim(1)?, x.dim(0)?, k.dim(1)?, f32::NEG_INFINITY)?;
                        (Tensor::cat(&[&p.keys, &k], 1)?, Tensor::cat(&[&p.values, &v], 1)?, Some(mask))
                    }
                };
                attend(&q, &k, &v, mask.as_ref())?
            }
        };
        let attn = self.project(&layer.o, Point::new(l, Site::AttentionProj), &attn, ctx, decoding)?;
        let attn = match &layer.post_attn_norm {
            Some(norm) => norm.forward(&attn)?,
            None => attn,
        };
        let io = SublayerIo { input: x, output: &attn, post_norm: None };
        let x = (x + self.adapters.hidden(Point::new(l, Site::AttentionOutput), &io, ctx)?)?;

        let n = layer.ffn_norm.forward(&x)?;
        let (gate, up) = match &layer.gate_up {
            GateUp::Separate { gate, up } => (
                self.project(gate, Point::new(l, Site::FfnGate), &n, ctx, decoding)?,
                self.project(up, Point::new(l, Site::FfnUp), &n, ctx, decoding)?,
            ),
            GateUp::Fused(gate_up) => {
                let both = self.project(gate_up, Point::new(l, Site::FfnGateUp), &n, ctx, decoding)?;
                let (d, i) = (both.rank() - 1, self.config.intermediate_size);
                (both.narrow(d, 0, i)?, both.narrow(d, i, i)?)
            }
        };
        let down = Point::new(l, Site::FfnDown);
        let ffn = if self.config.arch().is_gemma() {
            // GeGLU with GELU's tanh form (`gelu_pytorch_tanh`).
            self.project(&layer.down, down, &(gate.gelu()? * up)?, ctx, decoding)?
        } else if let (false, None, Some(w), false) =
            (decoding, &layer.down.bias, layer.down.dense_weight(), self.adapters.may_act_at(down, ctx))
        {
            // The activation inside the down projection: it is not kept for the backward pass.
            kernels::swiglu_linear(&gate, &up, w)?
        } else {
            self.project(&layer.down, down, &kernels::swiglu(&gate, &up)?, ctx, decoding)?
        };
        let ffn = match &layer.post_ffn_norm {
            Some(norm) => norm.forward(&ffn)?,
            None => ffn,
        };
        let io = SublayerIo { input: &x, output: &ffn, post_norm: None };
        let out = (&x + self.adapters.hidden(Point::new(l, Site::FfnOutput), &io, ctx)?)?;
        // In a decoding step the site sees the new position only.
        let io = InterventionIo { hidden: &out, mask: ctx.attention_mask.as_ref() };
        self.adapters.intervention(Point::new(l, Site::LayerOutput), &io, ctx)
    }

    /// The projection at a point, for merging adapters into its weight.
    pub fn linear_mut(&mut self, point: Point) -> Option<&mut Linear> {
        let layer = self.layers.get_mut(point.layer)?;
        Some(match (point.site, &mut layer.qkv, &mut layer.gate_up) {
            (Site::Query, Qkv::Separate { q, .. }, _) => q,
            (Site::Key, Qkv::Separate { k, .. }, _) => k,
            (Site::Value, Qkv::Separate { v, .. }, _) => v,
            (Site::QueryKeyValue, Qkv::Fused(qkv), _) => qkv,
            (Site::AttentionProj, _, _) => &mut layer.o,
            (Site::FfnGate, _, GateUp::Separate { gate, .. }) => gate,
            (Site::FfnUp, _, GateUp::Separate { up, .. }) => up,
            (Site::FfnGateUp, _, GateUp::Fused(gate_up)) => gate_up,
            (Site::FfnDown, _, _) => &mut layer.down,
            _ => return None,
        })
    }
}

/// `x` `[.., heads * head_dim]` with each head's slice normed by `norm` (`[head_dim]`).
fn per_head(norm: &RmsNorm, x: &Tensor, heads: usize) -> Result<Tensor> {
    let shape = x.shape().clone();
    let mut dims = shape.dims().to_vec();
    let width = dims.pop().unwrap_or(0);
    dims.extend([heads, width / heads]);
    norm.forward(&x.reshape(dims)?)?.reshape(shape)
}

impl HoldsAdapters for Llama {
    fn snapshot_slot(&self) -> &Arc<AdapterSet> {
        &self.adapters
    }

    fn snapshot_slot_mut(&mut self) -> &mut Arc<AdapterSet> {
        &mut self.adapters
    }
}

impl InsertionPoint for Llama {
    fn model_info(&self) -> ModelInfo {
        let c = &self.config;
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let mut points = Vec::new();
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let mut add = |site, in_features, out_features, module: &str| {
                points.push(PointSpec { point: Point::new(layer, site), in_features, out_features, module: format!("{p}.{module}") })
            };
            add(Site::AttentionOutput, h, h, "self_attn");
            add(Site::FfnOutput, h, h, "mlp");
            let (q, kv) = (c.num_attention_heads * hd, c.num_kv_heads() * hd);
            if c.arch().is_fused() {
                add(Site::QueryKeyValue, h, q + 2 * kv, "self_attn.qkv_proj");
            } else {
                add(Site::Query, h, q, "self_attn.q_proj");
                add(Site::Key, h, kv, "self_attn.k_proj");
                add(Site::Value, h, kv, "self_attn.v_proj");
            }
            add(Site::AttentionProj, q, h, "self_attn.o_proj");
            if c.arch().is_fused() {
                add(Site::FfnGateUp, h, 2 * i, "mlp.gate_up_proj");
            } else {
                add(Site::FfnGate, h, i, "mlp.gate_proj");
                add(Site::FfnUp, h, i, "mlp.up_proj");
            }
            add(Site::FfnDown, i, h, "mlp.down_proj");
        }
        let kv = c.num_kv_heads() * hd;
        points.push(PointSpec {
            point: Point::new(0, Site::InputEmbeddings),
            in_features: h,
            out_features: h,
            module: "model.embed_tokens".into(),
        });
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let module = format!("{p}.self_attn.key_value_prefix");
            points.push(PointSpec { point: Point::new(layer, Site::KeyValuePrefix), in_features: h, out_features: kv, module });
            points.push(PointSpec { point: Point::new(layer, Site::LayerOutput), in_features: h, out_features: h, module: p });
        }
        let last = Point::new(c.num_hidden_layers - 1, Site::LmHeadInput);
        points.push(PointSpec { point: last, in_features: h, out_features: h, module: "lm_head".into() });
        ModelInfo { architecture: c.model_type.clone(), hidden_size: h, num_layers: c.num_hidden_layers, vocab_size: c.vocab_size, points }
    }

    fn named_weights(&self) -> Vec<(String, Tensor)> {
        self.hf_tensors().into_iter().collect()
    }
}

/// What every layer of one forward pass needs besides the residual stream.
pub(crate) struct LayerInputs {
    positions: Positions,
    /// The forward's context.
    pub(crate) ctx: ForwardCtx,
    /// Virtual tokens the input-embeddings site prepended (prompt tuning).
    pub(crate) virtual_tokens: usize,
}

/// What attention needs to know of its queries' positions (see [`Llama::positions`]).
pub(crate) struct Positions {
    cos: Tensor,
    sin: Tensor,
    /// The angles of sliding-window layers where they differ (Gemma 3's local layers).
    local: Option<(Tensor, Tensor)>,
    /// The causal mask; `None`: every key is visible.
    causal: Option<Tensor>,
    /// The mask of sliding-window layers (the causal one where no key is out of reach).
    windowed: Option<Tensor>,
}

impl Positions {
    /// The RoPE angles a layer uses.
    fn angles(&self, layer: &Layer) -> (&Tensor, &Tensor) {
        match (&self.local, layer.window) {
            (Some((c, s)), Some(_)) => (c, s),
            _ => (&self.cos, &self.sin),
        }
    }

    /// The mask a layer uses.
    fn mask(&self, layer: &Layer) -> Option<&Tensor> {
        match layer.window {
            Some(_) => self.windowed.as_ref(),
            None => self.causal.as_ref(),
        }
    }
}
