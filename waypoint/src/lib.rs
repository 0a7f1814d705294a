//! The L7 proxy: HTTP/1.1 and HTTP/2 over HBONE, routes and L7 policy (waypoint and sidecar modes).
//!
//! Modules in the order a request meets them: hyper's byte stream, executor and timers on a shard
//! (`io`); the decisions, pure and table-tested (`decide`); the connections to endpoints
//! (`upstream`); the request path itself (`proxy`); what it records (`metrics`); and the process
//! that wires listeners, shards, pools and the admin server together (`node`).

pub mod io;
pub mod decide;
