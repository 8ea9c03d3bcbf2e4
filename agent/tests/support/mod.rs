//! Shared plumbing for the integration tests: Go toolchains, fixture builds,
//! target processes, the agent, and scraping its metrics.
#![allow(dead_code)] // each test binary uses a different part

pub mod cgroup;
pub mod hugo;
pub mod prometheus;
pub mod rotel;

/// A TCP port free on 127.0.0.1 (for servers that cannot take port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

use std::{
    collections::BTreeMap,
    env,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

/// The Go releases the tests cover (kept in step with `cargo xtask setup`).
pub const GO_VERSIONS: &[&str] = &[
    "1.21.13", "1.22.10", "1.23.9", "1.24.11", "1.25.5", "1.26.6", "1.27.3",
];

/// How much slower than native the machine runs the agent and its
/// targets: 1, or what `cargo xtask test --kernel` sets in its emulated
/// guests (`GOPULSE_TEST_SLOWDOWN`). Latency bounds are multiplied by it;
/// counts are never scaled.
pub fn slowdown() -> u32 {
    env::var("GOPULSE_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// A latency bound for this machine: `native` times [`slowdown`].
pub fn scaled(native: Duration) -> Duration {
    native * slowdown()
}

/// Set by `cargo xtask test`: a test that cannot run must fail, not skip.
fn required() -> bool {
    env::var_os("GOPULSE_REQUIRE_BPF").is_some_and(|v| v == "1")
}

/// Stops the test when a prerequisite is missing: a failure under
/// `cargo xtask test`, a visible skip under plain `cargo test`.
#[must_use]
pub fn prerequisite(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if required() {
        panic!("{what} (GOPULSE_REQUIRE_BPF=1: this test must run)");
    }
    eprintln!("SKIPPED: {what}; `cargo xtask test` runs it");
    false
}

/// Root is needed to load BPF programs and attach uprobes.
#[must_use]
pub fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    prerequisite(root, "needs root to load BPF programs and attach uprobes")
}

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("GOPULSE_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("gopulse");
    }
    PathBuf::from(env::var_os("HOME").expect("HOME")).join(".cache/gopulse")
}

/// The `go` binary of a test toolchain; `None` when it is not installed,
/// after [`prerequisite`] said so (a skip, or a failure under `cargo xtask
/// test`).
pub fn go_or_skip(version: &str) -> Option<PathBuf> {
    let go = go_tool(version);
    if prerequisite(
        go.is_some(),
        &format!("Go {version} is not installed (cargo xtask setup)"),
    ) {
        go
    } else {
        None
    }
}

/// The `go` binary of a test toolchain, if installed.
pub fn go_tool(version: &str) -> Option<PathBuf> {
    let go = cache_dir().join("go").join(version).join("go/bin/go");
    go.exists().then_some(go)
}

/// Debian's Go (1.19 on Debian 12): a release gopulse must refuse.
pub fn debian_go() -> Option<PathBuf> {
    let go = PathBuf::from("/usr/bin/go");
    go.exists().then_some(go)
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Builds `tests/fixtures/<name>` with the given `go`, once per test binary.
pub fn build_fixture(name: &str, go: &Path, tag: &str, extra_args: &[&str]) -> PathBuf {
    build_fixture_env(name, go, tag, extra_args, &[])
}

/// [`build_fixture`] with extra environment (e.g. `GOEXPERIMENT`); `tag`
/// must tell such builds apart.
pub fn build_fixture_env(
    name: &str,
    go: &Path,
    tag: &str,
    extra_args: &[&str],
    envs: &[(&str, &str)],
) -> PathBuf {
    build_go_dir(
        &fixture_dir(name),
        &format!("{name}-{tag}"),
        go,
        extra_args,
        envs,
    )
}

/// Builds the Go package in `dir` as `<CARGO_TARGET_TMPDIR>/fixtures/<key>`,
/// once per test binary and key.
pub fn build_go_dir(
    dir: &Path,
    key: &str,
    go: &Path,
    extra_args: &[&str],
    envs: &[(&str, &str)],
) -> PathBuf {
    static LOCKS: OnceLock<Mutex<BTreeMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    let key = key.to_owned();
    let name = key.as_str();
    let lock = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_default()
        .clone();
    let _guard = lock.lock().unwrap();
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(&key);
    // Each test binary builds to its own temporary name, then renames: other
    // test binaries may be running the previous copy.
    let tmp = out_dir.join(format!("{key}.tmp{}", std::process::id()));
    let cache = cache_dir();
    let status = Command::new(go)
        .current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", cache.join("gocache"))
        .env("GOPATH", cache.join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .envs(envs.iter().copied())
        .args(["build", "-o"])
        .arg(&tmp)
        .args(extra_args)
        .arg(".")
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", go.display()));
    assert!(
        status.success(),
        "building fixture {name} with {}",
        go.display()
    );
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// A running fixture speaking the line protocol (`ready <pid>` first).
pub struct Target {
    pub child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Target {
    pub fn spawn(bin: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut t = Self {
            child,
            pid: 0,
            stdin,
            lines: rx,
        };
        let ready = t.read_line(Duration::from_secs(30));
        let pid = ready
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("fixture said {ready:?}, expected `ready <pid>`"));
        assert_eq!(pid, t.child.id());
        t.pid = pid;
        t
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn read_line(&mut self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("fixture {} printed nothing in {timeout:?}: {e}", self.pid))
    }

    /// A line the fixture printed, if one is waiting.
    pub fn try_read_line(&mut self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    /// Closes stdin and waits for a clean exit.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "fixture exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "fixture did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Echoes a child's stderr (each line after `[prefix]`) and keeps its
/// lines for the test to search.
pub fn tee_stderr(child: &mut Child, prefix: String) -> Arc<Mutex<Vec<String>>> {
    let stderr = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{prefix}] {line}");
            sink.lock().unwrap().push(line);
        }
    });
    log
}

/// `host:port` from the agent's "serving http://ADDR/..." log line.
pub fn served_addr(line: &str) -> Option<String> {
    let rest = line.split("serving http://").nth(1)?;
    rest.split('/').next().map(str::to_owned)
}

/// A running agent.
pub struct Agent {
    child: Child,
    pub addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    pub fn spawn(pids: &[u32]) -> Self {
        Self::spawn_with(pids, &[])
    }

    /// [`Agent::spawn`] with extra command-line flags.
    pub fn spawn_with(pids: &[u32], flags: &[&str]) -> Self {
        Self::spawn_env(pids, flags, &[])
    }

    /// [`Agent::spawn_with`] with extra environment variables.
    pub fn spawn_env(pids: &[u32], flags: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut agent = Self::start(pids, flags, envs);
        agent.wait_serving();
        agent
    }

    /// [`Agent::spawn_env`] without waiting for it to serve.
    pub fn start(pids: &[u32], flags: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gopulse"));
        cmd.args(flags).envs(envs.iter().copied());
        for pid in pids {
            cmd.arg("--pid").arg(pid.to_string());
        }
        // Collected five times a second unless the test says otherwise.
        if !flags.contains(&"--poll-interval-ms") {
            cmd.args(["--poll-interval-ms", "200"]);
        }
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting gopulse");
        let log = tee_stderr(&mut child, "gopulse".to_owned());
        Self {
            child,
            addr: String::new(),
            log,
        }
    }

    /// Waits until it serves, and notes where.
    pub fn wait_serving(&mut self) {
        let line = self.wait_log("serving http://", Duration::from_secs(30));
        self.addr = served_addr(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("gopulse exited ({status}) before logging {needle:?}");
            }
            assert!(
                Instant::now() < deadline,
                "gopulse did not log {needle:?} within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.addr, path)
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.get("/readyz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "gopulse not ready within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn scrape(&self) -> Metrics {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        Metrics::parse(&body)
    }

    /// Scrapes until `done` holds, then returns that scrape.
    pub fn scrape_until(&self, timeout: Duration, done: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.scrape();
            if done(&m) || Instant::now() >= deadline {
                return m;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// SIGTERM, and expect a clean exit.
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "gopulse exited with {status} on SIGTERM");
                return;
            }
            assert!(Instant::now() < deadline, "gopulse ignored SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 GET (the agent's endpoints are all small).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response {resp:?}"));
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// One sample of the exposition: name, labels, value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    /// The value as written (integers beyond 2^53 are exact only here).
    pub raw: String,
}

/// A parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("sample value"),
                raw: value.to_owned(),
            });
        }
        Self {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of the one series matching `name` and every `labels` pair;
    /// 0 when absent (counters that never moved).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?} matches {} series",
            matching.len()
        );
        matching.first().map_or(0.0, |s| s.value)
    }

    /// The value of the one series matching `name` and `labels` as written,
    /// if there is one.
    pub fn raw(&self, name: &str, labels: &[(&str, &str)]) -> Option<&str> {
        let mut matching = self.samples.iter().filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        });
        let first = matching.next();
        assert!(
            matching.next().is_none(),
            "{name} {labels:?} matches many series"
        );
        first.map(|s| s.raw.as_str())
    }

    /// GC cycles the probes saw since the agent attached to the process with
    /// `labels`: its mark-termination pauses (one per cycle).
    pub fn cycles_seen(&self, labels: &[(&str, &str)]) -> f64 {
        let mut l = labels.to_vec();
        l.push(("phase", "mark_termination"));
        self.value("gopulse_gc_pause_seconds_count", &l)
    }

    /// Whether any series of `name` carries `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

