//! A shard's state for each upstream cluster — a service port, or a DestinationRule subset of
//! one — kept between requests: where round robin is, requests in flight per endpoint (least
//! request), the consistent-hash table, circuit-breaker counts and outlier ejections.
//!
//! **Circuit-breaker limits hold for the node as a whole.** Each shard holds `limit / shards` of
//! a limit as its own share, counted without atomics; the remainder (`limit % shards`) sits in a
//! node-wide pool that a shard draws from, with one atomic operation, only once its own share is
//! used up. So a limit of 1 on two shards is exactly 1 for the node, and a limit of 100 gives each
//! shard 50 of its own. What a user sees: a request on a shard whose share and the pool are both
//! used up gets 503 UO even when another shard still has room; connections spread over the shards
//! evenly, so this shows only near the limit. A limit changed by a reload starts afresh (slots
//! taken under the old one go back to the old one).
//!
//! **Outlier detection is per shard**: each shard counts the consecutive errors it sees and ejects
//! the endpoint from its own choices.
//!
//! **Consistent hashing is the same on every shard** (and every waypoint): the table is a pure
//! function of the healthy endpoints' addresses, hashed with xxHash64 as Envoy does.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustc_hash::{FxHashMap, FxHasher};
use shoal_control::traffic::{ClusterPolicy, HashTable, LoadBalancer, PoolLimits, TryOutcome};
use xxhash_rust::xxh64::xxh64;

use crate::decide::Endpoint;

/// Retries in flight a cluster always allows on a shard, whatever its load (Envoy's
/// `min_retry_concurrency`).
pub const MIN_RETRY_CONCURRENCY: u32 = 3;
/// Beyond that, retries in flight may be at most this share of the requests in flight (Envoy's
/// retry budget), so retries cannot multiply the load on a failing service.
pub const RETRY_BUDGET_PERCENT: u32 = 20;
/// Maglev table size (a prime; Envoy's default).
pub const MAGLEV_TABLE_SIZE: usize = 65537;

/// The circuit-breaker limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Connections,
    Pending,
    Requests,
    Retries,
}

/// The node-wide remainders of limits, shared by the shards; locked only when a shard takes up a
/// limit it has not seen, never per request.
#[derive(Default)]
pub struct SharedPools {
    pools: Mutex<HashMap<(u64, Limit, u32), Arc<AtomicU32>>>,
}

impl SharedPools {
    fn pool(&self, key: (u64, Limit, u32), initial: u32) -> Arc<AtomicU32> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(key)
            .or_insert_with(|| Arc::new(AtomicU32::new(initial)))
            .clone()
    }
}

/// Where a taken slot came from.
enum Slot {
    /// Unlimited, or the shard's own share.
    Own,
    /// The node-wide pool (given back there, even after a reload changed the limit).
    Shared(Arc<AtomicU32>),
}

/// One limit as this shard holds it.
#[derive(Default)]
struct Quota {
    /// (limit, this shard's own share); `None`: unlimited.
    limit: Cell<Option<(u32, u32)>>,
    used_own: Cell<u32>,
    shared: RefCell<Option<Arc<AtomicU32>>>,
}

impl Quota {
    fn configure(&self, limit: Option<u32>, place: (u64, Limit), shards: (usize, &SharedPools)) {
        if self.limit.get().map(|(l, _)| l) == limit {
            return;
        }
        let (count, pools) = shards;
        match limit {
            None => {
                self.limit.set(None);
                *self.shared.borrow_mut() = None;
            }
            Some(l) => {
                let n = count.max(1) as u32;
                self.limit.set(Some((l, l / n)));
                *self.shared.borrow_mut() = Some(pools.pool((place.0, place.1, l), l % n));
            }
        }
        // Slots taken under the old limit are given back as they end.
    }

    fn take(&self) -> Option<Slot> {
        let own = match self.limit.get() {
            None => u32::MAX,
            Some((_, own)) => own,
        };
        if self.used_own.get() < own {
            self.used_own.set(self.used_own.get() + 1);
            return Some(Slot::Own);
        }
        let pool = self.shared.borrow().clone()?;
        pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
            .ok()
            .map(|_| Slot::Shared(pool))
    }

