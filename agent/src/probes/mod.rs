//! The attach stage: registers each process, and its executable's site
//! ranges, with the probes; attaches its probe groups; and governs what they
//! cost. It shares no lock with collection, so its budget checks never wait
//! behind a scrape; and it never holds its own lock while the kernel
//! attaches probes (that can take seconds behind the kernel's queue of
//! uprobe removals): attaching is planned under the lock ([`Job`],
//! [`NewExe`]), done off it, and the links handed back
//! ([`Probes::install`], [`Probes::attach`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::bail;
use gopulse_common::{PROGRAMS, PageBits, SliceWindow};

pub mod handoff;
mod jobs;
pub(crate) mod lease;

pub use jobs::{AttachError, Done, Job, NewExe, Prepare};
use lease::{LEASE_BREAK, drop_then_close, handle_sigio, lease_broken};

use crate::{
    bpf::{Attacher, Bpf, Links},
    cost::{self, Costs, TrapCost},
    discover::events::monotonic_ns,
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

/// Where in its period each sampling window of the assignment probes opens:
/// at a random point of the period's slack (period − window), drawn anew
/// each period. At a fixed phase, a workload whose bursts keep time with the
/// period would be missed by every window of a run (the demo's 4 s bursts
/// and 2 s windows, once uprobe_multi links made attaching punctual; the
/// perf-event path's waits in the kernel had jittered the windows).
pub struct WindowPhase {
    state: u64,
}

impl WindowPhase {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A seed that differs between agents and runs.
    pub fn seed() -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        now ^ (u64::from(std::process::id()) << 32)
    }

    /// How long to wait, from the start of a period, before opening its
    /// window.
    pub fn lead(&mut self, period: Duration, window: Duration) -> Duration {
        // splitmix64: uniform enough, and no dependency for one number a
        // period.
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let fraction = (z >> 11) as f64 / (1u64 << 53) as f64;
        period.saturating_sub(window).mul_f64(fraction)
    }
}

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

pub use crate::discover::exe::ExeKey;

/// What one sampling window of the slice growth probe measured of a
/// process: its growths were counted for `counted` of the `span` since the
/// last estimate (the collector scales them by `span / counted`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceSample {
    pub pid: u32,
    pub counted: Duration,
    pub span: Duration,
}

/// The slice probe's window in the kernel: counting from `start` (ns) on.
fn open_from(start: u64) -> SliceWindow {
    SliceWindow {
        start,
        end: u64::MAX,
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

/// A group of probes that can be cut: where they go, and their links
/// while attached.
struct Cuttable {
    sites: Vec<ProbeSite>,
    links: Option<Links>,
    /// Growth group: cut by the governor, to be put back when the buckets
    /// refill. (A cut access group simply waits for the next window.)
    cut: bool,
    /// A [`Job`] attaching the group is out.
    pending: bool,
}

impl Cuttable {
    fn new(sites: &[ProbeSite], links: Option<Links>) -> Self {
        Self {
            sites: sites.to_vec(),
            links,
            cut: false,
            pending: false,
        }
    }

    fn len(&self) -> usize {
        self.links.as_ref().map_or(0, Links::len)
    }
}

/// An executable with watched processes: its probes, attached once for
/// every process that runs it (processes are told apart in the kernel by
/// pid), and its id and plumbing pages in the kernel.
struct Exe {
    id: u32,
    /// Tells this executable apart from one added later with the same key
    /// (a job's links go only to the executable that planned it).
    serial: u64,
    /// Holds the file, so probes can be put back after the process that
    /// brought it has gone (attached through `/proc/self/fd/N`), and a read
    /// lease on it (see `lease`).
    file: std::fs::File,
    /// The lease was taken (without it, F_GETLEASE reads as broken).
    leased: bool,
    pids: BTreeSet<u32>,
    pages: Vec<u32>,
    core: Links,
    growth: Cuttable,
    access: Cuttable,
    slice: Cuttable,
    /// Sampled slice probe: when its window opened (CLOCK_MONOTONIC ns),
    /// while it counts.
    slice_open: Option<u64>,
    /// The window it counted in since the last estimate, once closed.
    slice_done: Option<(u64, u64)>,
}

impl Exe {
    fn probe_count(&self) -> usize {
        self.core.len() + self.growth.len() + self.access.len() + self.slice.len()
    }

    /// Stops the slice probe counting (its window ends now) and detaches it.
    fn end_slice_window(&mut self, bpf: &mut Bpf, now: u64) {
        if let Some(start) = self.slice_open.take() {
            let w = SliceWindow { start, end: now };
            if let Err(e) = bpf.set_slice_window(self.id, w) {
                tracing::warn!("{e:#}");
            }
            self.slice_done = Some((start, now));
        }
        if let Some(links) = self.slice.links.take() {
            links.detach();
        }
    }

    /// A job attaching one of its groups (the group marked pending).
    fn job(&mut self, key: ExeKey, group: Group, attacher: &Attacher) -> Option<Job> {
        let cuttable = match group {
            Group::Growth => &mut self.growth,
            Group::Access => &mut self.access,
            Group::Slice => &mut self.slice,
            Group::Core => return None,
        };
        let file = match self.file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("duplicating a probed executable's descriptor: {e}");
                return None;
            }
        };
        cuttable.pending = true;
        Some(Job {
            attacher: attacher.clone(),
            key,
            serial: self.serial,
            group,
            file,
            sites: cuttable.sites.clone(),
        })
    }
}