impl Agent {
    /// Whether the agent has logged a line containing `needle` so far.
    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

// Third-party Go servers, and the kernel's own figures for the agent's BPF
// programs (the `http_server` test).

/// Caddy releases `cargo xtask setup` installs (xtask's `CADDY_VERSIONS`):
/// 2.8.4 is built with Go 1.22 (classic maps), 2.11.7 with Go 1.26 (swiss
/// tables).
pub const CADDY_VERSIONS: &[&str] = &["2.8.4", "2.11.7"];

/// rotel (PyPI `rotel`, installed by `cargo xtask setup`; xtask's
/// ROTEL_VERSION).
pub const ROTEL_VERSION: &str = "0.0.1a15";

/// `<cache>/rotel/<version>/rotel/rotel-agent`, if installed.
pub fn rotel_binary() -> Option<PathBuf> {
    let bin = cache_dir()
        .join("rotel")
        .join(ROTEL_VERSION)
        .join("rotel/rotel-agent");
    bin.exists().then_some(bin)
}

/// `rotel start --exporter blackhole` (further arguments to add): every
/// flag can also come from a `ROTEL_*` variable, so none may leak in.
pub fn rotel_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in env::vars_os() {
        if k.to_string_lossy().starts_with("ROTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["start", "--exporter", "blackhole"]);
    cmd
}

/// `<cache>/caddy/<version>/bin/caddy`, if installed.
pub fn caddy_binary(version: &str) -> Option<PathBuf> {
    let caddy = cache_dir().join("caddy").join(version).join("bin/caddy");
    caddy.exists().then_some(caddy)
}

/// The Traefik release `cargo xtask setup` installs (xtask/src/project.rs,
/// TRAEFIK_VERSION): a 185 MB stripped Go server.
pub const TRAEFIK_VERSION: &str = "3.7.15";

/// `<cache>/traefik/<version>/bin/traefik`, if installed.
pub fn traefik_binary() -> Option<PathBuf> {
    let traefik = cache_dir()
        .join("traefik")
        .join(TRAEFIK_VERSION)
        .join("bin/traefik");
    traefik.exists().then_some(traefik)
}

/// The map growth programs, by name (`gopulse_probe_hits_total{probe}`).
pub const GROWTH_PROBES: &[&str] = &[
    "grow_classic",
    "grow_to_table",
    "grow_table",
    "split_table",
    "rehash_table",
    "prune_table",
    "prune_body",
];

/// `go tool nm -size` of a binary: name → (address, size) of text symbols.
pub fn nm(go: &Path, bin: &Path) -> BTreeMap<String, (u64, u64)> {
    let out = Command::new(go)
        .args(["tool", "nm", "-size"])
        .arg(bin)
        .output()
        .unwrap();
    assert!(out.status.success(), "go tool nm {}", bin.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut c = l.split_whitespace();
            let addr = u64::from_str_radix(c.next()?, 16).ok()?;
            let size = c.next()?.parse().ok()?;
            let kind = c.next()?;
            let name = c.next()?;
            (kind == "T" || kind == "t").then(|| (name.to_owned(), (addr, size)))
        })
        .collect()
}

// Profile-guided builds (`-pgo`): a profile the maps fixture records of its
// map-growth-heavy hot loop, and what the compiler made of it.

/// The swiss runtime's table growth and its only caller.
pub const SWISS_GROW_FN: &str = "internal/runtime/maps.(*table).grow";
pub const SWISS_SPLIT_FN: &str = "internal/runtime/maps.(*table).split";
pub const SWISS_REHASH_FN: &str = "internal/runtime/maps.(*table).rehash";

/// A CPU profile of the maps fixture's hot loop (`GOPULSE_MAPS_PROFILE`,
/// built and run with Go `version`), recorded once per test binary and
/// release: `-pgo=<it>` builds of any fixture have the runtime's map code
/// optimised for map growth.
pub fn maps_profile(go: &Path, version: &str) -> PathBuf {
    static PROFILES: OnceLock<Mutex<BTreeMap<String, PathBuf>>> = OnceLock::new();
    let mut profiles = PROFILES.get_or_init(Default::default).lock().unwrap();
    if let Some(p) = profiles.get(version) {
        return p.clone();
    }
    let bin = build_fixture("maps", go, &format!("{version}-default"), &[]);
    // Some recordings (2 of 24 measured on Go 1.24) catch the GC hot
    // enough that the compiler copies startTheWorldWithSema into a GC
    // closure (gcMarkTermination.func3, gcStart.func3), where no probe
    // sees the pause end (the agent says so when it attaches: a known gap
    // of PGO builds, README). The tests take a recording that leaves the
    // GC's functions whole, as most do.
    for attempt in 0..5 {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("fixtures")
            .join(format!(
                "maps-{version}-{}-{attempt}.pprof",
                std::process::id()
            ));
        let run = Command::new(&bin)
            .env("GOPULSE_MAPS_PROFILE", &out)
            .stderr(Stdio::null()) // the runtime's note on the profile rate
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
        assert!(run.success(), "recording a profile with {}", bin.display());
        if restarts_out_of_line(go, version, &out, attempt) {
            profiles.insert(version.to_owned(), out.clone());
            return out;
        }
    }
    panic!(
        "go{version}: five profiles in a row inlined startTheWorldWithSema into the GC's mark termination"
    );
}

/// Whether the GC functions the probes sit on (`stopTheWorldWithSema`,
/// `startTheWorldWithSema`, `gcMarkTermination`) stay whole, with no copy
/// inlined anywhere, in the fixtures built with `profile`.
fn restarts_out_of_line(go: &Path, version: &str, profile: &Path, attempt: usize) -> bool {
    let flag = format!("-pgo={}", profile.display());
    let wanted = gopulse_agent::plan::wanted_functions();
    ["gcload", "maps"].iter().all(|fixture| {
        let tag = format!("{version}-pgo-probe{attempt}");
        let bin = build_fixture(fixture, go, &tag, &[&flag]);
        let found = gopulse_agent::inspect::inspect(&bin, &wanted)
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        gopulse_agent::plan::REQUIRED_FUNCTIONS
            .iter()
            .all(|f| found.inlined_into(f).next().is_none())
    })
}

/// `-pgo=<the maps profile>` for Go `version`.
pub fn pgo_flag(go: &Path, version: &str) -> String {
    format!("-pgo={}", maps_profile(go, version).display())
}

/// Checks that a swiss `-pgo` build has no `grow` or `split` of its own,
/// both inlined into `rehash`, the one the agent then probes. (Every swiss
/// release, 1.24 to 1.27, does so with the maps profile; a profile that did
/// not would make the test that calls this moot, so it fails.)
pub fn assert_grow_split_inlined(go: &Path, bin: &Path, what: &str) {
    let symbols = nm(go, bin);
    for gone in [SWISS_GROW_FN, SWISS_SPLIT_FN] {
        assert!(
            !symbols.contains_key(gone),
            "{what}: the -pgo build kept {gone} out of line ({})",
            bin.display()
        );
    }
    assert!(
        symbols.contains_key(SWISS_REHASH_FN),
        "{what}: the -pgo build has no {SWISS_REHASH_FN}"
    );
}

/// Root, the Go toolchain `go_version` and bpftool: `None` (skipped, or
/// a failure under `GOPULSE_REQUIRE_BPF=1`) if one is missing.
pub fn root_go_bpftool(go_version: &str) -> Option<(PathBuf, PathBuf)> {
    if !have_root() {
        return None;
    }
    let go = go_or_skip(go_version)?;
    let bpftool = bpftool();
    if !prerequisite(bpftool.is_some(), "bpftool is not installed") {
        return None;
    }
    Some((go, bpftool?))
}

/// `bpftool` (Debian package `bpftool`), if it runs.
pub fn bpftool() -> Option<PathBuf> {
    ["bpftool", "/usr/sbin/bpftool", "/sbin/bpftool"]
        .iter()
        .map(PathBuf::from)
        .find(|bin| {
            Command::new(bin)
                .arg("version")
                .output()
                .is_ok_and(|out| out.status.success())
        })
}

/// One BPF program as the kernel reports it (`bpftool -j prog show`).
#[derive(Clone, Debug)]
pub struct KernelProg {
    pub id: u32,
    /// The kernel keeps the first 15 bytes of the name.
    pub name: String,
    /// Run time and runs while the kernel's BPF statistics were enabled.
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl KernelProg {
    /// Whether this is the program `full_name` (the kernel truncates names).
    pub fn is(&self, full_name: &str) -> bool {
        let n = full_name.len().min(15);
        self.name == full_name[..n]
    }

    /// Mean run time in ns (0 without runs).
    pub fn ns_per_run(&self) -> f64 {
        if self.run_cnt == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.run_cnt as f64
        }
    }
}

/// The kernel's figures for the programs `ids`, from `bpftool -j prog show`.
pub fn kernel_prog_stats(bpftool: &Path, ids: &std::collections::BTreeSet<u32>) -> Vec<KernelProg> {
    let out = Command::new(bpftool)
        .args(["-j", "prog", "show"])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bpftool.display()));
    assert!(
        out.status.success(),
        "bpftool prog show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let progs: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("bpftool -j prog show prints a JSON array");
    let found: Vec<KernelProg> = progs
        .iter()
        .filter_map(|p| {
            let id = u32::try_from(p["id"].as_u64()?).ok()?;
            ids.contains(&id).then(|| KernelProg {
                id,
                name: p["name"].as_str().unwrap_or("").to_owned(),
                // Absent until the program has run with statistics on.
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
            })
        })
        .collect();
    assert_eq!(
        found.len(),
        ids.len(),
        "bpftool lists {} of the programs {ids:?}",
        found.len()
    );
    found
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line the agent has logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The ids of the BPF programs the agent holds: the `prog_id:` lines of
    /// its open file descriptors (programs and the links to them).
    pub fn bpf_prog_ids(&self) -> std::collections::BTreeSet<u32> {
        let dir = format!("/proc/{}/fdinfo", self.pid());
        let mut ids = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir}: {e}")) {
            // An fd closed since the listing is no loss.
            let Ok(text) = std::fs::read_to_string(entry.unwrap().path()) else {
                continue;
            };
            ids.extend(text.lines().filter_map(|l| {
                l.strip_prefix("prog_id:")
                    .and_then(|id| id.trim().parse::<u32>().ok())
            }));
        }
        ids
    }
}

