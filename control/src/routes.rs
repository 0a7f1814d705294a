//! HTTPRoute (Gateway API v1) attached to a Service or ServiceEntry, compiled into one table per
//! service with Gateway API precedence already applied, so the waypoint takes the first entry that
//! matches. Precedence: exact path > longest prefix > regular expression (longest first) > has a
//! method > most header matches > most query matches > oldest route > `namespace/name` > rule
//! order > match order. Path prefixes compare whole segments.

use std::cmp::Reverse;
use std::time::Duration;

use regex::Regex;
use serde::Serialize;

use crate::duration;
use crate::resources::{self, HeaderModifier, HttpRouteFilter, PathModifier};
use crate::traffic::{Fault, RetryPolicy};

/// Regular expressions are compiled with this size limit, so a hostile pattern cannot take the
/// control thread's memory.
pub const REGEX_SIZE_LIMIT_BYTES: usize = 256 * 1024;
pub const MAX_WEIGHT: i64 = 1_000_000;

#[derive(Debug, Clone, Serialize)]
pub enum PathMatch {
    Exact(String),
    /// Stored without a trailing slash; `/` is stored as the empty string (matches everything).
    Prefix(String),
    /// A plain string prefix (VirtualService `uri.prefix`: `/abc` matches `/abcd`).
    StringPrefix(String),
    Regex(#[serde(serialize_with = "serialize_regex")] Regex),
}

fn serialize_regex<S: serde::Serializer>(re: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(re.as_str())
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str())
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            PathMatch::StringPrefix(p) => path.starts_with(p.as_str()),
            PathMatch::Regex(re) => re
                .find(path)
                .is_some_and(|m| m.start() == 0 && m.end() == path.len()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub enum ValueMatch {
    Exact(String),
    /// VirtualService `prefix`.
    Prefix(String),
    Regex(#[serde(serialize_with = "serialize_regex")] Regex),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Prefix(p) => value.starts_with(p.as_str()),
            ValueMatch::Regex(re) => re
                .find(value)
                .is_some_and(|m| m.start() == 0 && m.end() == value.len()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Header names lower-cased (they compare case-insensitively).
    pub headers: Vec<(String, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<String>,
    /// The service port the request came to (VirtualService `port` matches).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What the waypoint sees of a request when routing.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The service port it came to.
    pub port: u16,
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
    pub query: &'a dyn Fn(&str) -> Option<&'a str>,
}

impl RouteMatch {
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        self.path.matches(r.path)
            && self.method.as_deref().is_none_or(|m| m == r.method)
            && self.port.is_none_or(|p| p == r.port)
            && self
                .headers
                .iter()
                .all(|(name, m)| (r.header)(name).is_some_and(|v| m.matches(v)))
            && self
                .query
                .iter()
                .all(|(name, m)| (r.query)(name).is_some_and(|v| m.matches(v)))
    }
}

#[derive(Debug, Clone, Serialize)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect {
        scheme: Option<String>,
        hostname: Option<String>,
        path: Option<PathModifier>,
        port: Option<u16>,
        status: u16,
    },
    Rewrite {
        hostname: Option<String>,
        path: Option<PathModifier>,
    },
    Mirror {
        backend: Backend,
        percent: u8,
    },
}

/// Where a backendRef points, resolved by `compile`.
#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    /// `namespace/name` as written.
    pub name: String,
    pub kind: String,
    pub port: Option<u16>,
    pub weight: u32,
    /// Index of the service in the snapshot; `None` when it does not exist (its share gets 500).
    pub service: Option<u32>,
    /// A DestinationRule subset's labels: only endpoints carrying all of them (VirtualService).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<SubsetLabels>,
    /// The subset's name, for its traffic policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset_name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteRule {
    /// `namespace/name` of the HTTPRoute and the rule's index, for logs and metrics.
    pub route: String,
    pub rule: usize,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    #[serde(serialize_with = "serialize_ms")]
    pub request_timeout: Option<Duration>,
    #[serde(serialize_with = "serialize_ms")]
    pub backend_request_timeout: Option<Duration>,
    /// VirtualService `retries`; `None` is the mesh default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    /// VirtualService `fault`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

fn serialize_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteEntry {
    #[serde(rename = "match")]
    pub match_: RouteMatch,
    /// Index into `RouteTable::rules`.
    pub rule: usize,
}

/// Every route attached to one service, in precedence order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteTable {
    pub entries: Vec<RouteEntry>,
    pub rules: Vec<RouteRule>,
}

impl RouteTable {
    /// The rule for a request; `None` means 404 (a route is attached but nothing matched).
    pub fn select(&self, r: &RequestView<'_>) -> Option<&RouteRule> {
        self.select_match(r).map(|(_, rule)| rule)
    }

