//! HTTP metrics with Istio's names, labels and buckets (`reporter="waypoint"`), and Istio's TCP
//! metrics for ports carried as TCP, counted per shard and summed at scrape. A shard finds a
//! request's series in its own cache (no lock); only a label set it has not seen before takes the
//! shard's map lock (uncontended but for a scrape). Counters are written by their shard alone: a
//! load and a store, no locked instruction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use shoal_runtime::counters::{encode_tcp, TcpRow};
use shoal_runtime::TcpCounters;

/// Istio's HTTP label names, in the order `HttpLabels` holds their values.
pub const LABEL_NAMES: [&str; 14] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_principal",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
];

pub const UNKNOWN: &str = "unknown";

/// One request's labels; missing values are `unknown`, as Istio writes them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HttpLabels(pub [String; 14]);

/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's default buckets for `istio_request_bytes` and `istio_response_bytes`.
pub const SIZE_BUCKETS_BYTES: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

fn add(counter: &AtomicU64, n: u64) {
    // One writer per shard: a load and a store.
    counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

/// A histogram over fixed bounds; the last bucket is +Inf. `sum` is in the unit's thousandths
/// (microseconds for durations), so it stays an integer.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    buckets: [AtomicU64; N],
    sum_milli: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_milli: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[f64], value: f64) {
        let i = bounds.iter().position(|b| value <= *b).unwrap_or(N - 1);
        add(&self.buckets[i], 1);
        add(&self.sum_milli, (value * 1000.0) as u64);
        add(&self.count, 1);
    }

    fn add_into(&self, into: &mut ([u64; N], u64, u64)) {
        for (t, b) in into.0.iter_mut().zip(&self.buckets) {
            *t += b.load(Ordering::Relaxed);
        }
        into.1 += self.sum_milli.load(Ordering::Relaxed);
        into.2 += self.count.load(Ordering::Relaxed);
    }
}

/// One label set's series on one shard.
#[derive(Debug, Default)]
pub struct HttpSeries {
    pub requests: AtomicU64,
    pub duration: Histogram<20>,
    pub request_bytes: Histogram<11>,
    pub response_bytes: Histogram<11>,
}

impl HttpSeries {
    pub fn record(&self, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        add(&self.requests, 1);
        self.duration.observe(&DURATION_BUCKETS_MS, duration_ms);
        self.request_bytes
            .observe(&SIZE_BUCKETS_BYTES, request_bytes as f64);
        self.response_bytes
            .observe(&SIZE_BUCKETS_BYTES, response_bytes as f64);
    }
}

/// One shard's series.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    series: Mutex<HashMap<HttpLabels, Arc<HttpSeries>>>,
    tcp: Mutex<HashMap<HttpLabels, Arc<TcpCounters>>>,
}

impl ShardMetrics {
    /// The series for `labels` (made on first use). Shards cache what this returns.
    pub fn series(&self, labels: HttpLabels) -> Arc<HttpSeries> {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.entry(labels).or_default().clone()
    }

    /// The TCP series for `labels` (made on first use); taken once per connection.
    pub fn tcp_series(&self, labels: HttpLabels) -> Arc<TcpCounters> {
        let mut tcp = self.tcp.lock().unwrap_or_else(|p| p.into_inner());
        tcp.entry(labels).or_default().clone()
    }
}

/// Summed over shards: requests, then (buckets, sum, count) of each histogram.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub requests: u64,
    pub duration: ([u64; 20], u64, u64),
    pub request_bytes: ([u64; 11], u64, u64),
    pub response_bytes: ([u64; 11], u64, u64),
}

/// Every shard's series, summed at scrape.
#[derive(Debug, Clone)]
pub struct Metrics {
    shards: Arc<Vec<Arc<ShardMetrics>>>,
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

