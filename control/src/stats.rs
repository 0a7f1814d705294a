//! What a user reads off a running waypoint: requests per second, P99 latency and success rate per
//! service, from two scrapes of its Istio metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`) taken an interval apart.

use std::collections::BTreeMap;

use prometheus_parse::{Scrape, Value};
use serde::Serialize;

/// One scrape's totals per destination service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub requests: f64,
    /// Answered 5xx (the waypoint's own 503s and 504s included).
    pub server_errors: f64,
    /// Cumulative duration buckets: (upper bound in ms, requests at or under it).
    pub buckets: Vec<(f64, f64)>,
}

/// Reads the totals per `destination_service` from Prometheus text.
pub fn totals(text: &str) -> Result<BTreeMap<String, Totals>, String> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("not Prometheus text: {e}"))?;
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    for sample in scrape.samples {
        let Some(service) = sample.labels.get("destination_service") else {
            continue;
        };
        match (sample.metric.as_str(), &sample.value) {
            ("istio_requests_total", Value::Counter(n) | Value::Untyped(n)) => {
                let t = out.entry(service.to_string()).or_default();
                t.requests += n;
                if sample
                    .labels
                    .get("response_code")
                    .is_some_and(|c| c.starts_with('5'))
                {
                    t.server_errors += n;
                }
            }
            ("istio_request_duration_milliseconds", Value::Histogram(counts)) => {
                let t = out.entry(service.to_string()).or_default();
                for c in counts {
                    match t.buckets.iter_mut().find(|(le, _)| *le == c.less_than) {
                        Some((_, n)) => *n += c.count,
                        None => t.buckets.push((c.less_than, c.count)),
                    }
                }
                t.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// One service's figures over an interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceStats {
    pub service: String,
    pub requests: u64,
    pub qps: f64,
    /// `None` when there were no requests.
    pub p99_ms: Option<f64>,
    /// Share of requests not answered 5xx; `None` when there were no requests.
    pub success_rate: Option<f64>,
}

/// The `q` quantile of cumulative buckets, interpolated inside its bucket as Prometheus's
/// `histogram_quantile` does.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Past the last finite bound: report that bound.
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            let fraction = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * fraction);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

/// Figures per service between two scrapes `seconds` apart.
pub fn between(
    before: &BTreeMap<String, Totals>,
    after: &BTreeMap<String, Totals>,
    seconds: f64,
) -> Vec<ServiceStats> {
    after
        .iter()
        .map(|(service, a)| {
            let empty = Totals::default();
            let b = before.get(service).unwrap_or(&empty);
            let requests = (a.requests - b.requests).max(0.0);
            let errors = (a.server_errors - b.server_errors).max(0.0);
            let buckets: Vec<(f64, f64)> = a
                .buckets
                .iter()
                .map(|(le, n)| {
                    let earlier = b
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |(_, m)| *m);
                    (*le, (n - earlier).max(0.0))
                })
                .collect();
            ServiceStats {
                service: service.clone(),
                requests: requests as u64,
                qps: if seconds > 0.0 {
                    requests / seconds
                } else {
                    0.0
                },
                p99_ms: (requests > 0.0).then(|| quantile(&buckets, 0.99)).flatten(),
                success_rate: (requests > 0.0).then(|| 1.0 - errors / requests),
            }
        })
        .collect()
}

/// The table `shoalctl waypoint-stats` prints.
pub fn table(stats: &[ServiceStats]) -> String {
    use std::io::Write;
    let mut tw = tabwriter::TabWriter::new(Vec::new());
    let _ = writeln!(tw, "SERVICE\tREQUESTS\tQPS\tP99 (ms)\tSUCCESS");
    for s in stats {
        let _ = writeln!(
            tw,
            "{}\t{}\t{:.1}\t{}\t{}",
            s.service,
            s.requests,
            s.qps,
            s.p99_ms.map_or("-".into(), |p| format!("{p:.2}")),
            s.success_rate
                .map_or("-".into(), |r| format!("{:.2}%", r * 100.0)),
        );
    }
    let _ = tw.flush();
    String::from_utf8(tw.into_inner().unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(ok: u64, errors: u64, fast: u64, slow: u64) -> String {
        format!(
            "# HELP istio_requests Requests.
# TYPE istio_requests counter
istio_requests_total{{reporter=\"waypoint\",destination_service=\"r.ns.svc.cluster.local\",response_code=\"200\"}} {ok}
istio_requests_total{{reporter=\"waypoint\",destination_service=\"r.ns.svc.cluster.local\",response_code=\"503\"}} {errors}
# HELP istio_request_duration_milliseconds Durations.
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_sum{{destination_service=\"r.ns.svc.cluster.local\",response_code=\"200\"}} 1.0
istio_request_duration_milliseconds_count{{destination_service=\"r.ns.svc.cluster.local\",response_code=\"200\"}} {n}
istio_request_duration_milliseconds_bucket{{destination_service=\"r.ns.svc.cluster.local\",response_code=\"200\",le=\"1.0\"}} {fast}
istio_request_duration_milliseconds_bucket{{destination_service=\"r.ns.svc.cluster.local\",response_code=\"200\",le=\"10.0\"}} {n}
istio_request_duration_milliseconds_bucket{{destination_service=\"r.ns.svc.cluster.local\",response_code=\"200\",le=\"+Inf\"}} {n}
",
            n = fast + slow
        )
    }

    #[test]
    fn rates_quantiles_and_success_between_two_scrapes() {
        let before = totals(&scrape(100, 0, 100, 0)).unwrap();
        let after = totals(&scrape(1100, 10, 1090, 10)).unwrap();
        let stats = between(&before, &after, 2.0);
        assert_eq!(stats.len(), 1);
        let s = &stats[0];
        assert_eq!(s.requests, 1010);
        assert!((s.qps - 505.0).abs() < 1e-9);
        assert!((s.success_rate.unwrap() - 1000.0 / 1010.0).abs() < 1e-9);
        // 990 of 1000 timed requests at ≤ 1 ms, 10 in (1, 10]: the 99th percentile is 1 ms.
        let p99 = s.p99_ms.unwrap();
        assert!((p99 - 1.0).abs() < 1e-9, "{p99}");
        assert!(table(&stats).contains("r.ns.svc.cluster.local"));
    }

    #[test]
    fn quantiles_interpolate_and_stop_at_the_last_finite_bound() {
        let b = [(1.0, 50.0), (10.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&b, 0.5), Some(1.0));
        assert!((quantile(&b, 0.75).unwrap() - 5.5).abs() < 1e-9);
        let over = [(1.0, 0.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(&over, 0.99), Some(1.0));
        assert_eq!(quantile(&[], 0.99), None);
        assert_eq!(quantile(&[(1.0, 0.0)], 0.99), None);
    }

    #[test]
    fn no_requests_means_no_figures() {
        let before = totals(&scrape(5, 0, 5, 0)).unwrap();
        let stats = between(&before, &before, 1.0);
        assert_eq!(stats[0].requests, 0);
        assert_eq!(stats[0].p99_ms, None);
        assert_eq!(stats[0].success_rate, None);
    }
}
