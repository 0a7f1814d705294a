//! One ztunnel process: the control agent, the node's certificates, the shards with their
//! listeners (SOCKS5 outbound; HBONE inbound on every local pod's address, bound as pods appear),
//! and the admin server. The connection paths read top to bottom:
//! outbound: accept → classify (source workload, SOCKS5 destination) → decide → connect → copy → record;
//! inbound: accept → TLS (the pod's identity) → per CONNECT: admit → connect → 200 → copy → record.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use monoio::net::TcpStream;
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use shoal_control::agent::ConfigAdmin;
use shoal_control::snapshot::{Snapshot, Workload, WorkloadKind};
use shoal_control::{Agent, AgentCollector, Options};
use shoal_hbone::connect::{Baggage, InboundConnect, OutboundConnect};
use shoal_hbone::pool::{Pool, PoolKey};
use shoal_hbone::tunnel::copy_tcp_tunnel_tallied;
use shoal_hbone::{server, stream, Identity};
use shoal_runtime::admin::{start_proxy_servers, AdminServer, RuntimeCollector};
use shoal_runtime::dns::{Dns, DnsCache};
use shoal_runtime::logging::OrDash;
use shoal_runtime::{
    copy_bidirectional_tallied, ListenerSpec, Runtime, RuntimeArgs, RuntimeConfig, Shard, Versioned,
};

use crate::decide::{self, Plan, HBONE_PORT};
use crate::metrics::{self, Metrics, ShardMetrics, TcpLabelsBuilder};
use shoal_control::certs::{CertStore, Renewal};
use shoal_runtime::socks5::{self, reply, Destination};

/// An upstream (a local workload, or a passthrough destination) that does not accept within this
/// long is given up on: 503 inbound, a refused CONNECT outbound.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, clap::Args)]
pub struct ZtunnelArgs {
    /// The manifests directory (watched).
    #[arg(long, env = "SHOAL_MANIFESTS")]
    pub manifests: PathBuf,
    /// This node's name: its workloads are the Pods whose spec.nodeName is this (and
    /// WorkloadEntries annotated shoal.io/node-name).
    #[arg(long, env = "SHOAL_NODE")]
    pub node: String,
    /// The CA directory (`shoalctl ca init`).
    #[arg(long, env = "SHOAL_CA_DIR")]
    pub ca: PathBuf,
    /// SOCKS5 outbound listener.
    #[arg(long, env = "SHOAL_SOCKS5", default_value = "127.0.0.1:15080")]
    pub socks5: SocketAddr,
    /// Redirect capture listener (`SO_ORIGINAL_DST`), for traffic iptables REDIRECTs to it, as
    /// istio-cni's rules do to 15001. Off unless given.
    #[arg(long, env = "SHOAL_REDIRECT")]
    pub redirect: Option<SocketAddr>,
    /// Plaintext inbound listener (`SO_ORIGINAL_DST`), for traffic to this node's workloads that
    /// iptables REDIRECTs to it, as istio-cni does to 15006: accepted only where PeerAuthentication
    /// is PERMISSIVE. Off unless given.
    #[arg(long, env = "SHOAL_INBOUND_PLAINTEXT")]
    pub inbound_plaintext: Option<SocketAddr>,
    /// Admin server: /config_dump, /metrics, /healthz/ready.
    #[arg(long, env = "SHOAL_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Metrics for Prometheus (`/metrics`), as Istio's 15020.
    #[arg(long, env = "SHOAL_METRICS", default_value = "0.0.0.0:15020")]
    pub metrics: SocketAddr,
    /// Readiness (`/healthz/ready`), as Istio's 15021.
    #[arg(long, env = "SHOAL_READINESS", default_value = "0.0.0.0:15021")]
    pub readiness: SocketAddr,
    #[arg(long, env = "SHOAL_TRUST_DOMAIN", default_value = shoal_hbone::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    #[arg(long, env = "SHOAL_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// Workload certificate lifetime; renewed at half of it.
    #[arg(long, env = "SHOAL_CERT_LIFETIME_S", default_value_t = 24 * 3600)]
    pub cert_lifetime_s: u64,
    /// The DNS proxy (UDP): mesh hosts (Services, ServiceEntries) are answered with their VIPs,
    /// other names forwarded to the name servers.
    #[arg(
        long = "dns-proxy",
        env = "SHOAL_DNS_PROXY",
        default_value = "127.0.0.1:15053"
    )]
    pub dns_proxy: Option<SocketAddr>,
    /// Name servers to forward to and resolve with (IP:PORT, repeatable); none: the system's.
    #[arg(long = "dns-server", env = "SHOAL_DNS_SERVERS", value_delimiter = ',')]
    pub dns_servers: Vec<SocketAddr>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl ZtunnelArgs {
    /// A node whose SOCKS5, admin, metrics and readiness listeners take kernel-chosen ports on
    /// 127.0.0.1 (several nodes on one machine: the demo and tests), with the defaults otherwise.
    pub fn on_loopback(manifests: PathBuf, node: &str, ca: PathBuf, runtime: RuntimeArgs) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        ZtunnelArgs {
            manifests,
            node: node.to_string(),
            ca,
            socks5: any,
            redirect: None,
            inbound_plaintext: None,
            admin: any,
            metrics: any,
            readiness: any,
            trust_domain: shoal_hbone::DEFAULT_TRUST_DOMAIN.into(),
            root_namespace: "istio-system".into(),
            cert_lifetime_s: 24 * 3600,
            dns_proxy: Some(any),
            dns_servers: Vec::new(),
            runtime,
        }
    }
}

