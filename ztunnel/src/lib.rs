//! The per-node L4 proxy: capture, HBONE to peers and waypoints, L4 policy, TCP telemetry.
