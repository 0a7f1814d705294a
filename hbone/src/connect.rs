//! The CONNECT request as Istio's ztunnel sends it, and what a server reads back out of one. Pure:
//! no I/O, tested by tables. `:authority` is `ip:port` (to a waypoint: the original service
//! `VIP:port`); `forwarded` carries the client address and, toward a service, its hostname;
//! `baggage` carries the source workload's known attributes; `traceparent` carries a trace id.

use std::net::SocketAddr;

use std::fmt::Write;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Request};

use crate::identity::Identity;

pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";
const FORWARDED_NAME: HeaderName = HeaderName::from_static(FORWARDED);
const BAGGAGE_NAME: HeaderName = HeaderName::from_static(BAGGAGE);
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);

/// The source workload's attributes that go into `baggage` (only those known are sent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// (kind, name): e.g. ("deployment", "productpage-v1") → `k8s.deployment.name`.
    pub workload: Option<(String, String)>,
    pub service_name: Option<String>,
    pub service_version: Option<String>,
}

impl Baggage {
    /// Made for every tunnel, so written into one string rather than formatted piece by piece.
    pub fn header_value(&self) -> Option<String> {
        let mut out = String::new();
        let mut add = |key: &[&str], value: &str| {
            if !out.is_empty() {
                out.push(',');
            }
            key.iter().for_each(|k| out.push_str(k));
            out.push('=');
            out.push_str(value);
        };
        if let Some(c) = &self.cluster {
            add(&["k8s.cluster.name"], c);
        }
        if let Some(n) = &self.namespace {
            add(&["k8s.namespace.name"], n);
        }
        if let Some((kind, name)) = &self.workload {
            add(&["k8s.", kind, ".name"], name);
        }
        if let Some(s) = &self.service_name {
            add(&["service.name"], s);
        }
        if let Some(v) = &self.service_version {
            add(&["service.version"], v);
        }
        (!out.is_empty()).then_some(out)
    }

    pub fn parse(value: &str) -> Baggage {
        let mut b = Baggage::default();
        for (k, v) in value.split(',').filter_map(|kv| kv.trim().split_once('=')) {
            let v = v.trim().to_string();
            match k.trim() {
                "k8s.cluster.name" => b.cluster = Some(v),
                "k8s.namespace.name" => b.namespace = Some(v),
                "service.name" => b.service_name = Some(v),
                "service.version" => b.service_version = Some(v),
                k => {
                    if let Some(kind) = k.strip_prefix("k8s.").and_then(|r| r.strip_suffix(".name"))
                    {
                        b.workload = Some((kind.to_string(), v));
                    }
                }
            }
        }
        b
    }
}

/// What the client side knows when it opens a tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundConnect {
    /// `podIP:targetPort`, or the service `VIP:port` when going to a waypoint.
    pub authority: SocketAddr,
    /// The original client's address.
    pub client: SocketAddr,
    /// The service hostname, when the client addressed a service.
    pub service_host: Option<String>,
    pub baggage: Baggage,
    /// 16-byte trace id and 8-byte span id for `traceparent`.
    pub trace: ([u8; 16], [u8; 8]),
}

impl OutboundConnect {
    /// The HTTP/2 request (h2 turns the authority-form URI into `:authority` alone, as CONNECT wants).
    ///
    /// `forwarded` and `traceparent` differ from one tunnel to the next, so they are sent as
    /// never-indexed literals: entering them in HPACK's table would only evict what repeats.
    pub fn request(&self) -> Result<Request<()>, http::Error> {
        let mut forwarded = String::with_capacity(64);
        forwarded.push_str("for=\"");
        push_socket_addr(&mut forwarded, self.client);
        forwarded.push('"');
        if let Some(host) = &self.service_host {
            forwarded.push_str(";host=");
            forwarded.push_str(host);
        }
        let mut forwarded = HeaderValue::try_from(forwarded)?;
        forwarded.set_sensitive(true);
        let mut trace = HeaderValue::try_from(traceparent(&self.trace.0, &self.trace.1))?;
        trace.set_sensitive(true);
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(socket_addr_string(self.authority))
            .header(FORWARDED_NAME, forwarded)
            .header(TRACEPARENT_NAME, trace);
        if let Some(b) = self.baggage.header_value() {
            req = req.header(BAGGAGE_NAME, b);
        }
        req.body(())
    }
}