    /// The same, with the match that selected it (whose path prefix `ReplacePrefixMatch` replaces).
    pub fn select_match(&self, r: &RequestView<'_>) -> Option<(&RouteMatch, &RouteRule)> {
        self.entries
            .iter()
            .find(|e| e.match_.matches(r))
            .map(|e| (&e.match_, &self.rules[e.rule]))
    }
}

/// An HTTPRoute prepared for the table, with its precedence inputs.
pub struct Candidate {
    pub route: String,
    pub created: Option<String>,
    pub matches: Vec<Vec<RouteMatch>>,
    pub rules: Vec<RouteRule>,
}

/// A field path and what is wrong with it.
pub type FieldError = (String, String);

/// Compiles one HTTPRoute's rules. `resolve(namespace, name, kind)` finds a backend service.
pub fn compile(
    route_name: &str,
    namespace: &str,
    created: Option<String>,
    spec: &resources::HttpRouteSpec,
    resolve: &dyn Fn(&str, &str, &str) -> Option<u32>,
) -> Result<Candidate, FieldError> {
    let mut matches = Vec::new();
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let mut rule_matches = Vec::new();
        match &rule.matches {
            Some(list) if !list.is_empty() => {
                for (j, m) in list.iter().enumerate() {
                    rule_matches.push(compile_match(m, &format!("{at}.matches[{j}]"))?);
                }
            }
            _ => rule_matches.push(RouteMatch {
                path: PathMatch::Prefix(String::new()),
                headers: vec![],
                query: vec![],
                method: None,
                port: None,
            }),
        }
        let mut backends = Vec::new();
        for (j, b) in rule.backend_refs.iter().enumerate() {
            backends.push(backend(
                b,
                namespace,
                &format!("{at}.backendRefs[{j}]"),
                resolve,
            )?);
        }
        let mut filters = Vec::new();
        for (j, f) in rule.filters.iter().enumerate() {
            filters.push(filter(
                f,
                namespace,
                &format!("{at}.filters[{j}]"),
                resolve,
            )?);
        }
        let (mut request_timeout, mut backend_request_timeout) = (None, None);
        if let Some(t) = &rule.timeouts {
            if let Some(v) = &t.request {
                request_timeout =
                    Some(duration::parse(v).map_err(|e| (format!("{at}.timeouts.request"), e))?);
            }
            if let Some(v) = &t.backend_request {
                backend_request_timeout = Some(
                    duration::parse(v).map_err(|e| (format!("{at}.timeouts.backendRequest"), e))?,
                );
            }
            if let (Some(req), Some(backend)) = (request_timeout, backend_request_timeout) {
                // Zero means "no timeout" in the Gateway API.
                if !req.is_zero() && backend > req {
                    return Err((
                        format!("{at}.timeouts.backendRequest"),
                        "backendRequest is longer than request; it must be at most the whole request's timeout".to_string(),
                    ));
                }
            }
        }
        matches.push(rule_matches);
        rules.push(RouteRule {
            route: format!("{namespace}/{route_name}"),
            rule: i,
            filters,
            backends,
            request_timeout: request_timeout.filter(|d| !d.is_zero()),
            backend_request_timeout: backend_request_timeout.filter(|d| !d.is_zero()),
            retries: None,
            fault: None,
        });
    }
    Ok(Candidate {
        route: format!("{namespace}/{route_name}"),
        created,
        matches,
        rules,
    })
}