    fn give_back(&self, slot: &Slot) {
        match slot {
            Slot::Own => self.used_own.set(self.used_own.get().saturating_sub(1)),
            Slot::Shared(pool) => {
                pool.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// What the shard remembers of one endpoint.
#[derive(Debug, Default)]
struct EndpointState {
    /// Requests in flight from this shard (least request).
    active: u32,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// A consistent-hash table over a set of endpoints.
struct HashRing {
    /// Hash of the address list it was built for.
    built_for: u64,
    addrs: Vec<SocketAddr>,
    lookup: Lookup,
}

enum Lookup {
    /// Sorted (point, index into `addrs`).
    Ring(Vec<(u64, u32)>),
    Maglev(Vec<u32>),
}

impl HashRing {
    fn build(addrs: Vec<SocketAddr>, table: HashTable, built_for: u64) -> HashRing {
        let names: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        let lookup = match table {
            HashTable::Ring { min_points } => {
                let per_host = min_points.div_ceil(names.len().max(1)).max(1);
                let mut ring = Vec::with_capacity(per_host * names.len());
                for (i, name) in names.iter().enumerate() {
                    for j in 0..per_host {
                        ring.push((xxh64(format!("{name}_{j}").as_bytes(), 0), i as u32));
                    }
                }
                ring.sort_unstable();
                Lookup::Ring(ring)
            }
            HashTable::Maglev => Lookup::Maglev(maglev(&names)),
        };
        HashRing {
            built_for,
            addrs,
            lookup,
        }
    }

    fn get(&self, hash: u64) -> Option<SocketAddr> {
        let i = match &self.lookup {
            Lookup::Ring(ring) => {
                let at = ring.partition_point(|(point, _)| *point < hash);
                ring.get(at).or(ring.first())?.1
            }
            Lookup::Maglev(table) => *table.get((hash % table.len().max(1) as u64) as usize)?,
        };
        self.addrs.get(i as usize).copied()
    }
}

/// Maglev's table (Eisenbud et al., §3.4): each host fills its preferred slots in turn.
fn maglev(names: &[String]) -> Vec<u32> {
    const EMPTY: u32 = u32::MAX;
    let m = MAGLEV_TABLE_SIZE as u64;
    let mut table = vec![EMPTY; MAGLEV_TABLE_SIZE];
    if names.is_empty() {
        return Vec::new();
    }
    let prefs: Vec<(u64, u64)> = names
        .iter()
        .map(|n| {
            let offset = xxh64(n.as_bytes(), 0) % m;
            let skip = xxh64(n.as_bytes(), 1) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in prefs.iter().enumerate() {
            let mut slot = (offset + next[i] * skip) % m;
            while table[slot as usize] != EMPTY {
                next[i] += 1;
                slot = (offset + next[i] * skip) % m;
            }
            table[slot as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_TABLE_SIZE {
                break 'fill;
            }
        }
    }
    table
}

/// A taken circuit-breaker slot; given back when dropped.
pub struct Permit {
    cluster: Rc<Cluster>,
    limit: Limit,
    slot: Slot,
    /// For a request: the endpoint its current try is on (least request counts it).
    endpoint: Cell<Option<SocketAddr>>,
}

impl Permit {
    /// Moves the request to the endpoint of its next try.
    pub fn on_endpoint(&self, addr: SocketAddr) {
        if let Some(old) = self.endpoint.replace(Some(addr)) {
            self.cluster.endpoint_done(old);
        }
        self.cluster.endpoint_begin(addr);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let c = &self.cluster;
        c.quota(self.limit).give_back(&self.slot);
        match self.limit {
            Limit::Requests => c.active.set(c.active.get().saturating_sub(1)),
            Limit::Retries => c
                .retries_active
                .set(c.retries_active.get().saturating_sub(1)),
            Limit::Connections => c.freed.notify_waiters(),
            Limit::Pending => {}
        }
        if let Some(addr) = self.endpoint.take() {
            c.endpoint_done(addr);
        }
    }
}

/// One cluster on one shard.
pub struct Cluster {
    key: u64,
    host: Box<str>,
    port: u16,
    subset: Option<Box<str>>,
    policy: RefCell<Arc<ClusterPolicy>>,
    connections: Quota,
    pending: Quota,
    requests: Quota,
    retries: Quota,
    active: Cell<u32>,
    retries_active: Cell<u32>,
    round_robin: Cell<usize>,
    endpoints: RefCell<FxHashMap<SocketAddr, EndpointState>>,
    ring: RefCell<Option<Rc<HashRing>>>,
    /// The snapshot version it was last used in (clusters unused for a version are dropped).
    used_in: Cell<u64>,
    /// Woken when a connection of this cluster goes idle or closes: pending requests look again.
    pub freed: tokio::sync::Notify,
}

impl Cluster {
    /// This cluster's key among the shard's upstream connections.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The connection-pool limits, copied out: the policy's `Arc` is shared by every shard, so
    /// cloning it per request would bounce its count between cores.
    pub fn limits(&self) -> PoolLimits {
        self.policy.borrow().limits
    }

    fn quota(&self, limit: Limit) -> &Quota {
        match limit {
            Limit::Connections => &self.connections,
            Limit::Pending => &self.pending,
            Limit::Requests => &self.requests,
            Limit::Retries => &self.retries,
        }
    }

    fn permit(self: &Rc<Self>, limit: Limit) -> Option<Permit> {
        let slot = self.quota(limit).take()?;
        Some(Permit {
            cluster: self.clone(),
            limit,
            slot,
            endpoint: Cell::new(None),
        })
    }

    /// A request in flight (`http2MaxRequests`); `None` is 503 UO.
    pub fn admit(self: &Rc<Self>) -> Option<Permit> {
        let p = self.permit(Limit::Requests)?;
        self.active.set(self.active.get() + 1);
        Some(p)
    }

    /// A new connection (`tcp.maxConnections`); `None`: the request waits as pending.
    pub fn connection(self: &Rc<Self>) -> Option<Permit> {
        self.permit(Limit::Connections)
    }

    /// A wait for a connection (`http1MaxPendingRequests`); `None` is 503 UO.
    pub fn pending(self: &Rc<Self>) -> Option<Permit> {
        self.permit(Limit::Pending)
    }

    /// A retry, if the retry budget and `maxRetries` allow one now.
    pub fn retry(self: &Rc<Self>) -> Option<Permit> {
        let budget = MIN_RETRY_CONCURRENCY.max(self.active.get() * RETRY_BUDGET_PERCENT / 100);
        if self.retries_active.get() >= budget {
            return None;
        }
        let p = self.permit(Limit::Retries)?;
        self.retries_active.set(self.retries_active.get() + 1);
        Some(p)
    }

    fn endpoint_begin(&self, addr: SocketAddr) {
        if matches!(
            self.policy.borrow().load_balancer,
            LoadBalancer::LeastRequest
        ) {
            self.endpoints.borrow_mut().entry(addr).or_default().active += 1;
        }
    }

    fn endpoint_done(&self, addr: SocketAddr) {
        if let Some(e) = self.endpoints.borrow_mut().get_mut(&addr) {
            e.active = e.active.saturating_sub(1);
        }
    }

    /// Chooses among `candidates` (the ready endpoints, in the snapshot's order) by the load
    /// balancer, leaving out ejected endpoints and, when others remain, those already `tried`
    /// (Istio's previous-hosts retry predicate). `hash` is the request's consistent-hash key
    /// (absent: a random choice); `roll` is random. `None`: no healthy endpoint (503 UH).
    pub fn pick<'s>(
        &self,
        candidates: &[Endpoint<'s>],
        hash: Option<u64>,
        tried: &[SocketAddr],
        roll: u64,
    ) -> Option<Endpoint<'s>> {
        if candidates.is_empty() {
            return None;
        }
        let policy = self.policy.borrow();
        let mut healthy: Vec<&Endpoint<'s>> = if policy.outlier.is_some() {
            let now = Instant::now();
            let mut states = self.endpoints.borrow_mut();
            candidates
                .iter()
                .filter(|c| match states.get_mut(&c.addr) {
                    Some(s) => match s.ejected_until {
                        Some(t) if t > now => false,
                        Some(_) => {
                            s.ejected_until = None;
                            tracing::info!(endpoint = %c.addr, cluster = %self.host, "outlier ejection ended");
                            true
                        }
                        None => true,
                    },
                    None => true,
                })
                .collect()
        } else {
            candidates.iter().collect()
        };
        if healthy.is_empty() {
            return None;
        }
        if !tried.is_empty() && healthy.iter().any(|c| !tried.contains(&c.addr)) {
            healthy.retain(|c| !tried.contains(&c.addr));
        }
        let n = healthy.len();
        let chosen = match (&policy.load_balancer, hash) {
            (LoadBalancer::RoundRobin, _) => {
                let i = self.round_robin.get();
                self.round_robin.set(i.wrapping_add(1));
                healthy[i % n]
            }
            (LoadBalancer::LeastRequest, _) if n > 1 => {
                let a = (roll % n as u64) as usize;
                let mut b = ((roll >> 32) % n as u64) as usize;
                if a == b {
                    b = (a + 1) % n;
                }
                let states = self.endpoints.borrow();
                let active = |e: &Endpoint<'_>| states.get(&e.addr).map_or(0, |s| s.active);
                if active(healthy[b]) < active(healthy[a]) {
                    healthy[b]
                } else {
                    healthy[a]
                }
            }
            (LoadBalancer::Hash { table, .. }, Some(h)) => {
                let addr = self.ring(&healthy, *table).get(h);
                match addr.and_then(|a| healthy.iter().find(|c| c.addr == a)) {
                    Some(c) => c,
                    None => healthy[(roll % n as u64) as usize],
                }
            }
            _ => healthy[(roll % n as u64) as usize],
        };
        Some(*chosen)
    }

    /// The hash table for these endpoints, rebuilt only when they change.
    fn ring(&self, healthy: &[&Endpoint<'_>], table: HashTable) -> Rc<HashRing> {
        let mut addrs: Vec<SocketAddr> = healthy.iter().map(|e| e.addr).collect();
        addrs.sort_unstable();
        let mut h = FxHasher::default();
        addrs.hash(&mut h);
        table.hash(&mut h);
        let built_for = h.finish();
        if let Some(r) = self.ring.borrow().as_ref() {
            if r.built_for == built_for {
                return r.clone();
            }
        }
        let r = Rc::new(HashRing::build(addrs, table, built_for));
        *self.ring.borrow_mut() = Some(r.clone());
        r
    }

    /// Counts one try's outcome against its endpoint; ejects it when outlier detection says so.
    /// `total` is how many endpoints the cluster has.
    pub fn report(&self, addr: SocketAddr, outcome: TryOutcome, total: usize) {
        let policy = self.policy.borrow();
        let Some(o) = &policy.outlier else {
            return;
        };
        let now = Instant::now();
        let mut states = self.endpoints.borrow_mut();
        let ejected = states
            .values()
            .filter(|s| s.ejected_until.is_some_and(|t| t > now))
            .count();
        let e = states.entry(addr).or_default();
        if outcome.is_5xx() {
            e.consecutive_5xx += 1;
        } else {
            e.consecutive_5xx = 0;
        }
        if outcome.is_gateway_error() {
            e.consecutive_gateway += 1;
        } else {
            e.consecutive_gateway = 0;
        }
        let ejected_now = e.ejected_until.is_some_and(|t| t > now);
        if !ejected_now
            && o.trips(e.consecutive_5xx, e.consecutive_gateway)
            && o.may_eject(ejected, total)
        {
            e.ejections += 1;
            let time = o.ejection_time(e.ejections);
            e.ejected_until = Some(now + time);
            e.consecutive_5xx = 0;
            e.consecutive_gateway = 0;
            tracing::info!(endpoint = %addr, cluster = %self.host, port = self.port, subset = self.subset.as_deref().unwrap_or("-"), ejection_ms = time.as_millis() as u64, ejections = e.ejections, "outlier ejected");
        }
    }
}

/// The shard's clusters.
pub struct Clusters {
    shard_count: usize,
    pools: Arc<SharedPools>,
    map: RefCell<FxHashMap<u64, Rc<Cluster>>>,
    version: Cell<u64>,
}

impl Clusters {
    pub fn new(shard_count: usize, pools: Arc<SharedPools>) -> Self {
        Clusters {
            shard_count,
            pools,
            map: RefCell::new(FxHashMap::default()),
            version: Cell::new(0),
        }
    }

    /// The cluster for a service's port (and subset), with `policy` (the DestinationRule's, or
    /// the defaults) taken up if it changed. `version` is the snapshot's.
    pub fn get(
        &self,
        version: u64,
        host: &str,
        port: u16,
        subset: Option<&str>,
        policy: &Arc<ClusterPolicy>,
    ) -> Rc<Cluster> {
        let mut map = self.map.borrow_mut();
        if self.version.get() != version {
            // A new snapshot: forget clusters nobody holds that went unused in the last one.
            let last = self.version.get();
            map.retain(|_, c| Rc::strong_count(c) > 1 || c.used_in.get() == last);
            self.version.set(version);
        }
        let mut h = FxHasher::default();
        (host, port, subset).hash(&mut h);
        let key = h.finish();
        let found = map
            .get(&key)
            .filter(|c| &*c.host == host && c.port == port && c.subset.as_deref() == subset);
        let cluster = match found {
            Some(c) => c.clone(),
            None => {
                let c = Rc::new(Cluster {
                    key,
                    host: host.into(),
                    port,
                    subset: subset.map(Into::into),
                    policy: RefCell::new(Arc::new(ClusterPolicy::default())),
                    connections: Quota::default(),
                    pending: Quota::default(),
                    requests: Quota::default(),
                    retries: Quota::default(),
                    active: Cell::new(0),
                    retries_active: Cell::new(0),
                    round_robin: Cell::new(0),
                    endpoints: RefCell::new(FxHashMap::default()),
                    ring: RefCell::new(None),
                    used_in: Cell::new(version),
                    freed: tokio::sync::Notify::new(),
                });
                // A colliding key (another cluster) is replaced; its holders keep theirs.
                map.insert(key, c.clone());
                c.configure(&ClusterPolicy::default(), self);
                c
            }
        };
        cluster.used_in.set(version);
        if !Arc::ptr_eq(&cluster.policy.borrow(), policy) {
            cluster.configure(policy, self);
            *cluster.policy.borrow_mut() = policy.clone();
        }
        cluster
    }
}

impl Cluster {
    fn configure(&self, policy: &ClusterPolicy, clusters: &Clusters) {
        let l = &policy.limits;
        let shards = (clusters.shard_count, &*clusters.pools);
        self.connections
            .configure(l.max_connections, (self.key, Limit::Connections), shards);
        self.pending
            .configure(l.max_pending_requests, (self.key, Limit::Pending), shards);
        self.requests
            .configure(l.max_requests, (self.key, Limit::Requests), shards);
        self.retries
            .configure(l.max_retries, (self.key, Limit::Retries), shards);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_control::traffic::{OutlierDetection, PoolLimits};
    use std::time::Duration;

    fn policy(
        lb: LoadBalancer,
        limits: PoolLimits,
        outlier: Option<OutlierDetection>,
    ) -> Arc<ClusterPolicy> {
        Arc::new(ClusterPolicy {
            load_balancer: lb,
            limits,
            outlier,
            tls: None,
        })
    }

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)))
            .collect()
    }

    #[test]
    fn limits_split_between_shards_with_the_remainder_shared() {
        let pools = Arc::new(SharedPools::default());
        let limits = PoolLimits {
            max_requests: Some(3),
            ..Default::default()
        };
        let p = policy(LoadBalancer::RoundRobin, limits, None);
        let a = Clusters::new(2, pools.clone()).get(1, "svc", 80, None, &p);
        let b = Clusters::new(2, pools.clone()).get(1, "svc", 80, None, &p);
        // Each shard owns 1; the third goes to whichever shard asks first.
        let a1 = a.admit().expect("own share");
        let a2 = a.admit().expect("the shared remainder");
        assert!(a.admit().is_none(), "over the node's limit");
        let b1 = b.admit().expect("b's own share");
        assert!(b.admit().is_none(), "the remainder is taken");
        drop(a2);
        let b2 = b.admit().expect("the remainder came back");
        drop((a1, b1, b2));
        // A limit of 1 on two shards is 1 for the node.
        let one = policy(
            LoadBalancer::RoundRobin,
            PoolLimits {
                max_connections: Some(1),
                ..Default::default()
            },
            None,
        );
        let a = Clusters::new(2, pools.clone()).get(1, "one", 80, None, &one);
        let b = Clusters::new(2, pools).get(1, "one", 80, None, &one);
        let held = a.connection().expect("the only slot");
        assert!(b.connection().is_none() && a.connection().is_none());
        drop(held);
        assert!(b.connection().is_some());
    }

    #[test]
    fn retry_budget_allows_three_then_a_fifth_of_the_load() {
        let p = policy(LoadBalancer::RoundRobin, PoolLimits::default(), None);
        let c = Clusters::new(1, Arc::default()).get(1, "svc", 80, None, &p);
        let requests: Vec<_> = (0..30).map(|_| c.admit().expect("unlimited")).collect();
        let retries: Vec<_> = std::iter::from_fn(|| c.retry()).take(100).collect();
        assert_eq!(retries.len(), 6, "20% of 30 in flight");
        drop(requests);
        drop(retries);
        let retries: Vec<_> = std::iter::from_fn(|| c.retry()).take(100).collect();
        assert_eq!(retries.len(), 3, "the floor");
    }

    fn endpoints<'s>(
        w: &'s shoal_control::snapshot::Workload,
        addrs: &[SocketAddr],
    ) -> Vec<Endpoint<'s>> {
        addrs
            .iter()
            .map(|a| Endpoint {
                workload: Some(w),
                addr: *a,
                hbone: false,
            })
            .collect()
    }

    fn workload() -> shoal_control::snapshot::Workload {
        let mut parsed = shoal_control::parse::Parsed::default();
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns}\nspec: {nodeName: n}\nstatus: {podIP: 10.0.0.1}\n";
        shoal_control::parse::parse_file(&Arc::from("t.yaml"), pod, &mut parsed);
        let mut s = shoal_control::compile::compile(
            parsed,
            &Default::default(),
            &shoal_control::Options::default(),
        );
        s.workloads.remove(0)
    }

