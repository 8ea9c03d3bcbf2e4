//! Why each GC ran, and the runtime's own gctrace line, from outside: the
//! probes copy, when a cycle's mark termination restarts the world, the
//! parts of `runtime.work`, `gcController` and `memstats` that
//! `GODEBUG=gctrace=1` prints (all final then), with the return addresses
//! of the goroutine that started the cycle (taken when its sweep
//! termination ended). This module says where those parts are in an
//! executable, decodes a record into a [`Cycle`], and prints its line
//! ([`line`]) as that release's runtime would.
mod line;

pub use line::{json, line};

use gopulse_common::{GC_CTRL_BYTES, GC_MSTATS_BYTES, GC_WORK_BYTES, GcCycle, GcTraceConfig};
use gopulse_inspect::{GoBinary, RuntimeOffsets, globals::Global};

/// Where one executable's cycle records come from: each window's first
/// byte (link-time) and each field's offset in its window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    work: u64,
    ctrl: u64,
    mstats: u64,
    o: RuntimeOffsets,
    /// Window starts as struct offsets (subtracted from each field's).
    work_base: u16,
    ctrl_base: u16,
    mstats_base: u16,
    g_m: u16,
    m_curg: u16,
    /// `runtime.runtimeInitTime` (link-time), for the line's `@`.
    pub init_time: Option<u64>,
}

impl Layout {
    /// Where `bin`'s records come from, or why it has none.
    pub fn of(bin: &GoBinary) -> Result<Self, String> {
        let o = bin.runtime.offsets.clone()?;
        let global = |g: Global| {
            bin.runtime
                .globals
                .get(g)
                .map_err(|e| format!("{}: {e}", g.symbol()))
        };
        let window = |what: &str, fields: &[(u16, u16)], size: usize| {
            let base = fields.iter().map(|&(f, _)| f).min().unwrap_or(0);
            let end = fields
                .iter()
                .map(|&(f, n)| usize::from(f) + usize::from(n))
                .max()
                .unwrap_or(0);
            if end - usize::from(base) > size {
                return Err(format!(
                    "{what}'s gctrace fields span {} bytes, more than the {size} the probes copy",
                    end - usize::from(base)
                ));
            }
            Ok(base)
        };
        let work_base = window(
            "runtime.work",
            &[
                (o.work_user_forced, 1),
                (o.work_stwprocs, 4),
                (o.work_maxprocs, 4),
                (o.work_t_sweep_term, 8),
                (o.work_t_mark, 8),
                (o.work_t_mark_term, 8),
                (o.work_t_end, 8),
                (o.work_heap0, 8),
                (o.work_heap1, 8),
                (o.work_heap2, 8),
            ],
            GC_WORK_BYTES,
        )?;
        let ctrl_base = window(
            "runtime.gcController",
            &[
                (o.last_heap_goal, 8),
                (o.last_stack_scan, 8),
                (o.globals_scan, 8),
                (o.assist_time, 8),
                (o.dedicated_mark_time, 8),
                (o.fractional_mark_time, 8),
                (o.idle_mark_time, 8),
            ],
            GC_CTRL_BYTES,
        )?;
        let mstats_base = window(
            "runtime.memstats",
            &[(o.numgc, 4), (o.numforcedgc, 4), (o.gc_cpu_fraction, 8)],
            GC_MSTATS_BYTES,
        )?;
        Ok(Self {
            work: global(Global::Work)? + u64::from(work_base),
            ctrl: global(Global::GcController)? + u64::from(ctrl_base),
            mstats: global(Global::Memstats)? + u64::from(mstats_base),
            o,
            work_base,
            ctrl_base,
            mstats_base,
            g_m: bin.offsets.g_m,
            m_curg: bin.offsets.m_curg,
            init_time: bin.runtime.globals.runtime_init_time,
        })
    }

    /// The probes' settings for a process whose executable is loaded
    /// `bias` past its link-time addresses.
    pub fn config(&self, bias: u64) -> GcTraceConfig {
        GcTraceConfig {
            work: self.work.wrapping_add(bias),
            ctrl: self.ctrl.wrapping_add(bias),
            mstats: self.mstats.wrapping_add(bias),
            g_m: self.g_m,
            m_curg: self.m_curg,
            g_sched_bp: self.o.g_sched_bp,
            _pad: 0,
        }
    }

