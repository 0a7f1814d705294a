//! TLS over a shard's TCP connection, behind tokio's `AsyncRead`/`AsyncWrite` for h2; no task or
//! executor of tokio's is involved.
//!
//! rustls does the handshake (its unbuffered API, so the secrets can be handed over), then keeps
//! the key schedule (`rustls::kernel`: key updates, session tickets) while `record` seals and opens
//! the records in this stream's own buffers. Reads and writes are io_uring operations on those
//! buffers, submitted with the tick's batch (`runtime::stream::SharedSocket`): a read takes every
//! record the socket holds, up to 256 KiB, and a write carries every record sealed since the last
//! one. Against tokio-rustls over poll-io this saves, per 16 KiB record, an allocation each way, a
//! plaintext copy on the way in and most of the system calls (see ARCHITECTURE.md for the
//! measurements).

use std::io;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut, Range};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use monoio::buf::SliceMut;
use monoio::net::TcpStream;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::SupportedKxGroup;
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, UnbufferedConnectionCommon, UnbufferedStatus,
};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ExtractedSecrets, ServerConfig};
use rustls_pki_types::CertificateDer;
use shoal_runtime::stream::{ReadOp, ReadRoom, SharedSocket, WriteOp, READ_BUFFER_BYTES};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::identity::Identity;
use crate::record::{self, ContentType, Opener, RecordError, Sealer};
use crate::tls::{self, Refusal};

/// Plaintext the stream seals ahead of the socket: a write takes up to this much from its caller,
/// and another as much may wait sealed while the previous write is in flight. A 1 MiB DATA frame
/// leaves in one write. Why not less: each write costs the sender a wake-up of the reader and a
/// turn of its reactor; at 256 KiB the tunnel-alone sender spent ~40% more CPU per GiB (4 MiB was
/// no clearer a gain than the noise, for four times the memory of a bulk connection).
pub const TLS_SEND_BUFFER_BYTES: usize = 1024 * 1024;

/// A read's room follows the reads as plain TCP's does (`runtime::stream::ReadRoom`): 8 KiB at
/// first and whenever the socket has been emptied, a size jemalloc serves from its per-thread cache;
/// doubling up to 256 KiB while reads fill it, so a bulk connection takes many records per read.
/// The room also grows to fit a record that is partly in.
///
/// A buffer that has carried a bulk write is kept for the next one only while the writes stay
/// within a quarter of it (or it is no larger than this): a pooled connection that has carried a
/// bulk transfer and then idles, or goes back to requests and responses, gives its megabytes back.
pub const KEPT_WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Post-handshake messages (key updates, session tickets) are small; a peer that sends more than
/// this in one message is refused.
const MAX_POST_HANDSHAKE_MESSAGE_BYTES: usize = 64 * 1024;

/// The handshake message that moves our side to its next key, the peer not asked to follow.
const KEY_UPDATE_NOT_REQUESTED: &[u8] = &[24, 0, 0, 1, 0];
/// The alert that ends what we send (warning level, close_notify).
const CLOSE_NOTIFY: &[u8] = &[1, 0];

/// A handshake that takes longer than this is abandoned, so a silent peer cannot hold a slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type ClientTls = TlsStream;
pub type ServerTls = TlsStream;

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
    /// The refusal, if the handshake was refused (rather than cut or timed out).
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            HandshakeError::Refused(r) => Some(r),
            _ => None,
        }
    }
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
    let handshake = async move {
        let conn = UnbufferedClientConnection::new(config, tls::server_name(peer.ip()))
            .map_err(|e| HandshakeError::Refused(Refusal::from_rustls(&e)))?;
        let mut io = Transport::new(tcp);
        let (conn, carried) = handshake(conn, &mut io).await?;
        TlsStream::new(io, conn, carried)
    };
    let result = match monoio::time::timeout(timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    };
    if let Err(e) = &result {
        tracing::info!(%peer, error = %e, "outbound mTLS handshake failed");
    }
    result
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
    let handshake = async move {
        let conn = UnbufferedServerConnection::new(config)
            .map_err(|e| HandshakeError::Refused(Refusal::from_rustls(&e)))?;
        let mut io = Transport::new(tcp);
        let (conn, carried) = handshake(conn, &mut io).await?;
        // The verifier already required a certificate with an identity from our trust domain.
        let peer = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| tls::identities(leaf).into_iter().next())
            .ok_or(HandshakeError::Refused(Refusal::NoIdentity))?;
        Ok((TlsStream::new(io, conn, carried)?, peer))
    };
    let result = match monoio::time::timeout(timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    };
    if let Err(e) = &result {
        tracing::info!(peer = ?peer_addr, error = %e, "inbound mTLS handshake failed");
    }
    result
}

