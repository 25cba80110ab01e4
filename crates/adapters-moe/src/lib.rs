//! Mixtures of adapter experts with learned top-k routing and load balancing.
//!
//! Empty for now: the family arrives with its own issue and registers its kinds in the
//! `adapters-core` registry.

#![warn(missing_docs)]
