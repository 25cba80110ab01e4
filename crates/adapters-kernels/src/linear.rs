//! `y = x Wᵀ + b` in one pass (the bias is the accumulator's start), with a backward that
//! computes the weight's and bias's gradients only when they train.

use super::simd::multiversion;
use super::{assume_written, fused, gelu, gemm, slice, swiglu, uninit_buffer, with_values, Mat, SharedMut};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows per parallel task of the bias gradient.
const ROWS: usize = 256;

/// A frozen weight `W` `[n, k]` as the products read it: its values and the strides of `Wᵀ`
/// (rows, columns). `W` may be stored as PyTorch stores it (`[out, in]` in memory) or
/// transposed (`[in, out]` in memory, a transposed view: [`transposed_storage`]).
#[derive(Clone, Copy)]
struct WeightRef<'a> {
    values: &'a [f32],
    rows_stride: isize,
    cols_stride: isize,
}

impl WeightRef<'_> {
    fn transposed(&self) -> Mat {
        Mat(self.values.as_ptr(), self.rows_stride, self.cols_stride)
    }
}

/// `weight`'s values as the products read them, in either of the two layouts.
fn weight_ref<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<WeightRef<'a>> {
    let CpuStorage::F32(v) = storage else { candle_core::bail!("{op}: expects an f32 weight") };
    let (n, k) = layout.shape().dims2()?;
    let start = layout.start_offset();
    let (rows_stride, cols_stride) = match layout.stride() {
        [s, 1] if *s == k || n == 1 => (1, k as isize),
        [1, s] if *s == n => (n as isize, 1),
        stride => candle_core::bail!("{op}: expects a weight stored as [out, in] or [in, out], not with strides {stride:?}"),
    };
    Ok(WeightRef { values: &v[start..start + n * k], rows_stride, cols_stride })
}

/// `weight` as the products take it without a copy: itself when stored `[out, in]` or
/// `[in, out]`, else a contiguous copy.
fn operand(weight: &Tensor) -> Result<Tensor> {
    if weight.is_contiguous() || weight.t()?.is_contiguous() {
        Ok(weight.clone())
    } else {
        weight.contiguous()
    }
}

/// `weight` `[out, in]` stored transposed (`[in, out]` in memory) and seen as `[out, in]`:
/// the same tensor to every op, but products over few rows (decoding steps) read it
/// 2-7x faster, as the matrix product then packs rows of `Wᵀ` that lie contiguous in
/// memory rather than gathering columns 4-6 KiB apart (measured with `gemm` 0.19 on
/// SmolLM2's projections at 8 and 32 rows).
pub fn transposed_storage(weight: &Tensor) -> Result<Tensor> {
    weight.t()?.contiguous()?.t()
}

/// `x Wᵀ + b` for `x` of shape `[..., in]`, `W` `[out, in]` (PyTorch's layout), `b` `[out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut tensors = vec![x, weight];
    tensors.extend(bias);
    if !fused(&tensors) {
        return composed(x, weight, bias);
    }
    let (rows, features) = (x.elem_count() / x.dim(candle_core::D::Minus1)?, x.dim(candle_core::D::Minus1)?);
    let flat = x.contiguous()?.reshape((rows, features))?;
    let (weight, mut out_dims) = (operand(weight)?, x.dims().to_vec());
    *out_dims.last_mut().expect("x has a last dimension") = weight.dim(0)?;
    let y = match bias {
        Some(b) => flat.apply_op3(&weight, &b.contiguous()?, Linear)?,
        None => flat.apply_op2(&weight, Linear)?,
    };
    y.reshape(out_dims)
}

/// `GELU(x) Wᵀ + b` (erf GELU), without keeping `GELU(x)` for the backward pass: it is
/// recomputed there only if the weight trains (the input's gradient needs `x` alone).
/// For a frozen FFN down projection this saves an `[tokens, intermediate]` activation
/// per layer (25 MB per MiniLM layer at batch 32 x seq 128).
pub fn gelu_linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !fused(&[x, weight, bias]) {
        return composed(&x.gelu_erf()?, weight, Some(bias));
    }
    let features = x.dim(candle_core::D::Minus1)?;
    let flat = x.contiguous()?.reshape((x.elem_count() / features, features))?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = weight.dim(0)?;
    flat.apply_op3(&operand(weight)?, &bias.contiguous()?, GeluLinear)?.reshape(out_dims)
}

