//! The attach stage: registers each process, and its executable's site
//! ranges, with the probes; attaches its probe groups; and governs what they
//! cost. It shares no lock with collection, so its budget checks never wait
//! behind a scrape.
use std::{
    collections::BTreeMap,
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gopulse_common::{PROGRAMS, PageBits};

use crate::{
    bpf::{Bpf, Links},
    cost::{self, Costs, TrapCost},
    governor::{Budget, TokenBucket},
    metrics::{Metrics, ProcLabels},
    plan::{Group, PROGRAM_TABLE, Plan, ProbeSite},
};

/// How often the budget is checked when nothing spends, and while probes
/// spend (a sampling window is open, or a growth bucket is below half).
pub const IDLE_CHECK: Duration = Duration::from_millis(100);
pub const BUSY_CHECK: Duration = Duration::from_millis(5);

/// When the kernel's BPF run-time statistics are on (`--bpf-stats`). They
/// are a switch for the whole host: while on, every BPF program on it, ours
/// or not, pays two clock reads a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsMode {
    /// Never: probe costs are the reference machine's estimates.
    Off,
    /// One second in thirty, enough to keep each program's mean run time
    /// current.
    Sampled,
    /// All the time.
    Always,
}

/// `StatsMode::Sampled`: on this long every this often.
const STATS_ON: Duration = Duration::from_secs(1);
const STATS_PERIOD: Duration = Duration::from_secs(30);

/// How the map assignment/deletion probes run (`--map-assign-probes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessMode {
    /// Never attached.
    Off,
    /// Attached for a window every period, and cut early by the budget.
    Sampled,
    /// Attached all the time, whatever they cost.
    Always,
}

/// An executable, as the kernel knows files: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExeKey {
    pub dev: u64,
    pub ino: u64,
}

impl ExeKey {
    /// The executable process `pid` runs.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        let m = std::fs::metadata(crate::procfs::exe_path(pid))?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// What the attach stage needs to watch one process.
pub struct Target<'a> {
    pub pid: u32,
    pub labels: ProcLabels,
    pub exe: ExeKey,
    pub plan: &'a Plan,
    /// The executable's plumbing pages, for the site walk.
    pub pages: &'a BTreeMap<u32, PageBits>,
}

/// An executable registered with the kernel.
struct Exe {
    id: u32,
    /// Processes of it watched.
    procs: usize,
    /// Its plumbing pages in the kernel.
    pages: Vec<u32>,
}

/// A group of probes that can be cut: where they go, their links while
/// attached, and their budget.
struct Cuttable {
    sites: Vec<ProbeSite>,
    links: Option<Links>,
    bucket: TokenBucket,
    /// Cut by the governor (not merely between sampling windows).
    cut: bool,
}

struct Attached {
    labels: ProcLabels,
    exe: ExeKey,
    core: Links,
    growth: Cuttable,
    access: Cuttable,
    /// Hits per program at the last check.
    hits: [u64; PROGRAMS],
}

impl Attached {
    fn probe_count(&self) -> usize {
        self.core.len()
            + self.growth.links.as_ref().map_or(0, Links::len)
            + self.access.links.as_ref().map_or(0, Links::len)
    }
}

pub struct Probes {
    bpf: Bpf,
    costs: Arc<Costs>,
    metrics: Metrics,
    /// The growth probes' budget, and the sampled access probes' (the same
    /// fraction, averaged over one sampling window: a window may spend no
    /// more than its share).
    budget: Budget,
    access_budget: Budget,
    access_mode: AccessMode,
    /// Whether a sampling window is open (or the mode is `always`).
    access_on: bool,
    /// When the programs' costs were last refreshed from the kernel.
    costs_read: Option<Instant>,
    /// Executables registered with the kernel.
    exes: BTreeMap<ExeKey, Exe>,
    procs: BTreeMap<u32, Attached>,
    /// Keeps the kernel's BPF run-time statistics on while held.
    kernel_stats: Option<OwnedFd>,
    stats_mode: StatsMode,
    /// When the statistics were last turned on or off.
    stats_switched: Instant,
}

