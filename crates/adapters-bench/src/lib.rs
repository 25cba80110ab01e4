//! Helpers for the cross-family benchmarks: interleaved timing of variants, so that the
//! machine's fast and slow periods hit every variant alike, reported as medians and as
//! ratios to the first variant.

use std::time::Instant;

/// One variant's result.
pub struct Timing {
    pub name: String,
    pub median_s: f64,
    /// Median over rounds of (this variant's time / the first variant's time).
    pub median_ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs every variant once per round, rotating the order each round, for `rounds`
/// rounds (after one warm-up round).
pub fn interleave(variants: &[(&str, &dyn Fn())], rounds: usize) -> Vec<Timing> {
    for (_, f) in variants {
        f();
    }
    let n = variants.len();
    let mut times = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for k in 0..n {
            let i = (round + k) % n;
            let t = Instant::now();
            (variants[i].1)();
            times[i].push(t.elapsed().as_secs_f64());
        }
    }
    (0..n)
        .map(|i| Timing {
            name: variants[i].0.to_string(),
            median_s: median(times[i].clone()),
            median_ratio: median(times[i].iter().zip(&times[0]).map(|(a, b)| a / b).collect()),
        })
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

/// Writes a result file under `target/bench-results/` for `cargo xtask bench`.
pub fn write_result(file: &str, value: &serde_json::Value) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-results");
    std::fs::create_dir_all(&dir).expect("creating target/bench-results");
    std::fs::write(dir.join(file), serde_json::to_string_pretty(value).expect("json")).expect("writing the result");
    println!("{}", serde_json::to_string_pretty(value).expect("json"));
}
