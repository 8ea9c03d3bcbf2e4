//! Slice growth per site: counts, bytes copied, new capacities and storms,
//! from the kernel's slice table. With `--slice-probes always` the counts
//! are exact; sampled, the probe counts only within its windows, and each
//! window's counts are scaled to the time since the previous estimate
//! (`span / counted`), carrying fractions over so the integer series track
//! the estimate.
use std::{collections::BTreeMap, time::Instant};

use gopulse_common::{SLICE_BUCKETS, SliceCount, SliceKey};

use super::{Collector, OTHER_SITE, Proc};
use crate::{
    metrics::ProcAnd,
    probes::SliceSample,
    storm::{StormRule, StormTracker},
};

/// What the collector keeps of a process's slice growths.
#[derive(Debug, Default)]
pub(super) struct SliceState {
    /// The kernel's counts per key already folded in, and the key's label.
    keys: BTreeMap<SliceKey, (SliceCount, String)>,
    /// Site labels in use (bounded by `--max-map-sites`).
    sites: std::collections::BTreeSet<String>,
    /// Storm state by real site.
    storms: BTreeMap<String, StormTracker>,
    /// Fractions of an estimate not yet counted, by label.
    carry: BTreeMap<String, Carry>,
    unattributed_carry: f64,
    /// The kernel's unattributed count already folded in.
    unattributed_seen: u64,
}

/// Fractions left over from scaling: bytes copied and growths per bucket.
#[derive(Debug, Default)]
struct Carry {
    copied: f64,
    counts: [f64; SLICE_BUCKETS],
}

/// `n × scale` plus what `carry` held, as a whole number; the fraction
/// stays in `carry`.
fn scaled(n: u64, scale: f64, carry: &mut f64) -> u64 {
    let x = n as f64 * scale + *carry;
    // A hair over, so thirds add up to a whole.
    let whole = (x + 1e-9).floor().max(0.0);
    *carry = (x - whole).max(0.0);
    whole as u64
}

/// New since `then`, field by field.
fn delta(now: &SliceCount, then: &SliceCount) -> SliceCount {
    let mut d = SliceCount {
        copied: now.copied.saturating_sub(then.copied),
        ..SliceCount::default()
    };
    for i in 0..SLICE_BUCKETS {
        d.counts[i] = now.counts[i].saturating_sub(then.counts[i]);
        d.bytes[i] = now.bytes[i].saturating_sub(then.bytes[i]);
    }
    d
}

impl SliceState {
    /// Site label for a new observation, within the per-process bound.
    fn bounded(&mut self, site: String, max_sites: usize) -> String {
        if self.sites.contains(&site) {
            return site;
        }
        if self.sites.len() < max_sites {
            self.sites.insert(site.clone());
            site
        } else {
            OTHER_SITE.to_owned()
        }
    }
}

/// How the collector takes slice growths.
#[derive(Clone, Copy, Debug)]
pub struct SliceRule {
    /// `--slice-probes sampled`: counts come in per window, to be scaled.
    pub sampled: bool,
    pub storm: StormRule,
}

impl Collector {
    /// Reads the kernel's slice table: per process, what is new since the
    /// last call.
    fn new_slices(&mut self) -> BTreeMap<u32, Vec<(SliceKey, SliceCount)>> {
        let mut out: BTreeMap<u32, Vec<(SliceKey, SliceCount)>> = BTreeMap::new();
        for key in self.maps.slices.keys().filter_map(Result::ok) {
            if let Ok(v) = self.maps.slices.get(&key, 0) {
                out.entry(key.pid).or_default().push((key, v));
            }
        }
        out
    }

    /// Folds the slice growths counted so far at their exact counts
    /// (`--slice-probes always`), at each collection.
    pub(super) fn fold_slices_exact(&mut self, now: Instant) {
        if self.slice_rule.sampled {
            return;
        }
        let table = self.new_slices();
        let pids: Vec<u32> = self.procs.keys().copied().collect();
        for pid in pids {
            let rows = table.get(&pid).map(Vec::as_slice).unwrap_or(&[]);
            self.fold_slices_of(pid, rows, 1.0, now, None);
        }
    }

    /// Folds what the sampling window just closed counted, each process's
    /// counts scaled to the span they stand for.
    pub fn fold_slice_samples(&mut self, samples: &[SliceSample]) {
        let now = Instant::now();
        let table = self.new_slices();
        for s in samples {
            let counted = s.counted.as_secs_f64();
            if counted <= 0.0 || !self.procs.contains_key(&s.pid) {
                continue;
            }
            let span = s.span.as_secs_f64().max(counted);
            let rows = table.get(&s.pid).map(Vec::as_slice).unwrap_or(&[]);
            self.fold_slices_of(s.pid, rows, span / counted, now, Some(span));
            if let Some(p) = self.procs.get(&s.pid) {
                self.metrics
                    .slice_sample_ratio
                    .set_float(&p.labels, counted / span);
            }
        }
    }

