//! Each fused kernel against its composed twin (value and every input's gradient), and
//! against central finite differences.

use super::{attention, cross_entropy, gelu, linear, norm, rope, rows, swiglu};
use candle_core::{Device, Result, Tensor, Var};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A fixed random projection of the output, so every output element matters to the loss.
fn loss(y: &Tensor, seed: u64) -> Result<Tensor> {
    (y * randn(y.dims(), seed))?.sum_all()
}

/// Runs `f` on variables made from `inputs`; returns the output and each input's gradient.
fn value_and_grads(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let grads = loss(&y, 99)?.backward()?;
    Ok((y, vars.iter().map(|v| grads.get(v).expect("every input gets a gradient").clone()).collect()))
}

/// Fused and composed agree in value and gradients; the fused gradients also agree with
/// central finite differences of the fused forward at a few coordinates of each input.
fn check(
    name: &str,
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let (yf, gf) = value_and_grads(inputs, fused).unwrap();
    let (yc, gc) = value_and_grads(inputs, composed).unwrap();
    let d = max_diff(&yf, &yc);
    assert!(d < tol, "{name}: values differ by {d}");
    for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
        let d = max_diff(a, b);
        assert!(d < tol * 10.0, "{name}: gradient of input {i} differs by {d}");
    }
    // Finite differences in f64 arithmetic on the f32 function: step 1e-2, a few coordinates.
    for (i, input) in inputs.iter().enumerate() {
        let flat = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let analytic = gf[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for &j in &[0, flat.len() / 3, flat.len() - 1] {
            let at = |delta: f32| -> f64 {
                let mut v = flat.clone();
                v[j] += delta;
                let mut args = inputs.to_vec();
                args[i] = Tensor::from_vec(v, input.shape(), &Device::Cpu).unwrap();
                loss(&fused(&args).unwrap(), 99).unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let h = 1e-2f32;
            let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
            let err = (numeric - analytic[j] as f64).abs();
            assert!(err < 2e-2 * (1.0 + numeric.abs()), "{name}: input {i}[{j}] analytic {} vs finite difference {numeric}", analytic[j]);
        }
    }
}

#[test]
fn linear_matches_composed_with_and_without_bias() {
    let (x, w, b) = (randn(&[2, 5, 7], 1), randn(&[3, 7], 2), randn(&[3], 3));
    check(
        "linear+bias",
        &[x.clone(), w.clone(), b],
        &|t| linear::linear(&t[0], &t[1], Some(&t[2])),
        &|t| linear::composed(&t[0], &t[1], Some(&t[2])),
        1e-5,
    );
    check("linear", &[x, w], &|t| linear::linear(&t[0], &t[1], None), &|t| linear::composed(&t[0], &t[1], None), 1e-5);
}

#[test]
fn gelu_linear_matches_composed() {
    let (x, w, b) = (randn(&[2, 5, 7], 11), randn(&[3, 7], 12), randn(&[3], 13));
    check(
        "gelu-linear",
        &[x, w, b],
        &|t| linear::gelu_linear(&t[0], &t[1], &t[2]),
        &|t| linear::composed(&t[0].gelu_erf()?, &t[1], Some(&t[2])),
        1e-5,
    );
}

#[test]
fn swiglu_linear_matches_composed() {
    let (g, u, w) = (randn(&[2, 5, 7], 14), randn(&[2, 5, 7], 15), randn(&[3, 7], 16));
    check(
        "swiglu-linear",
        &[g, u, w],
        &|t| linear::swiglu_linear(&t[0], &t[1], &t[2]),
        &|t| linear::composed(&(t[0].silu()? * &t[1])?, &t[2], None),
        1e-5,
    );
}

/// The frozen projection plus a low-rank term (LoRA's fused path), with and without bias.
#[test]
fn low_rank_linear_matches_composed() {
    // 5 rows (one block) and 300 rows (blocks of 256 and 44: each starts from its own rows).
    for rows in [5, 300] {
        let (x, down, up) = (randn(&[2, rows, 7], 21), randn(&[2, rows, 2], 22), randn(&[3, 2], 23));
        let (w, b) = (randn(&[3, 7], 24), randn(&[3], 25));
        for bias in [Some(&b), None] {
            check(
                "low-rank-linear",
                &[x.clone(), down.clone(), up.clone()],
                &|t| linear::low_rank_linear(&t[0], &w, bias, &t[1], &t[2]),
                &|t| linear::composed(&t[0], &w, bias)? + linear::composed(&t[1], &t[2], None)?,
                1e-4,
            );
        }
    }
}

/// A trainable projection added onto a residual (a bottleneck's up projection).
#[test]
fn linear_add_matches_composed() {
    for rows in [5, 300] {
        let (x, w, b, r) = (randn(&[2, rows, 4], 31), randn(&[7, 4], 32), randn(&[7], 33), randn(&[2, rows, 7], 34));
        check(
            "linear-add",
            &[x, w, b, r],
            &|t| linear::linear_add(&t[0], &t[1], &t[2], &t[3]),
            &|t| &t[3] + linear::composed(&t[0], &t[1], Some(&t[2]))?,
            1e-4,
        );
    }
}

/// Weights per row, with and without bias and residual, against each row's own product.
#[test]
fn row_linear_matches_a_product_per_row() {
    let (x, w, b, r) = (randn(&[3, 5, 4], 41), randn(&[3, 7, 4], 42), randn(&[3, 7], 43), randn(&[3, 5, 7], 44));
    for (bias, residual) in [(true, true), (true, false), (false, true), (false, false)] {
        // Inputs: x, W, then the bias and the residual when used.
        let mut inputs = vec![x.clone(), w.clone()];
        inputs.extend(bias.then(|| b.clone()));
        inputs.extend(residual.then(|| r.clone()));
        let parts = |t: &[Tensor]| (bias.then(|| t[2].clone()), residual.then(|| t[t.len() - 1].clone()));
        let per_row = |t: &[Tensor]| -> Result<Tensor> {
            let (b, r) = parts(t);
            let rows = (0..3)
                .map(|i| {
                    let bi = b.as_ref().map(|b| b.get(i)).transpose()?;
                    let y = linear::composed(&t[0].get(i)?, &t[1].get(i)?, bi.as_ref())?;
                    match &r {
                        Some(r) => r.get(i)? + y,
                        None => Ok(y),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::stack(&rows, 0)
        };
        let fused = |t: &[Tensor]| {
            let (b, r) = parts(t);
            rows::row_linear(&t[0], &t[1], b.as_ref(), r.as_ref())
        };
        check(&format!("row-linear bias={bias} residual={residual}"), &inputs, &fused, &per_row, 1e-4);
    }
}

/// A frozen weight (not a variable) gets no gradient computed: only the input's is stored.
#[test]
fn linear_skips_the_gradient_of_a_frozen_weight() {
    let x = Var::from_tensor(&randn(&[4, 6], 4)).unwrap();
    let (w, b) = (randn(&[3, 6], 5), randn(&[3], 6));
    let y = linear::linear(x.as_tensor(), &w, Some(&b)).unwrap();
    let grads = loss(&y, 7).unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
    let reference = linear::composed(x.as_tensor(), &w, Some(&b)).unwrap();
    let g_ref = loss(&reference, 7).unwrap().backward().unwrap();
    assert!(max_diff(grads.get(&x).unwrap(), g_ref.get(&x).unwrap()) < 1e-5);
}

#[test]
fn attention_matches_composed_with_padding_and_causal_masks() {
    let (b, t, heads, hd) = (2, 5, 3, 4);
    let q = randn(&[b, t, heads * hd], 10);
    let k = randn(&[b, t, heads * hd], 11);
    let v = randn(&[b, t, heads * hd], 12);
    let scale = 1.0 / (hd as f64).sqrt();
    // Padding: the second row's last two tokens are masked.
    let pad = Tensor::new(&[[0f32, 0., 0., 0., 0.], [0., 0., 0., f32::MIN, f32::MIN]], &Device::Cpu).unwrap().reshape((b, 1, t)).unwrap();
    let causal: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::MIN } else { 0.0 }).collect();
    let causal = Tensor::from_vec(causal, (1, t, t), &Device::Cpu).unwrap();
    for (name, mask) in [("no mask", None), ("padding", Some(&pad)), ("causal", Some(&causal))] {
        check(
            name,
            &[q.clone(), k.clone(), v.clone()],
            &|x| attention::attention(&x[0], &x[1], &x[2], heads, heads, mask, scale),
            &|x| attention::composed(&x[0], &x[1], &x[2], heads, heads, mask, scale),
            1e-5,
        );
    }
}

/// Grouped-query attention (6 query heads over 2 key/value heads), causal.
#[test]
fn grouped_query_attention_matches_composed() {
    let (b, t, hd) = (2, 5, 4);
    let q = randn(&[b, t, 6 * hd], 50);
    let k = randn(&[b, t, 2 * hd], 51);
    let v = randn(&[b, t, 2 * hd], 52);
    let causal: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::MIN } else { 0.0 }).collect();
    let causal = Tensor::from_vec(causal, (1, t, t), &Device::Cpu).unwrap();
    check(
        "grouped-query",
        &[q, k, v],
        &|x| attention::attention(&x[0], &x[1], &x[2], 6, 2, Some(&causal), 0.5),
        &|x| attention::composed(&x[0], &x[1], &x[2], 6, 2, Some(&causal), 0.5),
        1e-5,
    );
}

