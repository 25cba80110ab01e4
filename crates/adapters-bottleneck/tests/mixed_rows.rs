//! A batch whose rows use different adapters (mixed-adapter serving): rows whose adapters
//! share a configuration run as one batched computation over weights stacked per row.
//! Every row equals the forward of its own adapter alone, on both backbones, for the
//! bottleneck kinds (every optional part on), LoRA and IA3 (whose feed-forward input scales
//! run before the product, per row); training through such a batch gives each adapter the
//! gradient of its own rows.

use adapters_core::{registry, Adapter, ForwardCtx, InsertionPoint, Placement};
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone};
use adapters_testkit::max_diff;
use candle_core::{Device, Tensor, Var};
use serde_json::json;

fn model(name: &str) -> Backbone {
    let _ = (adapters_bottleneck::family(), adapters_lora::family());
    load(&fetched(name).unwrap(), &Device::Cpu).unwrap().backbone
}

/// An adapter of `kind` with every weight random (nothing starts at zero), drawn from
/// `seed` (the library's seeded generator: candle's own cannot be seeded, and a test must
/// see the same weights on every run).
fn adapter(m: &Backbone, kind: &str, config: &serde_json::Value, seed: u64) -> Box<dyn Adapter> {
    let a = registry::build(kind, config, &Placement::default(), &m.model_info(), &Device::Cpu, seed).unwrap();
    let mut init = adapters_core::Init::new(seed + 1000);
    for (_, v) in a.vars() {
        let t = v.as_tensor();
        let noise = init.normal(t.shape(), 0.05, &Device::Cpu).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
    a
}

fn batch() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids: Vec<Vec<u32>> = (0..6u32).map(|r| (0..7u32).map(|t| 1000 + (r * 31 + t * 17) % 900).collect()).collect();
    let mask: Vec<Vec<u32>> = (0..6usize).map(|r| (0..7usize).map(|t| u32::from(t < 7 - r % 3)).collect()).collect();
    (Tensor::new(ids, &dev).unwrap(), Tensor::new(mask, &dev).unwrap())
}

fn hidden(m: &Backbone, ctx: &ForwardCtx) -> Tensor {
    let (ids, mask) = batch();
    match m {
        Backbone::Bert(b) => b.forward(&ids, None, Some(&mask), ctx).unwrap(),
        Backbone::Llama(l) => l.forward_hidden(&ids, None, ctx).unwrap(),
    }
}

/// Rows 0-4 choose single adapters (three share a configuration: one batched computation)
/// or the base model; row 5 a stack of two (computed as a group of its own).
fn choices() -> Vec<Vec<String>> {
    let s = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    vec![s(&["a0"]), s(&["a1"]), s(&[]), s(&["a2"]), s(&["a1"]), s(&["a0", "a1"])]
}

/// The same choices in the order a server gives a forward's rows (by stack): each
/// computation's rows are consecutive, so they run as views of the batch, not gathers.
fn server_ordered() -> Vec<Vec<String>> {
    let s = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    vec![s(&[]), s(&["a0"]), s(&["a1"]), s(&["a1"]), s(&["a2"]), s(&["a0", "a1"])]
}

fn with_three(m: &mut Backbone, kind: &str, config: &serde_json::Value) {
    for i in 0..3 {
        let mut config = config.clone();
        if kind == "lora" && i == 2 {
            config["alpha"] = json!(3.0); // another scale: still batched with the others
        }
        let a = adapter(m, kind, &config, 10 + i);
        m.adapters_mut().add(&format!("a{i}"), a).unwrap();
    }
    let keys: Vec<String> = (0..3)
        .map(|i| {
            let a = m.adapters().get(&format!("a{i}")).unwrap().clone();
            a.capabilities().row_batched.and_then(|r| r.batchable_form(a.points()[0])).expect("a batchable form").key
        })
        .collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "{kind}: keys differ, so nothing would be batched: {keys:?}");
}

