//! ztunnel's decisions, apart from any I/O: where an outbound connection goes, and whether an
//! inbound tunnel is admitted. Pure functions of (snapshot, source, destination), table-tested; the
//! connection paths take the plan and never read config themselves.

use std::net::{IpAddr, SocketAddr};

use http::StatusCode;
use shoal_control::authz::Request;
use shoal_control::snapshot::{ServiceKind, Snapshot, Spiffe, Workload, WorkloadId};

pub const HBONE_PORT: u16 = 15008;
/// Ports of ztunnel itself on a workload's address: traffic to them is refused (a proxy must not
/// call itself).
pub const PROXY_PORTS: [u16; 3] = [15001, 15006, 15008];

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// mTLS + HTTP/2 CONNECT to `dial` (`ip:15008`) asking for `authority`, expecting the server to
    /// be `identity`.
    Hbone {
        dial: SocketAddr,
        authority: SocketAddr,
        identity: String,
        /// `identity`, parsed (once per snapshot, not per connection).
        spiffe: Spiffe,
        /// The destination workload, when known (for telemetry).
        workload: Option<WorkloadId>,
        /// Set when the tunnel goes to a waypoint (`namespace/name`).
        waypoint: Option<String>,
        /// The service's hostname when addressed to a service (CONNECT's `forwarded: host=`).
        service_host: Option<String>,
    },
    /// Plain TCP: a destination outside the mesh or not in ambient.
    Passthrough {
        addr: SocketAddr,
        workload: Option<WorkloadId>,
    },
}

/// Why an outbound connection is refused; each names its Istio response flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The source address is no workload of the mesh (so there is no identity to send as).
    UnknownSource(IpAddr),
    /// A service with no ready endpoint (UH).
    NoHealthyUpstream(String),
    /// A proxy port of a workload.
    ProxyPort(SocketAddr),
    /// Something configured that this ztunnel cannot do yet (the reason says what).
    Unsupported(String),
}

impl Refusal {
    pub fn response_flag(&self) -> &'static str {
        match self {
            Refusal::NoHealthyUpstream(_) => "UH",
            _ => "NR",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownSource(ip) => write!(f, "source {ip} is not a workload of the mesh"),
            Refusal::NoHealthyUpstream(s) => write!(f, "service {s} has no ready endpoint"),
            Refusal::ProxyPort(a) => write!(f, "{a} is a proxy port"),
            Refusal::Unsupported(why) => f.write_str(why),
        }
    }
}

/// What the outbound decision also reports (for logs and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// The destination's waypoint was not ready: sent straight to the destination (fail open).
    pub waypoint_bypassed: Option<String>,
}

