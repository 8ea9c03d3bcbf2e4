//! Map growth counts per site, storms, and the shape of each site's largest
//! map.
use std::{collections::BTreeMap, time::Instant};

use gopulse_common::{
    GROW_CLASSIC_DOUBLE, GROW_CLASSIC_SAME_SIZE, GROW_SWISS_GROW, GROW_SWISS_PRUNE,
    GROW_SWISS_SPLIT, GROW_SWISS_TO_TABLE, GrowthCount, GrowthKey, MapKey, MapSeen,
};

use super::{Collector, Proc};
use crate::{
    bpf::Counters,
    inspect::MapOffsets,
    mapshape::{self, Shape},
    metrics::{GrowthLabels, Metrics, ProcAnd},
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
    /// Its shape when it last grew, as the growth probe read it (before it
    /// grew), if known: what is shown for a map that is gone before it was
    /// ever read (a map in a stack frame that has returned).
    pub(super) at_growth: Option<Shape>,
    /// Its shape was read from the process at least once.
    pub(super) read: bool,
}

/// The shape a growth probe recorded (`GrowthCount`), if it knew it.
fn shape_at_growth(impl_classic: bool, v: &GrowthCount) -> Option<Shape> {
    (v.capacity > 0).then(|| Shape {
        entries: v.count,
        capacity: v.capacity,
        overflow: impl_classic.then_some(u64::from(v.extra)),
        tables: (!impl_classic).then_some(u64::from(v.extra)),
    })
}

/// The `kind` label of a kernel growth kind.
fn kind_label(kind: u8) -> Option<&'static str> {
    Some(match kind {
        GROW_CLASSIC_DOUBLE => "double",
        GROW_CLASSIC_SAME_SIZE => "same_size",
        GROW_SWISS_TO_TABLE => "to_table",
        GROW_SWISS_GROW => "grow",
        GROW_SWISS_SPLIT => "split",
        GROW_SWISS_PRUNE => "prune",
        _ => return None,
    })
}

impl Proc {
    /// The Go function a site address (a link-time return address) lies in.
    fn site_name(&self, pid: u32, site: u64) -> String {
        // A return address points after the call; step back into it.
        self.names
            .function_at(pid, site.wrapping_sub(1))
            .unwrap_or_else(|| {
                tracing::debug!(pid, site, "growth site in no function the executable names");
                "unknown".to_owned()
            })
    }

    /// Site label for a new observation, within the per-process bound:
    /// the site itself, or [`OTHER_SITE`] past `max_sites`.
    fn bounded_site(&mut self, site: String, max_sites: usize) -> String {
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

    /// Keeps the largest map seen at a site. One map seen again with fewer
    /// entries (its growths of another kind, read from the kernel in any
    /// order) keeps its largest record.
    fn note_map(&mut self, site: &str, seen: MapRef) {
        self.largest
            .entry(site.to_owned())
            .and_modify(|m| {
                if m.gone || seen.count >= m.count {
                    *m = seen;
                }
            })
            .or_insert(seen);
    }
}

impl Collector {
    /// Reads the kernel's growth table (every process) and folds what is
    /// new into counters, storms and the largest map per site.
    pub(super) fn fold_growths(&mut self, now: Instant) {
        let mut table: Vec<(GrowthKey, GrowthCount)> = Vec::new();
        for key in self.maps.growths.keys().filter_map(Result::ok) {
            // A key can be removed between listing and reading: skip it.
            if let Ok(v) = self.maps.growths.get(&key, 0) {
                table.push((key, v));
            }
        }
        // Per process and site, growths new since the last collection.
        let mut new_at: BTreeMap<(u32, String), u64> = BTreeMap::new();
        for (key, v) in table {
            let Some(p) = self.procs.get_mut(&key.pid) else {
                continue; // removed a moment ago, its keys with it
            };
            let Some(kind) = kind_label(key.kind) else {
                tracing::warn!(kind = key.kind, "unknown growth kind in the kernel table");
                continue;
            };
            let (counted, site) = match p.growth_keys.get(&key) {
                Some((n, site)) => (*n, site.clone()),
                None => (0, p.site_name(key.pid, key.site)),
            };
            let new = v.growths.saturating_sub(counted);
            p.growth_keys.insert(key, (v.growths, site.clone()));
            if new == 0 {
                continue;
            }
            *new_at.entry((key.pid, site.clone())).or_default() += new;
            let fresh = !p.sites.contains(&site);
            let label = p.bounded_site(site, self.max_sites);
            if label == OTHER_SITE {
                self.metrics.map_sites_dropped.inc_by(&p.labels, new);
            } else if fresh {
                // Its storm counter starts at 0, so that the first storm is
                // an increase (alerts use `increase()`).
                self.metrics.map_growth_storms.create(&ProcAnd {
                    proc: &p.labels,
                    value: &label,
                });
            }
            p.note_map(
                &label,
                MapRef {
                    addr: v.map,
                    seed: v.seed,
                    count: v.count,
                    gone: false,
                    at_growth: shape_at_growth(
                        matches!(p.map_offsets, MapOffsets::Classic { .. }),
                        &v,
                    ),
                    read: false,
                },
            );
            self.metrics.map_growths.inc_by(
                &GrowthLabels {
                    proc: &p.labels,
                    site: &label,
                    kind,
                },
                new,
            );
        }
        // Storms are judged at the real site, whatever its label.
        let rule = self.storm_rule;
        for ((pid, site), n) in new_at {
            let Some(p) = self.procs.get_mut(&pid) else {
                continue;
            };
            let Some(growths) = p
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
                window_ms = rule.window.as_millis() as u64,
                "map growth storm: pid {pid} ({}) site {site}: {growths} growths within {:?}",
                p.labels.exe,
                rule.window
            );
            self.metrics.map_growth_storms.inc(&ProcAnd {
                proc: &p.labels,
                value: &site,
            });
        }
        // Sites that saw nothing this time still age their storm windows
        // (so a storm ends, and the next burst is a new one).
        for p in self.procs.values_mut() {
            for s in p.storms.values_mut() {
                let _ = s.record(now, 0, rule);
            }
        }
    }

