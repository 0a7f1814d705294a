//! The two HBONE nodes the tunnel benchmark measures, each its own process on runtime shards:
//! `server` terminates mTLS + HTTP/2 CONNECT and connects to the authority; `outbound` accepts
//! plain TCP and tunnels each connection to a fixed upstream through the server, on pooled HBONE
//! connections. (The ztunnel binary builds its real inbound and outbound paths on the same parts.)

use std::future::poll_fn;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use monoio::net::TcpStream;
use shoal_hbone::ca::{CertificateAuthority, LocalCa};
use shoal_hbone::certs::WorkloadCerts;
use shoal_hbone::client::Connection;
use shoal_hbone::connect::{Baggage, InboundConnect, OutboundConnect};
use shoal_hbone::pool::{Pool, PoolKey};
use shoal_hbone::tls::{self, Trust};
use shoal_hbone::tunnel::{copy_tcp_tunnel, Tunnel};
use shoal_hbone::{server, stream, Identity};
use shoal_runtime::{ListenerSpec, Runtime, RuntimeArgs, RuntimeConfig};

pub const SERVER_IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/server";
pub const CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/client";
const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, clap::ValueEnum)]
pub enum Role {
    Server,
    Outbound,
    /// One stream from memory to a `--sink` server at `--hbone`, for `--duration-s` seconds;
    /// prints what it carried and exits (the figure `bench hbone` reports as the tunnel alone).
    Source,
}

#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    #[arg(long, value_enum)]
    pub role: Role,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The CA directory (`shoalctl ca init`).
    #[arg(long)]
    pub ca: PathBuf,
    /// Outbound only: the HBONE server to tunnel through.
    #[arg(long)]
    pub hbone: Option<SocketAddr>,
    /// Outbound only: the address every tunnel asks for.
    #[arg(long)]
    pub upstream: Option<SocketAddr>,
    /// Outbound only: a new HBONE connection (TLS and HTTP/2 handshakes) for every tunnel, to
    /// measure the new-tunnel rate.
    #[arg(long)]
    pub no_pool: bool,
    /// Server only: take every CONNECT and discard what it carries (no upstream), so a stream
    /// measures the tunnel alone.
    #[arg(long)]
    pub sink: bool,
    /// Source only: measured seconds, after a half-second warm-up.
    #[arg(long, default_value_t = 5)]
    pub duration_s: u64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: &NodeArgs) -> Result<(), String> {
    let ca = Arc::new(LocalCa::load(&args.ca).map_err(|e| e.to_string())?);
    let trust = Trust::new(&ca.roots(), "cluster.local").map_err(|e| e.to_string())?;
    let server_id = Identity::parse(SERVER_IDENTITY).map_err(|e| e.to_string())?;
    let client_id = Identity::parse(CLIENT_IDENTITY).map_err(|e| e.to_string())?;
    let config = RuntimeConfig::from(&args.runtime);
    let spec = ListenerSpec::new("node", args.listen);
    let runtime = match args.role {
        Role::Server => {
            let certs =
                WorkloadCerts::issue(ca, server_id, CERT_LIFETIME).map_err(|e| e.to_string())?;
            let server_tls =
                Arc::new(tls::server_config(certs, &trust).map_err(|e| e.to_string())?);
            let sink = args.sink;
            Runtime::builder(config).listener(spec).start(move |shard| {
                let server_tls = server_tls.clone();
                async move {
                    for listener in shard.take_listeners() {
                        shard
                            .serve(listener, |tcp, _| {
                                let (server_tls, drain) =
                                    (server_tls.clone(), shard.drain().clone());
                                async move {
                                    let Ok((tls, peer)) = stream::accept(tcp, server_tls).await
                                    else {
                                        return;
                                    };
                                    let goaway = async move { drain.wait().await };
                                    let _ = if sink {
                                        server::serve(tls, peer, discard, goaway).await
                                    } else {
                                        server::serve(tls, peer, inbound, goaway).await
                                    };
                                }
                            })
                            .await;
                    }
                }
            })
        }
        Role::Source => return run_source(args),
        Role::Outbound => {
            let hbone = args
                .hbone
                .ok_or("--hbone is required for the outbound role")?;
            let upstream = args
                .upstream
                .ok_or("--upstream is required for the outbound role")?;
            let no_pool = args.no_pool;
            let certs = WorkloadCerts::issue(ca, client_id.clone(), CERT_LIFETIME)
                .map_err(|e| e.to_string())?;
            let client_tls = Arc::new(
                tls::client_config(certs, &trust, vec![server_id.clone()])
                    .map_err(|e| e.to_string())?,
            );
            Runtime::builder(config).listener(spec).start(move |shard| {
                let client_tls = client_tls.clone();
                let key = PoolKey::new(client_id.clone(), vec![server_id.clone()], hbone, None);
                async move {
                    let tls = client_tls.clone();
                    let pool = Pool::new(move |_key| Ok(client_tls.clone()));
                    for listener in shard.take_listeners() {
                        shard
                            .serve(listener, |tcp, client| {
                                let (pool, key, tls) = (pool.clone(), key.clone(), tls.clone());
                                async move {
                                    let request = OutboundConnect {
                                        authority: upstream,
                                        client,
                                        service_host: None,
                                        baggage: Baggage {
                                            namespace: Some("bench".into()),
                                            ..Baggage::default()
                                        },
                                        trace: ([1; 16], [2; 8]),
                                    };
                                    if no_pool {
                                        let tunnel =
                                            match Connection::connect(hbone, tls.clone()).await {
                                                Ok(conn) => conn.open(&request).await,
                                                Err(e) => Err(e),
                                            };
                                        if let Ok(tunnel) = tunnel {
                                            let _ = copy_tcp_tunnel(tcp, tunnel).await;
                                        }
                                    } else if let Ok(pooled) = pool.open(&key, &request).await {
                                        let _guard = pooled.guard;
                                        let _ = copy_tcp_tunnel(tcp, pooled.tunnel).await;
                                    }
                                }
                            })
                            .await;
                    }
                }
            })
        }
    }
    .map_err(|e| e.to_string())?;
    runtime.handle_signals().map_err(|e| e.to_string())?;
    crate::process::announce_ready(&runtime, None);
    runtime.join();
    Ok(())
}

