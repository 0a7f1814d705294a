//! Which waypoint a Service, ServiceEntry or workload uses (SEMANTICS.md, "Enrollment and waypoint
//! binding"). A pure function of the object's labels, its namespace's labels and the waypoints that
//! exist, so every rule is a row in a table test.

use serde::Serialize;

use crate::snapshot::LabelSource;

pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";

/// What traffic a waypoint takes (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("service") => Ok(WaypointFor::Service),
            Some("workload") => Ok(WaypointFor::Workload),
            Some("all") => Ok(WaypointFor::All),
            Some("none") => Ok(WaypointFor::None),
            Some(other) => Err(format!(
                "{WAYPOINT_FOR} is {other:?}; use service, workload, all or none"
            )),
        }
    }

    fn takes(self, subject: Subject) -> bool {
        match subject {
            Subject::Service | Subject::ServiceEntry => {
                matches!(self, WaypointFor::Service | WaypointFor::All)
            }
            Subject::Workload => matches!(self, WaypointFor::Workload | WaypointFor::All),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Service,
    ServiceEntry,
    Workload,
}

/// The labels that matter, read from one object (or from its namespace).
#[derive(Debug, Clone, Copy, Default)]
pub struct UseLabels<'a> {
    pub use_waypoint: Option<&'a str>,
    pub use_waypoint_namespace: Option<&'a str>,
}

impl<'a> UseLabels<'a> {
    pub fn from(labels: &'a impl LabelSource) -> Self {
        Self {
            use_waypoint: labels.label(USE_WAYPOINT),
            use_waypoint_namespace: labels.label(USE_WAYPOINT_NAMESPACE),
        }
    }
}

/// What binding needs to know about an existing waypoint.
#[derive(Debug, Clone, Copy)]
pub struct WaypointInfo {
    pub for_: WaypointFor,
    /// Whether the waypoint accepts objects from the subject's namespace (its mesh listener's
    /// `allowedRoutes`).
    pub allows_namespace: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    Unbound,
    Bound {
        namespace: String,
        name: String,
    },
    /// A label names something unusable. `inherited` says the namespace's label is to blame, so the
    /// problem is reported once there rather than on every object.
    Error {
        inherited: bool,
        message: String,
        hint: String,
    },
}

/// `lookup(namespace, name)` finds a waypoint, judged for the subject's namespace.
pub fn bind(
    subject: Subject,
    subject_namespace: &str,
    object: UseLabels<'_>,
    namespace: UseLabels<'_>,
    is_waypoint_itself: bool,
    lookup: impl Fn(&str, &str) -> Option<WaypointInfo>,
) -> Binding {
    if is_waypoint_itself {
        return Binding::Unbound;
    }
    let (labels, inherited) = if object.use_waypoint.is_some() {
        (object, false)
    } else {
        (namespace, true)
    };
    let Some(name) = labels.use_waypoint else {
        return Binding::Unbound;
    };
    if name == "none" {
        return Binding::Unbound;
    }
    let waypoint_namespace = labels.use_waypoint_namespace.unwrap_or(subject_namespace);
    let Some(info) = lookup(waypoint_namespace, name) else {
        return Binding::Error {
            inherited,
            message: format!("{USE_WAYPOINT} names waypoint {waypoint_namespace}/{name}, which does not exist"),
            hint: format!(
                "create a Gateway {name} with gatewayClassName istio-waypoint in namespace {waypoint_namespace}, \
                 fix the label, or set it to none"
            ),
        };
    };
    if !info.takes(subject) {
        if inherited {
            // Istio's rule: a namespace-wide label only binds what the waypoint is for.
            return Binding::Unbound;
        }
        let wanted = match subject {
            Subject::Workload => "workload or all",
            _ => "service or all",
        };
        return Binding::Error {
            inherited,
            message: format!(
                "waypoint {waypoint_namespace}/{name} is for {:?} traffic, not for this object",
                info.for_
            )
            .to_lowercase(),
            hint: format!("label the Gateway {WAYPOINT_FOR}: {wanted}, or use another waypoint"),
        };
    }
    if waypoint_namespace != subject_namespace && !info.allows_namespace {
        return Binding::Error {
            inherited,
            message: format!("waypoint {waypoint_namespace}/{name} does not accept objects from namespace {subject_namespace}"),
            hint: "allow it on the Gateway's mesh listener: allowedRoutes.namespaces.from: All, or Selector matching this namespace"
                .to_string(),
        };
    }
    Binding::Bound {
        namespace: waypoint_namespace.to_string(),
        name: name.to_string(),
    }
}

impl WaypointInfo {
    fn takes(&self, subject: Subject) -> bool {
        self.for_.takes(subject)
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn labels(use_waypoint: Option<&'static str>, ns: Option<&'static str>) -> UseLabels<'static> {
        UseLabels {
            use_waypoint,
            use_waypoint_namespace: ns,
        }
    }

