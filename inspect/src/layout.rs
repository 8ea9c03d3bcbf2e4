//! Where the Go runtime keeps the state the agent reads at collection time
//! (heap goal, memory, GC CPU, goroutines, scheduling latency): the field
//! offsets of its structs, per release. From a binary's own DWARF when it
//! has some, else from the table generated from every supported toolchain
//! (`cargo xtask codegen offsets`), like the probes' offsets
//! ([`crate::offsets`]).
//!
//! Adding a field: add it here and to [`from_structs`] (a nested one to
//! [`PATHS`] too), run the codegen; the `offsets_table` test then checks
//! the table against every toolchain.
use crate::{GoVersion, InspectError, dwarf::Structs};

pub const GC_CONTROLLER: &str = "runtime.gcControllerState";
pub const MSTATS: &str = "runtime.mstats";
pub const HEAP_STATS_DELTA: &str = "runtime.heapStatsDelta";
pub const WORK: &str = "runtime.workType";
pub const SCHED: &str = "runtime.schedt";
pub const P: &str = "runtime.p";
pub const TIME_HISTOGRAM: &str = "runtime.timeHistogram";
pub const G: &str = "runtime.g";

/// The struct types [`from_structs`] reads.
pub const STRUCTS: &[&str] = &[
    GC_CONTROLLER,
    MSTATS,
    HEAP_STATS_DELTA,
    WORK,
    SCHED,
    P,
    TIME_HISTOGRAM,
    G,
];

/// The nested fields [`from_structs`] reads (fields of fields, each on
/// the releases that have it), declared to the DWARF read up front: the
/// read follows the member types on each path, and a path not declared
/// here is an error, not a field missing.
pub const PATHS: &[(&str, &str)] = &[
    (SCHED, "gFree.n"),
    (SCHED, "gFree.stack.size"),
    (SCHED, "gFree.noStack.size"),
    (P, "gFree.n"),
    (P, "gFree.size"),
    (MSTATS, "heapStats.gen"),
    (WORK, "cpuStats.GCTotalTime"),
    (WORK, "cpuStats.gcTotalTime"),
    (WORK, "cpuStats.ScavengeTotalTime"),
    (WORK, "cpuStats.scavengeTotalTime"),
    (WORK, "cpuStats.IdleTime"),
    (WORK, "cpuStats.idleTime"),
    (WORK, "cpuStats.UserTime"),
    (WORK, "cpuStats.userTime"),
    (G, "sched.bp"),
];

/// Size classes of small objects (`_NumSizeClasses`, 68 in every supported
/// release): `heapStatsDelta.smallAllocCount` is a `[68]uint64`.
pub const SIZE_CLASSES: usize = 68;

/// Buckets of a `timeHistogram` (`timeHistNumBuckets * timeHistNumSubBuckets`
/// = 40 × 4 in every supported release), each a `uint64`.
pub const TIME_HIST_COUNTS: usize = 160;

/// How the runtime counts the free goroutine descriptors it keeps for reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeGs {
    /// Go 1.21-1.24: `schedt.gFree.n` (int32), and each P's `p.gFree.n`.
    Counted { sched_n: u16 },
    /// Go 1.25+: `schedt.gFree.stack.size` and `schedt.gFree.noStack.size`
    /// (int32 each), and each P's `p.gFree.size`.
    Split {
        sched_stack: u16,
        sched_no_stack: u16,
    },
}

