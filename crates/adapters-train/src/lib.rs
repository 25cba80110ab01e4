//! Config-driven training of any registered set of adapters: data readers, AdamW with
//! parameter groups, schedules, multi-task sampling, staged training, metrics,
//! checkpoints and the training loop.

#![warn(missing_docs)]

pub mod adversarial;
mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod forward;
mod fusion_report;
pub mod metrics;
pub mod noise;
pub mod optim;
pub mod records;
mod report;
mod routing_report;
mod task;
pub mod trainer;

pub use config::Config;
pub use error::{Error, Result};
pub use records::Summary;
pub use task::{chat_tokens, encode_truncated};
pub use trainer::{ResolveReference, RunOptions, Trainer};
