//! A bottleneck adapter and the post-norm residual step after it in one pass, for
//! inference: `norm(output + up(act(down(z))) + input)`, where `z` is the sublayer output,
//! its input, or `norm(output + input)` (Pfeiffer).
//!
//! Why: the bare post-norm layer makes one pass over `[tokens, hidden]` here (the add and
//! norm). Run as separate ops, the adapter adds six more (its own add and norm, the down
//! product's read, the up product's read and write, the second add and norm's read): 4% of
//! a MiniLM forward for a 1% FLOP adapter. Per block of rows in cache, it costs its two
//! small products and a second norm over rows already loaded.

use super::experts::block_product;
use super::norm::{composed_layer_norm, layer_norm_rows};
use super::{fused, output_buffer, with_values, written, Activation};
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Rows per block: its sum, middle and output stay in the core's L2 cache (3 × 64 × 384
/// floats for MiniLM).
const BLOCK: usize = 64;

/// What the adapter reads at its site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BottleneckInput {
    /// The sublayer's output (sequential adapters: Houlsby).
    Output,
    /// The residual stream entering the sublayer (parallel adapters).
    Input,
    /// The backbone's post-norm of output + input (sequential adapters that read the
    /// normed stream: Pfeiffer's `original_ln_before`).
    NormedSum,
}

/// A hidden-site adapter whose whole change is `up(act(down(z)))` added to the sublayer
/// output: `down` `[r, hidden]`, `down_bias` `[r]`, `up` `[hidden, r]`, `up_bias`
/// `[hidden]` (any fixed scale already folded into `up` and `up_bias`).
pub struct Bottleneck {
    /// What `z` is.
    pub reads: BottleneckInput,
    /// The down projection.
    pub down: Tensor,
    /// Its bias.
    pub down_bias: Tensor,
    /// Between the two products.
    pub activation: Activation,
    /// The up projection.
    pub up: Tensor,
    /// Its bias.
    pub up_bias: Tensor,
}

/// `layer_norm(output + bottleneck(z) + input)` with the backbone's norm (`weight`,
/// `bias`, `eps`), which also makes `z` for [`BottleneckInput::NormedSum`]. `input` and
/// `output` are `[..., hidden]`. No autograd graph: for inference only.
pub fn bottleneck_add_layer_norm(
    input: &Tensor,
    output: &Tensor,
    adapter: &Bottleneck,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let d = output.dim(candle_core::D::Minus1)?;
    let r = adapter.down.dim(0)?;
    if input.shape() != output.shape()
        || adapter.down.dims() != [r, d]
        || adapter.down_bias.dims() != [r]
        || adapter.up.dims() != [d, r]
        || adapter.up_bias.dims() != [d]
        || weight.dims() != [d]
        || bias.dims() != [d]
    {
        candle_core::bail!(
            "bottleneck_add_layer_norm: input {:?}, output {:?}, down {:?}, up {:?} and norm {:?} do not fit",
            input.shape(),
            output.shape(),
            adapter.down.shape(),
            adapter.up.shape(),
            weight.shape()
        );
    }
    let tensors = [input, output, &adapter.down, &adapter.down_bias, &adapter.up, &adapter.up_bias, weight, bias];
    // Empty widths would make empty blocks: the composed ops handle them.
    if !fused(&tensors) || d == 0 || r == 0 {
        return composed(input, output, adapter, weight, bias, eps);
    }
    let (reads, activation, eps) = (adapter.reads, adapter.activation, eps as f32);
    let rows = output.elem_count() / d;
    let values = with_values(tensors, "bottleneck_add_layer_norm", |[input, output, down, down_b, up, up_b, w, b]| {
        let mut out = output_buffer(rows * d);
        out.par_chunks_mut(BLOCK * d).enumerate().for_each(|(i, out)| {
            let n = out.len() / d;
            let span = i * BLOCK * d..i * BLOCK * d + n * d;
            let (input, output) = (&input[span.clone()], &output[span]);
            let mut sum: Vec<f32> = output.iter().zip(input).map(|(o, x)| o + x).collect();
            let mut mid = output_buffer(n * r);
            let z: &[f32] = match reads {
                BottleneckInput::Output => output,
                BottleneckInput::Input => input,
                BottleneckInput::NormedSum => {
                    // The normed sum goes into `out`, which is written last.
                    layer_norm_rows(&sum, w, b, eps, out);
                    &*out
                }
            };
            mid.chunks_exact_mut(r).for_each(|m| m.copy_from_slice(down_b));
            block_product(n, r, d, &mut mid, z, down);
            activation.apply_in_place(&mut mid);
            for s in sum.chunks_exact_mut(d) {
                s.iter_mut().zip(up_b).for_each(|(s, ub)| *s += ub);
            }
            block_product(n, d, r, &mut sum, &mid, up);
            layer_norm_rows(&sum, w, b, eps, out);
        });
        written(out, "bottleneck_add_layer_norm")
    })?;
    Tensor::from_vec(values, output.shape(), output.device())
}

