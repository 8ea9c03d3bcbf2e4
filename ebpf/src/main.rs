//! Uprobes on the Go runtime (linux/amd64, Go register ABI).
//!
//! Stop-the-world pauses: `runtime.stopTheWorldWithSema` entry records the
//! stop request, `runtime.startTheWorldWithSema` entry (Go 1.22+) replaces the
//! start with Go's own timestamp, and uprobes on each RET of
//! `startTheWorldWithSema` read the start-the-world time it returns and emit
//! one event per pause. `runtime.gcMarkTermination` entry counts completed GC
//! cycles. No uretprobes: they corrupt Go stacks when goroutine stacks move.
//!
//! Map growth is counted here, in the kernel, per (process, kind, site): a
//! growth hit reads the map header (and the swiss table header) in one read
//! each, walks frame pointers only until it leaves the runtime and the other
//! "plumbing" ranges the agent gave for the executable, and adds one to a
//! counter. Nothing is sent per growth and nobody is woken.
//!
//! Anomalies (a failed user read, a restart without a stop, a map header
//! the runtime cannot have made) are counted in the process's existing
//! entry and, with the agent's `--bpf-debug`, logged through aya-log. The
//! agent sets aya-log's `AYA_LOG_LEVEL` global (read-only data, frozen)
//! to 0 without the flag, so the verifier removes every logging branch.
#![no_std]
#![no_main]
// An atomic add to a map value (the BPF XADD instruction) needs the
// intrinsic: the BPF target has no `AtomicU64::fetch_add`. This crate is
// only ever built with the pinned nightly.
#![feature(core_intrinsics)]
#![allow(internal_features)]

#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!("gopulse reads Go's amd64 register ABI; only x86_64 is supported");

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{map, raw_tracepoint, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, RawTracePointContext},
};
use aya_log_ebpf::warn;
use gopulse_common::{
    GC_FRAMES, GC_RING_BYTES, GROW_CLASSIC_DOUBLE, GROW_CLASSIC_SAME_SIZE, GROW_SWISS_GROW,
    GROW_SWISS_PRUNE, GROW_SWISS_SPLIT, GROW_SWISS_TO_TABLE, GROWTH_DIR_WALK, GcCycle, GrowthCount,
    GrowthKey, LIFE_EXEC, LIFE_EXIT, LIFE_RING_BYTES, LifeEvent, MAP_HEADER_BYTES,
    MAP_IMPL_CLASSIC, MAX_GROWTH_KEYS, MAX_PLUMBING_PAGES, MAX_PROCS, MAX_SITE_DEPTH,
    MAX_SLICE_KEYS, MAX_TRACKED_MAPS, MapKey, MapSeen, PLUMBING_BLOCK_SHIFT, PROG_GC_MARK_TERM,
    PROG_GROW_CLASSIC, PROG_GROW_SLICE, PROG_GROW_TABLE, PROG_GROW_TO_TABLE, PROG_MAP_ASSIGN,
    PROG_MAP_DELETE, PROG_MAP_EVACUATE, PROG_PRUNE_BODY, PROG_PRUNE_TABLE, PROG_REHASH_TABLE,
    PROG_SPLIT_TABLE, PROG_STW_START_ENTRY, PROG_STW_START_RET, PROG_STW_STOP, PageBits, PageKey,
    PendingStw, ProcConfig, ProcCpu, ProcStats, SITE_CACHE, SITE_FOUND, SITE_OUTERMOST,
    START_ARGS_WORLDSTOP, STW_FLAG_CYCLE_DONE, STW_FLAG_END_AT_ENTRY, STW_FLAG_GO_START,
    STW_FLAG_IDLE, STW_FLAG_NO_START, STW_LOG, SWISS_GROUP_SLOTS, SWISS_MAX_TABLE_CAPACITY,
    SiteCache, SliceCount, SliceKey, SliceWindow, StwEvent, StwState, TABLE_HEADER_BYTES,
    grown_slice_bytes, slice_bucket,
};

/// Go's `stwGCMarkTerm`, the reason a cycle's final pause carries.
const STW_REASON_GC_MARK_TERM: u8 = 1;
/// Go's `stwGCSweepTerm`, the reason of a cycle's first pause.
const STW_REASON_GC_SWEEP_TERM: u8 = 2;

/// Processes the agent watches: the map probes' config and counters, one
/// copy per CPU (the agent writes the config to every copy, sums the
/// counters).
#[map]
static PROCS: PerCpuHashMap<u32, ProcCpu> = PerCpuHashMap::with_max_entries(MAX_PROCS, 0);

/// Per process: everything the stop-the-world probes need and count.
#[map]
static STW: HashMap<u32, StwState> = HashMap::with_max_entries(MAX_PROCS, 0);

/// Per executable and page of text: which 16-byte blocks are plumbing, the
/// functions the site walk steps over.
#[map]
static PLUMBING: HashMap<PageKey, PageBits> = HashMap::with_max_entries(MAX_PLUMBING_PAGES, 0);

/// Map growths per (process, kind, site), with the largest map seen there.
#[map]
static GROWTHS: HashMap<GrowthKey, GrowthCount> = HashMap::with_max_entries(MAX_GROWTH_KEYS, 0);

/// Slice growths per (process, site).
#[map]
static SLICES: HashMap<SliceKey, SliceCount> = HashMap::with_max_entries(MAX_SLICE_KEYS, 0);

