//! A small HTTP backend on the runtime, whose answers are known in advance, so load generators and
//! proxies can be checked against it: HTTP/1.1 (keep-alive, Content-Length and chunked request
//! bodies) and HTTP/2 (h2c, told apart by the connection preface) on one port.
//!
//! | path | answer |
//! |---|---|
//! | `/status/CODE` | that status |
//! | `/delay/MS` | 200 after MS milliseconds (at most 60 s) |
//! | `/bytes/N` | 200 with an N-byte body (at most 64 MiB) |
//! | `/fail-on/NAME/CODE` | CODE from the backend named NAME, 200 from the others |
//! | `/reset` | the connection (HTTP/2: the stream) is reset without an answer |
//! | `/reset-on/NAME` | that, from the backend named NAME only |
//! | `/refuse` | HTTP/2 only: the stream is refused (REFUSED_STREAM) |
//! | anything else | 200 `ok` |
//!
//! Every answer carries `x-backend: NAME`, so a split through a proxy can be observed, and every
//! request is counted (`Backend::served`), so a test can count a proxy's retries.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use shoal_runtime::{ListenerSpec, Runtime, RuntimeConfig, StartError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A request head larger than this is refused with 431.
pub const REQUEST_HEAD_MAX_BYTES: usize = 16 * 1024;
/// Headers per request at most (more: 431).
pub const REQUEST_HEADERS_MAX: usize = 64;
pub const DELAY_MAX_MS: u64 = 60_000;
pub const BODY_MAX_BYTES: usize = 64 * 1024 * 1024;
/// A body up to this size leaves in the same write as its head, as the buffered writers of real
/// servers send a small answer (Go's net/http, nginx); split, a proxy that forwards what it has at
/// once would pay a second record and a second wake-up of its peer for every answer.
pub const ONE_WRITE_BODY_MAX_BYTES: usize = 16 * 1024;
/// An idle keep-alive connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A started backend.
pub struct Backend {
    pub runtime: Runtime,
    served: Arc<AtomicU64>,
    body_bytes: Arc<AtomicU64>,
}

impl Backend {
    /// On one unpinned shard that drains within a second: the backend the tests and the demo
    /// stand up beside the proxies.
    pub fn start_one_shard(listen: SocketAddr, name: &str) -> Result<Self, StartError> {
        let config = RuntimeConfig {
            shards: 1,
            pin: false,
            drain_timeout: std::time::Duration::from_secs(1),
            ..RuntimeConfig::default()
        };
        Self::start(config, listen, name)
    }

    pub fn start(
        config: RuntimeConfig,
        listen: SocketAddr,
        name: &str,
    ) -> Result<Self, StartError> {
        let name = name.to_string();
        let served = Arc::new(AtomicU64::new(0));
        let body_bytes = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        let bytes_counter = body_bytes.clone();
        let runtime = Runtime::builder(config)
            .listener(ListenerSpec::new("backend", listen))
            .start(move |shard| {
                let name: Rc<str> = Rc::from(name.as_str());
                let counter = counter.clone();
                let bytes_counter = bytes_counter.clone();
                async move {
                    for listener in shard.take_listeners() {
                        shard
                            .serve(listener, |stream, _peer| {
                                let me = Me {
                                    name: name.clone(),
                                    served: counter.clone(),
                                    body_bytes: bytes_counter.clone(),
                                };
                                async move {
                                    if let Err(e) = serve(stream, me).await {
                                        tracing::debug!(error = %e, "backend connection ended");
                                    }
                                }
                            })
                            .await;
                    }
                }
            })?;
        Ok(Backend {
            runtime,
            served,
            body_bytes,
        })
    }

    /// Requests received so far (answered or reset).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Request body bytes received so far, over every request read to its end.
    pub fn received_body_bytes(&self) -> u64 {
        self.body_bytes.load(Ordering::Relaxed)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.runtime.shards()[0].listeners[0]
    }
}

/// What a request asks for, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub delay_ms: u64,
    pub body_bytes: usize,
    /// No answer: the connection or stream is reset.
    pub reset: bool,
    /// HTTP/2: the stream is refused.
    pub refuse: bool,
}