/// `(silu(gate) · up) Wᵀ`, Llama's FFN down projection over its gated activation, without
/// keeping the activation for the backward pass: it is recomputed there only if the weight
/// trains. Saves a `[tokens, intermediate]` activation per layer and its gradient's
/// accumulation buffer.
pub fn swiglu_linear(gate: &Tensor, up: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !fused(&[gate, up, weight]) || gate.shape() != up.shape() {
        return composed(&(gate.silu()? * up)?, weight, None);
    }
    let features = gate.dim(candle_core::D::Minus1)?;
    let rows = gate.elem_count() / features;
    let mut out_dims = gate.dims().to_vec();
    *out_dims.last_mut().expect("gate has a last dimension") = weight.dim(0)?;
    let (gate, up) = (gate.contiguous()?.reshape((rows, features))?, up.contiguous()?.reshape((rows, features))?);
    gate.apply_op3(&up, &operand(weight)?, SwigluLinear)?.reshape(out_dims)
}

/// `x Wᵀ + b + down · upᵀ` for a frozen `W` and `b`: a projection plus a low-rank term
/// (LoRA: `down = s · x Aᵀ`, `up = B`) in one product. Neither the frozen projection's
/// output nor the full-width delta is made or kept for the backward pass: the gradients
/// need `x`, `down` and `up` alone (12.6 MB per MiniLM projection at batch 32 x seq 128).
/// `down` is `[..., r]`, `up` `[out, r]`.
pub fn low_rank_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, down: &Tensor, up: &Tensor) -> Result<Tensor> {
    let mut tensors = vec![x, weight, down, up];
    tensors.extend(bias);
    if !fused(&tensors) || weight.track_op() || bias.is_some_and(Tensor::track_op) {
        return composed(x, weight, bias)? + composed(down, up, None)?;
    }
    if bias.is_some_and(|b| b.elem_count() != weight.dim(0).unwrap_or(0)) {
        candle_core::bail!("low_rank_linear: weight {:?} and bias {:?} do not fit", weight.shape(), bias.map(Tensor::shape));
    }
    let features = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / features;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = weight.dim(0)?;
    let (flat, down) = (x.contiguous()?.reshape((rows, features))?, down.contiguous()?.reshape((rows, ()))?);
    let op = LowRankLinear { weight: operand(weight)?, bias: bias.map(Tensor::contiguous).transpose()? };
    flat.apply_op3(&down, &up.contiguous()?, op)?.reshape(out_dims)
}

/// `residual + x Wᵀ + b` in one pass: a small (trainable) projection added onto a residual
/// stream without making or keeping the projection's own output (a bottleneck adapter's up
/// projection: one `[tokens, hidden]` pass and 6.3 MB per MiniLM layer at batch 32 x seq
/// 128). `x` `[..., in]`, `W` `[out, in]`, `b` `[out]`, `residual` `[..., out]`.
pub fn linear_add(x: &Tensor, weight: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    if !fused(&[x, weight, bias, residual]) {
        return residual + composed(x, weight, Some(bias))?;
    }
    let (k, n) = (x.dim(candle_core::D::Minus1)?, weight.dim(0)?);
    let rows = x.elem_count() / k;
    if residual.elem_count() != rows * n || weight.dims2()? != (n, k) || bias.elem_count() != n {
        candle_core::bail!(
            "linear_add: input {:?}, weight {:?}, bias {:?} and residual {:?} do not fit",
            x.shape(),
            weight.shape(),
            bias.shape(),
            residual.shape()
        );
    }
    // Weight and bias as one [out, in + 1] operand: a custom op takes at most three inputs.
    let augmented = Tensor::cat(&[weight, &bias.reshape((n, 1))?], 1)?;
    let (x2, r2) = (x.contiguous()?.reshape((rows, k))?, residual.contiguous()?.reshape((rows, n))?);
    x2.apply_op3(&augmented, &r2, LinearAdd)?.reshape(residual.shape())
}

