//! The decoder architectures one forward pass covers (Llama, Mistral, Qwen2, Qwen3,
//! Gemma 2, Gemma 3, Phi-3): their `config.json` fields and what each changes.
//!
//! Every field that changes the arithmetic is either computed as transformers 4.57
//! computes it or refused by name (`LlamaConfig::check`): a config read and silently
//! computed differently would survive every test of our own.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// A decoder architecture, by its Hugging Face `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecoderArch {
    /// Llama 1-3 (SmolLM2, Llama-3.2 with its `llama3` RoPE scaling).
    Llama,
    /// Mistral: sliding-window attention.
    Mistral,
    /// Qwen2 / Qwen2.5: biases on the query, key and value projections.
    Qwen2,
    /// Qwen3: RMS norms on each head's queries and keys.
    Qwen3,
    /// Gemma 2: GeGLU, `(1 + w)` norms around both sublayers, scaled embeddings, soft-capped
    /// attention and logits, local and global attention alternating.
    Gemma2,
    /// Gemma 3 (text): Gemma 2's layout with query/key norms, five local layers to one
    /// global, and a RoPE base of its own for the local ones.
    Gemma3,
    /// Phi-3: fused `qkv_proj` and `gate_up_proj` projections.
    Phi3,
}

impl DecoderArch {
    /// Every architecture, in the order the README's table lists them.
    pub const ALL: [DecoderArch; 7] = [
        DecoderArch::Llama,
        DecoderArch::Mistral,
        DecoderArch::Qwen2,
        DecoderArch::Qwen3,
        DecoderArch::Gemma2,
        DecoderArch::Gemma3,
        DecoderArch::Phi3,
    ];

    /// The architecture of a Hugging Face `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    /// Hugging Face's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            DecoderArch::Llama => "llama",
            DecoderArch::Mistral => "mistral",
            DecoderArch::Qwen2 => "qwen2",
            DecoderArch::Qwen3 => "qwen3",
            DecoderArch::Gemma2 => "gemma2",
            DecoderArch::Gemma3 => "gemma3_text",
            DecoderArch::Phi3 => "phi3",
        }
    }

    /// Whether norms scale by `1 + w`, the embeddings by √hidden, both sublayers are
    /// normed on the way out too, and the feed-forward gate is GELU (tanh).
    pub fn is_gemma(self) -> bool {
        matches!(self, DecoderArch::Gemma2 | DecoderArch::Gemma3)
    }

    /// Whether each head's queries and keys pass an RMS norm before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, DecoderArch::Qwen3 | DecoderArch::Gemma3)
    }

    /// Whether q/k/v and gate/up are one projection each (Phi-3).
    pub fn is_fused(self) -> bool {
        self == DecoderArch::Phi3
    }
}

/// The fields of a decoder's `config.json` that the forward pass uses.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[allow(missing_docs)] // the fields are Hugging Face's, with their meaning there
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
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
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Biases on q/k/v/o (Llama, Qwen3; Qwen2 has q/k/v biases whatever this says).
    #[serde(default, skip_serializing_if = "is_false")]
    pub attention_bias: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

fn is_false(b: &bool) -> bool {
    !b
}
fn default_theta() -> f64 {
    10000.0
}
fn default_model_type() -> String {
    "llama".into()
}

impl LlamaConfig {
    /// The architecture `model_type` names (checked by [`Self::check`]).
    pub fn arch(&self) -> DecoderArch {
        DecoderArch::from_model_type(&self.model_type).unwrap_or(DecoderArch::Llama)
    }