// The deployment (deploy/): its checking tools and the DaemonSet's
// capability list (the `deploy_manifests` and `least_privilege` tests).

/// The deploy tools `cargo xtask setup` installs (xtask's KUBECTL_VERSION,
/// KUBERNETES_VALIDATE_VERSION, CHECKOV_VERSION).
pub const KUBECTL_VERSION: &str = "1.37.1";
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
pub const CHECKOV_VERSION: &str = "3.3.30";

/// `<cache>/kubectl/<version>/bin/kubectl`, if installed.
pub fn kubectl_binary() -> Option<PathBuf> {
    let bin = cache_dir()
        .join("kubectl")
        .join(KUBECTL_VERSION)
        .join("bin/kubectl");
    bin.exists().then_some(bin)
}

/// `<cache>/<package>/<version>`, the PYTHONPATH of a Python tool, if
/// installed.
pub fn python_tool_dir(package: &str, version: &str) -> Option<PathBuf> {
    let dir = cache_dir().join(package).join(version);
    dir.is_dir().then_some(dir)
}

/// The repository's `deploy/`.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The base DaemonSet, which holds the capability list.
pub fn daemonset_path() -> PathBuf {
    deploy_dir().join("kubernetes/base/daemonset.yaml")
}

/// The capabilities the DaemonSet's container adds
/// (`securityContext.capabilities.add`), as written there (`SYS_ADMIN`):
/// the block list after the one `add:` under `capabilities:`. Read by
/// lines, as no YAML parser is a dependency; the `deploy_manifests` test
/// checks it against a real YAML parser on the rendered manifests.
pub fn daemonset_capabilities() -> Vec<String> {
    let path = daemonset_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim() != "capabilities:")
        .skip_while(|l| l.trim() != "add:");
    let add = lines
        .next()
        .unwrap_or_else(|| panic!("no capabilities.add in {}", path.display()));
    let caps: Vec<String> = lines
        .take_while(|l| indent(l) >= indent(add) && l.trim_start().starts_with("- "))
        .map(|l| l.trim_start()[2..].trim().trim_matches('"').to_owned())
        .collect();
    assert!(
        !caps.is_empty(),
        "empty capabilities.add in {}",
        path.display()
    );
    caps
}

