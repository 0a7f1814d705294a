//! Transparent capture: an unmodified curl in its own network namespace (the client pod) dials a
//! service VIP; iptables redirects the connection to ztunnel's redirect listener, which reads the
//! original destination (SO_ORIGINAL_DST) and carries it over HBONE to the other node. Needs root,
//! `ip` and `iptables` (CI runs as root; .ci/run installs iptables).
//!
//! The rule sits in the node's PREROUTING for the pod's veth (node-level capture), since ztunnel
//! runs in the node's namespace here rather than opening its sockets inside the pod's.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;

const NET: u8 = 33;

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

/// A client namespace joined to the node by a veth pair, and the REDIRECT rule; all removed on drop.
struct ClientNamespace {
    name: String,
    host_veth: String,
    rule: Vec<String>,
}

impl ClientNamespace {
    fn create(redirect_port: u16) -> ClientNamespace {
        let id = std::process::id() % 100_000;
        let name = format!("shoal-cap-{id}");
        let host_veth = format!("shc{id}h");
        let pod_veth = format!("shc{id}p");
        let ns = ClientNamespace {
            name: name.clone(),
            host_veth: host_veth.clone(),
            rule: [
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                &host_veth,
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &redirect_port.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        };
        sh(&["ip", "netns", "add", &name]);
        sh(&[
            "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", &pod_veth,
        ]);
        sh(&["ip", "link", "set", &pod_veth, "netns", &name]);
        sh(&["ip", "addr", "add", "10.80.0.1/24", "dev", &host_veth]);
        sh(&["ip", "link", "set", &host_veth, "up"]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            "10.80.0.2/24",
            "dev",
            &pod_veth,
        ]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", &pod_veth, "up",
        ]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &name,
            "ip",
            "route",
            "add",
            "default",
            "via",
            "10.80.0.1",
        ]);
        let rule: Vec<&str> = std::iter::once("iptables")
            .chain(ns.rule.iter().map(String::as_str))
            .collect();
        sh(&rule);
        ns
    }
}

impl Drop for ClientNamespace {
    fn drop(&mut self) {
        let mut delete: Vec<String> = self.rule.clone();
        delete[2] = "-D".into();
        let _ = Command::new("iptables").args(&delete).output();
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
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    assert!(is_root, "the capture test needs root (CI runs as root)");
    // The client pod lives in the namespace at 10.80.0.2, on node-a.
    let mesh = Mesh::start_with(
        NET,
        |manifests| manifests.replace("status: {podIP: 127.33.0.1}", "status: {podIP: 10.80.0.2}"),
        Some("0.0.0.0:0"),
    );
    let redirect: SocketAddr = mesh.a.runtime.shards()[0].listeners[1];
    let ns = ClientNamespace::create(redirect.port());

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "curl",
                "-s",
                "-i",
                "--max-time",
                "10",
                "http://10.250.0.1/",
            ])
            .output()
            .expect("curl");
        let response = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{response} {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
