//! Least privilege, proven on the kernel it runs on: the agent runs as a
//! non-root user (65534) holding only the capabilities the DaemonSet adds
//! for this kernel (ambient capabilities through util-linux's `setpriv`, as
//! a runtime with file capabilities or ambient support hands them over), and
//! watches a Go process of another user (root), whose executable it may not
//! read, fully: every GC cycle the process reports, and its map growth
//! probes attached. Twice: finding the process by itself when it starts, as
//! the DaemonSet runs it (exec tracepoint, /proc scan, readiness), and
//! named with `--pid`.
//!
//! Which list: on a kernel with working uprobe_multi links (Linux 6.10+,
//! which the test expects of those; 6.6 to 6.9 as the agent finds), the
//! base's (`deploy/kubernetes/base/daemonset.yaml`: CAP_BPF and
//! CAP_PERFMON, no CAP_SYS_ADMIN); on one without (before 6.6), where the
//! agent falls back to perf-event uprobes, the base's list is refused
//! naming CAP_SYS_ADMIN, and the minimum proven is the base's without
//! CAP_BPF and CAP_PERFMON, with CAP_SYS_ADMIN (the `cap-sys-admin`
//! overlay's, less what its file capabilities need).
//!
//! Then each capability is left out in turn. By default the agent refuses
//! to start, naming it; with `--capability-check warn` it goes on, and the
//! kernel's own refusal shows the capability is really needed (the agent
//! fails, naming it, or cannot watch the process, naming it). Finally the
//! perf-event path without CAP_SYS_ADMIN: the kernel refuses the uprobes
//! (it asks for CAP_SYS_ADMIN since Linux 6.16 and the stable kernels
//! patched in July 2025).
mod support;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use support::{Metrics, Target};

/// The unprivileged user and group the agent runs as (`nobody`, as in the
/// DaemonSet).
const NOBODY: &str = "65534";

/// `SYS_ADMIN` (Kubernetes' spelling) → `sys_admin` (setpriv's).
fn setpriv_name(cap: &str) -> String {
    cap.to_ascii_lowercase()
}

/// `SYS_ADMIN` → `CAP_SYS_ADMIN` (the kernel's and the agent's).
fn kernel_name(cap: &str) -> String {
    format!("CAP_{cap}")
}

/// Files the unprivileged agent must reach: a copy of the agent in a
/// directory everyone may enter (the build's own may sit under a private
/// home), and a copy of the Go fixture readable by root only (mode 0700),
/// so that reading it takes CAP_DAC_READ_SEARCH.
struct Staging {
    dir: PathBuf,
    agent: PathBuf,
    fixture: PathBuf,
}

