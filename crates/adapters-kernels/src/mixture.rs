//! A routed mixture of bottleneck experts and the post-norm residual step after it in one
//! pass, for inference: `norm(output + Σ gateₑ · expertₑ(z) + input)` with
//! `z = norm(output + input)`, each token running only the experts its router logits
//! (`z · routerᵀ`) choose.
//!
//! Why: run as separate ops, a mixture site makes five full-size passes besides the
//! backbone's add-and-norm (its own add and norm, the router's read, the dispatch's read
//! of `z` and of the output and its write, the second norm's read) and a host round trip
//! for the plan: 4.8 times the added cost of one fused bottleneck adapter with the same active
//! parameters. Per block of rows in cache, routing is a small product and a per-row choice.

use super::experts::{block_product, block_product_into};
use super::norm::{composed_layer_norm, layer_norm_rows};
use super::{expert_mix, fused, output_buffer, with_values, written, Experts, Routes};
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Rows per block at most: each expert's two products run on its share of a block's rows,
/// and short products pay gemm's per-call cost on few rows. Measured on the MiniLM site
/// (4096 rows, 8 experts, top-1, 2 threads): 1.96 ms at 64 rows, 1.63 at 256, 1.55 at
/// 512 (the block's buffers, 2.4 MB, then live in L3). Fewer rows give each thread a block.
const MAX_BLOCK: usize = 512;
/// Rows per block at least.
const MIN_BLOCK: usize = 64;

/// A row's choice from its router logits: pushes `(expert, gate)` for each expert the row
/// runs (none: the row passes through). Called with the row's index in the flattened
/// `[tokens, hidden]` input, so that padding can be left out.
pub type RouteRow<'a> = dyn Fn(usize, &[f32], &mut Vec<(u32, f32)>) + Sync + 'a;

/// A router and its experts.
pub struct RoutedExperts<'a> {
    /// `[choices, hidden]`: one logit per choice (choices beyond the experts, such as a
    /// skip choice, are the route function's business).
    pub router: &'a Tensor,
    /// From logits to experts and gates.
    pub route: &'a RouteRow<'a>,
    /// The experts (`[E, r, hidden]` down, `[E, hidden, r]` up; biases optional).
    pub experts: Experts<'a>,
}

