//! The training loop: builds the model, adapters (through the registry) and heads from a
//! [`Config`], trains the parameter groups the mode and stages allow, evaluates, stops
//! early, checkpoints, resumes, and writes the trained adapters, heads and reports.

use crate::adversarial::{self, LabelledLogits};
use crate::checkpoint::{self, Best, Cursor, State};
use crate::config::{AdapterEntry, Config, Metric, Mode, Pooling, ScheduleKind, TaskType};
use crate::error::{fail, Result, Within};
use crate::forward::{argmax, lm_loss, lm_loss_of, loss_and_grads, StepReports};
use crate::fusion_report::{self, AttentionSums};
use crate::metrics::{accuracy, macro_f1, MetricsLog};
use crate::optim::{clip_grad_norm, AdamW, Decay, Schedule};
use crate::records::{RoutingReport, StepRecord, Summary, TaskResult, METRICS_FILE, SUMMARY_FILE};
use crate::report;
use crate::routing_report::{self, RoutingSums};
use crate::task::{self, epoch_batches, mix, salt, sorted_batches, Split, TaskData};
use adapters_core::durable::replace_dir;
use adapters_core::{io, registry, ForwardCtx, InsertionPoint, Layers, Placement, Setup};
use adapters_models::heads::ClassificationHead;
use adapters_models::heads::{pad, pool, pooled};
use adapters_models::saved_heads::{self, HeadConfig};
use adapters_models::HoldsAdapters;
use adapters_models::LoadedModel;
use candle_core::{Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod evaluation;
mod outputs;
mod sampling;
mod step;
use evaluation::print_eval;
use outputs::{progress_bar, Throughput};

/// How to run: fresh or resumed, and optionally stop early (to train in slices).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from the checkpoint in the output folder.
    pub resume: bool,
    /// Stop (after writing a checkpoint) once this many steps are done in total.
    pub stop_after: Option<usize>,
    /// Draw a progress bar (otherwise a plain line every tenth of the run).
    pub progress: bool,
}

/// Pooled features of every row, computed once when the base is frozen and has no
/// adapters (head-only mode): the backbone then never runs during training.
struct Features {
    train: Tensor,
    dev: Option<Tensor>,
    test: Option<Tensor>,
}

struct Task {
    name: String,
    kind: TaskType,
    data: TaskData,
    stack: Vec<String>,
    /// The task's composition, when it gives one (else its stack is activated).
    setup: Option<Setup>,
    pooling: Pooling,
    head: Option<ClassificationHead>,
    features: Option<Features>,
}

/// What an evaluation records besides its metrics: fusion attention and routing.
#[derive(Default)]
struct Recording {
    attention: AttentionSums,
    routing: RoutingSums,
}

/// One trainable variable and the parameter groups it belongs to.
struct Param {
    name: String,
    var: Var,
    groups: Vec<String>,
}

/// The held-out split an evaluation reads.
#[derive(Clone, Copy)]
enum EvalSplit {
    Dev,
    Test,
}

/// A training run: model, adapters, heads, data, optimizer; see [`Trainer::run`].
pub struct Trainer {
    config: Config,
    model: LoadedModel,
    tasks: Vec<Task>,
    params: Vec<Param>,
    base_parameters: usize,
    optimizer: AdamW,
    schedule: Schedule,
    eval_every: usize,
    checkpoint_every: usize,
    /// Where adapters started from a folder (`init_from`) sit, for saving them.
    started_placements: BTreeMap<String, Placement>,
}

impl Trainer {
    /// Loads the model and data and builds adapters and heads; checks everything before
    /// any training starts. Adapter folders (`from`, `init_from`) must exist.
    pub fn new(config: Config, device: &Device) -> Result<Self> {
        Self::with_references(config, device, &|_| Ok(None))
    }

