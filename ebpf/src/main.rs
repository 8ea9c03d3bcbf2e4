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
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe},
    maps::{HashMap, PerCpuHashMap, RingBuf},
    programs::ProbeContext,
};
use gopulse_common::{
    MAX_PROCS, PendingStw, ProcConfig, ProcStats, START_ARGS_WORLDSTOP, STW_FLAG_CYCLE_DONE,
    STW_FLAG_GO_START, STW_FLAG_NO_START, STW_RING_BYTES, StwEvent,
};

/// Go's `stwGCMarkTerm`, the reason a cycle's final pause carries.
const STW_REASON_GC_MARK_TERM: u8 = 1;

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

#[inline(always)]
fn regs(ctx: &ProbeContext) -> &pt_regs {
    // SAFETY: a uprobe context is the trapped task's register file.
    unsafe { &*ctx.regs }
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
    let pending = PendingStw {
        start_ns: unsafe { bpf_ktime_get_ns() },
        reason: regs(&ctx).rax as u8,
        flags: 0,
        _pad: [0; 6],
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
    if cfg.start_args != START_ARGS_WORLDSTOP {
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
    if watched(pid).is_none() {
        return 0;
    }
    let end_ns = regs(&ctx).rax;
    // SAFETY: read once and copied; the entry is removed below.
    let Some(pending) = (unsafe { PENDING.get(pid) }).copied() else {
        bump(pid, |s| &mut s.stw_unmatched);
        return 0;
    };
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
pub fn gc_mark_termination(_ctx: ProbeContext) -> u32 {
    let pid = current_pid();
    if watched(pid).is_none() {
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
            };
            let _ = PENDING.insert(pid, pending, BPF_ANY as u64);
        }
    }
    bump(pid, |s| &mut s.gc_cycles);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
