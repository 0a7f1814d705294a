//! `shoal-bench load`: the load generator. Closed loop (N connections as fast as they go) or open
//! loop at a fixed rate with latency measured from each request's intended send time (corrected
//! for coordinated omission, as wrk2 does). HTTP/1.1 keep-alive, HTTP/1.1 with a new connection per
//! request, HTTP/2 with N streams per connection, and raw TCP request/response; any of them
//! through a SOCKS5 proxy (ztunnel's 15080). Runs on the runtime's shards, one HDR histogram per
//! shard merged at the end; errors counted by kind; warm-up not counted; bounded by time or by an
//! exact request count.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hdrhistogram::Histogram;
use monoio::io::IntoPollIo;
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;
use serde::Serialize;
use shoal_runtime::{DriverChoice, Runtime, RuntimeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Slowest latency the histogram holds (anything slower is recorded as this).
const LATENCY_MAX_NS: u64 = 60_000_000_000;
/// After a failed connect, a connection waits this long before trying again (no busy loop
/// against a dead target).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// A response head larger than this is a protocol error.
const RESPONSE_HEAD_MAX_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// HTTP/1.1, keep-alive.
    Http1,
    /// HTTP/1.1, a new connection per request (`connection: close`).
    Http1Close,
    /// HTTP/2 (h2c, prior knowledge), `--streams` concurrent streams per connection.
    H2,
    /// Raw TCP: send `--message-bytes`, read as many back (an echo server).
    Tcp,
    /// Raw TCP bulk, one way: each connection writes `--message-bytes` at a time as fast as the
    /// path takes them (a write is a request, timed until the kernel took it) and counts what
    /// comes back; the target echoes or discards.
    TcpBulk,
}

#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// `http://HOST:PORT/PATH` for HTTP, `HOST:PORT` for TCP.
    pub target: String,
    #[arg(long, value_enum, default_value = "http1")]
    pub protocol: Protocol,
    /// Connections, in total.
    #[arg(long, short = 'c', default_value_t = 16)]
    pub connections: usize,
    /// HTTP/2 streams in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Open loop: requests per second in total (spread evenly over connections and streams).
    /// Without it, closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Stop after exactly this many measured requests instead (the duration is then a limit).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured warm-up, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,
    /// A request not answered within this many seconds counts as a timeout.
    #[arg(long, default_value_t = 10.0)]
    pub timeout_s: f64,
    /// Client shards (threads); 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub shards: usize,
    /// Connect through this SOCKS5 proxy (no authentication), as clients of ztunnel's 15080 do.
    #[arg(long)]
    pub socks5: Option<SocketAddr>,
    /// Connect from this local address (a pod's address, so the proxy knows who the client is).
    #[arg(long)]
    pub source_ip: Option<IpAddr>,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Request body size in bytes (sent with content-length).
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// TCP message size in bytes.
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,
    /// Write the JSON report here (`-` for standard output, replacing the table).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub driver: DriverChoice,
}

impl LoadArgs {
    /// A quiet run against `target` with every other setting at the command line's defaults (one
    /// source of truth for them): callers set what they measure.
    pub fn new(target: impl Into<String>) -> LoadArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            load: LoadArgs,
        }
        let target = target.into();
        let mut args = Cli::parse_from(["load", target.as_str()]).load;
        args.quiet = true;
        args
    }
}

/// What is being loaded, resolved once.
#[derive(Clone, Debug)]
struct Target {
    addr: SocketAddr,
    /// Connect from this address (a pod's, so a SOCKS5 proxy such as ztunnel knows the source).
    source: Option<IpAddr>,
    authority: String,
    path: String,
}

fn parse_target(args: &LoadArgs) -> Result<Target, String> {
    let (rest, path) = match args.protocol {
        Protocol::Tcp | Protocol::TcpBulk => {
            (args.target.trim_start_matches("tcp://"), "/".to_string())
        }
        _ => {
            let rest = args.target.strip_prefix("http://").ok_or_else(|| {
                format!(
                    "{:?}: an HTTP target starts with http:// (https is not supported)",
                    args.target
                )
            })?;
            match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].to_string()),
                None => (rest, "/".to_string()),
            }
        }
    };
    let addr = rest
        .to_socket_addrs()
        .map_err(|e| format!("{rest}: {e}"))?
        .next()
        .ok_or_else(|| format!("{rest} resolves to no address"))?;
    Ok(Target {
        addr,
        source: args.source_ip,
        authority: rest.to_string(),
        path,
    })
}

