//! Growth counts stay exact under real bursts on a busy machine: a Go
//! program bursts 200k, 50k and 3k inserts into maps at three sites while a
//! CPU burner keeps the other core busy, and the agent, with default flags,
//! counts every growth at every site, run after run.
mod support;

use std::{
    collections::BTreeMap,
    hint::black_box,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use serde::Deserialize;
use support::{Agent, Target};

#[derive(Debug, Deserialize)]
struct Site {
    growths: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
struct Truth {
    #[serde(rename = "impl")]
    implementation: String,
    sites: BTreeMap<String, Site>,
}

/// Spins on one thread until dropped: the other core is busy.
struct Burner {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Burner {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut x = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for _ in 0..10_000 {
                    x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            x
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One test at a time, so "the other core busy" means one burner.
static SERIAL: Mutex<()> = Mutex::new(());

/// The three bursts (maps fixture arguments): fillInt 200k, fillString
/// 50k, fillStruct 3k; nothing else.
const BURSTS: &[&str] = &["200000", "50000", "3000", "0", "0", "2", "0", "0", "0"];
const SITES: &[&str] = &["main.fillInt", "main.fillString", "main.fillStruct"];

/// Runs the bursts `runs` times under a fresh agent with default flags
/// each time and checks every count.
fn bursts_exact(version: &str, runs: usize) {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_tool(version) else {
        assert!(!support::prerequisite(
            false,
            &format!("Go {version} is not installed (cargo xtask setup)")
        ));
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bin = support::build_fixture("maps", &go, &format!("{version}-default"), &[]);
    let _burner = Burner::start();
    for run in 1..=runs {
        let mut target = Target::spawn(&bin, BURSTS);
        let agent = Agent::spawn(&[target.pid]);
        agent.wait_ready(Duration::from_secs(30));
        let pid = target.pid.to_string();
        target.send("go");
        let truth: Truth =
            serde_json::from_str(&target.read_line(Duration::from_secs(120))).expect("truth");
        let mut expected = BTreeMap::new();
        for site in SITES {
            for (kind, &n) in &truth.sites[*site].growths {
                if kind != "small" {
                    expected.insert((site.to_string(), kind.clone()), n as f64);
                }
            }
        }
        let growths = |m: &support::Metrics, site: &str, kind: &str| {
            m.value(
                "gopulse_map_growths_total",
                &[("pid", &pid), ("site", site), ("kind", kind)],
            )
        };
        let m = agent.scrape_until(Duration::from_secs(10), |m| {
            expected
                .iter()
                .all(|((site, kind), &n)| growths(m, site, kind) >= n)
        });
        let mut report = Vec::new();
        for ((site, kind), &n) in &expected {
            let got = growths(&m, site, kind);
            report.push(format!("{site}/{kind} {got}/{n}"));
            assert_eq!(
                got, n,
                "go{version} run {run}: {site} {kind} growths (agent vs fixture)"
            );
        }
        let l = [("pid", pid.as_str())];
        assert_eq!(
            m.value("gopulse_map_growth_probes_attached", &l),
            1.0,
            "go{version} run {run}"
        );
        assert_eq!(m.value("gopulse_map_growths_unattributed_total", &l), 0.0);
        assert!(
            !agent.logged("map growth probes spent their budget"),
            "go{version} run {run}: the governor cut the growth probes"
        );
        // Every growth was at one of the three sites.
        let total: f64 = m
            .samples
            .iter()
            .filter(|s| s.name == "gopulse_map_growths_total" && s.labels["pid"] == pid)
            .map(|s| s.value)
            .sum();
        assert_eq!(
            total,
            expected.values().sum::<f64>(),
            "go{version} run {run}"
        );
        eprintln!(
            "RESULT go{version} ({}) run {run}/{runs}: {}",
            truth.implementation,
            report.join(", ")
        );
        target.send("exit");
        target.finish();
        agent.stop();
    }
}

#[test]
fn ten_runs_classic() {
    bursts_exact("1.23.9", 10);
}

#[test]
fn ten_runs_swiss() {
    bursts_exact("1.27.3", 10);
}

#[test]
fn every_release_once() {
    for version in support::GO_VERSIONS {
        bursts_exact(version, 1);
    }
}
