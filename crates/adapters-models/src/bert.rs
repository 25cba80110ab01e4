//! BERT-family encoders (BERT, MiniLM, RoBERTa, XLM-RoBERTa, DistilBERT) with adapter
//! insertion points.
//!
//! Loads a Hugging Face folder (`config.json`, `model.safetensors`) by the original tensor
//! names (DistilBERT's are translated to BERT's layout, which it shares). RoBERTa and
//! XLM-R count positions from `pad_token_id + 1`; DistilBERT has no token types. Post-norm layers: each sublayer's output passes through the adapter hook before
//! the residual add and the sublayer's LayerNorm, which the hook also receives.

use crate::attached::HoldsAdapters;
use crate::error::Error;
use crate::ops::{embedding, LayerNorm, Linear};
use crate::weights::Weights;
use adapters_core::{
    Activation, AdapterSet, ConditioningNeed, EmbeddingIo, ForwardCtx, InsertionPoint, InterventionIo, ModelInfo, Point, PointSpec, Site,
    SublayerIo,
};
use adapters_kernels as kernels;
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// An encoder architecture, by its Hugging Face `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderArch {
    /// BERT (and MiniLM, which is BERT's architecture).
    Bert,
    /// RoBERTa: BERT's layers, positions counted from `pad_token_id + 1`.
    Roberta,
    /// XLM-RoBERTa: RoBERTa's architecture.
    XlmRoberta,
    /// DistilBERT: BERT's layers under other names, no token types, no pooler.
    DistilBert,
}

impl EncoderArch {
    /// Every encoder architecture.
    pub const ALL: [EncoderArch; 4] = [EncoderArch::Bert, EncoderArch::Roberta, EncoderArch::XlmRoberta, EncoderArch::DistilBert];

    /// Hugging Face's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            EncoderArch::Bert => "bert",
            EncoderArch::Roberta => "roberta",
            EncoderArch::XlmRoberta => "xlm-roberta",
            EncoderArch::DistilBert => "distilbert",
        }
    }

    /// The architecture of a `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    /// The name of a weight or module in this architecture's checkpoints, from BERT's.
    fn name(self, bert: &str) -> String {
        if self != EncoderArch::DistilBert {
            return bert.to_string();
        }
        let Some(rest) = bert.strip_prefix("encoder.layer.") else { return bert.to_string() };
        let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
        // Longest BERT path first: `attention.output.dense` before `attention.output`.
        const DISTIL: [(&str, &str); 10] = [
            ("attention.self.query", "attention.q_lin"),
            ("attention.self.key_value_prefix", "attention.key_value_prefix"),
            ("attention.self.key", "attention.k_lin"),
            ("attention.self.value", "attention.v_lin"),
            ("attention.output.dense", "attention.out_lin"),
            ("attention.output.LayerNorm", "sa_layer_norm"),
            ("attention.output", "attention"),
            ("intermediate.dense", "ffn.lin1"),
            ("output.dense", "ffn.lin2"),
            ("output.LayerNorm", "output_layer_norm"),
        ];
        let mapped =
            DISTIL.iter().find_map(|(b, d)| rest.strip_prefix(b).filter(|r| r.is_empty() || r.starts_with('.')).map(|r| format!("{d}{r}")));
        let rest = match (mapped, rest) {
            (Some(m), _) => m,
            (None, "output") => "ffn".into(),
            (None, r) => r.to_string(),
        };
        if rest.is_empty() {
            format!("transformer.layer.{layer}")
        } else {
            format!("transformer.layer.{layer}.{rest}")
        }
    }

    /// The prefix a task model's checkpoint puts before the base model's names.
    fn task_prefix(self) -> &'static str {
        match self {
            EncoderArch::Bert => "bert.",
            EncoderArch::Roberta | EncoderArch::XlmRoberta => "roberta.",
            EncoderArch::DistilBert => "distilbert.",
        }
    }
}

/// The supported encoder `model_type`s, for error messages.
pub fn supported_encoders() -> String {
    EncoderArch::ALL.iter().map(|a| a.model_type()).collect::<Vec<_>>().join(", ")
}

