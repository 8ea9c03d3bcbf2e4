//! Map shapes of maps that die young: the demo workload fills a fresh Cache
//! with tens of thousands of entries every 4 s and drops it, and its maps do
//! not escape, so their headers live in a stack frame that later calls
//! overwrite. Built with a classic-map and a swiss-map release, found by
//! discovery, scraped every 250 ms for 30 s: no shape gauge may ever show a
//! value no Go map can have (entries beyond slots, a heap pointer read as a
//! count, a classic capacity that is not 8·2^B).
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Metrics};

const RUN: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_millis(250);

/// Copies of each build. Which of a process's two Put maps (both at the same
/// site) the agent follows, and what the dead frame holds when it reads,
/// vary per process: without the header checks about half the classic
/// copies show a heap pointer as a count within seconds, so six (started a
/// little apart, so their bursts are not in step) make a run that misses it
/// rare.
const CLASSIC_COPIES: usize = 6;
const SWISS_COPIES: usize = 2;

/// A demo process, killed on drop, and its link removed.
struct Demo(Child, PathBuf);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// The demo built with `version`, linked `n` times under names only this
/// run uses (discovery here watches only `^demo-shapes-<pid>-`). Hard
/// links: one inode, so the agent attaches (and detaches) one set of probes
/// for all the copies, seconds saved on a busy machine.
fn demo_binaries(version: &str, go: &Path, n: usize) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let built = support::build_go_dir(&dir, &format!("demo-{version}"), go, &[], &[]);
    let run_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("map-shapes-demo");
    std::fs::create_dir_all(&run_dir).unwrap();
    (0..n)
        .map(|i| {
            let link = run_dir.join(format!("demo-shapes-{}-{version}-{i}", std::process::id()));
            let _ = std::fs::remove_file(&link);
            std::fs::hard_link(&built, &link).unwrap();
            link
        })
        .collect()
}

/// What no map's shape can be, per series (`classic`: the pids of the
/// classic-map builds).
fn impossible(m: &Metrics, classic: &BTreeSet<String>) -> Vec<String> {
    let mut by_series: BTreeMap<(String, String), BTreeMap<&str, f64>> = BTreeMap::new();
    for s in &m.samples {
        let gauge = match s.name.as_str() {
            "gopulse_map_entries" => "entries",
            "gopulse_map_capacity_slots" => "capacity",
            "gopulse_map_load_factor" => "load",
            _ => continue,
        };
        let (pid, site) = (s.labels["pid"].clone(), s.labels["site"].clone());
        by_series
            .entry((pid, site))
            .or_default()
            .insert(gauge, s.value);
    }
    let mut out = Vec::new();
    for ((pid, site), g) in &by_series {
        let (entries, capacity, load) = (g.get("entries"), g.get("capacity"), g.get("load"));
        let mut flaws = Vec::new();
        if entries.is_some_and(|&e| e > 1e9) {
            flaws.push("entries > 1e9");
        }
        if load.is_some_and(|&l| l > 1.0) {
            flaws.push("load factor > 1");
        }
        if let (Some(&e), Some(&c)) = (entries, capacity)
            && e > c
        {
            flaws.push("entries > capacity");
        }
        if let Some(&c) = capacity {
            let slots = c as u64;
            let classic_ok =
                slots == 0 || (slots.is_multiple_of(8) && (slots / 8).is_power_of_two());
            if classic.contains(pid) && !classic_ok {
                flaws.push("classic capacity not 8·2^B");
            } else if !slots.is_multiple_of(8) {
                flaws.push("capacity not a multiple of 8");
            }
        }
        if !flaws.is_empty() {
            out.push(format!("pid {pid} site {site}: {flaws:?} {g:?}"));
        }
    }
    // The load factor histogram: no map observed fuller than full.
    for s in m
        .samples
        .iter()
        .filter(|s| s.name == "gopulse_map_load_factor_ratio_bucket" && s.labels["le"] == "+Inf")
    {
        let pid = s.labels["pid"].as_str();
        let full = m.value(
            "gopulse_map_load_factor_ratio_bucket",
            &[("pid", pid), ("le", "1.0")],
        );
        if s.value > full {
            out.push(format!(
                "pid {pid}: {} load factor observations above 1",
                s.value - full
            ));
        }
    }
    out
}

