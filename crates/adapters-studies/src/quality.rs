//! `cargo studies quality`: the quality runs behind RESULTS.md. Trains every method on
//! the classification datasets with the same trainer and budget, the SmolLM2 causal-LM
//! adapter and the SmolLM2 chat adapter (then served, and asked a few held-out
//! questions). A run whose summary exists is not repeated, so the grid can be continued
//! after an interruption.

use crate::results::{Section, CHAT, OTHER_RUNS, QUALITY};
use crate::runs::{best_step, pct, read_json, stop, test_accuracy, write_json, Cli, Runs, SMOLLM};
use adapters_train::records::{Split, Summary};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/quality";
/// Runs outside the grid (earlier budgets, tuning tries), listed in RESULTS.md so that
/// every figure quoted anywhere is there.
const EXTRA_RUNS: &str = "runs/quality-extra";

/// Datasets with their epoch budget (the same for every method).
const DATASETS: &[(&str, usize)] = &[("sms_spam", 2), ("trec_coarse", 3), ("rotten_tomatoes", 2)];

/// Methods: name, what it is, and the config overrides (`{ds}` is the dataset name).
const METHODS: &[(&str, &str, &[&str])] = &[
    ("head_only", "linear probe on the frozen model (lr 1e-2)", &["training.mode=\"head_only\"", "training.lr=1e-2"]),
    ("pfeiffer", "seq_bn, reduction factor 16, all layers", &[]),
    ("full", "full fine-tuning, no adapter (lr 5e-5)", &["training.mode=\"full\"", "training.lr=5e-5", "adapters={}"]),
    ("houlsby", "double_seq_bn, reduction factor 16", &["adapters.{ds}={kind=\"double_seq_bn\", reduction_factor=16}"]),
    ("parallel", "par_bn, reduction factor 16, scaling 4", &["adapters.{ds}={kind=\"par_bn\", reduction_factor=16}"]),
    (
        "lora",
        "LoRA r=8, alpha=16 on query and value",
        &["adapters.{ds}={kind=\"lora\", r=8, alpha=16, placement={sites=[\"query\",\"value\"]}}"],
    ),
];

pub fn run(cli: &Cli, only: Option<&str>) -> Result<()> {
    let root = cli.root();
    let chosen = |part: &str| only.is_none_or(|o| o.split(',').any(|x| x == part));
    // Dataset by dataset, so an interrupted grid has every method on the first datasets.
    for (ds, epochs) in DATASETS {
        for (method, _, sets) in METHODS.iter().filter(|m| chosen(m.0)) {
            let sets: Vec<String> =
                std::iter::once(format!("training.epochs={epochs}")).chain(sets.iter().map(|s| s.replace("{ds}", ds))).collect();
            cli.train(&format!("examples/{ds}.toml"), &format!("{RUNS}/{ds}-{method}"), &sets)?;
        }
    }
    if chosen("lm") {
        cli.train("examples/movie_dialog.toml", &format!("{RUNS}/movie_dialog"), &[])?;
    }
    if chosen("chat") {
        cli.train("examples/movie_chat.toml", &format!("{RUNS}/movie_chat"), &[])?;
        if !root.join(SERVED).exists() {
            serve_chat(cli)?;
        }
    }
    Ok(())
}

/// The chat adapter's answers through the server, next to the base model's.
const SERVED: &str = "runs/quality/movie_chat/served.json";

/// One held-out question and what the models answered, by model name.
#[derive(Serialize, Deserialize)]
struct Asked {
    user: String,
    reference: String,
    answers: BTreeMap<String, String>,
}

/// A conversation of `data/movie_chat`.
#[derive(Deserialize)]
struct Conversation {
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    content: String,
}

/// What `/v1/chat/completions` answers (the part read here).
#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
}

