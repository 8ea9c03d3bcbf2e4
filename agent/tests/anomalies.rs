//! Anomalies seen from inside the kernel, provoked for real: a growth probe
//! whose read of the map header faults, a map header the runtime cannot have
//! made, and a restart of the world whose stop the probes did not see. Each
//! must be counted for its process in `gopulse_bpf_anomalies_total{kind}`,
//! and logged from the BPF side with `--bpf-debug` (and only then). The
//! normal fixtures must count none.
mod support;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::File,
    io::Read as _,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Metrics, Target};

const ANOMALIES: &str = "gopulse_bpf_anomalies_total";
const KINDS: [&str; 3] = ["read_failed", "stw_unmatched", "map_layout"];
/// What the programs' log lines start with (forwarded to tracing).
const BPF_LOG: &str = "bpf: anomaly";

/// The sum of every `name` series of `pid`.
fn total(m: &Metrics, name: &str, pid: u32) -> f64 {
    let pid = pid.to_string();
    m.samples
        .iter()
        .filter(|s| s.name == name && s.labels.get("pid") == Some(&pid))
        .map(|s| s.value)
        .sum()
}

fn anomalies(m: &Metrics, pid: u32, kind: &str) -> f64 {
    m.value(ANOMALIES, &[("pid", &pid.to_string()), ("kind", kind)])
}

/// Every anomaly series of `pid` exists (created at 0 when it is watched).
fn assert_series(m: &Metrics, pid: u32) {
    for kind in KINDS {
        assert!(
            m.has(ANOMALIES, &[("pid", &pid.to_string()), ("kind", kind)]),
            "no {ANOMALIES}{{kind={kind}}} series for {pid}"
        );
    }
}

/// The anomalies fixture built with Go `version`, or `None` (skipped).
fn fixture(version: &str) -> Option<PathBuf> {
    if !support::have_root() {
        return None;
    }
    let Some(go) = support::go_tool(version) else {
        assert!(!support::prerequisite(
            false,
            &format!("Go {version} is not installed (cargo xtask setup)")
        ));
        return None;
    };
    // It calls the runtime's growth functions by linkname, which Go 1.23+
    // refuses unless told (Go 1.21 has no such check, nor the flag).
    let minor: u32 = version.split('.').nth(1)?.parse().ok()?;
    let args: &[&str] = if minor >= 23 {
        &["-ldflags=-checklinkname=0"]
    } else {
        &[]
    };
    Some(support::build_fixture("anomalies", &go, version, args))
}