/// What the handshake needs of either side's unbuffered connection.
trait Side: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Sized {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(kernel)))
    }
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(kernel)))
    }
}

/// rustls' key schedule after the handshake.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn new_session_ticket(&mut self, payload: &[u8]) -> Result<(), rustls::Error> {
        match self {
            Kernel::Client(k) => k.handle_new_session_ticket(payload),
            Kernel::Server(_) => Err(rustls::Error::General(
                "a client sent a session ticket".into(),
            )),
        }
    }

    /// Records one key may seal (the suite's confidentiality limit).
    fn records_per_key(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map(|s| s.common.confidentiality_limit)
            .unwrap_or(0)
    }
}

/// Drives rustls' handshake over `io` until the connection is established on both sides and
/// nothing is left to send. Returns the connection and any application data that arrived with
/// the handshake's last flight.
async fn handshake<C: Side>(
    mut conn: C,
    io: &mut Transport,
) -> Result<(C, Vec<u8>), HandshakeError> {
    let mut outgoing: Vec<u8> = Vec::new();
    let mut carried = Vec::new();
    loop {
        let (mut transmit, mut need_read, mut done) = (false, false, false);
        let mut failure = None;
        let status = conn.process(&mut io.incoming[io.start..]);
        let discard = status.discard;
        match status.state {
            Err(e) => failure = Some(e),
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                encode(&mut outgoing, |room| data.encode(room))?;
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                // Marked sent now, sent below before rustls is asked for anything else.
                data.done();
                transmit = true;
            }
            Ok(ConnectionState::BlockedHandshake) => need_read = true,
            Ok(ConnectionState::WriteTraffic(_)) => done = true,
            Ok(ConnectionState::ReadTraffic(mut data)) => {
                while let Some(record) = data.next_record() {
                    match record {
                        Ok(record) => carried.extend_from_slice(record.payload),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(HandshakeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )));
            }
            Ok(other) => {
                failure = Some(rustls::Error::General(format!(
                    "unexpected TLS state during the handshake: {other:?}"
                )));
            }
        }
        io.start += discard;
        if let Some(e) = failure {
            // rustls has queued an alert that tells the peer why; send it if we can.
            // (rustls is given what is left of the buffer, as its contract asks: it may still
            // hold places in it.)
            loop {
                let status = conn.process(&mut io.incoming[io.start..]);
                let discard = status.discard;
                let Ok(ConnectionState::EncodeTlsData(mut data)) = status.state else {
                    break;
                };
                let encoded = encode(&mut outgoing, |room| data.encode(room));
                io.start += discard;
                if encoded.is_err() {
                    break;
                }
            }
            let _ = io.write_all(std::mem::take(&mut outgoing)).await;
            return Err(HandshakeError::Refused(Refusal::from_rustls(&e)));
        }
        if transmit {
            // Submitted, not awaited: the read that follows goes in the same batch. The next
            // flight (or the stream's first write) waits for this one, which keeps them in order.
            std::future::poll_fn(|cx| io.poll_flight(cx))
                .await
                .map_err(HandshakeError::Io)?;
            let mut flight = Some(std::mem::take(&mut outgoing));
            std::future::poll_fn(|cx| {
                if let Some(buffer) = flight.take() {
                    io.submit(cx, buffer);
                }
                Poll::Ready(())
            })
            .await;
        }
        // The server reaches WriteTraffic once its own flight is out, before the client's
        // certificate is in: only a finished handshake (both sides authenticated) is done.
        if done && !conn.is_handshaking() {
            return Ok((conn, carried));
        }
        if need_read || done {
            std::future::poll_fn(|cx| io.poll_fill(cx, READ_BUFFER_BYTES))
                .await
                .map_err(HandshakeError::Io)?;
            if io.eof {
                return Err(HandshakeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )));
            }
        }
    }
}

/// Appends what `encode` writes to `outgoing`, growing it to the size rustls asks for.
fn encode(
    outgoing: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), HandshakeError> {
    let start = outgoing.len();
    let mut room = 4096;
    loop {
        outgoing.resize(start + room, 0);
        match encode(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(e)) => room = e.required_size,
            Err(e) => {
                outgoing.truncate(start);
                return Err(HandshakeError::Io(io::Error::other(e.to_string())));
            }
        }
    }
}

