//! What the fusion layers attend to: each fusion's attention over its members, averaged
//! over the tokens of the dev split, per layer (`fusion_attention.json`, and a heatmap in
//! `fusion_attention.svg`), so one can see which adapters a fusion draws on, and where.

use crate::error::{Error, Result};
use crate::records::{FusionAttentionEntry, FusionAttentionPoint, FusionAttentionReport, FUSION_ATTENTION_FILE};
use adapters_core::{io, FusionAttention, Point, Setup};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::BTreeMap;
use std::path::Path;

pub const PLOT_FILE: &str = "fusion_attention.svg";

/// Running sums of attention weights per (task, fusion) and point, over real tokens.
#[derive(Default)]
pub struct AttentionSums {
    fusions: BTreeMap<(String, String), FusionSums>,
}

struct FusionSums {
    members: Vec<String>,
    /// Per point: the weights summed over tokens, and the token count.
    points: BTreeMap<Point, (Vec<f64>, usize)>,
}

impl AttentionSums {
    /// Adds the attention recorded in one forward pass over right-padded rows of these
    /// lengths (padding positions are left out).
    pub fn add(&mut self, task: &str, setup: &Setup, recorded: Vec<FusionAttention>, lengths: &[usize]) -> Result<()> {
        for FusionAttention { fusion, point, weights } in recorded {
            let weights = weights.to_dtype(candle_core::DType::F32)?.to_vec3::<f32>()?;
            if weights.len() != lengths.len() {
                continue; // a fusion inside a parallel or split block: rows are not the batch's
            }
            let entry = self
                .fusions
                .entry((task.to_string(), fusion.clone()))
                .or_insert_with(|| FusionSums { members: members_of(setup, &fusion), points: BTreeMap::new() });
            for (row, &len) in weights.iter().zip(lengths) {
                for token in row.iter().take(len) {
                    let (sums, count) = entry.points.entry(point).or_insert_with(|| (vec![0.0; token.len()], 0));
                    sums.iter_mut().zip(token).for_each(|(s, &w)| *s += w as f64);
                    *count += 1;
                }
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.fusions.is_empty()
    }

    /// The mean weights: one entry per fusion, its members and one row per point.
    pub fn report(&self, split: &str) -> FusionAttentionReport {
        let fusions = self
            .fusions
            .iter()
            .map(|((task, fusion), f)| FusionAttentionEntry {
                task: task.clone(),
                fusion: fusion.clone(),
                members: f.members.clone(),
                points: f
                    .points
                    .iter()
                    .map(|(p, (sums, n))| FusionAttentionPoint {
                        layer: p.layer,
                        site: p.site.to_string(),
                        tokens: *n,
                        weights: sums.iter().map(|s| s / (*n).max(1) as f64).collect(),
                    })
                    .collect(),
            })
            .collect();
        FusionAttentionReport { split: split.to_string(), fusions }
    }
}

/// The members of the fusion block that uses fusion layer `fusion`, as written in the
/// setup (`a`, or `stack(a, b)`); numbered when the block is not found.
fn members_of(setup: &Setup, fusion: &str) -> Vec<String> {
    fn find(s: &Setup, fusion: &str) -> Option<Vec<String>> {
        if let Setup::Fuse { children, fusion: name } = s {
            if name.clone().unwrap_or_else(|| Setup::default_fusion_name(children)) == fusion {
                return Some(children.iter().map(ToString::to_string).collect());
            }
        }
        s.children().iter().find_map(|c| find(c, fusion))
    }
    find(setup, fusion).unwrap_or_default()
}

/// Writes the JSON and the heatmap into `dir`.
pub fn write(dir: &Path, report: &FusionAttentionReport) -> Result<()> {
    io::write_atomic(&dir.join(FUSION_ATTENTION_FILE), serde_json::to_string_pretty(report)?.as_bytes())?;
    plot(report, &dir.join(PLOT_FILE))
}

/// One heatmap per fusion: a row per layer, a column per member, shade and number the
/// mean attention weight.
pub fn plot(report: &FusionAttentionReport, out: &Path) -> Result<()> {
    let fusions = &report.fusions;
    let (cell_w, cell_h, label_w, head_h) = (130i32, 30i32, 150i32, 70i32);
    let panel = |f: &FusionAttentionEntry| {
        let members = f.members.len().max(1) as i32;
        let rows = f.points.len().max(1) as i32;
        (label_w + members * cell_w + 20, head_h + rows * cell_h + 20)
    };
    let width = fusions.iter().map(|f| panel(f).0).max().unwrap_or(400);
    let height: i32 = fusions.iter().map(|f| panel(f).1).sum::<i32>().max(100);
    let err = |e: &dyn std::fmt::Display| Error::file(out, format!("drawing: {e}"));
    let root = SVGBackend::new(out, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let text = |size: i32, h: HPos| ("sans-serif", size).into_font().color(&BLACK).pos(Pos::new(h, VPos::Center));
    let mut top = 0;
    for f in fusions {
        let members = &f.members;
        let title = format!("fusion `{}` (task {}): mean attention per layer over {} tokens", f.fusion, f.task, report.split);
        root.draw_text(&title, &text(16, HPos::Left), (10, top + 18)).map_err(|e| err(&e))?;
        for (j, m) in members.iter().enumerate() {
            let x = label_w + j as i32 * cell_w + cell_w / 2;
            root.draw_text(m, &text(13, HPos::Center), (x, top + head_h - 14)).map_err(|e| err(&e))?;
        }
        for (i, p) in f.points.iter().enumerate() {
            let y = top + head_h + i as i32 * cell_h;
            let label = format!("layer {} {}", p.layer, p.site);
            root.draw_text(&label, &text(13, HPos::Left), (10, y + cell_h / 2)).map_err(|e| err(&e))?;
            for (j, w) in p.weights.iter().enumerate() {
                let w = w.clamp(0.0, 1.0);
                let x = label_w + j as i32 * cell_w;
                let shade = |c: f64| (255.0 - w * (255.0 - c)) as u8;
                let fill = RGBColor(shade(33.0), shade(102.0), shade(172.0));
                root.draw(&Rectangle::new([(x, y), (x + cell_w - 2, y + cell_h - 2)], fill.filled())).map_err(|e| err(&e))?;
                let ink = if w > 0.55 { &WHITE } else { &BLACK };
                let style = ("sans-serif", 13).into_font().color(ink).pos(Pos::new(HPos::Center, VPos::Center));
                root.draw_text(&format!("{w:.2}"), &style, (x + cell_w / 2, y + cell_h / 2)).map_err(|e| err(&e))?;
            }
        }
        top += panel(f).1;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
