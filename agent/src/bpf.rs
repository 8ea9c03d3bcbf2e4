//! Loads the embedded eBPF object and attaches its probes to Go processes.
use std::{collections::BTreeMap, num::NonZeroU32, path::PathBuf};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap, RingBuf},
    programs::{UProbe, uprobe::UProbeLinkId, uprobe::UProbeScope},
};
use gopulse_common::{
    MAP_IMPL_CLASSIC, MAP_IMPL_SWISS, MapKey, MapSeen, PROBE_CLASSES, PendingStw, ProcConfig,
    ProcStats, START_ARGS_NONE, START_ARGS_WORLDSTOP,
};

use crate::inspect::{Function, GoBinary, MapImpl, MapOffsets};

pub const STOP_FN: &str = "runtime.stopTheWorldWithSema";
pub const START_FN: &str = "runtime.startTheWorldWithSema";
pub const MARK_TERM_FN: &str = "runtime.gcMarkTermination";
/// Functions the probes need in every supported release.
pub const REQUIRED_FUNCTIONS: &[&str] = &[STOP_FN, START_FN, MARK_TERM_FN];

/// Map growth: the runtime function and the program that watches it.
pub const CLASSIC_GROWTH: &[(&str, &str)] = &[("runtime.hashGrow", PROG_GROW_CLASSIC)];
pub const SWISS_GROWTH: &[(&str, &str)] = &[
    ("internal/runtime/maps.(*Map).growToSmall", PROG_GROW_SMALL),
    (
        "internal/runtime/maps.(*Map).growToTable",
        PROG_GROW_TO_TABLE,
    ),
    ("internal/runtime/maps.(*table).grow", PROG_GROW_TABLE),
    ("internal/runtime/maps.(*table).split", PROG_SPLIT_TABLE),
];
/// Go 1.25+ prunes tombstones before growing a table.
pub const SWISS_PRUNE_FN: &str = "internal/runtime/maps.(*table).pruneTombstones";

/// Map assignment and deletion: hot, attached only as `--map-assign-probes`
/// says. Any of them may be absent (the linker keeps only what is used).
pub const ASSIGN_FUNCTIONS: &[&str] = &[
    "runtime.mapassign",
    "runtime.mapassign_fast32",
    "runtime.mapassign_fast64",
    "runtime.mapassign_fast64ptr",
    "runtime.mapassign_faststr",
];
pub const DELETE_FUNCTIONS: &[&str] = &[
    "runtime.mapdelete",
    "runtime.mapdelete_fast32",
    "runtime.mapdelete_fast64",
    "runtime.mapdelete_faststr",
];

/// Classic maps' incremental evacuation (absent from swiss builds).
pub const EVACUATE_FUNCTIONS: &[&str] = &[
    "runtime.evacuate",
    "runtime.evacuate_fast32",
    "runtime.evacuate_fast64",
    "runtime.evacuate_faststr",
];

/// Every function any release may need, for [`crate::inspect::inspect`]:
/// the lists above, in one.
pub fn wanted_functions() -> Vec<&'static str> {
    let mut all = REQUIRED_FUNCTIONS.to_vec();
    for list in [CLASSIC_GROWTH, SWISS_GROWTH] {
        all.extend(list.iter().map(|(f, _)| *f));
    }
    all.push(SWISS_PRUNE_FN);
    all.extend_from_slice(ASSIGN_FUNCTIONS);
    all.extend_from_slice(DELETE_FUNCTIONS);
    all.extend_from_slice(EVACUATE_FUNCTIONS);
    all
}