/// Errors by kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Errors {
    pub connect: u64,
    pub reset: u64,
    pub timeout: u64,
    pub protocol: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect + self.reset + self.timeout + self.protocol
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StatusClasses {
    #[serde(rename = "2xx")]
    pub s2xx: u64,
    #[serde(rename = "3xx")]
    pub s3xx: u64,
    #[serde(rename = "4xx")]
    pub s4xx: u64,
    #[serde(rename = "5xx")]
    pub s5xx: u64,
    pub other: u64,
}

/// One shard's tally.
struct Tally {
    latency_ns: Histogram<u64>,
    requests: u64,
    bytes_in: u64,
    bytes_out: u64,
    status: StatusClasses,
    errors: Errors,
}

fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: cannot fail.
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("constant histogram bounds")
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            latency_ns: histogram(),
            requests: 0,
            bytes_in: 0,
            bytes_out: 0,
            status: StatusClasses::default(),
            errors: Errors::default(),
        }
    }
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        let _ = self.latency_ns.add(&o.latency_ns);
        self.requests += o.requests;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.status.s2xx += o.status.s2xx;
        self.status.s3xx += o.status.s3xx;
        self.status.s4xx += o.status.s4xx;
        self.status.s5xx += o.status.s5xx;
        self.status.other += o.status.other;
        self.errors.connect += o.errors.connect;
        self.errors.reset += o.errors.reset;
        self.errors.timeout += o.errors.timeout;
        self.errors.protocol += o.errors.protocol;
    }
}

/// Counters the progress line reads: one writer (the shard), read by the main thread.
#[derive(Default)]
struct Progress {
    requests: AtomicU64,
    errors: AtomicU64,
}

/// How a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Connect,
    Reset,
    Timeout,
    Protocol,
}

fn io_failure(e: &std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::InvalidData => Failure::Protocol,
        std::io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Reset,
    }
}

/// The schedule each request slot (connection or stream) follows.
#[derive(Clone, Copy)]
struct Plan {
    warm_end: Instant,
    end: Instant,
    /// Open loop: the interval between one slot's intended sends.
    interval: Option<Duration>,
    timeout: Duration,
}

/// What a slot does per request: measured or not, and whether to stop.
struct Slot {
    tally: Rc<RefCell<Tally>>,
    progress: Arc<Progress>,
    plan: Plan,
    /// Measured requests this slot still owes (`--requests`); `None` = until the deadline.
    quota: Option<u64>,
    next_intended: Instant,
}

impl Slot {
    fn done(&self) -> bool {
        Instant::now() >= self.plan.end || self.quota == Some(0)
    }

    /// When the next request should start: now (closed loop) or its intended time (open loop),
    /// after waiting for it. Returns the time latency is measured from.
    ///
    /// Open loop: a slot still busy at the intended time (the target answered late) is measured
    /// from that time, which is wrk2's correction for coordinated omission. A slot that was idle
    /// sleeps until then and is measured from when it wakes: the timer's granularity (a
    /// millisecond) is the generator's lateness, not the target's, and counting it would put a
    /// millisecond under every percentile, even a direct connection's.
    async fn next_start(&mut self) -> Instant {
        match self.plan.interval {
            None => Instant::now(),
            Some(interval) => {
                let intended = self.next_intended;
                self.next_intended += interval;
                let now = Instant::now();
                if intended > now {
                    monoio::time::sleep(intended - now).await;
                    Instant::now()
                } else {
                    intended
                }
            }
        }
    }

    fn measuring(&self, started: Instant) -> bool {
        started >= self.plan.warm_end
    }

    fn record(&mut self, started: Instant, status: Option<u16>, bytes_in: u64, bytes_out: u64) {
        if !self.measuring(started) {
            return;
        }
        let mut t = self.tally.borrow_mut();
        let ns = (Instant::now() - started)
            .as_nanos()
            .min(u128::from(LATENCY_MAX_NS)) as u64;
        let _ = t.latency_ns.record(ns.max(1));
        t.requests += 1;
        t.bytes_in += bytes_in;
        t.bytes_out += bytes_out;
        if let Some(code) = status {
            match code / 100 {
                2 => t.status.s2xx += 1,
                3 => t.status.s3xx += 1,
                4 => t.status.s4xx += 1,
                5 => t.status.s5xx += 1,
                _ => t.status.other += 1,
            }
        }
        drop(t);
        if let Some(q) = &mut self.quota {
            *q = q.saturating_sub(1);
        }
        self.progress.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn fail(&mut self, started: Instant, failure: Failure) {
        if !self.measuring(started) {
            return;
        }
        let mut t = self.tally.borrow_mut();
        match failure {
            Failure::Connect => t.errors.connect += 1,
            Failure::Reset => t.errors.reset += 1,
            Failure::Timeout => t.errors.timeout += 1,
            Failure::Protocol => t.errors.protocol += 1,
        }
        drop(t);
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connects (through SOCKS5 when asked).
async fn connect(
    target: &Target,
    socks5: Option<SocketAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let dial = socks5.unwrap_or(target.addr);
    let tcp = match target.source {
        // Bound to a source address: socket2 binds and connects (on loopback the connect completes
        // at once), then the reactor takes the socket.
        Some(source) => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(dial),
                socket2::Type::STREAM,
                None,
            )?;
            // The port is chosen at connect, as for an unbound socket: bind() alone would pick
            // one that is not in TIME_WAIT with anyone, and runs out under a connection per request.
            let on: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own, with a c_int value and its size.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.connect_timeout(&dial.into(), timeout)?;
            socket.set_nonblocking(true)?;
            TcpStream::from_std(socket.into())?
        }
        None => match monoio::time::timeout(timeout, TcpStream::connect(dial)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            }
        },
    };
    let _ = tcp.set_nodelay(true);
    match socks5 {
        None => Ok(tcp),
        Some(_) => socks5_connect(tcp, target.addr).await,
    }
}

