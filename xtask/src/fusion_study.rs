//! `cargo xtask fusion-study`: does AdapterFusion help a low-resource task? Rotten
//! Tomatoes with 500 training reviews: its own Pfeiffer adapter alone, against a fusion of
//! that adapter with frozen adapters trained on other tasks (committed in
//! fixtures/fusion-sources), over 3 seeds. Writes the section of RESULTS.md and copies a
//! fusion attention heatmap next to it. Finished runs are kept and skipped.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// Source tasks with their epochs (their example configs otherwise).
const SOURCES: &[(&str, usize)] = &[("sms_spam", 2), ("trec_coarse", 3), ("vader_tweets", 3)];
const SEEDS: &[u64] = &[1, 2, 3];
const RUNS: &str = "runs/fusion-study";
/// The heatmap of seed 1's fusion, linked from RESULTS.md.
pub const PICTURE: &str = "docs/fusion_attention_rotten_tomatoes.svg";

pub fn run(root: &Path) -> Result<()> {
    crate::fetch::fetch_all(root)?;
    crate::run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
    let cli = root.join("target/release/adapters");
    let cli = cli.to_str().context("a UTF-8 path")?;
    for (ds, epochs) in SOURCES {
        let fixture = root.join("fixtures/fusion-sources").join(ds);
        if fixture.join("adapter_config.json").exists() {
            continue;
        }
        let out = format!("{RUNS}/source-{ds}");
        let _ = std::fs::remove_dir_all(root.join(&out));
        let (epochs, dir) = (format!("training.epochs={epochs}"), format!("output.dir=\"{out}\""));
        crate::run(root, cli, &["train", &format!("examples/{ds}.toml"), "--set", &epochs, "--set", &dir])?;
        copy_dir(&root.join(&out).join("adapters").join(ds), &fixture)?;
    }
    for seed in SEEDS {
        let (own, fusion) = (format!("{RUNS}/own-s{seed}"), format!("{RUNS}/fusion-s{seed}"));
        let seed_set = format!("training.seed={seed}");
        if !root.join(&own).join("summary.json").exists() {
            let _ = std::fs::remove_dir_all(root.join(&own));
            let dir = format!("output.dir=\"{own}\"");
            crate::run(root, cli, &["train", "examples/rotten_tomatoes_500.toml", "--set", &seed_set, "--set", &dir])?;
        }
        if !root.join(&fusion).join("summary.json").exists() {
            let _ = std::fs::remove_dir_all(root.join(&fusion));
            let member = format!("adapters.rotten_tomatoes.from=\"{own}/adapters/rotten_tomatoes\"");
            let dir = format!("output.dir=\"{fusion}\"");
            let args = ["train", "examples/rotten_tomatoes_fusion.toml", "--set", &seed_set, "--set", &member, "--set", &dir];
            crate::run(root, cli, &args)?;
        }
    }
    let picture = root.join(PICTURE);
    std::fs::create_dir_all(picture.parent().expect("a folder"))?;
    std::fs::copy(root.join(RUNS).join("fusion-s1/fusion_attention.svg"), &picture).context("copying the attention heatmap")?;
    update_results(root)
}

const BEGIN: &str = "<!-- fusion-study: written by `cargo xtask fusion-study` -->";
const END: &str = "<!-- /fusion-study -->";

/// The section as RESULTS.md holds it: from the runs when they are here, else the one
/// RESULTS.md already has (so `cargo xtask quality` keeps it on a machine without them).
pub fn block(root: &Path) -> Result<String> {
    let fresh = section(root)?;
    if !fresh.is_empty() {
        return Ok(format!("\n{BEGIN}\n{fresh}{END}\n"));
    }
    let current = std::fs::read_to_string(root.join("RESULTS.md")).unwrap_or_default();
    Ok(match (current.find(BEGIN), current.find(END)) {
        (Some(a), Some(b)) if a < b => format!("\n{}{END}\n", &current[a..b]),
        _ => String::new(),
    })
}

/// Replaces the section in RESULTS.md (before "Other runs", or at the end).
fn update_results(root: &Path) -> Result<()> {
    let path = root.join("RESULTS.md");
    let mut text = std::fs::read_to_string(&path).context("reading RESULTS.md")?;
    if let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) {
        text.replace_range(a.saturating_sub(1)..(b + END.len() + 1).min(text.len()), "");
    }
    let at = text.find("\n## Other runs").unwrap_or(text.len());
    text.insert_str(at, &block(root)?);
    std::fs::write(&path, text).context("writing RESULTS.md")?;
    eprintln!("wrote the AdapterFusion section of RESULTS.md");
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn summary(root: &Path, run: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(root.join(RUNS).join(run).join("summary.json")).ok()?).ok()
}