const PROG_STOP: &str = "stw_stop";
const PROG_START_ENTRY: &str = "stw_start_entry";
const PROG_START_RET: &str = "stw_start_ret";
const PROG_MARK_TERM: &str = "gc_mark_termination";
const PROG_GROW_CLASSIC: &str = "grow_classic";
const PROG_GROW_SMALL: &str = "grow_small";
const PROG_GROW_TO_TABLE: &str = "grow_to_table";
const PROG_GROW_TABLE: &str = "grow_table";
const PROG_SPLIT_TABLE: &str = "split_table";
const PROG_PRUNE_TABLE: &str = "prune_table";
const PROG_MAP_ASSIGN: &str = "map_assign";
const PROG_MAP_DELETE: &str = "map_delete";
const PROG_MAP_EVACUATE: &str = "map_evacuate";
const PROGRAMS: &[&str] = &[
    PROG_STOP,
    PROG_START_ENTRY,
    PROG_START_RET,
    PROG_MARK_TERM,
    PROG_GROW_CLASSIC,
    PROG_GROW_SMALL,
    PROG_GROW_TO_TABLE,
    PROG_GROW_TABLE,
    PROG_SPLIT_TABLE,
    PROG_PRUNE_TABLE,
    PROG_MAP_ASSIGN,
    PROG_MAP_DELETE,
    PROG_MAP_EVACUATE,
];

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

/// Where an entry probe goes: on the `JBE` of the function's stack check.
/// The kernel emulates that instruction (about 0.8 µs a hit here) where the
/// first one, a CMP, is single-stepped (5-7 µs); the argument registers are
/// the same at both, and the CMP's flags tell the probe whether the function
/// is about to restart through `morestack` (so each call counts once).
pub fn entry_offset(f: &Function) -> anyhow::Result<u64> {
    f.stack_check_jump_offset().with_context(|| {
        format!(
            "{} has no stack check at its entry; refusing to place a probe that could count \
             a call twice",
            f.name
        )
    })
}

/// Whether a site is one of the map growth probes (governed separately).
pub fn is_growth(site: &ProbeSite) -> bool {
    matches!(
        site.program,
        PROG_GROW_CLASSIC
            | PROG_GROW_SMALL
            | PROG_GROW_TO_TABLE
            | PROG_GROW_TABLE
            | PROG_SPLIT_TABLE
            | PROG_PRUNE_TABLE
    )
}

/// The assignment, deletion and evacuation probes of this binary (those it
/// has).
pub fn plan_access(bin: &GoBinary) -> anyhow::Result<Vec<ProbeSite>> {
    let mut sites = Vec::new();
    for (functions, program) in [
        (ASSIGN_FUNCTIONS, PROG_MAP_ASSIGN),
        (DELETE_FUNCTIONS, PROG_MAP_DELETE),
        (EVACUATE_FUNCTIONS, PROG_MAP_EVACUATE),
    ] {
        for &function in functions {
            if let Some(f) = bin.functions.get(function) {
                sites.push(ProbeSite {
                    program,
                    function,
                    file_offset: entry_offset(f)?,
                });
            }
        }
    }
    Ok(sites)
}

/// Where each program goes in this binary, and the per-process config.
/// `load_bias` turns the binary's addresses into the process's (PIE).
pub fn plan(bin: &GoBinary, load_bias: u64) -> anyhow::Result<(Vec<ProbeSite>, ProcConfig)> {
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
            file_offset: entry_offset(mark)?,
        },
        ProbeSite {
            program: PROG_STOP,
            function: STOP_FN,
            file_offset: entry_offset(stop)?,
        },
    ];
    // 1.22+: Go's own stop time and reason; 1.21: when the restart began.
    sites.push(ProbeSite {
        program: PROG_START_ENTRY,
        function: START_FN,
        file_offset: entry_offset(start)?,
    });
    for &ret in &start.ret_offsets {
        sites.push(ProbeSite {
            program: PROG_START_RET,
            function: START_FN,
            file_offset: ret,
        });
    }
    let mut config = ProcConfig {
        start_args,
        map_impl: match bin.map_impl {
            MapImpl::Classic => MAP_IMPL_CLASSIC,
            MapImpl::Swiss => MAP_IMPL_SWISS,
        },
        ..ProcConfig::default()
    };
    if let Some(clock) = bin.pause_clock {
        config.pause_start_addr = clock.pause_start.wrapping_add(load_bias);
        config.last_gc_nanotime_addr = clock.last_gc_nanotime.wrapping_add(load_bias);
    }
    // Map growth: always attached (rare next to inserts).
    let growth: Vec<(&'static str, &'static str)> = match bin.map_impl {
        MapImpl::Classic => CLASSIC_GROWTH.to_vec(),
        MapImpl::Swiss => {
            let mut g = SWISS_GROWTH.to_vec();
            if bin.functions.contains_key(SWISS_PRUNE_FN) {
                g.push((SWISS_PRUNE_FN, PROG_PRUNE_TABLE));
            }
            g
        }
    };
    for (function, program) in growth {
        let f = bin.function(function)?;
        sites.push(ProbeSite {
            program,
            function,
            file_offset: entry_offset(f)?,
        });
    }
    match bin.offsets.map {
        MapOffsets::Classic {
            count,
            flags,
            b,
            noverflow,
            hash0,
            oldbuckets,
            maptype_bucket_size,
            ..
        } => {
            config.hmap_oldbuckets = oldbuckets;
            config.maptype_bucket_size = maptype_bucket_size;
            config.hmap_hash0 = hash0;
            config.hmap_count = count;
            config.hmap_flags = flags;
            config.hmap_b = b;
            config.hmap_noverflow = noverflow;
        }
        MapOffsets::Swiss {
            map_used,
            map_seed,
            map_dir_len,
            map_global_depth,
            table_used,
            table_capacity,
            table_growth_left,
            table_local_depth,
            ..
        } => {
            config.map_used = map_used;
            config.map_seed = map_seed;
            config.map_dir_len = map_dir_len;
            config.map_global_depth = map_global_depth;
            config.table_used = table_used;
            config.table_capacity = table_capacity;
            config.table_growth_left = table_growth_left;
            config.table_local_depth = table_local_depth;
        }
    }
    Ok((sites, config))
}

