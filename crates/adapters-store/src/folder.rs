//! Reading an adapter folder before it is stored: which format and kind it is, the model
//! it was made for, its parameters, and every file with its hash. A folder that no
//! registered format reads, or whose files are broken, is refused here, before anything
//! is uploaded.

use crate::error::{Error, Result};
use adapters_core::io::{formats, SavedConfig, CONFIG_FILE, FORMAT, FUSION_CONFIG_FILE};
use adapters_core::setup::SETUP_FILE;
use adapters_core::{registry, Fingerprint, Setup};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One file of a stored version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path inside the folder, `/`-separated.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// sha256, hex.
    pub sha256: String,
}

/// What a folder holds: one adapter, or a composition setup with its adapters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contents {
    /// `adapters-rs`, `peft`, `adapterhub`, `adapterhub-fusion`, or `setup`.
    pub format: String,
    /// The adapter kind (`seq_bn`, `lora`, `fusion`, ...), or `setup`.
    pub kind: String,
    /// The base model it was made for, where the folder records it.
    pub base_model: Option<Fingerprint>,
    /// Trainable parameters in its weight files (heads included).
    pub parameters: u64,
    /// For a setup: its expression and its adapters, `name: kind` each, by subfolder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<SetupContents>,
}

/// The parts of a stored composition setup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetupContents {
    /// The setup as an expression (`fuse(a, b)`).
    pub expression: String,
    /// Each adapter the setup names, with its kind; its files are in the subfolder of
    /// that name.
    pub adapters: Vec<(String, String)>,
}

/// Reads and checks the folder at `dir`; returns what it holds and its files (sorted).
pub fn inspect(dir: &Path) -> Result<(Contents, Vec<FileEntry>)> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "is not a folder; push an adapter folder (adapter_config.json and its weights) or a setup folder (adapter_setup.json and one subfolder per adapter)"));
    }
    let files = list_files(dir)?;
    let contents = if dir.join(SETUP_FILE).exists() { inspect_setup(dir)? } else { inspect_adapter(dir)? };
    Ok((contents, files))
}

fn inspect_setup(dir: &Path) -> Result<Contents> {
    let setup = Setup::load(dir).map_err(|e| Error::file(&dir.join(SETUP_FILE), e))?;
    let mut names = setup.adapter_names();
    names.extend(setup.fusion_names());
    names.sort();
    names.dedup();
    let mut adapters = Vec::new();
    let (mut parameters, mut base_model) = (0, None);
    for name in names {
        let sub = dir.join(&name);
        if !sub.is_dir() {
            return Err(Error::file(
                dir,
                format!("the setup `{setup}` uses adapter `{name}`, but there is no subfolder `{name}` holding it"),
            ));
        }
        let c = inspect_adapter(&sub)?;
        parameters += c.parameters;
        if let Some(fp) = c.base_model {
            if base_model.as_ref().is_some_and(|b: &Fingerprint| *b != fp) {
                return Err(Error::file(
                    &sub,
                    format!("was made for the base model {fp}, the setup's other adapters for {}", base_model.unwrap()),
                ));
            }
            base_model = Some(fp);
        }
        adapters.push((name, c.kind));
    }
    Ok(Contents {
        format: "setup".into(),
        kind: "setup".into(),
        base_model,
        parameters,
        setup: Some(SetupContents { expression: setup.to_string(), adapters }),
    })
}

fn inspect_adapter(dir: &Path) -> Result<Contents> {
    let fusion = dir.join(FUSION_CONFIG_FILE);
    let config_path = if !dir.join(CONFIG_FILE).exists() && fusion.exists() { fusion } else { dir.join(CONFIG_FILE) };
    let bytes = std::fs::read(&config_path).map_err(|e| {
        Error::file(&config_path, format!("cannot be read ({e}); an adapter folder has adapter_config.json and its weights"))
    })?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::file(&config_path, format!("is not valid JSON: {e}")))?;
    let (format, kind, base_model) = if json.get("format").and_then(|f| f.as_str()) == Some(FORMAT) {
        let saved: SavedConfig = serde_json::from_value(json).map_err(|e| Error::file(&config_path, e))?;
        registry::kind(&saved.kind).map_err(|e| Error::file(&config_path, e))?;
        (FORMAT.to_string(), saved.kind, Some(saved.base_model))
    } else {
        let format = formats().find(|f| (f.detect)(&json)).ok_or_else(|| {
            let known: Vec<&str> = std::iter::once(FORMAT).chain(formats().map(|f| f.name)).collect();
            Error::file(&config_path, format!("is not an adapter config of a known format ({})", known.join(", ")))
        })?;
        (format.name.to_string(), foreign_kind(format.name, &json), None)
    };
    let mut parameters = 0;
    let mut weights = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))?.chain(heads(dir)?) {
        let path = entry.map_err(|e| Error::file(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            parameters += safetensors_parameters(&path)?;
            weights += 1;
        }
    }
    if weights == 0 {
        return Err(Error::file(dir, "has no .safetensors weights file"));
    }
    Ok(Contents { format, kind, base_model, parameters, setup: None })
}

/// Entries of the `heads/*/` folders (classification heads saved with an adapter).
fn heads(dir: &Path) -> Result<Vec<std::io::Result<std::fs::DirEntry>>> {
    let heads = dir.join("heads");
    let mut out = Vec::new();
    if heads.is_dir() {
        for task in std::fs::read_dir(&heads).map_err(|e| Error::file(&heads, e))? {
            let task = task.map_err(|e| Error::file(&heads, e))?.path();
            if task.is_dir() {
                out.extend(std::fs::read_dir(&task).map_err(|e| Error::file(&task, e))?);
            }
        }
    }
    Ok(out)
}

/// The kind of a folder in another library's format.
fn foreign_kind(format: &str, json: &serde_json::Value) -> String {
    match format {
        "peft" => json["peft_type"].as_str().unwrap_or("lora").to_lowercase(),
        "adapterhub-fusion" => "fusion".into(),
        _ => json["config"]["architecture"].as_str().unwrap_or("bottleneck").to_string(),
    }
}

/// Number of values in a safetensors file, from its header (the file must be whole).
fn safetensors_parameters(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("is not a valid safetensors file ({e}); it may be truncated")))?;
    Ok(tensors.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>() as u64).sum())
}

/// Every file under `dir`, sorted by path, with size and sha256.
pub(crate) fn list_files(dir: &Path) -> Result<Vec<FileEntry>> {
    let mut paths = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::file(&d, e))? {
            let entry = entry.map_err(|e| Error::file(&d, e))?;
            let kind = entry.file_type().map_err(|e| Error::file(&entry.path(), e))?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                paths.push(entry.path());
            } else {
                return Err(Error::file(
                    &entry.path(),
                    "is neither a file nor a folder (a link?); copy the real file into the adapter folder",
                ));
            }
        }
    }
    let mut files: Vec<FileEntry> = paths
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(|e| Error::file(p, e))?;
            Ok(FileEntry { path: relative(dir, p), size: bytes.len() as u64, sha256: hex(&Sha256::digest(&bytes)) })
        })
        .collect::<Result<_>>()?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

fn relative(dir: &Path, path: &Path) -> String {
    let rel: PathBuf = path.strip_prefix(dir).expect("listed under dir").to_path_buf();
    rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The full content digest of a version: sha256 over its sorted files' paths and hashes.
pub fn digest(files: &[FileEntry]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.path.as_bytes());
        h.update([0]);
        h.update(f.sha256.as_bytes());
        h.update([b'\n']);
    }
    hex(&h.finalize())
}