/// `layer_norm(output + Σ gate · expert(z) + input)` with `z = layer_norm(output + input)`
/// and the backbone's norm (`weight`, `bias`, `eps`); the router reads `z`. `input` and
/// `output` are `[..., hidden]`. No autograd graph: for inference only.
pub fn mixture_add_layer_norm(
    input: &Tensor,
    output: &Tensor,
    mixture: &RoutedExperts,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let d = output.dim(candle_core::D::Minus1)?;
    let (e, r, d_down) = mixture.experts.down.dims3()?;
    let choices = mixture.router.dim(0)?;
    let bias_fits = |b: Option<&Tensor>, dims: &[usize]| b.is_none_or(|b| b.dims() == dims);
    if input.shape() != output.shape()
        || d_down != d
        || mixture.router.dims() != [choices, d]
        || choices < e
        || mixture.experts.up.dims() != [e, d, r]
        || !bias_fits(mixture.experts.down_bias, &[e, r])
        || !bias_fits(mixture.experts.up_bias, &[e, d])
        || weight.dims() != [d]
        || bias.dims() != [d]
    {
        candle_core::bail!(
            "mixture_add_layer_norm: input {:?}, output {:?}, router {:?}, down {:?}, up {:?} and norm {:?} do not fit",
            input.shape(),
            output.shape(),
            mixture.router.shape(),
            mixture.experts.down.shape(),
            mixture.experts.up.shape(),
            weight.shape()
        );
    }
    let (down_b, up_b) = mixture.experts.biases_or_zeros()?;
    let (down, up) = (mixture.experts.down, mixture.experts.up);
    let tensors = [input, output, mixture.router, down, &down_b, up, &up_b, weight, bias];
    // Empty widths would make empty blocks: the composed ops handle them.
    if !fused(&tensors) || d == 0 || r == 0 || e == 0 {
        return composed(input, output, mixture, weight, bias, eps);
    }
    let (activation, route, eps) = (mixture.experts.activation, mixture.route, eps as f32);
    let rows = output.elem_count() / d;
    let block = rows.div_ceil(rayon::current_num_threads()).clamp(MIN_BLOCK, MAX_BLOCK);
    let bad_choice = AtomicBool::new(false);
    let values = with_values(tensors, "mixture_add_layer_norm", |[input, output, router, down, down_b, up, up_b, w, b]| {
        let mut out = output_buffer(rows * d);
        out.par_chunks_mut(block * d).enumerate().for_each(|(i, out)| {
            let n = out.len() / d;
            let span = i * block * d..i * block * d + n * d;
            let (input, output) = (&input[span.clone()], &output[span]);
            let mut sum: Vec<f32> = output.iter().zip(input).map(|(o, x)| o + x).collect();
            // The normed sum goes into `out`, which is written last.
            layer_norm_rows(&sum, w, b, eps, out);
            let z = &*out;
            let mut logits = output_buffer(n * choices);
            block_product_into(n, choices, d, &mut logits, z, router);
            // Each expert's rows of this block, with their gates.
            let mut assigned: Vec<Vec<(usize, f32)>> = (0..e).map(|_| Vec::with_capacity(n)).collect();
            let mut picks = Vec::new();
            for (row, l) in logits.chunks_exact(choices).enumerate() {
                picks.clear();
                route(i * block + row, l, &mut picks);
                for &(ex, gate) in &picks {
                    match assigned.get_mut(ex as usize) {
                        Some(rows) => rows.push((row, gate)),
                        None => bad_choice.store(true, Ordering::Relaxed),
                    }
                }
            }
            let most = assigned.iter().map(Vec::len).max().unwrap_or(0);
            let (mut xs, mut mid, mut ys) = (output_buffer(most * d), output_buffer(most * r), output_buffer(most * d));
            for (ex, rows) in assigned.iter().enumerate().filter(|(_, rows)| !rows.is_empty()) {
                let m = rows.len();
                let (dw, db) = (&down[ex * r * d..(ex + 1) * r * d], &down_b[ex * r..(ex + 1) * r]);
                let (uw, ub) = (&up[ex * d * r..(ex + 1) * d * r], &up_b[ex * d..(ex + 1) * d]);
                for (j, &(row, _)) in rows.iter().enumerate() {
                    xs[j * d..(j + 1) * d].copy_from_slice(&z[row * d..(row + 1) * d]);
                    mid[j * r..(j + 1) * r].copy_from_slice(db);
                }
                block_product(m, r, d, &mut mid, &xs, dw);
                activation.apply_in_place(&mut mid[..m * r]);
                // Written, not added to: the up bias joins in the scatter below.
                block_product_into(m, d, r, &mut ys, &mid, uw);
                for (j, &(row, gate)) in rows.iter().enumerate() {
                    let s = &mut sum[row * d..(row + 1) * d];
                    s.iter_mut().zip(&ys[j * d..(j + 1) * d]).zip(ub).for_each(|((s, y), ub)| *s += gate * (y + ub));
                }
            }
            layer_norm_rows(&sum, w, b, eps, out);
        });
        written(out, "mixture_add_layer_norm")
    })?;
    if bad_choice.load(Ordering::Relaxed) {
        candle_core::bail!("mixture_add_layer_norm: the route function chose an expert beyond the {e} there are");
    }
    Tensor::from_vec(values, output.shape(), output.device())
}

