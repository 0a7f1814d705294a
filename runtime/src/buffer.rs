//! Per-shard pools of owned buffers for io_uring reads and writes, in two tiers, each with a hard
//! cap. A copy starts on a small buffer and moves to a large one only while data keeps filling it,
//! so an idle connection holds a few KiB and a bulk transfer makes few syscalls. Buffers go back
//! to their pool when dropped; once the pool is warm the copy path allocates nothing.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use monoio::buf::{IoBuf, IoBufMut};

use crate::counters::ShardStats;

/// Plaintext bytes in one full TLS record (RFC 8446 §5.1: 2^14). rustls cuts what it is given into
/// records of this size, so buffers that are multiples of it produce full records.
pub const TLS_RECORD_PLAINTEXT_BYTES: usize = 16 * 1024;

/// The initial HTTP/2 SETTINGS_MAX_FRAME_SIZE (RFC 9113 §6.5.2): what a DATA frame carries until a
/// peer raises it.
pub const H2_DEFAULT_FRAME_BYTES: usize = 16 * 1024;

/// Small tier: what every copy starts with and an idle connection keeps. One page holds a typical
/// HTTP request head or RPC message, so request/response traffic never needs more.
pub const SMALL_BUFFER_BYTES: usize = 4 * 1024;

/// Large tier: bulk transfers. Four full TLS records, or four default-size HTTP/2 DATA frames, per
/// read: enough to amortise the syscall, small enough that a shard's cap stays modest.
pub const LARGE_BUFFER_BYTES: usize = 4 * TLS_RECORD_PLAINTEXT_BYTES;
const _: () = assert!(
    LARGE_BUFFER_BYTES.is_multiple_of(H2_DEFAULT_FRAME_BYTES),
    "whole HTTP/2 frames per buffer"
);

/// Buffer tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Small,
    Large,
}

impl Tier {
    pub fn bytes(self) -> usize {
        match self {
            Tier::Small => SMALL_BUFFER_BYTES,
            Tier::Large => LARGE_BUFFER_BYTES,
        }
    }
}

/// Caps per shard, in buffers. Each open copy direction holds one small buffer (two per proxied
/// connection) or, while bulk data flows, one large one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// 32,768 × 4 KiB = 128 MiB at most: 16,384 proxied connections per shard, all idle.
    pub small_buffers_max: usize,
    /// 1,024 × 64 KiB = 64 MiB at most: 512 proxied connections per shard in full bulk both ways.
    /// Past it, copies carry on with their small buffer (slower, never stuck).
    pub large_buffers_max: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            small_buffers_max: 32 * 1024,
            large_buffers_max: 1024,
        }
    }
}

impl PoolConfig {
    /// The most memory the pool can hold, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.small_buffers_max * SMALL_BUFFER_BYTES + self.large_buffers_max * LARGE_BUFFER_BYTES
    }
}

struct TierPool {
    max: usize,
    free: RefCell<Vec<Vec<u8>>>,
    in_use: Cell<usize>,
    waiters: RefCell<VecDeque<Waker>>,
}

struct PoolInner {
    small: TierPool,
    large: TierPool,
    stats: Arc<ShardStats>,
}

impl PoolInner {
    fn tier(&self, tier: Tier) -> &TierPool {
        match tier {
            Tier::Small => &self.small,
            Tier::Large => &self.large,
        }
    }
}

/// One shard's buffer pool. `!Send`: it lives and dies on its shard.
#[derive(Clone)]
pub struct BufferPool(Rc<PoolInner>);

impl BufferPool {
    pub fn new(config: PoolConfig, stats: Arc<ShardStats>) -> Self {
        let tier = |max| TierPool {
            max,
            free: RefCell::new(Vec::new()),
            in_use: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
        };
        BufferPool(Rc::new(PoolInner {
            small: tier(config.small_buffers_max),
            large: tier(config.large_buffers_max),
            stats,
        }))
    }

    /// A buffer of `tier`, or `None` at once if the tier is at its cap.
    pub fn try_get(&self, tier: Tier) -> Option<PooledBuf> {
        let pool = self.0.tier(tier);
        let stats = self.0.stats.tier(tier);
        let in_use = pool.in_use.get();
        if in_use >= pool.max {
            stats.exhausted.inc();
            return None;
        }
        let buf = pool.free.borrow_mut().pop().unwrap_or_else(|| {
            stats.allocated.inc();
            Vec::with_capacity(tier.bytes())
        });
        pool.in_use.set(in_use + 1);
        stats.in_use.set((in_use + 1) as u64);
        if (in_use + 1) as u64 > stats.high_water.get() {
            stats.high_water.set((in_use + 1) as u64);
        }
        Some(PooledBuf {
            buf,
            tier,
            pool: self.clone(),
        })
    }

