//! The runtime's echo server: every connection's bytes are copied back to it through the runtime's
//! pooled copy (so half-close and backpressure are the runtime's), with the admin server beside it.

use std::net::SocketAddr;
use std::sync::Arc;

use monoio::io::Splitable;
use prometheus_client::registry::Registry;
use shoal_runtime::admin::{AdminServer, AdminSource, RuntimeCollector};
use shoal_runtime::{
    copy_one_way, DrainSignal, ListenerSpec, Runtime, RuntimeConfig, ShardInfo, StartError,
};

/// A started echo server.
pub struct EchoServer {
    pub runtime: Runtime,
    pub admin: Option<AdminServer>,
}

impl EchoServer {
    pub fn start(
        config: RuntimeConfig,
        listen: SocketAddr,
        admin: Option<SocketAddr>,
    ) -> Result<Self, StartError> {
        Self::start_mode(config, listen, admin, false)
    }

    /// As `start`; with `discard`, reads everything and sends nothing back (a sink for one-way
    /// throughput).
    pub fn start_mode(
        config: RuntimeConfig,
        listen: SocketAddr,
        admin: Option<SocketAddr>,
        discard: bool,
    ) -> Result<Self, StartError> {
        let runtime = Runtime::builder(config.clone())
            .listener(ListenerSpec::new("echo", listen))
            .start(move |shard| async move {
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |stream, _peer| {
                            let pool = shard.pool().clone();
                            async move {
                                let (reader, writer) = stream.into_split();
                                let echoed = std::cell::Cell::new(0);
                                let copied = if discard {
                                    copy_one_way(reader, Discard, &pool, &echoed).await
                                } else {
                                    copy_one_way(reader, writer, &pool, &echoed).await
                                };
                                if let Err(e) = copied {
                                    tracing::debug!(error = %e, bytes = echoed.get(), "echo connection ended");
                                }
                            }
                        })
                        .await;
                }
            })?;
        let admin = match admin {
            Some(addr) => {
                let mut registry = Registry::default();
                registry.register_collector(Box::new(RuntimeCollector::new(&runtime)));
                let source = EchoAdmin {
                    drain: runtime.drain_signal(),
                    shards: runtime.shards().to_vec(),
                    config: format!("{config:?}"),
                };
                Some(AdminServer::start(addr, registry, Arc::new(source))?)
            }
            None => None,
        };
        Ok(EchoServer { runtime, admin })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.runtime.shards()[0].listeners[0]
    }
}

struct EchoAdmin {
    drain: DrainSignal,
    shards: Vec<ShardInfo>,
    config: String,
}

impl AdminSource for EchoAdmin {
    fn ready(&self) -> Result<(), String> {
        if self.drain.is_draining() {
            Err("draining".into())
        } else {
            Ok(())
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::json!({
            "role": "echo",
            "shards": self.shards,
            "runtime": self.config,
            "draining": self.drain.is_draining(),
        })
    }
}

/// A writer that accepts everything and keeps nothing.
struct Discard;

impl monoio::io::AsyncWriteRent for Discard {
    async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        (Ok(buf.bytes_init()), buf)
    }

    async fn writev<T: monoio::buf::IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        let len = (0..buf.read_iovec_len())
            .map(|i| {
                // SAFETY: indexes within read_iovec_len into the iovec array the buffer provides.
                unsafe { (*buf.read_iovec_ptr().add(i)).iov_len }
            })
            .sum();
        (Ok(len), buf)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
