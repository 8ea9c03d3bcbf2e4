//! Turns kernel events and counters into metrics, per watched process.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use gopulse_common::{ProcStats, STW_FLAG_CYCLE_DONE, STW_FLAG_NO_START, StwEvent};

use crate::{
    bpf::{self, Attachment, Bpf},
    inspect,
    metrics::{Metrics, PHASE_MARK, PHASE_SWEEP, PhaseLabels, ProcLabels, ReasonLabels},
    procfs,
    stw::{self, Reason},
};

/// A process whose probes are attached.
struct Proc {
    labels: ProcLabels,
    reasons: &'static [Reason],
    /// Reason labels with series, to remove them when the process goes.
    seen_reasons: BTreeSet<String>,
    /// Time of abandoned mark-termination stops, added to the cycle's pause.
    mark_carry_ns: u64,
    /// Kernel counters already folded into the metrics.
    synced: ProcStats,
    attachment: Attachment,
    start_time: u64,
}

pub struct Collector {
    bpf: Bpf,
    ring: RingBuf<MapData>,
    metrics: Metrics,
    procs: BTreeMap<u32, Proc>,
    requested: BTreeSet<u32>,
}

impl Collector {
    pub fn new(bpf: Bpf, ring: RingBuf<MapData>, metrics: Metrics) -> Self {
        Self {
            bpf,
            ring,
            metrics,
            procs: BTreeMap::new(),
            requested: BTreeSet::new(),
        }
    }

    /// The ring buffer, for readiness polling.
    pub fn ring(&self) -> &RingBuf<MapData> {
        &self.ring
    }

    /// Starts watching `pid`. The error says why it cannot be watched.
    pub fn add_process(&mut self, pid: u32) -> anyhow::Result<usize> {
        self.requested.insert(pid);
        if self.procs.contains_key(&pid) {
            return Ok(self.procs[&pid].attachment.probe_count());
        }
        let start_time =
            procfs::start_time(pid).map_err(|e| anyhow::anyhow!(procfs::describe(&e)))?;
        let exe = procfs::exe_name(pid).map_err(|e| anyhow::anyhow!(procfs::describe(&e)))?;
        let bin = inspect::inspect(&procfs::exe_path(pid), bpf::REQUIRED_FUNCTIONS)
            .with_context(|| exe.clone())?;
        let (sites, config) =
            bpf::plan(&bin).with_context(|| format!("{exe} ({})", bin.version))?;
        let attachment = self.bpf.attach(pid, &sites, config)?;
        let labels = ProcLabels {
            pid: pid.to_string(),
            exe,
            go_version: bin.version.short(),
        };
        let probes = attachment.probe_count();
        // Create the series now, so they read 0 rather than being absent.
        let _ = self.metrics.gc_cycles.get_or_create(&labels);
        let _ = self.metrics.events_lost.get_or_create(&labels);
        self.metrics
            .probes_attached
            .get_or_create(&labels)
            .set(probes as i64);
        for phase in [PHASE_SWEEP, PHASE_MARK] {
            let _ = self.metrics.gc_pause.get_or_create(&PhaseLabels {
                proc: labels.clone(),
                phase,
            });
        }
        tracing::info!(
            pid,
            exe = %labels.exe,
            go_version = %bin.version,
            build_mode = bin.build.settings.get("-buildmode").map_or("exe", String::as_str),
            cgo = bin.build.settings.get("CGO_ENABLED").map_or("?", String::as_str),
            probes,
            "watching process"
        );
        self.procs.insert(
            pid,
            Proc {
                labels,
                reasons: stw::table_for(&bin.version),
                seen_reasons: BTreeSet::new(),
                mark_carry_ns: 0,
                synced: ProcStats::default(),
                attachment,
                start_time,
            },
        );
        Ok(probes)
    }

    /// Every requested process has all its probes attached.
    pub fn ready(&self) -> bool {
        self.requested
            .iter()
            .all(|pid| self.procs.contains_key(pid))
    }

    /// Reads every pending event from the ring buffer.
    pub fn drain(&mut self) {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
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

    /// Folds the kernel counters into the metrics.
    pub fn sync(&mut self) {
        for (&pid, p) in &mut self.procs {
            let stats = match self.bpf.stats(pid) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(pid, "reading kernel counters: {e}");
                    continue;
                }
            };
            let cycles = stats.gc_cycles.saturating_sub(p.synced.gc_cycles);
            self.metrics
                .gc_cycles
                .get_or_create(&p.labels)
                .inc_by(cycles);
            let lost = stats.events_lost.saturating_sub(p.synced.events_lost);
            self.metrics
                .events_lost
                .get_or_create(&p.labels)
                .inc_by(lost);
            if stats.stw_unmatched > p.synced.stw_unmatched {
                tracing::debug!(
                    pid,
                    count = stats.stw_unmatched,
                    "start-the-world without a seen stop"
                );
            }
            p.synced = stats;
        }
    }

    /// Stops watching processes that exited (or whose pid was reused).
    pub fn reap(&mut self) {
        let gone: Vec<u32> = self
            .procs
            .iter()
            .filter(|(pid, p)| procfs::start_time(**pid).ok() != Some(p.start_time))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            if let Some(p) = self.procs.remove(&pid) {
                tracing::info!(pid, exe = %p.labels.exe, "process exited; detaching");
                self.bpf.detach(pid, p.attachment);
                let reasons: Vec<String> = p.seen_reasons.into_iter().collect();
                self.metrics.remove_process(&p.labels, &reasons);
            }
        }
    }
}
