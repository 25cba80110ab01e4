//! `cargo studies hyper`: one hypernetwork trained on four classification tasks (SMS
//! spam, TREC coarse, Rotten Tomatoes, VADER tweets) on mixed-task batches, against
//! per-task Pfeiffer adapters trained on the same batches; the hypernetwork conditioned on
//! each input instead of its task; an unseen task (TREC fine) learned with the generator
//! frozen against a full adapter; and the two sentiment tasks' interpolated adapter, all
//! through `adapters hyper-export` and `adapters eval`. Writes its section of RESULTS.md.
//! Finished runs are skipped.

use crate::results::{Section, HYPER, HYPER_SHARED_HEAD};
use crate::runs::{read_json, test_accuracy, write_json, Cli, Runs, MINILM};
use adapters_train::metrics::MetricsLog;
use adapters_train::records::{ClassificationReport, Summary, METRICS_FILE};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/hyper-study";
const TASKS: &[&str] = &["sms_spam", "trec_coarse", "rotten_tomatoes", "vader_tweets"];
/// (run, config, overrides, what it is).
const ARMS: &[(&str, &str, &[&str], &str)] = &[
    ("per_task", "examples/per_task4_multitask.toml", &[], "one Pfeiffer adapter (r = 24) per task"),
    ("hyper", "examples/hyper_multitask.toml", &[], "hypernetwork, conditioned on the task"),
    (
        "hyper_instance",
        "examples/hyper_multitask.toml",
        &["adapters.hyper.conditioning=\"instance\""],
        "hypernetwork, conditioned on the input (its mean token embedding)",
    ),
    (
        "new_task",
        "examples/hyper_new_task.toml",
        &["adapters.hyper.generator_from=\"runs/hyper-study/hyper/adapters/hyper\""],
        "TREC fine on the frozen generator: a new task embedding and the head",
    ),
    (
        "new_task_adapter",
        "examples/trec_fine.toml",
        &["model.max_length=64", "training.steps=400", "training.eval_every=100", "training.early_stopping.patience=10"],
        "TREC fine with a full Pfeiffer adapter (r = 24)",
    ),
    ("shared_head", "examples/hyper_multitask.toml", SHARED_HEAD, "hypernetwork, the two sentiment tasks sharing one head"),
];
/// The sentiment tasks (`[[task]]` 2 and 3) trained with one binary head, their labels
/// renamed to the head's.
const SHARED_HEAD: &[&str] = &[
    "task.2.head=\"sentiment\"",
    "task.2.label_map={ fresh = \"positive\", rotten = \"negative\" }",
    "task.3.head=\"sentiment\"",
    "task.3.label_map={ pos = \"positive\", neg = \"negative\" }",
];
/// Rotten Tomatoes' weight in the interpolated task embeddings of the shared-head run
/// (Vader tweets' is one minus it).
const RT_WEIGHTS: &[f64] = &[0.0, 0.25, 0.5, 0.75, 1.0];
/// The interpolated adapter: the two sentiment tasks' embeddings, averaged.
const MIXTURE: &str = "vader_tweets:0.5,rotten_tomatoes:0.5";
/// The exported adapters' test figures, by `FORM TEST-SET`.
const EXPORTS_EVALS: &str = "exports-evals.json";
/// The shared-head run's interpolated adapters' test figures, by `WEIGHT TEST-SET`.
const SHARED_HEAD_EVALS: &str = "shared-head-evals.json";
/// Test figures by name.
type Evals = BTreeMap<String, ClassificationReport>;

pub fn run(cli: &Cli, only: Option<&str>) -> Result<()> {
    let root = cli.root();
    let chosen = |name: &str| only.is_none_or(|o| o.split(',').any(|x| x == name));
    for (name, config, sets, _) in ARMS.iter().filter(|a| chosen(a.0)) {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        cli.train(config, &format!("{RUNS}/{name}"), &sets)?;
    }
    // The generated adapters as plain folders: each sentiment task's and their mixture's.
    let runs = Runs::load(root, RUNS)?;
    let evals = root.join(RUNS).join(EXPORTS_EVALS);
    if !evals.exists() && runs.get("hyper").is_some() {
        let mut out = Evals::new();
        for (form, task) in [("rotten_tomatoes", "rotten_tomatoes"), ("vader_tweets", "vader_tweets"), ("mixture", MIXTURE)] {
            let dir = format!("{RUNS}/export-{form}");
            let _ = std::fs::remove_dir_all(root.join(&dir));
            cli.run(&["hyper-export", &format!("{RUNS}/hyper/adapters/hyper"), "--model", MINILM, "--task", task, "--out", &dir])?;
            for test in ["rotten_tomatoes", "vader_tweets"] {
                let data = format!("data/{test}/test.jsonl");
                out.insert(format!("{form} {test}"), cli.eval(&dir, &data, &["--task", test])?);
            }
        }
        write_json(&evals, &out)?;
    }
    if runs.get("shared_head").is_some() {
        shared_head_evals(cli)?;
    }
    Ok(())
}

