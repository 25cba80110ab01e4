//! `POST /v1/completions` and `POST /v1/chat/completions` for decoder models, whole or
//! streamed as server-sent events. A client that disconnects mid-stream stops its
//! generation at the next token (the channel to it closes).

use crate::batcher::timed_out;
use crate::decoding::{Generation, Piece};
use crate::error::body;
use crate::error::ApiError;
use crate::metrics::AdapterLabels;
use crate::metrics::CauseLabels;
use crate::state::AppState;
use crate::target::Target;
use adapters_models::generate::{generate, Sampling};
use adapters_models::{Backbone, Message};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// The fields both endpoints share (others that OpenAI clients send are ignored).
#[derive(Deserialize)]
pub struct GenerationRequest {
    model: String,
    /// `/v1/completions`: the text to continue.
    #[serde(default)]
    prompt: Option<String>,
    /// `/v1/chat/completions`: the conversation, formatted by the model's chat template.
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    /// 0 is greedy decoding.
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    /// `{"include_usage": true}`: a streamed generation ends with a chunk of its token
    /// counts (no choices), as OpenAI's API sends it.
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<usize>,
    /// Who asks: keeps them on one variant of an A/B route.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Which endpoint, and the shape of its answers.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// The most new tokens one request may ask for.
const MAX_NEW_TOKENS: usize = 2048;

pub async fn completions(State(state): State<Arc<AppState>>, payload: Result<Json<GenerationRequest>, JsonRejection>) -> Response {
    run(state, Kind::Completion, payload).await
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, payload: Result<Json<GenerationRequest>, JsonRejection>) -> Response {
    run(state, Kind::Chat, payload).await
}

async fn run(state: Arc<AppState>, kind: Kind, payload: Result<Json<GenerationRequest>, JsonRejection>) -> Response {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + state.admission.limits().request_timeout;
    let endpoint = if kind == Kind::Chat { "chat_completions" } else { "completions" };
    let mut labels = AdapterLabels { adapter: "unknown".into(), version: String::new() };
    let prepared = async {
        let ticket = state.admission.admit(&state.metrics)?;
        let request = body(payload)?;
        if request.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("`n`: one choice per request is supported"));
        }
        let (target, route) = state.target(&request.model, request.user.as_deref()).await?;
        labels = target.labels();
        if !matches!(state.model_of(&target), Backbone::Llama(_)) {
            return Err(ApiError::bad_request(format!(
                "`model`: {} is an encoder; completions need a decoder base model (e.g. SmolLM2)",
                target.id()
            )));
        }
        let max_tokens = request.max_completion_tokens.or(request.max_tokens).unwrap_or(128);
        if max_tokens == 0 || max_tokens > MAX_NEW_TOKENS {
            return Err(ApiError::bad_request(format!("`max_tokens`: 1 to {MAX_NEW_TOKENS}")));
        }
        let (text, prompt) = prompt_tokens(&state, kind, request.prompt.clone(), request.messages.clone()).await?;
        let (context, budget) = (state.context(), state.kv_budget());
        if prompt.len() + max_tokens > context {
            return Err(ApiError::bad_request(format!(
                "the prompt ({} tokens) plus `max_tokens` ({max_tokens}) is more than the model's context of {context} tokens; shorten the prompt or ask for fewer tokens",
                prompt.len()
            )));
        }
        if state.config().batching.max_rows > 0 && prompt.len() + max_tokens > budget {
            return Err(ApiError::bad_request(format!(
                "the prompt ({} tokens) plus `max_tokens` ({max_tokens}) is more than this server's KV budget of {budget} tokens (--max-kv-tokens); ask for fewer tokens",
                prompt.len()
            )));
        }
        let temperature = request.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request("`temperature`: 0 (greedy) to 2"));
        }
        let sampling = if temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                temperature,
                top_p: request.top_p.unwrap_or(1.0).clamp(1e-6, 1.0),
                seed: request.seed.unwrap_or_else(rand_seed),
            }
        };
        let usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok((ticket, target, route, text, prompt, max_tokens, sampling, request.stream, usage))
    }
    .await;
    let (ticket, target, route, text, prompt, max_tokens, sampling, stream, stream_usage) = match prepared {
        Ok(p) => p,
        Err(e) => {
            return refused(&state, &labels, endpoint, started, e);
        }
    };
    let id = format!("{}-{:016x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, rand_seed());
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model_id = target.id();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    if state.config().batching.max_rows > 0 {
        let waiting = match state.admission.wait(prompt.len() + max_tokens, &state.metrics) {
            Ok(w) => Some(w),
            Err(e) => {
                return refused(&state, &labels, endpoint, started, e);
            }
        };
        let generation = Generation { target, text, prompt, max_tokens, sampling, queued: Instant::now(), waiting, pieces: sender };
        if let Err(e) = state.decoder().submit(generation) {
            return refused(&state, &labels, endpoint, started, e);
        }
    } else {
        generate_alone(&state, target, prompt, max_tokens, sampling, sender, &labels);
    }
    // Until the first piece the request may still be refused with a proper status: an
    // error, or 503 at its deadline (which drops the generation before its prompt runs).
    let first = match tokio::time::timeout_at(deadline, receiver.recv()).await {
        Ok(Some(Piece::Failed(e))) => Err(e),
        Ok(Some(piece)) => Ok(piece),
        Ok(None) => Err(ApiError::internal("generation stopped without an answer")),
        Err(_) => {
            state.metrics.dropped.get_or_create(&CauseLabels { cause: "timeout".into() }).inc();
            Err(timed_out())
        }
    };
    let first = match first {
        Ok(piece) => piece,
        Err(e) => {
            return refused(&state, &labels, endpoint, started, e);
        }
    };

    let chunk = move |content: Option<&str>, finish: Option<&str>| -> Value {
        let mut value = match kind {
            Kind::Completion => json!({"id": id, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": content.unwrap_or(""), "finish_reason": finish}]}),
            Kind::Chat => json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": content.map_or(json!({}), |c| json!({"role": "assistant", "content": c})), "finish_reason": finish}]}),
        };
        if let Some(route) = &route {
            value["route"] = route.clone();
        }
        value
    };
    if stream {
        let state2 = state.clone();
        let error_event = |e: &ApiError| {
            Event::default()
                .event("error")
                .data(json!({"error": {"message": e.message, "type": "server_error", "code": e.status.as_u16()}}).to_string())
        };
        let pieces = async_stream(first, receiver, state.stopping());
        let events = pieces.flat_map(move |piece| {
            let _ticket = &ticket;
            let events = match piece {
                Streamed::Piece(Piece::Text(t)) => vec![Event::default().data(chunk(Some(&t), None).to_string())],
                Streamed::Piece(Piece::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                    state2.count_tokens(&labels, prompt_tokens + completion_tokens);
                    state2.metrics.record_request(&labels, endpoint, StatusCode::OK, started);
                    let mut events = vec![Event::default().data(chunk(None, Some(finish_reason)).to_string())];
                    if stream_usage {
                        let mut last = chunk(None, None);
                        last["choices"] = json!([]);
                        last["usage"] = usage(prompt_tokens, completion_tokens);
                        events.push(Event::default().data(last.to_string()));
                    }
                    events.push(Event::default().data("[DONE]"));
                    events
                }
                Streamed::Piece(Piece::Failed(e)) => {
                    state2.metrics.record_request(&labels, endpoint, e.status, started);
                    vec![error_event(&e)]
                }
                Streamed::Stopping => {
                    let e = ApiError::busy("the server is shutting down; the generation was cut short");
                    state2.metrics.record_request(&labels, endpoint, e.status, started);
                    vec![error_event(&e), Event::default().data("[DONE]")]
                }
            };
            futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>))
        });
        return Sse::new(events).keep_alive(KeepAlive::default()).into_response();
    }
    let mut text = String::new();
    let mut next = Some(first);
    loop {
        let piece = match next.take() {
            Some(piece) => piece,
            None => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(_) => {
                    state.metrics.dropped.get_or_create(&CauseLabels { cause: "timeout".into() }).inc();
                    return refused(&state, &labels, endpoint, started, timed_out());
                }
            },
        };
        match piece {
            Piece::Text(t) => text += &t,
            Piece::Done { finish_reason, prompt_tokens, completion_tokens } => {
                state.count_tokens(&labels, prompt_tokens + completion_tokens);
                state.metrics.record_request(&labels, endpoint, StatusCode::OK, started);
                let mut body = chunk(None, Some(finish_reason));
                let choice = match kind {
                    Kind::Completion => json!({"index": 0, "text": text, "finish_reason": finish_reason}),
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}),
                };
                body["object"] = json!(if kind == Kind::Chat { "chat.completion" } else { "text_completion" });
                body["choices"] = json!([choice]);
                body["usage"] = usage(prompt_tokens, completion_tokens);
                drop(ticket);
                return (StatusCode::OK, Json(body)).into_response();
            }
            Piece::Failed(e) => {
                return refused(&state, &labels, endpoint, started, e);
            }
        }
    }
    ApiError::internal("generation stopped without an answer").into_response()
}

