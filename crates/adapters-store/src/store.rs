//! The store: push, resolve, pull, list, tag and remove adapter versions on any
//! `object_store` backend (a local folder or an S3-compatible bucket).

use crate::error::{Error, Result};
use crate::folder::{self, Contents, FileEntry};
use crate::name::{Name, Reference};
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

/// Digits of the content digest that name a version.
const VERSION_DIGITS: usize = 16;
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
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
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
            let file: TagFile = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Corrupt(format!("{name}: tag `{tag}` is not readable ({e}); set it again with `adapters tag`")))?;
            out.push((tag, file));
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
            let Some(version) = dir.filename().map(String::from) else { continue };
            if self.inner.head(&manifest_path(name, &version)).await.is_ok() {
                out.push(version);
            }
        }
        Ok(out)
    }

    /// The manifest `reference` names: `name` is `name@latest`; after `@`, a tag wins over
    /// a version; a version may be given by a unique prefix of 4 or more digits.
    pub async fn resolve(&self, reference: &Reference) -> Result<Manifest> {
        let name = &reference.name;
        let selector = reference.selector.as_deref().unwrap_or(LATEST);
        if let Some(bytes) = self.read(&tag_path(name, selector)).await? {
            let tag: TagFile = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Corrupt(format!("{name}: tag `{selector}` is not readable ({e}); set it again with `adapters tag`")))?;
            return self.manifest(name, &tag.version).await;
        }
        let versions = self.versions(name).await?;
        if versions.is_empty() {
            return Err(Error::NotFound(format!(
                "no adapter `{name}` in {}; `adapters list --store {}` shows what is there",
                self.uri, self.uri
            )));
        }
        let matching: Vec<&String> =
            if selector.len() >= 4 { versions.iter().filter(|v| v.starts_with(selector)).collect() } else { Vec::new() };
        match matching.as_slice() {
            [one] => self.manifest(name, one).await,
            [] => {
                let tags: Vec<String> = self.tags(name).await?.into_iter().map(|(t, _)| t).collect();
                Err(Error::NotFound(format!(
                    "`{reference}`: `{name}` has no tag or version `{selector}` (tags: {}; versions: {})",
                    tags.join(", "),
                    versions.join(", ")
                )))
            }
            many => Err(Error::Invalid(format!(
                "`{reference}`: `{selector}` starts several versions ({}); give more digits",
                many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
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
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::file(parent, e))?;
        let leaf = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        let partial = parent.join(format!(".{leaf}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        let result = self.download_into(manifest, &partial).await;
        let result = result.and_then(|()| {
            if dest.exists() {
                std::fs::remove_dir(dest).map_err(|e| Error::file(dest, e))?;
            }
            std::fs::rename(&partial, dest).map_err(|e| Error::file(dest, e))
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        result
    }

    /// The folder `cache/NAME/VERSION` holding the version `manifest` describes,
    /// downloaded the first time (versions never change, so a folder there is reused).
    pub async fn cached(&self, manifest: &Manifest, cache: &Path) -> Result<std::path::PathBuf> {
        let dir = cache.join(&manifest.name).join(&manifest.version);
        if !dir.exists() {
            self.download(manifest, &dir).await?;
        }
        Ok(dir)
    }

    async fn download_into(&self, manifest: &Manifest, dir: &Path) -> Result<()> {
        let name: Name = manifest.name.parse()?;
        for f in &manifest.files {
            let rel = Path::new(&f.path);
            if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(Error::Corrupt(format!(
                    "{}@{}: the manifest lists a file outside the folder ({})",
                    manifest.name, manifest.version, f.path
                )));
            }
            let bytes = self.read(&file_path(&name, &manifest.version, &f.path)).await?.ok_or_else(|| {
                Error::Corrupt(format!(
                    "{}@{}: {} is missing from the store; push the adapter again",
                    manifest.name, manifest.version, f.path
                ))
            })?;
            if bytes.len() as u64 != f.size || hex_sha(&bytes) != f.sha256 {
                return Err(Error::Corrupt(format!(
                    "{}@{}: {} in the store is damaged ({} bytes, {} expected, or a different hash); push the adapter again",
                    manifest.name,
                    manifest.version,
                    f.path,
                    bytes.len(),
                    f.size
                )));
            }
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().expect("a file has a parent")).map_err(|e| Error::file(&path, e))?;
            std::fs::write(&path, &bytes).map_err(|e| Error::file(&path, e))?;
        }
        Ok(())
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

fn parse_manifest(bytes: &[u8], name: &Name, version: &str) -> Result<Manifest> {
    let m: Manifest =
        serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{name}@{version}: manifest.json is not readable ({e})")))?;
    if m.name != name.as_str() || m.version != version {
        return Err(Error::Corrupt(format!("{name}@{version}: the manifest describes {}@{}", m.name, m.version)));
    }
    Ok(m)
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
