//! Per-shard pool of HBONE connections. Keyed as Istio's ztunnel keys it (source identity, expected
//! destination identities, destination `ip:15008`, source IP), so many TCP connections of one
//! client share one mTLS connection. A connection takes streams until one more would reach
//! min(`MAX_STREAMS_PER_CONNECTION`, the peer's limit); then another opens. Only one connection is
//! being set up per key at a time: callers that arrive meanwhile wait for it. A stream refused by
//! GOAWAY or a broken connection is retried once on a fresh connection. Idle connections close.
//! The pool is the shard's own: `Rc` and `RefCell`, no locks.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use crate::client::{ConnectError, Connection};
use crate::connect::OutboundConnect;
use crate::identity::Identity;
use crate::tunnel::Tunnel;

/// Streams per connection before the pool opens another (HBONE.md: ztunnel's limit).
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// A connection with no streams for this long is closed (HBONE.md: 5 minutes).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the pool looks for idle connections.
const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(15);
/// Attempts per stream: the first, and one on a fresh connection after GOAWAY or breakage.
const OPEN_ATTEMPTS: usize = 2;

/// What makes two streams able to share a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: Identity,
    /// Sorted, so the same set is the same key.
    pub destinations: Vec<Identity>,
    /// The peer's HBONE address (`ip:15008`).
    pub peer: SocketAddr,
    pub source_ip: Option<IpAddr>,
}

impl PoolKey {
    pub fn new(
        source: Identity,
        mut destinations: Vec<Identity>,
        peer: SocketAddr,
        source_ip: Option<IpAddr>,
    ) -> Self {
        destinations.sort();
        destinations.dedup();
        PoolKey {
            source,
            destinations,
            peer,
            source_ip,
        }
    }
}

/// Makes the TLS client config for a key (the source's certificate, the expected identities).
pub type ConfigFor = dyn Fn(&PoolKey) -> Result<Arc<ClientConfig>, rustls::Error>;

struct Pooled {
    conn: Connection,
    streams: Rc<Cell<usize>>,
    idle_since: Rc<Cell<Instant>>,
}

impl Pooled {
    fn limit(&self) -> usize {
        MAX_STREAMS_PER_CONNECTION.min(self.conn.peer_stream_limit().max(1))
    }

    /// As ztunnel: a connection takes another stream while streams + 1 stays below its limit.
    fn has_room(&self) -> bool {
        !self.conn.is_closed() && self.streams.get() + 1 < self.limit()
    }
}

#[derive(Default)]
struct Entry {
    conns: Vec<Pooled>,
    /// Set while a connection for this key is being made; waiters park here.
    connecting: Option<Rc<Pending>>,
}

