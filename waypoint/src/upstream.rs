//! A shard's connections to endpoints. A mesh endpoint is reached over HBONE through its node
//! (`podIP:15008`, authority `podIP:port`, the waypoint's identity); one outside the mesh over plain
//! TCP. On top, HTTP/1.1 connections are kept alive and reused one exchange at a time; HTTP/2
//! connections are shared by every request to the endpoint. Everything here is the shard's own.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};

use rustc_hash::FxHashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::{Request, Response};
use monoio::io::IntoPollIo;
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use shoal_hbone::client::ConnectError;
use shoal_hbone::connect::OutboundConnect;
use shoal_hbone::pool::{Pool, PoolKey, StreamGuard};
use shoal_hbone::Identity;
use shoal_runtime::stream::CompletionStream;

use rustls_pki_types::ServerName;
use shoal_control::traffic::TlsOrigination;
use shoal_runtime::dns::{Dns, DnsCache};
use std::sync::Arc;

use crate::body::ProxyBody;
use crate::cluster::{Cluster, Permit};
use crate::io::{ShardExec, ShardTimer, TokioIo, TunnelIo};

/// An endpoint that does not accept within this long is given up on (503, flag UF), unless a
/// DestinationRule's `connectTimeout` says otherwise.
pub const CONNECT_TIMEOUT: Duration = shoal_control::traffic::DEFAULT_CONNECT_TIMEOUT;
/// Kept-alive HTTP/1.1 connections per endpoint per shard; beyond this, a connection closes when
/// its exchange ends.
pub const MAX_IDLE_HTTP1_PER_ENDPOINT: usize = 256;
/// A kept-alive HTTP/1.1 connection unused this long is closed (and its HBONE stream with it),
/// unless a DestinationRule's `idleTimeout` says otherwise.
pub const HTTP1_IDLE_TIMEOUT: Duration = shoal_control::traffic::DEFAULT_IDLE_TIMEOUT;
/// HBONE's port on every node.
pub const HBONE_PORT: u16 = 15008;

/// How the waypoint speaks to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    Http2,
}

/// Where one exchange goes and as whom.
pub struct Dial<'a> {
    pub addr: SocketAddr,
    /// The endpoint's identity when it is in the mesh (HBONE); `None` for plain TCP.
    pub identity: Option<Identity>,
    pub wire: Wire,
    /// For the CONNECT's `forwarded` header: the original client and service.
    pub client: SocketAddr,
    pub service_host: Option<&'a str>,
    pub trace: ([u8; 16], [u8; 8]),
    /// The cluster whose connection-pool limits and timeouts apply (`None`: the defaults).
    pub cluster: Option<&'a Rc<Cluster>>,
    /// TLS to originate to an endpoint outside the mesh, and the server name (SNI) to ask for.
    pub tls: Option<(&'a TlsOrigination, &'a str)>,
}

impl Dial<'_> {
    fn connect_timeout(&self) -> Duration {
        self.cluster
            .map_or(CONNECT_TIMEOUT, |c| c.limits().connect_timeout)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    identity: Option<Identity>,
    wire: Wire,
    /// Originated TLS: the server name and what it was verified against (connections verified
    /// differently, or not at all, are never mixed).
    tls: Option<Rc<str>>,
}

/// Why an exchange failed, and the flag it is recorded with.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection (TCP, TLS, CONNECT refused, timeout): flag UF.
    #[error("upstream connect failed: {0}")]
    Connect(String),
    /// The connection broke during the exchange: flag UC.
    #[error("upstream connection ended: {0}")]
    Exchange(#[from] hyper::Error),
    /// A DestinationRule's connection-pool limit was reached: flag UO.
    #[error("upstream overflow: {0}")]
    Overflow(&'static str),
}

impl UpstreamError {
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "UF",
            UpstreamError::Exchange(_) => "UC",
            UpstreamError::Overflow(_) => "UO",
        }
    }

    /// The endpoint refused the HTTP/2 stream without processing it (safe to retry anywhere).
    pub fn is_refused_stream(&self) -> bool {
        let UpstreamError::Exchange(e) = self else {
            return false;
        };
        std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .and_then(h2::Error::reason)
            == Some(h2::Reason::REFUSED_STREAM)
    }
}

