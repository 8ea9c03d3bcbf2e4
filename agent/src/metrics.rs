//! The metrics gopulse exports. Names, labels and units are part of the
//! product: change them only with the docs and dashboards.
use std::{
    hash::{Hash, Hasher},
    sync::{Arc, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

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

impl EncodeLabelSet for ProcLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let mut put = |k: &'static str, v: &str| (k, v).encode(encoder.encode_label());
        if let Some(pid) = &self.pid {
            put("pid", pid)?;
        }
        put("exe", &self.exe)?;
        put("go_version", &self.go_version)?;
        if let Some(id) = &self.container_id {
            put("container_id", id)?;
        }
        if let Some(uid) = &self.pod_uid {
            put("pod_uid", uid)?;
        }
        if let Some(names) = &self.names {
            for (k, v) in names.labels() {
                put(k, &v)?;
            }
        }
        Ok(())
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    #[prometheus(flatten)]
    pub proc: ProcLabels,
    /// `sweep_termination` or `mark_termination`.
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    #[prometheus(flatten)]
    pub proc: ProcLabels,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    #[prometheus(flatten)]
    pub proc: ProcLabels,
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrowthLabels {
    #[prometheus(flatten)]
    pub proc: ProcLabels,
    /// The Go function that caused the growth, as Go prints it.
    pub site: String,
    /// [`GROWTH_KINDS`].
    pub kind: &'static str,
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

/// Per process and probe (BPF program).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    #[prometheus(flatten)]
    pub proc: ProcLabels,
    /// The BPF program: `stw_stop`, `grow_table`, `map_assign`, ...
    pub probe: &'static str,
}

/// Per probe, for the whole node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeNameLabels {
    pub probe: &'static str,
}

/// Load factor buckets: fine near the top, where growth happens (6.5/8 and
/// 7/8), coarse below, where oversized maps sit.
pub const LOAD_FACTOR_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8125, 0.875, 1.0,
];

fn load_factor_histogram() -> Histogram {
    Histogram::new(LOAD_FACTOR_BUCKETS)
}

pub const PHASE_SWEEP: &str = "sweep_termination";
pub const PHASE_MARK: &str = "mark_termination";

/// Pause buckets in seconds: 1-2.5-5 steps from 1 µs to 10 s, so 10 µs is
/// told from 50 µs and 100 ms from 1 s.
pub const PAUSE_BUCKETS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn pause_histogram() -> Histogram {
    Histogram::new(PAUSE_BUCKETS)
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Why discovery did not watch a process.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    /// `not_go`, `unsupported`, `refused`, `filtered`, `limit`, `gone`.
    pub reason: &'static str,
}

/// Exec-to-attached buckets in seconds: the target is 200 ms, the promise 1 s.
pub const ATTACH_DELAY_BUCKETS: [f64; 10] =
    [0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.5, 10.0];

/// The agent's own work finding processes (no per-process labels).
#[derive(Clone)]
pub struct DiscoveryMetrics {
    pub execs: Counter,
    pub skipped: Family<SkipLabels, Counter>,
    pub events_lost: Counter,
    pub executables_judged: Counter,
    pub processes_watched: Gauge,
    pub attach_delay: Histogram,
    pub rescans: Counter,
}

impl DiscoveryMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            execs: Counter::default(),
            skipped: Family::default(),
            events_lost: Counter::default(),
            executables_judged: Counter::default(),
            processes_watched: Gauge::default(),
            attach_delay: Histogram::new(ATTACH_DELAY_BUCKETS),
            rescans: Counter::default(),
        };
        registry.register(
            "discovery_execs",
            "Programs started on the host (exec) that discovery looked at",
            m.execs.clone(),
        );
        registry.register(
            "discovery_skipped",
            "Processes discovery did not watch, by reason: not_go, unsupported (Go release or \
             architecture), refused (unreadable executable), filtered (--exe-regex), limit \
             (--max-processes reached), gone (exited before it was looked at)",
            m.skipped.clone(),
        );
        registry.register(
            "discovery_events_lost",
            "Exec and exit events the kernel's ring had no room for (each loss triggers a \
             /proc rescan)",
            m.events_lost.clone(),
        );
        registry.register(
            "discovery_executables_judged",
            "Executables read to decide whether they are Go (once per file: device, inode, \
             mtime and size)",
            m.executables_judged.clone(),
        );
        registry.register(
            "processes_watched",
            "Go processes the agent watches now",
            m.processes_watched.clone(),
        );
        registry.register_with_unit(
            "discovery_attach_delay",
            "From a Go program's exec to its probes attached",
            Unit::Seconds,
            m.attach_delay.clone(),
        );
        registry.register(
            "discovery_rescans",
            "Scans of /proc (at start-up, every --rescan-interval, and after lost events)",
            m.rescans.clone(),
        );
        m
    }
}

