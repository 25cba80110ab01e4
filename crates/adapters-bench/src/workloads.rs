//! The workloads of the PyTorch reference benchmark (`bench/reference/torch_bench.py`),
//! same names, shapes and measurements, so `cargo xtask bench --vs-pytorch` can run the
//! two stacks alternately and compare them as ratios.

use adapters_core::{registry, ForwardCtx, InsertionPoint, Placement};
use adapters_models::heads::ClassificationHead;
use adapters_models::heads::{mean_pool, pad, pooled};
use adapters_models::{fetched, load, Backbone, HoldsAdapters};
use adapters_train::config::Pooling;
use adapters_train::forward::{lm_loss, loss_and_grads};
use adapters_train::optim::{clip_grad_norm, AdamW};
use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};
use std::time::Instant;

/// Every workload name: the PyTorch reference's, as it spells them, and the serving ones it lacks
/// (`smol_serve_decode_*`, `smol_generate_mixed_*`, `minilm_infer_mixed_kinds`).
pub const NAMES: &[&str] = &[
    "minilm_train_full",
    "minilm_train_seq_bn",
    "minilm_train_lora",
    "minilm_train_seq_bn_ckpt",
    "minilm_train_lora_ckpt",
    "minilm_infer_base",
    "minilm_infer_seq_bn",
    "minilm_infer_lora_unmerged",
    "minilm_infer_lora_merged",
    "minilm_infer_mixed_kinds",
    "smol_train_seq_bn",
    "smol_train_lora",
    "smol_decode_b1",
    "smol_decode_b8",
    "smol_decode_b32",
    "smol_serve_decode_b8",
    "smol_serve_decode_b32",
    "smol_generate_mixed_b8",
    "smol_generate_mixed_b32",
];

/// Runs workload `name` (`warmup` untimed, then `steps` timed) and returns its record:
/// `median_ms` per step, and `steps_peak_rss_mib` / `rss_before_loop_mib` measured as
/// the reference does (the kernel's resident-set high-water mark, reset before warm-up).
pub fn run(name: &str, warmup: usize, steps: usize) -> anyhow::Result<Value> {
    let _ = (adapters_bottleneck::family(), adapters_lora::family(), adapters_moe::family(), adapters_hyper::family());
    if name.starts_with("scale_") {
        return crate::scale::run(name, warmup, steps);
    }
    let step: Step = match name {
        n if n.starts_with("minilm_train_") => minilm_train(&n["minilm_train_".len()..], || {})?.0,
        n if n.starts_with("minilm_infer_") => minilm_infer(&n["minilm_infer_".len()..])?,
        n if n.starts_with("smol_train_") => smol_train(&n["smol_train_".len()..])?,
        "smol_decode_b1" => return smol_decode(1, warmup, steps),
        "smol_decode_b8" => return smol_decode(8, warmup, steps),
        "smol_decode_b32" => return smol_decode(32, warmup, steps),
        "smol_serve_decode_b8" => return smol_serve_decode(8, warmup, steps),
        "smol_serve_decode_b32" => return smol_serve_decode(32, warmup, steps),
        "smol_generate_mixed_b8" => return smol_generate_mixed(8, warmup, steps),
        "smol_generate_mixed_b32" => return smol_generate_mixed(32, warmup, steps),
        other => anyhow::bail!("unknown workload `{other}` (known: {}, and {})", NAMES.join(", "), crate::scale::NAMES.join(", ")),
    };
    timed(name, step, warmup, steps)
}

/// Times `step` (`warmup` untimed, then `steps` timed): the record of [`run`].
pub(crate) fn timed(name: &str, mut step: Step, warmup: usize, steps: usize) -> anyhow::Result<Value> {
    let rss_before = rss_mib("VmRSS");
    reset_peak_rss();
    for _ in 0..warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(json!({
        "config": name, "median_ms": crate::median(times.clone()), "all_ms": times,
        "rss_before_loop_mib": rss_before, "steps_peak_rss_mib": rss_mib("VmHWM"),
        "threads": candle_core::utils::get_num_threads(),
    }))
}

/// A `/proc/self/status` field in MiB.
pub(crate) fn rss_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// Resets the kernel's peak-RSS counter of this process (as the reference does).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Attaches a freshly initialised adapter of `kind` and makes it the active one.
pub(crate) fn attach(model: &mut Backbone, kind: &str, config: Value) -> anyhow::Result<Vec<(String, Var)>> {
    let a = registry::build(kind, &config, &Placement::default(), &model.model_info(), &Device::Cpu, 1)?;
    let vars = a.vars();
    model.adapters_mut().add("bench", a)?;
    model.adapters_mut().activate(&["bench"])?;
    Ok(vars)
}