/// `--role source`: one stream to a `--sink` server; prints its rate and the sender's CPU.
fn run_source(args: &NodeArgs) -> Result<(), String> {
    let hbone = args
        .hbone
        .ok_or("--hbone is required for the source role")?;
    let r = tunnel_stream(
        hbone,
        &args.ca,
        Duration::from_millis(500),
        Duration::from_secs(args.duration_s),
    )?;
    println!(
        "{:.0} MB/s, sender CPU {:.3} s/GiB",
        r.bytes as f64 / r.seconds.max(1e-9) / 1e6,
        r.sender_cpu_s / (r.bytes as f64 / (1u64 << 30) as f64).max(1e-9)
    );
    Ok(())
}

async fn inbound(connect: InboundConnect, responder: server::Responder) {
    match TcpStream::connect_addr(connect.authority).await {
        Ok(upstream) => {
            let _ = upstream.set_nodelay(true);
            if let Ok(tunnel) = responder.accept() {
                let _ = copy_tcp_tunnel(upstream, tunnel).await;
            }
        }
        Err(_) => responder.refuse(http::StatusCode::SERVICE_UNAVAILABLE),
    }
}

/// The sink: accepts the tunnel, reads it to its end releasing the window as it goes, then ends
/// its own side so the source knows everything arrived.
async fn discard(_connect: InboundConnect, responder: server::Responder) {
    let Ok(Tunnel { mut send, mut recv }) = responder.accept() else {
        return;
    };
    while let Some(Ok(chunk)) = recv.data().await {
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// The bench client's TLS: the client identity, expecting the server's.
fn client_config(ca_dir: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca = Arc::new(LocalCa::load(ca_dir).map_err(|e| e.to_string())?);
    let trust = Trust::new(&ca.roots(), "cluster.local").map_err(|e| e.to_string())?;
    let server_id = Identity::parse(SERVER_IDENTITY).map_err(|e| e.to_string())?;
    let client_id = Identity::parse(CLIENT_IDENTITY).map_err(|e| e.to_string())?;
    let certs = WorkloadCerts::issue(ca, client_id, CERT_LIFETIME).map_err(|e| e.to_string())?;
    let config = tls::client_config(certs, &trust, vec![server_id]).map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

/// A CONNECT for the sink, which connects nowhere: the authority is never dialled.
fn sink_request() -> OutboundConnect {
    OutboundConnect {
        authority: SocketAddr::from(([127, 0, 0, 1], 9)),
        client: SocketAddr::from(([127, 0, 0, 1], 1)),
        service_host: None,
        baggage: Baggage::default(),
        trace: ([1; 16], [2; 8]),
    }
}

/// What one tunnel stream carried from memory to a sink.
#[derive(Clone, Copy, Debug)]
pub struct StreamResult {
    pub bytes: u64,
    pub seconds: f64,
    /// CPU of the sending side (the HBONE client: HTTP/2 framing, TLS, TCP), seconds.
    pub sender_cpu_s: f64,
}

/// Bytes handed to HTTP/2 at a time by the source: slices of one shared buffer, so the source
/// itself copies nothing.
const SOURCE_CHUNK_BYTES: usize = 1024 * 1024;

/// One HBONE stream from memory to a `--sink` server at `hbone`, on its own thread and reactor:
/// the tunnel alone (HTTP/2 framing, mTLS, one TCP connection), without TCP legs at either end.
/// Bytes sent after `warmup` count; the time runs until the sink confirms the end of the stream.
pub fn tunnel_stream(
    hbone: SocketAddr,
    ca_dir: &std::path::Path,
    warmup: Duration,
    duration: Duration,
) -> Result<StreamResult, String> {
    let config = client_config(ca_dir)?;
    on_own_reactor(move || send_for(hbone, config, warmup, duration))
}

/// Runs the future `make` builds on a thread and reactor of its own (as a shard would), and
/// returns its result.
fn on_own_reactor<T, F, Fut>(make: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    shoal_runtime::memory::keep_freed_buffers();
    let thread = std::thread::spawn(move || {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(make())
    });
    thread
        .join()
        .map_err(|_| "the benchmark client's thread panicked".to_string())?
}

async fn send_for(
    hbone: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    warmup: Duration,
    duration: Duration,
) -> Result<StreamResult, String> {
    let conn = Connection::connect(hbone, config)
        .await
        .map_err(|e| e.to_string())?;
    let request = sink_request();
    let Tunnel { mut send, mut recv } = conn.open(&request).await.map_err(|e| e.to_string())?;
    let source = Bytes::from(vec![0xa5_u8; SOURCE_CHUNK_BYTES]);
    let start = Instant::now();
    let (warm_end, end) = (start + warmup, start + warmup + duration);
    let mut counted = 0u64;
    let mut cpu_at_warm_end = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= warm_end && cpu_at_warm_end.is_none() {
            cpu_at_warm_end = Some((now, thread_cpu_seconds()));
        }
        send.reserve_capacity(SOURCE_CHUNK_BYTES);
        let granted = match send.capacity() {
            0 => match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the sink closed the stream".into()),
            },
            n => n,
        };
        let n = granted.min(SOURCE_CHUNK_BYTES);
        if n == 0 {
            continue;
        }
        send.send_data(source.slice(..n), false)
            .map_err(|e| e.to_string())?;
        if cpu_at_warm_end.is_some() {
            counted += n as u64;
        }
    }
    send.send_data(Bytes::new(), true)
        .map_err(|e| e.to_string())?;
    // The sink ends its side once it has read everything.
    while let Some(chunk) = recv.data().await {
        chunk.map_err(|e| e.to_string())?;
    }
    let (t0, cpu0) = cpu_at_warm_end.ok_or("the run ended before its warm-up did")?;
    Ok(StreamResult {
        bytes: counted,
        seconds: t0.elapsed().as_secs_f64(),
        sender_cpu_s: thread_cpu_seconds() - cpu0,
    })
}

/// Reads a plain TCP sink asks for at most: the tunnel's TLS stream grows its read room to this.
const TCP_SINK_READ_BYTES: usize = shoal_runtime::stream::MAX_READ_ROOM_BYTES;

/// One plain TCP stream from memory into a sink that discards what it reads, each on a thread and
/// reactor of its own, written and read as the tunnel's TLS stream writes and reads its socket
/// (1 MiB writes from one buffer; reads of up to 256 KiB). What the kernel alone costs the
/// tunnel's sender per byte, beside which `tunnel_stream`'s sender adds the sealing.
pub fn tcp_stream(warmup: Duration, duration: Duration) -> Result<StreamResult, String> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("sink: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let sink = std::thread::spawn(move || -> Result<u64, String> {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let listener =
                monoio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            let (mut tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let (mut buf, mut read) = (Vec::with_capacity(TCP_SINK_READ_BYTES), 0u64);
            loop {
                let (r, b) = monoio::io::AsyncReadRent::read(&mut tcp, buf).await;
                buf = b;
                match r.map_err(|e| e.to_string())? {
                    0 => return Ok(read),
                    n => read += n as u64,
                }
                buf.clear();
            }
        })
    });
    let sent = on_own_reactor(move || async move {
        use monoio::io::AsyncWriteRentExt;
        let mut tcp = TcpStream::connect_addr(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut source = vec![0xa5_u8; SOURCE_CHUNK_BYTES];
        let start = Instant::now();
        let (warm_end, end) = (start + warmup, start + warmup + duration);
        let (mut counted, mut cpu_at_warm_end) = (0u64, None);
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if cpu_at_warm_end.is_none() && now >= warm_end {
                cpu_at_warm_end = Some((now, thread_cpu_seconds()));
            }
            let (r, b) = tcp.write_all(source).await;
            source = b;
            let n = r.map_err(|e| e.to_string())?;
            if cpu_at_warm_end.is_some() {
                counted += n as u64;
            }
        }
        monoio::io::AsyncWriteRent::shutdown(&mut tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (t0, cpu0) = cpu_at_warm_end.ok_or("the run ended before its warm-up did")?;
        // The CPU is the sender's alone, up to its last write; the time runs until the sink has
        // read everything, as the tunnel's does.
        Ok((counted, t0, thread_cpu_seconds() - cpu0))
    });
    if sent.is_err() {
        // The sink may still wait in accept: one connection, closed at once, ends it.
        let _ = std::net::TcpStream::connect(addr);
    }
    let read = sink
        .join()
        .map_err(|_| "the TCP sink's thread panicked".to_string())??;
    let (bytes, t0, sender_cpu_s) = sent?;
    if read < bytes {
        return Err(format!(
            "the TCP sink read {read} bytes of the {bytes} counted"
        ));
    }
    Ok(StreamResult {
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
        sender_cpu_s,
    })
}

