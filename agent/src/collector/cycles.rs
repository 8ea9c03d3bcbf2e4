//! Completed GC cycles as the runtime accounts them (the probes' records,
//! see `crate::gctrace`): what started each, forced cycles by the function
//! that called `runtime.GC`, storms of them, the mark phase's wall time and
//! assist CPU, and, for `gopulse gctrace`, each cycle's line.
use std::{collections::BTreeMap, sync::Arc, time::Instant};

use gopulse_common::GcCycle;

use super::{Collector, Proc};
use crate::{
    gctrace::{self, Cycle, FORCED_PLUMBING, Trigger},
    metrics::ProcAnd,
    procfs,
    storm::{StormRule, StormTracker},
};

/// A watched process's cycle records: where their fields are, and state
/// kept between them.
pub struct TraceProc {
    layout: Arc<gctrace::Layout>,
    bias: u64,
    /// `runtime.runtimeInitTime`, read once (it is set when `runtime.main`
    /// starts and never again); `None` until read, `Some(None)` if unknown.
    init_time: Option<Option<i64>>,
    storms: BTreeMap<String, StormTracker>,
}

impl TraceProc {
    pub fn new(layout: Arc<gctrace::Layout>, bias: u64) -> Self {
        Self {
            layout,
            bias,
            init_time: None,
            storms: BTreeMap::new(),
        }
    }
}

/// One cycle of one process, for `gopulse gctrace`.
#[derive(Clone, Debug)]
pub struct TraceLine {
    pub pid: u32,
    pub cycle: Cycle,
    pub init_time: Option<i64>,
    pub trigger: Option<Trigger>,
    pub site: Option<String>,
}

/// What `Collector` keeps for cycles: the storm rule, and where lines go.
pub struct CycleSettings {
    pub storm: StormRule,
    pub sink: Option<std::sync::mpsc::Sender<TraceLine>>,
}

impl Default for CycleSettings {
    fn default() -> Self {
        Self {
            storm: StormRule {
                growths: 100,
                window: std::time::Duration::from_secs(10),
            },
            sink: None,
        }
    }
}

impl Collector {
    /// Reads the cycle records the probes wrote since the last call.
    pub(super) fn drain_cycles(&mut self) {
        let now = Instant::now();
        let mut records = Vec::new();
        while let Some(item) = self.maps.gc_ring.next() {
            if item.len() >= std::mem::size_of::<GcCycle>() {
                // SAFETY: GcCycle is repr(C) plain integers and bytes, and
                // the length was checked; read_unaligned needs no alignment.
                records.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<GcCycle>()) });
            }
        }
        for r in records {
            on_cycle(self, r);
        }
        let rule = self.cycles.storm;
        for p in self.procs.values_mut() {
            if let Some(t) = &mut p.gctrace {
                for s in t.storms.values_mut() {
                    let _ = s.record(now, 0, rule);
                }
            }
        }
    }
}

fn on_cycle(c: &mut Collector, r: GcCycle) {
    let pid = r.pid;
    let Some(p) = c.procs.get_mut(&pid) else {
        return;
    };
    let Some(t) = &mut p.gctrace else {
        return;
    };
    let cycle = t.layout.decode(&r);
    let init_time = *t.init_time.get_or_insert_with(|| {
        let addr = t.layout.init_time?.wrapping_add(t.bias);
        let mut b = [0u8; 8];
        procfs::read_mem(pid, addr, &mut b).ok()?;
        Some(i64::from_le_bytes(b)).filter(|&v| v > 0)
    });
    let frames: Vec<u64> = r
        .frames
        .iter()
        .take(r.nframes as usize)
        .map(|&f| f.wrapping_sub(t.bias))
        .collect();
    let (trigger, site) = classify(p, pid, &frames, cycle.user_forced);
    let m = &c.metrics;
    if let Some(trigger) = trigger {
        m.gc_triggers.inc(&ProcAnd {
            proc: &p.labels,
            value: trigger.label(),
        });
    }
    m.gc_mark_duration
        .observe(&p.labels, cycle.mark_ns().max(0) as f64 / 1e9);
    m.gc_assist_cpu
        .observe(&p.labels, cycle.assist_ns.max(0) as f64 / 1e9);
    if let Some(site) = &site {
        m.gc_forced.inc(&ProcAnd {
            proc: &p.labels,
            value: site,
        });
        let rule = c.cycles.storm;
        let now = Instant::now();
        if let Some(t) = &mut p.gctrace
            && let Some(cycles) = t
                .storms
                .entry(site.clone())
                .or_default()
                .record(now, 1, rule)
        {
            tracing::warn!(
                pid,
                exe = %p.labels.exe,
                site = %site,
                cycles,
                window_ms = rule.window.as_millis() as u64,
                "forced GC storm: pid {pid} ({}) site {site}: {cycles} forced cycles within {:?}",
                p.labels.exe,
                rule.window
            );
            m.gc_forced_storms.inc(&ProcAnd {
                proc: &p.labels,
                value: site,
            });
        }
    }
    if let Some(sink) = &c.cycles.sink {
        let _ = sink.send(TraceLine {
            pid,
            cycle,
            init_time,
            trigger,
            site,
        });
    }
}

/// What started a cycle, from the stack of the goroutine that did (the
/// caller of `runtime.gcStart`), and for a forced one the function that
/// called `runtime.GC`. No stack (the agent attached mid-cycle): a forced
/// cycle is still known as one (`work.userForced`), without its site.
fn classify(p: &Proc, pid: u32, frames: &[u64], forced: bool) -> (Option<Trigger>, Option<String>) {
    let name = |ret: u64| p.names.function_at(pid, ret.wrapping_sub(1));
    let Some(start) = frames
        .iter()
        .position(|&f| name(f).as_deref() == Some("runtime.gcStart"))
    else {
        return match forced {
            true => (Some(Trigger::Forced), Some("unknown".to_owned())),
            false => (None, None),
        };
    };
    let caller = frames.get(start + 1).and_then(|&f| name(f));
    let trigger = match caller.as_deref() {
        Some(f) => Trigger::of_caller(f),
        None if forced => Trigger::Forced,
        None => Trigger::Heap,
    };
    if trigger != Trigger::Forced {
        return (Some(trigger), None);
    }
    let site = frames[start + 1..]
        .iter()
        .find_map(|&ret| {
            p.names.frames_at(pid, ret)?.into_iter().find(|f| {
                !FORCED_PLUMBING.iter().any(|x| f.starts_with(x)) && !p.names.is_plumbing(f)
            })
        })
        .unwrap_or_else(|| "unknown".to_owned());
    (Some(trigger), Some(site))
}
