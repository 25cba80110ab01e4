//! `cargo xtask moe-study`: one mixture-of-experts adapter shared by three classification
//! tasks (SMS spam, TREC coarse, Rotten Tomatoes), trained jointly on mixed-task batches,
//! against one shared Pfeiffer adapter with as many parameters per token and against
//! per-task Pfeiffer adapters, all with the same data, batches and steps; the mixture
//! without its balance loss, with sequence-level routing, and AdaMix-style (random routing
//! from one initialisation) merged into one adapter with `adapters merge-experts`. Writes
//! its section of RESULTS.md and the routing picture next to it. Finished runs are skipped.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/moe-study";
const MOE: &str = "examples/moe_multitask.toml";
const TASKS: &[&str] = &["sms_spam", "trec_coarse", "rotten_tomatoes"];
/// (run, config, overrides, what it is, adapter parameters a token uses per layer).
const ARMS: &[(&str, &str, &[&str], &str, &str)] = &[
    ("shared", "examples/shared_multitask.toml", &[], "one Pfeiffer adapter (r = 24) shared by the three tasks", "18,840"),
    ("per_task", "examples/per_task_multitask.toml", &[], "one Pfeiffer adapter (r = 24) per task", "18,840"),
    ("moe_token", MOE, &[], "mixture, top-1 token routing, balance loss 0.01", "18,836"),
    (
        "moe_st",
        MOE,
        &["adapters.moe.gate=\"straight_through\""],
        "mixture, top-1 token routing, straight-through gate, balance loss 0.01",
        "18,836",
    ),
    (
        "moe_top2",
        MOE,
        &["adapters.moe.top_k=2", "adapters.moe.reduction_factor=42.0"],
        "mixture, top-2 token routing (experts of r = 9), balance loss 0.01",
        "17,682",
    ),
    ("moe_no_balance", MOE, &["adapters.moe.balance_loss=0.0"], "mixture, top-1 token routing, no balance loss", "18,836"),
    ("moe_sequence", MOE, &["adapters.moe.routing=\"sequence\""], "mixture, top-1 sequence routing, balance loss 0.01", "18,836"),
    (
        "adamix",
        MOE,
        &["adapters.moe.router=\"random\"", "adapters.moe.shared_init=true"],
        "AdaMix: random routing from one initialisation (inference: the experts' outputs averaged)",
        "15,764 merged (the mixture: all 8)",
    ),
];
/// Arms run again with other seeds (as `ARM-sSEED`), to see how much a seed moves them.
const RESEEDED: &[&str] = &["shared", "moe_token", "moe_st"];
const SEEDS: &[u64] = &[2, 3];
/// Point 5's comparison again at twice the steps, fixed before these runs: at 600 steps the
/// shared adapter and the straight-through mixture kept their last dev step (still
/// improving), while Switch's gate peaked at 450, so the straight-through mixture is the one
/// run; seeds 42, 2 and 3 for both arms, judged on the means. Run as `ARM-1200-sSEED`.
const LONGER_ARMS: &[&str] = &["shared", "moe_st"];
const LONGER_STEPS: u64 = 1200;
const LONGER_SEEDS: &[u64] = &[42, 2, 3];
const LONGER_BEGIN: &str = "<!-- moe-study longer: written by `cargo xtask moe-study` -->";
const LONGER_END: &str = "<!-- /moe-study longer -->";
const PICTURE: &str = "docs/moe_routing.svg";
const BEGIN: &str = "<!-- moe-study: written by `cargo xtask moe-study` -->";
const END: &str = "<!-- /moe-study -->";

/// Runs the study's parts (`only`: comma-separated `arms`, `longer`; all when `None`).
pub fn run(root: &Path, only: Option<&str>) -> Result<()> {
    let chosen = |part: &str| only.is_none_or(|o| o.split(',').any(|x| x == part));
    crate::fetch::fetch_all(root)?;
    crate::run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
    let cli = root.join("target/release/adapters");
    let cli = cli.to_str().context("a UTF-8 path")?;
    if chosen("arms") {
        arms(root, cli)?;
    }
    if chosen("longer") {
        longer(root, cli)?;
    }
    let place = "\n<!-- hyper-study:";
    crate::quality::replace_block(root, BEGIN, END, &main_block(root)?, place)?;
    crate::quality::replace_block(root, LONGER_BEGIN, LONGER_END, &longer_block(root)?, place)?;
    eprintln!("wrote the mixture-of-experts sections of RESULTS.md");
    Ok(())
}