/// The same maths from candle ops and the host-side routing (other devices and dtypes).
fn composed(input: &Tensor, output: &Tensor, mixture: &RoutedExperts, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = output.dim(candle_core::D::Minus1)?;
    let (o, x) = (output.reshape(((), d))?, input.reshape(((), d))?);
    let z = composed_layer_norm(&(&o + &x)?, weight, bias, eps)?;
    let logits = super::linear::composed(&z, mixture.router, None)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let experts = mixture.experts.down.dim(0)?;
    let (mut by_expert, mut picks) = (vec![Vec::new(); experts], Vec::new());
    for (row, l) in logits.iter().enumerate() {
        picks.clear();
        (mixture.route)(row, l, &mut picks);
        for &(ex, gate) in &picks {
            let Some(rows) = by_expert.get_mut(ex as usize) else {
                candle_core::bail!("mixture_add_layer_norm: the route function chose expert {ex} of {experts}");
            };
            rows.push((row as u32, gate));
        }
    }
    let mut offsets = vec![0];
    for rows in &by_expert {
        offsets.push(offsets.last().expect("starts with 0") + rows.len());
    }
    let (tokens, gates): (Vec<u32>, Vec<f32>) = by_expert.into_iter().flatten().unzip();
    let gates = Tensor::new(gates, output.device())?.to_dtype(output.dtype())?;
    let routes = Routes { tokens: &tokens, offsets: &offsets };
    let adapted = expert_mix(&z, &o, &gates, &mixture.experts, &routes, true)?;
    composed_layer_norm(&(adapted + x)?, weight, bias, eps)?.reshape(output.shape())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Activation;
    use candle_core::Device;

    /// Top-k by logit with softmax gates renormalised over the chosen; every fifth row
    /// (padding) runs nothing; a choice index ≥ `experts` is a skip.
    fn top_k(k: usize, experts: usize) -> impl Fn(usize, &[f32], &mut Vec<(u32, f32)>) + Sync {
        move |row, logits, picks| {
            if row % 5 == 4 {
                return;
            }
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let norm: f32 = order[..k].iter().map(|&c| logits[c].exp()).sum();
            picks.extend(order[..k].iter().filter(|&&c| c < experts).map(|&c| (c as u32, logits[c].exp() / norm)));
        }
    }

    /// The fused pass equals the composed one for top-1 and top-2, with a skip choice,
    /// every activation, with and without biases, and a partial last block.
    #[test]
    fn fused_pass_equals_composed() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, d, r, e) = (2 * MAX_BLOCK + 13, 40, 6, 4);
        let input = Tensor::randn(0f32, 1.0, (1, rows, d), &dev)?;
        let output = Tensor::randn(0f32, 1.0, (1, rows, d), &dev)?;
        let (weight, bias) = ((Tensor::randn(0f32, 0.2, d, &dev)? + 1.0)?, Tensor::randn(0f32, 0.2, d, &dev)?);
        let router = Tensor::randn(0f32, 1.0, (e + 1, d), &dev)?;
        let (down, up) = (Tensor::randn(0f32, 0.3, (e, r, d), &dev)?, Tensor::randn(0f32, 0.3, (e, d, r), &dev)?);
        let (down_b, up_b) = (Tensor::randn(0f32, 0.3, (e, r), &dev)?, Tensor::randn(0f32, 0.3, (e, d), &dev)?);
        for k in [1, 2] {
            let route = top_k(k, e);
            for activation in [Activation::Relu, Activation::Silu, Activation::Gelu] {
                for biased in [true, false] {
                    let experts = Experts {
                        down: &down,
                        down_bias: biased.then_some(&down_b),
                        up: &up,
                        up_bias: biased.then_some(&up_b),
                        activation,
                    };
                    let mixture = RoutedExperts { router: &router, route: &route, experts };
                    let fused = mixture_add_layer_norm(&input, &output, &mixture, &weight, &bias, 1e-12)?;
                    let composed = composed(&input, &output, &mixture, &weight, &bias, 1e-12)?;
                    assert_eq!(fused.dims(), [1, rows, d]);
                    let diff = (&fused - composed)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert!(diff < 1e-5, "k={k} {activation:?} biased={biased}: differs by {diff}");
                    // Padding rows pass through: the plain add-and-norm.
                    let plain = composed_layer_norm(&(&output + &input)?, &weight, &bias, 1e-12)?;
                    let row = |t: &Tensor| t.get(0)?.get(4);
                    let diff = (row(&fused)? - row(&plain)?)?.abs()?.max(0)?.to_scalar::<f32>()?;
                    assert!(diff < 1e-5, "a row that chose nothing passes through: {diff}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_and_choices_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 8), candle_core::DType::F32, &dev)?;
        let ones = Tensor::ones(8, candle_core::DType::F32, &dev)?;
        let (down, up) =
            (Tensor::zeros((2, 4, 8), candle_core::DType::F32, &dev)?, Tensor::zeros((2, 8, 4), candle_core::DType::F32, &dev)?);
        let experts = || Experts { down: &down, down_bias: None, up: &up, up_bias: None, activation: Activation::Relu };
        let small_router = Tensor::zeros((1, 8), candle_core::DType::F32, &dev)?;
        let route = |_: usize, _: &[f32], picks: &mut Vec<(u32, f32)>| picks.push((5, 1.0));
        let mixture = RoutedExperts { router: &small_router, route: &route, experts: experts() };
        let err = mixture_add_layer_norm(&x, &x, &mixture, &ones, &ones, 1e-5).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        let router = Tensor::zeros((2, 8), candle_core::DType::F32, &dev)?;
        let mixture = RoutedExperts { router: &router, route: &route, experts: experts() };
        let err = mixture_add_layer_norm(&x, &x, &mixture, &ones, &ones, 1e-5).unwrap_err().to_string();
        assert!(err.contains("beyond the 2"), "{err}");
        Ok(())
    }
}
