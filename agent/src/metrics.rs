//! Handles to every metric of the model (`crate::model`), by the labels
//! their series carry. The metrics themselves (names, units, help) are
//! declared in `crate::model::decl`.
use std::{
    cmp::Ordering,
    hash::{Hash, Hasher},
    sync::Arc,
};

use crate::model::{Family, LabelKind, Labels, Model, SeriesKey, decl};

/// Labels every series of a process carries: who the process is. `pid`,
/// `container_id` and `pod_uid` are absent when unknown or turned off
/// (`--labels`); `namespace`, `pod` and `container` appear once the
/// Kubernetes API has named the pod (they are not part of the series'
/// identity inside the agent).
#[derive(Clone, Debug, Default)]
pub struct ProcLabels {
    pub pid: Option<String>,
    pub exe: String,
    pub go_version: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub names: Option<Arc<crate::discover::pods::PodNames>>,
}

impl ProcLabels {
    fn key(
        &self,
    ) -> (
        &Option<String>,
        &str,
        &str,
        &Option<String>,
        &Option<String>,
    ) {
        (
            &self.pid,
            &self.exe,
            &self.go_version,
            &self.container_id,
            &self.pod_uid,
        )
    }
}

impl PartialEq for ProcLabels {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for ProcLabels {}

impl Hash for ProcLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialOrd for ProcLabels {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ProcLabels {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl ProcLabels {
    /// The labels a process's series carry on `/metrics`, in order.
    pub fn prom_labels(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(8);
        if let Some(pid) = &self.pid {
            out.push(("pid", pid.clone()));
        }
        out.push(("exe", self.exe.clone()));
        out.push(("go_version", self.go_version.clone()));
        if let Some(id) = &self.container_id {
            out.push(("container_id", id.clone()));
        }
        if let Some(uid) = &self.pod_uid {
            out.push(("pod_uid", uid.clone()));
        }
        if let Some(names) = &self.names {
            out.extend(names.labels());
        }
        out
    }
}

/// Which optional labels series carry (`--labels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelChoice {
    pub pid: bool,
    pub container_id: bool,
    pub pod_uid: bool,
    pub namespace: bool,
    pub pod: bool,
    pub container: bool,
}

impl LabelChoice {
    /// Every optional label.
    pub const ALL: &str = "pid,container_id,pod_uid,namespace,pod,container";

    /// Parses a comma-separated list of the optional labels.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut c = Self {
            pid: false,
            container_id: false,
            pod_uid: false,
            namespace: false,
            pod: false,
            container: false,
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let flag = match name {
                "pid" => &mut c.pid,
                "container_id" => &mut c.container_id,
                "pod_uid" => &mut c.pod_uid,
                "namespace" => &mut c.namespace,
                "pod" => &mut c.pod,
                "container" => &mut c.container,
                other => {
                    return Err(format!(
                        "unknown label {other:?}; the optional labels are {}",
                        Self::ALL
                    ));
                }
            };
            *flag = true;
        }
        Ok(c)
    }
}

/// A process's series with one label of their own (phase, reason, site or
/// probe).
#[derive(Clone, Debug)]
pub struct ProcAnd<'a> {
    pub proc: &'a ProcLabels,
    pub value: &'a str,
}

impl Labels for ProcAnd<'_> {
    fn key(&self) -> SeriesKey {
        SeriesKey {
            group: Some(self.proc.clone()),
            values: vec![self.value.to_owned()],
        }
    }
}

impl LabelKind for ProcAnd<'static> {
    type Of<'a> = ProcAnd<'a>;
}

/// A growth's series: the process, its site and its kind.
#[derive(Clone, Debug)]
pub struct GrowthLabels<'a> {
    pub proc: &'a ProcLabels,
    /// The Go function that caused the growth, as Go prints it.
    pub site: &'a str,
    /// [`GROWTH_KINDS`].
    pub kind: &'static str,
}

