//! SmolLM2's shipped Q4_1 GGUF with its weight matrices kept in their blocks (`packed`,
//! the QLoRA-style base) and SmolLM2 quantised to Q8_0 at load: the same logits and adapter
//! gradients as the de-quantised f32 model (the products are those of the de-quantised
//! weights), in a third of the memory.

mod common;

use adapters_core::{ForwardCtx, InsertionPoint};
use adapters_models::HoldsAdapters;
use adapters_models::{load_with, Backbone, BaseWeights, Llama};
use candle_core::{Device, Tensor};
use common::*;

fn llama(base: BaseWeights) -> Llama {
    match load_with(&smollm(), &Device::Cpu, base).unwrap().backbone {
        Backbone::Llama(m) => m,
        _ => unreachable!(),
    }
}

fn prompt() -> Tensor {
    Tensor::new(&[[1u32, 504, 3458, 282, 4649, 314, 253, 1345, 3355, 28, 1038, 30]], &Device::Cpu).unwrap()
}

/// Logits at every position, and each probe variable's gradient of a loss on them.
fn logits_and_gradients(mut m: Llama) -> (Tensor, Vec<Tensor>) {
    let probe = Probe::everywhere(&m.model_info(), &Device::Cpu).unwrap();
    m.adapters_mut().add("probe", Box::new(probe)).unwrap();
    m.adapters_mut().activate(&["probe"]).unwrap();
    let ctx = ForwardCtx::training();
    let logits = m.logits(&m.forward_hidden(&prompt(), None, &ctx).unwrap()).unwrap();
    let grads = candle_nn::ops::log_softmax(&logits, 2).unwrap().mean_all().unwrap().backward().unwrap();
    let vars = m.adapters().active_vars();
    (logits, vars.iter().map(|(_, v)| grads.get(v.as_tensor()).expect("a gradient").clone()).collect())
}

fn relative(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12)
}

#[test]
fn a_packed_base_computes_and_trains_as_the_dequantized_one() {
    let (dense, packed) = (llama(BaseWeights::F32), llama(BaseWeights::Packed));
    let (f32_bytes, packed_bytes) = (dense.weight_bytes(), packed.weight_bytes());
    // The file's blocks: Q4_1 projections (6 bits a weight with the scales), Q8_0 token
    // embeddings (8.5; also the output layer: SmolLM2 ties them). 96.6 MB of 538.1.
    assert!((packed_bytes as f64) < 0.2 * f32_bytes as f64, "packed {packed_bytes} bytes vs f32 {f32_bytes}");
    let ((want, want_grads), (got, got_grads)) = (logits_and_gradients(dense), logits_and_gradients(packed));
    assert!(relative(&got, &want) < 1e-4, "logits differ by {}", relative(&got, &want));
    assert_eq!(got_grads.len(), want_grads.len());
    for (g, w) in got_grads.iter().zip(&want_grads) {
        assert!(relative(g, w) < 1e-3, "a probe variable's gradient differs by {}", relative(g, w));
    }
}

/// The language-model loss through the packed output layer (two passes over its slabs,
/// no logits tensor), and the probe's gradients from it: those of the f32 model.
#[test]
fn the_loss_over_a_packed_output_layer_is_the_dequantized_ones() {
    let loss_and_gradients = |mut m: Llama| {
        let probe = Probe::everywhere(&m.model_info(), &Device::Cpu).unwrap();
        m.adapters_mut().add("probe", Box::new(probe)).unwrap();
        m.adapters_mut().activate(&["probe"]).unwrap();
        let hidden = m.forward_hidden(&prompt(), None, &ForwardCtx::training()).unwrap();
        let (t, h) = (prompt().dim(1).unwrap(), m.config.hidden_size);
        let hidden = hidden.narrow(1, 0, t - 1).unwrap().reshape((t - 1, h)).unwrap();
        let targets = prompt().narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
        let loss = m.output_cross_entropy(&hidden, &targets).unwrap();
        let grads = loss.backward().unwrap();
        let vars = m.adapters().active_vars();
        (loss, vars.iter().map(|(_, v)| grads.get(v.as_tensor()).expect("a gradient").clone()).collect::<Vec<_>>())
    };
    let ((want, want_grads), (got, got_grads)) =
        (loss_and_gradients(llama(BaseWeights::F32)), loss_and_gradients(llama(BaseWeights::Packed)));
    assert!(relative(&got, &want) < 1e-5, "the loss differs by {}", relative(&got, &want));
    for (g, w) in got_grads.iter().zip(&want_grads) {
        assert!(relative(g, w) < 1e-3, "a probe variable's gradient differs by {}", relative(g, w));
    }
}

#[test]
fn a_base_quantized_to_q8_0_at_load_is_within_its_rounding() {
    let (dense, q8) = (llama(BaseWeights::F32), llama(BaseWeights::Q8_0));
    assert!((q8.weight_bytes() as f64) < 0.5 * dense.weight_bytes() as f64);
    let ctx = ForwardCtx::inference();
    let logits = |m: &Llama| m.logits(&m.forward_hidden(&prompt(), None, &ctx).unwrap()).unwrap();
    let err = relative(&logits(&q8), &logits(&dense));
    assert!(err < 0.05, "Q8_0 logits differ by {err} of their range");
}

/// Decoding steps over the packed base multiply the blocks directly (activations rounded
/// to 8 bits, as llama.cpp does): the golden greedy continuations still come out.
#[test]
fn generation_over_a_packed_base_gives_the_golden_continuations() {
    use adapters_models::generate::{generate, Sampling};
    let m = llama(BaseWeights::Packed);
    let golden = fixture("golden/smollm2.json");
    for p in golden["prompts"].as_array().unwrap() {
        let want = ids(&p["greedy_continuation"]["new_token_ids"]);
        let got =
            generate(&m, &ids(&p["input_ids"]), want.len(), &Sampling::Greedy, &[], |_| Ok::<(), adapters_models::Error>(())).unwrap();
        assert_eq!(got, want, "prompt {}", p["name"]);
    }
}
