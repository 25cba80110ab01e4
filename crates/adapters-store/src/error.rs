//! The store's error type.

use std::path::{Path, PathBuf};

/// Errors of the adapter library; each names the adapter, version, file or store at
/// fault and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name, tag, reference or store address is not valid.
    #[error("{0}")]
    Invalid(String),
    /// No such adapter, version or tag in the store.
    #[error("{0}")]
    NotFound(String),
    /// A stored version's files do not match its manifest (truncated, changed, missing).
    #[error("{0}")]
    Corrupt(String),
    /// A local file or folder could not be read or written, or is not an adapter.
    #[error("{}: {message}", path.display())]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The storage backend failed (network, permissions).
    #[error("store {store}: {source}")]
    Backend {
        /// The store's address.
        store: String,
        /// The backend's error.
        source: object_store::Error,
    },
}

impl Error {
    /// A problem with the file or folder at `path`.
    pub fn file(path: &Path, message: impl std::fmt::Display) -> Self {
        Error::File { path: path.to_path_buf(), message: message.to_string() }
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
