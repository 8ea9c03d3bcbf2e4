//! Turns kernel events and counters into metrics, per watched process.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use gopulse_common::{
    GROW_CLASSIC, GROW_SWISS_GROW, GROW_SWISS_PRUNE, GROW_SWISS_SMALL, GROW_SWISS_SPLIT,
    GROW_SWISS_TO_TABLE, GrowthEvent, PROBE_ASSIGN, PROBE_CLASSES, PROBE_DELETE, PROBE_GROWTH,
    ProcStats, STW_FLAG_CYCLE_DONE, STW_FLAG_NO_START, StwEvent,
};

use crate::{
    bpf::{self, Attachment, Bpf, ProbeSite},
    inspect::{self, MapOffsets, Symbolizer},
    mapshape,
    metrics::{
        GrowthLabels, Metrics, PHASE_MARK, PHASE_SWEEP, PhaseLabels, ProbeLabels, ProcLabels,
        ReasonLabels, SiteLabels,
    },
    procfs,
    storm::{StormRule, StormTracker},
    stw::{self, Reason},
};

/// Site label for growths past the per-process site limit.
pub const OTHER_SITE: &str = "other";

/// `probe` label values, by `PROBE_*` class.
pub const PROBE_NAMES: [&str; PROBE_CLASSES] = [
    "stw_entry",
    "stw_ret",
    "map_growth",
    "map_assign",
    "map_delete",
];

/// Estimated cost of one hit per probe class, in seconds, measured on the
/// reference machine (shared/design/uprobe-costs.md, docs/performance.md):
/// entry probes sit on an emulated JBE (~0.85 µs), RET probes are
/// single-stepped (~5.8 µs), growth probes also walk frames and send an event.
pub const PROBE_COST_S: [f64; PROBE_CLASSES] = [0.85e-6, 5.8e-6, 1.5e-6, 0.9e-6, 0.9e-6];

/// Maps whose shape is read per process per collection for the load factor
/// histogram.
const MAX_SHAPES_PER_COLLECTION: usize = 2048;

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

/// A map known by its address and seed, with its size when it last grew.
#[derive(Clone, Copy, Debug)]
struct MapRef {
    addr: u64,
    seed: u64,
    count: u64,
    /// Its memory no longer holds it: any map growing at the site replaces it.
    gone: bool,
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

/// Assignment and deletion probe hits of a process so far.
fn access_hits(bpf: &mut Bpf, pid: u32) -> u64 {
    bpf.stats(pid)
        .map(|s| s.hits[PROBE_ASSIGN] + s.hits[PROBE_DELETE])
        .unwrap_or(0)
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
        let bin = inspect::inspect(&procfs::exe_path(pid), bpf::WANTED_FUNCTIONS)
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

    fn on_growth(&mut self, ev: GrowthEvent) {
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

    fn drain_stw(&mut self) {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<StwEvent>() {
                tracing::warn!(len = item.len(), "short event in the ring buffer");
                continue;
            }
            // SAFETY: the kernel wrote a whole StwEvent (checked length);
            // read_unaligned copes with any alignment.
            events.push(unsafe { item.as_ptr().cast::<StwEvent>().read_unaligned() });
        }
        for ev in events {
            self.on_stw(ev);
        }
    }

    fn on_stw(&mut self, ev: StwEvent) {
        let Some(p) = self.procs.get_mut(&ev.pid) else {
            return; // the process was just removed
        };
        if ev.flags & STW_FLAG_NO_START != 0 || ev.end_ns < ev.start_ns {
            // Attached mid-pause: the cycle counts, its duration is unknown.
            if ev.flags & STW_FLAG_CYCLE_DONE != 0 {
                p.mark_carry_ns = 0;
            }
            return;
        }
        let ns = ev.end_ns - ev.start_ns;
        let secs = ns as f64 / 1e9;
        let reason = stw::label(p.reasons, ev.reason);
        let labels = ReasonLabels {
            proc: p.labels.clone(),
            reason,
        };
        self.metrics.stw_pause.get_or_create(&labels).observe(secs);
        let max = self.metrics.stw_pause_max.get_or_create(&labels);
        if secs > max.get() {
            max.set(secs);
        }
        p.seen_reasons.insert(labels.reason);
        let gc_phase = match ev.reason {
            stw::GC_SWEEP_TERM => Some((PHASE_SWEEP, ns)),
            stw::GC_MARK_TERM if ev.flags & STW_FLAG_CYCLE_DONE != 0 => {
                Some((PHASE_MARK, ns + std::mem::take(&mut p.mark_carry_ns)))
            }
            stw::GC_MARK_TERM => {
                // gcMarkDone found work left and restarted the world: the
                // cycle's mark termination is still to come.
                p.mark_carry_ns += ns;
                None
            }
            _ => None,
        };
        if let Some((phase, ns)) = gc_phase {
            self.metrics
                .gc_pause
                .get_or_create(&PhaseLabels {
                    proc: p.labels.clone(),
                    phase,
                })
                .observe(ns as f64 / 1e9);
        }
    }

    /// Folds the kernel counters into the metrics.
    pub fn sync(&mut self) {
        for (&pid, p) in &mut self.procs {
            let stats = match self.bpf.stats(pid) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(pid, "reading kernel counters: {e}");
                    continue;
                }
            };
            // What the assignment probes saw: sites, largest maps, and the
            // load factor of every map seen.
            match self.bpf.take_seen(pid) {
                Ok(seen) => {
                    // Every map added and not taken was evicted, up to the
                    // few added since the counters were read.
                    p.maps_taken += seen.len() as u64;
                    let untracked = stats.maps_added.saturating_sub(p.maps_taken);
                    if untracked > p.maps_untracked {
                        self.metrics
                            .maps_untracked
                            .get_or_create(&p.labels)
                            .inc_by(untracked - p.maps_untracked);
                        p.maps_untracked = untracked;
                    }
                    for (i, (addr, s)) in seen.into_iter().enumerate() {
                        let site = p.site(&[s.pc]);
                        let site = p.bounded_site(site, self.max_sites, &self.metrics);
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
                            && let Ok(Some(shape)) =
                                mapshape::read_shape(pid, addr, s.seed, &p.map_offsets)
                            && shape.capacity > 0
                        {
                            self.metrics
                                .map_load_factor_ratio
                                .get_or_create(&p.labels)
                                .observe(shape.load_factor());
                        }
                    }
                }
                Err(e) => tracing::debug!(pid, "reading assignment probe state: {e}"),
            }
            let mut overhead = 0.0;
            for (c, probe) in PROBE_NAMES.iter().enumerate() {
                let hits = stats.hits[c].saturating_sub(p.synced.hits[c]);
                overhead += hits as f64 * PROBE_COST_S[c];
                self.metrics
                    .probe_hits
                    .get_or_create(&ProbeLabels {
                        proc: p.labels.clone(),
                        probe,
                    })
                    .inc_by(hits);
            }
            self.metrics
                .probe_overhead
                .get_or_create(&p.labels)
                .inc_by(overhead);
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
            for (site, map) in &mut p.largest {
                let labels = SiteLabels {
                    proc: p.labels.clone(),
                    site: site.clone(),
                };
                match mapshape::read_shape(pid, map.addr, map.seed, &p.map_offsets) {
                    Ok(Some(shape)) => {
                        let m = &self.metrics;
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
