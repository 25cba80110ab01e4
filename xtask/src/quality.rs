//! `cargo xtask quality`: the quality runs behind RESULTS.md. Trains every method on the
//! classification datasets with the same trainer and budget, the SmolLM2 causal-LM adapter
//! and the SmolLM2 chat adapter (then served, and asked a few held-out questions), then
//! writes RESULTS.md from the runs' summary.json files. A run whose summary exists is not
//! repeated, so the grid can be continued after an interruption.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

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

pub fn run(root: &Path, only: Option<&str>, report_only: bool) -> Result<()> {
    if !report_only {
        crate::fetch::fetch_all(root)?;
        crate::run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
        let cli = root.join("target/release/adapters");
        // Dataset by dataset, so an interrupted grid has every method on the first datasets.
        for (ds, epochs) in DATASETS {
            for (method, _, sets) in METHODS.iter().filter(|m| only.is_none_or(|o| o.split(',').any(|x| x == m.0))) {
                let out = format!("runs/quality/{ds}-{method}");
                if root.join(&out).join("summary.json").exists() {
                    continue;
                }
                let mut args = vec![
                    "train".to_string(),
                    format!("examples/{ds}.toml"),
                    "--set".into(),
                    format!("training.epochs={epochs}"),
                    "--set".into(),
                    format!("output.dir=\"{out}\""),
                ];
                for s in *sets {
                    args.push("--set".into());
                    args.push(s.replace("{ds}", ds));
                }
                let _ = std::fs::remove_dir_all(root.join(&out));
                crate::run(root, cli.to_str().unwrap(), &args.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
        }
        if only.is_none_or(|o| o.split(',').any(|x| x == "lm")) && !root.join("runs/quality/movie_dialog/summary.json").exists() {
            let _ = std::fs::remove_dir_all(root.join("runs/quality/movie_dialog"));
            crate::run(
                root,
                cli.to_str().unwrap(),
                &["train", "examples/movie_dialog.toml", "--set", "output.dir=\"runs/quality/movie_dialog\""],
            )?;
        }
        if only.is_none_or(|o| o.split(',').any(|x| x == "chat")) {
            if !root.join("runs/quality/movie_chat/summary.json").exists() {
                let _ = std::fs::remove_dir_all(root.join("runs/quality/movie_chat"));
                crate::run(
                    root,
                    cli.to_str().unwrap(),
                    &["train", "examples/movie_chat.toml", "--set", "output.dir=\"runs/quality/movie_chat\""],
                )?;
            }
            if !root.join(SERVED).exists() {
                serve_chat(root, &cli)?;
            }
            if only == Some("chat") {
                return update_chat_block(root);
            }
        }
    }
    write_results(root)
}

/// The chat adapter's answers through the server, next to the base model's.
const SERVED: &str = "runs/quality/movie_chat/served.json";

/// Pushes the trained chat adapter into a fresh library, serves it over SmolLM2, and asks
/// it and the base model the user turns of the first held-out conversations through
/// `/v1/chat/completions` (greedy, 30 tokens); writes what they answered to SERVED.
fn serve_chat(root: &Path, cli: &Path) -> Result<()> {
    let run = root.join("runs/quality/movie_chat");
    let library = run.join("library");
    let _ = std::fs::remove_dir_all(&library);
    let (adapter, library_str) = (run.join("adapters/movie_chat"), library.to_str().context("a UTF-8 path")?);
    let adapter = adapter.to_str().context("a UTF-8 path")?;
    crate::run(
        root,
        cli.to_str().context("a UTF-8 path")?,
        &["push", adapter, "--name", "movie-chat", "--tag", "prod", "--store", library_str],
    )?;
    let smol = root.join("models").join(crate::fetch::SMOLLM_GGUF);
    let cache = run.join("serve-cache");
    let (server, url) = crate::serve_demo::start(
        cli,
        &[smol.as_os_str(), "--store".as_ref(), library.as_os_str(), "--cache-dir".as_ref(), cache.as_os_str()],
    )?;
    let asked = (|| -> Result<Vec<serde_json::Value>> {
        let client = reqwest::blocking::Client::new();
        let test = std::fs::read_to_string(root.join("data/movie_chat/test.jsonl"))?;
        let mut out = Vec::new();
        for line in test.lines().take(5) {
            let row: serde_json::Value = serde_json::from_str(line)?;
            let (user, reference) = (&row["messages"][0]["content"], &row["messages"][1]["content"]);
            let mut answers = serde_json::Map::new();
            for model in ["base", "movie-chat@prod"] {
                let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": user}], "max_tokens": 30, "temperature": 0});
                let v: serde_json::Value =
                    client.post(format!("{url}/v1/chat/completions")).json(&body).send()?.error_for_status()?.json()?;
                answers.insert(model.into(), v["choices"][0]["message"]["content"].clone());
            }
            out.push(serde_json::json!({"user": user, "reference": reference, "answers": answers}));
        }
        Ok(out)
    })();
    crate::serve_demo::stop(server)?;
    std::fs::write(root.join(SERVED), serde_json::to_string_pretty(&asked?)?)?;
    Ok(())
}

fn summary(root: &Path, run: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(root.join("runs/quality").join(run).join("summary.json")).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_results(root: &Path) -> Result<()> {
    let mut md = String::from(
        "# Results\n\nWritten by `cargo xtask quality` from the runs in `runs/quality/` (each run's \
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
        let full = summary(root, &format!("{ds}-full")).and_then(|s| s["tasks"][ds]["test"]["accuracy"].as_f64());
        for (method, _, _) in METHODS {
            let Some(s) = summary(root, &format!("{ds}-{method}")) else {
                writeln!(md, "| {method} | not run | | | | | | |")?;
                continue;
            };
            let test = &s["tasks"][ds]["test"];
            let acc = test["accuracy"].as_f64().unwrap_or(f64::NAN);
            let delta = full.map(|f| format!("{:+.2}", 100.0 * (acc - f))).unwrap_or_default();
            writeln!(
                md,
                "| {method} | {:.2} | {delta} | {:.2} | {} | {:.2}% | {} | {:.0} s |",
                100.0 * acc,
                100.0 * test["macro_f1"].as_f64().unwrap_or(f64::NAN),
                s["trainable_parameters"],
                100.0 * s["trainable_share"].as_f64().unwrap_or(f64::NAN),
                s["best_step"],
                s["seconds"].as_f64().unwrap_or(0.0)
            )?;
        }
    }
    writeln!(md, "\n## movie_dialog: causal LM on SmolLM2-135M-Instruct\n")?;
    match summary(root, "movie_dialog") {
        Some(s) => {
            writeln!(
                md,
                "`examples/movie_dialog.toml`: seq_bn (reduction factor 16) on the frozen model, {} steps of \
                 8 x 128 tokens, lr 1e-3, seed 42. Held-out perplexity (first 64 blocks of 128 tokens of each \
                 split), before training and after:\n",
                s["steps"]
            )?;
            perplexity_table(&mut md, &s, "movie_dialog")?;
        }
        None => writeln!(md, "not run")?,
    }
    md.push_str(&chat_block(root)?);
    md.push_str(&crate::fusion_study::block(root)?);
    md.push_str(&crate::moe_study::block(root)?);
    extra_runs(root, &mut md)?;
    std::fs::write(root.join("RESULTS.md"), md).context("writing RESULTS.md")?;
    eprintln!("wrote RESULTS.md");
    Ok(())
}

const CHAT_BEGIN: &str = "<!-- chat: written by `cargo xtask quality --only chat` -->";
const CHAT_END: &str = "<!-- /chat -->";

/// The chat section from its run, or else as RESULTS.md has it.
fn chat_block(root: &Path) -> Result<String> {
    let mut fresh = String::new();
    chat_results(root, &mut fresh)?;
    marked_block(root, CHAT_BEGIN, CHAT_END, &fresh)
}

/// Replaces only the chat section of RESULTS.md (before the fusion study, or at the end).
fn update_chat_block(root: &Path) -> Result<()> {
    replace_block(root, CHAT_BEGIN, CHAT_END, &chat_block(root)?, "\n<!-- fusion-study")?;
    eprintln!("wrote the chat section of RESULTS.md");
    Ok(())
}

/// A section of RESULTS.md between two markers: `fresh` when its runs are here, or else
/// the section as RESULTS.md has it (the runs live on the machine that made them).
pub fn marked_block(root: &Path, begin: &str, end: &str, fresh: &str) -> Result<String> {
    if !fresh.is_empty() {
        return Ok(format!("\n{begin}\n{fresh}{end}\n"));
    }
    let current = std::fs::read_to_string(root.join("RESULTS.md")).unwrap_or_default();
    Ok(match (current.find(begin), current.find(end)) {
        (Some(a), Some(b)) if a < b => format!("\n{}{end}\n", &current[a..b]),
        _ => String::new(),
    })
}

/// Rewrites RESULTS.md with the section between `begin` and `end` replaced by `block`,
/// placed before the text `before` (else before "Other runs", else at the end).
pub fn replace_block(root: &Path, begin: &str, end: &str, block: &str, before: &str) -> Result<()> {
    let path = root.join("RESULTS.md");
    let mut text = std::fs::read_to_string(&path).context("reading RESULTS.md")?;
    if let (Some(a), Some(b)) = (text.find(begin), text.find(end)) {
        text.replace_range(a.saturating_sub(1)..(b + end.len() + 1).min(text.len()), "");
    }
    let at = text.find(before).or_else(|| text.find("\n## Other runs")).unwrap_or(text.len());
    text.insert_str(at, block);
    std::fs::write(&path, text).context("writing RESULTS.md")
}

/// A language-modelling run's perplexity before and after training on dev and test, and
/// its size and time.
fn perplexity_table(md: &mut String, s: &serde_json::Value, task: &str) -> Result<()> {
    let t = &s["tasks"][task];
    let ppl = |split: &str| t[split]["perplexity"].as_f64().unwrap_or(f64::NAN);
    writeln!(md, "| split | before | after | change |\n|---|---|---|---|")?;
    for (split, before, after) in [("dev", "dev_at_start", "dev"), ("test", "test_at_start", "test")] {
        let (b, a) = (ppl(before), ppl(after));
        writeln!(md, "| {split} | {b:.2} | {a:.2} | {:+.1}% |", 100.0 * (a / b - 1.0))?;
    }
    writeln!(
        md,
        "\nTrainable parameters: {} ({:.2}% of the base's {}); training loop {:.0} s.",
        s["trainable_parameters"],
        100.0 * s["trainable_share"].as_f64().unwrap_or(f64::NAN),
        s["base_parameters"],
        s["seconds"].as_f64().unwrap_or(0.0)
    )?;
    Ok(())
}

/// The chat run's section, or nothing when it has not run here.
fn chat_results(root: &Path, md: &mut String) -> Result<()> {
    let Some(s) = summary(root, "movie_chat") else { return Ok(()) };
    writeln!(md, "## movie_chat: a chat adapter on SmolLM2-135M-Instruct\n")?;
    writeln!(
        md,
        "`examples/movie_chat.toml` (`cargo xtask quality --only chat`): a seq_bn adapter (reduction factor 16) on the frozen \
         model, trained on the Cornell movie dialog exchanges as one-turn chats (the statement from the user, the reply \
         from the assistant; `data/movie_chat`), rendered with SmolLM2's chat template (which adds its default system \
         prompt); the loss is on the assistant's tokens only. {} steps of 16 conversations, lr 1e-3, seed 42. Held-out \
         perplexity of the assistant's tokens (reply and end-of-turn marker; the first 200 conversations of each split), \
         before training and after:\n",
        s["steps"]
    )?;
    perplexity_table(md, &s, "movie_chat")?;
    let Ok(text) = std::fs::read_to_string(root.join(SERVED)) else { return Ok(()) };
    let served: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    writeln!(
        md,
        "\nServed: the adapter pushed to a library as `movie-chat@prod` and `adapters serve` over SmolLM2 asked, through \
         `/v1/chat/completions` (greedy, at most 30 tokens), the user turns of the first held-out test conversations; \
         the base model's answers beside it. The adapter answers in the corpus' register (short, lower-case movie \
         lines, and it stops) in place of the assistant persona; greedy decoding also makes it pick the commonest \
         short replies (\"i'm sorry.\"), the usual blandness of greedy decoding on dialog data:\n\n| user | reference reply | base model | with the chat adapter |\n|---|---|---|---|"
    )?;
    let cell = |v: &serde_json::Value| v.as_str().unwrap_or("").replace('|', "\\|").replace('\n', " ");
    for q in served {
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            cell(&q["user"]),
            cell(&q["reference"]),
            cell(&q["answers"]["base"]),
            cell(&q["answers"]["movie-chat@prod"])
        )?;
    }
    Ok(())
}

/// Runs outside the grid (`runs/quality-extra/**/summary.json`: earlier budgets, tuning
/// tries), listed so that every figure quoted anywhere is in RESULTS.md.
fn extra_runs(root: &Path, md: &mut String) -> Result<()> {
    let mut found = Vec::new();
    let mut stack = vec![root.join("runs/quality-extra")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "summary.json") {
                found.push(path);
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    found.sort();
    writeln!(md, "\n## Other runs\n\nSame trainer; the run name says what differs from the example config.\n")?;
    writeln!(md, "| run | task | test accuracy | dev accuracy | trainable parameters | share of base |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for path in found {
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let name = path
            .parent()
            .and_then(|p| p.strip_prefix(root.join("runs/quality-extra")).ok())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        for (task, t) in s["tasks"].as_object().into_iter().flatten() {
            writeln!(
                md,
                "| {name} | {task} | {:.2} | {:.2} | {} | {:.2}% |",
                100.0 * t["test"]["accuracy"].as_f64().unwrap_or(f64::NAN),
                100.0 * t["dev"]["accuracy"].as_f64().unwrap_or(f64::NAN),
                s["trainable_parameters"],
                100.0 * s["trainable_share"].as_f64().unwrap_or(f64::NAN)
            )?;
        }
    }
    Ok(())
}
