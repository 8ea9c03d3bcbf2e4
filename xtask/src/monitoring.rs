//! `cargo xtask codegen monitoring`: the Grafana dashboards in
//! `dashboards/`, generated from the panel lists below, and the
//! PrometheusRule made of the alert rule file. The panel lists and
//! `deploy/prometheus/gopulse-rules.yml` are the sources of truth; a test
//! fails when a committed file differs from what they generate.
//!
//! Every panel's queries must return data against a live Prometheus
//! scraping the agent on the demo workload (`agent/tests/dashboards_alerts.rs`),
//! so no query may depend on a series that only appears on trouble: those
//! end in `or vector(0)`.
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::project::workspace_root;

/// A panel: what it shows and how.
struct Panel {
    title: &'static str,
    description: &'static str,
    kind: Kind,
    unit: &'static str,
    /// (PromQL, legend).
    queries: Vec<(String, &'static str)>,
    /// Width in grid columns (of 24) and height in rows.
    w: u32,
    h: u32,
}

#[derive(Clone, Copy)]
enum Kind {
    Timeseries,
    Stat,
    Table,
    Heatmap,
    /// A row header: the panels after it, up to the next row, are its.
    Row,
}

/// A board: its panels in reading order, laid out left to right.
struct Board {
    uid: &'static str,
    title: &'static str,
    file: &'static str,
    description: &'static str,
    /// Template variables by label, in order (`pid` only per process).
    variables: &'static [&'static str],
    panels: Vec<Panel>,
}