impl Probes {
    /// Turns on the kernel's run-time statistics and times this machine's
    /// uprobe traps (logging what it found), before any process is watched.
    pub fn new(
        mut bpf: Bpf,
        metrics: Metrics,
        budget: Budget,
        access_budget: Budget,
        access_mode: AccessMode,
        stats_mode: StatsMode,
    ) -> (Self, Arc<Costs>) {
        let kernel_stats = match stats_mode {
            StatsMode::Off => {
                tracing::info!(
                    "kernel BPF statistics off (--bpf-stats off): probe costs are estimates \
                     ({} ns a program run, the reference machine's traps)",
                    cost::DEFAULT_RUN_NS
                );
                None
            }
            StatsMode::Sampled | StatsMode::Always => match cost::enable_kernel_stats() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(
                        "{e:#}; probe costs fall back to estimates ({} ns a program run, the \
                         reference machine's traps)",
                        cost::DEFAULT_RUN_NS
                    );
                    None
                }
            },
        };
        let trap = match kernel_stats.as_ref().map(|_| cost::calibrate(&mut bpf)) {
            Some(Ok(t)) => {
                tracing::info!(
                    jbe_ns = t.emulated_ns.round(),
                    ret_ns = t.single_step_ns.round(),
                    "timed this machine's uprobe traps: {:.2} µs on a JBE (entry probes), \
                     {:.2} µs on a RET",
                    t.emulated_ns / 1e3,
                    t.single_step_ns / 1e3
                );
                t
            }
            Some(Err(e)) => {
                tracing::warn!("timing uprobe traps: {e:#}; using the reference machine's");
                TrapCost::DEFAULT
            }
            None => TrapCost::DEFAULT,
        };
        let costs = Arc::new(Costs::new(trap));
        let probes = Self {
            bpf,
            costs: costs.clone(),
            metrics,
            budget,
            access_budget,
            access_mode,
            access_on: access_mode == AccessMode::Always,
            costs_read: None,
            exes: BTreeMap::new(),
            procs: BTreeMap::new(),
            kernel_stats,
            stats_mode,
            stats_switched: Instant::now(),
        };
        probes.publish_costs();
        (probes, costs)
    }

    /// The id of an executable in the kernel, registering it (and its
    /// plumbing pages) for its first process.
    fn exe_id(&mut self, key: ExeKey, pages: &BTreeMap<u32, PageBits>) -> anyhow::Result<u32> {
        if let Some(exe) = self.exes.get_mut(&key) {
            exe.procs += 1;
            return Ok(exe.id);
        }
        let id = (0..=u32::MAX)
            .find(|id| self.exes.values().all(|e| e.id != *id))
            .context("no free executable id")?;
        let pages = match self.bpf.set_exe(id, pages) {
            Ok(()) => pages.keys().copied().collect(),
            Err(e) => {
                // The probes still count every growth, at the direct caller
                // of the runtime.
                tracing::warn!(
                    "{e:#}; map growth sites of this executable are its runtime's direct callers"
                );
                Vec::new()
            }
        };
        self.exes.insert(
            key,
            Exe {
                id,
                procs: 1,
                pages,
            },
        );
        Ok(id)
    }

    fn release_exe(&mut self, key: ExeKey) {
        if let Some(exe) = self.exes.get_mut(&key) {
            exe.procs -= 1;
            if exe.procs == 0
                && let Some(exe) = self.exes.remove(&key)
            {
                self.bpf.remove_exe(exe.id, exe.pages);
            }
        }
    }

    /// Registers the process and attaches its probes: GC and stop-the-world,
    /// map growth, and the access probes if they are on. Returns how many.
    pub fn attach(&mut self, t: Target<'_>) -> anyhow::Result<usize> {
        if self.procs.contains_key(&t.pid) {
            bail!("pid {} is watched already", t.pid);
        }
        let exe_id = self.exe_id(t.exe, t.pages)?;
        let config = gopulse_common::ProcConfig {
            exe_id,
            ..t.plan.config
        };
        let attached = self
            .bpf
            .register(t.pid, config, t.plan.stw)
            .and_then(|()| self.bpf.attach_sites(t.pid, &t.plan.core))
            .and_then(|core| match self.bpf.attach_sites(t.pid, &t.plan.growth) {
                Ok(growth) => Ok((core, growth)),
                Err(e) => {
                    self.bpf.detach_links(t.pid, core);
                    Err(e)
                }
            });
        let (core, growth) = match attached {
            Ok(links) => links,
            Err(e) => {
                self.bpf.unregister(t.pid);
                self.release_exe(t.exe);
                return Err(e);
            }
        };
        let now = Instant::now();
        let mut a = Attached {
            labels: t.labels,
            exe: t.exe,
            core,
            growth: Cuttable {
                sites: t.plan.growth.clone(),
                links: Some(growth),
                bucket: TokenBucket::new(self.budget, now),
                cut: false,
            },
            access: Cuttable {
                sites: t.plan.access.clone(),
                links: None,
                bucket: TokenBucket::new(self.access_budget, now),
                cut: false,
            },
            hits: [0; PROGRAMS],
        };
        if self.access_on {
            attach_access(&mut self.bpf, t.pid, &mut a);
        }
        self.metrics
            .map_growth_attached
            .get_or_create(&a.labels)
            .set(1);
        self.publish(&a);
        let n = a.probe_count();
        self.procs.insert(t.pid, a);
        Ok(n)
    }

    /// Detaches every probe of a process and forgets it.
    pub fn detach(&mut self, pid: u32) {
        let Some(a) = self.procs.remove(&pid) else {
            return;
        };
        for links in [Some(a.core), a.growth.links, a.access.links]
            .into_iter()
            .flatten()
        {
            self.bpf.detach_links(pid, links);
        }
        self.bpf.unregister(pid);
        self.release_exe(a.exe);
    }

    /// Detaches every probe of every process, in parallel, and returns when
    /// they are all gone (at shutdown).
    pub fn detach_all(&mut self) {
        let mut links = Vec::new();
        for (pid, a) in std::mem::take(&mut self.procs) {
            for group in [Some(a.core), a.growth.links, a.access.links]
                .into_iter()
                .flatten()
            {
                links.extend(self.bpf.take_links(pid, group));
            }
            self.bpf.unregister(pid);
        }
        crate::bpf::drop_in_parallel(links);
    }

    /// Opens or closes a sampling window of the access probes.
    pub fn set_access(&mut self, on: bool) {
        if self.access_mode != AccessMode::Sampled {
            return;
        }
        self.access_on = on;
        let now = Instant::now();
        for (&pid, a) in &mut self.procs {
            match (on, a.access.links.is_some()) {
                // A window opens only with budget left.
                (true, false) if a.access.bucket.spend(now, 0.0) => {
                    a.access.cut = false;
                    attach_access(&mut self.bpf, pid, a);
                }
                (false, true) => {
                    if let Some(links) = a.access.links.take() {
                        self.bpf.detach_links(pid, links);
                    }
                }
                _ => {}
            }
            self.metrics
                .map_assign_attached
                .get_or_create(&a.labels)
                .set(i64::from(a.access.links.is_some()));
            self.metrics
                .probes_attached
                .get_or_create(&a.labels)
                .set(a.probe_count() as i64);
        }
    }

    /// One check of the budget: refreshes each program's cost from the
    /// kernel's statistics (every 100 ms at most), charges each process's
    /// groups for their hits since the last check, cuts a group whose bucket
    /// ran dry, and puts back a cut growth group once its bucket is full
    /// again. Returns when to check next: soon while probes are spending
    /// (so a group overshoots its bucket by at most one short check), at
    /// leisure otherwise.
    pub fn govern(&mut self) -> Duration {
        let now = Instant::now();
        if self
            .costs_read
            .is_none_or(|t| now.duration_since(t) >= IDLE_CHECK)
        {
            self.costs.update(&self.bpf.all_program_stats());
            self.publish_costs();
            self.costs_read = Some(now);
            self.switch_stats(now);
        }
        let mut next = IDLE_CHECK;
        for (&pid, a) in &mut self.procs {
            let Ok(stats) = self.bpf.counters(pid) else {
                continue;
            };
            let mut spent = [0.0f64; 3];
            for (i, (&now_hits, then)) in stats.hits.iter().zip(a.hits.iter_mut()).enumerate() {
                let new = now_hits.saturating_sub(*then);
                *then = now_hits;
                let g = PROGRAM_TABLE[i].group as usize;
                spent[g] += new as f64 * self.costs.per_hit_s(i);
            }
            tracing::trace!(
                pid,
                growth_s = spent[Group::Growth as usize],
                access_s = spent[Group::Access as usize],
                growth_left = a.growth.bucket.tokens(),
                access_left = a.access.bucket.tokens(),
                "budget check"
            );
            let growth_left = a.growth.bucket.spend(now, spent[Group::Growth as usize]);
            let access_left = a.access.bucket.spend(now, spent[Group::Access as usize]);
            if a.growth.links.is_some() && !growth_left {
                if let Some(links) = a.growth.links.take() {
                    self.bpf.detach_links(pid, links);
                }
                a.growth.cut = true;
                self.metrics
                    .map_growth_attached
                    .get_or_create(&a.labels)
                    .set(0);
                tracing::warn!(
                    pid,
                    exe = %a.labels.exe,
                    "map growth probes spent their budget ({:.2}% of a CPU over {:?}): \
                     detached until it refills; growth counts miss that time",
                    self.budget.fraction * 100.0,
                    self.budget.window
                );
            } else if a.growth.cut && a.growth.bucket.full(now) {
                match self.bpf.attach_sites(pid, &a.growth.sites) {
                    Ok(links) => {
                        a.growth.links = Some(links);
                        a.growth.cut = false;
                        self.metrics
                            .map_growth_attached
                            .get_or_create(&a.labels)
                            .set(1);
                        tracing::info!(pid, exe = %a.labels.exe, "map growth probes re-attached");
                    }
                    Err(e) => tracing::warn!(pid, "re-attaching map growth probes: {e:#}"),
                }
            }
            let spending =
                |bucket: &TokenBucket, budget: &Budget| bucket.tokens() < budget.capacity_s() / 2.0;
            if (a.growth.links.is_some() && spending(&a.growth.bucket, &self.budget))
                || (self.access_mode == AccessMode::Sampled && a.access.links.is_some())
            {
                next = BUSY_CHECK;
            }
            if self.access_mode == AccessMode::Sampled && a.access.links.is_some() && !access_left {
                if let Some(links) = a.access.links.take() {
                    self.bpf.detach_links(pid, links);
                }
                a.access.cut = true;
                self.metrics
                    .map_assign_attached
                    .get_or_create(&a.labels)
                    .set(0);
                tracing::info!(
                    pid,
                    "map assignment probes spent their budget ({:.2}% of a CPU over {:?}): \
                     detached until the next window",
                    self.access_budget.fraction * 100.0,
                    self.access_budget.window
                );
            }
            let n = a.probe_count() as i64;
            self.metrics.probes_attached.get_or_create(&a.labels).set(n);
        }
        next
    }

    /// Sampled statistics: on for `STATS_ON` every `STATS_PERIOD`. (The
    /// kernel's totals only grow while they are on, so each program's mean
    /// over the runs it counted stays right across the gaps.)
    fn switch_stats(&mut self, now: Instant) {
        if self.stats_mode != StatsMode::Sampled {
            return;
        }
        let since = now.duration_since(self.stats_switched);
        match self.kernel_stats {
            Some(_) if since >= STATS_ON => {
                self.kernel_stats = None;
                self.stats_switched = now;
            }
            None if since >= STATS_PERIOD - STATS_ON => match cost::enable_kernel_stats() {
                Ok(fd) => {
                    self.kernel_stats = Some(fd);
                    self.stats_switched = now;
                }
                Err(e) => {
                    tracing::debug!("{e:#}");
                    self.stats_switched = now;
                }
            },
            _ => {}
        }
    }

    /// The cost per hit the governor uses, on `/metrics`.
    fn publish_costs(&self) {
        for (i, p) in PROGRAM_TABLE.iter().enumerate() {
            self.metrics
                .probe_hit_cost
                .get_or_create(&crate::metrics::ProbeNameLabels { probe: p.name })
                .set(self.costs.per_hit_s(i));
        }
    }

    fn publish(&self, a: &Attached) {
        self.metrics
            .probes_attached
            .get_or_create(&a.labels)
            .set(a.probe_count() as i64);
        self.metrics
            .map_assign_attached
            .get_or_create(&a.labels)
            .set(i64::from(a.access.links.is_some()));
    }
}

fn attach_access(bpf: &mut Bpf, pid: u32, a: &mut Attached) {
    match bpf.attach_sites(pid, &a.access.sites) {
        Ok(links) => a.access.links = Some(links),
        Err(e) => tracing::warn!(pid, "attaching map assignment probes: {e:#}"),
    }
}
