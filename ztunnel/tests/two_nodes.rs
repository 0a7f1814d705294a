//! Two ztunnels (two nodes), real backends on their pods' loopback addresses, and curl as the
//! client (through SOCKS5, from its pod's address): bytes intact through HBONE, a service's two
//! endpoints on two nodes both reached, L4 policy enforced with the peer's identity and changed
//! without a restart, plain TCP to a workload outside ambient, and clean refusals.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_hbone::ca::LocalCa;
use shoal_perf::backend::Backend;
use shoal_runtime::{RuntimeArgs, RuntimeConfig};
use shoal_ztunnel::node::{Node, ZtunnelArgs};

const MESH: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.30.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: app}
spec: {nodeName: node-a, serviceAccountName: other}
status: {podIP: 127.30.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: app, labels: {app: web}}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 127.30.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: app, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 127.30.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec: {clusterIP: 10.250.0.1, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {nodeName: node-b}
status: {podIP: 127.30.1.1}
";

fn config() -> RuntimeArgs {
    // Two shards, not pinned: the test machine runs two ztunnels, backends and curl at once.
    clap_args(&["--shards", "2", "--no-pin", "--drain-timeout-s", "1"])
}

fn clap_args(args: &[&str]) -> RuntimeArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        runtime: RuntimeArgs,
    }
    let mut all = vec!["x"];
    all.extend_from_slice(args);
    Cli::parse_from(all).runtime
}

/// The mesh's addresses moved to 127.`net`.
fn on(net: u8, text: &str) -> String {
    text.replace("127.30.", &format!("127.{net}."))
}

struct Mesh {
    dir: tempfile::TempDir,
    a: Node,
    b: Node,
    backends: Vec<Backend>,
}

impl Mesh {
    /// `net` is the test's own 127.N: tests run at once, and listeners on the same address would
    /// share connections (SO_REUSEPORT).
    fn start(net: u8) -> Mesh {
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
        std::fs::write(manifests.join("mesh.yaml"), on(net, MESH)).unwrap();
        let backend = |ip: &str, name: &str| {
            let config = RuntimeConfig {
                shards: 1,
                pin: false,
                drain_timeout: Duration::from_secs(1),
                ..RuntimeConfig::default()
            };
            Backend::start(config, format!("{ip}:8080").parse().unwrap(), name).expect("backend")
        };
        let backends = vec![
            backend(&on(net, "127.30.0.2"), "web-1"),
            backend(&on(net, "127.30.0.3"), "web-2"),
            backend(&on(net, "127.30.1.1"), "old"),
        ];
        let node = |name: &str| {
            Node::start(&ZtunnelArgs {
                manifests: manifests.clone(),
                node: name.to_string(),
                ca: ca_dir.clone(),
                socks5: "127.0.0.1:0".parse().unwrap(),
                admin: "127.0.0.1:0".parse().unwrap(),
                trust_domain: "cluster.local".into(),
                root_namespace: "istio-system".into(),
                cert_lifetime_s: 3600,
                runtime: config(),
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let mesh = Mesh {
            a: node("node-a"),
            b: node("node-b"),
            backends,
            dir,
        };
        // The inbound listeners come up on the shards right after start.
        for addr in ["127.30.0.2:15008", "127.30.0.3:15008"] {
            let addr = on(net, addr);
            wait_for(&format!("HBONE on {addr}"), || {
                std::net::TcpStream::connect(&addr).is_ok()
            });
        }
        mesh
    }

    fn manifests(&self) -> std::path::PathBuf {
        self.dir.path().join("manifests")
    }

    fn stop(self) {
        for node in [self.a, self.b] {
            node.runtime.begin_drain();
            node.runtime.join();
        }
        for b in self.backends {
            b.runtime.begin_drain();
            b.runtime.join();
        }
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// curl from a pod's address through a node's SOCKS5 listener: (exit code, headers and body).
fn curl(net: u8, from: &str, socks: SocketAddr, url: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "--max-time",
            "10",
            "--interface",
            &on(net, from),
            "--socks5-hostname",
            &socks.to_string(),
        ])
        .args(extra)
        .arg(on(net, url))
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn admin_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body
}

/// The sum of a metric's series whose labels include every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn backend_of(response: &str) -> Option<String> {
    response
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .map(|v| v.trim().to_string())
}

fn set_policy(manifests: &Path, node: &Node, yaml: Option<&str>) {
    let before = node.agent.current().version;
    let path = manifests.join("policy.yaml");
    match yaml {
        Some(y) => std::fs::write(&path, y).unwrap(),
        None => std::fs::remove_file(&path).unwrap(),
    }
    wait_for("the policy to load", || {
        node.agent.current().version > before
    });
    // Give the shards their turn to pick it up.
    std::thread::sleep(Duration::from_millis(50));
}

#[test]
fn traffic_through_two_ztunnels() {
    const NET: u8 = 30;
    let mesh = Mesh::start(NET);
    let socks = mesh.a.socks5_addr();
    let curl = |from: &str, socks, url: &str, extra: &[&str]| curl(NET, from, socks, url, extra);

    // A service VIP: both endpoints, one on each node, are reached over HBONE.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (code, response) = curl("127.30.0.1", socks, "http://10.250.0.1/", &[]);
        assert_eq!(code, 0, "{response}");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        seen.insert(backend_of(&response).unwrap_or_default());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["web-1", "web-2"]);

    // By name (resolved by the mesh), and a megabyte intact each way.
    let (code, response) = curl(
        "127.30.0.1",
        socks,
        "http://web.app.svc.cluster.local/bytes/1048576",
        &["-o", "/dev/null", "-w", "%{size_download}"],
    );
    assert_eq!(
        (code, response.trim_end().rsplit('\n').next().unwrap_or("")),
        (0, "1048576"),
        "{response}"
    );
    let upload = vec![b'u'; 2 * 1024 * 1024];
    let file = mesh.dir.path().join("upload.bin");
    std::fs::write(&file, &upload).unwrap();
    let (code, response) = curl(
        "127.30.0.1",
        socks,
        "http://127.30.0.2:8080/status/201",
        &["--data-binary", &format!("@{}", file.display())],
    );
    assert_eq!(code, 0, "{response}");
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "the backend read the whole body and answered: {response}"
    );

