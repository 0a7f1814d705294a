//! mTLS between real sockets on loopback: a good handshake carries bytes and names the peer; each
//! kind of bad peer is refused with its own reason and no application bytes are delivered; a
//! renewed certificate is used by new connections while open ones carry on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use monoio::net::{TcpListener, TcpStream};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shoal_hbone::ca::{CertificateAuthority, LocalCa, WorkloadCertificate};
use shoal_hbone::certs::{Rotation, WorkloadCerts};
use shoal_hbone::stream::{self, HandshakeError};
use shoal_hbone::tls::{self, Refusal, Trust};
use shoal_hbone::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn id(td: &str, ns: &str, sa: &str) -> Identity {
    Identity::new(td, ns, sa).expect("valid identity")
}

struct Mesh {
    ca: Arc<LocalCa>,
    trust: Trust,
}

impl Mesh {
    fn new() -> Self {
        let ca = Arc::new(LocalCa::generate("cluster.local").expect("ca"));
        let trust = Trust::new(&ca.roots(), "cluster.local").expect("trust");
        Mesh { ca, trust }
    }

    fn certs(&self, identity: Identity) -> Arc<WorkloadCerts> {
        WorkloadCerts::issue(self.ca.clone(), identity, Duration::from_secs(3600)).expect("certs")
    }
}

/// Runs `f` on a fresh monoio runtime with each driver.
fn on_both_drivers<F, Fut>(f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("io_uring")
        .block_on(f());
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("epoll")
        .block_on(f());
}

struct Outcome {
    client: Result<String, HandshakeError>,
    server: Result<(Identity, String), HandshakeError>,
}

/// One connection: the server answers "pong:" + what it read; the client sends "ping".
async fn exchange(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let server = monoio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(HandshakeError::Io)?;
        let (mut tls, peer) = stream::accept(tcp, server_config).await?;
        let mut got = vec![0u8; 4];
        tls.read_exact(&mut got).await.map_err(HandshakeError::Io)?;
        tls.write_all(b"pong:").await.map_err(HandshakeError::Io)?;
        tls.write_all(&got).await.map_err(HandshakeError::Io)?;
        tls.shutdown().await.map_err(HandshakeError::Io)?;
        Ok((peer, String::from_utf8_lossy(&got).into_owned()))
    });
    let client = async {
        let tcp = TcpStream::connect_addr(addr)
            .await
            .map_err(HandshakeError::Io)?;
        let mut tls = stream::connect(tcp, addr, client_config).await?;
        tls.write_all(b"ping").await.map_err(HandshakeError::Io)?;
        let mut back = Vec::new();
        tls.read_to_end(&mut back)
            .await
            .map_err(HandshakeError::Io)?;
        Ok(String::from_utf8_lossy(&back).into_owned())
    }
    .await;
    Outcome {
        client,
        server: server.await,
    }
}

fn client_config(
    certs: Arc<WorkloadCerts>,
    trust: &Trust,
    expected: Identity,
) -> Arc<rustls::ClientConfig> {
    Arc::new(tls::client_config(certs, trust, vec![expected]).expect("client config"))
}

fn server_config(certs: Arc<WorkloadCerts>, trust: &Trust) -> Arc<rustls::ServerConfig> {
    Arc::new(tls::server_config(certs, trust).expect("server config"))
}

#[test]
fn mutual_tls_carries_bytes_and_names_the_peer() {
    on_both_drivers(|| async {
        let mesh = Mesh::new();
        let client_id = id("cluster.local", "default", "productpage");
        let server_id = id("cluster.local", "default", "reviews");
        let out = exchange(
            server_config(mesh.certs(server_id.clone()), &mesh.trust),
            client_config(mesh.certs(client_id.clone()), &mesh.trust, server_id),
        )
        .await;
        assert_eq!(out.client.expect("client"), "pong:ping");
        let (peer, got) = out.server.expect("server");
        assert_eq!(
            peer, client_id,
            "the server sees the client's SPIFFE identity"
        );
        assert_eq!(got, "ping");
    });
}

#[test]
fn a_server_from_another_root_is_refused() {
    on_both_drivers(|| async {
        let mesh = Mesh::new();
        let other = Mesh::new();
        let server_id = id("cluster.local", "default", "reviews");
        let out = exchange(
            server_config(other.certs(server_id.clone()), &other.trust),
            client_config(
                mesh.certs(id("cluster.local", "default", "productpage")),
                &mesh.trust,
                server_id,
            ),
        )
        .await;
        let err = out.client.expect_err("must be refused");
        assert_eq!(err.refusal(), Some(&Refusal::UntrustedRoot), "{err}");
        assert!(out.server.is_err(), "no bytes delivered to the server");
    });
}

