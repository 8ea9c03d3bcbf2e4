//! Every metric gopulse exports, declared once: its Prometheus name, its
//! OpenTelemetry name, kind, unit, help and labels. Both exporters render
//! from these; the README's metric table is tested against them. Names,
//! labels and units are part of the product: change them only with the
//! docs and dashboards.

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Only goes up (from 0 when its series appears, or from the runtime's
    /// own total).
    Counter(Number),
    /// A value that goes up and down.
    Gauge(Number),
    /// A value that goes up and down and is a sum of its parts (OpenTelemetry's
    /// UpDownCounter, as the Go runtime conventions declare them; a gauge
    /// on `/metrics`).
    UpDownCounter(Number),
    /// Observations in buckets (upper bounds, ascending; +Inf implied).
    Histogram(&'static [f64]),
}

/// Integer or floating point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Number {
    Int,
    Float,
}

/// A label of a metric besides the process's own (per process metrics) and
/// its attribute name on OTLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label {
    pub prom: &'static str,
    pub otel: &'static str,
}

/// Whether a metric's series belong to a watched process or to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Carries the process's labels (Prometheus) / is in its resource (OTLP).
    Process,
    /// The agent's own, for the node.
    Node,
}

/// One metric.
#[derive(Debug, PartialEq)]
pub struct Decl {
    /// The Prometheus name before the unit and `_total` suffixes:
    /// `gopulse_...` for ours, the OpenTelemetry name translated as the
    /// OTLP-to-Prometheus convention does (`go.memory.used` → `go_memory_used`)
    /// for the Go runtime's semantic conventions.
    pub name: &'static str,
    /// `seconds`, `bytes`, `percent` or none; Prometheus appends it to the name.
    pub prom_unit: Option<&'static str>,
    /// The OpenTelemetry name (semantic conventions where they exist).
    pub otel: &'static str,
    /// UCUM, as OpenTelemetry wants it: `s`, `1`, `{growth}`, ...
    pub otel_unit: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub labels: &'static [Label],
    pub help: &'static str,
}

impl Decl {
    /// The name of its series on `/metrics` (`_total` for counters; the
    /// histogram's `_bucket`, `_sum`, `_count` go after it).
    pub fn prom_series_name(&self) -> String {
        let mut n = self.name.to_owned();
        if let Some(u) = self.prom_unit {
            n.push('_');
            n.push_str(u);
        }
        if matches!(self.kind, Kind::Counter(_)) {
            n.push_str("_total");
        }
        n
    }

    /// `counter`, `gauge`, `updowncounter` or `histogram`.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Counter(_) => "counter",
            Kind::Gauge(_) => "gauge",
            Kind::UpDownCounter(_) => "updowncounter",
            Kind::Histogram(_) => "histogram",
        }
    }
}

const fn label(prom: &'static str, otel: &'static str) -> Label {
    Label { prom, otel }
}

pub const PHASE: Label = label("phase", "go.gc.phase");
pub const REASON: Label = label("reason", "go.stw.reason");
pub const SITE: Label = label("site", "code.function.name");
pub const GROWTH_KIND: Label = label("kind", "gopulse.map.growth.kind");
pub const ANOMALY_KIND: Label = label("kind", "gopulse.bpf.anomaly.kind");
pub const PROBE: Label = label("probe", "gopulse.probe");
pub const SKIP_REASON: Label = label("reason", "gopulse.discovery.skip_reason");
pub const RESULT: Label = label("result", "gopulse.otlp.result");
pub const EXE: Label = label("exe", "process.executable.name");
pub const GO_MEMORY_TYPE: Label = label("go_memory_type", "go.memory.type");
pub const GO_CPU_STATE: Label = label("go_cpu_state", "go.cpu.state");
pub const TRIGGER: Label = label("trigger", "gopulse.gc.trigger");

/// Pause buckets in seconds: 1-2.5-5 steps from 1 µs to 10 s, so 10 µs is
/// told from 50 µs and 100 ms from 1 s.
pub const PAUSE_BUCKETS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Scheduling latency bucket bounds in nanoseconds: the runtime's own
/// bucket boundaries (four per power of two of nanoseconds) nearest each
/// 1-2.5-5 step from 1 µs to 10 s, so each exported bucket is a union of
/// the runtime's and its count is exact.
pub const SCHED_BUCKETS_NS: [u64; 22] = [
    1_024,
    2_560,
    5_120,
    10_240,
    24_576,
    49_152,
    98_304,
    262_144,
    524_288,
    1_048_576,
    2_621_440,
    5_242_880,
    10_485_760,
    25_165_824,
    50_331_648,
    100_663_296,
    268_435_456,
    536_870_912,
    1_073_741_824,
    2_684_354_560,
    5_368_709_120,
    10_737_418_240,
];

/// [`SCHED_BUCKETS_NS`] in seconds.
pub const SCHED_BUCKETS: [f64; 22] = {
    let mut out = [0.0; 22];
    let mut i = 0;
    while i < out.len() {
        out[i] = SCHED_BUCKETS_NS[i] as f64 / 1e9;
        i += 1;
    }
    out
};

