//! Bottleneck adapters: sequential (Pfeiffer `seq_bn`, Houlsby `double_seq_bn`) and
//! parallel (He et al. `par_bn`), registered in the `adapters-core` registry, with
//! AdapterHub's folder format both ways.

#![warn(missing_docs)]

pub mod adapter;
pub mod adapterhub;
pub mod config;

pub use adapter::Bottleneck;
pub use config::{Activation, BottleneckConfig, InitWeights, Scaling};

use adapters_core::{AdapterKind, BuildArgs, ConfigField};

/// The family's name. Binaries and tests that build adapters by name call this so the
/// linker keeps this crate, and with it the registrations in this module (all of this
/// crate's `inventory::submit!` calls live here, in one module, for that reason).
pub fn family() -> &'static str {
    FAMILY
}

const FAMILY: &str = "adapters-bottleneck";

const FIELDS: &[ConfigField] = &[
    ConfigField { name: "reduction_factor", ty: "number", default: "16 (par_bn: 2)", doc: "bottleneck = hidden / reduction_factor" },
    ConfigField { name: "bottleneck_size", ty: "integer", default: "none", doc: "explicit bottleneck width (overrides reduction_factor)" },
    ConfigField {
        name: "non_linearity",
        ty: "relu|gelu|gelu_new|swish|tanh|leakyrelu|...",
        default: "relu (double_seq_bn: swish)",
        doc: "activation between the projections; every name AdapterHub accepts (docs/interop.md)",
    },
    ConfigField {
        name: "original_ln_before",
        ty: "bool",
        default: "seq_bn: true",
        doc: "adapter reads the post-norm sublayer output (Pfeiffer)",
    },
    ConfigField { name: "is_parallel", ty: "bool", default: "par_bn: true", doc: "adapter reads the sublayer input (He et al.)" },
    ConfigField {
        name: "scaling",
        ty: "number|\"learned\"|\"channel\"",
        default: "1.0 (par_bn: 4.0)",
        doc: "fixed, learned scalar, or learned per channel",
    },
    ConfigField { name: "ln_before", ty: "bool", default: "false", doc: "adapter LayerNorm before the down projection" },
    ConfigField { name: "ln_after", ty: "bool", default: "false", doc: "adapter LayerNorm after the up projection" },
    ConfigField { name: "dropout", ty: "number", default: "0.0", doc: "dropout on the adapter output (training only)" },
    ConfigField { name: "use_gating", ty: "bool", default: "false", doc: "learned sigmoid gate on the adapter output, one per sequence" },
    ConfigField {
        name: "residual_before_ln",
        ty: "true|false|\"post_add\"",
        default: "true",
        doc: "what the output is added to: sublayer output, adapter input, or output + residual stream",
    },
    ConfigField {
        name: "adapter_residual_before_ln",
        ty: "bool",
        default: "false",
        doc: "with ln_after: add the residual before the adapter's own norm",
    },
    ConfigField {
        name: "stochastic_depth",
        ty: "number",
        default: "0.0",
        doc: "training: drop a sequence's whole adapter output with this probability",
    },
    ConfigField {
        name: "init_weights",
        ty: "bert|mam_adapter|houlsby",
        default: "bert (par_bn: mam_adapter)",
        doc: "normal(0,0.02) both; zero up-projection (identity at start); truncated normal(0,0.01)",
    },
];

fn build_seq(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(Bottleneck::build(&config::SEQ_BN, args)?))
}
fn build_double(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(Bottleneck::build(&config::DOUBLE_SEQ_BN, args)?))
}
fn build_par(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(Bottleneck::build(&config::PAR_BN, args)?))
}

adapters_core::inventory::submit! {
    AdapterKind { name: "seq_bn", family: FAMILY, summary: "sequential bottleneck after the FFN (Pfeiffer)", fields: FIELDS, build: build_seq }
}
adapters_core::inventory::submit! {
    AdapterKind { name: "double_seq_bn", family: FAMILY, summary: "sequential bottlenecks after attention and after the FFN (Houlsby)", fields: FIELDS, build: build_double }
}
adapters_core::inventory::submit! {
    AdapterKind { name: "par_bn", family: FAMILY, summary: "parallel bottleneck beside the FFN, scaled (He et al.)", fields: FIELDS, build: build_par }
}

adapters_core::inventory::submit! {
    adapters_core::AdapterFormat { name: "adapterhub", detect: adapterhub::detect, load: adapterhub::load }
}