fn longer_run(arm: &str, seed: u64) -> String {
    format!("{arm}-{LONGER_STEPS}-s{seed}")
}

/// The longer comparison, seed by seed (both arms of a seed before the next seed).
fn longer(root: &Path, cli: &str) -> Result<()> {
    for seed in LONGER_SEEDS {
        for arm in LONGER_ARMS {
            let extra = [format!("training.steps={LONGER_STEPS}"), format!("training.seed={seed}")];
            train_arm(root, cli, arm, &longer_run(arm, *seed), &extra)?;
        }
    }
    Ok(())
}

/// Trains an arm of `ARMS` into `runs/moe-study/RUN`, its settings followed by `extra`.
fn train_arm(root: &Path, cli: &str, arm: &str, run: &str, extra: &[String]) -> Result<()> {
    let (_, config, sets, _, _) = ARMS.iter().find(|a| a.0 == arm).with_context(|| format!("{arm} is not an arm of the study"))?;
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).chain(extra.iter().cloned()).collect();
    crate::train(root, cli, config, &format!("{RUNS}/{run}"), &sets)
}

fn arms(root: &Path, cli: &str) -> Result<()> {
    for (arm, ..) in ARMS {
        train_arm(root, cli, arm, arm, &[])?;
    }
    for arm in RESEEDED {
        for seed in SEEDS {
            train_arm(root, cli, arm, &format!("{arm}-s{seed}"), &[format!("training.seed={seed}")])?;
        }
    }
    // AdaMix's serving form: the experts averaged into one Pfeiffer adapter, evaluated
    // beside the mixture itself through the same command.
    let merged = format!("{RUNS}/adamix-merged");
    if !root.join(&merged).join("adapter_config.json").exists() {
        let _ = std::fs::remove_dir_all(root.join(&merged));
        let model = root.join("models/all-MiniLM-L6-v2");
        let mixture = format!("{RUNS}/adamix/adapters/moe");
        crate::run(root, cli, &["merge-experts", &mixture, "--model", model.to_str().context("UTF-8")?, "--out", &merged])?;
    }
    let evals = root.join(RUNS).join("adamix-evals.json");
    if !evals.exists() {
        let mut out = serde_json::Map::new();
        for (form, dir) in [("mixture", format!("{RUNS}/adamix/adapters/moe")), ("merged", merged.clone())] {
            for task in TASKS {
                let data = format!("data/{task}/test.jsonl");
                out.insert(format!("{form} {task}"), crate::eval(root, cli, &dir, &data, &["--task", task])?);
            }
        }
        std::fs::write(&evals, serde_json::to_string_pretty(&out)?)?;
    }
    let picture = root.join(PICTURE);
    std::fs::create_dir_all(picture.parent().expect("a folder"))?;
    std::fs::copy(root.join(RUNS).join("moe_token/routing.svg"), &picture).context("copying the routing picture")?;
    Ok(())
}

fn summary(root: &Path, run: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(root.join(RUNS).join(run).join("summary.json")).ok()?).ok()
}

/// The study's sections of RESULTS.md, from the runs (or as RESULTS.md has them when the
/// runs are not here).
pub fn block(root: &Path) -> Result<String> {
    Ok(main_block(root)? + &longer_block(root)?)
}

fn main_block(root: &Path) -> Result<String> {
    let mut md = String::new();
    if summary(root, "moe_token").is_some() {
        write(root, &mut md)?;
    }
    crate::quality::marked_block(root, BEGIN, END, &md)
}

fn longer_block(root: &Path) -> Result<String> {
    let mut md = String::new();
    if LONGER_ARMS.iter().any(|arm| summary(root, &longer_run(arm, LONGER_SEEDS[0])).is_some()) {
        write_longer(root, &mut md)?;
    }
    crate::quality::marked_block(root, LONGER_BEGIN, LONGER_END, &md)
}

