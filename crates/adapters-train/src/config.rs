//! The training configuration, one TOML file: the model, any number of adapters of any
//! registered kind, the tasks with their data and heads, the training schedule and the
//! output folder. Unknown keys and wrong types are errors that name the key.

use crate::error::{fail, Error, Result, Within};
pub use adapters_core::Activation;
use adapters_core::{Placement, Setup};
pub use adapters_models::heads::{HeadShape, Pooling};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One training run, as written in its TOML file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[model]`.
    pub model: ModelConfig,
    /// Named adapters; `kind` picks the registered kind, the other keys are its config.
    #[serde(default)]
    pub adapters: BTreeMap<String, AdapterEntry>,
    /// One or more tasks (`[[task]]`).
    pub task: Vec<TaskConfig>,
    /// `[training]`.
    #[serde(default)]
    pub training: TrainingConfig,
    /// Staged training (`[[stage]]`): which parameter groups train for how many steps.
    #[serde(default)]
    pub stage: Vec<Stage>,
    /// `[output]`.
    pub output: OutputConfig,
}

/// `[model]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face folder or a .gguf file; relative paths are taken from the working
    /// directory.
    pub path: PathBuf,
    /// Longer texts are truncated to this many tokens.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// How the frozen projections are kept: `"f32"` (a GGUF file de-quantised at load),
    /// `"packed"` (a GGUF file's quantized blocks as stored: QLoRA-style training, the base
    /// at its file size in memory), `"q8_0"` (8-bit blocks made at load, from any model).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub base_weights: adapters_models::BaseWeights,
}

fn is_f32(b: &adapters_models::BaseWeights) -> bool {
    *b == adapters_models::BaseWeights::F32
}

fn default_max_length() -> usize {
    128
}

/// One adapter: its kind, placement and the kind's own fields (checked by the kind); or
/// `from`, a trained adapter folder loaded frozen (the members of a fusion in stage two).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AdapterEntry {
    /// The registered kind (not with `from`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// A trained adapter folder (ours, PEFT or AdapterHub) to load and keep frozen, or
    /// `NAME@TAG` / `NAME@VERSION` in the adapter library `$ADAPTERS_STORE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
    /// A trained adapter folder (or `NAME@TAG`) to start from and keep training: its kind,
    /// configuration, placement and weights (continued training, federated rounds). A head
    /// saved in it (`heads/HEAD`) starts the head of that name when the labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Where the adapter goes.
    #[serde(default)]
    pub placement: Placement,
    /// This adapter's peak learning rate (the schedule's warmup and decay still apply);
    /// `training.lr` when absent. A fusion over trained adapters usually wants a lower
    /// one than the new head it trains with (AdapterFusion used 5e-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// The kind's own fields.
    #[serde(flatten)]
    pub config: BTreeMap<String, toml::Value>,
}

impl AdapterEntry {
    /// The kind-specific fields as the registry takes them.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("TOML values convert to JSON")
    }
}

/// What a task learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    /// Sequence classification: a linear head on pooled hidden states, cross-entropy.
    Classification,
    /// Causal language modelling on plain text: next-token cross-entropy, perplexity.
    CausalLm,
    /// Chat fine-tuning on conversations (JSONL with `messages`), rendered with the
    /// model's chat template: next-token cross-entropy on the assistant's tokens only.
    Chat,
}

impl TaskType {
    /// Whether the task trains the decoder's own next-token prediction (no head).
    pub fn is_language_modelling(self) -> bool {
        matches!(self, TaskType::CausalLm | TaskType::Chat)
    }
}

