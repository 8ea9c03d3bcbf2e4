//! Turns kernel events and counters into metrics, per watched process:
//! GC and stop-the-world pauses (`gc`), map growth, sites and shapes
//! (`maps`), and what the probes cost and when they are cut (`governor`).
mod gc;
mod governor;
mod maps;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use gopulse_common::{GrowthEvent, ProcStats};

pub use governor::{PROBE_COST_S, PROBE_NAMES};
use maps::MapRef;
pub use maps::OTHER_SITE;

use crate::{
    bpf::{self, Attachment, Bpf, ProbeSite},
    inspect::{self, MapOffsets, Symbolizer},
    metrics::{Metrics, PHASE_MARK, PHASE_SWEEP, PhaseLabels, ProcLabels},
    procfs,
    storm::{StormRule, StormTracker},
    stw::{self, Reason},
};

/// A process whose probes are attached.
struct Proc {
    labels: ProcLabels,
    reasons: &'static [Reason],
    /// Reason labels with series, to remove them when the process goes.
    seen_reasons: BTreeSet<String>,
    /// Time of abandoned mark-termination stops, added to the cycle's pause.
    mark_carry_ns: u64,
    /// Kernel counters already folded into the metrics.
    synced: ProcStats,
    attachment: Attachment,
    start_time: u64,
    /// PC → Go function, for growth sites.
    symbolizer: Symbolizer,
    /// Runtime address minus link-time address (PIE load bias).
    load_bias: u64,
    /// Classic maps' loadFactorNum (loadFactorDen is 2): 12 on Go 1.21, 13 after.
    load_factor_num: u64,
    /// (site, kind) pairs with series, to remove them with the process.
    growth_series: BTreeSet<(String, &'static str)>,
    sites: BTreeSet<String>,
    storms: BTreeMap<String, StormTracker>,
    /// The largest map seen growing at each site.
    largest: BTreeMap<String, MapRef>,
    map_offsets: MapOffsets,
    /// Assignment/deletion probes: where they go, and their links while
    /// attached.
    access_sites: Vec<ProbeSite>,
    access: Option<Attachment>,
    /// Assignment+deletion hits at the last governor check, and when.
    access_mark: (std::time::Instant, u64),
    /// Growth probes: sites, links while attached, hits at the last
    /// governor check, and until when the governor has cut them.
    growth_sites: Vec<ProbeSite>,
    growth: Option<Attachment>,
    growth_mark: (std::time::Instant, u64),
    growth_cut_until: Option<std::time::Instant>,
    /// Maps taken from the kernel LRU so far, and evictions reported.
    maps_taken: u64,
    maps_untracked: u64,
}

pub struct Collector {
    bpf: Bpf,
    ring: RingBuf<MapData>,
    growth_ring: RingBuf<MapData>,
    metrics: Metrics,
    procs: BTreeMap<u32, Proc>,
    requested: BTreeSet<u32>,
    max_sites: usize,
    storm_rule: StormRule,
}

impl Collector {
    pub fn new(
        bpf: Bpf,
        ring: RingBuf<MapData>,
        growth_ring: RingBuf<MapData>,
        metrics: Metrics,
        max_sites: usize,
        storm_rule: StormRule,
    ) -> Self {
        Self {
            bpf,
            ring,
            growth_ring,
            metrics,
            procs: BTreeMap::new(),
            requested: BTreeSet::new(),
            max_sites,
            storm_rule,
        }
    }

    /// The ring buffers, for readiness polling.
    pub fn rings(&self) -> [&RingBuf<MapData>; 2] {
        [&self.ring, &self.growth_ring]
    }