    /// [`Trainer::new`], with `resolve` turning an adapter reference that is not a folder
    /// (`NAME@TAG` in an adapter library) into one: the CLI passes the store's resolver, so
    /// the trainer itself knows no store.
    pub fn with_references(config: Config, device: &Device, resolve: ResolveReference) -> Result<Self> {
        let mut model = adapters_models::load_with(&config.model.path, device, config.model.base_weights)
            .within(|| format!("`model.path` = {}", config.model.path.display()))?;
        // Training never decodes: drop the decoders' 8-bit decoding copies (a quarter of
        // the f32 projections' memory).
        if let adapters_models::Backbone::Llama(m) = &mut model.backbone {
            m.dequantize();
            adapters_kernels::release_free_memory();
        }
        let base_parameters = model.backbone.num_parameters();
        let seed = config.training.seed;
        let mode = config.training.mode;
        let mut params = Vec::new();
        if mode == Mode::Full {
            for (name, var) in model.backbone.make_trainable()? {
                params.push(Param { name: format!("base.{name}"), var, groups: vec!["base".into()] });
            }
        }
        // Adapters started from a folder (`init_from`): the folder and its placement.
        let mut started: BTreeMap<String, (PathBuf, Placement)> = BTreeMap::new();
        if mode != Mode::HeadOnly {
            let info = model.backbone.model_info();
            // Trained folders first (frozen), then new adapters, fusion layers last: a
            // fusion's default placement is where its members sit.
            let mut entries: Vec<(usize, (&String, &AdapterEntry))> = config.adapters.iter().enumerate().collect();
            entries.sort_by_key(|(_, (_, e))| (e.from.is_none(), e.kind == FUSION));
            for (i, (name, entry)) in entries {
                if let Some(from) = &entry.from {
                    let from = &local_folder(from, resolve).within(|| format!("`adapters.{name}.from` = {}", from.display()))?;
                    let loaded =
                        io::load(from, &model.backbone, device).within(|| format!("`adapters.{name}.from` = {}", from.display()))?;
                    model.backbone.adapters_mut().add(name, loaded.adapter)?;
                    model.backbone.adapters_mut().set_frozen(name, true)?;
                    continue;
                }
                if let Some(init) = &entry.init_from {
                    let where_ = || format!("`adapters.{name}.init_from` = {}", init.display());
                    let folder = local_folder(init, resolve).within(where_)?;
                    let loaded = io::load(&folder, &model.backbone, device).within(where_)?;
                    add_trainable(&mut params, name, loaded.adapter.as_ref());
                    model.backbone.adapters_mut().add(name, loaded.adapter)?;
                    started.insert(name.clone(), (folder, loaded.placement));
                    continue;
                }
                let placement = match entry.kind.as_str() {
                    FUSION if entry.placement == Placement::default() => {
                        members_placement(&model, entry).within(|| format!("`adapters.{name}.members`"))?
                    }
                    _ => entry.placement.clone(),
                };
                let adapter_config = with_task_names(&entry.kind, entry.config_json(), &config).within(|| format!("`adapters.{name}`"))?;
                let adapter =
                    registry::build(&entry.kind, &adapter_config, &placement, &info, device, mix(&[seed, i as u64, salt::ADAPTER_INIT]))
                        .within(|| format!("`adapters.{name}`"))?;
                add_trainable(&mut params, name, adapter.as_ref());
                model.backbone.adapters_mut().add(name, adapter)?;
            }
        }
        let is_encoder = model.backbone.is_encoder();
        let hidden = model.backbone.hidden_size();
        let mut tasks: Vec<Task> = Vec::new();
        for (i, t) in config.task.iter().enumerate() {
            let data = task::load(t, &model.tokenizer, config.model.max_length, is_encoder).within(|| format!("task `{}`", t.name))?;
            if data.skipped > 0 {
                eprintln!("task `{}`: skipped {} bad rows", t.name, data.skipped);
            }
            let pooling = t.pooling.unwrap_or(if is_encoder { Pooling::Mean } else { Pooling::Last });
            let head_name = t.head_name();
            let shared = config.task[..i].iter().position(|o| o.head_name() == head_name).map(|j| &tasks[j]);
            let head = match (t.kind, shared) {
                (TaskType::Classification, Some(first)) => {
                    let shape = first.head.as_ref().map(ClassificationHead::shape);
                    if first.data.labels != data.labels || first.pooling != pooling || shape.as_ref() != Some(&t.head_shape()) {
                        fail!(
                            Config,
                            "tasks `{}` and `{}` share the head `{head_name}` but not its labels ({} against {}), pooling \
                             ({:?} against {:?}) or layers ({:?} against {:?}); rename labels with `label_map`",
                            first.name,
                            t.name,
                            first.data.labels.join(", "),
                            data.labels.join(", "),
                            first.pooling,
                            pooling,
                            shape,
                            t.head_shape()
                        );
                    }
                    first.head.clone()
                }
                (TaskType::Classification, None) => {
                    if pooling == Pooling::Pooler && !model.backbone.has_pooler() {
                        fail!(
                            Config,
                            "task `{}`: `pooling = \"pooler\"` needs BERT's pooler, which this model does not have; use cls or mean",
                            t.name
                        );
                    }
                    let head = ClassificationHead::new(
                        hidden,
                        data.labels.len(),
                        &t.head_shape(),
                        mix(&[seed, i as u64, salt::HEAD_INIT]),
                        device,
                    )?;
                    if let Some((folder, _)) = config.stack_of(t).last().and_then(|top| started.get(top)) {
                        start_head(&head, folder, head_name, &data.labels, device)?;
                    }
                    for (var_name, var) in head.vars() {
                        params.push(Param {
                            name: format!("head.{head_name}.{var_name}"),
                            var,
                            groups: vec!["heads".into(), format!("head:{head_name}")],
                        });
                    }
                    Some(head)
                }
                (TaskType::CausalLm | TaskType::Chat, _) => None,
            };
            // Checked now, not at the first step: names, nesting, shared fusion sites; every
            // `fuse` block gets the name of the fusion layer it finds.
            let setup = match config.setup_of(t) {
                Some(setup) => {
                    let adapters = model.backbone.adapters();
                    let named = adapters.with_fusion_names(setup).within(|| format!("`task.setup` of task `{}`", t.name))?;
                    adapters.check_setup(&named).within(|| format!("`task.setup` of task `{}`", t.name))?;
                    Some(named)
                }
                None => None,
            };
            tasks.push(Task { name: t.name.clone(), kind: t.kind, data, stack: config.stack_of(t), setup, pooling, head, features: None });
        }
        if let Some(es) = &config.training.early_stopping {
            check_metric(es.metric, &tasks)?;
        }
        let t = &config.training;
        let steps_per_epoch: usize = tasks.iter().map(|k| k.data.train.len().div_ceil(t.batch_size)).sum();
        let total = t.steps.unwrap_or(t.epochs * steps_per_epoch).max(1);
        let decay = match t.schedule {
            ScheduleKind::Constant => Decay::Constant,
            ScheduleKind::Linear => Decay::Linear,
            ScheduleKind::Cosine => Decay::Cosine,
        };
        let schedule = Schedule { peak: t.lr, warmup: (t.warmup_ratio * total as f64).round() as usize, total, decay };
        let eval_every = t.eval_every.unwrap_or(steps_per_epoch).max(1);
        let checkpoint_every = t.checkpoint_every.unwrap_or(eval_every).max(1);
        let mut optimizer = AdamW::new(params.iter().map(|p| (p.name.clone(), p.var.clone())).collect(), t.weight_decay)?;
        for (name, entry) in &config.adapters {
            let Some(lr) = entry.lr else { continue };
            let group = format!("adapter:{name}");
            for p in params.iter().filter(|p| p.groups.contains(&group)) {
                optimizer.scale_lr(&p.name, lr / t.lr)?;
            }
        }
        let started_placements = started.into_iter().map(|(name, (_, placement))| (name, placement)).collect();
        let mut trainer = Trainer {
            config,
            model,
            tasks,
            params,
            base_parameters,
            optimizer,
            schedule,
            eval_every,
            checkpoint_every,
            started_placements,
        };
        if mode == Mode::HeadOnly {
            trainer.cache_features()?;
        }
        Ok(trainer)
    }