/// A zeroed [`SliceCount`], never written: what a new slice site starts
/// from.
#[map]
static SLICE_ZERO: PerCpuArray<SliceCount> = PerCpuArray::with_max_entries(1, 0);

/// Per executable (`ProcConfig::exe_id`): when its slice growth probe
/// counts. The agent sizes it for `--max-processes` at load time.
#[map]
static SLICE_WINDOWS: Array<SliceWindow> = Array::with_max_entries(MAX_PROCS, 0);

/// The maps assignments and deletions touched: latest count, seed and site.
#[map]
static MAP_SEEN: LruHashMap<MapKey, MapSeen> = LruHashMap::with_max_entries(MAX_TRACKED_MAPS, 0);

/// Exec and exit events for discovery.
#[map]
static LIFE: RingBuf = RingBuf::with_byte_size(LIFE_RING_BYTES, 0);

/// Completed GC cycles, as gctrace prints them (`GcCycle`): written at
/// the end of each cycle without a wakeup; the agent reads them on its
/// own schedule.
#[map]
static GC_RING: RingBuf = RingBuf::with_byte_size(GC_RING_BYTES, 0);

/// Lifecycle events the ring had no room for (the agent rescans /proc when
/// this grows).
#[map]
static LIFE_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn life_event(pid: u32, kind: u32) {
    let e = LifeEvent {
        pid,
        kind,
        // SAFETY: no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
    };
    if LIFE.output::<LifeEvent>(e, 0).is_err()
        && let Some(n) = LIFE_LOST.get_ptr_mut(0)
    {
        // SAFETY: this CPU's slot of a live array.
        unsafe { *n += 1 };
    }
}

/// `sched_process_exec`: the current task has just become a new program.
/// Every exec is sent; the agent decides, once per executable, whether it
/// is Go. (A raw tracepoint: attached by name, no tracefs needed.)
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(_ctx: RawTracePointContext) -> i32 {
    life_event(current_pid(), LIFE_EXEC);
    0
}

/// `sched_process_exit`, for each exiting thread: only a watched process's
/// thread-group leader is sent (Go's main thread lives until exit_group).
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn on_exit(_ctx: RawTracePointContext) -> i32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    // SAFETY: a lookup only, for presence.
    if tgid == tid && unsafe { STW.get(tgid) }.is_some() {
        life_event(tgid, LIFE_EXIT);
    }
    0
}

#[inline(always)]
fn regs(ctx: &ProbeContext) -> &pt_regs {
    // SAFETY: a uprobe context is the trapped task's register file.
    unsafe { &*ctx.regs }
}

/// Entry probes sit on the `JBE` of Go's stack check, so the flags of its
/// `CMP` are in the trapped registers. When the jump will be taken (CF or
/// ZF) the function goes through `morestack` and restarts from its entry,
/// hitting the probe again: count only the hit that falls through.
#[inline(always)]
fn will_restart(ctx: &ProbeContext) -> bool {
    const CF: u64 = 1 << 0;
    const ZF: u64 = 1 << 6;
    regs(ctx).eflags & (CF | ZF) != 0
}

#[inline(always)]
fn current_pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// This CPU's config, counters and site cache of a watched process, with
/// the program's hit counted: one lookup per run.
#[inline(always)]
fn enter(program: usize) -> Option<(u32, &'static mut ProcCpu)> {
    let pid = current_pid();
    let p = PROCS.get_ptr_mut(pid)?;
    // SAFETY: this CPU's copy of a live map value; BPF programs of this
    // object do not nest on one CPU. The agent writes the config only
    // before attaching.
    let p = unsafe { &mut *p };
    if let Some(h) = p.stats.hits.get_mut(program) {
        *h += 1;
    }
    Some((pid, p))
}

/// The stop-the-world state of a watched process, with the program's hit
/// counted: one lookup per run.
#[inline(always)]
fn enter_stw(program: usize) -> Option<(u32, &'static mut StwState)> {
    let pid = current_pid();
    let s = STW.get_ptr_mut(pid)?;
    // SAFETY: a live map value; Go's worldsema serialises the stops of a
    // process, so its stop-the-world probes never run at once.
    let s = unsafe { &mut *s };
    if let Some(h) = s.hits.get_mut(program) {
        *h += 1;
    }
    Some((pid, s))
}

#[inline(always)]
fn read<T: Copy + Default>(addr: u64) -> T {
    // SAFETY: bpf_probe_read_user copes with any address; a fault gives 0.
    unsafe { bpf_probe_read_user(addr as *const T) }.unwrap_or_default()
}

/// [`read`] that tells a fault from a 0.
#[inline(always)]
fn try_read<T: Copy>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user copes with any address.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Counts a failed read of a header at `addr` (anomaly `read_failed`).
/// Returns the probe's 0, for `return read_failed(..)`.
#[inline(always)]
fn read_failed(ctx: &ProbeContext, pid: u32, stats: &mut ProcStats, what: &str, addr: u64) -> u32 {
    stats.read_failed += 1;
    warn!(
        ctx,
        "anomaly read_failed pid={} reading the {} at {:x}", pid, what, addr
    );
    0
}

/// Counts a map header the runtime cannot have made where the probe sits
/// (anomaly `map_layout`): `a` and `b` are the fields that said so.
#[inline(always)]
fn map_layout(
    ctx: &ProbeContext,
    pid: u32,
    stats: &mut ProcStats,
    what: &str,
    map: u64,
    a: u64,
    b: u64,
) -> u32 {
    stats.map_layout += 1;
    warn!(
        ctx,
        "anomaly map_layout pid={} map {:x}: {} ({}, {})", pid, map, what, a, b
    );
    0
}

