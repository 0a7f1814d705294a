//! `shoal-bench bench ztunnel`: HTTP through two shoal ztunnels (client → iptables capture, or
//! SOCKS5 → ztunnel A → HBONE → ztunnel B → backend) against the same load straight to the backend, in one run:
//! keep-alive request rate and latency at 1, 8 and 50 connections, a new connection per request,
//! and download throughput; with the CPU the two ztunnels spent per request and their RSS.
//! Beside them, as yardsticks measured in the same run, two HAProxy pairs relay each connection
//! as bytes: one over mTLS (an L4 mTLS pair without HBONE's pooled tunnels) and one in plain text
//! (what any pair of L4 proxies costs on this machine, with no encryption and no framing).
//! Every process is a real one (the `ztunnel` binary beside this one); repeats are interleaved.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use shoal_hbone::ca::LocalCa;

use crate::capture::{Capture, CaptureChoice};
use crate::load::{self, LoadArgs, Protocol};
use crate::machine::Machine;
use crate::pairs::{self, HaproxyMode, PairAddrs};
use crate::process::{CpuTimes, ExternalProcess, ProxyLog, ServerProcess};
use crate::report::fmt_spread;

#[derive(Clone, Debug, clap::Args)]
pub struct ZtunnelBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
    /// The ztunnel binary (default: beside this one; `cargo build --release -p shoal-ztunnel`).
    #[arg(long)]
    pub ztunnel: Option<PathBuf>,
    /// Shards per ztunnel.
    #[arg(long, default_value_t = 1)]
    pub ztunnel_shards: usize,
    /// Idle connections held open through both ztunnels at the end, to weigh what one costs.
    #[arg(long, default_value_t = 10_000)]
    pub idle_connections: usize,
    /// How the client reaches ztunnel: iptables capture (DNAT to its capture listener, as
    /// istio-cni does; needs root), or SOCKS5.
    #[arg(long, value_enum, default_value = "auto")]
    pub capture: CaptureChoice,
    #[arg(long, default_value = "warn", help = crate::process::PROXY_LOG_HELP)]
    pub proxy_log: String,
    /// Leave out the HAProxy TCP pairs (mTLS and plain text) measured beside the ztunnels.
    #[arg(long)]
    pub no_haproxy: bool,
    /// Do not install HAProxy when missing (its pairs are then reported unavailable).
    #[arg(long)]
    pub no_install: bool,
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 40, 0, 1);
const SERVER_IP: &str = "127.40.0.2";
const VIP: &str = "10.251.0.1";

/// The HAProxy pairs: the path's name in the report, the mode, and the last octet of its client
/// pod's address; its client side listens on the next address, its server side on the one after.
/// Each pair has a client pod of its own, captured to its client side as ztunnel's is, so that
/// NAT's cost per connection falls on every path alike and no pod reuses a port another
/// topology still holds in TIME_WAIT.
const HAPROXY_PAIRS: [(&str, HaproxyMode, u8); 2] = [
    ("haproxy-mtls", HaproxyMode::TcpMtls, 11),
    ("haproxy-plain", HaproxyMode::TcpPlain, 21),
];

const MESH: &str = "apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.40.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec: {nodeName: node-b, serviceAccountName: server, containers: [{name: server, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 127.40.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench}
spec: {clusterIP: 10.251.0.1, selector: {app: server}, ports: [{name: http, port: 80, targetPort: http}]}
";

#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub repeat: usize,
    /// `direct`, `ztunnel`, `haproxy-mtls` or `haproxy-plain`.
    pub path: String,
    /// `rr-1`, `rr-8`, `rr-50`, `new-conn-8`, `download-4`.
    pub phase: String,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub gbit_per_s: f64,
    /// CPU seconds of the path's two proxies (both ztunnels, or both sides of a pair) per
    /// request, in microseconds; 0 for direct.
    pub proxy_cpu_us_per_request: f64,
    /// The part of `proxy_cpu_us_per_request` spent in the kernel (system time): loopback TCP for
    /// every segment the proxies send and receive, io_uring, sleeping and being woken.
    pub proxy_kernel_cpu_us_per_request: f64,
    /// Context switches of the path's proxies per request (every thread's, voluntary or not):
    /// how often they slept and were woken, or were preempted.
    pub proxy_switches_per_request: f64,
    /// CPU seconds of the client (the load generator) and the backend per request, in
    /// microseconds: what the path's ends pay, beside what its proxies do.
    pub endpoints_cpu_us_per_request: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    /// The host's share of all CPU time while the phases ran.
    pub cpu_steal_percent: f64,
    pub ztunnel_shards: usize,
    /// How the client reached ztunnel A: `iptables` or `socks5`.
    pub capture: String,
    /// The log filter both ztunnels ran with (their `SHOAL_LOG`), and whether it turned their
    /// access logs on.
    pub proxy_log: String,
    pub proxy_access_log: bool,
    /// The paths measured, direct first.
    pub paths: Vec<String>,
    /// Why the HAProxy pairs are missing, when they are.
    pub haproxy_unavailable: Option<String>,
    pub phases: Vec<Phase>,
    pub ztunnel_rss_bytes: Vec<u64>,
    /// Both sides of each HAProxy pair together at the end, by path.
    pub haproxy_rss_bytes: Vec<(String, u64)>,
    pub idle: Option<Idle>,
}

impl Report {
    /// One path's run of one phase in one repeat.
    fn phase(&self, path: &str, phase: &str, repeat: usize) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| p.path == path && p.phase == phase && p.repeat == repeat)
    }

    fn repeats(&self) -> usize {
        self.phases.iter().map(|p| p.repeat + 1).max().unwrap_or(0)
    }
}

