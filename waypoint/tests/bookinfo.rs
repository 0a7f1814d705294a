//! The seeds' scenario end to end: client → ztunnel → waypoint → ztunnel → backend, with curl.

mod common;
use common::*;

#[test]
fn the_reviews_split_and_the_productpage_policy_hold() {
    const NET: u8 = 40;
    let mesh = Mesh::start(NET);

    // productpage: curl's GET passes; its POST and another caller's GET get 403 from the waypoint.
    let (code, r) = mesh.curl("127.40.0.1", "http://10.40.0.1:9080/", &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(status_of(&r), Some(200), "{r}");
    assert_eq!(
        header_of(&r, "x-backend").as_deref(),
        Some("productpage-v1"),
        "{r}"
    );
    let (_, r) = mesh.curl(
        "127.40.0.1",
        "http://10.40.0.1:9080/",
        &["-X", "POST", "-d", "x"],
    );
    assert_eq!(status_of(&r), Some(403), "{r}");
    assert!(r.contains("RBAC: access denied"), "{r}");
    let (_, r) = mesh.curl("127.40.0.4", "http://10.40.0.1:9080/", &[]);
    assert_eq!(status_of(&r), Some(403), "{r}");

    // reviews: 90/10 over 400 requests on one keep-alive connection.
    let url = on(NET, "http://10.40.0.2:9080/");
    let urls: Vec<String> = (0..400).map(|_| url.clone()).collect();
    let mut args: Vec<&str> = vec!["-s", "-w", "%{http_code} %header{x-backend}\n"];
    for u in &urls {
        args.extend(["-o", "/dev/null", u]);
    }
    let out = std::process::Command::new("curl")
        .args([
            "--interface",
            &on(NET, "127.40.0.1"),
            "--socks5-hostname",
            &mesh.a.socks5_addr().to_string(),
        ])
        .args(&args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut v1, mut v2, mut other) = (0, 0, 0);
    for line in text.lines() {
        match line {
            "200 reviews-v1" => v1 += 1,
            "200 reviews-v2" => v2 += 1,
            _ => other += 1,
        }
    }
    assert_eq!(other, 0, "{text}");
    assert_eq!(v1 + v2, 400);
    // 10% of 400 is 40, sd 6: within 4 sd.
    assert!((16..=64).contains(&v2), "v1={v1} v2={v2}");

    // The waypoint's metrics say what happened.
    let text = admin_get(mesh.waypoint.admin.local_addr(), "/metrics");
    // What `shoalctl waypoint-stats` prints, from scrapes around the run.
    let body = |t: &str| {
        t.split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string())
    };
    let before = shoal_control::stats::totals("").unwrap();
    let after = shoal_control::stats::totals(&body(&text)).unwrap();
    let figures = shoal_control::stats::between(&before, &after, 2.0);
    let reviews = figures
        .iter()
        .find(|f| f.service.starts_with("reviews."))
        .expect("reviews in the stats");
    assert_eq!(reviews.requests, 400);
    assert_eq!(reviews.success_rate, Some(1.0));
    assert!(
        reviews.p99_ms.is_some_and(|p| p > 0.0 && p < 1000.0),
        "{reviews:?}"
    );
    let productpage = figures
        .iter()
        .find(|f| f.service.starts_with("productpage."))
        .expect("productpage in the stats");
    assert_eq!(productpage.requests, 3, "{productpage:?}");
    assert_eq!(
        productpage.success_rate,
        Some(1.0),
        "403s are not server errors"
    );
    assert!(
        metric(
            &text,
            "istio_requests_total",
            &[
                "response_code=\"403\"",
                "destination_service_name=\"productpage\""
            ]
        ) >= 2.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "istio_requests_total",
            &[
                "response_code=\"200\"",
                "destination_workload=\"reviews\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/curl\""
            ]
        ) >= 400.0,
        "{text}"
    );
    mesh.stop();
}

/// Sends `n` requests on one keep-alive connection from curl's pod: (status, backend) per request.
fn many(mesh: &Mesh, url: &str, n: usize) -> Vec<String> {
    let url = on(mesh.net, url);
    let mut args: Vec<String> = vec![
        "-s".into(),
        "-w".into(),
        "%{http_code} %header{x-backend}\n".into(),
    ];
    for _ in 0..n {
        args.extend(["-o".into(), "/dev/null".into(), url.clone()]);
    }
    let out = std::process::Command::new("curl")
        .args([
            "--interface",
            &on(mesh.net, "127.40.0.1"),
            "--socks5-hostname",
            &mesh.a.socks5_addr().to_string(),
        ])
        .args(&args)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn changing_the_split_under_load_fails_no_request() {
    const NET: u8 = 43;
    let mesh = Mesh::start(NET);
    let manifests = mesh.manifests().join("mesh.yaml");
    let before = mesh.waypoint.agent.current().version;
    let results = std::thread::scope(|s| {
        let load = s.spawn(|| many(&mesh, "http://10.40.0.2:9080/", 1500));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let text = std::fs::read_to_string(&manifests).unwrap();
        let text = text
            .replace("weight: 90}", "weight: 50}")
            .replace("weight: 10}", "weight: 50}");
        std::fs::write(&manifests, text).unwrap();
        wait_for("the waypoint to load the new split", || {
            mesh.waypoint.agent.current().version != before
        });
        load.join().unwrap()
    });
    assert_eq!(results.len(), 1500);
    let failed: Vec<&String> = results
        .iter()
        .filter(|r| !r.starts_with("200 reviews-v"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    // After the change: 50/50 within 4 sd over 400 requests (sd 10).
    let after = many(&mesh, "http://10.40.0.2:9080/", 400);
    let v2 = after.iter().filter(|r| *r == "200 reviews-v2").count();
    assert!((160..=240).contains(&v2), "v2={v2} of 400 after the change");
    mesh.stop();
}
