//! Evaluation metrics and the JSONL metrics log.

use crate::error::{Result, Within};
use crate::records::StepRecord;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Share of predictions equal to the gold label.
pub fn accuracy(gold: &[u32], pred: &[u32]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    gold.iter().zip(pred).filter(|(g, p)| g == p).count() as f64 / gold.len() as f64
}

/// Unweighted mean of per-label F1 over the labels that occur in gold or predictions
/// (scikit-learn's `f1_score(average="macro")`).
pub fn macro_f1(gold: &[u32], pred: &[u32], num_labels: usize) -> f64 {
    let mut tp = vec![0usize; num_labels];
    let mut fp = vec![0usize; num_labels];
    let mut fn_ = vec![0usize; num_labels];
    for (&g, &p) in gold.iter().zip(pred) {
        if g == p {
            tp[g as usize] += 1;
        } else {
            fp[p as usize] += 1;
            fn_[g as usize] += 1;
        }
    }
    let present: Vec<usize> = (0..num_labels).filter(|&l| tp[l] + fp[l] + fn_[l] > 0).collect();
    if present.is_empty() {
        return 0.0;
    }
    let f1 = |l: usize| {
        let denom = 2 * tp[l] + fp[l] + fn_[l];
        if denom == 0 {
            0.0
        } else {
            2.0 * tp[l] as f64 / denom as f64
        }
    };
    present.iter().map(|&l| f1(l)).sum::<f64>() / present.len() as f64
}

/// Appends JSON lines to `metrics.jsonl`, flushing each so a crash loses nothing.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log; on a resumed run, lines after `keep_until_step` (written after the
    /// checkpoint) are dropped first so the log matches the restored state.
    pub fn open(path: &Path, keep_until_step: Option<usize>) -> Result<Self> {
        let kept = match (keep_until_step, std::fs::read_to_string(path)) {
            (Some(step), Ok(text)) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            _ => String::new(),
        };
        adapters_core::io::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).within(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    /// Appends one record as a JSON line.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").within(|| format!("writing {}", self.path.display()))
    }

    /// Every record in a log file.
    pub fn read(path: &Path) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(path).within(|| format!("reading {}", path.display()))?;
        text.lines().map(|l| serde_json::from_str(l).within(|| format!("{}: bad line", path.display()))).collect()
    }

    /// The training steps' records of a log file (evaluation lines, which carry a
    /// `split`, left out); a step line that does not read as a [`StepRecord`] is an error.
    pub fn steps(path: &Path) -> Result<Vec<StepRecord>> {
        Self::read(path)?
            .into_iter()
            .filter(|r| r.get("split").is_none())
            .map(|r| serde_json::from_value(r).within(|| format!("{}: a step line that is not a step record", path.display())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_macro_f1_match_scikit_learn() {
        // sklearn: f1_score([0,0,1,1,2], [0,1,1,1,0], average="macro") = 0.4333...
        let (g, p) = ([0u32, 0, 1, 1, 2], [0u32, 1, 1, 1, 0]);
        assert!((accuracy(&g, &p) - 0.6).abs() < 1e-12);
        assert!((macro_f1(&g, &p, 3) - 0.433_333_333_333_333_3).abs() < 1e-12);
        assert_eq!(macro_f1(&[0, 1], &[0, 1], 5), 1.0);
    }
}
