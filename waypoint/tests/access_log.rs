//! The waypoint's access log as users read it: the binary at `SHOAL_LOG=info` writes one line per
//! request with the method, path, protocol, status, response flags and details, bytes each way,
//! duration, upstream host, authority, request id and the caller's identity — for a request it
//! forwarded and for one its policy refused.

mod common;

use std::time::Duration;

use common::*;
use shoal_perf::process::{ProxyLog, ServerProcess};
use shoal_perf::testkit::log_field;
use shoal_perf::waypoint_bench::proxy_args;

const NET: u8 = 49;

#[test]
fn the_waypoint_writes_one_access_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let (manifests, ca) = shoal_perf::testkit::write_mesh(dir.path(), &on(NET, MESH));
    let backends = start_backends(NET);
    let node = |name: &str| start_node(&manifests, &ca, name, &[]);
    let (a, b) = (node("node-a"), node("node-b"));
    let log = ProxyLog {
        filter: "info".into(),
        dir: dir.path().join("logs"),
    };
    let args = proxy_args(
        &manifests,
        &ca,
        1,
        &["--gateway", "bookinfo/waypoint", "--drain-timeout-s", "2"],
    );
    let waypoint = ServerProcess::start_proxy(
        std::path::Path::new(env!("CARGO_BIN_EXE_waypoint")),
        &args,
        &log,
        "waypoint",
    )
    .expect("the waypoint starts");
    for addr in ["127.40.0.2:15008", "127.40.0.50:15008"] {
        let addr = on(NET, addr);
        wait_for(&format!("HBONE on {addr}"), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
    }
    let productpage = on(NET, "10.40.0.1:9080");
    let curl = |method: &str, path: &str, extra: &[&str]| {
        let mut args = vec!["-X", method];
        args.extend_from_slice(extra);
        curl(
            NET,
            "127.40.0.1",
            a.socks5_addr(),
            &format!("http://{productpage}{path}"),
            &args,
        )
    };
    let (code, response) = curl(
        "GET",
        "/bytes/3000?from=test",
        &["-H", "x-request-id: test-42"],
    );
    assert_eq!((code, status_of(&response)), (0, Some(200)), "{response}");
    // productpage admits only GETs: a POST is refused by the waypoint's policy.
    let (code, response) = curl("POST", "/order", &["-d", "twelve bytes"]);
    assert_eq!((code, status_of(&response)), (0, Some(403)), "{response}");
    assert!(
        waypoint
            .terminate(Duration::from_secs(10))
            .unwrap()
            .success(),
        "SIGTERM drains the waypoint and writes its log"
    );

    let text = std::fs::read_to_string(log.dir.join("waypoint.log")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" access: request "))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let field = log_field;
    let (get, post) = (lines[0], lines[1]);
    for (name, value) in [
        ("method", "GET"),
        ("path", "/bytes/3000?from=test"),
        ("protocol", "HTTP/1.1"),
        ("code", "200"),
        ("flags", "-"),
        ("details", "via_upstream"),
        ("bytes_received", "0"),
        ("upstream_host", &on(NET, "127.40.0.2:9080")),
        ("authority", &productpage),
        ("request_id", "test-42"),
        ("src.identity", "spiffe://cluster.local/ns/default/sa/curl"),
    ] {
        assert_eq!(field(get, name), value, "{name} in {get}");
    }
    assert!(
        field(get, "bytes_sent").parse::<u64>().unwrap() >= 3000,
        "{get}"
    );
    field(get, "duration_ms").parse::<u64>().unwrap();

    for (name, value) in [
        ("method", "POST"),
        ("path", "/order"),
        ("code", "403"),
        // Envoy's words: denied, and no ALLOW policy matched.
        ("details", "rbac_access_denied_matched_policy[none]"),
        ("upstream_host", "-"),
        ("authority", &productpage),
        ("src.identity", "spiffe://cluster.local/ns/default/sa/curl"),
    ] {
        assert_eq!(field(post, name), value, "{name} in {post}");
    }
    // Made here, as Envoy makes it: a version 4 UUID.
    let id = field(post, "request_id");
    assert_eq!((id.len(), id.matches('-').count()), (36, 4), "{post}");

    for node in [a, b] {
        node.runtime.begin_drain();
        node.runtime.join();
    }
    for backend in backends {
        backend.runtime.begin_drain();
        backend.runtime.join();
    }
}