/// What every shard shares (all `Send`), turned into a `ShardCtx` on each shard.
#[derive(Clone)]
struct Shared {
    node: Arc<str>,
    certs: Arc<CertStore>,
    metrics: Metrics,
    subscriber: shoal_runtime::Subscriber<Snapshot>,
    dns: Dns,
}

type Current = Arc<Versioned<Snapshot>>;

/// A shard's own state: its view of the snapshot, TLS configurations by identity, its HBONE pool,
/// its round robin.
struct ShardCtx {
    shard: Rc<Shard>,
    shared: Shared,
    view: Rc<shoal_runtime::ShardView<Snapshot, Current>>,
    server_tls: RefCell<HashMap<Arc<str>, Arc<ServerConfig>>>,
    pool: Pool,
    metrics: Arc<ShardMetrics>,
    round_robin: Cell<usize>,
    trace_seed: Cell<u64>,
    dns_cache: DnsCache,
}

impl ShardCtx {
    fn snapshot(&self) -> Rc<Current> {
        self.view.current()
    }

    fn server_config(&self, identity: &Arc<str>) -> Result<Arc<ServerConfig>, String> {
        if let Some(c) = self.server_tls.borrow().get(identity) {
            return Ok(c.clone());
        }
        let parsed = Identity::parse(identity).map_err(|e| e.to_string())?;
        let config = self.shared.certs.server_config(&parsed)?;
        self.server_tls
            .borrow_mut()
            .insert(identity.clone(), config.clone());
        Ok(config)
    }

    fn next(&self, n: usize) -> usize {
        let i = self.round_robin.get();
        self.round_robin.set(i.wrapping_add(1));
        i % n.max(1)
    }

    /// Trace and span ids: a per-shard xorshift, unique enough to follow a tunnel in logs.
    fn trace(&self) -> ([u8; 16], [u8; 8]) {
        let mut x = self.trace_seed.get();
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (a, b, c) = (next(), next(), next());
        self.trace_seed.set(x);
        let mut trace = [0u8; 16];
        trace[..8].copy_from_slice(&a.to_be_bytes());
        trace[8..].copy_from_slice(&b.to_be_bytes());
        (trace, c.to_be_bytes())
    }
}

/// Addresses this node serves HBONE on: its ambient workloads'.
fn local_addresses(snapshot: &Snapshot, node: &str) -> HashSet<IpAddr> {
    snapshot
        .workloads_on_node(node)
        // A waypoint's pods serve HBONE themselves (as Istio leaves waypoints uncaptured).
        .filter(|w| {
            w.ambient && w.kind != WorkloadKind::ServiceEntryEndpoint && w.is_waypoint.is_none()
        })
        .flat_map(|w| w.ips.iter().copied())
        .collect()
}

