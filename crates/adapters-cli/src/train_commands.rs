//! Training and using trained heads: `train`, `predict`, `eval`.

use crate::commands::{open_with, AdapterArgs, BaseArgs};
use adapters_core::ForwardCtx;
use adapters_models::heads::{pad, pool, pooled};
use adapters_models::saved_heads::{self, SavedHead};
#[cfg(feature = "hyper")]
use adapters_models::HoldsAdapters;
use adapters_models::LoadedModel;
use adapters_train::adversarial::{attacked_logits, Adversarial};
use adapters_train::config::Pooling;
use adapters_train::data::{read_labelled, read_text, Fields};
use adapters_train::forward::{argmax, lm_loss};
use adapters_train::metrics::{accuracy, macro_f1};
use adapters_train::noise::perturb_characters;
use adapters_train::records::{CharNoise, ClassificationReport, EvalReport, PerplexityReport};
use adapters_train::{Config, RunOptions, Trainer};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::io::IsTerminal;
use std::path::Path;

pub fn train(config: &Path, sets: &[String], resume: bool, stop_after: Option<usize>) -> Result<()> {
    let config = Config::load(config, sets)?;
    let mut trainer = Trainer::with_references(config.clone(), &crate::commands::device()?, &store_folder)?;
    let trainable = trainer.trainable_parameters();
    eprintln!(
        "{} mode, {} trainable parameters ({:.2}% of the base's {}), {} steps",
        serde_json::to_value(config.training.mode)?.as_str().unwrap_or("?"),
        trainable,
        100.0 * trainable as f64 / trainer.model().backbone.num_parameters().max(1) as f64,
        trainer.model().backbone.num_parameters(),
        trainer.total_steps()
    );
    let summary = trainer.run(&RunOptions { resume, stop_after, progress: std::io::stderr().is_terminal() })?;
    if !summary.finished {
        return Ok(());
    }
    for (task, r) in &summary.tasks {
        let show = |m: &std::collections::BTreeMap<String, f64>| {
            ["accuracy", "macro_f1", "perplexity"]
                .iter()
                .filter_map(|k| m.get(*k).map(|v| format!("{k} {v:.4}")))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{task}: test {}", show(&r.test));
        if !r.test_at_start.is_empty() {
            println!("{task}: test before training {}", show(&r.test_at_start));
        }
    }
    println!(
        "trainable parameters: {} ({:.2}% of the base's {}); {} steps in {:.0} s; outputs in {}",
        summary.trainable_parameters,
        100.0 * summary.trainable_share,
        summary.base_parameters,
        summary.steps,
        summary.seconds,
        summary.output.display()
    );
    Ok(())
}

/// `--task` and `--head`: the head to classify with and the task (or task mixture) that
/// hypernetwork adapters generate their adapters for.
#[cfg_attr(not(feature = "hyper"), allow(dead_code))]
pub struct TaskChoice {
    /// The head's task (`--head`, or `--task` when it names one task).
    head: Option<String>,
    /// `--task` as (task, weight) pairs; one pair of weight 1 for a plain task name.
    mixture: Option<Vec<(String, f64)>>,
    /// `--conditioning`: a vector of the task-embedding space.
    vector: Option<Vec<f32>>,
}

impl TaskChoice {
    /// Parses `--task NAME` or `--task 'a:0.5,b:0.5'`, `--head NAME` and `--conditioning '[...]'`.
    pub fn parse(task: Option<&str>, head: Option<&str>, conditioning: Option<&str>) -> Result<Self> {
        let vector = conditioning
            .map(|v| serde_json::from_str::<Vec<f32>>(v).with_context(|| format!("--conditioning {v:?}: expected a JSON array of numbers")))
            .transpose()?;
        let mixture = task.map(parse_mixture).transpose()?;
        let head = match (head, &mixture) {
            (Some(h), _) => Some(h.to_string()),
            (None, Some(m)) if m.len() == 1 && !task.unwrap_or_default().contains(':') => Some(m[0].0.clone()),
            (None, Some(_)) => bail!("--task {:?} mixes tasks; choose the head to classify with: --head TASK", task.unwrap_or_default()),
            (None, None) => None,
        };
        Ok(TaskChoice { head, mixture, vector })
    }

    /// The inference context for `rows` rows: with the task mixture's vector as every row's
    /// conditioning when task-conditioned hypernetworks are loaded (instance-conditioned
    /// ones read the input and need nothing).
    #[cfg(not(feature = "hyper"))]
    fn context(&self, _loaded: &LoadedModel, _rows: usize) -> Result<ForwardCtx> {
        Ok(ForwardCtx::inference())
    }

    #[cfg(feature = "hyper")]
    fn context(&self, loaded: &LoadedModel, rows: usize) -> Result<ForwardCtx> {
        let set = loaded.backbone.adapters();
        let by_task = |a: &std::sync::Arc<dyn adapters_core::Adapter>| {
            a.kind() == adapters_hyper::config::KIND && a.capabilities().conditioning.is_none()
        };
        let hypers: Vec<&str> = set.names().into_iter().filter(|n| set.get(n).is_some_and(by_task)).collect();
        let Some(first) = hypers.first() else { return Ok(ForwardCtx::inference()) };
        if let Some(v) = &self.vector {
            return every_row(&Tensor::new(v.as_slice(), loaded.backbone.device())?, rows);
        }
        let Some(mixture) = &self.mixture else {
            bail!(
                "the hypernetwork `{first}` generates its adapter for a task: give --task NAME, a mixture --task 'a:0.5,b:0.5' \
                 or a vector --conditioning '[...]'"
            )
        };
        let mut vector: Option<Tensor> = None;
        for name in &hypers {
            let v = adapters_hyper::task_vector_of(set.get(name).expect("listed").as_ref(), mixture)
                .with_context(|| format!("--task for the hypernetwork `{name}`"))?;
            if let Some(prev) = &vector {
                if prev.dims() != v.dims() || (prev - &v)?.abs()?.max_all()?.to_scalar::<f32>()? != 0.0 {
                    bail!("the hypernetworks {} embed the tasks differently; load one at a time", hypers.join(", "));
                }
            }
            vector = Some(v);
        }
        every_row(&vector.expect("at least one hypernetwork"), rows)
    }
}

/// The local folder of an adapter reference (`NAME@TAG`, `NAME@VERSION`) in the adapter
/// library `$ADAPTERS_STORE`, downloaded once into `$ADAPTERS_CACHE`; `None` for a text
/// that is no reference.
fn store_folder(from: &Path) -> std::result::Result<Option<std::path::PathBuf>, String> {
    let text = from.to_string_lossy();
    let Ok(reference) = text.parse::<adapters_store::Reference>() else { return Ok(None) };
    let Ok(store) = std::env::var("ADAPTERS_STORE") else {
        return Err(format!("no folder {text}; to take `{text}` from an adapter library, set ADAPTERS_STORE to its address"));
    };
    adapters_store::local_copy(&store, &reference, &adapters_store::default_cache_dir()).map(Some).map_err(|e| e.to_string())
}

/// An inference context with `vector` as the conditioning of each of `rows` rows.
#[cfg_attr(not(feature = "hyper"), allow(dead_code))]
fn every_row(vector: &Tensor, rows: usize) -> Result<ForwardCtx> {
    Ok(ForwardCtx::inference().with_conditioning(vector.unsqueeze(0)?.repeat((rows, 1))?))
}

/// `NAME` or `a:0.5,b:0.5` as (task, weight) pairs.
pub fn parse_mixture(spec: &str) -> Result<Vec<(String, f64)>> {
    if !spec.contains(':') {
        return Ok(vec![(spec.to_string(), 1.0)]);
    }
    spec.split(',')
        .map(|part| {
            let (name, weight) = part.split_once(':').with_context(|| format!("--task {spec:?}: `{part}` is not TASK:WEIGHT"))?;
            let weight: f64 = weight.trim().parse().with_context(|| format!("--task {spec:?}: the weight of `{name}` is not a number"))?;
            if !weight.is_finite() {
                bail!("--task {spec:?}: the weight of `{name}` is {weight}");
            }
            Ok((name.trim().to_string(), weight))
        })
        .collect()
}

/// The heads in the model folder and the adapter folders, narrowed to `task` if given.
fn find_head(model: &Path, adapters: &AdapterArgs, task: Option<&str>, loaded: &LoadedModel) -> Result<SavedHead> {
    let mut found = Vec::new();
    for dir in std::iter::once(model.to_path_buf()).chain(adapters.dirs()?) {
        if dir.is_dir() {
            found.extend(saved_heads::load_all(&dir, &loaded.backbone)?);
        }
    }
    let names: Vec<String> = found.iter().map(|h| format!("{} ({})", h.config.task, h.dir.display())).collect();
    let mut matching: Vec<SavedHead> = found.into_iter().filter(|h| task.is_none_or(|t| h.config.task == t)).collect();
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 if names.is_empty() => bail!(
            "no trained head in {} or the --adapter folders (heads live in a heads/TASK folder, which `adapters train` writes, or \
             are AdapterHub's head_config.json or a PEFT SEQ_CLS adapter's classifier)",
            model.display()
        ),
        0 => bail!("no head for task `{}`; found: {}", task.unwrap_or_default(), names.join(", ")),
        _ => bail!("several heads found, choose one with --task: {}", names.join(", ")),
    }
}