/// The same maths from candle ops.
pub(super) fn composed(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Writes a block of [`ROWS`] rows of a product's output, given the block's index.
/// It must write every element of the block (`MaybeUninit::write`, or a product that
/// overwrites).
type BlockStart<'a> = &'a (dyn Fn(usize, &mut [MaybeUninit<f32>]) + Sync);

/// `y = start + x Wᵀ` for `x` `[m, k]` and `W` `[n, k]` (PyTorch's layout): `start` first
/// writes each block of [`ROWS`] rows of `y`, in parallel and while the block is in cache,
/// then the product is added; without `start`, `y = x Wᵀ`.
fn product_onto(x: &[f32], xl: &Layout, w: WeightRef, wl: &Layout, start: Option<BlockStart>) -> Result<(CpuStorage, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: input {:?} and weight {:?} do not fit", xl.shape(), wl.shape());
    }
    let mut y = uninit_buffer(m * n);
    if let Some(start) = start {
        y.par_chunks_mut(ROWS * n).enumerate().for_each(|(i, block)| start(i, block));
    }
    // SAFETY: x is m x k, W is n x k (read as its transpose), y is m x n, all in bounds; y
    // is read only where `start` wrote it (accumulate), else overwritten.
    unsafe {
        gemm(
            m,
            n,
            k,
            SharedMut(y.as_mut_ptr().cast()),
            n as isize,
            Mat(x.as_ptr(), k as isize, 1),
            w.transposed(),
            1.0,
            start.is_some(),
            candle_core::utils::get_num_threads(),
        )
    };
    // SAFETY: the product wrote every element (onto what `start` wrote, or over it).
    Ok((CpuStorage::F32(unsafe { assume_written(y, "linear") }), Shape::from((m, n))))
}

struct Linear;

impl Linear {
    fn forward(x: &[f32], xl: &Layout, w: WeightRef, wl: &Layout, b: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        if b.is_some_and(|b| b.len() != wl.shape().dims()[0]) {
            candle_core::bail!("linear: weight {:?} and bias {:?} do not fit", wl.shape(), b.map(<[f32]>::len));
        }
        match b {
            Some(b) => product_onto(
                x,
                xl,
                w,
                wl,
                Some(&|_, block: &mut [MaybeUninit<f32>]| {
                    block.chunks_exact_mut(b.len()).for_each(|row| {
                        row.iter_mut().zip(b).for_each(|(o, &v)| {
                            o.write(v);
                        })
                    })
                }),
            ),
            None => product_onto(x, xl, w, wl, None),
        }
    }

