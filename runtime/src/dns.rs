//! Name resolution off the reactors. One thread per process runs hickory's resolver — and, in
//! ztunnel, the DNS proxy — on a small tokio runtime of its own; shards ask it over a channel and
//! await the answer, so a slow or silent name server never blocks a shard. Answers carry their TTL
//! and a shard keeps them (`DnsCache`) until it runs out; when a refresh fails, the last answer is
//! used a while longer, as Envoy does with DNS clusters.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

/// A lookup that takes longer than this fails (the request that needed it gets 503).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest time an answer is kept, whatever its TTL (a zero TTL would mean a lookup per request).
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// How long a stale answer is still used after a failed refresh.
pub const STALE_GRACE: Duration = Duration::from_secs(60);
/// TTL of the DNS proxy's own answers (mesh hosts and their VIPs).
pub const PROXY_ANSWER_TTL_S: u32 = 30;
/// A forwarded query whose upstream answer takes longer than this is dropped.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest DNS message over UDP we read or relay.
const UDP_MESSAGE_MAX_BYTES: usize = 4096;

/// Addresses for a name and until when they hold.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub addrs: Arc<[IpAddr]>,
    pub valid_until: Instant,
}

/// The process's resolver thread. Cheap to clone; the thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct Dns {
    inner: Arc<Inner>,
}

struct Inner {
    handle: tokio::runtime::Handle,
    resolver: TokioResolver,
    /// Where names the proxy does not know are forwarded.
    upstream: Vec<SocketAddr>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Answers for names the mesh knows: (the asking client, the name) → addresses, or `None` to
/// forward the query.
pub type MeshAnswer = dyn Fn(IpAddr, &str) -> Option<Vec<IpAddr>> + Send + Sync;

impl Dns {
    /// Starts the resolver thread. `servers` are the name servers to ask; empty means the
    /// system's (`/etc/resolv.conf`).
    pub fn start(servers: &[SocketAddr]) -> Result<Dns, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("DNS runtime: {e}"))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("shoal-dns".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| format!("DNS thread: {e}"))?;
        let (resolver, upstream) = {
            let _entered = handle.enter();
            if servers.is_empty() {
                let builder = TokioResolver::builder_tokio()
                    .map_err(|e| format!("reading the system's DNS configuration: {e}"))?;
                let resolver = builder.build().map_err(|e| format!("DNS resolver: {e}"))?;
                let upstream = system_servers();
                (resolver, upstream)
            } else {
                let mut config = ResolverConfig::from_parts(None, vec![], vec![]);
                for s in servers {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    config.add_name_server(NameServerConfig::new(s.ip(), true, vec![udp, tcp]));
                }
                let mut builder =
                    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
                builder.options_mut().timeout = LOOKUP_TIMEOUT;
                let resolver = builder.build().map_err(|e| format!("DNS resolver: {e}"))?;
                (resolver, servers.to_vec())
            }
        };
        Ok(Dns {
            inner: Arc::new(Inner {
                handle,
                resolver,
                upstream,
                _stop: stop,
            }),
        })
    }

    /// Looks `host` up (A and AAAA) on the resolver thread.
    pub async fn lookup(&self, host: &str) -> Result<Resolved, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let resolver = self.inner.resolver.clone();
        let name = host.to_string();
        self.inner.handle.spawn(async move {
            let answer =
                match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(name.as_str())).await
                {
                    Ok(Ok(found)) => {
                        let addrs: Vec<IpAddr> = found.iter().collect();
                        if addrs.is_empty() {
                            Err(format!("{name}: no addresses"))
                        } else {
                            Ok(Resolved {
                                addrs: addrs.into(),
                                valid_until: found.valid_until().max(Instant::now() + MIN_TTL),
                            })
                        }
                    }
                    Ok(Err(e)) => Err(format!("{name}: {e}")),
                    Err(_) => Err(format!(
                        "{name}: no answer within {} s",
                        LOOKUP_TIMEOUT.as_secs()
                    )),
                };
            let _ = tx.send(answer);
        });
        rx.await
            .unwrap_or_else(|_| Err("the DNS thread has stopped".into()))
    }

    /// Serves DNS on `listen` (UDP): names `mesh` knows are answered with their addresses, the
    /// rest are forwarded to this resolver's name servers and their answers relayed. With
    /// `replace` (`RuntimeConfig::replace`) it listens beside a running instance's socket.
    pub fn serve_proxy(
        &self,
        listen: SocketAddr,
        mesh: Arc<MeshAnswer>,
        replace: bool,
    ) -> Result<SocketAddr, String> {
        let socket = udp_socket(listen, replace).map_err(|e| {
            format!(
                "cannot listen on {listen} (DNS proxy): {e}{}",
                crate::listener::hint(&e)
            )
        })?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("DNS proxy on {listen}: {e}"))?;
        let local = socket
            .local_addr()
            .map_err(|e| format!("DNS proxy on {listen}: {e}"))?;
        let upstream = self.inner.upstream.clone();
        let _entered = self.inner.handle.enter();
        let socket = Arc::new(
            tokio::net::UdpSocket::from_std(socket)
                .map_err(|e| format!("DNS proxy on {listen}: {e}"))?,
        );
        self.inner.handle.spawn(async move {
            let mut buf = vec![0u8; UDP_MESSAGE_MAX_BYTES];
            loop {
                let (n, client) = match socket.recv_from(&mut buf).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "DNS proxy receive failed");
                        continue;
                    }
                };
                let query = buf[..n].to_vec();
                match answer(&query, client.ip(), &*mesh) {
                    Some(reply) => {
                        let _ = socket.send_to(&reply, client).await;
                    }
                    None => {
                        let (socket, upstream) = (socket.clone(), upstream.clone());
                        tokio::spawn(async move {
                            if let Some(reply) = forward(&query, &upstream).await {
                                let _ = socket.send_to(&reply, client).await;
                            }
                        });
                    }
                }
            }
        });
        Ok(local)
    }
}

