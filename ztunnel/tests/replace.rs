//! Taking over from a running ztunnel, as an upgrade does: a second `ztunnel` on the same
//! addresses is refused unless started with `--replace`; with it, it listens beside the first,
//! which is then sent SIGTERM: no new connection is refused while the first drains, its open
//! tunnel keeps carrying requests until its client closes it, and it then exits 0, leaving the
//! new one serving on every port.
//!
//! The scenario runs in a network namespace of its own (`unshare --net`, as root; CI runs as
//! root) where `net.ipv4.tcp_migrate_req` is on, as the README asks of a node: that sysctl is per
//! namespace, and this way the test neither depends on the host's value nor changes it.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use shoal_hbone::ca::LocalCa;
use shoal_perf::backend::Backend;
use shoal_perf::process::ServerProcess;

const NET: u8 = 37;
const IN_NETNS: &str = "SHOAL_REPLACE_TEST_IN_NETNS";

fn exe() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztunnel"))
}

/// Runs the scenario below in a new network namespace and requires it to pass there.
#[test]
fn a_replacement_takes_over_without_refusing_a_connection() {
    shoal_perf::testkit::assert_root();
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "replacement_scenario",
            "--ignored",
            "--nocapture",
        ])
        .env(IN_NETNS, "1")
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux) runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "the scenario in its own network namespace:\n{text}"
    );
}

/// Node A's command line: every listener on a fixed port (a replacement must name the same
/// ones), two shards, a drain long enough to outlast the open tunnel.
fn node_a_args(manifests: &str, ca: &str, replace: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--manifests",
        manifests,
        "--node",
        "node-a",
        "--ca",
        ca,
        "--socks5",
        "127.0.0.1:15080",
        "--dns-proxy",
        "127.0.0.1:15053",
        "--admin",
        "127.0.0.1:15000",
        "--metrics",
        "127.0.0.1:15020",
        "--readiness",
        "127.0.0.1:15021",
        "--shards",
        "2",
        "--no-pin",
        "--drain-timeout-s",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if replace {
        args.push("--replace".into());
    }
    args
}

/// A connection from the client pod through node A's SOCKS5 listener to web-1 (on node B, so
/// the bytes cross an HBONE tunnel), ready for HTTP.
fn through_a(socks: SocketAddr) -> std::io::Result<TcpStream> {
    let client: IpAddr = on(NET, "127.30.0.1").parse().unwrap();
    let web: std::net::Ipv4Addr = on(NET, "127.30.0.2").parse().unwrap();
    shoal_perf::load::socks5_connect_from(
        socks,
        client,
        std::net::SocketAddrV4::new(web, 8080),
        Duration::from_secs(5),
    )
}

/// One keep-alive request on `tcp`; the status line and the body.
fn get(tcp: &mut TcpStream) -> std::io::Result<(String, String)> {
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")?;
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tcp.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other("closed before an answer"));
        }
        data.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if data.len() >= end + 4 + length {
            let status = text.lines().next().unwrap_or_default().to_string();
            return Ok((status, text[end + 4..end + 4 + length].to_string()));
        }
    }
}

/// A fresh connection through node A and one request on it: whether a 200 came back.
fn one_request(socks: SocketAddr) -> Result<(), String> {
    let mut tcp = through_a(socks).map_err(|e| e.to_string())?;
    let (status, _) = get(&mut tcp).map_err(|e| e.to_string())?;
    if status.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(status)
    }
}