/// Byte offsets of the runtime fields the agent reads, each within its
/// struct (`runtime.gcController` is a `gcControllerState`, and so on).
/// Nested fields are flattened (`work_cpu_user` is
/// `workType.cpuStats.UserTime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeOffsets {
    /// Size of `runtime.gcControllerState` (read whole).
    pub gc_controller_size: u16,
    pub gc_percent: u16,
    pub memory_limit: u16,
    pub heap_minimum: u16,
    pub gc_percent_heap_goal: u16,
    pub sweep_dist_min_trigger: u16,
    pub triggered: u16,
    pub heap_marked: u16,
    pub heap_free: u16,
    pub total_alloc: u16,
    pub total_free: u16,
    pub mapped_ready: u16,
    /// `mstats.heapStats` (a `consistentHeapStats`: `stats [3]heapStatsDelta` first).
    pub heap_stats: u16,
    /// `mstats.heapStats.gen`.
    pub heap_stats_gen: u16,
    pub stacks_sys: u16,
    pub mspan_sys: u16,
    pub mcache_sys: u16,
    pub buckhash_sys: u16,
    pub gc_misc_sys: u16,
    pub other_sys: u16,
    pub numgc: u16,
    pub numforcedgc: u16,
    /// Size of `runtime.heapStatsDelta` (one slot of the ring).
    pub delta_size: u16,
    pub delta_committed: u16,
    pub delta_released: u16,
    pub delta_in_stacks: u16,
    pub delta_large_alloc_count: u16,
    pub delta_small_alloc_count: u16,
    /// `workType.full` and `.empty`: what the code that finds `runtime.work`
    /// in a stripped binary sees.
    pub work_full: u16,
    pub work_empty: u16,
    pub work_cycles: u16,
    pub work_stwprocs: u16,
    pub work_maxprocs: u16,
    /// `workType.cpuStats.GCTotalTime` (`gcTotalTime` before Go 1.23).
    pub work_cpu_gc_total: u16,
    pub work_cpu_scavenge_total: u16,
    pub work_cpu_idle: u16,
    pub work_cpu_user: u16,
    pub sched_lock: u16,
    pub sched_ngsys: u16,
    pub sched_free: FreeGs,
    pub sched_time_to_run: u16,
    /// `p.gFree.n` (Go 1.21-1.24) or `p.gFree.size` (1.25+).
    pub p_free_count: u16,
    pub hist_counts: u16,
    pub hist_underflow: u16,
    pub hist_overflow: u16,
    /// What `GODEBUG=gctrace=1` prints of a cycle (`gcMarkTermination`):
    /// `workType.userForced`, the phase clocks and the three heap sizes.
    pub work_user_forced: u16,
    pub work_t_sweep_term: u16,
    pub work_t_mark: u16,
    pub work_t_mark_term: u16,
    pub work_t_end: u16,
    pub work_heap0: u16,
    pub work_heap1: u16,
    pub work_heap2: u16,
    /// `gcControllerState`: the goal, scan sizes and mark CPU of the cycle.
    pub last_heap_goal: u16,
    pub last_stack_scan: u16,
    pub globals_scan: u16,
    pub assist_time: u16,
    pub dedicated_mark_time: u16,
    pub fractional_mark_time: u16,
    pub idle_mark_time: u16,
    pub gc_cpu_fraction: u16,
    /// `g.sched.bp`: a goroutine's frame pointer while it is off its stack
    /// (the GC's stop on the system stack), where its callers are walked.
    pub g_sched_bp: u16,
}

impl RuntimeOffsets {
    /// The shapes the agent's reads assume: fields where its arithmetic
    /// expects them. An error names what does not fit (a layout no
    /// supported release has): the metrics are then not read at all.
    pub fn check(&self) -> Result<(), String> {
        let after = |what: &str, a: u16, b: u16, gap: usize| {
            if usize::from(b).checked_sub(usize::from(a)) == Some(gap) {
                Ok(())
            } else {
                Err(format!("{what}: {b} is not {gap} bytes after {a}"))
            }
        };
        after(
            "timeHistogram.underflow after counts",
            self.hist_counts,
            self.hist_underflow,
            TIME_HIST_COUNTS * 8,
        )?;
        after(
            "timeHistogram.overflow after underflow",
            self.hist_underflow,
            self.hist_overflow,
            8,
        )?;
        after(
            "mstats.numforcedgc after numgc",
            self.numgc,
            self.numforcedgc,
            4,
        )?;
        let small_end = usize::from(self.delta_small_alloc_count) + SIZE_CLASSES * 8;
        if small_end > usize::from(self.delta_size) {
            return Err(format!(
                "heapStatsDelta.smallAllocCount ({} + {}) runs past the struct ({})",
                self.delta_small_alloc_count,
                SIZE_CLASSES * 8,
                self.delta_size
            ));
        }
        let ring_end = usize::from(self.heap_stats) + 3 * usize::from(self.delta_size);
        if ring_end > usize::from(self.heap_stats_gen) {
            return Err(format!(
                "mstats.heapStats.gen ({}) lies inside the ring ({} + 3 × {})",
                self.heap_stats_gen, self.heap_stats, self.delta_size
            ));
        }
        let gc_fields = [
            self.gc_percent,
            self.memory_limit,
            self.heap_minimum,
            self.gc_percent_heap_goal,
            self.sweep_dist_min_trigger,
            self.triggered,
            self.heap_marked,
            self.heap_free,
            self.total_alloc,
            self.total_free,
            self.mapped_ready,
        ];
        if gc_fields
            .iter()
            .any(|&f| usize::from(f) + 8 > usize::from(self.gc_controller_size))
        {
            return Err("a gcControllerState field lies past the struct".to_owned());
        }
        Ok(())
    }
}

