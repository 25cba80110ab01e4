//! The AdapterHub folders in fixtures/interop load onto our MiniLM and reproduce the
//! embeddings AdapterHub computed; saving (ours and AdapterHub's layout) and loading back
//! gives the same outputs; bad folders give clear errors and leave the model unchanged.

use adapters_core::{io, ForwardCtx, InsertionPoint};
use adapters_models::heads::{l2_normalize, mean_pool};
use adapters_models::HoldsAdapters;
use adapters_models::{load, Backbone, Bert};
use adapters_testkit::{json_rows, max_diff_rows, workspace};
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn bert() -> Bert {
    let path = workspace().join("models/all-MiniLM-L6-v2");
    assert!(path.exists(), "{} is missing: run `cargo xtask fetch` first", path.display());
    match load(&path, &Device::Cpu).unwrap().backbone {
        Backbone::Bert(b) => b,
        _ => unreachable!(),
    }
}

fn interop(name: &str) -> (PathBuf, serde_json::Value) {
    let dir = workspace().join("fixtures/interop").join(name);
    let expected = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    (dir.join("adapter"), expected)
}

fn embeddings(bert: &Bert, expected: &serde_json::Value) -> Vec<Vec<f32>> {
    expected["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids: Vec<u32> = s["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let ids = Tensor::new(vec![ids], &Device::Cpu).unwrap();
            let mask = ids.ones_like().unwrap();
            let h = bert.forward(&ids, None, Some(&mask), &ForwardCtx::inference()).unwrap();
            l2_normalize(&mean_pool(&h, &mask).unwrap()).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
        })
        .collect()
}

/// The largest difference from a fixture's rows (shapes checked).
fn max_diff(got: &[Vec<f32>], want: &serde_json::Value) -> f32 {
    max_diff_rows(got, &json_rows(want))
}

fn attach(bert: &mut Bert, loaded: io::Loaded) {
    let name = loaded.name.clone();
    bert.adapters_mut().add(&name, loaded.adapter).unwrap();
    bert.adapters_mut().activate(&[&name]).unwrap();
}

#[test]
fn every_adapterhub_folder_reproduces_its_outputs_and_round_trips() {
    let _ = adapters_bottleneck::family();
    let mut bert = bert();
    let info = bert.model_info();
    let fp = bert.fingerprint().unwrap();
    for (folder, kind) in [
        ("adapterhub_seq_bn_minilm", "seq_bn"),
        ("adapterhub_par_bn_minilm", "par_bn"),
        ("adapterhub_double_seq_bn_minilm", "double_seq_bn"),
    ] {
        let (dir, expected) = interop(folder);
        let loaded = io::load(&dir, &bert, &Device::Cpu).unwrap();
        assert_eq!(loaded.format, "adapterhub");
        assert_eq!(loaded.adapter.kind(), kind);
        assert_eq!(loaded.adapter.num_parameters() as u64, expected["num_adapter_parameters"].as_u64().unwrap(), "{folder}");
        let name = loaded.name.clone();
        let placement = loaded.placement.clone();
        attach(&mut bert, loaded);
        let got = embeddings(&bert, &expected);
        let d = max_diff(&got, &expected["expected_embeddings"]);
        assert!(d <= 1e-4, "{folder}: max abs diff {d}");

        // Saved in both layouts and loaded back: the same outputs.
        let adapter = bert.adapters().get(&name).unwrap().clone();
        let tmp = std::env::temp_dir().join(format!("hub-{folder}-{}", std::process::id()));
        for layout in ["adapterhub", "ours"] {
            let out = tmp.join(layout);
            match layout {
                "adapterhub" => adapters_bottleneck::adapterhub::save(&out, &name, adapter.as_ref(), &placement, &info).unwrap(),
                _ => io::save(&out, &name, adapter.as_ref(), &placement, &fp).unwrap(),
            }
            let again = io::load(&out, &bert, &Device::Cpu).unwrap();
            bert.adapters_mut().remove(&name).unwrap();
            attach(&mut bert, again);
            assert_eq!(embeddings(&bert, &expected), got, "{folder} via {layout}");
        }
        bert.adapters_mut().remove(&name).unwrap();
        let base = embeddings(&bert, &expected);
        assert!(max_diff(&base, &expected["base_embeddings"]) <= 1e-4);
        std::fs::remove_dir_all(&tmp).ok();
    }
}
