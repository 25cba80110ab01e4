//! `cargo studies moe`: one mixture-of-experts adapter shared by three classification
//! tasks (SMS spam, TREC coarse, Rotten Tomatoes), trained jointly on mixed-task batches,
//! against one shared Pfeiffer adapter with as many parameters per token and against
//! per-task Pfeiffer adapters, all with the same data, batches and steps; the mixture
//! without its balance loss, with sequence-level routing, and AdaMix-style (random routing
//! from one initialisation) merged into one adapter with `adapters merge-experts`. Writes
//! its section of RESULTS.md and the routing picture next to it. Finished runs are skipped.

use crate::results::{Section, MOE as MOE_SECTION, MOE_LONGER};
use crate::runs::{best_step, read_json, test_accuracy, write_json, Cli, Runs, MINILM};
use adapters_train::records::{ClassificationReport, RoutingPoint, Summary};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
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
const PICTURE: &str = "docs/moe_routing.svg";
/// The AdaMix mixture's and merged adapter's test figures, by `FORM TASK`.
const ADAMIX_EVALS: &str = "adamix-evals.json";

/// Runs the study's parts (`only`: comma-separated `arms`, `longer`; all when `None`).
pub fn run(cli: &Cli, only: Option<&str>) -> Result<()> {
    let chosen = |part: &str| only.is_none_or(|o| o.split(',').any(|x| x == part));
    if chosen("arms") {
        arms(cli)?;
    }
    if chosen("longer") {
        longer(cli)?;
    }
    Ok(())
}

fn longer_run(arm: &str, seed: u64) -> String {
    format!("{arm}-{LONGER_STEPS}-s{seed}")
}

/// The longer comparison, seed by seed (both arms of a seed before the next seed).
fn longer(cli: &Cli) -> Result<()> {
    for seed in LONGER_SEEDS {
        for arm in LONGER_ARMS {
            let extra = [format!("training.steps={LONGER_STEPS}"), format!("training.seed={seed}")];
            train_arm(cli, arm, &longer_run(arm, *seed), &extra)?;
        }
    }
    Ok(())
}

/// Trains an arm of `ARMS` into `runs/moe-study/RUN`, its settings followed by `extra`.
fn train_arm(cli: &Cli, arm: &str, run: &str, extra: &[String]) -> Result<()> {
    let (_, config, sets, _, _) = ARMS.iter().find(|a| a.0 == arm).with_context(|| format!("{arm} is not an arm of the study"))?;
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).chain(extra.iter().cloned()).collect();
    cli.train(config, &format!("{RUNS}/{run}"), &sets)
}

fn arms(cli: &Cli) -> Result<()> {
    let root = cli.root();
    for (arm, ..) in ARMS {
        train_arm(cli, arm, arm, &[])?;
    }
    for arm in RESEEDED {
        for seed in SEEDS {
            train_arm(cli, arm, &format!("{arm}-s{seed}"), &[format!("training.seed={seed}")])?;
        }
    }
    // AdaMix's serving form: the experts averaged into one Pfeiffer adapter, evaluated
    // beside the mixture itself through the same command.
    let merged = format!("{RUNS}/adamix-merged");
    if !root.join(&merged).join("adapter_config.json").exists() {
        let _ = std::fs::remove_dir_all(root.join(&merged));
        let mixture = format!("{RUNS}/adamix/adapters/moe");
        cli.run(&["merge-experts", &mixture, "--model", MINILM, "--out", &merged])?;
    }
    let evals = root.join(RUNS).join(ADAMIX_EVALS);
    if !evals.exists() {
        let mut out = BTreeMap::new();
        for (form, dir) in [("mixture", format!("{RUNS}/adamix/adapters/moe")), ("merged", merged.clone())] {
            for task in TASKS {
                let data = format!("data/{task}/test.jsonl");
                out.insert(format!("{form} {task}"), cli.eval(&dir, &data, &["--task", task])?);
            }
        }
        write_json(&evals, &out)?;
    }
    let picture = root.join(PICTURE);
    std::fs::create_dir_all(picture.parent().expect("a folder"))?;
    std::fs::copy(root.join(RUNS).join("moe_token/routing.svg"), &picture).context("copying the routing picture")?;
    Ok(())
}

/// The study's sections of RESULTS.md, each when its runs are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let runs = Runs::load(root, RUNS)?;
    let mut out = Vec::new();
    if runs.get("moe_token").is_some() {
        let mut md = String::new();
        write(root, &runs, &mut md)?;
        out.push((&MOE_SECTION, md));
    }
    if LONGER_ARMS.iter().any(|arm| runs.get(&longer_run(arm, LONGER_SEEDS[0])).is_some()) {
        let mut md = String::new();
        write_longer(&runs, &mut md)?;
        out.push((&MOE_LONGER, md));
    }
    Ok(out)
}

