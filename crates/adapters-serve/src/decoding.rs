//! Continuous batching for `/v1/completions` and `/v1/chat/completions`: one loop steps
//! every running generation together, each with its own KV cache and adapter
//! ([`Llama::decode_step`]): one token for each generation that is decoding, and a chunk
//! of the prompt of each that is joining (chunked prefill: at most `--prefill-chunk`
//! prompt tokens a step), so a new prompt shares the step's forward (and its reading of
//! the weights) with the running generations instead of stalling them. Finished
//! generations, and those whose client went away, leave. Prompts under prompt tuning
//! (virtual tokens first) run whole, together, before the step.
//!
//! Generations join while their KV-cache need (prompt + `max_tokens`) fits the server's
//! KV budget beside the running ones; the others wait, in order. A waiting generation
//! whose client has gone (or whose handler gave up at its deadline) is dropped before its
//! prompt runs. A step that fails as a whole (an error or a panic) is run again generation
//! by generation from the state before it, so only the one at fault fails; if the loop
//! itself dies, `/ready` turns 503.

use crate::batcher::{guarded, mixed_model, AliveGuard};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::metrics::CauseLabels;
use crate::target::Target;
use adapters_core::ForwardCtx;
use adapters_models::generate::{choose, Sampling};
use adapters_models::{Backbone, KvCache, Llama};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Weak};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What a generation produced, as it goes.
pub(crate) enum Piece {
    Text(String),
    Done { finish_reason: &'static str, prompt_tokens: usize, completion_tokens: usize },
    Failed(ApiError),
}

/// A generation request, ready to run.
pub(crate) struct Generation {
    pub target: Target,
    /// The prompt's text (kept for the fault hook of the tests, [`crate::fault`]).
    pub text: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub queued: Instant,
    /// Its place in the waiting-token budget (prompt + `max_tokens`), freed when it joins.
    pub waiting: Option<crate::admission::Waiting>,
    /// Where its pieces go; closed when the client disconnects.
    pub pieces: UnboundedSender<Piece>,
}

impl Generation {
    /// KV-cache tokens it may hold: its prompt and every token it may add.
    fn kv_tokens(&self) -> usize {
        self.prompt.len() + self.max_tokens
    }
}

/// The queue of the decoding loop.
pub(crate) struct Decoder {
    tx: Sender<Generation>,
    /// False once the loop's thread has ended while the server still runs.
    alive: Arc<AtomicBool>,
}

impl Decoder {
    /// Starts the decoding loop on a thread of its own (it ends when the engine is dropped).
    pub fn start(engine: Weak<Engine>, runtime: tokio::runtime::Handle) -> Self {
        let (tx, rx) = channel();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        std::thread::Builder::new()
            .name("decoder".into())
            .spawn(move || {
                let _guard = guard;
                decode_loop(engine, rx, runtime)
            })
            .expect("starting the decoding thread");
        Decoder { tx, alive }
    }

    /// Whether the loop still runs.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Queues a generation; its pieces arrive on its channel.
    pub fn submit(&self, generation: Generation) -> Result<(), ApiError> {
        self.tx.send(generation).map_err(|_| ApiError::internal("the decoding loop has stopped; this replica is not ready"))
    }
}

/// Waits for work without holding the engine, then runs until nothing is left. A
/// panic while busy is caught (the generations it held end with a 500, their channels
/// closed) and the loop goes on.
fn decode_loop(engine: Weak<Engine>, rx: Receiver<Generation>, runtime: tokio::runtime::Handle) {
    while let Ok(first) = rx.recv() {
        crate::fault::panic_if_loop_poisoned(&first.text);
        let Some(engine) = engine.upgrade() else { return };
        let busy = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_while_busy(&engine, first, &rx, &runtime)));
        if busy.is_err() {
            engine.metrics.kv_tokens.set(0);
            tracing::error!("the decoding loop panicked; the generations it held were ended, and it goes on");
        }
    }
}

/// A generation in the batch.
struct Running<'t> {
    generation: Generation,
    cache: KvCache,
    /// Prompt tokens in the cache; the prompt is still joining while fewer than all.
    fed: usize,
    /// Tokens this step feeds it: 1 when decoding, a chunk of its prompt when joining, 0
    /// when it sits this step out (no prompt budget left).
    chunk: usize,
    /// Whether its prompt runs whole through [`Llama::prefill`] (prompt tuning).
    whole_prompt: bool,
    /// The token to feed at the next step.
    next: u32,
    produced: usize,
    rng: ChaCha8Rng,
    text: Box<dyn FnMut(u32) -> Result<Option<String>, String> + 't>,
    done: bool,
}

