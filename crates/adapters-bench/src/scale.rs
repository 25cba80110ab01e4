//! The workloads of `cargo xtask bench --scale` (same names as `bench/reference/torch_bench.py`'s
//! `scale_*`): a training step of batch 4 x 512 tokens, greedy decoding, and a server's
//! memory with 100 LoRA adapters resident, on SmolLM2-135M and on a billion-parameter model
//! with Llama-3.2-1B's configuration and random weights (`bench/scale/make_models.py`).
//!
//! Names: `scale_{135m|1b}[_q4]_{train_{seq_bn|lora}[_ckpt] | decode_b{1|8}}` and
//! `scale_1b_serve_100_lora`. `_q4`: the 1B model's Q4_0 GGUF with its blocks kept packed
//! (QLoRA-style training; decoding multiplies the blocks); `_ckpt`: gradient checkpointing.

use crate::workloads::{attach, method, rss_mib, token_rows, Step};
use adapters_core::{registry, ForwardCtx, InsertionPoint, Placement};
use adapters_models::{fetched, load_with, Backbone, BaseWeights, HoldsAdapters};
use adapters_train::forward::{lm_loss_of, loss_and_grads};
use adapters_train::optim::{clip_grad_norm, AdamW};
use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Where `bench/scale/make_models.py` writes the billion-parameter model.
pub const MODEL_1B: &str = "target/scale/llama-1b";

/// Every scale workload.
pub const NAMES: &[&str] = &[
    "scale_135m_train_seq_bn",
    "scale_135m_train_lora",
    "scale_1b_train_seq_bn",
    "scale_1b_train_lora",
    "scale_1b_train_lora_ckpt",
    "scale_1b_q4_train_lora_ckpt",
    "scale_1b_q4_train_lora",
    "scale_135m_decode_b1",
    "scale_135m_decode_b8",
    "scale_1b_decode_b1",
    "scale_1b_decode_b8",
    "scale_1b_q4_decode_b1",
    "scale_1b_q4_decode_b8",
    "scale_1b_serve_100_lora",
];

/// The model of a workload name: SmolLM2-135M (its Q4_1 file de-quantised, as the
/// PyTorch reference loads it), or the 1B model as f32 safetensors or packed Q4_0.
fn model(name: &str) -> anyhow::Result<Backbone> {
    let (path, base) = if name.starts_with("scale_135m_") {
        (fetched("SmolLM2-135M-Instruct.Q4_1.gguf")?, BaseWeights::F32)
    } else if name.starts_with("scale_1b_q4_") {
        (PathBuf::from(MODEL_1B).join("model.q4_0.gguf"), BaseWeights::Packed)
    } else {
        (PathBuf::from(MODEL_1B), BaseWeights::F32)
    };
    if !path.exists() {
        anyhow::bail!(
            "{} is missing: run `cargo xtask bench --scale` (it makes the model with bench/scale/make_models.py)",
            path.display()
        );
    }
    Ok(load_with(&path, &Device::Cpu, base)?.backbone)
}

/// Runs scale workload `name` and returns its record (as [`crate::workloads::run`] does).
pub fn run(name: &str, warmup: usize, steps: usize) -> anyhow::Result<Value> {
    if !NAMES.contains(&name) {
        anyhow::bail!("unknown scale workload `{name}` (known: {})", NAMES.join(", "));
    }
    if name == "scale_1b_serve_100_lora" {
        return serve_many_loras(name, 100, warmup, steps);
    }
    if let Some(batch) = name.strip_prefix("scale_").and_then(|n| n.split("_decode_b").nth(1)) {
        let Backbone::Llama(m) = model(name)? else { anyhow::bail!("a decoder") };
        return crate::workloads::decode(&m, name, batch.parse()?, warmup, steps);
    }
    let m = name.split("_train_").nth(1).expect("a training workload");
    let (m, checkpointing) = m.strip_suffix("_ckpt").map_or((m, false), |m| (m, true));
    let step = train(model(name)?, m, checkpointing)?;
    crate::workloads::timed(name, step, warmup, steps)
}

/// Causal-LM loss, backward, clipping, AdamW at batch 4 x 512 (the training copy of the
/// base: no 8-bit decoding copies, as the trainer keeps it).
fn train(mut model: Backbone, m: &str, checkpointing: bool) -> anyhow::Result<Step> {
    if let Backbone::Llama(l) = &mut model {
        l.dequantize();
        adapters_kernels::release_free_memory();
    }
    let (kind, config) = method(m)?;
    let named = attach(&mut model, kind, config)?;
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(named, 0.01)?;
    let vocab = model.model_info().vocab_size as u32;
    let rows = token_rows(4, 512, vocab);
    let ids = Tensor::new(rows, &Device::Cpu)?;
    let mask = ids.ones_like()?;
    Ok(Box::new(move || {
        let ctx = ForwardCtx::training_seeded(1);
        let (_, mut grads, _) =
            loss_and_grads(&model, &ids, &mask, &ctx, &vars, checkpointing, |hidden| Ok(lm_loss_of(&model, hidden, &ids, None)?.0))?;
        clip_grad_norm(&vars, &mut grads, 1.0)?;
        optimizer.step(&grads, 1e-4)?;
        Ok(())
    }))
}

/// A server's memory with `count` LoRA adapters (r=8 on q and v, random weights) resident
/// on the 1B model: the resident set before and after adding them, and the decoding step
/// of 8 rows each through its own adapter.
fn serve_many_loras(name: &str, count: usize, warmup: usize, calls: usize) -> anyhow::Result<Value> {
    let mut model = model(name)?;
    let info = model.model_info();
    let (kind, config) = method("lora")?;
    let before = rss_mib("VmRSS");
    let mut adapter_params = 0;
    for i in 0..count {
        let adapter = registry::build(kind, &config, &Placement::default(), &info, &Device::Cpu, i as u64)?;
        for (_, var) in adapter.vars() {
            adapter_params += var.elem_count();
            var.set(&var.as_tensor().randn_like(0.0, 0.02)?)?;
        }
        model.adapters_mut().add(&format!("lora{i}"), adapter)?;
    }
    let after = rss_mib("VmRSS");
    let Backbone::Llama(m) = &model else { anyhow::bail!("a decoder") };
    let choices: Vec<Vec<String>> = (0..8).map(|i| vec![format!("lora{}", i * count / 8)]).collect();
    let ctx = ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu)?;
    let prompts = token_rows(8, 32, info.vocab_size as u32);
    let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut step_ms = Vec::new();
    for call in 0..warmup + calls {
        let steps = crate::workloads::generate_greedy(m, &prompts, &ctx, 32)?;
        if call >= warmup {
            step_ms.extend(steps);
        }
    }
    let med = crate::median(step_ms);
    Ok(json!({
        "config": name, "adapters": count, "adapter_parameters": adapter_params,
        "rss_base_mib": before, "rss_with_adapters_mib": after,
        "adapters_mib": after.zip(before).map(|(a, b)| a - b),
        "median_ms": med, "decode_tokens_per_s": 8.0 / (med / 1e3),
        "steps_peak_rss_mib": rss_mib("VmHWM"),
        "threads": candle_core::utils::get_num_threads(),
    }))
}