#[test]
#[ignore = "run by a_replacement_takes_over_without_refusing_a_connection, in its own network namespace"]
fn replacement_scenario() {
    assert_eq!(
        std::env::var(IN_NETNS).as_deref(),
        Ok("1"),
        "run through a_replacement_takes_over_without_refusing_a_connection"
    );
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().expect("ip runs");
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["link", "set", "lo", "up"]);
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1").expect("tcp_migrate_req");

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    LocalCa::generate("cluster.local")
        .unwrap()
        .write(&ca)
        .unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("mesh.yaml"), on(NET, MESH)).unwrap();
    let (manifests, ca) = (manifests.to_str().unwrap(), ca.to_str().unwrap());
    let _web = Backend::start_one_shard(
        format!("{}:8080", on(NET, "127.30.0.2")).parse().unwrap(),
        "web-1",
    )
    .expect("backend");
    let node_b_args: Vec<String> = [
        "--manifests",
        manifests,
        "--node",
        "node-b",
        "--ca",
        ca,
        "--socks5",
        "127.0.0.2:0",
        "--dns-proxy",
        "127.0.0.2:0",
        "--admin",
        "127.0.0.2:0",
        "--metrics",
        "127.0.0.2:0",
        "--readiness",
        "127.0.0.2:0",
        "--shards",
        "1",
        "--no-pin",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node_b = ServerProcess::start_exe(&exe(), &node_b_args).expect("node B");
    let hbone_b = on(NET, "127.30.0.2:15008");
    wait_for("node B's HBONE listener", || {
        TcpStream::connect(&hbone_b).is_ok()
    });
    let old = ServerProcess::start_exe(&exe(), &node_a_args(manifests, ca, false)).expect("old A");
    let socks = old.listen;

    // The tunnel that must outlive the hand-over.
    let mut long_lived = through_a(socks).expect("a connection through the old node A");
    let (status, body) = get(&mut long_lived).expect("a first answer");
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {body}");

    // A second instance without --replace is refused its ports, and says how to take over.
    let mut refused = Command::new(exe())
        .args(node_a_args(manifests, ca, false))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = refused.kill();
            panic!("a second node A without --replace started on the first one's ports");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut why = String::new();
    refused
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut why)
        .unwrap();
    assert!(!refused.wait().unwrap().success());
    assert!(
        why.contains("cannot listen on") && why.contains("--replace"),
        "{why}"
    );

    // Requests through node A, one connection each, all along the hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, served, failed, failures) = (
            stop.clone(),
            served.clone(),
            failed.clone(),
            failures.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match one_request(socks) {
                    Ok(()) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.lock().unwrap().push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    wait_for("requests through the old node A", || {
        served.load(Ordering::Relaxed) >= 20
    });

    let new = ServerProcess::start_exe(&exe(), &node_a_args(manifests, ca, true))
        .expect("the replacement starts beside the old node A");
    let ready = admin_get(new.admin.expect("admin address"), "/healthz/ready");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let before_sigterm = served.load(Ordering::Relaxed);
    wait_for("requests with both instances listening", || {
        served.load(Ordering::Relaxed) >= before_sigterm + 50
    });
    old.signal(libc::SIGTERM);
    // The old instance has stopped listening: more requests, and its tunnel still carries.
    std::thread::sleep(Duration::from_millis(500));
    let after_sigterm = served.load(Ordering::Relaxed);
    wait_for("requests once the old node A stopped listening", || {
        served.load(Ordering::Relaxed) >= after_sigterm + 100
    });
    for _ in 0..3 {
        let (status, _) = get(&mut long_lived).expect("the old tunnel still answers");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "refused or failed while handing over ({} served): {:?}",
        served.load(Ordering::Relaxed),
        failures.lock().unwrap()
    );

    // Its last connection closed, the old instance is done well before its drain deadline.
    let closed_at = Instant::now();
    drop(long_lived);
    let status = old
        .wait(Duration::from_secs(20))
        .expect("the old node A exits");
    assert!(status.success(), "{status}");
    assert!(closed_at.elapsed() < Duration::from_secs(20));
    // The new one alone now answers on every port.
    one_request(socks).expect("a request through the new node A alone");
    let ready = admin_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let status = {
        new.signal(libc::SIGTERM);
        new.wait(Duration::from_secs(20))
            .expect("the new node A exits")
    };
    assert!(status.success(), "{status}");
    node_b.signal(libc::SIGTERM);
    let _ = node_b.wait(Duration::from_secs(20));
}