    /// A buffer of `tier`, waiting while the tier is at its cap: a hard cap turns into backpressure
    /// on new work rather than into memory growth.
    pub async fn get(&self, tier: Tier) -> PooledBuf {
        if let Some(buf) = self.try_get(tier) {
            return buf;
        }
        poll_fn(|cx| {
            let pool = self.0.tier(tier);
            if pool.in_use.get() < pool.max {
                if let Some(buf) = self.try_get(tier) {
                    return Poll::Ready(buf);
                }
            }
            pool.waiters.borrow_mut().push_back(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Buffers of `tier` handed out and not yet returned.
    pub fn in_use(&self, tier: Tier) -> usize {
        self.0.tier(tier).in_use.get()
    }

    fn put_back(&self, tier: Tier, mut buf: Vec<u8>) {
        let pool = self.0.tier(tier);
        buf.clear();
        pool.free.borrow_mut().push(buf);
        let in_use = pool.in_use.get() - 1;
        pool.in_use.set(in_use);
        self.0.stats.tier(tier).in_use.set(in_use as u64);
        // Wake every waiter, not one: a waiter whose future was dropped would swallow a lone wake-up.
        // Waiters exist only at the cap, so the herd is small and rare.
        let waiters = std::mem::take(&mut *pool.waiters.borrow_mut());
        for waker in waiters {
            waker.wake();
        }
    }
}

/// A buffer on loan from a shard's pool; it returns there when dropped, even when io_uring still
/// held it after its future was dropped (the driver drops it once the kernel is done with it).
pub struct PooledBuf {
    buf: Vec<u8>,
    tier: Tier,
    pool: BufferPool,
}

impl PooledBuf {
    pub fn tier(&self) -> Tier {
        self.tier
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.pool.put_back(self.tier, buf);
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf")
            .field("tier", &self.tier)
            .field("len", &self.buf.len())
            .finish()
    }
}

// SAFETY: delegates to `Vec<u8>`, whose heap storage does not move while the buffer is on loan.
unsafe impl IoBuf for PooledBuf {
    fn read_ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.buf.len()
    }
}

// SAFETY: as above; `set_init` is called by the driver with the number of bytes the kernel wrote.
unsafe impl IoBufMut for PooledBuf {
    fn write_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr()
    }

    fn bytes_total(&mut self) -> usize {
        self.buf.capacity()
    }

    unsafe fn set_init(&mut self, pos: usize) {
        self.buf.set_len(pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(small: usize, large: usize) -> (BufferPool, Arc<ShardStats>) {
        let stats = Arc::new(ShardStats::default());
        let config = PoolConfig {
            small_buffers_max: small,
            large_buffers_max: large,
        };
        (BufferPool::new(config, stats.clone()), stats)
    }

    #[test]
    fn cap_is_hard_and_buffers_are_reused() {
        let (pool, stats) = pool(2, 1);
        let a = pool.try_get(Tier::Small).expect("first");
        let b = pool.try_get(Tier::Small).expect("second");
        assert!(
            pool.try_get(Tier::Small).is_none(),
            "a third small buffer is over the cap"
        );
        assert_eq!(stats.small_buffers.exhausted.get(), 1);
        assert_eq!(a.capacity(), SMALL_BUFFER_BYTES);
        drop(a);
        drop(b);
        for _ in 0..100 {
            let _c = pool
                .try_get(Tier::Small)
                .expect("returned buffers are lent again");
        }
        assert_eq!(
            stats.small_buffers.allocated.get(),
            2,
            "warm pool allocates nothing"
        );
        assert_eq!(stats.small_buffers.high_water.get(), 2);
        assert_eq!(stats.small_buffers.in_use.get(), 0);
        let l = pool.try_get(Tier::Large).expect("large");
        assert_eq!(l.capacity(), LARGE_BUFFER_BYTES);
        assert!(pool.try_get(Tier::Large).is_none());
    }

    #[monoio::test(enable_timer = true)]
    async fn get_waits_for_a_buffer_at_the_cap() {
        let (pool, _stats) = pool(1, 0);
        let held = pool.get(Tier::Small).await;
        let waiter = {
            let pool = pool.clone();
            monoio::spawn(async move { pool.get(Tier::Small).await.capacity() })
        };
        monoio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(pool.in_use(Tier::Small), 1);
        drop(held);
        assert_eq!(waiter.await, SMALL_BUFFER_BYTES);
    }
}
