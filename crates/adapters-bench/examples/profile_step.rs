//! Runs one workload N times for a sampling profiler: `forward`, `full`, `seq_bn`, `lora`.
use adapters_core::InsertionPoint;
use adapters_core::{registry, ForwardCtx, Placement};
use adapters_models::heads::ClassificationHead;
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load};
use adapters_train::config::Pooling;
use adapters_train::forward::{classify, pooled};
use adapters_train::optim::{clip_grad_norm, AdamW};
use candle_core::{Device, Tensor, Var};
use serde_json::json;
use std::time::Instant;

fn main() {
    adapters_core::kernels::keep_freed_buffers();
    let _ = (adapters_bottleneck::family(), adapters_lora::family());
    let what = std::env::args().nth(1).unwrap_or("forward".into());
    let n: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut model = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
    let ids: Vec<Vec<u32>> = (0..32).map(|r| (0..128).map(|i| 1000 + ((r * 128 + i) as u32 * 7919) % 29000).collect()).collect();
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let labels = Tensor::new((0..32u32).map(|i| i % 2).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let mut named = Vec::new();
    match what.as_str() {
        "full" => named.extend(model.make_trainable().unwrap()),
        "seq_bn" | "lora" => {
            let (kind, cfg) =
                if what == "lora" { ("lora", json!({"r": 8, "alpha": 16})) } else { ("seq_bn", json!({"reduction_factor": 16})) };
            let a = registry::build(kind, &cfg, &Placement::default(), &model.model_info(), &Device::Cpu, 1).unwrap();
            named.extend(a.vars());
            model.adapters_mut().add("a", a).unwrap();
            model.adapters_mut().activate(&["a"]).unwrap();
        }
        _ => {}
    }
    let head = ClassificationHead::new(384, 2, 1, &Device::Cpu).unwrap();
    named.extend(head.vars());
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(named, 0.01).unwrap();
    for i in 0..n {
        let t = Instant::now();
        if what == "forward" {
            let _ = pooled(&model, &rows, Pooling::Mean, &ForwardCtx::inference()).unwrap();
        } else {
            let ctx = ForwardCtx::training_seeded(1);
            let f = pooled(&model, &rows, Pooling::Mean, &ctx).unwrap();
            let logits = classify(&head, &f, 0.1, &ctx).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
            let t1 = t.elapsed().as_secs_f64();
            let mut grads = loss.backward().unwrap();
            let t2 = t.elapsed().as_secs_f64();
            clip_grad_norm(&vars, &mut grads, 1.0).unwrap();
            opt.step(&grads, 1e-4).unwrap();
            eprintln!("  fwd {t1:.3} bwd {:.3} opt {:.3}", t2 - t1, t.elapsed().as_secs_f64() - t2);
        }
        eprintln!("{what} {i}: {:.3} s", t.elapsed().as_secs_f64());
    }
}
