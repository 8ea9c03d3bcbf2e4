//! A pid that is gone, is not a Go program, or runs an unsupported Go
//! release gets one clear log line, and the agent serves the others.
mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use support::{Agent, Target};

#[test]
fn bad_pids_are_reported_and_the_rest_is_served() {
    if !support::have_root() {
        return;
    }
    let go = support::go_tool("1.27.3");
    let old_go = support::debian_go();
    if !support::prerequisite(
        go.is_some(),
        "Go 1.27.3 is not installed (cargo xtask setup)",
    ) || !support::prerequisite(
        old_go.is_some(),
        "Debian's golang-go (Go 1.19) is not installed",
    ) {
        return;
    }
    let good_bin = support::build_fixture("gcload", &go.unwrap(), "1.27.3", &[]);
    let old_bin = support::build_fixture("idle", &old_go.unwrap(), "debian", &[]);

    let mut good = Target::spawn(&good_bin, &["2", "0"]);
    let old = Target::spawn(&old_bin, &[]);
    let mut not_go = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("sleep");
    let mut dead = Command::new("true").spawn().expect("true");
    let dead_pid = dead.id();
    dead.wait().unwrap();

    let mut agent = Agent::spawn(&[dead_pid, not_go.id(), good.pid, old.pid]);
    let line = agent.wait_log(&format!("pid {dead_pid}:"), Duration::from_secs(30));
    assert!(line.contains("no such process"), "{line}");
    let line = agent.wait_log(&format!("pid {}:", not_go.id()), Duration::from_secs(30));
    assert!(line.contains("not a Go program"), "{line}");
    let line = agent.wait_log(&format!("pid {}:", old.pid), Duration::from_secs(30));
    assert!(
        line.contains("go1.19")
            && line.contains("not supported")
            && line.contains("go1.21 to go1.27"),
        "{line}"
    );

    // Not every requested pid is watched, so not ready; the good one is.
    let (status, _) = agent.get("/readyz");
    assert_eq!(status, 503);
    assert_eq!(agent.get("/healthz").0, 200);
    let pid = good.pid.to_string();
    let m = agent.scrape();
    assert!(m.value("gopulse_probes_attached", &[("pid", &pid)]) >= 3.0);
    for bad in [dead_pid, not_go.id(), old.pid] {
        assert!(
            !m.has("gopulse_probes_attached", &[("pid", &bad.to_string())]),
            "pid {bad} has series"
        );
    }

    good.send("go");
    let truth: serde_json::Value =
        serde_json::from_str(&good.read_line(Duration::from_secs(60))).unwrap();
    let cycles = truth["numgc"].as_f64().unwrap();
    assert_eq!(cycles, 2.0);
    let m = agent.scrape_until(Duration::from_secs(10), |m| {
        m.value("gopulse_gc_cycles_total", &[("pid", &pid)]) >= cycles
    });
    assert_eq!(m.value("gopulse_gc_cycles_total", &[("pid", &pid)]), cycles);

    // When the watched process exits, its series go away.
    good.send("exit");
    good.finish();
    agent.wait_log("process exited", Duration::from_secs(10));
    let m = agent.scrape();
    assert!(!m.has("gopulse_gc_cycles_total", &[("pid", &pid)]));

    let _ = not_go.kill();
    let _ = not_go.wait();
    old.finish();
    agent.stop();
}

#[test]
fn no_pid_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .output()
        .expect("gopulse");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pid"), "{err}");
}

#[test]
fn pid_zero_is_rejected() {
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .args(["--pid", "0"])
        .output()
        .expect("gopulse");
    assert_eq!(out.status.code(), Some(2));
}
