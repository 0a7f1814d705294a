//! TCP metrics with Istio's names and labels (SEMANTICS.md), counted per shard and summed at
//! scrape. Each shard keeps its own map from label set to counters behind its own mutex: the shard
//! takes it once when a connection opens (uncontended but for a scrape in progress), then counts
//! on the connection's own atomics, written by that shard alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use rustc_hash::FxBuildHasher;
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

/// One connection's labels, borrowed from the snapshot and the connection's plan; missing values
/// are `unknown`, as Istio writes them. Owned copies (`SeriesLabels`) are made only for a new
/// series: building ten Strings for every connection cost about 4,800 instructions (callgrind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpLabels<'a>(pub [&'a str; 10]);

/// Where the response flags are among the values.
const RESPONSE_FLAGS: usize = 8;

impl<'a> TcpLabels<'a> {
    /// The same labels for a connection that failed with `flag`.
    pub fn with_flag(mut self, flag: &'a str) -> Self {
        self.0[RESPONSE_FLAGS] = flag;
        self
    }
}

/// A series' labels as its shard keeps them. Hashes as the `TcpLabels` it was copied from (both
/// hash ten `str`s in order), so a connection's borrowed labels find it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesLabels(pub [Box<str>; 10]);

impl hashbrown::Equivalent<SeriesLabels> for TcpLabels<'_> {
    fn equivalent(&self, key: &SeriesLabels) -> bool {
        self.0.iter().zip(&key.0).all(|(a, b)| *a == &**b)
    }
}

impl From<TcpLabels<'_>> for SeriesLabels {
    fn from(labels: TcpLabels<'_>) -> Self {
        SeriesLabels(labels.0.map(Box::from))
    }
}

pub const UNKNOWN: &str = "unknown";

/// A workload's name for metrics: its `app` label (what a Deployment's pods share, so a
/// workload's many pods are one series), else its own name.
pub fn workload_name(w: &Workload) -> &str {
    use shoal_control::snapshot::LabelSource;
    w.labels
        .label("app.kubernetes.io/name")
        .or_else(|| w.labels.label("app"))
        .unwrap_or(&w.name)
}

pub struct TcpLabelsBuilder<'a> {
    pub reporter: &'static str,
    /// Workload, namespace, principal.
    pub source: Option<(&'a str, &'a str, &'a str)>,
    /// Workload, namespace.
    pub destination: Option<(&'a str, &'a str)>,
    pub destination_service: Option<&'a str>,
    pub destination_principal: Option<&'a str>,
    pub response_flags: &'static str,
    pub mtls: bool,
}

impl<'a> TcpLabelsBuilder<'a> {
    pub fn build(self) -> TcpLabels<'a> {
        let (sw, sn, sp) = self.source.unwrap_or((UNKNOWN, UNKNOWN, UNKNOWN));
        let (dw, dn) = self.destination.unwrap_or((UNKNOWN, UNKNOWN));
        TcpLabels([
            self.reporter,
            sw,
            sn,
            sp,
            dw,
            dn,
            self.destination_service.unwrap_or(UNKNOWN),
            self.destination_principal.unwrap_or(UNKNOWN),
            if self.response_flags.is_empty() {
                "-"
            } else {
                self.response_flags
            },
            if self.mtls { "mutual_tls" } else { UNKNOWN },
        ])
    }
}

/// One shard's series.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Fx-hashed: a connection's ten labels are hashed as it opens.
    series: Mutex<hashbrown::HashMap<SeriesLabels, Arc<TcpCounters>, FxBuildHasher>>,
}

impl ShardMetrics {
    /// The series of `labels`, made when it is new: the labels are copied only then.
    pub fn counters(&self, labels: &TcpLabels<'_>) -> Arc<TcpCounters> {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = series.get(labels) {
            return c.clone();
        }
        series
            .entry(SeriesLabels::from(*labels))
            .or_default()
            .clone()
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
    pub fn totals(&self) -> HashMap<SeriesLabels, [u64; 5]> {
        let mut totals: HashMap<SeriesLabels, [u64; 5]> = HashMap::new();
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
        let mut rows: Vec<(&SeriesLabels, &[u64; 5])> = totals.iter().collect();
        rows.sort_by(|a, b| a.0 .0.cmp(&b.0 .0));
        let rows: Vec<TcpRow> = rows
            .into_iter()
            .map(|(labels, values)| {
                let pairs = LABEL_NAMES
                    .iter()
                    .copied()
                    .zip(labels.0.iter().map(|v| &**v))
                    .collect();
                (pairs, *values)
            })
            .collect();
        encode_tcp(&mut encoder, &rows)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels<'a>(service: &'a str, flag: &'static str) -> TcpLabels<'a> {
        TcpLabelsBuilder {
            reporter: "source",
            source: Some(("sleep", "default", "cluster.local/ns/default/sa/sleep")),
            destination: Some(("echo", "default")),
            destination_service: Some(service),
            destination_principal: None,
            response_flags: flag,
            mtls: true,
        }
        .build()
    }

    /// A connection's borrowed labels find the series an earlier connection's made (they hash
    /// alike), and differ from it when any value differs.
    #[test]
    fn borrowed_labels_find_their_series() {
        let shard = ShardMetrics::default();
        let first = shard.counters(&labels("echo.default.svc.cluster.local", ""));
        // A value built anew, not the same pointer, as each connection's would be.
        let host = String::from("echo.default.svc.cluster.local");
        let again = shard.counters(&labels(&host, ""));
        assert!(Arc::ptr_eq(&first, &again));
        let failed = shard.counters(&labels(&host, "").with_flag("UF"));
        assert!(!Arc::ptr_eq(&first, &failed));
        let other = shard.counters(&labels("other.default.svc.cluster.local", ""));
        assert!(!Arc::ptr_eq(&first, &other));
        let series = shard.series.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(series.len(), 3);
        let key = SeriesLabels::from(labels(&host, "UF"));
        assert_eq!(&*key.0[RESPONSE_FLAGS], "UF");
        assert_eq!(&*key.0[9], "mutual_tls");
        assert_eq!(&*key.0[7], UNKNOWN);
        assert!(series.contains_key(&key));
        // Found from the borrowed labels alone, without an owned copy.
        assert!(series.get(&labels(&host, "UF")).is_some());
        assert!(series.get(&labels(&host, "DENY")).is_none());
    }
}