/// Reads the offsets from the DWARF's [`STRUCTS`] and [`PATHS`]. An error
/// names the struct or field missing.
pub(crate) fn from_structs(d: &Structs) -> Result<RuntimeOffsets, InspectError> {
    let small = |what: String, v: u64| {
        u16::try_from(v).map_err(|_| InspectError::Corrupt {
            section: ".debug_info",
            detail: format!("{what} is {v}, beyond what gopulse reads of the runtime"),
        })
    };
    let opt = |strukt: &str, path: &str| -> Result<Option<u16>, InspectError> {
        d.path_offset(strukt, path)?
            .map(|v| small(format!("{strukt}.{path}"), v))
            .transpose()
    };
    let field = |strukt: &str, path: &str| -> Result<u16, InspectError> {
        opt(strukt, path)?.ok_or_else(|| InspectError::MissingType(format!("{strukt}.{path}")))
    };
    // The first of `paths` that exists (fields renamed between releases).
    let either = |strukt: &str, paths: &[&str]| -> Result<u16, InspectError> {
        for p in paths {
            if let Some(v) = opt(strukt, p)? {
                return Ok(v);
            }
        }
        Err(InspectError::MissingType(format!("{strukt}.{}", paths[0])))
    };
    let size = |strukt: &str| {
        let what = format!("size of {strukt}");
        match d
            .get(strukt)
            .ok_or_else(|| InspectError::MissingType(strukt.to_owned()))?
            .size
        {
            Some(v) => small(what, v),
            None => Err(InspectError::MissingType(what)),
        }
    };
    let g = GC_CONTROLLER;
    let sched_free = match opt(SCHED, "gFree.n")? {
        Some(sched_n) => FreeGs::Counted { sched_n },
        None => FreeGs::Split {
            sched_stack: field(SCHED, "gFree.stack.size")?,
            sched_no_stack: field(SCHED, "gFree.noStack.size")?,
        },
    };
    let p_free_count = match sched_free {
        FreeGs::Counted { .. } => field(P, "gFree.n")?,
        FreeGs::Split { .. } => field(P, "gFree.size")?,
    };
    Ok(RuntimeOffsets {
        gc_controller_size: size(g)?,
        gc_percent: field(g, "gcPercent")?,
        memory_limit: field(g, "memoryLimit")?,
        heap_minimum: field(g, "heapMinimum")?,
        gc_percent_heap_goal: field(g, "gcPercentHeapGoal")?,
        sweep_dist_min_trigger: field(g, "sweepDistMinTrigger")?,
        triggered: field(g, "triggered")?,
        heap_marked: field(g, "heapMarked")?,
        heap_free: field(g, "heapFree")?,
        total_alloc: field(g, "totalAlloc")?,
        total_free: field(g, "totalFree")?,
        mapped_ready: field(g, "mappedReady")?,
        heap_stats: field(MSTATS, "heapStats")?,
        heap_stats_gen: field(MSTATS, "heapStats.gen")?,
        stacks_sys: field(MSTATS, "stacks_sys")?,
        mspan_sys: field(MSTATS, "mspan_sys")?,
        mcache_sys: field(MSTATS, "mcache_sys")?,
        buckhash_sys: field(MSTATS, "buckhash_sys")?,
        gc_misc_sys: field(MSTATS, "gcMiscSys")?,
        other_sys: field(MSTATS, "other_sys")?,
        numgc: field(MSTATS, "numgc")?,
        numforcedgc: field(MSTATS, "numforcedgc")?,
        delta_size: size(HEAP_STATS_DELTA)?,
        delta_committed: field(HEAP_STATS_DELTA, "committed")?,
        delta_released: field(HEAP_STATS_DELTA, "released")?,
        delta_in_stacks: field(HEAP_STATS_DELTA, "inStacks")?,
        delta_large_alloc_count: field(HEAP_STATS_DELTA, "largeAllocCount")?,
        delta_small_alloc_count: field(HEAP_STATS_DELTA, "smallAllocCount")?,
        work_full: field(WORK, "full")?,
        work_empty: field(WORK, "empty")?,
        work_cycles: field(WORK, "cycles")?,
        work_stwprocs: field(WORK, "stwprocs")?,
        work_maxprocs: field(WORK, "maxprocs")?,
        // Exported (GCTotalTime, ...) from Go 1.23 on.
        work_cpu_gc_total: either(WORK, &["cpuStats.GCTotalTime", "cpuStats.gcTotalTime"])?,
        work_cpu_scavenge_total: either(
            WORK,
            &["cpuStats.ScavengeTotalTime", "cpuStats.scavengeTotalTime"],
        )?,
        work_cpu_idle: either(WORK, &["cpuStats.IdleTime", "cpuStats.idleTime"])?,
        work_cpu_user: either(WORK, &["cpuStats.UserTime", "cpuStats.userTime"])?,
        sched_lock: field(SCHED, "lock")?,
        sched_ngsys: field(SCHED, "ngsys")?,
        sched_free,
        sched_time_to_run: field(SCHED, "timeToRun")?,
        p_free_count,
        hist_counts: field(TIME_HISTOGRAM, "counts")?,
        hist_underflow: field(TIME_HISTOGRAM, "underflow")?,
        hist_overflow: field(TIME_HISTOGRAM, "overflow")?,
        work_user_forced: field(WORK, "userForced")?,
        work_t_sweep_term: field(WORK, "tSweepTerm")?,
        work_t_mark: field(WORK, "tMark")?,
        work_t_mark_term: field(WORK, "tMarkTerm")?,
        work_t_end: field(WORK, "tEnd")?,
        work_heap0: field(WORK, "heap0")?,
        work_heap1: field(WORK, "heap1")?,
        work_heap2: field(WORK, "heap2")?,
        last_heap_goal: field(g, "lastHeapGoal")?,
        last_stack_scan: field(g, "lastStackScan")?,
        globals_scan: field(g, "globalsScan")?,
        assist_time: field(g, "assistTime")?,
        dedicated_mark_time: field(g, "dedicatedMarkTime")?,
        fractional_mark_time: field(g, "fractionalMarkTime")?,
        idle_mark_time: field(g, "idleMarkTime")?,
        gc_cpu_fraction: field(MSTATS, "gc_cpu_fraction")?,
        g_sched_bp: field(G, "sched.bp")?,
    })
}