fn accuracy(s: &serde_json::Value, split: &str) -> f64 {
    100.0 * s["tasks"]["rotten_tomatoes"][split]["accuracy"].as_f64().unwrap_or(f64::NAN)
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (mean, (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt())
}

fn spread(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - v.iter().cloned().fold(f64::INFINITY, f64::min)
}

/// The RESULTS.md section from the runs (empty until the study has run).
fn section(root: &Path) -> Result<String> {
    let runs: Vec<(u64, serde_json::Value, serde_json::Value)> =
        SEEDS.iter().filter_map(|&s| Some((s, summary(root, &format!("own-s{s}"))?, summary(root, &format!("fusion-s{s}"))?))).collect();
    if runs.is_empty() {
        return Ok(String::new());
    }
    let mut md = String::new();
    writeln!(
        md,
        "\n## AdapterFusion on low-resource Rotten Tomatoes (`cargo xtask fusion-study`)\n\n\
         Does fusing adapters trained on other tasks help a task with little data? Target: Rotten \
         Tomatoes with the first 500 training reviews of its shuffled split (`train_limit = 500`), full \
         dev (1275) and test (1275) splits. Own adapter: `examples/rotten_tomatoes_500.toml` (Pfeiffer, \
         reduction factor 16, 10 epochs = 160 steps, lr 1e-3, early stopping on dev accuracy, patience 3). \
         Fusion: `examples/rotten_tomatoes_fusion.toml`, stage two over four frozen Pfeiffer adapters (the \
         seed's own adapter, and SMS spam, TREC coarse and VADER tweets adapters trained on their full \
         training sets with their example configs, committed in `fixtures/fusion-sources/`), training only \
         the dynamic fusion layer (AdapterHub's defaults) and a new head with the same budget. The best dev \
         epoch is kept for both; test accuracy in percent. Seeds change the own adapter's and the fusion's \
         initialisation, dropout and data order.\n"
    )?;
    writeln!(md, "| seed | own adapter: test | fusion + own: test | gain | own: dev | fusion: dev | fusion best step |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let (mut own, mut fused) = (Vec::new(), Vec::new());
    for (seed, o, f) in &runs {
        let (a, b) = (accuracy(o, "test"), accuracy(f, "test"));
        own.push(a);
        fused.push(b);
        writeln!(
            md,
            "| {seed} | {a:.2} | {b:.2} | {:+.2} | {:.2} | {:.2} | {} |",
            b - a,
            accuracy(o, "dev"),
            accuracy(f, "dev"),
            f["best_step"]
        )?;
    }
    let gains: Vec<f64> = own.iter().zip(&fused).map(|(a, b)| b - a).collect();
    let ((om, osd), (fm, fsd), (gm, gsd)) = (mean_sd(&own), mean_sd(&fused), mean_sd(&gains));
    writeln!(md, "| mean ± sd | {om:.2} ± {osd:.2} | {fm:.2} ± {fsd:.2} | {gm:+.2} ± {gsd:.2} | | | |")?;
    let worst = spread(&own).max(spread(&fused));
    writeln!(
        md,
        "\nOver {} seeds the fusion {} the own adapter by {gm:+.2} points on average ({} of {} seeds better); \
         the seed-to-seed spread (max − min) is {:.2} points for the own adapter and {:.2} for the fusion, so \
         the gain is {} than the larger spread.",
        runs.len(),
        if gm >= 0.0 { "beats" } else { "trails" },
        gains.iter().filter(|g| **g > 0.0).count(),
        gains.len(),
        spread(&own),
        spread(&fused),
        if gm.abs() > worst { "larger" } else { "not larger" }
    )?;
    // What the fusions attend to: each member's weight, averaged over layers and dev tokens.
    let reports: Vec<(u64, serde_json::Value)> = runs
        .iter()
        .filter_map(|(s, _, _)| {
            let text = std::fs::read_to_string(root.join(RUNS).join(format!("fusion-s{s}/fusion_attention.json"))).ok()?;
            Some((*s, serde_json::from_str(&text).ok()?))
        })
        .collect();
    if let Some((_, first)) = reports.first() {
        let members: Vec<String> =
            first["fusions"][0]["members"].as_array().into_iter().flatten().map(|m| m.as_str().unwrap_or("?").to_string()).collect();
        writeln!(
            md,
            "\nWhat the fusion attends to: each member's attention weight, averaged over the dev tokens and \
             the 6 layers (per layer: `{RUNS}/fusion-sSEED/fusion_attention.json`). Seed 1 per layer:\n\n\
             ![fusion attention per layer and adapter, seed 1]({PICTURE})\n"
        )?;
        writeln!(md, "| seed | {} |", members.join(" | "))?;
        writeln!(md, "|---|{}", "---|".repeat(members.len()))?;
        for (seed, r) in &reports {
            let points = r["fusions"][0]["points"].as_array().cloned().unwrap_or_default();
            let mut means = vec![0.0; members.len()];
            for p in &points {
                for (m, w) in means.iter_mut().zip(p["weights"].as_array().into_iter().flatten()) {
                    *m += w.as_f64().unwrap_or(0.0) / points.len().max(1) as f64;
                }
            }
            writeln!(md, "| {seed} | {} |", means.iter().map(|m| format!("{m:.3}")).collect::<Vec<_>>().join(" | "))?;
        }
    }
    Ok(md)
}
