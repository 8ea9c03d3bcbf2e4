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
    /// `internal/abi.Type`: `Size_` and `PtrBytes`, the element type's
    /// size and whether it holds pointers (offsets within the first
    /// [`TYPE_HEADER_BYTES`]), for slice growth.
    pub type_size: u16,
    pub type_ptr_bytes: u16,
    /// Go 1.22+: the allocator adds an 8-byte malloc header to objects of
    /// more than 512 bytes with pointers (`roundupsize(size, noscan)`).
    pub malloc_header: u8,
    pub _pad2: [u8; 1],
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
/// `runtime.growslice`: an append past a slice's capacity.
pub const PROG_GROW_SLICE: usize = 14;
pub const PROGRAMS: usize = 15;

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
/// tables (in groups of 8): a map of up to 8 tables, 8,192 slots; a larger
/// one's shape at growth is unknown (its live shape is read while it
/// lives). Linux 6.1's verifier refuses the growth programs (E2BIG) with a
/// walk of 32 or 64 entries.
pub const GROWTH_DIR_WALK: usize = 8;

/// Growth keys the kernel holds (all processes); past it growths are
/// counted per process as unattributed.
pub const MAX_GROWTH_KEYS: u32 = 32768;

/// Bytes of an `internal/abi.Type` the slice growth probe reads in one go
/// (`Size_` and `PtrBytes`, the first two words in every supported release).
pub const TYPE_HEADER_BYTES: usize = 16;

/// Buckets of the new capacities of grown slices, in bytes: bucket `i`
/// holds capacities up to `64 << 2i` (64 B, 256 B, ... 64 MiB), the last one
/// the rest.
pub const SLICE_BUCKETS: usize = 12;
/// log2 of the first bucket's bound.
pub const SLICE_BUCKET_MIN_SHIFT: u32 = 6;

/// The bucket of a new capacity of `bytes`.
#[inline(always)]
pub fn slice_bucket(bytes: u64) -> usize {
    let mut i = 0;
    while i < SLICE_BUCKETS - 1 {
        if bytes <= 1u64 << (SLICE_BUCKET_MIN_SHIFT + 2 * i as u32) {
            return i;
        }
        i += 1;
    }
    SLICE_BUCKETS - 1
}

/// Slice growths at one site of one process, counted in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SliceKey {
    pub pid: u32,
    /// `SITE_*`.
    pub site_flags: u8,
    pub _pad: [u8; 3],
    /// Link-time return address into the site function.
    pub site: u64,
}

/// What grew under one [`SliceKey`]; every field is added to atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SliceCount {
    /// Bytes copied from the old arrays (old length × element size).
    pub copied: u64,
    /// Growths by bucket of their new capacity in bytes ([`slice_bucket`]).
    pub counts: [u64; SLICE_BUCKETS],
    /// The new capacities' bytes summed, by bucket.
    pub bytes: [u64; SLICE_BUCKETS],
}

/// Slice growth keys the kernel holds (all processes); past it growths are
/// counted per process as unattributed.
pub const MAX_SLICE_KEYS: u32 = 16384;

/// When the slice growth probe of an executable counts (its index in
/// `SLICE_WINDOWS` is its `exe_id`): CLOCK_MONOTONIC ns from `start` up to,
/// not including, `end`. The agent opens a sampling window once the probe
/// is attached and closes it before detaching, so what was counted covers
/// exactly the time it says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SliceWindow {
    pub start: u64,
    pub end: u64,
}

/// Go's `nextslicecap(newLen, oldCap)` (Go 1.22-1.27; inline in 1.21's
/// growslice, the same rule): double below 256 elements, then grow by a
/// quarter plus 192 until `new_len` fits. At most 4 steps: each is at
/// least ×1.25 and the target is at most twice `old_cap`.
#[inline(always)]
pub fn next_slice_cap(new_len: i64, old_cap: i64) -> i64 {
    let double = old_cap.wrapping_add(old_cap);
    if new_len > double {
        return new_len;
    }
    const THRESHOLD: i64 = 256;
    if old_cap < THRESHOLD {
        return double;
    }
    let mut cap = old_cap;
    let mut i = 0;
    while i < 8 {
        cap = cap.wrapping_add((cap.wrapping_add(3 * THRESHOLD)) >> 2);
        if (cap as u64) >= (new_len as u64) {
            break;
        }
        i += 1;
    }
    if cap <= 0 { new_len } else { cap }
}