/// Where a connection from `source` to `destination` goes. `pick(n)` chooses one of `n` ready
/// endpoints (the shard's round robin).
pub fn outbound(
    snapshot: &Snapshot,
    source: Option<&Workload>,
    destination: SocketAddr,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Result<(Plan, Notes), Refusal> {
    let mut notes = Notes::default();
    // Traffic from a waypoint never goes back to it (Istio's rule).
    let from_waypoint = source.and_then(|s| s.is_waypoint);
    if let Some(target) = snapshot.service_by_vip(destination) {
        let service = target.service;
        if let Some(id) = service.waypoint.filter(|id| Some(*id) != from_waypoint) {
            let service_host = Some(service.hostname.clone());
            if let Some(plan) =
                via_waypoint(snapshot, id, destination, None, service_host, &mut notes)
            {
                return Ok((plan, notes));
            }
        }
        if let ServiceKind::ServiceEntry { resolution, .. } = &service.kind {
            if service.endpoints.is_empty() {
                return Err(Refusal::Unsupported(format!(
                    "ServiceEntry {} (resolution {resolution}) has no static endpoints and no ready waypoint",
                    service.hostname
                )));
            }
        }
        let ready: Vec<WorkloadId> = service
            .endpoints
            .iter()
            .copied()
            .filter(|id| snapshot.workload(*id).ready)
            .collect();
        if ready.is_empty() {
            return Err(Refusal::NoHealthyUpstream(service.hostname.clone()));
        }
        let chosen = ready[pick(ready.len()) % ready.len()];
        let endpoint = snapshot.workload(chosen);
        let Some(port) = service.target_port(target.port, endpoint) else {
            return Err(Refusal::Unsupported(format!(
                "{}/{} has no container port named by service {}'s targetPort",
                endpoint.namespace, endpoint.name, service.hostname
            )));
        };
        let Some(ip) = endpoint.ips.first() else {
            return Err(Refusal::NoHealthyUpstream(service.hostname.clone()));
        };
        let addr = SocketAddr::new(*ip, port);
        let plan = if endpoint.ambient {
            Plan::Hbone {
                dial: SocketAddr::new(*ip, HBONE_PORT),
                authority: addr,
                identity: endpoint.identity.to_string(),
                spiffe: endpoint.spiffe.clone(),
                workload: Some(chosen),
                waypoint: None,
                service_host: Some(service.hostname.clone()),
            }
        } else {
            Plan::Passthrough {
                addr,
                workload: Some(chosen),
            }
        };
        return Ok((plan, notes));
    }
    if let Some(found) = snapshot.workload_id_by_ip(destination.ip()) {
        let workload = snapshot.workload(found);
        if PROXY_PORTS.contains(&destination.port()) {
            return Err(Refusal::ProxyPort(destination));
        }
        let id = Some(found);
        if let Some(wp) = workload.waypoint.filter(|wp| Some(*wp) != from_waypoint) {
            if let Some(plan) = via_waypoint(snapshot, wp, destination, id, None, &mut notes) {
                return Ok((plan, notes));
            }
        }
        let plan = if workload.ambient {
            Plan::Hbone {
                dial: SocketAddr::new(destination.ip(), HBONE_PORT),
                authority: destination,
                identity: workload.identity.to_string(),
                spiffe: workload.spiffe.clone(),
                workload: id,
                waypoint: None,
                service_host: None,
            }
        } else {
            Plan::Passthrough {
                addr: destination,
                workload: id,
            }
        };
        return Ok((plan, notes));
    }
    Ok((
        Plan::Passthrough {
            addr: destination,
            workload: None,
        },
        notes,
    ))
}

/// HBONE to a waypoint with the original destination as authority; `None` (noted) when the
/// waypoint has no address yet, so the caller goes straight to the destination (fail open).
fn via_waypoint(
    snapshot: &Snapshot,
    id: u32,
    destination: SocketAddr,
    workload: Option<WorkloadId>,
    service_host: Option<String>,
    notes: &mut Notes,
) -> Option<Plan> {
    let waypoint = snapshot.waypoint(id);
    let name = format!("{}/{}", waypoint.namespace, waypoint.name);
    match waypoint.addresses.first() {
        Some(ip) if waypoint.ready => Some(Plan::Hbone {
            dial: SocketAddr::new(*ip, HBONE_PORT),
            authority: destination,
            identity: waypoint.identity.clone(),
            spiffe: waypoint.spiffe.clone(),
            workload,
            waypoint: Some(name),
            service_host,
        }),
        _ => {
            notes.waypoint_bypassed = Some(name);
            None
        }
    }
}

/// An admitted inbound tunnel: connect to `upstream`, a workload of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub workload: WorkloadId,
    pub upstream: SocketAddr,
    /// An AUDIT policy matched, or a dry-run policy would have changed the outcome.
    pub audit: Option<String>,
}

/// Why an inbound tunnel is refused: the status ztunnel answers, its response flag and a reason
/// for the log (with the policy that denied, on a deny).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub status: StatusCode,
    pub flag: &'static str,
    pub reason: String,
    pub policy: Option<String>,
}

/// What is known of the peer of an inbound tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub principal: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// The address the peer's connection came from (the source ztunnel or waypoint).
    pub ip: IpAddr,
}