fn regex(pattern: &str, at: &str) -> Result<Regex, FieldError> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT_BYTES)
        .build()
        .map_err(|e| {
            (
                at.to_string(),
                format!(
                    "invalid regular expression: {}",
                    e.to_string().lines().last().unwrap_or_default()
                ),
            )
        })
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn compile_match(m: &resources::HttpRouteMatch, at: &str) -> Result<RouteMatch, FieldError> {
    let path = match &m.path {
        None => PathMatch::Prefix(String::new()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".to_string());
            let kind = p.type_.as_deref().unwrap_or("PathPrefix");
            if kind != "RegularExpression" && !value.starts_with('/') {
                return Err((
                    format!("{at}.path.value"),
                    format!("{value:?} must start with /"),
                ));
            }
            match kind {
                "Exact" => PathMatch::Exact(value),
                "PathPrefix" => PathMatch::Prefix(value.trim_end_matches('/').to_string()),
                "RegularExpression" => PathMatch::Regex(regex(&value, &format!("{at}.path.value"))?),
                other => {
                    return Err((format!("{at}.path.type"), format!("unknown path match type {other:?}; use Exact, PathPrefix or RegularExpression")))
                }
            }
        }
    };
    let values = |list: &[resources::HttpHeaderMatch],
                  field: &str,
                  lower: bool|
     -> Result<Vec<(String, ValueMatch)>, FieldError> {
        list.iter()
            .enumerate()
            .map(|(k, h)| {
                let name = if lower {
                    h.name.to_ascii_lowercase()
                } else {
                    h.name.clone()
                };
                let m = match h.type_.as_deref().unwrap_or("Exact") {
                    "Exact" => ValueMatch::Exact(h.value.clone()),
                    "RegularExpression" => {
                        ValueMatch::Regex(regex(&h.value, &format!("{at}.{field}[{k}].value"))?)
                    }
                    other => {
                        return Err((
                            format!("{at}.{field}[{k}].type"),
                            format!("unknown match type {other:?}; use Exact or RegularExpression"),
                        ))
                    }
                };
                Ok((name, m))
            })
            .collect()
    };
    let method = match &m.method {
        None => None,
        Some(method) if METHODS.contains(&method.as_str()) => Some(method.clone()),
        Some(method) => {
            return Err((
                format!("{at}.method"),
                format!(
                    "unknown method {method:?}; use one of {}",
                    METHODS.join(", ")
                ),
            ))
        }
    };
    Ok(RouteMatch {
        path,
        headers: values(&m.headers, "headers", true)?,
        query: values(&m.query_params, "queryParams", false)?,
        method,
        port: None,
    })
}

fn port(value: i64, at: &str) -> Result<u16, FieldError> {
    u16::try_from(value).ok().filter(|p| *p > 0).ok_or_else(|| {
        (
            at.to_string(),
            format!("port {value} is out of range; use 1 to 65535"),
        )
    })
}

fn backend(
    b: &resources::HttpBackendRef,
    namespace: &str,
    at: &str,
    resolve: &dyn Fn(&str, &str, &str) -> Option<u32>,
) -> Result<Backend, FieldError> {
    let weight = b.weight.unwrap_or(1);
    if !(0..=MAX_WEIGHT).contains(&weight) {
        return Err((
            format!("{at}.weight"),
            format!("weight {weight} is out of range; use 0 to {MAX_WEIGHT}"),
        ));
    }
    let kind = b.kind.clone().unwrap_or_else(|| "Service".to_string());
    if !matches!(kind.as_str(), "Service" | "ServiceEntry" | "Hostname") {
        return Err((
            format!("{at}.kind"),
            format!("backend kind {kind:?} is not supported; use Service or ServiceEntry"),
        ));
    }
    let port = b.port.map(|p| port(p, &format!("{at}.port"))).transpose()?;
    if port.is_none() && kind == "Service" {
        return Err((
            format!("{at}.port"),
            "a Service backend needs a port".to_string(),
        ));
    }
    let ns = b.namespace.as_deref().unwrap_or(namespace);
    Ok(Backend {
        name: format!("{ns}/{}", b.name),
        service: resolve(ns, &b.name, &kind),
        kind,
        port,
        weight: weight as u32,
        subset: None,
        subset_name: None,
    })
}

