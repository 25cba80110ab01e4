//! Fuzzed request bodies for every POST endpoint of the real server (`adapters serve`'s
//! router on 127.0.0.1, real MiniLM weights, adapters from the repository's fixtures in a
//! local library): every request gets an answer (a handler that panicked would drop the
//! connection), none is a 500 (bad input is the client's error), and the server keeps
//! answering `/health`.

use adapters_fuzz::fuzz;
use adapters_serve::{AppState, Config};
use adapters_store::{PushOptions, Store};
use std::path::PathBuf;
use std::sync::Arc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn every_endpoint_answers_fuzzed_bodies() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = std::env::temp_dir().join(format!("adapters-fuzz-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (url, stop) = runtime.block_on(async {
        let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
        for (name, folder) in [("sms", "fusion-sources/sms_spam"), ("trec", "fusion-sources/trec_coarse")] {
            let tags = vec!["prod".parse().unwrap()];
            store.push(&fixtures().join(folder), &name.parse().unwrap(), PushOptions { tags, ..Default::default() }).await.unwrap();
        }
        let model = adapters_models::load(&adapters_models::fetched("all-MiniLM-L6-v2").unwrap(), &candle_core::Device::Cpu).unwrap();
        let config = Config { cache_dir: dir.join("cache"), max_inputs: 16, ..Default::default() };
        let state = Arc::new(AppState::new(model, store, config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(adapters_serve::serve(listener, state, async {
            let _ = stopped.await;
        }));
        (url, stop)
    });
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build().unwrap();
    let endpoints: &[(&str, &[&str])] = &[
        ("/v1/embeddings", &[r#"{"model": "base", "input": "a quiet evening"}"#, r#"{"model": "sms@prod", "input": ["hi", "win cash"]}"#]),
        (
            "/v1/classify",
            &[
                r#"{"model": "sms", "input": "win cash now"}"#,
                r#"{"model": "trec@prod", "input": ["Who wrote Hamlet?"], "task": "trec_coarse"}"#,
            ],
        ),
        ("/v1/completions", &[r#"{"model": "base", "prompt": "Hello", "max_tokens": 2, "temperature": 0}"#]),
        ("/v1/chat/completions", &[r#"{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#]),
        ("/admin/adapters/load", &[r#"{"adapter": "sms@prod"}"#]),
        ("/admin/adapters/unload", &[r#"{"adapter": "trec"}"#]),
        ("/admin/adapters/pin", &[r#"{"adapter": "sms", "pinned": true}"#]),
        ("/admin/tags", &[r#"{"adapter": "sms@prod", "tag": "canary"}"#]),
        ("/admin/routes", &[r#"{"name": "spam-ab", "variants": [{"adapter": "sms", "weight": 0.5}, {"adapter": "trec", "weight": 0.5}]}"#]),
    ];
    for (path, seeds) in endpoints {
        let seeds: Vec<Vec<u8>> = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
        fuzz(&format!("POST {path}"), &seeds, |body| {
            runtime.block_on(async {
                let response = client
                    .post(format!("{url}{path}"))
                    .header("content-type", "application/json")
                    .body(body.to_vec())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("no answer to a request body: {e}"));
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                assert!(status.as_u16() != 500, "500 for a request body: {text}");
            });
        });
        let health = runtime.block_on(async { client.get(format!("{url}/health")).send().await.map(|r| r.status()) });
        assert_eq!(health.ok().map(|s| s.as_u16()), Some(200), "the server still answers after {path}");
    }
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}
