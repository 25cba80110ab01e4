//! LoRA: `y = W x + b + s * B (A dropout(x))`, with `s = alpha / r` (or `alpha / sqrt(r)`
//! with rsLoRA). A starts kaiming-uniform and B at zero, as PEFT does, so a fresh adapter
//! leaves the model unchanged. Mergeable: the delta `s * B A` can be added to `W`.

use adapters_core::registry::{self, parse_config};
use adapters_core::{
    Adapter, BatchableForm, BuildArgs, Capabilities, Error, ForwardCtx, Init, LowRank, LowRankProjection, Mergeable, Point, ProjectionIo,
    RowBatched, Site,
};
use adapters_kernels as kernels;
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// LoRA's configuration (the `lora` kind's fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator (PEFT's `lora_alpha`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the LoRA input, in training only.
    #[serde(default)]
    pub dropout: f64,
    /// Scale by alpha / sqrt(r) instead of alpha / r.
    #[serde(default)]
    pub use_rslora: bool,
    /// Per-module rank overrides: a key matches a point whose module path equals it or
    /// ends with `.key` (PEFT's `rank_pattern`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (PEFT's `alpha_pattern`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// DoRA (Liu et al., 2024), as PEFT computes it: the adapted weight `W + s·BA` is split
    /// into a learned magnitude per output row and its direction,
    /// `W' = m ⊙ (W + s·BA) / ‖W + s·BA‖` (row norms, treated as constants in the backward).
    /// The magnitude starts at `‖W‖` at the first forward, so the adapter starts as the
    /// identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_dora: bool,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

/// The first pattern key that matches a module path (PEFT's suffix rule).
pub fn pattern_match<'a, T>(pattern: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    pattern.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v)
}

struct Pair {
    a: Var,
    b: Var,
    scale: f64,
    /// DoRA's magnitude `[out]` (NaN until the first forward sets it from the weights).
    magnitude: Option<Var>,
    /// Whether the magnitude holds values (read from a file or set from the weights).
    magnitude_set: std::sync::atomic::AtomicBool,
}

/// A LoRA adapter on one or more projection points.
pub struct Lora {
    config: LoraConfig,
    pairs: BTreeMap<Point, Pair>,
    /// DoRA: the row norms of `W + s·BA` at merge, for the exact unmerge.
    merged_norms: std::sync::Mutex<HashMap<Point, Tensor>>,
}

/// Sites used when the placement names none (PEFT's defaults).
pub const DEFAULT_SITES: &[Site] = &[Site::Query, Site::Value];

