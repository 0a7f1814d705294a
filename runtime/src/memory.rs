//! How the process's allocator treats the large buffers a shard churns through, and what the
//! process holds in memory.
//!
//! HTTP/2 reads a whole DATA frame (up to 1 MiB, HBONE.md) into one buffer, hands it up and starts
//! the next in a fresh one; TLS and copy buffers come and go the same way. glibc serves such sizes
//! with `mmap` or trims them off the heap once freed, so every new buffer starts on untouched pages:
//! a page fault per 4 KiB. On the HBONE receive path that was 40% of the receiving node's CPU.
//! Keeping freed memory in the heap up to a bound makes the next buffer reuse warm pages.
//!
//! The admin server's `/memory` (as Envoy's) reports the kernel's count of resident pages,
//! anonymous and file-backed (the binary's code), and the allocator's own account, which tells
//! memory in use from memory freed but not yet given back. A binary on another allocator than the
//! C library's registers its report at start-up.

use std::sync::OnceLock;

use serde_json::{json, Value};

/// Allocations above this still get their own mapping (and give it back when freed).
pub const MMAP_THRESHOLD_BYTES: usize = 4 * 1024 * 1024;
/// Free memory at the top of a heap is returned to the kernel only beyond this much.
pub const TRIM_THRESHOLD_BYTES: usize = 32 * 1024 * 1024;

/// Sets the thresholds above, once per process. A no-op where the C library is not glibc.
pub fn keep_freed_buffers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's tuning parameters; it takes its own locks.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as libc::c_int);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES as libc::c_int);
        }
    });
}

/// The allocator's account as JSON (`name`, then byte counts whose names end in `_bytes`).
pub type AllocatorReport = fn() -> Value;

static ALLOCATOR_REPORT: OnceLock<AllocatorReport> = OnceLock::new();

/// Makes `/memory` report the process's global allocator through `report`. The first call wins:
/// a process has one global allocator.
pub fn set_allocator_report(report: AllocatorReport) {
    let _ = ALLOCATOR_REPORT.set(report);
}

/// The whole report: resident memory from `/proc/self/status`, then the allocator's account.
pub fn report() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| status_field_kib(&status, field).map(|k| k * 1024);
    json!({
        "rss_bytes": kib("VmRSS"),
        "rss_anon_bytes": kib("RssAnon"),
        "rss_file_bytes": kib("RssFile"),
        "peak_rss_bytes": kib("VmHWM"),
        "allocator": ALLOCATOR_REPORT.get().map_or_else(system_allocator, |report| report()),
    })
}

/// A `kB` field of a `/proc/<pid>/status` text (`VmRSS:     1234 kB`), by its name (`VmRSS`).
pub fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// glibc's account, over all its arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn system_allocator() -> Value {
    // SAFETY: mallinfo2 only reads the allocator's counters (under its arenas' locks).
    let info = unsafe { libc::mallinfo2() };
    json!({
        "name": "glibc",
        "in_use_bytes": info.uordblks + info.hblkhd,
        "free_bytes": info.fordblks,
        "heap_bytes": info.arena,
        "mapped_bytes": info.hblkhd,
        "trimmable_bytes": info.keepcost,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn system_allocator() -> Value {
    json!({ "name": "system" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tx\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nRssAnon:\t  512 kB\n";
        let cases = [
            ("VmRSS", Some(1024)),
            ("VmHWM", Some(2048)),
            ("RssAnon", Some(512)),
            ("RssFile", None),
            ("Name", None),
        ];
        for (field, want) in cases {
            assert_eq!(status_field_kib(status, field), want, "{field}");
        }
    }

    #[test]
    fn the_report_counts_this_process() {
        let report = report();
        let rss = report["rss_bytes"].as_u64().expect("rss_bytes");
        assert!(rss > 1024 * 1024, "{report}");
        assert!(report["peak_rss_bytes"].as_u64() >= Some(rss), "{report}");
        assert_eq!(report["allocator"]["name"], "glibc", "{report}");
        // A live megabyte is counted as in use.
        let before = report["allocator"]["in_use_bytes"]
            .as_u64()
            .expect("in_use_bytes");
        let held = vec![1u8; 1 << 20];
        let after = super::report()["allocator"]["in_use_bytes"]
            .as_u64()
            .expect("in_use_bytes");
        assert!(after >= before + (1 << 20) - 4096, "{before} → {after}");
        drop(held);
    }
}