/// Load factor buckets: fine near the top, where growth happens (6.5/8 and
/// 7/8), coarse below, where oversized maps sit.
pub const LOAD_FACTOR_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8125, 0.875, 1.0,
];

/// New slice capacities in bytes: the kernel's own buckets
/// (`gopulse_common::slice_bucket`), 64 B to 64 MiB in steps of 4.
pub const SLICE_CAPACITY_BUCKETS: [f64; 11] = [
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];

/// Exec-to-attached buckets in seconds: the target is 200 ms, the promise 1 s.
pub const ATTACH_DELAY_BUCKETS: [f64; 10] =
    [0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.5, 10.0];

use Kind::{Counter, Gauge, Histogram, UpDownCounter};
use Number::{Float, Int};
use Scope::{Node, Process};

// The Go runtime's own state, read from the process's memory at each
// collection (`crate::runtime_state`): the OpenTelemetry semantic
// conventions for Go runtime metrics (`model/go`), and ours beside them.

pub static GO_MEMORY_USED: Decl = Decl {
    name: "go_memory_used",
    prom_unit: Some("bytes"),
    otel: "go.memory.used",
    otel_unit: "By",
    kind: UpDownCounter(Int),
    scope: Process,
    labels: &[GO_MEMORY_TYPE],
    help: "Memory used by the Go runtime (/memory/classes/total:bytes minus \
           /memory/classes/heap/released:bytes), by type: stack (heap/stacks + os-stacks) \
           and other",
};

pub static GO_MEMORY_LIMIT: Decl = Decl {
    name: "go_memory_limit",
    prom_unit: Some("bytes"),
    otel: "go.memory.limit",
    otel_unit: "By",
    kind: UpDownCounter(Int),
    scope: Process,
    labels: &[],
    help: "The Go runtime's memory limit (GOMEMLIMIT, debug.SetMemoryLimit; \
           /gc/gomemlimit:bytes); absent while no limit is set",
};

pub static GO_MEMORY_ALLOCATED: Decl = Decl {
    name: "go_memory_allocated",
    prom_unit: Some("bytes"),
    otel: "go.memory.allocated",
    otel_unit: "By",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Bytes the program allocated on the heap since it started (/gc/heap/allocs:bytes)",
};

pub static GO_MEMORY_ALLOCATIONS: Decl = Decl {
    name: "go_memory_allocations",
    prom_unit: None,
    otel: "go.memory.allocations",
    otel_unit: "{allocation}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Heap allocations the program made since it started (/gc/heap/allocs:objects)",
};

pub static GO_MEMORY_GC_GOAL: Decl = Decl {
    name: "go_memory_gc_goal",
    prom_unit: Some("bytes"),
    otel: "go.memory.gc.goal",
    otel_unit: "By",
    kind: UpDownCounter(Int),
    scope: Process,
    labels: &[],
    help: "Heap size the GC aims to finish the current cycle at (/gc/heap/goal:bytes): from \
           GOGC, or lower under the memory limit",
};

pub static GO_MEMORY_GC_CYCLES: Decl = Decl {
    name: "go_memory_gc_cycles",
    prom_unit: None,
    otel: "go.memory.gc.cycles",
    otel_unit: "{gc_cycle}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Completed GC cycles since the process started (/gc/cycles/total:gc-cycles)",
};

pub static GC_HEAP_LIVE: Decl = Decl {
    name: "gopulse_gc_heap_live",
    prom_unit: Some("bytes"),
    otel: "gopulse.gc.heap.live",
    otel_unit: "By",
    kind: UpDownCounter(Int),
    scope: Process,
    labels: &[],
    help: "Heap the last GC cycle marked live (/gc/heap/live:bytes): what the heap goal is \
           computed from",
};

pub static GO_GOROUTINE_COUNT: Decl = Decl {
    name: "go_goroutine_count",
    prom_unit: None,
    otel: "go.goroutine.count",
    otel_unit: "{goroutine}",
    kind: UpDownCounter(Int),
    scope: Process,
    labels: &[],
    help: "Live goroutines (/sched/goroutines:goroutines): from Go 1.26 on the runtime's own \
           system goroutines included, before not",
};

pub static GOROUTINE_SYSTEM: Decl = Decl {
    name: "gopulse_goroutine_system",
    prom_unit: None,
    otel: "gopulse.goroutine.system",
    otel_unit: "{goroutine}",
    kind: UpDownCounter(Int),
    scope: Process,
    labels: &[],
    help: "The runtime's own system goroutines (sched.ngsys): runtime.NumGoroutine() is \
           go_goroutine_count minus this on Go 1.26+, go_goroutine_count itself before",
};

pub static GO_PROCESSOR_LIMIT: Decl = Decl {
    name: "go_processor_limit",
    prom_unit: None,
    otel: "go.processor.limit",
    otel_unit: "{thread}",
    kind: UpDownCounter(Int),
    scope: Process,
    labels: &[],
    help: "GOMAXPROCS: OS threads that may run Go code at once (/sched/gomaxprocs:threads)",
};

pub static GO_CONFIG_GOGC: Decl = Decl {
    name: "go_config_gogc",
    prom_unit: Some("percent"),
    otel: "go.config.gogc",
    otel_unit: "%",
    kind: UpDownCounter(Int),
    scope: Process,
    labels: &[],
    help: "GOGC (/gc/gogc:percent); -1 when the GC is off",
};

