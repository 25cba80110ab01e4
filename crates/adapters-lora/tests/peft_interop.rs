//! PEFT LoRA folders in fixtures/interop reproduce PEFT's outputs on our MiniLM and
//! SmolLM2; our LoRA adapters save as PEFT folders and load back; merging equals the
//! unmerged forward; fresh LoRA and IA3 adapters leave the model unchanged.

use adapters_core::{io, registry, ForwardCtx, InsertionPoint, Placement};
use adapters_models::heads::{l2_normalize, mean_pool};
use adapters_models::HoldsAdapters;
use adapters_models::{load, Backbone};
use adapters_testkit::{max_diff_rows as max_diff, workspace};
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn model(name: &str) -> Backbone {
    let path = workspace().join("models").join(name);
    assert!(path.exists(), "{} is missing: run `cargo xtask fetch` first", path.display());
    load(&path, &Device::Cpu).unwrap().backbone
}

fn interop(name: &str) -> (PathBuf, serde_json::Value) {
    let dir = workspace().join("fixtures/interop").join(name);
    (dir.join("adapter"), serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap())
}

fn ids(v: &serde_json::Value) -> Tensor {
    let ids: Vec<u32> = v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    Tensor::new(vec![ids], &Device::Cpu).unwrap()
}

fn bert_embeddings(m: &Backbone, expected: &serde_json::Value) -> Vec<Vec<f32>> {
    let Backbone::Bert(b) = m else { unreachable!() };
    expected["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids = ids(&s["input_ids"]);
            let mask = ids.ones_like().unwrap();
            let h = b.forward(&ids, None, Some(&mask), &ForwardCtx::inference()).unwrap();
            l2_normalize(&mean_pool(&h, &mask).unwrap()).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
        })
        .collect()
}

