//! `shoalctl check`, `dump` and `ztunnel-config`, run as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use shoal_control::agent::ConfigAdmin;
use shoal_control::dump::CertificateInfo;
use shoal_control::{Agent, AgentCollector, Options};
use shoal_runtime::admin::AdminServer;

fn shoalctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoalctl"))
        .args(args)
        .output()
        .expect("run shoalctl")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn bookinfo() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        root.join("seeds/002-bookinfo-waypoint.yaml"),
        dir.path().join("waypoint.yaml"),
    )
    .unwrap();
    std::fs::copy(
        root.join("fixtures/bookinfo-app.yaml"),
        dir.path().join("app.yaml"),
    )
    .unwrap();
    dir
}

fn path(dir: &tempfile::TempDir) -> &str {
    dir.path().to_str().unwrap()
}

#[test]
fn check_passes_good_manifests_and_fails_bad_ones() {
    let dir = bookinfo();
    let out = shoalctl(&["check", path(&dir)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 errors"), "{}", text(&out));

    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: bookinfo}\nspec: {action: ALOW}\n",
    )
    .unwrap();
    let out = shoalctl(&["check", path(&dir)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("bad.yaml:1 (document 1): AuthorizationPolicy bookinfo/p: spec.action: unknown action \"ALOW\""), "{t}");
    assert!(t.contains("use ALLOW, DENY, AUDIT or CUSTOM"), "{t}");
}

#[test]
fn dump_prints_the_snapshot_as_json() {
    let dir = bookinfo();
    let out = shoalctl(&["dump", path(&dir)]);
    assert!(out.status.success(), "{}", text(&out));
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let reviews = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["hostname"] == "reviews.bookinfo.svc.cluster.local")
        .unwrap();
    assert_eq!(reviews["waypoint"], "bookinfo/waypoint");
    assert_eq!(reviews["endpoints"].as_array().unwrap().len(), 2);
    assert!(
        dump["routes"]["reviews.bookinfo.svc.cluster.local"]["rules"][0]["backends"].is_array()
    );
}

fn assert_tables(args: &[&str]) {
    let run = |what: &str| {
        let mut all = vec!["ztunnel-config", what];
        all.extend_from_slice(args);
        let out = shoalctl(&all);
        assert!(out.status.success(), "{what}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let workloads = run("workload");
    assert!(workloads.starts_with("NAMESPACE"), "{workloads}");
    let curl = workloads
        .lines()
        .find(|l| l.contains("curl"))
        .expect("curl row");
    let cols: Vec<&str> = curl.split_whitespace().collect();
    assert_eq!(
        cols,
        ["default", "curl", "127.10.1.5", "node-a", "None", "HBONE"]
    );
    let services = run("service");
    let reviews = services
        .lines()
        .find(|l| l.contains("reviews.bookinfo"))
        .expect("reviews row");
    let cols: Vec<&str> = reviews.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "bookinfo",
            "reviews.bookinfo.svc.cluster.local",
            "10.96.0.11",
            "bookinfo/waypoint",
            "2/2"
        ]
    );
    let policies = run("policy");
    assert!(
        policies.contains("productpage-waypoint") && policies.contains("waypoint"),
        "{policies}"
    );
}

#[test]
fn ztunnel_config_from_a_manifests_directory() {
    let dir = bookinfo();
    assert_tables(&["--manifests", path(&dir)]);
}

#[test]
fn ztunnel_config_from_a_running_proxy_and_a_saved_dump() {
    let dir = bookinfo();
    let agent = Agent::start(dir.path(), Options::default()).expect("agent");
    let certificates = || {
        vec![CertificateInfo {
            identity: "spiffe://cluster.local/ns/default/sa/curl".into(),
            serial: "1a2b".into(),
            not_before: "2026-11-21T00:00:00Z".into(),
            not_after: "2026-11-22T00:00:00Z".into(),
            state: "Available".into(),
        }]
    };
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(AgentCollector(agent.stats())));
    let admin = AdminServer::start(
        "127.0.0.1:0".parse().unwrap(),
        registry,
        Arc::new(ConfigAdmin::new(agent.subscriber(), certificates)),
    )
    .expect("admin");
    let addr = admin.local_addr().to_string();
    assert_tables(&["--admin", &addr]);
    let out = shoalctl(&["ztunnel-config", "certificate", "--admin", &addr]);
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    let row: Vec<&str> = t
        .lines()
        .nth(1)
        .expect("a certificate row")
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        [
            "spiffe://cluster.local/ns/default/sa/curl",
            "Leaf",
            "Available",
            "1a2b",
            "2026-11-22T00:00:00Z",
            "2026-11-21T00:00:00Z"
        ]
    );

    // Saved, then read back with --file.
    let out = shoalctl(&["ztunnel-config", "all", "--admin", &addr, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let saved: PathBuf = dir.path().join("dump.json.saved");
    std::fs::write(&saved, &out.stdout).unwrap();
    assert_tables(&["--file", saved.to_str().unwrap()]);

    // The agent's figures are on /metrics.
    let metrics = http_get(admin.local_addr(), "/metrics");
    assert!(
        metrics.contains("shoal_config_published_version 1"),
        "{metrics}"
    );
    assert!(metrics.contains("shoal_config_errors 0"), "{metrics}");
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn ztunnel_config_names_an_unreachable_proxy() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = shoalctl(&["ztunnel-config", "workload", "--admin", &unused.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains(&format!("cannot read /config_dump from {unused}")),
        "{}",
        text(&out)
    );
}
