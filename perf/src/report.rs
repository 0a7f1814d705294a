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
    let dir = run_dir(out, &format!("{date}-{}", machine.short_commit()), files);
    std::fs::create_dir_all(&dir)?;
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents)?;
    }
    index_results(out)?;
    Ok(dir)
}

/// Rewrites `<out>/README.md`: the newest result folder first, then every folder with its files.
pub fn index_results(out: &std::path::Path) -> std::io::Result<()> {
    let mut dirs: Vec<(String, Option<i64>)> = std::fs::read_dir(out)?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .map(|d| {
            let time = commit_time(out, &d);
            (d, time)
        })
        .collect();
    dirs.sort_by(|a, b| run_order(&a.0, a.1).cmp(&run_order(&b.0, b.1)));
    let dirs: Vec<String> = dirs.into_iter().map(|(d, _)| d).collect();
    let mut md = String::from(
        "# Benchmark results\n\nEach folder is one run: `<date>-<commit>`, with raw JSON, a summary in \
         Markdown and the machine it ran on. Made by `shoal-bench`; do not edit by hand.\n\n",
    );
    if let Some(latest) = dirs.last() {
        md.push_str(&format!("Latest: [{latest}]({latest}/)\n\n"));
    }
    // Committed results are kept as written; what one got wrong is said beside them.
    if out.join("ERRATA.md").exists() {
        md.push_str("Corrections to committed results: [ERRATA.md](ERRATA.md)\n\n");
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

/// When the commit a `<date>-<commit>` folder measured was made (seconds), from git, if the
/// repository holding `out` has it.
fn commit_time(out: &Path, dir: &str) -> Option<i64> {
    let (_, commit) = split_run_name(dir)?;
    let shown = std::process::Command::new("git")
        .arg("-C")
        .arg(out)
        .args(["show", "-s", "--format=%ct", commit])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !shown.status.success() {
        return None;
    }
    String::from_utf8_lossy(&shown.stdout).trim().parse().ok()
}

/// The folder for a run named `base`: `base` itself, unless it already holds a file of this
/// run's (the same benchmark, run again at the same commit on the same day), then `base-2`,
/// `base-3`… Different benchmarks at one commit share a folder; a repeat does not overwrite.
fn run_dir(out: &Path, base: &str, files: &[(String, String)]) -> PathBuf {
    let taken = |dir: &Path| files.iter().any(|(name, _)| dir.join(name).exists());
    let mut dir = out.join(base);
    let mut repeat = 1;
    while taken(&dir) {
        repeat += 1;
        dir = out.join(format!("{base}-{repeat}"));
    }
    dir
}

/// `2026-11-23-fd9fc6b8` → (`2026-11-23`, `fd9fc6b8`); a repeat's `2026-11-23-fd9fc6b8-2` names
/// the same commit.
fn split_run_name(dir: &str) -> Option<(&str, &str)> {
    let date = dir.get(..10)?;
    let commit = dir.get(11..)?.split('-').next()?;
    (dir.as_bytes().get(10) == Some(&b'-') && !commit.is_empty()).then_some((date, commit))
}

/// Oldest first: by date, then by when the measured commit was made (one day's folders would
/// otherwise fall in the order of their hashes), then by name.
fn run_order(dir: &str, commit_time: Option<i64>) -> (&str, Option<i64>, &str) {
    let date = split_run_name(dir).map_or(dir, |(date, _)| date);
    (date, commit_time, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_names_the_latest_run_and_the_corrections_when_there_are_some() {
        let out = std::env::temp_dir().join(format!("shoal-index-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        for run in ["2026-11-21-aaaaaaaa", "2026-11-23-bbbbbbbb"] {
            std::fs::create_dir_all(out.join(run)).expect("run folder");
            std::fs::write(out.join(run).join("summary.md"), "#").expect("summary");
        }
        index_results(&out).expect("index");
        let index = std::fs::read_to_string(out.join("README.md")).expect("index");
        assert!(
            index.contains("Latest: [2026-11-23-bbbbbbbb](2026-11-23-bbbbbbbb/)"),
            "{index}"
        );
        assert!(!index.contains("ERRATA"), "{index}");
        std::fs::write(out.join("ERRATA.md"), "# Corrections").expect("errata");
        index_results(&out).expect("index");
        let index = std::fs::read_to_string(out.join("README.md")).expect("index");
        assert!(index.contains("[ERRATA.md](ERRATA.md)"), "{index}");
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn runs_are_ordered_by_date_then_commit_time() {
        let mut runs = [
            ("2026-11-23-fd9fc6b8", Some(300)),
            ("2026-11-23-251d3bf7", Some(900)),
            ("2026-11-22-ffffffff", Some(1000)),
            ("2026-11-23-1010799b", Some(400)),
            ("2026-11-23-c7418757", Some(100)),
            ("2026-11-23-00000000", None),
        ];
        runs.sort_by(|a, b| run_order(a.0, a.1).cmp(&run_order(b.0, b.1)));
        let names: Vec<&str> = runs.iter().map(|r| r.0).collect();
        assert_eq!(
            names,
            [
                "2026-11-22-ffffffff",
                "2026-11-23-00000000",
                "2026-11-23-c7418757",
                "2026-11-23-fd9fc6b8",
                "2026-11-23-1010799b",
                "2026-11-23-251d3bf7",
            ]
        );
        assert_eq!(
            split_run_name("2026-11-23-fd9fc6b8"),
            Some(("2026-11-23", "fd9fc6b8"))
        );
        assert_eq!(
            split_run_name("2026-11-23-fd9fc6b8-2"),
            Some(("2026-11-23", "fd9fc6b8"))
        );
        assert_eq!(split_run_name("README.md"), None);
        assert_eq!(split_run_name("2026-11-23"), None);
    }

    #[test]
    fn a_benchmark_run_again_at_one_commit_gets_its_own_folder() {
        let out = std::env::temp_dir().join(format!("shoal-run-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let files = |name: &str| vec![(name.to_string(), String::new())];
        let base = "2026-11-24-8b947938";
        // (files already written by earlier runs, this run's file, the folder it gets)
        let cases = [
            (vec![], "summary.md", base.to_string()),
            (vec![base], "hbone.md", base.to_string()),
            (vec![base], "summary.md", format!("{base}-2")),
            (
                vec![base, "2026-11-24-8b947938-2"],
                "summary.md",
                format!("{base}-3"),
            ),
        ];
        for (earlier, name, want) in cases {
            let _ = std::fs::remove_dir_all(&out);
            for dir in &earlier {
                std::fs::create_dir_all(out.join(dir)).unwrap();
                std::fs::write(out.join(dir).join("summary.md"), "").unwrap();
            }
            assert_eq!(
                run_dir(&out, base, &files(name)),
                out.join(&want),
                "{earlier:?} then {name}"
            );
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}
