//! Parsed resources → one `Snapshot`, in one pass over each kind, in dependency order: namespaces,
//! waypoints, workloads, services and ServiceEntries, bindings, PeerAuthentication, authorization,
//! routes, traffic settings. A bad object is left out with a problem naming it; the rest applies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::{FxHashMap, FxHashSet};
use shoal_hbone::Identity;

use crate::authz::{self, Action};
use crate::binding::{self, Binding, Subject, UseLabels, WaypointFor, WaypointInfo};
use crate::duration;
use crate::parse::{describe, Object, Parsed};
use crate::peerauth::{self, Mode, PeerAuth};
use crate::problem::{Problem, Problems};
use crate::resources::{self, Resource};
use crate::routes;
use crate::snapshot::{
    L7Config, LabelSource, Labels, Protocol, Service, ServiceId, ServiceKind, ServicePort,
    Snapshot, Spiffe, TargetPort, Waypoint, WaypointId, Workload, WorkloadId, WorkloadKind,
};
use crate::traffic;
use crate::vip::{self, Allocations};

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// WorkloadEntries carry no node; this annotation places one on a node (as `spec.nodeName` does for
/// a Pod), so that node's ztunnel serves it.
pub const NODE_ANNOTATION: &str = "shoal.io/node-name";
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

#[derive(Debug, Clone)]
pub struct Options {
    pub trust_domain: String,
    /// Where mesh-wide policies live (Istio's `istio-system`).
    pub root_namespace: String,
    pub cluster_domain: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            trust_domain: shoal_hbone::DEFAULT_TRUST_DOMAIN.to_string(),
            root_namespace: "istio-system".to_string(),
            cluster_domain: "cluster.local".to_string(),
        }
    }
}

/// Compiles what `parse` produced. `previous` keeps allocated VIPs where they were.
pub fn compile(mut parsed: Parsed, previous: &Allocations, options: &Options) -> Snapshot {
    let started = Instant::now();
    parsed.report_skipped();
    let mut c = Compiler {
        options,
        snapshot: Snapshot {
            trust_domain: options.trust_domain.clone(),
            root_namespace: options.root_namespace.clone(),
            ..Snapshot::default()
        },
        problems: parsed.problems,
        namespaces: HashMap::new(),
        namespace_objects: HashMap::new(),
        label_index: FxHashMap::default(),
        by_namespace: FxHashMap::default(),
        strings: FxHashSet::default(),
        identities: FxHashMap::default(),
        effective: FxHashMap::default(),
        service_by_name: FxHashMap::default(),
        waypoint_routes: Vec::new(),
        reported_namespaces: BTreeSet::new(),
    };
    let objects = c.dedupe(parsed.objects);
    let by_kind = |kind: &'static str| objects.iter().filter(move |o| o.resource.kind() == kind);

    c.namespaces(by_kind("Namespace"));
    c.waypoints(by_kind("Gateway"));
    c.workloads(by_kind("Pod"), by_kind("WorkloadEntry"));
    c.waypoint_pods();
    c.services(by_kind("Service"), previous);
    c.service_entries(by_kind("ServiceEntry"), previous);
    c.bind_waypoints(&objects);
    c.peer_authentication(by_kind("PeerAuthentication"));
    c.authorization(by_kind("AuthorizationPolicy"));
    c.http_routes(by_kind("HTTPRoute"));
    c.destination_rules(by_kind("DestinationRule"));
    c.virtual_services(by_kind("VirtualService"));
    c.rate_limits(by_kind("HTTPLocalRateLimitPolicy"));

    let mut snapshot = c.snapshot;
    snapshot.stats.objects = objects.len();
    snapshot.stats.errors = c.problems.errors();
    snapshot.stats.warnings = c.problems.warnings();
    snapshot.problems = c.problems.into_vec();
    snapshot.stats.compile_time = started.elapsed();
    snapshot
}

/// (namespace, name) → each waypoint's id and what it is for.
type WaypointInfos = HashMap<(String, String), (WaypointId, WaypointFor)>;
/// (label key, value) → the namespace's workloads carrying it.
type LabelIndex = FxHashMap<(Arc<str>, Arc<str>), Vec<WorkloadId>>;
/// (SPIFFE identity, principal, the identity parsed once for the proxies), shared by every
/// workload of one service account.
type SharedIdentity = (Arc<str>, Arc<str>, Spiffe);

struct Compiler<'o> {
    options: &'o Options,
    snapshot: Snapshot,
    problems: Problems,
    /// Namespace labels (namespaces referenced but not declared have none).
    namespaces: HashMap<String, std::collections::BTreeMap<String, String>>,
    namespace_objects: HashMap<String, Object>,
    /// namespace → (label key, value) → workloads: selectors look up their rarest label instead of
    /// scanning every workload.
    label_index: FxHashMap<String, LabelIndex>,
    by_namespace: FxHashMap<String, Vec<WorkloadId>>,
    /// Interned strings: label keys and values, service accounts, nodes, identities.
    strings: FxHashSet<Arc<str>>,
    /// (namespace, service account) → (SPIFFE identity, principal).
    identities: FxHashMap<(String, Arc<str>), SharedIdentity>,
    /// Identical effective PeerAuthentications, shared.
    effective: FxHashMap<peerauth::Effective, Arc<peerauth::Effective>>,
    /// (is a ServiceEntry, namespace, name) → services (a ServiceEntry gives one per host).
    service_by_name: FxHashMap<(bool, String, String), Vec<ServiceId>>,
    /// Each waypoint's mesh listener `allowedRoutes.namespaces`, by WaypointId.
    waypoint_routes: Vec<Option<resources::RouteNamespaces>>,
    reported_namespaces: BTreeSet<(String, String)>,
}

fn problem_for(o: &Object, p: Problem) -> Problem {
    p.at(&o.origin).object(o.describe())
}

fn port_in_range(value: i64) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p > 0)
}

fn created(o: &Object) -> Option<String> {
    o.resource.metadata().creation_timestamp.clone()
}