/// A watched process: its labels and budgets.
struct Attached {
    labels: ProcLabels,
    exe: ExeKey,
    growth: TokenBucket,
    access: TokenBucket,
    slice: TokenBucket,
    /// Where the span of its next slice growth estimate starts
    /// (CLOCK_MONOTONIC ns).
    slice_since: u64,
    /// Hits per program at the last check.
    hits: [u64; PROGRAMS],
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
    /// The same for the slice growth probe (`--slice-probes`).
    slice_budget: Budget,
    slice_mode: AccessMode,
    slice_on: bool,
    /// When the programs' costs were last refreshed from the kernel.
    costs_read: Option<Instant>,
    exes: BTreeMap<ExeKey, Exe>,
    procs: BTreeMap<u32, Attached>,
    /// Keeps the kernel's BPF run-time statistics on while held.
    kernel_stats: Option<OwnedFd>,
    stats_mode: StatsMode,
    /// When the statistics were last turned on or off.
    stats_switched: Instant,
    attacher: Attacher,
    /// The next executable's serial.
    serials: u64,
    /// Shut down: links handed back now are dropped.
    closed: bool,
}

impl Probes {
    /// Turns on the kernel's run-time statistics and times this machine's
    /// uprobe traps (logging what it found), before any process is watched.
    pub fn new(
        bpf: Bpf,
        metrics: Metrics,
        budget: Budget,
        (access_budget, access_mode): (Budget, AccessMode),
        (slice_budget, slice_mode): (Budget, AccessMode),
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
        let trap = match kernel_stats
            .as_ref()
            .map(|_| cost::calibrate(&bpf.attacher()))
        {
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
        handle_sigio();
        let probes = Self {
            attacher: bpf.attacher(),
            serials: 0,
            closed: false,
            bpf,
            costs: costs.clone(),
            metrics,
            budget,
            access_budget,
            access_mode,
            access_on: access_mode == AccessMode::Always,
            slice_budget,
            slice_mode,
            slice_on: slice_mode == AccessMode::Always,
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

    /// Registers the process with the probes of its executable. For the
    /// first process of an executable, `new` brings the probes, attached
    /// off the lock; without it the call says what attaching them needs
    /// ([`AttachError::NeedExe`]). Returns how many probes the executable
    /// has.
    pub fn attach(&mut self, t: Target<'_>, new: Option<NewExe>) -> Result<usize, AttachError> {
        if self.procs.contains_key(&t.pid) {
            if let Some(n) = new {
                n.discard();
            }
            return Err(anyhow::anyhow!("pid {} is watched already", t.pid).into());
        }
        match (self.exes.contains_key(&t.exe), new) {
            (true, Some(n)) => n.discard(), // attached meanwhile
            (true, None) => {}
            (false, Some(n)) if self.closed => {
                n.discard();
                return Err(anyhow::anyhow!("the agent is shutting down").into());
            }
            (false, Some(n)) => self.add_exe(&t, n)?,
            (false, None) => {
                return Err(AttachError::NeedExe(Prepare {
                    attacher: self.attacher.clone(),
                    access: self.access_on,
                    slice: self.slice_mode == AccessMode::Always,
                }));
            }
        }
        let Some(exe) = self.exes.get_mut(&t.exe) else {
            return Err(anyhow::anyhow!("executable of pid {} vanished", t.pid).into());
        };
        let config = gopulse_common::ProcConfig {
            exe_id: exe.id,
            ..t.plan.config
        };
        if let Err(e) = self.bpf.register(t.pid, config, t.plan.stw) {
            self.bpf.unregister(t.pid);
            if exe.pids.is_empty() {
                self.drop_exe(t.exe);
            }
            return Err(e.into());
        }
        exe.pids.insert(t.pid);
        let now = Instant::now();
        let a = Attached {
            labels: t.labels,
            exe: t.exe,
            growth: TokenBucket::new(self.budget, now),
            access: TokenBucket::new(self.access_budget, now),
            slice: TokenBucket::new(self.slice_budget, now),
            slice_since: monotonic_ns(),
            hits: [0; PROGRAMS],
        };
        let n = exe.probe_count();
        self.procs.insert(t.pid, a);
        self.publish_exe(t.exe);
        self.publish_node();
        Ok(n)
    }

    /// Registers an executable whose probes are attached with the kernel
    /// (id, plumbing pages).
    fn add_exe(&mut self, t: &Target<'_>, n: NewExe) -> anyhow::Result<()> {
        let Some(id) = (0..=u32::MAX).find(|id| self.exes.values().all(|e| e.id != *id)) else {
            n.discard();
            bail!("no free executable id");
        };
        let pages = match self.bpf.set_exe(id, t.pages) {
            Ok(()) => t.pages.keys().copied().collect(),
            Err(e) => {
                // The probes still count every growth, at the direct caller
                // of the runtime.
                tracing::warn!(
                    "{e:#}; map growth sites of this executable are its runtime's direct callers"
                );
                Vec::new()
            }
        };
        // The window may have closed while the probes were attached.
        let access = match n.access {
            Some(links) if !self.access_on => {
                links.detach();
                None
            }
            a => a,
        };
        // Always on: counting from the start; sampled: when a window opens.
        let window = match self.slice_mode {
            AccessMode::Always => open_from(0),
            _ => SliceWindow::default(),
        };
        let slice = match (n.slice, self.bpf.set_slice_window(id, window)) {
            (Some(links), Ok(())) => Some(links),
            (links, Err(e)) => {
                tracing::warn!("{e:#}; slice growths of this executable are not counted");
                if let Some(links) = links {
                    links.detach();
                }
                None
            }
            (None, Ok(())) => None,
        };
        // A break that came while the probes were attached off the lock
        // found no executable to yield: look again at the next check.
        if n.leased && lease_broken(&n.file) {
            LEASE_BREAK.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.serials += 1;
        let exe = Exe {
            id,
            serial: self.serials,
            file: n.file,
            leased: n.leased,
            pids: BTreeSet::new(),
            pages,
            core: n.core,
            growth: Cuttable::new(&t.plan.growth, Some(n.growth)),
            access: Cuttable::new(&t.plan.access, access),
            slice: Cuttable::new(&t.plan.slice, slice),
            slice_open: None,
            slice_done: None,
        };
        self.exes.insert(t.exe, exe);
        Ok(())
    }

    /// Detaches an executable's probes and forgets it.
    fn drop_exe(&mut self, key: ExeKey) {
        let Some(exe) = self.exes.remove(&key) else {
            return;
        };
        let mut links = Vec::new();
        for group in [
            Some(exe.core),
            exe.growth.links,
            exe.access.links,
            exe.slice.links,
        ]
        .into_iter()
        .flatten()
        {
            links.extend(group.into_inner());
        }
        // The next executable given its id starts closed.
        let _ = self.bpf.set_slice_window(exe.id, SliceWindow::default());
        self.bpf.remove_exe(exe.id, exe.pages);
        // The lease (the file) goes last: see `lease`.
        drop_then_close(links, exe.file);
    }

    /// Lets go of every executable someone waits to write: its processes
    /// have exited (a running executable cannot be opened for writing), the
    /// exit was not seen yet, and the writer's open waits on the lease.
    fn yield_leases(&mut self) {
        let broken: Vec<ExeKey> = self
            .exes
            .iter()
            .filter(|(_, e)| e.leased && lease_broken(&e.file))
            .map(|(k, _)| *k)
            .collect();
        if broken.is_empty() {
            return;
        }
        for key in broken {
            tracing::info!(
                dev = key.dev,
                inode = key.ino,
                "a probed executable is being written: its probes detached first"
            );
            self.drop_exe(key);
        }
        self.publish_node();
    }

    /// Forgets a process; the last of its executable takes the probes with
    /// it.
    pub fn detach(&mut self, pid: u32) {
        let Some(a) = self.procs.remove(&pid) else {
            return;
        };
        self.bpf.unregister(pid);
        if let Some(exe) = self.exes.get_mut(&a.exe) {
            exe.pids.remove(&pid);
            if exe.pids.is_empty() {
                self.drop_exe(a.exe);
            }
        }
        self.publish_node();
    }

    /// Detaches every probe, in parallel, and returns when they are all
    /// gone (at shutdown); returns how many there were.
    pub fn detach_all(&mut self) -> usize {
        self.closed = true;
        let mut links = Vec::new();
        // Closed after the links: see `lease`.
        let mut files = Vec::new();
        for (_, exe) in std::mem::take(&mut self.exes) {
            for group in [
                Some(exe.core),
                exe.growth.links,
                exe.access.links,
                exe.slice.links,
            ]
            .into_iter()
            .flatten()
            {
                links.extend(group.into_inner());
            }
            files.push(exe.file);
        }
        for pid in std::mem::take(&mut self.procs).into_keys() {
            self.bpf.unregister(pid);
        }
        let n = links.len();
        crate::bpf::drop_in_parallel(links);
        drop(files);
        n
    }

    /// Opens a sampling window of the access probes: returns the jobs that
    /// attach them, for every executable whose processes all have budget
    /// left.
    pub fn open_window(&mut self) -> Vec<Job> {
        if self.access_mode != AccessMode::Sampled || self.closed {
            return Vec::new();
        }
        self.access_on = true;
        let now = Instant::now();
        let mut jobs = Vec::new();
        for (&key, exe) in &mut self.exes {
            if exe.access.links.is_some() || exe.access.pending {
                continue;
            }
            let funded = exe.pids.iter().all(|pid| {
                self.procs
                    .get_mut(pid)
                    .is_none_or(|a| a.access.spend(now, 0.0))
            });
            if funded {
                jobs.extend(exe.job(key, Group::Access, &self.attacher));
            }
        }
        jobs
    }

    /// Closes the sampling window: the access probes are detached.
    pub fn close_window(&mut self) {
        if self.access_mode != AccessMode::Sampled {
            return;
        }
        self.access_on = false;
        let keys: Vec<ExeKey> = self.exes.keys().copied().collect();
        for key in keys {
            if let Some(links) = self.exes.get_mut(&key).and_then(|e| e.access.links.take()) {
                links.detach();
                self.publish_exe(key);
            }
        }
        self.publish_node();
    }

    /// Opens a sampling window of the slice growth probe: the jobs that
    /// attach it, for every executable whose processes all have budget
    /// left (it counts once attached, from [`Probes::install`] on).
    pub fn open_slice_window(&mut self) -> Vec<Job> {
        if self.slice_mode != AccessMode::Sampled || self.closed {
            return Vec::new();
        }
        self.slice_on = true;
        let now = Instant::now();
        let mut jobs = Vec::new();
        for (&key, exe) in &mut self.exes {
            if exe.slice.links.is_some() || exe.slice.pending || exe.slice.sites.is_empty() {
                continue;
            }
            let funded = exe.pids.iter().all(|pid| {
                self.procs
                    .get_mut(pid)
                    .is_none_or(|a| a.slice.spend(now, 0.0))
            });
            if funded {
                jobs.extend(exe.job(key, Group::Slice, &self.attacher));
            }
        }
        jobs
    }

    /// Closes the slice probe's sampling window: it stops counting and is
    /// detached. Returns, per process, what the window measured since the
    /// last estimate: a process whose executable counted nothing (its
    /// budget was spent) carries its span over to the next window.
    pub fn close_slice_window(&mut self) -> Vec<SliceSample> {
        if self.slice_mode != AccessMode::Sampled {
            return Vec::new();
        }
        self.slice_on = false;
        let now = monotonic_ns();
        let mut out = Vec::new();
        let keys: Vec<ExeKey> = self.exes.keys().copied().collect();
        for key in keys {
            let Some(exe) = self.exes.get_mut(&key) else {
                continue;
            };
            exe.end_slice_window(&mut self.bpf, now);
            let done = exe.slice_done.take();
            for pid in &exe.pids {
                let Some(a) = self.procs.get_mut(pid) else {
                    continue;
                };
                // The part of the window the process was watched for.
                let counted = done.map_or(0, |(start, end)| {
                    end.saturating_sub(start.max(a.slice_since))
                });
                if counted == 0 {
                    continue;
                }
                out.push(SliceSample {
                    pid: *pid,
                    counted: Duration::from_nanos(counted),
                    span: Duration::from_nanos(now.saturating_sub(a.slice_since)),
                });
                a.slice_since = now;
            }
            self.publish_exe(key);
        }
        self.publish_node();
        out
    }

    /// Takes back what a [`Job`] attached: its links go to the executable
    /// that planned it if the group is still wanted there, and are
    /// detached otherwise (the window closed, the executable went, the
    /// agent is shutting down).
    pub fn install(&mut self, done: Done) {
        let Done { job, links } = done;
        let exe = self
            .exes
            .get_mut(&job.key)
            .filter(|e| e.serial == job.serial && !self.closed);
        let Some(exe) = exe else {
            if let Ok(links) = links {
                // After the executable's own links: the file (a copy of
                // its descriptor) holds the lease until these are gone.
                drop_then_close(links.into_inner(), job.file);
            }
            return;
        };
        let (wanted, group) = match job.group {
            Group::Growth => (exe.growth.cut, &mut exe.growth),
            Group::Access => (self.access_on, &mut exe.access),
            Group::Slice => (self.slice_on, &mut exe.slice),
            Group::Core => return,
        };
        group.pending = false;
        let what = match job.group {
            Group::Growth => "map growth",
            Group::Slice => "slice growth",
            _ => "map assignment",
        };
        match links {
            Ok(links) if wanted && group.links.is_none() => {
                group.links = Some(links);
                if job.group == Group::Slice {
                    // Attached: it counts from now until the window closes.
                    let now = monotonic_ns();
                    match self.bpf.set_slice_window(exe.id, open_from(now)) {
                        Ok(()) => exe.slice_open = Some(now),
                        Err(e) => tracing::warn!("{e:#}"),
                    }
                }
                if job.group == Group::Growth {
                    group.cut = false;
                    tracing::info!(
                        exe = exe_name(exe, &self.procs),
                        "{what} probes re-attached"
                    );
                }
            }
            Ok(links) => links.detach(),
            Err(e) => tracing::warn!("attaching {what} probes: {e:#}"),
        }
        self.publish_exe(job.key);
        self.publish_node();
    }

    /// One check of the budget: refreshes each program's cost from the
    /// kernel's statistics (every 100 ms at most), charges each process's
    /// groups for their hits since the last check, cuts an executable's
    /// group when a process of it ran its bucket dry, and puts back a cut
    /// growth group once every process's bucket is full again. Returns when
    /// to check next: soon while probes are spending (so a group overshoots
    /// its bucket by at most one short check), at leisure otherwise.
    ///
    /// Cut growth groups to put back come as jobs, to run off the lock.
    pub fn govern(&mut self) -> (Duration, Vec<Job>) {
        if LEASE_BREAK.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.yield_leases();
        }
        let now = Instant::now();
        if self
            .costs_read
            .is_none_or(|t| now.duration_since(t) >= IDLE_CHECK)
        {
            // Busy with an attach: the costs read last stand.
            if let Some(stats) = self.attacher.all_program_stats() {
                self.costs.update(&stats);
                self.publish_costs();
                self.costs_read = Some(now);
            }
            self.switch_stats(now);
        }
        let mut next = IDLE_CHECK;
        let mut jobs = Vec::new();
        // Per executable: some process ran dry (growth, access, slice),
        // and every process is full again (growth).
        let mut dry: BTreeMap<ExeKey, (bool, bool, bool, bool)> = BTreeMap::new();
        for (&pid, a) in &mut self.procs {
            let Ok(stats) = self.bpf.counters(pid) else {
                continue;
            };
            let mut spent = [0.0f64; 4];
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
                growth_left = a.growth.tokens(),
                access_left = a.access.tokens(),
                "budget check"
            );
            let growth_left = a.growth.spend(now, spent[Group::Growth as usize]);
            let access_left = a.access.spend(now, spent[Group::Access as usize]);
            let slice_left = a.slice.spend(now, spent[Group::Slice as usize]);
            let full = a.growth.full(now);
            let e = dry.entry(a.exe).or_insert((false, false, true, false));
            e.0 |= !growth_left;
            e.1 |= !access_left;
            e.2 &= full;
            e.3 |= !slice_left;
            if a.growth.tokens() < self.budget.capacity_s() / 2.0 {
                next = next.min(BUSY_CHECK);
            }
        }
        for (key, (growth_dry, access_dry, all_full, slice_dry)) in dry {
            let Some(exe) = self.exes.get_mut(&key) else {
                continue;
            };
            let mut changed = false;
            if exe.growth.links.is_some() && growth_dry {
                if let Some(links) = exe.growth.links.take() {
                    links.detach();
                }
                exe.growth.cut = true;
                changed = true;
                tracing::warn!(
                    exe = exe_name(exe, &self.procs),
                    processes = exe.pids.len(),
                    "map growth probes spent their budget ({:.2}% of a CPU over {:?}): \
                     detached until it refills; growth counts miss that time",
                    self.budget.fraction * 100.0,
                    self.budget.window
                );
            } else if exe.growth.cut && all_full && !exe.growth.pending && !self.closed {
                jobs.extend(exe.job(key, Group::Growth, &self.attacher));
            }
            if self.access_mode == AccessMode::Sampled && exe.access.links.is_some() {
                next = BUSY_CHECK;
                if access_dry {
                    if let Some(links) = exe.access.links.take() {
                        links.detach();
                    }
                    changed = true;
                    tracing::info!(
                        exe = exe_name(exe, &self.procs),
                        "map assignment probes spent their budget ({:.2}% of a CPU over {:?}): \
                         detached until the next window",
                        self.access_budget.fraction * 100.0,
                        self.access_budget.window
                    );
                }
            }
            if self.slice_mode == AccessMode::Sampled && exe.slice.links.is_some() {
                next = BUSY_CHECK;
                if slice_dry {
                    exe.end_slice_window(&mut self.bpf, monotonic_ns());
                    changed = true;
                    tracing::debug!(
                        exe = exe_name(exe, &self.procs),
                        "slice growth probe spent its budget ({:.2}% of a CPU over {:?}): \
                         detached until the next window (the estimate uses the time it counted)",
                        self.slice_budget.fraction * 100.0,
                        self.slice_budget.window
                    );
                }
            }
            if changed {
                self.publish_exe(key);
                self.publish_node();
            }
        }
        (next, jobs)
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
                .set_float(&crate::metrics::NodeLabel(p.name), self.costs.per_hit_s(i));
        }
    }

    /// The gauges of every process of an executable: its probes are theirs.
    fn publish_exe(&self, key: ExeKey) {
        let Some(exe) = self.exes.get(&key) else {
            return;
        };
        for a in exe.pids.iter().filter_map(|p| self.procs.get(p)) {
            let m = &self.metrics;
            m.probes_attached.set(&a.labels, exe.probe_count() as i64);
            m.map_assign_attached
                .set(&a.labels, i64::from(exe.access.links.is_some()));
            m.map_growth_attached
                .set(&a.labels, i64::from(exe.growth.links.is_some()));
            m.slice_probes_attached
                .set(&a.labels, i64::from(exe.slice.links.is_some()));
        }
    }

    /// The node's totals: uprobes attached and executables probed.
    fn publish_node(&self) {
        let uprobes: usize = self.exes.values().map(Exe::probe_count).sum();
        self.metrics.uprobes_attached.set(&(), uprobes as i64);
        self.metrics
            .executables_probed
            .set(&(), self.exes.len() as i64);
    }
}

/// An executable's name, for log lines (its first process's `exe` label).
fn exe_name<'a>(exe: &Exe, procs: &'a BTreeMap<u32, Attached>) -> &'a str {
    exe.pids
        .first()
        .and_then(|p| procs.get(p))
        .map_or("", |a| a.labels.exe.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_open_anywhere_in_the_slack() {
        let (period, window) = (Duration::from_millis(2000), Duration::from_millis(1000));
        let mut phase = WindowPhase::new(7);
        let leads: Vec<Duration> = (0..1000).map(|_| phase.lead(period, window)).collect();
        assert!(leads.iter().all(|&l| l <= period - window));
        let (min, max) = (leads.iter().min().unwrap(), leads.iter().max().unwrap());
        assert!(*min < Duration::from_millis(50) && *max > Duration::from_millis(950));
        // Every tenth of the slack is hit.
        for tenth in 0..10 {
            let (lo, hi) = (tenth * 100, (tenth + 1) * 100);
            assert!(
                leads
                    .iter()
                    .any(|l| (lo..hi).contains(&(l.as_millis() as u64))),
                "no window opened {lo}-{hi} ms into its period"
            );
        }
        // No slack, no wait.
        assert_eq!(phase.lead(window, window), Duration::ZERO);
    }
}