/// OpenAI's `usage` object.
fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// The response of a request that ends in `e`, counted under its labels.
fn refused(state: &AppState, labels: &AdapterLabels, endpoint: &str, started: Instant, e: ApiError) -> Response {
    state.metrics.record_request(labels, endpoint, e.status, started);
    e.into_response()
}

/// The prompt's text and token ids: `prompt` as it is, or `messages` through the model's
/// chat template. Tokenising runs on the blocking pool, off the runtime's worker threads.
async fn prompt_tokens(
    state: &Arc<AppState>,
    kind: Kind,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
) -> Result<(String, Vec<u32>), ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let text = match (kind, prompt, messages) {
            (Kind::Completion, Some(p), _) => p,
            (Kind::Chat, _, Some(messages)) if !messages.is_empty() => {
                state.tokenizer().apply_chat_template(&messages, true).map_err(|e| ApiError::bad_request(format!("`messages`: {e}")))?
            }
            (Kind::Completion, None, _) => return Err(ApiError::bad_request("`prompt`: the text to continue is missing")),
            (Kind::Chat, _, _) => return Err(ApiError::bad_request("`messages`: give at least one {\"role\", \"content\"} message")),
        };
        let ids = state.tokenizer().encode(&text, false).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if ids.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty after tokenization"));
        }
        Ok((text, ids))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
}

