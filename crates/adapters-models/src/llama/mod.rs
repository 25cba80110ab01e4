//! Llama-family decoder (Llama, SmolLM2, ...) with adapter insertion points.
//!
//! Loads a GGUF file (weights de-quantised to f32, q/k rows restored to Hugging Face's
//! layout so that projection-level adapters such as PEFT LoRA line up) or a Hugging Face
//! folder (`config.json`, `model.safetensors`). Pre-norm layers: each sublayer's output
//! passes through the adapter hook before the residual add.

use crate::attached::HoldsAdapters;
use crate::error::Error;
use crate::ops::{embedding, Linear, RmsNorm};
use crate::weights::Weights;
use adapters_core::{AdapterSet, EmbeddingIo, ForwardCtx, InsertionPoint, InterventionIo, ModelInfo, Point, PointSpec, Site, SublayerIo};
use adapters_kernels as kernels;
use candle_core::{DType, Device, Module, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

mod decoding;
mod files;
pub use decoding::KvCache;
use decoding::LayerKv;

/// The fields of a Llama `config.json` that the forward pass uses.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[allow(missing_docs)] // the fields are Hugging Face's, with their meaning there
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
}

fn default_theta() -> f64 {
    10000.0
}
fn default_model_type() -> String {
    "llama".into()
}

