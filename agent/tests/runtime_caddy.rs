//! The Go runtime metrics of a real third-party server (issue 19): Caddy
//! 2.8.4 (Go 1.22) and 2.11.7 (Go 1.26, stripped, sets its own memory
//! limit), each loaded with a few thousand requests, then compared at
//! quiescent moments with what it reports of itself.
//!
//! Its client_golang `/metrics` (on the admin endpoint): the GC goal
//! (`go_memstats_next_gc_bytes`), completed cycles
//! (`go_gc_duration_seconds_count`), and on 2.11.7 GOGC, the memory limit
//! and GOMAXPROCS must equal ours, read before and after (when the two
//! agree: no cycle ran meanwhile). 2.8.4's client_golang exports no GOGC,
//! limit or GOMAXPROCS: that server runs with GOGC, GOMEMLIMIT and
//! GOMAXPROCS set, and ours must be those.
//!
//! Goroutines: client_golang's `go_goroutines` is `runtime.NumGoroutine()`
//! taken inside the scrape, which runs goroutines of its own (the
//! connection, its background reader, client_golang's gatherers, a number
//! that varies from scrape to scrape), and from Go 1.26 leaves out the
//! runtime's own goroutines, which `go_goroutine_count` counts (as
//! `/sched/goroutines` does). So the exact comparison is with the admin
//! endpoint's goroutine profile (`/debug/pprof/goroutine?debug=1`, "total
//! N"): `NumGoroutine()` inside a request that runs exactly two goroutines
//! of its own (the connection and its background reader; its handler
//! starts none). It must be our count, less the system goroutines on Go
//! 1.26+, plus those two; `go_goroutines` must lie above ours by what a
//! scrape runs (2 to 8).
mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Metrics};

/// Rounds of load, each followed by a comparison.
const ROUNDS: usize = 4;
/// Requests per round, over `LOADERS` connections at a time.
const REQUESTS: usize = 3000;
const LOADERS: usize = 4;
/// Attempts at a quiescent comparison before a round fails: the scrape of
/// Caddy's own /metrics allocates, and may finish a GC cycle.
const ATTEMPTS: usize = 5;

/// A Caddy with its admin endpoint (metrics, pprof) and a file server.
struct Caddy {
    child: Child,
    admin: u16,
    site: u16,
}

