//! Traffic management as the waypoint applies it: a VirtualService route's retries and faults, and
//! a DestinationRule's load balancing, connection-pool limits and outlier detection for each
//! service port and subset. Compiled once per snapshot from resources `compile` has already
//! checked; the decisions on them (is this attempt retried, how long to back off, is this request
//! faulted) are pure functions, tested by tables.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::duration;
use crate::resources::{self, TrafficPolicy};

// ------------------------------------------------------------------ retries

/// The conditions a retry policy retries on (Envoy's `retry_on` names, as Istio writes them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn(u16);

impl RetryOn {
    pub const FIVE_XX: RetryOn = RetryOn(1);
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    pub const RESET: RetryOn = RetryOn(1 << 2);
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 3);
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 4);
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 5);
    pub const STATUS_CODES: RetryOn = RetryOn(1 << 6);
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 7);
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 8);
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 9);
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 10);
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 11);

    pub fn has(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    fn with(self, other: RetryOn) -> RetryOn {
        RetryOn(self.0 | other.0)
    }
}

/// What one try came to, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// A response head arrived (`grpc` is its `grpc-status` header, for trailers-only answers).
    Response { status: u16, grpc: Option<u32> },
    /// No connection to the endpoint (flag UF).
    ConnectFailure,
    /// The connection or stream broke before a response head (flag UC).
    Reset,
    /// HTTP/2 REFUSED_STREAM: the endpoint did not process the request.
    RefusedStream,
    /// The per-try timeout expired (flag UT).
    Timeout,
}

impl TryOutcome {
    /// A failure in the sense of outlier detection's "gateway errors" (502, 503, 504 and errors
    /// of the connection itself, which Envoy counts as 503s).
    pub fn is_gateway_error(self) -> bool {
        match self {
            TryOutcome::Response { status, .. } => matches!(status, 502..=504),
            _ => true,
        }
    }

    /// A 5xx in the sense of outlier detection (connection errors count as 503).
    pub fn is_5xx(self) -> bool {
        match self {
            TryOutcome::Response { status, .. } => status >= 500,
            _ => true,
        }
    }
}

/// A route's retry policy. `attempts` is the number of retries after the first try.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    #[serde(serialize_with = "serialize_opt_ms")]
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// Status codes retried under `retriable-status-codes` (or written as numbers in `retryOn`).
    pub codes: Vec<u16>,
}

/// First back-off interval; later ones double, with full jitter, up to ten times this.
pub const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);

impl RetryPolicy {
    /// Istio's mesh-wide default, applied to routes that say nothing: 2 retries on
    /// connect-failure, refused-stream, unavailable, cancelled and 503.
    pub fn mesh_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn::CONNECT_FAILURE
                .with(RetryOn::REFUSED_STREAM)
                .with(RetryOn::GRPC_UNAVAILABLE)
                .with(RetryOn::GRPC_CANCELLED)
                .with(RetryOn::STATUS_CODES),
            codes: vec![503],
        }
    }

    /// No retries (`attempts: 0`).
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            attempts: 0,
            per_try_timeout: None,
            on: RetryOn::default(),
            codes: vec![],
        }
    }

    /// A VirtualService's `retries`, already checked by `compile`. Unset `retryOn` is Istio's
    /// default set.
    pub fn from_virtual_service(r: &resources::HttpRetry) -> RetryPolicy {
        let default = RetryPolicy::mesh_default();
        let attempts = r
            .attempts
            .map_or(default.attempts, |a| a.clamp(0, 100) as u32);
        let per_try_timeout = r
            .per_try_timeout
            .as_deref()
            .and_then(|t| duration::parse(t).ok())
            .filter(|d| !d.is_zero());
        let (on, codes) = match &r.retry_on {
            Some(s) => parse_retry_on(s),
            None => (default.on, default.codes),
        };
        RetryPolicy {
            attempts,
            per_try_timeout,
            on,
            codes,
        }
    }

    /// Would this outcome be retried (attempts and budget aside)?
    pub fn retriable(&self, outcome: TryOutcome) -> bool {
        let on = self.on;
        let any_error = on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR);
        match outcome {
            TryOutcome::ConnectFailure => {
                any_error || on.has(RetryOn::RESET) || on.has(RetryOn::CONNECT_FAILURE)
            }
            TryOutcome::Reset | TryOutcome::Timeout => any_error || on.has(RetryOn::RESET),
            TryOutcome::RefusedStream => any_error || on.has(RetryOn::REFUSED_STREAM),
            TryOutcome::Response { status, grpc } => {
                (on.has(RetryOn::FIVE_XX) && status >= 500)
                    || (on.has(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
                    || (on.has(RetryOn::RETRIABLE_4XX) && status == 409)
                    || (on.has(RetryOn::STATUS_CODES) && self.codes.contains(&status))
                    || grpc.is_some_and(|g| {
                        (on.has(RetryOn::GRPC_CANCELLED) && g == 1)
                            || (on.has(RetryOn::GRPC_DEADLINE_EXCEEDED) && g == 4)
                            || (on.has(RetryOn::GRPC_RESOURCE_EXHAUSTED) && g == 8)
                            || (on.has(RetryOn::GRPC_INTERNAL) && g == 13)
                            || (on.has(RetryOn::GRPC_UNAVAILABLE) && g == 14)
                    })
            }
        }
    }
}

