//! The packed (QLoRA-style) base in every block format the fixtures' GGUF files hold: Q8_0
//! and Q4_0 (Llama 3 with tied embeddings, Qwen3 with its own output layer) and Q4_K (the
//! 256-wide Qwen2), each against the same file de-quantised: the same logits, probe
//! gradients and language-model loss, in a fraction of the bytes. And Q8_0 made at load
//! from a safetensors folder, within its rounding.

mod common;

use adapters_core::{ForwardCtx, InsertionPoint};
use adapters_models::HoldsAdapters;
use adapters_models::{load_with, Backbone, BaseWeights, Llama};
use candle_core::{Device, Tensor};
use common::*;
use std::path::PathBuf;

fn fixture_file(rel: &str) -> PathBuf {
    workspace().join("fixtures/architectures").join(rel)
}

fn llama(path: &std::path::Path, base: BaseWeights) -> Llama {
    match load_with(path, &Device::Cpu, base).unwrap().backbone {
        Backbone::Llama(mut m) => {
            m.dequantize(); // full forwards only: no 8-bit decoding copies
            m
        }
        _ => unreachable!(),
    }
}

fn prompt() -> Tensor {
    Tensor::new(&[[1u32, 5, 100, 259, 7, 42, 200, 3, 18, 77]], &Device::Cpu).unwrap()
}

fn relative(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12)
}

/// Logits, the next-token loss through the output layer's own path, and each probe
/// variable's gradient of the two together.
fn outputs(mut m: Llama) -> (Tensor, Tensor, Vec<Tensor>) {
    let probe = Probe::everywhere(&m.model_info(), &Device::Cpu).unwrap();
    m.adapters_mut().add("probe", Box::new(probe)).unwrap();
    m.adapters_mut().activate(&["probe"]).unwrap();
    let hidden = m.forward_hidden(&prompt(), None, &ForwardCtx::training()).unwrap();
    let logits = m.logits(&hidden).unwrap();
    let (t, h) = (prompt().dim(1).unwrap(), m.config.hidden_size);
    let rows = hidden.narrow(1, 0, t - 1).unwrap().reshape((t - 1, h)).unwrap();
    let targets = prompt().narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let loss = m.output_cross_entropy(&rows, &targets).unwrap();
    let objective = (candle_nn::ops::log_softmax(&logits, 2).unwrap().mean_all().unwrap() + &loss).unwrap();
    let grads = objective.backward().unwrap();
    let vars = m.adapters().active_vars();
    (logits, loss, vars.iter().map(|(_, v)| grads.get(v.as_tensor()).expect("a gradient").clone()).collect())
}

#[test]
fn packed_gguf_blocks_compute_and_train_as_the_dequantized_file() {
    for (file, bytes_bound) in [
        ("llama3/model.q8_0.gguf", 0.3),
        ("llama3/model.q4_0.gguf", 0.17),
        ("qwen3/model.q8_0.gguf", 0.3),
        ("qwen3/model.q4_0.gguf", 0.17),
        ("qwen2-256/model.q4_k.gguf", 0.17),
    ] {
        let path = fixture_file(file);
        let (dense, packed) = (llama(&path, BaseWeights::F32), llama(&path, BaseWeights::Packed));
        let ratio = packed.weight_bytes() as f64 / dense.weight_bytes() as f64;
        assert!(ratio < bytes_bound, "{file}: packed takes {ratio:.3} of the f32 bytes");
        let ((want, want_loss, want_grads), (got, got_loss, got_grads)) = (outputs(dense), outputs(packed));
        assert!(relative(&got, &want) < 1e-4, "{file}: logits differ by {}", relative(&got, &want));
        assert!(relative(&got_loss, &want_loss) < 1e-5, "{file}: the loss differs by {}", relative(&got_loss, &want_loss));
        assert_eq!(got_grads.len(), want_grads.len());
        for (g, w) in got_grads.iter().zip(&want_grads) {
            assert!(relative(g, w) < 1e-3, "{file}: a probe gradient differs by {}", relative(g, w));
        }
    }
}

#[test]
fn a_safetensors_folder_packed_to_q8_0_at_load_is_within_its_rounding() {
    let folder = fixture_file("llama3");
    let (dense, q8) = (llama(&folder, BaseWeights::F32), llama(&folder, BaseWeights::Q8_0));
    let ratio = q8.weight_bytes() as f64 / dense.weight_bytes() as f64;
    assert!(ratio < 0.3, "Q8_0 takes {ratio:.3} of the f32 bytes");
    let ((want, want_loss, _), (got, got_loss, _)) = (outputs(dense), outputs(q8));
    assert!(relative(&got, &want) < 0.05, "Q8_0 logits differ by {} of their range", relative(&got, &want));
    assert!(relative(&got_loss, &want_loss) < 0.02, "the Q8_0 loss differs by {}", relative(&got_loss, &want_loss));
}
