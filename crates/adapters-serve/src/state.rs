//! The server's state: its configuration, the engine the batching and decoding loops run
//! on, the adapter library and the resident adapters, tags, routes and the draining flag;
//! and how a request's model name becomes a target (resolving tags and routes, loading
//! versions on first use).

use crate::admin::AdminToken;
use crate::batcher::Batcher;
use crate::cache::{AdapterCache, CacheError, Limits, Resident};
use crate::decoding::Decoder;
use crate::engine::{Batching, Engine};
use crate::error::ApiError;
use crate::metrics::{AdapterLabels, Metrics};
use crate::target::Target;
use adapters_core::{Fingerprint, InsertionPoint, Setup};
use adapters_models::{Backbone, HoldsAdapters, LoadedModel, TextTokenizer};
use adapters_store::{Manifest, Reference, Store};
use axum::http::StatusCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where downloaded adapter versions are kept (content-addressed; safe to share).
    pub cache_dir: PathBuf,
    /// Resident adapter limits.
    pub limits: Limits,
    /// Bearer token for `/admin/*`; `None` leaves them open, which [`crate::serve`] allows
    /// on loopback only (or with `insecure_admin`).
    pub admin_token: Option<AdminToken>,
    /// Serve off loopback with `/admin/*` open (something in front guards it); warned about
    /// at start and every 10 minutes.
    pub insecure_admin: bool,
    /// How long a tag's resolution is reused before the store is asked again.
    pub tag_ttl: Duration,
    /// Forwards that run at once; further requests queue.
    pub max_concurrent: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Most texts in one request.
    pub max_inputs: usize,
    /// A/B routes at start (`/admin/routes` changes them).
    pub routes: crate::routes::Routes,
    /// How embedding and classification requests are batched across adapters.
    pub batching: Batching,
    /// What the server takes on before refusing with 503 (requests, tokens, KV cache,
    /// deadline).
    pub admission: crate::admission::Limits,
    /// After the shutdown signal: how long `/ready` answers 503 while requests are still
    /// served, so load balancers stop sending before connections are refused.
    pub drain: Duration,
    /// Then: how long requests in flight get to finish before open streams are ended.
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cache_dir: std::env::temp_dir().join("adapters-serve-cache"),
            limits: Limits { max_adapters: 64, max_bytes: 2 << 30 },
            admin_token: None,
            insecure_admin: false,
            tag_ttl: Duration::from_secs(5),
            max_concurrent: 2,
            max_body_bytes: 1 << 20,
            max_inputs: 256,
            routes: Default::default(),
            batching: Batching::default(),
            admission: Default::default(),
            drain: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    /// The base model and what runs it (lent to the batching and decoding loops).
    engine: Arc<Engine>,
    pub(crate) store: Store,
    pub(crate) cache: AdapterCache,
    /// The server's metrics.
    pub metrics: Arc<Metrics>,
    pub(crate) config: Config,
    pub(crate) admission: Arc<crate::admission::Admission>,
    tags: Mutex<HashMap<String, (Manifest, Instant)>>,
    routes: arc_swap::ArcSwap<crate::routes::Routes>,
    route_publishing: Mutex<()>,
    draining: AtomicBool,
    /// Turns true when the server stops waiting for work in flight: open streams end.
    stopping: tokio::sync::watch::Sender<bool>,
    batcher: OnceLock<Batcher>,
    decoder: OnceLock<Decoder>,
    /// The base model's fingerprint, computed by the first load (the weights never change).
    fingerprint: OnceLock<Fingerprint>,
}

impl AppState {
    /// The state for serving `model` (no adapters active) with adapters from `store`.
    pub fn new(model: LoadedModel, store: Store, config: Config) -> Self {
        adapters_families::link();
        crate::fault::init();
        let kv_budget = config.admission.max_kv_tokens.unwrap_or_else(|| match &model.backbone {
            Backbone::Llama(m) => crate::admission::kv_tokens_for_memory(m.kv_bytes_per_token()),
            Backbone::Bert(_) => 0,
        });
        let metrics = Arc::new(Metrics::default());
        AppState {
            admission: crate::admission::Admission::new(config.admission, &metrics),
            engine: Arc::new(Engine::new(
                model.backbone,
                model.tokenizer,
                config.max_concurrent,
                config.batching,
                kv_budget,
                metrics.clone(),
            )),
            store,
            cache: AdapterCache::new(config.limits),
            metrics,
            tags: Mutex::new(HashMap::new()),
            routes: arc_swap::ArcSwap::from_pointee(config.routes.clone()),
            route_publishing: Mutex::new(()),
            draining: AtomicBool::new(false),
            stopping: tokio::sync::watch::Sender::new(false),
            batcher: OnceLock::new(),
            decoder: OnceLock::new(),
            fingerprint: OnceLock::new(),
            config,
        }
    }

    /// How it runs.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// KV-cache tokens running generations may hold together.
    pub fn kv_budget(&self) -> usize {
        self.engine.kv_budget()
    }

