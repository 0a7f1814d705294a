//! One waypoint process: the control agent, the waypoint's certificate, the shards with their HBONE
//! listener on the Gateway's address, and the admin servers. A connection reads top to bottom:
//! accept → TLS (the waypoint's identity) → per CONNECT: `proxy::tunnel` (classify → per request:
//! authorize → route → endpoint → forward → record).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpStream;
use prometheus_client::registry::Registry;
use shoal_control::agent::ConfigAdmin;
use shoal_control::certs::{CertStore, Renewal};
use shoal_control::snapshot::Snapshot;
use shoal_control::{Agent, AgentCollector, Options};
use shoal_hbone::connect::InboundConnect;
use shoal_hbone::{server, stream, Identity};
use shoal_runtime::admin::{start_proxy_servers, AdminServer, RuntimeCollector};
use shoal_runtime::dns::Dns;
use shoal_runtime::{ListenerSpec, Runtime, RuntimeArgs, RuntimeConfig, Shard};

use crate::cluster::{Clusters, SharedPools};
use crate::metrics::Metrics;
use crate::proxy::{self, Ctx, Limits, Role, Traffic};
use crate::ratelimit::{RateLimiters, ShardLimiter};
use crate::upstream::{Upstreams, HBONE_PORT};

#[derive(Clone, Debug, clap::Args)]
pub struct WaypointArgs {
    /// The manifests directory (watched).
    #[arg(long, env = "SHOAL_MANIFESTS")]
    pub manifests: PathBuf,
    /// The Gateway (class istio-waypoint) this process serves, as NAMESPACE/NAME.
    #[arg(
        long,
        env = "SHOAL_GATEWAY",
        required_unless_present = "sidecar",
        conflicts_with = "sidecar"
    )]
    pub gateway: Option<String>,
    /// Run as a classic sidecar beside the pod NAMESPACE/NAME instead: its app's outbound HTTP
    /// through --outbound (SOCKS5), HBONE from peers on the pod's address (the baseline ambient
    /// mode is compared against).
    #[arg(long, env = "SHOAL_SIDECAR")]
    pub sidecar: Option<String>,
    /// The sidecar's outbound listener (SOCKS5), for its app.
    #[arg(long, env = "SHOAL_OUTBOUND", default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,
    /// The sidecar's capture listener (`SO_ORIGINAL_DST`), for its app's traffic that iptables
    /// REDIRECTs (or DNATs) to it, as Istio's sidecar takes it on 15001. Off unless given.
    #[arg(long, env = "SHOAL_REDIRECT", requires = "sidecar")]
    pub redirect: Option<SocketAddr>,
    /// The CA directory (`shoalctl ca init`).
    #[arg(long, env = "SHOAL_CA_DIR")]
    pub ca: PathBuf,
    /// Where to serve HBONE; default: the Gateway's (or the pod's) first address, port 15008.
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<SocketAddr>,
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
    /// Certificate lifetime; renewed at half of it.
    #[arg(long, env = "SHOAL_CERT_LIFETIME_S", default_value_t = 24 * 3600)]
    pub cert_lifetime_s: u64,
    /// A request head that has not arrived whole within this long is cut (slow-header floods).
    /// hyper counts the wait for the next request on a kept-alive HTTP/1.1 connection too, so this
    /// is also how long such a connection may idle (as nginx's 60 s client_header_timeout).
    #[arg(long, env = "SHOAL_HEADER_READ_TIMEOUT_MS", default_value_t = 60_000)]
    pub header_read_timeout_ms: u64,
    /// Name servers for ServiceEntry hosts with `resolution: DNS` (IP:PORT, repeatable); none:
    /// the system's (`/etc/resolv.conf`).
    #[arg(long = "dns-server", env = "SHOAL_DNS_SERVERS", value_delimiter = ',')]
    pub dns_servers: Vec<SocketAddr>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl WaypointArgs {
    /// Neither role chosen yet, every admin listener (and a sidecar's outbound) on a kernel-chosen
    /// port on 127.0.0.1 (the demo and tests), the defaults otherwise.
    pub fn on_loopback(manifests: PathBuf, ca: PathBuf, runtime: RuntimeArgs) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        WaypointArgs {
            manifests,
            gateway: None,
            sidecar: None,
            outbound: any,
            redirect: None,
            ca,
            listen: None,
            admin: any,
            metrics: any,
            readiness: any,
            trust_domain: shoal_hbone::DEFAULT_TRUST_DOMAIN.into(),
            root_namespace: "istio-system".into(),
            cert_lifetime_s: 24 * 3600,
            header_read_timeout_ms: 60_000,
            dns_servers: Vec::new(),
            runtime,
        }
    }
}

