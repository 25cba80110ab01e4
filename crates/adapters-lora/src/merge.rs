//! Combining LoRA adapters the way PEFT's `add_weighted_adapter` does, so that a merge made
//! here equals one made in Python (tested against PEFT 0.21.2's output). The result has
//! scale 1 (`alpha = r`), as PEFT's has.
//!
//! - Factor-wise methods (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`)
//!   combine the A factors and the B factors separately, each input weighted by
//!   `√|w·s|` (the sign on A only): cheap, and an approximation of the weighted sum of
//!   the updates, since `(Σ Bᵢ)(Σ Aᵢ)` has cross terms. All inputs need one rank.
//! - `cat` stacks the factors: the exact weighted sum `Σ wᵢ sᵢ Bᵢ Aᵢ`, at the summed rank.
//! - The `_svd` methods combine the full updates `sᵢ Bᵢ Aᵢ` and cut the result back to a
//!   rank (`--rank`, default the inputs' largest) by singular value decomposition.
//!
//! TIES keeps each input's largest entries (`density`), elects a sign per entry and
//! averages the entries that agree with it; DARE keeps a random share of entries (seeded)
//! and rescales them by `1 / density`.

use crate::lora::Lora;
use adapters_core::merge::{Combined, Input, MajoritySign, Options};
use adapters_core::{Adapter, BuildArgs, Error, ModelInfo, Placement, Point};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// How entries of one tensor combine across the inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entrywise {
    /// The weighted sum (task arithmetic).
    Sum,
    /// TIES: magnitude pruning, sign election, the mean of the agreeing entries.
    Ties,
    /// DARE: random pruning with rescaling, then the weighted sum.
    DareLinear,
    /// DARE's pruning, then TIES's sign election and mean.
    DareTies,
    /// Magnitude pruning, then the weighted sum.
    MagnitudePrune,
}

/// What a method combines: the factors, their concatenation, or the full updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// A and B separately.
    Factors(Entrywise),
    /// The factors side by side.
    Cat,
    /// The updates, then an SVD back to a rank.
    Svd(Entrywise),
}

impl Method {
    /// PEFT's method names: `cat`, `svd`, an entrywise name (`linear`, `ties`, `dare_linear`,
    /// `dare_ties`, `magnitude_prune`) on the factors, or with `_svd` on the updates.
    pub fn parse(name: &str) -> Option<Method> {
        let entrywise = |n: &str| match n {
            "linear" => Some(Entrywise::Sum),
            "ties" => Some(Entrywise::Ties),
            "dare_linear" => Some(Entrywise::DareLinear),
            "dare_ties" => Some(Entrywise::DareTies),
            "magnitude_prune" => Some(Entrywise::MagnitudePrune),
            _ => None,
        };
        match name {
            "cat" => Some(Method::Cat),
            "svd" => Some(Method::Svd(Entrywise::Sum)),
            _ => match name.strip_suffix("_svd") {
                Some(base) if base != "linear" => entrywise(base).map(Method::Svd),
                Some(_) => None,
                None => entrywise(name).map(Method::Factors),
            },
        }
    }
}

