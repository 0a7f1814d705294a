//! The waypoint's decisions, as pure functions of (snapshot, what the tunnel addressed, request):
//! which service a CONNECT is for (`classify`), may this request pass (`authorize`), where does it
//! go (`route`), and which endpoint serves it (`endpoint`). The proxy takes their answers and does
//! the I/O; it never reads configuration itself.

use std::net::{IpAddr, SocketAddr};

use shoal_control::authz::{self, Verdict};
use shoal_control::routes::{Backend, Filter, PathMatch, RequestView, RouteMatch, RouteRule};
use shoal_control::snapshot::{
    LabelSource, Protocol, Service, ServiceId, ServiceKind, Snapshot, TargetPort, WaypointId,
    Workload, WorkloadId,
};
use shoal_control::traffic::{HashKey, LoadBalancer};
use xxhash_rust::xxh64::xxh64;

// ------------------------------------------------------------------ classify

/// What one HBONE CONNECT to the waypoint addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub service: ServiceId,
    /// The service port the client dialled.
    pub port: u16,
    pub protocol: Protocol,
}

/// Why a CONNECT is refused (400): the waypoint serves only what is bound to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotServed {
    #[error("{0} is not a service address this mesh knows")]
    Unknown(SocketAddr),
    #[error("{authority} belongs to {service}, which is not bound to this waypoint")]
    OtherWaypoint {
        authority: SocketAddr,
        service: String,
    },
}

/// The service behind a CONNECT authority (`VIP:port`), if it is bound to `waypoint`.
pub fn classify(
    snapshot: &Snapshot,
    waypoint: WaypointId,
    authority: SocketAddr,
) -> Result<Target, NotServed> {
    let Some(target) = snapshot.service_by_vip(authority) else {
        return Err(NotServed::Unknown(authority));
    };
    if target.service.waypoint != Some(waypoint) {
        return Err(NotServed::OtherWaypoint {
            authority,
            service: target.service.hostname.clone(),
        });
    }
    Ok(Target {
        service: target.id,
        port: target.port.port,
        protocol: target.port.protocol,
    })
}

/// Any service behind `VIP:port` (a sidecar's outbound serves every service, bound or not).
pub fn service_target(snapshot: &Snapshot, addr: SocketAddr) -> Option<Target> {
    let t = snapshot.service_by_vip(addr)?;
    Some(Target {
        service: t.id,
        port: t.port.port,
        protocol: t.port.protocol,
    })
}

// ------------------------------------------------------------------ authorize

/// What the waypoint knows of who sent a request.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// `td/ns/N/sa/S` from the HBONE peer's certificate (the source ztunnel presents the client's
    /// identity).
    pub principal: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// The original client, from the CONNECT's `forwarded` header.
    pub ip: IpAddr,
}

/// What routing and policy read of a request.
#[derive(Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// `:authority` or `Host`, without a port.
    pub host: Option<&'a str>,
    /// Looks a header up by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
}

/// The value of query parameter `name` (first occurrence, not percent-decoded).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// What policy evaluation reads of an L7 request from `peer` to `destination` (address, port).
pub fn l7_request<'a>(
    peer: &Peer<'a>,
    http: &Http<'a>,
    destination: (Option<IpAddr>, u16),
) -> authz::Request<'a> {
    authz::Request {
        principal: Some(peer.principal),
        namespace: Some(peer.namespace),
        service_account: Some(peer.service_account),
        source_ip: Some(peer.ip),
        destination_ip: destination.0,
        destination_port: destination.1,
        remote_ip: Some(peer.ip),
        host: http.host,
        method: Some(http.method),
        path: Some(http.path),
        sni: None,
        header: Some(http.header),
    }
}

/// Istio's order (DENY, then ALLOW) over the policies attached to the waypoint's Gateway and to the
/// service, with every L7 field.
pub fn authorize<'s, 'a>(
    snapshot: &'s Snapshot,
    waypoint: WaypointId,
    target: &Target,
    peer: &Peer<'a>,
    http: &Http<'a>,
) -> Verdict<'s> {
    let wp = snapshot.waypoint(waypoint);
    let service = snapshot
        .service_policies
        .get(&target.service)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let vip = snapshot.service(target.service).vips.first().copied();
    let request = l7_request(peer, http, (vip, target.port));
    authz::evaluate(wp.l7.policies.iter().chain(service.iter()), &request)
}

