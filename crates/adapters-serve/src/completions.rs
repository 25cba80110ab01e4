//! `POST /v1/completions` and `POST /v1/chat/completions` for decoder models, whole or
//! streamed as server-sent events. A client that disconnects mid-stream stops its
//! generation at the next token (the channel to it closes).

use crate::decoding::{Generation, Piece};
use crate::error::ApiError;
use crate::metrics::AdapterLabels;
use crate::server::{body, record, AppState, Target};
use adapters_models::generate::{generate, Sampling};
use adapters_models::{Backbone, Message};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
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
    #[serde(default)]
    n: Option<usize>,
    /// Who asks: keeps them on one variant of an A/B route.
    #[serde(default)]
    user: Option<String>,
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
    let endpoint = if kind == Kind::Chat { "chat_completions" } else { "completions" };
    let mut labels = AdapterLabels { adapter: "unknown".into(), version: String::new() };
    let prepared = async {
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
        let text = match (kind, &request.prompt, &request.messages) {
            (Kind::Completion, Some(p), _) => p.clone(),
            (Kind::Chat, _, Some(messages)) if !messages.is_empty() => {
                state.tokenizer().apply_chat_template(messages, true).map_err(|e| ApiError::bad_request(format!("`messages`: {e}")))?
            }
            (Kind::Completion, None, _) => return Err(ApiError::bad_request("`prompt`: the text to continue is missing")),
            (Kind::Chat, _, _) => return Err(ApiError::bad_request("`messages`: give at least one {\"role\", \"content\"} message")),
        };
        let prompt = state.tokenizer().encode(&text, false).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty after tokenization"));
        }
        let max_tokens = request.max_completion_tokens.or(request.max_tokens).unwrap_or(128);
        if max_tokens == 0 || max_tokens > MAX_NEW_TOKENS {
            return Err(ApiError::bad_request(format!("`max_tokens`: 1 to {MAX_NEW_TOKENS}")));
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
        Ok((target, route, prompt, max_tokens, sampling, request.stream))
    }
    .await;
    let (target, route, prompt, max_tokens, sampling, stream) = match prepared {
        Ok(p) => p,
        Err(e) => {
            record(&state, &labels, endpoint, e.status, started);
            return e.into_response();
        }
    };
    let id = format!("{}-{:016x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, rand_seed());
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model_id = target.id();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    if state.batching().max_rows > 0 {
        let generation = Generation { target, prompt, max_tokens, sampling, queued: Instant::now(), pieces: sender };
        if let Err(e) = state.decoder().submit(generation) {
            return e.into_response();
        }
    } else if let Err(e) = generate_alone(&state, target, prompt, max_tokens, sampling, sender, &labels).await {
        return e.into_response();
    }

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
        let events = async_stream(receiver, move |piece| match piece {
            Piece::Text(t) => vec![Event::default().data(chunk(Some(&t), None).to_string())],
            Piece::Done { finish_reason, prompt_tokens, completion_tokens } => {
                state2.count_tokens(&labels, prompt_tokens + completion_tokens);
                record(&state2, &labels, endpoint, StatusCode::OK, started);
                vec![Event::default().data(chunk(None, Some(finish_reason)).to_string()), Event::default().data("[DONE]")]
            }
            Piece::Failed(message) => {
                record(&state2, &labels, endpoint, StatusCode::INTERNAL_SERVER_ERROR, started);
                vec![Event::default().event("error").data(json!({"error": {"message": message, "type": "server_error"}}).to_string())]
            }
        });
        return Sse::new(events).keep_alive(KeepAlive::default()).into_response();
    }
    let mut text = String::new();
    while let Some(piece) = receiver.recv().await {
        match piece {
            Piece::Text(t) => text += &t,
            Piece::Done { finish_reason, prompt_tokens, completion_tokens } => {
                state.count_tokens(&labels, prompt_tokens + completion_tokens);
                record(&state, &labels, endpoint, StatusCode::OK, started);
                let mut body = chunk(None, Some(finish_reason));
                let choice = match kind {
                    Kind::Completion => json!({"index": 0, "text": text, "finish_reason": finish_reason}),
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}),
                };
                body["object"] = json!(if kind == Kind::Chat { "chat.completion" } else { "text_completion" });
                body["choices"] = json!([choice]);
                body["usage"] = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
                return (StatusCode::OK, Json(body)).into_response();
            }
            Piece::Failed(message) => {
                record(&state, &labels, endpoint, StatusCode::INTERNAL_SERVER_ERROR, started);
                return ApiError::internal(message).into_response();
            }
        }
    }
    ApiError::internal("generation stopped without an answer").into_response()
}

/// Without batching: the whole generation on a compute slot of its own.
async fn generate_alone(
    state: &Arc<AppState>,
    target: Target,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: Sampling,
    sender: UnboundedSender<Piece>,
    labels: &AdapterLabels,
) -> Result<(), ApiError> {
    let queued = Instant::now();
    let slot = state.compute_slot().await?;
    state.metrics.queue.get_or_create(labels).observe(queued.elapsed().as_secs_f64());
    let worker_state = state.clone();
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let Backbone::Llama(m) = worker_state.model_of(&target) else { unreachable!("checked by the caller") };
        let tokenizer = worker_state.tokenizer();
        let mut stop: Vec<u32> = m.config.eos_token_id.into_iter().collect();
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
            Err(GenerationStop::Failed(message)) => sender.send(Piece::Failed(message)),
        };
    });
    Ok(())
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

/// The events of each piece from `receiver`, in order, until the generation ends.
fn async_stream(
    receiver: tokio::sync::mpsc::UnboundedReceiver<Piece>,
    events: impl Fn(Piece) -> Vec<Event> + Send + 'static,
) -> impl futures::Stream<Item = Result<Event, std::convert::Infallible>> {
    use futures::StreamExt;
    futures::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|piece| (piece, r)) })
        .flat_map(move |piece| futures::stream::iter(events(piece).into_iter().map(Ok)))
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}
