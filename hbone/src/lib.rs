//! HBONE: SPIFFE identities, certificates, mTLS (rustls) and HTTP/2 CONNECT tunnels on port 15008,
//! wire-compatible with Istio's ztunnel. Built on `shoal-runtime`; see ARCHITECTURE.md.
