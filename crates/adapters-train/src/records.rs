//! The JSON a run and `adapters eval` write for other programs, as types: the trainer
//! and the CLI serialise these, and the studies (`cargo studies`) read them back through
//! the same types, so a renamed or retyped field fails to compile instead of turning into
//! a blank cell hours into a study.

use crate::adversarial::Adversarial;
use crate::config::Mode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A run folder's metrics log: one [`StepRecord`] per step and one evaluation line per
/// task and evaluation (with a `split` field).
pub const METRICS_FILE: &str = "metrics.jsonl";
/// A run folder's [`Summary`].
pub const SUMMARY_FILE: &str = "summary.json";
/// A run folder's [`FusionAttentionReport`], when the run trained a fusion.
pub const FUSION_ATTENTION_FILE: &str = "fusion_attention.json";

/// What a run produced (`summary.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// What trained.
    pub mode: Mode,
    /// Steps done.
    pub steps: usize,
    /// Whether the run reached its end (or stopped early).
    pub finished: bool,
    /// Wall time of the training loop.
    pub seconds: f64,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Parameters of the base model.
    pub base_parameters: usize,
    /// Trainable parameters as a share of the base model's.
    pub trainable_share: f64,
    /// Per task: metrics on test (and on dev at the chosen step).
    pub tasks: BTreeMap<String, TaskResult>,
    /// The step whose weights were kept (early stopping).
    pub best_step: Option<usize>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// The run folder.
    pub output: PathBuf,
    /// What mixture-of-experts routers did on the dev split with the final weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingReport>,
    /// Each auxiliary loss adapters reported (router balance and z-losses, fusion
    /// regularisation), averaged over the training steps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aux_losses: BTreeMap<String, f64>,
}

impl Summary {
    /// A task's metric on a split, if the run has it: `summary.metric("sms_spam", Split::Test, "accuracy")`.
    pub fn metric(&self, task: &str, split: Split, metric: &str) -> Option<f64> {
        self.tasks.get(task)?.split(split).get(metric).copied()
    }
}

/// Which of a task's metric sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Dev, at the end (best weights).
    Dev,
    /// Test, at the end (best weights).
    Test,
    /// Dev before training.
    DevAtStart,
    /// Test before training.
    TestAtStart,
}

impl TaskResult {
    /// The metrics of one split.
    pub fn split(&self, split: Split) -> &BTreeMap<String, f64> {
        match split {
            Split::Dev => &self.dev,
            Split::Test => &self.test,
            Split::DevAtStart => &self.dev_at_start,
            Split::TestAtStart => &self.test_at_start,
        }
    }
}

/// One task's metrics.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskResult {
    /// Dev metrics at the end (best weights).
    pub dev: BTreeMap<String, f64>,
    /// Test metrics at the end (best weights).
    pub test: BTreeMap<String, f64>,
    /// Dev and test metrics before any training (step 0).
    pub dev_at_start: BTreeMap<String, f64>,
    /// Test metrics before training.
    pub test_at_start: BTreeMap<String, f64>,
}

/// Routing over an evaluation split: per routed point (`moe_bn layer 3 ffn_output`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoutingReport {
    /// The split routed (`dev`).
    pub split: String,
    /// Per routed point.
    pub points: BTreeMap<String, RoutingPoint>,
}

/// What one routed point did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoutingPoint {
    /// Each expert's share of the routed tokens.
    pub share: Vec<f64>,
    /// Entropy of the shares over that of uniform use (1: even, 0: one expert).
    pub entropy: f64,
    /// Share of tokens no expert took (skip expert).
    pub skipped: f64,
    /// Share of tokens over an expert's capacity.
    pub overflowed: f64,
    /// Per task: its tokens' expert shares (evaluation reports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_task_share: Option<BTreeMap<String, Vec<f64>>>,
    /// Mutual information between task and expert, in bits (evaluation reports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_expert_mi_bits: Option<f64>,
}