/// `00-<32 hex trace id>-<16 hex span id>-00` (W3C Trace Context, not sampled).
pub fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8]) -> String {
    // Byte by byte into a byte buffer: formatting each byte with `{:02x}` cost about 17,000
    // instructions a tunnel, and pushing chars (each UTF-8 encoded) 1,300.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
        for b in bytes {
            out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
    }
    let mut out = Vec::with_capacity(55);
    out.extend_from_slice(b"00-");
    push_hex(&mut out, trace_id);
    out.push(b'-');
    push_hex(&mut out, span_id);
    out.extend_from_slice(b"-00");
    // Hex digits and dashes only, so always UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// `addr` as its `Display` writes it (`10.0.0.1:80`, `[::1]:80`). Why not `to_string`: the
/// formatter's padding-aware path cost about 1,700 instructions for an IPv4 address, and a tunnel
/// writes two.
fn socket_addr_string(addr: SocketAddr) -> String {
    let mut out = String::with_capacity(24);
    push_socket_addr(&mut out, addr);
    out
}

fn push_socket_addr(out: &mut String, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
            out.push(':');
            out.push_str(digits.format(v4.port()));
        }
        SocketAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// What a server learns from one CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundConnect {
    /// Who sent it (from its mTLS certificate).
    pub peer: Identity,
    /// The target, parsed from `:authority`.
    pub authority: SocketAddr,
    /// The original client, from `forwarded: for=`.
    pub client: Option<SocketAddr>,
    pub service_host: Option<String>,
    pub baggage: Baggage,
    pub traceparent: Option<String>,
}

/// Why a request on 15008 is not a tunnel we open; each maps to the status Istio answers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadConnect {
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    #[error("authority {0:?} is not ip:port")]
    BadAuthority(String),
}

impl BadConnect {
    pub fn status(&self) -> http::StatusCode {
        http::StatusCode::BAD_REQUEST
    }
}