/// `[[task]]`: one task's data, adapters and head.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Names the task in reports and its head folder.
    pub name: String,
    /// Classification or causal LM.
    #[serde(rename = "type")]
    pub kind: TaskType,
    /// JSONL or CSV (classification) or plain text with blank-line separated documents
    /// (causal LM).
    pub train: PathBuf,
    /// Dev data, for evaluation during training.
    pub dev: Option<PathBuf>,
    /// Test data, evaluated before and after training.
    pub test: Option<PathBuf>,
    /// The JSONL field or CSV column with the text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// The JSONL field or CSV column with the label.
    #[serde(default = "default_label_field")]
    pub label_field: String,
    /// Skip (and count) bad rows instead of stopping at the first.
    #[serde(default)]
    pub skip_bad_rows: bool,
    /// The adapters this task runs through, stacked in order; default: all adapters in
    /// name order. Its head is saved in the last (top) adapter's folder.
    pub adapters: Option<Vec<String>>,
    /// Instead of `adapters`: a composition of them, e.g. `"fuse(sentiment, topic)"`
    /// (blocks: stack, fuse, parallel, average, batch_split, split). Its head is saved in the
    /// folder of its fusion layer, or else of its last adapter.
    pub setup: Option<String>,
    /// Pooling for the classification head; default mean for encoders, last for decoders.
    /// `cls` and `pooler` (BERT's pooler output) are what AdapterHub's and transformers'
    /// encoder heads read, so heads trained with them convert to those formats.
    pub pooling: Option<Pooling>,
    /// Linear layers of the classification head; default 1 (a linear classifier). 2 is
    /// AdapterHub's default `ClassificationHead`: a hidden layer, `head_activation`, then
    /// the classifier.
    pub head_layers: Option<usize>,
    /// The activation after each hidden layer of the head; default `tanh` (AdapterHub's).
    pub head_activation: Option<Activation>,
    /// Whether the head's output layer has a bias; default true (transformers' Llama
    /// `score` classifier, which PEFT saves, has none).
    pub head_bias: Option<bool>,
    /// The classification head this task trains and is scored by; default: its own, named
    /// after the task. Tasks that name the same head share its weights, so they must end
    /// up with the same labels (see `label_map`) and pooling.
    pub head: Option<String>,
    /// Renames the data's labels before training and evaluation, e.g.
    /// `{ fresh = "positive", rotten = "negative" }`, so that tasks labelled differently can
    /// share a head; labels not named keep their own. Saved with the head, so `adapters
    /// eval` reads either naming.
    pub label_map: Option<BTreeMap<String, String>>,
    /// Evaluate on only the first N rows (or LM blocks) of dev and test, to keep
    /// evaluation of large sets short.
    pub eval_limit: Option<usize>,
    /// Train on only the first N rows (or LM blocks) of the training file: a low-resource
    /// run or a learning curve (`cargo xtask fetch` shuffles the splits, so the first rows
    /// are a random sample). The labels are still those of the whole file.
    pub train_limit: Option<usize>,
}

fn default_text_field() -> String {
    "text".into()
}

fn default_label_field() -> String {
    "label".into()
}

/// What trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Base frozen; adapters and heads train.
    Adapters,
    /// Base frozen, no adapters: only the heads train (a linear probe).
    HeadOnly,
    /// Everything trains: base, adapters and heads.
    Full,
}

/// The learning-rate shape after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Stays at the peak.
    Constant,
    /// Falls linearly to 0.
    Linear,
    /// Follows half a cosine to 0.
    Cosine,
}

/// How the next batch's task is drawn in multi-task training.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Sampling {
    /// `"proportional"` (to the training set sizes).
    Named(SamplingName),
    /// `{ temperature = T }`: probability proportional to size^(1/T); T = 1 is
    /// proportional, large T approaches uniform.
    Temperature {
        /// T.
        temperature: f64,
    },
}

/// Named multi-task sampling rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingName {
    /// Tasks in proportion to their training rows.
    Proportional,
    /// Every task equally often.
    Uniform,
}

impl Sampling {
    /// The sampling temperature (uniform is infinite).
    pub fn temperature(&self) -> f64 {
        match self {
            Sampling::Named(SamplingName::Proportional) => 1.0,
            Sampling::Named(SamplingName::Uniform) => f64::INFINITY,
            Sampling::Temperature { temperature } => *temperature,
        }
    }
}

/// Stop when the dev metric has not improved for `patience` evaluations.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// `accuracy`, `macro_f1`, `loss` or `perplexity` on the dev sets (mean over tasks).
    pub metric: Metric,
    /// Stop after this many evaluations without improvement.
    pub patience: usize,
}

/// A dev metric to watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Accuracy (classification).
    Accuracy,
    /// Macro-averaged F1 (classification).
    MacroF1,
    /// Dev loss (any task).
    Loss,
    /// Perplexity (causal LM).
    Perplexity,
}

