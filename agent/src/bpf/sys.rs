//! The few bpf(2) commands aya 0.14 does not offer, behind safe functions:
//! loading a uprobe program for uprobe_multi links, creating such a link,
//! reading a program's run-time statistics, and the array map the feature
//! probe counts in. The structures are the kernel's UAPI (`union bpf_attr`,
//! `struct bpf_prog_info`, include/uapi/linux/bpf.h) as aya-obj's bindings
//! spell them; the kernel takes a larger `bpf_attr` than it knows as long as
//! the bytes it does not know are zero, so the newest layout works on every
//! kernel.
use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    time::Duration,
};

use aya_obj::generated::{
    bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_map_type, bpf_prog_info, bpf_prog_type,
};

/// bpf(2); the fd or value it returns.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` of the size
    // passed; every pointer in it (set by the callers below) points to
    // memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// bpf(2) for a command that returns a new descriptor.
fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned no descriptor"))?;
    // SAFETY: the kernel just returned this descriptor to us, and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: all-zero is a valid `bpf_attr` (plain integers), and the
    // kernel requires unused bytes to be zero.
    unsafe { std::mem::zeroed() }
}

/// A program to load.
pub struct ProgLoad<'a> {
    pub name: &'a str,
    pub prog_type: bpf_prog_type,
    pub expected_attach_type: bpf_attach_type,
    pub insns: &'a [bpf_insn],
    pub license: &'a CStr,
    pub kernel_version: u32,
}

/// Why the kernel refused a program: its error, and the verifier's log
/// (empty unless it wrote one).
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", if log.is_empty() { String::new() } else { format!("; verifier log (end): {log}") })]
pub struct LoadError {
    pub error: io::Error,
    pub log: String,
}

/// How much of the verifier's log a refusal keeps (its end says why).
const LOG_TAIL: usize = 2048;

/// BPF_PROG_LOAD. A refusal is retried once with the verifier's log on, to
/// say why.
pub fn prog_load(p: &ProgLoad<'_>) -> Result<OwnedFd, LoadError> {
    let load = |log: Option<&mut Vec<u8>>| {
        let mut attr = zeroed_attr();
        // SAFETY: writing the `BPF_PROG_LOAD` member of the union.
        let a = unsafe { &mut attr.__bindgen_anon_3 };
        a.prog_type = p.prog_type as u32;
        a.expected_attach_type = p.expected_attach_type as u32;
        a.insns = p.insns.as_ptr() as u64;
        a.insn_cnt = u32::try_from(p.insns.len()).unwrap_or(u32::MAX);
        a.license = p.license.as_ptr() as u64;
        a.kern_version = p.kernel_version;
        // The kernel keeps 15 bytes of the name (and a NUL).
        for (d, s) in a.prog_name.iter_mut().zip(p.name.bytes().take(15)) {
            *d = s as libc::c_char;
        }
        if let Some(buf) = log {
            a.log_level = 1;
            a.log_buf = buf.as_mut_ptr() as u64;
            a.log_size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        }
        bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    match load(None) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            let mut buf = vec![0u8; 4 << 20];
            let _ = load(Some(&mut buf));
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            let text = String::from_utf8_lossy(&buf[..end]);
            let text = text.trim_end();
            let from = text.len().saturating_sub(LOG_TAIL);
            let from = (from..=text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len());
            Err(LoadError {
                error,
                log: text[from..].to_owned(),
            })
        }
    }
}

/// BPF_LINK_CREATE of a uprobe_multi link (Linux 6.6+): `prog` at every
/// offset of `offsets` in the file at `path`, for every process (`pid` 0)
/// or the process `pid`. Closing the link removes them all, after one RCU
/// grace period for the whole link.
pub fn uprobe_multi_link(
    prog: BorrowedFd<'_>,
    path: &CStr,
    offsets: &[u64],
    pid: u32,
) -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    // SAFETY: writing the `BPF_LINK_CREATE` member of the union.
    let l = unsafe { &mut attr.link_create };
    l.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    l.attach_type = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32;
    // SAFETY: writing the uprobe_multi member of the link's union.
    let u = unsafe { &mut l.__bindgen_anon_3.uprobe_multi };
    u.path = path.as_ptr() as u64;
    u.offsets = offsets.as_ptr() as u64;
    u.cnt = u32::try_from(offsets.len()).map_err(|_| io::Error::other("too many offsets"))?;
    u.pid = pid;
    bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}

/// What the kernel says of a loaded program.
#[derive(Clone, Copy, Debug)]
pub struct ProgStats {
    /// Total run time and runs (both 0 unless the kernel's statistics are
    /// on).
    pub run_time: Duration,
    pub runs: u64,
    /// Instructions the verifier walked (5.16+; 0 before).
    pub verified_insns: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD of a program.
pub fn prog_stats(prog: BorrowedFd<'_>) -> io::Result<ProgStats> {
    // SAFETY: all-zero is a valid `bpf_prog_info`; the kernel fills what it
    // knows and leaves pointers it finds zero alone.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    // SAFETY: writing the `BPF_OBJ_GET_INFO_BY_FD` member of the union.
    let i = unsafe { &mut attr.info };
    i.bpf_fd = prog.as_raw_fd() as u32;
    i.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    i.info = std::ptr::from_mut(&mut info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(ProgStats {
        run_time: Duration::from_nanos(info.run_time_ns),
        runs: info.run_cnt,
        verified_insns: info.verified_insns,
    })
}

/// BPF_MAP_CREATE of an array of one u64.
pub fn counter_map() -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    // SAFETY: writing the `BPF_MAP_CREATE` member of the union.
    let m = unsafe { &mut attr.__bindgen_anon_1 };
    m.map_type = bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
    m.key_size = 4;
    m.value_size = 8;
    m.max_entries = 1;
    bpf_fd(bpf_cmd::BPF_MAP_CREATE, &mut attr)
}

/// The u64 in a [`counter_map`].
pub fn read_counter(map: BorrowedFd<'_>) -> io::Result<u64> {
    let key = 0u32;
    let mut value = 0u64;
    let mut attr = zeroed_attr();
    // SAFETY: writing the `BPF_MAP_LOOKUP_ELEM` member of the union.
    let e = unsafe { &mut attr.__bindgen_anon_2 };
    e.map_fd = map.as_raw_fd() as u32;
    e.key = std::ptr::from_ref(&key) as u64;
    e.__bindgen_anon_1.value = std::ptr::from_mut(&mut value) as u64;
    bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}