fn encode(loaded: &LoadedModel, text: &str, max_length: usize) -> Result<Vec<u32>> {
    Ok(adapters_train::encode_truncated(&loaded.tokenizer, text, max_length, loaded.backbone.is_encoder())?)
}

/// The forward context for `rows` rows; `vectors`: each row's own conditioning (a data
/// file's `conditioning` field), which replaces `task`'s for hypernetworks.
fn context_for(loaded: &LoadedModel, task: &TaskChoice, rows: usize, vectors: Option<Vec<&[f32]>>) -> Result<ForwardCtx> {
    match vectors {
        Some(v) => {
            let width = v[0].len();
            if v.iter().any(|r| r.len() != width) {
                bail!("the rows' `conditioning` arrays differ in length");
            }
            Ok(ForwardCtx::inference().with_conditioning(Tensor::from_vec(v.concat(), (v.len(), width), loaded.backbone.device())?))
        }
        None => task.context(loaded, rows),
    }
}

/// The head's logits for `ids` (see [`context_for`] for `vectors`).
fn logits_for(loaded: &LoadedModel, head: &SavedHead, task: &TaskChoice, ids: &[Vec<u32>], vectors: Option<Vec<&[f32]>>) -> Result<Tensor> {
    let ctx = context_for(loaded, task, ids.len(), vectors)?;
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let pooling: Pooling = head.config.pooling;
    let features = pooled(&loaded.backbone, &rows, pooling, &ctx)?;
    Ok(head.head.forward(&features, 0.0, &ctx)?)
}

