//! `shoal-bench bench ztunnel` as a user runs it, shortened: the ztunnels and both HAProxy pairs
//! are measured with error-free requests, set against each other in the summary, and torn down.
//! And the HAProxy pairs it measures are what they claim: the mTLS pair's server side refuses
//! plain text and checks the client's certificate, the plain pair's takes plain text.
//!
//! The `ztunnel` binary is taken from beside `shoal-bench`, where `cargo test --workspace` (the
//! README's test command) builds it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_perf::pairs::{self, HaproxyMode, PairAddrs};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Processes whose command line names `mark`.
fn leftovers(mark: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(mark) {
            found.push(cmdline);
        }
    }
    found
}

/// An app that answers every connection's first request with `200 ok` and closes.
fn app(addr: &str) -> SocketAddr {
    let listener = TcpListener::bind(addr).unwrap();
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = [0u8; 1024];
            let _ = conn.read(&mut head);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    local
}

/// Sends a GET on a plain TCP connection and returns what came back before the close.
fn get(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// curl to the server side over TLS, with or without the pair's client certificate; the exit code.
fn curl_tls(dir: &std::path::Path, server: SocketAddr, with_cert: bool) -> i32 {
    let d = dir.display();
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-o", "/dev/null", "--max-time", "5", "--tlsv1.3"])
        .args(["--cacert", &format!("{d}/ca.pem")])
        .args([
            "--resolve",
            &format!("{}:{}:{}", pairs::SERVER_NAME, server.port(), server.ip()),
        ]);
    if with_cert {
        curl.args(["--cert", &format!("{d}/client.pem")])
            .args(["--key", &format!("{d}/client.key")]);
    }
    curl.arg(format!("https://{}:{}/", pairs::SERVER_NAME, server.port()))
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

#[test]
fn the_haproxy_tcp_pairs_relay_and_only_the_mtls_one_demands_certificates() {
    if pairs::ensure("haproxy", "haproxy", true).is_err() {
        panic!("HAProxy is needed (apt install haproxy; .ci/run installs it)");
    }
    let dir = scratch("haproxy-pairs-test");
    pairs::write_pki(&dir).unwrap();
    let app = app("127.47.0.2:0");
    for (mode, host) in [(HaproxyMode::TcpMtls, 10), (HaproxyMode::TcpPlain, 20)] {
        let addrs = PairAddrs {
            client_listen: format!("127.47.0.{host}:15001").parse().unwrap(),
            server_listen: format!("127.47.0.{}:15443", host + 1).parse().unwrap(),
            app,
        };
        let (client, server) = pairs::start_haproxy_pair(&dir, &addrs, mode).unwrap();
        // Through both sides, the app answers.
        let through = get(addrs.client_listen);
        assert!(through.ends_with("\r\n\r\nok"), "{mode:?}: {through:?}");
        let plain_to_server = get(addrs.server_listen);
        match mode {
            HaproxyMode::TcpMtls => {
                assert!(
                    !plain_to_server.contains("200 OK"),
                    "plain text reached the app past the mTLS side: {plain_to_server:?}"
                );
                assert_eq!(curl_tls(&dir, addrs.server_listen, true), 0, "with a cert");
                assert_ne!(curl_tls(&dir, addrs.server_listen, false), 0, "without one");
            }
            _ => assert!(plain_to_server.ends_with("ok"), "{plain_to_server:?}"),
        }
        drop((client, server));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_ztunnel_measures_the_ztunnels_and_both_pairs_and_leaves_nothing_behind() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_shoal-bench"));
    assert!(
        exe.with_file_name("ztunnel").exists(),
        "ztunnel is not built beside shoal-bench: run `cargo test --workspace`"
    );
    let tmp = scratch("ztunnel-bench-test");
    let out = tmp.join("results");
    let result = Command::new(&exe)
        .env("TMPDIR", &tmp)
        .env("SHOAL_LOG", "warn")
        .args(["bench", "ztunnel", "--repeats", "1", "--duration-s", "0.3"])
        .args(["--idle-connections", "20", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let index = std::fs::read_to_string(out.join("README.md")).unwrap();
    let run = index
        .lines()
        .find_map(|l| l.strip_prefix("Latest: ["))
        .and_then(|l| l.split(']').next())
        .unwrap_or_else(|| panic!("no latest run in {index}"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(run).join("ztunnel.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["paths"],
        serde_json::json!(["direct", "ztunnel", "haproxy-mtls", "haproxy-plain"])
    );
    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 4 * 5, "every path, every phase");
    for p in phases {
        assert!(p["requests"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["errors"], 0, "{p}");
        let cpu = p["proxy_cpu_us_per_request"].as_f64().unwrap();
        if p["path"] == "direct" {
            assert_eq!(cpu, 0.0, "{p}");
        } else {
            // Each proxied path's CPU is its own proxies': a few µs at least, never nothing.
            assert!(cpu > 0.0, "{p}");
            // They sleep and are woken at least once a second at any load.
            assert!(
                p["proxy_switches_per_request"].as_f64().unwrap() > 0.0,
                "{p}"
            );
        }
        assert!(
            p["endpoints_cpu_us_per_request"].as_f64().unwrap() > 0.0,
            "{p}"
        );
    }
    let summary = std::fs::read_to_string(out.join(run).join("ztunnel.md")).unwrap();
    assert!(
        summary.contains("## The ztunnels against the HAProxy pairs"),
        "{summary}"
    );
    assert!(
        summary.contains("| new-conn-8 | haproxy-mtls |"),
        "{summary}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !leftovers(tmp.to_str().unwrap()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:#?}",
            leftovers(tmp.to_str().unwrap())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
