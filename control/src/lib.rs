//! The control plane inside every shoal process: reads the Kubernetes resources users already write
//! from a directory of manifests, validates them with errors a person can act on, compiles one
//! immutable snapshot and publishes it to the shards.
//!
//! Modules in the order data flows through them: files are found and watched (`source`), split
//! and parsed into typed resources (`parse`, `resources`), with problems phrased for people
//! (`problem`); `compile` builds the `snapshot` using the pure rule modules (`binding`, `peerauth`,
//! `authz`, `routes`, `traffic`, `vip`, `duration`); the `agent` recompiles on change and publishes; `certs`
//! holds the certificates a proxy presents for the identities the snapshot gives it; `dump` shows
//! the result, and `stats` what a running waypoint's metrics say.

pub mod source;
pub mod parse;
pub mod resources;
pub mod problem;
pub mod compile;
pub mod binding;
pub mod peerauth;
pub mod authz;
pub mod routes;
pub mod traffic;
pub mod vip;
pub mod duration;
pub mod snapshot;
pub mod agent;
pub mod certs;
pub mod dump;
pub mod stats;

pub use agent::{Agent, AgentCollector, AgentStats};
pub use compile::Options;
pub use problem::{Problem, Severity};
pub use snapshot::Snapshot;
pub use source::ManifestDir;
