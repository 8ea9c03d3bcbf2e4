//! Processes that misbehave under the agent: killed or exiting while the
//! probes fire, running exec (into a program that is not Go, into another Go
//! program, from the leader thread or another one), their pid given to a new
//! process, their executable replaced on disk, or built with a Go release
//! gopulse does not support. Each gets its documented outcome and log line;
//! the agent never crashes, no series outlives its process, and no counts
//! carry over from one program or process to the next.
//!
//! (Covered elsewhere: a clean exit in `discovery`; a dead pid, a program
//! that is not Go and Go 1.19 given as `--pid` in `bad_pids`; programs that
//! are not Go in discovery in `discovery`.)
//!
//! Every fixture runs from a copy named for this test run, and the agent
//! watches only those (`--exe-regex`), so other processes on the host do not
//! disturb the counts.
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use support::{Agent, Metrics, Target};

/// A name prefix unique to this test in this run.
fn prefix(test: &str) -> String {
    format!("pf{}{test}-", std::process::id())
}

fn tmp_dir(prefix: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}bin"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The faults fixture built with Go 1.27.3 (`a`) and 1.23.9 (`b`), copied to
/// `<prefix>a` and `<prefix>b`; `None` when a toolchain is missing (and that
/// is allowed).
fn builds(prefix: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = tmp_dir(prefix);
    let mut out = Vec::new();
    for (version, name) in [("1.27.3", "a"), ("1.23.9", "b")] {
        let go = support::go_or_skip(version)?;
        let built = support::build_fixture("faults", &go, version, &[]);
        let path = dir.join(format!("{prefix}{name}"));
        std::fs::copy(&built, &path).unwrap();
        out.push(path);
    }
    let b = out.pop()?;
    Some((out.pop()?, b))
}

const GO_A: &str = "go1.27.3";
const GO_B: &str = "go1.23.9";

fn name_of(bin: &Path) -> String {
    bin.file_name().unwrap().to_string_lossy().into_owned()
}

fn has_series(m: &Metrics, pid: u32) -> bool {
    let pid = pid.to_string();
    m.samples.iter().any(|s| s.labels.get("pid") == Some(&pid))
}

/// Probe hits of `pid`, over every program.
fn hits(m: &Metrics, pid: u32) -> f64 {
    let pid = pid.to_string();
    m.samples
        .iter()
        .filter(|s| s.name == "gopulse_probe_hits_total" && s.labels.get("pid") == Some(&pid))
        .map(|s| s.value)
        .sum()
}

/// Waits until the agent has attached to `pid` as executable `exe`.
fn wait_attached(agent: &Agent, pid: u32, exe: &str) -> Metrics {
    let p = pid.to_string();
    let is = |m: &Metrics| m.value("gopulse_probes_attached", &[("pid", &p), ("exe", exe)]) > 0.0;
    let m = agent.scrape_until(Duration::from_secs(10), is);
    assert!(is(&m), "pid {pid} not attached as {exe}:\n{}", m.text);
    m
}

/// Waits until no series carries `pid`; returns how long that took.
fn wait_gone(agent: &Agent, pid: u32) -> Duration {
    let from = Instant::now();
    let m = agent.scrape_until(Duration::from_secs(5), |m| !has_series(m, pid));
    assert!(
        !has_series(&m, pid),
        "pid {pid}'s series remain:\n{}",
        m.text
    );
    from.elapsed()
}

/// Runs `n` GC cycles in the target; the agent must count exactly the
/// runtime's cycles on the series with `labels` (and `pid`).
fn gc_exact(agent: &Agent, t: &mut Target, n: u32, labels: &[(&str, &str)]) {
    t.send(&format!("gc {n}"));
    let line = t.read_line(Duration::from_secs(60));
    let truth: serde_json::Value = serde_json::from_str(&line).expect("fixture JSON");
    let want = truth["numgc"].as_f64().unwrap();
    assert_eq!(want, f64::from(n));
    let pid = t.pid.to_string();
    let mut labels = labels.to_vec();
    labels.push(("pid", &pid));
    let m = agent.scrape_until(Duration::from_secs(10), |m| m.cycles_seen(&labels) >= want);
    assert_eq!(
        m.cycles_seen(&labels),
        want,
        "pid {pid}: GC cycles, agent vs runtime ({labels:?})"
    );
}

