//! The test matrix: the repository's hygiene (self-contained, rustfmt, clippy and rustdoc
//! without warnings); the whole workspace; each adapter family crate built and tested on
//! its own (a team that depends on one family must not need the others); and the CUDA
//! build where a CUDA toolkit is found. Prints what ran, what was skipped and why, and
//! how long each part took.

use anyhow::{bail, Result};
use std::path::Path;
use std::process::{Command, Stdio};

struct Outcome {
    name: String,
    status: Status,
    seconds: f64,
}

enum Status {
    Passed,
    Failed,
    Skipped(String),
}

pub fn run(root: &Path) -> Result<()> {
    crate::fetch::fetch_all(root)?;
    let mut outcomes = Vec::new();
    let mut counts = Counts::default();
    let start = std::time::Instant::now();
    let status = match outside_references(root) {
        Ok(hits) if hits.is_empty() => Status::Passed,
        Ok(hits) => {
            eprintln!("tracked files refer to {SHARED}, which a clone does not have; use the copies in fixtures/ instead:");
            for hit in hits {
                eprintln!("  {hit}");
            }
            Status::Failed
        }
        Err(e) => {
            eprintln!("could not list the tracked files: {e}");
            Status::Failed
        }
    };
    outcomes.push(Outcome {
        name: "self-contained (no reference outside the repository)".into(),
        status,
        seconds: start.elapsed().as_secs_f64(),
    });
    for (name, args, env) in lints() {
        eprintln!("\n=== {name}: cargo {}", args.join(" "));
        let start = std::time::Instant::now();
        let ok = Command::new("cargo").args(&args).envs(env).current_dir(root).status().map(|s| s.success()).unwrap_or(false);
        let status = if ok { Status::Passed } else { Status::Failed };
        outcomes.push(Outcome { name: name.into(), status, seconds: start.elapsed().as_secs_f64() });
    }
    let mut step = |name: String, args: Vec<String>, env: &[(&str, &str)]| {
        eprintln!("\n=== {name}: cargo {}", args.join(" "));
        let start = std::time::Instant::now();
        let ok = cargo_test(root, &args, env, &mut counts).unwrap_or(false);
        let seconds = start.elapsed().as_secs_f64();
        outcomes.push(Outcome { name, status: if ok { Status::Passed } else { Status::Failed }, seconds });
    };
    step("workspace".into(), vec!["test".into(), "--workspace".into(), "--no-fail-fast".into()], &[]);
    for krate in family_crates(root)? {
        step(format!("{krate} alone"), vec!["test".into(), "-p".into(), krate], &[]);
    }
    // The maths GPUs run: every kernel replaced by its composed candle ops, on the CPU,
    // against the same golden outputs and gradient checks.
    step(
        "backbones with composed ops (the GPU path)".into(),
        // --workspace keeps the feature set of the first step (no rebuild).
        [
            "test",
            "--workspace",
            "--test",
            "bert_golden",
            "--test",
            "llama_golden",
            "--test",
            "training_paths",
            "--test",
            "adapterhub_interop",
            "--test",
            "peft_interop",
            "--test",
            "mixed_rows",
            "--test",
            "mixture",
            "--test",
            "hypernet",
        ]
        .map(String::from)
        .to_vec(),
        &[("ADAPTERS_COMPOSED_OPS", "1")],
    );
    let cuda_build = || vec!["build".into(), "--workspace".into(), "--features".into(), "adapters-cli/cuda".into()];
    match (cuda_toolkit(), gpu()) {
        (Some(nvcc), Some(gpu)) => {
            eprintln!("CUDA toolkit found ({nvcc}), GPU: {gpu}");
            let mut args = cuda_build();
            args[0] = "test".into();
            step("workspace with CUDA".into(), args, &[("ADAPTERS_TEST_DEVICE", "cuda")]);
        }
        (Some(nvcc), None) => {
            eprintln!("CUDA toolkit found ({nvcc}) but no GPU: building the CUDA configuration only");
            let start = std::time::Instant::now();
            let built = crate::run(root, "cargo", &cuda_build().iter().map(String::as_str).collect::<Vec<_>>()).is_ok();
            outcomes.push(Outcome {
                name: "workspace with CUDA".into(),
                status: if built {
                    Status::Skipped("no GPU (nvidia-smi lists none): the CUDA build compiled, its tests did not run".into())
                } else {
                    Status::Failed
                },
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        (None, _) => outcomes.push(Outcome {
            name: "workspace with CUDA".into(),
            status: Status::Skipped("no GPU and no CUDA toolkit (nvcc not on PATH, no /usr/local/cuda)".into()),
            seconds: 0.0,
        }),
    }

    eprintln!("\n=== test matrix");
    let mut failed = 0;
    for o in &outcomes {
        match &o.status {
            Status::Passed => eprintln!("  ran      {}: passed ({:.0} s)", o.name, o.seconds),
            Status::Failed => {
                failed += 1;
                eprintln!("  ran      {}: FAILED ({:.0} s)", o.name, o.seconds)
            }
            Status::Skipped(why) => eprintln!("  skipped  {}: {why}", o.name),
        }
    }
    // One plain closing line over the whole matrix (the last cargo run alone may be a
    // crate without tests).
    println!("matrix: {} passed, {} failed", counts.passed, counts.failed);
    // CI's disk is finite (a run once failed with it full): say what the build took.
    eprintln!("target/ holds {:.1} GiB", bytes_under(&root.join("target")) as f64 / (1u64 << 30) as f64);
    if failed > 0 {
        bail!("{failed} part(s) of the test matrix failed");
    }
    Ok(())
}

/// The folder beside the repository that holds the team's reference data; spelt in two
/// parts so that this file does not match its own check.
const SHARED: &str = concat!("..", "/shared");

/// `path:line` of every line of a tracked file (outside `fixtures/`, whose READMEs say
/// where the data came from) that names the shared folder.
fn outside_references(root: &Path) -> Result<Vec<String>> {
    let out = Command::new("git").args(["ls-files", "-z"]).current_dir(root).output()?;
    anyhow::ensure!(out.status.success(), "`git ls-files` failed; run the tests in a git checkout");
    let mut hits = Vec::new();
    for path in out.stdout.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let path = String::from_utf8_lossy(path);
        if path.starts_with("fixtures/") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(root.join(path.as_ref())) else { continue };
        for (i, line) in text.lines().enumerate() {
            if line.contains(SHARED) {
                hits.push(format!("{path}:{}", i + 1));
            }
        }
    }
    Ok(hits)
}

/// A cargo command with its name and environment.
type Lint = (&'static str, Vec<&'static str>, Vec<(&'static str, &'static str)>);

/// rustfmt, clippy and rustdoc, each failing on any warning.
fn lints() -> Vec<Lint> {
    vec![
        ("rustfmt", vec!["fmt", "--all", "--check"], vec![]),
        ("clippy", vec!["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], vec![]),
        ("rustdoc", vec!["doc", "--workspace", "--no-deps"], vec![("RUSTDOCFLAGS", "-D warnings")]),
    ]
}

#[derive(Default)]
struct Counts {
    passed: usize,
    failed: usize,
}

/// Runs `cargo <args>`, passing its output through and adding up its `test result:` lines.
fn cargo_test(root: &Path, args: &[String], env: &[(&str, &str)], counts: &mut Counts) -> Result<bool> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("cargo").args(args).envs(env.iter().copied()).current_dir(root).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let field = |name: &str| {
                rest.split(';').find_map(|p| p.trim().strip_suffix(name).and_then(|n| n.trim().rsplit(' ').next()?.parse::<usize>().ok()))
            };
            counts.passed += field(" passed").unwrap_or(0);
            counts.failed += field(" failed").unwrap_or(0);
        }
    }
    Ok(child.wait()?.success())
}

/// Crates under `crates/` that are not adapter families. Testing a crate alone builds its
/// dependencies with its own feature set, which on a fresh machine recompiles candle, so
/// only the families (the crates users pick one by one) get a run of their own.
const NOT_FAMILIES: &[&str] = &[
    "adapters-core",
    "adapters-kernels",
    "adapters-families",
    "adapters-models",
    "adapters-train",
    "adapters-cli",
    "adapters-scale-shift",
    "adapters-testkit",
    "adapters-bench",
    "adapters-store",
    "adapters-serve",
    "adapters-fuzz",
];

/// Every adapter family crate (a new family is picked up by adding its crate).
fn family_crates(root: &Path) -> Result<Vec<String>> {
    let mut crates: Vec<String> = std::fs::read_dir(root.join("crates"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("src/lib.rs").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !NOT_FAMILIES.contains(&name.as_str()))
        .collect();
    crates.sort();
    Ok(crates)
}

/// Bytes in the files under `dir` (links not followed; unreadable entries count 0).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The first GPU `nvidia-smi -L` lists, if any.
fn gpu() -> Option<String> {
    let out = Command::new("nvidia-smi").arg("-L").output().ok().filter(|o| o.status.success())?;
    String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with("GPU")).map(str::to_string)
}

fn cuda_toolkit() -> Option<String> {
    let on_path = Command::new("nvcc").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if on_path {
        return Some("nvcc on PATH".into());
    }
    Path::new("/usr/local/cuda/bin/nvcc").exists().then(|| "/usr/local/cuda/bin/nvcc".into())
}
