//! Base-model fingerprints: an adapter records the model it was made for, so loading it
//! onto a different base model fails with a clear error instead of silent garbage.
//!
//! Format versions (the `version` field of `base_model` in `adapter_config.json`):
//! - **2** (current): sha256 over every weight's name, shape and float32 little-endian
//!   bytes, in name order. The bytes are the weights themselves, so the checksum does not
//!   depend on the device, the thread count or any summation order, and any changed entry
//!   (a permutation too) changes it.
//! - **1** (adapters saved before version 2; no `version` field): sha256 over every
//!   weight's name, shape, f64 sum and sum of squares. Still read: such an adapter is
//!   checked against the model's version-1 checksum, and saving it again writes version 2.

use crate::point::ModelInfo;
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// The fingerprint format this library writes.
pub const FINGERPRINT_VERSION: u32 = 2;

/// Architecture, dimensions and a checksum of the base weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// How `weights_checksum` was computed (see the module docs); 1 when absent.
    #[serde(default = "version_1")]
    pub version: u32,
    /// `bert` or `llama`.
    pub architecture: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// The first 16 hex digits of the sha256 of the weights (see the module docs).
    pub weights_checksum: String,
}

fn version_1() -> u32 {
    1
}

impl Fingerprint {
    /// Fingerprints a model from its description and its named base weights, in the
    /// current format.
    pub fn of(info: &ModelInfo, weights: &[(String, Tensor)]) -> Result<Self> {
        Self::of_version(FINGERPRINT_VERSION, info, weights)
    }

    /// Fingerprints a model in format `version` (1 or 2), to check adapters saved by
    /// earlier versions of the library.
    pub fn of_version(version: u32, info: &ModelInfo, weights: &[(String, Tensor)]) -> Result<Self> {
        let mut sorted: Vec<&(String, Tensor)> = weights.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hasher = Sha256::new();
        for (name, t) in sorted {
            hasher.update(name.as_bytes());
            for d in t.dims() {
                hasher.update((*d as u64).to_le_bytes());
            }
            match version {
                1 => {
                    let t64 = t.to_dtype(DType::F64)?;
                    hasher.update(t64.sum_all()?.to_scalar::<f64>()?.to_le_bytes());
                    hasher.update(t64.sqr()?.sum_all()?.to_scalar::<f64>()?.to_le_bytes());
                }
                2 => {
                    let values = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    for chunk in values.chunks(1 << 16) {
                        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
                        hasher.update(&bytes);
                    }
                }
                other => candle_core::bail!(
                    "base-model fingerprint version {other} is unknown to this library (it reads 1 and {FINGERPRINT_VERSION}); \
                     upgrade the library"
                ),
            }
        }
        let digest = format!("{:x}", hasher.finalize());
        Ok(Fingerprint {
            version,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ModelInfo {
        ModelInfo { architecture: "toy".into(), hidden_size: 2, num_layers: 1, vocab_size: 3, points: vec![] }
    }

    fn weights(values: &[f32]) -> Vec<(String, Tensor)> {
        vec![("w".into(), Tensor::new(values, &Device::Cpu).unwrap())]
    }

    #[test]
    fn a_permutation_changes_version_2_but_not_version_1() {
        let (a, b) = (weights(&[1.0, 2.0, 3.0]), weights(&[3.0, 2.0, 1.0]));
        assert_ne!(Fingerprint::of(&info(), &a).unwrap(), Fingerprint::of(&info(), &b).unwrap());
        assert_eq!(Fingerprint::of_version(1, &info(), &a).unwrap(), Fingerprint::of_version(1, &info(), &b).unwrap());
    }

    #[test]
    fn the_last_bit_of_one_weight_changes_version_2() {
        let x = 0.1f32;
        let nudged = f32::from_bits(x.to_bits() + 1);
        let a = Fingerprint::of(&info(), &weights(&[x, 1.0])).unwrap();
        assert_ne!(a, Fingerprint::of(&info(), &weights(&[nudged, 1.0])).unwrap());
        assert_eq!(a, Fingerprint::of(&info(), &weights(&[x, 1.0])).unwrap());
    }

    #[test]
    fn a_config_without_version_reads_as_version_1() {
        let json = r#"{"architecture":"toy","hidden_size":2,"num_layers":1,"vocab_size":3,"weights_checksum":"00"}"#;
        let f: Fingerprint = serde_json::from_str(json).unwrap();
        assert_eq!(f.version, 1);
        assert!(Fingerprint::of_version(7, &info(), &weights(&[1.0])).unwrap_err().to_string().contains("version 7"));
    }
}
