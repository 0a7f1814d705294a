//! The data path's questions — who is this source IP, where does VIP:port go, may this identity
//! reach this workload:port — are answered without allocating. Counted with a global allocator
//! that tallies this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use shoal_control::authz::Request;
use shoal_control::{ManifestDir, Options};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn lookups_do_not_allocate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        root.join("fixtures/bookinfo-app.yaml"),
        dir.path().join("app.yaml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-from-productpage, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage]}}]
    to: [{operation: {ports: [\"9080\"]}}]
",
    )
    .unwrap();
    let snapshot = ManifestDir::new(dir.path())
        .snapshot(&Default::default(), &Options::default())
        .unwrap();
    let source: IpAddr = "127.10.0.10".parse().unwrap();
    let vip: SocketAddr = "10.96.0.11:9080".parse().unwrap();
    let reviews_pod: IpAddr = "127.10.0.11".parse().unwrap();

    let before = allocations();
    let mut allowed = 0;
    for _ in 0..1000 {
        let client = snapshot.workload_by_ip(source).expect("productpage");
        let target = snapshot.service_by_vip(vip).expect("reviews VIP");
        let endpoint = snapshot.workload(target.service.endpoints[0]);
        let port = target
            .service
            .target_port(target.port, endpoint)
            .expect("target port");
        let destination = snapshot.workload_by_ip(reviews_pod).expect("reviews pod");
        let request = Request {
            principal: Some(&client.principal),
            namespace: Some(&client.namespace),
            service_account: Some(&client.service_account),
            source_ip: Some(source),
            destination_ip: Some(reviews_pod),
            destination_port: port,
            ..Request::default()
        };
        if snapshot.authorize(destination, &request).allowed {
            allowed += 1;
        }
        let stranger = Request {
            principal: Some("cluster.local/ns/default/sa/curl"),
            ..request
        };
        assert!(!snapshot.authorize(destination, &stranger).allowed);
    }
    let after = allocations();
    assert_eq!(allowed, 1000);
    assert_eq!(
        after - before,
        0,
        "lookups and authorization allocated {} times",
        after - before
    );
}
