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

/// The random-weight models of every supported architecture (fixtures/architectures,
/// made by its `make_fixtures.py` with transformers 4.57.6), and what a model computes on
/// their prompts.
pub mod architectures {
    use adapters_core::ForwardCtx;
    use adapters_models::{load, Backbone};
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;
    use std::path::PathBuf;

    /// The decoder fixtures (folder names).
    pub const DECODERS: [&str; 7] = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];
    /// The encoder fixtures (folder names).
    pub const ENCODERS: [&str; 3] = ["roberta", "xlm-roberta", "distilbert"];

    /// `fixtures/architectures/<name>`.
    pub fn folder(name: &str) -> PathBuf {
        super::fixtures().join("architectures").join(name)
    }

    /// The fixture model `name`, loaded on the CPU with its decoding copies dropped (random
    /// weights leave logits close enough for 8-bit rounding to matter).
    pub fn model(name: &str) -> Backbone {
        let mut backbone = load(&folder(name), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}")).backbone;
        if let Backbone::Llama(m) = &mut backbone {
            m.dequantize();
        }
        backbone
    }

    /// The tensors of a safetensors file.
    pub fn tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The model's outputs named as `make_fixtures.py` saves an adapted model's: a
    /// decoder's logits per prompt (`logits_<i>`) and last hidden states (`last_hidden_<i>`),
    /// an encoder's last hidden state of the padded pair (`last_hidden`).
    pub fn outputs(backbone: &Backbone, name: &str) -> HashMap<String, Tensor> {
        outputs_in(backbone, name, &ForwardCtx::inference())
    }

    /// [`outputs`] in the context `ctx` (a training one keeps the adapters' gradients).
    pub fn outputs_in(backbone: &Backbone, name: &str, ctx: &ForwardCtx) -> HashMap<String, Tensor> {
        let golden = tensors(&folder(name).join("golden.safetensors"));
        let prompt = |i: usize| golden[&format!("prompt_{i}")].to_dtype(DType::U32).unwrap();
        let mut out = HashMap::new();
        match backbone {
            Backbone::Llama(m) => {
                for i in 0..2 {
                    let hidden = m.forward_hidden(&prompt(i).unsqueeze(0).unwrap(), None, ctx).unwrap();
                    out.insert(format!("logits_{i}"), m.logits(&hidden).unwrap().squeeze(0).unwrap());
                    out.insert(format!("last_hidden_{i}"), hidden.squeeze(0).unwrap());
                }
            }
            Backbone::Bert(m) => {
                let ids = Tensor::stack(&[prompt(0), prompt(1)], 0).unwrap();
                let mask = Tensor::stack(&[&golden["mask_0"], &golden["mask_1"]], 0).unwrap().to_dtype(DType::U32).unwrap();
                out.insert("last_hidden".into(), m.forward(&ids, None, Some(&mask), ctx).unwrap());
            }
        }
        out
    }

    /// The largest difference between `expected` (an adapter folder's
    /// `expected.safetensors`) and what the model computes, relative to `max(1, |expected|)`;
    /// padding positions of encoders (mask 0) are left out.
    pub fn max_relative_error(backbone: &Backbone, name: &str, expected: &HashMap<String, Tensor>) -> f32 {
        let got = outputs(backbone, name);
        let golden = tensors(&folder(name).join("golden.safetensors"));
        let mut worst = 0f32;
        for (key, want) in expected {
            let have = got.get(key).unwrap_or_else(|| panic!("{name}: no output `{key}`"));
            assert_eq!(have.dims(), want.dims(), "{name}: `{key}`");
            let keep = match key.as_str() {
                // [2, seq, hidden]: only the tokens of each row.
                "last_hidden" => Some(
                    Tensor::stack(&[&golden["mask_0"], &golden["mask_1"]], 0).unwrap().to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap(),
                ),
                _ => None,
            };
            let err = ((have - want).unwrap().abs().unwrap() / want.abs().unwrap().maximum(1f32).unwrap()).unwrap();
            let err = match keep {
                Some(k) => err.broadcast_mul(&k).unwrap(),
                None => err,
            };
            worst = worst.max(err.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap());
        }
        worst
    }
}