/// A causal mask over several query blocks, with per-row padding and one query that sees
/// nothing: the blocks skip hidden keys and give what the full square gives.
#[test]
fn causal_attention_over_query_blocks_matches_composed() {
    let (b, t, hd) = (2, 150, 8);
    let q = randn(&[b, t, 4 * hd], 60);
    let k = randn(&[b, t, 2 * hd], 61);
    let v = randn(&[b, t, 2 * hd], 62);
    let hidden = |row: usize, i: usize, j: usize| j > i || (row == 1 && (j >= 130 || i == 149));
    let mask: Vec<f32> = (0..b * t * t).map(|x| if hidden(x / (t * t), x / t % t, x % t) { f32::MIN } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (b, t, t), &Device::Cpu).unwrap();
    check(
        "causal blocks",
        &[q, k, v],
        &|x| attention::attention(&x[0], &x[1], &x[2], 4, 2, Some(&mask), 0.3),
        &|x| attention::composed(&x[0], &x[1], &x[2], 4, 2, Some(&mask), 0.3),
        1e-5,
    );
}

/// Keys and values longer than the queries (a KV cache), with a mask over all keys.
#[test]
fn attention_over_a_longer_cache_matches_composed() {
    let (b, tq, tk, heads, hd) = (1, 2, 6, 2, 4);
    let q = randn(&[b, tq, heads * hd], 20);
    let k = randn(&[b, tk, heads * hd], 21);
    let v = randn(&[b, tk, heads * hd], 22);
    let mask: Vec<f32> = (0..tq * tk).map(|i| if i % tk > tk - tq + i / tk { f32::MIN } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (1, tq, tk), &Device::Cpu).unwrap();
    let fused = attention::attention(&q, &k, &v, heads, heads, Some(&mask), 0.5).unwrap();
    let composed = attention::composed(&q, &k, &v, heads, heads, Some(&mask), 0.5).unwrap();
    assert!(max_diff(&fused, &composed) < 1e-5);
}

