//! `adapters push | list | pull | tag | rm` on a local library, and `--adapter NAME@TAG`
//! taking an adapter from it, run as a user would.

use std::path::PathBuf;
use std::process::Command;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

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
