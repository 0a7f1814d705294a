//! Drain: one flag, set once, that every shard watches. On SIGTERM/SIGINT the process stops
//! accepting on every shard, lets open connections finish until the drain deadline, then closes
//! what is left. A second signal exits at once.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::bell::{Bell, Ringer, Ringers};

#[derive(Debug, Default)]
struct Inner {
    draining: AtomicBool,
    shards: Ringers,
}

/// Cloneable across threads; `trigger` from anywhere.
#[derive(Clone, Debug, Default)]
pub struct DrainSignal(Arc<Inner>);

impl DrainSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the drain. Idempotent.
    pub fn trigger(&self) {
        if !self.0.draining.swap(true, Ordering::AcqRel) {
            self.0.shards.ring_all();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    /// Subscribes a shard: it is rung when the drain starts (at once if it already has).
    pub(crate) fn watch_on(&self, ringer: Ringer, bell: Rc<Bell>) -> ShardDrain {
        self.0.shards.add(ringer.clone());
        if self.is_draining() {
            ringer.ring();
        }
        ShardDrain {
            signal: self.clone(),
            bell,
        }
    }
}

/// One shard's view of the drain.
#[derive(Clone)]
pub struct ShardDrain {
    signal: DrainSignal,
    bell: Rc<Bell>,
}

impl ShardDrain {
    pub fn is_draining(&self) -> bool {
        self.signal.is_draining()
    }

    /// Resolves once the drain has started.
    pub async fn wait(&self) {
        self.bell.wait_until(|| self.signal.is_draining()).await
    }

    /// The process-wide signal, e.g. for a task that should start the drain itself.
    pub fn signal(&self) -> &DrainSignal {
        &self.signal
    }
}

/// Handles SIGTERM and SIGINT for the process: the first starts `drain`, a second exits at once
/// with status 1 (the operator asked twice; open connections are cut).
pub fn on_signals(drain: DrainSignal) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("shoal-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal, "draining: no new connections; open ones may finish");
                    drain.trigger();
                } else {
                    tracing::warn!(signal, "second signal: exiting now");
                    crate::logging::flush();
                    std::process::exit(1);
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[monoio::test(enable_timer = true)]
    async fn a_shard_sees_a_drain_triggered_on_another_thread() {
        let drain = DrainSignal::new();
        let (ringer, bell) = Bell::start().expect("bell");
        let shard = drain.watch_on(ringer, bell);
        let remote = drain.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            remote.trigger();
        });
        shard.wait().await;
        assert!(shard.is_draining());
        shard.wait().await; // already drained: immediate
        let _ = t.join();
    }

    #[monoio::test(enable_timer = true)]
    async fn a_shard_that_subscribes_after_the_drain_still_sees_it() {
        let drain = DrainSignal::new();
        drain.trigger();
        let (ringer, bell) = Bell::start().expect("bell");
        drain.watch_on(ringer, bell).wait().await;
    }
}
