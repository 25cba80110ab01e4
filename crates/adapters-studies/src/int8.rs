//! `cargo studies int8`: the example adapters (`fixtures/fusion-sources`: Pfeiffer
//! adapters trained with the example configs, seed 42) on their test sets with frozen
//! all-MiniLM-L6-v2 in f32 and with its projections in 8 bits (`--quantize int8`), through
//! `adapters eval` at the default max length. Writes its section of RESULTS.md.

use crate::results::{Section, INT8};
use crate::runs::{read_json, write_json, Cli, MINILM};
use adapters_train::records::ClassificationReport;
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/int8-study";
const SCORES: &str = "test-scores.json";
const TASKS: [&str; 3] = ["sms_spam", "trec_coarse", "rotten_tomatoes"];
/// The most test accuracy 8-bit projections may cost (issue 34), in points.
const TOLERANCE: f64 = 0.3;

/// Scores by `TASK/f32` and `TASK/int8`.
type Scores = BTreeMap<String, ClassificationReport>;

pub fn run(cli: &Cli) -> Result<()> {
    let mut scores = Scores::new();
    for task in TASKS {
        let (adapter, data) = (format!("fixtures/fusion-sources/{task}"), format!("data/{task}/test.jsonl"));
        for (arm, extra) in [("f32", &[][..]), ("int8", &["--quantize", "int8"][..])] {
            let args = [&["eval", MINILM, "--data", &data, "--adapter", &adapter][..], extra].concat();
            let report = cli.eval_with(&args)?;
            eprintln!("int8 study: {task} {arm}: accuracy {:.2}", 100.0 * report.accuracy);
            scores.insert(format!("{task}/{arm}"), report);
        }
    }
    write_json(&cli.root().join(RUNS).join(SCORES), &scores)
}

/// The study's section of RESULTS.md, when its scores are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let Some(scores) = read_json::<Scores>(&root.join(RUNS).join(SCORES))? else { return Ok(vec![]) };
    let pct = |key: &str, f: fn(&ClassificationReport) -> f64| scores.get(key).map_or(f64::NAN, |r| 100.0 * f(r));
    let mut md = String::new();
    writeln!(md, "\n## 8-bit projections (`cargo studies int8`)\n")?;
    writeln!(
        md,
        "The example adapters (`fixtures/fusion-sources`, Pfeiffer, trained with the example configs, seed 42) on their test \
         splits through `adapters eval`, with frozen all-MiniLM-L6-v2 in f32 and with `--quantize int8`: the six projections \
         of every layer in 8 bits (weights per output channel at load, activations per row over their own range at each \
         product, sums in 32-bit integers), adapters, embeddings and norms in f32. Accuracy and macro-F1 in percent; the \
         target is at most {TOLERANCE} points of accuracy lost. Speed: BENCHMARKS.md.\n"
    )?;
    writeln!(md, "| task | test rows | f32 accuracy | int8 accuracy | difference | f32 macro-F1 | int8 macro-F1 |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for task in TASKS {
        let (f32_key, int8_key) = (format!("{task}/f32"), format!("{task}/int8"));
        let (a, b) = (pct(&f32_key, |r| r.accuracy), pct(&int8_key, |r| r.accuracy));
        writeln!(
            md,
            "| {task} | {} | {a:.2} | {b:.2} | {:+.2} | {:.2} | {:.2} |",
            scores.get(&f32_key).map_or(0, |r| r.examples),
            b - a,
            pct(&f32_key, |r| r.macro_f1),
            pct(&int8_key, |r| r.macro_f1)
        )?;
    }
    Ok(vec![(&INT8, md)])
}
