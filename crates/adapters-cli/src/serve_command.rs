//! `adapters serve`: the HTTP server (see adapters-serve) with logs and signal handling.

use crate::commands::open;
use crate::store_commands::StoreArg;
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;

pub fn serve(
    model: &Path,
    base: &crate::commands::BaseArgs,
    store: &StoreArg,
    host: &str,
    port: u16,
    config: adapters_serve::Config,
) -> Result<()> {
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
        let mut loaded = open(model)?;
        base.apply(&mut loaded)?;
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

/// The arguments of `adapters serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    pub model: std::path::PathBuf,
    #[command(flatten)]
    pub base: crate::commands::BaseArgs,
    #[command(flatten)]
    pub store: crate::store_commands::StoreArg,
    /// Address to listen on. 0.0.0.0 accepts other machines, and then an admin token is
    /// required (or --insecure-admin).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most adapters resident at once.
    #[arg(long, default_value_t = 64)]
    pub max_adapters: usize,
    /// Most bytes of resident adapters.
    #[arg(long, default_value_t = 2 << 30)]
    pub max_adapter_bytes: u64,
    /// Bearer token required by /admin/* (load, unload, pin, tag, routes). Prefer the
    /// environment variable (a Kubernetes Secret) to the flag, which `ps` shows. Without
    /// one, admin is open, so the server then listens on loopback only.
    #[arg(long, env = "ADAPTERS_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub admin_token: Option<adapters_serve::admin::AdminToken>,
    /// Listen off loopback with /admin/* open, for when something in front (a proxy, a
    /// network policy) already guards it. Logged as a warning at start and every 10 minutes.
    #[arg(long)]
    pub insecure_admin: bool,
    /// Where downloaded adapter versions are kept (default: $ADAPTERS_CACHE or ~/.cache/adapters).
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
    /// Forward passes run at once; more requests wait in a queue.
    #[arg(long, default_value_t = 2)]
    pub max_concurrent: usize,
    /// Seconds a tag's resolution is reused before asking the store again.
    #[arg(long, default_value_t = 5)]
    pub tag_ttl: u64,
    /// A/B routes, JSON: `{"ROUTE": [{"adapter": "NAME@VERSION", "weight": 90}, ...]}`;
    /// a request for ROUTE goes to a variant by weight (sticky per `user`).
    #[arg(long)]
    pub routes: Option<std::path::PathBuf>,
    /// Most generations decoding together in one step, each through its own adapter
    /// (continuous batching). 0 turns batching off for every endpoint: each request alone.
    #[arg(long, default_value_t = 32)]
    pub batch_rows: usize,
    /// Most tokens of embedding and classification requests batched together, each text
    /// through its own adapter (TEI's --max-batch-tokens). They run sorted by length in
    /// forwards of at most this many padded tokens; a request with more runs alone.
    #[arg(long, default_value_t = adapters_models::MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Most prompt tokens of joining generations in one decoding step (chunked prefill):
    /// a prompt shares the step with the running generations, and a longer one takes
    /// several steps. Lower keeps the time between their tokens steadier; higher gives
    /// new requests their first token sooner.
    #[arg(long, default_value_t = adapters_serve::Batching::default().prefill_chunk)]
    pub prefill_chunk: usize,
    /// Milliseconds a batch waits for more requests once a compute slot is free.
    #[arg(long, default_value_t = 2)]
    pub batch_wait_ms: u64,
    /// Requests in flight (waiting or running, every endpoint) before new ones get 503
    /// with Retry-After.
    #[arg(long, default_value_t = adapters_serve::admission::Limits::default().max_requests)]
    pub max_concurrent_requests: usize,
    /// Tokens waiting for compute before new requests get 503 (one larger than this alone
    /// gets 413): texts of embedding and classification requests until their forward pass,
    /// prompt + max_tokens of generations until they join the decoding batch. About what
    /// the machine gets through in --request-timeout.
    #[arg(long, default_value_t = adapters_serve::admission::Limits::default().max_waiting_tokens)]
    pub max_waiting_tokens: usize,
    /// KV-cache tokens (prompt + max_tokens) of the generations decoding together; more
    /// wait. Default: a quarter of the memory available at start, at the model's bytes per
    /// token (SmolLM2-135M: 46 KB).
    #[arg(long)]
    pub max_kv_tokens: Option<usize>,
    /// Seconds a request may take before it is answered 503 (a streamed generation: until
    /// its first token). Keep it under the clients' and the load balancer's time-outs.
    #[arg(long, default_value_t = adapters_serve::admission::Limits::default().request_timeout.as_secs())]
    pub request_timeout: u64,
    /// On SIGTERM: seconds /ready answers 503 while requests are still served, so the load
    /// balancer stops sending (longer than its readiness check interval).
    #[arg(long, default_value_t = adapters_serve::Config::default().drain.as_secs())]
    pub drain_seconds: u64,
    /// Then: seconds requests in flight get to finish before open streams are ended with
    /// a final event.
    #[arg(long, default_value_t = adapters_serve::Config::default().shutdown_timeout.as_secs())]
    pub shutdown_timeout: u64,
}
