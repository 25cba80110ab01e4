//! `cargo studies fed`: federated averaging of a Pfeiffer adapter on Rotten Tomatoes.
//! The training set is dealt into disjoint shards, one per client; every round each client
//! trains `examples/fedavg_client.toml` on its shard from the server's current adapter and
//! head (`init_from`), and the server averages the clients' folders by sample count with
//! `adapters average`. Against each client trained alone on its shard and one adapter
//! trained centrally on all shards, with the same examples seen in total; every adapter
//! scored on the test set with `adapters eval`. Writes its section of RESULTS.md.
//! Finished steps are skipped.

use crate::results::{Section, FED};
use crate::runs::{read_json, write_json, Cli, MINILM};
use adapters_train::records::ClassificationReport;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/fed-study";
const CONFIG: &str = "examples/fedavg_client.toml";
const CLIENTS: usize = 4;
const ROUNDS: usize = 4;
/// Optimizer steps a client takes per round (examples/fedavg_client.toml).
const LOCAL_STEPS: usize = 40;
const DATA: &str = "data/rotten_tomatoes";
/// Every adapter's test figures, by name (`global-R`, `alone-K`, `central`).
const SCORES: &str = "test-scores.json";

pub fn run(cli: &Cli) -> Result<()> {
    let root = cli.root();
    let sizes = write_shards(root)?;
    let total: usize = sizes.iter().sum();
    let train = |out: &str, sets: &[String]| cli.train(CONFIG, out, sets);
    // Federated rounds: global-0 is none (round 1 starts every client alike from the seed).
    for round in 1..=ROUNDS {
        let global = format!("{RUNS}/global-{round}");
        if root.join(&global).join("adapter_config.json").exists() {
            continue;
        }
        let mut clients = Vec::new();
        for k in 0..CLIENTS {
            let out = format!("{RUNS}/round-{round}/client-{k}");
            let mut sets = vec![format!("task.0.train=\"{RUNS}/shards/{k}.jsonl\""), format!("training.seed={}", 41 + round)];
            if round > 1 {
                sets.push(format!("adapters.rt={{ init_from = \"{RUNS}/global-{}\" }}", round - 1));
            }
            train(&out, &sets)?;
            clients.push(format!("{out}/adapters/rt"));
        }
        let weights: Vec<String> = sizes.iter().map(|n| format!("{}", *n as f64 / total as f64)).collect();
        let mut args = vec!["average", "--model", MINILM];
        for c in &clients {
            args.extend(["--adapter", c]);
        }
        let weights = weights.join(",");
        args.extend(["--weights", &weights, "--out", &global]);
        cli.run(&args)?;
    }
    // Each client alone on its shard, and one adapter on all of them, seeing as many
    // examples as the federation did in total.
    for k in 0..CLIENTS {
        let sets = [format!("task.0.train=\"{RUNS}/shards/{k}.jsonl\""), format!("training.steps={}", ROUNDS * LOCAL_STEPS)];
        train(&format!("{RUNS}/alone-{k}"), &sets)?;
    }
    let central = [format!("task.0.train=\"{DATA}/train.jsonl\""), format!("training.steps={}", CLIENTS * ROUNDS * LOCAL_STEPS)];
    train(&format!("{RUNS}/central"), &central)?;
    let mut folders: Vec<(String, String)> = (1..=ROUNDS).map(|r| (format!("global-{r}"), format!("{RUNS}/global-{r}"))).collect();
    folders.extend((0..CLIENTS).map(|k| (format!("alone-{k}"), format!("{RUNS}/alone-{k}/adapters/rt"))));
    folders.push(("central".into(), format!("{RUNS}/central/adapters/rt")));
    let scores_path = root.join(RUNS).join(SCORES);
    let mut scores: BTreeMap<String, ClassificationReport> = read_json(&scores_path)?.unwrap_or_default();
    for (name, folder) in folders {
        if scores.contains_key(&name) {
            continue;
        }
        scores.insert(name, cli.eval(&folder, &format!("{DATA}/test.jsonl"), &[])?);
        write_json(&scores_path, &scores)?;
    }
    Ok(())
}

