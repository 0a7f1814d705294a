//! The README's first command, run as a user runs it: the mesh demo shows traffic through ambient
//! L7 and L4, the HTTPRoute's split, the L7 and L4 denials, the tables and the metrics, and stops
//! what it started.

use std::process::Command;

#[test]
fn the_mesh_demo_runs_and_shows_what_it_promises() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-bench"))
        .args(["demo", "--seconds", "1"])
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.matches("success 100.00%").count(),
        2,
        "L7 and L4 runs both clean: {text}"
    );
    // The 90/10 split over 200 requests: v2 between 4 and 40 (10% is 20, sd 4.2).
    let v2: u32 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("reviews-v2"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no reviews-v2 line: {text}"));
    assert!((4..=40).contains(&v2), "v2 got {v2} of 200: {text}");
    assert!(
        text.contains("curl         GET   productpage  200"),
        "{text}"
    );
    assert!(
        text.contains("curl         POST  productpage  403 — denied by the waypoint"),
        "{text}"
    );
    assert!(
        text.contains("productpage  GET   details      200"),
        "{text}"
    );
    assert!(
        text.contains("curl         GET   details      refused"),
        "{text}"
    );
    assert!(
        text.contains("reviews.bookinfo.svc.cluster.local") && text.contains("bookinfo/waypoint"),
        "{text}"
    );
    assert!(
        text.contains("response_flags=\"DENY\""),
        "the L4 denial is counted: {text}"
    );
    assert!(text.contains("stopping everything"), "{text}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("ERROR"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
