//! `shoal-bench bench compare`: every way a request can cross a mesh on one machine, side by
//! side, with the same backend and the same load — direct; ambient L4 (two ztunnels); ambient L7
//! (ztunnel → waypoint → ztunnel); shoal's sidecar mode; sidecar pairs of nginx and of HAProxy
//! with mTLS between the pair; and any proxy the user names with `--proxy`.
//!
//! Per topology: requests per second at saturation (closed loop, 50 connections), latency
//! percentiles at a fixed open-loop rate, new connections per second, bulk throughput, CPU per
//! request and RSS of every proxy process (from /proc), and what N pods would cost in memory
//! (a sidecar per pod, or a ztunnel per node and one waypoint). Repeats are interleaved; medians
//! with min–max; ratios to direct and to shoal's sidecar mode are the headline. Output:
//! `bench-results/<date>-<commit>/` with `compare.json`, `summary.md` and three SVG charts.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use shoal_hbone::ca::LocalCa;

use crate::capture::{Capture, CaptureChoice};
use crate::charts::{self, Bar, Line};
use crate::load::{self, LoadArgs, Protocol};
use crate::machine::{CpuTicks, Machine};
use crate::pairs::{self, ExtraProxy, PairAddrs};
use crate::process::{
    tree_context_switches, tree_cpu_times, tree_peak_rss_bytes, tree_rss_bytes, CpuTimes,
    ExternalProcess, ProxyLog, ServerProcess,
};
use crate::report::{fmt_spread, spread};
use crate::waypoint_bench::{binary, proxy_args, start_ambient, wait_listening};

/// How long every proxy is watched idle, after the phases, for its wake-ups.
const IDLE_SAMPLE_S: u64 = 2;

#[derive(Clone, Debug, clap::Args)]
pub struct CompareArgs {
    /// Repeats of every phase (interleaved: each repeat runs every topology, in a rotated order).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Measured seconds per phase and topology.
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
    /// Unmeasured warm-up before each phase, in seconds.
    #[arg(long, default_value_t = 0.5)]
    pub warmup_s: f64,
    /// Requests per second of the open-loop latency phase.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Size of one response in the bulk phase, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub bulk_bytes: usize,
    /// Pod counts for the resource totals (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    pub pods: Vec<usize>,
    /// Pods per node in the ambient resource totals (one ztunnel per node).
    #[arg(long, default_value_t = 10)]
    pub pods_per_node: usize,
    /// Another proxy to put beside the others: `NAME=COMMAND`, run with `sh -c`; `{listen}` is
    /// the address it must serve plain HTTP on, `{upstream}` the backend, `{dir}` a scratch
    /// directory. Repeatable.
    #[arg(long = "proxy")]
    pub proxies: Vec<ExtraProxy>,
    /// Measure only these topologies besides `direct` (comma-separated: ambient-l4, ambient-l7,
    /// sidecar, nginx, haproxy, or a `--proxy` name); all of them when not given.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Run only these phases (comma-separated: rr-50, open, new-conn, bulk); all of them when
    /// not given. For focused work: a partial run's summary leaves the other columns at zero.
    #[arg(long, value_delimiter = ',')]
    pub phases: Vec<String>,
    /// Do not install nginx or HAProxy when missing (their pairs are then reported unavailable).
    #[arg(long)]
    pub no_install: bool,
    /// The run's pods use 127.BLOCK.0.0/16 and its services 10.BLOCK.0.0/16.
    #[arg(long, default_value_t = 42)]
    pub address_block: u8,
    /// Directory holding the `ztunnel` and `waypoint` binaries (default: beside this one).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Shards per shoal proxy (nginx and HAProxy get as many workers/threads).
    #[arg(long, default_value_t = 1)]
    pub proxy_shards: usize,
    /// How the client reaches ztunnel and the client's sidecar: iptables capture (DNAT to their
    /// capture listeners, as istio-cni does; needs root), or SOCKS5.
    #[arg(long, value_enum, default_value = "auto")]
    pub capture: CaptureChoice,
    #[arg(long, default_value = "warn", help = crate::process::PROXY_LOG_HELP)]
    pub proxy_log: String,
    /// The scheduling policy of shoal's proxies' shard threads (their `--sched-policy`); nginx
    /// and HAProxy run under the kernel's default. `batch` suits cores without CPU-bound work
    /// beside the mesh, which this run's are not always: see `shoal_runtime::SchedPolicy`.
    #[arg(long, value_enum, default_value_t = shoal_runtime::SchedPolicy::Normal)]
    pub proxy_sched_policy: shoal_runtime::SchedPolicy,
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// How a topology's proxies scale with the pods of a mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Deployment {
    /// No proxy.
    None,
    /// One proxy per pod (the pair is two pods' proxies).
    PerPod,
    /// One ztunnel per node, plus one waypoint when `waypoint` is set.
    PerNode { waypoint: bool },
    /// Unknown (a proxy the user named): measured, not scaled.
    AsMeasured,
}

struct Topology {
    name: String,
    /// The base URL the load generator targets.
    target: String,
    socks5: Option<SocketAddr>,
    source: Option<IpAddr>,
    /// The proxies on the path: (role, pid).
    proxies: Vec<(String, u32)>,
    deployment: Deployment,
}

impl Topology {
    /// Each proxy's CPU so far, in the order of `proxies`.
    fn cpu_times(&self) -> Vec<CpuTimes> {
        self.proxies
            .iter()
            .map(|(_, pid)| tree_cpu_times(*pid))
            .collect()
    }
}

/// One measured phase of one topology in one repeat.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub repeat: usize,
    pub topology: String,
    /// `rr-50`, `open-<rate>`, `new-conn` or `bulk`.
    pub phase: String,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU seconds of the proxies on the path per request, in microseconds.
    pub proxy_cpu_us_per_request: f64,
    /// The same, proxy by proxy, in the order of the path.
    pub proxies: Vec<ProxyCpu>,
    /// The share of the machine's CPU time no thread used while the phase was measured, in
    /// percent (`CpuTicks::idle`).
    pub idle_percent: f64,
}