/// Memory of both ztunnels with many idle tunnelled connections open.
#[derive(Debug, Serialize)]
pub struct Idle {
    /// Connections that answered one request through both ztunnels and were then held open.
    pub connections: usize,
    pub rss_before_bytes: [u64; 2],
    pub rss_with_idle_bytes: [u64; 2],
}

struct PhaseSpec {
    name: &'static str,
    protocol: Protocol,
    connections: usize,
    path: &'static str,
}

const PHASES: [PhaseSpec; 5] = [
    PhaseSpec {
        name: "rr-1",
        protocol: Protocol::Http1,
        connections: 1,
        path: "/",
    },
    PhaseSpec {
        name: "rr-8",
        protocol: Protocol::Http1,
        connections: 8,
        path: "/",
    },
    PhaseSpec {
        name: "rr-50",
        protocol: Protocol::Http1,
        connections: 50,
        path: "/",
    },
    PhaseSpec {
        name: "new-conn-8",
        protocol: Protocol::Http1Close,
        connections: 8,
        path: "/",
    },
    PhaseSpec {
        name: "download-4",
        protocol: Protocol::Http1,
        connections: 4,
        path: "/bytes/16777216",
    },
];

fn load_args(
    target: String,
    spec: &PhaseSpec,
    duration_s: f64,
    socks5: Option<SocketAddr>,
    source: Option<IpAddr>,
) -> LoadArgs {
    let mut args = LoadArgs::new(target);
    args.protocol = spec.protocol;
    args.connections = spec.connections;
    args.duration_s = duration_s;
    args.warmup_s = 0.5;
    args.shards = 1;
    args.socks5 = socks5;
    args.source_ip = source;
    args
}