    /// Makes task `i`'s setup (or stack) the model's active one.
    fn activate_task(&mut self, i: usize) -> Result<()> {
        let task = &self.tasks[i];
        let setup = task.setup.clone().or_else(|| (!task.stack.is_empty()).then(|| Setup::stack(&task.stack)));
        self.model.backbone.adapters_mut().set_setup(setup)?;
        Ok(())
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.schedule.total
    }

    /// Number of trainable parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// The model, with its adapters.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The trainable variables by name (for tests and reports).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.params.iter().map(|p| (p.name.clone(), p.var.clone())).collect()
    }

    fn cache_features(&mut self) -> Result<()> {
        let ctx = ForwardCtx::inference();
        let backbone = &self.model.backbone;
        for task in &mut self.tasks {
            let features = |split: &Split| -> Result<Tensor> {
                let mut rows = vec![None; split.len()];
                for batch in sorted_batches(&split.ids.iter().map(Vec::len).collect::<Vec<_>>(), 64) {
                    let ids: Vec<&[u32]> = batch.iter().map(|&i| split.ids[i].as_slice()).collect();
                    let f = pooled(backbone, &ids, task.pooling, &ctx)?;
                    for (j, &i) in batch.iter().enumerate() {
                        rows[i] = Some(f.get(j)?);
                    }
                }
                Ok(Tensor::stack(&rows.into_iter().map(|r| r.expect("every row pooled")).collect::<Vec<_>>(), 0)?)
            };
            task.features = Some(Features {
                train: features(&task.data.train)?,
                dev: task.data.dev.as_ref().map(features).transpose()?,
                test: task.data.test.as_ref().map(features).transpose()?,
            });
        }
        Ok(())
    }

    /// Trains to the end (or to `stop_after`), then evaluates on test and writes the outputs.
    pub fn run(&mut self, options: &RunOptions) -> Result<Summary> {
        let out = self.config.output.dir.clone();
        std::fs::create_dir_all(&out).within(|| format!("creating the output folder {}", out.display()))?;
        let started = Instant::now();
        let mut state = if options.resume {
            let params = self.params_by_name();
            let state = checkpoint::load(&out, &self.config, &mut self.optimizer, &params)?;
            eprintln!("resuming from step {} of {}", state.step, self.total_steps());
            state
        } else {
            if checkpoint::exists(&out)? {
                fail!(Run, "{} holds a checkpoint of an earlier run; resume it (--resume) or choose a new `output.dir`", out.display());
            }
            State::new(self.tasks.len(), &self.config)
        };
        let mut log = MetricsLog::open(&out.join(METRICS_FILE), options.resume.then_some(state.step))?;
        if state.step == 0 && !options.resume {
            let dev = self.evaluate(EvalSplit::Dev)?;
            self.log_eval(&mut log, 0, "dev", &dev)?;
            state.dev_at_start = dev;
            state.test_at_start = self.evaluate(EvalSplit::Test)?;
        }
        let total = self.total_steps();
        let last = options.stop_after.unwrap_or(total).min(total);
        let bar = progress_bar(total, state.step, options.progress);
        let mut window = Throughput::default();
        while state.step < last && !state.stopped_early {
            let step = state.step;
            let batch = self.next_batch(step, &mut state.cursors);
            let lr = self.schedule.lr(step);
            let t0 = Instant::now();
            let (loss, grad_norm, examples, tokens, reports) = self.train_step(step, &batch, lr)?;
            window.add(examples, tokens, t0.elapsed().as_secs_f64());
            state.step += 1;
            let task = match batch.as_slice() {
                [(task, _)] => self.tasks[*task].name.as_str(),
                _ => "mixed",
            };
            let record = StepRecord {
                step: state.step,
                task: task.to_string(),
                loss,
                lr,
                grad_norm,
                examples_per_s: window.examples_per_s(),
                elapsed_s: started.elapsed().as_secs_f64(),
                aux_losses: (!reports.aux_losses.is_empty()).then(|| reports.aux_losses.clone()),
                routing: (!reports.routing.is_empty()).then(|| {
                    let mut sums = RoutingSums::default();
                    sums.add(&reports.routing, &self.task_names());
                    sums.points(false)
                }),
            };
            log.write(&serde_json::to_value(&record)?)?;
            bar.set_position(state.step as u64);
            bar.set_message(format!(
                "loss {loss:.4}  lr {lr:.2e}  {:.1} ex/s  {:.0} tok/s",
                window.examples_per_s(),
                window.tokens_per_s()
            ));
            if !options.progress && (state.step % (total / 10).max(1) == 0 || state.step == total) {
                eprintln!("step {}/{total}  loss {loss:.4}  lr {lr:.2e}  {:.1} ex/s", state.step, window.examples_per_s());
            }
            if state.step % self.eval_every == 0 || state.step == total {
                let dev = self.evaluate(EvalSplit::Dev)?;
                self.log_eval(&mut log, state.step, "dev", &dev)?;
                bar.suspend(|| print_eval(state.step, "dev", &dev));
                self.track_best(&mut state, &dev, &out)?;
            }
            if state.step % self.checkpoint_every == 0 || state.step == last || state.stopped_early {
                checkpoint::save(&out, &state, &self.optimizer, &self.params_by_name())?;
            }
        }
        bar.finish_and_clear();
        let finished = state.step >= total || state.stopped_early;
        if !finished {
            eprintln!("stopped after step {} of {total}; continue with --resume", state.step);
        }
        let mut summary = self.summary(&state, started.elapsed().as_secs_f64(), finished);
        if finished {
            if state.best.is_some() {
                checkpoint::restore_best(&out, &self.params_by_name())?;
            }
            let test = self.evaluate(EvalSplit::Test)?;
            self.log_eval(&mut log, state.step, "test", &test)?;
            let mut recording = Recording::default();
            let dev = self.evaluate_recording(EvalSplit::Dev, Some(&mut recording))?;
            if !recording.attention.is_empty() {
                fusion_report::write(&out, &recording.attention.report("dev"))?;
            }
            if !recording.routing.is_empty() {
                summary.routing = Some(RoutingReport { split: "dev".into(), points: recording.routing.points(true) });
            }
            for (name, result) in summary.tasks.iter_mut() {
                result.test = test.get(name).cloned().unwrap_or_default();
                result.dev = dev.get(name).cloned().unwrap_or_default();
            }
            summary.aux_losses = routing_report::mean_aux_losses(&out.join(METRICS_FILE))?;
            self.save_outputs()?;
            io::write_atomic(&out.join(SUMMARY_FILE), serde_json::to_string_pretty(&summary)?.as_bytes())?;
            report::plot(&out.join(METRICS_FILE), &out.join(report::PLOT_FILE))?;
            routing_report::plot(&out.join(METRICS_FILE), &out.join(routing_report::PLOT_FILE))?;
        }
        Ok(summary)
    }

    fn params_by_name(&self) -> Vec<(String, Var)> {
        self.trainable()
    }
}

