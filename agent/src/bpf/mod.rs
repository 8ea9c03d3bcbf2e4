//! The loaded eBPF object: its programs (attached and detached by the
//! attach stage) and the kernel maps, split between the stage that writes
//! them (processes and executables registered) and the collector that reads
//! them.
//!
//! Uprobes go in one of two ways, chosen once at start-up ([`UprobeMode`]):
//! uprobe_multi links (one link per program per executable, `multi`), where
//! the kernel has them, else one perf-event uprobe per site (aya's).
use std::{
    collections::BTreeMap,
    num::NonZeroU32,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
    sync::{Arc, Mutex, MutexGuard, TryLockError},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        RawTracePoint, UProbe,
        uprobe::{UProbeLink, UProbeScope},
    },
};
use gopulse_common::{
    GrowthCount, GrowthKey, MapKey, MapSeen, PROGRAMS, PageBits, PageKey, ProcConfig, ProcCpu,
    STW_PROGRAMS, SliceCount, SliceKey, SliceWindow, StwState,
};

use crate::plan::{PROGRAM_TABLE, ProbeSite};

mod multi;
mod sys;

/// The program the agent times its own uprobe traps with (does nothing).
pub const PROG_CALIBRATE: &str = "calibrate";

/// The eBPF object, built by `build.rs`.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gopulse"))
}

/// How uprobes are attached (`--uprobe-mode`, or `GOPULSE_UPROBE_MODE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UprobeMode {
    /// uprobe_multi links if the kernel gives working ones (tried at
    /// start-up), else perf-event uprobes.
    #[default]
    Auto,
    /// uprobe_multi links, or refuse to start.
    Multi,
    /// Perf-event uprobes, one per site (the fallback, forced: keeps that
    /// path tested on kernels that have multi links).
    Perf,
}

/// The environment variable that picks the [`UprobeMode`] when the flag
/// is not given (tests set it for the agents and libraries they start).
pub const UPROBE_MODE_ENV: &str = "GOPULSE_UPROBE_MODE";

impl UprobeMode {
    /// From `GOPULSE_UPROBE_MODE` (`auto`, `multi`, `perf`), else `auto`.
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var(UPROBE_MODE_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(Self::Auto),
            Ok(v) => <Self as clap::ValueEnum>::from_str(&v, true)
                .map_err(|_| anyhow!("{UPROBE_MODE_ENV}={v:?}: expected auto, multi or perf")),
            Err(e) => Err(anyhow!("{UPROBE_MODE_ENV}: {e}")),
        }
    }
}

/// The way uprobes go in, as chosen at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UprobePath {
    /// One uprobe_multi link per program per executable.
    Multi,
    /// One perf-event uprobe (and its link) per site.
    Perf,
}

impl std::fmt::Display for UprobePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Multi => "uprobe_multi links",
            Self::Perf => "perf-event uprobes",
        })
    }
}

/// One link: dropping it detaches its uprobes (one, or for a uprobe_multi
/// link every site of one program in one executable), and needs no access
/// to the programs.
#[derive(Debug)]
pub enum Link {
    Perf(UProbeLink),
    Multi(OwnedFd),
}

/// The links attached for one group of probes of one executable, taken
/// out of their programs: dropping them detaches the probes, and needs no
/// access to the programs.
#[derive(Debug, Default)]
pub struct Links {
    links: Vec<Link>,
    /// Uprobes (sites) they hold.
    probes: usize,
}

impl Links {
    /// How many uprobes (sites) the links hold.
    pub fn len(&self) -> usize {
        self.probes
    }

    pub fn is_empty(&self) -> bool {
        self.probes == 0
    }

    pub fn into_inner(self) -> Vec<Link> {
        self.links
    }

    /// Detaches the probes. Returns at once: the kernel waits out an RCU
    /// grace period for each link it removes (for each perf-event uprobe,
    /// one after another), so the links are dropped on threads of their
    /// own, all at once, and nothing waits for them.
    pub fn detach(self) {
        drop_in_background(self.links);
    }
}

