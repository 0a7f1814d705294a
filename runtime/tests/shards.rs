//! Shards start on the requested driver, spread connections, refuse bad listeners clearly, fall
//! back to epoll when io_uring is refused, and see every published snapshot.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use shoal_runtime::{
    snapshot_channel, Driver, DriverChoice, ListenerSpec, Runtime, RuntimeConfig, SchedPolicy,
    StartError,
};

both_drivers!(
    connections_spread_across_all_shards,
    snapshot_reaches_every_shard_and_old_connections_keep_theirs,
    a_closed_connection_is_not_held_open_by_a_child_process
);

fn connections_spread_across_all_shards(driver: DriverChoice) {
    let rt = start_echo(config(driver, 2)).expect("start");
    assert_eq!(rt.shards().len(), 2);
    for shard in rt.shards() {
        assert_eq!(
            shard.driver,
            expected_driver(driver),
            "shard {} driver",
            shard.index
        );
    }
    let addr = listen_addr(&rt);
    let clients: Vec<_> = (0..200u32)
        .map(|i| {
            let mut s = connect(addr);
            assert_eq!(echo_once(&mut s, &i.to_le_bytes()), i.to_le_bytes());
            s
        })
        .collect();
    let per_shard: Vec<u64> = rt
        .stats()
        .shards()
        .iter()
        .map(|s| s.connections_accepted.get())
        .collect();
    assert_eq!(
        per_shard.iter().sum::<u64>(),
        200,
        "every connection accepted once: {per_shard:?}"
    );
    assert!(
        per_shard.iter().all(|&n| n >= 40),
        "SO_REUSEPORT spreads connections: {per_shard:?}"
    );
    drop(clients);
    rt.begin_drain();
    rt.join();
}

