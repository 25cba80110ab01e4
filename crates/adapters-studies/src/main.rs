//! `cargo studies`: the research studies behind RESULTS.md. Each trains and evaluates
//! through the release `adapters` binary (so a study measures what users run), keeps
//! finished runs under `runs/` so it can be continued after an interruption, reads the
//! runs back through the trainer's and the CLI's own types, and ends by rewriting
//! RESULTS.md through its one writer ([`results`]).

mod continual;
mod fed;
mod fusion;
mod hyper;
mod int8;
mod moe;
mod qlora;
mod quality;
mod results;
mod robust;
mod runs;
mod versus;

use anyhow::Result;
use clap::{Parser, Subcommand};
use results::Section;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(about = "The studies behind RESULTS.md: each trains through the release `adapters` binary, keeps finished runs under \
             runs/ (an interrupted study continues where it stopped) and rewrites the sections of RESULTS.md whose runs \
             are on this machine")]
struct Cli {
    #[command(subcommand)]
    study: Study,
}

#[derive(Subcommand)]
enum Study {
    /// Every method on SMS spam, TREC coarse and Rotten Tomatoes with the same budget, the
    /// SmolLM2 causal-LM adapter and the SmolLM2 chat adapter (served and asked held-out
    /// questions). Slow (hours on 2 cores).
    Quality {
        /// Only these methods (comma-separated: head_only, pfeiffer, full, houlsby,
        /// parallel, lora, lm, chat).
        #[arg(long)]
        only: Option<String>,
    },
    /// AdapterFusion for low-resource tasks: for Rotten Tomatoes and VADER tweets with 500
    /// training examples each, the task's own Pfeiffer adapter against a fusion of it with
    /// frozen adapters trained on the other datasets (fixtures/fusion-sources), 3 seeds
    /// each. About 40 minutes on 2 cores.
    Fusion,
    /// One mixture-of-experts adapter shared by SMS spam, TREC coarse and Rotten Tomatoes
    /// (mixed-task batches) against a shared Pfeiffer adapter with as many parameters per
    /// token and per-task adapters; the mixture without balance loss, with sequence
    /// routing, and AdaMix-style merged by `adapters merge-experts`; then the shared
    /// adapter against the mixture at twice the steps, three seeds each. About 70 + 30
    /// minutes on 2 cores.
    Moe {
        /// Only these parts (comma-separated: arms, longer).
        #[arg(long)]
        only: Option<String>,
    },
    /// One hypernetwork for SMS spam, TREC coarse, Rotten Tomatoes and VADER tweets
    /// (mixed-task batches) against per-task Pfeiffer adapters on the same batches;
    /// conditioned on the input instead of the task; TREC fine learned with the generator
    /// frozen against a full adapter; the sentiment tasks' interpolated adapter exported
    /// and evaluated, with each task's head and with one head the two sentiment tasks
    /// share. About 50 minutes on 2 cores.
    Hyper {
        /// Only these runs (comma-separated: per_task, hyper, hyper_instance, new_task,
        /// new_task_adapter, shared_head); the exports need `hyper` and `shared_head`.
        #[arg(long)]
        only: Option<String>,
    },
    /// Federated averaging: Rotten Tomatoes dealt into 4 client shards, 4 rounds of 40
    /// local steps per client from the server's adapter and averaging by sample count
    /// (`adapters average`), against each client alone and one adapter trained centrally.
    /// About 20 minutes on 2 cores.
    Fed,
    /// Continual learning: SMS spam then TREC coarse by full fine-tuning, by one adapter
    /// per task and by one adapter trained on both in turn, each re-tested on SMS
    /// afterwards. About 25 minutes on 2 cores.
    Continual,
    /// Adapters against LoRA: Pfeiffer, Houlsby, parallel and LoRA at about 113k
    /// parameters each on SMS spam, TREC coarse and Rotten Tomatoes, same budget and seed.
    /// About 30 minutes on 2 cores.
    Versus,
    /// Robustness: plain and adversarially trained (PGD or SMART, the arm chosen on dev)
    /// Pfeiffer adapters on SMS spam and Rotten Tomatoes, three seeds each, tested clean,
    /// under PGD on the embeddings and with character noise, with the cost per step. About
    /// 80 minutes on 2 cores.
    Robust,
    /// 8-bit projections: the example adapters on SMS spam, TREC coarse and Rotten
    /// Tomatoes' test sets with the base in f32 and with `--quantize int8`. About a minute.
    Int8,
    /// Adapters over a quantized base: the movie-dialog adapter trained over SmolLM2
    /// de-quantised to f32 and over its Q4_1 blocks kept packed (QLoRA-style), with the
    /// held-out perplexity of each. About 15 minutes on 2 cores.
    Qlora,
    /// Only rewrite RESULTS.md from the runs on this machine (no training).
    Report,
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let prepare = || runs::Cli::prepare(&root);
    match Cli::parse().study {
        Study::Quality { only } => quality::run(&prepare()?, only.as_deref())?,
        Study::Fusion => fusion::run(&prepare()?)?,
        Study::Moe { only } => moe::run(&prepare()?, only.as_deref())?,
        Study::Hyper { only } => hyper::run(&prepare()?, only.as_deref())?,
        Study::Fed => fed::run(&prepare()?)?,
        Study::Continual => continual::run(&prepare()?)?,
        Study::Versus => versus::run(&prepare()?)?,
        Study::Robust => robust::run(&prepare()?)?,
        Study::Int8 => int8::run(&prepare()?)?,
        Study::Qlora => qlora::run(&prepare()?)?,
        Study::Report => {}
    }
    results::update(&root, &sections(&root)?)
}

/// The fresh text of every section whose runs are on this machine.
fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let mut all = Vec::new();
    for study in [
        quality::sections,
        fusion::sections,
        moe::sections,
        hyper::sections,
        fed::sections,
        continual::sections,
        versus::sections,
        robust::sections,
        int8::sections,
        qlora::sections,
    ] {
        all.extend(study(root)?);
    }
    Ok(all)
}