/// Pushes the trained chat adapter into a fresh library, serves it over SmolLM2, and asks
/// it and the base model the user turns of the first held-out conversations through
/// `/v1/chat/completions` (greedy, 30 tokens); writes what they answered to SERVED.
fn serve_chat(cli: &Cli) -> Result<()> {
    let root = cli.root();
    let run = root.join(RUNS).join("movie_chat");
    let library = run.join("library");
    let _ = std::fs::remove_dir_all(&library);
    let (adapter, library_str) = (run.join("adapters/movie_chat"), library.to_str().context("a UTF-8 path")?);
    let adapter = adapter.to_str().context("a UTF-8 path")?;
    cli.run(&["push", adapter, "--name", "movie-chat", "--tag", "prod", "--store", library_str])?;
    let smol = root.join(SMOLLM);
    let cache = run.join("serve-cache");
    let (server, url) =
        cli.serve(&[smol.as_os_str(), "--store".as_ref(), library.as_os_str(), "--cache-dir".as_ref(), cache.as_os_str()])?;
    let asked = (|| -> Result<Vec<Asked>> {
        let client = reqwest::blocking::Client::new();
        let test = std::fs::read_to_string(root.join("data/movie_chat/test.jsonl"))?;
        let mut out = Vec::new();
        for line in test.lines().take(5) {
            let row: Conversation = serde_json::from_str(line)?;
            let [user, reference, ..] = &row.messages[..] else {
                anyhow::bail!("data/movie_chat/test.jsonl: a conversation without a reply")
            };
            let mut answers = BTreeMap::new();
            for model in ["base", "movie-chat@prod"] {
                let body =
                    json!({"model": model, "messages": [{"role": "user", "content": user.content}], "max_tokens": 30, "temperature": 0});
                let v: Completion = client.post(format!("{url}/v1/chat/completions")).json(&body).send()?.error_for_status()?.json()?;
                let answer = v.choices.into_iter().next().context("a completion without choices")?.message.content;
                answers.insert(model.to_string(), answer);
            }
            out.push(Asked { user: user.content.clone(), reference: reference.content.clone(), answers });
        }
        Ok(out)
    })();
    stop(server)?;
    write_json(&root.join(SERVED), &asked?)
}

/// The study's sections of RESULTS.md, each when its runs are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let runs = Runs::load(root, RUNS)?;
    let mut out = Vec::new();
    if runs.all().any(|(name, _)| name != "movie_chat") {
        out.push((&QUALITY, tables(&runs)?));
    }
    if let Some(s) = runs.get("movie_chat") {
        let mut md = String::new();
        chat_results(root, s, &mut md)?;
        out.push((&CHAT, md));
    }
    let extra = Runs::load(root, EXTRA_RUNS)?;
    if extra.all().next().is_some() {
        let mut md = String::new();
        extra_runs(&extra, &mut md)?;
        out.push((&OTHER_RUNS, md));
    }
    Ok(out)
}

