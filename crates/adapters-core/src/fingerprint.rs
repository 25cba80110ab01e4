//! Base-model fingerprints: an adapter records the model it was made for, so loading it
//! onto a different base model fails with a clear error instead of silent garbage.

use crate::point::ModelInfo;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Architecture, dimensions and a checksum of the base weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    pub architecture: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    /// sha256 over every weight's name, shape, sum and sum of squares (f64), in name
    /// order: two reductions per tensor, so fingerprinting a model takes a fraction of a
    /// second, and any changed weight changes it.
    pub weights_checksum: String,
}

impl Fingerprint {
    /// Fingerprints a model from its description and its named base weights.
    pub fn of(info: &ModelInfo, weights: &[(String, Tensor)]) -> Result<Self> {
        let mut sorted: Vec<&(String, Tensor)> = weights.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hasher = Sha256::new();
        for (name, t) in sorted {
            let t64 = t.to_dtype(DType::F64)?;
            hasher.update(name.as_bytes());
            for d in t.dims() {
                hasher.update((*d as u64).to_le_bytes());
            }
            hasher.update(t64.sum_all()?.to_scalar::<f64>()?.to_le_bytes());
            hasher.update(t64.sqr()?.sum_all()?.to_scalar::<f64>()?.to_le_bytes());
        }
        let digest = format!("{:x}", hasher.finalize());
        Ok(Fingerprint {
            architecture: info.architecture.clone(),
            hidden_size: info.hidden_size,
            num_layers: info.num_layers,
            vocab_size: info.vocab_size,
            weights_checksum: digest[..16].to_string(),
        })
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} layers, hidden {}, vocabulary {}, weights {})",
            self.architecture, self.num_layers, self.hidden_size, self.vocab_size, self.weights_checksum
        )
    }
}
