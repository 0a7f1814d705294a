//! The request path. A CONNECT from a ztunnel opens a tunnel for one client connection; inside it,
//! HTTP/1.1 or HTTP/2 (declared by the service port, or told apart by HTTP/2's preface), and each
//! request goes through the phases in order, each able to answer early:
//!
//! classify (which bound service) → authorize (L7 policy) → route (HTTPRoute, weights) →
//! endpoint (round robin over ready ones) → filters → forward (HBONE to the endpoint's node) →
//! record (metrics and one access-log line, once the response's last byte has gone).
//!
//! A service port declared TCP is carried as bytes to an endpoint (L4 through the waypoint).

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use rustc_hash::FxHashMap;
use shoal_control::resources::HeaderModifier;
use shoal_control::routes::Filter;
use shoal_control::snapshot::{
    LabelSource, Protocol, Snapshot, WaypointId, Workload, WorkloadKind,
};
use shoal_control::traffic::{self, ClusterPolicy, RetryPolicy, TryOutcome};
use shoal_hbone::connect::InboundConnect;
use shoal_hbone::server::Responder;
use shoal_hbone::Identity;
use shoal_runtime::logging::OrDash;
use shoal_runtime::{Shard, ShardView, Versioned};

use crate::body::{ProxyBody, Recorded, Replay};
use crate::cluster::{Clusters, Permit};
use crate::decide::{self, Decision, Http, Local, Peer};
use crate::io::{copy_bidirectional, copy_bidirectional_tallied, ShardExec, ShardTimer, TunnelIo};
use crate::metrics::{HttpLabels, HttpSeries, ShardMetrics, UNKNOWN};
use crate::ratelimit::ShardLimiter;
use crate::upstream::{Dial, UpstreamError, Upstreams, Wire};
use http_body::Body as _;

/// Limits a user may change (`WaypointArgs`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive whole within this long (slow-header floods are cut); also the
    /// longest a kept-alive HTTP/1.1 connection may idle between requests (hyper times both).
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(60),
        }
    }
}
/// At most this many header fields in one request head (431 beyond). It is hyper's default, and
/// is left to hyper rather than set: hyper given any `max_headers` builds its two 100-slot parse
/// arrays on the heap and fills them for every request it parses (about 1,700 instructions a
/// request), where its default keeps them on the stack, untouched.
pub const MAX_HEADERS: usize = 100;
/// A request head larger than this is refused (431).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 header list limit, the same budget.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// HTTP/2 streams one downstream connection may have open.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// HTTP/2's client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub type Current = Arc<Versioned<Snapshot>>;

/// What this process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A waypoint serving the Gateway `(namespace, name)`.
    Waypoint { gateway: (String, String) },
    /// A classic sidecar beside the pod `(namespace, name)`: plaintext from its app out (SOCKS5),
    /// HBONE from peers' sidecars in.
    Sidecar { pod: (String, String) },
}

/// Which side of which proxy a downstream connection arrived on; it decides the phases a request
/// goes through and the `reporter` of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Into a waypoint: classify, authorize, route, forward.
    Waypoint,
    /// From a sidecar's app: route, forward to a peer's sidecar.
    SidecarOutbound,
    /// Into a sidecar from a peer: authorize, forward to the app.
    SidecarInbound,
}

impl Side {
    fn reporter(self) -> &'static str {
        match self {
            Side::Waypoint => "waypoint",
            Side::SidecarOutbound => "source",
            Side::SidecarInbound => "destination",
        }
    }
}

/// A shard's traffic-management state: its clusters and its handle on the node's rate limits.
pub struct Traffic {
    pub clusters: Clusters,
    pub rate_limits: ShardLimiter,
}

/// A shard's state for the request path, built on the shard.
pub struct Ctx {
    pub shard: Rc<Shard>,
    pub view: Rc<ShardView<Snapshot, Current>>,
    pub role: Role,
    pub upstreams: Rc<Upstreams>,
    pub metrics: Arc<ShardMetrics>,
    pub limits: Limits,
    /// Load balancing, circuit breakers and outlier ejections per upstream cluster.
    pub clusters: Clusters,
    /// Local rate limits, shared with the other shards.
    pub rate_limits: ShardLimiter,
    /// For clusters without a DestinationRule (one value, so they never look changed).
    default_policy: Arc<ClusterPolicy>,
    /// For routes that say nothing about retries.
    default_retries: RetryPolicy,
    /// `own_id`'s answer and the snapshot version it is for.
    own: Cell<(u64, Option<u32>)>,
    /// This shard's series by compact key, cleared when the snapshot changes (ids are per
    /// snapshot).
    series: RefCell<(u64, FxHashMap<SeriesKey, Arc<HttpSeries>>)>,
    rng: Cell<u64>,
    round_robin: Cell<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    reporter: &'static str,
    source: Option<u32>,
    principal: Rc<str>,
    destination: Option<u32>,
    service: Option<u32>,
    protocol: &'static str,
    code: u16,
    flag: &'static str,
}

impl Ctx {
    pub fn new(
        shard: Rc<Shard>,
        view: Rc<ShardView<Snapshot, Current>>,
        role: Role,
        upstreams: Rc<Upstreams>,
        metrics: Arc<ShardMetrics>,
        limits: Limits,
        traffic: Traffic,
    ) -> Self {
        let seed = (Instant::now().elapsed().as_nanos() as u64)
            ^ (shard.index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ std::process::id() as u64;
        let index = shard.index;
        Ctx {
            shard,
            view,
            role,
            upstreams,
            metrics,
            limits,
            clusters: traffic.clusters,
            rate_limits: traffic.rate_limits,
            default_policy: Arc::new(ClusterPolicy::default()),
            default_retries: RetryPolicy::mesh_default(),
            own: Cell::new((u64::MAX, None)),
            series: RefCell::new((u64::MAX, FxHashMap::default())),
            rng: Cell::new(seed | 1),
            round_robin: Cell::new(index),
        }
    }

    pub fn snapshot(&self) -> Rc<Current> {
        self.view.current()
    }

    /// This proxy's own id in the current snapshot — its waypoint's, or its sidecar pod's — found
    /// once per snapshot version.
    fn own_id(&self, current: &Current) -> Option<u32> {
        let (version, id) = self.own.get();
        if version == current.version {
            return id;
        }
        let s = &current.value;
        let id = match &self.role {
            Role::Waypoint {
                gateway: (ns, name),
            } => s
                .waypoints
                .iter()
                .position(|w| &w.namespace == ns && &w.name == name),
            Role::Sidecar { pod: (ns, name) } => s
                .workloads
                .iter()
                .position(|w| &w.namespace == ns && &w.name == name),
        }
        .map(|i| i as u32);
        self.own.set((current.version, id));
        id
    }

    fn waypoint_id(&self, current: &Current) -> Option<WaypointId> {
        matches!(self.role, Role::Waypoint { .. })
            .then(|| self.own_id(current))
            .flatten()
    }

    /// The sidecar's pod in the current snapshot.
    fn pod_id(&self, current: &Current) -> Option<u32> {
        matches!(self.role, Role::Sidecar { .. })
            .then(|| self.own_id(current))
            .flatten()
    }

    /// xorshift64: weights, request ids, trace ids. Not for secrets.
    fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x
    }

    fn next(&self) -> usize {
        let i = self.round_robin.get();
        self.round_robin.set(i.wrapping_add(1));
        i
    }

    fn trace(&self) -> ([u8; 16], [u8; 8]) {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&self.random().to_be_bytes());
        t[8..].copy_from_slice(&self.random().to_be_bytes());
        (t, self.random().to_be_bytes())
    }

    fn request_id(&self) -> String {
        uuid_v4(self.random(), self.random())
    }

    fn series(
        &self,
        version: u64,
        key: SeriesKey,
        labels: impl FnOnce(&SeriesKey) -> HttpLabels,
    ) -> Arc<HttpSeries> {
        let mut cache = self.series.borrow_mut();
        if cache.0 != version {
            *cache = (version, FxHashMap::default());
        }
        if let Some(s) = cache.1.get(&key) {
            return s.clone();
        }
        let s = self.metrics.series(labels(&key));
        cache.1.insert(key, s.clone());
        s
    }
}