    /// Folds one process's rows, scaled by `scale`. `span` (sampled): the
    /// seconds the estimate covers, over which storms are judged.
    fn fold_slices_of(
        &mut self,
        pid: u32,
        rows: &[(SliceKey, SliceCount)],
        scale: f64,
        now: Instant,
        span: Option<f64>,
    ) {
        let (metrics, max_sites, rule) = (&self.metrics, self.max_sites, self.slice_rule.storm);
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        // Per real site, new growths (estimated), for storms.
        let mut new_at: BTreeMap<String, u64> = BTreeMap::new();
        for (key, v) in rows {
            let (then, site) = match p.slices.keys.get(key) {
                Some((c, site)) => (*c, site.clone()),
                None => (SliceCount::default(), p.site_name(pid, key.site)),
            };
            let d = delta(v, &then);
            p.slices.keys.insert(*key, (*v, site.clone()));
            if d.counts.iter().all(|&n| n == 0) {
                continue;
            }
            let fresh = !p.slices.sites.contains(&site);
            let label = p.slices.bounded(site.clone(), max_sites);
            let carry = p.slices.carry.entry(label.clone()).or_default();
            let mut counts = [0u64; SLICE_BUCKETS];
            let mut sums = [0f64; SLICE_BUCKETS];
            for i in 0..SLICE_BUCKETS {
                counts[i] = scaled(d.counts[i], scale, &mut carry.counts[i]);
                if d.counts[i] > 0 {
                    // Each estimated growth at the bucket's sampled mean.
                    sums[i] = d.bytes[i] as f64 / d.counts[i] as f64 * counts[i] as f64;
                }
            }
            let copied = scaled(d.copied, scale, &mut carry.copied);
            let growths: u64 = counts.iter().sum();
            *new_at.entry(site).or_default() += growths;
            let labels = ProcAnd {
                proc: &p.labels,
                value: &label,
            };
            if label == OTHER_SITE {
                metrics.slice_sites_dropped.inc_by(&p.labels, growths);
            } else if fresh {
                metrics.slice_growth_storms.create(&labels);
            }
            metrics.slice_growths.inc_by(&labels, growths);
            metrics.slice_copied.inc_by(&labels, copied);
            metrics
                .slice_capacity
                .observe_buckets(&labels, &counts, &sums);
        }
        // Storms at the real site: the rate over the storm window (in a
        // sampled estimate, the window's share of the span it covers).
        for (site, n) in new_at {
            let n = match span {
                Some(span) => (n as f64 * rule.window.as_secs_f64() / span).round() as u64,
                None => n,
            };
            let Some(growths) = p
                .slices
                .storms
                .entry(site.clone())
                .or_default()
                .record(now, n, rule)
            else {
                continue;
            };
            tracing::warn!(
                pid,
                exe = %p.labels.exe,
                site = %site,
                growths,
                "slice growth storm: pid {pid} ({}) site {site}: {growths} growths within {:?}{}",
                p.labels.exe,
                rule.window,
                if span.is_some() { " (estimated)" } else { "" }
            );
            metrics.slice_growth_storms.inc(&ProcAnd {
                proc: &p.labels,
                value: &site,
            });
        }
        if span.is_none() {
            for s in p.slices.storms.values_mut() {
                let _ = s.record(now, 0, rule);
            }
        }
        fold_unattributed(metrics, p, scale);
    }
}

/// Slice growths the kernel's table had no room for.
fn fold_unattributed(metrics: &crate::metrics::Metrics, p: &mut Proc, scale: f64) {
    let now = p.synced.slices_unattributed.max(p.slices.unattributed_seen);
    let new = now - p.slices.unattributed_seen;
    p.slices.unattributed_seen = now;
    let n = scaled(new, scale, &mut p.slices.unattributed_carry);
    if n > 0 {
        metrics.slice_growths_unattributed.inc_by(&p.labels, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_counts_carry_their_fractions() {
        let mut carry = 0.0;
        let total: u64 = (0..30).map(|_| scaled(1, 2.5, &mut carry)).sum();
        assert_eq!(total, 75);
        let mut carry = 0.0;
        assert_eq!(scaled(3, 1.0, &mut carry), 3);
        assert_eq!(carry, 0.0);
        let mut carry = 0.0;
        let parts: Vec<u64> = (0..3).map(|_| scaled(1, 1.0 / 3.0, &mut carry)).collect();
        assert_eq!(parts.iter().sum::<u64>(), 1, "{parts:?}");
    }
}
