//! The inference routes: embeddings, classification, the model list, readiness and
//! metrics (completions live in `completions`).

use crate::batcher::Work;
use crate::cache::Resident;
use crate::error::{body, ApiError};
use crate::metrics::AdapterLabels;
use crate::state::AppState;
use crate::target::Target;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// `input`: one text or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InferenceRequest {
    /// `base`, or an adapter: `NAME`, `NAME@TAG`, `NAME@VERSION`.
    model: String,
    input: Input,
    /// Which head, for `/v1/classify` when the adapter has several.
    #[serde(default)]
    task: Option<String>,
    /// Embeddings as `float` lists (default) or `base64` (little-endian f32 bytes, what
    /// OpenAI's Python client asks for).
    #[serde(default)]
    encoding_format: Option<String>,
    /// Who asks: keeps them on one variant of an A/B route.
    #[serde(default)]
    user: Option<String>,
    /// Texts longer than the model's context are cut to it (the default); with `false`
    /// such a text is a 400 instead.
    #[serde(default)]
    truncate: Option<bool>,
}

fn texts(state: &AppState, input: Input) -> Result<Vec<String>, ApiError> {
    let texts = match input {
        Input::One(t) => vec![t],
        Input::Many(v) => v,
    };
    if texts.is_empty() || texts.len() > state.config.max_inputs {
        return Err(ApiError::bad_request(format!("`input`: give 1 to {} texts, not {}", state.config.max_inputs, texts.len())));
    }
    Ok(texts)
}

impl AppState {
    /// Token ids of each text (with special tokens where `add_special`), each cut to what
    /// the model reads (its context, or less where its tokenizer cuts texts shorter), or
    /// with `truncate` false a 400 for the first that is longer. Tokenising runs on the
    /// blocking pool, off the runtime's worker threads; the texts come back with the ids.
    pub(crate) async fn tokenize(
        self: &Arc<Self>,
        texts: Vec<String>,
        add_special: bool,
        truncate: bool,
    ) -> Result<(Vec<String>, Vec<Vec<u32>>), ApiError> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let context = state.context();
            let reads = state.tokenizer().max_length().map_or(context, |m| m.min(context));
            let keep_last = state.base().is_encoder() && add_special;
            let ids = texts
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    let (ids, cut) =
                        state.tokenizer().encode_noting_cut(text, add_special).map_err(|e| ApiError::bad_request(format!("`input[{i}]`: {e}")))?;
                    if (cut || ids.len() > context) && !truncate {
                        return Err(ApiError::bad_request(format!(
                            "`input[{i}]` is longer than the {reads} tokens this model reads; shorten it, or leave `truncate` unset to cut it"
                        )));
                    }
                    Ok(adapters_models::tokenizer::truncate_ids(ids, context, keep_last))
                })
                .collect::<Result<_, ApiError>>()?;
            Ok((texts, ids))
        })
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
    }
}

/// What an endpoint asks of a request's rows, given its model (and `task`).
type WorkOf = fn(&Target, Option<String>) -> Result<Work, ApiError>;

