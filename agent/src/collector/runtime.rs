//! The Go runtime's own state (`crate::runtime_state`), read from each
//! process at every collection, into the Go runtime metrics. A value that
//! cannot be read right is absent until it can: its series is removed, and
//! the first such failure of each kind is logged for the process.
use std::collections::BTreeSet;

use super::Proc;
use crate::{
    metrics::{
        CPU_STATES, MEMORY_OTHER, MEMORY_STACK, Metrics, ProcAnd, ProcLabels, RuntimeMetrics,
    },
    runtime_state::{Fault, Process, Reader, Reading, Scratch, latency},
};

/// A process's runtime state reader and what collection keeps of it.
pub struct RuntimeProc {
    pub reader: Reader,
    /// Allocations reported so far: the count never goes back, even when a
    /// read raced the runtime's own merging of its counters.
    allocations: u64,
    /// The values whose failure was logged for this process.
    logged: BTreeSet<&'static str>,
}

impl RuntimeProc {
    pub fn new(reader: Reader) -> Self {
        Self {
            reader,
            allocations: 0,
            logged: BTreeSet::new(),
        }
    }

    /// Logs a value's failure once per process (a missing global was
    /// logged with its executable; a failed read is the process leaving).
    fn failed(&mut self, pid: u32, exe: &str, what: &'static str, f: &Fault) {
        match f {
            Fault::Check(_) if self.logged.insert(what) => tracing::warn!(
                pid,
                exe,
                "the Go runtime's {what} read from the process fails its checks ({f}); \
                 those metrics are absent while it does"
            ),
            Fault::Check(_) | Fault::Read(_) => {
                tracing::debug!(pid, exe, "the Go runtime's {what}: {f}")
            }
            Fault::Missing(_) => {}
        }
    }
}

/// An integer gauge or up-down counter's value, for the model.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reads the process's runtime state and sets (or removes) its series.
pub(super) fn fold(metrics: &Metrics, scratch: &mut Scratch, pid: u32, p: &mut Proc) {
    let Some(rt) = p.runtime.as_mut() else {
        return;
    };
    let before = rt.reader.last_latency().map(|c| Box::new(*c));
    let reading = rt.reader.read(&Process(pid), scratch);
    set(
        &metrics.runtime,
        &p.labels,
        pid,
        rt,
        before.as_deref(),
        reading,
    );
}

fn set(
    m: &RuntimeMetrics,
    l: &ProcLabels,
    pid: u32,
    rt: &mut RuntimeProc,
    before: Option<&[u64; latency::COUNTS]>,
    r: Reading,
) {
    let exe = l.exe.as_str();
    match r.gc {
        Ok(v) => {
            m.gogc.set(l, i64::from(v.gogc));
            match v.memory_limit {
                Some(limit) => m.memory_limit.set(l, limit),
                None => m.memory_limit.remove(l),
            }
            m.heap_goal.set(l, int(v.heap_goal));
            m.heap_live.set(l, int(v.heap_live));
            m.allocated.set_total(l, v.allocated);
        }
        Err(f) => {
            rt.failed(pid, exe, "GC state (gcController)", &f);
            for family in [
                &m.gogc,
                &m.memory_limit,
                &m.heap_goal,
                &m.heap_live,
                &m.allocated,
            ] {
                family.remove(l);
            }
        }
    }
    let used = |value| ProcAnd { proc: l, value };
    match r.memory {
        Ok(v) => {
            m.gc_cycles.set_total(l, u64::from(v.gc_cycles));
            rt.allocations = rt.allocations.max(v.allocations);
            m.allocations.set_total(l, rt.allocations);
            m.memory_used.set(&used(MEMORY_STACK), int(v.used_stack));
            m.memory_used.set(
                &used(MEMORY_OTHER),
                int(v.used.saturating_sub(v.used_stack)),
            );
        }
        Err(f) => {
            rt.failed(pid, exe, "memory statistics (memstats)", &f);
            m.gc_cycles.remove(l);
            m.allocations.remove(l);
            m.memory_used.remove(&used(MEMORY_STACK));
            m.memory_used.remove(&used(MEMORY_OTHER));
        }
    }
    let cpu = |value| ProcAnd { proc: l, value };
    match r.cpu {
        Ok(v) => {
            for (state, s) in CPU_STATES
                .into_iter()
                .zip([v.user, v.gc, v.scavenge, v.idle])
            {
                m.cpu_time.set_total_float(&cpu(state), s);
            }
        }
        Err(f) => {
            rt.failed(pid, exe, "CPU classes (work.cpuStats)", &f);
            for state in CPU_STATES {
                m.cpu_time.remove(&cpu(state));
            }
        }
    }
    match r.goroutines {
        Ok(v) => {
            m.goroutines.set(l, int(v.count));
            m.goroutines_system.set(l, int(v.system));
        }
        Err(f) => {
            rt.failed(pid, exe, "goroutine count (sched, allp, allglen)", &f);
            m.goroutines.remove(l);
            m.goroutines_system.remove(l);
        }
    }
    match r.gomaxprocs {
        Ok(n) => m.gomaxprocs.set(l, i64::from(n)),
        Err(f) => {
            rt.failed(pid, exe, "GOMAXPROCS (gomaxprocs, allp)", &f);
            m.gomaxprocs.remove(l);
        }
    }
    match r.latency {
        Ok(counts) => {
            let (buckets, sum) = latency::fold(&counts);
            // The first reading is the baseline: what the runtime counted
            // before is in the totals, but not replayed to OTLP.
            let new = before
                .and_then(|b| latency::new_since(b, &counts))
                .unwrap_or_default();
            m.schedule_duration.set_histogram(l, &buckets, sum, &new);
        }
        Err(f) => {
            rt.failed(pid, exe, "scheduling latencies (sched.timeToRun)", &f);
            m.schedule_duration.remove(l);
        }
    }
}
