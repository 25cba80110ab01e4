//! `cargo studies robust`: plain against adversarially trained Pfeiffer adapters
//! (`[training.adversarial]`: PGD, and PGD with SMART's KL term) on SMS spam and Rotten
//! Tomatoes, each evaluated on the clean test set, under the PGD attack of the strength it
//! was trained for (and a stronger one), and on a character-perturbed test set, with the
//! cost per training step. Writes its section of RESULTS.md. Finished runs are skipped.

use crate::results::{Section, ROBUST};
use crate::runs::{read_json, write_json, Cli};
use adapters_train::metrics::MetricsLog;
use adapters_train::records::METRICS_FILE;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/robust-study";
/// A run's accuracies (0-1) by figure name ([`FIGURES`]), beside its summary.
const ROBUSTNESS: &str = "robustness.json";
/// Per dataset, per arm: the median seconds per training step.
const COST: &str = "cost.json";
type Cost = BTreeMap<String, BTreeMap<String, f64>>;
/// (dataset, epochs, ε, candidate adversarial arms).
///
/// ε, each token's L2 radius for training and the attack, is per dataset the smallest of
/// 0.01, 0.02, 0.05, 0.1, 0.2 at which the plain adapter loses at least 15 points of dev
/// accuracy (chosen before any adversarial run: Rotten Tomatoes 83.0 → 73.3 at 0.01,
/// → 64.0 at 0.02 on 300 dev rows; SMS spam 98.7 → 92.9 at 0.05, → 75.8 at 0.1).
///
/// A first study chose each dataset's arm on dev alone (seed 42; the largest dev gain
/// under the trained-for attack among `pgd`, `pgd_half` and `smart`, none within 1 point
/// of clean dev accuracy, so the one losing least), at 2 epochs of SMS spam and 1 of
/// Rotten Tomatoes; every plain and chosen run kept its last step. A second study, fixed
/// before its runs, doubled the epochs with nothing else changed (three seeds, judged on
/// the means): Rotten Tomatoes' `pgd` then met both targets (+8.24 attacked, −0.76
/// clean), SMS spam's `smart` lost 1.85 clean points (dev: the same 1.3 at every seed).
///
/// So SMS spam's arm is chosen again, on dev, among `smart` and the same two losses at a
/// lower weight on the perturbed term (ε stays 0.1: the attack trained for must stay the
/// one the plain adapter breaks under), by a rule fixed before these runs: see
/// [`choose`]. Rotten Tomatoes keeps its arm.
const DATASETS: &[(&str, usize, f64, &[&str])] =
    &[("sms_spam", 4, 0.1, &["smart", "pgd_half", "pgd_quarter", "smart_half", "smart_quarter"]), ("rotten_tomatoes", 2, 0.02, &["pgd"])];
/// A candidate qualifies when its dev clean accuracy is at most this many points under
/// the plain adapter's at the same seed (half the target's point: dev has as few rows as
/// test, and the choice must leave room for the seeds that follow).
const CLEAN_DEV_SLACK: f64 = 0.5;
/// Every run is repeated with these seeds; the findings are their means.
const SEEDS: &[u64] = &[42, 2, 3];
/// The attack's ascent steps, in training and evaluation.
const STEPS: usize = 2;
/// A stronger attack than the one trained for (this multiple of ε), to show where
/// robustness ends.
const STRONGER: f64 = 2.5;
/// Character noise: the rate of edited letters and digits and its seed.
const NOISE: (f64, u64) = (0.1, 1);
/// (arm, what it is, the `training.adversarial` table with `{eps}` for ε; empty: none).
const ARMS: &[(&str, &str, &str)] = &[
    ("plain", "plain Pfeiffer adapter", ""),
    ("pgd", "PGD, clean + perturbed cross-entropy", "{epsilon={eps}, steps=2}"),
    ("pgd_half", "PGD, clean + 0.5 · perturbed cross-entropy", "{epsilon={eps}, steps=2, weight=0.5}"),
    ("pgd_quarter", "PGD, clean + 0.25 · perturbed cross-entropy", "{epsilon={eps}, steps=2, weight=0.25}"),
    ("smart", "SMART, clean cross-entropy + symmetric KL", "{epsilon={eps}, steps=2, kl=true}"),
    ("smart_half", "SMART, clean cross-entropy + 0.5 · symmetric KL", "{epsilon={eps}, steps=2, kl=true, weight=0.5}"),
    ("smart_quarter", "SMART, clean cross-entropy + 0.25 · symmetric KL", "{epsilon={eps}, steps=2, kl=true, weight=0.25}"),
];