#[test]
fn layer_norm_and_rms_norm_match_composed() {
    let (x, w, b) = (randn(&[3, 4, 16], 30), randn(&[16], 31), randn(&[16], 32));
    check(
        "layer norm",
        &[x.clone(), w.clone(), b],
        &|t| norm::layer_norm(&t[0], &t[1], &t[2], 1e-12),
        &|t| norm::composed_layer_norm(&t[0], &t[1], &t[2], 1e-12),
        1e-5,
    );
    check("rms norm", &[x, w], &|t| norm::rms_norm(&t[0], &t[1], 1e-5), &|t| norm::composed_rms_norm(&t[0], &t[1], 1e-5), 1e-5);
}

#[test]
fn add_layer_norm_matches_composed() {
    let (x, r, w, b) = (randn(&[3, 4, 16], 33), randn(&[3, 4, 16], 34), randn(&[16], 35), randn(&[16], 36));
    check(
        "add + layer norm",
        &[x, r, w, b],
        &|t| norm::add_layer_norm(&t[0], &t[1], &t[2], &t[3], 1e-12),
        &|t| norm::composed_layer_norm(&(&t[0] + &t[1])?, &t[2], &t[3], 1e-12),
        1e-5,
    );
}

#[test]
fn gelu_matches_composed() {
    let x = (randn(&[4, 300], 40) * 3.0).unwrap();
    check("gelu", &[x], &|t| gelu::gelu_erf(&t[0]), &|t| t[0].gelu_erf(), 1e-6);
}

