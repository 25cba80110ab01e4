//! A fuzzing driver on stable Rust, bounded in time so that it runs in every test run.
//!
//! Each case starts from one of a target's valid seed inputs (or from nothing), applies a
//! few mutations that `arbitrary` draws from a seeded stream (bit flips, boundary bytes,
//! inserted, deleted, duplicated and truncated ranges, numbers replaced by extreme ones,
//! 8-byte fields set to extreme integers, splices of two seeds) and hands the bytes to the
//! target inside `catch_unwind`. The first panic fails the test with the case number
//! (`ADAPTERS_FUZZ_CASE=N` replays just that case) and the input saved under
//! `target/fuzz-crashes/`. `ADAPTERS_FUZZ_SECONDS` sets each target's budget (default 3).

use arbitrary::{Arbitrary, Unstructured};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What a target's run did.
#[derive(Debug)]
pub struct Report {
    /// The target's name.
    pub target: String,
    /// Cases run.
    pub cases: u64,
    /// Wall time.
    pub seconds: f64,
    /// The slowest case and its time in seconds (a hint of runaway work).
    pub slowest: (u64, f64),
}

/// Each target's time budget: `ADAPTERS_FUZZ_SECONDS`, default 3 s.
pub fn budget() -> Duration {
    let seconds = std::env::var("ADAPTERS_FUZZ_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(3.0);
    Duration::from_secs_f64(seconds.max(0.0))
}

/// Where crashing inputs and the run reports go: `target/` of the workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// Runs `run` on mutated `seeds` for the time budget (at least one pass over the seeds
/// themselves); panics with a reproducible case on the first panic inside `run`.
pub fn fuzz(target: &str, seeds: &[Vec<u8>], mut run: impl FnMut(&[u8])) -> Report {
    let started = Instant::now();
    let only: Option<u64> = std::env::var("ADAPTERS_FUZZ_CASE").ok().and_then(|c| c.parse().ok());
    let key = target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut cases = 0u64;
    let mut slowest = (0u64, 0f64);
    for case in 0u64.. {
        if let Some(n) = only {
            if case < n {
                continue;
            }
            if case > n {
                break;
            }
        } else if case as usize >= seeds.len() && started.elapsed() >= budget() {
            break;
        }
        let input = match seeds.get(case as usize) {
            Some(seed) => seed.clone(),
            None => mutated(seeds, key, case),
        };
        let t0 = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| run(&input)));
        let took = t0.elapsed().as_secs_f64();
        if took > slowest.1 {
            slowest = (case, took);
            if took > 1.0 {
                save(target, case, "slow", &input);
            }
        }
        cases += 1;
        if let Err(panic) = outcome {
            let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            let file = save(target, case, "panic", &input);
            panic!(
                "fuzz target `{target}`: case {case} panicked: {}\ninput ({} bytes) saved at {}; replay with ADAPTERS_FUZZ_CASE={case}",
                message.unwrap_or_default(),
                input.len(),
                file.display()
            );
        }
    }
    let report = Report { target: target.to_string(), cases, seconds: started.elapsed().as_secs_f64(), slowest };
    eprintln!("fuzz {target}: {cases} cases in {:.1} s, no panic (slowest: case {}, {:.3} s)", report.seconds, slowest.0, slowest.1);
    let line = serde_json::json!({"target": target, "cases": cases, "seconds": report.seconds,
        "slowest_case": slowest.0, "slowest_seconds": slowest.1});
    let _ = std::fs::create_dir_all(target_dir())
        .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(target_dir().join("fuzz-report.jsonl")))
        .and_then(|mut f| writeln!(f, "{line}"));
    report
}

/// Keeps a case's input under `target/fuzz-crashes/` (a panicking or a slow one).
fn save(target: &str, case: u64, why: &str, input: &[u8]) -> PathBuf {
    let dir = target_dir().join("fuzz-crashes");
    let file = dir.join(format!("{}-{case}-{why}.bin", target.replace(|c: char| !c.is_ascii_alphanumeric(), "_")));
    let _ = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, input));
    file
}

