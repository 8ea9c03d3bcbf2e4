//! The collection stage: kernel counters, tables and events become metrics,
//! per watched process: GC and stop-the-world pauses (`gc`), map growth,
//! sites and shapes (`maps`), the Go runtime's own state read from the
//! process's memory (`runtime`), and probe hits and what they cost. It
//! reads the kernel maps through its own handles; attaching, detaching and
//! the budget belong to the attach stage (`crate::probes`).
mod cycles;
mod gc;
mod maps;
pub mod names;
mod runtime;
mod slices;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use gopulse_common::GrowthKey;

use crate::gctrace::Trigger;
pub use cycles::{CycleSettings, TraceLine, TraceProc};
use maps::MapRef;
pub use maps::OTHER_SITE;
pub use names::FunctionNames;
pub use slices::SliceRule;
use slices::SliceState;

use crate::{
    bpf::{CollectorMaps, Counters},
    cost::Costs,
    inspect::MapOffsets,
    metrics::{Metrics, PHASE_MARK, PHASE_SWEEP, ProcAnd, ProcLabels},
    plan::PROGRAM_TABLE,
    procfs,
    storm::{StormRule, StormTracker},
    stw::Reason,
};

/// What the collector needs to know of a process it starts watching.
pub struct NewProc {
    pub pid: u32,
    pub labels: ProcLabels,
    pub reasons: &'static [Reason],
    pub start_time: u64,
    /// Link-time PC → Go function, for sites (shared by the processes of
    /// one executable).
    pub names: Arc<FunctionNames>,
    pub map_offsets: MapOffsets,
    /// Reads the Go runtime's state from the process; `None` when its
    /// executable's runtime layout is unknown.
    pub runtime: Option<crate::runtime_state::Reader>,
    /// Growth kinds its executable's probes cannot count.
    pub unwatched: Vec<&'static str>,
    /// Where its cycle records' fields are; `None` when the probes write
    /// none for it.
    pub gctrace: Option<TraceProc>,
}

/// A watched process, as collection sees it.
struct Proc {
    labels: ProcLabels,
    reasons: &'static [Reason],
    /// Time of abandoned mark-termination stops, added to the cycle's pause.
    mark_carry_ns: u64,
    /// Pauses read from the process's log so far.
    stw_seq: u64,
    /// Kernel counters already folded into the metrics.
    synced: Counters,
    start_time: u64,
    names: Arc<FunctionNames>,
    /// Growths already counted per kernel key, and the key's site label.
    growth_keys: BTreeMap<GrowthKey, (u64, String)>,
    /// Site labels in use (bounded by `--max-map-sites`).
    sites: BTreeSet<String>,
    /// Storm state by real site (never "other").
    storms: BTreeMap<String, StormTracker>,
    /// The largest map seen growing at each site.
    largest: BTreeMap<String, MapRef>,
    map_offsets: MapOffsets,
    /// Maps taken from the kernel LRU so far, and evictions reported.
    maps_taken: u64,
    maps_untracked: u64,
    slices: SliceState,
    runtime: Option<runtime::RuntimeProc>,
    gctrace: Option<TraceProc>,
}

pub struct Collector {
    maps: CollectorMaps,
    metrics: Metrics,
    costs: Arc<Costs>,
    procs: BTreeMap<u32, Proc>,
    requested: BTreeSet<u32>,
    max_sites: usize,
    storm_rule: StormRule,
    slice_rule: SliceRule,
    /// Where each process's runtime state is read into, in turn.
    scratch: crate::runtime_state::Scratch,
    cycles: CycleSettings,
}

impl Collector {
    pub fn new(
        maps: CollectorMaps,
        metrics: Metrics,
        costs: Arc<Costs>,
        max_sites: usize,
        storm_rule: StormRule,
        slice_rule: SliceRule,
    ) -> Self {
        Self {
            maps,
            metrics,
            costs,
            procs: BTreeMap::new(),
            requested: BTreeSet::new(),
            max_sites,
            storm_rule,
            slice_rule,
            scratch: crate::runtime_state::Scratch::default(),
            cycles: CycleSettings::default(),
        }
    }

