//! The line `GODEBUG=gctrace=1` prints at the end of a cycle
//! (`gcMarkTermination` in `runtime/mgc.go`; the same fields, order and
//! rounding in Go 1.21 to 1.27), rebuilt from a [`Cycle`].
use std::fmt::Write;

use super::{Cycle, Trigger};

/// The runtime's `fmtNSAsMS`: milliseconds with two significant digits
/// (at most three decimals), whole ones from 10 ms.
fn ns_as_ms(ns: u64) -> String {
    if ns >= 10_000_000 {
        return (ns / 1_000_000).to_string();
    }
    let mut x = ns / 1_000;
    if x == 0 {
        return "0".to_owned();
    }
    let mut dec = 3;
    while x >= 100 {
        x /= 10;
        dec -= 1;
    }
    runtime_itoa_div(x, dec)
}

/// The runtime's `itoaDiv`: `val` with a point `dec` digits from the
/// right, written into a buffer from its end as the runtime does.
fn runtime_itoa_div(mut val: u64, dec: usize) -> String {
    let mut buf = [0u8; 24];
    let mut i = buf.len() - 1;
    let idec = i as isize - dec as isize;
    while val >= 10 || i as isize >= idec {
        buf[i] = b'0' + (val % 10) as u8;
        i -= 1;
        if i as isize == idec {
            buf[i] = b'.';
            i -= 1;
        }
        val /= 10;
    }
    buf[i] = b'0' + val as u8;
    String::from_utf8_lossy(&buf[i..]).into_owned()
}

/// The cycle's gctrace line, without the newline; `init_time` is
/// `runtime.runtimeInitTime` (the `@` is counted from it; `None` prints
/// `@?s`).
pub fn line(c: &Cycle, init_time: Option<i64>) -> String {
    let mut s = String::with_capacity(160);
    let util = (c.gc_cpu_fraction * 100.0) as i64;
    let at = match init_time {
        Some(t) => runtime_itoa_div((c.t_sweep_term.wrapping_sub(t) as u64) / 1_000_000, 3),
        None => "?".to_owned(),
    };
    let _ = write!(s, "gc {} @{at}s {util}%: ", c.numgc);
    let clocks = [
        c.t_mark.wrapping_sub(c.t_sweep_term),
        c.t_mark_term.wrapping_sub(c.t_mark),
        c.t_end.wrapping_sub(c.t_mark_term),
    ];
    for (i, ns) in clocks.iter().enumerate() {
        if i != 0 {
            s.push('+');
        }
        s.push_str(&ns_as_ms(*ns as u64));
    }
    s.push_str(" ms clock, ");
    let procs = i64::from(c.stwprocs);
    let cpu = [
        procs.wrapping_mul(c.t_mark.wrapping_sub(c.t_sweep_term)),
        c.assist_ns,
        c.background_ns,
        c.idle_ns,
        procs.wrapping_mul(c.t_end.wrapping_sub(c.t_mark_term)),
    ];
    for (i, ns) in cpu.iter().enumerate() {
        if i == 2 || i == 3 {
            s.push('/');
        } else if i != 0 {
            s.push('+');
        }
        s.push_str(&ns_as_ms(*ns as u64));
    }
    let _ = write!(
        s,
        " ms cpu, {}->{}->{} MB, {} MB goal, {} MB stacks, {} MB globals, {} P",
        c.heap0 >> 20,
        c.heap1 >> 20,
        c.heap2 >> 20,
        c.heap_goal >> 20,
        c.stack_scan >> 20,
        c.globals_scan >> 20,
        c.maxprocs
    );
    if c.user_forced {
        s.push_str(" (forced)");
    }
    s
}

/// The cycle at full precision (nanoseconds, bytes), with what started it
/// and, for a forced cycle, the function that called `runtime.GC`.
pub fn json(
    pid: u32,
    c: &Cycle,
    init_time: Option<i64>,
    trigger: Option<Trigger>,
    site: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "pid": pid,
        "gc": c.numgc,
        "since_start_ns": init_time.map(|t| c.t_sweep_term.wrapping_sub(t)),
        "gc_cpu_fraction": c.gc_cpu_fraction,
        "clock_ns": {
            "sweep_termination": c.t_mark.wrapping_sub(c.t_sweep_term),
            "mark": c.t_mark_term.wrapping_sub(c.t_mark),
            "mark_termination": c.t_end.wrapping_sub(c.t_mark_term),
        },
        "cpu_ns": {
            "sweep_termination": i64::from(c.stwprocs).wrapping_mul(c.t_mark.wrapping_sub(c.t_sweep_term)),
            "assist": c.assist_ns,
            "background": c.background_ns,
            "idle": c.idle_ns,
            "mark_termination": i64::from(c.stwprocs).wrapping_mul(c.t_end.wrapping_sub(c.t_mark_term)),
        },
        "heap_start_bytes": c.heap0,
        "heap_end_bytes": c.heap1,
        "heap_live_bytes": c.heap2,
        "heap_goal_bytes": c.heap_goal,
        "stacks_bytes": c.stack_scan,
        "globals_bytes": c.globals_scan,
        "procs": c.maxprocs,
        "forced": c.user_forced,
        "trigger": trigger.map(Trigger::label),
        "forced_site": site,
        "line": line(c, init_time),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_as_the_runtime_prints_them() {
        assert_eq!(ns_as_ms(0), "0");
        assert_eq!(ns_as_ms(999), "0");
        assert_eq!(ns_as_ms(37_000), "0.037");
        assert_eq!(ns_as_ms(150_000), "0.15");
        assert_eq!(ns_as_ms(1_234_000), "1.2");
        assert_eq!(ns_as_ms(9_999_999), "9.9");
        assert_eq!(ns_as_ms(10_000_000), "10");
        assert_eq!(ns_as_ms(123_456_789), "123");
        assert_eq!(runtime_itoa_div(183_025, 3), "183.025");
        assert_eq!(runtime_itoa_div(5, 3), "0.005");
        assert_eq!(runtime_itoa_div(0, 3), "0.000");
    }

    #[test]
    fn a_whole_line() {
        let c = Cycle {
            numgc: 412,
            gc_cpu_fraction: 0.0123,
            user_forced: true,
            stwprocs: 4,
            maxprocs: 4,
            t_sweep_term: 1_000 + 183_025_000_000,
            t_mark: 1_000 + 183_025_031_000,
            t_mark_term: 1_000 + 183_027_431_000,
            t_end: 1_000 + 183_027_449_000,
            heap0: 38 << 20,
            heap1: 39 << 20,
            heap2: 20 << 20,
            heap_goal: 40 << 20,
            stack_scan: 1000,
            globals_scan: 2000,
            assist_ns: 350_000,
            background_ns: 1_100_000,
            idle_ns: 2_000_000,
        };
        assert_eq!(
            line(&c, Some(1_000)),
            "gc 412 @183.025s 1%: 0.031+2.4+0.018 ms clock, 0.12+0.35/1.1/2.0+0.072 ms cpu, \
             38->39->20 MB, 40 MB goal, 0 MB stacks, 0 MB globals, 4 P (forced)"
        );
    }
}