// Faults and shutdown (the `shutdown`, `churn` and `scrapes` tests): signals
// to the agent, and what of its BPF state the kernel still holds.

impl Agent {
    /// Sends `signal` (`libc::SIGTERM`, ...) to the agent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits up to `timeout` for the agent to exit; its status, or `None`
    /// if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// The ids of the BPF maps the agent holds (`map_id:` lines of its
    /// open file descriptors).
    pub fn bpf_map_ids(&self) -> std::collections::BTreeSet<u32> {
        fd_ids(self.pid(), "map_id:")
    }
}

/// The ids after `key` in the fdinfo of every open descriptor of `pid`.
pub fn fd_ids(pid: u32, key: &str) -> std::collections::BTreeSet<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = std::collections::BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return ids;
    };
    for entry in entries.flatten() {
        // An fd closed since the listing is no loss.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        ids.extend(text.lines().filter_map(|l| {
            l.strip_prefix(key)
                .and_then(|id| id.trim().parse::<u32>().ok())
        }));
    }
    ids
}

/// What the kernel still holds of a BPF user's programs and maps: each
/// program or map of `progs`/`maps` that still exists, every link and
/// perf event (uprobes) to one of the programs, every uprobe_events line
/// naming `exe`, and every /sys/fs/bpf entry named like gopulse or its
/// maps. Empty when all is gone. Ids are the user's own (from its fdinfo):
/// other agents may run on the host, with the same program names.
pub fn kernel_leftovers(
    bpftool: &Path,
    progs: &std::collections::BTreeSet<u32>,
    maps: &std::collections::BTreeSet<u32>,
    exe: &Path,
) -> Vec<String> {
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = Command::new(bpftool)
            .arg("-j")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", bpftool.display()));
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `perf show` prints nothing at all when there is nothing.
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Vec::new();
        }
        serde_json::from_slice(&out.stdout).expect("bpftool prints a JSON array")
    };
    let id_in = |v: &serde_json::Value, key: &str, set: &std::collections::BTreeSet<u32>| {
        v[key]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .is_some_and(|id| set.contains(&id))
    };
    let mut left = Vec::new();
    for p in json(&["prog", "show"]) {
        if id_in(&p, "id", progs) {
            left.push(format!("program {}", p));
        }
    }
    for m in json(&["map", "show"]) {
        if id_in(&m, "id", maps) {
            left.push(format!("map {}", m));
        }
    }
    for l in json(&["link", "show"]) {
        if id_in(&l, "prog_id", progs) {
            left.push(format!("link {}", l));
        }
    }
    let exe_name = exe.to_string_lossy();
    for p in json(&["perf", "show"]) {
        if id_in(&p, "prog_id", progs) || p["filename"].as_str() == Some(&*exe_name) {
            left.push(format!("perf event {}", p));
        }
    }
    for events in [
        "/sys/kernel/tracing/uprobe_events",
        "/sys/kernel/debug/tracing/uprobe_events",
    ] {
        if let Ok(text) = std::fs::read_to_string(events) {
            left.extend(
                text.lines()
                    .filter(|l| l.contains(&*exe_name))
                    .map(|l| format!("{events}: {l}")),
            );
        }
    }
    let names = [
        "gopulse", "PROCS", "STW", "GROWTHS", "PLUMBING", "MAP_SEEN", "LIFE",
    ];
    let mut dirs = vec![PathBuf::from("/sys/fs/bpf")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if names.iter().any(|n| name.contains(n)) {
                left.push(format!("pinned {}", path.display()));
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            }
        }
    }
    left
}