/// The shared-head run's interpolated adapters (`RT_WEIGHTS`), each exported and scored
/// with the shared head on both sentiment test sets (kept in `shared-head-evals.json`).
fn shared_head_evals(cli: &Cli) -> Result<()> {
    let root = cli.root();
    let path = root.join(RUNS).join(SHARED_HEAD_EVALS);
    if path.exists() {
        return Ok(());
    }
    let mut out = Evals::new();
    for w in RT_WEIGHTS {
        let task = format!("rotten_tomatoes:{w},vader_tweets:{}", 1.0 - w);
        let dir = format!("{RUNS}/shared-export-{w}");
        let _ = std::fs::remove_dir_all(root.join(&dir));
        let generator = format!("{RUNS}/shared_head/adapters/hyper");
        cli.run(&["hyper-export", &generator, "--model", MINILM, "--task", &task, "--out", &dir])?;
        for test in ["rotten_tomatoes", "vader_tweets"] {
            let data = format!("data/{test}/test.jsonl");
            out.insert(format!("{w} {test}"), cli.eval(&dir, &data, &["--head", "sentiment"])?);
        }
    }
    write_json(&path, &out)
}

/// The study's sections of RESULTS.md, each when its runs are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let runs = Runs::load(root, RUNS)?;
    let mut out = Vec::new();
    if runs.get("hyper").is_some() {
        let mut md = String::new();
        write(root, &runs, &mut md)?;
        out.push((&HYPER, md));
    }
    if let (Some(s), Some(evals)) = (runs.get("shared_head"), read_json(&root.join(RUNS).join(SHARED_HEAD_EVALS))?) {
        let mut md = String::new();
        shared_head_section(s, &evals, &mut md)?;
        out.push((&HYPER_SHARED_HEAD, md));
    }
    Ok(out)
}

/// Test accuracy in percent of an evaluation by name (NaN when it has not run).
fn accuracy(evals: &Evals, name: &str) -> f64 {
    evals.get(name).map_or(f64::NAN, |r| 100.0 * r.accuracy)
}

fn shared_head_section(run: &Summary, evals: &Evals, md: &mut String) -> Result<()> {
    writeln!(
        md,
        "\n### Interpolating the sentiment tasks under one shared head\n\nThe same hypernetwork run (`examples/hyper_multitask.toml`, \
         seed 42) with Rotten Tomatoes and VADER tweets sharing one binary head: `--set 'task.2.head=\"sentiment\"' --set \
         'task.2.label_map={{ fresh = \"positive\", rotten = \"negative\" }}'` and the same for `task.3` with `pos`/`neg`. \
         Trainer's test accuracy after training: {:.2} (SMS spam), {:.2} (TREC coarse), {:.2} (Rotten Tomatoes), {:.2} (VADER tweets). \
         Then `adapters hyper-export --task 'rotten_tomatoes:w,vader_tweets:1-w'` for each w, and `adapters eval --head \
         sentiment --max-length 64` of the exported plain Pfeiffer folder on both sentiment test sets (the head reads each \
         set's own label names through its `label_map`). Test accuracy in percent:\n",
        test_accuracy(run, "sms_spam"),
        test_accuracy(run, "trec_coarse"),
        test_accuracy(run, "rotten_tomatoes"),
        test_accuracy(run, "vader_tweets"),
    )?;
    writeln!(md, "| Rotten Tomatoes weight w | rotten_tomatoes test | vader_tweets test | mean |\n|---|---|---|---|")?;
    let mut best = (f64::MIN, 0.0);
    for w in RT_WEIGHTS {
        let acc = |test: &str| accuracy(evals, &format!("{w} {test}"));
        let (rt, vader) = (acc("rotten_tomatoes"), acc("vader_tweets"));
        let mean = (rt + vader) / 2.0;
        writeln!(md, "| {w} | {rt:.2} | {vader:.2} | {mean:.2} |")?;
        if mean > best.0 {
            best = (mean, *w);
        }
    }
    let four: f64 = TASKS.iter().map(|t| test_accuracy(run, t)).sum::<f64>() / TASKS.len() as f64;
    writeln!(
        md,
        "\nMoving w trades one test set's accuracy for the other's step by step; the best mean of the two is at w = {} ({:.2}). \
         Over the four tasks this run's mean test accuracy is {four:.2} (the hypernetwork with a head per task: first table).",
        best.1, best.0
    )?;
    let same = [("1", "rotten_tomatoes"), ("0", "vader_tweets")]
        .iter()
        .all(|(w, t)| (accuracy(evals, &format!("{w} {t}")) - test_accuracy(run, t)).abs() < 1e-9);
    writeln!(
        md,
        "\nThe pure ends (w = 1 on Rotten Tomatoes, w = 0 on VADER) {} the trainer's accuracy for that task.",
        if same { "reproduce exactly" } else { "do not reproduce" }
    )?;
    Ok(())
}

