//! The store: push, resolve, pull, list, tag and remove adapter versions on any
//! `object_store` backend (a local folder or an S3-compatible bucket).

use crate::error::{Error, Result};
use crate::folder::{self, Contents, FileEntry};
use crate::name::{check_tag, is_version, reads_as_version, Name, Reference, VERSION_DIGITS};
use adapters_core::durable::fault_point;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// The tag every push moves.
pub const LATEST: &str = "latest";

/// A stored version's description, `NAME/versions/VERSION/manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The adapter's name.
    pub name: String,
    /// The version: the first 16 hex digits of `digest`.
    pub version: String,
    /// sha256 over the files' paths and hashes.
    pub digest: String,
    /// What the folder holds: format, kind, base model, parameters (setup members).
    #[serde(flatten)]
    pub contents: Contents,
    /// Total bytes of its files.
    pub size_bytes: u64,
    /// When it was first pushed (RFC 3339, UTC).
    pub created: String,
    /// The training run it came from, when the pusher said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_run: Option<String>,
    /// Every file, sorted by path.
    pub files: Vec<FileEntry>,
}

/// A tag, `NAME/tags/TAG.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TagFile {
    /// The version it points to.
    pub version: String,
    /// When it was last moved (RFC 3339, UTC).
    pub updated: String,
}

/// One adapter in a listing.
#[derive(Clone, Debug, Serialize)]
pub struct Listing {
    /// The adapter's name.
    pub name: String,
    /// Its versions, newest first.
    pub versions: Vec<VersionListing>,
}

/// One version in a listing.
#[derive(Clone, Debug, Serialize)]
pub struct VersionListing {
    /// Its manifest.
    pub manifest: Manifest,
    /// The tags pointing at it.
    pub tags: Vec<String>,
}

/// What a push records besides the folder.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Tags to point at the new version (`latest` always moves).
    pub tags: Vec<Name>,
    /// The training run it came from (a run folder, an experiment id).
    pub training_run: Option<String>,
    /// The base model it was checked against, recorded when the folder names none (PEFT
    /// and AdapterHub folders do not).
    pub base_model: Option<adapters_core::Fingerprint>,
}

