//! SmolLM2-135M-Instruct (GGUF) against the PyTorch reference outputs in
//! fixtures/golden/smollm2.json, against candle-transformers' quantized llama, and the
//! same model loaded back from a Hugging Face safetensors folder.

mod common;

use adapters_core::ForwardCtx;
use adapters_models::generate::{generate, Sampling};
use adapters_models::{load, Backbone, Llama, Message, TextTokenizer};
use candle_core::{Device, Tensor};
use common::*;
use std::sync::OnceLock;

/// The model as `load` gives it: decoding steps run on 8-bit copies of the projections.
fn model() -> &'static (Llama, TextTokenizer) {
    static MODEL: OnceLock<(Llama, TextTokenizer)> = OnceLock::new();
    MODEL.get_or_init(loaded)
}

fn loaded() -> (Llama, TextTokenizer) {
    let loaded = load(&smollm(), &Device::Cpu).unwrap();
    match loaded.backbone {
        Backbone::Llama(m) => (m, loaded.tokenizer),
        _ => panic!("SmolLM2 should load as Llama"),
    }
}

fn last_logits(m: &Llama, ids: &[u32], ctx: &ForwardCtx) -> Vec<f32> {
    let ids = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.last_logits(&ids, None, ctx).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

/// Checks logits against a reference summary (top-20 by id, mean, std), with the
/// tolerance of fixtures/golden/README.md: 1e-3 * max(1, |expected|).
fn assert_logits_match(got: &[f32], want: &serde_json::Value, what: &str) {
    let tol = |e: f32| 1e-3 * e.abs().max(1.0);
    for pair in want["top20"].as_array().unwrap() {
        let (id, e) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
        assert!((got[id] - e).abs() <= tol(e), "{what}: logit of token {id} is {}, expected {e}", got[id]);
    }
    let n = got.len() as f64;
    let mean = got.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (got.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let (em, es) = (want["mean"].as_f64().unwrap(), want["std"].as_f64().unwrap());
    assert!((mean - em).abs() <= tol(em as f32) as f64, "{what}: mean {mean} vs {em}");
    assert!((std - es).abs() <= tol(es as f32) as f64, "{what}: std {std} vs {es}");
    let argmax = got.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(argmax as u64, want["argmax"].as_u64().unwrap(), "{what}: argmax");
}

#[test]
fn token_ids_and_chat_template_match() {
    let (_, tok) = model();
    let golden = fixture("golden/smollm2.json");
    for p in golden["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&p["input_ids"]), "prompt {}", p["name"]);
        if let Some(messages) = p["messages"].as_array() {
            let messages: Vec<Message> = messages
                .iter()
                .map(|m| Message { role: m["role"].as_str().unwrap().into(), content: m["content"].as_str().unwrap().into() })
                .collect();
            assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), text);
        }
    }
}

#[test]
fn last_position_logits_and_hidden_states_match() {
    let (m, _) = model();
    let golden = fixture("golden/smollm2.json");
    for p in golden["prompts"].as_array().unwrap() {
        let ids = ids(&p["input_ids"]);
        let got = last_logits(m, &ids, &ForwardCtx::inference());
        assert_logits_match(&got, &p["last_position_logits"], p["name"].as_str().unwrap());
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        for (layers, key) in [(0, "hidden_after_embedding_last_pos_first32"), (1, "hidden_after_layer0_last_pos_first32")] {
            let h = m.residual_stream(&input, layers, &ForwardCtx::inference()).unwrap();
            let last: Vec<f32> = h.get(0).unwrap().get(ids.len() - 1).unwrap().narrow(0, 0, 32).unwrap().to_vec1().unwrap();
            let d = max_abs_diff(&last, &floats(&p[key]));
            assert!(d <= 1e-4, "{}: {key} differs by {d}", p["name"]);
        }
        // The differentiable training path computes the same logits.
        let train = last_logits(m, &ids, &ForwardCtx::training());
        assert!(max_abs_diff(&got, &train) < 1e-3, "training path differs by {}", max_abs_diff(&got, &train));
    }
}

#[test]
fn greedy_continuations_match_with_the_kv_cache() {
    let (m, _) = model();
    let golden = fixture("golden/smollm2.json");
    for p in golden["prompts"].as_array().unwrap() {
        let want = ids(&p["greedy_continuation"]["new_token_ids"]);
        let got = generate(m, &ids(&p["input_ids"]), want.len(), &Sampling::Greedy, &[], |_| Ok::<(), adapters_models::Error>(())).unwrap();
        assert_eq!(got, want, "prompt {}", p["name"]);
    }
}

