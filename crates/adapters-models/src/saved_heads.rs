//! Trained classification heads on disk. A head lives in a `heads/TASK/` folder inside
//! whatever it was trained on top of: the top adapter's folder (adapters mode), the run
//! folder (head-only mode) or the fine-tuned model folder (full mode).
//! `head_config.json` holds the task, labels and pooling; `head.safetensors` the weights.

use crate::error::{Error, Result};
use crate::heads::{ClassificationHead, Pooling};
use adapters_core::io::{read_json, read_tensors, save_tensors_atomic, write_atomic};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The folder (inside an adapter or run folder) that holds heads, one per task.
pub const HEADS_DIR: &str = "heads";
/// A head's configuration file.
pub const HEAD_CONFIG: &str = "head_config.json";
/// A head's weights file.
pub const HEAD_WEIGHTS: &str = "head.safetensors";

/// What a saved head needs to predict: labels, pooling, the adapter stack.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// The task it was trained for.
    pub task: String,
    /// Always `classification` for now.
    #[serde(rename = "type")]
    pub kind: String,
    /// Label names by index.
    pub labels: Vec<String>,
    /// How it pools hidden states.
    pub pooling: Pooling,
    /// The width it expects.
    pub hidden_size: usize,
    /// The adapters the head was trained on top of, in stack order.
    pub adapters: Vec<String>,
    /// Data labels it was trained on under another name (`label_map` of its tasks), so
    /// that data in either naming can be scored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_map: BTreeMap<String, String>,
}

impl HeadConfig {
    /// The index of a data label, read through `label_map`.
    pub fn label_index(&self, label: &str) -> Option<usize> {
        let label = self.label_map.get(label).map_or(label, String::as_str);
        self.labels.iter().position(|l| l == label)
    }
}

/// A head read back from disk.
pub struct SavedHead {
    /// Its configuration.
    pub config: HeadConfig,
    /// Its weights.
    pub head: ClassificationHead,
    /// Where it was read from.
    pub dir: PathBuf,
}

/// Writes `dir/heads/TASK/` (weights and config) as one folder, replaced whole.
pub fn save(dir: &Path, config: &HeadConfig, head: &ClassificationHead) -> Result<()> {
    let tensors: HashMap<String, Tensor> =
        [("weight".to_string(), head.weight.as_tensor().clone()), ("bias".to_string(), head.bias.as_tensor().clone())].into();
    let json = serde_json::to_string_pretty(config).map_err(|e| Error::Invalid(format!("head config of `{}`: {e}", config.task)))?;
    let folder = dir.join(HEADS_DIR).join(&config.task);
    adapters_core::durable::replace_dir(&folder, "head", |tmp| -> std::io::Result<()> {
        save_tensors_atomic(&tensors, &tmp.join(HEAD_WEIGHTS)).map_err(std::io::Error::other)?;
        write_atomic(&tmp.join(HEAD_CONFIG), json.as_bytes()).map_err(std::io::Error::other)?;
        Ok(())
    })
    .map_err(|e| Error::file(&folder, e))
}

/// Every head under `dir/heads/`, sorted by task.
pub fn load_all(dir: &Path, device: &Device) -> Result<Vec<SavedHead>> {
    let root = dir.join(HEADS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut heads = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| Error::file(&root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for d in entries {
        heads.push(load(&d, device)?);
    }
    Ok(heads)
}

/// One head folder; checks the weights against the config.
pub fn load(dir: &Path, device: &Device) -> Result<SavedHead> {
    let config_path = dir.join(HEAD_CONFIG);
    let config: HeadConfig =
        serde_json::from_value(read_json(&config_path)?).map_err(|e| Error::file(&config_path, format!("not a head config: {e}")))?;
    if config.labels.is_empty() || config.hidden_size == 0 {
        return Err(Error::file(&config_path, "a classification head needs at least one label and a hidden size; train it again"));
    }
    let weights_path = dir.join(HEAD_WEIGHTS);
    let mut t = read_tensors(&weights_path, device)?;
    let (n, h) = (config.labels.len(), config.hidden_size);
    let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let x = t.remove(name).ok_or_else(|| Error::file(&weights_path, format!("tensor `{name}` is missing")))?;
        if x.dims() != shape {
            return Err(Error::file(&weights_path, format!("tensor `{name}` has shape {:?}, the head config needs {shape:?}", x.dims())));
        }
        Ok(x)
    };
    let head = ClassificationHead { weight: Var::from_tensor(&take("weight", &[n, h])?)?, bias: Var::from_tensor(&take("bias", &[n])?)? };
    Ok(SavedHead { config, head, dir: dir.to_path_buf() })
}
