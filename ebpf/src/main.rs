//! Uprobes on the Go runtime (linux/amd64, Go register ABI).
//!
//! Stop-the-world pauses: `runtime.stopTheWorldWithSema` entry records the
//! stop request, `runtime.startTheWorldWithSema` entry (Go 1.22+) replaces the
//! start with Go's own timestamp, and uprobes on each RET of
//! `startTheWorldWithSema` read the start-the-world time it returns and emit
//! one event per pause. `runtime.gcMarkTermination` entry counts completed GC
//! cycles. No uretprobes: they corrupt Go stacks when goroutine stacks move.
#![no_std]
#![no_main]

#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!("gopulse reads Go's amd64 register ABI; only x86_64 is supported");

use aya_ebpf::{
    bindings::{BPF_ANY, pt_regs},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe},
    maps::{HashMap, LruHashMap, PerCpuHashMap, RingBuf},
    programs::ProbeContext,
};
use gopulse_common::{
    GROW_CLASSIC, GROW_SWISS_GROW, GROW_SWISS_PRUNE, GROW_SWISS_SMALL, GROW_SWISS_SPLIT,
    GROW_SWISS_TO_TABLE, GROWTH_FRAMES, GROWTH_RING_BYTES, GrowthEvent, MAP_IMPL_CLASSIC,
    MAX_PROCS, MAX_TRACKED_MAPS, MapKey, MapSeen, PROBE_ASSIGN, PROBE_DELETE, PROBE_EVACUATE,
    PROBE_GROWTH, PROBE_STW, PROBE_STW_RET, PendingStw, ProcConfig, ProcStats,
    START_ARGS_WORLDSTOP, STW_FLAG_CYCLE_DONE, STW_FLAG_END_AT_ENTRY, STW_FLAG_GO_START,
    STW_FLAG_NO_START, STW_RING_BYTES, StwEvent,
};

/// Go's `stwGCMarkTerm`, the reason a cycle's final pause carries.
const STW_REASON_GC_MARK_TERM: u8 = 1;
/// Go's `stwGCSweepTerm`, the reason of a cycle's first pause.
const STW_REASON_GC_SWEEP_TERM: u8 = 2;

/// Processes the agent watches, with their release-specific settings.
#[map]
static PROCS: HashMap<u32, ProcConfig> = HashMap::with_max_entries(MAX_PROCS, 0);

/// Per-process counters, one copy per CPU so increments need no atomics; the
/// agent creates the entry before attaching and sums the CPUs.
#[map]
static STATS: PerCpuHashMap<u32, ProcStats> = PerCpuHashMap::with_max_entries(MAX_PROCS, 0);

/// The stop-the-world in progress per process.
#[map]
static PENDING: HashMap<u32, PendingStw> = HashMap::with_max_entries(MAX_PROCS, 0);

/// One `StwEvent` per pause.
#[map]
static STW_EVENTS: RingBuf = RingBuf::with_byte_size(STW_RING_BYTES, 0);

/// One `GrowthEvent` per map growth.
#[map]
static GROWTH_EVENTS: RingBuf = RingBuf::with_byte_size(GROWTH_RING_BYTES, 0);

/// The maps assignments and deletions touched: latest count, seed and site.
#[map]
static MAP_SEEN: LruHashMap<MapKey, MapSeen> = LruHashMap::with_max_entries(MAX_TRACKED_MAPS, 0);

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

#[inline(always)]
fn watched(pid: u32) -> Option<&'static ProcConfig> {
    // SAFETY: entries are only replaced by the agent while no probe of that
    // process is attached.
    unsafe { PROCS.get(pid) }
}

#[inline(always)]
fn bump<F: FnOnce(&mut ProcStats) -> &mut u64>(pid: u32, field: F) {
    if let Some(stats) = STATS.get_ptr_mut(pid) {
        // SAFETY: this CPU's copy of a live map value; BPF programs are not
        // preempted by others on the same CPU.
        unsafe {
            let counter = field(&mut *stats);
            *counter += 1;
        }
    }
}

/// `runtime.stopTheWorldWithSema(reason stwReason)`: AL = reason (Go 1.21+).
#[uprobe]
pub fn stw_stop(ctx: ProbeContext) -> u32 {
    let pid = current_pid();
    if watched(pid).is_none() {
        return 0;
    }
    bump(pid, |s| &mut s.hits[PROBE_STW]);
    let pending = PendingStw {
        start_ns: unsafe { bpf_ktime_get_ns() },
        reason: regs(&ctx).rax as u8,
        flags: 0,
        _pad: [0; 6],
        start_entry_ns: 0,
    };
    let _ = PENDING.insert(pid, pending, BPF_ANY as u64);
    0
}