impl Running<'_> {
    fn joining(&self) -> bool {
        self.fed < self.generation.prompt.len()
    }

    /// The tokens this step feeds it.
    fn input(&self) -> Vec<u32> {
        if self.joining() {
            self.generation.prompt[self.fed..self.fed + self.chunk].to_vec()
        } else {
            vec![self.next]
        }
    }

    /// After a step that fed it: the prompt's progress, and the new token if the step
    /// gave one (every step but a prompt's chunks before its last).
    fn stepped(&mut self, token: Option<u32>, stop: &[u32]) {
        if self.joining() {
            self.fed += self.chunk;
        }
        if let Some(token) = token {
            self.take(token, stop);
        }
    }

    /// Takes a new token: sends its text, or finishes at a stop token, the length limit,
    /// or a closed channel.
    fn take(&mut self, token: u32, stop: &[u32]) {
        self.produced += 1;
        self.next = token;
        let finish = |r: &mut Self, reason| {
            let (prompt_tokens, completion_tokens) = (r.generation.prompt.len(), r.produced);
            let _ = r.generation.pieces.send(Piece::Done { finish_reason: reason, prompt_tokens, completion_tokens });
            r.done = true;
        };
        if stop.contains(&token) {
            return finish(self, "stop");
        }
        match (self.text)(token) {
            Ok(Some(text)) => {
                if self.generation.pieces.send(Piece::Text(text)).is_err() {
                    tracing::info!(model = %self.generation.target.id(), "client disconnected mid-stream; generation stopped");
                    self.done = true;
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => return self.fail(ApiError::internal(format!("decoding: {e}"))),
        }
        if self.produced == self.generation.max_tokens {
            finish(self, "length");
        }
    }

    fn fail(&mut self, error: ApiError) {
        let _ = self.generation.pieces.send(Piece::Failed(error));
        self.done = true;
    }
}

fn llama(model: &Backbone) -> &Llama {
    match model {
        Backbone::Llama(m) => m,
        Backbone::Bert(_) => unreachable!("completions check for a decoder first"),
    }
}

/// Decodes until no generation is running or waiting: before each step, waiting ones join
/// (up to the batch size) after their prompt; each step holds a compute slot.
fn run_while_busy(engine: &Engine, first: Generation, rx: &Receiver<Generation>, runtime: &tokio::runtime::Handle) {
    let tokenizer = engine.tokenizer();
    let base = llama(engine.model_of(&Target::Base));
    let mut stop: Vec<u32> = base.config.eos_tokens();
    stop.extend(tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_id(t)));
    let max_rows = engine.batching().max_rows.max(1);
    let mut waiting = VecDeque::from([first]);
    let mut running: Vec<Running> = Vec::new();
    let mut mixed: Option<(Vec<String>, Backbone)> = None;
    loop {
        waiting.extend(rx.try_iter());
        // Nobody waits for these any more: drop them before their prompts run.
        waiting.retain(|g| {
            let wanted = !g.pieces.is_closed();
            if !wanted {
                engine.metrics.dropped.get_or_create(&CauseLabels { cause: "disconnected".into() }).inc();
            }
            wanted
        });
        if running.is_empty() && waiting.is_empty() {
            engine.metrics.kv_tokens.set(0);
            return;
        }
        let Ok(_slot) = runtime.block_on(engine.compute_slot()) else { return };
        let mut joining = Vec::new();
        let mut kv: usize = running.iter().map(|r| r.generation.kv_tokens()).sum();
        while running.len() + joining.len() < max_rows {
            // In order: one that does not fit yet holds the others back, so none starves.
            if waiting.front().is_none_or(|g| kv + g.kv_tokens() > engine.kv_budget()) {
                break;
            }
            let Some(mut generation) = waiting.pop_front() else { break };
            generation.waiting = None;
            kv += generation.kv_tokens();
            engine.metrics.queue.get_or_create(&generation.target.labels()).observe(generation.queued.elapsed().as_secs_f64());
            let mut stream = tokenizer.inner.decode_stream(true);
            let text = Box::new(move |t: u32| stream.step(t).map_err(|e| e.to_string()));
            let rng = ChaCha8Rng::seed_from_u64(match generation.sampling {
                Sampling::Sample { seed, .. } => seed,
                Sampling::Greedy => 0,
            });
            let cache = base.new_cache();
            let whole_prompt = llama(engine.model_of(&generation.target)).prompts_need_prefill();
            let chunk = if whole_prompt { generation.prompt.len() } else { 0 };
            joining.push(Running { generation, cache, fed: 0, chunk, whole_prompt, next: 0, produced: 0, rng, text, done: false });
        }
        engine.metrics.kv_tokens.set(kv as i64);
        let (mut whole, chunked): (Vec<Running>, Vec<Running>) = joining.into_iter().partition(|r| r.whole_prompt);
        if !whole.is_empty() {
            advance(engine, &mut whole, &mut mixed, &stop, prefill);
            running.extend(whole.into_iter().filter(|r| !r.done));
        }
        running.extend(chunked);
        // This step: one token for each generation decoding, prompt chunks in order of
        // arrival for those joining, within the prompt budget.
        let mut budget = engine.batching().prefill_chunk.max(1);
        for r in &mut running {
            r.chunk = if r.joining() {
                let chunk = (r.generation.prompt.len() - r.fed).min(budget);
                budget -= chunk;
                chunk
            } else {
                1
            };
        }
        let (mut stepping, resting): (Vec<Running>, Vec<Running>) = running.drain(..).partition(|r| r.chunk > 0);
        if !stepping.is_empty() {
            advance(engine, &mut stepping, &mut mixed, &stop, decode);
        }
        running = stepping.into_iter().chain(resting).filter(|r| !r.done).collect();
    }
}

