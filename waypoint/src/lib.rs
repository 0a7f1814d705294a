//! The L7 proxy: HTTP/1.1 and HTTP/2 over HBONE, routes and L7 policy (ambient mode's waypoint).
//!
//! Modules in the order a request meets them: hyper's byte stream, executor and timers on a shard
//! (`io`); the decisions, pure and table-tested (`decide`); local rate limits shared by the
//! shards (`ratelimit`); the shard's state per upstream
//! cluster — load balancing, circuit breakers, outlier ejections (`cluster`); the bodies passed on,
//! replayed for retries, and the record made when a response ends (`body`); the connections to endpoints (`upstream`); the request path
//! itself (`proxy`); what it counts (`metrics`); and the process that wires listeners, shards,
//! pools and the admin servers together (`node`).

pub mod io;
pub mod decide;
pub mod ratelimit;
pub mod cluster;
pub mod body;
pub mod upstream;
pub mod proxy;
pub mod metrics;
pub mod node;