/// Parses `retryOn` (checked by `compile`: unknown words are errors there, skipped here).
pub fn parse_retry_on(s: &str) -> (RetryOn, Vec<u16>) {
    let mut on = RetryOn::default();
    let mut codes = Vec::new();
    for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        on = on.with(match token {
            "5xx" => RetryOn::FIVE_XX,
            "gateway-error" => RetryOn::GATEWAY_ERROR,
            "reset" => RetryOn::RESET,
            "connect-failure" => RetryOn::CONNECT_FAILURE,
            "refused-stream" => RetryOn::REFUSED_STREAM,
            "retriable-4xx" => RetryOn::RETRIABLE_4XX,
            "retriable-status-codes" => RetryOn::STATUS_CODES,
            "unavailable" => RetryOn::GRPC_UNAVAILABLE,
            "cancelled" => RetryOn::GRPC_CANCELLED,
            "deadline-exceeded" => RetryOn::GRPC_DEADLINE_EXCEEDED,
            "internal" => RetryOn::GRPC_INTERNAL,
            "resource-exhausted" => RetryOn::GRPC_RESOURCE_EXHAUSTED,
            other => match other.parse::<u16>() {
                // Istio turns a bare status code into a retriable status code.
                Ok(code) => {
                    codes.push(code);
                    RetryOn::STATUS_CODES
                }
                Err(_) => RetryOn::default(),
            },
        });
    }
    (on, codes)
}

/// How long to wait before retry number `retry` (1-based): fully jittered exponential back-off,
/// as Envoy does it — uniform in `[0, (2^retry - 1) × 25 ms)`, at most 250 ms. `roll` is random.
pub fn backoff(retry: u32, roll: u64) -> Duration {
    let base_ms = RETRY_BACKOFF_BASE.as_millis() as u64;
    let ceiling_ms = ((1u64 << retry.min(10)) - 1)
        .saturating_mul(base_ms)
        .min(10 * base_ms);
    Duration::from_millis(roll % ceiling_ms.max(1))
}

// ------------------------------------------------------------------ faults

/// A VirtualService route's `fault`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDelay {
    #[serde(serialize_with = "serialize_ms")]
    pub fixed: Duration,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultAbort {
    pub status: u16,
    pub percent: f64,
}

impl Fault {
    /// From a checked VirtualService `fault`. No `percentage` means nothing is injected.
    pub fn from_virtual_service(f: &resources::HttpFault) -> Option<Fault> {
        let delay = f.delay.as_ref().and_then(|d| {
            Some(FaultDelay {
                fixed: duration::parse(d.fixed_delay.as_deref()?).ok()?,
                percent: d.percentage.as_ref().map_or(0.0, |p| p.value),
            })
        });
        let abort = f.abort.as_ref().and_then(|a| {
            Some(FaultAbort {
                status: u16::try_from(a.http_status?).ok()?,
                percent: a.percentage.as_ref().map_or(0.0, |p| p.value),
            })
        });
        (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
    }
}

/// Does a fault given to `percent` % of requests hit this one? `roll` is random; the resolution
/// is a millionth of the requests, like Envoy's.
pub fn fault_hits(percent: f64, roll: u64) -> bool {
    let per_million = (percent.clamp(0.0, 100.0) * 10_000.0).round() as u64;
    roll % 1_000_000 < per_million
}

// ------------------------------------------------------------------ local rate limits

/// A compiled `HTTPLocalRateLimitPolicy`: requests per second for all clients together, for each
/// client identity, and for named identities (principals, `td/ns/N/sa/S`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimit {
    /// `namespace/name`, which also keys the limit's buckets.
    pub policy: String,
    pub total_per_s: Option<u32>,
    pub identity_per_s: Option<u32>,
    pub overrides: Vec<(u32, Vec<String>)>,
}

