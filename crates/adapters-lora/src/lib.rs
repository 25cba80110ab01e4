//! LoRA and IA3 on projection weights, registered in the `adapters-core` registry; LoRA
//! merges into and unmerges from the base weights, and reads and writes PEFT's folders.

#![warn(missing_docs)]

pub mod ia3;
pub mod lora;
pub mod merge;
pub mod peft;

pub use ia3::{Ia3, Ia3Config};
pub use lora::{Lora, LoraConfig};

use adapters_core::{AdapterKind, BuildArgs, ConfigField};

/// The family's name. Binaries and tests that build adapters by name call this so the
/// linker keeps this crate, and with it the registrations in this module (all of this
/// crate's `inventory::submit!` calls live here, in one module, for that reason).
pub fn family() -> &'static str {
    FAMILY
}

const FAMILY: &str = "adapters-lora";

fn build_lora(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(Lora::build(args)?))
}

fn build_ia3(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(Ia3::build(args)?))
}

adapters_core::inventory::submit! {
    AdapterKind {
        name: "lora",
        family: FAMILY,
        summary: "low-rank update B A on projections (default sites: query, value); mergeable",
        fields: &[
            ConfigField { name: "r", ty: "integer", default: "8", doc: "rank (per-layer overrides: placement.sizes)" },
            ConfigField { name: "alpha", ty: "number", default: "8", doc: "scale = alpha / r" },
            ConfigField { name: "dropout", ty: "number", default: "0.0", doc: "dropout on the LoRA input (training only)" },
            ConfigField { name: "use_rslora", ty: "bool", default: "false", doc: "scale = alpha / sqrt(r)" },
            ConfigField { name: "rank_pattern", ty: "{module: r}", default: "{}", doc: "per-module ranks (module path or suffix)" },
            ConfigField { name: "alpha_pattern", ty: "{module: alpha}", default: "{}", doc: "per-module alphas" },
            ConfigField {
                name: "use_dora",
                ty: "bool",
                default: "false",
                doc: "DoRA: a learned magnitude per output row over the normalised W + s·BA (PEFT's use_dora)",
            },
        ],
        build: build_lora,
    }
}

adapters_core::inventory::submit! {
    AdapterKind {
        name: "ia3",
        family: FAMILY,
        summary: "learned scaling vectors on projections (default sites: key, value, ffn_down)",
        fields: &[ConfigField { name: "feedforward_sites", ty: "[site]", default: "[ffn_down]", doc: "sites whose input is scaled instead of output" }],
        build: build_ia3,
    }
}

/// Registers PEFT's `add_weighted_adapter` methods for `lora` (see [`merge`]).
macro_rules! combinations {
    ($($name:literal: $summary:literal,)*) => {$(
        adapters_core::inventory::submit! {
            adapters_core::merge::Combination { kind: "lora", method: $name, summary: $summary, combine: merge::combine }
        }
    )*};
}

combinations!(
    "linear": "weighted sums of the A and of the B factors, each weighted by sqrt(|w s|) (PEFT's linear; one rank)",
    "cat": "the factors side by side: exactly the weighted sum of the updates, at the summed rank",
    "svd": "the weighted sum of the updates s B A, cut back to --rank by SVD",
    "ties": "TIES on the factors: keep each one's largest entries (--density), elect signs, average the agreeing",
    "ties_svd": "TIES on the updates, then SVD",
    "dare_linear": "DARE on the factors: keep a random share (--density, --seed), rescale, sum",
    "dare_ties": "DARE's pruning, then TIES's sign election, on the factors",
    "dare_linear_svd": "DARE on the updates, then SVD",
    "dare_ties_svd": "DARE and TIES on the updates, then SVD",
    "magnitude_prune": "each factor's largest entries (--density), summed",
    "magnitude_prune_svd": "magnitude pruning on the updates, then SVD",
);

adapters_core::inventory::submit! {
    adapters_core::AdapterFormat { name: "peft", detect: peft::detect, load: peft::load }
}