/// Combines LoRA inputs by the method named `name` (see the module docs).
pub fn combine(name: &str, inputs: &[Input], options: &Options, model: &ModelInfo, device: &Device) -> Result<Combined, Error> {
    let method = Method::parse(name).ok_or_else(|| bad(format!("no LoRA method `{name}`")))?;
    let loras: Vec<Lora> = inputs.iter().map(|x| concrete(x, model, device)).collect::<Result<_, _>>()?;
    let points = loras[0].points();
    for (i, l) in loras.iter().enumerate().skip(1) {
        if l.points() != points {
            return Err(Error::Mismatch(format!(
                "adapter {} sits on other projections than adapter 1; LoRA adapters combine point by point",
                i + 1
            )));
        }
    }
    let entrywise = match method {
        Method::Factors(e) | Method::Svd(e) => Some(e),
        Method::Cat => None,
    };
    let density = match (entrywise, options.density) {
        (Some(Entrywise::Sum) | None, _) => 1.0,
        (Some(_), None) => return Err(bad(format!("{name} needs a density (the share of entries each input keeps)"))),
        (Some(Entrywise::DareLinear | Entrywise::DareTies), Some(0.0)) => {
            return Err(bad("DARE with density 0 keeps nothing and divides by zero; give a density above 0".into()))
        }
        (Some(_), Some(d)) => d,
    };
    let ranks = |p: Point| -> Vec<usize> { loras.iter().map(|l| l.rank_and_scale(p).expect("same points").0).collect() };
    let rank = match method {
        Method::Factors(_) => {
            let all: Vec<usize> = points.iter().flat_map(|p| ranks(*p)).collect();
            if all.iter().any(|r| *r != all[0]) {
                return Err(Error::Mismatch(format!(
                    "ranks {:?} differ between the adapters or their layers; {name} combines factors of one rank (use svd or cat)",
                    all.iter().collect::<std::collections::BTreeSet<_>>()
                )));
            }
            all[0]
        }
        Method::Cat => {
            let sums: std::collections::BTreeSet<usize> = points.iter().map(|p| ranks(*p).iter().sum()).collect();
            if sums.len() != 1 {
                return Err(Error::Mismatch(format!("the summed ranks differ between layers ({sums:?}); cat needs one rank per adapter")));
            }
            *sums.first().expect("one point at least")
        }
        Method::Svd(_) => {
            let rank = options.rank.unwrap_or_else(|| points.iter().flat_map(|p| ranks(*p)).max().unwrap_or(1));
            // Checked before the merged adapter is built at that rank.
            for p in &points {
                let (a, b, _) = loras[0].factor_vars(*p).expect("same points");
                let (rows, cols) = (b.dims()[0], a.dims()[1]);
                if rank > rows.min(cols) {
                    return Err(bad(format!(
                        "rank {rank} is above the update's {rows}x{cols} size; give --rank of at most {}",
                        rows.min(cols)
                    )));
                }
            }
            rank
        }
    };
    let placement = Placement { sizes: BTreeMap::new(), ..inputs[0].placement.clone() };
    let config = serde_json::json!({"r": rank, "alpha": rank as f64, "dropout": loras[0].settings().dropout});
    let out = Lora::build(&BuildArgs { config: &config, placement: &placement, model, device, seed: 0 })?;
    let weights: Vec<f64> = inputs.iter().map(|x| x.weight).collect();
    for (k, p) in points.iter().enumerate() {
        let factors: Vec<(Tensor, Tensor, f64)> = loras
            .iter()
            .map(|l| {
                let (a, b, s) = l.factor_vars(*p).expect("same points");
                (a.as_tensor().clone(), b.as_tensor().clone(), s)
            })
            .collect();
        let seed = options.seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let (a, b) = match method {
            Method::Factors(e) => {
                let scaled: Vec<f64> = factors.iter().zip(&weights).map(|((_, _, s), w)| w * s).collect();
                let on_a: Vec<f64> = scaled.iter().map(|ws| ws.signum() * ws.abs().sqrt()).collect();
                let on_b: Vec<f64> = scaled.iter().map(|ws| ws.abs().sqrt()).collect();
                let a_parts: Vec<Tensor> = factors.iter().map(|f| f.0.clone()).collect();
                let b_parts: Vec<Tensor> = factors.iter().map(|f| f.1.clone()).collect();
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let a = entrywise_combine(e, &a_parts, &on_a, density, options.majority_sign, &mut rng)?;
                (a, entrywise_combine(e, &b_parts, &on_b, density, options.majority_sign, &mut rng)?)
            }
            Method::Cat => {
                let a_parts: Vec<Tensor> =
                    factors.iter().zip(&weights).map(|((a, _, s), w)| a * (w * s)).collect::<candle_core::Result<_>>()?;
                let b_parts: Vec<Tensor> = factors.iter().map(|f| f.1.clone()).collect();
                (Tensor::cat(&a_parts, 0)?, Tensor::cat(&b_parts, 1)?)
            }
            Method::Svd(e) => {
                let deltas: Vec<Tensor> = factors.iter().map(|(a, b, s)| b.matmul(a)? * *s).collect::<candle_core::Result<_>>()?;
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let delta = entrywise_combine(e, &deltas, &weights, density, options.majority_sign, &mut rng)?;
                low_rank(&delta, rank, options.clamp)?
            }
        };
        let (a_var, b_var, _) = out.factor_vars(*p).expect("built on the same points");
        a_var.set(&a)?;
        b_var.set(&b)?;
    }
    Ok(Combined { adapter: Box::new(out), placement })
}

fn bad(message: String) -> Error {
    Error::Adapter(message)
}

/// An input as a `Lora` (its own configuration and placement, its weights).
fn concrete(x: &Input, model: &ModelInfo, device: &Device) -> Result<Lora, Error> {
    let lora = Lora::build(&BuildArgs { config: &x.adapter.config(), placement: x.placement, model, device, seed: 0 })?;
    for ((name, var), (from, value)) in lora.vars().into_iter().zip(x.adapter.vars()) {
        debug_assert_eq!(name, from);
        var.set(value.as_tensor())?;
    }
    Ok(lora)
}