/// A namespace and name from `NAMESPACE/NAME`.
fn gateway_name(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
    }
}

/// What to run as, from the flags.
fn role(args: &WaypointArgs) -> Result<Role, String> {
    match (&args.gateway, &args.sidecar) {
        (Some(g), None) => Ok(Role::Waypoint {
            gateway: gateway_name(g).map_err(|e| format!("--gateway {e}"))?,
        }),
        (None, Some(p)) => Ok(Role::Sidecar {
            pod: gateway_name(p).map_err(|e| format!("--sidecar {e}"))?,
        }),
        _ => Err("give one of --gateway NAMESPACE/NAME or --sidecar NAMESPACE/POD".into()),
    }
}

/// A sidecar's identity and HBONE address: its pod's.
fn pod_identity(
    snapshot: &Snapshot,
    pod: &(String, String),
) -> Result<(Identity, Option<std::net::IpAddr>), String> {
    let w = snapshot
        .workloads
        .iter()
        .find(|w| w.namespace == pod.0 && w.name == pod.1)
        .ok_or_else(|| format!("no pod {}/{} in the manifests", pod.0, pod.1))?;
    let identity = Identity::parse(&w.identity).map_err(|e| e.to_string())?;
    Ok((identity, w.ips.first().copied()))
}

/// The waypoint's identity: its pods' service account, else the Gateway's name (as Istio names
/// the waypoint's service account after its Gateway).
fn identity(
    snapshot: &Snapshot,
    gateway: &(String, String),
    trust_domain: &str,
) -> Result<Identity, String> {
    let wp = snapshot
        .waypoint_by_name(&gateway.0, &gateway.1)
        .ok_or_else(|| {
            format!(
                "no Gateway {}/{} of class istio-waypoint in the manifests",
                gateway.0, gateway.1
            )
        })?;
    if !wp.identity.is_empty() {
        return Identity::parse(&wp.identity).map_err(|e| e.to_string());
    }
    Identity::parse(&format!(
        "spiffe://{trust_domain}/ns/{}/sa/{}",
        gateway.0, gateway.1
    ))
    .map_err(|e| e.to_string())
}

/// Runs a waypoint until SIGTERM/SIGINT (then drains).
pub fn run(args: &WaypointArgs) -> Result<(), String> {
    let waypoint = Waypoint::start(args)?;
    waypoint
        .runtime
        .handle_signals()
        .map_err(|e| e.to_string())?;
    // A sidecar's outbound listener (for its app) is the second, its capture listener the third.
    let listeners = &waypoint.runtime.shards()[0].listeners;
    let outbound = listeners
        .get(1)
        .map(|a| format!(" outbound={a}"))
        .unwrap_or_default();
    let redirect = listeners
        .get(2)
        .map(|a| format!(" redirect={a}"))
        .unwrap_or_default();
    println!(
        "READY listen={} admin={} driver={} shards={}{outbound}{redirect}",
        waypoint.listen_addr(),
        waypoint.admin.local_addr(),
        waypoint.runtime.shards()[0].driver,
        waypoint.runtime.shards().len()
    );
    waypoint.runtime.join();
    Ok(())
}

/// Ready once the configuration has this waypoint's Gateway and its certificate is issued; not
/// ready while draining.
struct WaypointAdmin {
    config: ConfigAdmin,
    subscriber: shoal_runtime::Subscriber<Snapshot>,
    role: Role,
    identity: Identity,
    certs: Arc<CertStore>,
    drain: shoal_runtime::DrainSignal,
}

