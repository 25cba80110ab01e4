//! `adapters serve`: one frozen base model, many adapters from the adapter library, over
//! HTTP. Adapters load on their first request (concurrent first requests load once) into
//! an LRU cache bounded in count and bytes; requests read an immutable snapshot of the
//! resident adapters, so loading, evicting or re-tagging never blocks a request in flight,
//! and a request finishes on the version it started with.

#![warn(missing_docs)]

mod batcher;
pub mod cache;
mod completions;
mod decoding;
mod error;
pub mod metrics;
pub mod routes;
mod server;

pub use batcher::Batching;
pub use error::ApiError;
pub use server::{router, AppState, Config};

/// Serves `state` on `listener` until `shutdown` resolves, then stops accepting, answers
/// `/ready` with 503 and lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: std::sync::Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let draining = state.clone();
    let shutdown = async move {
        shutdown.await;
        draining.start_draining();
        tracing::info!("shutting down: finishing requests in flight");
    };
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