/// May `peer` open a tunnel to `authority`, arriving on `arrived_on` of node `node`.
pub fn inbound(
    snapshot: &Snapshot,
    node: &str,
    arrived_on: IpAddr,
    authority: SocketAddr,
    peer: Peer<'_>,
) -> Result<Admitted, Denied> {
    let deny = |status: StatusCode, flag: &'static str, reason: String| Denied {
        status,
        flag,
        reason,
        policy: None,
    };
    if authority.ip() != arrived_on {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "CONNECT",
            format!("CONNECT to {authority} arrived on {arrived_on} (IP mismatch)"),
        ));
    }
    let Some(id) = snapshot.workload_id_by_ip(authority.ip()) else {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "CONNECT",
            format!("{} is no workload", authority.ip()),
        ));
    };
    let workload = snapshot.workload(id);
    if workload.node.as_deref() != Some(node) {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "CONNECT",
            format!(
                "{}/{} is not on node {node}",
                workload.namespace, workload.name
            ),
        ));
    }
    if PROXY_PORTS.contains(&authority.port()) || authority.port() == 0 {
        return Err(deny(
            StatusCode::SERVICE_UNAVAILABLE,
            "CONNECT",
            format!("port {} is not allowed", authority.port()),
        ));
    }
    let request = Request {
        principal: Some(peer.principal),
        namespace: Some(peer.namespace),
        service_account: Some(peer.service_account),
        source_ip: Some(peer.ip),
        destination_ip: Some(authority.ip()),
        destination_port: authority.port(),
        ..Request::default()
    };
    let verdict = snapshot.authorize(workload, &request);
    if !verdict.allowed {
        return Err(Denied {
            status: StatusCode::UNAUTHORIZED,
            flag: "DENY",
            reason: match verdict.policy {
                Some(p) => format!("denied by {p}"),
                None => "no ALLOW policy matched".to_string(),
            },
            policy: verdict.policy.map(str::to_string),
        });
    }
    Ok(Admitted {
        workload: id,
        upstream: authority,
        audit: verdict.audit.or(verdict.dry_run).map(str::to_string),
    })
}

/// May a plaintext connection (captured to 15006, so without a peer identity) from `source_ip`
/// reach `destination`, a workload of node `node`: only where the workload's PeerAuthentication
/// accepts plaintext on that port, and L4 policy allows a caller without identity.
pub fn plaintext_inbound(
    snapshot: &Snapshot,
    node: &str,
    destination: SocketAddr,
    source_ip: IpAddr,
) -> Result<Admitted, Denied> {
    let deny = |status: StatusCode, flag: &'static str, reason: String| Denied {
        status,
        flag,
        reason,
        policy: None,
    };
    let Some(id) = snapshot.workload_id_by_ip(destination.ip()) else {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "CONNECT",
            format!("{} is no workload", destination.ip()),
        ));
    };
    let workload = snapshot.workload(id);
    if workload.node.as_deref() != Some(node) {
        return Err(deny(
            StatusCode::BAD_REQUEST,
            "CONNECT",
            format!(
                "{}/{} is not on node {node}",
                workload.namespace, workload.name
            ),
        ));
    }
    if PROXY_PORTS.contains(&destination.port()) {
        return Err(deny(
            StatusCode::SERVICE_UNAVAILABLE,
            "CONNECT",
            format!("port {} is not allowed", destination.port()),
        ));
    }
    if !workload
        .peer_authentication
        .accepts_plaintext(destination.port())
    {
        return Err(Denied {
            status: StatusCode::UNAUTHORIZED,
            flag: "DENY",
            reason: format!(
                "PeerAuthentication STRICT on {}/{} port {}: plaintext refused",
                workload.namespace,
                workload.name,
                destination.port()
            ),
            policy: workload
                .peer_authentication
                .from
                .first()
                .map(|p| p.to_string()),
        });
    }
    let request = Request {
        source_ip: Some(source_ip),
        destination_ip: Some(destination.ip()),
        destination_port: destination.port(),
        ..Request::default()
    };
    let verdict = snapshot.authorize(workload, &request);
    if !verdict.allowed {
        return Err(Denied {
            status: StatusCode::UNAUTHORIZED,
            flag: "DENY",
            reason: verdict.policy.map_or_else(
                || "no ALLOW policy matched".to_string(),
                |p| format!("denied by {p}"),
            ),
            policy: verdict.policy.map(str::to_string),
        });
    }
    Ok(Admitted {
        workload: id,
        upstream: destination,
        audit: verdict.audit.or(verdict.dry_run).map(str::to_string),
    })
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn snapshot(yaml: &str) -> Snapshot {
        let mut parsed = shoal_control::parse::Parsed::default();
        shoal_control::parse::parse_file(&Arc::from("test.yaml"), yaml, &mut parsed);
        let s = shoal_control::compile::compile(parsed, &Default::default(), &Default::default());
        let errors: Vec<String> = s.errors().map(|p| p.to_string()).collect();
        assert!(errors.is_empty(), "{errors:#?}");
        s
    }

    const MESH: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app}
