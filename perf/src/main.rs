//! `shoal-bench`: the demo, the servers the benchmarks measure, and the benchmarks.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shoal_perf::{
    backend, capture, compare, control_bench, demo, echo, hbone_bench, hbone_node, load,
    loadgen_bench, log_bench, runtime_bench, traffic_bench, waypoint_bench, ztunnel_bench,
};
use shoal_runtime::{RuntimeArgs, RuntimeConfig};

#[derive(Parser)]
#[command(
    name = "shoal-bench",
    version,
    about = "shoal's demo, load generator and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a server, load it, read its admin endpoints, drain it: what shoal does, in a minute.
    Demo(demo::DemoArgs),
    /// Run a benchmark and write its results under bench-results/.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// An echo server on the runtime (what `bench runtime` measures). Runs until SIGTERM/SIGINT.
    EchoServer {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
        /// Admin address (/healthz/ready, /metrics, /config_dump); off unless given.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Read and discard instead of echoing (a sink for one-way throughput).
        #[arg(long)]
        discard: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// The load generator: closed or open loop (coordinated-omission corrected), HTTP/1.1,
    /// HTTP/1.1 with a connection per request, HTTP/2 streams, raw TCP; through SOCKS5 if asked.
    Load(load::LoadArgs),
    /// An HTTP/1.1 + HTTP/2 (h2c) backend with known answers (/status/CODE, /delay/MS, /bytes/N),
    /// naming itself in `x-backend`. Runs until SIGTERM/SIGINT.
    Backend {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Sent back in `x-backend` on every answer.
        #[arg(long, default_value = "backend")]
        name: String,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// One of the two HBONE nodes `bench hbone` measures. Runs until SIGTERM/SIGINT.
    HboneNode(hbone_node::NodeArgs),
    /// Write the generated mesh `bench control` compiles (N pods with proportional services,
    /// waypoints, policies, routes and ServiceEntries) into DIR, to try `shoalctl` on.
    GenerateMesh {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 1000)]
        pods: usize,
    },
    /// Install a benchmark's iptables capture and remove it when standard input closes (what
    /// `--capture` runs).
    #[command(hide = true)]
    CaptureGuard(capture::GuardArgs),
    /// Write access-log lines one way and print the CPU each cost (`bench access-log`'s child).
    #[command(hide = true)]
    AccessLogWorker {
        #[arg(long, value_enum)]
        via: log_bench::Via,
        #[arg(long)]
        lines: u64,
    },
    /// Compile a manifests directory once and print the figures as JSON (`bench control`'s child).
    #[command(hide = true)]
    ControlCompile {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        pods: usize,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// The runtime alone: echo over loopback, 1 and 2 shards, io_uring and epoll.
    Runtime(runtime_bench::RuntimeBenchArgs),
    /// HBONE tunnels (two nodes, mTLS + HTTP/2 CONNECT) against direct TCP and the AES-GCM bound.
    Hbone(hbone_bench::HboneBenchArgs),
    /// The control plane: compile time, peak memory and snapshot size for 1k/10k/100k pods, and
    /// the time from a file change to every shard holding the new snapshot.
    Control(control_bench::ControlBenchArgs),
    /// The load generator against wrk, same target, same connections, interleaved.
    Loadgen(loadgen_bench::LoadgenBenchArgs),
    /// HTTP through two ztunnels (capture or SOCKS5 → HBONE) against direct and against HAProxy
    /// pairs relaying TCP (over mTLS, and in plain text): rates, latency, new connections,
    /// throughput, the proxies' CPU per request and RSS.
    Ztunnel(ztunnel_bench::ZtunnelBenchArgs),
    /// HTTP through ambient L7 (ztunnel → waypoint → ztunnel) against ambient L4 and direct:
    /// rate at 50 connections, open-loop latency, every proxy's CPU per request and RSS.
    Waypoint(waypoint_bench::WaypointBenchArgs),
    /// Each traffic-management feature's cost on the waypoint's request path (rate and p99 as a
    /// ratio of a service without it), and egress with TLS origination against direct HTTPS.
    Traffic(traffic_bench::TrafficBenchArgs),
    /// Every topology side by side — direct, ambient L4, ambient L7, shoal's sidecar mode, nginx
    /// and HAProxy sidecar pairs with mTLS, and any proxy given with --proxy — with the same
    /// backend and load: rates, latency, new connections, bulk, CPU per request, memory for N
    /// pods; summary.md and SVG charts.
    Compare(compare::CompareArgs),
    /// The CPU one access-log line costs: tracing's formatter against shoal's access-log writer.
    AccessLog(log_bench::AccessLogBenchArgs),
    /// Rewrites the results folder's README.md index (every run writes it; this is for after
    /// folders were added or removed by hand).
    Index {
        #[arg(long, default_value = "bench-results")]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let _log = shoal_runtime::logging::init("warn");
    let result = match Cli::parse().command {
        Command::Demo(args) => demo::run(&args),
        Command::Bench {
            which: Bench::Runtime(args),
        } => runtime_bench::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("runtime-echo.md")) {
                println!("\n{md}");
            }
        }),
        Command::EchoServer {
            listen,
            admin,
            discard,
            runtime,
        } => echo_server(listen, admin, discard, &runtime),
        Command::HboneNode(args) => hbone_node::run(&args).map_err(std::io::Error::other),
        Command::CaptureGuard(args) => capture::guard(&args),
        Command::Load(args) => load::main(&args),
        Command::Backend {
            listen,
            name,
            runtime,
        } => backend_server(listen, &name, &runtime),
        Command::Bench {
            which: Bench::Loadgen(args),
        } => loadgen_bench::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("loadgen.md")) {
                println!("\n{md}");
            }
        }),
        Command::Bench {
            which: Bench::Ztunnel(args),
        } => ztunnel_bench::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("ztunnel.md")) {
                println!("\n{md}");
            }
        }),
        Command::Bench {
            which: Bench::Waypoint(args),
        } => waypoint_bench::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("waypoint.md")) {
                println!("\n{md}");
            }
        }),
        Command::Bench {
            which: Bench::Traffic(args),
        } => traffic_bench::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("traffic.md")) {
                println!("\n{md}");
            }
        }),
        Command::Bench {
            which: Bench::Compare(args),
        } => compare::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("summary.md")) {
                println!("\n{md}");
            }
        }),
        Command::ControlCompile { dir, pods } => control_bench::compile_once(&dir, pods),
        Command::AccessLogWorker { via, lines } => log_bench::worker(via, lines),
        Command::Bench {
            which: Bench::AccessLog(args),
        } => log_bench::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("access-log.md")) {
                println!("\n{md}");
            }
        }),
        Command::GenerateMesh { dir, pods } => control_bench::generate(&dir, pods),
        Command::Bench {
            which: Bench::Control(args),
        } => control_bench::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("control.md")) {
                println!("\n{md}");
            }
        }),
        Command::Bench {
            which: Bench::Index { out },
        } => shoal_perf::report::index_results(&out),
        Command::Bench {
            which: Bench::Hbone(args),
        } => hbone_bench::run(&args).map(|dir| {
            println!("results: {}", dir.display());
            if let Ok(md) = std::fs::read_to_string(dir.join("hbone.md")) {
                println!("\n{md}");
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            shoal_runtime::logging::flush();
            eprintln!("shoal-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn echo_server(
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    discard: bool,
    runtime: &RuntimeArgs,
) -> std::io::Result<()> {
    let server = echo::EchoServer::start_mode(RuntimeConfig::from(runtime), listen, admin, discard)
        .map_err(std::io::Error::other)?;
    server
        .runtime
        .handle_signals()
        .map_err(std::io::Error::other)?;
    shoal_perf::process::announce_ready(
        &server.runtime,
        server.admin.as_ref().map(|a| a.local_addr()),
    );
    let echo::EchoServer { runtime, admin } = server;
    runtime.join();
    drop(admin);
    Ok(())
}

fn backend_server(listen: SocketAddr, name: &str, runtime: &RuntimeArgs) -> std::io::Result<()> {
    let server = backend::Backend::start(RuntimeConfig::from(runtime), listen, name)
        .map_err(std::io::Error::other)?;
    server
        .runtime
        .handle_signals()
        .map_err(std::io::Error::other)?;
    shoal_perf::process::announce_ready(&server.runtime, None);
    server.runtime.join();
    Ok(())
}
