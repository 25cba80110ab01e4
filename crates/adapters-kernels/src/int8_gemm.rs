//! Products with 8-bit weights and 8-bit activations, for forwards over many rows (an
//! encoder's batch), where arithmetic, not reading the weights, bounds the time: weights
//! quantised symmetrically per output channel once, activations per row at each call
//! with their own range (asymmetric, as ONNX Runtime's dynamic quantisation: a GELU's
//! output, mostly positive, keeps all 256 levels), products summed exactly in 32-bit
//! integers. On CPUs with AVX-512 VNNI one `vpdpbusd` does 64
//! multiply-adds, four times an f32 FMA's; elsewhere a portable loop gives the same
//! numbers, slowly. (The few-row decoding kernel, [`crate::int8`], keeps activations f32.)
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: a row's activations are `u = round(x /
//! s) + z ∈ [0, 255]` (`z` the row's zero point), and the offset is removed at the end:
//! `Σ (u - z) w = Σ u w - z Σ w`.

use super::simd::multiversion;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Output channels per packed panel (one 512-bit register of i32 sums).
const PANEL: usize = 16;
/// Rows per microkernel call.
const ROWS: usize = 8;
/// Rows per parallel task: their activations stay in cache across every panel.
const TASK_ROWS: usize = 64;

/// A `[out, in]` weight in 8 bits, one scale per output channel, packed for the kernel.
#[derive(Clone, Debug)]
pub struct Int8Matrix {
    out: usize,
    inp: usize,
    /// `in` rounded up to a multiple of 4 (the kernel takes 4 bytes at a time).
    depth: usize,
    /// Per output channel: `max |w| / 127`.
    scales: Vec<f32>,
    /// Per output channel: `Σ_k q[n, k]`, times a row's zero point the offset to remove.
    sums: Vec<i32>,
    /// Panels of [`PANEL`] output channels (the last padded with zero channels): for each
    /// group of 4 inputs, 4 bytes per channel, `[out / PANEL][depth / 4][PANEL][4]`.
    packed: Vec<i8>,
}

impl Int8Matrix {
    /// Quantises `weight` `[out, in]` per output channel: `q = round(w / s)` with
    /// `s = max |w| / 127`, so each element is off by at most `s / 2`.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        let w = weight.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
        let depth = inp.next_multiple_of(4);
        let panels = out.div_ceil(PANEL);
        super::with_values([&w], "int8 matrix", |[w]| {
            let mut scales = vec![0f32; out];
            let mut sums = vec![0i32; out];
            let mut packed = vec![0i8; panels * PANEL * depth];
            for n in 0..out {
                let row = &w[n * inp..(n + 1) * inp];
                let max = row.iter().fold(0f32, |a, &b| a.max(b.abs()));
                scales[n] = max / 127.0;
                let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                let (panel, lane) = (n / PANEL, n % PANEL);
                let mut sum = 0i32;
                for (k, &v) in row.iter().enumerate() {
                    let q = (v * inv).round() as i8;
                    sum += q as i32;
                    packed[panel * PANEL * depth + (k / 4) * PANEL * 4 + lane * 4 + k % 4] = q;
                }
                sums[n] = sum;
            }
            Int8Matrix { out, inp, depth, scales, sums, packed }
        })
    }

    /// Output channels.
    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// `x Wᵀ + b` for `x` `[..., in]` (f32, CPU), each row of `x` quantised to 8 bits over
    /// its own range; no gradient.
    pub fn matmul(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.product(x, bias, false)
    }

    /// `gelu(x) Wᵀ + b` (erf GELU), the activation applied row by row as the rows are
    /// quantised: `gelu(x)` is never stored (a BERT feed-forward's down projection).
    pub fn gelu_matmul(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.product(x, bias, true)
    }

    fn product(&self, x: &Tensor, bias: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&self.inp) {
            candle_core::bail!("int8 matrix: input {:?} does not end in the weight's width {}", x.dims(), self.inp);
        }
        if bias.is_some_and(|b| b.elem_count() != self.out) {
            candle_core::bail!("int8 matrix: bias {:?} does not fit {} outputs", bias.map(Tensor::shape), self.out);
        }
        let rows = x.elem_count() / self.inp.max(1);
        let bias = match bias {
            Some(b) => b.to_dtype(candle_core::DType::F32)?,
            None => Tensor::zeros(self.out, candle_core::DType::F32, x.device())?,
        };
        let mut y = vec![0f32; rows * self.out];
        super::with_values([x, &bias], "int8 matrix", |[x, bias]| {
            let vnni = has_vnni();
            y.par_chunks_mut(TASK_ROWS * self.out).enumerate().for_each(|(task, y)| {
                let first = task * TASK_ROWS;
                let count = y.len() / self.out;
                let mut a = vec![0u8; count * self.depth];
                let mut row_scales = vec![0f32; count];
                let mut zeros = vec![0i32; count];
                quantize_rows(
                    &x[first * self.inp..(first + count) * self.inp],
                    self.inp,
                    self.depth,
                    gelu,
                    &mut a,
                    &mut row_scales,
                    &mut zeros,
                );
                let mut start = 0;
                while start < count {
                    let n = ROWS.min(count - start);
                    let block = Block {
                        a: &a[start * self.depth..(start + n) * self.depth],
                        row_scales: &row_scales[start..start + n],
                        zeros: &zeros[start..start + n],
                        y: &mut y[start * self.out..(start + n) * self.out],
                    };
                    if vnni {
                        // SAFETY: the CPU has the features `rows_vnni` is compiled for.
                        unsafe { rows_vnni(self, bias, block) };
                    } else {
                        rows_portable(self, bias, block);
                    }
                    start += n;
                }
            });
        })?;
        *dims.last_mut().expect("x has a last dimension") = self.out;
        Tensor::from_vec(y, dims, x.device())
    }
}

