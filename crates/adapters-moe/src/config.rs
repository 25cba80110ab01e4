//! The mixture configuration shared by `moe_bn` and `moe_lora`: the experts, the router
//! and the balance terms. Validated once, when an adapter is built.

use adapters_core::registry::parse_config;
use adapters_core::Error;
use serde::{Deserialize, Serialize};

/// Which unit the router sends to experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// Every (non-padding) token on its own.
    Token,
    /// Every sequence, by the mean of its tokens: all its tokens go to the same experts.
    Sequence,
    /// Every sequence, by its task id (from the forward context): a learned table of
    /// router logits per task.
    Task,
}

/// How the router picks experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    /// Softmax over learned logits, top-k.
    Linear,
    /// As `linear`, with Normal(0, `noise_std`) added to the logits in training (from the
    /// forward context's seeded generator, so a resumed run repeats exactly).
    Noisy,
    /// AdaMix: no router; in training each unit goes to one expert drawn uniformly, in
    /// inference every expert runs and their outputs are averaged. Meant to be turned
    /// into one plain adapter with `adapters merge-experts`.
    Random,
}

/// What a top-1 unit's chosen expert output is multiplied by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// The router probability (Switch Transformer); for top-k > 1, renormalised over the
    /// chosen experts.
    Probability,
    /// Top-1 only: 1 in the forward pass, with the router probability's gradient in the
    /// backward pass (`1 + p − stop_gradient(p)`). The expert's output is not scaled down
    /// by a router that is still near uniform (p ≈ 1/N early in training, and kept there
    /// by the balance loss), while the router still learns from the gate.
    StraightThrough,
}

/// How the chosen experts are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// Each expert runs on its own tokens only (gather, product, scatter).
    Sparse,
    /// Every expert runs on every token and the gates mask the result: the same output
    /// at `experts / top_k` times the work. A reference for tests and benchmarks.
    Dense,
}

/// The non-linearity of bottleneck experts (the names of the bottleneck family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `gelu` (exact).
    Gelu,
    /// `silu`.
    Silu,
    /// `tanh`.
    Tanh,
}

/// A mixture's configuration (`moe_bn` and `moe_lora`; the expert-size fields belong to one
/// kind each).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Experts per site.
    #[serde(default = "default_experts")]
    pub experts: usize,
    /// Experts each unit is sent to.
    #[serde(default = "one")]
    pub top_k: usize,
    /// `moe_bn`: each expert's bottleneck is hidden / reduction_factor wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduction_factor: Option<f64>,
    /// `moe_bn`: the experts' non-linearity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_linearity: Option<Activation>,
    /// `moe_lora`: each expert's rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<usize>,
    /// `moe_lora`: scale = alpha / r.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// What is routed: `token`, `sequence` or `task`.
    #[serde(default = "default_routing")]
    pub routing: Granularity,
    /// Number of task ids (task routing only).
    #[serde(default)]
    pub tasks: usize,
    /// `linear`, `noisy` or `random` (see [`RouterKind`]).
    #[serde(default = "default_router")]
    pub router: RouterKind,
    /// `probability` or `straight_through` (see [`Gate`]).
    #[serde(default = "default_gate")]
    pub gate: Gate,
    /// Standard deviation of the `noisy` router's logit noise.
    #[serde(default = "one_f")]
    pub noise_std: f64,
    /// Switch Transformer's load-balancing loss `α · N · Σ fᵢ · Pᵢ`: this is α (0: off).
    #[serde(default = "default_balance")]
    pub balance_loss: f64,
    /// ST-MoE's router z-loss `β · mean(logsumexp(logits)²)`: this is β (0: off).
    #[serde(default)]
    pub z_loss: f64,
    /// Each expert takes at most `capacity_factor · units · top_k / experts` units per
    /// forward (rounded up), in order; assignments beyond that are dropped and their tokens
    /// pass through that expert unchanged. `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f64>,
    /// Adds a "no expert" choice to the router: units that choose it pass through
    /// unchanged (k = 0 for them: structured sparsity).
    #[serde(default)]
    pub skip_expert: bool,
    /// Every expert starts from the same initial weights (AdaMix).
    #[serde(default)]
    pub shared_init: bool,
    /// `sparse` (default) or `dense` (reference; see [`Dispatch`]).
    #[serde(default = "default_dispatch")]
    pub dispatch: Dispatch,
}

