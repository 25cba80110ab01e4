//! The helpers the workspace's tests share, so that no test file carries its own copy:
//! where the repository and its fixtures are, scratch folders, comparisons that refuse
//! tensors or lists of different shapes (a shorter output must fail, not compare its
//! prefix), every family registered, and an S3-compatible server on a free port.

#![warn(missing_docs)]

use candle_core::Tensor;
use std::path::PathBuf;

/// The repository's root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The repository's test reference data (`fixtures/`).
pub fn fixtures() -> PathBuf {
    workspace().join("fixtures")
}

/// A fetched model's path (`models/NAME`); panics with what to run when it is missing.
pub fn model(name: &str) -> PathBuf {
    adapters_models::fetched(name).unwrap_or_else(|e| panic!("{e}"))
}

/// all-MiniLM-L6-v2 (the encoder every test uses).
pub fn minilm() -> PathBuf {
    model("all-MiniLM-L6-v2")
}

/// SmolLM2-135M-Instruct, the shipped Q4_1 GGUF file (the decoder every test uses).
pub fn smollm() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Registers every shipped adapter family in this test binary (see `adapters-families`).
#[cfg(feature = "families")]
pub fn register_all() {
    adapters_families::link();
}

/// An empty folder for one test, `<tmp>/adapters-<name>-<pid>`, emptied if it existed.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("adapters-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "compared tensors differ in shape");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// The largest absolute difference between two lists of the same length.
pub fn max_diff_values(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared lists differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The largest absolute difference between two lists of rows of the same shape.
pub fn max_diff_rows(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared lists differ in their number of rows");
    a.iter().zip(b).map(|(x, y)| max_diff_values(x, y)).fold(0.0, f32::max)
}

/// A JSON array of arrays of numbers (a fixture's rows) as rows of `f32`.
pub fn json_rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    let rows = v.as_array().unwrap_or_else(|| panic!("not an array of rows: {v}"));
    rows.iter().map(|r| r.as_array().expect("a row of numbers").iter().map(|x| x.as_f64().expect("a number") as f32).collect()).collect()
}

#[cfg(feature = "s3")]
mod s3;
#[cfg(feature = "s3")]
pub use s3::{s3_options, start_s3, S3_KEY};