pub struct Upstreams {
    source: Identity,
    hbone: Pool,
    /// The process's resolver, and this shard's answers from it.
    pub dns: Dns,
    pub dns_cache: DnsCache,
    /// Client configurations for originated TLS, by what they verify against.
    tls_configs: RefCell<HashMap<TlsConfigKey, Arc<rustls::ClientConfig>>>,
    /// Idle connections per endpoint, most recently used last (taken first, so the rest age out).
    /// Looked up twice per request (taken, given back): hashed with Fx, not SipHash, as the keys
    /// come from the mesh's configuration, not from peers.
    http1: RefCell<FxHashMap<Key, VecDeque<IdleHttp1>>>,
    http2: RefCell<FxHashMap<Key, Http2Slot>>,
    /// When the idle sweep runs next: the earliest expiry of a kept connection, or `None` while
    /// none is kept, so a quiet shard is not woken to look. Connections kept later expire later
    /// unless their cluster's `idleTimeout` is shorter; then `sweep_wake` tells the sweep.
    next_sweep: Cell<Option<Instant>>,
    sweep_wake: Rc<tokio::sync::Notify>,
}

/// A kept-alive HTTP/1.1 connection.
struct IdleHttp1 {
    /// When it is closed if still unused.
    expires: Instant,
    sender: http1::SendRequest<ProxyBody>,
    /// Exchanges it has carried (`maxRequestsPerConnection`).
    uses: u32,
    /// The cluster whose connection limit it counts against.
    cluster: Option<u64>,
}

/// One shared HTTP/2 connection per endpoint, or the handshake that will make it (requests that
/// arrive meanwhile wait for it instead of each opening their own).
enum Http2Slot {
    /// The connection and the streams it has carried (`maxRequestsPerConnection`).
    Ready(http2::SendRequest<ProxyBody>, u32),
    Connecting(Rc<tokio::sync::Notify>),
}

impl Upstreams {
    /// The shard's upstreams; also starts the task that closes idle connections.
    pub fn new(source: Identity, hbone: Pool, dns: Dns) -> Rc<Self> {
        let upstreams = Rc::new(Upstreams {
            source,
            hbone,
            dns,
            dns_cache: DnsCache::default(),
            tls_configs: RefCell::new(HashMap::new()),
            http1: RefCell::new(FxHashMap::default()),
            http2: RefCell::new(FxHashMap::default()),
            next_sweep: Cell::new(None),
            sweep_wake: Rc::new(tokio::sync::Notify::new()),
        });
        monoio::spawn(sweep_idle(
            Rc::downgrade(&upstreams),
            upstreams.sweep_wake.clone(),
        ));
        upstreams
    }

    /// Drops HTTP/1.1 connections idle past their timeout (or closed by the peer) and closed
    /// HTTP/2 ones; the earliest expiry among those left. (A connection the peer closes in
    /// between is dropped when a request finds it, or at the next sweep.)
    fn close_idle(&self) -> Option<Instant> {
        let mut all = self.http1.borrow_mut();
        let now = Instant::now();
        for list in all.values_mut() {
            list.retain(|idle| idle.expires > now && !idle.sender.is_closed());
        }
        all.retain(|_, list| !list.is_empty());
        self.http2
            .borrow_mut()
            .retain(|_, slot| !matches!(slot, Http2Slot::Ready(s, _) if s.is_closed()));
        all.values().flatten().map(|idle| idle.expires).min()
    }

    /// Makes the idle sweep run by `at`.
    fn sweep_by(&self, at: Instant) {
        if self.next_sweep.get().is_none_or(|next| at < next) {
            self.next_sweep.set(Some(at));
            self.sweep_wake.notify_one();
        }
    }

    /// The identity this proxy connects as.
    pub fn source(&self) -> &Identity {
        &self.source
    }

