//! Two `adapters serve` processes sharing one S3 store (an S3-compatible server the test
//! starts on 127.0.0.1): an adapter pushed once by `adapters push` is served by both, and
//! SIGTERM stops each one cleanly.

use adapters_testkit::{start_s3, workspace};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn adapters(endpoint: &str, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adapters"));
    c.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test-key")
        .env("AWS_SECRET_ACCESS_KEY", "test-secret")
        .env("AWS_REGION", "us-east-1")
        .env("ADAPTERS_STORE", "s3://adapters/shared")
        .env("ADAPTERS_CACHE", cache);
    c
}

/// Starts a server on a free port; returns it and its URL (from its first line).
fn serve(endpoint: &str, cache: &Path) -> (Child, String) {
    let model = adapters_models::fetched("all-MiniLM-L6-v2").unwrap();
    let mut child = adapters(endpoint, cache)
        .arg("serve")
        .arg(model)
        .args(["--port", "0", "--drain-seconds", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_serve_an_adapter_pushed_once_to_s3() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let endpoint = start_s3(&dir.join("s3")).await;
    let sms = workspace().join("fixtures/fusion-sources/sms_spam");
    let (endpoint2, cache) = (endpoint.clone(), dir.join("push-cache"));
    let pushed = tokio::task::spawn_blocking(move || {
        adapters(&endpoint2, &cache).args(["push"]).arg(sms).args(["--name", "sms", "--tag", "prod"]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    let (e1, e2, c1, c2) = (endpoint.clone(), endpoint.clone(), dir.join("cache-1"), dir.join("cache-2"));
    let (first, second) = tokio::task::spawn_blocking(move || (serve(&e1, &c1), serve(&e2, &c2))).await.unwrap();
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for (_, url) in [&first, &second] {
        let r = client
            .post(format!("{url}/v1/classify"))
            .json(&serde_json::json!({"model": "sms@prod", "input": "free prize, call now"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        answers.push(r.json::<serde_json::Value>().await.unwrap());
    }
    assert_eq!(answers[0], answers[1]);
    assert!(answers[0]["model"].as_str().unwrap().starts_with("sms@"));
    for (mut child, _) in [first, second] {
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
        assert!(status.success(), "a clean exit on SIGTERM, not {status}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `adapters serve MiniLM ARGS...` on a local folder store, stdout and stderr piped.
fn serve_locally(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    serve_model(dir, "all-MiniLM-L6-v2", args, env)
}

/// `adapters serve MODEL ARGS...` (a fetched model) on a local folder store.
fn serve_model(dir: &Path, model: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    let model = adapters_models::fetched(model).unwrap();
    Command::new(env!("CARGO_BIN_EXE_adapters"))
        .env_remove("ADAPTERS_ADMIN_TOKEN")
        .env("ADAPTERS_STORE", dir.join("store"))
        .env("ADAPTERS_CACHE", dir.join("cache"))
        .envs(env.iter().copied())
        .arg("serve")
        .arg(model)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The URL from a started server's first line, and a thread that returns its log lines
/// once it has exited.
fn started(child: &mut Child) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || std::io::BufReader::new(stderr).lines().map_while(Result::ok).collect());
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
    (url.replace("0.0.0.0", "127.0.0.1"), log)
}

/// Waits for the exit of a server expected to refuse to start; its stderr.
fn refused(mut child: Child) -> String {
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "started: {err}");
    err
}

fn stop(mut child: Child) {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();
}

async fn get_status(url: &str) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_is_locked_off_loopback_and_the_deploy_files_ship_no_token() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-admin-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Off loopback without a token: refused before the model loads, saying what to do.
    let err = refused(serve_locally(&dir, &["--host", "0.0.0.0", "--port", "0"], &[]));
    assert!(
        err.contains("refusing to listen on 0.0.0.0") && err.contains("ADAPTERS_ADMIN_TOKEN") && err.contains("--insecure-admin"),
        "{err}"
    );
    // An empty token is no token.
    let err = refused(serve_locally(&dir, &["--port", "0"], &[("ADAPTERS_ADMIN_TOKEN", "")]));
    assert!(err.contains("admin token is empty"), "{err}");
    let err = refused(serve_locally(&dir, &["--port", "0", "--admin-token", "  "], &[]));
    assert!(err.contains("admin token is empty"), "{err}");
    // The token never shows in --help, even when it is set.
    let help = Command::new(env!("CARGO_BIN_EXE_adapters"))
        .args(["serve", "--help"])
        .env("ADAPTERS_ADMIN_TOKEN", "hunter2-secret")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("ADAPTERS_ADMIN_TOKEN") && help.contains("--insecure-admin"), "{help}");
    assert!(!help.contains("hunter2-secret"), "the token leaks into --help:\n{help}");
    // --insecure-admin starts, and says so in the log.
    let mut child = serve_locally(&dir, &["--host", "0.0.0.0", "--port", "0", "--insecure-admin"], &[]);
    let (url, log) = started(&mut child);
    assert_eq!(get_status(&format!("{url}/health")).await, 200);
    stop(child);
    let log = log.join().unwrap();
    assert!(log.iter().any(|l| l.contains("WARN") && l.contains("--insecure-admin")), "{log:?}");

    // The image's own command (deploy/Dockerfile's ENTRYPOINT): refused without the
    // secret's token, served with it.
    let dockerfile = std::fs::read_to_string(workspace().join("deploy/Dockerfile")).unwrap();
    let entry = dockerfile.lines().find_map(|l| l.strip_prefix("ENTRYPOINT ")).expect("an ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry).unwrap();
    assert_eq!(&entry[..2], ["adapters", "serve"]);
    let mut args: Vec<&str> = entry[3..].iter().map(String::as_str).collect();
    let port = args.iter().position(|a| *a == "--port").unwrap() + 1;
    args[port] = "0";
    let err = refused(serve_locally(&dir, &args, &[]));
    assert!(err.contains("ADAPTERS_ADMIN_TOKEN"), "{err}");
    let mut child = serve_locally(&dir, &args, &[("ADAPTERS_ADMIN_TOKEN", "a-long-random-token")]);
    let (url, _) = started(&mut child);
    assert_eq!(get_status(&format!("{url}/ready")).await, 200);
    stop(child);
    // The manifest ships no secret value and reads the token from the operator's Secret.
    let manifest = std::fs::read_to_string(workspace().join("deploy/kubernetes.yaml")).unwrap();
    assert!(!manifest.contains("stringData") && !manifest.contains("change-me"), "a usable default secret ships in deploy/");
    assert!(manifest.contains("secretRef: { name: adapters-serve, optional: false }"));
    assert!(manifest.contains("kubectl create secret generic adapters-serve"), "the manifest says how to make its secret");
    // Its shutdown numbers fit together: the readiness probe notices the drain before it
    // ends, and the grace period outlasts drain + shutdown timeout + the streams' last events.
    let number_after = |key: &str| -> u64 {
        let rest = &manifest[manifest.find(key).unwrap_or_else(|| panic!("no {key}")) + key.len()..];
        rest.trim_start_matches(|c: char| !c.is_ascii_digit()).split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    let (drain, shutdown, grace) =
        (number_after("\"--drain-seconds\""), number_after("\"--shutdown-timeout\""), number_after("terminationGracePeriodSeconds:"));
    let (period, failures) = (number_after("periodSeconds:"), number_after("failureThreshold:"));
    assert!(period * failures < drain, "readiness notices after {period} x {failures} s, the drain lasts {drain} s");
    assert!(drain + shutdown + 2 < grace, "grace {grace} s for drain {drain} + shutdown {shutdown} + 2");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_call_leaves_an_audit_line_with_its_peer() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sms = workspace().join("fixtures/fusion-sources/sms_spam");
    let pushed = Command::new(env!("CARGO_BIN_EXE_adapters"))
        .env("ADAPTERS_STORE", dir.join("store"))
        .arg("push")
        .arg(sms)
        .args(["--name", "sms"])
        .output()
        .unwrap();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    let mut child = serve_locally(&dir, &["--port", "0"], &[("ADAPTERS_ADMIN_TOKEN", "the-admin-token")]);
    let (url, log) = started(&mut child);
    let client = reqwest::Client::new();
    let tag = |token: &'static str| {
        client
            .post(format!("{url}/admin/tags"))
            .bearer_auth(token)
            .header("x-forwarded-for", "203.0.113.9")
            .json(&serde_json::json!({"adapter": "sms", "tag": "prod"}))
            .send()
    };
    assert_eq!(tag("a-guess").await.unwrap().status(), reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(tag("the-admin-token").await.unwrap().status(), reqwest::StatusCode::OK);
    let pin = client
        .post(format!("{url}/admin/adapters/pin"))
        .bearer_auth("the-admin-token")
        .json(&serde_json::json!({"adapter": "sms@prod"}))
        .send()
        .await
        .unwrap();
    assert_eq!(pin.status(), reqwest::StatusCode::OK);
    stop(child);
    let log = log.join().unwrap();
    let audit: Vec<&String> = log.iter().filter(|l| l.contains("adapters_serve::audit")).collect();
    assert_eq!(audit.len(), 3, "one line per admin call: {log:#?}");
    assert!(
        audit[0].contains("action=\"tag\"")
            && audit[0].contains("status=401")
            && audit[0].contains("127.0.0.1")
            && audit[0].contains("203.0.113.9"),
        "{}",
        audit[0]
    );
    assert!(audit[1].contains("action=\"tag\"") && audit[1].contains("status=200") && audit[1].contains("sms@prod"), "{}", audit[1]);
    assert!(audit[2].contains("action=\"pin\"") && audit[2].contains("\"pinned\":true"), "{}", audit[2]);
    assert!(!log.iter().any(|l| l.contains("the-admin-token")), "the token reached the log");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `adapters push DIR --name NAME` into the local store of `dir`.
fn push(dir: &Path, folder: &Path, name: &str) {
    let pushed = Command::new(env!("CARGO_BIN_EXE_adapters"))
        .env("ADAPTERS_STORE", dir.join("store"))
        .arg("push")
        .arg(folder)
        .args(["--name", name])
        .output()
        .unwrap();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
}

async fn post(url: &str, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new().post(format!("{url}{path}")).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

async fn metric(url: &str, line_start: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(line_start)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Embedding and classification requests sent together (the batch waits 300 ms for more,
/// so they share one forward pass), one of them poisoned: it alone fails, with a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_request_fails_alone_in_its_embedding_and_classification_batches() {
    for mode in ["error", "panic"] {
        let dir = std::env::temp_dir().join(format!("adapters-cli-poison-{mode}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        push(&dir, &workspace().join("fixtures/fusion-sources/sms_spam"), "sms");
        push(&dir, &workspace().join("fixtures/fusion-sources/trec_coarse"), "trec");
        let fault = format!("{mode}:POISON-PILL");
        let mut child =
            serve_locally(&dir, &["--port", "0", "--batch-wait-ms", "300", "--drain-seconds", "0"], &[("ADAPTERS_SERVE_FAULT", &fault)]);
        let (url, log) = started(&mut child);
        for (path, model) in [("/v1/embeddings", "trec"), ("/v1/classify", "sms")] {
            let texts = ["free prize, call now", "see you at six", "this one is a POISON-PILL", "what is the capital of peru?"];
            // Alone, as the reference.
            let alone: Vec<_> = futures::future::join_all(
                texts.iter().filter(|t| !t.contains("POISON")).map(|t| post(&url, path, serde_json::json!({"model": model, "input": t}))),
            )
            .await;
            let failures = metric(&url, "adapters_isolated_failures_total").await;
            let together =
                futures::future::join_all(texts.iter().map(|t| post(&url, path, serde_json::json!({"model": model, "input": t})))).await;
            let mut good = alone.iter();
            for (text, (status, body)) in texts.iter().zip(&together) {
                if text.contains("POISON") {
                    assert_eq!(*status, 500, "{mode} {path}: {body}");
                    continue;
                }
                assert_eq!(*status, 200, "{mode} {path} {text}: {body}");
                let reference = &good.next().unwrap().1;
                let field = if path == "/v1/embeddings" { "embedding" } else { "scores" };
                let (a, b) = (&body["data"][0][field], &reference["data"][0][field]);
                let close = match (a, b) {
                    (serde_json::Value::Array(a), serde_json::Value::Array(b)) => {
                        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4)
                    }
                    (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                        a.len() == b.len() && a.iter().all(|(k, x)| (x.as_f64().unwrap() - b[k].as_f64().unwrap()).abs() < 1e-4)
                    }
                    _ => false,
                };
                assert!(close, "{mode} {path} {text}: batched {a} but alone {b}");
            }
            assert!(
                metric(&url, "adapters_isolated_failures_total").await > failures,
                "{mode} {path}: the poisoned request was not batched with the others"
            );
        }
        assert_eq!(get_status(&format!("{url}/ready")).await, 200);
        stop(child);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A generation whose decoding steps fail (an error, a panic) while other generations
/// decode in the same steps: it alone ends with a 500; the others finish with the text they
/// get alone. A panic of the decoding loop itself turns /ready to 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_generation_fails_alone_and_a_dead_decoding_loop_is_not_ready() {
    let smol = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let counting = serde_json::json!({"model": "base", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 40, "temperature": 0});
    for mode in ["error", "panic"] {
        let dir = std::env::temp_dir().join(format!("adapters-cli-poison-gen-{mode}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fault = format!("{mode}:POISON-PILL");
        let mut child =
            serve_model(&dir, smol, &["--port", "0", "--max-concurrent", "1", "--drain-seconds", "0"], &[("ADAPTERS_SERVE_FAULT", &fault)]);
        let (url, _log) = started(&mut child);
        let (status, alone) = post(&url, "/v1/completions", counting.clone()).await;
        assert_eq!(status, 200, "{alone}");
        let failures = metric(&url, "adapters_isolated_failures_total").await;
        let long = tokio::spawn({
            let (url, counting) = (url.clone(), counting.clone());
            async move { post(&url, "/v1/completions", counting).await }
        });
        // Joins the running generation's decoding steps once its own prompt ran.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (status, body) = post(
            &url,
            "/v1/completions",
            serde_json::json!({"model": "base", "prompt": "POISON-PILL says", "max_tokens": 20, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 500, "{mode}: {body}");
        let (status, body) = long.await.unwrap();
        assert_eq!(status, 200, "{mode}: {body}");
        assert_eq!(body["choices"][0]["text"], alone["choices"][0]["text"], "{mode}: the batch-mate's text changed");
        assert!(metric(&url, "adapters_isolated_failures_total").await > failures, "{mode}: the poisoned generation never shared a step");
        assert_eq!(get_status(&format!("{url}/ready")).await, 200);
        stop(child);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let dir = std::env::temp_dir().join(format!("adapters-cli-poison-loop-{}", std::process::id()));
    let mut child = serve_model(&dir, smol, &["--port", "0", "--drain-seconds", "0"], &[("ADAPTERS_SERVE_FAULT", "loop:POISON-PILL")]);
    let (url, _log) = started(&mut child);
    assert_eq!(get_status(&format!("{url}/ready")).await, 200);
    let (status, _) = post(&url, "/v1/completions", serde_json::json!({"model": "base", "prompt": "POISON-PILL", "max_tokens": 5})).await;
    assert_eq!(status, 500);
    assert_eq!(get_status(&format!("{url}/ready")).await, 503, "the decoding loop died but the replica says it is ready");
    assert_eq!(get_status(&format!("{url}/health")).await, 200, "the process itself still answers");
    let (status, body) = post(&url, "/v1/completions", serde_json::json!({"model": "base", "prompt": "hello", "max_tokens": 5})).await;
    assert_eq!(status, 500, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("not ready"), "{body}");
    stop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