/// Who is on the other end of one downstream tunnel.
struct Downstream {
    side: Side,
    authority: SocketAddr,
    peer: Identity,
    principal: Rc<str>,
    client: SocketAddr,
}

// ------------------------------------------------------------------ accept

/// Serves one CONNECT to the waypoint.
pub async fn tunnel(
    ctx: Rc<Ctx>,
    connect: InboundConnect,
    responder: Responder,
    peer_addr: SocketAddr,
) {
    let current = ctx.snapshot();
    let client = connect.client.unwrap_or(peer_addr);
    let Some(waypoint) = ctx.waypoint_id(&current) else {
        tracing::warn!(role = ?ctx.role, "this waypoint's Gateway is not in the configuration; refusing");
        responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    // classify: a bound service's VIP (its port's protocol), else a bound pod addressed directly
    // (sniffed as HTTP)
    let protocol = match decide::classify(&current.value, waypoint, connect.authority) {
        Ok(t) => t.protocol,
        Err(_)
            if decide::classify_workload(&current.value, waypoint, connect.authority).is_some() =>
        {
            Protocol::Unknown
        }
        Err(e) => {
            tracing::info!(target: "access", direction = "waypoint", src.addr = %client, src.identity = %connect.peer, dst.addr = %connect.authority, error = %e, "CONNECT refused");
            responder.refuse(StatusCode::BAD_REQUEST);
            return;
        }
    };
    let Ok(tunnel) = responder.accept() else {
        return;
    };
    let mut io = TunnelIo::new(tunnel);
    let down = Rc::new(Downstream {
        side: Side::Waypoint,
        authority: connect.authority,
        principal: Rc::from(connect.peer.principal()),
        peer: connect.peer,
        client,
    });
    let wire = match protocol {
        Protocol::Tcp | Protocol::Tls => {
            drop(current);
            return l4(ctx, down, io).await;
        }
        // Every HTTP port takes either version from the client, as Envoy's codec does on a
        // waypoint (HTTP/2 with prior knowledge to an `http` port; HTTP/1.1 to an `http2` one). The
        // port's declared protocol decides what the endpoint is spoken to in.
        Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::Unknown => {
            match io.peek().await {
                Ok(first) if is_h2_preface(first) => Wire::Http2,
                Ok(_) => Wire::Http1,
                Err(_) => return,
            }
        }
    };
    drop(current);
    serve_http(ctx, down, io, wire).await;
}

/// Serves one CONNECT from a peer's sidecar (or ztunnel) to this sidecar's pod.
pub async fn sidecar_inbound(
    ctx: Rc<Ctx>,
    connect: InboundConnect,
    responder: Responder,
    peer_addr: SocketAddr,
) {
    let current = ctx.snapshot();
    let ours = ctx.pod_id(&current).is_some_and(|id| {
        current
            .value
            .workload(id)
            .ips
            .contains(&connect.authority.ip())
    });
    drop(current);
    if !ours {
        tracing::info!(target: "access", direction = "inbound", src.identity = %connect.peer, dst.addr = %connect.authority, "CONNECT refused: not this pod's address");
        responder.refuse(StatusCode::BAD_REQUEST);
        return;
    }
    let Ok(tunnel) = responder.accept() else {
        return;
    };
    let mut io = TunnelIo::new(tunnel);
    let down = Rc::new(Downstream {
        side: Side::SidecarInbound,
        authority: connect.authority,
        principal: Rc::from(connect.peer.principal()),
        peer: connect.peer,
        client: connect.client.unwrap_or(peer_addr),
    });
    let wire = match io.peek().await {
        Ok(first) if is_h2_preface(first) => Wire::Http2,
        Ok(_) => Wire::Http1,
        Err(_) => return,
    };
    serve_http(ctx, down, io, wire).await;
}

/// A connection from the sidecar's app through SOCKS5, which names the service it dials: HTTP to
/// that service, routed here and carried over HBONE to the chosen endpoint's sidecar. SOCKS5 only
/// reaches the mesh's services.
pub async fn sidecar_outbound_socks5(
    ctx: Rc<Ctx>,
    mut tcp: monoio::net::TcpStream,
    client: SocketAddr,
) {
    use shoal_runtime::socks5::{self, reply, Destination};
    let destination = match socks5::accept(&mut tcp).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%client, error = %e, "SOCKS5 refused");
            return;
        }
    };
    let current = ctx.snapshot();
    let destination = match destination {
        Destination::Addr(a) => Some(a),
        Destination::Name(name, port) => current
            .value
            .service_by_host(&name)
            .and_then(|s| s.vips.first())
            .map(|vip| SocketAddr::new(*vip, port)),
    };
    let Some(destination) =
        destination.filter(|d| decide::service_target(&current.value, *d).is_some())
    else {
        socks5::answer(&mut tcp, reply::HOST_UNREACHABLE).await;
        tracing::info!(target: "access", direction = "outbound", src.addr = %client, "refused: not a service of the mesh");
        return;
    };
    drop(current);
    socks5::answer(&mut tcp, reply::SUCCEEDED).await;
    sidecar_outbound(ctx, tcp, client, destination).await;
}

/// A connection from the sidecar's app that iptables redirected here (Istio's 15001): HTTP to a
/// service of the mesh, as through SOCKS5; any other destination passes through as plain TCP, as
/// Istio's sidecar does under its default outbound policy, ALLOW_ANY. `own`: the listener's
/// address, if fixed.
pub async fn sidecar_outbound_redirect(
    ctx: Rc<Ctx>,
    tcp: monoio::net::TcpStream,
    client: SocketAddr,
    own: Option<SocketAddr>,
) {
    let Some(destination) = shoal_runtime::capture::redirected_destination(&tcp, own) else {
        tracing::info!(target: "access", direction = "outbound", src.addr = %client, "refused: not redirected (no original destination)");
        return;
    };
    let to_mesh = decide::service_target(&ctx.snapshot().value, destination).is_some();
    if to_mesh {
        sidecar_outbound(ctx, tcp, client, destination).await;
    } else {
        passthrough(&ctx, tcp, client, destination).await;
    }
}

/// Plain TCP to a destination outside the mesh, logged as Istio's PassthroughCluster (not a request
/// of the mesh, so not in the request metrics).
async fn passthrough(
    ctx: &Ctx,
    tcp: monoio::net::TcpStream,
    client: SocketAddr,
    destination: SocketAddr,
) {
    let started = std::time::Instant::now();
    let connected =
        shoal_runtime::copy::connect_within(destination, crate::upstream::CONNECT_TIMEOUT).await;
    let upstream = match connected {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(target: "access", direction = "outbound", src.addr = %client, dst.addr = %destination, error = %e, "passthrough: connect failed");
            return;
        }
    };
    let (report, result) = shoal_runtime::copy_bidirectional(tcp, upstream, ctx.shard.pool()).await;
    tracing::info!(
        target: "access",
        direction = "outbound",
        src.addr = %client,
        dst.addr = %destination,
        upstream_cluster = "PassthroughCluster",
        bytes_sent = report.a_to_b_bytes,
        bytes_received = report.b_to_a_bytes,
        duration_ms = started.elapsed().as_millis() as u64,
        error = result.err().map(|e| e.to_string()),
        "passthrough"
    );
}

/// HTTP from the sidecar's app to `destination`, a service of the mesh: routed here and carried
/// over HBONE to the chosen endpoint's sidecar.
async fn sidecar_outbound(
    ctx: Rc<Ctx>,
    tcp: monoio::net::TcpStream,
    client: SocketAddr,
    destination: SocketAddr,
) {
    let mut io = shoal_runtime::stream::CompletionStream::new(tcp);
    let source = ctx.upstreams.source().clone();
    let down = Rc::new(Downstream {
        side: Side::SidecarOutbound,
        authority: destination,
        principal: Rc::from(source.principal()),
        peer: source,
        client,
    });
    // HTTP/2 if the app opens with its preface (prior knowledge), else HTTP/1.1; the port's
    // declared protocol decides what the endpoint is spoken to in.
    let decided = |b: &[u8]| b.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(b);
    let wire = match monoio::time::timeout(ctx.limits.header_read_timeout, io.peek(decided)).await {
        Ok(Ok(first)) if !first.is_empty() => {
            if is_h2_preface(first) {
                Wire::Http2
            } else {
                Wire::Http1
            }
        }
        _ => return,
    };
    let io = crate::io::TokioIo(io);
    serve_http_plain(ctx, down, crate::io::ShardLocal(io), wire).await;
}

