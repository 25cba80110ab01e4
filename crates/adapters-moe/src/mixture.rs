//! The mixture adapter: at each of its points a router and a pool of experts, of which
//! each unit (token, sequence or task) runs only its top-k.
//!
//! `moe_bn` places Pfeiffer bottleneck experts after the feed-forward sublayer (each
//! reads what a `seq_bn` adapter reads and adds to the sublayer output); `moe_lora`
//! places LoRA experts on projections. The output is the frozen path plus
//! `Σ gateₑ · expertₑ(x)` over the chosen experts.

use crate::config::{Activation, Dispatch, ExpertKind, Granularity, MoeConfig, RouterKind};
use crate::router::{self, Plan, Units};
use adapters_core::{
    registry, Adapter, BuildArgs, Capabilities, Error, ForwardCtx, FusedPostNorm, Init, LayerNormWeights, Point, ProjectionIo, Site,
    SublayerIo,
};
use adapters_kernels as kernels;
use candle_core::{DType, Result, Tensor, Var, D};
use std::collections::BTreeMap;

/// A plain adapter's kind, configuration and tensors (by that kind's variable names).
pub struct PlainForm {
    /// `seq_bn` or `lora`.
    pub kind: &'static str,
    /// Its configuration.
    pub config: serde_json::Value,
    /// Its tensors.
    pub tensors: Vec<(String, Tensor)>,
}

/// One expert's parameters.
enum Expert {
    Bottleneck { down_w: Var, down_b: Var, up_w: Var, up_b: Var },
    Lora { a: Var, b: Var },
}

impl Expert {
    /// Variable names within an expert, those of the plain kind it generalises.
    fn names(kind: ExpertKind) -> &'static [&'static str] {
        match kind {
            ExpertKind::Bottleneck => &["adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"],
            ExpertKind::Lora => &["lora_A.weight", "lora_B.weight"],
        }
    }

    /// The variables, in the order of [`Expert::names`].
    fn vars(&self) -> Vec<&Var> {
        match self {
            Expert::Bottleneck { down_w, down_b, up_w, up_b } => vec![down_w, down_b, up_w, up_b],
            Expert::Lora { a, b } => vec![a, b],
        }
    }

    fn tensors(&self) -> Vec<Tensor> {
        self.vars().into_iter().map(|v| v.as_tensor().clone()).collect()
    }
}

/// A router and its experts at one point.
struct MixtureSite {
    /// `[choices, in]` for token and sequence routing, `[tasks, choices]` for task routing;
    /// `None` for the random router.
    router: Option<Var>,
    experts: Vec<Expert>,
    /// LoRA experts' scale (alpha / r); 1 for bottleneck experts.
    scale: f64,
}

impl MixtureSite {
    /// The experts' `i`-th variables (see [`Expert::names`]) stacked, `[E, ...]`.
    fn stacked(&self, i: usize) -> Result<Tensor> {
        Tensor::stack(&self.experts.iter().map(|e| e.vars()[i].as_tensor().clone()).collect::<Vec<_>>(), 0)
    }
}

/// A mixture-of-experts adapter (`moe_bn` or `moe_lora`) at one or more points.
pub struct Mixture {
    kind: ExpertKind,
    config: MoeConfig,
    sites: BTreeMap<Point, MixtureSite>,
}

/// Sites used when the placement names none: Pfeiffer's (after the feed-forward
/// sublayer) for bottleneck experts, PEFT's (query, value) for LoRA experts.
fn default_sites(kind: ExpertKind) -> &'static [Site] {
    match kind {
        ExpertKind::Bottleneck => &[Site::FfnOutput],
        ExpertKind::Lora => &[Site::Query, Site::Value],
    }
}

/// The context's attention mask flattened over a `[b, t]` batch (1 on tokens), when it has
/// one of that shape.
fn token_mask(ctx: &ForwardCtx, b: usize, t: usize) -> Result<Option<Vec<u32>>> {
    match &ctx.attention_mask {
        Some(m) if m.dims() == [b, t] => Ok(Some(m.flatten_all()?.to_vec1::<u32>()?)),
        _ => Ok(None),
    }
}