/// One proxy's CPU over a phase, per request.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyCpu {
    pub role: String,
    pub cpu_us_per_request: f64,
    /// Its system time: loopback TCP for the segments it sends and receives, io_uring or epoll,
    /// sleeping and being woken.
    pub kernel_cpu_us_per_request: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProxyMemory {
    pub topology: String,
    pub role: String,
    /// Processes (a proxy and the ones it started, such as nginx's worker).
    pub processes: usize,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// Context switches a second of all its threads while no load ran (after the phases): how
    /// often an idle proxy is woken.
    pub idle_wakeups_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Total {
    pub topology: String,
    pub pods: usize,
    pub proxies: usize,
    pub rss_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub proxy_shards: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub repeats: usize,
    pub bulk_bytes: usize,
    pub pods_per_node: usize,
    /// How the client reached shoal's outbound proxies: `iptables` or `socks5`.
    pub capture: String,
    /// The log filter shoal's proxies ran with (their `SHOAL_LOG`).
    pub proxy_log: String,
    /// The scheduling policy of shoal's proxies' shards.
    pub proxy_sched_policy: shoal_runtime::SchedPolicy,
    /// Whether that filter turned their access logs on, and the lines they had written by the
    /// end of the run.
    pub proxy_access_log: bool,
    pub proxy_access_log_lines: u64,
    /// The share of all CPU time the host took from this machine while the phases ran: what
    /// moves absolute figures between runs (ratios within a repeat move much less).
    pub cpu_steal_percent: f64,
    pub topologies: Vec<(String, Deployment)>,
    /// Topologies that could not run, and why.
    pub unavailable: Vec<(String, String)>,
    pub phases: Vec<Phase>,
    /// At the end of the run.
    pub memory: Vec<ProxyMemory>,
    pub totals: Vec<Total>,
}

/// The phases, in the order they run: (name, protocol, connections, open-loop rate, path).
fn phase_specs(args: &CompareArgs) -> Vec<(String, Protocol, usize, Option<f64>, String)> {
    vec![
        ("rr-50".into(), Protocol::Http1, 50, None, "/".into()),
        (
            format!("open-{}", args.rate as u64),
            Protocol::Http1,
            16,
            Some(args.rate),
            "/".into(),
        ),
        (
            "new-conn".into(),
            Protocol::Http1Close,
            16,
            None,
            "/".into(),
        ),
        (
            "bulk".into(),
            Protocol::Http1,
            4,
            None,
            format!("/bytes/{}", args.bulk_bytes),
        ),
    ]
}

/// Whether the phase `name` is the one asked for as `asked`: its name, or its kind (`open` for
/// `open-1000`).
fn phase_is(name: &str, asked: &str) -> bool {
    name == asked
        || name
            .strip_prefix(asked)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// The pods, services, waypoint, route and policies of the run, in 127.B.0.0/16 and 10.B.0.0/16,
/// plus `filler` pods and services on another node so that every proxy holds a mesh that size.
fn mesh(b: u8, filler: usize) -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: bench, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: bench}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
  addresses: [{{type: IPAddress, value: 127.{b}.0.50}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: bench, labels: {{app: client}}}}
spec: {{nodeName: node-a, serviceAccountName: client}}
status: {{podIP: 127.{b}.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-l7, namespace: bench, labels: {{app: client}}}}
spec: {{nodeName: node-a, serviceAccountName: client}}
status: {{podIP: 127.{b}.0.3}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: bench, labels: {{app: server}}}}
spec: {{nodeName: node-b, serviceAccountName: server, containers: [{{name: server, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: 127.{b}.0.2}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: bench}}
spec: {{clusterIP: 10.{b}.0.1, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: server-l7, namespace: bench, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: 10.{b}.0.2, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: server-l7, namespace: bench}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: server-l7, port: 80}}]
  rules: [{{backendRefs: [{{name: server-l7, port: 80}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-l7, namespace: bench}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: server-l7}}]
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/bench/sa/client]}}}}], to: [{{operation: {{methods: [GET]}}}}]}}]
---
apiVersion: v1
kind: Namespace
metadata: {{name: bench-sidecar}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: bench-sidecar, labels: {{app: client}}}}
spec: {{serviceAccountName: client}}
status: {{podIP: 127.{b}.0.11}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: bench-sidecar, labels: {{app: server}}}}
spec: {{serviceAccountName: server, containers: [{{name: server, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: 127.{b}.0.12}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: bench-sidecar}}
spec: {{clusterIP: 10.{b}.0.12, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: server, namespace: bench-sidecar}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: server, port: 80}}]
  rules: [{{backendRefs: [{{name: server, port: 80}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server, namespace: bench-sidecar}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/bench-sidecar/sa/client]}}}}], to: [{{operation: {{methods: [GET]}}}}]}}]
