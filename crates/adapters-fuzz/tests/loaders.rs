//! Fuzzed file readers: safetensors, GGUF, adapter folders in our, PEFT's and
//! AdapterHub's formats (and AdapterHub fusion folders), heads, adapter setups, TOML run
//! configs with `--set` overrides, and JSONL / CSV / text data. Every reader must answer
//! bad bytes with an error, never a panic (nor an allocation the input asked for).

use adapters_fuzz::fuzz;
use adapters_testkit::workspace;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

fn families() {
    adapters_testkit::register_all();
}

/// A scratch folder for one target, removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("adapters-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn minilm() -> adapters_models::LoadedModel {
    adapters_models::load(&adapters_models::fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    adapters_core::io::copy_dir(from, to).unwrap();
}

fn safetensors_bytes(tensors: &[(&str, Tensor)]) -> Vec<u8> {
    let dir = scratch("seed");
    let path = dir.0.join("seed.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn safetensors_reader() {
    let dev = Device::Cpu;
    let seeds = vec![
        safetensors_bytes(&[("a", Tensor::arange(0f32, 6.0, &dev).unwrap().reshape((2, 3)).unwrap())]),
        safetensors_bytes(&[
            ("w", Tensor::ones((3, 2), candle_core::DType::F16, &dev).unwrap()),
            ("b", Tensor::zeros(4, candle_core::DType::BF16, &dev).unwrap()),
            ("i", Tensor::new(&[1u32, 2, 3], &dev).unwrap()),
        ]),
    ];
    let dir = scratch("safetensors");
    let file = dir.0.join("x.safetensors");
    for seed in &seeds {
        std::fs::write(&file, seed).unwrap();
        adapters_core::io::read_tensors(&file, &dev).expect("every seed is a readable file");
    }
    fuzz("safetensors", &seeds, |bytes| {
        std::fs::write(&file, bytes).unwrap();
        let _ = adapters_core::io::read_tensors(&file, &dev);
    });
}

/// A tiny but complete Llama GGUF file: 1 layer, hidden 8, 2 heads, 6 tokens.
fn tiny_gguf() -> Vec<u8> {
    use gguf_file::Value;
    let dev = Device::Cpu;
    let t = |shape: &[usize], seed: f32| -> QTensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin() * 0.1).collect();
        QTensor::quantize(&Tensor::from_vec(values, shape, &dev).unwrap(), GgmlDType::F32).unwrap()
    };
    let tensors = [
        ("token_embd.weight", t(&[6, 8], 1.0)),
        ("output_norm.weight", t(&[8], 2.0)),
        ("blk.0.attn_norm.weight", t(&[8], 3.0)),
        ("blk.0.attn_q.weight", t(&[8, 8], 4.0)),
        ("blk.0.attn_k.weight", t(&[8, 8], 5.0)),
        ("blk.0.attn_v.weight", t(&[8, 8], 6.0)),
        ("blk.0.attn_output.weight", t(&[8, 8], 7.0)),
        ("blk.0.ffn_norm.weight", t(&[8], 8.0)),
        ("blk.0.ffn_gate.weight", t(&[16, 8], 9.0)),
        ("blk.0.ffn_up.weight", t(&[16, 8], 10.0)),
        ("blk.0.ffn_down.weight", t(&[8, 16], 11.0)),
    ];
    let tokens = Value::Array(["a", "b", "ab", "c", "<s>", "</s>"].iter().map(|s| Value::String(s.to_string())).collect());
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.feed_forward_length", Value::U32(16)),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into())])),
        ("tokenizer.ggml.bos_token_id", Value::U32(4)),
        ("tokenizer.ggml.eos_token_id", Value::U32(5)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts).unwrap();
    out.into_inner()
}