    /// A record's values.
    pub fn decode(&self, r: &GcCycle) -> Cycle {
        let o = &self.o;
        let at = |buf: &[u8], base: u16, off: u16, n: usize| -> u64 {
            let i = usize::from(off - base);
            let mut b = [0u8; 8];
            if let Some(src) = buf.get(i..i + n) {
                b[..n].copy_from_slice(src);
            }
            u64::from_le_bytes(b)
        };
        let w = |off: u16| at(&r.work, self.work_base, off, 8);
        let c = |off: u16| at(&r.ctrl, self.ctrl_base, off, 8);
        Cycle {
            numgc: at(&r.mstats, self.mstats_base, o.numgc, 4) as u32,
            gc_cpu_fraction: f64::from_bits(at(&r.mstats, self.mstats_base, o.gc_cpu_fraction, 8)),
            user_forced: at(&r.work, self.work_base, o.work_user_forced, 1) != 0,
            stwprocs: at(&r.work, self.work_base, o.work_stwprocs, 4) as u32 as i32,
            maxprocs: at(&r.work, self.work_base, o.work_maxprocs, 4) as u32 as i32,
            t_sweep_term: w(o.work_t_sweep_term) as i64,
            t_mark: w(o.work_t_mark) as i64,
            t_mark_term: w(o.work_t_mark_term) as i64,
            t_end: w(o.work_t_end) as i64,
            heap0: w(o.work_heap0),
            heap1: w(o.work_heap1),
            heap2: w(o.work_heap2),
            heap_goal: c(o.last_heap_goal),
            stack_scan: c(o.last_stack_scan),
            globals_scan: c(o.globals_scan),
            assist_ns: c(o.assist_time) as i64,
            background_ns: (c(o.dedicated_mark_time) as i64)
                .wrapping_add(c(o.fractional_mark_time) as i64),
            idle_ns: c(o.idle_mark_time) as i64,
        }
    }
}

/// One completed cycle, as the runtime accounts it (the fields gctrace
/// prints, in the runtime's own types).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cycle {
    /// `memstats.numgc`: this cycle's number.
    pub numgc: u32,
    pub gc_cpu_fraction: f64,
    /// Started by `runtime.GC` (a `gcTriggerCycle`).
    pub user_forced: bool,
    pub stwprocs: i32,
    pub maxprocs: i32,
    /// The phase clocks (CLOCK_MONOTONIC ns): sweep termination began,
    /// marking began, mark termination began, the cycle ended.
    pub t_sweep_term: i64,
    pub t_mark: i64,
    pub t_mark_term: i64,
    pub t_end: i64,
    /// Heap at the cycle's start, when marking ended, and marked live.
    pub heap0: u64,
    pub heap1: u64,
    pub heap2: u64,
    pub heap_goal: u64,
    pub stack_scan: u64,
    pub globals_scan: u64,
    /// Mark CPU: assists, background workers (dedicated + fractional), idle.
    pub assist_ns: i64,
    pub background_ns: i64,
    pub idle_ns: i64,
}

impl Cycle {
    /// Concurrent mark wall time.
    pub fn mark_ns(&self) -> i64 {
        self.t_mark_term.wrapping_sub(self.t_mark)
    }
}

/// What started a cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The heap reached its trigger (the memory limit's goal included).
    Heap,
    /// The periodic GC (`forcegcperiod`, 2 minutes without one).
    Time,
    /// `runtime.GC` (from `debug.FreeOSMemory` too).
    Forced,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Heap => "heap",
            Trigger::Time => "time",
            Trigger::Forced => "forced",
        }
    }

    /// From the function that called `runtime.gcStart`.
    pub fn of_caller(function: &str) -> Self {
        match function {
            "runtime.GC" => Trigger::Forced,
            "runtime.forcegchelper" => Trigger::Time,
            _ => Trigger::Heap,
        }
    }
}

/// Functions a forced cycle's site is walked past, besides the plumbing of
/// map growth sites: `runtime/debug.FreeOSMemory` and its linkname
/// `freeOSMemory`, the leak profile's `runtime/pprof` calls.
pub const FORCED_PLUMBING: &[&str] = &["runtime.", "runtime/debug.", "runtime/pprof."];