/// Runs a downstream connection until it ends; once the shard drains, it is asked to finish
/// gracefully (HTTP/1.1: after the exchange in flight; HTTP/2: GOAWAY) and then awaited.
macro_rules! until_drained {
    ($conn:expr, $drain:expr) => {{
        let conn = $conn;
        let mut conn = std::pin::pin!(conn);
        monoio::select! {
            r = conn.as_mut() => r,
            _ = $drain.wait() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// hyper's HTTP/1.1 server with the waypoint's limits.
fn http1_server(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(ShardTimer)
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
}

/// hyper's HTTP/2 server with the waypoint's limits.
fn http2_server() -> http2::Builder<ShardExec> {
    let mut builder = http2::Builder::new(ShardExec);
    builder
        .timer(ShardTimer)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    builder
}

/// As `serve_http`, on a plain TCP connection from the app (upgrades included: the socket is
/// the shard's own, hence `ShardLocal`).
async fn serve_http_plain<I>(ctx: Rc<Ctx>, down: Rc<Downstream>, io: I, wire: Wire)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let drain = ctx.shard.drain().clone();
    let service = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |req| handle(ctx.clone(), down.clone(), req))
    };
    let result = match wire {
        Wire::Http1 => until_drained!(
            http1_server(&ctx.limits)
                .serve_connection(io, service)
                .with_upgrades(),
            drain
        ),
        Wire::Http2 => until_drained!(http2_server().serve_connection(io, service), drain),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "app connection ended with an error");
    }
}

/// Whether the first bytes are (the start of) HTTP/2's preface.
fn is_h2_preface(first: &[u8]) -> bool {
    let n = first.len().min(H2_PREFACE.len());
    n > 0 && first[..n] == H2_PREFACE[..n]
}

async fn serve_http(ctx: Rc<Ctx>, down: Rc<Downstream>, io: TunnelIo, wire: Wire) {
    let drain = ctx.shard.drain().clone();
    let service = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |req| handle(ctx.clone(), down.clone(), req))
    };
    let result = match wire {
        Wire::Http1 => until_drained!(
            http1_server(&ctx.limits)
                .serve_connection(io, service)
                .with_upgrades(),
            drain
        ),
        Wire::Http2 => until_drained!(http2_server().serve_connection(io, service), drain),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "downstream HTTP connection ended with an error");
    }
}

/// A random (version 4) UUID from 128 random bits, as Envoy makes `x-request-id`. Written digit by
/// digit: one per request, and `write!` with width specifiers cost about 1,500 instructions.
fn uuid_v4(a: u64, b: u64) -> String {
    let mut id = [b'-'; 36];
    hex_digits(&mut id[0..8], a >> 32);
    hex_digits(&mut id[9..13], (a >> 16) & 0xffff);
    id[14] = b'4';
    hex_digits(&mut id[15..18], a & 0xfff);
    hex_digits(&mut id[19..23], (b >> 48) & 0x3fff | 0x8000);
    hex_digits(&mut id[24..36], b & 0xffff_ffff_ffff);
    String::from_utf8(id.to_vec()).unwrap_or_default()
}

/// `value`'s lowest `out.len()` hex digits, lowercase, most significant first.
fn hex_digits(out: &mut [u8], value: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let last = out.len() - 1;
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = HEX[((value >> (4 * (last - i))) & 0xf) as usize];
    }
}

// ------------------------------------------------------------------ one request

/// What is known about a request for its record.
struct Record {
    started: Instant,
    version: u64,
    method: Method,
    path: String,
    protocol: &'static str,
    authority: String,
    request_id: String,
    upstream: Option<SocketAddr>,
    flag: &'static str,
    details: String,
    request_bytes: Rc<Cell<u64>>,
    source: Option<u32>,
    destination: Option<u32>,
    service: Option<u32>,
    /// A fault delay held it up (flag DI).
    delayed: bool,
    /// Its place under the cluster's limits, given back when the record is made.
    hold: Option<Permit>,
}

