//! How the process's allocator treats the large buffers a shard churns through.
//!
//! HTTP/2 reads a whole DATA frame (up to 1 MiB, HBONE.md) into one buffer, hands it up and starts
//! the next in a fresh one; TLS and copy buffers come and go the same way. glibc serves such sizes
//! with `mmap` or trims them off the heap once freed, so every new buffer starts on untouched pages:
//! a page fault per 4 KiB. On the HBONE receive path that was 40% of the receiving node's CPU.
//! Keeping freed memory in the heap up to a bound makes the next buffer reuse warm pages.

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
