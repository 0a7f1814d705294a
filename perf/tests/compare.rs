//! `shoal-bench bench compare` as a user runs it, shortened: every topology is set up, measured
//! with counted, error-free requests, reported (JSON, summary, charts), and torn down — and a
//! run killed halfway leaves no process behind either; and the iptables capture's guard removes
//! what it installed once the benchmark that holds it is gone.
//!
//! The `ztunnel` and `waypoint` binaries are taken from beside `shoal-bench`, where
//! `cargo test --workspace` (the README's test command) builds them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn exe() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_shoal-bench"));
    for name in ["ztunnel", "waypoint"] {
        assert!(
            exe.with_file_name(name).exists(),
            "{name} is not built beside shoal-bench: run `cargo test --workspace`"
        );
    }
    exe
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Processes whose command line names `marks` (the run's scratch directory, its addresses).
fn leftovers(marks: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // A zombie has an empty command line and holds nothing.
        if marks.iter().any(|m| cmdline.contains(m)) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

fn assert_nothing_left(marks: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = leftovers(marks);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a run's iptables capture (`SHOAL-BENCH-PID` chains, the service range's route) left in
/// place; nothing when not root (the capture then was SOCKS5).
fn capture_left(pid: u32, services: &str) -> Vec<String> {
    let chain = format!("SHOAL-BENCH-{pid}");
    let mut left = Vec::new();
    for table in ["nat", "raw"] {
        if let Ok(out) = Command::new("iptables").args(["-t", table, "-S"]).output() {
            let rules = String::from_utf8_lossy(&out.stdout).into_owned();
            left.extend(
                rules
                    .lines()
                    .filter(|l| l.contains(&chain))
                    .map(String::from),
            );
        }
    }
    // Each guard's route carries its owner as its metric.
    let owner = pid.to_string();
    if let Ok(out) = Command::new("ip")
        .args(["route", "show", services])
        .output()
    {
        left.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| {
                    let mut words = l.split_whitespace().skip_while(|w| *w != "metric");
                    words.nth(1) == Some(owner.as_str())
                })
                .map(String::from),
        );
    }
    left
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// HAProxy in TCP mode, given by path and command line as a user adds a proxy of their own.
const EXTRA: &str = "tcp-haproxy=printf 'global\\n nbthread 1\\ndefaults\\n mode tcp\\n timeout connect 5s\\n timeout client 60s\\n timeout server 60s\\nlisten l\\n bind {listen}\\n server s {upstream}\\n' > {dir}/h.cfg && exec haproxy -db -f {dir}/h.cfg";

/// `shoal-bench bench compare ARGS --out TMP/results`, with its scratch directory under `tmp`.
fn compare(tmp: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(exe());
    command
        .env("TMPDIR", tmp)
        .args(["bench", "compare"])
        .args(args)
        .arg("--out")
        .arg(tmp.join("results"));
    command
}

fn run_dir(out: &Path) -> PathBuf {
    let index = std::fs::read_to_string(out.join("README.md")).expect("results index");
    let latest = index
        .lines()
        .find_map(|l| l.strip_prefix("Latest: ["))
        .and_then(|l| l.split(']').next())
        .unwrap_or_else(|| panic!("no latest run in {index}"));
    out.join(latest)
}

#[test]
fn compare_measures_every_topology_and_leaves_nothing_behind() {
    let tmp = scratch("compare-test");
    let out = tmp.join("results");
    let child = compare(
        &tmp,
        &[
            "--repeats",
            "1",
            "--duration-s",
            "0.3",
            "--warmup-s",
            "0.1",
            "--rate",
            "200",
            "--bulk-bytes",
            "65536",
            "--pods",
            "10,20",
            "--address-block",
            "43",
            "--proxy",
            EXTRA,
            "--proxy",
            "gone=exit 3 # {listen}",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let pid = child.id();
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert_nothing_left(&[tmp.to_str().unwrap(), "127.43.0."]);
    assert_eq!(capture_left(pid, "10.43.0.0/16"), Vec::<String>::new());

    let dir = run_dir(&out);
    let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    let topologies = [
        "direct",
        "ambient-l4",
        "ambient-l7",
        "sidecar",
        "nginx",
        "haproxy",
        "tcp-haproxy",
    ];
    for t in topologies {
        assert!(
            summary.contains(&format!("| {t} |")),
            "{t} missing:\n{summary}"
        );
    }
    assert!(
        summary.contains("- CPU steal while the phases ran: "),
        "{summary}"
    );
    assert!(
        summary.contains("- gone: gone exited (exit status: 3)"),
        "a proxy that does not start is reported:\n{summary}"
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("compare.json")).unwrap()).unwrap();
    // As root (CI), the client's connections are captured by iptables, as istio-cni would.
    if is_root() {
        assert_eq!(report["capture"], "iptables", "{stderr}");
        assert!(summary.contains("iptables (DNAT"), "{summary}");
    }
    // By default shoal's proxies log as the pairs do: no access log.
    assert_eq!(report["proxy_log"], "warn");
    assert_eq!(report["proxy_access_log"], false);
    assert_eq!(report["proxy_access_log_lines"], 0);
    assert!(
        summary.contains("No proxy writes an access log"),
        "{summary}"
    );
    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), topologies.len() * 4, "{report:#}");
    for p in phases {
        assert!(p["requests"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["errors"].as_u64().unwrap(), 0, "{p}");
        // Busy proxies use CPU clock ticks even in a short phase.
        if p["topology"] != "direct" && p["phase"] == "rr-50" {
            assert!(p["proxy_cpu_us_per_request"].as_f64().unwrap() > 0.0, "{p}");
        }
    }
    // Bulk moves the whole body: 64 KiB per request.
    for p in phases.iter().filter(|p| p["phase"] == "bulk") {
        let bytes_per_request = p["mb_per_s"].as_f64().unwrap() * 1e6 / p["rps"].as_f64().unwrap();
        assert!(
            (65536.0..70000.0).contains(&bytes_per_request),
            "{bytes_per_request} bytes per bulk request: {p}"
        );
    }
    // Every proxy's memory, nginx's with its worker.
    let memory = report["memory"].as_array().unwrap();
    assert_eq!(memory.len(), 2 + 3 + 2 + 2 + 2 + 1, "{memory:#?}");
    for m in memory {
        assert!(m["rss_bytes"].as_u64().unwrap() > 1 << 20, "{m}");
        assert!(m["idle_wakeups_per_s"].as_f64().unwrap() >= 0.0, "{m}");
    }
    assert!(summary.contains("| idle wake-ups/s |"), "{summary}");
    assert!(memory
        .iter()
        .any(|m| m["role"] == "nginx-client" && m["processes"] == 2));
    let totals = report["totals"].as_array().unwrap();
    let proxies = |t: &str, pods: u64| {
        totals
            .iter()
            .find(|x| x["topology"] == t && x["pods"] == pods)
            .map(|x| x["proxies"].as_u64().unwrap())
    };
    assert_eq!(proxies("sidecar", 20), Some(20));
    assert_eq!(
        proxies("ambient-l7", 20),
        Some(3),
        "two nodes' ztunnels and a waypoint"
    );
    assert_eq!(
        proxies("tcp-haproxy", 20),
        None,
        "not scaled: its deployment is unknown"
    );

    for chart in ["throughput.svg", "latency.svg", "resources.svg"] {
        let svg = std::fs::read_to_string(dir.join(chart)).unwrap();
        assert!(svg.starts_with("<svg"), "{chart}");
        assert!(
            svg.contains("\nambient-l7\n"),
            "{chart} names the topologies"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_compare_killed_halfway_leaves_nothing_behind() {
    let tmp = scratch("compare-kill-test");
    let mut child = compare(&tmp, &["--duration-s", "30", "--address-block", "44"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first measured phase means every topology was started. The rest of the output is read
    // to the end: its proxies write to the same pipe, and once a pipe nobody reads is full, a
    // proxy logging its last connections would block instead of draining.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("req/s"));
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).count());
    assert!(started, "the run never measured anything");
    let marks = [tmp.to_str().unwrap(), "127.44.0."];
    assert!(
        leftovers(&marks).len() >= 9,
        "backends, ztunnels, waypoint, sidecars, nginx and HAProxy run: {:#?}",
        leftovers(&marks)
    );
    if is_root() {
        assert!(
            !capture_left(child.id(), "10.44.0.0/16").is_empty(),
            "capture installed"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Its capture guard, too, removes the rules and goes.
    assert_nothing_left(&marks);
    assert_eq!(
        capture_left(child.id(), "10.44.0.0/16"),
        Vec::<String>::new()
    );
    let _ = reader.join();
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn only_the_topologies_asked_for_are_measured() {
    let tmp = scratch("compare-only-test");
    let out = tmp.join("results");
    let result = compare(
        &tmp,
        &[
            "--repeats",
            "1",
            "--duration-s",
            "0.2",
            "--warmup-s",
            "0.1",
            "--only",
            "ambient-l4",
            "--address-block",
            "46",
            "--proxy-log",
            "info",
        ],
    )
    // The benchmark's own filter is not the proxies': they log as `--proxy-log` says.
    .env("SHOAL_LOG", "warn")
    .output()
    .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir(&out).join("compare.json")).unwrap())
            .unwrap();
    let names: Vec<&str> = report["topologies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t[0].as_str())
        .collect();
    assert_eq!(names, ["direct", "ambient-l4"]);
    // Both ztunnels wrote a line per connection.
    assert_eq!(report["proxy_access_log"], true);
    let requests: u64 = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topology"] == "ambient-l4" && p["phase"] == "new-conn")
        .map(|p| p["requests"].as_u64().unwrap())
        .sum();
    let lines = report["proxy_access_log_lines"].as_u64().unwrap();
    assert!(
        lines >= requests && requests > 0,
        "{lines} lines, {requests} new connections"
    );
    let summary = std::fs::read_to_string(run_dir(&out).join("summary.md")).unwrap();
    assert!(!summary.contains("| nginx |"), "{summary}");
    assert_nothing_left(&[tmp.to_str().unwrap(), "127.46.0."]);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Starts a capture guard as a benchmark does, owned by `owner` (a number no process has: the
/// chains and the route are named after it), sending `pod`'s connections to `services` to
/// `pod`:15001; returns once it is READY.
fn start_guard(owner: u32, services: &str, pods: &str, pod: &str) -> std::process::Child {
    let mut guard = Command::new(exe())
        .args(["capture-guard", "--services", services, "--pods", pods])
        .args(["--owner", &owner.to_string()])
        .args(["--redirect", &format!("{pod}={pod}:15001")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(guard.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "READY");
    guard
}

/// Dials `service` from `pod`; returns where the connection `listener` (the capture listener)
/// accepted was going, once a ping has crossed it.
fn dial_captured(
    listener: &std::net::TcpListener,
    pod: &str,
    service: &str,
) -> std::io::Result<std::net::SocketAddr> {
    use std::io::{Read, Write};
    let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from: std::net::SocketAddr = format!("{pod}:0").parse().unwrap();
    client.bind(&from.into())?;
    let to: std::net::SocketAddr = service.parse().unwrap();
    client.connect(&to.into())?;
    let mut client: std::net::TcpStream = client.into();
    let (mut accepted, _) = listener.accept()?;
    let original = shoal_runtime::capture::original_destination(&accepted)?;
    client.write_all(b"ping")?;
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got)?;
    assert_eq!(&got, b"ping");
    Ok(original)
}

/// The capture guard as a benchmark runs it: the owner's pod, dialing a service address, reaches
/// the capture listener, which reads where it was going; once the owner is gone (its end of the
/// guard's pipe closes, as when it is killed), the rules and the route go too. Needs root (CI runs
/// as root).
#[test]
fn the_capture_guard_captures_and_cleans_up_after_its_owner() {
    assert!(is_root(), "the capture test needs root (CI runs as root)");
    let owner = 4_000_000 + std::process::id();
    let mut guard = start_guard(owner, "10.45.0.0/16", "127.45.0.0/16", "127.45.0.1");
    assert!(!capture_left(owner, "10.45.0.0/16").is_empty());

    let listener = std::net::TcpListener::bind("127.45.0.1:15001").unwrap();
    assert_eq!(
        dial_captured(&listener, "127.45.0.1", "10.45.0.9:80").unwrap(),
        "10.45.0.9:80".parse().unwrap()
    );
    drop(listener);

    // The owner lets go (or dies): the guard removes everything and exits.
    drop(guard.stdin.take());
    let status = guard.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(capture_left(owner, "10.45.0.0/16"), Vec::<String>::new());
}

/// A benchmark run again while the last run's guard is still cleaning up (its owner was killed)
/// keeps its capture: the two guards' routes for the same service range are apart, and each
/// removes only its own. Needs root (CI runs as root).
#[test]
fn a_guard_cleaning_up_after_a_killed_run_leaves_the_next_runs_capture_in_place() {
    assert!(is_root(), "the capture test needs root (CI runs as root)");
    let (services, pods) = ("10.47.0.0/16", "127.47.0.0/16");
    let (last, next) = (
        5_000_000 + std::process::id(),
        6_000_000 + std::process::id(),
    );
    let mut last_guard = start_guard(last, services, pods, "127.47.0.1");
    let mut next_guard = start_guard(next, services, pods, "127.47.0.2");

    drop(last_guard.stdin.take());
    assert!(last_guard.wait().unwrap().success());
    assert_eq!(capture_left(last, services), Vec::<String>::new());

    let listener = std::net::TcpListener::bind("127.47.0.2:15001").unwrap();
    assert_eq!(
        dial_captured(&listener, "127.47.0.2", "10.47.0.9:80").unwrap(),
        "10.47.0.9:80".parse().unwrap(),
        "the next run's capture after the last run's guard cleaned up"
    );
    drop(listener);

    drop(next_guard.stdin.take());
    assert!(next_guard.wait().unwrap().success());
    assert_eq!(capture_left(next, services), Vec::<String>::new());
}