#[test]
fn a_server_with_the_wrong_identity_is_refused_naming_both() {
    on_both_drivers(|| async {
        let mesh = Mesh::new();
        let out = exchange(
            server_config(
                mesh.certs(id("cluster.local", "default", "ratings")),
                &mesh.trust,
            ),
            client_config(
                mesh.certs(id("cluster.local", "default", "productpage")),
                &mesh.trust,
                id("cluster.local", "default", "reviews"),
            ),
        )
        .await;
        let err = out.client.expect_err("must be refused");
        let text = err.to_string();
        assert!(
            matches!(err.refusal(), Some(Refusal::WrongIdentity { .. })),
            "{text}"
        );
        assert!(
            text.contains("expected spiffe://cluster.local/ns/default/sa/reviews"),
            "{text}"
        );
        assert!(
            text.contains("presented spiffe://cluster.local/ns/default/sa/ratings"),
            "{text}"
        );
        assert!(out.server.is_err());
    });
}

#[test]
fn an_expired_server_certificate_is_refused() {
    on_both_drivers(|| async {
        let mesh = Mesh::new();
        let server_id = id("cluster.local", "default", "reviews");
        // Issued two hours ago for one hour: expired an hour ago.
        let expired = mesh.ca.issue_window(
            &server_id,
            SystemTime::now() - Duration::from_secs(7200),
            Duration::from_secs(3600),
        );
        let out = exchange(
            presenting(expired.expect("issue")),
            client_config(
                mesh.certs(id("cluster.local", "default", "productpage")),
                &mesh.trust,
                server_id,
            ),
        )
        .await;
        let err = out.client.expect_err("must be refused");
        assert_eq!(err.refusal(), Some(&Refusal::Expired), "{err}");
    });
}

/// With aws-lc-rs, HBONE offers the post-quantum hybrid key exchange Istio offers: a server that
/// accepts nothing else still completes a handshake with our client (after a HelloRetryRequest,
/// since the client's first key share is X25519).
#[cfg(feature = "aws-lc")]
#[test]
fn the_post_quantum_key_exchange_is_offered_and_used_when_the_server_wants_it() {
    on_both_drivers(|| async {
        let mesh = Mesh::new();
        let server_id = id("cluster.local", "default", "reviews");
        let cert = mesh
            .ca
            .issue_window(&server_id, SystemTime::now(), Duration::from_secs(3600))
            .expect("issue");
        let pq_only = Arc::new(rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768],
            ..(*tls::crypto_provider()).clone()
        });
        let server = presenting_with(cert, pq_only);
        let client = client_config(
            mesh.certs(id("cluster.local", "default", "productpage")),
            &mesh.trust,
            server_id,
        );
        // The server (no client certificate asked) refuses after its handshake; the client's
        // handshake is complete once it has the server's Finished.
        let (group, _) = key_exchange(server, client).await;
        assert_eq!(group, Some(rustls::NamedGroup::X25519MLKEM768));
    });
}

#[test]
fn a_handshake_between_our_peers_uses_x25519_first() {
    on_both_drivers(|| async {
        let mesh = Mesh::new();
        let server_id = id("cluster.local", "default", "reviews");
        let server = server_config(mesh.certs(server_id.clone()), &mesh.trust);
        let client = client_config(
            mesh.certs(id("cluster.local", "default", "productpage")),
            &mesh.trust,
            server_id,
        );
        let (group, accepted) = key_exchange(server, client).await;
        assert_eq!(
            group,
            Some(rustls::NamedGroup::X25519),
            "one round trip, no retry"
        );
        assert!(accepted.is_ok());
    });
}

/// One handshake: the key exchange group the client negotiated, and what the server's accept
/// returned.
async fn key_exchange(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (Option<rustls::NamedGroup>, Result<Identity, HandshakeError>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let accepted = monoio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        stream::accept(tcp, server).await.map(|(_, peer)| peer)
    });
    let tcp = TcpStream::connect_addr(addr).await.expect("connect");
    let tls = stream::connect(tcp, addr, client).await.expect("handshake");
    let group = tls.negotiated_key_exchange_group().map(|g| g.name());
    (group, accepted.await)
}