    /// The forced-GC storm rule, and where each cycle's line goes (for
    /// `gopulse gctrace`).
    pub fn set_cycles(&mut self, cycles: CycleSettings) {
        self.cycles = cycles;
    }

    /// Notes a process the user asked for (ready once it is watched).
    pub fn request(&mut self, pid: u32) {
        self.requested.insert(pid);
    }

    /// Starts collecting for a process whose probes are attached.
    pub fn add(&mut self, p: NewProc) {
        let labels = p.labels;
        // Create the series now, so they read 0 rather than being absent.
        let m = &self.metrics;
        for f in [
            &m.events_lost,
            &m.map_sites_dropped,
            &m.maps_untracked,
            &m.map_growths_unattributed,
            &m.probe_overhead,
            &m.slice_growths_unattributed,
            &m.slice_sites_dropped,
        ] {
            f.create(&labels);
        }
        // Exact counts from the start, or no estimate yet.
        let ratio = if self.slice_rule.sampled { 0.0 } else { 1.0 };
        m.slice_sample_ratio.set_float(&labels, ratio);
        for phase in [PHASE_SWEEP, PHASE_MARK] {
            m.gc_pause.create(&ProcAnd {
                proc: &labels,
                value: phase,
            });
        }
        for (kind, _) in ANOMALY_KINDS {
            m.bpf_anomalies.create(&ProcAnd {
                proc: &labels,
                value: kind,
            });
        }
        if p.gctrace.is_some() {
            for trigger in [Trigger::Heap, Trigger::Time, Trigger::Forced] {
                m.gc_triggers.create(&ProcAnd {
                    proc: &labels,
                    value: trigger.label(),
                });
            }
        }
        for kind in p.unwatched {
            m.map_growth_unwatched.set(
                &ProcAnd {
                    proc: &labels,
                    value: kind,
                },
                1,
            );
        }
        self.procs.insert(
            p.pid,
            Proc {
                labels,
                reasons: p.reasons,
                mark_carry_ns: 0,
                stw_seq: 0,
                synced: Counters::default(),
                start_time: p.start_time,
                names: p.names,
                growth_keys: BTreeMap::new(),
                sites: BTreeSet::new(),
                storms: BTreeMap::new(),
                largest: BTreeMap::new(),
                map_offsets: p.map_offsets,
                maps_taken: 0,
                maps_untracked: 0,
                slices: SliceState::default(),
                runtime: p.runtime.map(runtime::RuntimeProc::new),
                gctrace: p.gctrace,
            },
        );
    }