impl Compiler<'_> {
    fn error(
        &mut self,
        o: &Object,
        field: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.report(o, Problem::error(message), field, hint.into());
    }

    fn warning(
        &mut self,
        o: &Object,
        field: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.report(o, Problem::warning(message), field, hint.into());
    }

    fn report(&mut self, o: &Object, problem: Problem, field: &str, hint: String) {
        let mut p = problem.field(field);
        if !hint.is_empty() {
            p = p.hint(hint);
        }
        self.problems.push(problem_for(o, p));
    }

    /// The same kind, namespace and name twice: the first one read wins.
    fn dedupe(&mut self, objects: Vec<Object>) -> Vec<Object> {
        let mut seen: FxHashMap<(String, String, String), crate::problem::Origin> =
            FxHashMap::default();
        let mut out = Vec::with_capacity(objects.len());
        for o in objects {
            let meta = o.resource.metadata();
            let key = (
                o.resource.kind().to_string(),
                meta.namespace.clone(),
                meta.name.clone(),
            );
            if let Some(first) = seen.get(&key) {
                let message = format!("defined again; the first definition, at {first}, is used");
                self.error(
                    &o,
                    "metadata.name",
                    message,
                    "remove one of the two, or rename one",
                );
                continue;
            }
            seen.insert(key, o.origin.clone());
            out.push(o);
        }
        out
    }

    fn namespaces<'a>(&mut self, objects: impl Iterator<Item = &'a Object>) {
        for o in objects {
            let meta = o.resource.metadata();
            if let Some(mode) = meta.labels.get(DATAPLANE_MODE) {
                if mode != "ambient" && mode != "none" {
                    self.warning(o, &format!("metadata.labels[{DATAPLANE_MODE}]"), format!("unknown data plane mode {mode:?}; the namespace is not in the ambient mesh"), "use ambient (or none)");
                }
            }
            self.namespaces
                .insert(meta.name.clone(), meta.labels.clone());
            self.namespace_objects.insert(meta.name.clone(), o.clone());
        }
    }

    fn namespace_labels(&self, namespace: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(namespace)
    }

    fn waypoints<'a>(&mut self, objects: impl Iterator<Item = &'a Object>) {
        for o in objects {
            let Resource::Gateway(g) = o.resource.as_ref() else {
                continue;
            };
            if g.spec.gateway_class_name != WAYPOINT_CLASS {
                self.warning(
                    o,
                    "spec.gatewayClassName",
                    format!(
                        "gateway class {:?} is not served by shoal; only waypoints are",
                        g.spec.gateway_class_name
                    ),
                    format!("waypoints use gatewayClassName: {WAYPOINT_CLASS}"),
                );
                continue;
            }
            let Some(mesh) = g
                .spec
                .listeners
                .iter()
                .find(|l| l.protocol == "HBONE" && l.port == 15008)
            else {
                self.error(
                    o,
                    "spec.listeners",
                    "a waypoint needs an HBONE listener on port 15008",
                    "add a listener {name: mesh, port: 15008, protocol: HBONE}",
                );
                continue;
            };
            let for_ = match binding::WaypointFor::parse(
                g.metadata
                    .labels
                    .get(binding::WAYPOINT_FOR)
                    .map(String::as_str),
            ) {
                Ok(f) => f,
                Err(message) => {
                    self.error(
                        o,
                        &format!("metadata.labels[{}]", binding::WAYPOINT_FOR),
                        message,
                        "",
                    );
                    continue;
                }
            };
            let mut addresses = Vec::new();
            for (field, list) in [
                ("spec.addresses", &g.spec.addresses),
                ("status.addresses", &g.status.addresses),
            ] {
                for (i, a) in list.iter().enumerate() {
                    match (a.type_.as_deref(), a.value.parse::<IpAddr>()) {
                        (None | Some("IPAddress"), Ok(ip)) => addresses.push(ip),
                        _ => self.warning(
                            o,
                            &format!("{field}[{i}]"),
                            format!("address {:?} is not an IP address; ignored", a.value),
                            "waypoint addresses are IPs (type IPAddress)",
                        ),
                    }
                }
            }
            addresses.dedup();
            self.waypoint_routes.push(
                mesh.allowed_routes
                    .as_ref()
                    .and_then(|a| a.namespaces.clone()),
            );
            let meta = &g.metadata;
            let service_account = meta.name.clone();
            let id = self.snapshot.waypoints.len() as WaypointId;
            self.snapshot
                .waypoint_by_name
                .insert((meta.namespace.clone(), meta.name.clone()), id);
            let identity = format!(
                "spiffe://{}/ns/{}/sa/{}",
                self.options.trust_domain, meta.namespace, service_account
            );
            self.snapshot.waypoints.push(Waypoint {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                for_,
                ready: !addresses.is_empty(),
                spiffe: Identity::parse(&identity),
                identity,
                addresses,
                service_account,
                l7: L7Config::default(),
            });
        }
    }

    /// Whether a waypoint accepts objects from `namespace`: its mesh listener's allowedRoutes.
    fn waypoint_allows(&self, id: WaypointId, namespace: &str) -> bool {
        let waypoint = &self.snapshot.waypoints[id as usize];
        if waypoint.namespace == namespace {
            return true;
        }
        let Some(Some(ns)) = self.waypoint_routes.get(id as usize) else {
            return false;
        };
        match ns.from.as_deref() {
            Some("All") => true,
            Some("Selector") => {
                let mut labels = self
                    .namespace_labels(namespace)
                    .cloned()
                    .unwrap_or_default();
                labels
                    .entry("kubernetes.io/metadata.name".to_string())
                    .or_insert_with(|| namespace.to_string());
                ns.selector
                    .as_ref()
                    .is_some_and(|s| label_selector_matches(s, &labels))
            }
            _ => false,
        }
    }

    fn ambient(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        match labels.get(DATAPLANE_MODE).map(String::as_str) {
            Some("ambient") => true,
            Some("none") => false,
            _ => self
                .namespace_labels(namespace)
                .and_then(|l| l.get(DATAPLANE_MODE))
                .is_some_and(|m| m == "ambient"),
        }
    }

    fn intern(&mut self, value: &str) -> Arc<str> {
        if let Some(existing) = self.strings.get(value) {
            return existing.clone();
        }
        let interned: Arc<str> = Arc::from(value);
        self.strings.insert(interned.clone());
        interned
    }

    fn labels(&mut self, map: &BTreeMap<String, String>) -> Labels {
        let pairs = map
            .iter()
            .map(|(k, v)| (self.intern(k), self.intern(v)))
            .collect();
        Labels::new(pairs)
    }

    fn identity(&mut self, namespace: &str, service_account: &Arc<str>) -> SharedIdentity {
        let key = (namespace.to_string(), service_account.clone());
        if let Some(found) = self.identities.get(&key) {
            return found.clone();
        }
        let principal = format!(
            "{}/ns/{namespace}/sa/{service_account}",
            self.options.trust_domain
        );
        let identity = format!("spiffe://{principal}");
        let shared: SharedIdentity = (
            Arc::from(identity.as_str()),
            Arc::from(principal),
            Identity::parse(&identity),
        );
        self.identities.insert(key, shared.clone());
        shared
    }

    fn default_peer_authentication(&mut self) -> Arc<peerauth::Effective> {
        self.share_effective(peerauth::Effective::DEFAULT)
    }

    fn share_effective(&mut self, effective: peerauth::Effective) -> Arc<peerauth::Effective> {
        self.effective
            .entry(effective.clone())
            .or_insert_with(|| Arc::new(effective))
            .clone()
    }

    fn add_workload(&mut self, o: &Object, field: &str, mut w: Workload) -> Option<WorkloadId> {
        let id = self.snapshot.workloads.len() as WorkloadId;
        // Several ServiceEntries may name the same external address (a shared API front, a
        // CDN): the first keeps the address's index, the others still use it as an endpoint.
        let external = w.kind == WorkloadKind::ServiceEntryEndpoint && !w.ambient;
        let mut shared = Vec::new();
        w.ips.retain(|ip| {
            if let Some(other) = self.snapshot.by_ip.get(ip) {
                let other = &self.snapshot.workloads[*other as usize];
                if external && other.kind == WorkloadKind::ServiceEntryEndpoint && !other.ambient {
                    shared.push(*ip);
                    return true;
                }
                let message = format!(
                    "IP {ip} is already {}/{}'s; this object is left out",
                    other.namespace, other.name
                );
                self.problems.push(problem_for(
                    o,
                    Problem::error(message)
                        .field(field)
                        .hint("every workload needs its own address"),
                ));
                false
            } else {
                true
            }
        });
        if w.ips.is_empty() {
            return None;
        }
        for ip in w.ips.iter().filter(|ip| !shared.contains(ip)) {
            self.snapshot.by_ip.insert(*ip, id);
        }
        if let Some(node) = &w.node {
            self.snapshot
                .by_node
                .entry(node.to_string())
                .or_default()
                .push(id);
        }
        self.by_namespace
            .entry(w.namespace.clone())
            .or_default()
            .push(id);
        let index = self.label_index.entry(w.namespace.clone()).or_default();
        for pair in w.labels.pairs() {
            index.entry(pair.clone()).or_default().push(id);
        }
        self.snapshot.workloads.push(w);
        Some(id)
    }

    fn workloads<'a>(
        &mut self,
        pods: impl Iterator<Item = &'a Object>,
        entries: impl Iterator<Item = &'a Object>,
    ) {
        for o in pods {
            let Resource::Pod(pod) = o.resource.as_ref() else {
                continue;
            };
            let meta = &pod.metadata;
            let mut ips = Vec::new();
            let listed: Vec<(String, &str)> = if pod.status.pod_ips.is_empty() {
                pod.status
                    .pod_ip
                    .iter()
                    .map(|ip| ("status.podIP".to_string(), ip.as_str()))
                    .collect()
            } else {
                pod.status
                    .pod_ips
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| (format!("status.podIPs[{i}].ip"), ip.ip.as_str()))
                    .collect()
            };
            for (field, ip) in listed {
                match ip.parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => self.error(
                        o,
                        &field,
                        format!("{ip:?} is not an IP address"),
                        "write an IPv4 or IPv6 address",
                    ),
                }
            }
            if ips.is_empty() {
                self.warning(
                    o,
                    "status.podIP",
                    "the pod has no IP address, so nothing can reach it; left out",
                    "give it status.podIP (on one machine, a 127.0.0.0/8 address per pod)",
                );
                continue;
            }
            let service_account = pod
                .spec
                .service_account_name
                .clone()
                .or_else(|| pod.spec.service_account.clone())
                .unwrap_or_else(|| "default".to_string());
            let service_account = self.intern(&service_account);
            let (identity, principal, spiffe) = self.identity(&meta.namespace, &service_account);
            let ready = !matches!(
                pod.status.phase.as_deref(),
                Some("Pending" | "Failed" | "Succeeded")
            ) && !pod
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status != "True");
            let mut named_ports = Vec::new();
            for (ci, c) in pod.spec.containers.iter().enumerate() {
                for (pi, p) in c.ports.iter().enumerate() {
                    let Some(port) = port_in_range(p.container_port) else {
                        self.error(
                            o,
                            &format!("spec.containers[{ci}].ports[{pi}].containerPort"),
                            format!("port {} is out of range", p.container_port),
                            "use 1 to 65535",
                        );
                        continue;
                    };
                    if let Some(name) = &p.name {
                        named_ports.push((self.intern(name), port));
                    }
                }
            }
            let w = Workload {
                kind: WorkloadKind::Pod,
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                service_account,
                identity,
                spiffe,
                principal,
                ips,
                node: pod.spec.node_name.as_deref().map(|n| self.intern(n)),
                ambient: self.ambient(&meta.namespace, &meta.labels),
                labels: self.labels(&meta.labels),
                ready,
                named_ports: named_ports.into_boxed_slice(),
                waypoint: None,
                is_waypoint: None,
                services: Vec::new(),
                policies: Vec::new(),
                peer_authentication: self.default_peer_authentication(),
            };
            self.add_workload(o, "status.podIP", w);
        }
        for o in entries {
            let Resource::WorkloadEntry(we) = o.resource.as_ref() else {
                continue;
            };
            let meta = &we.metadata;
            if let Some(w) = self.entry_workload(
                o,
                "spec",
                &we.spec,
                &meta.name,
                &meta.namespace,
                &meta.labels,
                WorkloadKind::WorkloadEntry,
            ) {
                let mut w = w;
                w.node = meta
                    .annotations
                    .get(NODE_ANNOTATION)
                    .map(|n| self.intern(n));
                self.add_workload(o, "spec.address", w);
            }
        }
    }

    /// A WorkloadEntry, or a ServiceEntry's inline endpoint, as a workload. `None` for a DNS name
    /// address (those are resolved by the data path, not indexed by IP).
    #[allow(clippy::too_many_arguments)]
    fn entry_workload(
        &mut self,
        o: &Object,
        at: &str,
        spec: &resources::WorkloadEntrySpec,
        name: &str,
        namespace: &str,
        meta_labels: &BTreeMap<String, String>,
        kind: WorkloadKind,
    ) -> Option<Workload> {
        let Some(address) = spec.address.as_deref() else {
            self.error(
                o,
                &format!("{at}.address"),
                "missing address",
                "give the workload's IP address",
            );
            return None;
        };
        let ip = address.parse::<IpAddr>().ok()?;
        let mut labels = meta_labels.clone();
        labels.extend(spec.labels.clone());
        let service_account = spec
            .service_account
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let service_account = self.intern(&service_account);
        let (identity, principal, spiffe) = self.identity(namespace, &service_account);
        let mut named_ports = Vec::new();
        for (port_name, port) in &spec.ports {
            match port_in_range(*port) {
                Some(p) => named_ports.push((self.intern(port_name), p)),
                None => self.error(
                    o,
                    &format!("{at}.ports.{port_name}"),
                    format!("port {port} is out of range"),
                    "use 1 to 65535",
                ),
            }
        }
        Some(Workload {
            kind,
            name: name.to_string(),
            namespace: namespace.to_string(),
            service_account,
            identity,
            spiffe,
            principal,
            ips: vec![ip],
            node: None,
            ambient: self.ambient(namespace, &labels),
            labels: self.labels(&labels),
            ready: true,
            named_ports: named_ports.into_boxed_slice(),
            waypoint: None,
            is_waypoint: None,
            services: Vec::new(),
            policies: Vec::new(),
            peer_authentication: self.default_peer_authentication(),
        })
    }

    /// Waypoint pods (labelled with the Gateway's name) give a waypoint its addresses and identity.
    fn waypoint_pods(&mut self) {
        for (wid, waypoint) in self.snapshot.waypoints.iter_mut().enumerate() {
            let key: (Arc<str>, Arc<str>) = (
                Arc::from(GATEWAY_NAME_LABEL),
                Arc::from(waypoint.name.as_str()),
            );
            let Some(pods) = self
                .label_index
                .get(&waypoint.namespace)
                .and_then(|i| i.get(&key))
            else {
                continue;
            };
            let mut service_account = None;
            for id in pods {
                let w = &mut self.snapshot.workloads[*id as usize];
                w.is_waypoint = Some(wid as WaypointId);
                if w.ready {
                    waypoint.addresses.extend(w.ips.iter().copied());
                }
                service_account.get_or_insert_with(|| {
                    (
                        w.service_account.clone(),
                        w.identity.clone(),
                        w.spiffe.clone(),
                    )
                });
            }
            if let Some((sa, identity, spiffe)) = service_account {
                waypoint.service_account = sa.to_string();
                waypoint.identity = identity.to_string();
                waypoint.spiffe = spiffe;
            }
            waypoint.addresses.sort();
            waypoint.addresses.dedup();
            waypoint.ready = !waypoint.addresses.is_empty();
        }
    }

    /// Workloads in `namespace` whose labels include every pair of `selector`.
    fn select(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<WorkloadId> {
        let Some(index) = self.label_index.get(namespace) else {
            return Vec::new();
        };
        let mut rarest: Option<&Vec<WorkloadId>> = None;
        for (k, v) in selector {
            // Labels are interned: a string never interned is on no workload.
            let (Some(k), Some(v)) = (self.strings.get(k.as_str()), self.strings.get(v.as_str()))
            else {
                return Vec::new();
            };
            match index.get(&(k.clone(), v.clone())) {
                None => return Vec::new(),
                Some(list) if rarest.is_none_or(|r| list.len() < r.len()) => rarest = Some(list),
                _ => {}
            }
        }
        let Some(candidates) = rarest else {
            return Vec::new();
        };
        candidates
            .iter()
            .copied()
            .filter(|id| {
                let labels = &self.snapshot.workloads[*id as usize].labels;
                selector
                    .iter()
                    .all(|(k, v)| labels.label(k) == Some(v.as_str()))
            })
            .collect()
    }

    fn add_service(&mut self, mut service: Service) -> ServiceId {
        let id = self.snapshot.services.len() as ServiceId;
        for vip in &service.vips {
            for (index, port) in service.ports.iter().enumerate() {
                self.snapshot
                    .by_vip
                    .entry(std::net::SocketAddr::new(*vip, port.port))
                    .or_insert((id, index));
            }
        }
        if matches!(service.kind, ServiceKind::Kubernetes) {
            let short = format!("{}.{}", service.name, service.namespace);
            self.snapshot.by_host.insert(format!("{short}.svc"), id);
            self.snapshot.by_host.insert(short, id);
        }
        self.snapshot
            .by_host
            .entry(service.hostname.clone())
            .or_insert(id);
        for e in &service.endpoints {
            self.snapshot.workloads[*e as usize].services.push(id);
        }
        let is_entry = matches!(service.kind, ServiceKind::ServiceEntry { .. });
        self.service_by_name
            .entry((is_entry, service.namespace.clone(), service.name.clone()))
            .or_default()
            .push(id);
        service.endpoints.sort_unstable();
        self.snapshot.services.push(service);
        id
    }

    fn services<'a>(&mut self, objects: impl Iterator<Item = &'a Object>, previous: &Allocations) {
        let objects: Vec<&Object> = objects.collect();
        // Services written without a clusterIP get one allocated, stable across reloads.
        let wanting: Vec<String> = objects
            .iter()
            .filter_map(|o| match o.resource.as_ref() {
                Resource::Service(s)
                    if s.spec.cluster_ip.is_none() && s.spec.cluster_ips.is_empty() =>
                {
                    Some(format!("{}/{}", s.metadata.namespace, s.metadata.name))
                }
                _ => None,
            })
            .collect();
        let (allocated, _) = vip::allocate(
            vip::SERVICE_POOL,
            wanting.iter().map(String::as_str),
            previous,
        );
        for o in objects {
            let Resource::Service(s) = o.resource.as_ref() else {
                continue;
            };
            let meta = &s.metadata;
            let mut ports = Vec::new();
            let mut bad = false;
            for (i, p) in s.spec.ports.iter().enumerate() {
                let Some(port) = port_in_range(p.port) else {
                    self.error(
                        o,
                        &format!("spec.ports[{i}].port"),
                        format!("port {} is out of range", p.port),
                        "use 1 to 65535",
                    );
                    bad = true;
                    continue;
                };
                let target = match &p.target_port {
                    None => TargetPort::Number(port),
                    Some(resources::IntOrString::Int(n)) => match port_in_range(*n) {
                        Some(n) => TargetPort::Number(n),
                        None => {
                            self.error(
                                o,
                                &format!("spec.ports[{i}].targetPort"),
                                format!("port {n} is out of range"),
                                "use 1 to 65535, or a container port's name",
                            );
                            bad = true;
                            continue;
                        }
                    },
                    Some(resources::IntOrString::String(name)) => match name.parse::<i64>() {
                        Ok(n) => match port_in_range(n) {
                            Some(n) => TargetPort::Number(n),
                            None => {
                                self.error(
                                    o,
                                    &format!("spec.ports[{i}].targetPort"),
                                    format!("port {n} is out of range"),
                                    "use 1 to 65535",
                                );
                                bad = true;
                                continue;
                            }
                        },
                        Err(_) => TargetPort::Named(name.clone()),
                    },
                };
                if let Some(protocol) = &p.protocol {
                    if protocol != "TCP" {
                        self.warning(
                            o,
                            &format!("spec.ports[{i}].protocol"),
                            format!("{protocol} ports are not carried by the mesh; only TCP"),
                            "",
                        );
                        continue;
                    }
                }
                ports.push(ServicePort {
                    name: p.name.clone(),
                    port,
                    target,
                    protocol: Protocol::from_declared(
                        None,
                        p.app_protocol.as_deref(),
                        p.name.as_deref(),
                    ),
                });
            }
            if bad {
                continue;
            }
            let mut vips = Vec::new();
            let mut listed: Vec<(String, &String)> = Vec::new();
            if let Some(ip) = &s.spec.cluster_ip {
                listed.push(("spec.clusterIP".to_string(), ip));
            }
            for (i, ip) in s.spec.cluster_ips.iter().enumerate() {
                listed.push((format!("spec.clusterIPs[{i}]"), ip));
            }
            let headless = listed.iter().any(|(_, ip)| ip.as_str() == "None");
            for (field, ip) in listed {
                if ip == "None" || ip.is_empty() {
                    continue;
                }
                match ip.parse::<IpAddr>() {
                    Ok(ip) if !vips.contains(&ip) => vips.push(ip),
                    Ok(_) => {}
                    Err(_) => self.error(o, &field, format!("{ip:?} is not an IP address"), "write an IP, None for a headless service, or leave it out to have one allocated"),
                }
            }
            let key = format!("{}/{}", meta.namespace, meta.name);
            if vips.is_empty() && !headless {
                match allocated.get(&key) {
                    Some(ip) => {
                        vips.push(IpAddr::V4(*ip));
                        self.snapshot.allocations.insert(key.clone(), *ip);
                        self.warning(
                            o,
                            "spec.clusterIP",
                            format!("no clusterIP; shoal allocated {ip}"),
                            "write spec.clusterIP to choose the address",
                        );
                    }
                    None => self.warning(
                        o,
                        "spec.clusterIP",
                        "no clusterIP and the allocation range is full; reachable by name only",
                        "write spec.clusterIP",
                    ),
                }
            }
            let endpoints = match &s.spec.selector {
                Some(selector) if !selector.is_empty() => self.select(&meta.namespace, selector),
                _ => Vec::new(),
            };
            let hostname = format!(
                "{}.{}.svc.{}",
                meta.name, meta.namespace, self.options.cluster_domain
            );
            self.add_service(Service {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                hostname,
                kind: ServiceKind::Kubernetes,
                vips,
                ports,
                endpoints,
                waypoint: None,
                labels: meta.labels.clone(),
            });
        }
    }

    fn service_entries<'a>(
        &mut self,
        objects: impl Iterator<Item = &'a Object>,
        previous: &Allocations,
    ) {
        let objects: Vec<&Object> = objects.collect();
        let wanting: Vec<String> = objects
            .iter()
            .filter_map(|o| match o.resource.as_ref() {
                Resource::ServiceEntry(se) if se.spec.addresses.is_empty() => Some(se),
                _ => None,
            })
            .flat_map(|se| {
                se.spec
                    .hosts
                    .iter()
                    .map(move |h| format!("{}/{}", se.metadata.namespace, h))
            })
            .collect();
        let (allocated, _) = vip::allocate(
            vip::SERVICE_ENTRY_POOL,
            wanting.iter().map(String::as_str),
            previous,
        );
        for o in objects {
            let Resource::ServiceEntry(se) = o.resource.as_ref() else {
                continue;
            };
            let meta = &se.metadata;
            let spec = &se.spec;
            if spec.hosts.is_empty() {
                self.error(
                    o,
                    "spec.hosts",
                    "a ServiceEntry needs at least one host",
                    "list the host names clients use, e.g. api.example.com",
                );
                continue;
            }
            let resolution = spec
                .resolution
                .clone()
                .unwrap_or_else(|| "NONE".to_string());
            if !matches!(
                resolution.as_str(),
                "NONE" | "STATIC" | "DNS" | "DNS_ROUND_ROBIN"
            ) {
                self.error(
                    o,
                    "spec.resolution",
                    format!("unknown resolution {resolution:?}"),
                    "use NONE, STATIC, DNS or DNS_ROUND_ROBIN",
                );
                continue;
            }
            let location = spec
                .location
                .clone()
                .unwrap_or_else(|| "MESH_EXTERNAL".to_string());
            if !matches!(location.as_str(), "MESH_EXTERNAL" | "MESH_INTERNAL") {
                self.error(
                    o,
                    "spec.location",
                    format!("unknown location {location:?}"),
                    "use MESH_EXTERNAL or MESH_INTERNAL",
                );
                continue;
            }
            if spec.ports.is_empty() {
                self.error(
                    o,
                    "spec.ports",
                    "a ServiceEntry needs at least one port",
                    "add ports: [{number: 443, name: tls, protocol: TLS}]",
                );
                continue;
            }
            let mut ports = Vec::new();
            let mut bad = false;
            for (i, p) in spec.ports.iter().enumerate() {
                let Some(number) = port_in_range(p.number) else {
                    self.error(
                        o,
                        &format!("spec.ports[{i}].number"),
                        format!("port {} is out of range", p.number),
                        "use 1 to 65535",
                    );
                    bad = true;
                    continue;
                };
                let target = match p.target_port {
                    None => number,
                    Some(t) => match port_in_range(t) {
                        Some(t) => t,
                        None => {
                            self.error(
                                o,
                                &format!("spec.ports[{i}].targetPort"),
                                format!("port {t} is out of range"),
                                "use 1 to 65535",
                            );
                            bad = true;
                            continue;
                        }
                    },
                };
                ports.push(ServicePort {
                    name: p.name.clone(),
                    port: number,
                    target: TargetPort::Number(target),
                    protocol: Protocol::from_declared(
                        p.protocol.as_deref(),
                        None,
                        p.name.as_deref(),
                    ),
                });
            }
            if bad {
                continue;
            }
            if resolution.starts_with("DNS") {
                if let Some(h) = spec.hosts.iter().find(|h| h.starts_with('*')) {
                    if spec.endpoints.is_empty() {
                        self.error(
                            o,
                            "spec.hosts",
                            format!("wildcard host {h:?} cannot be resolved by DNS"),
                            "use resolution NONE for wildcard hosts, or list endpoints",
                        );
                        continue;
                    }
                }
            }
            let mut fixed = Vec::new();
            for (i, a) in spec.addresses.iter().enumerate() {
                match authz::parse_net(a) {
                    Some(net) if net.prefix_len() == net.max_prefix_len() => fixed.push(net.addr()),
                    Some(_) => self.warning(o, &format!("spec.addresses[{i}]"), format!("CIDR {a:?} cannot be a service VIP; traffic to it is matched by the data path only as passthrough"), "list single addresses"),
                    None => self.error(o, &format!("spec.addresses[{i}]"), format!("{a:?} is not an IP address"), "write an IP address or a CIDR"),
                }
            }
            // Endpoints: inline ones (an IP, or a host name for DNS), then selected workloads.
            let mut endpoints = Vec::new();
            let mut dns_endpoints = Vec::new();
            for (i, e) in spec.endpoints.iter().enumerate() {
                let at = format!("spec.endpoints[{i}]");
                let address = e.address.clone().unwrap_or_default();
                if address.parse::<IpAddr>().is_err() {
                    if resolution.starts_with("DNS") && !address.is_empty() {
                        dns_endpoints.push(address);
                    } else {
                        self.error(
                            o,
                            &format!("{at}.address"),
                            format!("{address:?} is not an IP address"),
                            "STATIC endpoints are IP addresses; use resolution DNS for host names",
                        );
                    }
                    continue;
                }
                let name = format!("{}-{i}", meta.name);
                if let Some(w) = self.entry_workload(
                    o,
                    &at,
                    e,
                    &name,
                    &meta.namespace,
                    &BTreeMap::new(),
                    WorkloadKind::ServiceEntryEndpoint,
                ) {
                    // Outside the mesh, whatever its namespace says: no HBONE to it.
                    let w = Workload {
                        ambient: w.ambient && location == "MESH_INTERNAL",
                        ..w
                    };
                    if let Some(id) = self.add_workload(o, &format!("{at}.address"), w) {
                        endpoints.push(id);
                    }
                }
            }
            if let Some(selector) = &spec.workload_selector {
                endpoints.extend(self.select(&meta.namespace, &selector.match_labels));
            }
            if resolution == "STATIC" && endpoints.is_empty() {
                self.warning(
                    o,
                    "spec.endpoints",
                    "resolution STATIC with no endpoints: every connection will fail",
                    "list endpoints or a workloadSelector",
                );
            }
            for host in &spec.hosts {
                let key = format!("{}/{host}", meta.namespace);
                let mut vips: Vec<IpAddr> = fixed.clone();
                if vips.is_empty() {
                    if let Some(ip) = allocated.get(&key) {
                        vips.push(IpAddr::V4(*ip));
                        self.snapshot.allocations.insert(key, *ip);
                    }
                }
                self.add_service(Service {
                    name: meta.name.clone(),
                    namespace: meta.namespace.clone(),
                    hostname: host.clone(),
                    kind: ServiceKind::ServiceEntry {
                        location: location.clone(),
                        resolution: resolution.clone(),
                        dns_endpoints: dns_endpoints.clone(),
                    },
                    vips,
                    ports: ports.clone(),
                    endpoints: endpoints.clone(),
                    waypoint: None,
                    labels: meta.labels.clone(),
                });
            }
        }
    }

    /// One object's binding, from its labels and its namespace's.
    fn bind(
        &self,
        infos: &WaypointInfos,
        subject: Subject,
        namespace: &str,
        labels: UseLabels<'_>,
        is_waypoint: bool,
    ) -> Binding {
        let empty = BTreeMap::new();
        let namespace_labels = self.namespaces.get(namespace).unwrap_or(&empty);
        binding::bind(
            subject,
            namespace,
            labels,
            UseLabels::from(namespace_labels),
            is_waypoint,
            |ns, name| {
                infos
                    .get(&(ns.to_string(), name.to_string()))
                    .map(|(id, for_)| WaypointInfo {
                        for_: *for_,
                        allows_namespace: self.waypoint_allows(*id, namespace),
                    })
            },
        )
    }

    fn bind_waypoints(&mut self, objects: &[Object]) {
        let infos: WaypointInfos = self
            .snapshot
            .waypoints
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    (w.namespace.clone(), w.name.clone()),
                    (i as WaypointId, w.for_),
                )
            })
            .collect();
        // (subject, index into services or workloads, origin object for problems)
        let service_objects: HashMap<(&str, &str, &str), &Object> = objects
            .iter()
            .filter(|o| {
                matches!(
                    *o.resource,
                    Resource::Service(_)
                        | Resource::ServiceEntry(_)
                        | Resource::Pod(_)
                        | Resource::WorkloadEntry(_)
                )
            })
            .map(|o| {
                let m = o.resource.metadata();
                (
                    (o.resource.kind(), m.namespace.as_str(), m.name.as_str()),
                    o,
                )
            })
            .collect();
        let mut plan: Vec<(bool, u32, Binding, Option<&Object>, String)> = Vec::new();
        for (i, s) in self.snapshot.services.iter().enumerate() {
            let (kind, subject) = match s.kind {
                ServiceKind::Kubernetes => ("Service", Subject::Service),
                ServiceKind::ServiceEntry { .. } => ("ServiceEntry", Subject::ServiceEntry),
            };
            let b = self.bind(
                &infos,
                subject,
                &s.namespace,
                UseLabels::from(&s.labels),
                false,
            );
            plan.push((
                true,
                i as u32,
                b,
                service_objects
                    .get(&(kind, s.namespace.as_str(), s.name.as_str()))
                    .copied(),
                s.namespace.clone(),
            ));
        }
        for (i, w) in self.snapshot.workloads.iter().enumerate() {
            if w.kind == WorkloadKind::ServiceEntryEndpoint {
                continue;
            }
            let kind = if w.kind == WorkloadKind::Pod {
                "Pod"
            } else {
                "WorkloadEntry"
            };
            let b = self.bind(
                &infos,
                Subject::Workload,
                &w.namespace,
                UseLabels::from(&w.labels),
                w.is_waypoint.is_some(),
            );
            plan.push((
                false,
                i as u32,
                b,
                service_objects
                    .get(&(kind, w.namespace.as_str(), w.name.as_str()))
                    .copied(),
                w.namespace.clone(),
            ));
        }
        for (is_service, index, b, object, namespace) in plan {
            match b {
                Binding::Unbound => {}
                Binding::Bound {
                    namespace: wns,
                    name,
                } => {
                    let Some((id, _)) = infos.get(&(wns, name)) else {
                        continue;
                    };
                    let l7 = &mut self.snapshot.waypoints[*id as usize].l7;
                    if is_service {
                        l7.services.push(index);
                        self.snapshot.services[index as usize].waypoint = Some(*id);
                    } else {
                        l7.workloads.push(index);
                        self.snapshot.workloads[index as usize].waypoint = Some(*id);
                    }
                }
                Binding::Error {
                    inherited: true,
                    message,
                    hint,
                } => {
                    if self
                        .reported_namespaces
                        .insert((namespace.clone(), message.clone()))
                    {
                        let mut p = Problem::error(message)
                            .field(format!("metadata.labels[{}]", binding::USE_WAYPOINT))
                            .hint(hint)
                            .object(format!("Namespace {namespace}"));
                        if let Some(o) = self.namespace_objects.get(&namespace) {
                            p = p.at(&o.origin);
                        }
                        self.problems.push(p);
                    }
                }
                Binding::Error {
                    inherited: false,
                    message,
                    hint,
                } => {
                    let p = Problem::error(message)
                        .field(format!("metadata.labels[{}]", binding::USE_WAYPOINT))
                        .hint(hint);
                    self.problems.push(match object {
                        Some(o) => problem_for(o, p),
                        None => p,
                    });
                }
            }
        }
    }

    fn peer_authentication<'a>(&mut self, objects: impl Iterator<Item = &'a Object>) {
        let mut policies = Vec::new();
        for o in objects {
            let Resource::PeerAuthentication(pa) = o.resource.as_ref() else {
                continue;
            };
            let meta = &pa.metadata;
            let mode = match Mode::parse(pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref())) {
                Ok(m) => m,
                Err(e) => {
                    self.error(o, "spec.mtls.mode", e, "");
                    continue;
                }
            };
            if mode == Mode::Disable {
                self.warning(o, "spec.mtls.mode", "DISABLE is ignored in ambient mode (mesh traffic is always mTLS); treated as PERMISSIVE", "use PERMISSIVE to accept plaintext as well");
            }
            let selector = pa
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .filter(|s| !s.is_empty());
            let mut ports = BTreeMap::new();
            let mut bad = false;
            for (key, m) in &pa.spec.port_level_mtls {
                let at = format!("spec.portLevelMtls[{key}]");
                let Some(port) = key.parse::<i64>().ok().and_then(port_in_range) else {
                    self.error(
                        o,
                        &at,
                        format!("{key:?} is not a port"),
                        "use port numbers from 1 to 65535 as keys",
                    );
                    bad = true;
                    continue;
                };
                match Mode::parse(m.mode.as_deref()) {
                    Ok(mode) => {
                        ports.insert(port, mode);
                    }
                    Err(e) => {
                        self.error(o, &format!("{at}.mode"), e, "");
                        bad = true;
                    }
                }
            }
            if bad {
                continue;
            }
            if !ports.is_empty() && selector.is_none() {
                self.error(
                    o,
                    "spec.portLevelMtls",
                    "portLevelMtls needs a selector (ports are a workload's)",
                    "add spec.selector.matchLabels, or move the ports to a workload's policy",
                );
                continue;
            }
            policies.push(PeerAuth {
                name: format!("{}/{}", meta.namespace, meta.name),
                namespace: meta.namespace.clone(),
                selector,
                mode,
                ports,
                created: created(o),
            });
        }
        if policies.is_empty() {
            return;
        }
        // Each workload weighs only its own namespace's policies and the mesh-wide ones.
        let root = self.options.root_namespace.clone();
        let mut by_namespace: FxHashMap<&str, Vec<PeerAuth>> = FxHashMap::default();
        for p in &policies {
            by_namespace
                .entry(p.namespace.as_str())
                .or_default()
                .push(p.clone());
        }
        let mesh: Vec<PeerAuth> = by_namespace.get(root.as_str()).cloned().unwrap_or_default();
        let mut cache: HashMap<&str, Vec<PeerAuth>> = HashMap::new();
        let mut shared = std::mem::take(&mut self.effective);
        for w in &mut self.snapshot.workloads {
            let relevant = cache.entry(w.namespace.as_str()).or_insert_with(|| {
                let mut list = by_namespace
                    .get(w.namespace.as_str())
                    .cloned()
                    .unwrap_or_default();
                if w.namespace != root {
                    list.extend(mesh.iter().cloned());
                }
                list
            });
            if relevant.is_empty() {
                continue;
            }
            let effective = peerauth::effective(relevant, &root, &w.namespace, &w.labels);
            w.peer_authentication = shared
                .entry(effective.clone())
                .or_insert_with(|| Arc::new(effective))
                .clone();
        }
        self.effective = shared;
    }

    fn authorization<'a>(&mut self, objects: impl Iterator<Item = &'a Object>) {
        for o in objects {
            let Resource::AuthorizationPolicy(ap) = o.resource.as_ref() else {
                continue;
            };
            let meta = &ap.metadata;
            let spec = &ap.spec;
            let action = match spec.action.as_deref() {
                None | Some("ALLOW") => Action::Allow,
                Some("DENY") => Action::Deny,
                Some("AUDIT") => Action::Audit,
                Some("CUSTOM") => {
                    self.error(o, "spec.action", "CUSTOM (external authorization) is not supported by shoal; the policy is left out", "use ALLOW or DENY rules");
                    continue;
                }
                Some(other) => {
                    self.error(
                        o,
                        "spec.action",
                        format!("unknown action {other:?}"),
                        "use ALLOW, DENY, AUDIT or CUSTOM",
                    );
                    continue;
                }
            };
            let mut target_refs = spec.target_refs.clone();
            if let Some(t) = &spec.target_ref {
                target_refs.push(t.clone());
            }
            let has_selector = spec
                .selector
                .as_ref()
                .is_some_and(|s| !s.match_labels.is_empty());
            if has_selector && !target_refs.is_empty() {
                self.error(
                    o,
                    "spec.selector",
                    "selector and targetRefs cannot be used together",
                    "use targetRefs to attach the policy to a waypoint, or selector for ztunnel",
                );
                continue;
            }
            let dry_run = match meta.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    self.error(
                        o,
                        &format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                        format!("{other:?} is not true or false"),
                        "",
                    );
                    continue;
                }
            };
            let name = format!("{}/{}", meta.namespace, meta.name);
            let rules = spec.rules.clone().unwrap_or_default();
            let mut policy = match authz::compile(name, action, dry_run, &meta.namespace, &rules) {
                Ok(p) => p,
                Err((field, message)) => {
                    self.error(o, &field, message, "");
                    continue;
                }
            };
            policy.scope = match &spec.selector {
                _ if !target_refs.is_empty() => {
                    let refs: Vec<String> = target_refs
                        .iter()
                        .map(|r| format!("{} {}", r.kind, r.name))
                        .collect();
                    format!("targetRefs {}", refs.join(", "))
                }
                Some(s) if !s.match_labels.is_empty() => {
                    let labels: Vec<String> = s
                        .match_labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    format!("selector {}", labels.join(","))
                }
                _ if meta.namespace == self.options.root_namespace => "mesh".to_string(),
                _ => format!("namespace {}", meta.namespace),
            };
            if !target_refs.is_empty() {
                self.attach_l7_policy(o, &target_refs, policy);
                continue;
            }
            let (l4, notes) = policy.for_l4();
            for note in notes {
                self.warning(o, "spec.rules", note, "");
            }
            let id = self.snapshot.policies.len() as u32;
            self.snapshot.policies.push(l4);
            self.snapshot.sidecar_policies.push(policy);
            let selected: Vec<WorkloadId> = match &spec.selector {
                Some(s) if !s.match_labels.is_empty() => {
                    self.select(&meta.namespace, &s.match_labels)
                }
                _ if meta.namespace == self.options.root_namespace => {
                    (0..self.snapshot.workloads.len() as WorkloadId).collect()
                }
                _ => self
                    .by_namespace
                    .get(&meta.namespace)
                    .cloned()
                    .unwrap_or_default(),
            };
            for w in selected {
                self.snapshot.workloads[w as usize].policies.push(id);
            }
        }
    }

    fn find_service(&self, namespace: &str, name: &str, kind: &str) -> Vec<ServiceId> {
        let key = (
            kind == "ServiceEntry",
            namespace.to_string(),
            name.to_string(),
        );
        self.service_by_name.get(&key).cloned().unwrap_or_default()
    }

    fn attach_l7_policy(
        &mut self,
        o: &Object,
        refs: &[resources::TargetRef],
        policy: authz::Policy,
    ) {
        let meta = o.resource.metadata();
        for (i, r) in refs.iter().enumerate() {
            let at = format!("spec.targetRefs[{i}]");
            let namespace = r
                .namespace
                .clone()
                .unwrap_or_else(|| meta.namespace.clone());
            match r.kind.as_str() {
                "Gateway" => match self
                    .snapshot
                    .waypoint_by_name
                    .get(&(namespace.clone(), r.name.clone()))
                {
                    Some(id) => self.snapshot.waypoints[*id as usize]
                        .l7
                        .policies
                        .push(policy.clone()),
                    None => self.error(
                        o,
                        &format!("{at}.name"),
                        format!("no waypoint {namespace}/{}", r.name),
                        "target a Gateway of class istio-waypoint",
                    ),
                },
                "Service" | "ServiceEntry" => {
                    let ids = self.find_service(&namespace, &r.name, &r.kind);
                    if ids.is_empty() {
                        self.error(
                            o,
                            &format!("{at}.name"),
                            format!("no {} {namespace}/{}", r.kind, r.name),
                            "",
                        );
                        continue;
                    }
                    for id in ids {
                        if self.snapshot.services[id as usize].waypoint.is_none() {
                            let message = format!(
                                "{} {namespace}/{} has no waypoint, so nothing enforces this policy for it",
                                r.kind, r.name
                            );
                            self.warning(
                                o,
                                &at,
                                message,
                                format!("label it {}: WAYPOINT", binding::USE_WAYPOINT),
                            );
                        }
                        self.snapshot
                            .service_policies
                            .entry(id)
                            .or_default()
                            .push(policy.clone());
                    }
                }
                other => self.error(
                    o,
                    &format!("{at}.kind"),
                    format!("cannot attach to kind {other:?}"),
                    "target a Gateway (waypoint), Service or ServiceEntry",
                ),
            }
        }
    }

    fn http_routes<'a>(&mut self, objects: impl Iterator<Item = &'a Object>) {
        let mut per_service: BTreeMap<ServiceId, Vec<routes::Candidate>> = BTreeMap::new();
        for o in objects {
            let Resource::HttpRoute(route) = o.resource.as_ref() else {
                continue;
            };
            let meta = &route.metadata;
            let resolve = |ns: &str, name: &str, kind: &str| {
                self.find_service(ns, name, kind).first().copied()
            };
            let mut parents = Vec::new();
            for (i, p) in route.spec.parent_refs.iter().enumerate() {
                let kind = p.kind.clone().unwrap_or_else(|| "Gateway".to_string());
                let ns = p
                    .namespace
                    .clone()
                    .unwrap_or_else(|| meta.namespace.clone());
                match kind.as_str() {
                    "Service" | "ServiceEntry" => {
                        let ids = self.find_service(&ns, &p.name, &kind);
                        if ids.is_empty() {
                            parents.push(Err((format!("spec.parentRefs[{i}]"), format!("no {kind} {ns}/{}", p.name))));
                            continue;
                        }
                        for id in ids {
                            if let Some(port) = p.port {
                                if !self.snapshot.services[id as usize].ports.iter().any(|sp| i64::from(sp.port) == port) {
                                    parents.push(Err((format!("spec.parentRefs[{i}].port"), format!("{kind} {ns}/{} has no port {port}", p.name))));
                                    continue;
                                }
                            }
                            parents.push(Ok(id));
                        }
                    }
                    other => parents.push(Err((format!("spec.parentRefs[{i}].kind"), format!("parent kind {other:?} is not served; ambient routes attach to a Service or ServiceEntry")))),
                }
            }
            let candidate = routes::compile(
                &meta.name,
                &meta.namespace,
                created(o),
                &route.spec,
                &resolve,
            );
            let parents: Vec<ServiceId> = parents
                .into_iter()
                .filter_map(|p| match p {
                    Ok(id) => Some(id),
                    Err((field, message)) => {
                        self.error(o, &field, message, "");
                        None
                    }
                })
                .collect();
            match candidate {
                Err((field, message)) => self.error(o, &field, message, ""),
                Ok(c) => {
                    for rule in &c.rules {
                        for b in &rule.backends {
                            if b.service.is_none() {
                                self.warning(
                                    o,
                                    &format!("spec.rules[{}].backendRefs", rule.rule),
                                    format!(
                                        "backend {} does not exist; its share of requests gets 500",
                                        b.name
                                    ),
                                    "",
                                );
                            }
                        }
                    }
                    for id in &parents {
                        if self.snapshot.services[*id as usize].waypoint.is_none() {
                            let s = &self.snapshot.services[*id as usize];
                            let message = format!(
                                "{}/{} has no waypoint, so no waypoint applies this route",
                                s.namespace, s.name
                            );
                            self.warning(
                                o,
                                "spec.parentRefs",
                                message,
                                format!("label the service {}: WAYPOINT", binding::USE_WAYPOINT),
                            );
                        }
                    }
                    let mut parents = parents.into_iter();
                    if let Some(last) = parents.next_back() {
                        for id in parents {
                            per_service.entry(id).or_default().push(routes::Candidate {
                                route: c.route.clone(),
                                created: c.created.clone(),
                                matches: c.matches.clone(),
                                rules: c.rules.clone(),
                            });
                        }
                        per_service.entry(last).or_default().push(c);
                    }
                }
            }
        }
        for (id, candidates) in per_service {
            self.snapshot.routes.insert(id, routes::table(candidates));
        }
    }

    /// A VirtualService or DestinationRule `host`: a short name is in the resource's namespace.
    fn host_to_service(&self, host: &str, namespace: &str) -> Option<ServiceId> {
        if let Some(id) = self.snapshot.by_host.get(host) {
            return Some(*id);
        }
        if !host.contains('.') {
            return self
                .snapshot
                .by_host
                .get(&format!("{host}.{namespace}"))
                .copied();
        }
        None
    }

    fn destination_rules<'a>(&mut self, objects: impl Iterator<Item = &'a Object>) {
        for o in objects {
            let Resource::DestinationRule(dr) = o.resource.as_ref() else {
                continue;
            };
            let meta = &dr.metadata;
            let spec = &dr.spec;
            if spec.host.is_empty() {
                self.error(
                    o,
                    "spec.host",
                    "a DestinationRule needs a host",
                    "name the service, e.g. reviews or reviews.bookinfo.svc.cluster.local",
                );
                continue;
            }
            if let Err((field, message, hint)) = check_traffic_policy(spec) {
                self.error(o, &field, message, hint);
                continue;
            }
            let Some(id) = self.host_to_service(&spec.host, &meta.namespace) else {
                self.warning(
                    o,
                    "spec.host",
                    format!(
                        "no service or ServiceEntry has host {:?}; nothing uses this rule",
                        spec.host
                    ),
                    "",
                );
                continue;
            };
            let traffic = self.snapshot.traffic.entry(id).or_default();
            if let Some((first, _)) = &traffic.destination_rule {
                let message = format!(
                    "host {} already has DestinationRule {first}; this one is ignored",
                    spec.host
                );
                self.warning(o, "spec.host", message, "merge the two");
                continue;
            }
            let name = format!("{}/{}", meta.namespace, meta.name);
            traffic.destination_rule = Some((name.clone(), spec.clone()));
            let ports: Vec<u16> = self.snapshot.services[id as usize]
                .ports
                .iter()
                .map(|p| p.port)
                .collect();
            self.snapshot
                .destination_policies
                .insert(id, traffic::DestinationPolicy::resolve(name, spec, &ports));
        }
    }

    fn rate_limits<'a>(&mut self, objects: impl Iterator<Item = &'a Object>) {
        for o in objects {
            let Resource::RateLimit(rl) = o.resource.as_ref() else {
                continue;
            };
            let meta = &rl.metadata;
            let spec = &rl.spec;
            let Some(target) = &spec.target_ref else {
                self.error(o, "spec.targetRef", "a rate limit needs a targetRef", "name the Service or ServiceEntry to limit, e.g. {kind: Service, name: reviews}");
                continue;
            };
            if !matches!(target.kind.as_str(), "Service" | "ServiceEntry") {
                self.error(
                    o,
                    "spec.targetRef.kind",
                    format!("{:?} cannot be rate limited here", target.kind),
                    "target a Service or a ServiceEntry",
                );
                continue;
            }
            let rate = |field: &str, r: i64| -> Result<u32, (String, String)> {
                u32::try_from(r).ok().filter(|r| *r > 0).ok_or_else(|| {
                    (
                        field.to_string(),
                        format!("{r} is not a rate; give 1 or more requests per second"),
                    )
                })
            };
            let mut bad = None;
            let total = spec
                .total
                .as_ref()
                .map(|t| rate("spec.total.requestsPerSecond", t.requests_per_second));
            let identity = spec
                .identity
                .as_ref()
                .map(|t| rate("spec.identity.requestsPerSecond", t.requests_per_second));
            let mut overrides = Vec::new();
            for (i, ov) in spec.overrides.iter().enumerate() {
                match rate(
                    &format!("spec.overrides[{i}].requestsPerSecond"),
                    ov.requests_per_second,
                ) {
                    Ok(r) => {
                        let who = ov
                            .client_refs
                            .iter()
                            .map(|c| {
                                let ns = c.namespace.as_deref().unwrap_or(&meta.namespace);
                                format!("{}/ns/{ns}/sa/{}", self.options.trust_domain, c.name)
                            })
                            .collect();
                        overrides.push((r, who));
                    }
                    Err(e) => bad = Some(e),
                }
            }
            let total = match total.transpose() {
                Ok(t) => t,
                Err(e) => {
                    bad = Some(e);
                    None
                }
            };
            let identity = match identity.transpose() {
                Ok(t) => t,
                Err(e) => {
                    bad = Some(e);
                    None
                }
            };
            if let Some((field, message)) = bad {
                self.error(o, &field, message, "");
                continue;
            }
            if total.is_none() && identity.is_none() && overrides.is_empty() {
                self.warning(
                    o,
                    "spec",
                    "no rate given; nothing is limited",
                    "set total, identity or overrides",
                );
                continue;
            }
            // The Service, or every service a ServiceEntry made (one per host).
            let entry = target.kind == "ServiceEntry";
            let ids: Vec<ServiceId> = self
                .snapshot
                .services
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    matches!(s.kind, ServiceKind::ServiceEntry { .. }) == entry
                        && s.name == target.name
                        && s.namespace == meta.namespace
                })
                .map(|(i, _)| i as ServiceId)
                .collect();
            if ids.is_empty() {
                self.warning(
                    o,
                    "spec.targetRef.name",
                    format!(
                        "no {} {:?} in namespace {}; nothing is limited",
                        target.kind, target.name, meta.namespace
                    ),
                    "",
                );
                continue;
            }
            let policy = format!("{}/{}", meta.namespace, meta.name);
            for id in ids {
                self.snapshot.rate_limits.insert(
                    id,
                    traffic::RateLimit {
                        policy: policy.clone(),
                        total_per_s: total,
                        identity_per_s: identity,
                        overrides: overrides.clone(),
                    },
                );
            }
        }
    }

    fn virtual_services<'a>(&mut self, objects: impl Iterator<Item = &'a Object>) {
        for o in objects {
            let Resource::VirtualService(vs) = o.resource.as_ref() else {
                continue;
            };
            let meta = &vs.metadata;
            let spec = &vs.spec;
            if spec.hosts.is_empty() {
                self.error(o, "spec.hosts", "a VirtualService needs hosts", "");
                continue;
            }
            if !spec.gateways.is_empty() && !spec.gateways.iter().any(|g| g == "mesh") {
                self.warning(
                    o,
                    "spec.gateways",
                    "applies only to gateways, not to mesh traffic; ignored",
                    "add mesh to gateways to apply it inside the mesh",
                );
                continue;
            }
            if let Err((field, message)) = check_http_routes(&spec.http) {
                self.error(o, &field, message, "");
                continue;
            }
            for (i, rule) in spec.http.iter().enumerate() {
                for (j, r) in rule.route.iter().enumerate() {
                    if self
                        .host_to_service(&r.destination.host, &meta.namespace)
                        .is_none()
                    {
                        let message = format!(
                            "destination host {:?} is not a known service or ServiceEntry",
                            r.destination.host
                        );
                        self.warning(
                            o,
                            &format!("spec.http[{i}].route[{j}].destination.host"),
                            message,
                            "requests routed there will fail with 503",
                        );
                    }
                }
            }
            if !spec.tcp.is_empty() || !spec.tls.is_empty() {
                self.warning(
                    o,
                    "spec.tcp",
                    "tcp and tls routes are not applied by the waypoint",
                    "use HTTPRoute or TCPRoute-free L4 routing",
                );
            }
            for (i, host) in spec.hosts.iter().enumerate() {
                let Some(id) = self.host_to_service(host, &meta.namespace) else {
                    self.warning(
                        o,
                        &format!("spec.hosts[{i}]"),
                        format!("no service or ServiceEntry has host {host:?}"),
                        "",
                    );
                    continue;
                };
                let traffic = self.snapshot.traffic.entry(id).or_default();
                if let Some((first, _)) = &traffic.virtual_service {
                    let message = format!(
                        "host {host} already has VirtualService {first}; this one is ignored"
                    );
                    self.warning(o, &format!("spec.hosts[{i}]"), message, "merge the two");
                    continue;
                }
                let vs_name = format!("{}/{}", meta.namespace, meta.name);
                traffic.virtual_service = Some((vs_name.clone(), spec.http.clone()));
                if spec.http.is_empty() {
                    continue;
                }
                if self.snapshot.routes.contains_key(&id) {
                    self.warning(
                        o,
                        &format!("spec.hosts[{i}]"),
                        format!("host {host} has an HTTPRoute, which the waypoint applies; this VirtualService's http routes are not"),
                        "route with one of them",
                    );
                    continue;
                }
                let table = {
                    let snapshot = &self.snapshot;
                    let service = |h: &str| self.host_to_service(h, &meta.namespace);
                    let subset = |svc: ServiceId, name: &str| {
                        let (_, dr) = snapshot.traffic.get(&svc)?.destination_rule.as_ref()?;
                        dr.subsets.iter().find(|s| s.name == name).map(|s| {
                            s.labels
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect()
                        })
                    };
                    routes::from_virtual_service(
                        &vs_name,
                        &spec.http,
                        &routes::VsResolve {
                            service: &service,
                            subset: &subset,
                        },
                    )
                };
                match table {
                    Ok(t) => {
                        self.snapshot.routes.insert(id, t);
                    }
                    Err((field, message)) => self.error(
                        o,
                        &field,
                        message,
                        "its http routes are not applied; requests go to the service itself",
                    ),
                }
            }
        }
    }
}

