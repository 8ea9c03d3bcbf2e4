//! The Go toolchain's own `compile`, watched by discovery while `go build
//! -a` compiles a package and everything it imports. Every release ships
//! `compile` built with profile-guided optimisation, and the profile made
//! the compiler inline runtime map functions ordinary builds keep: in 1.24
//! to 1.27 `(*table).grow` and `split` into `rehash` (neither left), in 1.22
//! `hashGrow` into the generic `mapassign` (its own copy still there, but
//! blind to those calls). Each `compile` is watched all the same: no watch
//! failure, its GC cycles counted, its growths counted through what is
//! left (swiss) or its unwatched kinds said so (1.22).
mod support;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Metrics};

/// What one release's build showed, summed over its `compile` processes
/// (each at the most the agent reported before it exited; `processes`
/// counts those the collector had added).
#[derive(Debug, Default)]
struct Seen {
    processes: usize,
    gc_cycles: f64,
    growths: BTreeMap<String, f64>,
    hits: BTreeMap<String, f64>,
    unwatched: BTreeMap<String, f64>,
    growth_probes_cut: usize,
}

/// The series of the `compile` processes of `go_version` in a scrape, by
/// pid: each one's own figures.
fn per_pid(m: &Metrics, go_version: &str) -> BTreeMap<String, Seen> {
    let mut out: BTreeMap<String, Seen> = BTreeMap::new();
    for s in &m.samples {
        if s.labels.get("exe").map(String::as_str) != Some("compile")
            || s.labels.get("go_version").map(String::as_str) != Some(go_version)
        {
            continue;
        }
        let Some(pid) = s.labels.get("pid") else {
            continue;
        };
        let seen = out.entry(pid.clone()).or_default();
        let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        match s.name.as_str() {
            // The collector's series, which come with the process's
            // unwatched kinds (the probes' come a moment before): the
            // probes' count of GC cycles, one mark termination each.
            "gopulse_gc_pause_seconds_count" if label("phase") == "mark_termination" => {
                seen.processes = 1;
                seen.gc_cycles = s.value;
            }
            "gopulse_map_growths_total" => {
                *seen.growths.entry(label("kind")).or_default() += s.value
            }
            "gopulse_probe_hits_total" => *seen.hits.entry(label("probe")).or_default() += s.value,
            "gopulse_map_growth_unwatched" => {
                seen.unwatched.insert(label("kind"), s.value);
            }
            "gopulse_map_growth_probes_attached" if s.value == 0.0 => seen.growth_probes_cut = 1,
            _ => {}
        }
    }
    out
}

/// Keeps, per pid, the most each figure reached (counters only grow; a
/// process's series go when it exits).
fn merge(into: &mut BTreeMap<String, Seen>, now: BTreeMap<String, Seen>) {
    let max = |a: &mut BTreeMap<String, f64>, b: BTreeMap<String, f64>| {
        for (k, v) in b {
            let e = a.entry(k).or_default();
            *e = e.max(v);
        }
    };
    for (pid, s) in now {
        let e = into.entry(pid).or_default();
        e.processes = e.processes.max(s.processes);
        e.gc_cycles = e.gc_cycles.max(s.gc_cycles);
        e.growth_probes_cut = e.growth_probes_cut.max(s.growth_probes_cut);
        max(&mut e.growths, s.growths);
        max(&mut e.hits, s.hits);
        max(&mut e.unwatched, s.unwatched);
    }
}

