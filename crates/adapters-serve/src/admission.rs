//! Admission control: the server takes on only the work it can finish, so overload shows
//! as an immediate 503 with `Retry-After` rather than as client time-outs. Three bounds, as
//! TEI and vLLM operators know them: requests in flight (`--max-concurrent-requests`),
//! tokens waiting for compute (`--max-waiting-tokens`: the texts of embedding and
//! classification requests until their forward pass starts, and prompt plus `max_tokens` of
//! generations until they join the decoding batch), and the KV cache of running
//! generations (`--max-kv-tokens`, prompt plus `max_tokens` of each, checked by the decoding
//! loop as generations join).
//! Every request also has a deadline (`--request-timeout`): work still waiting at its
//! deadline, or whose client has gone, is dropped before it is computed.

use crate::error::ApiError;
use crate::metrics::Metrics;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The bounds. [`Limits::default`] suits a 2-core machine serving MiniLM or SmolLM2; the
/// KV budget's default is sized from the model and the machine's memory at start
/// ([`kv_tokens_for_memory`]).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests in flight (waiting or running, any endpoint); more get 503.
    pub max_requests: usize,
    /// Tokens waiting for compute (texts of embedding and classification requests before
    /// their forward pass, prompt + `max_tokens` of generations before they join the
    /// decoding batch); a request that would pass it gets 503, one larger than it on its
    /// own 413.
    pub max_waiting_tokens: usize,
    /// KV-cache tokens (prompt + `max_tokens`) of running generations; `None` sizes it
    /// from the model and the machine's memory.
    pub max_kv_tokens: Option<usize>,
    /// How long a request may take before it is answered 503 (a generation that streams:
    /// until its first token).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_requests: 512, max_waiting_tokens: 131_072, max_kv_tokens: None, request_timeout: Duration::from_secs(30) }
    }
}

/// The share of the machine's available memory that the KV budget may take by default.
pub const KV_MEMORY_SHARE: f64 = 0.25;

/// KV tokens that fit in [`KV_MEMORY_SHARE`] of the memory available now (`MemAvailable`
/// of /proc/meminfo; 4 GiB where that cannot be read), at `bytes_per_token`.
pub fn kv_tokens_for_memory(bytes_per_token: usize) -> usize {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:").map(|v| v.trim().trim_end_matches("kB").trim().to_string())))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(4u64 << 30, |kb| kb * 1024);
    ((available as f64 * KV_MEMORY_SHARE) / bytes_per_token.max(1) as f64) as usize
}

/// The counters behind the bounds.
pub(crate) struct Admission {
    limits: Limits,
    requests: AtomicUsize,
    waiting_tokens: AtomicUsize,
    /// The gauges that show the two counters.
    in_flight: Gauge,
    waiting: Gauge,
}

/// One request in flight; dropping it frees its place.
pub(crate) struct Ticket(Arc<Admission>);

/// Tokens waiting for a forward pass; dropping it (when the pass starts, or the work is
/// dropped) frees them.
pub(crate) struct Waiting(Arc<Admission>, usize);

impl Admission {
    pub fn new(limits: Limits, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            requests: AtomicUsize::new(0),
            waiting_tokens: AtomicUsize::new(0),
            in_flight: metrics.in_flight.clone(),
            waiting: metrics.waiting_tokens.clone(),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A place for one more request, or 503 when `max_requests` are in flight.
    pub fn admit(self: &Arc<Self>, metrics: &Metrics) -> Result<Ticket, ApiError> {
        let n = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.limits.max_requests {
            self.requests.fetch_sub(1, Ordering::AcqRel);
            return Err(refuse(
                metrics,
                "requests",
                format!("{} requests are in flight (--max-concurrent-requests)", self.limits.max_requests),
            ));
        }
        self.in_flight.set(n as i64);
        Ok(Ticket(self.clone()))
    }

    /// Room for `tokens` more waiting tokens: 413 for a request larger than the whole
    /// budget, 503 while others fill it.
    pub fn wait(self: &Arc<Self>, tokens: usize, metrics: &Metrics) -> Result<Waiting, ApiError> {
        let max = self.limits.max_waiting_tokens;
        if tokens > max {
            return Err(ApiError {
                status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("the request needs {tokens} tokens, more than the server's --max-waiting-tokens {max}; send fewer or shorter texts, or ask for fewer new tokens"),
            });
        }
        let total = self.waiting_tokens.fetch_add(tokens, Ordering::AcqRel) + tokens;
        if total > max {
            self.waiting_tokens.fetch_sub(tokens, Ordering::AcqRel);
            return Err(refuse(metrics, "waiting_tokens", format!("{max} tokens are already waiting (--max-waiting-tokens)")));
        }
        self.waiting.set(total as i64);
        Ok(Waiting(self.clone(), tokens))
    }
}

/// A 503 for overload, counted by cause.
pub(crate) fn refuse(metrics: &Metrics, cause: &str, why: String) -> ApiError {
    metrics.refused.get_or_create(&crate::metrics::CauseLabels { cause: cause.into() }).inc();
    ApiError::busy(format!("the server is at capacity: {why}; retry shortly"))
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let left = self.0.requests.fetch_sub(1, Ordering::AcqRel) - 1;
        self.0.in_flight.set(left as i64);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let left = self.0.waiting_tokens.fetch_sub(self.1, Ordering::AcqRel) - self.1;
        self.0.waiting.set(left as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_refuse_past_their_limit_and_free_on_drop() {
        let metrics = Metrics::default();
        let a = Admission::new(Limits { max_requests: 2, max_waiting_tokens: 100, ..Default::default() }, &metrics);
        let (t1, t2) = (a.admit(&metrics).unwrap(), a.admit(&metrics).unwrap());
        let e = a.admit(&metrics).err().unwrap();
        assert_eq!(e.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.contains("--max-concurrent-requests"), "{}", e.message);
        drop(t1);
        let _t3 = a.admit(&metrics).unwrap();
        drop(t2);
        let w = a.wait(60, &metrics).unwrap();
        assert_eq!(a.wait(41, &metrics).err().unwrap().status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.wait(101, &metrics).err().unwrap().status, axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        let _w2 = a.wait(40, &metrics).unwrap();
        drop(w);
        let _w3 = a.wait(60, &metrics).unwrap();
        assert!(metrics.encode().contains(r#"adapters_refused_total{cause="requests"} 1"#), "{}", metrics.encode());
        assert!(metrics.encode().contains("adapters_waiting_tokens 100"), "{}", metrics.encode());
    }

    #[test]
    fn the_kv_budget_follows_the_memory_available() {
        let small = kv_tokens_for_memory(1 << 20);
        let large = kv_tokens_for_memory(1 << 10);
        assert!(small > 0 && large > small * 1000, "{small} {large}");
    }
}