/// A blocking connection from `from` (a pod's address, so the proxy knows the client) through
/// the SOCKS5 listener `socks` to `to` (RFC 1928 CONNECT, no authentication), reads timing out
/// after `read_timeout`: for benchmarks' and tests' threads outside any reactor.
pub fn socks5_connect_from(
    socks: SocketAddr,
    from: IpAddr,
    to: std::net::SocketAddrV4,
    read_timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect(&socks.into())?;
    let mut tcp: std::net::TcpStream = socket.into();
    tcp.set_read_timeout(Some(read_timeout))?;
    tcp.write_all(&[5, 1, 0])?;
    let mut reply = [0u8; 2];
    tcp.read_exact(&mut reply)?;
    let mut connect = vec![5, 1, 0, 1];
    connect.extend_from_slice(&to.ip().octets());
    connect.extend_from_slice(&to.port().to_be_bytes());
    tcp.write_all(&connect)?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply)?;
    if reply[1] != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("SOCKS5 proxy answered {} to CONNECT {to}", reply[1]),
        ));
    }
    Ok(tcp)
}

/// RFC 1928 CONNECT without authentication.
pub async fn socks5_connect(tcp: TcpStream, to: SocketAddr) -> std::io::Result<TcpStream> {
    use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
    let mut tcp = tcp;
    let (r, _) = tcp.write_all(vec![5u8, 1, 0]).await;
    r?;
    let (r, reply) = tcp.read_exact(vec![0u8; 2]).await;
    r?;
    if reply != [5, 0] {
        return Err(std::io::Error::other(format!(
            "SOCKS5 proxy refused no-auth: {reply:?}"
        )));
    }
    let mut request = vec![5u8, 1, 0];
    match to.ip() {
        IpAddr::V4(ip) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
    }
    request.extend_from_slice(&to.port().to_be_bytes());
    let (r, _) = tcp.write_all(request).await;
    r?;
    let (r, head) = tcp.read_exact(vec![0u8; 4]).await;
    r?;
    if head[1] != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("SOCKS5 proxy answered {} to CONNECT {to}", head[1]),
        ));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let (r, len) = tcp.read_exact(vec![0u8; 1]).await;
            r?;
            usize::from(len[0]) + 2
        }
        other => {
            return Err(std::io::Error::other(format!(
                "SOCKS5 reply with address type {other}"
            )))
        }
    };
    let (r, _) = tcp.read_exact(vec![0u8; rest]).await;
    r?;
    Ok(tcp)
}

/// The request bytes an HTTP/1.1 slot sends, built once.
fn http1_request(args: &LoadArgs, target: &Target, close: bool) -> Bytes {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: {}\r\nuser-agent: shoal-bench\r\n",
        args.method, target.path, target.authority
    );
    for h in &args.headers {
        let _ = write!(head, "{h}\r\n");
    }
    if args.body_bytes > 0 {
        let _ = write!(head, "content-length: {}\r\n", args.body_bytes);
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', args.body_bytes));
    Bytes::from(bytes)
}

