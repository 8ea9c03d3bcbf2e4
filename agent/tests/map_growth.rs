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
    inserts: u64,
    deletes: u64,
    /// Classic only: log2 of the final bucket count.
    #[serde(rename = "B")]
    b: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct Truth {
    #[serde(rename = "impl")]
    implementation: String,
    sites: BTreeMap<String, Site>,
}

/// Growths the agent must report, by (site, kind): all the fixture saw but
/// `small` (swiss `growToSmall`, a new map's first allocation, which is no
/// growth and not probed).
fn expected_growths(truth: &Truth) -> BTreeMap<(String, String), f64> {
    truth
        .sites
        .iter()
        .flat_map(|(site, s)| {
            s.growths
                .iter()
                .filter(|(k, _)| k.as_str() != "small")
                .map(move |(k, &n)| ((site.clone(), k.clone()), n as f64))
        })
        .collect()
}

/// Hits of every growth probe of a process.
fn growth_hits(m: &support::Metrics, pid: &str) -> f64 {
    support::GROWTH_PROBES
        .iter()
        .map(|probe| {
            m.value(
                "gopulse_probe_hits_total",
                &[("pid", pid), ("probe", probe)],
            )
        })
        .sum()
}

/// Growths at one site that make a storm in this test.
const STORM: u64 = 10;