#[test]
fn expired_or_future_certificates_are_never_presented() {
    let mesh = Mesh::new();
    let who = id("cluster.local", "default", "reviews");
    let expired = mesh.ca.issue_window(
        &who,
        SystemTime::now() - Duration::from_secs(7200),
        Duration::from_secs(3600),
    );
    let future = mesh.ca.issue_window(
        &who,
        SystemTime::now() + Duration::from_secs(3600),
        Duration::from_secs(3600),
    );
    for cert in [expired.expect("expired"), future.expect("future")] {
        let certs =
            WorkloadCerts::from_certificate(mesh.ca.clone(), cert, Duration::from_secs(3600))
                .expect("certs");
        assert!(
            certs.current().is_none(),
            "a certificate outside its window is not presented"
        );
    }
    assert!(mesh.certs(who).current().is_some());
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    on_both_drivers(|| async {
        let mesh = Mesh::new();
        let server_id = id("cluster.local", "default", "reviews");
        // HBONE's own server verification, but nothing to present.
        let mut anonymous = tls::client_config(
            mesh.certs(id("cluster.local", "default", "x")),
            &mesh.trust,
            vec![server_id.clone()],
        )
        .expect("config");
        anonymous.client_auth_cert_resolver = Arc::new(NoCertificate);
        let out = exchange(
            server_config(mesh.certs(server_id), &mesh.trust),
            Arc::new(anonymous),
        )
        .await;
        let err = out.server.expect_err("must be refused");
        assert_eq!(err.refusal(), Some(&Refusal::NoClientCertificate), "{err}");
        // With TLS 1.3 the client learns of it on its first read: it gets no answer.
        assert!(
            out.client.is_err(),
            "the client got no bytes: {:?}",
            out.client.ok()
        );
    });
}

#[test]
fn a_client_from_another_trust_domain_is_refused() {
    on_both_drivers(|| async {
        let mesh = Mesh::new();
        let server_id = id("cluster.local", "default", "reviews");
        let stranger = mesh.certs(id("other.domain", "default", "productpage"));
        let out = exchange(
            server_config(mesh.certs(server_id.clone()), &mesh.trust),
            client_config(stranger, &mesh.trust, server_id),
        )
        .await;
        let err = out.server.expect_err("must be refused");
        assert_eq!(
            err.refusal(),
            Some(&Refusal::WrongTrustDomain {
                expected: "cluster.local".into(),
                presented: "other.domain".into()
            }),
            "{err}"
        );
        assert!(out.client.is_err());
    });
}

#[test]
fn a_renewed_certificate_is_used_by_new_connections_and_open_ones_carry_on() {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("rt")
        .block_on(async {
            let mesh = Mesh::new();
            let client_id = id("cluster.local", "default", "productpage");
            let server_id = id("cluster.local", "default", "reviews");
            // Lifetime 4 s (plus the 60 s skew allowance before now): renewal is due at once.
            let client_certs =
                WorkloadCerts::issue(mesh.ca.clone(), client_id.clone(), Duration::from_secs(4))
                    .expect("certs");
            let first_leaf = client_certs.leaf().expect("leaf");
            let server_cfg = server_config(mesh.certs(server_id.clone()), &mesh.trust);
            let client_cfg = client_config(client_certs.clone(), &mesh.trust, server_id);

            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = monoio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..2 {
                    let (tcp, _) = listener.accept().await.expect("accept");
                    let (tls, _) = stream::accept(tcp, server_cfg.clone())
                        .await
                        .expect("handshake");
                    let leaf: CertificateDer<'static> =
                        tls.peer_certificates()[0].clone().into_owned();
                    seen.push(leaf);
                    let mut tls = tls;
                    monoio::spawn(async move {
                        let mut buf = [0u8; 16];
                        while let Ok(n) = tls.read(&mut buf).await {
                            if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
                seen
            });
            let mut old = stream::connect(
                TcpStream::connect_addr(addr).await.expect("tcp"),
                addr,
                client_cfg.clone(),
            )
            .await
            .expect("first connection");
            let _rotation = Rotation::start(vec![client_certs.clone()]).expect("rotation");
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while client_certs.leaf().as_ref() == Some(&first_leaf) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the certificate must be renewed at half-life"
                );
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
            let _new = stream::connect(
                TcpStream::connect_addr(addr).await.expect("tcp"),
                addr,
                client_cfg,
            )
            .await
            .expect("second connection");
            let seen = server.await;
            assert_eq!(
                seen[0], first_leaf,
                "the first connection presented the first certificate"
            );
            assert_ne!(
                seen[1], first_leaf,
                "a new connection presents the renewed certificate"
            );
            old.write_all(b"still here")
                .await
                .expect("the old connection still writes");
            let mut back = [0u8; 10];
            old.read_exact(&mut back).await.expect("and reads");
            assert_eq!(&back, b"still here");
        });
}

/// A server config that presents exactly `cert`, valid or not (to test what clients refuse).
fn presenting(cert: WorkloadCertificate) -> Arc<rustls::ServerConfig> {
    presenting_with(cert, tls::crypto_provider())
}

fn presenting_with(
    cert: WorkloadCertificate,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_no_client_auth()
        .with_single_cert(cert.chain, PrivateKeyDer::Pkcs8(cert.key))
        .expect("single cert");
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct NoCertificate;

impl rustls::client::ResolvesClientCert for NoCertificate {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}
