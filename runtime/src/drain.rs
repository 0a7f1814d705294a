//! Drain: one signal, set once, that every shard can wait on. On SIGTERM/SIGINT the process stops
//! accepting on every shard, lets open connections finish until the drain deadline, then closes
//! what is left. A second signal exits at once.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

#[derive(Default)]
struct Inner {
    draining: AtomicBool,
    /// Tasks waiting for drain: a handful per shard (its accept loops and its main task).
    waiters: Mutex<Vec<Waker>>,
}

/// Cloneable across threads; `trigger` from anywhere, `wait` on any shard.
#[derive(Clone, Default)]
pub struct DrainSignal(Arc<Inner>);

impl DrainSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the drain. Idempotent.
    pub fn trigger(&self) {
        if self.0.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        let waiters = match self.0.waiters.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for waker in waiters {
            waker.wake();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    /// Resolves once the drain has started.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.is_draining() {
                return Poll::Ready(());
            }
            {
                let mut waiters = match self.0.waiters.lock() {
                    Ok(w) => w,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
            }
            if self.is_draining() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

impl std::fmt::Debug for DrainSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainSignal")
            .field("draining", &self.is_draining())
            .finish()
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
    async fn wait_resolves_when_another_thread_triggers() {
        let drain = DrainSignal::new();
        let remote = drain.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            remote.trigger();
        });
        drain.wait().await;
        assert!(drain.is_draining());
        drain.wait().await; // already drained: immediate
        let _ = t.join();
    }
}
