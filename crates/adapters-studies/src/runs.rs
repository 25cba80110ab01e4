//! What every study does with the `adapters` binary and its run folders: build it, train
//! (a finished run is kept), evaluate, and read the outputs back through the types the
//! trainer and the CLI write them with ([`adapters_train::records`]).

use adapters_models::saved_heads::HeadConfig;
use adapters_train::records::{ClassificationReport, EvalReport, Split, Summary, SUMMARY_FILE};
use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// all-MiniLM-L6-v2 as `cargo xtask fetch` places it (relative to the repository root).
pub const MINILM: &str = "models/all-MiniLM-L6-v2";
/// The SmolLM2 GGUF file as `cargo xtask fetch` places it.
pub const SMOLLM: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The release `adapters` binary, run in the repository root.
pub struct Cli {
    root: PathBuf,
    bin: PathBuf,
}

impl Cli {
    /// Fetches the models and data (`cargo xtask fetch`) and builds the release binary.
    pub fn prepare(root: &Path) -> Result<Cli> {
        run_in(root, "cargo", &["xtask", "fetch"])?;
        run_in(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
        Ok(Cli { root: root.to_path_buf(), bin: root.join("target/release/adapters") })
    }

    /// The repository root the runs live under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Runs `adapters ARGS`, failing with the command line if it fails.
    pub fn run(&self, args: &[&str]) -> Result<()> {
        run_in(&self.root, self.bin.to_str().context("a UTF-8 path")?, args)
    }

    /// `adapters train CONFIG` into `out` with `--set` overrides, unless `out` holds a
    /// finished run (its `summary.json`): how a study resumes after an interruption.
    pub fn train(&self, config: &str, out: &str, sets: &[String]) -> Result<()> {
        if self.root.join(out).join(SUMMARY_FILE).exists() {
            return Ok(());
        }
        let _ = std::fs::remove_dir_all(self.root.join(out));
        let mut args = vec!["train".to_string(), config.into(), "--set".into(), format!("output.dir=\"{out}\"")];
        for s in sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        self.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `adapters eval` of an adapter folder on a data file with frozen all-MiniLM-L6-v2
    /// at max length 64 (the studies' setting), `extra` arguments added (`--task`,
    /// `--head`, an attack).
    pub fn eval(&self, adapter: &str, data: &str, extra: &[&str]) -> Result<ClassificationReport> {
        let args = [&["eval", MINILM, "--data", data, "--adapter", adapter, "--max-length", "64"][..], extra].concat();
        self.eval_with(&args)
    }

    /// `adapters eval ARGS --json` of a classification head.
    pub fn eval_with(&self, args: &[&str]) -> Result<ClassificationReport> {
        let output = Command::new(&self.bin).args(args).arg("--json").current_dir(&self.root).output()?;
        ensure!(output.status.success(), "adapters {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        match serde_json::from_slice(&output.stdout).with_context(|| format!("the output of adapters {}", args.join(" ")))? {
            EvalReport::Classification(report) => Ok(report),
            EvalReport::Perplexity(_) => bail!("adapters {}: a perplexity, not a classification", args.join(" ")),
        }
    }

    /// Starts `adapters serve ARGS --port 0`; the process and the URL it listens on.
    pub fn serve(&self, args: &[&std::ffi::OsStr]) -> Result<(Child, String)> {
        let mut server = Command::new(&self.bin)
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting adapters serve")?;
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.as_mut().context("server stdout")?).read_line(&mut line)?;
        match line.trim().strip_prefix("listening on ") {
            Some(url) => Ok((server, url.to_string())),
            None => {
                let _ = server.kill();
                bail!("the server did not start: {line:?}")
            }
        }
    }
}

/// Stops a server with SIGTERM (it drains) and waits for it.
pub fn stop(mut server: Child) -> Result<std::process::ExitStatus> {
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status()?;
    Ok(server.wait()?)
}

/// Runs a command in `root`, failing with the command line if it fails.
fn run_in(root: &Path, program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program).args(args).current_dir(root).status()?;
    ensure!(status.success(), "`{program} {}` failed ({status})", args.join(" "));
    Ok(())
}

/// The finished runs of a study folder: every `summary.json` below it, by the run's path
/// relative to the folder (`moe_token`, `rotten_tomatoes/own-s1`). Read once, so that a
/// summary that does not parse is an error naming the file, not a row "not run".
pub struct Runs {
    folder: PathBuf,
    summaries: BTreeMap<String, Summary>,
}

impl Runs {
    /// Reads every summary below `root/folder` (none when the folder is missing).
    pub fn load(root: &Path, folder: &str) -> Result<Runs> {
        let folder = root.join(folder);
        let mut summaries = BTreeMap::new();
        let mut stack = vec![folder.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.file_name().is_some_and(|n| n == SUMMARY_FILE) {
                    let run = path.parent().and_then(|p| p.strip_prefix(&folder).ok()).context("a run below the folder")?;
                    let name = run.to_str().context("a UTF-8 run name")?.to_string();
                    summaries.insert(name, read_json(&path)?.context("listed")?);
                }
            }
        }
        Ok(Runs { folder, summaries })
    }

    /// A finished run's summary.
    pub fn get(&self, run: &str) -> Option<&Summary> {
        self.summaries.get(run)
    }

    /// Every finished run, by name.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Summary)> {
        self.summaries.iter()
    }

    /// A run's folder.
    pub fn dir(&self, run: &str) -> PathBuf {
        self.folder.join(run)
    }

    /// A run's trainable parameters without its heads'.
    pub fn adapter_parameters(&self, run: &str) -> Option<u64> {
        let s = self.get(run)?;
        Some((s.trainable_parameters as u64).saturating_sub(head_parameters(&self.dir(run))))
    }
}

/// A metric of a task in percent (NaN when the run has none): `pct(s, "sms_spam", Split::Test, "accuracy")`.
pub fn pct(s: &Summary, task: &str, split: Split, metric: &str) -> f64 {
    100.0 * s.metric(task, split, metric).unwrap_or(f64::NAN)
}

/// Test accuracy of a task in percent.
pub fn test_accuracy(s: &Summary, task: &str) -> f64 {
    pct(s, task, Split::Test, "accuracy")
}

/// The step a run kept, as the tables print it (`null` when it kept none).
pub fn best_step(s: &Summary) -> String {
    s.best_step.map_or_else(|| "null".into(), |step| step.to_string())
}

/// Parameters of a run's heads (`adapters/*/heads/*`): (hidden + 1) x labels each, for
/// reporting adapter sizes without them.
fn head_parameters(run: &Path) -> u64 {
    let mut total = 0;
    for adapter in std::fs::read_dir(run.join("adapters")).into_iter().flatten().flatten() {
        for head in std::fs::read_dir(adapter.path().join("heads")).into_iter().flatten().flatten() {
            if let Ok(Some(config)) = read_json::<HeadConfig>(&head.path().join("head_config.json")) {
                total += (config.hidden_size as u64 + 1) * config.labels.len() as u64;
            }
        }
    }
    total
}

/// A JSON file as `T`; `None` when the file is missing, an error naming it when it does
/// not parse.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not what this study writes", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `value` as pretty JSON, atomically (a study interrupted mid-write keeps the
/// previous file).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    adapters_core::io::write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
