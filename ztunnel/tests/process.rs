//! The `ztunnel` binary as users run it: it announces readiness only once configured and holding
//! its workloads' certificates, answers its probes, carries traffic, and drains on SIGTERM (exit 0)
//! — even once whatever read its output has gone.

mod common;

use std::time::Duration;

use common::*;
use shoal_perf::backend::Backend;
use shoal_perf::process::{tree_context_switches, ProxyLog, ServerProcess};

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

/// The access log as users read it: both binaries at `SHOAL_LOG=info`, one line per connection on
/// each side once it ends, naming both ends, their identities, the service and workload, the bytes
/// each way and how long it lasted — and, for a connection a policy refused, the policy.
#[test]
fn each_side_writes_one_access_line_per_connection() {
    const NET: u8 = 39;
    let (dir, manifests, ca) = mesh_dir(NET);
    let backend = Backend::start_one_shard(on(NET, "127.30.0.2:8080").parse().unwrap(), "web-1")
        .expect("backend");
    let log = ProxyLog {
        filter: "info".into(),
        dir: dir.path().join("logs"),
    };
    let node = |name: &str| {
        let mut args = node_args(&manifests, &ca);
        args[3] = name.to_string();
        ServerProcess::start_proxy(&exe(), &args, &log, name).expect("ztunnel starts")
    };
    let (a, b) = (node("node-a"), node("node-b"));
    let web1 = on(NET, "127.30.0.2");
    wait_for("node B's HBONE listener", || {
        std::net::TcpStream::connect(format!("{web1}:15008")).is_ok()
    });
    let client = on(NET, "127.30.0.1");
    let (code, response) = curl(
        NET,
        "127.30.0.1",
        a.listen,
        &format!("http://{web1}:8080/bytes/5000"),
        &["-o", "/dev/null", "-w", "%{size_download}"],
    );
    assert_eq!((code, response.trim()), (0, "5000"), "{response}");

    // A DENY on web-1's port: node B refuses the next connection and names the policy.
    std::fs::write(
        manifests.join("policy.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-8080, namespace: app}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: [\"8080\"]}}]}]
",
    )
    .unwrap();
    wait_for("the policy to refuse", || {
        curl(
            NET,
            "127.30.0.1",
            a.listen,
            &format!("http://{web1}:8080/"),
            &[],
        )
        .0 != 0
    });
    // SIGTERM drains and writes what the log still holds.
    for node in [a, b] {
        assert!(node.terminate(Duration::from_secs(10)).unwrap().success());
    }
    let lines = |name: &str| -> Vec<String> {
        std::fs::read_to_string(log.dir.join(format!("{name}.log")))
            .unwrap()
            .lines()
            .filter(|l| l.contains(" access: "))
            .map(str::to_string)
            .collect()
    };
    let (a_lines, b_lines) = (lines("node-a"), lines("node-b"));
    let field = shoal_perf::testkit::log_field;
    let client_identity = "spiffe://cluster.local/ns/app/sa/client";
    let web_identity = "spiffe://cluster.local/ns/app/sa/web";

    // The download: one line on each side, the same connection seen from both. (Waiting for the
    // policy made more, smaller connections.)
    let download = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains("connection complete") && field(l, "error") == "-")
            .filter(|l| field(l, "bytes_recv").parse::<u64>().unwrap() >= 5_000)
            .cloned()
            .collect()
    };
    let (out, inb) = (download(&a_lines), download(&b_lines));
    assert_eq!(out.len(), 1, "node A: {a_lines:#?}");
    assert_eq!(inb.len(), 1, "node B: {b_lines:#?}");
    let (out, inb) = (&out[0], &inb[0]);
    assert_eq!(field(out, "direction"), "outbound", "{out}");
    assert_eq!(field(inb, "direction"), "inbound", "{inb}");
    assert!(
        field(out, "src.addr").starts_with(&format!("{client}:")),
        "{out}"
    );
    for line in [out, inb] {
        assert_eq!(field(line, "src.identity"), client_identity, "{line}");
        assert_eq!(field(line, "dst.addr"), format!("{web1}:8080"), "{line}");
        assert_eq!(field(line, "dst.workload"), "web-1", "{line}");
        assert_eq!(field(line, "dst.identity"), web_identity, "{line}");
        // On both sides `bytes_sent` went toward the server (the request) and `bytes_recv` came
        // from it (5,000 bytes of body and the head).
        let sent = field(line, "bytes_sent").parse::<u64>().unwrap();
        let received = field(line, "bytes_recv").parse::<u64>().unwrap();
        assert!((50..500).contains(&sent), "{line}");
        assert!((5_000..6_000).contains(&received), "{line}");
        field(line, "duration_ms").parse::<u64>().unwrap();
    }
    assert_eq!(
        field(out, "dst.hbone_addr"),
        format!("{web1}:15008"),
        "{out}"
    );
    // Both ends counted the same bytes.
    assert_eq!(field(out, "bytes_sent"), field(inb, "bytes_sent"));
    assert_eq!(field(out, "bytes_recv"), field(inb, "bytes_recv"));
    assert_eq!(field(out, "policy"), "-");

    // The refused connection: node B says who, why, and which policy.
    let refused: Vec<&String> = b_lines.iter().filter(|l| l.contains("no-8080")).collect();
    assert!(!refused.is_empty(), "node B: {b_lines:#?}");
    let refused = refused[0];
    assert_eq!(field(refused, "policy"), "app/no-8080", "{refused}");
    assert_eq!(refused.matches("(DENY)").count(), 1, "{refused}");
    assert_eq!(field(refused, "src.identity"), client_identity, "{refused}");
    assert_eq!(field(refused, "dst.workload"), "web-1", "{refused}");
    assert_eq!(field(refused, "bytes_sent"), "0", "{refused}");
    backend.runtime.begin_drain();
    backend.runtime.join();
}

