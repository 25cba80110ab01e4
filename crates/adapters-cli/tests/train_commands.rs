//! `adapters train`, `predict` and `eval`, run as a user would, on real data.

use adapters_testkit::workspace;
use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_adapters")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok(args: &[&str]) -> String {
    let (success, out, err) = run(args);
    assert!(success, "adapters {args:?}: {err}");
    out
}

fn first_lines(src: &Path, n: usize, dst: &Path) {
    let text = std::fs::read_to_string(src).expect("run `cargo xtask fetch` first");
    std::fs::write(dst, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// Train a short run from the example config (with overrides), then `predict` with the
/// saved adapter folder and `eval` on the test file: eval reproduces the trainer's test
/// accuracy exactly, so the saved adapter and head are the trained ones. The run renames
/// `ham` to `normal` (`label_map`): the head predicts `normal`, eval reads the file's `ham`.
#[test]
fn train_then_predict_and_eval_from_the_saved_folders() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = workspace().join("data/sms_spam");
    let (train, test) = (dir.join("train.jsonl"), dir.join("test.jsonl"));
    first_lines(&data.join("train.jsonl"), 64, &train);
    first_lines(&data.join("test.jsonl"), 40, &test);
    let model = adapters_models::fetched("all-MiniLM-L6-v2").unwrap();
    let out = dir.join("run");
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let stdout = ok(&[
        "train",
        workspace().join("examples/sms_spam.toml").to_str().unwrap(),
        "--set",
        &format!("model.path={}", q(&model)),
        "--set",
        &format!(
            "task=[{{name=\"sms_spam\", type=\"classification\", train={}, dev={}, test={}, label_map={{ham=\"normal\"}}}}]",
            q(&train),
            q(&train),
            q(&test)
        ),
        "--set",
        "training.steps=4",
        "--set",
        "training.batch_size=16",
        "--set",
        "training.early_stopping={metric=\"loss\", patience=1}",
        "--set",
        &format!("output.dir={}", q(&out)),
    ]);
    assert!(stdout.contains("sms_spam: test accuracy") && stdout.contains("trainable parameters"), "{stdout}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let adapter = out.join("adapters/sms_spam");
    let (m, a) = (model.to_str().unwrap(), adapter.to_str().unwrap());
    let eval: serde_json::Value =
        serde_json::from_str(&ok(&["eval", m, "--adapter", a, "--data", test.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(eval["examples"], 40);
    assert_eq!(eval["accuracy"], summary["tasks"]["sms_spam"]["test"]["accuracy"], "{eval} vs {summary}");
    // The studies read both through the types the trainer and the CLI write them with.
    let typed: adapters_train::records::Summary = serde_json::from_value(summary.clone()).unwrap();
    let report: adapters_train::records::EvalReport = serde_json::from_value(eval.clone()).unwrap();
    let adapters_train::records::EvalReport::Classification(report) = report else { panic!("not a classification: {eval}") };
    assert_eq!(Some(report.accuracy), typed.metric("sms_spam", adapters_train::records::Split::Test, "accuracy"));
    let preds: serde_json::Value =
        serde_json::from_str(&ok(&["predict", m, "--adapter", a, "--json", "WINNER!! Claim your free prize now", "see you at lunch"]))
            .unwrap();
    for p in preds.as_array().unwrap() {
        let scores = p["scores"].as_object().unwrap();
        assert_eq!(scores.len(), 2);
        assert!((scores.values().map(|v| v.as_f64().unwrap()).sum::<f64>() - 1.0).abs() < 1e-5);
        assert!(scores.contains_key(p["label"].as_str().unwrap()));
        assert!(scores.contains_key("normal") && scores.contains_key("spam"), "the head's labels are the renamed ones: {p}");
    }
    // Robustness: no noise is the clean score; an attack on the embeddings (a radius far
    // above the trained-for one) costs accuracy and is recorded; bad strengths are refused.
    let eval_with = |extra: &[&str]| -> serde_json::Value {
        let args = [&["eval", m, "--adapter", a, "--data", test.to_str().unwrap(), "--json"][..], extra].concat();
        serde_json::from_str(&ok(&args)).unwrap()
    };
    assert_eq!(eval_with(&["--char-noise", "0"])["accuracy"], eval["accuracy"]);
    let noisy = eval_with(&["--char-noise", "0.3", "--noise-seed", "4"]);
    assert_eq!(noisy["char_noise"], serde_json::json!({"rate": 0.3, "seed": 4}));
    assert_eq!(noisy, eval_with(&["--char-noise", "0.3", "--noise-seed", "4"]), "seeded: the same noise");
    let attacked = eval_with(&["--attack-epsilon", "0.5", "--attack-steps", "3"]);
    assert!(attacked["accuracy"].as_f64() < eval["accuracy"].as_f64(), "{attacked} vs {eval}");
    assert_eq!(attacked["attack"], serde_json::json!({"epsilon": 0.5, "steps": 3}));
    let (success, _, err) = run(&["eval", m, "--adapter", a, "--data", test.to_str().unwrap(), "--attack-epsilon", "-1"]);
    assert!(!success && err.contains("`--attack-epsilon` = -1"), "{err}");
    let (success, _, err) = run(&["eval", m, "--adapter", a, "--data", test.to_str().unwrap(), "--char-noise", "2"]);
    assert!(!success && err.contains("--char-noise 2"), "{err}");
    // Without the adapter there is no head to predict with; the error says where heads live.
    let (success, _, err) = run(&["predict", m, "hello"]);
    assert!(!success && err.contains("heads/TASK"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_configs_exit_with_the_key_named() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    let example = std::fs::read_to_string(workspace().join("examples/sms_spam.toml")).unwrap();
    std::fs::write(&cfg, example.replace("batch_size = 32", "batch_size = \"thirty-two\"")).unwrap();
    let (success, _, err) = run(&["train", cfg.to_str().unwrap()]);
    assert!(!success && err.contains("batch_size") && err.contains("bad.toml") && !err.contains("panicked"), "{err}");
    std::fs::write(&cfg, example.replace("[training]", "[training]\nlearning_rate = 0.1")).unwrap();
    let (success, _, err) = run(&["train", cfg.to_str().unwrap()]);
    assert!(!success && err.contains("learning_rate"), "{err}");
    std::fs::write(&cfg, example.replace("kind = \"seq_bn\"", "kind = \"seq_bn\"\nreduction = 4")).unwrap();
    let model = format!("model.path={:?}", adapters_models::fetched("all-MiniLM-L6-v2").unwrap().display().to_string());
    let (success, _, err) = run(&["train", cfg.to_str().unwrap(), "--set", &model]);
    assert!(!success && err.contains("adapters.sms_spam") && err.contains("reduction"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A hypernetwork trained briefly on two tasks: `eval --task` reproduces the trainer's test
/// accuracy, a 1/0 task mixture, the exported adapter and data rows carrying the task's
/// embedding as `conditioning` give the same, a mixture needs `--head`, and
/// `--conditioning` takes a vector of the task-embedding space.
#[test]
fn a_hypernetwork_evaluates_by_task_mixture_vector_and_export() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-hyper-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut tasks = Vec::new();
    for task in ["sms_spam", "trec_coarse"] {
        let (train, test) = (dir.join(format!("{task}-train.jsonl")), dir.join(format!("{task}-test.jsonl")));
        first_lines(&workspace().join(format!("data/{task}/train.jsonl")), 48, &train);
        first_lines(&workspace().join(format!("data/{task}/test.jsonl")), 30, &test);
        tasks.push(format!(
            "{{name=\"{task}\", type=\"classification\", train={}, dev={}, test={}, adapters=[\"hyper\"]}}",
            q(&train),
            q(&train),
            q(&test)
        ));
    }
    let model = adapters_models::fetched("all-MiniLM-L6-v2").unwrap();
    let out = dir.join("run");
    ok(&[
        "train",
        workspace().join("examples/hyper_multitask.toml").to_str().unwrap(),
        "--set",
        &format!("model.path={}", q(&model)),
        "--set",
        &format!("task=[{}]", tasks.join(", ")),
        "--set",
        "training.steps=4",
        "--set",
        "training.eval_every=4",
        "--set",
        &format!("output.dir={}", q(&out)),
    ]);
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let (m, hyper) = (model.to_str().unwrap(), out.join("adapters/hyper"));
    let h = hyper.to_str().unwrap();
    let test = dir.join("sms_spam-test.jsonl");
    let t = test.to_str().unwrap();
    let accuracy = |extra: &[&str]| -> f64 {
        let args = [&["eval", m, "--data", t, "--max-length", "64", "--json"][..], extra].concat();
        serde_json::from_str::<serde_json::Value>(&ok(&args)).unwrap()["accuracy"].as_f64().unwrap()
    };
    let trained = summary["tasks"]["sms_spam"]["test"]["accuracy"].as_f64().unwrap();
    assert_eq!(accuracy(&["--task", "sms_spam", "--adapter", h]), trained);
    assert_eq!(accuracy(&["--task", "sms_spam:1,trec_coarse:0", "--head", "sms_spam", "--adapter", h]), trained);
    let exported = dir.join("exported");
    ok(&["hyper-export", h, "--model", m, "--task", "sms_spam", "--out", exported.to_str().unwrap()]);
    assert_eq!(accuracy(&["--task", "sms_spam", "--adapter", exported.to_str().unwrap()]), trained);
    let zeros = format!("[{}]", vec!["0"; 64].join(","));
    accuracy(&["--conditioning", &zeros, "--head", "sms_spam", "--adapter", h]);
    // Each row of a JSONL file may carry its own vector: here the task's embedding.
    let table = adapters_core::io::read_tensors(&hyper.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let sms: Vec<f32> = table["hypernet.task_embeddings"].get(0).unwrap().to_vec1().unwrap();
    let rows: Vec<String> = std::fs::read_to_string(&test)
        .unwrap()
        .lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["conditioning"] = serde_json::json!(sms);
            row.to_string()
        })
        .collect();
    let with_vectors = dir.join("with-vectors.jsonl");
    std::fs::write(&with_vectors, rows.join("\n")).unwrap();
    let args = ["eval", m, "--data", with_vectors.to_str().unwrap(), "--head", "sms_spam", "--adapter", h, "--max-length", "64", "--json"];
    let by_rows: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(by_rows["accuracy"].as_f64().unwrap(), trained);
    std::fs::write(&with_vectors, format!("{}\n{}", rows[0], std::fs::read_to_string(&test).unwrap().lines().nth(1).unwrap())).unwrap();
    let (success, _, err) = run(&args);
    assert!(!success && err.contains(":2: this row has no `conditioning`"), "{err}");
    let (success, _, err) = run(&["eval", m, "--data", t, "--task", "sms_spam:0.5,trec_coarse:0.5", "--adapter", h]);
    assert!(!success && err.contains("--head"), "{err}");
    let (success, _, err) = run(&["eval", m, "--data", t, "--conditioning", "[1,2]", "--head", "sms_spam", "--adapter", h]);
    assert!(!success && err.contains("task_dim"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
