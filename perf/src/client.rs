//! Echo clients on the runtime's shards: request/response (closed loop, fixed-size messages,
//! round-trip time in an HDR histogram per shard, merged at the end) and bulk (each connection
//! streams as fast as it can while reading the echo back). Warm-up is not counted; every run ends
//! by itself at its deadline.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use shoal_runtime::{DriverChoice, Runtime, RuntimeConfig};

/// Longest round trip the histogram holds: anything slower is recorded as this (and is a failure
/// anyway on loopback).
const RTT_MAX_NS: u64 = 60_000_000_000;
/// Bytes per write in bulk mode: 64 KiB writes capped one stream at ~1.3 GB/s here where 1 MiB
/// writes reach ~5 GB/s, so the client is not what a bulk figure measures.
const BULK_WRITE_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug)]
pub struct Load {
    pub target: SocketAddr,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Client shards (threads).
    pub shards: usize,
    pub driver: DriverChoice,
    /// Pin client shard i to the i-th allowed core (the benchmark keeps a 1-shard server off it).
    pub pin: bool,
}

/// What a request/response run measured.
pub struct RrResult {
    pub requests: u64,
    pub errors: u64,
    pub duration: Duration,
    /// Round-trip times in nanoseconds.
    pub rtt_ns: Histogram<u64>,
}

impl RrResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64()
    }

    pub fn percentile_us(&self, q: f64) -> f64 {
        self.rtt_ns.value_at_quantile(q) as f64 / 1000.0
    }
}

/// What a bulk run measured.
pub struct BulkResult {
    /// Bytes echoed back within the measured window.
    pub bytes: u64,
    pub errors: u64,
    pub duration: Duration,
}

impl BulkResult {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.duration.as_secs_f64() / 1e9
    }
}

fn client_runtime(load: &Load) -> RuntimeConfig {
    RuntimeConfig {
        shards: load.shards.max(1),
        driver: load.driver,
        pin: false,
        ..RuntimeConfig::default()
    }
}

/// Connections per shard: `total` spread as evenly as possible.
fn share(total: usize, shards: usize, index: usize) -> usize {
    total / shards + usize::from(index < total % shards)
}

fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds (1 ns to 60 s, 3 significant digits): this cannot fail.
    Histogram::new_with_bounds(1, RTT_MAX_NS, 3).expect("constant histogram bounds")
}

/// When counting starts (after warm-up) and when connections stop.
#[derive(Clone, Copy)]
struct Window {
    warm_end: Instant,
    end: Instant,
}

impl Window {
    fn starting_now(load: &Load) -> Self {
        let warm_end = Instant::now() + load.warmup;
        Window {
            warm_end,
            end: warm_end + load.duration,
        }
    }
}

/// What one client shard counts; shards' tallies are merged at the end.
trait Tally: Default + Send + 'static {
    fn failed(&mut self);
    fn merge(&mut self, other: Self);
}

struct RrTally {
    requests: u64,
    errors: u64,
    rtt_ns: Histogram<u64>,
}

impl Default for RrTally {
    fn default() -> Self {
        RrTally {
            requests: 0,
            errors: 0,
            rtt_ns: new_histogram(),
        }
    }
}

impl Tally for RrTally {
    fn failed(&mut self) {
        self.errors += 1;
    }

    fn merge(&mut self, other: Self) {
        self.requests += other.requests;
        self.errors += other.errors;
        let _ = self.rtt_ns.add(other.rtt_ns);
    }
}

#[derive(Default)]
struct BulkTally {
    bytes: u64,
    errors: u64,
}

impl Tally for BulkTally {
    fn failed(&mut self) {
        self.errors += 1;
    }

    fn merge(&mut self, other: Self) {
        self.bytes += other.bytes;
        self.errors += other.errors;
    }
}

