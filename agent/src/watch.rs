//! Starting to watch one process: read its executable, plan the probes,
//! hand it to the attach stage, then to the collector.
use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    collector::{FunctionNames, NewProc},
    discover::{
        Decision, Discovery, Naming,
        events::{Life, LifeEvents, monotonic_ns},
        exe::{ExeKey, Skip, Stamp},
    },
    exe_map::Mapped,
    inspect::{self, GoBinary},
    metrics::{DiscoveryMetrics, NodeLabel},
    plan::{self, Plumbing},
    probes::{AttachError, NewExe, Target},
    procfs, runtime_state,
    server::App,
    stw,
};

/// An executable as read for watching: what is the same for every process
/// that runs it.
pub struct Inspected {
    /// Without its symbolizer, which is shared below.
    bin: GoBinary,
    names: Arc<FunctionNames>,
    pages: Arc<BTreeMap<u32, gopulse_common::PageBits>>,
    /// Where its runtime keeps its state, or why that is unknown.
    runtime: Result<Arc<runtime_state::Layout>, String>,
}

/// Executables read lately, kept while the file is unchanged: a Go program
/// started again (a replica, a command run by cron) is not read and decoded
/// again. What is kept of each is small (8 bytes a function: the symbolizer
/// reads names from the file), so the last 16 are.
#[derive(Default)]
pub struct Binaries {
    entries: HashMap<ExeKey, (Stamp, Instant, Arc<Inspected>)>,
}

const BINARIES_KEPT: usize = 16;

impl Binaries {
    /// The executable of `pid` (key, and what was read, now or earlier);
    /// and whether it was read now.
    fn get(
        &mut self,
        pid: u32,
        plumbing: &Plumbing,
    ) -> anyhow::Result<(ExeKey, Arc<Inspected>, bool)> {
        let io = |e: std::io::Error| anyhow::anyhow!(procfs::describe(&e));
        let (file, key, stamp) = ExeKey::open(pid).map_err(io)?;
        if let Some((s, used, found)) = self.entries.get_mut(&key)
            && *s == stamp
        {
            *used = Instant::now();
            return Ok((key, found.clone(), false));
        }
        // From the file the key names: by path it could be the next program
        // if the process execs meanwhile. Mapped, not read (`exe_map`): its
        // pages are the page cache's, and only those decoded are touched.
        let started = Instant::now();
        let mapped = Mapped::new(&file).map_err(io)?;
        let bin = inspect::inspect_bytes(mapped.bytes(), &plan::wanted_functions());
        let pages = bin
            .as_ref()
            .map(|b| plumbing.pages(&b.symbolizer, mapped.bytes()))
            .unwrap_or_default();
        // Truncated or written while read (without a lease to hold the
        // writer): whatever came of it is wrong, and the process is gone
        // (a running program's file cannot be written).
        if mapped.torn() || Stamp::of(&file).ok() != Some(stamp) {
            return Err(Changed.into());
        }
        drop(mapped);
        let mut bin = bin?;
        let names = FunctionNames::new(
            std::mem::take(&mut bin.symbolizer),
            key,
            stamp,
            plumbing.clone(),
        );
        let runtime = runtime_state::Layout::of(&bin).map(Arc::new);
        tracing::debug!(
            pid,
            functions = names.symbolizer().len(),
            symbolizer_bytes = names.symbolizer().heap_bytes(),
            plumbing_pages = pages.len(),
            seconds = started.elapsed().as_secs_f64(),
            "executable read"
        );
        let found = Arc::new(Inspected {
            bin,
            names: Arc::new(names),
            pages: Arc::new(pages),
            runtime,
        });
        if self.entries.len() >= BINARIES_KEPT
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used, _))| *used)
                .map(|(k, _)| *k)
        {
            self.entries.remove(&oldest);
        }
        self.entries
            .insert(key, (stamp, Instant::now(), found.clone()));
        Ok((key, found, true))
    }
}

