//! `adapters kinds`, `new`, `inspect`, `merge`, `merge-experts`, `route` and `--adapter`,
//! run as a user would.

use adapters_testkit::{max_diff_values as max_diff, workspace};
use std::path::PathBuf;
use std::process::Command;

fn minilm() -> String {
    adapters_models::fetched("all-MiniLM-L6-v2").unwrap().to_string_lossy().into_owned()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_adapters")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok(args: &[&str]) -> String {
    let (success, out, err) = run(args);
    assert!(success, "adapters {args:?}: {err}");
    out
}

fn embedding(args: &[&str]) -> Vec<f32> {
    let v: Vec<Vec<f32>> = serde_json::from_str(&ok(args)).unwrap();
    v.into_iter().next().unwrap()
}

#[test]
fn kinds_lists_every_family() {
    let out = ok(&["kinds"]);
    for (kind, family) in [
        ("seq_bn", "adapters-bottleneck"),
        ("double_seq_bn", "adapters-bottleneck"),
        ("par_bn", "adapters-bottleneck"),
        ("lora", "adapters-lora"),
        ("ia3", "adapters-lora"),
        ("moe_bn", "adapters-moe"),
        ("moe_lora", "adapters-moe"),
    ] {
        assert!(out.lines().any(|l| l.starts_with(kind) && l.contains(family)), "{kind} missing:\n{out}");
    }
}

