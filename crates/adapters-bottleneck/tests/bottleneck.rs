//! Bottleneck adapters on both backbones: exact parameter counts, identity at start with
//! the zero up-projection init, gradients to every variable (checked against finite
//! differences), dropout only in training, and clear errors when loading bad folders.

use adapters_core::{io, registry, Adapter, ForwardCtx, InsertionPoint, Placement, SublayerIo};
use adapters_models::heads::mean_pool;
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone};
use adapters_testkit::max_diff_values as max_diff;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::json;

fn model(name: &str) -> Backbone {
    let _ = adapters_bottleneck::family();
    load(&fetched(name).unwrap(), &Device::Cpu).unwrap().backbone
}

fn placement(json: &str) -> Placement {
    serde_json::from_str(json).unwrap()
}

fn build(m: &Backbone, kind: &str, config: serde_json::Value, p: &str) -> Box<dyn Adapter> {
    registry::build(kind, &config, &placement(p), &m.model_info(), &Device::Cpu, 7).unwrap()
}

/// A scalar that depends on every output position: mean-pooled hidden states, squared.
fn loss(m: &Backbone, ctx: &ForwardCtx) -> Tensor {
    let ids = Tensor::new(&[[101u32, 7592, 2088, 2003, 102], [101, 2307, 2154, 102, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 1, 0]], &Device::Cpu).unwrap();
    let hidden = match m {
        Backbone::Bert(b) => b.forward(&ids, None, Some(&mask), ctx).unwrap(),
        Backbone::Llama(l) => l.forward_hidden(&ids, None, ctx).unwrap(),
    };
    let pooled = mean_pool(&hidden, &mask).unwrap();
    let target = Tensor::ones(pooled.dims(), candle_core::DType::F32, &Device::Cpu).unwrap();
    (pooled - target).unwrap().sqr().unwrap().mean_all().unwrap()
}

fn output(m: &Backbone) -> Vec<f32> {
    let ids = Tensor::new(&[[101u32, 7592, 2088, 2003, 102]], &Device::Cpu).unwrap();
    let h = match m {
        Backbone::Bert(b) => b.forward(&ids, None, None, &ForwardCtx::inference()).unwrap(),
        Backbone::Llama(l) => l.forward_hidden(&ids, None, &ForwardCtx::inference()).unwrap(),
    };
    h.flatten_all().unwrap().to_vec1().unwrap()
}

fn activate(m: &mut Backbone, name: &str, a: Box<dyn Adapter>) {
    m.adapters_mut().add(name, a).unwrap();
    m.adapters_mut().activate(&[name]).unwrap();
}