impl Caddy {
    fn start(bin: &Path, version: &str, dir: &Path, env: &[(&str, &str)]) -> Self {
        let (admin, site) = (support::free_port(), support::free_port());
        let root = dir.join("site");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), "gopulse ".repeat(512)).unwrap();
        let config = dir.join(format!("caddy-{version}.json"));
        std::fs::write(
            &config,
            format!(
                r#"{{"admin": {{"listen": "127.0.0.1:{admin}"}},
                  "apps": {{"http": {{"servers": {{"s": {{"listen": ["127.0.0.1:{site}"],
                    "routes": [{{"handle": [{{"handler": "file_server", "root": "{}"}}]}}]}}}}}}}}}}"#,
                root.display()
            ),
        )
        .unwrap();
        let state = dir.join(format!("caddy-{version}-state"));
        let log = std::fs::File::create(dir.join(format!("caddy-{version}.log"))).unwrap();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("XDG_DATA_HOME", &state)
            .env("XDG_CONFIG_HOME", &state)
            .env("HOME", &state)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut caddy = Self { child, admin, site };
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(site, "/").0 != 200 || get(admin, "/metrics").0 != 200 {
            assert!(
                caddy.child.try_wait().unwrap().is_none(),
                "caddy {version} exited; see {}",
                dir.display()
            );
            assert!(Instant::now() < deadline, "caddy {version} does not answer");
            thread::sleep(Duration::from_millis(100));
        }
        caddy
    }

    /// Its own metrics (client_golang, on the admin endpoint).
    fn metrics(&self) -> Metrics {
        let (status, body) = get(self.admin, "/metrics");
        assert_eq!(status, 200, "caddy /metrics: {body}");
        Metrics::parse(&body)
    }

    /// "total N" of its goroutine profile.
    fn profiled_goroutines(&self) -> i64 {
        let (status, body) = get(self.admin, "/debug/pprof/goroutine?debug=1");
        assert_eq!(status, 200, "caddy pprof: {body}");
        body.lines()
            .find_map(|l| l.strip_prefix("goroutine profile: total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no total in {body:.200}"))
    }

    /// `REQUESTS` GETs of the site, on fresh connections from `LOADERS`
    /// threads.
    fn load(&self) {
        let site = self.site;
        let each = REQUESTS / LOADERS;
        let threads: Vec<_> = (0..LOADERS)
            .map(|_| {
                thread::spawn(move || {
                    for _ in 0..each {
                        assert_eq!(get(site, "/").0, 200);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 GET on its own connection (closed after; no chunked
/// body): status, body.
fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() {
        return (0, String::new());
    }
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

/// Ours, for one process.
struct Ours {
    goal: f64,
    cycles: f64,
    gogc: f64,
    limit: Option<f64>,
    procs: f64,
    goroutines: f64,
    system: f64,
}

fn ours(agent: &Agent, pid: u32) -> Ours {
    let m = agent.scrape();
    let pid = pid.to_string();
    let p = [("pid", pid.as_str())];
    let get = |name: &str| {
        assert!(m.has(name, &p), "no {name} for Caddy:\n{}", m.text);
        m.value(name, &p)
    };
    Ours {
        goal: get("go_memory_gc_goal_bytes"),
        cycles: get("go_memory_gc_cycles_total"),
        gogc: get("go_config_gogc_percent"),
        limit: m
            .has("go_memory_limit_bytes", &p)
            .then(|| m.value("go_memory_limit_bytes", &p)),
        procs: get("go_processor_limit"),
        goroutines: get("go_goroutine_count"),
        system: get("gopulse_goroutine_system"),
    }
}

impl Ours {
    /// The same state: no cycle ended, no setting changed, no goroutine
    /// came or went.
    fn same(&self, o: &Ours) -> bool {
        (
            self.goal,
            self.cycles,
            self.gogc,
            self.limit,
            self.procs,
            self.goroutines,
        ) == (o.goal, o.cycles, o.gogc, o.limit, o.procs, o.goroutines)
    }

    /// `runtime.NumGoroutine()`: without the runtime's own goroutines,
    /// which Go 1.26+ counts in /sched/goroutines.
    fn num_goroutine(&self, minor: u32) -> i64 {
        let n = if minor >= 26 {
            self.goroutines - self.system
        } else {
            self.goroutines
        };
        n as i64
    }
}

/// What a release's settings are checked against when its client_golang
/// does not export them.
struct Settings {
    gogc: f64,
    limit: f64,
    procs: f64,
}

fn check(version: &'static str, minor: u32, settings: Option<Settings>, env: &[(&str, &str)]) {
    if !support::have_root() {
        return;
    }
    let Some(bin) = support::caddy_binary(version) else {
        assert!(!support::prerequisite(
            false,
            &format!("Caddy {version} is not installed (cargo xtask setup)")
        ));
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("runtime-caddy-{version}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let caddy = Caddy::start(&bin, version, &dir, env);
    let pid = caddy.child.id();
    let agent = Agent::spawn(&[pid]);
    agent.wait_ready(Duration::from_secs(60));
    let mut compared = 0;
    for round in 0..ROUNDS {
        caddy.load();
        thread::sleep(Duration::from_millis(500));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let before = ours(&agent, pid);
            let theirs = caddy.metrics();
            let mid = ours(&agent, pid);
            let profiled = caddy.profiled_goroutines();
            let after = ours(&agent, pid);
            if !(before.same(&mid) && mid.same(&after)) {
                // A cycle ended (their scrape allocates), or a goroutine of
                // Caddy's own came or went: not a still moment.
                assert!(attempt < ATTEMPTS, "round {round}: never still");
                thread::sleep(Duration::from_millis(300));
                continue;
            }
            let at = format!("caddy {version} round {round}");
            let v = |name: &str| {
                assert!(theirs.has(name, &[]), "{at}: no {name} in its /metrics");
                theirs.value(name, &[])
            };
            assert_eq!(before.goal, v("go_memstats_next_gc_bytes"), "{at}: goal");
            assert_eq!(
                before.cycles,
                v("go_gc_duration_seconds_count"),
                "{at}: cycles"
            );
            match &settings {
                None => {
                    assert_eq!(before.gogc, v("go_gc_gogc_percent"), "{at}: GOGC");
                    assert_eq!(
                        before.limit,
                        Some(v("go_gc_gomemlimit_bytes")),
                        "{at}: limit"
                    );
                    assert_eq!(
                        before.procs,
                        v("go_sched_gomaxprocs_threads"),
                        "{at}: GOMAXPROCS"
                    );
                }
                Some(s) => {
                    for name in [
                        "go_gc_gogc_percent",
                        "go_gc_gomemlimit_bytes",
                        "go_sched_gomaxprocs_threads",
                    ] {
                        assert!(!theirs.has(name, &[]), "{at}: {name} is exported now");
                    }
                    assert_eq!(before.gogc, s.gogc, "{at}: GOGC");
                    assert_eq!(before.limit, Some(s.limit), "{at}: limit");
                    assert_eq!(before.procs, s.procs, "{at}: GOMAXPROCS");
                }
            }
            let num = before.num_goroutine(minor);
            assert_eq!(
                profiled,
                num + 2,
                "{at}: goroutine profile total vs ours ({} counted, {} system)",
                before.goroutines,
                before.system
            );
            let scrape_own = v("go_goroutines") as i64 - num;
            assert!(
                (2..=8).contains(&scrape_own),
                "{at}: go_goroutines {} vs our {num}",
                v("go_goroutines")
            );
            eprintln!(
                "RESULT caddy {version} round {round}: goal {} cycles {} GOGC {} limit {:?} \
                 GOMAXPROCS {} equal; goroutines {} (system {}): profile total {profiled} = \
                 NumGoroutine {num} + 2, go_goroutines {} (its scrape's own {scrape_own})",
                before.goal,
                before.cycles,
                before.gogc,
                before.limit,
                before.procs,
                before.goroutines,
                before.system,
                v("go_goroutines"),
            );
            compared += 1;
            break;
        }
    }
    assert_eq!(compared, ROUNDS);
    // Cycles ran under the load: the goal compared was one the pacer set.
    assert!(ours(&agent, pid).cycles >= ROUNDS as f64);
    agent.stop();
}

/// Go 1.22, classic maps; its client_golang exports no GOGC, limit or
/// GOMAXPROCS: they are set here and read back.
#[test]
fn caddy_2_8_4() {
    check(
        "2.8.4",
        22,
        Some(Settings {
            gogc: 150.0,
            limit: (512u64 << 20) as f64,
            procs: 1.0,
        }),
        &[
            ("GOGC", "150"),
            ("GOMEMLIMIT", "512MiB"),
            ("GOMAXPROCS", "1"),
        ],
    );
}

/// Go 1.26, stripped, swiss maps; sets its own memory limit.
#[test]
fn caddy_2_11_7() {
    check("2.11.7", 26, None, &[]);
}