/// `runtime.stopTheWorldWithSema(reason stwReason)`: AL = reason. Attached
/// on Go 1.21 only: later releases pass the stop's time and reason to
/// `startTheWorldWithSema`.
#[uprobe]
pub fn stw_stop(ctx: ProbeContext) -> u32 {
    let Some((_, s)) = enter_stw(PROG_STW_STOP) else {
        return 0;
    };
    s.pending = PendingStw {
        start_ns: unsafe { bpf_ktime_get_ns() },
        reason: regs(&ctx).rax as u8,
        flags: 0,
        _pad: [0; 6],
        start_entry_ns: 0,
    };
    0
}

/// `runtime.startTheWorldWithSema(now int64, w worldStop)` entry, Go 1.22+:
/// take Go's own stop timestamp and reason, so our pause is Go's pause.
#[uprobe]
pub fn stw_start_entry(ctx: ProbeContext) -> u32 {
    let Some((_, s)) = enter_stw(PROG_STW_START_ENTRY) else {
        return 0;
    };
    let p = &mut s.pending;
    if s.start_args != START_ARGS_WORLDSTOP {
        // Go 1.21 passes nothing: note when the restart began.
        p.start_entry_ns = unsafe { bpf_ktime_get_ns() };
        return 0;
    }
    let r = regs(&ctx);
    p.start_ns = r.rcx;
    p.reason = r.rbx as u8;
    p.flags = (p.flags & !(STW_FLAG_NO_START | STW_FLAG_IDLE)) | STW_FLAG_GO_START;
    0
}

/// A RET of `runtime.startTheWorldWithSema`: RAX holds the start-the-world
/// time it returns (Go's `now`). Emits the pause.
#[uprobe]
pub fn stw_start_ret(ctx: ProbeContext) -> u32 {
    let Some((pid, s)) = enter_stw(PROG_STW_START_RET) else {
        return 0;
    };
    let mut end_ns = regs(&ctx).rax;
    let mut pending = s.pending;
    if pending.flags & STW_FLAG_IDLE != 0 {
        // No stop seen since the last pause (or since attaching).
        s.stw_unmatched += 1;
        warn!(
            &ctx,
            "anomaly stw_unmatched pid={}: the world restarted without a stop the probes saw", pid
        );
        return 0;
    }
    // Back to idle in place: a second return without a stop is unmatched.
    s.pending = PendingStw {
        flags: STW_FLAG_IDLE,
        ..PendingStw::default()
    };
    // Go 1.21 times GC pauses from work.pauseStart and ends a cycle's
    // mark-termination pause at gcMarkTermination's `now` (stored in
    // memstats.last_gc_nanotime), just before restarting the world. Later
    // releases pass both in registers.
    let gc =
        pending.reason == STW_REASON_GC_MARK_TERM || pending.reason == STW_REASON_GC_SWEEP_TERM;
    let cycle_end =
        pending.reason == STW_REASON_GC_MARK_TERM && pending.flags & STW_FLAG_CYCLE_DONE != 0;
    if gc && s.pause_start_addr != 0 {
        // The runtime's own globals: a failed read is an anomaly (the
        // pause then keeps the probes' times).
        let mut failed = 0;
        match try_read::<u64>(s.pause_start_addr) {
            Some(0) => {}
            Some(start) => {
                pending.start_ns = start;
                pending.flags = (pending.flags & !STW_FLAG_NO_START) | STW_FLAG_GO_START;
            }
            None => failed = s.pause_start_addr,
        }
        if cycle_end {
            match try_read::<u64>(s.last_gc_nanotime_addr) {
                Some(end) if end >= pending.start_ns && end != 0 => end_ns = end,
                Some(_) => {}
                None => failed = s.last_gc_nanotime_addr,
            }
        }
        if failed != 0 {
            s.read_failed += 1;
            warn!(
                &ctx,
                "anomaly read_failed pid={} reading the GC pause clock at {:x}", pid, failed
            );
        }
    } else if cycle_end && pending.start_entry_ns != 0 {
        // Stripped Go 1.21: the nearest point the probes see.
        end_ns = pending.start_entry_ns;
        pending.flags |= STW_FLAG_END_AT_ENTRY;
    }
    if s.trace.work != 0 {
        if pending.reason == STW_REASON_GC_SWEEP_TERM {
            walk_starter(s, regs(&ctx));
        } else if cycle_end {
            record_cycle(pid, s);
        }
    }
    // The agent reads the log on its own schedule: no wakeup. Volatile
    // writes keep their order: the entry before the count that publishes
    // it (x86 keeps stores in order).
    let seq = s.seq;
    if let Some(slot) = s.log.get_mut((seq as usize) & (STW_LOG - 1)) {
        let ev = StwEvent {
            pid,
            reason: pending.reason,
            flags: pending.flags,
            _pad: [0; 2],
            start_ns: pending.start_ns,
            end_ns,
        };
        // SAFETY: a valid, aligned place in a live map value.
        unsafe { core::ptr::write_volatile(slot, ev) };
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut s.seq, seq + 1) };
    0
}

