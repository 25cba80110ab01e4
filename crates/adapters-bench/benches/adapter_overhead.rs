//! What adapters add to the forward pass, timed interleaved (see `adapters_bench`):
//! MiniLM at batch 32 x seq 128 with no adapter and with each family at matched size
//! (about 113k parameters: Pfeiffer seq_bn r=24, Houlsby double_seq_bn r=12, parallel
//! par_bn r=24, LoRA r=12 on query and value unmerged and merged; and AdapterHub's default
//! par_bn); the time to switch a model between two adapters by activating the other
//! against LoRA's unmerge + merge; and SmolLM2 decode (batch 1, one token after 128) with
//! and without a Pfeiffer adapter. Targets (issue 9): an adapter adds at most 3%; merged
//! LoRA adds nothing measurable.

use adapters_bench::{interleave, to_json, write_result};
use adapters_core::{registry, ForwardCtx, InsertionPoint, Placement};
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone};
use candle_core::{Device, Tensor};
use serde_json::json;

fn ids(batch: usize, seq: usize, vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..batch * seq).map(|i| 1000 + (i as u32 * 7919) % (vocab - 1000)).collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn attach(m: &mut Backbone, name: &str, kind: &str, config: serde_json::Value) {
    let a = registry::build(kind, &config, &Placement::default(), &m.model_info(), &Device::Cpu, 1).unwrap();
    // Non-zero weights everywhere, so no variant is a no-op.
    for (_, v) in a.vars() {
        let t = v.as_tensor();
        v.set(&(t.ones_like().unwrap() * 0.01).unwrap()).unwrap();
    }
    m.adapters_mut().add(name, a).unwrap();
}

fn main() {
    adapters_kernels::tune_cpu_runtime();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = (adapters_bottleneck::family(), adapters_lora::family());
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(15);
    let ctx = ForwardCtx::inference();
    let input = ids(32, 128, 30522);
    // One model per variant, set up before timing: a timed call only runs a forward.
    let minilm = |adapter: Option<(&str, serde_json::Value)>, merged: bool| {
        let mut m = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
        if let Some((kind, config)) = adapter {
            attach(&mut m, "a", kind, config);
            m.adapters_mut().activate(&["a"]).unwrap();
            if merged {
                m.merge("a").unwrap();
            }
        }
        let Backbone::Bert(b) = m else { unreachable!() };
        b
    };
    let lora = || ("lora", json!({"r": 12, "alpha": 24}));
    let models = [
        minilm(None, false),
        minilm(Some(("seq_bn", json!({}))), false),
        minilm(Some(("double_seq_bn", json!({"reduction_factor": 32}))), false),
        minilm(Some(("par_bn", json!({"reduction_factor": 16}))), false),
        minilm(Some(("par_bn", json!({}))), false),
        minilm(Some(lora()), false),
        minilm(Some(lora()), true),
    ];
    let forwards: Vec<_> = models
        .iter()
        .map(|b| {
            let (input, ctx) = (&input, &ctx);
            move || {
                b.forward(input, None, None, ctx).unwrap();
            }
        })
        .collect();
    let timings = interleave(
        &[
            ("no adapter", &forwards[0]),
            ("no adapter again (noise control)", &forwards[0]),
            ("seq_bn (Pfeiffer, r=24)", &forwards[1]),
            ("double_seq_bn (Houlsby, r=12 twice)", &forwards[2]),
            ("par_bn (r=24, s=4)", &forwards[3]),
            ("par_bn (AdapterHub default, r=192, s=4)", &forwards[4]),
            ("LoRA r=12 q,v unmerged", &forwards[5]),
            ("LoRA r=12 q,v merged", &forwards[6]),
        ],
        rounds,
    );
    write_result("adapter_overhead_minilm.json", &to_json("MiniLM forward, batch 32 x seq 128", &timings, rounds));
    drop(models);

    // Switching between two adapters: bottleneck adapters by activating the other (the
    // weights stay where they are), LoRA by unmerging one and merging the other. Each
    // timed call switches once, alternating direction.
    let two = |kind: &str, config: serde_json::Value| {
        let mut m = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
        attach(&mut m, "a", kind, config.clone());
        attach(&mut m, "b", kind, config);
        std::cell::RefCell::new((m, true))
    };
    let (bottleneck, merged) = (two("seq_bn", json!({})), two("lora", json!({"r": 12, "alpha": 24})));
    merged.borrow_mut().0.merge("a").unwrap();
    let activate = || {
        let (m, on_a) = &mut *bottleneck.borrow_mut();
        m.adapters_mut().activate(&[if *on_a { "b" } else { "a" }]).unwrap();
        *on_a = !*on_a;
    };
    let remerge = || {
        let (m, on_a) = &mut *merged.borrow_mut();
        let (from, to) = if *on_a { ("a", "b") } else { ("b", "a") };
        m.unmerge(from).unwrap();
        m.merge(to).unwrap();
        *on_a = !*on_a;
    };
    let timings = interleave(
        &[("seq_bn: activate the other adapter", &activate), ("LoRA r=12 q,v: unmerge one, merge the other", &remerge)],
        rounds * 4,
    );
    write_result("adapter_switch_minilm.json", &to_json("Switching MiniLM between two adapters", &timings, rounds * 4));

    let mut llama = load(&fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap(), &Device::Cpu).unwrap().backbone;
    attach(&mut llama, "pfeiffer", "seq_bn", json!({}));
    let Backbone::Llama(l) = &llama else { unreachable!() };
    let mut cache = l.new_cache();
    l.last_logits(&ids(1, 128, 49152), Some(&mut cache), &ctx).unwrap();
    let next = ids(1, 1, 49152);
    let cell = std::cell::RefCell::new(llama);
    let step = |names: &'static [&'static str]| {
        let (cell, cache, next, ctx) = (&cell, &cache, &next, &ctx);
        move || {
            cell.borrow_mut().adapters_mut().activate(names).unwrap();
            let m = cell.borrow();
            let Backbone::Llama(l) = &*m else { unreachable!() };
            // 8 decode steps per timing, each from the same 128-token cache.
            for _ in 0..8 {
                let mut c = cache.clone();
                l.last_logits(next, Some(&mut c), ctx).unwrap();
            }
        }
    };
    let (plain, adapted) = (step(&[]), step(&["pfeiffer"]));
    let timings =
        interleave(&[("no adapter", &plain), ("no adapter again (noise control)", &plain), ("seq_bn (Pfeiffer)", &adapted)], rounds * 3);
    write_result(
        "adapter_overhead_smollm2_decode.json",
        &to_json("SmolLM2 decode, batch 1, 8 tokens after a 128-token prompt", &timings, rounds * 3),
    );
}