fn snapshot_reaches_every_shard_and_old_connections_keep_theirs(driver: DriverChoice) {
    let (publisher, subscriber) = snapshot_channel(String::from("v1"));
    let rt = Runtime::builder(config(driver, 2))
        .listener(ListenerSpec::new("snap", loopback()))
        .start(move |shard| {
            let view = shard.view(subscriber.clone(), |s: &String| s.clone());
            shard.follow(view.clone());
            async move {
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |mut stream, _| {
                            // The connection's config is fixed when it is accepted.
                            let config = view.current();
                            async move {
                                use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
                                loop {
                                    let (n, _) = stream.read(vec![0u8; 1]).await;
                                    if !matches!(n, Ok(1)) {
                                        return;
                                    }
                                    let (w, _) = stream.write_all(config.as_bytes().to_vec()).await;
                                    if w.is_err() {
                                        return;
                                    }
                                }
                            }
                        })
                        .await;
                }
            }
        })
        .expect("start");
    let addr = listen_addr(&rt);
    let ask = |s: &mut std::net::TcpStream| -> String {
        s.write_all(b"?").expect("ask");
        let mut answer = [0u8; 2];
        s.read_exact(&mut answer).expect("answer");
        String::from_utf8_lossy(&answer).into_owned()
    };
    let mut old: Vec<_> = (0..20).map(|_| connect(addr)).collect();
    for s in &mut old {
        assert_eq!(ask(s), "v1");
    }
    assert_eq!(publisher.publish(String::from("v2")), 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = rt.stats();
    while stats.shards().iter().any(|s| s.config_version.get() != 2) {
        assert!(
            Instant::now() < deadline,
            "every shard should take version 2 without any connection"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for s in &mut old {
        assert_eq!(
            ask(s),
            "v1",
            "a connection opened before the swap keeps its snapshot"
        );
    }
    for _ in 0..20 {
        assert_eq!(ask(&mut connect(addr)), "v2");
    }
    drop(old);
    rt.begin_drain();
    rt.join();
}

#[test]
fn a_taken_port_is_refused_with_the_address_and_the_cause() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken = holder.local_addr().expect("addr");
    let err = match start_echo_on(taken) {
        Err(e) => e,
        Ok(_) => panic!("binding a taken port must fail"),
    };
    let message = err.to_string();
    assert!(matches!(err, StartError::Bind(_)), "{message}");
    assert!(
        message.contains(&taken.to_string()),
        "names the address: {message}"
    );
    assert!(
        message.contains("another process already listens"),
        "says why: {message}"
    );
}

#[test]
fn a_port_shared_with_so_reuseport_by_someone_else_is_still_refused() {
    use socket2::{Domain, Socket, Type};
    let holder = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    holder.set_reuse_port(true).expect("reuseport");
    holder.bind(&loopback().into()).expect("bind");
    holder.listen(16).expect("listen");
    let taken = holder
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let err = start_echo_on(taken)
        .err()
        .expect("must not silently share the port");
    assert!(err.to_string().contains(&taken.to_string()), "{err}");
}

#[test]
fn an_address_not_on_this_host_is_refused_with_the_address_and_the_cause() {
    // TEST-NET-1 (RFC 5737): never assigned to a host; nothing is sent, the bind alone fails.
    let foreign: SocketAddr = "192.0.2.1:15008".parse().expect("literal");
    let err = start_echo_on(foreign)
        .err()
        .expect("binding a foreign address must fail");
    let message = err.to_string();
    assert!(
        message.contains("192.0.2.1:15008"),
        "names the address: {message}"
    );
    assert!(
        message.contains("no interface on this host has this address"),
        "says why: {message}"
    );
}

fn start_echo_on(addr: SocketAddr) -> Result<Runtime, StartError> {
    Runtime::builder(config(DriverChoice::Auto, 2))
        .listener(ListenerSpec::new("echo", addr))
        .start(|shard| async move { drop(shard.take_listeners()) })
}

/// io_uring made unavailable to the shard threads (a seccomp filter that answers EPERM to
/// io_uring_setup, as container runtimes do): the shards fall back to epoll and serve.
#[test]
fn shards_fall_back_to_epoll_when_io_uring_is_refused() {
    let rt = Runtime::builder(config(DriverChoice::Auto, 2))
        .listener(ListenerSpec::new("echo", loopback()))
        .on_thread_start(|_shard| deny_io_uring_on_this_thread())
        .start(|shard| async move {
            for listener in shard.take_listeners() {
                shard
                    .serve(listener, |stream, _| {
                        let pool = shard.pool().clone();
                        async move {
                            use monoio::io::Splitable;
                            let (r, w) = stream.into_split();
                            let _ =
                                shoal_runtime::copy_one_way(r, w, &pool, &std::cell::Cell::new(0))
                                    .await;
                        }
                    })
                    .await;
            }
        })
        .expect("start despite io_uring being refused");
    for shard in rt.shards() {
        assert_eq!(
            shard.driver,
            Driver::Epoll,
            "shard {} must have fallen back",
            shard.index
        );
    }
    let addr = listen_addr(&rt);
    for i in 0..50u32 {
        assert_eq!(
            echo_once(&mut connect(addr), &i.to_be_bytes()),
            i.to_be_bytes()
        );
    }
    rt.begin_drain();
    rt.join();
}

fn deny_io_uring_on_this_thread() {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    let arch = std::env::consts::ARCH
        .try_into()
        .expect("a seccomp-supported architecture");
    let filter = SeccompFilter::new(
        [(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .expect("filter");
    let program: BpfProgram = filter.try_into().expect("compile filter");
    // Applies to the calling thread only (no TSYNC): the rest of the test process keeps io_uring.
    seccompiler::apply_filter(&program).expect("apply seccomp filter");
}

/// An accepted connection is close-on-exec: a child process started while it is open (a test's
/// curl, a health-check script) does not keep it open after the shard closes it.
fn a_closed_connection_is_not_held_open_by_a_child_process(driver: DriverChoice) {
    let rt = Runtime::builder(config(driver, 1))
        .listener(ListenerSpec::new("close", loopback()))
        .start(|shard| async move {
            for listener in shard.take_listeners() {
                shard
                    .serve(listener, |stream, _peer| async move {
                        use monoio::io::AsyncReadRent;
                        let mut stream = stream;
                        let _ = stream.read(vec![0u8; 1]).await;
                        // Time for the test to start its child while the connection is open.
                        monoio::time::sleep(Duration::from_millis(300)).await;
                    })
                    .await;
            }
        })
        .expect("start");
    let mut client = connect(listen_addr(&rt));
    client.write_all(b"x").expect("write");
    std::thread::sleep(Duration::from_millis(100));
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .expect("sleep");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let read = client.read(&mut buf);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(read, Ok(0)),
        "EOF once the shard closed it, not when the child exits: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    rt.begin_drain();
    rt.join();
}

/// The shard threads run under the policy asked for, and report it; the threads that are not
/// shards (here, the test's) are left as they were.
#[test]
fn shard_threads_run_under_the_scheduling_policy_asked_for() {
    for (asked, kernel_policy) in [
        (SchedPolicy::Normal, libc::SCHED_OTHER),
        (SchedPolicy::Batch, libc::SCHED_BATCH),
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let rt = Runtime::builder(RuntimeConfig {
            sched_policy: asked,
            ..config(DriverChoice::Auto, 2)
        })
        .start(move |_shard| {
            // SAFETY: pid 0 is this shard's thread.
            let _ = tx.send(unsafe { libc::sched_getscheduler(0) });
            async {}
        })
        .expect("start");
        for shard in rt.shards() {
            assert_eq!(shard.sched_policy, asked, "shard {} reports", shard.index);
        }
        for _ in 0..2 {
            let seen = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("a shard ran");
            assert_eq!(
                seen, kernel_policy,
                "{asked:?}: the kernel's policy for a shard"
            );
        }
        // SAFETY: pid 0 is the test's own thread.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        rt.begin_drain();
        rt.join();
    }
}
