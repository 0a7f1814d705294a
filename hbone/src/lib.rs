//! HBONE: SPIFFE identities, certificates, mTLS (rustls) and HTTP/2 CONNECT tunnels on port 15008,
//! wire-compatible with Istio's ztunnel. Built on `shoal-runtime`; see ARCHITECTURE.md.
//!
//! Modules follow a tunnel's life: who the workload is, the CA that certifies it, the certificate
//! it presents (renewed at half-life), the TLS rules both ends apply, TLS record protection, the TLS stream on the
//! shard's reactor, the CONNECT request, the client (and its per-shard pool) and server that speak
//! it, and the tunnel that carries a connection's bytes.

pub mod identity;
pub mod ca;
pub mod certs;
pub mod tls;
pub mod record;
pub mod stream;
pub mod connect;
pub mod client;
pub mod pool;
pub mod server;
pub mod tunnel;

pub use identity::{Identity, IdentityError, DEFAULT_TRUST_DOMAIN};
