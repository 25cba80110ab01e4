//! Forward-pass speed of both backbones with no adapter attached:
//! MiniLM at batch 32 x seq 128, SmolLM2 prefill at batch 4 x seq 128, and SmolLM2
//! decode (one token at batch 1 after a 128-token prompt; tokens/s = 1 / time).

mod common;

use adapters_core::ForwardCtx;
use common::*;
use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

fn backbones(c: &mut Criterion) {
    eprintln!("candle CPU threads: {}", threads());
    let ctx = ForwardCtx::inference();
    let mut group = c.benchmark_group("backbones");
    group.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(20));

    let bert = bert();
    let ids = token_ids(32, 128, bert.config.vocab_size as u32);
    group.bench_function("minilm_forward_b32_s128", |b| b.iter(|| bert.forward(&ids, None, None, &ctx).unwrap()));
    drop(bert);

    let llama = llama();
    let ids = token_ids(4, 128, llama.config.vocab_size as u32);
    group.bench_function("smollm2_prefill_b4_s128", |b| b.iter(|| llama.last_logits(&ids, None, &ctx).unwrap()));

    let prompt = token_ids(1, 128, llama.config.vocab_size as u32);
    let mut cache = llama.new_cache();
    llama.last_logits(&prompt, Some(&mut cache), &ctx).unwrap();
    let next = token_ids(1, 1, llama.config.vocab_size as u32);
    group.bench_function("smollm2_decode_token_b1_after128", |b| {
        b.iter(|| {
            let mut step_cache = cache.clone();
            llama.last_logits(&next, Some(&mut step_cache), &ctx).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, backbones);
criterion_main!(benches);