impl Lora {
    /// Builds a `lora` adapter from registry arguments (B starts at zero: identity).
    pub fn build(args: &BuildArgs) -> std::result::Result<Self, Error> {
        let config: LoraConfig = parse_config("lora", args.config)?;
        let bad = |m: String| Error::Config { kind: "lora".into(), message: m };
        if config.r == 0 {
            return Err(bad("r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(bad(format!("dropout must be in [0, 1), got {}", config.dropout)));
        }
        let points = args.placement.expand(args.model, DEFAULT_SITES, Site::is_projection)?;
        let mut init = Init::new(args.seed);
        let mut pairs = BTreeMap::new();
        for spec in points {
            let r = pattern_match(&config.rank_pattern, &spec.module)
                .copied()
                .unwrap_or_else(|| args.placement.size_for(spec.point.layer, config.r));
            registry::check_width("lora", "r (or rank_pattern, placement.sizes)", r, spec.in_features, spec.out_features, spec.point)?;
            let alpha = pattern_match(&config.alpha_pattern, &spec.module).copied().unwrap_or(config.alpha);
            let scale = if config.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
            let a = Var::from_tensor(&init.kaiming_uniform(r, spec.in_features, args.device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((spec.out_features, r), DType::F32, args.device)?)?;
            let magnitude = match config.use_dora {
                true => Some(Var::from_tensor(&Tensor::full(f32::NAN, spec.out_features, args.device)?)?),
                false => None,
            };
            pairs.insert(spec.point, Pair { a, b, scale, magnitude, magnitude_set: false.into() });
        }
        Ok(Lora { config, pairs, merged_norms: Default::default() })
    }

    /// The configuration it was built with.
    pub fn settings(&self) -> &LoraConfig {
        &self.config
    }

    /// (rank, scale) at a point.
    pub fn rank_and_scale(&self, point: Point) -> Option<(usize, f64)> {
        self.pairs.get(&point).map(|p| (p.a.dim(0).unwrap_or(0), p.scale))
    }

    /// `s · A dropout(x)` and `B` at a point: the delta is their product.
    fn low_rank(&self, point: Point, input: &Tensor, ctx: &ForwardCtx) -> Result<LowRank> {
        let p = &self.pairs[&point];
        let x = if ctx.is_training() && self.config.dropout > 0.0 { ctx.dropout(input, self.config.dropout)? } else { input.clone() };
        // The scale applies to the r-wide middle, not the full-width delta: r/d of the work.
        let down = (kernels::linear(&x, p.a.as_tensor(), None)? * p.scale)?;
        Ok(LowRank { down, up: p.b.as_tensor().clone() })
    }

    /// The A and B variables and the scale at a point.
    pub fn factor_vars(&self, point: Point) -> Option<(Var, Var, f64)> {
        self.pairs.get(&point).map(|p| (p.a.clone(), p.b.clone(), p.scale))
    }

    /// The A and B variables at a point, by our variable names.
    pub fn var_names(point: Point) -> (String, String) {
        (point.var_name("lora_A.weight"), point.var_name("lora_B.weight"))
    }

    /// DoRA's magnitude variable at a point, by our variable name.
    pub fn magnitude_name(point: Point) -> String {
        point.var_name("lora_magnitude_vector")
    }

    /// PEFT's DoRA forward: `output + (m/‖W + s·BA‖ − 1) ⊙ (x Wᵀ) + m/‖W + s·BA‖ ⊙ s·(x Aᵀ) Bᵀ`,
    /// with `x` dropped out in training and the norm detached.
    fn dora(&self, p: &Pair, magnitude: &Var, io: &ProjectionIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let w = &(io.linear.weight)()?;
        let delta = (p.b.as_tensor().detach().matmul(&p.a.as_tensor().detach())? * p.scale)?;
        let norm = (w + delta)?.sqr()?.sum(1)?.sqrt()?.detach();
        start_magnitude(p, magnitude, &norm)?;
        let scale = magnitude.as_tensor().div(&norm)?;
        let dropped = ctx.is_training() && self.config.dropout > 0.0;
        let x = if dropped { ctx.dropout(io.input, self.config.dropout)? } else { io.input.clone() };
        let base = match (dropped, io.linear.bias) {
            (true, _) => kernels::linear(&x, w, None)?,
            (false, Some(b)) => io.output.broadcast_sub(b)?,
            (false, None) => io.output.clone(),
        };
        let lora = kernels::linear(&(kernels::linear(&x, p.a.as_tensor(), None)? * p.scale)?, p.b.as_tensor(), None)?;
        let change = (base.broadcast_mul(&(&scale - 1.0)?)? + lora.broadcast_mul(&scale)?)?;
        io.output + change
    }
}

impl Adapter for Lora {
    fn kind(&self) -> &str {
        "lora"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("configs serialise")
    }

    fn points(&self) -> Vec<Point> {
        self.pairs.keys().copied().collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.pairs
            .iter()
            .flat_map(|(p, pair)| {
                let (a, b) = Lora::var_names(*p);
                let magnitude = pair.magnitude.iter().map(|m| (Lora::magnitude_name(*p), m.clone()));
                [(a, pair.a.clone()), (b, pair.b.clone())].into_iter().chain(magnitude)
            })
            .collect()
    }

    fn forward_projection(&self, point: Point, io: &ProjectionIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let p = &self.pairs[&point];
        if let Some(magnitude) = &p.magnitude {
            return self.dora(p, magnitude, io, ctx);
        }
        // The term added onto the output inside its product (a zero bias): as a separate
        // product and sum, a MiniLM batch of Pfeiffer and LoRA rows took 12-20% longer than
        // Pfeiffer alone, 6-11% with this (b32 x s128, 3 runs each).
        let term = self.low_rank(point, io.input, ctx)?;
        let zero = Tensor::zeros(term.up.dim(0)?, term.up.dtype(), term.up.device())?;
        kernels::linear_add(&term.down, &term.up, &zero, io.output)
    }

    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities { low_rank: Some(self), row_batched: Some(self), mergeable: Some(self), ..Default::default() }
    }
}

impl LowRankProjection for Lora {
    fn low_rank_term(&self, point: Point, input: &Tensor, ctx: &ForwardCtx) -> Option<Result<LowRank>> {
        // DoRA's update is not a low-rank term: it rescales the whole output.
        (self.pairs.contains_key(&point) && !self.config.use_dora).then(|| self.low_rank(point, input, ctx))
    }
}

impl RowBatched for Lora {
    fn batchable_form(&self, point: Point) -> Option<BatchableForm> {
        // DoRA rows run adapter by adapter (each normalises its own W + s·BA).
        let p = self.pairs.get(&point).filter(|p| p.magnitude.is_none())?;
        let (r, d_in) = p.a.dims2().ok()?;
        let d_out = p.b.dim(0).ok()?;
        let scale = Tensor::new(&[p.scale as f32], p.a.device()).ok()?;
        let key = format!("lora {d_in}->{r}->{d_out} dropout={}", self.config.dropout);
        Some(BatchableForm { key, weights: vec![p.a.as_tensor().clone(), p.b.as_tensor().clone(), scale] })
    }

    /// `weights`: A `[rows, r, in]`, B `[rows, out, r]`, the scale `[rows, 1]`.
    fn forward_projection_rows(&self, _point: Point, io: &ProjectionIo, weights: &[Tensor], ctx: &ForwardCtx) -> Result<Tensor> {
        let [a, b, scale] = weights else { candle_core::bail!("lora: {} per-row tensors given, not 3 (A, B, scale)", weights.len()) };
        let x = if ctx.is_training() && self.config.dropout > 0.0 { ctx.dropout(io.input, self.config.dropout)? } else { io.input.clone() };
        let down = kernels::row_linear(&x, a, None, None)?.broadcast_mul(&scale.unsqueeze(1)?)?;
        kernels::row_linear(&down, b, None, Some(io.output))
    }
}

impl Mergeable for Lora {
    /// LoRA: `W + s·BA`. DoRA: `m ⊙ (W + s·BA) / ‖W + s·BA‖` per output row (PEFT's merge);
    /// the norm is kept for [`Mergeable::unmerged_weight`].
    fn merged_weight(&self, point: Point, weight: &Tensor) -> Option<Result<Tensor>> {
        let p = self.pairs.get(&point)?;
        Some((|| {
            let adapted = (weight + (p.b.as_tensor().matmul(p.a.as_tensor())? * p.scale)?)?;
            let Some(magnitude) = &p.magnitude else { return Ok(adapted) };
            let norm = adapted.sqr()?.sum_keepdim(1)?.sqrt()?;
            start_magnitude(p, magnitude, &norm.squeeze(1)?)?;
            let merged = adapted.broadcast_mul(&magnitude.as_tensor().unsqueeze(1)?.div(&norm)?)?;
            self.merged_norms.lock().expect("not poisoned").insert(point, norm);
            Ok(merged)
        })())
    }

    /// LoRA: `W' − s·BA`. DoRA: `W' · ‖W + s·BA‖ / m − s·BA`, with the norm kept at merge.
    fn unmerged_weight(&self, point: Point, merged: &Tensor) -> Option<Result<Tensor>> {
        let p = self.pairs.get(&point)?;
        Some((|| {
            let delta = (p.b.as_tensor().matmul(p.a.as_tensor())? * p.scale)?;
            let adapted = match &p.magnitude {
                None => merged.clone(),
                Some(magnitude) => {
                    let norm = self.merged_norms.lock().expect("not poisoned").remove(&point);
                    let norm = norm.ok_or_else(|| candle_core::Error::Msg(format!("DoRA at {point} was not merged here")))?;
                    merged.broadcast_mul(&norm.div(&magnitude.as_tensor().unsqueeze(1)?)?)?
                }
            };
            adapted - delta
        })())
    }
}

/// A DoRA magnitude of NaN is one not read from a file: it starts at `norm` = ‖W + s·BA‖
/// (the adapter then starts as the identity). Checked once per point.
fn start_magnitude(p: &Pair, magnitude: &Var, norm: &Tensor) -> Result<()> {
    if !p.magnitude_set.load(std::sync::atomic::Ordering::Acquire) {
        if magnitude.as_tensor().to_vec1::<f32>()?.iter().any(|v| v.is_nan()) {
            magnitude.set(norm)?;
        }
        p.magnitude_set.store(true, std::sync::atomic::Ordering::Release);
    }
    Ok(())
}

/// Copies our variables from a map keyed by point, used by the PEFT reader.
pub(crate) fn tensors_by_point(pairs: HashMap<Point, (Tensor, Tensor)>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (p, (a, b)) in pairs {
        let (an, bn) = Lora::var_names(p);
        out.insert(an, a);
        out.insert(bn, b);
    }
    out
}