/// `--list`'s verdict on a Go process discovery admits: `watch`, with what
/// its executable's growth probes would not count or count otherwise (see
/// [`plan::Coverage`]), or why it cannot be watched. Each executable is
/// read once per listing.
pub fn list_verdict(known: &mut HashMap<ExeKey, String>, pid: u32, exe: ExeKey) -> String {
    known
        .entry(exe)
        .or_insert_with(|| match planned_coverage(pid) {
            Ok(c) if c.is_plain() => "watch".to_owned(),
            Ok(c) => format!("watch; {c}"),
            Err(e) => format!("cannot watch: {e:#} (gopulse inspect --pid {pid} says more)"),
        })
        .clone()
}

/// What the probes would count of `pid`'s executable (mapped, as watching
/// maps it: a big executable costs no memory in proportion to it).
fn planned_coverage(pid: u32) -> anyhow::Result<plan::Coverage> {
    let io = |e: std::io::Error| anyhow::anyhow!(procfs::describe(&e));
    let (file, _, _) = ExeKey::open(pid).map_err(io)?;
    let mapped = Mapped::new(&file).map_err(io)?;
    let planned = inspect::inspect_bytes(mapped.bytes(), &plan::wanted_functions())
        .map_err(anyhow::Error::from)
        .and_then(|bin| plan::plan(&bin, 0));
    if mapped.torn() {
        return Err(Changed.into());
    }
    Ok(planned?.coverage)
}

/// The process ran another program, or exited, while it was being
/// attached (or its executable was truncated while read, which only an
/// exited program's can be): not a failure, its next exec event (or exit)
/// settles it.
#[derive(Debug, thiserror::Error)]
#[error("it ran exec or exited while it was being attached")]
pub struct Changed;

/// Starts watching `pid`; the error says why it cannot be watched.
pub fn watch(app: &App, pid: u32, plumbing: &Plumbing, naming: &Naming) -> anyhow::Result<()> {
    let io = |e: std::io::Error| anyhow::anyhow!(procfs::describe(&e));
    let start_time = procfs::start_time(pid).map_err(io)?;
    let exe = procfs::exe_name(pid).map_err(io)?;
    let (exe_key, found, read) = app
        .with_binaries(|b| b.get(pid, plumbing))
        .with_context(|| exe.clone())?;
    let bin = &found.bin;
    let load_bias = procfs::exe_mapping_start(pid)
        .map_err(io)?
        .wrapping_sub(bin.image_base);
    let plan = plan::plan(bin, load_bias).with_context(|| format!("{exe} ({})", bin.version))?;
    let pages = &found.pages;
    let labels = naming.labels(pid, exe, bin.version.short());
    // A new executable's probes are attached off the attach stage's lock
    // (the kernel can take seconds), then handed over. Its last process
    // may exit meanwhile, taking a known executable's probes: then again.
    let target = || Target {
        pid,
        labels: labels.clone(),
        exe: exe_key,
        plan: &plan,
        pages,
    };
    let mut new = None;
    let mut tries = 0;
    let probes = loop {
        match app.with_probes(|p| p.attach(target(), new.take())) {
            Ok(n) => break n,
            Err(AttachError::NeedExe(prepare)) if tries < 3 => {
                tries += 1;
                new = Some(NewExe::attach(prepare, pid, exe_key, &plan)?);
            }
            Err(AttachError::Failed(e)) => return Err(e),
            Err(e @ AttachError::NeedExe(_)) => return Err(e.into()),
        }
    };
    // Reading the executable takes a while: the process may have run exec
    // meanwhile (the exec event that follows judges its new program), or
    // exited and its pid gone to another process.
    if ExeKey::of(pid).ok() != Some(exe_key) || procfs::start_time(pid).ok() != Some(start_time) {
        app.with_probes(|p| p.detach(pid));
        return Err(Changed.into());
    }
    if read {
        log_runtime_layout(pid, &labels.exe, &found);
    }
    tracing::info!(
        pid,
        exe = %labels.exe,
        go_version = %bin.version,
        build_mode = bin.build.settings.get("-buildmode").map_or("exe", String::as_str),
        cgo = bin.build.settings.get("CGO_ENABLED").map_or("?", String::as_str),
        pie = bin.pie,
        stripped = bin.stripped,
        maps = ?bin.map_impl,
        probes,
        plumbing_pages = pages.len(),
        executable = if read { "read" } else { "known" },
        "watching process"
    );
    // Once per executable read: what its growth probes do not count, or
    // count through another function than their own.
    if read && !plan.coverage.is_plain() {
        if plan.coverage.misses() {
            tracing::warn!(exe = %labels.exe, go_version = %bin.version, "{}", plan.coverage);
        } else {
            tracing::info!(exe = %labels.exe, go_version = %bin.version, "{}", plan.coverage);
        }
    }
    app.with_collector(|c| {
        c.add(NewProc {
            pid,
            labels,
            reasons: stw::table_for(&bin.version),
            start_time,
            names: found.names.clone(),
            map_offsets: bin.offsets.map,
            runtime: found
                .runtime
                .as_ref()
                .ok()
                .map(|layout| runtime_state::Reader::new(layout.clone(), load_bias)),
            unwatched: plan.coverage.unwatched.clone(),
            gctrace: (plan.stw.trace.work != 0)
                .then(|| crate::gctrace::Layout::of(bin).ok())
                .flatten()
                .map(|l| crate::collector::TraceProc::new(Arc::new(l), load_bias)),
        })
    });
    Ok(())
}