impl Metric {
    /// Whether larger values are better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Accuracy | Metric::MacroF1)
    }

    /// The metric's name in reports.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::MacroF1 => "macro_f1",
            Metric::Loss => "loss",
            Metric::Perplexity => "perplexity",
        }
    }
}

/// `[training]`: optimiser, schedule, batches, evaluation, checkpoints.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// What trains (default: adapters).
    pub mode: Mode,
    /// Peak learning rate (1e-3 suits adapters; full fine-tuning wants ~2e-5 to 5e-5).
    pub lr: f64,
    /// AdamW decoupled weight decay, on matrices only (not biases, norms, scalings).
    pub weight_decay: f64,
    /// Learning-rate shape after warmup.
    pub schedule: ScheduleKind,
    /// Warmup as a share of all steps.
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Dropout on the pooled features before a classification head.
    pub dropout: f64,
    /// Rows per step.
    pub batch_size: usize,
    /// Passes over the training data (all tasks); ignored when `steps` is set.
    pub epochs: usize,
    /// Total optimizer steps, overriding `epochs`.
    pub steps: Option<usize>,
    /// Seeds initialisation, data order, task choice and dropout.
    pub seed: u64,
    /// Evaluate on the dev sets every N steps (default: once per epoch) and at the end.
    pub eval_every: Option<usize>,
    /// Write a checkpoint every N steps (default: at every evaluation).
    pub checkpoint_every: Option<usize>,
    /// Early stopping on a dev metric.
    pub early_stopping: Option<EarlyStopping>,
    /// Multi-task sampling: `"proportional"`, `"uniform"` or `{ temperature = T }`.
    pub sampling: Sampling,
    /// Put texts of similar length in the same batch (less padding, much faster on varied
    /// lengths). Turn off when length predicts the label so strongly that batches become
    /// single-class.
    pub group_by_length: bool,
    /// Every batch holds rows of every task, in the proportions `sampling` gives, run
    /// through one forward (each row with its task's adapters and head) instead of one
    /// task per batch. Classification tasks only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mixed_task_batches: bool,
    /// Recompute each layer's activations during the backward pass instead of keeping them
    /// from the forward pass: a step holds one layer's activations at a time, for about a
    /// third more time per step (BENCHMARKS.md has the figures).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// `[training.adversarial]`: train on embedding perturbations found by projected
    /// gradient ascent as well as on the clean batch (classification tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adversarial: Option<crate::adversarial::Adversarial>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            mode: Mode::Adapters,
            lr: 1e-3,
            weight_decay: 0.01,
            schedule: ScheduleKind::Linear,
            warmup_ratio: 0.06,
            max_grad_norm: 1.0,
            dropout: 0.1,
            batch_size: 32,
            epochs: 3,
            steps: None,
            seed: 42,
            eval_every: None,
            checkpoint_every: None,
            early_stopping: None,
            sampling: Sampling::Named(SamplingName::Proportional),
            group_by_length: true,
            mixed_task_batches: false,
            gradient_checkpointing: false,
            adversarial: None,
        }
    }
}

/// One stage of staged training: these parameter groups train for `steps` steps (the
/// last stage may omit `steps` and runs to the end). Groups: `adapters`, `adapter:NAME`,
/// `heads`, `head:NAME` (a task's head, named after the task unless it sets `head`), `base` (full mode).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// How many steps; the last stage may leave it out to run to the end.
    pub steps: Option<usize>,
    /// The parameter groups that train in this stage.
    pub train: Vec<String>,
}

/// `[output]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// The run folder: adapters, heads, metrics.jsonl, curves.svg, summary.json, checkpoints.
    pub dir: PathBuf,
}

