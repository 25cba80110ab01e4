//! `cargo xtask bench --serving`: `adapters serve` against the same engine offline, on the
//! same machine, measured alternately in one run, as ratios. Written to
//! bench/results/serving.json and BENCHMARKS.md.
//!
//! - Embeddings: 512 texts of mixed length (384 tweets of the VADER test split, 128
//!   passages of 40-300 words of movie dialog), through 32 adapters for MiniLM (16
//!   Pfeiffer, 16 LoRA r=8). The server gets them from 64 clients, one text a request (a
//!   text's adapter: its index mod 32). Offline, `adapters embed` runs the same texts in
//!   one process through one Pfeiffer adapter; its model load, timed on one text, is
//!   subtracted.
//! - Generation: 8 and 32 concurrent clients, each streaming `/v1/completions` of the
//!   benchmark prompts (bench/prompts.txt) for 32 greedy tokens, back to back, for a fixed
//!   time. Requests take turns through the base model, a Pfeiffer adapter and a LoRA (r=8
//!   on q, v). Offline, `bench-workload smol_generate_mixed_b8` / `_b32` generates the same
//!   tokens for the same prompts and adapters in lockstep, prefill included. The served
//!   side also gives time to first token and time between tokens.

use crate::load_test::percentile;
use crate::{fetch, run};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Adapters the embedding server serves.
const EMBED_ADAPTERS: usize = 32;
/// Clients sending embedding requests.
const EMBED_CLIENTS: usize = 64;
/// The generation server's `--prefill-chunk`.
const PREFILL_CHUNK: usize = 128;
/// Tokens each generation asks for (as `bench-workload smol_generate_mixed_*`).
const GENERATED_TOKENS: usize = 32;

/// What runs the benchmark: the CLI, the bench binary, and the models.
struct Tools {
    cli: PathBuf,
    bench: PathBuf,
    minilm: PathBuf,
    smol: PathBuf,
}