/// Point 5's comparison at twice the steps: each seed's mean test accuracy per arm.
fn write_longer(runs: &Runs, md: &mut String) -> Result<()> {
    writeln!(
        md,
        "\n### The same comparison at twice the steps\n\nAt {steps} steps the shared adapter and the straight-through \
         mixture kept their last dev step (still improving). Fixed before these runs: both arms again at {LONGER_STEPS} \
         steps (about two passes over the training sets; everything else as above), seeds {seeds}, judged on the means \
         (`cargo studies moe --only longer`). Mean test accuracy over the three tasks (percent); in brackets the best \
         dev step kept:\n",
        steps = runs.get("shared").map_or(600, |s| s.steps),
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
        let seeds: Vec<Option<&Summary>> = LONGER_SEEDS.iter().map(|seed| runs.get(&longer_run(arm, *seed))).collect();
        let done: Vec<&Summary> = seeds.iter().flatten().copied().collect();
        let cells: Vec<String> =
            seeds.iter().map(|s| s.map_or("not run".into(), |s| format!("{:.2} ({})", mean_accuracy(s), best_step(s)))).collect();
        let mean = done.iter().map(|s| mean_accuracy(s)).sum::<f64>() / done.len().max(1) as f64;
        let per_task: Vec<String> = TASKS
            .iter()
            .map(|t| format!("{:.2}", done.iter().map(|s| test_accuracy(s, t)).sum::<f64>() / done.len().max(1) as f64))
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
            let mixtures: Vec<&Summary> = LONGER_SEEDS.iter().filter_map(|seed| runs.get(&longer_run(LONGER_ARMS[1], *seed))).collect();
            let lowest = |field: Field| mixtures.iter().map(|s| routing_range(s, field).0).fold(f64::INFINITY, f64::min);
            let highest = |field: Field| mixtures.iter().map(|s| routing_range(s, field).1).fold(f64::NEG_INFINITY, f64::max);
            writeln!(
                md,
                "\nAt {LONGER_STEPS} steps the mixture {verdict} the shared Pfeiffer adapter's mean ({moe:.2} against {shared:.2}, \
                 {:+.2} points; per-task columns are means over the seeds), while one arm's seeds spread over {:.2} (shared) and \
                 {:.2} (mixture) points: the two are level within what a seed changes. Its routing on dev, every seed: normalised \
                 expert-usage entropy at least {:.3} in every layer; {:.3}-{:.3} bits of information about the task.",
                moe - shared,
                spreads[0],
                spreads[1],
                lowest(entropy),
                lowest(task_expert_mi),
                highest(task_expert_mi),
            )?;
        }
    }
    Ok(())
}

fn write(root: &Path, runs: &Runs, md: &mut String) -> Result<()> {
    let steps = runs.get("moe_token").map_or(0, |s| s.steps);
    writeln!(md, "\n## Mixture of experts: one adapter for three tasks\n")?;
    writeln!(
        md,
        "`cargo studies moe`. Three visible classification tasks trained jointly on frozen all-MiniLM-L6-v2: every batch \
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
        let Some(s) = runs.get(name) else {
            writeln!(md, "| {what} | not run |")?;
            continue;
        };
        let accs: Vec<f64> = TASKS.iter().map(|t| test_accuracy(s, t)).collect();
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        let stored = s.trainable_parameters.saturating_sub(3850);
        let cells: Vec<String> = accs.iter().map(|a| format!("{a:.2}")).collect();
        writeln!(md, "| {what} | {} | **{mean:.2}** | {stored} | {per_token} |", cells.join(" | "))?;
    }
    routing(runs, md)?;
    adamix(root, md)?;
    findings(runs, md)?;
    Ok(())
}

/// Mean test accuracy (percent) of a run over the three tasks.
fn mean_accuracy(s: &Summary) -> f64 {
    TASKS.iter().map(|t| test_accuracy(s, t)).sum::<f64>() / TASKS.len() as f64
}

/// A figure of a routed point.
type Field = fn(&RoutingPoint) -> Option<f64>;

fn entropy(p: &RoutingPoint) -> Option<f64> {
    Some(p.entropy)
}

fn task_expert_mi(p: &RoutingPoint) -> Option<f64> {
    p.task_expert_mi_bits
}