/// The identities of this node's workloads (new ones appear with reloads).
fn local_identities(snapshot: &Snapshot, node: &str) -> Vec<Identity> {
    let mut ids: Vec<Identity> = snapshot
        .workloads_on_node(node)
        .filter_map(|w| match Identity::parse(&w.identity) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(workload = %w.name, error = %e, "workload identity is not a SPIFFE id");
                None
            }
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Issues certificates for every identity of this node's workloads.
fn issue_local(certs: &CertStore, snapshot: &Snapshot, node: &str) {
    for id in local_identities(snapshot, node) {
        if let Err(e) = certs.get(&id) {
            tracing::warn!(identity = %id, error = %e, "cannot issue a certificate");
        }
    }
}

/// Runs a ztunnel until SIGTERM/SIGINT (then drains).
pub fn run(args: &ZtunnelArgs) -> Result<(), String> {
    let node = Node::start(args)?;
    node.runtime.handle_signals().map_err(|e| e.to_string())?;
    println!(
        "READY listen={} admin={} driver={} shards={}",
        node.runtime.shards()[0].listeners[0],
        node.admin.local_addr(),
        node.runtime.shards()[0].driver,
        node.runtime.shards().len()
    );
    node.runtime.join();
    Ok(())
}

/// What the admin servers report: the config dump (with the node's certificates), and readiness —
/// ready once the configuration is compiled (always, by the time the servers start) and every
/// workload of this node has a certificate; not ready while draining.
struct NodeAdmin {
    config: ConfigAdmin,
    subscriber: shoal_runtime::Subscriber<Snapshot>,
    node: String,
    certs: Arc<CertStore>,
    drain: shoal_runtime::DrainSignal,
}

impl shoal_runtime::admin::AdminSource for NodeAdmin {
    fn ready(&self) -> Result<(), String> {
        if self.drain.is_draining() {
            return Err("draining".into());
        }
        let current = self.subscriber.current();
        let missing: Vec<String> = current
            .value
            .workloads_on_node(&self.node)
            .filter(|w| !self.certs.has(&w.identity))
            .map(|w| w.identity.to_string())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("no certificate yet for {}", missing.join(", ")))
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        self.config.config_dump()
    }
}

/// A started ztunnel.
pub struct Node {
    pub runtime: Runtime,
    pub admin: AdminServer,
    pub metrics: AdminServer,
    pub readiness: AdminServer,
    pub agent: Agent,
    pub certs: Arc<CertStore>,
    /// Where the DNS proxy listens, when it runs.
    pub dns_proxy: Option<SocketAddr>,
    _renewal: Renewal,
}

impl Node {
    pub fn start(args: &ZtunnelArgs) -> Result<Node, String> {
        let options = Options {
            trust_domain: args.trust_domain.clone(),
            root_namespace: args.root_namespace.clone(),
            ..Options::default()
        };
        let agent = Agent::start(&args.manifests, options)
            .map_err(|e| format!("{}: {e}", args.manifests.display()))?;
        let certs = CertStore::from_ca_dir(
            &args.ca,
            &args.trust_domain,
            Duration::from_secs(args.cert_lifetime_s),
        )?;
        issue_local(&certs, &agent.current().value, &args.node);
        let renewal = Renewal::start(certs.clone(), {
            let (subscriber, node) = (agent.subscriber(), args.node.clone());
            move || local_identities(&subscriber.current().value, &node)
        })
        .map_err(|e| e.to_string())?;
        // A new snapshot may bring pods with new identities: mint theirs now, on this thread,
        // before a shard needs one (minting takes milliseconds no reactor should spend).
        let waker = renewal.waker();
        agent.subscriber().on_publish(move || waker.wake());
        let config = RuntimeConfig::from(&args.runtime);
        let shard_count = match config.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let metrics = Metrics::new(shard_count);
        let dns = Dns::start(&args.dns_servers)?;
        let dns_proxy = match args.dns_proxy {
            Some(listen) => Some(dns.serve_proxy(
                listen,
                mesh_answer(agent.subscriber()),
                args.runtime.replace,
            )?),
            None => None,
        };
        let shared = Shared {
            node: Arc::from(args.node.as_str()),
            certs: certs.clone(),
            metrics: metrics.clone(),
            subscriber: agent.subscriber(),
            dns,
        };
        let mut builder =
            Runtime::builder(config).listener(ListenerSpec::new("socks5", args.socks5));
        if let Some(redirect) = args.redirect {
            builder = builder.listener(ListenerSpec::new("redirect", redirect));
        }
        if let Some(plaintext) = args.inbound_plaintext {
            builder = builder.listener(ListenerSpec::new("plaintext", plaintext));
        }
        let runtime = builder
            .start(move |shard| shard_main(shard, shared.clone()))
            .map_err(|e| e.to_string())?;
        // The admin address serves everything; the metrics and readiness ports are the same
        // server on Istio's ports, for scrapers and probes that expect them there.
        let registry = || {
            let mut registry = Registry::default();
            registry.register_collector(Box::new(RuntimeCollector::new(&runtime)));
            registry.register_collector(Box::new(AgentCollector(agent.stats())));
            registry.register_collector(Box::new(metrics.clone()));
            registry
        };
        let source = Arc::new(NodeAdmin {
            config: ConfigAdmin::new(agent.subscriber(), {
                let certs = certs.clone();
                move || certs.infos()
            }),
            subscriber: agent.subscriber(),
            node: args.node.clone(),
            certs: certs.clone(),
            drain: runtime.drain_signal(),
        });
        let [admin, metrics_server, readiness] = start_proxy_servers(
            args.admin,
            args.metrics,
            args.readiness,
            registry,
            source,
            args.runtime.replace,
        )
        .map_err(|e| e.to_string())?;
        Ok(Node {
            runtime,
            admin,
            metrics: metrics_server,
            readiness,
            agent,
            certs,
            dns_proxy,
            _renewal: renewal,
        })
    }

