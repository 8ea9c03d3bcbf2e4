//! Sites in packages whose import path's last element holds a dot
//! (`gopkg.in/yaml.v3`): the Go linker stores such names escaped
//! (`yaml%2ev3`); sites are named, and `--site-skip` prefixes matched, as
//! the import path reads (issue 18).
mod support;

use std::time::Duration;

use support::{Agent, Metrics, Target};

const DECODER: &str = "example.com/escaped/yaml.v3.Decode";
const CALLER: &str = "main.load";

/// Growths of `pid` by site, all kinds summed.
fn growths_by_site(m: &Metrics, pid: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for s in &m.samples {
        if s.name == "gopulse_map_growths_total"
            && s.labels.get("pid").map(String::as_str) == Some(pid)
        {
            *out.entry(s.labels["site"].clone()).or_insert(0.0) += s.value;
        }
    }
    out
}

/// Runs the fixture's map load once under an agent with `flags`; the
/// growths by site it reports.
fn load_under(target: &mut Target, flags: &[&str]) -> std::collections::BTreeMap<String, f64> {
    let mut args = vec!["--map-assign-probes", "off"];
    args.extend_from_slice(flags);
    let agent = Agent::spawn_with(&[target.pid], &args);
    agent.wait_ready(Duration::from_secs(30));
    target.send("go");
    assert_eq!(target.read_line(Duration::from_secs(30)), "done 800");
    let pid = target.pid.to_string();
    // Every growth of the load is in once two scrapes in a row agree.
    let mut last = growths_by_site(&agent.scrape(), &pid);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = growths_by_site(&agent.scrape(), &pid);
        if now == last && now.values().sum::<f64>() > 0.0 {
            break;
        }
        last = now;
    }
    agent.stop();
    last
}

fn check(version: &str) {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip(version) else {
        return;
    };
    let bin = support::build_fixture("escaped", &go, version, &[]);
    let nm = std::process::Command::new(&go)
        .args(["tool", "nm"])
        .arg(&bin)
        .output()
        .expect("go tool nm");
    let symbols = String::from_utf8_lossy(&nm.stdout);
    assert!(
        symbols.contains("example.com/escaped/yaml%2ev3.Decode"),
        "go{version}: the linker no longer escapes the dot; this test tests nothing"
    );
    let mut target = Target::spawn(&bin, &[]);

    let plain = load_under(&mut target, &[]);
    println!("RESULT go{version} sites: {plain:?}");
    assert!(
        plain.get(DECODER).copied().unwrap_or(0.0) > 0.0,
        "go{version}: no growth named {DECODER}: {plain:?}"
    );
    assert!(
        plain.keys().all(|s| !s.contains('%')),
        "go{version}: an escaped site name: {plain:?}"
    );

    // The prefix as users write it: the decoder is stepped over, its
    // caller owns the map. The same growths, at the caller.
    let skipped = load_under(
        &mut target,
        &["--site-skip", "example.com/escaped/yaml.v3."],
    );
    println!("RESULT go{version} sites with --site-skip: {skipped:?}");
    assert_eq!(
        skipped.get(CALLER).copied(),
        plain.get(DECODER).copied(),
        "go{version}: growths at {CALLER} with --site-skip against {DECODER} without: \
         {skipped:?} / {plain:?}"
    );
    assert!(!skipped.contains_key(DECODER), "go{version}: {skipped:?}");
    target.send("exit");
    target.finish();
}

#[test]
fn escaped_package_path_classic() {
    check("1.23.9");
}

#[test]
fn escaped_package_path_swiss() {
    check("1.27.3");
}
