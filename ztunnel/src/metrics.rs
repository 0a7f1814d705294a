//! TCP metrics with Istio's names and labels (SEMANTICS.md), counted per shard and summed at
//! scrape. Each shard keeps its own map from label set to counters behind its own mutex: the shard
//! takes it once when a connection opens (uncontended but for a scrape in progress), then counts
//! on the connection's own atomics, written by that shard alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use rustc_hash::FxHashMap;
use shoal_control::snapshot::Workload;
use shoal_runtime::counters::{encode_tcp, TcpRow};
pub use shoal_runtime::TcpCounters;

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

/// One shard's series.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Fx-hashed: a connection's ten labels are hashed as it opens.
    series: Mutex<FxHashMap<TcpLabels, Arc<TcpCounters>>>,
}

impl ShardMetrics {
    /// The series of `labels`, made when it is new: the labels are copied only then.
    pub fn counters(&self, labels: &TcpLabels) -> Arc<TcpCounters> {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = series.get(labels) {
            return c.clone();
        }
        series.entry(labels.clone()).or_default().clone()
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
                for (t, v) in t.iter_mut().zip(c.values()) {
                    *t += v;
                }
            }
        }
        totals
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.totals();
        let mut rows: Vec<(&TcpLabels, &[u64; 5])> = totals.iter().collect();
        rows.sort_by(|a, b| a.0 .0.cmp(&b.0 .0));
        let rows: Vec<TcpRow> = rows
            .into_iter()
            .map(|(labels, values)| {
                let pairs = LABEL_NAMES
                    .iter()
                    .copied()
                    .zip(labels.0.iter().map(String::as_str))
                    .collect();
                (pairs, *values)
            })
            .collect();
        encode_tcp(&mut encoder, &rows)?;
        Ok(())
    }
}
