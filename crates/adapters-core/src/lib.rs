//! The core of the adapter library: the [`Adapter`] and [`InsertionPoint`] traits,
//! placement rules, the inventory-based registry of adapter kinds, the per-model
//! [`AdapterSet`], and the [`ForwardCtx`] that flows through a forward pass.
//!
//! Family crates (bottleneck, LoRA, fusion, ...) depend on this crate only, implement
//! [`Adapter`], and register a constructor with `inventory::submit!` so that every tool
//! can build their adapters by name. The [`guide`] walks through adding a kind.

#![warn(missing_docs)]

pub mod activation;
pub mod adapter;
pub mod capability;
pub mod context;
pub mod durable;
pub mod fingerprint;
#[doc = include_str!("guide.md")]
pub mod guide {}
mod error;
pub mod init;
pub mod intervention;
pub mod io;
pub mod merge;
pub mod placement;
pub mod point;
pub mod registry;
pub mod set;
pub mod setup;

pub use activation::Activation;
pub use adapter::{
    Adapter, AddNormFn, EmbeddingIo, FrozenLinear, InterventionIo, KeyValuePrefix, LayerNormWeights, ProjectionIo, SublayerIo,
};
pub use capability::{
    BatchableForm, Capabilities, ConditioningNeed, FuseMember, Fused, FusedPostNorm, FusionLayer, InputScaled, LowRank, LowRankProjection,
    Mergeable, PartlyFrozen, RowBatched,
};
pub use context::{AuxLoss, AuxOutputs, ForwardCtx, FusionAttention, Mode, RoutingStats, StackRows};
pub use error::Error;
pub use fingerprint::Fingerprint;
pub use init::Init;
pub use inventory;
pub use io::{AdapterFormat, Loaded};
pub use placement::{Layers, Placement};
pub use point::{InsertionPoint, ModelInfo, Point, PointSpec, Site, SiteKind};
pub use registry::{AdapterKind, BuildArgs, ConfigField};
pub use set::AdapterSet;
pub use setup::Setup;