/// The same maths from candle ops (other devices and dtypes).
fn composed(input: &Tensor, output: &Tensor, adapter: &Bottleneck, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let z = match adapter.reads {
        BottleneckInput::Output => output.clone(),
        BottleneckInput::Input => input.clone(),
        BottleneckInput::NormedSum => composed_layer_norm(&(output + input)?, weight, bias, eps)?,
    };
    let mid = adapter.activation.apply(&super::linear::composed(&z, &adapter.down, Some(&adapter.down_bias))?)?;
    let adapted = (output + super::linear::composed(&mid, &adapter.up, Some(&adapter.up_bias))?)?;
    composed_layer_norm(&(adapted + input)?, weight, bias, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused pass equals the composed ops for every input, and for a row count that
    /// leaves a partial block.
    #[test]
    fn fused_pass_equals_composed() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, d, r) = (2 * BLOCK + 13, 40, 6);
        let input = Tensor::randn(0f32, 1.0, (1, rows, d), &dev)?;
        let output = Tensor::randn(0f32, 1.0, (1, rows, d), &dev)?;
        let (weight, bias) = ((Tensor::randn(0f32, 0.2, d, &dev)? + 1.0)?, Tensor::randn(0f32, 0.2, d, &dev)?);
        for reads in [BottleneckInput::Output, BottleneckInput::Input, BottleneckInput::NormedSum] {
            for activation in [Activation::Relu, Activation::Silu, Activation::Gelu] {
                let adapter = Bottleneck {
                    reads,
                    down: Tensor::randn(0f32, 0.3, (r, d), &dev)?,
                    down_bias: Tensor::randn(0f32, 0.3, r, &dev)?,
                    activation,
                    up: Tensor::randn(0f32, 0.3, (d, r), &dev)?,
                    up_bias: Tensor::randn(0f32, 0.3, d, &dev)?,
                };
                let fused = bottleneck_add_layer_norm(&input, &output, &adapter, &weight, &bias, 1e-12)?;
                let composed = composed(&input, &output, &adapter, &weight, &bias, 1e-12)?;
                assert_eq!(fused.dims(), [1, rows, d]);
                let diff = (fused - composed)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{reads:?} {activation:?}: differs by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 8), candle_core::DType::F32, &dev)?;
        let adapter = Bottleneck {
            reads: BottleneckInput::Output,
            down: Tensor::zeros((2, 7), candle_core::DType::F32, &dev)?,
            down_bias: Tensor::zeros(2, candle_core::DType::F32, &dev)?,
            activation: Activation::Relu,
            up: Tensor::zeros((8, 2), candle_core::DType::F32, &dev)?,
            up_bias: Tensor::zeros(8, candle_core::DType::F32, &dev)?,
        };
        let ones = Tensor::ones(8, candle_core::DType::F32, &dev)?;
        let err = bottleneck_add_layer_norm(&x, &x, &adapter, &ones, &ones, 1e-5).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        Ok(())
    }
}
