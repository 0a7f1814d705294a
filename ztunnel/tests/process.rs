//! The `ztunnel` binary as users run it: it announces readiness only once configured and holding
//! its workloads' certificates, answers its probes, carries traffic, and drains on SIGTERM (exit 0).

mod common;

use std::time::Duration;

use common::*;
use shoal_hbone::ca::LocalCa;
use shoal_perf::process::ServerProcess;

#[test]
fn the_binary_serves_and_drains_on_sigterm() {
    const NET: u8 = 34;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    LocalCa::generate("cluster.local")
        .unwrap()
        .write(&ca)
        .unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("mesh.yaml"), on(NET, MESH)).unwrap();
    let args: Vec<String> = [
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
    .collect();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztunnel"));
    let node = ServerProcess::start_exe(&exe, &args).expect("ztunnel starts and prints READY");
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
