//! Batching across requests for `/v1/embeddings` and `/v1/classify`: requests that arrive
//! while the compute slots are busy, or within a short wait after one frees, run as one
//! batch of up to `--max-batch-tokens` tokens even when they use different adapters. The
//! batch's texts run sorted by length in forwards of at most that many padded tokens
//! (TEI's token budget), so padding stays bounded. Each row goes through its own
//! adapter (`ForwardCtx::with_row_choices`), and rows whose adapters share a
//! configuration are computed together over weights stacked per row.
//!
//! Requests arrive tokenised (and truncated to the model's context) by their handlers, so
//! nothing in a batch depends on another request's text. A request whose client has gone,
//! or whose deadline has passed, is dropped before it is computed. A batch that fails as a
//! whole (an error or a panic) is run again request by request, so only the request at
//! fault fails.

use crate::admission::Waiting;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::metrics::CauseLabels;
use crate::target::Target;
use adapters_core::ForwardCtx;
use adapters_models::heads::{l2_normalize, pad, pool, Pooling};
use adapters_models::{Backbone, HoldsAdapters};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Weak;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// What a request wants from its rows.
pub(crate) enum Work {
    /// Mean-pooled, L2-normalised sentence embeddings.
    Embed,
    /// Class probabilities from the resident's head at this index.
    Classify { head: usize },
}

/// A request's rows, ready for a forward pass.
pub(crate) struct Rows {
    /// The texts (kept for the fault hook of the tests, [`crate::fault`]).
    pub texts: Vec<String>,
    /// Their token ids, each within the model's context.
    pub ids: Vec<Vec<u32>>,
    /// Its place in the waiting-token budget, freed when its pass starts.
    pub waiting: Option<Waiting>,
}

impl Rows {
    /// Tokens in all its rows.
    fn tokens(&self) -> usize {
        self.ids.iter().map(Vec::len).sum()
    }
}

/// One request waiting for a forward pass.
struct Job {
    target: Target,
    rows: Rows,
    work: Work,
    queued: Instant,
    deadline: tokio::time::Instant,
    /// The response body's `data` part and the tokens read, or why not.
    reply: oneshot::Sender<Result<(Value, usize), ApiError>>,
}

/// The queue in front of the compute slots.
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    /// False once the batch-forming task has ended while the server still runs.
    alive: Arc<AtomicBool>,
}

/// Sets its flag to false when dropped: when a loop ends, normally or by a panic.
pub(crate) struct AliveGuard(pub Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Batcher {
    /// Starts the task that forms batches (it ends when the engine is dropped).
    pub fn start(engine: Weak<Engine>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        tokio::spawn(async move {
            let _guard = guard;
            form_batches(engine, rx).await
        });
        Batcher { tx, alive }
    }

    /// Whether batches are still being formed.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Queues a request and waits for its result until `deadline` (then 503; the work is
    /// dropped unless its pass has started).
    pub async fn run(&self, target: Target, rows: Rows, work: Work, deadline: tokio::time::Instant) -> Result<(Value, usize), ApiError> {
        let (reply, result) = oneshot::channel();
        let job = Job { target, rows, work, queued: Instant::now(), deadline, reply };
        self.tx.send(job).map_err(|_| ApiError::internal("the batching queue has stopped; the server is shutting down"))?;
        match tokio::time::timeout_at(deadline, result).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ApiError::internal("the forward pass ended without an answer")),
            Err(_) => Err(timed_out()),
        }
    }
}

/// The 503 of a request that ran past `--request-timeout`.
pub(crate) fn timed_out() -> ApiError {
    ApiError::busy("the request was not served within the server's --request-timeout; the server is busy")
}

/// Whether `job` should still be computed; answers (or forgets) it if not.
fn still_wanted(engine: &Engine, job: Job) -> Option<Job> {
    let cause = if job.reply.is_closed() {
        "disconnected"
    } else if tokio::time::Instant::now() >= job.deadline {
        "timeout"
    } else {
        return Some(job);
    };
    engine.metrics.dropped.get_or_create(&CauseLabels { cause: cause.into() }).inc();
    let _ = job.reply.send(Err(timed_out()));
    None
}

