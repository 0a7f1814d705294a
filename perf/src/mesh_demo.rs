//! The demo a new user runs first: a small ambient mesh on this machine. It writes a bundled
//! example mesh (two nodes, pods with their own loopback addresses, a service with an endpoint on
//! each node, an AuthorizationPolicy), creates its CA, starts two ztunnels and the pods' backends,
//! sends traffic through HBONE, and prints what a user wants to see: requests, success rate,
//! latency, the split between endpoints as observed, a denied request, and where the metrics and
//! config dump can be read. Then it stops everything it started.
//!
//! L7 (the waypoint with the seeds' reviews split and productpage policy) joins when the waypoint
//! exists; until then the split shown is ztunnel's round robin over the service's endpoints.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use shoal_control::dump;
use shoal_hbone::ca::LocalCa;
use shoal_runtime::{RuntimeArgs, RuntimeConfig};
use shoal_ztunnel::node::{Node, ZtunnelArgs};

use crate::backend::Backend;
use crate::load::{self, LoadArgs, Protocol};

/// The bundled example mesh. Every pod has its own 127.60.0.0/16 address.
pub const EXAMPLE_MESH: &str =
    "# shoal's demo mesh: the bookinfo namespace in ambient mode on two nodes.
apiVersion: v1
kind: Namespace
metadata:
  name: bookinfo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-v1, namespace: bookinfo, labels: {app: productpage, version: v1}}
spec: {nodeName: node-a, serviceAccountName: bookinfo-productpage}
status: {podIP: 127.60.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: curl, namespace: bookinfo, labels: {app: curl}}
spec: {nodeName: node-a, serviceAccountName: curl}
status: {podIP: 127.60.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec:
  nodeName: node-a
  serviceAccountName: bookinfo-reviews
  containers: [{name: reviews, ports: [{name: http, containerPort: 9080}]}]
status: {podIP: 127.60.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec:
  nodeName: node-b
  serviceAccountName: bookinfo-reviews
  containers: [{name: reviews, ports: [{name: http, containerPort: 9080}]}]
status: {podIP: 127.60.0.12}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.60.1
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
# Only productpage may call reviews (ztunnel enforces it with the caller's mTLS identity).
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-from-productpage, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage]
";

const PRODUCTPAGE: &str = "127.60.0.10";
const CURL: &str = "127.60.0.20";
const REVIEWS_VIP: &str = "10.96.60.1:9080";
/// 127.0.0.1 with a port the kernel picks.
const ANY_LOOPBACK_PORT: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

#[derive(Clone, Debug, clap::Args)]
pub struct MeshDemoArgs {
    /// Seconds of load through the mesh.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
}

fn runtime_args(shards: usize) -> RuntimeArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        runtime: RuntimeArgs,
    }
    let shards = shards.to_string();
    Cli::parse_from([
        "demo",
        "--shards",
        &shards,
        "--no-pin",
        "--drain-timeout-s",
        "2",
    ])
    .runtime
}

/// One GET through the SOCKS5 port of a node, from a pod's address: the `x-backend` of the answer,
/// or why there was none.
fn get_via(socks: SocketAddr, from: &str, to: &str) -> Result<String, String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    let source: SocketAddr = format!("{from}:0")
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
    socket.bind(&source.into()).map_err(|e| e.to_string())?;
    socket.connect(&socks.into()).map_err(|e| e.to_string())?;
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let to: SocketAddrV4 = to
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
    let mut request = vec![5u8, 1, 0, 5, 1, 0, 1];
    request.extend_from_slice(&to.ip().octets());
    request.extend_from_slice(&to.port().to_be_bytes());
    s.write_all(&request).map_err(|e| e.to_string())?;
    let mut reply = [0u8; 12];
    s.read_exact(&mut reply).map_err(|e| e.to_string())?;
    if reply[3] != 0 {
        return Err(format!("refused by ztunnel (SOCKS5 reply {})", reply[3]));
    }
    s.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .map(|b| b.trim().to_string())
        .ok_or_else(|| format!("no answer: {response:?}"))
}

