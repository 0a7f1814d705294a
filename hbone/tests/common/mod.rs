//! The two nodes HBONE tests stand up: an HBONE server and an outbound proxy that tunnels through
//! it via the per-shard pool, both on runtime shards, with their TLS from one test CA.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream as StdStream};
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpStream;
use shoal_hbone::ca::{CertificateAuthority, LocalCa};
use shoal_hbone::certs::WorkloadCerts;
use shoal_hbone::connect::{Baggage, InboundConnect, OutboundConnect};
use shoal_hbone::pool::{Pool, PoolKey};
use shoal_hbone::tls::{self, Trust};
use shoal_hbone::tunnel::copy_tcp_tunnel;
use shoal_hbone::{server, stream, Identity};
use shoal_runtime::{DriverChoice, ListenerSpec, Runtime, RuntimeConfig};

pub const MIB: u64 = 1 << 20;
/// The HBONE server refuses CONNECTs to this port with 401, as a policy deny would.
pub const DENIED_PORT: u16 = 1;

#[derive(Clone, Default)]
pub struct Options {
    /// The server sends GOAWAY this long after each HBONE connection opens.
    pub goaway_after: Option<Duration>,
    /// Put this relay between the outbound pool and the HBONE server.
    pub relay: Option<Relay>,
}

/// A TCP relay whose connections can all be cut at once (both sides shut down), to break
/// pooled HBONE connections the way a dead network path would.
#[derive(Clone)]
pub struct Relay {
    addr: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    open: Arc<std::sync::Mutex<Vec<StdStream>>>,
}

impl Relay {
    /// Starts relaying to `target` once it is known (`start`); returns the relay.
    pub fn new() -> Self {
        Relay {
            addr: Arc::default(),
            open: Arc::default(),
        }
    }