pub static GO_SCHEDULE_DURATION: Decl = Decl {
    name: "go_schedule_duration",
    prom_unit: Some("seconds"),
    otel: "go.schedule.duration",
    otel_unit: "s",
    kind: Histogram(&SCHED_BUCKETS),
    scope: Process,
    labels: &[],
    help: "Time goroutines waited runnable before they ran (/sched/latencies:seconds; the \
           runtime samples one transition in eight). Buckets are unions of the runtime's own, \
           so counts are exact; the sum is estimated from the midpoints of its buckets",
};

pub static GO_CPU_TIME: Decl = Decl {
    name: "go_cpu_time",
    prom_unit: Some("seconds"),
    otel: "go.cpu.time",
    otel_unit: "s",
    kind: Counter(Float),
    scope: Process,
    labels: &[GO_CPU_STATE],
    help: "CPU time the Go runtime accounts to user code, the GC, the scavenger and idle Ps \
           (/cpu/classes/...:cpu-seconds); an estimate the runtime updates at the end of \
           each GC cycle",
};

pub static GC_PAUSE: Decl = Decl {
    name: "gopulse_gc_pause",
    prom_unit: Some("seconds"),
    otel: "go.memory.gc.pause.duration",
    otel_unit: "s",
    kind: Histogram(&PAUSE_BUCKETS),
    scope: Process,
    labels: &[PHASE],
    help: "GC stop-the-world pauses by phase, from the stop request until the world runs \
           again; one per phase per cycle (an abandoned mark-termination stop is added to \
           its cycle's mark_termination pause)",
};

pub static GC_TRIGGERS: Decl = Decl {
    name: "gopulse_gc_triggers",
    prom_unit: None,
    otel: "gopulse.gc.triggers",
    otel_unit: "{cycle}",
    kind: Counter(Int),
    scope: Process,
    labels: &[TRIGGER],
    help: "Completed GC cycles since attach by what started them: heap (the heap reached its \
           trigger, the memory limit's included), time (the periodic GC after 2 minutes \
           without one) or forced (runtime.GC, debug.FreeOSMemory)",
};

pub static GC_FORCED: Decl = Decl {
    name: "gopulse_gc_forced",
    prom_unit: None,
    otel: "gopulse.gc.forced",
    otel_unit: "{cycle}",
    kind: Counter(Int),
    scope: Process,
    labels: &[SITE],
    help: "Forced GC cycles by the Go function that called runtime.GC or \
           debug.FreeOSMemory (walked past the runtime and the plumbing of map growth sites)",
};

pub static GC_FORCED_STORMS: Decl = Decl {
    name: "gopulse_gc_forced_storms",
    prom_unit: None,
    otel: "gopulse.gc.forced.storms",
    otel_unit: "{storm}",
    kind: Counter(Int),
    scope: Process,
    labels: &[SITE],
    help: "Forced-GC storms: episodes of more than --gc-storm-cycles forced cycles at one \
           site within --storm-window-ms",
};

pub static GC_MARK_DURATION: Decl = Decl {
    name: "gopulse_gc_mark_duration",
    prom_unit: Some("seconds"),
    otel: "gopulse.gc.mark.duration",
    otel_unit: "s",
    kind: Histogram(&PAUSE_BUCKETS),
    scope: Process,
    labels: &[],
    help: "Concurrent mark wall time of each completed GC cycle (work.tMarkTerm - \
           work.tMark, the middle clock figure of gctrace)",
};

pub static GC_ASSIST_CPU: Decl = Decl {
    name: "gopulse_gc_assist_cpu",
    prom_unit: Some("seconds"),
    otel: "gopulse.gc.assist.cpu",
    otel_unit: "s",
    kind: Histogram(&PAUSE_BUCKETS),
    scope: Process,
    labels: &[],
    help: "CPU time goroutines spent assisting the marking of each completed GC cycle \
           (gcController.assistTime, gctrace's assist figure): the allocation slowdown the \
           GC charged the program",
};

pub static STW_PAUSE: Decl = Decl {
    name: "gopulse_stw_pause",
    prom_unit: Some("seconds"),
    otel: "gopulse.stw.pause.duration",
    otel_unit: "s",
    kind: Histogram(&PAUSE_BUCKETS),
    scope: Process,
    labels: &[REASON],
    help: "Every stop-the-world pause by Go's stop reason",
};

pub static STW_PAUSE_MAX: Decl = Decl {
    name: "gopulse_stw_pause_max",
    prom_unit: Some("seconds"),
    otel: "gopulse.stw.pause.max",
    otel_unit: "s",
    kind: Gauge(Float),
    scope: Process,
    labels: &[REASON],
    help: "Longest stop-the-world pause by reason since the agent attached",
};

pub static EVENTS_LOST: Decl = Decl {
    name: "gopulse_events_lost",
    prom_unit: None,
    otel: "gopulse.events.lost",
    otel_unit: "{event}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Events the kernel dropped because the ring buffer was full",
};

