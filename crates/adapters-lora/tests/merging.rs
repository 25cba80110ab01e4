//! Combining LoRA adapters equals PEFT 0.21.2's `add_weighted_adapter`: for every
//! deterministic method, the merged update `s · B A` at every projection matches the one
//! PEFT saved (fixtures/merging, made by its `make_peft_merges.py` from the three input
//! folders there). DARE's masks are random, so DARE is checked by what it must do.

use adapters_core::merge::{self, Input, MajoritySign, Options};
use adapters_core::{io, Adapter, InsertionPoint};
use adapters_lora::Lora;
use adapters_models::{load, Backbone};
use adapters_testkit::workspace;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

fn minilm() -> Backbone {
    let _ = adapters_lora::family();
    let path = workspace().join("models/all-MiniLM-L6-v2");
    assert!(path.exists(), "{} is missing: run `cargo xtask fetch` first", path.display());
    load(&path, &Device::Cpu).unwrap().backbone
}

fn fixture(path: &str, model: &Backbone) -> io::Loaded {
    io::load(&workspace().join("fixtures/merging").join(path), model, &Device::Cpu).unwrap()
}

/// `s · B A` at every point of a LoRA adapter, by point.
fn updates(adapter: &dyn Adapter, placement: &adapters_core::Placement, model: &Backbone) -> BTreeMap<String, Tensor> {
    let info = model.model_info();
    let args = adapters_core::BuildArgs { config: &adapter.config(), placement, model: &info, device: &Device::Cpu, seed: 0 };
    let lora = Lora::build(&args).unwrap();
    for ((_, var), (_, value)) in lora.vars().into_iter().zip(adapter.vars()) {
        var.set(value.as_tensor()).unwrap();
    }
    lora.points()
        .into_iter()
        .map(|p| {
            let (a, b, s) = lora.factor_vars(p).unwrap();
            (format!("{p:?}"), (b.as_tensor().matmul(a.as_tensor()).unwrap() * s).unwrap())
        })
        .collect()
}

/// The largest difference between two sets of updates, relative to the largest entry.
fn relative_difference(ours: &BTreeMap<String, Tensor>, theirs: &BTreeMap<String, Tensor>) -> f32 {
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    let mut worst = 0f32;
    for (k, a) in ours {
        let b = &theirs[k];
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        worst = worst.max(diff / scale);
    }
    worst
}

fn combine(
    model: &Backbone,
    names: &[&str],
    weights: &[f64],
    method: &str,
    options: &Options,
) -> (Box<dyn Adapter>, adapters_core::Placement) {
    let loaded: Vec<io::Loaded> = names.iter().map(|n| fixture(&format!("inputs/{n}"), model)).collect();
    let inputs: Vec<Input> =
        loaded.iter().zip(weights).map(|(l, w)| Input { adapter: l.adapter.as_ref(), placement: &l.placement, weight: *w }).collect();
    let combined = merge::combine(method, &inputs, options, &model.model_info(), &Device::Cpu).unwrap();
    (combined.adapter, combined.placement)
}

