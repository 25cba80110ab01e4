//! The bottleneck adapter: down-projection, non-linearity, up-projection, added to the
//! sublayer output (the residual is the backbone's).

use crate::config::{BottleneckConfig, InitWeights, KindDefaults, ResidualBeforeLn, Scaling};
use adapters_core::{
    registry, Adapter, BatchableForm, BuildArgs, Capabilities, Error, ForwardCtx, FusedPostNorm, Init, LayerNormWeights, Point, RowBatched,
    SublayerIo,
};
use adapters_kernels as kernels;
use candle_core::{DType, Result, Tensor, Var};
use std::collections::BTreeMap;

/// The parameters at one point.
struct Site {
    down_w: Var,
    down_b: Var,
    up_w: Var,
    up_b: Var,
    norm_before: Option<(Var, Var)>,
    norm_after: Option<(Var, Var)>,
    gate: Option<(Var, Var)>,
    scaling: Option<Var>,
}

/// A bottleneck adapter (`seq_bn`, `double_seq_bn` or `par_bn`) at one or more points.
pub struct Bottleneck {
    kind: &'static str,
    config: BottleneckConfig,
    sites: BTreeMap<Point, Site>,
}

fn var(t: Tensor) -> Result<Var> {
    Var::from_tensor(&t)
}

impl Bottleneck {
    /// Builds a bottleneck adapter of `kind` from registry arguments.
    pub fn build(kind: &'static KindDefaults, args: &BuildArgs) -> std::result::Result<Self, Error> {
        let config = crate::config::resolve(kind, args.config)?;
        let points = args.placement.expand(args.model, kind.sites, |s| s.is_hidden())?;
        let mut init = Init::new(args.seed);
        let dev = args.device;
        let mut sites = BTreeMap::new();
        for spec in points {
            let d = spec.out_features;
            let r = args.placement.size_for(spec.point.layer, config.default_size(d));
            registry::check_width(kind.name, "reduction_factor (or placement.sizes)", r, d, d, spec.point)?;
            let (down_w, up_w) = match config.init_weights {
                InitWeights::Bert => (init.normal((r, d), 0.02, dev)?, init.normal((d, r), 0.02, dev)?),
                InitWeights::MamAdapter => (init.kaiming_uniform(r, d, dev)?, Tensor::zeros((d, r), DType::F32, dev)?),
                InitWeights::Houlsby => (init.truncated_normal((r, d), 0.01, 0.02, dev)?, init.truncated_normal((d, r), 0.01, 0.02, dev)?),
            };
            let norm = |on: bool| -> Result<Option<(Var, Var)>> {
                Ok(if on { Some((var(Tensor::ones(d, DType::F32, dev)?)?, var(Tensor::zeros(d, DType::F32, dev)?)?)) } else { None })
            };
            let site = Site {
                down_w: var(down_w)?,
                down_b: var(Tensor::zeros(r, DType::F32, dev)?)?,
                up_w: var(up_w)?,
                up_b: var(Tensor::zeros(d, DType::F32, dev)?)?,
                norm_before: norm(config.ln_before)?,
                norm_after: norm(config.ln_after)?,
                gate: match (config.use_gating, config.init_weights) {
                    (false, _) => None,
                    // AdapterHub leaves `houlsby`'s gate at PyTorch's default Linear init.
                    (true, InitWeights::Houlsby) => {
                        let bound = 1.0 / (d as f64).sqrt();
                        Some((var(init.kaiming_uniform(1, d, dev)?)?, var(init.uniform(1, bound, dev)?)?))
                    }
                    (true, _) => Some((var(init.normal((1, d), 0.02, dev)?)?, var(Tensor::zeros(1, DType::F32, dev)?)?)),
                },
                scaling: match config.scaling {
                    Scaling::Fixed(_) => None,
                    Scaling::Learned => Some(var(Tensor::ones(1, DType::F32, dev)?)?),
                    Scaling::Channel => Some(var(Tensor::ones(d, DType::F32, dev)?)?),
                },
            };
            sites.insert(spec.point, site);
        }
        Ok(Bottleneck { kind: kind.name, config, sites })
    }

    /// The configuration it was built with.
    pub fn settings(&self) -> &BottleneckConfig {
        &self.config
    }