/// At the end of a cycle's sweep termination: the return addresses of the
/// goroutine that started the cycle (the caller of `runtime.gcStart` says
/// why). The world restarts on the system stack (g0 in R14), and
/// `systemstack` left the goroutine's frame pointer in its `g.sched.bp`.
#[inline(always)]
fn walk_starter(s: &mut StwState, r: &pt_regs) {
    let t = s.trace;
    let m: u64 = read(r.r14.wrapping_add(u64::from(t.g_m)));
    let curg: u64 = read(m.wrapping_add(u64::from(t.m_curg)));
    let mut bp: u64 = read(curg.wrapping_add(u64::from(t.g_sched_bp)));
    let mut n = 0u32;
    for i in 0..GC_FRAMES {
        if bp == 0 {
            break;
        }
        let Some([next, ret]) = try_read::<[u64; 2]>(bp) else {
            break;
        };
        if ret == 0 {
            break;
        }
        if let Some(slot) = s.frames.get_mut(i) {
            *slot = ret;
        }
        n += 1;
        bp = next;
    }
    s.nframes = n;
}

/// At the end of a cycle's mark termination: the runtime's account of the
/// cycle (every field gctrace prints is final, and the runtime holds
/// `worldsema` until it has printed them), with the starter's stack.
#[inline(always)]
fn record_cycle(pid: u32, s: &mut StwState) {
    let Some(mut e) = GC_RING.reserve::<GcCycle>(0) else {
        s.cycles_lost += 1;
        return;
    };
    let c = e.as_mut_ptr();
    let t = s.trace;
    // SAFETY: `c` is the reserved record; bpf_probe_read_user_buf copes
    // with any source address (it zeroes the buffer on failure).
    let read = unsafe {
        (*c).pid = pid;
        (*c).nframes = s.nframes;
        (*c).frames = s.frames;
        bpf_probe_read_user_buf(t.work as *const u8, &mut (*c).work).is_ok()
            && bpf_probe_read_user_buf(t.ctrl as *const u8, &mut (*c).ctrl).is_ok()
            && bpf_probe_read_user_buf(t.mstats as *const u8, &mut (*c).mstats).is_ok()
    };
    s.nframes = 0;
    if read {
        e.submit(u64::from(BPF_RB_NO_WAKEUP));
    } else {
        e.discard(u64::from(BPF_RB_NO_WAKEUP));
        s.read_failed += 1;
    }
}

/// `runtime.gcMarkTermination` entry: once per completed cycle, inside the
/// mark-termination stop. The flag on the pending stop de-duplicates the
/// second hit when the stack check sends the function through `morestack`.
#[uprobe]
pub fn gc_mark_termination(ctx: ProbeContext) -> u32 {
    let Some((_, s)) = enter_stw(PROG_GC_MARK_TERM) else {
        return 0;
    };
    if will_restart(&ctx) {
        return 0;
    }
    let p = &mut s.pending;
    if p.flags & STW_FLAG_IDLE != 0 {
        // No stop seen (attached while the world was stopped, or Go 1.22+
        // where the stop is learnt at the restart): count the cycle, and
        // keep a marker so a second hit is not counted again.
        p.start_ns = 0;
        p.reason = STW_REASON_GC_MARK_TERM;
        p.flags = STW_FLAG_NO_START;
    } else if p.flags & STW_FLAG_CYCLE_DONE != 0 {
        return 0;
    }
    p.flags |= STW_FLAG_CYCLE_DONE;
    s.gc_cycles += 1;
    0
}

/// A header read in one go, as little-endian words.
#[derive(Clone, Copy)]
struct Header<const W: usize>([u64; W]);

impl<const W: usize> Header<W> {
    /// Reads `W` words at `addr`; `None` if the memory is not readable.
    #[inline(always)]
    fn read(addr: u64) -> Option<Self> {
        // SAFETY: bpf_probe_read_user copes with any address.
        unsafe { bpf_probe_read_user(addr as *const [u64; W]) }
            .ok()
            .map(Self)
    }

    /// The `bytes`-byte unsigned field at byte offset `off`. Go aligns every
    /// field to its size, so a field never straddles two words; the agent
    /// checked the offsets lie within the header.
    #[inline(always)]
    fn field(&self, off: u16, bytes: u32) -> u64 {
        let word = match self.0.get(usize::from(off / 8)) {
            Some(w) => *w,
            None => return 0,
        };
        let shifted = word >> (u32::from(off % 8) * 8);
        if bytes >= 8 {
            shifted
        } else {
            shifted & ((1u64 << (bytes * 8)) - 1)
        }
    }
}

type MapHeader = Header<{ MAP_HEADER_BYTES / 8 }>;
type TableHeader = Header<{ TABLE_HEADER_BYTES / 8 }>;

/// Whether link-time address `a` of executable `exe_id` is plumbing.
#[inline(always)]
fn in_plumbing(exe_id: u32, a: u64) -> bool {
    let key = PageKey {
        exe_id,
        page: (a >> 12) as u32,
    };
    // SAFETY: read once; the agent removes an executable's pages only after
    // detaching its processes.
    let Some(bits) = (unsafe { PLUMBING.get(key) }) else {
        return false;
    };
    let block = ((a >> PLUMBING_BLOCK_SHIFT) & 0xff) as usize;
    match bits.0.get(block / 64) {
        Some(w) => w & (1 << (block % 64)) != 0,
        None => false,
    }
}

/// [`in_plumbing`] through this CPU's cache of recent verdicts.
#[inline(always)]
fn plumbing_cached(cache: &mut SiteCache, exe_id: u32, a: u64) -> bool {
    let i = ((a >> 4) as usize) & (SITE_CACHE - 1);
    let bit = 1u64 << i;
    if let Some(pc) = cache.pc.get_mut(i) {
        if *pc == a {
            return cache.plumbing & bit != 0;
        }
        *pc = a;
    }
    let verdict = in_plumbing(exe_id, a);
    if verdict {
        cache.plumbing |= bit;
    } else {
        cache.plumbing &= !bit;
    }
    verdict
}

