//! The control plane inside every shoal process: reads Kubernetes manifests, validates them with
//! errors a person can act on, compiles one immutable snapshot and publishes it to the shards.
