//! gopulse's agent. One direction of flow: `plan` (where probes go in an
//! executable) → `probes` (the attach stage: registration, attachment, the
//! overhead budget) → `collector` (kernel maps and events → the metric
//! `model`) → `export` (Prometheus, served by `server`; OTLP), leaves that
//! only read the model. The `gopulse` binary (`main.rs`)
//! wires them together; the modules are a library so integration tests can
//! check them against real Go toolchains.
pub mod bpf;
pub mod caps;
pub mod collector;
pub mod commands;
pub mod cost;
pub mod discover;
pub mod exe_map;
pub mod export;
pub mod gctrace;
pub mod governor;
pub mod mapshape;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod probes;
pub mod procfs;
pub mod runtime_state;
pub mod server;
pub mod storm;
pub mod stw;
pub mod watch;

/// Binary inspection lives in its own crate (no BPF build, fuzzable).
pub use gopulse_inspect as inspect;
