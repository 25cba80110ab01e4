//! LoRA and IA3 on projection weights, registered in the `adapters-core` registry; LoRA
//! merges into and unmerges from the base weights, and reads and writes PEFT's folders.

#![warn(missing_docs)]

pub mod ia3;
pub mod lora;
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

adapters_core::inventory::submit! {
    adapters_core::AdapterFormat { name: "peft", detect: peft::detect, load: peft::load }
}
