//! `shoal-bench bench traffic`: what each traffic-management feature costs on the waypoint's
//! request path, and egress with TLS origination. The same closed-loop HTTP load (50 keep-alive
//! connections, client → ztunnel → waypoint → ztunnel → backend) goes to one service per feature,
//! each configured with the resource users write, interleaved with a service with none; the
//! report gives each one's rate and p99 as a ratio of that baseline within the same repeat.
//! Egress: the app's plain HTTP to a ServiceEntry through the waypoint, which originates TLS to
//! nginx, against wrk calling nginx over HTTPS directly (this load generator has no TLS client;
//! the two generators agree within a few percent on plain HTTP, see `bench loadgen`).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use serde::Serialize;
use shoal_hbone::ca::LocalCa;

use crate::load::{self, LoadArgs, Protocol};
use crate::machine::Machine;
use crate::process::{ProxyLog, ServerProcess};
use crate::report::{fmt_spread, spread};
use crate::testkit::{make_ca, start_nginx_https, Started};
use crate::waypoint_bench::{binary, proxy_args, start_ambient, wait_listening};

#[derive(Clone, Debug, clap::Args)]
pub struct TrafficBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 3)]
    pub duration_s: u64,
    /// Directory holding the `ztunnel` and `waypoint` binaries (default: beside this one).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Shards per proxy.
    #[arg(long, default_value_t = 1)]
    pub proxy_shards: usize,
    #[arg(long, default_value = "warn", help = crate::process::PROXY_LOG_HELP)]
    pub proxy_log: String,
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 43, 0, 1);
const SERVER_IP: &str = "127.43.0.2";
const WAYPOINT_IP: &str = "127.43.0.50";
const API_IP: &str = "127.43.0.80";
const EGRESS_VIP: &str = "10.253.0.20";

/// (feature, the service's VIP, what it is configured with).
const FEATURES: [(&str, &str, &str); 8] = [
    (
        "baseline",
        "10.253.0.1",
        "no VirtualService or DestinationRule (the mesh-default retry policy)",
    ),
    (
        "retries",
        "10.253.0.2",
        "VirtualService retries: 3 attempts on 5xx, perTryTimeout 5s, timeout 10s",
    ),
    (
        "fault",
        "10.253.0.3",
        "VirtualService fault: delay and abort at 0% (evaluated, never injected)",
    ),
    (
        "circuit-breaker",
        "10.253.0.4",
        "DestinationRule connectionPool: maxConnections, http2MaxRequests, maxRetries (high)",
    ),
    (
        "outlier-detection",
        "10.253.0.5",
        "DestinationRule outlierDetection: consecutive5xxErrors 5",
    ),
    (
        "least-request",
        "10.253.0.6",
        "DestinationRule loadBalancer LEAST_REQUEST",
    ),
    (
        "consistent-hash",
        "10.253.0.7",
        "DestinationRule consistentHash on the source IP (ring)",
    ),
    (
        "rate-limit",
        "10.253.0.8",
        "HTTPLocalRateLimitPolicy total 10,000,000/s (checked, never hit)",
    ),
];