#[test]
fn every_deterministic_method_matches_peft() {
    let model = minilm();
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(workspace().join("fixtures/merging/cases.json")).unwrap()).unwrap();
    let mut failed = Vec::new();
    for (name, case) in cases["cases"].as_object().unwrap() {
        let names: Vec<&str> = case["adapters"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let weights: Vec<f64> = case["weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let options = Options {
            density: case["density"].as_f64(),
            rank: case["svd_rank"].as_u64().map(|r| r as usize),
            clamp: case["svd_clamp"].as_f64(),
            majority_sign: if case["majority_sign_method"] == "frequency" { MajoritySign::Frequency } else { MajoritySign::Total },
            seed: 0,
        };
        let (ours, placement) = combine(&model, &names, &weights, case["combination_type"].as_str().unwrap(), &options);
        let theirs = fixture(&format!("merged/{name}"), &model);
        assert_eq!(ours.config()["r"], serde_json::to_value(theirs.adapter.config()["r"].clone()).unwrap(), "{name}: rank");
        let d =
            relative_difference(&updates(ours.as_ref(), &placement, &model), &updates(theirs.adapter.as_ref(), &theirs.placement, &model));
        if d >= 1e-4 {
            failed.push(format!("{name}: merged updates differ from PEFT's by {d:e} of their largest entry"));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// `cat` is the exact weighted sum of the inputs' updates; `svd` at full rank keeps it.
#[test]
fn cat_is_the_exact_weighted_sum_of_updates() {
    let model = minilm();
    let (ours, placement) = combine(&model, &["one", "two", "three"], &[0.5, -0.3, 0.2], "cat", &Options::default());
    let parts: Vec<BTreeMap<String, Tensor>> = ["one", "two", "three"]
        .iter()
        .map(|n| {
            let l = fixture(&format!("inputs/{n}"), &model);
            updates(l.adapter.as_ref(), &l.placement, &model)
        })
        .collect();
    let expected: BTreeMap<String, Tensor> = parts[0]
        .keys()
        .map(|k| {
            let sum = ((&parts[0][k] * 0.5).unwrap() + (&parts[1][k] * -0.3).unwrap()).unwrap();
            (k.clone(), (sum + (&parts[2][k] * 0.2).unwrap()).unwrap())
        })
        .collect();
    assert!(relative_difference(&updates(ours.as_ref(), &placement, &model), &expected) < 1e-5);
}

/// DARE with density 1 prunes nothing (it is `linear`); below 1 it keeps about that share
/// of each factor's entries, rescaled, the same ones for the same seed and others for
/// another seed.
#[test]
fn dare_keeps_a_seeded_random_share() {
    let model = minilm();
    let options = |density, seed| Options { density: Some(density), seed, ..Options::default() };
    let weights = [1.0, 0.0];
    let (linear, placement) = combine(&model, &["one", "two"], &weights, "linear", &Options::default());
    let (full, _) = combine(&model, &["one", "two"], &weights, "dare_linear", &options(1.0, 7));
    let values = |a: &dyn Adapter| -> Vec<f32> {
        a.vars().into_iter().flat_map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    };
    assert_eq!(values(linear.as_ref()), values(full.as_ref()));
    let (a, _) = combine(&model, &["one", "two"], &weights, "dare_linear", &options(0.3, 7));
    let (b, _) = combine(&model, &["one", "two"], &weights, "dare_linear", &options(0.3, 7));
    let (c, _) = combine(&model, &["one", "two"], &weights, "dare_linear", &options(0.3, 8));
    assert_eq!(values(a.as_ref()), values(b.as_ref()), "same seed, same masks");
    assert_ne!(values(a.as_ref()), values(c.as_ref()), "another seed, other masks");
    // With weight 1 on `one` alone, every kept entry is `one`'s (weighted) entry / 0.3.
    let (kept, total) = values(a.as_ref()).iter().zip(values(linear.as_ref())).fold((0usize, 0usize), |(k, t), (x, l)| {
        if *x != 0.0 {
            assert!((x - l / 0.3).abs() <= 1e-5 * l.abs().max(1.0), "{x} is not {l} / 0.3");
        }
        (k + usize::from(*x != 0.0), t + 1)
    });
    let share = kept as f64 / total as f64;
    assert!((share - 0.3).abs() < 0.01, "kept {share:.3} of the entries, not 0.3");
    let _ = placement;
}

/// Wrong input is refused naming what is wrong.
#[test]
fn bad_combinations_are_refused() {
    let model = minilm();
    let loaded: Vec<io::Loaded> = ["one", "three"].iter().map(|n| fixture(&format!("inputs/{n}"), &model)).collect();
    let inputs: Vec<Input> = loaded.iter().map(|l| Input { adapter: l.adapter.as_ref(), placement: &l.placement, weight: 0.5 }).collect();
    let info = model.model_info();
    let err = |method: &str, options: &Options| merge::combine(method, &inputs, options, &info, &Device::Cpu).err().unwrap().to_string();
    assert!(err("linear", &Options::default()).contains("use svd or cat"));
    assert!(err("ties", &Options::default()).contains("needs a density"));
    assert!(err("svd", &Options { rank: Some(1000), ..Options::default() }).contains("at most 384"));
    assert!(err("svd", &Options { density: Some(1.5), ..Options::default() }).contains("density 1.5"));
    let e = err("mean", &Options::default());
    assert!(e.contains("do not combine by `mean`") && e.contains("\n  dare_ties: DARE") && e.contains("\n  svd: "), "{e}");
    let nan = [Input { weight: f64::NAN, ..inputs[0] }];
    let e = merge::combine("svd", &nan, &Options::default(), &info, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("weight of adapter 1 is NaN"), "{e}");
}

/// `svd` with a clamp quantile q: the factors are the unclamped ones clipped at one bound
/// (the q-quantile of their entries), which some entries exceeded.
#[test]
fn svd_clamp_bounds_the_factors_at_the_quantile() {
    let model = minilm();
    let names = ["one", "two", "three"];
    let weights = [0.5, 0.3, 0.2];
    let (plain, placement) = combine(&model, &names, &weights, "svd", &Options::default());
    let (clamped, _) = combine(&model, &names, &weights, "svd", &Options { clamp: Some(0.9), ..Options::default() });
    for ((name, p), (_, c)) in
        plain.vars().into_iter().zip(clamped.vars()).filter(|(n, _)| n.0.contains("layer.0.attention.self.query.lora_B"))
    {
        let (p, c) = (
            p.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            c.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let hi = c.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(p.iter().any(|x| x.abs() > hi), "{name}: something was clamped");
        for (x, y) in p.iter().zip(&c) {
            assert!(*y == x.clamp(-hi, hi), "{name}: {y} is not {x} clamped to ±{hi}");
        }
    }
    let d = relative_difference(&updates(clamped.as_ref(), &placement, &model), &updates(plain.as_ref(), &placement, &model));
    assert!(d > 0.0, "clamping changed nothing");
}