fn var(t: Tensor) -> Result<Var> {
    Var::from_tensor(&t)
}

impl Mixture {
    /// Builds a mixture of `kind` experts from registry arguments.
    pub fn build(kind: ExpertKind, args: &BuildArgs) -> std::result::Result<Self, Error> {
        let config = MoeConfig::parse(kind, args.config)?;
        let points = match kind {
            ExpertKind::Bottleneck => args.placement.expand(args.model, default_sites(kind), |s| s.is_hidden())?,
            ExpertKind::Lora => args.placement.expand(args.model, default_sites(kind), Site::is_projection)?,
        };
        let mut init = Init::new(args.seed);
        let dev = args.device;
        let mut sites = BTreeMap::new();
        for spec in points {
            let (d_in, d_out) = (spec.in_features, spec.out_features);
            let (experts, scale) = match kind {
                ExpertKind::Bottleneck => {
                    let rf = config.reduction_factor.expect("parse fills it");
                    let r = args.placement.size_for(spec.point.layer, ((d_out as f64 / rf) as usize).max(1));
                    registry::check_width(kind.name(), "reduction_factor (or placement.sizes)", r, d_out, d_out, spec.point)?;
                    let draw = |init: &mut Init| -> Result<[Tensor; 2]> {
                        Ok([init.normal((r, d_out), 0.02, dev)?, init.normal((d_out, r), 0.02, dev)?])
                    };
                    let shared = if config.shared_init { Some(draw(&mut init)?) } else { None };
                    let mut experts = Vec::with_capacity(config.experts);
                    for _ in 0..config.experts {
                        let [down, up] = match &shared {
                            Some(s) => s.clone(),
                            None => draw(&mut init)?,
                        };
                        experts.push(Expert::Bottleneck {
                            // Copies, so that experts with a shared start train apart.
                            down_w: var(down.copy()?)?,
                            down_b: var(Tensor::zeros(r, DType::F32, dev)?)?,
                            up_w: var(up.copy()?)?,
                            up_b: var(Tensor::zeros(d_out, DType::F32, dev)?)?,
                        });
                    }
                    (experts, 1.0)
                }
                ExpertKind::Lora => {
                    let r = args.placement.size_for(spec.point.layer, config.r.expect("parse fills it"));
                    registry::check_width(kind.name(), "r (or placement.sizes)", r, d_in, d_out, spec.point)?;
                    let shared = if config.shared_init { Some(init.kaiming_uniform(r, d_in, dev)?) } else { None };
                    let mut experts = Vec::with_capacity(config.experts);
                    for _ in 0..config.experts {
                        let a = match &shared {
                            Some(a) => a.copy()?,
                            None => init.kaiming_uniform(r, d_in, dev)?,
                        };
                        experts.push(Expert::Lora { a: var(a)?, b: var(Tensor::zeros((d_out, r), DType::F32, dev)?)? });
                    }
                    (experts, config.alpha.expect("parse fills it") / r as f64)
                }
            };
            let router = match (config.router, config.routing) {
                (RouterKind::Random, _) => None,
                (_, Granularity::Task) => Some(var(init.normal((config.tasks, config.choices()), 0.02, dev)?)?),
                _ => Some(var(init.normal((config.choices(), d_in), 0.02, dev)?)?),
            };
            sites.insert(spec.point, MixtureSite { router, experts, scale });
        }
        Ok(Mixture { kind, config, sites })
    }

    /// The configuration it was built with.
    pub fn settings(&self) -> &MoeConfig {
        &self.config
    }

    /// Which experts it mixes.
    pub fn expert_kind(&self) -> ExpertKind {
        self.kind
    }

    /// Parameters one token uses at one point: its top-k experts' and the router's.
    pub fn active_parameters_per_point(&self) -> usize {
        let Some(site) = self.sites.values().next() else { return 0 };
        let expert: usize = site.experts[0].vars().iter().map(|v| v.elem_count()).sum();
        expert * self.config.top_k + site.router.as_ref().map_or(0, |r| r.elem_count())
    }