fn mesh(ca_pem: &Path) -> String {
    let mut m = format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: bench, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: bench}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
  addresses: [{{type: IPAddress, value: {WAYPOINT_IP}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: bench, labels: {{app: client}}}}
spec: {{nodeName: node-a, serviceAccountName: client}}
status: {{podIP: {CLIENT_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: bench, labels: {{app: server}}}}
spec: {{nodeName: node-b, serviceAccountName: server}}
status: {{podIP: {SERVER_IP}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: bench}}
spec:
  hosts: [api.bench.test]
  addresses: [{EGRESS_VIP}]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: STATIC
  endpoints: [{{address: {API_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: bench}}
spec:
  host: api.bench.test
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {ca}}}}}
",
        ca = ca_pem.display()
    );
    for (name, vip, _) in FEATURES {
        let _ = write!(
            m,
            "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: bench}}
spec: {{clusterIP: {vip}, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"
        );
    }
    m.push_str(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: retries, namespace: bench}
spec:
  hosts: [retries]
  http: [{retries: {attempts: 3, perTryTimeout: 5s, retryOn: 5xx}, timeout: 10s, route: [{destination: {host: retries}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: fault, namespace: bench}
spec:
  hosts: [fault]
  http: [{fault: {delay: {fixedDelay: 1s, percentage: {value: 0}}, abort: {httpStatus: 503, percentage: {value: 0}}}, route: [{destination: {host: fault}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: circuit-breaker, namespace: bench}
spec:
  host: circuit-breaker
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 100000}, http: {http1MaxPendingRequests: 100000, http2MaxRequests: 100000, maxRetries: 1000}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: outlier-detection, namespace: bench}
spec:
  host: outlier-detection
  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: least-request, namespace: bench}
spec: {host: least-request, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: consistent-hash, namespace: bench}
spec: {host: consistent-hash, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: rate-limit, namespace: bench}
spec: {targetRef: {kind: Service, name: rate-limit}, total: {requestsPerSecond: 10000000}}
",
    );
    m
}

#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub repeat: usize,
    pub path: String,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub proxy_shards: usize,
    pub duration_s: u64,
    /// The log filter the proxies ran with (their `SHOAL_LOG`), and whether it turned their
    /// access logs on.
    pub proxy_log: String,
    pub proxy_access_log: bool,
    pub phases: Vec<Phase>,
    /// Why egress was not measured, when it was not.
    pub egress_skipped: Option<String>,
}

/// A CA and a certificate for `api.bench.test` signed by it, then nginx serving HTTPS with it.
fn start_api(dir: &Path) -> std::io::Result<Started> {
    make_ca(dir, "bench", Some("api.bench.test"))?;
    start_nginx_https(
        dir,
        &format!("{API_IP}:443"),
        "location / { return 200 \"ok\\n\"; }",
    )
}

pub fn run(args: &TrafficBenchArgs) -> std::io::Result<PathBuf> {
    let machine = Machine::describe();
    let ztunnel = binary(&args.bin_dir, "ztunnel")?;
    let waypoint = binary(&args.bin_dir, "waypoint")?;
    let work = std::env::temp_dir().join(format!("shoal-traffic-bench-{}", std::process::id()));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let (api, egress_skipped) = match start_api(&work) {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e.to_string())),
    };
    std::fs::write(
        manifests.join("mesh.yaml"),
        mesh(&work.join("bench-ca.pem")),
    )?;
    let ca = work.join("mesh-ca");
    LocalCa::generate("cluster.local")
        .and_then(|c| c.write(&ca))
        .map_err(std::io::Error::other)?;
    let common = |extra: &[&str]| proxy_args(&manifests, &ca, args.proxy_shards, extra);
    let backend = ServerProcess::backend(&format!("{SERVER_IP}:8080"))?;
    let log = ProxyLog {
        filter: args.proxy_log.clone(),
        dir: work.join("logs"),
    };
    let [a, b, w] = start_ambient(&ztunnel, &waypoint, common, &[], &log)?;
    wait_listening(&format!("{SERVER_IP}:15008"));
    wait_listening(&format!("{WAYPOINT_IP}:15008"));

    let mut paths: Vec<(&str, String, bool)> = FEATURES
        .iter()
        .map(|(name, vip, _)| (*name, format!("http://{vip}:80/"), true))
        .collect();
    if api.is_some() {
        paths.push((
            "egress-waypoint-tls",
            format!("http://{EGRESS_VIP}:80/v1/x"),
            true,
        ));
        paths.push((
            "egress-direct-https",
            format!("https://{API_IP}:443/v1/x"),
            false,
        ));
    }
    let mut phases = Vec::new();
    for repeat in 0..args.repeats {
        for k in 0..paths.len() {
            let (name, url, through_mesh) = &paths[(k + repeat) % paths.len()];
            let (rps, p50, p99, requests, errors) = if *through_mesh {
                let mut l = LoadArgs::new(url.clone());
                l.protocol = Protocol::Http1;
                l.connections = 50;
                l.duration_s = args.duration_s as f64;
                l.warmup_s = 0.5;
                l.shards = 1;
                l.socks5 = Some(a.listen);
                l.source_ip = Some(IpAddr::V4(CLIENT_IP));
                l.quiet = true;
                let r = load::run(&l).map_err(std::io::Error::other)?;
                let errors = r.errors.total() + r.status.s4xx + r.status.s5xx;
                (
                    r.rps,
                    r.latency_us.p50,
                    r.latency_us.p99,
                    r.requests,
                    errors,
                )
            } else {
                // nginx's certificate is for its name; wrk does not verify, as the waypoint does.
                let (rps, p50, p99) = crate::loadgen_bench::wrk(url, 50, args.duration_s)?;
                (rps, p50, p99, (rps * args.duration_s as f64) as u64, 0)
            };
            eprintln!(
                "{name:>20} {rps:>9.0} req/s  p50 {p50:>6.0} µs  p99 {p99:>7.0} µs  errors {errors}"
            );
            phases.push(Phase {
                repeat,
                path: name.to_string(),
                requests,
                errors,
                rps,
                p50_us: p50,
                p99_us: p99,
            });
        }
    }
    drop((a, b, w, backend, api));
    let _ = std::fs::remove_dir_all(&work);
    let report = Report {
        machine,
        proxy_shards: args.proxy_shards,
        duration_s: args.duration_s,
        proxy_log: log.filter.clone(),
        proxy_access_log: log.access_log_on(),
        phases,
        egress_skipped,
    };
    let summary = summarize(&report, args);
    crate::report::write(&args.out, &report.machine, "traffic", &report, &summary)
}

