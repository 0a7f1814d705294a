//! Egress as the seeds describe it: a ServiceEntry labelled to use the waypoint. A real name server
//! (dnsmasq) answers for the external host, a real HTTPS server (nginx, with its own CA) stands in
//! for the external API; the app speaks plain HTTP to port 80 and the waypoint originates TLS to
//! 443, applies a path restriction, and counts the traffic. ztunnel's DNS proxy answers the host
//! with its VIP and forwards other names.

mod common;
use common::*;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};

use shoal_perf::testkit::{make_ca, start_nginx_https, Started};
use std::time::Duration;

const NET: u8 = 52;

/// The seeds' ServiceEntry (`000`/`001`: host, port 80, DNS, the waypoint label), with the
/// TLS-origination port mapping, a DestinationRule that originates TLS, and a path restriction.
const EGRESS: &str = r#"
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-svc-http
  namespace: bookinfo
  labels:
    istio.io/use-waypoint: waypoint
spec:
  hosts:
  - aliyun.com
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
    targetPort: 443
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: external-svc-http, namespace: bookinfo}
spec:
  host: aliyun.com
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: CA_PEM}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: external-api-paths, namespace: bookinfo}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: external-svc-http}]
  action: ALLOW
  rules:
  - to: [{operation: {methods: ["GET"], paths: ["/v1/*"]}}]
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: wrong-ca
  namespace: bookinfo
  labels:
    istio.io/use-waypoint: waypoint
spec:
  hosts: [wrong.aliyun.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wrong-ca, namespace: bookinfo}
spec:
  host: wrong.aliyun.com
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: OTHER_CA_PEM, sni: aliyun.com}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api-static, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [static.api.test]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: STATIC
  endpoints: [{address: API_IP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-static, namespace: bookinfo}
spec:
  host: static.api.test
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: CA_PEM, sni: aliyun.com}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api-unverified, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [unverified.api.test]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: STATIC
  endpoints: [{address: API_IP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-unverified, namespace: bookinfo}
spec:
  host: unverified.api.test
  trafficPolicy:
    tls: {mode: SIMPLE, insecureSkipVerify: true}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api-silent, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [silent.api.test]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: SILENT_IP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-silent, namespace: bookinfo}
spec:
  host: silent.api.test
  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 200ms}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api-none, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [none.aliyun.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-none, namespace: bookinfo}
spec:
  host: none.aliyun.com
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: CA_PEM, sni: aliyun.com}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api-rr, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [rr.aliyun.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: DNS_ROUND_ROBIN
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-rr, namespace: bookinfo}
spec:
  host: rr.aliyun.com
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: CA_PEM, sni: aliyun.com}
"#;

fn start_dnsmasq(dir: &Path, listen: SocketAddr, records: &[(&str, &str)]) -> Started {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        &format!("--port={}", listen.port()),
        &format!("--listen-address={}", listen.ip()),
        &format!("--pid-file={}/dnsmasq.pid", dir.display()),
    ]);
    for (name, ip) in records {
        cmd.arg(format!("--address=/{name}/{ip}"));
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (apt-get install dnsmasq-base)");
    let started = Started(child);
    wait_for("dnsmasq", || query_a(listen, "aliyun.com").is_some());
    started
}

/// The A records a name server gives for `name` (a hand-built query: no DNS tools needed).
fn query_a(server: SocketAddr, name: &str) -> Option<Vec<std::net::Ipv4Addr>> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    socket.send_to(&q, server).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    let answer = &buf[..n];
    if answer.len() < 12 || answer[0..2] != [0x12, 0x34] {
        return None;
    }
    let count = u16::from_be_bytes([answer[6], answer[7]]);
    // Skip the question (name, type, class), then read each answer's RDATA when it is 4 bytes.
    let mut at = 12;
    while at < answer.len() && answer[at] != 0 {
        at += answer[at] as usize + 1;
    }
    at += 5;
    let mut found = Vec::new();
    for _ in 0..count {
        // A compressed name pointer (2 bytes), type, class, TTL, length.
        if at + 12 > answer.len() {
            break;
        }
        let len = u16::from_be_bytes([answer[at + 10], answer[at + 11]]) as usize;
        let data = at + 12;
        if len == 4 && data + 4 <= answer.len() {
            found.push(std::net::Ipv4Addr::new(
                answer[data],
                answer[data + 1],
                answer[data + 2],
                answer[data + 3],
            ));
        }
        at = data + len;
    }
    Some(found)
}

