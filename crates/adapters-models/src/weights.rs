//! Named tensors read from a model file, with errors that name the file and the tensor.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tensors by their original names, as read from one or more files.
pub struct Weights {
    source: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn new(source: PathBuf, tensors: HashMap<String, Tensor>) -> Self {
        Weights { source, tensors }
    }

    /// Reads a safetensors file, or every shard listed in a `*.safetensors.index.json`.
    /// Half-precision tensors are widened to f32.
    pub fn from_safetensors(path: &Path, device: &Device) -> Result<Self> {
        let files: Vec<PathBuf> = if path.extension().is_some_and(|e| e == "json") {
            let index: serde_json::Value = serde_json::from_slice(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
            let map = index["weight_map"]
                .as_object()
                .with_context(|| format!("{} has no `weight_map` object", path.display()))?;
            let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            let dir = path.parent().unwrap_or(Path::new("."));
            shards.iter().map(|s| dir.join(s)).collect()
        } else {
            vec![path.to_path_buf()]
        };
        let mut tensors = HashMap::new();
        for file in &files {
            let loaded = candle_core::safetensors::load(file, device).with_context(|| {
                format!("{} is not a readable safetensors file (truncated or corrupt?)", file.display())
            })?;
            for (name, t) in loaded {
                let t = if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? };
                tensors.insert(name, t);
            }
        }
        Ok(Weights { source: path.to_path_buf(), tensors })
    }

    /// The file the tensors came from (for error messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked against the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.tensors.get(name) {
            None => bail!("{}: tensor `{name}` is missing", self.source.display()),
            Some(t) if t.dims() != shape => bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?} from the model config",
                self.source.display(),
                t.dims(),
                shape
            ),
            Some(t) => Ok(t.clone()),
        }
    }

    /// The first of several alternative names that exists (e.g. `LayerNorm.weight`/`gamma`).
    pub fn get_any(&self, names: &[String], shape: &[usize]) -> Result<Tensor> {
        match names.iter().find(|n| self.contains(n)) {
            Some(n) => self.get(n, shape),
            None => bail!("{}: none of the tensors {names:?} is present", self.source.display()),
        }
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<_> = self.tensors.keys().map(String::as_str).collect();
        names.sort();
        names
    }
}
