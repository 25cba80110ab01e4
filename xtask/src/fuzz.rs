//! `cargo xtask fuzz --seconds N`: every fuzz target of `adapters-fuzz` for N seconds
//! each (the test suite gives each 3), then a table of targets, cases and time.

use anyhow::{Context, Result};
use std::path::Path;

pub fn run(root: &Path, seconds: f64) -> Result<()> {
    crate::fetch::fetch_all(root)?;
    let report = root.join("target/fuzz-report.jsonl");
    let _ = std::fs::remove_file(&report);
    let status = std::process::Command::new("cargo")
        .args(["test", "-p", "adapters-fuzz", "--tests", "--", "--test-threads", "1"])
        .env("ADAPTERS_FUZZ_SECONDS", seconds.to_string())
        .current_dir(root)
        .status()?;
    let text = std::fs::read_to_string(&report).context("the fuzz targets wrote no report")?;
    println!("\n| target | cases | seconds | slowest case (s) |\n|---|---|---|---|");
    let (mut cases, mut time) = (0u64, 0.0);
    for line in text.lines() {
        let r: serde_json::Value = serde_json::from_str(line)?;
        if r["target"].as_str().is_some_and(|t| t.starts_with("driver-")) {
            continue;
        }
        let (c, s) = (r["cases"].as_u64().unwrap_or(0), r["seconds"].as_f64().unwrap_or(0.0));
        println!("| {} | {c} | {s:.1} | {:.3} |", r["target"].as_str().unwrap_or(""), r["slowest_seconds"].as_f64().unwrap_or(0.0));
        cases += c;
        time += s;
    }
    println!("\n{cases} cases in {time:.0} s, no panic");
    anyhow::ensure!(status.success(), "a fuzz target failed (its input is under target/fuzz-crashes/)");
    Ok(())
}
