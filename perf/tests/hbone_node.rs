//! The tunnel-alone measurement `bench hbone` reports: one stream from memory through a real mTLS +
//! HTTP/2 CONNECT tunnel into a `--sink` server process, which must read it to the end and say so;
//! and tunnels opened one at a time against it, timed.

use std::time::Duration;

use shoal_perf::hbone_node::{setup_latency, tunnel_stream};
use shoal_perf::process::ServerProcess;

#[test]
fn one_stream_and_timed_tunnel_openings_run_against_the_sink_process() {
    let ca = std::env::temp_dir().join(format!("shoal-hbone-node-test-{}", std::process::id()));
    shoal_hbone::ca::LocalCa::generate("cluster.local")
        .and_then(|ca_| ca_.write(&ca))
        .expect("a CA is written");
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_shoal-bench"));
    let args: Vec<String> = [
        "hbone-node",
        "--role",
        "server",
        "--sink",
        "--ca",
        &ca.display().to_string(),
        "--shards",
        "1",
        "--no-pin",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sink = ServerProcess::start_exe(&exe, &args).expect("the sink starts");
    let faults_before = minor_faults(sink.pid());
    let measured = Duration::from_millis(800);
    let r = tunnel_stream(sink.listen, &ca, Duration::from_millis(200), measured)
        .expect("the stream runs and the sink confirms its end");
    assert!(r.bytes > 8 << 20, "megabytes went through in 0.8 s: {r:?}");
    assert!(
        r.seconds >= measured.as_secs_f64() * 0.95,
        "the time runs until the sink has read everything: {r:?}"
    );
    assert!(r.sender_cpu_s > 0.0, "the sender's CPU is measured: {r:?}");
    assert!(sink.cpu_seconds() > 0.0, "the sink did the receiving");
    // HTTP/2 reads each 1 MiB DATA frame into a fresh buffer; unless freed buffers are reused
    // (runtime::memory), every one starts on untouched pages: 256 faults per MiB.
    let faults = minor_faults(sink.pid()) - faults_before;
    let mib = r.bytes >> 20;
    assert!(
        faults < mib * 8,
        "the sink took {faults} page faults for {mib} MiB: it is not reusing its buffers"
    );
    // Opening tunnels, timed: streams on one connection, then whole new connections.
    let setup = setup_latency(sink.listen, &ca, 200, 10).expect("tunnels open against the sink");
    assert!(
        setup.stream_p50_us > 0.0 && setup.stream_p50_us <= setup.stream_p99_us,
        "{setup:?}"
    );
    assert!(
        setup.connection_p50_us > setup.stream_p50_us,
        "a new connection (three handshakes) takes longer than a stream on one already up: {setup:?}"
    );
    assert!(setup.streams_per_s > 0.0, "{setup:?}");
    let _ = std::fs::remove_dir_all(&ca);
}

/// Minor page faults of a process so far (/proc/PID/stat, field 10).
fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process is alive");
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    after_name
        .split_whitespace()
        .nth(7)
        .and_then(|f| f.parse().ok())
        .expect("minflt")
}