impl Labels for GrowthLabels<'_> {
    fn key(&self) -> SeriesKey {
        SeriesKey {
            group: Some(self.proc.clone()),
            values: vec![self.site.to_owned(), self.kind.to_owned()],
        }
    }
}

impl LabelKind for GrowthLabels<'static> {
    type Of<'a> = GrowthLabels<'a>;
}

/// A node series with one label (probe, skip reason, export result,
/// executable).
#[derive(Clone, Copy, Debug)]
pub struct NodeLabel<'a>(pub &'a str);

impl LabelKind for NodeLabel<'static> {
    type Of<'a> = NodeLabel<'a>;
}

impl Labels for NodeLabel<'_> {
    fn key(&self) -> SeriesKey {
        SeriesKey {
            group: None,
            values: vec![self.0.to_owned()],
        }
    }
}

/// The `kind` label of `gopulse_map_growths_total`, and what each means.
pub const GROWTH_KINDS: &[(&str, &str)] = &[
    (
        "double",
        "classic map: hashGrow to twice the buckets (more than 6.5 entries a bucket)",
    ),
    (
        "same_size",
        "classic map: hashGrow to as many buckets (too many overflow buckets, compacted)",
    ),
    (
        "to_table",
        "swiss map: a small map (8 slots) passed 8 entries and became a table",
    ),
    (
        "grow",
        "swiss map: a full table replaced by one twice its capacity",
    ),
    ("split", "swiss map: a full 1024-slot table split in two"),
    (
        "prune",
        "swiss map (Go 1.25+): a full table rehashed in place to reclaim deleted slots",
    ),
];

pub const PHASE_SWEEP: &str = "sweep_termination";
pub const PHASE_MARK: &str = "mark_termination";

type Proc = ProcLabels;
type Node = ();

/// The agent's own work finding processes (no per-process labels).
#[derive(Clone)]
pub struct DiscoveryMetrics {
    pub execs: Family<Node>,
    pub skipped: Family<NodeLabel<'static>>,
    /// Go processes that could not be watched, by executable.
    pub watch_failures: Family<NodeLabel<'static>>,
    pub events_lost: Family<Node>,
    pub executables_judged: Family<Node>,
    pub processes_watched: Family<Node>,
    pub attach_delay: Family<Node>,
    pub rescans: Family<Node>,
}

impl DiscoveryMetrics {
    pub fn new(model: &Model) -> Self {
        let m = Self {
            execs: model.family(&decl::DISCOVERY_EXECS),
            skipped: model.family(&decl::DISCOVERY_SKIPPED),
            watch_failures: model.family(&decl::WATCH_FAILURES),
            events_lost: model.family(&decl::DISCOVERY_EVENTS_LOST),
            executables_judged: model.family(&decl::DISCOVERY_EXECUTABLES_JUDGED),
            processes_watched: model.family(&decl::PROCESSES_WATCHED),
            attach_delay: model.family(&decl::DISCOVERY_ATTACH_DELAY),
            rescans: model.family(&decl::DISCOVERY_RESCANS),
        };
        // Node series read 0 from the start rather than being absent.
        for f in [
            &m.execs,
            &m.events_lost,
            &m.executables_judged,
            &m.processes_watched,
            &m.attach_delay,
            &m.rescans,
        ] {
            f.create(&());
        }
        m
    }

    /// Counts a Go process that could not be watched (and is still there),
    /// by its executable's name.
    pub fn watch_failed(&self, pid: u32) {
        let name = crate::procfs::exe_name(pid).unwrap_or_default();
        self.watch_failures.inc(&NodeLabel(&name));
    }
}

