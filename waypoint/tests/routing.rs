//! Each match kind and filter, the waypoint's own answers (404/500/503/504, redirects), HTTP/2
//! inside the tunnel, and large bodies both ways with checksums.

mod common;
use common::*;

const ROUTES: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: bookinfo}
spec: {clusterIP: 10.40.0.9, selector: {app: productpage}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: h2, namespace: bookinfo}
spec: {clusterIP: 10.40.0.10, selector: {app: productpage}, ports: [{name: http2, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: bookinfo}
spec: {clusterIP: 10.40.0.11, selector: {app: nobody}, ports: [{name: http, port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /headers}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-added, value: "yes"}], remove: [x-remove-me]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-resp, value: "1"}]}
  - matches: [{path: {type: PathPrefix, value: /rw}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /status}}}]
  - matches: [{path: {type: Exact, value: /redirect}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: moved.example, statusCode: 301}}]
  - matches: [{path: {type: Exact, value: /missing}}]
    backendRefs: [{name: nothere, port: 9080}]
  - matches: [{path: {type: Exact, value: /empty}}]
    backendRefs: [{name: empty, port: 9080}]
  - matches: [{path: {type: Exact, value: /slow}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /delay/3000}}}]
    timeouts: {request: 300ms}
  - matches: [{path: {type: PathPrefix, value: /bytes}}, {headers: [{name: x-pick, value: me}], path: {type: Exact, value: /picked}}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}, method: PUT}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /status/201}}}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: reviews-v2, port: 9080}}}]
  - matches: [{path: {type: Exact, value: /q}, queryParams: [{name: v, value: "2"}]}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /status/202}}}]
"#;

