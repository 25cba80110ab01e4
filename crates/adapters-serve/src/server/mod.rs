//! The HTTP routes: inference (`inference`, `completions`) and admin (`admin`), over the
//! server's state ([`crate::state`]).

use crate::state::AppState;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

mod admin;
pub(crate) mod completions;
mod inference;
use inference::{classify_texts, embeddings, metrics, models, ready};

/// The routes: OpenAI-style inference, models, admin, health, readiness and metrics.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify_texts))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/models", get(models))
        .route("/admin/adapters/load", post(admin::load))
        .route("/admin/adapters/unload", post(admin::unload))
        .route("/admin/adapters/pin", post(admin::pin))
        .route("/admin/tags", post(admin::tag))
        .route("/admin/routes", post(admin::route))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
