//! AuthorizationPolicy, compiled once and evaluated per connection (ztunnel) or per request
//! (waypoint) without allocating.
//!
//! Istio's semantics (SEMANTICS.md): CUSTOM, then any matching DENY denies, then no ALLOW policy →
//! allow, some ALLOW matches → allow, else deny; AUDIT never changes the decision; dry-run policies
//! are evaluated and reported, not enforced. Rules are OR-ed; `from`, `to`, `when` AND-ed; entries of
//! one list OR-ed; fields of one entry AND-ed; values of one field OR-ed; every `notX` negates.
//!
//! ztunnel enforces only L4 fields. `for_l4` rewrites a policy the way Istio does and says why:
//! an ALLOW rule with an L7 field is dropped whole (fail closed); a DENY rule loses its L7 parts and,
//! if nothing L4 is left, matches nothing.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::resources;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// A string pattern as Istio writes them: exact, `prefix*`, `*suffix`, or `*` (any value present).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
}

impl StrMatch {
    pub fn parse(pattern: &str) -> Self {
        if pattern == "*" {
            StrMatch::Present
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StrMatch::Prefix(prefix.to_string())
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StrMatch::Suffix(suffix.to_string())
        } else {
            StrMatch::Exact(pattern.to_string())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(s) => value == s,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Suffix(s) => value.ends_with(s.as_str()),
            StrMatch::Present => true,
        }
    }

