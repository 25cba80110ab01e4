//! Reading and writing a Llama's files: GGUF (weights de-quantised to f32, q/k rows
//! restored to Hugging Face's layout) and Hugging Face folders.

use super::{DecoderArch, Llama, LlamaConfig};
use crate::error::Error;
use crate::packed::PackedWeight;
use crate::weights::Weights;
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{Device, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The decoder a GGUF `general.architecture` names. llama.cpp converts Mistral to `llama`
/// (without its sliding window, which llama.cpp does not apply to that architecture).
fn gguf_arch(name: &str) -> Option<DecoderArch> {
    Some(match name {
        "llama" => DecoderArch::Llama,
        "qwen2" => DecoderArch::Qwen2,
        "qwen3" => DecoderArch::Qwen3,
        "gemma2" => DecoderArch::Gemma2,
        "gemma3" => DecoderArch::Gemma3,
        "phi3" => DecoderArch::Phi3,
        _ => return None,
    })
}

/// The GGUF architectures [`Llama::from_gguf`] reads, for error messages.
pub const GGUF_ARCHITECTURES: &str = "llama, qwen2, qwen3, gemma2, gemma3, phi3";

impl LlamaConfig {
    /// Reads the architecture from GGUF metadata (`{arch}.*` keys, as llama.cpp writes and
    /// reads them). Errors name the missing key; the caller adds the file.
    pub fn from_gguf(ct: &gguf_file::Content) -> std::result::Result<Self, String> {
        let name = ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let arch =
            gguf_arch(&name).ok_or_else(|| format!("GGUF architecture `{name}` is not supported (supported: {GGUF_ARCHITECTURES})"))?;
        let u = |k: &str| -> std::result::Result<usize, String> {
            let key = format!("{name}.{k}");
            let v = ct.metadata.get(&key).ok_or_else(|| format!("GGUF metadata has no `{key}`"))?;
            Ok(v.to_u32().map_err(|e| format!("GGUF metadata `{key}`: {e}"))? as usize)
        };
        let f = |k: &str| ct.metadata.get(&format!("{name}.{k}")).and_then(|v| v.to_f32().ok()).map(|v| v as f64);
        let heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let vocab = match ct.metadata.get(&format!("{name}.vocab_size")) {
            Some(_) => u("vocab_size")?,
            None => ct.metadata.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map_or(0, |t| t.len()),
        };
        let head_dim = u("attention.key_length").or_else(|_| u("rope.dimension_count")).ok();
        let window = u("attention.sliding_window").ok();
        let gemma = arch.is_gemma();
        Ok(LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(u("attention.head_count_kv").unwrap_or(heads)),
            head_dim,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10000.0),
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            bos_token_id: ct.metadata.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()),
            eos_token_id: ct.metadata.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()).map(Into::into),
            model_type: arch.model_type().into(),
            attention_bias: false,
            mlp_bias: false,
            // llama.cpp writes a linear factor only (Gemma 3's global layers).
            rope_scaling: f("rope.scaling.factor")
                .filter(|&x| x != 1.0)
                .map(|factor| serde_json::json!({"rope_type": "linear", "factor": factor})),
            sliding_window: window,
            use_sliding_window: None,
            max_window_layers: None,
            layer_types: None,
            hidden_act: None,
            hidden_activation: None,
            query_pre_attn_scalar: if gemma { gemma_query_scalar(arch, u("block_count")?, hidden, heads, head_dim) } else { None },
            attn_logit_softcapping: f("attn_logit_softcapping"),
            final_logit_softcapping: f("final_logit_softcapping"),
            rope_local_base_freq: None,
            sliding_window_pattern: None,
            partial_rotary_factor: None,
        })
    }
}

/// Gemma's `query_pre_attn_scalar` as llama.cpp derives it (no GGUF key holds it): the
/// head size, but hidden / heads for the 27B models (46 layers for Gemma 2, 62 for Gemma 3).
fn gemma_query_scalar(arch: DecoderArch, layers: usize, hidden: usize, heads: usize, head_dim: Option<usize>) -> Option<f64> {
    let is_27b = matches!((arch, layers), (DecoderArch::Gemma2, 46) | (DecoderArch::Gemma3, 62));
    if is_27b {
        Some((hidden / heads.max(1)) as f64)
    } else {
        Some(head_dim.unwrap_or(hidden / heads.max(1)) as f64)
    }
}