impl LlamaConfig {
    /// Checks the numbers the model's shapes come from (names the first one at fault).
    pub fn check(&self) -> std::result::Result<(), String> {
        let (nh, nkv) = (self.num_attention_heads, self.num_key_value_heads);
        if nh == 0 || nkv == 0 || nh % nkv != 0 {
            return Err(format!("num_attention_heads {nh} is not a positive multiple of num_key_value_heads {nkv}"));
        }
        if self.hidden_size == 0 || self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!("hidden size {} and head size {} do not make rotary heads", self.hidden_size, self.head_dim()));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

#[derive(Clone)]
struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
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

/// A Llama-family decoder with its causal-LM head.
#[derive(Clone)]
pub struct Llama {
    /// The model's configuration.
    pub config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// The output projection: `lm_head`, or the token embeddings when `tied`.
    output: Linear,
    /// Whether `output` is the token embedding matrix.
    tied: bool,
    cos: Tensor,
    sin: Tensor,
    /// The adapters attached to this model: an immutable snapshot, replaced on change.
    adapters: Arc<AdapterSet>,
}

impl Llama {
    /// Builds the model from tensors named as in Hugging Face's `LlamaForCausalLM`.
    pub fn from_weights(config: LlamaConfig, w: &Weights) -> std::result::Result<Self, Error> {
        let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
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
        let (h, i, hd) = (config.hidden_size, config.intermediate_size, config.head_dim());
        let lin = |name: &str, out: usize, inp: usize| -> std::result::Result<Linear, Error> {
            Ok(Linear::loaded(w.get(name, &[out, inp])?, None)?)
        };
        let norm =
            |name: &str| -> std::result::Result<RmsNorm, Error> { Ok(RmsNorm { weight: w.get(name, &[h])?, eps: config.rms_norm_eps }) };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(Layer {
                    attn_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                    q: lin(&format!("{p}.self_attn.q_proj.weight"), nh * hd, h)?,
                    k: lin(&format!("{p}.self_attn.k_proj.weight"), nkv * hd, h)?,
                    v: lin(&format!("{p}.self_attn.v_proj.weight"), nkv * hd, h)?,
                    o: lin(&format!("{p}.self_attn.o_proj.weight"), h, nh * hd)?,
                    ffn_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                    gate: lin(&format!("{p}.mlp.gate_proj.weight"), i, h)?,
                    up: lin(&format!("{p}.mlp.up_proj.weight"), i, h)?,
                    down: lin(&format!("{p}.mlp.down_proj.weight"), h, i)?,
                })
            })
            .collect::<std::result::Result<Vec<_>, Error>>()?;
        let embed = w.get("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let lm_head = if w.contains("lm_head.weight") && !config.tie_word_embeddings {
            Some(w.get("lm_head.weight", &[config.vocab_size, h])?)
        } else {
            None
        };
        let device = embed.device().clone();
        let (cos, sin) = rope_tables(hd, config.rope_theta, config.max_position_embeddings, &device)?;
        let tied = lm_head.is_none();
        let output = Linear::new(lm_head.unwrap_or_else(|| embed.clone()), None);
        Ok(Llama { norm: norm("model.norm.weight")?, config, embed, layers, output, tied, cos, sin, adapters: Arc::default() })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Total number of base parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let lin = |l: &Linear| l.weight.elem_count();
        self.embed.elem_count()
            + self.norm.weight.elem_count()
            + if self.tied { 0 } else { self.output.weight.elem_count() }
            + self
                .layers
                .iter()
                .map(|l| {
                    lin(&l.q)
                        + lin(&l.k)
                        + lin(&l.v)
                        + lin(&l.o)
                        + lin(&l.gate)
                        + lin(&l.up)
                        + lin(&l.down)
                        + l.attn_norm.weight.elem_count()
                        + l.ffn_norm.weight.elem_count()
                })
                .sum::<usize>()
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
            x = self.layer_forward(l, layer, &x, (&inputs.cos, &inputs.sin), inputs.mask.as_ref(), kv, &inputs.ctx.for_layer(l))?;
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
        let x = crate::ops::perturbed(embedding(&self.embed, input_ids)?, ctx, copies)?;
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
        let inputs = LayerInputs {
            cos: self.cos.narrow(0, past, t)?,
            sin: self.sin.narrow(0, past, t)?,
            mask: if t > 1 { Some(causal_mask(t, past, x.device())?) } else { None },
            ctx,
            virtual_tokens,
        };
        Ok((x, inputs))
    }

    /// Layer `l` on the residual stream `x`, without a cache; `ctx` is
    /// `inputs.ctx.for_layer(l)` or a variant of it.
    pub(crate) fn layer(&self, l: usize, x: &Tensor, inputs: &LayerInputs, ctx: &ForwardCtx) -> Result<Tensor> {
        self.layer_forward(l, &self.layers[l], x, (&inputs.cos, &inputs.sin), inputs.mask.as_ref(), Kv::None, ctx)
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

    /// The output projection `[vocab, hidden]` (the token embeddings when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.output.weight
    }

    /// Logits `[batch, seq, vocab]` from final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.output.forward(hidden)
    }

    fn project(&self, lin: &Linear, point: Point, x: &Tensor, ctx: &ForwardCtx, decoding: bool) -> Result<Tensor> {
        lin.forward_with(&self.adapters, point, x, ctx, decoding)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: usize,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        mut kv: Kv,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim());
        // A step after cached positions: few rows, weights dominate; see Linear::forward_decoding.
        let decoding = match &kv {
            Kv::None => false,
            Kv::Shared(c) => c.is_some(),
            // Prompt chunks run on the f32 weights, as whole prompts do.
            Kv::PerRow { counts, .. } => counts.iter().all(|&n| n == 1),
        };
        // One position per row, each its own: RoPE sees the rows as positions of one row.
        let rope = |t: &Tensor, heads: usize| match &kv {
            Kv::PerRow { .. } => kernels::rope(&t.reshape((1, t.dim(0)?, ()))?, cos, sin, heads)?.reshape(t.shape()),
            _ => kernels::rope(t, cos, sin, heads),
        };
        let n = layer.attn_norm.forward(x)?;
        let q = rope(&self.project(&layer.q, Point::new(l, Site::Query), &n, ctx, decoding)?, nh)?;
        let mut k = rope(&self.project(&layer.k, Point::new(l, Site::Key), &n, ctx, decoding)?, nkv)?;
        let mut v = self.project(&layer.v, Point::new(l, Site::Value), &n, ctx, decoding)?;
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
        let scale = 1.0 / (hd as f64).sqrt();
        // Prefix tuning's keys and values: before every other key, never cached.
        let prefix = self.adapters.key_value_prefix(Point::new(l, Site::KeyValuePrefix), x.dim(0)?, ctx)?;
        let attn = match (kv, prefix) {
            // Each row over its sequence's cache up to its own position, in place.
            (Kv::PerRow { caches, counts }, None) => {
                let (mut keys, mut values, mut lens) = (Vec::new(), Vec::new(), Vec::new());
                for (cache, &n) in caches.iter().zip(counts) {
                    let (k, v, len) = cache.as_ref().expect("appended above").buffers();
                    for j in 0..n {
                        keys.push(k);
                        values.push(v);
                        lens.push(len - n + j + 1);
                    }
                }
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
                kernels::attention(&q, &k, &v, nh, nkv, mask.as_ref(), scale)?
            }
        };
        let attn = self.project(&layer.o, Point::new(l, Site::AttentionProj), &attn, ctx, decoding)?;
        let io = SublayerIo { input: x, output: &attn, post_norm: None };
        let x = (x + self.adapters.hidden(Point::new(l, Site::AttentionOutput), &io, ctx)?)?;

        let n = layer.ffn_norm.forward(&x)?;
        let gate = self.project(&layer.gate, Point::new(l, Site::FfnGate), &n, ctx, decoding)?;
        let up = self.project(&layer.up, Point::new(l, Site::FfnUp), &n, ctx, decoding)?;
        let down = Point::new(l, Site::FfnDown);
        let ffn = if !decoding && layer.down.bias.is_none() && !self.adapters.may_act_at(down, ctx) {
            // The activation inside the down projection: it is not kept for the backward pass.
            kernels::swiglu_linear(&gate, &up, &layer.down.weight)?
        } else {
            self.project(&layer.down, down, &kernels::swiglu(&gate, &up)?, ctx, decoding)?
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
        Some(match point.site {
            Site::Query => &mut layer.q,
            Site::Key => &mut layer.k,
            Site::Value => &mut layer.v,
            Site::AttentionProj => &mut layer.o,
            Site::FfnGate => &mut layer.gate,
            Site::FfnUp => &mut layer.up,
            Site::FfnDown => &mut layer.down,
            _ => return None,
        })
    }
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
            add(Site::Query, h, c.num_attention_heads * hd, "self_attn.q_proj");
            add(Site::Key, h, c.num_key_value_heads * hd, "self_attn.k_proj");
            add(Site::Value, h, c.num_key_value_heads * hd, "self_attn.v_proj");
            add(Site::AttentionProj, c.num_attention_heads * hd, h, "self_attn.o_proj");
            add(Site::FfnGate, h, i, "mlp.gate_proj");
            add(Site::FfnUp, h, i, "mlp.up_proj");
            add(Site::FfnDown, i, h, "mlp.down_proj");
        }
        let kv = c.num_key_value_heads * hd;
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
        ModelInfo { architecture: "llama".into(), hidden_size: h, num_layers: c.num_hidden_layers, vocab_size: c.vocab_size, points }
    }

    fn named_weights(&self) -> Vec<(String, Tensor)> {
        self.hf_tensors().into_iter().collect()
    }
}

/// cos and sin tables `[max_pos, head_dim/2]` for half-split RoPE.
fn rope_tables(head_dim: usize, theta: f64, max_pos: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32).collect();
    let inv = Tensor::from_vec(inv, (1, head_dim / 2), device)?;
    let pos = Tensor::arange(0u32, max_pos as u32, device)?.to_dtype(DType::F32)?.reshape((max_pos, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// `[1, t, past + t]`: 0 where position i may attend to j, -inf to the right of i.
fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (1, t, past + t), device)
}
/// What every layer of one forward pass needs besides the residual stream.
pub(crate) struct LayerInputs {
    cos: Tensor,
    sin: Tensor,
    /// The causal mask, `None` for a single position.
    mask: Option<Tensor>,
    /// The forward's context.
    pub(crate) ctx: ForwardCtx,
    /// Virtual tokens the input-embeddings site prepended (prompt tuning).
    pub(crate) virtual_tokens: usize,
}
