//! Bottleneck adapters: sequential (Pfeiffer, Houlsby) and parallel (He et al.).
//!
//! Empty for now: the family arrives with its own issue and registers its kinds in the
//! `adapters-core` registry.
