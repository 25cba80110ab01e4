//! Batching across requests for `/v1/embeddings` and `/v1/classify`: requests that arrive
//! while the compute slots are busy, or within a short wait after one frees, run as one
//! forward pass even when they use different adapters. Each row goes through its own
//! adapter (`ForwardCtx::with_row_choices`), and rows whose adapters share a
//! configuration are computed together over weights stacked per row.

use crate::error::ApiError;
use crate::server::{AppState, Target};
use adapters_core::ForwardCtx;
use adapters_models::heads::{l2_normalize, mean_pool};
use adapters_models::{Backbone, HoldsAdapters};
use adapters_train::forward::{classify, pad, pool};
use serde_json::{json, Value};
use std::sync::Weak;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How requests are batched.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// Most rows in one forward pass: texts of embedding and classification requests (a
    /// request with more runs alone), or generations in one decoding step. 0 turns
    /// batching off: each request alone (a generation on a compute slot of its own).
    pub max_rows: usize,
    /// How long the first request of a batch waits for more once a compute slot is free.
    pub max_wait: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching { max_rows: 32, max_wait: Duration::from_millis(2) }
    }
}

/// What a request wants from its rows.
pub(crate) enum Work {
    /// Mean-pooled, L2-normalised sentence embeddings.
    Embed,
    /// Class probabilities from the resident's head at this index.
    Classify { head: usize },
}

/// One request waiting for a forward pass.
pub(crate) struct Job {
    pub target: Target,
    pub texts: Vec<String>,
    pub work: Work,
    pub queued: Instant,
    /// The response body's `data` part and the tokens read, or why not.
    pub reply: oneshot::Sender<Result<(Value, usize), ApiError>>,
}

/// The queue in front of the compute slots.
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
}

impl Batcher {
    /// Starts the task that forms batches (it ends when the server state is dropped).
    pub fn start(state: Weak<AppState>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(form_batches(state, rx));
        Batcher { tx }
    }

    /// Queues a request and waits for its result.
    pub async fn run(&self, target: Target, texts: Vec<String>, work: Work) -> Result<(Value, usize), ApiError> {
        let (reply, result) = oneshot::channel();
        let job = Job { target, texts, work, queued: Instant::now(), reply };
        self.tx.send(job).map_err(|_| ApiError::internal("the server is shutting down"))?;
        result.await.map_err(|_| ApiError::internal("the forward pass failed"))?
    }
}

/// Takes the first waiting request, waits for a compute slot, then adds what else is
/// waiting (or arrives within `max_wait`) up to `max_rows` rows, and runs the batch on the
/// slot in the blocking pool while the next batch forms.
async fn form_batches(state: Weak<AppState>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let Some(state) = state.upgrade() else { return };
        let slot = match state.compute_slot().await {
            Ok(slot) => slot,
            Err(e) => {
                let _ = first.reply.send(Err(e));
                continue;
            }
        };
        let limits = state.batching();
        let mut rows = first.texts.len();
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + limits.max_wait;
        while rows < limits.max_rows {
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(_) => tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten(),
            };
            let Some(job) = next else { break };
            if rows + job.texts.len() > limits.max_rows {
                carried = Some(job);
                break;
            }
            rows += job.texts.len();
            jobs.push(job);
        }
        for job in &jobs {
            state.metrics.queue.get_or_create(&job.target.labels()).observe(job.queued.elapsed().as_secs_f64());
        }
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            run_batch(&state, jobs);
        });
    }
}

/// Runs one batch: jobs on composition setups (which rows cannot choose) on their own
/// models, the rest in one forward pass.
fn run_batch(state: &AppState, jobs: Vec<Job>) {
    state.metrics.batch_rows.observe(jobs.iter().map(|j| j.texts.len()).sum::<usize>() as f64);
    let (on_setups, plain): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|j| matches!(&j.target, Target::Adapter(r) if r.manifest.contents.setup.is_some()));
    let mut models = 0;
    for job in on_setups {
        models += 1;
        let model = state.model_of(&job.target).clone();
        run_on(state, &model, false, vec![job]);
    }
    let mut ids: Vec<String> = plain.iter().map(|j| j.target.id()).collect();
    ids.sort();
    ids.dedup();
    models += ids.len();
    match ids.len() {
        0 => {}
        // One model: its own path (a single active adapter runs fused).
        1 => {
            let model = state.model_of(&plain[0].target).clone();
            run_on(state, &model, false, plain);
        }
        _ => match mixed_model(state, plain.iter().map(|j| &j.target)) {
            Ok(model) => run_on(state, &model, true, plain),
            Err(e) => plain.into_iter().for_each(|j| {
                let _ = j.reply.send(Err(ApiError::internal(e.clone())));
            }),
        },
    }
    state.metrics.batch_models.observe(models as f64);
}