pub fn run_serving(root: &Path, rounds: usize, seconds: u64) -> Result<()> {
    let models = fetch::fetch_all(root)?;
    run(root, "cargo", &["build", "--release", "--quiet", "-p", "adapters-cli", "-p", "adapters-bench"])?;
    let tools = Tools {
        cli: root.join("target/release/adapters"),
        bench: root.join("target/release/bench-workload"),
        minilm: models.join(fetch::MINILM_DIR),
        smol: models.join(fetch::SMOLLM_GGUF),
    };
    let work = root.join("runs/serving");
    let _ = std::fs::remove_dir_all(&work);
    let texts = embedding_texts(root)?;
    let prompts: Vec<String> = std::fs::read_to_string(root.join("bench/prompts.txt"))?.lines().map(str::to_string).collect();

    eprintln!("serving bench: making adapters");
    let mut embed_adapters = Vec::new();
    for i in 0..EMBED_ADAPTERS {
        let (kind, sets): (&str, &[&str]) = if i % 2 == 0 { ("seq_bn", &["reduction_factor=16"]) } else { ("lora", &["r=8", "alpha=16"]) };
        embed_adapters.push(make_adapter(&tools.cli, &tools.minilm, &work, &format!("e{i}"), kind, sets, i)?);
    }
    make_adapter(&tools.cli, &tools.smol, &work, "pfeiffer", "seq_bn", &["reduction_factor=16"], 1)?;
    make_adapter(&tools.cli, &tools.smol, &work, "lora", "lora", &["r=8", "alpha=16"], 1)?;
    let store = work.join("store");
    let chunk = PREFILL_CHUNK.to_string();
    let start = |model: &Path, cache: &str| {
        let cache = work.join(cache);
        let args: [&std::ffi::OsStr; 9] = [
            model.as_ref(),
            "--store".as_ref(),
            store.as_ref(),
            "--max-adapters".as_ref(),
            "64".as_ref(),
            "--cache-dir".as_ref(),
            cache.as_ref(),
            "--prefill-chunk".as_ref(),
            chunk.as_ref(),
        ];
        crate::serve_demo::start(&tools.cli, &args)
    };
    let (embed_server, embed_url) = start(&tools.minilm, "cache-embed")?;
    let (gen_server, gen_url) = start(&tools.smol, "cache-gen")?;
    let outcome = (|| -> Result<Value> {
        // Every adapter resident before the clock starts.
        let client = reqwest::blocking::Client::new();
        for i in 0..EMBED_ADAPTERS {
            client
                .post(format!("{embed_url}/v1/embeddings"))
                .json(&json!({"model": format!("e{i}"), "input": "warm up"}))
                .send()?
                .error_for_status()?;
        }
        for model in ["pfeiffer", "lora"] {
            let body = json!({"model": model, "prompt": "warm up", "max_tokens": 1});
            client.post(format!("{gen_url}/v1/completions")).json(&body).send()?.error_for_status()?;
        }
        let mut rows: Vec<Value> = Vec::new();
        for round in 0..rounds {
            eprintln!("serving bench: round {} of {rounds}", round + 1);
            let offline = offline_embed(&tools, &embed_adapters[0], &texts)?;
            let served = served_embed(&embed_url, &texts)?;
            eprintln!("  embeddings: offline {offline:.1} texts/s, served {served:.1} texts/s");
            rows.push(json!({"round": round, "kind": "embed", "offline": offline, "served": served}));
            for batch in [8, 32] {
                let offline = offline_generate(&tools, batch)?;
                let served = served_generate(&gen_url, &prompts, batch, seconds)?;
                eprintln!("  generation at {batch}: offline {offline:.1} tokens/s, served {}", served["tokens_per_s"]);
                rows.push(json!({"round": round, "kind": format!("generate_{batch}"), "offline": offline, "served": served}));
            }
        }
        Ok(json!({
            "title": "Serving against the engine offline",
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "rounds": rounds, "seconds": seconds, "texts": texts.len(), "embed_adapters": EMBED_ADAPTERS,
            "embed_clients": EMBED_CLIENTS, "generated_tokens": GENERATED_TOKENS, "prefill_chunk": PREFILL_CHUNK,
            "rows": rows,
        }))
    })();
    crate::serve_demo::stop(embed_server)?;
    crate::serve_demo::stop(gen_server)?;
    let value = outcome?;
    let out = root.join(crate::bench::RESULTS);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("serving.json"), serde_json::to_string_pretty(&value)?)?;
    crate::bench::run(root, None, true)
}

/// Makes an adapter with `adapters new` (seeded weights) in `work/adapters/NAME` and pushes
/// it to `work/store` as NAME; its folder.
fn make_adapter(cli: &Path, model: &Path, work: &Path, name: &str, kind: &str, sets: &[&str], seed: usize) -> Result<PathBuf> {
    let dir = work.join("adapters").join(name);
    let mut new = Command::new(cli);
    new.args(["new", kind, "--model"]).arg(model).arg("--out").arg(&dir).args(["--seed", &seed.to_string()]);
    for s in sets {
        new.args(["--set", s]);
    }
    quiet(new)?;
    let mut push = Command::new(cli);
    push.arg("push").arg(&dir).args(["--name", name, "--store"]).arg(work.join("store"));
    quiet(push)?;
    Ok(dir)
}

