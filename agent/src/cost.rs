//! What one probe hit costs on this machine, measured here rather than
//! taken from a benchmark elsewhere: the trap, timed at start-up on a
//! function of the agent's own, plus each program's mean run time from the
//! kernel's own BPF run-time statistics (enabled while the agent runs).
use std::{
    hint::black_box,
    os::fd::OwnedFd,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use gopulse_common::PROGRAMS;

use crate::{
    bpf::{Attacher, PROG_CALIBRATE},
    plan::{PROGRAM_TABLE, Trap},
    procfs,
};

/// What a trap costs before our program runs, in ns.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrapCost {
    /// A probe on a `JBE` (emulated by the kernel).
    pub emulated_ns: f64,
    /// A probe on a `RET` (single-stepped).
    pub single_step_ns: f64,
}

impl TrapCost {
    /// Until measured: what the development VM measured
    /// (shared/design/uprobe-costs.md).
    pub const DEFAULT: Self = Self {
        emulated_ns: 850.0,
        single_step_ns: 5800.0,
    };

    pub fn of(&self, trap: Trap) -> f64 {
        match trap {
            Trap::Emulated => self.emulated_ns,
            Trap::SingleStep => self.single_step_ns,
        }
    }
}

/// A program's run time until the kernel has reported one.
pub const DEFAULT_RUN_NS: f64 = 500.0;

/// Turns on the kernel's BPF run-time statistics for as long as the
/// returned fd is open (`BPF_ENABLE_STATS`, Linux 5.8+). They cost two
/// clock reads per program run.
pub fn enable_kernel_stats() -> anyhow::Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling the kernel's BPF run-time statistics (BPF_ENABLE_STATS, which needs CAP_SYS_ADMIN)")
}

/// The cost of one hit of each program, in seconds: trap plus run time.
/// Shared by the governor (which refreshes it) and the collector (which
/// turns hits into `gopulse_probe_overhead_seconds_total`).
#[derive(Debug)]
pub struct Costs {
    trap: TrapCost,
    /// f64 bits: mean run time of each program in ns.
    run_ns: [AtomicU64; PROGRAMS],
    /// Last kernel reading per program: (run time ns, runs).
    last: std::sync::Mutex<[(u64, u64); PROGRAMS]>,
}

impl Costs {
    pub fn new(trap: TrapCost) -> Self {
        Self {
            trap,
            run_ns: std::array::from_fn(|_| AtomicU64::new(DEFAULT_RUN_NS.to_bits())),
            last: std::sync::Mutex::new([(0, 0); PROGRAMS]),
        }
    }

    pub fn trap(&self) -> TrapCost {
        self.trap
    }

    /// Mean run time of a program in ns.
    pub fn run_ns(&self, program: usize) -> f64 {
        f64::from_bits(self.run_ns[program].load(Ordering::Relaxed))
    }

    /// Seconds one hit of `program` costs the process.
    pub fn per_hit_s(&self, program: usize) -> f64 {
        (self.trap.of(PROGRAM_TABLE[program].trap) + self.run_ns(program)) / 1e9
    }

    /// Folds in the kernel's cumulative statistics: each program's mean
    /// run time since the last reading becomes its cost (programs that did
    /// not run keep theirs).
    pub fn update(&self, stats: &[Option<(Duration, u64)>; PROGRAMS]) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for (i, s) in stats.iter().enumerate() {
            let Some((time, runs)) = *s else { continue };
            let time = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
            let (t0, r0) = last[i];
            if runs > r0 && time >= t0 {
                let mean = (time - t0) as f64 / (runs - r0) as f64;
                self.run_ns[i].store(mean.to_bits(), Ordering::Relaxed);
            }
            last[i] = (time, runs);
        }
    }
}

// Three copies of a function of the agent's own with the instructions our
// probes sit on: a stack-check-like CMP + JBE (emulated when probed) and a
// RET (single-stepped). Called with (1, 0), the JBE falls through, as Go's
// stack check does. One copy stays unprobed, one gets a probe on its JBE,
// one on its RET, so the three are timed side by side with the probes
// attached once (a detach waits out an RCU grace period).
macro_rules! trap_function {
    ($name:literal) => {
        concat!(
            ".text\n",
            ".globl ",
            $name,
            "\n",
            ".globl ",
            $name,
            "_jbe\n",
            ".globl ",
            $name,
            "_ret\n",
            ".type ",
            $name,
            ",@function\n",
            ".p2align 4\n",
            $name,
            ":\n",
            "    cmp rdi, rsi\n",
            $name,
            "_jbe:\n",
            "    jbe 2f\n",
            "    nop\n",
            "2:\n",
            $name,
            "_ret:\n",
            "    ret\n",
            ".size ",
            $name,
            ", .-",
            $name,
            "\n",
        )
    };
}
core::arch::global_asm!(trap_function!("gopulse_trap_bare"));
core::arch::global_asm!(trap_function!("gopulse_trap_jbe"));
core::arch::global_asm!(trap_function!("gopulse_trap_ret"));

unsafe extern "C" {
    fn gopulse_trap_bare(a: u64, b: u64);
    fn gopulse_trap_jbe(a: u64, b: u64);
    fn gopulse_trap_ret(a: u64, b: u64);
    static gopulse_trap_jbe_jbe: u8;
    static gopulse_trap_ret_ret: u8;
}