/// The base model with the adapter of every resident among `targets` attached (shared,
/// not copied) under its `name@version`, none active.
pub(crate) fn mixed_model<'a>(state: &AppState, targets: impl Iterator<Item = &'a Target>) -> Result<Backbone, String> {
    let mut model = state.model_of(&Target::Base).clone();
    for target in targets {
        let Target::Adapter(resident) = target else { continue };
        let key = resident.key();
        if model.adapters().get(&key).is_some() {
            continue;
        }
        let adapter =
            resident.model.adapters().get(&resident.manifest.name).ok_or_else(|| format!("{key} is resident without its adapter"))?.clone();
        model.adapters_mut().add_shared(&key, adapter).map_err(|e| e.to_string())?;
    }
    Ok(model)
}

/// Tokenizes every job's texts, runs one forward pass over all their rows on `model`
/// (with `per_row`, each row through its job's adapter), and answers each job.
fn run_on(state: &AppState, model: &Backbone, per_row: bool, jobs: Vec<Job>) {
    match forward(state, model, per_row, &jobs) {
        Ok(results) => jobs.into_iter().zip(results).for_each(|(job, r)| {
            let _ = job.reply.send(r);
        }),
        Err(e) => jobs.into_iter().for_each(|job| {
            let _ = job.reply.send(Err(ApiError { status: e.status, message: e.message.clone() }));
        }),
    }
}

type JobResult = Result<(Value, usize), ApiError>;

fn forward(state: &AppState, model: &Backbone, per_row: bool, jobs: &[Job]) -> Result<Vec<JobResult>, ApiError> {
    let tokenizer = state.tokenizer();
    let bad = |e: adapters_models::Error| ApiError::bad_request(e.to_string());
    let mut rows: Vec<Vec<u32>> = Vec::new();
    for job in jobs {
        match job.work {
            Work::Embed => {
                let refs: Vec<&str> = job.texts.iter().map(String::as_str).collect();
                let batch = tokenizer.encode_batch(&refs).map_err(bad)?;
                for (ids, mask) in batch.ids.into_iter().zip(batch.attention_mask) {
                    let len = mask.iter().filter(|&&m| m == 1).count();
                    rows.push(ids[..len].to_vec());
                }
            }
            Work::Classify { .. } => {
                for text in &job.texts {
                    rows.push(
                        adapters_train::encode_truncated(tokenizer, text, 512, model.is_encoder())
                            .map_err(|e| ApiError::bad_request(e.to_string()))?,
                    );
                }
            }
        }
    }
    let internal = |e: candle_core::Error| ApiError::internal(e.to_string());
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let (ids, mask) = pad(&refs, model.device()).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut ctx = ForwardCtx::inference();
    if per_row {
        let choices: Vec<Vec<String>> = jobs
            .iter()
            .flat_map(|j| {
                let stack = match &j.target {
                    Target::Base => vec![],
                    Target::Adapter(r) => vec![r.key()],
                };
                std::iter::repeat_n(stack, j.texts.len())
            })
            .collect();
        ctx = ctx.with_row_choices(&choices, model.device()).map_err(internal)?;
    }
    let hidden = model.hidden_states(&ids, &mask, &ctx).map_err(internal)?;
    let mut start = 0;
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let n = job.texts.len();
        let tokens = rows[start..start + n].iter().map(Vec::len).sum();
        let (h, m) = (hidden.narrow(0, start, n).map_err(internal)?, mask.narrow(0, start, n).map_err(internal)?);
        start += n;
        results.push(answer(job, &h, &m).map(|v| (v, tokens)));
    }
    Ok(results)
}

/// A job's response body from the hidden states and mask of its rows.
fn answer(job: &Job, hidden: &candle_core::Tensor, mask: &candle_core::Tensor) -> Result<Value, ApiError> {
    let internal = |e: candle_core::Error| ApiError::internal(e.to_string());
    match (&job.work, &job.target) {
        (Work::Embed, _) => {
            let vectors: Vec<Vec<f32>> =
                l2_normalize(&mean_pool(hidden, mask).map_err(internal)?).map_err(internal)?.to_vec2().map_err(internal)?;
            let data: Vec<Value> =
                vectors.into_iter().enumerate().map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v})).collect();
            Ok(json!({"object": "list", "data": data}))
        }
        (Work::Classify { head }, Target::Adapter(resident)) => {
            let head = &resident.heads[*head];
            let ctx = ForwardCtx::inference();
            let logits = pool(hidden, mask, head.config.pooling)
                .and_then(|f| classify(&head.head, &f, 0.0, &ctx))
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let probs = candle_nn::ops::softmax_last_dim(&logits).and_then(|p| p.to_vec2::<f32>()).map_err(internal)?;
            let data: Vec<Value> = probs
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let best = p.iter().enumerate().fold(0, |b, (j, &v)| if v > p[b] { j } else { b });
                    let scores: serde_json::Map<String, Value> =
                        head.config.labels.iter().zip(p).map(|(l, v)| (l.clone(), json!(v))).collect();
                    json!({"index": i, "label": head.config.labels[best], "scores": scores})
                })
                .collect();
            Ok(json!({"object": "list", "task": head.config.task, "data": data}))
        }
        (Work::Classify { .. }, Target::Base) => Err(ApiError::internal("classification on the base model")),
    }
}
