//! Bounded tables filled on purpose: what does not fit is counted on
//! `/metrics`, and the counts add up to what the Go program did.
//!
//! - `--max-map-sites`: growths at further sites go under `site="other"`
//!   and into `gopulse_map_sites_dropped_total`;
//! - the kernel's growth table (`GROWTHS`, 32,768 keys for all processes):
//!   growths whose key does not fit count in
//!   `gopulse_map_growths_unattributed_total`;
//! - a process's pause log (`STW`, the last 128): pauses overwritten before
//!   the agent read them count in `gopulse_events_lost_total`;
//! - the kernel's table of maps the assignment probes saw (`MAP_SEEN`, an
//!   LRU of 65,536): maps it evicted before the agent read them count in
//!   `gopulse_map_untracked_total`;
//! - the ring of exec and exit events (`LIFE`, 256 KiB): events it had no
//!   room for count in `gopulse_discovery_events_lost_total`, and the agent
//!   rescans /proc for the processes they named.
//!
//! The agent is stopped (SIGSTOP) where a table must overflow before it is
//! read, so the overflow does not depend on the machine's speed.
#[allow(dead_code)] // the memory test uses the rest
#[path = "support/sites.rs"]
mod sites;
mod support;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use support::{Agent, Metrics, Target};

/// The kernel's growth table (`gopulse_common::MAX_GROWTH_KEYS`).
const GROWTH_KEYS: usize = 32_768;

/// The table of maps the assignment probes saw
/// (`gopulse_common::MAX_TRACKED_MAPS`).
const TRACKED_MAPS: u64 = 65_536;

/// The pause log of a process (`gopulse_common::STW_LOG`).
const STW_LOG: u64 = 128;

/// Flags that keep the governor from cutting the growth probes mid-test,
/// with the assignment probes `access` (off, sampled, always).
fn no_cuts(access: &str) -> Vec<&str> {
    vec![
        "--overhead-budget",
        "1",
        "--overhead-window",
        "3600",
        "--map-assign-probes",
        access,
    ]
}

fn signal(agent: &Agent, sig: i32) {
    // SAFETY: kill(2) on the test's own child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, sig) }, 0);
}

/// Growths per site label of one process, over kinds.
fn growths_by_site(m: &Metrics, pid: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in m.samples.iter().filter(|s| {
        s.name == "gopulse_map_growths_total"
            && s.labels.get("pid").map(String::as_str) == Some(pid)
    }) {
        *out.entry(s.labels["site"].clone()).or_default() += s.value;
    }
    out
}

fn committed_build(version: &str) -> Option<PathBuf> {
    let go = support::go_or_skip(version)?;
    Some(support::build_fixture("sites", &go, version, &[]))
}

/// `--max-map-sites 20` on a process growing maps at 50 sites: 20 site
/// series, the rest under `other`, which `gopulse_map_sites_dropped_total`
/// equals; every growth counted.
#[test]
fn sites_past_the_limit_count_as_other() {
    if !support::have_root() {
        return;
    }
    let Some(bin) = committed_build("1.27.3") else {
        return;
    };
    let mut target = Target::spawn(&bin, &[]);
    let mut flags = vec!["--max-map-sites", "20"];
    flags.extend(no_cuts("off"));
    let agent = Agent::spawn_with(&[target.pid], &flags);
    agent.wait_ready(Duration::from_secs(30));
    target.send("grow 1");
    let truth = sites::parse_growths(&target.read_line(Duration::from_secs(60)));
    let total: u64 = truth.iter().sum();
    let pid = target.pid.to_string();
    let m = agent.scrape_until(Duration::from_secs(10), |m| {
        growths_by_site(m, &pid).values().sum::<f64>() >= total as f64
    });
    let by_site = growths_by_site(&m, &pid);
    let other = by_site.get("other").copied().unwrap_or(0.0);
    let named = by_site.len() - usize::from(by_site.contains_key("other"));
    eprintln!(
        "RESULT --max-map-sites 20: {named} site series, {other} growths under other, of {total}"
    );
    assert_eq!(named, 20, "{by_site:?}");
    assert_eq!(by_site.values().sum::<f64>(), total as f64, "{by_site:?}");
    assert!(other > 0.0);
    assert_eq!(
        m.value("gopulse_map_sites_dropped_total", &[("pid", &pid)]),
        other
    );
    // The named sites are counted exactly.
    for (i, &n) in truth.iter().enumerate() {
        if let Some(&v) = by_site.get(&sites::site_name(i)) {
            assert_eq!(v, n as f64, "{}", sites::site_name(i));
        }
    }
    assert_eq!(
        m.value("gopulse_map_growths_unattributed_total", &[("pid", &pid)]),
        0.0
    );
    target.finish();
    agent.stop();
}