/// Reads one HTTP/1.1 response: its status, the bytes read, and whether the connection can carry
/// another request.
async fn read_http1_response(
    io: &mut TcpStreamPoll,
    buf: &mut BytesMut,
    head_request: bool,
) -> std::io::Result<(u16, u64, bool)> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed mid-response");
    let (status, head_len, length, chunked, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let mut length = None;
                let mut chunked = false;
                let mut close = resp.version == Some(0);
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<u64>().ok());
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = h.value.eq_ignore_ascii_case(b"chunked");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = h.value.eq_ignore_ascii_case(b"close");
                    }
                }
                break (resp.code.unwrap_or(0), n, length, chunked, close);
            }
            Ok(httparse::Status::Partial) if buf.len() > RESPONSE_HEAD_MAX_BYTES => {
                return Err(invalid("response head too large"))
            }
            Ok(httparse::Status::Partial) => {
                if io.read_buf(buf).await? == 0 {
                    return Err(eof());
                }
            }
            Err(e) => return Err(invalid(&format!("bad response: {e}"))),
        }
    };
    buf.advance(head_len);
    let mut read = head_len as u64;
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    if no_body {
        return Ok((status, read, !close));
    }
    if chunked {
        loop {
            let line = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if io.read_buf(buf).await? == 0 {
                    return Err(eof());
                }
            };
            let size = std::str::from_utf8(&buf[..line])
                .ok()
                .and_then(|l| {
                    usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .ok_or_else(|| invalid("bad chunk size"))?;
            buf.advance(line + 2);
            read += line as u64 + 2;
            let mut left = if size == 0 { 2 } else { size + 2 };
            while left > 0 {
                if buf.is_empty() && io.read_buf(buf).await? == 0 {
                    return Err(eof());
                }
                let n = left.min(buf.len());
                buf.advance(n);
                left -= n;
                read += n as u64;
            }
            if size == 0 {
                return Ok((status, read, !close));
            }
        }
    }
    match length {
        Some(mut left) => {
            while left > 0 {
                if buf.is_empty() && io.read_buf(buf).await? == 0 {
                    return Err(eof());
                }
                let n = left.min(buf.len() as u64);
                buf.advance(n as usize);
                left -= n;
                read += n;
            }
            Ok((status, read, !close))
        }
        None => {
            // Delimited by the close.
            loop {
                buf.clear();
                if io.read_buf(buf).await? == 0 {
                    return Ok((status, read, false));
                }
                read += buf.len() as u64;
            }
        }
    }
}

async fn timed<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match monoio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer in time",
        )),
    }
}

/// One HTTP/1.1 connection slot: requests in sequence, reconnecting after a failure or a close.
async fn http1_slot(
    mut slot: Slot,
    target: Target,
    socks5: Option<SocketAddr>,
    request: Bytes,
    close_each: bool,
    head_request: bool,
) {
    let mut conn: Option<(TcpStreamPoll, BytesMut)> = None;
    while !slot.done() {
        let started = slot.next_start().await;
        if conn.is_none() {
            match connect(&target, socks5, slot.plan.timeout)
                .await
                .and_then(|t| t.into_poll_io())
            {
                Ok(io) => conn = Some((io, BytesMut::with_capacity(16 * 1024))),
                Err(_) => {
                    slot.fail(started, Failure::Connect);
                    monoio::time::sleep(RECONNECT_BACKOFF).await;
                    continue;
                }
            }
        }
        let Some((io, buf)) = conn.as_mut() else {
            continue;
        };
        let exchange = timed(slot.plan.timeout, async {
            io.write_all(&request).await?;
            read_http1_response(io, buf, head_request).await
        })
        .await;
        match exchange {
            Ok((status, bytes_in, reusable)) => {
                slot.record(started, Some(status), bytes_in, request.len() as u64);
                if close_each || !reusable {
                    conn = None;
                }
            }
            Err(e) => {
                slot.fail(started, io_failure(&e));
                conn = None;
            }
        }
    }
}

async fn tcp_slot(
    mut slot: Slot,
    target: Target,
    socks5: Option<SocketAddr>,
    message_bytes: usize,
) {
    use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
    let mut conn: Option<TcpStream> = None;
    let mut out = vec![b'x'; message_bytes.max(1)];
    let mut back = vec![0u8; message_bytes.max(1)];
    while !slot.done() {
        let started = slot.next_start().await;
        if conn.is_none() {
            match connect(&target, socks5, slot.plan.timeout).await {
                Ok(tcp) => conn = Some(tcp),
                Err(_) => {
                    slot.fail(started, Failure::Connect);
                    monoio::time::sleep(RECONNECT_BACKOFF).await;
                    continue;
                }
            }
        }
        let Some(tcp) = conn.as_mut() else { continue };
        let result = monoio::time::timeout(slot.plan.timeout, async {
            let (r, o) = tcp.write_all(std::mem::take(&mut out)).await;
            out = o;
            r?;
            let (r, b) = tcp.read_exact(std::mem::take(&mut back)).await;
            back = b;
            r.map(|_| ())
        })
        .await;
        match result {
            Ok(Ok(())) => slot.record(started, None, back.len() as u64, out.len() as u64),
            Ok(Err(e)) => {
                slot.fail(started, io_failure(&e));
                conn = None;
            }
            Err(_) => {
                slot.fail(started, Failure::Timeout);
                conn = None;
                // The cancelled read may have left its buffer with the kernel: start afresh.
                out = vec![b'x'; message_bytes.max(1)];
                back = vec![0u8; message_bytes.max(1)];
            }
        }
    }
}