/// The verified size, in instructions, of each program the agent holds
/// (`bpftool prog show`: xlated bytes / 8), by the kernel's 15-byte name.
fn xlated(agent: &Agent) -> BTreeMap<String, u64> {
    let Some(bpftool) = support::bpftool() else {
        assert!(!support::prerequisite(false, "bpftool is not installed"));
        return BTreeMap::new();
    };
    let ids = agent.bpf_prog_ids();
    let out = std::process::Command::new(bpftool)
        .args(["-j", "prog", "show"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool prog show");
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .iter()
        .filter(|p| {
            p["id"]
                .as_u64()
                .is_some_and(|id| ids.contains(&(id as u32)))
        })
        .map(|p| {
            let name = p["name"].as_str().unwrap_or("").to_owned();
            (name, p["bytes_xlated"].as_u64().unwrap_or(0) / 8)
        })
        .collect()
}

/// Hands a growth function a map header that faults, then one with
/// implausible fields: one `read_failed` and one `map_layout` each, logged
/// only with `debug`. Returns the programs' verified sizes.
fn check_growth_anomalies(version: &str, debug: bool) -> BTreeMap<String, u64> {
    let Some(bin) = fixture(version) else {
        return BTreeMap::new();
    };
    let mut target = Target::spawn(&bin, &[]);
    let pid = target.pid;
    let flags: &[&str] = if debug { &["--bpf-debug"] } else { &[] };
    let mut agent = Agent::spawn_with(&[pid], flags);
    agent.wait_ready(Duration::from_secs(30));
    let sizes = xlated(&agent);
    let before = agent.scrape();
    assert_series(&before, pid);
    for kind in KINDS {
        assert_eq!(anomalies(&before, pid, kind), 0.0, "{kind} before");
    }

    for (cmd, kind) in [("unreadable", "read_failed"), ("layout", "map_layout")] {
        target.send(cmd);
        let line = target.read_line(Duration::from_secs(10));
        // The runtime faulted on the same header after the probe (nil type
        // or the unreadable page): a recovered panic, not a crash.
        assert!(
            line.starts_with("done runtime error"),
            "{version} {cmd}: fixture said {line:?}"
        );
        let m = agent.scrape_until(Duration::from_secs(5), |m| anomalies(m, pid, kind) >= 1.0);
        assert_eq!(anomalies(&m, pid, kind), 1.0, "{version} {cmd}: {kind}");
        if debug {
            let needle = format!("{BPF_LOG} {kind} pid={pid}");
            agent.wait_log(&needle, Duration::from_secs(5));
        }
    }
    thread::sleep(Duration::from_millis(500));
    let m = agent.scrape();
    assert_eq!(anomalies(&m, pid, "read_failed"), 1.0, "{version}");
    assert_eq!(anomalies(&m, pid, "map_layout"), 1.0, "{version}");
    assert_eq!(anomalies(&m, pid, "stw_unmatched"), 0.0, "{version}");
    // Neither header was a map: no growth counted.
    assert_eq!(
        total(&m, "gopulse_map_growths_total", pid),
        0.0,
        "{version}: a growth was counted for a header that is no map"
    );
    let logged = agent
        .log_lines()
        .iter()
        .filter(|l| l.contains(BPF_LOG))
        .count();
    if debug {
        assert_eq!(logged, 2, "{version}: BPF log lines");
    } else {
        assert_eq!(logged, 0, "{version}: BPF log lines without --bpf-debug");
        assert!(!agent.logged("BPF-side anomaly logging on"));
    }
    agent.stop();
    sizes
}

/// Without --bpf-debug the verifier removed the logging code: the programs
/// that log are smaller than with it, the hot ones (which do not log) the
/// same.
fn check_logging_removed(off: &BTreeMap<String, u64>, on: &BTreeMap<String, u64>) {
    if off.is_empty() && on.is_empty() {
        return; // skipped
    }
    for &name in support::GROWTH_PROBES.iter().chain(&["stw_start_ret"]) {
        let (a, b) = (off[name], on[name]);
        assert!(a < b, "{name}: {a} insns without --bpf-debug, {b} with");
    }
    for name in [
        "map_assign",
        "map_delete",
        "map_evacuate",
        "stw_stop",
        "stw_start_entry",
    ] {
        assert_eq!(off[name], on[name], "{name}");
    }
}

#[test]
fn growth_anomalies_go1_23_classic() {
    let off = check_growth_anomalies("1.23.9", false);
    let on = check_growth_anomalies("1.23.9", true);
    check_logging_removed(&off, &on);
}

#[test]
fn growth_anomalies_go1_27_swiss() {
    let off = check_growth_anomalies("1.27.3", false);
    let on = check_growth_anomalies("1.27.3", true);
    check_logging_removed(&off, &on);
}

/// A FIFO the fixture's heap dump goes into: opened for reading (without
/// blocking, so the fixture's blocking open for writing returns), read only
/// when the test says.
struct Fifo {
    path: PathBuf,
    file: File,
}

impl Fifo {
    fn new(name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}.fifo", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        Self { path, file }
    }

    /// Reads to the end (the writer closing it); returns the bytes read.
    fn drain(&mut self) -> usize {
        // SAFETY: our own descriptor; back to blocking reads.
        assert_eq!(
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETFL, 0) },
            0
        );
        let mut all = Vec::new();
        self.file.read_to_end(&mut all).unwrap();
        all.len()
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a thread of `pid` is blocked in write(2) (syscall 1 on x86-64).
fn in_write(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        std::fs::read_to_string(t.path().join("syscall"))
            .is_ok_and(|s| s.split_whitespace().next() == Some("1"))
    })
}

