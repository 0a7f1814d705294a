//! The demo a new user runs first: a small ambient mesh on this machine. It writes a bundled
//! example mesh (two nodes, pods with their own loopback addresses, the seeds' bookinfo with a
//! waypoint: reviews split 90/10 by an HTTPRoute, productpage open only to curl's GETs, details
//! kept to productpage by an L4 policy), creates its CA, starts two ztunnels, the waypoint and the
//! pods' backends, sends traffic through ambient L4 and L7, and prints what a user wants to see:
//! requests, success rate, latency, the split as observed, denied requests (L7 and L4), and where
//! the metrics and config dump can be read. Then it stops everything it started.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use shoal_control::dump;
use shoal_hbone::ca::LocalCa;
use shoal_runtime::RuntimeArgs;
use shoal_waypoint::node::{Waypoint, WaypointArgs};
use shoal_ztunnel::node::{Node, ZtunnelArgs};

use crate::backend::Backend;
use crate::load::{self, LoadArgs, Protocol};

/// The bundled example mesh. Every pod has its own 127.60.0.0/16 address.
pub const EXAMPLE_MESH: &str =
    "# shoal's demo mesh: the bookinfo namespace in ambient mode on two nodes, with a waypoint.
apiVersion: v1
kind: Namespace
metadata:
  name: bookinfo
  labels:
    istio.io/dataplane-mode: ambient
    istio.io/use-waypoint: waypoint
---
# The waypoint (istioctl waypoint apply -n bookinfo): services in the namespace use it.
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 127.60.0.50}]
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
kind: Pod
metadata: {name: details-v1, namespace: bookinfo, labels: {app: details}}
spec: {nodeName: node-b, serviceAccountName: bookinfo-details}
status: {podIP: 127.60.0.13}
---
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: bookinfo}
spec: {clusterIP: 10.96.60.2, selector: {app: productpage}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.60.1
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {clusterIP: 10.96.60.3, selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {clusterIP: 10.96.60.4, selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
---
# details stays L4: no waypoint, ztunnel enforces its policy.
apiVersion: v1
kind: Service
metadata: {name: details, namespace: bookinfo, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.60.5, selector: {app: details}, ports: [{name: http, port: 9080}]}
---
# The seeds' split: 90% of reviews to v1, 10% to v2 (applied by the waypoint).
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
---
# The seeds' L7 policy: only curl may call productpage, and only with GET (the waypoint: 403).
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-waypoint, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: \"\", name: productpage}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/curl]}}]
    to: [{operation: {methods: [GET]}}]
---
# L4: only productpage may reach details (ztunnel refuses others by their mTLS identity).
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-from-productpage, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: details}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage]
";

const PRODUCTPAGE: &str = "127.60.0.10";
const CURL: &str = "127.60.0.20";
const REVIEWS_VIP: &str = "10.96.60.1:9080";
const PRODUCTPAGE_VIP: &str = "10.96.60.2:9080";
const DETAILS_VIP: &str = "10.96.60.5:9080";

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

/// One request through the SOCKS5 port of a node, from a pod's address: the answer's status and
/// `x-backend`, or why there was none.
fn request_via(
    socks: SocketAddr,
    from: &str,
    method: &str,
    to: &str,
) -> Result<(u16, String), String> {
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
    write!(
        s,
        "{method} / HTTP/1.1\r\nhost: bookinfo\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    let status = response
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            if response.is_empty() {
                "connection closed without an answer".to_string()
            } else {
                format!("no HTTP answer: {response:?}")
            }
        })?;
    let backend = response
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .map_or_else(|| "the waypoint".to_string(), |b| b.trim().to_string());
    Ok((status, backend))
}

fn load_through(
    socks: SocketAddr,
    from: &str,
    to: &str,
    seconds: u64,
) -> std::io::Result<load::Report> {
    let mut load_args = LoadArgs::new(format!("http://{to}/"));
    load_args.protocol = Protocol::Http1;
    load_args.connections = 8;
    load_args.duration_s = seconds as f64;
    load_args.warmup_s = 0.5;
    load_args.shards = 1;
    load_args.socks5 = Some(socks);
    load_args.source_ip = Some(from.parse::<IpAddr>().map_err(std::io::Error::other)?);
    load::run(&load_args).map_err(std::io::Error::other)
}

fn print_load(report: &load::Report) {
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
}