/// Runs the whole prompts of `rows` of `running` (all joining now) in one forward pass on
/// `model`, each into its own cache; the first token of each.
fn prefill(model: &Backbone, per_row: bool, rows: &[usize], running: &mut [Running]) -> Result<Vec<Option<u32>>, String> {
    let m = llama(model);
    let ctx = row_context(m, per_row, rows, running)?;
    let prompts: Vec<&[u32]> = rows.iter().map(|&i| running[i].generation.prompt.as_slice()).collect();
    let (logits, caches) = m.prefill(&prompts, &ctx).map_err(|e| e.to_string())?;
    rows.iter()
        .zip(caches)
        .enumerate()
        .map(|(k, (&i, cache))| {
            let r = &mut running[i];
            r.cache = cache;
            // Room for every token it may add: its steps then write in place.
            r.cache.reserve(r.generation.kv_tokens()).map_err(|e| e.to_string())?;
            logits.get(k).and_then(|l| choose(&l, &r.generation.sampling, &mut r.rng)).map(Some).map_err(|e| e.to_string())
        })
        .collect()
}

/// A forward context that sends each of `rows` through its generation's adapter (with
/// `per_row`), or a plain one.
fn row_context(m: &Llama, per_row: bool, rows: &[usize], running: &[Running]) -> Result<ForwardCtx, String> {
    let ctx = ForwardCtx::inference();
    if !per_row {
        return Ok(ctx);
    }
    let choices: Vec<Vec<String>> = rows
        .iter()
        .map(|&i| match &running[i].generation.target {
            Target::Base => vec![],
            Target::Adapter(a) => vec![a.key()],
        })
        .collect();
    ctx.with_row_choices(&choices, m.device()).map_err(|e| e.to_string())
}

/// What runs a group of rows on one model: the next token of each (none for a prompt's
/// chunk before its last).
type RunRows = fn(&Backbone, bool, &[usize], &mut [Running]) -> Result<Vec<Option<u32>>, String>;

