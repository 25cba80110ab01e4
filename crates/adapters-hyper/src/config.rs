//! The hypernetwork's configuration: what conditions it, how large the adapters it
//! generates are, and how compact the generator is. Validated once, when it is built.

use adapters_bottleneck::Activation;
use adapters_core::registry::parse_config;
use adapters_core::Error;
use serde::{Deserialize, Serialize};

/// What a row's adapter is generated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Conditioning {
    /// The row's task: its task id picks a row of the learned task-embedding table. A
    /// caller may instead pass vectors in the task-embedding space through the forward
    /// context's `conditioning` (a mixture of tasks, or any point of that space).
    Task,
    /// The row's input: the mean of its token embeddings (computed by the caller and passed
    /// as the context's `conditioning`, `[batch, hidden]`) through a learned projection into
    /// the task-embedding space.
    Instance,
}

/// Which of the hypernetwork's parameters train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainParts {
    /// Everything.
    All,
    /// Only the task embeddings: a new task learned with a frozen generator
    /// (`generator_from`), a few dozen parameters.
    TaskEmbeddings,
}

/// The configuration of a `hyper_bn` adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperConfig {
    /// The tasks the embedding table holds, in task-id order (the order of the run's
    /// `[[task]]` entries); names let callers mix tasks by name.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// `task` or `instance` (see [`Conditioning`]).
    #[serde(default = "default_conditioning")]
    pub conditioning: Conditioning,
    /// The generated adapters' bottleneck = hidden / reduction_factor.
    #[serde(default = "default_reduction")]
    pub reduction_factor: f64,
    /// The generated adapters' activation.
    #[serde(default = "default_activation")]
    pub non_linearity: Activation,
    /// Also generate a layer norm before the down projection (HyperFormer's adapter norm).
    #[serde(default)]
    pub layer_norm: bool,
    /// Width of the task embeddings (the space task mixtures and explicit vectors live in).
    #[serde(default = "default_task_dim")]
    pub task_dim: usize,
    /// Width of the layer-id and site embeddings.
    #[serde(default = "default_position_dim")]
    pub position_dim: usize,
    /// Hidden width of the projector (task ‖ layer ‖ site → code).
    #[serde(default = "default_projector_hidden")]
    pub projector_hidden: usize,
    /// A trained `hyper_bn` folder whose generator (projector, embeddings of layers and
    /// sites, heads) this one starts from; its tasks' embeddings are copied by name and new
    /// tasks start at their mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_from: Option<std::path::PathBuf>,
    /// `all` or `task_embeddings` (see [`TrainParts`]).
    #[serde(default = "default_train")]
    pub train: TrainParts,
    /// Width of the code every generator head reads: each generated tensor is
    /// `G · code + c`, so a head holds `(code_dim + 1)` times the tensor's size.
    #[serde(default = "default_code_dim")]
    pub code_dim: usize,
}

fn default_train() -> TrainParts {
    TrainParts::All
}
fn default_conditioning() -> Conditioning {
    Conditioning::Task
}
fn default_reduction() -> f64 {
    16.0
}
fn default_activation() -> Activation {
    Activation::Relu
}
fn default_task_dim() -> usize {
    64
}
fn default_position_dim() -> usize {
    16
}
fn default_projector_hidden() -> usize {
    64
}
fn default_code_dim() -> usize {
    8
}

/// The kind's name.
pub const KIND: &str = "hyper_bn";

/// Embedding, projector and code widths above this are refused before allocating.
const MAX_WIDTH: usize = 4096;
/// Tasks a table may hold.
const MAX_TASKS: usize = 65536;

impl HyperConfig {
    /// Parses and checks a configuration.
    pub fn parse(value: &serde_json::Value) -> Result<Self, Error> {
        let c: HyperConfig = parse_config(KIND, value)?;
        let bad = |m: String| Error::Config { kind: KIND.into(), message: m };
        if c.conditioning == Conditioning::Task && c.tasks.is_empty() {
            return Err(bad("task conditioning needs `tasks`, the task names in task-id order (the run's `[[task]]` order)".into()));
        }
        if c.tasks.len() > MAX_TASKS {
            return Err(bad(format!("`tasks` holds {} names; at most {MAX_TASKS}", c.tasks.len())));
        }
        if let Some(dup) = c.tasks.iter().enumerate().find_map(|(i, t)| c.tasks[..i].contains(t).then_some(t)) {
            return Err(bad(format!("`tasks` names `{dup}` twice")));
        }
        if !(c.reduction_factor.is_finite() && c.reduction_factor > 0.0) {
            return Err(bad(format!("`reduction_factor` must be a positive number, got {}", c.reduction_factor)));
        }
        for (name, v) in
            [("task_dim", c.task_dim), ("position_dim", c.position_dim), ("projector_hidden", c.projector_hidden), ("code_dim", c.code_dim)]
        {
            if v == 0 || v > MAX_WIDTH {
                return Err(bad(format!("`{name}` must be in 1..={MAX_WIDTH}, got {v}")));
            }
        }
        if c.train == TrainParts::TaskEmbeddings && (c.generator_from.is_none() || c.conditioning != Conditioning::Task) {
            return Err(bad("`train = \"task_embeddings\"` learns tasks for a trained generator: it needs `generator_from` \
                 (a trained hyper_bn folder) and task conditioning"
                .into()));
        }
        Ok(c)
    }

    /// What must agree with a generator this one starts from: everything that shapes the
    /// generator or what its output means.
    pub fn generator_shape(&self) -> serde_json::Value {
        serde_json::json!({
            "conditioning": self.conditioning,
            "reduction_factor": self.reduction_factor,
            "non_linearity": self.non_linearity,
            "layer_norm": self.layer_norm,
            "task_dim": self.task_dim,
            "position_dim": self.position_dim,
            "projector_hidden": self.projector_hidden,
            "code_dim": self.code_dim,
        })
    }

    /// The bottleneck width for a hidden size.
    pub fn bottleneck(&self, hidden: usize) -> usize {
        ((hidden as f64 / self.reduction_factor) as usize).max(1)
    }

    /// The id of a task name.
    pub fn task_id(&self, name: &str) -> Option<usize> {
        self.tasks.iter().position(|t| t == name)
    }
}
