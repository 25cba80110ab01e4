//! The backbone crate's error type.

use std::path::{Path, PathBuf};

/// Errors of the backbones: every message names the file, tensor or setting at fault and,
/// where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file or folder is missing, unreadable, or holds the wrong contents.
    #[error("{}: {message}", path.display())]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The model asks for something these backbones do not implement.
    #[error("{0}")]
    Unsupported(String),
    /// The tokenizer or the chat template failed.
    #[error("{0}")]
    Tokenizer(String),
    /// A call's arguments cannot be served (an empty prompt, an unmerged adapter).
    #[error("{0}")]
    Invalid(String),
    /// An adapter could not be attached, loaded or merged.
    #[error(transparent)]
    Adapter(#[from] adapters_core::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// A problem with the file or folder at `path`.
    pub fn file(path: &Path, message: impl std::fmt::Display) -> Self {
        Error::File { path: path.to_path_buf(), message: message.to_string() }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