impl Config {
    /// Reads a TOML file, applies `overrides` (`training.lr=5e-4`, `output.dir="x"`:
    /// dotted key paths, TOML values) and checks it.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).within(|| format!("reading the config {}", path.display()))?;
        Self::parse(&text, overrides).within(|| format!("in the config {}", path.display()))
    }

    /// Parses a config from TOML text with `--set KEY=VALUE` overrides applied, and checks it.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        // Through text again so that errors point at the offending line and key.
        let text = toml::to_string(&doc).map_err(|e| Error::Config(format!("re-serialising the config: {e}")))?;
        let config: Config = toml::from_str(&text).map_err(|e| Error::Config(e.to_string().trim_end().to_string()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        let t = &self.training;
        if self.task.is_empty() {
            fail!(Config, "`task`: at least one [[task]] is needed");
        }
        if t.batch_size == 0 {
            fail!(Config, "`training.batch_size` must be at least 1");
        }
        if t.lr.is_nan() || t.lr <= 0.0 {
            fail!(Config, "`training.lr` must be positive, got {}", t.lr);
        }
        if !(0.0..1.0).contains(&t.dropout) {
            fail!(Config, "`training.dropout` must be in [0, 1), got {}", t.dropout);
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            fail!(Config, "`training.warmup_ratio` must be in [0, 1], got {}", t.warmup_ratio);
        }
        if matches!(t.sampling, Sampling::Temperature { temperature } if temperature.is_nan() || temperature <= 0.0) {
            fail!(Config, "`training.sampling.temperature` must be positive");
        }
        if t.mode == Mode::HeadOnly && self.task.iter().any(|k| k.kind.is_language_modelling()) {
            fail!(
                Config,
                "`training.mode = \"head_only\"` has nothing to train for a causal_lm or chat task (its head is the tied embedding)"
            );
        }
        if t.mixed_task_batches && self.task.iter().any(|k| k.kind != TaskType::Classification) {
            fail!(
                Config,
                "`training.mixed_task_batches = true` needs classification tasks only (a causal_lm task trains on its own batches)"
            );
        }
        if t.mixed_task_batches && t.batch_size < self.task.len() {
            fail!(
                Config,
                "`training.mixed_task_batches = true` needs `training.batch_size` of at least one row per task ({})",
                self.task.len()
            );
        }
        if let Some(adversarial) = &t.adversarial {
            adversarial.check()?;
            if t.mode == Mode::HeadOnly || t.gradient_checkpointing || self.task.iter().any(|k| k.kind != TaskType::Classification) {
                fail!(
                    Config,
                    "`training.adversarial` perturbs the embeddings of classification tasks and needs the backbone to run: \
                     use mode \"adapters\" or \"full\", classification tasks only, and no `gradient_checkpointing`"
                );
            }
        }
        if t.mode == Mode::Adapters && self.adapters.is_empty() {
            fail!(Config, "`training.mode = \"adapters\"` needs at least one [adapters.NAME] table (or use mode \"head_only\" / \"full\")");
        }
        let mut names = std::collections::BTreeSet::new();
        for task in &self.task {
            if !names.insert(&task.name) {
                fail!(Config, "`task.name`: two tasks are called `{}`", task.name);
            }
            task.check_head().within(|| format!("task `{}`", task.name))?;
            self.check_label_maps(task.head_name())?;
            if let Some(text) = &task.setup {
                if task.adapters.is_some() {
                    fail!(Config, "task `{}`: give `adapters` (a stack) or `setup` (a composition), not both", task.name);
                }
                if t.mixed_task_batches {
                    fail!(Config, "task `{}`: `setup` needs `training.mixed_task_batches = false` (rows choose plain stacks)", task.name);
                }
                let setup: Setup = text.parse().map_err(|e| Error::Config(format!("`task.setup` of task `{}`: {e}", task.name)))?;
                // An unnamed `fuse(a, b)` block may mean a fusion defined under another name
                // (found by its members when the setup is set).
                let fusion_elsewhere = |name: &str| {
                    name.contains(',') && self.adapters.values().any(|e| e.kind == "fusion" || e.from.is_some() || e.init_from.is_some())
                };
                for a in setup.adapter_names().iter().chain(&setup.fusion_names()) {
                    if !self.adapters.contains_key(a) && !fusion_elsewhere(a) {
                        fail!(
                            Config,
                            "`task.setup` of task `{}`: no adapter `{a}` (defined: {})",
                            task.name,
                            self.adapter_names().join(", ")
                        );
                    }
                }
            }
            for a in task.adapters.iter().flatten() {
                if !self.adapters.contains_key(a) {
                    fail!(
                        Config,
                        "`task.adapters` of task `{}`: no adapter `{a}` (defined: {})",
                        task.name,
                        self.adapter_names().join(", ")
                    );
                }
            }
        }
        for (name, entry) in &self.adapters {
            if entry.init_from.is_some() {
                if entry.from.is_some() {
                    fail!(Config, "`adapters.{name}`: `from` loads a folder frozen, `init_from` to keep training; give one");
                }
                if !entry.kind.is_empty() || !entry.config.is_empty() || entry.placement != Placement::default() {
                    fail!(
                        Config,
                        "`adapters.{name}`: `init_from` starts from a trained folder with its own kind, configuration and placement; leave out `{}`",
                        if entry.kind.is_empty() { entry.config.keys().next().map_or("placement", String::as_str) } else { "kind" }
                    );
                }
                if let Some(lr) = entry.lr.filter(|lr| !(lr.is_finite() && *lr > 0.0)) {
                    fail!(Config, "`adapters.{name}.lr` = {lr}: a learning rate is a positive number");
                }
                continue;
            }
            match (&entry.from, entry.kind.is_empty()) {
                (None, true) => fail!(
                    Config,
                    "`adapters.{name}`: give `kind` (a registered kind), `from` (a trained adapter folder, frozen) or `init_from` (one to keep training)"
                ),
                (Some(_), false) => fail!(Config, "`adapters.{name}`: `from` loads a trained folder with its own kind; leave out `kind`"),
                (Some(_), _) if entry.lr.is_some() => {
                    fail!(Config, "`adapters.{name}.lr`: an adapter loaded with `from` is frozen and does not train; leave out `lr`")
                }
                (None, false) if entry.lr.is_some_and(|lr| !(lr.is_finite() && lr > 0.0)) => {
                    fail!(Config, "`adapters.{name}.lr` = {}: a learning rate is a positive number", entry.lr.unwrap_or_default())
                }
                (Some(_), true) if !entry.config.is_empty() || entry.placement != Placement::default() => fail!(
                    Config,
                    "`adapters.{name}`: `from` loads a trained folder with its own configuration and placement; leave out `{}`",
                    entry.config.keys().next().map_or("placement", String::as_str)
                ),
                _ => {}
            }
        }
        for (i, s) in self.stage.iter().enumerate() {
            if s.steps.is_none() && i + 1 != self.stage.len() {
                fail!(Config, "`stage` {}: only the last stage may leave out `steps`", i + 1);
            }
            for g in &s.train {
                self.check_group(g).within(|| format!("`stage.train` of stage {}", i + 1))?;
            }
        }
        Ok(())
    }

    fn check_group(&self, group: &str) -> Result<()> {
        let ok = match group.split_once(':') {
            None => matches!(group, "adapters" | "heads" | "base"),
            Some(("adapter", name)) => self.adapters.contains_key(name),
            Some(("head", name)) => self.task.iter().any(|t| t.head_name() == name),
            _ => false,
        };
        if !ok {
            fail!(Config, "unknown parameter group `{group}`; groups are adapters, heads, base, adapter:NAME, head:NAME (a task's head: the task's name unless it sets `head`)");
        }
        Ok(())
    }

    /// The `label_map`s of the tasks sharing head `name` agree, and never rename a label
    /// into one that is renamed too: the head keeps their union, read in one step.
    fn check_label_maps(&self, head: &str) -> Result<()> {
        let mut union: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for t in self.tasks_of_head(head) {
            for (from, to) in t.label_map.iter().flatten() {
                match union.insert(from, (to, &t.name)) {
                    Some((other, by)) if other != to => fail!(
                        Config,
                        "`label_map` of the head `{head}`: task `{by}` renames `{from}` to `{other}`, task `{}` to `{to}`",
                        t.name
                    ),
                    _ => {}
                }
            }
        }
        if let Some((from, (to, by))) = union.iter().find(|(_, (to, _))| union.contains_key(to)) {
            fail!(
                Config,
                "`label_map` of task `{by}`: `{from}` becomes `{to}`, which is itself renamed; map each label straight to its final name"
            );
        }
        Ok(())
    }

    /// The tasks that train head `name`, in config order.
    pub fn tasks_of_head<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a TaskConfig> + 'a {
        self.task.iter().filter(move |t| t.head_name() == name)
    }

    /// The `[adapters.NAME]` names, in order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// The adapter stack of a task (none in head-only mode).
    pub fn stack_of(&self, task: &TaskConfig) -> Vec<String> {
        if self.training.mode == Mode::HeadOnly {
            return Vec::new();
        }
        if let Some(setup) = self.setup_of(task) {
            return setup.adapter_names();
        }
        task.adapters.clone().unwrap_or_else(|| self.adapter_names())
    }

    /// The composition a task runs through, when it gives `setup` (checked when loaded).
    pub fn setup_of(&self, task: &TaskConfig) -> Option<Setup> {
        if self.training.mode == Mode::HeadOnly {
            return None;
        }
        task.setup.as_ref().and_then(|s| s.parse().ok())
    }
}