pub fn run(args: &ZtunnelBenchArgs) -> std::io::Result<PathBuf> {
    let machine = Machine::describe();
    let exe = match &args.ztunnel {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ztunnel"),
    };
    if !exe.exists() {
        return Err(std::io::Error::other(format!(
            "{} not found: build it with `cargo build --release -p shoal-ztunnel` (or pass --ztunnel)",
            exe.display()
        )));
    }
    let work = std::env::temp_dir().join(format!("shoal-ztunnel-bench-{}", std::process::id()));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("mesh.yaml"), MESH)?;
    LocalCa::generate("cluster.local")
        .and_then(|ca| ca.write(&work.join("ca")))
        .map_err(std::io::Error::other)?;
    // Not pinned: with one shard each, every process would pin to the first core and wait on the
    // others there (that halved the keep-alive rate at 8 connections); the scheduler spreads them.
    let backend = ServerProcess::backend(&format!("{SERVER_IP}:8080"))?;
    // The client pod's outbound: captured to node A's capture listener on the pod's address (as
    // in-pod ztunnel takes it on 15001), or through SOCKS5.
    let redirect = SocketAddr::new(IpAddr::V4(CLIENT_IP), 15001);
    let haproxy_pairs: Vec<(&str, HaproxyMode, IpAddr, PairAddrs)> = if args.no_haproxy {
        Vec::new()
    } else {
        HAPROXY_PAIRS
            .iter()
            .map(|&(path, mode, pod)| {
                let host = |last: u8| IpAddr::V4(Ipv4Addr::new(127, 40, 0, last));
                let addrs = PairAddrs {
                    client_listen: SocketAddr::new(host(pod + 1), 15001),
                    server_listen: SocketAddr::new(host(pod + 2), 15443),
                    app: SocketAddr::new(SERVER_IP.parse().map_err(std::io::Error::other)?, 8080),
                };
                Ok((path, mode, host(pod), addrs))
            })
            .collect::<std::io::Result<_>>()?
    };
    let mut redirects = vec![(IpAddr::V4(CLIENT_IP), redirect)];
    redirects.extend(
        haproxy_pairs
            .iter()
            .map(|(_, _, pod, addrs)| (*pod, addrs.client_listen)),
    );
    let (capture, no_capture) = Capture::choose(
        args.capture,
        &format!("{VIP}/32"),
        "127.40.0.0/16",
        &redirects,
    )?;
    if let Some(why) = &no_capture {
        eprintln!("iptables capture unavailable ({why}): the client uses SOCKS5");
    }
    let log = ProxyLog {
        filter: args.proxy_log.clone(),
        dir: work.join("logs"),
    };
    let node = |name: &str| {
        let args: Vec<String> = [
            "--manifests",
            &manifests.display().to_string(),
            "--node",
            name,
            "--ca",
            &work.join("ca").display().to_string(),
            "--socks5",
            "127.0.0.1:0",
            "--dns-proxy",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--readiness",
            "127.0.0.1:0",
            "--shards",
            &args.ztunnel_shards.to_string(),
            "--no-pin",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut args = args;
        if name == "node-a" {
            args.extend(["--redirect".to_string(), redirect.to_string()]);
        }
        ServerProcess::start_proxy(&exe, &args, &log, name)
    };
    let a = node("node-a")?;
    let b = node("node-b")?;
    // Node B serves HBONE on the server pod's address once its shards have bound it.
    let hbone: SocketAddr = format!("{SERVER_IP}:15008")
        .parse()
        .map_err(std::io::Error::other)?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(hbone).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The HAProxy pairs, with the PKI the mTLS one needs.
    let mut pair_procs: Vec<(&str, IpAddr, SocketAddr, [ExternalProcess; 2])> = Vec::new();
    let mut haproxy_unavailable = None;
    if !haproxy_pairs.is_empty() {
        let pki = work.join("pairs");
        std::fs::create_dir_all(&pki)?;
        pairs::write_pki(&pki)?;
        match pairs::ensure("haproxy", "haproxy", !args.no_install) {
            Ok(()) => {
                for (path, mode, pod, addrs) in &haproxy_pairs {
                    let (client, server) = pairs::start_haproxy_pair(&pki, addrs, *mode)?;
                    pair_procs.push((path, *pod, addrs.client_listen, [client, server]));
                }
            }
            Err(why) => {
                eprintln!("HAProxy pairs left out: {why}");
                haproxy_unavailable = Some(why);
            }
        }
    }
    let mut paths = vec!["direct", "ztunnel"];
    paths.extend(pair_procs.iter().map(|(path, ..)| *path));
    let proxy_pids = |path: &str| -> Vec<u32> {
        match path {
            "direct" => Vec::new(),
            "ztunnel" => vec![a.pid(), b.pid()],
            _ => pair_procs
                .iter()
                .filter(|(p, ..)| *p == path)
                .flat_map(|(.., sides)| sides.iter().map(ExternalProcess::pid))
                .collect(),
        }
    };
    // CPU seconds (all, and the kernel's) and context switches of the path's proxies.
    let proxy_counters = |path: &str| -> [f64; 3] {
        let pids = proxy_pids(path);
        let times = pids.iter().map(|&p| crate::process::tree_cpu_times(p));
        [
            times.clone().map(CpuTimes::total_s).sum(),
            times.map(|t| t.kernel_s).sum(),
            pids.iter()
                .map(|&p| crate::process::tree_context_switches(p) as f64)
                .sum(),
        ]
    };
    // The client (this process, which runs nothing else meanwhile) and the backend.
    let endpoints_cpu_seconds =
        || crate::process::cpu_seconds(std::process::id()).unwrap_or(0.0) + backend.cpu_seconds();
    let mut phases = Vec::new();
    let steal = crate::machine::StealWindow::start();
    for repeat in 0..args.repeats {
        for spec in &PHASES {
            // Each repeat starts the round at another path, so none always runs first.
            let mut order = paths.clone();
            order.rotate_left(repeat % paths.len());
            for path in order {
                let (target, socks5, source) = match path {
                    "direct" => (format!("http://{SERVER_IP}:8080{}", spec.path), None, None),
                    "ztunnel" => (
                        format!("http://{VIP}:80{}", spec.path),
                        capture.is_none().then_some(a.listen),
                        Some(IpAddr::V4(CLIENT_IP)),
                    ),
                    pair => {
                        let (_, pod, listen, _) = pair_procs
                            .iter()
                            .find(|(p, ..)| *p == pair)
                            .ok_or_else(|| std::io::Error::other(format!("no path {pair}")))?;
                        // Without capture the client is pointed at the pair's client side.
                        let to = if capture.is_some() {
                            format!("{VIP}:80")
                        } else {
                            listen.to_string()
                        };
                        (format!("http://{to}{}", spec.path), None, Some(*pod))
                    }
                };
                let (r, [cpu, kernel_cpu, switches, endpoints_cpu]) = load::run_sampling(
                    &load_args(target, spec, args.duration_s, socks5, source),
                    || {
                        let [cpu, kernel_cpu, switches] = proxy_counters(path);
                        [cpu, kernel_cpu, switches, endpoints_cpu_seconds()]
                    },
                )
                .map_err(std::io::Error::other)?;
                let errors = r.errors.total() + r.status.s4xx + r.status.s5xx;
                // Direct has no proxies: its proxy CPU is 0, not the host's noise.
                let proxy_us_per_request = |seconds: f64| {
                    if path != "direct" && r.requests > 0 {
                        seconds * 1e6 / r.requests as f64
                    } else {
                        0.0
                    }
                };
                eprintln!(
                    "{path:>13} {:<11} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>7.0} µs  {:>6.2} Gbit/s  errors {errors}",
                    spec.name,
                    r.rps,
                    r.latency_us.p50,
                    r.latency_us.p99,
                    r.bytes_in as f64 * 8.0 / r.duration_s / 1e9
                );
                phases.push(Phase {
                    repeat,
                    path: path.to_string(),
                    phase: spec.name.to_string(),
                    requests: r.requests,
                    errors,
                    rps: r.rps,
                    p50_us: r.latency_us.p50,
                    p99_us: r.latency_us.p99,
                    p999_us: r.latency_us.p999,
                    gbit_per_s: r.bytes_in as f64 * 8.0 / r.duration_s / 1e9,
                    proxy_cpu_us_per_request: proxy_us_per_request(cpu),
                    proxy_kernel_cpu_us_per_request: proxy_us_per_request(kernel_cpu),
                    proxy_switches_per_request: if r.requests > 0 {
                        switches / r.requests as f64
                    } else {
                        0.0
                    },
                    endpoints_cpu_us_per_request: if r.requests > 0 {
                        endpoints_cpu * 1e6 / r.requests as f64
                    } else {
                        0.0
                    },
                });
            }
        }
    }
    let cpu_steal_percent = steal.percent();
    let ztunnel_rss_bytes = vec![a.rss_bytes(), b.rss_bytes()];
    let haproxy_rss_bytes = pair_procs
        .iter()
        .map(|(path, .., sides)| {
            let bytes = sides
                .iter()
                .map(|side| crate::process::tree_rss_bytes(side.pid()))
                .sum();
            (path.to_string(), bytes)
        })
        .collect();
    let idle = if args.idle_connections > 0 {
        let rss_before_bytes = [a.rss_bytes(), b.rss_bytes()];
        let held = open_idle(a.listen, args.idle_connections)?;
        // Let both ztunnels settle (their per-connection tasks park on their reads).
        std::thread::sleep(Duration::from_millis(500));
        let rss_with_idle_bytes = [a.rss_bytes(), b.rss_bytes()];
        eprintln!(
            "idle: {} connections, ztunnel RSS {} → {} MiB and {} → {} MiB",
            held.len(),
            rss_before_bytes[0] >> 20,
            rss_with_idle_bytes[0] >> 20,
            rss_before_bytes[1] >> 20,
            rss_with_idle_bytes[1] >> 20
        );
        Some(Idle {
            connections: held.len(),
            rss_before_bytes,
            rss_with_idle_bytes,
        })
    } else {
        None
    };
    let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
    drop(pair_procs);
    drop((a, b, backend));
    let captured = capture.is_some();
    drop(capture);
    let _ = std::fs::remove_dir_all(&work);
    let report = Report {
        machine,
        cpu_steal_percent,
        ztunnel_shards: args.ztunnel_shards,
        capture: if captured { "iptables" } else { "socks5" }.into(),
        proxy_log: log.filter.clone(),
        proxy_access_log: log.access_log_on(),
        paths,
        haproxy_unavailable,
        phases,
        ztunnel_rss_bytes,
        haproxy_rss_bytes,
        idle,
    };
    let summary = summarize(&report, args);
    crate::report::write(&args.out, &report.machine, "ztunnel", &report, &summary)
}