/// Raw TCP bulk: writes of `chunk_bytes` as fast as the path takes them (or at the open loop's
/// rate), while whatever comes back is counted; a failed connection is replaced.
async fn tcp_bulk_slot(
    mut slot: Slot,
    target: Target,
    socks5: Option<SocketAddr>,
    chunk_bytes: usize,
) {
    use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
    while !slot.done() {
        let started = Instant::now();
        let tcp = match connect(&target, socks5, slot.plan.timeout).await {
            Ok(tcp) => tcp,
            Err(_) => {
                slot.fail(started, Failure::Connect);
                monoio::time::sleep(RECONNECT_BACKOFF).await;
                continue;
            }
        };
        let (mut reader, mut writer) = tcp.into_split();
        let (tally, plan) = (slot.tally.clone(), slot.plan);
        let receive = async move {
            let mut buf = Vec::with_capacity(BULK_READ_BYTES);
            loop {
                let (read, b) = reader.read(buf).await;
                buf = b;
                match read {
                    Ok(n) if n > 0 => {
                        let now = Instant::now();
                        if now >= plan.warm_end && now < plan.end {
                            tally.borrow_mut().bytes_in += n as u64;
                        }
                    }
                    _ => return,
                }
            }
        };
        let send = async {
            let mut chunk = vec![0xa5_u8; chunk_bytes.max(1)];
            while !slot.done() {
                let started = slot.next_start().await;
                match monoio::time::timeout(slot.plan.timeout, writer.write_all(chunk)).await {
                    Ok((Ok(n), c)) => {
                        chunk = c;
                        slot.record(started, None, 0, n as u64);
                    }
                    Ok((Err(e), _)) => {
                        slot.fail(started, io_failure(&e));
                        return;
                    }
                    Err(_) => {
                        // The cancelled write may have left its buffer with the kernel.
                        slot.fail(started, Failure::Timeout);
                        return;
                    }
                }
            }
            let _ = writer.shutdown().await;
        };
        // The target may never close its side: reading stops a moment after the run's end.
        let linger = plan.end.saturating_duration_since(Instant::now()) + BULK_LINGER;
        let _ = monoio::join!(send, monoio::time::timeout(linger, receive));
    }
}

/// What a bulk connection reads at a time.
const BULK_READ_BYTES: usize = 64 * 1024;
/// How long a bulk connection keeps reading after the run's end, for the echo still in flight.
const BULK_LINGER: Duration = Duration::from_millis(500);

/// One HTTP/2 connection with `slots.len()` streams in flight, each following its own schedule.
async fn h2_connection(
    slots: Vec<Slot>,
    target: Target,
    socks5: Option<SocketAddr>,
    request: http::Request<()>,
    body_bytes: usize,
) {
    let mut slots = slots;
    while !slots.iter().all(Slot::done) {
        let started = Instant::now();
        let io = match connect(&target, socks5, slots[0].plan.timeout)
            .await
            .and_then(|t| t.into_poll_io())
        {
            Ok(io) => io,
            Err(_) => {
                if let Some(s) = slots.first_mut() {
                    s.fail(started, Failure::Connect);
                }
                monoio::time::sleep(RECONNECT_BACKOFF).await;
                continue;
            }
        };
        let (send, connection) = match h2::client::Builder::new()
            .initial_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake::<_, Bytes>(io)
            .await
        {
            Ok(pair) => pair,
            Err(_) => {
                if let Some(s) = slots.first_mut() {
                    s.fail(started, Failure::Protocol);
                }
                monoio::time::sleep(RECONNECT_BACKOFF).await;
                continue;
            }
        };
        let driver = monoio::spawn(async move {
            let _ = connection.await;
        });
        let tasks: Vec<_> = slots
            .drain(..)
            .map(|slot| {
                let send = send.clone();
                let request = request.clone();
                monoio::spawn(h2_stream(slot, send, request, body_bytes))
            })
            .collect();
        for t in tasks {
            slots.push(t.await);
        }
        drop(send);
        drop(driver);
    }
}