impl RateLimit {
    /// The per-identity rate for `principal`: an override naming it, else `identity`'s.
    pub fn identity_rate(&self, principal: &str) -> Option<u32> {
        self.overrides
            .iter()
            .find(|(_, who)| who.iter().any(|p| p == principal))
            .map(|(rate, _)| *rate)
            .or(self.identity_per_s)
    }
}

/// GCRA (a token bucket kept as one timestamp): may a request arriving at `now_ns` pass a limit
/// of `rate_per_s` with a burst of one second's worth, given the bucket's theoretical arrival
/// time `tat_ns`? Returns the new TAT when it may. Pure, so the shared atomic around it stays
/// a compare-and-swap.
pub fn gcra(tat_ns: u64, now_ns: u64, rate_per_s: u32) -> Option<u64> {
    if rate_per_s == 0 {
        return None;
    }
    let interval = 1_000_000_000 / u64::from(rate_per_s);
    let burst_ns = 1_000_000_000u64.saturating_sub(interval);
    let tat = tat_ns.max(now_ns);
    (tat - now_ns <= burst_ns).then_some(tat + interval)
}

// ------------------------------------------------------------------ destination policy

/// How an endpoint is chosen among the ready ones.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum LoadBalancer {
    RoundRobin,
    /// Power of two choices on requests in flight.
    LeastRequest,
    Random,
    /// Consistent hashing on a request attribute; the same key reaches the same endpoint from
    /// every shard and every waypoint with the same endpoints.
    Hash {
        key: HashKey,
        table: HashTable,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum HashKey {
    Header(String),
    /// A cookie; with `ttl`, one is made (and set on the response) when the request has none.
    Cookie {
        name: String,
        path: Option<String>,
        #[serde(serialize_with = "serialize_opt_ms")]
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum HashTable {
    /// Ketama-style ring with at least this many points.
    Ring { min_points: usize },
    /// Maglev lookup table (65537 entries, Envoy's default).
    Maglev,
}

/// Ring points when `minimumRingSize` is not given (Envoy's default).
pub const DEFAULT_RING_POINTS: usize = 1024;
/// Largest ring accepted: points cost memory per shard.
pub const MAX_RING_POINTS: usize = 1 << 20;

/// Connection-pool limits (`None`: unlimited, as Istio's defaults are in effect).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PoolLimits {
    pub max_connections: Option<u32>,
    #[serde(serialize_with = "serialize_ms")]
    pub connect_timeout: Duration,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    #[serde(serialize_with = "serialize_ms")]
    pub idle_timeout: Duration,
}

/// Istio's connect timeout when none is written.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an unused upstream connection is kept (Istio's `idleTimeout` default is 1 h; a
/// waypoint holding thousands of endpoints keeps them a minute).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_connections: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_pending_requests: None,
            max_requests: None,
            max_requests_per_connection: None,
            max_retries: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Outlier detection: consecutive errors eject an endpoint for `base_ejection × ejections`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    #[serde(serialize_with = "serialize_ms")]
    pub interval: Duration,
    #[serde(serialize_with = "serialize_ms")]
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// The longest an endpoint stays ejected, however often it was (Envoy's `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

impl OutlierDetection {
    /// Should an endpoint with these consecutive counts be ejected?
    pub fn trips(&self, consecutive_5xx: u32, consecutive_gateway: u32) -> bool {
        self.consecutive_5xx
            .is_some_and(|n| n > 0 && consecutive_5xx >= n)
            || self
                .consecutive_gateway
                .is_some_and(|n| n > 0 && consecutive_gateway >= n)
    }

    /// May one more of `total` endpoints be ejected when `ejected` already are? As Envoy: while
    /// the ejected share is below the maximum (so the first ejection is always allowed).
    pub fn may_eject(&self, ejected: usize, total: usize) -> bool {
        ejected < total && ejected * 100 < self.max_ejection_percent as usize * total
    }

    /// How long the `n`-th ejection (1-based) lasts.
    pub fn ejection_time(&self, n: u32) -> Duration {
        self.base_ejection
            .saturating_mul(n.max(1))
            .min(MAX_EJECTION.max(self.base_ejection))
    }
}

/// TLS the waypoint originates to an endpoint outside the mesh (`tls.mode: SIMPLE`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsOrigination {
    /// SNI and the name the certificate must carry; `None`: the request's host.
    pub sni: Option<String>,
    /// A PEM file of roots to verify the server against; `None`: the system's roots.
    pub ca_certificates: Option<String>,
    /// Names accepted in the server's certificate besides the SNI.
    pub subject_alt_names: Vec<String>,
    /// No verification at all — only when written so.
    pub insecure_skip_verify: bool,
}

/// Everything a DestinationRule says about one service port (and subset).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterPolicy {
    pub load_balancer: LoadBalancer,
    pub limits: PoolLimits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierDetection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOrigination>,
}

