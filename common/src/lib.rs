//! Types shared by the eBPF programs (`gopulse-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` and padded explicitly, so both sides agree on
//! the layout byte for byte and no uninitialised padding reaches a BPF map.
#![no_std]

/// The per-process maps' size in the object; the agent resizes them at load
/// time from `--max-processes`.
pub const MAX_PROCS: u32 = 1024;

/// Pauses a process's stop-the-world state keeps for the agent to read (a
/// power of two): it reads them every 250 ms at most, so 128 lose nothing
/// below 500 pauses a second; past that the overwritten ones are counted.
pub const STW_LOG: usize = 128;

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
/// Kept on a process's pending entry between pauses (the agent creates it
/// so, and the probes write it in place rather than inserting): no stop in
/// progress. Never set on an event.
pub const STW_FLAG_IDLE: u8 = 16;

/// How `runtime.startTheWorldWithSema` receives its arguments in a release.
pub const START_ARGS_NONE: u8 = 0;
/// Go 1.22+: `(now int64, w worldStop)`: RAX = now, BL = w.reason,
/// RCX = w.start (1.22) / w.startedStopping (1.23+), all CLOCK_MONOTONIC ns.
pub const START_ARGS_WORLDSTOP: u8 = 1;

/// Per-process settings of the map probes, which the agent writes before
/// attaching; the probes ignore any process without them. Struct offsets
/// come from the binary (DWARF or the generated table), never from
/// constants in the eBPF object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcConfig {
    /// `MAP_IMPL_*`: which of the offsets below are valid.
    pub map_impl: u8,
    /// Classic maps' `loadFactorNum` (`loadFactorDen` is 2): 12 on Go 1.21,
    /// 13 after. The growth probe tells a doubling from a same-size growth
    /// with the runtime's own `overLoadFactor`.
    pub load_factor_num: u8,
    pub _pad: [u8; 2],
    /// The executable's id in `PLUMBING`.
    pub exe_id: u32,
    /// Runtime address minus link-time address (PIE load bias).
    pub load_bias: u64,
    /// Classic `runtime.hmap`: count, flags, B, noverflow (offsets within
    /// the first [`MAP_HEADER_BYTES`]).
    pub hmap_count: u16,
    pub hmap_flags: u16,
    pub hmap_b: u16,
    pub hmap_noverflow: u16,
    /// Swiss `internal/runtime/maps.Map`: used, dirLen, globalDepth.
    pub map_used: u16,
    pub map_dir_len: u16,
    pub map_global_depth: u16,
    /// Swiss `internal/runtime/maps.table`: used, capacity, growthLeft,
    /// localDepth (offsets within the first [`TABLE_HEADER_BYTES`]).
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
    /// Swiss `Map.dirPtr`: the directory of tables, walked at a growth to
    /// count them.
    pub map_dir_ptr: u16,
}

/// What the map probes keep per process and CPU (`PROCS`, a per-CPU hash):
/// the config, the same on every CPU, and this CPU's counters, so a probe
/// finds both with one lookup and counts without atomics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcCpu {
    pub config: ProcConfig,
    pub stats: ProcStats,
    pub sites: SiteCache,
}

/// Entries of a [`SiteCache`] (a power of two).
pub const SITE_CACHE: usize = 8;

/// The plumbing verdicts of the last few return addresses the site walk
/// met on this CPU, direct-mapped by address: a busy site is decided
/// without a lookup in `PLUMBING` (whose cold lookups dominate a growth
/// probe's cost).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteCache {
    /// Link-time return addresses (0: empty).
    pub pc: [u64; SITE_CACHE],
    /// Bit i: `pc[i]` is plumbing.
    pub plumbing: u64,
}

pub const MAP_IMPL_CLASSIC: u8 = 1;
pub const MAP_IMPL_SWISS: u8 = 2;

/// Bytes of a map header the growth probes read in one go: every field they
/// use lies within them (`runtime.hmap` and `maps.Map` are 48 bytes in every
/// supported release; the agent refuses offsets past this).
pub const MAP_HEADER_BYTES: usize = 48;
/// Bytes of a swiss `maps.table` header read in one go (the struct is 32).
pub const TABLE_HEADER_BYTES: usize = 32;
/// Swiss `maxTableCapacity` (Go 1.24 to 1.27): `(*table).rehash` grows a
/// table to twice its capacity up to this, and splits it beyond.
pub const SWISS_MAX_TABLE_CAPACITY: u64 = 1024;
/// Swiss `abi.SwissMapGroupSlots`: the smallest table has one group.
pub const SWISS_GROUP_SLOTS: u64 = 8;

