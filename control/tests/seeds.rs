//! The seeds' manifests (the articles this project grew from) load as written and compile to the
//! bindings the articles describe.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use shoal_control::{ManifestDir, Options, Severity, Snapshot};

fn seeds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seeds")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn compile(path: &Path) -> Snapshot {
    ManifestDir::new(path)
        .snapshot(&Default::default(), &Options::default())
        .expect("readable")
}

fn errors(s: &Snapshot) -> Vec<String> {
    s.problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| p.to_string())
        .collect()
}

fn warnings(s: &Snapshot) -> Vec<String> {
    s.problems
        .iter()
        .filter(|p| p.severity == Severity::Warning)
        .map(|p| p.to_string())
        .collect()
}

fn waypoint_of(s: &Snapshot, host: &str) -> Option<String> {
    let service = s
        .service_by_host(host)
        .unwrap_or_else(|| panic!("no service {host}"));
    service.waypoint.map(|id| {
        let w = s.waypoint(id);
        format!("{}/{}", w.namespace, w.name)
    })
}

#[test]
fn egress_through_a_waypoint_is_two_resources() {
    for file in ["000-egress-ambient.yaml", "001-egress-ambient.yaml"] {
        let s = compile(&seeds().join(file));
        assert_eq!(errors(&s), Vec::<String>::new(), "{file}");
        // The ServiceEntry's only host is bound to the waypoint by its label...
        assert_eq!(
            waypoint_of(&s, "aliyun.com").as_deref(),
            Some("default/waypoint"),
            "{file}"
        );
        // ...and, having no addresses, gets a VIP from Istio's range, reachable on port 80.
        let service = s.service_by_host("aliyun.com").unwrap();
        assert_eq!(service.vips.len(), 1);
        let IpAddr::V4(vip) = service.vips[0] else {
            panic!("IPv4 VIP")
        };
        assert_eq!(vip.octets()[..2], [240, 240]);
        assert!(s.service_by_vip((service.vips[0], 80).into()).is_some());
        // The waypoint has no address in a manifests directory until its pod or status gives one.
        assert!(!s.waypoints[0].ready);
    }
}

#[test]
fn the_sidecar_egress_setup_loads_with_what_ambient_ignores_explained() {
    for file in ["000-egress-sidecar.yaml", "001-egress-sidecar.yaml"] {
        let s = compile(&seeds().join(file));
        assert_eq!(errors(&s), Vec::<String>::new(), "{file}");
        let w = warnings(&s);
        assert!(
            w.iter().any(
                |w| w.contains("networking.istio.io/v1alpha3 Gateway is not read")
                    && w.contains("use-waypoint")
            ),
            "{file}: {w:#?}"
        );
        assert!(
            w.iter().any(
                |w| w.contains("istio-egressgateway.istio-system.svc.cluster.local")
                    && w.contains("not a known service")
            ),
            "{file}: {w:#?}"
        );
        assert!(s.traffic.values().any(|t| t
            .virtual_service
            .as_ref()
            .is_some_and(|(name, _)| name == "default/egressgateway-vs")));
    }
    // The first article mis-indents `weight` under `destination`: loaded, and the user is told.
    let s = compile(&seeds().join("000-egress-sidecar.yaml"));
    let w = warnings(&s);
    assert!(
        w.iter()
            .any(|w| w.contains("spec.http[0].route[0].destination.weight: unknown field")),
        "{w:#?}"
    );
    let s = compile(&seeds().join("001-egress-sidecar.yaml"));
    assert!(!warnings(&s).iter().any(|w| w.contains("unknown field")));
}