/// How long it takes to open a tunnel: a CONNECT stream on a connection already up (request sent
/// → 200 read), and a whole new HBONE connection (TCP, mTLS and HTTP/2 handshakes, then the
/// CONNECT), each timed one after another against a `--sink` server.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct SetupLatency {
    pub stream_p50_us: f64,
    pub stream_p99_us: f64,
    /// Streams opened per second, one at a time on one connection.
    pub streams_per_s: f64,
    pub connection_p50_us: f64,
    pub connection_p99_us: f64,
}

/// Opens `streams` streams on one connection, then `connections` new connections with one stream
/// each, one at a time, against the `--sink` server at `hbone`; each stream is ended at once.
pub fn setup_latency(
    hbone: SocketAddr,
    ca_dir: &std::path::Path,
    streams: usize,
    connections: usize,
) -> Result<SetupLatency, String> {
    let config = client_config(ca_dir)?;
    on_own_reactor(move || time_setups(hbone, config, streams, connections))
}

async fn time_setups(
    hbone: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    streams: usize,
    connections: usize,
) -> Result<SetupLatency, String> {
    let new_histogram = || {
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())
    };
    let (mut stream_ns, mut connection_ns) = (new_histogram()?, new_histogram()?);
    let request = sink_request();
    let conn = Connection::connect(hbone, config.clone())
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    for _ in 0..streams {
        let t = Instant::now();
        let mut tunnel = conn.open(&request).await.map_err(|e| e.to_string())?;
        let _ = stream_ns.record(t.elapsed().as_nanos() as u64);
        let _ = tunnel.send.send_data(Bytes::new(), true);
    }
    let streams_per_s = streams as f64 / started.elapsed().as_secs_f64().max(1e-9);
    for _ in 0..connections {
        let t = Instant::now();
        let conn = Connection::connect(hbone, config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let mut tunnel = conn.open(&request).await.map_err(|e| e.to_string())?;
        let _ = connection_ns.record(t.elapsed().as_nanos() as u64);
        let _ = tunnel.send.send_data(Bytes::new(), true);
    }
    let us = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(SetupLatency {
        stream_p50_us: us(&stream_ns, 0.5),
        stream_p99_us: us(&stream_ns, 0.99),
        streams_per_s,
        connection_p50_us: us(&connection_ns, 0.5),
        connection_p99_us: us(&connection_ns, 0.99),
    })
}

/// CPU seconds the calling thread has used.
pub(crate) fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