#[derive(Default)]
struct Pending {
    done: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Pending {
    fn finish(&self) {
        self.done.set(true);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            if self.done.get() {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

struct Inner {
    entries: RefCell<HashMap<PoolKey, Entry>>,
    config_for: Box<ConfigFor>,
    connections_opened: Cell<u64>,
}

/// One shard's pool. Clones share it.
#[derive(Clone)]
pub struct Pool(Rc<Inner>);

/// A stream from the pool; the connection counts it until this is dropped.
pub struct PooledTunnel {
    pub tunnel: Tunnel,
    pub guard: StreamGuard,
}

/// Holds a stream's place on its connection.
pub struct StreamGuard {
    streams: Rc<Cell<usize>>,
    idle_since: Rc<Cell<Instant>>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let left = self.streams.get().saturating_sub(1);
        self.streams.set(left);
        if left == 0 {
            self.idle_since.set(Instant::now());
        }
    }
}

impl Pool {
    /// A pool for this shard; also starts the task that closes idle connections.
    pub fn new(
        config_for: impl Fn(&PoolKey) -> Result<Arc<ClientConfig>, rustls::Error> + 'static,
    ) -> Self {
        let pool = Pool(Rc::new(Inner {
            entries: RefCell::new(HashMap::new()),
            config_for: Box::new(config_for),
            connections_opened: Cell::new(0),
        }));
        let weak = Rc::downgrade(&pool.0);
        monoio::spawn(sweep_idle(weak));
        pool
    }

    /// Connections made since the pool started.
    pub fn connections_opened(&self) -> u64 {
        self.0.connections_opened.get()
    }

    /// Open connections, over all keys.
    pub fn open_connections(&self) -> usize {
        self.0
            .entries
            .borrow()
            .values()
            .map(|e| e.conns.iter().filter(|c| !c.conn.is_closed()).count())
            .sum()
    }

    /// Opens a tunnel for `request` on a pooled connection for `key`.
    pub async fn open(
        &self,
        key: &PoolKey,
        request: &OutboundConnect,
    ) -> Result<PooledTunnel, ConnectError> {
        let mut last_error = None;
        for _ in 0..OPEN_ATTEMPTS {
            let (conn, guard) = self.checkout(key).await?;
            match conn.open(request).await {
                Ok(tunnel) => return Ok(PooledTunnel { tunnel, guard }),
                Err(e) if e.is_connection_level() => {
                    tracing::debug!(peer = %key.peer, error = %e, "stream refused by its connection; trying a fresh one");
                    conn.mark_closed();
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| ConnectError::Tcp {
            peer: key.peer,
            cause: std::io::Error::other("no connection could be made"),
        }))
    }

    /// A connection with room for one more stream, counted in.
    async fn checkout(&self, key: &PoolKey) -> Result<(Connection, StreamGuard), ConnectError> {
        loop {
            let pending = {
                let mut entries = self.0.entries.borrow_mut();
                let entry = entries.entry(key.clone()).or_default();
                entry.conns.retain(|c| !c.conn.is_closed());
                if let Some(c) = entry.conns.iter().find(|c| c.has_room()) {
                    c.streams.set(c.streams.get() + 1);
                    let guard = StreamGuard {
                        streams: c.streams.clone(),
                        idle_since: c.idle_since.clone(),
                    };
                    return Ok((c.conn.clone(), guard));
                }
                match &entry.connecting {
                    Some(p) => Some(p.clone()),
                    None => {
                        entry.connecting = Some(Rc::new(Pending::default()));
                        None
                    }
                }
            };
            match pending {
                // Someone is connecting for this key: wait, then look again.
                Some(p) => p.wait().await,
                None => return self.connect(key).await,
            }
        }
    }

    async fn connect(&self, key: &PoolKey) -> Result<(Connection, StreamGuard), ConnectError> {
        let made = match (self.0.config_for)(key) {
            // Boxed: the handshakes' future (TCP, TLS, HTTP/2: about 5 KB) would otherwise be
            // part of every `open`'s, and so of every caller's task for as long as it lives (a
            // ztunnel connection's, through its whole copy), though connections are rarely made.
            Ok(config) => Box::pin(Connection::connect(key.peer, config)).await,
            Err(e) => Err(ConnectError::Tls {
                peer: key.peer,
                cause: e,
            }),
        };
        let mut entries = self.0.entries.borrow_mut();
        let entry = entries.entry(key.clone()).or_default();
        if let Some(p) = entry.connecting.take() {
            p.finish();
        }
        let conn = made?;
        self.0
            .connections_opened
            .set(self.0.connections_opened.get() + 1);
        let streams = Rc::new(Cell::new(1));
        let idle_since = Rc::new(Cell::new(Instant::now()));
        let guard = StreamGuard {
            streams: streams.clone(),
            idle_since: idle_since.clone(),
        };
        entry.conns.push(Pooled {
            conn: conn.clone(),
            streams,
            idle_since,
        });
        Ok((conn, guard))
    }

    /// Drops connections that have had no stream for `idle_for`, and those that ended.
    pub fn close_idle(&self, idle_for: Duration) {
        let now = Instant::now();
        let mut entries = self.0.entries.borrow_mut();
        for entry in entries.values_mut() {
            entry.conns.retain(|c| {
                !c.conn.is_closed()
                    && (c.streams.get() > 0 || now.duration_since(c.idle_since.get()) < idle_for)
            });
        }
        entries.retain(|_, e| !e.conns.is_empty() || e.connecting.is_some());
    }
}

async fn sweep_idle(pool: Weak<Inner>) {
    loop {
        monoio::time::sleep(IDLE_SWEEP_INTERVAL).await;
        match pool.upgrade() {
            Some(inner) => Pool(inner).close_idle(IDLE_TIMEOUT),
            None => return,
        }
    }
}
