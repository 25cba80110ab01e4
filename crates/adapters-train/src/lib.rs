//! Config-driven training of any registered set of adapters.
//!
//! Empty for now: training arrives with its own issue.