/// Runs an inference endpoint: parses, resolves the model, runs, and records metrics
/// under the adapter's labels (or `unknown` when the model could not be resolved).
async fn serve_inference(
    state: Arc<AppState>,
    endpoint: &'static str,
    payload: Result<Json<InferenceRequest>, JsonRejection>,
    work_of: WorkOf,
) -> axum::response::Response {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + state.admission.limits().request_timeout;
    let mut labels = AdapterLabels { adapter: "unknown".into(), version: String::new() };
    let result = async {
        let _ticket = state.admission.admit(&state.metrics)?;
        let request = body(payload)?;
        let base64 = match request.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => return Err(ApiError::bad_request(format!("`encoding_format`: `float` or `base64`, not `{other}`"))),
        };
        let texts = texts(&state, request.input)?;
        let (target, route) = state.target(&request.model, request.user.as_deref()).await?;
        labels = target.labels();
        let work = work_of(&target, request.task)?;
        let (rows, id) = (texts.len() as u64, target.id());
        let add_special = matches!(work, Work::Embed) || state.model_of(&target).is_encoder();
        let (texts, ids) = state.tokenize(texts, add_special, request.truncate.unwrap_or(true)).await?;
        let waiting = Some(state.admission.wait(ids.iter().map(Vec::len).sum(), &state.metrics)?);
        let batch = crate::batcher::Rows { texts, ids, waiting };
        let (mut value, tokens) = state.batcher().run(target, batch, work, deadline).await?;
        value["model"] = json!(id);
        state.metrics.rows.get_or_create(&labels).inc_by(rows);
        state.metrics.tokens.get_or_create(&labels).inc_by(tokens as u64);
        value["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
        if let Some(route) = route {
            value["route"] = route;
        }
        if base64 {
            for item in value["data"].as_array_mut().into_iter().flatten() {
                if let Some(v) = item["embedding"].as_array() {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| (x.as_f64().unwrap_or(0.0) as f32).to_le_bytes()).collect();
                    item["embedding"] = json!(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes));
                }
            }
        }
        Ok(value)
    }
    .await;
    let response = match result {
        Ok(value) => (StatusCode::OK, Json(value)).into_response(),
        Err(e) => {
            tracing::warn!(endpoint, adapter = %labels.adapter, status = e.status.as_u16(), "{}", e.message);
            e.into_response()
        }
    };
    state.metrics.record_request(&labels, endpoint, response.status(), started);
    response
}

fn embedding(_: &Target, _: Option<String>) -> Result<Work, ApiError> {
    Ok(Work::Embed)
}

/// The adapter's head for `task` (or its only head).
fn classification(target: &Target, task: Option<String>) -> Result<Work, ApiError> {
    let Target::Adapter(resident) = target else {
        return Err(ApiError::bad_request("`model`: the base model has no classification head; name an adapter trained with one"));
    };
    let heads: Vec<usize> =
        (0..resident.heads.len()).filter(|&i| task.as_ref().is_none_or(|t| &resident.heads[i].config.task == t)).collect();
    match heads.as_slice() {
        [one] => Ok(Work::Classify { head: *one }),
        [] => {
            let known: Vec<&str> = resident.heads.iter().map(|h| h.config.task.as_str()).collect();
            Err(ApiError::bad_request(format!(
                "{} has no head{} (heads: [{}])",
                resident.key(),
                task.map(|t| format!(" for task `{t}`")).unwrap_or_default(),
                known.join(", ")
            )))
        }
        _ => Err(ApiError::bad_request(format!("{} has several heads; choose one with `task`", resident.key()))),
    }
}

pub(super) async fn embeddings(
    State(state): State<Arc<AppState>>,
    payload: Result<Json<InferenceRequest>, JsonRejection>,
) -> axum::response::Response {
    serve_inference(state, "embeddings", payload, embedding).await
}

pub(super) async fn classify_texts(
    State(state): State<Arc<AppState>>,
    payload: Result<Json<InferenceRequest>, JsonRejection>,
) -> axum::response::Response {
    serve_inference(state, "classify", payload, classification).await
}

/// `GET /v1/models`: the base model and every adapter in the store (resident ones marked).
pub(super) async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let resident: HashMap<String, Arc<Resident>> = state.cache.residents().into_iter().map(|r| (r.key(), r)).collect();
    let mut data = vec![json!({"id": "base", "object": "model", "owned_by": "adapters", "resident": true})];
    for entry in state.store.list(None).await? {
        for v in entry.versions {
            let key = format!("{}@{}", entry.name, v.manifest.version);
            let r = resident.get(&key);
            data.push(json!({
                "id": key, "object": "model", "owned_by": "adapters", "kind": v.manifest.contents.kind,
                "tags": v.tags, "resident": r.is_some(), "pinned": r.is_some_and(|r| r.pinned.load(Ordering::Relaxed)),
            }));
        }
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

pub(super) async fn ready(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"})))
    } else if !state.loops_alive() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "failed: a batching or decoding loop has stopped; replace this replica"})))
    } else {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    }
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.encode())
}
