//! Helpers for the cross-family benchmarks: variants timed in adjacent pairs with a
//! baseline, so that the machine's fast and slow periods (15-60 s here) hit both runs of a
//! pair alike; reported as medians and as the median of the per-pair ratios.

use std::time::Instant;

pub mod scale;
pub mod workloads;

/// One variant's result.
pub struct Timing {
    pub name: String,
    pub median_s: f64,
    /// Median over pairs of (this variant's time / the baseline's time in the same pair).
    pub median_ratio: f64,
}

/// The median (the upper one of an even count; NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times every variant against the first (the baseline) in adjacent pairs: each round
/// runs, for every other variant in a rotating order, the baseline and the variant back to
/// back (alternating which goes first), so each ratio compares two runs a second or two
/// apart. After one warm-up run of each variant.
pub fn interleave(variants: &[(&str, &dyn Fn())], rounds: usize) -> Vec<Timing> {
    for (_, f) in variants {
        f();
    }
    let n = variants.len();
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let mut times = vec![Vec::with_capacity(rounds); n];
    let mut ratios = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for k in 0..n - 1 {
            let i = 1 + (round + k) % (n - 1);
            let (base, other) = if (round + k) % 2 == 0 {
                let b = time(variants[0].1);
                (b, time(variants[i].1))
            } else {
                let o = time(variants[i].1);
                (time(variants[0].1), o)
            };
            times[0].push(base);
            times[i].push(other);
            ratios[i].push(other / base);
        }
    }
    ratios[0] = vec![1.0];
    (0..n)
        .map(|i| Timing { name: variants[i].0.to_string(), median_s: median(times[i].clone()), median_ratio: median(ratios[i].clone()) })
        .collect()
}

/// Results as JSON, with the thread count.
pub fn to_json(title: &str, timings: &[Timing], rounds: usize) -> serde_json::Value {
    serde_json::json!({
        "title": title,
        "threads": candle_core::utils::get_num_threads(),
        "rounds": rounds,
        "variants": timings.iter().map(|t| serde_json::json!({
            "name": t.name, "median_s": t.median_s, "median_ratio_to_first": t.median_ratio,
        })).collect::<Vec<_>>(),
    })
}

/// Writes a result file under `bench/results/` (tracked, so that BENCHMARKS.md can be
/// rebuilt after `cargo clean` and a partial re-run replaces only its own tables) for
/// `cargo xtask bench`.
pub fn write_result(file: &str, value: &serde_json::Value) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/results");
    std::fs::create_dir_all(&dir).expect("creating bench/results");
    std::fs::write(dir.join(file), serde_json::to_string_pretty(value).expect("json")).expect("writing the result");
    println!("{}", serde_json::to_string_pretty(value).expect("json"));
}