    /// The plain adapter this mixture becomes when its experts are averaged
    /// (`adapters merge-experts`). For mixtures whose experts started alike
    /// and were routed at random (AdaMix) the average is what the mixture learned.
    pub fn averaged(&self) -> Result<PlainForm> {
        let mut tensors = Vec::new();
        for (point, site) in &self.sites {
            let each: Vec<Vec<Tensor>> = site.experts.iter().map(Expert::tensors).collect();
            for (i, name) in Expert::names(self.kind).iter().enumerate() {
                let stacked = Tensor::stack(&each.iter().map(|t| t[i].clone()).collect::<Vec<_>>(), 0)?;
                tensors.push((point.var_name(name), (stacked.sum(0)? / each.len() as f64)?));
            }
        }
        let c = &self.config;
        let (kind, config) = match self.kind {
            ExpertKind::Bottleneck => {
                ("seq_bn", serde_json::json!({"reduction_factor": c.reduction_factor, "non_linearity": c.non_linearity}))
            }
            ExpertKind::Lora => ("lora", serde_json::json!({"r": c.r, "alpha": c.alpha})),
        };
        Ok(PlainForm { kind, config, tensors })
    }

    /// Router logits `[units, choices]` at a site (`None`: the random router).
    fn logits(&self, site: &MixtureSite, x: &Tensor, units: &Units, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        let Some(router) = &site.router else { return Ok(None) };
        let router = router.as_tensor();
        let (b, t, d) = x.dims3()?;
        let dev = x.device();
        Ok(Some(match self.config.routing {
            Granularity::Token => {
                let flat = x.reshape((b * t, d))?;
                let tokens =
                    if units.kept.len() == b * t { flat } else { flat.index_select(&Tensor::new(units.kept.as_slice(), dev)?, 0)? };
                kernels::linear(&tokens, router, None)?
            }
            Granularity::Sequence => {
                // The mean of each row's tokens (padding left out).
                let mut weights = vec![0f32; b * t];
                let mut counts = vec![0f32; b];
                for &k in &units.kept {
                    counts[k as usize / t] += 1.0;
                }
                for &k in &units.kept {
                    weights[k as usize] = 1.0 / counts[k as usize / t];
                }
                let weights = Tensor::from_vec(weights, (b, 1, t), dev)?;
                let means = weights.matmul(x)?.squeeze(1)?;
                let rows = means.index_select(&Tensor::new(units.row.as_slice(), dev)?, 0)?;
                kernels::linear(&rows, router, None)?
            }
            Granularity::Task => {
                let ids = self.unit_tasks(units, ctx)?.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{}: task routing needs task ids in the forward context (a multi-task run has them; \
                         `adapters route --task-id N` gives one)",
                        self.kind.name()
                    ))
                })?;
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.tasks) {
                    candle_core::bail!(
                        "{}: task id {bad} is out of range; this mixture routes {} tasks",
                        self.kind.name(),
                        self.config.tasks
                    );
                }
                router.index_select(&Tensor::new(ids.as_slice(), dev)?, 0)?
            }
        }))
    }

    /// Each unit's task id, when the context carries task ids.
    fn unit_tasks(&self, units: &Units, ctx: &ForwardCtx) -> Result<Option<Vec<u32>>> {
        let Some(ids) = &ctx.task_ids else { return Ok(None) };
        let ids = ids.to_vec1::<u32>()?;
        units.row.iter().map(|&r| ids.get(r as usize).copied()).collect::<Option<Vec<_>>>().map(Some).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: the forward context has {} task ids for a larger batch", self.kind.name(), ids.len()))
        })
    }

    /// The non-linearity between an expert's two products.
    fn activation(&self) -> kernels::Activation {
        match (self.kind, self.config.non_linearity) {
            (ExpertKind::Lora, _) => kernels::Activation::Identity,
            (_, Some(Activation::Gelu)) => kernels::Activation::Gelu,
            (_, Some(Activation::Silu)) => kernels::Activation::Silu,
            (_, Some(Activation::Tanh)) => kernels::Activation::Tanh,
            (_, _) => kernels::Activation::Relu,
        }
    }

    /// One expert on the rows of `x` (`[n, in]` → `[n, out]`).
    fn expert(&self, expert: &Expert, scale: f64, x: &Tensor) -> Result<Tensor> {
        match expert {
            Expert::Bottleneck { down_w, down_b, up_w, up_b } => {
                let h = self.activation().apply(&kernels::linear(x, down_w.as_tensor(), Some(down_b.as_tensor()))?)?;
                kernels::linear(&h, up_w.as_tensor(), Some(up_b.as_tensor()))
            }
            Expert::Lora { a, b } => kernels::linear(&(kernels::linear(x, a.as_tensor(), None)? * scale)?, b.as_tensor(), None),
        }
    }

    /// `output + Σ gate · expert(x)` at a point; the router reads `x` too.
    fn mix(&self, point: Point, x: &Tensor, output: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let site = &self.sites[&point];
        let (b, t, d_in) = x.dims3()?;
        let d_out = output.dim(D::Minus1)?;
        let mask = token_mask(ctx, b, t)?;
        let units = Units::new(self.config.routing, b, t, mask.as_deref());
        let logits = self.logits(site, x, &units, ctx)?;
        let unit_tasks = self.unit_tasks(&units, ctx)?;
        let plan = router::plan(&self.config, self.kind.name(), point, logits, units, unit_tasks, ctx)?;
        if ctx.is_training() || ctx.record_routing {
            ctx.push_routing(plan.stats.clone());
        }
        let x = x.reshape((b * t, d_in))?;
        let out = output.reshape((b * t, d_out))?;
        let out = match self.config.dispatch {
            Dispatch::Sparse => self.sparse(site, &plan, &x, &out, ctx)?,
            Dispatch::Dense => self.dense(site, &plan, &x, &out)?,
        };
        out.reshape((b, t, d_out))
    }

    /// Each expert on its own tokens only ([`kernels::expert_mix`]: one fused pass in
    /// inference, gather-products-scatter with autograd in training).
    fn sparse(&self, site: &MixtureSite, plan: &Plan, x: &Tensor, out: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let dev = x.device();
        let mut tokens = Vec::new();
        let mut gate_at = Vec::new();
        let mut offsets = vec![0];
        for e in 0..site.experts.len() {
            tokens.extend_from_slice(&plan.tokens[e]);
            gate_at.extend_from_slice(&plan.gate_at[e]);
            offsets.push(tokens.len());
        }
        if tokens.is_empty() {
            return Ok(out.clone());
        }
        let gates = plan.gates.pick(&gate_at, dev)?;
        let stack = |i: usize| site.stacked(i);
        let ((down, down_bias, up, up_bias), gates) = match self.kind {
            ExpertKind::Bottleneck => ((stack(0)?, Some(stack(1)?), stack(2)?, Some(stack(3)?)), gates),
            // LoRA's scale is linear: it goes into the gates.
            ExpertKind::Lora => ((stack(0)?, None, stack(1)?, None), (gates * site.scale)?),
        };
        let experts = kernels::Experts {
            down: &down,
            down_bias: down_bias.as_ref(),
            up: &up,
            up_bias: up_bias.as_ref(),
            activation: self.activation(),
        };
        let routes = kernels::Routes { tokens: &tokens, offsets: &offsets };
        kernels::expert_mix(x, out, &gates, &experts, &routes, ctx.is_training() || ctx.builds_graph())
    }

    /// [`FusedPostNorm::add_layer_norm`] at `site`: each real token routed by
    /// [`router::route_row`], padding passed through.
    fn fused_add_layer_norm(
        &self,
        site: &MixtureSite,
        io: &SublayerIo,
        (weight, bias, eps): LayerNormWeights,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, t, _) = io.output.dims3()?;
        let mask = token_mask(ctx, b, t)?;
        let route = |row: usize, logits: &[f32], picks: &mut Vec<(u32, f32)>| {
            // Padding is not routed: it passes through.
            if mask.as_ref().is_none_or(|m| m[row] != 0) {
                router::route_row(&self.config, logits, picks);
            }
        };
        let router = site.router.as_ref().ok_or_else(|| candle_core::Error::Msg("the fused pass needs a learned router".into()))?;
        let router = router.as_tensor();
        let (down, down_bias, up, up_bias) = (site.stacked(0)?, site.stacked(1)?, site.stacked(2)?, site.stacked(3)?);
        let experts =
            kernels::Experts { down: &down, down_bias: Some(&down_bias), up: &up, up_bias: Some(&up_bias), activation: self.activation() };
        let mixture = kernels::RoutedExperts { router, route: &route, experts };
        kernels::mixture_add_layer_norm(io.input, io.output, &mixture, weight, bias, eps)
    }

    /// Every expert on every token, masked by the plan's gates: the reference the sparse
    /// dispatch must equal.
    fn dense(&self, site: &MixtureSite, plan: &Plan, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        let dev = x.device();
        let n = plan.kept.len();
        if n == 0 {
            return Ok(out.clone());
        }
        let kept = Tensor::new(plan.kept.as_slice(), dev)?;
        let xs = x.index_select(&kept, 0)?;
        // Position of each flat token among the kept ones.
        let mut place = vec![u32::MAX; out.dim(0)?];
        for (i, &k) in plan.kept.iter().enumerate() {
            place[k as usize] = i as u32;
        }
        let mut total: Option<Tensor> = None;
        for (e, expert) in site.experts.iter().enumerate() {
            // The gate of expert e for every kept token: zero where it was not chosen.
            let mut chosen = vec![0f32; n];
            let mut at = vec![0u32; n];
            for (&tok, &g) in plan.tokens[e].iter().zip(&plan.gate_at[e]) {
                let i = place[tok as usize] as usize;
                chosen[i] = 1.0;
                at[i] = g;
            }
            let chosen = Tensor::from_vec(chosen, (n, 1), dev)?;
            let gate = (plan.gates.pick(&at, dev)?.unsqueeze(1)? * &chosen)?;
            let y = self.expert(expert, site.scale, &xs)?.broadcast_mul(&gate)?;
            total = Some(match total {
                None => y,
                Some(t) => (t + y)?,
            });
        }
        out.index_add(&kept, &total.expect("at least one expert"), 0)
    }
}

