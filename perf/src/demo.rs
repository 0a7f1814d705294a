//! `shoal-bench demo`: the mesh demo (`mesh_demo`), or with `--runtime` the runtime on its own: it
//! starts the echo server on every core, loads it, reads its admin endpoints, drains it with
//! SIGTERM, and prints what it saw.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use shoal_runtime::DriverChoice;

use crate::client::{self, Load};
use crate::process::ServerProcess;

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Server shards (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub shards: usize,
    /// Seconds of request/response load.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// The runtime's echo demo instead of the mesh.
    #[arg(long)]
    pub runtime: bool,
}

pub fn run(args: &DemoArgs) -> std::io::Result<()> {
    if !args.runtime {
        return crate::mesh_demo::run(&crate::mesh_demo::MeshDemoArgs {
            seconds: args.seconds,
        });
    }
    println!("shoal demo — the thread-per-core runtime on its own\n");
    let server = ServerProcess::start(&[
        "echo-server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--shards".into(),
        args.shards.to_string(),
    ])?;
    let admin = server
        .admin
        .ok_or_else(|| std::io::Error::other("the echo server reported no admin address"))?;
    println!(
        "echo server  {} (pid {}), shards on {}",
        server.listen,
        server.pid(),
        server.driver
    );
    println!("admin        http://{admin}/healthz/ready  /metrics  /config_dump\n");

    let load = |connections, seconds| Load {
        target: server.listen,
        connections,
        warmup: Duration::from_millis(300),
        duration: Duration::from_secs(seconds),
        shards: 1,
        driver: DriverChoice::Auto,
        pin: false,
    };
    let cpu_before = server.cpu_seconds();
    let rr = client::request_response(&load(16, args.seconds.max(1)), 64)?;
    let cpu = server.cpu_seconds() - cpu_before;
    println!(
        "request/response, 16 connections, 64-byte messages, {} s:",
        args.seconds.max(1)
    );
    println!(
        "  {:.0} req/s   p50 {:.0} µs   p90 {:.0} µs   p99 {:.0} µs   p99.9 {:.0} µs   errors {}",
        rr.rps(),
        rr.percentile_us(0.5),
        rr.percentile_us(0.9),
        rr.percentile_us(0.99),
        rr.percentile_us(0.999),
        rr.errors
    );
    println!(
        "  server CPU {:.2} µs per request\n",
        cpu * 1e6 / rr.requests.max(1) as f64
    );

    let bulk = client::bulk(&load(4, 2))?;
    println!(
        "bulk, 4 connections echoing for 2 s: {:.1} Gbit/s, errors {}\n",
        bulk.gbit_per_s(),
        bulk.errors
    );

    let (status, body) = http_get(admin, "/healthz/ready")?;
    println!("GET /healthz/ready → {status} {}", body.trim());
    let (_, metrics) = http_get(admin, "/metrics")?;
    println!("GET /metrics (excerpt):");
    for line in metrics.lines().filter(|l| {
        l.starts_with("shoal_connections_accepted_total")
            || l.starts_with("shoal_buffers_large_high_water")
    }) {
        println!("  {line}");
    }
    let (_, dump) = http_get(admin, "/config_dump")?;
    println!("GET /config_dump → {} bytes of JSON\n", dump.len());

    println!("SIGTERM: the server stops accepting, lets open connections finish, and exits");
    let exit = server.terminate(Duration::from_secs(35))?;
    println!(
        "  {exit}{}",
        if exit.success() {
            " — drained cleanly"
        } else {
            ""
        }
    );
    println!("\nNext: `cargo run --release -p shoal-perf --bin shoal-bench -- bench runtime` measures io_uring vs epoll.");
    if !exit.success() {
        return Err(std::io::Error::other("the server did not exit cleanly"));
    }
    Ok(())
}

/// A minimal GET for the demo's own admin server (one request, `connection: close`).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
