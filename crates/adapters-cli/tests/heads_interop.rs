//! Classification heads across formats, against the fixtures of
//! `fixtures/interop/heads/make_heads.py`: AdapterHub 1.3.0 prediction heads and PEFT
//! 0.21.2 `SEQ_CLS` classifiers load with their adapter and predict the logits those
//! libraries computed; `predict`, `eval` and `convert` serve them; what `convert` writes
//! is byte for byte what those libraries loaded and checked.

use adapters_core::ForwardCtx;
use adapters_models::heads::pooled;
use adapters_models::saved_heads::{self, SavedHead};
use adapters_models::{HoldsAdapters, LoadedModel};
use adapters_testkit::{fixtures, json_rows, max_diff_rows, minilm, scratch, smollm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn cases() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("interop/heads/cases.json")).unwrap()).unwrap()
}

fn load_model(base: &str) -> LoadedModel {
    adapters_families::link();
    let path = if base == "minilm" { minilm() } else { smollm() };
    adapters_models::load(&path, &candle_core::Device::Cpu).unwrap()
}

/// The fixture's sentences for `base`, as token ids.
fn sentences(all: &Value, base: &str) -> Vec<Vec<u32>> {
    let key = if base == "minilm" { "sentences" } else { "smollm2_sentences" };
    all[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["input_ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect())
        .collect()
}

/// The adapter of `dir` attached and active, and the one head it carries.
fn adapter_and_head(model: &mut LoadedModel, dir: &Path) -> Result<SavedHead, String> {
    let name = model.backbone.load_adapter(dir, None).map_err(|e| e.to_string())?;
    model.backbone.adapters_mut().activate(&[name.as_str()]).map_err(|e| e.to_string())?;
    let mut heads = saved_heads::load_all(dir, &model.backbone).map_err(|e| e.to_string())?;
    assert_eq!(heads.len(), 1, "{}: one head", dir.display());
    Ok(heads.remove(0))
}

/// Each sentence alone, as the fixtures ran them.
fn logits(model: &LoadedModel, head: &SavedHead, ids: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let ctx = ForwardCtx::inference();
    ids.iter()
        .map(|row| {
            let features = pooled(&model.backbone, &[row.as_slice()], head.config.pooling, &ctx).unwrap();
            head.head.forward(&features, 0.0, &ctx).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
        })
        .collect()
}

#[test]
fn adapterhub_and_peft_heads_predict_what_those_libraries_predict() {
    let all = cases();
    let (mut supported, mut refused) = (0, 0);
    for case in all["cases"].as_array().unwrap() {
        let (name, base) = (case["name"].as_str().unwrap(), case["model"].as_str().unwrap());
        let mut model = load_model(base);
        let loaded = adapter_and_head(&mut model, &fixtures().join("interop/heads").join(name));
        if let Some(field) = case["refused"].as_str() {
            let err = loaded.err().unwrap_or_else(|| panic!("{name}: loaded, but {} refuses it", case["library"]));
            assert!(err.contains(field), "{name}: the error does not name `{field}`: {err}");
            refused += 1;
            continue;
        }
        let head = loaded.unwrap_or_else(|e| panic!("{name}: {e}"));
        let labels: Vec<String> = case["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect();
        assert_eq!(head.config.labels, labels, "{name}");
        let got = logits(&model, &head, &sentences(&all, base));
        // The decoder's values reach about 10 through 30 layers: the same relative error.
        let tolerance = if base == "minilm" { 1e-5 } else { 1e-4 };
        let diff = max_diff_rows(&got, &json_rows(&case["logits"]));
        assert!(diff <= tolerance, "{name}: logits {diff} away from {}'s", case["library"]);
        supported += 1;
    }
    assert_eq!((supported, refused), (12, 3));
}

fn adapters(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_adapters")).current_dir(dir).args(args).output().unwrap()
}

fn ok(args: &[&str], dir: &Path) -> String {
    let out = adapters(args, dir);
    assert!(out.status.success(), "adapters {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha(path: PathBuf) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))))
}

/// `convert` writes the files AdapterHub and PEFT loaded and checked (the script's
/// `reverse`), straight and through our own layout.
#[test]
fn converted_heads_are_the_ones_adapterhub_and_peft_checked() {
    let all = cases();
    let reverse = all["reverse"].as_array().unwrap();
    assert_eq!(reverse.len(), 11);
    let models = minilm().parent().unwrap().to_path_buf();
    let tmp = scratch("heads-reverse");
    for entry in reverse {
        let (name, format) = (entry["name"].as_str().unwrap(), entry["format"].as_str().unwrap());
        assert_eq!(entry["max_diff"].as_f64().unwrap(), 0.0, "{name}: {format} computed {} away from its own folder", entry["max_diff"]);
        let model = if name.starts_with("smollm2") { "SmolLM2-135M-Instruct.Q4_1.gguf" } else { "all-MiniLM-L6-v2" };
        let source = fixtures().join("interop/heads").join(name);
        // As the script ran it, from the models folder: the files record `--model` as given.
        let straight = tmp.join(format!("{name}-straight"));
        let ours = tmp.join(format!("{name}-ours"));
        let back = tmp.join(format!("{name}-back"));
        let p = |x: &PathBuf| x.to_str().unwrap().to_string();
        ok(&["convert", &p(&source), "--model", model, "--format", format, "--out", &p(&straight)], &models);
        ok(&["convert", &p(&source), "--model", model, "--format", "native", "--out", &p(&ours)], &models);
        ok(&["convert", &p(&ours), "--model", model, "--format", format, "--out", &p(&back)], &models);
        for (file, expected) in entry["files"].as_object().unwrap() {
            for out in [&straight, &back] {
                assert_eq!(&sha(out.join(file)), expected, "{name}: {} differs from the {format} file checked", out.join(file).display());
            }
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// `predict` and `eval` use an AdapterHub head as they use ours: its labels, its logits.
#[test]
fn predict_and_eval_serve_an_adapterhub_head() {
    let all = cases();
    let case = all["cases"].as_array().unwrap().iter().find(|c| c["name"] == "ah_head_default").unwrap();
    let dir = fixtures().join("interop/heads/ah_head_default");
    let tmp = scratch("heads-predict");
    let m = minilm();
    let texts: Vec<&str> = all["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap()).collect();
    let args = [&["predict", m.to_str().unwrap(), "--adapter", dir.to_str().unwrap(), "--json"][..], &texts].concat();
    let preds: Value = serde_json::from_str(&ok(&args, &tmp)).unwrap();
    let expected = json_rows(&case["logits"]);
    for (p, logits) in preds.as_array().unwrap().iter().zip(&expected) {
        let best = if logits[1] > logits[0] { "spam" } else { "ham" };
        assert_eq!(p["label"], best, "{p}");
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((p["scores"]["spam"].as_f64().unwrap() as f32 - logits[1].exp() / z).abs() < 1e-5, "{p}");
    }
    // The labels AdapterHub predicts, as data: eval scores them all right.
    let data = tmp.join("data.jsonl");
    let rows: Vec<String> = texts
        .iter()
        .zip(&expected)
        .map(|(t, l)| serde_json::json!({"text": t, "label": if l[1] > l[0] { "spam" } else { "ham" }}).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let eval: Value = serde_json::from_str(&ok(
        &["eval", m.to_str().unwrap(), "--adapter", dir.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"],
        &tmp,
    ))
    .unwrap();
    assert_eq!((eval["examples"].as_u64(), eval["accuracy"].as_f64()), (Some(3), Some(1.0)), "{eval}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// A head trained here in AdapterHub's shape (two layers, tanh, the first token) converts
/// to AdapterHub's layout and back and predicts the same; one pooled by mean is refused by
/// name (AdapterHub has no such head), `--head` picks one of several, `--no-heads` leaves
/// them out.
#[test]
fn trained_heads_convert_when_the_target_computes_them() {
    let tmp = scratch("heads-trained");
    let data = adapters_testkit::workspace().join("data/sms_spam/train.jsonl");
    let rows: String =
        std::fs::read_to_string(&data).expect("run `cargo xtask fetch` first").lines().take(32).map(|l| format!("{l}\n")).collect();
    let train = tmp.join("train.jsonl");
    std::fs::write(&train, rows).unwrap();
    let m = minilm();
    let task = |name: &str, extra: &str| format!("[[task]]\nname = {name:?}\ntype = \"classification\"\ntrain = {train:?}\n{extra}\n");
    let config = format!(
        "[model]\npath = {m:?}\nmax_length = 32\n[adapters.pf]\nkind = \"seq_bn\"\nreduction_factor = 32\n{}{}\
         [training]\nbatch_size = 16\nsteps = 2\nlr = 1e-2\n[output]\ndir = {:?}\n",
        task("ah_shaped", "pooling = \"cls\"\nhead_layers = 2"),
        task("mean_pooled", ""),
        tmp.join("run"),
    );
    std::fs::write(tmp.join("run.toml"), config).unwrap();
    let p = |x: PathBuf| x.to_str().unwrap().to_string();
    ok(&["train", &p(tmp.join("run.toml"))], &tmp);
    let trained = p(tmp.join("run/adapters/pf"));
    let convert = |extra: &[&str], out: &str| {
        adapters(
            &[&["convert", &trained, "--model", m.to_str().unwrap(), "--format", "adapterhub", "--out", &p(tmp.join(out))][..], extra]
                .concat(),
            &tmp,
        )
    };
    let err = String::from_utf8_lossy(&convert(&[], "all").stderr).into_owned();
    assert!(err.contains("ah_shaped") && err.contains("mean_pooled") && err.contains("--head"), "{err}");
    let err = String::from_utf8_lossy(&convert(&["--head", "mean_pooled"], "mean").stderr).into_owned();
    assert!(err.contains("pools by Mean") && err.contains("--no-heads"), "{err}");
    assert!(convert(&["--no-heads"], "bare").status.success());
    assert!(!tmp.join("bare/head_config.json").exists());
    let out = convert(&["--head", "ah_shaped"], "ah");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("with_head=True"));
    let head: Value = serde_json::from_slice(&std::fs::read(tmp.join("ah/head_config.json")).unwrap()).unwrap();
    assert_eq!((head["config"]["layers"].as_u64(), head["config"]["activation_function"].as_str()), (Some(2), Some("tanh")));
    // The same predictions from the trained folder and from AdapterHub's layout.
    let predict = |dir: &str, task: &str| {
        ok(&["predict", m.to_str().unwrap(), "--adapter", dir, "--task", task, "--json", "WIN a free prize now"], &tmp)
    };
    assert_eq!(predict(&trained, "ah_shaped"), predict(&p(tmp.join("ah")), "ah_shaped"));
    std::fs::remove_dir_all(&tmp).ok();
}