/// A pod addressed directly whose waypoint is this one (`istio.io/waypoint-for: workload` or
/// `all`): its id.
pub fn classify_workload(
    snapshot: &Snapshot,
    waypoint: WaypointId,
    authority: SocketAddr,
) -> Option<WorkloadId> {
    let id = snapshot.workload_id_by_ip(authority.ip())?;
    (snapshot.workload(id).waypoint == Some(waypoint)).then_some(id)
}

/// The same order for a request to a pod addressed directly: the policies on the Gateway.
pub fn authorize_workload<'s, 'a>(
    snapshot: &'s Snapshot,
    waypoint: WaypointId,
    authority: SocketAddr,
    peer: &Peer<'a>,
    http: &Http<'a>,
) -> Verdict<'s> {
    let request = l7_request(peer, http, (Some(authority.ip()), authority.port()));
    authz::evaluate(snapshot.waypoint(waypoint).l7.policies.iter(), &request)
}

// ------------------------------------------------------------------ route

/// A response the waypoint gives itself, with Envoy's response flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub status: u16,
    pub flag: &'static str,
    /// Why, for the access log (Envoy's response code details).
    pub details: String,
    /// For redirects.
    pub location: Option<String>,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'s> {
    pub service: ServiceId,
    /// The backend service's port (its endpoints' target port comes from it).
    pub port: u16,
    /// The route rule that chose it, whose filters and timeouts apply; `None` when no route is
    /// attached (the service itself).
    pub rule: Option<&'s RouteRule>,
    /// A DestinationRule subset's labels the endpoint must carry (VirtualService routes).
    pub subset: Option<&'s [(String, String)]>,
    /// The subset's name, for its DestinationRule policy.
    pub subset_name: Option<&'s str>,
}

#[derive(Debug, Clone)]
pub enum Decision<'s> {
    Forward(Forward<'s>),
    Respond(Local),
}

/// HTTPRoute selection for `target`, then the weighted backend. `roll` is a uniform random
/// number; the pick is `roll % total weight`, so tests can choose it.
pub fn route<'s>(
    snapshot: &'s Snapshot,
    target: &Target,
    http: &Http<'_>,
    scheme: &str,
    roll: u64,
) -> Decision<'s> {
    let Some(table) = snapshot.routes.get(&target.service) else {
        return Decision::Forward(Forward {
            service: target.service,
            port: target.port,
            rule: None,
            subset: None,
            subset_name: None,
        });
    };
    let view = RequestView {
        method: http.method,
        path: http.path,
        port: target.port,
        header: &|name| (http.header)(name),
        query: &|name| query_param(http.query, name),
    };
    let Some((matched, rule)) = table.select_match(&view) else {
        return Decision::Respond(Local {
            status: 404,
            flag: "NR",
            details: "route_not_found".into(),
            location: None,
        });
    };
    for f in &rule.filters {
        if let Filter::Redirect {
            scheme: to_scheme,
            hostname,
            path,
            port,
            status,
        } = f
        {
            return Decision::Respond(Local {
                status: *status,
                flag: "-",
                details: "direct_response".into(),
                location: Some(redirect_location(
                    http,
                    scheme,
                    to_scheme.as_deref(),
                    hostname.as_deref(),
                    path.as_ref(),
                    *port,
                    matched_prefix(matched),
                )),
            });
        }
    }
    match pick_backend(&rule.backends, roll) {
        Some(Backend {
            service: Some(service),
            port,
            subset,
            subset_name,
            ..
        }) => Decision::Forward(Forward {
            service: *service,
            port: port.unwrap_or(target.port),
            rule: Some(rule),
            subset: subset.as_deref(),
            subset_name: subset_name.as_deref(),
        }),
        Some(missing) => Decision::Respond(Local {
            status: 500,
            flag: "-",
            details: format!("backend {} {} does not exist", missing.kind, missing.name),
            location: None,
        }),
        None if rule.backends.is_empty() => Decision::Forward(Forward {
            // A rule with no backendRefs (filters only) goes to the parent service.
            service: target.service,
            port: target.port,
            rule: Some(rule),
            subset: None,
            subset_name: None,
        }),
        None => Decision::Respond(Local {
            status: 500,
            flag: "-",
            details: "every backendRef has weight 0".into(),
            location: None,
        }),
    }
}

/// The backend at `roll % total weight`; `None` when the total is zero.
pub fn pick_backend(backends: &[Backend], roll: u64) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut at = roll % total;
    for b in backends {
        let w = u64::from(b.weight);
        if at < w {
            return Some(b);
        }
        at -= w;
    }
    None
}