fn write(root: &Path, runs: &Runs, md: &mut String) -> Result<()> {
    let hyper = runs.get("hyper").context("the hyper run")?;
    writeln!(md, "\n## Hypernetwork: one generator for four tasks\n")?;
    writeln!(
        md,
        "`cargo studies hyper`. Four visible classification tasks trained jointly on frozen all-MiniLM-L6-v2: every batch \
         of 32 mixes the tasks by temperature sampling (T = 2), each task has its own head, {} steps (about one pass over the \
         four training sets), lr 1e-3, max length 64, seed 42, the best dev step (mean accuracy, every 200 steps) kept. The \
         per-task adapters train on the same batches, each row through its task's adapter, so every task gets the same \
         examples and steps in both arms. The hypernetwork (`examples/hyper_multitask.toml`, after HyperFormer++): task \
         embeddings (64), layer-id and site embeddings (16 each), a projector (96 → 64 → 8, ReLU, then a layer norm without \
         parameters) to an 8-number code, and one generator head per tensor of a Pfeiffer adapter (r = 24), each `G · code + \
         c`; rows of different tasks run in one forward with per-row weights. Test accuracy in percent; parameters stored \
         without the heads.\n",
        hyper.steps
    )?;
    writeln!(md, "| arm | {} | mean | adapter parameters stored |", TASKS.join(" | "))?;
    writeln!(md, "|---|{}---|---|", "---|".repeat(TASKS.len()))?;
    let mut means = std::collections::BTreeMap::new();
    for (name, _, _, what) in ARMS.iter().filter(|a| !a.0.starts_with("new_task")) {
        let Some(s) = runs.get(name) else {
            writeln!(md, "| {what} | not run |")?;
            continue;
        };
        let accs: Vec<f64> = TASKS.iter().map(|t| test_accuracy(s, t)).collect();
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        means.insert(*name, (mean, runs.adapter_parameters(name).unwrap_or(0)));
        let cells: Vec<String> = accs.iter().map(|a| format!("{a:.2}")).collect();
        writeln!(md, "| {what} | {} | **{mean:.2}** | {} |", cells.join(" | "), means[name].1)?;
    }
    writeln!(
        md,
        "\nWhy the generator is this small: at MiniLM's size one Pfeiffer adapter holds 2 · 384 · 24 + 24 + 384 = 18,840 \
         parameters per layer, 113,040 for six layers, 452,160 for four tasks. A HyperFormer head that maps a 64-number \
         embedding straight to a 384 x 24 matrix holds 64 · 9,216 = 589,824 parameters, more than all four tasks' adapters. \
         Here every head reads an 8-number code and adds a start value: (8 + 1) · 18,840 = 169,560 for the four tensors of a \
         layer's adapter, shared by all layers and tasks; with the projector (96 · 64 + 64 + 64 · 8 + 8 = 6,728) and the \
         embeddings (4 · 64 + 6 · 16 + 16 = 368) that is 176,656, 39% of the per-task adapters' total.\n"
    )?;
    writeln!(
        md,
        "Stability (hypernetworks are known to diverge when the generated weights' scale follows the embeddings'): the \
         code passes through a layer norm without parameters, so its scale is fixed whatever the embeddings and projector \
         learn; every head starts from a small random adapter `c` (normal, std 0.014 for the weights, zero biases) and a \
         task-dependent part `G · code` half that size, so the generated adapters start near the identity (the model's \
         output moves about as much as with a fresh Pfeiffer adapter, tested) and apart from each other; the trainer clips \
         the gradient norm at 1 as in every run. {}\n",
        diverged(runs)?
    )?;
    if let (Some((h, hp)), Some((p, pp))) = (means.get("hyper"), means.get("per_task")) {
        let verdict = if p - h <= 1.0 { "within" } else { "not within" };
        writeln!(
            md,
            "The task-conditioned hypernetwork is {verdict} 1 point of the per-task adapters' mean ({h:.2} against {p:.2}, \
             {:+.2}) while storing {hp} parameters against their {pp} ({:.0}%).",
            h - p,
            100.0 * *hp as f64 / *pp as f64
        )?;
    }
    if let Some((i, _)) = means.get("hyper_instance") {
        writeln!(md, "Conditioned on each input's mean token embedding instead of its task, the same generator reaches {i:.2}.")?;
    }
    new_task(runs, md)?;
    mixture(root, runs, md)?;
    Ok(())
}