#[test]
fn matches_filters_and_the_waypoints_own_answers() {
    const NET: u8 = 41;
    let mesh = Mesh::start_with(NET, |m| format!("{m}{}", on(NET, ROUTES)));
    let get = |path: &str, extra: &[&str]| {
        let (code, r) = mesh.curl("127.40.0.1", &format!("http://10.40.0.9:9080{path}"), extra);
        assert_eq!(code, 0, "curl {path}: {r}");
        r
    };

    // Twenty clients at once to an HTTP/2 port: each of the waypoint's two shards opens one upstream
    // HTTP/2 connection for all its clients (requests that arrive during the handshake wait for it).
    let codes = curl_repeat(
        &on(NET, "127.40.0.1"),
        mesh.a.socks5_addr(),
        &on(NET, "http://10.40.0.10:9080/delay/50"),
        20,
        Some(20),
        "%{http_code}\n",
        &[],
    );
    assert_eq!(codes.lines().filter(|l| *l == "200").count(), 20, "{codes}");
    let text = admin_get(mesh.b.metrics.local_addr(), "/metrics");
    let opened = metric(
        &text,
        "istio_tcp_connections_opened_total",
        &["destination_workload=\"productpage\"", "sa/waypoint"],
    );
    let tcp: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened"))
        .collect();
    assert!(
        (1.0..=2.0).contains(&opened),
        "one HTTP/2 connection per shard for twenty clients: {tcp:#?}"
    );

    // RequestHeaderModifier reaches the backend; ResponseHeaderModifier reaches the client.
    let r = get("/headers/a", &["-H", "x-remove-me: 1", "-H", "x-kept: 2"]);
    assert_eq!(status_of(&r), Some(200), "{r}");
    assert_eq!(
        header_of(&r, "x-echo-x-added").as_deref(),
        Some("yes"),
        "{r}"
    );
    assert_eq!(header_of(&r, "x-echo-x-kept").as_deref(), Some("2"), "{r}");
    assert_eq!(header_of(&r, "x-echo-x-remove-me"), None, "{r}");
    assert_eq!(header_of(&r, "x-resp").as_deref(), Some("1"), "{r}");

    // URLRewrite replaces the matched prefix (whole segments) or the full path.
    let r = get("/rw/418", &[]);
    assert_eq!(status_of(&r), Some(418), "{r}");
    assert_eq!(
        header_of(&r, "x-path").as_deref(),
        Some("/status/418"),
        "{r}"
    );

    // Regular expression with a method; query parameter match; header match.
    assert_eq!(status_of(&get("/re/12", &["-X", "PUT"])), Some(201));
    assert_eq!(
        status_of(&get("/re/12", &[])),
        Some(404),
        "method must match"
    );
    assert_eq!(status_of(&get("/q?v=2", &[])), Some(202));
    assert_eq!(status_of(&get("/q?v=3", &[])), Some(404));
    assert_eq!(status_of(&get("/picked", &["-H", "x-pick: me"])), Some(200));
    assert_eq!(status_of(&get("/picked", &[])), Some(404));

    // The waypoint's own answers.
    let r = get("/redirect?a=1", &[]);
    assert_eq!(status_of(&r), Some(301), "{r}");
    assert_eq!(
        header_of(&r, "location").as_deref(),
        Some("http://moved.example/redirect?a=1"),
        "{r}"
    );
    assert_eq!(status_of(&get("/missing", &[])), Some(500));
    assert_eq!(status_of(&get("/empty", &[])), Some(503));
    assert_eq!(
        status_of(&get("/nope", &[])),
        Some(404),
        "a route is attached: no match is 404"
    );
    let started = std::time::Instant::now();
    assert_eq!(status_of(&get("/slow", &[])), Some(504));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "timed out at 300 ms, not the backend's 3 s"
    );

    // RequestMirror: the client's answer comes from the route's backend; a copy reaches
    // reviews-v2 (node B's ztunnel counts the waypoint's connection to it).
    let r = get("/mirror/x", &[]);
    assert_eq!(
        header_of(&r, "x-backend").as_deref(),
        Some("productpage-v1"),
        "{r}"
    );
    wait_for("the mirrored request to reach reviews-v2", || {
        let text = admin_get(mesh.b.metrics.local_addr(), "/metrics");
        metric(
            &text,
            "istio_tcp_connections_opened_total",
            &["destination_workload=\"reviews\"", "sa/waypoint"],
        ) >= 1.0
    });
    // A request with a body is mirrored with it, once the real exchange has read it.
    let mirrored_before = mesh.backends[2].received_body_bytes();
    let body = "m".repeat(5000);
    let r = get("/mirror/y", &["-d", &body]);
    assert_eq!(
        header_of(&r, "x-received-bytes").as_deref(),
        Some("5000"),
        "{r}"
    );
    wait_for("the mirrored body to reach reviews-v2", || {
        mesh.backends[2].received_body_bytes() == mirrored_before + 5000
    });

    // HTTP/2 inside the tunnel: prior knowledge from curl, h2 to a port declared http2.
    let (code, r) = mesh.curl(
        "127.40.0.1",
        "http://10.40.0.10:9080/status/201",
        &["--http2-prior-knowledge"],
    );
    assert_eq!(code, 0, "{r}");
    assert!(r.starts_with("HTTP/2 201"), "{r}");
    // gRPC-style trailers pass through end to end (HTTP/2 both sides).
    let (code, r) = mesh.curl(
        "127.40.0.1",
        "http://10.40.0.10:9080/trailers",
        &["--http2-prior-knowledge", "-v"],
    );
    assert_eq!(code, 0, "{r}");
    let after_body = r.split_once("\nok\n").map(|(_, t)| t).unwrap_or_default();
    assert!(after_body.contains("grpc-status: 0"), "trailers lost: {r}");
    assert!(after_body.contains("grpc-message: ok"), "{r}");
    // And HTTP/2 from the client to an HTTP/1.1 port.
    let r = get(
        "/headers/x",
        &["--http2-prior-knowledge", "-H", "x-kept: h2"],
    );
    assert!(r.starts_with("HTTP/2 200"), "{r}");
    assert_eq!(header_of(&r, "x-echo-x-kept").as_deref(), Some("h2"), "{r}");

    // Large bodies both ways, checked: 8 MiB up (Content-Length, then chunked), 8 MB down.
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("up");
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&upload, &data).unwrap();
    let crc = format!("{:08x}", crc32fast::hash(&data));
    let down = dir.path().join("down");
    for chunked in [false, true] {
        let mut args = vec![
            "-o".to_string(),
            down.display().to_string(),
            "-D".into(),
            "-".into(),
        ];
        if chunked {
            args.extend([
                "-T".into(),
                upload.display().to_string(),
                "-H".into(),
                "transfer-encoding: chunked".into(),
                "-X".into(),
                "POST".into(),
            ]);
        } else {
            args.extend(["--data-binary".into(), format!("@{}", upload.display())]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = get("/bytes/8000000", &refs);
        assert_eq!(status_of(&r), Some(200), "{r}");
        assert_eq!(
            header_of(&r, "x-received-bytes").as_deref(),
            Some("8388608"),
            "chunked={chunked} {r}"
        );
        assert_eq!(
            header_of(&r, "x-received-crc32"),
            Some(crc.clone()),
            "chunked={chunked} {r}"
        );
        // `-i` writes the heads into the file too: the body follows the last one.
        let got = std::fs::read(&down).unwrap();
        let head_end = got[..got.len().min(4096)]
            .windows(4)
            .rposition(|w| w == b"\r\n\r\n")
            .map_or(0, |i| i + 4);
        let got = &got[head_end..];
        assert_eq!(got.len(), 8_000_000);
        assert!(got.iter().all(|b| *b == b'x'));
    }
    mesh.stop();
}

/// A service port declared TCP is carried through the waypoint as bytes, under the policy's L4
/// parts; a caller the policy does not name is cut off.
#[test]
fn tcp_ports_are_carried_as_l4_through_the_waypoint() {
    const NET: u8 = 46;
    let mesh = Mesh::start_with(NET, |m| {
        format!(
            "{m}{}",
            on(
                NET,
                r#"---
apiVersion: v1
kind: Service
metadata: {name: raw, namespace: bookinfo}
spec: {clusterIP: 10.40.0.20, selector: {app: productpage}, ports: [{name: tcp-raw, port: 9080, protocol: TCP}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: raw, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: raw}]
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/curl]}}]}]
"#
            )
        )
    });
    // HTTP bytes over a TCP port: the waypoint does not parse them, the backend answers.
    let (code, r) = mesh.curl("127.40.0.1", "http://10.40.0.20:9080/status/201", &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(status_of(&r), Some(201), "{r}");
    assert_eq!(
        header_of(&r, "x-backend").as_deref(),
        Some("productpage-v1"),
        "{r}"
    );
    // No x-request-id: nothing was added at L7.
    assert_eq!(header_of(&r, "x-echo-x-request-id"), None, "{r}");
    // Counted with Istio's TCP metrics, both ways (the waypoint's copy adds the bytes a moment
    // after the client may have read them: give it that moment).
    let labels = [
        "reporter=\"waypoint\"",
        "destination_service_name=\"raw\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/curl\"",
        "request_protocol=\"tcp\"",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let text = admin_get(mesh.waypoint.admin.local_addr(), "/metrics");
        let counted = metric(&text, "istio_tcp_received_bytes_total", &labels) >= r.len() as f64;
        if counted || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &labels),
        1.0,
        "{text}"
    );
    assert!(
        metric(&text, "istio_tcp_sent_bytes_total", &labels) >= 40.0,
        "the request's bytes: {text}"
    );
    assert!(
        metric(&text, "istio_tcp_received_bytes_total", &labels) >= r.len() as f64,
        "at least the response curl printed: {text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("istio_tcp") && l.contains("response_code")),
        "TCP series carry no response code: {text}"
    );
    // Another identity: the waypoint closes the tunnel without an answer.
    let (code, r) = mesh.curl("127.40.0.4", "http://10.40.0.20:9080/", &[]);
    assert_ne!(code, 0, "the denied caller got an answer: {r}");
    assert!(status_of(&r).is_none(), "{r}");
    mesh.stop();
}