fn redirect_location(
    http: &Http<'_>,
    scheme: &str,
    to_scheme: Option<&str>,
    hostname: Option<&str>,
    path: Option<&shoal_control::resources::PathModifier>,
    port: Option<u16>,
    prefix: Option<&str>,
) -> String {
    let scheme = to_scheme.unwrap_or(scheme);
    let host = hostname.or(http.host).unwrap_or("");
    let port = match port {
        // Gateway API: the scheme's well-known port is left out.
        Some(p) if !(scheme == "http" && p == 80 || scheme == "https" && p == 443) => {
            format!(":{p}")
        }
        _ => String::new(),
    };
    let path = match path {
        Some(m) => rewrite_path(http.path, m, prefix),
        None => http.path.to_string(),
    };
    let query = http.query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{path}{query}")
}

/// The path prefix a request matched, which `ReplacePrefixMatch` replaces.
pub fn matched_prefix(m: &RouteMatch) -> Option<&str> {
    match &m.path {
        PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => Some(p),
        _ => None,
    }
}

/// Applies a path modifier. `ReplacePrefixMatch` replaces the matched prefix (whole segments);
/// without one, the path is taken to match at its first segment boundary.
pub fn rewrite_path(
    path: &str,
    m: &shoal_control::resources::PathModifier,
    prefix: Option<&str>,
) -> String {
    match m.type_.as_str() {
        "ReplaceFullPath" => m.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        "ReplacePrefixMatch" => {
            // Whole segments: the prefix ends at a `/` or at the end of the path.
            let rest = prefix.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
            let base = m
                .replace_prefix_match
                .as_deref()
                .unwrap_or("/")
                .trim_end_matches('/');
            let joined = format!("{base}{rest}");
            if joined.is_empty() {
                "/".into()
            } else {
                joined
            }
        }
        _ => path.to_string(),
    }
}

// ------------------------------------------------------------------ endpoint

/// How the waypoint reaches a chosen endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'s> {
    /// `None` for an address found by DNS (a ServiceEntry host outside the mesh).
    pub workload: Option<&'s Workload>,
    /// `podIP:targetPort` (the HBONE authority) or the external address.
    pub addr: SocketAddr,
    /// In the mesh: HBONE to its node; else plain TCP.
    pub hbone: bool,
}

/// The ready endpoints (in `subset` when given) of `service`'s `port`, in the snapshot's order;
/// empty when none is ready (503 UH). The load balancer chooses among them.
pub fn endpoints<'s>(
    snapshot: &'s Snapshot,
    service: ServiceId,
    port: u16,
    subset: Option<&[(String, String)]>,
) -> Vec<Endpoint<'s>> {
    let service = snapshot.service(service);
    let Some(service_port) = service.ports.iter().find(|p| p.port == port) else {
        return Vec::new();
    };
    service
        .endpoints
        .iter()
        .map(|id| snapshot.workload(*id))
        .filter(|w| {
            w.ready
                && !w.ips.is_empty()
                && subset.is_none_or(|labels| {
                    labels
                        .iter()
                        .all(|(k, v)| w.labels.label(k) == Some(v.as_str()))
                })
        })
        .filter_map(|workload| {
            let target = service.target_port(service_port, workload)?;
            Some(Endpoint {
                workload: Some(workload),
                addr: SocketAddr::new(workload.ips[0], target),
                hbone: workload.ambient,
            })
        })
        .collect()
}

/// For a ServiceEntry resolved by DNS: the names to resolve (its endpoints' host names, or else
/// its own host), whether only the first address counts (`DNS_ROUND_ROBIN`, Envoy's logical DNS),
/// and the port to connect to. `NONE` without endpoints resolves its host too (the address the
/// app would have dialled). `None`: not resolved by DNS.
pub fn dns_targets(service: &Service, port: u16) -> Option<(Vec<&str>, bool, u16)> {
    let ServiceKind::ServiceEntry {
        resolution,
        dns_endpoints,
        ..
    } = &service.kind
    else {
        return None;
    };
    let by_dns = match resolution.as_str() {
        "DNS" | "DNS_ROUND_ROBIN" => true,
        "NONE" => service.endpoints.is_empty() && !service.hostname.starts_with('*'),
        _ => false,
    };
    if !by_dns {
        return None;
    }
    let service_port = service.ports.iter().find(|p| p.port == port)?;
    let target = match service_port.target {
        TargetPort::Number(n) => n,
        TargetPort::Named(_) => port,
    };
    let names: Vec<&str> = if dns_endpoints.is_empty() {
        if !service.endpoints.is_empty() {
            // Endpoints with addresses: those are used, nothing to resolve.
            return None;
        }
        vec![service.hostname.as_str()]
    } else {
        dns_endpoints.iter().map(String::as_str).collect()
    };
    Some((names, resolution == "DNS_ROUND_ROBIN", target))
}