#[test]
fn gguf_reader() {
    let dir = scratch("gguf");
    let file = dir.0.join("model.gguf");
    let seed = tiny_gguf();
    std::fs::write(&file, &seed).unwrap();
    let loaded = adapters_models::load(&file, &Device::Cpu).expect("the seed is a loadable model");
    assert_eq!(adapters_core::InsertionPoint::model_info(&loaded.backbone).num_layers, 1);
    fuzz("gguf", &[seed], |bytes| {
        std::fs::write(&file, bytes).unwrap();
        let _ = adapters_models::load(&file, &Device::Cpu);
    });
}

/// An adapter folder whose config file is fuzzed (the weights stay the fixture's).
fn fuzz_folder(target: &str, fixture: &str, config_file: &str) {
    families();
    let model = minilm();
    let dir = scratch(target);
    let folder = dir.0.join("adapter");
    copy_dir(&workspace().join(fixture), &folder);
    let seed = std::fs::read(folder.join(config_file)).unwrap();
    adapters_core::io::load(&folder, &model.backbone, &Device::Cpu).expect("the fixture loads");
    fuzz(target, &[seed], |bytes| {
        std::fs::write(folder.join(config_file), bytes).unwrap();
        let _ = adapters_core::io::load(&folder, &model.backbone, &Device::Cpu);
    });
}

#[test]
fn adapter_config_ours() {
    fuzz_folder("adapter_config (ours)", "fixtures/fusion-sources/sms_spam", "adapter_config.json");
}

#[test]
fn adapter_config_peft() {
    fuzz_folder("adapter_config (PEFT)", "fixtures/interop/peft_lora_minilm/adapter", "adapter_config.json");
}

#[test]
fn adapter_config_adapterhub() {
    fuzz_folder("adapter_config (AdapterHub)", "fixtures/interop/adapterhub_seq_bn_minilm/adapter", "adapter_config.json");
}

#[test]
fn fusion_config_adapterhub() {
    fuzz_folder("adapter_fusion_config (AdapterHub)", "fixtures/interop/adapterhub_fusion_minilm/fusion", "adapter_fusion_config.json");
}

/// Adapter configs of every registered kind, built on MiniLM: sizes come from here.
#[test]
fn kind_configs() {
    families();
    let model = minilm();
    let info = adapters_core::InsertionPoint::model_info(&model.backbone);
    let seeds: Vec<Vec<u8>> = [
        r#"{"kind": "seq_bn", "config": {"reduction_factor": 16}}"#,
        r#"{"kind": "par_bn", "config": {"reduction_factor": 8, "scaling": 4.0}}"#,
        r#"{"kind": "lora", "config": {"r": 8, "alpha": 16, "rank_pattern": {"query": 4}}}"#,
        r#"{"kind": "ia3", "config": {}}"#,
        r#"{"kind": "moe_bn", "config": {"experts": 4, "top_k": 2, "reduction_factor": 16}}"#,
        r#"{"kind": "moe_lora", "config": {"experts": 8, "top_k": 1, "r": 4}}"#,
        r#"{"kind": "hyper_bn", "config": {"tasks": ["a", "b"], "reduction_factor": 16}}"#,
        r#"{"kind": "seq_bn", "config": {"reduction_factor": 16}, "placement": {"layers": [0, 1], "sizes": {"0": 8}}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // Every seed builds: a kind whose registration was lost fails here, not silently below.
    for seed in &seeds {
        let v: serde_json::Value = serde_json::from_slice(seed).unwrap();
        let placement =
            serde_json::from_value::<adapters_core::Placement>(v.get("placement").cloned().unwrap_or(serde_json::json!({}))).unwrap();
        adapters_core::registry::build(v["kind"].as_str().unwrap(), &v["config"], &placement, &info, &Device::Cpu, 0)
            .unwrap_or_else(|e| panic!("seed {v}: {e}"));
    }
    fuzz("adapter kind configs", &seeds, |bytes| {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else { return };
        let kind = v["kind"].as_str().unwrap_or_default();
        let Ok(placement) =
            serde_json::from_value::<adapters_core::Placement>(v.get("placement").cloned().unwrap_or(serde_json::json!({})))
        else {
            return;
        };
        let _ = adapters_core::registry::build(kind, &v["config"], &placement, &info, &Device::Cpu, 0);
    });
}

#[test]
fn head_folder() {
    let dir = scratch("head");
    let head = dir.0.join("head");
    copy_dir(&workspace().join("fixtures/fusion-sources/sms_spam/heads/sms_spam"), &head);
    let seed = std::fs::read(head.join("head_config.json")).unwrap();
    adapters_models::saved_heads::load(&head, &Device::Cpu).expect("the seed head loads");
    fuzz("head_config", &[seed], |bytes| {
        std::fs::write(head.join("head_config.json"), bytes).unwrap();
        let _ = adapters_models::saved_heads::load(&head, &Device::Cpu);
    });
}

#[test]
fn setups() {
    let texts = [
        "stack(a, b)",
        "stack(lang, fuse(a, b; fusion=ab))",
        "parallel(a, stack(b, c))",
        "average(a, b; weights=0.7, -0.3)",
        "batch_split(a, b; sizes=2, 3)",
        "split(a, b; splits=64, 64)",
    ];
    // Each setup as text and as the `adapter_setup.json` it is saved as.
    let seeds: Vec<Vec<u8>> =
        texts.iter().flat_map(|t| [t.as_bytes().to_vec(), t.parse::<adapters_core::Setup>().unwrap().to_json().into_bytes()]).collect();
    for seed in &seeds {
        let text = String::from_utf8_lossy(seed);
        let parsed = adapters_core::Setup::from_json(&text).is_ok() || text.parse::<adapters_core::Setup>().is_ok();
        assert!(parsed, "the seed {text} is a setup");
    }
    fuzz("adapter setups", &seeds, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let _ = adapters_core::Setup::from_json(&text);
        let _ = text.parse::<adapters_core::Setup>();
    });
}

