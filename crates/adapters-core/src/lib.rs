//! The core of the adapter library: the [`Adapter`] and [`InsertionPoint`] traits,
//! placement rules, the inventory-based registry of adapter kinds, the per-model
//! [`AdapterSet`], and the [`ForwardCtx`] that flows through a forward pass.
//!
//! Family crates (bottleneck, LoRA, fusion, ...) depend on this crate only, implement
//! [`Adapter`], and register a constructor with `inventory::submit!` so that every tool
//! can build their adapters by name.

pub mod adapter;
pub mod context;
pub mod fingerprint;
pub mod init;
pub mod io;
pub mod placement;
pub mod point;
pub mod registry;
pub mod set;

pub use adapter::{Adapter, ProjectionIo, SublayerIo};
pub use context::{AuxLoss, AuxOutputs, ForwardCtx, RoutingStats, RowGroup};
pub use fingerprint::Fingerprint;
pub use init::Init;
pub use io::{AdapterFormat, Loaded};
pub use inventory;
pub use placement::{Layers, Placement};
pub use point::{InsertionPoint, ModelInfo, Point, PointSpec, Site};
pub use registry::{AdapterKind, BuildArgs, ConfigField};
pub use set::AdapterSet;

/// Errors of the core crate; every message says what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown adapter kind `{kind}`; registered kinds: {known}")]
    UnknownKind { kind: String, known: String },
    #[error("bad configuration for adapter kind `{kind}`: {message}")]
    Config { kind: String, message: String },
    #[error("bad placement: {0}")]
    Placement(String),
    #[error("{0}")]
    Adapter(String),
    #[error("{}: {message}", path.display())]
    Io { path: std::path::PathBuf, message: String },
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
