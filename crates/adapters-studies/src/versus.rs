//! `cargo studies versus`: bottleneck adapters against LoRA at matched trainable
//! parameters (about 113k, a Pfeiffer adapter of r = 24 on MiniLM) on SMS spam, TREC
//! coarse and Rotten Tomatoes, same trainer, data, budget and seed. Writes its section of
//! RESULTS.md. Finished runs are skipped.

use crate::results::{Section, VERSUS};
use crate::runs::{pct, read_json, Cli, Runs};
use adapters_train::records::Split;
use anyhow::Result;
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/versus-study";
/// (dataset, epochs): the examples' budgets.
const DATASETS: &[(&str, usize)] = &[("sms_spam", 2), ("trec_coarse", 3), ("rotten_tomatoes", 2)];
/// (method, what it is, the adapter table replacing the example's; `{ds}` the dataset).
const METHODS: &[(&str, &str, &str)] = &[
    ("pfeiffer", "Pfeiffer (seq_bn, r = 24, after the FFN)", "{kind=\"seq_bn\", reduction_factor=16}"),
    ("houlsby", "Houlsby (double_seq_bn, r = 12 after attention and after the FFN)", "{kind=\"double_seq_bn\", reduction_factor=32}"),
    ("parallel", "parallel (par_bn, r = 24, scaling 4)", "{kind=\"par_bn\", reduction_factor=16}"),
    ("lora", "LoRA (r = 12, alpha 24, query and value)", "{kind=\"lora\", r=12, alpha=24, placement={sites=[\"query\",\"value\"]}}"),
    (
        "dora",
        "DoRA (LoRA r = 12, alpha 24, query and value, with a learned magnitude per output row)",
        "{kind=\"lora\", r=12, alpha=24, use_dora=true, placement={sites=[\"query\",\"value\"]}}",
    ),
];

pub fn run(cli: &Cli) -> Result<()> {
    for (ds, epochs) in DATASETS {
        for (method, _, table) in METHODS {
            let sets = [format!("training.epochs={epochs}"), "model.max_length=64".into(), format!("adapters.{ds}={table}")];
            cli.train(&format!("examples/{ds}.toml"), &format!("{RUNS}/{ds}-{method}"), &sets)?;
        }
    }
    Ok(())
}

/// The study's section of RESULTS.md, when its runs are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let runs = Runs::load(root, RUNS)?;
    if runs.all().next().is_none() {
        return Ok(vec![]);
    }
    let mut md = String::new();
    write(root, &runs, &mut md)?;
    Ok(vec![(&VERSUS, md)])
}

fn write(root: &Path, runs: &Runs, md: &mut String) -> Result<()> {
    writeln!(md, "\n## Adapters against LoRA at matched size (`cargo studies versus`)\n")?;
    writeln!(
        md,
        "Each method with about 113k adapter parameters on frozen all-MiniLM-L6-v2 (heads not counted), trained by the \
         dataset's example config (`examples/DATASET.toml`: lr 1e-3, batch 32, the best dev step kept) with only the adapter \
         table replaced, max length 64, seed 42; SMS spam 2 epochs, TREC coarse 3, Rotten Tomatoes 2. Test accuracy in \
         percent (macro-F1 in brackets):\n"
    )?;
    let header: Vec<String> = DATASETS.iter().map(|(ds, e)| format!("{ds} ({e} ep.)")).collect();
    writeln!(md, "| method | adapter parameters | {} | mean |", header.join(" | "))?;
    writeln!(md, "|---|---|{}---|", "---|".repeat(DATASETS.len()))?;
    let mut means: Vec<(&str, f64)> = Vec::new();
    for (method, what, _) in METHODS {
        let mut cells = Vec::new();
        let mut accs = Vec::new();
        let mut params = None;
        for (ds, _) in DATASETS {
            let run = format!("{ds}-{method}");
            let Some(s) = runs.get(&run) else {
                cells.push("not run".to_string());
                continue;
            };
            let (acc, f1) = (pct(s, ds, Split::Test, "accuracy"), pct(s, ds, Split::Test, "macro_f1"));
            accs.push(acc);
            cells.push(format!("{acc:.2} ({f1:.2})"));
            if params.is_none() {
                params = runs.adapter_parameters(&run);
            }
        }
        let mean = if accs.len() == DATASETS.len() {
            let mean = accs.iter().sum::<f64>() / accs.len() as f64;
            means.push((*method, mean));
            format!("**{mean:.2}**")
        } else {
            String::new()
        };
        let params = params.map_or_else(String::new, |p| p.to_string());
        writeln!(md, "| {what} | {params} | {} | {mean} |", cells.join(" | "))?;
    }
    if let (Some(lo), Some(hi)) = (means.iter().min_by(|a, b| a.1.total_cmp(&b.1)), means.iter().max_by(|a, b| a.1.total_cmp(&b.1))) {
        writeln!(
            md,
            "\nMeans range from {:.2} ({}) to {:.2} ({}). One seed per cell: in the mixture-of-experts study three seeds of one \
             arm spread over 0.3-0.6 points, so differences below about half a point are not evidence of a better method.",
            lo.1, lo.0, hi.1, hi.0
        )?;
    }
    overhead(root, md)
}