impl Default for ClusterPolicy {
    fn default() -> Self {
        ClusterPolicy {
            load_balancer: LoadBalancer::RoundRobin,
            limits: PoolLimits::default(),
            outlier: None,
            tls: None,
        }
    }
}

/// A DestinationRule resolved for every port of its service and every subset.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DestinationPolicy {
    /// `namespace/name` of the DestinationRule.
    pub rule: String,
    pub clusters: Vec<ClusterEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterEntry {
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub policy: Arc<ClusterPolicy>,
}

impl DestinationPolicy {
    /// Resolves a checked DestinationRule for `ports` of its service: the top-level policy, its
    /// port-level settings, then a subset's policy and its port-level settings, each replacing the
    /// parts (load balancer, connection pool, outlier detection) it sets, as Istio merges them.
    pub fn resolve(rule: String, spec: &resources::DestinationRuleSpec, ports: &[u16]) -> Self {
        let mut clusters = Vec::new();
        let subsets = std::iter::once((None, None)).chain(
            spec.subsets
                .iter()
                .map(|s| (Some(s.name.clone()), s.traffic_policy.as_ref())),
        );
        for (subset, subset_policy) in subsets {
            for &port in ports {
                let mut parts = Parts::default();
                if let Some(p) = &spec.traffic_policy {
                    parts.overlay(p, port);
                }
                if let Some(p) = subset_policy {
                    parts.overlay(p, port);
                }
                clusters.push(ClusterEntry {
                    port,
                    subset: subset.clone(),
                    policy: Arc::new(parts.finish()),
                });
            }
        }
        DestinationPolicy { rule, clusters }
    }

    pub fn get(&self, port: u16, subset: Option<&str>) -> Option<&Arc<ClusterPolicy>> {
        self.clusters
            .iter()
            .find(|c| c.port == port && c.subset.as_deref() == subset)
            .map(|c| &c.policy)
    }
}

#[derive(Default)]
struct Parts {
    load_balancer: Option<resources::LoadBalancer>,
    pool: Option<resources::ConnectionPool>,
    outlier: Option<resources::OutlierDetection>,
    tls: Option<resources::ClientTls>,
}

impl Parts {
    fn overlay(&mut self, p: &TrafficPolicy, port: u16) {
        self.set(
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
        );
        if let Some(tls) = &p.tls {
            self.tls = Some(tls.clone());
        }
        for pl in &p.port_level_settings {
            if pl
                .port
                .as_ref()
                .is_some_and(|s| s.number == i64::from(port))
            {
                self.set(
                    pl.load_balancer.as_ref(),
                    pl.connection_pool.as_ref(),
                    pl.outlier_detection.as_ref(),
                );
                if let Some(tls) = &pl.tls {
                    self.tls = Some(tls.clone());
                }
            }
        }
    }