/// An adapter library on a local folder or S3-compatible storage.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    uri: String,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Store {
    /// Opens the store at `uri`: `s3://BUCKET[/PREFIX]` (credentials, region and endpoint
    /// from the usual `AWS_*` variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT_URL` for S3-compatible servers, `AWS_ALLOW_HTTP=true`
    /// for plain HTTP), or a local folder (`file:///path` or a path; created if missing).
    pub fn open(uri: &str) -> Result<Store> {
        Self::open_with_options(uri, &[])
    }

    /// [`Store::open`] with S3 settings given as `object_store` keys (`aws_endpoint`,
    /// `aws_access_key_id`, `aws_allow_http`, ...) over the environment's.
    pub fn open_with_options(uri: &str, options: &[(&str, &str)]) -> Result<Store> {
        let inner: Arc<dyn ObjectStore> = if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::Invalid(format!("store `{uri}`: no bucket; write s3://BUCKET or s3://BUCKET/PREFIX")));
            }
            // A store that cannot be reached fails within seconds (a server then answers 503
            // and keeps serving what it has) instead of retrying for minutes; the options
            // and the environment may say otherwise.
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(5),
                ..Default::default()
            });
            if std::env::var_os("AWS_CONNECT_TIMEOUT").is_none() {
                builder = builder.with_config("connect_timeout".parse().expect("an object_store client key"), "2s");
            }
            for (key, value) in options {
                let key = key.parse().map_err(|e| Error::Invalid(format!("store option `{key}`: {e}")))?;
                builder = builder.with_config(key, *value);
            }
            let s3 = builder
                .build()
                .map_err(|e| Error::Invalid(format!("store `{uri}`: {e}; set AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an S3-compatible server)")))?;
            match prefix.trim_matches('/') {
                "" => Arc::new(s3),
                p => Arc::new(PrefixStore::new(s3, p)),
            }
        } else if uri.contains("://") && !uri.starts_with("file://") {
            return Err(Error::Invalid(format!("store `{uri}`: unknown scheme; use s3://BUCKET[/PREFIX], file:///PATH or a folder path")));
        } else {
            let path = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
            std::fs::create_dir_all(path).map_err(|e| Error::file(path, format!("cannot create the store folder: {e}")))?;
            Arc::new(LocalFileSystem::new_with_prefix(path).map_err(|e| Error::file(path, e))?)
        };
        Ok(Store { inner, uri: uri.to_string() })
    }

    /// The address it was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn backend(&self, source: object_store::Error) -> Error {
        Error::Backend { store: self.uri.clone(), source }
    }

    async fn read(&self, path: &StorePath) -> Result<Option<bytes::Bytes>> {
        match self.inner.get(path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.backend(e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend(e)),
        }
    }

    /// Stores the adapter (or setup) folder `dir` as a version of `name`, moves `latest`
    /// and the options' tags to it, and returns its manifest. The folder is read and checked first;
    /// its files are uploaded before its manifest, so no reader ever sees a partial
    /// version. Pushing the same contents again only moves the tags.
    pub async fn push(&self, dir: &Path, name: &Name, options: PushOptions) -> Result<Manifest> {
        let PushOptions { tags, training_run, base_model } = options;
        for tag in &tags {
            check_tag(tag)?;
        }
        let (mut contents, files) = folder::inspect(dir)?;
        if contents.base_model.is_none() {
            contents.base_model = base_model;
        }
        let digest = folder::digest(&files);
        let version = digest[..VERSION_DIGITS].to_string();
        let manifest_path = manifest_path(name, &version);
        let manifest = match self.read(&manifest_path).await? {
            Some(bytes) => parse_manifest(&bytes, name, &version)?,
            None => {
                for f in &files {
                    let bytes = std::fs::read(dir.join(&f.path)).map_err(|e| Error::file(&dir.join(&f.path), e))?;
                    if hex_sha(&bytes) != f.sha256 {
                        return Err(Error::file(&dir.join(&f.path), "changed while it was being pushed; push again"));
                    }
                    fault_point("store.file.before_put");
                    self.inner.put(&file_path(name, &version, &f.path), PutPayload::from(bytes)).await.map_err(|e| self.backend(e))?;
                    fault_point("store.file.after_put");
                }
                let size_bytes = files.iter().map(|f| f.size).sum();
                let manifest = Manifest {
                    name: name.to_string(),
                    version: version.clone(),
                    digest,
                    contents,
                    size_bytes,
                    created: now(),
                    training_run,
                    files,
                };
                let body = serde_json::to_vec_pretty(&manifest).expect("manifests serialise");
                let create = PutOptions { mode: PutMode::Create, ..Default::default() };
                // The manifest is the version's commit point: written last, it appears only
                // when every file is in place (`pull` and `list` see versions by manifest).
                fault_point("store.manifest.before_put");
                let put = self.inner.put_opts(&manifest_path, PutPayload::from(body), create).await;
                fault_point("store.manifest.after_put");
                match put {
                    // Another push of the same contents finished first: same files, same version.
                    Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => manifest,
                    Err(e) => return Err(self.backend(e)),
                }
            }
        };
        let latest: Name = LATEST.parse().expect("a valid tag");
        for tag in std::iter::once(&latest).chain(&tags) {
            self.set_tag(name, tag, &version).await?;
        }
        Ok(manifest)
    }

    async fn set_tag(&self, name: &Name, tag: &Name, version: &str) -> Result<()> {
        let body = serde_json::to_vec_pretty(&TagFile { version: version.to_string(), updated: now() }).expect("tags serialise");
        fault_point("store.tag.before_put");
        self.inner.put(&tag_path(name, tag.as_str()), PutPayload::from(body)).await.map_err(|e| self.backend(e))?;
        fault_point("store.tag.after_put");
        Ok(())
    }

    /// The tags of `name`, with the versions they point to.
    pub async fn tags(&self, name: &Name) -> Result<Vec<(String, TagFile)>> {
        let prefix = StorePath::from(format!("{name}/tags"));
        let objects: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await.map_err(|e| self.backend(e))?;
        let mut out = Vec::new();
        for o in objects {
            let Some(tag) = o.location.filename().and_then(|f| f.strip_suffix(".json")).map(String::from) else { continue };
            let Some(bytes) = self.read(&o.location).await? else { continue };
            out.push((tag.clone(), parse_tag(&bytes, name, &tag)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The versions of `name` that have a manifest.
    async fn versions(&self, name: &Name) -> Result<Vec<String>> {
        let prefix = StorePath::from(format!("{name}/versions"));
        let listed = self.inner.list_with_delimiter(Some(&prefix)).await.map_err(|e| self.backend(e))?;
        let mut out = Vec::new();
        for dir in listed.common_prefixes {
            let Some(version) = dir.filename().map(String::from).filter(|v| is_version(v)) else { continue };
            if self.inner.head(&manifest_path(name, &version)).await.is_ok() {
                out.push(version);
            }
        }
        Ok(out)
    }

    /// The manifest `reference` names: `name` is `name@latest`; after `@`, a version (16
    /// hex digits, or a unique prefix of 4 or more) before a tag, so a tag can never shadow
    /// a version.
    pub async fn resolve(&self, reference: &Reference) -> Result<Manifest> {
        let name = &reference.name;
        let selector = reference.selector.as_deref().unwrap_or(LATEST);
        let versions = if reads_as_version(selector) { self.versions(name).await? } else { Vec::new() };
        let matching: Vec<&String> = versions.iter().filter(|v| v.starts_with(selector)).collect();
        match matching.as_slice() {
            [one] => return self.manifest(name, one).await,
            [] => {}
            many => {
                return Err(Error::Invalid(format!(
                    "`{reference}`: `{selector}` starts several versions ({}); give more digits",
                    many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )))
            }
        }
        if let Some(bytes) = self.read(&tag_path(name, selector)).await? {
            return self.manifest(name, &parse_tag(&bytes, name, selector)?.version).await;
        }
        let versions = self.versions(name).await?;
        if versions.is_empty() {
            return Err(Error::NotFound(format!(
                "no adapter `{name}` in {}; `adapters list --store {}` shows what is there",
                self.uri, self.uri
            )));
        }
        let tags: Vec<String> = self.tags(name).await?.into_iter().map(|(t, _)| t).collect();
        Err(Error::NotFound(format!(
            "`{reference}`: `{name}` has no tag or version `{selector}` (tags: {}; versions: {})",
            tags.join(", "),
            versions.join(", ")
        )))
    }

    async fn manifest(&self, name: &Name, version: &str) -> Result<Manifest> {
        let bytes = self.read(&manifest_path(name, version)).await?.ok_or_else(|| {
            Error::NotFound(format!("{name}@{version} has no manifest in {} (removed, or its push did not finish)", self.uri))
        })?;
        parse_manifest(&bytes, name, version)
    }

    /// Downloads the version `reference` names into the new folder `dest` and returns its
    /// manifest. Every file is checked against the manifest's size and hash; the folder
    /// appears (renamed from a temporary sibling) only when all of them are whole.
    pub async fn pull(&self, reference: &Reference, dest: &Path) -> Result<Manifest> {
        let manifest = self.resolve(reference).await?;
        self.download(&manifest, dest).await?;
        Ok(manifest)
    }

    /// Downloads the version `manifest` describes into the new folder `dest` (see [`Store::pull`]).
    pub async fn download(&self, manifest: &Manifest, dest: &Path) -> Result<()> {
        if dest.exists() && std::fs::read_dir(dest).map_err(|e| Error::file(dest, e))?.next().is_some() {
            return Err(Error::file(dest, "exists and is not empty; pull into a new folder"));
        }
        let files = self.fetch_files(manifest).await?;
        let dest = dest.to_path_buf();
        blocking(move || {
            let partial = write_partial(files, &dest)?;
            if dest.exists() {
                std::fs::remove_dir(&dest).map_err(|e| Error::file(&dest, e))?;
            }
            std::fs::rename(&partial, &dest).map_err(|e| Error::file(&dest, e))
        })
        .await
    }

    /// The folder `cache/NAME/VERSION` holding the version `manifest` describes, downloaded
    /// the first time and checked against the manifest's sizes and hashes every time it is
    /// opened (a damaged or changed copy is set aside and fetched again). Safe to share
    /// between processes and replicas: each downloads into a private folder of its own
    /// (0700, a unique name), flushed before it is renamed into place, and when another
    /// process renamed its copy first, that copy is used.
    pub async fn cached(&self, manifest: &Manifest, cache: &Path) -> Result<std::path::PathBuf> {
        let name: Name = manifest.name.parse()?;
        if !is_version(&manifest.version) {
            return Err(Error::Corrupt(format!("{name}@{}: not a version (16 hex digits)", manifest.version)));
        }
        let dir = cache.join(name.as_str()).join(&manifest.version);
        let (check, expected) = (dir.clone(), manifest.files.clone());
        let whole =
            blocking(move || Ok(check.exists() && verify(&check, &expected).inspect_err(|why| set_aside(&check, why)).is_ok())).await?;
        if whole {
            return Ok(dir);
        }
        let files = self.fetch_files(manifest).await?;
        let target = dir.clone();
        blocking(move || {
            let partial = write_partial(files, &target)?;
            match std::fs::rename(&partial, &target) {
                Ok(()) => sync_parent(&target),
                // Another process renamed its whole copy into place first: use that one.
                Err(_) if target.is_dir() => {
                    let _ = std::fs::remove_dir_all(&partial);
                    Ok(())
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&partial);
                    Err(Error::file(&target, e))
                }
            }
        })
        .await?;
        Ok(dir)
    }

    /// Every file of the version, read from the store concurrently (one round trip to a
    /// remote store, not one per file); hashing and writing happen in [`write_partial`], off
    /// the async runtime.
    async fn fetch_files(&self, manifest: &Manifest) -> Result<Fetched> {
        let name: Name = manifest.name.parse()?;
        let reads = manifest.files.iter().map(|f| async {
            let bytes = self.read(&file_path(&name, &manifest.version, &f.path)).await?.ok_or_else(|| {
                Error::Corrupt(format!(
                    "{}@{}: {} is missing from the store; push the adapter again",
                    manifest.name, manifest.version, f.path
                ))
            })?;
            Ok::<_, Error>((f.clone(), bytes))
        });
        let files = futures::future::try_join_all(reads).await?;
        Ok(Fetched { key: format!("{}@{}", manifest.name, manifest.version), files })
    }

    /// Every adapter (or just `name`) with its versions (newest first) and their tags.
    pub async fn list(&self, name: Option<&Name>) -> Result<Vec<Listing>> {
        let names: Vec<Name> = match name {
            Some(n) => vec![n.clone()],
            None => {
                let listed = self.inner.list_with_delimiter(None).await.map_err(|e| self.backend(e))?;
                listed.common_prefixes.iter().filter_map(|p| p.filename()?.parse().ok()).collect()
            }
        };
        let mut out = Vec::new();
        for name in names {
            let tags = self.tags(&name).await?;
            let mut versions = Vec::new();
            for v in self.versions(&name).await? {
                let manifest = self.manifest(&name, &v).await?;
                let tags = tags.iter().filter(|(_, t)| t.version == v).map(|(n, _)| n.clone()).collect();
                versions.push(VersionListing { manifest, tags });
            }
            versions.sort_by(|a, b| b.manifest.created.cmp(&a.manifest.created));
            if !versions.is_empty() {
                out.push(Listing { name: name.to_string(), versions });
            }
        }
        if let (Some(n), true) = (name, out.is_empty()) {
            return Err(Error::NotFound(format!("no adapter `{n}` in {}", self.uri)));
        }
        Ok(out)
    }

    /// Points `tag` of the adapter at the version `reference` names; returns that version.
    pub async fn tag(&self, reference: &Reference, tag: &Name) -> Result<Manifest> {
        check_tag(tag)?;
        let manifest = self.resolve(reference).await?;
        self.set_tag(&reference.name, tag, &manifest.version).await?;
        Ok(manifest)
    }

    /// Removes tag `tag` of `name`.
    pub async fn untag(&self, name: &Name, tag: &Name) -> Result<()> {
        if self.read(&tag_path(name, tag.as_str())).await?.is_none() {
            return Err(Error::NotFound(format!("`{name}` has no tag `{tag}`")));
        }
        self.inner.delete(&tag_path(name, tag.as_str())).await.map_err(|e| self.backend(e))
    }

    /// Removes the version `reference` names. A version that tags point to stays unless
    /// `force` (then the tags go too). The manifest goes first: the version disappears at
    /// once for every reader, and its files after.
    pub async fn remove(&self, reference: &Reference, force: bool) -> Result<Manifest> {
        let manifest = self.resolve(reference).await?;
        let name = &reference.name;
        let pointing: Vec<String> =
            self.tags(name).await?.into_iter().filter(|(_, t)| t.version == manifest.version).map(|(n, _)| n).collect();
        if !pointing.is_empty() && !force {
            return Err(Error::Invalid(format!(
                "{name}@{} is tagged {}; move or remove those tags first, or pass --force to remove them with it",
                manifest.version,
                pointing.join(", ")
            )));
        }
        for tag in &pointing {
            self.inner.delete(&tag_path(name, tag)).await.map_err(|e| self.backend(e))?;
        }
        self.inner.delete(&manifest_path(name, &manifest.version)).await.map_err(|e| self.backend(e))?;
        let prefix = StorePath::from(format!("{name}/versions/{}", manifest.version));
        let objects: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await.map_err(|e| self.backend(e))?;
        for o in objects {
            self.inner.delete(&o.location).await.map_err(|e| self.backend(e))?;
        }
        Ok(manifest)
    }
}

fn manifest_path(name: &Name, version: &str) -> StorePath {
    StorePath::from(format!("{name}/versions/{version}/manifest.json"))
}

fn file_path(name: &Name, version: &str, file: &str) -> StorePath {
    let mut parts = vec![name.to_string(), "versions".into(), version.to_string(), "files".into()];
    parts.extend(file.split('/').map(String::from));
    StorePath::from_iter(parts)
}

fn tag_path(name: &Name, tag: &str) -> StorePath {
    StorePath::from_iter([name.to_string(), "tags".into(), format!("{tag}.json")])
}

/// A manifest read from the store, checked before any of it can become a path or be
/// trusted: its name and version are the ones asked for, the version is 16 hex digits and
/// the start of the digest of its file list, every file path stays inside the folder, and
/// a setup's members are plain names.
fn parse_manifest(bytes: &[u8], name: &Name, version: &str) -> Result<Manifest> {
    let corrupt = |what: String| Error::Corrupt(format!("{name}@{version}: {what}; push the adapter again"));
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("manifest.json is not readable ({e})")))?;
    if m.name != name.as_str() || m.version != version {
        return Err(corrupt(format!("the manifest describes {}@{}", m.name, m.version)));
    }
    if !is_version(&m.version) {
        return Err(corrupt(format!("the manifest's version `{}` is not 16 hex digits", m.version)));
    }
    if folder::digest(&m.files) != m.digest || !m.digest.starts_with(&m.version) {
        return Err(corrupt("the manifest's version and digest do not match its file list".into()));
    }
    if let Some(bad) = m.files.iter().find(|f| !inside_folder(&f.path)) {
        return Err(corrupt(format!("the manifest lists a file outside the folder (`{}`)", bad.path)));
    }
    let members = m.contents.setup.iter().flat_map(|s| &s.adapters).map(|(member, _)| member);
    if let Some(bad) = members.into_iter().find(|member| member.split(',').any(|part| part.parse::<Name>().is_err())) {
        return Err(corrupt(format!("the setup names a member `{bad}` that is not a plain name")));
    }
    Ok(m)
}

