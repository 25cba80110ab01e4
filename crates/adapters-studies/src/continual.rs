//! `cargo studies continual`: what training on a second task does to the first.
//! SMS spam, then TREC coarse, three ways: full fine-tuning (the SMS-tuned model tuned on
//! TREC), one adapter per task on the frozen base, and one adapter trained on SMS and then
//! on TREC (`init_from`). After the TREC run, each is re-tested on SMS with its SMS head.
//! Writes its section of RESULTS.md. Finished runs are skipped.

use crate::results::{Section, CONTINUAL};
use crate::runs::{read_json, test_accuracy, write_json, Cli, Runs, MINILM};
use adapters_train::records::ClassificationReport;
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const RUNS: &str = "runs/continual-study";
/// The SMS re-test of each arm after its TREC run, by arm.
const RETEST: &str = "sms-retest.json";
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

pub fn run(cli: &Cli) -> Result<()> {
    let root = cli.root();
    let train = |config: &str, out: &str, sets: &[String]| cli.train(config, out, &[&[SHORT.to_string()][..], sets].concat());
    let scores_path = root.join(RUNS).join(RETEST);
    let mut scores: BTreeMap<String, ClassificationReport> = read_json(&scores_path)?.unwrap_or_default();
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
            adapters_core::io::copy_dir(&root.join(&sms_head), &target)?;
        }
        let data = "data/sms_spam/test.jsonl";
        let common = ["--data", data, "--task", "sms_spam", "--max-length", "64"];
        let args: Vec<&str> = if arm.model_folder {
            [&["eval", arm.after.as_str()][..], &common].concat()
        } else {
            [&["eval", MINILM, "--adapter", arm.after.as_str()][..], &common].concat()
        };
        scores.insert(arm.name.into(), cli.eval_with(&args)?);
        write_json(&scores_path, &scores)?;
    }
    Ok(())
}

/// The study's section of RESULTS.md, when its re-tests are here.
pub fn sections(root: &Path) -> Result<Vec<(&'static Section, String)>> {
    let Some(retest) = read_json::<BTreeMap<String, ClassificationReport>>(&root.join(RUNS).join(RETEST))? else { return Ok(vec![]) };
    let mut md = String::new();
    write(&Runs::load(root, RUNS)?, &retest, &mut md)?;
    Ok(vec![(&CONTINUAL, md)])
}

fn write(runs: &Runs, retest: &BTreeMap<String, ClassificationReport>, md: &mut String) -> Result<()> {
    writeln!(md, "\n## Continual learning: SMS spam, then TREC coarse (`cargo studies continual`)\n")?;
    writeln!(
        md,
        "all-MiniLM-L6-v2, max length 64; SMS spam with `examples/sms_spam.toml` (2 epochs), then TREC coarse with \
         `examples/trec_coarse.toml` (3 epochs), both keeping the best dev step; adapters r = 24, lr 1e-3. After the TREC run \
         each approach is re-tested on SMS spam's test set (`adapters eval`) with the SMS head it trained: the full \
         fine-tuning arm with the TREC-tuned model, the sequential adapter with its TREC-trained weights; the per-task arm \
         with its SMS adapter, which the TREC run cannot touch. Test accuracy in percent:\n"
    )?;
    writeln!(md, "| approach | SMS after SMS training | SMS after TREC training | change | TREC coarse test |\n|---|---|---|---|---|")?;
    let retested = |arm: &str| retest.get(arm).map_or(f64::NAN, |r| 100.0 * r.accuracy);
    for arm in arms() {
        let (Some(sms), Some(trec)) = (runs.get(&format!("{}-sms", arm.name)), runs.get(&format!("{}-trec", arm.name))) else {
            continue;
        };
        let before = test_accuracy(sms, "sms_spam");
        let after = retested(arm.name);
        writeln!(md, "| {} | {before:.2} | {after:.2} | {:+.2} | {:.2} |", arm.what, after - before, test_accuracy(trec, "trec_coarse"))?;
    }
    if let Some(sms) = runs.get("per_task-sms") {
        let same = (test_accuracy(sms, "sms_spam") - retested("per_task")).abs() < 1e-9;
        writeln!(
            md,
            "\nThe per-task SMS adapter's re-test {} the accuracy it had when trained: the frozen base and the SMS adapter \
             are bit for bit what they were, whatever other tasks train.",
            if same { "reproduces exactly" } else { "does not reproduce" }
        )?;
    }
    Ok(())
}
