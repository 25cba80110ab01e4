//! AdapterFusion (Pfeiffer et al. 2021): a learned attention over trained adapters' outputs
//! at each site they share, registered in the `adapters-core` registry as kind `fusion`,
//! with AdapterHub's fusion folder format both ways. Core's `fuse(...)` block runs it; the
//! other composition blocks (stack, parallel, average, batch_split, split) live in core.

#![warn(missing_docs)]

pub mod adapterhub;
pub mod fusion;

pub use fusion::{Fusion, FusionConfig};

use adapters_core::{AdapterKind, BuildArgs, ConfigField};

/// The kind's registered name.
pub const KIND: &str = "fusion";

/// The family's name. Binaries and tests that build adapters by name call this so the
/// linker keeps this crate, and with it the registrations in this module.
pub fn family() -> &'static str {
    FAMILY
}

const FAMILY: &str = "adapters-fusion";

const FIELDS: &[ConfigField] = &[
    ConfigField { name: "members", ty: "[string]", default: "required", doc: "the fused adapters' names, in order (two or more)" },
    ConfigField { name: "preset", ty: "dynamic|static", default: "dynamic", doc: "AdapterHub's defaults: dynamic adds the value matrix" },
    ConfigField { name: "query", ty: "bool", default: "true", doc: "learned query projection of the sublayer output" },
    ConfigField { name: "key", ty: "bool", default: "true", doc: "learned key projection of each member's output" },
    ConfigField { name: "value", ty: "bool", default: "dynamic: true", doc: "learned value projection (no bias)" },
    ConfigField { name: "value_initialized", ty: "bool", default: "dynamic: true", doc: "value matrix starts at the identity" },
    ConfigField { name: "value_before_softmax", ty: "bool", default: "true", doc: "value applied per member (else after the sum)" },
    ConfigField { name: "residual_before", ty: "bool", default: "false", doc: "residual added to members before the values" },
    ConfigField { name: "query_before_ln", ty: "bool", default: "false", doc: "query from the sublayer output before the norm" },
    ConfigField { name: "temperature", ty: "bool", default: "false", doc: "softmax temperature 50 falling 0.05 per step to 1" },
    ConfigField { name: "dropout_prob", ty: "number", default: "0.1", doc: "dropout on the attention scores in training" },
    ConfigField { name: "regularization", ty: "bool", default: "dynamic: true", doc: "0.01·‖I − W_V‖² per site added to the loss" },
];

fn build(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(Fusion::build(args)?))
}

adapters_core::inventory::submit! {
    AdapterKind { name: KIND, family: FAMILY, summary: "AdapterFusion: attention over trained adapters' outputs (run by fuse(...))", fields: FIELDS, build }
}

adapters_core::inventory::submit! {
    adapters_core::AdapterFormat { name: "adapterhub-fusion", detect: adapterhub::detect, load: adapterhub::load }
}
