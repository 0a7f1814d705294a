//! The README's first command, run as a user runs it: the mesh demo shows traffic through two
//! ztunnels, both endpoints, a denial, the tables and the metrics, and stops what it started.

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
    assert!(text.contains("success 100.00%"), "{text}");
    assert!(
        text.contains("reviews-v1") && text.contains("reviews-v2"),
        "both endpoints: {text}"
    );
    assert!(text.contains("denied — refused by ztunnel"), "{text}");
    assert!(
        text.contains("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"),
        "{text}"
    );
    assert!(
        text.contains("response_flags=\"DENY\""),
        "the denial is counted: {text}"
    );
    assert!(text.contains("stopping everything"), "{text}");
}
