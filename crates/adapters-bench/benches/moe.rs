//! Sparse mixtures of experts against one adapter and against computing every expert,
//! timed interleaved (see `adapters_bench`), MiniLM at batch 32 x seq 128, 8 experts of
//! Pfeiffer size (reduction factor 16, r=24) after every feed-forward sublayer:
//!
//! - forward (inference): baseline the bare model; a single Pfeiffer adapter of one
//!   expert's size; the sparse mixture at k = 1 and k = 2; the same 8 experts computed
//!   densely (k = 1 gates). Issue 13's target: the sparse k = 1 mixture's incremental
//!   cost (its forward minus the bare forward) at most 2x the single adapter's and at most
//!   half of the dense mixture's.
//! - one site alone, as inference runs it (the adapter and the layer's add-and-norm, in one
//!   fused pass where the adapter has one): baseline the bare add-and-norm, on sublayer
//!   tensors of the same shape.
//! - training step (forward, loss, backward, AdamW): baseline the single adapter's step.

use adapters_bench::workloads::{minilm_infer, minilm_train, Step};
use adapters_bench::{interleave, to_json, write_result, Timing};
use adapters_core::{registry, Adapter, ForwardCtx, InsertionPoint, Placement, Point, Site, SublayerIo};
use adapters_kernels as kernels;
use adapters_models::{fetched, load};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::cell::RefCell;

const VARIANTS: [(&str, &str); 4] = [
    ("single Pfeiffer adapter (r=24)", "seq_bn"),
    ("8 experts, sparse, k = 1", "moe_k1"),
    ("8 experts, sparse, k = 2", "moe_k2"),
    ("8 experts, dense (k = 1 gates)", "moe_k1_dense"),
];

/// A named variant to time.
type Variant<'a> = (&'a str, Box<dyn Fn() + 'a>);

fn ratio(t: &[Timing], name: &str) -> f64 {
    t.iter().find(|v| v.name == name).map_or(f64::NAN, |v| v.median_ratio)
}

fn main() {
    adapters_kernels::tune_cpu_runtime();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = (adapters_bottleneck::family(), adapters_moe::family());
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    // `cargo bench --bench moe -- site` runs one part (forward, site, train).
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |part: &str| only.is_empty() || only.iter().any(|o| part.contains(o.as_str()));
    if wanted("forward") {
        // The increments are 1-3% of a forward: enough rounds to see them through the noise.
        forward(rounds * 4);
    }
    if wanted("site") {
        one_site(rounds * 3);
    }
    if wanted("train") {
        training_step((rounds / 2).max(3));
    }
}

fn run(s: &RefCell<Step>) {
    (s.borrow_mut())().unwrap()
}

/// The whole forward, against the bare model.
fn forward(rounds: usize) {
    let base = RefCell::new(minilm_infer("base").unwrap());
    let steps: Vec<RefCell<Step>> = VARIANTS.iter().map(|(_, m)| RefCell::new(minilm_infer(m).unwrap())).collect();
    let mut variants: Vec<Variant<'_>> = vec![("bare model", Box::new(|| run(&base)))];
    for ((name, _), step) in VARIANTS.iter().zip(&steps) {
        variants.push((name, Box::new(move || run(step))));
    }
    let refs: Vec<(&str, &dyn Fn())> = variants.iter().map(|(n, f)| (*n, f.as_ref())).collect();
    let forward = interleave(&refs, rounds);
    let incremental = |name: &str| ratio(&forward, name) - 1.0;
    let (single, k1, dense) = (incremental(VARIANTS[0].0), incremental(VARIANTS[1].0), incremental(VARIANTS[3].0));
    let mut result = to_json("Mixture of 8 experts, MiniLM forward, batch 32 x seq 128", &forward, rounds);
    result["notes"] = json!([format!(
        "Incremental cost (median pair ratio - 1, i.e. the adapter's time over the bare forward's): single adapter {single:.4}, \
         sparse k = 1 {k1:.4}, dense {dense:.4}; sparse k = 1 / single = {:.2} (target <= 2), sparse k = 1 / dense = {:.2} (target <= 0.5).",
        k1 / single,
        k1 / dense
    )]);
    write_result("moe_forward.json", &result);
}