/// The BPF programs, as indices of per-program hit counters. Each is one
/// uprobe program in the eBPF object; the agent names them in
/// `gopulse_probe_hits_total{probe}` and prices each with the kernel's own
/// run-time statistics.
pub const PROG_STW_STOP: usize = 0;
pub const PROG_STW_START_ENTRY: usize = 1;
pub const PROG_STW_START_RET: usize = 2;
pub const PROG_GC_MARK_TERM: usize = 3;
pub const PROG_GROW_CLASSIC: usize = 4;
pub const PROG_GROW_TO_TABLE: usize = 5;
pub const PROG_GROW_TABLE: usize = 6;
pub const PROG_SPLIT_TABLE: usize = 7;
pub const PROG_PRUNE_TABLE: usize = 8;
pub const PROG_MAP_ASSIGN: usize = 9;
pub const PROG_MAP_DELETE: usize = 10;
pub const PROG_MAP_EVACUATE: usize = 11;
/// `pruneTombstones` probed past its own "too few tombstones" return, where
/// the binary's code allows: only prunes that happen trap.
pub const PROG_PRUNE_BODY: usize = 12;
/// Swiss `(*table).rehash`, probed where `grow` and `split` have no copy of
/// their own (inlined into it, as profile-guided builds do): the table's
/// capacity tells which of the two it does.
pub const PROG_REHASH_TABLE: usize = 13;
pub const PROGRAMS: usize = 14;

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
    /// Link-time return address into the Go function that owns the map
    /// (its site, found as for growths).
    pub site: u64,
}

/// How a map grew (the probe that saw it, and for classic maps the
/// runtime's own load-factor test).
/// Classic `hashGrow` to twice the buckets (the map passed 6.5 entries a
/// bucket on average).
pub const GROW_CLASSIC_DOUBLE: u8 = 1;
/// Classic `hashGrow` keeping the bucket count (too many overflow buckets:
/// rehashed in place to compact them).
pub const GROW_CLASSIC_SAME_SIZE: u8 = 2;
/// Swiss `(*Map).growToTable`: a small map (one 8-slot group) passed 8
/// entries and became a table.
pub const GROW_SWISS_TO_TABLE: u8 = 3;
/// Swiss `(*table).grow`: a full table replaced by one twice its capacity.
pub const GROW_SWISS_GROW: u8 = 4;
/// Swiss `(*table).split`: a full table at the 1024-slot maximum split in
/// two (the directory may double).
pub const GROW_SWISS_SPLIT: u8 = 5;
/// Swiss `(*table).pruneTombstones` that pruned (Go 1.25+): a full table
/// rehashed in place to reclaim deleted slots instead of growing.
pub const GROW_SWISS_PRUNE: u8 = 6;

/// An executable's "plumbing": functions that insert into maps on behalf
/// of their caller (the runtime, `reflect`, `encoding/*`, ...). The growth
/// probes walk the caller frames past them to the first function outside,
/// the site. The kernel holds them as a bitmap per 4 KiB page of text, one
/// bit per 16 bytes: Go aligns every function to 32 bytes (assembly bodies
/// to 16), so a 16-byte block lies in one function, and a lookup is one hash
/// probe with no loop for the verifier to unroll.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageKey {
    /// The executable (`ProcConfig::exe_id`).
    pub exe_id: u32,
    /// Link-time address >> 12.
    pub page: u32,
}

/// Bytes of text per bit of a [`PageBits`].
pub const PLUMBING_BLOCK_SHIFT: u32 = 4;
/// One bit per 16-byte block of a 4 KiB page, set for plumbing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageBits(pub [u64; 4]);

/// Pages of plumbing the kernel holds for all executables (a big Go
/// program has about 450).
pub const MAX_PLUMBING_PAGES: u32 = 65536;
/// Frames the probes walk looking for the site.
pub const MAX_SITE_DEPTH: usize = 32;

/// The site was found: the first frame outside the plumbing.
pub const SITE_FOUND: u8 = 1;
/// Every frame walked was plumbing, or the walk stopped (no frame pointer,
/// [`MAX_SITE_DEPTH`] reached): the site is the outermost frame seen.
pub const SITE_OUTERMOST: u8 = 2;

/// Growths of one kind at one site of one process, counted in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrowthKey {
    pub pid: u32,
    /// `GROW_*`.
    pub kind: u8,
    /// `SITE_*`.
    pub site_flags: u8,
    pub _pad: [u8; 2],
    /// Link-time return address into the site function.
    pub site: u64,
}

/// The counter and the largest map seen growing under one [`GrowthKey`].
/// `growths` is added to atomically; the map fields are a hint (written
/// without a lock, so checked against the map's seed before use).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrowthCount {
    pub growths: u64,
    /// The map header's address.
    pub map: u64,
    /// Its seed when it grew.
    pub seed: u64,
    /// Its entries before the insert that grew it.
    pub count: u64,
    /// Its slots when it grew (before growing): classic 8·2^B; swiss the
    /// summed capacity of its tables, 8 for a small map; 0 if not known
    /// (a swiss directory longer than [`GROWTH_DIR_WALK`]).
    pub capacity: u64,
    /// Then: its overflow buckets (classic `noverflow`) or distinct tables
    /// (swiss; 0 for a small map).
    pub extra: u32,
    pub _pad: u32,
}