/// The site of a map operation: the first caller frame outside the
/// executable's plumbing, as a link-time return address, with `SITE_*`.
/// Each frame is one 16-byte read from RBP's chain. Probes at a function's
/// entry sit before its frame is built: RBP is still the caller's frame
/// pointer and [RSP] the return address into the caller, whose verdict the
/// access probes check first (`check_rsp`); growth functions are called
/// only by the runtime, so their probes skip it, as does a probe inside a
/// function whose frame is built (RBP is then its own frame).
#[inline(always)]
fn find_site(p: &mut ProcCpu, r: &pt_regs, check_rsp: bool) -> (u64, u8) {
    let bias = p.config.load_bias;
    let exe = p.config.exe_id;
    let mut last = 0;
    if check_rsp {
        let ret0 = read::<u64>(r.rsp);
        if ret0 == 0 {
            return (0, SITE_OUTERMOST);
        }
        let a0 = ret0.wrapping_sub(bias);
        if !plumbing_cached(&mut p.sites, exe, a0) {
            return (a0, SITE_FOUND);
        }
        last = a0;
    }
    let mut fp = r.rbp;
    for _ in 0..MAX_SITE_DEPTH {
        if fp == 0 {
            break;
        }
        // [fp] is the caller's saved frame pointer, [fp+8] the return
        // address into it.
        let Some(Header([next, ret])) = Header::<2>::read(fp) else {
            break;
        };
        if ret == 0 {
            break;
        }
        let a = ret.wrapping_sub(bias);
        if !plumbing_cached(&mut p.sites, exe, a) {
            return (a, SITE_FOUND);
        }
        last = a;
        fp = next;
    }
    (last, SITE_OUTERMOST)
}

/// What a growth probe learnt of the map that grew.
struct Grown {
    kind: u8,
    map: u64,
    seed: u64,
    count: u64,
    /// Its slots and overflow buckets or tables (`GrowthCount`).
    capacity: u64,
    extra: u32,
}

/// Whether the map recorded in a hint no longer holds its seed (freed, its
/// memory reused): any map growing at the site may replace it.
#[inline(always)]
fn gone(cfg: &ProcConfig, hint: &GrowthCount) -> bool {
    if cfg.map_impl == MAP_IMPL_CLASSIC {
        u64::from(read::<u32>(
            hint.map.wrapping_add(u64::from(cfg.hmap_hash0)),
        )) != hint.seed
    } else {
        read::<u64>(hint.map.wrapping_add(u64::from(cfg.map_seed))) != hint.seed
    }
}

/// Counts a growth under its site, keeping the largest map seen there.
#[inline(always)]
fn record_growth(ctx: &ProbeContext, pid: u32, p: &mut ProcCpu, g: Grown) {
    p.stats.map_growths += 1;
    let (site, site_flags) = find_site(p, regs(ctx), false);
    let cfg = &p.config;
    let stats = &mut p.stats;
    if site_flags != SITE_FOUND {
        stats.sites_outermost += 1;
    }
    let key = GrowthKey {
        pid,
        kind: g.kind,
        site_flags,
        _pad: [0; 2],
        site,
    };
    let existing = match GROWTHS.get_ptr_mut(key) {
        Some(v) => Some(v),
        None => {
            let first = GrowthCount {
                growths: 1,
                map: g.map,
                seed: g.seed,
                count: g.count,
                capacity: g.capacity,
                extra: g.extra,
                _pad: 0,
            };
            match GROWTHS.insert(key, first, BPF_NOEXIST as u64) {
                Ok(()) => return,
                // Another CPU added it meanwhile: count into that one.
                Err(_) => GROWTHS.get_ptr_mut(key),
            }
        }
    };
    let Some(v) = existing else {
        stats.growths_unattributed += 1;
        return;
    };
    // SAFETY: a live value of the growth table; the counter is shared by
    // every CPU (atomic add), the hint fields are advisory.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*v).growths, 1);
        let hint = &mut *v;
        if hint.map == g.map || g.count >= hint.count || gone(cfg, hint) {
            hint.map = g.map;
            hint.seed = g.seed;
            hint.count = g.count;
            hint.capacity = g.capacity;
            hint.extra = g.extra;
        }
    }
}

/// Classic `runtime.hashGrow(t *maptype, h *hmap)`: RBX = h. A doubling
/// unless the map is under its load factor (then it grew for too many
/// overflow buckets): the runtime's own `overLoadFactor(count+1, B)`.
#[uprobe]
pub fn grow_classic(ctx: ProbeContext) -> u32 {
    let Some((pid, p)) = enter(PROG_GROW_CLASSIC) else {
        return 0;
    };
    if will_restart(&ctx) {
        p.stats.growth_refires += 1;
        return 0;
    }
    let cfg = &p.config;
    let h = regs(&ctx).rbx;
    let Some(hdr) = MapHeader::read(h) else {
        return read_failed(&ctx, pid, &mut p.stats, "map header", h);
    };
    let count = hdr.field(cfg.hmap_count, 8);
    let b = hdr.field(cfg.hmap_b, 1);
    let seed = hdr.field(cfg.hmap_hash0, 4);
    let old = hdr.field(cfg.hmap_oldbuckets, 8);
    // hashGrow runs only on a map not growing already, and B is at most 56
    // (beyond, no map fits in memory): anything else is not an hmap as the
    // offsets describe it.
    if b > 56 || old != 0 {
        return map_layout(
            &ctx,
            pid,
            &mut p.stats,
            "hashGrow on B, oldbuckets",
            h,
            b,
            old,
        );
    }
    // overLoadFactor: count > bucketCnt && count > loadFactorNum*(2^B/2).
    let after = count.wrapping_add(1);
    let over = after > 8 && after > u64::from(cfg.load_factor_num) * ((1u64 << b) / 2);
    let kind = if over {
        GROW_CLASSIC_DOUBLE
    } else {
        GROW_CLASSIC_SAME_SIZE
    };
    let g = Grown {
        kind,
        map: h,
        seed,
        count,
        capacity: 8u64 << b,
        extra: hdr.field(cfg.hmap_noverflow, 2) as u32,
    };
    record_growth(&ctx, pid, p, g);
    0
}