/// The runs of a dataset's arm: (arm's description and adversarial table, seed, run folder).
fn runs(ds: &str, arm: &str) -> Vec<(&'static (&'static str, &'static str, &'static str), u64, String)> {
    let a = ARMS.iter().find(|a| a.0 == arm).expect("every arm named is in ARMS");
    SEEDS.iter().map(|seed| (a, *seed, format!("{ds}-{arm}-s{seed}"))).collect()
}

pub fn run(cli: &Cli) -> Result<()> {
    let root = cli.root();
    for (ds, epochs, eps, candidates) in DATASETS {
        let train = |table: &str, seed: u64, run: &str, figures: &[&str]| -> Result<()> {
            let out = format!("{RUNS}/{run}");
            let mut sets = vec![format!("training.epochs={epochs}"), format!("training.seed={seed}"), "model.max_length=64".into()];
            if !table.is_empty() {
                sets.push(format!("training.adversarial={}", table.replace("{eps}", &eps.to_string())));
            }
            cli.train(&format!("examples/{ds}.toml"), &out, &sets)?;
            evaluate(cli, ds, *eps, &out, figures)
        };
        for ((_, _, table), seed, run) in runs(ds, "plain") {
            train(table, seed, &run, &FIGURES)?;
        }
        // Candidates: the first seed, dev figures only; the chosen one then runs every seed.
        if candidates.len() > 1 {
            for arm in *candidates {
                let ((_, _, table), seed, run) = &runs(ds, arm)[0];
                train(table, *seed, run, &FIGURES[4..])?;
            }
        }
        let chosen = choose(root, ds, candidates)?.context("the candidates' dev figures")?;
        for ((_, _, table), seed, run) in runs(ds, chosen) {
            train(table, seed, &run, &FIGURES)?;
        }
    }
    measure_cost(cli)
}

