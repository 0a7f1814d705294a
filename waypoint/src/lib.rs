//! The L7 proxy: HTTP/1.1 and HTTP/2 over HBONE, routes and L7 policy (waypoint and sidecar modes).
