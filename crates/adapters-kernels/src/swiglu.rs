//! `silu(gate) · up`, the gated FFN activation of Llama, in one pass each way.

use super::simd::{exp, multiversion};
use super::{fused, output_buffer, slice, with_values, written};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `gate · sigmoid(gate) · up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fused(&[gate, up]) || gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

multiversion! {
    fn forward_chunk(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g / (1.0 + exp(-g)) * u;
        }
    }
}

multiversion! {
    fn backward_chunk(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = 1.0 / (1.0 + exp(-g));
            *du = dy * g * s;
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// `silu(gate) · up` of every value, in parallel chunks.
pub(super) fn values(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = output_buffer(g.len());
    y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (g, u))| forward_chunk(g, u, y));
    written(y, "swiglu")
}

/// The gradients for gate and up given the output's, in parallel chunks.
pub(super) fn backward_values(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (output_buffer(g.len()), output_buffer(g.len()));
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
        .for_each(|((dg, du), ((g, u), dy))| backward_chunk(g, u, dy, dg, du));
    (written(dg, "swiglu backward"), written(du, "swiglu backward"))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = values(slice(gs, gl, "swiglu")?, slice(us, ul, "swiglu")?);
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_values([gate, up, grad], "swiglu", |[g, u, dy]| backward_values(g, u, dy))?;
        let dev = gate.device();
        let dg = if gate.track_op() { Some(Tensor::from_vec(dg, gate.shape(), dev)?) } else { None };
        let du = if up.track_op() { Some(Tensor::from_vec(du, up.shape(), dev)?) } else { None };
        Ok((dg, du))
    }
}
