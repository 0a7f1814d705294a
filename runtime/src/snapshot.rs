//! Config snapshots: a control thread publishes an immutable `Arc<T>`; each shard checks a version
//! number (one relaxed-in-practice atomic load, never written by shards) when it is about to use the
//! config, re-derives its own `Rc` state only when the version moved, and every connection keeps the
//! `Rc` it started with. Publishing swaps a pointer (arc-swap) and never waits for a shard.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::bell::{Bell, Ringer, Ringers};

/// A published value and the version it was published as.
#[derive(Debug)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: Arc<T>,
}

struct Shared<T> {
    current: ArcSwap<Versioned<T>>,
    /// Mirrors `current.version` so shards can check for news without touching arc-swap's state.
    version: AtomicU64,
    /// The shards holding a view, rung on publish. Locked on publish and when a shard starts,
    /// never on the per-connection path.
    shards: Ringers,
    /// Called on the publishing thread after each publication: threads other than shards that
    /// sleep until the config changes (`Subscriber::on_publish`).
    hooks: Mutex<Vec<Box<dyn Fn() + Send>>>,
}

/// Creates a channel whose first version (1) is `initial`.
pub fn channel<T>(initial: T) -> (Publisher<T>, Subscriber<T>) {
    let shared = Arc::new(Shared {
        current: ArcSwap::from_pointee(Versioned {
            version: 1,
            value: Arc::new(initial),
        }),
        version: AtomicU64::new(1),
        shards: Ringers::default(),
        hooks: Mutex::new(Vec::new()),
    });
    (Publisher(shared.clone()), Subscriber(shared))
}

/// The control side: publishes new snapshots.
pub struct Publisher<T>(Arc<Shared<T>>);

impl<T> Publisher<T> {
    /// Makes `value` the current snapshot and returns its version. Never blocks a shard.
    pub fn publish(&self, value: impl Into<Arc<T>>) -> u64 {
        let version = self.0.version.load(Ordering::Acquire) + 1;
        let previous = self.0.current.swap(Arc::new(Versioned {
            version,
            value: value.into(),
        }));
        self.0.version.store(version, Ordering::Release);
        self.0.shards.ring_all();
        for hook in self
            .0
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hook();
        }
        // Freeing a large snapshot takes milliseconds: only after the shards have been told.
        drop(previous);
        version
    }

    pub fn subscriber(&self) -> Subscriber<T> {
        Subscriber(self.0.clone())
    }

    pub fn current(&self) -> Arc<Versioned<T>> {
        self.0.current.load_full()
    }
}

/// A `Send` handle to the channel; each shard turns it into a `ShardView`.
pub struct Subscriber<T>(Arc<Shared<T>>);

impl<T> Clone for Subscriber<T> {
    fn clone(&self) -> Self {
        Subscriber(self.0.clone())
    }
}

impl<T> Subscriber<T> {
    pub fn current(&self) -> Arc<Versioned<T>> {
        self.0.current.load_full()
    }

    /// Calls `hook` on the publishing thread after every publication from now on (a thread that
    /// sleeps until the config changes; shards have their views instead).
    pub fn on_publish(&self, hook: impl Fn() + Send + 'static) {
        self.0
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(hook));
    }

    /// A shard's view, holding state derived from the snapshot by `derive` (compiled routes,
    /// pools keyed by the config…). `derive` runs on the shard, once per version the shard sees.
    /// Made through `Shard::view`, which supplies the shard's doorbell.
    pub(crate) fn view_on<L>(
        self,
        ringer: Ringer,
        bell: Rc<Bell>,
        derive: impl Fn(&T) -> L + 'static,
    ) -> ShardView<T, L> {
        self.0.shards.add(ringer);
        let current = self.current();
        let local = Rc::new(derive(&current.value));
        ShardView {
            shared: self.0,
            derive: Box::new(derive),
            state: RefCell::new((current.version, local)),
            bell,
        }
    }
}

/// One shard's view of the config: `!Send`, owned by the shard.
pub struct ShardView<T, L> {
    shared: Arc<Shared<T>>,
    derive: Box<dyn Fn(&T) -> L>,
    state: RefCell<(u64, Rc<L>)>,
    bell: Rc<Bell>,
}