    /// Hosts compare case-insensitively.
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        fn ends_with_ci(value: &str, suffix: &str) -> bool {
            value.len() >= suffix.len()
                && value[value.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        fn starts_with_ci(value: &str, prefix: &str) -> bool {
            value.len() >= prefix.len()
                && value.is_char_boundary(prefix.len())
                && value[..prefix.len()].eq_ignore_ascii_case(prefix)
        }
        match self {
            StrMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StrMatch::Prefix(p) => starts_with_ci(value, p),
            StrMatch::Suffix(s) => {
                value.is_char_boundary(value.len().saturating_sub(s.len()))
                    && ends_with_ci(value, s)
            }
            StrMatch::Present => true,
        }
    }
}

/// One field and its `notX` twin: matches when some value matches `is` (or `is` is empty) and no
/// value matches `not`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Field<T> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub is: Vec<T>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self {
            is: Vec::new(),
            not: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.is.is_empty() && self.not.is_empty()
    }

    /// `value` is `None` when the request does not carry it (no peer identity, say): a positive
    /// condition then fails and a negative one holds.
    fn check<V: ?Sized>(&self, value: Option<&V>, matches: impl Fn(&T, &V) -> bool) -> bool {
        if self.is_empty() {
            return true;
        }
        match value {
            Some(v) => {
                (self.is.is_empty() || self.is.iter().any(|p| matches(p, v)))
                    && !self.not.iter().any(|p| matches(p, v))
            }
            None => self.is.is_empty(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SourceMatch {
    /// `td/ns/N/sa/S`.
    pub principals: Field<StrMatch>,
    pub namespaces: Field<StrMatch>,
    /// `ns/sa`.
    pub service_accounts: Field<StrMatch>,
    pub ip_blocks: Field<IpNet>,
    // L7 (waypoint) fields:
    pub request_principals: Field<StrMatch>,
    pub remote_ip_blocks: Field<IpNet>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OperationMatch {
    pub ports: Field<u16>,
    // L7 (waypoint) fields:
    pub hosts: Field<StrMatch>,
    pub methods: Field<StrMatch>,
    pub paths: Field<StrMatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum ConditionKey {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    // L7 (waypoint) keys:
    RemoteIp,
    RequestHeader(String),
    ConnectionSni,
    RequestAuth(String),
}

impl ConditionKey {
    fn is_l7(&self) -> bool {
        matches!(
            self,
            ConditionKey::RemoteIp
                | ConditionKey::RequestHeader(_)
                | ConditionKey::ConnectionSni
                | ConditionKey::RequestAuth(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum ConditionValues {
    Strings(Field<StrMatch>),
    Ips(Field<IpNet>),
    Ports(Field<u16>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: ConditionValues,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rule {
    /// Empty = any source.
    pub from: Vec<SourceMatch>,
    /// Empty = any operation.
    pub to: Vec<OperationMatch>,
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// `namespace/name`.
    pub name: String,
    pub action: Action,
    pub dry_run: bool,
    /// Empty = matches nothing.
    pub rules: Vec<Rule>,
    /// Where it applies, for people: `mesh`, `namespace NS`, `selector k=v`, `targetRefs ...`.
    pub scope: String,
    /// How the policy differs from what was written, and why (the L4 rewrite's notes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Finds a request header by lower-case name.
pub type HeaderLookup<'a> = &'a dyn Fn(&str) -> Option<&'a str>;

/// What is known about a connection or request when it is authorized. L7 parts are `None` at L4.
#[derive(Clone, Copy, Default)]
pub struct Request<'a> {
    /// `td/ns/N/sa/S` of the mTLS peer; `None` for plaintext.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    pub remote_ip: Option<IpAddr>,
    pub host: Option<&'a str>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub header: Option<HeaderLookup<'a>>,
}

fn str_field(field: &Field<StrMatch>, value: Option<&str>) -> bool {
    field.check(value, |p: &StrMatch, v: &str| p.matches(v))
}

fn ip_field(field: &Field<IpNet>, value: Option<IpAddr>) -> bool {
    field.check(value.as_ref(), |net: &IpNet, ip: &IpAddr| net.contains(ip))
}

fn port_field(field: &Field<u16>, value: u16) -> bool {
    field.check(Some(&value), |p: &u16, v: &u16| p == v)
}

impl SourceMatch {
    fn matches(&self, r: &Request<'_>) -> bool {
        let sa = match (r.namespace, r.service_account) {
            (Some(ns), Some(sa)) => Some((ns, sa)),
            _ => None,
        };
        str_field(&self.principals, r.principal)
            && str_field(&self.namespaces, r.namespace)
            && self
                .service_accounts
                .check(sa.as_ref(), |p: &StrMatch, (ns, sa): &(&str, &str)| {
                    // `ns/sa` without building the string.
                    match p {
                        StrMatch::Exact(s) => s.split_once('/') == Some((ns, sa)),
                        StrMatch::Present => true,
                        _ => false,
                    }
                })
            && ip_field(&self.ip_blocks, r.source_ip)
            && str_field(&self.request_principals, None)
            && ip_field(&self.remote_ip_blocks, r.remote_ip)
    }

    fn has_l7(&self) -> bool {
        !self.request_principals.is_empty() || !self.remote_ip_blocks.is_empty()
    }

    fn strip_l7(&mut self) {
        self.request_principals = Field::default();
        self.remote_ip_blocks = Field::default();
    }

    fn is_empty(&self) -> bool {
        *self == SourceMatch::default()
    }
}

impl OperationMatch {
    fn matches(&self, r: &Request<'_>) -> bool {
        port_field(&self.ports, r.destination_port)
            && self
                .hosts
                .check(r.host, |p: &StrMatch, v: &str| p.matches_ignore_case(v))
            && str_field(&self.methods, r.method)
            && str_field(&self.paths, r.path)
    }

    fn has_l7(&self) -> bool {
        !self.hosts.is_empty() || !self.methods.is_empty() || !self.paths.is_empty()
    }

    fn strip_l7(&mut self) {
        self.hosts = Field::default();
        self.methods = Field::default();
        self.paths = Field::default();
    }

    fn is_empty(&self) -> bool {
        *self == OperationMatch::default()
    }
}

impl Condition {
    fn matches(&self, r: &Request<'_>) -> bool {
        match (&self.key, &self.values) {
            (ConditionKey::SourceIp, ConditionValues::Ips(f)) => ip_field(f, r.source_ip),
            (ConditionKey::DestinationIp, ConditionValues::Ips(f)) => ip_field(f, r.destination_ip),
            (ConditionKey::RemoteIp, ConditionValues::Ips(f)) => ip_field(f, r.remote_ip),
            (ConditionKey::DestinationPort, ConditionValues::Ports(f)) => {
                port_field(f, r.destination_port)
            }
            (ConditionKey::SourceNamespace, ConditionValues::Strings(f)) => {
                str_field(f, r.namespace)
            }
            (ConditionKey::SourcePrincipal, ConditionValues::Strings(f)) => {
                str_field(f, r.principal)
            }
            (ConditionKey::ConnectionSni, ConditionValues::Strings(f)) => str_field(f, r.sni),
            (ConditionKey::RequestHeader(name), ConditionValues::Strings(f)) => {
                str_field(f, r.header.and_then(|h| h(name)))
            }
            (ConditionKey::RequestAuth(_), ConditionValues::Strings(f)) => str_field(f, None),
            // compile never pairs a key with another value type.
            _ => false,
        }
    }
}

impl Rule {
    pub fn matches(&self, r: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r)))
            && self.when.iter().all(|c| c.matches(r))
    }

    fn has_l7(&self) -> bool {
        self.from.iter().any(SourceMatch::has_l7)
            || self.to.iter().any(OperationMatch::has_l7)
            || self.when.iter().any(|c| c.key.is_l7())
    }
}

impl Policy {
    pub fn matches(&self, r: &Request<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(r))
    }

    /// The policy as ztunnel can enforce it, with a note per rule that changed.
    pub fn for_l4(&self) -> (Policy, Vec<String>) {
        let mut notes = Vec::new();
        let mut rules = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.has_l7() {
                rules.push(rule.clone());
                continue;
            }
            match self.action {
                Action::Allow | Action::Audit => notes.push(format!(
                    "rules[{index}] uses L7 fields that ztunnel cannot see, so the whole rule is ignored at L4 \
                     (an ALLOW then allows less: fail closed); attach the policy to a waypoint with targetRefs to enforce it"
                )),
                Action::Deny => {
                    let mut l4 = rule.clone();
                    l4.from.iter_mut().for_each(SourceMatch::strip_l7);
                    l4.to.iter_mut().for_each(OperationMatch::strip_l7);
                    l4.when.retain(|c| !c.key.is_l7());
                    let from_left = l4.from.iter().any(|s| !s.is_empty());
                    let to_left = l4.to.iter().any(|o| !o.is_empty());
                    l4.from.retain(|s| !s.is_empty());
                    l4.to.retain(|o| !o.is_empty());
                    if !from_left && !to_left && l4.when.is_empty() {
                        notes.push(format!(
                            "rules[{index}] has only L7 conditions, which ztunnel cannot see, so it matches nothing at L4; \
                             attach the policy to a waypoint with targetRefs to enforce it"
                        ));
                    } else {
                        notes.push(format!(
                            "rules[{index}]: ztunnel ignores its L7 conditions and denies on the L4 ones alone \
                             (denies more than written); attach the policy to a waypoint with targetRefs to enforce it exactly"
                        ));
                        rules.push(l4);
                    }
                }
            }
        }
        (
            Policy {
                rules,
                ..self.clone()
            },
            notes,
        )
    }
}

/// The outcome of authorizing one connection or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'p> {
    pub allowed: bool,
    /// The policy that decided (the DENY that matched); `None` for "no ALLOW matched" or default allow.
    pub policy: Option<&'p str>,
    /// A dry-run policy that would have changed the outcome.
    pub dry_run: Option<&'p str>,
    /// An AUDIT policy matched.
    pub audit: Option<&'p str>,
}

/// Istio's order over the policies that apply to one destination.
pub fn evaluate<'p>(
    policies: impl Iterator<Item = &'p Policy> + Clone,
    r: &Request<'_>,
) -> Verdict<'p> {
    let mut verdict = Verdict {
        allowed: true,
        policy: None,
        dry_run: None,
        audit: None,
    };
    for p in policies.clone().filter(|p| p.action == Action::Deny) {
        if p.matches(r) {
            if p.dry_run {
                verdict.dry_run.get_or_insert(&p.name);
            } else {
                verdict.allowed = false;
                verdict.policy = Some(&p.name);
                return verdict;
            }
        }
    }
    for p in policies.clone().filter(|p| p.action == Action::Audit) {
        if p.matches(r) {
            verdict.audit.get_or_insert(&p.name);
        }
    }
    let mut any_allow = false;
    let mut dry_allow = None;
    for p in policies.filter(|p| p.action == Action::Allow) {
        if p.dry_run {
            dry_allow = Some((&p.name, p.matches(r)));
            continue;
        }
        any_allow = true;
        if p.matches(r) {
            verdict.policy = Some(&p.name);
            return verdict;
        }
    }
    if any_allow {
        verdict.allowed = false;
    } else if let Some((name, false)) = dry_allow {
        // A dry-run ALLOW that matched nothing would have denied.
        verdict.dry_run.get_or_insert(name);
    }
    verdict
}

// ------------------------------------------------------------------ compile

/// Compiles one resource's rules. Errors name the field path below `spec`.
pub fn compile(
    name: String,
    action: Action,
    dry_run: bool,
    policy_namespace: &str,
    rules: &[resources::Rule],
) -> Result<Policy, (String, String)> {
    let mut compiled = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let mut from = Vec::new();
        for (j, f) in rule.from.iter().enumerate() {
            let at = |field: &str| format!("spec.rules[{i}].from[{j}].source.{field}");
            let s = &f.source;
            from.push(SourceMatch {
                principals: strings(&s.principals, &s.not_principals),
                namespaces: strings(&s.namespaces, &s.not_namespaces),
                service_accounts: Field {
                    is: service_accounts(&s.service_accounts, policy_namespace),
                    not: service_accounts(&s.not_service_accounts, policy_namespace),
                },
                ip_blocks: Field {
                    is: nets(&s.ip_blocks, &at("ipBlocks"))?,
                    not: nets(&s.not_ip_blocks, &at("notIpBlocks"))?,
                },
                request_principals: strings(&s.request_principals, &s.not_request_principals),
                remote_ip_blocks: Field {
                    is: nets(&s.remote_ip_blocks, &at("remoteIpBlocks"))?,
                    not: nets(&s.not_remote_ip_blocks, &at("notRemoteIpBlocks"))?,
                },
            });
        }
        let mut to = Vec::new();
        for (j, t) in rule.to.iter().enumerate() {
            let at = |field: &str| format!("spec.rules[{i}].to[{j}].operation.{field}");
            let o = &t.operation;
            to.push(OperationMatch {
                ports: Field {
                    is: ports(&o.ports, &at("ports"))?,
                    not: ports(&o.not_ports, &at("notPorts"))?,
                },
                hosts: strings(&o.hosts, &o.not_hosts),
                methods: strings(&o.methods, &o.not_methods),
                paths: strings(&o.paths, &o.not_paths),
            });
        }
        let mut when = Vec::new();
        for (j, c) in rule.when.iter().enumerate() {
            when.push(condition(c, &format!("spec.rules[{i}].when[{j}]"))?);
        }
        compiled.push(Rule { from, to, when });
    }
    Ok(Policy {
        name,
        action,
        dry_run,
        rules: compiled,
        scope: String::new(),
        notes: Vec::new(),
    })
}

fn strings(is: &[String], not: &[String]) -> Field<StrMatch> {
    Field {
        is: is.iter().map(|s| StrMatch::parse(s)).collect(),
        not: not.iter().map(|s| StrMatch::parse(s)).collect(),
    }
}

fn service_accounts(values: &[String], policy_namespace: &str) -> Vec<StrMatch> {
    values
        .iter()
        .map(|v| {
            if v == "*" {
                StrMatch::Present
            } else if v.contains('/') {
                StrMatch::Exact(v.clone())
            } else {
                StrMatch::Exact(format!("{policy_namespace}/{v}"))
            }
        })
        .collect()
}

fn nets(values: &[String], at: &str) -> Result<Vec<IpNet>, (String, String)> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| parse_net(v).ok_or_else(|| (format!("{at}[{k}]"), format!("{v:?} is not an IP address or CIDR block; write e.g. 10.0.0.0/8 or 192.168.1.7"))))
        .collect()
}

