//! Sidecar mode, the baseline ambient is compared against: app → its sidecar (SOCKS5, plaintext)
//! → HBONE (mTLS) → the server's sidecar (L7 policy with the caller's identity) → the server app.

mod common;
use common::*;

use shoal_perf::backend::Backend;
use shoal_runtime::RuntimeConfig;
use shoal_waypoint::node::{Waypoint, WaypointArgs};
use std::time::Duration;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: side}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: side, labels: {app: client}}
spec: {serviceAccountName: client}
status: {podIP: 127.45.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: side, labels: {app: other}}
spec: {serviceAccountName: other}
status: {podIP: 127.45.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: server-v1, namespace: side, labels: {app: server, version: v1}}
spec: {serviceAccountName: server}
status: {podIP: 127.45.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: server-v2, namespace: side, labels: {app: server, version: v2}}
spec: {serviceAccountName: server}
status: {podIP: 127.45.0.4}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: side}
spec: {clusterIP: 10.45.0.2, selector: {app: server}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: server-v2, namespace: side}
spec: {clusterIP: 10.45.0.4, selector: {app: server, version: v2}, ports: [{name: http, port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: side}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: server-v2, port: 9080}]
  - backendRefs: [{name: server, port: 9080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server, namespace: side}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/side/sa/client]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: v1
kind: Pod
metadata: {name: ws, namespace: side, labels: {app: ws}}
spec: {serviceAccountName: ws}
status: {podIP: 127.45.0.6}
---
apiVersion: v1
kind: Service
metadata: {name: ws, namespace: side}
spec: {clusterIP: 10.45.0.6, selector: {app: ws}, ports: [{name: http, port: 9080}]}
"#;

#[test]
fn a_sidecar_pair_routes_and_enforces_l7_policy_with_the_callers_identity() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("SHOAL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (manifests, ca) = shoal_perf::testkit::write_mesh(dir.path(), MESH);
    let sidecar = |pod: &str| {
        Waypoint::start(&WaypointArgs {
            sidecar: Some(format!("side/{pod}")),
            cert_lifetime_s: 3600,
            header_read_timeout_ms: 5000,
            ..WaypointArgs::on_loopback(manifests.clone(), ca.clone(), config())
        })
        .unwrap_or_else(|e| panic!("sidecar {pod}: {e}"))
    };
    let backend = |ip: &str, name: &str| {
        Backend::start_one_shard(format!("{ip}:9080").parse().unwrap(), name).unwrap()
    };
    let apps = [
        backend("127.45.0.2", "server-v1"),
        backend("127.45.0.4", "server-v2"),
    ];
    let sidecars = [
        sidecar("client"),
        sidecar("other"),
        sidecar("server-v1"),
        sidecar("server-v2"),
        sidecar("ws"),
    ];
    let outbound = |i: usize| sidecars[i].runtime.shards()[0].listeners[1];
    for addr in ["127.45.0.2:15008", "127.45.0.4:15008", "127.45.0.6:15008"] {
        wait_for(addr, || std::net::TcpStream::connect(addr).is_ok());
    }

    // client → server: allowed GETs, spread over both endpoints; /v2 routed to v2 by the client's
    // sidecar.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (code, r) = curl(45, "127.45.0.1", outbound(0), "http://10.45.0.2:9080/", &[]);
        assert_eq!(code, 0, "{r}");
        assert_eq!(status_of(&r), Some(200), "{r}");
        seen.insert(header_of(&r, "x-backend").unwrap_or_default());
    }
    assert_eq!(seen.len(), 2, "both endpoints: {seen:?}");
    let (_, r) = curl(
        45,
        "127.45.0.1",
        outbound(0),
        "http://10.45.0.2:9080/v2/x",
        &[],
    );
    assert_eq!(
        header_of(&r, "x-backend").as_deref(),
        Some("server-v2"),
        "{r}"
    );

    // The app may speak HTTP/2 with prior knowledge to its sidecar (the port says http).
    let (code, r) = curl(
        45,
        "127.45.0.1",
        outbound(0),
        "http://10.45.0.2:9080/status/202",
        &["--http2-prior-knowledge"],
    );
    assert_eq!(code, 0, "{r}");
    assert!(r.starts_with("HTTP/2 202"), "{r}");

    // The server's sidecar denies a POST, and any call from another identity (403).
    let (_, r) = curl(
        45,
        "127.45.0.1",
        outbound(0),
        "http://10.45.0.2:9080/",
        &["-X", "POST"],
    );
    assert_eq!(status_of(&r), Some(403), "{r}");
    let (_, r) = curl(45, "127.45.0.3", outbound(1), "http://10.45.0.2:9080/", &[]);
    assert_eq!(status_of(&r), Some(403), "{r}");

    // A WebSocket upgrade from the app: the 101 comes back through both sidecars, then bytes flow
    // both ways.
    let server = upgrade_echo_server("127.45.0.6:9080");
    upgrade_and_echo(socks_connect(outbound(0), "127.45.0.1", "10.45.0.6:9080"));
    server.join().unwrap();

    // Both sides count the requests with their reporter.
    let source = admin_get(sidecars[0].admin.local_addr(), "/metrics");
    assert!(
        metric(
            &source,
            "istio_requests_total",
            &["reporter=\"source\"", "response_code=\"200\""]
        ) >= 7.0,
        "{source}"
    );
    let destination = admin_get(sidecars[2].admin.local_addr(), "/metrics");
    assert!(
        metric(
            &destination,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                "source_principal=\"spiffe://cluster.local/ns/side/sa/client\""
            ]
        ) >= 1.0,
        "{destination}"
    );

    for s in sidecars {
        s.runtime.begin_drain();
        s.runtime.join();
    }
    for a in apps {
        a.runtime.begin_drain();
        a.runtime.join();
    }
}

