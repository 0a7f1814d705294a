//! Bad input meets a clean refusal and the node keeps serving: garbage on 15008, a CONNECT for an
//! address the node does not host, SOCKS5 requests it does not do, an upstream that is not there.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shoal_hbone::ca::{CertificateAuthority, LocalCa};
use shoal_hbone::client::{ConnectError, Connection};
use shoal_hbone::connect::{Baggage, OutboundConnect};
use shoal_hbone::{certs::WorkloadCerts, tls, Identity};

const NET: u8 = 32;

fn connect_via_hbone(mesh: &Mesh, dial: &str, authority: &str) -> Result<(), ConnectError> {
    let ca: Arc<dyn CertificateAuthority> =
        Arc::new(LocalCa::load(&mesh.dir.path().join("ca")).unwrap());
    let trust = tls::Trust::new(&ca.roots(), "cluster.local").unwrap();
    let client = Identity::parse("spiffe://cluster.local/ns/app/sa/client").unwrap();
    let server = Identity::parse("spiffe://cluster.local/ns/app/sa/web").unwrap();
    let certs = WorkloadCerts::issue(ca, client, Duration::from_secs(3600)).unwrap();
    let config = Arc::new(tls::client_config(certs, &trust, vec![server]).unwrap());
    let dial: SocketAddr = on(NET, dial).parse().unwrap();
    let authority: SocketAddr = on(NET, authority).parse().unwrap();
    let request = OutboundConnect {
        authority,
        client: on(NET, "127.30.0.1:40000").parse().unwrap(),
        service_host: None,
        baggage: Baggage::default(),
        trace: ([7; 16], [8; 8]),
    };
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    rt.block_on(async move {
        let conn = Connection::connect(dial, config).await?;
        conn.open(&request).await.map(|_| ())
    })
}

fn status_of(e: &ConnectError) -> Option<u16> {
    match e {
        ConnectError::Refused { status, .. } => Some(status.as_u16()),
        _ => None,
    }
}

#[test]
fn bad_input_is_refused_and_the_node_keeps_serving() {
    let mesh = Mesh::start(NET);
    let socks = mesh.a.socks5_addr();

    // Garbage where TLS is expected.
    let mut s = TcpStream::connect(on(NET, "127.30.0.2:15008")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\nnot TLS at all")
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("200"), "{rest:?}");

    // A valid peer asking for an address this node does not host: 400 (IP mismatch).
    let e = connect_via_hbone(&mesh, "127.30.0.2:15008", "127.30.0.3:8080").unwrap_err();
    assert_eq!(status_of(&e), Some(400), "{e}");
    // A proxy port of the workload: 503.
    let e = connect_via_hbone(&mesh, "127.30.0.2:15008", "127.30.0.2:15006").unwrap_err();
    assert_eq!(status_of(&e), Some(503), "{e}");
    // Nothing listens on the workload's port: 503 (after the connect fails), not a hang.
    let e = connect_via_hbone(&mesh, "127.30.0.2:15008", "127.30.0.2:9999").unwrap_err();
    assert_eq!(status_of(&e), Some(503), "{e}");
    // And the right request works.
    connect_via_hbone(&mesh, "127.30.0.2:15008", "127.30.0.2:8080").expect("tunnel to web-1");

    // SOCKS4 on the SOCKS5 port: closed.
    let mut s = TcpStream::connect(socks).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    // BIND: "command not supported".
    let mut s = TcpStream::connect(socks).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut greeting = [0u8; 2];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, [5, 0]);
    s.write_all(&[5, 2, 0, 1, 127, 0, 0, 1, 0, 80]).unwrap();
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [5, 7]);
    // A client that goes silent mid-handshake is let go (10 s limit), and others are served.
    let _silent = TcpStream::connect(socks).unwrap();

    let (code, response) = curl(NET, "127.30.0.1", socks, "http://10.250.0.1/", &[]);
    assert_eq!(code, 0, "still serving: {response}");
    mesh.stop();
}
