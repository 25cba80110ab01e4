//! The real server on 127.0.0.1 with a real HTTP client, real MiniLM weights, adapters
//! from the repository's fixtures pushed into a real store (a local folder, or an
//! S3-compatible server started by the test).

use adapters_serve::cache::Limits;
use adapters_serve::{AppState, Config};
use adapters_store::{Name, PushOptions, Store};
use adapters_testkit::{fixtures, s3_options, scratch, start_s3};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A running server and what it needs to stop.
struct Server {
    url: String,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(store: Store, config: Config) -> Server {
        let model = adapters_models::load(&adapters_models::fetched("all-MiniLM-L6-v2").unwrap(), &candle_core::Device::Cpu).unwrap();
        Self::start_with(model, store, config).await
    }

    async fn start_with(model: adapters_models::LoadedModel, store: Store, config: Config) -> Server {
        let state = Arc::new(AppState::new(model, store, config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(adapters_serve::serve(listener, state.clone(), async {
            let _ = stopped.await;
        }));
        Server { url, state, stop: Some(stop), task }
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = reqwest::Client::new().post(format!("{}{path}", self.url)).json(&body).send().await.unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn metric(&self, line_start: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url)).await.unwrap().text().await.unwrap();
        text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()).map_or(0.0, |v| v.parse().unwrap())
    }

    /// A metric summed over its label sets.
    async fn metric_sum(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url)).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

async fn local_store(dir: &Path) -> Store {
    adapters_testkit::register_all();
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
    for (name, folder, tag) in [
        ("sms", "fusion-sources/sms_spam", Some("prod")),
        ("trec", "fusion-sources/trec_coarse", None),
        ("vader", "fusion-sources/vader_tweets", None),
    ] {
        let tags = tag.map(|t| vec![t.parse::<Name>().unwrap()]).unwrap_or_default();
        store.push(&fixtures().join(folder), &name.parse().unwrap(), PushOptions { tags, ..Default::default() }).await.unwrap();
    }
    store
}

fn config(dir: &Path) -> Config {
    Config { cache_dir: dir.join("cache"), drain: std::time::Duration::ZERO, ..Default::default() }
}

fn smol() -> adapters_models::LoadedModel {
    adapters_models::load(&adapters_models::fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap(), &candle_core::Device::Cpu).unwrap()
}

/// Texts of about `tokens` tokens each.
fn texts(n: usize, tokens: usize) -> Vec<String> {
    (0..n).map(|i| format!("text {i}: {}", "word ".repeat(tokens.saturating_sub(5)))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapters_load_on_first_use_once_and_classify_like_the_cli() {
    let dir = scratch("first-use");
    let server = Server::start(local_store(&dir).await, config(&dir)).await;
    // Six concurrent first requests: one load, five cache hits.
    let requests = (0..6).map(|_| {
        server.post(
            "/v1/classify",
            json!({"model": "sms@prod", "input": ["free entry to win a prize, text WIN now", "are we meeting at six?"]}),
        )
    });
    let answers = futures::future::join_all(requests).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body, &answers[0].1);
    }
    let body = &answers[0].1;
    assert!(body["model"].as_str().unwrap().starts_with("sms@"), "{body}");
    assert_eq!(body["data"][1]["label"], "ham");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    // The same probabilities as the adapter folder loaded directly.
    let mut direct = adapters_models::load(&adapters_models::fetched("all-MiniLM-L6-v2").unwrap(), &candle_core::Device::Cpu).unwrap();
    let name = direct.backbone.load_adapter(&fixtures().join("fusion-sources/sms_spam"), None).unwrap();
    adapters_models::HoldsAdapters::adapters_mut(&mut direct.backbone).activate(&[name.as_str()]).unwrap();
    let head = adapters_models::saved_heads::load_all(&fixtures().join("fusion-sources/sms_spam"), &direct.backbone).unwrap().remove(0);
    let ids = adapters_models::tokenizer::truncate_ids(
        direct.tokenizer.encode("free entry to win a prize, text WIN now", true).unwrap(),
        512,
        true,
    );
    let ctx = adapters_core::ForwardCtx::inference();
    let features = adapters_models::heads::pooled(&direct.backbone, &[ids.as_slice()], head.config.pooling, &ctx).unwrap();
    let logits = head.head.forward(&features, 0.0, &ctx).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&logits).unwrap().to_vec2::<f32>().unwrap();
    let served = body["data"][0]["scores"]["spam"].as_f64().unwrap() as f32;
    assert!((served - p[0][1]).abs() < 1e-5, "served {served}, direct {}", p[0][1]);

    let labels = r#"{adapter="sms",version=""#;
    assert_eq!(server.metric(&format!("adapters_cache_misses_total{labels}")).await, 1.0);
    assert_eq!(server.metric(&format!("adapters_cache_hits_total{labels}")).await, 5.0);
    assert_eq!(server.metric(&format!("adapters_rows_total{labels}")).await, 12.0);
    assert_eq!(server.metric("adapters_resident_adapters").await, 1.0);
    // Publishing a snapshot is far below the 1 ms target.
    let swap = server.metric("adapters_snapshot_swap_seconds_sum").await / server.metric("adapters_snapshot_swap_seconds_count").await;
    assert!(swap < 1e-3, "mean snapshot swap {swap} s");

    // Embeddings, OpenAI's shape; the base model and an adapter differ.
    let (status, base) = server.post("/v1/embeddings", json!({"model": "base", "input": "a quiet evening"})).await;
    assert_eq!(status, StatusCode::OK, "{base}");
    let (_, adapted) = server.post("/v1/embeddings", json!({"model": "trec", "input": ["a quiet evening"]})).await;
    let (b, a) = (&base["data"][0]["embedding"], &adapted["data"][0]["embedding"]);
    assert_eq!(b.as_array().unwrap().len(), 384);
    assert_ne!(a, b);
    assert_eq!(base["object"], "list");
    let (_, models) = reqwest::get(format!("{}/v1/models", server.url)).await.unwrap().json::<Value>().await.map(|v| ((), v)).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
}