/// The fields of a BERT-family `config.json` that the forward pass uses (DistilBERT's
/// names are read as their BERT equivalents).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[allow(missing_docs)] // the fields are Hugging Face's, with their meaning there
pub struct BertConfig {
    pub vocab_size: usize,
    #[serde(alias = "dim")]
    pub hidden_size: usize,
    #[serde(alias = "n_layers")]
    pub num_hidden_layers: usize,
    #[serde(alias = "n_heads")]
    pub num_attention_heads: usize,
    #[serde(alias = "hidden_dim")]
    pub intermediate_size: usize,
    #[serde(default = "default_act", alias = "activation")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub model_type: Option<String>,
    /// RoBERTa's positions start after this id's (`padding_idx + 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<usize>,
}

impl BertConfig {
    /// The architecture `model_type` names (BERT when it names none).
    pub fn arch(&self) -> std::result::Result<EncoderArch, String> {
        match self.model_type.as_deref() {
            None => Ok(EncoderArch::Bert),
            Some(t) => EncoderArch::from_model_type(t)
                .ok_or_else(|| format!("model_type `{t}` is not a supported encoder; supported: {}", supported_encoders())),
        }
    }

    /// The index of the first position embedding: `pad_token_id + 1` for RoBERTa and
    /// XLM-R (transformers' `create_position_ids_from_input_ids`), else 0.
    pub fn position_offset(&self) -> usize {
        match self.arch() {
            Ok(EncoderArch::Roberta | EncoderArch::XlmRoberta) => self.pad_token_id.unwrap_or(1) + 1,
            _ => 0,
        }
    }
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pos() -> String {
    "absolute".into()
}

#[derive(Clone)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    /// `None` for DistilBERT, which has no token types.
    token_type: Option<Tensor>,
    norm: LayerNorm,
}

#[derive(Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    ffn_norm: LayerNorm,
}

/// A BERT-family encoder.
#[derive(Clone)]
pub struct Bert {
    /// The model's configuration.
    pub config: BertConfig,
    activation: Activation,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// `pooler.dense`, when the checkpoint has it.
    pooler: Option<Linear>,
    /// The adapters attached to this model: an immutable snapshot, replaced on change.
    adapters: Arc<AdapterSet>,
}