---
apiVersion: v1
kind: Namespace
metadata: {{name: filler, labels: {{istio.io/dataplane-mode: ambient}}}}
"
    );
    for i in 0..filler {
        let (hi, lo) = (1 + i / 250, 1 + i % 250);
        let _ = write!(
            y,
            "---
apiVersion: v1
kind: Pod
metadata: {{name: pod-{i}, namespace: filler, labels: {{app: app-{i}}}}}
spec: {{nodeName: node-z, serviceAccountName: sa-{i}}}
status: {{podIP: 127.{b}.{hi}.{lo}}}
---
apiVersion: v1
kind: Service
metadata: {{name: app-{i}, namespace: filler}}
spec: {{clusterIP: 10.{b}.{hi}.{lo}, selector: {{app: app-{i}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"
        );
    }
    y
}

/// An nginx or HAProxy sidecar pair's place in the run's addresses.
struct PairSide {
    program: &'static str,
    /// The Debian package that installs `program`.
    package: &'static str,
    /// The last octet of the client side's address (and of its service address).
    host: u8,
    /// The client pod whose connections are captured to the client side.
    pod: IpAddr,
    addrs: PairAddrs,
}

pub fn run(args: &CompareArgs) -> std::io::Result<PathBuf> {
    if args.repeats == 0 || args.duration_s <= 0.0 || args.pods_per_node == 0 {
        return Err(std::io::Error::other(
            "--repeats, --duration-s and --pods-per-node must be positive",
        ));
    }
    let specs = phase_specs(args);
    if let Some(p) = args
        .phases
        .iter()
        .find(|p| !specs.iter().any(|(name, ..)| phase_is(name, p)))
    {
        return Err(std::io::Error::other(format!(
            "--phases: no phase is called {p:?} (rr-50, open, new-conn, bulk)"
        )));
    }
    let machine = Machine::describe();
    let b = args.address_block;
    let ip = |host: &str| -> String { format!("127.{b}.{host}") };
    let sock = |host: &str, port: u16| -> std::io::Result<SocketAddr> {
        format!("127.{b}.{host}:{port}")
            .parse()
            .map_err(std::io::Error::other)
    };
    let ztunnel = binary(&args.bin_dir, "ztunnel")?;
    let waypoint = binary(&args.bin_dir, "waypoint")?;
    let work = std::env::temp_dir().join(format!("shoal-compare-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(work.clone());
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let filler = args.pods.iter().copied().max().unwrap_or(0);
    std::fs::write(manifests.join("mesh.yaml"), mesh(b, filler))?;
    let ca = work.join("ca");
    LocalCa::generate("cluster.local")
        .and_then(|c| c.write(&ca))
        .map_err(std::io::Error::other)?;
    let sched_policy = args.proxy_sched_policy.to_string();
    let common = |extra: &[&str]| {
        let mut v = proxy_args(&manifests, &ca, args.proxy_shards.max(1), extra);
        v.extend(["--sched-policy".to_string(), sched_policy.clone()]);
        v
    };
    let log = ProxyLog {
        filter: args.proxy_log.clone(),
        dir: work.join("logs"),
    };

    // The apps: one for every topology whose server proxy sends to the server pod's address, one
    // at the sidecar pod's own address.
    let app = sock("0.2", 8080)?;
    let _backend = ServerProcess::backend(&app.to_string())?;
    let _sidecar_backend = ServerProcess::backend(&format!("{}:8080", ip("0.12")))?;

    let mut topologies: Vec<Topology> = vec![Topology {
        name: "direct".into(),
        target: format!("http://{app}"),
        socks5: None,
        source: None,
        proxies: Vec::new(),
        deployment: Deployment::None,
    }];
    let mut unavailable: Vec<(String, String)> = Vec::new();

    // The client pods' outbound: captured by iptables to their proxies' capture listeners (pod
    // address, port 15001, as in-pod ztunnel and Istio's sidecar take it), or through SOCKS5.
    //
    // Each topology has a client pod of its own. Sharing one between services would hand ztunnel's
    // listener a connection from a port whose last one, to the other service, it still holds in
    // TIME_WAIT: the client's kernel picks ports without knowing they are rewritten, and the SYN,
    // numbered for another connection, is refused until retransmitted a second later.
    let client_ip: IpAddr = ip("0.1").parse().map_err(std::io::Error::other)?;
    let l7_client_ip: IpAddr = ip("0.3").parse().map_err(std::io::Error::other)?;
    let sc_client_ip: IpAddr = ip("0.11").parse().map_err(std::io::Error::other)?;
    let za_redirect = SocketAddr::new(client_ip, 15001);
    let sc_redirect = SocketAddr::new(sc_client_ip, 15001);
    // The pairs' client sides are captured the same way, to their listeners, as they would be as
    // sidecars: NAT's cost per connection then falls on every pair alike. Each pair's client side
    // listens on host 21 + 10k, its server side on the next host, its client pod on the one before.
    let mut pair_sides = Vec::new();
    for (k, (program, package)) in [("nginx", "nginx-light"), ("haproxy", "haproxy")]
        .into_iter()
        .enumerate()
    {
        let host = 21 + 10 * k as u8;
        let pod: IpAddr = ip(&format!("0.{}", host - 1))
            .parse()
            .map_err(std::io::Error::other)?;
        let addrs = PairAddrs {
            client_listen: sock(&format!("0.{host}"), 15001)?,
            server_listen: sock(&format!("0.{}", host + 1), 15443)?,
            app,
        };
        pair_sides.push(PairSide {
            program,
            package,
            host,
            pod,
            addrs,
        });
    }
    let mut redirects = vec![
        (client_ip, za_redirect),
        (l7_client_ip, za_redirect),
        (sc_client_ip, sc_redirect),
    ];
    redirects.extend(
        pair_sides
            .iter()
            .map(|side| (side.pod, side.addrs.client_listen)),
    );
    let (capture, no_capture) = Capture::choose(
        args.capture,
        &format!("10.{b}.0.0/16"),
        &format!("127.{b}.0.0/16"),
        &redirects,
    )?;
    if let Some(why) = &no_capture {
        eprintln!("iptables capture unavailable ({why}): the clients use SOCKS5");
    }
    let captured = capture.is_some();

    // Ambient: two ztunnels and the waypoint.
    let redirect = za_redirect.to_string();
    let [za, zb, wp] = start_ambient(
        &ztunnel,
        &waypoint,
        common,
        &["--redirect", &redirect],
        &log,
    )?;
    wait_listening(&format!("{}:15008", ip("0.2")));
    wait_listening(&format!("{}:15008", ip("0.50")));
    let za_outbound = (!captured).then_some(za.listen);
    topologies.push(Topology {
        name: "ambient-l4".into(),
        target: format!("http://10.{b}.0.1:80"),
        socks5: za_outbound,
        source: Some(client_ip),
        proxies: vec![
            ("ztunnel-a".into(), za.pid()),
            ("ztunnel-b".into(), zb.pid()),
        ],
        deployment: Deployment::PerNode { waypoint: false },
    });
    topologies.push(Topology {
        name: "ambient-l7".into(),
        target: format!("http://10.{b}.0.2:80"),
        socks5: za_outbound,
        source: Some(l7_client_ip),
        proxies: vec![
            ("ztunnel-a".into(), za.pid()),
            ("ztunnel-b".into(), zb.pid()),
            ("waypoint".into(), wp.pid()),
        ],
        deployment: Deployment::PerNode { waypoint: true },
    });

    // shoal's sidecar mode: the baseline.
    let sidecar = |pod: &str, extra: &[&str]| {
        let mut flags = vec!["--sidecar", pod, "--outbound", "127.0.0.1:0"];
        flags.extend_from_slice(extra);
        let name = format!("sidecar-{}", pod.rsplit('/').next().unwrap_or(pod));
        ServerProcess::start_proxy(&waypoint, &common(&flags), &log, &name)
    };
    let sc_client = sidecar(
        "bench-sidecar/client",
        &["--redirect", &sc_redirect.to_string()],
    )?;
    let sc_server = sidecar("bench-sidecar/server", &[])?;
    let sc_outbound = sc_client.outbound.ok_or_else(|| {
        std::io::Error::other("the client's sidecar did not report its outbound listener")
    })?;
    wait_listening(&format!("{}:15008", ip("0.12")));
    if captured {
        wait_listening(&za_redirect.to_string());
        wait_listening(&sc_redirect.to_string());
    }
    topologies.push(Topology {
        name: "sidecar".into(),
        target: format!("http://10.{b}.0.12:80"),
        socks5: (!captured).then_some(sc_outbound),
        source: Some(sc_client_ip),
        proxies: vec![
            ("sidecar-client".into(), sc_client.pid()),
            ("sidecar-server".into(), sc_server.pid()),
        ],
        deployment: Deployment::PerPod,
    });

    // Pairs of proxies people run as sidecars today.
    let mut externals: Vec<ExternalProcess> = Vec::new();
    let pki = work.join("pairs");
    std::fs::create_dir_all(&pki)?;
    pairs::write_pki(&pki)?;
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    for side in pair_sides.into_iter().filter(|side| wanted(side.program)) {
        let PairSide {
            program,
            package,
            host,
            pod,
            addrs,
        } = side;
        let started = pairs::ensure(program, package, !args.no_install)
            .and_then(|()| pairs::start_pair(program, &pki, &addrs).map_err(|e| e.to_string()));
        match started {
            Ok((client, server)) => {
                let target = if captured {
                    format!("http://10.{b}.0.{host}:80")
                } else {
                    format!("http://{}", addrs.client_listen)
                };
                topologies.push(Topology {
                    name: program.into(),
                    target,
                    socks5: None,
                    source: Some(pod),
                    proxies: vec![
                        (format!("{program}-client"), client.pid()),
                        (format!("{program}-server"), server.pid()),
                    ],
                    deployment: Deployment::PerPod,
                });
                externals.extend([client, server]);
            }
            Err(why) => {
                eprintln!("{program}: unavailable: {why}");
                unavailable.push((program.to_string(), why));
            }
        }
    }
    for (k, extra) in args
        .proxies
        .iter()
        .enumerate()
        .filter(|(_, p)| wanted(&p.name))
    {
        let listen = sock(&format!("0.{}", 100 + k), 15001)?;
        match extra.start(listen, app, &work.join("proxy").join(&extra.name)) {
            Ok(p) => {
                topologies.push(Topology {
                    name: extra.name.clone(),
                    target: format!("http://{listen}"),
                    socks5: None,
                    source: None,
                    proxies: vec![(extra.name.clone(), p.pid())],
                    deployment: Deployment::AsMeasured,
                });
                externals.push(p);
            }
            Err(e) => {
                eprintln!("{}: unavailable: {e}", extra.name);
                unavailable.push((extra.name.clone(), e.to_string()));
            }
        }
    }

    let steal = crate::machine::StealWindow::start();
    // shoal's own proxies start either way (a second each); only what was asked for is measured.
    topologies.retain(|t| t.name == "direct" || wanted(&t.name));
    let phases = measure(args, &topologies)?;
    let cpu_steal_percent = steal.percent();

    // Every proxy idles at once now: one window serves them all, in the order of the loop below.
    let pids: Vec<u32> = topologies
        .iter()
        .flat_map(|t| t.proxies.iter().map(|(_, pid)| *pid))
        .collect();
    let before: Vec<u64> = pids.iter().map(|p| tree_context_switches(*p)).collect();
    std::thread::sleep(Duration::from_secs(IDLE_SAMPLE_S));
    let mut idle_wakeups_per_s = pids.iter().zip(before).map(|(p, before)| {
        tree_context_switches(*p).saturating_sub(before) as f64 / IDLE_SAMPLE_S as f64
    });
    let mut memory = Vec::new();
    for t in &topologies {
        for (role, pid) in &t.proxies {
            memory.push(ProxyMemory {
                topology: t.name.clone(),
                role: role.clone(),
                processes: 1 + crate::process::descendants(*pid).len(),
                rss_bytes: tree_rss_bytes(*pid),
                peak_rss_bytes: tree_peak_rss_bytes(*pid),
                idle_wakeups_per_s: idle_wakeups_per_s.next().unwrap_or(0.0),
            });
        }
    }
    drop(externals);
    drop((za, zb, wp, sc_client, sc_server));
    drop(capture);
    let totals = totals(&topologies, &memory, &args.pods, args.pods_per_node);
    let report = Report {
        machine,
        proxy_shards: args.proxy_shards,
        rate: args.rate,
        duration_s: args.duration_s,
        warmup_s: args.warmup_s,
        repeats: args.repeats,
        bulk_bytes: args.bulk_bytes,
        pods_per_node: args.pods_per_node,
        capture: if captured { "iptables" } else { "socks5" }.into(),
        proxy_log: log.filter.clone(),
        proxy_sched_policy: args.proxy_sched_policy,
        proxy_access_log: log.access_log_on(),
        proxy_access_log_lines: log.access_lines(),
        cpu_steal_percent,
        topologies: topologies
            .iter()
            .map(|t| (t.name.clone(), t.deployment))
            .collect(),
        unavailable,
        phases,
        memory,
        totals,
    };
    let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
    let mut files = vec![
        ("compare.json".to_string(), json),
        ("summary.md".to_string(), summarize(&report)),
    ];
    files.extend(draw(&report).map_err(std::io::Error::other)?);
    crate::report::write_files(&args.out, &report.machine, &files)
}

/// Every phase for every topology, `repeats` times; within a repeat and phase the topologies
/// take turns in an order rotated by one each repeat, so that drift in the machine spreads over
/// all of them.
fn measure(args: &CompareArgs, topologies: &[Topology]) -> std::io::Result<Vec<Phase>> {
    let mut phases = Vec::new();
    let n = topologies.len();
    for repeat in 0..args.repeats {
        for (name, protocol, connections, rate, path) in phase_specs(args) {
            if !args.phases.is_empty() && !args.phases.iter().any(|p| phase_is(&name, p)) {
                continue;
            }
            for k in 0..n {
                let t = &topologies[(k + repeat) % n];
                let mut l = LoadArgs::new(format!("{}{path}", t.target));
                l.protocol = protocol;
                l.connections = connections;
                l.rate = rate;
                l.duration_s = args.duration_s;
                l.warmup_s = args.warmup_s;
                l.shards = 1;
                l.socks5 = t.socks5;
                l.source_ip = t.source;
                l.quiet = true;
                let (mut at_start, mut at_end) = (None, None);
                let r = load::run_marked(&l, &mut |m| match m {
                    load::Mark::Measuring => at_start = Some((t.cpu_times(), CpuTicks::now())),
                    load::Mark::Ended => at_end = Some((t.cpu_times(), CpuTicks::now())),
                })
                .map_err(|e| std::io::Error::other(format!("{} {name}: {e}", t.name)))?;
                let (Some((at_start, machine_at_start)), Some((at_end, machine_at_end))) =
                    (at_start, at_end)
                else {
                    return Err(std::io::Error::other(format!(
                        "{} {name}: the load ended without passing both marks",
                        t.name
                    )));
                };
                let per_request = |seconds: f64| {
                    if r.requests > 0 {
                        seconds * 1e6 / r.requests as f64
                    } else {
                        0.0
                    }
                };
                let proxies: Vec<ProxyCpu> = t
                    .proxies
                    .iter()
                    .zip(at_start.iter().zip(&at_end))
                    .map(|((role, _), (&start, &end))| {
                        let spent = end - start;
                        ProxyCpu {
                            role: role.clone(),
                            cpu_us_per_request: per_request(spent.total_s()),
                            kernel_cpu_us_per_request: per_request(spent.kernel_s),
                        }
                    })
                    .collect();
                let errors = r.errors.total() + r.status.s4xx + r.status.s5xx + r.status.other;
                let mb_per_s = r.bytes_in as f64 / r.duration_s.max(1e-9) / 1e6;
                eprintln!(
                    "{:>12} {name:<9} {:>9.0} req/s {:>8.1} MB/s  p50 {:>6.0} µs  p99 {:>7.0} µs  errors {errors}",
                    t.name, r.rps, mb_per_s, r.latency_us.p50, r.latency_us.p99
                );
                phases.push(Phase {
                    repeat,
                    topology: t.name.clone(),
                    phase: name.clone(),
                    requests: r.requests,
                    errors,
                    rps: r.rps,
                    mb_per_s,
                    p50_us: r.latency_us.p50,
                    p90_us: r.latency_us.p90,
                    p99_us: r.latency_us.p99,
                    p999_us: r.latency_us.p999,
                    proxy_cpu_us_per_request: proxies.iter().map(|p| p.cpu_us_per_request).sum(),
                    proxies,
                    idle_percent: machine_at_start.idle_percent_until(machine_at_end),
                });
            }
        }
    }
    Ok(phases)
}

/// What `pods` pods would hold in proxy memory: a sidecar per pod (the mean of the pair's two),
/// or a ztunnel per node (the mean of the two) plus one waypoint.
fn totals(
    topologies: &[Topology],
    memory: &[ProxyMemory],
    pods: &[usize],
    pods_per_node: usize,
) -> Vec<Total> {
    let mut out = Vec::new();
    for t in topologies {
        let of = |prefix: &str| -> Vec<u64> {
            memory
                .iter()
                .filter(|m| m.topology == t.name && m.role.starts_with(prefix))
                .map(|m| m.rss_bytes)
                .collect()
        };
        let mean = |v: Vec<u64>| -> u64 {
            if v.is_empty() {
                0
            } else {
                v.iter().sum::<u64>() / v.len() as u64
            }
        };
        for &n in pods {
            let (proxies, rss_bytes) = match t.deployment {
                Deployment::None | Deployment::AsMeasured => continue,
                Deployment::PerPod => {
                    let all: Vec<u64> = memory
                        .iter()
                        .filter(|m| m.topology == t.name)
                        .map(|m| m.rss_bytes)
                        .collect();
                    (n, n as u64 * mean(all))
                }
                Deployment::PerNode { waypoint } => {
                    let nodes = n.div_ceil(pods_per_node);
                    let w = if waypoint { mean(of("waypoint")) } else { 0 };
                    (
                        nodes + usize::from(waypoint),
                        nodes as u64 * mean(of("ztunnel")) + w,
                    )
                }
            };
            out.push(Total {
                topology: t.name.clone(),
                pods: n,
                proxies,
                rss_bytes,
            });
        }
    }
    out
}

fn phase_values(r: &Report, phase: &str, topology: &str, f: impl Fn(&Phase) -> f64) -> Vec<f64> {
    r.phases
        .iter()
        .filter(|p| p.phase == phase && p.topology == topology)
        .map(f)
        .collect()
}

/// "median (min–max)", or a dash when there is nothing (a baseline that was not measured).
fn fmt_or_dash(values: Vec<f64>, decimals: usize) -> String {
    if values.is_empty() {
        "—".to_string()
    } else {
        fmt_spread(values, decimals)
    }
}

/// One topology's run of one phase in one repeat.
fn measured_in<'a>(
    phases: &'a [Phase],
    phase: &str,
    topology: &str,
    repeat: usize,
) -> Option<&'a Phase> {
    phases
        .iter()
        .find(|p| p.phase == phase && p.topology == topology && p.repeat == repeat)
}

/// Per repeat, `topology`'s figure over `baseline`'s in the same repeat.
fn ratios(
    r: &Report,
    phase: &str,
    topology: &str,
    baseline: &str,
    f: impl Fn(&Phase) -> f64,
) -> Vec<f64> {
    (0..r.repeats)
        .filter_map(|rep| {
            let get = |t: &str| measured_in(&r.phases, phase, t, rep).map(&f);
            let base = get(baseline)?;
            (base > 0.0).then(|| get(topology).map(|v| v / base))?
        })
        .collect()
}

/// The pairs issue 7 sets shoal's sidecar pair and ambient L7 against.
const PAIRS: [&str; 2] = ["nginx", "haproxy"];

/// How one topology stood against the pairs on one figure.
#[derive(Debug, PartialEq)]
struct Standing {
    /// Per pair (in `PAIRS`' order), the topology's figure over the pair's, per repeat.
    ratios: Vec<Vec<f64>>,
    /// Repeats in which the topology and every pair were measured.
    repeats: usize,
    /// Of those, the repeats in which the topology did better than every pair.
    better_than_all: usize,
}

fn standing(
    phases: &[Phase],
    repeats: usize,
    phase: &str,
    topology: &str,
    field: fn(&Phase) -> f64,
    lower_is_better: bool,
) -> Standing {
    let get = |t: &str, rep: usize| measured_in(phases, phase, t, rep).map(field);
    let mut out = Standing {
        ratios: vec![Vec::new(); PAIRS.len()],
        repeats: 0,
        better_than_all: 0,
    };
    for rep in 0..repeats {
        let Some(mine) = get(topology, rep) else {
            continue;
        };
        let pairs: Vec<Option<f64>> = PAIRS.iter().map(|pair| get(pair, rep)).collect();
        for (ratios, pair) in out.ratios.iter_mut().zip(&pairs) {
            if let Some(theirs) = pair.filter(|v| *v > 0.0) {
                ratios.push(mine / theirs);
            }
        }
        if pairs.iter().all(Option::is_some) {
            out.repeats += 1;
            let better = |theirs: f64| {
                if lower_is_better {
                    mine < theirs
                } else {
                    mine > theirs
                }
            };
            out.better_than_all += usize::from(pairs.iter().flatten().all(|&t| better(t)));
        }
    }
    out
}

/// The section that sets shoal's sidecar pair and ambient paths against the pairs, figure by
/// figure, as issue 7 asks.
fn pairs_section(r: &Report, open: &str) -> String {
    if !r
        .phases
        .iter()
        .any(|p| PAIRS.contains(&p.topology.as_str()))
    {
        return String::new();
    }
    let mut md = String::from(
        "\n## Against the nginx and HAProxy pairs (issue 7's goal)\n\nWithin each repeat, a \
         topology's figure over each pair's (for the rate above 1 is better, for CPU and latency \
         below 1), and in how many repeats it did better than both pairs.\n\n| figure | topology |",
    );
    for pair in PAIRS {
        let _ = write!(md, " ÷ {pair} |");
    }
    md.push_str(" better than both |\n|---|---|");
    md.push_str(&"---:|".repeat(PAIRS.len() + 1));
    md.push('\n');
    let rate = format!("at {} req/s", r.rate as u64);
    type Figure<'a> = (String, &'a str, fn(&Phase) -> f64, bool);
    let figures: [Figure; 5] = [
        ("req/s at 50 connections".into(), "rr-50", |p| p.rps, false),
        (
            "proxy CPU µs/req at 50 connections".into(),
            "rr-50",
            |p| p.proxy_cpu_us_per_request,
            true,
        ),
        (format!("p50 {rate}"), open, |p| p.p50_us, true),
        (format!("p99 {rate}"), open, |p| p.p99_us, true),
        (format!("p99.9 {rate}"), open, |p| p.p999_us, true),
    ];
    for (what, phase, field, lower_is_better) in &figures {
        for topology in ["sidecar", "ambient-l7", "ambient-l4"] {
            let s = standing(
                &r.phases,
                r.repeats,
                phase,
                topology,
                *field,
                *lower_is_better,
            );
            if s.ratios.iter().all(Vec::is_empty) {
                continue;
            }
            let _ = write!(md, "| {what} | {topology} |");
            for ratios in s.ratios {
                let _ = write!(md, " {} |", fmt_or_dash(ratios, 2));
            }
            let _ = writeln!(md, " {} of {} repeats |", s.better_than_all, s.repeats);
        }
    }
    let l7_over_sidecar =
        |field: fn(&Phase) -> f64| ratios(r, "rr-50", "ambient-l7", "sidecar", field);
    let (rate, cpu) = (
        l7_over_sidecar(|p| p.rps),
        l7_over_sidecar(|p| p.proxy_cpu_us_per_request),
    );
    if !rate.is_empty() {
        let _ = writeln!(
            md,
            "\nAmbient L7 over the sidecar pair at 50 connections, within each repeat: {} of its \
             rate at {} of its proxy CPU per request (issue 7: putting L7 in the path should cost \
             users less than a sidecar pair does).",
            fmt_spread(rate, 2),
            fmt_or_dash(cpu, 2),
        );
    }
    let added = l7_added_over_sidecar(r);
    if !added.is_empty() {
        let _ = writeln!(
            md,
            "Adding L7 to an ambient mesh, whose ztunnels carry its traffic anyway (ambient L7's \
             proxy CPU per request less ambient L4's), costs {} of the sidecar pair's per request.",
            fmt_spread(added, 2),
        );
    }
    md
}

/// Per repeat, what ambient L7's proxies spend per request beyond ambient L4's, over what the
/// sidecar pair spends, at 50 connections.
fn l7_added_over_sidecar(r: &Report) -> Vec<f64> {
    (0..r.repeats)
        .filter_map(|rep| {
            let cpu = |t: &str| {
                measured_in(&r.phases, "rr-50", t, rep).map(|p| p.proxy_cpu_us_per_request)
            };
            let (l7, l4, sidecar) = (cpu("ambient-l7")?, cpu("ambient-l4")?, cpu("sidecar")?);
            (sidecar > 0.0).then(|| (l7 - l4) / sidecar)
        })
        .collect()
}

/// One proxy's CPU per request in a phase, a value per repeat.
struct ProxyCpuRow<'a> {
    topology: &'a str,
    role: &'a str,
    cpu_us: Vec<f64>,
    kernel_cpu_us: Vec<f64>,
}

/// Every proxy's CPU per request in a phase, in the order of the topologies and of each path.
fn proxy_cpu<'a>(r: &'a Report, phase: &str) -> Vec<ProxyCpuRow<'a>> {
    let mut rows: Vec<ProxyCpuRow> = Vec::new();
    for (topology, _) in &r.topologies {
        for p in r
            .phases
            .iter()
            .filter(|p| p.phase == phase && &p.topology == topology)
        {
            for proxy in &p.proxies {
                let at = rows
                    .iter()
                    .position(|row| row.topology == topology && row.role == proxy.role)
                    .unwrap_or_else(|| {
                        rows.push(ProxyCpuRow {
                            topology,
                            role: &proxy.role,
                            cpu_us: Vec::new(),
                            kernel_cpu_us: Vec::new(),
                        });
                        rows.len() - 1
                    });
                rows[at].cpu_us.push(proxy.cpu_us_per_request);
                rows[at].kernel_cpu_us.push(proxy.kernel_cpu_us_per_request);
            }
        }
    }
    rows
}