/// Requests on one stream slot until done or the connection fails; gives the slot back.
async fn h2_stream(
    mut slot: Slot,
    mut send: h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    body_bytes: usize,
) -> Slot {
    let body = Bytes::from(vec![b'x'; body_bytes]);
    while !slot.done() {
        let started = slot.next_start().await;
        let exchange = timed(slot.plan.timeout, async {
            send = send.clone().ready().await.map_err(std::io::Error::other)?;
            let (response, mut stream) = send
                .send_request(request.clone(), body.is_empty())
                .map_err(std::io::Error::other)?;
            if !body.is_empty() {
                stream
                    .send_data(body.clone(), true)
                    .map_err(std::io::Error::other)?;
            }
            let response = response.await.map_err(std::io::Error::other)?;
            let status = response.status().as_u16();
            let mut body_in = response.into_body();
            let mut read = 0u64;
            while let Some(chunk) = body_in.data().await {
                let chunk = chunk.map_err(std::io::Error::other)?;
                read += chunk.len() as u64;
                let _ = body_in.flow_control().release_capacity(chunk.len());
            }
            Ok((status, read))
        })
        .await;
        match exchange {
            Ok((status, read)) => slot.record(started, Some(status), read, body_bytes as u64),
            Err(e) => {
                slot.fail(started, io_failure(&e));
                // The connection may be gone: let the caller reconnect.
                return slot;
            }
        }
    }
    slot
}

/// The whole run's result.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub protocol: Protocol,
    pub connections: usize,
    pub streams: usize,
    pub shards: usize,
    /// `closed` or the open-loop rate.
    pub mode: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub requests: u64,
    pub rps: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency_us: Percentiles,
    pub status: StatusClasses,
    pub errors: Errors,
    /// Every recorded latency bucket: `[value_us, count]`, for tools to rebuild the histogram.
    pub histogram: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Report {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{} {:?} · {} connections{} · {} shards · {} · {:.1} s measured after {:.1} s warm-up",
            self.target,
            self.protocol,
            self.connections,
            if self.protocol == Protocol::H2 {
                format!(" × {} streams", self.streams)
            } else {
                String::new()
            },
            self.shards,
            self.mode,
            self.duration_s,
            self.warmup_s
        );
        let _ = writeln!(
            t,
            "requests  {:>12}   {:>12.1} req/s",
            self.requests, self.rps
        );
        let _ = writeln!(
            t,
            "bytes     in {} · out {}  ({:.1} MB/s in · {:.1} MB/s out)",
            human_bytes(self.bytes_in),
            human_bytes(self.bytes_out),
            self.bytes_in as f64 / self.duration_s.max(1e-9) / 1e6,
            self.bytes_out as f64 / self.duration_s.max(1e-9) / 1e6
        );
        let l = &self.latency_us;
        let _ = writeln!(
            t,
            "latency   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {})",
            us(l.p50),
            us(l.p90),
            us(l.p99),
            us(l.p999),
            us(l.max),
            us(l.mean)
        );
        let s = &self.status;
        if !matches!(self.protocol, Protocol::Tcp | Protocol::TcpBulk) {
            let _ = writeln!(
                t,
                "status    2xx {}  3xx {}  4xx {}  5xx {}  other {}",
                s.s2xx, s.s3xx, s.s4xx, s.s5xx, s.other
            );
        }
        let e = &self.errors;
        let _ = writeln!(
            t,
            "errors    connect {}  reset {}  timeout {}  protocol {}",
            e.connect, e.reset, e.timeout, e.protocol
        );
        t
    }
}

fn us(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.2}s", v / 1e6)
    } else if v >= 1000.0 {
        format!("{:.2}ms", v / 1e3)
    } else {
        format!("{v:.0}µs")
    }
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

/// Slots per shard: `total` spread as evenly as possible.
fn share(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

fn share_u64(total: u64, parts: u64, index: u64) -> u64 {
    total / parts + u64::from(index < total % parts)
}

/// Runs the load and returns the report.
pub fn run(args: &LoadArgs) -> Result<Report, String> {
    run_marked(args, &mut |_| {})
}

/// A moment of a run at which a caller may sample what it measures beside the load (the CPU of
/// the processes under test, say), so that its figures cover the measured window, as the
/// report's requests do, and not the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The warm-up is over: requests completing from now on are counted.
    Measuring,
    /// The measured window is over (its duration has passed, or `--requests` were all made).
    Ended,
}

/// As `run`, also returning how much each of `sample`'s counters grew over the measured window:
/// read at `Mark::Measuring` and at `Mark::Ended` (CPU seconds of the processes under test, say).
pub fn run_sampling<const N: usize>(
    args: &LoadArgs,
    sample: impl Fn() -> [f64; N],
) -> Result<(Report, [f64; N]), String> {
    let (mut at_start, mut at_end) = (None, None);
    let report = run_marked(args, &mut |m| match m {
        Mark::Measuring => at_start = Some(sample()),
        Mark::Ended => at_end = Some(sample()),
    })?;
    match (at_start, at_end) {
        (Some(a), Some(b)) => Ok((report, std::array::from_fn(|i| b[i] - a[i]))),
        _ => Err("the load ended without passing both marks".into()),
    }
}