/// This thread's CPU time in ns: user time plus the kernel's time handling
/// its traps, without the time other tasks had the CPU (a busy machine
/// must not inflate the measurement).
fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// Mean CPU ns per call of `f` over `n` calls.
fn time_calls(f: unsafe extern "C" fn(u64, u64), n: u32) -> f64 {
    let start = thread_cpu_ns();
    for _ in 0..n {
        // SAFETY: the trap functions compare two registers and return.
        unsafe { f(black_box(1), black_box(0)) };
    }
    (thread_cpu_ns() - start) / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times the trap of a probe on a `JBE` and on a `RET` on this machine: a
/// probed copy of a function and an unprobed one are called in alternating
/// rounds, in this thread's CPU time, and the do-nothing program's own run
/// time (kernel stats) is taken off. Needs the kernel's statistics enabled.
/// Takes about 0.2 s of CPU.
pub fn calibrate(bpf: &Attacher) -> anyhow::Result<TrapCost> {
    let pid = std::process::id();
    let exe = Path::new("/proc/self/exe");
    let offset_of = |addr: u64| {
        procfs::file_offset_of(pid, addr)
            .with_context(|| format!("finding address {addr:#x} in the agent's own mappings"))
    };
    let jbe = offset_of(&raw const gopulse_trap_jbe_jbe as u64)?;
    let ret = offset_of(&raw const gopulse_trap_ret_ret as u64)?;
    let mut links = Vec::new();
    for offset in [jbe, ret] {
        links.push(bpf.attach_one(PROG_CALIBRATE, exe, offset, pid)?);
    }
    let measured = measure(bpf);
    crate::bpf::drop_in_background(links);
    measured
}

fn measure(bpf: &Attacher) -> anyhow::Result<TrapCost> {
    const ROUNDS: usize = 7;
    let mut emulated = Vec::new();
    let mut stepped = Vec::new();
    let _ = time_calls(gopulse_trap_bare, 10_000); // warm up
    for _ in 0..ROUNDS {
        for (f, calls, out) in [
            (
                gopulse_trap_jbe as unsafe extern "C" fn(u64, u64),
                20_000,
                &mut emulated,
            ),
            (gopulse_trap_ret, 4_000, &mut stepped),
        ] {
            let before = time_calls(gopulse_trap_bare, calls);
            let (t0, r0) = bpf.program_stats(PROG_CALIBRATE)?;
            let probed = time_calls(f, calls);
            let (t1, r1) = bpf.program_stats(PROG_CALIBRATE)?;
            let after = time_calls(gopulse_trap_bare, calls);
            if r1 < r0 + u64::from(calls) {
                bail!(
                    "the calibration probe ran {} times for {calls} calls",
                    r1.saturating_sub(r0)
                );
            }
            let prog_ns = (t1.saturating_sub(t0)).as_nanos() as f64 / (r1 - r0) as f64;
            out.push(probed - (before + after) / 2.0 - prog_ns);
        }
    }
    let cost = TrapCost {
        emulated_ns: median(emulated),
        single_step_ns: median(stepped),
    };
    // A trap is an exception and a return to user space: tens of ns at the
    // very least, and not tens of microseconds unless something is wrong.
    for (what, ns) in [("JBE", cost.emulated_ns), ("RET", cost.single_step_ns)] {
        if !(20.0..100_000.0).contains(&ns) {
            bail!("implausible trap cost at a {what}: {ns:.0} ns");
        }
    }
    Ok(cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_follow_the_kernel() {
        let c = Costs::new(TrapCost::DEFAULT);
        let p = gopulse_common::PROG_GROW_TABLE;
        assert_eq!(c.run_ns(p), DEFAULT_RUN_NS);
        let mut stats = [None; PROGRAMS];
        stats[p] = Some((Duration::from_nanos(1_000), 2));
        c.update(&stats);
        assert_eq!(c.run_ns(p), 500.0);
        stats[p] = Some((Duration::from_nanos(4_000), 8));
        c.update(&stats);
        assert_eq!(c.run_ns(p), 500.0);
        stats[p] = Some((Duration::from_nanos(5_200), 10));
        c.update(&stats);
        assert_eq!(c.run_ns(p), 600.0);
        // No runs since: the last mean stays.
        c.update(&stats);
        assert_eq!(c.run_ns(p), 600.0);
        assert!((c.per_hit_s(p) - 1.45e-6).abs() < 1e-12);
        let r = gopulse_common::PROG_STW_START_RET;
        assert!((c.per_hit_s(r) - 6.3e-6).abs() < 1e-12);
    }

    #[test]
    fn trap_functions_run() {
        for f in [gopulse_trap_bare, gopulse_trap_jbe, gopulse_trap_ret] {
            assert!(time_calls(f, 1000) > 0.0);
        }
        let pid = std::process::id();
        let jbe = procfs::file_offset_of(pid, &raw const gopulse_trap_jbe_jbe as u64).unwrap();
        let ret = procfs::file_offset_of(pid, &raw const gopulse_trap_ret_ret as u64).unwrap();
        let f_jbe = procfs::file_offset_of(pid, gopulse_trap_jbe as *const () as u64).unwrap();
        let f_ret = procfs::file_offset_of(pid, gopulse_trap_ret as *const () as u64).unwrap();
        assert_eq!(jbe - f_jbe, 3, "cmp rdi, rsi is 3 bytes");
        assert_eq!(ret - f_ret, 6, "cmp (3), jbe rel8 (2), nop (1)");
    }
}
