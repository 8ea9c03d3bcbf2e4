//! uprobe_multi links (`BPF_LINK_TYPE_UPROBE_MULTI`, Linux 6.6; its process
//! filter right since 6.10): one link puts one program at every offset of
//! an executable, and closing it removes them all after one RCU grace
//! period, where each perf-event uprobe waits out one of its own, one after
//! another under the tracing subsystem's mutex. Nor does the kernel ask for
//! CAP_SYS_ADMIN to create one, as it does for perf-event uprobes again
//! since the fix of CVE-2025-38466: CAP_BPF and CAP_PERFMON do.
//!
//! aya 0.14 has no such links, and a program must be loaded for them
//! (expected attach type `BPF_TRACE_UPROBE_MULTI`), which aya 0.14 cannot
//! ask for either. So the agent loads the uprobe programs itself, from the
//! same object, relocated by aya's own object crate against the maps aya
//! created: the same instructions, the same maps, so the same counts. (Where
//! it would go upstream: aya's `UProbe` taking an expected attach type at
//! load and an `attach_multi`, as later aya releases have.)
use std::{
    collections::{BTreeMap, HashSet},
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, anyhow, bail};
use aya::Ebpf;
use aya_obj::generated::{bpf_attach_type, bpf_insn, bpf_prog_type};

use super::sys::{self, ProgLoad, ProgStats};

/// The uprobe programs, loaded for uprobe_multi links, by name.
#[derive(Debug)]
pub struct Programs {
    progs: BTreeMap<&'static str, OwnedFd>,
}

impl Programs {
    /// Loads (and so verifies) the programs `names` of `object`, whose maps
    /// `ebpf` created (and still holds: call this before taking any out).
    /// Each load's time and verified instructions go to `note`.
    pub fn load(
        object: &[u8],
        ebpf: &Ebpf,
        names: impl IntoIterator<Item = &'static str>,
        mut note: impl FnMut(&'static str, std::time::Duration, Option<u32>),
    ) -> anyhow::Result<Self> {
        let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
        // aya would relocate field accesses against the kernel's BTF; these
        // programs have none to relocate, and this loader does not.
        if obj.has_btf_relocations() {
            bail!("the eBPF object has BTF (CO-RE) relocations, which this loader does not apply");
        }
        let maps = obj.maps.clone();
        let mut fds = Vec::new();
        for (name, map) in &maps {
            let fd = ebpf
                .map(name)
                .map(map_fd)
                .with_context(|| format!("map {name} was not created"))?;
            fds.push((name.as_str(), fd.as_raw_fd(), map));
        }
        let text_sections: HashSet<usize> = obj.functions.keys().map(|&(s, _)| s).collect();
        obj.relocate_maps(fds.into_iter(), &text_sections)
            .context("relocating the programs' maps")?;
        obj.relocate_calls(&text_sections)
            .context("relocating the programs' calls")?;
        obj.sanitize_functions(aya::features());
        let kernel_version = aya::util::KernelVersion::current()
            .map(aya::util::KernelVersion::code)
            .unwrap_or(0);
        let mut progs = BTreeMap::new();
        for name in names {
            let prog = obj
                .programs
                .get(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?;
            let function = obj
                .functions
                .get(&prog.function_key())
                .with_context(|| format!("the code of program {name} is missing"))?;
            let started = std::time::Instant::now();
            let fd = sys::prog_load(&ProgLoad {
                name,
                prog_type: bpf_prog_type::BPF_PROG_TYPE_KPROBE,
                expected_attach_type: bpf_attach_type::BPF_TRACE_UPROBE_MULTI,
                insns: &function.instructions,
                license: &prog.license,
                kernel_version: prog.kernel_version.unwrap_or(kernel_version),
            })
            .with_context(|| format!("loading program {name} for uprobe_multi links"))?;
            let insns = sys::prog_stats(fd.as_fd())
                .ok()
                .map(|s| s.verified_insns)
                .filter(|&n| n > 0);
            note(name, started.elapsed(), insns);
            progs.insert(name, fd);
        }
        Ok(Self { progs })
    }

    fn prog(&self, name: &str) -> anyhow::Result<BorrowedFd<'_>> {
        self.progs
            .get(name)
            .map(|fd| fd.as_fd())
            .with_context(|| format!("program {name} missing"))
    }

    /// One link: program `name` at every offset of `offsets` in `target`,
    /// for every process (`pid` 0) or process `pid`.
    pub fn attach(
        &self,
        name: &str,
        target: &Path,
        offsets: &[u64],
        pid: u32,
    ) -> anyhow::Result<OwnedFd> {
        let path = path_cstr(target)?;
        Ok(sys::uprobe_multi_link(
            self.prog(name)?,
            &path,
            offsets,
            pid,
        )?)
    }

    pub fn stats(&self, name: &str) -> anyhow::Result<ProgStats> {
        Ok(sys::prog_stats(self.prog(name)?)?)
    }
}

fn path_cstr(path: &Path) -> anyhow::Result<CString> {
    CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| anyhow!("{} holds a NUL byte", path.display()))
}

