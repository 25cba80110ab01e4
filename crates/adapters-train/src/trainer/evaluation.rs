//! Evaluation on the dev and test splits, with fusion attention and routing recorded.

use super::*;

impl Trainer {
    /// Metrics per task on dev or test (tasks without that split are left out).
    pub(super) fn evaluate(&mut self, which: EvalSplit) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
        self.evaluate_recording(which, None)
    }

    /// The task names, by task id.
    pub(super) fn task_names(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.name.clone()).collect()
    }

    /// [`Trainer::evaluate`], also summing the fusion layers' attention into `attention`
    /// for classification tasks whose setup fuses adapters.
    pub(super) fn evaluate_recording(
        &mut self,
        which: EvalSplit,
        mut recording: Option<&mut Recording>,
    ) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
        let mut out = BTreeMap::new();
        let task_names = self.task_names();
        let device = self.model.backbone.device().clone();
        for i in 0..self.tasks.len() {
            let ctx_for = |rows: usize| -> Result<ForwardCtx> {
                Ok(ForwardCtx::inference().with_task_ids(Tensor::new(vec![i as u32; rows], &device)?))
            };
            self.activate_task(i)?;
            let task = &self.tasks[i];
            let (split, features) = match which {
                EvalSplit::Dev => (task.data.dev.as_ref(), task.features.as_ref().and_then(|f| f.dev.as_ref())),
                EvalSplit::Test => (task.data.test.as_ref(), task.features.as_ref().and_then(|f| f.test.as_ref())),
            };
            let Some(split) = split else { continue };
            let lengths: Vec<usize> = split.ids.iter().map(Vec::len).collect();
            let mut metrics = BTreeMap::new();
            match task.kind {
                TaskType::Classification => {
                    let head = task.head.as_ref().expect("classification head");
                    let (mut pred, mut gold, mut loss_sum) = (Vec::new(), Vec::new(), 0.0);
                    for batch in sorted_batches(&lengths, 64) {
                        let f = match features {
                            Some(f) => {
                                f.index_select(&Tensor::from_vec(batch.iter().map(|&i| i as u32).collect(), batch.len(), f.device())?, 0)?
                            }
                            None => {
                                let ids: Vec<&[u32]> = batch.iter().map(|&i| split.ids[i].as_slice()).collect();
                                let fused = task.setup.as_ref().filter(|s| !s.fusion_names().is_empty());
                                let ctx = match (&recording, fused) {
                                    (Some(_), Some(_)) => ctx_for(ids.len())?.with_fusion_attentions().with_routing(),
                                    (Some(_), None) => ctx_for(ids.len())?.with_routing(),
                                    (None, _) => ctx_for(ids.len())?,
                                };
                                let f = pooled(&self.model.backbone, &ids, task.pooling, &ctx)?;
                                if let Some(rec) = recording.as_deref_mut() {
                                    let aux = ctx.take_aux();
                                    if let Some(setup) = fused {
                                        let lengths: Vec<usize> = ids.iter().map(|r| r.len()).collect();
                                        rec.attention.add(&task.name, setup, aux.fusion_attentions, &lengths)?;
                                    }
                                    rec.routing.add(&aux.routing, &task_names);
                                }
                                f
                            }
                        };
                        let logits = head.forward(&f, 0.0, &ForwardCtx::inference())?;
                        let labels: Vec<u32> = batch.iter().map(|&i| split.labels[i]).collect();
                        let loss = candle_nn::loss::cross_entropy(&logits, &Tensor::new(labels.as_slice(), logits.device())?)?;
                        loss_sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
                        pred.extend(argmax(&logits)?);
                        gold.extend(labels);
                    }
                    metrics.insert("accuracy".into(), accuracy(&gold, &pred));
                    metrics.insert("macro_f1".into(), macro_f1(&gold, &pred, task.data.labels.len()));
                    metrics.insert("loss".into(), loss_sum / gold.len() as f64);
                }
                TaskType::CausalLm | TaskType::Chat => {
                    let (mut nll, mut count) = (0.0, 0usize);
                    for batch in sorted_batches(&lengths, 8) {
                        let ids: Vec<&[u32]> = batch.iter().map(|&i| split.ids[i].as_slice()).collect();
                        let marks: Option<Vec<&[u32]>> =
                            (task.kind == TaskType::Chat).then(|| batch.iter().map(|&i| split.loss_mask[i].as_slice()).collect());
                        let (loss, n) = lm_loss(&self.model.backbone, &ids, marks.as_deref(), &ctx_for(ids.len())?)?;
                        nll += loss.to_scalar::<f32>()? as f64 * n as f64;
                        count += n;
                    }
                    metrics.insert("loss".into(), nll / count as f64);
                    metrics.insert("perplexity".into(), (nll / count as f64).exp());
                }
            }
            out.insert(task.name.clone(), metrics);
        }
        Ok(out)
    }

    pub(super) fn log_eval(
        &self,
        log: &mut MetricsLog,
        step: usize,
        split: &str,
        results: &BTreeMap<String, BTreeMap<String, f64>>,
    ) -> Result<()> {
        for (task, metrics) in results {
            let mut record = json!({"step": step, "split": split, "task": task});
            for (k, v) in metrics {
                record[k] = json!(v);
            }
            log.write(&record)?;
        }
        Ok(())
    }
}

pub(super) fn print_eval(step: usize, split: &str, results: &BTreeMap<String, BTreeMap<String, f64>>) {
    for (task, m) in results {
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        eprintln!("step {step:>6}  {split} {task}: {}", parts.join("  "));
    }
}
