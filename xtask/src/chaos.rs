//! `cargo xtask chaos`: the serving drills behind RELIABILITY.md, with real parts only.
//!
//! 1. Overload: `adapters serve` on SmolLM2 with the admission bounds of the README, 256
//!    clients sending long texts to embed and long generations for 60 s with a 10 s client
//!    time-out, a prober on `/health` every 50 ms, and the server's resident memory sampled.
//!    Every answer must be a 200 or a 503 (none a client time-out).
//! 2. Failures: two replicas over MiniLM on one S3 store (s3s-fs, the store crate's
//!    `s3_server` example) behind HAProxy health-checking `/ready`, under 48 clients for
//!    60 s. At 10 s one replica is killed (SIGKILL) and restarted at 15 s; at 25 s a stored
//!    version no replica has loaded is corrupted; from 35 s to 45 s the S3 server is down.
//!    Every request must end in a status the client saw (none a time-out); adapters loaded
//!    before the outage keep being served through it.
//!
//! HAProxy comes from Debian's packages (installed here with apt-get when missing and
//! running as root). About 4 minutes.

use crate::load_test::percentile;
use crate::{fetch, run};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The overload drill's server flags: the bounds README states for a 2-core machine.
const OVERLOAD_FLAGS: [&str; 12] = [
    "--request-timeout",
    "8",
    "--max-concurrent-requests",
    "32",
    "--max-waiting-tokens",
    "2048",
    "--max-kv-tokens",
    "512",
    "--batch-rows",
    "16",
    "--drain-seconds",
    "0",
];
/// The resident memory the overload drill must stay under (README states it).
const RSS_BOUND_MIB: f64 = 2048.0;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One finished request.
#[derive(Clone)]
struct Outcome {
    /// Seconds after the drill started that it was sent.
    sent_at: f64,
    /// What it asked for (`embed`, `generate`, `classify`, the adapter class).
    kind: &'static str,
    /// The HTTP status, or `None` when the client saw none (time-out, connection error).
    status: Option<u16>,
    seconds: f64,
}

/// Runs the drills (`only`: `overload` or `failures`) and rewrites RELIABILITY.md.
pub fn run_chaos(root: &Path, only: Option<&str>) -> Result<()> {
    let models = fetch::fetch_all(root)?;
    run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli"])?;
    run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-store", "--example", "s3_server"])?;
    let haproxy = haproxy()?;
    let cli = root.join("target/release/adapters");
    let work = root.join("runs/chaos");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let skipped =
        |name: &str| Drill { rows: Vec::new(), notes: vec![format!("not run this time (`--only {name}` skips it)")], verdicts: Vec::new() };
    let overload = match only {
        Some("failures") => skipped("failures"),
        _ => overload(&cli, &models.join(fetch::SMOLLM_GGUF), &work)?,
    };
    let failures = match only {
        Some("overload") => skipped("overload"),
        _ => failures(root, &cli, &haproxy, &models.join("all-MiniLM-L6-v2"), &work)?,
    };
    let md = report(&overload, &failures);
    let path = root.join("RELIABILITY.md");
    let tmp = root.join("RELIABILITY.md.tmp");
    std::fs::write(&tmp, md)?;
    std::fs::rename(&tmp, &path)?;
    eprintln!("chaos: wrote {}", path.display());
    let bad: Vec<String> =
        [&overload.verdicts, &failures.verdicts].into_iter().flatten().filter(|(_, ok)| !ok).map(|(v, _)| v.clone()).collect();
    if !bad.is_empty() {
        bail!("chaos: {} check(s) failed:\n  {}", bad.len(), bad.join("\n  "));
    }
    Ok(())
}

/// The HAProxy binary, installed from Debian's packages when missing (as root).
fn haproxy() -> Result<PathBuf> {
    let found = || Command::new("sh").args(["-c", "command -v haproxy"]).output().ok().filter(|o| o.status.success());
    if found().is_none() {
        eprintln!("chaos: installing haproxy from Debian's packages");
        let ok = Command::new("sh")
            .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("chaos needs HAProxy: install it (`apt-get install haproxy` as root) and run again");
        }
    }
    let out = found().context("haproxy is still not on PATH")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A free port on 127.0.0.1 (bound, then released for the process that will use it).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a program that prints `listening on URL` first, its log discarded; returns it
