//! Hypernetwork adapters: `hyper_bn`, one shared network that generates the Pfeiffer
//! bottleneck adapter of every layer from a task embedding (or an instance vector),
//! registered in the `adapters-core` registry.
//!
//! After HyperFormer++ (Karimi Mahabadi et al. 2021): task, layer-id and site embeddings
//! are projected to a small code from which generator heads write each adapter tensor.
//! The heads are factorised through that code, so the generator stores less than the
//! per-task adapters it replaces; rows of different tasks run in one forward with
//! per-row weights, and `adapters hyper-export` writes any task's (or task mixture's)
//! adapter as a plain `seq_bn` folder.

#![warn(missing_docs)]

pub mod config;
pub mod export;
pub mod hypernet;

pub use config::{Conditioning, HyperConfig, TrainParts};
pub use hypernet::{task_vector_of, HyperNet};

use adapters_core::{AdapterKind, BuildArgs, ConfigField};

/// The family's name. Binaries and tests that build adapters by name call this so the
/// linker keeps this crate, and with it the registration in this module.
pub fn family() -> &'static str {
    FAMILY
}

const FAMILY: &str = "adapters-hyper";

fn build(args: &BuildArgs) -> Result<Box<dyn adapters_core::Adapter>, adapters_core::Error> {
    Ok(Box::new(HyperNet::build(args)?))
}

adapters_core::inventory::submit! {
    AdapterKind {
        name: config::KIND,
        family: FAMILY,
        summary: "hypernetwork generating every layer's Pfeiffer adapter from a task or instance embedding (default site: ffn_output)",
        fields: &[
            ConfigField { name: "tasks", ty: adapters_core::registry::TASK_NAMES, default: "the run's tasks", doc: "task names in task-id order (the run's [[task]] order)" },
            ConfigField { name: "conditioning", ty: "task|instance", default: "task", doc: "generate from the row's task embedding, or from its mean token embedding" },
            ConfigField { name: "reduction_factor", ty: "number", default: "16", doc: "generated bottleneck = hidden / reduction_factor" },
            ConfigField { name: "non_linearity", ty: "relu|gelu|swish|silu|tanh", default: "relu", doc: "the generated adapters' activation" },
            ConfigField { name: "layer_norm", ty: "bool", default: "false", doc: "also generate a layer norm before the down projection" },
            ConfigField { name: "task_dim", ty: "integer", default: "64", doc: "task-embedding width" },
            ConfigField { name: "position_dim", ty: "integer", default: "16", doc: "layer-id and site embedding width" },
            ConfigField { name: "projector_hidden", ty: "integer", default: "64", doc: "projector hidden width" },
            ConfigField { name: "generator_from", ty: "path", default: "none", doc: "start from a trained hyper_bn folder's generator (its tasks' embeddings copied by name)" },
            ConfigField { name: "train", ty: "all|task_embeddings", default: "all", doc: "task_embeddings: learn new tasks with the generator frozen" },
            ConfigField { name: "code_dim", ty: "integer", default: "8", doc: "code width; each head stores (code_dim + 1) x its tensor's size" },
        ],
        build,
    }
}
