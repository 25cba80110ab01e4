//! The path a contributor takes: a kind in a crate that no list in the workspace names,
//! linked by its own binary, is listed by `adapters kinds`, works on the real MiniLM,
//! saves and loads, is trained from TOML by the trainer and served over HTTP.

use adapters_core::{io, registry, InsertionPoint};
use adapters_models::HoldsAdapters;
use adapters_testkit::{minilm, scratch, workspace};
use candle_core::Device;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adapters-with-scale-shift"));
    c.env_remove("ADAPTERS_ADMIN_TOKEN").env_remove("ADAPTERS_STORE");
    c
}

fn ok(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kind_is_listed_beside_the_shipped_families() {
    let kinds = ok(binary().arg("kinds"));
    let line = kinds.lines().find(|l| l.starts_with("scale_shift")).unwrap_or_else(|| panic!("not listed:\n{kinds}"));
    assert!(line.contains("adapters-scale-shift"), "{line}");
    assert!(kinds.contains("init_std"), "its field is documented:\n{kinds}");
    for shipped in ["seq_bn", "lora", "fusion", "moe_bn", "hyper_bn"] {
        assert!(kinds.lines().any(|l| l.starts_with(shipped)), "{shipped} missing:\n{kinds}");
    }
}

/// On the real MiniLM: the identity init leaves every embedding as it was, a random init
/// changes them, and the saved folder loads back (through the registry, checked against
/// the model's fingerprint) computing the same embeddings.
#[test]
fn on_minilm_identity_at_init_and_saved_folders_load_back() {
    adapters_scale_shift::family();
    let dir = scratch("folder");
    let mut loaded = adapters_models::load(&minilm(), &Device::Cpu).unwrap();
    let texts = ["free prize, call now".to_string(), "see you at six".to_string()];
    let embed = |loaded: &adapters_models::LoadedModel| -> Vec<f32> {
        adapters_models::sentence_embeddings(&loaded.backbone, &loaded.tokenizer, &texts, adapters_models::MAX_BATCH_TOKENS)
            .unwrap()
            .0
            .concat()
    };
    let bare = embed(&loaded);
    let info = loaded.backbone.model_info();
    let placement = Default::default();
    for (name, init_std) in [("identity", 0.0), ("random", 0.1)] {
        let config = serde_json::json!({ "init_std": init_std });
        let adapter = registry::build("scale_shift", &config, &placement, &info, &Device::Cpu, 5).unwrap();
        assert_eq!(adapter.points().len(), 2 * info.num_layers, "attention and FFN output of every layer");
        loaded.backbone.adapters_mut().add(name, adapter).unwrap();
        loaded.backbone.adapters_mut().activate(&[name]).unwrap();
        let with = embed(&loaded);
        assert_eq!(with.len(), bare.len());
        let diff = with.iter().zip(&bare).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if init_std == 0.0 {
            assert!(diff < 1e-6, "the identity init changed the embeddings by {diff}");
        } else {
            assert!(diff > 1e-3, "a random init left the embeddings as they were ({diff})");
            let folder = dir.join(name);
            let saved = loaded.backbone.adapters().get(name).unwrap().clone();
            io::save(&folder, name, saved.as_ref(), &placement, &loaded.backbone.fingerprint().unwrap()).unwrap();
            let back = io::load(&folder, &loaded.backbone, &Device::Cpu).unwrap();
            assert_eq!((back.name.as_str(), back.adapter.kind()), (name, "scale_shift"));
            let mut fresh = adapters_models::load(&minilm(), &Device::Cpu).unwrap();
            fresh.backbone.adapters_mut().add(name, back.adapter).unwrap();
            fresh.backbone.adapters_mut().activate(&[name]).unwrap();
            let again = embed(&fresh);
            assert_eq!(again.len(), with.len());
            assert!(again.iter().zip(&with).all(|(a, b)| (a - b).abs() < 1e-6), "the loaded adapter computes otherwise");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn first_lines(src: &Path, n: usize, dst: &Path) {
    let text = std::fs::read_to_string(src).expect("run `cargo xtask fetch` first");
    std::fs::write(dst, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// Trained by `train` from the example TOML with the kind swapped in, then served: the
/// server's classification of a text is what `predict` says for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trained_from_toml_and_served() {
    let dir = scratch("train");
    let data = workspace().join("data/sms_spam");
    let (train, test) = (dir.join("train.jsonl"), dir.join("test.jsonl"));
    first_lines(&data.join("train.jsonl"), 64, &train);
    first_lines(&data.join("test.jsonl"), 32, &test);
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let run = dir.join("run");
    let stdout = ok(binary()
        .arg("train")
        .arg(workspace().join("examples/sms_spam.toml"))
        .args(["--set", &format!("model.path={}", q(&minilm()))])
        .args(["--set", "adapters.sms_spam={kind=\"scale_shift\"}"])
        .args([
            "--set",
            &format!("task=[{{name=\"sms_spam\", type=\"classification\", train={}, dev={}, test={}}}]", q(&train), q(&train), q(&test)),
        ])
        .args(["--set", "training.steps=4", "--set", "training.batch_size=16"])
        .args(["--set", &format!("output.dir={}", q(&run))]));
    assert!(stdout.contains("sms_spam: test accuracy"), "{stdout}");
    let folder = run.join("adapters/sms_spam");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["kind"], "scale_shift", "{config}");

    let text = "WINNER!! Claim your free prize now";
    let predicted: serde_json::Value =
        serde_json::from_str(&ok(binary().arg("predict").arg(minilm()).arg("--adapter").arg(&folder).args(["--json", text]))).unwrap();

    ok(binary().env("ADAPTERS_STORE", dir.join("store")).arg("push").arg(&folder).args(["--name", "ssf"]));
    let mut server = binary()
        .env("ADAPTERS_STORE", dir.join("store"))
        .env("ADAPTERS_CACHE", dir.join("cache"))
        .arg("serve")
        .arg(minilm())
        .args(["--port", "0", "--drain-seconds", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/classify"))
        .json(&serde_json::json!({"model": "ssf", "input": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let served: serde_json::Value = response.json().await.unwrap();
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    server.wait().unwrap();

    let (served, predicted) = (&served["data"][0]["scores"], &predicted[0]["scores"]);
    let (served, predicted) = (served.as_object().unwrap(), predicted.as_object().unwrap());
    assert_eq!(served.len(), predicted.len(), "{served:?} vs {predicted:?}");
    for (label, p) in predicted {
        let s = served.get(label).unwrap_or_else(|| panic!("served scores lack {label}: {served:?}"));
        assert!((s.as_f64().unwrap() - p.as_f64().unwrap()).abs() < 1e-4, "{label}: served {s}, predicted {p}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
