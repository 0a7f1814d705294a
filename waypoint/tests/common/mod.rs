//! The seeds' bookinfo scenario on one machine: two ztunnels, a waypoint, and a backend per pod,
//! each pod on its own loopback address, shared by the tests.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::time::Duration;

use shoal_hbone::ca::LocalCa;
use shoal_perf::backend::Backend;
use shoal_perf::process::{ProxyLog, ServerProcess};
use shoal_perf::waypoint_bench::proxy_args;
use shoal_runtime::{RuntimeArgs, RuntimeConfig};
use shoal_waypoint::node::{Waypoint, WaypointArgs};
use shoal_ztunnel::node::{Node, ZtunnelArgs};

/// Bookinfo as in the seeds (`control/tests/seeds/002-bookinfo-waypoint.yaml`): the namespace uses
/// the waypoint, reviews is split 90/10, productpage admits only `default/curl`'s GETs.
pub const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 127.40.0.50}]
---
apiVersion: v1
kind: Pod
metadata: {name: curl, namespace: default}
spec: {nodeName: node-a, serviceAccountName: curl}
status: {podIP: 127.40.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default}
spec: {nodeName: node-a, serviceAccountName: other}
status: {podIP: 127.40.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-v1, namespace: bookinfo, labels: {app: productpage, version: v1}}
spec: {nodeName: node-b, serviceAccountName: bookinfo-productpage}
status: {podIP: 127.40.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec: {nodeName: node-a, serviceAccountName: bookinfo-reviews}
status: {podIP: 127.40.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec: {nodeName: node-b, serviceAccountName: bookinfo-reviews}
status: {podIP: 127.40.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: bookinfo}
spec: {clusterIP: 10.40.0.1, selector: {app: productpage}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.40.0.2, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {clusterIP: 10.40.0.3, selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {clusterIP: 10.40.0.4, selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-waypoint, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: productpage}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/curl]}}]
    to: [{operation: {methods: ["GET"]}}]
"#;

/// The pods with a backend, by address.
pub const BACKENDS: [(&str, &str); 3] = [
    ("127.40.0.2", "productpage-v1"),
    ("127.40.0.3", "reviews-v1"),
    ("127.40.0.5", "reviews-v2"),
];

pub use shoal_perf::testkit::{
    admin_get, curl_repeat, header_of, metric, runtime_args as clap_args, status_of, wait_for,
};

/// curl from a pod's address through a node's SOCKS5 listener: (exit code, head and body).
pub fn curl(net: u8, from: &str, socks: SocketAddr, url: &str, extra: &[&str]) -> (i32, String) {
    shoal_perf::testkit::curl_via(&on(net, from), socks, &on(net, url), extra)
}

pub fn config() -> RuntimeArgs {
    // Two shards, not pinned: the machine runs two ztunnels, a waypoint, backends and curl at once.
    clap_args(&["--shards", "2", "--no-pin", "--drain-timeout-s", "1"])
}

/// The mesh's addresses moved to 127.`net` (and its VIPs to 10.`net`).
pub fn on(net: u8, text: &str) -> String {
    text.replace("127.40.", &format!("127.{net}."))
        .replace("10.40.", &format!("10.{net}."))
}

pub struct Mesh {
    pub net: u8,
    pub dir: tempfile::TempDir,
    pub a: Node,
    pub b: Node,
    pub waypoint: Waypoint,
    pub backends: Vec<Backend>,
}

impl Mesh {
    pub fn start(net: u8) -> Mesh {
        Mesh::start_with(net, |m| m.to_string())
    }

    pub fn start_with(net: u8, edit: impl Fn(&str) -> String) -> Mesh {
        Mesh::start_with_dns(net, edit, &[])
    }

