//! Config-driven training of any registered set of adapters.
//!
//! Built so far: reading labelled data ([`data`]) and the optimiser with its learning-rate
//! schedule and gradient clipping ([`optim`]). The TOML-driven trainer follows.

pub mod data;
pub mod optim;