/// A process's counters, from both kernel maps that keep them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub gc_cycles: u64,
    pub stw_unmatched: u64,
    pub map_growths: u64,
    pub growths_unattributed: u64,
    /// Hits by program (`PROG_*`).
    pub hits: [u64; PROGRAMS],
    pub maps_added: u64,
    pub evacuations: u64,
    pub growth_refires: u64,
    pub sites_outermost: u64,
    /// Anomalies the probes met (`gopulse_bpf_anomalies_total{kind}`):
    /// user reads that failed, and headers the runtime cannot have made.
    /// (The third kind, restarts without a stop, is `stw_unmatched`.)
    pub read_failed: u64,
    pub map_layout: u64,
    /// Slice growths counted, and those without a site (the kernel's
    /// slice table was full).
    pub slice_growths: u64,
    pub slices_unattributed: u64,
}

/// Handles on the two maps processes are registered in, for reading their
/// counters. The attach stage and the collector each have their own, so
/// neither waits for the other.
pub struct ProcMaps {
    pub procs: PerCpuHashMap<MapData, u32, ProcCpu>,
    pub stw: HashMap<MapData, u32, StwState>,
}

impl ProcMaps {
    /// A process's counters: the map probes' summed over CPUs, and the
    /// stop-the-world probes'.
    pub fn counters(&self, pid: u32) -> anyhow::Result<Counters> {
        let per_cpu = self.procs.get(&pid, 0)?;
        let stw = self.stw.get(&pid, 0)?;
        let mut c = Counters {
            gc_cycles: stw.gc_cycles,
            stw_unmatched: stw.stw_unmatched,
            read_failed: stw.read_failed,
            ..Counters::default()
        };
        for s in per_cpu.iter().map(|p| p.stats) {
            c.map_growths += s.map_growths;
            c.growths_unattributed += s.growths_unattributed;
            c.maps_added += s.maps_added;
            c.evacuations += s.evacuations;
            c.growth_refires += s.growth_refires;
            c.sites_outermost += s.sites_outermost;
            c.read_failed += s.read_failed;
            c.map_layout += s.map_layout;
            c.slice_growths += s.slice_growths;
            c.slices_unattributed += s.slices_unattributed;
            for (t, h) in c.hits.iter_mut().zip(s.hits) {
                *t += h;
            }
        }
        for (t, h) in c.hits.iter_mut().zip(stw.hits).take(STW_PROGRAMS) {
            *t += h;
        }
        Ok(c)
    }
}

/// The kernel maps the collector reads.
pub struct CollectorMaps {
    /// Processes' counters.
    pub procs: ProcMaps,
    /// Map growths per (process, kind, site).
    pub growths: HashMap<MapData, GrowthKey, GrowthCount>,
    /// What the assignment probes saw.
    pub seen: HashMap<MapData, MapKey, MapSeen>,
    /// Slice growths per (process, site).
    pub slices: HashMap<MapData, SliceKey, SliceCount>,
    /// Completed GC cycles (`GcCycle` records).
    pub gc_ring: RingBuf<MapData>,
}

/// The exec and exit events discovery reads.
pub struct LifeMaps {
    pub ring: RingBuf<MapData>,
    /// Events the ring had no room for, per CPU.
    pub lost: PerCpuArray<MapData, u64>,
}

/// Loads (and so verifies) one program of the object, as its type.
type LoadFn = fn(&mut aya::programs::Program) -> Result<(), aya::programs::ProgramError>;

/// The raw tracepoint programs and the kernel tracepoints they go on.
const LIFE_PROGRAMS: [(&str, &str); 2] = [
    ("on_exec", "sched_process_exec"),
    ("on_exit", "sched_process_exit"),
];

/// The programs, behind a lock of their own for the perf-event path:
/// attaching a perf-event uprobe can wait seconds in the kernel (behind its
/// queue of uprobe removals), and aya attaches through the program, so the
/// attach stage's bookkeeping, exits and budget checks must not wait with
/// it. Only attaching and reading the programs' statistics take the lock.
/// The uprobe_multi programs need none: a link is made from the program's
/// descriptor.
#[derive(Clone, Debug)]
pub struct Attacher {
    ebpf: Arc<Mutex<Ebpf>>,
    multi: Option<Arc<multi::Programs>>,
}

/// The programs (to attach) and the maps processes and executables are
/// registered in.
pub struct Bpf {
    attacher: Attacher,
    procs: ProcMaps,
    /// Executables' plumbing pages, for the site walk.
    plumbing: HashMap<MapData, PageKey, PageBits>,
    /// When each executable's slice growth probe counts.
    slice_windows: Array<MapData, SliceWindow>,
    cpus: usize,
}

