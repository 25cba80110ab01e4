//! Which task and rows each step trains on: task weights, the seeded task choice,
//! each task's cursor through its epoch's batches, and the parameter groups of a stage.

use super::*;

impl Trainer {
    /// Each task's share of the batches: sizes^(1/T), normalised.
    pub(super) fn task_weights(&self) -> Vec<f64> {
        let temperature = self.config.training.sampling.temperature();
        let weights: Vec<f64> = self.tasks.iter().map(|t| (t.data.train.len() as f64).powf(1.0 / temperature)).collect();
        let total: f64 = weights.iter().sum();
        weights.into_iter().map(|w| w / total).collect()
    }

    /// The rows of step `step`, as (task, rows) parts: one task's batch, drawn by the
    /// sampling weights; or, with `mixed_task_batches`, a slice of every task sized by them.
    pub(super) fn next_batch(&self, step: usize, cursors: &mut [Cursor]) -> Vec<(usize, Vec<usize>)> {
        let t = &self.config.training;
        if !t.mixed_task_batches {
            let task = self.pick_task(step);
            return vec![(task, self.next_rows(&mut cursors[task], task, t.batch_size))];
        }
        self.task_weights()
            .into_iter()
            .enumerate()
            .map(|(task, w)| {
                let rows = ((t.batch_size as f64 * w).round() as usize).max(1);
                (task, self.next_rows(&mut cursors[task], task, rows))
            })
            .collect()
    }

    /// The task of step `step`, drawn from a per-step seed by the sampling weights.
    pub(super) fn pick_task(&self, step: usize) -> usize {
        if self.tasks.len() == 1 {
            return 0;
        }
        let weights = self.task_weights();
        let total: f64 = weights.iter().sum();
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[self.config.training.seed, step as u64, salt::TASK_CHOICE]));
        let mut u = rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                return i;
            }
            u -= w;
        }
        self.tasks.len() - 1
    }

    pub(super) fn next_rows(&self, cursor: &mut Cursor, task_idx: usize, batch_size: usize) -> Vec<usize> {
        let split = &self.tasks[task_idx].data.train;
        let lengths: Vec<usize> = split.ids.iter().map(Vec::len).collect();
        let t = &self.config.training;
        let batches = epoch_batches(&lengths, batch_size, t.group_by_length, t.seed, task_idx, cursor.epoch);
        let rows = batches[cursor.pos].clone();
        cursor.pos += 1;
        if cursor.pos == batches.len() {
            cursor.epoch += 1;
            cursor.pos = 0;
        }
        rows
    }

    /// The groups that train at `step`: the stage's, or by default everything the mode allows.
    pub(super) fn active_groups(&self, step: usize) -> Option<BTreeSet<String>> {
        let mut end = 0;
        for stage in &self.config.stage {
            match stage.steps {
                Some(n) => end += n,
                None => end = usize::MAX,
            }
            if step < end {
                return Some(stage.train.iter().cloned().collect());
            }
        }
        (!self.config.stage.is_empty()).then(BTreeSet::new)
    }
}
