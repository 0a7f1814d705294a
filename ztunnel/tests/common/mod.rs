//! Two ztunnels on one machine, each pod with its own loopback address, shared by the tests.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shoal_hbone::ca::LocalCa;
use shoal_perf::backend::Backend;
use shoal_runtime::{RuntimeArgs, RuntimeConfig};
use shoal_ztunnel::node::{Node, ZtunnelArgs};

pub const MESH: &str = "
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

pub use shoal_perf::testkit::{
    admin_get, admin_request, metric, runtime_args as clap_args, wait_for,
};

/// curl from a pod's address through a node's SOCKS5 listener: (exit code, head and body).
pub fn curl(net: u8, from: &str, socks: SocketAddr, url: &str, extra: &[&str]) -> (i32, String) {
    shoal_perf::testkit::curl_via(&on(net, from), socks, &on(net, url), extra)
}

pub fn config() -> RuntimeArgs {
    // Two shards, not pinned: the test machine runs two ztunnels, backends and curl at once.
    clap_args(&["--shards", "2", "--no-pin", "--drain-timeout-s", "1"])
}

/// The mesh's addresses moved to 127.`net`.
pub fn on(net: u8, text: &str) -> String {
    text.replace("127.30.", &format!("127.{net}."))
}

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub a: Node,
    pub b: Node,
    pub backends: Vec<Backend>,
}

impl Mesh {
    /// `net` is the test's own 127.N: tests run at once, and listeners on the same address would
    /// share connections (SO_REUSEPORT).
    pub fn start(net: u8) -> Mesh {
        Mesh::start_with(net, |m| m.to_string(), None, None)
    }

    /// As `start`, with the manifests changed by `edit`, node A's redirect listener on `redirect`
    /// and node B's plaintext inbound listener on `plaintext`.
    pub fn start_with(
        net: u8,
        edit: impl Fn(&str) -> String,
        redirect: Option<&str>,
        plaintext: Option<&str>,
    ) -> Mesh {
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
        let backend = |ip: &str, name: &str| {
            Backend::start_one_shard(format!("{ip}:8080").parse().unwrap(), name).expect("backend")
        };
        let backends = vec![
            backend(&on(net, "127.30.0.2"), "web-1"),
            backend(&on(net, "127.30.0.3"), "web-2"),
            backend(&on(net, "127.30.1.1"), "old"),
        ];
        let node = |name: &str| {
            Node::start(&ZtunnelArgs {
                redirect: if name == "node-a" {
                    redirect.map(|r| r.parse().unwrap())
                } else {
                    None
                },
                inbound_plaintext: if name == "node-b" {
                    plaintext.map(|r| r.parse().unwrap())
                } else {
                    None
                },
                cert_lifetime_s: 3600,
                ..ZtunnelArgs::on_loopback(manifests.clone(), name, ca_dir.clone(), config())
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

    pub fn manifests(&self) -> std::path::PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn stop(self) {
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

pub fn backend_of(response: &str) -> Option<String> {
    response
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .map(|v| v.trim().to_string())
}

pub fn set_policy(manifests: &Path, node: &Node, yaml: Option<&str>) {
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
