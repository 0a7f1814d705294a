//! The two HBONE nodes the tunnel benchmark measures, each its own process on runtime shards:
//! `server` terminates mTLS + HTTP/2 CONNECT and connects to the authority; `outbound` accepts
//! plain TCP and tunnels each connection to a fixed upstream through the server, on pooled HBONE
//! connections. (The ztunnel binary builds its real inbound and outbound paths on the same parts.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpStream;
use shoal_hbone::ca::{CertificateAuthority, LocalCa};
use shoal_hbone::certs::WorkloadCerts;
use shoal_hbone::client::Connection;
use shoal_hbone::connect::{Baggage, InboundConnect, OutboundConnect};
use shoal_hbone::pool::{Pool, PoolKey};
use shoal_hbone::tls::{self, Trust};
use shoal_hbone::tunnel::copy_tcp_tunnel;
use shoal_hbone::{server, stream, Identity};
use shoal_runtime::{ListenerSpec, Runtime, RuntimeArgs, RuntimeConfig};

pub const SERVER_IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/server";
pub const CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/client";
const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, clap::ValueEnum)]
pub enum Role {
    Server,
    Outbound,
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
                                    let _ = server::serve(tls, peer, inbound, goaway).await;
                                }
                            })
                            .await;
                    }
                }
            })
        }
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