/// Go's `roundupsize(size, noscan)`: the bytes the allocator gives a
/// request of `size`. From Go 1.22 (`malloc_header`) an object of more than
/// 512 bytes with pointers carries an 8-byte header, which the size class
/// must hold too; Go 1.21 has none. Pages are 8 KiB.
#[inline(always)]
pub fn round_up_size(size: u64, noscan: bool, malloc_header: bool) -> u64 {
    const MAX_SMALL: u64 = 32768;
    const PAGE: u64 = 8192;
    let header = if malloc_header { 8 } else { 0 };
    let small = if malloc_header {
        size <= MAX_SMALL - 8
    } else {
        size < MAX_SMALL
    };
    if small {
        let req = if !noscan && size > 512 {
            size + header
        } else {
            size
        };
        // As Go computes it, in unsigned arithmetic (for req in (1016,
        // 1024) the subtraction wraps around to index 0).
        let class = if req <= 1024 - 8 {
            SIZE_CLASS_BYTES8.get(req.div_ceil(8) as usize)
        } else {
            SIZE_CLASS_BYTES128.get((req.wrapping_sub(1024).wrapping_add(127) / 128) as usize)
        };
        return match class {
            Some(&c) => u64::from(c).wrapping_sub(req - size),
            None => size,
        };
    }
    let up = size.wrapping_add(PAGE - 1);
    if up < size { size } else { up & !(PAGE - 1) }
}

/// What `runtime.growslice(oldPtr, newLen, oldCap, num, et)` allocates for
/// elements of `elem` bytes: the new capacity in bytes (elements × size), as
/// that release's runtime computes it; `None` where it would panic.
#[inline(always)]
pub fn grown_slice_bytes(
    new_len: i64,
    old_cap: i64,
    elem: u64,
    noscan: bool,
    malloc_header: bool,
) -> Option<u64> {
    if elem == 0 || new_len < 0 {
        return None;
    }
    // The runtime's maxAlloc on amd64 (48-bit addresses): past it growslice
    // panics. (Not a checked_mul: the BPF target has no 128-bit multiply.)
    const MAX_ALLOC: u64 = 1 << 48;
    let cap = next_slice_cap(new_len, old_cap) as u64;
    if cap > MAX_ALLOC / elem {
        return None;
    }
    let mem = cap * elem;
    let rounded = round_up_size(mem, noscan, malloc_header);
    Some(rounded / elem * elem)
}

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
    /// Slice growths counted, and those the kernel's slice table had no
    /// room for (in `slice_growths`, under no site).
    pub slice_growths: u64,
    pub slices_unattributed: u64,
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
    /// What each completed cycle's record ([`GcCycle`]) is read from.
    pub trace: GcTraceConfig,
    /// The return addresses on the stack of the goroutine that started the
    /// cycle in progress, taken when its sweep termination ended (`nframes`
    /// of them; 0 once used, or if not seen).
    pub frames: [u64; GC_FRAMES],
    pub nframes: u32,
    pub _pad2: u32,
    /// Cycle records the ring had no room for.
    pub cycles_lost: u64,
}

/// Return addresses kept of the goroutine that started a GC cycle: the
/// caller of `runtime.gcStart` (what triggered it) and, for a forced
/// cycle, the function that called `runtime.GC` past the runtime's own.
pub const GC_FRAMES: usize = 16;
/// Bytes of `runtime.work`, `runtime.gcController` and `runtime.memstats`
/// a cycle record copies (each a window holding every field gctrace prints;
/// the agent checks they fit).
pub const GC_WORK_BYTES: usize = 256;
pub const GC_CTRL_BYTES: usize = 128;
pub const GC_MSTATS_BYTES: usize = 32;
/// The ring of cycle records: 560 bytes and a header each, so some 450 can
/// wait for the agent's next read (every 250 ms).
pub const GC_RING_BYTES: u32 = 256 * 1024;