    /// Starts watching `pid`. The error says why it cannot be watched.
    pub fn add_process(&mut self, pid: u32) -> anyhow::Result<usize> {
        self.requested.insert(pid);
        if self.procs.contains_key(&pid) {
            return Ok(self.procs[&pid].attachment.probe_count());
        }
        let start_time =
            procfs::start_time(pid).map_err(|e| anyhow::anyhow!(procfs::describe(&e)))?;
        let exe = procfs::exe_name(pid).map_err(|e| anyhow::anyhow!(procfs::describe(&e)))?;
        let bin = inspect::inspect(&procfs::exe_path(pid), &bpf::wanted_functions())
            .with_context(|| exe.clone())?;
        let load_bias = procfs::exe_mapping_start(pid)
            .map_err(|e| anyhow::anyhow!(procfs::describe(&e)))?
            .wrapping_sub(bin.image_base);
        let (sites, config) =
            bpf::plan(&bin, load_bias).with_context(|| format!("{exe} ({})", bin.version))?;
        let access_sites = bpf::plan_access(&bin)?;
        let (growth_sites, core_sites): (Vec<_>, Vec<_>) =
            sites.into_iter().partition(bpf::is_growth);
        let attachment = self.bpf.attach(pid, &core_sites, config)?;
        let growth = match self.bpf.attach_sites(pid, &growth_sites) {
            Ok(g) => g,
            Err(e) => {
                self.bpf.detach(pid, attachment);
                return Err(e);
            }
        };
        let labels = ProcLabels {
            pid: pid.to_string(),
            exe,
            go_version: bin.version.short(),
        };
        let probes = attachment.probe_count() + growth.probe_count();
        // Create the series now, so they read 0 rather than being absent.
        let _ = self.metrics.gc_cycles.get_or_create(&labels);
        let _ = self.metrics.events_lost.get_or_create(&labels);
        let _ = self.metrics.map_sites_dropped.get_or_create(&labels);
        let _ = self.metrics.maps_untracked.get_or_create(&labels);
        self.metrics
            .map_growth_attached
            .get_or_create(&labels)
            .set(1);
        self.metrics
            .map_assign_attached
            .get_or_create(&labels)
            .set(0);
        self.metrics
            .probes_attached
            .get_or_create(&labels)
            .set(probes as i64);
        for phase in [PHASE_SWEEP, PHASE_MARK] {
            let _ = self.metrics.gc_pause.get_or_create(&PhaseLabels {
                proc: labels.clone(),
                phase,
            });
        }
        tracing::info!(
            pid,
            exe = %labels.exe,
            go_version = %bin.version,
            build_mode = bin.build.settings.get("-buildmode").map_or("exe", String::as_str),
            cgo = bin.build.settings.get("CGO_ENABLED").map_or("?", String::as_str),
            pie = bin.pie,
            stripped = bin.stripped,
            maps = ?bin.map_impl,
            probes,
            "watching process"
        );
        self.procs.insert(
            pid,
            Proc {
                labels,
                reasons: stw::table_for(&bin.version),
                seen_reasons: BTreeSet::new(),
                mark_carry_ns: 0,
                synced: ProcStats::default(),
                attachment,
                start_time,
                load_factor_num: if bin.version.at_least(22) { 13 } else { 12 },
                symbolizer: bin.symbolizer,
                load_bias,
                growth_series: BTreeSet::new(),
                sites: BTreeSet::new(),
                storms: BTreeMap::new(),
                largest: BTreeMap::new(),
                map_offsets: bin.offsets.map,
                access_sites,
                access: None,
                access_mark: (std::time::Instant::now(), 0),
                growth_sites,
                growth: Some(growth),
                growth_mark: (std::time::Instant::now(), 0),
                growth_cut_until: None,
                maps_taken: 0,
                maps_untracked: 0,
            },
        );
        Ok(probes)
    }

    /// Every requested process has all its probes attached.
    pub fn ready(&self) -> bool {
        self.requested
            .iter()
            .all(|pid| self.procs.contains_key(pid))
    }

    /// Reads every pending event from the ring buffers.
    pub fn drain(&mut self) {
        self.drain_stw();
        let mut growths = Vec::new();
        while let Some(item) = self.growth_ring.next() {
            if item.len() < size_of::<GrowthEvent>() {
                tracing::warn!(len = item.len(), "short growth event in the ring buffer");
                continue;
            }
            // SAFETY: a whole GrowthEvent (checked length), read unaligned.
            growths.push(unsafe { item.as_ptr().cast::<GrowthEvent>().read_unaligned() });
        }
        for ev in growths {
            self.on_growth(ev);
        }
    }

    /// Folds the kernel counters, and what the assignment probes saw,
    /// into the metrics.
    pub fn sync(&mut self) {
        // One pass over the kernel's map table for every process.
        let mut seen = match self.bpf.take_seen() {
            Ok(seen) => seen,
            Err(e) => {
                tracing::debug!("reading assignment probe state: {e}");
                BTreeMap::new()
            }
        };
        for (&pid, p) in &mut self.procs {
            let stats = match self.bpf.stats(pid) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(pid, "reading kernel counters: {e}");
                    continue;
                }
            };
            let taken = seen.remove(&pid).unwrap_or_default();
            maps::fold_seen(&self.metrics, self.max_sites, pid, p, &stats, taken);
            governor::fold_overhead(&self.metrics, p, &stats);
            let cycles = stats.gc_cycles.saturating_sub(p.synced.gc_cycles);
            self.metrics
                .gc_cycles
                .get_or_create(&p.labels)
                .inc_by(cycles);
            let lost = stats.events_lost.saturating_sub(p.synced.events_lost);
            self.metrics
                .events_lost
                .get_or_create(&p.labels)
                .inc_by(lost);
            maps::refresh_shapes(&self.metrics, pid, p);
            if stats.stw_unmatched > p.synced.stw_unmatched {
                tracing::debug!(
                    pid,
                    count = stats.stw_unmatched,
                    "start-the-world without a seen stop"
                );
            }
            p.synced = stats;
        }
    }

    /// Stops watching processes that exited (or whose pid was reused).
    pub fn reap(&mut self) {
        let gone: Vec<u32> = self
            .procs
            .iter()
            .filter(|(pid, p)| procfs::start_time(**pid).ok() != Some(p.start_time))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            if let Some(p) = self.procs.remove(&pid) {
                tracing::info!(pid, exe = %p.labels.exe, "process exited; detaching");
                for a in [p.access, p.growth].into_iter().flatten() {
                    self.bpf.detach_links(pid, a);
                }
                self.bpf.detach(pid, p.attachment);
                let reasons: Vec<String> = p.seen_reasons.into_iter().collect();
                let growths: Vec<_> = p.growth_series.into_iter().collect();
                self.metrics.remove_process(&p.labels, &reasons, &growths);
            }
        }
    }
}
