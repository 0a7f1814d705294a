//! Two ztunnels (two nodes), real backends on their pods' loopback addresses, and curl as the
//! client (through SOCKS5, from its pod's address): bytes intact through HBONE, a service's two
//! endpoints on two nodes both reached, L4 policy enforced with the peer's identity and changed
//! without a restart, plain TCP to a workload outside ambient, and clean refusals.

mod common;

use common::*;

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
    // A connection still open has its bytes counted already (as Istio's ztunnel counts them),
    // on both nodes: from pod `other`, the only traffic with its labels.
    let mut open = KeepAlive::open("127.30.0.4", socks, "127.30.0.2:8080");
    let response = open.get();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let source = ["reporter=\"source\"", "source_workload=\"other\""];
    let destination = ["reporter=\"destination\"", "source_workload=\"other\""];
    // The client can read the response a moment before the ztunnels' tasks see their writes
    // complete: give the counters that moment.
    let scrape = |admin: std::net::SocketAddr, labels: &[&str]| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = admin_get(admin, "/metrics");
            let settled = metric(&text, "istio_tcp_sent_bytes_total", labels) > 0.0
                && metric(&text, "istio_tcp_received_bytes_total", labels) > 0.0;
            if settled || std::time::Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let a = scrape(mesh.a.admin.local_addr(), &source);
    let b = scrape(mesh.b.admin.local_addr(), &destination);
    assert_eq!(
        metric(&a, "istio_tcp_connections_closed_total", &source),
        0.0,
        "{a}"
    );
    let request_bytes = b"GET / HTTP/1.1\r\nhost: web\r\n\r\n".len() as f64;
    assert_eq!(
        metric(&a, "istio_tcp_sent_bytes_total", &source),
        request_bytes,
        "{a}"
    );
    assert_eq!(
        metric(&a, "istio_tcp_received_bytes_total", &source),
        response.len() as f64,
        "{a}"
    );
    // Both reporters count client → server as sent.
    assert_eq!(
        metric(&b, "istio_tcp_sent_bytes_total", &destination),
        request_bytes,
        "{b}"
    );
    assert_eq!(
        metric(&b, "istio_tcp_received_bytes_total", &destination),
        response.len() as f64,
        "{b}"
    );
    drop(open);
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
    // A keep-alive connection opened now, before any policy, carries on after one denies.
    let mut open = KeepAlive::open("127.31.0.4", socks, "127.31.0.2:8080");
    assert!(open.get().starts_with("HTTP/1.1 200"));

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
    assert!(
        open.get().starts_with("HTTP/1.1 200"),
        "the connection from before the policies keeps going"
    );
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