/// The descriptor of one of aya's maps (every kind holds a `MapData`).
fn map_fd(map: &aya::maps::Map) -> BorrowedFd<'_> {
    use aya::maps::Map::*;
    let (Array(m)
    | ArrayOfMaps(m)
    | BloomFilter(m)
    | CgroupArray(m)
    | CgroupStorage(m)
    | CgrpStorage(m)
    | CpuMap(m)
    | DevMap(m)
    | DevMapHash(m)
    | HashMap(m)
    | HashOfMaps(m)
    | InodeStorage(m)
    | LpmTrie(m)
    | LruHashMap(m)
    | PerCpuArray(m)
    | PerCpuCgroupStorage(m)
    | PerCpuHashMap(m)
    | PerCpuLruHashMap(m)
    | PerfEventArray(m)
    | ProgramArray(m)
    | Queue(m)
    | ReusePortSockArray(m)
    | RingBuf(m)
    | SockHash(m)
    | SockMap(m)
    | SkStorage(m)
    | Stack(m)
    | StackTraceMap(m)
    | Unsupported(m)
    | XskMap(m)) = map;
    m.fd().as_fd()
}

// The function the feature probe puts a uprobe on: a NOP (emulated by the
// kernel) and a return. Nothing else calls it.
core::arch::global_asm!(
    ".text",
    ".globl gopulse_multi_probe_target",
    ".type gopulse_multi_probe_target,@function",
    ".p2align 4",
    "gopulse_multi_probe_target:",
    "    nop",
    "    ret",
    ".size gopulse_multi_probe_target, .-gopulse_multi_probe_target",
);

unsafe extern "C" {
    fn gopulse_multi_probe_target();
}

/// Why uprobe_multi links are not used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(String);

/// Tries uprobe_multi links for real, once, at start-up: a program that
/// counts its runs in a map, loaded for them, linked to a function of the
/// agent's own for this process only (the pid filter), which another thread
/// of it then calls once. They are there when the count is exactly one; a
/// kernel without them (before 6.6), one whose filter tells threads rather
/// than processes apart (6.6 to 6.9: the count stays 0), a lockdown or a
/// security module that refuses them all say no here. The link is closed in
/// the background (its removal waits out a grace period).
pub fn probe() -> Result<(), Unavailable> {
    let no = |what: &str, e: &dyn std::fmt::Display| Unavailable(format!("{what}: {e}"));
    let counter = sys::counter_map().map_err(|e| no("creating an array map", &e))?;
    let insns = counter_program(counter.as_raw_fd());
    let prog = sys::prog_load(&ProgLoad {
        name: "gopulse_probe",
        prog_type: bpf_prog_type::BPF_PROG_TYPE_KPROBE,
        expected_attach_type: bpf_attach_type::BPF_TRACE_UPROBE_MULTI,
        insns: &insns,
        license: c"GPL",
        kernel_version: 0,
    })
    .map_err(|e| {
        no(
            "loading a program for uprobe_multi links (BPF_TRACE_UPROBE_MULTI)",
            &e,
        )
    })?;
    let pid = std::process::id();
    let target = gopulse_multi_probe_target as *const () as u64;
    let offset = crate::procfs::file_offset_of(pid, target)
        .map_err(|e| no("finding the probe's target in the agent's own mappings", &e))?;
    let path = c"/proc/self/exe";
    let link = sys::uprobe_multi_link(prog.as_fd(), path, &[offset], pid)
        .map_err(|e| no("creating a uprobe_multi link (BPF_LINK_CREATE)", &e))?;
    let called = std::thread::Builder::new()
        .name("multi-probe".into())
        // SAFETY: the target is a NOP and a return.
        .spawn(|| unsafe { gopulse_multi_probe_target() })
        .map_err(|e| no("starting a thread", &e))?
        .join();
    if called.is_err() {
        return Err(Unavailable("the probe's thread panicked".into()));
    }
    let count = sys::read_counter(counter.as_fd()).map_err(|e| no("reading the count", &e))?;
    super::drop_in_background(vec![super::Link::Multi(link)]);
    match count {
        1 => Ok(()),
        0 => Err(Unavailable(
            "a uprobe_multi link with a process filter did not fire in another thread of the \
             process (the filter of Linux 6.6 to 6.9 tells threads apart)"
                .into(),
        )),
        n => Err(Unavailable(format!(
            "a uprobe_multi link fired {n} times for one call"
        ))),
    }
}

/// `*counter += 1; return 0`: the value's address loaded directly
/// (`BPF_PSEUDO_MAP_VALUE`), the add atomic.
fn counter_program(map_fd: i32) -> [bpf_insn; 6] {
    const BPF_PSEUDO_MAP_VALUE: u8 = 2;
    let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| {
        // SAFETY: all-zero is a valid instruction (plain integers).
        let mut i: bpf_insn = unsafe { std::mem::zeroed() };
        i.code = code;
        i.set_dst_reg(dst);
        i.set_src_reg(src);
        i.off = off;
        i.imm = imm;
        i
    };
    [
        // r1 = &value[0] (lddw, two slots; the second's imm is the offset)
        insn(0x18, 1, BPF_PSEUDO_MAP_VALUE, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        // r2 = 1
        insn(0xb7, 2, 0, 0, 1),
        // lock *(u64 *)(r1 + 0) += r2
        insn(0xdb, 1, 2, 0, 0),
        // r0 = 0; exit
        insn(0xb7, 0, 0, 0, 0),
        insn(0x95, 0, 0, 0, 0),
    ]
}
