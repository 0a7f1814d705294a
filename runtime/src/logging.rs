//! The binaries' log: tracing's formatter, filtered by `SHOAL_LOG`, written to standard error by a
//! thread of its own.
//!
//! Why not write each line where it is made: a shard writing its access log line by line spends a
//! system call per request — with the formatting, 15% of a sidecar's CPU at 50 connections — and
//! stops serving whenever the log's reader is slow (a pipe nobody reads blocks it for good).
//! Instead each thread appends its lines to a buffer of its own; the `shoal-log` thread takes the
//! buffers `LOG_FLUSH_INTERVAL_MS` after the first line of a batch, or sooner once one holds
//! `LOG_WAKE_BYTES`, and writes them out in one go; with nothing logged it sleeps (an idle proxy
//! is not woken ten times a second). A thread whose buffer holds `MAX_LOG_BUFFER_BYTES` drops
//! lines instead of waiting, and the log says how many. Each thread's lines keep their order;
//! lines of different threads may interleave out of order by up to the flush interval (their
//! timestamps say when).

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How often the log thread writes what the other threads have buffered.
pub const LOG_FLUSH_INTERVAL_MS: u64 = 100;

/// A thread's buffer at this size wakes the log thread before the interval is up.
pub const LOG_WAKE_BYTES: usize = 64 * 1024;

/// A thread's buffer at this size takes no more lines until the log thread has written it.
pub const MAX_LOG_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Installs the process's subscriber and starts the log thread; `default_filter` applies when
/// `SHOAL_LOG` is unset or invalid. Keep the guard for the life of `main`: dropping it writes what
/// is still buffered.
///
/// A write that fails is dropped silently. tracing-subscriber would otherwise report it with
/// `eprintln!`, which panics when standard error is a closed pipe (the process that read our log
/// has died).
pub fn init(default_filter: &str) -> LogGuard {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sink = sink();
    ACCESS_TO_SINK.store(true, Ordering::Relaxed);
    let _ = std::thread::Builder::new()
        .name("shoal-log".into())
        .spawn(move || sink.run());
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // Behind a reload layer, so that the admin server's /logging can change it while running.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
            .unwrap_or_else(|_| default_filter.into()),
    );
    let _ = FILTER.set(handle);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                // Colour codes only for a person at a terminal, not in files and pipes.
                .with_ansi(ansi)
                .with_writer(|| LineWriter)
                .log_internal_errors(false),
        )
        .try_init();
    LogGuard(())
}

type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The process's log filter, replaceable; set by `init`.
static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// The log filter in force, in `SHOAL_LOG`'s syntax; `None` before `init`.
pub fn current_filter() -> Option<String> {
    FILTER.get()?.with_current(|f| f.to_string()).ok()
}

/// Replaces the log filter in force (what `/logging?level=` does), for lines made from now on,
/// and returns it as it now reads. `spec` is in `SHOAL_LOG`'s syntax (`info`,
/// `warn,access=info`); Istio's `target:level` is read as `target=level`. A spec that does not
/// parse changes nothing and says why.
pub fn set_filter(spec: &str) -> Result<String, String> {
    let handle = FILTER
        .get()
        .ok_or_else(|| "this process's log is not set up".to_string())?;
    let spec = istio_levels(spec);
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .map_err(|e| format!("not a log filter: {spec:?}: {e}"))?;
    handle
        .reload(filter)
        .map_err(|e| format!("the log filter could not be replaced: {e}"))?;
    current_filter().ok_or_else(|| "the log filter is gone".to_string())
}