/// Takes the first waiting request, waits for a compute slot, then adds what else is
/// waiting (or arrives within `max_wait`) up to `max_batch_tokens` tokens, and runs the
/// batch on the slot in the blocking pool while the next batch forms.
async fn form_batches(engine: Weak<Engine>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let Some(engine) = engine.upgrade() else { return };
        let slot = match engine.compute_slot().await {
            Ok(slot) => slot,
            Err(e) => {
                let _ = first.reply.send(Err(e));
                continue;
            }
        };
        let Some(first) = still_wanted(&engine, first) else { continue };
        let limits = engine.batching();
        let budget = if limits.max_rows == 0 { 0 } else { limits.max_batch_tokens };
        let mut tokens = first.rows.tokens();
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + limits.max_wait;
        while tokens < budget {
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(_) => tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten(),
            };
            let Some(job) = next else { break };
            let Some(job) = still_wanted(&engine, job) else { continue };
            if tokens + job.rows.tokens() > budget {
                carried = Some(job);
                break;
            }
            tokens += job.rows.tokens();
            jobs.push(job);
        }
        for job in &jobs {
            engine.metrics.queue.get_or_create(&job.target.labels()).observe(job.queued.elapsed().as_secs_f64());
        }
        for job in &mut jobs {
            job.rows.waiting = None;
        }
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            run_batch(&engine, jobs);
        });
    }
}

/// Runs one batch: jobs on composition setups (which rows cannot choose) on their own
/// models, the rest in one forward pass.
fn run_batch(engine: &Engine, jobs: Vec<Job>) {
    let (on_setups, plain): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|j| matches!(&j.target, Target::Adapter(r) if r.manifest.contents.setup.is_some()));
    let mut models = 0;
    for job in on_setups {
        models += 1;
        let model = engine.model_of(&job.target).clone();
        run_isolated(engine, &model, false, vec![job]);
    }
    let mut ids: Vec<String> = plain.iter().map(|j| j.target.id()).collect();
    ids.sort();
    ids.dedup();
    models += ids.len();
    match ids.len() {
        0 => {}
        // One model: its own path (a single active adapter runs fused).
        1 => {
            let model = engine.model_of(&plain[0].target).clone();
            run_isolated(engine, &model, false, plain);
        }
        _ => match mixed_model(engine, plain.iter().map(|j| &j.target)) {
            Ok(model) => run_isolated(engine, &model, true, plain),
            Err(e) => plain.into_iter().for_each(|j| {
                let _ = j.reply.send(Err(ApiError::internal(e.clone())));
            }),
        },
    }
    engine.metrics.batch_models.observe(models as f64);
}

/// The base model with the adapter of every resident among `targets` attached (shared,
/// not copied) under its `name@version`, none active.
pub(crate) fn mixed_model<'a>(engine: &Engine, targets: impl Iterator<Item = &'a Target>) -> Result<Backbone, String> {
    let mut model = engine.model_of(&Target::Base).clone();
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

/// Runs `jobs` on `model` (with `per_row`, each row through its job's adapter) and
/// answers each. If the batch fails as a whole (an error or a panic), each job runs again
/// on its own, so only the one at fault fails.
fn run_isolated(engine: &Engine, model: &Backbone, per_row: bool, jobs: Vec<Job>) {
    let outcome = guarded(|| forward(engine, model, per_row, &jobs));
    match outcome {
        Ok(results) => jobs.into_iter().zip(results).for_each(|(job, r)| {
            let _ = job.reply.send(r);
        }),
        Err(e) if jobs.len() == 1 => jobs.into_iter().for_each(|job| {
            let _ = job.reply.send(Err(e.clone()));
        }),
        Err(e) => {
            engine.metrics.isolated_failures.inc();
            tracing::warn!(requests = jobs.len(), "a batch failed as a whole ({}); running its requests one by one", e.message);
            jobs.into_iter().for_each(|job| run_isolated(engine, model, per_row, vec![job]));
        }
    }
}

/// `f`'s result, with a panic inside it turned into a 500 that says so.
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what =
            panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
        Err(ApiError::internal(format!("the server failed on this request (a panic: {what}); it has been logged")))
    })
}

type JobResult = Result<(Value, usize), ApiError>;