pub static PROBES_ATTACHED: Decl = Decl {
    name: "gopulse_probes_attached",
    prom_unit: None,
    otel: "gopulse.probes.attached",
    otel_unit: "{probe}",
    kind: Gauge(Int),
    scope: Process,
    labels: &[],
    help: "Uprobes attached to the process",
};

pub static MAP_GROWTHS: Decl = Decl {
    name: "gopulse_map_growths",
    prom_unit: None,
    otel: "gopulse.map.growths",
    otel_unit: "{growth}",
    kind: Counter(Int),
    scope: Process,
    labels: &[SITE, GROWTH_KIND],
    help: "Map growths by the Go function whose map grew (site: the first caller outside \
           the runtime, reflect, encoding/* and the other plumbing) and kind: double or \
           same_size (classic maps); to_table, grow, split or prune (swiss tables)",
};

pub static MAP_GROWTHS_UNATTRIBUTED: Decl = Decl {
    name: "gopulse_map_growths_unattributed",
    prom_unit: None,
    otel: "gopulse.map.growths.unattributed",
    otel_unit: "{growth}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Map growths counted without a site because the kernel's growth table (32768 \
           sites for all processes) was full",
};

pub static MAP_SITES_DROPPED: Decl = Decl {
    name: "gopulse_map_sites_dropped",
    prom_unit: None,
    otel: "gopulse.map.sites.dropped",
    otel_unit: "{growth}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Map growths counted under site=\"other\" because the process reached the \
           --max-map-sites limit",
};

pub static MAP_GROWTH_STORMS: Decl = Decl {
    name: "gopulse_map_growth_storms",
    prom_unit: None,
    otel: "gopulse.map.growth.storms",
    otel_unit: "{storm}",
    kind: Counter(Int),
    scope: Process,
    labels: &[SITE],
    help: "Growth storms: episodes of more than --storm-growths map growths at one site \
           within --storm-window-ms; the site is always the real one, even past \
           --max-map-sites",
};

pub static MAP_ENTRIES: Decl = Decl {
    name: "gopulse_map_entries",
    prom_unit: None,
    otel: "gopulse.map.entries",
    otel_unit: "{entry}",
    kind: Gauge(Int),
    scope: Process,
    labels: &[SITE],
    help: "Entries of the largest map seen growing at the site, read from the process when \
           metrics are collected",
};

pub static MAP_CAPACITY: Decl = Decl {
    name: "gopulse_map_capacity_slots",
    prom_unit: None,
    otel: "gopulse.map.capacity",
    otel_unit: "{slot}",
    kind: Gauge(Int),
    scope: Process,
    labels: &[SITE],
    help: "Slots of that map: classic 8<<B; swiss the summed capacity of its tables (8 for \
           a small map)",
};

pub static MAP_LOAD_FACTOR: Decl = Decl {
    name: "gopulse_map_load_factor",
    prom_unit: None,
    otel: "gopulse.map.load_factor",
    otel_unit: "1",
    kind: Gauge(Float),
    scope: Process,
    labels: &[SITE],
    help: "Entries / capacity slots of that map",
};

pub static MAP_OVERFLOW: Decl = Decl {
    name: "gopulse_map_overflow_buckets",
    prom_unit: None,
    otel: "gopulse.map.overflow_buckets",
    otel_unit: "{bucket}",
    kind: Gauge(Int),
    scope: Process,
    labels: &[SITE],
    help: "Overflow buckets of that map (classic maps; Go counts them approximately from \
           B >= 16)",
};

pub static MAP_TABLES: Decl = Decl {
    name: "gopulse_map_tables",
    prom_unit: None,
    otel: "gopulse.map.tables",
    otel_unit: "{table}",
    kind: Gauge(Int),
    scope: Process,
    labels: &[SITE],
    help: "Distinct tables of that map (swiss maps; 0 for a small map)",
};

pub static MAP_LOAD_FACTOR_RATIO: Decl = Decl {
    name: "gopulse_map_load_factor_ratio",
    prom_unit: None,
    otel: "gopulse.map.load_factor.sampled",
    otel_unit: "1",
    kind: Histogram(&LOAD_FACTOR_BUCKETS),
    scope: Process,
    labels: &[],
    help: "Load factor of each map the assignment probes saw, one observation per map per \
           sampling window: oversized, mostly empty maps sit low",
};

pub static PROBE_HITS: Decl = Decl {
    name: "gopulse_probe_hits",
    prom_unit: None,
    otel: "gopulse.probe.hits",
    otel_unit: "{hit}",
    kind: Counter(Int),
    scope: Process,
    labels: &[PROBE],
    help: "Uprobe hits by probe (BPF program)",
};

pub static PROBE_OVERHEAD: Decl = Decl {
    name: "gopulse_probe_overhead",
    prom_unit: Some("seconds"),
    otel: "gopulse.probe.overhead",
    otel_unit: "s",
    kind: Counter(Float),
    scope: Process,
    labels: &[],
    help: "Estimated CPU time the probes cost the process: each probe's hits times its \
           cost per hit (gopulse_probe_hit_cost_seconds)",
};