#[test]
fn run_configs() {
    families();
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(workspace().join("examples"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "the examples are the seeds");
    for seed in &seeds {
        adapters_train::Config::parse(&String::from_utf8_lossy(seed), &[]).expect("every example config parses");
    }
    fuzz("TOML run configs", &seeds, |bytes| {
        let _ = adapters_train::Config::parse(&String::from_utf8_lossy(bytes), &[]);
    });
    let base = std::fs::read_to_string(workspace().join("examples/sms_spam.toml")).unwrap();
    let overrides: Vec<Vec<u8>> = [
        "training.lr=5e-4",
        "task.1.head=\"x\"",
        "adapters.sms_spam={kind=\"lora\", r=4}",
        "training.adversarial={epsilon=0.1, steps=2}",
        "output.dir=\"runs/x\"",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("--set overrides", &overrides, |bytes| {
        let _ = adapters_train::Config::parse(&base, &[String::from_utf8_lossy(bytes).into_owned()]);
    });
}

#[test]
fn data_files() {
    let text = std::fs::read_to_string(workspace().join("data/sms_spam/train.jsonl")).expect("run `cargo xtask fetch`");
    let jsonl: String = text.lines().take(12).map(|l| format!("{l}\n")).collect();
    let csv = "text,label\n\"Free entry, win now\",spam\nsee you at 6,ham\n\"quote \"\"inside\"\"\",ham\n".to_string();
    let chats = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n";
    let dir = scratch("data");
    let fields = |skip| adapters_train::data::Fields { text: "text".into(), label: "label".into(), skip_bad_rows: skip };
    fuzz("JSONL / CSV / text data", &[jsonl.into_bytes(), csv.into_bytes(), chats.as_bytes().to_vec()], |bytes| {
        for ext in ["jsonl", "csv", "txt"] {
            let path = dir.0.join(format!("data.{ext}"));
            std::fs::write(&path, bytes).unwrap();
            let _ = adapters_train::data::read_labelled(&path, &fields(false));
            let _ = adapters_train::data::read_labelled(&path, &fields(true));
            let _ = adapters_train::data::read_text(&path);
            let _ = adapters_train::data::read_chats(&path);
        }
    });
}
