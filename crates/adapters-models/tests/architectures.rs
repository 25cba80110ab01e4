//! Every supported architecture against transformers 4.57.6, on the small random-weight
//! models of fixtures/architectures (made by its `make_fixtures.py`): residual stream after
//! each layer, last hidden state, logits at every position, greedy continuation (through
//! our KV cache, one sequence and two at their own positions), encoders' pooler output;
//! decoders' GGUF files (written by the `gguf` package) against the safetensors model.

mod common;

use adapters_core::{ForwardCtx, InsertionPoint};
use adapters_models::generate::{generate, Sampling};
use adapters_models::{load, Backbone, Bert, Llama};
use candle_core::{Device, Tensor};
use common::workspace;
use std::collections::HashMap;
use std::path::PathBuf;

const DECODERS: [(&str, &str); 7] = [
    ("llama3", "llama"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3_text"),
    ("phi3", "phi3"),
];
const ENCODERS: [(&str, &str); 3] = [("roberta", "roberta"), ("xlm-roberta", "xlm-roberta"), ("distilbert", "distilbert")];

fn folder(name: &str) -> PathBuf {
    workspace().join("fixtures/architectures").join(name)
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(folder(name).join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

/// Asserts `got` matches `want` within `tol · max(1, |want|)` element-wise.
fn assert_close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    let (g, w) = (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(g.len(), w.len(), "{what}: {} values, expected {}", g.len(), w.len());
    let (i, err) =
        g.iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .enumerate()
            .fold((0, 0f32), |m, (i, e)| if e > m.1 { (i, e) } else { m });
    assert!(err <= tol, "{what}: value {i} is {}, expected {} (relative error {err:.2e} > {tol:.0e})", g[i], w[i]);
}

fn decoder(path: &std::path::Path) -> Llama {
    match load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display())).backbone {
        Backbone::Llama(m) => m,
        _ => panic!("{} should load as a decoder", path.display()),
    }
}

/// Logits `[seq, vocab]` of one prompt, with no cache.
fn logits(m: &Llama, prompt: &[u32]) -> Tensor {
    let hidden = m.forward_hidden(&row(prompt), None, &ForwardCtx::inference()).unwrap();
    m.logits(&hidden).unwrap().squeeze(0).unwrap()
}

#[test]
fn decoders_match_transformers() {
    for (name, model_type) in DECODERS {
        let m = decoder(&folder(name));
        assert_eq!(m.model_info().architecture, model_type, "{name}");
        let g = golden(name);
        let ctx = ForwardCtx::inference();
        for i in 0..2 {
            let prompt = ids(&g[&format!("prompt_{i}")]);
            for layer in 0..m.num_layers() {
                let h = m.residual_stream(&row(&prompt), layer, &ctx).unwrap().squeeze(0).unwrap();
                assert_close(
                    &h,
                    &g[&format!("hidden_{i}_{layer}")],
                    1e-4,
                    &format!("{name} prompt {i} residual stream after {layer} layers"),
                );
            }
            let last = m.forward_hidden(&row(&prompt), None, &ctx).unwrap().squeeze(0).unwrap();
            assert_close(&last, &g[&format!("last_hidden_{i}")], 1e-4, &format!("{name} prompt {i} last hidden state"));
            assert_close(&logits(&m, &prompt), &g[&format!("logits_{i}")], 1e-4, &format!("{name} prompt {i} logits"));
        }
    }
}

/// Greedy continuations through the KV cache and through per-row caches of two sequences
/// at their own positions; on the f32 weights (random weights leave margins between logits
/// small enough for the 8-bit decoding copies to change a choice).
#[test]
fn decoders_continue_greedily_as_transformers() {
    for (name, _) in DECODERS {
        let mut m = decoder(&folder(name));
        m.dequantize();
        let g = golden(name);
        let prompts: Vec<Vec<u32>> = (0..2).map(|i| ids(&g[&format!("prompt_{i}")])).collect();
        let wanted: Vec<Vec<u32>> = (0..2).map(|i| ids(&g[&format!("greedy_{i}")])).collect();
        for (prompt, want) in prompts.iter().zip(&wanted) {
            let got = generate(&m, prompt, want.len(), &Sampling::Greedy, &[], |_| Ok::<(), adapters_models::Error>(())).unwrap();
            assert_eq!(&got, want, "{name}: greedy continuation of {prompt:?}");
        }
        // Both prompts in one prefill, then steps of both rows at their own positions.
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let (mut last, mut caches) = m.prefill(&refs, &ForwardCtx::inference()).unwrap();
        let mut got = vec![Vec::new(), Vec::new()];
        for _ in 0..wanted[0].len() {
            let next: Vec<u32> = last.argmax(1).unwrap().to_vec1().unwrap();
            for (g, t) in got.iter_mut().zip(&next) {
                g.push(*t);
            }
            let steps: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let tokens: Vec<&[u32]> = steps.iter().map(|s| s.as_slice()).collect();
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            last = m.decode_step(&tokens, &mut refs, &ForwardCtx::inference()).unwrap();
        }
        assert_eq!(got, wanted, "{name}: greedy continuations decoded together");
    }
}

/// Each base weight of the GGUF model within `bound` (a fraction of the tensor's largest
/// magnitude) of the safetensors model's, by Hugging Face name; the same names in both.
fn assert_weights_close(gguf: &Llama, reference: &Llama, bound: f32, what: &str) {
    let want: HashMap<String, Tensor> = reference.named_weights().into_iter().collect();
    // llama.cpp's form of Llama 3's RoPE scaling travels as a tensor; the config says it in
    // the safetensors model (the logits check that both agree).
    let got: HashMap<String, Tensor> = gguf.named_weights().into_iter().filter(|(n, _)| n != "rope_freqs.weight").collect();
    let mut names: Vec<_> = want.keys().collect();
    names.sort();
    assert_eq!(got.len(), want.len(), "{what}: tensors {:?} vs {names:?}", got.keys().collect::<Vec<_>>());
    for name in names {
        let (g, w) = (&got[name], &want[name]);
        let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let err = (g - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= bound * scale, "{what}: `{name}` off by {err} (bound {} of its range {scale})", bound);
    }
}

/// The relative RMS difference of two logit tensors.
fn relative_rms(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    let n = b.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    (d / n).sqrt()
}

/// Logit bounds are relative RMS differences about 1.6x the largest measured over these
/// fixtures (Q8_0 0.020, Q4_0 0.305, Q4_K 0.184): random weights and unit activations make
/// them larger than a trained model's; a layout error (a permutation, a norm's `1 + w`)
/// gives errors near 1.
///
/// GGUF files as llama.cpp lays them out (names, q/k permutation for Llama, `1 + w` norms
/// for Gemma, fused Phi-3 tensors, Llama 3's `rope_freqs`): F32 gives the logits
/// transformers computes for what the file says (`gguf_logits`: Mistral converted as Llama
/// loses its sliding window, Gemma's query scale is head_dim's); Q8_0 and Q4_0 give every
/// weight within the format's rounding and logits near those.
#[test]
fn decoder_gguf_files_load_as_the_safetensors_model() {
    for (name, model_type) in DECODERS {
        let reference = decoder(&folder(name));
        let g = golden(name);
        let prompts = [0, 1];
        let f32_model = decoder(&folder(name).join("model.f32.gguf"));
        let expected_type = if name == "mistral" { "llama" } else { model_type };
        assert_eq!(f32_model.model_info().architecture, expected_type, "{name}");
        assert_weights_close(&f32_model, &reference, 1e-6, &format!("{name} F32 GGUF"));
        for i in prompts {
            let prompt = ids(&g[&format!("prompt_{i}")]);
            assert_close(&logits(&f32_model, &prompt), &g[&format!("gguf_logits_{i}")], 1e-4, &format!("{name} F32 GGUF prompt {i}"));
        }
        for (kind, weight_bound, logit_bound) in [("q8_0", 1.0 / 127.0, 0.04), ("q4_0", 1.0 / 7.0, 0.5)] {
            let quantized = decoder(&folder(name).join(format!("model.{kind}.gguf")));
            assert_weights_close(&quantized, &reference, weight_bound, &format!("{name} {kind}"));
            for i in prompts {
                let prompt = ids(&g[&format!("prompt_{i}")]);
                let err = relative_rms(&logits(&quantized, &prompt), &g[&format!("gguf_logits_{i}")]);
                assert!(err <= logit_bound, "{name} {kind} prompt {i}: logits off by {err:.4} (relative RMS) > {logit_bound}");
            }
        }
    }
}

/// Q4_K (blocks of 256) on a 256-wide Qwen2: its weights within Q4_K's rounding of the F32
/// file's, and logits near transformers'.
#[test]
fn q4_k_gguf_loads_within_its_rounding() {
    let (f32_model, q4k) = (decoder(&folder("qwen2-256").join("model.f32.gguf")), decoder(&folder("qwen2-256").join("model.q4_k.gguf")));
    let g = golden("qwen2-256");
    let prompt = ids(&g["prompt_0"]);
    assert_close(&logits(&f32_model, &prompt), &g["logits_0"], 1e-4, "qwen2-256 F32 GGUF");
    assert_weights_close(&q4k, &f32_model, 1.0 / 7.0, "qwen2-256 Q4_K");
    let err = relative_rms(&logits(&q4k, &prompt), &g["logits_0"]);
    assert!(err <= 0.35, "Q4_K logits off by {err:.4} (relative RMS)");
}

#[test]
fn encoders_match_transformers() {
    for (name, model_type) in ENCODERS {
        let path = folder(name);
        let m: Bert = match load(&path, &Device::Cpu).unwrap().backbone {
            Backbone::Bert(m) => m,
            _ => panic!("{name} should load as an encoder"),
        };
        assert_eq!(m.model_info().architecture, model_type, "{name}");
        let g = golden(name);
        let stack = |key: &str| Tensor::stack(&[&g[&format!("{key}_0")], &g[&format!("{key}_1")]], 0).unwrap();
        let input = stack("prompt").to_dtype(candle_core::DType::U32).unwrap();
        let mask = stack("mask").to_dtype(candle_core::DType::U32).unwrap();
        let ctx = ForwardCtx::inference();
        let hidden = m.forward(&input, None, Some(&mask), &ctx).unwrap();
        for i in 0..2 {
            let valid = g[&format!("mask_{i}")].sum_all().unwrap().to_scalar::<i64>().unwrap() as usize;
            let want = g[&format!("last_hidden_{i}")].narrow(0, 0, valid).unwrap();
            assert_close(&hidden.get(i).unwrap().narrow(0, 0, valid).unwrap(), &want, 1e-4, &format!("{name} row {i} last hidden state"));
        }
        match (m.pooler_output(&hidden, &ctx).unwrap(), g.get("pooler_0")) {
            (Some(p), Some(_)) => assert_close(&p, &stack("pooler"), 1e-4, &format!("{name} pooler output")),
            (None, None) => {}
            (p, w) => panic!("{name}: pooler {} but transformers' {}", p.is_some(), w.is_some()),
        }
    }
}

/// An unsupported `model_type` is refused with the list of supported ones.
#[test]
fn unsupported_architectures_are_refused_with_the_supported_list() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(folder("qwen2").join(file), dir.path().join(file)).unwrap();
    }
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap().replace("\"qwen2\"", "\"falcon\"");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let err = load(dir.path(), &Device::Cpu).err().expect("falcon is refused").to_string();
    for name in ["falcon", "roberta", "distilbert", "qwen3", "gemma3_text", "phi3"] {
        assert!(err.contains(name), "{err}");
    }
}