    /// Takes (reads and removes) what the assignment probes saw since the
    /// last call, by process: one pass over the kernel's table.
    pub(super) fn take_seen(&mut self) -> anyhow::Result<BTreeMap<u32, Vec<(u64, MapSeen)>>> {
        let seen = &mut self.maps.seen;
        let keys: Vec<MapKey> = seen.keys().filter_map(Result::ok).collect();
        let mut out: BTreeMap<u32, Vec<(u64, MapSeen)>> = BTreeMap::new();
        for key in keys {
            // An entry can be evicted between listing and reading: skip it.
            if let Ok(v) = seen.get(&key, 0) {
                out.entry(key.pid).or_default().push((key.map, v));
            }
            let _ = seen.remove(&key);
        }
        Ok(out)
    }
}

/// Folds in what the assignment probes saw of a process's maps: sites, the
/// largest map per site, the load factor of every map, and evictions.
pub(super) fn fold_seen(
    metrics: &Metrics,
    max_sites: usize,
    pid: u32,
    p: &mut Proc,
    stats: &Counters,
    seen: Vec<(u64, MapSeen)>,
) {
    // The counters were read before the table was taken: every map they
    // count as added and that was not taken by now was evicted (a lower
    // bound: maps added since are taken too, before they are counted).
    p.maps_taken += seen.len() as u64;
    let untracked = stats.maps_added.saturating_sub(p.maps_taken);
    if untracked > p.maps_untracked {
        metrics
            .maps_untracked
            .inc_by(&p.labels, untracked - p.maps_untracked);
        p.maps_untracked = untracked;
    }
    for (i, (addr, s)) in seen.into_iter().enumerate() {
        let site = p.site_name(pid, s.site);
        let site = p.bounded_site(site, max_sites);
        p.note_map(
            &site,
            MapRef {
                addr,
                seed: s.seed,
                count: s.count,
                gone: false,
                at_growth: None,
                read: false,
            },
        );
        if i < MAX_SHAPES_PER_COLLECTION
            && let Ok(Some(shape)) = mapshape::read_shape(pid, addr, s.seed, &p.map_offsets)
            && shape.capacity > 0
        {
            metrics
                .map_load_factor_ratio
                .observe(&p.labels, shape.load_factor());
        }
    }
}

/// Sets the shape gauges of a site.
fn publish_shape(metrics: &Metrics, labels: &ProcAnd<'_>, shape: &Shape) {
    metrics.map_entries.set(labels, shape.entries as i64);
    metrics.map_capacity.set(labels, shape.capacity as i64);
    metrics
        .map_load_factor
        .set_float(labels, shape.load_factor());
    if let Some(n) = shape.overflow {
        metrics.map_overflow.set(labels, n as i64);
    }
    if let Some(n) = shape.tables {
        metrics.map_tables.set(labels, n as i64);
    }
}

/// Reads the shape of each site's largest map from the process.
pub(super) fn refresh_shapes(metrics: &Metrics, pid: u32, p: &mut Proc) {
    for (site, map) in &mut p.largest {
        let labels = ProcAnd {
            proc: &p.labels,
            value: site,
        };
        match mapshape::read_shape(pid, map.addr, map.seed, &p.map_offsets) {
            Ok(Some(shape)) => {
                publish_shape(metrics, &labels, &shape);
                map.read = true;
            }
            // Freed (seed no longer there), or a stack frame since
            // overwritten: the last values stay until the site grows a map
            // again. A map gone before it was ever read shows its shape
            // when it grew.
            Ok(None) => {
                if !map.gone
                    && !map.read
                    && let Some(shape) = &map.at_growth
                {
                    publish_shape(metrics, &labels, shape);
                }
                map.gone = true;
            }
            Err(e) => tracing::debug!(pid, site = %site, "reading map shape: {e}"),
        }
    }
}