/// and the URL.
fn start(mut command: Command) -> Result<(Child, String)> {
    crate::serve_demo::spawn(command.stderr(Stdio::null()))
}

fn kill(child: &mut Child, signal: &str) {
    let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
    let _ = child.wait();
}

/// `clients` threads send requests made by `request` back to back until `seconds` pass.
fn drive(
    clients: usize,
    seconds: f64,
    started: Instant,
    request: impl Fn(&mut rand_chacha::ChaCha8Rng, f64) -> (&'static str, String, Value) + Send + Sync + 'static,
) -> Vec<Outcome> {
    let client = reqwest::blocking::Client::builder().timeout(CLIENT_TIMEOUT).build().expect("an HTTP client");
    let (outcomes, request) = (Arc::new(Mutex::new(Vec::new())), Arc::new(request));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (client, outcomes, request) = (client.clone(), outcomes.clone(), request.clone());
            std::thread::spawn(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c as u64);
                loop {
                    let sent_at = started.elapsed().as_secs_f64();
                    if sent_at >= seconds {
                        break;
                    }
                    let (kind, url, body) = request(&mut rng, sent_at);
                    let t = Instant::now();
                    let answer = client.post(&url).json(&body).send().and_then(|r| {
                        let status = r.status().as_u16();
                        let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<f64>().ok());
                        r.bytes().map(|_| (status, retry_after))
                    });
                    let status = answer.as_ref().ok().map(|(s, _)| *s);
                    let outcome = Outcome { sent_at, kind, status, seconds: t.elapsed().as_secs_f64() };
                    outcomes.lock().expect("not poisoned").push(outcome);
                    // As OpenAI's clients do: wait as long as a 503 says before the next try.
                    if let Ok((503, Some(wait))) = answer {
                        std::thread::sleep(Duration::from_secs_f64(wait.min(5.0)));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Arc::try_unwrap(outcomes).map(|m| m.into_inner().expect("not poisoned")).unwrap_or_default()
}

/// Latencies of `GET url` every 50 ms until `stop` is set.
fn probe(url: String, stop: Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<Vec<f64>> {
    std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().expect("an HTTP client");
        let mut seconds = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            let ok = client.get(&url).send().is_ok_and(|r| r.status().is_success());
            seconds.push(if ok { t.elapsed().as_secs_f64() } else { f64::INFINITY });
            std::thread::sleep(Duration::from_millis(50));
        }
        seconds
    })
}

/// What a drill found: its table rows, its figures and its checks (text, held).
struct Drill {
    rows: Vec<String>,
    notes: Vec<String>,
    verdicts: Vec<(String, bool)>,
}

/// One table row for the outcomes in `[from, to)` seconds.
fn row(label: &str, outcomes: &[&Outcome]) -> String {
    let count = |f: &dyn Fn(Option<u16>) -> bool| outcomes.iter().filter(|o| f(o.status)).count();
    let ok: Vec<f64> = outcomes.iter().filter(|o| o.status == Some(200)).map(|o| o.seconds).collect();
    let mut others: Vec<(u16, usize)> = Vec::new();
    for o in outcomes {
        if let Some(s) = o.status.filter(|&s| s != 200) {
            match others.iter_mut().find(|(k, _)| *k == s) {
                Some((_, n)) => *n += 1,
                None => others.push((s, 1)),
            }
        }
    }
    others.sort();
    let refused = if others.is_empty() {
        "none".to_string()
    } else {
        others.iter().map(|(s, n)| format!("{n} × {s}")).collect::<Vec<_>>().join(", ")
    };
    format!(
        "| {label} | {} | {} | {refused} | {} | {:.2} s | {:.2} s |",
        outcomes.len(),
        ok.len(),
        count(&|s| s.is_none()),
        percentile(ok.clone(), 0.5),
        percentile(ok, 0.99)
    )
}

