//! Hot reload under a running shard set: a change on disk reaches every shard, connections opened
//! before it keep the snapshot they started with, new ones see the new one; a file that stops being
//! valid YAML keeps its last good objects.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use shoal_control::{Agent, Options};
use shoal_runtime::{DriverChoice, ListenerSpec, Runtime, RuntimeConfig};

fn service(name: &str, ip: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n")
}

const DENY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: app}
spec: {action: DENY, rules: [{}]}
";

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Shards answer each `?` with the number of services in the snapshot their connection started with.
fn start(agent: &Agent, driver: DriverChoice) -> (Runtime, SocketAddr) {
    let subscriber = agent.subscriber();
    let config = RuntimeConfig {
        shards: 2,
        driver,
        pin: false,
        drain_timeout: Duration::from_secs(2),
        ..RuntimeConfig::default()
    };
    let rt = Runtime::builder(config)
        .listener(ListenerSpec::new("reload", "127.0.0.1:0".parse().unwrap()))
        .start(move |shard| {
            let view = shard.view(subscriber.clone(), |s: &shoal_control::Snapshot| {
                s.services.len()
            });
            shard.follow(view.clone());
            async move {
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |mut stream, _| {
                            let services = view.current();
                            async move {
                                use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
                                loop {
                                    let (n, _) = stream.read(vec![0u8; 1]).await;
                                    if !matches!(n, Ok(1)) {
                                        return;
                                    }
                                    if stream
                                        .write_all(format!("{:02}", *services).into_bytes())
                                        .await
                                        .0
                                        .is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                        })
                        .await;
                }
            }
        })
        .expect("start shards");
    let addr = rt.shards()[0].listeners[0];
    (rt, addr)
}

fn ask(s: &mut TcpStream) -> String {
    s.write_all(b"?").unwrap();
    let mut answer = [0u8; 2];
    s.read_exact(&mut answer).unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_file_name(".tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn reload_reaches_every_shard(driver: DriverChoice) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), service("one", "10.0.0.1")).unwrap();
    let agent = Agent::start(dir.path(), Options::default()).expect("agent");
    let stats = agent.stats();
    let (rt, addr) = start(&agent, driver);
    let mut old: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in &mut old {
        assert_eq!(ask(s), "01");
    }

    // Written in place.
    std::fs::write(
        dir.path().join("a.yaml"),
        format!(
            "{}---\n{}",
            service("one", "10.0.0.1"),
            service("two", "10.0.0.2")
        ),
    )
    .unwrap();
    wait_for("version 2 on every shard", || {
        rt.stats()
            .shards()
            .iter()
            .all(|s| s.config_version.get() == 2)
    });
    for s in &mut old {
        assert_eq!(ask(s), "01", "an old connection keeps its snapshot");
    }
    for _ in 0..10 {
        assert_eq!(ask(&mut TcpStream::connect(addr).unwrap()), "02");
    }

    // Replaced by rename (as editors and ConfigMap updates do), in a new subdirectory.
    std::fs::create_dir(dir.path().join("more")).unwrap();
    write_atomically(
        &dir.path().join("more/b.yaml"),
        &service("three", "10.0.0.3"),
    );
    wait_for("version 3", || {
        rt.stats()
            .shards()
            .iter()
            .all(|s| s.config_version.get() >= 3)
    });
    wait_for("three services", || {
        ask(&mut TcpStream::connect(addr).unwrap()) == "03"
    });
    assert!(stats.reloads.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert_eq!(stats.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
    drop(old);
    rt.begin_drain();
    rt.join();
}

#[test]
fn reload_reaches_every_shard_io_uring() {
    reload_reaches_every_shard(DriverChoice::Auto);
}

#[test]
fn reload_reaches_every_shard_epoll() {
    reload_reaches_every_shard(DriverChoice::Epoll);
}

#[test]
fn a_file_broken_mid_edit_keeps_its_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, DENY).unwrap();
    std::fs::write(dir.path().join("svc.yaml"), service("one", "10.0.0.1")).unwrap();
    let agent = Agent::start(dir.path(), Options::default()).expect("agent");
    let initial = agent.current();
    assert_eq!(initial.value.stats.objects, 2);
    assert_eq!(initial.value.policies.len(), 1);

    // Half-written: not YAML. The DENY must not silently disappear.
    std::fs::write(
        &policy,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all\n",
    )
    .unwrap();
    wait_for("the reload", || agent.current().version >= 2);
    let current = agent.current();
    assert_eq!(
        current.value.stats.objects, 2,
        "the policy's last good version is still served"
    );
    assert_eq!(current.value.policies.len(), 1, "the DENY still applies");
    let problems: Vec<String> = current
        .value
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert!(
        problems.iter().any(|p| p.contains("not valid YAML")),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("last good version")),
        "{problems:#?}"
    );
    assert_eq!(
        agent
            .stats()
            .errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Fixed: the error goes away.
    std::fs::write(&policy, DENY).unwrap();
    wait_for("the fix", || {
        agent.current().version >= 3 && agent.current().value.problems.is_empty()
    });

    // Deleted: its objects go.
    std::fs::remove_file(&policy).unwrap();
    wait_for("the deletion", || agent.current().value.stats.objects == 1);
}

#[test]
fn an_unreadable_directory_keeps_the_last_snapshot() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("manifests");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("svc.yaml"), service("one", "10.0.0.1")).unwrap();
    let agent = Agent::start(&dir, Options::default()).expect("agent");
    std::fs::remove_dir_all(&dir).unwrap();
    wait_for("a failed reload", || {
        agent
            .stats()
            .reload_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    });
    assert_eq!(
        agent.current().value.services.len(),
        1,
        "still serving version 1"
    );
    // It comes back (as a re-created mount would): watched again and reloaded.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("svc.yaml"),
        format!(
            "{}---\n{}",
            service("one", "10.0.0.1"),
            service("two", "10.0.0.2")
        ),
    )
    .unwrap();
    wait_for("the directory to be read again", || {
        agent.current().value.services.len() == 2
    });
    std::fs::write(dir.join("more.yaml"), service("three", "10.0.0.3")).unwrap();
    wait_for("changes to be watched again", || {
        agent.current().value.services.len() == 3
    });
}