async fn handle(
    ctx: Rc<Ctx>,
    down: Rc<Downstream>,
    mut req: Request<Incoming>,
) -> Result<Response<Recorded>, Infallible> {
    let current = ctx.snapshot();
    let snapshot = &current.value;
    let protocol = match req.version() {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let host = request_host(&req);
    let request_id = match req.headers().get(&X_REQUEST_ID) {
        Some(v) => v.to_str().unwrap_or_default().to_string(),
        None => {
            let id = ctx.request_id();
            if let Ok(v) = HeaderValue::from_str(&id) {
                req.headers_mut().insert(X_REQUEST_ID, v);
            }
            id
        }
    };
    let mut rec = Record {
        started: Instant::now(),
        version: current.version,
        method: req.method().clone(),
        // As Envoy's %REQ(:PATH)% and %REQ(:AUTHORITY)%: the query and the port as sent.
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        protocol,
        authority: raw_authority(&req).unwrap_or("-").to_string(),
        request_id,
        upstream: None,
        flag: "-",
        details: String::new(),
        request_bytes: Rc::new(Cell::new(0)),
        source: snapshot.workload_id_by_ip(down.client.ip()),
        destination: None,
        service: None,
        delayed: false,
        hold: None,
    };
    // classify → authorize → route, as the side this request arrived on asks
    let (target, forward) = match plan(&ctx, &current, &down, &req, host.as_deref(), &mut rec) {
        Ok(Plan::Route { target, forward }) => (target, forward),
        Ok(Plan::App) => return Ok(to_address(&ctx, &down, rec, req, host.as_deref(), None).await),
        Ok(Plan::Pod(id)) => {
            let identity = current.value.workload(id).spiffe.clone().ok();
            return Ok(to_address(&ctx, &down, rec, req, host.as_deref(), identity).await);
        }
        Err(l) => return Ok(local(&ctx, &down, rec, l)),
    };
    // local rate limit of the service addressed
    if let Some(limit) = snapshot.rate_limits.get(&target.service) {
        if !ctx.rate_limits.admit(limit, &down.principal) {
            return Ok(local(
                &ctx,
                &down,
                rec,
                reply(429, "RL", "local_rate_limited"),
            ));
        }
    }
    let backend = snapshot.service(forward.service);

    // filters
    let mut response_headers: Vec<&HeaderModifier> = Vec::new();
    // Copies for RequestMirror that wait for the request's body.
    let mut mirrors: Vec<Mirror> = Vec::new();
    if let Some(rule) = forward.rule {
        for f in &rule.filters {
            match f {
                Filter::RequestHeaders(m) => modify_headers(req.headers_mut(), m),
                Filter::ResponseHeaders(m) => response_headers.push(m),
                Filter::Rewrite { hostname, path } => {
                    if let Some(h) = hostname {
                        if let Ok(v) = HeaderValue::from_str(h) {
                            req.headers_mut().insert(header::HOST, v);
                        }
                    }
                    if let Some(m) = path {
                        let prefix = matched_prefix_for(snapshot, &target, &req);
                        let new_path = decide::rewrite_path(req.uri().path(), m, prefix.as_deref());
                        let pq = match req.uri().query() {
                            Some(q) => format!("{new_path}?{q}"),
                            None => new_path,
                        };
                        if let Ok(uri) = Uri::builder().path_and_query(pq).build() {
                            *req.uri_mut() = uri;
                        }
                    }
                }
                Filter::Mirror { backend, percent } => {
                    if ctx.random() % 100 < u64::from(*percent) {
                        let port = backend.port.unwrap_or(forward.port);
                        let copy = backend
                            .service
                            .and_then(|s| Mirror::prepare(&ctx, &down, snapshot, s, port, &req));
                        // A body is sent once the exchange has read it (see below).
                        match copy {
                            Some(copy) if req.body().is_end_stream() => copy.send(None),
                            Some(copy) => mirrors.push(copy),
                            None => {}
                        }
                    }
                }
                // Redirects were decided in `route`.
                Filter::Redirect { .. } => {}
            }
        }
    }

    // the cluster: its DestinationRule policy and this shard's state for it
    let policy = snapshot
        .cluster_policy(forward.service, forward.port, forward.subset_name)
        .unwrap_or(&ctx.default_policy);
    let cluster = ctx.clusters.get(
        current.version,
        &backend.hostname,
        forward.port,
        forward.subset_name,
        policy,
    );
    let Some(permit) = cluster.admit() else {
        return Ok(local(
            &ctx,
            &down,
            rec,
            reply(503, "UO", "upstream_overflow: too many requests"),
        ));
    };

    // faults: a delay, then an abort
    if let Some(fault) = forward.rule.and_then(|r| r.fault.as_ref()) {
        if let Some(d) = &fault.delay {
            if traffic::fault_hits(d.percent, ctx.random()) {
                monoio::time::sleep(d.fixed).await;
                rec.delayed = true;
            }
        }
        if let Some(a) = &fault.abort {
            if traffic::fault_hits(a.percent, ctx.random()) {
                return Ok(local(
                    &ctx,
                    &down,
                    rec,
                    reply(a.status, "FI", "fault_filter_abort"),
                ));
            }
        }
    }

    let mut candidates = decide::endpoints(snapshot, forward.service, forward.port, forward.subset);
    // A ServiceEntry resolved by DNS: its endpoints' host names, or its own host.
    if let Some((hosts, first_only, target)) = decide::dns_targets(backend, forward.port) {
        let mut failure = None;
        for name in hosts {
            match ctx
                .upstreams
                .dns_cache
                .resolve(&ctx.upstreams.dns, name)
                .await
            {
                Ok(addrs) => {
                    let take = if first_only { 1 } else { addrs.len() };
                    candidates.extend(addrs.iter().take(take).map(|ip| decide::Endpoint {
                        workload: None,
                        addr: SocketAddr::new(*ip, target),
                        hbone: false,
                    }));
                }
                Err(e) => failure = Some(e),
            }
        }
        if candidates.is_empty() {
            let details = format!("dns_resolution_failed: {}", failure.unwrap_or_default());
            return Ok(local(&ctx, &down, rec, reply(503, "UF", &details)));
        }
    }
    if candidates.is_empty() {
        return Ok(local(
            &ctx,
            &down,
            rec,
            reply(503, "UH", "no_healthy_upstream"),
        ));
    }
    // The name originated TLS asks for, unless the DestinationRule gives `sni`: the request's
    // host, or the service's when the app addressed it by IP (an IP is no certificate's name).
    let tls_name = host
        .as_deref()
        .filter(|h| {
            h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_err()
        })
        .unwrap_or(backend.hostname.as_str());
    let (hash, set_cookie) = {
        let headers = req.headers();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let http = Http {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            host: host.as_deref(),
            header: &header,
        };
        decide::hash_key(&policy.load_balancer, &http, down.client.ip(), ctx.random())
    };

    // forward: one try, and more as the retry policy allows
    let port_protocol = backend
        .ports
        .iter()
        .find(|p| p.port == forward.port)
        .map_or(Protocol::Unknown, |p| p.protocol);
    let wire = match port_protocol {
        Protocol::Http2 | Protocol::Grpc => Wire::Http2,
        Protocol::Http => Wire::Http1,
        _ if req.version() == Version::HTTP_2 => Wire::Http2,
        _ => Wire::Http1,
    };
    let downstream_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let upstream_req = match prepare_upstream(
        req,
        wire,
        host.as_deref(),
        &backend.hostname,
        rec.request_bytes.clone(),
    ) {
        Ok(r) => r,
        Err(e) => return Ok(local(&ctx, &down, rec, reply(400, "-", &e))),
    };
    let retries = forward
        .rule
        .and_then(|r| r.retries.as_ref())
        .unwrap_or(&ctx.default_retries);
    let (head, body) = upstream_req.into_parts();
    // An upgrade's body is the connection itself: it is never replayed. A body to mirror is kept
    // as a retry's would be.
    let mut bodies =
        if (retries.attempts == 0 && mirrors.is_empty()) || downstream_upgrade.is_some() {
            TryBodies::Once(Some(body))
        } else if body.is_end_stream() {
            TryBodies::Empty
        } else {
            TryBodies::Replay(Replay::new(body))
        };
    let request_timeout = forward.rule.and_then(|r| r.request_timeout);
    let per_try_timeout = retries
        .per_try_timeout
        .or(forward.rule.and_then(|r| r.backend_request_timeout));
    let deadline = request_timeout.map(|t| Instant::now() + t);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut tries = 0u32;
    let mut _retrying = None;
    let (sent, exhausted) = loop {
        let Some(endpoint) = cluster.pick(&candidates, hash, &tried, ctx.random()) else {
            return Ok(local(
                &ctx,
                &down,
                rec,
                reply(503, "UH", "no_healthy_upstream"),
            ));
        };
        rec.destination = snapshot.workload_id_by_ip(endpoint.addr.ip());
        rec.upstream = Some(endpoint.addr);
        permit.on_endpoint(endpoint.addr);
        // Over HBONE to an endpoint in the mesh: through its node's ztunnel, or to its own sidecar
        // (in sidecar mode every pod has one); plain TCP to an endpoint outside the mesh.
        let in_mesh = endpoint.hbone
            || (down.side == Side::SidecarOutbound
                && endpoint
                    .workload
                    .is_some_and(|w| w.kind != WorkloadKind::ServiceEntryEndpoint));
        let identity = match endpoint.workload.filter(|_| in_mesh) {
            Some(w) => match &w.spiffe {
                Ok(id) => Some(id.clone()),
                Err(e) => {
                    return Ok(local(&ctx, &down, rec, reply(503, "UF", &e.to_string())));
                }
            },
            None => None,
        };
        // TLS is originated only to endpoints outside the mesh (the mesh has HBONE's mTLS).
        let tls = match (&policy.tls, identity.is_none()) {
            (Some(t), true) => Some((t, t.sni.as_deref().unwrap_or(tls_name))),
            _ => None,
        };
        let dial = Dial {
            addr: endpoint.addr,
            identity,
            wire,
            client: down.client,
            service_host: Some(&backend.hostname),
            trace: ctx.trace(),
            cluster: Some(&cluster),
            tls,
        };
        let Some(body) = bodies.next() else {
            break (Err(TryError::NotReplayable), false);
        };
        let mut request = Request::new(body);
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = head.uri.clone();
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers.clone();
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = match (per_try_timeout, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let result = match limit {
            Some(t) => match monoio::time::timeout(t, ctx.upstreams.send(&dial, request)).await {
                Ok(r) => r.map_err(TryError::Upstream),
                Err(_) => Err(TryError::Timeout),
            },
            None => ctx
                .upstreams
                .send(&dial, request)
                .await
                .map_err(TryError::Upstream),
        };
        let outcome = match &result {
            Ok(r) => TryOutcome::Response {
                status: r.status().as_u16(),
                grpc: r
                    .headers()
                    .get(&GRPC_STATUS)
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
            },
            Err(TryError::Timeout) => TryOutcome::Timeout,
            Err(TryError::Upstream(e)) => match e {
                // The limit was ours, not the endpoint's: neither counted nor retried.
                UpstreamError::Overflow(_) => break (result, false),
                UpstreamError::Connect(_) => TryOutcome::ConnectFailure,
                e if e.is_refused_stream() => TryOutcome::RefusedStream,
                UpstreamError::Exchange(_) => TryOutcome::Reset,
            },
            Err(TryError::NotReplayable) => break (result, false),
        };
        cluster.report(endpoint.addr, outcome, candidates.len());
        tries += 1;
        if !retries.retriable(outcome) {
            break (result, false);
        }
        if tries > retries.attempts {
            // URX only when there were retries to run out of.
            break (result, retries.attempts > 0);
        }
        if !bodies.replayable() {
            break (result, false);
        }
        // Only a request that is retried remembers where it went (no allocation otherwise).
        tried.push(endpoint.addr);
        let Some(retry) = cluster.retry() else {
            tracing::debug!(cluster = %backend.hostname, "retry budget used up; not retried");
            break (result, false);
        };
        _retrying = Some(retry);
        if let Ok(r) = &result {
            tracing::debug!(status = r.status().as_u16(), upstream = %endpoint.addr, "retrying");
        }
        drop(result);
        let pause = traffic::backoff(tries, ctx.random());
        if deadline.is_some_and(|d| Instant::now() + pause >= d) {
            break (Err(TryError::Timeout), false);
        }
        monoio::time::sleep(pause).await;
    };
    if !mirrors.is_empty() {
        match &bodies {
            TryBodies::Replay(r) => match r.buffered() {
                Some(body) => mirrors.into_iter().for_each(|m| m.send(Some(body.clone()))),
                None => tracing::debug!(
                    path = %head.uri.path(),
                    "not mirrored: the request body is over the buffer limit or was not read to its end"
                ),
            },
            _ => tracing::debug!(path = %head.uri.path(), "not mirrored: an upgrade"),
        }
    }
    let mut response = match sent {
        Ok(r) => {
            if exhausted {
                rec.flag = "URX";
            }
            r
        }
        Err(e) => {
            let (status, flag, details) = match &e {
                TryError::Timeout => (504, "UT", "upstream_response_timeout".to_string()),
                TryError::Upstream(u) => (503, u.flag(), u.to_string()),
                TryError::NotReplayable => (503, "UC", "request body not replayable".to_string()),
            };
            tracing::debug!(upstream = ?rec.upstream, error = %details, "upstream exchange failed");
            let flag = if exhausted {
                flags::with_retry_limit(flag)
            } else {
                flag
            };
            return Ok(local(&ctx, &down, rec, reply(status, flag, &details)));
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            let upstream = hyper::upgrade::on(&mut response);
            monoio::spawn(splice_upgrade(downstream, upstream));
        }
    }
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), switching);
    for m in response_headers {
        modify_headers(response.headers_mut(), m);
    }
    if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    let (parts, body) = response.into_parts();
    let status = parts.status.as_u16();
    // The request counts as in flight (limits, least request) until its response has gone.
    rec.hold = Some(permit);
    Ok(Response::from_parts(
        parts,
        recorded(&ctx, &down, rec, status, body),
    ))
}