    #[test]
    fn consistent_hash_is_sticky_stable_across_shards_and_moves_little() {
        let w = workload();
        for table in [HashTable::Ring { min_points: 1024 }, HashTable::Maglev] {
            let p = policy(
                LoadBalancer::Hash {
                    key: shoal_control::traffic::HashKey::SourceIp,
                    table,
                },
                PoolLimits::default(),
                None,
            );
            let five = endpoints(&w, &addrs(5));
            let a = Clusters::new(2, Arc::default()).get(1, "svc", 80, None, &p);
            let b = Clusters::new(2, Arc::default()).get(1, "svc", 80, None, &p);
            let mut reversed = five.clone();
            reversed.reverse();
            let four = &five[..4];
            let mut seen = std::collections::HashSet::new();
            let keys: Vec<u64> = (0..2000u64).map(|k| xxh64(&k.to_be_bytes(), 0)).collect();
            let on_five: Vec<SocketAddr> = keys
                .iter()
                .map(|h| a.pick(&five, Some(*h), &[], *h).expect("endpoint").addr)
                .collect();
            for (h, x) in keys.iter().zip(&on_five) {
                // Same on another shard, whatever order the endpoints come in, whatever the roll.
                assert_eq!(
                    b.pick(&reversed, Some(*h), &[], !h).map(|e| e.addr),
                    Some(*x)
                );
                assert_eq!(
                    a.pick(&five, Some(*h), &[], h + 1).map(|e| e.addr),
                    Some(*x)
                );
                seen.insert(*x);
            }
            let moved = keys
                .iter()
                .zip(&on_five)
                .filter(|(h, x)| a.pick(four, Some(**h), &[], 0).map(|e| e.addr) != Some(**x))
                .count();
            assert_eq!(seen.len(), 5, "{table:?} uses every endpoint");
            // Removing one of five endpoints moves its fifth of the keys and a few more (a ring
            // spreads its points over fewer hosts), not the 80% that hashing modulo n moves.
            assert!(
                (300..=800).contains(&moved),
                "{table:?} moved {moved} of 2000"
            );
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let w = workload();
        let p = policy(LoadBalancer::LeastRequest, PoolLimits::default(), None);
        let c = Clusters::new(1, Arc::default()).get(1, "svc", 80, None, &p);
        let two = endpoints(&w, &addrs(2));
        let busy: Vec<_> = (0..5)
            .map(|_| {
                let r = c.admit().expect("unlimited");
                r.on_endpoint(two[0].addr);
                r
            })
            .collect();
        for roll in 0..50 {
            assert_eq!(
                c.pick(&two, None, &[], roll).map(|e| e.addr),
                Some(two[1].addr)
            );
        }
        drop(busy);
    }

    #[test]
    fn outlier_ejects_after_consecutive_errors_and_lets_back_in() {
        let w = workload();
        let o = OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_millis(50),
            max_ejection_percent: 50,
        };
        let p = policy(LoadBalancer::RoundRobin, PoolLimits::default(), Some(o));
        let c = Clusters::new(1, Arc::default()).get(1, "svc", 80, None, &p);
        let two = endpoints(&w, &addrs(2));
        let bad = two[0].addr;
        let error = TryOutcome::Response {
            status: 503,
            grpc: None,
        };
        let ok = TryOutcome::Response {
            status: 200,
            grpc: None,
        };
        c.report(bad, error, 2);
        c.report(bad, error, 2);
        c.report(bad, ok, 2);
        c.report(bad, error, 2);
        c.report(bad, error, 2);
        assert!(
            (0..10).any(|r| c.pick(&two, None, &[], r).map(|e| e.addr) == Some(bad)),
            "a success resets the count"
        );
        c.report(bad, TryOutcome::ConnectFailure, 2);
        assert!(
            (0..10).all(|r| c.pick(&two, None, &[], r).map(|e| e.addr) != Some(bad)),
            "ejected"
        );
        // The other endpoint may not be ejected too (50% of 2 already are).
        for _ in 0..5 {
            c.report(two[1].addr, error, 2);
        }
        assert!(c.pick(&two, None, &[], 0).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            (0..10).any(|r| c.pick(&two, None, &[], r).map(|e| e.addr) == Some(bad)),
            "back after the ejection time"
        );
    }

    #[test]
    fn retries_prefer_endpoints_not_yet_tried() {
        let w = workload();
        let p = policy(LoadBalancer::Random, PoolLimits::default(), None);
        let c = Clusters::new(1, Arc::default()).get(1, "svc", 80, None, &p);
        let three = endpoints(&w, &addrs(3));
        let tried = [three[0].addr, three[1].addr];
        for roll in 0..20 {
            assert_eq!(
                c.pick(&three, None, &tried, roll).map(|e| e.addr),
                Some(three[2].addr)
            );
        }
        let all: Vec<_> = three.iter().map(|e| e.addr).collect();
        assert!(
            c.pick(&three, None, &all, 0).is_some(),
            "all tried: any will do"
        );
    }
}