/// Opens `count` connections from the client pod through ztunnel A's SOCKS5 listener to the
/// service, sends one request on each and reads its answer (so the tunnel is up end to end), and
/// returns them open.
fn open_idle(socks5: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpStream>> {
    use std::io::{Read, Write};
    let vip: Ipv4Addr = VIP.parse().map_err(std::io::Error::other)?;
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut tcp = load::socks5_connect_from(
            socks5,
            IpAddr::V4(CLIENT_IP),
            std::net::SocketAddrV4::new(vip, 80),
            Duration::from_secs(10),
        )
        .map_err(|e| std::io::Error::other(format!("idle connection {i}: {e}")))?;
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: server\r\n\r\n")?;
        let mut answer = [0u8; 4096];
        let n = tcp.read(&mut answer)?;
        if !answer[..n].starts_with(b"HTTP/1.1 200") {
            return Err(std::io::Error::other(format!(
                "idle connection {i}: no 200 through the tunnel"
            )));
        }
        held.push(tcp);
    }
    Ok(held)
}

/// Per repeat, `num`'s value over `den`'s in one phase (repeats where either is missing or the
/// denominator is zero are left out).
fn ratios(r: &Report, phase: &str, num: &str, den: &str, field: fn(&Phase) -> f64) -> Vec<f64> {
    let get = |path: &str, repeat: usize| r.phase(path, phase, repeat).map(field);
    (0..r.repeats())
        .filter_map(|rep| Some((get(num, rep)?, get(den, rep)?)))
        .filter(|&(_, d)| d > 0.0)
        .map(|(n, d)| n / d)
        .collect()
}

/// What issue 6 measures shoal against: Istio's ztunnel as `HBONE.md` records it, on another
/// machine of this kind (two network namespaces joined by veth), where a direct connection did
/// 190k req/s at 8 connections and 85 Gbit/s in bulk. The goal is 1.5× its rates at half its
/// CPU per request. Istio's ztunnel cannot be built here to measure it on this machine, so its
/// figures are carried over by the ratio of the two machines' direct figures, measured in the
/// same repeat: a machine that serves fewer requests direct spends more CPU on each.
const ISTIO_DIRECT_RR8_RPS: f64 = 190_000.0;
const ISTIO_DIRECT_BULK_GBIT_PER_S: f64 = 85.0;
const ISTIO_RR8_RPS: f64 = 50_000.0;
const ISTIO_NEW_CONNECTIONS_PER_S: f64 = 9_000.0;
const ISTIO_BULK_GBIT_PER_S: f64 = 24.0;
const GOAL_RATE_TIMES_ISTIO: f64 = 1.5;
const GOAL_CPU_TIMES_ISTIO: f64 = 0.5;

#[derive(Clone, Copy, PartialEq, Debug)]
enum GoalKind {
    /// Higher is better: the goal is `GOAL_RATE_TIMES_ISTIO` × Istio's.
    Rate,
    /// Lower is better: the goal is `GOAL_CPU_TIMES_ISTIO` × Istio's.
    Cpu,
}

struct IstioFigure {
    what: &'static str,
    phase: &'static str,
    istio: f64,
    kind: GoalKind,
    field: fn(&Phase) -> f64,
    scale: Scale,
}

/// Which of this run's direct figures carries Istio's machine over to this one, and Istio's own
/// direct figure for it.
#[derive(Clone, Copy)]
struct Scale {
    phase: &'static str,
    field: fn(&Phase) -> f64,
    istio_direct: f64,
}

const BY_RR8: Scale = Scale {
    phase: "rr-8",
    field: rps,
    istio_direct: ISTIO_DIRECT_RR8_RPS,
};
const BY_BULK: Scale = Scale {
    phase: "download-4",
    field: gbit_per_s,
    istio_direct: ISTIO_DIRECT_BULK_GBIT_PER_S,
};

