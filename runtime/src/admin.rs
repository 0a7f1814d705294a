//! The admin server shared by the binaries: `/healthz/ready`, `/metrics` (Prometheus text),
//! `/config_dump` and `/memory` (JSON) over HTTP/1.1, and on the admin address `/logging` (the log filter, read
//! and replaced). It runs on its own thread, off the data-plane shards, so a
//! scrape never delays a connection; requests are served one at a time with short timeouts and a
//! size limit, which is plenty for probes and scrapers and bounded against a slow or hostile client.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::counters::{ShardStats, StatsSet};
use crate::listener::BindError;
use crate::shard::{Runtime, ShardInfo};

/// A request head larger than this is refused (431).
pub const ADMIN_REQUEST_HEAD_MAX_BYTES: usize = 16 * 1024;
/// Connections waiting for the admin thread (probes and scrapers, served one at a time).
const ADMIN_BACKLOG: i32 = 128;
/// A client gets this long to send its request and read the answer.
pub const ADMIN_IO_TIMEOUT_MS: u64 = 2_000;

/// What the binary behind the admin server knows.
pub trait AdminSource: Send + Sync + 'static {
    /// `Ok` when ready to take traffic; otherwise what is still pending.
    fn ready(&self) -> Result<(), String>;
    /// The configuration in force, as JSON.
    fn config_dump(&self) -> serde_json::Value;
}

/// A proxy's three servers on one source: admin (everything, localhost by default), metrics
/// (Istio's 15020, for scrapers) and readiness (Istio's 15021, for probes: no metrics). `registry`
/// is called once for each server that serves metrics. With `replace` (`RuntimeConfig::replace`)
/// they listen beside a running instance's, which answer too until it is gone.
pub fn start_proxy_servers(
    admin: SocketAddr,
    metrics: SocketAddr,
    readiness: SocketAddr,
    registry: impl Fn() -> Registry,
    source: Arc<dyn AdminSource>,
    replace: bool,
) -> Result<[AdminServer; 3], BindError> {
    Ok([
        AdminServer::serve(admin, registry(), source.clone(), true, replace)?,
        AdminServer::serve(metrics, registry(), source.clone(), false, replace)?,
        AdminServer::serve(readiness, Registry::default(), source, false, replace)?,
    ])
}

/// A running admin server; stops when dropped.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// The listener, kept to shut it down: that ends the thread's blocking accept.
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks one) and serves until dropped. `registry` holds the binary's
    /// metrics; add the runtime's with `RuntimeCollector`.
    pub fn start(
        addr: SocketAddr,
        registry: Registry,
        source: Arc<dyn AdminSource>,
    ) -> Result<Self, BindError> {
        Self::serve(addr, registry, source, false, false)
    }

    /// As `start`, and also `/logging`, which reads and changes the process's log filter: for the
    /// admin address (localhost by default), never for the ports scrapers and probes reach.
    pub fn start_control(
        addr: SocketAddr,
        registry: Registry,
        source: Arc<dyn AdminSource>,
    ) -> Result<Self, BindError> {
        Self::serve(addr, registry, source, true, false)
    }

    fn serve(
        addr: SocketAddr,
        registry: Registry,
        source: Arc<dyn AdminSource>,
        control: bool,
        shared: bool,
    ) -> Result<Self, BindError> {
        let err = |cause| BindError {
            name: "admin".into(),
            addr,
            cause,
        };
        let listener = bind(addr, shared).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let kept = listener.try_clone().map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("shoal-admin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        if let Err(e) = serve_one(conn, &registry, source.as_ref(), control) {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    }
                }
            })
            .map_err(err)?;
        Ok(AdminServer {
            addr,
            stop,
            listener: kept,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept so the thread sees the flag. Shutting the listener down ends
        // it at once; connecting to it would not do when the port is shared with another
        // instance, whose listener the kernel may pick.
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown on a socket this value owns (a duplicate of the thread's listener).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A blocking listener on `addr`, with SO_REUSEPORT so that a replacement can listen beside it.
/// Unless `shared`, the address is first bound once without it, so that a port someone holds is
/// refused rather than shared (as `ListenerSpec::claim` does for the shards' listeners). Port 0
/// is bound plainly: no replacement can name it, and a port picked, let go and bound again could
/// be taken in between.
fn bind(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    if !shared {
        let probe = TcpListener::bind(addr)?;
        if addr.port() == 0 {
            return Ok(probe);
        }
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(ADMIN_BACKLOG)?;
    Ok(socket.into())
}

fn serve_one(
    mut conn: TcpStream,
    registry: &Registry,
    source: &dyn AdminSource,
    control: bool,
) -> io::Result<()> {
    let timeout = Some(Duration::from_millis(ADMIN_IO_TIMEOUT_MS));
    conn.set_read_timeout(timeout)?;
    conn.set_write_timeout(timeout)?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, path) = loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                break (method, path);
            }
            Ok(httparse::Status::Partial) if head.len() < ADMIN_REQUEST_HEAD_MAX_BYTES => continue,
            Ok(httparse::Status::Partial) => {
                return respond(&mut conn, 431, "text/plain", b"request head too large\n");
            }
            Err(e) => {
                return respond(
                    &mut conn,
                    400,
                    "text/plain",
                    format!("bad request: {e}\n").as_bytes(),
                )
            }
        }
    };
    let (path, query) = path.split_once('?').unwrap_or((&path, ""));
    if control && path == "/logging" {
        return logging(&mut conn, &method, query);
    }
    if method != "GET" && method != "HEAD" {
        return respond(&mut conn, 405, "text/plain", b"only GET\n");
    }
    match path {
        "/healthz/ready" => match source.ready() {
            Ok(()) => respond(&mut conn, 200, "text/plain", b"ready\n"),
            Err(pending) => respond(
                &mut conn,
                500,
                "text/plain",
                format!("not ready: {pending}\n").as_bytes(),
            ),
        },
        "/metrics" | "/stats/prometheus" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => respond(
                    &mut conn,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.as_bytes(),
                ),
                Err(_) => respond(&mut conn, 500, "text/plain", b"metrics encoding failed\n"),
            }
        }
        "/config_dump" => {
            let body = serde_json::to_vec_pretty(&source.config_dump()).unwrap_or_default();
            respond(&mut conn, 200, "application/json", &body)
        }
        "/memory" => {
            let body = serde_json::to_vec_pretty(&crate::memory::report()).unwrap_or_default();
            respond(&mut conn, 200, "application/json", &body)
        }
        _ => respond(
            &mut conn,
            404,
            "text/plain",
            b"not found: try /healthz/ready, /metrics, /config_dump, /memory\n",
        ),
    }
}