/// The bench variant of each method in `bench/results/adapter_overhead_minilm.json`.
const BENCH_VARIANTS: &[(&str, &str)] = &[
    ("Pfeiffer", "seq_bn (Pfeiffer, r=24)"),
    ("Houlsby", "double_seq_bn (Houlsby, r=12 twice)"),
    ("parallel", "par_bn (r=24, s=4)"),
    ("LoRA, unmerged", "LoRA r=12 q,v unmerged"),
    ("LoRA, merged into the weights", "LoRA r=12 q,v merged"),
];

/// What `cargo xtask bench` keeps of an interleaved comparison (`bench/results/*.json`).
#[derive(Deserialize)]
struct Comparison {
    threads: usize,
    rounds: usize,
    variants: Vec<Variant>,
}

#[derive(Deserialize)]
struct Variant {
    name: String,
    median_s: f64,
    median_ratio_to_first: f64,
}

/// Inference cost and switching time of the same sizes, from the last `cargo xtask bench`
/// on this machine (BENCHMARKS.md has the full tables), when its results are here.
fn overhead(root: &Path, md: &mut String) -> Result<()> {
    let read = |file: &str| read_json::<Comparison>(&root.join("bench/results").join(file));
    let (Some(forward), Some(switch)) = (read("adapter_overhead_minilm.json")?, read("adapter_switch_minilm.json")?) else {
        return Ok(());
    };
    let variant = |c: &Comparison, name: &str| -> Option<(f64, f64)> {
        let v = c.variants.iter().find(|v| v.name == name)?;
        Some((v.median_s, v.median_ratio_to_first))
    };
    writeln!(
        md,
        "\nInference at the same sizes (`cargo xtask bench`, MiniLM forward at batch 32 x seq 128, {} threads, {} interleaved \
         rounds; medians, and the median ratio to the bare forward of adjacent pairs):\n",
        forward.threads, forward.rounds
    )?;
    writeln!(md, "| method | forward | against no adapter |\n|---|---|---|")?;
    for (what, name) in BENCH_VARIANTS {
        if let Some((secs, ratio)) = variant(&forward, name) {
            writeln!(md, "| {what} | {:.1} ms | {ratio:.3} |", secs * 1e3)?;
        }
    }
    if let (Some((activate, _)), Some((remerge, _))) =
        (variant(&switch, "seq_bn: activate the other adapter"), variant(&switch, "LoRA r=12 q,v: unmerge one, merge the other"))
    {
        writeln!(
            md,
            "\nSwitching a loaded model from one task's adapter to another's: activating the other bottleneck adapter takes \
             {:.1} µs (the weights stay put); a merged LoRA adapter is unmerged and the other merged in {:.1} ms ({:.0} times \
             longer), which is what merging's free inference costs at every switch.",
            activate * 1e6,
            remerge * 1e3,
            remerge / activate
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters_train::records::{Summary, TaskResult, SUMMARY_FILE};

    /// A finished run of `ds` as the trainer writes it.
    fn summary(ds: &str, accuracy: f64, trainable: usize) -> Summary {
        let test: std::collections::BTreeMap<String, f64> =
            [("accuracy".to_string(), accuracy), ("macro_f1".to_string(), accuracy - 0.01)].into();
        let task = TaskResult { dev: test.clone(), test, dev_at_start: Default::default(), test_at_start: Default::default() };
        serde_json::from_value(serde_json::json!({
            "mode": "adapters", "steps": 10, "finished": true, "seconds": 1.0, "trainable_parameters": trainable,
            "base_parameters": 1000, "trainable_share": 0.1, "tasks": {ds: task}, "best_step": 10, "stopped_early": false,
            "output": "x"
        }))
        .unwrap()
    }

    #[test]
    fn the_section_is_written_from_the_runs_summaries() {
        let root = std::env::temp_dir().join(format!("versus-study-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (i, (ds, _)) in DATASETS.iter().enumerate() {
            for (j, (method, _, _)) in METHODS.iter().enumerate() {
                let dir = root.join(RUNS).join(format!("{ds}-{method}"));
                std::fs::create_dir_all(&dir).unwrap();
                let s = summary(ds, 0.5 + 0.1 * i as f64 + 0.01 * j as f64, 1000 + j);
                std::fs::write(dir.join(SUMMARY_FILE), serde_json::to_string(&s).unwrap()).unwrap();
            }
        }
        let sections = sections(&root).unwrap();
        let [(section, md)] = &sections[..] else { panic!("one section: {sections:?}") };
        assert_eq!(section.id, "versus-study");
        assert!(
            md.contains("| Pfeiffer (seq_bn, r = 24, after the FFN) | 1000 | 50.00 (49.00) | 60.00 (59.00) | 70.00 (69.00) | **60.00** |"),
            "{md}"
        );
        assert!(md.contains("Means range from 60.00 (pfeiffer) to 64.00 (dora)."), "{md}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