/// The adapter of a reference method name: AdapterHub's `seq_bn` (reduction 16) and
/// PEFT's LoRA r=8, alpha 16 on query and value; and the `moe` bench's mixtures.
pub(crate) fn method(name: &str) -> anyhow::Result<(&'static str, Value)> {
    Ok(match name {
        "seq_bn" => ("seq_bn", json!({"reduction_factor": 16})),
        "lora" | "lora_unmerged" | "lora_merged" => ("lora", json!({"r": 8, "alpha": 16})),
        // Mixtures of 8 Pfeiffer-sized experts (the `moe` bench).
        "moe_k1" => ("moe_bn", json!({"experts": 8, "top_k": 1, "reduction_factor": 16})),
        "moe_k2" => ("moe_bn", json!({"experts": 8, "top_k": 2, "reduction_factor": 16})),
        "moe_k1_dense" => ("moe_bn", json!({"experts": 8, "top_k": 1, "reduction_factor": 16, "dispatch": "dense"})),
        other => anyhow::bail!("unknown method `{other}`"),
    })
}

/// Deterministic token ids, as in the training-step bench.
pub(crate) fn token_rows(batch: usize, seq: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..batch).map(|r| (0..seq).map(|i| 1000 + ((r * seq + i) as u32 * 7919) % (vocab - 1000)).collect()).collect()
}

fn minilm() -> anyhow::Result<Backbone> {
    Ok(load(&fetched("all-MiniLM-L6-v2")?, &Device::Cpu)?.backbone)
}

/// A training step.
pub type Step = Box<dyn FnMut() -> anyhow::Result<()>>;

/// Forward, cross-entropy on a 2-label head, backward, clipping, AdamW: batch 32 x 128, for
/// method `full`, `seq_bn` or `lora`, with `_ckpt` appended: with gradient checkpointing;
/// with the number of trainable parameters.
/// `after_forward` runs between the loss and the backward pass (the memory bench reads the
/// heap there: what the forward holds for the backward).
pub fn minilm_train(m: &str, after_forward: fn()) -> anyhow::Result<(Step, usize)> {
    let (m, checkpointing) = m.strip_suffix("_ckpt").map_or((m, false), |m| (m, true));
    let mut model = minilm()?;
    let mut named = if m == "full" {
        model.make_trainable()?
    } else {
        let (kind, config) = method(m)?;
        attach(&mut model, kind, config)?
    };
    let head = ClassificationHead::new(384, 2, &Default::default(), 1, &Device::Cpu)?;
    named.extend(head.vars());
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let trainable = vars.iter().map(|v| v.elem_count()).sum();
    let mut optimizer = AdamW::new(named, 0.01)?;
    let rows = token_rows(32, 128, 30522);
    let (ids, mask) = pad(&rows.iter().map(Vec::as_slice).collect::<Vec<_>>(), &Device::Cpu)?;
    let labels = Tensor::new((0..32u32).map(|i| i % 2).collect::<Vec<_>>(), &Device::Cpu)?;
    let lr = if m == "full" { 5e-5 } else { 1e-4 };
    let step: Step = Box::new(move || {
        let ctx = ForwardCtx::training_seeded(1);
        let (_, mut grads, _) = loss_and_grads(&model, &ids, &mask, &ctx, &vars, checkpointing, |hidden| {
            let logits = head.forward(&mean_pool(hidden, &mask)?, 0.1, &ctx)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            after_forward();
            Ok(loss)
        })?;
        clip_grad_norm(&vars, &mut grads, 1.0)?;
        optimizer.step(&grads, lr)?;
        Ok(())
    });
    Ok((step, trainable))
}

/// Inference forward at batch 32 x 128, with nothing, a Pfeiffer adapter, LoRA (merged or
/// not) or a mixture attached (random non-zero weights).
pub fn minilm_infer(v: &str) -> anyhow::Result<Step> {
    let mut model = minilm()?;
    if v == "mixed_kinds" {
        return minilm_infer_mixed_kinds(model);
    }
    if v != "base" {
        let (kind, config) = method(v)?;
        for (_, var) in attach(&mut model, kind, config)? {
            var.set(&(var.as_tensor().randn_like(0.0, 0.02)?))?;
        }
        if v == "lora_merged" {
            model.merge("bench")?;
        }
    }
    let ids = token_rows(32, 128, 30522);
    Ok(Box::new(move || {
        let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        pooled(&model, &rows, Pooling::Mean, &ForwardCtx::inference())?;
        Ok(())
    }))
}