/// Deals the training rows into `CLIENTS` disjoint shards (row i to client i mod CLIENTS;
/// `cargo xtask fetch` shuffled the file) and returns their sizes.
fn write_shards(root: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(root.join(DATA).join("train.jsonl")).context("run `cargo xtask fetch`")?;
    let mut shards = vec![String::new(); CLIENTS];
    let mut sizes = vec![0; CLIENTS];
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        shards[i % CLIENTS].push_str(line);
        shards[i % CLIENTS].push('\n');
        sizes[i % CLIENTS] += 1;
    }
    let dir = root.join(RUNS).join("shards");
    std::fs::create_dir_all(&dir)?;
    for (k, shard) in shards.iter().enumerate() {
        adapters_core::io::write_atomic(&dir.join(format!("{k}.jsonl")), shard.as_bytes())?;
    }
    Ok(sizes)
}

/// The study's section of RESULTS.md, when its scores are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let Some(scores) = read_json(&root.join(RUNS).join(SCORES))? else { return Ok(vec![]) };
    let mut md = String::new();
    write(&scores, &mut md)?;
    Ok(vec![(&FED, md)])
}

fn write(scores: &BTreeMap<String, ClassificationReport>, md: &mut String) -> Result<()> {
    let acc = |name: &str| scores.get(name).map_or(f64::NAN, |r| 100.0 * r.accuracy);
    let f1 = |name: &str| scores.get(name).map_or(f64::NAN, |r| 100.0 * r.macro_f1);
    writeln!(md, "\n## Federated averaging (`cargo studies fed`)\n")?;
    writeln!(
        md,
        "Rotten Tomatoes' training set dealt into {CLIENTS} disjoint shards of about {} rows (row i to client i mod {CLIENTS}; \
         the fetched file is shuffled, so the shards are alike: an IID split). A Pfeiffer adapter (r = 24) and head on frozen \
         all-MiniLM-L6-v2, `{CONFIG}`: batch 32, lr 1e-3 constant, max length 64. Each of {ROUNDS} rounds, every client \
         trains {LOCAL_STEPS} steps on its own shard starting from the server's adapter and head (`init_from`; round 1 from one \
         seeded initialisation), and the server averages the four folders weighted by shard size (`adapters average`, heads \
         included). Each client alone trains {} steps on its shard; the central adapter {} steps on the whole training set: \
         every arm sees the same number of examples per client as the federation. Test set (1,275 rows) through `adapters \
         eval`, final weights, seed 42.\n",
        10_202 / CLIENTS,
        ROUNDS * LOCAL_STEPS,
        CLIENTS * ROUNDS * LOCAL_STEPS
    )?;
    writeln!(md, "| adapter | test accuracy | macro-F1 |\n|---|---|---|")?;
    for r in 1..=ROUNDS {
        let name = format!("global-{r}");
        writeln!(md, "| federated, after round {r} | {:.2} | {:.2} |", acc(&name), f1(&name))?;
    }
    let alone: Vec<f64> = (0..CLIENTS).map(|k| acc(&format!("alone-{k}"))).collect();
    for (k, a) in alone.iter().enumerate() {
        writeln!(md, "| client {k} alone | {a:.2} | {:.2} |", f1(&format!("alone-{k}")))?;
    }
    writeln!(md, "| central, all shards | {:.2} | {:.2} |", acc("central"), f1("central"))?;
    let mean_alone = alone.iter().sum::<f64>() / alone.len() as f64;
    let federated = acc(&format!("global-{ROUNDS}"));
    writeln!(
        md,
        "\nAfter {ROUNDS} rounds the averaged adapter reaches {federated:.2}: {:+.2} points over the clients alone (mean {mean_alone:.2}) \
         and {:+.2} against central training ({:.2}), with no client's data leaving it.",
        federated - mean_alone,
        federated - acc("central"),
        acc("central")
    )?;
    Ok(())
}