/// Evaluation under perturbed inputs: an attack on the embeddings and noisy characters.
#[derive(clap::Args, Debug, Default)]
pub struct Robustness {
    /// Evaluate under attack: projected gradient ascent on the token embeddings against
    /// the gold labels, each token's perturbation inside an L2 ball of this radius (what
    /// `[training.adversarial]` trains against; MiniLM's embeddings have norms of ~1.1).
    #[arg(long, allow_negative_numbers = true)]
    pub attack_epsilon: Option<f64>,
    /// The attack's ascent steps.
    #[arg(long, default_value_t = 2, requires = "attack_epsilon")]
    pub attack_steps: usize,
    /// The attack's step length (default: the radius).
    #[arg(long, requires = "attack_epsilon", allow_negative_numbers = true)]
    pub attack_step_size: Option<f64>,
    /// Perturb each text's letters and digits at this rate before encoding: typos (a
    /// neighbouring key), swaps, dropped and doubled characters.
    #[arg(long, allow_negative_numbers = true)]
    pub char_noise: Option<f64>,
    /// Seeds --char-noise (row i uses seed + i): the same seed, the same test set.
    #[arg(long, default_value_t = 0, requires = "char_noise")]
    pub noise_seed: u64,
}

impl Robustness {
    fn attack(&self) -> Result<Option<Adversarial>> {
        let Some(epsilon) = self.attack_epsilon else { return Ok(None) };
        let attack = Adversarial { epsilon, steps: self.attack_steps, step_size: self.attack_step_size, weight: 1.0, kl: false };
        attack.check_named(|field| format!("`--attack-{}`", field.replace('_', "-")))?;
        Ok(Some(attack))
    }

    fn is_set(&self) -> bool {
        self.attack_epsilon.is_some() || self.char_noise.is_some()
    }
}

