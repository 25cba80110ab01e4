//! Config-driven training of any registered set of adapters: data readers, AdamW with
//! parameter groups, schedules, multi-task sampling, staged training, metrics,
//! checkpoints and the training loop.

pub mod config;
pub mod data;
pub mod optim;
pub mod checkpoint;
pub mod forward;
pub mod heads;
pub mod metrics;
pub mod report;
pub mod task;
pub mod trainer;

pub use config::Config;
pub use trainer::{RunOptions, Summary, Trainer};