/// Log lines that contain `needle` and name `pid`.
fn log_count(agent: &Agent, pid: u32, needle: &str) -> usize {
    let field = format!("pid={pid}");
    agent
        .log_lines()
        .iter()
        .filter(|l| l.contains(needle) && l.split_whitespace().any(|w| w == field))
        .count()
}

fn wait_log_count(agent: &Agent, pid: u32, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_count(agent, pid, needle) < n {
        assert!(
            Instant::now() < deadline,
            "the agent did not log {needle:?} {n} time(s) for pid {pid}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Clone, Copy, Debug)]
enum End {
    /// SIGKILL.
    Kill,
    /// os.Exit from another goroutine.
    Exit,
}

/// Sets the victim's probes firing nonstop, ends it the way `end` says a
/// little later, and checks its series are gone within a second, with the
/// log line.
fn end_mid_hit(agent: &Agent, mut v: Target, end: End, delay: Duration) {
    let pid = v.pid;
    v.send("churn");
    assert_eq!(v.read_line(Duration::from_secs(10)), "churning");
    let m = agent.scrape_until(Duration::from_secs(5), |m| hits(m, pid) > 100.0);
    assert!(hits(&m, pid) > 100.0, "pid {pid}: probes not firing");
    std::thread::sleep(delay);
    match end {
        End::Kill => v.child.kill().unwrap(),
        End::Exit => v.send("exit"),
    }
    let status = v.child.wait().unwrap();
    match end {
        End::Kill => assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        ),
        End::Exit => assert!(status.success(), "{status}"),
    }
    let took = wait_gone(agent, pid);
    assert!(
        took <= Duration::from_secs(1),
        "pid {pid} ({end:?}): series removed {took:?} after it ended"
    );
    wait_log_count(agent, pid, "process exited; detached", 1);
}

/// After victims ended mid-hit: none of their pids on any series, only the
/// bystander watched, on one set of probes, and its GC cycles exact.
fn check_after_victims(agent: &Agent, bystander: &mut Target, dead: &[u32], exe: &str) {
    let m = agent.scrape();
    for &pid in dead {
        assert!(!has_series(&m, pid), "dead pid {pid} has series");
    }
    assert_eq!(m.value("gopulse_processes_watched", &[]), 1.0);
    assert_eq!(m.value("gopulse_executables_probed", &[]), 1.0);
    let by = bystander.pid.to_string();
    assert_eq!(
        m.value("gopulse_uprobes_attached", &[]),
        m.value("gopulse_probes_attached", &[("pid", &by)])
    );
    // Its GC is off but for the forced cycles: none so far.
    assert_eq!(m.cycles_seen(&[("pid", &by)]), 0.0);
    gc_exact(agent, bystander, 5, &[("exe", exe), ("go_version", GO_A)]);
    assert!(!agent.logged("cannot watch"), "a fixture was not watched");
}

/// Discovery: eight processes (two executables, one shared with a
/// bystander) killed or exiting while their probes fire.
#[test]
fn killed_or_exiting_mid_hit_discovery() {
    if !support::have_root() {
        return;
    }
    let p = prefix("hit");
    let Some((a, b)) = builds(&p) else {
        return;
    };
    let agent = Agent::spawn_with(&[], &["--exe-regex", &format!("^{p}")]);
    let mut bystander = Target::spawn(&a, &[]);
    wait_attached(&agent, bystander.pid, &name_of(&a));
    let mut dead = Vec::new();
    for i in 0..8u32 {
        let bin = if i % 2 == 0 { &a } else { &b };
        let end = if i % 4 < 2 { End::Kill } else { End::Exit };
        let v = Target::spawn(bin, &[]);
        wait_attached(&agent, v.pid, &name_of(bin));
        dead.push(v.pid);
        end_mid_hit(&agent, v, end, Duration::from_millis(37 * u64::from(i)));
    }
    check_after_victims(&agent, &mut bystander, &dead, &name_of(&a));
    agent.stop();
}

/// `--pid`: the same, for processes named on the command line.
#[test]
fn killed_or_exiting_mid_hit_with_pids() {
    if !support::have_root() {
        return;
    }
    let p = prefix("hitpid");
    let Some((a, b)) = builds(&p) else {
        return;
    };
    let mut bystander = Target::spawn(&a, &[]);
    let victims: Vec<(Target, &PathBuf)> = (0..4)
        .map(|i| {
            let bin = if i % 2 == 0 { &a } else { &b };
            (Target::spawn(bin, &[]), bin)
        })
        .collect();
    let mut pids = vec![bystander.pid];
    pids.extend(victims.iter().map(|(v, _)| v.pid));
    let agent = Agent::spawn(&pids);
    agent.wait_ready(Duration::from_secs(30));
    let mut dead = Vec::new();
    for (i, (v, bin)) in victims.into_iter().enumerate() {
        wait_attached(&agent, v.pid, &name_of(bin));
        dead.push(v.pid);
        let end = if i < 2 { End::Kill } else { End::Exit };
        end_mid_hit(&agent, v, end, Duration::from_millis(53 * i as u64));
    }
    check_after_victims(&agent, &mut bystander, &dead, &name_of(&a));
    // The bystander is still watched: ready.
    assert_eq!(agent.get("/readyz").0, 200);
    agent.stop();
}

/// How a fixture runs exec.
const LEADER: &str = "exec";
const OTHER_THREAD: &str = "exec-thread";

/// Four processes of `a` run exec: into /bin/sleep (from the leader thread
/// and from another), into `b`, and into `a` again. Each was watched with 3
/// GC cycles counted first.
fn exec_cases(discovery: bool) {
    if !support::have_root() {
        return;
    }
    let p = prefix(if discovery { "exec" } else { "execpid" });
    let Some((a, b)) = builds(&p) else {
        return;
    };
    let (name_a, name_b) = (name_of(&a), name_of(&b));
    let mut t: Vec<Target> = (0..4).map(|_| Target::spawn(&a, &[])).collect();
    let mut agent = if discovery {
        Agent::spawn_with(&[], &["--exe-regex", &format!("^{p}")])
    } else {
        Agent::spawn(&t.iter().map(|t| t.pid).collect::<Vec<_>>())
    };
    for v in &mut t {
        wait_attached(&agent, v.pid, &name_a);
        gc_exact(&agent, v, 3, &[("exe", &name_a)]);
    }
    let not_go = |m: &Metrics| m.value("gopulse_discovery_skipped_total", &[("reason", "not_go")]);
    let not_go_before = not_go(&agent.scrape());

    // Into a program that is not Go: detached, series gone, said so.
    for (v, how) in t.iter_mut().take(2).zip([LEADER, OTHER_THREAD]) {
        v.send(&format!("{how} /bin/sleep 600"));
        wait_log_count(&agent, v.pid, "process ran exec; detached", 1);
        wait_gone(&agent, v.pid);
        assert_eq!(
            log_count(&agent, v.pid, "process exited"),
            0,
            "pid {} ran exec ({how}) but was logged as exited",
            v.pid
        );
        if !discovery {
            let line = agent.wait_log(
                &format!("pid {}: cannot watch its new program", v.pid),
                Duration::from_secs(10),
            );
            assert!(line.contains("not a Go program"), "{line}");
        }
    }
    if discovery {
        let m = agent.scrape_until(Duration::from_secs(5), |m| not_go(m) >= not_go_before + 2.0);
        assert!(not_go(&m) >= not_go_before + 2.0, "sleep not judged");
    } else {
        // Named processes that no longer run Go: not ready.
        assert_eq!(agent.get("/readyz").0, 503);
    }

    // Into another Go program: watched as that one, counted from zero.
    let v = &mut t[2];
    v.send(&format!("{OTHER_THREAD} {}", b.display()));
    assert_eq!(
        v.read_line(Duration::from_secs(30)),
        format!("ready {}", v.pid)
    );
    wait_attached(&agent, v.pid, &name_b);
    gc_exact(&agent, v, 2, &[("exe", &name_b), ("go_version", GO_B)]);
    let pid = v.pid.to_string();
    let m = agent.scrape();
    assert!(
        !m.has(
            "gopulse_gc_pause_seconds_count",
            &[("pid", &pid), ("exe", &name_a)]
        ),
        "pid {pid} keeps series of the program it left"
    );

    // Into the same program again: the same labels, counts from zero.
    let v = &mut t[3];
    v.send(&format!("{LEADER} {}", a.display()));
    assert_eq!(
        v.read_line(Duration::from_secs(30)),
        format!("ready {}", v.pid)
    );
    wait_log_count(&agent, v.pid, "process ran exec; detached", 1);
    wait_log_count(&agent, v.pid, "watching process", 2);
    gc_exact(&agent, v, 2, &[("exe", &name_a), ("go_version", GO_A)]);

    let m = agent.scrape();
    assert_eq!(m.value("gopulse_processes_watched", &[]), 2.0);
    assert!(
        !agent.logged("cannot watch: "),
        "a Go program was not watched"
    );
    if !discovery {
        // Only the two that run sleep now are named and unwatched.
        assert_eq!(agent.get("/readyz").0, 503);
    }
    drop(t);
    agent.stop();
}

#[test]
fn exec_discovery() {
    exec_cases(true);
}

#[test]
fn exec_with_pids() {
    exec_cases(false);
}

/// A process of `bin` whose pid is `pid` (the kernel's last pid set just
/// below it, until no other process on the host takes it first); `None`
/// after 500 tries.
fn spawn_with_pid(bin: &Path, pid: u32) -> Option<Target> {
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let t = Target::spawn(bin, &[]);
        if t.pid == pid {
            return Some(t);
        }
    }
    None
}

/// A watched process exits and a new process of the same executable gets
/// its pid: with discovery it is watched with series of its own (its counts
/// from zero, not the old process's); with `--pid` it is not the process
/// named, and is not watched.
fn pid_reuse(discovery: bool) {
    if !support::have_root() {
        return;
    }
    let p = prefix(if discovery { "reuse" } else { "reusepid" });
    let Some((a, _)) = builds(&p) else {
        return;
    };
    let name_a = name_of(&a);
    let mut old = Target::spawn(&a, &[]);
    let pid = old.pid;
    let agent = if discovery {
        Agent::spawn_with(&[], &["--exe-regex", &format!("^{p}")])
    } else {
        Agent::spawn(&[pid])
    };
    wait_attached(&agent, pid, &name_a);
    gc_exact(&agent, &mut old, 4, &[("exe", &name_a)]);
    old.finish();
    wait_gone(&agent, pid);
    wait_log_count(&agent, pid, "process exited; detached", 1);

    let Some(mut new) = spawn_with_pid(&a, pid) else {
        panic!("no new process got pid {pid} in 500 tries");
    };
    eprintln!("RESULT pid {pid} reused");
    if discovery {
        wait_attached(&agent, pid, &name_a);
        assert_eq!(log_count(&agent, pid, "watching process"), 2);
        gc_exact(
            &agent,
            &mut new,
            2,
            &[("exe", &name_a), ("go_version", GO_A)],
        );
    } else {
        // Its exec event has come and gone by now.
        std::thread::sleep(Duration::from_millis(1500));
        let m = agent.scrape();
        assert!(
            !has_series(&m, pid),
            "a new process on a named pid is watched"
        );
        assert_eq!(log_count(&agent, pid, "watching process"), 1);
    }
    new.finish();
    agent.stop();
}

#[test]
fn pid_reuse_discovery() {
    pid_reuse(true);
}

#[test]
fn pid_reuse_with_pids() {
    pid_reuse(false);
}

/// An executable replaced on disk while its process runs: by rename (a new
/// file), which is how upgrades are made; writing in place is refused by the
/// kernel (ETXTBSY) while it runs. The running
/// process stays watched as the program it runs; a process started from the
/// path afterwards is read afresh (`executable="read"`), never taken for
/// the old file. Then rewritten in place (`cp`, `cp -p`) right after its last
/// process exits and started at once, repeatedly: each new program runs and
/// is counted exactly (it never starts with the old program's probes).
#[test]
fn binary_replaced_on_disk_discovery() {
    if !support::have_root() {
        return;
    }
    let p = prefix("repl");
    let Some((a, b)) = builds(&p) else {
        return;
    };
    let app = tmp_dir(&p).join(format!("{p}app"));
    std::fs::copy(&a, &app).unwrap();
    let name = name_of(&app);
    let agent = Agent::spawn_with(&[], &["--exe-regex", &format!("^{p}")]);
    let mut x = Target::spawn(&app, &[]);
    wait_attached(&agent, x.pid, &name);
    assert_eq!(log_count(&agent, x.pid, "executable=\"read\""), 1);

    // Replaced by rename with another Go build.
    let staged = app.with_extension("new");
    std::fs::copy(&b, &staged).unwrap();
    std::fs::rename(&staged, &app).unwrap();
    gc_exact(&agent, &mut x, 3, &[("exe", &name), ("go_version", GO_A)]);
    let mut y = Target::spawn(&app, &[]);
    wait_attached(&agent, y.pid, &name);
    assert_eq!(log_count(&agent, y.pid, "executable=\"read\""), 1);
    gc_exact(&agent, &mut y, 2, &[("exe", &name), ("go_version", GO_B)]);
    // X's numbers are its own.
    let m = agent.scrape();
    assert_eq!(
        m.cycles_seen(&[("pid", &x.pid.to_string()), ("go_version", GO_A)]),
        3.0
    );
    assert_eq!(m.value("gopulse_executables_probed", &[]), 2.0);

    // In place: refused while it runs.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&app)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{err}");
    x.finish();
    y.finish();

    // In place once its last process has exited (`cp` over it, as a
    // redeploy does), and started at once, again and again: the new program
    // must never meet the old program's probes (the kernel plants a
    // uprobe's saved instruction in every process that maps the file while
    // it is registered). `cp -p` keeps the mtime.
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&app).unwrap());
    let mut last = Target::spawn(&app, &[]);
    wait_attached(&agent, last.pid, &name);
    for round in 0..8 {
        let (build, go) = if round % 2 == 0 {
            (&a, GO_A)
        } else {
            (&b, GO_B)
        };
        let keep = if round % 4 < 2 {
            "--no-preserve=all"
        } else {
            "-p"
        };
        last.finish();
        let cp = Command::new("cp")
            .arg(keep)
            .arg(build)
            .arg(&app)
            .status()
            .unwrap();
        assert!(cp.success(), "cp {keep}: {cp}");
        let mut t = Target::spawn(&app, &[]);
        wait_attached(&agent, t.pid, &name);
        gc_exact(&agent, &mut t, 2, &[("exe", &name), ("go_version", go)]);
        last = t;
    }
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&app).unwrap()),
        inode,
        "cp wrote another file"
    );
    last.finish();
    agent.stop();
}