#[test]
fn rope_matches_composed() {
    let (b, t, heads, hd) = (2, 3, 2, 8);
    let x = randn(&[b, t, heads * hd], 60);
    let (cos, sin) = (randn(&[t, hd / 2], 61), randn(&[t, hd / 2], 62));
    check("rope", &[x], &|v| rope::rope(&v[0], &cos, &sin, heads), &|v| rope::composed(&v[0], &cos, &sin, heads), 1e-5);
}

#[test]
fn swiglu_matches_composed() {
    let (g, u) = ((randn(&[3, 50], 70) * 3.0).unwrap(), randn(&[3, 50], 71));
    check("swiglu", &[g, u], &|v| swiglu::swiglu(&v[0], &v[1]), &|v| v[0].silu()? * &v[1], 1e-5);
}

/// Blocks of 3 rows over 7 (a partial last block) against candle's cross-entropy on full
/// logits, for the hidden states and the weight.
#[test]
fn blocked_cross_entropy_matches_full_logits() {
    let (h, w) = (randn(&[7, 5], 80), randn(&[11, 5], 81));
    let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1, 9], &Device::Cpu).unwrap();
    check(
        "cross-entropy",
        &[h, w],
        &|v| cross_entropy::blocked(&v[0], &v[1], &targets, 3),
        &|v| cross_entropy::composed(&v[0], &v[1], &targets),
        1e-5,
    );
}