/// The request body for each try: streamed once (no retries, or an upgrade), empty every time
/// (a request without a body: nothing to keep), or replayed from what the first try read.
enum TryBodies {
    Once(Option<ProxyBody>),
    Empty,
    Replay(Replay),
}

impl TryBodies {
    /// The next try's body; `None` when it cannot be sent again.
    fn next(&mut self) -> Option<ProxyBody> {
        match self {
            TryBodies::Once(body) => body.take(),
            TryBodies::Empty => Some(ProxyBody::empty()),
            TryBodies::Replay(r) => r.again().map(|b| ProxyBody::Replay(Box::new(b))),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            TryBodies::Once(_) => false,
            TryBodies::Empty => true,
            TryBodies::Replay(r) => r.replayable(),
        }
    }
}

/// Why a try gave no response.
enum TryError {
    Upstream(UpstreamError),
    /// The per-try or the route's timeout.
    Timeout,
    /// A retry was due but the body could not be sent again.
    NotReplayable,
}

/// Envoy's response flags that come in pairs.
mod flags {
    /// The flag of the last try's failure, with retries used up.
    pub fn with_retry_limit(flag: &'static str) -> &'static str {
        match flag {
            "UF" => "UF,URX",
            "UC" => "UC,URX",
            "UT" => "UT,URX",
            _ => "URX",
        }
    }

    /// A flag on a request an injected delay held up.
    pub fn with_delay(flag: &'static str) -> &'static str {
        match flag {
            "-" => "DI",
            "UF" => "DI,UF",
            "UC" => "DI,UC",
            "UT" => "DI,UT",
            "UO" => "DI,UO",
            "UH" => "DI,UH",
            "URX" => "DI,URX",
            "DC" => "DI,DC",
            "FI" => "DI,FI",
            "UF,URX" => "DI,UF,URX",
            "UC,URX" => "DI,UC,URX",
            "UT,URX" => "DI,UT,URX",
            other => other,
        }
    }
}

/// Where a request goes once classified, authorized and routed.
enum Plan<'s> {
    /// To an endpoint of a service, by the route chosen.
    Route {
        target: decide::Target,
        forward: decide::Forward<'s>,
    },
    /// To the app beside this sidecar (at the CONNECT's authority).
    App,
    /// To a pod addressed directly (at the CONNECT's authority), over HBONE through its node.
    Pod(u32),
}

/// The phases before forwarding, by side: a waypoint classifies the tunnel's service, authorizes
/// (policies on the Gateway and the service) and routes; a sidecar's outbound routes the service
/// its app dialled; a sidecar's inbound authorizes with its pod's policies (every L7 field).
fn plan<'s>(
    ctx: &Ctx,
    current: &'s Current,
    down: &Downstream,
    req: &Request<Incoming>,
    host: Option<&str>,
    rec: &mut Record,
) -> Result<Plan<'s>, Local> {
    let snapshot = &current.value;
    let headers = req.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let http = Http {
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query(),
        host,
        header: &header,
    };
    let peer = Peer {
        principal: &down.principal,
        namespace: down.peer.namespace(),
        service_account: down.peer.service_account(),
        ip: down.client.ip(),
    };
    let deny = |policy: Option<&str>| Local {
        status: 403,
        flag: "-",
        details: format!(
            "rbac_access_denied_matched_policy[{}]",
            policy.unwrap_or("none")
        ),
        location: None,
    };
    let audit = |v: &shoal_control::authz::Verdict<'_>| {
        if let Some(p) = v.dry_run.or(v.audit) {
            tracing::info!(target: "access", policy = %p, src.identity = %down.peer, method = %http.method, path = %http.path, "audit or dry-run policy matched");
        }
    };
    let target = match down.side {
        Side::Waypoint => {
            let Some(waypoint) = ctx.waypoint_id(current) else {
                return Err(reply(503, "NR", "waypoint_not_configured"));
            };
            // Again per request: service ids are per snapshot, and it may have moved on.
            let target = match decide::classify(snapshot, waypoint, down.authority) {
                Ok(t) => t,
                Err(e) => {
                    // A pod addressed directly: the Gateway's policies, then that pod.
                    let Some(id) = decide::classify_workload(snapshot, waypoint, down.authority)
                    else {
                        return Err(reply(503, "NR", &e.to_string()));
                    };
                    rec.destination = Some(id);
                    let verdict = decide::authorize_workload(
                        snapshot,
                        waypoint,
                        down.authority,
                        &peer,
                        &http,
                    );
                    audit(&verdict);
                    if !verdict.allowed {
                        return Err(deny(verdict.policy));
                    }
                    return Ok(Plan::Pod(id));
                }
            };
            rec.service = Some(target.service);
            let verdict = decide::authorize(snapshot, waypoint, &target, &peer, &http);
            audit(&verdict);
            if !verdict.allowed {
                return Err(deny(verdict.policy));
            }
            target
        }
        Side::SidecarOutbound => {
            let target = decide::service_target(snapshot, down.authority)
                .ok_or_else(|| reply(503, "NR", "not a service address this mesh knows"))?;
            rec.service = Some(target.service);
            target
        }
        Side::SidecarInbound => {
            let pod = ctx.pod_id(current).ok_or_else(|| {
                reply(503, "NR", "this sidecar's pod is not in the configuration")
            })?;
            let workload = snapshot.workload(pod);
            if !workload.ips.contains(&down.authority.ip()) {
                return Err(reply(503, "NR", "the tunnel is not for this pod"));
            }
            rec.destination = Some(pod);
            let request = decide::l7_request(
                &peer,
                &http,
                (Some(down.authority.ip()), down.authority.port()),
            );
            let verdict = snapshot.authorize_sidecar(workload, &request);
            audit(&verdict);
            if !verdict.allowed {
                return Err(deny(verdict.policy));
            }
            return Ok(Plan::App);
        }
    };
    match decide::route(snapshot, &target, &http, "http", ctx.random()) {
        Decision::Forward(forward) => Ok(Plan::Route { target, forward }),
        Decision::Respond(l) => Err(l),
    }
}

