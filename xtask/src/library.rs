//! `cargo xtask bench --library`: `adapters serve` over a library of 1,000 adapters for
//! MiniLM with room for 200 resident, against the same load over 10. Written to
//! bench/results/library.json and BENCHMARKS.md.
//!
//! - The library: 1,000 names in a local store, in four configurations (Pfeiffer with
//!   reduction factor 16 and 32, LoRA r=8 and r=16 on query and value), made by `adapters
//!   new` from 100 seeds (adapter `lib{i}` holds the weights of seed `i mod 100`; each name
//!   is fetched, loaded and kept resident on its own, so the server sees 1,000 adapters).
//! - Cache-miss loads: one client asks for 200 adapters never loaded, one after another, from
//!   the local store and from S3 (the s3s-fs server of the store crate's `s3_server`
//!   example); the server's own `loaded … seconds=` log lines give fetch-and-attach times.
//! - Memory: the server's resident set before and after those 200 loads, per adapter,
//!   beside the adapter files' bytes.
//! - Throughput: 64 clients send one text a request (the serving bench's mixed-length
//!   texts), the adapter drawn from a Zipf law (s = 1) over all 1,000, or over 10; the two
//!   loads alternate on one server, each after its own warm-up, for `--rounds`.

use crate::load_test::{median, percentile, status_mib};
use crate::serving::quiet;
use crate::{fetch, run};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Adapters in the library.
const LIBRARY: usize = 1000;
/// Distinct seeds (weights) among them.
const SEEDS: usize = 100;
/// Adapters the server keeps resident.
const RESIDENT: usize = 200;
/// The small library the big one is compared with.
const SMALL: usize = 10;
/// Clients of the throughput loads.
const CLIENTS: usize = 64;
/// Zipf exponent of the adapter popularity.
const ZIPF_S: f64 = 1.0;
/// Seconds each load runs before it is measured.
const WARMUP_S: f64 = 5.0;

/// The four configurations: kind and `--set` fields.
const CONFIGS: [(&str, &[&str]); 4] = [
    ("seq_bn", &["reduction_factor=16"]),
    ("seq_bn", &["reduction_factor=32"]),
    ("lora", &["r=8", "alpha=16"]),
    ("lora", &["r=16", "alpha=32"]),
];

