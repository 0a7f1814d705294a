//! `shoal-bench bench waypoint`: the same HTTP load over four paths in one run — direct to the
//! backend, ambient L4 (client → SOCKS5 → ztunnel A → HBONE → ztunnel B → backend), ambient L7
//! (client → ztunnel A → HBONE → waypoint → HBONE → ztunnel B → backend) and the sidecar pair
//! (client → its sidecar (SOCKS5) → HBONE → the server's sidecar → backend): request rate at 50
//! keep-alive connections, latency at a fixed open-loop rate, CPU per request of every proxy and
//! their RSS. Real processes (the `ztunnel` and `waypoint` binaries beside this one; the sidecars
//! are `waypoint --sidecar`); repeats are interleaved.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use shoal_hbone::ca::LocalCa;

use crate::load::{self, LoadArgs, Protocol};
use crate::machine::Machine;
use crate::process::{ProxyLog, ServerProcess};
use crate::report::fmt_spread;

#[derive(Clone, Debug, clap::Args)]
pub struct WaypointBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 5)]
    pub duration_s: u64,
    /// Requests per second of the open-loop phase.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
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

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 41, 0, 1);
const SERVER_IP: &str = "127.41.0.2";
const WAYPOINT_IP: &str = "127.41.0.50";
const L4_VIP: &str = "10.252.0.1";
const L7_VIP: &str = "10.252.0.2";
const SIDECAR_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 41, 0, 11);
const SIDECAR_SERVER_IP: &str = "127.41.0.12";
const SIDECAR_VIP: &str = "10.252.0.12";

const MESH: &str = "apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bench}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 127.41.0.50}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.41.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec: {nodeName: node-b, serviceAccountName: server, containers: [{name: server, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 127.41.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench}
spec: {clusterIP: 10.252.0.1, selector: {app: server}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: server-l7, namespace: bench, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.252.0.2, selector: {app: server}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server-l7, namespace: bench}
spec:
  parentRefs: [{group: \"\", kind: Service, name: server-l7, port: 80}]
  rules: [{backendRefs: [{name: server-l7, port: 80}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-l7, namespace: bench}
spec:
  targetRefs: [{kind: Service, group: \"\", name: server-l7}]
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/bench/sa/client]}}], to: [{operation: {methods: [GET]}}]}]
---
# The sidecar pair: the same route and policy, enforced by the pods' own sidecars.
apiVersion: v1
kind: Namespace
metadata: {name: bench-sidecar}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-sidecar, labels: {app: client}}
spec: {serviceAccountName: client}
status: {podIP: 127.41.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-sidecar, labels: {app: server}}
spec: {serviceAccountName: server, containers: [{name: server, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 127.41.0.12}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench-sidecar}
spec: {clusterIP: 10.252.0.12, selector: {app: server}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: bench-sidecar}
spec:
  parentRefs: [{group: \"\", kind: Service, name: server, port: 80}]
  rules: [{backendRefs: [{name: server, port: 80}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server, namespace: bench-sidecar}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/bench-sidecar/sa/client]}}], to: [{operation: {methods: [GET]}}]}]
";

const PATHS: [&str; 4] = ["direct", "ambient-l4", "ambient-l7", "sidecar"];

#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub repeat: usize,
    /// `direct`, `ambient-l4`, `ambient-l7` or `sidecar`.
    pub path: String,
    /// `rr-50` (closed loop) or `open-<rate>` (open loop).
    pub phase: String,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU seconds of the proxies on the path per request, in microseconds.
    pub proxy_cpu_us_per_request: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub proxy_shards: usize,
    pub rate: f64,
    /// The log filter the proxies ran with (their `SHOAL_LOG`), and whether it turned their
    /// access logs on.
    pub proxy_log: String,
    pub proxy_access_log: bool,
    pub phases: Vec<Phase>,
    /// At the end of the run: ztunnel A, ztunnel B, waypoint, the two sidecars.
    pub rss_bytes: Vec<(String, u64)>,
}

