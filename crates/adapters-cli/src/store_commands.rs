//! `adapters push | pull | list | tag | rm`: the adapter library (see adapters-store).

use crate::commands::open;
use adapters_core::{InsertionPoint, Setup};
use adapters_models::HoldsAdapters;
use adapters_store::{Manifest, Name, PushOptions, Reference, Store};
use anyhow::{bail, Context, Result};
use std::future::Future;
use std::path::Path;

/// Where the adapter library is.
#[derive(clap::Args, Debug)]
pub struct StoreArg {
    /// The adapter library: a folder, file:///PATH, or s3://BUCKET[/PREFIX] (credentials,
    /// region and endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    /// AWS_ENDPOINT_URL; AWS_ALLOW_HTTP=true for a plain-HTTP S3-compatible server).
    #[arg(long, env = "ADAPTERS_STORE", value_name = "URI")]
    pub store: String,
}

impl StoreArg {
    fn open(&self) -> Result<Store> {
        Ok(Store::open(&self.store)?)
    }
}

/// Runs one store operation to completion.
fn block_on<T>(f: impl Future<Output = adapters_store::Result<T>>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the I/O runtime")?;
    Ok(runtime.block_on(f)?)
}

fn describe(m: &Manifest, tags: &[String]) -> String {
    let c = &m.contents;
    let base = c.base_model.as_ref().map_or("base model not recorded".to_string(), |b| format!("for {b}"));
    let tags = if tags.is_empty() { String::new() } else { format!(" [{}]", tags.join(", ")) };
    let mut s = format!(
        "{}@{}{tags}  {} ({}), {} parameters, {:.1} kB, {base}, created {}",
        m.name,
        m.version,
        c.kind,
        c.format,
        c.parameters,
        m.size_bytes as f64 / 1e3,
        m.created
    );
    if let Some(setup) = &c.setup {
        s += &format!(
            "\n    setup {} over {}",
            setup.expression,
            setup.adapters.iter().map(|(n, k)| format!("{n} ({k})")).collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(run) = &m.training_run {
        s += &format!("\n    from training run {run}");
    }
    s
}

/// Checks that the folder (an adapter, or a setup with its adapters) loads onto `model`;
/// returns the model's fingerprint.
fn check_against(dir: &Path, model: &Path) -> Result<adapters_core::Fingerprint> {
    let mut loaded = open(model)?;
    let setup_file = dir.join(adapters_core::setup::SETUP_FILE);
    if setup_file.exists() {
        let setup = Setup::load(dir)?;
        let mut names = setup.adapter_names();
        names.extend(setup.fusion_names());
        names.sort();
        names.dedup();
        for name in names {
            loaded
                .backbone
                .load_adapter(&dir.join(&name), Some(&name))
                .with_context(|| format!("{} does not fit {}", dir.join(&name).display(), model.display()))?;
        }
        loaded.backbone.adapters_mut().set_setup(Some(setup)).with_context(|| format!("{}", setup_file.display()))?;
    } else {
        loaded.backbone.load_adapter(dir, None).with_context(|| format!("{} does not fit {}", dir.display(), model.display()))?;
    }
    Ok(loaded.backbone.fingerprint()?)
}

pub fn push(dir: &Path, name: &str, tags: &[String], model: Option<&Path>, run: Option<String>, store: &StoreArg) -> Result<()> {
    let name: Name = name.parse()?;
    let tags = tags.iter().map(|t| t.parse::<Name>()).collect::<adapters_store::Result<Vec<_>>>()?;
    let base_model = model.map(|m| check_against(dir, m)).transpose()?;
    let store = store.open()?;
    let m = block_on(store.push(dir, &name, PushOptions { tags: tags.clone(), training_run: run, base_model }))?;
    println!("{}", describe(&m, &[]));
    let tags: Vec<String> = std::iter::once(adapters_store::LATEST.to_string()).chain(tags.iter().map(Name::to_string)).collect();
    println!("tagged {}; pull it with `adapters pull {}@{} --out DIR`", tags.join(", "), m.name, m.version);
    Ok(())
}

pub fn pull(reference: &str, out: &Path, store: &StoreArg) -> Result<()> {
    let reference: Reference = reference.parse()?;
    let m = block_on(store.open()?.pull(&reference, out))?;
    println!("{}\nwritten to {}", describe(&m, &[]), out.display());
    Ok(())
}

pub fn list(name: Option<&str>, json: bool, store: &StoreArg) -> Result<()> {
    let name = name.map(str::parse::<Name>).transpose()?;
    let listing = block_on(store.open()?.list(name.as_ref()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    if listing.is_empty() {
        println!("{} holds no adapters yet; add one with `adapters push DIR --name NAME`", store.store);
    }
    for entry in listing {
        println!("{}", entry.name);
        for v in entry.versions {
            println!("  {}", describe(&v.manifest, &v.tags).replace('\n', "\n  "));
        }
    }
    Ok(())
}

pub fn tag(reference: &str, tag: &str, store: &StoreArg) -> Result<()> {
    let (reference, tag): (Reference, Name) = (reference.parse()?, tag.parse()?);
    let m = block_on(store.open()?.tag(&reference, &tag))?;
    println!("{}@{tag} -> {}", m.name, m.version);
    Ok(())
}

pub fn rm(reference: &str, tag: Option<&str>, force: bool, store: &StoreArg) -> Result<()> {
    let reference: Reference = reference.parse()?;
    let store = store.open()?;
    match tag {
        Some(tag) => {
            if reference.selector.is_some() {
                bail!("--tag removes a tag of an adapter: give the name alone (`adapters rm {} --tag {tag}`)", reference.name);
            }
            let tag: Name = tag.parse()?;
            block_on(store.untag(&reference.name, &tag))?;
            println!("removed tag {}@{tag}", reference.name);
        }
        None => {
            if reference.selector.is_none() {
                bail!(
                    "name the version to remove: `adapters rm {0}@VERSION` (or `{0}@TAG`); `adapters list {0}` shows them",
                    reference.name
                );
            }
            let m = block_on(store.remove(&reference, force))?;
            println!("removed {}@{}", m.name, m.version);
        }
    }
    Ok(())
}

/// The arguments of `adapters push`.
#[derive(clap::Args)]
pub struct PushArgs {
    /// The adapter or setup folder.
    pub dir: std::path::PathBuf,
    /// The adapter's name in the library (letters, digits, `.`, `_`, `-`).
    #[arg(long)]
    pub name: String,
    /// Also point this tag at the new version (`prod`, `canary`, ...). Repeatable.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Check that it loads onto this base model (and record the model's fingerprint).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// The training run it came from, recorded in the manifest.
    #[arg(long)]
    pub run: Option<String>,
    #[command(flatten)]
    pub store: crate::store_commands::StoreArg,
}

/// The arguments of `adapters pull`.
#[derive(clap::Args)]
pub struct PullArgs {
    pub reference: String,
    /// The folder to write (must not exist yet, or be empty).
    #[arg(long)]
    pub out: std::path::PathBuf,
    #[command(flatten)]
    pub store: crate::store_commands::StoreArg,
}

/// The arguments of `adapters list`.
#[derive(clap::Args)]
pub struct ListArgs {
    pub name: Option<String>,
    /// Print JSON (the manifests and their tags).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: crate::store_commands::StoreArg,
}

/// The arguments of `adapters tag`.
#[derive(clap::Args)]
pub struct TagArgs {
    pub reference: String,
    pub tag: String,
    #[command(flatten)]
    pub store: crate::store_commands::StoreArg,
}

/// The arguments of `adapters rm`.
#[derive(clap::Args)]
pub struct RmArgs {
    pub reference: String,
    /// Remove this tag of the adapter instead of a version.
    #[arg(long)]
    pub tag: Option<String>,
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub store: crate::store_commands::StoreArg,
}
