//! The demo's compact, human-readable digest of one `/metrics` scrape.
use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    histogram::{self, Histogram},
    openmetrics::Sample,
};

const GC_CYCLES: &str = "go_memory_gc_cycles_total";
const GC_PAUSE: &str = "gopulse_gc_pause_seconds";
const STW_PAUSE: &str = "gopulse_stw_pause_seconds";
const STW_MAX: &str = "gopulse_stw_pause_max_seconds";
const EVENTS_LOST: &str = "gopulse_events_lost_total";
const MAP_GROWTHS: &str = "gopulse_map_growths_total";
const MAP_ENTRIES: &str = "gopulse_map_entries";
const MAP_LOAD: &str = "gopulse_map_load_factor";
const MAP_CAPACITY: &str = "gopulse_map_capacity_slots";
const MAP_OVERFLOW: &str = "gopulse_map_overflow_buckets";
const MAP_TABLES: &str = "gopulse_map_tables";
const MAP_STORMS: &str = "gopulse_map_growth_storms_total";
const GROWTH_ATTACHED: &str = "gopulse_map_growth_probes_attached";
const OVERHEAD: &str = "gopulse_probe_overhead_seconds_total";
/// Map growth sites shown, busiest first.
const TOP_SITES: usize = 5;

pub fn summarize(samples: &[Sample]) -> String {
    let mut out = format!(
        "GC cycles {}, events lost {}\n",
        total(samples, GC_CYCLES),
        total(samples, EVENTS_LOST)
    );
    let max_by_reason = max_by_reason(samples);
    for (phase, h) in histogram::collect(samples, GC_PAUSE, "phase") {
        let gauge = max_by_reason
            .iter()
            .find(|(reason, _)| normalize(reason).ends_with(&normalize(&phase)))
            .map(|(_, &max)| max);
        let [p50, p99, max] = stats(&h, gauge);
        let _ = writeln!(
            out,
            "  GC pause  {phase:<24} n={:<6} p50 {p50:>8}  p99 {p99:>8}  max {max:>8}",
            observations(&h),
        );
    }
    for (reason, h) in histogram::collect(samples, STW_PAUSE, "reason") {
        let [_, p99, max] = stats(&h, max_by_reason.get(&reason).copied());
        let _ = writeln!(
            out,
            "  STW pause {reason:<24} n={:<6}               p99 {p99:>8}  max {max:>8}",
            observations(&h),
        );
    }
    write_map_sites(samples, &mut out);
    write_probes(samples, &mut out);
    out
}

/// Whether the growth probes are attached (or cut by the budget, when
/// growth counts are incomplete), and what the probes have cost.
fn write_probes(samples: &[Sample], out: &mut String) {
    let attached: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == GROWTH_ATTACHED)
        .map(|s| s.value)
        .collect();
    if attached.is_empty() {
        return;
    }
    let state = if attached.iter().all(|&v| v == 1.0) {
        "attached"
    } else {
        "CUT by the overhead budget (growth counts incomplete)"
    };
    let _ = writeln!(
        out,
        "  probes    growth {state}; cost so far {} of CPU",
        human(total(samples, OVERHEAD))
    );
}