/// Polls [`kernel_leftovers`] until it is empty or `timeout` passes (the
/// kernel frees programs and maps after an RCU grace period); the last
/// leftovers, and how long it took.
pub fn kernel_cleared(
    bpftool: &Path,
    progs: &std::collections::BTreeSet<u32>,
    maps: &std::collections::BTreeSet<u32>,
    exe: &Path,
    timeout: Duration,
) -> (Vec<String>, Duration) {
    let start = Instant::now();
    loop {
        let left = kernel_leftovers(bpftool, progs, maps, exe);
        if left.is_empty() || start.elapsed() >= timeout {
            return (left, start.elapsed());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A copy of `bin` under a name of its own (`<dir>/<name>`), so that
/// kernel objects naming it are this test's, whatever else runs.
/// The fixture's sites without what its hash seed decides: how full a
/// map was when it last grew (which swiss table split last, which classic
/// bucket overflowed) differs between any two runs, agent or not.
pub fn seed_free(sites: &serde_json::Value) -> serde_json::Value {
    let mut sites = sites.clone();
    if let Some(sites) = sites.as_object_mut() {
        for site in sites.values_mut() {
            if let Some(site) = site.as_object_mut() {
                site.remove("at_last_growth");
            }
        }
    }
    sites
}

pub fn private_copy(bin: &Path, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("private-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    std::fs::copy(bin, &out).unwrap_or_else(|e| panic!("copying {}: {e}", bin.display()));
    out
}

/// utime + stime of a process (all its threads), in seconds, from
/// `/proc/PID/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    let rest = &stat[stat.rfind(')').expect("`)` after the name") + 1..];
    // After the name: state (field 3), ..., utime (14), stime (15).
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().expect("a number of clock ticks"))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks > 0, "sysconf(_SC_CLK_TCK) returned {ticks}");
    fields.iter().sum::<u64>() as f64 / ticks as f64
}
