//! The per-node L4 proxy: takes the traffic of the node's ambient workloads, carries it over HBONE
//! (mTLS + HTTP/2 CONNECT) to the destination's node or waypoint, enforces L4 authorization at the
//! destination, and logs one line per connection.
//!
//! Modules in the order a connection meets them (the SOCKS5 handshake and
//! reading a captured connection's original destination are the runtime's): the decisions
//! (`decide`, pure and table-tested), and the node
//! that wires listeners, shards, pools and the admin server together (`node`).

pub mod decide;
pub mod metrics;
pub mod node;
