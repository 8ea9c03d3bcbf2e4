//! At shutdown the agent hands its probes, and the leases that must outlive
//! them, to a helper process that lets go of them, so its own exit waits
//! for nothing (see [`hand_off_links`]).
use std::process::ExitCode;

use anyhow::Context as _;

/// In a helper's environment: the BPF link descriptors it inherited, to
/// close.
pub const CLOSE_LINKS: &str = "GOPULSE_CLOSE_LINKS";

/// Starts a helper holding copies of the agent's BPF links, which closes
/// them all in parallel and exits; returns its pid. The kernel removes a
/// uprobe only after an RCU grace period (seconds on a loaded host), and a
/// process cannot exit before every link it closes is removed: with the
/// helper, the agent's own closes return at once, its exit waits for
/// nothing, and the probes are gone one grace period later all the same.
pub fn hand_off_links() -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt as _;
    // The probed executables' leased files go along: they must stay
    // leased until their probes are gone (see `lease::lease`), or a
    // rewrite-and-restart right after the agent exits could run into the
    // old breakpoints.
    let (mut links, mut leased) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")? {
        let entry = entry.context("listing /proc/self/fd")?;
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if is_bpf_link(fd) {
            links.push(fd);
        } else if is_read_leased(fd) {
            leased.push(fd);
        }
    }
    if links.is_empty() {
        anyhow::bail!("no BPF links open");
    }
    let join = |fds: &[i32]| fds.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
    let list = format!("{};{}", join(&links), join(&leased));
    let fds: Vec<i32> = links.into_iter().chain(leased).collect();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.env(CLOSE_LINKS, list)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: between fork and exec only fcntl(2), which is
    // async-signal-safe, on descriptors this process holds.
    unsafe {
        cmd.pre_exec(move || {
            // A link a background detach closed meanwhile is simply not
            // passed on (the helper checks what it closes).
            for &fd in &fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                }
            }
            Ok(())
        })
    };
    let child = cmd.spawn().context("starting the helper")?;
    Ok(child.id())
}

fn is_bpf_link(fd: i32) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf_link")
}

fn is_read_leased(fd: i32) -> bool {
    super::lease::lease_of(fd) == libc::F_RDLCK
}

/// The helper of [`hand_off_links`]: closes the BPF links it names (checked
/// to be links), all at once, then the leased executables (checked to be
/// leased): "links;files", descriptors separated by commas.
pub fn close_links(fds: &str) -> ExitCode {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let (links, files) = fds.split_once(';').unwrap_or((fds, ""));
    let take = |list: &str, is: fn(i32) -> bool| -> Vec<OwnedFd> {
        list.split(',')
            .filter_map(|fd| fd.parse::<i32>().ok())
            .filter(|&fd| is(fd))
            // SAFETY: a descriptor this process inherited for this and
            // nothing else in it uses.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect()
    };
    let (links, files) = (take(links, is_bpf_link), take(files, is_read_leased));
    crate::bpf::drop_in_parallel(links);
    // Every probe is gone: a writer waiting on a lease may go on.
    drop(files);
    ExitCode::SUCCESS
}