impl shoal_runtime::admin::AdminSource for WaypointAdmin {
    fn ready(&self) -> Result<(), String> {
        if self.drain.is_draining() {
            return Err("draining".into());
        }
        let current = self.subscriber.current();
        match &self.role {
            Role::Waypoint { gateway } => {
                if current
                    .value
                    .waypoint_by_name(&gateway.0, &gateway.1)
                    .is_none()
                {
                    return Err(format!(
                        "Gateway {}/{} is not in the configuration",
                        gateway.0, gateway.1
                    ));
                }
            }
            Role::Sidecar { pod } => {
                pod_identity(&current.value, pod)?;
            }
        }
        if !self.certs.has(&self.identity.to_string()) {
            return Err(format!("no certificate yet for {}", self.identity));
        }
        Ok(())
    }

    fn config_dump(&self) -> serde_json::Value {
        self.config.config_dump()
    }
}

/// A started waypoint.
pub struct Waypoint {
    pub runtime: Runtime,
    pub admin: AdminServer,
    pub metrics: AdminServer,
    pub readiness: AdminServer,
    pub agent: Agent,
    pub certs: Arc<CertStore>,
    pub identity: Identity,
    _renewal: Renewal,
}

#[derive(Clone)]
struct Shared {
    role: Role,
    identity: Identity,
    certs: Arc<CertStore>,
    metrics: Metrics,
    subscriber: shoal_runtime::Subscriber<Snapshot>,
    limits: Limits,
    shard_count: usize,
    /// The node-wide remainders of circuit-breaker limits.
    pools: Arc<SharedPools>,
    dns: Dns,
    rate_limits: Arc<RateLimiters>,
}

