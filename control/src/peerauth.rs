//! PeerAuthentication: which mTLS mode applies to a workload and port. Workload-selected beats
//! namespace-wide beats mesh-wide (root namespace); UNSET inherits; the default is PERMISSIVE. In
//! ambient mesh traffic is always mTLS: the mode only decides whether plaintext inbound is accepted,
//! and DISABLE is ignored (treated as PERMISSIVE, with a warning from `compile`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::snapshot::LabelSource;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    Unset,
    Permissive,
    Strict,
    Disable,
}

impl Mode {
    pub fn parse(value: Option<&str>) -> Result<Mode, String> {
        match value {
            None | Some("UNSET") => Ok(Mode::Unset),
            Some("PERMISSIVE") => Ok(Mode::Permissive),
            Some("STRICT") => Ok(Mode::Strict),
            Some("DISABLE") => Ok(Mode::Disable),
            Some(other) => Err(format!(
                "unknown mTLS mode {other:?}; use UNSET, PERMISSIVE, STRICT or DISABLE"
            )),
        }
    }
}

/// One compiled PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerAuth {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    /// `None` = namespace-wide (or mesh-wide in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: Mode,
    /// Port-level modes (the workload's port, i.e. the container/target port).
    pub ports: BTreeMap<u16, Mode>,
    /// For "oldest wins" among several that select the same workload.
    pub created: Option<String>,
}

/// The effective mode for one workload: a default and port exceptions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Effective {
    /// PERMISSIVE or STRICT.
    pub mode: Mode,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<(u16, Mode)>,
    /// The policies that decided, most specific first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<std::sync::Arc<str>>,
}

impl Effective {
    pub const DEFAULT: Effective = Effective {
        mode: Mode::Permissive,
        ports: Vec::new(),
        from: Vec::new(),
    };

    /// Whether a plaintext connection to `port` is accepted.
    pub fn accepts_plaintext(&self, port: u16) -> bool {
        let mode = self
            .ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, m)| *m)
            .unwrap_or(self.mode);
        mode != Mode::Strict
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &impl LabelSource) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.label(k) == Some(v.as_str()))
}

fn settle(mode: Mode) -> Mode {
    match mode {
        Mode::Strict => Mode::Strict,
        _ => Mode::Permissive,
    }
}

/// `policies` are all PeerAuthentications; `root_namespace` holds the mesh-wide one.
pub fn effective(
    policies: &[PeerAuth],
    root_namespace: &str,
    namespace: &str,
    labels: &impl LabelSource,
) -> Effective {
    let oldest = |a: &&PeerAuth, b: &&PeerAuth| {
        (a.created.as_deref().unwrap_or(""), &a.name)
            .cmp(&(b.created.as_deref().unwrap_or(""), &b.name))
    };
    let workload = policies
        .iter()
        .filter(|p| {
            p.namespace == namespace && p.selector.as_ref().is_some_and(|s| selects(s, labels))
        })
        .min_by(oldest);
    let namespace_wide = policies
        .iter()
        .filter(|p| p.namespace == namespace && p.selector.is_none())
        .min_by(oldest);
    let mesh = policies
        .iter()
        .filter(|p| p.namespace == root_namespace && p.selector.is_none())
        .min_by(oldest);

    let mut from = Vec::new();
    let mut mode = Mode::Unset;
    for p in [workload, namespace_wide, mesh].into_iter().flatten() {
        if mode == Mode::Unset && p.mode != Mode::Unset {
            mode = p.mode;
            from.push(p.name.as_str().into());
        }
    }
    let mode = settle(mode);
    let mut ports = Vec::new();
    if let Some(w) = workload {
        for (port, port_mode) in &w.ports {
            let port_mode = if *port_mode == Mode::Unset {
                mode
            } else {
                settle(*port_mode)
            };
            if port_mode != mode {
                ports.push((*port, port_mode));
            }
        }
        if !w.ports.is_empty() && !from.iter().any(|f: &std::sync::Arc<str>| **f == *w.name) {
            from.insert(0, w.name.as_str().into());
        }
    }
    Effective { mode, ports, from }
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn pa(
        ns: &str,
        name: &str,
        selector: Option<(&str, &str)>,
        mode: Mode,
        ports: &[(u16, Mode)],
    ) -> PeerAuth {
        PeerAuth {
            name: format!("{ns}/{name}"),
            namespace: ns.to_string(),
            selector: selector.map(|(k, v)| BTreeMap::from([(k.to_string(), v.to_string())])),
            mode,
            ports: ports.iter().copied().collect(),
            created: None,
        }
    }

    #[test]
    fn precedence_table() {
        use Mode::*;
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let mesh_strict = pa("istio-system", "default", None, Strict, &[]);
        let ns_permissive = pa("app", "ns", None, Permissive, &[]);
        let ns_unset = pa("app", "ns-unset", None, Unset, &[]);
        let wl_strict = pa("app", "wl", Some(("app", "web")), Strict, &[]);
        let wl_unset_port = pa(
            "app",
            "wl-port",
            Some(("app", "web")),
            Unset,
            &[(8080, Permissive), (9090, Unset)],
        );
        let other_wl = pa("app", "other", Some(("app", "db")), Strict, &[]);
        let other_ns = pa("prod", "ns", None, Strict, &[]);
        let disable = pa("app", "off", None, Disable, &[]);
        let table: Vec<(&str, Vec<&PeerAuth>, Mode, Vec<(u16, Mode)>)> = vec![
            ("default is permissive", vec![], Permissive, vec![]),
            ("mesh-wide applies", vec![&mesh_strict], Strict, vec![]),
            (
                "namespace beats mesh",
                vec![&mesh_strict, &ns_permissive],
                Permissive,
                vec![],
            ),
            (
                "namespace unset inherits mesh",
                vec![&mesh_strict, &ns_unset],
                Strict,
                vec![],
            ),
            (
                "workload beats namespace",
                vec![&ns_permissive, &wl_strict],
                Strict,
                vec![],
            ),
            ("selector must match", vec![&other_wl], Permissive, vec![]),
            (
                "other namespace does not apply",
                vec![&other_ns],
                Permissive,
                vec![],
            ),
            (
                "port level over inherited strict",
                vec![&mesh_strict, &wl_unset_port],
                Strict,
                vec![(8080, Permissive)],
            ),
            (
                "DISABLE is ignored in ambient",
                vec![&mesh_strict, &disable],
                Permissive,
                vec![],
            ),
        ];
        for (name, policies, mode, ports) in table {
            let policies: Vec<PeerAuth> = policies.into_iter().cloned().collect();
            let e = effective(&policies, "istio-system", "app", &labels);
            assert_eq!((e.mode, e.ports.clone()), (mode, ports), "{name}");
        }
        let e = effective(
            &[mesh_strict.clone(), wl_unset_port.clone()],
            "istio-system",
            "app",
            &labels,
        );
        assert!(e.accepts_plaintext(8080));
        assert!(!e.accepts_plaintext(9090));
        let from: Vec<&str> = e.from.iter().map(|f| &**f).collect();
        assert_eq!(from, ["app/wl-port", "istio-system/default"]);
    }
}