pub static MAP_ASSIGN_ATTACHED: Decl = Decl {
    name: "gopulse_map_assign_probes_attached",
    prom_unit: None,
    otel: "gopulse.map.assign_probes.attached",
    otel_unit: "1",
    kind: Gauge(Int),
    scope: Process,
    labels: &[],
    help: "1 while the map assignment/deletion probes are attached to the process; when \
           they are sampled or cut by the overhead budget, shapes of maps that never grew \
           are only seen while attached",
};

pub static MAP_GROWTH_ATTACHED: Decl = Decl {
    name: "gopulse_map_growth_probes_attached",
    prom_unit: None,
    otel: "gopulse.map.growth_probes.attached",
    otel_unit: "1",
    kind: Gauge(Int),
    scope: Process,
    labels: &[],
    help: "1 while the map growth probes are attached; 0 while the overhead governor has \
           cut them (the process grew maps so fast for so long that they spent \
           --overhead-budget over --overhead-window), and then growth counts, sites and \
           shapes miss what happens meanwhile",
};

pub static MAP_GROWTH_UNWATCHED: Decl = Decl {
    name: "gopulse_map_growth_unwatched",
    prom_unit: None,
    otel: "gopulse.map.growth.unwatched",
    otel_unit: "1",
    kind: Gauge(Int),
    scope: Process,
    labels: &[GROWTH_KIND],
    help: "1 for each growth kind the probes cannot count in the process's executable: the \
           runtime function that does it was inlined into its callers (profile-guided \
           builds) and no function left sees every growth of the kind, so none is counted \
           (the agent logs why, once per executable); no series when every kind is counted",
};

pub static MAPS_UNTRACKED: Decl = Decl {
    name: "gopulse_map_untracked",
    prom_unit: None,
    otel: "gopulse.map.untracked",
    otel_unit: "{map}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Maps the assignment probes saw but the kernel's map table (64k maps for all \
           processes) evicted before the agent read them",
};

pub static BPF_ANOMALIES: Decl = Decl {
    name: "gopulse_bpf_anomalies",
    prom_unit: None,
    otel: "gopulse.bpf.anomalies",
    otel_unit: "{anomaly}",
    kind: Counter(Int),
    scope: Process,
    labels: &[ANOMALY_KIND],
    help: "What the BPF programs met that should not happen, by kind: read_failed (a read \
           of the process's memory failed), stw_unmatched (the world restarted without a \
           stop the probes saw), map_layout (a map header the runtime cannot have made at \
           the probed point); --bpf-debug also logs each from the kernel",
};

pub static MAP_EVACUATED_BUCKETS: Decl = Decl {
    name: "gopulse_map_evacuated_buckets",
    prom_unit: None,
    otel: "gopulse.map.evacuated_buckets",
    otel_unit: "{bucket}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Old buckets classic maps moved in their incremental growth \
           (runtime.evacuate*), counted while the assignment probes are attached",
};

pub static SLICE_GROWTHS: Decl = Decl {
    name: "gopulse_slice_growths",
    prom_unit: None,
    otel: "gopulse.slice.growths",
    otel_unit: "{growth}",
    kind: Counter(Int),
    scope: Process,
    labels: &[SITE],
    help: "Slice growths (appends past capacity: runtime.growslice) by the Go function that \
           appended (site: the innermost function at the call, past the plumbing); with \
           --slice-probes sampled an estimate from the sampling windows (see \
           gopulse_slice_sample_ratio)",
};

pub static SLICE_COPIED: Decl = Decl {
    name: "gopulse_slice_copied",
    prom_unit: Some("bytes"),
    otel: "gopulse.slice.copied",
    otel_unit: "By",
    kind: Counter(Int),
    scope: Process,
    labels: &[SITE],
    help: "Bytes slice growths copied from the old arrays (old length × element size), by \
           site; estimated as gopulse_slice_growths_total is",
};

pub static SLICE_CAPACITY: Decl = Decl {
    name: "gopulse_slice_capacity",
    prom_unit: Some("bytes"),
    otel: "gopulse.slice.capacity",
    otel_unit: "By",
    kind: Histogram(&SLICE_CAPACITY_BUCKETS),
    scope: Process,
    labels: &[SITE],
    help: "New capacity in bytes of each grown slice (as the runtime sizes it: its growth \
           rule, rounded up to the allocator's size class), by site; estimated as \
           gopulse_slice_growths_total is",
};

pub static SLICE_GROWTH_STORMS: Decl = Decl {
    name: "gopulse_slice_growth_storms",
    prom_unit: None,
    otel: "gopulse.slice.growth.storms",
    otel_unit: "{storm}",
    kind: Counter(Int),
    scope: Process,
    labels: &[SITE],
    help: "Slice growth storms: episodes of more than --slice-storm-growths slice growths at \
           one site within --storm-window-ms (the rate a sampling window measured, in \
           sampled mode)",
};

pub static SLICE_GROWTHS_UNATTRIBUTED: Decl = Decl {
    name: "gopulse_slice_growths_unattributed",
    prom_unit: None,
    otel: "gopulse.slice.growths.unattributed",
    otel_unit: "{growth}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Slice growths counted without a site because the kernel's slice table (16384 \
           sites for all processes) was full",
};