/// Where each path's proxy CPU goes, proxy by proxy, at 50 connections and at the fixed rate.
fn proxy_cpu_section(r: &Report, open: &str) -> String {
    let (busy, paced) = (proxy_cpu(r, "rr-50"), proxy_cpu(r, open));
    if busy.is_empty() && paced.is_empty() {
        return String::new();
    }
    let mut md = format!(
        "\n## Where the proxies' CPU goes\n\nEach proxy's CPU per request, and the kernel's part of \
         it (its system time: loopback TCP for the segments it sends and receives, io_uring or \
         epoll, sleeping and being woken), at 50 connections and at {} req/s.\n\n\
         | topology | proxy | CPU µs/req at 50 connections | of it the kernel's | CPU µs/req at {} req/s | of it the kernel's |\n\
         |---|---|---:|---:|---:|---:|\n",
        r.rate, r.rate
    );
    let mut keys: Vec<(&str, &str)> = busy.iter().map(|row| (row.topology, row.role)).collect();
    for row in &paced {
        if !keys.contains(&(row.topology, row.role)) {
            keys.push((row.topology, row.role));
        }
    }
    let cells = |rows: &[ProxyCpuRow], t: &str, role: &str| {
        rows.iter()
            .find(|row| row.topology == t && row.role == role)
            .map_or(("—".to_string(), "—".to_string()), |row| {
                (
                    fmt_spread(row.cpu_us.clone(), 1),
                    fmt_spread(row.kernel_cpu_us.clone(), 1),
                )
            })
    };
    for (t, role) in keys {
        let ((busy_all, busy_kernel), (paced_all, paced_kernel)) =
            (cells(&busy, t, role), cells(&paced, t, role));
        let _ = writeln!(
            md,
            "| {t} | {role} | {busy_all} | {busy_kernel} | {paced_all} | {paced_kernel} |"
        );
    }
    md
}