/// Where a process's cycle records are read from: runtime addresses of the
/// three windows (0: no records), and the offsets that lead from the
/// system stack to the goroutine that stopped the world.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcTraceConfig {
    pub work: u64,
    pub ctrl: u64,
    pub mstats: u64,
    /// `g.m`, `m.curg`, `g.sched.bp`.
    pub g_m: u16,
    pub m_curg: u16,
    pub g_sched_bp: u16,
    pub _pad: u16,
}

/// One completed GC cycle as the runtime had it when the world restarted
/// after mark termination (every field `GODEBUG=gctrace=1` prints is final
/// then), with the stack of the goroutine that started it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcCycle {
    pub pid: u32,
    pub nframes: u32,
    pub frames: [u64; GC_FRAMES],
    pub work: [u8; GC_WORK_BYTES],
    pub ctrl: [u8; GC_CTRL_BYTES],
    pub mstats: [u8; GC_MSTATS_BYTES],
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
            trace: GcTraceConfig::default(),
            frames: [0; GC_FRAMES],
            nframes: 0,
            _pad2: 0,
            cycles_lost: 0,
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
    unsafe impl aya::Pod for super::SliceKey {}
    unsafe impl aya::Pod for super::SliceCount {}
    unsafe impl aya::Pod for super::SliceWindow {}
    unsafe impl aya::Pod for super::MapKey {}
    unsafe impl aya::Pod for super::MapSeen {}
    unsafe impl aya::Pod for super::LifeEvent {}
    unsafe impl aya::Pod for super::GcTraceConfig {}
    unsafe impl aya::Pod for super::GcCycle {}
}

