//! The core crate's error type.

/// Errors of the core crate; every message says what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kind is registered under this name.
    #[error("unknown adapter kind `{kind}`; registered kinds: {known}")]
    UnknownKind {
        /// The name asked for.
        kind: String,
        /// The registered names, comma-separated.
        known: String,
    },
    /// A kind's configuration did not parse or is out of range.
    #[error("bad configuration for adapter kind `{kind}`: {message}")]
    Config {
        /// The kind whose configuration is wrong.
        kind: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A placement rule does not fit the model or the kind.
    #[error("bad placement: {0}")]
    Placement(String),
    /// An adapter-set operation was refused (unknown name, duplicate, merged).
    #[error("{0}")]
    Adapter(String),
    /// A file or folder could not be read or written, or holds the wrong contents.
    #[error("{}: {message}", path.display())]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// What is wrong with it and, where it helps, what to do.
        message: String,
    },
    /// A composition setup is malformed or does not fit the attached adapters.
    #[error("bad adapter setup: {0}")]
    Setup(String),
    /// An adapter was made for another base model.
    #[error("{0}")]
    Mismatch(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