/// VirtualService `http` routes, for services without an HTTPRoute: first match wins, subsets
/// from the DestinationRule, header matches, uri rewrite, headers, timeout.
#[test]
fn virtual_service_routes_apply_in_order_with_subsets() {
    const NET: u8 = 47;
    let mesh = Mesh::start_with(NET, |m| {
        format!(
            "{m}{}",
            on(
                NET,
                r#"---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec: {clusterIP: 10.40.0.30, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: ratings, subset: v2}}]
    headers: {request: {set: {x-vs: jason}}}
  - match: [{uri: {prefix: /slow}}]
    rewrite: {uri: /delay/3000}
    timeout: 300ms
    route: [{destination: {host: ratings, subset: v1}}]
  - match: [{uri: {prefix: /api}}, {uri: {exact: /}}]
    route: [{destination: {host: ratings, subset: v1}}]
"#
            )
        )
    });
    let get = |path: &str, extra: &[&str]| {
        let (code, r) = mesh.curl(
            "127.40.0.1",
            &format!("http://10.40.0.30:9080{path}"),
            extra,
        );
        assert_eq!(code, 0, "curl {path}: {r}");
        r
    };
    for _ in 0..6 {
        let r = get("/", &["-H", "end-user: jason"]);
        assert_eq!(
            header_of(&r, "x-backend").as_deref(),
            Some("reviews-v2"),
            "{r}"
        );
        assert_eq!(
            header_of(&r, "x-echo-x-vs").as_deref(),
            Some("jason"),
            "{r}"
        );
        let r = get("/api/x", &[]);
        assert_eq!(
            header_of(&r, "x-backend").as_deref(),
            Some("reviews-v1"),
            "{r}"
        );
    }
    let started = std::time::Instant::now();
    let r = get("/slow", &[]);
    assert_eq!(status_of(&r), Some(504), "{r}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    // A VirtualService is in force and no rule matched: 404.
    assert_eq!(status_of(&get("/other", &[])), Some(404));
    mesh.stop();
}

/// A waypoint for workloads (`istio.io/waypoint-for: all`): traffic to a pod's own address goes
/// through it, under the policies attached to its Gateway.
#[test]
fn pods_addressed_directly_go_through_a_workload_waypoint() {
    const NET: u8 = 48;
    let mesh = Mesh::start_with(NET, |m| {
        let m = m.replace(
            "istio.io/waypoint-for: service",
            "istio.io/waypoint-for: all",
        );
        format!(
            "{m}{}",
            on(
                NET,
                r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-posts, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
"#
            )
        )
    });
    let (code, r) = mesh.curl("127.40.0.1", "http://127.40.0.2:9080/status/202", &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(status_of(&r), Some(202), "{r}");
    assert_eq!(
        header_of(&r, "x-backend").as_deref(),
        Some("productpage-v1"),
        "{r}"
    );
    // It went through the waypoint: an L7 policy on the Gateway applies, and it is counted there.
    let (_, r) = mesh.curl(
        "127.40.0.1",
        "http://127.40.0.2:9080/",
        &["-X", "POST", "-d", "x"],
    );
    assert_eq!(status_of(&r), Some(403), "{r}");
    let text = admin_get(mesh.waypoint.admin.local_addr(), "/metrics");
    assert!(
        metric(
            &text,
            "istio_requests_total",
            &[
                "destination_workload=\"productpage\"",
                "response_code=\"202\""
            ]
        ) >= 1.0,
        "{text}"
    );
    mesh.stop();
}