impl Bpf {
    /// Loads and verifies every program, the uprobe programs for the path
    /// `mode` picks (see [`UprobeMode`]; `auto` tries uprobe_multi links
    /// first, for real).
    /// The per-process maps are sized for `max_processes` (PROCS holds a
    /// copy per CPU: a few hundred bytes × CPUs × processes). With
    /// `debug`, the programs log each anomaly through aya-log, forwarded
    /// to tracing; without, the verifier drops their logging code.
    pub fn load(
        max_processes: u32,
        debug: bool,
        mode: UprobeMode,
    ) -> anyhow::Result<(Self, CollectorMaps, LifeMaps)> {
        raise_memlock_limit();
        // aya-log's level global is read-only data the kernel freezes: at 0
        // the verifier knows every log statement's test fails and removes
        // the branch, so the programs cost what they would without logging.
        let level: u8 = if debug { BPF_LOG_LEVEL } else { 0 };
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries("PROCS", max_processes)
            .map_max_entries("STW", max_processes)
            .map_max_entries("SLICE_WINDOWS", max_processes)
            .override_global(aya_log::LEVEL, &level, true)
            .load(object())
            .map_err(|e| {
                anyhow!(
                    "loading the eBPF object: {e}{}",
                    crate::caps::bpf_load_hint()
                )
            })?;
        // Verification dominates start-up on older kernels (6.1's verifier
        // walks our programs far longer than 6.12's): say what it took.
        let mut verified = Verified::default();
        let uprobe_names = || PROGRAM_TABLE.iter().map(|p| p.name).chain([PROG_CALIBRATE]);
        let multi = match mode {
            UprobeMode::Perf => {
                tracing::info!("uprobes: {} (--uprobe-mode perf)", UprobePath::Perf);
                None
            }
            UprobeMode::Auto | UprobeMode::Multi => {
                // A kernel without the links says so at the probe (info); one
                // that has them but refuses our programs for them is a fault
                // to look into (warn). Either way the fallback takes over.
                let probed = multi::probe();
                let loaded = probed.as_ref().map_err(|e| anyhow!("{e}")).and_then(|()| {
                    multi::Programs::load(object(), &ebpf, uprobe_names(), |n, t, i| {
                        verified.note(n, t, i);
                    })
                });
                match loaded {
                    Ok(p) => {
                        tracing::info!(
                            "uprobes: {} (one link per program per executable)",
                            UprobePath::Multi
                        );
                        Some(Arc::new(p))
                    }
                    Err(e) if mode == UprobeMode::Multi => {
                        return Err(
                            e.context("--uprobe-mode multi: uprobe_multi links are not available")
                        );
                    }
                    Err(e) if probed.is_ok() => {
                        tracing::warn!(
                            "uprobes: {} (the kernel has uprobe_multi links, but loading the \
                             programs for them failed: {e:#})",
                            UprobePath::Perf
                        );
                        verified = Verified::default();
                        None
                    }
                    Err(e) => {
                        tracing::info!(
                            "uprobes: {} (uprobe_multi links are not available: {e:#})",
                            UprobePath::Perf
                        );
                        verified = Verified::default();
                        None
                    }
                }
            }
        };
        let uprobe = |p: &mut aya::programs::Program| <&mut UProbe>::try_from(p)?.load();
        let raw_tp = |p: &mut aya::programs::Program| <&mut RawTracePoint>::try_from(p)?.load();
        let uprobes = uprobe_names()
            .filter(|_| multi.is_none())
            .map(|name| (name, uprobe as LoadFn));
        let lifecycle = LIFE_PROGRAMS
            .iter()
            .map(|&(name, _)| (name, raw_tp as LoadFn));
        for (name, load) in uprobes.chain(lifecycle) {
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?;
            let started = std::time::Instant::now();
            load(prog).with_context(|| {
                format!("loading program {name}{}", crate::caps::bpf_load_hint())
            })?;
            let insns = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count());
            verified.note(name, started.elapsed(), insns);
        }
        verified.log();
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        // Two handles on each map processes are registered in: this stage
        // registers them, the collector reads their counters, and neither
        // waits for the other.
        let procs = take("PROCS")?;
        let stw = take("STW")?;
        let (aya::maps::Map::PerCpuHashMap(p), aya::maps::Map::HashMap(s)) = (&procs, &stw) else {
            bail!("maps PROCS and STW are not of the expected types");
        };
        let second = ProcMaps {
            procs: PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(MapData::from_fd(dup(
                p.fd().as_fd(),
            )?)?))?,
            stw: HashMap::try_from(aya::maps::Map::HashMap(MapData::from_fd(dup(s
                .fd()
                .as_fd())?)?))?,
        };
        let first = ProcMaps {
            procs: PerCpuHashMap::try_from(procs)?,
            stw: HashMap::try_from(stw)?,
        };
        let collector = CollectorMaps {
            procs: second,
            growths: HashMap::try_from(take("GROWTHS")?)?,
            seen: HashMap::try_from(take("MAP_SEEN")?)?,
            slices: HashMap::try_from(take("SLICES")?)?,
            gc_ring: RingBuf::try_from(take("GC_RING")?)?,
        };
        let life = LifeMaps {
            ring: RingBuf::try_from(take("LIFE")?)?,
            lost: PerCpuArray::try_from(take("LIFE_LOST")?)?,
        };
        let plumbing = HashMap::try_from(take("PLUMBING")?)?;
        let slice_windows = Array::try_from(take("SLICE_WINDOWS")?)?;
        if debug {
            start_bpf_log(&mut ebpf)?;
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        Ok((
            Self {
                attacher: Attacher {
                    ebpf: Arc::new(Mutex::new(ebpf)),
                    multi,
                },
                procs: first,
                plumbing,
                slice_windows,
                cpus,
            },
            collector,
            life,
        ))
    }

    /// Registers a process with the probes (config, zeroed counters, an
    /// idle stop-the-world state), before any of its probes is attached.
    pub fn register(&mut self, pid: u32, config: ProcConfig, stw: StwState) -> anyhow::Result<()> {
        let cpu = ProcCpu {
            config,
            ..ProcCpu::default()
        };
        let per_cpu = aya::maps::PerCpuValues::try_from(vec![cpu; self.cpus])?;
        self.procs
            .stw
            .insert(pid, stw, 0)
            .context("registering the process in STW")?;
        self.procs
            .procs
            .insert(pid, per_cpu, 0)
            .context("registering the process in PROCS")?;
        Ok(())
    }

    /// Forgets a process's kernel state (its probes are detached).
    pub fn unregister(&mut self, pid: u32) {
        // Absent entries are fine: registration may have failed half-way.
        let _ = self.procs.procs.remove(&pid);
        let _ = self.procs.stw.remove(&pid);
    }

    /// Gives the probes an executable's plumbing pages; all or nothing.
    pub fn set_exe(&mut self, id: u32, pages: &BTreeMap<u32, PageBits>) -> anyhow::Result<()> {
        let mut done = Vec::new();
        for (&page, bits) in pages {
            let key = PageKey { exe_id: id, page };
            if let Err(e) = self.plumbing.insert(key, *bits, 0) {
                for k in done {
                    let _ = self.plumbing.remove(&k);
                }
                return Err(anyhow!("registering the executable's plumbing pages: {e}"));
            }
            done.push(key);
        }
        Ok(())
    }

    pub fn remove_exe(&mut self, id: u32, pages: impl IntoIterator<Item = u32>) {
        for page in pages {
            let _ = self.plumbing.remove(&PageKey { exe_id: id, page });
        }
    }

    /// Sets when an executable's slice growth probe counts.
    pub fn set_slice_window(&mut self, id: u32, w: SliceWindow) -> anyhow::Result<()> {
        self.slice_windows
            .set(id, w, 0)
            .context("setting the slice growth window")
    }

    /// A process's counters.
    pub fn counters(&self, pid: u32) -> anyhow::Result<Counters> {
        self.procs.counters(pid)
    }

    /// The programs, to attach (off the attach stage's lock).
    pub fn attacher(&self) -> Attacher {
        self.attacher.clone()
    }
}

