//! The waypoint's access log as users read it: the binary at `SHOAL_LOG=info` writes one line per
//! request with the method, path, protocol, status, response flags and details, bytes each way,
//! duration, upstream host, authority, request id and the caller's identity — for a request it
//! forwarded and for one its policy refused.

mod common;

use common::*;
use shoal_perf::testkit::log_field;

const NET: u8 = 49;

#[test]
fn the_waypoint_writes_one_access_line_per_request() {
    let mut mesh = WaypointProcessMesh::start(NET, "info", &["--drain-timeout-s", "2"]);
    let productpage = on(NET, "10.40.0.1:9080");
    let curl = |method: &str, path: &str, extra: &[&str]| {
        let mut args = vec!["-X", method];
        args.extend_from_slice(extra);
        curl(
            NET,
            "127.40.0.1",
            mesh.a.socks5_addr(),
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
        mesh.terminate_waypoint().success(),
        "SIGTERM drains the waypoint and writes its log"
    );

    let text = std::fs::read_to_string(mesh.log.dir.join("waypoint.log")).unwrap();
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

    mesh.stop();
}
