//! Stop-the-world events: pause histograms by reason and GC phase.
use gopulse_common::{STW_FLAG_CYCLE_DONE, STW_FLAG_NO_START, STW_LOG, StwEvent};

use super::{Collector, Proc};
use crate::{
    metrics::{Metrics, PHASE_MARK, PHASE_SWEEP, ProcAnd},
    stw,
};

impl Collector {
    /// Reads the pauses each process's probes logged since the last call.
    pub(super) fn drain_stw(&mut self) {
        for (&pid, p) in &mut self.procs {
            let Ok(state) = self.maps.procs.stw.get(&pid, 0) else {
                continue;
            };
            let log = STW_LOG as u64;
            let new = state.seq.saturating_sub(p.stw_seq);
            let lost = new.saturating_sub(log);
            if lost > 0 {
                self.metrics.events_lost.inc_by(&p.labels, lost);
                tracing::debug!(pid, lost, "pauses overwritten before they were read");
            }
            for n in state.seq - new.min(log)..state.seq {
                on_stw(&self.metrics, p, state.log[(n % log) as usize]);
            }
            p.stw_seq = state.seq;
        }
    }
}

fn on_stw(metrics: &Metrics, p: &mut Proc, ev: StwEvent) {
    if ev.flags & STW_FLAG_NO_START != 0 || ev.end_ns < ev.start_ns {
        // Attached mid-pause: the cycle counts, its duration is unknown.
        if ev.flags & STW_FLAG_CYCLE_DONE != 0 {
            p.mark_carry_ns = 0;
        }
        return;
    }
    let ns = ev.end_ns - ev.start_ns;
    let secs = ns as f64 / 1e9;
    let reason = stw::label(p.reasons, ev.reason);
    let labels = ProcAnd {
        proc: &p.labels,
        value: &reason,
    };
    metrics.stw_pause.observe(&labels, secs);
    metrics.stw_pause_max.set_max(&labels, secs);
    let gc_phase = match ev.reason {
        stw::GC_SWEEP_TERM => Some((PHASE_SWEEP, ns)),
        stw::GC_MARK_TERM if ev.flags & STW_FLAG_CYCLE_DONE != 0 => {
            Some((PHASE_MARK, ns + std::mem::take(&mut p.mark_carry_ns)))
        }
        stw::GC_MARK_TERM => {
            // gcMarkDone found work left and restarted the world: the
            // cycle's mark termination is still to come.
            p.mark_carry_ns += ns;
            None
        }
        _ => None,
    };
    if let Some((phase, ns)) = gc_phase {
        metrics.gc_pause.observe(
            &ProcAnd {
                proc: &p.labels,
                value: phase,
            },
            ns as f64 / 1e9,
        );
    }
}