/// Experiments a release's build may carry in its version string (`X:...`)
/// that move none of these fields: `cargo xtask codegen offsets` builds
/// each and fails if one does.
pub const HARMLESS_EXPERIMENTS: &[(u32, &str)] = &[
    (24, "noswissmap"),
    (25, "noswissmap"),
    (26, "nogreenteagc"),
    (26, "goroutineleakprofile"),
    (27, "nogreenteagc"),
];

/// Experiments with a table row of their own: the layout they give.
pub const LAYOUT_EXPERIMENTS: &[(u32, &str)] = &[(25, "greenteagc")];

/// The table's offsets for a release, `None` when its build carries an
/// experiment that is not known to leave the layout alone (read such a
/// binary only with its own DWARF), or for a release outside the table.
pub fn from_table(version: &GoVersion) -> Option<RuntimeOffsets> {
    if version.major != 1 || version.devel {
        return None;
    }
    let mut layout = None;
    for x in &version.experiments {
        if HARMLESS_EXPERIMENTS.contains(&(version.minor, x.as_str())) {
            continue;
        }
        if layout.is_some() || !LAYOUT_EXPERIMENTS.contains(&(version.minor, x.as_str())) {
            return None;
        }
        layout = Some(x.as_str());
    }
    crate::offsets::runtime_table()
        .iter()
        .find(|(minor, x, _)| *minor == version.minor && *x == layout)
        .map(|(_, _, o)| *o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_hold_together() {
        for (minor, x, o) in crate::offsets::runtime_table() {
            o.check()
                .unwrap_or_else(|e| panic!("go1.{minor} {x:?}: {e}"));
        }
    }

    #[test]
    fn experiments_pick_a_row_or_none() {
        let v = |s: &str| GoVersion::parse(s).unwrap();
        let default = from_table(&v("go1.25.5")).unwrap();
        assert_eq!(from_table(&v("go1.25.5 X:noswissmap")), Some(default));
        let greentea = from_table(&v("go1.25.5 X:greenteagc")).unwrap();
        assert_ne!(greentea.work_cycles, default.work_cycles);
        assert_eq!(
            from_table(&v("go1.25.5 X:noswissmap,greenteagc")),
            Some(greentea)
        );
        // Unknown to move nothing: no row.
        assert_eq!(from_table(&v("go1.25.5 X:staticlockranking")), None);
        assert_eq!(from_table(&v("go1.26.6 X:greenteagc")), None);
        assert!(from_table(&v("go1.26.6 X:goroutineleakprofile")).is_some());
        assert_eq!(from_table(&v("go1.20.1")), None);
        assert_eq!(from_table(&v("go1.28.0")), None);
        for minor in 21..=27 {
            assert!(
                from_table(&v(&format!("go1.{minor}.1"))).is_some(),
                "{minor}"
            );
        }
    }
}