/// The input of case `case`: a seed (or arbitrary bytes) with 1-4 mutations.
fn mutated(seeds: &[Vec<u8>], key: u64, case: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(key ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut entropy = vec![0u8; 512];
    rng.fill_bytes(&mut entropy);
    let mut u = Unstructured::new(&entropy);
    mutate(seeds, &mut u).unwrap_or_default()
}

/// Numbers that break size arithmetic and parsers.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "-1e308",
    "NaN",
    "inf",
    "1000000000",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "0.0000001",
    "-0.0",
    "65536",
    "2147483648",
];
const WORDS: &[u64] = &[0, 1, u64::MAX, u64::MAX / 2, 1 << 31, 1 << 32, 1 << 40, 1 << 62, 0xffff_ffff];

fn mutate(seeds: &[Vec<u8>], u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    let mut data = if seeds.is_empty() || u.ratio(1, 16)? { Vec::<u8>::arbitrary(u)? } else { seeds[u.choose_index(seeds.len())?].clone() };
    for _ in 0..u.int_in_range(1..=4)? {
        let len = data.len();
        match u.int_in_range(0..=8)? {
            0 if len > 0 => {
                let i = u.choose_index(len)?;
                data[i] ^= 1 << u.int_in_range(0..=7)?;
            }
            1 if len > 0 => {
                let i = u.choose_index(len)?;
                data[i] = *u.choose(&[0u8, 0xff, 0x7f, 0x80, b'"', b'{', b']', b'\n', b','])?;
            }
            2 if len > 0 => {
                let at = u.choose_index(len)?;
                let n = u.int_in_range(1..=(len - at).min(64))?;
                data.drain(at..at + n);
            }
            3 => {
                let at = u.int_in_range(0..=len)?;
                let bytes: Vec<u8> = Vec::arbitrary(u)?;
                data.splice(at..at, bytes.into_iter().take(64));
            }
            4 if len > 0 => data.truncate(u.choose_index(len)?),
            5 if len > 0 => {
                let at = u.choose_index(len)?;
                let n = u.int_in_range(1..=(len - at).min(256))?;
                let copy = data[at..at + n].to_vec();
                let to = u.int_in_range(0..=len)?;
                data.splice(to..to, copy);
            }
            6 => {
                // A run of digits (a number in text) replaced by an extreme number.
                let runs: Vec<(usize, usize)> = digit_runs(&data);
                if !runs.is_empty() {
                    let (a, b) = runs[u.choose_index(runs.len())?];
                    data.splice(a..b, u.choose(NUMBERS)?.bytes());
                }
            }
            7 if len >= 8 => {
                let at = u.choose_index(len - 7)?;
                data[at..at + 8].copy_from_slice(&u.choose(WORDS)?.to_le_bytes());
            }
            8 if seeds.len() > 1 => {
                let other = &seeds[u.choose_index(seeds.len())?];
                let (cut, from) = (u.int_in_range(0..=len)?, u.int_in_range(0..=other.len())?);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    Ok(data)
}

fn digit_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i].is_ascii_digit() {
            let start = i;
            while i < data.len() && (data[i].is_ascii_digit() || data[i] == b'.') {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_reproducible_and_the_seeds_run_first() {
        let seeds = vec![b"{\"r\": 8, \"alpha\": 16}".to_vec(), b"abc".to_vec()];
        assert_eq!(mutated(&seeds, 1, 5), mutated(&seeds, 1, 5));
        let distinct: std::collections::BTreeSet<Vec<u8>> = (0..200).map(|c| mutated(&seeds, 1, c)).collect();
        assert!(distinct.len() > 150, "mutations vary: {}", distinct.len());
        let mut seen = Vec::new();
        std::env::set_var("ADAPTERS_FUZZ_SECONDS", "0");
        fuzz("driver-self-test", &seeds, |b| seen.push(b.to_vec()));
        assert_eq!(seen, seeds, "with no time left, exactly the seeds run");
    }

    #[test]
    #[should_panic(expected = "replay with ADAPTERS_FUZZ_CASE")]
    fn a_panic_names_its_case() {
        fuzz("driver-panics", &[b"x".to_vec()], |_| panic!("boom"));
    }
}
