//! The attach stage: registers each process, and its executable's site
//! ranges, with the probes; attaches its probe groups; and governs what they
//! cost. It shares no lock with collection, so its budget checks never wait
//! behind a scrape.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsRawFd as _, OwnedFd},
    path::PathBuf,
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

pub use crate::discover::exe::ExeKey;

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
}

impl Cuttable {
    fn len(&self) -> usize {
        self.links.as_ref().map_or(0, Links::len)
    }
}

/// An executable with watched processes: its probes, attached once for
/// every process that runs it (processes are told apart in the kernel by
/// pid), and its id and plumbing pages in the kernel.
struct Exe {
    id: u32,
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
}

impl Exe {
    fn probe_count(&self) -> usize {
        self.core.len() + self.growth.len() + self.access.len()
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// A watched process: its labels and budgets.
struct Attached {
    labels: ProcLabels,
    exe: ExeKey,
    growth: TokenBucket,
    access: TokenBucket,
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
    /// When the programs' costs were last refreshed from the kernel.
    costs_read: Option<Instant>,
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
        handle_sigio();
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

    /// Registers the process and, for the first process of its executable,
    /// attaches the executable's probes: GC and stop-the-world, map growth,
    /// and the access probes if they are on. Returns how many probes the
    /// executable has.
    pub fn attach(&mut self, t: Target<'_>) -> anyhow::Result<usize> {
        if self.procs.contains_key(&t.pid) {
            bail!("pid {} is watched already", t.pid);
        }
        if !self.exes.contains_key(&t.exe) {
            self.add_exe(&t)?;
        }
        let Some(exe) = self.exes.get_mut(&t.exe) else {
            bail!("executable of pid {} vanished", t.pid);
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
            return Err(e);
        }
        exe.pids.insert(t.pid);
        let now = Instant::now();
        let a = Attached {
            labels: t.labels,
            exe: t.exe,
            growth: TokenBucket::new(self.budget, now),
            access: TokenBucket::new(self.access_budget, now),
            hits: [0; PROGRAMS],
        };
        let n = exe.probe_count();
        self.procs.insert(t.pid, a);
        self.publish_exe(t.exe);
        self.publish_node();
        Ok(n)
    }

    /// Registers an executable with the kernel (id, plumbing pages) and
    /// attaches its probes; all or nothing.
    fn add_exe(&mut self, t: &Target<'_>) -> anyhow::Result<()> {
        let file = std::fs::File::open(crate::procfs::exe_path(t.pid))
            .with_context(|| format!("opening the executable of pid {}", t.pid))?;
        // The plan is for the file `t.exe`: after an exec the probes would
        // land mid-instruction in another program.
        if crate::discover::exe::ExeKey::of_file(&file).ok() != Some(t.exe) {
            return Err(crate::watch::Changed.into());
        }
        let leased = lease(&file);
        let id = (0..=u32::MAX)
            .find(|id| self.exes.values().all(|e| e.id != *id))
            .context("no free executable id")?;
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
        let mut exe = Exe {
            id,
            file,
            leased,
            pids: BTreeSet::new(),
            pages,
            core: Links::default(),
            growth: Cuttable {
                sites: t.plan.growth.clone(),
                links: None,
                cut: false,
            },
            access: Cuttable {
                sites: t.plan.access.clone(),
                links: None,
                cut: false,
            },
        };
        let path = exe.path();
        let attached = self.bpf.attach_sites(&path, &t.plan.core).and_then(|core| {
            match self.bpf.attach_sites(&path, &t.plan.growth) {
                Ok(growth) => Ok((core, growth)),
                Err(e) => {
                    self.bpf.detach_links(core);
                    Err(e)
                }
            }
        });
        match attached {
            Ok((core, growth)) => {
                exe.core = core;
                exe.growth.links = Some(growth);
            }
            Err(e) => {
                self.bpf.remove_exe(exe.id, exe.pages);
                return Err(e);
            }
        }
        if self.access_on {
            attach_access(&mut self.bpf, &mut exe);
        }
        self.exes.insert(t.exe, exe);
        Ok(())
    }

    /// Detaches an executable's probes and forgets it.
    fn drop_exe(&mut self, key: ExeKey) {
        let Some(exe) = self.exes.remove(&key) else {
            return;
        };
        let mut links = Vec::new();
        for group in [Some(exe.core), exe.growth.links, exe.access.links]
            .into_iter()
            .flatten()
        {
            links.extend(self.bpf.take_links(group));
        }
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
        let mut links = Vec::new();
        // Closed after the links: see `lease`.
        let mut files = Vec::new();
        for (_, exe) in std::mem::take(&mut self.exes) {
            for group in [Some(exe.core), exe.growth.links, exe.access.links]
                .into_iter()
                .flatten()
            {
                links.extend(self.bpf.take_links(group));
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

    /// Opens or closes a sampling window of the access probes.
    pub fn set_access(&mut self, on: bool) {
        if self.access_mode != AccessMode::Sampled {
            return;
        }
        self.access_on = on;
        let now = Instant::now();
        let keys: Vec<ExeKey> = self.exes.keys().copied().collect();
        for key in keys {
            let Some(exe) = self.exes.get_mut(&key) else {
                continue;
            };
            match (on, exe.access.links.is_some()) {
                // A window opens only while every process of the
                // executable has budget left.
                (true, false)
                    if exe.pids.iter().all(|pid| {
                        self.procs
                            .get_mut(pid)
                            .is_none_or(|a| a.access.spend(now, 0.0))
                    }) =>
                {
                    attach_access(&mut self.bpf, exe);
                }
                (false, true) => {
                    if let Some(links) = exe.access.links.take() {
                        self.bpf.detach_links(links);
                    }
                }
                _ => {}
            }
            self.publish_exe(key);
        }
        self.publish_node();
    }

    /// One check of the budget: refreshes each program's cost from the
    /// kernel's statistics (every 100 ms at most), charges each process's
    /// groups for their hits since the last check, cuts an executable's
    /// group when a process of it ran its bucket dry, and puts back a cut
    /// growth group once every process's bucket is full again. Returns when
    /// to check next: soon while probes are spending (so a group overshoots
    /// its bucket by at most one short check), at leisure otherwise.
    pub fn govern(&mut self) -> Duration {
        if LEASE_BREAK.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.yield_leases();
        }
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
        // Per executable: some process ran dry (growth, access), and every
        // process is full again (growth).
        let mut dry: BTreeMap<ExeKey, (bool, bool, bool)> = BTreeMap::new();
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
                growth_left = a.growth.tokens(),
                access_left = a.access.tokens(),
                "budget check"
            );
            let growth_left = a.growth.spend(now, spent[Group::Growth as usize]);
            let access_left = a.access.spend(now, spent[Group::Access as usize]);
            let full = a.growth.full(now);
            let e = dry.entry(a.exe).or_insert((false, false, true));
            e.0 |= !growth_left;
            e.1 |= !access_left;
            e.2 &= full;
            if a.growth.tokens() < self.budget.capacity_s() / 2.0 {
                next = next.min(BUSY_CHECK);
            }
        }
        for (key, (growth_dry, access_dry, all_full)) in dry {
            let Some(exe) = self.exes.get_mut(&key) else {
                continue;
            };
            let mut changed = false;
            // For the log lines below only (rare): no copy per check.
            let exe_name = || {
                exe.pids
                    .first()
                    .and_then(|p| self.procs.get(p))
                    .map_or("", |a| a.labels.exe.as_str())
            };
            if exe.growth.links.is_some() && growth_dry {
                if let Some(links) = exe.growth.links.take() {
                    self.bpf.detach_links(links);
                }
                exe.growth.cut = true;
                changed = true;
                tracing::warn!(
                    exe = exe_name(),
                    processes = exe.pids.len(),
                    "map growth probes spent their budget ({:.2}% of a CPU over {:?}): \
                     detached until it refills; growth counts miss that time",
                    self.budget.fraction * 100.0,
                    self.budget.window
                );
            } else if exe.growth.cut && all_full {
                match self.bpf.attach_sites(&exe.path(), &exe.growth.sites) {
                    Ok(links) => {
                        exe.growth.links = Some(links);
                        exe.growth.cut = false;
                        changed = true;
                        tracing::info!(exe = exe_name(), "map growth probes re-attached");
                    }
                    Err(e) => {
                        tracing::warn!(exe = exe_name(), "re-attaching map growth probes: {e:#}")
                    }
                }
            }
            if self.access_mode == AccessMode::Sampled && exe.access.links.is_some() {
                next = BUSY_CHECK;
                if access_dry {
                    if let Some(links) = exe.access.links.take() {
                        self.bpf.detach_links(links);
                    }
                    changed = true;
                    tracing::info!(
                        exe = exe_name(),
                        "map assignment probes spent their budget ({:.2}% of a CPU over {:?}): \
                         detached until the next window",
                        self.access_budget.fraction * 100.0,
                        self.access_budget.window
                    );
                }
            }
            if changed {
                self.publish_exe(key);
                self.publish_node();
            }
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

fn attach_access(bpf: &mut Bpf, exe: &mut Exe) {
    match bpf.attach_sites(&exe.path(), &exe.access.sites) {
        Ok(links) => exe.access.links = Some(links),
        Err(e) => tracing::warn!("attaching map assignment probes: {e:#}"),
    }
}

/// Set by SIGIO: the kernel is breaking a read lease on a probed executable
/// (someone opened it for writing); the governor then lets go of it.
static LEASE_BREAK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigio(_: libc::c_int) {
    LEASE_BREAK.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGIO tells of a lease break; its default action would end the agent.
fn handle_sigio() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an
        // atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigio as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGIO, &sa, std::ptr::null_mut()) != 0 {
                tracing::warn!("handling SIGIO: {}", std::io::Error::last_os_error());
            }
        }
    });
}

/// Takes a read lease on a probed executable. A uprobe keeps the
/// instruction it replaced, copied when it was registered, and the kernel
/// plants it in every process that maps the file later: a file rewritten in
/// place while the probes are still registered (they go one RCU grace
/// period at a time, seconds after the last process exits) would start with
/// breakpoints at the old offsets and crash. With the lease, a writer's
/// open waits until the probes are gone and the lease released.
fn lease(file: &std::fs::File) -> bool {
    // SAFETY: fcntl on a descriptor this process owns.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            // EACCES: another user's file, and no CAP_LEASE.
            let why = if err.raw_os_error() == Some(libc::EACCES) {
                "the agent lacks CAP_LEASE"
            } else {
                "a filesystem without leases?"
            };
            tracing::warn!(
                "cannot hold a lease on probed executables ({err}: {why}): an executable \
                 rewritten in place (cp over it) and started right after its last process \
                 exited may crash on the old probes; replace executables by rename (install, \
                 mv)"
            );
        }
    }
    r == 0
}

/// Whether someone waits to write the file (its lease is being broken).
fn lease_broken(file: &std::fs::File) -> bool {
    // SAFETY: fcntl on a descriptor this process owns.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) };
    r == libc::F_UNLCK
}

/// Detaches links, then closes `file` (and so releases its lease): a writer
/// waiting on the lease goes on only once every probe is gone. On a thread
/// of its own, as [`crate::bpf::drop_in_background`].
fn drop_then_close(links: Vec<aya::programs::uprobe::UProbeLink>, file: std::fs::File) {
    let work = move || {
        crate::bpf::drop_in_parallel(links);
        drop(file);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("detach".into())
        .spawn(move || {
            if let Ok(work) = rx.recv() {
                let work: Box<dyn FnOnce() + Send> = work;
                work();
            }
        });
    let work: Box<dyn FnOnce() + Send> = Box::new(work);
    match spawned {
        Ok(_) => {
            if let Err(std::sync::mpsc::SendError(work)) = tx.send(work) {
                work();
            }
        }
        // Waits, but detaches all the same.
        Err(_) => work(),
    }
}