fn filter(
    f: &HttpRouteFilter,
    namespace: &str,
    at: &str,
    resolve: &dyn Fn(&str, &str, &str) -> Option<u32>,
) -> Result<Filter, FieldError> {
    let missing = |field: &str| {
        (
            format!("{at}.{field}"),
            format!("filter type {} needs {field}", f.type_),
        )
    };
    Ok(match f.type_.as_str() {
        "RequestHeaderModifier" => Filter::RequestHeaders(f.request_header_modifier.clone().ok_or_else(|| missing("requestHeaderModifier"))?),
        "ResponseHeaderModifier" => Filter::ResponseHeaders(f.response_header_modifier.clone().ok_or_else(|| missing("responseHeaderModifier"))?),
        "RequestRedirect" => {
            let r = f.request_redirect.clone().ok_or_else(|| missing("requestRedirect"))?;
            let status = r.status_code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err((format!("{at}.requestRedirect.statusCode"), format!("{status} is not a redirect status; use 301, 302, 303, 307 or 308")));
            }
            if let Some(path) = &r.path {
                path_modifier(path, &format!("{at}.requestRedirect.path"))?;
            }
            let p = r.port.map(|p| port(p, &format!("{at}.requestRedirect.port"))).transpose()?;
            Filter::Redirect { scheme: r.scheme, hostname: r.hostname, path: r.path, port: p, status: status as u16 }
        }
        "URLRewrite" => {
            let r = f.url_rewrite.clone().ok_or_else(|| missing("urlRewrite"))?;
            if let Some(path) = &r.path {
                path_modifier(path, &format!("{at}.urlRewrite.path"))?;
            }
            Filter::Rewrite { hostname: r.hostname, path: r.path }
        }
        "RequestMirror" => {
            let m = f.request_mirror.clone().ok_or_else(|| missing("requestMirror"))?;
            let percent = m.percent.unwrap_or(100);
            if !(0..=100).contains(&percent) {
                return Err((format!("{at}.requestMirror.percent"), format!("{percent} is not a percentage; use 0 to 100")));
            }
            let mut b = backend(&m.backend_ref, namespace, &format!("{at}.requestMirror.backendRef"), resolve)?;
            b.weight = 1;
            Filter::Mirror { backend: b, percent: percent as u8 }
        }
        other => {
            return Err((
                format!("{at}.type"),
                format!("unknown filter type {other:?}; use RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite or RequestMirror"),
            ))
        }
    })
}

fn path_modifier(p: &PathModifier, at: &str) -> Result<(), FieldError> {
    match (
        p.type_.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(_), _) | ("ReplacePrefixMatch", _, Some(_)) => Ok(()),
        ("ReplaceFullPath", None, _) => Err((
            format!("{at}.replaceFullPath"),
            "ReplaceFullPath needs replaceFullPath".to_string(),
        )),
        ("ReplacePrefixMatch", _, None) => Err((
            format!("{at}.replacePrefixMatch"),
            "ReplacePrefixMatch needs replacePrefixMatch".to_string(),
        )),
        (other, _, _) => Err((
            format!("{at}.type"),
            format!("unknown path modifier {other:?}; use ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

/// Sorts best first: path kind (exact, prefix, regex), longer path, has a method, more headers,
/// more query parameters, older route, route name, rule index, match index.
type PrecedenceKey = (
    u8,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
    String,
    String,
    usize,
    usize,
);

/// Orders every (route, rule, match) of the routes attached to one service.
pub fn table(candidates: Vec<Candidate>) -> RouteTable {
    struct Keyed {
        key: PrecedenceKey,
        entry: RouteEntry,
    }
    let mut keyed = Vec::new();
    let mut rules = Vec::new();
    for c in candidates {
        for (rule, (matches, compiled)) in c.matches.into_iter().zip(c.rules).enumerate() {
            let index = rules.len();
            rules.push(compiled);
            for (m_index, m) in matches.into_iter().enumerate() {
                let (rank, len) = match &m.path {
                    PathMatch::Exact(p) => (0, p.len()),
                    PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => (1, p.len()),
                    PathMatch::Regex(re) => (2, re.as_str().len()),
                };
                let key = (
                    rank,
                    Reverse(len),
                    m.method.is_none(),
                    Reverse(m.headers.len()),
                    Reverse(m.query.len()),
                    // Routes without a creation time sort after those with one, then by name.
                    c.created.clone().unwrap_or_else(|| "~".to_string()),
                    c.route.clone(),
                    rule,
                    m_index,
                );
                keyed.push(Keyed {
                    key,
                    entry: RouteEntry {
                        match_: m,
                        rule: index,
                    },
                });
            }
        }
    }
    keyed.sort_by(|a, b| a.key.cmp(&b.key));
    RouteTable {
        entries: keyed.into_iter().map(|k| k.entry).collect(),
        rules,
    }
}

// ------------------------------------------------------------------ VirtualService

/// A DestinationRule subset's labels.
pub type SubsetLabels = Vec<(String, String)>;

/// What `from_virtual_service` asks of the snapshot being compiled.
pub struct VsResolve<'a> {
    /// A destination host (short, `name.namespace`, FQDN or ServiceEntry host) → its service.
    pub service: &'a dyn Fn(&str) -> Option<u32>,
    /// (service, subset name) → the subset's labels, from the service's DestinationRule.
    pub subset: &'a dyn Fn(u32, &str) -> Option<SubsetLabels>,
}

fn vs_value(m: &resources::StringMatch, at: &str) -> Result<ValueMatch, FieldError> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), None, None) => Ok(ValueMatch::Exact(v.clone())),
        (None, Some(p), None) => Ok(ValueMatch::Prefix(p.clone())),
        (None, None, Some(r)) => Ok(ValueMatch::Regex(regex(r, at)?)),
        _ => Err((
            at.to_string(),
            "give exactly one of exact, prefix, regex".into(),
        )),
    }
}