/// Every method on every dataset, and the causal-LM run.
fn tables(runs: &Runs) -> Result<String> {
    let mut md = String::from(
        "Written by `cargo studies quality` from the runs in `runs/quality/` (each run's \
         `summary.json`, `metrics.jsonl` and `curves.svg` are there). Base model all-MiniLM-L6-v2 \
         (22.7M parameters), frozen except in full fine-tuning. Same trainer and budget for every \
         method: the dataset's example config (`examples/DATASET.toml`: AdamW, lr 1e-3 unless noted, \
         weight decay 0.01 on matrices, 6% warmup then linear decay, batch 32, max length 128, \
         dropout 0.1 before the head, clipping at 1.0, seed 42), the epochs below, evaluation on dev \
         after every epoch and the best dev epoch kept (early stopping, patience 2). Test splits are \
         the fixed, seeded splits of `cargo xtask fetch`. \
         Accuracy and macro-F1 in percent; \"vs full fine-tuning\" in accuracy points. Time is the training \
         loop's wall time (without loading, and for head-only without computing the frozen features once) \
         on the shared 2-core machine, often with other jobs running: a rough guide, not a benchmark \
         (see BENCHMARKS.md for the training step).\n\n",
    );
    writeln!(md, "Methods:\n")?;
    for (name, what, _) in METHODS {
        writeln!(md, "- `{name}`: {what}")?;
    }
    for (ds, epochs) in DATASETS {
        writeln!(md, "\n## {ds} ({epochs} epoch{})\n", if *epochs == 1 { "" } else { "s" })?;
        writeln!(
            md,
            "| method | test accuracy | vs full fine-tuning | test macro-F1 | trainable parameters | share of base | best step | time |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        let full = runs.get(&format!("{ds}-full")).and_then(|s| s.metric(ds, Split::Test, "accuracy"));
        for (method, _, _) in METHODS {
            let Some(s) = runs.get(&format!("{ds}-{method}")) else {
                writeln!(md, "| {method} | not run | | | | | | |")?;
                continue;
            };
            let acc = s.metric(ds, Split::Test, "accuracy").unwrap_or(f64::NAN);
            let delta = full.map(|f| format!("{:+.2}", 100.0 * (acc - f))).unwrap_or_default();
            writeln!(
                md,
                "| {method} | {:.2} | {delta} | {:.2} | {} | {:.2}% | {} | {:.0} s |",
                100.0 * acc,
                pct(s, ds, Split::Test, "macro_f1"),
                s.trainable_parameters,
                100.0 * s.trainable_share,
                best_step(s),
                s.seconds
            )?;
        }
    }
    writeln!(md, "\n## movie_dialog: causal LM on SmolLM2-135M-Instruct\n")?;
    match runs.get("movie_dialog") {
        Some(s) => {
            writeln!(
                md,
                "`examples/movie_dialog.toml`: seq_bn (reduction factor 16) on the frozen model, {} steps of \
                 8 x 128 tokens, lr 1e-3, seed 42. Held-out perplexity (first 64 blocks of 128 tokens of each \
                 split), before training and after:\n",
                s.steps
            )?;
            perplexity_table(&mut md, s, "movie_dialog")?;
        }
        None => writeln!(md, "not run")?,
    }
    Ok(md)
}

/// A language-modelling run's perplexity before and after training on dev and test, and
/// its size and time.
fn perplexity_table(md: &mut String, s: &Summary, task: &str) -> Result<()> {
    let ppl = |split: Split| s.metric(task, split, "perplexity").unwrap_or(f64::NAN);
    writeln!(md, "| split | before | after | change |\n|---|---|---|---|")?;
    for (split, before, after) in [("dev", Split::DevAtStart, Split::Dev), ("test", Split::TestAtStart, Split::Test)] {
        let (b, a) = (ppl(before), ppl(after));
        writeln!(md, "| {split} | {b:.2} | {a:.2} | {:+.1}% |", 100.0 * (a / b - 1.0))?;
    }
    writeln!(
        md,
        "\nTrainable parameters: {} ({:.2}% of the base's {}); training loop {:.0} s.",
        s.trainable_parameters,
        100.0 * s.trainable_share,
        s.base_parameters,
        s.seconds
    )?;
    Ok(())
}

/// The chat run's section.
fn chat_results(root: &Path, s: &Summary, md: &mut String) -> Result<()> {
    writeln!(md, "## movie_chat: a chat adapter on SmolLM2-135M-Instruct\n")?;
    writeln!(
        md,
        "`examples/movie_chat.toml` (`cargo studies quality --only chat`): a seq_bn adapter (reduction factor 16) on the frozen \
         model, trained on the Cornell movie dialog exchanges as one-turn chats (the statement from the user, the reply \
         from the assistant; `data/movie_chat`), rendered with SmolLM2's chat template (which adds its default system \
         prompt); the loss is on the assistant's tokens only. {} steps of 16 conversations, lr 1e-3, seed 42. Held-out \
         perplexity of the assistant's tokens (reply and end-of-turn marker; the first 200 conversations of each split), \
         before training and after:\n",
        s.steps
    )?;
    perplexity_table(md, s, "movie_chat")?;
    let Some(served) = read_json::<Vec<Asked>>(&root.join(SERVED))? else { return Ok(()) };
    writeln!(
        md,
        "\nServed: the adapter pushed to a library as `movie-chat@prod` and `adapters serve` over SmolLM2 asked, through \
         `/v1/chat/completions` (greedy, at most 30 tokens), the user turns of the first held-out test conversations; \
         the base model's answers beside it. The adapter answers in the corpus' register (short, lower-case movie \
         lines, and it stops) in place of the assistant persona; greedy decoding also makes it pick the commonest \
         short replies (\"i'm sorry.\"), the usual blandness of greedy decoding on dialog data:\n\n| user | reference reply | base model | with the chat adapter |\n|---|---|---|---|"
    )?;
    let cell = |v: Option<&String>| v.map_or(String::new(), |v| v.replace('|', "\\|").replace('\n', " "));
    for q in &served {
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            cell(Some(&q.user)),
            cell(Some(&q.reference)),
            cell(q.answers.get("base")),
            cell(q.answers.get("movie-chat@prod"))
        )?;
    }
    Ok(())
}

/// The runs outside the grid, each task's figures.
fn extra_runs(runs: &Runs, md: &mut String) -> Result<()> {
    writeln!(md, "\n## Other runs\n\nSame trainer; the run name says what differs from the example config.\n")?;
    writeln!(md, "| run | task | test accuracy | dev accuracy | trainable parameters | share of base |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for (name, s) in runs.all() {
        for task in s.tasks.keys() {
            writeln!(
                md,
                "| {name} | {task} | {:.2} | {:.2} | {} | {:.2}% |",
                test_accuracy(s, task),
                pct(s, task, Split::Dev, "accuracy"),
                s.trainable_parameters,
                100.0 * s.trainable_share
            )?;
        }
    }
    Ok(())
}