/// Without batching: the whole generation on a compute slot of its own, started once a
/// slot is free (unless the client has gone by then).
fn generate_alone(
    state: &Arc<AppState>,
    target: Target,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: Sampling,
    sender: UnboundedSender<Piece>,
    labels: &AdapterLabels,
) {
    let queued = Instant::now();
    let (state, labels) = (state.clone(), labels.clone());
    tokio::spawn(async move {
        let slot = match state.compute_slot().await {
            Ok(slot) => slot,
            Err(e) => return drop(sender.send(Piece::Failed(e))),
        };
        if sender.is_closed() {
            state.metrics.dropped.get_or_create(&CauseLabels { cause: "disconnected".into() }).inc();
            return;
        }
        state.metrics.queue.get_or_create(&labels).observe(queued.elapsed().as_secs_f64());
        tokio::task::spawn_blocking(move || generate_on_slot(&state, slot, target, prompt, max_tokens, sampling, sender));
    });
}

fn generate_on_slot(
    worker_state: &AppState,
    slot: tokio::sync::OwnedSemaphorePermit,
    target: Target,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: Sampling,
    sender: UnboundedSender<Piece>,
) {
    {
        let _slot = slot;
        let Backbone::Llama(m) = worker_state.model_of(&target) else { unreachable!("checked by the caller") };
        let tokenizer = worker_state.tokenizer();
        let mut stop: Vec<u32> = m.config.eos_tokens();
        stop.extend(tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_id(t)));
        let mut pieces = tokenizer.inner.decode_stream(true);
        let result = generate(m, &prompt, max_tokens, &sampling, &stop, |token| -> Result<(), GenerationStop> {
            if stop.contains(&token) {
                return Ok(());
            }
            if let Some(text) = pieces.step(token).map_err(|e| GenerationStop::Failed(format!("decoding: {e}")))? {
                // The receiver is gone: the client disconnected; stop generating.
                sender.send(Piece::Text(text)).map_err(|_| GenerationStop::Disconnected)?;
            }
            Ok(())
        });
        let _ = match result {
            Ok(tokens) => {
                let finish_reason = if tokens.last().is_some_and(|t| stop.contains(t)) { "stop" } else { "length" };
                sender.send(Piece::Done { finish_reason, prompt_tokens: prompt.len(), completion_tokens: tokens.len() })
            }
            Err(GenerationStop::Disconnected) => {
                tracing::info!(model = %target.id(), "client disconnected mid-stream; generation stopped");
                Ok(())
            }
            Err(GenerationStop::Failed(message)) => sender.send(Piece::Failed(ApiError::internal(message))),
        };
    }
}

/// Why generation stopped early.
enum GenerationStop {
    Disconnected,
    Failed(String),
}

impl From<adapters_models::Error> for GenerationStop {
    fn from(e: adapters_models::Error) -> Self {
        GenerationStop::Failed(e.to_string())
    }
}

/// What a streamed generation sends next.
enum Streamed {
    Piece(Piece),
    /// The server is stopping and the generation has not finished: a last event ends it.
    Stopping,
}

/// `first`, then each piece from `receiver` until the generation ends, or until
/// `stopping` turns true (then one [`Streamed::Stopping`]).
fn async_stream(
    first: Piece,
    receiver: tokio::sync::mpsc::UnboundedReceiver<Piece>,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = Streamed> {
    let rest = futures::stream::unfold(Some((receiver, stopping)), |state| async move {
        let (mut r, mut stopping) = state?;
        let next = tokio::select! {
            biased;
            piece = r.recv() => Some(piece),
            _ = stopping.wait_for(|s| *s) => None,
        };
        match next {
            Some(piece) => piece.map(|p| (Streamed::Piece(p), Some((r, stopping)))),
            None => Some((Streamed::Stopping, None)),
        }
    });
    futures::stream::once(async move { Streamed::Piece(first) }).chain(rest)
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}