impl<T, L> ShardView<T, L> {
    /// The state derived from the newest snapshot, re-derived first if a new one was published.
    /// Call once per turn of the shard's loop (e.g. per accepted connection) and keep the `Rc` for
    /// the connection's life.
    pub fn current(&self) -> Rc<L> {
        let published = self.shared.version.load(Ordering::Acquire);
        let mut state = self.state.borrow_mut();
        if published != state.0 {
            let snapshot = self.shared.current.load_full();
            *state = (snapshot.version, Rc::new((self.derive)(&snapshot.value)));
        }
        state.1.clone()
    }

    /// The version of the state this shard holds now.
    pub fn version(&self) -> u64 {
        self.state.borrow().0
    }

    /// Waits until a version newer than the one held is published (then `current()` picks it up).
    pub async fn changed(&self) {
        self.bell
            .wait_until(|| self.shared.version.load(Ordering::Acquire) != self.version())
            .await
    }

    /// Waits until a version other than `seen` is published. For a task that acts on changes
    /// while `Shard::follow` (or connections) keep the view itself current: `changed` compares
    /// with the view's own version, which another waiter may already have moved on.
    pub async fn changed_since(&self, seen: u64) {
        self.bell
            .wait_until(|| self.shared.version.load(Ordering::Acquire) != seen)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<T, L>(
        subscriber: Subscriber<T>,
        derive: impl Fn(&T) -> L + 'static,
    ) -> ShardView<T, L> {
        let (ringer, bell) = Bell::start().expect("bell");
        subscriber.view_on(ringer, bell, derive)
    }

    #[test]
    fn hooks_hear_every_publication_after_they_are_added() {
        let (publisher, subscriber) = channel(0u32);
        publisher.publish(1);
        let heard = Arc::new(AtomicU64::new(0));
        subscriber.on_publish({
            let heard = heard.clone();
            move || {
                heard.fetch_add(1, Ordering::Relaxed);
            }
        });
        publisher.publish(2);
        publisher.publish(3);
        assert_eq!(heard.load(Ordering::Relaxed), 2);
    }

    #[monoio::test]
    async fn view_rederives_once_per_version_and_old_state_survives() {
        let (publisher, subscriber) = channel(String::from("one"));
        let derivations = Rc::new(std::cell::Cell::new(0));
        let counted = derivations.clone();
        let view = view(subscriber, move |s: &String| {
            counted.set(counted.get() + 1);
            s.to_uppercase()
        });
        let held = view.current();
        assert_eq!(*view.current(), "ONE");
        assert_eq!(derivations.get(), 1, "no new version, no new derivation");
        assert_eq!(publisher.publish(String::from("two")), 2);
        assert_eq!(*view.current(), "TWO");
        assert_eq!(*view.current(), "TWO");
        assert_eq!(derivations.get(), 2);
        assert_eq!(*held, "ONE", "a connection keeps the state it started with");
        assert_eq!(view.version(), 2);
    }

    #[monoio::test(enable_timer = true)]
    async fn changed_since_sees_a_change_another_waiter_already_took() {
        let (publisher, subscriber) = channel(0u32);
        let view = view(subscriber, |v: &u32| *v);
        let seen = view.version();
        publisher.publish(1u32);
        // Someone else (a connection, `Shard::follow`) moves the view on first.
        assert_eq!(*view.current(), 1);
        let quiet =
            monoio::time::timeout(std::time::Duration::from_millis(20), view.changed()).await;
        assert!(
            quiet.is_err(),
            "`changed` compares with the view, which has moved on"
        );
        let seen_change =
            monoio::time::timeout(std::time::Duration::from_secs(1), view.changed_since(seen))
                .await;
        assert!(
            seen_change.is_ok(),
            "`changed_since` compares with what this waiter saw"
        );
    }

    #[monoio::test(enable_timer = true)]
    async fn changed_wakes_on_publish_from_another_thread() {
        let (publisher, subscriber) = channel(0u32);
        let view = view(subscriber, |v: &u32| *v);
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            publisher.publish(7u32);
            publisher
        });
        view.changed().await;
        assert_eq!(*view.current(), 7);
        let _ = t.join();
    }
}
