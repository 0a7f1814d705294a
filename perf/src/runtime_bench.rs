//! The runtime's own benchmark: an echo server on the runtime (1 and 2 shards, io_uring and
//! epoll), loaded over loopback by the echo clients. Measures request/response rate and round-trip
//! percentiles on 1 and 16 connections, bulk throughput on 4, and the server's CPU per request and
//! per GiB. Configurations are interleaved within each repeat so drift hits them alike; the report
//! gives medians with min–max and the ratios between drivers and shard counts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use shoal_runtime::DriverChoice;

use crate::client::{self, Load};
use crate::machine::Machine;
use crate::process::ServerProcess;
use crate::report::{fmt_spread, median};

#[derive(Clone, Debug, clap::Args)]
pub struct RuntimeBenchArgs {
    /// Repeats of the whole matrix (interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 5)]
    pub duration_s: u64,
    /// Unmeasured warm-up per phase, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub warmup_ms: u64,
    /// Where result folders go.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Message size for request/response, in bytes.
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,
}

const RR_CONNECTIONS: [usize; 2] = [1, 16];
const BULK_CONNECTIONS: usize = 4;
const SHARD_COUNTS: [usize; 2] = [1, 2];
const DRIVERS: [(DriverChoice, &str); 2] = [
    (DriverChoice::Auto, "io_uring"),
    (DriverChoice::Epoll, "epoll"),
];

#[derive(Clone, Debug, Serialize)]
pub struct RrRun {
    pub connections: usize,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub server_cpu_us_per_request: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BulkRun {
    pub connections: usize,
    pub gbit_per_s: f64,
    pub errors: u64,
    pub server_cpu_s_per_gib: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub repeat: usize,
    pub shards: usize,
    /// The driver the server's shards reported, not just the one asked for.
    pub driver: String,
    pub rr: Vec<RrRun>,
    pub bulk: BulkRun,
    pub server_rss_bytes: u64,
    pub server_exit_clean: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    pub path: &'static str,
    pub machine: Machine,
    pub duration_s: u64,
    pub warmup_ms: u64,
    pub message_bytes: usize,
    /// Share of all CPU time the hypervisor took from this machine during the run (steal). Figures
    /// from runs with different steal are not comparable; ratios within a run are.
    pub cpu_steal_percent: f64,
    pub runs: Vec<Run>,
}

pub fn run(args: &RuntimeBenchArgs) -> std::io::Result<PathBuf> {
    let machine = Machine::describe();
    let steal = crate::machine::StealWindow::start();
    let mut runs = Vec::new();
    for repeat in 0..args.repeats {
        for shards in SHARD_COUNTS {
            for (driver, name) in DRIVERS {
                eprintln!(
                    "repeat {}/{}: {shards} shard(s), {name}",
                    repeat + 1,
                    args.repeats
                );
                runs.push(one(args, repeat, shards, driver)?);
            }
        }
    }
    let cpu_steal_percent = steal.percent();
    let report = Report {
        benchmark: "runtime-echo",
        path: "client (1 shard, io_uring, pinned to core 0) → loopback TCP → echo server on shoal-runtime \
               (pinned shards, pooled copy; a 1-shard server on the last core) → back",
        machine,
        duration_s: args.duration_s,
        warmup_ms: args.warmup_ms,
        message_bytes: args.message_bytes,
        cpu_steal_percent,
        runs,
    };
    crate::report::write(
        &args.out,
        &report.machine,
        "runtime-echo",
        &report,
        &summary(&report),
    )
}

fn one(
    args: &RuntimeBenchArgs,
    repeat: usize,
    shards: usize,
    driver: DriverChoice,
) -> std::io::Result<Run> {
    let driver_arg = match driver {
        DriverChoice::Auto => "auto",
        DriverChoice::Epoll => "epoll",
    };
    let server_args: Vec<String> = vec![
        "echo-server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--shards".into(),
        shards.to_string(),
        "--driver".into(),
        driver_arg.into(),
    ];
    // The client is pinned to core 0. A 1-shard server is confined to the last core so the two
    // never share one; a 2-shard server needs both, and shares core 0 with the client.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let server = if shards < cores {
        let exe = std::env::current_exe()?;
        let mut args = vec![
            "-c".to_string(),
            format!("{}-{}", cores - shards, cores - 1),
            exe.display().to_string(),
        ];
        args.extend(server_args);
        ServerProcess::start_exe(Path::new("taskset"), &args)?
    } else {
        ServerProcess::start(&server_args)?
    };
    let reported_driver = server.driver.clone();
    let load = |connections| Load {
        target: server.listen,
        connections,
        warmup: Duration::from_millis(args.warmup_ms),
        duration: Duration::from_secs(args.duration_s),
        shards: 1,
        driver: DriverChoice::Auto,
        pin: true,
    };
    // CPU is sampled over warm-up too; scale it to the measured share of each phase.
    let measured_share =
        args.duration_s as f64 / (args.duration_s as f64 + args.warmup_ms as f64 / 1000.0);
    let mut rr = Vec::new();
    for connections in RR_CONNECTIONS {
        let cpu_before = server.cpu_seconds();
        let r = client::request_response(&load(connections), args.message_bytes)?;
        let cpu = server.cpu_seconds() - cpu_before;

        rr.push(RrRun {
            connections,
            requests: r.requests,
            errors: r.errors,
            rps: r.rps(),
            p50_us: r.percentile_us(0.50),
            p90_us: r.percentile_us(0.90),
            p99_us: r.percentile_us(0.99),
            p999_us: r.percentile_us(0.999),
            max_us: r.rtt_ns.max() as f64 / 1000.0,
            server_cpu_us_per_request: cpu * measured_share * 1e6 / r.requests.max(1) as f64,
        });
    }
    let cpu_before = server.cpu_seconds();
    let b = client::bulk(&load(BULK_CONNECTIONS))?;
    let cpu = server.cpu_seconds() - cpu_before;