fn label_selector_matches(s: &resources::LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && s.match_expressions.iter().all(|e| {
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| e.values.contains(v)),
                "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

type Invalid = (String, String, String);

fn check_traffic_policy(spec: &resources::DestinationRuleSpec) -> Result<(), Invalid> {
    let mut policies = Vec::new();
    if let Some(p) = &spec.traffic_policy {
        policies.push((
            "spec.trafficPolicy".to_string(),
            p.load_balancer.clone(),
            p.connection_pool.clone(),
            p.outlier_detection.clone(),
            p.tls.clone(),
        ));
        for (i, port) in p.port_level_settings.iter().enumerate() {
            policies.push((
                format!("spec.trafficPolicy.portLevelSettings[{i}]"),
                port.load_balancer.clone(),
                port.connection_pool.clone(),
                port.outlier_detection.clone(),
                port.tls.clone(),
            ));
        }
    }
    for (i, subset) in spec.subsets.iter().enumerate() {
        if let Some(p) = &subset.traffic_policy {
            policies.push((
                format!("spec.subsets[{i}].trafficPolicy"),
                p.load_balancer.clone(),
                p.connection_pool.clone(),
                p.outlier_detection.clone(),
                p.tls.clone(),
            ));
        }
    }
    let bad = |field: String, message: String, hint: &str| Err((field, message, hint.to_string()));
    let count = |field: String, value: Option<i64>| -> Result<(), Invalid> {
        match value {
            Some(v) if v < 0 => Err((
                field,
                format!("{v} is negative"),
                "use 0 or more".to_string(),
            )),
            _ => Ok(()),
        }
    };
    let dur = |field: String, value: &Option<String>| -> Result<(), Invalid> {
        match value {
            Some(v) => duration::parse(v)
                .map(|_| ())
                .map_err(|e| (field, e, String::new())),
            None => Ok(()),
        }
    };
    for (at, lb, pool, outlier, tls) in policies {
        if let Some(lb) = lb {
            if let Some(simple) = &lb.simple {
                if !matches!(
                    simple.as_str(),
                    "UNSPECIFIED"
                        | "ROUND_ROBIN"
                        | "LEAST_REQUEST"
                        | "LEAST_CONN"
                        | "RANDOM"
                        | "PASSTHROUGH"
                ) {
                    return bad(
                        format!("{at}.loadBalancer.simple"),
                        format!("unknown load balancer {simple:?}"),
                        "use ROUND_ROBIN, LEAST_REQUEST, RANDOM or PASSTHROUGH",
                    );
                }
            }
            if lb.simple.is_some() && lb.consistent_hash.is_some() {
                return bad(
                    format!("{at}.loadBalancer"),
                    "simple and consistentHash together".to_string(),
                    "choose one",
                );
            }
            if let Some(h) = &lb.consistent_hash {
                let keys = [
                    h.http_header_name.is_some(),
                    h.http_cookie.is_some(),
                    h.use_source_ip == Some(true),
                    h.http_query_parameter_name.is_some(),
                ];
                if keys.iter().filter(|k| **k).count() != 1 {
                    return bad(format!("{at}.loadBalancer.consistentHash"), "needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".to_string(), "");
                }
            }
        }
        if let Some(pool) = pool {
            if let Some(tcp) = &pool.tcp {
                count(
                    format!("{at}.connectionPool.tcp.maxConnections"),
                    tcp.max_connections,
                )?;
                dur(
                    format!("{at}.connectionPool.tcp.connectTimeout"),
                    &tcp.connect_timeout,
                )?;
                dur(
                    format!("{at}.connectionPool.tcp.idleTimeout"),
                    &tcp.idle_timeout,
                )?;
            }
            if let Some(http) = &pool.http {
                count(
                    format!("{at}.connectionPool.http.http1MaxPendingRequests"),
                    http.http1_max_pending_requests,
                )?;
                count(
                    format!("{at}.connectionPool.http.http2MaxRequests"),
                    http.http2_max_requests,
                )?;
                count(
                    format!("{at}.connectionPool.http.maxRequestsPerConnection"),
                    http.max_requests_per_connection,
                )?;
                count(
                    format!("{at}.connectionPool.http.maxRetries"),
                    http.max_retries,
                )?;
                dur(
                    format!("{at}.connectionPool.http.idleTimeout"),
                    &http.idle_timeout,
                )?;
            }
        }
        if let Some(o) = outlier {
            count(
                format!("{at}.outlierDetection.consecutive5xxErrors"),
                o.consecutive5xx_errors,
            )?;
            count(
                format!("{at}.outlierDetection.consecutiveGatewayErrors"),
                o.consecutive_gateway_errors,
            )?;
            dur(format!("{at}.outlierDetection.interval"), &o.interval)?;
            dur(
                format!("{at}.outlierDetection.baseEjectionTime"),
                &o.base_ejection_time,
            )?;
            if let Some(p) = o.max_ejection_percent {
                if !(0..=100).contains(&p) {
                    return bad(
                        format!("{at}.outlierDetection.maxEjectionPercent"),
                        format!("{p} is not a percentage"),
                        "use 0 to 100",
                    );
                }
            }
        }
        if let Some(tls) = tls {
            if let Some(mode) = &tls.mode {
                if !matches!(
                    mode.as_str(),
                    "DISABLE" | "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL"
                ) {
                    return bad(
                        format!("{at}.tls.mode"),
                        format!("unknown TLS mode {mode:?}"),
                        "use DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL",
                    );
                }
                if mode == "MUTUAL" {
                    return bad(
                        format!("{at}.tls.mode"),
                        "MUTUAL (a client certificate to an external server) is not originated by the waypoint yet".to_string(),
                        "use SIMPLE, or originate mutual TLS in the app",
                    );
                }
                if let Some(path) = tls.ca_certificates.as_deref().filter(|p| !p.is_empty()) {
                    if let Err(e) = std::fs::metadata(path) {
                        return bad(
                            format!("{at}.tls.caCertificates"),
                            format!("cannot read {path}: {e}"),
                            "give a PEM file of CA certificates readable by the waypoint",
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "unavailable",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "envoy-ratelimited",
    "retriable-headers",
];

fn check_http_routes(http: &[resources::HttpRouteRule]) -> Result<(), (String, String)> {
    for (i, rule) in http.iter().enumerate() {
        let at = format!("spec.http[{i}]");
        for (j, m) in rule.match_.iter().enumerate() {
            for (field, sm) in [
                ("uri", &m.uri),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    check_string_match(sm, &format!("{at}.match[{j}].{field}"))?;
                }
            }
            for (name, sm) in m.headers.iter().chain(m.query_params.iter()) {
                check_string_match(sm, &format!("{at}.match[{j}].headers[{name}]"))?;
            }
        }
        let mut total = 0;
        for (j, r) in rule.route.iter().enumerate() {
            if let Some(w) = r.weight {
                if !(0..=100).contains(&w) {
                    return Err((
                        format!("{at}.route[{j}].weight"),
                        format!("weight {w} is out of range; use 0 to 100"),
                    ));
                }
                total += w;
            }
            if let Some(p) = &r.destination.port {
                if port_in_range(p.number).is_none() {
                    return Err((
                        format!("{at}.route[{j}].destination.port.number"),
                        format!("port {} is out of range; use 1 to 65535", p.number),
                    ));
                }
            }
        }
        if rule.route.len() > 1 && rule.route.iter().all(|r| r.weight.is_some()) && total == 0 {
            return Err((
                format!("{at}.route"),
                "all weights are 0; give at least one destination a weight".to_string(),
            ));
        }
        if let Some(t) = &rule.timeout {
            duration::parse(t).map_err(|e| (format!("{at}.timeout"), e))?;
        }
        if let Some(r) = &rule.retries {
            if let Some(a) = r.attempts {
                if a < 0 {
                    return Err((
                        format!("{at}.retries.attempts"),
                        format!("{a} is negative; use 0 (no retries) or more"),
                    ));
                }
            }
            if let Some(t) = &r.per_try_timeout {
                duration::parse(t).map_err(|e| (format!("{at}.retries.perTryTimeout"), e))?;
            }
            if let Some(on) = &r.retry_on {
                for token in on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if !RETRY_ON.contains(&token)
                        && token
                            .parse::<u16>()
                            .map_or(true, |c| !(100..=599).contains(&c))
                    {
                        return Err((
                            format!("{at}.retries.retryOn"),
                            format!(
                                "unknown retry condition {token:?}; use {} or a status code",
                                RETRY_ON.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(f) = &rule.fault {
            if let Some(d) = &f.delay {
                if let Some(t) = &d.fixed_delay {
                    duration::parse(t).map_err(|e| (format!("{at}.fault.delay.fixedDelay"), e))?;
                } else {
                    return Err((
                        format!("{at}.fault.delay.fixedDelay"),
                        "a delay fault needs fixedDelay".to_string(),
                    ));
                }
                check_percent(&d.percentage, &format!("{at}.fault.delay.percentage.value"))?;
            }
            if let Some(a) = &f.abort {
                match a.http_status {
                    Some(s) if (200..=599).contains(&s) => {}
                    Some(s) => {
                        return Err((
                            format!("{at}.fault.abort.httpStatus"),
                            format!("{s} is not an HTTP status; use 200 to 599"),
                        ))
                    }
                    None => {
                        return Err((
                            format!("{at}.fault.abort.httpStatus"),
                            "an abort fault needs httpStatus".to_string(),
                        ))
                    }
                }
                check_percent(&a.percentage, &format!("{at}.fault.abort.percentage.value"))?;
            }
        }
    }
    Ok(())
}

fn check_percent(p: &Option<resources::Percent>, at: &str) -> Result<(), (String, String)> {
    match p {
        Some(p) if !(0.0..=100.0).contains(&p.value) => Err((
            at.to_string(),
            format!("{} is not a percentage; use 0 to 100", p.value),
        )),
        _ => Ok(()),
    }
}

fn check_string_match(sm: &resources::StringMatch, at: &str) -> Result<(), (String, String)> {
    let set = [sm.exact.is_some(), sm.prefix.is_some(), sm.regex.is_some()]
        .iter()
        .filter(|s| **s)
        .count();
    if set != 1 {
        return Err((
            at.to_string(),
            "needs exactly one of exact, prefix or regex".to_string(),
        ));
    }
    if let Some(re) = &sm.regex {
        regex::RegexBuilder::new(re)
            .size_limit(routes::REGEX_SIZE_LIMIT_BYTES)
            .build()
            .map_err(|e| {
                (
                    format!("{at}.regex"),
                    format!(
                        "invalid regular expression: {}",
                        e.to_string().lines().last().unwrap_or_default()
                    ),
                )
            })?;
    }
    Ok(())
}

/// Describes an object for messages outside this module.
pub fn object_name(o: &Object) -> String {
    describe(&o.resource)
}
