//! Doorbells: how another thread wakes a shard. Each shard reads one end of a socketpair with its
//! own reactor; other threads write a byte to the other end. The shard then wakes its local waiters,
//! which re-check what they wait for (drain started, new snapshot).
//!
//! Why not hand a task `Waker` to another thread: monoio's cross-thread wake-ups were seen to be
//! lost here (a drain that woke five waiters across two shards, one never ran). A byte on a socket
//! is seen by io_uring and epoll alike, and only same-thread wakers are used after it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io::{self, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use monoio::io::AsyncReadRent;

/// The sending end: `Send + Sync`, cheap to clone.
#[derive(Clone, Debug)]
pub struct Ringer(Arc<StdUnixStream>);

impl Ringer {
    /// Wakes the shard. Never blocks: if the socket buffer is full, a wake-up is already pending.
    pub fn ring(&self) {
        match (&*self.0).write(&[1]) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The shard has stopped: nobody to wake.
            Err(_) => {}
        }
    }
}

/// The shard's end: local waiters, woken when the bell rings.
///
/// Every waiting future holds one slot, which it leaves when it resolves or is dropped: a shard
/// may have a waiter per open connection (each watching for the drain), so neither a poll nor a
/// closed connection may cost in proportion to the others.
#[derive(Default)]
pub struct Bell {
    waiters: RefCell<HashMap<u64, Waker>>,
    next_id: Cell<u64>,
}

impl Bell {
    /// Creates a bell on the current shard and starts the task that listens for rings.
    pub fn start() -> io::Result<(Ringer, Rc<Bell>)> {
        let (tx, rx) = StdUnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        let mut rx = monoio::net::UnixStream::from_std(rx)?;
        let bell = Rc::new(Bell::default());
        let local = Rc::downgrade(&bell);
        monoio::spawn(async move {
            let mut buf = vec![0u8; 64];
            loop {
                let (read, returned) = rx.read(buf).await;
                buf = returned;
                match (read, local.upgrade()) {
                    (Ok(n), Some(bell)) if n > 0 => bell.wake_all(),
                    _ => return,
                }
            }
        });
        Ok((Ringer(Arc::new(tx)), bell))
    }

    fn wake_all(&self) {
        // Woken waiters that still wait register again when polled.
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, w) in waiters {
            w.wake();
        }
    }

    /// Waiters registered now (for tests and gauges).
    pub fn waiting(&self) -> usize {
        self.waiters.borrow().len()
    }

    /// Resolves once `ready()` holds, checking it again each time the bell rings.
    pub async fn wait_until(&self, ready: impl Fn() -> bool) {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let slot = Slot { bell: self, id };
        poll_fn(|cx| {
            if ready() {
                return Poll::Ready(());
            }
            let mut waiters = slot.bell.waiters.borrow_mut();
            match waiters.get_mut(&slot.id) {
                Some(w) if w.will_wake(cx.waker()) => {}
                Some(w) => *w = cx.waker().clone(),
                None => {
                    waiters.insert(slot.id, cx.waker().clone());
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// A waiter's place at the bell, given up when the wait ends or is dropped.
struct Slot<'a> {
    bell: &'a Bell,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.bell.waiters.borrow_mut().remove(&self.id);
    }
}

/// The set of shards to ring for one kind of news (drain, a new snapshot).
#[derive(Debug, Default)]
pub struct Ringers(std::sync::Mutex<Vec<Ringer>>);

impl Ringers {
    pub fn add(&self, ringer: Ringer) {
        match self.0.lock() {
            Ok(mut r) => r.push(ringer),
            Err(poisoned) => poisoned.into_inner().push(ringer),
        }
    }

    pub fn ring_all(&self) {
        let ringers = match self.0.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for r in ringers {
            r.ring();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[monoio::test(enable_timer = true)]
    async fn waiters_hold_one_slot_each_and_leave_it_when_dropped() {
        let (ringer, bell) = Bell::start().unwrap();
        let flag = Rc::new(Cell::new(false));
        // A thousand waits that are given up (connections that closed) leave nothing behind.
        for _ in 0..1000 {
            let wait = bell.wait_until(|| flag.get());
            let _ = monoio::time::timeout(Duration::from_micros(1), wait).await;
        }
        assert_eq!(bell.waiting(), 0);
        // One waiter polled again and again keeps one slot, and is woken by a ring.
        let waiter = {
            let (bell, flag) = (bell.clone(), flag.clone());
            monoio::spawn(async move { bell.wait_until(|| flag.get()).await })
        };
        for _ in 0..10 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(bell.waiting(), 1);
        flag.set(true);
        ringer.ring();
        monoio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the ring woke the waiter");
        assert_eq!(bell.waiting(), 0);
    }
}
