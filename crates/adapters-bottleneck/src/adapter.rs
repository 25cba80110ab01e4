//! The bottleneck adapter: down-projection, non-linearity, up-projection, added to the
//! sublayer output (the residual is the backbone's).

use crate::config::{Activation, BottleneckConfig, InitWeights, KindDefaults, Scaling};
use adapters_core::{kernels, Adapter, BuildArgs, Error, ForwardCtx, Init, Point, SublayerIo};
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
        let points = args.placement.expand(args.model, kind.sites, |s| !s.is_projection())?;
        let mut init = Init::new(args.seed);
        let dev = args.device;
        let mut sites = BTreeMap::new();
        for spec in points {
            let d = spec.out_features;
            let r = args.placement.size_for(spec.point.layer, config.default_size(d));
            let (down_w, up_w) = match config.init_weights {
                InitWeights::Bert => (init.normal((r, d), 0.02, dev)?, init.normal((d, r), 0.02, dev)?),
                InitWeights::MamAdapter => (init.kaiming_uniform(r, d, dev)?, Tensor::zeros((d, r), DType::F32, dev)?),
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
                gate: if config.use_gating {
                    Some((var(init.normal((1, d), 0.02, dev)?)?, var(Tensor::zeros(1, DType::F32, dev)?)?))
                } else {
                    None
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

fn act(a: Activation, x: &Tensor) -> Result<Tensor> {
    match a {
        Activation::Relu => x.relu(),
        Activation::Gelu => kernels::gelu_erf(x),
        Activation::Swish | Activation::Silu => x.silu(),
        Activation::Tanh => x.tanh(),
    }
}

fn linear(x: &Tensor, w: &Var, b: &Var) -> Result<Tensor> {
    kernels::linear(x, w.as_tensor(), Some(b.as_tensor()))
}

fn layer_norm(x: &Tensor, (w, b): &(Var, Var)) -> Result<Tensor> {
    kernels::layer_norm(x, w.as_tensor(), b.as_tensor(), 1e-5)
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
        let s = &self.sites[&point];
        let c = &self.config;
        let z = if c.is_parallel {
            io.input.clone()
        } else if c.original_ln_before {
            match io.post_norm {
                Some(norm) => norm(io.output, io.input)?,
                None => (io.input + io.output)?,
            }
        } else {
            io.output.clone()
        };
        let z = match &s.norm_before {
            Some(n) => layer_norm(&z, n)?,
            None => z,
        };
        let hidden = act(c.non_linearity, &linear(&z, &s.down_w, &s.down_b)?)?;
        // A fixed scale with nothing between it and the up projection goes into that
        // projection's (small) weight and bias: no pass over the [tokens, hidden] output.
        let fold = match (&c.scaling, &s.norm_after) {
            (Scaling::Fixed(v), None) if *v != 1.0 => Some(*v),
            _ => None,
        };
        let (up_w, up_b) = match fold {
            Some(v) => ((s.up_w.as_tensor() * v)?, (s.up_b.as_tensor() * v)?),
            None => (s.up_w.as_tensor().clone(), s.up_b.as_tensor().clone()),
        };
        // Nothing between the up projection and the residual add (the usual case): one
        // fused step, which neither makes nor keeps the up projection's own output.
        let dropout = ctx.train && c.dropout > 0.0;
        let unscaled = fold.is_some() || matches!(c.scaling, Scaling::Fixed(v) if v == 1.0);
        if unscaled && s.norm_after.is_none() && s.gate.is_none() && !dropout {
            return kernels::linear_add(&hidden, &up_w, &up_b, io.output);
        }
        let mut up = kernels::linear(&hidden, &up_w, Some(&up_b))?;
        if let Some(n) = &s.norm_after {
            up = layer_norm(&up, n)?;
        }
        up = match (&c.scaling, &s.scaling) {
            (Scaling::Fixed(_), _) if fold.is_some() => up,
            (Scaling::Fixed(v), _) if *v == 1.0 => up,
            (Scaling::Fixed(v), _) => (up * *v)?,
            (_, Some(learned)) => up.broadcast_mul(learned.as_tensor())?,
            (_, None) => up,
        };
        if let Some((w, b)) = &s.gate {
            up = up.broadcast_mul(&candle_nn::ops::sigmoid(&linear(&z, w, b)?)?)?;
        }
        if dropout {
            up = ctx.dropout(&up, c.dropout)?;
        }
        io.output + up
    }
}