#[test]
fn every_row_equals_its_own_adapter_alone() {
    let full = json!({"ln_before": true, "ln_after": true, "use_gating": true, "scaling": "channel", "non_linearity": "gelu"});
    let cases = [
        ("all-MiniLM-L6-v2", "seq_bn", json!({})),
        ("all-MiniLM-L6-v2", "seq_bn", full),
        ("all-MiniLM-L6-v2", "double_seq_bn", json!({"scaling": "learned"})),
        ("all-MiniLM-L6-v2", "par_bn", json!({"scaling": 4.0})),
        ("all-MiniLM-L6-v2", "lora", json!({"r": 4, "alpha": 8})),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "seq_bn", json!({})),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "lora", json!({"r": 4, "alpha": 8})),
    ];
    for (model_name, kind, config) in cases {
        let mut m = model(model_name);
        with_three(&mut m, kind, &config);
        let ctx = ForwardCtx::inference();
        for choices in [choices(), server_ordered()] {
            let mixed = hidden(&m, &ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap());
            for (row, stack) in choices.iter().enumerate() {
                let names: Vec<&str> = stack.iter().map(String::as_str).collect();
                m.adapters_mut().activate(&names).unwrap();
                let alone = hidden(&m, &ctx);
                let d = max_diff(&mixed.get(row).unwrap(), &alone.get(row).unwrap());
                // Relative to the row's largest value: SmolLM2's residual stream reaches the
                // hundreds, where f32 products blocked differently differ by more than 1e-4.
                // (Over six weight draws the largest relative difference was 3.3e-6.)
                let scale = alone.get(row).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(
                    d <= 1e-5 * scale,
                    "{model_name} {kind} {config}: row {row} ({stack:?}) differs from its adapter alone by {d} (largest value {scale})"
                );
            }
        }
    }
}

/// IA3 scales inputs per row before the feed-forward product (and outputs after the
/// attention ones) beside rows of LoRA, the base model and a stack, in either row order: each
/// row equals its adapter alone.
#[test]
fn input_scales_per_row_equal_each_adapter_alone() {
    let s = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let orders = [
        vec![s(&["i0"]), s(&["lora"]), s(&[]), s(&["i1"]), s(&["i0", "lora"]), s(&["i0"])],
        vec![s(&[]), s(&["i0"]), s(&["i0"]), s(&["i0", "lora"]), s(&["i1"]), s(&["lora"])],
    ];
    for model_name in ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let mut m = model(model_name);
        for (i, name) in ["i0", "i1"].iter().enumerate() {
            let a = adapter(&m, "ia3", &json!({}), 20 + i as u64);
            m.adapters_mut().add(name, a).unwrap();
        }
        let a = adapter(&m, "lora", &json!({"r": 4, "alpha": 8}), 30);
        m.adapters_mut().add("lora", a).unwrap();
        for choices in &orders {
            let mixed = hidden(&m, &ForwardCtx::inference().with_row_choices(choices, &Device::Cpu).unwrap());
            for (row, stack) in choices.iter().enumerate() {
                let names: Vec<&str> = stack.iter().map(String::as_str).collect();
                m.adapters_mut().activate(&names).unwrap();
                let alone = hidden(&m, &ForwardCtx::inference());
                let d = max_diff(&mixed.get(row).unwrap(), &alone.get(row).unwrap());
                let scale = alone.get(row).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(
                    d <= 1e-5 * scale,
                    "{model_name}: row {row} ({stack:?}) differs from its adapters alone by {d} (largest value {scale})"
                );
            }
        }
    }
}

/// `sum(hidden · probe)` over the rows in `rows`, with a fixed probe that gives every
/// output element its own weight.
fn loss(h: &Tensor, rows: &[usize]) -> Tensor {
    let keep: Vec<f32> = (0..h.dim(0).unwrap()).map(|r| if rows.contains(&r) { 1.0 } else { 0.0 }).collect();
    let keep = Tensor::from_vec(keep, (h.dim(0).unwrap(), 1, 1), &Device::Cpu).unwrap();
    let weights = Tensor::arange(0f32, h.elem_count() as f32, &Device::Cpu).unwrap().reshape(h.shape()).unwrap();
    let weights = (weights * 0.37).unwrap().sin().unwrap();
    h.broadcast_mul(&keep).unwrap().mul(&weights).unwrap().sum_all().unwrap()
}

