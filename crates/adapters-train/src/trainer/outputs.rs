//! What a run writes: the best checkpoint, the summary, the adapters and heads, and the
//! progress it shows.

use super::*;

impl Trainer {
    /// Early stopping: keeps the best trainable weights so far and counts evaluations
    /// without improvement.
    pub(super) fn track_best(&self, state: &mut State, dev: &BTreeMap<String, BTreeMap<String, f64>>, out: &std::path::Path) -> Result<()> {
        let Some(es) = &self.config.training.early_stopping else { return Ok(()) };
        let values: Vec<f64> = dev.values().filter_map(|m| m.get(es.metric.key()).copied()).collect();
        if values.is_empty() {
            return Ok(());
        }
        let value = values.iter().sum::<f64>() / values.len() as f64;
        let better = match &state.best {
            None => true,
            Some(b) if es.metric.higher_is_better() => value > b.value,
            Some(b) => value < b.value,
        };
        if better {
            state.best = Some(Best { value, step: state.step });
            state.evals_since_best = 0;
            checkpoint::save_best(out, &self.params_by_name())?;
        } else {
            state.evals_since_best += 1;
            if state.evals_since_best >= es.patience {
                eprintln!(
                    "early stopping at step {}: dev {} has not improved for {} evaluations",
                    state.step,
                    es.metric.key(),
                    es.patience
                );
                state.stopped_early = true;
            }
        }
        Ok(())
    }

    pub(super) fn summary(&self, state: &State, seconds: f64, finished: bool) -> Summary {
        let trainable = self.trainable_parameters();
        Summary {
            mode: self.config.training.mode,
            steps: state.step,
            finished,
            seconds,
            trainable_parameters: trainable,
            base_parameters: self.base_parameters,
            trainable_share: trainable as f64 / self.base_parameters as f64,
            tasks: self
                .tasks
                .iter()
                .map(|t| {
                    let at_start = |m: &BTreeMap<String, BTreeMap<String, f64>>| m.get(&t.name).cloned().unwrap_or_default();
                    let result = TaskResult {
                        dev: BTreeMap::new(),
                        test: BTreeMap::new(),
                        dev_at_start: at_start(&state.dev_at_start),
                        test_at_start: at_start(&state.test_at_start),
                    };
                    (t.name.clone(), result)
                })
                .collect(),
            best_step: state.best.as_ref().map(|b| b.step),
            stopped_early: state.stopped_early,
            output: self.config.output.dir.clone(),
            routing: None,
            aux_losses: BTreeMap::new(),
        }
    }

    /// Writes the trained adapters and heads where `adapters predict` finds them (see
    /// [`crate::heads`]), in full mode the whole fine-tuned model: each folder with the
    /// heads and setup that live in it is replaced as a whole ([`replace_dir`]), so a
    /// crash leaves the previous outputs or the new ones.
    pub(super) fn save_outputs(&self) -> Result<()> {
        let out = &self.config.output.dir;
        let backbone = &self.model.backbone;
        let mode = self.config.training.mode;
        let model_dir = out.join("model");
        // Where each task's head (and setup) lives: the model, its top adapter, or the run.
        let mut homes: BTreeMap<PathBuf, Vec<(&Task, HeadConfig)>> = BTreeMap::new();
        for (task, task_config) in self.tasks.iter().zip(&self.config.task) {
            if task.head.is_none() {
                continue;
            }
            let top = match &task.setup {
                Some(setup) => setup.fusion_names().pop().or_else(|| setup.adapter_names().pop()),
                None => task.stack.last().cloned(),
            };
            let home = match (mode, top) {
                (Mode::Full, _) => model_dir.clone(),
                (_, Some(top)) => out.join("adapters").join(top),
                (_, None) => out.clone(),
            };
            let head_name = task_config.head_name();
            let shape = task.head.as_ref().expect("tasks with heads only").shape();
            let config = HeadConfig {
                task: head_name.to_string(),
                kind: "classification".into(),
                labels: task.data.labels.clone(),
                pooling: task.pooling,
                hidden_size: backbone.hidden_size(),
                adapters: task.stack.clone(),
                label_map: self.config.tasks_of_head(head_name).flat_map(|t| t.label_map.clone().unwrap_or_default()).collect(),
                layers: shape.layers,
                activation: shape.activation,
                bias: shape.bias,
            };
            homes.entry(home).or_default().push((task, config));
        }
        let write_heads = |home: &Path, dir: &Path| -> Result<()> {
            for (task, config) in homes.get(home).into_iter().flatten() {
                if let Some(setup) = &task.setup {
                    setup.save(dir)?;
                }
                saved_heads::save(dir, config, task.head.as_ref().expect("tasks with heads only"))?;
            }
            Ok(())
        };
        let mut written = BTreeSet::new();
        if mode == Mode::Full {
            replace_dir(&model_dir, "outputs", |tmp| {
                self.model.save_folder(tmp)?;
                write_heads(&model_dir, tmp)
            })?;
            written.insert(model_dir.clone());
        }
        let fingerprint = backbone.fingerprint()?;
        for (name, entry) in &self.config.adapters {
            if mode == Mode::HeadOnly || entry.from.is_some() {
                continue; // nothing trained, or trained earlier and frozen: its folder is where `from` says
            }
            let adapter = backbone.adapters().get(name).expect("added in new()");
            let dir = out.join("adapters").join(name);
            let placement = self.started_placements.get(name).unwrap_or(&entry.placement);
            replace_dir(&dir, "outputs", |tmp| {
                io::save(tmp, name, adapter.as_ref(), placement, &fingerprint)?;
                write_heads(&dir, tmp)
            })?;
            written.insert(dir);
        }
        // Heads beside no trained folder (head-only runs, a frozen adapter on top).
        for home in homes.keys().filter(|h| !written.contains(*h)) {
            write_heads(home, home)?;
        }
        Ok(())
    }
}

pub(super) fn progress_bar(total: usize, done: usize, draw: bool) -> ProgressBar {
    if !draw {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]").expect("valid template"),
    );
    bar.set_position(done as u64);
    bar
}

/// Throughput over the last few steps.
#[derive(Default)]
pub(super) struct Throughput {
    recent: std::collections::VecDeque<(usize, usize, f64)>,
}

impl Throughput {
    pub(super) fn add(&mut self, examples: usize, tokens: usize, seconds: f64) {
        self.recent.push_back((examples, tokens, seconds));
        if self.recent.len() > 20 {
            self.recent.pop_front();
        }
    }

    fn seconds(&self) -> f64 {
        self.recent.iter().map(|r| r.2).sum::<f64>().max(1e-9)
    }

    pub(super) fn examples_per_s(&self) -> f64 {
        self.recent.iter().map(|r| r.0).sum::<usize>() as f64 / self.seconds()
    }

    pub(super) fn tokens_per_s(&self) -> f64 {
        self.recent.iter().map(|r| r.1).sum::<usize>() as f64 / self.seconds()
    }
}
