//! What composition costs, timed interleaved (see `adapters_bench`), MiniLM at batch 8 x
//! seq 128: AdapterFusion over 2, 4 and 8 Pfeiffer adapters against one Pfeiffer adapter;
//! and `parallel` over 4 adapters in one pass against 4 separate forwards (one per adapter).

use adapters_bench::{interleave, to_json, write_result};
use adapters_core::{registry, ForwardCtx, InsertionPoint, Placement, Setup};
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone};
use candle_core::{Device, Tensor};
use serde_json::json;

fn ids(batch: usize, seq: usize, vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..batch * seq).map(|i| 1000 + (i as u32 * 7919) % (vocab - 1000)).collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn attach(m: &mut Backbone, name: &str, kind: &str, config: serde_json::Value, seed: u64) {
    let a = registry::build(kind, &config, &Placement::default(), &m.model_info(), &Device::Cpu, seed).unwrap();
    m.adapters_mut().add(name, a).unwrap();
}

fn main() {
    adapters_kernels::tune_cpu_runtime();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = (adapters_bottleneck::family(), adapters_fusion::family());
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(9);
    let ctx = ForwardCtx::inference();
    let mut bert = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
    let names: Vec<String> = (0..8).map(|i| format!("a{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        attach(&mut bert, name, "seq_bn", json!({}), i as u64);
    }
    for n in [2, 4, 8] {
        let members = &names[..n];
        attach(&mut bert, &format!("fusion{n}"), "fusion", json!({ "members": members }), 100 + n as u64);
    }
    let input = ids(8, 128, 30522);
    let cell = std::cell::RefCell::new(bert);
    let with = |setup: String| {
        let (cell, input, ctx) = (&cell, &input, &ctx);
        let setup: Setup = setup.parse().unwrap();
        move || {
            let mut m = cell.borrow_mut();
            m.adapters_mut().set_setup(Some(setup.clone())).unwrap();
            let Backbone::Bert(b) = &*m else { unreachable!() };
            b.forward(input, None, None, ctx).unwrap();
        }
    };
    let fuse = |n: usize| with(format!("fuse({}; fusion=fusion{n})", names[..n].join(", ")));
    let (one, fuse2, fuse4, fuse8) = (with("a0".into()), fuse(2), fuse(4), fuse(8));
    let timings = interleave(
        &[
            ("one Pfeiffer adapter", &one),
            ("one Pfeiffer adapter again (noise control)", &one),
            ("fusion over 2 Pfeiffer adapters", &fuse2),
            ("fusion over 4 Pfeiffer adapters", &fuse4),
            ("fusion over 8 Pfeiffer adapters", &fuse8),
        ],
        rounds,
    );
    write_result("composition_fusion.json", &to_json("AdapterFusion, MiniLM forward, batch 8 x seq 128", &timings, rounds));

    let separate = || {
        for name in &names[..4] {
            with(name.clone())();
        }
    };
    let parallel = with(format!("parallel({})", names[..4].join(", ")));
    let timings = interleave(
        &[
            ("4 adapters, 4 separate forwards", &separate),
            ("4 adapters, 4 separate forwards again (noise control)", &separate),
            ("4 adapters, parallel(...) in one pass", &parallel),
        ],
        rounds,
    );
    write_result("composition_parallel.json", &to_json("Four task adapters on one batch, MiniLM, batch 8 x seq 128", &timings, rounds));
}