/// `runtime.startTheWorldWithSema(now int64, w worldStop)` entry, Go 1.22+:
/// take Go's own stop timestamp and reason, so our pause is Go's pause.
#[uprobe]
pub fn stw_start_entry(ctx: ProbeContext) -> u32 {
    let pid = current_pid();
    let Some(cfg) = watched(pid) else { return 0 };
    bump(pid, |s| &mut s.hits[PROBE_STW]);
    if cfg.start_args != START_ARGS_WORLDSTOP {
        // Go 1.21 passes nothing: note when the restart began.
        if let Some(p) = PENDING.get_ptr_mut(pid) {
            // SAFETY: a live map value of this process's pending stop.
            unsafe { (*p).start_entry_ns = bpf_ktime_get_ns() };
        }
        return 0;
    }
    let r = regs(&ctx);
    let start_ns = r.rcx;
    let reason = r.rbx as u8;
    match PENDING.get_ptr_mut(pid) {
        Some(p) => unsafe {
            (*p).start_ns = start_ns;
            (*p).reason = reason;
            (*p).flags = ((*p).flags & !STW_FLAG_NO_START) | STW_FLAG_GO_START;
        },
        None => {
            let pending = PendingStw {
                start_ns,
                reason,
                flags: STW_FLAG_GO_START,
                _pad: [0; 6],
                start_entry_ns: 0,
            };
            let _ = PENDING.insert(pid, pending, BPF_ANY as u64);
        }
    }
    0
}

/// A RET of `runtime.startTheWorldWithSema`: RAX holds the start-the-world
/// time it returns (Go's `now`). Emits the pause.
#[uprobe]
pub fn stw_start_ret(ctx: ProbeContext) -> u32 {
    let pid = current_pid();
    let Some(cfg) = watched(pid) else { return 0 };
    bump(pid, |s| &mut s.hits[PROBE_STW_RET]);
    let mut end_ns = regs(&ctx).rax;
    // SAFETY: read once and copied; the entry is removed below.
    let Some(mut pending) = (unsafe { PENDING.get(pid) }).copied() else {
        bump(pid, |s| &mut s.stw_unmatched);
        return 0;
    };
    // Go 1.21 times GC pauses from work.pauseStart and ends a cycle's
    // mark-termination pause at gcMarkTermination's `now` (stored in
    // memstats.last_gc_nanotime), just before restarting the world. Later
    // releases pass both in registers.
    let gc =
        pending.reason == STW_REASON_GC_MARK_TERM || pending.reason == STW_REASON_GC_SWEEP_TERM;
    let cycle_end =
        pending.reason == STW_REASON_GC_MARK_TERM && pending.flags & STW_FLAG_CYCLE_DONE != 0;
    if gc && cfg.pause_start_addr != 0 {
        let start = read::<u64>(cfg.pause_start_addr);
        if start != 0 {
            pending.start_ns = start;
            pending.flags = (pending.flags & !STW_FLAG_NO_START) | STW_FLAG_GO_START;
        }
        if cycle_end {
            let end = read::<u64>(cfg.last_gc_nanotime_addr);
            if end >= pending.start_ns && end != 0 {
                end_ns = end;
            }
        }
    } else if cycle_end && pending.start_entry_ns != 0 {
        // Stripped Go 1.21: the nearest point the probes see.
        end_ns = pending.start_entry_ns;
        pending.flags |= STW_FLAG_END_AT_ENTRY;
    }
    let _ = PENDING.remove(pid);
    match STW_EVENTS.reserve::<StwEvent>(0) {
        Some(mut entry) => {
            entry.write(StwEvent {
                pid,
                reason: pending.reason,
                flags: pending.flags,
                _pad: [0; 2],
                start_ns: pending.start_ns,
                end_ns,
            });
            entry.submit(0);
        }
        None => bump(pid, |s| &mut s.events_lost),
    }
    0
}

