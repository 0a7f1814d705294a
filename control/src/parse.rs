//! Manifest text → typed resources. A file is split into documents the way `kubectl` splits it (a
//! line starting with `---`), so a syntax error in one document leaves the others standing. Each
//! document is parsed under a budget (depth, nodes, size), dispatched on `apiVersion` and `kind`,
//! and deserialized with the field path kept for errors. Unknown fields are warnings.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::problem::{Origin, Problem, Problems};
use crate::resources::Resource;

/// Bigger files are refused whole: no manifest set people write comes near this, and a runaway
/// generator should not take the control thread's memory with it.
pub const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;
/// YAML nesting deeper than this is refused (Kubernetes objects nest about 10 deep).
pub const MAX_DEPTH: usize = 64;

/// A resource and where it was read.
#[derive(Debug, Clone)]
pub struct Object {
    pub origin: Origin,
    /// Boxed: the kinds differ a lot in size, and objects are moved around while compiling.
    pub resource: Box<Resource>,
}

impl Object {
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped kinds).
    pub fn describe(&self) -> String {
        describe(&self.resource)
    }
}

pub fn describe(resource: &Resource) -> String {
    let meta = resource.metadata();
    if meta.namespace.is_empty() {
        format!("{} {}", resource.kind(), meta.name)
    } else {
        format!("{} {}/{}", resource.kind(), meta.namespace, meta.name)
    }
}

/// What one or more files yielded.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub problems: Problems,
    /// Kinds shoal does not read: `apiVersion kind` → how many documents and the first one's origin.
    pub skipped: BTreeMap<String, (usize, Origin)>,
}

impl Parsed {
    /// Reports each skipped kind once (not once per document).
    pub fn report_skipped(&mut self) {
        for (kind, (count, origin)) in std::mem::take(&mut self.skipped) {
            let hint = if kind.starts_with("networking.istio.io/") && kind.ends_with(" Gateway") {
                "ambient mode does not use Istio's classic Gateway; egress goes through a waypoint: \
                 label the ServiceEntry with istio.io/use-waypoint"
            } else {
                "shoal reads Namespace, Service, Pod, WorkloadEntry, ServiceEntry, Gateway \
                 (gateway.networking.k8s.io), HTTPRoute, AuthorizationPolicy, PeerAuthentication, \
                 DestinationRule and VirtualService"
            };
            self.problems.push(
                Problem::warning(format!(
                    "kind {kind} is not read by shoal; {count} document(s) skipped"
                ))
                .at(&origin)
                .hint(hint),
            );
        }
    }
}

/// Parses one file's text into `into`. Returns false when some of it is not valid YAML (or the
/// file is too big), so a watcher can keep serving the file's last good version.
pub fn parse_file(file: &Arc<str>, text: &str, into: &mut Parsed) -> bool {
    if text.len() > MAX_FILE_BYTES {
        let origin = Origin::file_start(file);
        into.problems.push(
            Problem::error(format!(
                "file is {} bytes, over the limit of {MAX_FILE_BYTES} bytes; nothing in it was read",
                text.len()
            ))
            .at(&origin)
            .hint("split it into several files"),
        );
        return false;
    }
    let mut valid = true;
    for (index, (line, doc)) in split_documents(text).into_iter().enumerate() {
        let origin = Origin {
            file: file.clone(),
            document: index + 1,
            line,
        };
        valid &= parse_document(&origin, doc, into);
    }
    valid
}

/// Splits on lines that start with `---` (as kubectl's YAML reader does). Returns each non-empty
/// document with its first line number (1-based).
pub fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1usize;
    let mut offset = 0usize;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        let separator =
            trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---\t");
        if separator {
            push_document(&mut docs, start_line, &text[start..offset]);
            start = offset + line.len();
            start_line = number + 2;
        }
        offset += line.len();
    }
    push_document(&mut docs, start_line, &text[start..]);
    docs
}

fn push_document<'a>(docs: &mut Vec<(usize, &'a str)>, line: usize, doc: &'a str) {
    let has_content = doc.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#') && l != "..."
    });
    if has_content {
        docs.push((line, doc));
    }
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        // YAML 1.2: only true/false are booleans, so `values: [y, on]` stays strings.
        strict_booleans: true,
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
        },
    }
}