    /// Sends one request and waits for the response head. An HTTP/1.1 connection goes back to the
    /// pool only once its response has been read to the end (`Sent::body` does that), so the next
    /// request on it never waits behind another's body.
    pub async fn send(
        self: &Rc<Self>,
        dial: &Dial<'_>,
        request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let key = Key {
            addr: dial.addr,
            identity: dial.identity.clone(),
            wire: dial.wire,
            tls: dial.tls.map(|(t, name)| {
                Rc::from(format!(
                    "{name}\n{}\n{}",
                    t.ca_certificates.as_deref().unwrap_or("-"),
                    t.insecure_skip_verify
                ))
            }),
        };
        match dial.wire {
            Wire::Http1 => {
                let (mut sender, uses) = self.http1_sender(&key, dial).await?;
                let response = sender.send_request(request).await?;
                let pool = Rc::downgrade(self);
                let cluster = dial.cluster.cloned();
                Ok(response.map(|body| {
                    ProxyBody::counted(body, Default::default()).with_at_end(Box::new(move || {
                        if let Some(pool) = pool.upgrade() {
                            pool.keep_http1(key, sender, uses + 1, cluster.as_ref());
                        }
                    }))
                }))
            }
            Wire::Http2 => {
                let mut sender = self.http2_sender(key, dial).await?;
                let response = sender.send_request(request).await?;
                Ok(response.map(|body| ProxyBody::counted(body, Default::default())))
            }
        }
    }

    /// An HTTP/1.1 connection for one exchange, and how many it has carried: a kept-alive one, a
    /// new one if the cluster's `maxConnections` allows, or else — as a pending request, if
    /// `http1MaxPendingRequests` allows — the first that goes idle or frees a slot.
    async fn http1_sender(
        &self,
        key: &Key,
        dial: &Dial<'_>,
    ) -> Result<(http1::SendRequest<ProxyBody>, u32), UpstreamError> {
        let Some(cluster) = dial.cluster else {
            return match self.idle_http1(key).await {
                Some(idle) => Ok(idle),
                None => Ok((self.connect_http1(dial, None).await?, 0)),
            };
        };
        let deadline = Instant::now() + dial.connect_timeout();
        let mut pending = None;
        loop {
            if let Some(idle) = self.idle_http1(key).await {
                return Ok(idle);
            }
            if let Some(permit) = cluster.connection() {
                return Ok((self.connect_http1(dial, Some(permit)).await?, 0));
            }
            if pending.is_none() {
                pending = Some(
                    cluster
                        .pending()
                        .ok_or(UpstreamError::Overflow("too many pending requests"))?,
                );
            }
            // A slot held by an idle connection to another of the cluster's endpoints is freed.
            self.close_one_idle(cluster.key(), key);
            let wait = deadline.saturating_duration_since(Instant::now());
            if monoio::time::timeout(wait, cluster.freed.notified())
                .await
                .is_err()
            {
                return Err(UpstreamError::Overflow(
                    "no connection came free within the connect timeout",
                ));
            }
        }
    }

    /// Closes one idle connection of `cluster` that is not to `except` (its limit slot frees
    /// when its connection task ends).
    fn close_one_idle(&self, cluster: u64, except: &Key) {
        let mut all = self.http1.borrow_mut();
        for (key, list) in all.iter_mut() {
            if key == except {
                continue;
            }
            if let Some(i) = list.iter().position(|idle| idle.cluster == Some(cluster)) {
                list.remove(i);
                return;
            }
        }
    }

