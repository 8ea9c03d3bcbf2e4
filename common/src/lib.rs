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
/// Go 1.21 mark termination: the end is the probe's clock at
/// `startTheWorldWithSema` entry, next to where that release's runtime ends
/// the pause it accounts (`gcMarkTermination`'s `now`), not the later time
/// the function returns.
pub const STW_FLAG_END_AT_ENTRY: u8 = 8;

/// How `runtime.startTheWorldWithSema` receives its arguments in a release.
pub const START_ARGS_NONE: u8 = 0;
/// Go 1.22+: `(now int64, w worldStop)`: RAX = now, BL = w.reason,
/// RCX = w.start (1.22) / w.startedStopping (1.23+), all CLOCK_MONOTONIC ns.
pub const START_ARGS_WORLDSTOP: u8 = 1;

/// Per-process settings the agent writes before attaching; the probes ignore
/// any process without one. Struct offsets come from the binary (DWARF or
/// the generated table), never from constants in the eBPF object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcConfig {
    /// One of the `START_ARGS_*` values.
    pub start_args: u8,
    /// `MAP_IMPL_*`: which of the offsets below are valid.
    pub map_impl: u8,
    pub _pad: [u8; 6],
    /// Classic `runtime.hmap`: count, flags, B, noverflow.
    pub hmap_count: u16,
    pub hmap_flags: u16,
    pub hmap_b: u16,
    pub hmap_noverflow: u16,
    /// Swiss `internal/runtime/maps.Map`: used, dirLen, globalDepth.
    pub map_used: u16,
    pub map_dir_len: u16,
    pub map_global_depth: u16,
    /// Swiss `internal/runtime/maps.table`: used, capacity, growthLeft, localDepth.
    pub table_used: u16,
    pub table_capacity: u16,
    pub table_growth_left: u16,
    pub table_local_depth: u16,
    /// The map's random seed (classic `hash0`, uint32; swiss `seed`): with
    /// its address, what identifies a map over time.
    pub hmap_hash0: u16,
    pub map_seed: u16,
    /// Classic: `hmap.oldbuckets` and the map type's `BucketSize`, to tell
    /// an evacuation that moves a bucket from one that finds it moved.
    pub hmap_oldbuckets: u16,
    pub maptype_bucket_size: u16,
    pub _pad2: [u8; 2],
    /// Go 1.21 with symbols: runtime addresses of `work.pauseStart` and
    /// `memstats.last_gc_nanotime`, the runtime's own GC pause clock (0 when
    /// unknown).
    pub pause_start_addr: u64,
    pub last_gc_nanotime_addr: u64,
}

pub const MAP_IMPL_CLASSIC: u8 = 1;
pub const MAP_IMPL_SWISS: u8 = 2;

/// Probe classes whose hits are counted per process, for the overhead
/// estimate: entry probes of the stop-the-world functions (emulated), RET
/// probes of `startTheWorldWithSema` (single-stepped), map growth, map
/// assignment and map deletion probes.
pub const PROBE_STW: usize = 0;
pub const PROBE_STW_RET: usize = 1;
pub const PROBE_GROWTH: usize = 2;
pub const PROBE_ASSIGN: usize = 3;
pub const PROBE_DELETE: usize = 4;
/// Classic maps' `runtime.evacuate*`: one old bucket moved per call.
pub const PROBE_EVACUATE: usize = 5;
pub const PROBE_CLASSES: usize = 6;

/// Maps the assignment probes remember (kernel LRU, all processes).
pub const MAX_TRACKED_MAPS: u32 = 65536;

/// A map as the assignment probes know it: process and address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MapKey {
    pub pid: u32,
    pub _pad: u32,
    pub map: u64,
}

/// What the last assignment or deletion saw of a map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSeen {
    /// The map's seed (identity with the address).
    pub seed: u64,
    /// Entries before that operation.
    pub count: u64,
    /// Return address into the Go function that made it (the site).
    pub pc: u64,
}

/// Which runtime function grew a map (the probe that saw it).
pub const GROW_CLASSIC: u8 = 1;
pub const GROW_SWISS_SMALL: u8 = 2;
pub const GROW_SWISS_TO_TABLE: u8 = 3;
pub const GROW_SWISS_GROW: u8 = 4;
pub const GROW_SWISS_SPLIT: u8 = 5;
pub const GROW_SWISS_PRUNE: u8 = 6;

/// Return addresses kept per growth event (frame-pointer walk).
pub const GROWTH_FRAMES: usize = 8;
/// Size of the map growth ring buffer in bytes.
pub const GROWTH_RING_BYTES: u32 = 1024 * 1024;

/// One map growth, read at the entry of the runtime function doing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrowthEvent {
    pub pid: u32,
    /// `GROW_*`.
    pub kind: u8,
    /// Classic: `B` (log2 buckets) before the growth. Swiss: globalDepth.
    pub b_or_depth: u8,
    /// Classic: `flags`. Swiss: the growing table's localDepth.
    pub flags_or_local_depth: u8,
    /// Return addresses found (`pcs[..nframes]`).
    pub nframes: u8,
    /// The map header's address (not a lasting identity).
    pub map: u64,
    /// Classic `count` / swiss `used`, before the insert that grows it.
    pub count: u64,
    /// Swiss: dirLen (0 for a small map).
    pub dir_len: u64,
    /// Classic: noverflow. Swiss: the growing table's capacity.
    pub noverflow_or_capacity: u16,
    /// Swiss: the growing table's used and growthLeft.
    pub table_used: u16,
    pub table_growth_left: u16,
    pub _pad: u16,
    /// The map's seed (see [`ProcConfig::hmap_hash0`]).
    pub seed: u64,
    /// Return addresses, innermost first: the caller of the probed runtime
    /// function, then its callers.
    pub pcs: [u64; GROWTH_FRAMES],
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
    /// Map growths seen (events sent or lost).
    pub map_growths: u64,
    /// Probe hits by class (`PROBE_*`).
    pub hits: [u64; PROBE_CLASSES],
    /// Maps the assignment probes added to the LRU (first seen, or seen
    /// again after the agent took them): with what the agent took, tells
    /// how many the LRU evicted unread.
    pub maps_added: u64,
    /// Old buckets classic maps evacuated (`evacuate*` calls, each once).
    pub evacuations: u64,
    /// Growth probe hits where the stack check was about to send the
    /// function through `morestack` and back to its start: the hit after
    /// the restart is the one counted.
    pub growth_refires: u64,
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
    /// CLOCK_MONOTONIC ns at `startTheWorldWithSema` entry (Go 1.21 only).
    pub start_entry_ns: u64,
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
    unsafe impl aya::Pod for super::GrowthEvent {}
    unsafe impl aya::Pod for super::MapKey {}
    unsafe impl aya::Pod for super::MapSeen {}
}