pub fn parse_net(v: &str) -> Option<IpNet> {
    v.parse::<IpNet>()
        .ok()
        .or_else(|| v.parse::<IpAddr>().ok().map(IpNet::from))
}

fn ports(values: &[String], at: &str) -> Result<Vec<u16>, (String, String)> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| match v.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err((format!("{at}[{k}]"), format!("{v:?} is not a port; ports are numbers from 1 to 65535, written as strings (\"8080\")"))),
        })
        .collect()
}

fn condition(c: &resources::When, at: &str) -> Result<Condition, (String, String)> {
    let key = match c.key.as_str() {
        "source.ip" => ConditionKey::SourceIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "remote.ip" => ConditionKey::RemoteIp,
        "connection.sni" => ConditionKey::ConnectionSni,
        k if k.starts_with("request.headers[") && k.ends_with(']') => {
            ConditionKey::RequestHeader(k["request.headers[".len()..k.len() - 1].to_ascii_lowercase())
        }
        k if k.starts_with("request.auth.") => ConditionKey::RequestAuth(k.to_string()),
        other => {
            return Err((
                format!("{at}.key"),
                format!(
                    "unknown condition key {other:?}; use source.ip, source.namespace, source.principal, destination.ip, \
                     destination.port, remote.ip, connection.sni, request.headers[NAME] or request.auth.*"
                ),
            ))
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((
            at.to_string(),
            "a condition needs values or notValues".to_string(),
        ));
    }
    let values = match key {
        ConditionKey::SourceIp | ConditionKey::DestinationIp | ConditionKey::RemoteIp => {
            ConditionValues::Ips(Field {
                is: nets(&c.values, &format!("{at}.values"))?,
                not: nets(&c.not_values, &format!("{at}.notValues"))?,
            })
        }
        ConditionKey::DestinationPort => ConditionValues::Ports(Field {
            is: ports(&c.values, &format!("{at}.values"))?,
            not: ports(&c.not_values, &format!("{at}.notValues"))?,
        }),
        _ => ConditionValues::Strings(strings(&c.values, &c.not_values)),
    };
    Ok(Condition { key, values })
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn rule_yaml(yaml: &str) -> Vec<resources::Rule> {
        serde_saphyr::from_str(yaml).expect("test YAML")
    }

    fn policy(action: Action, yaml: &str) -> Policy {
        compile("ns/p".into(), action, false, "ns", &rule_yaml(yaml)).expect("compiles")
    }

    const CURL: &str = "cluster.local/ns/default/sa/curl";

    fn peer<'a>(principal: Option<&'a str>, port: u16) -> Request<'a> {
        let (namespace, service_account) = match principal {
            Some(p) => {
                let parts: Vec<&str> = p.split('/').collect();
                (Some(parts[2]), Some(parts[4]))
            }
            None => (None, None),
        };
        Request {
            principal,
            namespace,
            service_account,
            source_ip: Some("10.0.0.5".parse().unwrap()),
            destination_ip: Some("10.0.1.9".parse().unwrap()),
            destination_port: port,
            ..Request::default()
        }
    }

    #[test]
    fn string_patterns() {
        let table = [
            ("*", "", true),
            ("*", "x", true),
            ("a*", "abc", true),
            ("a*", "ba", false),
            ("*c", "abc", true),
            ("*c", "cab", false),
            ("abc", "abc", true),
            ("abc", "abcd", false),
        ];
        for (pattern, value, want) in table {
            assert_eq!(
                StrMatch::parse(pattern).matches(value),
                want,
                "{pattern} vs {value}"
            );
        }
        assert!(StrMatch::parse("*.Example.com").matches_ignore_case("api.example.COM"));
        assert!(StrMatch::parse("API.*").matches_ignore_case("api.example.com"));
    }

    #[test]
    fn rule_matching_table() {
        // (rules, request principal, port, matches)
        let table: &[(&str, Option<&'static str>, u16, bool)] = &[
            ("[{}]", None, 80, true),
            ("[]", Some(CURL), 80, false),
            ("[{from: [{source: {principals: [\"cluster.local/ns/default/sa/curl\"]}}]}]", Some(CURL), 80, true),
            ("[{from: [{source: {principals: [\"cluster.local/ns/default/sa/curl\"]}}]}]", None, 80, false),
            ("[{from: [{source: {notPrincipals: [\"cluster.local/ns/default/sa/curl\"]}}]}]", None, 80, true),
            ("[{from: [{source: {notPrincipals: [\"*\"]}}]}]", Some(CURL), 80, false),
            ("[{from: [{source: {principals: [\"*\"]}}]}]", None, 80, false),
            ("[{from: [{source: {namespaces: [\"default\"]}}]}]", Some(CURL), 80, true),
            ("[{from: [{source: {namespaces: [\"prod\"]}}, {source: {namespaces: [\"default\"]}}]}]", Some(CURL), 80, true),
            ("[{from: [{source: {namespaces: [\"default\"], principals: [\"x\"]}}]}]", Some(CURL), 80, false),
            ("[{from: [{source: {serviceAccounts: [\"default/curl\"]}}]}]", Some(CURL), 80, true),
            ("[{from: [{source: {serviceAccounts: [\"curl\"]}}]}]", Some(CURL), 80, false),
            ("[{from: [{source: {ipBlocks: [\"10.0.0.0/24\"]}}]}]", None, 80, true),
            ("[{from: [{source: {notIpBlocks: [\"10.0.0.5\"]}}]}]", None, 80, false),
            ("[{to: [{operation: {ports: [\"80\", \"443\"]}}]}]", None, 443, true),
            ("[{to: [{operation: {notPorts: [\"80\"]}}]}]", None, 80, false),
            ("[{from: [{source: {namespaces: [\"default\"]}}], to: [{operation: {ports: [\"80\"]}}]}]", Some(CURL), 81, false),
            ("[{to: [{operation: {ports: [\"80\"]}}]}, {from: [{source: {namespaces: [\"default\"]}}]}]", Some(CURL), 81, true),
            ("[{when: [{key: destination.port, values: [\"81\"]}]}]", None, 81, true),
            ("[{when: [{key: source.ip, notValues: [\"10.0.0.0/8\"]}]}]", None, 81, false),
            ("[{when: [{key: source.namespace, values: [\"default\"]}]}]", Some(CURL), 81, true),
            ("[{when: [{key: source.principal, values: [\"cluster.local/*\"]}]}]", Some(CURL), 81, true),
            ("[{when: [{key: destination.ip, values: [\"10.0.1.0/24\"]}]}]", None, 81, true),
        ];
        for (yaml, principal, port, want) in table {
            let p = policy(Action::Allow, yaml);
            assert_eq!(
                p.matches(&peer(*principal, *port)),
                *want,
                "{yaml} {principal:?} {port}"
            );
        }
    }

    #[test]
    fn l7_request_fields() {
        let p = policy(
            Action::Allow,
            "[{to: [{operation: {methods: [GET], paths: [\"/api/*\"], hosts: [\"*.example.com\"]}}], when: [{key: \"request.headers[X-Env]\", values: [prod]}]}]",
        );
        let headers = |name: &str| -> Option<&str> { (name == "x-env").then_some("prod") };
        let mut r = peer(Some(CURL), 80);
        r.method = Some("GET");
        r.path = Some("/api/v1");
        r.host = Some("Shop.Example.com");
        r.header = Some(&headers);
        assert!(p.matches(&r));
        r.method = Some("POST");
        assert!(!p.matches(&r));
        // At L4 nothing of the request is known: the L7 conditions cannot hold.
        assert!(!p.matches(&peer(Some(CURL), 80)));
    }

    #[test]
    fn decision_order() {
        let allow_curl = policy(
            Action::Allow,
            "[{from: [{source: {principals: [\"cluster.local/ns/default/sa/curl\"]}}]}]",
        );
        let deny_port_9 = policy(Action::Deny, "[{to: [{operation: {ports: [\"9\"]}}]}]");
        let allow_nothing = compile("ns/nothing".into(), Action::Allow, false, "ns", &[]).unwrap();
        let audit_all = policy(Action::Audit, "[{}]");
        let curl = peer(Some(CURL), 80);
        let anon = peer(None, 80);
        let cases: Vec<(Vec<&Policy>, Request<'_>, bool)> = vec![
            (vec![], anon, true),
            (vec![&deny_port_9], anon, true),
            (vec![&deny_port_9], peer(Some(CURL), 9), false),
            (vec![&allow_curl], curl, true),
            (vec![&allow_curl], anon, false),
            (vec![&allow_curl, &deny_port_9], peer(Some(CURL), 9), false),
            (vec![&allow_nothing], curl, false),
            (vec![&allow_nothing, &allow_curl], curl, true),
            (vec![&audit_all], anon, true),
        ];
        for (i, (policies, request, want)) in cases.into_iter().enumerate() {
            let verdict = evaluate(policies.iter().copied(), &request);
            assert_eq!(verdict.allowed, want, "case {i}");
        }
        let v = evaluate([&audit_all, &allow_curl].into_iter(), &curl);
        assert_eq!(v.audit, Some("ns/p"));
        assert_eq!(v.policy, Some("ns/p"));
    }

    #[test]
    fn dry_run_reports_but_does_not_enforce() {
        let mut deny = policy(Action::Deny, "[{}]");
        deny.dry_run = true;
        let v = evaluate([&deny].into_iter(), &peer(None, 80));
        assert!(v.allowed);
        assert_eq!(v.dry_run, Some("ns/p"));
        let mut allow = policy(Action::Allow, "[{from: [{source: {principals: [\"x\"]}}]}]");
        allow.dry_run = true;
        let v = evaluate([&allow].into_iter(), &peer(None, 80));
        assert!(v.allowed);
        assert_eq!(v.dry_run, Some("ns/p"));
    }

    #[test]
    fn l4_rewrite_of_l7_fields() {
        // ALLOW: a rule with an L7 field is dropped whole; the L4-only rule stays.
        let allow = policy(
            Action::Allow,
            "[{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [ops]}}]}]",
        );
        let (l4, notes) = allow.for_l4();
        assert_eq!(l4.rules.len(), 1);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("rules[0]"), "{notes:?}");
        // ALLOW with only L7 rules: nothing allowed at L4.
        let get_only = policy(Action::Allow, "[{to: [{operation: {methods: [GET]}}]}]");
        let (l4, _) = get_only.for_l4();
        assert!(!evaluate([&l4].into_iter(), &peer(Some(CURL), 80)).allowed);
        // DENY: the L7 parts go, the L4 rest is enforced.
        let deny = policy(
            Action::Deny,
            "[{from: [{source: {namespaces: [default]}}], to: [{operation: {methods: [POST]}}]}]",
        );
        let (l4, notes) = deny.for_l4();
        assert_eq!(notes.len(), 1);
        assert!(!evaluate([&l4].into_iter(), &peer(Some(CURL), 80)).allowed);
        // DENY with only L7 conditions matches nothing.
        let deny_l7 = policy(Action::Deny, "[{to: [{operation: {paths: [\"/admin\"]}}]}]");
        let (l4, notes) = deny_l7.for_l4();
        assert!(l4.rules.is_empty());
        assert!(notes[0].contains("matches nothing"));
        assert!(evaluate([&l4].into_iter(), &peer(Some(CURL), 80)).allowed);
    }

    #[test]
    fn compile_errors_name_the_field() {
        let bad = |yaml: &str| {
            compile("ns/p".into(), Action::Allow, false, "ns", &rule_yaml(yaml)).unwrap_err()
        };
        assert_eq!(
            bad("[{to: [{operation: {ports: [\"http\"]}}]}]").0,
            "spec.rules[0].to[0].operation.ports[0]"
        );
        assert_eq!(
            bad("[{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]").0,
            "spec.rules[0].from[0].source.ipBlocks[0]"
        );
        assert_eq!(
            bad("[{}, {when: [{key: source.ipp, values: [x]}]}]").0,
            "spec.rules[1].when[0].key"
        );
        assert!(
            bad("[{when: [{key: destination.port, values: [\"99999\"]}]}]")
                .1
                .contains("1 to 65535")
        );
    }
}