/// Maps a GGUF tensor name to the Hugging Face name of the architecture.
fn hf_name(gguf: &str, arch: DecoderArch) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let (module, param) = name.rsplit_once('.')?;
    let hf = match (module, arch) {
        ("attn_norm", _) => "input_layernorm",
        ("ffn_norm", DecoderArch::Gemma2 | DecoderArch::Gemma3) => "pre_feedforward_layernorm",
        ("ffn_norm", _) => "post_attention_layernorm",
        ("post_attention_norm", _) => "post_attention_layernorm",
        ("post_ffw_norm", _) => "post_feedforward_layernorm",
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_qkv", _) => "self_attn.qkv_proj",
        ("attn_q_norm", _) => "self_attn.q_norm",
        ("attn_k_norm", _) => "self_attn.k_norm",
        ("attn_output", _) => "self_attn.o_proj",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", DecoderArch::Phi3) => "mlp.gate_up_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// The row order that undoes llama.cpp's q/k permutation of a `[rows, ..]` weight: row
/// `(h, j, i)` of Hugging Face's layout (head, half, index) is the file's row `(h, i, j)`.
fn unpermuted_rows(rows: usize, heads: usize) -> Vec<usize> {
    let half = rows / heads / 2;
    (0..rows)
        .map(|r| {
            let (h, rest) = (r / (2 * half), r % (2 * half));
            let (j, i) = (rest / half, rest % half);
            h * 2 * half + i * 2 + j
        })
        .collect()
}

/// Undoes llama.cpp's q/k row permutation (interleaved RoPE pairs back to half-split).
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, out / heads / 2, 2, inp))?.transpose(1, 2)?.reshape((out, inp))
}

impl Llama {
    /// Loads a GGUF file: config and weights (de-quantised to f32, Hugging Face names).
    ///
    /// De-quantisation runs on the CPU whatever `device` is, so the f32 weights (and the
    /// base-model fingerprint over them) are the same on every device.
    pub fn from_gguf(path: &Path, device: &Device) -> std::result::Result<(Self, gguf_file::Content), Error> {
        Self::from_gguf_with(path, device, false)
    }

    /// [`Llama::from_gguf`], keeping the quantized weight matrices (projections, token
    /// embeddings, output layer) in their blocks when `packed` (QLoRA-style: see
    /// [`crate::packed`]); norms and f32/f16 tensors are read as f32 either way. CPU only.
    pub fn from_gguf_with(path: &Path, device: &Device, packed: bool) -> std::result::Result<(Self, gguf_file::Content), Error> {
        if packed && !device.is_cpu() {
            return Err(Error::Unsupported(format!("{}: packed base weights run on the CPU; drop `base_weights` there", path.display())));
        }
        let mut file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| Error::file(path, format!("not a readable GGUF file: {e}")))?;
        let config = LlamaConfig::from_gguf(&ct).and_then(|c| c.check().map(|()| c)).map_err(|e| Error::file(path, e))?;
        let arch = config.arch();
        // candle multiplies the dimensions unchecked (an overflow panics or wraps to a
        // small size) and reads an empty tensor through a misaligned pointer: refuse
        // shapes whose element count is zero or does not fit.
        let file_len = file.metadata().map_err(|e| Error::file(path, e))?.len();
        for (name, info) in &ct.tensor_infos {
            let (block, size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
            let bytes = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .filter(|&n| n > 0)
                .and_then(|n| (n / block).checked_mul(size));
            if bytes.is_none_or(|b| b as u64 > file_len) {
                return Err(Error::file(path, format!("tensor `{name}` has the impossible shape {:?} for this file", info.shape.dims())));
            }
        }
        let (mut tensors, mut kept) = (HashMap::new(), HashMap::new());
        for name in ct.tensor_infos.keys() {
            let hf = if name == super::ROPE_FREQS { Some(name.clone()) } else { hf_name(name, arch) };
            let Some(hf) = hf else { continue };
            let read = |e: candle_core::Error| Error::file(path, format!("tensor `{name}` cannot be read: {e}"));
            let q = ct.tensor(&mut file, name, &Device::Cpu).map_err(read)?;
            let quantized = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            let matrix = hf.starts_with("model.layers.") && hf.ends_with("_proj.weight")
                || hf == "model.embed_tokens.weight"
                || hf == "lm_head.weight";
            if packed && quantized && matrix {
                let p = PackedWeight::new(std::sync::Arc::new(q)).map_err(read)?;
                let p = match (name.rsplit('.').nth(1), arch) {
                    (Some("attn_q"), DecoderArch::Llama) => p.rows_reordered(&unpermuted_rows(p.dims().0, config.num_attention_heads))?,
                    (Some("attn_k"), DecoderArch::Llama) => p.rows_reordered(&unpermuted_rows(p.dims().0, config.num_kv_heads()))?,
                    _ => p,
                };
                kept.insert(hf, p);
                continue;
            }
            let t = q.dequantize(&Device::Cpu).and_then(|t| t.to_device(device)).map_err(read)?;
            // llama.cpp permutes Llama's q/k rows (interleaved RoPE pairs) and stores Gemma's
            // norms as `1 + w`; the other architectures' tensors are Hugging Face's.
            let t = match (name.rsplit('.').nth(1), arch) {
                (Some("attn_q"), DecoderArch::Llama) if name.ends_with(".weight") => unpermute(&t, config.num_attention_heads)?,
                (Some("attn_k"), DecoderArch::Llama) if name.ends_with(".weight") => unpermute(&t, config.num_kv_heads())?,
                (Some(module), a) if a.is_gemma() && module.ends_with("norm") => (t - 1.0)?,
                _ => t,
            };
            tensors.insert(hf, t);
        }
        let model = Self::from_weights(config, &Weights::new(path.to_path_buf(), tensors).with_packed(kept))?;
        Ok((model, ct))
    }