/// Who a backend is, for the answers that depend on it.
#[derive(Clone)]
struct Me {
    name: Rc<str>,
    served: Arc<AtomicU64>,
    body_bytes: Arc<AtomicU64>,
}

/// The answer of the backend named `name` to `path`.
pub fn answer_as(path: &str, name: &str) -> Answer {
    let bare = path.split('?').next().unwrap_or(path);
    if let Some(rest) = bare.strip_prefix("/fail-on/") {
        return match rest.split_once('/') {
            Some((who, code)) if who == name => answer(&format!("/status/{code}")),
            _ => answer("/"),
        };
    }
    if bare == "/reset" || bare.strip_prefix("/reset-on/") == Some(name) {
        return Answer {
            reset: true,
            ..answer("/")
        };
    }
    if bare == "/refuse" {
        return Answer {
            refuse: true,
            ..answer("/")
        };
    }
    answer(path)
}

pub fn answer(path: &str) -> Answer {
    let path = path.split('?').next().unwrap_or(path);
    let number = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|n| n.parse::<u64>().ok())
    };
    let ok = Answer {
        status: 200,
        delay_ms: 0,
        body_bytes: 3,
        reset: false,
        refuse: false,
    };
    if let Some(code) = number("/status/") {
        match u16::try_from(code) {
            Ok(code) if (200..=599).contains(&code) => Answer { status: code, ..ok },
            _ => Answer { status: 400, ..ok },
        }
    } else if let Some(ms) = number("/delay/") {
        Answer {
            delay_ms: ms.min(DELAY_MAX_MS),
            ..ok
        }
    } else if let Some(n) = number("/bytes/") {
        Answer {
            body_bytes: (n as usize).min(BODY_MAX_BYTES),
            ..ok
        }
    } else {
        ok
    }
}

fn body(a: &Answer) -> Bytes {
    // One body of the largest size, shared: a bulk benchmark measures the path, not the
    // backend allocating and filling megabytes per answer.
    static LARGEST: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    if a.body_bytes == 3 {
        Bytes::from_static(b"ok\n")
    } else {
        LARGEST
            .get_or_init(|| Bytes::from(vec![b'x'; BODY_MAX_BYTES]))
            .slice(..a.body_bytes.min(BODY_MAX_BYTES))
    }
}

async fn serve(tcp: TcpStream, me: Me) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut io = tcp.into_poll_io()?;
    let mut buf = BytesMut::with_capacity(8 * 1024);
    // Enough to tell HTTP/2's preface from an HTTP/1.1 request line.
    while buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) {
        if io.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
    if buf.starts_with(H2_PREFACE) {
        serve_h2(
            Prefixed {
                prefix: buf.freeze(),
                inner: io,
            },
            me,
        )
        .await
    } else {
        serve_http1(io, buf, me).await
    }
}