/// `access:debug,warn` → `access=debug,warn`: Istio's ztunnel names a target's level with a colon.
fn istio_levels(spec: &str) -> String {
    spec.split(',')
        .map(|d| match d.rsplit_once(':') {
            Some((target, level)) if !d.contains('=') && !d.contains('[') => {
                format!("{target}={level}")
            }
            _ => d.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes what every thread has buffered, now. Call before the process exits other than by
/// returning from `main` (which drops the `LogGuard`).
pub fn flush() {
    sink().write_out();
}

/// Returned by `init`; writes the buffered lines when dropped.
#[must_use = "dropping the guard at once would leave lines buffered at exit"]
pub struct LogGuard(());

/// Set by `init`: access-log lines are formatted by `access` and go straight to the sink.
static ACCESS_TO_SINK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes one access-log line — `message`, then `fields` (`key=value` pairs) — when `SHOAL_LOG`
/// lets target `access` through at `info`, in the shape of the formatter's other lines:
/// `2026-11-23T23:12:31.768076Z  INFO access: request method=GET …`.
///
/// Why not `tracing::info!`: its formatter visits, styles and escapes a line's fifteen fields one
/// by one and formats the time anew. In a sidecar pair at 50 connections the lines cost 12.6 µs
/// of its 80 µs per request; alone, 2.3 µs per line against 0.69 here (`bench access-log`). Here
/// the fields are one `format_args!`, written in one pass into a reused line, and the time's date
/// and seconds are formatted once a second. Until `init` has run
/// (in-process tests), the line goes through tracing, to whatever subscriber there is.
pub fn access(message: &str, fields: std::fmt::Arguments<'_>) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    if !ACCESS_TO_SINK.load(Ordering::Relaxed) {
        tracing::info!(target: "access", "{message} {fields}");
        return;
    }
    let written = ACCESS_LINE.try_with(|line| {
        let mut line = line.borrow_mut();
        let line = &mut *line;
        line.text.clear();
        line.clock.write_now(&mut line.text);
        line.text.push_str("  INFO access: ");
        line.text.push_str(message);
        line.text.push(' ');
        let _ = std::fmt::Write::write_fmt(&mut line.text, fields);
        line.text.push('\n');
        sink().append(line.text.as_bytes());
    });
    if written.is_err() {
        // The thread is exiting: through tracing, which needs nothing of it.
        tracing::info!(target: "access", "{message} {fields}");
    }
}

#[derive(Default)]
struct AccessLine {
    text: String,
    clock: Clock,
}

thread_local! {
    static ACCESS_LINE: RefCell<AccessLine> = RefCell::new(AccessLine::default());
}

/// RFC 3339 UTC time to the microsecond, as tracing's formatter writes it, with the part up to
/// the second kept for the second it names.
#[derive(Default)]
struct Clock {
    second: u64,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`; empty until first used.
    up_to_second: String,
}

impl Clock {
    fn write_now(&mut self, out: &mut String) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.write(now.as_secs(), now.subsec_micros(), out);
    }

    fn write(&mut self, unix_s: u64, micros: u32, out: &mut String) {
        use std::fmt::Write as _;
        if unix_s != self.second || self.up_to_second.is_empty() {
            let (y, m, d) = civil_from_days((unix_s / 86_400) as i64);
            let s = unix_s % 86_400;
            self.up_to_second.clear();
            let _ = write!(
                self.up_to_second,
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
                s / 3600,
                s / 60 % 60,
                s % 60
            );
            self.second = unix_s;
        }
        out.push_str(&self.up_to_second);
        let _ = write!(out, ".{micros:06}Z");
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An access-log field that may be absent, written `-` then, as Envoy writes it. Formatted only
/// when the line is written: a string made up front cost every request about 1,900 instructions
/// with the access log off.
pub struct OrDash<T>(pub Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush();
    }
}

/// The process's sink. A plain static, not an `Arc`: every line from every shard reaches it, and a
/// reference count would be one cache line all of them write.
fn sink() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(Sink::default)
}

#[derive(Default)]
struct Sink {
    /// Every thread's buffer that may hold lines.
    buffers: Mutex<Vec<Buffer>>,
    /// What the log thread is waiting for; the condvar is notified when it changes.
    wake: Mutex<Wake>,
    woken: Condvar,
    /// Lines dropped because their thread's buffer was full.
    dropped_lines: AtomicU64,
    /// Held while writing out, so that two writers do not interleave their batches.
    writing: Mutex<Vec<u8>>,
}

type Buffer = Arc<Mutex<Vec<u8>>>;

#[derive(Default)]
struct Wake {
    /// A thread has put lines in its empty buffer since the last write-out began.
    lines: bool,
    /// A buffer has passed `LOG_WAKE_BYTES`: write out now.
    full: bool,
}

thread_local! {
    /// This thread's buffer, and the sink it is registered with (by address: tests make sinks of
    /// their own).
    static MINE: RefCell<Option<(usize, Buffer)>> = const { RefCell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while holding a log buffer left bytes in it, nothing inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sink {
    fn run(&self) {
        loop {
            {
                let mut wake = lock(&self.wake);
                while !wake.lines {
                    wake = self
                        .woken
                        .wait(wake)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                // The batch's first line waits up to the interval for others to join it.
                let (mut wake, _) = self
                    .woken
                    .wait_timeout_while(wake, Duration::from_millis(LOG_FLUSH_INTERVAL_MS), |w| {
                        !w.full
                    })
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                // Cleared before taking the buffers: a line added from here on either is taken
                // by this write-out or, landing in a buffer it emptied, raises `lines` again.
                *wake = Wake::default();
            }
            self.write_out();
        }
    }

    /// Appends one formatted line (or batch of lines) to the calling thread's buffer.
    fn append(&self, line: &[u8]) {
        let buffered = MINE.try_with(|mine| {
            let mut mine = mine.borrow_mut();
            let me = self as *const Sink as usize;
            if mine.as_ref().is_none_or(|(sink, _)| *sink != me) {
                let buffer = Arc::new(Mutex::new(Vec::new()));
                lock(&self.buffers).push(buffer.clone());
                *mine = Some((me, buffer));
            }
            let Some((_, buffer)) = mine.as_ref() else {
                return;
            };
            let mut buffer = lock(buffer);
            let before = buffer.len();
            if before + line.len() > MAX_LOG_BUFFER_BYTES {
                self.dropped_lines.fetch_add(1, Ordering::Relaxed);
                return;
            }
            buffer.extend_from_slice(line);
            let full = before < LOG_WAKE_BYTES && buffer.len() >= LOG_WAKE_BYTES;
            // Only a batch's first line (and a full buffer) reaches across threads.
            if before == 0 || full {
                drop(buffer);
                let mut wake = lock(&self.wake);
                let news = !wake.lines || (full && !wake.full);
                wake.lines = true;
                wake.full |= full;
                drop(wake);
                if news {
                    self.woken.notify_one();
                }
            }
        });
        if buffered.is_err() {
            // The thread is exiting and its buffer is gone: write the line directly.
            let _ = std::io::stderr().write_all(line);
        }
    }

    /// Takes every thread's lines and writes them to standard error.
    fn write_out(&self) {
        let mut out = lock(&self.writing);
        let buffers: Vec<_> = {
            let mut buffers = lock(&self.buffers);
            // A buffer only this list holds belongs to a thread that has ended.
            buffers.retain(|b| Arc::strong_count(b) > 1 || !lock(b).is_empty());
            buffers.clone()
        };
        for buffer in buffers {
            let mut buffer = lock(&buffer);
            if out.is_empty() {
                // Swapped, so the thread's buffer keeps the capacity it grew to.
                std::mem::swap(&mut *out, &mut *buffer);
            } else {
                out.extend_from_slice(&buffer);
                buffer.clear();
            }
        }
        let dropped = self.dropped_lines.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "shoal-log: {dropped} log lines dropped: a thread's buffer was full \
                 ({MAX_LOG_BUFFER_BYTES} bytes); standard error is read too slowly"
            );
        }
        if !out.is_empty() {
            // Errors are dropped: see `init`.
            let _ = std::io::stderr().lock().write_all(&out);
            out.clear();
        }
    }
}

/// tracing's writer: each event's formatted line goes to the calling thread's buffer.
struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sink().append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_target_levels_read_as_directives() {
        for (spec, read) in [
            ("debug", "debug"),
            ("access:debug", "access=debug"),
            ("warn,access:info", "warn,access=info"),
            ("shoal_ztunnel::node:trace", "shoal_ztunnel::node=trace"),
            ("info,access=off", "info,access=off"),
        ] {
            assert_eq!(istio_levels(spec), read, "{spec}");
        }
    }

    #[test]
    fn the_clock_writes_rfc3339_utc_to_the_microsecond() {
        let mut clock = Clock::default();
        for (unix_s, micros, written) in [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 7, "2000-02-29T00:00:00.000007Z"),
            (1_709_251_199, 999_999, "2024-02-29T23:59:59.999999Z"),
            // The same second again (the kept part), then the next day.
            (1_709_251_199, 5, "2024-02-29T23:59:59.000005Z"),
            (1_709_251_200, 0, "2024-03-01T00:00:00.000000Z"),
            (1_795_476_751, 768_076, "2026-11-23T23:32:31.768076Z"),
            (4_102_444_800, 1, "2100-01-01T00:00:00.000001Z"),
        ] {
            let mut out = String::new();
            clock.write(unix_s, micros, &mut out);
            assert_eq!(out, written, "{unix_s}");
        }
    }

    #[test]
    fn only_a_batchs_first_line_and_a_full_buffer_wake_the_log_thread() {
        let sink = Sink::default();
        let flags = |s: &Sink| {
            let w = lock(&s.wake);
            (w.lines, w.full)
        };
        assert_eq!(flags(&sink), (false, false), "nothing logged: it sleeps");
        sink.append(b"first\n");
        assert_eq!(flags(&sink), (true, false), "a batch begins");
        // The log thread has taken the flags; lines added to a buffer that still holds some do
        // not wake it again (they go with the batch it is about to write).
        *lock(&sink.wake) = Wake::default();
        sink.append(b"second\n");
        assert_eq!(flags(&sink), (false, false));
        sink.append(&vec![b'x'; LOG_WAKE_BYTES]);
        assert_eq!(
            flags(&sink),
            (true, true),
            "a full buffer is written at once"
        );
        *lock(&sink.wake) = Wake::default();
        // Written out (as `write_out` leaves a buffer: empty).
        let (_, mine) = MINE
            .with(|m| m.borrow().clone())
            .expect("this thread's buffer");
        lock(&mine).clear();
        sink.append(b"next batch\n");
        assert_eq!(
            flags(&sink),
            (true, false),
            "an emptied buffer's first line"
        );
    }

    #[test]
    fn lines_from_many_threads_are_written_in_order_per_thread_and_full_buffers_drop_lines() {
        let sink = Arc::new(Sink::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        sink.append(format!("thread {t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer thread");
        }
        // Written out into the writing buffer instead of standard error, to be read back.
        let text = {
            let buffers = lock(&sink.buffers).clone();
            let mut all = String::new();
            for b in buffers {
                all.push_str(&String::from_utf8_lossy(&lock(&b)));
            }
            all
        };
        for t in 0..4 {
            let numbers: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().expect("a number"))
                .collect();
            assert_eq!(numbers, (0..1000).collect::<Vec<_>>(), "thread {t}");
        }
        // A full buffer drops the line and counts it, and takes lines again once written out.
        let big = vec![b'x'; MAX_LOG_BUFFER_BYTES / 2 + 1];
        sink.append(&big);
        sink.append(&big);
        assert_eq!(sink.dropped_lines.load(Ordering::Relaxed), 1);
        let (_, mine) = MINE
            .with(|m| m.borrow().clone())
            .expect("this thread's buffer");
        assert_eq!(lock(&mine).len(), big.len());
        // Ended threads' emptied buffers are let go.
        for b in lock(&sink.buffers).iter() {
            lock(b).clear();
        }
        lock(&mine).clear();
        sink.dropped_lines.store(0, Ordering::Relaxed);
        sink.write_out();
        assert_eq!(
            lock(&sink.buffers).len(),
            1,
            "only this thread's buffer is left"
        );
    }
}
