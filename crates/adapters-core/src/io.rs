//! Adapters on disk. Our own format is a folder with `adapter_config.json` (kind, full
//! configuration, placement, library version, base-model fingerprint) and
//! `adapter_model.safetensors` (every variable by its name). Family crates register
//! readers for the Python ecosystem's formats (PEFT, AdapterHub) as [`AdapterFormat`]s,
//! so [`load`] reads any of them.

use crate::adapter::Adapter;
use crate::fingerprint::Fingerprint;
use crate::placement::Placement;
use crate::point::{InsertionPoint, ModelInfo};
use crate::{registry, Error};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The configuration file of an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The configuration file of AdapterHub's fusion folders (read by a registered format).
pub const FUSION_CONFIG_FILE: &str = "adapter_fusion_config.json";
/// The weights file of our adapter folders.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The `format` value of our own `adapter_config.json`.
pub const FORMAT: &str = "adapters-rs";

/// The contents of our `adapter_config.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedConfig {
    /// Always [`FORMAT`].
    pub format: String,
    /// The version of this library that wrote it.
    pub library_version: String,
    /// The name it was saved under.
    pub name: String,
    /// The registered kind.
    pub kind: String,
    /// The kind's configuration.
    pub config: serde_json::Value,
    /// Where it sits.
    pub placement: Placement,
    /// The model it was made for.
    pub base_model: Fingerprint,
}

/// An adapter read from disk, ready to attach.
pub struct Loaded {
    /// The name it was saved under (our `name`, AdapterHub's `name`, or the folder name).
    pub name: String,
    /// The adapter, with its weights filled in.
    pub adapter: Box<dyn Adapter>,
    /// Where it sits.
    pub placement: Placement,
    /// Which format it was read from (`adapters-rs`, `peft`, `adapterhub`).
    pub format: &'static str,
}

/// A reader for another library's adapter folders, registered by a family crate.
pub struct AdapterFormat {
    /// The format's name (`peft`, `adapterhub`).
    pub name: &'static str,
    /// Whether a parsed `adapter_config.json` is in this format.
    pub detect: fn(&serde_json::Value) -> bool,
    /// Reads a folder detected as this format.
    pub load: fn(&Path, &serde_json::Value, &ModelInfo, &Device) -> Result<Loaded, Error>,
}

inventory::collect!(AdapterFormat);

/// Every registered format of other libraries (our own, [`FORMAT`], is not among them).
pub fn formats() -> impl Iterator<Item = &'static AdapterFormat> {
    inventory::iter::<AdapterFormat>.into_iter()
}

/// Writes `bytes` to `path` through a flushed temporary file and a rename (fault points
/// `file.*`, see [`crate::durable`]): a crash leaves the old file or the new one, whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_through_temp(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)
    })
}

/// Copies the folder `from` with everything below it into `to` (created as needed).
pub fn copy_dir(from: &Path, to: &Path) -> Result<(), Error> {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |e| Error::Io { path: path.to_path_buf(), message: e.to_string() }
    }
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let target = to.join(entry.file_name());
        if entry.file_type().map_err(io(&entry.path()))?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

/// Writes tensors as safetensors through a flushed temporary file and a rename.
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), Error> {
    write_through_temp(path, |tmp| candle_core::safetensors::save(tensors, tmp).map_err(|e| std::io::Error::other(e.to_string())))
}