/// A tag read from the store; its version must be exactly a version.
fn parse_tag(bytes: &[u8], name: &Name, tag: &str) -> Result<TagFile> {
    let corrupt = |what: String| Error::Corrupt(format!("{name}: tag `{tag}` {what}; set it again with `adapters tag`"));
    let file: TagFile = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("is not readable ({e})")))?;
    if !is_version(&file.version) {
        return Err(corrupt(format!("points at `{}`, which is not a version (16 hex digits)", file.version)));
    }
    Ok(file)
}

/// Whether a manifest's `/`-separated file path names a file inside the version's folder.
fn inside_folder(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains(':'))
}

/// A version's files as read from the store, not yet checked.
struct Fetched {
    /// `NAME@VERSION`, for errors.
    key: String,
    files: Vec<(FileEntry, bytes::Bytes)>,
}

/// Runs blocking file work (hashing, writing, renaming) on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::Invalid(format!("file work stopped: {e}")))?
}

/// Checks every fetched file against its size and hash and writes them into a new private
/// folder beside `dest` (a unique name, 0700), flushed to disk; returns that folder. Only
/// whole versions come out: on any error the folder is removed.
fn write_partial(fetched: Fetched, dest: &Path) -> Result<std::path::PathBuf> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    private_dirs(parent)?;
    let leaf = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    let prefix = format!(".{leaf}.partial-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let partial = builder.tempdir_in(parent).map_err(|e| Error::file(parent, e))?;
    for (f, bytes) in &fetched.files {
        if bytes.len() as u64 != f.size || hex_sha(bytes) != f.sha256 {
            return Err(Error::Corrupt(format!(
                "{}: {} in the store is damaged ({} bytes, {} expected, or a different hash); push the adapter again",
                fetched.key,
                f.path,
                bytes.len(),
                f.size
            )));
        }
        let path = partial.path().join(&f.path);
        private_dirs(path.parent().expect("a file has a parent"))?;
        let mut file = std::fs::File::create(&path).map_err(|e| Error::file(&path, e))?;
        std::io::Write::write_all(&mut file, bytes).and_then(|()| file.sync_all()).map_err(|e| Error::file(&path, e))?;
    }
    adapters_core::durable::sync_tree(partial.path(), "store.cache").map_err(|e| Error::file(partial.path(), e))?;
    Ok(partial.keep())
}