fn overload(cli: &Path, smol: &Path, work: &Path) -> Result<Drill> {
    let (clients, seconds) = (256, 60.0);
    eprintln!("chaos: overload: {clients} clients for {seconds} s against one SmolLM2 server");
    let mut command = Command::new(cli);
    command.arg("serve").arg(smol).arg("--store").arg(work.join("store-overload")).arg("--cache-dir").arg(work.join("cache-overload"));
    command.args(["--port", "0"]).args(OVERLOAD_FLAGS);
    let (mut server, url) = start(command)?;
    let pid = server.id();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = probe(format!("{url}/health"), stop.clone());
    let started = Instant::now();
    let words = ["river", "signal", "market", "quiet", "engine", "garden", "letter", "winter", "copper", "island"];
    let text = move |rng: &mut rand_chacha::ChaCha8Rng, n: usize| {
        (0..n).map(|_| words[rng.random_range(0..words.len())]).collect::<Vec<_>>().join(" ")
    };
    let outcomes = drive(clients, seconds, started, move |rng, _| {
        if rng.random_bool(0.5) {
            let input: Vec<String> = (0..4).map(|_| text(rng, 100)).collect();
            ("embed", format!("{url}/v1/embeddings"), json!({"model": "base", "input": input}))
        } else {
            let body = json!({"model": "base", "prompt": text(rng, 40), "max_tokens": rng.random_range(32..=128), "temperature": 0.7, "seed": rng.random::<u32>()});
            ("generate", format!("{url}/v1/completions"), body)
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let health = health.join().unwrap_or_default();
    // Peak resident memory so far.
    let rss = crate::load_test::status_mib(pid, "VmHWM");
    kill(&mut server, "-TERM");
    let all: Vec<&Outcome> = outcomes.iter().collect();
    let by = |k: &str| outcomes.iter().filter(|o| o.kind == k).collect::<Vec<_>>();
    let only_200_503 = outcomes.iter().all(|o| matches!(o.status, Some(200 | 503)));
    let timeouts = outcomes.iter().filter(|o| o.status.is_none()).count();
    let health_p99 = percentile(health.clone(), 0.99);
    let verdicts = vec![
        (format!("every answer is a 200 or a 503: {only_200_503}"), only_200_503),
        (format!("no client time-out: {timeouts}"), timeouts == 0),
        (format!("peak RSS {rss:.0} MiB under {RSS_BOUND_MIB:.0} MiB"), rss < RSS_BOUND_MIB),
        (format!("/health p99 {:.1} ms under 100 ms ({} probes)", health_p99 * 1e3, health.len()), health_p99 < 0.1),
    ];
    let notes = vec![
        format!("server flags: `{}`", OVERLOAD_FLAGS.join(" ")),
        format!("peak resident memory (VmHWM): {rss:.0} MiB (bound {RSS_BOUND_MIB:.0} MiB)"),
        format!(
            "`/health` every 50 ms throughout: {} probes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            health.len(),
            percentile(health.clone(), 0.5) * 1e3,
            health_p99 * 1e3,
            health.iter().cloned().fold(0.0, f64::max) * 1e3
        ),
    ];
    Ok(Drill {
        rows: vec![row("all", &all), row("embeddings (4 × 100 words)", &by("embed")), row("generations (32-128 tokens)", &by("generate"))],
        notes,
        verdicts,
    })
}

/// The failure drill's processes, so that a failing step still stops them all.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            kill(child, "-KILL");
        }
    }
}

