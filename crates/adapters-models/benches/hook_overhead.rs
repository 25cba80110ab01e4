//! What the adapter hooks cost when nothing is attached, measured two ways and written to
//! `bench/results/hook_overhead.json` for `cargo xtask bench`:
//!
//! 1. Our MiniLM forward against candle-transformers' BertModel (no hooks) on the same
//!    weights and input, timed interleaved (A, B, A, B, ...) so that the machine's fast
//!    and slow periods hit both alike; the median of the per-round ratios is reported.
//! 2. The idle dispatch itself: one `AdapterSet::hidden` call on an empty set, times the
//!    number of hook calls in one forward, as a share of the forward's time.

mod common;

use adapters_core::{AdapterSet, ForwardCtx, Point, Site, SublayerIo};
use candle_core::{DType, Device, Tensor};
use common::*;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    adapters_kernels::tune_cpu_runtime();
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` compatibility
    }
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(15);
    let dev = Device::Cpu;
    let ours = bert();
    let dir = model_path("all-MiniLM-L6-v2");
    let config: candle_transformers::models::bert::Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev).unwrap() };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &config).unwrap();
    let (batch, seq) = (32, 128);
    let ids = token_ids(batch, seq, config.vocab_size as u32);
    let types = ids.zeros_like().unwrap();
    let ctx = ForwardCtx::inference();

    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let run_ours = || {
        ours.forward(&ids, None, None, &ctx).unwrap();
    };
    let run_ref = || {
        reference.forward(&ids, &types, None).unwrap();
    };
    run_ours();
    run_ref();
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so neither always follows the other.
        let (ta, tb) = if round % 2 == 0 {
            let ta = time(&run_ours);
            (ta, time(&run_ref))
        } else {
            let tb = time(&run_ref);
            (time(&run_ours), tb)
        };
        a.push(ta);
        b.push(tb);
        ratios.push(ta / tb);
    }

    let set = AdapterSet::default();
    let x = Tensor::zeros((batch, seq, 384), DType::F32, &dev).unwrap();
    let io = SublayerIo { input: &x, output: &x, post_norm: None };
    let calls = 200_000;
    let t = Instant::now();
    for i in 0..calls {
        std::hint::black_box(set.hidden(Point::new(i % 6, Site::FfnOutput), &io, &ctx).unwrap());
    }
    let per_call = t.elapsed().as_secs_f64() / calls as f64;
    let hooks_per_forward = 6 * 8;
    let share = per_call * hooks_per_forward as f64 / median(a.clone());

    let result = serde_json::json!({
        "threads": threads(),
        "rounds": rounds,
        "input": format!("MiniLM batch {batch} x seq {seq}"),
        "ours_median_s": median(a),
        "candle_transformers_median_s": median(b),
        "median_ratio_ours_over_candle_transformers": median(ratios),
        "idle_hook_call_ns": per_call * 1e9,
        "hook_calls_per_forward": hooks_per_forward,
        "idle_hooks_share_of_forward": share,
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("hook_overhead.json"), serde_json::to_string_pretty(&result).unwrap()).unwrap();
}

use std::path::PathBuf;