/// An unmodified curl in its own network namespace (the pod), its traffic redirected by iptables
/// to its sidecar's capture listener, as Istio's sidecar takes it on 15001: a service of the mesh
/// is reached over HBONE through the server's sidecar, routed by the client's; an address outside
/// the mesh passes through as plain TCP. Needs root, `ip` and `iptables` (CI runs as root).
#[test]
fn an_unmodified_app_is_captured_by_its_sidecar() {
    shoal_perf::testkit::assert_root();
    // The client pod lives in the namespace at 10.82.0.2; the rest of the mesh on 127.46/16.
    let mesh = MESH
        .replace("127.45.", "127.46.")
        .replace("10.45.", "10.46.")
        .replace("status: {podIP: 127.46.0.1}", "status: {podIP: 10.82.0.2}");
    let dir = tempfile::tempdir().unwrap();
    let (manifests, ca) = shoal_perf::testkit::write_mesh(dir.path(), &mesh);
    let args = |pod: &str| WaypointArgs {
        sidecar: Some(format!("side/{pod}")),
        cert_lifetime_s: 3600,
        header_read_timeout_ms: 5000,
        ..WaypointArgs::on_loopback(manifests.clone(), ca.clone(), config())
    };
    // The client's sidecar runs in the node's namespace (node-level capture), so it serves HBONE
    // on an address of its own there.
    let client = Waypoint::start(&WaypointArgs {
        listen: Some("127.46.0.1:15008".parse().unwrap()),
        redirect: Some("0.0.0.0:0".parse().unwrap()),
        ..args("client")
    })
    .expect("client sidecar");
    let servers = [
        Waypoint::start(&args("server-v1")).expect("server-v1 sidecar"),
        Waypoint::start(&args("server-v2")).expect("server-v2 sidecar"),
    ];
    let app_config = || RuntimeConfig {
        shards: 1,
        pin: false,
        drain_timeout: Duration::from_secs(1),
        ..RuntimeConfig::default()
    };
    let apps = [
        Backend::start(
            app_config(),
            "127.46.0.2:9080".parse().unwrap(),
            "server-v1",
        )
        .unwrap(),
        Backend::start(
            app_config(),
            "127.46.0.4:9080".parse().unwrap(),
            "server-v2",
        )
        .unwrap(),
    ];
    for addr in ["127.46.0.2:15008", "127.46.0.4:15008"] {
        wait_for(addr, || std::net::TcpStream::connect(addr).is_ok());
    }
    let port = client.runtime.shards()[0].listeners[2].port().to_string();
    let ns = shoal_perf::testkit::PodNamespace::create(
        1,
        82,
        &[&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &port]],
    );
    // Outside the mesh, at the node's end of the pod's veth (there once the namespace is).
    let outside =
        Backend::start(app_config(), "10.82.0.1:9099".parse().unwrap(), "outside").unwrap();

    // To the service: the client's sidecar routes /v2 to v2, and the server's sidecar lets the
    // client's identity GET.
    let (ok, r) = ns.curl("http://10.46.0.2:9080/v2/x");
    assert!(ok, "{r}");
    assert_eq!(status_of(&r), Some(200), "{r}");
    assert_eq!(
        header_of(&r, "x-backend").as_deref(),
        Some("server-v2"),
        "{r}"
    );
    let source = admin_get(client.admin.local_addr(), "/metrics");
    assert_eq!(
        metric(
            &source,
            "istio_requests_total",
            &[
                "reporter=\"source\"",
                "response_code=\"200\"",
                "connection_security_policy=\"mutual_tls\""
            ]
        ),
        1.0,
        "{source}"
    );
    // The default route: the service's endpoints.
    let (_, r) = ns.curl("http://10.46.0.2:9080/");
    assert_eq!(status_of(&r), Some(200), "{r}");
    assert!(
        header_of(&r, "x-backend").is_some_and(|b| b.starts_with("server-")),
        "{r}"
    );

    // Elsewhere: passed through as TCP, not as a request of the mesh.
    let (ok, r) = ns.curl("http://10.82.0.1:9099/");
    assert!(ok, "{r}");
    assert_eq!(
        header_of(&r, "x-backend").as_deref(),
        Some("outside"),
        "{r}"
    );
    let after = admin_get(client.admin.local_addr(), "/metrics");
    assert_eq!(
        metric(&after, "istio_requests_total", &["reporter=\"source\""]),
        2.0,
        "{after}"
    );

    drop(ns);
    for p in [client].into_iter().chain(servers) {
        p.runtime.begin_drain();
        p.runtime.join();
    }
    for a in apps.into_iter().chain([outside]) {
        a.runtime.begin_drain();
        a.runtime.join();
    }
}
