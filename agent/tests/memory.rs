//! The agent's own memory with a node's worth of work: 100 Go processes
//! (50 of a classic-map build, 50 of a swiss one), found by discovery, each
//! growing maps at 50 sites of its own: 5,000 site series, every growth
//! counted exactly. The agent's resident memory (VmRSS, and its peak,
//! VmHWM) is measured once everything is watched and after scrapes, with
//! `/metrics` only and with OTLP pushing to a real collector (rotel) as
//! well, and must stay within [`RSS_BOUND_KIB`].
#[allow(dead_code)] // the overflow test uses the rest
#[path = "support/sites.rs"]
mod sites;
mod support;

use std::{
    collections::HashMap,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Metrics, Target};

/// The bound: 40 MB resident for 100 processes with 50 sites each,
/// for the shipped (release) build.
const RSS_BOUND_KIB: u64 = 40_000_000 / 1024;

/// What the release build's code and libraries keep resident (file-backed
/// pages): measured 10.6-11.6 MB. Tests run the debug build, whose code
/// alone is 26-29 MB resident, so its total says nothing about the release
/// build's; its anonymous memory (heap, stacks, BPF ring mmaps: what grows
/// with processes and series) is within a few MB of the release build's.
/// So the test bounds that, by what the release build leaves of the 40 MB
/// (docs/performance.md, "Memory with 100 processes", has both builds).
const RELEASE_FILE_KIB: u64 = 12 * 1024;
const ANON_BOUND_KIB: u64 = RSS_BOUND_KIB - RELEASE_FILE_KIB;

/// With OTLP on, the debug build's anonymous memory is some 5 MB above the
/// release build's (28 MB against 23 MB measured: the SDK's aggregation and
/// encoding, unoptimised, keep more in flight), so the release build is
/// held to [`ANON_BOUND_KIB`] and the debug build, which the tests run, to
/// this. The release build's totals are in docs/performance.md.
const ANON_BOUND_OTLP_DEBUG_KIB: u64 = 36 * 1024;

const PROCESSES_PER_BUILD: usize = 50;

/// Resident memory of a process, in KiB.
#[derive(Clone, Copy, Debug)]
struct Rss {
    rss: u64,
    /// VmHWM: the peak of `rss`.
    hwm: u64,
    /// RssFile: the binary's and libraries' pages.
    file: u64,
    /// RssAnon + RssShmem.
    anon: u64,
}

fn rss_hwm_kib(pid: u32) -> Rss {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    Rss {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        file: field("RssFile:"),
        anon: field("RssAnon:") + field("RssShmem:"),
    }
}

