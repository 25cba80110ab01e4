//! What the batching and decoding loops work with, and nothing more: the base model and
//! its tokenizer, the compute slots, the batching limits, the KV-cache budget and the
//! metrics. The server's state holds one and lends the loops a weak handle, so the loops
//! never see requests, the store, the cache or the admin side, and they end when the
//! state is dropped.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::target::Target;
use adapters_models::{Backbone, TextTokenizer};
use std::sync::Arc;
use std::time::Duration;

/// How requests are batched.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// Most generations in one decoding step (continuous batching). 0 turns batching off
    /// for every endpoint: each request alone (a generation on a compute slot of its own).
    pub max_rows: usize,
    /// Most tokens of embedding and classification requests in one batch (TEI's
    /// `--max-batch-tokens`; a request with more runs alone). The batch runs sorted by
    /// length in forwards of at most this many padded tokens, so a tweet is never padded
    /// to an article's length.
    pub max_batch_tokens: usize,
    /// Most prompt tokens of joining generations in one decoding step (chunked prefill):
    /// bounds how much a step, and so the time between the running generations' tokens,
    /// grows when prompts join; a longer prompt takes several steps.
    pub prefill_chunk: usize,
    /// How long the first request of a batch waits for more once a compute slot is free.
    pub max_wait: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_rows: 32,
            max_batch_tokens: adapters_models::MAX_BATCH_TOKENS,
            prefill_chunk: 128,
            max_wait: Duration::from_millis(2),
        }
    }
}

/// The base model and what runs it.
pub(crate) struct Engine {
    base: Backbone,
    tokenizer: TextTokenizer,
    compute: Arc<tokio::sync::Semaphore>,
    batching: Batching,
    kv_budget: usize,
    /// The server's metrics (shared with its state).
    pub metrics: Arc<Metrics>,
}

impl Engine {
    /// An engine for `base` running at most `max_concurrent` forwards at once.
    pub fn new(
        base: Backbone,
        tokenizer: TextTokenizer,
        max_concurrent: usize,
        batching: Batching,
        kv_budget: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let compute = Arc::new(tokio::sync::Semaphore::new(max_concurrent.max(1)));
        Engine { base, tokenizer, compute, batching, kv_budget, metrics }
    }

    /// The network a target runs on.
    pub fn model_of<'a>(&'a self, target: &'a Target) -> &'a Backbone {
        match target {
            Target::Base => &self.base,
            Target::Adapter(r) => &r.model,
        }
    }

    /// The base model's tokenizer (adapters share it).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// How requests are batched.
    pub fn batching(&self) -> Batching {
        self.batching
    }

    /// KV-cache tokens running generations may hold together.
    pub fn kv_budget(&self) -> usize {
        self.kv_budget
    }

    /// A compute slot: at most `max_concurrent` forwards run at once.
    pub async fn compute_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.compute.clone().acquire_owned().await.map_err(|_| ApiError::internal("the server is shutting down"))
    }
}