/// AdapterHub heads (the pooler's, three layers) and a PEFT `SEQ_CLS` classifier, pushed
/// as those libraries saved them and asked at once (one mixed batch, the pooler run under
/// each row's adapter): each answers with the probabilities of the logits those libraries
/// computed (`fixtures/interop/heads`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapterhub_and_peft_heads_classify_as_those_libraries_do() {
    let dir = scratch("foreign-heads");
    adapters_testkit::register_all();
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
    let heads = fixtures().join("interop/heads");
    let names = ["ah_head_pooler_relu", "ah_head_three_layers", "peft_seq_cls_dora"];
    for name in names {
        store.push(&heads.join(name), &name.replace('_', "-").parse().unwrap(), PushOptions::default()).await.unwrap();
    }
    let server = Server::start(store, config(&dir)).await;
    let cases: Value = serde_json::from_slice(&std::fs::read(heads.join("cases.json")).unwrap()).unwrap();
    let texts: Vec<&str> = cases["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap()).collect();
    let requests = names.map(|name| server.post("/v1/classify", json!({"model": name.replace('_', "-"), "input": texts})));
    let answers = futures::future::join_all(requests).await;
    for (name, (status, body)) in names.iter().zip(answers) {
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        let case = cases["cases"].as_array().unwrap().iter().find(|c| c["name"] == *name).unwrap();
        let labels = case["labels"].as_array().unwrap();
        for (row, logits) in body["data"].as_array().unwrap().iter().zip(adapters_testkit::json_rows(&case["logits"])) {
            let z: f32 = logits.iter().map(|l| l.exp()).sum();
            for (label, l) in labels.iter().zip(&logits) {
                let served = row["scores"][label.as_str().unwrap()].as_f64().unwrap() as f32;
                assert!((served - l.exp() / z).abs() < 1e-5, "{name}: {label} served {served}, expected {}", l.exp() / z);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_evicts_the_least_recently_used_and_never_a_pinned_adapter() {
    let dir = scratch("lru");
    let cfg =
        Config { limits: Limits { max_adapters: 2, max_bytes: u64::MAX }, admin_token: Some("secret".parse().unwrap()), ..config(&dir) };
    let server = Server::start(local_store(&dir).await, cfg).await;
    let classify = |model: &'static str| server.post("/v1/classify", json!({"model": model, "input": "hello there"}));
    assert_eq!(classify("sms").await.0, StatusCode::OK);
    assert_eq!(classify("trec").await.0, StatusCode::OK);
    assert_eq!(classify("vader").await.0, StatusCode::OK); // sms goes
    let resident = |s: &Server| s.state.clone();
    let keys = |s: &Server| {
        let mut k: Vec<String> =
            resident(s).metrics.encode().lines().filter(|l| l.starts_with("adapters_cache_evictions_total")).map(String::from).collect();
        k.sort();
        k
    };
    assert_eq!(keys(&server).len(), 1);
    assert!(keys(&server)[0].contains(r#"adapter="sms""#), "{:?}", keys(&server));

    // Admin calls need the token.
    let client = reqwest::Client::new();
    let pin = |auth: Option<&str>| {
        let mut r = client.post(format!("{}/admin/adapters/pin", server.url)).json(&json!({"adapter": "trec"}));
        if let Some(a) = auth {
            r = r.bearer_auth(a);
        }
        r.send()
    };
    assert_eq!(pin(None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(pin(Some("wrong")).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(pin(Some("secret")).await.unwrap().status(), StatusCode::OK);
    // trec is pinned and vader was used last; sms comes back by evicting vader, not trec.
    assert_eq!(classify("sms").await.0, StatusCode::OK);
    assert!(keys(&server).iter().any(|k| k.contains(r#"adapter="vader""#)), "{:?}", keys(&server));
    assert!(!keys(&server).iter().any(|k| k.contains(r#"adapter="trec""#)), "{:?}", keys(&server));
    // Unload frees a slot.
    let unload = client
        .post(format!("{}/admin/adapters/unload", server.url))
        .bearer_auth("secret")
        .json(&json!({"adapter": "sms"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unload.status(), StatusCode::OK);
    assert_eq!(server.metric("adapters_resident_adapters").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retagging_switches_new_requests_while_requests_in_flight_keep_their_version() {
    let dir = scratch("retag");
    let server = Server::start(local_store(&dir).await, config(&dir)).await;
    let (_, first) = server.post("/v1/classify", json!({"model": "sms@prod", "input": "hi"})).await;
    let v1 = first["model"].as_str().unwrap().to_string();
    // A new version of sms, then `prod` moved to it through the admin endpoint.
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
    let v2 = store.push(&fixtures().join("fusion-sources/rotten_tomatoes"), &"sms".parse().unwrap(), PushOptions::default()).await.unwrap();
    // A slow request on prod (v1) in flight while prod moves to v2 and v1 is unloaded.
    let url = server.url.clone();
    let in_flight = tokio::spawn(async move {
        let texts: Vec<String> = (0..96).map(|i| format!("message {i}: call now to claim the prize you won this week")).collect();
        let r = reqwest::Client::new()
            .post(format!("{url}/v1/classify"))
            .json(&json!({"model": "sms@prod", "input": texts}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    let (status, _) = server.post("/admin/tags", json!({"adapter": format!("sms@{}", v2.version), "tag": "prod"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.post("/admin/adapters/unload", json!({"adapter": v1})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, after) = server.post("/v1/classify", json!({"model": "sms@prod", "input": "hi"})).await;
    assert_eq!(after["model"], format!("sms@{}", v2.version));
    let (status, finished) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{finished}");
    assert_eq!(finished["model"], v1, "the request in flight finished on the version it started with");
    assert_eq!(finished["data"].as_array().unwrap().len(), 96);
    // The old version stays addressable by its version.
    let (_, old) = server.post("/v1/classify", json!({"model": v1, "input": "hi"})).await;
    assert_eq!(old["model"], v1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_and_bad_adapters_get_clear_errors_and_the_server_keeps_serving() {
    let dir = scratch("faults");
    let store = local_store(&dir).await;
    // An adapter for another base model, and one damaged in the store.
    store.push(&fixtures().join("interop/peft_lora_smollm2/adapter"), &"smol-lora".parse().unwrap(), PushOptions::default()).await.unwrap();
    let damaged =
        store.push(&fixtures().join("fusion-sources/rotten_tomatoes"), &"damaged".parse().unwrap(), PushOptions::default()).await.unwrap();
    let weights = dir.join(format!("store/damaged/versions/{}/files/adapter_model.safetensors", damaged.version));
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    // Heads that could not answer: no labels, and one (with its weights) for another width.
    for (name, labels, width) in [("no-labels", 0, 384), ("too-wide", 2, 768)] {
        let folder = dir.join(name);
        let head = folder.join("heads/sms_spam");
        std::fs::create_dir_all(&head).unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixtures().join("fusion-sources/sms_spam").join(file), folder.join(file)).unwrap();
        }
        let config_path = fixtures().join("fusion-sources/sms_spam/heads/sms_spam/head_config.json");
        let mut config: Value = serde_json::from_str(&std::fs::read_to_string(config_path).unwrap()).unwrap();
        config["labels"] = json!(["ham", "spam"][..labels]);
        config["hidden_size"] = json!(width);
        std::fs::write(head.join("head_config.json"), config.to_string()).unwrap();
        let zeros = |shape: &[usize]| candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let tensors =
            std::collections::HashMap::from([("weight".to_string(), zeros(&[labels, width])), ("bias".to_string(), zeros(&[labels]))]);
        candle_core::safetensors::save(&tensors, head.join("head.safetensors")).unwrap();
        store.push(&folder, &name.parse().unwrap(), PushOptions::default()).await.unwrap();
    }
    let server = Server::start(store, Config { max_body_bytes: 64 << 10, max_inputs: 8, ..config(&dir) }).await;
    let client = reqwest::Client::new();
    let raw =
        |body: String| client.post(format!("{}/v1/classify", server.url)).header("content-type", "application/json").body(body).send();
    let expect = |status: StatusCode, body: Value, needle: &str, want: StatusCode| {
        assert_eq!(status, want, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "expected `{needle}` in {body}");
    };
    let r = raw("{\"model\": \"sms\", \"input\": ".into()).await.unwrap();
    expect(r.status(), r.json().await.unwrap(), "request body", StatusCode::BAD_REQUEST);
    let (s, b) = server.post("/v1/classify", json!({"model": "sms", "input": "x", "temperature": 1})).await;
    expect(s, b, "unknown field `temperature`", StatusCode::UNPROCESSABLE_ENTITY);
    let (s, b) = server.post("/v1/classify", json!({"model": "nobody", "input": "x"})).await;
    expect(s, b, "no adapter `nobody`", StatusCode::NOT_FOUND);
    let (s, b) = server.post("/v1/classify", json!({"model": "../etc", "input": "x"})).await;
    expect(s, b, "not a valid name", StatusCode::BAD_REQUEST);
    let (s, b) = server.post("/v1/classify", json!({"model": "smol-lora", "input": "x"})).await;
    expect(s, b, "does not fit this server's base model", StatusCode::CONFLICT);
    let (s, b) = server.post("/v1/classify", json!({"model": "damaged", "input": "x"})).await;
    expect(s, b, "damaged", StatusCode::BAD_GATEWAY);
    let (s, b) = server.post("/v1/classify", json!({"model": "no-labels", "input": "x"})).await;
    expect(s, b, "at least one label", StatusCode::BAD_GATEWAY);
    let (s, b) = server.post("/v1/classify", json!({"model": "too-wide", "input": "x"})).await;
    expect(s, b, "reads width 768, the base model's is 384", StatusCode::BAD_GATEWAY);
    let (s, b) = server.post("/v1/classify", json!({"model": "sms", "input": vec!["x"; 9]})).await;
    expect(s, b, "1 to 8 texts", StatusCode::BAD_REQUEST);
    let r = raw(json!({"model": "sms", "input": "x".repeat(100_000)}).to_string()).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (s, b) = server.post("/v1/classify", json!({"model": "base", "input": "x"})).await;
    expect(s, b, "no classification head", StatusCode::BAD_REQUEST);
    // Everyone else is still served.
    let (s, b) = server.post("/v1/classify", json!({"model": "sms", "input": "see you soon"})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(server.metric(r#"adapters_requests_total{adapter="unknown",version="",endpoint="classify",status="404"}"#).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_requests_in_flight() {
    let dir = scratch("drain");
    let mut server = Server::start(local_store(&dir).await, config(&dir)).await;
    let url = server.url.clone();
    let slow = tokio::spawn(async move {
        let texts: Vec<String> = (0..64).map(|i| format!("text number {i} with a few more words in it to read")).collect();
        reqwest::Client::new()
            .post(format!("{url}/v1/embeddings"))
            .json(&json!({"model": "base", "input": texts}))
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    server.stop.take().unwrap().send(()).unwrap();
    assert_eq!(slow.await.unwrap(), StatusCode::OK, "the request in flight finished");
    server.task.await.unwrap().unwrap();
    assert!(reqwest::get(format!("{}/health", server.url)).await.is_err(), "stopped accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_share_one_s3_store() {
    let dir = scratch("s3");
    let endpoint = start_s3(&dir.join("s3")).await;
    let options = s3_options(&endpoint);
    let store = || Store::open_with_options("s3://adapters/shared", &options).unwrap();
    store().push(&fixtures().join("fusion-sources/sms_spam"), &"sms".parse().unwrap(), PushOptions::default()).await.unwrap();
    let a = Server::start(store(), Config { cache_dir: dir.join("cache-a"), ..Default::default() }).await;
    let b = Server::start(store(), Config { cache_dir: dir.join("cache-b"), ..Default::default() }).await;
    let (sa, ra) = a.post("/v1/classify", json!({"model": "sms", "input": "win cash now"})).await;
    let (sb, rb) = b.post("/v1/classify", json!({"model": "sms", "input": "win cash now"})).await;
    assert_eq!((sa, sb), (StatusCode::OK, StatusCode::OK), "{ra} {rb}");
    assert_eq!(ra, rb);
}

/// The OpenAI Python client (pinned, in a venv under target/ that this test sets up) against
/// a SmolLM2 server: models, completions, chat (whole and streamed), embeddings, errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_client_works_against_the_server() {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/openai-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
        let installed = made.is_ok_and(|s| s.success())
            && std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "openai==3.57.0"])
                .status()
                .is_ok_and(|s| s.success());
        if !installed {
            let _ = std::fs::remove_dir_all(&venv);
            eprintln!(
                "skipped: could not set up a Python venv with openai==3.57.0 (python3 -m venv, pip install); nothing else is skipped"
            );
            return;
        }
    }
    let dir = scratch("openai");
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
    store.push(&fixtures().join("interop/peft_lora_smollm2/adapter"), &"smol-lora".parse().unwrap(), PushOptions::default()).await.unwrap();
    let model =
        adapters_models::load(&adapters_models::fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap(), &candle_core::Device::Cpu).unwrap();
    let server = Server::start_with(model, store, config(&dir)).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let url = server.url.clone();
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(python).arg(script).arg(url).output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(got["models"].as_array().unwrap().iter().any(|m| m.as_str().unwrap().starts_with("smol-lora@")), "{got}");
    assert!(got["completion"].as_str().unwrap().contains("Paris"), "{got}");
    assert_eq!(got["completion_usage"], 6);
    assert!(got["chat_model"].as_str().unwrap().starts_with("smol-lora@"));
    assert_eq!(got["chat"], got["chat_streamed"], "streamed and whole greedy answers agree");
    assert_eq!(got["chat_streamed_usage"], json!([8, 0]), "a streamed generation ends with its usage when asked");
    assert!(!got["chat"].as_str().unwrap().is_empty());
    assert_eq!(got["embedding_dims"], json!([576, 576]));
    assert_eq!(got["unknown_model"], "NotFoundError");
}

/// A streaming client that goes away stops its generation at the next token. Without
/// batching its compute slot frees at once: with one slot, the next request is answered
/// within 5 s, while the abandoned greedy story would run on for hundreds of tokens (400
/// take about 9 s here; it does not stop by itself before that). With continuous
/// batching the decoding loop stops stepping once the next request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_mid_stream_stops_its_generation() {
    for max_rows in [0, 8] {
        let dir = scratch(&format!("disconnect-{max_rows}"));
        let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
        let model = adapters_models::load(&adapters_models::fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap(), &candle_core::Device::Cpu)
            .unwrap();
        let batching = adapters_serve::Batching { max_rows, ..Default::default() };
        let server = Server::start_with(model, store, Config { max_concurrent: 1, batching, ..config(&dir) }).await;
        let request = json!({"model": "base", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": true});
        let mut response = reqwest::Client::new().post(format!("{}/v1/completions", server.url)).json(&request).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let first = response.chunk().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).starts_with("data: {"), "{first:?}");
        drop(response);
        let started = Instant::now();
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            server.post("/v1/completions", json!({"model": "base", "prompt": "Hello", "max_tokens": 2, "temperature": 0})),
        )
        .await
        .expect("the slot was not freed: the abandoned generation went on");
        assert_eq!(next.0, StatusCode::OK, "{}", next.1);
        assert!(started.elapsed().as_secs_f64() < 5.0);
        if max_rows > 0 {
            let steps = server.metric("adapters_batch_rows_count").await;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            assert_eq!(server.metric("adapters_batch_rows_count").await, steps, "the decoding loop still steps the abandoned story");
        }
    }
}

/// Continuous batching: concurrent generations with different adapters (a PEFT LoRA, a
/// Pfeiffer adapter, the base), prompts and lengths decode together, one token each per
/// step, and each gets the text (and usage) it gets from a server without batching (greedy).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generations_with_different_adapters_decode_in_one_batch() {
    let dir = scratch("decode-batch");
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
    store.push(&fixtures().join("interop/peft_lora_smollm2/adapter"), &"smol-lora".parse().unwrap(), PushOptions::default()).await.unwrap();
    let smol =
        || adapters_models::load(&adapters_models::fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap(), &candle_core::Device::Cpu).unwrap();
    let model = smol();
    adapters_testkit::register_all();
    use adapters_core::InsertionPoint;
    let info = model.backbone.model_info();
    let pfeiffer = adapters_core::registry::build("seq_bn", &json!({}), &Default::default(), &info, &candle_core::Device::Cpu, 3).unwrap();
    let fingerprint = model.backbone.fingerprint().unwrap();
    adapters_core::io::save(&dir.join("pfeiffer"), "pfeiffer", pfeiffer.as_ref(), &Default::default(), &fingerprint).unwrap();
    store.push(&dir.join("pfeiffer"), &"smol-pfeiffer".parse().unwrap(), PushOptions::default()).await.unwrap();
    let requests = [
        ("/v1/completions", json!({"model": "base", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0})),
        ("/v1/completions", json!({"model": "smol-lora", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0})),
        (
            "/v1/chat/completions",
            json!({"model": "smol-pfeiffer", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 9, "temperature": 0}),
        ),
        ("/v1/completions", json!({"model": "smol-lora", "prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0})),
    ];
    let mut answers = Vec::new();
    for max_rows in [0, 8] {
        let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
        let batching = adapters_serve::Batching { max_rows, ..Default::default() };
        let server = Server::start_with(smol(), store, Config { max_concurrent: 1, batching, ..config(&dir) }).await;
        for (path, body) in &requests {
            assert_eq!(server.post(path, body.clone()).await.0, StatusCode::OK, "{body}");
        }
        let (steps, rows, models) = (
            server.metric("adapters_batch_rows_count").await,
            server.metric("adapters_batch_rows_sum").await,
            server.metric("adapters_batch_models_sum").await,
        );
        let bodies = futures::future::join_all(requests.iter().map(|(path, body)| server.post(path, body.clone()))).await;
        for (status, body) in &bodies {
            assert_eq!(*status, StatusCode::OK, "{body}");
        }
        if max_rows > 0 {
            let steps = server.metric("adapters_batch_rows_count").await - steps;
            let rows = server.metric("adapters_batch_rows_sum").await - rows;
            let models = server.metric("adapters_batch_models_sum").await - models;
            // 34 tokens (the first of each from its prompt): far fewer steps than tokens.
            assert!(rows / steps > 2.0, "{rows} sequence-steps in {steps} steps");
            assert!(models / steps > 2.0, "{models} models in {steps} steps");
        }
        answers.push(bodies);
    }
    for ((alone, batched), (_, request)) in answers[0].iter().zip(&answers[1]).zip(&requests) {
        let (a, b) = (&alone.1["choices"][0], &batched.1["choices"][0]);
        assert_eq!(a, b, "{request}: alone {a} but batched {b}");
        assert_eq!(alone.1["usage"], batched.1["usage"], "{request}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ab_route_splits_traffic_by_weight_and_says_which_variant_served() {
    let dir = scratch("ab");
    let server = Server::start(local_store(&dir).await, config(&dir)).await;
    let route = json!({"name": "spam-ab", "variants": [{"adapter": "sms@prod", "weight": 1.0}, {"adapter": "vader", "weight": 1.0}]});
    let (status, body) = server.post("/admin/routes", route).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server.post("/admin/routes", json!({"name": "bad", "variants": [{"adapter": "sms", "weight": -1.0}]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..24 {
        let (status, body) = server.post("/v1/embeddings", json!({"model": "spam-ab", "input": "hi", "user": format!("user-{i}")})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["route"]["name"], "spam-ab");
        let variant = body["route"]["variant"].as_str().unwrap();
        assert!(body["model"].as_str().unwrap().starts_with(variant.split('@').next().unwrap()), "{body}");
        *served.entry(variant.to_string()).or_default() += 1;
        // The same user stays on the same variant.
        let (_, again) = server.post("/v1/embeddings", json!({"model": "spam-ab", "input": "hi", "user": format!("user-{i}")})).await;
        assert_eq!(again["route"]["variant"], variant);
    }
    assert_eq!(served.len(), 2, "both variants serve: {served:?}");
    assert!(served.values().all(|&n| n >= 4), "{served:?}");
    // Removing the route: the name is an unknown adapter again.
    server.post("/admin/routes", json!({"name": "spam-ab", "variants": []})).await;
    assert_eq!(server.post("/v1/embeddings", json!({"model": "spam-ab", "input": "hi"})).await.0, StatusCode::NOT_FOUND);
}

/// Every metric the Grafana dashboard in deploy/ queries is one the server exports (after
/// traffic that loads, hits and evicts adapters: families without samples are not shown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_exported_metrics() {
    let dir = scratch("dashboard");
    let one_slot = Config { limits: Limits { max_adapters: 1, max_bytes: u64::MAX }, ..config(&dir) };
    let server = Server::start(local_store(&dir).await, one_slot).await;
    for model in ["sms", "trec", "trec"] {
        assert_eq!(server.post("/v1/classify", json!({"model": model, "input": "hi"})).await.0, StatusCode::OK);
    }
    let exported = reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap();
    let dashboard = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana-dashboard.json")).unwrap();
    let mut names: Vec<&str> =
        dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("adapters_")).collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let family = name.strip_suffix("_total").or_else(|| name.strip_suffix("_bucket")).unwrap_or(name);
        assert!(exported.contains(&format!("# TYPE {family} ")), "the dashboard queries {name}, which /metrics does not export");
    }
}

/// A setup bundle in `dir/bundle`: the SMS spam and TREC adapters stacked, each with its head.
fn stacked_bundle(dir: &Path) -> (PathBuf, adapters_core::Setup) {
    let bundle = dir.join("bundle");
    for member in ["sms_spam", "trec_coarse"] {
        let from = fixtures().join("fusion-sources").join(member);
        let to = bundle.join(member);
        std::fs::create_dir_all(to.join("heads").join(member)).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
        for e in std::fs::read_dir(from.join("heads").join(member)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join("heads").join(member).join(e.file_name())).unwrap();
        }
    }
    let setup = adapters_core::Setup::stack(&["sms_spam".to_string(), "trec_coarse".to_string()]);
    setup.save(&bundle).unwrap();
    (bundle, setup)
}

/// A stored setup (two adapters stacked, each with its head) is served like an adapter:
/// `task` picks the head, and the answer matches the same setup loaded from folders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_setup_is_served_like_an_adapter() {
    let dir = scratch("setup");
    let (bundle, setup) = stacked_bundle(&dir);
    adapters_testkit::register_all();
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
    store.push(&bundle, &"stacked".parse().unwrap(), PushOptions::default()).await.unwrap();
    let server = Server::start(store, config(&dir)).await;
    let (status, body) =
        server.post("/v1/classify", json!({"model": "stacked", "input": "Who wrote Hamlet?", "task": "trec_coarse"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["task"], "trec_coarse");
    let (status, body) = server.post("/v1/classify", json!({"model": "stacked", "input": "Who wrote Hamlet?"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "two heads and no task: {body}");
    // The stacked setup's embedding equals the same stack loaded from the folders.
    let (_, served) = server.post("/v1/embeddings", json!({"model": "stacked", "input": "Who wrote Hamlet?"})).await;
    let mut direct = adapters_models::load(&adapters_models::fetched("all-MiniLM-L6-v2").unwrap(), &candle_core::Device::Cpu).unwrap();
    for member in ["sms_spam", "trec_coarse"] {
        direct.backbone.load_adapter(&bundle.join(member), Some(member)).unwrap();
    }
    adapters_models::HoldsAdapters::adapters_mut(&mut direct.backbone).set_setup(Some(setup)).unwrap();
    let (vectors, _) = adapters_models::sentence_embeddings(
        &direct.backbone,
        &direct.tokenizer,
        &["Who wrote Hamlet?".to_string()],
        adapters_models::MAX_BATCH_TOKENS,
    )
    .unwrap();
    let served: Vec<f32> = served["data"][0]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let d = served.iter().zip(&vectors[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(d < 1e-6, "served and direct embeddings differ by {d}");
}

/// Whether two JSON values are equal, numbers within `tol`.
fn close(a: &Value, b: &Value, tol: f64) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= tol,
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| close(x, y, tol)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w, tol))),
        _ => a == b,
    }
}

/// A mixture-of-experts adapter folder in `dir/moe` (4 experts, random weights).
fn mixture_folder(dir: &Path) -> PathBuf {
    use adapters_core::InsertionPoint;
    let model = adapters_models::load(&adapters_models::fetched("all-MiniLM-L6-v2").unwrap(), &candle_core::Device::Cpu).unwrap();
    let info = model.backbone.model_info();
    let placement = adapters_core::Placement::default();
    let moe = adapters_core::registry::build("moe_bn", &json!({"experts": 4}), &placement, &info, &candle_core::Device::Cpu, 3).unwrap();
    let mut init = adapters_core::Init::new(4);
    for (_, v) in moe.vars() {
        v.set(&init.normal(v.shape(), 0.05, &candle_core::Device::Cpu).unwrap()).unwrap();
    }
    let out = dir.join("moe");
    adapters_core::io::save(&out, "moe", moe.as_ref(), &placement, &model.backbone.fingerprint().unwrap()).unwrap();
    out
}

/// Requests that wait together run as one forward pass even when they use different
/// adapters (three Pfeiffer adapters with heads, a PEFT LoRA, an AdapterHub parallel
/// adapter, the base model, a mixture of experts, and a stored setup; the mixture and the
/// setup run as groups of their own): each answer equals the answer of a server that runs
/// every request alone. Under a small token budget the same requests run in several
/// batches, each sorted by length into forwards of bounded padding (a request of a short
/// and a long text splits across two forwards), with the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_for_different_adapters_run_as_one_batch() {
    let dir = scratch("batching");
    let store = local_store(&dir).await;
    let (bundle, _) = stacked_bundle(&dir);
    store.push(&bundle, &"stacked".parse().unwrap(), PushOptions::default()).await.unwrap();
    for (name, folder) in [("lora", "interop/peft_lora_minilm/adapter"), ("parallel", "interop/adapterhub_par_bn_minilm/adapter")] {
        store.push(&fixtures().join(folder), &name.parse().unwrap(), PushOptions::default()).await.unwrap();
    }
    store.push(&mixture_folder(&dir), &"moe".parse().unwrap(), PushOptions::default()).await.unwrap();
    let requests = [
        ("/v1/classify", json!({"model": "sms", "input": ["free entry to win a prize, text WIN now", "are we meeting at six?"]})),
        ("/v1/classify", json!({"model": "trec", "input": "Who wrote Hamlet?"})),
        ("/v1/embeddings", json!({"model": "vader", "input": "what a lovely day :)"})),
        (
            "/v1/embeddings",
            json!({"model": "vader", "input": ["hi", "the committee met for six hours on tuesday and, after a long argument about the budget, agreed to postpone every decision until the spring"]}),
        ),
        ("/v1/embeddings", json!({"model": "lora", "input": ["a quiet evening", "the results are in, and they look good"]})),
        ("/v1/embeddings", json!({"model": "parallel", "input": "the results are in"})),
        ("/v1/embeddings", json!({"model": "base", "input": "a quiet evening"})),
        ("/v1/embeddings", json!({"model": "moe", "input": ["free entry to win", "see you at six then"]})),
        ("/v1/classify", json!({"model": "stacked", "input": "Who wrote Hamlet?", "task": "trec_coarse"})),
        ("/v1/classify", json!({"model": "sms", "input": "call now to claim your reward"})),
    ];
    let mut answers = Vec::new();
    let budget = |max_batch_tokens| adapters_serve::Batching {
        max_rows: 64,
        max_batch_tokens,
        max_wait: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let runs = [adapters_serve::Batching { max_rows: 0, ..budget(16384) }, budget(16384), budget(48)];
    for batching in runs {
        let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
        let server = Server::start(store, Config { batching, max_concurrent: 1, ..config(&dir) }).await;
        // Every adapter resident first, so that loading does not split the batch.
        for (path, body) in &requests {
            assert_eq!(server.post(path, body.clone()).await.0, StatusCode::OK, "{body}");
        }
        let forwards = server.metric("adapters_batch_rows_count").await;
        let batches = server.metric("adapters_batch_models_count").await;
        let models = server.metric("adapters_batch_models_sum").await;
        let bodies = futures::future::join_all(requests.iter().map(|(path, body)| server.post(path, body.clone()))).await;
        for (status, body) in &bodies {
            assert_eq!(*status, StatusCode::OK, "{body}");
        }
        let forwards = server.metric("adapters_batch_rows_count").await - forwards;
        let batches = server.metric("adapters_batch_models_count").await - batches;
        let models = server.metric("adapters_batch_models_sum").await - models;
        if batching.max_rows == 0 {
            assert_eq!(batches, requests.len() as f64, "without batching every request runs alone");
        } else if batching.max_batch_tokens == 16384 {
            assert_eq!(batches, 1.0, "{} requests took {batches} batches", requests.len());
            // Eight models in the one batch.
            assert_eq!(models, 8.0);
        } else {
            assert!(batches > 1.0, "the 48-token budget splits the requests into batches");
            assert!(
                forwards > batches,
                "the short and the long text of one request run in forwards of their own ({forwards} forwards, {batches} batches)"
            );
        }
        answers.push(bodies);
    }
    for ((alone, batched), (_, request)) in answers[0].iter().zip(&answers[1]).zip(&requests) {
        assert!(close(&alone.1, &batched.1, 1e-5), "{request}: alone {} but batched {}", alone.1, batched.1);
    }
}

/// Past `--max-concurrent-requests`, or past the waiting-token budget, a request gets 503
/// with Retry-After at once; one larger than the whole budget gets 413. Every answer is a
/// 200 or one of those.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_at_once_with_retry_after() {
    let dir = scratch("overload");
    let admission = adapters_serve::admission::Limits { max_requests: 3, max_waiting_tokens: 600, ..Default::default() };
    let server = Server::start(local_store(&dir).await, Config { max_concurrent: 1, admission, ..config(&dir) }).await;
    let client = reqwest::Client::new();
    let send = |body: Value| {
        let (client, url) = (client.clone(), server.url.clone());
        async move {
            let started = Instant::now();
            let r = client.post(format!("{url}/v1/embeddings")).json(&body).send().await.unwrap();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (r.status(), retry, started.elapsed().as_secs_f64(), r.json::<Value>().await.unwrap())
        }
    };
    // Twelve at once against three places in flight.
    let answers = futures::future::join_all((0..12).map(|_| send(json!({"model": "base", "input": texts(20, 8)})))).await;
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == StatusCode::SERVICE_UNAVAILABLE).collect();
    assert!(answers.iter().all(|a| a.0 == StatusCode::OK || a.0 == StatusCode::SERVICE_UNAVAILABLE), "{answers:?}");
    assert!(refused.len() >= 6, "{} of 12 refused", refused.len());
    for (_, retry, seconds, body) in &refused {
        assert_eq!(retry.as_deref(), Some("1"), "{body}");
        assert!(*seconds < 1.0, "a refusal took {seconds} s");
        assert!(body["error"]["message"].as_str().unwrap().contains("--max-concurrent-requests"), "{body}");
    }
    assert!(server.metric(r#"adapters_refused_total{cause="requests"}"#).await >= 6.0);
    // One request larger than the waiting-token budget on its own.
    let (status, _, _, body) = send(json!({"model": "base", "input": texts(40, 20)})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--max-waiting-tokens"), "{body}");
    // Several of about 250 tokens against a budget of 600 waiting tokens (three in flight).
    // How many wait together, and so are refused, depends on how fast this machine
    // computes them (the budget's arithmetic is the admission unit test's); the refusals
    // counted are those the clients saw (the 413 above is not a refusal for load).
    let mut seen = refused.len();
    for n in [3, 9] {
        let answers = futures::future::join_all((0..n).map(|_| send(json!({"model": "base", "input": texts(25, 10)})))).await;
        assert!(answers.iter().all(|a| a.0 == StatusCode::OK || a.0 == StatusCode::SERVICE_UNAVAILABLE), "{answers:?}");
        seen += answers.iter().filter(|a| a.0 == StatusCode::SERVICE_UNAVAILABLE).count();
        for (_, retry, _, body) in answers.iter().filter(|a| a.0 == StatusCode::SERVICE_UNAVAILABLE) {
            assert_eq!(retry.as_deref(), Some("1"), "{body}");
            assert!(body["error"]["message"].as_str().unwrap().contains("--max-"), "refused for load: {body}");
        }
    }
    assert_eq!(server.metric_sum("adapters_refused_total").await, seen as f64, "every refusal counted once, by its cause");
    assert_eq!(server.metric("adapters_requests_in_flight").await, 0.0, "every place was given back");
}

/// A request still waiting at its deadline gets 503; work whose client has gone, or whose
/// deadline has passed, is dropped before it is computed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_hold_and_abandoned_work_is_never_computed() {
    let dir = scratch("deadline");
    let admission = adapters_serve::admission::Limits { request_timeout: std::time::Duration::from_secs(2), ..Default::default() };
    let batching = adapters_serve::Batching { max_rows: 64, ..Default::default() };
    let server = Server::start(local_store(&dir).await, Config { max_concurrent: 1, admission, batching, ..config(&dir) }).await;
    // A blocker that holds the only compute slot for seconds.
    let url = server.url.clone();
    let blocker = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/embeddings"))
            .json(&json!({"model": "base", "input": texts(64, 400)}))
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // A client that gives up after 200 ms, and one that waits.
    let impatient = reqwest::Client::builder().timeout(std::time::Duration::from_millis(200)).build().unwrap();
    assert!(impatient.post(format!("{}/v1/embeddings", server.url)).json(&json!({"model": "base", "input": "gone"})).send().await.is_err());
    let started = Instant::now();
    let (status, body) = server.post("/v1/embeddings", json!({"model": "base", "input": "waits"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--request-timeout"), "{body}");
    assert!(started.elapsed().as_secs_f64() < 3.0, "the deadline did not hold: {:?}", started.elapsed());
    assert_eq!(blocker.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE, "the blocker passed its own deadline too");
    // Once the slot frees, both queued requests are dropped, not computed.
    let mut dropped = 0.0;
    for _ in 0..100 {
        dropped = server.metric("adapters_dropped_total").await;
        if dropped >= 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(dropped, 2.0);
    assert_eq!(server.metric("adapters_batch_rows_count").await, 1.0, "only the blocker's batch ran");
    // And the server serves normally again.
    assert_eq!(server.post("/v1/embeddings", json!({"model": "base", "input": "hello"})).await.0, StatusCode::OK);
}

/// Texts longer than the context are cut to it (or refused with `truncate: false`); a
/// generation whose prompt and `max_tokens` pass the context or the KV budget is a 400
/// before it is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_long_inputs_are_truncated_or_refused_before_they_are_queued() {
    let dir = scratch("too-long");
    let server = Server::start(local_store(&dir).await, config(&dir)).await;
    let long = "all work and no play makes a dull model ".repeat(200);
    for (path, model) in [("/v1/embeddings", "base"), ("/v1/classify", "sms")] {
        let (status, body) = server.post(path, json!({"model": model, "input": [long.clone(), "short"]})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // all-MiniLM-L6-v2's tokenizer.json cuts texts at 128 tokens (its context is 512).
        assert_eq!(body["usage"]["prompt_tokens"].as_u64().unwrap(), 128 + 3, "the long text was cut to what the model reads");
        let (status, body) = server.post(path, json!({"model": model, "input": ["short", long.clone()], "truncate": false})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("`input[1]`") && message.contains("the 128 tokens this model reads"), "{message}");
    }
    let server = {
        drop(server);
        let admission = adapters_serve::admission::Limits { max_kv_tokens: Some(64), ..Default::default() };
        Server::start_with(smol(), Store::open(dir.join("store").to_str().unwrap()).unwrap(), Config { admission, ..config(&dir) }).await
    };
    let huge = "one two three four five six seven ".repeat(1200);
    let (status, body) = server.post("/v1/completions", json!({"model": "base", "prompt": huge, "max_tokens": 2000})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("context of 8192"), "{body}");
    let (status, body) = server.post("/v1/completions", json!({"model": "base", "prompt": "Hello", "max_tokens": 100})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--max-kv-tokens"), "{body}");
    // Two that fit the budget only one at a time: both finish, one after the other.
    let both = futures::future::join_all(
        (0..2).map(|_| server.post("/v1/completions", json!({"model": "base", "prompt": "1, 2, 3,", "max_tokens": 40, "temperature": 0}))),
    )
    .await;
    for (status, body) in &both {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    assert_eq!(both[0].1["choices"], both[1].1["choices"]);
    assert!(server.metric("adapters_kv_tokens").await <= 64.0);
    assert_eq!(server.metric(r#"adapters_refused_total"#).await, 0.0, "waiting for KV room is not a refusal");
}

/// SIGTERM's path: `/ready` turns 503 at once while requests are still served for the
/// drain period; then no new connection is accepted, and a stream still open at the
/// shutdown timeout ends with a final event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_then_stops_accepting_and_ends_open_streams() {
    let dir = scratch("drain-stream");
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
    let drain = std::time::Duration::from_millis(1500);
    let cfg = Config { drain, shutdown_timeout: std::time::Duration::from_secs(1), ..config(&dir) };
    let mut server = Server::start_with(smol(), store, cfg).await;
    let request = json!({"model": "base", "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "stream": true});
    let mut stream = reqwest::Client::new().post(format!("{}/v1/completions", server.url)).json(&request).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut events = String::from_utf8_lossy(&stream.chunk().await.unwrap().unwrap()).into_owned();
    let stopped_at = Instant::now();
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Draining: not ready, alive, and still serving.
    assert_eq!(reqwest::get(format!("{}/ready", server.url)).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reqwest::get(format!("{}/health", server.url)).await.unwrap().status(), StatusCode::OK);
    let (status, body) = server.post("/v1/completions", json!({"model": "base", "prompt": "Hi", "max_tokens": 3, "temperature": 0})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The open stream ends with a last event once the shutdown timeout passes.
    while let Some(chunk) = stream.chunk().await.unwrap() {
        events += &String::from_utf8_lossy(&chunk);
    }
    let ended = stopped_at.elapsed();
    assert!(
        events.contains("event: error") && events.contains("shutting down") && events.trim_end().ends_with("data: [DONE]"),
        "{}",
        &events[events.len().saturating_sub(400)..]
    );
    assert!(ended > drain && ended.as_secs_f64() < 6.0, "the stream ended {ended:?} after the signal");
    server.task.await.unwrap().unwrap();
    assert!(reqwest::get(format!("{}/health", server.url)).await.is_err(), "stopped accepting");
}
