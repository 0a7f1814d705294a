//! The resources users already write, typed as their own APIs define them (Kubernetes core v1,
//! Gateway API v1, Istio networking and security). Fields keep the spelling of the source API so a
//! field path in an error message is the path the user typed. Nothing here judges values: ranges,
//! conflicts and references are checked by `compile`, which can name what would be right.
//!
//! Unknown fields are not errors (Kubernetes prunes them from CRDs); `parse` reports them as
//! warnings, which catches mis-indented YAML.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The kinds shoal reads, each with its object.
// Held boxed in `parse::Object`, so the enum's size is paid once per object.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Resource {
    Namespace(Namespace),
    Service(Service),
    Pod(Pod),
    WorkloadEntry(WorkloadEntry),
    ServiceEntry(ServiceEntry),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    DestinationRule(DestinationRule),
    VirtualService(VirtualService),
    RateLimit(HttpLocalRateLimitPolicy),
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Namespace(_) => "Namespace",
            Resource::Service(_) => "Service",
            Resource::Pod(_) => "Pod",
            Resource::WorkloadEntry(_) => "WorkloadEntry",
            Resource::ServiceEntry(_) => "ServiceEntry",
            Resource::Gateway(_) => "Gateway",
            Resource::HttpRoute(_) => "HTTPRoute",
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::PeerAuthentication(_) => "PeerAuthentication",
            Resource::DestinationRule(_) => "DestinationRule",
            Resource::VirtualService(_) => "VirtualService",
            Resource::RateLimit(_) => "HTTPLocalRateLimitPolicy",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::Namespace(r) => &r.metadata,
            Resource::Service(r) => &r.metadata,
            Resource::Pod(r) => &r.metadata,
            Resource::WorkloadEntry(r) => &r.metadata,
            Resource::ServiceEntry(r) => &r.metadata,
            Resource::Gateway(r) => &r.metadata,
            Resource::HttpRoute(r) => &r.metadata,
            Resource::AuthorizationPolicy(r) => &r.metadata,
            Resource::PeerAuthentication(r) => &r.metadata,
            Resource::DestinationRule(r) => &r.metadata,
            Resource::VirtualService(r) => &r.metadata,
            Resource::RateLimit(r) => &r.metadata,
        }
    }

    pub(crate) fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Resource::Namespace(r) => &mut r.metadata,
            Resource::Service(r) => &mut r.metadata,
            Resource::Pod(r) => &mut r.metadata,
            Resource::WorkloadEntry(r) => &mut r.metadata,
            Resource::ServiceEntry(r) => &mut r.metadata,
            Resource::Gateway(r) => &mut r.metadata,
            Resource::HttpRoute(r) => &mut r.metadata,
            Resource::AuthorizationPolicy(r) => &mut r.metadata,
            Resource::PeerAuthentication(r) => &mut r.metadata,
            Resource::DestinationRule(r) => &mut r.metadata,
            Resource::VirtualService(r) => &mut r.metadata,
            Resource::RateLimit(r) => &mut r.metadata,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// Filled with `default` by `parse` when absent (as `kubectl apply` does), except for Namespace.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
}

/// A port given as a number or as a name (Kubernetes' IntOrString).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// Istio's `WorkloadSelector` (`selector:` in security resources).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Gateway API / Istio `PolicyTargetReference`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

// ---------------------------------------------------------------- core/v1

#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `None` (absent) selects nothing: the endpoints come from elsewhere.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i64,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// The deprecated spelling, still honoured by Kubernetes.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: i64,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

// ------------------------------------------------------ networking.istio.io

