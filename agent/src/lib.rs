//! gopulse's agent: binary inspection, probe attachment and aggregation.
//! The `gopulse` binary (`main.rs`) wires these together; the modules are a
//! library so integration tests can check them against real Go toolchains.
pub mod bpf;
pub mod collector;
pub mod inspect;
pub mod metrics;
pub mod procfs;
pub mod server;
pub mod stw;
