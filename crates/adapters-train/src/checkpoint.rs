//! Checkpoints: the trainable weights, the optimizer state and the loop state, written
//! into a temporary folder and swapped into place ([`replace_dir`]) so a crash never
//! leaves half a checkpoint. Resuming restores all three; with the per-step seeds (data order, task
//! choice, dropout) the resumed run computes exactly what an uninterrupted one would.

use crate::config::Config;
use crate::error::{fail, Error, Result, Within};
use crate::optim::AdamW;
use adapters_core::durable::{recover_dir, replace_dir};
use adapters_core::io::{read_tensors, save_tensors_atomic, write_atomic};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CHECKPOINT_DIR: &str = "checkpoint";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const BEST: &str = "best.safetensors";

/// Where a task's data order stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: usize,
    pub pos: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub value: f64,
    pub step: usize,
}

/// The training loop's state besides weights and optimizer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub step: usize,
    pub cursors: Vec<Cursor>,
    pub best: Option<Best>,
    pub evals_since_best: usize,
    pub stopped_early: bool,
    pub dev_at_start: BTreeMap<String, BTreeMap<String, f64>>,
    pub test_at_start: BTreeMap<String, BTreeMap<String, f64>>,
    /// The run's config (without the output folder), to refuse resuming a different run.
    pub config: serde_json::Value,
}

impl State {
    pub fn new(tasks: usize, config: &Config) -> Self {
        State {
            step: 0,
            cursors: vec![Cursor::default(); tasks],
            best: None,
            evals_since_best: 0,
            stopped_early: false,
            dev_at_start: BTreeMap::new(),
            test_at_start: BTreeMap::new(),
            config: comparable(config),
        }
    }
}

fn comparable(config: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(config).expect("configs serialise");
    v.as_object_mut().expect("an object").remove("output");
    v
}

/// Whether `out` holds a checkpoint (after finishing a swap a crash interrupted).
pub fn exists(out: &Path) -> Result<bool> {
    let dir = out.join(CHECKPOINT_DIR);
    recover_dir(&dir).within(|| format!("recovering {}", dir.display()))?;
    Ok(dir.join(STATE).exists())
}

fn tensors(params: &[(String, Var)]) -> HashMap<String, Tensor> {
    params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}

pub fn save(out: &Path, state: &State, optimizer: &AdamW, params: &[(String, Var)]) -> Result<()> {
    replace_dir(&out.join(CHECKPOINT_DIR), "checkpoint", |tmp| {
        save_tensors_atomic(&tensors(params), &tmp.join(TRAINABLE))?;
        save_tensors_atomic(&optimizer.state()?, &tmp.join(OPTIMIZER))?;
        write_atomic(&tmp.join(STATE), serde_json::to_string_pretty(state)?.as_bytes())?;
        Ok(())
    })
}

/// Restores weights and optimizer from `out/checkpoint`; checks that it belongs to this
/// config and fits every variable before changing anything.
pub fn load(out: &Path, config: &Config, optimizer: &mut AdamW, params: &[(String, Var)]) -> Result<State> {
    let dir = out.join(CHECKPOINT_DIR);
    if !exists(out)? {
        fail!(Run, "{} has no checkpoint to resume; start without --resume", out.display());
    }
    let state_path = dir.join(STATE);
    let state: State =
        serde_json::from_slice(&std::fs::read(&state_path)?).within(|| format!("{} is not a checkpoint state", state_path.display()))?;
    if state.config != comparable(config) {
        fail!(
            Run,
            "{} was written by a different config (model, adapters, tasks, training or stages changed); \
             resume with the config it was started with, or start a new `output.dir`",
            dir.display()
        );
    }
    let weights = read_tensors(&dir.join(TRAINABLE), &candle_core::Device::Cpu)?;
    let pairs = fit(params, weights, &dir.join(TRAINABLE))?;
    optimizer
        .load_state(read_tensors(&dir.join(OPTIMIZER), &candle_core::Device::Cpu)?)
        .within(|| format!("reading {}", dir.join(OPTIMIZER).display()))?;
    for (var, t) in pairs {
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(state)
}

fn fit(params: &[(String, Var)], mut weights: HashMap<String, Tensor>, file: &Path) -> Result<Vec<(Var, Tensor)>> {
    params
        .iter()
        .map(|(name, var)| {
            let t = weights.remove(name).ok_or_else(|| Error::file(file, format!("`{name}` is missing")))?;
            if t.dims() != var.dims() {
                fail!(Run, "{}: `{name}` has shape {:?}, expected {:?}", file.display(), t.dims(), var.dims());
            }
            Ok((var.clone(), t))
        })
        .collect()
}

/// Keeps the best weights so far (early stopping) beside the checkpoint.
pub fn save_best(out: &Path, params: &[(String, Var)]) -> Result<()> {
    Ok(save_tensors_atomic(&tensors(params), &out.join(BEST))?)
}

/// Puts the best weights back before the final evaluation and save.
pub fn restore_best(out: &Path, params: &[(String, Var)]) -> Result<()> {
    let path = out.join(BEST);
    for (var, t) in fit(params, read_tensors(&path, &candle_core::Device::Cpu)?, &path)? {
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}