/// Runs `connection` `load.connections` times, spread over the client shards, each given its
/// shard's tally; a connection that fails counts as an error. Returns the merged tally.
fn on_client_shards<T, F, Fut>(load: &Load, connection: F) -> std::io::Result<T>
where
    T: Tally,
    F: Fn(Rc<RefCell<T>>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + 'static,
{
    let (tx, rx) = mpsc::channel::<T>();
    let shards = load.shards.max(1);
    let connections = load.connections;
    let connection = std::sync::Arc::new(connection);
    let rt = Runtime::builder(client_runtime(load))
        .start(move |shard| {
            let (tx, connection) = (tx.clone(), connection.clone());
            async move {
                let tally = Rc::new(RefCell::new(T::default()));
                let tasks: Vec<_> = (0..share(connections, shards, shard.index))
                    .map(|_| {
                        let (tally, run) = (tally.clone(), connection(tally.clone()));
                        monoio::spawn(async move {
                            if run.await.is_err() {
                                tally.borrow_mut().failed();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await;
                }
                let _ = tx.send(std::mem::take(&mut *tally.borrow_mut()));
            }
        })
        .map_err(std::io::Error::other)?;
    let mut total = T::default();
    for _ in 0..shards {
        let tally = rx
            .recv_timeout(load.warmup + load.duration + Duration::from_secs(30))
            .map_err(|_| std::io::Error::other("a client shard did not report"))?;
        total.merge(tally);
    }
    rt.begin_drain();
    rt.join();
    Ok(total)
}

/// Closed-loop request/response with `message_bytes` messages on `load.connections` connections.
pub fn request_response(load: &Load, message_bytes: usize) -> std::io::Result<RrResult> {
    request_response_mode(load, message_bytes, false)
}

/// As `request_response`, but each request opens its own connection (timed from connect to the
/// answer) and closes it: the new-connection rate.
pub fn request_response_new_connection(
    load: &Load,
    message_bytes: usize,
) -> std::io::Result<RrResult> {
    request_response_mode(load, message_bytes, true)
}

fn request_response_mode(
    load: &Load,
    message_bytes: usize,
    reconnect: bool,
) -> std::io::Result<RrResult> {
    let window = Window::starting_now(load);
    let target = load.target;
    let tally: RrTally = on_client_shards(load, move |tally| {
        rr_connection(target, message_bytes, window, reconnect, tally)
    })?;
    Ok(RrResult {
        requests: tally.requests,
        errors: tally.errors,
        duration: load.duration,
        rtt_ns: tally.rtt_ns,
    })
}

async fn rr_connection(
    target: SocketAddr,
    message_bytes: usize,
    window: Window,
    reconnect: bool,
    tally: Rc<RefCell<RrTally>>,
) -> std::io::Result<()> {
    let Window { warm_end, end } = window;
    let mut stream = None;
    let mut out = vec![0x5a_u8; message_bytes];
    let mut back = vec![0u8; message_bytes];
    loop {
        let sent = Instant::now();
        if sent >= end {
            return Ok(());
        }
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect_addr(target).await?;
                s.set_nodelay(true)?;
                s
            }
        };
        let (written, o) = s.write_all(out).await;
        out = o;
        written?;
        let (read, b) = s.read_exact(back).await;
        back = b;
        read?;
        if sent >= warm_end {
            let rtt_ns = (sent.elapsed().as_nanos() as u64).clamp(1, RTT_MAX_NS);
            let mut tally = tally.borrow_mut();
            let _ = tally.rtt_ns.record(rtt_ns);
            tally.requests += 1;
        }
        if !reconnect {
            stream = Some(s);
        }
    }
}

/// Bulk: every connection writes as fast as it can and reads the echo back.
pub fn bulk(load: &Load) -> std::io::Result<BulkResult> {
    let window = Window::starting_now(load);
    let target = load.target;
    let tally: BulkTally =
        on_client_shards(load, move |tally| bulk_connection(target, window, tally))?;
    Ok(BulkResult {
        bytes: tally.bytes,
        errors: tally.errors,
        duration: load.duration,
    })
}

async fn bulk_connection(
    target: SocketAddr,
    window: Window,
    tally: Rc<RefCell<BulkTally>>,
) -> std::io::Result<()> {
    let Window { warm_end, end } = window;
    let stream = TcpStream::connect_addr(target).await?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let send = async move {
        let mut chunk = vec![0xa5_u8; BULK_WRITE_BYTES];
        while Instant::now() < end {
            let (written, c) = writer.write_all(chunk).await;
            chunk = c;
            written?;
        }
        writer.shutdown().await
    };
    let receive = async move {
        let mut buf = Vec::with_capacity(BULK_WRITE_BYTES);
        loop {
            let (read, b) = reader.read(buf).await;
            buf = b;
            let n = read?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            let now = Instant::now();
            if now >= warm_end && now < end {
                tally.borrow_mut().bytes += n as u64;
            }
        }
    };
    let (sent, received) = monoio::join!(send, receive);
    sent.and(received)
}

/// One-way bulk: every connection only writes (the server discards); counts bytes written within
/// the measured window.
pub fn bulk_send(load: &Load) -> std::io::Result<BulkResult> {
    let window = Window::starting_now(load);
    let target = load.target;
    let tally: BulkTally =
        on_client_shards(load, move |tally| send_connection(target, window, tally))?;
    Ok(BulkResult {
        bytes: tally.bytes,
        errors: tally.errors,
        duration: load.duration,
    })
}

async fn send_connection(
    target: SocketAddr,
    window: Window,
    tally: Rc<RefCell<BulkTally>>,
) -> std::io::Result<()> {
    let Window { warm_end, end } = window;
    let mut stream = TcpStream::connect_addr(target).await?;
    let mut chunk = vec![0xa5_u8; BULK_WRITE_BYTES];
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let (written, c) = stream.write_all(chunk).await;
        chunk = c;
        let n = written?;
        if now >= warm_end {
            tally.borrow_mut().bytes += n as u64;
        }
    }
    stream.shutdown().await
}
