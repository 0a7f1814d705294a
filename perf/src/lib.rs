//! shoal's measuring tools: the servers it measures, the clients that load them, the processes it
//! starts and stops, the machine it runs on, and the benchmarks and demo built from those.

pub mod client;
pub mod demo;
pub mod echo;
pub mod machine;
pub mod process;
pub mod runtime_bench;