#[test]
fn each_adapter_gets_the_gradient_of_its_own_rows() {
    let full = json!({"ln_before": true, "use_gating": true, "scaling": "channel"});
    for (kind, config) in [("seq_bn", full), ("lora", json!({"r": 4, "alpha": 8}))] {
        let mut m = model("all-MiniLM-L6-v2");
        with_three(&mut m, kind, &config);
        let choices: Vec<Vec<String>> = choices().into_iter().take(5).collect();
        let ctx = ForwardCtx::training_seeded(1).with_row_choices(&choices, &Device::Cpu).unwrap();
        let grads = loss(&hidden(&m, &ctx).narrow(0, 0, 5).unwrap(), &[0, 1, 2, 3, 4]).backward().unwrap();
        for (name, rows) in [("a0", vec![0]), ("a1", vec![1, 4]), ("a2", vec![3])] {
            m.adapters_mut().activate(&[name]).unwrap();
            let alone = loss(&hidden(&m, &ForwardCtx::training_seeded(1)).narrow(0, 0, 5).unwrap(), &rows).backward().unwrap();
            let vars: Vec<(String, Var)> = m.adapters().get(name).unwrap().vars();
            for (var, v) in vars {
                let (g, want) = (grads.get(&v).expect("a gradient in the mixed batch"), alone.get(&v).unwrap());
                // Gradients under 1e-2 are sums over every token with heavy cancellation (the
                // per-sequence gate's scalar bias: about 2e-3), where f32 noise is absolute
                // (3e-6 there), so they are compared against 1e-2.
                let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-2);
                let d = max_diff(g, want) / scale;
                assert!(d < 1e-3, "{kind}: {name}'s {var}: relative gradient difference {d}");
            }
        }
    }
}

/// A test sequence: adapters, prompt, continuation fed one token per step, first step, last step.
type Sequence = (Vec<String>, Vec<u32>, Vec<u32>, usize, usize);

/// Three Pfeiffer adapters and a LoRA on `m`, four test sequences over them and the
/// base, and each sequence's logits run alone with its adapter active: after the prompt,
/// then after each token of the continuation.
fn sequences_run_alone(m: &mut Backbone) -> (Vec<Sequence>, Vec<Vec<Tensor>>) {
    with_three(m, "seq_bn", &json!({}));
    let lora = adapter(m, "lora", &json!({"r": 4, "alpha": 8}), 20);
    m.adapters_mut().add("l0", lora).unwrap();
    let s = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<String>>();
    // (adapters, prompt, continuation fed one token per step, first step, last step)
    let sequences: Vec<Sequence> = vec![
        (s(&["a0"]), vec![1, 504, 3458, 282, 253], vec![1090, 30, 429, 22, 811], 0, 4),
        (s(&["l0"]), vec![1, 77, 9001, 15, 300, 2280, 41, 6, 12], vec![8, 18, 222, 2000, 7], 0, 1),
        (s(&[]), vec![1, 4000, 39], vec![5, 505, 55, 5555, 9], 0, 4),
        (s(&["a2"]), vec![1, 1200, 33, 70, 81, 4, 19], vec![99, 999, 9999, 13, 4], 2, 4),
    ];
    // Alone: the adapter active, one cache, the usual path: the logits after the prompt,
    // then after each token of the continuation.
    let mut alone: Vec<Vec<Tensor>> = Vec::new();
    for (stack, prompt, continuation, _, _) in &sequences {
        let names: Vec<&str> = stack.iter().map(String::as_str).collect();
        m.adapters_mut().activate(&names).unwrap();
        let Backbone::Llama(l) = &m else { unreachable!() };
        let mut cache = l.new_cache();
        let ctx = ForwardCtx::inference();
        let one = |ids: &[u32], cache: &mut adapters_models::KvCache| {
            l.last_logits(&Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), Some(cache), &ctx).unwrap().squeeze(0).unwrap()
        };
        let mut logits = vec![one(prompt, &mut cache)];
        logits.extend(continuation.iter().map(|&t| one(&[t], &mut cache)));
        alone.push(logits);
    }
    m.adapters_mut().activate(&[]).unwrap();
    (sequences, alone)
}