fn failures(root: &Path, cli: &Path, haproxy: &Path, minilm: &Path, work: &Path) -> Result<Drill> {
    let (s3_root, s3_port) = (work.join("s3"), free_port()?);
    let s3_bin = root.join("target/release/examples/s3_server");
    let s3 = || {
        let mut c = Command::new(&s3_bin);
        c.arg(&s3_root).arg(s3_port.to_string());
        start(c)
    };
    let (s3_server, endpoint) = s3()?;
    let mut processes = Processes(vec![s3_server]);
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test-key"),
        ("AWS_SECRET_ACCESS_KEY", "test-secret"),
        ("AWS_REGION", "us-east-1"),
        ("ADAPTERS_STORE", "s3://adapters/chaos"),
    ];
    let fixtures = root.join("fixtures/fusion-sources");
    for (name, folder) in
        [("sms", "sms_spam"), ("trec", "trec_coarse"), ("vader", "vader_tweets"), ("late", "rotten_tomatoes"), ("fresh", "sms_spam")]
    {
        let mut c = Command::new(cli);
        c.envs(env).arg("push").arg(fixtures.join(folder)).args(["--name", name]);
        let out = c.output()?;
        if !out.status.success() {
            bail!("pushing {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let ports = [free_port()?, free_port()?];
    let replica = |i: usize| {
        let mut c = Command::new(cli);
        c.envs(env).arg("serve").arg(minilm).args([
            "--port",
            &ports[i].to_string(),
            "--max-adapters",
            "2",
            "--request-timeout",
            "8",
            "--drain-seconds",
            "0",
        ]);
        c.arg("--cache-dir").arg(work.join(format!("cache-{i}")));
        start(c)
    };
    for i in 0..2 {
        processes.0.push(replica(i)?.0);
    }
    let front = free_port()?;
    let config = format!(
        "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 15s\n  timeout server 12s\n  retries 2\n  option redispatch\n  retry-on conn-failure empty-response\nfrontend front\n  bind 127.0.0.1:{front}\n  default_backend replicas\nbackend replicas\n  balance roundrobin\n  option httpchk GET /ready\n  default-server inter 500ms fall 2 rise 2\n  server r0 127.0.0.1:{} check\n  server r1 127.0.0.1:{} check\n",
        ports[0], ports[1]
    );
    let config_path = work.join("haproxy.cfg");
    std::fs::write(&config_path, config)?;
    processes.0.push(Command::new(haproxy).arg("-f").arg(&config_path).arg("-db").stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    let url = format!("http://127.0.0.1:{front}");
    // Wait until both replicas are up behind the balancer.
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let ready = Instant::now();
    while client
        .post(format!("{url}/v1/classify"))
        .json(&json!({"model": "sms", "input": "hi"}))
        .send()
        .map_or(true, |r| !r.status().is_success())
    {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!("the replicas did not come up behind HAProxy");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("chaos: failures: 48 clients for 60 s through HAProxy; kill a replica at 10 s, corrupt a version at 25 s, S3 down 35-45 s");
    let started = Instant::now();
    let (texts, target) =
        (["free entry to win a prize", "are we meeting at six?", "what is the capital of peru?", "I loved this film"], url.clone());
    let clients = std::thread::spawn(move || {
        drive(48, 60.0, started, move |rng, at| {
            let text = texts[rng.random_range(0..texts.len())];
            let pick = rng.random_range(0..100);
            let (kind, model) = match pick {
                0..=9 if at >= 25.0 => ("late (corrupted at 25 s)", "late"),
                10..=19 if at >= 35.0 => ("fresh (first asked for at 35 s)", "fresh"),
                _ => ("resident (sms, trec, vader)", ["sms", "trec", "vader"][rng.random_range(0..3)]),
            };
            let path = if pick % 2 == 0 { "/v1/classify" } else { "/v1/embeddings" };
            (kind, format!("{target}{path}"), json!({"model": model, "input": text}))
        })
    });
    let at = |s: f64| std::thread::sleep(Duration::from_secs_f64((s - started.elapsed().as_secs_f64()).max(0.0)));
    at(10.0);
    kill(&mut processes.0[1], "-KILL");
    eprintln!("chaos: 10 s: replica 0 killed");
    at(15.0);
    processes.0[1] = replica(0)?.0;
    eprintln!("chaos: 15 s: replica 0 restarted");
    at(25.0);
    let corrupted = corrupt(&s3_root.join("adapters/chaos/late"))?;
    eprintln!("chaos: 25 s: corrupted {}", corrupted.display());
    at(35.0);
    kill(&mut processes.0[0], "-KILL");
    eprintln!("chaos: 35 s: S3 stopped");
    at(45.0);
    processes.0[0] = s3()?.0;
    eprintln!("chaos: 45 s: S3 back");
    let outcomes = clients.join().map_err(|_| anyhow::anyhow!("the clients panicked"))?;
    drop(processes);
    let phase = |from: f64, to: f64| outcomes.iter().filter(|o| o.sent_at >= from && o.sent_at < to).collect::<Vec<_>>();
    let of = |kind: &str, from: f64, to: f64| phase(from, to).into_iter().filter(|o| o.kind.starts_with(kind)).collect::<Vec<_>>();
    let rows = vec![
        row("0-10 s: before", &phase(0.0, 10.0)),
        row("10-25 s: a replica killed (SIGKILL), back at 15 s", &phase(10.0, 25.0)),
        row("25-35 s: a stored version corrupted", &phase(25.0, 35.0)),
        row("35-45 s: S3 down", &phase(35.0, 45.0)),
        row("45-60 s: after", &phase(45.0, 60.0)),
        row("resident adapters, 35-45 s (S3 down)", &of("resident", 35.0, 45.0)),
        row("`late` (corrupted), 25-60 s", &of("late", 25.0, 60.0)),
        row("`fresh`, 36-44.5 s (S3 down)", &of("fresh", 36.0, 44.5)),
        row("`fresh`, 47-60 s (S3 back)", &of("fresh", 47.0, 60.0)),
    ];
    let timeouts = outcomes.iter().filter(|o| o.status.is_none()).count();
    let resident_outage = of("resident", 35.0, 45.0);
    let resident_ok = resident_outage.iter().all(|o| o.status == Some(200)) && !resident_outage.is_empty();
    // Edges excluded: a request sent just before an event may be answered just after it.
    let late = of("late", 25.5, 60.0);
    let late_refused = !late.is_empty()
        && late.iter().all(|o| match o.status {
            Some(502) => true,
            Some(503) => (34.0..47.0).contains(&o.sent_at),
            _ => false,
        });
    let fresh_down = of("fresh", 36.0, 44.5);
    let fresh_after = of("fresh", 47.0, 60.0);
    let verdicts = vec![
        (format!("every request ended in a status the client saw ({timeouts} did not)"), timeouts == 0),
        (format!("resident adapters served through the S3 outage ({} requests)", resident_outage.len()), resident_ok),
        (format!("the corrupted version refused with 502, 503 while S3 was down ({} requests)", late.len()), late_refused),
        (
            format!("new loads refused with 503 during the outage ({} requests)", fresh_down.len()),
            !fresh_down.is_empty() && fresh_down.iter().all(|o| o.status == Some(503)),
        ),
        (
            format!("new loads served after it ({} requests)", fresh_after.len()),
            !fresh_after.is_empty() && fresh_after.iter().all(|o| o.status == Some(200)),
        ),
    ];
    let notes = vec![format!(
        "replicas: `adapters serve all-MiniLM-L6-v2 --max-adapters 2 --request-timeout 8`, one cache folder each (it survives the kill); HAProxy {}: round robin, `option httpchk GET /ready` every 500 ms (down after 2 failures, up after 2 passes), `retries 2`, `option redispatch`, `retry-on conn-failure empty-response`",
        haproxy.display()
    )];
    Ok(Drill { rows, notes, verdicts })
}

/// Flips a byte in the middle of the largest file under `dir` (a stored version's weights).
fn corrupt(dir: &Path) -> Result<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                pending.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                files.push((std::fs::metadata(&p)?.len(), p));
            }
        }
    }
    let (_, path) = files.into_iter().max().context("no weights to corrupt")?;
    let mut bytes = std::fs::read(&path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes)?;
    Ok(path)
}