/// Whether this CPU runs the VNNI kernel.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Each row of `x` (`[rows, inp]`), or of `gelu(x)`, as `u = round(x / s) + z` in `a`
/// (`[rows, depth]`, padding 0), with its scale `s` and zero point `z` (see
/// [`quantize_row`]).
fn quantize_rows(x: &[f32], inp: usize, depth: usize, gelu: bool, a: &mut [u8], scales: &mut [f32], zeros: &mut [i32]) {
    let mut activated = vec![0f32; if gelu { inp } else { 0 }];
    for (((row, q), s), z) in x.chunks_exact(inp).zip(a.chunks_exact_mut(depth)).zip(scales).zip(zeros) {
        let row = if gelu {
            super::gelu::forward_chunk(row, &mut activated);
            &activated
        } else {
            row
        };
        (*s, *z) = quantize_row(row, &mut q[..inp]);
        q[inp..].fill(0);
    }
}

multiversion! {
    /// `u = round(x / s) + z` over the row's range widened to hold 0 (`s = (max - min) /
    /// 255`, `z = round(-min / s)`, so 0 is exact); returns `(s, z)`.
    fn quantize_row(x: &[f32], q: &mut [u8]) -> (f32, i32) {
        // Independent lanes, so that the extremes vectorise.
        let (mut low, mut high) = ([0f32; 16], [0f32; 16]);
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                low[i] = if c[i] < low[i] { c[i] } else { low[i] };
                high[i] = if c[i] > high[i] { c[i] } else { high[i] };
            }
        }
        let rest = chunks.remainder();
        let min = rest.iter().chain(&low).fold(0f32, |m, &v| if v < m { v } else { m });
        let max = rest.iter().chain(&high).fold(0f32, |m, &v| if v > m { v } else { m });
        let scale = (max - min) / 255.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let zero = (-min * inv).round_ties_even();
        // In [0, 255] but for rounding at the ends, which the saturating cast absorbs.
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * inv + zero).round_ties_even() as u8;
        }
        (scale, zero as i32)
    }
}

/// Up to [`ROWS`] rows: their quantised activations, scales, zero points and outputs.
struct Block<'a> {
    a: &'a [u8],
    row_scales: &'a [f32],
    zeros: &'a [i32],
    y: &'a mut [f32],
}