/// A request to the tunnel's own authority: a sidecar's app (plaintext, `identity` `None`), or a
/// pod a waypoint serves directly (HBONE with the pod's identity).
async fn to_address(
    ctx: &Rc<Ctx>,
    down: &Rc<Downstream>,
    mut rec: Record,
    mut req: Request<Incoming>,
    host: Option<&str>,
    identity: Option<Identity>,
) -> Response<Recorded> {
    rec.upstream = Some(down.authority);
    let wire = if req.version() == Version::HTTP_2 {
        Wire::Http2
    } else {
        Wire::Http1
    };
    let downstream_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let upstream_req =
        match prepare_upstream(req, wire, host, &down.authority, rec.request_bytes.clone()) {
            Ok(r) => r,
            Err(e) => return local(ctx, down, rec, reply(400, "-", &e)),
        };
    let dial = Dial {
        addr: down.authority,
        identity,
        wire,
        client: down.client,
        service_host: None,
        trace: ctx.trace(),
        cluster: None,
        tls: None,
    };
    let mut response = match ctx.upstreams.send(&dial, upstream_req).await {
        Ok(r) => r,
        Err(e) => return local(ctx, down, rec, reply(503, e.flag(), &e.to_string())),
    };
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(downstream)) = (switching, downstream_upgrade) {
        let upstream = hyper::upgrade::on(&mut response);
        monoio::spawn(splice_upgrade(downstream, upstream));
    }
    strip_hop_by_hop(response.headers_mut(), switching);
    let (parts, body) = response.into_parts();
    let status = parts.status.as_u16();
    Response::from_parts(parts, recorded(ctx, down, rec, status, body))
}

/// RequestMirror: a copy of the request goes to an endpoint of `service` and its answer is
/// dropped. The copy's head is taken when the filter runs; a body goes with it once the real
/// exchange has read it, when it fits the buffer retries use (`RETRY_BUFFER_LIMIT_BYTES`): a body
/// larger than that is streamed once, to the real backend, and not mirrored.
struct Mirror {
    ctx: Rc<Ctx>,
    addr: SocketAddr,
    identity: Option<Identity>,
    client: SocketAddr,
    trace: ([u8; 16], [u8; 8]),
    backend_host: String,
    head: http::request::Parts,
}

impl Mirror {
    fn prepare(
        ctx: &Rc<Ctx>,
        down: &Rc<Downstream>,
        snapshot: &Snapshot,
        service: u32,
        port: u16,
        req: &Request<Incoming>,
    ) -> Option<Mirror> {
        let endpoint = decide::endpoint(snapshot, service, port, None, ctx.next())?;
        let identity = if endpoint.hbone {
            Some(endpoint.workload?.spiffe.clone().ok()?)
        } else {
            None
        };
        let mut copy = Request::builder()
            .method(req.method().clone())
            .uri(req.uri().clone())
            .version(Version::HTTP_11);
        for (name, value) in req.headers() {
            copy = copy.header(name, value);
        }
        let copy = copy.body(ProxyBody::empty()).ok()?;
        let host = request_host(req);
        let backend_host = snapshot.service(service).hostname.clone();
        let mut copy = prepare_mirror(copy, host.as_deref(), &backend_host).ok()?;
        copy.headers_mut().remove(header::CONTENT_LENGTH);
        copy.headers_mut().remove(header::TRANSFER_ENCODING);
        Some(Mirror {
            ctx: ctx.clone(),
            addr: endpoint.addr,
            identity,
            client: down.client,
            trace: ctx.trace(),
            backend_host,
            head: copy.into_parts().0,
        })
    }

    /// Sends the copy with `body` (none: a request without one), in the background.
    fn send(self, body: Option<bytes::Bytes>) {
        let Mirror {
            ctx,
            addr,
            identity,
            client,
            trace,
            backend_host,
            mut head,
        } = self;
        let body = match body {
            Some(b) => {
                head.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                ProxyBody::text(b)
            }
            None => ProxyBody::empty(),
        };
        let copy = Request::from_parts(head, body);
        monoio::spawn(async move {
            let dial = Dial {
                addr,
                identity,
                wire: Wire::Http1,
                client,
                service_host: Some(&backend_host),
                trace,
                cluster: None,
                tls: None,
            };
            let sent =
                monoio::time::timeout(Duration::from_secs(30), ctx.upstreams.send(&dial, copy))
                    .await;
            if let Ok(Ok(response)) = sent {
                // Read the answer to its end so the connection can be reused.
                let mut body = response.into_body();
                while let Some(frame) =
                    std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
                {
                    if frame.is_err() {
                        break;
                    }
                }
            }
        });
    }
}

/// A mirrored request's URI and Host, as `prepare_upstream` makes them for HTTP/1.1.
fn prepare_mirror(
    mut req: Request<ProxyBody>,
    host: Option<&str>,
    service_host: &str,
) -> Result<Request<ProxyBody>, String> {
    strip_hop_by_hop(req.headers_mut(), false);
    let authority = host.unwrap_or(service_host).to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = Uri::builder()
        .path_and_query(pq)
        .build()
        .map_err(|e| e.to_string())?;
    let v = HeaderValue::from_str(&authority).map_err(|e| e.to_string())?;
    req.headers_mut().insert(header::HOST, v);
    Ok(req)
}

/// The matched prefix for `ReplacePrefixMatch` (routing again is cheaper than carrying it).
fn matched_prefix_for(
    snapshot: &Snapshot,
    target: &decide::Target,
    req: &Request<Incoming>,
) -> Option<String> {
    let table = snapshot.routes.get(&target.service)?;
    let headers = req.headers();
    let view = shoal_control::routes::RequestView {
        method: req.method().as_str(),
        path: req.uri().path(),
        port: target.port,
        header: &|n| headers.get(n).and_then(|v| v.to_str().ok()),
        query: &|n| decide::query_param(req.uri().query(), n),
    };
    let (m, _) = table.select_match(&view)?;
    decide::matched_prefix(m).map(str::to_string)
}

fn reply(status: u16, flag: &'static str, details: &str) -> Local {
    Local {
        status,
        flag,
        details: details.to_string(),
        location: None,
    }
}

/// A response the waypoint writes itself, recorded like any other.
fn local(ctx: &Rc<Ctx>, down: &Rc<Downstream>, mut rec: Record, l: Local) -> Response<Recorded> {
    let body = match l.status {
        403 => "RBAC: access denied".to_string(),
        404 => "route not found".to_string(),
        503 if l.flag == "UH" => "no healthy upstream".to_string(),
        504 => "upstream request timeout".to_string(),
        _ if l.location.is_some() => String::new(),
        _ => l.details.clone(),
    };
    rec.flag = l.flag;
    rec.details = l.details;
    let mut builder = Response::builder()
        .status(l.status)
        .header(header::CONTENT_TYPE, "text/plain")
        .header("x-request-id", rec.request_id.as_str());
    if let Some(location) = &l.location {
        builder = builder.header(header::LOCATION, location);
    }
    let status = l.status;
    let body = if body.is_empty() {
        ProxyBody::empty()
    } else {
        ProxyBody::text(body)
    };
    let recorded = recorded(ctx, down, rec, status, body);
    builder
        .body(recorded)
        .unwrap_or_else(|_| Response::new(Recorded::new(ProxyBody::empty(), Box::new(|_, _| {}))))
}

/// Wraps a response body so the request is recorded when it ends.
fn recorded(
    ctx: &Rc<Ctx>,
    down: &Rc<Downstream>,
    rec: Record,
    status: u16,
    body: ProxyBody,
) -> Recorded {
    let (ctx, down) = (ctx.clone(), down.clone());
    Recorded::new(
        body,
        Box::new(move |response_bytes, complete| {
            let flag = if complete || rec.flag != "-" {
                rec.flag
            } else {
                "DC"
            };
            let flag = if rec.delayed {
                flags::with_delay(flag)
            } else {
                flag
            };
            emit(&ctx, &down, &rec, status, flag, response_bytes);
        }),
    )
}