/// Go's size classes (`runtime/sizeclasses.go`, `internal/runtime/gc` from
/// Go 1.25; the same in 1.21 to 1.27, which a test checks against each
/// toolchain's source): the bytes the allocator gives a small request of
/// `size`, by `ceil(size / 8)` up to 1024 bytes ...
pub const SIZE_CLASS_BYTES8: [u16; 129] = [
    0, 8, 16, 24, 32, 48, 48, 64, 64, 80, 80, 96, 96, 112, 112, 128, 128, 144, 144, 160, 160, 176,
    176, 192, 192, 208, 208, 224, 224, 240, 240, 256, 256, 288, 288, 288, 288, 320, 320, 320, 320,
    352, 352, 352, 352, 384, 384, 384, 384, 416, 416, 416, 416, 448, 448, 448, 448, 480, 480, 480,
    480, 512, 512, 512, 512, 576, 576, 576, 576, 576, 576, 576, 576, 640, 640, 640, 640, 640, 640,
    640, 640, 704, 704, 704, 704, 704, 704, 704, 704, 768, 768, 768, 768, 768, 768, 768, 768, 896,
    896, 896, 896, 896, 896, 896, 896, 896, 896, 896, 896, 896, 896, 896, 896, 1024, 1024, 1024,
    1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024,
];
/// ... and by `ceil((size - 1024) / 128)` above, up to 32 KiB.
pub const SIZE_CLASS_BYTES128: [u16; 249] = [
    1024, 1152, 1280, 1408, 1536, 1792, 1792, 2048, 2048, 2304, 2304, 2688, 2688, 2688, 3072, 3072,
    3072, 3200, 3456, 3456, 4096, 4096, 4096, 4096, 4096, 4864, 4864, 4864, 4864, 4864, 4864, 5376,
    5376, 5376, 5376, 6144, 6144, 6144, 6144, 6144, 6144, 6528, 6528, 6528, 6784, 6784, 6912, 8192,
    8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192, 9472, 9472, 9472, 9472, 9472, 9472, 9472,
    9472, 9472, 9472, 9728, 9728, 10240, 10240, 10240, 10240, 10880, 10880, 10880, 10880, 10880,
    12288, 12288, 12288, 12288, 12288, 12288, 12288, 12288, 12288, 12288, 12288, 13568, 13568,
    13568, 13568, 13568, 13568, 13568, 13568, 13568, 13568, 14336, 14336, 14336, 14336, 14336,
    14336, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384,
    16384, 16384, 16384, 16384, 18432, 18432, 18432, 18432, 18432, 18432, 18432, 18432, 18432,
    18432, 18432, 18432, 18432, 18432, 18432, 18432, 19072, 19072, 19072, 19072, 19072, 20480,
    20480, 20480, 20480, 20480, 20480, 20480, 20480, 20480, 20480, 20480, 21760, 21760, 21760,
    21760, 21760, 21760, 21760, 21760, 21760, 21760, 24576, 24576, 24576, 24576, 24576, 24576,
    24576, 24576, 24576, 24576, 24576, 24576, 24576, 24576, 24576, 24576, 24576, 24576, 24576,
    24576, 24576, 24576, 27264, 27264, 27264, 27264, 27264, 27264, 27264, 27264, 27264, 27264,
    27264, 27264, 27264, 27264, 27264, 27264, 27264, 27264, 27264, 27264, 27264, 28672, 28672,
    28672, 28672, 28672, 28672, 28672, 28672, 28672, 28672, 28672, 32768, 32768, 32768, 32768,
    32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768,
    32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768, 32768,
    32768, 32768,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_caps_follow_go() {
        assert_eq!(next_slice_cap(1, 0), 1);
        assert_eq!(next_slice_cap(5, 4), 8);
        assert_eq!(next_slice_cap(20, 4), 20);
        assert_eq!(next_slice_cap(257, 256), 512);
        // 512 + (512+768)/4 = 832.
        assert_eq!(next_slice_cap(513, 512), 832);
        assert_eq!(next_slice_cap(1500, 1000), 1994);
    }

    #[test]
    fn sizes_round_as_go_rounds_them() {
        assert_eq!(round_up_size(1, true, true), 8);
        assert_eq!(round_up_size(33, true, true), 48);
        assert_eq!(round_up_size(1020, true, true), 1024);
        assert_eq!(round_up_size(1025, true, true), 1152);
        // With pointers, past 512 bytes the header takes 8 (1.22+).
        assert_eq!(round_up_size(576, false, true), 632);
        assert_eq!(round_up_size(576, false, false), 576);
        assert_eq!(round_up_size(32768, true, true), 32768);
        assert_eq!(round_up_size(32768, true, false), 32768);
        assert_eq!(round_up_size(32761, false, true), 32768);
        assert_eq!(round_up_size(32760, false, true), 32760);
        assert_eq!(round_up_size(40000, true, true), 40960);
        // append to []int64 from 0: 1, 2, 4, 8 elements.
        assert_eq!(grown_slice_bytes(1, 0, 8, true, true), Some(8));
        // []string of 5 after 4: 8 elements, 128 bytes.
        assert_eq!(grown_slice_bytes(5, 4, 16, false, true), Some(128));
        // 3-byte elements: 6 bytes round to 8, which hold 2.
        assert_eq!(grown_slice_bytes(2, 1, 3, true, true), Some(6));
        // 1000 int64 + 500: 1994 elements, 15952 bytes, 16 KiB: 2048.
        assert_eq!(grown_slice_bytes(1500, 1000, 8, true, true), Some(16384));
        assert_eq!(grown_slice_bytes(2, 1, 0, true, true), None);
    }

    #[test]
    fn buckets() {
        assert_eq!(slice_bucket(1), 0);
        assert_eq!(slice_bucket(64), 0);
        assert_eq!(slice_bucket(65), 1);
        assert_eq!(slice_bucket(256), 1);
        assert_eq!(slice_bucket(64 << 20), 10);
        assert_eq!(slice_bucket((64 << 20) + 1), 11);
        assert_eq!(slice_bucket(u64::MAX), 11);
    }
}
