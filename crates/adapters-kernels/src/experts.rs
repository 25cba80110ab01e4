//! Mixture-of-experts dispatch: each expert (a two-layer bottleneck or low-rank MLP) runs
//! on its own tokens only, and its gated output is added to theirs. On the CPU without a
//! gradient, one pass: gather, both products, gate and add per block of rows in cache;
//! otherwise composed from candle ops (gather, products, one scatter-add), which autograd
//! differentiates.

use super::{fused, gemm, output_buffer, written, Mat, SharedMut};
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Rows per block of the fused path: the block's input, middle and output stay in cache.
const BLOCK: usize = 32;

/// The non-linearity between the two products of a two-layer adapter (an expert, a
/// bottleneck).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// None (LoRA experts).
    Identity,
    /// `relu`.
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// `silu`.
    Silu,
    /// `tanh`.
    Tanh,
}

impl Activation {
    /// The activation of every value of `x`.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Identity => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::Gelu => super::gelu_erf(x),
            Activation::Silu => x.silu(),
            Activation::Tanh => x.tanh(),
        }
    }

    pub(super) fn apply_in_place(self, v: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
            Activation::Gelu => {
                let input = v.to_vec();
                super::gelu::forward_chunk(&input, v);
            }
            Activation::Silu => v.iter_mut().for_each(|x| *x /= 1.0 + (-*x).exp()),
            Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
        }
    }
}

/// The experts' weights, stacked: `down` `[E, r, in]` with `down_bias` `[E, r]`, `up`
/// `[E, out, r]` with `up_bias` `[E, out]` (biases optional).
pub struct Experts<'a> {
    /// Down projections.
    pub down: &'a Tensor,
    /// Their biases.
    pub down_bias: Option<&'a Tensor>,
    /// Up projections.
    pub up: &'a Tensor,
    /// Their biases.
    pub up_bias: Option<&'a Tensor>,
    /// Between the two.
    pub activation: Activation,
}

impl Experts<'_> {
    /// The down and up biases, zeros for the ones the experts lack: the fused passes read
    /// one layout either way.
    pub(super) fn biases_or_zeros(&self) -> Result<(Tensor, Tensor)> {
        let zeros = |n: usize| Tensor::zeros(n, self.down.dtype(), self.down.device());
        let down = match self.down_bias {
            Some(b) => b.clone(),
            None => zeros(self.down.dims().iter().take(2).product())?,
        };
        let up = match self.up_bias {
            Some(b) => b.clone(),
            None => zeros(self.up.dims().iter().take(2).product())?,
        };
        Ok((down, up))
    }
}

/// Which token each assignment sends to which expert: assignments grouped by expert,
/// `tokens[offsets[e]..offsets[e + 1]]` for expert `e`, no token twice within an expert
/// ([`expert_mix`] checks both: the fused pass writes an expert's tokens in parallel).
pub struct Routes<'a> {
    /// Token (row of `x`) of each assignment.
    pub tokens: &'a [u32],
    /// Where each expert's assignments start; `E + 1` entries.
    pub offsets: &'a [usize],
}

/// `output[t] + Σ gateₐ · expertₑ(x[t])` over the assignments `a` of token `t` (`x`
/// `[T, in]`, `output` `[T, out]`, `gates` `[A]`). `differentiable`: build the autograd
/// graph (training); otherwise the CPU runs the fused pass.
pub fn expert_mix(x: &Tensor, output: &Tensor, gates: &Tensor, experts: &Experts, routes: &Routes, differentiable: bool) -> Result<Tensor> {
    let (tokens, d_in) = x.dims2()?;
    let (e, r, d_in_w) = experts.down.dims3()?;
    let d_out = output.dim(1)?;
    if output.dim(0)? != tokens
        || d_in_w != d_in
        || experts.up.dims() != [e, d_out, r]
        || routes.offsets.len() != e + 1
        || routes.offsets[e] != routes.tokens.len()
        || gates.dims() != [routes.tokens.len()]
        || routes.tokens.iter().any(|&t| t as usize >= tokens)
    {
        candle_core::bail!(
            "expert_mix: x {:?}, output {:?}, gates {:?}, down {:?}, up {:?} and {} assignments over {} experts do not fit",
            x.shape(),
            output.shape(),
            gates.shape(),
            experts.down.shape(),
            experts.up.shape(),
            routes.tokens.len(),
            routes.offsets.len().saturating_sub(1)
        );
    }
    check_routes(routes, tokens)?;
    let mut all = vec![x, output, gates, experts.down, experts.up];
    all.extend(experts.down_bias);
    all.extend(experts.up_bias);
    if differentiable || !fused(&all) {
        return composed(x, output, gates, experts, routes);
    }
    fused_forward(x, output, gates, experts, routes)
}

