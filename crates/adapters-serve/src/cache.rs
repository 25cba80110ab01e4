//! Resident adapters: an immutable snapshot (name@version -> the base model with that
//! adapter attached) that requests read without locks and publishers replace whole,
//! bounded by count and bytes with least-recently-used eviction. Pinned adapters are never
//! evicted; an adapter a request holds is never freed under it (the request keeps its
//! `Arc`), and eviction takes adapters no request is using first.

use adapters_models::saved_heads::SavedHead;
use adapters_models::Backbone;
use adapters_store::Manifest;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One adapter version ready to serve.
pub struct Resident {
    /// Its manifest in the store.
    pub manifest: Manifest,
    /// The base model with this adapter (or setup) attached and active; its weights are
    /// the base's, shared.
    pub model: Backbone,
    /// Classification heads saved with it.
    pub heads: Vec<SavedHead>,
    /// Never evicted while set.
    pub pinned: AtomicBool,
    last_used: AtomicU64,
}

impl Resident {
    /// A resident adapter, not yet used.
    pub fn new(manifest: Manifest, model: Backbone, heads: Vec<SavedHead>) -> Self {
        Resident { manifest, model, heads, pinned: AtomicBool::new(false), last_used: AtomicU64::new(0) }
    }

    /// `name@version`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }

    /// Bytes it accounts for (its files in the store).
    pub fn bytes(&self) -> u64 {
        self.manifest.size_bytes
    }
}

/// Limits of the cache.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most resident adapters.
    pub max_adapters: usize,
    /// Most resident bytes.
    pub max_bytes: u64,
}

type Snapshot = HashMap<String, Arc<Resident>>;

/// What a publish did.
#[derive(Debug, Default)]
pub struct Published {
    /// Keys evicted to make room.
    pub evicted: Vec<String>,
    /// How long replacing the snapshot took (the only moment a reader could notice).
    pub swap: Duration,
}

/// The resident adapters.
pub struct AdapterCache {
    snapshot: ArcSwap<Snapshot>,
    /// Serialises publishers; readers never take it.
    publishing: std::sync::Mutex<()>,
    /// One lock per key being loaded, so concurrent first requests load it once.
    loading: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    limits: Limits,
    clock: AtomicU64,
}

/// Why an adapter could not be made resident.
#[derive(Debug, thiserror::Error)]
pub enum CacheError<E> {
    /// Loading failed.
    #[error(transparent)]
    Load(E),
    /// Every resident adapter is pinned and there is no room.
    #[error("no room for {key}: {resident} adapters ({bytes} bytes) are resident and every one is pinned; unpin one or raise --max-adapters / --max-adapter-bytes")]
    Full {
        /// The adapter that did not fit.
        key: String,
        /// Resident count.
        resident: usize,
        /// Resident bytes.
        bytes: u64,
    },
}

impl AdapterCache {
    /// An empty cache.
    pub fn new(limits: Limits) -> Self {
        AdapterCache {
            snapshot: ArcSwap::from_pointee(HashMap::new()),
            publishing: std::sync::Mutex::new(()),
            loading: tokio::sync::Mutex::new(HashMap::new()),
            limits,
            clock: AtomicU64::new(1),
        }
    }

    /// The resident adapter `key`, marked as just used.
    pub fn get(&self, key: &str) -> Option<Arc<Resident>> {
        let found = self.snapshot.load().get(key).cloned()?;
        found.last_used.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Some(found)
    }

    /// Every resident adapter.
    pub fn residents(&self) -> Vec<Arc<Resident>> {
        self.snapshot.load().values().cloned().collect()
    }

    /// The resident adapter `key`, loading it with `load` if it is not resident. Concurrent
    /// callers for one key wait for a single load. Returns whether it was already resident.
    pub async fn get_or_load<E, F, Fut>(&self, key: &str, load: F) -> Result<(Arc<Resident>, bool, Published), CacheError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Resident, E>>,
    {
        if let Some(r) = self.get(key) {
            return Ok((r, true, Published::default()));
        }
        let key_lock = self.loading.lock().await.entry(key.to_string()).or_default().clone();
        let _loading = key_lock.lock().await;
        if let Some(r) = self.get(key) {
            return Ok((r, true, Published::default()));
        }
        let result = load().await.map_err(CacheError::Load);
        self.loading.lock().await.remove(key);
        let resident = Arc::new(result?);
        resident.last_used.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        let published = self.insert(resident.clone())?;
        Ok((resident, false, published))
    }

    /// Publishes `resident`, evicting unpinned adapters until the limits hold: those no
    /// request is using first, least recently used first. One in use may go too (when more
    /// adapters are in use than the cache holds): requests holding it finish on it, and its
    /// memory is freed when the last of them ends.
    fn insert<E>(&self, resident: Arc<Resident>) -> Result<Published, CacheError<E>> {
        let _one_publisher = self.publishing.lock().expect("publish lock poisoned");
        let mut next: Snapshot = (**self.snapshot.load()).clone();
        let mut evicted = Vec::new();
        let over = |m: &Snapshot| {
            m.len() + 1 > self.limits.max_adapters || m.values().map(|r| r.bytes()).sum::<u64>() + resident.bytes() > self.limits.max_bytes
        };
        while over(&next) {
            // In use: held by a request besides this map and the published snapshot.
            let victim = next
                .iter()
                .filter(|(_, r)| !r.pinned.load(Ordering::Relaxed))
                .min_by_key(|(_, r)| (Arc::strong_count(r) > 2, r.last_used.load(Ordering::Relaxed)))
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    next.remove(&k);
                    evicted.push(k);
                }
                None => {
                    return Err(CacheError::Full {
                        key: resident.key(),
                        resident: next.len(),
                        bytes: next.values().map(|r| r.bytes()).sum(),
                    })
                }
            }
        }
        next.insert(resident.key(), resident);
        Ok(Published { evicted, swap: self.swap(next) })
    }

    fn swap(&self, next: Snapshot) -> Duration {
        let t = Instant::now();
        self.snapshot.store(Arc::new(next));
        t.elapsed()
    }

    /// Drops `key` from the cache (requests holding it finish on it). Whether it was resident.
    pub fn unload(&self, key: &str) -> (bool, Duration) {
        let _one_publisher = self.publishing.lock().expect("publish lock poisoned");
        let mut next: Snapshot = (**self.snapshot.load()).clone();
        let was = next.remove(key).is_some();
        (was, self.swap(next))
    }
}