/// Point 5's comparison at twice the steps: each seed's mean test accuracy per arm.
fn write_longer(root: &Path, md: &mut String) -> Result<()> {
    writeln!(
        md,
        "\n### The same comparison at twice the steps\n\nAt {steps} steps the shared adapter and the straight-through \
         mixture kept their last dev step (still improving). Fixed before these runs: both arms again at {LONGER_STEPS} \
         steps (about two passes over the training sets; everything else as above), seeds {seeds}, judged on the means \
         (`cargo xtask moe-study --only longer`). Mean test accuracy over the three tasks (percent); in brackets the best \
         dev step kept:\n",
        steps = summary(root, "shared").map(|s| s["steps"].clone()).unwrap_or(serde_json::json!(600)),
        seeds = LONGER_SEEDS.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
    )?;
    writeln!(
        md,
        "| arm | {} | mean over seeds | {} |",
        LONGER_SEEDS.iter().map(|s| format!("seed {s}")).collect::<Vec<_>>().join(" | "),
        TASKS.join(" | ")
    )?;
    writeln!(md, "|---|{}---|{}", "---|".repeat(LONGER_SEEDS.len()), "---|".repeat(TASKS.len()))?;
    let (mut means, mut spreads) = (Vec::new(), Vec::new());
    for arm in LONGER_ARMS {
        let runs: Vec<Option<serde_json::Value>> = LONGER_SEEDS.iter().map(|seed| summary(root, &longer_run(arm, *seed))).collect();
        let done: Vec<&serde_json::Value> = runs.iter().flatten().collect();
        let cells: Vec<String> =
            runs.iter().map(|s| s.as_ref().map_or("not run".into(), |s| format!("{:.2} ({})", mean_accuracy(s), s["best_step"]))).collect();
        let mean = done.iter().map(|s| mean_accuracy(s)).sum::<f64>() / done.len().max(1) as f64;
        let per_task: Vec<String> = TASKS
            .iter()
            .map(|t| format!("{:.2}", done.iter().map(|s| pct(&s["tasks"][t]["test"]["accuracy"])).sum::<f64>() / done.len().max(1) as f64))
            .collect();
        let what = ARMS.iter().find(|a| a.0 == *arm).map_or(*arm, |a| a.3);
        writeln!(md, "| {what} | {} | **{mean:.2}** ({} seeds) | {} |", cells.join(" | "), done.len(), per_task.join(" | "))?;
        means.push((arm, mean, done.len()));
        let accs = done.iter().map(|s| mean_accuracy(s));
        spreads.push(accs.clone().fold(f64::NEG_INFINITY, f64::max) - accs.fold(f64::INFINITY, f64::min));
    }
    if let [(_, shared, n), (_, moe, m)] = means.as_slice() {
        if *n == LONGER_SEEDS.len() && *m == LONGER_SEEDS.len() {
            let verdict = if moe >= shared { "reaches" } else { "does not reach" };
            let mixtures: Vec<serde_json::Value> =
                LONGER_SEEDS.iter().filter_map(|seed| summary(root, &longer_run(LONGER_ARMS[1], *seed))).collect();
            let lowest = |field: &str| mixtures.iter().map(|s| routing_range(s, field).0).fold(f64::INFINITY, f64::min);
            let highest = |field: &str| mixtures.iter().map(|s| routing_range(s, field).1).fold(f64::NEG_INFINITY, f64::max);
            writeln!(
                md,
                "\nAt {LONGER_STEPS} steps the mixture {verdict} the shared Pfeiffer adapter's mean ({moe:.2} against {shared:.2}, \
                 {:+.2} points; per-task columns are means over the seeds), while one arm's seeds spread over {:.2} (shared) and \
                 {:.2} (mixture) points: the two are level within what a seed changes. Its routing on dev, every seed: normalised \
                 expert-usage entropy at least {:.3} in every layer; {:.3}-{:.3} bits of information about the task.",
                moe - shared,
                spreads[0],
                spreads[1],
                lowest("entropy"),
                lowest("task_expert_mi_bits"),
                highest("task_expert_mi_bits"),
            )?;
        }
    }
    Ok(())
}