impl Adapter for Mixture {
    fn kind(&self) -> &str {
        self.kind.name()
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("configs serialise")
    }

    fn points(&self) -> Vec<Point> {
        self.sites.keys().copied().collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (p, site) in &self.sites {
            if let Some(r) = &site.router {
                out.push((p.var_name("router.weight"), r.clone()));
            }
            for (e, expert) in site.experts.iter().enumerate() {
                for (name, v) in Expert::names(self.kind).iter().zip(expert.vars()) {
                    out.push((p.var_name(&format!("experts.{e}.{name}")), v.clone()));
                }
            }
        }
        out
    }

    /// Reads what a Pfeiffer adapter reads (the post-norm sum of the sublayer's input and
    /// output, or their sum in pre-norm models) and adds the experts' mix to the output.
    fn forward_hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let z = match io.post_norm {
            Some(norm) => norm(io.output, io.input)?,
            None => (io.input + io.output)?,
        };
        self.mix(point, &z, io.output, ctx)
    }

    fn forward_projection(&self, point: Point, io: &ProjectionIo, ctx: &ForwardCtx) -> Result<Tensor> {
        self.mix(point, io.input, io.output, ctx)
    }

    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities { fused_post_norm: Some(self), ..Default::default() }
    }
}

impl FusedPostNorm for Mixture {
    /// Bottleneck experts routed per token, without a capacity limit: routing, the chosen
    /// experts and the backbone's add-and-norm in one pass
    /// ([`kernels::mixture_add_layer_norm`]). Routing statistics, when asked for, come
    /// from the routing plan of `forward_hidden`, so that path runs then.
    fn add_layer_norm(&self, point: Point, io: &SublayerIo, norm: LayerNormWeights, ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        let c = &self.config;
        let fusable = self.kind == ExpertKind::Bottleneck
            && c.routing == Granularity::Token
            && c.learned_router()
            && c.capacity_factor.is_none()
            && c.dispatch == Dispatch::Sparse
            && !ctx.record_routing;
        let site = self.sites.get(&point).filter(|_| fusable)?;
        Some(self.fused_add_layer_norm(site, io, norm, ctx))
    }
}
