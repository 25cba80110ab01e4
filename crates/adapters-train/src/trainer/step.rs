//! One training step: the forward over each task's rows, the losses, gradients and the
//! optimizer update.

use super::*;

impl Trainer {
    /// One optimizer step on a batch of (task, rows) parts. Every row carries its task id
    /// in the forward context; parts whose tasks use different adapter stacks are routed
    /// per row within the one forward.
    pub(super) fn train_step(
        &mut self,
        step: usize,
        batch: &[(usize, Vec<usize>)],
        lr: f64,
    ) -> Result<(f64, f64, usize, usize, StepReports)> {
        let seed = self.config.training.seed;
        let device = self.model.backbone.device().clone();
        let task_ids: Vec<u32> = batch.iter().flat_map(|(task, rows)| std::iter::repeat_n(*task as u32, rows.len())).collect();
        let examples = task_ids.len();
        let mut ctx = ForwardCtx::training_seeded(mix(&[seed, step as u64, salt::DROPOUT])).with_task_ids(Tensor::new(task_ids, &device)?);
        let (first, _) = batch[0];
        let same = |a: &Task, b: &Task| a.stack == b.stack && a.setup == b.setup;
        if batch.iter().all(|(task, _)| same(&self.tasks[*task], &self.tasks[first])) {
            self.activate_task(first)?;
        } else {
            self.model.backbone.adapters_mut().activate(&[])?;
            let choices: Vec<Vec<String>> =
                batch.iter().flat_map(|(task, rows)| std::iter::repeat_n(self.tasks[*task].stack.clone(), rows.len())).collect();
            ctx = ctx.with_row_choices(&choices, &device)?;
        }
        let ids: Vec<&[u32]> =
            batch.iter().flat_map(|(task, rows)| rows.iter().map(|&i| self.tasks[*task].data.train.ids[i].as_slice())).collect();
        let tokens: usize = ids.iter().map(|r| r.len()).sum();
        let kind = self.tasks[first].kind;
        let (padded, mask) = pad(&ids, &device)?;
        let loss_mask = match kind {
            TaskType::Chat => {
                let rows: Vec<&[u32]> = batch
                    .iter()
                    .flat_map(|(task, rows)| rows.iter().map(|&i| self.tasks[*task].data.train.loss_mask[i].as_slice()))
                    .collect();
                Some(pad(&rows, &device)?.0)
            }
            _ => None,
        };
        let head = |hidden: Option<&Tensor>| match kind {
            TaskType::CausalLm | TaskType::Chat => {
                Ok(lm_loss_of(&self.model.backbone, hidden.expect("a decoder runs"), &padded, loss_mask.as_ref())?.0)
            }
            TaskType::Classification => self.classification_loss(batch, hidden.map(|h| (h, &mask)), ids.len(), &ctx),
        };
        let needs_backbone = kind.is_language_modelling() || batch.iter().any(|(task, _)| self.tasks[*task].features.is_none());
        let adversarial = self.config.training.adversarial.as_ref().filter(|_| kind == TaskType::Classification);
        let (loss, mut grads, reports) = if let Some(attack) = adversarial {
            let parts = |h: &Tensor, c: &ForwardCtx| self.classification_parts(batch, Some((h, &mask)), ids.len(), c);
            adversarial::loss_and_grads(&self.model.backbone, &padded, &mask, &ctx, attack, parts)?
        } else if needs_backbone {
            let vars: Vec<Var> = self.params.iter().map(|p| p.var.clone()).collect();
            let checkpointing = self.config.training.gradient_checkpointing;
            loss_and_grads(&self.model.backbone, &padded, &mask, &ctx, &vars, checkpointing, |h| head(Some(h)))?
        } else {
            let loss = head(None)?;
            (loss.detach(), loss.backward()?, StepReports::default())
        };
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            fail!(Run, "the loss became {loss_value} at step {}; lower `training.lr` or turn on `training.max_grad_norm`", step + 1);
        }
        let active = self.active_groups(step);
        let mut trained = Vec::new();
        for p in &self.params {
            if active.as_ref().is_some_and(|a| !p.groups.iter().any(|g| a.contains(g))) {
                grads.remove(p.var.as_tensor());
            } else {
                trained.push(p.var.clone());
            }
        }
        let max = self.config.training.max_grad_norm;
        let norm = clip_grad_norm(&trained, &mut grads, if max > 0.0 { max } else { f64::INFINITY })?;
        self.optimizer.step(&grads, lr)?;
        Ok((loss_value, norm, examples, tokens, reports))
    }

    /// Cross-entropy over all `rows` rows of a batch of classification parts: each part is
    /// pooled its task's way from the backbone's `hidden` states (with their mask), or
    /// read from its cached head-only features, and scored by its task's head.
    pub(super) fn classification_loss(
        &self,
        batch: &[(usize, Vec<usize>)],
        hidden: Option<(&Tensor, &Tensor)>,
        total_rows: usize,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        adversarial::cross_entropy(&self.classification_parts(batch, hidden, total_rows, ctx)?)
    }

    /// Each part's logits and labels, weighted by its share of the `total_rows` rows (see
    /// [`Trainer::classification_loss`]).
    pub(super) fn classification_parts(
        &self,
        batch: &[(usize, Vec<usize>)],
        hidden: Option<(&Tensor, &Tensor)>,
        total_rows: usize,
        ctx: &ForwardCtx,
    ) -> Result<Vec<LabelledLogits>> {
        let mut parts = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for (task_idx, rows) in batch {
            let task = &self.tasks[*task_idx];
            let n = rows.len();
            let features = match (&task.features, hidden) {
                (Some(f), _) => {
                    f.train.index_select(&Tensor::from_vec(rows.iter().map(|&i| i as u32).collect(), n, f.train.device())?, 0)?
                }
                (None, Some((h, m))) => pool(&self.model.backbone, &h.narrow(0, offset, n)?, &m.narrow(0, offset, n)?, task.pooling, ctx)?,
                (None, None) => unreachable!("hidden states are computed when a task has no cached features"),
            };
            offset += n;
            let logits = task.head.as_ref().expect("classification head").forward(&features, self.config.training.dropout, ctx)?;
            let labels: Vec<u32> = rows.iter().map(|&i| task.data.train.labels[i]).collect();
            let labels = Tensor::new(labels, logits.device())?;
            parts.push(LabelledLogits { logits, labels, weight: n as f64 / total_rows as f64 });
        }
        Ok(parts)
    }
}
