//! The HBONE client: one mTLS + HTTP/2 connection to a peer's 15008, on which each tunnel is a
//! CONNECT stream. Only a `200` opens a tunnel. The connection is driven by its own task on the
//! shard, which also sends PINGs and drops a peer that stops answering.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use monoio::net::TcpStream;
use rustls::ClientConfig;

use crate::connect::OutboundConnect;
use crate::stream::{self, HandshakeError};
use crate::tunnel::{self, Tunnel};

/// A PING goes out this often; a connection whose PING is not answered within
/// `PING_TIMEOUT` is dropped (HBONE.md: 10 s and 20 s, as ztunnel).
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How a connection checks that its peer is alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: PING_INTERVAL,
            timeout: PING_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {peer}: {cause}")]
    Tcp {
        peer: SocketAddr,
        cause: std::io::Error,
    },
    #[error("mTLS to {peer}: {cause}")]
    Handshake {
        peer: SocketAddr,
        cause: HandshakeError,
    },
    #[error("HTTP/2 with {peer}: {cause}")]
    H2 { peer: SocketAddr, cause: h2::Error },
    #[error("{peer} answered CONNECT {authority} with {status}")]
    Refused {
        peer: SocketAddr,
        authority: SocketAddr,
        status: http::StatusCode,
    },
    #[error("TLS configuration for {peer}: {cause}")]
    Tls {
        peer: SocketAddr,
        cause: rustls::Error,
    },
    #[error("bad CONNECT request: {0}")]
    Request(#[from] http::Error),
}

impl ConnectError {
    /// Whether the same request could succeed on a fresh connection (the pool retries those).
    pub fn is_connection_level(&self) -> bool {
        match self {
            ConnectError::H2 { cause, .. } => {
                cause.is_go_away() || cause.is_io() || cause.reason().is_none()
            }
            _ => false,
        }
    }
}

/// One HBONE connection. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Connection {
    send_request: h2::client::SendRequest<Bytes>,
    peer: SocketAddr,
    closed: Rc<Cell<bool>>,
}

impl Connection {
    /// TCP to `peer` (normally `ip:15008`), mTLS as `config` says, then the HTTP/2 handshake.
    pub async fn connect(
        peer: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> Result<Self, ConnectError> {
        Self::connect_with(peer, config, Keepalive::default()).await
    }

    /// As `connect`, with the given keepalive.
    pub async fn connect_with(
        peer: SocketAddr,
        config: Arc<ClientConfig>,
        keepalive: Keepalive,
    ) -> Result<Self, ConnectError> {
        // Bounded like the handshake: a peer that drops SYNs must not hold a stream for the
        // kernel's whole SYN-retry period.
        let tcp =
            match monoio::time::timeout(stream::HANDSHAKE_TIMEOUT, TcpStream::connect_addr(peer))
                .await
            {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(cause)) => return Err(ConnectError::Tcp { peer, cause }),
                Err(_) => {
                    let cause =
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect timed out");
                    return Err(ConnectError::Tcp { peer, cause });
                }
            };
        let _ = tcp.set_nodelay(true);
        let tls = stream::connect(tcp, peer, config)
            .await
            .map_err(|cause| ConnectError::Handshake { peer, cause })?;
        let (send_request, mut connection) = h2::client::Builder::new()
            .initial_window_size(tunnel::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(tunnel::CONNECTION_WINDOW_BYTES)
            .max_frame_size(tunnel::MAX_FRAME_BYTES)
            .max_header_list_size(tunnel::CLIENT_MAX_HEADER_LIST_BYTES)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|cause| ConnectError::H2 { peer, cause })?;
        let closed = Rc::new(Cell::new(false));
        let ping_pong = connection.ping_pong();
        let closing = closed.clone();
        monoio::spawn(async move {
            let alive = watch(ping_pong, keepalive);
            monoio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "HBONE connection ended");
                    }
                }
                _ = alive => tracing::warn!(%peer, "HBONE peer stopped answering PINGs; dropping the connection"),
            }
            closing.set(true);
        });
        Ok(Connection {
            send_request,
            peer,
            closed,
        })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether the connection has ended (closed, GOAWAY finished, or dead), or refused a stream
    /// in a way that says it takes no more.
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Takes the connection out of use (it refused a stream with GOAWAY, or broke).
    pub fn mark_closed(&self) {
        self.closed.set(true);
    }

    /// The most streams the peer lets this connection have open at once.
    pub fn peer_stream_limit(&self) -> usize {
        self.send_request.current_max_send_streams()
    }

    /// Opens a tunnel: sends CONNECT and waits for the answer; only `200` opens it.
    pub async fn open(&self, request: &OutboundConnect) -> Result<Tunnel, ConnectError> {
        let peer = self.peer;
        let h2_err = |cause| ConnectError::H2 { peer, cause };
        let mut ready = self.send_request.clone().ready().await.map_err(h2_err)?;
        let (response, send) = ready
            .send_request(request.request()?, false)
            .map_err(h2_err)?;
        let response = response.await.map_err(h2_err)?;
        if response.status() != http::StatusCode::OK {
            return Err(ConnectError::Refused {
                peer,
                authority: request.authority,
                status: response.status(),
            });
        }
        Ok(Tunnel {
            send,
            recv: response.into_body(),
        })
    }
}

/// Resolves when the peer has not answered a PING within `keepalive.timeout`; never, while it does.
async fn watch(ping_pong: Option<h2::PingPong>, keepalive: Keepalive) {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        monoio::time::sleep(keepalive.interval).await;
        match monoio::time::timeout(keepalive.timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection is closing for another reason; let its own task report it.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}