    fn grads(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = if x.track_op() { Some(grad.matmul(&w.detach())?) } else { None };
        let gw = if w.track_op() { Some(grad.t()?.matmul(&x.detach())?) } else { None };
        Ok((gx, gw))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        Linear::forward(slice(xs, xl, "linear")?, xl, weight_ref(ws, wl, "linear")?, wl, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Linear::grads(x, w, grad)
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Linear::forward(slice(xs, xl, "linear")?, xl, weight_ref(ws, wl, "linear")?, wl, Some(slice(bs, bl, "linear")?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = Linear::grads(x, w, grad)?;
        let gb = if b.track_op() { Some(column_sums(grad)?) } else { None };
        Ok((gx, gw, gb))
    }
}

struct GeluLinear;

impl CustomOp3 for GeluLinear {
    fn name(&self) -> &'static str {
        "gelu-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let activated = gelu::values(slice(xs, xl, "gelu-linear")?);
        Linear::forward(&activated, xl, weight_ref(ws, wl, "gelu-linear")?, wl, Some(slice(bs, bl, "gelu-linear")?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = if x.track_op() {
            let g_activated = grad.matmul(&w.detach())?;
            let gx = with_values([x, &g_activated], "gelu-linear", |[xv, gv]| gelu::backward_values(xv, gv))?;
            Some(Tensor::from_vec(gx, x.shape(), x.device())?)
        } else {
            None
        };
        let gw = if w.track_op() {
            let activated = with_values([x], "gelu-linear", |[xv]| gelu::values(xv))?;
            Some(grad.t()?.matmul(&Tensor::from_vec(activated, x.shape(), x.device())?)?)
        } else {
            None
        };
        let gb = if b.track_op() { Some(column_sums(grad)?) } else { None };
        Ok((gx, gw, gb))
    }
}

struct SwigluLinear;

impl CustomOp3 for SwigluLinear {
    fn name(&self) -> &'static str {
        "swiglu-linear"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let activated = swiglu::values(slice(gs, gl, "swiglu-linear")?, slice(us, ul, "swiglu-linear")?);
        Linear::forward(&activated, gl, weight_ref(ws, wl, "swiglu-linear")?, wl, None)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = if gate.track_op() || up.track_op() {
            let g_activated = grad.matmul(&w.detach())?;
            let (dg, du) = with_values([gate, up, &g_activated], "swiglu-linear", |[g, u, d]| swiglu::backward_values(g, u, d))?;
            let dev = gate.device();
            let keep = |t: &Tensor, v: Vec<f32>| if t.track_op() { Tensor::from_vec(v, t.shape(), dev).map(Some) } else { Ok(None) };
            (keep(gate, dg)?, keep(up, du)?)
        } else {
            (None, None)
        };
        let gw = if w.track_op() {
            let activated = with_values([gate, up], "swiglu-linear", |[g, u]| swiglu::values(g, u))?;
            Some(grad.t()?.matmul(&Tensor::from_vec(activated, gate.shape(), gate.device())?)?)
        } else {
            None
        };
        Ok((dg, du, gw))
    }
}

/// [`low_rank_linear`]'s op: its inputs are those that may train; the frozen projection
/// rides along.
struct LowRankLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        "low-rank-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, down, up) = (slice(xs, xl, "low-rank-linear")?, slice(ds, dl, "low-rank-linear")?, slice(us, ul, "low-rank-linear")?);
        let ((m, r), (n, r2)) = (dl.shape().dims2()?, ul.shape().dims2()?);
        if m != xl.shape().dims2()?.0 || r != r2 || n != self.weight.dim(0)? {
            candle_core::bail!(
                "low-rank-linear: input {:?}, down {:?}, up {:?} and weight {:?} do not fit",
                xl.shape(),
                dl.shape(),
                ul.shape(),
                self.weight.shape()
            );
        }
        // Each block of rows starts as bias + down · upᵀ (a small product, on the block while
        // it is in cache), then the frozen product is added.
        let run = |w: WeightRef, b: Option<&[f32]>| {
            let start = |i: usize, block: &mut [MaybeUninit<f32>]| {
                if let Some(b) = b {
                    block.chunks_exact_mut(n).for_each(|row| {
                        row.iter_mut().zip(b).for_each(|(o, &v)| {
                            o.write(v);
                        })
                    });
                }
                let rows = block.len() / n;
                // SAFETY: this block's rows of down (rows x r), up (n x r, read as its
                // transpose) and the block (rows x n) are in bounds; the block is read only
                // where the bias was written (accumulate), else overwritten.
                unsafe {
                    gemm(
                        rows,
                        n,
                        r,
                        SharedMut(block.as_mut_ptr().cast()),
                        n as isize,
                        Mat(down[i * ROWS * r..].as_ptr(), r as isize, 1),
                        Mat(up.as_ptr(), 1, r as isize),
                        1.0,
                        b.is_some(),
                        1,
                    )
                }
            };
            product_onto(x, xl, w, self.weight.layout(), Some(&start))
        };
        let (storage, layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else { candle_core::bail!("low-rank-linear: expects CPU tensors") };
        let w = weight_ref(storage, layout, "low-rank-linear")?;
        match &self.bias {
            Some(b) => with_values([b], "low-rank-linear", |[b]| run(w, Some(b)))?,
            None => run(w, None),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = if x.track_op() { Some(grad.matmul(&self.weight)?) } else { None };
        let gd = if down.track_op() { Some(grad.matmul(&up.detach())?) } else { None };
        let gu = if up.track_op() { Some(grad.t()?.matmul(&down.detach())?) } else { None };
        Ok((gx, gd, gu))
    }
}

/// [`linear_add`]'s op, on `x` `[m, k]`, `[W | b]` `[n, k + 1]` and the residual `[m, n]`.
struct LinearAdd;

impl CustomOp3 for LinearAdd {
    fn name(&self) -> &'static str {
        "linear-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, wb, r) = (slice(xs, xl, "linear-add")?, slice(ws, wl, "linear-add")?, slice(rs, rl, "linear-add")?);
        let ((m, k), (n, k1)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        if k1 != k + 1 || rl.shape().dims2()? != (m, n) {
            candle_core::bail!("linear-add: input {:?}, weight {:?} and residual {:?} do not fit", xl.shape(), wl.shape(), rl.shape());
        }
        let bias: Vec<f32> = (0..n).map(|j| wb[j * k1 + k]).collect();
        let mut y = uninit_buffer(m * n);
        // Block by block, while the block is in cache: residual + bias, then x Wᵀ added.
        y.par_chunks_mut(ROWS * n).zip(r.par_chunks(ROWS * n)).enumerate().for_each(|(i, (yb, rb))| {
            for (yr, rr) in yb.chunks_exact_mut(n).zip(rb.chunks_exact(n)) {
                for ((o, a), b) in yr.iter_mut().zip(rr).zip(&bias) {
                    o.write(a + b);
                }
            }
            // SAFETY: this block's rows of x (rows x k), W (the first k columns of the
            // n x (k + 1) operand, read as its transpose) and the block (rows x n).
            unsafe {
                gemm(
                    yb.len() / n,
                    n,
                    k,
                    SharedMut(yb.as_mut_ptr().cast()),
                    n as isize,
                    Mat(x[i * ROWS * k..].as_ptr(), k as isize, 1),
                    Mat(wb.as_ptr(), 1, k1 as isize),
                    1.0,
                    true,
                    1,
                )
            }
        });
        // SAFETY: every element was written (residual + bias), then added to.
        Ok((CpuStorage::F32(unsafe { assume_written(y, "linear-add") }), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        r: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let k = x.dim(1)?;
        let gx = if x.track_op() { Some(grad.matmul(&wb.detach().narrow(1, 0, k)?.contiguous()?)?) } else { None };
        let gwb = if wb.track_op() {
            let gw = grad.t()?.matmul(&x.detach())?;
            Some(Tensor::cat(&[gw, column_sums(grad)?.unsqueeze(1)?], 1)?)
        } else {
            None
        };
        let gr = if r.track_op() { Some(grad.clone()) } else { None };
        Ok((gx, gwb, gr))
    }
}

multiversion! {
    /// Adds each row of `rows` (`cols` wide) into `acc`.
    fn add_rows(rows: &[f32], acc: &mut [f32]) {
        for row in rows.chunks_exact(acc.len()) {
            for (a, x) in acc.iter_mut().zip(row) {
                *a += x;
            }
        }
    }
}

/// The bias gradient: `grad` `[rows, cols]` summed over rows, in parallel blocks of rows
/// (candle's `sum(0)` walks the tensor column by column).
fn column_sums(grad: &Tensor) -> Result<Tensor> {
    let (_, cols) = grad.dims2()?;
    let total = with_values([grad], "linear", |[g]| {
        g.par_chunks(ROWS * cols)
            .map(|block| {
                let mut acc = vec![0f32; cols];
                add_rows(block, &mut acc);
                acc
            })
            .reduce(
                || vec![0f32; cols],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    })?;
    Tensor::from_vec(total, cols, grad.device())
}