impl TaskConfig {
    /// The head this task trains: `head`, or the task's name.
    pub fn head_name(&self) -> &str {
        self.head.as_deref().unwrap_or(&self.name)
    }

    /// The layers of the head this task trains.
    pub fn head_shape(&self) -> HeadShape {
        let layers = self.head_layers.unwrap_or(1);
        let activation = if layers > 1 { Some(self.head_activation.unwrap_or(Activation::Tanh)) } else { self.head_activation };
        HeadShape { layers, activation, bias: self.head_bias.unwrap_or(true) }
    }

    /// `head` names a folder; `label_map` and a shared head need classification.
    fn check_head(&self) -> Result<()> {
        if self.head_layers == Some(0) {
            fail!(Config, "`head_layers` = 0: a head has at least one (its classifier)");
        }
        if let Some(head) = &self.head {
            let folder_safe = head.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if head.is_empty() || !folder_safe || head.starts_with('.') {
                fail!(Config, "`head` = {head:?}: a head name is a folder name of letters, digits, `_`, `-` and `.`");
            }
        }
        let head_fields = self.head.is_some()
            || self.label_map.is_some()
            || self.head_layers.is_some()
            || self.head_activation.is_some()
            || self.head_bias.is_some()
            || self.pooling.is_some();
        if self.kind != TaskType::Classification && head_fields {
            fail!(Config, "`head`, `label_map`, `pooling` and `head_*` are for classification tasks; this one predicts tokens");
        }
        for (from, to) in self.label_map.iter().flatten() {
            if from.is_empty() || to.is_empty() {
                fail!(Config, "`label_map`: {from:?} = {to:?} maps to or from an empty label");
            }
        }
        Ok(())
    }
}