/// Handles to every metric family (clones share the families).
#[derive(Clone)]
pub struct Metrics {
    pub gc_cycles: Family<ProcLabels, Counter>,
    pub gc_pause: HistogramFamily<PhaseLabels>,
    pub stw_pause: HistogramFamily<ReasonLabels>,
    pub stw_pause_max: Family<ReasonLabels, Gauge<f64, AtomicU64>>,
    pub events_lost: Family<ProcLabels, Counter>,
    pub probes_attached: Family<ProcLabels, Gauge>,
    pub map_growths: Family<GrowthLabels, Counter>,
    pub map_sites_dropped: Family<ProcLabels, Counter>,
    pub map_growth_storms: Family<SiteLabels, Counter>,
    pub map_entries: Family<SiteLabels, Gauge>,
    pub map_capacity: Family<SiteLabels, Gauge>,
    pub map_load_factor: Family<SiteLabels, Gauge<f64, AtomicU64>>,
    pub map_overflow: Family<SiteLabels, Gauge>,
    pub map_tables: Family<SiteLabels, Gauge>,
    pub map_load_factor_ratio: HistogramFamily<ProcLabels>,
    pub probe_hits: Family<ProbeLabels, Counter>,
    pub probe_overhead: Family<ProcLabels, Counter<f64, AtomicU64>>,
    pub probe_hit_cost: Family<ProbeNameLabels, Gauge<f64, AtomicU64>>,
    pub map_growths_unattributed: Family<ProcLabels, Counter>,
    pub map_assign_attached: Family<ProcLabels, Gauge>,
    pub map_growth_attached: Family<ProcLabels, Gauge>,
    pub maps_untracked: Family<ProcLabels, Counter>,
    pub map_evacuated_buckets: Family<ProcLabels, Counter>,
    pub uprobes_attached: Gauge,
    pub executables_probed: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            gc_cycles: Family::default(),
            gc_pause: Family::new_with_constructor(pause_histogram as fn() -> Histogram),
            stw_pause: Family::new_with_constructor(pause_histogram as fn() -> Histogram),
            stw_pause_max: Family::default(),
            events_lost: Family::default(),
            probes_attached: Family::default(),
            map_growths: Family::default(),
            map_sites_dropped: Family::default(),
            map_growth_storms: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            map_load_factor: Family::default(),
            map_overflow: Family::default(),
            map_tables: Family::default(),
            map_load_factor_ratio: Family::new_with_constructor(
                load_factor_histogram as fn() -> Histogram,
            ),
            probe_hits: Family::default(),
            probe_overhead: Family::default(),
            probe_hit_cost: Family::default(),
            map_growths_unattributed: Family::default(),
            map_assign_attached: Family::default(),
            map_growth_attached: Family::default(),
            maps_untracked: Family::default(),
            map_evacuated_buckets: Family::default(),
            uprobes_attached: Gauge::default(),
            executables_probed: Gauge::default(),
        };
        registry.register(
            "gc_cycles",
            "Completed GC cycles (runtime.gcMarkTermination) since the agent attached",
            m.gc_cycles.clone(),
        );
        registry.register_with_unit(
            "gc_pause",
            "GC stop-the-world pauses by phase, from the stop request until the world runs \
             again; one per phase per cycle (an abandoned mark-termination stop is added to \
             its cycle's mark_termination pause)",
            Unit::Seconds,
            m.gc_pause.clone(),
        );
        registry.register_with_unit(
            "stw_pause",
            "Every stop-the-world pause by Go's stop reason",
            Unit::Seconds,
            m.stw_pause.clone(),
        );
        registry.register_with_unit(
            "stw_pause_max",
            "Longest stop-the-world pause by reason since the agent attached",
            Unit::Seconds,
            m.stw_pause_max.clone(),
        );
        registry.register(
            "events_lost",
            "Events the kernel dropped because the ring buffer was full",
            m.events_lost.clone(),
        );
        registry.register(
            "probes_attached",
            "Uprobes attached to the process",
            m.probes_attached.clone(),
        );
        registry.register(
            "map_growths",
            "Map growths by the Go function whose map grew (site: the first caller outside \
             the runtime, reflect, encoding/* and the other plumbing) and kind: double or \
             same_size (classic maps); to_table, grow, split or prune (swiss tables)",
            m.map_growths.clone(),
        );
        registry.register(
            "map_growths_unattributed",
            "Map growths counted without a site because the kernel's growth table (32768 \
             sites for all processes) was full",
            m.map_growths_unattributed.clone(),
        );
        registry.register(
            "map_sites_dropped",
            "Map growths counted under site=\"other\" because the process reached the \
             --max-map-sites limit",
            m.map_sites_dropped.clone(),
        );
        registry.register(
            "map_growth_storms",
            "Growth storms: episodes of more than --storm-growths map growths at one site \
             within --storm-window-ms; the site is always the real one, even past \
             --max-map-sites",
            m.map_growth_storms.clone(),
        );
        registry.register(
            "map_entries",
            "Entries of the largest map seen growing at the site, read from the process when \
             metrics are collected",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity_slots",
            "Slots of that map: classic 8<<B; swiss the summed capacity of its tables (8 for \
             a small map)",
            m.map_capacity.clone(),
        );
        registry.register(
            "map_load_factor",
            "Entries / capacity slots of that map",
            m.map_load_factor.clone(),
        );
        registry.register(
            "map_overflow_buckets",
            "Overflow buckets of that map (classic maps; Go counts them approximately from \
             B >= 16)",
            m.map_overflow.clone(),
        );
        registry.register(
            "map_tables",
            "Distinct tables of that map (swiss maps; 0 for a small map)",
            m.map_tables.clone(),
        );
        registry.register(
            "map_load_factor_ratio",
            "Load factor of each map the assignment probes saw, one observation per map per \
             sampling window: oversized, mostly empty maps sit low",
            m.map_load_factor_ratio.clone(),
        );
        registry.register(
            "probe_hits",
            "Uprobe hits by probe (BPF program)",
            m.probe_hits.clone(),
        );
        registry.register_with_unit(
            "probe_overhead",
            "Estimated CPU time the probes cost the process: each probe's hits times its \
             cost per hit (gopulse_probe_hit_cost_seconds)",
            Unit::Seconds,
            m.probe_overhead.clone(),
        );
        registry.register_with_unit(
            "probe_hit_cost",
            "What one hit of each probe costs on this node: the uprobe trap, timed by the \
             agent at start-up, plus the program's mean run time from the kernel's BPF \
             statistics",
            Unit::Seconds,
            m.probe_hit_cost.clone(),
        );
        registry.register(
            "map_assign_probes_attached",
            "1 while the map assignment/deletion probes are attached to the process; when \
             they are sampled or cut by the overhead budget, shapes of maps that never grew \
             are only seen while attached",
            m.map_assign_attached.clone(),
        );
        registry.register(
            "map_growth_probes_attached",
            "1 while the map growth probes are attached; 0 while the overhead governor has \
             cut them (the process grew maps so fast for so long that they spent \
             --overhead-budget over --overhead-window), and then growth counts, sites and \
             shapes miss what happens meanwhile",
            m.map_growth_attached.clone(),
        );
        registry.register(
            "map_untracked",
            "Maps the assignment probes saw but the kernel's map table (64k maps for all \
             processes) evicted before the agent read them",
            m.maps_untracked.clone(),
        );
        registry.register(
            "map_evacuated_buckets",
            "Old buckets classic maps moved in their incremental growth \
             (runtime.evacuate*), counted while the assignment probes are attached",
            m.map_evacuated_buckets.clone(),
        );
        registry.register(
            "uprobes_attached",
            "Uprobes the agent has attached on this host: one set per executable, shared by \
             every watched process that runs it",
            m.uprobes_attached.clone(),
        );
        registry.register(
            "executables_probed",
            "Executables with probes attached (replicas of one binary count once)",
            m.executables_probed.clone(),
        );
        m
    }

    /// Drops every series of a process that went away.
    pub fn remove_process(
        &self,
        labels: &ProcLabels,
        reasons: &[String],
        growths: &[(String, &'static str)],
        storm_sites: &[String],
    ) {
        self.gc_cycles.remove(labels);
        self.map_sites_dropped.remove(labels);
        self.map_load_factor_ratio.remove(labels);
        self.probe_overhead.remove(labels);
        self.map_assign_attached.remove(labels);
        self.map_growth_attached.remove(labels);
        self.maps_untracked.remove(labels);
        self.map_evacuated_buckets.remove(labels);
        self.map_growths_unattributed.remove(labels);
        for probe in crate::plan::PROGRAM_TABLE.iter().map(|p| p.name) {
            self.probe_hits.remove(&ProbeLabels {
                proc: labels.clone(),
                probe,
            });
        }
        for (site, kind) in growths {
            self.map_growths.remove(&GrowthLabels {
                proc: labels.clone(),
                site: site.clone(),
                kind,
            });
            let site = SiteLabels {
                proc: labels.clone(),
                site: site.clone(),
            };
            self.map_entries.remove(&site);
            self.map_capacity.remove(&site);
            self.map_load_factor.remove(&site);
            self.map_overflow.remove(&site);
            self.map_tables.remove(&site);
        }
        for site in storm_sites {
            self.map_growth_storms.remove(&SiteLabels {
                proc: labels.clone(),
                site: site.clone(),
            });
        }
        self.events_lost.remove(labels);
        self.probes_attached.remove(labels);
        for phase in [PHASE_SWEEP, PHASE_MARK] {
            self.gc_pause.remove(&PhaseLabels {
                proc: labels.clone(),
                phase,
            });
        }
        for reason in reasons {
            let l = ReasonLabels {
                proc: labels.clone(),
                reason: reason.clone(),
            };
            self.stw_pause.remove(&l);
            self.stw_pause_max.remove(&l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_separate_the_ranges_users_care_about() {
        let b = PAUSE_BUCKETS;
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        let between = |lo: f64, hi: f64| b.iter().any(|&x| x >= lo && x < hi);
        assert!(between(10e-6, 50e-6));
        assert!(between(100e-3, 1.0));
        assert!((b[0] - 1e-6).abs() < 1e-12);
        assert_eq!(*b.last().unwrap(), 10.0);
    }

    #[test]
    fn names_and_units() {
        let mut registry = Registry::with_prefix("gopulse");
        let m = Metrics::new(&mut registry);
        let proc = ProcLabels {
            pid: Some("1".into()),
            exe: "x".into(),
            go_version: "go1.27.3".into(),
            ..ProcLabels::default()
        };
        m.gc_cycles.get_or_create(&proc).inc();
        m.gc_pause
            .get_or_create(&PhaseLabels {
                proc: proc.clone(),
                phase: PHASE_MARK,
            })
            .observe(20e-6);
        let _ = m.events_lost.get_or_create(&proc);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains(r#"gopulse_gc_cycles_total{pid="1",exe="x",go_version="go1.27.3"} 1"#)
        );
        assert!(out.contains(r#"gopulse_gc_pause_seconds_count{pid="1",exe="x",go_version="go1.27.3",phase="mark_termination"} 1"#));
        assert!(out.contains("gopulse_events_lost_total{"));
        m.remove_process(&proc, &[], &[], &[]);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(!out.contains("pid=\"1\""));
    }
}