/// Registers an adapter's trainable variables as `adapter.NAME.VAR`.
fn add_trainable(params: &mut Vec<Param>, name: &str, adapter: &dyn adapters_core::Adapter) {
    for (var_name, var) in adapter.vars().into_iter().filter(|(n, _)| adapter.trains_var(n)) {
        params.push(Param { name: format!("adapter.{name}.{var_name}"), var, groups: vec!["adapters".into(), format!("adapter:{name}")] });
    }
}

/// Starts `head` from the one saved as `heads/NAME` in `folder`, when there is one with
/// these labels (else it stays new, and says why).
fn start_head(head: &ClassificationHead, folder: &std::path::Path, name: &str, labels: &[String], device: &Device) -> Result<()> {
    let dir = folder.join(saved_heads::HEADS_DIR).join(name);
    if !dir.is_dir() {
        return Ok(());
    }
    let saved = saved_heads::load(&dir, device)?;
    if saved.config.labels != labels {
        eprintln!(
            "head `{name}`: {} has labels [{}], this task [{}]; starting a new head",
            dir.display(),
            saved.config.labels.join(", "),
            labels.join(", ")
        );
        return Ok(());
    }
    if saved.head.shape() != head.shape() {
        eprintln!(
            "head `{name}`: {} has layers {:?}, this task {:?}; starting a new head",
            dir.display(),
            saved.head.shape(),
            head.shape()
        );
        return Ok(());
    }
    for ((_, var), (_, saved)) in head.vars().into_iter().zip(saved.head.vars()) {
        var.set(saved.as_tensor())?;
    }
    Ok(())
}