/// The Go runtime's own state, read from the process's memory
/// (`crate::runtime_state`).
#[derive(Clone)]
pub struct RuntimeMetrics {
    /// By `go_memory_type`: [`MEMORY_STACK`], [`MEMORY_OTHER`].
    pub memory_used: Family<ProcAnd<'static>>,
    pub memory_limit: Family<Proc>,
    pub allocated: Family<Proc>,
    pub allocations: Family<Proc>,
    pub heap_goal: Family<Proc>,
    pub gc_cycles: Family<Proc>,
    pub heap_live: Family<Proc>,
    pub goroutines: Family<Proc>,
    pub goroutines_system: Family<Proc>,
    pub gomaxprocs: Family<Proc>,
    pub gogc: Family<Proc>,
    pub schedule_duration: Family<Proc>,
    /// By `go_cpu_state`: [`CPU_STATES`].
    pub cpu_time: Family<ProcAnd<'static>>,
}

impl RuntimeMetrics {
    fn new(model: &Model) -> Self {
        Self {
            memory_used: model.family(&decl::GO_MEMORY_USED),
            memory_limit: model.family(&decl::GO_MEMORY_LIMIT),
            allocated: model.family(&decl::GO_MEMORY_ALLOCATED),
            allocations: model.family(&decl::GO_MEMORY_ALLOCATIONS),
            heap_goal: model.family(&decl::GO_MEMORY_GC_GOAL),
            gc_cycles: model.family(&decl::GO_MEMORY_GC_CYCLES),
            heap_live: model.family(&decl::GC_HEAP_LIVE),
            goroutines: model.family(&decl::GO_GOROUTINE_COUNT),
            goroutines_system: model.family(&decl::GOROUTINE_SYSTEM),
            gomaxprocs: model.family(&decl::GO_PROCESSOR_LIMIT),
            gogc: model.family(&decl::GO_CONFIG_GOGC),
            schedule_duration: model.family(&decl::GO_SCHEDULE_DURATION),
            cpu_time: model.family(&decl::GO_CPU_TIME),
        }
    }
}

/// `go_memory_type` values.
pub const MEMORY_STACK: &str = "stack";
pub const MEMORY_OTHER: &str = "other";

/// `go_cpu_state` values.
pub const CPU_STATES: [&str; 4] = ["user", "gc", "scavenge", "idle"];

/// Handles to every per-process metric and the attach stage's node gauges
/// (clones share the model).
#[derive(Clone)]
pub struct Metrics {
    pub runtime: RuntimeMetrics,
    pub gc_pause: Family<ProcAnd<'static>>,
    pub gc_triggers: Family<ProcAnd<'static>>,
    pub gc_forced: Family<ProcAnd<'static>>,
    pub gc_forced_storms: Family<ProcAnd<'static>>,
    pub gc_mark_duration: Family<Proc>,
    pub gc_assist_cpu: Family<Proc>,
    pub stw_pause: Family<ProcAnd<'static>>,
    pub stw_pause_max: Family<ProcAnd<'static>>,
    pub events_lost: Family<Proc>,
    pub probes_attached: Family<Proc>,
    pub map_growths: Family<GrowthLabels<'static>>,
    pub map_sites_dropped: Family<Proc>,
    pub map_growth_storms: Family<ProcAnd<'static>>,
    pub map_entries: Family<ProcAnd<'static>>,
    pub map_capacity: Family<ProcAnd<'static>>,
    pub map_load_factor: Family<ProcAnd<'static>>,
    pub map_overflow: Family<ProcAnd<'static>>,
    pub map_tables: Family<ProcAnd<'static>>,
    pub map_load_factor_ratio: Family<Proc>,
    pub probe_hits: Family<ProcAnd<'static>>,
    pub probe_overhead: Family<Proc>,
    pub probe_hit_cost: Family<NodeLabel<'static>>,
    pub map_growths_unattributed: Family<Proc>,
    pub map_assign_attached: Family<Proc>,
    pub map_growth_attached: Family<Proc>,
    pub map_growth_unwatched: Family<ProcAnd<'static>>,
    pub maps_untracked: Family<Proc>,
    pub map_evacuated_buckets: Family<Proc>,
    pub bpf_anomalies: Family<ProcAnd<'static>>,
    pub slice_growths: Family<ProcAnd<'static>>,
    pub slice_copied: Family<ProcAnd<'static>>,
    pub slice_capacity: Family<ProcAnd<'static>>,
    pub slice_growth_storms: Family<ProcAnd<'static>>,
    pub slice_growths_unattributed: Family<Proc>,
    pub slice_sites_dropped: Family<Proc>,
    pub slice_probes_attached: Family<Proc>,
    pub slice_sample_ratio: Family<Proc>,
    pub uprobes_attached: Family<Node>,
    pub executables_probed: Family<Node>,
    model: Model,
}

