//! Map growth events, sites, and the shape of each site's largest map.
use gopulse_common::{
    GROW_CLASSIC, GROW_SWISS_GROW, GROW_SWISS_PRUNE, GROW_SWISS_SMALL, GROW_SWISS_SPLIT,
    GROW_SWISS_TO_TABLE, GrowthEvent, MapSeen, ProcStats,
};

use super::{Collector, Proc};
use crate::{
    mapshape,
    metrics::{GrowthLabels, Metrics, SiteLabels},
};

/// Site label for growths past the per-process site limit.
pub const OTHER_SITE: &str = "other";

/// Maps whose shape is read per process per collection for the load factor
/// histogram.
const MAX_SHAPES_PER_COLLECTION: usize = 2048;

/// A map known by its address and seed, with its size when it last grew.
#[derive(Clone, Copy, Debug)]
pub(super) struct MapRef {
    pub(super) addr: u64,
    pub(super) seed: u64,
    pub(super) count: u64,
    /// Its memory no longer holds it: any map growing at the site replaces it.
    pub(super) gone: bool,
}

impl Proc {
    /// The first Go function outside the runtime among the return addresses.
    fn site(&self, pcs: &[u64]) -> String {
        let mut innermost = None;
        for &pc in pcs {
            // A return address points after the call; step back into it.
            let Some(name) = self
                .symbolizer
                .function_at(pc.wrapping_sub(self.load_bias).wrapping_sub(1))
            else {
                continue;
            };
            innermost.get_or_insert(name);
            if !name.starts_with("runtime.") && !name.starts_with("internal/runtime/") {
                return name.to_owned();
            }
        }
        // Growth inside the runtime itself, or a stack we could not walk.
        innermost.unwrap_or("unknown").to_owned()
    }

    /// Site label for a new observation, within the per-process bound.
    fn bounded_site(&mut self, site: String, max_sites: usize, m: &Metrics) -> String {
        if self.sites.contains(&site) {
            return site;
        }
        if self.sites.len() < max_sites {
            self.sites.insert(site.clone());
            site
        } else {
            m.map_sites_dropped.get_or_create(&self.labels).inc();
            OTHER_SITE.to_owned()
        }
    }

    /// Keeps the largest map seen at a site.
    fn note_map(&mut self, site: &str, seen: MapRef) {
        self.largest
            .entry(site.to_owned())
            .and_modify(|m| {
                let same = m.addr == seen.addr && m.seed == seen.seed;
                if same || m.gone || seen.count >= m.count {
                    *m = seen;
                }
            })
            .or_insert(seen);
    }

    /// Classic `overLoadFactor(count, B)`.
    fn over_load_factor(&self, count: u64, b: u8) -> bool {
        let buckets = 1u64.checked_shl(u32::from(b)).unwrap_or(u64::MAX);
        count > 8 && count > self.load_factor_num.saturating_mul(buckets / 2)
    }
}

impl Collector {
    pub(super) fn on_growth(&mut self, ev: GrowthEvent) {
        let Some(p) = self.procs.get_mut(&ev.pid) else {
            return;
        };
        let kind = match ev.kind {
            // hashGrow doubles unless the map is under its load factor (then
            // it grew for too many overflow buckets): the runtime's own test.
            GROW_CLASSIC if p.over_load_factor(ev.count.saturating_add(1), ev.b_or_depth) => {
                "double"
            }
            GROW_CLASSIC => "same_size",
            GROW_SWISS_SMALL => "small",
            GROW_SWISS_TO_TABLE => "to_table",
            GROW_SWISS_GROW => "grow",
            GROW_SWISS_SPLIT => "split",
            GROW_SWISS_PRUNE => "prune",
            other => {
                tracing::warn!(kind = other, "unknown growth kind");
                return;
            }
        };
        let frames = usize::from(ev.nframes).min(ev.pcs.len());
        let site = p.site(&ev.pcs[..frames]);
        let site = p.bounded_site(site, self.max_sites, &self.metrics);
        p.growth_series.insert((site.clone(), kind));
        p.note_map(
            &site,
            MapRef {
                addr: ev.map,
                seed: ev.seed,
                count: ev.count,
                gone: false,
            },
        );
        let storm = p
            .storms
            .entry(site.clone())
            .or_default()
            .record(std::time::Instant::now(), self.storm_rule);
        if let Some(growths) = storm {
            let rule = self.storm_rule;
            tracing::warn!(
                pid = ev.pid,
                exe = %p.labels.exe,
                site = %site,
                growths,
                window_ms = rule.window.as_millis() as u64,
                "map growth storm: pid {} ({}) site {site}: {growths} growths within {:?}",
                ev.pid,
                p.labels.exe,
                rule.window
            );
            self.metrics
                .map_growth_storms
                .get_or_create(&SiteLabels {
                    proc: p.labels.clone(),
                    site: site.clone(),
                })
                .inc();
        }
        self.metrics
            .map_growths
            .get_or_create(&GrowthLabels {
                proc: p.labels.clone(),
                site,
                kind,
            })
            .inc();
    }
}

/// Folds in what the assignment probes saw of a process's maps: sites, the
/// largest map per site, the load factor of every map, and evictions.
pub(super) fn fold_seen(
    metrics: &Metrics,
    max_sites: usize,
    pid: u32,
    p: &mut Proc,
    stats: &ProcStats,
    seen: Vec<(u64, MapSeen)>,
) {
    // Every map added and not taken was evicted, up to the few added since
    // the counters were read.
    p.maps_taken += seen.len() as u64;
    let untracked = stats.maps_added.saturating_sub(p.maps_taken);
    if untracked > p.maps_untracked {
        metrics
            .maps_untracked
            .get_or_create(&p.labels)
            .inc_by(untracked - p.maps_untracked);
        p.maps_untracked = untracked;
    }
    for (i, (addr, s)) in seen.into_iter().enumerate() {
        let site = p.site(&[s.pc]);
        let site = p.bounded_site(site, max_sites, metrics);
        p.note_map(
            &site,
            MapRef {
                addr,
                seed: s.seed,
                count: s.count,
                gone: false,
            },
        );
        if i < MAX_SHAPES_PER_COLLECTION
            && let Ok(Some(shape)) = mapshape::read_shape(pid, addr, s.seed, &p.map_offsets)
            && shape.capacity > 0
        {
            metrics
                .map_load_factor_ratio
                .get_or_create(&p.labels)
                .observe(shape.load_factor());
        }
    }
}

/// Reads the shape of each site's largest map from the process.
pub(super) fn refresh_shapes(metrics: &Metrics, pid: u32, p: &mut Proc) {
    for (site, map) in &mut p.largest {
        let labels = SiteLabels {
            proc: p.labels.clone(),
            site: site.clone(),
        };
        match mapshape::read_shape(pid, map.addr, map.seed, &p.map_offsets) {
            Ok(Some(shape)) => {
                let m = metrics;
                m.map_entries
                    .get_or_create(&labels)
                    .set(shape.entries as i64);
                m.map_capacity
                    .get_or_create(&labels)
                    .set(shape.capacity as i64);
                m.map_load_factor
                    .get_or_create(&labels)
                    .set(shape.load_factor());
                if let Some(n) = shape.overflow {
                    m.map_overflow.get_or_create(&labels).set(n as i64);
                }
                if let Some(n) = shape.tables {
                    m.map_tables.get_or_create(&labels).set(n as i64);
                }
            }
            // Freed (seed no longer there): the last values stay
            // until the site grows a map again.
            Ok(None) => map.gone = true,
            Err(e) => tracing::debug!(pid, site = %site, "reading map shape: {e}"),
        }
    }
}
