//! Transparent capture with real network namespaces and iptables, as istio-cni sets it up: an
//! unmodified curl in its own namespace (a pod) is redirected to ztunnel, which reads the original
//! destination (SO_ORIGINAL_DST). Outbound (15001-style): carried over HBONE to the other node.
//! Inbound plaintext (15006-style): accepted only where PeerAuthentication is PERMISSIVE. Needs
//! root, `ip` and `iptables` (CI runs as root; .ci/run installs them).
//!
//! The rules sit in the node's PREROUTING for the pod's veth (node-level capture), since ztunnel
//! runs in the node's namespace here rather than opening its sockets inside the pod's.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e} (needs ip and iptables)"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_root() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    assert!(root, "the capture tests need root (CI runs as root)");
}

/// A client namespace joined to the node by a veth pair, with PREROUTING rules on the node's end;
/// all removed on drop.
struct ClientNamespace {
    name: String,
    host_veth: String,
    rules: Vec<Vec<String>>,
}

impl ClientNamespace {
    /// 10.`subnet`.0.1 on the node's side, 10.`subnet`.0.2 in the namespace; each rule is the
    /// iptables arguments after `-t nat -A PREROUTING -i VETH`.
    fn create(tag: u32, subnet: u8, rules: &[&[&str]]) -> ClientNamespace {
        let id = (std::process::id() % 10_000) * 10 + tag;
        let name = format!("shoal-cap-{id}");
        let host_veth = format!("shc{id}h");
        let pod_veth = format!("shc{id}p");
        let ns = ClientNamespace {
            name: name.clone(),
            host_veth: host_veth.clone(),
            rules: rules
                .iter()
                .map(|r| {
                    ["-t", "nat", "-A", "PREROUTING", "-i", host_veth.as_str()]
                        .iter()
                        .chain(r.iter())
                        .map(|s| s.to_string())
                        .collect()
                })
                .collect(),
        };
        let (host_ip, pod_ip, gateway) = (
            format!("10.{subnet}.0.1/24"),
            format!("10.{subnet}.0.2/24"),
            format!("10.{subnet}.0.1"),
        );
        sh(&["ip", "netns", "add", &name]);
        sh(&[
            "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", &pod_veth,
        ]);
        sh(&["ip", "link", "set", &pod_veth, "netns", &name]);
        sh(&["ip", "addr", "add", &host_ip, "dev", &host_veth]);
        sh(&["ip", "link", "set", &host_veth, "up"]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "addr", "add", &pod_ip, "dev", &pod_veth,
        ]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", &pod_veth, "up",
        ]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "route", "add", "default", "via", &gateway,
        ]);
        for rule in &ns.rules {
            let rule: Vec<&str> = std::iter::once("iptables")
                .chain(rule.iter().map(String::as_str))
                .collect();
            sh(&rule);
        }
        ns
    }

    /// curl from inside the namespace: (succeeded, response).
    fn curl(&self, url: &str) -> (bool, String) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "curl",
                "-s",
                "-i",
                "--max-time",
                "10",
                url,
            ])
            .output()
            .expect("curl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for ClientNamespace {
    fn drop(&mut self) {
        for rule in &self.rules {
            let mut delete = rule.clone();
            delete[2] = "-D".into();
            let _ = Command::new("iptables").args(&delete).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[test]
fn an_unmodified_client_is_captured_and_tunnelled() {
    assert_root();
    const NET: u8 = 33;
    // The client pod lives in the namespace at 10.80.0.2, on node-a.
    let mesh = Mesh::start_with(
        NET,
        |manifests| manifests.replace("status: {podIP: 127.33.0.1}", "status: {podIP: 10.80.0.2}"),
        Some("0.0.0.0:0"),
        None,
    );
    let redirect: SocketAddr = mesh.a.runtime.shards()[0].listeners[1];
    let port = redirect.port().to_string();
    let ns = ClientNamespace::create(
        1,
        80,
        &[&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &port]],
    );

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let (_, response) = ns.curl("http://10.250.0.1/");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        seen.insert(
            response
                .lines()
                .find_map(|l| l.strip_prefix("x-backend: "))
                .unwrap_or("")
                .trim()
                .to_string(),
        );
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "both endpoints, through HBONE"
    );
    // The source node counted it as the client's, over mTLS.
    let metrics = admin_get(mesh.a.admin.local_addr(), "/metrics");
    let opened = metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            "source_workload=\"client\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(opened >= 8.0, "{metrics}");
    drop(ns);
    mesh.stop();
}

#[test]
fn plaintext_inbound_follows_peer_authentication() {
    assert_root();
    const NET: u8 = 35;
    // A workload of node B at the node's end of the veth (10.81.0.1), reached in plaintext by a
    // client outside the mesh (in the namespace): redirected to B's plaintext inbound listener.
    let mesh = Mesh::start_with(
        NET,
        |manifests| {
            format!(
                "{manifests}---
apiVersion: v1
kind: Pod
metadata: {{name: db, namespace: app, labels: {{app: db}}}}
spec: {{nodeName: node-b, serviceAccountName: db}}
status: {{podIP: 10.81.0.1}}
"
            )
        },
        None,
        Some("0.0.0.0:0"),
    );
    let plaintext: SocketAddr = mesh.b.runtime.shards()[0].listeners[1];
    let port = plaintext.port().to_string();
    let ns = ClientNamespace::create(
        2,
        81,
        &[&[
            "-p",
            "tcp",
            "-d",
            "10.81.0.1",
            "--dport",
            "8081",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ]],
    );
    let db = shoal_perf::backend::Backend::start(
        shoal_runtime::RuntimeConfig {
            shards: 1,
            pin: false,
            drain_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        "10.81.0.1:8081".parse().unwrap(),
        "db",
    )
    .expect("db backend");

    // PERMISSIVE (no PeerAuthentication): plaintext is accepted and delivered.
    let (ok, response) = ns.curl("http://10.81.0.1:8081/");
    assert!(ok && response.contains("x-backend: db"), "{response}");
    let metrics = admin_get(mesh.b.admin.local_addr(), "/metrics");
    let opened = metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            "destination_workload=\"db\"",
            "connection_security_policy=\"unknown\"",
        ],
    );
    assert!(opened >= 1.0, "{metrics}");

    // STRICT: refused, and counted with the DENY flag.
    let before = mesh.b.agent.current().version;
    std::fs::write(
        mesh.manifests().join("strict.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: app}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();
    wait_for("STRICT to load", || mesh.b.agent.current().version > before);
    std::thread::sleep(Duration::from_millis(50));
    let (ok, response) = ns.curl("http://10.81.0.1:8081/");
    assert!(
        !ok && response.is_empty(),
        "STRICT refuses plaintext: {response}"
    );
    let metrics = admin_get(mesh.b.admin.local_addr(), "/metrics");
    let failed = metric(
        &metrics,
        "istio_tcp_connections_failed_total",
        &["destination_workload=\"db\"", "response_flags=\"DENY\""],
    );
    assert!(failed >= 1.0, "{metrics}");
    drop(ns);
    db.runtime.begin_drain();
    db.runtime.join();
    mesh.stop();
}