/// The in-place AdamW update against its composed twin, with and without weight decay,
/// over three steps (the moments carry over).
#[test]
fn adamw_in_place_matches_composed() {
    use super::adamw::{adamw, composed, AdamWStep};
    let fresh = || {
        (
            randn(&[5, 7], 90),
            Tensor::zeros((5, 7), candle_core::DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((5, 7), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
    };
    for decay in [1.0, 1.0 - 1e-2 * 0.01] {
        let (p1, m1, v1) = fresh();
        let (p2, m2, v2) = (p1.copy().unwrap(), m1.copy().unwrap(), v1.copy().unwrap());
        for t in 1..=3 {
            let g = randn(&[5, 7], 90 + t);
            let s = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                c1: 1.0 - 0.9f64.powi(t as i32),
                c2: 1.0 - 0.999f64.powi(t as i32),
                decay,
            };
            adamw(&p1, &m1, &v1, &g, s).unwrap();
            composed(&p2, &m2, &v2, &g, s).unwrap();
        }
        for (a, b) in [(&p1, &p2), (&m1, &m2), (&v1, &v2)] {
            assert!(max_diff(a, b) < 1e-6, "decay {decay}: differs by {}", max_diff(a, b));
        }
        assert!(max_diff(&p1, &randn(&[5, 7], 90)) > 1e-3, "the parameter moved");
    }
}

/// The fused expert pass writes each expert's rows from parallel blocks: routes that would
/// make two blocks write one row (a token twice within an expert), or offsets that go
/// backwards, are refused before anything runs; a token in two different experts is fine.
#[test]
fn expert_routes_that_would_race_are_refused() {
    use super::{expert_mix, Activation, Experts, Routes};
    let (x, out) = (randn(&[4, 6], 1), randn(&[4, 6], 2));
    let (down, up) = (randn(&[2, 3, 6], 3), randn(&[2, 6, 3], 4));
    let experts = Experts { down: &down, down_bias: None, up: &up, up_bias: None, activation: Activation::Relu };
    let run = |tokens: &[u32], offsets: &[usize]| {
        let gates = Tensor::ones(tokens.len(), candle_core::DType::F32, &Device::Cpu).unwrap();
        expert_mix(&x, &out, &gates, &experts, &Routes { tokens, offsets }, false)
    };
    let twice = run(&[0, 1, 1, 2], &[0, 3, 4]).unwrap_err().to_string();
    assert!(twice.contains("token 1 is routed to expert 0 twice"), "{twice}");
    let backwards = run(&[0, 1, 2, 3], &[0, 5, 4]).unwrap_err().to_string();
    assert!(backwards.contains("offsets go backwards"), "{backwards}");
    let fine = run(&[0, 1, 1, 2], &[0, 2, 4]).unwrap();
    assert_eq!(fine.dims(), [4, 6]);
}

/// Debug builds fill fresh output buffers with a marker and check, as the output leaves
/// the kernel, that every element was overwritten.
#[cfg(debug_assertions)]
#[test]
fn an_output_element_left_unwritten_is_caught_in_debug_builds() {
    let mut buffer = super::output_buffer(4);
    buffer[..3].fill(1.0);
    let caught = std::panic::catch_unwind(|| super::written(buffer, "probe")).unwrap_err();
    let message = caught.downcast_ref::<String>().unwrap();
    assert!(message.contains("probe: output element 3 of 4 was never written"), "{message}");
    let mut whole = super::output_buffer(4);
    whole.fill(f32::NAN);
    assert_eq!(super::written(whole, "probe").len(), 4, "a computed NaN is not the marker");
}

/// A frozen weight stored transposed in memory (a decoder's projections) gives the same
/// products and input gradients as the weight in PyTorch's layout, through every kernel
/// that reads a frozen weight: plain, with a bias, after GELU or SwiGLU, and with a
/// low-rank term.
#[test]
fn weights_stored_transposed_give_the_same_products() {
    let (x, w, b) = (randn(&[3, 9, 16], 41), randn(&[24, 16], 42), randn(&[24], 43));
    let (down, up) = (randn(&[3, 9, 4], 44), randn(&[24, 4], 45));
    let t = linear::transposed_storage(&w).unwrap();
    assert!(!t.is_contiguous() && t.t().unwrap().is_contiguous());
    assert_eq!(t.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    let product = |name: &str, x: &Tensor, w: &Tensor| match name {
        "linear" => linear::linear(x, w, None),
        "linear+bias" => linear::linear(x, w, Some(&b)),
        "gelu-linear" => linear::gelu_linear(x, w, &b),
        "swiglu-linear" => linear::swiglu_linear(x, &x.sqr()?, w),
        _ => linear::low_rank_linear(x, w, Some(&b), &down, &up),
    };
    for name in ["linear", "linear+bias", "gelu-linear", "swiglu-linear", "low-rank-linear"] {
        let (y, g) = value_and_grads(std::slice::from_ref(&x), &|v| product(name, &v[0], &w)).unwrap();
        let (yt, gt) = value_and_grads(std::slice::from_ref(&x), &|v| product(name, &v[0], &t)).unwrap();
        assert!(max_diff(&y, &yt) < 1e-5, "{name}: products differ by {}", max_diff(&y, &yt));
        assert!(max_diff(&g[0], &gt[0]) < 1e-5, "{name}: input gradients differ by {}", max_diff(&g[0], &gt[0]));
    }
}