/// A UDP socket on `listen`, with SO_REUSEPORT so that a replacement can listen beside it.
/// Unless `shared`, the address is first bound once without it, so that a port someone holds is
/// refused rather than shared. Port 0 is bound plainly: no replacement can name it.
fn udp_socket(listen: SocketAddr, shared: bool) -> std::io::Result<std::net::UdpSocket> {
    if !shared {
        let probe = std::net::UdpSocket::bind(listen)?;
        if listen.port() == 0 {
            return Ok(probe);
        }
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    socket.bind(&listen.into())?;
    Ok(socket.into())
}

/// The name servers of `/etc/resolv.conf`, for forwarding.
fn system_servers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The proxy's own answer to `query`, or `None` to forward it. Malformed queries get FORMERR.
pub fn answer(query: &[u8], client: IpAddr, mesh: &MeshAnswer) -> Option<Vec<u8>> {
    let Ok(message) = Message::from_vec(query) else {
        // Not even a header to answer to.
        if query.len() < 2 {
            return None;
        }
        let id = u16::from_be_bytes([query[0], query[1]]);
        return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
            .to_vec()
            .ok();
    };
    let q = message.queries.first()?;
    if message.queries.len() != 1 || !matches!(q.query_type(), RecordType::A | RecordType::AAAA) {
        return None;
    }
    let name = q.name().to_ascii();
    let host = name.trim_end_matches('.');
    let addrs = mesh(client, host)?;
    let mut reply = Message::response(message.metadata.id, OpCode::Query);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = message.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    for ip in addrs {
        let rdata = match (ip, q.query_type()) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
            _ => continue,
        };
        reply.add_answer(Record::from_rdata(
            q.name().clone(),
            PROXY_ANSWER_TTL_S,
            rdata,
        ));
    }
    reply.to_vec().ok()
}

/// Relays `query` to the first upstream that answers.
async fn forward(query: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    for server in upstream {
        let bind: SocketAddr = if server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        if socket.send_to(query, server).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; UDP_MESSAGE_MAX_BYTES];
        match tokio::time::timeout(FORWARD_TIMEOUT, socket.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) if from == *server => return Some(buf[..n].to_vec()),
            _ => continue,
        }
    }
    None
}

/// A shard's answers, kept for their TTL.
#[derive(Default)]
pub struct DnsCache {
    entries: RefCell<HashMap<String, Resolved>>,
}

impl DnsCache {
    /// The addresses of `host`: from the cache while its answer holds, else from `dns`; a failed
    /// refresh falls back to the last answer for `STALE_GRACE`.
    pub async fn resolve(&self, dns: &Dns, host: &str) -> Result<Arc<[IpAddr]>, String> {
        let now = Instant::now();
        if let Some(r) = self.entries.borrow().get(host) {
            if r.valid_until > now {
                return Ok(r.addrs.clone());
            }
        }
        match dns.lookup(host).await {
            Ok(r) => {
                let addrs = r.addrs.clone();
                self.entries.borrow_mut().insert(host.to_string(), r);
                Ok(addrs)
            }
            Err(e) => match self.entries.borrow().get(host) {
                Some(r) if r.valid_until + STALE_GRACE > now => {
                    tracing::warn!(host, error = %e, "DNS refresh failed; using the last answer");
                    Ok(r.addrs.clone())
                }
                _ => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.add_query(Query::query(Name::from_str(name).expect("name"), t));
        m.to_vec().expect("encode")
    }

    #[test]
    fn the_proxy_answers_mesh_names_and_forwards_the_rest() {
        let mesh = |_: IpAddr, host: &str| {
            (host == "api.example.com").then(|| vec!["240.240.0.7".parse().expect("ip")])
        };
        let client: IpAddr = "127.0.0.1".parse().expect("ip");
        let reply =
            answer(&query("api.example.com.", RecordType::A), client, &mesh).expect("answered");
        let m = Message::from_vec(&reply).expect("decodes");
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.answers.len(), 1);
        assert!(matches!(&m.answers[0].data, RData::A(a) if a.0.to_string() == "240.240.0.7"));
        // AAAA for a v4-only VIP: an empty answer, not a forward (the name is the mesh's).
        let reply =
            answer(&query("api.example.com.", RecordType::AAAA), client, &mesh).expect("answered");
        assert!(Message::from_vec(&reply)
            .expect("decodes")
            .answers
            .is_empty());
        assert!(answer(&query("other.example.com.", RecordType::A), client, &mesh).is_none());
        assert!(answer(&query("api.example.com.", RecordType::MX), client, &mesh).is_none());
        // Garbage with an id gets FORMERR; too short for one gets nothing.
        let reply = answer(&[0x12, 0x34, 0xff], client, &mesh).expect("formerr");
        let m = Message::from_vec(&reply).expect("decodes");
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(answer(&[1], client, &mesh).is_none());
    }
}