/// One site alone, as inference runs it: the adapter and the layer's add-and-norm (one
/// fused pass where the adapter has one), against the bare add-and-norm.
fn one_site(rounds: usize) {
    let model = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
    let dev = Device::Cpu;
    let (input, output) =
        (Tensor::randn(0f32, 1.0, (32, 128, 384), &dev).unwrap(), Tensor::randn(0f32, 1.0, (32, 128, 384), &dev).unwrap());
    let (weight, bias) = (Tensor::randn(1f32, 0.1, 384, &dev).unwrap(), Tensor::randn(0f32, 0.1, 384, &dev).unwrap());
    let norm = (&weight, &bias, 1e-12);
    let add_norm = |y: &Tensor, x: &Tensor| kernels::add_layer_norm(y, x, &weight, &bias, 1e-12);
    let point = Point::new(0, Site::FfnOutput);
    let placement = Placement { layers: adapters_core::Layers::List(vec![0]), ..Default::default() };
    let adapters: Vec<Box<dyn Adapter>> = VARIANTS
        .iter()
        .map(|(_, m)| {
            let (kind, config) = match *m {
                "seq_bn" => ("seq_bn", json!({"reduction_factor": 16})),
                "moe_k1" => ("moe_bn", json!({"experts": 8, "top_k": 1})),
                "moe_k2" => ("moe_bn", json!({"experts": 8, "top_k": 2})),
                _ => ("moe_bn", json!({"experts": 8, "top_k": 1, "dispatch": "dense"})),
            };
            let a = registry::build(kind, &config, &placement, &model.model_info(), &dev, 1).unwrap();
            for (_, v) in a.vars() {
                v.set(&v.as_tensor().randn_like(0.0, 0.05).unwrap()).unwrap();
            }
            a
        })
        .collect();
    let ctx = ForwardCtx::inference();
    let io = SublayerIo { input: &input, output: &output, post_norm: Some(&add_norm) };
    let at_site = |a: &dyn Adapter| match a.capabilities().fused_post_norm.and_then(|f| f.add_layer_norm(point, &io, norm, &ctx)) {
        Some(fused) => fused.unwrap(),
        None => add_norm(&a.forward_hidden(point, &io, &ctx).unwrap(), &input).unwrap(),
    };
    let bare = || {
        add_norm(&output, &input).unwrap();
    };
    let mut site: Vec<Variant<'_>> = vec![("bare add-and-norm", Box::new(bare))];
    for ((name, _), a) in VARIANTS.iter().zip(&adapters) {
        site.push((name, Box::new(move || drop(at_site(a.as_ref())))));
    }
    let refs: Vec<(&str, &dyn Fn())> = site.iter().map(|(n, f)| (*n, f.as_ref())).collect();
    let timings = interleave(&refs, rounds);
    let incremental = |name: &str| ratio(&timings, name) - 1.0;
    let (single, k1, dense) = (incremental(VARIANTS[0].0), incremental(VARIANTS[1].0), incremental(VARIANTS[3].0));
    let mut result =
        to_json("Mixture of 8 experts at one site with the layer's add-and-norm (inference), 32 x 128 tokens", &timings, rounds);
    result["notes"] = json!([format!(
        "Incremental cost over the bare add-and-norm: single adapter {single:.3}, sparse k = 1 {k1:.3}, dense {dense:.3}; \
         sparse k = 1 / single = {:.2}, sparse k = 1 / dense = {:.2}.",
        k1 / single,
        k1 / dense
    )]);
    write_result("moe_site.json", &result);
}

/// The training step, against the single adapter's.
fn training_step(rounds: usize) {
    let steps: Vec<RefCell<Step>> = VARIANTS.iter().map(|(_, m)| RefCell::new(minilm_train(m, || {}).unwrap().0)).collect();
    let variants: Vec<Variant<'_>> =
        VARIANTS.iter().zip(&steps).map(|((n, _), s)| (*n, Box::new(move || run(s)) as Box<dyn Fn()>)).collect();
    let refs: Vec<(&str, &dyn Fn())> = variants.iter().map(|(n, f)| (*n, f.as_ref())).collect();
    let training = interleave(&refs, rounds);
    write_result("moe_train.json", &to_json("Mixture of 8 experts, MiniLM training step, batch 32 x seq 128", &training, rounds));
}