    /// The same, with the proxies resolving through `dns` (a test's name server).
    pub fn start_with_dns(net: u8, edit: impl Fn(&str) -> String, dns: &[SocketAddr]) -> Mesh {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("SHOAL_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        LocalCa::generate("cluster.local")
            .unwrap()
            .write(&ca_dir)
            .unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        std::fs::write(manifests.join("mesh.yaml"), edit(&on(net, MESH))).unwrap();
        let backends = start_backends(net);
        let node = |name: &str| start_node(&manifests, &ca_dir, name, dns);
        let waypoint = Waypoint::start(&WaypointArgs {
            gateway: Some("bookinfo/waypoint".into()),
            cert_lifetime_s: 3600,
            header_read_timeout_ms: 1000,
            dns_servers: dns.to_vec(),
            ..WaypointArgs::on_loopback(manifests.clone(), ca_dir.clone(), config())
        })
        .unwrap_or_else(|e| panic!("waypoint: {e}"));
        let mesh = Mesh {
            net,
            a: node("node-a"),
            b: node("node-b"),
            waypoint,
            backends,
            dir,
        };
        for addr in ["127.40.0.2:15008", "127.40.0.3:15008", "127.40.0.5:15008"] {
            let addr = on(net, addr);
            wait_for(&format!("HBONE on {addr}"), || {
                std::net::TcpStream::connect(&addr).is_ok()
            });
        }
        mesh
    }

    pub fn manifests(&self) -> std::path::PathBuf {
        self.dir.path().join("manifests")
    }

    /// curl from a pod's address through node A's SOCKS5 listener: (exit code, head and body).
    pub fn curl(&self, from: &str, url: &str, extra: &[&str]) -> (i32, String) {
        curl(self.net, from, self.a.socks5_addr(), url, extra)
    }

    pub fn stop(self) {
        let Mesh {
            dir,
            a,
            b,
            waypoint,
            backends,
            ..
        } = self;
        // Each proxy goes whole (its control agent too) before the manifests are removed.
        {
            let w = waypoint;
            w.runtime.begin_drain();
            w.runtime.join();
        }
        drain_nodes_and_backends([a, b], backends);
        drop(dir);
    }
}

/// The bookinfo mesh with the waypoint as its own process: the binary as users run it, with its
/// own allocator, log and admin server. The ztunnels and backends run in this process.
pub struct WaypointProcessMesh {
    pub dir: tempfile::TempDir,
    pub a: Node,
    pub b: Node,
    backends: Vec<Backend>,
    waypoint: Option<ServerProcess>,
    pub log: ProxyLog,
}

impl WaypointProcessMesh {
    /// Starts it all, the waypoint logging at `log_filter` with `extra` arguments, and waits for
    /// the HBONE listeners.
    pub fn start(net: u8, log_filter: &str, extra: &[&str]) -> WaypointProcessMesh {
        let dir = tempfile::tempdir().unwrap();
        let (manifests, ca) = shoal_perf::testkit::write_mesh(dir.path(), &on(net, MESH));
        let backends = start_backends(net);
        let node = |name: &str| start_node(&manifests, &ca, name, &[]);
        let (a, b) = (node("node-a"), node("node-b"));
        let log = ProxyLog {
            filter: log_filter.into(),
            dir: dir.path().join("logs"),
        };
        let mut args = vec!["--gateway", "bookinfo/waypoint"];
        args.extend_from_slice(extra);
        let waypoint = ServerProcess::start_proxy(
            std::path::Path::new(env!("CARGO_BIN_EXE_waypoint")),
            &proxy_args(&manifests, &ca, 1, &args),
            &log,
            "waypoint",
        )
        .expect("the waypoint starts");
        // productpage's node, and the waypoint.
        for addr in ["127.40.0.2:15008", "127.40.0.50:15008"] {
            let addr = on(net, addr);
            wait_for(&format!("HBONE on {addr}"), || {
                std::net::TcpStream::connect(&addr).is_ok()
            });
        }
        WaypointProcessMesh {
            dir,
            a,
            b,
            backends,
            waypoint: Some(waypoint),
            log,
        }
    }

    pub fn waypoint(&self) -> &ServerProcess {
        self.waypoint.as_ref().expect("the waypoint is running")
    }

    /// SIGTERM: the waypoint drains and exits.
    pub fn terminate_waypoint(&mut self) -> std::process::ExitStatus {
        let waypoint = self.waypoint.take().expect("the waypoint is running");
        waypoint
            .terminate(Duration::from_secs(10))
            .expect("the waypoint exits")
    }

    /// Stops the waypoint (if still running), the ztunnels and the backends.
    pub fn stop(self) {
        let WaypointProcessMesh {
            dir,
            a,
            b,
            backends,
            waypoint,
            ..
        } = self;
        drop(waypoint);
        drain_nodes_and_backends([a, b], backends);
        drop(dir);
    }
}

/// Drains and joins both ztunnels, then the backends.
fn drain_nodes_and_backends(nodes: [Node; 2], backends: Vec<Backend>) {
    for node in nodes {
        node.runtime.begin_drain();
        node.runtime.join();
    }
    for b in backends {
        b.runtime.begin_drain();
        b.runtime.join();
    }
}

/// A backend on each pod of `BACKENDS` in 127.`net`, on port 9080.
pub fn start_backends(net: u8) -> Vec<Backend> {
    BACKENDS
        .iter()
        .map(|(ip, name)| {
            let listen = format!("{}:9080", on(net, ip)).parse().unwrap();
            Backend::start_one_shard(listen, name).expect("backend")
        })
        .collect()
}

/// Node `name`'s ztunnel, in this process, resolving through `dns`.
pub fn start_node(
    manifests: &std::path::Path,
    ca: &std::path::Path,
    name: &str,
    dns: &[SocketAddr],
) -> Node {
    Node::start(&ZtunnelArgs {
        cert_lifetime_s: 3600,
        dns_servers: dns.to_vec(),
        ..ZtunnelArgs::on_loopback(manifests.to_path_buf(), name, ca.to_path_buf(), config())
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A TCP connection from `from` through the SOCKS5 listener `socks` to `to` (IPv4).
pub fn socks_connect(socks: SocketAddr, from: &str, to: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&socks.into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).unwrap();
    let to: SocketAddr = to.parse().unwrap();
    let SocketAddr::V4(v4) = to else { panic!() };
    let mut req = vec![5, 1, 0, 1];
    req.extend(v4.ip().octets());
    req.extend(v4.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[1], 0, "SOCKS5 connect refused");
    s
}

fn read_head(s: &mut impl std::io::Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A WebSocket-style server on `listen` for one connection: answers the upgrade with 101, then
/// echoes what follows.
pub fn upgrade_echo_server(listen: &str) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let head = read_head(&mut conn).to_ascii_lowercase();
        assert!(head.contains("upgrade: websocket"), "{head}");
        conn.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => conn.write_all(&buf[..n]).unwrap(),
            }
        }
    })
}

/// Asks `s` to upgrade to WebSocket, expects the 101, and has messages echoed both ways.
pub fn upgrade_and_echo(mut s: std::net::TcpStream) {
    use std::io::{Read, Write};
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for message in ["hello", "through the proxies"] {
        s.write_all(message.as_bytes()).unwrap();
        let mut back = vec![0u8; message.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, message.as_bytes());
    }
}