/// Continuous batching: sequences with different prompt lengths and adapters (Pfeiffer,
/// LoRA, the base) run their prompts together (padded) and then decode one token per step
/// in one batch, each with its own cache; one joins after the others started, one leaves
/// early. Every prompt's and step's logits equal that sequence run alone with its adapter
/// active.
#[test]
fn decoding_steps_batch_sequences_with_their_own_caches_and_adapters() {
    let mut m = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let (sequences, alone) = sequences_run_alone(&mut m);
    let Backbone::Llama(l) = &m else { unreachable!() };
    let mut caches: Vec<_> = sequences.iter().map(|_| l.new_cache()).collect();
    for step in 0..5 {
        let rows: Vec<usize> = (0..sequences.len()).filter(|&i| (sequences[i].3..=sequences[i].4).contains(&step)).collect();
        // Sequences join with their prompts, run together (padded), each through its adapter.
        let joining: Vec<usize> = rows.iter().copied().filter(|&i| sequences[i].3 == step).collect();
        if !joining.is_empty() {
            let choices: Vec<Vec<String>> = joining.iter().map(|&i| sequences[i].0.clone()).collect();
            let ctx = ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap();
            let prompts: Vec<&[u32]> = joining.iter().map(|&i| sequences[i].1.as_slice()).collect();
            let (logits, joined) = l.prefill(&prompts, &ctx).unwrap();
            for (r, (&i, cache)) in joining.iter().zip(joined).enumerate() {
                let d = max_diff(&logits.get(r).unwrap(), &alone[i][0]);
                assert!(d < 2e-3, "sequence {i}'s prompt ({:?}): logits differ from it alone by {d}", sequences[i].0);
                caches[i] = cache;
            }
        }
        let tokens: Vec<u32> = rows.iter().map(|&i| sequences[i].2[step - sequences[i].3]).collect();
        let choices: Vec<Vec<String>> = rows.iter().map(|&i| sequences[i].0.clone()).collect();
        let ctx = ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap();
        let mut row_caches: Vec<&mut adapters_models::KvCache> =
            caches.iter_mut().enumerate().filter(|(i, _)| rows.contains(i)).map(|(_, c)| c).collect();
        let logits = l.decode_step(&tokens.iter().map(std::slice::from_ref).collect::<Vec<_>>(), &mut row_caches, &ctx).unwrap();
        for (r, &i) in rows.iter().enumerate() {
            let want = &alone[i][step - sequences[i].3 + 1];
            let d = max_diff(&logits.get(r).unwrap(), want);
            assert!(d < 2e-3, "step {step}, sequence {i} ({:?}): logits differ from it alone by {d}", sequences[i].0);
        }
    }
}

/// Chunked prefill: the same sequences join through the decoding step itself, their
/// prompts fed in chunks of at most 3 tokens (an empty cache takes the first) in the same
/// steps as the other sequences' single tokens, on the f32 weights. After a prompt's last
/// chunk, and after each token that follows, every sequence's logits equal it alone.
#[test]
fn prompts_join_the_decoding_step_in_chunks() {
    let mut m = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    if let Backbone::Llama(l) = &mut m {
        l.dequantize();
    }
    let (sequences, alone) = sequences_run_alone(&mut m);
    let Backbone::Llama(l) = &m else { unreachable!() };
    let mut caches: Vec<_> = sequences.iter().map(|_| l.new_cache()).collect();
    let (mut fed, mut decoded) = (vec![0; sequences.len()], vec![0; sequences.len()]);
    let mut compared = 0;
    for step in 0..12 {
        // (sequence, its tokens this step)
        let mut runs: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, (_, prompt, continuation, join, _)) in sequences.iter().enumerate() {
            if step < *join {
                continue;
            }
            if fed[i] < prompt.len() {
                runs.push((i, prompt[fed[i]..(fed[i] + 3).min(prompt.len())].to_vec()));
            } else if decoded[i] < continuation.len() {
                runs.push((i, vec![continuation[decoded[i]]]));
            }
        }
        if runs.is_empty() {
            break;
        }
        let choices: Vec<Vec<String>> = runs.iter().map(|(i, _)| sequences[*i].0.clone()).collect();
        let ctx = ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap();
        let inputs: Vec<&[u32]> = runs.iter().map(|(_, t)| t.as_slice()).collect();
        let mut row_caches: Vec<&mut adapters_models::KvCache> =
            caches.iter_mut().enumerate().filter(|(i, _)| runs.iter().any(|(r, _)| r == i)).map(|(_, c)| c).collect();
        let logits = l.decode_step(&inputs, &mut row_caches, &ctx).unwrap();
        for (r, (i, tokens)) in runs.iter().enumerate() {
            let prompt_len = sequences[*i].1.len();
            let want = if fed[*i] < prompt_len {
                fed[*i] += tokens.len();
                (fed[*i] == prompt_len).then(|| &alone[*i][0])
            } else {
                decoded[*i] += 1;
                Some(&alone[*i][decoded[*i]])
            };
            if let Some(want) = want {
                let d = max_diff(&logits.get(r).unwrap(), want);
                assert!(d < 1e-3, "step {step}, sequence {i} ({:?}): logits differ from it alone by {d}", sequences[*i].0);
                compared += 1;
            }
        }
    }
    // Each sequence: its prompt's logits and one per continuation token.
    assert_eq!(compared, sequences.iter().map(|s| 1 + s.2.len()).sum::<usize>());
}
