//! The adapter families a binary links: the one place that lists them.
//!
//! A family registers its kinds with `inventory::submit!`, and a binary keeps those
//! registrations only if it calls into the family's crate. The `adapters` binary, the
//! server and the test kit call [`link`], which calls each enabled family's `family()`.
//! Each family is a cargo feature (all on by default), so a team can build the binaries
//! with only the families it needs: `--no-default-features --features lora`. A crate of
//! one's own is linked the same way, by calling its `family()` before
//! `adapters_cli::main()` (see the `adapters-scale-shift` crate).

#![warn(missing_docs)]

/// Links every enabled family into this binary; returns their crate names.
pub fn link() -> Vec<&'static str> {
    vec![
        #[cfg(feature = "bottleneck")]
        adapters_bottleneck::family(),
        #[cfg(feature = "lora")]
        adapters_lora::family(),
        #[cfg(feature = "fusion")]
        adapters_fusion::family(),
        #[cfg(feature = "moe")]
        adapters_moe::family(),
        #[cfg(feature = "hyper")]
        adapters_hyper::family(),
    ]
}