/// The busiest map growth sites: growths by kind, the largest map's shape
/// (entries, slots, load factor, overflow buckets or tables), storms.
fn write_map_sites(samples: &[Sample], out: &mut String) {
    let mut sites: BTreeMap<&str, (f64, BTreeMap<&str, f64>)> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == MAP_GROWTHS) {
        let (Some(site), Some(kind)) = (s.label("site"), s.label("kind")) else {
            continue;
        };
        let e = sites.entry(site).or_default();
        e.0 += s.value;
        *e.1.entry(kind).or_default() += s.value;
    }
    let mut by_growths: Vec<_> = sites.into_iter().collect();
    by_growths.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    let gauge = |name: &str, site: &str| {
        samples
            .iter()
            .find(|s| s.name == name && s.label("site") == Some(site))
            .map(|s| s.value)
    };
    for (site, (n, kinds)) in by_growths.into_iter().take(TOP_SITES) {
        let kinds: Vec<String> = kinds.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = write!(
            out,
            "  maps      {site:<32} growths {n} ({})",
            kinds.join(", ")
        );
        if let (Some(entries), Some(capacity), Some(load)) = (
            gauge(MAP_ENTRIES, site),
            gauge(MAP_CAPACITY, site),
            gauge(MAP_LOAD, site),
        ) {
            let _ = write!(
                out,
                ", largest {entries} entries in {capacity} slots (load {load:.2}"
            );
            if let Some(n) = gauge(MAP_OVERFLOW, site) {
                let _ = write!(out, ", {n} overflow buckets");
            }
            if let Some(n) = gauge(MAP_TABLES, site) {
                let _ = write!(out, ", {n} tables");
            }
            out.push(')');
        }
        if let Some(storms) = gauge(MAP_STORMS, site).filter(|&s| s > 0.0) {
            let _ = write!(out, ", {storms} storms");
        }
        out.push('\n');
    }
}

/// p50, p99 and max of a histogram, given the agent's max gauge if any.
fn stats(h: &Histogram, gauge: Option<f64>) -> [String; 3] {
    // The gauge is per single stop while a mark_termination phase pause may
    // include an abandoned stop: trust it only if the buckets agree.
    let lowest_possible = h.max_bucket().map_or(0.0, |b| b.0);
    let exact_max = gauge.filter(|&max| max >= lowest_possible);
    // Interpolation can overshoot the real maximum; no quantile exceeds it.
    let quantile = |q| {
        h.quantile(q)
            .map(|v| exact_max.map_or(v, |max| v.min(max)))
            .map_or_else(|| "-".to_string(), human)
    };
    let max = exact_max.map_or_else(|| max_from_buckets(h), human);
    [quantile(0.5), quantile(0.99), max]
}

/// Sum of a counter over all series (all watched processes).
fn total(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        // fold from +0.0: an empty `sum()` of floats is -0.0.
        .fold(0.0, |acc, s| acc + s.value)
}

fn max_by_reason(samples: &[Sample]) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == STW_MAX) {
        let reason = s.label("reason").unwrap_or_default().to_string();
        let max = out.entry(reason).or_insert(s.value);
        *max = max.max(s.value);
    }
    out
}

/// Reason labels ("gc_mark_termination", or Go's "GC mark termination") and phase
/// names compare as lowercase words joined by `_`.
fn normalize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn observations(h: &Histogram) -> f64 {
    let in_buckets = h.buckets.last().map_or(0.0, |b| b.1);
    h.count.max(in_buckets)
}

fn max_from_buckets(h: &Histogram) -> String {
    match h.max_bucket() {
        None => "-".to_string(),
        Some((_, max)) if max.is_finite() => format!("≤{}", human(max)),
        Some(_) => match h.largest_finite_bound() {
            Some(bound) => format!(">{}", human(bound)),
            None => "-".to_string(),
        },
    }
}

