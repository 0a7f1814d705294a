//! `bench access-log`: the CPU one access-log line costs the thread that writes it, through
//! tracing's formatter (how shoal wrote its access logs before d6a7d17) against
//! `shoal_runtime::logging::access`. Each way runs in a child process of its own, because a
//! process's log filter is set once: at `SHOAL_LOG=info`, its standard error thrown away, the
//! same waypoint-shaped line (fifteen fields) written N times, timed by the thread's CPU clock.
//! The two alternate, each repeat starting with the other.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::Serialize;
use shoal_runtime::logging::OrDash;

use crate::machine::Machine;
use crate::report::fmt_spread;

#[derive(Clone, Debug, clap::Args)]
pub struct AccessLogBenchArgs {
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Lines each child writes.
    #[arg(long, default_value_t = 200_000)]
    pub lines: u64,
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// How a child writes its lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// `tracing::info!` with one field per value, through tracing-subscriber's formatter.
    Tracing,
    /// `shoal_runtime::logging::access`, one `format_args!`.
    Access,
}

#[derive(Debug, Serialize)]
pub struct Run {
    pub repeat: usize,
    pub via: Via,
    pub lines: u64,
    pub ns_per_line: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub runs: Vec<Run>,
}

/// The child: writes `lines` lines `via` one way and prints the thread CPU time per line.
pub fn worker(via: Via, lines: u64) -> std::io::Result<()> {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return Err(std::io::Error::other(
            "the access log is off in this process (SHOAL_LOG): no line would be written",
        ));
    }
    let client: SocketAddr = ([127, 40, 0, 1], 45_994).into();
    let upstream: Option<SocketAddr> = Some(([127, 40, 0, 2], 9080).into());
    let mut request_id = String::new();
    let started = thread_cpu_ns();
    for i in 0..lines {
        request_id.clear();
        let _ = write!(request_id, "11772f33-6cb4-45f2-b539-{i:012x}");
        let (path, bytes, millis) = ("/productpage?u=normal", 3000 + i % 100, i % 7);
        match via {
            Via::Tracing => tracing::info!(
                target: "access",
                method = %"GET",
                path = %path,
                protocol = "HTTP/1.1",
                code = 200u16,
                flags = "-",
                details = "via_upstream",
                bytes_received = 0u64,
                bytes_sent = bytes,
                duration_ms = millis,
                upstream_host = %OrDash(upstream),
                authority = %"productpage.bookinfo:9080",
                request_id = %request_id,
                src.identity = %"spiffe://cluster.local/ns/default/sa/curl",
                src.addr = %client,
                "request"
            ),
            Via::Access => shoal_runtime::logging::access(
                "request",
                format_args!(
                    "method={} path={} protocol={:?} code={} flags={:?} details={:?} \
                     bytes_received={} bytes_sent={} duration_ms={} upstream_host={} \
                     authority={} request_id={} src.identity={} src.addr={}",
                    "GET",
                    path,
                    "HTTP/1.1",
                    200u16,
                    "-",
                    "via_upstream",
                    0u64,
                    bytes,
                    millis,
                    OrDash(upstream),
                    "productpage.bookinfo:9080",
                    request_id,
                    "spiffe://cluster.local/ns/default/sa/curl",
                    client,
                ),
            ),
        }
    }
    let ns = thread_cpu_ns().saturating_sub(started);
    println!("ns_per_line={}", ns as f64 / lines.max(1) as f64);
    Ok(())
}

fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

pub fn run(args: &AccessLogBenchArgs) -> std::io::Result<PathBuf> {
    let machine = Machine::describe();
    let exe = std::env::current_exe()?;
    let mut runs = Vec::new();
    for repeat in 0..args.repeats {
        let order = if repeat % 2 == 0 {
            [Via::Tracing, Via::Access]
        } else {
            [Via::Access, Via::Tracing]
        };
        for via in order {
            let name = match via {
                Via::Tracing => "tracing",
                Via::Access => "access",
            };
            let out = Command::new(&exe)
                .args(["access-log-worker", "--via", name, "--lines"])
                .arg(args.lines.to_string())
                .env("SHOAL_LOG", "info")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let ns_per_line = text
                .lines()
                .find_map(|l| l.strip_prefix("ns_per_line="))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|_| out.status.success())
                .ok_or_else(|| {
                    std::io::Error::other(format!(
                        "the {name} worker failed ({}): {text}",
                        out.status
                    ))
                })?;
            eprintln!(
                "repeat {}: {name:>7} {ns_per_line:>7.0} ns per line",
                repeat + 1
            );
            runs.push(Run {
                repeat,
                via,
                lines: args.lines,
                ns_per_line,
            });
        }
    }
    let report = Report { machine, runs };
    let summary = summarize(&report, args);
    crate::report::write(&args.out, &report.machine, "access-log", &report, &summary)
}

fn summarize(r: &Report, args: &AccessLogBenchArgs) -> String {
    let mut md = String::from("# The CPU one access-log line costs\n\n");
    md.push_str(&r.machine.markdown());
    let _ = write!(
        md,
        "\nA waypoint's request line (fifteen fields), written {} times by one thread of a process \
         at `SHOAL_LOG=info` whose standard error is thrown away, timed by that thread's CPU clock \
         (formatting and handing the line to the log's buffer; the log thread's writes are not \
         counted). `tracing`: `tracing::info!` with a field per value through tracing-subscriber's \
         formatter, as shoal wrote its access logs before d6a7d17; `access`: \
         `shoal_runtime::logging::access`. {} repeats, alternating. Medians (min–max).\n\n\
         | way | ns per line | ÷ tracing in the same repeat |\n|---|---:|---:|\n",
        args.lines, args.repeats
    );
    let of = |via: Via| -> Vec<&Run> { r.runs.iter().filter(|x| x.via == via).collect() };
    for (name, via) in [("tracing", Via::Tracing), ("access", Via::Access)] {
        let values: Vec<f64> = of(via).iter().map(|x| x.ns_per_line).collect();
        let ratios: Vec<f64> = of(via)
            .iter()
            .filter_map(|x| {
                of(Via::Tracing)
                    .iter()
                    .find(|t| t.repeat == x.repeat && t.ns_per_line > 0.0)
                    .map(|t| x.ns_per_line / t.ns_per_line)
            })
            .collect();
        let _ = writeln!(
            md,
            "| {name} | {} | {} |",
            fmt_spread(values, 0),
            fmt_spread(ratios, 2)
        );
    }
    md
}