pub fn predict(
    model: &Path,
    adapters: &AdapterArgs,
    base: &BaseArgs,
    task: &TaskChoice,
    texts: &[String],
    max_length: usize,
    json: bool,
) -> Result<()> {
    let mut loaded = open_with(model, adapters)?;
    base.apply(&mut loaded)?;
    let head = find_head(model, adapters, task.head.as_deref(), &loaded)?;
    let ids = texts.iter().map(|t| encode(&loaded, t, max_length)).collect::<Result<Vec<_>>>()?;
    let probs = candle_nn::ops::softmax_last_dim(&logits_for(&loaded, &head, task, &ids, None)?)?.to_vec2::<f32>()?;
    let mut out = Vec::new();
    for (text, p) in texts.iter().zip(&probs) {
        let best = p.iter().enumerate().fold(0, |b, (i, &v)| if v > p[b] { i } else { b });
        let label = &head.config.labels[best];
        if json {
            let scores: serde_json::Map<String, serde_json::Value> =
                head.config.labels.iter().zip(p).map(|(l, v)| (l.clone(), serde_json::json!(v))).collect();
            out.push(serde_json::json!({"text": text, "label": label, "scores": scores}));
        } else {
            println!("{label}\t{:.3}\t{text}", p[best]);
        }
    }
    if json {
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn eval(
    model: &Path,
    adapters: &AdapterArgs,
    base: &BaseArgs,
    task: &TaskChoice,
    data: &Path,
    fields: Fields,
    max_length: usize,
    robustness: &Robustness,
    json: bool,
) -> Result<()> {
    let attack = robustness.attack()?;
    if let Some(rate) = robustness.char_noise.filter(|r| !(0.0..=1.0).contains(r)) {
        bail!("--char-noise {rate}: a rate is between 0 and 1");
    }
    let mut loaded = open_with(model, adapters)?;
    base.apply(&mut loaded)?;
    let is_text = data.extension().is_some_and(|e| e == "txt");
    if is_text && robustness.is_set() {
        bail!("--attack-epsilon and --char-noise evaluate classification (.jsonl / .csv), not perplexity on {}", data.display());
    }
    let result = if is_text {
        if loaded.backbone.is_encoder() {
            bail!("{}: perplexity on plain text needs a decoder model; for classification give a .jsonl or .csv file", data.display());
        }
        let ctx = ForwardCtx::inference();
        let eos = loaded.tokenizer.eos_token.as_deref().and_then(|t| loaded.tokenizer.token_id(t));
        let mut stream = Vec::new();
        for d in read_text(data)? {
            stream.extend(loaded.tokenizer.encode(&d, false)?);
            stream.extend(eos);
        }
        let blocks: Vec<&[u32]> = stream.chunks_exact(max_length).collect();
        if blocks.is_empty() {
            bail!("{}: fewer than {max_length} tokens", data.display());
        }
        let (mut nll, mut count) = (0.0, 0usize);
        for batch in blocks.chunks(8) {
            let (loss, n) = lm_loss(&loaded.backbone, batch, None, &ctx)?;
            nll += loss.to_scalar::<f32>()? as f64 * n as f64;
            count += n;
        }
        let loss = nll / count as f64;
        EvalReport::Perplexity(PerplexityReport { data: data.to_path_buf(), tokens: count, loss, perplexity: loss.exp() })
    } else {
        let head = find_head(model, adapters, task.head.as_deref(), &loaded)?;
        let examples = read_labelled(data, &fields)?.examples;
        let mut gold = Vec::new();
        for e in &examples {
            let label = head.config.label_index(&e.label).with_context(|| {
                let renamed: Vec<&str> = head.config.label_map.keys().map(String::as_str).collect();
                let also =
                    if renamed.is_empty() { String::new() } else { format!("; or, renamed by its label_map, {}", renamed.join(", ")) };
                format!(
                    "{}:{}: label `{}` is not one the head knows ({}{also})",
                    data.display(),
                    e.line,
                    e.label,
                    head.config.labels.join(", ")
                )
            })?;
            gold.push(label as u32);
        }
        let with_vectors = examples.iter().filter(|e| e.conditioning.is_some()).count();
        if with_vectors != 0 && with_vectors != examples.len() {
            let e = examples.iter().find(|e| e.conditioning.is_none()).expect("counted");
            bail!(
                "{}:{}: this row has no `conditioning` while {with_vectors} others have one; give it to every row or none",
                data.display(),
                e.line
            );
        }
        let mut pred = Vec::new();
        for (c, chunk) in examples.chunks(64).enumerate() {
            let text = |i: usize, t: &str| match robustness.char_noise {
                Some(rate) => perturb_characters(t, rate, robustness.noise_seed.wrapping_add((c * 64 + i) as u64)),
                None => t.to_string(),
            };
            let ids = chunk.iter().enumerate().map(|(i, e)| encode(&loaded, &text(i, &e.text), max_length)).collect::<Result<Vec<_>>>()?;
            let vectors = chunk.iter().map(|e| e.conditioning.as_deref()).collect::<Option<Vec<_>>>();
            let logits = match &attack {
                None => logits_for(&loaded, &head, task, &ids, vectors)?,
                Some(attack) => {
                    let ctx = context_for(&loaded, task, ids.len(), vectors)?;
                    let (padded, mask) = pad(&ids.iter().map(Vec::as_slice).collect::<Vec<_>>(), loaded.backbone.device())?;
                    let labels = Tensor::new(&gold[c * 64..c * 64 + chunk.len()], loaded.backbone.device())?;
                    let logits = |h: &Tensor, c: &ForwardCtx| {
                        Ok(head.head.forward(&pool(&loaded.backbone, h, &mask, head.config.pooling, c)?, 0.0, c)?)
                    };
                    attacked_logits(&loaded.backbone, &padded, &mask, &labels, &ctx, attack, logits)?
                }
            };
            pred.extend(argmax(&logits)?);
        }
        EvalReport::Classification(ClassificationReport {
            data: data.to_path_buf(),
            task: head.config.task.clone(),
            examples: gold.len(),
            accuracy: accuracy(&gold, &pred),
            macro_f1: macro_f1(&gold, &pred, head.config.labels.len()),
            attack,
            char_noise: robustness.char_noise.map(|rate| CharNoise { rate, seed: robustness.noise_seed }),
        })
    };
    let result = serde_json::to_value(&result)?;
    if json {
        println!("{result}");
    } else {
        for (k, v) in result.as_object().expect("an object") {
            println!("{k}: {}", v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
        }
    }
    Ok(())
}

/// The arguments of `adapters train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// The config file (model, adapters, tasks, training, output).
    pub config: std::path::PathBuf,
    /// Override a config value: `training.lr=5e-4`, `training.mode="head_only"`,
    /// `output.dir="runs/x"` (dotted key, TOML value). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in total (a checkpoint is written; --resume continues).
    #[arg(long, value_name = "STEPS")]
    pub stop_after: Option<usize>,
}

/// The arguments of `adapters predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    pub model: std::path::PathBuf,
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// The task: picks its head and, for hypernetwork adapters (hyper_bn), the adapter
    /// they generate. A hypernetwork also takes a mixture of its tasks,
    /// 'vader_tweets:0.5,rotten_tomatoes:0.5' (choose the head with --head).
    #[arg(long)]
    pub task: Option<String>,
    /// The task whose head classifies, when it is not --task (a task mixture).
    #[arg(long)]
    pub head: Option<String>,
    /// For hypernetworks: generate from this vector of the task-embedding space (a JSON
    /// array, e.g. one a caller learned or composed) instead of --task's embedding.
    #[arg(long, conflicts_with = "task")]
    pub conditioning: Option<String>,
    /// Longer texts are truncated to this many tokens.
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    /// Print JSON: [{"text", "label", "scores": {label: probability}}].
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub base: crate::commands::BaseArgs,
    #[command(flatten)]
    pub adapters: crate::commands::AdapterArgs,
}

/// The arguments of `adapters eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    pub model: std::path::PathBuf,
    /// The data file.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// The task: picks its head and, for hypernetwork adapters (hyper_bn), the adapter
    /// they generate. A hypernetwork also takes a mixture of its tasks,
    /// 'vader_tweets:0.5,rotten_tomatoes:0.5' (choose the head with --head).
    #[arg(long)]
    pub task: Option<String>,
    /// The task whose head classifies, when it is not --task (a task mixture).
    #[arg(long)]
    pub head: Option<String>,
    /// For hypernetworks: generate from this vector of the task-embedding space (a JSON
    /// array, e.g. one a caller learned or composed) instead of --task's embedding.
    #[arg(long, conflicts_with = "task")]
    pub conditioning: Option<String>,
    #[arg(long, default_value = "text")]
    pub text_field: String,
    #[arg(long, default_value = "label")]
    pub label_field: String,
    /// Skip bad rows instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Token limit per text (classification) or block length (perplexity).
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub robustness: Robustness,
    #[command(flatten)]
    pub base: crate::commands::BaseArgs,
    #[command(flatten)]
    pub adapters: crate::commands::AdapterArgs,
}