    fn set(
        &mut self,
        lb: Option<&resources::LoadBalancer>,
        pool: Option<&resources::ConnectionPool>,
        outlier: Option<&resources::OutlierDetection>,
    ) {
        if let Some(lb) = lb {
            self.load_balancer = Some(lb.clone());
        }
        if let Some(pool) = pool {
            self.pool = Some(pool.clone());
        }
        if let Some(o) = outlier {
            self.outlier = Some(o.clone());
        }
    }

    fn finish(self) -> ClusterPolicy {
        ClusterPolicy {
            load_balancer: self
                .load_balancer
                .as_ref()
                .map_or(LoadBalancer::RoundRobin, load_balancer),
            limits: self.pool.as_ref().map_or_else(PoolLimits::default, limits),
            outlier: self.outlier.as_ref().map(outlier),
            tls: self.tls.as_ref().and_then(tls),
        }
    }
}

/// `SIMPLE` is originated; `DISABLE` and `ISTIO_MUTUAL` are not (the mesh's own mTLS is HBONE's).
fn tls(t: &resources::ClientTls) -> Option<TlsOrigination> {
    (t.mode.as_deref() == Some("SIMPLE")).then(|| TlsOrigination {
        sni: t.sni.clone().filter(|s| !s.is_empty()),
        ca_certificates: t.ca_certificates.clone().filter(|s| !s.is_empty()),
        subject_alt_names: t.subject_alt_names.clone(),
        insecure_skip_verify: t.insecure_skip_verify == Some(true),
    })
}

fn load_balancer(lb: &resources::LoadBalancer) -> LoadBalancer {
    if let Some(h) = &lb.consistent_hash {
        let key = if let Some(name) = &h.http_header_name {
            HashKey::Header(name.to_ascii_lowercase())
        } else if let Some(c) = &h.http_cookie {
            HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: c
                    .ttl
                    .as_deref()
                    .and_then(|t| duration::parse(t).ok())
                    .filter(|d| !d.is_zero()),
            }
        } else if let Some(q) = &h.http_query_parameter_name {
            HashKey::QueryParameter(q.clone())
        } else {
            HashKey::SourceIp
        };
        let table = if h.maglev.is_some() {
            HashTable::Maglev
        } else {
            let from_ring = h
                .ring_hash
                .as_ref()
                .and_then(|r| r.get("minimumRingSize"))
                .and_then(serde_json::Value::as_u64);
            let min = from_ring
                .or(h.minimum_ring_size.and_then(|v| u64::try_from(v).ok()))
                .map_or(DEFAULT_RING_POINTS, |v| v as usize);
            HashTable::Ring {
                min_points: min.clamp(1, MAX_RING_POINTS),
            }
        };
        return LoadBalancer::Hash { key, table };
    }
    match lb.simple.as_deref() {
        Some("LEAST_REQUEST" | "LEAST_CONN") => LoadBalancer::LeastRequest,
        Some("RANDOM") => LoadBalancer::Random,
        _ => LoadBalancer::RoundRobin,
    }
}