pub fn run_library(root: &Path, rounds: usize, seconds: u64) -> Result<()> {
    let models = fetch::fetch_all(root)?;
    run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli", "-p", "adapters-store", "--example", "s3_server"])?;
    let cli = root.join("target/release/adapters");
    let minilm = models.join(fetch::MINILM_DIR);
    let work = root.join("runs/library");
    let _ = std::fs::remove_dir_all(&work);
    let store = work.join("store");
    let folders = make_library(&cli, &minilm, &work, &store)?;
    let adapter_bytes: Vec<f64> = folders.iter().map(|f| folder_bytes(f)).collect::<Result<_>>()?;
    let texts = crate::serving::embedding_texts(root)?;

    // Local store: cold loads, memory, then the throughput loads on the same server.
    let log = work.join("serve-local.log");
    let mut server = Server::start(&cli, &minilm, &store, &work.join("cache-local"), &log, &[])?;
    let outcome = (|| -> Result<Value> {
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build()?;
        embed(&client, &server.url, "base", "warm up")?;
        let rss_before = status_mib(server.child.id(), "VmRSS");
        let local_loads = cold_loads(&client, &server, 0..RESIDENT)?;
        let rss_after = status_mib(server.child.id(), "VmRSS");
        let resident_bytes = metric_sum(&client, &server.url, "adapters_resident_adapter_bytes")?;
        eprintln!(
            "library bench: {RESIDENT} cold loads from the local store: p50 {:.1} ms, p99 {:.1} ms; {:.2} MiB resident per adapter",
            percentile(local_loads.clone(), 0.5) * 1e3,
            percentile(local_loads.clone(), 0.99) * 1e3,
            (rss_after - rss_before) / RESIDENT as f64
        );
        eprintln!("library bench: filling the cache with the Zipf load over {LIBRARY}");
        load(&server.url, &texts, LIBRARY, 20.0, 0.0)?;
        let mut rows = Vec::new();
        for round in 0..rounds {
            eprintln!("library bench: round {} of {rounds}", round + 1);
            // Alternate which load goes first.
            let order = if round % 2 == 0 { [SMALL, LIBRARY] } else { [LIBRARY, SMALL] };
            for adapters in order {
                let misses = metric_sum(&client, &server.url, "adapters_cache_misses_total")?;
                let from = server.log_len();
                let mut r = load(&server.url, &texts, adapters, WARMUP_S, seconds as f64)?;
                let misses = metric_sum(&client, &server.url, "adapters_cache_misses_total")? - misses;
                let loads = server.load_seconds(from)?;
                r["round"] = json!(round);
                r["misses"] = json!(misses);
                r["load_p50_s"] = json!(percentile(loads.clone(), 0.5));
                r["load_p99_s"] = json!(percentile(loads, 0.99));
                eprintln!("  {adapters} adapters: {:.1} texts/s, {misses} cache misses", r["texts_per_s"].as_f64().unwrap_or(f64::NAN));
                rows.push(r);
            }
        }
        Ok(json!({
            "local_loads": {"count": local_loads.len(), "p50_s": percentile(local_loads.clone(), 0.5), "p99_s": percentile(local_loads, 0.99)},
            "rss_before_mib": rss_before, "rss_after_mib": rss_after, "resident_adapter_bytes": resident_bytes,
            "rows": rows,
        }))
    })();
    server.stop()?;
    let mut value = outcome?;

    let s3 = s3_loads(root, &cli, &minilm, &work, &folders)?;
    eprintln!(
        "library bench: {RESIDENT} cold loads from S3: p50 {:.1} ms, p99 {:.1} ms",
        percentile(s3.clone(), 0.5) * 1e3,
        percentile(s3.clone(), 0.99) * 1e3
    );
    value["s3_loads"] = json!({"count": s3.len(), "p50_s": percentile(s3.clone(), 0.5), "p99_s": percentile(s3, 0.99)});
    value["title"] = json!("A library of 1,000 adapters");
    value["threads"] = json!(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    value["library"] = json!(LIBRARY);
    value["seeds"] = json!(SEEDS);
    value["resident"] = json!(RESIDENT);
    value["small"] = json!(SMALL);
    value["clients"] = json!(CLIENTS);
    value["zipf_s"] = json!(ZIPF_S);
    value["rounds"] = json!(rounds);
    value["seconds"] = json!(seconds);
    value["warmup_s"] = json!(WARMUP_S);
    value["texts"] = json!(texts.len());
    value["adapter_file_bytes_mean"] = json!(adapter_bytes.iter().sum::<f64>() / adapter_bytes.len() as f64);
    let out = root.join(crate::bench::RESULTS);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("library.json"), serde_json::to_string_pretty(&value)?)?;
    crate::bench::run(root, None, true)
}

/// Makes the [`SEEDS`] distinct adapters and pushes [`LIBRARY`] names to `store`; the
/// distinct folders.
fn make_library(cli: &Path, minilm: &Path, work: &Path, store: &Path) -> Result<Vec<PathBuf>> {
    let bar = indicatif::ProgressBar::new((SEEDS + LIBRARY) as u64).with_message("making and pushing 1,000 adapters");
    let mut folders = Vec::new();
    for seed in 0..SEEDS {
        let (kind, sets) = CONFIGS[seed % CONFIGS.len()];
        let dir = work.join("adapters").join(format!("seed{seed}"));
        let mut new = Command::new(cli);
        new.args(["new", kind, "--model"]).arg(minilm).arg("--out").arg(&dir).args(["--seed", &seed.to_string()]);
        for s in sets {
            new.args(["--set", s]);
        }
        quiet(new)?;
        folders.push(dir);
        bar.inc(1);
    }
    for i in 0..LIBRARY {
        let mut push = Command::new(cli);
        push.arg("push").arg(&folders[i % SEEDS]).args(["--name", &format!("lib{i}"), "--store"]).arg(store);
        quiet(push)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(folders)
}

/// Cold loads from an S3 store: the first [`RESIDENT`] adapters pushed there, asked for one
/// after another; the server's load times.
fn s3_loads(root: &Path, cli: &Path, minilm: &Path, work: &Path, folders: &[PathBuf]) -> Result<Vec<f64>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut s3 = Command::new(root.join("target/release/examples/s3_server"));
    s3.arg(work.join("s3")).arg(port.to_string()).stderr(Stdio::null());
    let (mut s3, endpoint) = crate::serve_demo::spawn(&mut s3)?;
    let result = (|| -> Result<Vec<f64>> {
        let env = [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test-key"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret"),
            ("AWS_REGION", "us-east-1"),
        ];
        let store = "s3://adapters/library";
        for i in 0..RESIDENT {
            let mut push = Command::new(cli);
            push.envs(env).arg("push").arg(&folders[i % SEEDS]).args(["--name", &format!("lib{i}"), "--store", store]);
            quiet(push)?;
        }
        let log = work.join("serve-s3.log");
        let mut server = Server::start(cli, minilm, Path::new(store), &work.join("cache-s3"), &log, &env)?;
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build()?;
        let loads = embed(&client, &server.url, "base", "warm up").and_then(|_| cold_loads(&client, &server, 0..RESIDENT));
        server.stop()?;
        loads
    })();
    let _ = s3.kill();
    let _ = s3.wait();
    result
}

