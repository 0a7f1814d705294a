//! Shared pieces of the runtime's integration tests: real sockets on loopback, peers on plain
//! blocking threads, and a way to run each test under io_uring and under forced epoll.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use shoal_runtime::{
    copy_bidirectional, Driver, DriverChoice, ListenerSpec, PoolConfig, Runtime, RuntimeConfig,
    SchedPolicy, StartError,
};

/// Generates `<name>_io_uring` and `<name>_epoll` tests from `fn <name>(driver: DriverChoice)`.
#[macro_export]
macro_rules! both_drivers {
    ($($name:ident),* $(,)?) => {
        mod on_io_uring {
            $(#[test] fn $name() { super::$name(shoal_runtime::DriverChoice::Auto) })*
        }
        mod on_epoll {
            $(#[test] fn $name() { super::$name(shoal_runtime::DriverChoice::Epoll) })*
        }
    };
}

pub fn config(driver: DriverChoice, shards: usize) -> RuntimeConfig {
    RuntimeConfig {
        shards,
        driver,
        pin: false,
        drain_timeout: Duration::from_secs(5),
        pool: PoolConfig::default(),
        sched_policy: SchedPolicy::Normal,
        replace: false,
    }
}

/// The driver a shard must report for `choice` on this machine.
pub fn expected_driver(choice: DriverChoice) -> Driver {
    match choice {
        DriverChoice::Epoll => Driver::Epoll,
        DriverChoice::Auto if monoio::utils::detect_uring() => Driver::IoUring,
        DriverChoice::Auto => Driver::Epoll,
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("literal address")
}

/// Echoes every connection back on itself (through the runtime's copy, so half-close is kept).
pub fn start_echo(config: RuntimeConfig) -> Result<Runtime, StartError> {
    Runtime::builder(config)
        .listener(ListenerSpec::new("echo", loopback()))
        .start(|shard| async move {
            for listener in shard.take_listeners() {
                shard
                    .serve(listener, |stream, _peer| {
                        let pool = shard.pool().clone();
                        async move {
                            use monoio::io::Splitable;
                            let (r, w) = stream.into_split();
                            let bytes = std::cell::Cell::new(0);
                            let _ = shoal_runtime::copy_one_way(r, w, &pool, &bytes).await;
                        }
                    })
                    .await;
            }
        })
}

/// A TCP proxy on the runtime: each accepted connection is copied to `upstream`; the copy's report
/// (or the connect error) is sent on `reports`.
pub fn start_proxy(
    config: RuntimeConfig,
    upstream: SocketAddr,
    reports: mpsc::Sender<io::Result<shoal_runtime::CopyReport>>,
) -> Result<Runtime, StartError> {
    Runtime::builder(config)
        .listener(ListenerSpec::new("proxy", loopback()))
        .start(move |shard| {
            let reports = reports.clone();
            async move {
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |client, _peer| {
                            let pool = shard.pool().clone();
                            let reports = reports.clone();
                            async move {
                                let server =
                                    match monoio::net::TcpStream::connect_addr(upstream).await {
                                        Ok(s) => s,
                                        Err(e) => {
                                            let _ = reports.send(Err(e));
                                            return;
                                        }
                                    };
                                let (report, result) =
                                    copy_bidirectional(client, server, &pool).await;
                                let _ = reports.send(result.map(|()| report));
                            }
                        })
                        .await;
                }
            }
        })
}

pub fn listen_addr(rt: &Runtime) -> SocketAddr {
    rt.shards()[0].listeners[0]
}

#[path = "pattern.rs"]
mod pattern;
#[allow(unused_imports)]
pub use pattern::*;

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the runtime's listener");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

/// One request/response on an echo connection.
pub fn echo_once(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).expect("write");
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).expect("read echo");
    back
}
