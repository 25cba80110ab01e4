//! Hypernetworks that generate adapter weights from task (and instance) embeddings.
//!
//! Empty for now: the family arrives with its own issue and registers its kinds in the
//! `adapters-core` registry.

#![warn(missing_docs)]
