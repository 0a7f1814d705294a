//! The load generator counted against servers whose answers are known: exact request counts per
//! protocol, injected statuses, refused connections, timeouts and delays show up as such, the open
//! loop measures from intended send times, and SOCKS5 works through a real proxy (microsocks).

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command};
use std::time::Duration;

use clap::Parser;
use shoal_perf::backend::Backend;
use shoal_perf::echo::EchoServer;
use shoal_perf::load::{self, LoadArgs, Report};
use shoal_runtime::RuntimeConfig;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    load: LoadArgs,
}

fn run(args: &[&str]) -> Report {
    let mut all = vec!["load"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--quiet", "--shards", "2"]);
    let cli = Cli::parse_from(all);
    load::run(&cli.load).unwrap_or_else(|e| panic!("load {args:?}: {e}"))
}

fn server_config() -> RuntimeConfig {
    RuntimeConfig {
        shards: 1,
        pin: false,
        drain_timeout: Duration::from_secs(1),
        ..RuntimeConfig::default()
    }
}

fn backend() -> (Backend, String) {
    let b =
        Backend::start(server_config(), "127.0.0.1:0".parse().unwrap(), "known").expect("backend");
    let url = format!("http://{}", b.listen_addr());
    (b, url)
}

fn stop(rt: shoal_runtime::Runtime) {
    rt.begin_drain();
    rt.join();
}

#[test]
fn exact_request_counts_for_every_protocol() {
    let (b, url) = backend();
    let target = format!("{url}/");
    for protocol in ["http1", "http1-close", "h2"] {
        let r = run(&[
            &target,
            "--protocol",
            protocol,
            "-c",
            "3",
            "--streams",
            "4",
            "--requests",
            "500",
            "--warmup-s",
            "0",
        ]);
        assert_eq!(r.requests, 500, "{protocol}");
        assert_eq!(r.status.s2xx, 500, "{protocol}");
        assert_eq!(r.errors.total(), 0, "{protocol}: {:?}", r.errors);
        assert!(
            r.latency_us.p50 > 0.0 && r.latency_us.max >= r.latency_us.p99,
            "{protocol}: {:?}",
            r.latency_us
        );
        let recorded: u64 = r.histogram.iter().map(|(_, n)| n).sum();
        assert_eq!(
            recorded, 500,
            "{protocol}: the histogram holds every request"
        );
    }
    stop(b.runtime);
    let echo =
        EchoServer::start(server_config(), "127.0.0.1:0".parse().unwrap(), None).expect("echo");
    let r = run(&[
        &echo.listen_addr().to_string(),
        "--protocol",
        "tcp",
        "-c",
        "3",
        "--requests",
        "333",
        "--warmup-s",
        "0",
        "--message-bytes",
        "100",
    ]);
    assert_eq!((r.requests, r.errors.total(), r.bytes_in), (333, 0, 33_300));
    // Bulk: exactly the writes asked for, every byte of them echoed back.
    let r = run(&[
        &echo.listen_addr().to_string(),
        "--protocol",
        "tcp-bulk",
        "-c",
        "2",
        "--requests",
        "400",
        "--warmup-s",
        "0",
        "--message-bytes",
        "65536",
    ]);
    assert_eq!(
        (r.requests, r.errors.total(), r.bytes_out),
        (400, 0, 400 * 65536)
    );
    assert_eq!(r.bytes_in, r.bytes_out, "the echo of every byte is counted");
    stop(echo.runtime);
    // Against a sink nothing comes back, and the run still ends on time.
    let sink = EchoServer::start_mode(server_config(), "127.0.0.1:0".parse().unwrap(), None, true)
        .expect("sink");
    let began = std::time::Instant::now();
    let r = run(&[
        &sink.listen_addr().to_string(),
        "--protocol",
        "tcp-bulk",
        "-c",
        "2",
        "--duration-s",
        "0.5",
        "--warmup-s",
        "0.1",
        "--message-bytes",
        "65536",
    ]);
    assert!(r.bytes_out > 1 << 20, "{} bytes sent", r.bytes_out);
    assert_eq!((r.bytes_in, r.errors.total()), (0, 0));
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    stop(sink.runtime);
}

#[test]
fn statuses_refusals_and_timeouts_are_counted_as_such() {
    let (b, url) = backend();
    let r = run(&[
        &format!("{url}/status/503"),
        "-c",
        "2",
        "--requests",
        "200",
        "--warmup-s",
        "0",
    ]);
    assert_eq!((r.requests, r.status.s5xx, r.status.s2xx), (200, 200, 0));
    let r = run(&[
        &format!("{url}/status/404"),
        "--protocol",
        "h2",
        "-c",
        "1",
        "--requests",
        "50",
        "--warmup-s",
        "0",
    ]);
    assert_eq!(r.status.s4xx, 50);

    let r = run(&[
        &format!("{url}/delay/1000"),
        "-c",
        "2",
        "--timeout-s",
        "0.2",
        "--duration-s",
        "1",
        "--warmup-s",
        "0",
    ]);
    assert_eq!(r.requests, 0);
    assert!(r.errors.timeout >= 2, "{:?}", r.errors);
    stop(b.runtime);

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = run(&[
        &format!("http://{closed}/"),
        "-c",
        "2",
        "--duration-s",
        "0.5",
        "--warmup-s",
        "0",
    ]);
    assert_eq!(r.requests, 0);
    assert!(r.errors.connect > 0, "{:?}", r.errors);
    assert!(
        r.errors.connect < 500,
        "connect failures back off instead of spinning: {:?}",
        r.errors
    );
}

#[test]
fn delays_show_in_the_latencies() {
    let (b, url) = backend();
    let r = run(&[
        &format!("{url}/delay/30"),
        "-c",
        "2",
        "--duration-s",
        "1",
        "--warmup-s",
        "0.1",
    ]);
    assert!(r.requests >= 20, "{}", r.requests);
    assert!(
        r.latency_us.p50 >= 30_000.0 && r.latency_us.p50 < 60_000.0,
        "{:?}",
        r.latency_us
    );
    stop(b.runtime);
}

#[test]
fn the_open_loop_measures_from_intended_send_times() {
    let (b, url) = backend();
    let target = format!("{url}/delay/40");
    // One connection can serve 25 requests/s; asked for 100/s, requests queue behind each other.
    let closed = run(&[&target, "-c", "1", "--duration-s", "1.5", "--warmup-s", "0"]);
    let open = run(&[
        &target,
        "-c",
        "1",
        "--rate",
        "100",
        "--duration-s",
        "1.5",
        "--warmup-s",
        "0",
    ]);
    assert!(
        closed.latency_us.p99 < 80_000.0,
        "closed loop sees only the service time: {:?}",
        closed.latency_us
    );
    assert!(
        open.latency_us.p99 > 10.0 * closed.latency_us.p99,
        "the open loop counts the queueing a closed loop hides: open {:?} vs closed {:?}",
        open.latency_us,
        closed.latency_us
    );
    assert!(
        open.rps < 40.0,
        "the server's rate, not the asked one: {}",
        open.rps
    );
    // At a rate the server keeps up with, the open loop matches the service time.
    let easy = run(&[
        &target,
        "-c",
        "4",
        "--rate",
        "40",
        "--duration-s",
        "1.5",
        "--warmup-s",
        "0.2",
    ]);
    assert!(easy.latency_us.p50 < 60_000.0, "{:?}", easy.latency_us);
    assert!((easy.rps - 40.0).abs() < 6.0, "{}", easy.rps);
    // An idle slot's request is measured from when the generator's timer woke it, not from the
    // intended time: the millisecond timer's lateness is not the target's.
    let fast = run(&[
        &url,
        "-c",
        "4",
        "--rate",
        "400",
        "--duration-s",
        "1",
        "--warmup-s",
        "0.2",
    ]);
    assert!(
        fast.latency_us.p50 < 700.0,
        "a loopback answer takes microseconds: {:?}",
        fast.latency_us
    );
    stop(b.runtime);
}

struct Socks(Child);

impl Drop for Socks {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn microsocks() -> (Socks, SocketAddr) {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = Command::new("microsocks")
        .args(["-i", "127.0.0.1", "-p", &addr.port().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("microsocks (a SOCKS5 proxy from Debian's packages; .ci/run installs it)");
    let socks = Socks(child);
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return (socks, addr);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("microsocks did not listen on {addr}");
}

#[test]
fn through_a_socks5_proxy() {
    let (proxy, proxy_addr) = microsocks();
    let (b, url) = backend();
    let socks = proxy_addr.to_string();
    for protocol in ["http1", "h2"] {
        let r = run(&[
            &format!("{url}/"),
            "--protocol",
            protocol,
            "-c",
            "2",
            "--requests",
            "200",
            "--warmup-s",
            "0",
            "--socks5",
            &socks,
        ]);
        assert_eq!(
            (r.requests, r.status.s2xx, r.errors.total()),
            (200, 200, 0),
            "{protocol}"
        );
    }
    stop(b.runtime);
    // A destination the proxy cannot reach is a connect error, not a hang.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = run(&[
        &format!("http://{closed}/"),
        "-c",
        "1",
        "--duration-s",
        "0.3",
        "--warmup-s",
        "0",
        "--socks5",
        &socks,
    ]);
    assert!(r.errors.connect > 0 && r.requests == 0, "{:?}", r.errors);
    drop(proxy);
}

/// What a benchmark samples beside the load (the proxies' CPU) covers the measured window, not
/// the warm-up: `run_sampling` reads its counter when the warm-up ends and when the window does.
/// Sampled here is the clock itself, so its growth must be the measured duration.
#[test]
fn samples_beside_the_load_cover_the_measured_window_only() {
    let (b, url) = backend();
    let target = format!("{url}/");
    let started = std::time::Instant::now();
    let cli = Cli::parse_from([
        "load",
        &target,
        "-c",
        "2",
        "--warmup-s",
        "0.6",
        "--duration-s",
        "0.4",
        "--quiet",
    ]);
    let (r, [grew]) = load::run_sampling(&cli.load, || [started.elapsed().as_secs_f64()]).unwrap();
    assert!(r.requests > 0);
    assert!(
        (grew - 0.4).abs() < 0.05,
        "the window grew {grew} s, not 0.4"
    );
    // Marks come once each, in order, at the warm-up's end and the window's.
    let mut marks = Vec::new();
    load::run_marked(&cli.load, &mut |m| {
        marks.push((m, started.elapsed().as_secs_f64()))
    })
    .unwrap();
    assert_eq!(
        marks.iter().map(|(m, _)| *m).collect::<Vec<_>>(),
        [load::Mark::Measuring, load::Mark::Ended]
    );
    assert!(marks[1].1 - marks[0].1 > 0.35, "{marks:?}");
    // With a request count the window ends when the last one is answered, long before its limit.
    let cli = Cli::parse_from([
        "load",
        &target,
        "-c",
        "1",
        "--warmup-s",
        "0",
        "--requests",
        "50",
        "--quiet",
    ]);
    let at = std::time::Instant::now();
    let (r, [grew]) = load::run_sampling(&cli.load, || [at.elapsed().as_secs_f64()]).unwrap();
    assert_eq!(r.requests, 50);
    assert!(grew < 2.0, "the window grew {grew} s");
    stop(b.runtime);
}