fn rps(p: &Phase) -> f64 {
    p.rps
}
fn gbit_per_s(p: &Phase) -> f64 {
    p.gbit_per_s
}
fn proxy_cpu(p: &Phase) -> f64 {
    p.proxy_cpu_us_per_request
}

/// HBONE.md gives no direct figure for one connection or for new connections: those are carried
/// over by rr-8's.
#[rustfmt::skip]
const ISTIO_FIGURES: [IstioFigure; 6] = [
    IstioFigure { what: "req/s, 8 keep-alive connections", phase: "rr-8", istio: ISTIO_RR8_RPS, kind: GoalKind::Rate, field: rps, scale: BY_RR8 },
    IstioFigure { what: "proxies' CPU µs/req, 8 keep-alive connections", phase: "rr-8", istio: 27.0, kind: GoalKind::Cpu, field: proxy_cpu, scale: BY_RR8 },
    IstioFigure { what: "req/s, 1 keep-alive connection", phase: "rr-1", istio: 14_000.0, kind: GoalKind::Rate, field: rps, scale: BY_RR8 },
    IstioFigure { what: "new connections/s", phase: "new-conn-8", istio: ISTIO_NEW_CONNECTIONS_PER_S, kind: GoalKind::Rate, field: rps, scale: BY_RR8 },
    IstioFigure { what: "proxies' CPU µs per new connection", phase: "new-conn-8", istio: 107.0, kind: GoalKind::Cpu, field: proxy_cpu, scale: BY_RR8 },
    IstioFigure { what: "bulk Gbit/s", phase: "download-4", istio: ISTIO_BULK_GBIT_PER_S, kind: GoalKind::Rate, field: gbit_per_s, scale: BY_BULK },
];

/// One of Istio's figures against the ztunnels, per repeat (repeats missing either side are left
/// out).
#[derive(Debug, PartialEq)]
struct GoalRow {
    /// Istio's figure carried over to this machine.
    istio_here: Vec<f64>,
    goal: Vec<f64>,
    shoal: Vec<f64>,
    /// Repeats in which the ztunnels met the goal.
    met: usize,
    /// For a CPU figure, the kernel's part of the ztunnels' (their system time), per repeat.
    kernel: Vec<f64>,
    /// Repeats in which the kernel's part alone was over the goal for all of the ztunnels' CPU.
    kernel_over_goal: usize,
}

fn goal_row(r: &Report, f: &IstioFigure) -> GoalRow {
    let mut row = GoalRow {
        istio_here: Vec::new(),
        goal: Vec::new(),
        shoal: Vec::new(),
        met: 0,
        kernel: Vec::new(),
        kernel_over_goal: 0,
    };
    for rep in 0..r.repeats() {
        let (Some(direct), Some(ztunnels)) = (
            r.phase("direct", f.scale.phase, rep),
            r.phase("ztunnel", f.phase, rep),
        ) else {
            continue;
        };
        let machines = (f.scale.field)(direct) / f.scale.istio_direct;
        if machines <= 0.0 {
            continue;
        }
        let shoal = (f.field)(ztunnels);
        // A slower machine serves fewer requests and spends more CPU on each.
        let (istio_here, goal, met) = match f.kind {
            GoalKind::Rate => {
                let istio_here = f.istio * machines;
                let goal = istio_here * GOAL_RATE_TIMES_ISTIO;
                (istio_here, goal, shoal >= goal)
            }
            GoalKind::Cpu => {
                let istio_here = f.istio / machines;
                let goal = istio_here * GOAL_CPU_TIMES_ISTIO;
                let kernel = ztunnels.proxy_kernel_cpu_us_per_request;
                row.kernel.push(kernel);
                row.kernel_over_goal += usize::from(kernel > goal);
                (istio_here, goal, shoal <= goal)
            }
        };
        row.istio_here.push(istio_here);
        row.goal.push(goal);
        row.shoal.push(shoal);
        row.met += usize::from(met);
    }
    row
}

/// The section that sets the ztunnels against issue 6's goal, in this machine's terms and as
/// written.
fn goal_section(r: &Report) -> String {
    let mut md = String::from(
        "\n## Against Istio's ztunnel (issue 6's goal)\n\nIstio's ztunnel as `HBONE.md` records it \
         on another machine (direct: 190k req/s at 8 connections, 85 Gbit/s in bulk), carried over \
         to this one by the ratio of the two machines' direct figures in each repeat (rates scale \
         with it, CPU per request against it; the rr-8 ratio for the phases HBONE.md gives no \
         direct figure for). The goal: 1.5× its rates at half its CPU per request. For CPU, the \
         kernel's part of the ztunnels' too (their system time): loopback TCP for every segment \
         any pair of L4 proxies must pass (client → A, A → B, B → app, and back), io_uring, \
         sleeping and being woken.\n\n\
         | figure | Istio's ztunnel, its machine | carried over to this one | goal here | shoal's ztunnels | of it the kernel's | goal met | the kernel's part alone over the goal |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in &ISTIO_FIGURES {
        let row = goal_row(r, f);
        if row.shoal.is_empty() {
            continue;
        }
        let decimals = if f.phase == "download-4" { 2 } else { 1 };
        let (n, met) = (row.shoal.len(), row.met);
        let (kernel, kernel_over_goal) = match f.kind {
            GoalKind::Rate => ("—".to_string(), "—".to_string()),
            GoalKind::Cpu => (
                fmt_spread(row.kernel, decimals),
                format!("{} of {n} repeats", row.kernel_over_goal),
            ),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {kernel} | {met} of {n} repeats | {kernel_over_goal} |",
            f.what,
            f.istio,
            fmt_spread(row.istio_here, decimals),
            fmt_spread(row.goal, decimals),
            fmt_spread(row.shoal, decimals),
        );
    }
    let direct = |phase: &str, field: fn(&Phase) -> f64| {
        let values: Vec<f64> = r
            .phases
            .iter()
            .filter(|p| p.path == "direct" && p.phase == phase)
            .map(field)
            .collect();
        (!values.is_empty()).then(|| crate::report::median(values))
    };
    if let (Some(rr8), Some(new_conn), Some(bulk)) = (
        direct("rr-8", rps),
        direct("new-conn-8", rps),
        direct("download-4", gbit_per_s),
    ) {
        let _ = writeln!(
            md,
            "\nAs written, without carrying over, the goal is {:.0} req/s at 8 connections, {:.0} \
             new connections/s and {:.0} Gbit/s in bulk. With no proxy in the path at all, this \
             machine did {rr8:.0} req/s, {new_conn:.0} new connections/s and {bulk:.1} Gbit/s \
             (direct, medians).",
            ISTIO_RR8_RPS * GOAL_RATE_TIMES_ISTIO,
            ISTIO_NEW_CONNECTIONS_PER_S * GOAL_RATE_TIMES_ISTIO,
            ISTIO_BULK_GBIT_PER_S * GOAL_RATE_TIMES_ISTIO,
        );
    }
    md
}

