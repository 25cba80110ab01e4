//! `adapters average`: several trained adapters of one kind combined into a new folder,
//! with the classification heads they all carry averaged by the same weights.

use crate::adapter_commands::{check_empty_target, write_as, write_heads, write_into, Format};
use crate::commands::open;
use adapters_core::merge::{self, Input, Options};
use adapters_core::{io, InsertionPoint};
use adapters_models::heads::ClassificationHead;
use adapters_models::saved_heads::{self, SavedHead};
use adapters_models::Backbone;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// What `adapters average` was asked for.
pub struct Request<'a> {
    pub model: &'a Path,
    pub dirs: &'a [PathBuf],
    /// `--weights` as given (comma-separated), or equal weights summing to 1.
    pub weights: Option<&'a str>,
    pub method: &'a str,
    pub options: Options,
    pub format: Format,
    pub name: Option<String>,
    pub out: &'a Path,
}

pub fn average(request: Request) -> Result<()> {
    let Request { model, dirs, weights, method, options, format, name, out } = request;
    check_empty_target(out)?;
    let weights = parse_weights(weights, dirs.len())?;
    let loaded_model = open(model)?;
    let device = loaded_model.backbone.device();
    let loaded: Vec<io::Loaded> = dirs
        .iter()
        .map(|d| io::load(d, &loaded_model.backbone, device).with_context(|| format!("reading {}", d.display())))
        .collect::<Result<_>>()?;
    let inputs: Vec<Input> =
        loaded.iter().zip(&weights).map(|(l, w)| Input { adapter: l.adapter.as_ref(), placement: &l.placement, weight: *w }).collect();
    let info = loaded_model.backbone.model_info();
    let combined = merge::combine(method, &inputs, &options, &info, device).with_context(|| {
        let named: Vec<String> = dirs.iter().enumerate().map(|(i, d)| format!("{} = {}", i + 1, d.display())).collect();
        format!("combining the adapters ({})", named.join(", "))
    })?;
    let (heads, left_out) = average_heads(dirs, &weights, &loaded_model.backbone)?;
    let name = name.unwrap_or_else(|| out.file_name().map_or_else(|| "averaged".into(), |n| n.to_string_lossy().into_owned()));
    write_into(out, |tmp| {
        write_as(format, tmp, &name, combined.adapter.as_ref(), &combined.placement, &loaded_model, model)?;
        write_heads(format, tmp, &heads, &loaded_model, model)
    })?;
    let weights_text: Vec<String> = weights.iter().map(|w| format!("{w}")).collect();
    println!(
        "wrote {} (`{name}`: {method} of {} `{}` adapters, weights {}; {} parameters)",
        out.display(),
        dirs.len(),
        combined.adapter.kind(),
        weights_text.join(", "),
        combined.adapter.num_parameters()
    );
    if !heads.is_empty() {
        println!("heads averaged with the same weights: {}", heads.iter().map(|(c, _)| c.task.as_str()).collect::<Vec<_>>().join(", "));
    }
    if !left_out.is_empty() {
        println!("heads left out (not in every folder with the same labels): {}", left_out.join(", "));
    }
    Ok(())
}

/// `0.5,0.5` → one weight per adapter; none given: 1/n each.
fn parse_weights(text: Option<&str>, n: usize) -> Result<Vec<f64>> {
    let Some(text) = text else { return Ok(vec![1.0 / n as f64; n]) };
    let weights: Vec<f64> = text
        .split(',')
        .map(|w| w.trim().parse::<f64>().with_context(|| format!("--weights {text:?}: `{w}` is not a number")))
        .collect::<Result<_>>()?;
    if weights.len() != n {
        bail!("--weights {text:?} gives {} weights for {n} adapters; give one per --adapter, in order", weights.len());
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        bail!("--weights {text:?}: {w} is not a finite number");
    }
    Ok(weights)
}

/// A head's configuration and its averaged weights.
type AveragedHead = (saved_heads::HeadConfig, ClassificationHead);

/// The heads every folder carries for the same task with the same labels, pooling and
/// layers, averaged; the names of the others.
fn average_heads(dirs: &[PathBuf], weights: &[f64], model: &Backbone) -> Result<(Vec<AveragedHead>, Vec<String>)> {
    let per_folder: Vec<Vec<SavedHead>> = dirs.iter().map(|d| saved_heads::load_all(d, model)).collect::<Result<_, _>>()?;
    let mut averaged = Vec::new();
    let mut left_out = std::collections::BTreeSet::new();
    for head in &per_folder[0] {
        let c = &head.config;
        let matching: Vec<&SavedHead> = per_folder
            .iter()
            .filter_map(|hs| {
                hs.iter().find(|h| {
                    h.config.task == c.task
                        && h.config.labels == c.labels
                        && h.config.pooling == c.pooling
                        && h.head.shape() == head.head.shape()
                })
            })
            .collect();
        if matching.len() != dirs.len() {
            left_out.insert(c.task.clone());
            continue;
        }
        // Every variable of the (shared) shape, weighted.
        let first = &head.head;
        let mut values = std::collections::HashMap::new();
        for (name, _) in first.vars() {
            let mut total: Option<Tensor> = None;
            for (h, w) in matching.iter().zip(weights) {
                let var = h.head.vars().into_iter().find(|(n, _)| *n == name).expect("same shape").1;
                let term = (var.as_tensor() * *w)?;
                total = Some(match total {
                    Some(t) => (t + term)?,
                    None => term,
                });
            }
            values.insert(name, total.expect("one folder at least"));
        }
        let shape = first.shape();
        averaged.push((
            c.clone(),
            ClassificationHead::from_tensors(values, &shape, c.hidden_size, c.labels.len()).map_err(anyhow::Error::msg)?,
        ));
    }
    for hs in &per_folder[1..] {
        left_out.extend(hs.iter().filter(|h| !averaged.iter().any(|(c, _)| c.task == h.config.task)).map(|h| h.config.task.clone()));
    }
    Ok((averaged, left_out.into_iter().collect()))
}

/// The arguments of `adapters average`.
#[derive(clap::Args)]
pub struct AverageArgs {
    /// The base model the adapters belong to (checked).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// An adapter folder to combine (repeatable; ours, PEFT or AdapterHub), all of one kind.
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<std::path::PathBuf>,
    /// One weight per --adapter, comma-separated, e.g. 0.7,0.3 or 1,-0.5 (default:
    /// equal weights that sum to 1).
    #[arg(long, allow_hyphen_values = true)]
    pub weights: Option<String>,
    /// How to combine (see above).
    #[arg(long, default_value = "linear")]
    pub method: String,
    /// The share of each input's entries that TIES, DARE and magnitude pruning keep, in [0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// The rank of an SVD result (default: the inputs' largest).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Clamp an SVD result's factors at this quantile of their entries, in (0, 1].
    #[arg(long)]
    pub clamp: Option<f64>,
    /// TIES's sign election: the sign of the sum (`total`) or the most common (`frequency`).
    #[arg(long, default_value = "total", value_parser = ["total", "frequency"])]
    pub majority_sign: String,
    /// Seed of DARE's random masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The layout to write.
    #[arg(long, value_enum, default_value = "native")]
    pub format: crate::adapter_commands::Format,
    /// The new adapter's name (default: the folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// The folder to write (must not exist yet, or be empty).
    #[arg(long)]
    pub out: std::path::PathBuf,
}
