//! The test backend answers as documented, reads request bodies however they are framed, and
//! refuses ambiguous framing and oversized heads instead of guessing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use shoal_perf::backend::Backend;

fn start() -> Backend {
    Backend::start_one_shard("127.0.0.1:0".parse().unwrap(), "b1").expect("backend")
}

fn exchange(b: &Backend, request: &[u8]) -> String {
    let mut s = TcpStream::connect(b.listen_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn answers_over_http1_and_h2() {
    let b = start();
    let base = format!("http://{}", b.listen_addr());
    let r = curl(&[&format!("{base}/status/418")]);
    assert!(r.starts_with("HTTP/1.1 418"), "{r}");
    assert!(r.contains("x-backend: b1"), "{r}");
    let r = curl(&["--http2-prior-knowledge", &format!("{base}/bytes/10")]);
    assert!(
        r.starts_with("HTTP/2 200") && r.ends_with("xxxxxxxxxx"),
        "{r}"
    );
    // A chunked upload, then keep-alive: two answers on one connection.
    let r = exchange(
        &b,
        b"POST /status/201 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(
        r.starts_with("HTTP/1.1 201") && r.contains("HTTP/1.1 200"),
        "{r}"
    );
    b.runtime.begin_drain();
    b.runtime.join();
}

#[test]
fn ambiguous_framing_and_oversized_heads_are_refused() {
    let b = start();
    let r = exchange(&b, b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "CL + TE: {r}");
    let r = exchange(
        &b,
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "two lengths: {r}");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let r = exchange(&b, big.as_bytes());
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let r = exchange(&b, b"GET / HTTP/1.1\r\nno colon in this header\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    b.runtime.begin_drain();
    b.runtime.join();
}