/// `/logging` on the admin address, as Istio's ztunnel serves it: it shows the log filter, and a
/// POST replaces it at once — here the access log goes quiet without a restart — while a filter
/// that does not parse changes nothing.
#[test]
fn the_log_filter_is_read_and_changed_through_admin() {
    const NET: u8 = 40;
    let (dir, manifests, ca) = mesh_dir(NET);
    let log = ProxyLog {
        filter: "info".into(),
        dir: dir.path().join("logs"),
    };
    let node = ServerProcess::start_proxy(&exe(), &node_args(&manifests, &ca), &log, "node-a")
        .expect("ztunnel starts");
    let admin = node.admin.expect("admin address");
    let answer = admin_request(admin, "GET", "/logging");
    assert!(answer.contains("log filter: info"), "{answer}");
    // A connection to a pod where nothing listens: refused, and logged.
    let refused = || {
        curl(
            NET,
            "127.30.0.1",
            node.listen,
            &on(NET, "http://127.30.1.1:8080/"),
            &[],
        )
    };
    assert_ne!(refused().0, 0);
    let answer = admin_request(admin, "POST", "/logging?level=warn%2Caccess:off");
    // Istio's `access:off` read as `access=off` (the filter prints its directives in its own order).
    let changed = |answer: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix("log filter: "))
            .is_some_and(|f| {
                let mut d: Vec<&str> = f.split(',').collect();
                d.sort();
                d == ["access=off", "warn"]
            })
    };
    assert!(
        answer.starts_with("HTTP/1.1 200") && changed(&answer),
        "{answer}"
    );
    assert_ne!(refused().0, 0);
    let answer = admin_request(admin, "POST", "/logging?level=%5Bnot-a-filter");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = admin_request(admin, "GET", "/logging");
    assert!(changed(&answer), "unchanged by the bad filter: {answer}");
    assert!(node.terminate(Duration::from_secs(10)).unwrap().success());
    let text = std::fs::read_to_string(log.dir.join("node-a.log")).unwrap();
    let lines = text.lines().filter(|l| l.contains(" access: ")).count();
    assert_eq!(lines, 1, "only the connection before the change: {text}");
}

/// An idle node sleeps: no thread wakes on a timer to look for work that is not there (the log
/// writer and the manifests' watcher each used to, ten times a second, and the certificate thread
/// once a second). What is left is the shards' own timers: none in 3 s here.
#[test]
fn an_idle_node_is_not_woken_to_poll() {
    const NET: u8 = 45;
    const QUIET_S: u64 = 3;
    let (dir, manifests, ca) = mesh_dir(NET);
    let args = node_args(&manifests, &ca);
    // At info, so that the log writer has lines to write at start and then none.
    let log = ProxyLog {
        filter: "info".into(),
        dir: dir.path().join("logs"),
    };
    let node = ServerProcess::start_proxy(&exe(), &args, &log, "ztunnel")
        .expect("ztunnel starts and prints READY");
    // Let start-up's own work (first flush, listeners) settle.
    std::thread::sleep(Duration::from_millis(500));
    let before = tree_context_switches(node.pid());
    std::thread::sleep(Duration::from_secs(QUIET_S));
    let per_second = (tree_context_switches(node.pid()) - before) / QUIET_S;
    assert!(
        per_second <= 2,
        "{per_second} context switches a second in an idle ztunnel"
    );
}