/// Creates `dir` and its missing parents readable by this user only.
fn private_dirs(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| Error::file(dir, e))
}

/// Flushes the folder holding `path`, so a rename into it survives a power cut.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    adapters_core::durable::sync(parent, "store.cache.rename").map_err(|e| Error::file(parent, e))
}

/// Whether the folder `dir` holds exactly `files` (paths, sizes, hashes).
fn verify(dir: &Path, files: &[FileEntry]) -> Result<()> {
    let found = folder::list_files(dir)?;
    if found != files {
        let differs = files.iter().find(|f| !found.contains(f)).map_or_else(|| "an extra file".to_string(), |f| f.path.clone());
        return Err(Error::Corrupt(format!("{}: {differs} differs from the manifest", dir.display())));
    }
    Ok(())
}

/// Moves a damaged cached copy out of the way (under a unique name, then removed), so it is
/// fetched again; a process that finds it already gone has nothing to do.
fn set_aside(dir: &Path, why: &Error) {
    tracing::warn!(folder = %dir.display(), "cached adapter version damaged ({why}); fetching it again");
    let trash =
        dir.with_file_name(format!(".damaged-{}", hex_sha(format!("{}{:?}", dir.display(), std::time::SystemTime::now()).as_bytes())));
    if std::fs::rename(dir, &trash).is_ok() {
        let _ = std::fs::remove_dir_all(&trash);
    }
}

fn hex_sha(bytes: &[u8]) -> String {
    folder::hex(&Sha256::digest(bytes))
}

/// Where downloaded versions are kept unless told otherwise: `$ADAPTERS_CACHE`, else
/// `~/.cache/adapters`.
pub fn default_cache_dir() -> std::path::PathBuf {
    match (std::env::var_os("ADAPTERS_CACHE"), std::env::var_os("HOME")) {
        (Some(dir), _) => dir.into(),
        (None, Some(home)) => std::path::PathBuf::from(home).join(".cache/adapters"),
        (None, None) => std::env::temp_dir().join("adapters-cache"),
    }
}

/// The local folder of the version `reference` names in the store at `uri` (see
/// [`Store::cached`]). Blocking, for
/// command-line tools and the trainer; not for use inside an async runtime.
pub fn local_copy(uri: &str, reference: &Reference, cache: &Path) -> Result<std::path::PathBuf> {
    let store = Store::open(uri)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("starting the I/O runtime for {uri}: {e}")))?;
    runtime.block_on(async { store.cached(&store.resolve(reference).await?, cache).await })
}
