//! The training/dev curves of a run.

use crate::error::{Error, Result};
use crate::metrics::MetricsLog;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

pub const PLOT_FILE: &str = "curves.svg";

/// Draws the training loss (and its running mean) and each task's dev metrics against
/// the step, side by side, as SVG.
pub fn plot(metrics: &Path, out: &Path) -> Result<()> {
    let records = MetricsLog::read(metrics)?;
    let mut loss = Vec::new();
    let mut dev: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &records {
        let step = r["step"].as_f64().unwrap_or(0.0);
        if r.get("split").is_none() {
            if let Some(l) = r["loss"].as_f64() {
                loss.push((step, l));
            }
        } else if r["split"] == "dev" {
            let task = r["task"].as_str().unwrap_or("?");
            for key in ["accuracy", "perplexity"] {
                if let Some(v) = r[key].as_f64() {
                    dev.entry(format!("{task} {key}")).or_default().push((step, v));
                }
            }
        }
    }
    let smooth: Vec<(f64, f64)> = loss
        .iter()
        .enumerate()
        .map(|(i, &(s, _))| {
            let from = i.saturating_sub(24);
            (s, loss[from..=i].iter().map(|p| p.1).sum::<f64>() / (i - from + 1) as f64)
        })
        .collect();
    let err = |e: &dyn std::fmt::Display| Error::file(out, format!("drawing: {e}"));
    let root = SVGBackend::new(out, (1100, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(550);
    let max_step = loss.last().map_or(1.0, |p| p.0).max(1.0);
    let (lo, hi) = bounds(loss.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&left)
        .caption("training loss", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_step, lo..hi)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| err(&e))?;
    chart.draw_series(LineSeries::new(loss.iter().copied(), RGBColor(180, 200, 230))).map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("running mean (25 steps)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    let (lo, hi) = bounds(dev.values().flatten().map(|p| p.1));
    let mut chart = ChartBuilder::on(&right)
        .caption("dev metrics", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_step, lo..hi)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("step").draw().map_err(|e| err(&e))?;
    for (i, (name, points)) in dev.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(3))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    if !dev.is_empty() {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}