impl Bert {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face folder.
    pub fn from_folder(dir: &Path, device: &Device) -> std::result::Result<Self, Error> {
        let config_path = dir.join("config.json");
        let bytes = std::fs::read(&config_path).map_err(|e| Error::file(&config_path, e))?;
        let config: BertConfig =
            serde_json::from_slice(&bytes).map_err(|e| Error::file(&config_path, format!("not a valid BERT config: {e}")))?;
        let weights = Weights::from_safetensors(&dir.join("model.safetensors"), device)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the model from tensors named as in Hugging Face's `BertModel`
    /// (with or without a `bert.` prefix).
    pub fn from_weights(config: BertConfig, w: &Weights) -> std::result::Result<Self, Error> {
        if config.position_embedding_type != "absolute" {
            return Err(Error::Unsupported(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                config.position_embedding_type
            )));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(Error::Unsupported(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        let activation = Activation::from_name(&config.hidden_act).map_err(|e| Error::Unsupported(format!("hidden_act: {e}")))?;
        let arch = config.arch().map_err(Error::Unsupported)?;
        let prefix = if w.contains(&format!("{}embeddings.word_embeddings.weight", arch.task_prefix())) { arch.task_prefix() } else { "" };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let linear = |name: &str, out: usize, inp: usize| -> std::result::Result<Linear, Error> {
            let name = arch.name(name);
            let weight = w.get(&format!("{prefix}{name}.weight"), &[out, inp])?;
            Ok(Linear::loaded(weight, Some(w.get(&format!("{prefix}{name}.bias"), &[out])?))?)
        };
        let norm = |name: &str| -> std::result::Result<LayerNorm, Error> {
            let name = arch.name(name);
            let n = |a: &str| format!("{prefix}{name}.{a}");
            Ok(LayerNorm {
                weight: w.get_any(&[n("weight"), n("gamma")], &[h])?,
                bias: w.get_any(&[n("bias"), n("beta")], &[h])?,
                eps: config.layer_norm_eps,
            })
        };
        let embeddings = Embeddings {
            word: w.get(&format!("{prefix}embeddings.word_embeddings.weight"), &[config.vocab_size, h])?,
            position: w.get(&format!("{prefix}embeddings.position_embeddings.weight"), &[config.max_position_embeddings, h])?,
            token_type: match arch {
                EncoderArch::DistilBert => None,
                _ => Some(w.get(&format!("{prefix}embeddings.token_type_embeddings.weight"), &[config.type_vocab_size, h])?),
            },
            norm: norm("embeddings.LayerNorm")?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                Ok(Layer {
                    query: linear(&format!("{p}.attention.self.query"), h, h)?,
                    key: linear(&format!("{p}.attention.self.key"), h, h)?,
                    value: linear(&format!("{p}.attention.self.value"), h, h)?,
                    attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                    attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    up: linear(&format!("{p}.intermediate.dense"), i, h)?,
                    down: linear(&format!("{p}.output.dense"), h, i)?,
                    ffn_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<std::result::Result<Vec<_>, Error>>()?;
        // BERT's pooler (`pooler_output`); sentence-embedding checkpoints may lack it.
        let pooler = if w.contains(&format!("{prefix}pooler.dense.weight")) { Some(linear("pooler.dense", h, h)?) } else { None };
        if config.position_offset() + 1 > config.max_position_embeddings {
            return Err(Error::Unsupported(format!(
                "pad_token_id {:?} leaves no position of the {} embeddings",
                config.pad_token_id, config.max_position_embeddings
            )));
        }
        Ok(Bert { config, activation, embeddings, layers, pooler, adapters: Arc::default() })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embeddings.word.device()
    }

    /// Every projection with its point (the pooler's on the last layer).
    fn linears(&self) -> Vec<(Point, &Linear)> {
        let mut out: Vec<(Point, &Linear)> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, x)| {
                [
                    (Site::Query, &x.query),
                    (Site::Key, &x.key),
                    (Site::Value, &x.value),
                    (Site::AttentionProj, &x.attn_out),
                    (Site::FfnUp, &x.up),
                    (Site::FfnDown, &x.down),
                ]
                .map(|(s, lin)| (Point::new(l, s), lin))
            })
            .collect();
        out.extend(self.pooler.as_ref().map(|p| (self.pooler_point(), p)));
        out
    }

    /// Where the pooler's projection is: the last layer.
    fn pooler_point(&self) -> Point {
        Point::new(self.config.num_hidden_layers.saturating_sub(1), Site::Pooler)
    }

    /// Whether the checkpoint has BERT's pooler.
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// Hugging Face's `pooler_output`: `tanh(W h[CLS] + b)` on the last hidden state, with
    /// the adapters at the pooler's projection; `None` if the checkpoint has no pooler.
    pub fn pooler_output(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        let Some(pooler) = &self.pooler else { return Ok(None) };
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(Some(self.project(pooler, self.pooler_point(), &cls, ctx)?.tanh()?))
    }

    /// The projection at a point, for merging adapters into its weight.
    pub fn linear_mut(&mut self, point: Point) -> Option<&mut Linear> {
        if point.site == Site::Pooler {
            return if point == self.pooler_point() { self.pooler.as_mut() } else { None };
        }
        let layer = self.layers.get_mut(point.layer)?;
        Some(match point.site {
            Site::Query => &mut layer.query,
            Site::Key => &mut layer.key,
            Site::Value => &mut layer.value,
            Site::AttentionProj => &mut layer.attn_out,
            Site::FfnUp => &mut layer.up,
            Site::FfnDown => &mut layer.down,
            _ => return None,
        })
    }

    /// Total number of (frozen) base parameters.
    pub fn num_parameters(&self) -> usize {
        self.named_weights().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// The last hidden state `[batch, seq, hidden]`.
    ///
    /// `input_ids` is `[batch, seq]` (u32); `token_type_ids` defaults to zeros;
    /// `attention_mask` (`[batch, seq]`, 1 for tokens, 0 for padding) defaults to all ones.
    /// With a `parallel(...)` setup active the result has one copy of the batch per child,
    /// child `i`'s in rows `i·batch .. (i+1)·batch`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (mut x, inputs) = self.embed(input_ids, token_type_ids, attention_mask, ctx)?;
        for l in 0..self.layers.len() {
            x = self.layer(l, &x, &inputs, &inputs.ctx.for_layer(l))?;
        }
        inputs.finish(&x)
    }

    /// The embedded tokens `[rows, seq, hidden]` (rows: `batch` times the number of
    /// `parallel(...)` copies) and what every layer needs besides them.
    pub(crate) fn embed(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, LayerInputs)> {
        // A `parallel(...)` setup runs each child on its own copy of the batch: the output
        // has `copies · batch` rows, child i's in rows `i·batch .. (i+1)·batch`.
        let copies = crate::ops::parallel_copies(&self.adapters, ctx);
        let rep = |t: &Tensor| crate::ops::repeat_rows(t, copies);
        let (input_ids, token_type_ids, attention_mask) =
            (rep(input_ids)?, token_type_ids.map(rep).transpose()?, attention_mask.map(rep).transpose()?);
        let (input_ids, token_type_ids, attention_mask) = (&input_ids, token_type_ids.as_ref(), attention_mask.as_ref());
        let (b, t) = input_ids.dims2()?;
        let (offset, max) = (self.config.position_offset(), self.config.max_position_embeddings);
        if t + offset > max {
            candle_core::bail!("input has {t} tokens, more than the model's {} positions", max - offset);
        }
        let types = match token_type_ids {
            Some(ids) => ids.clone(),
            None => Tensor::zeros((b, t), DType::U32, input_ids.device())?,
        };
        let e = &self.embeddings;
        let token_words = crate::ops::perturbed(embedding(&e.word, input_ids)?, ctx, copies)?;
        // Prompt tuning's virtual tokens come first: they get positions (and token type 0)
        // like any token, every row attends to them, and the outputs leave them out.
        let io = EmbeddingIo { embeddings: &token_words, mask: attention_mask };
        let words = self.adapters.embeddings(Point::new(0, Site::InputEmbeddings), &io, ctx)?;
        let virtual_tokens = words.dim(1)? - t;
        let t = t + virtual_tokens;
        if t + offset > max {
            candle_core::bail!("input has {t} positions with {virtual_tokens} virtual tokens, more than the model's {}", max - offset);
        }
        let words = match &e.token_type {
            Some(table) => words.add(&embedding(table, &types.pad_with_zeros(1, virtual_tokens, 0)?)?)?,
            None => words,
        };
        let positions = e.position.narrow(0, offset, t)?.unsqueeze(0)?;
        let x = e.norm.forward(&words.broadcast_add(&positions)?)?;
        let attention_mask = attention_mask.map(|m| EmbeddingIo::mask_with_virtual_tokens(m, virtual_tokens)).transpose()?;
        let mut inputs = match &attention_mask {
            Some(m) => LayerInputs {
                // [b, 1, t]: 0 where attended, a large negative value on padding.
                mask: Some(((m.to_dtype(DType::F32)?.ones_like()? - m.to_dtype(DType::F32)?)? * f32::MIN as f64)?.reshape((b, 1, t))?),
                ctx: ctx.masked(m),
                virtual_tokens,
            },
            None => LayerInputs { mask: None, ctx: ctx.clone(), virtual_tokens },
        };
        if inputs.ctx.conditioning.is_none() && self.adapters.needs_conditioning(ConditioningNeed::MeanTokenEmbedding) {
            let means = match io.mask {
                Some(m) => crate::heads::mean_pool(&token_words, m)?,
                None => token_words.mean(1)?,
            };
            inputs.ctx = inputs.ctx.with_conditioning(means);
        }
        Ok((x, inputs))
    }

    /// Layer `l` on the residual stream `x`; `ctx` is `inputs.ctx.for_layer(l)` or a
    /// variant of it.
    pub(crate) fn layer(&self, l: usize, x: &Tensor, inputs: &LayerInputs, ctx: &ForwardCtx) -> Result<Tensor> {
        self.layer_forward(l, &self.layers[l], x, inputs.mask.as_ref(), ctx)
    }

    /// Runs the layers' frozen projections in 8 bits for inference ([`Linear::use_int8`]);
    /// adapters, embeddings and norms stay f32.
    pub fn use_int8(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for linear in [&mut layer.query, &mut layer.key, &mut layer.value, &mut layer.attn_out, &mut layer.up, &mut layer.down] {
                linear.use_int8()?;
            }
        }
        Ok(())
    }

    /// Keeps every layer's projections as 8-bit blocks (Q8_0) instead of f32
    /// ([`crate::BaseWeights::Q8_0`]); embeddings, norms and the pooler stay f32.
    pub fn pack_q8_0(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for linear in [&mut layer.query, &mut layer.key, &mut layer.value, &mut layer.attn_out, &mut layer.up, &mut layer.down] {
                linear.pack_q8_0()?;
            }
        }
        Ok(())
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn project(&self, lin: &Linear, point: Point, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        lin.forward_with(&self.adapters, point, x, ctx, false)
    }

    fn layer_forward(&self, l: usize, layer: &Layer, x: &Tensor, mask: Option<&Tensor>, ctx: &ForwardCtx) -> Result<Tensor> {
        let (_, _, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let q = self.project(&layer.query, Point::new(l, Site::Query), x, ctx)?;
        let k = self.project(&layer.key, Point::new(l, Site::Key), x, ctx)?;
        let v = self.project(&layer.value, Point::new(l, Site::Value), x, ctx)?;
        let (k, v, mask) = match self.adapters.key_value_prefix(Point::new(l, Site::KeyValuePrefix), x.dim(0)?, ctx)? {
            None => (k, v, mask.cloned()),
            Some(prefix) => {
                let rows = x.dim(0)?;
                let mask = crate::ops::mask_with_prefix(mask, prefix.valid.as_ref(), prefix.keys.dim(1)?, rows, k.dim(1)?, f32::MIN)?;
                (Tensor::cat(&[&prefix.keys, &k], 1)?, Tensor::cat(&[&prefix.values, &v], 1)?, Some(mask))
            }
        };
        let attn = kernels::attention(&q, &k, &v, heads, heads, mask.as_ref(), 1.0 / ((h / heads) as f64).sqrt())?;
        let attn = self.project(&layer.attn_out, Point::new(l, Site::AttentionProj), &attn, ctx)?;

        let x = self.adapted_add_norm(Point::new(l, Site::AttentionOutput), x, &attn, &layer.attn_norm, ctx)?;

        let up = self.project(&layer.up, Point::new(l, Site::FfnUp), &x, ctx)?;
        let down = Point::new(l, Site::FfnDown);
        let ffn = match (self.activation, &layer.down.bias) {
            // GELU inside the down projection: its output is not kept for the backward pass.
            (Activation::Gelu, Some(_)) if !self.adapters.may_act_at(down, ctx) => layer.down.gelu_forward(&up)?,
            _ => self.project(&layer.down, down, &self.activation.apply(&up)?, ctx)?,
        };
        let out = self.adapted_add_norm(Point::new(l, Site::FfnOutput), &x, &ffn, &layer.ffn_norm, ctx)?;
        let io = InterventionIo { hidden: &out, mask: ctx.attention_mask.as_ref() };
        self.adapters.intervention(Point::new(l, Site::LayerOutput), &io, ctx)
    }

    /// The post-norm residual step `norm(output + input)` with the adapters at the hidden
    /// site `point` applied to `output` first; one fused pass where the set can make it.
    fn adapted_add_norm(&self, point: Point, input: &Tensor, output: &Tensor, norm: &LayerNorm, ctx: &ForwardCtx) -> Result<Tensor> {
        let add_norm = |y: &Tensor, x: &Tensor| norm.forward_add(y, x);
        let io = SublayerIo { input, output, post_norm: Some(&add_norm) };
        if let Some(y) = self.adapters.hidden_add_layer_norm(point, &io, (&norm.weight, &norm.bias, norm.eps), ctx)? {
            return Ok(y);
        }
        norm.forward_add(&self.adapters.hidden(point, &io, ctx)?, input)
    }
}

/// What every layer of one forward pass needs besides the residual stream.
pub(crate) struct LayerInputs {
    /// `[rows, 1, seq]` additive attention bias, `None` without padding.
    mask: Option<Tensor>,
    /// The forward's context, with the attention mask set.
    pub(crate) ctx: ForwardCtx,
    /// Virtual tokens the input-embeddings site prepended (prompt tuning).
    virtual_tokens: usize,
}

impl LayerInputs {
    /// The last layer's output as callers see it: without the virtual tokens.
    pub(crate) fn finish(&self, x: &Tensor) -> Result<Tensor> {
        match self.virtual_tokens {
            0 => Ok(x.clone()),
            n => x.narrow(1, n, x.dim(1)? - n),
        }
    }
}

impl HoldsAdapters for Bert {
    fn snapshot_slot(&self) -> &Arc<AdapterSet> {
        &self.adapters
    }

    fn snapshot_slot_mut(&mut self) -> &mut Arc<AdapterSet> {
        &mut self.adapters
    }
}

impl InsertionPoint for Bert {
    fn model_info(&self) -> ModelInfo {
        let (h, i) = (self.config.hidden_size, self.config.intermediate_size);
        let arch = self.config.arch().unwrap_or(EncoderArch::Bert);
        let mut points = Vec::new();
        for layer in 0..self.config.num_hidden_layers {
            let p = format!("encoder.layer.{layer}");
            let mut add = |site, in_features, out_features, module: &str| {
                let module = arch.name(&format!("{p}.{module}"));
                points.push(PointSpec { point: Point::new(layer, site), in_features, out_features, module })
            };
            add(Site::AttentionOutput, h, h, "attention.output");
            add(Site::FfnOutput, h, h, "output");
            add(Site::Query, h, h, "attention.self.query");
            add(Site::Key, h, h, "attention.self.key");
            add(Site::Value, h, h, "attention.self.value");
            add(Site::AttentionProj, h, h, "attention.output.dense");
            add(Site::FfnUp, h, i, "intermediate.dense");
            add(Site::FfnDown, i, h, "output.dense");
        }
        if self.pooler.is_some() {
            points.push(PointSpec { point: self.pooler_point(), in_features: h, out_features: h, module: "pooler.dense".into() });
        }
        let spec = |point, module: String| PointSpec { point, in_features: h, out_features: h, module: arch.name(&module) };
        points.push(spec(Point::new(0, Site::InputEmbeddings), "embeddings.word_embeddings".into()));
        for layer in 0..self.config.num_hidden_layers {
            let p = format!("encoder.layer.{layer}");
            points.push(spec(Point::new(layer, Site::KeyValuePrefix), format!("{p}.attention.self.key_value_prefix")));
            points.push(spec(Point::new(layer, Site::LayerOutput), p));
        }
        ModelInfo {
            architecture: arch.model_type().into(),
            hidden_size: h,
            num_layers: self.config.num_hidden_layers,
            vocab_size: self.config.vocab_size,
            points,
        }
    }

    /// All weights but the pooler's: adapters saved before the pooler was loaded were
    /// fingerprinted without it, and no adapter reads it unless placed on it.
    fn fingerprint_weights(&self) -> Vec<(String, Tensor)> {
        self.named_weights().into_iter().filter(|(name, _)| !name.starts_with("pooler.")).collect()
    }

    fn named_weights(&self) -> Vec<(String, Tensor)> {
        let e = &self.embeddings;
        let arch = self.config.arch().unwrap_or(EncoderArch::Bert);
        let mut out = vec![
            ("embeddings.word_embeddings.weight".to_string(), e.word.clone()),
            ("embeddings.position_embeddings.weight".to_string(), e.position.clone()),
        ];
        out.extend(e.token_type.iter().map(|t| ("embeddings.token_type_embeddings.weight".to_string(), t.clone())));
        let mut norm = |name: String, n: &LayerNorm| {
            let name = arch.name(&name);
            out.push((format!("{name}.weight"), n.weight.clone()));
            out.push((format!("{name}.bias"), n.bias.clone()));
        };
        norm("embeddings.LayerNorm".into(), &e.norm);
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{l}");
            norm(format!("{p}.attention.output.LayerNorm"), &layer.attn_norm);
            norm(format!("{p}.output.LayerNorm"), &layer.ffn_norm);
        }
        let info = self.model_info();
        for (point, lin) in self.linears() {
            let module = info.spec(point).map(|s| s.module.clone()).unwrap_or_default();
            out.push((format!("{module}.weight"), lin.weight().expect("a loaded weight de-quantises")));
            if let Some(b) = &lin.bias {
                out.push((format!("{module}.bias"), b.clone()));
            }
        }
        out
    }
}