/// A swiss growth: `m` is the map header; `at_entry` for probes on the
/// stack check's jump (whose flags say whether the function restarts).
#[inline(always)]
fn swiss_growth(ctx: &ProbeContext, program: usize, kind: u8, m: u64, at_entry: bool) -> u32 {
    let Some((pid, p)) = enter(program) else {
        return 0;
    };
    if at_entry && will_restart(ctx) {
        p.stats.growth_refires += 1;
        return 0;
    }
    swiss_grew(ctx, pid, p, kind, m, regs(ctx).rax)
}

/// Counts a swiss growth of `kind` of the map at `m`, once its probe has
/// decided it happens; `t` is the table that grows (unused for a small
/// map).
#[inline(always)]
fn swiss_grew(ctx: &ProbeContext, pid: u32, p: &mut ProcCpu, kind: u8, m: u64, t: u64) -> u32 {
    let Some(hdr) = MapHeader::read(m) else {
        return read_failed(ctx, pid, &mut p.stats, "map header", m);
    };
    if let Some((dir_len, depth)) = implausible_dir(&p.config, &hdr, kind) {
        return map_layout(
            ctx,
            pid,
            &mut p.stats,
            "swiss growth on dirLen, globalDepth",
            m,
            dir_len,
            depth,
        );
    }
    let (capacity, tables) = swiss_shape(&p.config, &hdr, t);
    let g = Grown {
        kind,
        map: m,
        seed: hdr.field(p.config.map_seed, 8),
        count: hdr.field(p.config.map_used, 8),
        capacity,
        extra: tables,
    };
    record_growth(ctx, pid, p, g);
    0
}

/// A swiss map's slots and distinct tables as it grows: a small map is one
/// group; a map of one table has that table's capacity; the tables of a
/// bigger map all hold `maxTableCapacity` (only a full table splits, into
/// two of that size; a map made with a hint past it gets tables that round
/// up to it), and a table's directory entries are contiguous, so they are
/// counted by walking the directory. `(0, 0)` when not known (a directory
/// longer than `GROWTH_DIR_WALK`, or unreadable).
#[inline(always)]
fn swiss_shape(cfg: &ProcConfig, hdr: &MapHeader, t: u64) -> (u64, u32) {
    let dir_len = hdr.field(cfg.map_dir_len, 8);
    if dir_len == 0 {
        return (SWISS_GROUP_SLOTS, 0);
    }
    if dir_len == 1 {
        return match try_read::<u16>(t.wrapping_add(u64::from(cfg.table_capacity))) {
            Some(cap) => (u64::from(cap), 1),
            None => (0, 0),
        };
    }
    if dir_len > GROWTH_DIR_WALK as u64 {
        return (0, 0);
    }
    let dir = hdr.field(cfg.map_dir_ptr, 8);
    let mut tables = 0u32;
    let mut last = 0u64;
    for chunk in 0..GROWTH_DIR_WALK / 8 {
        let first = (chunk * 8) as u64;
        if first >= dir_len {
            break;
        }
        let Some(Header(entries)) = Header::<8>::read(dir.wrapping_add(first * 8)) else {
            return (0, 0);
        };
        // Branch-free, so the verifier walks the loop once (6.1's did not
        // prune the 64 branches of `if e != last`: E2BIG).
        for (i, &e) in entries.iter().enumerate() {
            let in_dir = u64::from(first + (i as u64) < dir_len);
            let d = e ^ last;
            let differs = (d | d.wrapping_neg()) >> 63;
            tables += (differs & in_dir) as u32;
            let keep = in_dir.wrapping_sub(1); // all ones past the directory
            last = (e & !keep) | (last & keep);
        }
    }
    (u64::from(tables) * SWISS_MAX_TABLE_CAPACITY, tables)
}

/// A swiss map's directory that cannot be where a growth probe sits: a
/// small map (no directory) becomes a table; the table operations run on a
/// directory of 2^globalDepth tables. `Some((dirLen, globalDepth))` if so.
#[inline(always)]
fn implausible_dir(cfg: &ProcConfig, hdr: &MapHeader, kind: u8) -> Option<(u64, u64)> {
    let dir_len = hdr.field(cfg.map_dir_len, 8);
    let depth = hdr.field(cfg.map_global_depth, 1);
    let ok = if kind == GROW_SWISS_TO_TABLE {
        dir_len == 0
    } else {
        depth < 64 && dir_len == 1 << depth
    };
    (!ok).then_some((dir_len, depth))
}

