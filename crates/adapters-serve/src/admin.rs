//! `/admin/*`: load, unload, pin, re-tag and route adapters. Locked by a bearer token
//! (compared in constant time, never printed), refused off loopback without one unless the
//! operator says `--insecure-admin`, and every call leaves one audit line (target
//! `adapters_serve::audit`): the action, what changed or why it was refused, and the peer.

use crate::error::ApiError;
use crate::server::{body, AppState};
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
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The bearer token `/admin/*` asks for. Only its SHA-256 is kept, compared in constant
/// time; `Debug` prints `AdminToken(<redacted>)`.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// A token; empty (or only white space) is refused, since it would open admin to anyone
    /// who sends `Authorization: Bearer `.
    pub fn new(token: &str) -> Result<Self, String> {
        if token.trim().is_empty() {
            return Err("the admin token is empty; set a long random one (e.g. `openssl rand -hex 32`)".into());
        }
        Ok(AdminToken(Sha256::digest(token.as_bytes()).into()))
    }

    /// Whether `given` is the token. Hashing first makes the comparison take the same time
    /// whatever the length or the first differing byte of `given`.
    pub fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        self.0.ct_eq(&given).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl std::str::FromStr for AdminToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        AdminToken::new(s)
    }
}

/// How often `--insecure-admin` repeats its warning.
pub const INSECURE_WARNING_EVERY: Duration = Duration::from_secs(600);

/// Refuses to serve on `address` with `/admin/*` open to other machines: off loopback a
/// token is needed, or the operator's explicit `insecure_admin`.
pub fn check_exposure(address: SocketAddr, token: Option<&AdminToken>, insecure_admin: bool) -> Result<(), String> {
    if address.ip().is_loopback() || token.is_some() || insecure_admin {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {address} with /admin/* open to anyone who reaches it: set ADAPTERS_ADMIN_TOKEN \
         (or --admin-token), listen on 127.0.0.1, or pass --insecure-admin if something in front of the server \
         already guards /admin"
    ))
}

/// Whether admin is open off loopback (the operator passed `--insecure-admin`): warn now
/// and every [`INSECURE_WARNING_EVERY`] while serving.
pub(crate) fn insecure(address: SocketAddr, token: Option<&AdminToken>, insecure_admin: bool) -> bool {
    insecure_admin && token.is_none() && !address.ip().is_loopback()
}

/// Logs the `--insecure-admin` warning at once and then every [`INSECURE_WARNING_EVERY`].
pub(crate) async fn warn_insecure(address: SocketAddr) {
    let mut every = tokio::time::interval(INSECURE_WARNING_EVERY);
    loop {
        every.tick().await;
        tracing::warn!(%address, "--insecure-admin: /admin/* (load, unload, pin, tag, routes) is open to anyone who reaches this address; set ADAPTERS_ADMIN_TOKEN");
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly_and_never_print() {
        let token = AdminToken::new("s3cret-token").unwrap();
        assert!(token.matches("s3cret-token"));
        for wrong in ["", "s3cret", "s3cret-token ", "S3CRET-TOKEN", "s3cret-tokenx"] {
            assert!(!token.matches(wrong), "{wrong:?} matched");
        }
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
        for empty in ["", "  ", "\t\n"] {
            assert!(AdminToken::new(empty).is_err(), "{empty:?} accepted");
        }
    }

    #[test]
    fn admin_is_refused_off_loopback_without_a_token_or_the_explicit_flag() {
        let token = AdminToken::new("t").unwrap();
        let (any, lan, local, local6) = (
            "0.0.0.0:8080".parse().unwrap(),
            "192.0.2.7:8080".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            "[::1]:8080".parse().unwrap(),
        );
        let refused = check_exposure(any, None, false).unwrap_err();
        assert!(refused.contains("ADAPTERS_ADMIN_TOKEN") && refused.contains("--insecure-admin"), "{refused}");
        assert!(check_exposure(lan, None, false).is_err());
        for ok in [
            check_exposure(any, Some(&token), false),
            check_exposure(any, None, true),
            check_exposure(local, None, false),
            check_exposure(local6, None, false),
        ] {
            assert!(ok.is_ok());
        }
        assert!(insecure(any, None, true));
        assert!(!insecure(any, Some(&token), true) && !insecure(local, None, true));
    }
}
