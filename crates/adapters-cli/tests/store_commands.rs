//! `adapters push | list | pull | tag | rm` on a local library, and `--adapter NAME@TAG`
//! taking an adapter from it, run as a user would.

use adapters_testkit::workspace;
use std::path::PathBuf;
use std::process::Command;

fn minilm() -> String {
    adapters_models::fetched("all-MiniLM-L6-v2").unwrap().to_string_lossy().into_owned()
}

/// Runs `adapters` with the library and download cache under `dir`.
fn run(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_adapters"))
        .args(args)
        .env("ADAPTERS_STORE", dir.join("library"))
        .env("ADAPTERS_CACHE", dir.join("cache"))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn push_list_pull_tag_rm_and_use_by_reference() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ok = |args: &[&str]| {
        let (success, out, err) = run(&dir, args);
        assert!(success, "adapters {args:?}: {err}");
        out
    };
    let fails = |args: &[&str], needle: &str| {
        let (success, _, err) = run(&dir, args);
        assert!(!success && err.contains(needle), "adapters {args:?}: expected `{needle}` in: {err}");
    };
    let sms = workspace().join("fixtures/fusion-sources/sms_spam");
    let trec = workspace().join("fixtures/fusion-sources/trec_coarse");
    let (sms, trec, model) = (sms.to_str().unwrap(), trec.to_str().unwrap(), minilm());
    let pushed = ok(&["push", sms, "--name", "spam", "--tag", "prod", "--model", &model]);
    assert!(pushed.contains("seq_bn (adapters-rs)") && pushed.contains("tagged latest, prod"), "{pushed}");
    ok(&["push", trec, "--name", "spam", "--tag", "canary"]);
    let listed = ok(&["list"]);
    assert!(listed.contains("[canary, latest]") && listed.contains("[prod]"), "{listed}");
    let json: serde_json::Value = serde_json::from_str(&ok(&["list", "spam", "--json"])).unwrap();
    assert_eq!(json[0]["versions"].as_array().unwrap().len(), 2);

    // An adapter by reference: the same predictions as from its folder.
    let text = "WINNER!! claim your free prize now, call to claim";
    let from_folder = ok(&["predict", &model, text, "--adapter", sms, "--json"]);
    assert_eq!(ok(&["predict", &model, text, "--adapter", "spam@prod", "--json"]), from_folder);
    assert_ne!(ok(&["predict", &model, text, "--adapter", "spam", "--json"]), from_folder, "latest is the other version");

    let out = dir.join("pulled");
    ok(&["pull", "spam@prod", "--out", out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(PathBuf::from(sms).join("adapter_model.safetensors")).unwrap()
    );

    ok(&["tag", "spam@canary", "prod"]);
    fails(&["rm", "spam@prod"], "--force");
    ok(&["rm", "spam", "--tag", "canary"]);
    ok(&["rm", "spam@prod", "--force"]);
    let listed = ok(&["list"]);
    assert!(!listed.contains("canary") && listed.matches("spam@").count() == 1, "{listed}");

    fails(&["push", sms, "--name", "../escape"], "not a valid name");
    fails(&["push", &model, "--name", "x"], "adapter_config.json");
    let smol = workspace().join("fixtures/interop/peft_lora_smollm2/adapter");
    fails(&["push", smol.to_str().unwrap(), "--name", "x", "--model", &model], "is not a projection of this bert model");
    fails(&["pull", "spam@nope", "--out", dir.join("x").to_str().unwrap()], "has no tag or version `nope`");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A training config names frozen adapters by reference (`from = "NAME@TAG"`): they come
/// from the library, and a fusion over them trains.
#[test]
fn training_takes_frozen_adapters_from_the_library() {
    let dir = std::env::temp_dir().join(format!("adapters-cli-store-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ok = |args: &[&str]| {
        let (success, out, err) = run(&dir, args);
        assert!(success, "adapters {args:?}: {err}");
        out
    };
    for (name, folder) in [("spam", "sms_spam"), ("topic", "trec_coarse")] {
        ok(&["push", workspace().join("fixtures/fusion-sources").join(folder).to_str().unwrap(), "--name", name, "--tag", "prod"]);
    }
    let train = dir.join("train.jsonl");
    let text = std::fs::read_to_string(workspace().join("data/sms_spam/train.jsonl")).expect("run `cargo xtask fetch` first");
    std::fs::write(&train, text.lines().take(32).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let config = dir.join("fusion.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\nmax_length = 32\n[adapters.spam]\nfrom = \"spam@prod\"\n[adapters.topic]\nfrom = \"topic\"\n\
             [adapters.fusion]\nkind = \"fusion\"\nmembers = [\"spam\", \"topic\"]\n\
             [[task]]\nname = \"sms\"\ntype = \"classification\"\nsetup = \"fuse(spam, topic; fusion=fusion)\"\ntrain = {:?}\ndev = {:?}\n\
             [training]\nsteps = 2\nbatch_size = 8\n[output]\ndir = {:?}\n",
            minilm(),
            train.display().to_string(),
            train.display().to_string(),
            dir.join("run").display().to_string()
        ),
    )
    .unwrap();
    let out = ok(&["train", config.to_str().unwrap()]);
    assert!(out.contains("trainable parameters"), "{out}");
    assert!(dir.join("run/adapters/fusion/adapter_config.json").exists());
    let (success, _, err) = run(
        &dir,
        &[
            "train",
            config.to_str().unwrap(),
            "--set",
            "adapters.spam.from=\"spam@nope\"",
            "--set",
            &format!("output.dir={:?}", dir.join("run2").display().to_string()),
        ],
    );
    assert!(!success && err.contains("adapters.spam.from") && err.contains("has no tag or version `nope`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
