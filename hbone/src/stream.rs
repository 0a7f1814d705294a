//! TLS over a shard's TCP connection. monoio's poll-style TCP stream (readiness on io_uring or
//! epoll, then plain syscalls) gives tokio's `AsyncRead`/`AsyncWrite`, which tokio-rustls and h2
//! build on; no task or executor of tokio's is involved.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use monoio::io::IntoPollIo;
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;
use rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::identity::Identity;
use crate::tls::{self, Refusal};

/// Ciphertext rustls may hold before the socket takes it (rustls' default is 64 KiB). Each time
/// it fills, the TLS layer writes to the socket: a larger bound means fewer, larger writes (and
/// fewer wake-ups of the peer) when HTTP/2 hands over a large DATA frame. It is held only while the
/// socket is slower than the sender.
pub const TLS_SEND_BUFFER_BYTES: usize = 1024 * 1024;

/// A handshake that takes longer than this is abandoned, so a silent peer cannot hold a slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type ClientTls = tokio_rustls::client::TlsStream<TcpStreamPoll>;
pub type ServerTls = tokio_rustls::server::TlsStream<TcpStreamPoll>;

/// Why a TLS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed during the TLS handshake: {0}")]
    Io(std::io::Error),
}

impl HandshakeError {
    fn from_io(e: std::io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls_error) => HandshakeError::Refused(Refusal::from_rustls(tls_error)),
            None => HandshakeError::Io(e),
        }
    }

    /// The refusal, if the handshake was refused (rather than cut or timed out).
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            HandshakeError::Refused(r) => Some(r),
            _ => None,
        }
    }
}

fn poll_io(tcp: TcpStream) -> Result<TcpStreamPoll, HandshakeError> {
    tcp.into_poll_io().map_err(HandshakeError::Io)
}

/// Client side: TLS over `tcp` to `peer`, verified by `config`.
pub async fn connect(
    tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<ClientTls, HandshakeError> {
    connect_within(tcp, peer, config, HANDSHAKE_TIMEOUT).await
}

/// As `connect`, giving up after `timeout`.
pub async fn connect_within(
    tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<ClientTls, HandshakeError> {
    let io = poll_io(tcp)?;
    let handshake = TlsConnector::from(config).connect(tls::server_name(peer.ip()), io);
    let result = match monoio::time::timeout(timeout, handshake).await {
        Ok(result) => result.map_err(HandshakeError::from_io),
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    };
    if let Err(e) = &result {
        tracing::info!(%peer, error = %e, "outbound mTLS handshake failed");
    }
    let mut stream = result?;
    stream
        .get_mut()
        .1
        .set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
    Ok(stream)
}

/// Server side: TLS over an accepted `tcp`; returns the stream and the client's identity.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> Result<(ServerTls, Identity), HandshakeError> {
    accept_within(tcp, config, HANDSHAKE_TIMEOUT).await
}

/// As `accept`, giving up after `timeout`, so a silent client cannot hold the slot longer.
pub async fn accept_within(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<(ServerTls, Identity), HandshakeError> {
    let peer_addr = tcp.peer_addr().ok();
    let io = poll_io(tcp)?;
    let handshake = TlsAcceptor::from(config).accept(io);
    let result = match monoio::time::timeout(timeout, handshake).await {
        Ok(result) => result.map_err(HandshakeError::from_io),
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    };
    let mut stream = match result {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(peer = ?peer_addr, error = %e, "inbound mTLS handshake failed");
            return Err(e);
        }
    };
    stream
        .get_mut()
        .1
        .set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
    // The verifier already required a certificate with an identity from our trust domain.
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| tls::identities(leaf).into_iter().next())
        .ok_or(HandshakeError::Refused(Refusal::NoIdentity))?;
    Ok((stream, peer))
}