#[derive(Debug, Clone, Deserialize)]
pub struct WorkloadEntry {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEntrySpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, i64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub service_account: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServiceEntry {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceEntrySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    pub number: i64,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DestinationRule {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    #[serde(default)]
    pub port: Option<PortSelector>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PortSelector {
    pub number: i64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default)]
    pub simple: Option<String>,
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    #[serde(default)]
    pub ring_hash: Option<serde_json::Value>,
    #[serde(default)]
    pub maglev: Option<serde_json::Value>,
    #[serde(default)]
    pub minimum_ring_size: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HttpCookie {
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ConnectionPool {
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    #[serde(default)]
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    #[serde(default)]
    pub max_connections: Option<i64>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    #[serde(default)]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(default)]
    pub http2_max_requests: Option<i64>,
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    #[serde(default)]
    pub max_retries: Option<i64>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(default)]
    pub consecutive5xx_errors: Option<i64>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<i64>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VirtualService {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VirtualServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRouteRule>,
    #[serde(default)]
    pub tcp: Vec<serde_json::Value>,
    #[serde(default)]
    pub tls: Vec<serde_json::Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// VirtualService `http[]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub match_: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default)]
    pub redirect: Option<serde_json::Value>,
    #[serde(default)]
    pub rewrite: Option<VsRewrite>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    #[serde(default)]
    pub fault: Option<HttpFault>,
    #[serde(default)]
    pub mirror: Option<VsDestination>,
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    #[serde(default)]
    pub headers: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ignore_uri_case: Option<bool>,
}

/// Istio's StringMatch: exactly one of `exact`, `prefix`, `regex` (checked by `compile`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: VsDestination,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub headers: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct VsDestination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct VsRewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Option<String>,
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HttpFault {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(default)]
    pub fixed_delay: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default)]
    pub http_status: Option<i64>,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Percent {
    pub value: f64,
}

// ------------------------------------------------ gateway.networking.k8s.io

#[derive(Debug, Clone, Deserialize)]
pub struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
    #[serde(default)]
    pub status: GatewayStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GatewayStatus {
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayAddress {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub port: i64,
    pub protocol: String,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RouteNamespaces {
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRuleSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Gateway API defaults the group to `gateway.networking.k8s.io`; `""` is core (Service).
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    /// `None` means one match of PathPrefix `/`; `Some(vec![])` too.
    #[serde(default)]
    pub matches: Option<Vec<HttpRouteMatch>>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpPathMatch {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

/// Header and query-parameter matches share one shape.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpHeaderMatch {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub status_code: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct UrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: HttpBackendRef,
    #[serde(default)]
    pub percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HttpBackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

// -------------------------------------------------------- security.istio.io

#[derive(Debug, Clone, Deserialize)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub provider: Option<serde_json::Value>,
    /// `None` and `Some([])` both match nothing; `[{}]` matches everything.
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<When>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

/// `None` = the field is absent (no condition); `Some(vec![])` is what a user gets writing
/// `principals: []`, which Istio treats as absent too.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// AuthorizationPolicy `when[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct When {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PeerAuthentication {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MtlsMode>,
    /// Keys are port numbers written as YAML keys (strings or integers).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MtlsMode>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct MtlsMode {
    #[serde(default)]
    pub mode: Option<String>,
}

// ------------------------------------------------ policy.linkerd.io (local rate limits)

/// Istio has no first-class local rate limit; this is Linkerd's `HTTPLocalRateLimitPolicy`
/// (`policy.linkerd.io/v1alpha1`), whose `targetRef` may name a Service or a ServiceEntry.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpLocalRateLimitPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RateLimitSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    #[serde(default)]
    pub target_ref: Option<PolicyTargetRef>,
    /// All requests to the target together.
    #[serde(default)]
    pub total: Option<RequestRate>,
    /// Each client identity on its own.
    #[serde(default)]
    pub identity: Option<RequestRate>,
    /// Rates for named clients instead of `identity`'s.
    #[serde(default)]
    pub overrides: Vec<RateOverride>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRate {
    pub requests_per_second: i64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateOverride {
    pub requests_per_second: i64,
    #[serde(default)]
    pub client_refs: Vec<ClientRef>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ClientRef {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
}