/// The socket with its read buffer and its write in flight.
struct Transport {
    fd: RawFd,
    socket: SharedSocket,
    read: Option<ReadOp>,
    /// Bytes received. `incoming[start..]` is not yet opened; what lies before it has been opened
    /// (and, outside `TlsStream::plain`, handed out). Empty while a read is in flight (the
    /// operation owns it).
    incoming: Vec<u8>,
    start: usize,
    read_room: ReadRoom,
    /// The capacity of the buffer the read in flight owns.
    reading_bytes: usize,
    /// The peer's FIN was read.
    eof: bool,
    /// The write in flight, and the buffer it will give back.
    flight: Option<WriteOp>,
    /// The capacity of the buffer the write in flight owns.
    writing_bytes: usize,
    spare: Vec<u8>,
    /// The error of a write that failed, reported by the next call.
    write_error: Option<io::Error>,
}

impl Transport {
    fn new(tcp: TcpStream) -> Transport {
        Transport {
            fd: tcp.as_raw_fd(),
            socket: SharedSocket::new(tcp),
            read: None,
            incoming: Vec::new(),
            start: 0,
            read_room: ReadRoom::default(),
            reading_bytes: 0,
            eof: false,
            flight: None,
            writing_bytes: 0,
            spare: Vec::new(),
            write_error: None,
        }
    }

    /// One read appended to `incoming`, with at least `room` bytes free for it. What lies before
    /// `start` must have been handed out: it may be moved away.
    fn poll_fill(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<()>> {
        if self.read.is_none() {
            if self.start == self.incoming.len() {
                self.incoming.clear();
                self.start = 0;
                // The read in flight holds its buffer while the connection idles: after a short
                // read, a bulk buffer is given back.
                if self.incoming.capacity() > 2 * self.read_room.next {
                    self.incoming = Vec::new();
                }
            }
            let room = room.max(self.read_room.next);
            if self.incoming.capacity() - self.incoming.len() < room {
                if self.start > 0 {
                    self.incoming.copy_within(self.start.., 0);
                    self.incoming.truncate(self.incoming.len() - self.start);
                    self.start = 0;
                }
                self.incoming.reserve_exact(room);
            }
            let buffer = std::mem::take(&mut self.incoming);
            let (begin, end) = (buffer.len(), buffer.capacity());
            self.reading_bytes = end;
            // SAFETY: the stream's only read.
            self.read = Some(unsafe { self.socket.read(SliceMut::new(buffer, begin, end)) });
        }
        let Some(op) = self.read.as_mut() else {
            unreachable!("a read was started above");
        };
        let (result, buffer) = ready!(op.as_mut().poll(cx));
        self.read = None;
        self.reading_bytes = 0;
        self.incoming = buffer.into_inner();
        match result {
            Ok(0) => self.eof = true,
            Ok(n) => self.read_room = self.read_room.after_read(n),
            Err(e) => return Poll::Ready(Err(e)),
        }
        Poll::Ready(Ok(()))
    }

    /// Waits for the write in flight, if any.
    fn poll_flight(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.write_error.take() {
            return Poll::Ready(Err(e));
        }
        let Some(op) = self.flight.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let (result, mut buffer) = ready!(op.as_mut().poll(cx));
        self.flight = None;
        self.writing_bytes = 0;
        let kept_bytes = KEPT_WRITE_BUFFER_BYTES.max(4 * buffer.len());
        buffer.clear();
        if buffer.capacity() > kept_bytes {
            // The writes have gone back to small ones: give the bulk buffers back.
            if self.spare.capacity() > kept_bytes {
                self.spare = Vec::new();
            }
        } else if self.spare.capacity() < buffer.capacity() {
            self.spare = buffer;
        }
        Poll::Ready(result.map(|_| ()))
    }

    /// Starts writing `buffer` (no write may be in flight) and polls it once, so it is submitted
    /// with this tick's batch even if the caller does nothing more.
    fn submit(&mut self, cx: &mut Context<'_>, buffer: Vec<u8>) {
        debug_assert!(self.flight.is_none());
        self.writing_bytes = buffer.capacity();
        // SAFETY: the stream's only write.
        self.flight = Some(unsafe { self.socket.write_all(buffer) });
        if let Poll::Ready(Err(e)) = self.poll_flight(cx) {
            self.write_error = Some(e);
        }
    }

    async fn write_all(&mut self, buffer: Vec<u8>) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flight(cx)).await?;
        if buffer.is_empty() {
            return Ok(());
        }
        // SAFETY: the stream's only write; the one before it has finished.
        let (result, _) = unsafe { self.socket.write_all(buffer) }.await;
        result.map(|_| ())
    }
}