/// `adapters serve` over MiniLM with room for [`RESIDENT`] adapters, its log in a file.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Server {
    fn start(cli: &Path, minilm: &Path, store: &Path, cache: &Path, log: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let mut serve = Command::new(cli);
        serve
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .arg("serve")
            .arg(minilm)
            .arg("--store")
            .arg(store)
            .args(["--max-adapters", &RESIDENT.to_string(), "--port", "0"])
            .arg("--cache-dir")
            .arg(cache)
            .stderr(std::fs::File::create(log)?);
        let (child, url) = crate::serve_demo::spawn(&mut serve)?;
        Ok(Server { child, url, log: log.to_path_buf() })
    }

    /// Bytes of log written so far.
    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// The load times the server logged after byte `from` of its log.
    fn load_seconds(&self, from: u64) -> Result<Vec<f64>> {
        let log = std::fs::read(&self.log)?;
        let text = String::from_utf8_lossy(&log[(from as usize).min(log.len())..]).into_owned();
        Ok(text
            .lines()
            .filter(|l| l.contains(": loaded"))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("seconds="))?.parse().ok())
            .collect())
    }

    fn stop(&mut self) -> Result<()> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        self.child.wait()?;
        Ok(())
    }
}

/// Asks for each of `names` (never loaded) once, one after another; the server's load times.
fn cold_loads(client: &reqwest::blocking::Client, server: &Server, names: std::ops::Range<usize>) -> Result<Vec<f64>> {
    let from = server.log_len();
    let count = names.len();
    for i in names {
        embed(client, &server.url, &format!("lib{i}"), "a cold adapter")?;
    }
    // The log line follows the answer closely; give it a moment to reach the file.
    std::thread::sleep(Duration::from_millis(200));
    let loads = server.load_seconds(from)?;
    if loads.len() != count {
        bail!("{count} cold requests, but the server logged {} loads ({})", loads.len(), server.log.display());
    }
    Ok(loads)
}

fn embed(client: &reqwest::blocking::Client, url: &str, model: &str, text: &str) -> Result<()> {
    client
        .post(format!("{url}/v1/embeddings"))
        .json(&json!({"model": model, "input": text}))
        .send()?
        .error_for_status()
        .with_context(|| format!("embedding through {model}"))?;
    Ok(())
}

/// [`CLIENTS`] clients sending one text a request through an adapter drawn from a Zipf law
/// over the first `adapters` names, for `warmup + seconds`; texts per second and latency
/// of the last `seconds`.
fn load(url: &str, texts: &[String], adapters: usize, warmup: f64, seconds: f64) -> Result<Value> {
    let zipf = Zipf::new(adapters, ZIPF_S);
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let done: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let failed = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let end = warmup + seconds;
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            let (client, done, failed, zipf) = (client.clone(), done.clone(), failed.clone(), &zipf);
            s.spawn(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c as u64);
                let mut i = c;
                while start.elapsed().as_secs_f64() < end {
                    let sent = start.elapsed().as_secs_f64();
                    let model = format!("lib{}", zipf.sample(&mut rng));
                    if let Err(e) = embed(&client, url, &model, &texts[i % texts.len()]) {
                        eprintln!("library bench: a request failed: {e:#}");
                        failed.store(true, Ordering::Relaxed);
                    }
                    done.lock().expect("not poisoned").push((sent, start.elapsed().as_secs_f64()));
                    i += CLIENTS;
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        bail!("requests failed under the load over {adapters} adapters");
    }
    let done = done.lock().expect("not poisoned");
    let measured: Vec<&(f64, f64)> = done.iter().filter(|(_, at)| (warmup..end).contains(at)).collect();
    let latency: Vec<f64> = measured.iter().map(|(sent, at)| at - sent).collect();
    Ok(json!({
        "adapters": adapters,
        "texts_per_s": measured.len() as f64 / seconds.max(1e-9),
        "p50_s": percentile(latency.clone(), 0.5),
        "p99_s": percentile(latency, 0.99),
    }))
}

