//! Adapter folders: create (`new`), describe (`inspect`), merge into the base (`merge`).

use crate::commands::{missing_family, open, open_with, AdapterArgs};
use adapters_core::durable;
use adapters_core::io::{self, read_json, read_tensors, CONFIG_FILE};
use adapters_core::{registry, Adapter, InsertionPoint, Placement};
use adapters_models::head_interop;
use adapters_models::heads::ClassificationHead;
use adapters_models::saved_heads::{self, HeadConfig};
use adapters_models::{HoldsAdapters, LoadedModel};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Our own layout (adapter_config.json + adapter_model.safetensors).
    Native,
    /// PEFT's LoRA layout.
    Peft,
    /// AdapterHub's layout (bottleneck adapters, fusion layers).
    Adapterhub,
}

/// Parses `--set` values: JSON where it parses, else a plain string.
fn parse_value(raw: &str) -> serde_json::Value {
    serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_string()))
}

/// Splits `--set` pairs into the kind's config and the placement.
fn config_and_placement(sets: &[String]) -> Result<(serde_json::Value, Placement)> {
    let mut config = serde_json::Map::new();
    let mut placement = serde_json::Map::new();
    let mut sizes = serde_json::Map::new();
    for s in sets {
        let (key, value) = s.split_once('=').with_context(|| format!("--set {s:?}: expected KEY=VALUE, e.g. --set r=4"))?;
        let value = parse_value(value);
        match key.strip_prefix("placement.") {
            Some(p) => match p.strip_prefix("sizes.") {
                Some(layer) => {
                    sizes.insert(layer.to_string(), value);
                }
                None => {
                    placement.insert(p.to_string(), value);
                }
            },
            None => {
                config.insert(key.to_string(), value);
            }
        }
    }
    if !sizes.is_empty() {
        placement.insert("sizes".into(), serde_json::Value::Object(sizes));
    }
    let placement: Placement = serde_json::from_value(serde_json::Value::Object(placement))
        .context("bad placement in --set placement.*: fields are layers, leave_out, sites, sizes.N")?;
    Ok((serde_json::Value::Object(config), placement))
}

pub fn check_empty_target(out: &Path) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} exists and is not empty; choose a new folder (nothing was written)", out.display());
    }
    Ok(())
}

pub fn new(kind: &str, model: &Path, out: &Path, sets: &[String], name: Option<String>, seed: u64, format: Format) -> Result<()> {
    check_empty_target(out)?;
    let (config, placement) = config_and_placement(sets)?;
    let loaded = open(model)?;
    let info = loaded.backbone.model_info();
    let adapter = registry::build(kind, &config, &placement, &info, loaded.backbone.device(), seed)?;
    let name = name.unwrap_or_else(|| out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| kind.into()));
    write_into(out, |tmp| write_as(format, tmp, &name, adapter.as_ref(), &placement, &loaded, model))?;
    let params = adapter.num_parameters();
    println!(
        "wrote {} ({kind} `{name}`, {} points, {params} trainable parameters, {:.3}% of the base's {})",
        out.display(),
        adapter.points().len(),
        100.0 * params as f64 / loaded.backbone.num_parameters() as f64,
        loaded.backbone.num_parameters()
    );
    Ok(())
}

/// Writes an adapter in one of the layouts (AdapterHub's: bottleneck kinds and fusion).
pub fn write_as(
    format: Format,
    out: &Path,
    name: &str,
    adapter: &dyn Adapter,
    placement: &Placement,
    loaded: &LoadedModel,
    model: &Path,
) -> Result<()> {
    let info = loaded.backbone.model_info();
    match format {
        Format::Native => io::save(out, name, adapter, placement, &loaded.backbone.fingerprint()?)?,
        #[cfg(feature = "lora")]
        Format::Peft => adapters_lora::peft::save(out, adapter, &info, &model.to_string_lossy())?,
        #[cfg(feature = "fusion")]
        Format::Adapterhub if adapter.kind() == adapters_fusion::KIND => adapters_fusion::adapterhub::save(out, adapter, &info)?,
        #[cfg(feature = "bottleneck")]
        Format::Adapterhub => adapters_bottleneck::adapterhub::save(out, name, adapter, placement, &info)?,
        #[allow(unreachable_patterns)]
        _ => {
            let _ = (&info, model, name, placement);
            let feature = if format == Format::Peft { "lora" } else { "bottleneck" };
            return Err(missing_family(feature, &format!("writing the {format:?} format")));
        }
    }
    Ok(())
}

