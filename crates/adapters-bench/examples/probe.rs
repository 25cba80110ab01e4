use candle_core::{Device, Tensor};
use std::time::Instant;
fn gf(name: &str, a: &Tensor, b: &Tensor, flops: f64) {
    let _ = a.matmul(b).unwrap();
    let mut best = f64::MAX;
    let mut ts = vec![];
    for _ in 0..8 {
        let t = Instant::now();
        let _ = a.matmul(b).unwrap();
        let e = t.elapsed().as_secs_f64();
        ts.push(e);
        best = best.min(e);
    }
    ts.sort_by(f64::total_cmp);
    println!("{name}: median {:.1} GF/s best {:.1}", flops / ts[4] / 1e9, flops / best / 1e9);
}
fn main() {
    let d = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &d).unwrap();
    gf("1024^3", &r(&[1024, 1024]), &r(&[1024, 1024]), 2.0 * 1024f64.powi(3));
    gf("4096x384x384 (x W^T)", &r(&[4096, 384]), &r(&[384, 384]).t().unwrap(), 2.0 * 4096.0 * 384.0 * 384.0);
    gf("4096x384x1536", &r(&[4096, 384]), &r(&[1536, 384]).t().unwrap(), 2.0 * 4096.0 * 384.0 * 1536.0);
    gf("4096x1536x384", &r(&[4096, 1536]), &r(&[384, 1536]).t().unwrap(), 2.0 * 4096.0 * 384.0 * 1536.0);
    gf("wgrad 384x4096x1536", &r(&[4096, 384]).t().unwrap(), &r(&[4096, 1536]), 2.0 * 4096.0 * 384.0 * 1536.0);
    gf("attn QK^T 384x[128x32x128]", &r(&[32, 12, 128, 32]), &r(&[32, 12, 128, 32]).t().unwrap(), 2.0 * 384.0 * 128.0 * 128.0 * 32.0);
    let q = r(&[32, 128, 384]);
    let _ = adapters_core::kernels::attention(&q, &q, &q, 12, 12, None, 0.17).unwrap();
    let mut ts = vec![];
    for _ in 0..8 {
        let t = Instant::now();
        let _ = adapters_core::kernels::attention(&q, &q, &q, 12, 12, None, 0.17).unwrap();
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    println!("fused attention fwd: median {:.1} ms = {:.1} GF/s", ts[4] * 1e3, 0.805e9 / ts[4] / 1e9);
    let x = r(&[4096, 384]);
    let w = r(&[1536, 384]);
    let b = r(&[1536]);
    let mut ts = vec![];
    for _ in 0..8 {
        let t = Instant::now();
        let _ = adapters_core::kernels::linear(&x, &w, Some(&b)).unwrap();
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    println!("fused linear 4096x384->1536: median {:.2} ms = {:.1} GF/s", ts[4] * 1e3, 2.0 * 4096.0 * 384.0 * 1536.0 / ts[4] / 1e9);
    gf("attn PV 384x[128x128x32]", &r(&[32, 12, 128, 128]), &r(&[32, 12, 128, 32]), 2.0 * 384.0 * 128.0 * 128.0 * 32.0);
}
#[allow(dead_code)]
fn attn_probe() {}