/// A VirtualService `headers` block's `request` or `response` part as a header modifier.
fn vs_headers(value: &serde_json::Value, at: &str) -> Result<HeaderModifier, FieldError> {
    let pairs = |key: &str| -> Result<Vec<resources::HeaderValue>, FieldError> {
        match value.get(key) {
            None => Ok(vec![]),
            Some(serde_json::Value::Object(m)) => m
                .iter()
                .map(|(name, v)| match v.as_str() {
                    Some(v) => Ok(resources::HeaderValue {
                        name: name.clone(),
                        value: v.to_string(),
                    }),
                    None => Err((
                        format!("{at}.{key}.{name}"),
                        "header values are strings".into(),
                    )),
                })
                .collect(),
            Some(_) => Err((
                format!("{at}.{key}"),
                "a map of header names to values".into(),
            )),
        }
    };
    let remove = match value.get("remove") {
        None => vec![],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| (format!("{at}.remove"), "a list of header names".to_string()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err((format!("{at}.remove"), "a list of header names".into())),
    };
    Ok(HeaderModifier {
        set: pairs("set")?,
        add: pairs("add")?,
        remove,
    })
}

/// A VirtualService's `http` routes for one service, as a table in the order written (a
/// VirtualService's first matching rule wins; no precedence sort). Matches on uri, method,
/// headers and query parameters; weighted destinations with subsets; `timeout`, `retries` and
/// `fault`; `rewrite` (uri, authority) and `headers`. Parts this waypoint cannot honour yet are errors, so a route
/// is never applied looser than written.
pub fn from_virtual_service(
    vs: &str,
    http: &[resources::HttpRouteRule],
    resolve: &VsResolve<'_>,
) -> Result<RouteTable, FieldError> {
    let mut entries = Vec::new();
    let mut rules = Vec::new();
    for (i, rule) in http.iter().enumerate() {
        let at = format!("spec.http[{i}]");
        for (field, present) in [
            ("redirect", rule.redirect.is_some()),
            ("mirror", rule.mirror.is_some()),
        ] {
            if present {
                return Err((
                    format!("{at}.{field}"),
                    format!("{field} is not applied by the waypoint yet"),
                ));
            }
        }
        let mut matches = Vec::new();
        let mut prefix_rewrite = false;
        let mut for_mesh = rule.match_.is_empty();
        for (j, m) in rule.match_.iter().enumerate() {
            let mat = format!("{at}.match[{j}]");
            // A match for named gateways only is not one for mesh traffic.
            if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
                continue;
            }
            for_mesh = true;
            if m.authority.is_some()
                || !m.source_labels.is_empty()
                || m.ignore_uri_case == Some(true)
            {
                return Err((
                    mat,
                    "authority, sourceLabels and ignoreUriCase matches are not applied by the waypoint yet".into(),
                ));
            }
            let match_port = match m.port {
                None => None,
                Some(p) => Some(port(p, &format!("{mat}.port"))?),
            };
            let path = match &m.uri {
                None => PathMatch::Prefix(String::new()),
                Some(u) => match (&u.exact, &u.prefix, &u.regex) {
                    (Some(v), None, None) => PathMatch::Exact(v.clone()),
                    (None, Some(p), None) => {
                        prefix_rewrite = true;
                        PathMatch::StringPrefix(p.clone())
                    }
                    (None, None, Some(r)) => PathMatch::Regex(regex(r, &format!("{mat}.uri"))?),
                    _ => {
                        return Err((
                            format!("{mat}.uri"),
                            "give exactly one of exact, prefix, regex".into(),
                        ))
                    }
                },
            };
            let method = match &m.method {
                None => None,
                Some(sm) => match (&sm.exact, &sm.prefix, &sm.regex) {
                    (Some(v), None, None) => Some(v.clone()),
                    _ => {
                        return Err((
                            format!("{mat}.method"),
                            "only exact method matches are applied".into(),
                        ))
                    }
                },
            };
            let mut headers = Vec::new();
            for (name, sm) in &m.headers {
                headers.push((
                    name.to_ascii_lowercase(),
                    vs_value(sm, &format!("{mat}.headers[{name}]"))?,
                ));
            }
            let mut query = Vec::new();
            for (name, sm) in &m.query_params {
                query.push((
                    name.clone(),
                    vs_value(sm, &format!("{mat}.queryParams[{name}]"))?,
                ));
            }
            matches.push(RouteMatch {
                path,
                headers,
                query,
                method,
                port: match_port,
            });
        }
        if !for_mesh {
            continue;
        }
        if matches.is_empty() {
            matches.push(RouteMatch {
                path: PathMatch::Prefix(String::new()),
                headers: vec![],
                query: vec![],
                method: None,
                port: None,
            });
        }
        let single = rule.route.len() == 1;
        let mut backends = Vec::new();
        for (j, r) in rule.route.iter().enumerate() {
            let service = (resolve.service)(&r.destination.host);
            let subset = match (&r.destination.subset, service) {
                (None, _) => None,
                (Some(name), Some(id)) => Some((resolve.subset)(id, name).ok_or_else(|| {
                    (
                        format!("{at}.route[{j}].destination.subset"),
                        format!(
                            "no subset {name:?} in a DestinationRule for {}",
                            r.destination.host
                        ),
                    )
                })?),
                (Some(_), None) => None,
            };
            backends.push(Backend {
                name: r.destination.host.clone(),
                kind: "Service".into(),
                port: r.destination.port.as_ref().map(|p| p.number as u16),
                weight: r
                    .weight
                    .map_or(u32::from(single), |w| w.clamp(0, 100) as u32),
                service,
                subset,
                subset_name: r.destination.subset.clone().filter(|_| service.is_some()),
            });
        }
        let mut filters = Vec::new();
        if let Some(h) = &rule.headers {
            if let Some(req) = h.get("request") {
                filters.push(Filter::RequestHeaders(vs_headers(
                    req,
                    &format!("{at}.headers.request"),
                )?));
            }
            if let Some(resp) = h.get("response") {
                filters.push(Filter::ResponseHeaders(vs_headers(
                    resp,
                    &format!("{at}.headers.response"),
                )?));
            }
        }
        if let Some(rw) = &rule.rewrite {
            let path = rw.uri.as_ref().map(|uri| PathModifier {
                type_: if prefix_rewrite {
                    "ReplacePrefixMatch".into()
                } else {
                    "ReplaceFullPath".into()
                },
                replace_full_path: (!prefix_rewrite).then(|| uri.clone()),
                replace_prefix_match: prefix_rewrite.then(|| uri.clone()),
            });
            filters.push(Filter::Rewrite {
                hostname: rw.authority.clone(),
                path,
            });
        }
        let request_timeout = match &rule.timeout {
            Some(t) => Some(duration::parse(t).map_err(|e| (format!("{at}.timeout"), e))?),
            None => None,
        };
        let index = rules.len();
        rules.push(RouteRule {
            route: vs.to_string(),
            rule: i,
            filters,
            backends,
            request_timeout: request_timeout.filter(|d| !d.is_zero()),
            backend_request_timeout: None,
            retries: rule.retries.as_ref().map(RetryPolicy::from_virtual_service),
            fault: rule.fault.as_ref().and_then(Fault::from_virtual_service),
        });
        for m in matches {
            entries.push(RouteEntry {
                match_: m,
                rule: index,
            });
        }
    }
    Ok(RouteTable { entries, rules })
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> resources::HttpRouteSpec {
        serde_saphyr::from_str(yaml).expect("test YAML")
    }

    fn candidate(name: &str, created: Option<&str>, yaml: &str) -> Candidate {
        compile(
            name,
            "app",
            created.map(String::from),
            &spec(yaml),
            &|_, n, _| (n == "exists").then_some(7),
        )
        .expect("compiles")
    }

    fn route(
        t: &RouteTable,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        query: &[(&str, &str)],
    ) -> Option<String> {
        let header = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        let q = |name: &str| query.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        let view = RequestView {
            method,
            path,
            port: 80,
            header: &header,
            query: &q,
        };
        t.select(&view).map(|r| format!("{}#{}", r.route, r.rule))
    }

    #[test]
    fn prefix_compares_whole_segments() {
        let p = PathMatch::Prefix("/abc".into());
        assert!(p.matches("/abc"));
        assert!(p.matches("/abc/d"));
        assert!(!p.matches("/abcd"));
        assert!(PathMatch::Prefix(String::new()).matches("/anything"));
        let exact = PathMatch::Exact("/abc".into());
        assert!(!exact.matches("/abc/"));
        let re = PathMatch::Regex(Regex::new("/v[0-9]+/.*").unwrap());
        assert!(re.matches("/v2/items"));
        assert!(!re.matches("/api/v2/items"), "regex matches the whole path");
    }

    #[test]
    fn precedence_table() {
        let t = table(vec![
            candidate("b-prefix", None, "rules: [{matches: [{path: {type: PathPrefix, value: /api}}]}]"),
            candidate("a-long-prefix", None, "rules: [{matches: [{path: {type: PathPrefix, value: /api/v1/}}]}]"),
            candidate("exact", None, "rules: [{matches: [{path: {type: Exact, value: /api/v1/health}}]}]"),
            candidate("method", None, "rules: [{matches: [{path: {value: /api}, method: POST}]}]"),
            candidate("header", None, "rules: [{matches: [{path: {value: /api}, headers: [{name: X-Canary, value: \"1\"}]}]}]"),
            candidate("query", None, "rules: [{matches: [{path: {value: /api}, queryParams: [{name: debug, value: \"1\"}]}]}]"),
            candidate("catch-all", None, "rules: [{}]"),
            candidate("regex", None, "rules: [{matches: [{path: {type: RegularExpression, value: \"/img/.*[.]png\"}}]}]"),
        ]);
        let table: &[(&str, &str, &[(&str, &str)], &[(&str, &str)], &str)] = &[
            ("GET", "/api/v1/health", &[], &[], "app/exact#0"),
            ("GET", "/api/v1/items", &[], &[], "app/a-long-prefix#0"),
            ("POST", "/api/x", &[("x-canary", "1")], &[], "app/method#0"),
            (
                "GET",
                "/api/x",
                &[("x-canary", "1")],
                &[("debug", "1")],
                "app/header#0",
            ),
            ("GET", "/api/x", &[], &[("debug", "1")], "app/query#0"),
            ("GET", "/api/x", &[], &[], "app/b-prefix#0"),
            ("GET", "/apix", &[], &[], "app/catch-all#0"),
            ("GET", "/img/a.png", &[], &[], "app/catch-all#0"),
        ];
        for (method, path, headers, query, want) in table {
            assert_eq!(
                route(&t, method, path, headers, query).as_deref(),
                Some(*want),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn ties_go_to_the_oldest_route_then_name_then_rule_order() {
        let t = table(vec![
            candidate(
                "zeta",
                Some("2024-01-01T00:00:00Z"),
                "rules: [{matches: [{path: {value: /x}}]}]",
            ),
            candidate(
                "alpha",
                Some("2025-01-01T00:00:00Z"),
                "rules: [{matches: [{path: {value: /x}}]}]",
            ),
        ]);
        assert_eq!(
            route(&t, "GET", "/x", &[], &[]).as_deref(),
            Some("app/zeta#0")
        );
        let t = table(vec![
            candidate("zeta", None, "rules: [{matches: [{path: {value: /x}}]}]"),
            candidate(
                "alpha",
                None,
                "rules: [{matches: [{path: {value: /y}}]}, {matches: [{path: {value: /x}}]}]",
            ),
        ]);
        assert_eq!(
            route(&t, "GET", "/x", &[], &[]).as_deref(),
            Some("app/alpha#1")
        );
        // A route is attached: a request that matches no rule has no route (404).
        assert_eq!(route(&t, "GET", "/z", &[], &[]), None);
    }

    #[test]
    fn backends_and_weights() {
        let c = candidate("split", None, "rules: [{backendRefs: [{name: exists, port: 9080, weight: 90}, {name: missing, port: 9080, weight: 10}, {name: exists, port: 80}]}]");
        let b = &c.rules[0].backends;
        assert_eq!((b[0].service, b[0].weight), (Some(7), 90));
        assert_eq!((b[1].service, b[1].weight), (None, 10));
        assert_eq!(b[2].weight, 1, "weight defaults to 1");
    }

    #[test]
    fn errors_name_the_field() {
        let bad = |yaml: &str| {
            compile("r", "app", None, &spec(yaml), &|_, _, _| None)
                .err()
                .expect("must fail")
        };
        let table = [
            (
                "rules: [{backendRefs: [{name: a, port: 80, weight: -1}]}]",
                "spec.rules[0].backendRefs[0].weight",
                "out of range",
            ),
            (
                "rules: [{backendRefs: [{name: a, port: 70000}]}]",
                "spec.rules[0].backendRefs[0].port",
                "out of range",
            ),
            (
                "rules: [{backendRefs: [{name: a}]}]",
                "spec.rules[0].backendRefs[0].port",
                "needs a port",
            ),
            (
                "rules: [{matches: [{path: {type: Prefix, value: /}}]}]",
                "spec.rules[0].matches[0].path.type",
                "PathPrefix",
            ),
            (
                "rules: [{matches: [{path: {value: api}}]}]",
                "spec.rules[0].matches[0].path.value",
                "start with /",
            ),
            (
                "rules: [{matches: [{path: {type: RegularExpression, value: \"(\"}}]}]",
                "spec.rules[0].matches[0].path.value",
                "regular expression",
            ),
            (
                "rules: [{matches: [{method: FETCH}]}]",
                "spec.rules[0].matches[0].method",
                "GET",
            ),
            (
                "rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]}]",
                "spec.rules[0].filters[0].requestRedirect.statusCode",
                "301",
            ),
            (
                "rules: [{filters: [{type: RequestHeaderModifier}]}]",
                "spec.rules[0].filters[0].requestHeaderModifier",
                "needs",
            ),
            (
                "rules: [{filters: [{type: Magic}]}]",
                "spec.rules[0].filters[0].type",
                "URLRewrite",
            ),
            (
                "rules: [{timeouts: {request: 1s, backendRequest: 2s}}]",
                "spec.rules[0].timeouts.backendRequest",
                "at most",
            ),
            (
                "rules: [{timeouts: {request: soon}}]",
                "spec.rules[0].timeouts.request",
                "duration",
            ),
        ];
        for (yaml, field, contains) in table {
            let (got_field, message) = bad(yaml);
            assert_eq!(got_field, field, "{yaml}");
            assert!(message.contains(contains), "{yaml}: {message}");
        }
    }

    fn vs_rules(yaml: &str) -> Vec<resources::HttpRouteRule> {
        serde_saphyr::from_str(yaml).expect("test YAML")
    }

    #[test]
    fn virtual_service_tables_keep_the_written_order_and_refuse_what_they_cannot_honour() {
        let service = |h: &str| (h == "svc").then_some(3);
        let subset = |_: u32, name: &str| {
            (name == "v2").then(|| vec![("version".to_string(), "v2".to_string())])
        };
        let resolve = VsResolve {
            service: &service,
            subset: &subset,
        };
        let t = from_virtual_service(
            "ns/vs",
            &vs_rules(
                "- match: [{uri: {prefix: /a}}]\n  route: [{destination: {host: svc, subset: v2}}]\n- route: [{destination: {host: svc}}]\n",
            ),
            &resolve,
        )
        .expect("compiles");
        let pick = |path: &str| {
            let view = RequestView {
                method: "GET",
                path,
                port: 80,
                header: &|_| None,
                query: &|_| None,
            };
            t.select(&view)
                .map(|r| (r.rule, r.backends[0].subset.clone()))
        };
        // A VirtualService prefix is a plain string prefix; the first rule written wins.
        assert_eq!(pick("/abc").map(|p| p.0), Some(0));
        assert_eq!(
            pick("/abc").and_then(|p| p.1),
            Some(vec![("version".into(), "v2".into())])
        );
        assert_eq!(pick("/b").map(|p| p.0), Some(1));
        // A match for a named gateway only does not apply to mesh traffic: the rule is skipped.
        let t = from_virtual_service(
            "ns/vs",
            &vs_rules(
                "- match: [{gateways: [egress-gw]}]\n  route: [{destination: {host: svc}}]\n",
            ),
            &resolve,
        )
        .expect("compiles");
        assert!(t.entries.is_empty());
        // Retries and faults are carried to the rule.
        let t = from_virtual_service(
            "ns/vs",
            &vs_rules("- retries: {attempts: 4, retryOn: 5xx}\n  fault: {abort: {httpStatus: 418, percentage: {value: 50}}}\n  route: [{destination: {host: svc}}]\n"),
            &resolve,
        )
        .expect("compiles");
        let rule = &t.rules[0];
        assert_eq!(rule.retries.as_ref().map(|r| r.attempts), Some(4));
        assert_eq!(
            rule.fault
                .as_ref()
                .and_then(|f| f.abort.as_ref())
                .map(|a| (a.status, a.percent)),
            Some((418, 50.0))
        );
        // What the waypoint cannot honour yet is an error, never a looser route.
        for yaml in [
            "- match: [{authority: {exact: x}}]\n  route: [{destination: {host: svc}}]\n",
            "- redirect: {uri: /x}\n",
            "- route: [{destination: {host: svc, subset: v9}}]\n",
        ] {
            assert!(
                from_virtual_service("ns/vs", &vs_rules(yaml), &resolve).is_err(),
                "{yaml}"
            );
        }
    }
}
