//! Local rate limits (`HTTPLocalRateLimitPolicy`) for the whole node: each limit is one GCRA
//! bucket — a single timestamp in an atomic — shared by the shards, so the rate holds however
//! connections spread over them. A limited service costs one compare-and-swap per bucket per
//! request; services without a limit cost nothing. Buckets are found through a node-wide map
//! (locked only the first time a shard meets a bucket) and kept in the shard's own cache.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use shoal_control::traffic::{gcra, RateLimit};

/// Buckets kept by a shard before its cache is cleared (identities churn; buckets stay in the
/// node-wide map, so clearing only costs a lock the next time).
const SHARD_CACHE_MAX_BUCKETS: usize = 4096;
/// Buckets the node keeps before it forgets idle ones.
const NODE_MAX_BUCKETS: usize = 65_536;

/// The node's buckets, by `policy` and, for per-identity ones, the principal.
#[derive(Default)]
pub struct RateLimiters {
    buckets: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// A shard's handle on the node's buckets.
pub struct ShardLimiter {
    node: Arc<RateLimiters>,
    cache: RefCell<HashMap<String, Arc<AtomicU64>>>,
}

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Offset by a second so a fresh bucket (TAT 0) starts with its full burst.
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1_000_000_000
}

impl ShardLimiter {
    pub fn new(node: Arc<RateLimiters>) -> Self {
        ShardLimiter {
            node,
            cache: RefCell::new(HashMap::new()),
        }
    }

    /// May a request from `principal` pass `limit`? Its identity's bucket is checked first, so
    /// a client over its own rate does not use up the total.
    pub fn admit(&self, limit: &RateLimit, principal: &str) -> bool {
        let now = now_ns();
        if let Some(rate) = limit.identity_rate(principal) {
            let key = format!("{}\n{principal}", limit.policy);
            if !self.take(&key, now, rate) {
                return false;
            }
        }
        match limit.total_per_s {
            Some(rate) => self.take(&limit.policy, now, rate),
            None => true,
        }
    }

    fn take(&self, key: &str, now: u64, rate: u32) -> bool {
        let bucket = self.bucket(key);
        let mut tat = bucket.load(Ordering::Acquire);
        loop {
            let Some(next) = gcra(tat, now, rate) else {
                return false;
            };
            match bucket.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }

    fn bucket(&self, key: &str) -> Arc<AtomicU64> {
        if let Some(b) = self.cache.borrow().get(key) {
            return b.clone();
        }
        let b = {
            let mut node = self.node.buckets.lock().unwrap_or_else(|p| p.into_inner());
            if node.len() >= NODE_MAX_BUCKETS {
                // Forget buckets whose time has passed: they would admit a full burst anyway.
                let now = now_ns();
                node.retain(|_, b| Arc::strong_count(b) > 1 || b.load(Ordering::Relaxed) > now);
            }
            node.entry(key.to_string()).or_default().clone()
        };
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= SHARD_CACHE_MAX_BUCKETS {
            cache.clear();
        }
        cache.insert(key.to_string(), b.clone());
        b
    }
}