/// `runtime.gcMarkTermination` entry: once per completed cycle, inside the
/// mark-termination stop. The flag on the pending stop de-duplicates the
/// second hit when the stack check sends the function through `morestack`.
#[uprobe]
pub fn gc_mark_termination(ctx: ProbeContext) -> u32 {
    let pid = current_pid();
    if watched(pid).is_none() {
        return 0;
    }
    bump(pid, |s| &mut s.hits[PROBE_STW]);
    if will_restart(&ctx) {
        return 0;
    }
    match PENDING.get_ptr_mut(pid) {
        Some(p) => unsafe {
            if (*p).flags & STW_FLAG_CYCLE_DONE != 0 {
                return 0;
            }
            (*p).flags |= STW_FLAG_CYCLE_DONE;
        },
        None => {
            // Attached while the world was stopped: count the cycle, and keep
            // a marker so a second hit is not counted again.
            let pending = PendingStw {
                start_ns: 0,
                reason: STW_REASON_GC_MARK_TERM,
                flags: STW_FLAG_CYCLE_DONE | STW_FLAG_NO_START,
                _pad: [0; 6],
                start_entry_ns: 0,
            };
            let _ = PENDING.insert(pid, pending, BPF_ANY as u64);
        }
    }
    bump(pid, |s| &mut s.gc_cycles);
    0
}

#[inline(always)]
fn read<T: Copy + Default>(addr: u64) -> T {
    // SAFETY: bpf_probe_read_user copes with any address; a fault gives 0.
    unsafe { bpf_probe_read_user(addr as *const T) }.unwrap_or_default()
}

/// A growth probe's common part: `map` is the map header, `table` the
/// growing swiss table (0 for classic and whole-map growths).
#[inline(always)]
fn on_growth(ctx: &ProbeContext, kind: u8, map: u64, table: u64) -> u32 {
    let pid = current_pid();
    let Some(cfg) = watched(pid) else { return 0 };
    bump(pid, |s| &mut s.hits[PROBE_GROWTH]);
    if map == 0 {
        return 0;
    }
    if kind == GROW_SWISS_PRUNE {
        // pruneTombstones returns at once unless tombstones are at least 10%
        // of the table (Go's own test): count only the prunes that happen.
        let cap = read::<u16>(table + u64::from(cfg.table_capacity));
        let used = read::<u16>(table + u64::from(cfg.table_used));
        let left = read::<u16>(table + u64::from(cfg.table_growth_left));
        let tombstones = (cap.wrapping_mul(7) / 8)
            .wrapping_sub(used)
            .wrapping_sub(left);
        if u32::from(tombstones) * 10 < u32::from(cap) {
            return 0;
        }
    }
    let classic = kind == GROW_CLASSIC;
    let count = if classic {
        read::<u64>(map + u64::from(cfg.hmap_count))
    } else {
        read::<u64>(map + u64::from(cfg.map_used))
    };
    if will_restart(ctx) {
        bump(pid, |s| &mut s.growth_refires);
        return 0;
    }
    bump(pid, |s| &mut s.map_growths);

    let r = regs(ctx);
    let mut ev = GrowthEvent {
        pid,
        kind,
        map,
        count,
        ..GrowthEvent::default()
    };
    if classic {
        ev.seed = u64::from(read::<u32>(map + u64::from(cfg.hmap_hash0)));
        ev.flags_or_local_depth = read::<u8>(map + u64::from(cfg.hmap_flags));
        ev.b_or_depth = read::<u8>(map + u64::from(cfg.hmap_b));
        ev.noverflow_or_capacity = read::<u16>(map + u64::from(cfg.hmap_noverflow));
    } else {
        ev.seed = read::<u64>(map + u64::from(cfg.map_seed));
        ev.dir_len = read::<u64>(map + u64::from(cfg.map_dir_len));
        ev.b_or_depth = read::<u8>(map + u64::from(cfg.map_global_depth));
        if table != 0 {
            ev.noverflow_or_capacity = read::<u16>(table + u64::from(cfg.table_capacity));
            ev.table_used = read::<u16>(table + u64::from(cfg.table_used));
            ev.table_growth_left = read::<u16>(table + u64::from(cfg.table_growth_left));
            ev.flags_or_local_depth = read::<u8>(table + u64::from(cfg.table_local_depth));
        }
    }
    // The probe sits before the frame is built: [RSP] is the return address
    // into the caller and RBP still the caller's frame pointer.
    ev.pcs[0] = read::<u64>(r.rsp);
    let mut fp = r.rbp;
    let mut n = 1;
    while n < GROWTH_FRAMES {
        if fp == 0 {
            break;
        }
        let ret = read::<u64>(fp + 8);
        if ret == 0 {
            break;
        }
        ev.pcs[n] = ret;
        fp = read::<u64>(fp);
        n += 1;
    }
    ev.nframes = n as u8;
    match GROWTH_EVENTS.reserve::<GrowthEvent>(0) {
        Some(mut entry) => {
            entry.write(ev);
            entry.submit(0);
        }
        None => bump(pid, |s| &mut s.events_lost),
    }
    0
}