impl Attacher {
    fn programs(&self) -> MutexGuard<'_, Ebpf> {
        crate::server::lock(&self.ebpf)
    }

    /// The way uprobes go in.
    pub fn path(&self) -> UprobePath {
        if self.multi.is_some() {
            UprobePath::Multi
        } else {
            UprobePath::Perf
        }
    }

    /// Turns on the lifecycle events: exits of watched processes, and with
    /// `execs` every exec on the host. They stay on while the agent runs.
    pub fn attach_lifecycle(&self, execs: bool) -> anyhow::Result<()> {
        let mut ebpf = self.programs();
        for (name, tracepoint) in LIFE_PROGRAMS {
            if name == "on_exec" && !execs {
                continue;
            }
            let prog: &mut RawTracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            prog.attach(tracepoint)
                .with_context(|| format!("attaching {name} to the {tracepoint} tracepoint"))?;
        }
        Ok(())
    }

    /// Attaches probes to an executable, for every process that runs it
    /// (the programs tell watched processes apart by pid); all or nothing.
    /// `target` is a path to the file (through /proc, so the right file is
    /// probed even when its path is in another mount namespace or was
    /// replaced on disk). With uprobe_multi links, one link per program.
    pub fn attach_sites(&self, target: &Path, sites: &[ProbeSite]) -> anyhow::Result<Links> {
        let mut links = Links::default();
        let Some(multi) = &self.multi else {
            for site in sites {
                let name = PROGRAM_TABLE[site.program].name;
                let attached = attach(
                    &mut self.programs(),
                    name,
                    target,
                    site.file_offset,
                    UProbeScope::AllProcesses,
                );
                match attached {
                    Ok(link) => {
                        links.links.push(Link::Perf(link));
                        links.probes += 1;
                    }
                    Err(e) => {
                        links.detach();
                        bail!(
                            "attaching {name} at {} (file offset {:#x}): {e:#}{}",
                            site.function,
                            site.file_offset,
                            crate::caps::uprobe_hint(&e)
                        );
                    }
                }
            }
            return Ok(links);
        };
        let mut by_program: BTreeMap<usize, Vec<&ProbeSite>> = BTreeMap::new();
        for site in sites {
            by_program.entry(site.program).or_default().push(site);
        }
        for (program, sites) in by_program {
            let name = PROGRAM_TABLE[program].name;
            let offsets: Vec<u64> = sites.iter().map(|s| s.file_offset).collect();
            match multi.attach(name, target, &offsets, 0) {
                Ok(link) => {
                    links.links.push(Link::Multi(link));
                    links.probes += offsets.len();
                }
                Err(e) => {
                    links.detach();
                    let at: Vec<String> = sites
                        .iter()
                        .map(|s| format!("{} (file offset {:#x})", s.function, s.file_offset))
                        .collect();
                    bail!(
                        "attaching {name} at {} with a uprobe_multi link: {e:#}",
                        at.join(", ")
                    );
                }
            }
        }
        Ok(links)
    }

    /// Attaches one program at a file offset of `target` for process `pid`.
    pub fn attach_one(
        &self,
        program: &str,
        target: &Path,
        file_offset: u64,
        pid: u32,
    ) -> anyhow::Result<Link> {
        if let Some(multi) = &self.multi {
            return Ok(Link::Multi(multi.attach(
                program,
                target,
                &[file_offset],
                pid,
            )?));
        }
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
        attach(&mut self.programs(), program, target, file_offset, scope).map(Link::Perf)
    }

    /// The kernel's run-time statistics of a program (total run time and
    /// runs; both 0 unless statistics are enabled).
    pub fn program_stats(&self, name: &str) -> anyhow::Result<(Duration, u64)> {
        if let Some(multi) = &self.multi {
            let s = multi.stats(name)?;
            return Ok((s.run_time, s.runs));
        }
        stats(&mut self.programs(), name)
    }

    /// [`Attacher::program_stats`] of every program, by `PROG_*`; none
    /// while an attach holds the programs (the budget check that asks must
    /// not wait for the kernel: it keeps the costs it has).
    pub fn all_program_stats(&self) -> Option<[Option<(Duration, u64)>; PROGRAMS]> {
        if self.multi.is_some() {
            return Some(std::array::from_fn(|i| {
                self.program_stats(PROGRAM_TABLE[i].name).ok()
            }));
        }
        let mut ebpf = match self.ebpf.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(std::array::from_fn(|i| {
            stats(&mut ebpf, PROGRAM_TABLE[i].name).ok()
        }))
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()?)
}