    fn start(&self, target: SocketAddr) -> SocketAddr {
        let listener = std::net::TcpListener::bind(loopback()).expect("relay bind");
        let addr = listener.local_addr().expect("relay addr");
        let open = self.open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = StdStream::connect(target) else {
                    continue;
                };
                if let Ok(mut guard) = open.lock() {
                    guard.push(client.try_clone().expect("clone"));
                    guard.push(server.try_clone().expect("clone"));
                }
                for (mut from, mut to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        *self.addr.lock().expect("lock") = Some(addr);
        addr
    }

    /// Cuts every connection through the relay.
    pub fn cut(&self) {
        if let Ok(mut open) = self.open.lock() {
            for s in open.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

pub struct Nodes {
    pub server: Runtime,
    pub outbound: Runtime,
    /// Where the client app connects; the outbound proxy tunnels to the upstream.
    pub entry: SocketAddr,
    /// The HBONE server's address.
    pub hbone: SocketAddr,
    /// A client config trusted by the server, for tests that speak HBONE themselves.
    pub client_tls: Arc<rustls::ClientConfig>,
    /// The server's TLS config, for tests that stand in for an HBONE server.
    pub server_tls: Arc<rustls::ServerConfig>,
    /// HBONE connections the outbound side's pools have made.
    pub pool_connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.server.begin_drain();
        self.outbound.begin_drain();
    }
}

pub fn config(driver: DriverChoice) -> RuntimeConfig {
    RuntimeConfig {
        shards: 1,
        driver,
        pin: false,
        drain_timeout: Duration::from_secs(2),
        ..RuntimeConfig::default()
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

pub fn connect(addr: SocketAddr) -> StdStream {
    let s = StdStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

/// Starts an HBONE server and an outbound proxy that tunnels every connection it accepts to
/// `upstream` through it, on pooled HBONE connections.
pub fn nodes(driver: DriverChoice, upstream: SocketAddr, options: Options) -> Nodes {
    let ca = Arc::new(LocalCa::generate("cluster.local").expect("ca"));
    let trust = Trust::new(&ca.roots(), "cluster.local").expect("trust");
    let server_id = Identity::new("cluster.local", "default", "reviews").expect("id");
    let client_id = Identity::new("cluster.local", "default", "productpage").expect("id");
    let lifetime = Duration::from_secs(3600);
    let server_certs =
        WorkloadCerts::issue(ca.clone(), server_id.clone(), lifetime).expect("certs");
    let client_certs =
        WorkloadCerts::issue(ca.clone(), client_id.clone(), lifetime).expect("certs");
    let server_tls = Arc::new(tls::server_config(server_certs, &trust).expect("server config"));
    let test_server_tls = server_tls.clone();
    let client_tls = Arc::new(
        tls::client_config(client_certs, &trust, vec![server_id.clone()]).expect("client config"),
    );

    let goaway_after = options.goaway_after;
    let server = Runtime::builder(config(driver))
        .listener(ListenerSpec::new("hbone", loopback()))
        .start(move |shard| {
            let server_tls = server_tls.clone();
            async move {
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |tcp, _| {
                            let server_tls = server_tls.clone();
                            async move {
                                let Ok((tls, peer)) = stream::accept(tcp, server_tls).await else {
                                    return;
                                };
                                let goaway = async move {
                                    match goaway_after {
                                        Some(after) => monoio::time::sleep(after).await,
                                        None => std::future::pending().await,
                                    }
                                };
                                let _ = server::serve(tls, peer, inbound, goaway).await;
                            }
                        })
                        .await;
                }
            }
        })
        .expect("hbone server");
    let hbone = server.shards()[0].listeners[0];
    // Where the outbound side dials: the server, or a relay in front of it.
    let dial = options.relay.as_ref().map_or(hbone, |r| r.start(hbone));

    let pool_connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let opened = pool_connections.clone();
    let pool_tls = client_tls.clone();
    let outbound = Runtime::builder(config(driver))
        .listener(ListenerSpec::new("outbound", loopback()))
        .start(move |shard| {
            let (pool_tls, opened) = (pool_tls.clone(), opened.clone());
            let key = PoolKey::new(client_id.clone(), vec![server_id.clone()], dial, None);
            async move {
                let pool = Pool::new(move |_key| Ok(pool_tls.clone()));
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |tcp, client| {
                            let (pool, key, opened) = (pool.clone(), key.clone(), opened.clone());
                            async move {
                                let request = OutboundConnect {
                                    authority: upstream,
                                    client,
                                    service_host: Some("reviews.default.svc.cluster.local".into()),
                                    baggage: Baggage {
                                        namespace: Some("default".into()),
                                        ..Baggage::default()
                                    },
                                    trace: ([7; 16], [9; 8]),
                                };
                                let result = pool.open(&key, &request).await;
                                opened.store(
                                    pool.connections_opened(),
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                                match result {
                                    Ok(pooled) => {
                                        let _guard = pooled.guard;
                                        let _ = copy_tcp_tunnel(tcp, pooled.tunnel).await;
                                    }
                                    // The client app sees the refusal as a closed connection.
                                    Err(_) => drop(tcp),
                                }
                            }
                        })
                        .await;
                }
            }
        })
        .expect("outbound proxy");
    let entry = outbound.shards()[0].listeners[0];
    Nodes {
        server,
        outbound,
        entry,
        hbone,
        client_tls,
        server_tls: test_server_tls,
        pool_connections,
    }
}

/// The HBONE server's inbound handler: deny one port with 401, answer 503 when the upstream is
/// unreachable, otherwise connect, answer 200 and copy.
pub async fn inbound(connect: InboundConnect, responder: server::Responder) {
    if connect.authority.port() == DENIED_PORT {
        return responder.refuse(http::StatusCode::UNAUTHORIZED);
    }
    let upstream = match TcpStream::connect_addr(connect.authority).await {
        Ok(s) => s,
        Err(_) => return responder.refuse(http::StatusCode::SERVICE_UNAVAILABLE),
    };
    if let Ok(tunnel) = responder.accept() {
        let _ = copy_tcp_tunnel(upstream, tunnel).await;
    }
}

pub fn run_on<F, Fut, T>(driver: DriverChoice, f: F) -> T
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    match driver {
        DriverChoice::Auto => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("rt")
            .block_on(f()),
        DriverChoice::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("rt")
            .block_on(f()),
    }
}

#[macro_export]
macro_rules! both_drivers {
    ($($name:ident),* $(,)?) => {
        mod on_io_uring { $(#[test] fn $name() { super::$name(shoal_runtime::DriverChoice::Auto) })* }
        mod on_epoll { $(#[test] fn $name() { super::$name(shoal_runtime::DriverChoice::Epoll) })* }
    };
}

/// A server and a client TLS configuration from one new CA, each with its own workload identity.
pub fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ca = Arc::new(LocalCa::generate("cluster.local").expect("ca"));
    let trust = Trust::new(&ca.roots(), "cluster.local").expect("trust");
    let server_id = Identity::new("cluster.local", "ns", "server").expect("id");
    let client_id = Identity::new("cluster.local", "ns", "client").expect("id");
    let certs = |id: Identity| {
        WorkloadCerts::issue(ca.clone(), id, Duration::from_secs(3600)).expect("certs")
    };
    let server = tls::server_config(certs(server_id.clone()), &trust).expect("server config");
    let client =
        tls::client_config(certs(client_id), &trust, vec![server_id]).expect("client config");
    (Arc::new(server), Arc::new(client))
}