/// A Zipf law over ranks `0..n`: rank `k` with weight `1 / (k + 1)^s`.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|k| {
                total += 1.0 / ((k + 1) as f64).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u = rng.random::<f64>() * self.cumulative.last().copied().unwrap_or(0.0);
        self.cumulative.partition_point(|&c| c < u).min(self.cumulative.len() - 1)
    }
}

/// The sum of a metric's series in the server's /metrics.
fn metric_sum(client: &reqwest::blocking::Client, url: &str, name: &str) -> Result<f64> {
    let text = client.get(format!("{url}/metrics")).send()?.text()?;
    Ok(text
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn folder_bytes(dir: &Path) -> Result<f64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total as f64)
}

/// The BENCHMARKS.md section for `library.json`: medians over the rounds.
pub fn report(md: &mut String, v: &Value) -> Result<()> {
    use std::fmt::Write as _;
    let rows = v["rows"].as_array().context("rows")?;
    let load_median = |adapters: u64, key: &str| -> f64 {
        let values: Vec<f64> = rows.iter().filter(|r| r["adapters"] == adapters).filter_map(|r| r[key].as_f64()).collect();
        median(values)
    };
    // Each round's big load over its small load, then the median.
    let ratios: Vec<f64> = (0..v["rounds"].as_u64().unwrap_or(0))
        .filter_map(|round| {
            let of = |n: &Value| rows.iter().find(|r| r["round"] == round && r["adapters"] == *n)?["texts_per_s"].as_f64();
            Some(of(&v["library"])? / of(&v["small"])?)
        })
        .collect();
    let (library, small) = (v["library"].as_u64().unwrap_or(0), v["small"].as_u64().unwrap_or(0));
    let resident = v["resident"].as_f64().unwrap_or(f64::NAN);
    writeln!(md, "\n## {}\n", v["title"].as_str().unwrap_or("A library of adapters"))?;
    writeln!(
        md,
        "`cargo xtask bench --library`: `adapters serve` over all-MiniLM-L6-v2 with room for {} resident adapters ({} threads, server and clients together). The library holds {library} adapters in four configurations (Pfeiffer reduction 16 and 32, LoRA r=8 and r=16), from {} seeds. {} clients send one text a request (mixed lengths), the adapter drawn from a Zipf law (s = {}) over all {library}, or over {small}; the loads alternate on one server, {} rounds of {} s after {} s of warm-up each; medians.\n",
        v["resident"], v["threads"], v["seeds"], v["clients"], v["zipf_s"], v["rounds"], v["seconds"], v["warmup_s"]
    )?;
    writeln!(md, "| load | texts/s | latency p50 / p99 | cache misses per round | load time under load p50 / p99 |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    for n in [small, library] {
        writeln!(
            md,
            "| Zipf over {n} | {:.1} | {:.2} / {:.2} s | {:.0} | {} |",
            load_median(n, "texts_per_s"),
            load_median(n, "p50_s"),
            load_median(n, "p99_s"),
            load_median(n, "misses"),
            if n == small {
                "–".to_string()
            } else {
                format!("{:.1} / {:.1} ms", load_median(n, "load_p50_s") * 1e3, load_median(n, "load_p99_s") * 1e3)
            }
        )?;
    }
    writeln!(
        md,
        "\nThroughput over {library} adapters / over {small}: **{:.2}** (rounds: {}).\n",
        median(ratios.clone()),
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
    )?;
    let ms = |o: &Value, k: &str| o[k].as_f64().unwrap_or(f64::NAN) * 1e3;
    writeln!(md, "| cache miss, one client, {} adapters never loaded | load p50 | load p99 |", v["local_loads"]["count"])?;
    writeln!(md, "|---|---|---|")?;
    writeln!(md, "| local store | {:.1} ms | {:.1} ms |", ms(&v["local_loads"], "p50_s"), ms(&v["local_loads"], "p99_s"))?;
    writeln!(md, "| S3 (s3s-fs on this machine) | {:.1} ms | {:.1} ms |", ms(&v["s3_loads"], "p50_s"), ms(&v["s3_loads"], "p99_s"))?;
    let rss = v["rss_after_mib"].as_f64().unwrap_or(f64::NAN) - v["rss_before_mib"].as_f64().unwrap_or(f64::NAN);
    writeln!(
        md,
        "\nMemory: the server's resident set grew {rss:.1} MiB over those {resident} loads, **{:.2} MiB per resident adapter**; the adapter files average {:.0} KiB ({:.0} KiB of resident adapter bytes each, as the server counts them).",
        rss / resident,
        v["adapter_file_bytes_mean"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        v["resident_adapter_bytes"].as_f64().unwrap_or(f64::NAN) / resident / 1024.0
    )?;
    Ok(())
}
