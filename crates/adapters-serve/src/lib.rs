//! `adapters serve`: one frozen base model, many adapters from the adapter library, over
//! HTTP. Adapters load on their first request (concurrent first requests load once) into
//! an LRU cache bounded in count and bytes; requests read an immutable snapshot of the
//! resident adapters, so loading, evicting or re-tagging never blocks a request in flight,
//! and a request finishes on the version it started with.

#![warn(missing_docs)]

pub mod admin;
pub mod admission;
mod batcher;
pub mod cache;
mod decoding;
mod engine;
mod error;
pub mod fault;
pub mod metrics;
pub mod routes;
mod server;
mod state;
mod target;

pub use engine::Batching;
pub use error::ApiError;
pub use server::router;
pub use state::{AppState, Config};

/// Serves `state` on `listener` until `shutdown` resolves, then stops as a load balancer
/// expects: `/ready` answers 503 at once while requests are still served for
/// `Config::drain` (so the balancer stops sending), then no new connection is accepted and
/// the requests in flight get `Config::shutdown_timeout` to finish; streams still open then
/// end with a final event saying so. Refuses (`InvalidInput`) to serve off loopback with
/// `/admin/*` open (no token, no `insecure_admin`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: std::sync::Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    let config = state.config().clone();
    admin::check_exposure(address, config.admin_token.as_ref(), config.insecure_admin)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let warning =
        admin::insecure(address, config.admin_token.as_ref(), config.insecure_admin).then(|| tokio::spawn(admin::warn_insecure(address)));
    let (stopped_accepting, mut accepting_stopped) = tokio::sync::oneshot::channel::<()>();
    let draining = state.clone();
    let drain_then_stop = async move {
        shutdown.await;
        draining.start_draining();
        tracing::info!(
            seconds = config.drain.as_secs_f64(),
            "shutting down: /ready answers 503; still serving while the load balancer notices"
        );
        tokio::time::sleep(config.drain).await;
        tracing::info!(seconds = config.shutdown_timeout.as_secs_f64(), "no longer accepting connections; finishing requests in flight");
        let _ = stopped_accepting.send(());
    };
    let app = router(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(drain_then_stop));
    tokio::pin!(server);
    let served = tokio::select! {
        served = &mut server => served,
        Ok(()) = &mut accepting_stopped => {
            match tokio::time::timeout(config.shutdown_timeout, &mut server).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!("requests still in flight after --shutdown-timeout: ending open streams");
                    state.stop_streams();
                    // Let the streams' last events go out; then stop regardless.
                    tokio::time::timeout(STREAM_END_GRACE, &mut server).await.unwrap_or(Ok(()))
                }
            }
        }
    };
    if let Some(w) = warning {
        w.abort();
    }
    served
}

/// How long open streams get to send their last event before the server stops.
const STREAM_END_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
