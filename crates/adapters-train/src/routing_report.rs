//! What mixture-of-experts routers did: per step, each routed point's expert shares,
//! usage entropy, skipped and overflowed tokens (into `metrics.jsonl`); over an
//! evaluation split, the same per task with the mutual information between task and
//! expert (into `summary.json`); and the shares over training as a picture
//! (`routing.svg`).

use crate::error::{Error, Result};
use crate::metrics::MetricsLog;
use crate::records::RoutingPoint;
use adapters_core::RoutingStats;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

pub const PLOT_FILE: &str = "routing.svg";

/// Routing statistics summed over forward passes, per routed point.
#[derive(Default)]
pub struct RoutingSums {
    points: BTreeMap<String, PointSums>,
}

#[derive(Default)]
struct PointSums {
    experts: Vec<f64>,
    tokens: f64,
    skipped: f64,
    overflowed: f64,
    /// Per task name: tokens per expert.
    per_task: BTreeMap<String, Vec<f64>>,
}

/// A routed point's name in reports: `moe_bn layer 3 ffn_output`.
fn key(stats: &RoutingStats) -> String {
    format!("{} {}", stats.adapter, stats.point)
}

fn add_into(sums: &mut [f64], values: &[f32]) {
    sums.iter_mut().zip(values).for_each(|(s, &v)| *s += v as f64);
}