/// How much of the cores each path left idle while its phases were measured: a path whose
/// proxies spend less CPU per request than another's yet serve fewer requests leaves the cores
/// waiting on its wake-ups.
fn idle_section(r: &Report, open: &str) -> String {
    let rows: Vec<(&str, Vec<f64>, Vec<f64>)> = r
        .topologies
        .iter()
        .map(|(t, _)| {
            (
                t.as_str(),
                phase_values(r, "rr-50", t, |p| p.idle_percent),
                phase_values(r, open, t, |p| p.idle_percent),
            )
        })
        .filter(|(_, busy, paced)| !busy.is_empty() || !paced.is_empty())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut md = format!(
        "\n## How much of the cores stood idle\n\nThe share of the machine's CPU time no thread \
         used while each phase was measured, in percent (idle and iowait in /proc/stat: a shard \
         asleep in io_uring with I/O in flight counts as iowait). At 50 connections what one path \
         leaves idle and another does not is time its requests spent waiting for wake-ups rather \
         than for a core.\n\n\
         | topology | idle at 50 connections | idle at {} req/s |\n|---|---:|---:|\n",
        r.rate
    );
    for (t, busy, paced) in rows {
        let _ = writeln!(
            md,
            "| {t} | {} | {} |",
            fmt_or_dash(busy, 0),
            fmt_or_dash(paced, 0)
        );
    }
    md
}