/// The same sums as the VNNI kernel, one at a time.
fn rows_portable(m: &Int8Matrix, bias: &[f32], block: Block) {
    let Block { a, row_scales, zeros, y } = block;
    for (r, ((a, &s), &z)) in a.chunks_exact(m.depth).zip(row_scales).zip(zeros).enumerate() {
        for n in 0..m.out {
            let (panel, lane) = (n / PANEL, n % PANEL);
            let w = &m.packed[panel * PANEL * m.depth..(panel + 1) * PANEL * m.depth];
            let mut acc = 0i32;
            for g in 0..m.depth / 4 {
                for i in 0..4 {
                    acc += a[g * 4 + i] as i32 * w[g * PANEL * 4 + lane * 4 + i] as i32;
                }
            }
            y[r * m.out + n] = ((acc - z * m.sums[n]) as f32).mul_add(s * m.scales[n], bias[n]);
        }
    }
}

/// Up to [`ROWS`] rows through every panel, two panels (32 outputs) at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_vnni(m: &Int8Matrix, bias: &[f32], block: Block) {
    match block.row_scales.len() {
        8 => panels::<8>(m, bias, block),
        7 => panels::<7>(m, bias, block),
        6 => panels::<6>(m, bias, block),
        5 => panels::<5>(m, bias, block),
        4 => panels::<4>(m, bias, block),
        3 => panels::<3>(m, bias, block),
        2 => panels::<2>(m, bias, block),
        1 => panels::<1>(m, bias, block),
        _ => {}
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn rows_vnni(m: &Int8Matrix, bias: &[f32], block: Block) {
    rows_portable(m, bias, block)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn panels<const R: usize>(m: &Int8Matrix, bias: &[f32], block: Block) {
    use std::arch::x86_64::*;
    let Block { a, row_scales, zeros, y } = block;
    let panels = m.out.div_ceil(PANEL);
    let panel_bytes = PANEL * m.depth;
    let mut p = 0;
    while p < panels {
        let pair = p + 1 < panels;
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        let b0 = m.packed.as_ptr().add(p * panel_bytes);
        let b1 = if pair { b0.add(panel_bytes) } else { b0 };
        for g in 0..m.depth / 4 {
            let w0 = _mm512_loadu_si512(b0.add(g * 64) as *const _);
            let w1 = _mm512_loadu_si512(b1.add(g * 64) as *const _);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32((a.as_ptr().add(r * m.depth + g * 4) as *const i32).read_unaligned());
                acc[0] = _mm512_dpbusd_epi32(acc[0], x, w0);
                acc[1] = _mm512_dpbusd_epi32(acc[1], x, w1);
            }
        }
        for half in 0..if pair { 2 } else { 1 } {
            let n0 = (p + half) * PANEL;
            let valid = PANEL.min(m.out - n0);
            let mask: __mmask16 = if valid == PANEL { !0 } else { (1u16 << valid) - 1 };
            let sums = _mm512_maskz_loadu_epi32(mask, m.sums.as_ptr().add(n0));
            let scales = _mm512_maskz_loadu_ps(mask, m.scales.as_ptr().add(n0));
            let b = _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(n0));
            for (r, acc) in acc.iter().enumerate() {
                let offsets = _mm512_mullo_epi32(sums, _mm512_set1_epi32(zeros[r]));
                let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[half], offsets));
                let scale = _mm512_mul_ps(scales, _mm512_set1_ps(row_scales[r]));
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(r * m.out + n0), mask, _mm512_fmadd_ps(exact, scale, b));
            }
        }
        p += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        let mut init = adapters_init(seed);
        Tensor::from_vec((0..shape.0 * shape.1).map(|_| init()).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }

    /// A seeded normal-ish generator (sum of uniforms), so failures replay.
    fn adapters_init(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        move || {
            let mut t = 0f32;
            for _ in 0..4 {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                t += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            t
        }
    }

    /// The 8-bit product equals the f64 product of the dequantised operands (the integer
    /// sums are exact), on both kernels, for shapes with every kind of tail.
    #[test]
    fn int8_matrix_equals_the_product_of_its_dequantised_operands() {
        for (rows, out, inp) in [(1, 16, 4), (7, 33, 10), (19, 48, 64), (70, 17, 386)] {
            let (x, w) = (randn((rows, inp), 1), randn((out, inp), 2));
            let b = randn((1, out), 3).flatten_all().unwrap();
            let m = Int8Matrix::quantize(&w).unwrap();
            let y: Vec<f32> = m.matmul(&x, Some(&b)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // Dequantised operands, from the same rules.
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let bv: Vec<f32> = b.to_vec1().unwrap();
            // Weights: symmetric, per channel.
            let q = |v: &[f32]| -> (f64, Vec<f64>) {
                let max = v.iter().fold(0f32, |a, &b| a.max(b.abs()));
                let s = max / 127.0;
                (s as f64, v.iter().map(|&e| (e * (127.0 / max)).round() as f64).collect())
            };
            // Activations: over the row's range holding 0, `u - z`.
            let qa = |v: &[f32]| -> (f64, Vec<f64>) {
                let (min, max) = v.iter().fold((0f32, 0f32), |(lo, hi), &e| (lo.min(e), hi.max(e)));
                let s = (max - min) / 255.0;
                let z = (-min / s).round_ties_even();
                (s as f64, v.iter().map(|&e| ((e / s + z).round_ties_even().clamp(0.0, 255.0) - z) as f64).collect())
            };
            for r in 0..rows {
                let (sx, qx) = qa(&xv[r * inp..(r + 1) * inp]);
                for n in 0..out {
                    let (sw, qw) = q(&wv[n * inp..(n + 1) * inp]);
                    let dot: f64 = qx.iter().zip(&qw).map(|(a, b)| a * b).sum();
                    let want = dot * sx * sw + bv[n] as f64;
                    let got = y[r * out + n] as f64;
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{rows}x{out}x{inp}: y[{r},{n}] = {got}, want {want}");
                }
            }
            // And close to the exact f32 product: 8 bits each side.
            let exact: Vec<f32> = (x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap()).flatten_all().unwrap().to_vec1().unwrap();
            let norm = exact.iter().map(|v| v * v).sum::<f32>().sqrt();
            let err = exact.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            assert!(err <= 0.02 * norm, "{rows}x{out}x{inp}: relative error {} against f32", err / norm);
        }
    }

    /// The GELU applied while quantising equals the product of the GELU's output.
    #[test]
    fn gelu_inside_equals_gelu_before() {
        let (x, w) = (randn((13, 96), 6), randn((40, 96), 7));
        let m = Int8Matrix::quantize(&w).unwrap();
        let inside = m.gelu_matmul(&x, None).unwrap();
        let before = m.matmul(&crate::gelu_erf(&x).unwrap(), None).unwrap();
        assert_eq!(inside.flatten_all().unwrap().to_vec1::<f32>().unwrap(), before.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    /// The VNNI kernel and the portable loop agree bit for bit where both run.
    #[test]
    fn vnni_and_portable_kernels_agree() {
        if !has_vnni() {
            eprintln!("no AVX-512 VNNI here: the portable kernel alone is checked");
            return;
        }
        let (x, w) = (randn((21, 200), 4), randn((50, 200), 5));
        let m = Int8Matrix::quantize(&w).unwrap();
        let fast: Vec<f32> = m.matmul(&x, None).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let (mut a, mut s, mut z) = (vec![0u8; 21 * m.depth], vec![0f32; 21], vec![0i32; 21]);
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        quantize_rows(&xv, 200, m.depth, false, &mut a, &mut s, &mut z);
        let mut slow = vec![0f32; 21 * 50];
        for start in (0..21).step_by(ROWS) {
            let end = (start + ROWS).min(21);
            let block = Block {
                a: &a[start * m.depth..end * m.depth],
                row_scales: &s[start..end],
                zeros: &z[start..end],
                y: &mut slow[start * 50..end * 50],
            };
            rows_portable(&m, &[0f32; 50], block);
        }
        assert_eq!(fast, slow);
    }
}