/// Refuses routes whose offsets go backwards or that send a token to one expert twice: the
/// fused pass writes each expert's rows from parallel blocks, and a repeated token would be
/// written by two at once.
fn check_routes(routes: &Routes, tokens: usize) -> Result<()> {
    if let Some(e) = routes.offsets.windows(2).position(|pair| pair[0] > pair[1]) {
        candle_core::bail!("expert_mix: offsets go backwards at expert {e} ({} > {})", routes.offsets[e], routes.offsets[e + 1]);
    }
    let mut last_expert_of = vec![usize::MAX; tokens];
    for (e, pair) in routes.offsets.windows(2).enumerate() {
        for &t in &routes.tokens[pair[0]..pair[1]] {
            if std::mem::replace(&mut last_expert_of[t as usize], e) == e {
                candle_core::bail!("expert_mix: token {t} is routed to expert {e} twice");
            }
        }
    }
    Ok(())
}

fn composed(x: &Tensor, output: &Tensor, gates: &Tensor, experts: &Experts, routes: &Routes) -> Result<Tensor> {
    let dev = x.device();
    let mut parts = Vec::new();
    for e in 0..routes.offsets.len() - 1 {
        let (from, to) = (routes.offsets[e], routes.offsets[e + 1]);
        if from == to {
            continue;
        }
        let rows = x.index_select(&Tensor::new(&routes.tokens[from..to], dev)?, 0)?;
        let down_b = experts.down_bias.map(|b| b.get(e)).transpose()?;
        let up_b = experts.up_bias.map(|b| b.get(e)).transpose()?;
        let h = experts.activation.apply(&super::linear(&rows, &experts.down.get(e)?, down_b.as_ref())?)?;
        let y = super::linear(&h, &experts.up.get(e)?, up_b.as_ref())?;
        parts.push(y.broadcast_mul(&gates.narrow(0, from, to - from)?.unsqueeze(1)?)?);
    }
    if parts.is_empty() {
        return Ok(output.clone());
    }
    output.index_add(&Tensor::new(routes.tokens, dev)?, &Tensor::cat(&parts, 0)?, 0)
}

fn fused_forward(x: &Tensor, output: &Tensor, gates: &Tensor, experts: &Experts, routes: &Routes) -> Result<Tensor> {
    let (tokens, d_in) = x.dims2()?;
    let (e, r, _) = experts.down.dims3()?;
    let d_out = output.dim(1)?;
    let (down_b, up_b) = experts.biases_or_zeros()?;
    let activation = experts.activation;
    let tensors = [x, output, gates, experts.down, &down_b, experts.up, &up_b];
    let out = super::with_values(tensors, "expert_mix", |[x, output, gates, down, down_b, up, up_b]| {
        // Each token's row is written by its first assignment (output + gate · expert) and
        // added to by later ones; rows no expert took are copied at the end. No pass over
        // the output beyond the one that writes it.
        let mut out = output_buffer(tokens * d_out);
        let taken: Vec<AtomicBool> = (0..tokens).map(|_| AtomicBool::new(false)).collect();
        let target = SharedMut(out.as_mut_ptr());
        for ex in 0..e {
            let (from, to) = (routes.offsets[ex], routes.offsets[ex + 1]);
            let (dw, db) = (&down[ex * r * d_in..(ex + 1) * r * d_in], &down_b[ex * r..(ex + 1) * r]);
            let (uw, ub) = (&up[ex * d_out * r..(ex + 1) * d_out * r], &up_b[ex * d_out..(ex + 1) * d_out]);
            let assignments: Vec<usize> = (from..to).collect();
            assignments.par_chunks(BLOCK).for_each(|block| {
                let n = block.len();
                let (mut xs, mut mid, mut ys) = (output_buffer(n * d_in), output_buffer(n * r), output_buffer(n * d_out));
                for (i, &a) in block.iter().enumerate() {
                    let t = routes.tokens[a] as usize;
                    xs[i * d_in..(i + 1) * d_in].copy_from_slice(&x[t * d_in..(t + 1) * d_in]);
                    mid[i * r..(i + 1) * r].copy_from_slice(db);
                    ys[i * d_out..(i + 1) * d_out].copy_from_slice(ub);
                }
                block_product(n, r, d_in, &mut mid, &xs, dw);
                activation.apply_in_place(&mut mid);
                block_product(n, d_out, r, &mut ys, &mid, uw);
                for (i, &a) in block.iter().enumerate() {
                    let t = routes.tokens[a] as usize;
                    let g = gates[a];
                    // SAFETY: within one expert no token repeats, so blocks write disjoint rows;
                    // experts run one after another.
                    let row = unsafe { std::slice::from_raw_parts_mut(target.get().add(t * d_out), d_out) };
                    let y = &ys[i * d_out..(i + 1) * d_out];
                    if taken[t].swap(true, Ordering::Relaxed) {
                        row.iter_mut().zip(y).for_each(|(o, y)| *o += g * y);
                    } else {
                        row.iter_mut().zip(y).zip(&output[t * d_out..(t + 1) * d_out]).for_each(|((o, y), r)| *o = r + g * y);
                    }
                }
            });
        }
        out.par_chunks_mut(d_out).zip(output.par_chunks(d_out)).zip(taken.par_iter()).for_each(|((o, r), w)| {
            if !w.load(Ordering::Relaxed) {
                o.copy_from_slice(r);
            }
        });
        written(out, "expert_mix")
    })?;
    Tensor::from_vec(out, (tokens, d_out), x.device())
}

