//! The agent with no `--pid`: it finds Go programs already running and
//! those started after it (from the kernel's exec events), attaches each
//! within a second, counts each one's GC cycles exactly, removes each one's
//! series within a second of its exit, and skips everything that is not Go.
//! Replicas of one executable share one set of uprobes.
//!
//! Every fixture runs from a copy named for this test run, and the agent
//! watches only those (`--exe-regex`): other Go programs on the host are
//! left alone, and this test's numbers are not disturbed by them.
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde::Deserialize;
use support::{Agent, Metrics, Target};

#[derive(Debug, Deserialize)]
struct Truth {
    numgc: u64,
}

/// A fixture build copied to a name only this test run uses.
struct Build {
    path: PathBuf,
    go_version: String,
}

/// gcload builds, classic and swiss, with and without symbols, copied to
/// `<prefix><tag>` in a temporary directory. `None` when a toolchain is
/// missing (and that is allowed).
fn builds(prefix: &str, which: &[(&str, &str, &[&str])]) -> Option<Vec<Build>> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}bin"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = Vec::new();
    for &(version, tag, args) in which {
        let go = support::go_or_skip(version)?;
        let built = support::build_fixture("gcload", &go, &format!("{version}-{tag}"), args);
        let path = dir.join(format!("{prefix}{}-{tag}", version.replace('.', "_")));
        std::fs::copy(&built, &path).unwrap();
        out.push(Build {
            path,
            go_version: format!("go{version}"),
        });
    }
    Some(out)
}

/// A name prefix unique to this test in this run.
fn prefix(test: &str) -> String {
    format!("dz{}{test}-", std::process::id())
}

fn attached(m: &Metrics, pid: u32) -> bool {
    m.value("gopulse_probes_attached", &[("pid", &pid.to_string())]) > 0.0
}

fn has_series(m: &Metrics, pid: u32) -> bool {
    m.samples
        .iter()
        .any(|s| s.labels.get("pid").is_some_and(|p| *p == pid.to_string()))
}