async fn serve_http1<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    mut buf: BytesMut,
    me: Me,
) -> std::io::Result<()> {
    let name = me.name.clone();
    loop {
        // Head.
        let parsed = loop {
            let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) if len > REQUEST_HEAD_MAX_BYTES => {
                    break Err(431)
                }
                Ok(httparse::Status::Complete(len)) => break Ok(head(&req, len)),
                Ok(httparse::Status::Partial) if buf.len() > REQUEST_HEAD_MAX_BYTES => {
                    break Err(431)
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => break Err(431),
                Err(_) => break Err(400),
            }
            let read = monoio::time::timeout(IDLE_TIMEOUT, io.read_buf(&mut buf)).await;
            match read {
                Ok(Ok(0)) | Err(_) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        };
        let head = match parsed {
            Ok(Ok(head)) => head,
            Ok(Err(status)) | Err(status) => {
                let reason = if status == 431 {
                    "Request Header Fields Too Large"
                } else {
                    "Bad Request"
                };
                let text = format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\nx-backend: {name}\r\n\r\n");
                io.write_all(text.as_bytes()).await?;
                return io.shutdown().await;
            }
        };
        buf.advance(head.len);
        // Body, read, summed and dropped.
        let mut received = Received::default();
        match head.body {
            RequestBody::None => {}
            RequestBody::Length(mut left) => {
                while left > 0 {
                    if buf.is_empty() && io.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                    let take = left.min(buf.len() as u64) as usize;
                    received.add(&buf[..take]);
                    buf.advance(take);
                    left -= take as u64;
                }
            }
            RequestBody::Chunked => {
                if !read_chunked(&mut io, &mut buf, &mut received).await? {
                    return Ok(());
                }
            }
        }
        me.served.fetch_add(1, Ordering::Relaxed);
        me.body_bytes.fetch_add(received.bytes, Ordering::Relaxed);
        let a = answer_as(&head.path, &name);
        if a.reset || a.refuse {
            // Dropped without an answer: the peer sees the connection end mid-exchange.
            return Ok(());
        }
        if a.delay_ms > 0 {
            monoio::time::sleep(Duration::from_millis(a.delay_ms)).await;
        }
        let body = body(&a);
        let connection = if head.keep_alive {
            "keep-alive"
        } else {
            "close"
        };
        let mut echoed = String::new();
        for (n, v) in &head.echo {
            echoed.push_str(&format!("x-echo-{n}: {v}\r\n"));
        }
        let text = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: {connection}\r\nx-backend: {name}\r\nx-received-bytes: {}\r\nx-received-crc32: {:08x}\r\nx-path: {}\r\n{echoed}\r\n",
            a.status,
            reason(a.status),
            body.len(),
            received.bytes,
            received.crc.clone().finalize(),
            head.path,
        );
        let mut answer = text.into_bytes();
        if head.method_has_body_in_response && body.len() <= ONE_WRITE_BODY_MAX_BYTES {
            answer.extend_from_slice(&body);
            io.write_all(&answer).await?;
        } else {
            io.write_all(&answer).await?;
            if head.method_has_body_in_response {
                io.write_all(&body).await?;
            }
        }
        io.flush().await?;
        if !head.keep_alive {
            return io.shutdown().await;
        }
    }
}

enum RequestBody {
    None,
    Length(u64),
    Chunked,
}

/// What a request's body was: its size and CRC-32, answered in `x-received-bytes` and
/// `x-received-crc32` so a test can check a proxy passed it on intact.
#[derive(Default)]
struct Received {
    bytes: u64,
    crc: crc32fast::Hasher,
}

impl Received {
    fn add(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.crc.update(data);
    }
}

struct Head {
    len: usize,
    path: String,
    /// `x-` request headers, answered as `x-echo-NAME` (how a test sees what reached the backend).
    echo: Vec<(String, String)>,
    keep_alive: bool,
    body: RequestBody,
    method_has_body_in_response: bool,
}

/// The parts of a request head that decide the answer. `Err(400)` for framing that could be
/// smuggling (both Content-Length and Transfer-Encoding, or two different lengths).
fn head(req: &httparse::Request<'_, '_>, len: usize) -> Result<Head, u16> {
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = req.version == Some(0);
    let mut echo = Vec::new();
    for h in req.headers.iter() {
        let lower = h.name.to_ascii_lowercase();
        if lower.starts_with("x-") && lower != "x-request-id" {
            echo.push((lower, String::from_utf8_lossy(h.value).into_owned()));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(400u16)?;
            if length.is_some_and(|l| l != v) {
                return Err(400);
            }
            length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Err(400);
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if h.value.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    let body = match (length, chunked) {
        (Some(_), true) => return Err(400),
        (Some(0), false) | (None, false) => RequestBody::None,
        (Some(n), false) => RequestBody::Length(n),
        (None, true) => RequestBody::Chunked,
    };
    Ok(Head {
        len,
        path: req.path.unwrap_or("/").to_string(),
        echo,
        keep_alive: !close,
        body,
        method_has_body_in_response: req.method != Some("HEAD"),
    })
}

/// Reads a chunked body to its end (trailers included). False if the peer closed first.
async fn read_chunked<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    received: &mut Received,
) -> std::io::Result<bool> {
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if buf.len() > REQUEST_HEAD_MAX_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "chunk size line too long",
                ));
            }
            if io.read_buf(buf).await? == 0 {
                return Ok(false);
            }
        };
        let size_text = std::str::from_utf8(&buf[..line_end]).unwrap_or("");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size"))?;
        buf.advance(line_end + 2);
        if size == 0 {
            // Trailers until an empty line.
            loop {
                let end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if io.read_buf(buf).await? == 0 {
                        return Ok(false);
                    }
                };
                buf.advance(end + 2);
                if end == 0 {
                    return Ok(true);
                }
            }
        }
        let mut left = size + 2;
        while left > 0 {
            if buf.is_empty() && io.read_buf(buf).await? == 0 {
                return Ok(false);
            }
            let take = left.min(buf.len());
            // The chunk's data, not its closing CRLF.
            let data = take.min(left.saturating_sub(2));
            received.add(&buf[..data]);
            buf.advance(take);
            left -= take;
        }
    }
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