/// Most directory entries a swiss growth probe reads to count the map's
/// tables (in groups of 8): a map of up to 64 tables, 65,536 slots.
pub const GROWTH_DIR_WALK: usize = 64;

/// Growth keys the kernel holds (all processes); past it growths are
/// counted per process as unattributed.
pub const MAX_GROWTH_KEYS: u32 = 32768;

/// The map probes' counters of a process on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    /// Map growths counted (with or without a site).
    pub map_growths: u64,
    /// Growths the kernel's growth table had no room for: in
    /// `map_growths`, under no site.
    pub growths_unattributed: u64,
    /// Uprobe hits by program (`PROG_*`; the stop-the-world programs count
    /// theirs in [`StwState::hits`]).
    pub hits: [u64; PROGRAMS],
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
    /// Growths whose site walk ended without leaving the plumbing.
    pub sites_outermost: u64,
    /// Anomalies: a growth probe's read of a map or table header failed
    /// (the growth is not counted). The hot assignment probes do not count
    /// theirs, so their programs stay as they were.
    pub read_failed: u64,
    /// Anomalies: a growth probe found a header the runtime cannot have
    /// made at that point (classic: B past 56 or a growth already under
    /// way; swiss: a directory that does not fit the operation). The
    /// agent's offsets do not describe the map; the growth is not counted.
    pub map_layout: u64,
}

/// Stop-the-world programs, indices into [`StwState::hits`] as into
/// `ProcStats::hits` (`PROG_STW_STOP` .. `PROG_GC_MARK_TERM`).
pub const STW_PROGRAMS: usize = 4;

/// A process's stop-the-world state (`STW`, one entry per process, shared
/// by all CPUs: Go's `worldsema` serialises stops, so the probes write it
/// without atomics). Everything a pause's probes need is here, so each does
/// one lookup, and the pauses themselves are logged here rather than sent
/// through a ring buffer (whose reserve and wakeup cost more than the rest
/// of the program).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StwState {
    /// One of the `START_ARGS_*` values.
    pub start_args: u8,
    pub _pad: [u8; 7],
    /// Go 1.21 with symbols: runtime addresses of `work.pauseStart` and
    /// `memstats.last_gc_nanotime`, the runtime's own GC pause clock (0 when
    /// unknown).
    pub pause_start_addr: u64,
    pub last_gc_nanotime_addr: u64,
    /// The stop in progress.
    pub pending: PendingStw,
    /// Completed GC cycles (`runtime.gcMarkTermination` entries,
    /// deduplicated).
    pub gc_cycles: u64,
    /// `startTheWorldWithSema` returns with no recorded stop (should stay 0).
    pub stw_unmatched: u64,
    /// Reads of the runtime's GC pause clock (Go 1.21) that failed.
    pub read_failed: u64,
    /// Hits of the stop-the-world programs.
    pub hits: [u64; STW_PROGRAMS],
    /// Pauses logged so far; pause `n` is at `log[n % STW_LOG]` (written
    /// before `seq` moves past it).
    pub seq: u64,
    pub log: [StwEvent; STW_LOG],
}

impl Default for StwState {
    fn default() -> Self {
        Self {
            start_args: 0,
            _pad: [0; 7],
            pause_start_addr: 0,
            last_gc_nanotime_addr: 0,
            pending: PendingStw::default(),
            gc_cycles: 0,
            stw_unmatched: 0,
            read_failed: 0,
            hits: [0; STW_PROGRAMS],
            seq: 0,
            log: [StwEvent::default(); STW_LOG],
        }
    }
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

/// One stop-the-world pause, logged when the world starts again.
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

/// A process's lifecycle, for discovery: it ran `exec` (any process, while
/// discovery is on), or a watched process's thread-group leader exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LifeEvent {
    /// Thread-group id (the process id in the root pid namespace).
    pub pid: u32,
    /// `LIFE_EXEC` or `LIFE_EXIT`.
    pub kind: u32,
    /// CLOCK_MONOTONIC ns of the event.
    pub time_ns: u64,
}

pub const LIFE_EXEC: u32 = 1;
pub const LIFE_EXIT: u32 = 2;
/// The lifecycle ring: 16 bytes of header and event each, so 16,384 events
/// can wait for the agent (16 s of a 1,000 execs/s storm).
pub const LIFE_RING_BYTES: u32 = 256 * 1024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::ProcConfig {}
    unsafe impl aya::Pod for super::ProcStats {}
    unsafe impl aya::Pod for super::ProcCpu {}
    unsafe impl aya::Pod for super::StwState {}
    unsafe impl aya::Pod for super::PendingStw {}
    unsafe impl aya::Pod for super::StwEvent {}
    unsafe impl aya::Pod for super::GrowthKey {}
    unsafe impl aya::Pod for super::GrowthCount {}
    unsafe impl aya::Pod for super::PageKey {}
    unsafe impl aya::Pod for super::PageBits {}
    unsafe impl aya::Pod for super::MapKey {}
    unsafe impl aya::Pod for super::MapSeen {}
    unsafe impl aya::Pod for super::LifeEvent {}
}