#[test]
fn seeds_egress_with_dns_tls_origination_and_a_path_restriction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path();
    make_ca(certs, "api", Some("aliyun.com")).expect("certificates");
    make_ca(certs, "other", None).expect("certificates");
    let api = on(NET, "127.40.0.80");
    let _nginx = start_nginx_https(
        certs,
        &format!("{api}:443"),
        r#"location /v1/ { add_header x-served-by nginx-tls; return 200 "v1 $request_method $uri sni=$ssl_server_name\n"; }
    location / { return 200 "root\n"; }"#,
    )
    .expect("nginx");
    let dns_addr: SocketAddr = on(NET, "127.40.0.53:15353").parse().expect("addr");
    let _dnsmasq = start_dnsmasq(
        certs,
        dns_addr,
        &[
            ("aliyun.com", &api),
            ("plain.example.test", &on(NET, "127.40.0.81")),
        ],
    );
    let manifests = EGRESS
        .replace(
            "OTHER_CA_PEM",
            &certs.join("other-ca.pem").display().to_string(),
        )
        .replace("CA_PEM", &certs.join("api-ca.pem").display().to_string())
        .replace("API_IP", &api)
        .replace("SILENT_IP", &on(NET, "127.40.0.90"));
    let mesh = Mesh::start_with_dns(NET, |m| format!("{m}{manifests}"), &[dns_addr]);

    // The app speaks HTTP to port 80; the waypoint resolves the host, originates TLS to 443
    // (SNI from the host, verified against the DestinationRule's CA) and the API answers.
    let (code, r) = mesh.curl("127.40.0.1", "http://aliyun.com/v1/items", &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(status_of(&r), Some(200), "{r}");
    assert_eq!(
        header_of(&r, "x-served-by").as_deref(),
        Some("nginx-tls"),
        "{r}"
    );
    assert!(r.contains("v1 GET /v1/items sni=aliyun.com"), "{r}");

    // The path restriction: only GET /v1/* reaches the API.
    let (_, r) = mesh.curl("127.40.0.1", "http://aliyun.com/admin", &[]);
    assert_eq!(status_of(&r), Some(403), "{r}");
    let (_, r) = mesh.curl("127.40.0.1", "http://aliyun.com/v1/items", &["-X", "POST"]);
    assert_eq!(status_of(&r), Some(403), "{r}");

    // resolution NONE (the host resolved as the app would) and DNS_ROUND_ROBIN reach it too.
    for host in ["none.aliyun.com", "rr.aliyun.com"] {
        let (_, r) = mesh.curl("127.40.0.1", &format!("http://{host}/v1/x"), &[]);
        assert_eq!(status_of(&r), Some(200), "{host}: {r}");
    }

    // A STATIC endpoint in an ambient namespace is still outside the mesh (MESH_EXTERNAL): plain
    // TCP and originated TLS, not HBONE.
    let (_, r) = mesh.curl("127.40.0.1", "http://static.api.test/v1/static", &[]);
    assert_eq!(status_of(&r), Some(200), "{r}");

    // insecureSkipVerify, when written, accepts a certificate nobody vouches for (and for another
    // name); without it the system's roots refuse the test CA.
    let (_, r) = mesh.curl("127.40.0.1", "http://unverified.api.test/v1/any", &[]);
    assert_eq!(status_of(&r), Some(200), "{r}");

    // connectTimeout 200 ms against a server that never answers the SYN (its accept queue is
    // full): each try gives up at 200 ms, the mesh default tries three times, then 503 UF,URX —
    // not the 10 s default.
    let silent =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let silent_addr: SocketAddr = on(NET, "127.40.0.90:80").parse().expect("addr");
    silent.bind(&silent_addr.into()).expect("bind");
    silent.listen(0).expect("listen");
    let _queued: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&silent_addr, Duration::from_millis(100)).ok()
        })
        .collect();
    let started = std::time::Instant::now();
    let (_, r) = mesh.curl("127.40.0.1", "http://silent.api.test/", &[]);
    let took = started.elapsed();
    assert_eq!(status_of(&r), Some(503), "{r}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let text = admin_get(mesh.waypoint.admin.local_addr(), "/metrics");
    let flags = [
        "destination_service=\"silent.api.test\"",
        "response_flags=\"UF,URX\"",
    ];
    assert_eq!(metric(&text, "istio_requests_total", &flags), 1.0);

    // A server whose certificate the DestinationRule's CA did not sign is refused: 503 UF.
    let (_, r) = mesh.curl("127.40.0.1", "http://wrong.aliyun.com/v1/items", &[]);
    assert_eq!(status_of(&r), Some(503), "{r}");

    // ztunnel's DNS proxy: the ServiceEntry host is the mesh's (its VIP); other names are
    // forwarded to the name server.
    let proxy = mesh.a.dns_proxy.expect("DNS proxy");
    let vip = query_a(proxy, "aliyun.com").expect("answer");
    assert_eq!(vip.len(), 1, "{vip:?}");
    assert_eq!(
        vip[0].octets()[..2],
        [240, 240],
        "an allocated VIP: {vip:?}"
    );
    let forwarded = query_a(proxy, "plain.example.test").expect("forwarded answer");
    assert_eq!(
        forwarded,
        vec![on(NET, "127.40.0.81")
            .parse::<std::net::Ipv4Addr>()
            .expect("ip")]
    );
    let service = query_a(proxy, "productpage.bookinfo.svc.cluster.local").expect("answer");
    assert_eq!(
        service,
        vec![on(NET, "10.40.0.1")
            .parse::<std::net::Ipv4Addr>()
            .expect("ip")]
    );

    // An app that resolved through the proxy dials the VIP, as a pod would; one that sends the
    // VIP as its Host still gets the ServiceEntry's host as the TLS server name.
    let (_, r) = mesh.curl(
        "127.40.0.1",
        &format!("http://{}:80/v1/by-vip", vip[0]),
        &["-H", "host: aliyun.com"],
    );
    assert_eq!(status_of(&r), Some(200), "{r}");
    let (_, r) = mesh.curl("127.40.0.1", &format!("http://{}:80/v1/by-ip", vip[0]), &[]);
    assert_eq!(status_of(&r), Some(200), "{r}");
    assert!(r.contains("sni=aliyun.com"), "{r}");

    // The waypoint counts the egress traffic by the ServiceEntry's host.
    let text = admin_get(mesh.waypoint.admin.local_addr(), "/metrics");
    let count = |code: &str| {
        metric(
            &text,
            "istio_requests_total",
            &[
                "destination_service=\"aliyun.com\"",
                &format!("response_code=\"{code}\""),
            ],
        )
    };
    assert_eq!(count("200"), 3.0, "{text}");
    assert_eq!(count("403"), 2.0);

    mesh.stop();
}
