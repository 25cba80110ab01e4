//! `cargo xtask bench --vs-pytorch`: each workload of `bench/reference/torch_bench.py` run
//! by our `bench-workload` binary and by the PyTorch reference, alternately (which stack goes
//! first alternates too), so the machine's fast and slow periods hit both alike; reported
//! as the median over rounds of our time / PyTorch's time, with both stacks' peak memory.
//! A run with `--only` replaces those workloads' results and keeps the others'.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// Workloads with their (warmup, steps) per process and the target ratio from issue 9.
const WORKLOADS: &[(&str, usize, usize, &str)] = &[
    ("minilm_train_full", 1, 3, "≤ 1.0"),
    ("minilm_train_seq_bn", 1, 3, "≤ 1.0"),
    ("minilm_train_lora", 1, 3, "≤ 1.0"),
    ("minilm_train_seq_bn_ckpt", 1, 3, "none (memory)"),
    ("minilm_train_lora_ckpt", 1, 3, "none (memory)"),
    ("minilm_infer_base", 1, 5, "≤ 0.9"),
    ("minilm_infer_seq_bn", 1, 5, "≤ 0.9"),
    ("minilm_infer_lora_unmerged", 1, 5, "≤ 0.9"),
    ("minilm_infer_lora_merged", 1, 5, "≤ 0.9"),
    ("smol_train_seq_bn", 1, 3, "≤ 1.0"),
    ("smol_train_lora", 1, 3, "≤ 1.0"),
    ("smol_decode_b1", 1, 2, "≤ 0.5 (2x tokens/s)"),
    ("smol_decode_b8", 1, 2, "≤ 0.67 (1.5x tokens/s)"),
];

const VENV: &str = "target/ref-venv";

pub fn run(root: &Path, only: Option<&str>, rounds: usize) -> Result<()> {
    crate::fetch::fetch_all(root)?;
    if !root.join(VENV).join("bin/python").exists() {
        eprintln!("installing the PyTorch reference stack into {VENV} (once; ~3 GB from PyPI)");
        crate::run(root, "bash", &["bench/reference/setup.sh", VENV])?;
    }
    crate::run(root, "cargo", &["build", "--release", "-p", "adapters-bench", "--bin", "bench-workload"])?;
    let selected: Vec<_> = WORKLOADS.iter().filter(|w| only.is_none_or(|o| w.0.contains(o))).collect();
    if selected.is_empty() {
        bail!("--only {:?} matches no workload", only.unwrap_or(""));
    }
    let bar = indicatif::ProgressBar::new((rounds * selected.len() * 2) as u64);
    let mut results: Vec<Value> = selected.iter().map(|w| json!({"name": w.0, "target": w.3, "ours": [], "pytorch": []})).collect();
    for round in 0..rounds {
        let probe = probe_ours(root)?;
        for (i, (name, warmup, steps, _)) in selected.iter().enumerate() {
            let ours_first = (round + i) % 2 == 0;
            for ours in [ours_first, !ours_first] {
                bar.set_message(format!("round {} {name} ({})", round + 1, if ours { "ours" } else { "PyTorch" }));
                let mut record = if ours { run_ours(root, name, *warmup, *steps)? } else { run_pytorch(root, name, *warmup, *steps)? };
                if ours {
                    record["probe_gflops"] = json!(probe);
                }
                results[i][if ours { "ours" } else { "pytorch" }].as_array_mut().expect("list").push(record);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    // Keep earlier results of the workloads this run did not select, in report order.
    let path = root.join(crate::bench::RESULTS).join("vs_pytorch.json");
    let earlier: Vec<Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["workloads"].as_array().cloned())
        .unwrap_or_default();
    let merged: Vec<Value> = WORKLOADS
        .iter()
        .filter_map(|w| {
            let by_name = |list: &[Value]| list.iter().find(|r| r["name"] == w.0).cloned();
            by_name(&results).or_else(|| by_name(&earlier))
        })
        .collect();
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    crate::data::write_atomic(&path, serde_json::to_string_pretty(&json!({ "threads": 2, "workloads": merged }))?.as_bytes())
}

const SECTION: &str = "## Against PyTorch";

fn last_json_line(stdout: &[u8], what: &str) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("{what} printed no JSON record"))?;
    serde_json::from_str(line).with_context(|| format!("{what} printed a malformed record"))
}

