//! The model a request runs on: the base, or a resident adapter (held for the request).

use crate::cache::Resident;
use crate::metrics::AdapterLabels;
use std::sync::Arc;

/// The model a request runs on: the base, or a resident adapter (held for the request).
pub(crate) enum Target {
    Base,
    Adapter(Arc<Resident>),
}

impl Target {
    /// Its labels in the metrics.
    pub(crate) fn labels(&self) -> AdapterLabels {
        match self {
            Target::Base => AdapterLabels { adapter: "base".into(), version: String::new() },
            Target::Adapter(r) => AdapterLabels { adapter: r.manifest.name.clone(), version: r.manifest.version.clone() },
        }
    }

    /// What tells it apart from other targets in one batch.
    pub(crate) fn id(&self) -> String {
        match self {
            Target::Base => "base".into(),
            Target::Adapter(r) => r.key(),
        }
    }
}