/// A dataset's adversarial arm: the only candidate, or else (on dev, at the first seed)
/// the one with the highest accuracy under the trained-for attack among those whose clean
/// accuracy is at most [`CLEAN_DEV_SLACK`] points under the plain adapter's; if none is,
/// the one with the highest clean accuracy. `None` until the candidates have run.
fn choose(root: &Path, ds: &str, candidates: &[&'static str]) -> Result<Option<&'static str>> {
    if let [only] = candidates {
        return Ok(Some(only));
    }
    if dev(root, ds, "plain")?.is_none() {
        return Ok(None);
    }
    let mut scored: Vec<(&'static str, (f64, f64))> = Vec::new();
    for arm in candidates {
        let Some(figures) = dev(root, ds, arm)? else { return Ok(None) };
        scored.push((arm, figures));
    }
    let mut qualified = Vec::new();
    for candidate in &scored {
        if qualifies(root, ds, candidate.0)? {
            qualified.push(candidate);
        }
    }
    Ok(match qualified.into_iter().max_by(|a, b| a.1 .1.total_cmp(&b.1 .1)) {
        Some((arm, _)) => Some(arm),
        None => scored.iter().max_by(|a, b| a.1 .0.total_cmp(&b.1 .0)).map(|(arm, _)| *arm),
    })
}

/// Accuracy of the run's adapter on test (clean, under both attacks, with character
/// noise) and on dev (clean and under the trained-for attack, for choosing between arms),
/// kept in `robustness.json`: only missing figures are computed.
fn evaluate(cli: &Cli, ds: &str, eps: f64, out: &str, wanted: &[&str]) -> Result<()> {
    let file = cli.root().join(out).join(ROBUSTNESS);
    let mut scores: BTreeMap<String, f64> = read_json(&file)?.unwrap_or_default();
    let adapter = format!("{out}/adapters/{ds}");
    let (strong, eps, steps) = ((STRONGER * eps).to_string(), eps.to_string(), STEPS.to_string());
    let (rate, seed) = (NOISE.0.to_string(), NOISE.1.to_string());
    let attack = ["--attack-epsilon", eps.as_str(), "--attack-steps", steps.as_str()];
    let strong_attack = ["--attack-epsilon", strong.as_str(), "--attack-steps", steps.as_str()];
    let noise = ["--char-noise", rate.as_str(), "--noise-seed", seed.as_str()];
    let figures: [(&str, &str, &[&str]); 6] = [
        ("clean", "test", &[]),
        ("pgd", "test", &attack),
        ("pgd_strong", "test", &strong_attack),
        ("char_noise", "test", &noise),
        ("dev_clean", "dev", &[]),
        ("dev_pgd", "dev", &attack),
    ];
    for (key, split, extra) in figures {
        if scores.contains_key(key) || !wanted.contains(&key) {
            continue;
        }
        let started = std::time::Instant::now();
        let result = cli.eval(&adapter, &format!("data/{ds}/{split}.jsonl"), extra)?;
        eprintln!("{out} {key}: {:.4} ({:.0} s)", result.accuracy, started.elapsed().as_secs_f64());
        scores.insert(key.into(), result.accuracy);
        write_json(&file, &scores)?;
    }
    Ok(())
}

/// Median seconds per training step of the plain and the dataset's adversarial arm, from
/// short runs of the two alternated (3 rounds of 12 steps, the first 2 steps of each left
/// out), kept in `cost.json` beside the runs: the training runs' own timings overlap other
/// work.
fn measure_cost(cli: &Cli) -> Result<()> {
    let root = cli.root();
    let file = root.join(RUNS).join(COST);
    let mut cost: Cost = read_json(&file)?.unwrap_or_default();
    for (ds, _, eps, candidates) in DATASETS {
        let adversarial = choose(root, ds, candidates)?.context("the candidates' dev figures")?;
        if cost.get(*ds).is_some_and(|c| c.contains_key(adversarial) && c.contains_key("plain")) {
            continue;
        }
        let mut times: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        for round in 0..3 {
            for (arm, _, table) in ARMS.iter().filter(|(arm, _, _)| *arm == "plain" || *arm == adversarial) {
                let out = format!("{RUNS}/cost-probe");
                let _ = std::fs::remove_dir_all(root.join(&out));
                let mut args = vec![
                    "train".to_string(),
                    format!("examples/{ds}.toml"),
                    "--stop-after".into(),
                    "12".into(),
                    "--set".into(),
                    format!("output.dir=\"{out}\""),
                    "--set".into(),
                    "model.max_length=64".into(),
                    "--set".into(),
                    "task.0.eval_limit=32".into(),
                ];
                if !table.is_empty() {
                    args.extend(["--set".into(), format!("training.adversarial={}", table.replace("{eps}", &eps.to_string()))]);
                }
                cli.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
                    .with_context(|| format!("the cost probe of {ds} {arm} (round {round})"))?;
                let steps = MetricsLog::steps(&root.join(&out).join(METRICS_FILE))?;
                let elapsed: Vec<f64> = steps.iter().map(|r| r.elapsed_s).collect();
                times.entry(arm).or_default().extend(elapsed.windows(2).skip(2).map(|w| w[1] - w[0]));
            }
        }
        let _ = std::fs::remove_dir_all(root.join(RUNS).join("cost-probe"));
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let per_arm = times.into_iter().map(|(arm, v)| (arm.to_string(), median(v))).collect();
        cost.insert(ds.to_string(), per_arm);
    }
    write_json(&file, &cost)
}

/// A run's figures (`robustness.json`), when it has them.
fn figures(root: &Path, run: &str) -> Result<Option<BTreeMap<String, f64>>> {
    read_json(&root.join(RUNS).join(run).join(ROBUSTNESS))
}

/// The study's section of RESULTS.md, when its runs are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    for (ds, _, _, _) in DATASETS {
        for (_, _, run) in runs(ds, "plain") {
            if figures(root, &run)?.is_some() {
                let mut md = String::new();
                write(root, &mut md)?;
                return Ok(vec![(&ROBUST, md)]);
            }
        }
    }
    Ok(vec![])
}

/// The figures of `robustness.json`, in table order.
const FIGURES: [&str; 6] = ["clean", "pgd", "pgd_strong", "char_noise", "dev_clean", "dev_pgd"];

fn write(root: &Path, md: &mut String) -> Result<()> {
    writeln!(md, "\n## Adversarial training (`cargo studies robust`)\n")?;
    writeln!(
        md,
        "Pfeiffer adapters (r = 24) on frozen all-MiniLM-L6-v2 trained by the dataset's example config (lr 1e-3, batch 32, \
         max length 64, the best dev step kept) for {}, with seeds {}, plainly or with `[training.adversarial]` at radius ε \
         (each token's L2 ball in embedding space; MiniLM's token embeddings have norms of about 1.1) and K = {STEPS} ascent \
         steps. ε is per dataset the smallest of 0.01, 0.02, 0.05, 0.1, 0.2 at which the plain adapter loses at least 15 \
         points of dev accuracy, fixed before any adversarial run: {}. A first study chose each dataset's arm on dev among \
         PGD, PGD with the perturbed loss at weight 0.5, and SMART, training half as long (SMS spam 2 epochs, Rotten \
         Tomatoes 1); its runs all kept their last step, and its chosen arms lost 1.48 and 1.39 points of clean test \
         accuracy on three-seed means. A second study doubled the epochs, nothing else changed: Rotten Tomatoes' PGD met \
         both targets, SMS spam's SMART still lost 1.85 clean points. SMS spam's arm was then chosen again on dev (seed \
         {}, rule fixed before the runs): among SMART and PGD and SMART with the perturbed term at weight 0.5 and 0.25, the \
         highest dev accuracy under the trained-for attack among those at most {CLEAN_DEV_SLACK} points under the plain \
         adapter's clean dev accuracy (else the highest clean dev accuracy); then the chosen arm's other seeds ran. \
         Accuracy in percent on test: clean; under PGD on the embeddings (`adapters eval \
         --attack-epsilon ε --attack-steps {STEPS}`, against the gold labels) at the trained radius and at {STRONGER} ε; \
         and with {:.0}% of letters and digits edited (`--char-noise {} --noise-seed {}`: typos from neighbouring keys, \
         swaps, drops, doubles); and on dev, clean and under the trained-for attack.\n",
        DATASETS.iter().map(|(ds, epochs, _, _)| format!("{epochs} epochs of {ds}")).collect::<Vec<_>>().join(" and "),
        SEEDS.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
        DATASETS.iter().map(|(ds, _, eps, _)| format!("{ds} {eps}")).collect::<Vec<_>>().join(", "),
        SEEDS[0],
        100.0 * NOISE.0,
        NOISE.0,
        NOISE.1
    )?;
    writeln!(
        md,
        "| dataset | training | seed | test clean | test PGD at ε | test PGD at {STRONGER} ε | test char noise | dev clean | dev PGD at ε |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    let mut findings = Vec::new();
    for (ds, _, eps, candidates) in DATASETS {
        // Per arm, the mean of each figure over the seeds that ran.
        let mut means: Vec<(&str, [f64; 6])> = Vec::new();
        for arm in std::iter::once("plain").chain(choose(root, ds, candidates)?) {
            let what = ARMS.iter().find(|a| a.0 == arm).map_or(arm, |a| a.1);
            let mut rows: Vec<[f64; 6]> = Vec::new();
            for seed in SEEDS {
                let Some(r) = figures(root, &format!("{ds}-{arm}-s{seed}"))? else {
                    writeln!(md, "| {ds} (ε {eps}) | {what} | {seed} | not run | | | | | |")?;
                    continue;
                };
                let row = FIGURES.map(|k| 100.0 * r.get(k).copied().unwrap_or(f64::NAN));
                let cells: Vec<String> = row.iter().map(|v| format!("{v:.2}")).collect();
                writeln!(md, "| {ds} (ε {eps}) | {what} | {seed} | {} |", cells.join(" | "))?;
                rows.push(row);
            }
            if rows.is_empty() {
                continue;
            }
            let mean = std::array::from_fn(|i| rows.iter().map(|r| r[i]).sum::<f64>() / rows.len() as f64);
            let cells: Vec<String> = mean.iter().map(|v: &f64| format!("**{v:.2}**")).collect();
            writeln!(md, "| {ds} (ε {eps}) | {what} | mean of {} | {} |", rows.len(), cells.join(" | "))?;
            means.push((arm, mean));
        }
        if let [(_, plain), (arm, adv)] = means.as_slice() {
            let (attacked, clean) = (adv[1] - plain[1], adv[0] - plain[0]);
            let met = |ok: bool| if ok { "met" } else { "missed" };
            findings.push(format!(
                "{ds}: {arm}, {attacked:+.2} points under PGD at ε = {eps} ({}) and {clean:+.2} on clean test data ({})",
                met(attacked >= 5.0),
                met(clean >= -1.0)
            ));
        }
    }
    if !findings.is_empty() {
        writeln!(
            md,
            "\nAgainst the plain adapter, on the means over seeds, and the targets (at least +5 points under the attack \
             trained for, at most 1 point lost on clean data): {}. On these test sets one point is about 5 (SMS spam) or 13 \
             (Rotten Tomatoes) examples.",
            findings.join("; ")
        )?;
    }
    candidates_table(root, md)?;
    if let Some(cost) = read_json::<Cost>(&root.join(RUNS).join(COST))? {
        let mut line = Vec::new();
        for (ds, _, _, candidates) in DATASETS {
            let Some(adversarial) = choose(root, ds, candidates)? else { continue };
            let (Some(plain), Some(adv)) = (cost.get(*ds).and_then(|c| c.get("plain")), cost.get(*ds).and_then(|c| c.get(adversarial)))
            else {
                continue;
            };
            line.push(format!("{ds} {plain:.3} s plain, {adv:.3} s {adversarial} ({:.2}×)", adv / plain));
        }
        writeln!(
            md,
            "\nCost per training step (K = {STEPS}: the clean forward, {STEPS} ascent passes of forward and backward, the \
             perturbed forward and one backward through both; median of 3 alternated rounds of 12 steps, batch 32, 2 threads): \
             {}.",
            line.join("; ")
        )?;
    }
    Ok(())
}

/// An arm's (clean, trained-for attack) dev accuracy in percent at the first seed.
fn dev(root: &Path, ds: &str, arm: &str) -> Result<Option<(f64, f64)>> {
    let Some(r) = figures(root, &format!("{ds}-{arm}-s{}", SEEDS[0]))? else { return Ok(None) };
    Ok(r.get("dev_clean").zip(r.get("dev_pgd")).map(|(clean, pgd)| (100.0 * clean, 100.0 * pgd)))
}

/// Whether an arm's clean dev accuracy is within [`CLEAN_DEV_SLACK`] points of the plain
/// adapter's (first seed).
fn qualifies(root: &Path, ds: &str, arm: &str) -> Result<bool> {
    Ok(matches!((dev(root, ds, arm)?, dev(root, ds, "plain")?), (Some((clean, _)), Some((plain, _))) if clean >= plain - CLEAN_DEV_SLACK))
}

/// The dev figures the choice of an arm was made on (datasets with more than one candidate).
fn candidates_table(root: &Path, md: &mut String) -> Result<()> {
    for (ds, _, eps, candidates) in DATASETS.iter().filter(|d| d.3.len() > 1) {
        let Some(chosen) = choose(root, ds, candidates)? else { continue };
        writeln!(md, "\nThe choice of {ds}'s arm (seed {}, dev, ε {eps}):\n", SEEDS[0])?;
        writeln!(md, "| training | dev clean | dev PGD at ε | |\n|---|---|---|---|")?;
        for arm in std::iter::once(&"plain").chain(candidates.iter()) {
            let Some((clean, attacked)) = dev(root, ds, arm)? else { continue };
            let what = ARMS.iter().find(|a| a.0 == *arm).map_or(*arm, |a| a.1);
            let mark = if *arm == chosen { "chosen" } else { "" };
            writeln!(md, "| {what} | {clean:.2} | {attacked:.2} | {mark} |")?;
        }
        if !qualifies(root, ds, chosen)? {
            writeln!(
                md,
                "\nNo candidate came within {CLEAN_DEV_SLACK} points of the plain adapter's clean dev accuracy, so the rule took \
                 the one with the highest clean dev accuracy."
            )?;
        }
    }
    Ok(())
}
