//! The control thread inside every shoal process: compiles the manifests once before the shards
//! start (so readiness means "configured"), then recompiles on every settled change and publishes
//! through the runtime's snapshot channel. Shards pick the new snapshot up on their next turn;
//! connections keep the one they started with.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use shoal_runtime::admin::AdminSource;
use shoal_runtime::{snapshot_channel, Publisher, Subscriber};

use crate::compile::Options;
use crate::dump::{self, CertificateInfo};
use crate::snapshot::Snapshot;
use crate::source::{self, ManifestDir, Signal, Watch};

/// How often a vanished manifests directory is looked for.
const REWATCH_POLL: Duration = Duration::from_millis(500);

/// What the agent has done, readable from any thread (the admin server's metrics).
#[derive(Debug, Default)]
pub struct AgentStats {
    pub version: AtomicU64,
    pub reloads: AtomicU64,
    /// Reloads that could not read the manifests at all (the last snapshot stays).
    pub reload_failures: AtomicU64,
    pub last_compile_micros: AtomicU64,
    /// Problems in the snapshot in force.
    pub errors: AtomicU64,
    pub warnings: AtomicU64,
    /// Unix time of the last publication, in nanoseconds (taken just before publishing).
    pub published_at_unix_ns: AtomicU64,
}

pub struct Agent {
    stats: Arc<AgentStats>,
    subscriber: Subscriber<Snapshot>,
    /// Wakes the watching thread to stop; it otherwise sleeps until the manifests change.
    stop: mpsc::Sender<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl Agent {
    /// Compiles `dir` now (failing if it cannot be read), publishes version 1, and watches.
    pub fn start(dir: impl Into<PathBuf>, options: Options) -> io::Result<Agent> {
        let mut source = ManifestDir::new(dir);
        let first = source.snapshot(&Default::default(), &options)?;
        log_problems(&first, &HashSet::new());
        let stats = Arc::new(AgentStats::default());
        record(&stats, &first, 1, unix_ns());
        let (publisher, subscriber) = snapshot_channel(first);
        let (stop, signals) = mpsc::channel();
        let watch = Watch::new(source.root(), stop.clone()).map_err(io::Error::other)?;
        let thread = {
            let (stats, senders) = (stats.clone(), stop.clone());
            std::thread::Builder::new()
                .name("shoal-control".into())
                .spawn(move || {
                    watch_loop(source, watch, options, publisher, stats, signals, senders)
                })?
        };
        Ok(Agent {
            stats,
            subscriber,
            stop,
            thread: Some(thread),
        })
    }

    pub fn subscriber(&self) -> Subscriber<Snapshot> {
        self.subscriber.clone()
    }

    pub fn stats(&self) -> Arc<AgentStats> {
        self.stats.clone()
    }

    pub fn current(&self) -> Arc<shoal_runtime::Versioned<Snapshot>> {
        self.subscriber.current()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop.send(Signal::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn record(stats: &AgentStats, snapshot: &Snapshot, version: u64, published_at_unix_ns: u64) {
    // The time first: whoever sees the new version also sees when it was published.
    stats
        .published_at_unix_ns
        .store(published_at_unix_ns, Ordering::Release);
    stats.last_compile_micros.store(
        (snapshot.stats.parse_time + snapshot.stats.compile_time).as_micros() as u64,
        Ordering::Relaxed,
    );
    stats
        .errors
        .store(snapshot.stats.errors as u64, Ordering::Relaxed);
    stats
        .warnings
        .store(snapshot.stats.warnings as u64, Ordering::Relaxed);
    stats.version.store(version, Ordering::Release);
}

/// Logs problems not already logged for the previous snapshot; they stay in `/config_dump`.
fn log_problems(snapshot: &Snapshot, before: &HashSet<String>) -> HashSet<String> {
    let now: HashSet<String> = snapshot.problems.iter().map(|p| p.to_string()).collect();
    for p in &now {
        if !before.contains(p) {
            tracing::warn!("{p}");
        }
    }
    now
}

fn watch_loop(
    mut source: ManifestDir,
    watch: Watch,
    options: Options,
    publisher: Publisher<Snapshot>,
    stats: Arc<AgentStats>,
    signals: mpsc::Receiver<Signal>,
    senders: mpsc::Sender<Signal>,
) {
    lower_priority();
    let mut logged = log_problems(&publisher.current().value, &HashSet::new());
    // Held for as long as it watches: dropping it ends the events of the root it watches.
    let mut _watch = watch;
    let mut force_reload = false;
    while std::mem::take(&mut force_reload) || source::next_change(&signals).is_some() {
        let started = Instant::now();
        let previous = publisher.current().value.allocations.clone();
        stats.reloads.fetch_add(1, Ordering::Relaxed);
        match source.snapshot(&previous, &options) {
            Ok(snapshot) => {
                logged = log_problems(&snapshot, &logged);
                let summary = (
                    snapshot.stats.objects,
                    snapshot.stats.errors,
                    snapshot.stats.warnings,
                );
                let published_at = unix_ns();
                let version = publisher.publish(snapshot);
                record(&stats, &publisher.current().value, version, published_at);
                tracing::info!(
                    version,
                    objects = summary.0,
                    errors = summary.1,
                    warnings = summary.2,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "configuration reloaded"
                );
            }
            Err(err) => {
                stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "cannot read {}: {err}; keeping configuration version {}",
                    source.root().display(),
                    publisher.current().version
                );
                // The directory itself went away; a watch on it is gone too. Wait for it to come
                // back, then watch it afresh and reload.
                match rewatch(&source, &signals, &senders) {
                    Some(fresh) => {
                        _watch = fresh;
                        force_reload = true;
                    }
                    None => return,
                }
            }
        }
    }
}

/// Recompiling is background work: the shards must preempt it at once when a snapshot (or a
/// packet) arrives, or they wait out the scheduler's time slice behind it on a busy core. On Linux
/// the nice value is per thread, and the parse threads this one starts inherit it.
const CONTROL_THREAD_NICE: i32 = 10;

fn lower_priority() {
    // SAFETY: setpriority on the calling thread (who = 0) has no memory-safety preconditions.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, CONTROL_THREAD_NICE) };
    if rc != 0 {
        tracing::debug!(
            "could not lower the control thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Waits until the manifests' root can be watched again; `None` when told to stop.
fn rewatch(
    source: &ManifestDir,
    signals: &mpsc::Receiver<Signal>,
    senders: &mpsc::Sender<Signal>,
) -> Option<Watch> {
    loop {
        if source.root().exists() {
            if let Ok(watch) = Watch::new(source.root(), senders.clone()) {
                return Some(watch);
            }
        }
        // Changes from the lost watch mean nothing now; only a stop ends the wait early.
        match signals.recv_timeout(REWATCH_POLL) {
            Ok(Signal::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            Ok(Signal::Changed) | Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// The agent's figures as Prometheus metrics.
#[derive(Debug)]
pub struct AgentCollector(pub Arc<AgentStats>);

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let counters: [(&str, &str, u64); 2] = [
            (
                "shoal_config_reloads",
                "Reloads attempted after a manifest change.",
                s.reloads.load(Ordering::Relaxed),
            ),
            (
                "shoal_config_reload_failures",
                "Reloads that could not read the manifests (the last snapshot stayed).",
                s.reload_failures.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            ConstCounter::new(value).encode(family)?;
        }
        let gauges: [(&str, &str, u64); 5] = [
            (
                "shoal_config_published_version",
                "Version of the snapshot published last.",
                s.version.load(Ordering::Relaxed),
            ),
            (
                "shoal_config_errors",
                "Problems of error level in the snapshot in force (their objects are left out).",
                s.errors.load(Ordering::Relaxed),
            ),
            (
                "shoal_config_warnings",
                "Problems of warning level in the snapshot in force.",
                s.warnings.load(Ordering::Relaxed),
            ),
            (
                "shoal_config_compile_microseconds",
                "Time the last load and compile took.",
                s.last_compile_micros.load(Ordering::Relaxed),
            ),
            (
                "shoal_config_published_at_seconds",
                "Unix time of the last publication.",
                s.published_at_unix_ns.load(Ordering::Relaxed) / 1_000_000_000,
            ),
        ];
        for (name, help, value) in gauges {
            let family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family)?;
        }
        Ok(())
    }
}

/// Serves the agent's snapshot on the admin server: ready once the first compile is published,
/// `/config_dump` from the snapshot in force plus the certificates the proxy holds.
pub struct ConfigAdmin {
    subscriber: Subscriber<Snapshot>,
    certificates: Box<dyn Fn() -> Vec<CertificateInfo> + Send + Sync>,
}

impl ConfigAdmin {
    pub fn new(
        subscriber: Subscriber<Snapshot>,
        certificates: impl Fn() -> Vec<CertificateInfo> + Send + Sync + 'static,
    ) -> Self {
        Self {
            subscriber,
            certificates: Box::new(certificates),
        }
    }
}

impl AdminSource for ConfigAdmin {
    fn ready(&self) -> Result<(), String> {
        // The agent publishes before it hands out its subscriber: a snapshot is always there.
        Ok(())
    }

    fn config_dump(&self) -> serde_json::Value {
        let current = self.subscriber.current();
        dump::config_dump(&current.value, current.version, &(self.certificates)())
    }
}