/// See the module's comment.
pub struct TlsStream {
    io: Transport,
    kernel: Kernel,
    peer_certificates: Vec<CertificateDer<'static>>,
    key_exchange_group: Option<&'static dyn SupportedKxGroup>,
    opener: Opener,
    sealer: Sealer,
    records_per_key: u64,
    /// Application data rustls decrypted with the handshake's last flight, handed out first.
    carried: Vec<u8>,
    /// Opened plaintext in `io.incoming` not yet handed out.
    plain: Range<usize>,
    /// Post-handshake handshake messages, gathered across records.
    handshake: Vec<u8>,
    /// The peer sent close_notify: nothing more will be read.
    peer_closed: bool,
    /// A record failed to open or a post-handshake message was refused: the connection is over.
    read_error: Option<(io::ErrorKind, String)>,
    /// The peer asked for a key update: ours goes out before our next record.
    key_update_requested: bool,
    /// Records not yet submitted (a write is in flight), the last perhaps still open.
    staged: Vec<u8>,
    /// Where the application-data record still being filled starts in `staged`: records fill
    /// across writes while a write is in flight, and the open one is sealed when `staged` goes.
    open_record: Option<usize>,
    /// close_notify has been sealed.
    shut: bool,
    /// Our FIN has been sent.
    fin_sent: bool,
}

impl TlsStream {
    fn new<C: Side>(io: Transport, conn: C, carried: Vec<u8>) -> Result<TlsStream, HandshakeError> {
        let peer_certificates = conn
            .peer_certificates()
            .map(|certs| certs.to_vec())
            .unwrap_or_default();
        let key_exchange_group = conn.negotiated_key_exchange_group();
        let (secrets, kernel) = conn
            .into_kernel()
            .map_err(|e| HandshakeError::Refused(Refusal::from_rustls(&e)))?;
        let records_per_key = kernel.records_per_key();
        let cipher = |e: RecordError| HandshakeError::Io(io::Error::other(e));
        Ok(TlsStream {
            opener: Opener::new(secrets.rx.0, &secrets.rx.1).map_err(cipher)?,
            sealer: Sealer::new(secrets.tx.0, &secrets.tx.1, records_per_key).map_err(cipher)?,
            io,
            kernel,
            peer_certificates,
            key_exchange_group,
            records_per_key,
            carried,
            plain: 0..0,
            handshake: Vec::new(),
            peer_closed: false,
            read_error: None,
            key_update_requested: false,
            staged: Vec::new(),
            open_record: None,
            shut: false,
            fin_sent: false,
        })
    }

