//! Slice growth per site (issue 23), through the real kernel, against what
//! the slices fixture counts by watching `cap()` around every append:
//! with `--slice-probes always` growths, bytes copied and new capacities
//! exact on every release; with the defaults (sampled windows) each site's
//! estimate over a minute within 10% of the truth, the probe's CPU within
//! the overhead budget.
mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use support::{Agent, Metrics, Target};

/// Per site: reallocations, bytes copied, new capacities' bytes.
type Truth = BTreeMap<String, (u64, u64, u64)>;

fn per_site(m: &Metrics, metric: &str, pid: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in &m.samples {
        if s.name == metric && s.labels.get("pid").map(String::as_str) == Some(pid) {
            *out.entry(s.labels["site"].clone()).or_insert(0.0) += s.value;
        }
    }
    out
}

/// The fixture built with Go `version`, under its own `tag` (tests running
/// at once each run a build of their own).
fn fixture(version: &str, tag: &str) -> Option<std::path::PathBuf> {
    if !support::have_root() {
        return None;
    }
    let go = support::go_or_skip(version)?;
    Some(support::build_fixture(
        "slices",
        &go,
        &format!("{version}-{tag}"),
        &[],
    ))
}

fn exact(version: &str) {
    let Some(bin) = fixture(version, "exact") else {
        return;
    };
    let mut target = Target::spawn(&bin, &[]);
    let agent = Agent::spawn_with(
        &[target.pid],
        &["--slice-probes", "always", "--map-assign-probes", "off"],
    );
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let l = [("pid", pid.as_str())];
    assert_eq!(agent.scrape().value("gopulse_slice_sample_ratio", &l), 1.0);
    target.send("go 30");
    let truth: Truth =
        serde_json::from_str(&target.read_line(Duration::from_secs(60))).expect("truth JSON");
    let m = agent.scrape_until(Duration::from_secs(10), |m| {
        let got = per_site(m, "gopulse_slice_growths_total", &pid);
        truth
            .iter()
            .all(|(site, t)| got.get(site).copied().unwrap_or(0.0) >= t.0 as f64)
    });
    let growths = per_site(&m, "gopulse_slice_growths_total", &pid);
    let copied = per_site(&m, "gopulse_slice_copied_bytes_total", &pid);
    let sums = per_site(&m, "gopulse_slice_capacity_bytes_sum", &pid);
    let counts = per_site(&m, "gopulse_slice_capacity_bytes_count", &pid);
    let mut report = Vec::new();
    for (site, &(n, bytes, cap)) in &truth {
        let what = format!("go{version} {site}");
        assert!(n > 0, "{what}: the fixture grew nothing");
        report.push(format!("{site} {n}/{bytes}B/{cap}B"));
        assert_eq!(growths.get(site).copied(), Some(n as f64), "{what} growths");
        assert_eq!(
            copied.get(site).copied(),
            Some(bytes as f64),
            "{what} copied"
        );
        assert_eq!(
            sums.get(site).copied(),
            Some(cap as f64),
            "{what} capacities"
        );
        assert_eq!(
            counts.get(site).copied(),
            Some(n as f64),
            "{what} histogram"
        );
    }
    assert_eq!(m.value("gopulse_slice_probes_attached", &l), 1.0);
    assert_eq!(m.value("gopulse_slice_growths_unattributed_total", &l), 0.0);
    println!("RESULT go{version}: {}", report.join(", "));
    agent.stop();
    target.finish();
}

macro_rules! releases {
    ($($name:ident => $version:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                exact($version);
            }
        )*
    };
}

releases! {
    slices_exact_go1_21 => "1.21.13",
    slices_exact_go1_22 => "1.22.10",
    slices_exact_go1_23 => "1.23.9",
    slices_exact_go1_24 => "1.24.11",
    slices_exact_go1_25 => "1.25.5",
    slices_exact_go1_26 => "1.26.6",
    slices_exact_go1_27 => "1.27.3",
}

/// Rounds a second of the paced run: some 13,000 growths a second.
const ROUNDS_PER_SECOND: &str = "80";

/// The defaults: a sampling window of 1 s every 30 s. Over the minute
/// between the first window's close and the third's, each site's estimate
/// (two windows' counts, each scaled to the 30 s it stands for) is within
/// 10% of what the fixture counted over the same minute, and what the
/// probe cost stays within the budget (1% of a CPU, plus the one window the
/// bucket holds).
#[test]
fn sampled_estimates_within_ten_percent() {
    let version = "1.27.3";
    let Some(bin) = fixture(version, "paced") else {
        return;
    };
    let mut target = Target::spawn(&bin, &[]);
    target.send(&format!("run {ROUNDS_PER_SECOND}"));
    assert_eq!(target.read_line(Duration::from_secs(10)), "running");
    let agent = Agent::spawn(&[target.pid]);
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let l = [("pid", pid.as_str())];
    // Each window's close: the probe detached, then its counts folded in.
    let mut closes: Vec<(Truth, BTreeMap<String, f64>, f64, Instant)> = Vec::new();
    let mut attached = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while closes.len() < 3 {
        assert!(Instant::now() < deadline, "three windows did not close");
        let m = agent.scrape();
        let now_attached = m.value("gopulse_slice_probes_attached", &l) == 1.0;
        if attached && !now_attached {
            target.send("count");
            let truth: Truth = serde_json::from_str(&target.read_line(Duration::from_secs(10)))
                .expect("truth JSON");
            let before = per_site(&m, "gopulse_slice_growths_total", &pid);
            // The estimate comes right after the detach.
            let m = agent.scrape_until(Duration::from_secs(5), |m| {
                per_site(m, "gopulse_slice_growths_total", &pid) != before
            });
            let overhead = m.value("gopulse_probe_overhead_seconds_total", &l);
            println!(
                "RESULT window {} closed: sample ratio {}",
                closes.len() + 1,
                m.value("gopulse_slice_sample_ratio", &l)
            );
            closes.push((
                truth,
                per_site(&m, "gopulse_slice_growths_total", &pid),
                overhead,
                Instant::now(),
            ));
        }
        attached = now_attached;
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, (t, e, _, _)) in closes.iter().enumerate() {
        println!("RESULT close {}: truth {t:?}, estimates {e:?}", i + 1);
    }
    let (t1, e1, o1, at1) = &closes[0];
    let (t3, e3, o3, at3) = &closes[2];
    for (site, (n3, _, _)) in t3 {
        let truth = (n3 - t1[site].0) as f64;
        let estimate = e3.get(site).copied().unwrap_or(0.0) - e1.get(site).copied().unwrap_or(0.0);
        let err = (estimate - truth).abs() / truth;
        println!(
            "RESULT {site}: estimated {estimate}, counted {truth} ({:.1}%)",
            err * 100.0
        );
        assert!(
            truth > 10_000.0,
            "{site}: too few growths to judge ({truth})"
        );
        assert!(err <= 0.10, "{site}: estimate {estimate} against {truth}");
    }
    let secs = at3.duration_since(*at1).as_secs_f64();
    let spent = o3 - o1;
    println!("RESULT probe overhead {spent:.4} s over {secs:.1} s");
    assert!(
        spent <= 0.01 * (secs + 1.0),
        "the probes cost {spent} s in {secs} s, over the 1% budget"
    );
    agent.stop();
}