impl Metrics {
    pub fn new(model: &Model) -> Self {
        let m = Self {
            runtime: RuntimeMetrics::new(model),
            gc_pause: model.family(&decl::GC_PAUSE),
            gc_triggers: model.family(&decl::GC_TRIGGERS),
            gc_forced: model.family(&decl::GC_FORCED),
            gc_forced_storms: model.family(&decl::GC_FORCED_STORMS),
            gc_mark_duration: model.family(&decl::GC_MARK_DURATION),
            gc_assist_cpu: model.family(&decl::GC_ASSIST_CPU),
            stw_pause: model.family(&decl::STW_PAUSE),
            stw_pause_max: model.family(&decl::STW_PAUSE_MAX),
            events_lost: model.family(&decl::EVENTS_LOST),
            probes_attached: model.family(&decl::PROBES_ATTACHED),
            map_growths: model.family(&decl::MAP_GROWTHS),
            map_sites_dropped: model.family(&decl::MAP_SITES_DROPPED),
            map_growth_storms: model.family(&decl::MAP_GROWTH_STORMS),
            map_entries: model.family(&decl::MAP_ENTRIES),
            map_capacity: model.family(&decl::MAP_CAPACITY),
            map_load_factor: model.family(&decl::MAP_LOAD_FACTOR),
            map_overflow: model.family(&decl::MAP_OVERFLOW),
            map_tables: model.family(&decl::MAP_TABLES),
            map_load_factor_ratio: model.family(&decl::MAP_LOAD_FACTOR_RATIO),
            probe_hits: model.family(&decl::PROBE_HITS),
            probe_overhead: model.family(&decl::PROBE_OVERHEAD),
            probe_hit_cost: model.family(&decl::PROBE_HIT_COST),
            map_growths_unattributed: model.family(&decl::MAP_GROWTHS_UNATTRIBUTED),
            map_assign_attached: model.family(&decl::MAP_ASSIGN_ATTACHED),
            map_growth_attached: model.family(&decl::MAP_GROWTH_ATTACHED),
            map_growth_unwatched: model.family(&decl::MAP_GROWTH_UNWATCHED),
            maps_untracked: model.family(&decl::MAPS_UNTRACKED),
            map_evacuated_buckets: model.family(&decl::MAP_EVACUATED_BUCKETS),
            bpf_anomalies: model.family(&decl::BPF_ANOMALIES),
            slice_growths: model.family(&decl::SLICE_GROWTHS),
            slice_copied: model.family(&decl::SLICE_COPIED),
            slice_capacity: model.family(&decl::SLICE_CAPACITY),
            slice_growth_storms: model.family(&decl::SLICE_GROWTH_STORMS),
            slice_growths_unattributed: model.family(&decl::SLICE_GROWTHS_UNATTRIBUTED),
            slice_sites_dropped: model.family(&decl::SLICE_SITES_DROPPED),
            slice_probes_attached: model.family(&decl::SLICE_PROBES_ATTACHED),
            slice_sample_ratio: model.family(&decl::SLICE_SAMPLE_RATIO),
            uprobes_attached: model.family(&decl::UPROBES_ATTACHED),
            executables_probed: model.family(&decl::EXECUTABLES_PROBED),
            model: model.clone(),
        };
        m.uprobes_attached.create(&());
        m.executables_probed.create(&());
        m
    }

    /// Drops every series of a process that went away.
    pub fn remove_process(&self, labels: &ProcLabels) {
        self.model.remove_group(labels);
    }
}
