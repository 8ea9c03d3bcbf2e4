//! The agent's own memory: glibc malloc tuned for a long-running process
//! whose large buffers come and go (the `/metrics` body, megabytes with
//! thousands of series; the eBPF object and BTF at start-up).
//!
//! glibc serves allocations above its mmap threshold (128 KiB) with their
//! own mappings, returned to the kernel when freed, but by default it
//! raises the threshold to the size of each such block freed (up to 32
//! MiB). After start-up frees the eBPF object, every later body of
//! megabytes would come from the heap arenas, and what arenas free stays
//! resident: measured with 100 processes and 5,000 site series, 35 MB
//! resident against 23 MB with the threshold held (docs/performance.md,
//! "Memory with 100 processes").

/// The threshold held: glibc's own default.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Malloc arenas: glibc gives each thread that allocates while another
/// holds an arena one of its own, up to eight per CPU, and what each frees
/// stays resident in it; the agent's threads (async workers, discovery,
/// governor, samplers, OTLP) allocate little and seldom at once. One arena:
/// with 100 processes, 5,000 site series and OTLP, 27 MB anonymous after
/// scrapes against 37 MB with glibc's default, the agent's CPU the same
/// (docs/performance.md, "Memory with 100 processes").
const ARENAS: i32 = 1;

/// Holds glibc's mmap threshold, so large buffers go back to the kernel
/// when freed, and keeps one malloc arena. Call first thing in `main`, before any thread starts.
pub fn hold_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; no thread is
        // allocating concurrently this early. It fails only for values out
        // of range, which this is not (and failing costs only memory).
        let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        // SAFETY: as above.
        let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) };
    }
}