    /// The bottleneck width at a point.
    pub fn size_at(&self, point: Point) -> Option<usize> {
        self.sites.get(&point).map(|s| s.down_b.dim(0).unwrap_or(0))
    }
}

/// A site's tensors: the adapter's own, or (`per_row`) stacked per row of a batch whose
/// rows use different adapters of one configuration (`[rows, ...]`).
struct Weights {
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    norm_before: Option<(Tensor, Tensor)>,
    norm_after: Option<(Tensor, Tensor)>,
    gate: Option<(Tensor, Tensor)>,
    scaling: Option<Tensor>,
    per_row: bool,
}

impl Site {
    /// Every tensor, in the order of [`Adapter::vars`].
    fn tensors(&self) -> Vec<Tensor> {
        let pair = |p: &Option<(Var, Var)>| p.iter().flat_map(|(w, b)| [w.as_tensor().clone(), b.as_tensor().clone()]).collect::<Vec<_>>();
        let mut out = vec![
            self.down_w.as_tensor().clone(),
            self.down_b.as_tensor().clone(),
            self.up_w.as_tensor().clone(),
            self.up_b.as_tensor().clone(),
        ];
        out.extend(pair(&self.norm_before));
        out.extend(pair(&self.norm_after));
        out.extend(pair(&self.gate));
        out.extend(self.scaling.iter().map(|v| v.as_tensor().clone()));
        out
    }

    /// `tensors` (this site's own, or stacked per row), named by this site's layout.
    fn weights(&self, tensors: &[Tensor], per_row: bool) -> Result<Weights> {
        if tensors.len() != self.tensors().len() {
            candle_core::bail!("bottleneck site: {} tensors given for a site of {}", tensors.len(), self.tensors().len());
        }
        let mut it = tensors.iter().cloned();
        let mut next = || it.next().expect("counted above");
        let (down_w, down_b, up_w, up_b) = (next(), next(), next(), next());
        let mut pair = |on: bool| if on { Some((next(), next())) } else { None };
        let (norm_before, norm_after, gate) =
            (pair(self.norm_before.is_some()), pair(self.norm_after.is_some()), pair(self.gate.is_some()));
        let scaling = self.scaling.as_ref().map(|_| next());
        Ok(Weights { down_w, down_b, up_w, up_b, norm_before, norm_after, gate, scaling, per_row })
    }
}

impl Weights {
    fn linear(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.per_row {
            kernels::row_linear(x, w, Some(b), None)
        } else {
            kernels::linear(x, w, Some(b))
        }
    }

    fn layer_norm(&self, x: &Tensor, (w, b): &(Tensor, Tensor)) -> Result<Tensor> {
        if self.per_row {
            kernels::row_layer_norm(x, w, b, 1e-5)
        } else {
            kernels::layer_norm(x, w, b, 1e-5)
        }
    }

    /// A learned scale as it broadcasts over `[batch, seq, hidden]`.
    fn scale(&self, s: &Tensor) -> Result<Tensor> {
        if self.per_row {
            s.unsqueeze(1)
        } else {
            Ok(s.clone())
        }
    }
}