    /// The endpoint's HTTP/2 connection: the open one, the one being made, or a new one.
    async fn http2_sender(
        &self,
        key: Key,
        dial: &Dial<'_>,
    ) -> Result<http2::SendRequest<ProxyBody>, UpstreamError> {
        loop {
            let max_uses = dial
                .cluster
                .and_then(|c| c.limits().max_requests_per_connection)
                .unwrap_or(u32::MAX);
            let pending = match self.http2.borrow_mut().get_mut(&key) {
                Some(Http2Slot::Ready(s, uses)) if !s.is_closed() && *uses < max_uses => {
                    *uses += 1;
                    return Ok(s.clone());
                }
                Some(Http2Slot::Connecting(n)) => Some(n.clone()),
                _ => None,
            };
            match pending {
                Some(n) => n.notified().await,
                None => break,
            }
        }
        let done = Rc::new(tokio::sync::Notify::new());
        self.http2
            .borrow_mut()
            .insert(key.clone(), Http2Slot::Connecting(done.clone()));
        let permit = match dial.cluster {
            Some(c) => Some(
                c.connection()
                    .ok_or(UpstreamError::Overflow("too many connections"))?,
            ),
            None => None,
        };
        let made = self.connect_http2(dial, permit).await;
        match &made {
            Ok(s) => {
                self.http2
                    .borrow_mut()
                    .insert(key, Http2Slot::Ready(s.clone(), 1));
            }
            Err(_) => {
                self.http2.borrow_mut().remove(&key);
            }
        }
        // Those waiting look again: at the new connection, or (it failed) make their own try.
        done.notify_waiters();
        made
    }

    /// A kept-alive connection for a new exchange, and how many it has carried; ones the peer
    /// closed or that idled too long are dropped on the way.
    async fn idle_http1(&self, key: &Key) -> Option<(http1::SendRequest<ProxyBody>, u32)> {
        loop {
            let idle = {
                let mut all = self.http1.borrow_mut();
                let list = all.get_mut(key)?;
                list.pop_back()?
            };
            if idle.expires <= Instant::now() {
                continue;
            }
            let mut sender = idle.sender;
            // Its exchange has ended; readiness follows as soon as its connection task has run.
            if sender.ready().await.is_ok() {
                return Some((sender, idle.uses));
            }
        }
    }

    /// Puts a connection whose exchange has ended back, unless it has carried its cluster's
    /// `maxRequestsPerConnection`; pending requests of the cluster are told.
    fn keep_http1(
        &self,
        key: Key,
        sender: http1::SendRequest<ProxyBody>,
        uses: u32,
        cluster: Option<&Rc<Cluster>>,
    ) {
        if sender.is_closed() {
            return;
        }
        let limits = cluster.map(|c| c.limits());
        if limits
            .and_then(|l| l.max_requests_per_connection)
            .is_some_and(|max| uses >= max)
        {
            return;
        }
        let idle_timeout = limits.map_or(HTTP1_IDLE_TIMEOUT, |l| l.idle_timeout);
        {
            let mut all = self.http1.borrow_mut();
            let list = all.entry(key).or_default();
            if list.len() < MAX_IDLE_HTTP1_PER_ENDPOINT {
                let expires = Instant::now() + idle_timeout;
                list.push_back(IdleHttp1 {
                    expires,
                    sender,
                    uses,
                    cluster: cluster.map(|c| c.key()),
                });
                self.sweep_by(expires);
            }
        }
        if let Some(c) = cluster {
            c.freed.notify_waiters();
        }
    }

    async fn connect_http1(
        &self,
        dial: &Dial<'_>,
        permit: Option<Permit>,
    ) -> Result<http1::SendRequest<ProxyBody>, UpstreamError> {
        let handshake = async {
            let (io, guard) = self.open(dial).await?;
            // hyper's upgrades need a `Send` stream; a plain socket is the shard's own.
            let (sender, conn) = http1::handshake(crate::io::ShardLocal(io)).await?;
            monoio::spawn(drive(conn.with_upgrades(), guard, permit));
            Ok(sender)
        };
        // Boxed: the handshake (TCP or an HBONE stream, TLS, hyper's) is a future of ~17 KB that
        // would otherwise be inlined into `send` and so into every request's future, which hyper
        // moves whole per request — though connections are rarely made.
        within_connect_timeout(dial.connect_timeout(), Box::pin(handshake)).await
    }

