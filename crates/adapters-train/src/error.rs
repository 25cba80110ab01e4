//! The trainer's error type.

use std::path::{Path, PathBuf};

/// Errors of the trainer: every message names the config key, file (and line) or step at
/// fault, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TOML configuration is wrong (the message names the key).
    #[error("{0}")]
    Config(String),
    /// A data file has a bad row, an unknown label, or too little data.
    #[error("{0}")]
    Data(String),
    /// The run cannot go on (a diverged loss, a checkpoint in the way or missing).
    #[error("{0}")]
    Run(String),
    /// A file or folder could not be read or written.
    #[error("{}: {message}", path.display())]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An error inside a named part of the run (a task, an adapter table, a config file).
    #[error("{context}: {inner}")]
    In {
        /// Where it happened.
        context: String,
        /// What happened.
        inner: Box<Error>,
    },
    /// The model could not be loaded or saved.
    #[error(transparent)]
    Model(#[from] adapters_models::Error),
    /// An adapter could not be built, saved or activated.
    #[error(transparent)]
    Adapter(#[from] adapters_core::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed (wrapped with the file by [`Within`]).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A JSON file did not parse.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// An adapter reference (`from = "NAME@TAG"`) could not be resolved to a folder.
    #[error("{0}")]
    Reference(String),
    /// A CSV file did not parse.
    #[error(transparent)]
    Csv(#[from] csv::Error),
}

impl Error {
    /// A problem with the file or folder at `path`.
    pub fn file(path: &Path, message: impl std::fmt::Display) -> Self {
        Error::File { path: path.to_path_buf(), message: message.to_string() }
    }
}

/// Adds where an error happened.
pub trait Within<T> {
    /// Wraps the error with `context` (computed only on error).
    fn within(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Error>> Within<T> for std::result::Result<T, E> {
    fn within(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::In { context: context(), inner: Box::new(e.into()) })
    }
}

/// Returns early with an error of the given variant and a formatted message.
macro_rules! fail {
    ($variant:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$variant(format!($($arg)*)))
    };
}
pub(crate) use fail;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