pub static SLICE_SITES_DROPPED: Decl = Decl {
    name: "gopulse_slice_sites_dropped",
    prom_unit: None,
    otel: "gopulse.slice.sites.dropped",
    otel_unit: "{growth}",
    kind: Counter(Int),
    scope: Process,
    labels: &[],
    help: "Slice growths counted under site=\"other\" because the process reached \
           --max-map-sites slice sites",
};

pub static SLICE_PROBES_ATTACHED: Decl = Decl {
    name: "gopulse_slice_probes_attached",
    prom_unit: None,
    otel: "gopulse.slice.probes.attached",
    otel_unit: "1",
    kind: Gauge(Int),
    scope: Process,
    labels: &[],
    help: "1 while the slice growth probe is attached to the process (a sampling window is \
           open, or --slice-probes always)",
};

pub static SLICE_SAMPLE_RATIO: Decl = Decl {
    name: "gopulse_slice_sample_ratio",
    prom_unit: None,
    otel: "gopulse.slice.sample_ratio",
    otel_unit: "1",
    kind: Gauge(Float),
    scope: Process,
    labels: &[],
    help: "The part of the time the slice growth counts were measured, for the last \
           estimate: 1 with --slice-probes always (exact counts), the sampling window over \
           the time since the previous one with sampled (the counts were scaled by its \
           inverse), 0 before the first",
};

pub static PROBE_HIT_COST: Decl = Decl {
    name: "gopulse_probe_hit_cost",
    prom_unit: Some("seconds"),
    otel: "gopulse.probe.hit_cost",
    otel_unit: "s",
    kind: Gauge(Float),
    scope: Node,
    labels: &[PROBE],
    help: "What one hit of each probe costs on this node: the uprobe trap, timed by the \
           agent at start-up, plus the program's mean run time from the kernel's BPF \
           statistics",
};

pub static UPROBES_ATTACHED: Decl = Decl {
    name: "gopulse_uprobes_attached",
    prom_unit: None,
    otel: "gopulse.uprobes.attached",
    otel_unit: "{uprobe}",
    kind: Gauge(Int),
    scope: Node,
    labels: &[],
    help: "Uprobes the agent has attached on this host: one set per executable, shared by \
           every watched process that runs it",
};

pub static EXECUTABLES_PROBED: Decl = Decl {
    name: "gopulse_executables_probed",
    prom_unit: None,
    otel: "gopulse.executables.probed",
    otel_unit: "{executable}",
    kind: Gauge(Int),
    scope: Node,
    labels: &[],
    help: "Executables with probes attached (replicas of one binary count once)",
};

pub static DISCOVERY_EXECS: Decl = Decl {
    name: "gopulse_discovery_execs",
    prom_unit: None,
    otel: "gopulse.discovery.execs",
    otel_unit: "{exec}",
    kind: Counter(Int),
    scope: Node,
    labels: &[],
    help: "Programs started on the host (exec) that discovery looked at",
};

pub static DISCOVERY_SKIPPED: Decl = Decl {
    name: "gopulse_discovery_skipped",
    prom_unit: None,
    otel: "gopulse.discovery.skipped",
    otel_unit: "{process}",
    kind: Counter(Int),
    scope: Node,
    labels: &[SKIP_REASON],
    help: "Processes discovery did not watch, by reason: not_go, unsupported (Go release or \
           architecture), refused (unreadable executable), filtered (--exe-regex), limit \
           (--max-processes reached), gone (exited before it was looked at)",
};

pub static DISCOVERY_EVENTS_LOST: Decl = Decl {
    name: "gopulse_discovery_events_lost",
    prom_unit: None,
    otel: "gopulse.discovery.events.lost",
    otel_unit: "{event}",
    kind: Counter(Int),
    scope: Node,
    labels: &[],
    help: "Exec and exit events the kernel's ring had no room for (each loss triggers a \
           /proc rescan)",
};

pub static DISCOVERY_EXECUTABLES_JUDGED: Decl = Decl {
    name: "gopulse_discovery_executables_judged",
    prom_unit: None,
    otel: "gopulse.discovery.executables.judged",
    otel_unit: "{executable}",
    kind: Counter(Int),
    scope: Node,
    labels: &[],
    help: "Executables read to decide whether they are Go (once per file: device, inode, \
           mtime and size)",
};

pub static PROCESSES_WATCHED: Decl = Decl {
    name: "gopulse_processes_watched",
    prom_unit: None,
    otel: "gopulse.processes.watched",
    otel_unit: "{process}",
    kind: Gauge(Int),
    scope: Node,
    labels: &[],
    help: "Go processes the agent watches now",
};

pub static DISCOVERY_ATTACH_DELAY: Decl = Decl {
    name: "gopulse_discovery_attach_delay",
    prom_unit: Some("seconds"),
    otel: "gopulse.discovery.attach_delay",
    otel_unit: "s",
    kind: Histogram(&ATTACH_DELAY_BUCKETS),
    scope: Node,
    labels: &[],
    help: "From a Go program's exec to its probes attached",
};

pub static DISCOVERY_RESCANS: Decl = Decl {
    name: "gopulse_discovery_rescans",
    prom_unit: None,
    otel: "gopulse.discovery.rescans",
    otel_unit: "{scan}",
    kind: Counter(Int),
    scope: Node,
    labels: &[],
    help: "Scans of /proc (at start-up, every --rescan-interval, and after lost events)",
};

