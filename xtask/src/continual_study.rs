//! `cargo xtask continual-study`: what training on a second task does to the first.
//! SMS spam, then TREC coarse, three ways: full fine-tuning (the SMS-tuned model tuned on
//! TREC), one adapter per task on the frozen base, and one adapter trained on SMS and then
//! on TREC (`init_from`). After the TREC run, each is re-tested on SMS with its SMS head.
//! Writes its section of RESULTS.md. Finished runs are skipped.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/continual-study";
const BEGIN: &str = "<!-- continual-study: written by `cargo xtask continual-study` -->";
const END: &str = "<!-- /continual-study -->";
const SHORT: &str = "model.max_length=64";
const FULL: &[&str] = &["training.mode=\"full\"", "training.lr=5e-5", "adapters={}"];

/// (arm, what it is, SMS run, TREC run, the folder holding the TREC-trained weights that
/// SMS is re-tested through, whether that is a model folder).
struct Arm {
    name: &'static str,
    what: &'static str,
    sms: Vec<String>,
    trec: Vec<String>,
    /// Where the SMS head goes for the re-test, and how `adapters eval` loads it.
    after: String,
    model_folder: bool,
}

fn arms() -> Vec<Arm> {
    let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        Arm {
            name: "full",
            what: "full fine-tuning (lr 5e-5), the SMS-tuned model tuned on TREC",
            sms: own(FULL),
            trec: [own(FULL), vec![format!("model.path=\"{RUNS}/full-sms/model\"")]].concat(),
            after: format!("{RUNS}/full-trec/model"),
            model_folder: true,
        },
        Arm {
            name: "per_task",
            what: "one Pfeiffer adapter per task on the frozen base",
            sms: vec![],
            trec: vec![],
            after: format!("{RUNS}/per_task-sms/adapters/sms_spam"),
            model_folder: false,
        },
        Arm {
            name: "sequential",
            what: "one Pfeiffer adapter, trained on SMS, then on TREC (`init_from`)",
            sms: vec![],
            trec: vec![format!("adapters.trec_coarse={{ init_from = \"{RUNS}/sequential-sms/adapters/sms_spam\" }}")],
            after: format!("{RUNS}/sequential-trec/adapters/trec_coarse"),
            model_folder: false,
        },
    ]
}

pub fn run(root: &Path) -> Result<()> {
    crate::fetch::fetch_all(root)?;
    crate::run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
    let cli = root.join("target/release/adapters");
    let cli = cli.to_str().context("a UTF-8 path")?;
    let train = |config: &str, out: &str, sets: &[String]| -> Result<()> {
        if root.join(out).join("summary.json").exists() {
            return Ok(());
        }
        let _ = std::fs::remove_dir_all(root.join(out));
        let mut args =
            vec!["train".to_string(), config.into(), "--set".into(), format!("output.dir=\"{out}\""), "--set".into(), SHORT.into()];
        for s in sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        crate::run(root, cli, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let scores_path = root.join(RUNS).join("sms-retest.json");
    let mut scores: serde_json::Map<String, serde_json::Value> =
        std::fs::read_to_string(&scores_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    for arm in arms() {
        train("examples/sms_spam.toml", &format!("{RUNS}/{}-sms", arm.name), &arm.sms)?;
        train("examples/trec_coarse.toml", &format!("{RUNS}/{}-trec", arm.name), &arm.trec)?;
        if scores.contains_key(arm.name) {
            continue;
        }
        let sms_head = if arm.model_folder {
            format!("{RUNS}/{}-sms/model/heads/sms_spam", arm.name)
        } else {
            format!("{RUNS}/{}-sms/adapters/sms_spam/heads/sms_spam", arm.name)
        };
        // The SMS head beside the TREC-trained weights (the per-task SMS adapter has it).
        let target = root.join(&arm.after).join("heads/sms_spam");
        if !target.exists() {
            copy_dir(&root.join(&sms_head), &target)?;
        }
        let data = "data/sms_spam/test.jsonl";
        let args: Vec<&str> = if arm.model_folder {
            vec!["eval", &arm.after, "--data", data, "--task", "sms_spam", "--max-length", "64", "--json"]
        } else {
            vec![
                "eval",
                "models/all-MiniLM-L6-v2",
                "--adapter",
                &arm.after,
                "--data",
                data,
                "--task",
                "sms_spam",
                "--max-length",
                "64",
                "--json",
            ]
        };
        let output = std::process::Command::new(cli).args(&args).current_dir(root).output()?;
        anyhow::ensure!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        scores.insert(arm.name.into(), serde_json::from_slice(&output.stdout)?);
        std::fs::write(&scores_path, serde_json::to_string_pretty(&scores)?)?;
    }
    crate::quality::replace_block(root, BEGIN, END, &block(root)?, "\n## Other runs")?;
    eprintln!("wrote the continual-learning section of RESULTS.md");
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

fn summary(root: &Path, run: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(root.join(RUNS).join(run).join("summary.json")).ok()?).ok()
}

/// The section of RESULTS.md, from the runs (or as RESULTS.md has it).
pub fn block(root: &Path) -> Result<String> {
    let mut md = String::new();
    if let Ok(text) = std::fs::read_to_string(root.join(RUNS).join("sms-retest.json")) {
        write(root, &serde_json::from_str(&text)?, &mut md)?;
    }
    crate::quality::marked_block(root, BEGIN, END, &md)
}

fn write(root: &Path, retest: &serde_json::Value, md: &mut String) -> Result<()> {
    writeln!(md, "\n## Continual learning: SMS spam, then TREC coarse (`cargo xtask continual-study`)\n")?;
    writeln!(
        md,
        "all-MiniLM-L6-v2, max length 64; SMS spam with `examples/sms_spam.toml` (2 epochs), then TREC coarse with \
         `examples/trec_coarse.toml` (3 epochs), both keeping the best dev step; adapters r = 24, lr 1e-3. After the TREC run \
         each approach is re-tested on SMS spam's test set (`adapters eval`) with the SMS head it trained: the full \
         fine-tuning arm with the TREC-tuned model, the sequential adapter with its TREC-trained weights; the per-task arm \
         with its SMS adapter, which the TREC run cannot touch. Test accuracy in percent:\n"
    )?;
    writeln!(md, "| approach | SMS after SMS training | SMS after TREC training | change | TREC coarse test |\n|---|---|---|---|---|")?;
    let pct = |v: &serde_json::Value| 100.0 * v.as_f64().unwrap_or(f64::NAN);
    for arm in arms() {
        let (Some(sms), Some(trec)) = (summary(root, &format!("{}-sms", arm.name)), summary(root, &format!("{}-trec", arm.name))) else {
            continue;
        };
        let before = pct(&sms["tasks"]["sms_spam"]["test"]["accuracy"]);
        let after = pct(&retest[arm.name]["accuracy"]);
        writeln!(
            md,
            "| {} | {before:.2} | {after:.2} | {:+.2} | {:.2} |",
            arm.what,
            after - before,
            pct(&trec["tasks"]["trec_coarse"]["test"]["accuracy"])
        )?;
    }
    if let Some(sms) = summary(root, "per_task-sms") {
        let same = (pct(&sms["tasks"]["sms_spam"]["test"]["accuracy"]) - pct(&retest["per_task"]["accuracy"])).abs() < 1e-9;
        writeln!(
            md,
            "\nThe per-task SMS adapter's re-test {} the accuracy it had when trained: the frozen base and the SMS adapter \
             are bit for bit what they were, whatever other tasks train.",
            if same { "reproduces exactly" } else { "does not reproduce" }
        )?;
    }
    Ok(())
}
