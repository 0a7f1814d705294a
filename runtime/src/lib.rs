//! shoal's thread-per-core runtime: one pinned monoio reactor per core, each with its own
//! SO_REUSEPORT listeners, buffer pool and counters; config snapshots swapped in lock-free; graceful
//! drain; and the admin server the binaries share.
//!
//! Modules are listed in the order a connection meets them: the process's log is set up, its
//! allocator tuned and its open-file limit raised, a shard is started, binds its listeners, accepts
//! (an outbound listener may speak SOCKS5 first, or read where iptables' capture sent it), takes
//! the current snapshot, copies bytes with pooled buffers (or hands them to poll-style code such as
//! hyper through a completion stream), and is counted; drain ends it all; the
//! admin server reads the counters from outside the shards.

pub mod logging;
pub mod memory;
pub mod limits;
pub mod shard;
pub mod bell;
pub mod listener;
pub mod socks5;
pub mod capture;
pub mod dns;
pub mod snapshot;
pub mod buffer;
pub mod copy;
pub mod stream;
pub mod counters;
pub mod drain;
pub mod admin;

pub use buffer::{BufferPool, PoolConfig, PooledBuf, Tier};
pub use copy::{
    copy_bidirectional, copy_bidirectional_tallied, copy_one_way, CopyReport, Mirrored, ReadEnded,
    Tally,
};
pub use counters::{Counter, Gauge, ShardStats, StatsSet, TcpCounters};
pub use drain::{DrainSignal, ShardDrain};
pub use listener::{BindError, ListenerSpec};
pub use shard::{
    Builder, Driver, DriverChoice, Runtime, RuntimeArgs, RuntimeConfig, SchedPolicy, Shard,
    ShardInfo, StartError,
};
pub use snapshot::{channel as snapshot_channel, Publisher, ShardView, Subscriber, Versioned};