/// The registered kind of AdapterFusion layers.
const FUSION: &str = "fusion";

/// Resolves an adapter reference that is not a folder to a local folder: `Ok(None)` when
/// it is not a reference this resolver knows, `Err` with what to do when it is one that
/// cannot be had.
pub type ResolveReference<'a> = &'a dyn Fn(&std::path::Path) -> std::result::Result<Option<PathBuf>, String>;

/// A trained adapter's folder: `from` itself, or, when no such path exists, the folder
/// `resolve` gives for it.
fn local_folder(from: &std::path::Path, resolve: ResolveReference) -> Result<PathBuf> {
    if from.exists() {
        return Ok(from.to_path_buf());
    }
    match resolve(from) {
        Ok(Some(folder)) => Ok(folder),
        Ok(None) => Ok(from.to_path_buf()),
        Err(message) => Err(crate::Error::Reference(message)),
    }
}

/// Where a fusion layer goes by default: the layers and sites of its first member.
fn members_placement(model: &LoadedModel, entry: &AdapterEntry) -> Result<Placement> {
    let members = entry.config.get("members").and_then(|m| m.as_array()).cloned().unwrap_or_default();
    let Some(first) = members.first().and_then(|m| m.as_str()) else {
        fail!(Config, "a fusion needs `members = [\"a\", \"b\", ...]`, the adapters it fuses")
    };
    let Some(adapter) = model.backbone.adapters().get(first) else {
        fail!(Config, "no adapter `{first}` (a fusion's members must be [adapters.NAME] tables, e.g. with `from`)")
    };
    let points = adapter.points();
    let layers: BTreeSet<usize> = points.iter().map(|p| p.layer).collect();
    let sites: BTreeSet<_> = points.iter().map(|p| p.site).collect();
    Ok(Placement { layers: Layers::List(layers.into_iter().collect()), sites: sites.into_iter().collect(), ..Default::default() })
}