/// Which classification heads `convert` carries over.
pub enum HeadChoice {
    /// Every head the folder has.
    All,
    /// The head of this task only.
    Task(String),
    /// None.
    None,
}

/// Rewrites an adapter folder (any layout) in another layout, e.g. for Python users, with
/// its classification heads.
pub fn convert(dir: &Path, model: &Path, format: Format, out: &Path, heads: HeadChoice) -> Result<()> {
    check_empty_target(out)?;
    let loaded = open(model)?;
    let adapter = io::load(dir, &loaded.backbone, loaded.backbone.device()).with_context(|| format!("reading {}", dir.display()))?;
    let mut saved = match heads {
        HeadChoice::None => Vec::new(),
        _ => saved_heads::load_all(dir, &loaded.backbone).with_context(|| format!("reading the heads of {}", dir.display()))?,
    };
    if let HeadChoice::Task(task) = &heads {
        let names: Vec<String> = saved.iter().map(|h| h.config.task.clone()).collect();
        saved.retain(|h| &h.config.task == task);
        if saved.is_empty() {
            bail!(
                "--head {task}: {} has no head of that task (it has: {})",
                dir.display(),
                if names.is_empty() { "none".into() } else { names.join(", ") }
            );
        }
    }
    let heads: Vec<(HeadConfig, ClassificationHead)> = saved.into_iter().map(|h| (h.config, h.head)).collect();
    write_into(out, |tmp| {
        write_as(format, tmp, &adapter.name, adapter.adapter.as_ref(), &adapter.placement, &loaded, model)?;
        write_heads(format, tmp, &heads, &loaded, model)
    })?;
    let with_heads = if heads.is_empty() {
        String::new()
    } else {
        format!(", heads: {}", heads.iter().map(|(c, _)| c.task.as_str()).collect::<Vec<_>>().join(", "))
    };
    println!("wrote {} ({} `{}` from {} as {format:?}{with_heads})", out.display(), adapter.adapter.kind(), adapter.name, adapter.format);
    if let Some(python) = python_loader(format, adapter.adapter.kind(), out, model, heads.first().map(|(c, _)| c)) {
        println!("{python}");
    }
    Ok(())
}

/// Writes classification heads into the adapter folder `dir` in `format`'s layout (see
/// [`adapters_models::head_interop`]): ours keeps any number, AdapterHub's and PEFT's one.
pub fn write_heads(
    format: Format,
    dir: &Path,
    heads: &[(HeadConfig, ClassificationHead)],
    loaded: &LoadedModel,
    model: &Path,
) -> Result<()> {
    if format == Format::Native {
        for (config, head) in heads {
            saved_heads::save(dir, config, head)?;
        }
        return Ok(());
    }
    let [(config, head)] = heads else {
        if heads.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = heads.iter().map(|(c, _)| c.task.as_str()).collect();
        bail!(
            "the folder has {} heads ({}); a {format:?} folder holds one: choose it with --head TASK, or leave them out with --no-heads",
            heads.len(),
            names.join(", ")
        );
    };
    match format {
        Format::Adapterhub => head_interop::write_adapterhub(dir, config, head, &loaded.backbone, &model.to_string_lossy())?,
        Format::Peft => head_interop::write_peft(dir, config, head, &loaded.backbone)?,
        Format::Native => unreachable!("written above"),
    }
    Ok(())
}

