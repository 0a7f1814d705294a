//! `/config_dump` and the tables `shoalctl` prints from it. The dump names things (`ns/name`)
//! rather than snapshot indices, so it reads on its own; the tables are built from the dump, so
//! they look the same whether it came from a running proxy or from compiling a directory.

use std::io::Write;

use serde::Serialize;
use serde_json::{json, Value};
use tabwriter::TabWriter;

use crate::snapshot::{Snapshot, TargetPort};

/// A certificate a proxy holds, as the dump shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateInfo {
    pub identity: String,
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
    /// `Available`, `Expired`, `Pending`.
    pub state: String,
}

/// The JSON served at `/config_dump`.
pub fn config_dump(snapshot: &Snapshot, version: u64, certificates: &[CertificateInfo]) -> Value {
    let workload_name = |id: u32| {
        let w = snapshot.workload(id);
        format!("{}/{}", w.namespace, w.name)
    };
    let waypoint_name = |id: Option<u32>| {
        id.map(|id| {
            let w = snapshot.waypoint(id);
            format!("{}/{}", w.namespace, w.name)
        })
    };
    let service_name = |id: u32| snapshot.service(id).hostname.clone();
    let workloads: Vec<Value> = snapshot
        .workloads
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "namespace": w.namespace,
                "kind": w.kind,
                "ips": w.ips,
                "node": w.node,
                "service_account": w.service_account,
                "identity": w.identity,
                "ambient": w.ambient,
                "ready": w.ready,
                "waypoint": waypoint_name(w.waypoint),
                "is_waypoint": waypoint_name(w.is_waypoint),
                "services": w.services.iter().map(|id| service_name(*id)).collect::<Vec<_>>(),
                "policies": w.policies.iter().map(|id| snapshot.policies[*id as usize].name.clone()).collect::<Vec<_>>(),
                "peer_authentication": w.peer_authentication,
                "named_ports": w.named_ports,
            })
        })
        .collect();
    let services: Vec<Value> = snapshot
        .services
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "namespace": s.namespace,
                "hostname": s.hostname,
                "kind": s.kind,
                "vips": s.vips,
                "ports": s.ports.iter().map(|p| json!({
                    "name": p.name,
                    "port": p.port,
                    "target_port": match &p.target { TargetPort::Number(n) => json!(n), TargetPort::Named(n) => json!(n) },
                    "protocol": p.protocol,
                })).collect::<Vec<_>>(),
                "endpoints": s.endpoints.iter().map(|id| {
                    let w = snapshot.workload(*id);
                    json!({"workload": workload_name(*id), "ips": w.ips, "ready": w.ready})
                }).collect::<Vec<_>>(),
                "waypoint": waypoint_name(s.waypoint),
            })
        })
        .collect();
    let waypoints: Vec<Value> = snapshot
        .waypoints
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "namespace": w.namespace,
                "for": w.for_,
                "addresses": w.addresses,
                "identity": w.identity,
                "ready": w.ready,
                "services": w.l7.services.iter().map(|id| service_name(*id)).collect::<Vec<_>>(),
                "workloads": w.l7.workloads.iter().map(|id| workload_name(*id)).collect::<Vec<_>>(),
                "policies": w.l7.policies,
            })
        })
        .collect();
    let by_service = |id: &u32| service_name(*id);
    json!({
        "version": version,
        "trust_domain": snapshot.trust_domain,
        "workloads": workloads,
        "services": services,
        "waypoints": waypoints,
        "policies": snapshot.policies,
        "routes": snapshot.routes.iter().map(|(id, t)| (by_service(id), serde_json::to_value(t).unwrap_or(Value::Null))).collect::<serde_json::Map<_, _>>(),
        "service_policies": snapshot.service_policies.iter().map(|(id, p)| (by_service(id), serde_json::to_value(p).unwrap_or(Value::Null))).collect::<serde_json::Map<_, _>>(),
        "traffic": snapshot.traffic.iter().map(|(id, t)| (by_service(id), serde_json::to_value(t).unwrap_or(Value::Null))).collect::<serde_json::Map<_, _>>(),
        "problems": snapshot.problems,
        "stats": snapshot.stats,
        "certificates": certificates,
    })
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "None".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "None".to_string(),
        Value::Array(items) => items.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut tw = TabWriter::new(Vec::new()).padding(1);
    let _ = writeln!(tw, "{}", header.join("\t"));
    for row in rows {
        let _ = writeln!(tw, "{}", row.join("\t"));
    }
    let _ = tw.flush();
    String::from_utf8(tw.into_inner().unwrap_or_default()).unwrap_or_default()
}

