//! shoal's measuring tools: the servers it measures, the clients that load them (and
//! the capture that hands their connections to a proxy), the processes it
//! starts and stops, the machine it runs on, and the benchmarks and demo built from those; and the
//! helpers every crate's integration tests share (`testkit`).

pub mod echo;
pub mod backend;
pub mod load;
pub mod client;
pub mod capture;
pub mod process;
pub mod machine;
pub mod report;
pub mod runtime_bench;
pub mod hbone_node;
pub mod hbone_bench;
pub mod control_bench;
pub mod loadgen_bench;
pub mod ztunnel_bench;
pub mod waypoint_bench;
pub mod traffic_bench;
pub mod log_bench;
pub mod pairs;
pub mod charts;
pub mod compare;
pub mod demo;
pub mod mesh_demo;
pub mod testkit;
