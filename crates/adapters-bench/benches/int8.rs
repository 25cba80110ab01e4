//! 8-bit products against f32 at MiniLM's projection shapes over a batch of 32 x 128
//! tokens (4,096 rows), timed interleaved (see `adapters_bench`): the f32 product on a
//! frozen weight stored as the models store theirs (`transposed_storage`), against
//! [`adapters_kernels::Int8Matrix`] (weights per channel, activations per row quantised
//! at each call, included in its time); then the whole MiniLM forward at batch 32 x 128
//! with its projections in f32 and in 8 bits (`--quantize int8`, issue 34: 2x).

use adapters_bench::{interleave, to_json, write_result};
use adapters_core::ForwardCtx;
use adapters_kernels::{has_vnni, linear, transposed_storage, Int8Matrix};
use adapters_models::{fetched, load};
use candle_core::{Device, Tensor};

fn main() {
    adapters_kernels::tune_cpu_runtime();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let rows = 32 * 128;
    let shapes = [("attention projection 384 -> 384", 384, 384), ("FFN up 384 -> 1536", 1536, 384), ("FFN down 1536 -> 384", 384, 1536)];
    let cases: Vec<(String, Tensor, Tensor, Tensor, Int8Matrix)> = shapes
        .iter()
        .map(|&(name, out, inp)| {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 0.05, (out, inp), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 0.05, out, &Device::Cpu).unwrap();
            let q = Int8Matrix::quantize(&w).unwrap();
            (name.to_string(), x, transposed_storage(&w).unwrap(), b, q)
        })
        .collect();
    let mut variants: Vec<(String, Box<dyn Fn()>)> = Vec::new();
    for (name, x, w, b, q) in &cases {
        let (x, w, b, q) = (x.clone(), w.clone(), b.clone(), q.clone());
        let (x2, b2) = (x.clone(), b.clone());
        variants.push((format!("{name}, f32"), Box::new(move || drop(linear(&x, &w, Some(&b)).unwrap()))));
        variants.push((format!("{name}, int8"), Box::new(move || drop(q.matmul(&x2, Some(&b2)).unwrap()))));
    }
    // One comparison per shape: f32 the baseline, int8 the variant.
    let mut results = Vec::new();
    for pair in variants.chunks(2) {
        let refs: Vec<(&str, &dyn Fn())> = pair.iter().map(|(n, f)| (n.as_str(), f.as_ref())).collect();
        results.extend(interleave(&refs, rounds));
    }
    let vnni = if has_vnni() { "yes" } else { "no, portable loop" };
    let title = format!("8-bit products against f32, 4096 rows (AVX-512 VNNI: {vnni})");
    write_result("int8_products.json", &to_json(&title, &results, rounds));

    let f32_model = load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone;
    let mut int8_model = f32_model.clone();
    int8_model.use_int8().unwrap();
    let ids: Vec<u32> = (0..rows).map(|i| 1000 + (i as u32 * 7919) % 29522).collect();
    let ids = Tensor::from_vec(ids, (32, 128), &Device::Cpu).unwrap();
    let mask = Tensor::ones((32, 128), candle_core::DType::U32, &Device::Cpu).unwrap();
    let forward = |m: &adapters_models::Backbone| drop(m.hidden_states(&ids, &mask, &ForwardCtx::inference()).unwrap());
    let timings = interleave(&[("f32 projections", &|| forward(&f32_model)), ("int8 projections", &|| forward(&int8_model))], rounds);
    let title = format!("MiniLM forward, batch 32 x seq 128, projections in f32 and in 8 bits (AVX-512 VNNI: {vnni})");
    write_result("int8_forward.json", &to_json(&title, &timings, rounds));
}