fn emit(
    ctx: &Ctx,
    down: &Downstream,
    rec: &Record,
    status: u16,
    flag: &'static str,
    response_bytes: u64,
) {
    let duration = rec.started.elapsed();
    let request_bytes = rec.request_bytes.get();
    let key = SeriesKey {
        reporter: down.side.reporter(),
        source: rec.source,
        principal: down.principal.clone(),
        destination: rec.destination,
        service: rec.service,
        protocol: if rec.protocol == "HTTP/2" {
            "http2"
        } else {
            "http"
        },
        code: status,
        flag,
    };
    // Labels are built only for a series this shard has not seen in this snapshot.
    let series = ctx.series(rec.version, key, |key| {
        let current = ctx.snapshot();
        labels(
            &current.value,
            rec.version == current.version,
            key,
            &down.principal,
        )
    });
    series.record(
        duration.as_secs_f64() * 1000.0,
        request_bytes,
        response_bytes,
    );
    // Envoy's %RESPONSE_CODE_DETAILS%: a local reply says why; an answer from upstream is
    // "via_upstream".
    let details = if !rec.details.is_empty() {
        rec.details.as_str()
    } else if flag == "-" {
        "via_upstream"
    } else {
        "-"
    };
    shoal_runtime::logging::access(
        "request",
        format_args!(
            "method={} path={} protocol={:?} code={} flags={:?} details={:?} bytes_received={} \
             bytes_sent={} duration_ms={} upstream_host={} authority={} request_id={} \
             src.identity={} src.addr={}",
            rec.method,
            rec.path,
            rec.protocol,
            status,
            flag,
            details,
            request_bytes,
            response_bytes,
            duration.as_millis() as u64,
            OrDash(rec.upstream),
            rec.authority,
            rec.request_id,
            down.peer,
            down.client,
        ),
    );
}

/// Istio's labels for a series. Ids are only meaningful in the snapshot that made them, so when
/// the snapshot moved on between the request and its end, workload labels are `unknown`.
fn labels(snapshot: &Snapshot, same: bool, key: &SeriesKey, principal: &str) -> HttpLabels {
    let workload = |id: Option<u32>| -> Option<&Workload> {
        id.filter(|_| same).map(|id| snapshot.workload(id))
    };
    let name = |w: &Workload| {
        w.labels
            .label("app.kubernetes.io/name")
            .or_else(|| w.labels.label("app"))
            .map(str::to_string)
            .unwrap_or_else(|| w.name.clone())
    };
    let or_unknown = |v: Option<String>| v.unwrap_or_else(|| UNKNOWN.to_string());
    let source = workload(key.source);
    let destination = workload(key.destination);
    let service = key.service.filter(|_| same).map(|id| snapshot.service(id));
    HttpLabels([
        key.reporter.to_string(),
        or_unknown(source.map(name)),
        or_unknown(source.map(|w| w.namespace.clone())),
        // Istio's labels name principals by their SPIFFE URI (policies use the short form).
        format!("spiffe://{principal}"),
        or_unknown(destination.map(name)),
        or_unknown(destination.map(|w| w.namespace.clone())),
        or_unknown(service.map(|s| s.hostname.clone())),
        or_unknown(service.map(|s| s.name.clone())),
        or_unknown(service.map(|s| s.namespace.clone())),
        or_unknown(destination.map(|w| w.identity.to_string())),
        key.protocol.to_string(),
        key.code.to_string(),
        key.flag.to_string(),
        "mutual_tls".to_string(),
    ])
}

// ------------------------------------------------------------------ HTTP plumbing

/// The request's host without a port: `:authority`, else `Host`.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = raw_authority(req)?;
    let host = if raw.starts_with('[') {
        // An IPv6 literal keeps its brackets and loses its port.
        raw.find(']').map_or(raw, |end| &raw[..=end])
    } else {
        raw.split(':').next().unwrap_or(raw)
    };
    Some(host.to_ascii_lowercase())
}

/// The request's authority as the client wrote it: HTTP/2's `:authority`, or HTTP/1.1's Host.
fn raw_authority<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req.headers().get(header::HOST)?.to_str().ok(),
    }
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

// Header names the request path looks up, made once: a `&str` key is parsed and validated
// again on every lookup.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The headers that describe one hop (RFC 9110 §7.6.1), as bits of `strip_hop_by_hop`'s mask.
const HOP_CONNECTION: u8 = 1;
const HOP_UPGRADE: u8 = 1 << 1;
const HOP_TE: u8 = 1 << 2;
const HOP_OTHER: u8 = 1 << 3;
/// A field named `close`: hop-by-hop only when `Connection: close` names it, as it may.
const HOP_CLOSE: u8 = 1 << 4;

fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    match name.as_str() {
        "connection" => HOP_CONNECTION,
        "upgrade" => HOP_UPGRADE,
        "te" => HOP_TE,
        "keep-alive"
        | "proxy-connection"
        | "proxy-authenticate"
        | "proxy-authorization"
        | "transfer-encoding" => HOP_OTHER,
        "close" => HOP_CLOSE,
        _ => 0,
    }
}

/// Headers that describe one hop and must not be passed on (RFC 9110 §7.6.1), plus those the
/// `Connection` header names. An upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names finds which kinds are there: most messages carry none, or only
    // `Connection`, so the hashed look-ups below run for those alone.
    let present = headers.keys().fold(0, |bits, n| bits | hop_by_hop_bit(n));
    if present & HOP_CONNECTION != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The options almost every message carries name no field that is not removed below
            // anyway (or, for `close`, none that is there): no look-up for them.
            .filter(|t| {
                !(t.eq_ignore_ascii_case("keep-alive")
                    || t.eq_ignore_ascii_case("upgrade")
                    || (t.eq_ignore_ascii_case("close") && present & HOP_CLOSE == 0))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    if present & HOP_OTHER != 0 {
        for n in [
            &KEEP_ALIVE,
            &PROXY_CONNECTION,
            &header::PROXY_AUTHENTICATE,
            &header::PROXY_AUTHORIZATION,
            &header::TRANSFER_ENCODING,
        ] {
            headers.remove(n);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if present & HOP_CONNECTION != 0 {
            headers.remove(header::CONNECTION);
        }
        if present & HOP_UPGRADE != 0 {
            headers.remove(header::UPGRADE);
        }
    }
    // TE may only say "trailers" past a proxy.
    if present & HOP_TE != 0 {
        if let Some(te) = headers.get(header::TE) {
            if !te
                .to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("trailers"))
            {
                headers.remove(header::TE);
            }
        }
    }
}

/// The request as the endpoint should see it: hop-by-hop headers gone, the version and URI form
/// its wire wants (origin-form and `Host` for HTTP/1.1, absolute for HTTP/2), its body counted.
/// `service_host` is the authority of last resort, formatted only if it comes to that.
fn prepare_upstream(
    req: Request<Incoming>,
    wire: Wire,
    host: Option<&str>,
    service_host: &dyn std::fmt::Display,
    counted: Rc<Cell<u64>>,
) -> Result<Request<ProxyBody>, String> {
    let upgrade = wants_upgrade(&req);
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // The common case, an HTTP/1.1 request in origin form with one readable Host, goes on as it
    // came: rebuilding its target and Host would give the same values, at four allocations.
    if wire == Wire::Http1 && parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        if let (Some(h), None) = (hosts.next(), hosts.next()) {
            if h.to_str().is_ok() {
                parts.version = Version::HTTP_11;
                return Ok(Request::from_parts(
                    parts,
                    ProxyBody::counted(body, counted),
                ));
            }
        }
    }
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .or_else(|| host.map(str::to_string))
        .unwrap_or_else(|| service_host.to_string());
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    match wire {
        Wire::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::builder()
                .path_and_query(path_and_query)
                .build()
                .map_err(|e| format!("bad request target: {e}"))?;
            let v = HeaderValue::from_str(&authority).map_err(|e| format!("bad host: {e}"))?;
            parts.headers.insert(header::HOST, v);
        }
        Wire::Http2 => {
            parts.version = Version::HTTP_2;
            parts.uri = Uri::builder()
                .scheme("http")
                .authority(authority.as_str())
                .path_and_query(path_and_query)
                .build()
                .map_err(|e| format!("bad request target: {e}"))?;
            parts.headers.remove(header::HOST);
        }
    }
    Ok(Request::from_parts(
        parts,
        ProxyBody::counted(body, counted),
    ))
}