    // A workload outside ambient: plain TCP.
    let (code, response) = curl("127.30.0.1", socks, "http://127.30.1.1:8080/", &[]);
    assert_eq!(
        (code, backend_of(&response).as_deref()),
        (0, Some("old")),
        "{response}"
    );

    // A source that is no workload of the mesh is refused, not passed through.
    let (code, _) = curl("127.0.0.1", socks, "http://10.250.0.1/", &[]);
    assert_ne!(code, 0);

    // Istio's TCP metrics on both sides, summed over the shards.
    let a = admin_get(mesh.a.admin.local_addr(), "/metrics");
    let opened = metric(
        &a,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            "source_workload=\"client\"",
            "destination_service=\"web.app.svc.cluster.local\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(opened >= 12.0, "{a}");
    let failed = metric(
        &a,
        "istio_tcp_connections_failed_total",
        &["response_flags=\"NR\"", "source_workload=\"unknown\""],
    );
    assert_eq!(failed, 1.0, "{a}");
    let b = admin_get(mesh.b.admin.local_addr(), "/metrics");
    // The megabyte went to one of web's two endpoints, on one node or the other.
    let labels = [
        "reporter=\"destination\"",
        "destination_workload=\"web\"",
        "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"",
    ];
    let received = metric(&a, "istio_tcp_received_bytes_total", &labels)
        + metric(&b, "istio_tcp_received_bytes_total", &labels);
    assert!(
        received >= 1_048_576.0,
        "the megabyte download counted on the destination side: {a}\n{b}"
    );
    // The node's certificates are in its config dump.
    let dump = admin_get(mesh.b.admin.local_addr(), "/config_dump");
    assert!(
        dump.contains("\"identity\": \"spiffe://cluster.local/ns/app/sa/web\""),
        "{dump}"
    );
    mesh.stop();
}

#[test]
fn policy_with_the_peer_identity_changes_without_a_restart() {
    const NET: u8 = 31;
    let mesh = Mesh::start(NET);
    let socks = mesh.a.socks5_addr();
    let curl = |from: &str, socks, url: &str, extra: &[&str]| curl(NET, from, socks, url, extra);
    let web1 = "http://127.30.0.2:8080/";
    assert_eq!(
        curl("127.30.0.4", socks, web1, &[]).0,
        0,
        "no policy: allowed"
    );

    // ALLOW by principal: the client's identity (from its certificate) passes, another's does not.
    set_policy(
        &mesh.manifests(),
        &mesh.b,
        Some(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-client, namespace: app}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/client]}}]}]
",
        ),
    );
    let (code, response) = curl("127.30.0.1", socks, web1, &[]);
    assert_eq!(code, 0, "{response}");
    let (code, _) = curl("127.30.0.4", socks, web1, &[]);
    assert_ne!(code, 0, "a peer the ALLOW does not name is refused");

    // DENY by port, by namespace.
    set_policy(
        &mesh.manifests(),
        &mesh.b,
        Some(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-8080, namespace: app}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [app]}}], to: [{operation: {ports: [\"8080\"]}}]}]
",
        ),
    );
    assert_ne!(curl("127.30.0.1", socks, web1, &[]).0, 0);
    let b = admin_get(mesh.b.admin.local_addr(), "/metrics");
    assert!(
        metric(
            &b,
            "istio_tcp_connections_failed_total",
            &["response_flags=\"DENY\"", "reporter=\"destination\""]
        ) >= 1.0,
        "{b}"
    );

    // An ALLOW with only L7 rules allows nothing at L4 (fail closed).
    set_policy(
        &mesh.manifests(),
        &mesh.b,
        Some(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: app}
spec:
  rules: [{to: [{operation: {methods: [GET]}}]}]
",
        ),
    );
    assert_ne!(curl("127.30.0.1", socks, web1, &[]).0, 0);

    set_policy(&mesh.manifests(), &mesh.b, None);
    assert_eq!(
        curl("127.30.0.1", socks, web1, &[]).0,
        0,
        "policy removed: allowed again"
    );
    mesh.stop();
}