/// `GET /logging`: the log filter in force. `POST /logging?level=SPEC`: replace it, as Istio's
/// ztunnel does (`SPEC` in `SHOAL_LOG`'s syntax or Istio's `target:level`, percent-encoded).
fn logging(conn: &mut TcpStream, method: &str, query: &str) -> io::Result<()> {
    match method {
        "GET" | "HEAD" => match crate::logging::current_filter() {
            Some(f) => respond(
                conn,
                200,
                "text/plain",
                format!("log filter: {f}\n").as_bytes(),
            ),
            None => respond(
                conn,
                500,
                "text/plain",
                b"this process's log is not set up\n",
            ),
        },
        "POST" => {
            let level = query.split('&').find_map(|kv| kv.strip_prefix("level="));
            let Some(level) = level.map(percent_decode) else {
                return respond(conn, 400, "text/plain", b"POST /logging?level=SPEC\n");
            };
            match crate::logging::set_filter(&level) {
                Ok(f) => {
                    tracing::warn!(filter = %f, "log filter changed through /logging");
                    respond(
                        conn,
                        200,
                        "text/plain",
                        format!("log filter: {f}\n").as_bytes(),
                    )
                }
                Err(e) => respond(conn, 400, "text/plain", format!("{e}\n").as_bytes()),
            }
        }
        _ => respond(conn, 405, "text/plain", b"GET or POST\n"),
    }
}

