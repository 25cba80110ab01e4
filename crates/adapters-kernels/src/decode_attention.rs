//! Attention for a decoding step of continuous batching: one new query per sequence, each
//! over its own KV cache, read in place.
//!
//! Why: sequences of a batch sit at different lengths, so the padded form gathers every
//! cache into one `[rows, longest, width]` tensor per layer and step (a copy of every
//! cached position, O(length) per token). Here each row reads its cache buffer where it
//! lies and nothing is copied: the step costs the new position plus the arithmetic.

use crate::{attention, fused, slice};
use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

/// `softmax(q kᵀ · scale) v` per row and head, row `i` attending to the first `lens[i]`
/// positions of `keys[i]` / `values[i]` (`[1, capacity, kv_heads * head_dim]`, contiguous;
/// positions past `lens[i]` are never read). `q` is `[rows, 1, heads * head_dim]`; grouped
/// query heads as in [`attention`]. Inference only: no gradient flows through it. Off the
/// CPU (or in f16/bf16) it runs the padded form through [`attention`].
pub fn attention_per_row(
    q: &Tensor,
    keys: &[&Tensor],
    values: &[&Tensor],
    lens: &[usize],
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (rows, tq, width) = q.dims3()?;
    if tq != 1 || keys.len() != rows || values.len() != rows || lens.len() != rows || heads == 0 || kv_heads == 0 {
        candle_core::bail!(
            "attention_per_row: q {:?} for {} key, {} value buffers and {} lengths",
            q.dims(),
            keys.len(),
            values.len(),
            lens.len()
        );
    }
    let head_dim = width / heads;
    let kv_width = head_dim * kv_heads;
    if width % heads != 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!("attention_per_row: width {width} does not fit {heads} query and {kv_heads} key/value heads");
    }
    for (i, (k, v)) in keys.iter().zip(values).enumerate() {
        let fits = |t: &Tensor| t.dims3().is_ok_and(|(one, cap, w)| one == 1 && w == kv_width && lens[i] <= cap && lens[i] > 0);
        if !fits(k) || !fits(v) {
            candle_core::bail!(
                "attention_per_row: row {i}: buffers {:?} / {:?} do not hold {} positions of width {kv_width}",
                k.dims(),
                v.dims(),
                lens[i]
            );
        }
    }
    let mut all: Vec<&Tensor> = vec![q];
    all.extend(keys);
    all.extend(values);
    if !fused(&all) || keys.iter().chain(values).any(|t| !t.is_contiguous()) {
        return padded(q, keys, values, lens, heads, kv_heads, scale);
    }
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let Storage::Cpu(q_cpu) = &*q_storage else { candle_core::bail!("attention_per_row: expects CPU tensors") };
    let q_values = slice(q_cpu, q_layout, "attention_per_row")?;
    let guards: Vec<_> = keys.iter().chain(values).map(|t| t.storage_and_layout()).collect();
    let mut buffers = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("attention_per_row: expects CPU tensors") };
        buffers.push(slice(cpu, layout, "attention_per_row")?);
    }
    let (key_buffers, value_buffers) = buffers.split_at(rows);
    let group = heads / kv_heads;
    let scale = scale as f32;
    let mut out = vec![0f32; rows * width];
    // One task per (row, head): its query, its key/value head's columns of the row's cache.
    out.par_chunks_mut(head_dim).enumerate().for_each(|(task, out)| {
        let (row, head) = (task / heads, task % heads);
        let query = &q_values[row * width + head * head_dim..][..head_dim];
        let column = (head / group) * head_dim;
        let (k, v) = (key_buffers[row], value_buffers[row]);
        let mut scores: Vec<f32> = (0..lens[row])
            .map(|p| query.iter().zip(&k[p * kv_width + column..][..head_dim]).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for s in &mut scores {
            *s = (*s - max).exp();
            total += *s;
        }
        for (p, s) in scores.iter().enumerate() {
            let weight = s / total;
            for (o, x) in out.iter_mut().zip(&v[p * kv_width + column..][..head_dim]) {
                *o += weight * x;
            }
        }
    });
    Tensor::from_vec(out, (rows, 1, width), q.device())
}

/// The same through [`attention`]: the caches gathered into one padded tensor and masked.
fn padded(q: &Tensor, keys: &[&Tensor], values: &[&Tensor], lens: &[usize], heads: usize, kv_heads: usize, scale: f64) -> Result<Tensor> {
    let longest = *lens.iter().max().expect("at least one row");
    let gather = |buffers: &[&Tensor]| -> Result<Tensor> {
        let rows = buffers
            .iter()
            .zip(lens)
            .map(|(b, &n)| {
                let kept = b.narrow(1, 0, n)?;
                let pad = Tensor::zeros((1, longest - n, b.dim(2)?), b.dtype(), b.device())?;
                Tensor::cat(&[&kept, &pad], 1)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    };
    let mask: Vec<f32> = lens.iter().flat_map(|&n| (0..longest).map(move |j| if j < n { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (lens.len(), 1, longest), q.device())?.to_dtype(q.dtype())?;
    attention(q, &gather(keys)?, &gather(values)?, heads, kv_heads, Some(&mask), scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// In place over buffers longer than the rows' lengths, the same as the padded form.
    #[test]
    fn matches_the_padded_form() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd) = (6, 2, 8);
        let lens = [5usize, 1, 9];
        let q = Tensor::randn(0f32, 1.0, (3, 1, heads * hd), &dev)?;
        let buffers = |seed: f64| -> Result<Vec<Tensor>> {
            lens.iter().map(|&n| Tensor::randn(0f32, 1.0, (1, n + 7, kv_heads * hd), &dev)? + seed).collect()
        };
        let (k, v) = (buffers(0.0)?, buffers(0.5)?);
        let (kr, vr): (Vec<&Tensor>, Vec<&Tensor>) = (k.iter().collect(), v.iter().collect());
        let fast = attention_per_row(&q, &kr, &vr, &lens, heads, kv_heads, 0.3)?;
        let slow = padded(&q, &kr, &vr, &lens, heads, kv_heads, 0.3)?;
        let diff: f32 = (fast - slow)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