pub fn run(args: &MeshDemoArgs) -> std::io::Result<()> {
    println!("shoal demo — an ambient mesh on this machine: two nodes, HBONE between them\n");
    let work = std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id()));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("bookinfo.yaml"), EXAMPLE_MESH)?;
    LocalCa::generate("cluster.local")
        .and_then(|ca| ca.write(&work.join("ca")))
        .map_err(std::io::Error::other)?;
    println!(
        "mesh         {} (the manifests), CA in {}",
        manifests.display(),
        work.join("ca").display()
    );

    let backend = |ip: &str, name: &str| {
        let config = RuntimeConfig {
            shards: 1,
            pin: false,
            drain_timeout: Duration::from_secs(1),
            ..RuntimeConfig::default()
        };
        Backend::start(
            config,
            format!("{ip}:9080")
                .parse()
                .map_err(std::io::Error::other)?,
            name,
        )
        .map_err(std::io::Error::other)
    };
    let backends = vec![
        backend("127.60.0.11", "reviews-v1")?,
        backend("127.60.0.12", "reviews-v2")?,
    ];
    let node = |name: &str| {
        Node::start(&ZtunnelArgs {
            manifests: manifests.clone(),
            node: name.to_string(),
            ca: work.join("ca"),
            socks5: ANY_LOOPBACK_PORT,
            redirect: None,
            inbound_plaintext: None,
            admin: ANY_LOOPBACK_PORT,
            metrics: ANY_LOOPBACK_PORT,
            readiness: ANY_LOOPBACK_PORT,
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            cert_lifetime_s: 24 * 3600,
            runtime: runtime_args(1),
        })
        .map_err(std::io::Error::other)
    };
    let a = node("node-a")?;
    let b = node("node-b")?;
    for (name, n) in [("node-a", &a), ("node-b", &b)] {
        println!(
            "ztunnel      {name}: SOCKS5 {}, admin http://{}/config_dump, metrics http://{}/metrics",
            n.socks5_addr(),
            n.admin.local_addr(),
            n.metrics.local_addr()
        );
    }
    // The HBONE listeners come up on the pods' addresses right after start.
    for addr in ["127.60.0.11:15008", "127.60.0.12:15008"] {
        for _ in 0..200 {
            if TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let socks = a.socks5_addr();

    println!("\n1. productpage → reviews ({REVIEWS_VIP}), through ztunnel on node-a and HBONE (mTLS) to each endpoint's node:");
    let mut load_args = LoadArgs::new(format!("http://{REVIEWS_VIP}/"));
    load_args.protocol = Protocol::Http1;
    load_args.connections = 8;
    load_args.duration_s = args.seconds as f64;
    load_args.warmup_s = 0.5;
    load_args.shards = 1;
    load_args.socks5 = Some(socks);
    load_args.source_ip = Some(
        PRODUCTPAGE
            .parse::<IpAddr>()
            .map_err(std::io::Error::other)?,
    );
    let report = load::run(&load_args).map_err(std::io::Error::other)?;
    let failed = report.errors.total() + report.status.s4xx + report.status.s5xx;
    println!(
        "   {} requests in {:.1} s: {:.0} req/s, success {:.2}%, p50 {:.0} µs, p99 {:.0} µs",
        report.requests,
        report.duration_s,
        report.rps,
        100.0 * (report.requests.saturating_sub(failed)) as f64 / report.requests.max(1) as f64,
        report.latency_us.p50,
        report.latency_us.p99
    );

    println!("\n2. the split between reviews' two endpoints (one per node), 40 new connections:");
    let mut split: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..40 {
        let who =
            get_via(socks, PRODUCTPAGE, REVIEWS_VIP).unwrap_or_else(|e| format!("error: {e}"));
        *split.entry(who).or_default() += 1;
    }
    for (who, n) in &split {
        println!("   {who:<12} {n:>3}  {}", "█".repeat(*n as usize));
    }

    println!("\n3. curl → reviews: the AuthorizationPolicy allows only productpage's identity:");
    match get_via(socks, CURL, REVIEWS_VIP) {
        Ok(who) => println!("   unexpectedly answered by {who}"),
        Err(e) => {
            println!("   denied — {e}; the destination node's log names the policy, and its metrics count it")
        }
    }

    println!("\n4. what ztunnel on node-a holds (shoalctl ztunnel-config reads the same from a running node):\n");
    let dump = get_json(a.admin.local_addr(), "/config_dump")?;
    for line in dump::workload_table(&dump).lines() {
        println!("   {line}");
    }
    println!();
    for line in dump::certificate_table(&dump).lines() {
        println!("   {line}");
    }
    println!("\n5. the nodes' metrics (Istio's names): tunnels opened, and the denial:\n");
    for (name, n) in [("node-a", &a), ("node-b", &b)] {
        let metrics = get_text(n.metrics.local_addr(), "/metrics")?;
        for line in metrics.lines().filter(|l| {
            !l.ends_with(" 0")
                && ((l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains("reporter=\"destination\""))
                    || (l.starts_with("istio_tcp_connections_failed_total") && l.contains("DENY")))
        }) {
            println!("   {name}: {line}");
        }
    }

    println!("\nstopping everything this demo started");
    for n in [a, b] {
        n.runtime.begin_drain();
        n.runtime.join();
    }
    for bk in backends {
        bk.runtime.begin_drain();
        bk.runtime.join();
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// A GET on an admin server's path through the demo's own client; anything but 200 is an error.
fn get_text(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    match crate::demo::http_get(addr, path)? {
        (200, body) => Ok(body),
        (status, _) => Err(std::io::Error::other(format!(
            "{addr}{path} answered {status}"
        ))),
    }
}

fn get_json(addr: SocketAddr, path: &str) -> std::io::Result<serde_json::Value> {
    serde_json::from_str(&get_text(addr, path)?).map_err(std::io::Error::other)
}