/// How a Python user loads a converted folder into a transformers `model`: the folders
/// hold safetensors only, which AdapterHub reads when asked (`use_safetensors=True`).
fn python_loader(format: Format, kind: &str, out: &Path, model: &Path, head: Option<&HeadConfig>) -> Option<String> {
    let out = out.display();
    let base = model.display();
    Some(match (format, head) {
        (Format::Native, _) => return None,
        (Format::Peft, None) => {
            format!("load it in Python (PEFT):\n  from peft import PeftModel\n  model = PeftModel.from_pretrained(model, \"{out}\")")
        }
        (Format::Peft, Some(head)) => {
            let labels: Vec<String> = head.labels.iter().enumerate().map(|(i, l)| format!("{i}: {l:?}")).collect();
            format!(
                "load it in Python (PEFT; the label names are not kept in PEFT folders, so pass them):\n  \
                 from peft import PeftModel\n  from transformers import AutoModelForSequenceClassification\n  \
                 model = AutoModelForSequenceClassification.from_pretrained(\"{base}\", num_labels={}, id2label={{{}}})\n  \
                 model = PeftModel.from_pretrained(model, \"{out}\")",
                head.labels.len(),
                labels.join(", ")
            )
        }
        (Format::Adapterhub, _) if kind == "fusion" => format!(
            "load it in Python (AdapterHub, after loading its member adapters):\n  import adapters; adapters.init(model)\n  \
             model.load_adapter_fusion(\"{out}\", use_safetensors=True)"
        ),
        (Format::Adapterhub, None) => {
            format!("load it in Python (AdapterHub):\n  import adapters; adapters.init(model)\n  model.load_adapter(\"{out}\", use_safetensors=True)")
        }
        (Format::Adapterhub, Some(_)) => format!(
            "load it in Python (AdapterHub, with its head):\n  from adapters import AutoAdapterModel\n  \
             model = AutoAdapterModel.from_pretrained(\"{base}\")\n  \
             model.set_active_adapters(model.load_adapter(\"{out}\", with_head=True, use_safetensors=True))"
        ),
    })
}

/// The weights file of an adapter folder, whichever layout it has.
fn weights_file(dir: &Path) -> Option<PathBuf> {
    // AdapterHub's bottleneck folders keep their weights in `adapter.safetensors`; both
    // libraries write PyTorch pickles by default.
    [io::WEIGHTS_FILE, "adapter.safetensors", "adapter_model.bin", "pytorch_adapter.bin"].iter().map(|f| dir.join(f)).find(|p| p.exists())
}

pub fn inspect(dir: &Path, model: Option<&Path>) -> Result<()> {
    let config = read_json(&dir.join(CONFIG_FILE))?;
    let weights = weights_file(dir)
        .with_context(|| format!("{} has no adapter weights (adapter_model.safetensors, adapter.safetensors or a .bin)", dir.display()))?;
    let tensors = read_tensors(&weights, &Device::Cpu)?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let format = if config.get("format").and_then(|f| f.as_str()) == Some(io::FORMAT) {
        "adapters-rs"
    } else if config.get("peft_type").is_some() {
        "peft"
    } else if config.get("config").is_some() {
        "adapterhub"
    } else {
        "unknown"
    };
    println!("folder        {}", dir.display());
    println!("format        {format}");
    match format {
        "adapters-rs" => {
            println!("name          {}", config["name"].as_str().unwrap_or(""));
            println!("kind          {}", config["kind"].as_str().unwrap_or(""));
            println!("config        {}", config["config"]);
            println!("placement     {}", config["placement"]);
            println!(
                "made for      {}",
                serde_json::from_value::<adapters_core::Fingerprint>(config["base_model"].clone())
                    .map(|f| f.to_string())
                    .unwrap_or_default()
            );
            println!("library       {}", config["library_version"].as_str().unwrap_or(""));
        }
        "peft" => {
            println!(
                "kind          {} (r {}, alpha {}, targets {})",
                config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]
            );
            println!("made for      {}", config["base_model_name_or_path"]);
        }
        "adapterhub" => {
            println!("name          {}", config["name"].as_str().unwrap_or(""));
            println!(
                "config        reduction_factor {}, non_linearity {}, parallel {}",
                config["config"]["reduction_factor"], config["config"]["non_linearity"], config["config"]["is_parallel"]
            );
            println!("made for      {} ({})", config["model_type"], config["model_name"]);
        }
        _ => {}
    }
    println!("tensors       {} in {}", tensors.len(), weights.file_name().unwrap_or_default().to_string_lossy());
    println!("parameters    {params}");
    if let Some(model) = model {
        let loaded = open(model)?;
        println!("model         {} = {}", model.display(), loaded.backbone.fingerprint()?);
        match io::load(dir, &loaded.backbone, &Device::Cpu) {
            Ok(a) => {
                let base = loaded.backbone.num_parameters();
                println!("fits model    yes: {} `{}` at {} points", a.adapter.kind(), a.name, a.adapter.points().len());
                println!("share         {:.3}% of the base's {base} parameters", 100.0 * a.adapter.num_parameters() as f64 / base as f64);
            }
            Err(e) => println!("fits model    no: {e}"),
        }
    }
    Ok(())
}