/// A stand-in waypoint: an HBONE server with the waypoint's identity that records each CONNECT's
/// authority and forwards the tunnel to `forward_to` (as an L4 waypoint would, to an endpoint).
fn stand_in_waypoint(
    mesh: &Mesh,
    addr: &str,
    forward_to: String,
) -> (shoal_runtime::Runtime, std::sync::mpsc::Receiver<String>) {
    use shoal_hbone::ca::{CertificateAuthority, LocalCa};
    use std::sync::Arc;
    let ca: Arc<dyn CertificateAuthority> =
        Arc::new(LocalCa::load(&mesh.dir.path().join("ca")).unwrap());
    let trust = shoal_hbone::tls::Trust::new(&ca.roots(), "cluster.local").unwrap();
    let identity = shoal_hbone::Identity::parse("spiffe://cluster.local/ns/app/sa/wp").unwrap();
    let certs = shoal_hbone::certs::WorkloadCerts::issue(
        ca,
        identity,
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    let tls = Arc::new(shoal_hbone::tls::server_config(certs, &trust).unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let config = shoal_runtime::RuntimeConfig {
        shards: 1,
        pin: false,
        drain_timeout: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let rt = shoal_runtime::Runtime::builder(config)
        .listener(shoal_runtime::ListenerSpec::new("waypoint", addr.parse().unwrap()))
        .start(move |shard| {
            let (tls, tx, forward_to) = (tls.clone(), tx.clone(), forward_to.clone());
            async move {
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |tcp, _| {
                            let (tls, tx, forward_to, drain) = (tls.clone(), tx.clone(), forward_to.clone(), shard.drain().clone());
                            async move {
                                let Ok((stream, peer)) = shoal_hbone::stream::accept(tcp, tls).await else { return };
                                let handler = move |connect: shoal_hbone::connect::InboundConnect, responder: shoal_hbone::server::Responder| {
                                    let (tx, forward_to) = (tx.clone(), forward_to.clone());
                                    async move {
                                        let _ = tx.send(connect.authority.to_string());
                                        let Ok(upstream) = monoio::net::TcpStream::connect(forward_to.as_str()).await else {
                                            responder.refuse(http::StatusCode::SERVICE_UNAVAILABLE);
                                            return;
                                        };
                                        if let Ok(tunnel) = responder.accept() {
                                            let _ = shoal_hbone::tunnel::copy_tcp_tunnel(upstream, tunnel).await;
                                        }
                                    }
                                };
                                let _ = shoal_hbone::server::serve(stream, peer, handler, async move { drain.wait().await }).await;
                            }
                        })
                        .await;
                }
            }
        })
        .expect("stand-in waypoint");
    (rt, rx)
}

#[test]
fn a_waypoint_bound_service_goes_through_its_waypoint_and_fails_open_without_one() {
    const NET: u8 = 36;
    let mesh = Mesh::start_with(
        NET,
        |m| {
            format!(
                "{m}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: wp, namespace: app}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
  addresses: [{{type: IPAddress, value: 127.36.0.9}}]
---
apiVersion: v1
kind: Service
metadata: {{name: via-wp, namespace: app, labels: {{istio.io/use-waypoint: wp}}}}
spec: {{clusterIP: 10.250.0.2, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: down, namespace: app}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Service
metadata: {{name: dark, namespace: app, labels: {{istio.io/use-waypoint: down}}}}
spec: {{clusterIP: 10.250.0.3, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}
"
            )
        },
        None,
        None,
    );
    let (waypoint, authorities) =
        stand_in_waypoint(&mesh, "127.36.0.9:15008", "127.36.0.2:8080".into());
    let socks = mesh.a.socks5_addr();

    // Bound: HBONE to the waypoint's address, with the service VIP as the CONNECT authority.
    let (code, response) = curl(NET, "127.30.0.1", socks, "http://10.250.0.2/", &[]);
    assert_eq!(code, 0, "{response}");
    assert_eq!(
        backend_of(&response).as_deref(),
        Some("web-1"),
        "{response}"
    );
    assert_eq!(
        authorities
            .recv_timeout(std::time::Duration::from_secs(5))
            .ok()
            .as_deref(),
        Some("10.250.0.2:80")
    );

    // Its waypoint has no address: straight to an endpoint (fail open), not through any waypoint.
    let (code, response) = curl(NET, "127.30.0.1", socks, "http://10.250.0.3/", &[]);
    assert_eq!(code, 0, "{response}");
    assert!(
        matches!(backend_of(&response).as_deref(), Some("web-1" | "web-2")),
        "{response}"
    );
    assert!(
        authorities.try_recv().is_err(),
        "the unready waypoint's service did not go to a waypoint"
    );

    waypoint.begin_drain();
    waypoint.join();
    mesh.stop();
}

/// An HTTP/1.1 keep-alive connection through a SOCKS5 proxy, from a pod's address.
struct KeepAlive(std::net::TcpStream);

impl KeepAlive {
    fn open(from: &str, socks: std::net::SocketAddr, to: &str) -> KeepAlive {
        use std::io::{Read, Write};
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(
                &format!("{from}:0")
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.connect(&socks.into()).unwrap();
        let mut s: std::net::TcpStream = socket.into();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(&[5, 1, 0]).unwrap();
        let mut reply = [0u8; 2];
        s.read_exact(&mut reply).unwrap();
        let to: std::net::SocketAddrV4 = to.parse().unwrap();
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&to.ip().octets());
        request.extend_from_slice(&to.port().to_be_bytes());
        s.write_all(&request).unwrap();
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(reply[1], 0, "SOCKS5 CONNECT succeeded");
        KeepAlive(s)
    }

    /// One request on the connection; the response head and body (`ok\n`).
    fn get(&mut self) -> String {
        use std::io::{Read, Write};
        self.0
            .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            .unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while !response.ends_with(b"ok\n") {
            let n = self.0.read(&mut buf).unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&response));
            response.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&response).into_owned()
    }
}

#[test]
fn a_pod_added_by_reload_gets_a_listener_a_certificate_and_traffic_and_loses_them_when_it_goes() {
    const NET: u8 = 37;
    let mesh = Mesh::start(NET);
    let socks = mesh.a.socks5_addr();
    let config = shoal_runtime::RuntimeConfig {
        shards: 1,
        pin: false,
        drain_timeout: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let backend =
        shoal_perf::backend::Backend::start(config, "127.37.0.5:8080".parse().unwrap(), "web-3")
            .expect("backend");
    let before = mesh.b.agent.current().version;
    std::fs::write(
        mesh.manifests().join("more.yaml"),
        "apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: app, labels: {app: extra}}
spec: {nodeName: node-b, serviceAccountName: extra}
status: {podIP: 127.37.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: extra, namespace: app}
spec: {clusterIP: 10.250.0.5, selector: {app: extra}, ports: [{port: 80, targetPort: 8080}]}
",
    )
    .unwrap();
    wait_for("the reload", || mesh.b.agent.current().version > before);
    // Node B binds HBONE on the new pod's address and issues its identity's certificate (off the
    // shards, on the certificate thread).
    wait_for("HBONE on the new pod", || {
        std::net::TcpStream::connect("127.37.0.5:15008").is_ok()
    });
    wait_for("the new identity's certificate", || {
        admin_get(mesh.b.admin.local_addr(), "/config_dump")
            .contains("spiffe://cluster.local/ns/app/sa/extra")
    });
    wait_for("node A to know the service", || {
        mesh.a
            .agent
            .current()
            .value
            .service_by_host("extra.app.svc.cluster.local")
            .is_some()
    });
    let (code, response) = curl(NET, "127.30.0.1", socks, "http://10.250.0.5/", &[]);
    assert_eq!(
        (code, backend_of(&response).as_deref()),
        (0, Some("web-3")),
        "{response}"
    );
    // The pod goes: its address is no longer served (every shard closes its listener).
    std::fs::remove_file(mesh.manifests().join("more.yaml")).unwrap();
    wait_for("the HBONE listener to close", || {
        std::net::TcpStream::connect("127.37.0.5:15008").is_err()
    });
    backend.runtime.begin_drain();
    backend.runtime.join();
    mesh.stop();
}