/// Combines one tensor across the inputs, entry by entry, in f32 as PEFT does.
pub fn entrywise_combine(
    how: Entrywise,
    tensors: &[Tensor],
    weights: &[f64],
    density: f64,
    sign: MajoritySign,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor, Error> {
    let shape = tensors[0].shape().clone();
    let mut parts: Vec<Vec<f32>> = tensors.iter().map(|t| t.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
    match how {
        Entrywise::Sum => {}
        Entrywise::Ties | Entrywise::MagnitudePrune => parts.iter_mut().for_each(|p| prune_by_magnitude(p, density)),
        Entrywise::DareLinear | Entrywise::DareTies => parts.iter_mut().for_each(|p| prune_at_random(p, density, rng)),
    }
    let n = parts[0].len();
    let weights: Vec<f32> = weights.iter().map(|w| *w as f32).collect();
    let mut out = vec![0f32; n];
    if matches!(how, Entrywise::Ties | Entrywise::DareTies) {
        for (j, o) in out.iter_mut().enumerate() {
            let elected = match sign {
                MajoritySign::Total => parts.iter().map(|p| p[j]).sum::<f32>(),
                MajoritySign::Frequency => parts.iter().map(|p| sign_of(p[j])).sum::<f32>(),
            };
            let elected = if elected >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut kept) = (0f32, 0f32);
            for (p, w) in parts.iter().zip(&weights) {
                if sign_of(p[j]) == elected {
                    sum += p[j] * w;
                    kept += 1.0;
                }
            }
            *o = sum / kept.max(1.0);
        }
    } else {
        for (p, w) in parts.iter().zip(&weights) {
            for (o, x) in out.iter_mut().zip(p) {
                *o += x * w;
            }
        }
    }
    Ok(Tensor::from_vec(out, shape, tensors[0].device())?)
}

/// torch's `sign`: -1, 0 or 1.
fn sign_of(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Keeps the `⌊density · n⌋` entries of largest magnitude, zeroes the rest.
fn prune_by_magnitude(x: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let k = (density * x.len() as f64) as usize;
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[j].abs().total_cmp(&x[i].abs()));
    for &i in &order[k..] {
        x[i] = 0.0;
    }
}

/// Keeps each entry with probability `density`, scaled by `1 / density`.
fn prune_at_random(x: &mut [f32], density: f64, rng: &mut ChaCha8Rng) {
    if density >= 1.0 {
        return;
    }
    for v in x.iter_mut() {
        *v = if rng.random::<f64>() < density { *v / density as f32 } else { 0.0 };
    }
}

/// `delta ≈ B A` with A `[rank, in]` and B `[out, rank]` = U·S of the SVD's top `rank`
/// singular triplets; with `clamp`, both clamped at that quantile of their entries.
fn low_rank(delta: &Tensor, rank: usize, clamp: Option<f64>) -> Result<(Tensor, Tensor), Error> {
    let (rows, cols) = delta.dims2()?;
    if rank > rows.min(cols) {
        return Err(bad(format!("rank {rank} is above the update's {}x{} size; give --rank of at most {}", rows, cols, rows.min(cols))));
    }
    let data: Vec<f64> = delta.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    let svd = nalgebra::DMatrix::from_row_slice(rows, cols, &data).svd(true, true);
    let (u, v_t) = (svd.u.expect("asked for U"), svd.v_t.expect("asked for Vᵀ"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let mut b = vec![0f32; rows * rank];
    let mut a = vec![0f32; rank * cols];
    for (k, &i) in order.iter().take(rank).enumerate() {
        let s = svd.singular_values[i];
        for r in 0..rows {
            b[r * rank + k] = (u[(r, i)] * s) as f32;
        }
        for c in 0..cols {
            a[k * cols + c] = v_t[(i, c)] as f32;
        }
    }
    if let Some(q) = clamp {
        let mut all: Vec<f32> = b.iter().chain(&a).copied().collect();
        all.sort_by(f32::total_cmp);
        let hi = quantile(&all, q);
        for v in b.iter_mut().chain(a.iter_mut()) {
            *v = v.clamp(-hi, hi);
        }
    }
    let device = delta.device();
    Ok((Tensor::from_vec(a, (rank, cols), device)?, Tensor::from_vec(b, (rows, rank), device)?))
}

/// torch's `quantile` (linear interpolation) of sorted values.
fn quantile(sorted: &[f32], q: f64) -> f32 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    let frac = (at - lo as f64) as f32;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}