/// `--pid` on a process whose executable was replaced (by rename) before the
/// agent started: `/proc/PID/exe` says `(deleted)`, the process is watched
/// all the same, under its file's name, with exact counts.
#[test]
fn binary_replaced_before_the_agent_with_pids() {
    if !support::have_root() {
        return;
    }
    let p = prefix("replpid");
    let Some((a, b)) = builds(&p) else {
        return;
    };
    let app = tmp_dir(&p).join(format!("{p}app"));
    std::fs::copy(&a, &app).unwrap();
    let name = name_of(&app);
    let mut x = Target::spawn(&app, &[]);
    let staged = app.with_extension("new");
    std::fs::copy(&b, &staged).unwrap();
    std::fs::rename(&staged, &app).unwrap();
    let link = std::fs::read_link(format!("/proc/{}/exe", x.pid)).unwrap();
    assert!(link.to_string_lossy().ends_with(" (deleted)"), "{link:?}");

    let agent = Agent::spawn(&[x.pid]);
    agent.wait_ready(Duration::from_secs(30));
    wait_attached(&agent, x.pid, &name);
    gc_exact(&agent, &mut x, 3, &[("exe", &name), ("go_version", GO_A)]);
    x.finish();
    agent.stop();
}

/// Discovery and a Go release outside the supported range (Debian's Go
/// 1.19), and a program that is not Go: each process counted by its reason,
/// the Go one logged once per executable with the release and the range,
/// neither given series. (`--pid` on such processes: `bad_pids`.)
#[test]
fn unsupported_go_and_not_go_discovery() {
    if !support::have_root() {
        return;
    }
    let old_go = support::debian_go();
    if !support::prerequisite(
        old_go.is_some(),
        "Debian's golang-go (Go 1.19) is not installed",
    ) {
        return;
    }
    let p = prefix("old");
    let dir = tmp_dir(&p);
    let old_bin = dir.join(format!("{p}go119"));
    std::fs::copy(
        support::build_fixture("idle", &old_go.unwrap(), "debian", &[]),
        &old_bin,
    )
    .unwrap();
    let sleep = dir.join(format!("{p}sleep"));
    std::fs::copy("/bin/sleep", &sleep).unwrap();

    let before = Target::spawn(&old_bin, &[]);
    let mut agent = Agent::spawn_with(
        &[],
        &["--exe-regex", &format!("^{p}"), "--rescan-interval", "1"],
    );
    agent.wait_ready(Duration::from_secs(30));
    let skipped =
        |m: &Metrics, r: &str| m.value("gopulse_discovery_skipped_total", &[("reason", r)]);
    let m = agent.scrape();
    let (unsupported0, not_go0) = (skipped(&m, "unsupported"), skipped(&m, "not_go"));
    assert!(unsupported0 >= 1.0, "{}", m.text);
    let after = Target::spawn(&old_bin, &[]);
    let mut not_go = Command::new(&sleep).arg("600").spawn().unwrap();
    let m = agent.scrape_until(Duration::from_secs(5), |m| {
        skipped(m, "unsupported") > unsupported0 && skipped(m, "not_go") > not_go0
    });
    assert!(skipped(&m, "unsupported") > unsupported0, "{}", m.text);
    assert!(skipped(&m, "not_go") > not_go0, "{}", m.text);
    // Judged once, not again at each rescan.
    std::thread::sleep(Duration::from_millis(2500));
    let m2 = agent.scrape();
    assert_eq!(skipped(&m2, "unsupported"), skipped(&m, "unsupported"));
    for pid in [before.pid, after.pid, not_go.id()] {
        assert!(!has_series(&m2, pid), "pid {pid} has series");
    }
    let line = agent.wait_log("not watching: Go release go1.19", Duration::from_secs(5));
    assert!(
        line.contains("not supported") && line.contains("go1.21 to go1.27"),
        "{line}"
    );
    let exe = format!("exe={}", name_of(&old_bin));
    let lines = agent
        .log_lines()
        .iter()
        .filter(|l| l.contains("not watching") && l.contains(&exe))
        .count();
    assert_eq!(lines, 1, "logged once per executable");
    assert_eq!(m2.value("gopulse_processes_watched", &[]), 0.0);
    let _ = not_go.kill();
    let _ = not_go.wait();
    before.finish();
    after.finish();
    agent.stop();
}