/// Where the resident memory is: anonymous (heap, stacks, BPF map mmaps)
/// and file-backed (the binary's own pages), from smaps_rollup.
fn rollup(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    ["Rss:", "Anonymous:", "Shared_Clean:", "Private_Clean:"]
        .iter()
        .filter_map(|k| text.lines().find(|l| l.starts_with(k)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Rotel(Child);

impl Rotel {
    /// rotel taking OTLP/HTTP on `port` and dropping it (no hook: only the
    /// agent's side is measured here).
    fn start(bin: &Path, port: u16) -> Self {
        let child = support::rotel_command(bin)
            .args([
                "--otlp-grpc-endpoint",
                &format!("127.0.0.1:{}", support::free_port()),
            ])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{port}")])
            .args([
                "--otlp-receiver-traces-disabled",
                "--otlp-receiver-logs-disabled",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting rotel-agent");
        let mut rotel = Self(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(rotel.0.try_wait().unwrap().is_none(), "rotel exited");
            assert!(Instant::now() < deadline, "rotel did not listen");
            thread::sleep(Duration::from_millis(50));
        }
        rotel
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sites fixture built with `version`, copied to a name only this run
/// uses (the agent watches only those: `--exe-regex`).
fn build(version: &str, prefix: &str) -> Option<PathBuf> {
    let go = support::go_or_skip(version)?;
    let built = support::build_fixture("sites", &go, version, &[]);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("memory-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{prefix}{}", version.replace('.', "_")));
    std::fs::copy(&built, &path).unwrap();
    Some(path)
}

/// Growths per (pid, site) in a scrape, over kinds.
fn growths_by_site(m: &Metrics) -> HashMap<(String, String), f64> {
    let mut out = HashMap::new();
    for s in m
        .samples
        .iter()
        .filter(|s| s.name == "gopulse_map_growths_total")
    {
        let (Some(pid), Some(site)) = (s.labels.get("pid"), s.labels.get("site")) else {
            continue;
        };
        *out.entry((pid.clone(), site.clone())).or_default() += s.value;
    }
    out
}

/// Runs `grow 1` in every target and checks the agent counted every
/// growth at its site: 50 site series per process, each exact.
fn grow_and_check(agent: &Agent, targets: &mut [Target]) {
    for t in targets.iter_mut() {
        t.send("grow 1");
    }
    let truth: Vec<(String, Vec<u64>)> = targets
        .iter_mut()
        .map(|t| {
            let g = sites::parse_growths(&t.read_line(Duration::from_secs(60)));
            assert_eq!(g.len(), sites::COMMITTED_SITES);
            assert!(g.iter().all(|&n| n > 0), "a site did not grow: {g:?}");
            (t.pid.to_string(), g)
        })
        .collect();
    let exact = |m: &Metrics| {
        let seen = growths_by_site(m);
        truth.iter().all(|(pid, g)| {
            g.iter().enumerate().all(|(i, &n)| {
                seen.get(&(pid.clone(), sites::site_name(i))).copied() == Some(n as f64)
            })
        })
    };
    let m = agent.scrape_until(Duration::from_secs(30), exact);
    let seen = growths_by_site(&m);
    for (pid, g) in &truth {
        for (i, &n) in g.iter().enumerate() {
            assert_eq!(
                seen.get(&(pid.clone(), sites::site_name(i))).copied(),
                Some(n as f64),
                "pid {pid} site {}: agent vs the fixture's own count",
                sites::site_name(i)
            );
        }
        assert_eq!(
            m.value("gopulse_map_growths_unattributed_total", &[("pid", pid)]),
            0.0
        );
        assert_eq!(
            m.value("gopulse_map_sites_dropped_total", &[("pid", pid)]),
            0.0
        );
    }
    let series = seen
        .keys()
        .filter(|(_, s)| s.starts_with("main.site"))
        .count();
    assert_eq!(series, targets.len() * sites::COMMITTED_SITES);
}

/// Scrapes a few times (each renders every series), then returns VmRSS
/// and VmHWM.
fn after_scrapes(agent: &Agent) -> Rss {
    for _ in 0..5 {
        let _ = agent.scrape();
        thread::sleep(Duration::from_millis(200));
    }
    rss_hwm_kib(agent.pid())
}

fn check_bound(what: &str, r: Rss, bound: u64) {
    // The peak's anonymous part: the file-backed pages only grow, so the
    // peak's were at most today's.
    let anon_peak = r.hwm.saturating_sub(r.file);
    assert!(
        r.anon <= bound && anon_peak <= bound,
        "{what}: anonymous {} KiB, at the peak about {anon_peak} KiB (VmRSS {} KiB, VmHWM {} \
         KiB), over {bound} KiB (40 MB less the release build's {RELEASE_FILE_KIB} KiB of code: \
         {ANON_BOUND_KIB} KiB)",
        r.anon,
        r.rss,
        r.hwm
    );
}

/// One agent: started with nothing to watch, then 100 processes found by
/// discovery, all their sites counted; RSS at each step.
fn run_agent(
    label: &str,
    regex: &str,
    bins: &[PathBuf],
    flags: &[&str],
    envs: &[(&str, &str)],
    settle: impl Fn(&Agent),
    bound: u64,
) {
    let mut args = vec!["--exe-regex", regex];
    args.extend_from_slice(flags);
    let agent = Agent::spawn_env(&[], &args, envs);
    agent.wait_ready(Duration::from_secs(30));
    thread::sleep(Duration::from_secs(1));
    let idle = rss_hwm_kib(agent.pid());
    let mut targets: Vec<Target> = (0..PROCESSES_PER_BUILD * bins.len())
        .map(|i| Target::spawn(&bins[i % bins.len()], &[]))
        .collect();
    let n = targets.len();
    let m = agent.scrape_until(Duration::from_secs(120), |m| {
        m.value("gopulse_processes_watched", &[]) == n as f64
            && targets
                .iter()
                .all(|t| m.value("gopulse_probes_attached", &[("pid", &t.pid.to_string())]) > 0.0)
    });
    assert_eq!(m.value("gopulse_processes_watched", &[]), n as f64);
    assert_eq!(
        m.value("gopulse_executables_probed", &[]),
        bins.len() as f64
    );
    assert!(!agent.logged("cannot watch"));
    let watched = rss_hwm_kib(agent.pid());
    // The Go runtime's state is read from every process at each collection
    // (a scrape's own collection comes before it renders: this one's
    // covers every process watched now).
    let m = agent.scrape();
    for t in &targets {
        let pid = t.pid.to_string();
        assert!(
            m.has("go_goroutine_count", &[("pid", &pid)])
                && m.has("go_schedule_duration_seconds_count", &[("pid", &pid)]),
            "{label}: no Go runtime metrics for pid {pid}"
        );
    }
    // What watching them costs the agent while they idle (a collection
    // every 200 ms here: five times the default).
    let cpu = support::cpu_seconds(agent.pid());
    thread::sleep(Duration::from_secs(10));
    let idle_cpu = (support::cpu_seconds(agent.pid()) - cpu) / 10.0;
    grow_and_check(&agent, &mut targets);
    settle(&agent);
    let scraped = after_scrapes(&agent);
    let per_process = scraped.anon.saturating_sub(idle.anon) as f64 / n as f64;
    eprintln!(
        "RESULT memory {label}: idle {idle:?}; {n} processes watched {watched:?}; {} site \
         series counted, after 5 scrapes {scraped:?} ({per_process:.0} KiB anonymous per \
         process over idle; {}); agent CPU with them idle, collecting every 200 ms: {:.2}% of \
         a CPU",
        n * sites::COMMITTED_SITES,
        rollup(agent.pid()),
        idle_cpu * 100.0,
    );
    check_bound(&format!("{label}, watched"), watched, bound);
    check_bound(&format!("{label}, after scrapes"), scraped, bound);
    drop(targets);
    agent.stop();
}

#[test]
fn hundred_processes_fifty_sites_each() {
    if !support::have_root() {
        return;
    }
    let prefix = format!("mem{}-", std::process::id());
    let (Some(classic), Some(swiss)) = (build("1.23.9", &prefix), build("1.27.3", &prefix)) else {
        return;
    };
    let bins = [classic, swiss];
    let regex = format!("^{prefix}");

    run_agent("/metrics", &regex, &bins, &[], &[], |_| {}, ANON_BOUND_KIB);

    let Some(rotel) = support::rotel_binary() else {
        assert!(
            !support::prerequisite(false, "rotel is not installed (cargo xtask setup)"),
            "unreachable"
        );
        return;
    };
    let port = support::free_port();
    let _rotel = Rotel::start(&rotel, port);
    let endpoint = format!("http://127.0.0.1:{port}");
    run_agent(
        "/metrics and OTLP",
        &regex,
        &bins,
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_METRIC_EXPORT_INTERVAL", "1000")],
        |agent| {
            // Two rounds in which every process's resource went out (the
            // debug build takes seconds a round).
            let resources = (PROCESSES_PER_BUILD * bins.len() + 1) as f64;
            let ok = |m: &Metrics| m.value("gopulse_otlp_exports_total", &[("result", "ok")]);
            let start = ok(&agent.scrape());
            let m = agent.scrape_until(Duration::from_secs(90), |m| {
                ok(m) >= start + 2.0 * resources
            });
            assert!(
                ok(&m) >= start + 2.0 * resources,
                "OTLP exports: {}",
                ok(&m)
            );
            assert_eq!(
                m.value("gopulse_otlp_exports_total", &[("result", "failed")]),
                0.0
            );
        },
        if cfg!(debug_assertions) {
            ANON_BOUND_OTLP_DEBUG_KIB
        } else {
            ANON_BOUND_KIB
        },
    );
}

/// The committed `sites.go` is what `support/sites.rs` generates.
#[test]
fn committed_sites_are_generated() {
    let path = sites::fixture_dir().join("sites.go");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == sites::source(sites::COMMITTED_SITES),
        "{} is stale: regenerate it from support/sites.rs (source)",
        path.display()
    );
}