/// Spawns a fixture and waits (scraping every 10 ms) until the agent has
/// attached to it; returns the process and the time from spawn to attached.
fn spawn_and_time(agent: &Agent, bin: &Path) -> (Target, Duration) {
    let started = Instant::now();
    let target = Target::spawn(bin, &["2", "3"]);
    let deadline = started + support::scaled(Duration::from_secs(5));
    loop {
        if attached(&agent.scrape(), target.pid) {
            return (target, started.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "pid {} ({}) not attached within {:?}",
            target.pid,
            bin.display(),
            deadline - started
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs each target's GC cycles and checks the agent counted exactly the
/// cycles the runtime reports.
fn check_gc_exact(agent: &Agent, targets: &mut [(Target, &Build)]) {
    for (t, _) in targets.iter_mut() {
        t.send("go");
    }
    for (t, build) in targets.iter_mut() {
        let truth: Truth = serde_json::from_str(&t.read_line(Duration::from_secs(120)))
            .expect("fixture truth JSON");
        let pid = t.pid.to_string();
        let want = truth.numgc as f64;
        let m = agent.scrape_until(support::scaled(Duration::from_secs(10)), |m| {
            m.cycles_seen(&[("pid", &pid)]) >= want
        });
        assert_eq!(
            m.cycles_seen(&[("pid", &pid), ("go_version", &build.go_version)]),
            want,
            "pid {pid} ({}): GC cycles, agent vs runtime",
            build.path.display()
        );
    }
}

/// Ends each target and checks its series are gone within a second.
fn check_exit_removes(agent: &Agent, targets: Vec<(Target, &Build)>) {
    for (t, build) in targets {
        let pid = t.pid;
        t.finish();
        let gone_at = Instant::now();
        let m = agent.scrape_until(support::scaled(Duration::from_secs(3)), |m| {
            !has_series(m, pid)
        });
        let took = gone_at.elapsed();
        assert!(
            !has_series(&m, pid),
            "pid {pid} ({}) exited but its series remain",
            build.path.display()
        );
        assert!(
            took <= support::scaled(Duration::from_secs(1)),
            "pid {pid}: series removed {took:?} after exit"
        );
    }
}

#[test]
fn finds_running_and_new_go_processes() {
    if !support::have_root() {
        return;
    }
    let p = prefix("find");
    let Some(builds) = builds(
        &p,
        &[
            ("1.23.9", "default", &[]),
            ("1.23.9", "stripped", &["-ldflags=-s -w"]),
            ("1.27.3", "default", &[]),
            ("1.27.3", "stripped", &["-ldflags=-s -w"]),
        ],
    ) else {
        return;
    };
    // Three already running.
    let mut targets: Vec<(Target, &Build)> = builds
        .iter()
        .take(3)
        .map(|b| (Target::spawn(&b.path, &["2", "3"]), b))
        .collect();
    let regex = format!("^{p}");
    // `--list` says what the agent would watch, and why not the rest.
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .args(["--list", "--exe-regex", &regex])
        .output()
        .unwrap();
    assert!(out.status.success());
    let list = String::from_utf8(out.stdout).unwrap();
    for (t, b) in &targets {
        let row = list
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&t.pid.to_string()))
            .unwrap_or_else(|| panic!("pid {} not in --list:\n{list}", t.pid));
        assert!(
            row.contains(&b.go_version) && row.ends_with("watch"),
            "{row}"
        );
    }
    assert!(list.contains("Go process(es);"), "{list}");
    let mut agent = Agent::spawn_with(&[], &["--exe-regex", &regex, "--map-assign-probes", "off"]);
    let m = agent.scrape_until(support::scaled(Duration::from_secs(10)), |m| {
        targets.iter().all(|(t, _)| attached(m, t.pid))
    });
    for (t, b) in &targets {
        assert!(
            attached(&m, t.pid),
            "running pid {} ({}) not found",
            t.pid,
            b.path.display()
        );
    }

    // Twenty started after, five of each build, and non-Go programs among
    // them.
    let execs_before = agent.scrape().value("gopulse_discovery_execs_total", &[]);
    let mut delays = Vec::new();
    let mut sleepers = Vec::new();
    for i in 0..20 {
        let b = &builds[i % builds.len()];
        let (t, delay) = spawn_and_time(&agent, &b.path);
        assert!(
            delay <= support::scaled(Duration::from_secs(1)),
            "pid {} ({}) attached {delay:?} after it was started",
            t.pid,
            b.path.display()
        );
        delays.push(delay);
        targets.push((t, b));
        // A non-Go program that is still there when the agent looks.
        sleepers.push(Command::new("/bin/sleep").arg("60").spawn().unwrap());
    }
    delays.sort();
    eprintln!(
        "RESULT spawn-to-attached over 20 processes: median {:?}, max {:?}",
        delays[delays.len() / 2],
        delays.last().unwrap()
    );
    let m = agent.scrape_until(support::scaled(Duration::from_secs(2)), |m| {
        m.value("gopulse_discovery_execs_total", &[]) >= execs_before + 40.0
            && m.value("gopulse_discovery_skipped_total", &[("reason", "not_go")]) >= 20.0
    });
    assert!(m.value("gopulse_discovery_execs_total", &[]) >= execs_before + 40.0);
    assert!(
        m.value("gopulse_discovery_skipped_total", &[("reason", "not_go")]) >= 20.0,
        "sleep runs were not judged as not Go"
    );
    for mut s in sleepers {
        let _ = s.kill();
        let _ = s.wait();
    }
    assert_eq!(m.value("gopulse_processes_watched", &[]), 23.0);
    assert_eq!(m.value("gopulse_discovery_events_lost_total", &[]), 0.0);
    // Four executables, 23 processes: one set of probes per executable.
    assert_eq!(m.value("gopulse_executables_probed", &[]), 4.0);
    let per_exe: f64 = builds
        .iter()
        .map(|b| {
            let t = targets.iter().find(|(_, tb)| tb.path == b.path).unwrap();
            m.value("gopulse_probes_attached", &[("pid", &t.0.pid.to_string())])
        })
        .sum();
    assert_eq!(m.value("gopulse_uprobes_attached", &[]), per_exe);
    assert!(
        !agent.logged("cannot watch"),
        "the agent failed to watch one of the fixtures"
    );

    check_gc_exact(&agent, &mut targets);
    check_exit_removes(&agent, targets);
    let m = agent.scrape();
    assert_eq!(m.value("gopulse_processes_watched", &[]), 0.0);
    assert_eq!(m.value("gopulse_uprobes_attached", &[]), 0.0);
    agent.wait_log(
        "process exited; detached",
        support::scaled(Duration::from_secs(1)),
    );
    agent.stop();
}

/// Fifty processes of one executable: one set of uprobes (the agent's gauge
/// and the kernel's list of links agree), every process counted exactly.
#[test]
fn replicas_share_one_set_of_probes() {
    if !support::have_root() {
        return;
    }
    let Some(bpftool) = support::bpftool() else {
        assert!(
            !support::prerequisite(false, "bpftool is not installed (cargo xtask setup)"),
            "unreachable"
        );
        return;
    };
    let p = prefix("rep");
    let Some(builds) = builds(&p, &[("1.27.3", "default", &[])]) else {
        return;
    };
    let b = &builds[0];
    let regex = format!("^{p}");
    let agent = Agent::spawn_with(&[], &["--exe-regex", &regex, "--map-assign-probes", "off"]);
    let mut targets: Vec<(Target, &Build)> = (0..50)
        .map(|_| (Target::spawn(&b.path, &["2", "3"]), b))
        .collect();
    let m = agent.scrape_until(Duration::from_secs(20), |m| {
        targets.iter().all(|(t, _)| attached(m, t.pid))
    });
    assert_eq!(m.value("gopulse_processes_watched", &[]), 50.0);
    assert_eq!(m.value("gopulse_executables_probed", &[]), 1.0);
    let reads = agent
        .log_lines()
        .iter()
        .filter(|l| l.contains("watching process") && l.contains("executable=\"read\""))
        .count();
    assert_eq!(reads, 1, "the executable is read once for 50 processes");
    let set = m.value(
        "gopulse_probes_attached",
        &[("pid", &targets[0].0.pid.to_string())],
    );
    assert!(set >= 3.0, "one set is {set} probes");
    assert_eq!(m.value("gopulse_uprobes_attached", &[]), set);

    // The kernel's view: the uprobe links to the agent's programs, one per
    // site (perf_event) or one per program (uprobe_multi).
    let ids = agent.bpf_prog_ids();
    let out = Command::new(&bpftool)
        .args(["-j", "link", "show"])
        .output()
        .expect("bpftool link show");
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let uprobe_links: Vec<&serde_json::Value> = links
        .iter()
        .filter(|l| l["type"] != "raw_tracepoint")
        .filter(|l| {
            l["prog_id"]
                .as_u64()
                .is_some_and(|id| ids.contains(&(id as u32)))
        })
        .collect();
    if agent.logged("uprobes: uprobe_multi links") {
        let data = std::fs::read(&b.path).unwrap();
        let bin = gopulse_inspect::inspect_bytes(&data, &gopulse_agent::plan::wanted_functions())
            .unwrap();
        let plan = gopulse_agent::plan::plan(&bin, 0).unwrap();
        let sites = plan.core.len() + plan.growth.len();
        let programs: std::collections::BTreeSet<usize> = plan
            .core
            .iter()
            .chain(&plan.growth)
            .map(|s| s.program)
            .collect();
        eprintln!(
            "RESULT 50 replicas: {set} probes by the agent's gauge, {} uprobe_multi links in the \
             kernel",
            uprobe_links.len()
        );
        assert_eq!(set, sites as f64, "the agent's gauge against its plan");
        assert_eq!(
            uprobe_links.len(),
            programs.len(),
            "one uprobe_multi link per program: {uprobe_links:?}"
        );
        assert!(
            uprobe_links.iter().all(|l| l["type"] != "perf_event"),
            "{uprobe_links:?}"
        );
    } else {
        let uprobes = uprobe_links
            .iter()
            .filter(|l| l["type"] == "perf_event")
            .count();
        eprintln!(
            "RESULT 50 replicas: {set} probes by the agent's gauge, {uprobes} uprobe links in the \
             kernel"
        );
        assert_eq!(uprobes as f64, set, "uprobe links in the kernel");
    }

    check_gc_exact(&agent, &mut targets);
    check_exit_removes(&agent, targets);
    agent.stop();
}

/// `--max-processes`: the Go processes beyond it are counted once and
/// logged once, and one of them is watched when room is made.
#[test]
fn max_processes_is_a_limit_and_room_is_reused() {
    if !support::have_root() {
        return;
    }
    let p = prefix("max");
    let Some(builds) = builds(&p, &[("1.27.3", "default", &[])]) else {
        return;
    };
    let b = &builds[0];
    let regex = format!("^{p}");
    let mut agent = Agent::spawn_with(
        &[],
        &[
            "--exe-regex",
            &regex,
            "--max-processes",
            "2",
            "--rescan-interval",
            "1",
            "--map-assign-probes",
            "off",
        ],
    );
    let mut targets: Vec<Target> = (0..4)
        .map(|_| Target::spawn(&b.path, &["1", "1"]))
        .collect();
    let limited = |m: &Metrics| m.value("gopulse_discovery_skipped_total", &[("reason", "limit")]);
    // Let several rescans pass: the two left out are counted once each.
    std::thread::sleep(Duration::from_secs(3));
    let m = agent.scrape();
    assert_eq!(m.value("gopulse_processes_watched", &[]), 2.0);
    assert_eq!(limited(&m), 2.0, "{}", m.text);
    let watched: Vec<usize> = (0..4).filter(|&i| attached(&m, targets[i].pid)).collect();
    assert_eq!(watched.len(), 2);
    agent.wait_log("--max-processes 2 reached", Duration::from_secs(1));
    assert_eq!(
        agent
            .log_lines()
            .iter()
            .filter(|l| l.contains("--max-processes 2 reached"))
            .count(),
        1,
        "logged once"
    );
    // Room: one watched process ends; a left-out one is taken at a rescan.
    drop(targets.remove(watched[0]));
    let m = agent.scrape_until(Duration::from_secs(5), |m| {
        m.value("gopulse_processes_watched", &[]) == 2.0
            && targets.iter().filter(|t| attached(m, t.pid)).count() == 2
    });
    assert_eq!(
        targets.iter().filter(|t| attached(&m, t.pid)).count(),
        2,
        "{}",
        m.text
    );
    assert_eq!(limited(&m), 2.0);
    drop(targets);
    agent.stop();
}
