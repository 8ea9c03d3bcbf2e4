//! gopulse's agent: binary inspection, probe attachment and aggregation.
//! The `gopulse` binary (`main.rs`) wires these together; the modules are a
//! library so integration tests can check them against real Go toolchains.
pub mod bpf;
pub mod collector;
pub mod mapshape;
pub mod metrics;
pub mod procfs;
pub mod server;
pub mod storm;
pub mod stw;

/// Binary inspection lives in its own crate (no BPF build, fuzzable).
pub use gopulse_inspect as inspect;