/// Says once per executable what of its runtime state cannot be read, and
/// so which Go runtime metrics its processes lack.
fn log_runtime_layout(pid: u32, exe: &str, found: &Inspected) {
    let rt = &found.bin.runtime;
    match &found.runtime {
        Err(e) => tracing::warn!(
            pid,
            exe,
            "the Go runtime's state cannot be read from this executable ({e}): its go_* \
             runtime metrics are absent"
        ),
        Ok(_) => {
            let missing = rt.globals.missing();
            if !missing.is_empty() {
                let list: Vec<String> = missing.iter().map(|(g, e)| format!("{g}: {e}")).collect();
                tracing::warn!(
                    pid,
                    exe,
                    "runtime globals not found, the Go runtime metrics that need them are \
                     absent: {}",
                    list.join("; ")
                );
            }
            tracing::debug!(
                pid,
                exe,
                offsets_from_dwarf = rt.offsets_from_dwarf,
                globals_from_symbols = rt.globals.from_symbols,
                "the Go runtime's state is read from the process"
            );
        }
    }
}

/// How long the follower lets events gather after a wakeup.
const BATCH: Duration = Duration::from_millis(10);

/// The longest the follower sleeps without events: its gauges are set at
/// least this often.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// How the agent follows processes after start-up.
pub struct Follow {
    /// `None` with `--pid`: only the named processes, no discovery.
    pub discovery: Option<Discovery>,
    pub events: LifeEvents,
    /// `--pid`: a named process that runs exec is watched as its new
    /// program.
    pub pids: Vec<u32>,
    pub max_processes: usize,
    /// How often /proc is rescanned for processes the events missed.
    pub rescan_every: Duration,
    pub plumbing: Plumbing,
    pub naming: Naming,
    pub metrics: DiscoveryMetrics,
}