pub fn merge(model: &Path, adapters: &AdapterArgs, out: &Path) -> Result<()> {
    check_empty_target(out)?;
    let mut loaded = open_with(model, adapters)?;
    let names: Vec<String> = loaded.backbone.adapters().active();
    for name in &names {
        loaded.backbone.merge(name)?;
    }
    write_into(out, |tmp| Ok(loaded.save_folder(tmp)?))?;
    println!("merged {} into {} and wrote {}", names.join(", "), model.display(), out.display());
    Ok(())
}

/// Averages the experts of a mixture folder into one plain adapter folder (heads copied).
#[cfg(not(feature = "moe"))]
pub fn merge_experts(dir: &Path, _model: &Path, _out: &Path) -> Result<()> {
    Err(missing_family("moe", &format!("averaging the experts of {}", dir.display())))
}

/// Averages the experts of a mixture folder into one plain adapter folder (heads copied).
#[cfg(feature = "moe")]
pub fn merge_experts(dir: &Path, model: &Path, out: &Path) -> Result<()> {
    check_empty_target(out)?;
    let loaded = open(model)?;
    let averaged = adapters_moe::merge::average_folder(dir, &loaded.backbone, loaded.backbone.device())
        .with_context(|| format!("reading the mixture {}", dir.display()))?;
    write_plain(out, &averaged.name, averaged.adapter.as_ref(), &averaged.placement, &loaded, dir)?;
    println!(
        "wrote {} (`{}`: the {} experts' mean as a `{}` adapter, {} parameters)",
        out.display(),
        averaged.name,
        averaged.from_kind,
        averaged.adapter.kind(),
        averaged.adapter.num_parameters()
    );
    Ok(())
}

#[cfg(not(feature = "hyper"))]
pub fn hyper_export(dir: &Path, _model: &Path, _task: &str, _out: &Path) -> Result<()> {
    Err(missing_family("hyper", &format!("exporting an adapter from the hypernetwork {}", dir.display())))
}

#[cfg(feature = "hyper")]
pub fn hyper_export(dir: &Path, model: &Path, task: &str, out: &Path) -> Result<()> {
    check_empty_target(out)?;
    let loaded = open(model)?;
    let mixture = crate::train_commands::parse_mixture(task)?;
    let exported = adapters_hyper::export::export_folder(dir, &loaded.backbone, &mixture, loaded.backbone.device())
        .with_context(|| format!("generating the adapter of {task:?} from {}", dir.display()))?;
    write_plain(out, &exported.name, exported.adapter.as_ref(), &exported.placement, &loaded, dir)?;
    println!(
        "wrote {} (`{}`: the `{}` adapter the hypernetwork generates for {task}, {} parameters)",
        out.display(),
        exported.name,
        exported.adapter.kind(),
        exported.adapter.num_parameters()
    );
    Ok(())
}

/// Writes a plain adapter made from the folder `from` (with `from`'s heads) to `out`.
#[cfg_attr(not(any(feature = "moe", feature = "hyper")), allow(dead_code))]
fn write_plain(out: &Path, name: &str, adapter: &dyn Adapter, placement: &Placement, loaded: &LoadedModel, from: &Path) -> Result<()> {
    write_into(out, |tmp| {
        io::save(tmp, name, adapter, placement, &loaded.backbone.fingerprint()?)?;
        copy_dir(&from.join(adapters_models::saved_heads::HEADS_DIR), &tmp.join(adapters_models::saved_heads::HEADS_DIR))
    })
}

