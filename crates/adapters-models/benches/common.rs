//! Shared by the benchmarks: model paths and inputs.
#![allow(dead_code)]

use adapters_models::{load, Backbone, Bert, Llama};
use candle_core::{Device, Tensor};
use std::path::PathBuf;

pub fn model_path(name: &str) -> PathBuf {
    adapters_models::fetched(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn bert() -> Bert {
    match load(&model_path("all-MiniLM-L6-v2"), &Device::Cpu).unwrap().backbone {
        Backbone::Bert(m) => m,
        _ => unreachable!(),
    }
}

pub fn llama() -> Llama {
    match load(&model_path("SmolLM2-135M-Instruct.Q4_1.gguf"), &Device::Cpu).unwrap().backbone {
        Backbone::Llama(m) => m,
        _ => unreachable!(),
    }
}

/// Deterministic token ids `[batch, seq]` below `vocab`, avoiding the first 1000 ids.
pub fn token_ids(batch: usize, seq: usize, vocab: u32) -> Tensor {
    let ids: Vec<u32> = (0..batch * seq).map(|i| 1000 + (i as u32 * 7919) % (vocab - 1000)).collect();
    Tensor::from_vec(ids, (batch, seq), &Device::Cpu).unwrap()
}

/// The number of threads candle's CPU kernels use.
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}