fn summarize(r: &Report) -> String {
    let open = format!("open-{}", r.rate as u64);
    let mut md = String::from("# Ambient vs sidecars vs direct: one machine, one run\n\n");
    md.push_str(&r.machine.markdown());
    let _ = writeln!(
        md,
        "- CPU steal while the phases ran: {:.1}% of all CPU time (the host's share)",
        r.cpu_steal_percent
    );
    let _ = write!(
        md,
        "\nThe same backend (`shoal-bench backend`) and the same load (`shoal-bench load`, one \
         shard, HTTP/1.1) over every path: **direct**; **ambient-l4** (client → ztunnel A → HBONE \
         → ztunnel B → backend); **ambient-l7** (… ztunnel A → HBONE → waypoint with an \
         HTTPRoute and an L7 AuthorizationPolicy → HBONE → ztunnel B …); **sidecar** (shoal's \
         sidecar mode: the client's sidecar → HBONE → the server's sidecar, same route and policy); \
         **nginx** and **haproxy** (a pair of that proxy, mTLS between them: TLS 1.3, ECDSA P-256, \
         client certificates checked, upstream connections kept alive)",
    );
    for (name, d) in &r.topologies {
        if *d == Deployment::AsMeasured {
            let _ = write!(md, "; **{name}** (given with `--proxy`)");
        }
    }
    let reach = if r.capture == "iptables" {
        "The client dials the service's address and iptables (DNAT, as istio-cni installs it) \
         hands its connections to the client-side proxy: to ztunnel's and shoal's sidecar's \
         capture listeners, which read the original destination, and to nginx's and HAProxy's \
         client-side listeners, as it would as their sidecars (they proxy to their configured \
         upstream), so every path pays NAT's cost per connection alike."
    } else {
        "The client reaches shoal's proxies through SOCKS5 (ztunnel's 15080, the sidecar's outbound \
         listener; iptables capture needs root) and the other pairs' client side with plain HTTP, \
         as iptables capture would hand it over: a new connection through SOCKS5 costs two more \
         round trips than one captured."
    };
    let logs = if r.proxy_access_log {
        format!(
            "shoal's proxies write their access logs (a line per connection or request; \
             `SHOAL_LOG={}`, to a file: {} lines in this run); nginx's and HAProxy's are off",
            r.proxy_log, r.proxy_access_log_lines
        )
    } else {
        format!(
            "No proxy writes an access log: shoal's run with `SHOAL_LOG={}`, nginx's and \
             HAProxy's are off",
            r.proxy_log
        )
    };
    let sched = match r.proxy_sched_policy {
        shoal_runtime::SchedPolicy::Normal => String::new(),
        policy => format!(
            " shoal's proxies' shards run under `SCHED_{}` (`--sched-policy {policy}`), nginx's \
             and HAProxy's under the kernel's default.",
            policy.to_string().to_uppercase()
        ),
    };
    let _ = write!(
        md,
        ". {reach} \
         Every proxy runs {} shard/worker/thread, none pinned, all sharing this machine's cores \
         with the client and the backend.{sched} {logs}. Phases: `rr-50` closed loop on 50 connections; `{open}` \
         open loop at {} req/s over 16 connections, latency from the intended send time; \
         `new-conn` a new connection per request, 16 at a time; `bulk` {} KiB responses over 4 \
         connections. {} s per phase after {} s of warm-up, {} repeats interleaved. Medians \
         (min–max); ratios are taken within a repeat. Proxy CPU is the user + system time of the \
         path's proxy processes (and their children) over the phase, per request.\n\n",
        r.proxy_shards.max(1),
        r.rate as u64,
        r.bulk_bytes / 1024,
        r.duration_s,
        r.warmup_s,
        r.repeats
    );
    if !r.unavailable.is_empty() {
        md.push_str("**Not measured:**\n\n");
        for (name, why) in &r.unavailable {
            let _ = writeln!(md, "- {name}: {why}");
        }
        md.push('\n');
    }
    md.push_str("## Headline\n\n");
    md.push_str(
        "| topology | req/s at 50 conns | vs direct | vs sidecar | proxy CPU µs/req | p99 µs at the fixed rate | new conn/s | bulk MB/s | proxy RSS MiB |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (name, _) in &r.topologies {
        let rss: u64 = r
            .memory
            .iter()
            .filter(|m| &m.topology == name)
            .map(|m| m.rss_bytes)
            .sum();
        let direct = name == "direct";
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_spread(phase_values(r, "rr-50", name, |p| p.rps), 0),
            if direct {
                "1".to_string()
            } else {
                fmt_spread(ratios(r, "rr-50", name, "direct", |p| p.rps), 2)
            },
            if name == "sidecar" {
                "1".to_string()
            } else {
                fmt_or_dash(ratios(r, "rr-50", name, "sidecar", |p| p.rps), 2)
            },
            if direct {
                "—".to_string()
            } else {
                fmt_spread(
                    phase_values(r, "rr-50", name, |p| p.proxy_cpu_us_per_request),
                    1,
                )
            },
            fmt_spread(phase_values(r, &open, name, |p| p.p99_us), 0),
            fmt_spread(phase_values(r, "new-conn", name, |p| p.rps), 0),
            fmt_spread(phase_values(r, "bulk", name, |p| p.mb_per_s), 0),
            if direct {
                "—".to_string()
            } else {
                format!("{:.1}", rss as f64 / (1 << 20) as f64)
            },
        );
    }
    md.push_str(&pairs_section(r, &open));
    md.push_str(&proxy_cpu_section(r, &open));
    md.push_str(&idle_section(r, &open));
    md.push_str("\n![throughput](throughput.svg)\n\n![latency](latency.svg)\n\n");

    md.push_str("## Every phase\n\n");
    md.push_str("| phase | topology | req/s | MB/s | p50 µs | p90 µs | p99 µs | p99.9 µs | proxy CPU µs/req | req/s vs direct | req/s vs sidecar | errors |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut phase_names: Vec<String> = Vec::new();
    for p in &r.phases {
        if !phase_names.contains(&p.phase) {
            phase_names.push(p.phase.clone());
        }
    }
    for phase in &phase_names {
        for (name, _) in &r.topologies {
            let v = |f: fn(&Phase) -> f64, d: usize| fmt_spread(phase_values(r, phase, name, f), d);
            let errors: u64 = r
                .phases
                .iter()
                .filter(|p| &p.phase == phase && &p.topology == name)
                .map(|p| p.errors)
                .sum();
            let _ = writeln!(
                md,
                "| {phase} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {errors} |",
                v(|p| p.rps, 0),
                v(|p| p.mb_per_s, 1),
                v(|p| p.p50_us, 0),
                v(|p| p.p90_us, 0),
                v(|p| p.p99_us, 0),
                v(|p| p.p999_us, 0),
                if name == "direct" {
                    "—".into()
                } else {
                    v(|p| p.proxy_cpu_us_per_request, 1)
                },
                fmt_spread(ratios(r, phase, name, "direct", |p| p.rps), 2),
                fmt_or_dash(ratios(r, phase, name, "sidecar", |p| p.rps), 2),
            );
        }
    }

    let _ = write!(
        md,
        "\n## Memory\n\nRSS of every proxy at the end of the run (its own and its children's: nginx's worker), \
         the highest it reached, and how often it was woken while idle (context switches a second of all its \
         threads over {IDLE_SAMPLE_S} s after the phases).\n\n"
    );
    md.push_str(
        "| topology | proxy | processes | RSS MiB | peak RSS MiB | idle wake-ups/s |\n|---|---|---:|---:|---:|---:|\n",
    );
    for m in &r.memory {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            m.topology,
            m.role,
            m.processes,
            m.rss_bytes as f64 / (1 << 20) as f64,
            m.peak_rss_bytes as f64 / (1 << 20) as f64,
            m.idle_wakeups_per_s
        );
    }
    let _ = write!(
        md,
        "\n### For a mesh of N pods\n\nSidecars: one proxy per pod, each the mean of the pair measured above. Ambient: a \
         ztunnel per node ({} pods per node), plus one waypoint for L7. Every proxy above held the \
         configuration of a mesh with {} extra pods and services. A proxy given with `--proxy` is \
         reported as measured: how it would be deployed is not known.\n\n",
        r.pods_per_node,
        r.totals.iter().map(|t| t.pods).max().unwrap_or(0)
    );
    md.push_str("| topology | pods | proxies | proxy memory MiB | vs sidecar |\n|---|---:|---:|---:|---:|\n");
    for t in &r.totals {
        let sidecar = r
            .totals
            .iter()
            .find(|s| s.topology == "sidecar" && s.pods == t.pods)
            .map(|s| s.rss_bytes)
            .unwrap_or(0);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} |",
            t.topology,
            t.pods,
            t.proxies,
            t.rss_bytes as f64 / (1 << 20) as f64,
            if sidecar > 0 {
                format!("{:.2}", t.rss_bytes as f64 / sidecar as f64)
            } else {
                "—".into()
            }
        );
    }
    md.push_str("\n![resources](resources.svg)\n");
    md
}

