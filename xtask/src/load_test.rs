//! `cargo xtask load-test`: the serving load test behind BENCHMARKS.md. Makes 50 adapters
//! for SmolLM2-135M-Instruct in a fresh local library (25 Pfeiffer, 25 LoRA r=8 on query
//! and value; seeded weights from `adapters new`), starts `adapters serve` with room for 10
//! of them, and runs 64 concurrent clients for 60 s. Each client sends one request after
//! another, half embeddings of 1-4 texts and half greedy generations of 8-16 tokens, each
//! for an adapter drawn uniformly from the 50 (client timeout 30 s). The same load runs
//! with batching on and with it off (`--batch-rows 0`); the figures go to
//! bench/results/load_test.json and BENCHMARKS.md.

use crate::{fetch, run};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The load's shape.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub clients: usize,
    pub seconds: u64,
    pub adapters: usize,
    pub cache: usize,
}

const TEXTS: [&str; 8] = [
    "where are you going tonight?",
    "the results are in, and they look good",
    "I never said that to anyone.",
    "What is the capital city of Australia?",
    "she lived on the plume. you never know.",
    "a quiet evening by the sea",
    "Who wrote the novel Pride and Prejudice?",
    "get in the car, we're late",
];

/// One finished request.
struct Outcome {
    generation: bool,
    ok: bool,
    seconds: f64,
    /// Generated tokens (generations) or texts embedded (embeddings).
    units: usize,
}

pub fn run_load_test(root: &Path, load: Load) -> Result<()> {
    let models = fetch::fetch_all(root)?;
    run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
    let cli = root.join("target/release/adapters");
    let cli = cli.to_str().context("a UTF-8 path")?;
    let smol = models.join(fetch::SMOLLM_GGUF);
    let smol = smol.to_str().context("a UTF-8 path")?;
    let work = root.join("runs/load-test");
    let _ = std::fs::remove_dir_all(&work);
    let store = work.join("store");
    let store = store.to_str().context("a UTF-8 path")?;
    let bar = indicatif::ProgressBar::new(load.adapters as u64).with_message("making and pushing adapters");
    for i in 0..load.adapters {
        let dir = work.join(format!("adapters/a{i}"));
        let dir = dir.to_str().context("a UTF-8 path")?;
        let (kind, sets): (&str, &[&str]) = if i % 2 == 0 { ("seq_bn", &[]) } else { ("lora", &["r=8"]) };
        let mut args = vec!["new", kind, "--model", smol, "--out", dir, "--seed"];
        let seed = i.to_string();
        args.push(&seed);
        for s in sets {
            args.extend(["--set", s]);
        }
        quiet(cli, &args)?;
        quiet(cli, &["push", dir, "--name", &format!("a{i}"), "--store", store])?;
        bar.inc(1);
    }
    bar.finish();
    let mut results = Vec::new();
    for (label, batch_rows) in [("batching on", "32"), ("batching off", "0")] {
        eprintln!("load-test: {label}: {} clients for {} s", load.clients, load.seconds);
        let cache = work.join(format!("cache-{batch_rows}"));
        let max_adapters = load.cache.to_string();
        let args: [&std::ffi::OsStr; 9] = [
            smol.as_ref(),
            "--store".as_ref(),
            store.as_ref(),
            "--batch-rows".as_ref(),
            batch_rows.as_ref(),
            "--max-adapters".as_ref(),
            max_adapters.as_ref(),
            "--cache-dir".as_ref(),
            cache.as_os_str(),
        ];
        let (server, url) = crate::serve_demo::start(Path::new(cli), &args)?;
        let outcomes = drive(&url, load);
        let metrics = reqwest::blocking::get(format!("{url}/metrics")).and_then(|r| r.text()).unwrap_or_default();
        crate::serve_demo::stop(server)?;
        results.push(summarise(label, &outcomes, load.seconds as f64, &metrics));
        eprintln!("load-test: {label}: {}", results.last().expect("pushed"));
    }
    let value = json!({
        "title": "Serving load test: SmolLM2-135M-Instruct, embeddings and short generations over many adapters",
        "clients": load.clients, "seconds": load.seconds, "adapters": load.adapters, "cache": load.cache,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "runs": results,
    });
    let out = root.join(crate::bench::RESULTS);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("load_test.json"), serde_json::to_string_pretty(&value)?)?;
    crate::bench::run(root, None, true)
}

