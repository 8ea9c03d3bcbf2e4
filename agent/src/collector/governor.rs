//! What the probes cost each process, and the governor that detaches the
//! costly ones.
use gopulse_common::{
    PROBE_ASSIGN, PROBE_CLASSES, PROBE_DELETE, PROBE_EVACUATE, PROBE_GROWTH, ProcStats,
};

use super::{Collector, Proc};
use crate::{
    bpf::Bpf,
    metrics::{Metrics, ProbeLabels},
};

/// `probe` label values, by `PROBE_*` class.
pub const PROBE_NAMES: [&str; PROBE_CLASSES] = [
    "stw_entry",
    "stw_ret",
    "map_growth",
    "map_assign",
    "map_delete",
    "map_evacuate",
];

/// Estimated cost of one hit per probe class, in seconds, measured on the
/// reference machine (shared/design/uprobe-costs.md, docs/performance.md):
/// entry probes sit on an emulated JBE (~0.85 µs for a counter); RET probes
/// are single-stepped (~5.8 µs); a growth hit costs ~4 µs all told (frame
/// walk, event, the agent's handling), an assignment hit ~1.3 µs (LRU).
pub const PROBE_COST_S: [f64; PROBE_CLASSES] = [0.85e-6, 5.8e-6, 4.0e-6, 1.3e-6, 1.3e-6, 1.0e-6];

/// Assignment and deletion probe hits of a process so far.
fn access_hits(bpf: &mut Bpf, pid: u32) -> u64 {
    bpf.stats(pid)
        .map(|s| s.hits[PROBE_ASSIGN] + s.hits[PROBE_DELETE] + s.hits[PROBE_EVACUATE])
        .unwrap_or(0)
}

impl Collector {
    /// Attaches or detaches the assignment/deletion probes of every process.
    pub fn set_access_probes(&mut self, on: bool) {
        for (&pid, p) in &mut self.procs {
            match (on, p.access.is_some()) {
                (true, false) => match self.bpf.attach_sites(pid, &p.access_sites) {
                    Ok(a) => {
                        p.access = Some(a);
                        p.access_mark =
                            (std::time::Instant::now(), access_hits(&mut self.bpf, pid));
                    }
                    Err(e) => tracing::warn!(pid, "attaching map assignment probes: {e:#}"),
                },
                (false, true) => {
                    if let Some(a) = p.access.take() {
                        self.bpf.detach_links(pid, a);
                    }
                }
                _ => {}
            }
            self.metrics
                .map_assign_attached
                .get_or_create(&p.labels)
                .set(i64::from(p.access.is_some()));
        }
    }

    /// The overhead governor: detaches the assignment probes of a process
    /// whose estimated probe cost since the last check exceeds `budget`
    /// (a fraction of one CPU). Returns the pids cut.
    pub fn govern(&mut self, budget: f64) -> Vec<u32> {
        let mut cut = Vec::new();
        for (&pid, p) in &mut self.procs {
            if p.access.is_none() {
                continue;
            }
            let now = std::time::Instant::now();
            let hits = access_hits(&mut self.bpf, pid);
            let (then, before) = p.access_mark;
            p.access_mark = (now, hits);
            let secs = now.duration_since(then).as_secs_f64();
            if secs <= 0.0 {
                continue;
            }
            let rate = hits.saturating_sub(before) as f64 * PROBE_COST_S[PROBE_ASSIGN] / secs;
            if rate > budget {
                if let Some(a) = p.access.take() {
                    self.bpf.detach_links(pid, a);
                }
                self.metrics
                    .map_assign_attached
                    .get_or_create(&p.labels)
                    .set(0);
                tracing::info!(
                    pid,
                    "map assignment probes cost ~{:.2}% of a CPU, over the {:.2}% budget: \
                     detached until the next window",
                    rate * 100.0,
                    budget * 100.0
                );
                cut.push(pid);
            }
        }
        cut
    }

    /// The governor for growth probes, which are always attached: a process
    /// growing maps so fast that their estimated cost passes `budget` has
    /// them detached for `cooldown`, and the gauge says its growth series
    /// are no longer complete.
    pub fn govern_growth(&mut self, budget: f64, cooldown: std::time::Duration) {
        let now = std::time::Instant::now();
        for (&pid, p) in &mut self.procs {
            let hits = self
                .bpf
                .stats(pid)
                .map(|s| s.hits[PROBE_GROWTH])
                .unwrap_or(0);
            let (then, before) = std::mem::replace(&mut p.growth_mark, (now, hits));
            match (&p.growth, p.growth_cut_until) {
                (Some(_), _) => {
                    let secs = now.duration_since(then).as_secs_f64();
                    let rate = hits.saturating_sub(before) as f64 * PROBE_COST_S[PROBE_GROWTH]
                        / secs.max(1e-3);
                    if rate > budget {
                        if let Some(a) = p.growth.take() {
                            self.bpf.detach_links(pid, a);
                        }
                        p.growth_cut_until = Some(now + cooldown);
                        self.metrics
                            .map_growth_attached
                            .get_or_create(&p.labels)
                            .set(0);
                        tracing::warn!(
                            pid,
                            exe = %p.labels.exe,
                            "map growth probes cost ~{:.2}% of a CPU, over the {:.2}% budget: \
                             detached for {cooldown:?}; growth counts miss that time",
                            rate * 100.0,
                            budget * 100.0
                        );
                    }
                }
                (None, Some(until)) if now >= until => {
                    match self.bpf.attach_sites(pid, &p.growth_sites) {
                        Ok(a) => {
                            p.growth = Some(a);
                            p.growth_cut_until = None;
                            self.metrics
                                .map_growth_attached
                                .get_or_create(&p.labels)
                                .set(1);
                        }
                        Err(e) => tracing::warn!(pid, "re-attaching map growth probes: {e:#}"),
                    }
                }
                _ => {}
            }
        }
    }
}

/// Folds probe hits into the hit counters and the overhead estimate.
pub(super) fn fold_overhead(metrics: &Metrics, p: &Proc, stats: &ProcStats) {
    let evacuated = stats.evacuations.saturating_sub(p.synced.evacuations);
    metrics
        .map_evacuated_buckets
        .get_or_create(&p.labels)
        .inc_by(evacuated);
    let mut overhead = 0.0;
    for (c, probe) in PROBE_NAMES.iter().enumerate() {
        let hits = stats.hits[c].saturating_sub(p.synced.hits[c]);
        overhead += hits as f64 * PROBE_COST_S[c];
        metrics
            .probe_hits
            .get_or_create(&ProbeLabels {
                proc: p.labels.clone(),
                probe,
            })
            .inc_by(hits);
    }
    metrics
        .probe_overhead
        .get_or_create(&p.labels)
        .inc_by(overhead);
}