/// Reads a CONNECT request's target and headers.
pub fn parse_inbound(
    peer: Identity,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<InboundConnect, BadConnect> {
    if method != Method::CONNECT {
        return Err(BadConnect::NotConnect(method.to_string()));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let target: SocketAddr = authority
        .parse()
        .map_err(|_| BadConnect::BadAuthority(authority.to_string()))?;
    // Looked up by `HeaderName`, not by `&str` (which is parsed into one on every look-up), and
    // read in place: only what `InboundConnect` keeps is copied.
    let text = |name: &HeaderName| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let (client, service_host) = text(&FORWARDED_NAME)
        .map(parse_forwarded)
        .unwrap_or((None, None));
    Ok(InboundConnect {
        peer,
        authority: target,
        client,
        service_host,
        baggage: text(&BAGGAGE_NAME).map(Baggage::parse).unwrap_or_default(),
        traceparent: text(&TRACEPARENT_NAME).map(str::to_string),
    })
}

/// `for="1.2.3.4:5";host=name` → (client, host).
fn parse_forwarded(value: &str) -> (Option<SocketAddr>, Option<String>) {
    let mut client = None;
    let mut host = None;
    // Only the first element counts: it is the hop that opened this tunnel.
    for pair in value.split(',').next().unwrap_or_default().split(';') {
        match pair.trim().split_once('=') {
            Some((k, v)) if k.eq_ignore_ascii_case("for") => {
                let v = v.trim().trim_matches('"');
                client = v
                    .parse()
                    .ok()
                    .or_else(|| v.trim_start_matches('[').parse().ok());
            }
            Some((k, v)) if k.eq_ignore_ascii_case("host") => {
                host = Some(v.trim().trim_matches('"').to_string())
            }
            _ => {}
        }
    }
    (client, host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Identity {
        Identity::new("cluster.local", "default", "productpage").expect("id")
    }

    /// The request Istio's ztunnel was seen to send, byte for byte in the headers that matter.
    #[test]
    fn builds_the_request_istio_sends() {
        let out = OutboundConnect {
            authority: "10.77.0.2:8080".parse().expect("addr"),
            client: "10.77.0.1:45646".parse().expect("addr"),
            service_host: Some("echo.default.svc.cluster.local".into()),
            baggage: Baggage {
                namespace: Some("default".into()),
                ..Baggage::default()
            },
            trace: ([0xab; 16], [0xcd; 8]),
        };
        let req = out.request().expect("request");
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.77.0.2:8080");
        assert_eq!(req.uri().path_and_query(), None, "CONNECT carries no :path");
        let h = req.headers();
        assert_eq!(
            h[FORWARDED],
            "for=\"10.77.0.1:45646\";host=echo.default.svc.cluster.local"
        );
        assert_eq!(h[BAGGAGE], "k8s.namespace.name=default");
        assert_eq!(
            h[TRACEPARENT],
            format!("00-{}-{}-00", "ab".repeat(16), "cd".repeat(8))
        );
        // Never indexed by HPACK: they differ per tunnel. Baggage repeats, so it is indexed.
        assert!(h[FORWARDED].is_sensitive() && h[TRACEPARENT].is_sensitive());
        assert!(!h[BAGGAGE].is_sensitive());
    }

    #[test]
    fn socket_addresses_are_written_as_display_writes_them() {
        for addr in [
            "10.77.0.1:45646",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "127.40.0.2:8080",
            "[::1]:15008",
            "[fd00::1%3]:80",
            "[2001:db8::ff00:42:8329]:443",
        ] {
            let addr: SocketAddr = addr.parse().expect("test address");
            assert_eq!(socket_addr_string(addr), addr.to_string());
        }
    }

    #[test]
    fn traceparent_is_w3c_trace_context() {
        let trace: [u8; 16] = [
            0x01, 0x12, 0x23, 0x34, 0x45, 0x56, 0x67, 0x78, 0x89, 0x9a, 0xab, 0xbc, 0xcd, 0xde,
            0xef, 0xf0,
        ];
        let span: [u8; 8] = [0x00, 0x0f, 0xf0, 0xff, 0x12, 0x34, 0xab, 0xcd];
        assert_eq!(
            traceparent(&trace, &span),
            "00-0112233445566778899aabbccddeeff0-000ff0ff1234abcd-00"
        );
        assert_eq!(
            traceparent(&[0; 16], &[0; 8]),
            format!("00-{}-{}-00", "0".repeat(32), "0".repeat(16))
        );
    }

    #[test]
    fn baggage_carries_only_what_is_known() {
        let cases = [
            (Baggage::default(), None),
            (
                Baggage {
                    cluster: Some("Kubernetes".into()),
                    namespace: Some("bookinfo".into()),
                    workload: Some(("deployment".into(), "reviews-v2".into())),
                    service_name: Some("reviews".into()),
                    service_version: Some("v2".into()),
                },
                Some("k8s.cluster.name=Kubernetes,k8s.namespace.name=bookinfo,k8s.deployment.name=reviews-v2,service.name=reviews,service.version=v2"),
            ),
            (
                Baggage {
                    workload: Some(("pod".into(), "sleep".into())),
                    service_version: Some("v1".into()),
                    ..Baggage::default()
                },
                Some("k8s.pod.name=sleep,service.version=v1"),
            ),
        ];
        for (baggage, expected) in cases {
            let value = baggage.header_value();
            assert_eq!(value.as_deref(), expected);
            if let Some(v) = value {
                assert_eq!(Baggage::parse(&v), baggage, "round trip");
            }
        }
    }

    #[test]
    fn parses_inbound_connects_and_refuses_the_rest() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_str(v).expect("value"));
            }
            h
        };
        let uri = |s: &str| s.parse::<http::Uri>().expect("uri");
        let ok = parse_inbound(
            peer(),
            &Method::CONNECT,
            &uri("10.0.0.5:9080"),
            &headers(&[
                (
                    FORWARDED,
                    "for=\"10.0.0.1:5000\";host=reviews.default.svc.cluster.local",
                ),
                (BAGGAGE, "k8s.namespace.name=default"),
            ]),
        )
        .expect("valid");
        assert_eq!(ok.authority, "10.0.0.5:9080".parse().expect("addr"));
        assert_eq!(ok.client, Some("10.0.0.1:5000".parse().expect("addr")));
        assert_eq!(
            ok.service_host.as_deref(),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(ok.baggage.namespace.as_deref(), Some("default"));

        let v6 = parse_inbound(
            peer(),
            &Method::CONNECT,
            &uri("[fd00::5]:9080"),
            &headers(&[(FORWARDED, "for=\"[fd00::1]:5000\"")]),
        )
        .expect("v6");
        assert_eq!(v6.client, Some("[fd00::1]:5000".parse().expect("addr")));

        let refusals = [
            (
                Method::GET,
                "10.0.0.5:9080",
                BadConnect::NotConnect("GET".into()),
            ),
            (
                Method::CONNECT,
                "reviews:9080",
                BadConnect::BadAuthority("reviews:9080".into()),
            ),
            (
                Method::CONNECT,
                "10.0.0.5",
                BadConnect::BadAuthority("10.0.0.5".into()),
            ),
        ];
        for (method, target, expected) in refusals {
            let err =
                parse_inbound(peer(), &method, &uri(target), &HeaderMap::new()).expect_err(target);
            assert_eq!(err, expected);
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
        }
    }
}