    pub fn socks5_addr(&self) -> SocketAddr {
        self.runtime.shards()[0].listeners[0]
    }
}

async fn shard_main(shard: Shard, shared: Shared) {
    let shard = Rc::new(shard);
    let subscriber = shared.subscriber.clone();
    let latest = subscriber.clone();
    // The derived state is the snapshot itself (shared, not copied).
    let view = shard.view(subscriber, move |_: &Snapshot| latest.current());
    shard.follow(view.clone());
    let certs = shared.certs.clone();
    let seed = (Instant::now().elapsed().as_nanos() as u64)
        ^ (shard.index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ 0x2545_F491_4F6C_DD1D;
    let shard_metrics = shared.metrics.shard(shard.index);
    let ctx = Rc::new(ShardCtx {
        shard: shard.clone(),
        shared,
        view,
        server_tls: RefCell::new(HashMap::new()),
        pool: certs.hbone_pool(),
        metrics: shard_metrics,
        round_robin: Cell::new(shard.index),
        trace_seed: Cell::new(seed | 1),
        dns_cache: DnsCache::default(),
    });
    monoio::spawn(reconcile_inbound(ctx.clone()));
    // SOCKS5 first, then redirect capture when enabled; each served until the drain.
    let mut listeners = shard.take_listeners().into_iter();
    let socks = listeners.next();
    for listener in listeners {
        let (ctx, shard) = (ctx.clone(), shard.clone());
        let own = shoal_runtime::capture::own_address(&listener);
        monoio::spawn(async move {
            if listener.spec.name == "plaintext" {
                shard
                    .serve(listener, move |tcp, client| {
                        inbound_plaintext(ctx.clone(), tcp, client, own)
                    })
                    .await
            } else {
                shard
                    .serve(listener, move |tcp, client| {
                        outbound_redirect(ctx.clone(), tcp, client, own)
                    })
                    .await
            }
        });
    }
    if let Some(listener) = socks {
        shard
            .serve(listener, move |tcp, client| {
                outbound_socks5(ctx.clone(), tcp, client)
            })
            .await;
    }
}

/// Binds HBONE listeners on the addresses of this node's workloads as they appear, and closes
/// them as they go.
async fn reconcile_inbound(ctx: Rc<ShardCtx>) {
    // A listener per local address, with the sender that stops it when the address goes.
    let mut bound: HashMap<IpAddr, tokio::sync::oneshot::Sender<()>> = HashMap::new();
    loop {
        let snapshot = ctx.snapshot();
        let wanted = local_addresses(&snapshot.value, &ctx.shared.node);
        // Addresses no longer ours (the pod left, or moved node): stop serving them, so the
        // address is free for whoever has it next. Open tunnels finish on their own.
        bound.retain(|ip, _| wanted.contains(ip));
        for ip in wanted {
            if bound.contains_key(&ip) {
                continue;
            }
            let spec = ListenerSpec::new("hbone", SocketAddr::new(ip, HBONE_PORT));
            match ctx.shard.bind(&spec) {
                Ok(listener) => {
                    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                    bound.insert(ip, stop);
                    let ctx2 = ctx.clone();
                    monoio::spawn(async move {
                        let shard = ctx2.shard.clone();
                        let serve = shard.serve(listener, move |tcp, peer| {
                            inbound(ctx2.clone(), tcp, peer, ip)
                        });
                        // Dropping `serve` closes the listener; a dropped sender resolves `stopped`.
                        monoio::select! {
                            _ = serve => {}
                            _ = stopped => {}
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(shard = ctx.shard.index, error = %e, "cannot listen for a local workload")
                }
            }
        }
        // `follow` keeps the view current too, so wait on the version seen here, not the view's.
        monoio::select! {
            _ = ctx.view.changed_since(snapshot.version) => {}
            _ = ctx.shard.drain().wait() => return,
        }
    }
}

/// Istio's labels for a connection (response flags filled in on failure).
fn tcp_labels<'a>(
    reporter: &'static str,
    source: Option<&'a Workload>,
    source_principal: Option<&'a str>,
    destination: Option<&'a Workload>,
    service: Option<&'a str>,
    destination_principal: Option<&'a str>,
    mtls: bool,
) -> metrics::TcpLabels<'a> {
    TcpLabelsBuilder {
        reporter,
        source: source.map(|w| {
            (
                metrics::workload_name(w),
                &*w.namespace,
                source_principal.unwrap_or(&w.identity),
            )
        }),
        destination: destination.map(|w| (metrics::workload_name(w), &*w.namespace)),
        destination_service: service,
        destination_principal,
        response_flags: "",
        mtls,
    }
    .build()
}

/// What is recorded of one connection: its metrics as it opens and closes (or fails), and one
/// access-log line at its end.
struct AccessLog<'a> {
    direction: &'static str,
    src: SocketAddr,
    src_identity: Option<&'a str>,
    dst: SocketAddr,
    dst_hbone: Option<SocketAddr>,
    dst_service: Option<&'a str>,
    dst_workload: Option<&'a str>,
    dst_identity: Option<&'a str>,
    started: Instant,
    metrics: Arc<ShardMetrics>,
    labels: metrics::TcpLabels<'a>,
    counters: Option<Arc<metrics::TcpCounters>>,
}

impl AccessLog<'_> {
    /// The connection is up (counted as opened; its close is counted by `emit`). Its copy adds
    /// the bytes it moves to the counters returned, as it moves them.
    fn opened(&mut self) -> Arc<metrics::TcpCounters> {
        let counters = self.metrics.counters(&self.labels);
        counters.opened();
        self.counters = Some(counters.clone());
        counters
    }

    /// The connection failed before it was up: counted with its response flag, and logged.
    fn failed(&self, flag: &'static str, error: &str) {
        self.failed_by(flag, error, None);
    }

    /// A policy refused the connection: as `failed`, naming the policy in a field of its own.
    fn denied(&self, denied: &decide::Denied) {
        self.failed_by(denied.flag, &denied.reason, denied.policy.as_deref());
    }

    fn failed_by(&self, flag: &'static str, error: &str, policy: Option<&str>) {
        self.metrics.counters(&self.labels.with_flag(flag)).failed();
        self.line(0, 0, Some(&format!("{error} ({flag})")), policy);
    }

    /// The connection has ended: its close counted, its line written. `sent` went toward the
    /// destination, `received` came from it, on either side.
    fn emit(&self, sent: u64, received: u64, error: Option<&str>) {
        self.line(sent, received, error, None);
    }

    fn line(&self, sent: u64, received: u64, error: Option<&str>, policy: Option<&str>) {
        if let Some(c) = &self.counters {
            c.closed();
        }
        shoal_runtime::logging::access(
            "connection complete",
            format_args!(
                "direction={:?} src.addr={} src.identity={:?} dst.addr={} dst.hbone_addr={} \
                 dst.service={:?} dst.workload={:?} dst.identity={:?} bytes_sent={} bytes_recv={} \
                 duration_ms={} error={:?} policy={:?}",
                self.direction,
                self.src,
                self.src_identity.unwrap_or("-"),
                self.dst,
                OrDash(self.dst_hbone),
                self.dst_service.unwrap_or("-"),
                self.dst_workload.unwrap_or("-"),
                self.dst_identity.unwrap_or("-"),
                sent,
                received,
                self.started.elapsed().as_millis() as u64,
                error.unwrap_or("-"),
                policy.unwrap_or("-"),
            ),
        );
    }
}