    /// Waypoints: app/wp (service), app/wl (workload), app/both (all), infra/shared (all, allows app),
    /// infra/private (all, same-namespace only).
    fn lookup(ns: &str, name: &str) -> Option<WaypointInfo> {
        let (for_, allows) = match (ns, name) {
            ("app", "wp") => (WaypointFor::Service, true),
            ("app", "wl") => (WaypointFor::Workload, true),
            ("app", "both") => (WaypointFor::All, true),
            ("app", "off") => (WaypointFor::None, true),
            ("infra", "shared") => (WaypointFor::All, true),
            ("infra", "private") => (WaypointFor::All, false),
            _ => return None,
        };
        Some(WaypointInfo {
            for_,
            allows_namespace: allows,
        })
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        Unbound,
        To(&'static str),
        Error {
            inherited: bool,
            contains: &'static str,
        },
    }

    #[test]
    fn binding_table() {
        use Subject::*;
        use Want::*;
        let none = labels(None, None);
        let table: Vec<(&str, Subject, UseLabels, UseLabels, bool, Want)> = vec![
            ("nothing labelled", Service, none, none, false, Unbound),
            (
                "namespace label",
                Service,
                none,
                labels(Some("wp"), None),
                false,
                To("app/wp"),
            ),
            (
                "object beats namespace",
                Service,
                labels(Some("both"), None),
                labels(Some("wp"), None),
                false,
                To("app/both"),
            ),
            (
                "object none opts out",
                Service,
                labels(Some("none"), None),
                labels(Some("wp"), None),
                false,
                Unbound,
            ),
            (
                "namespace none",
                Service,
                none,
                labels(Some("none"), None),
                false,
                Unbound,
            ),
            (
                "service entry",
                ServiceEntry,
                labels(Some("wp"), None),
                none,
                false,
                To("app/wp"),
            ),
            (
                "workload needs workload waypoint",
                Workload,
                labels(Some("wl"), None),
                none,
                false,
                To("app/wl"),
            ),
            (
                "all takes workloads",
                Workload,
                none,
                labels(Some("both"), None),
                false,
                To("app/both"),
            ),
            (
                "inherited mismatch is silent",
                Workload,
                none,
                labels(Some("wp"), None),
                false,
                Unbound,
            ),
            (
                "inherited mismatch, service side",
                Service,
                none,
                labels(Some("wl"), None),
                false,
                Unbound,
            ),
            (
                "direct mismatch is an error",
                Workload,
                labels(Some("wp"), None),
                none,
                false,
                Error {
                    inherited: false,
                    contains: "workload or all",
                },
            ),
            (
                "direct mismatch for a service",
                Service,
                labels(Some("wl"), None),
                none,
                false,
                Error {
                    inherited: false,
                    contains: "service or all",
                },
            ),
            (
                "waypoint-for none takes nothing",
                Service,
                labels(Some("off"), None),
                none,
                false,
                Error {
                    inherited: false,
                    contains: "service or all",
                },
            ),
            (
                "missing waypoint named on object",
                Service,
                labels(Some("ghost"), None),
                none,
                false,
                Error {
                    inherited: false,
                    contains: "does not exist",
                },
            ),
            (
                "missing waypoint named on namespace",
                Service,
                none,
                labels(Some("ghost"), None),
                false,
                Error {
                    inherited: true,
                    contains: "does not exist",
                },
            ),
            (
                "cross namespace allowed",
                Service,
                labels(Some("shared"), Some("infra")),
                none,
                false,
                To("infra/shared"),
            ),
            (
                "cross namespace from namespace labels",
                Workload,
                none,
                labels(Some("shared"), Some("infra")),
                false,
                To("infra/shared"),
            ),
            (
                "cross namespace refused",
                Service,
                labels(Some("private"), Some("infra")),
                none,
                false,
                Error {
                    inherited: false,
                    contains: "does not accept",
                },
            ),
            (
                "namespace label of waypoint ns alone does not bind",
                Service,
                labels(None, Some("infra")),
                none,
                false,
                Unbound,
            ),
            (
                "object's namespace label is not mixed with the namespace's name",
                Service,
                labels(None, Some("infra")),
                labels(Some("wp"), None),
                false,
                To("app/wp"),
            ),
            (
                "a waypoint never gets a waypoint",
                Workload,
                labels(Some("both"), None),
                labels(Some("both"), None),
                true,
                Unbound,
            ),
        ];
        for (name, subject, object, namespace, itself, want) in table {
            let got = bind(subject, "app", object, namespace, itself, lookup);
            let got = match got {
                Binding::Unbound => Unbound,
                Binding::Bound { namespace, name } => {
                    To(Box::leak(format!("{namespace}/{name}").into_boxed_str()))
                }
                Binding::Error {
                    inherited,
                    message,
                    hint,
                } => {
                    let text = format!("{message} {hint}");
                    match &want {
                        Error { contains, .. } if text.contains(contains) => Error {
                            inherited,
                            contains,
                        },
                        _ => panic!("{name}: unexpected error {text}"),
                    }
                }
            };
            assert_eq!(got, want, "{name}");
        }
    }
}