/// The three charts: throughput bars, latency percentiles, memory against pods.
fn draw(r: &Report) -> Result<Vec<(String, String)>, String> {
    let open = format!("open-{}", r.rate as u64);
    let bars = |phase: &str, f: fn(&Phase) -> f64| -> Vec<Bar> {
        r.topologies
            .iter()
            .enumerate()
            .map(|(color, (name, _))| {
                let (median, min, max) = spread(phase_values(r, phase, name, f));
                Bar {
                    label: name.clone(),
                    color,
                    median,
                    min,
                    max,
                }
            })
            .collect()
    };
    let throughput = charts::bar_panels(&[
        (
            "req/s, 50 connections",
            "requests per second",
            bars("rr-50", |p| p.rps),
        ),
        (
            "new connections/s",
            "connections per second",
            bars("new-conn", |p| p.rps),
        ),
        ("bulk", "MB/s", bars("bulk", |p| p.mb_per_s)),
    ])?;
    // The repeat with the median p99 stands for the topology.
    let latency_lines: Vec<Line> = r
        .topologies
        .iter()
        .enumerate()
        .filter_map(|(color, (name, _))| {
            let mut runs: Vec<&Phase> = r
                .phases
                .iter()
                .filter(|p| p.phase == open && &p.topology == name)
                .collect();
            runs.sort_by(|a, b| a.p99_us.total_cmp(&b.p99_us));
            let p = runs.get(runs.len() / 2)?;
            Some(Line {
                label: name.clone(),
                color,
                points: vec![
                    (0.0, p.p50_us),
                    (1.0, p.p90_us),
                    (2.0, p.p99_us),
                    (3.0, p.p999_us),
                ],
            })
        })
        .collect();
    let latency = charts::category_lines_log(
        &format!("latency at {} req/s (open loop)", r.rate as u64),
        &["p50", "p90", "p99", "p99.9"],
        "µs",
        &latency_lines,
    )?;
    let mut names: Vec<&str> = Vec::new();
    for t in &r.totals {
        if !names.contains(&t.topology.as_str()) {
            names.push(&t.topology);
        }
    }
    let resource_lines: Vec<Line> = names
        .iter()
        .map(|name| Line {
            label: name.to_string(),
            color: r
                .topologies
                .iter()
                .position(|(t, _)| t == name)
                .unwrap_or(0),
            points: r
                .totals
                .iter()
                .filter(|t| t.topology == *name)
                .map(|t| (t.pods as f64, t.rss_bytes as f64 / (1 << 20) as f64))
                .collect(),
        })
        .collect();
    let resources = charts::lines(
        "proxy memory for a mesh of N pods",
        "pods",
        "MiB",
        &resource_lines,
    )?;
    Ok(vec![
        ("throughput.svg".into(), throughput),
        ("latency.svg".into(), latency),
        ("resources.svg".into(), resources),
    ])
}