    /// The longest sequence the base model takes (prompt and new tokens together).
    pub(crate) fn context(&self) -> usize {
        match self.base() {
            Backbone::Bert(m) => m.config.max_position_embeddings,
            Backbone::Llama(m) => m.config.max_position_embeddings,
        }
    }

    /// Whether the batching and decoding loops that have started are still running.
    pub(crate) fn loops_alive(&self) -> bool {
        self.batcher.get().is_none_or(Batcher::alive) && self.decoder.get().is_none_or(Decoder::alive)
    }

    /// Turns true when open streams must end (the shutdown timeout has passed).
    pub(crate) fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Ends every open stream with a final event saying the server is shutting down.
    pub fn stop_streams(&self) {
        self.stopping.send_replace(true);
    }

    /// From now on `/ready` answers 503, so load balancers stop sending new requests.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The manifest a reference names, reusing a tag's resolution for `tag_ttl`. While the
    /// store cannot be reached, a resolution made before keeps serving (versions never
    /// change; only where a tag points might have).
    pub(crate) async fn manifest(&self, reference: &Reference) -> Result<Manifest, ApiError> {
        let key = reference.to_string();
        let known = self.tags.lock().expect("tag cache poisoned").get(&key).cloned();
        if let Some((m, at)) = &known {
            if at.elapsed() < self.config.tag_ttl {
                return Ok(m.clone());
            }
        }
        match self.store.resolve(reference).await {
            Ok(m) => {
                self.remember_tag(&key, &m);
                Ok(m)
            }
            Err(e @ adapters_store::Error::Backend { .. }) => match known {
                Some((m, at)) => {
                    tracing::warn!(reference = %key, age_s = at.elapsed().as_secs_f64(), "the store is unreachable ({e}); serving the last resolution");
                    // Asked again after another tag_ttl, not on every request of the outage.
                    self.remember_tag(&key, &m);
                    Ok(m)
                }
                None => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The resident adapter for `model` (`NAME`, `NAME@TAG`, `NAME@VERSION`), loading it
    /// from the store on first use.
    pub(crate) async fn adapter(self: &Arc<Self>, model: &str) -> Result<Arc<Resident>, ApiError> {
        let reference: Reference = model.parse().map_err(|e: adapters_store::Error| ApiError::bad_request(format!("`model`: {e}")))?;
        let manifest = self.manifest(&reference).await?;
        let labels = AdapterLabels { adapter: manifest.name.clone(), version: manifest.version.clone() };
        let key = format!("{}@{}", manifest.name, manifest.version);
        let started = Instant::now();
        let state = self.clone();
        let loaded = self.cache.get_or_load(&key, move || async move { state.load(manifest).await }).await;
        match loaded {
            Ok((resident, true, _)) => {
                self.metrics.cache_hits.get_or_create(&labels).inc();
                Ok(resident)
            }
            Ok((resident, false, published)) => {
                self.metrics.cache_misses.get_or_create(&labels).inc();
                self.metrics.load_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
                self.metrics.swap_seconds.observe(published.swap.as_secs_f64());
                for evicted in &published.evicted {
                    let (adapter, version) = evicted.split_once('@').unwrap_or((evicted, ""));
                    self.metrics.evictions.get_or_create(&AdapterLabels { adapter: adapter.into(), version: version.into() }).inc();
                    tracing::info!(adapter = %evicted, "evicted");
                }
                self.update_resident_gauges();
                tracing::info!(adapter = %key, seconds = started.elapsed().as_secs_f64(), "loaded");
                Ok(resident)
            }
            Err(CacheError::Load(e)) => Err(e),
            Err(full @ CacheError::Full { .. }) => Err(ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: full.to_string() }),
        }
    }

    /// The base model or the resident adapter `model` names (held for the request); a
    /// route name is first replaced by one of its variants (sticky per `user`), which the
    /// result reports.
    pub(crate) async fn target(self: &Arc<Self>, model: &str, user: Option<&str>) -> Result<(Target, Option<Value>), ApiError> {
        let routes = self.routes.load();
        let (model, route) = match routes.pick(model, user) {
            Some(variant) => (variant, Some(json!({"name": model, "variant": variant}))),
            None => (model, None),
        };
        let target = if model == "base" { Target::Base } else { Target::Adapter(self.adapter(model).await?) };
        Ok((target, route))
    }

    /// The network a target runs on.
    pub(crate) fn model_of<'a>(&'a self, target: &'a Target) -> &'a Backbone {
        self.engine.model_of(target)
    }

    /// The base model.
    pub(crate) fn base(&self) -> &Backbone {
        self.engine.model_of(&Target::Base)
    }

    /// The base model's tokenizer (adapters share it).
    pub(crate) fn tokenizer(&self) -> &TextTokenizer {
        self.engine.tokenizer()
    }

    /// Whether the server is draining (`/ready` answers 503).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The batching queue (started on first use, inside the server's runtime).
    pub(crate) fn batcher(&self) -> &Batcher {
        self.batcher.get_or_init(|| Batcher::start(Arc::downgrade(&self.engine)))
    }

    /// The continuous-batching decoder (started on first use, inside the server's runtime).
    pub(crate) fn decoder(&self) -> &Decoder {
        self.decoder.get_or_init(|| Decoder::start(Arc::downgrade(&self.engine), tokio::runtime::Handle::current()))
    }

    /// A compute slot: at most `max_concurrent` forwards run at once.
    pub(crate) async fn compute_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.engine.compute_slot().await
    }

    /// Counts one generation (a row) and its prompt and new tokens.
    pub(crate) fn count_tokens(&self, labels: &AdapterLabels, tokens: usize) {
        self.metrics.rows.get_or_create(labels).inc();
        self.metrics.tokens.get_or_create(labels).inc_by(tokens as u64);
    }

    /// Remembers that the tag reference `key` (`NAME@TAG`, or `NAME` for latest) now names
    /// `manifest`, so new requests on this replica follow a re-tag at once.
    pub(crate) fn remember_tag(&self, key: &str, manifest: &Manifest) {
        self.tags.lock().expect("tag cache poisoned").insert(key.to_string(), (manifest.clone(), Instant::now()));
    }

    /// Sets route `name` to `variants` (none removes it) and publishes the new routes.
    pub(crate) fn publish_route(&self, name: String, variants: Vec<crate::routes::Variant>) -> Arc<crate::routes::Routes> {
        let _one_publisher = self.route_publishing.lock().expect("route lock poisoned");
        let mut next = (**self.routes.load()).clone();
        if variants.is_empty() {
            next.0.remove(&name);
        } else {
            next.0.insert(name, variants);
        }
        let next = Arc::new(next);
        self.routes.store(next.clone());
        next
    }

    pub(crate) fn update_resident_gauges(&self) {
        let residents = self.cache.residents();
        self.metrics.resident.set(residents.len() as i64);
        self.metrics.resident_bytes.set(residents.iter().map(|r| r.bytes() as i64).sum());
    }

    /// Downloads a version (once; versions never change) and attaches it to a copy of the
    /// base model (the weights are shared, not copied).
    async fn load(&self, manifest: Manifest) -> Result<Resident, ApiError> {
        let dir = self.store.cached(&manifest, &self.config.cache_dir).await?;
        let mut model = self.base().clone();
        let known = self.fingerprint.get().cloned();
        let (resident, fingerprint) = tokio::task::spawn_blocking(move || {
            let fits = |e: adapters_models::Error| ApiError {
                status: StatusCode::CONFLICT,
                message: format!("{}@{} does not fit this server's base model: {e}", manifest.name, manifest.version),
            };
            let fingerprint = match known {
                Some(f) => f,
                None => model.fingerprint().map_err(|e| ApiError::internal(format!("fingerprinting the base model: {e}")))?,
            };
            let mut heads = Vec::new();
            // A head that could not answer (no labels, another width) is refused here, at
            // load, rather than failing the requests that use it.
            let width = model.model_info().hidden_size;
            let read_heads = |d: &std::path::Path, model: &Backbone, heads: &mut Vec<_>| -> Result<(), ApiError> {
                let broken = |e: String| ApiError {
                    status: StatusCode::BAD_GATEWAY,
                    message: format!("{}@{} has a classification head that cannot be served: {e}", manifest.name, manifest.version),
                };
                for head in adapters_models::saved_heads::load_all(d, model).map_err(|e| broken(e.to_string()))? {
                    if head.config.hidden_size != width {
                        return Err(broken(format!(
                            "head `{}` reads width {}, the base model's is {width}",
                            head.config.task, head.config.hidden_size
                        )));
                    }
                    heads.push(head);
                }
                Ok(())
            };
            match &manifest.contents.setup {
                Some(setup) => {
                    for (name, _) in &setup.adapters {
                        model.load_adapter_for(&dir.join(name), Some(name), &fingerprint).map_err(fits)?;
                        read_heads(&dir.join(name), &model, &mut heads)?;
                    }
                    let tree = Setup::load(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
                    model.adapters_mut().set_setup(Some(tree)).map_err(|e| fits(e.into()))?;
                }
                None => {
                    let name = model.load_adapter_for(&dir, Some(&manifest.name), &fingerprint).map_err(fits)?;
                    model.adapters_mut().activate(&[name.as_str()]).map_err(|e| fits(e.into()))?;
                    read_heads(&dir, &model, &mut heads)?;
                }
            }
            Ok::<_, ApiError>((Resident::new(manifest, model, heads), fingerprint))
        })
        .await
        .map_err(|e| ApiError::internal(format!("loading the adapter failed: {e}")))??;
        self.fingerprint.get_or_init(|| fingerprint);
        Ok(resident)
    }
}