pub static WATCH_FAILURES: Decl = Decl {
    name: "gopulse_watch_failures",
    prom_unit: None,
    otel: "gopulse.watch.failures",
    otel_unit: "{process}",
    kind: Counter(Int),
    scope: Node,
    labels: &[EXE],
    help: "Go processes the agent tried to watch and could not (reading the executable or \
           the process, or attaching the probes failed), by executable; the reason is \
           logged once per executable",
};

pub static OTLP_EXPORTS: Decl = Decl {
    name: "gopulse_otlp_exports",
    prom_unit: None,
    otel: "gopulse.otlp.exports",
    otel_unit: "{export}",
    kind: Counter(Int),
    scope: Node,
    labels: &[RESULT],
    help: "OTLP export requests (one per resource: each watched process, and the agent) by \
           result: ok, or failed (the collector refused, was unreachable or did not answer \
           within OTEL_METRIC_EXPORT_TIMEOUT, after the exporter's retries)",
};

pub static OTLP_POINTS_DROPPED: Decl = Decl {
    name: "gopulse_otlp_points_dropped",
    prom_unit: None,
    otel: "gopulse.otlp.points.dropped",
    otel_unit: "{point}",
    kind: Counter(Int),
    scope: Node,
    labels: &[],
    help: "Histogram observations (pauses, load factors, attach delays, scheduling \
           latencies) OTLP never received: more than 100,000 per series waited between two \
           exports (10,000,000 scheduling latencies), or the export that carried them failed",
};

/// Every metric, in the order `/metrics` lists them.
pub static ALL: [&Decl; 62] = [
    &GO_MEMORY_USED,
    &GO_MEMORY_LIMIT,
    &GO_MEMORY_ALLOCATED,
    &GO_MEMORY_ALLOCATIONS,
    &GO_MEMORY_GC_GOAL,
    &GO_MEMORY_GC_CYCLES,
    &GC_HEAP_LIVE,
    &GO_GOROUTINE_COUNT,
    &GOROUTINE_SYSTEM,
    &GO_PROCESSOR_LIMIT,
    &GO_CONFIG_GOGC,
    &GO_SCHEDULE_DURATION,
    &GO_CPU_TIME,
    &GC_PAUSE,
    &GC_TRIGGERS,
    &GC_FORCED,
    &GC_FORCED_STORMS,
    &GC_MARK_DURATION,
    &GC_ASSIST_CPU,
    &STW_PAUSE,
    &STW_PAUSE_MAX,
    &EVENTS_LOST,
    &PROBES_ATTACHED,
    &MAP_GROWTHS,
    &MAP_GROWTHS_UNATTRIBUTED,
    &MAP_SITES_DROPPED,
    &MAP_GROWTH_STORMS,
    &MAP_ENTRIES,
    &MAP_CAPACITY,
    &MAP_LOAD_FACTOR,
    &MAP_OVERFLOW,
    &MAP_TABLES,
    &MAP_LOAD_FACTOR_RATIO,
    &PROBE_HITS,
    &PROBE_OVERHEAD,
    &MAP_ASSIGN_ATTACHED,
    &MAP_GROWTH_ATTACHED,
    &MAP_GROWTH_UNWATCHED,
    &MAPS_UNTRACKED,
    &MAP_EVACUATED_BUCKETS,
    &BPF_ANOMALIES,
    &SLICE_GROWTHS,
    &SLICE_COPIED,
    &SLICE_CAPACITY,
    &SLICE_GROWTH_STORMS,
    &SLICE_GROWTHS_UNATTRIBUTED,
    &SLICE_SITES_DROPPED,
    &SLICE_PROBES_ATTACHED,
    &SLICE_SAMPLE_RATIO,
    &PROBE_HIT_COST,
    &UPROBES_ATTACHED,
    &EXECUTABLES_PROBED,
    &DISCOVERY_EXECS,
    &DISCOVERY_SKIPPED,
    &DISCOVERY_EVENTS_LOST,
    &DISCOVERY_EXECUTABLES_JUDGED,
    &PROCESSES_WATCHED,
    &DISCOVERY_ATTACH_DELAY,
    &DISCOVERY_RESCANS,
    &WATCH_FAILURES,
    &OTLP_EXPORTS,
    &OTLP_POINTS_DROPPED,
];