/// Runs a CLI command, showing its output only if it fails.
fn quiet(cli: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cli).args(args).output().with_context(|| format!("running adapters {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("adapters {} failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `clients` threads send requests back to back until the time is up.
fn drive(url: &str, load: Load) -> Vec<Outcome> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().expect("an HTTP client");
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let end = Instant::now() + Duration::from_secs(load.seconds);
    let threads: Vec<_> = (0..load.clients)
        .map(|c| {
            let (client, outcomes, url) = (client.clone(), outcomes.clone(), url.to_string());
            std::thread::spawn(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c as u64);
                while Instant::now() < end {
                    let outcome = one_request(&client, &url, &mut rng, load.adapters);
                    outcomes.lock().expect("not poisoned").push(outcome);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Arc::try_unwrap(outcomes).map(|m| m.into_inner().expect("not poisoned")).unwrap_or_default()
}

fn one_request(client: &reqwest::blocking::Client, url: &str, rng: &mut impl Rng, adapters: usize) -> Outcome {
    let model = format!("a{}", rng.random_range(0..adapters));
    let generation = rng.random_bool(0.5);
    let body = if generation {
        let prompt = TEXTS[rng.random_range(0..TEXTS.len())];
        json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": rng.random_range(8..=16), "temperature": 0})
    } else {
        let n = rng.random_range(1..=4);
        json!({"model": model, "input": (0..n).map(|_| TEXTS[rng.random_range(0..TEXTS.len())]).collect::<Vec<_>>()})
    };
    let path = if generation { "/v1/chat/completions" } else { "/v1/embeddings" };
    let started = Instant::now();
    let answer = client.post(format!("{url}{path}")).json(&body).send().and_then(|r| r.error_for_status()).and_then(|r| r.json::<Value>());
    let seconds = started.elapsed().as_secs_f64();
    match answer {
        Ok(v) => {
            let units = if generation { v["usage"]["completion_tokens"].as_u64() } else { v["data"].as_array().map(|d| d.len() as u64) };
            Outcome { generation, ok: true, seconds, units: units.unwrap_or(0) as usize }
        }
        Err(e) => {
            eprintln!("load-test: {path} for {model} failed: {e}");
            Outcome { generation, ok: false, seconds, units: 0 }
        }
    }
}

/// The `p` quantile of `v` (nearest rank); NaN when empty.
/// The median (the mean of the middle two of an even count; NaN for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n => (v[(n - 1) / 2] + v[n / 2]) / 2.0,
    }
}

/// A field of a process's /proc status (`VmRSS`, `VmHWM`), in MiB; NaN if unreadable.
pub(crate) fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
        / 1024.0
}

pub(crate) fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Counts, rates and latency percentiles of one run, and the server's own batch sizes.
fn summarise(label: &str, outcomes: &[Outcome], seconds: f64, metrics: &str) -> Value {
    let latency = |generation: bool| -> Value {
        let s: Vec<f64> = outcomes.iter().filter(|o| o.ok && o.generation == generation).map(|o| o.seconds).collect();
        json!({"requests": s.len(), "p50_s": percentile(s.clone(), 0.5), "p99_s": percentile(s, 0.99)})
    };
    let all: Vec<f64> = outcomes.iter().filter(|o| o.ok).map(|o| o.seconds).collect();
    let units = |generation: bool| outcomes.iter().filter(|o| o.ok && o.generation == generation).map(|o| o.units).sum::<usize>() as f64;
    // Summed over label sets.
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    json!({
        "label": label,
        "requests": outcomes.len(),
        "failed": outcomes.iter().filter(|o| !o.ok).count(),
        "requests_per_s": all.len() as f64 / seconds,
        "p50_s": percentile(all.clone(), 0.5),
        "p99_s": percentile(all, 0.99),
        "generations": latency(true),
        "embeddings": latency(false),
        "generated_tokens_per_s": units(true) / seconds,
        "embedded_texts_per_s": units(false) / seconds,
        "mean_rows_per_forward": metric("adapters_batch_rows_sum") / metric("adapters_batch_rows_count").max(1.0),
        "cache_misses": metric("adapters_cache_misses_total"),
    })
}

/// The BENCHMARKS.md section for `load_test.json`.
pub fn report(md: &mut String, v: &Value) -> Result<()> {
    use std::fmt::Write as _;
    writeln!(md, "\n## {}\n", v["title"].as_str().unwrap_or("Serving load test"))?;
    writeln!(
        md,
        "`cargo xtask load-test`: {} concurrent clients for {} s against `adapters serve` ({} cores, server and clients on the same machine), {} adapters (half Pfeiffer, half LoRA r=8 on q,v) with room for {} resident; each request picks an adapter uniformly, half are embeddings of 1-4 texts, half greedy chat generations of 8-16 tokens; client timeout 30 s. Latencies are per request, from send to full answer.\n",
        v["clients"], v["seconds"], v["threads"], v["adapters"], v["cache"]
    )?;
    writeln!(md, "| run | requests | failed | requests/s | p50 | p99 | generation p50 / p99 | embedding p50 / p99 | generated tokens/s | texts embedded/s | rows per forward |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    let f = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
    for r in v["runs"].as_array().into_iter().flatten() {
        writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.2} s | {:.2} s | {:.2} / {:.2} s | {:.2} / {:.2} s | {:.1} | {:.1} | {:.2} |",
            r["label"].as_str().unwrap_or(""),
            r["requests"],
            r["failed"],
            f(&r["requests_per_s"]),
            f(&r["p50_s"]),
            f(&r["p99_s"]),
            f(&r["generations"]["p50_s"]),
            f(&r["generations"]["p99_s"]),
            f(&r["embeddings"]["p50_s"]),
            f(&r["embeddings"]["p99_s"]),
            f(&r["generated_tokens_per_s"]),
            f(&r["embedded_texts_per_s"]),
            f(&r["mean_rows_per_forward"]),
        )?;
    }
    Ok(())
}
