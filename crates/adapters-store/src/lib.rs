//! The adapter library: adapters stored by name in immutable, content-addressed versions
//! with tags (`latest`, `prod`, any), on a local folder or S3-compatible object storage,
//! used by the `adapters` command line and the server.
//!
//! Layout under the store's root (a folder, or a bucket and prefix):
//!
//! ```text
//! NAME/versions/VERSION/files/...          the adapter folder's files, as pushed
//! NAME/versions/VERSION/manifest.json      written last: a version without one is invisible
//! NAME/tags/TAG.json                       {"version": VERSION, "updated": ...}
//! ```
//!
//! VERSION is the first 16 hex digits of the sha256 over the folder's files (paths and
//! contents), so pushing the same folder twice stores it once and a version never changes.

#![warn(missing_docs)]

pub mod folder;
mod name;
mod store;

pub use folder::{Contents, FileEntry, SetupContents};
pub use name::{check_tag, is_version, reads_as_version, Name, Reference};
pub use store::{default_cache_dir, local_copy, Listing, Manifest, PushOptions, Store, TagFile, VersionListing, LATEST};

mod error;
pub use error::{Error, Result};
