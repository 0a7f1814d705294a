//! A corpus of broken manifests, each with the problem it must produce. None may panic, and a bad
//! document never takes the good one beside it down.

use std::path::Path;

use shoal_control::{ManifestDir, Options, Problem, Severity, Snapshot};

const GOOD: &str = "apiVersion: v1
kind: Service
metadata: {name: good, namespace: app}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
";

fn load(dir: &Path) -> Snapshot {
    ManifestDir::new(dir)
        .snapshot(&Default::default(), &Options::default())
        .expect("directory readable")
}

/// (case, YAML, expected object, expected field, words the message or hint must contain)
type Case = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
);

const CASES: &[Case] = &[
    ("bad YAML", "apiVersion: v1\nkind: Service\nmetadata: {name: x\n", None, None, "not valid YAML"),
    ("tab indentation", "apiVersion: v1\nkind: Service\nmetadata:\n\tname: x\n", None, None, "not valid YAML"),
    ("duplicate key", "apiVersion: v1\nkind: Service\nkind: Pod\nmetadata: {name: x}\n", None, None, "not valid YAML"),
    ("not a mapping", "- just\n- a list\n", None, None, "must be a mapping"),
    ("no apiVersion", "kind: Service\nmetadata: {name: x}\n", None, Some("apiVersion"), "no apiVersion"),
    ("no kind", "apiVersion: v1\nmetadata: {name: x}\n", None, Some("kind"), "no kind"),
    ("no name", "apiVersion: v1\nkind: Service\nmetadata: {namespace: app}\n", None, Some("metadata.name"), "no name"),
    ("unsupported version", "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: x}\n", None, Some("apiVersion"), "security.istio.io/v1 or security.istio.io/v1beta1"),
    ("wrong type", "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: app}\nspec: {ports: [{port: eighty}]}\n", Some("Service app/x"), Some("spec.ports[0].port"), "invalid type"),
    ("missing required field", "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: app}\nspec: {ports: [{name: http}]}\n", Some("Service app/x"), Some("spec.ports[0]"), "missing field `port`"),
    ("port out of range", "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: app}\nspec: {ports: [{port: 70000}]}\n", Some("Service app/x"), Some("spec.ports[0].port"), "out of range"),
    ("targetPort out of range", "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: app}\nspec: {ports: [{port: 80, targetPort: 0}]}\n", Some("Service app/x"), Some("spec.ports[0].targetPort"), "out of range"),
    ("bad clusterIP", "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: app}\nspec: {clusterIP: 10.0.0.300, ports: [{port: 80}]}\n", Some("Service app/x"), Some("spec.clusterIP"), "not an IP"),
    ("weight below 0", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: app}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: good}]\n  rules: [{backendRefs: [{name: good, port: 80, weight: -5}]}]\n", Some("HTTPRoute app/r"), Some("spec.rules[0].backendRefs[0].weight"), "use 0 to 1000000"),
    ("route to missing parent", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: app}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: nope}]\n", Some("HTTPRoute app/r"), Some("spec.parentRefs[0]"), "no Service app/nope"),
    ("selector and targetRefs", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\nspec:\n  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, group: \"\", name: good}]\n", Some("AuthorizationPolicy app/p"), Some("spec.selector"), "cannot be used together"),
    ("unknown action", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\nspec: {action: ALOW}\n", Some("AuthorizationPolicy app/p"), Some("spec.action"), "use ALLOW, DENY, AUDIT or CUSTOM"),
    ("port as a name in a policy", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\nspec: {rules: [{to: [{operation: {ports: [http]}}]}]}\n", Some("AuthorizationPolicy app/p"), Some("spec.rules[0].to[0].operation.ports[0]"), "1 to 65535"),
    ("bad CIDR", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\nspec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]}\n", Some("AuthorizationPolicy app/p"), Some("spec.rules[0].from[0].source.ipBlocks[0]"), "CIDR"),
    ("unknown condition key", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\nspec: {rules: [{when: [{key: \"request.hedaers[x]\", values: [y]}]}]}\n", Some("AuthorizationPolicy app/p"), Some("spec.rules[0].when[0].key"), "request.headers[NAME]"),
    ("use-waypoint naming no waypoint", "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: app, labels: {istio.io/use-waypoint: ghost}}\nspec: {clusterIP: 10.0.0.2, ports: [{port: 80}]}\n", Some("Service app/x"), Some("metadata.labels[istio.io/use-waypoint]"), "app/ghost, which does not exist"),
    ("waypoint without HBONE listener", "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w, namespace: app}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: http, port: 80, protocol: HTTP}]}\n", Some("Gateway app/w"), Some("spec.listeners"), "15008"),
    ("bad waypoint-for", "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w, namespace: app, labels: {istio.io/waypoint-for: services}}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n", Some("Gateway app/w"), Some("metadata.labels[istio.io/waypoint-for]"), "service, workload, all or none"),
    ("unknown mTLS mode", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: app}\nspec: {mtls: {mode: STRICTER}}\n", Some("PeerAuthentication app/pa"), Some("spec.mtls.mode"), "UNSET, PERMISSIVE, STRICT or DISABLE"),
    ("port-level mTLS without selector", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: app}\nspec: {portLevelMtls: {8080: {mode: STRICT}}}\n", Some("PeerAuthentication app/pa"), Some("spec.portLevelMtls"), "needs a selector"),
    ("ServiceEntry without hosts", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: app}\nspec: {ports: [{number: 443, name: tls}]}\n", Some("ServiceEntry app/se"), Some("spec.hosts"), "at least one host"),
    ("ServiceEntry bad resolution", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: app}\nspec: {hosts: [a.example], ports: [{number: 443}], resolution: DNZ}\n", Some("ServiceEntry app/se"), Some("spec.resolution"), "NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
    ("wildcard host with DNS", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: app}\nspec: {hosts: [\"*.example.com\"], ports: [{number: 443}], resolution: DNS}\n", Some("ServiceEntry app/se"), Some("spec.hosts"), "cannot be resolved by DNS"),
    ("VirtualService weight over 100", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: app}\nspec: {hosts: [good], http: [{route: [{destination: {host: good}, weight: 120}]}]}\n", Some("VirtualService app/vs"), Some("spec.http[0].route[0].weight"), "0 to 100"),
    ("unknown retryOn", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: app}\nspec: {hosts: [good], http: [{retries: {attempts: 3, retryOn: \"5xx,sometimes\"}, route: [{destination: {host: good}}]}]}\n", Some("VirtualService app/vs"), Some("spec.http[0].retries.retryOn"), "unknown retry condition"),
    ("rate limit without targetRef", "apiVersion: policy.linkerd.io/v1alpha1\nkind: HTTPLocalRateLimitPolicy\nmetadata: {name: rl, namespace: app}\nspec: {total: {requestsPerSecond: 10}}\n", Some("HTTPLocalRateLimitPolicy app/rl"), Some("spec.targetRef"), "needs a targetRef"),
    ("rate limit of zero", "apiVersion: policy.linkerd.io/v1alpha1\nkind: HTTPLocalRateLimitPolicy\nmetadata: {name: rl, namespace: app}\nspec: {targetRef: {kind: Service, name: good}, total: {requestsPerSecond: 0}}\n", Some("HTTPLocalRateLimitPolicy app/rl"), Some("spec.total.requestsPerSecond"), "1 or more"),
    ("rate limit on a Pod", "apiVersion: policy.linkerd.io/v1alpha1\nkind: HTTPLocalRateLimitPolicy\nmetadata: {name: rl, namespace: app}\nspec: {targetRef: {kind: Pod, name: good}, total: {requestsPerSecond: 5}}\n", Some("HTTPLocalRateLimitPolicy app/rl"), Some("spec.targetRef.kind"), "Service or a ServiceEntry"),
    ("MUTUAL TLS origination", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: app}\nspec: {host: good, trafficPolicy: {tls: {mode: MUTUAL}}}\n", Some("DestinationRule app/dr"), Some("spec.trafficPolicy.tls.mode"), "not originated"),
    ("unreadable caCertificates", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: app}\nspec: {host: good, trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /nonexistent/ca.pem}}}\n", Some("DestinationRule app/dr"), Some("spec.trafficPolicy.tls.caCertificates"), "cannot read"),
    ("bad duration", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: app}\nspec: {host: good, trafficPolicy: {connectionPool: {tcp: {connectTimeout: fast}}}}\n", Some("DestinationRule app/dr"), Some("spec.trafficPolicy.connectionPool.tcp.connectTimeout"), "not a duration"),
    ("unknown load balancer", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: app}\nspec: {host: good, trafficPolicy: {loadBalancer: {simple: FASTEST}}}\n", Some("DestinationRule app/dr"), Some("spec.trafficPolicy.loadBalancer.simple"), "ROUND_ROBIN"),
    ("duplicate object", "apiVersion: v1\nkind: Service\nmetadata: {name: good, namespace: app}\nspec: {clusterIP: 10.0.0.9, ports: [{port: 80}]}\n", Some("Service app/good"), Some("metadata.name"), "defined again"),
    ("pod IP taken", "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: app}\nstatus: {podIP: 10.1.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p2, namespace: app}\nstatus: {podIP: 10.1.0.1}\n", Some("Pod app/p2"), Some("status.podIP"), "already app/p1's"),
    ("deep nesting", "", None, None, "not valid YAML"),
    ("alias bomb", "", None, None, "not valid YAML"),
];

fn deep_nesting() -> String {
    let mut doc = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: deep, namespace: app}\nspec: ",
    );
    doc.push_str(&"[".repeat(10_000));
    doc.push_str(&"]".repeat(10_000));
    doc.push('\n');
    doc
}

fn alias_bomb() -> String {
    let mut doc = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bomb}\nx0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..12 {
        let prev = i - 1;
        doc.push_str(&format!("x{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"));
    }
    doc
}

#[test]
fn every_broken_manifest_gets_its_problem_and_the_rest_applies() {
    for (case, yaml, object, field, words) in CASES {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a-good.yaml"), GOOD).unwrap();
        let text = match *case {
            "deep nesting" => deep_nesting(),
            "alias bomb" => alias_bomb(),
            _ => yaml.to_string(),
        };
        std::fs::write(dir.path().join("b-case.yaml"), &text).unwrap();
        let s = load(dir.path());
        let errors: Vec<&Problem> = s
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .collect();
        let found = errors.iter().find(|p| {
            let text = p.to_string();
            object.is_none_or(|o| p.object.as_deref() == Some(o))
                && field.is_none_or(|f| p.field.as_deref() == Some(f))
                && text.contains(words)
        });
        let Some(problem) = found else {
            panic!("{case}: expected an error on {object:?} {field:?} containing {words:?}; got {errors:#?}");
        };
        let origin = problem
            .origin
            .as_ref()
            .unwrap_or_else(|| panic!("{case}: no origin in {problem}"));
        assert!(origin.file.ends_with(".yaml"), "{case}: {origin}");
        // The good document in the other file is untouched.
        assert!(
            s.service_by_host("good.app.svc.cluster.local").is_some(),
            "{case}: the good service went missing"
        );
    }
}

#[test]
fn an_unknown_kind_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
    std::fs::write(dir.path().join("many.yaml"), [deployment; 5].join("---\n")).unwrap();
    std::fs::write(dir.path().join("more.yaml"), deployment).unwrap();
    let s = load(dir.path());
    let about: Vec<String> = s
        .problems
        .iter()
        .map(|p| p.to_string())
        .filter(|p| p.contains("Deployment"))
        .collect();
    assert_eq!(about.len(), 1, "{about:#?}");
    assert!(
        about[0].contains("6 document(s) skipped") && about[0].starts_with("warning"),
        "{about:?}"
    );
}

#[test]
fn errors_carry_the_line_within_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{GOOD}---\n# a comment\napiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namespace: [oops\n");
    std::fs::write(dir.path().join("lines.yaml"), text).unwrap();
    let s = load(dir.path());
    let p = s.problems.iter().find(|p| p.is_error()).expect("an error");
    let origin = p.origin.as_ref().unwrap();
    assert_eq!(origin.document, 2);
    // The document starts on line 6; the bad flow sequence runs to the end, around line 11.
    assert!((6..=12).contains(&origin.line), "{p}");
}

#[test]
fn a_huge_file_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-good.yaml"), GOOD).unwrap();
    let file = std::fs::File::create(dir.path().join("huge.yaml")).unwrap();
    file.set_len(shoal_control::parse::MAX_FILE_BYTES as u64 + 1)
        .unwrap();
    let s = load(dir.path());
    assert!(s
        .problems
        .iter()
        .any(|p| p.is_error() && p.message.contains("over the limit")));
    assert!(s.service_by_host("good.app.svc.cluster.local").is_some());
}

#[test]
fn not_utf8_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bin.yaml"), [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let s = load(dir.path());
    assert!(s
        .problems
        .iter()
        .any(|p| p.is_error() && p.message.contains("UTF-8")));
}

#[test]
fn a_missing_directory_is_an_error_not_an_empty_mesh() {
    let err = ManifestDir::new("/nonexistent/shoal/manifests")
        .snapshot(&Default::default(), &Options::default());
    assert!(err.is_err());
}