/// Longest wait between two looks at the shards, the progress line and the marks.
const POLL_MS: u64 = 200;

/// As `run`, calling `mark` at each `Mark` as it is reached (within a millisecond or so), each
/// once and in order, from the calling thread.
pub fn run_marked(args: &LoadArgs, mark: &mut dyn FnMut(Mark)) -> Result<Report, String> {
    let target = parse_target(args)?;
    if args.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let streams = if args.protocol == Protocol::H2 {
        args.streams.max(1)
    } else {
        1
    };
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err("--rate must be a positive number of requests per second".into());
        }
    }
    if !(args.duration_s > 0.0
        && args.duration_s.is_finite()
        && args.warmup_s >= 0.0
        && args.timeout_s > 0.0)
    {
        return Err(
            "--duration-s and --timeout-s must be positive, --warmup-s not negative".into(),
        );
    }
    let shards = if args.shards == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.shards
    }
    .min(args.connections);
    let total_slots = args.connections * streams;
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(total_slots as f64 / r));
    let progress: Vec<Arc<Progress>> = (0..shards).map(|_| Arc::new(Progress::default())).collect();
    let (tx, rx) = mpsc::channel::<Tally>();
    let started_at = Instant::now();
    let warm_end = started_at + Duration::from_secs_f64(args.warmup_s);
    let end = warm_end
        + Duration::from_secs_f64(if args.requests.is_some() {
            args.duration_s.max(3600.0)
        } else {
            args.duration_s
        });
    let plan = Plan {
        warm_end,
        end,
        interval,
        timeout: Duration::from_secs_f64(args.timeout_s),
    };
    let request_bytes_keep = http1_request(args, &target, false);
    let request_bytes_close = http1_request(args, &target, true);
    let mut h2_request = http::Request::builder()
        .method(args.method.as_str())
        .uri(format!("http://{}{}", target.authority, target.path));
    for h in &args.headers {
        if let Some((name, value)) = h.split_once(':') {
            h2_request = h2_request.header(name.trim(), value.trim());
        }
    }
    let h2_request = h2_request.body(()).map_err(|e| format!("request: {e}"))?;
    let args_shared = Arc::new(args.clone());
    let progress_for_shards = progress.clone();
    let config = RuntimeConfig {
        shards,
        driver: args.driver,
        pin: false,
        ..RuntimeConfig::default()
    };
    let rt = Runtime::builder(config)
        .start(move |shard| {
            let tx = tx.clone();
            let args = args_shared.clone();
            let target = target.clone();
            let progress = progress_for_shards[shard.index].clone();
            let (keep, close, h2_request) = (
                request_bytes_keep.clone(),
                request_bytes_close.clone(),
                h2_request.clone(),
            );
            async move {
                let tally = Rc::new(RefCell::new(Tally::default()));
                let connections = share(args.connections, shards, shard.index);
                // Slots numbered across all shards, so `--requests` is split exactly.
                let first_connection: usize = (0..shard.index)
                    .map(|i| share(args.connections, shards, i))
                    .sum();
                let head_request = args.method.eq_ignore_ascii_case("HEAD");
                let mut tasks = Vec::new();
                for c in 0..connections {
                    let mut slots = Vec::new();
                    for s in 0..streams {
                        let index = ((first_connection + c) * streams + s) as u64;
                        // Spread the open-loop starts over one interval so slots do not fire together.
                        let offset = plan.interval.map_or(Duration::ZERO, |i| {
                            i.mul_f64(index as f64 / total_slots as f64)
                        });
                        slots.push(Slot {
                            tally: tally.clone(),
                            progress: progress.clone(),
                            plan,
                            quota: args
                                .requests
                                .map(|n| share_u64(n, total_slots as u64, index)),
                            next_intended: Instant::now() + offset,
                        });
                    }
                    let target = target.clone();
                    let socks5 = args.socks5;
                    tasks.push(match args.protocol {
                        Protocol::Http1 | Protocol::Http1Close => {
                            let close_each = args.protocol == Protocol::Http1Close;
                            let request = if close_each {
                                close.clone()
                            } else {
                                keep.clone()
                            };
                            // One stream per HTTP/1.1 connection: `streams` is 1 but for h2.
                            let Some(slot) = slots.pop() else { continue };
                            monoio::spawn(http1_slot(
                                slot,
                                target,
                                socks5,
                                request,
                                close_each,
                                head_request,
                            ))
                        }
                        Protocol::Tcp => {
                            let Some(slot) = slots.pop() else { continue };
                            monoio::spawn(tcp_slot(slot, target, socks5, args.message_bytes))
                        }
                        Protocol::TcpBulk => {
                            let Some(slot) = slots.pop() else { continue };
                            monoio::spawn(tcp_bulk_slot(slot, target, socks5, args.message_bytes))
                        }
                        Protocol::H2 => monoio::spawn(h2_connection(
                            slots,
                            target,
                            socks5,
                            h2_request.clone(),
                            args.body_bytes,
                        )),
                    });
                }
                for t in tasks {
                    t.await;
                }
                let _ = tx.send(std::mem::take(&mut *tally.borrow_mut()));
            }
        })
        .map_err(|e| e.to_string())?;

    let mut total = Tally::default();
    let mut reported = 0;
    let mut last_line = Instant::now();
    let show_progress = !args.quiet && args.duration_s >= 3.0;
    let (mut last_requests, mut last_at) = (0u64, Instant::now());
    let give_up = end + plan.timeout + Duration::from_secs(30);
    let mut next_mark = Some((warm_end, Mark::Measuring));
    let mut pass_marks = |next_mark: &mut Option<(Instant, Mark)>, all: bool| {
        while let Some((at, m)) = *next_mark {
            if !all && Instant::now() < at {
                break;
            }
            mark(m);
            *next_mark = match m {
                Mark::Measuring => Some((end, Mark::Ended)),
                Mark::Ended => None,
            };
        }
    };
    while reported < shards {
        pass_marks(&mut next_mark, false);
        let wait = next_mark.map_or(Duration::from_millis(POLL_MS), |(at, _)| {
            at.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(POLL_MS))
        });
        match rx.recv_timeout(wait) {
            Ok(t) => {
                total.merge(t);
                reported += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > give_up {
                    return Err("a client shard did not finish".into());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("a client shard stopped".into())
            }
        }
        if show_progress && last_line.elapsed() >= Duration::from_secs(1) {
            let requests: u64 = progress
                .iter()
                .map(|p| p.requests.load(Ordering::Relaxed))
                .sum();
            let errors: u64 = progress
                .iter()
                .map(|p| p.errors.load(Ordering::Relaxed))
                .sum();
            let rate = (requests - last_requests) as f64 / last_at.elapsed().as_secs_f64();
            eprint!(
                "\r  {:>6.1} s  {:>10.0} req/s  {:>10} requests  {:>6} errors   ",
                started_at.elapsed().as_secs_f64(),
                rate,
                requests,
                errors
            );
            (last_requests, last_at, last_line) = (requests, Instant::now(), Instant::now());
        }
    }
    // Every shard is done: the window is over even if its duration is not (`--requests`).
    pass_marks(&mut next_mark, true);
    if show_progress {
        eprintln!();
    }
    let measured_end = Instant::now().min(end);
    rt.begin_drain();
    rt.join();
    let measured = if args.requests.is_some() {
        measured_end.saturating_duration_since(warm_end)
    } else {
        end - warm_end
    };
    let h = &total.latency_ns;
    let q = |v: f64| h.value_at_quantile(v) as f64 / 1000.0;
    let latency_us = if total.requests == 0 {
        Percentiles::default()
    } else {
        Percentiles {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / 1000.0,
            mean: h.mean() / 1000.0,
        }
    };
    Ok(Report {
        target: args.target.clone(),
        protocol: args.protocol,
        connections: args.connections,
        streams,
        shards,
        mode: match args.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_string(),
        },
        duration_s: measured.as_secs_f64(),
        warmup_s: args.warmup_s,
        requests: total.requests,
        rps: total.requests as f64 / measured.as_secs_f64().max(1e-9),
        bytes_in: total.bytes_in,
        bytes_out: total.bytes_out,
        latency_us,
        status: total.status.clone(),
        errors: total.errors.clone(),
        histogram: h
            .iter_recorded()
            .map(|v| (v.value_iterated_to() as f64 / 1000.0, v.count_at_value()))
            .collect(),
    })
}

/// `shoal-bench load`: run, print the table (or JSON), write JSON where asked.
pub fn main(args: &LoadArgs) -> std::io::Result<()> {
    let report = run(args).map_err(std::io::Error::other)?;
    match &args.json {
        Some(path) if path.as_os_str() == "-" => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?
            );
        }
        Some(path) => {
            std::fs::write(
                path,
                serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?,
            )?;
            print!("{}", report.table());
        }
        None => print!("{}", report.table()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for total in [0u64, 1, 7, 100, 1001] {
            for parts in [1u64, 2, 3, 16] {
                let sum: u64 = (0..parts).map(|i| share_u64(total, parts, i)).sum();
                assert_eq!(sum, total);
            }
        }
    }
}
