//! The little the agent reads from /proc about a target process.
use std::{fs, io, path::PathBuf};

/// The process's executable through /proc (works across mount namespaces
/// and after the file was replaced on disk).
pub fn exe_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/exe"))
}

/// The executable's file name, for the `exe` label.
pub fn exe_name(pid: u32) -> io::Result<String> {
    let target = fs::read_link(exe_path(pid))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(name.trim_end_matches(" (deleted)").to_owned())
}

/// Start time (field 22 of /proc/PID/stat, in clock ticks since boot): with
/// the pid it identifies a process, so pid reuse is noticed.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| io::Error::other("unparsable /proc/PID/stat"))
}

/// Whether the process is running: there, and neither a zombie nor dead.
/// After its leader's exit event, a process that is still running had a
/// thread other than the leader exec (the kernel ends the old leader then).
pub fn running(pid: u32) -> bool {
    lives(format!("/proc/{pid}/stat"))
}

/// Whether the task whose `stat` file this is runs: neither a zombie nor
/// dead (nor gone).
fn lives(stat: impl AsRef<std::path::Path>) -> bool {
    fs::read_to_string(stat)
        .ok()
        .and_then(|stat| parse_state(&stat))
        .is_some_and(|state| !matches!(state, 'Z' | 'X' | 'x'))
}

/// [`running`] once the process has settled, after its leader's exit
/// event. A thread other than the leader that runs exec waits for the old
/// leader to die and only then takes over its pid: in between the pid reads
/// as a zombie while the exec'ing thread still runs. While the leader is a
/// zombie and another thread lives, this waits (at most `SETTLE`) for the
/// pid to run again (an exec) or for every thread to end (an exit).
pub fn running_settled(pid: u32) -> bool {
    const SETTLE: std::time::Duration = std::time::Duration::from_millis(250);
    let until = std::time::Instant::now() + SETTLE;
    loop {
        if running(pid) {
            return true;
        }
        if !other_thread_lives(pid) || std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Whether a thread of the process other than its leader still lives.
fn other_thread_lives(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let leader = pid.to_string();
    tasks
        .filter_map(Result::ok)
        .any(|t| t.file_name().to_str() != Some(&leader) && lives(t.path().join("stat")))
}

fn parse_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name; starttime is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Where the process mapped its executable's file offset 0, from
/// /proc/PID/maps; minus the link-time address of offset 0 this is the load
/// bias (0 for non-PIE executables).
pub fn exe_mapping_start(pid: u32) -> io::Result<u64> {
    let exe = fs::read_link(exe_path(pid))?;
    let exe = exe.to_string_lossy();
    let exe = exe.trim_end_matches(" (deleted)");
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    parse_mapping_start(&maps, exe)
        .ok_or_else(|| io::Error::other(format!("{exe} is not mapped at offset 0")))
}

fn parse_mapping_start(maps: &str, exe: &str) -> Option<u64> {
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let range = f.next()?;
        let _perms = f.next()?;
        let offset = f.next()?;
        let _dev = f.next()?;
        let _inode = f.next()?;
        let path = f.collect::<Vec<_>>().join(" ");
        let path = path.trim_end_matches(" (deleted)");
        if path != exe || u64::from_str_radix(offset, 16).ok()? != 0 {
            return None;
        }
        u64::from_str_radix(range.split('-').next()?, 16).ok()
    })
}

/// The file offset that address `addr` of process `pid` maps, from
/// /proc/PID/maps (for a uprobe on code whose address is known).
pub fn file_offset_of(pid: u32, addr: u64) -> io::Result<u64> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    parse_file_offset(&maps, addr)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "address not in a file mapping"))
}

fn parse_file_offset(maps: &str, addr: u64) -> Option<u64> {
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let offset = u64::from_str_radix(f.nth(1)?, 16).ok()?;
        // A file mapping has a path (the 6th field).
        let path = f.nth(2)?;
        (start <= addr && addr < end && path.starts_with('/')).then(|| addr - start + offset)
    })
}

/// Reads `buf.len()` bytes of the process's memory at `addr`.
pub fn read_mem(pid: u32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: both iovecs describe valid lengths; the local one is our
    // buffer, the remote one is only read by the kernel, with checks.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    match n {
        -1 => Err(io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read")),
    }
}

/// Most pieces one `process_vm_readv` call takes (the kernel's `IOV_MAX`).
pub const MAX_PIECES: usize = 1024;