#[test]
fn sampling_is_seeded_and_stops_at_eos() {
    let (m, tok) = model();
    let prompt = tok.encode("Once upon a time", false).unwrap();
    let s = Sampling::Sample { temperature: 0.8, top_p: 0.9, seed: 5 };
    let a = generate(m, &prompt, 8, &s, &[], |_| Ok::<(), adapters_models::Error>(())).unwrap();
    let b = generate(m, &prompt, 8, &s, &[], |_| Ok::<(), adapters_models::Error>(())).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 8);
    let stop = a[2];
    let c = generate(m, &prompt, 8, &s, &[stop], |_| Ok::<(), adapters_models::Error>(())).unwrap();
    assert_eq!(c.len(), a.iter().position(|&t| t == stop).unwrap() + 1);
}

#[test]
fn agrees_with_candle_transformers_quantized_llama() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let (m, tok) = model();
    let path = smollm();
    let mut file = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
    let ids = tok.encode("The capital of France is", false).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let want: Vec<f32> = reference.forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    let got = last_logits(m, &ids, &ForwardCtx::inference());
    // The reference multiplies with quantised weights and 8-bit activations, so only
    // the ranking and the rough values can agree.
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(argmax(&got), argmax(&want));
    let d = max_abs_diff(&got, &want);
    assert!(d < 1.0, "max abs logit difference to quantized llama: {d}");
}

#[test]
fn hugging_face_folder_round_trip_gives_the_same_model() {
    let (m, tok) = model();
    let dir = std::env::temp_dir().join(format!("smollm2-hf-{}", std::process::id()));
    m.save_hf_weights(&dir).unwrap();
    tok.save_folder(&dir).unwrap();
    let loaded = load(&dir, &Device::Cpu).unwrap();
    let Backbone::Llama(m2) = &loaded.backbone else { panic!("folder should load as Llama") };
    let text = "def add(a, b):\n    return a + b";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(loaded.tokenizer.encode(text, false).unwrap(), ids);
    assert_eq!(loaded.tokenizer.chat_template, tok.chat_template);
    let a = last_logits(m, &ids, &ForwardCtx::inference());
    let b = last_logits(m2, &ids, &ForwardCtx::inference());
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir).ok();
}

/// Decoding on the 8-bit weight copies against the f32 weights, teacher-forced along each
/// golden prompt's greedy continuation (60 steps): the top token agrees at every step and
/// no logit (of 49152, logits are ~10-30) moves by more than 2.0. Measured: 1.40 at worst,
/// mean 0.1. For scale: candle's own GGUF inference (Q4_1 weights, 8-bit activations)
/// differs from the same f32 weights by up to ~1.0 (test above). The f32 path is the one
/// that matches PyTorch to 1e-3.
#[test]
fn int8_decoding_stays_close_to_the_f32_weights() {
    let (int8_model, _) = model();
    let (mut f32_model, _) = loaded();
    f32_model.dequantize();
    let golden = fixture("golden/smollm2.json");
    let ctx = ForwardCtx::inference();
    let (mut worst, mut total, mut steps) = (0f32, 0f64, 0);
    for p in golden["prompts"].as_array().unwrap() {
        let prompt = ids(&p["input_ids"]);
        let continuation = ids(&p["greedy_continuation"]["new_token_ids"]);
        let (mut ca, mut cb) = (f32_model.new_cache(), int8_model.new_cache());
        let f32_model = &f32_model;
        let mut input = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        for &next in &continuation {
            let a: Vec<f32> = f32_model.last_logits(&input, Some(&mut ca), &ctx).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = int8_model.last_logits(&input, Some(&mut cb), &ctx).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
            let argmax = |v: &[f32]| v.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
            assert_eq!(argmax(&a), argmax(&b), "prompt {}: top token differs at step {steps}", p["name"]);
            worst = worst.max(max_abs_diff(&a, &b));
            total += a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / a.len() as f64;
            steps += 1;
            input = Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        }
    }
    eprintln!("int8 decoding: worst logit difference {worst:.4}, mean {:.4}, over {steps} steps", total / steps as f64);
    assert!(worst < 2.0, "int8 decoding: logits differ from the f32 weights' by up to {worst}");
}