/// `dst += lhs · wᵀ` for row-major `lhs` `[m, k]`, `w` `[n, k]` and `dst` `[m, n]`, on
/// the calling thread.
pub(super) fn block_product(m: usize, n: usize, k: usize, dst: &mut [f32], lhs: &[f32], w: &[f32]) {
    product(m, n, k, dst, lhs, w, true)
}

/// `dst = lhs · wᵀ`, as [`block_product`] but overwriting `dst` (not read).
pub(super) fn block_product_into(m: usize, n: usize, k: usize, dst: &mut [f32], lhs: &[f32], w: &[f32]) {
    product(m, n, k, dst, lhs, w, false)
}

fn product(m: usize, n: usize, k: usize, dst: &mut [f32], lhs: &[f32], w: &[f32], accumulate: bool) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && w.len() >= n * k, "block_product: buffers too small");
    // SAFETY: the views stay inside the buffers (checked above) and `dst` aliases neither.
    unsafe {
        gemm(
            m,
            n,
            k,
            SharedMut(dst.as_mut_ptr()),
            n as isize,
            Mat(lhs.as_ptr(), k as isize, 1),
            Mat(w.as_ptr(), 1, k as isize),
            1.0,
            accumulate,
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused inference pass equals the composed one: tokens in two experts, tokens in
    /// none, every activation, with and without biases.
    #[test]
    fn fused_pass_equals_composed() -> Result<()> {
        let dev = Device::Cpu;
        let (t, d_in, r, d_out, e) = (70, 24, 5, 16, 3);
        let x = Tensor::randn(0f32, 1.0, (t, d_in), &dev)?;
        let output = Tensor::randn(0f32, 1.0, (t, d_out), &dev)?;
        let (down, up) = (Tensor::randn(0f32, 0.3, (e, r, d_in), &dev)?, Tensor::randn(0f32, 0.3, (e, d_out, r), &dev)?);
        let (down_b, up_b) = (Tensor::randn(0f32, 0.3, (e, r), &dev)?, Tensor::randn(0f32, 0.3, (e, d_out), &dev)?);
        // Expert 0: tokens 0..40; expert 1: none; expert 2: every third token (some twice routed).
        let mut tokens: Vec<u32> = (0..40).collect();
        let offsets = vec![0, 40, 40, 40 + (0..t as u32).step_by(3).count()];
        tokens.extend((0..t as u32).step_by(3));
        let gates = Tensor::rand(0f32, 1.0, tokens.len(), &dev)?;
        let routes = Routes { tokens: &tokens, offsets: &offsets };
        for activation in [Activation::Identity, Activation::Relu, Activation::Gelu, Activation::Silu, Activation::Tanh] {
            for biased in [true, false] {
                let experts =
                    Experts { down: &down, down_bias: biased.then_some(&down_b), up: &up, up_bias: biased.then_some(&up_b), activation };
                let fused = expert_mix(&x, &output, &gates, &experts, &routes, false)?;
                let composed = expert_mix(&x, &output, &gates, &experts, &routes, true)?;
                let diff = (fused - composed)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{activation:?} biased={biased}: {diff}");
            }
        }
        let bad = Routes { tokens: &tokens, offsets: &[0, 40, 40] };
        let err = expert_mix(
            &x,
            &output,
            &gates,
            &Experts { down: &down, down_bias: None, up: &up, up_bias: None, activation: Activation::Relu },
            &bad,
            false,
        );
        assert!(err.unwrap_err().to_string().contains("do not fit"));
        Ok(())
    }
}
