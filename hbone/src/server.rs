//! The HBONE server: HTTP/2 over an accepted mTLS connection. A request that is not a CONNECT to
//! `ip:port` is answered 400 here; every CONNECT goes to the caller with the peer's identity and
//! the parsed request, and the caller answers: accept (200, and the tunnel is theirs), or refuse
//! with 401, 400 or 503. A drain sends GOAWAY so the client takes new streams elsewhere, while the
//! streams already open finish.

use std::future::Future;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Response, StatusCode};

use crate::connect::{parse_inbound, InboundConnect};
use crate::identity::Identity;
use crate::stream::ServerTls;
use crate::tunnel::{self, Tunnel};

/// How the caller answers one CONNECT.
pub struct Responder {
    respond: SendResponse<Bytes>,
    body: RecvStream,
}

impl Responder {
    /// Answers 200 and hands over the tunnel. Call only once the upstream is connected: a 200 tells
    /// the client its destination is reachable.
    pub fn accept(mut self) -> Result<Tunnel, h2::Error> {
        let send = self.respond.send_response(ok(), false)?;
        Ok(Tunnel {
            send,
            recv: self.body,
        })
    }

    /// Answers `status` (401 denied by policy, 400 bad request, 503 upstream unreachable) and ends
    /// the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let _ = self.respond.send_response(status_only(status), true);
    }
}

fn ok() -> Response<()> {
    status_only(StatusCode::OK)
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// Serves one HBONE connection until the client closes it (or, once `drain` resolves, until the
/// streams already open finish). `handle` runs as its own task for each CONNECT.
pub async fn serve<H, Fut>(
    tls: ServerTls,
    peer: Identity,
    mut handle: H,
    drain: impl Future<Output = ()>,
) -> Result<(), h2::Error>
where
    H: FnMut(InboundConnect, Responder) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(tunnel::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(tunnel::CONNECTION_WINDOW_BYTES)
        .max_frame_size(tunnel::MAX_FRAME_BYTES)
        .max_header_list_size(tunnel::SERVER_MAX_HEADER_LIST_BYTES)
        .max_concurrent_streams(tunnel::SERVER_MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(tls)
        .await?;
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    loop {
        let next = if draining {
            conn.accept().await
        } else {
            monoio::select! {
                next = conn.accept() => next,
                _ = &mut drain => {
                    draining = true;
                    conn.graceful_shutdown();
                    continue;
                }
            }
        };
        let Some(next) = next else {
            return Ok(());
        };
        let (request, mut respond) = next?;
        let (parts, body) = request.into_parts();
        match parse_inbound(peer.clone(), &parts.method, &parts.uri, &parts.headers) {
            Ok(connect) => {
                // Boxed at once, as `Shard::spawn` does: the caller's stream future is kilobytes,
                // and monoio copies what it is given through several frames.
                monoio::spawn(Box::pin(handle(connect, Responder { respond, body })));
            }
            Err(bad) => {
                tracing::debug!(peer = %peer, error = %bad, "refusing a request on the HBONE port");
                let _ = respond.send_response(status_only(bad.status()), true);
            }
        }
    }
}
