//! The compiled mesh: immutable, built in one pass by `compile`, shared by every shard as an `Arc`.
//! Its lookups are the questions the data path asks — who is this source IP, where does VIP:port go,
//! may this identity reach this workload:port — each a hash lookup, none allocating.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::authz::{self, Policy, Request, Verdict};
use crate::binding::WaypointFor;
use crate::peerauth::Effective;
use crate::problem::Problem;
use crate::resources::{DestinationRuleSpec, HttpRouteRule};
use crate::routes::RouteTable;
use crate::vip::Allocations;

/// Anything labels can be read from: a resource's own map, or a workload's compact `Labels`.
pub trait LabelSource {
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelSource for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// A workload's labels: sorted pairs of shared strings (most keys and values repeat across a
/// namespace's workloads, so they are interned), a fraction of a map's size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Arc<str>, Arc<str>)]>);

impl Labels {
    pub fn new(mut pairs: Vec<(Arc<str>, Arc<str>)>) -> Self {
        pairs.sort_unstable();
        pairs.dedup_by(|a, b| a.0 == b.0);
        Labels(pairs.into_boxed_slice())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn pairs(&self) -> &[(Arc<str>, Arc<str>)] {
        &self.0
    }
}

impl LabelSource for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

pub type WorkloadId = u32;
/// A workload's SPIFFE id as the data plane uses it, or why its identity is not one.
pub type Spiffe = Result<shoal_hbone::Identity, shoal_hbone::IdentityError>;
pub type ServiceId = u32;
pub type WaypointId = u32;
pub type PolicyId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WorkloadKind {
    Pod,
    WorkloadEntry,
    /// A static endpoint of a ServiceEntry.
    ServiceEntryEndpoint,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: String,
    pub namespace: String,
    pub service_account: Arc<str>,
    /// `spiffe://td/ns/N/sa/S`.
    pub identity: Arc<str>,
    /// `identity`, parsed when the snapshot was compiled, so that a proxy does not parse it for
    /// every connection or request.
    #[serde(skip)]
    pub spiffe: Spiffe,
    /// `td/ns/N/sa/S`, as policies name principals.
    pub principal: Arc<str>,
    pub ips: Vec<IpAddr>,
    pub node: Option<Arc<str>>,
    pub labels: Labels,
    /// In the ambient mesh (namespace or pod labelled `istio.io/dataplane-mode: ambient`): its
    /// traffic is captured and it is reached over HBONE.
    pub ambient: bool,
    pub ready: bool,
    /// Named container ports, for Services whose targetPort is a name.
    pub named_ports: Box<[(Arc<str>, u16)]>,
    /// The workload waypoint its inbound traffic goes through.
    pub waypoint: Option<WaypointId>,
    /// This workload *is* a waypoint's proxy.
    pub is_waypoint: Option<WaypointId>,
    pub services: Vec<ServiceId>,
    /// L4 authorization policies that apply (mesh, namespace and selected), enforced by ztunnel.
    pub policies: Vec<PolicyId>,
    /// Shared by every workload the same PeerAuthentications select.
    pub peer_authentication: Arc<Effective>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    Tls,
    /// Not declared: the waypoint sniffs.
    Unknown,
}

impl Protocol {
    /// From a port's `name` (`http-web`), `appProtocol` or Istio's `protocol`.
    pub fn from_declared(
        protocol: Option<&str>,
        app_protocol: Option<&str>,
        name: Option<&str>,
    ) -> Protocol {
        let pick = |s: &str| match s.to_ascii_lowercase().as_str() {
            "http" | "http1" | "kubernetes.io/http" => Some(Protocol::Http),
            "http2" | "kubernetes.io/h2c" => Some(Protocol::Http2),
            "grpc" | "grpc-web" => Some(Protocol::Grpc),
            "tcp" | "mongo" | "mysql" | "redis" => Some(Protocol::Tcp),
            "tls" | "https" => Some(Protocol::Tls),
            _ => None,
        };
        app_protocol
            .and_then(pick)
            .or_else(|| {
                protocol
                    .filter(|p| !p.eq_ignore_ascii_case("TCP") || name.is_none())
                    .and_then(pick)
            })
            .or_else(|| name.and_then(|n| pick(n.split('-').next().unwrap_or(n))))
            .unwrap_or(Protocol::Unknown)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Named(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum ServiceKind {
    Kubernetes,
    ServiceEntry {
        location: String,
        resolution: String,
        /// Endpoint addresses that are host names (resolution DNS), resolved by the data path.
        dns_endpoints: Vec<String>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`, or the ServiceEntry's first host.
    pub hostname: String,
    pub kind: ServiceKind,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Every selected workload, ready or not (the data path skips the unready).
    pub endpoints: Vec<WorkloadId>,
    pub waypoint: Option<WaypointId>,
    pub labels: BTreeMap<String, String>,
}

impl Service {
    /// The port a workload listens on for `port` of this service.
    pub fn target_port(&self, port: &ServicePort, workload: &Workload) -> Option<u16> {
        match &port.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Named(name) => workload
                .named_ports
                .iter()
                .find(|(n, _)| **n == **name)
                .map(|(_, p)| *p),
        }
    }
}

/// DestinationRule and VirtualService settings for one service, checked and kept for the waypoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrafficSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<(String, DestinationRuleSpec)>,
    /// VirtualService `http` routes (the first VirtualService for the host, by age then name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_service: Option<(String, Vec<HttpRouteRule>)>,
}

/// What a waypoint serves. Routes, per-service policies and traffic settings live in the snapshot
/// by service, since a classic sidecar applies them too.
#[derive(Debug, Clone, Default, Serialize)]
pub struct L7Config {
    pub services: Vec<ServiceId>,
    pub workloads: Vec<WorkloadId>,
    /// Policies attached by targetRefs to the waypoint's Gateway: they apply to all it serves.
    pub policies: Vec<Policy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    pub for_: WaypointFor,
    pub addresses: Vec<IpAddr>,
    pub service_account: String,
    pub identity: String,
    /// `identity`, parsed when the snapshot was compiled.
    #[serde(skip)]
    pub spiffe: Spiffe,
    /// Has an address to send to. A waypoint that is not ready is bypassed (fail open, logged).
    pub ready: bool,
    pub l7: L7Config,
}

/// Counts and timings of one compile.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompileStats {
    pub files: usize,
    pub documents: usize,
    pub objects: usize,
    pub errors: usize,
    pub warnings: usize,
    #[serde(serialize_with = "serialize_micros")]
    pub parse_time: Duration,
    #[serde(serialize_with = "serialize_micros")]
    pub compile_time: Duration,
}

fn serialize_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub trust_domain: String,
    pub root_namespace: String,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub waypoints: Vec<Waypoint>,
    /// L4 policies (already rewritten for ztunnel), referenced by `Workload::policies`.
    pub policies: Vec<Policy>,
    /// The same policies with every L7 field, as a classic sidecar enforces them (same ids).
    #[serde(skip)]
    pub sidecar_policies: Vec<Policy>,
    /// HTTPRoutes per service (absent: no route attached, traffic goes to the service itself).
    pub routes: BTreeMap<ServiceId, RouteTable>,
    /// L7 policies attached by targetRefs to a Service or ServiceEntry.
    pub service_policies: BTreeMap<ServiceId, Vec<Policy>>,
    /// DestinationRule and VirtualService settings per service.
    pub traffic: BTreeMap<ServiceId, TrafficSettings>,
    /// Local rate limits (`HTTPLocalRateLimitPolicy`) per service.
    pub rate_limits: BTreeMap<ServiceId, crate::traffic::RateLimit>,
    /// DestinationRules resolved per service port and subset (load balancing, limits, outliers).
    pub destination_policies: BTreeMap<ServiceId, crate::traffic::DestinationPolicy>,
    /// Problems found; error-level ones left their object (or part) out.
    pub problems: Vec<Problem>,
    pub stats: CompileStats,
    /// Carried into the next compile so VIPs stay put.
    pub allocations: Allocations,

    #[serde(skip)]
    pub(crate) by_ip: FxHashMap<IpAddr, WorkloadId>,
    #[serde(skip)]
    pub(crate) by_node: FxHashMap<String, Vec<WorkloadId>>,
    #[serde(skip)]
    pub(crate) by_vip: FxHashMap<SocketAddr, (ServiceId, usize)>,
    #[serde(skip)]
    pub(crate) by_host: FxHashMap<String, ServiceId>,
    #[serde(skip)]
    pub(crate) waypoint_by_name: FxHashMap<(String, String), WaypointId>,
}

/// Where traffic to `VIP:port` goes.
#[derive(Debug, Clone, Copy)]
pub struct ServiceTarget<'s> {
    pub id: ServiceId,
    pub service: &'s Service,
    pub port: &'s ServicePort,
}

impl Snapshot {
    /// Who is this source IP.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|id| &self.workloads[*id as usize])
    }

    /// The same, by id (for telemetry that names the workload later).
    pub fn workload_id_by_ip(&self, ip: IpAddr) -> Option<WorkloadId> {
        self.by_ip.get(&ip).copied()
    }

    pub fn workload(&self, id: WorkloadId) -> &Workload {
        &self.workloads[id as usize]
    }

    pub fn workloads_on_node(&self, node: &str) -> impl Iterator<Item = &Workload> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .map(|id| &self.workloads[*id as usize])
    }

    /// Where does VIP:port go.
    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<ServiceTarget<'_>> {
        self.by_vip.get(&addr).map(|(id, port)| {
            let service = &self.services[*id as usize];
            ServiceTarget {
                id: *id,
                service,
                port: &service.ports[*port],
            }
        })
    }

    /// By `name.ns.svc.cluster.local`, `name.ns`, or a ServiceEntry host.
    pub fn service_by_host(&self, host: &str) -> Option<&Service> {
        self.by_host
            .get(host)
            .map(|id| &self.services[*id as usize])
    }

    pub fn service(&self, id: ServiceId) -> &Service {
        &self.services[id as usize]
    }

    /// The DestinationRule's policy for a service port (and subset); `None`: the defaults.
    pub fn cluster_policy(
        &self,
        service: ServiceId,
        port: u16,
        subset: Option<&str>,
    ) -> Option<&std::sync::Arc<crate::traffic::ClusterPolicy>> {
        self.destination_policies.get(&service)?.get(port, subset)
    }

    pub fn waypoint(&self, id: WaypointId) -> &Waypoint {
        &self.waypoints[id as usize]
    }

    pub fn waypoint_by_name(&self, namespace: &str, name: &str) -> Option<&Waypoint> {
        // One lookup key per call; waypoint lookups by name are control-path only.
        self.waypoint_by_name
            .get(&(namespace.to_string(), name.to_string()))
            .map(|id| &self.waypoints[*id as usize])
    }

    /// May this peer reach this workload (ztunnel's L4 decision).
    pub fn authorize<'s>(&'s self, workload: &'s Workload, request: &Request<'_>) -> Verdict<'s> {
        authz::evaluate(
            workload
                .policies
                .iter()
                .map(|id| &self.policies[*id as usize]),
            request,
        )
    }

    /// May this request reach this workload, judged by its own sidecar (every L7 field).
    pub fn authorize_sidecar<'s>(
        &'s self,
        workload: &'s Workload,
        request: &Request<'_>,
    ) -> Verdict<'s> {
        authz::evaluate(
            workload
                .policies
                .iter()
                .filter_map(|id| self.sidecar_policies.get(*id as usize)),
            request,
        )
    }

    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| p.is_error())
    }
}
