//! DoRA (`lora` with `use_dora`): PEFT's DoRA folders merge and unmerge exactly; rows of
//! one batch through different DoRA adapters equal each adapter alone; a fresh DoRA adapter
//! starts as the identity and trains (its magnitude's gradient matches finite differences).
//! That PEFT's DoRA folders reproduce PEFT's outputs is checked by the differential interop
//! test (fixtures/interop/differential).

use adapters_core::{io, registry, ForwardCtx, InsertionPoint, Placement};
use adapters_models::HoldsAdapters;
use adapters_models::{load, Backbone};
use adapters_testkit::{max_diff, workspace};
use candle_core::{Device, Tensor, Var};
use serde_json::json;

fn minilm() -> Backbone {
    load(&adapters_testkit::minilm(), &Device::Cpu).unwrap().backbone
}

/// Three padded rows of tokens.
fn batch() -> (Tensor, Tensor) {
    let ids: Vec<Vec<u32>> = (0..3u32).map(|r| (0..6u32).map(|t| 1000 + (r * 37 + t * 13) % 800).collect()).collect();
    let mask: Vec<Vec<u32>> = (0..3usize).map(|r| (0..6usize).map(|t| u32::from(t < 6 - r)).collect()).collect();
    (Tensor::new(ids, &Device::Cpu).unwrap(), Tensor::new(mask, &Device::Cpu).unwrap())
}

fn hidden(m: &Backbone, ctx: &ForwardCtx) -> Tensor {
    let Backbone::Bert(b) = m else { unreachable!() };
    let (ids, mask) = batch();
    b.forward(&ids, None, Some(&mask), ctx).unwrap()
}

/// The MiniLM DoRA folders among the differential fixtures.
fn dora_folders() -> Vec<std::path::PathBuf> {
    let dir = workspace().join("fixtures/interop/differential");
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    let dora: Vec<_> = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["config"]["use_dora"] == json!(true) && c.get("expected").is_some() && c.get("model").is_none())
        .map(|c| dir.join(c["name"].as_str().unwrap()))
        .collect();
    assert!(dora.len() >= 5, "{} DoRA folders", dora.len());
    dora
}

#[test]
fn peft_dora_merges_and_unmerges_exactly() {
    let _ = adapters_lora::family();
    let mut m = minilm();
    let ctx = ForwardCtx::inference();
    let base = hidden(&m, &ctx);
    let weights_before: Vec<(String, Tensor)> = m.named_weights();
    for dir in dora_folders() {
        let loaded = io::load(&dir, &m, &Device::Cpu).unwrap();
        m.adapters_mut().add("dora", loaded.adapter).unwrap();
        m.adapters_mut().activate(&["dora"]).unwrap();
        let unmerged = hidden(&m, &ctx);
        assert!(max_diff(&unmerged, &base) > 1e-3, "{}: the adapter changes the output", dir.display());
        m.merge("dora").unwrap();
        let d = max_diff(&hidden(&m, &ctx), &unmerged);
        assert!(d < 1e-5, "{}: merged differs from unmerged by {d}", dir.display());
        m.unmerge("dora").unwrap();
        for ((name, before), (_, after)) in weights_before.iter().zip(m.named_weights()) {
            let d = max_diff(before, &after);
            assert!(d < 1e-6, "{}: {name} is {d} away from the base weight after unmerging", dir.display());
        }
        m.adapters_mut().activate(&["dora"]).unwrap();
        let d = max_diff(&hidden(&m, &ctx), &unmerged);
        assert!(d < 1e-5, "{}: unmerged again differs by {d}", dir.display());
        m.adapters_mut().set_setup(None).unwrap();
        m.adapters_mut().remove("dora").unwrap();
    }
}

/// A DoRA adapter with non-identity weights (B and the magnitude moved off their start).
fn trained_looking(m: &Backbone, seed: u64) -> Box<dyn adapters_core::Adapter> {
    let config = json!({"r": 4, "alpha": 8, "use_dora": true});
    let a = registry::build("lora", &config, &Placement::default(), &m.model_info(), &Device::Cpu, seed).unwrap();
    let mut init = adapters_core::Init::new(seed + 100);
    for (name, v) in a.vars() {
        let noise = init.normal(v.shape(), 0.05, &Device::Cpu).unwrap();
        if name.ends_with("lora_magnitude_vector") {
            // Around ‖W‖ (about 1 for MiniLM's projections), as a trained magnitude is.
            v.set(&((noise * 4.0).unwrap() + 1.0).unwrap()).unwrap();
        } else {
            v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
        }
    }
    a
}