    /// The certificates the peer presented, its own first.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certificates
    }

    /// The key exchange the handshake used.
    pub fn negotiated_key_exchange_group(&self) -> Option<&'static dyn SupportedKxGroup> {
        self.key_exchange_group
    }

    /// The memory this stream's buffers hold, those lent to the read and write in flight included.
    pub fn buffer_capacity_bytes(&self) -> usize {
        let io = &self.io;
        io.incoming.capacity()
            + io.reading_bytes
            + io.spare.capacity()
            + io.writing_bytes
            + self.staged.capacity()
            + self.carried.capacity()
            + self.handshake.capacity()
    }

    /// Lowers the number of records a key seals before it is updated (the suite's confidentiality
    /// limit is in the millions), so tests can see key updates happen.
    #[doc(hidden)]
    pub fn set_records_per_key(&mut self, records: u64) {
        self.records_per_key = records.max(2);
        self.sealer.set_limit_records(records);
    }

    /// How much more of the record at `io.start` is still to come, once its header is in.
    fn missing_record_bytes(&self) -> usize {
        if self.io.read.is_some() {
            // The read in flight owns the buffer; it was sized when it started.
            return 0;
        }
        let buffered = &self.io.incoming[self.io.start..];
        match buffered {
            [_, _, _, hi, lo, ..] => {
                let record = record::HEADER_BYTES + u16::from_be_bytes([*hi, *lo]) as usize;
                record.saturating_sub(buffered.len())
            }
            _ => 0,
        }
    }

    /// Opens the next record at `io.start`: its plaintext, if application data, becomes `plain`.
    /// `Ok(false)`: not all of it is in yet.
    fn open_next(&mut self) -> Result<bool, (io::ErrorKind, String)> {
        if self.io.read.is_some() {
            // The read in flight owns the buffer.
            return Ok(false);
        }
        let invalid = |e: RecordError| (io::ErrorKind::InvalidData, e.to_string());
        let start = self.io.start;
        let Some(opened) = self
            .opener
            .open(&mut self.io.incoming[start..])
            .map_err(invalid)?
        else {
            return Ok(false);
        };
        self.io.start += opened.record_bytes;
        let content = start + opened.content.start..start + opened.content.end;
        match opened.content_type {
            ContentType::ApplicationData => self.plain = content,
            ContentType::Alert => self.on_alert(content)?,
            ContentType::Handshake => self.on_handshake(content)?,
        }
        Ok(true)
    }

    fn on_alert(&mut self, content: Range<usize>) -> Result<(), (io::ErrorKind, String)> {
        match self.io.incoming[content] {
            // close_notify: the peer's last record.
            [_, 0] => {
                self.peer_closed = true;
                Ok(())
            }
            // user_canceled is a warning that precedes a close_notify.
            [1, 90] => Ok(()),
            [_, description] => Err((
                io::ErrorKind::ConnectionAborted,
                format!("the peer sent TLS alert {description}"),
            )),
            _ => Err((io::ErrorKind::InvalidData, "malformed TLS alert".into())),
        }
    }

    /// Key updates and session tickets, which may arrive at any time after the handshake.
    fn on_handshake(&mut self, content: Range<usize>) -> Result<(), (io::ErrorKind, String)> {
        let refused = |what: String| (io::ErrorKind::InvalidData, what);
        self.handshake.extend_from_slice(&self.io.incoming[content]);
        loop {
            let &[kind, a, b, c, ..] = self.handshake.as_slice() else {
                return Ok(());
            };
            let length = u32::from_be_bytes([0, a, b, c]) as usize;
            if length > MAX_POST_HANDSHAKE_MESSAGE_BYTES {
                return Err(refused(format!(
                    "TLS handshake message of {length} bytes after the handshake"
                )));
            }
            let Some(body) = self.handshake.get(4..4 + length) else {
                return Ok(());
            };
            match kind {
                // new_session_ticket
                4 => self
                    .kernel
                    .new_session_ticket(body)
                    .map_err(|e| refused(e.to_string()))?,
                // key_update: the peer's next record is under its next key.
                24 => {
                    let request = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(refused("malformed TLS key_update".into())),
                    };
                    if self.handshake.len() != 4 + length {
                        return Err(refused(
                            "TLS key_update not at the end of its record".into(),
                        ));
                    }
                    let (seq, secrets) = self
                        .kernel
                        .update_rx()
                        .map_err(|e| refused(e.to_string()))?;
                    self.opener = Opener::new(seq, &secrets).map_err(|e| refused(e.to_string()))?;
                    self.key_update_requested |= request;
                }
                other => {
                    return Err(refused(format!(
                        "unexpected TLS handshake message {other} after the handshake"
                    )))
                }
            }
            self.handshake.drain(..4 + length);
        }
    }

    /// Seals a key update into `staged` when one is due: asked for by the peer, or before this
    /// key's limit. Afterwards at least two records are left: one for the record `append` may
    /// have open, one for the next key update.
    fn update_key_if_due(&mut self) -> io::Result<()> {
        if self.key_update_requested || self.sealer.records_left() < 2 {
            let failed = |e: RecordError| io::Error::other(e);
            self.sealer
                .close(&mut self.staged, &mut self.open_record)
                .map_err(failed)?;
            // key_update, update_not_requested, under the old key; then the new key.
            self.sealer
                .seal(
                    ContentType::Handshake,
                    &[KEY_UPDATE_NOT_REQUESTED],
                    usize::MAX,
                    &mut self.staged,
                )
                .map_err(failed)?;
            let (seq, secrets) = self.kernel.update_tx().map_err(io::Error::other)?;
            self.sealer = Sealer::new(seq, &secrets, self.records_per_key).map_err(failed)?;
            self.key_update_requested = false;
        }
        Ok(())
    }

    /// Appends `parts` (up to `max_bytes`) to `staged` as application data; the last record may
    /// stay open until the staged records are submitted.
    fn seal_data<P: Deref<Target = [u8]>>(
        &mut self,
        parts: &[P],
        max_bytes: usize,
    ) -> io::Result<usize> {
        self.update_key_if_due()?;
        // What this key may still carry, the open record included, keeping one record back for
        // the key update; the caller's next write takes the rest.
        let open_bytes = self
            .open_record
            .map_or(0, |start| self.staged.len() - start - record::HEADER_BYTES);
        let records = usize::try_from(self.sealer.records_left() - 1).unwrap_or(usize::MAX);
        let max_bytes = max_bytes.min(
            records
                .saturating_mul(record::MAX_CONTENT_BYTES)
                .saturating_sub(open_bytes),
        );
        self.sealer
            .append(parts, max_bytes, &mut self.staged, &mut self.open_record)
            .map_err(io::Error::other)
    }

    /// Seals `body` as an alert record, after every byte written before it.
    fn seal_alert(&mut self, body: &[u8]) -> io::Result<()> {
        self.update_key_if_due()?;
        let failed = |e: RecordError| io::Error::other(e);
        self.sealer
            .close(&mut self.staged, &mut self.open_record)
            .map_err(failed)?;
        self.sealer
            .seal(ContentType::Alert, &[body], usize::MAX, &mut self.staged)
            .map_err(failed)?;
        Ok(())
    }

    /// Submits the staged records if no write is in flight.
    fn submit_staged(&mut self, cx: &mut Context<'_>) {
        if self.io.flight.is_none() && !self.staged.is_empty() {
            if let Err(e) = self.sealer.close(&mut self.staged, &mut self.open_record) {
                self.io.write_error = Some(io::Error::other(e));
                return;
            }
            let next = std::mem::take(&mut self.io.spare);
            let staged = std::mem::replace(&mut self.staged, next);
            self.io.submit(cx, staged);
        }
    }

    /// Moves the write side on: once the write in flight is done, the staged records follow it.
    /// Reads call this too, so records a caller wrote without flushing still go out while it
    /// waits for an answer.
    fn drive_writes(&mut self, cx: &mut Context<'_>) {
        if self.io.flight.is_some() {
            match self.io.poll_flight(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    // For the next write to report.
                    self.io.write_error = Some(e);
                    return;
                }
                Poll::Pending => return,
            }
        }
        self.submit_staged(cx);
    }

    fn poll_write_parts<P: Deref<Target = [u8]>>(
        &mut self,
        cx: &mut Context<'_>,
        parts: &[P],
    ) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the TLS stream was shut down",
            )));
        }
        if parts.iter().all(|p| p.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        // Sealed but unsent plaintext is bounded: past the bound, wait for the write in flight.
        while self.staged.len() >= TLS_SEND_BUFFER_BYTES {
            ready!(self.io.poll_flight(cx))?;
            self.submit_staged(cx);
        }
        let room = TLS_SEND_BUFFER_BYTES - self.staged.len();
        let taken = self.seal_data(parts, room)?;
        self.drive_writes(cx);
        Poll::Ready(Ok(taken))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.drive_writes(cx);
        if !this.carried.is_empty() {
            let n = this.carried.len().min(out.remaining());
            out.put_slice(&this.carried[..n]);
            this.carried.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let filled_before = out.filled().len();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(out.remaining());
                out.put_slice(&this.io.incoming[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                if out.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if let Some((kind, message)) = &this.read_error {
                if out.filled().len() > filled_before {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::Error::new(*kind, message.clone())));
            }
            match this.open_next() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    this.read_error = Some(e);
                    continue;
                }
            }
            // Nothing more to open: hand out what we have, or read.
            if out.filled().len() > filled_before {
                return Poll::Ready(Ok(()));
            }
            if this.io.eof {
                if this.io.start == this.io.incoming.len() {
                    // A FIN without close_notify, between records: an end, as h2 sees it.
                    return Poll::Ready(Ok(()));
                }
                this.read_error = Some((
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection in the middle of a TLS record".into(),
                ));
                continue;
            }
            let missing = this.missing_record_bytes();
            ready!(this.io.poll_fill(cx, missing))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_parts(cx, &[data])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        parts: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_parts(cx, parts)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.io.poll_flight(cx))?;
            if this.staged.is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.submit_staged(cx);
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.as_mut().get_mut();
        if !this.shut {
            // close_notify, after every record before it.
            this.seal_alert(CLOSE_NOTIFY)?;
            this.shut = true;
        }
        ready!(self.as_mut().poll_flush(cx))?;
        let this = self.get_mut();
        // Once the peer's FIN is in, the close that follows sends ours after every byte written.
        if !this.fin_sent && !this.io.eof {
            this.fin_sent = true;
            // SAFETY: the descriptor is owned by the socket this stream holds.
            if unsafe { libc::shutdown(this.io.fd, libc::SHUT_WR) } == -1 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::NotConnected {
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}