fn checked(mut cmd: Command, what: &str) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    last_json_line(&out.stdout, what)
}

pub fn run_ours(root: &Path, name: &str, warmup: usize, steps: usize) -> Result<Value> {
    let mut cmd = Command::new(root.join("target/release/bench-workload"));
    cmd.args([name, "--warmup", &warmup.to_string(), "--steps", &steps.to_string()]).current_dir(root);
    checked(cmd, &format!("bench-workload {name}"))
}

pub fn run_pytorch(root: &Path, name: &str, warmup: usize, steps: usize) -> Result<Value> {
    let mut cmd = Command::new(root.join(VENV).join("bin/python"));
    cmd.args(["bench/reference/torch_bench.py", "run", name, "--warmup", &warmup.to_string(), "--steps", &steps.to_string()])
        .env("REF_MODELS", root.join("models"))
        .current_dir(root);
    checked(cmd, &format!("torch_bench.py {name}"))
}

fn probe_ours(root: &Path) -> Result<f64> {
    let mut cmd = Command::new(root.join("target/release/bench-workload"));
    cmd.arg("--probe").current_dir(root);
    Ok(checked(cmd, "bench-workload --probe")?["sgemm1024_gflops"].as_f64().unwrap_or(f64::NAN))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The BENCHMARKS.md section for `bench/results/vs_pytorch.json`.
pub fn report(md: &mut String, r: &Value) -> Result<()> {
    use std::fmt::Write as _;
    let records = |stack: &str, key: &str| -> Vec<f64> {
        r["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|w| w[stack].as_array().into_iter().flatten())
            .filter_map(|p| p[key].as_f64())
            .collect()
    };
    let ours_probe = median(records("ours", "probe_gflops"));
    let torch_probe = median(records("pytorch", "calib_sgemm1024_gflops_before"));
    writeln!(md, "\n{SECTION} on the same machine (`cargo xtask bench --vs-pytorch`)\n")?;
    writeln!(
        md,
        "PyTorch 2.15 + transformers 4.57.6 + AdapterHub `adapters` 1.3.0 / PEFT 0.21.2 (`bench/reference/`), {} threads each; in every round each workload runs once per stack, alternating which goes first. \
         Time: median per-step time of one process (after one warm-up step); ratio: median over rounds of ours / PyTorch (below 1: we are faster). \
         Memory: the process's resident-set high-water mark during the steps minus its resident set before them, measured the same way for both stacks. \
         sgemm probe (1024³ f32 matmul, GFLOP/s, median): ours {ours_probe:.0}, PyTorch {torch_probe:.0}.\n",
        r["threads"]
    )?;
    writeln!(md, "| workload | rounds | ours | PyTorch | ratio ours / PyTorch | target | our peak | PyTorch peak |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for w in r["workloads"].as_array().into_iter().flatten() {
        let list = |k: &str| w[k].as_array().cloned().unwrap_or_default();
        let (ours, torch) = (list("ours"), list("pytorch"));
        let ms = |v: &[Value]| median(v.iter().filter_map(|x| x["median_ms"].as_f64()).collect());
        let ratio =
            median(ours.iter().zip(&torch).filter_map(|(a, b)| Some(a["median_ms"].as_f64()? / b["median_ms"].as_f64()?)).collect());
        let peak = |v: &[Value]| {
            median(v.iter().filter_map(|x| Some(x["steps_peak_rss_mib"].as_f64()? - x["rss_before_loop_mib"].as_f64()?)).collect())
        };
        writeln!(
            md,
            "| {} | {} | {:.1} ms | {:.1} ms | {ratio:.2} | {} | {:.0} MiB | {:.0} MiB |",
            w["name"].as_str().unwrap_or(""),
            ours.len(),
            ms(&ours),
            ms(&torch),
            w["target"].as_str().unwrap_or(""),
            peak(&ours),
            peak(&torch)
        )?;
    }
    Ok(())
}
