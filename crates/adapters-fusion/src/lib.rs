//! AdapterFusion and the composition blocks (Stack, Parallel, Average, BatchSplit, Split).
//!
//! Empty for now: the family arrives with its own issue and registers its kinds in the
//! `adapters-core` registry.

#![warn(missing_docs)]