    async fn connect_http2(
        &self,
        dial: &Dial<'_>,
        permit: Option<Permit>,
    ) -> Result<http2::SendRequest<ProxyBody>, UpstreamError> {
        let handshake = async {
            let mut builder = http2::Builder::new(ShardExec);
            builder.timer(ShardTimer);
            let (io, guard) = self.open(dial).await?;
            let (sender, conn) = builder.handshake(io).await?;
            monoio::spawn(drive(conn, guard, permit));
            Ok(sender)
        };
        // Boxed, as for HTTP/1.1.
        within_connect_timeout(dial.connect_timeout(), Box::pin(handshake)).await
    }

    /// A byte stream to the endpoint, for traffic the waypoint carries as TCP.
    pub async fn open_raw(
        &self,
        dial: &Dial<'_>,
    ) -> Result<(Io, Option<StreamGuard>), UpstreamError> {
        within_connect_timeout(dial.connect_timeout(), self.open(dial)).await
    }

    /// A byte stream to the endpoint: an HBONE stream from the shard's pool, or TCP.
    /// With an HBONE stream comes the guard that holds its place on its pooled connection, to be
    /// kept as long as the stream is used.
    async fn open(&self, dial: &Dial<'_>) -> Result<(Io, Option<StreamGuard>), UpstreamError> {
        match &dial.identity {
            Some(identity) => {
                let key = PoolKey::new(
                    self.source.clone(),
                    vec![identity.clone()],
                    SocketAddr::new(dial.addr.ip(), HBONE_PORT),
                    None,
                );
                let connect = OutboundConnect {
                    authority: dial.addr,
                    client: dial.client,
                    service_host: dial.service_host.map(str::to_string),
                    baggage: Default::default(),
                    trace: dial.trace,
                };
                let pooled = self
                    .hbone
                    .open(&key, &connect)
                    .await
                    .map_err(|e: ConnectError| UpstreamError::Connect(e.to_string()))?;
                Ok((Io::Tunnel(TunnelIo::new(pooled.tunnel)), Some(pooled.guard)))
            }
            None => {
                let tcp = monoio::net::TcpStream::connect(dial.addr)
                    .await
                    .map_err(|e| UpstreamError::Connect(format!("{}: {e}", dial.addr)))?;
                let _ = tcp.set_nodelay(true);
                let Some((tls, name)) = dial.tls else {
                    return Ok((Io::Tcp(TokioIo(CompletionStream::new(tcp))), None));
                };
                let poll = tcp
                    .into_poll_io()
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                let config = self.tls_config(tls, dial.wire)?;
                let server_name = ServerName::try_from(name.to_string()).map_err(|e| {
                    UpstreamError::Connect(format!("TLS server name {name:?}: {e}"))
                })?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(server_name, poll)
                    .await
                    .map_err(|e| {
                        UpstreamError::Connect(format!("TLS to {} ({name}): {e}", dial.addr))
                    })?;
                Ok((Io::Tls(Box::new(TokioIo(stream))), None))
            }
        }
    }
}

/// A byte stream to an endpoint.
pub enum Io {
    Tunnel(TunnelIo),
    /// Plain TCP, on the shard's completion driver: to an app beside a sidecar, or outside the
    /// mesh.
    Tcp(TokioIo<CompletionStream>),
    /// TLS the waypoint originates (DestinationRule `tls.mode: SIMPLE`).
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStreamPoll>>>),
}

impl Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tunnel(t) => Pin::new(t).poll_read(cx, buf),
            Io::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Io::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tunnel(t) => Pin::new(t).poll_write(cx, buf),
            Io::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Io::Tls(t) => Pin::new(&mut **t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tunnel(t) => Pin::new(t).poll_flush(cx),
            Io::Tcp(t) => Pin::new(t).poll_flush(cx),
            Io::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tunnel(t) => Pin::new(t).poll_shutdown(cx),
            Io::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Io::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}