fn write_through_temp(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::Io { path: path.to_path_buf(), message: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| crate::durable::sync(&tmp, "file")).and_then(|()| crate::durable::rename(&tmp, path, "file"));
    if result.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    result.map_err(io)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Checks the `model_type` a Hugging Face-side config names (AdapterHub's, PEFT's) against
/// the model an adapter folder is loaded onto.
pub fn check_model_type(dir: &Path, config: &serde_json::Value, model: &ModelInfo) -> Result<(), Error> {
    match config["model_type"].as_str() {
        Some(arch) if arch != model.architecture => Err(Error::Mismatch(format!(
            "{} was saved for a `{arch}` model, but the loaded model is `{}`",
            dir.display(),
            model.architecture
        ))),
        _ => Ok(()),
    }
}

/// The Hugging Face `model_class` and `model_type` written for a model's architecture.
pub fn hf_model_class(model: &ModelInfo) -> (&'static str, &str) {
    let class = match model.architecture.as_str() {
        "bert" => "BertModel",
        "roberta" => "RobertaModel",
        "xlm-roberta" => "XLMRobertaModel",
        "distilbert" => "DistilBertModel",
        "mistral" => "MistralModel",
        "qwen2" => "Qwen2Model",
        "qwen3" => "Qwen3Model",
        "gemma2" => "Gemma2Model",
        "gemma3_text" => "Gemma3TextModel",
        "phi3" => "Phi3Model",
        _ => "LlamaModel",
    };
    (class, &model.architecture)
}

/// Reads a safetensors file (as f32); a missing, truncated or corrupt file, or a tensor
/// holding NaN or infinite values, is an error naming the file (and the tensor).
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, Error> {
    if !path.exists() {
        return Err(Error::Io { path: path.to_path_buf(), message: "the file is missing".into() });
    }
    // PyTorch pickles (`.bin`, what AdapterHub and PEFT write by default) are read by
    // candle's restricted unpickler, which builds tensors and runs no code.
    let pickle = path.extension().is_some_and(|e| e == "bin" || e == "pt");
    let tensors: HashMap<String, Tensor> = if pickle {
        candle_core::pickle::read_all(path)
            .map_err(|e| Error::Io { path: path.to_path_buf(), message: format!("not a readable PyTorch tensor file: {e}") })?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<_, Error>>()?
    } else {
        candle_core::safetensors::load(path, device).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            message: format!("not a readable safetensors file (truncated or corrupt?): {e}"),
        })?
    };
    let mut out = HashMap::with_capacity(tensors.len());
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let mut tensors = tensors;
    for name in names {
        let t = tensors.remove(&name).expect("listed");
        let t = if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? };
        let bad = t.flatten_all()?.to_vec1::<f32>()?.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::Io {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` holds {bad} NaN or infinite values (of {}): refused; the file is damaged or was saved \
                     from a diverged run",
                    t.elem_count()
                ),
            });
        }
        out.insert(name, t);
    }
    Ok(out)
}

/// Reads and parses a JSON file, naming it in errors.
pub fn read_json(path: &Path) -> Result<serde_json::Value, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), message: e.to_string() })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Io { path: path.to_path_buf(), message: format!("not valid JSON: {e}") })
}

/// Saves an adapter in our format under `dir`. Weights are written before the config,
/// each atomically, so a folder never holds a config without its weights.
pub fn save(dir: &Path, name: &str, adapter: &dyn Adapter, placement: &Placement, base: &Fingerprint) -> Result<(), Error> {
    let tensors: HashMap<String, Tensor> = adapter.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    save_tensors_atomic(&tensors, &dir.join(WEIGHTS_FILE))?;
    let config = SavedConfig {
        format: FORMAT.into(),
        library_version: env!("CARGO_PKG_VERSION").into(),
        name: name.into(),
        kind: adapter.kind().into(),
        config: adapter.config(),
        placement: placement.clone(),
        base_model: base.clone(),
    };
    let json = serde_json::to_string_pretty(&config).expect("configs serialise");
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// Copies `tensors` into the adapter's variables, by name. Every variable must be present
/// with its exact shape and no tensor may be left over; nothing is changed unless all fit.
pub fn fill_vars(adapter: &dyn Adapter, mut tensors: HashMap<String, Tensor>, file: &Path) -> Result<(), Error> {
    let bad = |m: String| Error::Io { path: file.to_path_buf(), message: m };
    let mut pairs = Vec::new();
    for (name, var) in adapter.vars() {
        let t = tensors.remove(&name).ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
        if t.dims() != var.dims() {
            return Err(bad(format!("tensor `{name}` has shape {:?}, the adapter's config needs {:?}", t.dims(), var.dims())));
        }
        pairs.push((var, t));
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(bad(format!("tensor `{extra}` does not belong to a `{}` adapter with this config", adapter.kind())));
    }
    for (var, t) in pairs {
        var.set(&t)?;
    }
    Ok(())
}

/// Reads an adapter folder of any known format, checked against the base model. Nothing
/// is attached: the caller adds the result to the model's adapter set once it is read.
pub fn load(dir: &Path, model: &dyn InsertionPoint, device: &Device) -> Result<Loaded, Error> {
    if !dir.is_dir() {
        return Err(Error::Io { path: dir.to_path_buf(), message: "not a folder; an adapter is a folder with adapter_config.json".into() });
    }
    // AdapterHub saves fusion layers with their own config file name.
    let fusion_config = dir.join(FUSION_CONFIG_FILE);
    let config_path = if !dir.join(CONFIG_FILE).exists() && fusion_config.exists() { fusion_config } else { dir.join(CONFIG_FILE) };
    let json = read_json(&config_path)?;
    if json.get("format").and_then(|f| f.as_str()) == Some(FORMAT) {
        return load_own(dir, json, model, device);
    }
    for format in formats() {
        if (format.detect)(&json) {
            return (format.load)(dir, &json, &model.model_info(), device);
        }
    }
    let known: Vec<&str> = std::iter::once(FORMAT).chain(formats().map(|f| f.name)).collect();
    Err(Error::Io { path: config_path, message: format!("not an adapter config of a known format ({})", known.join(", ")) })
}

fn load_own(dir: &Path, json: serde_json::Value, model: &dyn InsertionPoint, device: &Device) -> Result<Loaded, Error> {
    let config_path = dir.join(CONFIG_FILE);
    let saved: SavedConfig = serde_json::from_value(json).map_err(|e| Error::Io { path: config_path.clone(), message: e.to_string() })?;
    let info = model.model_info();
    let mut base = model.fingerprint()?;
    if saved.base_model.version != base.version {
        // Saved by an earlier library: compare in its fingerprint format.
        base = Fingerprint::of_version(saved.base_model.version, &info, &model.fingerprint_weights())?;
    }
    if saved.base_model != base {
        return Err(Error::Mismatch(format!(
            "{} was made for the base model {}, but the loaded model is {}",
            dir.display(),
            saved.base_model,
            base
        )));
    }
    let adapter = registry::build(&saved.kind, &saved.config, &saved.placement, &info, device, 0)?;
    let weights = dir.join(WEIGHTS_FILE);
    fill_vars(adapter.as_ref(), read_tensors(&weights, device)?, &weights)?;
    Ok(Loaded { name: saved.name, adapter, placement: saved.placement, format: FORMAT })
}
