//! Shared pieces of the runtime's integration tests: real sockets on loopback, peers on plain
//! blocking threads, and a way to run each test under io_uring and under forced epoll.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use shoal_runtime::{
    copy_bidirectional, Driver, DriverChoice, ListenerSpec, PoolConfig, Runtime, RuntimeConfig,
    StartError,
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

/// A deterministic byte stream (xorshift64*), so both ends can check content, not just length.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Writes `total` bytes of `Pattern(seed)`, then shuts the write side. Returns the CRC32 sent.
pub fn send_pattern(stream: &mut TcpStream, seed: u64, total: u64) -> io::Result<u32> {
    let mut pattern = Pattern::new(seed);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(crc.finalize())
}

/// Reads until EOF; returns (bytes, CRC32).
pub fn receive_all(stream: &mut TcpStream) -> io::Result<(u64, u32)> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok((total, crc.finalize()));
        }
        crc.update(&buf[..n]);
        total += n as u64;
    }
}

/// CRC32 of the first `total` bytes of `Pattern(seed)`.
pub fn pattern_crc(seed: u64, total: u64) -> u32 {
    let mut pattern = Pattern::new(seed);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    crc.finalize()
}

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
