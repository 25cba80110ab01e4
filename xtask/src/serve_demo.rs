//! `cargo xtask serve-demo`: pushes two trained adapters (from fixtures/fusion-sources)
//! into a fresh local adapter library, starts `adapters serve` over frozen MiniLM, asks
//! each adapter to classify the same texts over HTTP, shows their metrics, and stops the
//! server with SIGTERM.

use crate::{fetch, run};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const TEXTS: [&str; 3] = [
    "URGENT! You have won a 1 week FREE membership in our prize draw. Text WIN to 80086 now",
    "What is the capital city of Australia?",
    "Who wrote the novel Pride and Prejudice?",
];

pub fn run_demo(root: &Path) -> Result<()> {
    let models = fetch::fetch_all(root)?;
    run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
    let cli = root.join("target/release/adapters");
    let work = root.join("runs/serve-demo");
    let _ = std::fs::remove_dir_all(&work);
    let store = work.join("store");
    let store = store.to_str().context("a UTF-8 path")?;
    for (name, folder) in [("sms-spam", "sms_spam"), ("trec-coarse", "trec_coarse")] {
        let dir = root.join("fixtures/fusion-sources").join(folder);
        run(
            root,
            cli.to_str().context("a UTF-8 path")?,
            &["push", dir.to_str().context("a UTF-8 path")?, "--name", name, "--tag", "prod", "--store", store],
        )?;
    }
    let minilm = models.join(fetch::MINILM_DIR);
    let cache = work.join("cache");
    let (server, url) = start(&cli, &[minilm.as_os_str(), "--store".as_ref(), store.as_ref(), "--cache-dir".as_ref(), cache.as_os_str()])?;
    let result = query(&url);
    let status = stop(server)?;
    result?;
    println!("server stopped ({status})");
    Ok(())
}

/// Starts `adapters serve ARGS --port 0`; the process and the URL it listens on.
pub fn start(cli: &Path, args: &[&std::ffi::OsStr]) -> Result<(Child, String)> {
    let mut serve = Command::new(cli);
    serve.arg("serve").args(args).args(["--port", "0"]);
    spawn(&mut serve)
}

/// Starts a program that prints `listening on URL` first (a server, the S3 server); the
/// process and the URL, for 127.0.0.1.
pub fn spawn(command: &mut Command) -> Result<(Child, String)> {
    let mut child = command.stdout(Stdio::piped()).spawn().with_context(|| format!("starting {command:?}"))?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    match line.trim().strip_prefix("listening on ") {
        Some(url) => Ok((child, url.replace("0.0.0.0", "127.0.0.1"))),
        None => {
            let _ = child.kill();
            bail!("{command:?} did not start: {line:?}")
        }
    }
}

/// Stops a server with SIGTERM (it drains) and waits for it.
pub fn stop(mut server: Child) -> Result<std::process::ExitStatus> {
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status()?;
    Ok(server.wait()?)
}

fn query(url: &str) -> Result<()> {
    let client = reqwest::blocking::Client::new();
    for adapter in ["sms-spam@prod", "trec-coarse@prod"] {
        let answer: Value = client
            .post(format!("{url}/v1/classify"))
            .json(&json!({"model": adapter, "input": TEXTS}))
            .send()?
            .error_for_status()?
            .json()?;
        println!("\n{adapter} (served as {}, task {}):", answer["model"].as_str().unwrap_or("?"), answer["task"].as_str().unwrap_or("?"));
        for (text, row) in TEXTS.iter().zip(answer["data"].as_array().into_iter().flatten()) {
            let label = row["label"].as_str().unwrap_or("?");
            println!("  {label:<8} {:.3}  {text}", row["scores"][label].as_f64().unwrap_or(f64::NAN));
        }
    }
    let metrics = client.get(format!("{url}/metrics")).send()?.text()?;
    println!("\nper-adapter metrics ({url}/metrics):");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("adapters_requests_total") || l.starts_with("adapters_cache_") || l.starts_with("adapters_resident"))
    {
        println!("  {line}");
    }
    Ok(())
}