async fn within_connect_timeout<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    match monoio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Connect(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// Closes idle connections as they expire; sleeps while none is kept. Ends with the upstreams.
async fn sweep_idle(upstreams: std::rc::Weak<Upstreams>, wake: Rc<tokio::sync::Notify>) {
    loop {
        let Some(next) = upstreams.upgrade().map(|u| u.next_sweep.get()) else {
            return;
        };
        let Some(at) = next else {
            wake.notified().await;
            continue;
        };
        let wait = at.saturating_duration_since(Instant::now());
        if !wait.is_zero() && monoio::time::timeout(wait, wake.notified()).await.is_ok() {
            // An earlier expiry, or the upstreams going away.
            continue;
        }
        let Some(u) = upstreams.upgrade() else {
            return;
        };
        let next = u.close_idle();
        u.next_sweep.set(next);
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        // The sweep may be asleep until a connection is kept: let it see the end.
        self.sweep_wake.notify_one();
    }
}

/// Runs a client connection until it ends (holding its HBONE stream's place in the pool and its
/// slot under the cluster's connection limit); its errors reach the request that was on it.
async fn drive<F, E>(conn: F, _guard: Option<StreamGuard>, _permit: Option<Permit>)
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "upstream connection ended");
    }
}

/// What a TLS client configuration depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TlsConfigKey {
    ca_certificates: Option<String>,
    insecure_skip_verify: bool,
    wire: Wire,
}

impl Upstreams {
    /// The client configuration for originating `tls`, made once per shard: the server is
    /// verified against `caCertificates` or else the system's roots, unless told to skip it.
    fn tls_config(
        &self,
        tls: &TlsOrigination,
        wire: Wire,
    ) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
        let key = TlsConfigKey {
            ca_certificates: tls.ca_certificates.clone(),
            insecure_skip_verify: tls.insecure_skip_verify,
            wire,
        };
        if let Some(c) = self.tls_configs.borrow().get(&key) {
            return Ok(c.clone());
        }
        let config = Arc::new(client_config(&key).map_err(UpstreamError::Connect)?);
        self.tls_configs.borrow_mut().insert(key, config.clone());
        Ok(config)
    }
}

fn client_config(key: &TlsConfigKey) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(shoal_hbone::tls::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut config = if key.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &key.ca_certificates {
            Some(path) => {
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("caCertificates {path}: {e}"))?;
                for cert in certs {
                    let cert = cert.map_err(|e| format!("caCertificates {path}: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("caCertificates {path}: {e}"))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err("no CA certificates to verify the server against".into());
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = match key.wire {
        Wire::Http2 => vec![b"h2".to_vec()],
        Wire::Http1 => vec![b"http/1.1".to_vec()],
    };
    Ok(config)
}

/// `insecureSkipVerify: true`: any certificate is accepted (signatures are still checked, so
/// the handshake itself is sound).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's future holds `send`'s. Before the handshakes were boxed it was 20,864 bytes in a
    /// release build (11,008 in the test profile) and the request's future 45,696 — moved whole
    /// per request, which was half the client sidecar's instructions under callgrind.
    #[test]
    fn sending_on_a_pooled_connection_is_a_small_future() {
        let runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build();
        let Ok(mut runtime) = runtime else {
            panic!("a monoio runtime for the test");
        };
        runtime.block_on(async {
            let pool = Pool::new(|_| Err(rustls::Error::General("not dialled".into())));
            let dns = Dns::start(&[SocketAddr::from(([127, 0, 0, 1], 53))]).expect("DNS config");
            let source = Identity::parse("spiffe://cluster.local/ns/a/sa/b").expect("identity");
            let upstreams = Upstreams::new(source, pool, dns);
            let addr = SocketAddr::from(([127, 0, 0, 1], 9));
            for wire in [Wire::Http1, Wire::Http2] {
                let dial = Dial {
                    addr,
                    identity: None,
                    wire,
                    client: addr,
                    service_host: None,
                    trace: ([0; 16], [0; 8]),
                    cluster: None,
                    tls: None,
                };
                let send = upstreams.send(&dial, Request::new(ProxyBody::empty()));
                let bytes = std::mem::size_of_val(&send);
                assert!(bytes <= 6 * 1024, "send's future is {bytes} bytes");
            }
        });
    }
}
