//! Smuggling attempts, header floods and broken framing, sent raw through node A's SOCKS5 port:
//! each is refused or cut, nothing smuggled reaches a backend, and the waypoint keeps serving.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A TCP connection from `from` through node A's SOCKS5 to `to` (IPv4).
fn socks(mesh: &Mesh, from: &str, to: &str) -> TcpStream {
    socks_connect(mesh.a.socks5_addr(), &on(mesh.net, from), &on(mesh.net, to))
}

/// Sends raw bytes and reads until the peer closes (or 10 s pass).
fn exchange(mesh: &Mesh, raw: &str) -> String {
    let mut s = socks(mesh, "127.40.0.1", "10.40.0.2:9080");
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a Content-Length body, whole.
fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
}

fn statuses(text: &str) -> Vec<u16> {
    text.lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .filter_map(|l| l.split(' ').nth(1)?.parse().ok())
        .collect()
}

#[test]
fn smuggling_floods_and_bad_framing_are_refused_and_the_waypoint_carries_on() {
    const NET: u8 = 42;
    let mesh = Mesh::start(NET);

    // CL + TE: Transfer-Encoding wins (RFC 9112), the connection is closed after the answer, so the
    // request hidden in the body is never served.
    let r = exchange(
        &mesh,
        "POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /status/418 HTTP/1.1\r\nHost: r\r\n\r\n",
    );
    assert!(!statuses(&r).contains(&418), "smuggled request served: {r}");
    assert!(statuses(&r).len() <= 1, "{r}");

    // Two different Content-Lengths: 400, closed.
    let r = exchange(
        &mesh,
        "POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    );
    assert_eq!(statuses(&r), vec![400], "{r}");

    // A chunk size that is not hex: the exchange is cut, nothing after it is served.
    let r = exchange(&mesh, "POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\nGET /status/418 HTTP/1.1\r\nHost: r\r\n\r\n");
    assert!(!statuses(&r).contains(&418), "{r}");

    // Transfer-Encoding that is not chunked: 400 (would leave the length unknowable).
    let r = exchange(
        &mesh,
        "POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    );
    assert_eq!(statuses(&r), vec![400], "{r}");

    // Header floods: a field more than the limit, and a head too large: 431 from the waypoint
    // itself. A head of exactly the limit is passed on (the backend answers, naming itself).
    let head_of = |fields: usize| {
        let mut head = String::from("GET / HTTP/1.1\r\nHost: r\r\nConnection: close\r\n");
        for i in 2..fields {
            head.push_str(&format!("x-h{i}: v\r\n"));
        }
        head + "\r\n"
    };
    let r = exchange(&mesh, &head_of(shoal_waypoint::proxy::MAX_HEADERS));
    assert!(r.contains("x-backend:"), "{r}");
    let r = exchange(&mesh, &head_of(shoal_waypoint::proxy::MAX_HEADERS + 1));
    assert_eq!(statuses(&r), vec![431], "{r}");
    assert!(!r.contains("x-backend:"), "{r}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: r\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let r = exchange(&mesh, &huge);
    assert!(statuses(&r) == vec![431] || r.is_empty(), "{r}");

    // Invalid bytes in a header name: 400.
    let r = exchange(&mesh, "GET / HTTP/1.1\r\nHost: r\r\nbad header: v\r\n\r\n");
    assert_eq!(statuses(&r), vec![400], "{r}");

    // Pipelined keep-alive requests are all answered, in order.
    let r = exchange(
        &mesh,
        "GET /status/201 HTTP/1.1\r\nHost: r\r\n\r\nGET /status/202 HTTP/1.1\r\nHost: r\r\n\r\nGET /status/203 HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(statuses(&r), vec![201, 202, 203], "{r}");

    // Slow headers (a slowloris): cut after the head timeout (1 s in the tests), not held open.
    let mut slow = socks(&mesh, "127.40.0.1", "10.40.0.2:9080");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: r\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let _ = slow.read_to_end(&mut sink);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a slow head was held {:?}",
        started.elapsed()
    );

    // A kept-alive connection serves requests within the head timeout of each other, and is
    // closed once it idles past it (hyper times the wait for the next head too).
    let mut idle = socks(&mesh, "127.40.0.1", "10.40.0.2:9080");
    for pause_ms in [0u64, 500] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        idle.write_all(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
            .unwrap();
        let answer = read_response(&mut idle);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let _ = idle.read_to_end(&mut sink);
    assert!(
        started.elapsed() < Duration::from_secs(5) && sink.is_empty(),
        "an idle connection was closed after {:?}: {sink:?}",
        started.elapsed()
    );

    // And the waypoint still serves.
    let (code, r) = mesh.curl("127.40.0.1", "http://10.40.0.2:9080/", &[]);
    assert_eq!(code, 0);
    assert_eq!(status_of(&r), Some(200), "{r}");
    mesh.stop();
}

/// A WebSocket-style upgrade: the waypoint passes the 101 on and then carries bytes both ways.
#[test]
fn upgrades_are_spliced_through_the_waypoint() {
    const NET: u8 = 44;
    let mesh = Mesh::start_with(NET, |m| {
        format!(
            "{m}{}",
            on(
                NET,
                "---
apiVersion: v1
kind: Pod
metadata: {name: ws, namespace: bookinfo, labels: {app: ws}}
spec: {nodeName: node-b, serviceAccountName: ws}
status: {podIP: 127.40.0.6}
---
apiVersion: v1
kind: Service
metadata: {name: ws, namespace: bookinfo}
spec: {clusterIP: 10.40.0.6, selector: {app: ws}, ports: [{name: http, port: 9080}]}
"
            )
        )
    });
    let server = upgrade_echo_server(&on(NET, "127.40.0.6:9080"));
    let s = socks(&mesh, "127.40.0.1", "10.40.0.6:9080");
    upgrade_and_echo(s);
    server.join().unwrap();
    mesh.stop();
}
