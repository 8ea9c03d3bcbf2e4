//! Types shared by the eBPF programs (`gopulse-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` and padded explicitly, so both sides agree on
//! the layout byte for byte and no uninitialised padding reaches a BPF map.
#![no_std]

/// Most Go processes one agent watches at once (sizes the per-process maps).
pub const MAX_PROCS: u32 = 1024;

/// Size of the STW event ring buffer in bytes (a power of two, page aligned).
pub const STW_RING_BYTES: u32 = 256 * 1024;

/// Set on a stop-the-world pause during which `runtime.gcMarkTermination`
/// ran: the pause that completed a GC cycle. A mark-termination stop without
/// it was abandoned by `gcMarkDone` (work remained) and the GC retries.
pub const STW_FLAG_CYCLE_DONE: u8 = 1;
/// The pause start is the timestamp Go itself passed to
/// `startTheWorldWithSema` (Go 1.22+), not the probe's clock at
/// `stopTheWorldWithSema` entry.
pub const STW_FLAG_GO_START: u8 = 2;
/// The stop was not seen (the agent attached while the world was stopped):
/// the event has no usable start time.
pub const STW_FLAG_NO_START: u8 = 4;

/// How `runtime.startTheWorldWithSema` receives its arguments in a release.
pub const START_ARGS_NONE: u8 = 0;
/// Go 1.22+: `(now int64, w worldStop)`: RAX = now, BL = w.reason,
/// RCX = w.start (1.22) / w.startedStopping (1.23+), all CLOCK_MONOTONIC ns.
pub const START_ARGS_WORLDSTOP: u8 = 1;

/// Per-process settings the agent writes before attaching; the probes ignore
/// any process without one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcConfig {
    /// One of the `START_ARGS_*` values.
    pub start_args: u8,
    pub _pad: [u8; 7],
}

/// Per-process counters kept in the kernel, read by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    /// Completed GC cycles (`runtime.gcMarkTermination` entries, deduplicated).
    pub gc_cycles: u64,
    /// Events dropped because the ring buffer was full.
    pub events_lost: u64,
    /// `startTheWorldWithSema` returns with no recorded stop (should stay 0).
    pub stw_unmatched: u64,
}

/// A stop-the-world in progress, one per process (Go's `worldsema`
/// serialises them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingStw {
    /// CLOCK_MONOTONIC ns of the stop request.
    pub start_ns: u64,
    /// Go's `stwReason`.
    pub reason: u8,
    /// `STW_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// One stop-the-world pause, sent through the ring buffer when the world
/// starts again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StwEvent {
    /// Thread-group id (the process id in the root pid namespace).
    pub pid: u32,
    /// Go's `stwReason` (same numbering in Go 1.21 to 1.27).
    pub reason: u8,
    /// `STW_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// CLOCK_MONOTONIC ns when the stop was requested.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC ns when the world started again, as Go recorded it
    /// (`startTheWorldWithSema`'s return value).
    pub end_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::ProcConfig {}
    unsafe impl aya::Pod for super::ProcStats {}
    unsafe impl aya::Pod for super::PendingStw {}
    unsafe impl aya::Pod for super::StwEvent {}
}