impl Waypoint {
    pub fn start(args: &WaypointArgs) -> Result<Waypoint, String> {
        let role = role(args)?;
        let options = Options {
            trust_domain: args.trust_domain.clone(),
            root_namespace: args.root_namespace.clone(),
            ..Options::default()
        };
        let agent = Agent::start(&args.manifests, options)
            .map_err(|e| format!("{}: {e}", args.manifests.display()))?;
        let snapshot = agent.current();
        let (identity, listen) = match &role {
            Role::Waypoint { gateway } => {
                let identity = identity(&snapshot.value, gateway, &args.trust_domain)?;
                let listen = match args.listen {
                    Some(a) => a,
                    None => {
                        let wp = snapshot
                            .value
                            .waypoint_by_name(&gateway.0, &gateway.1)
                            .ok_or("the Gateway vanished")?;
                        let ip = wp.addresses.first().ok_or_else(|| {
                            format!(
                                "Gateway {}/{} has no address: give it spec.addresses (type IPAddress), a pod labelled gateway.networking.k8s.io/gateway-name, or --listen",
                                gateway.0, gateway.1
                            )
                        })?;
                        SocketAddr::new(*ip, HBONE_PORT)
                    }
                };
                (identity, listen)
            }
            Role::Sidecar { pod } => {
                let (identity, ip) = pod_identity(&snapshot.value, pod)?;
                let listen = match (args.listen, ip) {
                    (Some(a), _) => a,
                    (None, Some(ip)) => SocketAddr::new(ip, HBONE_PORT),
                    (None, None) => {
                        return Err(format!(
                            "pod {}/{} has no address (status.podIP); give --listen",
                            pod.0, pod.1
                        ))
                    }
                };
                (identity, listen)
            }
        };
        let certs = CertStore::from_ca_dir(
            &args.ca,
            &args.trust_domain,
            Duration::from_secs(args.cert_lifetime_s),
        )?;
        certs.get(&identity)?;
        let renewal = Renewal::start(certs.clone(), {
            let identity = identity.clone();
            move || vec![identity.clone()]
        })
        .map_err(|e| e.to_string())?;
        let config = RuntimeConfig::from(&args.runtime);
        let shard_count = match config.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let metrics = Metrics::new(shard_count);
        let shared = Shared {
            role: role.clone(),
            identity: identity.clone(),
            certs: certs.clone(),
            metrics: metrics.clone(),
            subscriber: agent.subscriber(),
            limits: Limits {
                header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
            },
            shard_count,
            pools: Arc::default(),
            dns: Dns::start(&args.dns_servers)?,
            rate_limits: Arc::default(),
        };
        let mut builder = Runtime::builder(config).listener(ListenerSpec::new("hbone", listen));
        if matches!(role, Role::Sidecar { .. }) {
            builder = builder.listener(ListenerSpec::new("outbound", args.outbound));
            if let Some(redirect) = args.redirect {
                builder = builder.listener(ListenerSpec::new("redirect", redirect));
            }
        }
        let runtime = builder
            .start(move |shard| shard_main(shard, shared.clone()))
            .map_err(|e| e.to_string())?;
        let registry = || {
            let mut registry = Registry::default();
            registry.register_collector(Box::new(RuntimeCollector::new(&runtime)));
            registry.register_collector(Box::new(AgentCollector(agent.stats())));
            registry.register_collector(Box::new(metrics.clone()));
            registry
        };
        let source = Arc::new(WaypointAdmin {
            config: ConfigAdmin::new(agent.subscriber(), {
                let certs = certs.clone();
                move || certs.infos()
            }),
            subscriber: agent.subscriber(),
            role,
            identity: identity.clone(),
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
        Ok(Waypoint {
            runtime,
            admin,
            metrics: metrics_server,
            readiness,
            agent,
            certs,
            identity,
            _renewal: renewal,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.runtime.shards()[0].listeners[0]
    }
}

async fn shard_main(shard: Shard, shared: Shared) {
    let shard = Rc::new(shard);
    let subscriber = shared.subscriber.clone();
    let latest = subscriber.clone();
    let view = shard.view(subscriber, move |_: &Snapshot| latest.current());
    shard.follow(view.clone());
    let pool = shared.certs.hbone_pool();
    let ctx = Rc::new(Ctx::new(
        shard.clone(),
        view,
        shared.role.clone(),
        Upstreams::new(shared.identity.clone(), pool, shared.dns.clone()),
        shared.metrics.shard(shard.index),
        shared.limits,
        Traffic {
            clusters: Clusters::new(shared.shard_count, shared.pools.clone()),
            rate_limits: ShardLimiter::new(shared.rate_limits.clone()),
        },
    ));
    // HBONE in, and for a sidecar its app's outbound (SOCKS5, and captured when enabled); each
    // served until the drain.
    let mut serving = Vec::new();
    for listener in shard.take_listeners() {
        let (ctx, shared, shard2) = (ctx.clone(), shared.clone(), shard.clone());
        serving.push(monoio::spawn(async move {
            if listener.spec.name == "outbound" {
                shard2
                    .serve(listener, move |tcp, client| {
                        proxy::sidecar_outbound_socks5(ctx.clone(), tcp, client)
                    })
                    .await
            } else if listener.spec.name == "redirect" {
                let own = shoal_runtime::capture::own_address(&listener);
                shard2
                    .serve(listener, move |tcp, client| {
                        proxy::sidecar_outbound_redirect(ctx.clone(), tcp, client, own)
                    })
                    .await
            } else {
                shard2
                    .serve(listener, move |tcp, peer| {
                        inbound(ctx.clone(), shared.clone(), tcp, peer)
                    })
                    .await
            }
        }));
    }
    for s in serving {
        s.await;
    }
}

/// One mTLS connection from a ztunnel (or another waypoint client); each CONNECT on it is a
/// tunnel for one client connection.
async fn inbound(ctx: Rc<Ctx>, shared: Shared, tcp: TcpStream, peer_addr: SocketAddr) {
    let config = match shared.certs.server_config(&shared.identity) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(identity = %shared.identity, error = %e, "no certificate to serve with");
            return;
        }
    };
    let (tls, peer) = match stream::accept(tcp, config).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::info!(target: "access", direction = "waypoint", src.addr = %peer_addr, error = %e, "TLS refused");
            return;
        }
    };
    let drain = ctx.shard.drain().clone();
    let goaway = async move { drain.wait().await };
    let _ = server::serve(
        tls,
        peer,
        move |connect: InboundConnect, responder: server::Responder| {
            let ctx = ctx.clone();
            async move {
                match ctx.role {
                    Role::Waypoint { .. } => {
                        proxy::tunnel(ctx, connect, responder, peer_addr).await
                    }
                    Role::Sidecar { .. } => {
                        proxy::sidecar_inbound(ctx, connect, responder, peer_addr).await
                    }
                }
            }
        },
        goaway,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_names_are_namespace_slash_name() {
        assert_eq!(
            gateway_name("bookinfo/waypoint"),
            Ok(("bookinfo".into(), "waypoint".into()))
        );
        for bad in ["waypoint", "/w", "ns/", "a/b/c", ""] {
            assert!(gateway_name(bad).is_err(), "{bad}");
        }
    }
}
