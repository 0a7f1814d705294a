//! Virtual IPs for what has none: ServiceEntry hosts without `addresses` (Istio allocates from
//! 240.240.0.0/16, which clients reach through the mesh's DNS answer) and Services written without a
//! `clusterIP` (no API server allocates one here). An address, once given to a key, stays with it
//! for as long as the key exists: the previous snapshot's allocation is carried into the next
//! compile, and only new keys take new slots (by a fixed hash of the key, then the next free slot).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// ServiceEntry hosts, as Istio.
pub const SERVICE_ENTRY_POOL: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(240, 240, 0, 0), 16) {
    Ok(net) => net,
    Err(_) => panic!("constant prefix length is valid"),
};
/// Services without a clusterIP: next to Istio's range, in the reserved 240.0.0.0/4 that no real
/// network routes, so an allocated VIP never shadows a real address.
pub const SERVICE_POOL: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(240, 241, 0, 0), 16) {
    Ok(net) => net,
    Err(_) => panic!("constant prefix length is valid"),
};

/// Allocations by key (`namespace/host` or `namespace/service`), kept between compiles.
pub type Allocations = BTreeMap<String, Ipv4Addr>;

/// Gives every key in `keys` an address in `pool`, keeping `previous` ones. Keys for which the pool
/// has no room are returned in the error list.
pub fn allocate<'k>(
    pool: Ipv4Net,
    keys: impl IntoIterator<Item = &'k str>,
    previous: &Allocations,
) -> (Allocations, Vec<String>) {
    let keys: BTreeSet<&str> = keys.into_iter().collect();
    let mut taken: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut out = Allocations::new();
    for key in &keys {
        if let Some(ip) = previous.get(*key) {
            if pool.contains(ip) && taken.insert(*ip) {
                out.insert(key.to_string(), *ip);
            }
        }
    }
    // Host part 0 and the last address are skipped: they look like network and broadcast addresses.
    let size = (1u64 << (32 - pool.prefix_len())).saturating_sub(2).max(1);
    let base = u32::from(pool.network());
    let mut full = Vec::new();
    for key in keys {
        if out.contains_key(key) {
            continue;
        }
        let start = u64::from(crc32fast::hash(key.as_bytes())) % size;
        let free = (0..size)
            .map(|probe| Ipv4Addr::from(base + 1 + ((start + probe) % size) as u32))
            .find(|ip| !taken.contains(ip));
        match free {
            Some(ip) => {
                taken.insert(ip);
                out.insert(key.to_string(), ip);
            }
            None => full.push(key.to_string()),
        }
    }
    (out, full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_across_reloads_and_unique() {
        let (first, full) = allocate(
            SERVICE_ENTRY_POOL,
            ["default/aliyun.com", "default/api.vendor.example"],
            &Allocations::new(),
        );
        assert!(full.is_empty());
        assert_eq!(first.len(), 2);
        assert!(first.values().all(|ip| SERVICE_ENTRY_POOL.contains(ip)));
        // The same keys with no history give the same addresses (fixed hash)...
        let (again, _) = allocate(
            SERVICE_ENTRY_POOL,
            ["default/api.vendor.example", "default/aliyun.com"],
            &Allocations::new(),
        );
        assert_eq!(first, again);
        // ...and with history, adding and removing keys never moves the ones that stay.
        let (next, _) = allocate(
            SERVICE_ENTRY_POOL,
            ["default/aliyun.com", "a/new.example", "b/other.example"],
            &first,
        );
        assert_eq!(next["default/aliyun.com"], first["default/aliyun.com"]);
        let unique: BTreeSet<_> = next.values().collect();
        assert_eq!(unique.len(), next.len());
    }

    #[test]
    fn collisions_probe_and_a_full_pool_is_reported() {
        let tiny = Ipv4Net::new(Ipv4Addr::new(240, 240, 0, 0), 30).unwrap();
        let (got, full) = allocate(tiny, ["a", "b", "c", "d"], &Allocations::new());
        assert_eq!(got.len(), 2, "a /30 has two usable addresses: {got:?}");
        assert_eq!(full.len(), 2);
        // The previous holder keeps its address even when a new key hashes onto it.
        let holder = got.keys().next().unwrap().clone();
        let (again, _) = allocate(tiny, ["a", "b", "c", "d"], &got);
        assert_eq!(again[&holder], got[&holder]);
    }
}