/// One training step's line of the metrics log. A non-finite number is written as JSON
/// `null` and read back as NaN, so a diverged run's log still reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step (from 1).
    pub step: usize,
    /// The batch's task, or `mixed`.
    pub task: String,
    /// The training loss.
    #[serde(deserialize_with = "nan_when_null")]
    pub loss: f64,
    /// The learning rate.
    pub lr: f64,
    /// The gradient norm before clipping.
    #[serde(deserialize_with = "nan_when_null")]
    pub grad_norm: f64,
    /// Throughput over the recent steps.
    #[serde(deserialize_with = "nan_when_null")]
    pub examples_per_s: f64,
    /// Seconds since the training loop started.
    pub elapsed_s: f64,
    /// Auxiliary losses the adapters reported at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_losses: Option<BTreeMap<String, f64>>,
    /// Routing at this step, per routed point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<BTreeMap<String, RoutingPoint>>,
}

fn nan_when_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// What the fusions of a run attend to (`fusion_attention.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FusionAttentionReport {
    /// The split averaged over (`dev`).
    pub split: String,
    /// One entry per (task, fusion layer).
    pub fusions: Vec<FusionAttentionEntry>,
}

/// One fusion's mean attention over its members, per point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FusionAttentionEntry {
    /// The task whose rows ran.
    pub task: String,
    /// The fusion layer's name.
    pub fusion: String,
    /// The fused members, as the setup writes them.
    pub members: Vec<String>,
    /// Per point, in layer order.
    pub points: Vec<FusionAttentionPoint>,
}

/// A fusion's mean attention at one point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FusionAttentionPoint {
    /// The layer.
    pub layer: usize,
    /// The site (`ffn_output`).
    pub site: String,
    /// The real tokens averaged over.
    pub tokens: usize,
    /// The mean weight of each member.
    pub weights: Vec<f64>,
}

/// What `adapters eval --json` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EvalReport {
    /// A classification head on labelled data.
    Classification(ClassificationReport),
    /// A language model on text.
    Perplexity(PerplexityReport),
}

/// A classification head's figures on a data file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// The data file.
    pub data: PathBuf,
    /// The head's task.
    pub task: String,
    /// Rows scored.
    pub examples: usize,
    /// Share of rows predicted right.
    pub accuracy: f64,
    /// Mean F1 over the labels.
    pub macro_f1: f64,
    /// The attack on the embeddings the figures were made under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<Adversarial>,
    /// The character noise the texts were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub char_noise: Option<CharNoise>,
}

/// Character noise of an evaluation: the rate of edited letters and digits, and its seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CharNoise {
    /// Share of letters and digits edited.
    pub rate: f64,
    /// The seed of the edits.
    pub seed: u64,
}

/// A language model's figures on a text file (blocks of the max length).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PerplexityReport {
    /// The data file.
    pub data: PathBuf,
    /// Tokens scored.
    pub tokens: usize,
    /// Mean cross-entropy per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diverged_step_reads_back_with_a_nan_loss() {
        let line = r#"{"step":3,"task":"t","loss":null,"lr":0.001,"grad_norm":null,"examples_per_s":10.0,"elapsed_s":1.5}"#;
        let r: StepRecord = serde_json::from_str(line).unwrap();
        assert!(r.loss.is_nan() && r.grad_norm.is_nan());
        assert_eq!((r.step, r.elapsed_s), (3, 1.5));
    }

    #[test]
    fn an_eval_report_reads_back_as_the_kind_it_was() {
        let classification = EvalReport::Classification(ClassificationReport {
            data: "d.jsonl".into(),
            task: "t".into(),
            examples: 3,
            accuracy: 0.5,
            macro_f1: 0.25,
            attack: None,
            char_noise: Some(CharNoise { rate: 0.1, seed: 1 }),
        });
        let perplexity = EvalReport::Perplexity(PerplexityReport { data: "d.txt".into(), tokens: 10, loss: 2.0, perplexity: 2f64.exp() });
        for report in [classification, perplexity] {
            let text = serde_json::to_string(&report).unwrap();
            let back: EvalReport = serde_json::from_str(&text).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), text);
            assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(&report));
        }
    }
}
