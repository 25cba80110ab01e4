//! AdapterHub's fusion reference (two Pfeiffer adapters and a dynamic fusion over them,
//! saved by AdapterHub 1.3.0) loads as it is and reproduces AdapterHub's embeddings with
//! `fuse`, `stack` and `average` active, and its fusion attention weights; the fusion
//! saved in our format and in AdapterHub's loads back to the same outputs.

use adapters_core::{io, ForwardCtx, InsertionPoint, Setup, Site};
use adapters_models::heads::{l2_normalize, mean_pool};
use adapters_models::HoldsAdapters;
use adapters_models::{load, Backbone, Bert};
use adapters_testkit::{json_rows, max_diff_rows, workspace};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;

const TOLERANCE: f32 = 1e-4;

fn reference() -> PathBuf {
    workspace().join("fixtures/interop/adapterhub_fusion_minilm")
}

fn bert() -> Bert {
    let path = workspace().join("models/all-MiniLM-L6-v2");
    assert!(path.exists(), "{} is missing: run `cargo xtask fetch` first", path.display());
    match load(&path, &Device::Cpu).unwrap().backbone {
        Backbone::Bert(b) => b,
        _ => unreachable!(),
    }
}

/// One embedding per sentence (one sentence per forward, as the reference), and the
/// fusion attention weights reported during each forward.
fn run(bert: &Bert, reference: &Value) -> (Vec<Vec<f32>>, Vec<Vec<adapters_core::FusionAttention>>) {
    let mut embeddings = Vec::new();
    let mut attentions = Vec::new();
    for s in reference["sentences"].as_array().unwrap() {
        let ids: Vec<u32> = s["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let ids = Tensor::new(vec![ids], &Device::Cpu).unwrap();
        let mask = ids.ones_like().unwrap();
        let ctx = ForwardCtx::inference().with_fusion_attentions();
        let h = bert.forward(&ids, None, Some(&mask), &ctx).unwrap();
        embeddings.push(l2_normalize(&mean_pool(&h, &mask).unwrap()).unwrap().squeeze(0).unwrap().to_vec1().unwrap());
        attentions.push(ctx.take_aux().fusion_attentions);
    }
    (embeddings, attentions)
}

/// The largest difference from a fixture's rows (shapes checked).
fn max_diff(got: &[Vec<f32>], want: &Value) -> f32 {
    max_diff_rows(got, &json_rows(want))
}

fn activate(bert: &mut Bert, setup: &str) {
    let setup: Option<Setup> = if setup.is_empty() { None } else { Some(setup.parse().unwrap()) };
    bert.adapters_mut().set_setup(setup).unwrap();
}

/// The reference's members attached under their saved names; returns the fusion's name.
fn attach_reference(bert: &mut Bert) -> String {
    for member in ["sentiment", "topic"] {
        let loaded = io::load(&reference().join("adapters").join(member), &*bert, &Device::Cpu).unwrap();
        assert_eq!(loaded.name, member);
        bert.adapters_mut().add(&loaded.name, loaded.adapter).unwrap();
    }
    let fusion = io::load(&reference().join("fusion"), &*bert, &Device::Cpu).unwrap();
    assert_eq!((fusion.format, fusion.adapter.kind()), ("adapterhub-fusion", "fusion"));
    let name = fusion.name.clone();
    bert.adapters_mut().add(&name, fusion.adapter).unwrap();
    name
}

#[test]
fn adapterhub_fusion_reproduces_fuse_stack_average_and_attention() {
    let _ = (adapters_bottleneck::family(), adapters_fusion::family());
    let expected: Value = serde_json::from_slice(&std::fs::read(reference().join("expected.json")).unwrap()).unwrap();
    let want = &expected["expected"];
    let mut bert = bert();
    let fusion = attach_reference(&mut bert);
    assert_eq!(fusion, "sentiment,topic");

    for (setup, key) in [
        ("", "base"),
        ("stack(sentiment, topic)", "stack"),
        ("average(sentiment, topic; weights=0.7, 0.3)", "average"),
        ("fuse(sentiment, topic)", "fuse"),
    ] {
        activate(&mut bert, setup);
        let (got, attentions) = run(&bert, &expected);
        let d = max_diff(&got, &want[key]);
        assert!(d <= TOLERANCE, "{key} ({setup}): max abs diff {d}");
        if key != "fuse" {
            assert!(attentions.iter().all(Vec::is_empty), "{key}: no fusion, no attention reported");
            continue;
        }
        // Attention per sentence, layer and token over the two members.
        let mut worst = 0f32;
        for (sentence, reported) in attentions.iter().enumerate() {
            let layers = want["fusion_attentions"][sentence].as_object().unwrap();
            assert_eq!(reported.len(), layers.len(), "one report per layer");
            for r in reported {
                assert_eq!((r.fusion.as_str(), r.point.site), ("sentiment,topic", Site::FfnOutput));
                let wanted = &layers[&r.point.layer.to_string()]["output_adapter"];
                let got: Vec<Vec<f32>> = r.weights.squeeze(0).unwrap().to_vec2().unwrap();
                worst = worst.max(max_diff(&got, wanted));
            }
        }
        assert!(worst <= TOLERANCE, "fusion attention: max abs diff {worst}");
    }
}

#[test]
fn fusion_saved_ours_and_adapterhubs_way_loads_back_to_the_same_outputs() {
    let _ = (adapters_bottleneck::family(), adapters_fusion::family());
    let expected: Value = serde_json::from_slice(&std::fs::read(reference().join("expected.json")).unwrap()).unwrap();
    let mut bert = bert();
    let name = attach_reference(&mut bert);
    activate(&mut bert, "fuse(sentiment, topic)");
    let (before, _) = run(&bert, &expected);

    let tmp = std::env::temp_dir().join(format!("fusion-roundtrip-{}", std::process::id()));
    let ours = tmp.join("ours");
    let hub = tmp.join("hub");
    let info = bert.model_info();
    let fusion = bert.adapters().get(&name).unwrap().clone();
    let placement = io::load(&reference().join("fusion"), &bert, &Device::Cpu).unwrap().placement;
    io::save(&ours, &name, fusion.as_ref(), &placement, &bert.fingerprint().unwrap()).unwrap();
    adapters_fusion::adapterhub::save(&hub, fusion.as_ref(), &info).unwrap();

    // AdapterHub's layout names the fusion as AdapterHub does (`Fuse("sentiment", "topic")`
    // finds it there); attached here under any name, `fuse(sentiment, topic)` finds it by
    // its members.
    for (dir, attach_as) in [(&ours, "fusion"), (&hub, "sentiment,topic")] {
        bert.adapters_mut().set_setup(None).unwrap();
        let attached: Vec<String> = bert.adapters().names().iter().map(|n| n.to_string()).collect();
        for n in attached.iter().filter(|n| *n == &name || n.as_str() == "fusion") {
            bert.adapters_mut().remove(n).unwrap();
        }
        let loaded = io::load(dir, &bert, &Device::Cpu).unwrap();
        if dir == &hub {
            assert_eq!(loaded.name, "sentiment,topic");
        }
        bert.adapters_mut().add(attach_as, loaded.adapter).unwrap();
        activate(&mut bert, "fuse(sentiment, topic)");
        let (after, _) = run(&bert, &expected);
        let d = max_diff(&after, &serde_json::to_value(&before).unwrap());
        assert_eq!(d, 0.0, "{}: outputs changed after the round trip", dir.display());
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn fusion_errors_name_what_is_wrong() {
    let _ = (adapters_bottleneck::family(), adapters_fusion::family());
    let mut bert = bert();
    attach_reference(&mut bert);
    let err = |setup: &str, bert: &mut Bert| bert.adapters_mut().set_setup(Some(setup.parse().unwrap())).unwrap_err().to_string();
    assert!(err("fuse(sentiment, nope)", &mut bert).contains("no adapter named `nope`"));
    // The members in another order: no fusion over them, and the error lists what there is.
    let e = err("fuse(topic, sentiment)", &mut bert);
    assert!(e.contains("no fusion layer over [topic, sentiment]") && e.contains("`sentiment,topic` over [sentiment, topic]"), "{e}");
    // A fusion layer is named after its members (commas), so it cannot be a plain member
    // of a setup; it runs only inside `fuse(...)`.
    let e = bert.adapters_mut().activate(&["sentiment,topic"]).unwrap_err().to_string();
    assert!(e.contains("not a usable adapter name"), "{e}");
    let ids = Tensor::new(&[[101u32, 102]], &Device::Cpu).unwrap();
    let base = bert.forward(&ids, None, None, &ForwardCtx::inference()).unwrap();
    assert_eq!(base.dims(), [1, 2, 384], "a refused setup leaves the model as it was");
}
