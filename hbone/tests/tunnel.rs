//! HBONE end to end on loopback, every hop real: a client app → an outbound proxy on the runtime
//! (HBONE client) → mTLS + HTTP/2 CONNECT → an HBONE server on the runtime → the upstream app.
//! Bytes arrive intact both ways, half-close crosses in each direction, many streams share one
//! connection with every byte accounted for, and refusals come back as their status codes.

#[path = "../../runtime/tests/common/pattern.rs"]
mod pattern;
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener as StdListener};
use std::thread;

use common::*;
use monoio::net::TcpStream;
use pattern::*;
use shoal_hbone::client::{ConnectError, Connection};
use shoal_hbone::connect::{Baggage, OutboundConnect};
use shoal_hbone::stream;
use shoal_runtime::DriverChoice;

both_drivers!(
    one_gib_each_way_through_one_stream,
    half_close_crosses_the_tunnel_each_way,
    many_concurrent_streams_share_pooled_connections,
    refusals_come_back_as_their_status,
);

fn one_gib_each_way_through_one_stream(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
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
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
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

fn many_concurrent_streams_share_pooled_connections(driver: DriverChoice) {
    const STREAMS: u64 = 150;
    const BYTES_EACH: u64 = 256 * 1024;
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    // The upstream echoes each connection.
    // The upstream holds every connection until all have arrived, so all streams are open at
    // once, then echoes each.
    let echo = thread::spawn(move || {
        let held: Vec<_> = (0..STREAMS)
            .map(|_| upstream.accept().expect("accept").0)
            .collect();
        let workers: Vec<_> = held
            .into_iter()
            .map(|mut s| {
                thread::spawn(move || {
                    let mut r = s.try_clone().expect("clone");
                    std::io::copy(&mut r, &mut s).expect("echo");
                    s.shutdown(Shutdown::Write).expect("fin");
                })
            })
            .collect();
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
    // A connection takes streams while streams + 1 stays below 100: 150 at once need exactly two,
    // made one at a time (single-flight), not one per stream.
    assert_eq!(
        accepted, 2,
        "{STREAMS} concurrent streams on two HBONE connections"
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
        let n = nodes(driver, target, Options::default());
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
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    let hbone = n.hbone;
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