/// One forward of 32 x 128 in which rows go through five adapters of different
/// kinds (Pfeiffer, Houlsby, parallel, LoRA r=8, IA3; random non-zero weights), each row
/// through its own: what a server's mixed batch runs (against `minilm_infer_seq_bn`, the
/// same batch through one adapter).
fn minilm_infer_mixed_kinds(mut model: Backbone) -> anyhow::Result<Step> {
    let kinds = [
        ("seq_bn", json!({"reduction_factor": 16})),
        ("double_seq_bn", json!({"reduction_factor": 16})),
        ("par_bn", json!({"reduction_factor": 16})),
        ("lora", json!({"r": 8, "alpha": 16})),
        ("ia3", json!({})),
    ];
    let info = model.model_info();
    for (kind, config) in &kinds {
        let adapter = registry::build(kind, config, &Placement::default(), &info, &Device::Cpu, 1)?;
        for (_, var) in adapter.vars() {
            var.set(&(var.as_tensor().randn_like(0.0, 0.02)? + 1.0)?)?;
        }
        model.adapters_mut().add(kind, adapter)?;
    }
    // Rows of one adapter side by side, as the server orders a forward's rows.
    let choices: Vec<Vec<String>> = (0..32).map(|i| vec![kinds[i * kinds.len() / 32].0.to_string()]).collect();
    let ctx = ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu)?;
    let ids = token_rows(32, 128, 30522);
    Ok(Box::new(move || {
        let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        pooled(&model, &rows, Pooling::Mean, &ctx)?;
        Ok(())
    }))
}

fn smollm2() -> anyhow::Result<Backbone> {
    Ok(load(&fetched("SmolLM2-135M-Instruct.Q4_1.gguf")?, &Device::Cpu)?.backbone)
}

/// Causal-LM loss, backward, clipping, AdamW: batch 4 x 256.
fn smol_train(m: &str) -> anyhow::Result<Step> {
    let mut model = smollm2()?;
    let (kind, config) = method(m)?;
    let named = attach(&mut model, kind, config)?;
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(named, 0.01)?;
    let ids = token_rows(4, 256, 49152);
    Ok(Box::new(move || {
        let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let (loss, _) = lm_loss(&model, &rows, None, &ForwardCtx::training_seeded(1))?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&vars, &mut grads, 1.0)?;
        optimizer.step(&grads, 1e-4)?;
        Ok(())
    }))
}

/// Greedy decoding with a KV cache: a 32-token prompt, then 32 new tokens per row; the
/// median time of one decode step (one new token for every row).
fn smol_decode(batch: usize, warmup: usize, calls: usize) -> anyhow::Result<Value> {
    let Backbone::Llama(model) = smollm2()? else { anyhow::bail!("SmolLM2 is a decoder") };
    decode(&model, &format!("smol_decode_b{batch}"), batch, warmup, calls)
}

