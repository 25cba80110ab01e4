//! Loading a model by path: a Hugging Face folder (BERT or Llama) or a GGUF file (Llama),
//! with its tokenizer.

use crate::bert::Bert;
use crate::llama::Llama;
use crate::tokenizer::TextTokenizer;
use adapters_core::{AdapterSet, InsertionPoint, ModelInfo};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// A backbone of either family.
pub enum Backbone {
    Bert(Bert),
    Llama(Llama),
}

impl Backbone {
    pub fn adapters(&self) -> &AdapterSet {
        match self {
            Backbone::Bert(m) => &m.adapters,
            Backbone::Llama(m) => &m.adapters,
        }
    }

    pub fn adapters_mut(&mut self) -> &mut AdapterSet {
        match self {
            Backbone::Bert(m) => &mut m.adapters,
            Backbone::Llama(m) => &mut m.adapters,
        }
    }

    pub fn num_parameters(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.num_parameters(),
            Backbone::Llama(m) => m.num_parameters(),
        }
    }

    /// The projection at a point, for merging adapters into its weight.
    pub fn linear_mut(&mut self, point: adapters_core::Point) -> Option<&mut crate::ops::Linear> {
        match self {
            Backbone::Bert(m) => m.linear_mut(point),
            Backbone::Llama(m) => m.linear_mut(point),
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Backbone::Bert(m) => m.device(),
            Backbone::Llama(m) => m.device(),
        }
    }
}

impl InsertionPoint for Backbone {
    fn model_info(&self) -> ModelInfo {
        match self {
            Backbone::Bert(m) => m.model_info(),
            Backbone::Llama(m) => m.model_info(),
        }
    }

    fn named_weights(&self) -> Vec<(String, candle_core::Tensor)> {
        match self {
            Backbone::Bert(m) => m.named_weights(),
            Backbone::Llama(m) => m.named_weights(),
        }
    }
}

/// A backbone with its tokenizer and where it came from.
pub struct LoadedModel {
    pub backbone: Backbone,
    pub tokenizer: TextTokenizer,
    pub source: PathBuf,
}

const EXPECTED: &str = "expected a Hugging Face model folder (config.json, model.safetensors, tokenizer.json) or a .gguf file";

/// Loads the model at `path` (see [`EXPECTED`] forms).
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    if !path.exists() {
        bail!("{} does not exist; {EXPECTED}. Run `cargo xtask fetch` to get the project's models", path.display());
    }
    if path.is_file() {
        let mut magic = [0u8; 4];
        use std::io::Read;
        std::fs::File::open(path)?.read_exact(&mut magic).ok();
        if &magic != b"GGUF" {
            bail!("{} is a file but not a GGUF file (no GGUF magic); {EXPECTED}", path.display());
        }
        let (model, ct) = Llama::from_gguf(path, device)?;
        let tokenizer = TextTokenizer::from_gguf(&ct).with_context(|| format!("reading the tokenizer in {}", path.display()))?;
        return Ok(LoadedModel { backbone: Backbone::Llama(model), tokenizer, source: path.to_path_buf() });
    }
    let config_path = path.join("config.json");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&config_path).with_context(|| format!("{} has no config.json; {EXPECTED}", path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let model_type = config["model_type"].as_str().unwrap_or_default();
    if !path.join("tokenizer.json").exists() {
        bail!("{} has no tokenizer.json; {EXPECTED}", path.display());
    }
    let tokenizer = TextTokenizer::from_folder(path)?;
    let backbone = match model_type {
        "bert" => Backbone::Bert(Bert::from_folder(path, device)?),
        "llama" => Backbone::Llama(Llama::from_folder(path, device)?),
        other => bail!(
            "{}: model_type `{other}` is not supported; supported: bert (BERT-family encoders), llama (Llama-family decoders)",
            config_path.display()
        ),
    };
    Ok(LoadedModel { backbone, tokenizer, source: path.to_path_buf() })
}
