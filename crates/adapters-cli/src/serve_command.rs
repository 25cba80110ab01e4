//! `adapters serve`: the HTTP server (see adapters-serve) with logs and signal handling.

use crate::commands::open;
use crate::store_commands::StoreArg;
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;

pub fn serve(model: &Path, store: &StoreArg, host: &str, port: u16, config: adapters_serve::Config) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the server runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((host, port)).await.with_context(|| format!("listening on {host}:{port}"))?;
        let address = listener.local_addr()?;
        // Before the model loads: a refused start should say so at once.
        adapters_serve::admin::check_exposure(address, config.admin_token.as_ref(), config.insecure_admin).map_err(anyhow::Error::msg)?;
        let loaded = open(model)?;
        let store = adapters_store::Store::open(&store.store)?;
        let state = Arc::new(adapters_serve::AppState::new(loaded, store, config));
        // Scripts and tests read the address (with the port the OS chose for --port 0).
        println!("listening on http://{address}");
        tracing::info!(%address, model = %model.display(), "serving");
        adapters_serve::serve(listener, state, shutdown_signal()).await.context("serving")
    })
}

/// Ctrl-C, or SIGTERM (what Kubernetes sends before stopping a pod).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
