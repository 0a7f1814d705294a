//! The waypoint binary's allocator options reach jemalloc (a wrong symbol name would leave them
//! silently unread).

use std::process::Command;

#[test]
fn jemalloc_reads_the_options_the_binary_sets() {
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .arg("--help")
        .env("_RJEM_MALLOC_CONF", "confirm_conf:true")
        .output()
        .expect("run waypoint");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "global variable malloc_conf): \"tcache_nslots_small_min:64,slab_sizes:8192-8192:16,\
             background_thread:true,dirty_decay_ms:1000\""
        ),
        "{stderr}"
    );
    for option in [
        "tcache_nslots_small_min:64",
        "slab_sizes:8192-8192:16",
        "background_thread:true",
        "dirty_decay_ms:1000",
    ] {
        assert!(
            stderr.contains(&format!("Set conf value: {option}")),
            "{stderr}"
        );
    }
}