fn default_experts() -> usize {
    8
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn default_routing() -> Granularity {
    Granularity::Token
}
fn default_router() -> RouterKind {
    RouterKind::Linear
}
fn default_gate() -> Gate {
    Gate::Probability
}
fn default_balance() -> f64 {
    0.01
}
fn default_dispatch() -> Dispatch {
    Dispatch::Sparse
}

/// The expert family a kind mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertKind {
    /// Pfeiffer bottleneck experts at hidden sites (`moe_bn`).
    Bottleneck,
    /// LoRA experts at projection sites (`moe_lora`).
    Lora,
}

impl ExpertKind {
    /// The registered kind name.
    pub fn name(self) -> &'static str {
        match self {
            ExpertKind::Bottleneck => "moe_bn",
            ExpertKind::Lora => "moe_lora",
        }
    }
}

/// Experts and units a router may produce at most; beyond them a config is refused
/// before anything is allocated.
const MAX_EXPERTS: usize = 1024;

impl MoeConfig {
    /// Parses and checks a kind's configuration, filling in the expert-size defaults.
    pub fn parse(kind: ExpertKind, value: &serde_json::Value) -> Result<Self, Error> {
        let mut c: MoeConfig = parse_config(kind.name(), value)?;
        let bad = |m: String| Error::Config { kind: kind.name().into(), message: m };
        match kind {
            ExpertKind::Bottleneck => {
                if c.r.is_some() || c.alpha.is_some() {
                    return Err(bad("`r` and `alpha` size LoRA experts (moe_lora); moe_bn experts take `reduction_factor`".into()));
                }
                let rf = *c.reduction_factor.get_or_insert(16.0);
                if !(rf.is_finite() && rf > 0.0) {
                    return Err(bad(format!("`reduction_factor` must be a positive number, got {rf}")));
                }
                c.non_linearity.get_or_insert(Activation::Relu);
            }
            ExpertKind::Lora => {
                if c.reduction_factor.is_some() || c.non_linearity.is_some() {
                    return Err(bad(
                        "`reduction_factor` and `non_linearity` shape bottleneck experts (moe_bn); moe_lora experts take `r` and `alpha`"
                            .into(),
                    ));
                }
                let r = *c.r.get_or_insert(8);
                if r == 0 || r > 65536 {
                    return Err(bad(format!("`r` must be in 1..=65536, got {r}")));
                }
                c.alpha.get_or_insert(r as f64);
            }
        }
        if c.experts == 0 || c.experts > MAX_EXPERTS {
            return Err(bad(format!("`experts` must be in 1..={MAX_EXPERTS}, got {}", c.experts)));
        }
        let choices = c.experts + usize::from(c.skip_expert);
        if c.top_k == 0 || c.top_k > choices {
            return Err(bad(format!(
                "`top_k` must be in 1..={choices} (the experts{}), got {}; to let units take no expert, set `skip_expert = true`",
                if c.skip_expert { " and the skip choice" } else { "" },
                c.top_k
            )));
        }
        if c.routing == Granularity::Task && c.tasks == 0 {
            return Err(bad("`routing = \"task\"` needs `tasks`, the number of task ids the forward context may carry".into()));
        }
        if c.routing != Granularity::Task && c.tasks != 0 {
            return Err(bad("`tasks` is only read with `routing = \"task\"`".into()));
        }
        if c.router == RouterKind::Random && (c.top_k != 1 || c.skip_expert || c.routing == Granularity::Task) {
            return Err(bad("the `random` router (AdaMix) sends each unit to one expert: it needs `top_k = 1`, no `skip_expert` \
                 and token or sequence routing"
                .into()));
        }
        if c.gate == Gate::StraightThrough && (c.top_k != 1 || c.router == RouterKind::Random) {
            return Err(bad("`gate = \"straight_through\"` passes one learned router choice at full weight: it needs `top_k = 1` \
                 and a `linear` or `noisy` router"
                .into()));
        }
        if !(c.noise_std.is_finite() && c.noise_std >= 0.0) {
            return Err(bad(format!("`noise_std` must be a non-negative number, got {}", c.noise_std)));
        }
        for (name, v) in [("balance_loss", c.balance_loss), ("z_loss", c.z_loss)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(format!("`{name}` must be a non-negative number, got {v}")));
            }
        }
        if let Some(cf) = c.capacity_factor {
            if !(cf.is_finite() && cf > 0.0) {
                return Err(bad(format!("`capacity_factor` must be a positive number, got {cf}")));
            }
        }
        Ok(c)
    }

    /// Router choices: the experts, plus the skip choice when on.
    pub fn choices(&self) -> usize {
        self.experts + usize::from(self.skip_expert)
    }

    /// Whether a learned router exists (every router but `random`).
    pub fn learned_router(&self) -> bool {
        self.router != RouterKind::Random
    }
}