/// Applies a Gateway API header modifier: set replaces, add appends, remove deletes.
fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for h in &m.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            headers.insert(n, v);
        }
    }
    for h in &m.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
}

/// Joins an upgraded client connection (WebSocket, say) to the upgraded upstream one.
async fn splice_upgrade(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = (down.await, up.await) else {
        return;
    };
    let (mut down, mut up) = (down, up);
    if let Err(e) = copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

// ------------------------------------------------------------------ L4 through the waypoint

/// A service port declared TCP: the tunnel's bytes go to an endpoint as they are, under the
/// L4 parts of the policies.
async fn l4(ctx: Rc<Ctx>, down: Rc<Downstream>, mut io: TunnelIo) {
    let started = Instant::now();
    let current = ctx.snapshot();
    let snapshot = &current.value;
    let Some(waypoint) = ctx.waypoint_id(&current) else {
        return;
    };
    let Ok(target) = decide::classify(snapshot, waypoint, down.authority) else {
        return;
    };
    let none = |_: &str| None;
    let http = Http {
        method: "",
        path: "",
        query: None,
        host: None,
        header: &none,
    };
    let peer = Peer {
        principal: &down.principal,
        namespace: down.peer.namespace(),
        service_account: down.peer.service_account(),
        ip: down.client.ip(),
    };
    let verdict = decide::authorize(snapshot, waypoint, &target, &peer, &http);
    let log = |flag: &str, error: &str, sent: u64, received: u64| {
        tracing::info!(target: "access", direction = "waypoint", src.addr = %down.client, src.identity = %down.peer, dst.addr = %down.authority, bytes_sent = sent, bytes_recv = received, duration_ms = started.elapsed().as_millis() as u64, flags = flag, error, "connection");
    };
    if !verdict.allowed {
        return log(
            "DENY",
            verdict.policy.unwrap_or("no ALLOW policy matched"),
            0,
            0,
        );
    }
    let Some(endpoint) = decide::endpoint(snapshot, target.service, target.port, None, ctx.next())
    else {
        return log("UH", "no ready endpoint", 0, 0);
    };
    let identity = if endpoint.hbone {
        endpoint.workload.and_then(|w| w.spiffe.clone().ok())
    } else {
        None
    };
    let service_host = snapshot.service(target.service).hostname.clone();
    let key = SeriesKey {
        reporter: down.side.reporter(),
        source: snapshot.workload_id_by_ip(down.client.ip()),
        principal: down.principal.clone(),
        destination: snapshot.workload_id_by_ip(endpoint.addr.ip()),
        service: Some(target.service),
        protocol: "tcp",
        code: 0,
        flag: "-",
    };
    let series = ctx
        .metrics
        .tcp_series(labels(snapshot, true, &key, &down.principal));
    let dial = Dial {
        addr: endpoint.addr,
        identity,
        wire: Wire::Http1,
        client: down.client,
        service_host: Some(&service_host),
        trace: ctx.trace(),
        cluster: None,
        tls: None,
    };
    drop(current);
    match ctx.upstreams.open_raw(&dial).await {
        Ok((mut up, _guard)) => {
            series.opened();
            let (sent, received) = series.tallies();
            let result = copy_bidirectional_tallied(&mut io, &mut up, &sent, &received).await;
            series.closed();
            let error = result.err().map(|e| e.to_string());
            log(
                "-",
                error.as_deref().unwrap_or(""),
                sent.count(),
                received.count(),
            );
        }
        Err(e) => log("UF", &e.to_string(), 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_version_4_uuids() {
        for (a, b) in [
            (0, 0),
            (u64::MAX, u64::MAX),
            (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
        ] {
            let id = uuid_v4(a, b);
            let groups: Vec<&str> = id.split('-').collect();
            let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
            assert_eq!(lengths, [8, 4, 4, 4, 12], "{id}");
            assert!(
                id.bytes()
                    .all(|c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{id}"
            );
            assert!(groups[2].starts_with('4'), "version 4: {id}");
            assert!(
                matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
                "RFC 4122 variant: {id}"
            );
            assert_eq!(id.capacity(), 36, "{id}");
        }
        assert_eq!(
            uuid_v4(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
            "01234567-89ab-4def-bedc-ba9876543210"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_removed_and_upgrades_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::TE).is_none() && h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());

        // Each alone, as it comes (TE passes only as "trailers"), and what `Connection` names,
        // whichever options it lists; the message's other headers stay.
        for (connection, name, value, kept) in [
            (None, "connection", "keep-alive", false),
            (None, "keep-alive", "timeout=5", false),
            (None, "proxy-connection", "keep-alive", false),
            (None, "proxy-authenticate", "Basic", false),
            (None, "proxy-authorization", "Basic Zm9v", false),
            (None, "transfer-encoding", "chunked", false),
            (None, "upgrade", "websocket", false),
            (None, "te", "gzip", false),
            (None, "te", "trailers", true),
            (None, "x-forwarded-for", "10.0.0.1", true),
            (None, "close", "1", true),
            (Some("keep-alive"), "keep-alive", "1", false),
            (Some("close"), "close", "1", false),
            (Some("Close"), "close", "1", false),
            (Some("close"), "x-other", "1", true),
            (Some("keep-alive, x-other"), "x-other", "1", false),
            (Some("Upgrade"), "upgrade", "1", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("r"));
            if let Some(c) = connection {
                h.insert(header::CONNECTION, HeaderValue::from_static(c));
            }
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            strip_hop_by_hop(&mut h, false);
            let case = format!("Connection: {connection:?}, {name}: {value}");
            assert_eq!(h.contains_key(name), kept, "{case}");
            assert!(!h.contains_key(header::CONNECTION), "{case}");
            assert_eq!(h.get(header::HOST).unwrap(), "r", "{case}");
        }

        let mut u = HeaderMap::new();
        u.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        u.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut u, true);
        assert_eq!(u.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(u.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn hosts_lose_their_port() {
        let req = |authority: &str| {
            Request::builder()
                .uri(format!("http://{authority}/x"))
                .body(())
                .unwrap()
        };
        assert_eq!(
            request_host(&req("Reviews:9080")).as_deref(),
            Some("reviews")
        );
        assert_eq!(request_host(&req("reviews")).as_deref(), Some("reviews"));
        assert_eq!(request_host(&req("[::1]:80")).as_deref(), Some("[::1]"));
        let host_only = Request::builder()
            .uri("/x")
            .header(header::HOST, "a.b:1")
            .body(())
            .unwrap();
        assert_eq!(request_host(&host_only).as_deref(), Some("a.b"));
    }

    #[test]
    fn preface_detection() {
        assert!(is_h2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(is_h2_preface(b"PRI * HT"));
        assert!(!is_h2_preface(b"GET / HTTP/1.1\r\n"));
        assert!(!is_h2_preface(b""));
    }

    #[test]
    fn header_modifier_sets_adds_and_removes() {
        use shoal_control::resources::HeaderValue as Hv;
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("old"));
        h.insert("gone", HeaderValue::from_static("x"));
        let m = HeaderModifier {
            set: vec![Hv {
                name: "a".into(),
                value: "new".into(),
            }],
            add: vec![
                Hv {
                    name: "b".into(),
                    value: "1".into(),
                },
                Hv {
                    name: "b".into(),
                    value: "2".into(),
                },
            ],
            remove: vec!["gone".into()],
        };
        modify_headers(&mut h, &m);
        assert_eq!(h.get("a").unwrap(), "new");
        assert_eq!(h.get_all("b").iter().count(), 2);
        assert!(h.get("gone").is_none());
    }
}
