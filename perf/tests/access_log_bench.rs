//! `shoal-bench bench access-log` as a user runs it, shortened: both ways write their lines in
//! children at `SHOAL_LOG=info` (whatever the caller's own filter) and the report holds a time
//! per line for each.

use std::process::Command;

#[test]
fn both_ways_are_timed_in_children_that_log() {
    let out = std::env::temp_dir().join(format!("shoal-access-log-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let result = Command::new(env!("CARGO_BIN_EXE_shoal-bench"))
        .args([
            "bench",
            "access-log",
            "--repeats",
            "1",
            "--lines",
            "2000",
            "--out",
        ])
        .arg(&out)
        // The children log at info regardless.
        .env("SHOAL_LOG", "off")
        .output()
        .expect("shoal-bench runs");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    let run = std::fs::read_dir(&out)
        .expect("results")
        .filter_map(Result::ok)
        .find(|e| e.path().is_dir())
        .expect("a run folder")
        .path();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("access-log.json")).unwrap())
            .unwrap();
    let runs = report["runs"].as_array().unwrap();
    let ways: Vec<&str> = runs.iter().filter_map(|r| r["via"].as_str()).collect();
    assert_eq!(ways, ["tracing", "access"], "{report:#}");
    for r in runs {
        // A line that was filtered out costs a few nanoseconds; one written, hundreds.
        assert!(r["ns_per_line"].as_f64().unwrap() > 100.0, "{r}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