/// Reads several pieces of the process's memory in one system call: each
/// buffer is filled from its address. All or nothing: a piece that cannot
/// be read fails the whole read.
pub fn read_pieces(pid: u32, pieces: &mut [(u64, &mut [u8])]) -> io::Result<()> {
    if pieces.len() > MAX_PIECES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more pieces than one read takes",
        ));
    }
    let mut local = Vec::with_capacity(pieces.len());
    let mut remote = Vec::with_capacity(pieces.len());
    let mut want = 0usize;
    for (addr, buf) in pieces.iter_mut() {
        want += buf.len();
        local.push(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
        remote.push(libc::iovec {
            iov_base: *addr as *mut libc::c_void,
            iov_len: buf.len(),
        });
    }
    // SAFETY: each local iovec is one of our buffers with its length; the
    // remote ones are only read by the kernel, with checks. Both counts fit
    // (at most MAX_PIECES).
    let n = unsafe {
        libc::process_vm_readv(
            pid as libc::pid_t,
            local.as_ptr(),
            local.len() as libc::c_ulong,
            remote.as_ptr(),
            remote.len() as libc::c_ulong,
            0,
        )
    };
    match n {
        -1 => Err(io::Error::last_os_error()),
        n if n as usize == want => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read")),
    }
}

/// Why a process cannot be watched, from an error reading its /proc entry.
pub fn describe(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => "no such process".to_owned(),
        io::ErrorKind::PermissionDenied => {
            "permission denied reading /proc (other users' processes need CAP_SYS_PTRACE, \
             executables the agent's user cannot read CAP_DAC_READ_SEARCH)"
                .to_owned()
        }
        _ => err.to_string(),
    }
}

/// The kernel's inode number of the initial pid namespace
/// (`PROC_PID_INIT_INO`, fixed since Linux 3.8).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// Whether the agent runs in the host's (initial) pid namespace, from
/// /proc/self/ns/pid. The probes see pids of that namespace, so the agent
/// must run there (`hostPID: true`). (`NSpid` in /proc/self/status cannot
/// tell: a container's own /proc shows only its own level.)
pub fn in_host_pid_namespace() -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata("/proc/self/ns/pid")?.ino() == INIT_PID_NS_INO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "4242 (my) (weird) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_state(stat), Some('S'));
        assert_eq!(parse_state("garbage"), None);
    }

    #[test]
    fn mapping_start() {
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:00 1234 /usr/bin/app (deleted)
55d0c0100000-55d0c0200000 r-xp 00100000 fd:00 1234 /usr/bin/app (deleted)
7f0000000000-7f0000001000 r--p 00000000 fd:00 99 /lib/libc.so.6
";
        assert_eq!(
            parse_mapping_start(maps, "/usr/bin/app"),
            Some(0x55d0c0000000)
        );
        assert_eq!(parse_mapping_start(maps, "/usr/bin/other"), None);
    }

    #[test]
    fn file_offsets() {
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:00 1234 /usr/bin/app
55d0c0100000-55d0c0200000 r-xp 00100000 fd:00 1234 /usr/bin/app
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(parse_file_offset(maps, 0x55d0c0100010), Some(0x100010));
        assert_eq!(parse_file_offset(maps, 0x55d0c0000004), Some(4));
        assert_eq!(parse_file_offset(maps, 0x7ffd00000010), None);
        assert_eq!(parse_file_offset(maps, 0x10), None);
    }

    #[test]
    fn own_process() {
        let me = std::process::id();
        assert!(start_time(me).unwrap() > 0);
        assert!(running(me));
        assert!(!running(u32::MAX));
        assert!(!exe_name(me).unwrap().is_empty());
        assert!(exe_mapping_start(me).unwrap() > 0);
        let x = 0x1234_5678_u64;
        let mut buf = [0u8; 8];
        read_mem(me, &raw const x as u64, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), x);
        assert!(read_mem(me, 8, &mut buf).is_err());
        let y = [7u32, 9];
        let (mut a, mut b) = ([0u8; 8], [0u8; 4]);
        read_pieces(
            me,
            &mut [
                (&raw const x as u64, &mut a[..]),
                (&raw const y[1] as u64, &mut b[..]),
            ],
        )
        .unwrap();
        assert_eq!((u64::from_le_bytes(a), u32::from_le_bytes(b)), (x, 9));
        // One bad piece fails the read.
        assert!(
            read_pieces(
                me,
                &mut [(&raw const x as u64, &mut a[..]), (8, &mut b[..])]
            )
            .is_err()
        );
        let err = start_time(u32::MAX).unwrap_err();
        assert_eq!(describe(&err), "no such process");
    }
}
