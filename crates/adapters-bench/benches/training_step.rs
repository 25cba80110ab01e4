//! One training step (forward in training mode, cross-entropy on a classification head,
//! backward, clipping, AdamW) on MiniLM at batch 32 x seq 128: Pfeiffer adapter, LoRA
//! r=8 on query and value, and full fine-tuning; timed interleaved against full
//! fine-tuning, with the peak heap memory of one step (counted by a global allocator).

use adapters_bench::{interleave, to_json, write_result};
use adapters_core::{registry, ForwardCtx, InsertionPoint, Placement};
use adapters_models::heads::ClassificationHead;
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone};
use adapters_train::config::Pooling;
use adapters_train::forward::{classify, pooled};
use adapters_train::optim::{clip_grad_norm, AdamW};
use candle_core::{Device, Tensor, Var};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts live heap bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A model with what trains in it, its head and optimizer.
struct Setup {
    model: Backbone,
    head: ClassificationHead,
    vars: Vec<Var>,
    optimizer: AdamW,
    /// Trainable parameters: each costs a gradient in the step and two AdamW moments
    /// held between steps.
    trainable: usize,
}

fn setup(kind: Option<(&str, serde_json::Value)>, full: bool) -> Setup {
    let mut model = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
    let mut named = Vec::new();
    if full {
        named.extend(model.make_trainable().unwrap());
    }
    if let Some((kind, config)) = kind {
        let a = registry::build(kind, &config, &Placement::default(), &model.model_info(), &Device::Cpu, 1).unwrap();
        named.extend(a.vars());
        model.adapters_mut().add("a", a).unwrap();
        model.adapters_mut().activate(&["a"]).unwrap();
    }
    let head = ClassificationHead::new(384, 2, 1, &Device::Cpu).unwrap();
    named.extend(head.vars());
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let trainable = vars.iter().map(|v| v.elem_count()).sum();
    let optimizer = AdamW::new(named, 0.01).unwrap();
    Setup { model, head, vars, optimizer, trainable }
}

fn step(s: &mut Setup, rows: &[&[u32]], labels: &Tensor) {
    let ctx = ForwardCtx::training_seeded(1);
    let f = pooled(&s.model, rows, Pooling::Mean, &ctx).unwrap();
    let logits = classify(&s.head, &f, 0.1, &ctx).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, labels).unwrap();
    let mut grads = loss.backward().unwrap();
    clip_grad_norm(&s.vars, &mut grads, 1.0).unwrap();
    s.optimizer.step(&grads, 1e-4).unwrap();
}

fn main() {
    adapters_core::kernels::keep_freed_buffers();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = (adapters_bottleneck::family(), adapters_lora::family());
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    let ids: Vec<Vec<u32>> = (0..32).map(|r| (0..128).map(|i| 1000 + ((r * 128 + i) as u32 * 7919) % 29000).collect()).collect();
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let labels = Tensor::new((0..32u32).map(|i| i % 2).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let variants: Vec<(&str, RefCell<Setup>)> = vec![
        ("full fine-tuning", RefCell::new(setup(None, true))),
        ("Pfeiffer adapter (seq_bn, r=24)", RefCell::new(setup(Some(("seq_bn", json!({"reduction_factor": 16}))), false))),
        ("LoRA r=8 on query, value", RefCell::new(setup(Some(("lora", json!({"r": 8, "alpha": 16}))), false))),
    ];
    let mut peaks = Vec::new();
    for (name, s) in &variants {
        let (rows, labels) = (&rows, &labels);
        step(&mut s.borrow_mut(), rows, labels); // warm: optimizer state allocated
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        step(&mut s.borrow_mut(), rows, labels);
        let peak = PEAK.load(Ordering::Relaxed) - before;
        eprintln!("{name}: peak {:.0} MB above the {:.0} MB held before the step", peak as f64 / 1e6, before as f64 / 1e6);
        peaks.push(peak);
    }
    let fns: Vec<Box<dyn Fn()>> = variants
        .iter()
        .map(|(_, s)| {
            let (rows, labels) = (&rows, &labels);
            Box::new(move || step(&mut s.borrow_mut(), rows, labels)) as Box<dyn Fn()>
        })
        .collect();
    let named: Vec<(&str, &dyn Fn())> = variants.iter().zip(&fns).map(|((n, _), f)| (*n, f.as_ref())).collect();
    let timings = interleave(&named, rounds);
    let mut result = to_json("Training step, MiniLM b32 x s128 (forward, backward, AdamW)", &timings, rounds);
    for ((v, peak), (_, s)) in result["variants"].as_array_mut().unwrap().iter_mut().zip(&peaks).zip(&variants) {
        v["peak_step_mb"] = json!(*peak as f64 / 1e6);
        v["optimizer_state_mb"] = json!(s.borrow().trainable as f64 * 8.0 / 1e6);
    }
    write_result("training_step.json", &result);
}
