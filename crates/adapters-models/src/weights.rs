//! Named tensors read from a model file, with errors that name the file and the tensor.

use crate::error::{Error, Result};
use crate::packed::PackedWeight;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tensors by their original names, as read from one or more files.
pub struct Weights {
    source: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// Projection weights kept in the file's quantized blocks (see [`crate::packed`]).
    packed: HashMap<String, PackedWeight>,
}

impl Weights {
    /// Tensors already in memory; `source` names them in error messages.
    pub fn new(source: PathBuf, tensors: HashMap<String, Tensor>) -> Self {
        Weights { source, tensors, packed: HashMap::new() }
    }

    /// Adds weights kept in quantized blocks, found by [`Weights::get_packed`].
    pub fn with_packed(mut self, packed: HashMap<String, PackedWeight>) -> Self {
        self.packed = packed;
        self
    }

    /// The packed weight `name`, if it is kept packed, checked against `[out, in]`.
    pub fn get_packed(&self, name: &str, shape: [usize; 2]) -> Result<Option<PackedWeight>> {
        match self.packed.get(name) {
            None => Ok(None),
            Some(p) if p.dims() != (shape[0], shape[1]) => Err(Error::file(
                &self.source,
                format!("tensor `{name}` has shape {:?}, expected {shape:?} from the model config", p.dims()),
            )),
            Some(p) => Ok(Some(p.clone())),
        }
    }

    /// Reads a safetensors file, or every shard listed in a `*.safetensors.index.json`.
    /// Half-precision tensors are widened to f32.
    pub fn from_safetensors(path: &Path, device: &Device) -> Result<Self> {
        let files: Vec<PathBuf> = if path.extension().is_some_and(|e| e == "json") {
            let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
            let index: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
            let map = index["weight_map"].as_object().ok_or_else(|| Error::file(path, "has no `weight_map` object"))?;
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
            let loaded = candle_core::safetensors::load(file, device)
                .map_err(|e| Error::file(file, format!("not a readable safetensors file (truncated or corrupt?): {e}")))?;
            for (name, t) in loaded {
                let t = if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? };
                tensors.insert(name, t);
            }
        }
        Ok(Weights { source: path.to_path_buf(), tensors, packed: HashMap::new() })
    }

    /// The file the tensors came from (for error messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether a tensor of that name exists (packed or not).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.packed.contains_key(name)
    }

    /// The tensor `name`, checked against the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.tensors.get(name) {
            None => Err(Error::file(&self.source, format!("tensor `{name}` is missing"))),
            Some(t) if t.dims() != shape => Err(Error::file(
                &self.source,
                format!("tensor `{name}` has shape {:?}, expected {shape:?} from the model config", t.dims()),
            )),
            Some(t) => Ok(t.clone()),
        }
    }

    /// The first of several alternative names that exists (e.g. `LayerNorm.weight`/`gamma`).
    pub fn get_any(&self, names: &[String], shape: &[usize]) -> Result<Tensor> {
        match names.iter().find(|n| self.contains(n)) {
            Some(n) => self.get(n, shape),
            None => Err(Error::file(&self.source, format!("none of the tensors {names:?} is present"))),
        }
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<_> = self.tensors.keys().map(String::as_str).collect();
        names.sort();
        names
    }
}