/// Classic `runtime.hashGrow(t *maptype, h *hmap)`: RBX = h.
#[uprobe]
pub fn grow_classic(ctx: ProbeContext) -> u32 {
    let h = regs(&ctx).rbx;
    on_growth(&ctx, GROW_CLASSIC, h, 0)
}

/// `internal/runtime/maps.(*Map).growToSmall(typ)`: RAX = m.
#[uprobe]
pub fn grow_small(ctx: ProbeContext) -> u32 {
    let m = regs(&ctx).rax;
    on_growth(&ctx, GROW_SWISS_SMALL, m, 0)
}

/// `(*Map).growToTable(typ)`: RAX = m.
#[uprobe]
pub fn grow_to_table(ctx: ProbeContext) -> u32 {
    let m = regs(&ctx).rax;
    on_growth(&ctx, GROW_SWISS_TO_TABLE, m, 0)
}

/// `(*table).grow(typ, m, newCapacity)`: RAX = t, RCX = m.
#[uprobe]
pub fn grow_table(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let (t, m) = (r.rax, r.rcx);
    on_growth(&ctx, GROW_SWISS_GROW, m, t)
}

/// `(*table).split(typ, m)`: RAX = t, RCX = m.
#[uprobe]
pub fn split_table(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let (t, m) = (r.rax, r.rcx);
    on_growth(&ctx, GROW_SWISS_SPLIT, m, t)
}

/// `(*table).pruneTombstones(typ, m)` (Go 1.25+): RAX = t, RCX = m. Called
/// before every rehash; counted only when it will prune.
#[uprobe]
pub fn prune_table(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let (t, m) = (r.rax, r.rcx);
    on_growth(&ctx, GROW_SWISS_PRUNE, m, t)
}

/// An assignment or deletion: remember the map's count, seed and the Go
/// function that called the runtime (its site). Hot: nanoseconds of work
/// per call in Go, so these probes are attached only when asked to.
#[inline(always)]
fn on_access(ctx: &ProbeContext, class: usize) -> u32 {
    let pid = current_pid();
    let Some(cfg) = watched(pid) else { return 0 };
    if class == PROBE_ASSIGN {
        bump(pid, |s| &mut s.hits[PROBE_ASSIGN]);
    } else {
        bump(pid, |s| &mut s.hits[PROBE_DELETE]);
    }
    if will_restart(ctx) {
        return 0;
    }
    let r = regs(ctx);
    let map = r.rbx;
    if map == 0 {
        return 0; // a nil map: the runtime panics (assign) or returns
    }
    let (count, seed) = if cfg.map_impl == MAP_IMPL_CLASSIC {
        (
            read::<u64>(map + u64::from(cfg.hmap_count)),
            u64::from(read::<u32>(map + u64::from(cfg.hmap_hash0))),
        )
    } else {
        (
            read::<u64>(map + u64::from(cfg.map_used)),
            read::<u64>(map + u64::from(cfg.map_seed)),
        )
    };
    let key = MapKey { pid, _pad: 0, map };
    if MAP_SEEN.get_ptr(key).is_none() {
        bump(pid, |s| &mut s.maps_added);
    }
    let seen = MapSeen {
        seed,
        count,
        pc: read::<u64>(r.rsp),
    };
    let _ = MAP_SEEN.insert(key, seen, BPF_ANY as u64);
    0
}

/// `runtime.mapassign*(typ, m, key)`: RAX = typ, RBX = m.
#[uprobe]
pub fn map_assign(ctx: ProbeContext) -> u32 {
    on_access(&ctx, PROBE_ASSIGN)
}

/// `runtime.mapdelete*(typ, m, key)`: RAX = typ, RBX = m.
#[uprobe]
pub fn map_delete(ctx: ProbeContext) -> u32 {
    on_access(&ctx, PROBE_DELETE)
}

/// Classic `runtime.evacuate*(t, h, oldbucket)`: RAX = t, RBX = h, RCX =
/// oldbucket. `growWork` calls it for the bucket about to be written and for
/// the next one in order, either of which may be moved already: count only
/// calls that find the old bucket not yet evacuated (tophash[0] is not
/// evacuatedX/Y/Empty, 2 to 4). Attached with the assignment probes (as hot
/// as writes while a map grows).
#[uprobe]
pub fn map_evacuate(ctx: ProbeContext) -> u32 {
    let pid = current_pid();
    let Some(cfg) = watched(pid) else { return 0 };
    bump(pid, |s| &mut s.hits[PROBE_EVACUATE]);
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
        bump(pid, |s| &mut s.evacuations);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