/// Whether any hypernetwork run logged a non-finite training loss.
fn diverged(runs: &Runs) -> Result<String> {
    let done: Vec<&str> = ["hyper", "hyper_instance", "new_task", "shared_head"].into_iter().filter(|r| runs.get(r).is_some()).collect();
    let mut bad = Vec::new();
    for run in &done {
        if !MetricsLog::steps(&runs.dir(run).join(METRICS_FILE))?.iter().all(|r| r.loss.is_finite()) {
            bad.push(*run);
        }
    }
    Ok(match bad.as_slice() {
        [] => format!("Every training step of the {} hypernetwork runs logged a finite loss.", done.len()),
        runs => format!("Non-finite training losses in: {}.", runs.join(", ")),
    })
}

/// The unseen task: a new task embedding on the frozen generator against a full adapter.
fn new_task(runs: &Runs, md: &mut String) -> Result<()> {
    let rows: Vec<(&str, &Summary)> = ["new_task", "new_task_adapter"].iter().filter_map(|r| runs.get(r).map(|s| (*r, s))).collect();
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "\nA task the hypernetwork never saw, TREC fine (50 question types), {} steps at batch 32 (about three epochs), max \
         length 64. With the generator frozen (`examples/hyper_new_task.toml`: `generator_from`, `train = \"task_embeddings\"`, \
         lr 1e-2) only the new task's embedding and its head train; the full adapter is `examples/trec_fine.toml` (lr 1e-3) \
         with the same steps and length.\n",
        rows[0].1.steps
    )?;
    writeln!(md, "| arm | test accuracy | adapter parameters trained |\n|---|---|---|")?;
    for (run, s) in &rows {
        let what = ARMS.iter().find(|a| a.0 == *run).map_or("", |a| a.3);
        let trained = runs.adapter_parameters(run).unwrap_or(0);
        writeln!(md, "| {what} | {:.2} | {trained} |", test_accuracy(s, "trec_fine"))?;
    }
    Ok(())
}

/// The sentiment tasks' exported adapters and their mixture on both sentiment test sets.
fn mixture(root: &Path, runs: &Runs, md: &mut String) -> Result<()> {
    let Some(evals) = read_json::<Evals>(&root.join(RUNS).join(EXPORTS_EVALS))? else { return Ok(()) };
    writeln!(
        md,
        "\nInterpolated task embeddings: `adapters hyper-export --task '{MIXTURE}'` writes the adapter generated from the \
         mean of the two sentiment tasks' embeddings as a plain Pfeiffer folder; beside it the two pure tasks' exports. \
         Each evaluated with `adapters eval --max-length 64` on both sentiment test sets, each test set with its own task's \
         head (the next section shares one head between the two tasks):\n"
    )?;
    writeln!(md, "| exported adapter | rotten_tomatoes test | vader_tweets test |\n|---|---|---|")?;
    for (form, what) in [("rotten_tomatoes", "rotten_tomatoes"), ("vader_tweets", "vader_tweets"), ("mixture", MIXTURE)] {
        let acc = |test: &str| accuracy(&evals, &format!("{form} {test}"));
        writeln!(md, "| {what} | {:.2} | {:.2} |", acc("rotten_tomatoes"), acc("vader_tweets"))?;
    }
    if let Some(hyper) = runs.get("hyper") {
        let same = ["rotten_tomatoes", "vader_tweets"]
            .iter()
            .all(|t| (accuracy(&evals, &format!("{t} {t}")) - test_accuracy(hyper, t)).abs() < 1e-9);
        writeln!(
            md,
            "\nEach pure export {} the hypernetwork's own test accuracy for its task (the trainer's figures in the first table): \
             the exported folder is the generated adapter.",
            if same { "reproduces exactly" } else { "does not reproduce" }
        )?;
    }
    Ok(())
}
