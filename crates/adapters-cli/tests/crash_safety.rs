//! Crash safety, proven at the named fault points (`ADAPTERS_FAULT`, see
//! `adapters_core::durable`): every writer is crashed at each point it passes, then the
//! previous checkpoint, folder or library version must be intact, `--resume` must finish
//! the run, and the finished run must hold the uninterrupted run's weights bit for bit.
//! Plus SIGKILL at random moments of a real training run, repeated.

use adapters_testkit::workspace;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn minilm() -> String {
    adapters_models::fetched("all-MiniLM-L6-v2").unwrap().to_string_lossy().into_owned()
}

/// A scratch folder, removed at the end of the test.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("adapters-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn adapters(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_adapters"));
    cmd.args(args).env("ADAPTERS_STORE", dir.join("library")).env("ADAPTERS_CACHE", dir.join("cache"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = adapters(dir, args, &[]);
    assert!(out.status.success(), "adapters {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The fault points a command passes, in order (it runs to the end).
fn points_passed(dir: &Path, args: &[&str]) -> Vec<String> {
    let log = dir.join("fault-log");
    let _ = std::fs::remove_file(&log);
    let out = adapters(dir, args, &[("ADAPTERS_FAULT_LOG", log.display().to_string())]);
    assert!(out.status.success(), "adapters {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(&log).unwrap_or_default().lines().map(String::from).collect()
}

/// Runs the command crashing at pass `k` of `point`, and checks that it crashed there.
fn crash_at(dir: &Path, args: &[&str], point: &str, k: usize) {
    let out = adapters(dir, args, &[("ADAPTERS_FAULT", format!("{point}:{k}"))]);
    assert_eq!(out.status.signal(), Some(6), "expected an abort at {point}:{k}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Each distinct point of `passed` with the pass number of its first pass at or after
/// position `from` (points passed only before `from` are left out).
fn crash_plan(passed: &[String], from: usize) -> Vec<(String, usize)> {
    let mut plan: BTreeMap<String, usize> = BTreeMap::new();
    for (point, k) in numbered(passed).into_iter().skip(from) {
        plan.entry(point).or_insert(k);
    }
    plan.into_iter().collect()
}

/// Each pass of `passed` as (point, which pass through it this is).
fn numbered(passed: &[String]) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    passed
        .iter()
        .map(|p| {
            let n = counts.entry(p).or_default();
            *n += 1;
            (p.clone(), *n)
        })
        .collect()
}

/// Every file under `dir`, by its path relative to `dir`.
fn files_under(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for p in std::fs::read_dir(&d).unwrap().flatten().map(|e| e.path()) {
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string(), p);
            }
        }
    }
    out
}

/// Every tensor of the safetensors files under `dir` (relative path/tensor → values).
fn weights(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    for (rel, p) in files_under(dir).into_iter().filter(|(_, p)| p.extension().is_some_and(|x| x == "safetensors")) {
        for (name, t) in candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap() {
            out.insert(format!("{rel}:{name}"), t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
    out
}

/// A short training run on real SMS data: 6 steps with a checkpoint every 2, dropout on.
fn train_config(dir: &Path) -> PathBuf {
    let data = workspace().join("data/sms_spam");
    for (split, n) in [("train", 48), ("dev", 16)] {
        let text = std::fs::read_to_string(data.join(format!("{split}.jsonl"))).expect("run `cargo xtask fetch` first");
        std::fs::write(dir.join(format!("{split}.jsonl")), text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    }
    let q = |p: PathBuf| format!("{:?}", p.display().to_string());
    let config = format!(
        "[model]\npath = {:?}\nmax_length = 32\n[adapters.pf]\nkind = \"seq_bn\"\nreduction_factor = 16\ndropout = 0.1\n\
         [[task]]\nname = \"sms\"\ntype = \"classification\"\ntrain = {}\ndev = {}\ntest = {}\n\
         [training]\nbatch_size = 8\nsteps = 6\neval_every = 2\ncheckpoint_every = 2\n[output]\ndir = \"unused\"\n",
        minilm(),
        q(dir.join("train.jsonl")),
        q(dir.join("dev.jsonl")),
        q(dir.join("dev.jsonl")),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn train_args(config: &Path, out: &Path, resume: bool) -> Vec<String> {
    let mut args =
        vec!["train".to_string(), config.display().to_string(), "--set".into(), format!("output.dir={:?}", out.display().to_string())];
    if resume {
        args.push("--resume".into());
    }
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Training crashed at every fault point it passes from its second checkpoint on
/// (checkpoint files and folder swaps, the adapter folder with its head): afterwards a
/// whole checkpoint is there (the previous or the new one), `--resume` finishes the run,
/// and the run's outputs hold the uninterrupted run's weights bit for bit.
#[test]
fn training_crashed_at_every_fault_point_resumes_to_the_same_weights() {
    let dir = scratch("train");
    let config = train_config(&dir.0);
    let reference = dir.0.join("reference");
    let passed = points_passed(&dir.0, &strs(&train_args(&config, &reference, false)));
    let expected = weights(&reference.join("adapters"));
    assert!(expected.keys().any(|k| k.contains("heads")), "the head is among the outputs: {:?}", expected.keys());
    // From the first point of the second checkpoint on (a first one is then complete).
    let second = passed.iter().position(|p| p == "checkpoint.into_place.after_rename").unwrap() + 1;
    let plan = crash_plan(&passed, second);
    for needed in [
        "file.before_fsync",
        "file.after_rename",
        "checkpoint.aside.after_rename",
        "checkpoint.into_place.before_rename",
        "outputs.into_place.after_rename",
        "head.into_place.before_rename",
    ] {
        assert!(plan.iter().any(|(p, _)| p == needed), "{needed} not passed: {plan:?}");
    }
    eprintln!("training: crashing at {} fault points: {plan:?}", plan.len());
    for (point, k) in &plan {
        let out = dir.0.join(format!("crash-{point}"));
        crash_at(&dir.0, &strs(&train_args(&config, &out, false)), point, *k);
        let resumed = adapters(&dir.0, &strs(&train_args(&config, &out, true)), &[]);
        let stderr = String::from_utf8_lossy(&resumed.stderr);
        assert!(resumed.status.success(), "resume after a crash at {point}:{k}: {stderr}");
        let from: usize =
            stderr.split("resuming from step ").nth(1).and_then(|s| s.split(' ').next()).and_then(|s| s.parse().ok()).unwrap();
        assert!([2, 4, 6].contains(&from), "{point}:{k}: resumed from step {from}, not a checkpoint");
        assert_eq!(weights(&out.join("adapters")), expected, "after a crash at {point}:{k}, the finished run's weights differ");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// SIGKILL at random moments of a real training run (seeded), five times, each time
/// resumed (or restarted when no checkpoint was written yet): the run ends with the
/// uninterrupted run's weights bit for bit.
#[test]
fn training_killed_at_random_moments_ends_with_the_same_weights() {
    let dir = scratch("sigkill");
    let config = train_config(&dir.0);
    let reference = dir.0.join("reference");
    ok(&dir.0, &strs(&train_args(&config, &reference, false)));
    let out = dir.0.join("killed");
    let mut state = 0x5eed_u64;
    let mut kills = 0;
    while kills < 5 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = std::time::Duration::from_millis(300 + (state >> 33) % 2500);
        let resume = out.join("checkpoint/state.json").exists() || out.join(".checkpoint.old").exists();
        let mut child = Command::new(env!("CARGO_BIN_EXE_adapters"))
            .args(train_args(&config, &out, resume))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        // Killing a child that has exited but is not yet reaped succeeds; its status then
        // says which happened.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if status.signal() != Some(9) {
            // Finished before the kill: start again from nothing to keep killing.
            assert!(status.success() && out.join("summary.json").exists(), "{status:?}");
            std::fs::remove_dir_all(&out).unwrap();
            continue;
        }
        kills += 1;
    }
    loop {
        let resume = out.join("checkpoint/state.json").exists() || out.join(".checkpoint.old").exists();
        let run = adapters(&dir.0, &strs(&train_args(&config, &out, resume)), &[]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        if out.join("summary.json").exists() {
            break;
        }
    }
    assert_eq!(weights(&out.join("adapters")), weights(&reference.join("adapters")));
}

/// `new`, `convert`, `average` and `merge` crashed at every fault point they pass: `--out`
/// is then either missing (or left empty) or the whole folder, which loads; when it is
/// missing the same command then succeeds (the leftover temporary folder is cleared).
#[test]
fn folder_writers_crashed_at_every_fault_point_leave_nothing_half_written() {
    let dir = scratch("folders");
    let m = minilm();
    let source = workspace().join("fixtures/fusion-sources/sms_spam").display().to_string();
    let other = workspace().join("fixtures/fusion-sources/trec_coarse").display().to_string();
    let lora = dir.0.join("lora").display().to_string();
    ok(&dir.0, &["new", "lora", "--model", &m, "--set", "r=4", "--out", &lora]);
    let commands: Vec<(&str, Vec<String>)> = vec![
        ("new", ["new", "lora", "--model", &m, "--set", "r=4", "--out"].map(String::from).to_vec()),
        ("convert", ["convert", &source, "--model", &m, "--format", "adapterhub", "--no-heads", "--out"].map(String::from).to_vec()),
        ("average", ["average", "--model", &m, "--adapter", &source, "--adapter", &other, "--out"].map(String::from).to_vec()),
        ("merge", ["merge", &m, "--adapter", &lora, "--out"].map(String::from).to_vec()),
    ];
    for (name, args) in &commands {
        let with_out = |out: &Path| -> Vec<String> { args.iter().cloned().chain([out.display().to_string()]).collect() };
        let passed = points_passed(&dir.0, &strs(&with_out(&dir.0.join(format!("{name}-reference")))));
        let plan = crash_plan(&passed, 0);
        assert!(plan.iter().any(|(p, _)| p == "folder.before_rename"), "{name}: {plan:?}");
        eprintln!("{name}: crashing at {} fault points", plan.len());
        for (point, k) in &plan {
            let out = dir.0.join(format!("{name}-{point}-{k}"));
            crash_at(&dir.0, &strs(&with_out(&out)), point, *k);
            let written = out.exists() && std::fs::read_dir(&out).unwrap().next().is_some();
            if written {
                // The whole folder: it loads (an adapter on the model, or the merged model).
                let check = if *name == "merge" {
                    vec!["embed".to_string(), out.display().to_string(), "hello".into()]
                } else {
                    vec!["inspect".to_string(), out.display().to_string(), "--model".into(), m.clone()]
                };
                let shown = ok(&dir.0, &strs(&check));
                assert!(*name == "merge" || shown.contains("fits model    yes"), "{name} crashed at {point}:{k}: {shown}");
            } else {
                ok(&dir.0, &strs(&with_out(&out)));
                assert!(!dir.0.join(format!(".{name}-{point}-{k}.partial")).exists(), "the temporary folder is cleared");
            }
        }
    }
}

/// Pushing a second version crashed at every fault point of the upload: the first
/// version still pulls whole and `latest` names a whole version; pushing again finishes.
#[test]
fn store_uploads_crashed_at_every_fault_point_keep_the_previous_version() {
    let dir = scratch("store");
    let first = workspace().join("fixtures/fusion-sources/sms_spam");
    let second = workspace().join("fixtures/fusion-sources/trec_coarse");
    let push_second = ["push", second.to_str().unwrap(), "--name", "spam", "--tag", "prod"];
    let library = |name: &str| dir.0.join(name);
    // Learn the points on a library of its own.
    let passed = {
        let probe = library("probe");
        std::fs::create_dir_all(&probe).unwrap();
        ok(&probe, &["push", first.to_str().unwrap(), "--name", "spam"]);
        points_passed(&probe, &push_second)
    };
    let plan = numbered(&passed);
    assert!(plan.iter().any(|(p, _)| p == "store.manifest.after_put") && plan.iter().any(|(p, _)| p == "store.tag.before_put"), "{plan:?}");
    let files_of =
        |d: &Path| -> BTreeMap<String, Vec<u8>> { files_under(d).into_iter().map(|(rel, p)| (rel, std::fs::read(p).unwrap())).collect() };
    eprintln!("push: crashing at {} passes of fault points", plan.len());
    for (i, (point, k)) in plan.iter().enumerate() {
        let home = library(&format!("crash-{i}"));
        std::fs::create_dir_all(&home).unwrap();
        ok(&home, &["push", first.to_str().unwrap(), "--name", "spam"]);
        crash_at(&home, &push_second, point, *k);
        let pulled = home.join("pulled");
        ok(&home, &["pull", "spam@latest", "--out", pulled.to_str().unwrap()]);
        let got = files_of(&pulled);
        assert!(got == files_of(&first) || got == files_of(&second), "after a crash at {point}:{k}, `latest` is not a whole version");
        ok(&home, &["list"]);
        ok(&home, &push_second);
        let again = home.join("again");
        ok(&home, &["pull", "spam@prod", "--out", again.to_str().unwrap()]);
        assert_eq!(files_of(&again), files_of(&second), "pushing again after a crash at {point}:{k}");
    }
}