fn report(overload: &Drill, failures: &Drill) -> String {
    let mut md = String::from(
        "# Reliability\n\nWhat `adapters serve` does under overload and under failures, measured by `cargo xtask chaos` (real server processes, a real S3-compatible server, HAProxy from Debian's packages, all on one 2-core machine; the module doc of `xtask/src/chaos.rs` has the details). Rewritten by each run.\n",
    );
    let sections = [
        (
            "Overload: 256 clients, long texts and long generations, 10 s client time-out, 60 s",
            "503s carry `Retry-After: 1` and come at once (a bound was reached); the clients wait that long before their next request, as OpenAI's clients do.",
            overload,
        ),
        (
            "Failures: two replicas behind HAProxy on one S3 store, 48 clients, 60 s",
            "Injected: at 10 s one replica is killed with SIGKILL and restarted at 15 s; at 25 s one stored version that no replica has loaded (`late`) is corrupted in the S3 store; from 35 s to 45 s the S3 server is stopped. Clients ask for resident adapters throughout, for `late` from 25 s and for `fresh` (never loaded before) from 35 s; half classify, half embed.",
            failures,
        ),
    ];
    for (title, what, drill) in sections {
        md += &format!("\n## {title}\n\n{what}\n\n");
        md += "| requests sent | count | 200 | refused or failed (count × status) | no status (client time-out, connection error) | p50 of the 200s | p99 of the 200s |\n|---|---|---|---|---|---|---|\n";
        md += &drill.rows.iter().map(|r| format!("{r}\n")).collect::<String>();
        md += "\n";
        md += &drill.notes.iter().map(|n| format!("- {n}\n")).collect::<String>();
    }
    md += "\n## Checks\n\n";
    for (v, ok) in overload.verdicts.iter().chain(&failures.verdicts) {
        md += &format!("- {} {v}\n", if *ok { "held:" } else { "FAILED:" });
    }
    md
}