/// Runs every row of `jobs`, sorted by length, in forwards of at most the batching's
/// `max_batch_tokens` padded tokens, and answers each job from its rows' pooled features.
fn forward(engine: &Engine, model: &Backbone, per_row: bool, jobs: &[Job]) -> Result<Vec<JobResult>, ApiError> {
    crate::fault::check_batch(jobs.iter().flat_map(|j| j.rows.texts.iter().map(String::as_str))).map_err(ApiError::internal)?;
    let internal = |e: candle_core::Error| ApiError::internal(e.to_string());
    // Every row with its job, in the jobs' order.
    let rows: Vec<(&Job, &[u32])> = jobs.iter().flat_map(|j| j.rows.ids.iter().map(move |r| (j, r.as_slice()))).collect();
    let lengths: Vec<usize> = rows.iter().map(|(_, r)| r.len()).collect();
    let mut features: Vec<Option<Tensor>> = vec![None; rows.len()];
    let stack_of = |i: usize| match &rows[i].0.target {
        Target::Base => vec![],
        Target::Adapter(r) => vec![r.key()],
    };
    for mut batch in adapters_models::length_batches(&lengths, engine.batching().max_batch_tokens) {
        engine.metrics.batch_rows.observe(batch.len() as f64);
        let mut ctx = ForwardCtx::inference();
        if per_row {
            // Rows of one adapter side by side (the padding is the forward's either way):
            // each adapter's computation then reads its rows as a view, not a gather.
            batch.sort_by_cached_key(|&i| stack_of(i));
            let choices: Vec<Vec<String>> = batch.iter().map(|&i| stack_of(i)).collect();
            ctx = ctx.with_row_choices(&choices, model.device()).map_err(internal)?;
        }
        let refs: Vec<&[u32]> = batch.iter().map(|&i| rows[i].1).collect();
        let (ids, mask) = pad(&refs, model.device()).map_err(internal)?;
        let hidden = model.hidden_states(&ids, &mask, &ctx).map_err(internal)?;
        // Each pooling that a row here reads, once for the forward (BERT's pooler runs
        // with each row's adapters, under this forward's routing).
        let poolings: Vec<Pooling> = batch.iter().map(|&i| pooling_of(rows[i].0)).collect();
        let mut pooled: Vec<(Pooling, Tensor)> = Vec::new();
        for (k, &i) in batch.iter().enumerate() {
            let p = poolings[k];
            if !pooled.iter().any(|(q, _)| *q == p) {
                pooled.push((p, pool(model, &hidden, &mask, p, &ctx).map_err(internal)?));
            }
            let (_, t) = pooled.iter().find(|(q, _)| *q == p).expect("pooled above");
            features[i] = Some(t.get(k).map_err(internal)?);
        }
    }
    let mut features = features.into_iter().map(|f| f.expect("every row ran"));
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mine: Vec<Tensor> = features.by_ref().take(job.rows.ids.len()).collect();
        let tokens = job.rows.tokens();
        let answered = Tensor::stack(&mine, 0).map_err(internal).and_then(|f| answer(job, &f));
        results.push(answered.map(|v| (v, tokens)));
    }
    Ok(results)
}

/// The pooling a job's answer reads: the mean for embeddings, its head's for classification.
fn pooling_of(job: &Job) -> Pooling {
    match (&job.work, &job.target) {
        (Work::Classify { head }, Target::Adapter(r)) => r.heads[*head].config.pooling,
        _ => Pooling::Mean,
    }
}

/// A job's response body from its rows' pooled features `[rows, hidden]`.
fn answer(job: &Job, features: &Tensor) -> Result<Value, ApiError> {
    let internal = |e: candle_core::Error| ApiError::internal(e.to_string());
    match (&job.work, &job.target) {
        (Work::Embed, _) => {
            let vectors: Vec<Vec<f32>> = l2_normalize(features).map_err(internal)?.to_vec2().map_err(internal)?;
            let data: Vec<Value> =
                vectors.into_iter().enumerate().map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v})).collect();
            Ok(json!({"object": "list", "data": data}))
        }
        (Work::Classify { head }, Target::Adapter(resident)) => {
            let head = &resident.heads[*head];
            let logits = head.head.forward(features, 0.0, &ForwardCtx::inference()).map_err(internal)?;
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
