//! Trained classification heads on disk. A head lives in a `heads/TASK/` folder inside
//! whatever it was trained on top of: the top adapter's folder (adapters mode), the run
//! folder (head-only mode) or the fine-tuned model folder (full mode).
//! `head_config.json` holds the task, labels, pooling and shape; `head.safetensors` the
//! weights. [`load_all`] also reads the heads AdapterHub and PEFT keep in their adapter
//! folders (see [`crate::head_interop`]).

use crate::error::{Error, Result};
use crate::heads::{ClassificationHead, HeadShape, Pooling};
use adapters_core::io::{read_json, read_tensors, save_tensors_atomic, write_atomic};
use adapters_core::Activation;
use candle_core::{Device, Tensor};
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
    /// Linear layers in all (see [`HeadShape`]); 1 unless written.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub layers: usize,
    /// The activation after each hidden layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// Whether the output layer has a bias; true unless written.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub bias: bool,
}

fn one() -> usize {
    1
}
fn is_one(n: &usize) -> bool {
    *n == 1
}
fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

impl HeadConfig {
    /// The layers it describes.
    pub fn shape(&self) -> HeadShape {
        HeadShape { layers: self.layers, activation: self.activation, bias: self.bias }
    }

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
    let tensors: HashMap<String, Tensor> = head.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let json = serde_json::to_string_pretty(config).map_err(|e| Error::Invalid(format!("head config of `{}`: {e}", config.task)))?;
    let folder = dir.join(HEADS_DIR).join(&config.task);
    adapters_core::durable::replace_dir(&folder, "head", |tmp| -> std::io::Result<()> {
        save_tensors_atomic(&tensors, &tmp.join(HEAD_WEIGHTS)).map_err(std::io::Error::other)?;
        write_atomic(&tmp.join(HEAD_CONFIG), json.as_bytes()).map_err(std::io::Error::other)?;
        Ok(())
    })
    .map_err(|e| Error::file(&folder, e))
}

/// Every head kept in the adapter or model folder `dir`, sorted by task: ours under
/// `dir/heads/`, then AdapterHub's (`head_config.json` beside the adapter) and PEFT's (a
/// `SEQ_CLS` adapter's saved classifier), checked against `model`.
pub fn load_all(dir: &Path, model: &crate::Backbone) -> Result<Vec<SavedHead>> {
    let mut heads = Vec::new();
    let root = dir.join(HEADS_DIR);
    if root.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&root)
            .map_err(|e| Error::file(&root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for d in entries {
            heads.push(load(&d, model.device())?);
        }
    }
    heads.extend(crate::head_interop::read_adapterhub(dir, model)?);
    heads.extend(crate::head_interop::read_peft(dir, model)?);
    Ok(heads)
}

/// One head folder; checks the weights against the config.
pub fn load(dir: &Path, device: &Device) -> Result<SavedHead> {
    let config_path = dir.join(HEAD_CONFIG);
    let config: HeadConfig =
        serde_json::from_value(read_json(&config_path)?).map_err(|e| Error::file(&config_path, format!("not a head config: {e}")))?;
    if config.labels.is_empty() || config.hidden_size == 0 || config.layers == 0 {
        return Err(Error::file(&config_path, "a classification head needs at least one label, a hidden size and a layer; train it again"));
    }
    let weights_path = dir.join(HEAD_WEIGHTS);
    let tensors = read_tensors(&weights_path, device)?;
    let head = ClassificationHead::from_tensors(tensors, &config.shape(), config.hidden_size, config.labels.len())
        .map_err(|e| Error::file(&weights_path, e))?;
    Ok(SavedHead { config, head, dir: dir.to_path_buf() })
}
