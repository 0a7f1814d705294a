//! TCP metrics with Istio's names and labels (SEMANTICS.md), counted per shard and summed at
//! scrape. Each shard keeps its own map from label set to counters behind its own mutex: the shard
//! takes it once when a connection opens (uncontended but for a scrape in progress), then counts
//! on the connection's own atomics, written by that shard alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use shoal_control::snapshot::Workload;
use shoal_runtime::Mirrored;

/// Istio's TCP label names, in the order `TcpLabels` holds their values.
pub const LABEL_NAMES: [&str; 10] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_principal",
    "response_flags",
    "connection_security_policy",
];

/// One connection's labels; missing values are `unknown`, as Istio writes them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpLabels(pub [String; 10]);

pub const UNKNOWN: &str = "unknown";

/// A workload's name for metrics: its `app` label (what a Deployment's pods share, so a
/// workload's many pods are one series), else its own name.
pub fn workload_name(w: &Workload) -> String {
    use shoal_control::snapshot::LabelSource;
    w.labels
        .label("app.kubernetes.io/name")
        .or_else(|| w.labels.label("app"))
        .map(str::to_string)
        .unwrap_or_else(|| w.name.clone())
}

pub struct TcpLabelsBuilder {
    pub reporter: &'static str,
    pub source: Option<(String, String, String)>,
    pub destination: Option<(String, String)>,
    pub destination_service: Option<String>,
    pub destination_principal: Option<String>,
    pub response_flags: &'static str,
    pub mtls: bool,
}

impl TcpLabelsBuilder {
    pub fn build(self) -> TcpLabels {
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| UNKNOWN.to_string());
        let (sw, sn, sp) = match self.source {
            Some((w, n, p)) => (w, n, p),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        let (dw, dn) = match self.destination {
            Some((w, n)) => (w, n),
            None => (UNKNOWN.into(), UNKNOWN.into()),
        };
        TcpLabels([
            self.reporter.to_string(),
            sw,
            sn,
            sp,
            dw,
            dn,
            or_unknown(self.destination_service),
            or_unknown(self.destination_principal),
            if self.response_flags.is_empty() {
                "-".to_string()
            } else {
                self.response_flags.to_string()
            },
            if self.mtls {
                "mutual_tls".to_string()
            } else {
                UNKNOWN.to_string()
            },
        ])
    }
}

/// Counters of one label set on one shard (written by that shard only).
#[derive(Debug, Default)]
pub struct TcpCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub failed: AtomicU64,
    /// Added to while the bytes move (`tallies`), so a long-lived connection's traffic shows
    /// before it closes, as Istio's ztunnel counts it.
    pub sent_bytes: AtomicU64,
    pub received_bytes: AtomicU64,
}

impl TcpCounters {
    fn add(counter: &AtomicU64, n: u64) {
        // One writer: a load and a store, no locked instruction.
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    pub fn opened(&self) {
        Self::add(&self.opened, 1);
    }

    pub fn closed(&self) {
        Self::add(&self.closed, 1);
    }

    /// One connection's (sent, received) counts, each mirrored into these counters as it grows.
    pub fn tallies(&self) -> (Mirrored<'_>, Mirrored<'_>) {
        (
            Mirrored::new(&self.sent_bytes),
            Mirrored::new(&self.received_bytes),
        )
    }

    pub fn failed(&self) {
        Self::add(&self.failed, 1);
    }
}

/// One shard's series.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    series: Mutex<HashMap<TcpLabels, Arc<TcpCounters>>>,
}

impl ShardMetrics {
    pub fn counters(&self, labels: TcpLabels) -> Arc<TcpCounters> {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.entry(labels).or_default().clone()
    }
}

/// Every shard's series, summed at scrape.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub shards: Arc<Vec<Arc<ShardMetrics>>>,
}

impl Metrics {
    pub fn new(shards: usize) -> Self {
        Metrics {
            shards: Arc::new(
                (0..shards.max(1))
                    .map(|_| Arc::new(ShardMetrics::default()))
                    .collect(),
            ),
        }
    }

    pub fn shard(&self, index: usize) -> Arc<ShardMetrics> {
        self.shards[index % self.shards.len()].clone()
    }

    /// Summed values per label set: (opened, closed, failed, sent, received).
    pub fn totals(&self) -> HashMap<TcpLabels, [u64; 5]> {
        let mut totals: HashMap<TcpLabels, [u64; 5]> = HashMap::new();
        for shard in self.shards.iter() {
            let series = shard.series.lock().unwrap_or_else(|p| p.into_inner());
            for (labels, c) in series.iter() {
                let t = totals.entry(labels.clone()).or_default();
                t[0] += c.opened.load(Ordering::Relaxed);
                t[1] += c.closed.load(Ordering::Relaxed);
                t[2] += c.failed.load(Ordering::Relaxed);
                t[3] += c.sent_bytes.load(Ordering::Relaxed);
                t[4] += c.received_bytes.load(Ordering::Relaxed);
            }
        }
        totals
    }
}

const FAMILIES: [(&str, &str); 5] = [
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

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.totals();
        let mut rows: Vec<(&TcpLabels, &[u64; 5])> = totals.iter().collect();
        rows.sort_by(|a, b| a.0 .0.cmp(&b.0 .0));
        for (i, (name, help)) in FAMILIES.iter().enumerate() {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (labels, values) in &rows {
                let pairs: Vec<(&str, &str)> = LABEL_NAMES
                    .iter()
                    .copied()
                    .zip(labels.0.iter().map(String::as_str))
                    .collect();
                ConstCounter::new(values[i]).encode(family.encode_family(&pairs)?)?;
            }
        }
        Ok(())
    }
}