pub(crate) fn binary(dir: &Option<PathBuf>, name: &str) -> std::io::Result<PathBuf> {
    let path = match dir {
        Some(d) => d.join(name),
        None => std::env::current_exe()?.with_file_name(name),
    };
    if path.exists() {
        Ok(path)
    } else {
        Err(std::io::Error::other(format!(
            "{} not found: build it with `cargo build --release -p shoal-ztunnel -p shoal-waypoint` (or pass --bin-dir)",
            path.display()
        )))
    }
}

/// The command line every shoal proxy of a benchmark shares: its manifests and CA, admin,
/// metrics and readiness on free ports, `shards` shards, not pinned (with one shard each, every
/// process would pin to the first core) — then `extra`.
pub fn proxy_args(
    manifests: &std::path::Path,
    ca: &std::path::Path,
    shards: usize,
    extra: &[&str],
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--manifests".into(),
        manifests.display().to_string(),
        "--ca".into(),
        ca.display().to_string(),
    ];
    for flag in ["--admin", "--metrics", "--readiness"] {
        v.extend([flag.to_string(), "127.0.0.1:0".to_string()]);
    }
    v.extend(["--shards".into(), shards.to_string(), "--no-pin".into()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Both nodes' ztunnels and the waypoint `bench/waypoint`, from `common`'s arguments, each
/// logging into `log` under its role's name; node A's ztunnel also gets `node_a_extra`.
pub(crate) fn start_ambient(
    ztunnel: &std::path::Path,
    waypoint: &std::path::Path,
    common: impl Fn(&[&str]) -> Vec<String>,
    node_a_extra: &[&str],
    log: &ProxyLog,
) -> std::io::Result<[ServerProcess; 3]> {
    let a = ServerProcess::start_proxy(
        ztunnel,
        &ztunnel_args(&common(node_a_extra), "node-a"),
        log,
        "ztunnel-a",
    )?;
    let b = ServerProcess::start_proxy(
        ztunnel,
        &ztunnel_args(&common(&[]), "node-b"),
        log,
        "ztunnel-b",
    )?;
    let w = ServerProcess::start_proxy(
        waypoint,
        &common(&["--gateway", "bench/waypoint"]),
        log,
        "waypoint",
    )?;
    Ok([a, b, w])
}

/// A benchmark's ztunnel for `node`: SOCKS5 and the DNS proxy on free ports, after `common`.
pub(crate) fn ztunnel_args(common: &[String], node: &str) -> Vec<String> {
    let mut v = common.to_vec();
    v.extend(
        [
            "--node",
            node,
            "--socks5",
            "127.0.0.1:0",
            "--dns-proxy",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    v
}

pub(crate) fn wait_listening(addr: &str) {
    for _ in 0..300 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn run(args: &WaypointBenchArgs) -> std::io::Result<PathBuf> {
    let machine = Machine::describe();
    let ztunnel = binary(&args.bin_dir, "ztunnel")?;
    let waypoint = binary(&args.bin_dir, "waypoint")?;
    let work = std::env::temp_dir().join(format!("shoal-waypoint-bench-{}", std::process::id()));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("mesh.yaml"), MESH)?;
    let ca = work.join("ca");
    LocalCa::generate("cluster.local")
        .and_then(|c| c.write(&ca))
        .map_err(std::io::Error::other)?;
    let common = |extra: &[&str]| proxy_args(&manifests, &ca, args.proxy_shards, extra);
    let log = ProxyLog {
        filter: args.proxy_log.clone(),
        dir: work.join("logs"),
    };
    let backend = ServerProcess::backend(&format!("{SERVER_IP}:8080"))?;
    let [a, b, w] = start_ambient(&ztunnel, &waypoint, common, &[], &log)?;
    let sidecar_backend = ServerProcess::backend(&format!("{SIDECAR_SERVER_IP}:8080"))?;
    let sidecar = |pod: &str, log_name: &str| {
        let flags = ["--sidecar", pod, "--outbound", "127.0.0.1:0"];
        ServerProcess::start_proxy(&waypoint, &common(&flags), &log, log_name)
    };
    let sc_client = sidecar("bench-sidecar/client", "sidecar-client")?;
    let sc_server = sidecar("bench-sidecar/server", "sidecar-server")?;
    let sidecar_outbound = sc_client.outbound.ok_or_else(|| {
        std::io::Error::other("the client's sidecar did not report its outbound listener")
    })?;
    wait_listening(&format!("{SERVER_IP}:15008"));
    wait_listening(&format!("{WAYPOINT_IP}:15008"));
    wait_listening(&format!("{SIDECAR_SERVER_IP}:15008"));

    let mut phases = Vec::new();
    let specs: [(String, Option<f64>); 2] = [
        ("rr-50".to_string(), None),
        (format!("open-{}", args.rate as u64), Some(args.rate)),
    ];
    for repeat in 0..args.repeats {
        for (name, rate) in &specs {
            // Interleaved, rotating which path goes first.
            for k in 0..PATHS.len() {
                let path = PATHS[(k + repeat) % PATHS.len()];
                let (target, socks5, source) = match path {
                    "direct" => (format!("http://{SERVER_IP}:8080/"), None, CLIENT_IP),
                    "ambient-l4" => (format!("http://{L4_VIP}:80/"), Some(a.listen), CLIENT_IP),
                    "ambient-l7" => (format!("http://{L7_VIP}:80/"), Some(a.listen), CLIENT_IP),
                    _ => (
                        format!("http://{SIDECAR_VIP}:80/"),
                        Some(sidecar_outbound),
                        SIDECAR_CLIENT_IP,
                    ),
                };
                let mut load_args = LoadArgs::new(target);
                load_args.protocol = Protocol::Http1;
                load_args.connections = if rate.is_some() { 16 } else { 50 };
                load_args.rate = *rate;
                load_args.duration_s = args.duration_s as f64;
                load_args.warmup_s = 0.5;
                load_args.shards = 1;
                load_args.socks5 = socks5;
                load_args.source_ip = socks5.map(|_| IpAddr::V4(source));
                load_args.quiet = true;
                let cpu = || match path {
                    "direct" => 0.0,
                    "ambient-l4" => a.cpu_seconds() + b.cpu_seconds(),
                    "ambient-l7" => a.cpu_seconds() + b.cpu_seconds() + w.cpu_seconds(),
                    _ => sc_client.cpu_seconds() + sc_server.cpu_seconds(),
                };
                let (r, [spent]) =
                    load::run_sampling(&load_args, || [cpu()]).map_err(std::io::Error::other)?;
                let errors = r.errors.total() + r.status.s4xx + r.status.s5xx;
                eprintln!(
                    "{path:>10} {name:<9} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>7.0} µs  p99.9 {:>7.0} µs  errors {errors}",
                    r.rps, r.latency_us.p50, r.latency_us.p99, r.latency_us.p999
                );
                phases.push(Phase {
                    repeat,
                    path: path.to_string(),
                    phase: name.clone(),
                    requests: r.requests,
                    errors,
                    rps: r.rps,
                    p50_us: r.latency_us.p50,
                    p99_us: r.latency_us.p99,
                    p999_us: r.latency_us.p999,
                    proxy_cpu_us_per_request: if r.requests > 0 {
                        spent * 1e6 / r.requests as f64
                    } else {
                        0.0
                    },
                });
            }
        }
    }
    let rss_bytes = vec![
        ("ztunnel-a".to_string(), a.rss_bytes()),
        ("ztunnel-b".to_string(), b.rss_bytes()),
        ("waypoint".to_string(), w.rss_bytes()),
        ("sidecar-client".to_string(), sc_client.rss_bytes()),
        ("sidecar-server".to_string(), sc_server.rss_bytes()),
    ];
    drop((a, b, w, backend, sc_client, sc_server, sidecar_backend));
    let _ = std::fs::remove_dir_all(&work);
    let report = Report {
        machine,
        proxy_shards: args.proxy_shards,
        rate: args.rate,
        proxy_log: log.filter.clone(),
        proxy_access_log: log.access_log_on(),
        phases,
        rss_bytes,
    };
    let summary = summarize(&report, args);
    crate::report::write(&args.out, &report.machine, "waypoint", &report, &summary)
}

fn summarize(r: &Report, args: &WaypointBenchArgs) -> String {
    let mut md = String::from(
        "# HTTP through ambient L7 (ztunnel → waypoint → ztunnel) vs ambient L4 vs a sidecar pair vs direct\n\n",
    );
    md.push_str(&r.machine.markdown());
    let _ = write!(
        md,
        "\nclient (`shoal-bench load`, 1 shard, HTTP/1.1 keep-alive) → direct to `shoal-bench backend`; or \
         → SOCKS5 → ztunnel A → HBONE → ztunnel B → backend (ambient-l4); or → ztunnel A → HBONE → \
         waypoint (HTTPRoute + L7 AuthorizationPolicy) → HBONE → ztunnel B → backend (ambient-l7); or → \
         the client's sidecar (SOCKS5) → HBONE → the server's sidecar (the same route and policy) → \
         backend (sidecar, shoal's sidecar mode). \
         Each proxy {} shard(s), none pinned, all on this machine's cores together. `rr-50`: closed loop, \
         50 connections; `open-{}`: open loop at {} req/s over 16 connections, latency from intended send \
         times. {} s per phase after 0.5 s warm-up, {} repeats interleaved. Medians (min–max). \
         The proxies run with `SHOAL_LOG={}`: {}.\n\n",
        r.proxy_shards,
        r.rate as u64,
        r.rate as u64,
        args.duration_s,
        args.repeats,
        r.proxy_log,
        if r.proxy_access_log {
            "access logs on (a line per connection or request, to a file)"
        } else {
            "access logs off"
        }
    );
    md.push_str("| phase | path | req/s | p50 µs | p99 µs | p99.9 µs | proxy CPU µs/req | req/s vs direct |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    let mut names: Vec<String> = r.phases.iter().map(|p| p.phase.clone()).collect();
    names.dedup();
    names.sort();
    names.dedup();
    for name in &names {
        for path in PATHS {
            let runs: Vec<&Phase> = r
                .phases
                .iter()
                .filter(|p| &p.phase == name && p.path == path)
                .collect();
            let col = |f: &dyn Fn(&Phase) -> f64| runs.iter().map(|p| f(p)).collect::<Vec<f64>>();
            let ratios: Vec<f64> = (0..args.repeats)
                .filter_map(|rep| {
                    let get = |p: &str| {
                        r.phases
                            .iter()
                            .find(|x| &x.phase == name && x.path == p && x.repeat == rep)
                            .map(|x| x.rps)
                    };
                    Some(get(path)? / get("direct")?)
                })
                .collect();
            let _ = writeln!(
                md,
                "| {name} | {path} | {} | {} | {} | {} | {} | {} |",
                fmt_spread(col(&|p| p.rps), 0),
                fmt_spread(col(&|p| p.p50_us), 0),
                fmt_spread(col(&|p| p.p99_us), 0),
                fmt_spread(col(&|p| p.p999_us), 0),
                if path == "direct" {
                    "—".to_string()
                } else {
                    fmt_spread(col(&|p| p.proxy_cpu_us_per_request), 1)
                },
                if path == "direct" {
                    String::new()
                } else {
                    fmt_spread(ratios, 2)
                },
            );
        }
    }
    let errors: u64 = r.phases.iter().map(|p| p.errors).sum();
    let rss: Vec<String> = r
        .rss_bytes
        .iter()
        .map(|(n, b)| format!("{n} {} MiB", b >> 20))
        .collect();
    let _ = writeln!(
        md,
        "\nErrors over the run: {errors}. RSS at the end: {}.",
        rss.join(", ")
    );
    md
}