#[test]
fn rows_through_different_dora_adapters_equal_each_alone() {
    let _ = adapters_lora::family();
    let mut m = minilm();
    for i in 0..2 {
        let a = trained_looking(&m, 7 + i);
        m.adapters_mut().add(&format!("d{i}"), a).unwrap();
    }
    let choices = vec![vec!["d0".to_string()], vec![], vec!["d1".to_string()]];
    let mixed = hidden(&m, &ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap());
    for (row, choice) in choices.iter().enumerate() {
        let names: Vec<&str> = choice.iter().map(String::as_str).collect();
        m.adapters_mut().activate(&names).unwrap();
        let alone = hidden(&m, &ForwardCtx::inference());
        let d = max_diff(&mixed.narrow(0, row, 1).unwrap(), &alone.narrow(0, row, 1).unwrap());
        assert!(d < 1e-5, "row {row} ({choice:?}) differs from its adapter alone by {d}");
    }
}

#[test]
fn fresh_dora_starts_as_the_identity_and_its_magnitude_gradient_matches_finite_differences() {
    let _ = adapters_lora::family();
    let mut m = minilm();
    let ctx = ForwardCtx::inference();
    let base = hidden(&m, &ctx);
    let config = json!({"r": 2, "use_dora": true});
    let a = registry::build("lora", &config, &Placement::default(), &m.model_info(), &Device::Cpu, 3).unwrap();
    m.adapters_mut().add("dora", a).unwrap();
    m.adapters_mut().activate(&["dora"]).unwrap();
    assert!(max_diff(&hidden(&m, &ctx), &base) < 1e-5, "a fresh DoRA adapter changes nothing");
    // At one projection, with B moved so the direction changes: the magnitude's gradient
    // against finite differences (the output is linear in it: the norm is a constant of
    // the backward, as in PEFT), and every variable gets one.
    let adapter = m.adapters().get("dora").unwrap().clone();
    let point = adapter.points()[0];
    let vars = adapter.vars();
    let mut init = adapters_core::Init::new(5);
    for (name, v) in &vars {
        if name.ends_with("lora_B.weight") {
            v.set(&init.normal(v.shape(), 0.05, &Device::Cpu).unwrap()).unwrap();
        }
    }
    let dev = Device::Cpu;
    let (x, w, b) =
        (init.normal((2, 3, 384), 1.0, &dev).unwrap(), init.normal((384, 384), 0.05, &dev).unwrap(), init.normal(384, 0.1, &dev).unwrap());
    let apply = |t: &Tensor| t.broadcast_matmul(&w.t()?)?.broadcast_add(&b);
    let y = apply(&x).unwrap();
    let probe = (Tensor::arange(0f32, 2.0 * 3.0 * 384.0, &dev).unwrap().reshape((2, 3, 384)).unwrap() * 0.37).unwrap().sin().unwrap();
    let loss = |ctx: &ForwardCtx| {
        let io = adapters_core::ProjectionIo {
            input: &x,
            output: &y,
            linear: adapters_core::FrozenLinear { apply: &apply, weight: &|| Ok(w.clone()), bias: Some(&b) },
        };
        adapter.forward_projection(point, &io, ctx).unwrap().mul(&probe).unwrap().sum_all().unwrap()
    };
    let grads = loss(&ForwardCtx::training_seeded(1)).backward().unwrap();
    let (name, magnitude): &(String, Var) = vars.iter().find(|(n, _)| *n == adapters_lora::Lora::magnitude_name(point)).unwrap();
    let g = grads.get(magnitude).expect("the magnitude is trained").to_vec1::<f32>().unwrap();
    for index in [0usize, 17, 200] {
        let at = |delta: f32| {
            let mut v = magnitude.as_tensor().to_vec1::<f32>().unwrap();
            v[index] += delta;
            magnitude.set(&Tensor::new(v, &dev).unwrap()).unwrap();
            let value = loss(&ForwardCtx::inference()).to_scalar::<f32>().unwrap();
            let mut v = magnitude.as_tensor().to_vec1::<f32>().unwrap();
            v[index] -= delta;
            magnitude.set(&Tensor::new(v, &dev).unwrap()).unwrap();
            value
        };
        let fd = (at(0.5) - at(-0.5)) / 1.0;
        assert!(
            (g[index] - fd).abs() <= 1e-3 * g[index].abs().max(1.0),
            "{name}[{index}]: gradient {} vs finite difference {fd}",
            g[index]
        );
    }
    for (name, v) in vars.iter().filter(|(n, _)| n.starts_with(&point.var_name(""))) {
        assert!(grads.get(v).is_some(), "{name} gets no gradient");
    }
}