    /// Whether `pid` is watched.
    pub fn watches(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// How many processes are watched.
    pub fn count(&self) -> usize {
        self.procs.len()
    }

    /// Every requested process is watched.
    pub fn ready(&self) -> bool {
        self.requested
            .iter()
            .all(|pid| self.procs.contains_key(pid))
    }

    /// Reads the pauses the probes logged since the last call.
    pub fn drain(&mut self) {
        self.drain_stw();
        self.drain_cycles();
    }

    /// Folds the kernel counters, the growth table and what the assignment
    /// probes saw into the metrics.
    pub fn sync(&mut self) {
        let now = std::time::Instant::now();
        self.fold_growths(now);
        self.fold_slices_exact(now);
        // Counters first, then the assignment probes' table: every map the
        // counters say was added is then either in the table or evicted, so
        // the eviction estimate never counts one still on its way in.
        let mut counters = BTreeMap::new();
        for &pid in self.procs.keys() {
            match self.maps.procs.counters(pid) {
                Ok(s) => {
                    counters.insert(pid, s);
                }
                Err(e) => tracing::debug!(pid, "reading kernel counters: {e}"),
            }
        }
        // One pass over the kernel's map table for every process.
        let mut seen = match self.take_seen() {
            Ok(seen) => seen,
            Err(e) => {
                tracing::debug!("reading assignment probe state: {e}");
                BTreeMap::new()
            }
        };
        for (&pid, p) in &mut self.procs {
            let Some(stats) = counters.remove(&pid) else {
                continue;
            };
            let taken = seen.remove(&pid).unwrap_or_default();
            maps::fold_seen(&self.metrics, self.max_sites, pid, p, &stats, taken);
            fold_hits(&self.metrics, &self.costs, p, &stats);
            let m = &self.metrics;
            let d = |now: u64, then: u64| now.saturating_sub(then);
            m.map_growths_unattributed.inc_by(
                &p.labels,
                d(stats.growths_unattributed, p.synced.growths_unattributed),
            );
            m.map_evacuated_buckets
                .inc_by(&p.labels, d(stats.evacuations, p.synced.evacuations));
            maps::refresh_shapes(&self.metrics, pid, p);
            fold_anomalies(&self.metrics, pid, p, &stats);
            p.synced = stats;
        }
        // The runtime's state is read whether or not the kernel's counters
        // were (a process is read here, not in the kernel).
        for (&pid, p) in &mut self.procs {
            runtime::fold(&self.metrics, &mut self.scratch, pid, p);
        }
    }

    /// Watched processes that exited (or whose pid was reused): detach
    /// them, then [`Collector::remove`] them.
    /// (Returns each with its executable's name, for the log.)
    pub fn exited(&self) -> Vec<(u32, String)> {
        self.procs
            .iter()
            .filter(|(pid, p)| procfs::start_time(**pid).ok() != Some(p.start_time))
            .map(|(pid, p)| (*pid, p.labels.exe.clone()))
            .collect()
    }

    /// Forgets a process whose probes are detached: its series and its
    /// entries in the kernel's growth table.
    pub fn remove(&mut self, pid: u32) {
        self.requested.remove(&pid);
        let Some(p) = self.procs.remove(&pid) else {
            return;
        };
        tracing::debug!(pid, exe = %p.labels.exe, "removing the series of a process");
        let stale: Vec<GrowthKey> = self
            .maps
            .growths
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pid == pid)
            .collect();
        for k in stale {
            let _ = self.maps.growths.remove(&k);
        }
        let stale: Vec<gopulse_common::SliceKey> = self
            .maps
            .slices
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pid == pid)
            .collect();
        for k in stale {
            let _ = self.maps.slices.remove(&k);
        }
        // Without the pid label, replicas in one container share series:
        // they go with the last of them.
        if self.procs.values().any(|o| o.labels == p.labels) {
            return;
        }
        self.metrics.remove_process(&p.labels);
    }
}

/// Reads one kernel counter.
type CounterOf = fn(&Counters) -> u64;

/// The `kind` label of `gopulse_bpf_anomalies_total`, and the kernel
/// counter of each.
const ANOMALY_KINDS: [(&str, CounterOf); 3] = [
    ("read_failed", |c| c.read_failed),
    ("stw_unmatched", |c| c.stw_unmatched),
    ("map_layout", |c| c.map_layout),
];

/// Folds the anomalies the programs counted into the metrics; the agent
/// logs the first of each kind per process at debug (the programs log each
/// with --bpf-debug).
fn fold_anomalies(metrics: &Metrics, pid: u32, p: &Proc, stats: &Counters) {
    for (kind, count) in ANOMALY_KINDS {
        let (now, then) = (count(stats), count(&p.synced));
        if now <= then {
            continue;
        }
        metrics.bpf_anomalies.inc_by(
            &ProcAnd {
                proc: &p.labels,
                value: kind,
            },
            now - then,
        );
        if then == 0 {
            tracing::debug!(pid, kind, count = now, "the BPF programs met an anomaly");
        }
    }
}

/// Folds probe hits, and what they cost, into the metrics.
fn fold_hits(metrics: &Metrics, costs: &Costs, p: &Proc, stats: &Counters) {
    let mut overhead = 0.0;
    for (i, prog) in PROGRAM_TABLE.iter().enumerate() {
        let hits = stats.hits[i].saturating_sub(p.synced.hits[i]);
        if hits == 0 && p.synced.hits[i] == 0 && stats.hits[i] == 0 {
            continue; // no series for probes that never ran
        }
        overhead += hits as f64 * costs.per_hit_s(i);
        metrics.probe_hits.inc_by(
            &ProcAnd {
                proc: &p.labels,
                value: prog.name,
            },
            hits,
        );
    }
    metrics.probe_overhead.add(&p.labels, overhead);
}