    /// Loads `config.json` and `model.safetensors` (or a sharded index) from a folder.
    pub fn from_folder(dir: &Path, device: &Device) -> std::result::Result<Self, Error> {
        let config_path = dir.join("config.json");
        let bytes = std::fs::read(&config_path).map_err(|e| Error::file(&config_path, e))?;
        let config: LlamaConfig =
            serde_json::from_slice(&bytes).map_err(|e| Error::file(&config_path, format!("not a valid Llama config: {e}")))?;
        let index = dir.join("model.safetensors.index.json");
        let file = if index.exists() { index } else { dir.join("model.safetensors") };
        Self::from_weights(config, &Weights::from_safetensors(&file, device)?)
    }

    /// Every weight by its Hugging Face name.
    pub(super) fn hf_tensors(&self) -> HashMap<String, Tensor> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        tensors.insert("model.embed_tokens.weight".into(), self.embed.weight().expect("a loaded weight de-quantises"));
        tensors.insert("model.norm.weight".into(), self.norm.weight.clone());
        if !self.tied {
            tensors.insert("lm_head.weight".into(), self.output.weight().expect("a loaded weight de-quantises"));
        }
        if let Some(d) = &self.rope_divisors {
            tensors.insert(super::ROPE_FREQS.into(), d.clone());
        }
        let gemma = self.config.arch().is_gemma();
        for (l, layer) in self.layers.iter().enumerate() {
            tensors.extend(layer.named(&format!("model.layers.{l}"), gemma));
        }
        tensors
    }

    /// Writes this model as a Hugging Face folder (`config.json`, `model.safetensors`).
    pub fn save_hf_weights(&self, dir: &Path) -> std::result::Result<(), Error> {
        if self.rope_divisors.is_some() {
            return Err(Error::Unsupported(format!(
                "{}: this GGUF model scales RoPE by llama.cpp's `{}` tensor, which a Hugging Face config.json cannot express; keep the GGUF file",
                dir.display(),
                super::ROPE_FREQS
            )));
        }
        let tensors = self.hf_tensors();
        let mut config = self.config.clone();
        config.tie_word_embeddings = self.tied;
        // Weights first: a folder with a config.json is one whose weights are complete.
        adapters_core::io::save_tensors_atomic(&tensors, &dir.join("model.safetensors"))?;
        let json = serde_json::to_string_pretty(&config).expect("configs serialise");
        adapters_core::io::write_atomic(&dir.join("config.json"), json.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::{Content, Value, VersionedMagic};

    fn content(arch: &str) -> Content {
        let metadata = [("general.architecture", Value::String(arch.into()))].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: HashMap::new(), tensor_data_offset: 0 }
    }

    /// Another architecture is refused with the list; a known one names its missing keys
    /// under its own prefix (llama.cpp's `{arch}.*`).
    #[test]
    fn gguf_architectures_are_read_by_their_own_keys_or_refused_with_the_list() {
        let err = LlamaConfig::from_gguf(&content("falcon")).unwrap_err();
        assert!(err.contains("`falcon`") && err.contains(GGUF_ARCHITECTURES), "{err}");
        let err = LlamaConfig::from_gguf(&content("qwen3")).unwrap_err();
        assert!(err.contains("qwen3.attention.head_count"), "{err}");
    }

    /// Moving whole rows undoes the permutation as the f32 reshape does.
    #[test]
    fn unpermuted_rows_match_the_reshape() -> candle_core::Result<()> {
        let w = Tensor::arange(0f32, 24.0 * 3.0, &Device::Cpu)?.reshape((24, 3))?;
        let moved = w.index_select(&Tensor::new(unpermuted_rows(24, 3).iter().map(|&r| r as u32).collect::<Vec<_>>(), &Device::Cpu)?, 0)?;
        assert_eq!(moved.to_vec2::<f32>()?, unpermute(&w, 3)?.to_vec2::<f32>()?);
        Ok(())
    }

    /// Gemma's query scale follows llama.cpp: the head size, hidden / heads for 27B models.
    #[test]
    fn gemma_query_scalar_follows_llama_cpp() {
        assert_eq!(gemma_query_scalar(DecoderArch::Gemma2, 26, 2304, 8, Some(256)), Some(256.0));
        assert_eq!(gemma_query_scalar(DecoderArch::Gemma2, 46, 4608, 32, Some(128)), Some(144.0));
        assert_eq!(gemma_query_scalar(DecoderArch::Gemma3, 62, 5376, 32, Some(128)), Some(168.0));
    }
}
