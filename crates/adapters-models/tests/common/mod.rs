//! Shared helpers for the model-backed tests: where the models and reference files are,
//! and a probe adapter that touches every insertion point.
#![allow(dead_code)]

use adapters_core::{Adapter, AuxLoss, ForwardCtx, Init, ModelInfo, Point, ProjectionIo, SublayerIo};
use candle_core::{Device, Result, Tensor, Var};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `models/<name>`, with a message that says how to get it when missing.
pub fn model_path(name: &str) -> PathBuf {
    adapters_models::fetched(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn minilm() -> PathBuf {
    model_path("all-MiniLM-L6-v2")
}

pub fn smollm() -> PathBuf {
    model_path("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A reference file from `fixtures/` (golden outputs and interop adapters).
pub fn fixture(rel: &str) -> serde_json::Value {
    let path = workspace().join("fixtures").join(rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A test adapter at every point of a model: at hidden sites it adds `input @ W`, at
/// projection sites `input @ A` (small random matrices), so every variable lies on the
/// path from the input to the loss.
pub struct Probe {
    vars: BTreeMap<Point, Var>,
    /// Training-time randomness and an auxiliary loss at every hidden site, so that a test
    /// sees both paths (see [`Probe::noisy`]).
    noisy: bool,
}

impl Probe {
    pub fn everywhere(info: &ModelInfo, device: &Device) -> Result<Self> {
        let mut init = Init::new(11);
        let mut vars = BTreeMap::new();
        // The sites that lend a sublayer or a projection (the other kinds have toy kinds of
        // their own in tests/new_sites.rs).
        for spec in info.points.iter().filter(|s| s.point.site.is_hidden() || s.point.site.is_projection()) {
            let w = init.normal((spec.in_features, spec.out_features), 0.01, device)?;
            vars.insert(spec.point, Var::from_tensor(&w)?);
        }
        Ok(Probe { vars, noisy: false })
    }

    /// Also applies dropout (p = 0.1) to its hidden-site input in training and reports an
    /// auxiliary loss (1e-3 times the squared sum of its output) there.
    pub fn noisy(self) -> Self {
        Probe { noisy: true, ..self }
    }
}

impl Adapter for Probe {
    fn kind(&self) -> &str {
        "probe"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn points(&self) -> Vec<Point> {
        self.vars.keys().copied().collect()
    }
    fn vars(&self) -> Vec<(String, Var)> {
        self.vars.iter().map(|(p, v)| (p.to_string(), v.clone())).collect()
    }
    fn forward_hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        if !self.noisy {
            return io.output + io.input.broadcast_matmul(self.vars[&point].as_tensor())?;
        }
        let delta = ctx.dropout(io.input, 0.1)?.broadcast_matmul(self.vars[&point].as_tensor())?;
        let value = (delta.sum_all()?.sqr()? * 1e-3)?;
        ctx.push_loss(AuxLoss { adapter: "probe".into(), point, name: "test".into(), value });
        io.output + delta
    }
    fn forward_projection(&self, point: Point, io: &ProjectionIo, _: &ForwardCtx) -> Result<Tensor> {
        io.output + io.input.broadcast_matmul(self.vars[&point].as_tensor())?
    }
}

/// Asserts that every variable has a finite, non-zero gradient.
pub fn assert_all_grads(vars: &[(String, Var)], grads: &candle_core::backprop::GradStore) {
    assert!(!vars.is_empty());
    for (name, var) in vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("variable {name} received no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "variable {name} has gradient norm {norm}");
    }
}