/// The world stopped for a heap dump into a FIFO nobody reads, the agent
/// attached meanwhile, then the dump read to its end: the world restarts.
/// Go 1.21 tells the probes of a stop only at `stopTheWorldWithSema`, which
/// ran before they were there: one `stw_unmatched`. Later releases pass the
/// stop to `startTheWorldWithSema`: the pause is measured and nothing is
/// unmatched.
fn check_attach_during_stop(version: &str, debug: bool) {
    let Some(bin) = fixture(version) else { return };
    let mut target = Target::spawn(&bin, &[]);
    let pid = target.pid;
    let mut fifo = Fifo::new(&format!("anomalies-{version}"));
    target.send(&format!("dump {}", fifo.path.display()));
    assert_eq!(target.read_line(Duration::from_secs(10)), "dumping");
    // The dump fills the pipe and blocks in write(2) with the world stopped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_write(pid) {
        assert!(Instant::now() < deadline, "the heap dump never blocked");
        thread::sleep(Duration::from_millis(10));
    }
    let flags: &[&str] = if debug { &["--bpf-debug"] } else { &[] };
    let mut agent = Agent::spawn_with(&[pid], flags);
    agent.wait_ready(Duration::from_secs(30));
    assert!(
        in_write(pid),
        "the world restarted before the agent attached"
    );
    let before = agent.scrape();
    assert_series(&before, pid);
    assert_eq!(anomalies(&before, pid, "stw_unmatched"), 0.0);
    let bytes = fifo.drain();
    assert!(bytes > 1 << 20, "heap dump of {bytes} bytes");
    assert_eq!(target.read_line(Duration::from_secs(10)), "dumped");

    let old = version.starts_with("1.21.");
    let dump_pauses = |m: &Metrics| {
        m.value(
            "gopulse_stw_pause_seconds_count",
            &[("pid", &pid.to_string()), ("reason", "write_heap_dump")],
        )
    };
    let m = agent.scrape_until(Duration::from_secs(5), |m| {
        anomalies(m, pid, "stw_unmatched") >= 1.0 || dump_pauses(m) >= 1.0
    });
    thread::sleep(Duration::from_millis(500));
    let m2 = agent.scrape();
    for m in [&m, &m2] {
        if old {
            assert_eq!(anomalies(m, pid, "stw_unmatched"), 1.0, "{version}");
            assert_eq!(
                dump_pauses(m),
                0.0,
                "{version}: an unmatched pause was measured"
            );
        } else {
            assert_eq!(anomalies(m, pid, "stw_unmatched"), 0.0, "{version}");
            assert_eq!(dump_pauses(m), 1.0, "{version}: the dump's pause");
        }
        assert_eq!(anomalies(m, pid, "read_failed"), 0.0, "{version}");
        assert_eq!(anomalies(m, pid, "map_layout"), 0.0, "{version}");
    }
    if old && debug {
        agent.wait_log(
            &format!("{BPF_LOG} stw_unmatched pid={pid}"),
            Duration::from_secs(5),
        );
    } else {
        let lines = agent.log_lines();
        let bpf: Vec<&String> = lines.iter().filter(|l| l.contains(BPF_LOG)).collect();
        assert!(bpf.is_empty(), "{version}: {bpf:?}");
    }
    agent.stop();
    target.finish();
}

#[test]
fn stw_unmatched_go1_21_attached_during_a_stop() {
    check_attach_during_stop("1.21.13", false);
    check_attach_during_stop("1.21.13", true);
}

#[test]
fn stw_matched_go1_27_attached_during_a_stop() {
    check_attach_during_stop("1.27.3", true);
}

/// The normal fixtures (the maps fixture's growths, gcload's GC cycles,
/// with and without symbols) under one agent without --bpf-debug: every
/// anomaly series is there and 0, and the probes did run.
#[test]
fn normal_fixtures_have_no_anomalies() {
    if !support::have_root() {
        return;
    }
    let mut targets = Vec::new();
    for version in ["1.21.13", "1.23.9", "1.27.3"] {
        let Some(go) = support::go_tool(version) else {
            assert!(!support::prerequisite(
                false,
                &format!("Go {version} is not installed (cargo xtask setup)")
            ));
            return;
        };
        for (kind, args) in [("full", &[][..]), ("stripped", &["-ldflags=-s -w"][..])] {
            let tag = format!("{version}-{kind}");
            let gc = support::build_fixture("gcload", &go, &tag, args);
            targets.push((format!("gcload {tag}"), Target::spawn(&gc, &[])));
            let maps = support::build_fixture("maps", &go, &tag, args);
            targets.push((format!("maps {tag}"), Target::spawn(&maps, &[])));
        }
    }
    let pids: Vec<u32> = targets.iter().map(|(_, t)| t.pid).collect();
    let agent = Agent::spawn_with(&pids, &["--map-assign-probes", "always"]);
    agent.wait_ready(Duration::from_secs(60));
    for (_, t) in &mut targets {
        t.send("go");
    }
    for (what, t) in &mut targets {
        let line = t.read_line(Duration::from_secs(120));
        assert!(line.starts_with('{'), "{what}: {line:?}");
    }
    thread::sleep(Duration::from_millis(1500));
    let m = agent.scrape();
    for (what, t) in &targets {
        assert_series(&m, t.pid);
        for kind in KINDS {
            assert_eq!(anomalies(&m, t.pid, kind), 0.0, "{what}: {kind}");
        }
        let (name, what_ran) = if what.starts_with("maps") {
            ("gopulse_map_growths_total", "growths")
        } else {
            ("gopulse_gc_pause_seconds_count", "GC cycles")
        };
        assert!(total(&m, name, t.pid) > 0.0, "{what}: no {what_ran}");
    }
    let lines = agent.log_lines();
    let bpf: Vec<&String> = lines.iter().filter(|l| l.contains(BPF_LOG)).collect();
    assert!(bpf.is_empty(), "{bpf:?}");
    drop(targets);
    agent.stop();
}