    let gib = (b.bytes as f64 / (1u64 << 30) as f64).max(1e-9);
    let bulk = BulkRun {
        connections: BULK_CONNECTIONS,
        gbit_per_s: b.gbit_per_s(),
        errors: b.errors,
        server_cpu_s_per_gib: cpu * measured_share / gib,
    };
    let server_rss_bytes = server.rss_bytes();
    let status = server.terminate(Duration::from_secs(10))?;
    Ok(Run {
        repeat,
        shards,
        driver: reported_driver,
        rr,
        bulk,
        server_rss_bytes,
        server_exit_clean: status.success(),
    })
}

pub fn summary(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Runtime echo benchmark\n");
    let _ = writeln!(md, "Path: {}.\n", report.path);
    let _ = writeln!(
        md,
        "{} repeats, interleaved; each phase {} s measured after {} ms warm-up; {}-byte messages. \
         Medians with (min–max). Server CPU is user+system time of the server process from /proc.\n",
        report.runs.iter().map(|r| r.repeat).max().map_or(0, |m| m + 1),
        report.duration_s,
        report.warmup_ms,
        report.message_bytes
    );
    let _ = writeln!(md, "## Machine\n\n{}", report.machine.markdown());
    let _ = writeln!(
        md,
        "- CPU steal during the run: {:.1}% of all CPU time (the host's share; absolute figures move \
         with it between runs, ratios within a run much less)\n",
        report.cpu_steal_percent
    );
    let configs: Vec<(usize, String)> = {
        let mut c: Vec<(usize, String)> = report
            .runs
            .iter()
            .map(|r| (r.shards, r.driver.clone()))
            .collect();
        c.dedup();
        c.sort();
        c.dedup();
        c
    };
    let runs_of = |shards: usize, driver: &str| -> Vec<&Run> {
        report
            .runs
            .iter()
            .filter(|r| r.shards == shards && r.driver == driver)
            .collect()
    };
    for (i, connections) in RR_CONNECTIONS.iter().enumerate() {
        let _ = writeln!(md, "## Request/response, {connections} connection(s)\n");
        let _ = writeln!(
            md,
            "| shards | driver | req/s | p50 µs | p99 µs | p99.9 µs | server CPU µs/req | errors |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for (shards, driver) in &configs {
            let runs = runs_of(*shards, driver);
            let rr: Vec<&RrRun> = runs.iter().filter_map(|r| r.rr.get(i)).collect();
            let _ = writeln!(
                md,
                "| {shards} | {driver} | {} | {} | {} | {} | {} | {} |",
                fmt_spread(rr.iter().map(|r| r.rps).collect(), 0),
                fmt_spread(rr.iter().map(|r| r.p50_us).collect(), 1),
                fmt_spread(rr.iter().map(|r| r.p99_us).collect(), 1),
                fmt_spread(rr.iter().map(|r| r.p999_us).collect(), 1),
                fmt_spread(rr.iter().map(|r| r.server_cpu_us_per_request).collect(), 2),
                rr.iter().map(|r| r.errors).sum::<u64>(),
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## Bulk, {BULK_CONNECTIONS} connections echoing\n");
    let _ = writeln!(
        md,
        "| shards | driver | Gbit/s echoed | server CPU s/GiB | server RSS MiB | clean exit |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (shards, driver) in &configs {
        let runs = runs_of(*shards, driver);
        let _ = writeln!(
            md,
            "| {shards} | {driver} | {} | {} | {} | {}/{} |",
            fmt_spread(runs.iter().map(|r| r.bulk.gbit_per_s).collect(), 2),
            fmt_spread(
                runs.iter().map(|r| r.bulk.server_cpu_s_per_gib).collect(),
                3
            ),
            fmt_spread(
                runs.iter()
                    .map(|r| r.server_rss_bytes as f64 / (1 << 20) as f64)
                    .collect(),
                1
            ),
            runs.iter().filter(|r| r.server_exit_clean).count(),
            runs.len(),
        );
    }
    let _ = writeln!(md, "\n## Ratios of medians\n");
    let ratio = |shards: usize, a: &str, b: &str, f: &dyn Fn(&Run) -> f64| -> Option<f64> {
        let x = median(runs_of(shards, a).iter().map(|r| f(r)).collect());
        let y = median(runs_of(shards, b).iter().map(|r| f(r)).collect());
        (y > 0.0 && !runs_of(shards, a).is_empty()).then(|| x / y)
    };
    let rps16 = |r: &Run| r.rr.get(1).map_or(0.0, |x| x.rps);
    let p99_1 = |r: &Run| r.rr.first().map_or(0.0, |x| x.p99_us);
    let bulk = |r: &Run| r.bulk.gbit_per_s;
    for shards in SHARD_COUNTS {
        if let (Some(a), Some(b), Some(c)) = (
            ratio(shards, "io_uring", "epoll", &rps16),
            ratio(shards, "io_uring", "epoll", &p99_1),
            ratio(shards, "io_uring", "epoll", &bulk),
        ) {
            let _ = writeln!(
                md,
                "- {shards} shard(s), io_uring ÷ epoll: req/s at 16 connections {a:.2}×, p99 at 1 connection {b:.2}×, bulk {c:.2}×"
            );
        }
    }
    for (_, driver) in DRIVERS {
        let one: Vec<f64> = runs_of(1, driver).iter().map(|r| bulk(r)).collect();
        let two: Vec<f64> = runs_of(2, driver).iter().map(|r| bulk(r)).collect();
        let r16_1: Vec<f64> = runs_of(1, driver).iter().map(|r| rps16(r)).collect();
        let r16_2: Vec<f64> = runs_of(2, driver).iter().map(|r| rps16(r)).collect();
        if !one.is_empty() && !two.is_empty() {
            let _ = writeln!(
                md,
                "- {driver}, 2 shards ÷ 1 shard: req/s at 16 connections {:.2}×, bulk {:.2}×",
                median(r16_2) / median(r16_1).max(1e-9),
                median(two) / median(one).max(1e-9)
            );
        }
    }
    let _ = writeln!(
        md,
        "\nOn a 2-core machine the client shares the cores with a 2-shard server, so 2 shards \
         cannot show the scaling they would on a larger machine; compare drivers within a row set."
    );
    md
}