/// The `n`-th ready endpoint (round robin over the ready ones, in `subset` when given) of
/// `service`'s `port`; `None` when no endpoint is ready (503 UH).
pub fn endpoint<'s>(
    snapshot: &'s Snapshot,
    service: ServiceId,
    port: u16,
    subset: Option<&[(String, String)]>,
    n: usize,
) -> Option<Endpoint<'s>> {
    let all = endpoints(snapshot, service, port, subset);
    all.get(n % all.len().max(1)).copied()
}

/// The request's consistent-hash key under a `consistentHash` load balancer, and the cookie to
/// set when the key is a cookie the request lacks and the policy gives it a `ttl` (Envoy makes
/// one then). `None`: no key (the load balancer picks at random). `fresh` is a random value for
/// such a cookie.
pub fn hash_key(
    lb: &LoadBalancer,
    http: &Http<'_>,
    client: IpAddr,
    fresh: u64,
) -> (Option<u64>, Option<String>) {
    let LoadBalancer::Hash { key, .. } = lb else {
        return (None, None);
    };
    let hash = |v: &[u8]| xxh64(v, 0);
    match key {
        HashKey::Header(name) => ((http.header)(name).map(|v| hash(v.as_bytes())), None),
        HashKey::QueryParameter(name) => (
            query_param(http.query, name).map(|v| hash(v.as_bytes())),
            None,
        ),
        HashKey::SourceIp => (Some(hash(client.to_string().as_bytes())), None),
        HashKey::Cookie { name, path, ttl } => {
            let found = (http.header)("cookie").and_then(|c| {
                c.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == name).then_some(v)
                })
            });
            match (found, ttl) {
                (Some(v), _) => (Some(hash(v.as_bytes())), None),
                (None, Some(ttl)) => {
                    let value = format!("{fresh:016x}");
                    let mut cookie = format!("{name}=\"{value}\"; Max-Age={}", ttl.as_secs());
                    if let Some(p) = path {
                        cookie.push_str("; Path=");
                        cookie.push_str(p);
                    }
                    cookie.push_str("; HttpOnly");
                    (Some(hash(format!("\"{value}\"").as_bytes())), Some(cookie))
                }
                (None, None) => (None, None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_control::{compile, Options};
    use std::sync::Arc;

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 127.0.0.50}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.0.0.1, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {clusterIP: 10.0.0.2, selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {clusterIP: 10.0.0.3, selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: bookinfo}
spec: {clusterIP: 10.0.0.4, selector: {app: nobody}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere, namespace: bookinfo, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.0.0.5, selector: {app: reviews}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-a, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec: {nodeName: n1, serviceAccountName: reviews}
status: {podIP: 127.0.0.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-a, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec: {nodeName: n1, serviceAccountName: reviews}
status: {podIP: 127.0.0.12, phase: Running}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: reviews-v1, port: 9080, weight: 90}, {name: reviews-v2, port: 9080, weight: 10}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: new.example, statusCode: 301}}]
  - matches: [{path: {type: Exact, value: /zero}}]
    backendRefs: [{name: reviews-v1, port: 9080, weight: 0}]
  - matches: [{path: {type: Exact, value: /missing}}]
    backendRefs: [{name: nothere, port: 9080}]
  - matches: [{path: {type: Exact, value: /empty}}]
    backendRefs: [{name: empty, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/curl]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
"#;

    fn snapshot() -> Snapshot {
        let mut parsed = shoal_control::parse::Parsed::default();
        shoal_control::parse::parse_file(&Arc::from("mesh.yaml"), MESH, &mut parsed);
        let s = compile::compile(parsed, &Default::default(), &Options::default());
        let errors: Vec<String> = s.errors().map(|p| p.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}");
        s
    }

    fn waypoint(s: &Snapshot) -> WaypointId {
        s.waypoints
            .iter()
            .position(|w| w.name == "waypoint")
            .expect("waypoint") as WaypointId
    }

    fn http<'a>(
        method: &'a str,
        path: &'a str,
        header: &'a dyn Fn(&str) -> Option<&'a str>,
    ) -> Http<'a> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        Http {
            method,
            path,
            query,
            host: Some("reviews"),
            header,
        }
    }

    fn name_of(s: &Snapshot, d: &Decision<'_>) -> String {
        match d {
            Decision::Forward(f) => format!("forward {} {}", s.service(f.service).name, f.port),
            Decision::Respond(l) => format!(
                "{} {} {}",
                l.status,
                l.flag,
                l.location.clone().unwrap_or_default()
            ),
        }
    }

    #[test]
    fn classify_accepts_only_services_bound_to_this_waypoint() {
        let s = snapshot();
        let wp = waypoint(&s);
        let ok = classify(&s, wp, "10.0.0.1:9080".parse().unwrap()).expect("bound");
        assert_eq!(s.service(ok.service).name, "reviews");
        assert_eq!(ok.protocol, Protocol::Http);
        assert!(matches!(
            classify(&s, wp, "10.0.0.5:80".parse().unwrap()),
            Err(NotServed::OtherWaypoint { .. })
        ));
        assert!(matches!(
            classify(&s, wp, "10.9.9.9:80".parse().unwrap()),
            Err(NotServed::Unknown(_))
        ));
        assert!(matches!(
            classify(&s, wp, "10.0.0.1:9999".parse().unwrap()),
            Err(NotServed::Unknown(_))
        ));
    }

    #[test]
    fn routes_table() {
        let s = snapshot();
        let wp = waypoint(&s);
        let target = classify(&s, wp, "10.0.0.1:9080".parse().unwrap()).unwrap();
        let none = |_: &str| None;
        let cases: &[(&str, u64, &str)] = &[
            ("/api/x", 0, "forward reviews-v1 9080"),
            ("/api/x", 89, "forward reviews-v1 9080"),
            ("/api/x", 90, "forward reviews-v2 9080"),
            ("/api/x", 99, "forward reviews-v2 9080"),
            ("/api/x", 100, "forward reviews-v1 9080"),
            ("/apix", 0, "404 NR "),
            ("/", 0, "404 NR "),
            ("/old?a=1", 0, "301 - http://new.example/old?a=1"),
            ("/zero", 0, "500 - "),
            ("/missing", 0, "500 - "),
            ("/empty", 0, "forward empty 80"),
        ];
        for (path, roll, want) in cases {
            let d = route(&s, &target, &http("GET", path, &none), "http", *roll);
            assert_eq!(&name_of(&s, &d), want, "{path} roll {roll}");
        }
    }

    #[test]
    fn no_route_attached_goes_to_the_service_itself() {
        let s = snapshot();
        let wp = waypoint(&s);
        let target = classify(&s, wp, "10.0.0.2:9080".parse().unwrap()).unwrap();
        let none = |_: &str| None;
        let d = route(&s, &target, &http("GET", "/anything", &none), "http", 0);
        assert_eq!(name_of(&s, &d), "forward reviews-v1 9080");
    }

    #[test]
    fn endpoints_round_robin_over_ready_ones_and_none_means_503() {
        let s = snapshot();
        let reviews = s.services.iter().position(|x| x.name == "reviews").unwrap() as ServiceId;
        let a = endpoint(&s, reviews, 9080, None, 0).unwrap();
        let b = endpoint(&s, reviews, 9080, None, 1).unwrap();
        let c = endpoint(&s, reviews, 9080, None, 2).unwrap();
        assert_ne!(a.addr, b.addr);
        assert_eq!(a.addr, c.addr);
        assert_eq!(a.addr.port(), 9080);
        assert!(a.hbone);
        let empty = s.services.iter().position(|x| x.name == "empty").unwrap() as ServiceId;
        assert!(endpoint(&s, empty, 80, None, 0).is_none());
        assert!(
            endpoint(&s, reviews, 1234, None, 0).is_none(),
            "no such port"
        );
    }

    #[test]
    fn authorize_table() {
        let s = snapshot();
        let wp = waypoint(&s);
        let target = classify(&s, wp, "10.0.0.1:9080".parse().unwrap()).unwrap();
        let none = |_: &str| None;
        let curl = Peer {
            principal: "cluster.local/ns/default/sa/curl",
            namespace: "default",
            service_account: "curl",
            ip: "127.0.0.9".parse().unwrap(),
        };
        let other = Peer {
            principal: "cluster.local/ns/default/sa/other",
            service_account: "other",
            ..curl
        };
        let cases: &[(&Peer<'_>, &str, &str, bool)] = &[
            (&curl, "GET", "/api/1", true),
            (&curl, "POST", "/api/1", false),
            (&curl, "GET", "/admin", false),
            (&other, "GET", "/api/1", false),
        ];
        for (peer, method, path, allowed) in cases {
            let v = authorize(&s, wp, &target, peer, &http(method, path, &none));
            assert_eq!(v.allowed, *allowed, "{} {method} {path}", peer.principal);
        }
        // A service without policies allows all.
        let v1 = classify(&s, wp, "10.0.0.2:9080".parse().unwrap()).unwrap();
        assert!(authorize(&s, wp, &v1, &other, &http("DELETE", "/", &none)).allowed);
    }

    #[test]
    fn consistent_hash_keys_table() {
        use shoal_control::traffic::HashTable;
        let lb = |key: HashKey| LoadBalancer::Hash {
            key,
            table: HashTable::Maglev,
        };
        let headers = |name: &str| match name {
            "x-user" => Some("alice"),
            "cookie" => Some("a=1; session=\"abc\"; b=2"),
            _ => None,
        };
        let h = |query: Option<&'static str>| Http {
            method: "GET",
            path: "/",
            query,
            host: Some("x"),
            header: &headers,
        };
        let client: IpAddr = "10.1.2.3".parse().expect("ip");
        let key = |l: &LoadBalancer, q| hash_key(l, &h(q), client, 7);
        let header = lb(HashKey::Header("x-user".into()));
        assert_eq!(key(&header, None).0, Some(xxh64(b"alice", 0)));
        assert_eq!(
            key(&lb(HashKey::Header("x-none".into())), None),
            (None, None)
        );
        let query = lb(HashKey::QueryParameter("id".into()));
        assert_eq!(key(&query, Some("a=1&id=42")).0, Some(xxh64(b"42", 0)));
        assert_eq!(key(&query, Some("a=1")).0, None);
        assert_eq!(
            key(&lb(HashKey::SourceIp), None).0,
            Some(xxh64(b"10.1.2.3", 0))
        );
        let cookie = |name: &str, ttl| {
            lb(HashKey::Cookie {
                name: name.into(),
                path: Some("/".into()),
                ttl,
            })
        };
        assert_eq!(
            key(&cookie("session", None), None),
            (Some(xxh64(b"\"abc\"", 0)), None)
        );
        // No such cookie: with a ttl one is made (and hashed as it will come back), else none.
        let (made, set) = key(
            &cookie("other", Some(std::time::Duration::from_secs(60))),
            None,
        );
        let set = set.expect("a cookie to set");
        assert!(
            set.starts_with("other=\"0000000000000007\"; Max-Age=60; Path=/"),
            "{set}"
        );
        assert_eq!(made, Some(xxh64(b"\"0000000000000007\"", 0)));
        assert_eq!(key(&cookie("other", None), None), (None, None));
        assert_eq!(key(&LoadBalancer::RoundRobin, None), (None, None));
    }

    #[test]
    fn query_params_and_path_rewrites() {
        assert_eq!(query_param(Some("a=1&b=2"), "b"), Some("2"));
        assert_eq!(query_param(Some("a"), "a"), Some(""));
        assert_eq!(query_param(None, "a"), None);
        let full = shoal_control::resources::PathModifier {
            type_: "ReplaceFullPath".into(),
            replace_full_path: Some("/new".into()),
            replace_prefix_match: None,
        };
        assert_eq!(rewrite_path("/old/x", &full, None), "/new");
        let prefix = shoal_control::resources::PathModifier {
            type_: "ReplacePrefixMatch".into(),
            replace_full_path: None,
            replace_prefix_match: Some("/v2".into()),
        };
        assert_eq!(rewrite_path("/v1/items", &prefix, Some("/v1")), "/v2/items");
        assert_eq!(rewrite_path("/v1", &prefix, Some("/v1")), "/v2");
        let root = shoal_control::resources::PathModifier {
            replace_prefix_match: Some("/".into()),
            ..prefix
        };
        assert_eq!(rewrite_path("/v1/items", &root, Some("/v1")), "/items");
        assert_eq!(rewrite_path("/v1", &root, Some("/v1")), "/");
    }
}
