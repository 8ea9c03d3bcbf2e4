//! Read leases on probed executables, and detaching before letting go of
//! one: a file rewritten in place must not meet the old probes. Executables
//! being read hold one too (`exe_map`).
use std::os::fd::AsRawFd as _;

/// Set by SIGIO: the kernel is breaking a read lease on a probed executable
/// (someone opened it for writing); the governor then lets go of it.
pub(super) static LEASE_BREAK: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigio(_: libc::c_int) {
    LEASE_BREAK.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGIO tells of a lease break; its default action would end the agent.
pub(crate) fn handle_sigio() {
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
pub(super) fn lease(file: &std::fs::File) -> bool {
    let r = try_lease(file);
    if let Err(err) = &r {
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
    r.is_ok()
}

/// Takes a read lease on `file` (opened read-only): until it is released,
/// a writer's `open` or `truncate` of the file waits (the kernel's
/// `lease-break-time` at most, 45 s by default). SIGIO, which tells of the
/// break, is handled first.
pub(crate) fn try_lease(file: &std::fs::File) -> std::io::Result<()> {
    handle_sigio();
    // SAFETY: fcntl on a descriptor this process owns.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Releases the lease [`try_lease`] took: a waiting writer goes on.
pub(crate) fn release(file: &std::fs::File) {
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
}

/// Whether someone waits to write the file (its lease is being broken).
pub(super) fn lease_broken(file: &std::fs::File) -> bool {
    lease_of(file.as_raw_fd()) == libc::F_UNLCK
}

/// The lease a descriptor holds (`F_RDLCK`; `F_UNLCK` while it is broken,
/// or without one), or -1 if it is not a file's.
pub(super) fn lease_of(fd: std::os::fd::RawFd) -> libc::c_int {
    // SAFETY: F_GETLEASE only reads the lease state of a descriptor.
    unsafe { libc::fcntl(fd, libc::F_GETLEASE) }
}

/// Detaches links, then closes `file` (and so releases its lease): a writer
/// waiting on the lease goes on only once every probe is gone. On a thread
/// of its own, as [`crate::bpf::drop_in_background`].
pub(super) fn drop_then_close(links: Vec<crate::bpf::Link>, file: std::fs::File) {
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
