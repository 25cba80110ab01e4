//! Reading and writing a Llama's files: GGUF (weights de-quantised to f32, q/k rows
//! restored to Hugging Face's layout) and Hugging Face folders.

use super::{Llama, LlamaConfig};
use crate::error::Error;
use crate::weights::Weights;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

impl LlamaConfig {
    /// Reads the architecture from GGUF metadata (`llama.*` keys).
    /// Errors name the missing key; the caller adds the file.
    pub fn from_gguf(ct: &gguf_file::Content) -> std::result::Result<Self, String> {
        let arch = ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if arch != "llama" {
            return Err(format!("GGUF architecture `{arch}` is not supported (only `llama`)"));
        }
        let u = |k: &str| -> std::result::Result<usize, String> {
            let v = ct.metadata.get(k).ok_or_else(|| format!("GGUF metadata has no `{k}`"))?;
            Ok(v.to_u32().map_err(|e| format!("GGUF metadata `{k}`: {e}"))? as usize)
        };
        let f = |k: &str| ct.metadata.get(k).and_then(|v| v.to_f32().ok()).map(|v| v as f64);
        let heads = u("llama.attention.head_count")?;
        let hidden = u("llama.embedding_length")?;
        let vocab = match ct.metadata.get("llama.vocab_size") {
            Some(_) => u("llama.vocab_size")?,
            None => ct.metadata.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map_or(0, |t| t.len()),
        };
        Ok(LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("llama.feed_forward_length")?,
            num_hidden_layers: u("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: u("llama.attention.head_count_kv").unwrap_or(heads),
            head_dim: u("llama.rope.dimension_count").ok(),
            rms_norm_eps: f("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("llama.rope.freq_base").unwrap_or(10000.0),
            max_position_embeddings: u("llama.context_length").unwrap_or(4096),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            bos_token_id: ct.metadata.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()),
            eos_token_id: ct.metadata.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()),
            model_type: "llama".into(),
        })
    }
}

/// Maps a GGUF tensor name to the Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
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
    let hf = match name {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
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
        let mut file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| Error::file(path, format!("not a readable GGUF file: {e}")))?;
        let config = LlamaConfig::from_gguf(&ct).and_then(|c| c.check().map(|()| c)).map_err(|e| Error::file(path, e))?;
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
        let mut tensors = HashMap::new();
        for name in ct.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else { continue };
            let t = ct
                .tensor(&mut file, name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.to_device(device))
                .map_err(|e| Error::file(path, format!("tensor `{name}` cannot be read: {e}")))?;
            let t = match name.rsplit('.').nth(1) {
                Some("attn_q") => unpermute(&t, config.num_attention_heads)?,
                Some("attn_k") => unpermute(&t, config.num_key_value_heads)?,
                _ => t,
            };
            tensors.insert(hf, t);
        }
        let model = Self::from_weights(config, &Weights::new(path.to_path_buf(), tensors))?;
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
        tensors.insert("model.embed_tokens.weight".into(), self.embed.clone());
        tensors.insert("model.norm.weight".into(), self.norm.weight.clone());
        if !self.tied {
            tensors.insert("lm_head.weight".into(), self.output.weight.clone());
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, t) in [
                ("input_layernorm.weight", &layer.attn_norm.weight),
                ("post_attention_layernorm.weight", &layer.ffn_norm.weight),
                ("self_attn.q_proj.weight", &layer.q.weight),
                ("self_attn.k_proj.weight", &layer.k.weight),
                ("self_attn.v_proj.weight", &layer.v.weight),
                ("self_attn.o_proj.weight", &layer.o.weight),
                ("mlp.gate_proj.weight", &layer.gate.weight),
                ("mlp.up_proj.weight", &layer.up.weight),
                ("mlp.down_proj.weight", &layer.down.weight),
            ] {
                tensors.insert(format!("{p}.{name}"), t.clone());
            }
        }
        tensors
    }

    /// Writes this model as a Hugging Face folder (`config.json`, `model.safetensors`).
    pub fn save_hf_weights(&self, dir: &Path) -> std::result::Result<(), Error> {
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