/// Connects to an upstream (a local workload, or a passthrough destination) within
/// `UPSTREAM_CONNECT_TIMEOUT`, with TCP_NODELAY; the error says why, and whether time ran out.
async fn connect_upstream(addr: SocketAddr) -> Result<TcpStream, (String, bool)> {
    shoal_runtime::copy::connect_within(addr, UPSTREAM_CONNECT_TIMEOUT)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => ("upstream connect timed out".to_string(), true),
            _ => (format!("upstream connect: {e}"), false),
        })
}

/// How the client's connection reached us, which decides how it is answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// SOCKS5: the outcome is a SOCKS5 reply.
    Socks5,
    /// Redirected (iptables): the client knows nothing of us; a refusal is a closed connection.
    Redirect,
}

async fn answer(tcp: &mut TcpStream, capture: Capture, code: u8) {
    if capture == Capture::Socks5 {
        socks5::answer(tcp, code).await;
    }
}

/// SOCKS5 (15080): the destination comes from the SOCKS5 request.
async fn outbound_socks5(ctx: Rc<ShardCtx>, mut tcp: TcpStream, client: SocketAddr) {
    let started = Instant::now();
    let destination = match socks5::accept(&mut tcp).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%client, error = %e, "SOCKS5 refused");
            return;
        }
    };
    let current = ctx.snapshot();
    let destination = match destination {
        Destination::Addr(a) => a,
        Destination::Name(name, port) => {
            let vip = current
                .value
                .service_by_host(&name)
                .and_then(|s| s.vips.first().copied());
            match vip {
                Some(vip) => SocketAddr::new(vip, port),
                // Not a mesh host: resolved as the app would have, then passed through.
                None => match ctx.dns_cache.resolve(&ctx.shared.dns, &name).await {
                    Ok(addrs) => SocketAddr::new(addrs[0], port),
                    Err(e) => {
                        socks5::answer(&mut tcp, reply::HOST_UNREACHABLE).await;
                        tracing::info!(target: "access", direction = "outbound", src.addr = %client, dst = %name, error = %e, "connection refused: unknown host");
                        return;
                    }
                },
            }
        }
    };
    outbound(
        ctx,
        tcp,
        client,
        destination,
        Capture::Socks5,
        started,
        current,
    )
    .await
}

