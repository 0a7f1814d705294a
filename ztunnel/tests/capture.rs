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
use std::time::Duration;

use common::*;
use shoal_perf::testkit::{assert_root, PodNamespace};

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
    let ns = PodNamespace::create(
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
fn a_connection_straight_to_the_capture_listener_is_refused_not_looped() {
    const NET: u8 = 38;
    // Bound to one address, so the listener's own address is known without asking the kernel per
    // connection. A client that dials it directly was not redirected: there is no NAT record (or
    // one naming the listener itself), and forwarding it anywhere would be wrong or loop.
    let mesh = Mesh::start_with(NET, |m| m.to_string(), Some("127.38.0.50:0"), None);
    let redirect: SocketAddr = mesh.a.runtime.shards()[0].listeners[1];
    assert_eq!(redirect.ip().to_string(), "127.38.0.50");
    let mut client = std::net::TcpStream::connect(redirect).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    use std::io::{Read, Write};
    let _ = client.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed at once, got {other:?}"),
    }
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
    let ns = PodNamespace::create(
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
    let db = shoal_perf::backend::Backend::start_one_shard("10.81.0.1:8081".parse().unwrap(), "db")
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