/// `(*Map).growToTable(typ)`: RAX = m.
#[uprobe]
pub fn grow_to_table(ctx: ProbeContext) -> u32 {
    let m = regs(&ctx).rax;
    swiss_growth(&ctx, PROG_GROW_TO_TABLE, GROW_SWISS_TO_TABLE, m, true)
}

/// `(*table).grow(typ, m, newCapacity)`: RAX = t, RCX = m.
#[uprobe]
pub fn grow_table(ctx: ProbeContext) -> u32 {
    let m = regs(&ctx).rcx;
    swiss_growth(&ctx, PROG_GROW_TABLE, GROW_SWISS_GROW, m, true)
}

/// `(*table).split(typ, m)`: RAX = t, RCX = m.
#[uprobe]
pub fn split_table(ctx: ProbeContext) -> u32 {
    let m = regs(&ctx).rcx;
    swiss_growth(&ctx, PROG_SPLIT_TABLE, GROW_SWISS_SPLIT, m, true)
}

/// `(*table).rehash(typ, m)`: RAX = t, RCX = m. Attached where `grow` and
/// `split` were inlined into it (profile-guided builds), as Go 1.24-1.27
/// decide between them: `grow(typ, m, 2*t.capacity)` while that is at most
/// `maxTableCapacity`, else `split(typ, m)`. Only a table that must grow
/// gets here (the callers prune tombstones first), so every call is one
/// growth.
#[uprobe]
pub fn rehash_table(ctx: ProbeContext) -> u32 {
    let Some((pid, p)) = enter(PROG_REHASH_TABLE) else {
        return 0;
    };
    if will_restart(&ctx) {
        p.stats.growth_refires += 1;
        return 0;
    }
    let r = regs(&ctx);
    let (t, m) = (r.rax, r.rcx);
    let Some(cap) = try_read::<u16>(t.wrapping_add(u64::from(p.config.table_capacity))) else {
        return read_failed(&ctx, pid, &mut p.stats, "table header", t);
    };
    let cap = u64::from(cap);
    // A table holds a power of two of 8-slot groups, up to the maximum.
    if !cap.is_power_of_two() || !(SWISS_GROUP_SLOTS..=SWISS_MAX_TABLE_CAPACITY).contains(&cap) {
        return map_layout(
            &ctx,
            pid,
            &mut p.stats,
            "rehash of a table of capacity",
            t,
            cap,
            0,
        );
    }
    let kind = if 2 * cap <= SWISS_MAX_TABLE_CAPACITY {
        GROW_SWISS_GROW
    } else {
        GROW_SWISS_SPLIT
    };
    swiss_grew(&ctx, pid, p, kind, m, t)
}

/// `(*table).pruneTombstones(typ, m)` (Go 1.25+): RAX = t, RCX = m. Called
/// before every rehash; it returns at once unless tombstones are at least
/// 10% of the table (Go's own test): count only the prunes that happen.
#[uprobe]
pub fn prune_table(ctx: ProbeContext) -> u32 {
    let Some((pid, p)) = enter(PROG_PRUNE_TABLE) else {
        return 0;
    };
    if will_restart(&ctx) {
        p.stats.growth_refires += 1;
        return 0;
    }
    let cfg = &p.config;
    let r = regs(&ctx);
    let (t, m) = (r.rax, r.rcx);
    let Some(table) = TableHeader::read(t) else {
        return read_failed(&ctx, pid, &mut p.stats, "table header", t);
    };
    let cap = table.field(cfg.table_capacity, 2);
    let used = table.field(cfg.table_used, 2);
    let left = table.field(cfg.table_growth_left, 2);
    // tombstones() = capacity*7/8 - used - growthLeft, in uint16 as Go has it.
    let tombstones = (cap * 7 / 8).wrapping_sub(used).wrapping_sub(left) & 0xffff;
    if tombstones * 10 < cap {
        return 0;
    }
    swiss_grew(&ctx, pid, p, GROW_SWISS_PRUNE, m, t)
}

/// `(*table).pruneTombstones` past its "too few tombstones" return, on the
/// body's first jump (Go 1.25+, where the agent found it in the binary):
/// every hit is a prune that happens. RCX = m still; the frame is built; the
/// flags are not the stack check's (and a restart through morestack goes
/// back past the stack check before it gets here).
#[uprobe]
pub fn prune_body(ctx: ProbeContext) -> u32 {
    let m = regs(&ctx).rcx;
    swiss_growth(&ctx, PROG_PRUNE_BODY, GROW_SWISS_PRUNE, m, false)
}

/// An assignment or deletion: remember the map's count, seed and the Go
/// function that owns it (its site). Hot: nanoseconds of work per call in
/// Go, so these probes are attached only when asked to.
#[inline(always)]
fn on_access(ctx: &ProbeContext, program: usize) -> u32 {
    let Some((pid, p)) = enter(program) else {
        return 0;
    };
    if will_restart(ctx) {
        return 0;
    }
    let r = regs(ctx);
    let map = r.rbx;
    if map == 0 {
        return 0; // a nil map: the runtime panics (assign) or returns
    }
    let Some(hdr) = MapHeader::read(map) else {
        return 0;
    };
    let cfg = &p.config;
    let (count, seed) = if cfg.map_impl == MAP_IMPL_CLASSIC {
        (hdr.field(cfg.hmap_count, 8), hdr.field(cfg.hmap_hash0, 4))
    } else {
        (hdr.field(cfg.map_used, 8), hdr.field(cfg.map_seed, 8))
    };
    let key = MapKey { pid, _pad: 0, map };
    let (site, _) = find_site(p, r, true);
    let seen = MapSeen { seed, count, site };
    match MAP_SEEN.get_ptr_mut(key) {
        // A map seen before: updated in place, without the LRU's insert
        // (allocation, list moves), which costs more than the rest.
        // SAFETY: a live value; a racing writer can only leave another
        // recent view of the same map.
        Some(v) => unsafe { *v = seen },
        None => {
            p.stats.maps_added += 1;
            let _ = MAP_SEEN.insert(key, seen, BPF_ANY as u64);
        }
    }
    0
}

