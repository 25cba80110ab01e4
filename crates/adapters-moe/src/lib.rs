//! Mixtures of adapter experts with learned top-k routing and load balancing: `moe_bn`
//! (Pfeiffer bottleneck experts after the feed-forward sublayer) and `moe_lora` (LoRA
//! experts on projections), registered in the `adapters-core` registry.
//!
//! Only the chosen experts run, each on its own tokens: the cost grows with `top_k`, not
//! with the number of experts. Routers report Switch Transformer's load-balancing loss
//! and ST-MoE's z-loss to the trainer, and their routing statistics (tokens per expert,
//! skipped and overflowed tokens) through the forward context. Padding is never routed.

#![warn(missing_docs)]

pub mod config;
pub mod merge;
pub mod mixture;
pub mod router;

pub use config::{Dispatch, ExpertKind, Gate, Granularity, MoeConfig, RouterKind};
pub use mixture::{Mixture, PlainForm};

use adapters_core::{AdapterKind, BuildArgs, ConfigField};

/// The family's name. Binaries and tests that build adapters by name call this so the
/// linker keeps this crate, and with it the registrations in this module.
pub fn family() -> &'static str {
    FAMILY
}

const FAMILY: &str = "adapters-moe";

/// The routing fields both kinds share.
macro_rules! routing_fields {
    ($($size:expr),*) => {
        &[
            ConfigField { name: "experts", ty: "integer", default: "8", doc: "experts per site" },
            ConfigField { name: "top_k", ty: "integer", default: "1", doc: "experts each unit runs (cost grows with it)" },
            $($size,)*
            ConfigField { name: "routing", ty: "token|sequence|task", default: "token", doc: "what is routed: each token, each sequence (its mean), or each task id" },
            ConfigField { name: "tasks", ty: "integer", default: "0", doc: "task ids the router knows (task routing)" },
            ConfigField { name: "router", ty: "linear|noisy|random", default: "linear", doc: "softmax top-k; with seeded logit noise in training; random = AdaMix (uniform in training, all experts averaged in inference)" },
            ConfigField { name: "gate", ty: "probability|straight_through", default: "probability", doc: "top-1 expert output times the router probability (Switch), or times 1 with the probability's gradient" },
            ConfigField { name: "noise_std", ty: "number", default: "1.0", doc: "noisy router: std of the logit noise" },
            ConfigField { name: "balance_loss", ty: "number", default: "0.01", doc: "Switch load-balancing loss a·N·Σ f_i·P_i: a (0 = off)" },
            ConfigField { name: "z_loss", ty: "number", default: "0.0", doc: "router z-loss b·mean(logsumexp²): b (0 = off)" },
            ConfigField { name: "capacity_factor", ty: "number", default: "none", doc: "experts take at most cf·units·k/N units; overflow passes through unchanged" },
            ConfigField { name: "skip_expert", ty: "bool", default: "false", doc: "a 'no expert' choice: units choosing it pass through (k = 0)" },
            ConfigField { name: "shared_init", ty: "bool", default: "false", doc: "experts start from one initialisation (AdaMix)" },
            ConfigField { name: "dispatch", ty: "sparse|dense", default: "sparse", doc: "dense computes every expert on every token (reference)" },
        ]
    };
}

fn build_bn(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(Mixture::build(ExpertKind::Bottleneck, args)?))
}

fn build_lora(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(Mixture::build(ExpertKind::Lora, args)?))
}

adapters_core::inventory::submit! {
    AdapterKind {
        name: "moe_bn",
        family: FAMILY,
        summary: "mixture of Pfeiffer bottleneck experts with a top-k router (default site: ffn_output)",
        fields: routing_fields!(
            ConfigField { name: "reduction_factor", ty: "number", default: "16", doc: "each expert's bottleneck = hidden / reduction_factor" },
            ConfigField { name: "non_linearity", ty: "relu|gelu|silu|tanh", default: "relu", doc: "the experts' activation" }
        ),
        build: build_bn,
    }
}

adapters_core::inventory::submit! {
    AdapterKind {
        name: "moe_lora",
        family: FAMILY,
        summary: "mixture of LoRA experts on projections with a top-k router (default sites: query, value)",
        fields: routing_fields!(
            ConfigField { name: "r", ty: "integer", default: "8", doc: "each expert's rank" },
            ConfigField { name: "alpha", ty: "number", default: "r", doc: "scale = alpha / r" }
        ),
        build: build_lora,
    }
}