/// Accuracy in percent.
fn pct(v: &serde_json::Value) -> f64 {
    100.0 * v.as_f64().unwrap_or(f64::NAN)
}

fn write(root: &Path, md: &mut String) -> Result<()> {
    let steps = summary(root, "moe_token").map(|s| s["steps"].clone()).unwrap_or_default();
    writeln!(md, "\n## Mixture of experts: one adapter for three tasks\n")?;
    writeln!(
        md,
        "`cargo xtask moe-study`. Three visible classification tasks trained jointly on frozen all-MiniLM-L6-v2: every batch \
         of 32 mixes the tasks by temperature sampling (T = 2: about 8 SMS, 9 TREC and 14 Rotten Tomatoes rows), each task has \
         its own head, {steps} steps (about one pass over the three training sets), lr 1e-3, max length 64, seed 42, the best \
         dev step (mean accuracy, evaluated every 150 steps) kept. The mixture (`{MOE}`): 8 bottleneck experts after every \
         feed-forward sublayer, top-1 token routing; experts of r = 20 so that expert and router (8 x 384) together hold \
         18,836 parameters per layer, as many as a token uses with one shared Pfeiffer adapter of r = 24 (18,840). Test \
         accuracy in percent; parameters without the heads (3,850 in all three arms).\n"
    )?;
    writeln!(md, "| arm | {} | mean | adapter parameters stored | per token per layer |", TASKS.join(" | "))?;
    writeln!(md, "|---|{}---|---|---|", "---|".repeat(TASKS.len()))?;
    for (name, _, _, what, per_token) in ARMS {
        let Some(s) = summary(root, name) else {
            writeln!(md, "| {what} | not run |")?;
            continue;
        };
        let accs: Vec<f64> = TASKS.iter().map(|t| pct(&s["tasks"][t]["test"]["accuracy"])).collect();
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        let stored = s["trainable_parameters"].as_u64().unwrap_or(0).saturating_sub(3850);
        let cells: Vec<String> = accs.iter().map(|a| format!("{a:.2}")).collect();
        writeln!(md, "| {what} | {} | **{mean:.2}** | {stored} | {per_token} |", cells.join(" | "))?;
    }
    routing(root, md)?;
    adamix(root, md)?;
    findings(root, md)?;
    Ok(())
}

/// Mean test accuracy (percent) of a run over the three tasks.
fn mean_accuracy(s: &serde_json::Value) -> f64 {
    TASKS.iter().map(|t| pct(&s["tasks"][t]["test"]["accuracy"])).sum::<f64>() / TASKS.len() as f64
}