/// The loaded eBPF object.
pub struct Bpf {
    ebpf: Ebpf,
}

impl Bpf {
    /// Loads and verifies every program; returns the STW and map growth
    /// event ring buffers.
    pub fn load() -> anyhow::Result<(Self, RingBuf<MapData>, RingBuf<MapData>)> {
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
        let mut ring = |name: &str| -> anyhow::Result<RingBuf<MapData>> {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            Ok(RingBuf::try_from(map)?)
        };
        let stw = ring("STW_EVENTS")?;
        let growth = ring("GROWTH_EVENTS")?;
        Ok((Self { ebpf }, stw, growth))
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
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![ProcStats::default(); cpus])?;
        self.stats_map()?
            .insert(pid, zero, 0)
            .context("registering the process in STATS")?;
        self.hash_map::<ProcConfig>("PROCS")?
            .insert(pid, config, 0)
            .context("registering the process in PROCS")?;
        match self.attach_sites(pid, sites) {
            Ok(a) => Ok(a),
            Err(e) => {
                self.detach(pid, Attachment::default());
                Err(e)
            }
        }
    }

    /// Attaches probes to a registered process; all or nothing.
    pub fn attach_sites(&mut self, pid: u32, sites: &[ProbeSite]) -> anyhow::Result<Attachment> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
        // Attach through /proc so the right file is probed even when the
        // path is in another mount namespace or was replaced on disk.
        let target = PathBuf::from(format!("/proc/{pid}/exe"));
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
                    self.detach_links(pid, attachment);
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
        self.detach_links(pid, attachment);
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
        // Its entries in MAP_SEEN are taken, and dropped, by the next sync.
    }

    /// Detaches links, keeping the process registered.
    pub fn detach_links(&mut self, pid: u32, attachment: Attachment) {
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
    }

    /// Takes (reads and removes) what the assignment probes saw since the
    /// last call, by process: one pass over the kernel's table.
    pub fn take_seen(&mut self) -> anyhow::Result<BTreeMap<u32, Vec<(u64, MapSeen)>>> {
        let map = self
            .ebpf
            .map_mut("MAP_SEEN")
            .context("map MAP_SEEN missing from the eBPF object")?;
        let mut seen: HashMap<&mut MapData, MapKey, MapSeen> = HashMap::try_from(map)?;
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
            sum.map_growths += s.map_growths;
            sum.growth_refires += s.growth_refires;
            sum.maps_added += s.maps_added;
            sum.evacuations += s.evacuations;
            for c in 0..PROBE_CLASSES {
                sum.hits[c] += s.hits[c];
            }
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