/// Runs `command`, failing with its stderr if it fails; its output.
pub(crate) fn quiet(mut command: Command) -> Result<std::process::Output> {
    let out = command.output().with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// The 512 embedding texts: 384 tweets and 128 movie-dialog passages of 40-300 words,
/// shuffled (seeded).
pub(crate) fn embedding_texts(root: &Path) -> Result<Vec<String>> {
    let tweets = std::fs::read_to_string(root.join("data/vader_tweets/test.jsonl"))?;
    let mut texts: Vec<String> = tweets
        .lines()
        .take(384)
        .map(|l| serde_json::from_str::<Value>(l).map(|v| v["text"].as_str().unwrap_or_default().to_string()))
        .collect::<Result<_, _>>()?;
    let dialog = std::fs::read_to_string(root.join("data/movie_dialog/train.txt"))?;
    let lines: Vec<&str> = dialog.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(34);
    let mut next = 0;
    for _ in 0..128 {
        let words = rng.random_range(40..=300);
        let mut passage = Vec::new();
        while passage.iter().map(|l: &&str| l.split_whitespace().count()).sum::<usize>() < words {
            passage.push(lines[next % lines.len()]);
            next += 1;
        }
        texts.push(passage.join(" "));
    }
    texts.shuffle(&mut rng);
    Ok(texts)
}

/// `adapters embed` on `texts` through `adapter`: texts per second, the model load (a
/// run on one text) subtracted.
fn offline_embed(tools: &Tools, adapter: &Path, texts: &[String]) -> Result<f64> {
    let time = |texts: &[String]| -> Result<f64> {
        let mut embed = Command::new(&tools.cli);
        embed.arg("embed").arg(&tools.minilm).arg("--json").arg("--adapter").arg(adapter).args(texts);
        let t = Instant::now();
        quiet(embed)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let load = time(&texts[..1])?;
    let all = time(texts)?;
    Ok(texts.len() as f64 / (all - load).max(1e-3))
}

/// `texts` from [`EMBED_CLIENTS`] clients, one text a request, text `i` through adapter
/// `e{i mod 32}`: texts per second from the first request to the last answer.
fn served_embed(url: &str, texts: &[String]) -> Result<f64> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..EMBED_CLIENTS {
            let (client, next, failures) = (client.clone(), next.clone(), failures.clone());
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(text) = texts.get(i) else { break };
                let body = json!({"model": format!("e{}", i % EMBED_ADAPTERS), "input": text});
                let ok = client.post(format!("{url}/v1/embeddings")).json(&body).send().and_then(|r| r.error_for_status()).is_ok();
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let seconds = t.elapsed().as_secs_f64();
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {} embedding requests failed", texts.len());
    }
    Ok(texts.len() as f64 / seconds)
}

/// `bench-workload smol_generate_mixed_b{batch}`: generated tokens per second.
fn offline_generate(tools: &Tools, batch: usize) -> Result<f64> {
    let mut bench = Command::new(&tools.bench);
    bench.arg(format!("smol_generate_mixed_b{batch}")).args(["--warmup", "1", "--steps", "3"]);
    let out = quiet(bench)?;
    let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
    let record: Value = serde_json::from_str(&line).with_context(|| format!("bench-workload printed {line:?}"))?;
    record["decode_tokens_per_s"].as_f64().context("decode_tokens_per_s in the record")
}

/// One streamed generation: when each piece of text arrived, and the tokens generated.
struct Stream {
    sent: Instant,
    pieces: Vec<Instant>,
    tokens: usize,
}

/// `clients` clients streaming generations back to back for `seconds`; tokens per second
/// (of the generations that finished in time), time to first token and between tokens.
fn served_generate(url: &str, prompts: &[String], clients: usize, seconds: u64) -> Result<Value> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let streams = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let end = t + Duration::from_secs(seconds);
    std::thread::scope(|s| {
        for c in 0..clients {
            let (client, streams, failures) = (client.clone(), streams.clone(), failures.clone());
            s.spawn(move || {
                let mut i = c;
                while Instant::now() < end {
                    match stream_one(&client, url, &prompts[i % prompts.len()], ["base", "pfeiffer", "lora"][i % 3]) {
                        Ok(stream) => streams.lock().expect("not poisoned").push(stream),
                        Err(e) => {
                            eprintln!("serving bench: a generation failed: {e:#}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += clients;
                }
            });
        }
    });
    let elapsed = t.elapsed().as_secs_f64();
    let streams = Arc::try_unwrap(streams).map_err(|_| anyhow::anyhow!("clients still running"))?.into_inner().expect("not poisoned");
    let tokens: usize = streams.iter().map(|s| s.tokens).sum();
    let first: Vec<f64> = streams.iter().filter_map(|s| Some(s.pieces.first()?.duration_since(s.sent).as_secs_f64())).collect();
    let between: Vec<f64> = streams.iter().flat_map(|s| s.pieces.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64())).collect();
    Ok(json!({
        "clients": clients, "generations": streams.len(), "failed": failures.load(Ordering::Relaxed),
        "tokens_per_s": tokens as f64 / elapsed,
        "ttft_p50_s": percentile(first.clone(), 0.5), "ttft_p99_s": percentile(first, 0.99),
        "tbt_p50_s": percentile(between.clone(), 0.5), "tbt_p99_s": percentile(between, 0.99),
    }))
}

/// Streams one greedy completion of `prompt` through `model`.
fn stream_one(client: &reqwest::blocking::Client, url: &str, prompt: &str, model: &str) -> Result<Stream> {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": GENERATED_TOKENS, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}});
    let sent = Instant::now();
    let response = client.post(format!("{url}/v1/completions")).json(&body).send()?.error_for_status()?;
    let mut stream = Stream { sent, pieces: Vec::new(), tokens: 0 };
    for line in std::io::BufReader::new(response).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data)?;
        if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
            stream.tokens = tokens as usize;
        } else if chunk["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            stream.pieces.push(Instant::now());
        }
    }
    Ok(stream)
}