/// The configuration of a kind with a field of task names ([`registry::TASK_NAMES`]):
/// filled with the run's task names when left out, refused when it names others (task ids
/// are positions in the run's `[[task]]` list).
fn with_task_names(kind: &str, mut config: serde_json::Value, run: &Config) -> Result<serde_json::Value> {
    let Ok(registered) = registry::kind(kind) else { return Ok(config) };
    let names: Vec<&str> = run.task.iter().map(|t| t.name.as_str()).collect();
    for field in registered.fields.iter().filter(|f| f.ty == registry::TASK_NAMES) {
        match config.get(field.name) {
            None => config[field.name] = serde_json::json!(names),
            Some(given) => {
                let given: Vec<&str> = given.as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
                if given != names {
                    fail!(
                        Config,
                        "`{}` = {given:?} must list the run's tasks in their [[task]] order, {names:?} (task ids are positions \
                         in that list); leave it out to have it filled in",
                        field.name
                    );
                }
            }
        }
    }
    Ok(config)
}

fn check_metric(metric: Metric, tasks: &[Task]) -> Result<()> {
    let fits = |t: &Task| match metric {
        Metric::Accuracy | Metric::MacroF1 => t.kind == TaskType::Classification,
        Metric::Perplexity => t.kind.is_language_modelling(),
        Metric::Loss => true,
    };
    if !tasks.iter().any(|t| fits(t) && t.data.dev.is_some()) {
        fail!(Run, "`training.early_stopping.metric = \"{}\"` needs a task with that metric and a `dev` split", metric.key());
    }
    Ok(())
}