/// One run of the maps fixture under the agent with `--map-assign-probes
/// mode`.
fn check_mode(version: &str, kind: &str, args: &[&str], envs: &[(&str, &str)], mode: &str) {
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
            "--map-assign-probes",
            mode,
        ],
    );
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let before = agent.scrape();
    target.send("go");
    let line = target.read_line(Duration::from_secs(60));
    let truth: Truth = serde_json::from_str(&line).expect("fixture truth JSON");
    let expected = expected_growths(&truth);
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
    // No growth is attributed to a fixture site the truth does not have,
    // and none is of kind `small`.
    for s in &after.samples {
        if s.name == "gopulse_map_growths_total" && s.labels.get("pid") == Some(&pid) {
            assert_ne!(s.labels["kind"], "small", "go{version} {kind}: {s:?}");
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
    for site in truth.sites.keys() {
        let total: f64 = expected
            .iter()
            .filter(|((s, _), _)| s == site)
            .map(|(_, n)| n)
            .sum();
        let storms = after.value(
            "gopulse_map_growth_storms_total",
            &[("pid", &pid), ("site", site)],
        );
        assert_eq!(
            storms,
            f64::from(u8::from(total > STORM as f64)),
            "go{version} {kind}: storms at {site} ({total} growths)"
        );
    }
    // Assignment probes: with `always` every insert and delete is a hit.
    let l = [("pid", pid.as_str())];
    let hits = |probe: &str| {
        after.value(
            "gopulse_probe_hits_total",
            &[("pid", pid.as_str()), ("probe", probe)],
        )
    };
    let inserts: u64 = truth.sites.values().map(|s| s.inserts).sum();
    let deletes: u64 = truth.sites.values().map(|s| s.deletes).sum();
    if mode == "always" {
        assert_eq!(after.value("gopulse_map_assign_probes_attached", &l), 1.0);
        assert!(
            hits("map_assign") >= inserts as f64,
            "{} assign hits < {inserts} inserts",
            hits("map_assign")
        );
        assert!(
            hits("map_delete") >= deletes as f64,
            "{} delete hits < {deletes} deletes",
            hits("map_delete")
        );
        assert!(after.value("gopulse_map_load_factor_ratio_count", &l) >= truth.sites.len() as f64);
    }
    if mode == "off" {
        assert_eq!(hits("map_assign"), 0.0);
        assert_eq!(after.value("gopulse_map_assign_probes_attached", &l), 0.0);
    }
    assert!(growth_hits(&after, &pid) >= expected.values().sum::<f64>());
    assert_eq!(after.value("gopulse_map_untracked_total", &l), 0.0);
    // Every kind is counted here, each through its own function; in a
    // profile-guided build grow and split (inlined into rehash) through
    // rehash, which then sees each of them.
    assert!(
        !after.has("gopulse_map_growth_unwatched", &l),
        "go{version} {kind}: a growth kind is not watched"
    );
    let classic = truth.implementation == "classic";
    if !classic {
        let grow_split: f64 = expected
            .iter()
            .filter(|((_, k), _)| k == "grow" || k == "split")
            .map(|(_, n)| n)
            .sum();
        let own = hits("grow_table") + hits("split_table");
        if kind == "pgo" {
            for k in ["grow", "split"] {
                assert!(
                    expected.keys().any(|(_, kk)| kk == k),
                    "go{version} pgo: the fixture had no {k} growth"
                );
            }
        }
        let (counted, other) = if kind == "pgo" {
            (hits("rehash_table"), own)
        } else {
            (own, hits("rehash_table"))
        };
        assert!(
            counted >= grow_split && other == 0.0,
            "go{version} {kind}: {counted} hits of the grow/split probes for {grow_split} \
             growths, {other} of the others"
        );
    }
    // Classic growth moves old buckets incrementally: with every write
    // probed, the moves seen are at least those of every growth but the
    // last of each map (which the next growth requires to be finished) and
    // at most all the old buckets of every growth (a doubling from B moves
    // 2^B, a same-size one 2^B too).
    let evacuated = after.value("gopulse_map_evacuated_buckets_total", &l);
    if classic && mode == "always" {
        let all_old: u64 = truth
            .sites
            .values()
            .map(|s| {
                let b = s.b.unwrap_or(0);
                let same = s.growths.get("same_size").copied().unwrap_or(0);
                ((1u64 << b) - 1) + same * (1u64 << b)
            })
            .sum();
        // Every growth but the last of a map finished before the next began.
        let all_finished: u64 = truth
            .sites
            .values()
            .map(|s| {
                let b = s.b.unwrap_or(0);
                let same = s.growths.get("same_size").copied().unwrap_or(0);
                let total = ((1u64 << b) - 1) + same * (1u64 << b);
                // The last growth moved at most 2^B old buckets.
                total.saturating_sub(1u64 << b)
            })
            .sum();
        assert!(
            evacuated >= all_finished as f64 && evacuated <= all_old as f64,
            "go{version} {kind}: {evacuated} evacuated buckets, not in [{all_finished}, {all_old}]"
        );
    } else if !classic || mode == "off" {
        assert_eq!(evacuated, 0.0, "go{version} {kind} {mode}");
    }
    assert!(after.value("gopulse_probe_overhead_seconds_total", &l) > 0.0);
    // The shape of each site's map, read from the process, against the
    // fixture's own reading after its last insert.
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
                for mode in ["sampled", "always"] {
                    check_mode($version, "default", &[], &[], mode);
                    check_mode($version, "stripped", &["-ldflags=-s -w"], &[], mode);
                }
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

/// Profile-guided builds (`-pgo`, from the fixture's own profile of a
/// map-growth-heavy loop): the compiler inlines `(*table).grow` and
/// `(*table).split` into `(*table).rehash` in every swiss release, leaving
/// neither a copy of its own. The agent counts both through `rehash`, by
/// the table's capacity: growths per site and kind exact, both kinds (the
/// fixture's big maps split).
fn check_pgo(version: &str) {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip(version) else {
        return;
    };
    let pgo = support::pgo_flag(&go, version);
    let tag = format!("{version}-pgo");
    let bin = support::build_fixture("maps", &go, &tag, &[&pgo]);
    support::assert_grow_split_inlined(&go, &bin, &format!("maps go{version}"));
    // `--list` says so before anything is attached.
    let target = Target::spawn(&bin, &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .args(["--list", "--exe-regex", &format!("^maps-{tag}$")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let list = String::from_utf8(out.stdout).unwrap();
    let row = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&target.pid.to_string()))
        .unwrap_or_else(|| panic!("pid {} not in --list:\n{list}", target.pid));
    assert!(
        row.contains(
            "watch; grow and split growths counted through \
                      internal/runtime/maps.(*table).rehash"
        ),
        "{row}"
    );
    drop(target);
    for mode in ["sampled", "always"] {
        check_mode(version, "pgo", &[&pgo], &[], mode);
    }
}

macro_rules! pgo_releases {
    ($($name:ident => $version:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_pgo($version);
            }
        )*
    };
}

pgo_releases! {
    growth_pgo_go1_24 => "1.24.11",
    growth_pgo_go1_25 => "1.25.5",
    growth_pgo_go1_26 => "1.26.6",
    growth_pgo_go1_27 => "1.27.3",
}

/// No assignment probes at all: growth counts and shapes stay exact.
#[test]
fn assign_probes_off() {
    for version in ["1.23.9", "1.27.3"] {
        check_mode(version, "default", &[], &[], "off");
    }
}

#[test]
fn growth_noswissmap() {
    for version in ["1.24.11", "1.25.5"] {
        for mode in ["sampled", "always"] {
            check_mode(
                version,
                "noswissmap",
                &[],
                &[("GOEXPERIMENT", "noswissmap")],
                mode,
            );
        }
    }
}

/// The overhead governor: with a tiny budget, the sampled assignment probes
/// are cut as soon as a burst of inserts makes them costly, the gauge says
/// so, and the growth counts stay exact.
#[test]
fn governor_cuts_costly_assign_probes() {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_tool("1.27.3") else {
        assert!(!support::prerequisite(false, "Go 1.27.3 is not installed"));
        return;
    };
    let bin = support::build_fixture_env("maps", &go, "1.27.3-default", &[], &[]);
    let mut target = Target::spawn(&bin, &[]);
    let mut agent = Agent::spawn_with(
        &[target.pid],
        &[
            "--map-assign-probes",
            "sampled",
            "--assign-window-ms",
            "20000",
            "--assign-period-ms",
            "60000",
            "--overhead-budget",
            "0.0001",
        ],
    );
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let l = [("pid", pid.as_str())];
    let attached = agent.scrape_until(Duration::from_secs(5), |m| {
        m.value("gopulse_map_assign_probes_attached", &l) == 1.0
    });
    assert_eq!(
        attached.value("gopulse_map_assign_probes_attached", &l),
        1.0
    );
    target.send("go");
    let truth: Truth = serde_json::from_str(&target.read_line(Duration::from_secs(60))).unwrap();
    agent.wait_log(
        "map assignment probes spent their budget",
        Duration::from_secs(10),
    );
    let m = agent.scrape();
    assert_eq!(m.value("gopulse_map_assign_probes_attached", &l), 0.0);
    let fill_int = &truth.sites["main.fillInt"];
    for (k, &n) in fill_int.growths.iter().filter(|(k, _)| *k != "small") {
        let got = m.value(
            "gopulse_map_growths_total",
            &[("pid", &pid), ("site", "main.fillInt"), ("kind", k)],
        );
        assert_eq!(
            got, n as f64,
            "fillInt {k} growths with the governor at work"
        );
    }
    target.send("exit");
    target.finish();
    agent.stop();
}

/// A process that grows maps nonstop (nine-entry maps, made as fast as it
/// can) would pay a probe hit per map: the governor cuts the growth probes
/// once the burst has spent the budget's whole bucket, says so on the
/// gauge, and the probes' cost stays within the budget: what the bucket
/// holds plus its refill, plus at most one check (100 ms) of the storm.
#[test]
fn governor_cuts_growth_probes_under_a_growth_storm() {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_tool("1.27.3") else {
        assert!(!support::prerequisite(false, "Go 1.27.3 is not installed"));
        return;
    };
    let bin = support::build_fixture_env("maps", &go, "1.27.3-default", &[], &[]);
    // Default sizes, then 3 s of small maps.
    let storm_ms = 3000.0;
    let mut target = Target::spawn(&bin, &["5000", "5000", "2000", "3000", "360", "2", "3000"]);
    let (budget, window) = (0.01, 2.0);
    let mut agent = Agent::spawn_with(
        &[target.pid],
        &[
            "--map-assign-probes",
            "off",
            "--overhead-budget",
            "0.01",
            "--overhead-window",
            "2",
        ],
    );
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let l = [("pid", pid.as_str())];
    let before = agent.scrape();
    target.send("go");
    let line = target.read_line(Duration::from_secs(60));
    let truth: serde_json::Value = serde_json::from_str(&line).unwrap();
    let small_maps = truth["small_maps"].as_f64().unwrap();
    assert!(small_maps > 10_000.0, "only {small_maps} small maps");
    agent.wait_log(
        "map growth probes spent their budget",
        Duration::from_secs(10),
    );
    let m = agent.scrape();
    // Every small map grows once (growToTable): probes attached throughout
    // would see one hit per map.
    let hits = growth_hits(&m, &pid) - growth_hits(&before, &pid);
    assert!(
        hits < small_maps / 2.0,
        "{hits} growth hits for {small_maps} small maps"
    );
    let spent = m.value("gopulse_probe_overhead_seconds_total", &l)
        - before.value("gopulse_probe_overhead_seconds_total", &l);
    // The bucket, its refill over the storm, and per cut (two at most in
    // 3 s) what the storm spends before the probes are gone: a check (5 ms
    // while spending) and the kernel's removal of the probes (~0.1 s).
    let allowed = budget * (window + storm_ms / 1e3 + 1.0) + 0.2;
    assert!(
        spent <= allowed,
        "probes cost {spent:.3} s of CPU in a {storm_ms} ms storm, over {allowed:.3} s"
    );
    // Once the storm is over the bucket refills and the probes come back:
    // a window, plus what the last cut overdrew (the probes fire until the
    // kernel has removed them, some 0.1 s, and that is charged too).
    let m = agent.scrape_until(Duration::from_secs_f64(window * 6.0), |m| {
        m.value("gopulse_map_growth_probes_attached", &l) == 1.0
    });
    assert_eq!(m.value("gopulse_map_growth_probes_attached", &l), 1.0);
    agent.wait_log("map growth probes re-attached", Duration::from_secs(1));
    target.send("exit");
    target.finish();
    agent.stop();
}

/// The shape of each site's largest map as the growth probe recorded it,
/// for maps gone before the agent read them (a map in a returned stack
/// frame, or freed and its memory reused): the fixture fills its maps, then
/// overwrites their seeds before the agent collects, so the only shape the
/// agent can show is the one the kernel recorded at the map's last growth.
/// It must be the map exactly as it was then (the fixture's own reading
/// after the operation before that growth), and a shape the runtime could
/// have made.
fn shapes_recorded_at_growth(version: &str) {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip(version) else {
        return;
    };
    let bin = support::build_fixture_env("maps", &go, &format!("{version}-default"), &[], &[]);
    let mut target = Target::spawn(&bin, &[]);
    // Folded only when scraped: nothing is read between the growths and
    // the seeds' overwriting.
    let agent = Agent::spawn_with(
        &[target.pid],
        &["--map-assign-probes", "off", "--poll-interval-ms", "60000"],
    );
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let _ = agent.scrape();
    target.send("go");
    let line = target.read_line(Duration::from_secs(60));
    let truth: serde_json::Value = serde_json::from_str(&line).expect("fixture truth JSON");
    target.send("forget");
    assert_eq!(target.read_line(Duration::from_secs(10)), "forgotten");
    let m = agent.scrape();
    let swiss = truth["impl"] == "swiss";
    let mut checked = 0;
    for (site, s) in truth["sites"].as_object().expect("sites") {
        // The churn site deletes: its largest map at a growth is not its
        // last growth's.
        if s["deletes"].as_u64() != Some(0) {
            continue;
        }
        let want = &s["at_last_growth"];
        let l = [("pid", pid.as_str()), ("site", site.as_str())];
        let got = |name: &str| m.value(name, &l);
        let mut pairs = vec![
            ("gopulse_map_entries", &want["entries"]),
            ("gopulse_map_capacity_slots", &want["capacity"]),
        ];
        pairs.push(if swiss {
            ("gopulse_map_tables", &want["tables"])
        } else {
            ("gopulse_map_overflow_buckets", &want["overflow"])
        });
        for (name, want) in pairs {
            assert!(
                m.has(name, &l),
                "go{version}: no {name} for {site} (its map gone, nothing recorded?)"
            );
            assert_eq!(
                got(name),
                want.as_f64().expect("a number"),
                "go{version}: {name} of {site} against the fixture's map at its last growth"
            );
        }
        let (entries, capacity) = (
            got("gopulse_map_entries"),
            got("gopulse_map_capacity_slots"),
        );
        assert!(
            entries <= capacity,
            "go{version}: {site}: {entries} > {capacity}"
        );
        assert_eq!(
            got("gopulse_map_load_factor"),
            entries / capacity,
            "go{version}: {site}"
        );
        checked += 1;
    }
    println!("RESULT go{version}: {checked} sites' shapes at their last growth exact");
    assert!(checked >= 6, "go{version}: only {checked} sites checked");
    target.send("exit");
    target.finish();
}

#[test]
fn shapes_recorded_at_growth_classic() {
    shapes_recorded_at_growth("1.23.9");
}

#[test]
fn shapes_recorded_at_growth_swiss() {
    shapes_recorded_at_growth("1.27.3");
}
