//! Executables mapped for reading (issue 18): a 185 MB Go binary is read
//! through its pages in the page cache, not copied onto the heap, so
//! reading one costs the agent no anonymous memory in proportion to it.
//!
//! A mapped file that shrinks raises SIGBUS at the next touch of a page
//! past its new end, which would end the agent. A running program's file
//! cannot be written (ETXTBSY), but its last process may exit while the
//! agent reads it, and `cp` may then truncate it. So, while it is mapped:
//!
//! - the descriptor holds a read lease (as probed executables do,
//!   `probes/lease.rs`): a writer's `open` or `truncate` waits until the
//!   lease is released, so the bytes stay as they were for the parser;
//! - where no lease can be had (another user's file without `CAP_LEASE`, a
//!   filesystem without leases) or the kernel broke it (a read longer than
//!   its `lease-break-time`, 45 s by default), a SIGBUS on a page of the
//!   mapping is caught: the page is replaced by zeros, the read is marked
//!   torn and its result thrown away. A write that does not shrink the file
//!   shows in its stamp (mtime, ctime), which the reader checks after.
//!
//! Copying only the sections needed into bounded buffers was the other
//! way; but the symbolizer walks all of pclntab (62 MB in Traefik 3.7), so
//! it would have meant a parser over reads rather than over bytes, and the
//! fuzzed parser works on bytes.
use std::{
    fs::File,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use crate::{inspect::Image, probes::lease};

/// At most this many executables are mapped at once (the agent reads them
/// one at a time, on the discovery thread, and at start-up).
const SLOTS: usize = 8;

/// A mapping SIGBUS is caught on: `[start, end)`, and whether a page of it
/// went missing.
struct Slot {
    taken: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    torn: AtomicBool,
}

static GUARDED: [Slot; SLOTS] = [const {
    Slot {
        taken: AtomicBool::new(false),
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        torn: AtomicBool::new(false),
    }
}; SLOTS];

static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// An executable mapped for reading, under a lease and the SIGBUS guard.
pub struct Mapped<'f> {
    file: &'f File,
    image: Option<Image>,
    slot: Option<usize>,
    leased: bool,
}

impl<'f> Mapped<'f> {
    /// Maps `file` (opened read-only) under a read lease, if one can be had.
    pub fn new(file: &'f File) -> std::io::Result<Self> {
        Self::with(file, true)
    }

    fn with(file: &'f File, lease: bool) -> std::io::Result<Self> {
        install_guard();
        let leased = lease && lease::try_lease(file).is_ok();
        let mut mapped = Self {
            file,
            image: None,
            slot: None,
            leased,
        };
        // SAFETY: while the image lives, a writer waits on the lease, and a
        // truncation without one turns into zeroed pages (the guard, taken
        // below before any page is touched; Drop lets go of it first).
        let image = unsafe { Image::map(file) }?;
        let bytes = image.bytes();
        let (start, len) = (bytes.as_ptr() as usize, bytes.len());
        mapped.image = Some(image);
        mapped.slot = guard(start, start.saturating_add(len));
        if mapped.slot.is_none() && !leased {
            return Err(std::io::Error::other(
                "more executables mapped at once than the SIGBUS guard covers",
            ));
        }
        Ok(mapped)
    }

    pub fn bytes(&self) -> &[u8] {
        self.image.as_ref().map_or(&[], Image::bytes)
    }

    /// Whether a page went missing while mapped (the file was truncated):
    /// its bytes read as zeros, so whatever was made of them is wrong.
    pub fn torn(&self) -> bool {
        self.slot
            .is_some_and(|i| GUARDED[i].torn.load(Ordering::Acquire))
    }
}

impl AsRef<[u8]> for Mapped<'_> {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl Drop for Mapped<'_> {
    fn drop(&mut self) {
        // The guard goes before the mapping, so that it never covers an
        // address something else is mapped at; nothing reads in between.
        if let Some(i) = self.slot.take() {
            let slot = &GUARDED[i];
            slot.end.store(0, Ordering::Release);
            slot.start.store(0, Ordering::Release);
            slot.taken.store(false, Ordering::Release);
        }
        drop(self.image.take());
        if self.leased {
            lease::release(self.file);
        }
    }
}

/// Takes a slot for `[start, end)`.
fn guard(start: usize, end: usize) -> Option<usize> {
    let i = GUARDED.iter().position(|s| {
        s.taken
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })?;
    let slot = &GUARDED[i];
    slot.torn.store(false, Ordering::Release);
    slot.start.store(start, Ordering::Release);
    slot.end.store(end, Ordering::Release);
    Some(i)
}

fn install_guard() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sysconf only reads; a zeroed sigaction is valid, and the
        // handler does only async-signal-safe things (atomics, mmap).
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if let Ok(page) = usize::try_from(page)
                && page.is_power_of_two()
            {
                PAGE.store(page, Ordering::Relaxed);
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    "handling SIGBUS: {}; an executable truncated while it is read ends the agent",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// A page of a guarded mapping past the end of its file: map zeros there
/// (the faulting read then goes on and reads them) and mark the mapping
/// torn. Any other SIGBUS is a fault of the agent's own: the default
/// action, when the fault recurs on return.
extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for slot in &GUARDED {
        let (start, end) = (
            slot.start.load(Ordering::Acquire),
            slot.end.load(Ordering::Acquire),
        );
        if start <= addr && addr < end {
            // SAFETY: replaces one page of a private, read-only mapping of
            // the agent's own, which is only ever read; mmap is a system
            // call, safe in a signal handler.
            let p = unsafe {
                libc::mmap(
                    (addr & !(page - 1)) as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                slot.torn.store(true, Ordering::Release);
                return;
            }
        }
    }
    // SAFETY: resetting a disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};

    use super::*;

    fn file_of(pages: usize, name: &str) -> (std::path::PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("gopulse-exe-map-{name}-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        for i in 0..pages {
            f.write_all(&vec![i as u8 + 1; PAGE.load(Ordering::Relaxed)])
                .unwrap();
        }
        (path.clone(), File::open(&path).unwrap())
    }

    /// A file truncated under the mapping: its lost pages read as zeros
    /// and the read is torn, instead of SIGBUS ending the process.
    #[test]
    fn truncated_while_mapped_reads_zeros() {
        install_guard();
        let page = PAGE.load(Ordering::Relaxed);
        let (path, file) = file_of(3, "torn");
        let m = Mapped::with(&file, false).unwrap();
        let b = m.bytes();
        assert_eq!((b[0], b[2 * page]), (1, 3));
        assert!(!m.torn());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        // SAFETY of the read: volatile, so it really touches the page.
        let lost = unsafe { std::ptr::read_volatile(b.as_ptr().add(2 * page + 7)) };
        assert_eq!(lost, 0);
        assert_eq!(b[1], 1);
        assert!(m.torn());
        drop(m);
        // The slot is free again, and clean.
        let m = Mapped::with(&file, false).unwrap();
        assert!(!m.torn());
        assert_eq!(m.bytes().len(), page);
        drop(m);
        std::fs::remove_file(&path).unwrap();
    }

    /// With the lease, a writer's open waits (here: refused at once, as
    /// it asked not to wait) until the mapping is gone.
    #[test]
    fn a_writer_waits_for_the_read() {
        let (path, file) = file_of(1, "lease");
        let m = Mapped::new(&file).unwrap();
        assert!(m.leased, "leases work where the tests run (root)");
        let open = || {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
        };
        let e = open().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "{e}");
        drop(m);
        open().unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