/// Redirect capture (15001): the destination is the one the client dialled, from the kernel's NAT
/// record (`SO_ORIGINAL_DST`). A connection without one was not redirected: refused, since
/// forwarding it to our own address would loop. `own`: the listener's address, if fixed.
async fn outbound_redirect(
    ctx: Rc<ShardCtx>,
    tcp: TcpStream,
    client: SocketAddr,
    own: Option<SocketAddr>,
) {
    let started = Instant::now();
    let Some(destination) = shoal_runtime::capture::redirected_destination(&tcp, own) else {
        tracing::info!(target: "access", direction = "outbound", src.addr = %client, error = "no original destination (not redirected)", "connection refused");
        return;
    };
    let current = ctx.snapshot();
    outbound(
        ctx,
        tcp,
        client,
        destination,
        Capture::Redirect,
        started,
        current,
    )
    .await
}

/// classify (the source workload) → decide → connect → copy → record.
async fn outbound(
    ctx: Rc<ShardCtx>,
    mut tcp: TcpStream,
    client: SocketAddr,
    destination: SocketAddr,
    capture: Capture,
    started: Instant,
    current: Rc<Current>,
) {
    let snapshot = &current.value;
    let Some(source) = snapshot.workload_by_ip(client.ip()) else {
        answer(&mut tcp, capture, reply::NOT_ALLOWED).await;
        let labels = tcp_labels("source", None, None, None, None, None, false).with_flag("NR");
        ctx.metrics.counters(&labels).failed();
        tracing::info!(target: "access", direction = "outbound", src.addr = %client, dst.addr = %destination, error = %decide::Refusal::UnknownSource(client.ip()), "connection refused");
        return;
    };
    // Decide.
    let decision = decide::outbound(snapshot, Some(source), destination, &mut |n| ctx.next(n));
    let (plan, notes) = match decision {
        Ok(d) => d,
        Err(refusal) => {
            let code = match refusal {
                decide::Refusal::NoHealthyUpstream(_) => reply::HOST_UNREACHABLE,
                _ => reply::NOT_ALLOWED,
            };
            answer(&mut tcp, capture, code).await;
            let labels = tcp_labels("source", Some(source), None, None, None, None, false)
                .with_flag(refusal.response_flag());
            ctx.metrics.counters(&labels).failed();
            tracing::info!(target: "access", direction = "outbound", src.addr = %client, src.identity = %source.identity, dst.addr = %destination, response_flags = refusal.response_flag(), error = %refusal, "connection refused");
            return;
        }
    };
    if let Some(waypoint) = &notes.waypoint_bypassed {
        tracing::warn!(%destination, waypoint = %waypoint, "waypoint not ready: sending straight to the destination (L7 policy is not applied)");
    }
    // Connect, copy, record.
    match plan {
        Plan::Passthrough { addr, workload } => {
            let destination = workload.map(|w| snapshot.workload(w));
            let mut log = AccessLog {
                direction: "outbound",
                src: client,
                src_identity: Some(&source.identity),
                dst: addr,
                dst_hbone: None,
                dst_service: None,
                dst_workload: destination.map(|w| &*w.name),
                dst_identity: None,
                started,
                metrics: ctx.metrics.clone(),
                labels: tcp_labels("source", Some(source), None, destination, None, None, false),
                counters: None,
            };
            let upstream = match connect_upstream(addr).await {
                Ok(u) => u,
                Err((why, timed_out)) => {
                    let code = if timed_out {
                        reply::HOST_UNREACHABLE
                    } else {
                        reply::CONNECTION_REFUSED
                    };
                    answer(&mut tcp, capture, code).await;
                    log.failed("UF", &why);
                    return;
                }
            };
            answer(&mut tcp, capture, reply::SUCCEEDED).await;
            let counters = log.opened();
            let (sent, received) = counters.tallies();
            let result =
                copy_bidirectional_tallied(tcp, upstream, ctx.shard.pool(), &sent, &received).await;
            log.emit(
                sent.count(),
                received.count(),
                result.err().map(|e| e.to_string()).as_deref(),
            );
        }
        Plan::Hbone {
            dial,
            authority,
            identity,
            spiffe,
            workload,
            waypoint,
            service_host,
        } => {
            let destination = workload.map(|w| snapshot.workload(w));
            let mut log = AccessLog {
                direction: "outbound",
                src: client,
                src_identity: Some(&source.identity),
                dst: authority,
                dst_hbone: Some(dial),
                dst_service: service_host.as_deref(),
                dst_workload: destination.map(|w| &*w.name).or(waypoint.as_deref()),
                dst_identity: Some(&identity),
                started,
                metrics: ctx.metrics.clone(),
                labels: tcp_labels(
                    "source",
                    Some(source),
                    None,
                    destination,
                    service_host.as_deref(),
                    Some(&identity),
                    true,
                ),
                counters: None,
            };
            let (Ok(source_id), Ok(destination_id)) = (source.spiffe.clone(), spiffe) else {
                answer(&mut tcp, capture, reply::GENERAL_FAILURE).await;
                log.failed("IDENTITY_ERROR", "identity is not a SPIFFE id");
                return;
            };
            let key = PoolKey::new(source_id, vec![destination_id], dial, Some(client.ip()));
            let request = OutboundConnect {
                authority,
                client,
                service_host: service_host.clone(),
                baggage: Baggage {
                    namespace: Some(source.namespace.clone()),
                    ..Baggage::default()
                },
                trace: ctx.trace(),
            };
            match ctx.pool.open(&key, &request).await {
                Ok(pooled) => {
                    answer(&mut tcp, capture, reply::SUCCEEDED).await;
                    let counters = log.opened();
                    let (sent, received) = counters.tallies();
                    let _guard = pooled.guard;
                    let result =
                        copy_tcp_tunnel_tallied(tcp, pooled.tunnel, &sent, &received).await;
                    log.emit(
                        sent.count(),
                        received.count(),
                        result.err().map(|e| e.to_string()).as_deref(),
                    );
                }
                Err(e) => {
                    answer(&mut tcp, capture, reply::CONNECTION_REFUSED).await;
                    log.failed("CONNECT", &e.to_string());
                }
            }
        }
    }
}