/// The BENCHMARKS.md section for `serving.json`: medians over the rounds.
pub fn report(md: &mut String, v: &Value) -> Result<()> {
    use std::fmt::Write as _;
    let rows = v["rows"].as_array().context("rows")?;
    let median = |kind: &str, f: &dyn Fn(&Value) -> Option<f64>| -> f64 {
        crate::load_test::median(rows.iter().filter(|r| r["kind"] == kind).filter_map(f).collect())
    };
    // Served over offline in each round (measured one after the other), then the median.
    let ratio = |kind: &str, served: &dyn Fn(&Value) -> Option<f64>| median(kind, &|r| Some(served(r)? / r["offline"].as_f64()?));
    writeln!(md, "\n## {}\n", v["title"].as_str().unwrap_or("Serving"))?;
    writeln!(
        md,
        "`cargo xtask bench --serving`: `adapters serve` and the same engine offline on the same machine ({} threads, server and clients together), alternately, {} rounds; medians. Decoding steps take at most {} prompt tokens of joining requests (chunked prefill). Embeddings: {} texts (tweets and 40-300-word passages), {} clients, one text a request, through {} adapters (half Pfeiffer, half LoRA r=8) against `adapters embed` through one Pfeiffer adapter (model load subtracted). Generation: clients streaming `/v1/completions` of {} greedy tokens back to back for {} s, rows taking turns through base, Pfeiffer and LoRA, against `bench-workload smol_generate_mixed_bN` (same prompts, adapters and tokens, in lockstep, prefill included).\n",
        v["threads"], v["rounds"], v["prefill_chunk"], v["texts"], v["embed_clients"], v["embed_adapters"], v["generated_tokens"], v["seconds"]
    )?;
    writeln!(md, "| workload | offline | served | served / offline (median of the rounds' ratios) | time to first token p50 / p99 | time between tokens p50 / p99 |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let (off, on) = (median("embed", &|r| r["offline"].as_f64()), median("embed", &|r| r["served"].as_f64()));
    let embed_ratio = ratio("embed", &|r| r["served"].as_f64());
    writeln!(md, "| embeddings (texts/s) | {off:.1} | {on:.1} | {embed_ratio:.2} | | |")?;
    for batch in [8, 32] {
        let kind = format!("generate_{batch}");
        let off = median(&kind, &|r| r["offline"].as_f64());
        let on = median(&kind, &|r| r["served"]["tokens_per_s"].as_f64());
        let s = |k: &str| median(&kind, &|r| r["served"][k].as_f64());
        writeln!(
            md,
            "| generation, {batch} concurrent (tokens/s) | {off:.1} | {on:.1} | {:.2} | {:.2} / {:.2} s | {:.0} / {:.0} ms |",
            ratio(&kind, &|r| r["served"]["tokens_per_s"].as_f64()),
            s("ttft_p50_s"),
            s("ttft_p99_s"),
            s("tbt_p50_s") * 1e3,
            s("tbt_p99_s") * 1e3
        )?;
    }
    Ok(())
}
