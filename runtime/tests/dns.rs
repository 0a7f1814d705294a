//! Name resolution off the reactors, against a real name server (dnsmasq on a loopback port):
//! answers are kept for their TTL and then asked again, and a failed refresh falls back to the
//! last answer.

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_runtime::dns::{Dns, DnsCache};

struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq answering `name` with `ip` (TTL 0, so the resolver's minimum applies).
fn dnsmasq(listen: SocketAddr, name: &str, ip: &str) -> Dnsmasq {
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            &format!("--port={}", listen.port()),
            &format!("--listen-address={}", listen.ip()),
            &format!("--address=/{name}/{ip}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (apt-get install dnsmasq-base)");
    std::thread::sleep(Duration::from_millis(300));
    Dnsmasq(child)
}

fn resolve(cache: &DnsCache, dns: &Dns, host: &str) -> Result<Vec<IpAddr>, String> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime");
    rt.block_on(async { cache.resolve(dns, host).await.map(|a| a.to_vec()) })
}

#[test]
fn answers_are_kept_for_their_ttl_then_refreshed_and_kept_through_a_failed_refresh() {
    let listen: SocketAddr = "127.61.0.53:15354".parse().expect("addr");
    let dns = Dns::start(&[listen]).expect("resolver");
    let cache = DnsCache::default();
    let first: IpAddr = "127.61.0.10".parse().expect("ip");
    let second: IpAddr = "127.61.0.20".parse().expect("ip");

    let server = dnsmasq(listen, "api.ttl.test", "127.61.0.10");
    assert_eq!(resolve(&cache, &dns, "api.ttl.test"), Ok(vec![first]));
    drop(server);
    let _server = dnsmasq(listen, "api.ttl.test", "127.61.0.20");
    // Within the answer's life the cache answers; after it, the name server is asked again.
    assert_eq!(resolve(&cache, &dns, "api.ttl.test"), Ok(vec![first]));
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(resolve(&cache, &dns, "api.ttl.test"), Ok(vec![second]));
    // A name the server does not know is an error naming it.
    let err = resolve(&DnsCache::default(), &dns, "never.ttl.test").expect_err("no answer");
    assert!(err.contains("never.ttl.test"), "{err}");
    drop(_server);
    // The name server gone: the last answer stays in use, and the lookup gives up in bounded time.
    std::thread::sleep(Duration::from_millis(1100));
    let started = Instant::now();
    assert_eq!(resolve(&cache, &dns, "api.ttl.test"), Ok(vec![second]));
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
}
