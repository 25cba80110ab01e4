//! One training step (forward in training mode, cross-entropy on a classification head,
//! backward, clipping, AdamW) on MiniLM at batch 32 x seq 128: Pfeiffer adapter, LoRA
//! r=8 on query and value, both also with gradient checkpointing, and full fine-tuning;
//! timed interleaved against full fine-tuning, with the peak heap memory of one step
//! (counted by a global allocator).

use adapters_bench::workloads::{minilm_train, Step};
use adapters_bench::{interleave, to_json, write_result};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts live heap bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Live heap bytes when the forward pass of the measured step has finished.
static AFTER_FORWARD: AtomicUsize = AtomicUsize::new(0);

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

fn main() {
    adapters_kernels::tune_cpu_runtime();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    // The same steps as `bench-workload minilm_train_*` (the PyTorch comparison).
    let variants: Vec<(&str, RefCell<Step>, usize)> = [
        ("full fine-tuning", "full"),
        ("Pfeiffer adapter (seq_bn, r=24)", "seq_bn"),
        ("LoRA r=8 on query, value", "lora"),
        ("Pfeiffer adapter, gradient checkpointing", "seq_bn_ckpt"),
        ("LoRA r=8, gradient checkpointing", "lora_ckpt"),
    ]
    .into_iter()
    .map(|(name, method)| {
        let (step, trainable) = minilm_train(method, || AFTER_FORWARD.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed)).unwrap();
        (name, RefCell::new(step), trainable)
    })
    .collect();
    let run = |s: &RefCell<Step>| (s.borrow_mut())().unwrap();
    let mut peaks = Vec::new();
    for (name, s, _) in &variants {
        run(s); // warm: optimizer state allocated
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        run(s);
        let peak = PEAK.load(Ordering::Relaxed) - before;
        let held = AFTER_FORWARD.load(Ordering::Relaxed) - before;
        eprintln!(
            "{name}: peak {:.0} MB above the {:.0} MB held before the step; the forward holds {:.0} MB for the backward",
            peak as f64 / 1e6,
            before as f64 / 1e6,
            held as f64 / 1e6
        );
        peaks.push((peak, held));
    }
    let fns: Vec<Box<dyn Fn()>> = variants.iter().map(|(_, s, _)| Box::new(move || run(s)) as Box<dyn Fn()>).collect();
    let named: Vec<(&str, &dyn Fn())> = variants.iter().zip(&fns).map(|((n, _, _), f)| (*n, f.as_ref())).collect();
    let timings = interleave(&named, rounds);
    let mut result = to_json("Training step, MiniLM b32 x s128 (forward, backward, AdamW)", &timings, rounds);
    for ((v, (peak, held)), (_, _, trainable)) in result["variants"].as_array_mut().unwrap().iter_mut().zip(&peaks).zip(&variants) {
        v["peak_step_mb"] = json!(*peak as f64 / 1e6);
        v["held_after_forward_mb"] = json!(*held as f64 / 1e6);
        v["optimizer_state_mb"] = json!(*trainable as f64 * 8.0 / 1e6);
    }
    write_result("training_step.json", &result);
}