/// Sets `a.b.c = value` in a TOML table; the value is parsed as TOML, else taken as a string.
fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set {assignment:?}: expected KEY=VALUE, e.g. --set training.lr=5e-4")))?;
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut table = doc;
    let mut i = 0;
    while i + 1 < parts.len() {
        let part = parts[i];
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        // `task.2.head`: an array of tables is indexed by the next part, from 0.
        let entry = if entry.is_array() && i + 2 < parts.len() {
            i += 1;
            let items = entry.as_array_mut().expect("checked");
            let n = items.len();
            let index: usize = parts[i]
                .parse()
                .map_err(|_| Error::Config(format!("--set {key}: `{part}` is a list; index it from 0, e.g. {part}.0.{}", parts[i + 1])))?;
            items.get_mut(index).ok_or_else(|| Error::Config(format!("--set {key}: `{part}` has {n} entries, indexed from 0")))?
        } else {
            entry
        };
        table = entry.as_table_mut().ok_or_else(|| Error::Config(format!("--set {key}: `{part}` is not a table")))?;
        i += 1;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
path = "models/all-MiniLM-L6-v2"

[adapters.pfeiffer]
kind = "seq_bn"
reduction_factor = 16
placement = { layers = "all" }

[[task]]
name = "sms"
type = "classification"
train = "data/sms_spam/train.jsonl"

[output]
dir = "runs/x"
"#;

    #[test]
    fn defaults_and_adapter_fields() {
        let c = Config::parse(BASE, &[]).unwrap();
        assert_eq!(c.training.lr, 1e-3);
        assert_eq!(c.training.mode, Mode::Adapters);
        assert_eq!(c.adapters["pfeiffer"].config_json(), serde_json::json!({"reduction_factor": 16}));
        assert_eq!(c.stack_of(&c.task[0]), vec!["pfeiffer".to_string()]);
        let c =
            Config::parse(BASE, &["training.mode=\"head_only\"".into(), "training.lr=5e-4".into(), "output.dir=runs/y".into()]).unwrap();
        assert_eq!((c.training.mode, c.training.lr), (Mode::HeadOnly, 5e-4));
        assert_eq!(c.output.dir, PathBuf::from("runs/y"));
        assert!(c.stack_of(&c.task[0]).is_empty());
        // An adapter's own learning rate is not one of the kind's fields.
        let c = Config::parse(&BASE.replace("reduction_factor = 16", "reduction_factor = 16\nlr = 1e-4"), &[]).unwrap();
        assert_eq!(c.adapters["pfeiffer"].lr, Some(1e-4));
        assert_eq!(c.adapters["pfeiffer"].config_json(), serde_json::json!({"reduction_factor": 16}));
    }

    #[test]
    fn an_adapter_learning_rate_is_positive_and_only_for_adapters_that_train() {
        let e = Config::parse(&BASE.replace("reduction_factor = 16", "reduction_factor = 16\nlr = -1.0"), &[]).unwrap_err();
        assert!(e.to_string().contains("`adapters.pfeiffer.lr` = -1"), "{e}");
        let frozen = format!("{BASE}\n[adapters.old]\nfrom = \"runs/old\"\nlr = 1e-4\n");
        let e = Config::parse(&frozen, &[]).unwrap_err();
        assert!(e.to_string().contains("`adapters.old.lr`") && e.to_string().contains("frozen"), "{e}");
    }

    #[test]
    fn set_indexes_tasks_and_shared_heads_are_checked() {
        let two = format!("{BASE}\n[[task]]\nname = \"trec\"\ntype = \"classification\"\ntrain = \"t.jsonl\"\n");
        let sets = ["task.0.head=\"shared\"".into(), "task.1.head=\"shared\"".into(), "task.1.label_map={ ham = \"ok\" }".into()];
        let c = Config::parse(&two, &sets).unwrap();
        assert_eq!((c.task[0].head_name(), c.task[1].head_name()), ("shared", "shared"));
        assert_eq!(c.task[1].label_map.as_ref().unwrap()["ham"], "ok");
        assert_eq!(c.tasks_of_head("shared").map(|t| t.name.as_str()).collect::<Vec<_>>(), ["sms", "trec"]);
        assert!(Config::parse(&format!("{two}\n[[stage]]\ntrain = [\"head:shared\"]\n"), &sets).is_ok());
        let e = Config::parse(&two, &["task.2.head=\"x\"".into()]).unwrap_err().to_string();
        assert!(e.contains("task.2.head") && e.contains("2 entries"), "{e}");
        let e = Config::parse(&two, &["task.first.head=\"x\"".into()]).unwrap_err().to_string();
        assert!(e.contains("index it from 0"), "{e}");
        let clash = [sets[0].clone(), sets[1].clone(), "task.0.label_map={ ham = \"fine\" }".into(), sets[2].clone()];
        let e = Config::parse(&two, &clash).unwrap_err().to_string();
        assert!(e.contains("task `sms` renames `ham` to `fine`, task `trec` to `ok`"), "{e}");
        let e = Config::parse(&two, &["task.0.label_map={ a = \"b\", b = \"c\" }".into()]).unwrap_err().to_string();
        assert!(e.contains("`a` becomes `b`, which is itself renamed"), "{e}");
        let e = Config::parse(&two, &["task.0.head=\"../up\"".into()]).unwrap_err().to_string();
        assert!(e.contains("task `sms`") && e.contains("folder name"), "{e}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = Config::parse(&format!("{BASE}\n[training]\nlearning_rate = 1e-3\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = Config::parse(&format!("{BASE}\n[training]\nbatch_size = \"big\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("batch_size") && e.contains("invalid type"), "{e}");
        let e = Config::parse(&BASE.replace("type = \"classification\"", "type = \"regression\""), &[]).unwrap_err().to_string();
        assert!(e.contains("regression") && e.contains("type"), "{e}");
        let e = Config::parse(&format!("{BASE}\n[[stage]]\ntrain = [\"adapterz\"]\n"), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("adapterz"), "{e:#}");
        let e = Config::parse(BASE, &["training.epochs=\"x\"".into()]).unwrap_err().to_string();
        assert!(e.contains("epochs"), "{e}");
    }
}
