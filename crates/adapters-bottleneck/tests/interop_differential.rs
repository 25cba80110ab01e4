//! Differential interop: the adapters in fixtures/interop/differential, drawn from a fixed
//! seed over every supported field of AdapterHub's `BnConfig` and PEFT's `LoraConfig` /
//! `IA3Config` and saved by those libraries (`make_differential.py`), load here and
//! reproduce the libraries' outputs within 1e-5 on MiniLM, and within 1e-4 on SmolLM2, whose
//! 30 layers end in mean hidden states of up to 35 (1e-4 is 3e-6 of that); the refused ones
//! fail with an error that names the option.

use adapters_core::{io, ForwardCtx};
use adapters_models::HoldsAdapters;
use adapters_models::{load, Backbone, Bert, Llama};
use adapters_testkit::workspace;
use candle_core::{Device, Tensor};

fn bert() -> Bert {
    match load(&adapters_testkit::minilm(), &Device::Cpu).unwrap().backbone {
        Backbone::Bert(b) => b,
        _ => unreachable!(),
    }
}

/// SmolLM2 with its weights in f32 only (no 8-bit decoding copies), as transformers
/// de-quantises the GGUF file.
fn smollm2() -> Llama {
    match load(&adapters_testkit::smollm(), &Device::Cpu).unwrap().backbone {
        Backbone::Llama(mut l) => {
            l.dequantize();
            l
        }
        _ => unreachable!(),
    }
}

/// Per sentence (each alone, unpadded), the mean over tokens of the last hidden state.
fn mean_hidden(model: &Backbone, sentences: &[Vec<u32>]) -> Vec<Vec<f32>> {
    sentences
        .iter()
        .map(|ids| {
            let ids = Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap();
            let mask = ids.ones_like().unwrap();
            let h = match model {
                Backbone::Bert(b) => b.forward(&ids, None, Some(&mask), &ForwardCtx::inference()).unwrap(),
                Backbone::Llama(l) => l.forward_hidden(&ids, None, &ForwardCtx::inference()).unwrap(),
            };
            h.mean(1).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
        })
        .collect()
}

fn token_rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(|s| s["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()).collect()
}

#[test]
fn adapterhub_and_peft_configurations_compute_as_their_libraries_or_are_refused_by_name() {
    let _ = (adapters_bottleneck::family(), adapters_lora::family());
    let dir = workspace().join("fixtures/interop/differential");
    let fixture: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    let sentences = token_rows(&fixture["sentences"]);
    let smollm2_sentences = token_rows(&fixture["smollm2_sentences"]);
    let mut models = [Backbone::Bert(bert()), Backbone::Llama(smollm2())];
    let mut failures = Vec::new();
    let (mut worst, mut worst_decoder) = ((0f32, String::new()), (0f32, String::new()));
    let mut counts = std::collections::BTreeMap::<(String, &str), usize>::new();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let library = case["library"].as_str().unwrap().to_string();
        let decoder = case["model"] == "smollm2";
        let (model, sentences, tolerance) =
            if decoder { (&mut models[1], &smollm2_sentences, 1e-4) } else { (&mut models[0], &sentences, 1e-5) };
        let loaded = io::load(&dir.join(name), &*model, &Device::Cpu);
        match (loaded, case.get("refused").and_then(|r| r.as_str())) {
            (Ok(loaded), None) => {
                *counts.entry((library, "supported")).or_default() += 1;
                let key = format!("case-{name}");
                model.adapters_mut().add(&key, loaded.adapter).unwrap();
                model.adapters_mut().activate(&[&key]).unwrap();
                let got = mean_hidden(model, sentences);
                model.adapters_mut().remove(&key).unwrap();
                let want = adapters_testkit::json_rows(&case["expected"]);
                let d = adapters_testkit::max_diff_rows(&got, &want);
                let worst = if decoder { &mut worst_decoder } else { &mut worst };
                if d > worst.0 {
                    *worst = (d, name.to_string());
                }
                if d > tolerance {
                    failures.push(format!("{name}: max abs difference {d:.2e} (config {})", case["config"]));
                }
            }
            (Err(e), Some(field)) => {
                *counts.entry((library, "refused")).or_default() += 1;
                // The folder's own path names the option too: look past it.
                let message = e.to_string().replace(&dir.join(name).display().to_string(), "FOLDER");
                if !message.contains(field) {
                    failures.push(format!("{name}: refused, but the error does not name `{field}`: {e}"));
                }
            }
            (Ok(_), Some(field)) => failures.push(format!("{name}: loaded, but `{field}` should be refused")),
            (Err(e), None) => failures.push(format!("{name}: failed to load: {e}")),
        }
    }
    println!(
        "differential interop: {counts:?}; worst difference MiniLM {:.2e} ({}), SmolLM2 {:.2e} ({})",
        worst.0, worst.1, worst_decoder.0, worst_decoder.1
    );
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), fixture["cases"].as_array().unwrap().len(), failures.join("\n"));
    for library in ["adapterhub", "peft"] {
        assert!(counts[&(library.to_string(), "supported")] >= 40, "{library}: fewer than 40 supported cases");
    }
}