fn to_vecs(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn attach(m: &mut Backbone, loaded: io::Loaded) -> String {
    let name = loaded.name.clone();
    m.adapters_mut().add(&name, loaded.adapter).unwrap();
    m.adapters_mut().activate(&[&name]).unwrap();
    name
}

#[test]
fn peft_minilm_reproduces_peft_and_round_trips_and_merges() {
    let _ = adapters_lora::family();
    let mut m = model("all-MiniLM-L6-v2");
    let (info, fp) = (m.model_info(), m.fingerprint().unwrap());
    let (dir, expected) = interop("peft_lora_minilm");
    let loaded = io::load(&dir, &m, &Device::Cpu).unwrap();
    assert_eq!((loaded.format, loaded.adapter.kind()), ("peft", "lora"));
    assert_eq!(loaded.adapter.num_parameters() as u64, expected["num_adapter_parameters"].as_u64().unwrap());
    let name = attach(&mut m, loaded);
    let got = bert_embeddings(&m, &expected);
    let d = max_diff(&got, &to_vecs(&expected["expected_embeddings"]));
    assert!(d <= 1e-4, "max abs diff to PEFT: {d}");

    // Saved as PEFT and as ours, loaded back: identical outputs.
    let adapter = m.adapters().get(&name).unwrap().clone();
    let tmp = std::env::temp_dir().join(format!("peft-rt-{}", std::process::id()));
    adapters_lora::peft::save(&tmp.join("peft"), adapter.as_ref(), &info, "all-MiniLM-L6-v2").unwrap();
    let placement = Placement { sites: vec![adapters_core::Site::Query, adapters_core::Site::Value], ..Default::default() };
    io::save(&tmp.join("ours"), &name, adapter.as_ref(), &placement, &fp).unwrap();
    for layout in ["peft", "ours"] {
        m.adapters_mut().remove(&name).unwrap();
        let again = io::load(&tmp.join(layout), &m, &Device::Cpu).unwrap();
        m.adapters_mut().add(&name, again.adapter).unwrap();
        m.adapters_mut().activate(&[&name]).unwrap();
        assert_eq!(bert_embeddings(&m, &expected), got, "via {layout}");
    }
    std::fs::remove_dir_all(&tmp).ok();

    // Merge: the same outputs without the hooks; unmerge: the base model again.
    m.merge(&name).unwrap();
    assert!(m.adapters().active().is_empty());
    let merged = bert_embeddings(&m, &expected);
    assert!(max_diff(&merged, &got) <= 1e-5, "merged differs by {}", max_diff(&merged, &got));
    m.unmerge(&name).unwrap();
    let base = bert_embeddings(&m, &expected);
    assert!(max_diff(&base, &to_vecs(&expected["base_embeddings"])) <= 1e-4);
}

#[test]
fn peft_smollm2_reproduces_peft_logits() {
    let mut m = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let (_info, _fp) = (m.model_info(), m.fingerprint().unwrap());
    let (dir, expected) = interop("peft_lora_smollm2");
    let loaded = io::load(&dir, &m, &Device::Cpu).unwrap();
    assert_eq!(loaded.adapter.num_parameters() as u64, expected["num_adapter_parameters"].as_u64().unwrap());
    let name = attach(&mut m, loaded);
    let check = |m: &Backbone| {
        let Backbone::Llama(l) = m else { unreachable!() };
        for p in expected["prompts"].as_array().unwrap() {
            let logits: Vec<f32> =
                l.last_logits(&ids(&p["input_ids"]), None, &ForwardCtx::inference()).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
            for pair in p["expected_last_position_logits"]["top20"].as_array().unwrap() {
                let (id, e) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
                assert!((logits[id] - e).abs() <= 1e-3 * e.abs().max(1.0), "{}: token {id}: {} vs {e}", p["name"], logits[id]);
            }
        }
    };
    check(&m);
    m.merge(&name).unwrap();
    check(&m);
}

#[test]
fn fresh_lora_and_ia3_leave_the_model_unchanged_and_ia3_then_changes_it() {
    let mut m = model("all-MiniLM-L6-v2");
    let (_, expected) = interop("peft_lora_minilm");
    let info = m.model_info();
    let base = bert_embeddings(&m, &expected);
    for kind in ["lora", "ia3"] {
        let a = registry::build(kind, &serde_json::json!({}), &Placement::default(), &info, &Device::Cpu, 1).unwrap();
        m.adapters_mut().add(kind, a).unwrap();
        m.adapters_mut().activate(&[kind]).unwrap();
        assert!(max_diff(&bert_embeddings(&m, &expected), &base) <= 1e-6, "{kind}");
    }
    let ia3 = m.adapters().get("ia3").unwrap().clone();
    for (_, v) in ia3.vars() {
        v.set(&(v.as_tensor() * 1.5).unwrap()).unwrap();
    }
    assert!(max_diff(&bert_embeddings(&m, &expected), &base) > 1e-3);
    assert!(m.merge("ia3").is_err(), "IA3 is not mergeable here");
    assert!(m.adapters().active().contains(&"ia3".to_string()));
}

#[test]
fn rank_overrides_rslora_and_bad_configs() {
    let m = model("all-MiniLM-L6-v2");
    let info = m.model_info();
    let placement: Placement = serde_json::from_str(r#"{"layers":[0,5],"sizes":{"5":4},"sites":["query","ffn_up"]}"#).unwrap();
    let config = serde_json::json!({"r": 8, "alpha": 16, "use_rslora": true, "rank_pattern": {"encoder.layer.0.intermediate.dense": 2}});
    let a = registry::build("lora", &config, &placement, &info, &Device::Cpu, 0).unwrap();
    // layer 0 query: r 8 -> 2*(384*8); layer 0 ffn_up: r 2 -> 2*384+2*1536... computed exactly:
    let expected = 8 * (384 + 384) + 2 * (384 + 1536) + 4 * (384 + 384) + 4 * (384 + 1536);
    assert_eq!(a.num_parameters(), expected);
    let e =
        registry::build("lora", &serde_json::json!({"rank": 4}), &Placement::default(), &info, &Device::Cpu, 0).err().unwrap().to_string();
    assert!(e.contains("rank") && e.contains("lora"), "{e}");
    let e = registry::build(
        "lora",
        &serde_json::json!({}),
        &serde_json::from_str::<Placement>(r#"{"sites":["ffn_output"]}"#).unwrap(),
        &info,
        &Device::Cpu,
        0,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("ffn_output"), "{e}");
}

/// Hidden states of two right-padded rows, with or without per-row adapter choices.
fn two_rows(m: &Backbone, choices: Option<&[Vec<String>]>) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
    let ids = Tensor::new(&[[1u32, 2054, 2003, 2023], [1, 2023, 2003, 1037]], &Device::Cpu)?;
    let mask = ids.ones_like()?;
    let mut ctx = ForwardCtx::inference();
    if let Some(choices) = choices {
        ctx = ctx.with_row_choices(choices, &Device::Cpu)?;
    }
    m.hidden_states(&ids, &mask, &ctx)?.to_vec3::<f32>()
}

/// A merged LoRA lives in the shared base weights, so per-row choices are refused while it
/// is merged (a row naming it would get it twice, a base row would get it too); once
/// unmerged, each row gets exactly what it asked for. On both backbones.
#[test]
fn row_choices_are_refused_while_an_adapter_is_merged() {
    let _ = adapters_lora::family();
    for (name, folder) in [("all-MiniLM-L6-v2", "peft_lora_minilm"), ("SmolLM2-135M-Instruct.Q4_1.gguf", "peft_lora_smollm2")] {
        let mut m = model(name);
        let lora = m.load_adapter(&interop(folder).0, None).unwrap();
        let base = two_rows(&m, None).unwrap();
        m.adapters_mut().activate(&[&lora]).unwrap();
        let adapted = two_rows(&m, None).unwrap();
        assert!(max_diff(&adapted[0], &base[0]) > 1e-4, "{name}: the LoRA changes nothing");
        m.adapters_mut().activate(&[]).unwrap();

        m.merge(&lora).unwrap();
        let merged = two_rows(&m, None).unwrap();
        assert!(max_diff(&merged[0], &adapted[0]) < 1e-3, "{name}: merged differs from unmerged");
        let rows = [vec![lora.clone()], vec![]];
        for choices in [&rows[..], &[vec![], vec![]][..]] {
            let e = two_rows(&m, Some(choices)).unwrap_err().to_string();
            assert!(e.contains("merged") && e.contains(&lora) && e.contains("unmerge"), "{name}: {e}");
        }

        m.unmerge(&lora).unwrap();
        let mixed = two_rows(&m, Some(&rows)).unwrap();
        assert!(max_diff(&mixed[0], &adapted[0]) < 1e-4, "{name}: the LoRA row");
        assert!(max_diff(&mixed[1], &base[1]) < 1e-4, "{name}: the base row");
    }
}

/// A PEFT LoRA on every `dense` module (`target_modules=["dense"]`: the attention and FFN
/// output projections and BERT's `pooler.dense`) loads, reproduces PEFT's embeddings and
/// `pooler_output`, and merging it changes the pooler as PEFT's `merge_and_unload` does;
/// the merged model folder keeps the pooler.
#[test]
fn a_lora_on_the_pooler_loads_reproduces_peft_and_merges_into_the_pooler() {
    let _ = adapters_lora::family();
    let (dir, expected) = interop("peft_lora_dense_minilm");
    let mut m = model("all-MiniLM-L6-v2");
    let loaded = io::load(&dir, &m, &Device::Cpu).unwrap();
    assert!(loaded.adapter.points().iter().any(|p| p.site == adapters_core::Site::Pooler));
    let name = attach(&mut m, loaded);
    let want: Vec<Vec<f32>> =
        expected["sentences"].as_array().unwrap().iter().map(|s| to_vecs(&serde_json::json!([s["embedding"]]))[0].clone()).collect();
    let d = max_diff(&bert_embeddings(&m, &expected), &want);
    assert!(d <= 1e-4, "embeddings: max abs diff {d}");
    let pooled = |m: &Backbone| -> Vec<Vec<f32>> {
        let Backbone::Bert(b) = m else { unreachable!() };
        expected["sentences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let ids = ids(&s["input_ids"]);
                let h = b.forward(&ids, None, None, &ForwardCtx::inference()).unwrap();
                b.pooler_output(&h, &ForwardCtx::inference()).unwrap().unwrap().squeeze(0).unwrap().to_vec1().unwrap()
            })
            .collect()
    };
    let want_pooled: Vec<Vec<f32>> =
        expected["sentences"].as_array().unwrap().iter().map(|s| to_vecs(&serde_json::json!([s["pooler_output"]]))[0].clone()).collect();
    let d = max_diff(&pooled(&m), &want_pooled);
    assert!(d <= 1e-4, "pooler_output: max abs diff {d}");

    m.merge(&name).unwrap();
    let d = max_diff(&pooled(&m), &want_pooled);
    assert!(d <= 1e-4, "pooler_output after merging: max abs diff {d}");
    let weights: std::collections::HashMap<String, Tensor> = m.named_weights().into_iter().collect();
    let pooler = weights["pooler.dense.weight"].to_vec2::<f32>().unwrap();
    for (row, want) in expected["merged_pooler_weight_rows"].as_object().unwrap() {
        let want: Vec<f32> = want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let d = max_diff(&[pooler[row.parse::<usize>().unwrap()].clone()], &[want]);
        assert!(d <= 1e-5, "merged pooler row {row}: {d}");
    }
}