/// Plaintext inbound (15006): a connection redirected on its way to one of this node's workloads.
/// admit (PeerAuthentication, L4 policy without identity) → connect → copy → record.
async fn inbound_plaintext(
    ctx: Rc<ShardCtx>,
    tcp: TcpStream,
    client: SocketAddr,
    own: Option<SocketAddr>,
) {
    let started = Instant::now();
    let Some(destination) = shoal_runtime::capture::redirected_destination(&tcp, own) else {
        tracing::info!(target: "access", direction = "inbound", src.addr = %client, error = "no original destination (not redirected)", "connection refused");
        return;
    };
    let current = ctx.snapshot();
    let snapshot = &current.value;
    let workload = snapshot.workload_by_ip(destination.ip());
    let mut log = AccessLog {
        direction: "inbound",
        src: client,
        src_identity: None,
        dst: destination,
        dst_hbone: None,
        dst_service: None,
        dst_workload: workload.map(|w| &*w.name),
        dst_identity: workload.map(|w| &*w.identity),
        started,
        metrics: ctx.metrics.clone(),
        labels: tcp_labels(
            "destination",
            snapshot.workload_by_ip(client.ip()),
            None,
            workload,
            None,
            workload.map(|w| &*w.identity),
            false,
        ),
        counters: None,
    };
    let admitted =
        match decide::plaintext_inbound(snapshot, &ctx.shared.node, destination, client.ip()) {
            Ok(a) => a,
            Err(denied) => {
                log.denied(&denied);
                return;
            }
        };
    let upstream = match connect_upstream(admitted.upstream).await {
        Ok(u) => u,
        Err((why, _)) => {
            log.failed("UF", &why);
            return;
        }
    };
    let counters = log.opened();
    let (sent, received) = counters.tallies();
    let result =
        copy_bidirectional_tallied(tcp, upstream, ctx.shard.pool(), &sent, &received).await;
    log.emit(
        sent.count(),
        received.count(),
        result.err().map(|e| e.to_string()).as_deref(),
    );
}