/// Seconds as µs, ms or s with about three significant digits.
pub fn human(secs: f64) -> String {
    if !secs.is_finite() {
        return secs.to_string();
    }
    let (value, unit) = if secs.abs() < 1e-3 {
        (secs * 1e6, "µs")
    } else if secs.abs() < 1.0 {
        (secs * 1e3, "ms")
    } else {
        (secs, "s")
    };
    let decimals = match value.abs() {
        v if v < 10.0 => 2,
        v if v < 100.0 => 1,
        _ => 0,
    };
    format!("{value:.decimals$}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openmetrics::parse;

    #[test]
    fn human_durations() {
        assert_eq!(human(0.0000015), "1.50µs");
        assert_eq!(human(0.000042), "42.0µs");
        assert_eq!(human(0.000420), "420µs");
        assert_eq!(human(0.0123), "12.3ms");
        assert_eq!(human(2.5), "2.50s");
        assert_eq!(human(0.0), "0.00µs");
    }

    const SCRAPE: &str = r#"
go_memory_gc_cycles_total{pid="7",exe="/d",go_version="go1.27.3"} 12
gopulse_events_lost_total{pid="7",exe="/d",go_version="go1.27.3"} 0
gopulse_gc_pause_seconds_bucket{pid="7",phase="mark_termination",le="0.0001"} 6
gopulse_gc_pause_seconds_bucket{pid="7",phase="mark_termination",le="0.00025"} 12
gopulse_gc_pause_seconds_bucket{pid="7",phase="mark_termination",le="+Inf"} 12
gopulse_gc_pause_seconds_count{pid="7",phase="mark_termination"} 12
gopulse_gc_pause_seconds_bucket{pid="7",phase="sweep_termination",le="0.00001"} 11
gopulse_gc_pause_seconds_bucket{pid="7",phase="sweep_termination",le="0.000025"} 12
gopulse_gc_pause_seconds_bucket{pid="7",phase="sweep_termination",le="+Inf"} 12
gopulse_gc_pause_seconds_count{pid="7",phase="sweep_termination"} 12
gopulse_stw_pause_seconds_bucket{pid="7",reason="gc_mark_termination",le="0.0001"} 6
gopulse_stw_pause_seconds_bucket{pid="7",reason="gc_mark_termination",le="0.00025"} 12
gopulse_stw_pause_seconds_bucket{pid="7",reason="gc_mark_termination",le="+Inf"} 12
gopulse_stw_pause_seconds_count{pid="7",reason="gc_mark_termination"} 12
gopulse_stw_pause_max_seconds{pid="7",reason="gc_mark_termination"} 0.000201
gopulse_stw_pause_max_seconds{pid="7",reason="gc_sweep_termination"} 0.0000009
"#;

    /// The word after `key` on `line`.
    fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == key)?;
        words.next()
    }

    #[test]
    fn summarizes_a_scrape() {
        let text = summarize(&parse(SCRAPE).unwrap());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], "GC cycles 12, events lost 0");
        // Sorted by phase; mark termination's max comes from the gauge.
        assert!(lines[1].contains("mark_termination"), "{text}");
        assert_eq!(after(lines[1], "p50"), Some("100µs"), "{text}");
        // Interpolation says 247µs; the gauge caps it.
        assert_eq!(after(lines[1], "p99"), Some("201µs"), "{text}");
        assert_eq!(after(lines[1], "max"), Some("201µs"), "{text}");
        // The sweep termination gauge is below the highest bucket (stale or
        // another stop): the bucket bounds the max instead.
        assert!(lines[2].contains("sweep_termination"), "{text}");
        assert_eq!(after(lines[2], "max"), Some("≤25.0µs"), "{text}");
        assert!(lines[3].contains("STW pause gc_mark_termination"), "{text}");
        assert!(lines[3].contains("n=12"), "{text}");
        assert_eq!(after(lines[3], "max"), Some("201µs"), "{text}");
    }

    #[test]
    fn probes_line() {
        let parse = |text: &str| crate::openmetrics::parse(text).unwrap();
        let on = parse(
            "gopulse_map_growth_probes_attached{pid=\"1\"} 1\n\
             gopulse_probe_overhead_seconds_total{pid=\"1\"} 0.0025\n",
        );
        assert!(summarize(&on).contains("growth attached; cost so far 2.50ms of CPU"));
        let cut = parse("gopulse_map_growth_probes_attached{pid=\"1\"} 0\n");
        assert!(summarize(&cut).contains("CUT by the overhead budget"));
    }

    #[test]
    fn empty_scrape() {
        assert_eq!(summarize(&[]), "GC cycles 0, events lost 0\n");
    }
}