#[test]
fn parameter_counts_are_exact() {
    let m = model("all-MiniLM-L6-v2");
    let d = 384;
    // r = 384/16 = 24 everywhere, but 8 in layer 2: 2rd + r + d per site.
    let a = build(&m, "seq_bn", json!({}), r#"{"sizes":{"2":8}}"#);
    assert_eq!(a.num_parameters(), 5 * (2 * 24 * d + 24 + d) + (2 * 8 * d + 8 + d));
    let a = build(&m, "double_seq_bn", json!({"bottleneck_size": 10}), r#"{"leave_out":[0]}"#);
    assert_eq!(a.num_parameters(), 2 * 5 * (2 * 10 * d + 10 + d));
    // LayerNorms (2d each), gate (d + 1), per-channel scaling (d).
    let a = build(
        &m,
        "par_bn",
        json!({"bottleneck_size": 4, "ln_before": true, "ln_after": true, "use_gating": true, "scaling": "channel"}),
        r#"{"layers":[1]}"#,
    );
    assert_eq!(a.num_parameters(), (2 * 4 * d + 4 + d) + 4 * d + (d + 1) + d);
    let a = build(&m, "seq_bn", json!({"bottleneck_size": 4, "scaling": "learned"}), r#"{"layers":{"top":1}}"#);
    assert_eq!(a.num_parameters(), 2 * 4 * d + 4 + d + 1);
}

#[test]
fn zero_up_projection_starts_as_identity_on_both_backbones() {
    for name in ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let mut m = model(name);
        let base = output(&m);
        for kind in ["seq_bn", "double_seq_bn", "par_bn"] {
            let a = build(&m, kind, json!({"init_weights": "mam_adapter"}), "{}");
            activate(&mut m, kind, a);
            assert_eq!(output(&m), base, "{name} {kind} with a zero up-projection");
            // Normal init moves the output.
            let b = build(&m, kind, json!({"init_weights": "bert"}), "{}");
            activate(&mut m, &format!("{kind}-normal"), b);
            assert!(max_diff(&output(&m), &base) > 1e-4, "{name} {kind}");
        }
        m.adapters_mut().activate(&[]).unwrap();
        assert_eq!(output(&m), base, "{name}: nothing active is the base model bit for bit");
    }
}

/// At inference one bottleneck adapter at a BERT site runs with the layer's add-and-norm
/// in one fused pass (Pfeiffer reading the normed sum, Houlsby the output, parallel the
/// input; fixed, learned and per-channel scales folded in). It equals the graph-building
/// path that training and attacks take; configurations with their own norms take that path.
#[test]
fn fused_inference_pass_equals_the_graph_path() {
    let mut m = model("all-MiniLM-L6-v2");
    let cases = [
        ("seq_bn", json!({})),
        ("seq_bn", json!({"scaling": "channel", "non_linearity": "swish"})),
        ("seq_bn", json!({"scaling": 2.0, "reduction_factor": 4})),
        ("double_seq_bn", json!({})),
        ("par_bn", json!({"scaling": "learned"})),
        ("seq_bn", json!({"ln_before": true})),
    ];
    let ids = Tensor::new(&[[101u32, 7592, 2088, 2003, 102], [101, 2307, 2154, 102, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 1, 0]], &Device::Cpu).unwrap();
    let hidden = |m: &Backbone, ctx: &ForwardCtx| -> Vec<f32> {
        let Backbone::Bert(b) = m else { unreachable!("MiniLM is a BERT") };
        b.forward(&ids, None, Some(&mask), ctx).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let bare = hidden(&m, &ForwardCtx::inference());
    for (i, (kind, config)) in cases.into_iter().enumerate() {
        let mut config = config;
        config["init_weights"] = json!("bert");
        let own_norm = config.get("ln_before").is_some();
        let a = build(&m, kind, config.clone(), "{}");
        // Learned scales start at 1: move them so that folding them in is tested.
        for (name, v) in a.vars().iter().filter(|(name, _)| name.ends_with("scaling")) {
            v.set(&(v.as_tensor() * 1.7).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let point = a.points()[0];
        let (x, ones) =
            (Tensor::zeros((1, 2, 384), DType::F32, &Device::Cpu).unwrap(), Tensor::ones(384, DType::F32, &Device::Cpu).unwrap());
        let io = SublayerIo { input: &x, output: &x, post_norm: None };
        let fuses = a
            .capabilities()
            .fused_post_norm
            .and_then(|f| f.add_layer_norm(point, &io, (&ones, &ones, 1e-12), &ForwardCtx::inference()))
            .is_some();
        assert_eq!(fuses, !own_norm, "{kind} {config}");
        activate(&mut m, &format!("a{i}"), a);
        let ctx = ForwardCtx::inference();
        let (fused, graph) = (hidden(&m, &ctx), hidden(&m, &ctx.clone().with_graph()));
        assert!(max_diff(&fused, &graph) < 2e-5, "{kind} {config}: {}", max_diff(&fused, &graph));
        assert!(max_diff(&fused, &bare) > 1e-3, "{kind} {config}: the adapter acts");
    }
}

#[test]
fn every_variable_gets_a_gradient_matching_finite_differences() {
    let mut m = model("all-MiniLM-L6-v2");
    let config = json!({"bottleneck_size": 6, "ln_before": true, "ln_after": true, "use_gating": true,
                        "scaling": "learned", "non_linearity": "gelu", "init_weights": "bert"});
    let a = build(&m, "double_seq_bn", config, r#"{"layers":[0,5]}"#);
    activate(&mut m, "a", a);
    let ctx = ForwardCtx::training();
    let grads = loss(&m, &ctx).backward().unwrap();
    let vars = m.adapters().active_vars();
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
    }
    for (name, var) in
        vars.iter().filter(|(n, _)| n.ends_with("adapter_down.weight") || n.ends_with("scaling") || n.ends_with("gate.weight"))
    {
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let numeric = finite_difference(&m, var, 0, 1e-2);
        assert!((analytic - numeric).abs() <= 2e-2 * analytic.abs().max(1e-3), "{name}: analytic {analytic}, numeric {numeric}");
    }
}

fn finite_difference(m: &Backbone, var: &Var, index: usize, eps: f32) -> f64 {
    let orig = var.as_tensor().copy().unwrap();
    let at = |delta: f32| {
        let mut v = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[index] += delta;
        var.set(&Tensor::from_vec(v, orig.dims(), &Device::Cpu).unwrap()).unwrap();
        loss(m, &ForwardCtx::training()).to_scalar::<f32>().unwrap() as f64
    };
    let d = (at(eps) - at(-eps)) / (2.0 * eps as f64);
    var.set(&orig).unwrap();
    d
}

#[test]
fn variants_train_on_the_decoder_too() {
    let mut m = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    for kind in ["seq_bn", "double_seq_bn", "par_bn"] {
        let a = build(&m, kind, json!({"init_weights": "bert"}), r#"{"layers":{"top":2}}"#);
        activate(&mut m, kind, a);
        let grads = loss(&m, &ForwardCtx::training()).backward().unwrap();
        for (name, var) in m.adapters().active_vars() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{kind}: {name} has no gradient"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm.is_finite() && norm > 0.0, "{kind}: {name} has gradient norm {norm}");
        }
    }
}

#[test]
fn dropout_only_in_training() {
    let mut m = model("all-MiniLM-L6-v2");
    let a = build(&m, "seq_bn", json!({"dropout": 0.5}), "{}");
    activate(&mut m, "a", a);
    let inf = loss(&m, &ForwardCtx::inference()).to_scalar::<f32>().unwrap();
    assert_eq!(inf, loss(&m, &ForwardCtx::inference()).to_scalar::<f32>().unwrap());
    let train: Vec<f32> = (0..3).map(|_| loss(&m, &ForwardCtx::training()).to_scalar::<f32>().unwrap()).collect();
    assert!(train.iter().any(|t| (t - inf).abs() > 1e-7), "dropout had no effect in training: {train:?} vs {inf}");
}

#[test]
fn bad_folders_give_clear_errors_and_change_nothing() {
    let mut m = model("all-MiniLM-L6-v2");
    let fp = m.fingerprint().unwrap();
    let a = build(&m, "seq_bn", json!({}), "{}");
    let tmp = std::env::temp_dir().join(format!("bn-bad-{}", std::process::id()));
    let good = tmp.join("good");
    io::save(&good, "a", a.as_ref(), &Placement::default(), &fp).unwrap();
    let kept = build(&m, "par_bn", json!({}), "{}");
    activate(&mut m, "kept", kept);
    let before = output(&m);

    // Each bad folder goes through the call that attaches adapters to the model.
    let mut case = |name: &str, edit: &dyn Fn(&std::path::Path)| -> String {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(good.join(f), dir.join(f)).unwrap();
        }
        edit(&dir);
        m.load_adapter(&dir, None).expect_err("loading must fail").to_string()
    };
    let e = case("missing", &|d| std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap());
    assert!(e.contains("adapter_model.safetensors") && e.contains("missing"), "{e}");
    let e = case("truncated", &|d| {
        let b = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
        std::fs::write(d.join("adapter_model.safetensors"), &b[..b.len() - 100]).unwrap();
    });
    assert!(e.contains("adapter_model.safetensors") && e.contains("truncated or corrupt"), "{e}");
    let e = case("shape", &|d| {
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("adapter_config.json")).unwrap()).unwrap();
        c["config"]["reduction_factor"] = json!(8.0);
        std::fs::write(d.join("adapter_config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    });
    assert!(e.contains("has shape") && e.contains("adapter_down"), "{e}");
    let e = case("kind", &|d| {
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("adapter_config.json")).unwrap()).unwrap();
        c["kind"] = json!("mystery");
        std::fs::write(d.join("adapter_config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    });
    assert!(e.contains("mystery") && e.contains("registered kinds"), "{e}");
    let e = case("json", &|d| std::fs::write(d.join("adapter_config.json"), "{oops").unwrap());
    assert!(e.contains("adapter_config.json") && e.contains("not valid JSON"), "{e}");
    // Another base model: the error names both.
    let mut llama = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let e = llama.load_adapter(&good, None).err().unwrap().to_string();
    assert!(e.contains("bert (6 layers") && e.contains("llama (30 layers"), "{e}");
    assert!(llama.adapters().names().is_empty());

    // Nothing was attached, the active setup and the outputs are as before; the good
    // folder attaches under its saved name, beside `kept`, and changes the output.
    assert_eq!(m.adapters().names(), vec!["kept"]);
    assert_eq!(m.adapters().active(), ["kept".to_string()]);
    assert_eq!(output(&m), before);
    assert_eq!(m.load_adapter(&good, None).unwrap(), "a");
    m.adapters_mut().activate(&["kept", "a"]).unwrap();
    assert!(max_diff(&output(&m), &before) > 1e-4);
    std::fs::remove_dir_all(&tmp).ok();
}

/// An adapter saved before fingerprint version 2 (`fixtures/legacy/pfeiffer_v1`, written by
/// this library's trainer with the f64-sum checksum) still loads onto its base model, and
/// saving it again writes the current version; a version-1 checksum that does not match
/// is refused.
#[test]
fn adapters_with_the_version_1_fingerprint_still_load() {
    let mut m = model("all-MiniLM-L6-v2");
    let legacy = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/legacy/pfeiffer_v1");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(legacy.join("adapter_config.json")).unwrap()).unwrap();
    assert!(saved["base_model"].get("version").is_none(), "the fixture predates fingerprint versions");
    let name = m.load_adapter(&legacy, None).unwrap();
    let adapter = m.adapters().get(&name).unwrap().clone();
    assert_eq!(adapter.kind(), "seq_bn");

    let tmp = std::env::temp_dir().join(format!("bn-legacy-{}", std::process::id()));
    io::save(&tmp.join("again"), &name, adapter.as_ref(), &Placement::default(), &m.fingerprint().unwrap()).unwrap();
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.join("again/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(again["base_model"]["version"], 2);
    assert_ne!(again["base_model"]["weights_checksum"], saved["base_model"]["weights_checksum"]);
    assert!(m.load_adapter(&tmp.join("again"), None).unwrap_err().to_string().contains("already attached"));
    assert_eq!(m.load_adapter(&tmp.join("again"), Some("again")).unwrap(), "again");

    let wrong = tmp.join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(legacy.join("adapter_model.safetensors"), wrong.join("adapter_model.safetensors")).unwrap();
    let mut edited = saved.clone();
    edited["base_model"]["weights_checksum"] = json!("0000000000000000");
    std::fs::write(wrong.join("adapter_config.json"), serde_json::to_vec(&edited).unwrap()).unwrap();
    let e = m.load_adapter(&wrong, None).unwrap_err().to_string();
    assert!(e.contains("was made for the base model"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
}