fn summarize(r: &Report, args: &TrafficBenchArgs) -> String {
    let mut md = format!(
        "# Traffic management on the waypoint's request path\n\n\
         Closed loop, 50 keep-alive HTTP/1.1 connections, client → ztunnel → waypoint → ztunnel → backend, \
         {} s per phase, {} repeats interleaved (the order rotates each repeat), {} shard(s) per proxy, \
         `SHOAL_LOG={}` (access logs {}). Medians with min–max; the ratio is to the baseline in the same repeat.\n\n\
         | feature | configured with | req/s | p99 µs | req/s ÷ baseline | p99 ÷ baseline | errors |\n|---|---|---:|---:|---:|---:|---:|\n",
        args.duration_s,
        args.repeats,
        r.proxy_shards,
        r.proxy_log,
        if r.proxy_access_log { "on" } else { "off" }
    );
    let of = |path: &str| -> Vec<&Phase> { r.phases.iter().filter(|p| p.path == path).collect() };
    let baseline = of("baseline");
    let ratio = |p: &Phase, f: fn(&Phase) -> f64| {
        baseline
            .iter()
            .find(|b| b.repeat == p.repeat)
            .map_or(0.0, |b| f(p) / f(b).max(1e-9))
    };
    let mut rows: Vec<(&str, &str)> = FEATURES.iter().map(|(n, _, what)| (*n, *what)).collect();
    rows.push((
        "egress-waypoint-tls",
        "app's HTTP → ztunnel → waypoint (TLS origination) → nginx HTTPS",
    ));
    rows.push(("egress-direct-https", "wrk → nginx HTTPS directly"));
    for (name, what) in rows {
        let ps = of(name);
        if ps.is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "| {name} | {what} | {} | {} | {} | {} | {} |",
            fmt_spread(ps.iter().map(|p| p.rps).collect(), 0),
            fmt_spread(ps.iter().map(|p| p.p99_us).collect(), 0),
            fmt_spread(ps.iter().map(|p| ratio(p, |x| x.rps)).collect(), 2),
            fmt_spread(ps.iter().map(|p| ratio(p, |x| x.p99_us)).collect(), 2),
            ps.iter().map(|p| p.errors).sum::<u64>(),
        );
    }
    let egress = of("egress-waypoint-tls");
    let direct = of("egress-direct-https");
    if !egress.is_empty() && !direct.is_empty() {
        let (e, _, _) = spread(egress.iter().map(|p| p.rps).collect());
        let (d, _, _) = spread(direct.iter().map(|p| p.rps).collect());
        let _ = writeln!(
            md,
            "\nEgress through the waypoint with TLS origination runs at {:.2}× the rate of the app calling the HTTPS server itself (two load generators: this one through SOCKS5, wrk for HTTPS).",
            e / d.max(1e-9)
        );
    }
    if let Some(why) = &r.egress_skipped {
        let _ = writeln!(md, "\nEgress was not measured: {why}");
    }
    md
}
