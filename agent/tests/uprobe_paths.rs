//! The two ways uprobes go in (issue 21), side by side on this kernel:
//! uprobe_multi links (one per program per executable) where the kernel has
//! working ones, and perf-event uprobes (one per site), the fallback, forced
//! with `UprobeMode::Perf` so that it stays tested where multi links exist.
//!
//! - `attach_and_remove_an_executables_probes`: every probe of a Go
//!   executable (GC, growth and assignment groups) attached and removed,
//!   through the library, a few times on each path: the links are one per
//!   program (multi) or one per site (perf), and the times are printed.
//!   Removal waits out one RCU grace period per link, in parallel; a multi
//!   path that took more than `MULTI_REMOVAL_BOUND` would be a gross fault
//!   (removals one after another, or one grace period per site).
//! - `cut_to_quiet`: the growth group cut while a growth storm runs (as the
//!   governor cuts it: its links closed on threads of their own) and how
//!   long until every uprobe of it is removed (and, from the kernel's run
//!   counts, until the storm's hits stopped).
//! - `shutdown_with_fifty_executables`: the agent, finding 50 executables
//!   by itself, is stopped: its exit, and the kernel clear of its programs,
//!   maps, links and perf events (the helper closes the links), both within
//!   2 s with uprobe_multi links.
//!
//! `--nocapture` prints `RESULT` lines: docs/performance.md has the numbers.
mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use gopulse_agent::{
    bpf::{Bpf, UprobeMode, UprobePath, drop_in_parallel},
    plan::{self, ProbeSite},
};
use support::Target;

/// One test at a time: their timings would be each other's.
static SERIAL: Mutex<()> = Mutex::new(());

const GO: &str = "1.27.3";

/// Removing every probe of one executable with uprobe_multi links takes one
/// grace period (tens of ms here); ten times that is a fault.
const MULTI_REMOVAL_BOUND: Duration = Duration::from_millis(500);

/// The paths to try: perf-event uprobes always; uprobe_multi links where the
/// agent finds them (`GOPULSE_UPROBE_MODE` narrows it to one).
fn modes() -> Vec<UprobeMode> {
    match UprobeMode::from_env().expect("GOPULSE_UPROBE_MODE") {
        UprobeMode::Auto => vec![UprobeMode::Auto, UprobeMode::Perf],
        m => vec![m],
    }
}

/// Every site the agent would probe in `exe`: GC and pauses, growth, and
/// the assignment probes.
fn all_sites(exe: &Path) -> Vec<ProbeSite> {
    let data = std::fs::read(exe).unwrap();
    let bin = gopulse_inspect::inspect_bytes(&data, &plan::wanted_functions()).unwrap();
    let p = plan::plan(&bin, 0).unwrap();
    [p.core, p.growth, p.access].concat()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and largest, in ms.
fn spread(mut d: Vec<Duration>) -> String {
    d.sort();
    format!(
        "median {:.1} ms, min {:.1} ms, max {:.1} ms",
        ms(d[d.len() / 2]),
        ms(d[0]),
        ms(d[d.len() - 1])
    )
}

fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    support::root_go_bpftool(GO)
}

#[test]
fn attach_and_remove_an_executables_probes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((go, _bpftool)) = prerequisites() else {
        return;
    };
    let built = support::build_fixture("gcload", &go, &format!("{GO}-default"), &[]);
    let exe = support::private_copy(&built, "paths-attach");
    let sites = all_sites(&exe);
    let programs: BTreeSet<usize> = sites.iter().map(|s| s.program).collect();
    assert!(sites.len() >= 8, "{} sites", sites.len());
    // A process running it: attaching writes breakpoints into it, and
    // removing takes them out.
    let running = Target::spawn(&exe, &["5", "1500"]);
    for mode in modes() {
        let (bpf, _maps, _life) = Bpf::load(64, false, mode).expect("loading");
        let attacher = bpf.attacher();
        let path = attacher.path();
        if mode == UprobeMode::Perf {
            assert_eq!(path, UprobePath::Perf);
        }
        let (mut attach, mut remove) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            let links = attacher.attach_sites(&exe, &sites).expect("attaching");
            attach.push(t.elapsed());
            assert_eq!(links.len(), sites.len(), "uprobes held");
            let links = links.into_inner();
            let want = match path {
                UprobePath::Multi => programs.len(),
                UprobePath::Perf => sites.len(),
            };
            assert_eq!(links.len(), want, "{path}: links for {} sites", sites.len());
            let t = Instant::now();
            drop_in_parallel(links);
            remove.push(t.elapsed());
        }
        let slowest = remove.iter().max().copied().unwrap_or_default();
        eprintln!(
            "RESULT {path}: one executable, {} sites of {} programs: attach {}; remove all {}",
            sites.len(),
            programs.len(),
            spread(attach),
            spread(remove)
        );
        if path == UprobePath::Multi {
            let bound = support::scaled(MULTI_REMOVAL_BOUND);
            assert!(
                slowest <= bound,
                "removing one executable's uprobe_multi links took {slowest:?} (bound {bound:?})"
            );
        }
    }
    drop(running);
}