fn parse_document(origin: &Origin, doc: &str, into: &mut Parsed) -> bool {
    let value: Value = match serde_saphyr::from_str_with_options(doc, yaml_options()) {
        Ok(value) => value,
        Err(err) => {
            let mut origin = origin.clone();
            let location = err.location();
            let line = location.map(|l| l.line() as usize).unwrap_or(1);
            // The error's line is within the document; report it within the file.
            origin.line += line.saturating_sub(1);
            let message = err.without_snippet().to_string();
            let mut message = first_line(&message).to_string();
            // The parser's own "at line N" counts within the document: the origin says it right.
            if let Some(at) = message.find(" at line ") {
                message.truncate(at);
            }
            if let Some(column) = location.map(|l| l.column()) {
                message.push_str(&format!(" (column {column})"));
            }
            into.problems.push(
                Problem::error(format!("not valid YAML: {message}"))
                    .at(&origin)
                    .hint("fix the YAML syntax; the other documents were read"),
            );
            return false;
        }
    };
    dispatch(origin, value, into);
    true
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message)
}

fn dispatch(origin: &Origin, value: Value, into: &mut Parsed) {
    let Value::Object(map) = &value else {
        if value.is_null() {
            return;
        }
        into.problems.push(
            Problem::error(format!(
                "a document must be a mapping with apiVersion and kind, found {}",
                value_kind(&value)
            ))
            .at(origin),
        );
        return;
    };
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let meta_str = |key: &str| {
        map.get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
    };
    let name_hint = match (meta_str("name"), meta_str("namespace")) {
        (Some(name), _) if kind == "Namespace" => format!(" {name}"),
        (Some(name), Some(ns)) => format!(" {ns}/{name}"),
        (Some(name), None) => format!(" default/{name}"),
        (None, _) => String::new(),
    };
    if api_version.is_empty() || kind.is_empty() {
        let missing = if api_version.is_empty() {
            "apiVersion"
        } else {
            "kind"
        };
        into.problems.push(
            Problem::error(format!("document has no {missing}"))
                .at(origin)
                .field(missing)
                .hint("every Kubernetes object names its apiVersion and kind, e.g. `apiVersion: v1` and `kind: Service`"),
        );
        return;
    }
    if kind == "List" && api_version == "v1" {
        if let Some(Value::Array(items)) = map.get("items") {
            for item in items.clone() {
                dispatch(origin, item, into);
            }
        }
        return;
    }
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version.as_str()),
    };
    let object = format!("{kind}{name_hint}");
    let accepted: &[&str] = match (group, kind.as_str()) {
        ("", "Namespace" | "Service" | "Pod") => &["v1"],
        (
            "networking.istio.io",
            "WorkloadEntry" | "ServiceEntry" | "DestinationRule" | "VirtualService",
        ) => &["v1", "v1beta1", "v1alpha3"],
        ("gateway.networking.k8s.io", "Gateway" | "HTTPRoute") => &["v1", "v1beta1"],
        ("security.istio.io", "AuthorizationPolicy" | "PeerAuthentication") => &["v1", "v1beta1"],
        ("policy.linkerd.io", "HTTPLocalRateLimitPolicy") => &["v1alpha1"],
        _ => {
            let entry = into
                .skipped
                .entry(format!("{api_version} {kind}"))
                .or_insert((0, origin.clone()));
            entry.0 += 1;
            return;
        }
    };
    if !accepted.contains(&version) {
        into.problems.push(
            Problem::error(format!("{kind} is not served at version {version}"))
                .at(origin)
                .object(object)
                .field("apiVersion")
                .hint(format!(
                    "use {}",
                    accepted
                        .iter()
                        .map(|v| format!(
                            "{}{v}",
                            if group.is_empty() {
                                String::new()
                            } else {
                                format!("{group}/")
                            }
                        ))
                        .collect::<Vec<_>>()
                        .join(" or ")
                )),
        );
        return;
    }
    let parsed = match kind.as_str() {
        "Namespace" => typed(origin, &object, value, into).map(Resource::Namespace),
        "Service" => typed(origin, &object, value, into).map(Resource::Service),
        "Pod" => typed(origin, &object, value, into).map(Resource::Pod),
        "WorkloadEntry" => typed(origin, &object, value, into).map(Resource::WorkloadEntry),
        "ServiceEntry" => typed(origin, &object, value, into).map(Resource::ServiceEntry),
        "DestinationRule" => typed(origin, &object, value, into).map(Resource::DestinationRule),
        "VirtualService" => typed(origin, &object, value, into).map(Resource::VirtualService),
        "Gateway" => typed(origin, &object, value, into).map(Resource::Gateway),
        "HTTPRoute" => typed(origin, &object, value, into).map(Resource::HttpRoute),
        "AuthorizationPolicy" => {
            typed(origin, &object, value, into).map(Resource::AuthorizationPolicy)
        }
        "PeerAuthentication" => {
            typed(origin, &object, value, into).map(Resource::PeerAuthentication)
        }
        "HTTPLocalRateLimitPolicy" => typed(origin, &object, value, into).map(Resource::RateLimit),
        _ => None,
    };
    let Some(mut resource) = parsed else { return };
    let cluster_scoped = matches!(resource, Resource::Namespace(_));
    let meta = resource.metadata_mut();
    if meta.name.is_empty() {
        into.problems.push(
            Problem::error("object has no name")
                .at(origin)
                .object(kind)
                .field("metadata.name")
                .hint("give it a metadata.name"),
        );
        return;
    }
    if cluster_scoped {
        meta.namespace.clear();
    } else if meta.namespace.is_empty() {
        // As `kubectl apply` without `-n`.
        meta.namespace = "default".to_string();
    }
    into.objects.push(Object {
        origin: origin.clone(),
        resource: Box::new(resource),
    });
}