/// (lowest, highest) of a routing figure over a run's routed points.
fn routing_range(s: &Summary, field: Field) -> (f64, f64) {
    let values = s.routing.iter().flat_map(|r| r.points.values()).filter_map(field);
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// An arm's mean test accuracy averaged over the seeds it ran with, and how many.
fn seed_mean(runs: &Runs, arm: &str) -> (f64, usize) {
    let means: Vec<f64> = std::iter::once(arm.to_string())
        .chain(SEEDS.iter().map(|s| format!("{arm}-s{s}")))
        .filter_map(|run| runs.get(&run))
        .map(mean_accuracy)
        .collect();
    (means.iter().sum::<f64>() / means.len().max(1) as f64, means.len())
}

/// The reseeded arms: each seed's mean accuracy.
fn seeds(runs: &Runs, md: &mut String) -> Result<()> {
    let rows: Vec<(&str, Vec<(u64, f64)>)> = RESEEDED
        .iter()
        .map(|arm| {
            let first = runs.get(arm).map(|s| (42, mean_accuracy(s)));
            let others = SEEDS.iter().filter_map(|seed| runs.get(&format!("{arm}-s{seed}")).map(|s| (*seed, mean_accuracy(s))));
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
fn findings(runs: &Runs, md: &mut String) -> Result<()> {
    let arms: Vec<Option<&Summary>> =
        ["shared", "moe_token", "moe_st", "moe_top2", "moe_no_balance", "moe_sequence"].iter().map(|a| runs.get(a)).collect();
    let [Some(shared), Some(token), Some(st), Some(top2), Some(free), Some(sequence)] = arms[..] else { return Ok(()) };
    seeds(runs, md)?;
    let (bar, seeds_shared) = seed_mean(runs, "shared");
    let (t1, seeds_token) = seed_mean(runs, "moe_token");
    let (t1_st, seeds_st) = seed_mean(runs, "moe_st");
    let t2 = mean_accuracy(top2);
    let spread = |arm: &str| {
        let means: Vec<f64> = std::iter::once(arm.to_string())
            .chain(SEEDS.iter().map(|s| format!("{arm}-s{s}")))
            .filter_map(|run| runs.get(&run))
            .map(mean_accuracy)
            .collect();
        means.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b)) - means.iter().fold(f64::INFINITY, |a, &b| a.min(b))
    };
    let verdict = if t1.max(t1_st).max(t2) >= bar { "reaches" } else { "does not reach" };
    let (e_lo, _) = routing_range(token, entropy);
    let (st_lo, _) = routing_range(st, entropy);
    let (e2_lo, _) = routing_range(top2, entropy);
    let (f_lo, f_hi) = routing_range(free, entropy);
    let (mi_lo, mi_hi) = routing_range(st, task_expert_mi);
    let (smi_lo, smi_hi) = routing_range(sequence, task_expert_mi);
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
        shared.steps,
        best_step(shared),
        best_step(st),
        best_step(token),
        best_step(top2),
        mean_accuracy(sequence)
    )?;
    Ok(())
}

/// Per layer: normalised expert-usage entropy and task-expert mutual information on dev.
fn routing(runs: &Runs, md: &mut String) -> Result<()> {
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
    let point = |arm: &str, key: &str| runs.get(arm)?.routing.as_ref()?.points.get(key);
    for layer in 0..6 {
        let key = format!("moe_bn layer {layer} ffn_output");
        let cells: Vec<String> = arms
            .iter()
            .map(|arm| match point(arm, &key) {
                Some(p) => format!("{:.3} | {:.3}", p.entropy, p.task_expert_mi_bits.unwrap_or(f64::NAN)),
                None => "not run | not run".into(),
            })
            .collect();
        writeln!(md, "| {layer} | {} |", cells.join(" | "))?;
    }
    if runs.get("moe_token").is_some() {
        let shares = point("moe_token", "moe_bn layer 5 ffn_output").and_then(|p| p.per_task_share.as_ref());
        writeln!(md, "\nExpert shares per task at layer 5 (token routing, dev):\n")?;
        writeln!(md, "| task | {} |", (0..8).map(|e| format!("e{e}")).collect::<Vec<_>>().join(" | "))?;
        writeln!(md, "|---|{}", "---|".repeat(8))?;
        for task in TASKS {
            let shares: Vec<String> = shares.and_then(|s| s.get(*task)).into_iter().flatten().map(|v| format!("{v:.2}")).collect();
            writeln!(md, "| {task} | {} |", shares.join(" | "))?;
        }
    }
    Ok(())
}

/// The AdaMix mixture against its merged form, through `adapters eval`.
fn adamix(root: &Path, md: &mut String) -> Result<()> {
    let Some(evals) = read_json::<BTreeMap<String, ClassificationReport>>(&root.join(RUNS).join(ADAMIX_EVALS))? else { return Ok(()) };
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
        let accs: Vec<f64> = TASKS.iter().map(|t| evals.get(&format!("{form} {t}")).map_or(f64::NAN, |r| 100.0 * r.accuracy)).collect();
        let cells: Vec<String> = accs.iter().map(|a| format!("{a:.2}")).collect();
        means.push(accs.iter().sum::<f64>() / accs.len() as f64);
        writeln!(md, "| {form} | {} | {:.2} |", cells.join(" | "), means[means.len() - 1])?;
    }
    writeln!(md, "\nMerging costs {:.2} points of mean accuracy (the target: at most 1).", means[0] - means[1])?;
    Ok(())
}