#[test]
fn demo_map_shapes_stay_possible() {
    if !support::have_root() {
        return;
    }
    let (classic_go, swiss_go) = (support::go_tool("1.23.9"), support::go_tool("1.27.3"));
    let (Some(classic_go), Some(swiss_go)) = (classic_go, swiss_go) else {
        let _ = support::prerequisite(
            false,
            "Go 1.23.9 and 1.27.3 are not installed (cargo xtask setup)",
        );
        return;
    };
    let classic_bins = demo_binaries("1.23.9", &classic_go, CLASSIC_COPIES);
    let swiss_bins = demo_binaries("1.27.3", &swiss_go, SWISS_COPIES);
    let spawn = |bin: &PathBuf| {
        Demo(
            Command::new(bin)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display())),
            bin.clone(),
        )
    };
    let classic: Vec<Demo> = classic_bins
        .iter()
        .map(|b| {
            thread::sleep(Duration::from_millis(200));
            spawn(b)
        })
        .collect();
    let swiss: Vec<Demo> = swiss_bins.iter().map(spawn).collect();
    let pids =
        |d: &[Demo]| -> BTreeSet<String> { d.iter().map(|d| d.0.id().to_string()).collect() };
    let (classic_pids, swiss_pids) = (pids(&classic), pids(&swiss));
    let regex = format!("^demo-shapes-{}-", std::process::id());
    let agent = Agent::spawn_with(
        &[],
        &[
            "--exe-regex",
            &regex,
            "--assign-period-ms",
            "2000",
            "--assign-window-ms",
            "1000",
        ],
    );
    // Scraped from the start: attaching to eight processes takes seconds
    // here, and the run is as long as a test may take.
    let all = (CLASSIC_COPIES + SWISS_COPIES) as f64;
    let put = "main.(*Cache).Put";
    let (start, mut scrapes, mut watched) = (Instant::now(), 0u32, 0.0f64);
    let mut next = start;
    let mut flaws: Vec<String> = Vec::new();
    // Per pid, the largest Put map published.
    let mut largest: BTreeMap<String, f64> = BTreeMap::new();
    while start.elapsed() < RUN {
        let m = agent.scrape();
        scrapes += 1;
        watched = watched.max(m.value("gopulse_processes_watched", &[]));
        for f in impossible(&m, &classic_pids) {
            flaws.push(format!("{:>5.1}s {f}", start.elapsed().as_secs_f64()));
        }
        for pid in classic_pids.iter().chain(&swiss_pids) {
            let e = m.value("gopulse_map_entries", &[("pid", pid), ("site", put)]);
            let top = largest.entry(pid.clone()).or_default();
            *top = top.max(e);
        }
        next += EVERY;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    assert_eq!(watched, all, "processes watched");
    let top = |pids: &BTreeSet<String>| -> Vec<f64> { pids.iter().map(|p| largest[p]).collect() };
    eprintln!(
        "RESULT {scrapes} scrapes in {:.1?}, {} impossible shape values; largest {put} map \
         published per process: classic {:?}, swiss {:?}",
        start.elapsed(),
        flaws.len(),
        top(&classic_pids),
        top(&swiss_pids)
    );
    assert!(
        flaws.is_empty(),
        "{} impossible shape values, the first:\n{}",
        flaws.len(),
        flaws
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Not vacuous: each build had its Put maps read, full ones too (bursts
    // are 20k+). Not every process: one whose followed map is overwritten
    // as soon as its burst ends is only ever read mid-burst, if at all.
    for (what, pids) in [("classic", &classic_pids), ("swiss", &swiss_pids)] {
        let sizes = top(pids);
        assert!(
            sizes.iter().any(|&e| e >= 20_000.0),
            "{what}: no full {put} map was published: {sizes:?}"
        );
    }
    // The demos first, then the agent killed rather than stopped: its
    // probes come off faster with nothing running them, and a clean exit is
    // other tests' business.
    drop((classic, swiss));
    drop(agent);
}