/// Deserializes with the failing field's path, and reports unknown fields as warnings.
fn typed<T: DeserializeOwned>(
    origin: &Origin,
    object: &str,
    value: Value,
    into: &mut Parsed,
) -> Option<T> {
    // Fields a Kubernetes object always may carry that our types do not model.
    const KNOWN_EXTRA: &[&str] = &["apiVersion", "kind", "status"];
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| {
        let path = field_path(&path.to_string());
        if !KNOWN_EXTRA.contains(&path.as_str())
            && !path.starts_with("metadata.")
            && !path.starts_with("status.")
        {
            unknown.push(path);
        }
    };
    let ignored = serde_ignored::Deserializer::new(value, &mut record);
    let result: Result<T, _> = serde_path_to_error::deserialize(ignored);
    match result {
        Ok(typed) => {
            for path in unknown {
                into.problems.push(
                    Problem::warning("unknown field, ignored")
                        .at(origin)
                        .object(object)
                        .field(path)
                        .hint("check its spelling and indentation against the resource's API"),
                );
            }
            Some(typed)
        }
        Err(err) => {
            let path = field_path(&err.path().to_string());
            let inner = err.into_inner().to_string();
            into.problems.push(
                Problem::error(inner)
                    .at(origin)
                    .object(object)
                    .field(if path == "." { String::new() } else { path }),
            );
            None
        }
    }
}

/// `spec.http.0.route` → `spec.http[0].route`, as people write paths.
fn field_path(dotted: &str) -> String {
    let mut out = String::with_capacity(dotted.len() + 4);
    for segment in dotted.split('.') {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_read_like_yaml() {
        assert_eq!(
            field_path("spec.http.0.route.10.weight"),
            "spec.http[0].route[10].weight"
        );
        assert_eq!(field_path("spec"), "spec");
    }

    #[test]
    fn splits_like_kubectl() {
        let text = "a: 1\n---\nb: 2\n--- # comment\n\n---\n# only a comment\n---\nc: 3\n";
        let docs = split_documents(text);
        assert_eq!(docs, vec![(1, "a: 1\n"), (3, "b: 2\n"), (9, "c: 3\n")]);
    }
}
