//! Map growths per call site and kind, through the real kernel, against
//! what the maps fixture reads from its own maps after every insert.
mod support;

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;
use support::{Agent, Target};

#[derive(Debug, Deserialize)]
struct Site {
    growths: BTreeMap<String, u64>,
    entries: u64,
    capacity: u64,
    overflow: u64,
    tables: u64,
}

#[derive(Debug, Deserialize)]
struct Truth {
    #[serde(rename = "impl")]
    implementation: String,
    sites: BTreeMap<String, Site>,
}

/// Growths at one site that make a storm in this test.
const STORM: u64 = 10;

fn check(version: &str, kind: &str, args: &[&str], envs: &[(&str, &str)]) {
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
    let bin = support::build_fixture_env("maps", &go, &format!("{version}-{kind}"), args, envs);
    let mut target = Target::spawn(&bin, &[]);
    // Storms: more than STORM growths at a site within a minute; each
    // fixture site grows in one burst, so it is one storm or none.
    let agent = Agent::spawn_with(
        &[target.pid],
        &[
            "--storm-growths",
            &STORM.to_string(),
            "--storm-window-ms",
            "60000",
        ],
    );
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let before = agent.scrape();
    target.send("go");
    let line = target.read_line(Duration::from_secs(60));
    let truth: Truth = serde_json::from_str(&line).expect("fixture truth JSON");
    let expected: BTreeMap<(String, String), f64> = truth
        .sites
        .iter()
        .flat_map(|(site, s)| {
            s.growths
                .iter()
                .map(move |(k, &n)| ((site.clone(), k.clone()), n as f64))
        })
        .collect();
    assert!(!expected.is_empty());
    let growths = |m: &support::Metrics, site: &str, kind: &str| {
        m.value(
            "gopulse_map_growths_total",
            &[("pid", &pid), ("site", site), ("kind", kind)],
        )
    };
    let after = agent.scrape_until(Duration::from_secs(10), |m| {
        expected
            .iter()
            .all(|((site, k), &n)| growths(m, site, k) - growths(&before, site, k) >= n)
    });
    let mut report = Vec::new();
    for ((site, k), &n) in &expected {
        let got = growths(&after, site, k) - growths(&before, site, k);
        report.push(format!("{site}/{k} {got}/{n}"));
        assert_eq!(
            got, n,
            "go{version} {kind}: {site} {k} growths (agent vs fixture)"
        );
    }
    // No growth is attributed to a fixture site the truth does not have.
    for s in &after.samples {
        if s.name == "gopulse_map_growths_total" && s.labels.get("pid") == Some(&pid) {
            let site = &s.labels["site"];
            if site.starts_with("main.") {
                let key = (site.clone(), s.labels["kind"].clone());
                assert!(
                    expected.contains_key(&key),
                    "go{version} {kind}: unexpected {key:?}"
                );
            }
        }
    }
    assert_eq!(
        after.value("gopulse_events_lost_total", &[("pid", &pid)]),
        0.0
    );
    for (site, s) in &truth.sites {
        let total: u64 = s.growths.values().sum();
        let storms = after.value(
            "gopulse_map_growth_storms_total",
            &[("pid", &pid), ("site", site)],
        );
        assert_eq!(
            storms,
            f64::from(u8::from(total > STORM)),
            "go{version} {kind}: storms at {site} ({total} growths)"
        );
    }
    // The shape of each site's map, read from the process, against the
    // fixture's own reading after its last insert.
    let classic = truth.implementation == "classic";
    for (site, s) in &truth.sites {
        let l = [("pid", pid.as_str()), ("site", site.as_str())];
        let what = format!("go{version} {kind} {site}");
        assert_eq!(
            after.value("gopulse_map_entries", &l),
            s.entries as f64,
            "{what} entries"
        );
        assert_eq!(
            after.value("gopulse_map_capacity_slots", &l),
            s.capacity as f64,
            "{what} capacity"
        );
        let load = after.value("gopulse_map_load_factor", &l);
        assert!(
            (load - s.entries as f64 / s.capacity as f64).abs() < 1e-9,
            "{what} load {load}"
        );
        if classic {
            assert_eq!(
                after.value("gopulse_map_overflow_buckets", &l),
                s.overflow as f64,
                "{what} overflow"
            );
            assert!(
                !after.has("gopulse_map_tables", &l),
                "{what}: tables on a classic map"
            );
        } else {
            assert_eq!(
                after.value("gopulse_map_tables", &l),
                s.tables as f64,
                "{what} tables"
            );
            assert!(
                !after.has("gopulse_map_overflow_buckets", &l),
                "{what}: overflow on swiss"
            );
        }
    }
    eprintln!(
        "RESULT go{version} {kind} ({}): {}",
        truth.implementation,
        report.join(", ")
    );
    target.send("exit");
    target.finish();
    agent.stop();
}

macro_rules! releases {
    ($($name:ident => $version:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check($version, "default", &[], &[]);
                check($version, "stripped", &["-ldflags=-s -w"], &[]);
            }
        )*
    };
}

releases! {
    growth_go1_21 => "1.21.13",
    growth_go1_22 => "1.22.10",
    growth_go1_23 => "1.23.9",
    growth_go1_24 => "1.24.11",
    growth_go1_25 => "1.25.5",
    growth_go1_26 => "1.26.6",
    growth_go1_27 => "1.27.3",
}

#[test]
fn growth_noswissmap() {
    for version in ["1.24.11", "1.25.5"] {
        check(
            version,
            "noswissmap",
            &[],
            &[("GOEXPERIMENT", "noswissmap")],
        );
    }
}