    /// Checks the numbers the model's shapes come from and refuses, by name, every field
    /// whose value this forward would compute differently from transformers.
    pub fn check(&self) -> std::result::Result<(), String> {
        if DecoderArch::from_model_type(&self.model_type).is_none() {
            return Err(format!("model_type `{}` is not a supported decoder; supported: {}", self.model_type, supported_decoders()));
        }
        let (nh, nkv) = (self.num_attention_heads, self.num_kv_heads());
        if nh == 0 || nkv == 0 || nh % nkv != 0 {
            return Err(format!("num_attention_heads {nh} is not a positive multiple of num_key_value_heads {nkv}"));
        }
        if self.hidden_size == 0 || self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!("hidden size {} and head size {} do not make rotary heads", self.hidden_size, self.head_dim()));
        }
        let act = self.activation();
        let want = if self.arch().is_gemma() { "gelu_pytorch_tanh" } else { "silu" };
        if act != want {
            return Err(format!("activation `{act}` is not supported for {} (only `{want}`)", self.model_type));
        }
        if let Some(f) = self.partial_rotary_factor.filter(|&f| f != 1.0) {
            return Err(format!("partial_rotary_factor {f} is not supported (only 1.0: RoPE over the whole head)"));
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window 0 leaves no key to attend to".into());
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(format!("layer_types lists {} layers for num_hidden_layers {}", types.len(), self.num_hidden_layers));
            }
            if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention")) {
                return Err(format!("layer_types entry `{t}` is not supported (only full_attention, sliding_attention)"));
            }
        }
        self.rope_scaling_kind()?;
        Ok(())
    }

    /// Number of key/value heads (all heads when the config leaves it out).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The feed-forward gate's activation.
    pub fn activation(&self) -> &str {
        let default = if self.arch().is_gemma() { "gelu_pytorch_tanh" } else { "silu" };
        self.hidden_activation.as_deref().or(self.hidden_act.as_deref()).unwrap_or(default)
    }

    /// The tokens that end a generation (Llama 3's configs list several).
    pub fn eos_tokens(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Array(ids)) => ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            Some(v) => v.as_u64().map(|v| v as u32).into_iter().collect(),
            None => Vec::new(),
        }
    }

    /// Each layer's attention window (`None`: the whole causal past), as transformers
    /// derives it: `layer_types` where the config has them, else each architecture's rule.
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        let n = self.num_hidden_layers;
        let sliding: Vec<bool> = match (&self.layer_types, self.arch()) {
            (Some(types), _) => types.iter().map(|t| t == "sliding_attention").collect(),
            (None, DecoderArch::Mistral | DecoderArch::Phi3) => vec![true; n],
            (None, DecoderArch::Qwen2 | DecoderArch::Qwen3) => {
                let from = self.max_window_layers.unwrap_or(n);
                (0..n).map(|l| self.use_sliding_window == Some(true) && l >= from).collect()
            }
            (None, DecoderArch::Gemma2) => (0..n).map(|l| (l + 1) % 2 != 0).collect(),
            (None, DecoderArch::Gemma3) => {
                let pattern = self.sliding_window_pattern.unwrap_or(6);
                (0..n).map(|l| (l + 1) % pattern != 0).collect()
            }
            (None, DecoderArch::Llama) => vec![false; n],
        };
        // Qwen's configs carry a window they do not use unless `use_sliding_window`.
        let window = match self.arch() {
            DecoderArch::Qwen2 | DecoderArch::Qwen3 if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window,
        };
        sliding.into_iter().map(|s| if s { window } else { None }).collect()
    }

    /// The attention scale: `query_pre_attn_scalar^-1/2` (Gemma), else `head_dim^-1/2`.
    pub fn attention_scale(&self) -> f64 {
        match (self.arch().is_gemma(), self.query_pre_attn_scalar) {
            (true, Some(s)) => 1.0 / s.sqrt(),
            _ => 1.0 / (self.head_dim() as f64).sqrt(),
        }
    }

    fn rope_scaling_kind(&self) -> std::result::Result<RopeScaling, String> {
        let Some(s) = &self.rope_scaling else { return Ok(RopeScaling::None) };
        let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
        let num = |k: &str| s.get(k).and_then(|v| v.as_f64()).ok_or_else(|| format!("rope_scaling of type `{kind}` has no number `{k}`"));
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low: num("low_freq_factor")?,
                high: num("high_freq_factor")?,
                original: num("original_max_position_embeddings")?,
            }),
            other => Err(format!("rope_scaling type `{other}` is not supported (supported: default, linear, llama3)")),
        }
    }

    /// cos and sin tables `[max_pos, head_dim/2]` for half-split RoPE: the global ones
    /// (with the config's scaling) and, for Gemma 3's local layers, those of
    /// `rope_local_base_freq` (unscaled).
    ///
    /// `divisors` are llama.cpp's `rope_freqs.weight` (a GGUF's form of Llama 3's scaling):
    /// each global frequency is divided by its entry.
    pub(crate) fn rope_tables(&self, device: &Device, divisors: Option<&[f32]>) -> Result<(Angles, Option<Angles>)> {
        let scaling = self.rope_scaling_kind().map_err(candle_core::Error::Msg)?;
        let mut inv = inverse_frequencies(self.head_dim(), self.rope_theta, scaling);
        if let Some(d) = divisors {
            if d.len() != inv.len() {
                candle_core::bail!("rope_freqs holds {} divisors for {} frequencies", d.len(), inv.len());
            }
            inv.iter_mut().zip(d).for_each(|(f, d)| *f /= d);
        }
        let global = angle_tables(inv, self.max_position_embeddings, device)?;
        let local = match (self.arch(), self.rope_local_base_freq) {
            (DecoderArch::Gemma3, base) => Some(angle_tables(
                inverse_frequencies(self.head_dim(), base.unwrap_or(10000.0), RopeScaling::None),
                self.max_position_embeddings,
                device,
            )?),
            _ => None,
        };
        Ok((global, local))
    }
}

/// cos and sin tables of RoPE, `[positions, head_dim / 2]` each.
pub(crate) type Angles = (Tensor, Tensor);

/// The supported decoder `model_type`s, for error messages.
pub fn supported_decoders() -> String {
    DecoderArch::ALL.iter().map(|a| a.model_type()).collect::<Vec<_>>().join(", ")
}

/// How RoPE frequencies are rescaled for a longer context (transformers' `rope_type`).
#[derive(Clone, Copy, Debug)]
enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (Gemma 3's global layers).
    Linear {
        factor: f64,
    },
    /// Llama 3.1+: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low: f64,
        high: f64,
        original: f64,
    },
}

/// The inverse frequencies of RoPE, as transformers computes them (in f32 where it does).
fn inverse_frequencies(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    // transformers: 1.0 / (base ** (arange(0, dim, 2, dtype=int64).float() / dim)), in f32.
    let base: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
    match scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low, high, original } => {
            let (low_wavelen, high_wavelen) = ((original / low) as f32, (original / high) as f32);
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor as f32
                    } else {
                        let smooth = (original as f32 / wavelen - low as f32) / (high as f32 - low as f32);
                        (1.0 - smooth) * f / factor as f32 + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// cos and sin `[max_pos, frequencies]` of every position's angles.
fn angle_tables(inv: Vec<f32>, max_pos: usize, device: &Device) -> Result<Angles> {
    let n = inv.len();
    let inv = Tensor::from_vec(inv, (1, n), device)?;
    let pos = Tensor::arange(0u32, max_pos as u32, device)?.to_dtype(DType::F32)?.reshape((max_pos, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}