fn total(all: &BTreeMap<String, Seen>) -> Seen {
    let mut t = Seen::default();
    for s in all.values() {
        t.processes += s.processes;
        t.gc_cycles += s.gc_cycles;
        t.growth_probes_cut += s.growth_probes_cut;
        for (k, v) in &s.growths {
            *t.growths.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &s.hits {
            *t.hits.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &s.unwatched {
            *t.unwatched.entry(k.clone()).or_default() += v;
        }
    }
    t
}

/// What is built: a package whose own compile, and its dependencies' (the
/// runtime, crypto/tls, ...), run seconds each, long past the agent's
/// attach (a `compile` of a small package often exits before its probes are
/// in; each one then is not watched, and not counted as a failure either).
const PACKAGE: &str = "net/http";

/// `go build -a` of a standard package with Go `version`, the agent
/// scraped every 50 ms meanwhile; what its `compile` processes showed.
fn build_watched(agent: &Agent, version: &str) -> Seen {
    let go = support::go_tool(version).expect("checked by the caller");
    let cache = tempdir(&format!("gocache-{version}"));
    let mut build = Command::new(&go)
        .args(["build", "-a", "-o", "/dev/null", PACKAGE])
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", &cache)
        .env("GOFLAGS", "-p=2")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", go.display()));
    let go_version = format!("go{version}");
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + support::scaled(Duration::from_secs(300));
    let status = loop {
        merge(&mut seen, per_pid(&agent.scrape(), &go_version));
        if let Some(status) = build.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "go{version} build -a ran 300 s");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "go{version} build -a {PACKAGE}: {status}");
    let _ = std::fs::remove_dir_all(&cache);
    total(&seen)
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn compile_of_every_release_is_watched_during_a_build() {
    if !support::have_root() {
        return;
    }
    let mut versions = Vec::new();
    for v in support::GO_VERSIONS {
        if support::go_or_skip(v).is_none() {
            return;
        }
        versions.push(*v);
    }
    let agent = Agent::spawn_with(
        &[],
        &[
            "--exe-regex",
            "^compile$",
            "--map-assign-probes",
            "off",
            "--storm-growths",
            "1000000",
        ],
    );
    agent.wait_ready(support::scaled(Duration::from_secs(30)));
    let refused =
        |m: &Metrics| m.value("gopulse_discovery_skipped_total", &[("reason", "refused")]);
    let refused_before = refused(&agent.scrape());
    let mut report = Vec::new();
    for version in versions {
        // The last release's probes gone first: their removal (the kernel's,
        // one at a time) would hold up this one's attaches.
        agent.scrape_until(support::scaled(Duration::from_secs(30)), |m| {
            m.value("gopulse_executables_probed", &[]) == 0.0
        });
        let seen = build_watched(&agent, version);
        let what = format!("compile go{version}");
        report.push(format!("{what}: {seen:?}"));
        assert!(seen.processes > 0, "{what}: no compile process watched");
        assert!(
            seen.gc_cycles > 0.0,
            "{what}: no GC cycle counted: {seen:?}"
        );
        let growths: f64 = seen.growths.values().sum();
        let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
        let hits = |p: &str| seen.hits.get(p).copied().unwrap_or(0.0);
        if minor >= 24 {
            // grow and split through rehash; every kind counted.
            assert!(seen.unwatched.is_empty(), "{what}: {seen:?}");
            assert!(hits("rehash_table") > 0.0, "{what}: {seen:?}");
            assert_eq!(hits("grow_table") + hits("split_table"), 0.0, "{what}");
            assert!(seen.growths.contains_key("grow"), "{what}: {seen:?}");
            assert!(growths > 0.0, "{what}: no map growth counted: {seen:?}");
        } else if minor == 22 {
            // hashGrow has a copy of its own and one inlined into
            // mapassign: not probed, and said so for every process.
            for kind in ["double", "same_size"] {
                assert_eq!(
                    seen.unwatched.get(kind).copied(),
                    Some(seen.processes as f64),
                    "{what}: {kind} unwatched: {seen:?}"
                );
            }
            assert_eq!(hits("grow_classic") + growths, 0.0, "{what}");
        } else {
            assert!(seen.unwatched.is_empty(), "{what}: {seen:?}");
            assert!(hits("grow_classic") > 0.0, "{what}: {seen:?}");
            assert!(growths > 0.0, "{what}: no map growth counted: {seen:?}");
        }
    }
    let m = agent.scrape();
    assert_eq!(
        m.value("gopulse_watch_failures_total", &[("exe", "compile")]),
        0.0,
        "compile processes the agent failed to watch"
    );
    assert_eq!(refused(&m) - refused_before, 0.0, "processes refused");
    assert!(!agent.logged("cannot watch"), "the agent refused a process");
    for line in &report {
        eprintln!("RESULT {line}");
    }
    agent.stop();
}