/// More (process, kind, site) keys than the kernel's growth table holds:
/// 11 processes growing maps at 3,000 sites each (33,000 keys). Growths
/// whose key did not fit are counted as unattributed, and the processes'
/// growths, attributed or not, add up to what they report.
#[test]
fn a_full_growth_table_counts_growths_unattributed() {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip("1.27.3") else {
        return;
    };
    const SITES: usize = 3_000;
    const PROCESSES: usize = 11;
    const { assert!(SITES * PROCESSES > GROWTH_KEYS) };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sites3000");
    let bin = support::build_go_dir(
        &sites::generated_copy(&dir, SITES),
        "sites3000-1.27.3",
        &go,
        &[],
        &[],
    );
    let mut targets: Vec<Target> = (0..PROCESSES).map(|_| Target::spawn(&bin, &[])).collect();
    let pids: Vec<u32> = targets.iter().map(|t| t.pid).collect();
    let mut flags = vec!["--max-map-sites", "10000"];
    flags.extend(no_cuts("off"));
    let agent = Agent::spawn_with(&pids, &flags);
    agent.wait_ready(Duration::from_secs(60));
    // One at a time: the table fills in a known order of processes.
    let mut truth = Vec::new();
    for t in &mut targets {
        t.send("grow 1");
        let g = sites::parse_growths(&t.read_line(Duration::from_secs(60)));
        assert_eq!(g.len(), SITES);
        truth.push(g.iter().sum::<u64>());
    }
    let counted = |m: &Metrics, pid: &str| {
        growths_by_site(m, pid).values().sum::<f64>()
            + m.value("gopulse_map_growths_unattributed_total", &[("pid", pid)])
    };
    let m = agent.scrape_until(Duration::from_secs(30), |m| {
        pids.iter()
            .zip(&truth)
            .all(|(p, &n)| counted(m, &p.to_string()) >= n as f64)
    });
    let mut unattributed = 0.0;
    let mut series = 0;
    for (p, &n) in pids.iter().zip(&truth) {
        let pid = p.to_string();
        assert_eq!(counted(&m, &pid), n as f64, "pid {pid}: growths");
        unattributed += m.value("gopulse_map_growths_unattributed_total", &[("pid", &pid)]);
        series += growths_by_site(&m, &pid).len();
        assert_eq!(
            m.value("gopulse_map_growth_probes_attached", &[("pid", &pid)]),
            1.0
        );
    }
    eprintln!(
        "RESULT growth table: {} growths in {PROCESSES} processes, {series} site series, \
         {unattributed} unattributed",
        truth.iter().sum::<u64>()
    );
    assert!(unattributed > 0.0, "the table did not fill");
    // The first processes' keys all fit: the table filled with the last.
    assert!(
        (GROWTH_KEYS - SITES..=GROWTH_KEYS).contains(&series),
        "{series}"
    );
    drop(targets);
    agent.stop();
}

/// A process stopping the world far more often than its 128-entry log is
/// read: with the agent stopped meanwhile, the log overflows; the pauses
/// the agent read and those it counts as lost add up to what the runtime
/// counted.
#[test]
fn an_overwritten_pause_log_counts_events_lost() {
    if !support::have_root() {
        return;
    }
    let Some(bin) = committed_build("1.27.3") else {
        return;
    };
    let mut target = Target::spawn(&bin, &[]);
    let agent = Agent::spawn_with(&[target.pid], &no_cuts("off"));
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let pauses = |m: &Metrics| -> f64 {
        m.samples
            .iter()
            .filter(|s| {
                s.name == "gopulse_stw_pause_seconds_count"
                    && s.labels.get("pid").map(String::as_str) == Some(pid.as_str())
            })
            .map(|s| s.value)
            .sum()
    };
    let lost = |m: &Metrics| m.value("gopulse_events_lost_total", &[("pid", &pid)]);
    let before = agent.scrape();
    signal(&agent, libc::SIGSTOP);
    target.send("stw 300");
    let line = target.read_line(Duration::from_secs(60));
    signal(&agent, libc::SIGCONT);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let stw = v["stw"].as_u64().expect("stw count") as f64;
    assert!(stw >= 600.0, "{line}");
    let m = agent.scrape_until(Duration::from_secs(10), |m| {
        pauses(m) - pauses(&before) + lost(m) >= stw
    });
    let (read, lost_n) = (pauses(&m) - pauses(&before), lost(&m) - lost(&before));
    eprintln!("RESULT pause log: {stw} pauses, {read} read, {lost_n} counted lost");
    assert_eq!(
        read + lost_n,
        stw,
        "pauses read + lost vs the runtime's count"
    );
    assert_eq!(read, STW_LOG as f64, "the log's last {STW_LOG} are read");
    target.finish();
    agent.stop();
}

