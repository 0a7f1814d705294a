//! HBONE end to end on loopback, every hop real: a client app → an outbound proxy on the runtime
//! (HBONE client) → mTLS + HTTP/2 CONNECT → an HBONE server on the runtime → the upstream app.
//! Bytes arrive intact both ways, half-close crosses in each direction, many streams share one
//! connection with every byte accounted for, and refusals come back as their status codes.

#[path = "../../runtime/tests/common/pattern.rs"]
mod pattern;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::rc::Rc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use monoio::net::TcpStream;
use pattern::*;
use shoal_hbone::ca::{CertificateAuthority, LocalCa};
use shoal_hbone::certs::WorkloadCerts;
use shoal_hbone::client::{ConnectError, Connection};
use shoal_hbone::connect::{Baggage, OutboundConnect};
use shoal_hbone::tls::{self, Trust};
use shoal_hbone::tunnel::copy_tcp_tunnel;
use shoal_hbone::{server, stream, Identity};
use shoal_runtime::{DriverChoice, ListenerSpec, Runtime, RuntimeConfig};

const MIB: u64 = 1 << 20;
/// The HBONE server refuses CONNECTs to this port with 401, as a policy deny would.
const DENIED_PORT: u16 = 1;

fn config(driver: DriverChoice) -> RuntimeConfig {
    RuntimeConfig {
        shards: 1,
        driver,
        pin: false,
        drain_timeout: Duration::from_secs(2),
        ..RuntimeConfig::default()
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

struct Nodes {
    server: Runtime,
    outbound: Runtime,
    /// Where the client app connects; the outbound proxy tunnels to `upstream`.
    entry: SocketAddr,
    /// A client config trusted by the server, for tests that speak HBONE themselves.
    client_tls: Arc<rustls::ClientConfig>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.server.begin_drain();
        self.outbound.begin_drain();
    }
}

/// Starts an HBONE server and an outbound proxy that tunnels every connection it accepts to
/// `upstream` through it, all on one shared HBONE connection per shard.
fn nodes(driver: DriverChoice, upstream: SocketAddr) -> Nodes {
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
    let client_tls =
        Arc::new(tls::client_config(client_certs, &trust, vec![server_id]).expect("client config"));
    let test_client_tls = client_tls.clone();

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
                                let _ =
                                    server::serve(tls, peer, inbound, std::future::pending()).await;
                            }
                        })
                        .await;
                }
            }
        })
        .expect("hbone server");
    let hbone_addr = server.shards()[0].listeners[0];

    let outbound = Runtime::builder(config(driver))
        .listener(ListenerSpec::new("outbound", loopback()))
        .start(move |shard| {
            let client_tls = client_tls.clone();
            async move {
                // One HBONE connection per shard, made before the first client arrives (the
                // per-shard pool, with single-flight connection setup, replaces this).
                let first = Connection::connect(hbone_addr, client_tls.clone())
                    .await
                    .ok();
                let shared: Rc<RefCell<Option<Connection>>> = Rc::new(RefCell::new(first));
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |tcp, client| {
                            let (client_tls, shared) = (client_tls.clone(), shared.clone());
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
                                let conn = match connection(&shared, hbone_addr, client_tls).await {
                                    Ok(c) => c,
                                    Err(_) => return,
                                };
                                match conn.open(&request).await {
                                    Ok(tunnel) => drop(copy_tcp_tunnel(tcp, tunnel).await),
                                    // The client app sees the refusal as a reset connection.
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
        client_tls: test_client_tls,
    }
}

/// The shard's HBONE connection, made on first use and again if it has ended.
async fn connection(
    shared: &RefCell<Option<Connection>>,
    peer: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Connection, ConnectError> {
    if let Some(c) = shared.borrow().as_ref().filter(|c| !c.is_closed()) {
        return Ok(c.clone());
    }
    let c = Connection::connect(peer, config).await?;
    *shared.borrow_mut() = Some(c.clone());
    Ok(c)
}

/// The HBONE server's inbound handler: deny one port with 401, answer 503 when the upstream is
/// unreachable, otherwise connect, answer 200 and copy.
async fn inbound(connect: shoal_hbone::connect::InboundConnect, responder: server::Responder) {
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

fn connect(addr: SocketAddr) -> StdStream {
    let s = StdStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

macro_rules! both_drivers {
    ($($name:ident),* $(,)?) => {
        mod on_io_uring { $(#[test] fn $name() { super::$name(shoal_runtime::DriverChoice::Auto) })* }
        mod on_epoll { $(#[test] fn $name() { super::$name(shoal_runtime::DriverChoice::Epoll) })* }
    };
}

both_drivers!(
    one_gib_each_way_through_one_stream,
    half_close_crosses_the_tunnel_each_way,
    many_concurrent_streams_share_a_connection,
    refusals_come_back_as_their_status,
);

fn one_gib_each_way_through_one_stream(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(driver, upstream.local_addr().expect("addr"));
    let mut client = connect(n.entry);
    let (mut server, _) = upstream.accept().expect("the tunnel reaches the upstream");
    let total = 1 << 30;
    let mut server_tx = server.try_clone().expect("clone");
    let server_sender =
        thread::spawn(move || send_pattern(&mut server_tx, 2, total).expect("server sends"));
    let server_receiver = thread::spawn(move || receive_all(&mut server).expect("server receives"));
    let mut client_tx = client.try_clone().expect("clone");
    let client_sender =
        thread::spawn(move || send_pattern(&mut client_tx, 1, total).expect("client sends"));
    let (client_got, client_crc) = receive_all(&mut client).expect("client receives");
    let (server_got, server_crc) = server_receiver.join().expect("receiver");
    assert_eq!(
        (server_got, server_crc),
        (total, client_sender.join().expect("sender"))
    );
    assert_eq!(
        (client_got, client_crc),
        (total, server_sender.join().expect("sender"))
    );
    drop(n);
}

fn half_close_crosses_the_tunnel_each_way(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(driver, upstream.local_addr().expect("addr"));
    // Client closes first; the server answers after EOF.
    let mut client = connect(n.entry);
    let server = thread::spawn(move || {
        let (mut s, _) = upstream.accept().expect("accept");
        let got = receive_all(&mut s).expect("server reads to EOF");
        let sent = send_pattern(&mut s, 4, 8 * MIB).expect("server answers after EOF");
        (got, sent, upstream)
    });
    let sent = send_pattern(&mut client, 3, 8 * MIB).expect("client sends, then FIN");
    let (got, crc) = receive_all(&mut client).expect("client still reads");
    let ((server_got, server_crc), server_sent, upstream) = server.join().expect("server");
    assert_eq!((server_got, server_crc), (8 * MIB, sent));
    assert_eq!((got, crc), (8 * MIB, server_sent));

    // Server closes first; the client answers after EOF.
    let mut client = connect(n.entry);
    let server = thread::spawn(move || {
        let (mut s, _) = upstream.accept().expect("accept");
        let sent = send_pattern(&mut s, 5, 8 * MIB).expect("server sends, then FIN");
        let got = receive_all(&mut s).expect("server still reads");
        (sent, got)
    });
    let (got, crc) = receive_all(&mut client).expect("client reads to EOF");
    let sent = send_pattern(&mut client, 6, 8 * MIB).expect("client answers after EOF");
    let (server_sent, server_got) = server.join().expect("server");
    assert_eq!((got, crc), (8 * MIB, server_sent));
    assert_eq!(server_got, (8 * MIB, sent));
    drop(n);
}

fn many_concurrent_streams_share_a_connection(driver: DriverChoice) {
    const STREAMS: u64 = 150;
    const BYTES_EACH: u64 = 256 * 1024;
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(driver, upstream.local_addr().expect("addr"));
    // The upstream echoes each connection.
    let echo = thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..STREAMS {
            let (mut s, _) = upstream.accept().expect("accept");
            workers.push(thread::spawn(move || {
                let mut r = s.try_clone().expect("clone");
                std::io::copy(&mut r, &mut s).expect("echo");
                s.shutdown(Shutdown::Write).expect("fin");
            }));
        }
        workers
            .into_iter()
            .for_each(|w| w.join().expect("echo worker"));
    });
    let clients: Vec<_> = (0..STREAMS)
        .map(|i| {
            let entry = n.entry;
            thread::spawn(move || {
                let mut c = connect(entry);
                let mut tx = c.try_clone().expect("clone");
                let sender = thread::spawn(move || {
                    send_pattern(&mut tx, 100 + i, BYTES_EACH).expect("send")
                });
                let got = receive_all(&mut c).expect("receive");
                (got, sender.join().expect("sender"))
            })
        })
        .collect();
    for c in clients {
        let ((got, crc), sent) = c.join().expect("client");
        assert_eq!(
            (got, crc),
            (BYTES_EACH, sent),
            "every byte of every stream came back"
        );
    }
    echo.join().expect("echo");
    let accepted = n.server.stats().sum(|s| s.connections_accepted.get());
    assert_eq!(
        accepted, 1,
        "all {STREAMS} streams shared one HBONE connection"
    );
    drop(n);
}

fn refusals_come_back_as_their_status(driver: DriverChoice) {
    // A policy deny (401) and an unreachable upstream (503) both close the client's connection
    // without delivering a byte.
    let denied: SocketAddr = format!("127.0.0.1:{DENIED_PORT}").parse().expect("addr");
    let closed = StdListener::bind(loopback())
        .and_then(|l| l.local_addr())
        .expect("a free port");
    for target in [denied, closed] {
        let n = nodes(driver, target);
        let mut c = connect(n.entry);
        let _ = c.write_all(b"hello");
        let mut buf = [0u8; 16];
        match c.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(k) => panic!("a refused tunnel delivered {k} bytes"),
        }
        drop(n);
    }

    // And the client API reports the status itself; a request that is not CONNECT gets 400.
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(driver, upstream.local_addr().expect("addr"));
    let hbone = n.server.shards()[0].listeners[0];
    let client_tls = n.client_tls.clone();
    let statuses = run_on(driver, move || async move {
        let conn = Connection::connect(hbone, client_tls.clone())
            .await
            .expect("HBONE connection");
        let mut statuses = Vec::new();
        for target in [denied, closed] {
            let request = OutboundConnect {
                authority: target,
                client: "127.0.0.1:40000".parse().expect("addr"),
                service_host: None,
                baggage: Baggage::default(),
                trace: ([1; 16], [2; 8]),
            };
            match conn.open(&request).await {
                Err(ConnectError::Refused { status, .. }) => statuses.push(status.as_u16()),
                Err(e) => panic!("expected a refusal status, got {e}"),
                Ok(_) => panic!("{target} must be refused"),
            }
        }
        let tcp = TcpStream::connect_addr(hbone).await.expect("tcp");
        let tls = stream::connect(tcp, hbone, client_tls).await.expect("tls");
        let (mut h2, connection) = h2::client::handshake(tls).await.expect("h2");
        monoio::spawn(connection);
        let get = http::Request::get("https://127.0.0.1/")
            .body(())
            .expect("request");
        let (response, _) = h2.send_request(get, true).expect("send");
        statuses.push(response.await.expect("response").status().as_u16());
        statuses
    });
    assert_eq!(statuses, vec![401, 503, 400]);
    drop(n);
}

fn run_on<F, Fut, T>(driver: DriverChoice, f: F) -> T
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
