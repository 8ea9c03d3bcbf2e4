//! Stop-the-world events: pause histograms by reason and GC phase.
use gopulse_common::{STW_FLAG_CYCLE_DONE, STW_FLAG_NO_START, StwEvent};

use super::Collector;
use crate::{
    metrics::{PHASE_MARK, PHASE_SWEEP, PhaseLabels, ReasonLabels},
    stw,
};

impl Collector {
    pub(super) fn drain_stw(&mut self) {
        let mut events = Vec::new();
        while let Some(item) = self.maps.stw_ring.next() {
            if item.len() < size_of::<StwEvent>() {
                tracing::warn!(len = item.len(), "short event in the ring buffer");
                continue;
            }
            // SAFETY: the kernel wrote a whole StwEvent (checked length);
            // read_unaligned copes with any alignment.
            events.push(unsafe { item.as_ptr().cast::<StwEvent>().read_unaligned() });
        }
        for ev in events {
            self.on_stw(ev);
        }
    }

    fn on_stw(&mut self, ev: StwEvent) {
        let Some(p) = self.procs.get_mut(&ev.pid) else {
            return; // the process was just removed
        };
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
        let labels = ReasonLabels {
            proc: p.labels.clone(),
            reason,
        };
        self.metrics.stw_pause.get_or_create(&labels).observe(secs);
        let max = self.metrics.stw_pause_max.get_or_create(&labels);
        if secs > max.get() {
            max.set(secs);
        }
        p.seen_reasons.insert(labels.reason);
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
            self.metrics
                .gc_pause
                .get_or_create(&PhaseLabels {
                    proc: p.labels.clone(),
                    phase,
                })
                .observe(ns as f64 / 1e9);
        }
    }
}
