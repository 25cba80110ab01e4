//! A batch whose rows use different adapters against one whose rows all use the same
//! adapter, timed interleaved (see `adapters_bench`): MiniLM forward at batch 32 x seq
//! 128, for Pfeiffer (seq_bn) and for LoRA r=8 on query and value. Baseline: the one
//! adapter active for the whole batch (the fastest path for one adapter). Variants: 32
//! rows choosing that one adapter, 4 adapters (8 rows each), 32 adapters (one row each).
//! Target (issue 12): 32 adapters at ≥ 0.9x the baseline's throughput (time ratio ≤ 1.11).
//!
//! Kinds (issue 34): one adapter each of Pfeiffer, Houlsby, parallel, LoRA r=8 and IA3 in
//! one batch, rows in blocks per adapter (as the server orders a forward's rows) or taking
//! turns (gathered), against one Pfeiffer adapter active for the batch, beside each kind
//! alone. Target: the mixed batch at ≥ 0.9x the baseline's throughput.

use adapters_bench::{interleave, to_json, write_result};
use adapters_core::{registry, ForwardCtx, InsertionPoint, Placement};
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone, Bert};
use candle_core::{Device, Tensor};
use serde_json::json;

const ROWS: usize = 32;

fn ids(batch: usize, seq: usize, vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..batch * seq).map(|i| 1000 + (i as u32 * 7919) % (vocab - 1000)).collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

/// MiniLM with 32 adapters `a0..a31` of `kind` (distinct random weights), `a0` active.
fn minilm(kind: &str, config: serde_json::Value) -> Bert {
    let mut m = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
    for i in 0..ROWS {
        let a = registry::build(kind, &config, &Placement::default(), &m.model_info(), &Device::Cpu, i as u64).unwrap();
        for (_, v) in a.vars() {
            v.set(&Tensor::randn(0f32, 0.02, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        m.adapters_mut().add(&format!("a{i}"), a).unwrap();
    }
    m.adapters_mut().activate(&["a0"]).unwrap();
    let Backbone::Bert(b) = m else { unreachable!() };
    b
}

/// A context routing row `r` to adapter `a{r % adapters}`.
fn rows(adapters: usize) -> ForwardCtx {
    let choices: Vec<Vec<String>> = (0..ROWS).map(|r| vec![format!("a{}", r % adapters)]).collect();
    ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap()
}

/// The mixed batch's kinds (JSON configs; random non-zero weights).
const KINDS: [(&str, &str); 5] = [
    ("seq_bn", r#"{"reduction_factor": 16}"#),
    ("double_seq_bn", r#"{"reduction_factor": 16}"#),
    ("par_bn", r#"{"reduction_factor": 16}"#),
    ("lora", r#"{"r": 8, "alpha": 16}"#),
    ("ia3", "{}"),
];

/// MiniLM with one adapter of each of [`KINDS`], named by its kind.
fn minilm_kinds() -> Bert {
    let mut m = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
    for (i, (kind, config)) in KINDS.iter().enumerate() {
        let config: serde_json::Value = serde_json::from_str(config).unwrap();
        let a = registry::build(kind, &config, &Placement::default(), &m.model_info(), &Device::Cpu, i as u64).unwrap();
        for (_, v) in a.vars() {
            v.set(&(Tensor::randn(0f32, 0.02, v.shape(), &Device::Cpu).unwrap() + 1.0).unwrap()).unwrap();
        }
        m.adapters_mut().add(kind, a).unwrap();
    }
    let Backbone::Bert(b) = m else { unreachable!() };
    b
}

/// A timed variant.
type Variant<'a> = Box<dyn Fn() + 'a>;

/// Five kinds in one batch of [`ROWS`] x 128 against one Pfeiffer adapter for the batch.
fn kinds(input: &Tensor, rounds: usize) {
    let mut model = minilm_kinds();
    let route = |kind_of: &dyn Fn(usize) -> usize| {
        let choices: Vec<Vec<String>> = (0..ROWS).map(|r| vec![KINDS[kind_of(r)].0.to_string()]).collect();
        ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap()
    };
    let (blocks, turns) = (route(&|r| r * KINDS.len() / ROWS), route(&|r| r % KINDS.len()));
    // Each kind alone, active for the batch: a model per kind (activation is per model).
    let alone: Vec<Bert> = KINDS
        .iter()
        .map(|(kind, _)| {
            let mut m = model.clone();
            m.adapters_mut().activate(&[kind]).unwrap();
            m
        })
        .collect();
    model.adapters_mut().activate(&[]).unwrap();
    let plain = ForwardCtx::inference();
    let run = |m: &Bert, ctx: &ForwardCtx| {
        m.forward(input, None, None, ctx).unwrap();
    };
    let (run, plain) = (&run, &plain);
    let names: Vec<String> = KINDS.iter().map(|(k, _)| format!("{k} alone, active for the batch")).collect();
    let mut variants: Vec<(&str, Variant)> = vec![
        ("Pfeiffer alone, active for the batch", Box::new(|| run(&alone[0], plain))),
        ("five kinds, rows in blocks per adapter (server order)", Box::new(|| run(&model, &blocks))),
        ("five kinds, rows taking turns (gathered)", Box::new(|| run(&model, &turns))),
    ];
    for (name, m) in names.iter().zip(&alone).skip(1) {
        variants.push((name, Box::new(move || run(m, plain))));
    }
    variants.push(("Pfeiffer alone again (noise control)", Box::new(|| run(&alone[0], plain))));
    let refs: Vec<(&str, &dyn Fn())> = variants.iter().map(|(n, f)| (*n, f.as_ref())).collect();
    let timings = interleave(&refs, rounds);
    write_result(
        "mixed_batch_kinds.json",
        &to_json(
            "Five adapter kinds in one batch (Pfeiffer, Houlsby, parallel, LoRA r=8, IA3), MiniLM forward, batch 32 x seq 128",
            &timings,
            rounds,
        ),
    );
}

fn main() {
    adapters_kernels::tune_cpu_runtime();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = (adapters_bottleneck::family(), adapters_lora::family());
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let input = ids(ROWS, 128, 30522);
    let (active, one, four, all) = (ForwardCtx::inference(), rows(1), rows(4), rows(ROWS));
    for (file, title, kind, config) in [
        ("mixed_batch_pfeiffer.json", "Pfeiffer (seq_bn r=24), MiniLM forward, batch 32 x seq 128", "seq_bn", json!({})),
        ("mixed_batch_lora.json", "LoRA r=8 on q,v, MiniLM forward, batch 32 x seq 128", "lora", json!({"r": 8, "alpha": 16})),
    ] {
        let model = minilm(kind, config);
        let run = |ctx: &ForwardCtx| {
            model.forward(&input, None, None, ctx).unwrap();
        };
        let timings = interleave(
            &[
                ("one adapter, active for the batch", &|| run(&active)),
                ("one adapter, chosen per row", &|| run(&one)),
                ("4 adapters, 8 rows each", &|| run(&four)),
                ("32 adapters, one row each", &|| run(&all)),
            ],
            rounds,
        );
        write_result(file, &to_json(title, &timings, rounds));
    }
    kinds(&input, rounds);
}
