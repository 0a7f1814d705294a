//! What every benchmark writes: medians with their spread, and a result folder
//! `bench-results/<date>-<commit>/` with raw JSON and a Markdown summary, indexed in README.md.

use std::path::{Path, PathBuf};

use crate::machine::Machine;

/// Median, min and max of `values`.
pub fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

pub fn median(values: Vec<f64>) -> f64 {
    spread(values).0
}

/// "median (min–max)" with `decimals` decimals.
pub fn fmt_spread(values: Vec<f64>, decimals: usize) -> String {
    let (m, lo, hi) = spread(values);
    format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
}

/// Writes `<name>.json` and `<name>.md` into `<out>/<date>-<commit>/` and re-indexes `out`.
pub fn write<R: serde::Serialize>(
    out: &Path,
    machine: &Machine,
    name: &str,
    report: &R,
    summary: &str,
) -> std::io::Result<PathBuf> {
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    write_files(
        out,
        machine,
        &[
            (format!("{name}.json"), json),
            (format!("{name}.md"), summary.to_string()),
        ],
    )
}

/// Writes `files` (name, contents) into `<out>/<date>-<commit>/` and re-indexes `out`.
pub fn write_files(
    out: &Path,
    machine: &Machine,
    files: &[(String, String)],
) -> std::io::Result<PathBuf> {
    let date = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "undated".into());
    let dir = out.join(format!("{date}-{}", machine.short_commit()));
    std::fs::create_dir_all(&dir)?;
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents)?;
    }
    index_results(out)?;
    Ok(dir)
}

/// Rewrites `<out>/README.md`: the newest result folder first, then every folder with its files.
pub fn index_results(out: &std::path::Path) -> std::io::Result<()> {
    let mut dirs: Vec<String> = std::fs::read_dir(out)?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    dirs.sort();
    let mut md = String::from(
        "# Benchmark results\n\nEach folder is one run: `<date>-<commit>`, with raw JSON, a summary in \
         Markdown and the machine it ran on. Made by `shoal-bench`; do not edit by hand.\n\n",
    );
    if let Some(latest) = dirs.last() {
        md.push_str(&format!("Latest: [{latest}]({latest}/)\n\n"));
    }
    for d in dirs.iter().rev() {
        let mut files: Vec<String> = std::fs::read_dir(out.join(d))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|f| f.ends_with(".md"))
            .collect();
        files.sort();
        let links: Vec<String> = files.iter().map(|f| format!("[{f}]({d}/{f})")).collect();
        md.push_str(&format!("- {d}: {}\n", links.join(", ")));
    }
    std::fs::write(out.join("README.md"), md)
}