/// `runtime.mapassign*(typ, m, key)`: RAX = typ, RBX = m.
#[uprobe]
pub fn map_assign(ctx: ProbeContext) -> u32 {
    on_access(&ctx, PROG_MAP_ASSIGN)
}

/// `runtime.mapdelete*(typ, m, key)`: RAX = typ, RBX = m.
#[uprobe]
pub fn map_delete(ctx: ProbeContext) -> u32 {
    on_access(&ctx, PROG_MAP_DELETE)
}

/// Classic `runtime.evacuate*(t, h, oldbucket)`: RAX = t, RBX = h, RCX =
/// oldbucket. `growWork` calls it for the bucket about to be written and for
/// the next one in order, either of which may be moved already: count only
/// calls that find the old bucket not yet evacuated (tophash[0] is not
/// evacuatedX/Y/Empty, 2 to 4). Attached with the assignment probes (as hot
/// as writes while a map grows).
#[uprobe]
pub fn map_evacuate(ctx: ProbeContext) -> u32 {
    let Some((_, p)) = enter(PROG_MAP_EVACUATE) else {
        return 0;
    };
    let cfg = &p.config;
    if will_restart(&ctx) {
        return 0;
    }
    let r = regs(&ctx);
    let (t, h, oldbucket) = (r.rax, r.rbx, r.rcx);
    let old = read::<u64>(h + u64::from(cfg.hmap_oldbuckets));
    let size = u64::from(read::<u16>(t + u64::from(cfg.maptype_bucket_size)));
    if old == 0 || size == 0 {
        return 0;
    }
    let top = read::<u8>(old.wrapping_add(oldbucket.wrapping_mul(size)));
    if !(2..=4).contains(&top) {
        p.stats.evacuations += 1;
    }
    0
}

/// `runtime.growslice(oldPtr, newLen, oldCap, num, et)`: RBX = newLen,
/// RCX = oldCap, RDI = num, RSI = et. Counts the growth at its site (the
/// caller of growslice, past plumbing such as `reflect`), with the bytes
/// it copies (old length × element size) and the new capacity in bytes, as
/// the runtime computes it (`grown_slice_bytes`). Counted only within the
/// executable's window (sampled) or always.
#[uprobe]
pub fn grow_slice(ctx: ProbeContext) -> u32 {
    let Some((pid, p)) = enter(PROG_GROW_SLICE) else {
        return 0;
    };
    if will_restart(&ctx) {
        return 0;
    }
    let Some(w) = SLICE_WINDOWS.get(p.config.exe_id) else {
        return 0;
    };
    if w.end != u64::MAX {
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        if now < w.start || now >= w.end {
            return 0;
        }
    }
    let r = regs(&ctx);
    let (new_len, old_cap, num, et) = (r.rbx as i64, r.rcx as i64, r.rdi as i64, r.rsi);
    let Some(ty) = Header::<2>::read(et) else {
        return read_failed(&ctx, pid, &mut p.stats, "slice element type", et);
    };
    let size = ty.field(p.config.type_size, 8);
    let noscan = ty.field(p.config.type_ptr_bytes, 8) == 0;
    let old_len = new_len.wrapping_sub(num);
    // A zero-size element allocates nothing; a call the runtime would
    // panic on grows nothing.
    if old_len < 0 || (new_len as u64) <= (old_cap as u64) {
        return 0;
    }
    let Some(bytes) =
        grown_slice_bytes(new_len, old_cap, size, noscan, p.config.malloc_header != 0)
    else {
        return 0;
    };
    p.stats.slice_growths += 1;
    let (site, site_flags) = find_site(p, r, true);
    if site_flags != SITE_FOUND {
        p.stats.sites_outermost += 1;
    }
    let key = SliceKey {
        pid,
        site_flags,
        _pad: [0; 3],
        site,
    };
    let copied = (old_len as u64).wrapping_mul(size);
    let bucket = slice_bucket(bytes);
    let v = match SLICES.get_ptr_mut(key) {
        Some(v) => v,
        None => {
            // A new site: a zeroed entry, inserted from map memory (a
            // value on the stack would not fit it), then counted into.
            if let Some(zero) = SLICE_ZERO.get(0) {
                let _ = SLICES.insert(key, zero, BPF_NOEXIST as u64);
            }
            match SLICES.get_ptr_mut(key) {
                Some(v) => v,
                None => {
                    p.stats.slices_unattributed += 1;
                    return 0;
                }
            }
        }
    };
    // SAFETY: a live value of the slice table, shared by every CPU: atomic
    // adds only.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*v).copied, copied);
        if let Some(c) = (*v).counts.get_mut(bucket) {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(c, 1);
        }
        if let Some(b) = (*v).bytes.get_mut(bucket) {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(b, bytes);
        }
    }
    0
}

/// Does nothing: the agent attaches it to a function of its own to time
/// what a uprobe trap costs on this machine.
#[uprobe]
pub fn calibrate(_ctx: ProbeContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