/// Attaches a program and takes its link out of it (so that dropping the
/// link later needs no access to the programs).
fn attach(
    ebpf: &mut Ebpf,
    name: &str,
    target: &Path,
    file_offset: u64,
    scope: UProbeScope,
) -> anyhow::Result<UProbeLink> {
    let prog = uprobe(ebpf, name)?;
    let id = prog.attach(file_offset, target, scope)?;
    Ok(prog.take_link(id)?)
}

fn stats(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<(Duration, u64)> {
    let info = uprobe(ebpf, name)?.info()?;
    Ok((info.run_time(), info.run_count()))
}

/// How long the kernel took to verify and load each program, and how many
/// instructions its verifier walked (5.16+).
#[derive(Default)]
struct Verified {
    total: std::time::Duration,
    insns: u64,
    programs: usize,
    slowest: Option<(&'static str, std::time::Duration)>,
}

impl Verified {
    fn note(&mut self, name: &'static str, took: std::time::Duration, insns: Option<u32>) {
        tracing::debug!(
            program = name,
            took_ms = took.as_secs_f64() * 1e3,
            verified_insns = insns,
            "BPF program loaded"
        );
        self.total += took;
        self.insns += u64::from(insns.unwrap_or(0));
        self.programs += 1;
        if self.slowest.is_none_or(|(_, t)| took > t) {
            self.slowest = Some((name, took));
        }
    }

    fn log(&self) {
        let (name, took) = self.slowest.unwrap_or(("-", std::time::Duration::ZERO));
        tracing::info!(
            programs = self.programs,
            verified_insns = self.insns,
            "loaded {} BPF programs in {:.0} ms (the verifier walked {} instructions; slowest {name}, {:.0} ms)",
            self.programs,
            self.total.as_secs_f64() * 1e3,
            self.insns,
            took.as_secs_f64() * 1e3,
        );
    }
}

/// aya-log's `Level::Warn`: the programs log anomalies at warn.
const BPF_LOG_LEVEL: u8 = 2;

/// The programs' log records, as tracing events (target
/// `gopulse_agent::bpf_log`).
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "gopulse_agent::bpf_log", "bpf: {msg}"),
            log::Level::Warn => tracing::warn!(target: "gopulse_agent::bpf_log", "bpf: {msg}"),
            log::Level::Info => tracing::info!(target: "gopulse_agent::bpf_log", "bpf: {msg}"),
            log::Level::Debug => tracing::debug!(target: "gopulse_agent::bpf_log", "bpf: {msg}"),
            log::Level::Trace => tracing::trace!(target: "gopulse_agent::bpf_log", "bpf: {msg}"),
        }
    }

    fn flush(&self) {}
}