fn count(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

fn limits(pool: &resources::ConnectionPool) -> PoolLimits {
    let dur = |v: Option<&String>| v.and_then(|t| duration::parse(t).ok());
    let mut l = PoolLimits::default();
    if let Some(tcp) = &pool.tcp {
        l.max_connections = count(tcp.max_connections);
        if let Some(d) = dur(tcp.connect_timeout.as_ref()).filter(|d| !d.is_zero()) {
            l.connect_timeout = d;
        }
        if let Some(d) = dur(tcp.idle_timeout.as_ref()).filter(|d| !d.is_zero()) {
            l.idle_timeout = d;
        }
    }
    if let Some(http) = &pool.http {
        l.max_pending_requests = count(http.http1_max_pending_requests);
        l.max_requests = count(http.http2_max_requests);
        // 0 means unlimited for this one, as in Istio.
        l.max_requests_per_connection = count(http.max_requests_per_connection).filter(|n| *n > 0);
        l.max_retries = count(http.max_retries);
        if let Some(d) = dur(http.idle_timeout.as_ref()).filter(|d| !d.is_zero()) {
            l.idle_timeout = d;
        }
    }
    l
}

fn outlier(o: &resources::OutlierDetection) -> OutlierDetection {
    let dur = |v: Option<&String>, default: Duration| {
        v.and_then(|t| duration::parse(t).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(default)
    };
    OutlierDetection {
        // Istio's default when the block is present but the count is not.
        consecutive_5xx: Some(count(o.consecutive5xx_errors).unwrap_or(5)),
        consecutive_gateway: count(o.consecutive_gateway_errors),
        interval: dur(o.interval.as_ref(), Duration::from_secs(10)),
        base_ejection: dur(o.base_ejection_time.as_ref(), Duration::from_secs(30)),
        max_ejection_percent: count(o.max_ejection_percent).unwrap_or(10).min(100),
    }
}

fn serialize_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn serialize_opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16) -> TryOutcome {
        TryOutcome::Response { status, grpc: None }
    }

    #[test]
    fn retry_conditions_table() {
        use TryOutcome::*;
        let cases: &[(&str, TryOutcome, bool)] = &[
            ("5xx", response(500), true),
            ("5xx", response(503), true),
            ("5xx", response(404), false),
            ("5xx", ConnectFailure, true),
            ("5xx", Reset, true),
            ("5xx", Timeout, true),
            ("gateway-error", response(500), false),
            ("gateway-error", response(502), true),
            ("gateway-error", response(504), true),
            ("gateway-error", Reset, true),
            ("reset", Reset, true),
            ("reset", response(503), false),
            ("reset", ConnectFailure, true),
            ("connect-failure", ConnectFailure, true),
            ("connect-failure", Reset, false),
            ("connect-failure", response(503), false),
            ("refused-stream", RefusedStream, true),
            ("refused-stream", Reset, false),
            ("retriable-4xx", response(409), true),
            ("retriable-4xx", response(404), false),
            ("retriable-status-codes,418", response(418), true),
            ("418", response(418), true),
            ("418", response(503), false),
            (
                "unavailable",
                Response {
                    status: 200,
                    grpc: Some(14),
                },
                true,
            ),
            (
                "cancelled",
                Response {
                    status: 200,
                    grpc: Some(14),
                },
                false,
            ),
        ];
        for (on, outcome, want) in cases {
            let (on_flags, codes) = parse_retry_on(on);
            let p = RetryPolicy {
                attempts: 2,
                per_try_timeout: None,
                on: on_flags,
                codes,
            };
            assert_eq!(p.retriable(*outcome), *want, "{on} {outcome:?}");
        }
    }

    #[test]
    fn mesh_default_retries_connect_failures_and_503_only() {
        let p = RetryPolicy::mesh_default();
        assert_eq!(p.attempts, 2);
        assert!(p.retriable(TryOutcome::ConnectFailure));
        assert!(p.retriable(TryOutcome::RefusedStream));
        assert!(p.retriable(response(503)));
        assert!(!p.retriable(response(500)));
        assert!(!p.retriable(TryOutcome::Reset));
        assert!(!RetryPolicy::none().retriable(TryOutcome::ConnectFailure));
    }

    #[test]
    fn vs_retries_unset_retry_on_is_the_default_set() {
        let r = resources::HttpRetry {
            attempts: Some(3),
            per_try_timeout: Some("200ms".into()),
            retry_on: None,
            retry_remote_localities: None,
        };
        let p = RetryPolicy::from_virtual_service(&r);
        assert_eq!(p.attempts, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(200)));
        assert_eq!(p.on, RetryPolicy::mesh_default().on);
    }

    #[test]
    fn backoff_is_jittered_and_bounded() {
        assert!(backoff(1, u64::MAX) < Duration::from_millis(25));
        assert!(backoff(2, u64::MAX) < Duration::from_millis(75));
        assert!(backoff(3, 999_999) < Duration::from_millis(175));
        for n in 1..40 {
            assert!(backoff(n, 249) <= Duration::from_millis(250));
        }
        assert_eq!(backoff(1, 0), Duration::ZERO);
    }

    #[test]
    fn fault_percentages() {
        assert!(!fault_hits(0.0, 0));
        assert!(fault_hits(100.0, 999_999));
        let hits = (0..1_000_000u64).filter(|r| fault_hits(12.5, *r)).count();
        assert_eq!(hits, 125_000);
        assert!(fault_hits(0.0001, 0) && !fault_hits(0.0001, 1));
    }

    #[test]
    fn gcra_allows_the_rate_with_a_one_second_burst() {
        // 10/s: a burst of 10 at once, then one per 100 ms.
        let mut tat = 0;
        let mut passed = 0;
        for _ in 0..15 {
            if let Some(t) = gcra(tat, 1_000_000_000, 10) {
                tat = t;
                passed += 1;
            }
        }
        assert_eq!(passed, 10);
        assert!(gcra(tat, 1_050_000_000, 10).is_none());
        assert!(gcra(tat, 1_100_000_000, 10).is_some());
        // Over ten seconds at 1 kHz, 10/s lets about 10 per second through (plus the burst).
        let (mut tat, mut passed) = (0, 0);
        for i in 0..10_000u64 {
            if let Some(t) = gcra(tat, 1_000_000_000 + i * 1_000_000, 10) {
                tat = t;
                passed += 1;
            }
        }
        assert!((105..=111).contains(&passed), "{passed}");
        assert!(gcra(0, 5, 0).is_none(), "a zero rate admits nothing");
    }

    #[test]
    fn rate_limit_overrides_name_identities() {
        let rl = RateLimit {
            policy: "ns/rl".into(),
            total_per_s: Some(100),
            identity_per_s: Some(5),
            overrides: vec![(50, vec!["cluster.local/ns/default/sa/curl".into()])],
        };
        assert_eq!(
            rl.identity_rate("cluster.local/ns/default/sa/curl"),
            Some(50)
        );
        assert_eq!(
            rl.identity_rate("cluster.local/ns/default/sa/other"),
            Some(5)
        );
    }

    #[test]
    fn outlier_ejection_rules() {
        let o = OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
        };
        assert!(!o.trips(2, 2));
        assert!(o.trips(3, 0));
        // The first ejection is always allowed; a second of two endpoints is not at 10%.
        assert!(o.may_eject(0, 2));
        assert!(!o.may_eject(1, 2));
        assert!(o.may_eject(1, 20));
        assert!(!o.may_eject(2, 20));
        assert_eq!(o.ejection_time(1), Duration::from_secs(30));
        assert_eq!(o.ejection_time(3), Duration::from_secs(90));
        assert_eq!(o.ejection_time(100), MAX_EJECTION);
        let all = OutlierDetection {
            max_ejection_percent: 100,
            ..o
        };
        assert!(all.may_eject(1, 2));
        assert!(!all.may_eject(2, 2));
    }

    #[test]
    fn destination_rule_merges_top_level_port_level_and_subset() {
        let spec: resources::DestinationRuleSpec = serde_saphyr::from_str(
            r#"
host: reviews
trafficPolicy:
  loadBalancer: {simple: LEAST_REQUEST}
  connectionPool: {tcp: {maxConnections: 10}, http: {http1MaxPendingRequests: 1}}
  portLevelSettings:
  - port: {number: 9443}
    loadBalancer: {simple: RANDOM}
subsets:
- name: v2
  labels: {version: v2}
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: X-User, maglev: {}}
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 1s, maxEjectionPercent: 100}
- name: v1
  labels: {version: v1}
"#,
        )
        .expect("test yaml");
        let d = DestinationPolicy::resolve("ns/r".into(), &spec, &[9080, 9443]);
        let p = |port, subset| d.get(port, subset).expect("resolved").clone();
        assert_eq!(p(9080, None).load_balancer, LoadBalancer::LeastRequest);
        assert_eq!(p(9443, None).load_balancer, LoadBalancer::Random);
        assert_eq!(p(9080, None).limits.max_connections, Some(10));
        assert_eq!(p(9080, None).limits.max_pending_requests, Some(1));
        assert_eq!(p(9080, None).outlier, None);
        let v2 = p(9080, Some("v2"));
        assert_eq!(
            v2.load_balancer,
            LoadBalancer::Hash {
                key: HashKey::Header("x-user".into()),
                table: HashTable::Maglev
            }
        );
        // A subset keeps the parts it does not set.
        assert_eq!(v2.limits.max_connections, Some(10));
        assert_eq!(
            v2.outlier.as_ref().map(|o| o.consecutive_5xx),
            Some(Some(2))
        );
        assert_eq!(p(9443, Some("v1")).load_balancer, LoadBalancer::Random);
        assert!(d.get(9080, Some("v9")).is_none());
    }
}
