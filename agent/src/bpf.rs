//! Loads the embedded eBPF object and attaches its probes to Go processes.
use std::{num::NonZeroU32, path::PathBuf};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap, RingBuf},
    programs::{UProbe, uprobe::UProbeLinkId, uprobe::UProbeScope},
};
use gopulse_common::{PendingStw, ProcConfig, ProcStats, START_ARGS_NONE, START_ARGS_WORLDSTOP};

use crate::inspect::GoBinary;

pub const STOP_FN: &str = "runtime.stopTheWorldWithSema";
pub const START_FN: &str = "runtime.startTheWorldWithSema";
pub const MARK_TERM_FN: &str = "runtime.gcMarkTermination";
/// Functions the probes need in every supported release.
pub const REQUIRED_FUNCTIONS: &[&str] = &[STOP_FN, START_FN, MARK_TERM_FN];

const PROG_STOP: &str = "stw_stop";
const PROG_START_ENTRY: &str = "stw_start_entry";
const PROG_START_RET: &str = "stw_start_ret";
const PROG_MARK_TERM: &str = "gc_mark_termination";
const PROGRAMS: &[&str] = &[PROG_STOP, PROG_START_ENTRY, PROG_START_RET, PROG_MARK_TERM];

/// The links attached to one process.
#[derive(Debug, Default)]
pub struct Attachment {
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl Attachment {
    pub fn probe_count(&self) -> usize {
        self.links.len()
    }
}

/// One uprobe to attach: which program, at which file offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    pub program: &'static str,
    pub function: &'static str,
    pub file_offset: u64,
}

/// Where each program goes in this binary, and the per-process config.
pub fn plan(bin: &GoBinary) -> anyhow::Result<(Vec<ProbeSite>, ProcConfig)> {
    let stop = bin.function(STOP_FN)?;
    let start = bin.function(START_FN)?;
    let mark = bin.function(MARK_TERM_FN)?;
    // Go 1.22 added `(now int64, w worldStop)` to startTheWorldWithSema.
    let start_args = if bin.version.at_least(22) {
        START_ARGS_WORLDSTOP
    } else {
        START_ARGS_NONE
    };
    let mut sites = vec![
        ProbeSite {
            program: PROG_MARK_TERM,
            function: MARK_TERM_FN,
            file_offset: mark.file_offset,
        },
        ProbeSite {
            program: PROG_STOP,
            function: STOP_FN,
            file_offset: stop.file_offset,
        },
    ];
    if start_args == START_ARGS_WORLDSTOP {
        sites.push(ProbeSite {
            program: PROG_START_ENTRY,
            function: START_FN,
            file_offset: start.file_offset,
        });
    }
    for &ret in &start.ret_offsets {
        sites.push(ProbeSite {
            program: PROG_START_RET,
            function: START_FN,
            file_offset: ret,
        });
    }
    let config = ProcConfig {
        start_args,
        _pad: [0; 7],
    };
    Ok((sites, config))
}

/// The loaded eBPF object.
pub struct Bpf {
    ebpf: Ebpf,
}

impl Bpf {
    /// Loads and verifies every program; returns the STW event ring buffer.
    pub fn load() -> anyhow::Result<(Self, RingBuf<MapData>)> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/gopulse"
        )))
        .map_err(|e| {
            let hint = if is_root() {
                ""
            } else {
                " (loading BPF programs needs root, or CAP_BPF and CAP_PERFMON)"
            };
            anyhow!("loading the eBPF object: {e}{hint}")
        })?;
        for &name in PROGRAMS {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading program {name}"))?;
        }
        let ring = RingBuf::try_from(
            ebpf.take_map("STW_EVENTS")
                .context("map STW_EVENTS missing from the eBPF object")?,
        )?;
        Ok((Self { ebpf }, ring))
    }

    fn hash_map<V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> anyhow::Result<HashMap<&mut MapData, u32, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))?;
        Ok(HashMap::try_from(map)?)
    }

    /// Registers the process with the probes and attaches every site. On
    /// failure, whatever was attached is detached again.
    pub fn attach(
        &mut self,
        pid: u32,
        sites: &[ProbeSite],
        config: ProcConfig,
    ) -> anyhow::Result<Attachment> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
        // Attach through /proc so the right file is probed even when the
        // path is in another mount namespace or was replaced on disk.
        let target = PathBuf::from(format!("/proc/{pid}/exe"));
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![ProcStats::default(); cpus])?;
        self.stats_map()?
            .insert(pid, zero, 0)
            .context("registering the process in STATS")?;
        self.hash_map::<ProcConfig>("PROCS")?
            .insert(pid, config, 0)
            .context("registering the process in PROCS")?;
        let mut attachment = Attachment::default();
        for site in sites {
            let prog: &mut UProbe = self
                .ebpf
                .program_mut(site.program)
                .with_context(|| format!("program {} missing", site.program))?
                .try_into()?;
            match prog.attach(site.file_offset, &target, scope) {
                Ok(link) => attachment.links.push((site.program, link)),
                Err(e) => {
                    self.detach(pid, attachment);
                    bail!(
                        "attaching {} at {} (file offset {:#x}): {e}",
                        site.program,
                        site.function,
                        site.file_offset
                    );
                }
            }
        }
        Ok(attachment)
    }

    /// Detaches the process's probes and forgets its kernel state.
    pub fn detach(&mut self, pid: u32, attachment: Attachment) {
        for (program, link) in attachment.links {
            let detached = self
                .ebpf
                .program_mut(program)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
                .map(|p| p.detach(link));
            if let Some(Err(e)) = detached {
                tracing::warn!(pid, program, "detaching uprobe: {e}");
            }
        }
        // Absent entries are fine: attach may have failed half-way.
        if let Ok(mut m) = self.hash_map::<ProcConfig>("PROCS") {
            let _ = m.remove(&pid);
        }
        if let Ok(mut m) = self.stats_map() {
            let _ = m.remove(&pid);
        }
        if let Ok(mut m) = self.hash_map::<PendingStw>("PENDING") {
            let _ = m.remove(&pid);
        }
    }

    fn stats_map(&mut self) -> anyhow::Result<PerCpuHashMap<&mut MapData, u32, ProcStats>> {
        let map = self
            .ebpf
            .map_mut("STATS")
            .context("map STATS missing from the eBPF object")?;
        Ok(PerCpuHashMap::try_from(map)?)
    }

    /// The kernel-side counters of a process, summed over CPUs.
    pub fn stats(&mut self, pid: u32) -> anyhow::Result<ProcStats> {
        let per_cpu = self.stats_map()?.get(&pid, 0)?;
        Ok(per_cpu.iter().fold(ProcStats::default(), |mut sum, s| {
            sum.gc_cycles += s.gc_cycles;
            sum.events_lost += s.events_lost;
            sum.stw_unmatched += s.stw_unmatched;
            sum
        }))
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
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
