//! The `ztunnel` binary as users run it: it announces readiness only once configured and holding
//! its workloads' certificates, answers its probes, carries traffic, and drains on SIGTERM (exit 0)
//! — even once whatever read its output has gone.

mod common;

use std::time::Duration;

use common::*;
use shoal_perf::process::ServerProcess;

fn exe() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztunnel"))
}

/// Node A of `manifests`, every listener on a free port, two shards, a 2 s drain.
fn node_args(manifests: &std::path::Path, ca: &std::path::Path) -> Vec<String> {
    [
        "--manifests",
        manifests.to_str().unwrap(),
        "--node",
        "node-a",
        "--ca",
        ca.to_str().unwrap(),
        "--socks5",
        "127.0.0.1:0",
        "--dns-proxy",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--readiness",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--no-pin",
        "--drain-timeout-s",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A mesh on 127.`net` with its CA, in a temporary directory: (dir, manifests, ca).
fn mesh_dir(net: u8) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (manifests, ca) = shoal_perf::testkit::write_mesh(dir.path(), &on(net, MESH));
    (dir, manifests, ca)
}

#[test]
fn the_binary_serves_and_drains_on_sigterm() {
    const NET: u8 = 34;
    let (_dir, manifests, ca) = mesh_dir(NET);
    let args = node_args(&manifests, &ca);
    let node = ServerProcess::start_exe(&exe(), &args).expect("ztunnel starts and prints READY");
    let admin = node.admin.expect("admin address in the READY line");
    let ready = admin_get(admin, "/healthz/ready");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let dump = admin_get(admin, "/config_dump");
    assert!(
        dump.contains("spiffe://cluster.local/ns/app/sa/client"),
        "the node's certificates: {dump}"
    );
    // A connection through it (to a non-ambient pod, plain TCP): SOCKS5 on its listener.
    let (code, _) = curl(
        NET,
        "127.30.0.1",
        node.listen,
        "http://127.30.1.1:8080/",
        &[],
    );
    assert_ne!(
        code, 0,
        "nothing listens on the legacy pod here: refused, not hung"
    );
    let status = node
        .terminate(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(status.success(), "drained and exited 0: {status:?}");
}

/// The process that read its log died (a benchmark killed, a log shipper gone): writing the log
/// now fails, and SIGTERM must still drain it. (tracing-subscriber used to report the failed write
/// with `eprintln!`, which panicked on the closed pipe and took the signal thread with it.)
#[test]
fn it_drains_on_sigterm_after_its_log_reader_is_gone() {
    use std::io::BufRead;
    let (_dir, manifests, ca) = mesh_dir(36);
    let mut child = std::process::Command::new(exe())
        .args(node_args(&manifests, &ca))
        .env("SHOAL_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ztunnel starts");
    let mut ready = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut ready);
    }
    assert!(ready.starts_with("READY"), "{ready}");
    drop(child.stderr.take());
    // SAFETY: signalling our own child, which has not been waited for.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = status.expect("drained and exited within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}");
}