/// A query value: `+` is a space, `%2C` a comma.
fn percent_decode(value: &str) -> String {
    percent_encoding::percent_decode_str(&value.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn respond(conn: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

/// The runtime's own metrics, per shard, read from the shards' counters at scrape time.
#[derive(Debug)]
pub struct RuntimeCollector {
    stats: StatsSet,
    shards: Vec<ShardInfo>,
}

impl RuntimeCollector {
    pub fn new(runtime: &Runtime) -> Self {
        RuntimeCollector {
            stats: runtime.stats(),
            shards: runtime.shards().to_vec(),
        }
    }
}

type Read64 = fn(&ShardStats) -> u64;

const COUNTERS: &[(&str, &str, Read64)] = &[
    ("shoal_connections_accepted", "Connections accepted.", |s| {
        s.connections_accepted.get()
    }),
    ("shoal_accept_errors", "Accept calls that failed.", |s| {
        s.accept_errors.get()
    }),
    (
        "shoal_task_panics",
        "Connection tasks that panicked (a bug); the shard survived.",
        |s| s.task_panics.get(),
    ),
    (
        "shoal_buffers_small_exhausted",
        "Small buffers wanted while at the cap.",
        |s| s.small_buffers.exhausted.get(),
    ),
    (
        "shoal_buffers_large_exhausted",
        "Large buffers wanted while at the cap.",
        |s| s.large_buffers.exhausted.get(),
    ),
    (
        "shoal_buffers_small_allocated",
        "Small buffers allocated from the heap.",
        |s| s.small_buffers.allocated.get(),
    ),
    (
        "shoal_buffers_large_allocated",
        "Large buffers allocated from the heap.",
        |s| s.large_buffers.allocated.get(),
    ),
];

const GAUGES: &[(&str, &str, Read64)] = &[
    ("shoal_connections_active", "Connections open now.", |s| {
        s.connections_active.get()
    }),
    (
        "shoal_config_version",
        "Snapshot version the shard derives its state from.",
        |s| s.config_version.get(),
    ),
    (
        "shoal_buffers_small_in_use",
        "Small buffers on loan.",
        |s| s.small_buffers.in_use.get(),
    ),
    (
        "shoal_buffers_small_high_water",
        "Most small buffers on loan at once.",
        |s| s.small_buffers.high_water.get(),
    ),
    (
        "shoal_buffers_large_in_use",
        "Large buffers on loan.",
        |s| s.large_buffers.in_use.get(),
    ),
    (
        "shoal_buffers_large_high_water",
        "Most large buffers on loan at once.",
        |s| s.large_buffers.high_water.get(),
    ),
];

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels: Vec<[(&str, String); 3]> = self
            .shards
            .iter()
            .map(|s| {
                [
                    ("shard", s.index.to_string()),
                    ("driver", s.driver.to_string()),
                    ("sched_policy", s.sched_policy.to_string()),
                ]
            })
            .collect();
        for (name, help, read) in COUNTERS {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (stats, labels) in self.stats.shards().iter().zip(&labels) {
                ConstCounter::new(read(stats)).encode(family.encode_family(labels)?)?;
            }
        }
        for (name, help, read) in GAUGES {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for (stats, labels) in self.stats.shards().iter().zip(&labels) {
                let value = i64::try_from(read(stats)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ready;

    impl AdminSource for Ready {
        fn ready(&self) -> Result<(), String> {
            Ok(())
        }
        fn config_dump(&self) -> serde_json::Value {
            serde_json::json!({})
        }
    }

    fn ask(addr: SocketAddr, method: &str, path: &str) -> String {
        let mut conn = TcpStream::connect(addr).expect("connect");
        write!(
            conn,
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
        )
        .expect("send");
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        answer
    }

    #[test]
    fn only_the_admin_address_serves_logging() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let plain = AdminServer::start(any, Registry::default(), Arc::new(Ready)).expect("start");
        let control =
            AdminServer::start_control(any, Registry::default(), Arc::new(Ready)).expect("start");
        let (plain, control) = (plain.local_addr(), control.local_addr());
        assert!(ask(plain, "POST", "/logging?level=debug").starts_with("HTTP/1.1 405"));
        assert!(ask(plain, "GET", "/logging").starts_with("HTTP/1.1 404"));
        // This test process never set its log up: the admin address says so and takes no filter.
        assert!(ask(control, "GET", "/logging").starts_with("HTTP/1.1 500"));
        let answer = ask(control, "POST", "/logging");
        assert!(answer.contains("POST /logging?level=SPEC"), "{answer}");
        assert!(ask(control, "POST", "/logging?level=debug").starts_with("HTTP/1.1 400"));
        assert!(ask(control, "PUT", "/logging").starts_with("HTTP/1.1 405"));
        assert!(ask(control, "GET", "/healthz/ready").starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn memory_reports_the_process_and_its_allocator() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let admin = AdminServer::start(any, Registry::default(), Arc::new(Ready)).expect("start");
        let answer = ask(admin.local_addr(), "GET", "/memory");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let report: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert!(report["rss_bytes"].as_u64() > Some(0), "{report}");
        assert!(report["rss_anon_bytes"].as_u64() > Some(0), "{report}");
        assert!(
            report["allocator"]["in_use_bytes"].as_u64() > Some(0),
            "{report}"
        );
    }

    #[test]
    fn query_values_are_percent_decoded() {
        for (raw, value) in [
            ("debug", "debug"),
            ("warn%2Caccess%3Ainfo", "warn,access:info"),
            ("a+b", "a b"),
            ("100%", "100%"),
        ] {
            assert_eq!(percent_decode(raw), value, "{raw}");
        }
    }
}