/// (lowest, highest) of a routing field over a run's routed points.
fn routing_range(s: &serde_json::Value, field: &str) -> (f64, f64) {
    let values = s["routing"]["points"].as_object().into_iter().flatten().filter_map(|(_, p)| p[field].as_f64());
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// An arm's mean test accuracy averaged over the seeds it ran with, and how many.
fn seed_mean(root: &Path, arm: &str) -> (f64, usize) {
    let means: Vec<f64> = std::iter::once(arm.to_string())
        .chain(SEEDS.iter().map(|s| format!("{arm}-s{s}")))
        .filter_map(|run| summary(root, &run))
        .map(|s| mean_accuracy(&s))
        .collect();
    (means.iter().sum::<f64>() / means.len().max(1) as f64, means.len())
}

/// The reseeded arms: each seed's mean accuracy.
fn seeds(root: &Path, md: &mut String) -> Result<()> {
    let rows: Vec<(&str, Vec<(u64, f64)>)> = RESEEDED
        .iter()
        .map(|arm| {
            let first = summary(root, arm).map(|s| (42, mean_accuracy(&s)));
            let others = SEEDS.iter().filter_map(|seed| summary(root, &format!("{arm}-s{seed}")).map(|s| (*seed, mean_accuracy(&s))));
            (*arm, first.into_iter().chain(others).collect())
        })
        .collect();
    if rows.iter().all(|(_, seeds)| seeds.len() < 2) {
        return Ok(());
    }
    writeln!(md, "\nMean test accuracy by seed (the same runs with `training.seed` changed: initialisation, data order, dropout):\n")?;
    writeln!(md, "| arm | {} | mean over seeds |", rows[0].1.iter().map(|(s, _)| format!("seed {s}")).collect::<Vec<_>>().join(" | "))?;
    writeln!(md, "|---|{}---|", "---|".repeat(rows[0].1.len()))?;
    for (arm, seeds) in &rows {
        let cells: Vec<String> = seeds.iter().map(|(_, a)| format!("{a:.2}")).collect();
        writeln!(md, "| {arm} | {} | {:.2} |", cells.join(" | "), seeds.iter().map(|(_, a)| a).sum::<f64>() / seeds.len() as f64)?;
    }
    Ok(())
}

/// What the tables say, computed from them.
fn findings(root: &Path, md: &mut String) -> Result<()> {
    let arms: Vec<Option<serde_json::Value>> =
        ["shared", "moe_token", "moe_st", "moe_top2", "moe_no_balance", "moe_sequence"].iter().map(|a| summary(root, a)).collect();
    let [Some(shared), Some(token), Some(st), Some(top2), Some(free), Some(sequence)] = arms.as_slice() else { return Ok(()) };
    seeds(root, md)?;
    let (bar, seeds_shared) = seed_mean(root, "shared");
    let (t1, seeds_token) = seed_mean(root, "moe_token");
    let (t1_st, seeds_st) = seed_mean(root, "moe_st");
    let t2 = mean_accuracy(top2);
    let spread = |arm: &str| {
        let means: Vec<f64> = std::iter::once(arm.to_string())
            .chain(SEEDS.iter().map(|s| format!("{arm}-s{s}")))
            .filter_map(|run| summary(root, &run))
            .map(|s| mean_accuracy(&s))
            .collect();
        means.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b)) - means.iter().fold(f64::INFINITY, |a, &b| a.min(b))
    };
    let verdict = if t1.max(t1_st).max(t2) >= bar { "reaches" } else { "does not reach" };
    let (e_lo, _) = routing_range(token, "entropy");
    let (st_lo, _) = routing_range(st, "entropy");
    let (e2_lo, _) = routing_range(top2, "entropy");
    let (f_lo, f_hi) = routing_range(free, "entropy");
    let (mi_lo, mi_hi) = routing_range(st, "task_expert_mi_bits");
    let (smi_lo, smi_hi) = routing_range(sequence, "task_expert_mi_bits");
    writeln!(
        md,
        "\nFindings (the shared adapter and the top-1 mixtures: means over {seeds_shared}, {seeds_token} (Switch gate) and \
         {seeds_st} (straight-through gate) seeds; the other arms one seed). The mixture {verdict} the shared Pfeiffer adapter's \
         mean at the same parameters per token: top-1 with the straight-through gate {t1_st:.2}, top-1 with Switch's gate \
         {t1:.2} and top-2 {t2:.2} against {bar:.2} ({:+.2}, {:+.2} and {:+.2} points; one arm's seeds spread over {:.2} (shared), {:.2} (Switch) \
         and {:.2} (straight-through) points, so differences of a tenth of a point are within what a seed changes); the best dev steps (of {}) were {}, {}, \
         {} and {} (shared, straight-through, Switch, top-2). Switch's gate multiplies the chosen expert's output by its router \
         probability (1/8 for a router that has not yet learned a preference, and the balance loss rewards even use); the \
         straight-through gate adds the output at full weight and trains the router with the same gradient. With the \
         balance loss the experts are used evenly (normalised entropy at least {st_lo:.3} (straight-through), {e_lo:.3} \
         (Switch) and {e2_lo:.3} (top-2) in every layer); without it routing collapses onto a few experts (entropy \
         {f_lo:.3}-{f_hi:.3}). Routing depends on the input: token routing (straight-through) carries {mi_lo:.3}-{mi_hi:.3} \
         bits of information about the task, and sequence routing, which sends whole sentences, {smi_lo:.3}-{smi_hi:.3} bits \
         (it separates the tasks far more, at {:.2} mean accuracy: one expert per sentence is less capacity per token).",
        t1_st - bar,
        t1 - bar,
        t2 - bar,
        spread("shared"),
        spread("moe_token"),
        spread("moe_st"),
        shared["steps"],
        shared["best_step"],
        st["best_step"],
        token["best_step"],
        top2["best_step"],
        mean_accuracy(sequence)
    )?;
    Ok(())
}