#[test]
fn cut_to_quiet() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((go, _bpftool)) = prerequisites() else {
        return;
    };
    let built = support::build_fixture("maps", &go, &format!("{GO}-default"), &[]);
    let exe = support::private_copy(&built, "paths-cut");
    let data = std::fs::read(&exe).unwrap();
    let bin = gopulse_inspect::inspect_bytes(&data, &plan::wanted_functions()).unwrap();
    let growth = plan::plan(&bin, 0).unwrap().growth;
    let names: BTreeSet<&str> = growth
        .iter()
        .map(|s| plan::PROGRAM_TABLE[s.program].name)
        .collect();
    let _stats = gopulse_agent::cost::enable_kernel_stats().expect("BPF_ENABLE_STATS");
    // A storm of small maps, each growing once, for longer than the test.
    let args = ["2000", "500", "30", "0", "0", "2", "600000", "0", "0"];
    let mut storm = Target::spawn(&exe, &args);
    storm.send("go");
    for mode in modes() {
        let (bpf, _maps, _life) = Bpf::load(64, false, mode).expect("loading");
        let attacher = bpf.attacher();
        let path = attacher.path();
        let runs = || -> u64 {
            names
                .iter()
                .map(|n| attacher.program_stats(n).map_or(0, |(_, r)| r))
                .sum()
        };
        let (mut quiet, mut removed) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let links = attacher.attach_sites(&exe, &growth).expect("attaching");
            let before = runs();
            std::thread::sleep(Duration::from_millis(200));
            assert!(runs() > before, "{path}: the growth programs did not run");
            // As the governor cuts: the links closed on threads of their
            // own. Quiet once the last of them is closed (every uprobe of
            // the group removed); the programs' run counts say when the
            // storm's hits stopped.
            let cut = Instant::now();
            let remover = std::thread::spawn(move || {
                drop_in_parallel(links.into_inner());
                cut.elapsed()
            });
            let (mut last, mut last_change) = (runs(), cut);
            while !remover.is_finished() {
                std::thread::sleep(Duration::from_millis(1));
                let now = runs();
                if now != last {
                    (last, last_change) = (now, Instant::now());
                }
            }
            removed.push(remover.join().unwrap());
            assert_eq!(
                runs(),
                last,
                "{path}: a growth program ran after its removal"
            );
            quiet.push(last_change.duration_since(cut));
        }
        eprintln!(
            "RESULT {path}: growth group ({} sites) cut in a storm: every uprobe removed after {}; \
             the storm's hits stopped after {}",
            growth.len(),
            spread(removed),
            spread(quiet)
        );
    }
    storm.send("exit");
}

/// Executables (copies of one) found and probed by the agent at once.
const EXECUTABLES: usize = 50;

#[test]
fn shutdown_with_fifty_executables() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((go, bpftool)) = prerequisites() else {
        return;
    };
    let built = support::build_fixture("gcload", &go, &format!("{GO}-default"), &[]);
    let prefix = format!("paths50-{}-", std::process::id());
    let copies: Vec<PathBuf> = (0..EXECUTABLES)
        .map(|i| support::private_copy(&built, &format!("{prefix}{i:02}")))
        .collect();
    let targets: Vec<Target> = copies
        .iter()
        .map(|c| Target::spawn(c, &["5", "1500"]))
        .collect();
    // One path (the one the environment picks): the perf-event path's
    // shutdown waits out hundreds of removals (run it with
    // GOPULSE_UPROBE_MODE=perf).
    let mode = UprobeMode::from_env().expect("GOPULSE_UPROBE_MODE");
    let env = match mode {
        UprobeMode::Auto => "auto",
        UprobeMode::Multi => "multi",
        UprobeMode::Perf => "perf",
    };
    let regex = format!("^{prefix}");
    let mut agent = support::Agent::spawn_env(
        &[],
        &["--exe-regex", &regex],
        &[("GOPULSE_UPROBE_MODE", env)],
    );
    let path = if agent.logged("uprobes: uprobe_multi links") {
        UprobePath::Multi
    } else {
        UprobePath::Perf
    };
    let m = agent.scrape_until(support::scaled(Duration::from_secs(120)), |m| {
        m.value("gopulse_executables_probed", &[]) == EXECUTABLES as f64
    });
    assert_eq!(
        m.value("gopulse_executables_probed", &[]),
        EXECUTABLES as f64
    );
    let uprobes = m.value("gopulse_uprobes_attached", &[]);
    let (progs, maps) = (agent.bpf_prog_ids(), agent.bpf_map_ids());
    let sent = Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(support::scaled(Duration::from_secs(180)))
        .expect("gopulse did not exit within 180 s of SIGTERM");
    let exited = sent.elapsed();
    assert!(status.success(), "exit status {status}");
    let (left, _) = support::kernel_cleared(
        &bpftool,
        &progs,
        &maps,
        &copies[0],
        support::scaled(Duration::from_secs(120)),
    );
    let cleared = sent.elapsed();
    assert!(left.is_empty(), "left in the kernel:\n{}", left.join("\n"));
    eprintln!(
        "RESULT {path}: {EXECUTABLES} executables ({uprobes} uprobes): exit {:.0} ms after \
         SIGTERM, the kernel clear {:.0} ms after it",
        ms(exited),
        ms(cleared)
    );
    // Perf-event uprobes: an exit waits for the removals already under
    // way (a closing sampling window's), one grace period per uprobe.
    if path == UprobePath::Multi {
        let bound = support::scaled(Duration::from_secs(2));
        assert!(exited <= bound, "exit took {exited:?} (bound {bound:?})");
        assert!(
            cleared <= bound,
            "the kernel clear took {cleared:?} (bound {bound:?})"
        );
    }
    drop(targets);
}