/// [`smol_decode`] on any decoder, recorded as `name`.
pub(crate) fn decode(model: &adapters_models::Llama, name: &str, batch: usize, warmup: usize, calls: usize) -> anyhow::Result<Value> {
    let prompt = Tensor::new(token_rows(batch, 32, model.config.vocab_size as u32), &Device::Cpu)?;
    let ctx = ForwardCtx::inference();
    let rss_before = rss_mib("VmRSS");
    reset_peak_rss();
    let mut step_ms = Vec::new();
    for call in 0..warmup + calls {
        let mut cache = model.new_cache();
        let mut next = model.last_logits(&prompt, Some(&mut cache), &ctx)?.argmax(candle_core::D::Minus1)?;
        for _ in 1..32 {
            let t = Instant::now();
            let logits = model.last_logits(&next.unsqueeze(1)?, Some(&mut cache), &ctx)?;
            next = logits.argmax(candle_core::D::Minus1)?;
            next.to_vec1::<u32>()?; // the tokens reach the host, as a server's would
            if call >= warmup {
                step_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(decode_record(name, batch, step_ms, rss_before))
}

/// The server's decoding step (continuous batching): prompts of 16 to 48 tokens, each run
/// into a cache of its own (reserved for its 32 new tokens, as the server reserves), then
/// steps of one token for every row, each at its own position; the median step time.
fn smol_serve_decode(batch: usize, warmup: usize, calls: usize) -> anyhow::Result<Value> {
    let Backbone::Llama(model) = smollm2()? else { anyhow::bail!("SmolLM2 is a decoder") };
    let prompts: Vec<Vec<u32>> = (0..batch).map(|i| token_rows(1, 16 + (i * 7) % 33, 49152).remove(0)).collect();
    let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let ctx = ForwardCtx::inference();
    let rss_before = rss_mib("VmRSS");
    reset_peak_rss();
    let mut step_ms = Vec::new();
    for call in 0..warmup + calls {
        let steps = generate_greedy(&model, &prompts, &ctx, 32)?;
        if call >= warmup {
            step_ms.extend(steps);
        }
    }
    Ok(decode_record(&format!("smol_serve_decode_b{batch}"), batch, step_ms, rss_before))
}

/// `tokens` greedy tokens after each of `prompts`, as the server makes them: the prompts
/// prefilled together, each into a cache of its own reserved for its new tokens, then
/// decoding steps of one token for every row. The milliseconds of each decoding step.
pub(crate) fn generate_greedy(m: &adapters_models::Llama, prompts: &[&[u32]], ctx: &ForwardCtx, tokens: usize) -> anyhow::Result<Vec<f64>> {
    let (logits, mut caches) = m.prefill(prompts, ctx)?;
    for c in &mut caches {
        c.reserve(c.len() + tokens)?;
    }
    let mut next: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
    let mut step_ms = Vec::with_capacity(tokens);
    for _ in 1..tokens {
        let t = Instant::now();
        let mut rows: Vec<&mut adapters_models::KvCache> = caches.iter_mut().collect();
        let runs: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
        next = m.decode_step(&runs, &mut rows, ctx)?.argmax(candle_core::D::Minus1)?.to_vec1()?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(step_ms)
}

/// The prompts of the serving benchmark (`cargo xtask bench --serving`): 32 exchanges of
/// the movie-dialog test split, 12-36 words each.
pub const PROMPTS: &str = include_str!("../../../bench/prompts.txt");

/// Tokens each generation of the serving benchmark asks for.
pub const GENERATED_TOKENS: usize = 32;

/// What the server does for `batch` concurrent generations, offline and in lockstep: the
/// first `batch` benchmark prompts, rows taking turns through the base model, a Pfeiffer
/// adapter and a LoRA (r=8 on q, v), prefilled together (each into its own cache, reserved
/// for its new tokens), then [`GENERATED_TOKENS`] greedy tokens each by decoding steps.
/// `median_ms` is one whole generation; `decode_tokens_per_s` the generated tokens per
/// second over it, prefill included (the offline side of the serving ratio).
fn smol_generate_mixed(batch: usize, warmup: usize, calls: usize) -> anyhow::Result<Value> {
    let loaded = load(&fetched("SmolLM2-135M-Instruct.Q4_1.gguf")?, &Device::Cpu)?;
    let mut model = loaded.backbone;
    let info = model.model_info();
    for (name, (kind, config)) in [("pfeiffer", method("seq_bn")?), ("lora", method("lora")?)] {
        let adapter = registry::build(kind, &config, &Placement::default(), &info, &Device::Cpu, 1)?;
        model.adapters_mut().add(name, adapter)?;
    }
    let Backbone::Llama(m) = &model else { anyhow::bail!("SmolLM2 is a decoder") };
    let prompts: Vec<Vec<u32>> = PROMPTS.lines().cycle().take(batch).map(|p| loaded.tokenizer.encode(p, true)).collect::<Result<_, _>>()?;
    let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let choices: Vec<Vec<String>> = (0..batch)
        .map(|i| match i % 3 {
            0 => vec![],
            1 => vec!["pfeiffer".to_string()],
            _ => vec!["lora".to_string()],
        })
        .collect();
    let ctx = ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu)?;
    let rss_before = rss_mib("VmRSS");
    reset_peak_rss();
    let mut times = Vec::new();
    for call in 0..warmup + calls {
        let t = Instant::now();
        generate_greedy(m, &prompts, &ctx, GENERATED_TOKENS)?;
        if call >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let med = crate::median(times);
    Ok(json!({
        "config": format!("smol_generate_mixed_b{batch}"), "median_ms": med,
        "decode_tokens_per_s": (batch * GENERATED_TOKENS) as f64 / (med / 1e3),
        "rss_before_loop_mib": rss_before, "steps_peak_rss_mib": rss_mib("VmHWM"),
        "threads": candle_core::utils::get_num_threads(),
    }))
}

/// A decoding workload's record: the median step and the tokens per second it gives.
fn decode_record(config: &str, batch: usize, step_ms: Vec<f64>, rss_before: Option<f64>) -> Value {
    let med = crate::median(step_ms);
    json!({
        "config": config, "median_ms": med, "decode_tokens_per_s": batch as f64 / (med / 1e3),
        "rss_before_loop_mib": rss_before, "steps_peak_rss_mib": rss_mib("VmHWM"),
        "threads": candle_core::utils::get_num_threads(),
    })
}

/// The machine-speed probe: GFLOP/s of a 1024 x 1024 f32 matrix product through candle.
pub fn sgemm_gflops() -> f64 {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu).expect("probe input");
    let _ = a.matmul(&a);
    let t = Instant::now();
    for _ in 0..8 {
        let _ = a.matmul(&a);
    }
    2.0 * 1024f64.powi(3) * 8.0 / t.elapsed().as_secs_f64() / 1e9
}