#[test]
fn new_inspect_embed_and_merge() {
    let m = minilm();
    let tmp = std::env::temp_dir().join(format!("cli-adapters-{}", std::process::id()));
    let dir = |n: &str| tmp.join(n).to_string_lossy().into_owned();
    let out = ok(&["new", "seq_bn", "--model", &m, "--out", &dir("pf"), "--set", "reduction_factor=8", "--set", "placement.leave_out=[0]"]);
    assert!(out.contains("5 points") && out.contains("186480 trainable parameters"), "{out}");
    ok(&[
        "new",
        "lora",
        "--model",
        &m,
        "--out",
        &dir("lora"),
        "--set",
        "r=4",
        "--set",
        "placement.sites=[\"query\",\"value\"]",
        "--format",
        "peft",
        "--seed",
        "3",
    ]);
    ok(&["new", "double_seq_bn", "--model", &m, "--out", &dir("hub"), "--format", "adapterhub"]);

    let out = ok(&["inspect", &dir("pf"), "--model", &m]);
    assert!(out.contains("seq_bn") && out.contains("fits model    yes") && out.contains("186480"), "{out}");
    let out = ok(&["inspect", &dir("hub")]);
    assert!(out.contains("adapterhub"), "{out}");
    let smollm = adapters_models::fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
    let out = ok(&["inspect", &dir("pf"), "--model", &smollm.to_string_lossy()]);
    assert!(out.contains("fits model    no") && out.contains("was made for the base model bert"), "{out}");

    // Several adapters stack; the interop LoRA folder loads as well.
    let peft = workspace().join("fixtures/interop/peft_lora_minilm/adapter").to_string_lossy().into_owned();
    let base = embedding(&["embed", &m, "adapters are small", "--json"]);
    let one = embedding(&["embed", &m, "adapters are small", "--json", "--adapter", &dir("pf")]);
    let two = embedding(&["embed", &m, "adapters are small", "--json", "--adapter", &dir("pf"), "--adapter", &peft]);
    assert!(max_diff(&base, &one) > 1e-4 && max_diff(&one, &two) > 1e-4);
    ok(&["embed", &m, "x", "--adapter", &dir("hub"), "--adapter", &dir("lora")]);

    // Merging the LoRA folder gives a model folder whose plain output is the adapted one.
    let with_lora = embedding(&["embed", &m, "adapters are small", "--json", "--adapter", &peft]);
    ok(&["merge", &m, "--adapter", &peft, "--out", &dir("merged")]);
    let merged = embedding(&["embed", &dir("merged"), "adapters are small", "--json"]);
    assert!(max_diff(&merged, &with_lora) <= 1e-5, "{}", max_diff(&merged, &with_lora));
    let (success, _, err) = run(&["merge", &m, "--adapter", &dir("pf"), "--out", &dir("merged2")]);
    assert!(!success && err.contains("cannot be merged"), "{err}");
    let (success, _, err) = run(&["new", "seq_bn", "--model", &m, "--out", &dir("pf")]);
    assert!(!success && err.contains("not empty"), "{err}");
    let (success, _, err) = run(&["new", "lora", "--model", &m, "--out", &dir("bad"), "--set", "rank=2"]);
    assert!(!success && err.contains("unknown field `rank`"), "{err}");
    let (success, _, err) = run(&["embed", &m, "x", "--adapter", &dir("nothing-here")]);
    assert!(!success && err.contains("nothing-here"), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// `adapters convert` rewrites PEFT, AdapterHub bottleneck and AdapterHub fusion folders in
/// other layouts; every converted folder gives the same embeddings as the original, and a
/// layout that cannot hold the kind is an error that leaves nothing behind.
#[test]
fn convert_round_trips_between_layouts() {
    let m = minilm();
    let interop = workspace().join("fixtures/interop");
    let tmp = std::env::temp_dir().join(format!("adapters-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    for (folder, other) in [("peft_lora_minilm/adapter", "peft"), ("adapterhub_seq_bn_minilm/adapter", "adapterhub")] {
        let original = path(&interop.join(folder));
        let want = embedding(&["embed", "--json", &m, "--adapter", &original, "a converted adapter"]);
        let native = tmp.join(format!("{other}-native"));
        let back = tmp.join(format!("{other}-back"));
        ok(&["convert", &original, "--model", &m, "--format", "native", "--out", &path(&native)]);
        let said = ok(&["convert", &path(&native), "--model", &m, "--format", other, "--out", &path(&back)]);
        let loads = match other {
            "peft" => format!("PeftModel.from_pretrained(model, \"{}\")", path(&back)),
            _ => format!("model.load_adapter(\"{}\", use_safetensors=True)", path(&back)),
        };
        assert!(said.contains(&loads), "convert tells a Python user how to load the folder: {said}");
        for dir in [&native, &back] {
            let got = embedding(&["embed", "--json", &m, "--adapter", &path(dir), "a converted adapter"]);
            assert!(max_diff(&got, &want) < 1e-6, "{}: {}", dir.display(), max_diff(&got, &want));
        }
    }
    // A fusion layer: AdapterHub's folder to ours and back, used with its members.
    let reference = interop.join("adapterhub_fusion_minilm");
    let members = [
        format!("sentiment={}", path(&reference.join("adapters/sentiment"))),
        format!("topic={}", path(&reference.join("adapters/topic"))),
    ];
    let fused = |fusion: &str| {
        embedding(&[
            "embed",
            "--json",
            &m,
            "--adapter",
            &members[0],
            "--adapter",
            &members[1],
            "--fusion",
            fusion,
            "--setup",
            "fuse(sentiment, topic)",
            "text",
        ])
    };
    let want = fused(&path(&reference.join("fusion")));
    let (native, back) = (tmp.join("fusion-native"), tmp.join("fusion-back"));
    ok(&["convert", &path(&reference.join("fusion")), "--model", &m, "--format", "native", "--out", &path(&native)]);
    let said = ok(&["convert", &path(&native), "--model", &m, "--format", "adapterhub", "--out", &path(&back)]);
    assert!(said.contains(&format!("model.load_adapter_fusion(\"{}\", use_safetensors=True)", path(&back))), "{said}");
    assert!(back.join("adapter_fusion_config.json").exists() && back.join("model_adapter_fusion.safetensors").exists());
    for dir in [&native, &back] {
        assert_eq!(max_diff(&fused(&path(dir)), &want), 0.0, "{}", dir.display());
    }
    // PEFT holds LoRA only: refused, and the target folder is not left half-written.
    let bad = tmp.join("bad");
    let (success, _, err) =
        run(&["convert", &path(&reference.join("adapters/topic")), "--model", &m, "--format", "peft", "--out", &path(&bad)]);
    assert!(!success && err.contains("error:"), "{err}");
    assert!(!bad.exists(), "a failed conversion leaves no folder");
    std::fs::remove_dir_all(&tmp).ok();
}

/// A fresh AdaMix-style mixture (three experts from one initialisation) averages its
/// experts' outputs in inference; `merge-experts` makes the plain Pfeiffer adapter of
/// their mean weights, which computes the same. `route` shows one expert per token.
#[test]
fn merge_experts_and_route() {
    let m = minilm();
    let tmp = std::env::temp_dir().join(format!("cli-moe-{}", std::process::id()));
    let dir = |n: &str| tmp.join(n).to_string_lossy().into_owned();
    let set = ["--set", "experts=3", "--set", "router=random", "--set", "shared_init=true", "--set", "reduction_factor=8"];
    ok(&[&["new", "moe_bn", "--model", &m, "--out", &dir("mix")], &set[..]].concat());
    let out = ok(&["merge-experts", &dir("mix"), "--model", &m, "--out", &dir("plain")]);
    assert!(out.contains("moe_bn experts' mean as a `seq_bn` adapter"), "{out}");
    assert!(ok(&["inspect", &dir("plain")]).contains("seq_bn"));
    let text = "Win a free cruise, text WIN now";
    let mixed = embedding(&["embed", &m, text, "--json", "--adapter", &dir("mix")]);
    let plain = embedding(&["embed", &m, text, "--json", "--adapter", &dir("plain")]);
    let base = embedding(&["embed", &m, text, "--json"]);
    assert!(max_diff(&mixed, &plain) < 1e-5, "{}", max_diff(&mixed, &plain));
    assert!(max_diff(&mixed, &base) > 1e-4);
    // Not a mixture, or an occupied target: refused, nothing written.
    let (success, _, err) = run(&["merge-experts", &dir("plain"), "--model", &m, "--out", &dir("again")]);
    assert!(!success && err.contains("merge-experts turns `moe_bn` or `moe_lora` mixtures"), "{err}");
    assert!(!tmp.join("again").exists());
    let (success, _, err) = run(&["merge-experts", &dir("mix"), "--model", &m, "--out", &dir("plain")]);
    assert!(!success && err.contains("not empty"), "{err}");

    ok(&["new", "moe_lora", "--model", &m, "--out", &dir("lora-mix"), "--set", "experts=4", "--set", "top_k=2"]);
    let routed: serde_json::Value = serde_json::from_str(&ok(&["route", &m, text, "--json", "--adapter", &dir("lora-mix")])).unwrap();
    let first = &routed[0];
    let tokens = first["tokens"].as_array().unwrap().len();
    let points = first["experts"].as_object().unwrap();
    assert_eq!(points.len(), 12, "query and value of 6 layers");
    for choices in points.values() {
        let choices = choices.as_array().unwrap();
        assert_eq!(choices.len(), tokens);
        assert!(choices.iter().all(|c| c.as_array().unwrap().len() == 2));
    }
    let table = ok(&["route", &m, text, "--adapter", &dir("lora-mix")]);
    assert!(table.contains("moe_lora layer 5 value"), "{table}");
    let (success, _, err) = run(&["route", &m, text, "--adapter", &dir("plain")]);
    assert!(!success && err.contains("no loaded adapter routes tokens"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn hyper_export_writes_the_generated_adapter() {
    let m = minilm();
    let tmp = std::env::temp_dir().join(format!("cli-hyper-{}", std::process::id()));
    let dir = |n: &str| tmp.join(n).to_string_lossy().into_owned();
    ok(&["new", "hyper_bn", "--model", &m, "--out", &dir("hyper"), "--set", r#"tasks=["spam","topic"]"#, "--seed", "3"]);
    let export = |task: &str, out: &str| ok(&["hyper-export", &dir("hyper"), "--model", &m, "--task", task, "--out", &dir(out)]);
    assert!(export("spam", "spam").contains("`seq_bn` adapter"));
    export("spam:1,topic:0", "spam-again");
    export("spam:0.5,topic:0.5", "half");
    let text = "Win a free cruise, text WIN now";
    let embed = |d: &str| embedding(&["embed", &m, text, "--json", "--adapter", &dir(d)]);
    let (spam, again, half) = (embed("spam"), embed("spam-again"), embed("half"));
    assert_eq!(max_diff(&spam, &again), 0.0, "weights 1 and 0 are the task exactly");
    assert!(max_diff(&spam, &half) > 0.0);
    // Unknown tasks, plain adapters and occupied targets are refused; nothing is written.
    let (success, _, err) = run(&["hyper-export", &dir("hyper"), "--model", &m, "--task", "imdb", "--out", &dir("x")]);
    assert!(!success && err.contains("no task `imdb`") && err.contains("spam, topic"), "{err}");
    let (success, _, err) = run(&["hyper-export", &dir("spam"), "--model", &m, "--task", "spam", "--out", &dir("x")]);
    assert!(!success && err.contains("hyper-export reads `hyper_bn`"), "{err}");
    assert!(!tmp.join("x").exists());
    let (success, _, err) = run(&["hyper-export", &dir("hyper"), "--model", &m, "--task", "spam", "--out", &dir("spam")]);
    assert!(!success && err.contains("not empty"), "{err}");
    // The hypernetwork itself needs to know the task.
    let (success, _, err) = run(&["embed", &m, text, "--adapter", &dir("hyper")]);
    assert!(!success && err.contains("--task"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The tensors of a saved adapter (our layout) or head, by name.
fn tensors(path: &std::path::Path) -> std::collections::HashMap<String, Vec<f32>> {
    let read = adapters_core::io::read_tensors(path, &candle_core::Device::Cpu).unwrap();
    read.into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

/// `average`: the new folder's weights and shared heads are the weighted sums of the
/// inputs' (a negative weight subtracts); a head not in every folder is left out and said
/// so; LoRA folders combine by PEFT's methods and write PEFT's layout; bad requests are
/// refused before anything is written.
#[test]
fn average_combines_adapters_and_their_heads() {
    use adapters_models::saved_heads::{save, HeadConfig};
    let dir = std::env::temp_dir().join(format!("adapters-cli-average-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = minilm();
    let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
    let p = |x: &PathBuf| x.to_str().unwrap().to_string();
    for (folder, seed) in [(&a, "1"), (&b, "2")] {
        ok(&["new", "seq_bn", "--model", &m, "--out", &p(folder), "--seed", seed, "--set", "init_weights=bert"]);
    }
    let config = |task: &str| HeadConfig {
        task: task.into(),
        kind: "classification".into(),
        labels: vec!["ham".into(), "spam".into()],
        pooling: adapters_train::config::Pooling::Mean,
        hidden_size: 384,
        adapters: vec!["a".into()],
        label_map: Default::default(),
        layers: 1,
        activation: None,
        bias: true,
    };
    for (folder, seed) in [(&a, 1), (&b, 2)] {
        save(
            folder,
            &config("sms"),
            &adapters_models::heads::ClassificationHead::new(384, 2, &Default::default(), seed, &candle_core::Device::Cpu).unwrap(),
        )
        .unwrap();
    }
    save(
        &a,
        &config("only_in_a"),
        &adapters_models::heads::ClassificationHead::new(384, 2, &Default::default(), 3, &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap();
    let out = ok(&["average", "--model", &m, "--adapter", &p(&a), "--adapter", &p(&b), "--weights", "0.75,-0.25", "--out", &p(&c)]);
    assert!(out.contains("linear of 2 `seq_bn` adapters") && out.contains("left out") && out.contains("only_in_a"), "{out}");
    for file in ["adapter_model.safetensors", "heads/sms/head.safetensors"] {
        let (ta, tb, tc) = (tensors(&a.join(file)), tensors(&b.join(file)), tensors(&c.join(file)));
        assert_eq!(ta.keys().collect::<std::collections::BTreeSet<_>>(), tc.keys().collect());
        for (name, va) in &ta {
            for ((x, y), z) in va.iter().zip(&tb[name]).zip(&tc[name]) {
                assert!((0.75 * x - 0.25 * y - z).abs() < 1e-6, "{file} {name}: {z} is not 0.75·{x} − 0.25·{y}");
            }
        }
    }
    assert!(!c.join("heads/only_in_a").exists());
    // Adapters of another form are refused with the differing field and both values.
    let other = dir.join("other");
    ok(&["new", "seq_bn", "--model", &m, "--out", &p(&other), "--set", "reduction_factor=8"]);
    let (success, _, err) = run(&["average", "--model", &m, "--adapter", &p(&a), "--adapter", &p(&other), "--out", &p(&dir.join("x"))]);
    assert!(!success && err.contains("field `reduction_factor`: 16.0 in adapter 1, 8.0 in adapter 2"), "{err}");

    // LoRA: PEFT's svd, written as a PEFT folder that loads.
    let inputs = workspace().join("fixtures/merging/inputs");
    let lora = dir.join("lora");
    let (one, two) = (p(&inputs.join("one")), p(&inputs.join("two")));
    ok(&[
        "average",
        "--model",
        &m,
        "--adapter",
        &one,
        "--adapter",
        &two,
        "--method",
        "svd",
        "--rank",
        "3",
        "--format",
        "peft",
        "--out",
        &p(&lora),
    ]);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(lora.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((written["r"].as_u64(), written["lora_alpha"].as_f64()), (Some(3), Some(3.0)));
    assert!(ok(&["inspect", &p(&lora), "--model", &m]).contains("lora"));

    // Refused, nothing written: kinds mixed, weights miscounted, a method the kind lacks.
    let refused = dir.join("refused");
    for (args, says) in [
        (vec!["--adapter", &one, "--adapter", &p(&a)], "only adapters of one kind combine"),
        (vec!["--adapter", &one, "--adapter", &two, "--weights", "1"], "gives 1 weights for 2 adapters"),
        (
            vec!["--adapter", &p(&a), "--adapter", &p(&b), "--method", "ties", "--density", "0.5"],
            "do not combine by `ties`; they combine by:\n  linear: the weighted sum",
        ),
        (vec!["--adapter", &one, "--adapter", &two, "--method", "ties"], "needs a density"),
    ] {
        let mut full = vec!["average", "--model", &m, "--out"];
        let target = p(&refused);
        full.push(&target);
        full.extend(args);
        let (success, _, err) = run(&full);
        assert!(!success && err.contains(says), "{full:?}: {err}");
        assert!(!refused.exists(), "nothing written");
    }
    let (success, _, err) = run(&["average", "--model", &m, "--adapter", &p(&a), "--out", &p(&c)]);
    assert!(!success && err.contains("not empty"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Our writer, checked by the other library: `make_differential.py` converted a sample of
/// the differential fixtures with `adapters convert` and loaded the results in AdapterHub
/// and PEFT, which computed what they computed on their own folders (recorded
/// differences). Converting again must write those very files (same sha256), so what the
/// Python libraries checked is what `convert` writes today.
#[test]
fn converted_folders_are_the_ones_adapterhub_and_peft_checked() {
    use sha2::{Digest, Sha256};
    let fixtures = workspace().join("fixtures/interop/differential");
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures.join("cases.json")).unwrap()).unwrap();
    let reverse = cases["reverse"].as_array().unwrap();
    assert!(reverse.len() >= 20, "{} folders written here and checked there", reverse.len());
    let models = PathBuf::from(minilm()).parent().unwrap().to_path_buf();
    let tmp = std::env::temp_dir().join(format!("reverse-{}", std::process::id()));
    let sha = |path: PathBuf| format!("{:x}", Sha256::digest(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))));
    for entry in reverse {
        let (name, format) = (entry["name"].as_str().unwrap(), entry["format"].as_str().unwrap());
        assert!(entry["max_diff"].as_f64().unwrap() <= 1e-5, "{name}: {format} computed {} away from its own folder", entry["max_diff"]);
        let out = tmp.join(name);
        // From the models folder, as the script ran it: PEFT records `--model` as given.
        let status = Command::new(env!("CARGO_BIN_EXE_adapters"))
            .current_dir(&models)
            .args(["convert", fixtures.join(name).to_str().unwrap(), "--model", "all-MiniLM-L6-v2", "--format", format])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(status.status.success(), "{name}: {}", String::from_utf8_lossy(&status.stderr));
        let weights = if format == "adapterhub" { "adapter.safetensors" } else { "adapter_model.safetensors" };
        assert_eq!(sha(out.join(weights)), entry["weights_sha256"].as_str().unwrap(), "{name}: {format} weights differ from those checked");
        assert_eq!(sha(out.join("adapter_config.json")), entry["config_sha256"].as_str().unwrap(), "{name}: {format} config differs");
    }
    std::fs::remove_dir_all(&tmp).ok();
}