pub fn run(args: &MeshDemoArgs) -> std::io::Result<()> {
    println!(
        "shoal demo — an ambient mesh on this machine: two nodes, a waypoint, HBONE between them\n"
    );
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
        Backend::start_one_shard(
            format!("{ip}:9080")
                .parse()
                .map_err(std::io::Error::other)?,
            name,
        )
        .map_err(std::io::Error::other)
    };
    let backends = vec![
        backend("127.60.0.10", "productpage-v1")?,
        backend("127.60.0.11", "reviews-v1")?,
        backend("127.60.0.12", "reviews-v2")?,
        backend("127.60.0.13", "details-v1")?,
    ];
    let node = |name: &str| {
        Node::start(&ZtunnelArgs::on_loopback(
            manifests.clone(),
            name,
            work.join("ca"),
            runtime_args(1),
        ))
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
    let waypoint = Waypoint::start(&WaypointArgs {
        gateway: Some("bookinfo/waypoint".into()),
        ..WaypointArgs::on_loopback(manifests.clone(), work.join("ca"), runtime_args(1))
    })
    .map_err(std::io::Error::other)?;
    println!(
        "waypoint     bookinfo/waypoint: HBONE {}, admin http://{}/config_dump, metrics http://{}/metrics",
        waypoint.listen_addr(),
        waypoint.admin.local_addr(),
        waypoint.metrics.local_addr()
    );
    // The HBONE listeners come up on the pods' addresses right after start.
    for addr in [
        "127.60.0.10:15008",
        "127.60.0.11:15008",
        "127.60.0.12:15008",
        "127.60.0.13:15008",
    ] {
        for _ in 0..200 {
            if TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let socks = a.socks5_addr();

    println!("\n1. ambient L7 — productpage → reviews ({REVIEWS_VIP}): ztunnel on node-a → HBONE → the waypoint (HTTPRoute) → HBONE → the endpoint's node:");
    print_load(&load_through(
        socks,
        PRODUCTPAGE,
        REVIEWS_VIP,
        args.seconds,
    )?);

    println!("\n2. the split the HTTPRoute asks for (reviews-v1 90, reviews-v2 10), as observed over 200 requests:");
    let mut split: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..200 {
        let who = match request_via(socks, PRODUCTPAGE, "GET", REVIEWS_VIP) {
            Ok((200, who)) => who,
            Ok((status, who)) => format!("{status} from {who}"),
            Err(e) => format!("error: {e}"),
        };
        *split.entry(who).or_default() += 1;
    }
    for (who, n) in &split {
        println!(
            "   {who:<12} {n:>3}  {}",
            "█".repeat((*n as usize).div_ceil(4))
        );
    }

    println!("\n3. ambient L4 — productpage → details ({DETAILS_VIP}, no waypoint): ztunnel → HBONE → ztunnel:");
    print_load(&load_through(
        socks,
        PRODUCTPAGE,
        DETAILS_VIP,
        args.seconds,
    )?);

    println!("\n4. the policies: productpage admits only curl's GETs (the waypoint), details only productpage (ztunnel):");
    let cases = [
        (CURL, "curl", "GET", PRODUCTPAGE_VIP, "productpage"),
        (CURL, "curl", "POST", PRODUCTPAGE_VIP, "productpage"),
        (
            PRODUCTPAGE,
            "productpage",
            "GET",
            PRODUCTPAGE_VIP,
            "productpage",
        ),
        (PRODUCTPAGE, "productpage", "GET", DETAILS_VIP, "details"),
        (CURL, "curl", "GET", DETAILS_VIP, "details"),
    ];
    for (from, who, method, to, service) in cases {
        let outcome = match request_via(socks, from, method, to) {
            Ok((403, _)) => "403 — denied by the waypoint (RBAC: access denied)".to_string(),
            Ok((status, backend)) => format!("{status} from {backend}"),
            Err(e) => format!("refused — {e} (the destination's ztunnel denied it)"),
        };
        println!("   {who:<12} {method:<5} {service:<12} {outcome}");
    }

    println!("\n5. what ztunnel on node-a holds (shoalctl ztunnel-config reads the same from a running node):\n");
    let dump = get_json(a.admin.local_addr(), "/config_dump")?;
    for line in dump::workload_table(&dump).lines() {
        println!("   {line}");
    }
    println!();
    for line in dump::service_table(&dump).lines() {
        println!("   {line}");
    }
    println!("\n6. the waypoint's metrics (Istio's names), per service and response code:\n");
    let metrics = get_text(waypoint.metrics.local_addr(), "/metrics")?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total"))
    {
        let label = |name: &str| {
            let key = format!("{name}=\"");
            line.split(&key)
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("?")
                .to_string()
        };
        let count = line.rsplit(' ').next().unwrap_or("0");
        println!(
            "   {:<38} {:<58} code {} flags {:<3} {count:>7}",
            label("destination_service"),
            label("source_principal"),
            label("response_code"),
            label("response_flags"),
        );
    }
    println!("\n   and ztunnel's: the L4 denial on node-b:");
    for (name, n) in [("node-a", &a), ("node-b", &b)] {
        let metrics = get_text(n.metrics.local_addr(), "/metrics")?;
        for line in metrics.lines().filter(|l| {
            !l.ends_with(" 0")
                && l.starts_with("istio_tcp_connections_failed_total")
                && l.contains("DENY")
        }) {
            println!("   {name}: {line}");
        }
    }

    println!("\nstopping everything this demo started");
    {
        // The rest of the waypoint (its control agent watching the manifests) goes at the end of
        // this block, before the manifests are removed.
        let w = waypoint;
        w.runtime.begin_drain();
        w.runtime.join();
    }
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