async fn serve_h2<S: AsyncRead + AsyncWrite + Unpin + 'static>(
    io: S,
    me: Me,
) -> std::io::Result<()> {
    let name = me.name.clone();
    let mut conn = h2::server::handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    while let Some(stream) = conn.accept().await {
        let Ok((request, mut respond)) = stream else {
            break;
        };
        let name = name.clone();
        me.served.fetch_add(1, Ordering::Relaxed);
        let body_bytes = me.body_bytes.clone();
        monoio::spawn(async move {
            let a = answer_as(request.uri().path(), &name);
            if a.refuse {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                return;
            }
            if a.reset {
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            let path = request.uri().path().to_string();
            let mut echo = Vec::new();
            for (n, v) in request.headers() {
                if n.as_str().starts_with("x-") && n != "x-request-id" {
                    echo.push((format!("x-echo-{n}"), v.clone()));
                }
            }
            let mut received = Received::default();
            let mut request_body = request.into_body();
            while let Some(chunk) = request_body.data().await {
                let Ok(chunk) = chunk else { return };
                received.add(&chunk);
                let _ = request_body.flow_control().release_capacity(chunk.len());
            }
            body_bytes.fetch_add(received.bytes, Ordering::Relaxed);
            if a.delay_ms > 0 {
                monoio::time::sleep(Duration::from_millis(a.delay_ms)).await;
            }
            let mut response = http::Response::builder()
                .status(a.status)
                .header("content-type", "text/plain")
                .header("x-backend", &*name)
                .header("x-received-bytes", received.bytes)
                .header(
                    "x-received-crc32",
                    format!("{:08x}", received.crc.clone().finalize()),
                );
            for (n, v) in echo {
                response = response.header(n, v);
            }
            let response = response.body(());
            let Ok(response) = response else { return };
            let data = body(&a);
            let Ok(mut send) = respond.send_response(response, false) else {
                return;
            };
            // gRPC-style: `/trailers` ends with trailers (grpc-status) instead of END_STREAM on data.
            let trailers = path.starts_with("/trailers").then(|| {
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                t.insert("grpc-message", http::HeaderValue::from_static("ok"));
                t
            });
            send_all(&mut send, data, trailers).await;
        });
    }
    Ok(())
}

/// Sends `data` within the peer's flow-control window, then ends the stream.
async fn send_all(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    trailers: Option<http::HeaderMap>,
) {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            _ => return,
        };
        let chunk = data.split_to(capacity.min(data.len()));
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    match trailers {
        Some(t) => {
            let _ = send.send_trailers(t);
        }
        None => {
            let _ = send.send_data(Bytes::new(), true);
        }
    }
}

/// An IO whose first bytes were already read (to tell the protocol): they are read again first.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            let chunk = self.prefix.split_to(n);
            out.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_by_path() {
        assert_eq!(
            answer("/"),
            Answer {
                status: 200,
                delay_ms: 0,
                body_bytes: 3,
                reset: false,
                refuse: false,
            }
        );
        assert_eq!(answer("/status/503").status, 503);
        assert_eq!(answer("/status/42").status, 400);
        assert_eq!(answer("/delay/20?x=1").delay_ms, 20);
        assert_eq!(answer("/delay/999999999").delay_ms, DELAY_MAX_MS);
        assert_eq!(answer("/bytes/1000").body_bytes, 1000);
        // Answers that depend on who the backend is.
        assert_eq!(answer_as("/fail-on/a/503", "a").status, 503);
        assert_eq!(answer_as("/fail-on/a/503", "b").status, 200);
        assert!(answer_as("/reset", "b").reset);
        assert!(answer_as("/reset-on/b", "b").reset && !answer_as("/reset-on/b", "a").reset);
        assert!(answer_as("/refuse", "a").refuse);
    }
}
