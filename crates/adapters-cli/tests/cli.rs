//! The `adapters` binary, run as a user would, on the real models.

use adapters_testkit::workspace;
use std::process::{Command, Output};

fn model(name: &str) -> String {
    let path = workspace().join("models").join(name);
    assert!(path.exists(), "{} is missing: run `cargo xtask fetch` first", path.display());
    path.to_string_lossy().into_owned()
}

fn adapters(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_adapters")).args(args).output().unwrap()
}

fn stdout_ok(args: &[&str]) -> String {
    let out = adapters(args);
    assert!(out.status.success(), "adapters {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail: exit code 1, an `error:` line containing `needle`, no panic.
fn fails_with(args: &[&str], needle: &str) {
    let out = adapters(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "adapters {args:?}: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "adapters {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn golden(name: &str) -> serde_json::Value {
    let path = workspace().join("fixtures/golden").join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn embed_json_matches_the_reference_embeddings() {
    let g = golden("minilm.json");
    let sentences: Vec<&str> = g["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap()).collect();
    let mut args = vec!["embed", "--json"];
    let m = model("all-MiniLM-L6-v2");
    args.push(&m);
    args.extend(&sentences);
    let got: Vec<Vec<f32>> = serde_json::from_str(&stdout_ok(&args)).unwrap();
    assert_eq!(got.len(), sentences.len());
    for (v, s) in got.iter().zip(g["sentences"].as_array().unwrap()) {
        let want = s["embedding"].as_array().unwrap();
        let d = v.iter().zip(want).map(|(a, b)| (a - b.as_f64().unwrap() as f32).abs()).fold(0.0, f32::max);
        assert!(d <= 1e-4, "{:?}: {d}", s["text"]);
    }
}

#[test]
fn logits_json_gives_the_reference_top_tokens() {
    let g = golden("smollm2.json");
    let p = &g["prompts"][0];
    let out = stdout_ok(&["logits", &model("SmolLM2-135M-Instruct.Q4_1.gguf"), p["text"].as_str().unwrap(), "--top", "5", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 5);
    for (row, want) in rows.iter().zip(p["last_position_logits"]["top20"].as_array().unwrap()) {
        assert_eq!(row["id"], want[0]);
        let (got, want) = (row["logit"].as_f64().unwrap(), want[1].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0));
    }
}

#[test]
fn generate_streams_the_greedy_continuation() {
    let g = golden("smollm2.json");
    let p = &g["prompts"][0];
    let out =
        stdout_ok(&["generate", &model("SmolLM2-135M-Instruct.Q4_1.gguf"), p["text"].as_str().unwrap(), "--greedy", "--max-tokens", "20"]);
    assert_eq!(out.trim_end_matches('\n'), p["greedy_continuation"]["text"].as_str().unwrap().trim_end_matches('\n'));
    let chat = stdout_ok(&[
        "generate",
        &model("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "What is the capital of France?",
        "--chat",
        "--greedy",
        "--max-tokens",
        "30",
    ]);
    assert!(chat.contains("Paris"), "{chat}");
}

#[test]
fn info_and_kinds_describe_what_is_there() {
    let out = stdout_ok(&["info", &model("all-MiniLM-L6-v2"), "--json"]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["architecture"], "bert");
    // 8 points per layer, and the pooler's projection on the last; then the sites of the
    // families to come: a key/value prefix and a layer output per layer, the input embeddings.
    assert_eq!(info["insertion_points"].as_array().unwrap().len(), 6 * 8 + 1 + 6 * 2 + 1);
    let out = stdout_ok(&["info", &model("SmolLM2-135M-Instruct.Q4_1.gguf")]);
    assert!(out.contains("llama") && out.contains("tied") && out.contains("ffn_gate"), "{out}");
    // Every architecture by its model_type; Phi-3's fused projections as their own sites.
    let fixture = |name: &str| workspace().join("fixtures/architectures").join(name).to_string_lossy().into_owned();
    let out = stdout_ok(&["info", &fixture("phi3")]);
    assert!(out.contains("architecture  phi3") && out.contains("query_key_value") && out.contains("ffn_gate_up"), "{out}");
    let out = stdout_ok(&["info", &format!("{}/model.q4_0.gguf", fixture("gemma3"))]);
    assert!(out.contains("architecture  gemma3_text"), "{out}");
    let out = stdout_ok(&["info", &fixture("distilbert")]);
    assert!(out.contains("architecture  distilbert"), "{out}");
    stdout_ok(&["kinds"]);
}

#[test]
fn bad_models_and_inputs_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_string_lossy().into_owned();
    fails_with(&["info", "/no/such/model"], "does not exist");
    fails_with(&["info", &d], "config.json");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    fails_with(&["info", &d], "config.json: not valid JSON");
    let minilm = workspace().join("models/all-MiniLM-L6-v2");
    std::fs::copy(minilm.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(minilm.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    fails_with(&["info", &d], "model.safetensors");
    let bytes = std::fs::read(minilm.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&["info", &d], "model.safetensors: not a readable safetensors file");
    let gguf = std::fs::read(model("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &gguf[..gguf.len() / 3]).unwrap();
    fails_with(&["info", &cut.to_string_lossy()], "cut.gguf");
    fails_with(&["generate", &model("all-MiniLM-L6-v2"), "hello"], "encoder");
    fails_with(&["generate", &model("SmolLM2-135M-Instruct.Q4_1.gguf"), ""], "empty");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--adapter NAME=DIR`, `--fusion DIR` and `--setup` on AdapterHub's fusion reference: the
/// embeddings AdapterHub computed with `Fuse(sentiment, topic)` and with
/// `Average(sentiment, topic, weights=[0.7, 0.3])`.
#[test]
fn embed_with_a_fusion_setup_matches_adapterhub() {
    let reference = workspace().join("fixtures/interop/adapterhub_fusion_minilm");
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(reference.join("expected.json")).unwrap()).unwrap();
    let sentences: Vec<&str> = expected["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap()).collect();
    let m = model("all-MiniLM-L6-v2");
    let dir = |p: &str| reference.join(p).to_string_lossy().into_owned();
    let (sentiment, topic, fusion) =
        (format!("sentiment={}", dir("adapters/sentiment")), format!("topic={}", dir("adapters/topic")), dir("fusion"));
    for (setup, key) in [("fuse(sentiment, topic)", "fuse"), ("average(sentiment, topic; weights=0.7, 0.3)", "average")] {
        let mut args = vec!["embed", "--json", &m, "--adapter", &sentiment, "--adapter", &topic, "--fusion", &fusion, "--setup", setup];
        args.extend(&sentences);
        let got: Vec<Vec<f32>> = serde_json::from_str(&stdout_ok(&args)).unwrap();
        for (v, want) in got.iter().zip(expected["expected"][key].as_array().unwrap()) {
            let d = v.iter().zip(want.as_array().unwrap()).map(|(a, b)| (a - b.as_f64().unwrap() as f32).abs()).fold(0.0, f32::max);
            assert!(d <= 1e-4, "{setup}: {d}");
        }
    }
    // Two adapters under one name, and a malformed setup, are errors that say what to do.
    let same = format!("sentiment={}", dir("adapters/topic"));
    fails_with(&["embed", &m, "--adapter", &sentiment, "--adapter", &same, "hi"], "already attached");
    fails_with(&["embed", &m, "--adapter", &sentiment, "--setup", "fuse(sentiment", "hi"], "expected `)`");
    fails_with(&["embed", &m, "--adapter", &sentiment, "--setup", "average(sentiment, fuse(a, b); weights=1, 1)", "hi"], "cannot nest");
}

/// `--quantize int8`: MiniLM's projections in 8 bits give sentence embeddings within cosine
/// 0.99 of f32 on held-out sentences (the first 32 of Rotten Tomatoes' and of TREC's test
/// splits), with and without an adapter (adapters stay f32); a decoder refuses the option.
#[test]
fn quantize_int8_keeps_embeddings_within_cosine_0_99() {
    let mut texts = Vec::new();
    for task in ["rotten_tomatoes", "trec_coarse"] {
        let path = workspace().join(format!("data/{task}/test.jsonl"));
        let lines = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask fetch`", path.display()));
        texts.extend(
            lines.lines().take(32).map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string()),
        );
    }
    let minilm = model("all-MiniLM-L6-v2");
    let adapter = workspace().join("fixtures/fusion-sources/rotten_tomatoes").to_string_lossy().into_owned();
    for extra in [vec![], vec!["--adapter", adapter.as_str()]] {
        let embed = |quantize: &[&str]| -> Vec<Vec<f32>> {
            let mut args = vec!["embed", minilm.as_str(), "--json"];
            args.extend(quantize);
            args.extend(&extra);
            args.extend(texts.iter().map(String::as_str));
            serde_json::from_str(&stdout_ok(&args)).unwrap()
        };
        let (exact, quantized) = (embed(&[]), embed(&["--quantize", "int8"]));
        assert_eq!(exact.len(), texts.len());
        let cosines: Vec<f32> = exact.iter().zip(&quantized).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum()).collect();
        let worst = cosines.iter().fold(1f32, |m, &c| m.min(c));
        assert!(worst >= 0.99, "{extra:?}: lowest cosine {worst} over {} sentences", texts.len());
        assert!(worst < 1.0 - 1e-6, "{extra:?}: 8-bit embeddings should differ from f32 ones");
    }
    fails_with(&["embed", &model("SmolLM2-135M-Instruct.Q4_1.gguf"), "--quantize", "int8", "hello"], "--quantize int8");
}