fn panel(
    title: &'static str,
    kind: Kind,
    unit: &'static str,
    w: u32,
    description: &'static str,
    queries: &[(&str, &'static str)],
) -> Panel {
    Panel {
        title,
        description,
        kind,
        unit,
        queries: queries.iter().map(|(q, l)| ((*q).to_owned(), *l)).collect(),
        w,
        h: match kind {
            Kind::Stat => 4,
            Kind::Row => 1,
            _ => 8,
        },
    }
}

/// A row header across the board.
fn row(title: &'static str) -> Panel {
    panel(title, Kind::Row, "none", 24, "", &[])
}

/// The label matchers of the board's variables.
fn selector(vars: &[&str]) -> String {
    vars.iter()
        .map(|v| format!("{v}=~\"${v}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fills `{sel}` in a query with the board's selector (`{x="y", sel}` adds
/// it to matchers of the query's own).
fn with_selector(panels: Vec<Panel>, sel: &str) -> Vec<Panel> {
    panels
        .into_iter()
        .map(|mut p| {
            for q in &mut p.queries {
                q.0 =
                    q.0.replace("{sel}", &format!("{{{sel}}}"))
                        .replace(", sel}", &format!(", {sel}}}"));
            }
            p
        })
        .collect()
}

/// GC CPU over all the CPU the runtime accounts, by the given labels, over
/// `window` (`{sel}` still to fill).
fn gc_cpu_fraction(by: &str, window: &str) -> String {
    format!(
        "sum by ({by}) (rate(go_cpu_time_seconds_total{{go_cpu_state=\"gc\", sel}}[{window}])) \
         / sum by ({by}) (rate(go_cpu_time_seconds_total{{sel}}[{window}]))"
    )
}

fn fleet() -> Board {
    use Kind::*;
    const VARS: &[&str] = &["namespace", "pod", "exe"];
    let panels = vec![
        panel(
            "Processes watched",
            Stat,
            "none",
            4,
            "Go processes the agents watch now",
            &[("sum(gopulse_processes_watched)", "watched")],
        ),
        panel(
            "Executables probed",
            Stat,
            "none",
            4,
            "Executables with probes attached (replicas of a binary count once)",
            &[("sum(gopulse_executables_probed)", "executables")],
        ),
        panel(
            "Growth probes cut",
            Stat,
            "none",
            4,
            "Processes whose map growth probes the overhead governor has cut: their growth counts are incomplete meanwhile",
            &[("sum(1 - gopulse_map_growth_probes_attached{sel})", "cut")],
        ),
        panel(
            "Events lost (range)",
            Stat,
            "none",
            4,
            "Pause events and exec/exit events the kernel's rings had no room for",
            &[(
                "sum(increase(gopulse_events_lost_total{sel}[$__range])) + sum(increase(gopulse_discovery_events_lost_total[$__range]))",
                "lost",
            )],
        ),
        panel(
            "Watch failures (range)",
            Stat,
            "none",
            4,
            "Go processes the agent could not watch",
            &[(
                "sum(increase(gopulse_watch_failures_total[$__range])) or vector(0)",
                "failures",
            )],
        ),
        panel(
            "Probe overhead",
            Stat,
            "percentunit",
            4,
            "CPU the probes cost the watched processes, as a fraction of one CPU (the agent's estimate)",
            &[(
                "sum(rate(gopulse_probe_overhead_seconds_total{sel}[$__rate_interval]))",
                "overhead",
            )],
        ),
        panel(
            "Top processes by GC CPU (range)",
            Table,
            "percentunit",
            8,
            "The share of its CPU (GOMAXPROCS × time) each process's GC took over the range, as the runtime accounts it",
            &[(
                format!(
                    "topk(10, {})",
                    gc_cpu_fraction("namespace, pod, exe, pid", "$__range")
                )
                .as_str(),
                "{{exe}} {{pid}} {{pod}}",
            )],
        ),
        panel(
            "Top processes by live heap / memory limit",
            Table,
            "percentunit",
            8,
            "The heap the last GC cycle kept, over GOMEMLIMIT (processes with a limit): near 1 the GC runs back to back",
            &[(
                "topk(10, max by (namespace, pod, exe, pid) (gopulse_gc_heap_live_bytes{sel}) / max by (namespace, pod, exe, pid) (go_memory_limit_bytes{sel}))",
                "{{exe}} {{pid}} {{pod}}",
            )],
        ),
        panel(
            "Top processes by goroutines",
            Table,
            "none",
            8,
            "Goroutines now (/sched/goroutines: from Go 1.26 on with the runtime's own)",
            &[(
                "topk(10, max by (namespace, pod, exe, pid) (go_goroutine_count{sel}))",
                "{{exe}} {{pid}} {{pod}}",
            )],
        ),
        panel(
            "GC pause p50 / p99 by phase",
            Timeseries,
            "s",
            12,
            "Stop-the-world pauses of GC cycles, from the stop request until the world runs again",
            &[
                (
                    "histogram_quantile(0.5, sum by (le, phase) (rate(gopulse_gc_pause_seconds_bucket{sel}[$__rate_interval])))",
                    "p50 {{phase}}",
                ),
                (
                    "histogram_quantile(0.99, sum by (le, phase) (rate(gopulse_gc_pause_seconds_bucket{sel}[$__rate_interval])))",
                    "p99 {{phase}}",
                ),
            ],
        ),
        panel(
            "Longest stop-the-world pause by reason",
            Timeseries,
            "s",
            12,
            "The longest pause of each stop reason since the agent attached",
            &[(
                "max by (reason) (gopulse_stw_pause_max_seconds{sel})",
                "{{reason}}",
            )],
        ),
        panel(
            "GC cycles per second",
            Timeseries,
            "ops",
            12,
            "Completed GC cycles per second, by process",
            &[(
                "sum by (namespace, pod, exe, pid) (rate(go_memory_gc_cycles_total{sel}[$__rate_interval]))",
                "{{exe}} {{pid}} {{pod}}",
            )],
        ),
        panel(
            "Stop-the-world pauses per second by reason",
            Timeseries,
            "ops",
            12,
            "Every stop-the-world pause, by Go's stop reason",
            &[(
                "sum by (reason) (rate(gopulse_stw_pause_seconds_count{sel}[$__rate_interval]))",
                "{{reason}}",
            )],
        ),
        panel(
            "Map growths per second by process",
            Timeseries,
            "ops",
            12,
            "Map growths of every kind, by process",
            &[(
                "sum by (namespace, pod, exe, pid) (rate(gopulse_map_growths_total{sel}[$__rate_interval]))",
                "{{exe}} {{pid}} {{pod}}",
            )],
        ),
        panel(
            "Slice bytes copied per second by process (top 10)",
            Timeseries,
            "Bps",
            12,
            "Bytes slice growths copied from their old arrays, by process (estimated from sampling windows unless --slice-probes always)",
            &[(
                "topk(10, sum by (namespace, pod, exe, pid) (rate(gopulse_slice_copied_bytes_total{sel}[$__rate_interval])))",
                "{{exe}} {{pid}} {{pod}}",
            )],
        ),
        panel(
            "Slice growths per second by process (top 10)",
            Timeseries,
            "ops",
            12,
            "Appends past capacity (runtime.growslice), by process",
            &[(
                "topk(10, sum by (namespace, pod, exe, pid) (rate(gopulse_slice_growths_total{sel}[$__rate_interval])))",
                "{{exe}} {{pid}} {{pod}}",
            )],
        ),
        panel(
            "Probe overhead by process",
            Timeseries,
            "percentunit",
            12,
            "Estimated CPU the probes cost each process (fraction of one CPU)",
            &[(
                "sum by (namespace, pod, exe, pid) (rate(gopulse_probe_overhead_seconds_total{sel}[$__rate_interval]))",
                "{{exe}} {{pid}} {{pod}}",
            )],
        ),
        panel(
            "Discovery: processes skipped by reason",
            Timeseries,
            "ops",
            12,
            "Processes the agents did not watch, per second, by reason (not_go is every other program started)",
            &[(
                "sum by (reason) (rate(gopulse_discovery_skipped_total[$__rate_interval])) or vector(0)",
                "{{reason}}",
            )],
        ),
        panel(
            "Uprobes attached",
            Timeseries,
            "none",
            12,
            "Uprobes attached per node (one set per executable)",
            &[(
                "sum by (instance) (gopulse_uprobes_attached)",
                "{{instance}}",
            )],
        ),
    ];
    Board {
        uid: "gopulse-fleet",
        title: "gopulse / fleet",
        file: "gopulse-fleet.json",
        description: "Go runtimes seen by gopulse: GC and stop-the-world pauses, map growth, and what watching costs",
        variables: VARS,
        panels: with_selector(panels, &selector(VARS)),
    }
}

fn process() -> Board {
    use Kind::*;
    const VARS: &[&str] = &["namespace", "pod", "exe", "pid"];
    let by = "exe, pid";
    let panels = vec![
        row("Memory and GC (the Go runtime's own numbers, read from the process)"),
        panel(
            "Memory used by the Go runtime",
            Timeseries,
            "bytes",
            12,
            "/memory/classes/total less what is released to the OS, by type: stack (goroutine and OS thread stacks) and other",
            &[(
                "sum by (exe, pid, go_memory_type) (go_memory_used_bytes{sel})",
                "{{exe}} {{pid}} {{go_memory_type}}",
            )],
        ),
        panel(
            "Heap: live, goal and memory limit",
            Timeseries,
            "bytes",
            12,
            "What the last GC cycle kept, where the next one aims to end (from GOGC, or lower under the limit) and GOMEMLIMIT (when set)",
            &[
                (
                    "max by (exe, pid) (gopulse_gc_heap_live_bytes{sel})",
                    "live {{exe}} {{pid}}",
                ),
                (
                    "max by (exe, pid) (go_memory_gc_goal_bytes{sel})",
                    "goal {{exe}} {{pid}}",
                ),
                (
                    "max by (exe, pid) (go_memory_limit_bytes{sel})",
                    "limit {{exe}} {{pid}}",
                ),
            ],
        ),
        panel(
            "GC CPU fraction",
            Timeseries,
            "percentunit",
            12,
            "GC CPU over all the CPU the runtime accounts (GOMAXPROCS × time), as gctrace's %; the runtime updates it at the end of each cycle",
            &[(
                gc_cpu_fraction(by, "$__rate_interval").as_str(),
                "{{exe}} {{pid}}",
            )],
        ),
        panel(
            "GC cycles per second",
            Timeseries,
            "ops",
            12,
            "Completed GC cycles per second (the runtime's own count)",
            &[(
                "sum by (exe, pid) (rate(go_memory_gc_cycles_total{sel}[$__rate_interval]))",
                "{{exe}} {{pid}}",
            )],
        ),
        panel(
            "Goroutines",
            Timeseries,
            "none",
            12,
            "Goroutines now (/sched/goroutines: from Go 1.26 on with the runtime's own)",
            &[(
                "max by (exe, pid) (go_goroutine_count{sel})",
                "{{exe}} {{pid}}",
            )],
        ),
        panel(
            "Scheduling latency p50 / p99",
            Timeseries,
            "s",
            12,
            "How long runnable goroutines waited for a P (the runtime samples one transition in eight)",
            &[
                (
                    "histogram_quantile(0.5, sum by (le, exe, pid) (rate(go_schedule_duration_seconds_bucket{sel}[$__rate_interval])))",
                    "p50 {{exe}} {{pid}}",
                ),
                (
                    "histogram_quantile(0.99, sum by (le, exe, pid) (rate(go_schedule_duration_seconds_bucket{sel}[$__rate_interval])))",
                    "p99 {{exe}} {{pid}}",
                ),
            ],
        ),
        panel(
            "Heap allocation rate",
            Timeseries,
            "Bps",
            12,
            "Bytes allocated on the heap per second",
            &[(
                "sum by (exe, pid) (rate(go_memory_allocated_bytes_total{sel}[$__rate_interval]))",
                "{{exe}} {{pid}}",
            )],
        ),
        panel(
            "GOGC and GOMAXPROCS",
            Timeseries,
            "none",
            12,
            "The GC's target percentage (-1: off) and the Ps that run Go code",
            &[
                (
                    "max by (exe, pid) (go_config_gogc_percent{sel})",
                    "GOGC {{exe}} {{pid}}",
                ),
                (
                    "max by (exe, pid) (go_processor_limit{sel})",
                    "GOMAXPROCS {{exe}} {{pid}}",
                ),
            ],
        ),
        row("Why GC runs"),
        panel(
            "GC cycles per second by trigger",
            Timeseries,
            "ops",
            12,
            "What started each GC cycle: heap (the heap reached its trigger, or the lower goal of the memory limit), time (no cycle for 2 minutes: the periodic GC), forced (runtime.GC, debug.FreeOSMemory)",
            &[(
                "sum by (trigger) (rate(gopulse_gc_triggers_total{sel}[$__rate_interval]))",
                "{{trigger}}",
            )],
        ),
        panel(
            "Forced GCs per second by site",
            Timeseries,
            "ops",
            12,
            "Forced cycles by the Go function that called runtime.GC or debug.FreeOSMemory (the 10 busiest sites); each is a whole cycle its caller waits for",
            &[(
                "topk(10, sum by (site) (rate(gopulse_gc_forced_total{sel}[$__rate_interval])))",
                "{{site}}",
            )],
        ),
        panel(
            "Concurrent mark time p50 / p99",
            Timeseries,
            "s",
            12,
            "Wall time of each cycle's concurrent mark, between its two stop-the-world pauses (the middle clock figure of gctrace)",
            &[
                (
                    "histogram_quantile(0.5, sum by (le, exe, pid) (rate(gopulse_gc_mark_duration_seconds_bucket{sel}[$__rate_interval])))",
                    "p50 {{exe}} {{pid}}",
                ),
                (
                    "histogram_quantile(0.99, sum by (le, exe, pid) (rate(gopulse_gc_mark_duration_seconds_bucket{sel}[$__rate_interval])))",
                    "p99 {{exe}} {{pid}}",
                ),
            ],
        ),
        panel(
            "Mark assist CPU per cycle p50 / p99",
            Timeseries,
            "s",
            12,
            "CPU time goroutines spent marking for the GC when they allocated, per cycle (the assist figure of gctrace's mark CPU): time taken from the program's own work",
            &[
                (
                    "histogram_quantile(0.5, sum by (le, exe, pid) (rate(gopulse_gc_assist_cpu_seconds_bucket{sel}[$__rate_interval])))",
                    "p50 {{exe}} {{pid}}",
                ),
                (
                    "histogram_quantile(0.99, sum by (le, exe, pid) (rate(gopulse_gc_assist_cpu_seconds_bucket{sel}[$__rate_interval])))",
                    "p99 {{exe}} {{pid}}",
                ),
            ],
        ),
        row("Maps and pauses"),
        panel(
            "Map growths per second by site and kind",
            Timeseries,
            "ops",
            24,
            "Growths by the Go function whose map grew: double/same_size (classic maps), to_table/grow/split/prune (swiss tables)",
            &[(
                "sum by (site, kind) (rate(gopulse_map_growths_total{sel}[$__rate_interval]))",
                "{{site}} {{kind}}",
            )],
        ),
        panel(
            "Top growth sites (range)",
            Table,
            "none",
            12,
            "The sites that grew maps most over the dashboard's range",
            &[(
                "topk(10, sum by (site) (increase(gopulse_map_growths_total{sel}[$__range])))",
                "{{site}}",
            )],
        ),
        panel(
            "Growth storms by site (range)",
            Table,
            "none",
            12,
            "Episodes of more than --storm-growths growths at one site within --storm-window-ms",
            &[(
                "sum by (site) (increase(gopulse_map_growth_storms_total{sel}[$__range])) or vector(0)",
                "{{site}}",
            )],
        ),
        panel(
            "Largest map per site: entries",
            Timeseries,
            "none",
            12,
            "Entries of the largest map seen growing at each site",
            &[("max by (site) (gopulse_map_entries{sel})", "{{site}}")],
        ),
        panel(
            "Largest map per site: load factor",
            Timeseries,
            "percentunit",
            12,
            "Entries / capacity slots of that map",
            &[("max by (site) (gopulse_map_load_factor{sel})", "{{site}}")],
        ),
        panel(
            "Largest map per site: capacity (slots)",
            Timeseries,
            "none",
            12,
            "classic: 8 << B; swiss: the summed capacity of its tables",
            &[(
                "max by (site) (gopulse_map_capacity_slots{sel})",
                "{{site}}",
            )],
        ),
        panel(
            "Largest map per site: overflow buckets (classic) / tables (swiss)",
            Timeseries,
            "none",
            12,
            "Overflow buckets of a classic map; distinct tables of a swiss map",
            &[
                (
                    "max by (site) (gopulse_map_overflow_buckets{sel})",
                    "{{site}} overflow buckets",
                ),
                ("max by (site) (gopulse_map_tables{sel})", "{{site}} tables"),
            ],
        ),
        panel(
            "Slice growths per second by site",
            Timeseries,
            "ops",
            12,
            "Appends past capacity (runtime.growslice) by the Go function that appended; estimated from sampling windows unless the sample ratio is 1",
            &[(
                "sum by (site) (rate(gopulse_slice_growths_total{sel}[$__rate_interval]))",
                "{{site}}",
            )],
        ),
        panel(
            "Slice bytes copied per second by site",
            Timeseries,
            "Bps",
            12,
            "Bytes those growths copied from the old arrays (old length × element size)",
            &[(
                "sum by (site) (rate(gopulse_slice_copied_bytes_total{sel}[$__rate_interval]))",
                "{{site}}",
            )],
        ),
        panel(
            "Top slice growth sites by bytes copied (range)",
            Table,
            "bytes",
            12,
            "The sites whose appends copied most over the dashboard's range",
            &[(
                "topk(10, sum by (site) (increase(gopulse_slice_copied_bytes_total{sel}[$__range])))",
                "{{site}}",
            )],
        ),
        panel(
            "Slice growth: p90 new capacity by site, sample ratio",
            Timeseries,
            "bytes",
            12,
            "How big grown slices get (90th percentile of the new capacity in bytes), and the part of the time the probe counted (1: exact)",
            &[
                (
                    "histogram_quantile(0.9, sum by (le, site) (rate(gopulse_slice_capacity_bytes_bucket{sel}[$__rate_interval])))",
                    "p90 {{site}}",
                ),
                (
                    "max by (exe, pid) (gopulse_slice_sample_ratio{sel})",
                    "sample ratio {{exe}} {{pid}}",
                ),
            ],
        ),
        panel(
            "Load factor of every map seen (heatmap)",
            Heatmap,
            "percentunit",
            24,
            "One observation per map the sampled assignment probes saw, per window: oversized, mostly empty maps sit low",
            &[(
                "sum by (le) (increase(gopulse_map_load_factor_ratio_bucket{sel}[$__rate_interval]))",
                "{{le}}",
            )],
        ),
        panel(
            "GC pause p99 by phase",
            Timeseries,
            "s",
            12,
            "The two stop-the-world pauses of each GC cycle",
            &[(
                "histogram_quantile(0.99, sum by (le, phase) (rate(gopulse_gc_pause_seconds_bucket{sel}[$__rate_interval])))",
                "p99 {{phase}}",
            )],
        ),
        panel(
            "Stop-the-world pauses per second by reason",
            Timeseries,
            "ops",
            12,
            "Every stop-the-world pause, by Go's stop reason",
            &[(
                "sum by (reason) (rate(gopulse_stw_pause_seconds_count{sel}[$__rate_interval]))",
                "{{reason}}",
            )],
        ),
        panel(
            "Probe hits per second by probe",
            Timeseries,
            "ops",
            12,
            "Uprobe hits by BPF program",
            &[(
                "sum by (probe) (rate(gopulse_probe_hits_total{sel}[$__rate_interval]))",
                "{{probe}}",
            )],
        ),
        panel(
            "Growth and assignment probes attached",
            Timeseries,
            "none",
            12,
            "1 while attached; growth probes at 0 mean the governor cut them and growth counts miss that time",
            &[
                (
                    "min by (exe, pid) (gopulse_map_growth_probes_attached{sel})",
                    "growth {{exe}} {{pid}}",
                ),
                (
                    "min by (exe, pid) (gopulse_map_assign_probes_attached{sel})",
                    "assignment {{exe}} {{pid}}",
                ),
            ],
        ),
    ];
    Board {
        uid: "gopulse-process",
        title: "gopulse / process",
        file: "gopulse-process.json",
        description: "One Go process (or several): which maps grow, where, how full they are, and its pauses",
        variables: VARS,
        panels: with_selector(panels, &selector(VARS)),
    }
}

fn boards() -> Vec<Board> {
    vec![fleet(), process()]
}

fn datasource() -> Value {
    json!({"type": "prometheus", "uid": "${datasource}"})
}

fn variable(label: &str) -> Value {
    let query = format!("label_values(gopulse_probes_attached, {label})");
    json!({
        "type": "query",
        "name": label,
        "label": label,
        "datasource": datasource(),
        "query": {"query": query, "refId": "var"},
        "definition": query,
        "refresh": 2,
        "includeAll": true,
        "multi": true,
        // Series without the label (outside Kubernetes, or --labels without
        // it) match too.
        "allValue": ".*",
        "current": {"selected": true, "text": ["All"], "value": ["$__all"]},
        "sort": 1
    })
}

fn render_panel(p: &Panel, id: u32, x: u32, y: u32) -> Value {
    let kind = match p.kind {
        Kind::Timeseries => "timeseries",
        Kind::Stat => "stat",
        Kind::Table => "table",
        Kind::Heatmap => "heatmap",
        Kind::Row => {
            return json!({
                "id": id,
                "type": "row",
                "title": p.title,
                "collapsed": false,
                "gridPos": {"h": p.h, "w": p.w, "x": x, "y": y},
                "panels": [],
            });
        }
    };
    let targets: Vec<Value> = p
        .queries
        .iter()
        .zip('A'..)
        .map(|((expr, legend), ref_id)| {
            let mut t = json!({
                "datasource": datasource(),
                "expr": expr,
                "legendFormat": legend,
                "refId": ref_id.to_string(),
            });
            match p.kind {
                Kind::Table => {
                    t["instant"] = json!(true);
                    t["format"] = json!("table");
                }
                Kind::Heatmap => t["format"] = json!("heatmap"),
                _ => {}
            }
            t
        })
        .collect();
    let mut v = json!({
        "id": id,
        "type": kind,
        "title": p.title,
        "description": p.description,
        "datasource": datasource(),
        "gridPos": {"h": p.h, "w": p.w, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
    });
    v["options"] = match p.kind {
        Kind::Timeseries => json!({
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": true,
                       "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"}
        }),
        Kind::Stat => json!({
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": false},
            "colorMode": "value", "graphMode": "area", "textMode": "auto"
        }),
        Kind::Table => {
            json!({"showHeader": true, "sortBy": [{"displayName": "Value", "desc": true}]})
        }
        Kind::Row => json!({}),
        Kind::Heatmap => json!({
            "calculate": false,
            "yAxis": {"unit": p.unit},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "steps": 64}
        }),
    };
    if matches!(p.kind, Kind::Table) {
        v["transformations"] = json!([{
            "id": "organize",
            "options": {"excludeByName": {"Time": true}}
        }]);
    }
    v
}

fn render(b: &Board) -> Value {
    let (mut x, mut y, mut row_h) = (0, 0, 0);
    let mut panels = Vec::new();
    for (i, p) in b.panels.iter().enumerate() {
        if x + p.w > 24 {
            x = 0;
            y += row_h;
            row_h = 0;
        }
        panels.push(render_panel(p, i as u32 + 1, x, y));
        x += p.w;
        row_h = row_h.max(p.h);
    }
    let mut list = vec![json!({
        "type": "datasource",
        "name": "datasource",
        "label": "Prometheus",
        "query": "prometheus",
        "current": {},
        "hide": 0
    })];
    list.extend(b.variables.iter().map(|v| variable(v)));
    json!({
        "uid": b.uid,
        "title": b.title,
        "description": b.description,
        "tags": ["gopulse", "go"],
        "editable": true,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {"list": list},
        "annotations": {"list": []},
        "links": [],
        "panels": panels
    })
}

/// The file's text: pretty JSON and a final newline.
fn text(b: &Board) -> Result<String> {
    Ok(serde_json::to_string_pretty(&render(b))? + "\n")
}

const RULES: &str = "deploy/prometheus/gopulse-rules.yml";
const PROMETHEUS_RULE: &str = "deploy/prometheus/gopulse-prometheusrule.yaml";

/// The rule file's groups as a Prometheus Operator PrometheusRule.
fn prometheus_rule(rules: &str) -> Result<String> {
    let Some(at) = rules.find("\ngroups:\n") else {
        bail!("{RULES} has no top-level `groups:`");
    };
    let mut out = String::from(
        "# Generated from gopulse-rules.yml by `cargo xtask codegen monitoring`: edit that file.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: gopulse\n  namespace: gopulse\n  labels:\n    \
         app.kubernetes.io/name: gopulse\n\
         spec:\n",
    );
    for line in rules[at + 1..].lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Writes the generated files, or with `check_only` fails if one differs.
pub fn generate(check_only: bool) -> Result<()> {
    let root = workspace_root();
    let rules =
        std::fs::read_to_string(root.join(RULES)).with_context(|| format!("reading {RULES}"))?;
    let mut files = vec![(root.join(PROMETHEUS_RULE), prometheus_rule(&rules)?)];
    for b in boards() {
        files.push((root.join("dashboards").join(b.file), text(&b)?));
    }
    let mut stale = Vec::new();
    for (path, want) in files {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have == want {
            continue;
        }
        if check_only {
            stale.push(path.display().to_string());
        } else {
            write(&path, &want)?;
            println!("codegen: wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "{} differ from their sources (xtask/src/monitoring.rs, {RULES}); run `cargo xtask codegen monitoring`",
            stale.join(", ")
        );
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed files are what their sources generate.
    #[test]
    fn committed_dashboards_and_rule_match_their_sources() {
        generate(true).unwrap();
    }

    #[test]
    fn panels_fit_the_grid_and_every_query_uses_the_variables() {
        for b in boards() {
            let v = render(&b);
            let mut ids = std::collections::BTreeSet::new();
            for p in v["panels"].as_array().unwrap() {
                assert!(ids.insert(p["id"].as_u64().unwrap()));
                let g = &p["gridPos"];
                assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24);
                if p["type"] == "row" {
                    assert_eq!(g["x"], 0, "a row starts a line");
                    continue;
                }
                for t in p["targets"].as_array().unwrap() {
                    let expr = t["expr"].as_str().unwrap();
                    assert!(!expr.contains("{sel}"), "{expr}");
                    // Node-wide panels aside, a query follows the variables.
                    let node = [
                        "gopulse_processes_watched",
                        "gopulse_executables_probed",
                        "gopulse_uprobes_attached",
                        "gopulse_discovery_skipped_total",
                        "gopulse_watch_failures_total",
                    ];
                    if !node.iter().any(|n| expr.contains(n)) {
                        assert!(expr.contains("exe=~\"$exe\""), "{}: {expr}", b.title);
                    }
                }
            }
        }
    }
}