spec: {nodeName: a, serviceAccountName: client}
status: {podIP: 127.20.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: app, labels: {app: web}}
spec: {nodeName: b, serviceAccountName: web, containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 127.20.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: app, labels: {app: web}}
spec: {nodeName: a, serviceAccountName: web}
status: {podIP: 127.20.0.3, conditions: [{type: Ready, status: \"False\"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: app}
spec: {clusterIP: 10.96.0.2, selector: {app: none}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: old}}
spec: {nodeName: b}
status: {podIP: 127.20.1.1}
---
apiVersion: v1
kind: Service
metadata: {name: waypointed, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.3, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 127.20.9.9}]
---
apiVersion: v1
kind: Service
metadata: {name: dark, namespace: app, labels: {istio.io/use-waypoint: down}}
spec: {clusterIP: 10.96.0.4, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: down, namespace: app}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-client, namespace: app}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/client]}}], to: [{operation: {ports: [\"8080\"]}}]}]
";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn outbound_table() {
        let s = snapshot(MESH);
        let client = s.workload_by_ip("127.20.0.1".parse().unwrap());
        let mut first = |_n: usize| 0;
        let hbone = |dial: &str, authority: &str, identity: &str, waypoint: Option<&str>| {
            (
                dial.to_string(),
                authority.to_string(),
                identity.to_string(),
                waypoint.map(String::from),
            )
        };
        type Shape = (String, String, String, Option<String>);
        let shape = |p: &Plan| -> Result<Shape, String> {
            match p {
                Plan::Hbone {
                    dial,
                    authority,
                    identity,
                    spiffe,
                    waypoint,
                    ..
                } => {
                    // The parsed identity is the one named.
                    let parsed = spiffe.as_ref().map(ToString::to_string);
                    assert_eq!(parsed.as_deref(), Ok(identity.as_str()));
                    Ok((
                        dial.to_string(),
                        authority.to_string(),
                        identity.clone(),
                        waypoint.clone(),
                    ))
                }
                Plan::Passthrough { addr, .. } => Err(addr.to_string()),
            }
        };
        let table: Vec<(&str, &str, Result<Shape, String>)> = vec![
            // A service VIP: a ready endpoint (web-2 is not ready), its named target port, over HBONE.
            (
                "service VIP",
                "10.96.0.1:80",
                Ok(hbone(
                    "127.20.0.2:15008",
                    "127.20.0.2:8080",
                    "spiffe://cluster.local/ns/app/sa/web",
                    None,
                )),
            ),
            // A pod IP of the ambient mesh: HBONE to that pod.
            (
                "pod IP",
                "127.20.0.2:8080",
                Ok(hbone(
                    "127.20.0.2:15008",
                    "127.20.0.2:8080",
                    "spiffe://cluster.local/ns/app/sa/web",
                    None,
                )),
            ),
            // A pod outside ambient: plain TCP.
            (
                "non-ambient pod",
                "127.20.1.1:80",
                Err("127.20.1.1:80".into()),
            ),
            // Outside the mesh: passthrough.
            ("outside", "192.0.2.7:443", Err("192.0.2.7:443".into())),
            // A waypoint-bound service: HBONE to the waypoint, the VIP as authority.
            (
                "waypoint",
                "10.96.0.3:80",
                Ok(hbone(
                    "127.20.9.9:15008",
                    "10.96.0.3:80",
                    "spiffe://cluster.local/ns/app/sa/wp",
                    Some("app/wp"),
                )),
            ),
            // Its waypoint has no address: fail open, straight to an endpoint.
            (
                "waypoint not ready",
                "10.96.0.4:80",
                Ok(hbone(
                    "127.20.0.2:15008",
                    "127.20.0.2:8080",
                    "spiffe://cluster.local/ns/app/sa/web",
                    None,
                )),
            ),
        ];
        for (name, destination, want) in table {
            let (plan, notes) = outbound(&s, client, addr(destination), &mut first)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(shape(&plan), want, "{name}");
            assert_eq!(
                notes.waypoint_bypassed.is_some(),
                name == "waypoint not ready",
                "{name}"
            );
        }
        let mut refused = |d: &str| outbound(&s, client, addr(d), &mut first).unwrap_err();
        assert_eq!(
            refused("10.96.0.2:80"),
            Refusal::NoHealthyUpstream("empty.app.svc.cluster.local".into())
        );
        assert_eq!(
            refused("127.20.0.2:15008"),
            Refusal::ProxyPort(addr("127.20.0.2:15008"))
        );
    }

    #[test]
    fn inbound_table() {
        let s = snapshot(MESH);
        let client = Peer {
            principal: "cluster.local/ns/app/sa/client",
            namespace: "app",
            service_account: "client",
            ip: "127.20.0.1".parse().unwrap(),
        };
        let stranger = Peer {
            principal: "cluster.local/ns/other/sa/x",
            namespace: "other",
            service_account: "x",
            ..client
        };
        let web: IpAddr = "127.20.0.2".parse().unwrap();
        let table: Vec<(&str, &str, IpAddr, &str, Peer, Result<(), (u16, &str)>)> = vec![
            (
                "allowed by principal and port",
                "b",
                web,
                "127.20.0.2:8080",
                client,
                Ok(()),
            ),
            (
                "deny by default once an ALLOW exists",
                "b",
                web,
                "127.20.0.2:8080",
                stranger,
                Err((401, "DENY")),
            ),
            (
                "ALLOW names port 8080 only",
                "b",
                web,
                "127.20.0.2:9090",
                client,
                Err((401, "DENY")),
            ),
            (
                "IP mismatch",
                "b",
                web,
                "127.20.1.1:80",
                client,
                Err((400, "CONNECT")),
            ),
            (
                "not on this node",
                "a",
                web,
                "127.20.0.2:8080",
                client,
                Err((400, "CONNECT")),
            ),
            (
                "proxy port",
                "b",
                web,
                "127.20.0.2:15006",
                client,
                Err((503, "CONNECT")),
            ),
            (
                "no policy selects a legacy pod",
                "b",
                "127.20.1.1".parse().unwrap(),
                "127.20.1.1:80",
                stranger,
                Ok(()),
            ),
        ];
        for (name, node, arrived_on, authority, peer, want) in table {
            let got = inbound(&s, node, arrived_on, addr(authority), peer)
                .map(|_| ())
                .map_err(|d| (d.status.as_u16(), d.flag));
            assert_eq!(got, want, "{name}");
        }
        let denied = inbound(&s, "b", web, addr("127.20.0.2:8080"), stranger).unwrap_err();
        assert_eq!(denied.reason, "no ALLOW policy matched");
    }

    #[test]
    fn plaintext_inbound_table() {
        let strict = format!(
            "{MESH}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict, namespace: legacy}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: web, namespace: app}}
spec: {{selector: {{matchLabels: {{app: web}}}}, mtls: {{mode: STRICT}}, portLevelMtls: {{9000: {{mode: PERMISSIVE}}}}}}
"
        );
        let s = snapshot(&strict);
        let plain = snapshot(MESH);
        let from: IpAddr = "10.9.9.9".parse().unwrap();
        let table: Vec<(&str, &Snapshot, &str, &str, Result<(), (u16, &str)>)> = vec![
            // No PeerAuthentication: PERMISSIVE; but web's ALLOW names a principal a plaintext caller lacks.
            (
                "permissive, no policy",
                &plain,
                "b",
                "127.20.1.1:80",
                Ok(()),
            ),
            (
                "permissive, ALLOW needs an identity",
                &plain,
                "b",
                "127.20.0.2:8080",
                Err((401, "DENY")),
            ),
            (
                "namespace STRICT",
                &s,
                "b",
                "127.20.1.1:80",
                Err((401, "DENY")),
            ),
            (
                "workload STRICT",
                &s,
                "b",
                "127.20.0.2:8080",
                Err((401, "DENY")),
            ),
            (
                "port-level PERMISSIVE, then the ALLOW (port 8080 only) decides",
                &s,
                "b",
                "127.20.0.2:9000",
                Err((401, "DENY")),
            ),
            (
                "not on this node",
                &plain,
                "a",
                "127.20.1.1:80",
                Err((400, "CONNECT")),
            ),
            (
                "proxy port",
                &plain,
                "b",
                "127.20.1.1:15008",
                Err((503, "CONNECT")),
            ),
        ];
        for (name, snap, node, destination, want) in table {
            let got = plaintext_inbound(snap, node, addr(destination), from)
                .map(|_| ())
                .map_err(|d| (d.status.as_u16(), d.flag));
            assert_eq!(got, want, "{name}");
        }
        let denied = plaintext_inbound(&s, "b", addr("127.20.1.1:80"), from).unwrap_err();
        assert!(
            denied.reason.contains("STRICT") && denied.policy.as_deref() == Some("legacy/strict"),
            "{denied:?}"
        );
    }
}