/// Exec events the `LIFE` ring holds (`gopulse_common::LIFE_RING_BYTES`
/// over a 16-byte event and the ring's 8-byte record header).
const LIFE_CAPACITY: u64 = 256 * 1024 / 24;

/// More execs than the ring holds while the agent is stopped: those it had
/// no room for are counted, the read and the lost add up to at least the
/// execs made (other programs on the host exec too), and a Go program
/// started after the ring filled, whose own exec event was lost, is found
/// by the rescan the loss triggers.
#[test]
fn a_full_exec_event_ring_counts_and_rescans() {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip("1.27.3") else {
        return;
    };
    let idle = support::private_copy(
        &support::build_fixture("idle", &go, "1.27.3", &[]),
        "lifefill-idle",
    );
    let agent = Agent::spawn_with(&[], &["--exe-regex", "^lifefill-"]);
    agent.wait_ready(Duration::from_secs(30));
    let execs = |m: &Metrics| m.value("gopulse_discovery_execs_total", &[]);
    let lost = |m: &Metrics| m.value("gopulse_discovery_events_lost_total", &[]);
    let before = agent.scrape();
    let made: u64 = LIFE_CAPACITY + 3000;
    signal(&agent, libc::SIGSTOP);
    // Two threads of /bin/true (a fork and exec each).
    let spawners: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..made / 2 {
                    let status = std::process::Command::new("/bin/true").status().unwrap();
                    assert!(status.success());
                }
            })
        })
        .collect();
    for s in spawners {
        s.join().unwrap();
    }
    let go_program = Target::spawn(&idle, &[]);
    std::thread::sleep(Duration::from_millis(200));
    signal(&agent, libc::SIGCONT);
    let m = agent.scrape_until(Duration::from_secs(30), |m| {
        execs(m) - execs(&before) + lost(m) - lost(&before) >= made as f64
    });
    let (read, lost_n) = (execs(&m) - execs(&before), lost(&m) - lost(&before));
    eprintln!(
        "RESULT exec ring: {made} execs made while stopped, {read} read, {lost_n} counted lost"
    );
    assert!(
        read + lost_n >= made as f64,
        "execs read ({read}) + lost ({lost_n}) < execs made ({made})"
    );
    assert!(
        lost_n >= (made - LIFE_CAPACITY) as f64,
        "only {lost_n} counted lost: the ring holds {LIFE_CAPACITY}, {made} were made"
    );
    assert!(
        read <= LIFE_CAPACITY as f64 + 100.0,
        "{read} exec events read, more than the ring holds"
    );
    // Its exec came after the ring was full: only the rescan finds it.
    let pid = go_program.pid.to_string();
    let m = agent.scrape_until(Duration::from_secs(10), |m| {
        m.value("gopulse_probes_attached", &[("pid", &pid)]) > 0.0
    });
    assert!(
        m.value("gopulse_probes_attached", &[("pid", &pid)]) > 0.0,
        "the Go program started after the ring filled was not found:\n{}",
        m.text
    );
    assert!(
        agent
            .log_lines()
            .iter()
            .any(|l| l.contains("exec/exit events lost (ring full); rescanning /proc")),
        "no log line for the lost events"
    );
    drop(go_program);
    agent.stop();
}

/// More maps than the kernel's table of seen maps holds, each assigned
/// once and all kept alive, while the agent is stopped: the table evicts,
/// and the maps it lost before the agent read them are counted.
#[test]
fn a_full_seen_map_table_counts_untracked_maps() {
    if !support::have_root() {
        return;
    }
    let Some(bin) = committed_build("1.27.3") else {
        return;
    };
    let mut target = Target::spawn(&bin, &[]);
    let agent = Agent::spawn_with(&[target.pid], &no_cuts("always"));
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let untracked = |m: &Metrics| m.value("gopulse_map_untracked_total", &[("pid", &pid)]);
    let before = untracked(&agent.scrape());
    assert_eq!(before, 0.0);
    let made = TRACKED_MAPS + 5000;
    signal(&agent, libc::SIGSTOP);
    target.send(&format!("maps {made}"));
    let line = target.read_line(Duration::from_secs(120));
    signal(&agent, libc::SIGCONT);
    assert_eq!(line, format!("{{\"maps\":{made}}}"));
    let least = (made - TRACKED_MAPS) as f64;
    let m = agent.scrape_until(Duration::from_secs(30), |m| untracked(m) >= least);
    let n = untracked(&m);
    eprintln!("RESULT seen-map table: {made} maps made while stopped, {n} counted untracked");
    assert!(
        n >= least,
        "{n} maps counted untracked: the table holds {TRACKED_MAPS}, {made} were made"
    );
    // The program makes no other map meanwhile.
    assert!(n <= made as f64, "{n} maps counted untracked, {made} made");
    target.finish();
    agent.stop();
}