#[test]
fn bookinfo_waypoint_route_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        seeds().join("002-bookinfo-waypoint.yaml"),
        dir.path().join("waypoint.yaml"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("bookinfo-app.yaml"),
        dir.path().join("app.yaml"),
    )
    .unwrap();
    let s = compile(dir.path());
    assert_eq!(errors(&s), Vec::<String>::new());
    // Every bookinfo service is bound through the namespace label; the waypoint's pod gives it an
    // address and identity, and is itself never bound.
    for host in ["productpage", "reviews", "reviews-v1", "reviews-v2"] {
        assert_eq!(
            waypoint_of(&s, &format!("{host}.bookinfo.svc.cluster.local")).as_deref(),
            Some("bookinfo/waypoint")
        );
    }
    let waypoint = s.waypoint_by_name("bookinfo", "waypoint").unwrap();
    assert!(waypoint.ready);
    assert_eq!(
        waypoint.addresses,
        vec!["127.10.0.100".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        waypoint.identity,
        "spiffe://cluster.local/ns/bookinfo/sa/waypoint"
    );
    let waypoint_pod = s.workload_by_ip("127.10.0.100".parse().unwrap()).unwrap();
    assert!(waypoint_pod.waypoint.is_none() && waypoint_pod.is_waypoint.is_some());
    // A service waypoint does not take pods: the namespace label binds no workload.
    assert!(s.workloads.iter().all(|w| w.waypoint.is_none()));
    // The 90/10 split, both backends resolved.
    let reviews = s.services.iter().position(|x| x.name == "reviews").unwrap() as u32;
    let table = &s.routes[&reviews];
    let backends: Vec<(String, u32, bool)> = table.rules[0]
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.weight, b.service.is_some()))
        .collect();
    assert_eq!(
        backends,
        vec![
            ("bookinfo/reviews-v1".into(), 90, true),
            ("bookinfo/reviews-v2".into(), 10, true)
        ]
    );
    // The L7 policy attaches to productpage at its waypoint, not to ztunnel.
    let productpage = s
        .services
        .iter()
        .position(|x| x.name == "productpage")
        .unwrap() as u32;
    assert_eq!(
        s.service_policies[&productpage][0].name,
        "bookinfo/productpage-waypoint"
    );
    assert!(s.policies.is_empty(), "no L4 policy: {:?}", s.policies);
    // Named targetPort resolves through the pod's container port.
    let reviews_svc = s.service(reviews);
    let pod = s.workload(reviews_svc.endpoints[0]);
    assert_eq!(
        reviews_svc.target_port(&reviews_svc.ports[0], pod),
        Some(9080)
    );
    assert_eq!(reviews_svc.endpoints.len(), 2);
    // curl in the ambient default namespace has its identity and node.
    let curl = s.workload_by_ip("127.10.1.5".parse().unwrap()).unwrap();
    assert_eq!(&*curl.principal, "cluster.local/ns/default/sa/curl");
    assert!(curl.ambient);
    assert_eq!(s.workloads_on_node("node-b").count(), 2);
}

#[test]
fn bookinfo_with_the_cross_namespace_waypoint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        seeds().join("002-bookinfo-waypoint.yaml"),
        dir.path().join("waypoint.yaml"),
    )
    .unwrap();
    let app = std::fs::read_to_string(fixtures().join("bookinfo-app.yaml")).unwrap();
    // `kubectl label ns bookinfo istio.io/use-waypoint-namespace=foo istio.io/use-waypoint=waypoint-foo`
    let app = app.replacen(
        "    istio.io/use-waypoint: waypoint\n",
        "    istio.io/use-waypoint: waypoint-foo\n    istio.io/use-waypoint-namespace: foo\n",
        1,
    );
    std::fs::write(dir.path().join("app.yaml"), app).unwrap();
    let s = compile(dir.path());
    assert_eq!(errors(&s), Vec::<String>::new());
    assert_eq!(
        waypoint_of(&s, "reviews.bookinfo.svc.cluster.local").as_deref(),
        Some("foo/waypoint-foo")
    );
    // waypoint-foo accepts only bookinfo: the same label on default is refused, once, on the namespace.
    let app = std::fs::read_to_string(dir.path().join("app.yaml")).unwrap();
    let app = app.replacen(
        "  name: default\n  labels:\n",
        "  name: default\n  labels:\n    istio.io/use-waypoint: waypoint-foo\n    istio.io/use-waypoint-namespace: foo\n",
        1,
    );
    std::fs::write(dir.path().join("app.yaml"), app).unwrap();
    // Two services in default, so the refusal would show twice if reported per object.
    let extra = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: default}\nspec: {clusterIP: 10.96.1.2, ports: [{port: 80}]}\n";
    std::fs::write(dir.path().join("default-services.yaml"), extra).unwrap();
    let s = compile(dir.path());
    let e = errors(&s);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].contains("Namespace default")
            && e[0].contains("does not accept objects from namespace default"),
        "{e:#?}"
    );
}

#[test]
fn homelab_service_scoped_waypoint() {
    let s = compile(&seeds().join("003-homelab.yaml"));
    assert_eq!(errors(&s), Vec::<String>::new());
    let svc = s
        .service_by_host("example-api.example-api.svc.cluster.local")
        .unwrap();
    assert_eq!(
        waypoint_of(&s, "example-api.example-api.svc.cluster.local").as_deref(),
        Some("example-api/example-api-waypoint")
    );
    // Written without a clusterIP: one is allocated, and the user is told.
    assert_eq!(svc.vips.len(), 1);
    assert!(warnings(&s)
        .iter()
        .any(|w| w.contains("no clusterIP; shoal allocated")));
    // The egress ServiceEntry has no waypoint label: no waypoint, but a VIP for the mesh's DNS.
    assert_eq!(waypoint_of(&s, "api.vendor.example"), None);
    assert_eq!(
        s.service_by_host("api.vendor.example").unwrap().vips.len(),
        1
    );
}