/// The position of a metric in [`ALL`]: its id in the model.
pub fn id_of(d: &'static Decl) -> usize {
    ALL.iter()
        .position(|x| std::ptr::eq(*x, d))
        .unwrap_or_else(|| unreachable!("metric {} is not in decl::ALL", d.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut prom: Vec<_> = ALL.iter().map(|d| d.prom_series_name()).collect();
        let mut otel: Vec<_> = ALL.iter().map(|d| d.otel).collect();
        prom.sort();
        otel.sort();
        let n = ALL.len();
        prom.dedup();
        otel.dedup();
        assert_eq!((prom.len(), otel.len()), (n, n));
        for d in ALL {
            assert!(d.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            // Ours are gopulse_/gopulse., the conventions' go_/go.; the GC
            // pause histogram is ours under OpenTelemetry's name (README).
            assert!(
                (d.name.starts_with("gopulse_") && d.otel.starts_with("gopulse."))
                    || (d.name.starts_with("go_") && d.otel.starts_with("go."))
                    || std::ptr::eq(d, &GC_PAUSE),
                "{}",
                d.name
            );
            assert!(!d.help.is_empty() && !d.otel_unit.is_empty());
            if let Kind::Histogram(b) = d.kind {
                assert!(b.windows(2).all(|w| w[0] < w[1]), "{}", d.name);
            }
            if d.prom_unit == Some("seconds") {
                assert_eq!(d.otel_unit, "s", "{}", d.name);
            }
        }
    }

    /// The README's metric table lists exactly the declared metrics, with
    /// their OTLP names, units, types and labels; its attribute table maps
    /// every label.
    #[test]
    fn readme_tables_match_the_declarations() {
        let readme = include_str!("../../../README.md");
        let table: Vec<Vec<String>> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| metric | OTLP name, unit |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                l.replace("\\|", "/")
                    .split('|')
                    .map(|c| c.trim().to_owned())
                    .collect()
            })
            .collect();
        assert_eq!(table.len(), ALL.len(), "README metric rows");
        for d in ALL {
            let name = format!("`{}`", d.prom_series_name());
            let row = table
                .iter()
                .find(|r| r[1] == name)
                .unwrap_or_else(|| panic!("{name} is not in the README's metric table"));
            assert_eq!(row[2], format!("`{}` `{}`", d.otel, d.otel_unit), "{name}");
            assert_eq!(row[3], d.type_name(), "{name}");
            for l in d.labels {
                assert!(
                    row[4].contains(&format!("`{}`", l.prom)),
                    "{name}: {}",
                    l.prom
                );
                let mapped = readme.lines().any(|line| {
                    line.starts_with(&format!("| `{}`", l.prom))
                        && line.ends_with(&format!("| `{}` |", l.otel))
                });
                assert!(mapped, "{} -> {} is not in the README", l.prom, l.otel);
            }
            assert_eq!(d.scope == Scope::Node, row[4].contains("(node)"), "{name}");
        }
    }

    /// The Go runtime conventions' metrics are named on `/metrics` as the
    /// OpenTelemetry Collector's Prometheus translation names them, so
    /// boards built on OBI's or the Collector's Go runtime data work on ours.
    #[test]
    fn semconv_names_translate_to_prometheus() {
        let mut semconv = 0;
        for d in ALL.iter().filter(|d| d.otel.starts_with("go.")) {
            if d.otel == GC_PAUSE.otel {
                continue; // ours, under the name OpenTelemetry's Go instrumentation uses
            }
            semconv += 1;
            assert_eq!(d.name, d.otel.replace('.', "_"), "{}", d.otel);
            let unit = match d.otel_unit {
                "By" => Some("bytes"),
                "s" => Some("seconds"),
                "%" => Some("percent"),
                u if u.starts_with('{') => None,
                u => panic!("{}: unit {u}", d.otel),
            };
            assert_eq!(d.prom_unit, unit, "{}", d.otel);
            assert_eq!(d.scope, Scope::Process);
        }
        assert_eq!(semconv, 11);
        assert_eq!(
            GO_MEMORY_ALLOCATED.prom_series_name(),
            "go_memory_allocated_bytes_total"
        );
        assert_eq!(GO_CONFIG_GOGC.prom_series_name(), "go_config_gogc_percent");
        assert_eq!(GO_GOROUTINE_COUNT.prom_series_name(), "go_goroutine_count");
        assert_eq!(GO_CPU_TIME.prom_series_name(), "go_cpu_time_seconds_total");
    }

    /// Every scheduling latency bound is one of the runtime's bucket
    /// boundaries (`timeHistogram`: 0, 64, 128, 192 ns, then four linear
    /// steps per power of two of nanoseconds up to 2^47).
    #[test]
    fn schedule_buckets_are_runtime_boundaries() {
        let boundary = |ns: u64| {
            (ns < 256 && ns.is_multiple_of(64))
                || (9..=47).any(|l: u32| {
                    (0..4u64).any(|j| ns == (1u64 << (l - 1)) + j * (1u64 << (l - 3)))
                })
        };
        for (ns, s) in SCHED_BUCKETS_NS.iter().zip(SCHED_BUCKETS) {
            assert!(boundary(*ns), "{ns} ns");
            assert!((s * 1e9 - *ns as f64).abs() < 1e-3);
        }
        // Within 10% of each 1-2.5-5 step.
        for (ns, step) in SCHED_BUCKETS_NS.iter().zip(PAUSE_BUCKETS) {
            let r = *ns as f64 / (step * 1e9);
            assert!((0.9..1.1).contains(&r), "{ns} ns for {step} s");
        }
    }

    #[test]
    fn pause_buckets_separate_the_ranges_users_care_about() {
        let b = PAUSE_BUCKETS;
        let between = |lo: f64, hi: f64| b.iter().any(|&x| x >= lo && x < hi);
        assert!(between(10e-6, 50e-6));
        assert!(between(100e-3, 1.0));
        assert!((b[0] - 1e-6).abs() < 1e-12);
        assert_eq!(b[b.len() - 1], 10.0);
    }
}