fn summarize(r: &Report, args: &ZtunnelBenchArgs) -> String {
    let mut md = String::from("# HTTP through two shoal ztunnels vs direct\n\n");
    md.push_str(&r.machine.markdown());
    let _ = writeln!(
        md,
        "- CPU steal while the phases ran: {:.1}% of all CPU time (the host's share)",
        r.cpu_steal_percent
    );
    let _ = write!(
        md,
        "\nclient (`shoal-bench load`, 1 shard) → {} → ztunnel A → HBONE (mTLS, HTTP/2 CONNECT) → \
         ztunnel B → `shoal-bench backend` (1 shard); each ztunnel {} shard(s); all on this machine's \
         cores together, none pinned. The ztunnels run with `SHOAL_LOG={}`: {}. {} s per phase after 0.5 s warm-up, {} repeats interleaved. Medians (min–max).\n\n",
        if r.capture == "iptables" {
            "iptables capture (DNAT to ztunnel A's capture listener, as istio-cni installs it)"
        } else {
            "SOCKS5"
        },
        r.ztunnel_shards,
        r.proxy_log,
        if r.proxy_access_log {
            "their access logs on (a line per connection, to a file)"
        } else {
            "their access logs off"
        },
        args.duration_s,
        args.repeats
    );
    let pairs: Vec<&str> = r
        .paths
        .iter()
        .map(String::as_str)
        .filter(|p| p.starts_with("haproxy"))
        .collect();
    if !pairs.is_empty() {
        let _ = write!(
            md,
            "Yardsticks in the same run, from their own client pods {}: HAProxy pairs (one thread \
             each, logging nothing) relaying each connection as bytes, client side → server side → \
             backend. **haproxy-mtls**: over a TLS 1.3 connection of its own per client connection, \
             certificates checked both ways (ECDSA P-256), an L4 mTLS pair without HBONE's pooled, \
             multiplexed tunnels. **haproxy-plain**: in plain text, no encryption and no framing, \
             what any pair of L4 proxies costs on this machine.\n\n",
            if r.capture == "iptables" {
                "captured to their client sides the same way"
            } else {
                "connecting to their client sides"
            }
        );
    } else if let Some(why) = &r.haproxy_unavailable {
        let _ = writeln!(md, "The HAProxy pairs were left out: {why}.\n");
    }
    md.push_str(
        "The proxies' CPU is both ztunnels' or both sides' of a pair, and the kernel's part of \
                 it their system time (loopback TCP for each segment they send and receive, \
                 io_uring or epoll, sleeping and being woken); the ends' is the client's (the load \
                 generator) and the backend's. All are read at the start and the end of each \
                 measured window.\n\n",
    );
    md.push_str("| phase | path | req/s | p50 µs | p99 µs | p99.9 µs | Gbit/s | proxies' CPU µs/req | of it the kernel's | proxies' switches/req | ends' CPU µs/req | ÷ direct req/s |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for spec in &PHASES {
        for path in &r.paths {
            let runs: Vec<&Phase> = r
                .phases
                .iter()
                .filter(|p| p.phase == spec.name && &p.path == path)
                .collect();
            let col = |f: &dyn Fn(&Phase) -> f64| runs.iter().map(|p| f(p)).collect::<Vec<f64>>();
            let (cpu, kernel, switches, ratio) = if path == "direct" {
                ("—".into(), "—".into(), "—".into(), String::new())
            } else {
                (
                    fmt_spread(col(&|p| p.proxy_cpu_us_per_request), 1),
                    fmt_spread(col(&|p| p.proxy_kernel_cpu_us_per_request), 1),
                    fmt_spread(col(&|p| p.proxy_switches_per_request), 2),
                    fmt_spread(ratios(r, spec.name, path, "direct", |p| p.rps), 2),
                )
            };
            let _ = writeln!(
                md,
                "| {} | {path} | {} | {} | {} | {} | {} | {cpu} | {kernel} | {switches} | {} | {ratio} |",
                spec.name,
                fmt_spread(col(&|p| p.rps), 0),
                fmt_spread(col(&|p| p.p50_us), 0),
                fmt_spread(col(&|p| p.p99_us), 0),
                fmt_spread(col(&|p| p.p999_us), 0),
                fmt_spread(col(&|p| p.gbit_per_s), 2),
                fmt_spread(col(&|p| p.endpoints_cpu_us_per_request), 1),
            );
        }
    }
    if !pairs.is_empty() {
        md.push_str(
            "\n## The ztunnels against the HAProxy pairs\n\nWithin each repeat: the ztunnels' \
             rate over the pair's (above 1: the ztunnels are faster), and the ztunnels' CPU per \
             request over the pair's (below 1: the ztunnels spend less).\n\n| phase |",
        );
        for pair in &pairs {
            let _ = write!(md, " rate ÷ {pair} | CPU ÷ {pair} |");
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|---:|".repeat(pairs.len()));
        md.push('\n');
        for spec in &PHASES {
            let _ = write!(md, "| {} |", spec.name);
            for pair in &pairs {
                let _ = write!(
                    md,
                    " {} | {} |",
                    fmt_spread(ratios(r, spec.name, "ztunnel", pair, |p| p.rps), 2),
                    fmt_spread(
                        ratios(r, spec.name, "ztunnel", pair, |p| p
                            .proxy_cpu_us_per_request),
                        2
                    ),
                );
            }
            md.push('\n');
        }
    }
    md.push_str(&goal_section(r));
    let errors: u64 = r.phases.iter().map(|p| p.errors).sum();
    let _ = writeln!(
        md,
        "\nErrors over the run: {errors}. ztunnel RSS at the end: {} MiB and {} MiB.",
        r.ztunnel_rss_bytes.first().copied().unwrap_or(0) >> 20,
        r.ztunnel_rss_bytes.get(1).copied().unwrap_or(0) >> 20
    );
    for (path, bytes) in &r.haproxy_rss_bytes {
        let _ = writeln!(
            md,
            "{path}'s two sides together at the end: {} MiB.",
            bytes >> 20
        );
    }
    if let Some(idle) = &r.idle {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let grown: u64 = (0..2)
            .map(|i| idle.rss_with_idle_bytes[i].saturating_sub(idle.rss_before_bytes[i]))
            .sum();
        let _ = writeln!(
            md,
            "\n## Idle connections\n\n{} connections from the client pod through both ztunnels to the service, \
             each answered once and then held open: ztunnel A {:.1} → {:.1} MiB, ztunnel B {:.1} → {:.1} MiB RSS, \
             {:.1} KiB per connection for both together.",
            idle.connections,
            mib(idle.rss_before_bytes[0]),
            mib(idle.rss_with_idle_bytes[0]),
            mib(idle.rss_before_bytes[1]),
            mib(idle.rss_with_idle_bytes[1]),
            grown as f64 / 1024.0 / idle.connections.max(1) as f64
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(repeat: usize, path: &str, name: &str, rps: f64, cpu: f64) -> Phase {
        Phase {
            repeat,
            path: path.into(),
            phase: name.into(),
            requests: 1,
            errors: 0,
            rps,
            p50_us: 0.0,
            p99_us: 0.0,
            p999_us: 0.0,
            gbit_per_s: 0.0,
            proxy_cpu_us_per_request: cpu,
            proxy_kernel_cpu_us_per_request: cpu * 0.8,
            proxy_switches_per_request: 0.0,
            endpoints_cpu_us_per_request: 0.0,
        }
    }

    fn report(phases: Vec<Phase>) -> Report {
        Report {
            machine: Machine::describe(),
            cpu_steal_percent: 0.0,
            ztunnel_shards: 1,
            capture: "iptables".into(),
            proxy_log: "warn".into(),
            proxy_access_log: false,
            paths: ["direct", "ztunnel", "haproxy-mtls", "haproxy-plain"]
                .map(String::from)
                .to_vec(),
            haproxy_unavailable: None,
            phases,
            ztunnel_rss_bytes: vec![0, 0],
            haproxy_rss_bytes: Vec::new(),
            idle: None,
        }
    }

    #[test]
    fn ratios_pair_each_repeat_with_its_own_and_skip_what_is_missing() {
        let r = report(vec![
            phase(0, "ztunnel", "rr-1", 200.0, 30.0),
            phase(0, "haproxy-plain", "rr-1", 100.0, 60.0),
            phase(1, "haproxy-plain", "rr-1", 400.0, 20.0),
            phase(1, "ztunnel", "rr-1", 600.0, 10.0),
            // Repeat 2 has no pair to divide by, repeat 3 a zero.
            phase(2, "ztunnel", "rr-1", 999.0, 1.0),
            phase(3, "ztunnel", "rr-1", 999.0, 1.0),
            phase(3, "haproxy-plain", "rr-1", 0.0, 0.0),
            // Another phase and another pair must not mix in.
            phase(0, "haproxy-plain", "rr-8", 1.0, 1.0),
            phase(0, "haproxy-mtls", "rr-1", 1.0, 1.0),
        ]);
        type Field = fn(&Phase) -> f64;
        let table: [(&str, &str, Field, Vec<f64>); 4] = [
            ("ztunnel", "haproxy-plain", |p| p.rps, vec![2.0, 1.5]),
            (
                "ztunnel",
                "haproxy-plain",
                |p| p.proxy_cpu_us_per_request,
                vec![0.5, 0.5],
            ),
            (
                "haproxy-plain",
                "ztunnel",
                |p| p.rps,
                vec![0.5, 400.0 / 600.0, 0.0],
            ),
            ("ztunnel", "haproxy-mtls", |p| p.rps, vec![200.0]),
        ];
        for (num, den, field, want) in table {
            assert_eq!(ratios(&r, "rr-1", num, den, field), want, "{num} ÷ {den}");
        }
    }

    #[test]
    fn the_summary_sets_the_ztunnels_against_each_pair() {
        let mut phases = Vec::new();
        for spec in &PHASES {
            for (repeat, scale) in [(0, 1.0), (1, 2.0)] {
                phases.extend([
                    phase(repeat, "direct", spec.name, 1000.0, 0.0),
                    phase(repeat, "ztunnel", spec.name, 300.0 * scale, 20.0),
                    phase(repeat, "haproxy-mtls", spec.name, 200.0, 40.0),
                    phase(repeat, "haproxy-plain", spec.name, 300.0, 20.0 * scale),
                ]);
            }
        }
        let args = ZtunnelBenchArgs {
            repeats: 2,
            duration_s: 1.0,
            ztunnel: None,
            ztunnel_shards: 1,
            idle_connections: 0,
            capture: CaptureChoice::Auto,
            proxy_log: "warn".into(),
            no_haproxy: false,
            no_install: false,
            out: PathBuf::new(),
        };
        let md = summarize(&report(phases), &args);
        // ztunnel ÷ mTLS pair: rate 1.5 and 3.0, CPU 0.5; ÷ plain pair: rate 1 and 2, CPU 1 and 0.5.
        assert!(
            md.contains("| rr-8 | 2.25 (1.50–3.00) | 0.50 (0.50–0.50) | 1.50 (1.00–2.00) | 0.75 (0.50–1.00) |"),
            "{md}"
        );
        assert!(
            md.contains("| download-4 | haproxy-plain | 300 (300–300) |"),
            "{md}"
        );
        assert!(md.contains("| rr-1 | ztunnel | 450 (300–600) |"), "{md}");
        assert!(md.contains("0.45 (0.30–0.60) |\n"), "{md}");
    }

    #[test]
    fn istio_figures_are_carried_over_by_each_repeats_direct_figure() {
        let bulk = |repeat, path: &str, gbit| Phase {
            gbit_per_s: gbit,
            ..phase(repeat, path, "download-4", 1.0, 1.0)
        };
        let r = report(vec![
            // Repeat 0: this machine does half Istio's direct; repeat 1: the same.
            phase(0, "direct", "rr-8", ISTIO_DIRECT_RR8_RPS / 2.0, 0.0),
            phase(0, "ztunnel", "rr-8", 40_000.0, 100.0),
            phase(1, "direct", "rr-8", ISTIO_DIRECT_RR8_RPS, 0.0),
            phase(1, "ztunnel", "rr-8", 40_000.0, 20.0),
            // Repeat 2 has no direct figure, repeat 3 a zero one: both left out.
            phase(2, "ztunnel", "rr-8", 1.0, 1.0),
            phase(3, "direct", "rr-8", 0.0, 0.0),
            phase(3, "ztunnel", "rr-8", 1.0, 1.0),
            phase(0, "ztunnel", "rr-1", 10_000.0, 1.0),
            bulk(0, "direct", ISTIO_DIRECT_BULK_GBIT_PER_S / 2.0),
            bulk(0, "ztunnel", 20.0),
        ]);
        let row = |what: &str| {
            let f = ISTIO_FIGURES
                .iter()
                .find(|f| f.what == what)
                .expect("a figure");
            goal_row(&r, f)
        };
        let table = [
            (
                "req/s, 8 keep-alive connections",
                vec![25_000.0, 50_000.0],
                vec![37_500.0, 75_000.0],
                vec![40_000.0, 40_000.0],
                1,
                (vec![], 0),
            ),
            // CPU per request scales against the machine: half as fast, twice the CPU. The
            // kernel's part (0.8 of it here) alone is over the goal in both repeats.
            (
                "proxies' CPU µs/req, 8 keep-alive connections",
                vec![54.0, 27.0],
                vec![27.0, 13.5],
                vec![100.0, 20.0],
                0,
                (vec![80.0, 16.0], 2),
            ),
            // One connection has no direct figure of Istio's: carried over by rr-8's.
            (
                "req/s, 1 keep-alive connection",
                vec![7_000.0],
                vec![10_500.0],
                vec![10_000.0],
                0,
                (vec![], 0),
            ),
            (
                "bulk Gbit/s",
                vec![12.0],
                vec![18.0],
                vec![20.0],
                1,
                (vec![], 0),
            ),
            ("new connections/s", vec![], vec![], vec![], 0, (vec![], 0)),
        ];
        for (what, istio_here, goal, shoal, met, (kernel, kernel_over_goal)) in table {
            let want = GoalRow {
                istio_here,
                goal,
                shoal,
                met,
                kernel,
                kernel_over_goal,
            };
            assert_eq!(row(what), want, "{what}");
        }
        let md = goal_section(&r);
        assert!(
            md.contains("| req/s, 8 keep-alive connections | 50000 | 37500.0 (25000.0–50000.0) | 56250.0 (37500.0–75000.0) | 40000.0 (40000.0–40000.0) | — | 1 of 2 repeats | — |"),
            "{md}"
        );
        assert!(
            md.contains("| proxies' CPU µs/req, 8 keep-alive connections | 27 | 40.5 (27.0–54.0) | 20.2 (13.5–27.0) | 60.0 (20.0–100.0) | 48.0 (16.0–80.0) | 0 of 2 repeats | 2 of 2 repeats |"),
            "{md}"
        );
        assert!(!md.contains("| new connections/s |"), "{md}");
    }
}
