//! Two `adapters serve` processes sharing one S3 store (an S3-compatible server the test
//! starts on 127.0.0.1): an adapter pushed once by `adapters push` is served by both, and
//! SIGTERM stops each one cleanly.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// An S3-compatible server (s3s-fs) over `root` on a free port, with bucket `adapters`.
async fn start_s3(root: &Path) -> String {
    std::fs::create_dir_all(root.join("adapters")).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(s3s_fs::FileSystem::new(root).unwrap());
    builder.set_auth(s3s::auth::SimpleAuth::from_single("test-key", "test-secret"));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let conn = ConnBuilder::new(TokioExecutor::new()).serve_connection(TokioIo::new(socket), service.clone()).into_owned();
            tokio::spawn(conn);
        }
    });
    format!("http://{addr}")
}

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
        .args(["--port", "0"])
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
