//! `cargo studies qlora`: the movie-dialog adapter (`examples/movie_dialog.toml`: seq_bn,
//! 100 steps on SmolLM2-135M-Instruct) trained over the de-quantised f32 base and over the
//! shipped Q4_1 file's blocks kept packed (`model.base_weights = "packed"`, QLoRA-style),
//! with the held-out perplexity of each and the memory the base weights take. Writes its
//! section of RESULTS.md.

use crate::results::{Section, QLORA};
use crate::runs::{Cli, Runs, SMOLLM};
use adapters_models::{load_with, Backbone, BaseWeights};
use adapters_train::records::Split;
use anyhow::{Context, Result};
use candle_core::Device;
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/qlora-study";
const ARMS: [(&str, BaseWeights); 2] = [("f32", BaseWeights::F32), ("packed", BaseWeights::Packed)];
/// The most held-out perplexity the packed base may cost (issue 35), relative.
const TOLERANCE: f64 = 0.02;

pub fn run(cli: &Cli) -> Result<()> {
    for (arm, _) in ARMS {
        let set = format!("model.base_weights=\"{arm}\"");
        cli.train("examples/movie_dialog.toml", &format!("{RUNS}/{arm}"), &[set])?;
    }
    Ok(())
}

/// Bytes of SmolLM2's base weights in memory as each arm keeps them.
fn weight_bytes(root: &Path, base: BaseWeights) -> Result<usize> {
    match load_with(&root.join(SMOLLM), &Device::Cpu, base)?.backbone {
        Backbone::Llama(m) => Ok(m.weight_bytes()),
        Backbone::Bert(_) => anyhow::bail!("SmolLM2 loads as a decoder"),
    }
}

/// The study's section of RESULTS.md, when both runs are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let runs = Runs::load(root, RUNS)?;
    let (Some(dense), Some(packed)) = (runs.get("f32"), runs.get("packed")) else { return Ok(vec![]) };
    let ppl = |s: &adapters_train::records::Summary, split| s.metric("movie_dialog", split, "perplexity").context("a perplexity");
    let mut md = String::new();
    writeln!(md, "\n## Adapters over a quantized base (`cargo studies qlora`)\n")?;
    writeln!(
        md,
        "`examples/movie_dialog.toml` (seq_bn, reduction factor 16, {} steps of 8 x 128 tokens, lr 1e-3, seed 42) on \
         SmolLM2-135M-Instruct from its shipped Q4_1 GGUF file, trained twice: over the base de-quantised to f32 at load, and \
         with the projections kept in their Q4_1 blocks (`model.base_weights = \"packed\"`: each product and its input \
         gradient de-quantise the one weight they need, transiently). Held-out perplexity after training (first 64 blocks of \
         128 tokens of each split):\n",
        dense.steps
    )?;
    writeln!(md, "| base | base weights in memory | dev | test | training loop |\n|---|---|---|---|---|")?;
    for ((arm, base), s) in ARMS.iter().zip([dense, packed]) {
        writeln!(
            md,
            "| {arm} | {:.1} MB | {:.3} | {:.3} | {:.0} s |",
            weight_bytes(root, *base)? as f64 / 1e6,
            ppl(s, Split::Dev)?,
            ppl(s, Split::Test)?,
            s.seconds
        )?;
    }
    let change = ppl(packed, Split::Test)? / ppl(dense, Split::Test)? - 1.0;
    writeln!(
        md,
        "\nTest perplexity over the packed base: {:+.3}% of the f32 base's (target: within {:.0}%: {}). The products are the \
         de-quantised model's, so the two runs differ only by summation order; the token embeddings (a fifth of SmolLM2) stay \
         f32. Training-loop times are wall time on the shared 2-core machine, not a benchmark.",
        100.0 * change,
        100.0 * TOLERANCE,
        if change.abs() <= TOLERANCE { "met" } else { "missed" }
    )?;
    Ok(vec![(&QLORA, md)])
}