/// Follows processes until the agent stops (on a thread of its own: it
/// reads executables and attaches probes, both blocking). Exits detach at
/// once; with discovery, every exec is judged and Go programs are watched.
pub fn follow(app: &App, f: Follow) {
    let Follow {
        mut discovery,
        mut events,
        pids,
        max_processes,
        rescan_every,
        plumbing,
        naming,
        metrics,
    } = f;
    let ctx = Consider {
        app,
        plumbing: &plumbing,
        naming: &naming,
        metrics: &metrics,
        max_processes,
        limit_logged: Cell::new(false),
    };
    // With --pid, each named process by its start time: the same process
    // after an exec, not another one given its pid later.
    let named: HashMap<u32, u64> = pids
        .iter()
        .filter_map(|&pid| Some((pid, procfs::start_time(pid).ok()?)))
        .collect();
    let mut lost = 0u64;
    // The processes named with --pid are watched already: say so before
    // the first wait.
    metrics
        .processes_watched
        .set(&(), app.with_collector(|c| c.count()) as i64);
    // With --pid nothing is due but events: the loop sleeps in `wait`.
    let mut next_rescan = discovery.as_ref().map(|_| Instant::now());
    loop {
        if let (Some(d), Some(due)) = (discovery.as_mut(), next_rescan)
            && Instant::now() >= due
        {
            rescan(&ctx, d);
            if !app.scanned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(
                    watched = app.with_collector(|c| c.count()),
                    "first scan of /proc done"
                );
            }
            next_rescan = Some(Instant::now() + rescan_every);
        }
        // Before waiting: with --pid the named processes are watched before
        // the loop starts, and nothing may come to wake it.
        metrics
            .processes_watched
            .set(&(), app.with_collector(|c| c.count()) as i64);
        let wait = next_rescan.map_or(IDLE_WAIT, |due| {
            due.saturating_duration_since(Instant::now()).min(IDLE_WAIT)
        });
        let batch = events.wait(wait);
        if !batch.is_empty() {
            // Let a storm of execs gather: one wakeup per batch, not per
            // exec (a node can exec thousands of programs a second).
            std::thread::sleep(BATCH);
        }
        let batch: Vec<Life> = batch.into_iter().chain(events.drain()).collect();
        for (i, &event) in batch.iter().enumerate() {
            match event {
                Life::Exit { pid } => {
                    // A thread other than the leader that runs exec ends the
                    // old leader: an exit event, but the process lives on.
                    let execd = batch[i..]
                        .iter()
                        .any(|e| matches!(e, Life::Exec { pid: p, .. } if *p == pid))
                        || procfs::running_settled(pid);
                    if app.with_collector(|c| c.watches(pid)) {
                        app.unwatch(pid);
                        if execd {
                            tracing::info!(pid, "process ran exec; detached, its series removed");
                        } else {
                            tracing::info!(pid, "process exited; detached, its series removed");
                        }
                    }
                    // A named pid stays named (the list is the flags'): an
                    // exec seen late still finds it, and another process
                    // given the pid later has another start time.
                    if let Some(d) = discovery.as_mut() {
                        d.forget(pid);
                    }
                }
                Life::Exec { pid, time_ns } => {
                    if let Some(d) = &discovery {
                        metrics.execs.inc(&());
                        if d.stale(pid, time_ns) {
                            continue;
                        }
                    } else if !named.contains_key(&pid) {
                        continue; // --pid: not one of the processes named
                    }
                    // A watched process that runs another program is gone
                    // as the process it was.
                    if app.with_collector(|c| c.watches(pid)) {
                        app.unwatch(pid);
                        tracing::info!(pid, "process ran exec; detached, its series removed");
                    }
                    let Some(d) = discovery.as_mut() else {
                        rewatch_named(app, &named, pid, &plumbing, &naming, &metrics);
                        continue;
                    };
                    let decision = d.judge(pid);
                    if ctx.consider(d, pid, decision) {
                        let delay = monotonic_ns().saturating_sub(time_ns);
                        metrics.attach_delay.observe(&(), delay as f64 / 1e9);
                    }
                }
            }
        }
        let now_lost = events.lost();
        if now_lost > lost {
            metrics.events_lost.inc_by(&(), now_lost - lost);
            tracing::warn!(
                lost = now_lost - lost,
                "exec/exit events lost (ring full); rescanning /proc"
            );
            lost = now_lost;
            if next_rescan.is_some() {
                next_rescan = Some(Instant::now());
            }
        }
        if let Some(d) = &discovery {
            let counted = metrics.executables_judged.get(&());
            metrics
                .executables_judged
                .inc_by(&(), d.judged().saturating_sub(counted));
        }
    }
}

