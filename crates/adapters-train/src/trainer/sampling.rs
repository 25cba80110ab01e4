//! Which task and rows each step trains on: task weights, the seeded task choice,
//! each task's cursor through its epoch's batches, and the parameter groups of a stage.
//! Pure functions of the config's numbers and the data's sizes (unit-tested below without
//! a model); the trainer's methods only hand them its state.

use super::*;
use crate::config::Stage;
use rand::{Rng, SeedableRng};

impl Trainer {
    /// The rows of step `step`, as (task, rows) parts: one task's batch, drawn by the
    /// sampling weights; or, with `mixed_task_batches`, a slice of every task sized by them.
    pub(super) fn next_batch(&self, step: usize, cursors: &mut [Cursor]) -> Vec<(usize, Vec<usize>)> {
        let t = &self.config.training;
        let sizes: Vec<usize> = self.tasks.iter().map(|task| task.data.train.len()).collect();
        let weights = task_weights(&sizes, t.sampling.temperature());
        let parts: Vec<(usize, usize)> = if t.mixed_task_batches {
            mixed_rows(&weights, t.batch_size).into_iter().enumerate().collect()
        } else {
            vec![(pick_task(&weights, t.seed, step), t.batch_size)]
        };
        parts
            .into_iter()
            .map(|(task, rows)| {
                let lengths: Vec<usize> = self.tasks[task].data.train.ids.iter().map(Vec::len).collect();
                (task, next_rows(&mut cursors[task], &lengths, rows, t.group_by_length, t.seed, task))
            })
            .collect()
    }

    /// The groups that train at `step` (see [`active_groups`]).
    pub(super) fn active_groups(&self, step: usize) -> Option<BTreeSet<String>> {
        active_groups(&self.config.stage, step)
    }
}

/// Each task's share of the batches: sizes^(1/T), normalised (T = ∞: uniform).
pub(super) fn task_weights(sizes: &[usize], temperature: f64) -> Vec<f64> {
    let weights: Vec<f64> = sizes.iter().map(|&n| (n as f64).powf(1.0 / temperature)).collect();
    let total: f64 = weights.iter().sum();
    weights.into_iter().map(|w| w / total).collect()
}

/// The task of step `step`, drawn from a per-step seed by the weights.
pub(super) fn pick_task(weights: &[f64], seed: u64, step: usize) -> usize {
    if weights.len() == 1 {
        return 0;
    }
    let total: f64 = weights.iter().sum();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[seed, step as u64, salt::TASK_CHOICE]));
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len() - 1
}

/// Rows per task of a mixed-task batch: the batch size split by the weights, at least one
/// row each.
pub(super) fn mixed_rows(weights: &[f64], batch_size: usize) -> Vec<usize> {
    weights.iter().map(|w| ((batch_size as f64 * w).round() as usize).max(1)).collect()
}

/// The next `batch_size` rows of a task whose rows have these lengths: the cursor's batch
/// of its epoch's seeded order ([`epoch_batches`]), moving on to the next epoch after the
/// last batch.
pub(super) fn next_rows(
    cursor: &mut Cursor,
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
    task: usize,
) -> Vec<usize> {
    let batches = epoch_batches(lengths, batch_size, group_by_length, seed, task, cursor.epoch);
    let rows = batches[cursor.pos].clone();
    cursor.pos += 1;
    if cursor.pos == batches.len() {
        cursor.epoch += 1;
        cursor.pos = 0;
    }
    rows
}