async fn inbound(ctx: Rc<ShardCtx>, tcp: TcpStream, peer_addr: SocketAddr, local: IpAddr) {
    let current = ctx.snapshot();
    let Some(workload) = current.value.workload_by_ip(local) else {
        return;
    };
    let config = match ctx.server_config(&workload.identity) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(identity = %workload.identity, error = %e, "no certificate to serve with");
            return;
        }
    };
    let (tls, peer) = match stream::accept(tcp, config).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::info!(target: "access", direction = "inbound", src.addr = %peer_addr, dst.addr = %local, error = %e, "TLS refused");
            return;
        }
    };
    let principal: Rc<str> = Rc::from(peer.principal());
    let drain = ctx.shard.drain().clone();
    let goaway = async move { drain.wait().await };
    let handler_ctx = ctx.clone();
    let _ = server::serve(
        tls,
        peer,
        move |connect: InboundConnect, responder: server::Responder| {
            let (ctx, principal) = (handler_ctx.clone(), principal.clone());
            async move { tunnel(ctx, connect, responder, principal, peer_addr, local).await }
        },
        goaway,
    )
    .await;
}

async fn tunnel(
    ctx: Rc<ShardCtx>,
    connect: InboundConnect,
    responder: server::Responder,
    principal: Rc<str>,
    peer_addr: SocketAddr,
    local: IpAddr,
) {
    let started = Instant::now();
    // Each CONNECT is judged by the snapshot current when it arrives: a policy change applies to
    // the next tunnel, open ones keep going.
    let current = ctx.snapshot();
    let snapshot = &current.value;
    let source_ip = connect.client.map_or(peer_addr.ip(), |c| c.ip());
    let peer = decide::Peer {
        principal: &principal,
        namespace: connect.peer.namespace(),
        service_account: connect.peer.service_account(),
        ip: source_ip,
    };
    let destination = snapshot.workload_by_ip(connect.authority.ip());
    let source = snapshot.workload_by_ip(source_ip);
    let peer_identity = connect.peer.to_string();
    let mut log = AccessLog {
        direction: "inbound",
        src: connect.client.unwrap_or(peer_addr),
        // The SPIFFE URI, as the outbound side and the destination's identity are written.
        src_identity: Some(&peer_identity),
        dst: connect.authority,
        dst_hbone: Some(SocketAddr::new(local, HBONE_PORT)),
        dst_service: connect.service_host.as_deref(),
        dst_workload: destination.map(|w| &*w.name),
        dst_identity: destination.map(|w| &*w.identity),
        started,
        metrics: ctx.metrics.clone(),
        labels: tcp_labels(
            "destination",
            source,
            Some(&peer_identity),
            destination,
            connect.service_host.as_deref(),
            destination.map(|w| &*w.identity),
            true,
        ),
        counters: None,
    };
    let admitted = match decide::inbound(snapshot, &ctx.shared.node, local, connect.authority, peer)
    {
        Ok(a) => a,
        Err(denied) => {
            responder.refuse(denied.status);
            log.denied(&denied);
            return;
        }
    };
    if let Some(audit) = &admitted.audit {
        tracing::info!(target: "access", policy = %audit, src.identity = %principal, dst.addr = %connect.authority, "audit or dry-run policy matched");
    }
    let upstream = match connect_upstream(admitted.upstream).await {
        Ok(u) => u,
        Err((why, _)) => {
            responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
            log.failed("UF", &why);
            return;
        }
    };
    match responder.accept() {
        Ok(tunnel) => {
            let counters = log.opened();
            let (sent, received) = counters.tallies();
            // Inbound, what the peer sent (tunnel → workload) is what this side reports as sent.
            let result = copy_tcp_tunnel_tallied(upstream, tunnel, &received, &sent).await;
            log.emit(
                sent.count(),
                received.count(),
                result.err().map(|e| e.to_string()).as_deref(),
            );
        }
        Err(e) => log.failed("DC", &e.to_string()),
    }
}

/// The DNS proxy's answers: a mesh host (a ServiceEntry host, a Service's name in any of the forms
/// Kubernetes' search path gives, the short name in the asking pod's namespace) → its VIPs.
fn mesh_answer(
    subscriber: shoal_runtime::Subscriber<Snapshot>,
) -> Arc<shoal_runtime::dns::MeshAnswer> {
    Arc::new(move |client: std::net::IpAddr, host: &str| {
        let current = subscriber.current();
        let s = &current.value;
        let host = host.to_ascii_lowercase();
        let mut names = vec![
            host.clone(),
            host.strip_suffix(".svc.cluster.local")
                .unwrap_or(&host)
                .to_string(),
        ];
        if !host.contains('.') {
            if let Some(w) = s.workload_by_ip(client) {
                names.push(format!("{host}.{}", w.namespace));
            }
        }
        names
            .iter()
            .filter_map(|n| s.service_by_host(n))
            .find(|svc| !svc.vips.is_empty())
            .map(|svc| svc.vips.clone())
    })
}