impl RoutingSums {
    /// Adds one forward pass's statistics; `task_names[t]` names task id `t`.
    pub fn add(&mut self, stats: &[RoutingStats], task_names: &[String]) {
        for s in stats {
            let sums = self.points.entry(key(s)).or_default();
            if sums.experts.is_empty() {
                sums.experts = vec![0.0; s.tokens_per_expert.len()];
            }
            add_into(&mut sums.experts, &s.tokens_per_expert);
            sums.tokens += s.tokens as f64;
            sums.skipped += s.skipped as f64;
            sums.overflowed += s.overflowed as f64;
            for (t, counts) in s.per_task.iter().enumerate() {
                if counts.iter().all(|&c| c == 0.0) {
                    continue;
                }
                let name = task_names.get(t).cloned().unwrap_or_else(|| format!("task {t}"));
                let entry = sums.per_task.entry(name).or_insert_with(|| vec![0.0; counts.len()]);
                add_into(entry, counts);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Per point: expert shares, normalised usage entropy, skipped and overflowed shares;
    /// with `per_task`, each task's shares and the task-expert mutual information.
    pub fn points(&self, per_task: bool) -> BTreeMap<String, RoutingPoint> {
        let point = |s: &PointSums| {
            let per_task = per_task && !s.per_task.is_empty();
            RoutingPoint {
                share: shares(&s.experts),
                entropy: normalised_entropy(&s.experts),
                skipped: s.skipped / s.tokens.max(1.0),
                overflowed: s.overflowed / s.tokens.max(1.0),
                per_task_share: per_task.then(|| s.per_task.iter().map(|(t, c)| (t.clone(), shares(c))).collect()),
                task_expert_mi_bits: per_task.then(|| mutual_information(&s.per_task.values().cloned().collect::<Vec<_>>())),
            }
        };
        self.points.iter().map(|(name, s)| (name.clone(), point(s))).collect()
    }
}

fn shares(counts: &[f64]) -> Vec<f64> {
    let total: f64 = counts.iter().sum();
    counts.iter().map(|c| if total > 0.0 { c / total } else { 0.0 }).collect()
}

/// Entropy of the expert shares over the entropy of uniform use (1: every expert equally
/// used; 0: one expert takes everything).
pub fn normalised_entropy(counts: &[f64]) -> f64 {
    if counts.len() < 2 {
        return 1.0;
    }
    let h: f64 = shares(counts).iter().filter(|&&p| p > 0.0).map(|p| -p * p.ln()).sum();
    h / (counts.len() as f64).ln()
}

/// Mutual information (bits) between task and expert from joint counts `[task][expert]`:
/// 0 when every task uses the experts alike.
pub fn mutual_information(joint: &[Vec<f64>]) -> f64 {
    let total: f64 = joint.iter().flatten().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let experts = joint.first().map_or(0, Vec::len);
    let p_task: Vec<f64> = joint.iter().map(|r| r.iter().sum::<f64>() / total).collect();
    let p_expert: Vec<f64> = (0..experts).map(|e| joint.iter().map(|r| r[e]).sum::<f64>() / total).collect();
    let mut mi = 0.0;
    for (t, row) in joint.iter().enumerate() {
        for (e, &n) in row.iter().enumerate() {
            let p = n / total;
            if p > 0.0 {
                mi += p * (p / (p_task[t] * p_expert[e])).log2();
            }
        }
    }
    mi
}

/// Each auxiliary loss's mean over the training steps of the metrics log (balance and
/// z-losses of routers, fusion regularisation), by name.
pub fn mean_aux_losses(metrics: &Path) -> Result<BTreeMap<String, f64>> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for r in MetricsLog::steps(metrics)? {
        for (name, v) in r.aux_losses.into_iter().flatten() {
            let entry = sums.entry(name).or_default();
            entry.0 += v;
            entry.1 += 1;
        }
    }
    Ok(sums.into_iter().map(|(k, (sum, n))| (k, sum / n as f64)).collect())
}

/// Draws each routed point's expert shares over training (running mean of 25 steps),
/// one panel per point, from the `routing` fields of the metrics log. Writes nothing and
/// returns `false` when no step routed.
pub fn plot(metrics: &Path, out: &Path) -> Result<bool> {
    let mut series: BTreeMap<String, Vec<(f64, Vec<f64>)>> = BTreeMap::new();
    for r in MetricsLog::steps(metrics)? {
        for (point, v) in r.routing.into_iter().flatten() {
            series.entry(point).or_default().push((r.step as f64, v.share));
        }
    }
    if series.is_empty() {
        return Ok(false);
    }
    let err = |e: &dyn std::fmt::Display| Error::file(out, format!("drawing: {e}"));
    let cols = series.len().min(3);
    let rows = series.len().div_ceil(cols);
    let root = SVGBackend::new(out, (380 * cols as u32, 300 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    for (area, (point, steps)) in root.split_evenly((rows, cols)).iter().zip(&series) {
        let max_step = steps.last().map_or(1.0, |s| s.0).max(1.0);
        let experts = steps.iter().map(|s| s.1.len()).max().unwrap_or(0);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{point}: token share"), ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..max_step, 0.0..1.0)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("step").draw().map_err(|e| err(&e))?;
        for e in 0..experts {
            let raw: Vec<(f64, f64)> = steps.iter().map(|(s, share)| (*s, share.get(e).copied().unwrap_or(0.0))).collect();
            let smooth: Vec<(f64, f64)> = raw
                .iter()
                .enumerate()
                .map(|(i, &(s, _))| {
                    let from = i.saturating_sub(24);
                    (s, raw[from..=i].iter().map(|p| p.1).sum::<f64>() / (i - from + 1) as f64)
                })
                .collect();
            let color = Palette99::pick(e).to_rgba();
            chart
                .draw_series(LineSeries::new(smooth, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("expert {e}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], color.stroke_width(2)));
        }
        if point == series.keys().next().expect("not empty") {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 10))
                .draw()
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_and_mutual_information_take_their_extreme_values() {
        assert!((normalised_entropy(&[5.0, 5.0, 5.0, 5.0]) - 1.0).abs() < 1e-12);
        assert_eq!(normalised_entropy(&[9.0, 0.0, 0.0]), 0.0);
        // Two tasks on two experts each their own: one bit; both alike: zero.
        assert!((mutual_information(&[vec![4.0, 0.0], vec![0.0, 4.0]]) - 1.0).abs() < 1e-12);
        assert!(mutual_information(&[vec![2.0, 2.0], vec![3.0, 3.0]]).abs() < 1e-12);
    }
}