    pub fn totals(&self) -> Vec<(HttpLabels, Totals)> {
        let mut totals: HashMap<HttpLabels, Totals> = HashMap::new();
        for shard in self.shards.iter() {
            let series = shard.series.lock().unwrap_or_else(|p| p.into_inner());
            for (labels, s) in series.iter() {
                let t = totals.entry(labels.clone()).or_default();
                t.requests += s.requests.load(Ordering::Relaxed);
                s.duration.add_into(&mut t.duration);
                s.request_bytes.add_into(&mut t.request_bytes);
                s.response_bytes.add_into(&mut t.response_bytes);
            }
        }
        let mut rows: Vec<(HttpLabels, Totals)> = totals.into_iter().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    /// Summed over shards: `TcpCounters::values` per TCP label set.
    pub fn tcp_totals(&self) -> Vec<(HttpLabels, [u64; 5])> {
        let mut totals: HashMap<HttpLabels, [u64; 5]> = HashMap::new();
        for shard in self.shards.iter() {
            let tcp = shard.tcp.lock().unwrap_or_else(|p| p.into_inner());
            for (labels, s) in tcp.iter() {
                let t = totals.entry(labels.clone()).or_default();
                for (t, v) in t.iter_mut().zip(s.values()) {
                    *t += v;
                }
            }
        }
        let mut rows: Vec<(HttpLabels, [u64; 5])> = totals.into_iter().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }
}

/// Istio's TCP metrics carry the HTTP labels but the response code.
fn tcp_pairs(labels: &HttpLabels) -> Vec<(&str, &str)> {
    pairs(labels)
        .into_iter()
        .filter(|(name, _)| *name != "response_code")
        .collect()
}

fn pairs(labels: &HttpLabels) -> Vec<(&str, &str)> {
    LABEL_NAMES
        .iter()
        .copied()
        .zip(labels.0.iter().map(String::as_str))
        .collect()
}

/// Bucket bounds with +Inf appended, beside their (non-cumulative) counts.
fn buckets(bounds: &[f64], counts: &[u64]) -> Vec<(f64, u64)> {
    bounds
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(counts.iter().copied())
        .collect()
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.totals();
        {
            let mut family = encoder.encode_descriptor(
                "istio_requests",
                "Requests the waypoint handled.",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (labels, t) in &rows {
                ConstCounter::new(t.requests).encode(family.encode_family(&pairs(labels))?)?;
            }
        }
        type Pick = fn(&Totals) -> (&[u64], u64, u64);
        let histograms: [(&str, &str, &[f64], Pick); 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request duration, from the first byte received to the last byte sent.",
                &DURATION_BUCKETS_MS,
                |t| (&t.duration.0, t.duration.1, t.duration.2),
            ),
            (
                "istio_request_bytes",
                "Request body sizes.",
                &SIZE_BUCKETS_BYTES,
                |t| (&t.request_bytes.0, t.request_bytes.1, t.request_bytes.2),
            ),
            (
                "istio_response_bytes",
                "Response body sizes.",
                &SIZE_BUCKETS_BYTES,
                |t| (&t.response_bytes.0, t.response_bytes.1, t.response_bytes.2),
            ),
        ];
        for (name, help, bounds, pick) in histograms {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (labels, t) in &rows {
                let (counts, sum_milli, count) = pick(t);
                let with_inf = buckets(bounds, counts);
                family
                    .encode_family(&pairs(labels))?
                    .encode_histogram::<NoLabelSet>(
                        sum_milli as f64 / 1000.0,
                        count,
                        &with_inf,
                        None,
                    )?;
            }
        }
        let tcp = self.tcp_totals();
        let rows: Vec<TcpRow> = tcp.iter().map(|(l, v)| (tcp_pairs(l), *v)).collect();
        encode_tcp(&mut encoder, &rows)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(code: &str) -> HttpLabels {
        let mut l: [String; 14] = std::array::from_fn(|_| UNKNOWN.to_string());
        l[0] = "waypoint".into();
        l[11] = code.into();
        HttpLabels(l)
    }

    #[test]
    fn shards_sum_and_buckets_hold_what_was_observed() {
        let m = Metrics::new(2);
        m.shard(0).series(labels("200")).record(0.3, 0, 10);
        m.shard(1).series(labels("200")).record(7.0, 5, 2_000);
        m.shard(1).series(labels("503")).record(1.0, 0, 0);
        let rows = m.totals();
        assert_eq!(rows.len(), 2);
        let (_, ok) = &rows[0];
        assert_eq!(ok.requests, 2);
        assert_eq!(ok.duration.0[0], 1, "0.3 ms lands in le=0.5");
        assert_eq!(ok.duration.0[3], 1, "7 ms lands in le=10");
        assert_eq!(ok.duration.1, 7300, "sum in microseconds");
        assert_eq!(ok.response_bytes.0[4], 1, "2000 bytes in le=10000");
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(m));
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("istio_requests_total{reporter=\"waypoint\""),
            "{text}"
        );
        assert!(text.contains("response_code=\"503\""), "{text}");
        assert!(
            text.contains("istio_request_duration_milliseconds_bucket{")
                && text.contains("le=\"+Inf\""),
            "{text}"
        );
    }
}