/// With `--pid`: watches a named process again after it ran exec (its new
/// program may be Go or not; the log says which).
fn rewatch_named(
    app: &App,
    named: &HashMap<u32, u64>,
    pid: u32,
    plumbing: &Plumbing,
    naming: &Naming,
    metrics: &DiscoveryMetrics,
) {
    let Some(&start) = named.get(&pid) else {
        return;
    };
    // Another process given a named pid is not the one named.
    if procfs::start_time(pid).ok() != Some(start) {
        return;
    }
    app.with_collector(|c| c.request(pid));
    if let Err(e) = watch(app, pid, plumbing, naming) {
        if e.is::<Changed>() {
            return; // its next exec event comes
        }
        tracing::error!(pid, "pid {pid}: cannot watch its new program: {e:#}");
        if procfs::start_time(pid).is_ok() {
            metrics.watch_failed(pid);
        }
    }
}

/// Judges every process in /proc not judged yet.
fn rescan(ctx: &Consider<'_>, d: &mut Discovery) {
    let (app, metrics) = (ctx.app, ctx.metrics);
    metrics.rescans.inc(&());
    let pids = match d.unjudged() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("scanning /proc: {e}");
            return;
        }
    };
    let agent = std::process::id();
    for pid in pids {
        if pid == agent || app.with_collector(|c| c.watches(pid)) {
            continue;
        }
        let decision = d.judge(pid);
        ctx.consider(d, pid, decision);
    }
}

struct Consider<'a> {
    app: &'a App,
    plumbing: &'a Plumbing,
    naming: &'a Naming,
    metrics: &'a DiscoveryMetrics,
    max_processes: usize,
    /// Whether reaching --max-processes was logged (once).
    limit_logged: Cell<bool>,
}

impl Consider<'_> {
    /// Acts on a decision; true when the process is now watched.
    fn consider(&self, d: &mut Discovery, pid: u32, decision: Decision) -> bool {
        let skip = |reason: Skip| {
            self.metrics.skipped.inc(&NodeLabel(reason.label()));
        };
        let exe = match decision {
            Decision::Skip { reason, why } => {
                skip(reason);
                if !matches!(reason, Skip::NotGo | Skip::Gone) && d.first_skip(ExeKey::of(pid).ok())
                {
                    let name = procfs::exe_name(pid).unwrap_or_default();
                    tracing::info!(pid, exe = %name, reason = reason.label(), "not watching: {why}");
                }
                return false;
            }
            Decision::Watch { exe, .. } => exe,
        };
        if self.app.with_collector(|c| c.count()) >= self.max_processes {
            // Asked again at each rescan (room may have been made), counted
            // once.
            if d.limited(pid) {
                skip(Skip::Limit);
            }
            if !self.limit_logged.replace(true) {
                tracing::warn!(
                    pid,
                    "--max-processes {} reached: further Go processes are not watched \
                     (counted in gopulse_discovery_skipped_total{{reason=\"limit\"}})",
                    self.max_processes
                );
            }
            return false;
        }
        match watch(self.app, pid, self.plumbing, self.naming) {
            Ok(()) => true,
            Err(e) => {
                let gone = procfs::start_time(pid).is_err();
                // Not the program judged any more: its exec event judges
                // the new one.
                if !gone && (e.is::<Changed>() || ExeKey::of(pid).ok() != Some(exe)) {
                    tracing::info!(pid, "not watched: it ran exec while it was being attached");
                    return false;
                }
                skip(if gone { Skip::Gone } else { Skip::Refused });
                if !gone {
                    self.metrics.watch_failed(pid);
                }
                if !gone && d.first_skip(Some(exe)) {
                    tracing::warn!(pid, "cannot watch: {e:#}");
                }
                false
            }
        }
    }
}
