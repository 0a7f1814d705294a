//! Doorbells: how another thread wakes a shard. Each shard reads one end of a socketpair with its
//! own reactor; other threads write a byte to the other end. The shard then wakes its local waiters,
//! which re-check what they wait for (drain started, new snapshot).
//!
//! Why not hand a task `Waker` to another thread: monoio's cross-thread wake-ups were seen to be
//! lost here (a drain that woke five waiters across two shards, one never ran). A byte on a socket
//! is seen by io_uring and epoll alike, and only same-thread wakers are used after it.

use std::cell::RefCell;
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
#[derive(Default)]
pub struct Bell {
    waiters: RefCell<Vec<Waker>>,
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
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }

    /// Resolves once `ready()` holds, checking it again each time the bell rings.
    pub async fn wait_until(&self, ready: impl Fn() -> bool) {
        poll_fn(|cx| {
            if ready() {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
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