/// Removes the run's scratch directory however the run ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_is_asked_for_by_its_name_or_its_kind() {
        for (name, asked, expected) in [
            ("rr-50", "rr-50", true),
            ("open-1000", "open", true),
            ("open-1000", "open-1000", true),
            ("open-1000", "open-100", false),
            ("new-conn", "new", true),
            ("new-conn", "new-conn", true),
            ("bulk", "bulk", true),
            ("bulk", "bul", false),
            ("rr-50", "open", false),
        ] {
            assert_eq!(phase_is(name, asked), expected, "{name} asked as {asked}");
        }
    }

    fn memory(topology: &str, role: &str, mib: u64) -> ProxyMemory {
        ProxyMemory {
            topology: topology.into(),
            role: role.into(),
            processes: 1,
            rss_bytes: mib << 20,
            peak_rss_bytes: mib << 20,
            idle_wakeups_per_s: 0.0,
        }
    }

    fn topology(name: &str, deployment: Deployment) -> Topology {
        Topology {
            name: name.into(),
            target: String::new(),
            socks5: None,
            source: None,
            proxies: Vec::new(),
            deployment,
        }
    }

    #[test]
    fn sidecars_scale_with_pods_and_ztunnels_with_nodes() {
        let topologies = [
            topology("direct", Deployment::None),
            topology("ambient-l7", Deployment::PerNode { waypoint: true }),
            topology("sidecar", Deployment::PerPod),
            topology("mine", Deployment::AsMeasured),
        ];
        let memory = [
            memory("ambient-l7", "ztunnel-a", 10),
            memory("ambient-l7", "ztunnel-b", 12),
            memory("ambient-l7", "waypoint", 15),
            memory("sidecar", "sidecar-client", 14),
            memory("sidecar", "sidecar-server", 16),
            memory("mine", "mine", 50),
        ];
        let t = totals(&topologies, &memory, &[10, 100, 101], 10);
        let got: Vec<(&str, usize, usize, u64)> = t
            .iter()
            .map(|t| (t.topology.as_str(), t.pods, t.proxies, t.rss_bytes >> 20))
            .collect();
        assert_eq!(
            got,
            [
                ("ambient-l7", 10, 2, 11 + 15),
                ("ambient-l7", 100, 11, 10 * 11 + 15),
                ("ambient-l7", 101, 12, 11 * 11 + 15),
                ("sidecar", 10, 10, 150),
                ("sidecar", 100, 100, 1500),
                ("sidecar", 101, 101, 1515),
            ]
        );
    }

    #[test]
    fn the_mesh_loads_with_its_filler() {
        let dir = std::env::temp_dir().join(format!("shoal-compare-mesh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mesh.yaml"), mesh(42, 300)).unwrap();
        let snapshot = shoal_control::ManifestDir::new(&dir)
            .snapshot(&Default::default(), &Default::default());
        let _ = std::fs::remove_dir_all(&dir);
        let snapshot = snapshot.unwrap();
        assert_eq!(snapshot.stats.errors, 0);
        assert_eq!(snapshot.workloads.len(), 305);
    }

    fn report_of(phases: Vec<Phase>, topologies: &[&str]) -> Report {
        Report {
            machine: Machine::describe(),
            proxy_shards: 1,
            rate: 1000.0,
            duration_s: 1.0,
            warmup_s: 0.0,
            repeats: 3,
            bulk_bytes: 0,
            pods_per_node: 10,
            capture: "iptables".into(),
            proxy_log: "warn".into(),
            proxy_sched_policy: shoal_runtime::SchedPolicy::Normal,
            proxy_access_log: false,
            proxy_access_log_lines: 0,
            cpu_steal_percent: 0.0,
            topologies: topologies
                .iter()
                .map(|t| (t.to_string(), Deployment::AsMeasured))
                .collect(),
            unavailable: Vec::new(),
            phases,
            memory: Vec::new(),
            totals: Vec::new(),
        }
    }

    #[test]
    fn each_proxys_cpu_is_its_own_median_over_the_repeats() {
        let with = |repeat, topology: &str, phase: &str, proxies: &[(&str, f64, f64)]| Phase {
            phase: phase.into(),
            proxies: proxies
                .iter()
                .map(|&(role, cpu, kernel)| ProxyCpu {
                    role: role.into(),
                    cpu_us_per_request: cpu,
                    kernel_cpu_us_per_request: kernel,
                })
                .collect(),
            ..measured(repeat, topology, 1.0, 1.0)
        };
        let mut phases = vec![with(0, "direct", "rr-50", &[])];
        for (repeat, client, server) in [
            (0, (10.0, 4.0), (12.0, 5.0)),
            (1, (30.0, 8.0), (14.0, 6.0)),
            (2, (20.0, 6.0), (13.0, 7.0)),
        ] {
            let proxies = [
                ("sidecar-client", client.0, client.1),
                ("sidecar-server", server.0, server.1),
            ];
            phases.push(with(repeat, "sidecar", "rr-50", &proxies));
        }
        phases.push(with(
            0,
            "sidecar",
            "open-1000",
            &[("sidecar-client", 100.0, 80.0)],
        ));
        let l7 = [
            ("ztunnel-a", 5.0, 4.0),
            ("waypoint", 9.0, 3.0),
            ("ztunnel-b", 6.0, 5.0),
        ];
        phases.push(with(0, "ambient-l7", "rr-50", &l7));
        let report = report_of(phases, &["direct", "sidecar", "ambient-l7"]);
        let busy = proxy_cpu(&report, "rr-50");
        let roles: Vec<(&str, &str)> = busy.iter().map(|row| (row.topology, row.role)).collect();
        assert_eq!(
            roles,
            [
                ("sidecar", "sidecar-client"),
                ("sidecar", "sidecar-server"),
                ("ambient-l7", "ztunnel-a"),
                ("ambient-l7", "waypoint"),
                ("ambient-l7", "ztunnel-b"),
            ]
        );
        assert_eq!(busy[0].cpu_us, [10.0, 30.0, 20.0]);
        assert_eq!(busy[0].kernel_cpu_us, [4.0, 8.0, 6.0]);
        let md = proxy_cpu_section(&report, "open-1000");
        for row in [
            "| sidecar | sidecar-client | 20.0 (10.0–30.0) | 6.0 (4.0–8.0) | 100.0 (100.0–100.0) | 80.0 (80.0–80.0) |",
            "| sidecar | sidecar-server | 13.0 (12.0–14.0) | 6.0 (5.0–7.0) | — | — |",
            "| ambient-l7 | waypoint | 9.0 (9.0–9.0) | 3.0 (3.0–3.0) | — | — |",
        ] {
            assert!(md.contains(row), "{row}\n{md}");
        }
        assert!(!md.contains("| direct |"), "{md}");
        assert!(proxy_cpu_section(&report_of(Vec::new(), &["direct"]), "open-1000").is_empty());
    }

    #[test]
    fn adding_l7_to_ambient_is_set_against_the_sidecar_pair_within_each_repeat() {
        let cpu = |repeat, topology: &str, us| Phase {
            proxy_cpu_us_per_request: us,
            ..measured(repeat, topology, 1.0, 1.0)
        };
        let phases = vec![
            cpu(0, "ambient-l7", 40.0),
            cpu(0, "ambient-l4", 24.0),
            cpu(0, "sidecar", 40.0),
            cpu(1, "ambient-l7", 30.0),
            cpu(1, "ambient-l4", 20.0),
            cpu(1, "sidecar", 20.0),
            // Repeat 2 has no ambient L4: left out.
            cpu(2, "ambient-l7", 30.0),
            cpu(2, "sidecar", 10.0),
            // The section is written once a pair was measured.
            cpu(0, "nginx", 70.0),
        ];
        let report = report_of(phases, &[]);
        assert_eq!(l7_added_over_sidecar(&report), [0.4, 0.5]);
        let md = pairs_section(&report, "open-1000");
        assert!(
            md.contains("costs 0.45 (0.40–0.50) of the sidecar pair's per request"),
            "{md}"
        );
    }

    fn measured(repeat: usize, topology: &str, rps: f64, p99_us: f64) -> Phase {
        Phase {
            repeat,
            topology: topology.into(),
            phase: "rr-50".into(),
            requests: 1,
            errors: 0,
            rps,
            mb_per_s: 0.0,
            p50_us: 0.0,
            p90_us: 0.0,
            p99_us,
            p999_us: 0.0,
            proxy_cpu_us_per_request: 0.0,
            proxies: Vec::new(),
            idle_percent: 0.0,
        }
    }

    #[test]
    fn the_cores_idle_share_is_reported_by_path_and_phase() {
        let idle = |repeat, topology: &str, phase: &str, percent| Phase {
            phase: phase.into(),
            idle_percent: percent,
            ..measured(repeat, topology, 1.0, 1.0)
        };
        let phases = vec![
            idle(0, "ambient-l7", "rr-50", 31.0),
            idle(1, "ambient-l7", "rr-50", 27.0),
            idle(2, "ambient-l7", "rr-50", 35.0),
            idle(0, "ambient-l7", "open-1000", 80.0),
            idle(0, "haproxy", "rr-50", 21.0),
        ];
        let md = idle_section(
            &report_of(phases, &["direct", "ambient-l7", "haproxy"]),
            "open-1000",
        );
        for row in [
            "| ambient-l7 | 31 (27–35) | 80 (80–80) |",
            "| haproxy | 21 (21–21) | — |",
        ] {
            assert!(md.contains(row), "{row}\n{md}");
        }
        // A topology with no phase measured gets no row.
        assert!(!md.contains("| direct |"), "{md}");
        assert!(idle_section(&report_of(Vec::new(), &["direct"]), "open-1000").is_empty());
    }

    #[test]
    fn a_topology_stands_against_both_pairs_within_each_repeat() {
        let phases = [
            // Repeat 0: better than both by rate, between them by latency.
            measured(0, "sidecar", 300.0, 50.0),
            measured(0, "nginx", 100.0, 40.0),
            measured(0, "haproxy", 200.0, 100.0),
            // Repeat 1: better than nginx only, by rate; better than both by latency.
            measured(1, "sidecar", 150.0, 10.0),
            measured(1, "nginx", 100.0, 40.0),
            measured(1, "haproxy", 300.0, 20.0),
            // Repeat 2: HAProxy missing; it counts for nginx's ratio only.
            measured(2, "sidecar", 400.0, 10.0),
            measured(2, "nginx", 100.0, 40.0),
        ];
        let table = [
            (
                (|p: &Phase| p.rps) as fn(&Phase) -> f64,
                false,
                Standing {
                    ratios: vec![vec![3.0, 1.5, 4.0], vec![1.5, 0.5]],
                    repeats: 2,
                    better_than_all: 1,
                },
            ),
            (
                |p: &Phase| p.p99_us,
                true,
                Standing {
                    ratios: vec![vec![1.25, 0.25, 0.25], vec![0.5, 0.5]],
                    repeats: 2,
                    better_than_all: 1,
                },
            ),
        ];
        for (field, lower_is_better, want) in table {
            let got = standing(&phases, 3, "rr-50", "sidecar", field, lower_is_better);
            assert_eq!(got, want, "lower is better: {lower_is_better}");
        }
        let report = report_of(phases.to_vec(), &[]);
        let md = pairs_section(&report, "open-1000");
        assert!(
            md.contains("| req/s at 50 connections | sidecar | 3.00 (1.50–4.00) | 1.00 (0.50–1.50) | 1 of 2 repeats |"),
            "{md}"
        );
        assert!(
            md.contains("| figure | topology | ÷ nginx | ÷ haproxy | better than both |\n|---|---|---:|---:|---:|\n"),
            "{md}"
        );
        assert!(!md.contains("| ambient-l7 |"), "{md}");
        // A topology not measured stands nowhere.
        let none = standing(&phases, 3, "rr-50", "ambient-l7", |p| p.rps, false);
        assert_eq!(none.repeats, 0);
        assert!(none.ratios.iter().all(Vec::is_empty));
    }
}