/// The groups that train at `step`: the stage's, or `None` (everything the mode allows)
/// without stages; past the last stage, nothing.
pub(super) fn active_groups(stages: &[Stage], step: usize) -> Option<BTreeSet<String>> {
    let mut end = 0;
    for stage in stages {
        match stage.steps {
            Some(n) => end += n,
            None => end = usize::MAX,
        }
        if step < end {
            return Some(stage.train.iter().cloned().collect());
        }
    }
    (!stages.is_empty()).then(BTreeSet::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_weights_follow_the_temperature() {
        let sizes = [100, 400];
        assert_eq!(task_weights(&sizes, 1.0), [0.2, 0.8], "proportional");
        assert_eq!(task_weights(&sizes, f64::INFINITY), [0.5, 0.5], "uniform");
        let t2 = task_weights(&sizes, 2.0);
        assert!((t2[0] - 10.0 / 30.0).abs() < 1e-12 && (t2[1] - 20.0 / 30.0).abs() < 1e-12, "{t2:?}");
    }

    #[test]
    fn the_task_choice_is_seeded_per_step_and_drawn_by_the_weights() {
        let weights = [0.2, 0.3, 0.5];
        let picks: Vec<usize> = (0..3000).map(|step| pick_task(&weights, 7, step)).collect();
        assert_eq!(picks, (0..3000).map(|step| pick_task(&weights, 7, step)).collect::<Vec<_>>(), "the same seed, the same tasks");
        assert_ne!(picks, (0..3000).map(|step| pick_task(&weights, 8, step)).collect::<Vec<_>>(), "another seed, other tasks");
        for (task, w) in weights.iter().enumerate() {
            let share = picks.iter().filter(|&&p| p == task).count() as f64 / picks.len() as f64;
            assert!((share - w).abs() < 0.03, "task {task}: {share} of the steps for weight {w}");
        }
        assert_eq!(pick_task(&[1.0], 7, 3), 0);
    }

    #[test]
    fn mixed_batches_split_the_batch_by_weight_with_a_row_for_every_task() {
        assert_eq!(mixed_rows(&[0.25, 0.75], 32), [8, 24]);
        assert_eq!(mixed_rows(&[0.001, 0.999], 32), [1, 32]);
    }

    #[test]
    fn a_cursor_visits_every_row_once_per_epoch_in_a_new_order_each_epoch() {
        let lengths: Vec<usize> = (0..10).map(|i| 3 + i % 4).collect();
        for group in [false, true] {
            let mut cursor = Cursor { epoch: 0, pos: 0 };
            let epoch = |cursor: &mut Cursor| -> Vec<usize> {
                let start = cursor.epoch;
                let mut rows = Vec::new();
                while cursor.epoch == start {
                    let batch = next_rows(cursor, &lengths, 4, group, 42, 1);
                    assert!(!batch.is_empty() && batch.len() <= 4);
                    rows.extend(batch);
                }
                rows
            };
            let (first, second) = (epoch(&mut cursor), epoch(&mut cursor));
            for rows in [&first, &second] {
                let mut sorted = rows.clone();
                sorted.sort();
                assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "every row once per epoch (grouped: {group})");
            }
            assert_ne!(first, second, "epochs are shuffled apart (grouped: {group})");
            assert_eq!(cursor, Cursor { epoch: 2, pos: 0 });
        }
    }

    #[test]
    fn stages_hand_over_at_their_step_counts() {
        let stage = |steps, train: &[&str]| Stage { steps, train: train.iter().map(|s| s.to_string()).collect() };
        let stages = [stage(Some(3), &["a"]), stage(Some(2), &["b", "c"])];
        let names = |step| active_groups(&stages, step).map(|g| g.into_iter().collect::<Vec<_>>());
        assert_eq!(names(0), Some(vec!["a".to_string()]));
        assert_eq!(names(2), Some(vec!["a".to_string()]));
        assert_eq!(names(3), Some(vec!["b".to_string(), "c".to_string()]));
        assert_eq!(names(5), Some(vec![]), "past the last stage nothing trains");
        assert_eq!(active_groups(&[], 5), None, "without stages the mode decides");
        assert_eq!(active_groups(&[stage(Some(1), &["a"]), stage(None, &["b"])], 1_000_000), Some(["b".to_string()].into()));
    }
}