/// One token for every generation in `running` (by `run`: a prompt, or a decoding step):
/// those on plain adapters (or the base) in one forward pass, each row through its own
/// adapter; those on composition setups, which rows cannot choose, on their own models.
fn advance(engine: &Engine, running: &mut [Running], mixed: &mut Option<(Vec<String>, Backbone)>, stop: &[u32], run: RunRows) {
    let on_setup = |r: &Running| matches!(&r.generation.target, Target::Adapter(a) if a.manifest.contents.setup.is_some());
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut plain = Vec::new();
    for (i, r) in running.iter().enumerate() {
        if on_setup(r) {
            let id = r.generation.target.id();
            match groups.iter_mut().find(|(g, _)| *g == id) {
                Some((_, rows)) => rows.push(i),
                None => groups.push((id, vec![i])),
            }
        } else {
            plain.push(i);
        }
    }
    let mut ids: Vec<String> = plain.iter().map(|&i| running[i].generation.target.id()).collect();
    ids.sort();
    ids.dedup();
    let mut batches: Vec<(Backbone, bool, Vec<usize>)> =
        groups.into_iter().map(|(_, rows)| (engine.model_of(&running[rows[0]].generation.target).clone(), false, rows)).collect();
    match ids.len() {
        0 => {}
        1 => batches.push((engine.model_of(&running[plain[0]].generation.target).clone(), false, plain)),
        _ => {
            if mixed.as_ref().is_none_or(|(held, _)| *held != ids) {
                match mixed_model(engine, plain.iter().map(|&i| &running[i].generation.target)) {
                    Ok(model) => *mixed = Some((ids.clone(), model)),
                    Err(e) => return plain.iter().for_each(|&i| running[i].fail(ApiError::internal(e.clone()))),
                }
            }
            let model = mixed.as_ref().expect("set above").1.clone();
            batches.push((model, true, plain));
        }
    }
    engine.metrics.batch_models.observe(batches.iter().map(|(_, per_row, _)| if *per_row { ids.len() } else { 1 }).sum::<usize>() as f64);
    engine.metrics.batch_rows.observe(running.len() as f64);
    for (model, per_row, rows) in batches {
        run_isolated(engine, &model, per_row, &rows, running, stop, run);
    }
}

/// Runs `rows` of `running` together; if the step fails as a whole (an error or a panic),
/// puts each row back as it was before the step and runs it alone, so only the row at
/// fault fails.
fn run_isolated(engine: &Engine, model: &Backbone, per_row: bool, rows: &[usize], running: &mut [Running], stop: &[u32], run: RunRows) {
    // A step only appends to a cache: its length before the step is enough to undo it.
    let before: Vec<(usize, ChaCha8Rng)> = rows.iter().map(|&i| (running[i].cache.len(), running[i].rng.clone())).collect();
    let outcome = guarded(|| run(model, per_row, rows, running).map_err(ApiError::internal));
    match outcome {
        Ok(tokens) => rows.iter().zip(tokens).for_each(|(&i, t)| running[i].stepped(t, stop)),
        Err(e) if rows.len() == 1 => running[rows[0]].fail(e),
        Err(e) => {
            engine.metrics.isolated_failures.inc();
            tracing::warn!(
                generations = rows.len(),
                "a decoding step failed as a whole ({}); running its generations one by one",
                e.message
            );
            for (&i, (len, rng)) in rows.iter().zip(before) {
                running[i].cache.truncate(len);
                running[i].rng = rng;
                run_isolated(engine, model, per_row, &[i], running, stop, run);
            }
        }
    }
}

/// One step of `rows` of `running` on `model`: each row's token, or its prompt's chunk;
/// the next token of each (none for a prompt's chunk before its last).
fn decode(model: &Backbone, per_row: bool, rows: &[usize], running: &mut [Running]) -> Result<Vec<Option<u32>>, String> {
    // The tests' poisoned generation fails its decoding steps (after its prompt ran), so
    // that it fails inside a batch with the generations already running.
    crate::fault::check_batch(rows.iter().filter(|&&i| !running[i].joining()).map(|&i| running[i].generation.text.as_str()))?;
    let m = llama(model);
    let inputs: Vec<Vec<u32>> = rows.iter().map(|&i| running[i].input()).collect();
    let inputs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let ctx = row_context(m, per_row, rows, running)?;
    let mut caches: Vec<&mut KvCache> =
        running.iter_mut().enumerate().filter(|(i, _)| rows.contains(i)).map(|(_, r)| &mut r.cache).collect();
    let logits = m.decode_step(&inputs, &mut caches, &ctx).map_err(|e| e.to_string())?;
    rows.iter()
        .enumerate()
        .map(|(k, &i)| {
            let r = &mut running[i];
            if r.joining() {
                // Room for every token it may add: its steps then write in place.
                r.cache.reserve(r.generation.kv_tokens()).map_err(|e| e.to_string())?;
                if r.fed + r.chunk < r.generation.prompt.len() {
                    return Ok(None);
                }
            }
            logits.get(k).and_then(|l| choose(&l, &r.generation.sampling, &mut r.rng)).map(Some).map_err(|e| e.to_string())
        })
        .collect()
}