/// Reads the programs' log ring on a thread of its own for as long as the
/// agent runs (the ring is only written with `--bpf-debug`).
fn start_bpf_log(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut logger = aya_log::EbpfLogger::init_with_logger(ebpf, TracingLog)
        .context("starting the BPF programs' log (aya-log)")?;
    std::thread::Builder::new()
        .name("bpf-log".into())
        .spawn(move || {
            loop {
                let mut fd = libc::pollfd {
                    fd: logger.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd. Woken when records arrive; the
                // timeout only bounds a missed wakeup.
                let n = unsafe { libc::poll(&mut fd, 1, 1000) };
                if n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    tracing::warn!("polling the BPF log: {}", std::io::Error::last_os_error());
                    return;
                }
                logger.flush();
            }
        })
        .context("starting the BPF log thread")?;
    tracing::info!("BPF-side anomaly logging on (--bpf-debug)");
    Ok(())
}

/// Drops links on threads of their own, in parallel, without waiting (see
/// [`Links::detach`]).
pub fn drop_in_background(links: Vec<Link>) {
    if links.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("detach".into())
        .spawn(move || drop_in_parallel(links));
    if let Err(e) = spawned {
        // Dropping them here waits, but detaches them all the same.
        tracing::debug!("detaching uprobes in the background: {e}");
    }
}

/// Drops links (or their descriptors) in parallel and returns when all are
/// detached: their RCU grace periods overlap instead of adding up.
pub fn drop_in_parallel<L: Send>(links: Vec<L>) {
    std::thread::scope(|s| {
        for link in links {
            s.spawn(move || drop(link));
        }
    });
}

fn dup(fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<OwnedFd> {
    fd.try_clone_to_owned().context("duplicating a map fd")
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels with memcg accounting");
    }
}