/// Per layer: normalised expert-usage entropy and task-expert mutual information on dev.
fn routing(root: &Path, md: &mut String) -> Result<()> {
    let arms = ["moe_st", "moe_token", "moe_top2", "moe_no_balance", "moe_sequence"];
    writeln!(
        md,
        "\nRouting on the dev sets with the kept weights (from each run's `summary.json`): normalised entropy of expert use \
         (1 = all 8 experts used equally, 0 = one expert takes every token) and the mutual information between task and \
         expert in bits (0 = every task uses the experts alike; at most log2 3 = 1.58). Expert shares over training per \
         layer: [routing.svg]({PICTURE}) (token routing).\n"
    )?;
    writeln!(md, "| layer | {} |", arms.iter().map(|a| format!("{a} entropy | {a} MI")).collect::<Vec<_>>().join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(arms.len() * 2))?;
    let summaries: Vec<Option<serde_json::Value>> = arms.iter().map(|a| summary(root, a)).collect();
    for layer in 0..6 {
        let key = format!("moe_bn layer {layer} ffn_output");
        let cells: Vec<String> = summaries
            .iter()
            .map(|s| match s.as_ref().map(|s| &s["routing"]["points"][&key]) {
                Some(p) if !p.is_null() => {
                    format!(
                        "{:.3} | {:.3}",
                        p["entropy"].as_f64().unwrap_or(f64::NAN),
                        p["task_expert_mi_bits"].as_f64().unwrap_or(f64::NAN)
                    )
                }
                _ => "not run | not run".into(),
            })
            .collect();
        writeln!(md, "| {layer} | {} |", cells.join(" | "))?;
    }
    if let Some(s) = summary(root, "moe_token") {
        let p = &s["routing"]["points"]["moe_bn layer 5 ffn_output"]["per_task_share"];
        writeln!(md, "\nExpert shares per task at layer 5 (token routing, dev):\n")?;
        writeln!(md, "| task | {} |", (0..8).map(|e| format!("e{e}")).collect::<Vec<_>>().join(" | "))?;
        writeln!(md, "|---|{}", "---|".repeat(8))?;
        for task in TASKS {
            let shares: Vec<String> =
                p[task].as_array().into_iter().flatten().map(|v| format!("{:.2}", v.as_f64().unwrap_or(f64::NAN))).collect();
            writeln!(md, "| {task} | {} |", shares.join(" | "))?;
        }
    }
    Ok(())
}

/// The AdaMix mixture against its merged form, through `adapters eval`.
fn adamix(root: &Path, md: &mut String) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(root.join(RUNS).join("adamix-evals.json")) else { return Ok(()) };
    let evals: serde_json::Value = serde_json::from_str(&text)?;
    writeln!(
        md,
        "\nAdaMix's serving form: `adapters merge-experts` averages the 8 experts' weights into one plain Pfeiffer adapter \
         (`{RUNS}/adamix-merged`), which runs at one adapter's cost without a router; the mixture itself, in inference, runs \
         every expert and averages their outputs. Both through `adapters eval --max-length 64` on the test sets:\n"
    )?;
    writeln!(md, "| form | {} | mean |", TASKS.join(" | "))?;
    writeln!(md, "|---|{}---|", "---|".repeat(TASKS.len()))?;
    let mut means = Vec::new();
    for form in ["mixture", "merged"] {
        let accs: Vec<f64> = TASKS.iter().map(|t| pct(&evals[format!("{form} {t}")]["accuracy"])).collect();
        let cells: Vec<String> = accs.iter().map(|a| format!("{a:.2}")).collect();
        means.push(accs.iter().sum::<f64>() / accs.len() as f64);
        writeln!(md, "| {form} | {} | {:.2} |", cells.join(" | "), means[means.len() - 1])?;
    }
    writeln!(md, "\nMerging costs {:.2} points of mean accuracy (the target: at most 1).", means[0] - means[1])?;
    Ok(())
}