impl Bottleneck {
    /// The forward at a site with the given weights (see [`Weights`]), in AdapterHub's
    /// order: the adapter reads `x`; `up(act(down(norm_before(x)))) · scaling`, dropped
    /// out, gated per sequence by the mean of σ(gate(x)), normed after (with the residual
    /// added before or after that norm) and added to the residual; the backbone then adds
    /// its residual stream and applies its own norm to what this returns.
    fn forward_with(&self, w: &Weights, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let c = &self.config;
        let (x, residual) = if c.is_parallel {
            (io.input.clone(), io.output.clone())
        } else if c.original_ln_before {
            let sum = || io.input + io.output;
            let x = match io.post_norm {
                Some(norm) => norm(io.output, io.input)?,
                None => sum()?,
            };
            let residual = match c.residual_before_ln {
                ResidualBeforeLn::Output => io.output.clone(),
                ResidualBeforeLn::AdapterInput => x.clone(),
                ResidualBeforeLn::PostAdd if io.post_norm.is_some() => sum()?,
                ResidualBeforeLn::PostAdd => candle_core::bail!(
                    "residual_before_ln = \"post_add\" needs a post-norm backbone (BERT): this one applies no norm after the \
                     residual add to take the residual before (AdapterHub fails on it too)"
                ),
            };
            (x, residual)
        } else {
            (io.output.clone(), io.output.clone())
        };
        let z = match &w.norm_before {
            Some(n) => w.layer_norm(&x, n)?,
            None => x.clone(),
        };
        let hidden = c.non_linearity.apply(&w.linear(&z, &w.down_w, &w.down_b)?)?;
        // A fixed scale goes into the up projection's (small) weight and bias: no pass
        // over the [tokens, hidden] output.
        let (up_w, up_b) = match c.scaling {
            Scaling::Fixed(v) if v != 1.0 => ((&w.up_w * v)?, (&w.up_b * v)?),
            _ => (w.up_w.clone(), w.up_b.clone()),
        };
        let dropout = ctx.is_training() && c.dropout > 0.0;
        let dropped_rows = ctx.is_training() && c.stochastic_depth > 0.0 && !c.is_parallel;
        let learned = matches!(c.scaling, Scaling::Learned | Scaling::Channel);
        // Nothing between the up projection and the residual add (the usual case): one
        // fused step, which neither makes nor keeps the up projection's own output.
        if !learned && w.norm_after.is_none() && w.gate.is_none() && !dropout && !dropped_rows {
            return match w.per_row {
                true => kernels::row_linear(&hidden, &up_w, Some(&up_b), Some(&residual)),
                false => kernels::linear_add(&hidden, &up_w, &up_b, &residual),
            };
        }
        let mut up = w.linear(&hidden, &up_w, &up_b)?;
        if dropped_rows {
            let keep = ctx.dropout(&Tensor::ones((up.dim(0)?, 1, 1), up.dtype(), up.device())?, c.stochastic_depth)?;
            up = up.broadcast_mul(&keep)?;
        }
        if let (true, Some(learned)) = (learned, &w.scaling) {
            up = up.broadcast_mul(&w.scale(learned)?)?;
        }
        if dropout {
            up = ctx.dropout(&up, c.dropout)?;
        }
        if let Some((gw, gb)) = &w.gate {
            up = up.broadcast_mul(&sequence_gate(&candle_nn::ops::sigmoid(&w.linear(&x, gw, gb)?)?, ctx)?)?;
        }
        let residual_first = c.adapter_residual_before_ln && !c.is_parallel;
        if residual_first {
            up = (up + &residual)?;
        }
        if let Some(n) = &w.norm_after {
            up = w.layer_norm(&up, n)?;
        }
        if residual_first {
            Ok(up)
        } else {
            residual + up
        }
    }
}

/// A sequence's gate: the mean over its tokens of the per-token gates `[batch, seq, 1]`,
/// as `[batch, 1, 1]`. AdapterHub averages over the padded length; we average over each
/// sequence's own tokens (the attention mask), which equals AdapterHub's on an unpadded
/// sequence and keeps a row's result independent of its batch-mates.
fn sequence_gate(gates: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
    let (batch, seq, _) = gates.dims3()?;
    match &ctx.attention_mask {
        Some(mask) if mask.dims() == [batch, seq] => {
            let mask = mask.to_dtype(gates.dtype())?.unsqueeze(2)?;
            let tokens = mask.sum_keepdim(1)?.clamp(1f64, f64::MAX)?;
            gates.mul(&mask)?.sum_keepdim(1)?.div(&tokens)
        }
        _ => gates.mean_keepdim(1),
    }
}

impl Adapter for Bottleneck {
    fn kind(&self) -> &str {
        self.kind
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("configs serialise")
    }

