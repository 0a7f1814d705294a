//! Per-shard counters. Each shard owns its `ShardStats` and is the only writer, so an increment is a
//! plain load and store (no locked read-modify-write, no cache line bouncing between cores). Readers
//! on other threads (the admin server) load the values and sum them on demand.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use crate::buffer::Tier;
use crate::copy::Mirrored;

/// A monotonically increasing count written by exactly one thread.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: load + store is exact and avoids a `lock`-prefixed instruction.
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down, written by exactly one thread.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Counters of one buffer tier on one shard.
#[derive(Debug, Default)]
pub struct TierStats {
    pub in_use: Gauge,
    pub high_water: Gauge,
    /// Times a buffer was wanted while the tier was at its cap.
    pub exhausted: Counter,
    /// Buffers ever allocated from the heap; flat once the pool is warm.
    pub allocated: Counter,
}

/// Everything the runtime counts on one shard. Aligned to two cache lines so two shards' counters
/// never share one (adjacent-line prefetch pulls pairs of 64-byte lines on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardStats {
    pub connections_accepted: Counter,
    pub connections_active: Gauge,
    pub accept_errors: Counter,
    /// Connection tasks that panicked (a bug); the shard survived them.
    pub task_panics: Counter,
    /// The snapshot version this shard derives its state from.
    pub config_version: Gauge,
    pub small_buffers: TierStats,
    pub large_buffers: TierStats,
}

impl ShardStats {
    pub fn tier(&self, tier: Tier) -> &TierStats {
        match tier {
            Tier::Small => &self.small_buffers,
            Tier::Large => &self.large_buffers,
        }
    }
}

/// Every shard's stats, for readers off the shards.
#[derive(Clone, Debug, Default)]
pub struct StatsSet(Arc<[Arc<ShardStats>]>);

impl StatsSet {
    pub fn new(shards: Vec<Arc<ShardStats>>) -> Self {
        StatsSet(shards.into())
    }

    pub fn shards(&self) -> &[Arc<ShardStats>] {
        &self.0
    }

    /// Sums one counter over all shards.
    pub fn sum(&self, f: impl Fn(&ShardStats) -> u64) -> u64 {
        self.0.iter().map(|s| f(s)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_across_shards() {
        let a = Arc::new(ShardStats::default());
        let b = Arc::new(ShardStats::default());
        a.connections_accepted.add(3);
        b.connections_accepted.inc();
        b.connections_active.set(7);
        let set = StatsSet::new(vec![a.clone(), b.clone()]);
        assert_eq!(set.sum(|s| s.connections_accepted.get()), 4);
        assert_eq!(set.sum(|s| s.connections_active.get()), 7);
        assert_eq!(std::mem::align_of::<ShardStats>(), 128);
    }
}

/// One label set's TCP connections on one shard, as Istio's `istio_tcp_*` metrics count them (a
/// ztunnel's connections, a waypoint's TCP ports). Bytes are added as they move (`tallies`), so a
/// long-lived connection's traffic shows while it is open, as Istio's ztunnel counts it.
#[derive(Debug, Default)]
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    pub failed: Counter,
    /// Client → server.
    pub sent_bytes: Counter,
    /// Server → client.
    pub received_bytes: Counter,
}

impl TcpCounters {
    pub fn opened(&self) {
        self.opened.inc();
    }

    pub fn closed(&self) {
        self.closed.inc();
    }

    pub fn failed(&self) {
        self.failed.inc();
    }

    /// One connection's (sent, received) counts, each mirrored into these counters as it grows.
    pub fn tallies(&self) -> (Mirrored<'_>, Mirrored<'_>) {
        (
            Mirrored::new(&self.sent_bytes),
            Mirrored::new(&self.received_bytes),
        )
    }

    /// In `TCP_FAMILIES`' order.
    pub fn values(&self) -> [u64; 5] {
        [
            self.opened.get(),
            self.closed.get(),
            self.failed.get(),
            self.sent_bytes.get(),
            self.received_bytes.get(),
        ]
    }
}

/// Istio's TCP metric families (name, help), in the order of `TcpCounters::values`.
pub const TCP_FAMILIES: [(&str, &str); 5] = [
    ("istio_tcp_connections_opened", "TCP connections opened."),
    ("istio_tcp_connections_closed", "TCP connections closed."),
    (
        "istio_tcp_connections_failed",
        "TCP connections that failed (refused, denied, upstream unreachable).",
    ),
    (
        "istio_tcp_sent_bytes",
        "Bytes sent toward the destination (client to server).",
    ),
    (
        "istio_tcp_received_bytes",
        "Bytes received from the destination (server to client).",
    ),
];

/// One row of TCP metrics: a label set's (name, value) pairs and its `TcpCounters::values`
/// summed over shards.
pub type TcpRow<'a> = (Vec<(&'a str, &'a str)>, [u64; 5]);

/// Writes `rows` as Istio's TCP families.
pub fn encode_tcp(encoder: &mut DescriptorEncoder, rows: &[TcpRow<'_>]) -> std::fmt::Result {
    for (i, (name, help)) in TCP_FAMILIES.iter().enumerate() {
        let mut family =
            encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
        for (labels, values) in rows {
            ConstCounter::new(values[i]).encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}
