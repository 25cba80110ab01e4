//! Prometheus metrics with per-adapter labels (adapter, version), served at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Adapter name (`base` for the bare model).
    pub adapter: String,
    /// Adapter version (empty for the base model).
    pub version: String,
    /// `embeddings`, `classify`, ...
    pub endpoint: String,
    /// HTTP status.
    pub status: String,
}

/// An adapter version's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterLabels {
    /// Adapter name (`base` for the bare model).
    pub adapter: String,
    /// Adapter version.
    pub version: String,
}

/// Why a request was refused or its work dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    /// `requests`, `waiting_tokens`, `timeout`, `disconnected`, ...
    pub cause: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn swap_latency() -> Histogram {
    Histogram::new(exponential_buckets(1e-7, 4.0, 12))
}

/// Every metric the server reports.
pub struct Metrics {
    registry: Registry,
    /// Requests by adapter, version, endpoint and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from arrival to response.
    pub latency: Histograms<RequestLabels>,
    /// Seconds a request waited for a compute slot.
    pub queue: Histograms<AdapterLabels>,
    /// Rows (texts) processed.
    pub rows: Family<AdapterLabels, Counter>,
    /// Tokens processed.
    pub tokens: Family<AdapterLabels, Counter>,
    /// Requests that found their adapter resident.
    pub cache_hits: Family<AdapterLabels, Counter>,
    /// Requests that had to load their adapter.
    pub cache_misses: Family<AdapterLabels, Counter>,
    /// Adapters evicted to make room.
    pub evictions: Family<AdapterLabels, Counter>,
    /// Seconds to fetch and attach an adapter.
    pub load_seconds: Histograms<AdapterLabels>,
    /// Resident adapters.
    pub resident: Gauge,
    /// Bytes of resident adapters.
    pub resident_bytes: Gauge,
    /// Seconds to publish a new snapshot of the resident adapters.
    pub swap_seconds: Histogram,
    /// Rows (texts) per forward pass.
    pub batch_rows: Histogram,
    /// Different models (adapters, or the base) per forward pass.
    pub batch_models: Histogram,
    /// Requests refused with 503 because a bound was reached, by bound.
    pub refused: Family<CauseLabels, Counter>,
    /// Work dropped before it was computed, by cause (`timeout`, `disconnected`).
    pub dropped: Family<CauseLabels, Counter>,
    /// Requests in flight.
    pub in_flight: Gauge,
    /// Tokens of embedding and classification requests waiting for a forward pass.
    pub waiting_tokens: Gauge,
    /// KV-cache tokens held by running generations (prompt + `max_tokens` each).
    pub kv_tokens: Gauge,
    /// Batches or decoding steps that failed as a whole (an error or a panic) and were
    /// run again request by request.
    pub isolated_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("adapters");
        let m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency),
            queue: Family::new_with_constructor(latency),
            rows: Family::default(),
            tokens: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            evictions: Family::default(),
            load_seconds: Family::new_with_constructor(latency),
            resident: Gauge::default(),
            resident_bytes: Gauge::default(),
            swap_seconds: swap_latency(),
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            batch_models: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            refused: Family::default(),
            dropped: Family::default(),
            in_flight: Gauge::default(),
            waiting_tokens: Gauge::default(),
            kv_tokens: Gauge::default(),
            isolated_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by adapter, version, endpoint and status", m.requests.clone());
        registry.register("request_seconds", "Request latency", m.latency.clone());
        registry.register("queue_seconds", "Time waiting for a compute slot", m.queue.clone());
        registry.register("rows", "Rows (texts) processed", m.rows.clone());
        registry.register("tokens", "Tokens processed", m.tokens.clone());
        registry.register("cache_hits", "Requests whose adapter was resident", m.cache_hits.clone());
        registry.register("cache_misses", "Requests that loaded their adapter", m.cache_misses.clone());
        registry.register("cache_evictions", "Adapters evicted to make room", m.evictions.clone());
        registry.register("adapter_load_seconds", "Time to fetch and attach an adapter", m.load_seconds.clone());
        registry.register("resident_adapters", "Resident adapters", m.resident.clone());
        registry.register("resident_adapter_bytes", "Bytes of resident adapters", m.resident_bytes.clone());
        registry.register("snapshot_swap_seconds", "Time to publish a new snapshot of the resident adapters", m.swap_seconds.clone());
        registry.register("batch_rows", "Rows (texts) per forward pass", m.batch_rows.clone());
        registry.register("batch_models", "Different adapters (or the base) per forward pass", m.batch_models.clone());
        registry.register("refused", "Requests refused with 503 at a bound, by bound", m.refused.clone());
        registry.register("dropped", "Work dropped before it was computed, by cause", m.dropped.clone());
        registry.register("requests_in_flight", "Requests in flight", m.in_flight.clone());
        registry.register("waiting_tokens", "Tokens waiting for a forward pass", m.waiting_tokens.clone());
        registry.register("kv_tokens", "KV-cache tokens held by running generations", m.kv_tokens.clone());
        registry.register(
            "isolated_failures",
            "Batches or decoding steps that failed whole and were rerun request by request",
            m.isolated_failures.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl Metrics {
    /// Counts and times a finished request.
    pub(crate) fn record_request(
        &self,
        labels: &AdapterLabels,
        endpoint: &str,
        status: axum::http::StatusCode,
        started: std::time::Instant,
    ) {
        let l = RequestLabels {
            adapter: labels.adapter.clone(),
            version: labels.version.clone(),
            endpoint: endpoint.into(),
            status: status.as_u16().to_string(),
        };
        self.requests.get_or_create(&l).inc();
        self.latency.get_or_create(&l).observe(started.elapsed().as_secs_f64());
    }
}
