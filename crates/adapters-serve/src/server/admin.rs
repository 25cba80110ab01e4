//! `/admin/*`: load, unload, pin, re-tag and route adapters, each behind the token of
//! [`crate::admin`], and every call leaves one audit line (target `adapters_serve::audit`):
//! the action, what changed or why it was refused, and the peer.

use crate::error::{body, ApiError};
use crate::state::AppState;
use adapters_store::Reference;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Who called: the TCP peer, and what a proxy in front says in `X-Forwarded-For`.
pub(crate) struct Peer(String);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        let socket = parts.extensions.get::<ConnectInfo<SocketAddr>>().map_or("unknown".into(), |c| c.0.to_string());
        let forwarded = parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        Ok(Peer(match forwarded {
            Some(f) => format!("{socket} (x-forwarded-for: {})", f.chars().take(200).collect::<String>()),
            None => socket,
        }))
    }
}

/// Runs an admin action once the caller shows the token, and writes its audit line:
/// the action, the change (the response body) or the refusal, and the peer.
async fn audited<F, Fut>(state: &AppState, headers: &HeaderMap, peer: Peer, action: &'static str, f: F) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Value, ApiError>>,
{
    let result = match authorised(state, headers) {
        Ok(()) => f().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(change) => {
            tracing::info!(target: "adapters_serve::audit", action, peer = %peer.0, status = 200, %change, "admin");
            Json(change).into_response()
        }
        Err(e) => {
            tracing::warn!(target: "adapters_serve::audit", action, peer = %peer.0, status = e.status.as_u16(), error = %e.message, "admin refused");
            e.into_response()
        }
    }
}

/// Refuses an admin call without the configured bearer token.
fn authorised(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.config.admin_token else { return Ok(()) };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|g| token.matches(g)) {
        return Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "admin endpoints need `Authorization: Bearer <token>` (the server's ADAPTERS_ADMIN_TOKEN)".into(),
        });
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminRequest {
    /// `NAME`, `NAME@TAG` or `NAME@VERSION`.
    adapter: String,
    /// For `/admin/adapters/pin`: pin (default) or unpin.
    #[serde(default)]
    pinned: Option<bool>,
    /// For `/admin/tags`: the tag to point at `adapter`.
    #[serde(default)]
    tag: Option<String>,
}

type Payload<T> = Result<Json<T>, JsonRejection>;

pub(crate) async fn load(State(state): State<Arc<AppState>>, peer: Peer, headers: HeaderMap, payload: Payload<AdminRequest>) -> Response {
    audited(&state.clone(), &headers, peer, "load", || async move {
        let r = state.adapter(&body(payload)?.adapter).await?;
        Ok(json!({"loaded": r.key()}))
    })
    .await
}

pub(crate) async fn unload(State(state): State<Arc<AppState>>, peer: Peer, headers: HeaderMap, payload: Payload<AdminRequest>) -> Response {
    audited(&state.clone(), &headers, peer, "unload", || async move {
        let reference: Reference = body(payload)?.adapter.parse()?;
        let m = state.manifest(&reference).await?;
        let key = format!("{}@{}", m.name, m.version);
        let (was, swap) = state.cache.unload(&key);
        state.metrics.swap_seconds.observe(swap.as_secs_f64());
        state.update_resident_gauges();
        if !was {
            return Err(ApiError::not_found(format!("{key} is not resident")));
        }
        Ok(json!({"unloaded": key, "swap_seconds": swap.as_secs_f64()}))
    })
    .await
}

pub(crate) async fn pin(State(state): State<Arc<AppState>>, peer: Peer, headers: HeaderMap, payload: Payload<AdminRequest>) -> Response {
    audited(&state.clone(), &headers, peer, "pin", || async move {
        let request = body(payload)?;
        let r = state.adapter(&request.adapter).await?;
        let pinned = request.pinned.unwrap_or(true);
        r.pinned.store(pinned, Ordering::Relaxed);
        Ok(json!({"adapter": r.key(), "pinned": pinned}))
    })
    .await
}

pub(crate) async fn tag(State(state): State<Arc<AppState>>, peer: Peer, headers: HeaderMap, payload: Payload<AdminRequest>) -> Response {
    audited(&state.clone(), &headers, peer, "tag", || async move {
        let request = body(payload)?;
        let reference: Reference = request.adapter.parse()?;
        let tag = request.tag.ok_or_else(|| ApiError::bad_request("`tag`: which tag to point at the adapter"))?.parse()?;
        let m = state.store.tag(&reference, &tag).await?;
        // New requests for NAME@TAG resolve to the new version at once on this replica.
        let tagged = format!("{}@{tag}", m.name);
        state.remember_tag(&tagged, &m);
        if tag.as_str() == adapters_store::LATEST {
            state.remember_tag(&m.name, &m);
        }
        Ok(json!({"tag": tagged, "version": m.version}))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteRequest {
    name: String,
    /// The new variants; empty removes the route.
    variants: Vec<crate::routes::Variant>,
}

/// Sets (or with no variants removes) an A/B route, publishing a new routes snapshot.
pub(crate) async fn route(State(state): State<Arc<AppState>>, peer: Peer, headers: HeaderMap, payload: Payload<RouteRequest>) -> Response {
    audited(&state.clone(), &headers, peer, "route", || async move {
        let request = body(payload)?;
        if !request.variants.is_empty() {
            crate::routes::check(&request.name, &request.variants).map_err(ApiError::bad_request)?;
        }
        let t = Instant::now();
        let routes = state.publish_route(request.name, request.variants);
        state.metrics.swap_seconds.observe(t.elapsed().as_secs_f64());
        Ok(json!({"routes": *routes}))
    })
    .await
}