/// Fills a temporary folder next to `out` with `fill`, flushes it and renames it to `out`
/// (which must be missing or empty): a failure or a crash at any moment leaves no
/// half-written `out` (fault points `folder.*`, see [`adapters_core::durable`]).
pub fn write_into(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = out.with_file_name(format!(".{}.partial", out.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&tmp)?;
        durable::sync_tree(&tmp, "folder").with_context(|| format!("flushing {}", tmp.display()))?;
        if out.exists() {
            std::fs::remove_dir(out).with_context(|| format!("replacing the empty folder {}", out.display()))?;
        }
        durable::rename(&tmp, out, "folder").with_context(|| format!("moving {} to {}", tmp.display(), out.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Copies a folder tree (nothing when `from` does not exist).
#[cfg_attr(not(any(feature = "moe", feature = "hyper")), allow(dead_code))]
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        io::copy_dir(from, to)?;
    }
    Ok(())
}

/// The arguments of `adapters new`.
#[derive(clap::Args)]
pub struct NewArgs {
    /// The adapter kind (see `adapters kinds`).
    pub kind: String,
    /// The base model the adapter is made for.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// The folder to write (must not exist yet, or be empty).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// A config field (`r=4`, `non_linearity=gelu`) or placement rule
    /// (`placement.layers=[0,1]`, `placement.layers={"top":2}`, `placement.leave_out=[0]`,
    /// `placement.sites=["query","value"]`, `placement.sizes.5=16`). Values are JSON;
    /// bare words are strings. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The name recorded in the adapter (default: the folder name).
    #[arg(long)]
    pub name: Option<String>,
    /// Seed for the initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// File layout: ours, `peft` (LoRA) or `adapterhub` (bottleneck kinds).
    #[arg(long, value_enum, default_value_t = crate::adapter_commands::Format::Native)]
    pub format: crate::adapter_commands::Format,
}

/// The arguments of `adapters convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The adapter folder (any layout).
    pub dir: std::path::PathBuf,
    /// The base model it belongs to.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// The layout to write.
    #[arg(long, value_enum)]
    pub format: crate::adapter_commands::Format,
    /// The folder to write (must not exist yet, or be empty).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Carry only this task's classification head (AdapterHub and PEFT folders hold one).
    #[arg(long, value_name = "TASK", conflicts_with = "no_heads")]
    pub head: Option<String>,
    /// Leave the classification heads out (default: every head is carried over, in the
    /// target's layout, or the conversion is refused if that layout cannot compute it).
    #[arg(long)]
    pub no_heads: bool,
}

impl ConvertArgs {
    /// The heads asked for.
    pub fn heads(&self) -> HeadChoice {
        match (&self.head, self.no_heads) {
            (_, true) => HeadChoice::None,
            (Some(task), _) => HeadChoice::Task(task.clone()),
            (None, false) => HeadChoice::All,
        }
    }
}

/// The arguments of `adapters inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    pub dir: std::path::PathBuf,
    /// Check against this model and show the parameter share.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
}

/// The arguments of `adapters merge`.
#[derive(clap::Args)]
pub struct MergeArgs {
    pub model: std::path::PathBuf,
    /// LoRA adapter folders to merge, in order (repeatable).
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<std::path::PathBuf>,
    /// The folder to write the merged model to.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// The arguments of `adapters merge-experts`.
#[derive(clap::Args)]
pub struct MergeExpertsArgs {
    /// The mixture's adapter folder.
    pub dir: std::path::PathBuf,
    /// The base model it belongs to (checked).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// The folder to write (must not exist yet, or be empty).
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// The arguments of `adapters hyper-export`.
#[derive(clap::Args)]
pub struct HyperExportArgs {
    /// The hypernetwork's adapter folder.
    pub dir: std::path::PathBuf,
    /// The base model it belongs to (checked).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// A task name, or a mixture of tasks: 'vader_tweets:0.5,rotten_tomatoes:0.5'.
    #[arg(long)]
    pub task: String,
    /// The folder to write (must not exist yet, or be empty).
    #[arg(long)]
    pub out: std::path::PathBuf,
}