fn list<'a>(dump: &'a Value, key: &str) -> &'a [Value] {
    dump.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// As `istioctl ztunnel-config workload`.
pub fn workload_table(dump: &Value) -> String {
    let rows = list(dump, "workloads")
        .iter()
        .map(|w| {
            vec![
                s(&w["namespace"]),
                s(&w["name"]),
                s(&w["ips"]),
                s(&w["node"]),
                s(&w["waypoint"]),
                if w["ambient"] == json!(true) {
                    "HBONE".to_string()
                } else {
                    "TCP".to_string()
                },
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "POD NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL",
        ],
        rows,
    )
}

/// As `istioctl ztunnel-config service`.
pub fn service_table(dump: &Value) -> String {
    let rows = list(dump, "services")
        .iter()
        .map(|svc| {
            let endpoints = svc["endpoints"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let ready = endpoints
                .iter()
                .filter(|e| e["ready"] == json!(true))
                .count();
            vec![
                s(&svc["namespace"]),
                s(&svc["hostname"]),
                s(&svc["vips"]),
                s(&svc["waypoint"]),
                format!("{ready}/{}", endpoints.len()),
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "SERVICE NAME",
            "SERVICE VIP",
            "WAYPOINT",
            "ENDPOINTS",
        ],
        rows,
    )
}

fn policy_row(p: &Value, enforced_by: String) -> Vec<String> {
    let name = s(&p["name"]);
    let (ns, short) = name
        .split_once('/')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or_default();
    let action = if p["dry_run"] == json!(true) {
        format!("{} (dry-run)", s(&p["action"]))
    } else {
        s(&p["action"])
    };
    vec![ns, short, action, s(&p["scope"]), enforced_by]
}

/// As `istioctl ztunnel-config policy` (plus the waypoint-attached ones).
pub fn policy_table(dump: &Value) -> String {
    let mut rows: Vec<Vec<String>> = list(dump, "policies")
        .iter()
        .map(|p| policy_row(p, "ztunnel".to_string()))
        .collect();
    for w in list(dump, "waypoints") {
        let by = format!("waypoint {}/{}", s(&w["namespace"]), s(&w["name"]));
        for p in w["policies"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            rows.push(policy_row(p, by.clone()));
        }
    }
    if let Some(map) = dump.get("service_policies").and_then(Value::as_object) {
        for (service, policies) in map {
            for p in policies.as_array().map(Vec::as_slice).unwrap_or(&[]) {
                rows.push(policy_row(p, format!("waypoint of {service}")));
            }
        }
    }
    rows.sort();
    rows.dedup();
    table(
        &["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE", "ENFORCED BY"],
        rows,
    )
}

/// As `istioctl ztunnel-config certificate`.
pub fn certificate_table(dump: &Value) -> String {
    let rows = list(dump, "certificates")
        .iter()
        .map(|c| {
            vec![
                s(&c["identity"]),
                "Leaf".to_string(),
                s(&c["state"]),
                s(&c["serial"]),
                s(&c["not_after"]),
                s(&c["not_before"]),
            ]
        })
        .collect();
    table(
        &[
            "CERTIFICATE NAME",
            "TYPE",
            "STATUS",
            "SERIAL NUMBER",
            "NOT AFTER",
            "NOT BEFORE",
        ],
        rows,
    )
}

/// The problems, one per line, errors first.
pub fn problems_text(dump: &Value) -> String {
    let mut out = String::new();
    for severity in ["error", "warning"] {
        for p in list(dump, "problems")
            .iter()
            .filter(|p| p["severity"] == json!(severity))
        {
            if let Ok(problem) = serde_json::from_value::<ProblemView>(p.clone()) {
                out.push_str(&problem.to_string());
                out.push('\n');
            }
        }
    }
    out
}

#[derive(serde::Deserialize)]
struct ProblemView {
    severity: String,
    origin: Option<OriginView>,
    object: Option<String>,
    field: Option<String>,
    message: String,
    hint: Option<String>,
}

#[derive(serde::Deserialize)]
struct OriginView {
    file: String,
    document: usize,
    line: usize,
}

impl std::fmt::Display for ProblemView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.severity)?;
        if let Some(o) = &self.origin {
            write!(f, "{}:{} (document {}): ", o.file, o.line, o.document)?;
        }
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}
