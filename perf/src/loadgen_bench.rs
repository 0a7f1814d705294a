//! `shoal-bench bench loadgen`: the load generator checked against wrk on the same target in the
//! same run. A backend process serves; wrk (one thread) and `shoal-bench load` (one shard) take
//! turns at the same connection counts, closed loop, repeated and interleaved. The figures that
//! matter are the ratios: RPS within a few percent of wrk's, and percentiles consistent with it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use serde::Serialize;

use crate::load::{self, LoadArgs, Protocol};
use crate::machine::Machine;
use crate::process::ServerProcess;
use crate::report::fmt_spread;

#[derive(Clone, Debug, clap::Args)]
pub struct LoadgenBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value_t = 5)]
    pub duration_s: u64,
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub connections: Vec<usize>,
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub tool: String,
    pub repeat: usize,
    pub connections: usize,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub wrk_version: String,
    pub runs: Vec<Run>,
}

/// `1.23ms` → 1230.0 (µs).
fn wrk_duration_us(text: &str) -> Option<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let value: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => value,
        "ms" => value * 1e3,
        "s" => value * 1e6,
        "m" => value * 60e6,
        _ => return None,
    })
}

/// Requests/sec and the 50% / 99% lines of `wrk --latency`.
pub fn parse_wrk(output: &str) -> Option<(f64, f64, f64)> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    for line in output.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => rps = v.parse().ok(),
            (Some("50%"), Some(v)) => p50 = wrk_duration_us(v),
            (Some("99%"), Some(v)) => p99 = wrk_duration_us(v),
            _ => {}
        }
    }
    Some((rps?, p50?, p99?))
}

pub fn wrk(url: &str, connections: usize, duration_s: u64) -> std::io::Result<(f64, f64, f64)> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{duration_s}s"),
            "--latency",
            url,
        ])
        .output()
        .map_err(|e| std::io::Error::other(format!("wrk (apt install wrk): {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).ok_or_else(|| std::io::Error::other(format!("unreadable wrk output: {text}")))
}

fn ours(url: &str, connections: usize, duration_s: u64) -> std::io::Result<(f64, f64, f64)> {
    let mut args = LoadArgs::new(url);
    args.protocol = Protocol::Http1;
    args.connections = connections;
    args.duration_s = duration_s as f64;
    args.warmup_s = 0.0;
    args.shards = 1;
    let r = load::run(&args).map_err(std::io::Error::other)?;
    Ok((r.rps, r.latency_us.p50, r.latency_us.p99))
}

pub fn run(args: &LoadgenBenchArgs) -> std::io::Result<PathBuf> {
    let machine = Machine::describe();
    let wrk_version = Command::new("wrk")
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let backend = ServerProcess::start(
        &["backend", "--listen", "127.0.0.1:0", "--shards", "1"].map(String::from),
    )?;
    let url = format!("http://{}/", backend.listen);
    let mut runs = Vec::new();
    for repeat in 0..args.repeats {
        for &connections in &args.connections {
            // Alternate who goes first, so drift does not favour one tool.
            let order: [&str; 2] = if repeat % 2 == 0 {
                ["wrk", "shoal"]
            } else {
                ["shoal", "wrk"]
            };
            for tool in order {
                let (rps, p50_us, p99_us) = if tool == "wrk" {
                    wrk(&url, connections, args.duration_s)?
                } else {
                    ours(&url, connections, args.duration_s)?
                };
                eprintln!("{tool:>5} c={connections:<3} {rps:>10.0} req/s  p50 {p50_us:.0} µs  p99 {p99_us:.0} µs");
                runs.push(Run {
                    tool: tool.to_string(),
                    repeat,
                    connections,
                    rps,
                    p50_us,
                    p99_us,
                });
            }
        }
    }
    drop(backend);
    let report = Report {
        machine,
        wrk_version,
        runs,
    };
    let summary = summarize(&report, args);
    crate::report::write(&args.out, &report.machine, "loadgen", &report, &summary)
}

fn summarize(r: &Report, args: &LoadgenBenchArgs) -> String {
    let mut md = String::from("# Load generator vs wrk\n\n");
    md.push_str(&r.machine.markdown());
    let _ = write!(
        md,
        "\n{}; one thread each (`wrk -t1`, `shoal-bench load --shards 1`), closed loop, HTTP/1.1 keep-alive, \
         `GET /` on `shoal-bench backend` (1 shard), {} s per run, {} repeats interleaved. Medians (min–max).\n\n",
        r.wrk_version, args.duration_s, args.repeats
    );
    md.push_str("| connections | wrk req/s | shoal req/s | shoal / wrk | wrk p50 µs | shoal p50 µs | wrk p99 µs | shoal p99 µs |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for &c in &args.connections {
        let pick = |tool: &str, f: &dyn Fn(&Run) -> f64| -> Vec<f64> {
            r.runs
                .iter()
                .filter(|x| x.tool == tool && x.connections == c)
                .map(f)
                .collect()
        };
        let ratios: Vec<f64> = (0..args.repeats)
            .filter_map(|rep| {
                let get = |tool: &str| {
                    r.runs
                        .iter()
                        .find(|x| x.tool == tool && x.connections == c && x.repeat == rep)
                        .map(|x| x.rps)
                };
                Some(get("shoal")? / get("wrk")?)
            })
            .collect();
        let _ = writeln!(
            md,
            "| {c} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_spread(pick("wrk", &|x| x.rps), 0),
            fmt_spread(pick("shoal", &|x| x.rps), 0),
            fmt_spread(ratios, 3),
            fmt_spread(pick("wrk", &|x| x.p50_us), 0),
            fmt_spread(pick("shoal", &|x| x.p50_us), 0),
            fmt_spread(pick("wrk", &|x| x.p99_us), 0),
            fmt_spread(pick("shoal", &|x| x.p99_us), 0),
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:8080/\n  1 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   150.00us   20.00us   1.20ms   90.00%\n  Latency Distribution\n     50%  142.00us\n     75%  160.00us\n     90%  180.00us\n     99%    1.10ms\n  500000 requests in 5.00s, 50.00MB read\nRequests/sec: 100000.12\nTransfer/sec:     10.00MB\n";
        assert_eq!(parse_wrk(out), Some((100000.12, 142.0, 1100.0)));
        assert_eq!(wrk_duration_us("2.5s"), Some(2.5e6));
    }
}