impl Staging {
    fn new(fixture: &Path) -> Self {
        let dir =
            std::env::temp_dir().join(format!("gopulse-least-privilege-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let agent = dir.join("gopulse");
        std::fs::copy(env!("CARGO_BIN_EXE_gopulse"), &agent).unwrap();
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Named for the run: discovery watches only this (--exe-regex).
        let copy = dir.join(format!("gcload-lp-{}", std::process::id()));
        std::fs::copy(fixture, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o700)).unwrap();
        Self {
            dir,
            agent,
            fixture: copy,
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The agent under `setpriv`, as user and group 65534 with exactly `caps`
/// (inheritable, ambient and bounding sets).
struct Unprivileged {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Unprivileged {
    /// Watching `pid`, or, with `None`, every Go program it discovers, as
    /// the DaemonSet runs it (`flags` then narrow it with --exe-regex).
    fn spawn(agent: &Path, caps: &[String], pid: Option<u32>, flags: &[&str]) -> Self {
        Self::spawn_env(agent, caps, pid, flags, None)
    }

    /// As [`Unprivileged::spawn`], with `GOPULSE_UPROBE_MODE` set to `mode`
    /// (else left as the test's environment has it).
    fn spawn_env(
        agent: &Path,
        caps: &[String],
        pid: Option<u32>,
        flags: &[&str],
        mode: Option<&str>,
    ) -> Self {
        let set: String = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", setpriv_name(c))))
            .collect::<Vec<_>>()
            .join(",");
        let mut child = Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                &format!("--inh-caps={set}"),
                &format!("--ambient-caps={set}"),
                &format!("--bounding-set={set}"),
                "--",
            ])
            .arg(agent)
            .args(pid.iter().flat_map(|p| ["--pid".to_owned(), p.to_string()]))
            .args(["--listen", "127.0.0.1:0", "--poll-interval-ms", "200"])
            .args(["--kubernetes", "off"])
            .args(flags)
            .env("RUST_LOG", "info")
            .envs(mode.map(|m| ("GOPULSE_UPROBE_MODE", m)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting setpriv (util-linux)");
        let log = support::tee_stderr(&mut child, format!("gopulse {set}"));
        Self { child, log }
    }

    /// The address it serves on once it logs it, or how it exited.
    fn started(&mut self, timeout: Duration) -> Result<String, ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.find("serving http://") {
                return Ok(
                    support::served_addr(&line).unwrap_or_else(|| panic!("no address in {line:?}"))
                );
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                thread::sleep(Duration::from_millis(100));
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "the agent neither served nor exited within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn find(&self, needle: &str) -> Option<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scrape(addr: &str) -> Metrics {
    let (status, body) = support::http_get(addr, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}");
    Metrics::parse(&body)
}

/// The agent with `caps` watches the fixture fully: named with --pid, or
/// (`discover`) found by itself when the fixture starts after it, as the
/// DaemonSet runs it (the exec tracepoint, the /proc scan, readiness).
fn watches_fully(staging: &Staging, caps: &[String], discover: bool, path: Uprobes) {
    let name = staging.fixture.file_name().unwrap().to_string_lossy();
    let regex = format!("^{name}$");
    let (mut target, mut agent) = if discover {
        let agent = Unprivileged::spawn(&staging.agent, caps, None, &["--exe-regex", &regex]);
        (None, agent)
    } else {
        let target = Target::spawn(&staging.fixture, &["3", "0"]);
        let agent = Unprivileged::spawn(&staging.agent, caps, Some(target.pid), &[]);
        (Some(target), agent)
    };
    let addr = agent
        .started(support::scaled(Duration::from_secs(30)))
        .unwrap_or_else(|status| {
            panic!(
                "the agent with {caps:?} as user {NOBODY} exited ({status}):\n{}",
                agent.log_text()
            )
        });
    let mut target = match target.take() {
        Some(t) => t,
        None => {
            let deadline = Instant::now() + support::scaled(Duration::from_secs(30));
            while support::http_get(&addr, "/readyz").0 != 200 {
                assert!(
                    Instant::now() < deadline,
                    "not ready:\n{}",
                    agent.log_text()
                );
                thread::sleep(Duration::from_millis(50));
            }
            let t = Target::spawn(&staging.fixture, &["3", "0"]);
            let pid = t.pid.to_string();
            let deadline = Instant::now() + support::scaled(Duration::from_secs(20));
            while scrape(&addr).value("gopulse_map_growth_probes_attached", &[("pid", &pid)]) != 1.0
            {
                assert!(
                    Instant::now() < deadline,
                    "discovery did not attach to {pid}:\n{}",
                    agent.log_text()
                );
                thread::sleep(Duration::from_millis(50));
            }
            t
        }
    };
    target.send("go");
    let truth: serde_json::Value =
        serde_json::from_str(&target.read_line(support::scaled(Duration::from_secs(60)))).unwrap();
    let numgc = truth["numgc"].as_f64().expect("numgc");
    assert!(numgc >= 3.0, "the fixture ran {numgc} GC cycles");
    let pid = target.pid.to_string();
    let labels = [("pid", pid.as_str())];
    let deadline = Instant::now() + support::scaled(Duration::from_secs(20));
    let m = loop {
        let m = scrape(&addr);
        if m.cycles_seen(&labels) == numgc || Instant::now() > deadline {
            break m;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        m.cycles_seen(&labels),
        numgc,
        "GC cycles seen by the agent with {caps:?}:\n{}",
        agent.log_text()
    );
    assert_eq!(
        m.value(
            "gopulse_gc_pause_seconds_count",
            &[("pid", &pid), ("phase", "mark_termination")]
        ),
        numgc
    );
    assert_eq!(
        m.value("gopulse_map_growth_probes_attached", &labels),
        1.0,
        "map growth probes of the agent with {caps:?}"
    );
    assert_eq!(m.value("gopulse_processes_watched", &[]), 1.0);
    assert!(agent.find("cannot watch").is_none(), "{}", agent.log_text());
    assert!(
        agent.find(path.log_line()).is_some(),
        "the agent with {caps:?} did not attach with {}:\n{}",
        path.log_line(),
        agent.log_text()
    );
    assert!(
        agent.find("cannot hold a lease").is_none(),
        "{}",
        agent.log_text()
    );
    target.finish();
}

/// Without `dropped` the agent refuses to start, naming it.
fn refuses_without(staging: &Staging, caps: &[String], dropped: &str) {
    let target = Target::spawn(&staging.fixture, &["3", "0"]);
    let mut agent = Unprivileged::spawn(&staging.agent, caps, Some(target.pid), &[]);
    let name = kernel_name(dropped);
    match agent.started(support::scaled(Duration::from_secs(30))) {
        Err(status) => {
            assert!(!status.success(), "exit status {status} without {name}");
            let log = agent.log_text();
            // Without CAP_SYS_ADMIN and without CAP_BPF or CAP_PERFMON the
            // agent names those, each saying CAP_SYS_ADMIN would do too.
            let named = log.contains(&format!("lacks {name}"))
                || (dropped == "SYS_ADMIN" && log.contains("CAP_SYS_ADMIN would do too"));
            assert!(
                named,
                "the agent without {name} exited without naming it:\n{log}"
            );
        }
        Ok(_) => panic!(
            "the agent started without {name}: the DaemonSet grants more than the agent needs \
             (or the start-up check does not know {name}):\n{}",
            agent.log_text()
        ),
    }
}

/// With the start-up check only warning, the kernel's refusal without
/// `dropped`: the agent exits naming it, or cannot watch the process and
/// says it lacks it.
fn kernel_refuses_without(staging: &Staging, caps: &[String], dropped: &str) {
    let target = Target::spawn(&staging.fixture, &["3", "0"]);
    let mut agent = Unprivileged::spawn(
        &staging.agent,
        caps,
        Some(target.pid),
        &["--capability-check", "warn"],
    );
    let name = kernel_name(dropped);
    if dropped == "LEASE" {
        // Without it the agent watches as before, but cannot lease a root
        // executable: a rewrite in place would not wait for its probes.
        let addr = agent
            .started(support::scaled(Duration::from_secs(30)))
            .unwrap_or_else(|status| panic!("exited ({status}):\n{}", agent.log_text()));
        assert_eq!(scrape(&addr).value("gopulse_processes_watched", &[]), 1.0);
        let line = agent.find("cannot hold a lease").unwrap_or_else(|| {
            panic!(
                "without {name} the agent leased a root executable: {name} is not needed\n{}",
                agent.log_text()
            )
        });
        assert!(line.contains(&format!("lacks {name}")), "{line}");
        eprintln!("RESULT without {name}: the kernel refused the lease");
        return;
    }
    match agent.started(support::scaled(Duration::from_secs(30))) {
        Err(status) => {
            assert!(!status.success());
            let error = agent
                .find("ERROR")
                .unwrap_or_else(|| panic!("no error logged:\n{}", agent.log_text()));
            assert!(error.contains(&name), "{error} does not name {name}");
        }
        Ok(addr) => {
            // --pid: the watch is tried before the agent serves.
            let line = agent.find("cannot watch").unwrap_or_else(|| {
                panic!(
                    "without {name} the agent watched the process: {name} is not needed\n{}",
                    agent.log_text()
                )
            });
            assert!(
                line.contains(&format!("lacks {name}")),
                "{line} does not name {name}"
            );
            assert_eq!(scrape(&addr).value("gopulse_processes_watched", &[]), 0.0);
        }
    }
    eprintln!("RESULT without {name}: the kernel refused what the agent needs it for");
}

/// The way the agent attaches uprobes, as its start-up log says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Uprobes {
    Multi,
    Perf,
}

impl Uprobes {
    fn log_line(self) -> &'static str {
        match self {
            Self::Multi => "uprobes: uprobe_multi links",
            Self::Perf => "uprobes: perf-event uprobes",
        }
    }
}

/// This kernel's (major, minor), from uname's release.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// What the agent does with `caps` on this kernel: attach with uprobe_multi
/// links, or refuse for want of CAP_SYS_ADMIN (no working multi links, so
/// perf-event uprobes).
fn path_with(staging: &Staging, caps: &[String]) -> Uprobes {
    let target = Target::spawn(&staging.fixture, &["3", "0"]);
    let mut agent = Unprivileged::spawn(&staging.agent, caps, Some(target.pid), &[]);
    let path = match agent.started(support::scaled(Duration::from_secs(30))) {
        Ok(_) => Uprobes::Multi,
        Err(_) => Uprobes::Perf,
    };
    let log = agent.log_text();
    match path {
        Uprobes::Multi => assert!(log.contains(Uprobes::Multi.log_line()), "{log}"),
        Uprobes::Perf => assert!(
            log.contains("lacks CAP_SYS_ADMIN") && log.contains("perf-event uprobes"),
            "the agent with {caps:?} refused to start, but not for want of CAP_SYS_ADMIN \
             for perf-event uprobes:\n{log}"
        ),
    }
    path
}

/// With the base's list but perf-event uprobes forced (`--uprobe-mode
/// perf`): refused at start-up naming CAP_SYS_ADMIN, and with the check
/// only warning, every uprobe refused by the kernel.
fn perf_path_needs_sys_admin(staging: &Staging, caps: &[String]) {
    let target = Target::spawn(&staging.fixture, &["3", "0"]);
    let mut agent =
        Unprivileged::spawn_env(&staging.agent, caps, Some(target.pid), &[], Some("perf"));
    match agent.started(support::scaled(Duration::from_secs(30))) {
        Err(status) => {
            assert!(!status.success());
            let log = agent.log_text();
            assert!(log.contains("lacks CAP_SYS_ADMIN"), "{log}");
        }
        Ok(_) => panic!(
            "perf-event uprobes forced without CAP_SYS_ADMIN, and the agent started:\n{}",
            agent.log_text()
        ),
    }
    drop(agent);
    let mut agent = Unprivileged::spawn_env(
        &staging.agent,
        caps,
        Some(target.pid),
        &["--capability-check", "warn"],
        Some("perf"),
    );
    let addr = agent
        .started(support::scaled(Duration::from_secs(30)))
        .unwrap_or_else(|status| {
            panic!(
                "the agent with {caps:?} exited ({status}):\n{}",
                agent.log_text()
            )
        });
    let line = agent.find("cannot watch").unwrap_or_else(|| {
        panic!(
            "{caps:?} were enough for perf-event uprobes on this kernel: it does not ask for \
             CAP_SYS_ADMIN\n{}",
            agent.log_text()
        )
    });
    assert!(
        line.contains("perf_event_open") && line.contains("needs CAP_SYS_ADMIN"),
        "{line}"
    );
    assert_eq!(scrape(&addr).value("gopulse_processes_watched", &[]), 0.0);
    eprintln!("RESULT perf-event uprobes with {caps:?}: refused (CAP_SYS_ADMIN needed)");
}

#[test]
fn agent_needs_exactly_the_daemonsets_capabilities() {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip("1.27.3") else {
        return;
    };
    let setpriv = Command::new("setpriv").arg("--version").output();
    if !support::prerequisite(
        setpriv.is_ok_and(|o| o.status.success()),
        "setpriv (util-linux) is not installed",
    ) {
        return;
    }
    let base = support::daemonset_capabilities();
    assert!(
        !base.iter().any(|c| c == "SYS_ADMIN"),
        "the base DaemonSet grants CAP_SYS_ADMIN: {base:?}"
    );
    let started = Instant::now();
    let fixture = support::build_fixture("gcload", &go, "1.27.3", &[]);
    let staging = Staging::new(&fixture);

    // Kernels from 6.10 have working uprobe_multi links; before 6.6 none.
    let version = kernel_version();
    let path = path_with(&staging, &base);
    if version >= (6, 10) {
        assert_eq!(path, Uprobes::Multi, "Linux {version:?}");
    } else if version < (6, 6) {
        assert_eq!(path, Uprobes::Perf, "Linux {version:?}");
    }
    // Perf-event uprobes: CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON.
    let caps: Vec<String> = match path {
        Uprobes::Multi => base.clone(),
        Uprobes::Perf => std::iter::once("SYS_ADMIN".to_owned())
            .chain(
                base.iter()
                    .filter(|c| !matches!(c.as_str(), "BPF" | "PERFMON"))
                    .cloned(),
            )
            .collect(),
    };
    eprintln!("RESULT Linux {version:?}: {path:?}; capabilities proven: {caps:?}");

    for discover in [true, false] {
        watches_fully(&staging, &caps, discover, path);
        let how = if discover { "discovered" } else { "--pid" };
        eprintln!("RESULT user {NOBODY} with {caps:?}: watched fully ({how})");
    }

    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        refuses_without(&staging, &fewer, dropped);
        kernel_refuses_without(&staging, &fewer, dropped);
    }

    match path {
        Uprobes::Multi => perf_path_needs_sys_admin(&staging, &caps),
        Uprobes::Perf => {
            // CAP_BPF and CAP_PERFMON were enough for uprobes until the
            // kernel reverted to CAP_SYS_ADMIN; they are not here.
            let mut instead: Vec<String> =
                caps.iter().filter(|c| *c != "SYS_ADMIN").cloned().collect();
            instead.extend(["BPF".to_owned(), "PERFMON".to_owned()]);
            perf_path_needs_sys_admin(&staging, &instead);
        }
    }
    eprintln!("RESULT least privilege proven in {:.1?}", started.elapsed());
}