    fn points(&self) -> Vec<Point> {
        self.sites.keys().copied().collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (p, s) in &self.sites {
            let mut push = |name: &str, v: &Var| out.push((p.var_name(name), v.clone()));
            push("adapter_down.weight", &s.down_w);
            push("adapter_down.bias", &s.down_b);
            push("adapter_up.weight", &s.up_w);
            push("adapter_up.bias", &s.up_b);
            if let Some((w, b)) = &s.norm_before {
                push("adapter_norm_before.weight", w);
                push("adapter_norm_before.bias", b);
            }
            if let Some((w, b)) = &s.norm_after {
                push("adapter_norm_after.weight", w);
                push("adapter_norm_after.bias", b);
            }
            if let Some((w, b)) = &s.gate {
                push("gate.weight", w);
                push("gate.bias", b);
            }
            if let Some(v) = &s.scaling {
                push("scaling", v);
            }
        }
        out
    }

    fn forward_hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let site = &self.sites[&point];
        self.forward_with(&site.weights(&site.tensors(), false)?, io, ctx)
    }

    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities { row_batched: Some(self), fused_post_norm: Some(self), ..Default::default() }
    }
}

impl RowBatched for Bottleneck {
    fn batchable_form(&self, point: Point) -> Option<BatchableForm> {
        let site = self.sites.get(&point)?;
        let c = &self.config;
        let (r, d) = site.down_w.dims2().ok()?;
        // Everything the forward depends on besides the tensors (not the kind's name or the init).
        let key = format!(
            "bottleneck {d}x{r} act={:?} original_ln_before={} parallel={} scaling={:?} ln_before={} ln_after={} dropout={} gating={} \
             residual={:?} adapter_residual_before_ln={} stochastic_depth={}",
            c.non_linearity,
            c.original_ln_before,
            c.is_parallel,
            c.scaling,
            c.ln_before,
            c.ln_after,
            c.dropout,
            c.use_gating,
            c.residual_before_ln,
            c.adapter_residual_before_ln,
            c.stochastic_depth
        );
        Some(BatchableForm { key, weights: site.tensors() })
    }

    fn forward_hidden_rows(&self, point: Point, io: &SublayerIo, weights: &[Tensor], ctx: &ForwardCtx) -> Result<Tensor> {
        self.forward_with(&self.sites[&point].weights(weights, true)?, io, ctx)
    }
}

impl FusedPostNorm for Bottleneck {
    fn add_layer_norm(&self, point: Point, io: &SublayerIo, norm: LayerNormWeights, _ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        let (weight, bias, eps) = norm;
        let form = self.bottleneck(point)?;
        Some(form.and_then(|b| kernels::bottleneck_add_layer_norm(io.input, io.output, &b, weight, bias, eps)))
    }
}

impl Bottleneck {
    /// The whole change at `point` as one bottleneck (`up(act(down(z)))` added to the
    /// sublayer output), for the fused inference pass; `None` for sites with their own
    /// norms or gate, another residual, or an activation the kernels lack.
    fn bottleneck(&self, point: Point) -> Option<Result<kernels::Bottleneck>> {
        let (c, site) = (&self.config, self.sites.get(&point)?);
        if site.norm_before.is_some() || site.norm_after.is_some() || site.gate.is_some() {
            return None;
        }
        if c.original_ln_before && !c.is_parallel && c.residual_before_ln != ResidualBeforeLn::Output {
            return None;
        }
        let activation = c.non_linearity.kernel()?;
        let reads = match (c.is_parallel, c.original_ln_before) {
            (true, _) => kernels::BottleneckInput::Input,
            (false, true) => kernels::BottleneckInput::NormedSum,
            (false, false) => kernels::BottleneckInput::Output,
        };
        // The scale goes into the up projection's rows (output channels) and bias.
        let scaled = |w: &Var, rows: bool| -> Result<Tensor> {
            match (&c.scaling, &site.scaling) {
                (Scaling::Fixed(v), _) if *v != 1.0 => w.as_tensor() * *v,
                (Scaling::Learned | Scaling::Channel, Some(s)) if rows => w.broadcast_mul(&s.unsqueeze(1)?),
                (Scaling::Learned | Scaling::Channel, Some(s)) => w.broadcast_mul(s),
                _ => Ok(w.as_tensor().clone()),
            }
        };
        Some((|| {
            Ok(kernels::Bottleneck {
                reads,
                down: site.down_w.as_tensor().clone(),
                down_bias: site.down_b.as_tensor().clone(),
                activation,
                up: scaled(&site.up_w, true)?,
                up_bias: scaled(&site.up_b, false)?,
            })
        })())
    }
}
