//! Sites named through inlining (issue 23): map writes and appends in small
//! functions the compiler inlines into their callers are reported at the
//! inlined function, as `go tool pprof` names it (read from pclntab's
//! inline trees, which stripped binaries keep), on every release; growths
//! through methods of map types that only write into their receiver
//! (`net/url.Values.Set`, `net/http.Header.Set`), inlined or called, at the
//! function that called them. Before, every site was the physical function
//! that called the runtime: `main.fillPut` for an inlined `main.put`, and
//! `net/url.Values.Set` for a called one.
mod support;

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use serde::Deserialize;
use support::{Agent, Metrics, Target};

#[derive(Debug, Deserialize)]
struct Truth {
    /// Growths per site, counted by the fixture.
    maps: BTreeMap<String, u64>,
    /// Reallocations and bytes copied per site.
    slices: BTreeMap<String, (u64, u64)>,
}

/// Functions the fixture needs inlined, as `-gcflags=-m` says it.
const INLINED: &[&str] = &[
    "inlining call to (*Registry).add",
    "inlining call to put",
    "inlining call to outer",
    "inlining call to inner",
    "inlining call to url.Values.Set",
    "inlining call to push",
    "inlining call to pushName",
];

/// The callers that must not be named for the growths of what they inline.
const CALLERS: &[&str] = &[
    "main.fillRegistry",
    "main.fillPut",
    "main.fillNested",
    "main.outer",
    "main.fillPush",
    "main.fillPushName",
];

/// Maps each fixture site makes.
const ROUNDS: u64 = 40;

/// What the compiler says of the fixture's inlining (`-gcflags=-m`).
fn inlining_report(go: &Path, tags: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inlsites");
    let cache = support::cache_dir();
    let out = Command::new(go)
        .current_dir(&dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", cache.join("gocache"))
        .env("GOPATH", cache.join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .args(["build", "-gcflags=-m", "-o", "/dev/null"])
        .args(tags)
        .arg(".")
        .output()
        .expect("go build -gcflags=-m");
    assert!(out.status.success(), "go build -gcflags=-m failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Growths per site of process `pid`, all kinds summed.
fn by_site(m: &Metrics, metric: &str, pid: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in &m.samples {
        if s.name == metric && s.labels.get("pid").map(String::as_str) == Some(pid) {
            *out.entry(s.labels["site"].clone()).or_insert(0.0) += s.value;
        }
    }
    out
}

/// One run of the fixture under an agent with `flags`: the truth, and the
/// last scrape once the map sites' counts agree with it (or time is up).
fn run(bin: &Path, flags: &[&str]) -> (Truth, Metrics, String) {
    let flags = flags.to_vec();
    let mut target = Target::spawn(bin, &[]);
    let mut args = vec!["--map-assign-probes", "off"];
    args.extend_from_slice(&flags);
    let agent = Agent::spawn_with(&[target.pid], &args);
    agent.wait_ready(Duration::from_secs(30));
    target.send(&format!("go {ROUNDS}"));
    let line = target.read_line(Duration::from_secs(60));
    let truth: Truth = serde_json::from_str(&line).expect("fixture truth JSON");
    let pid = target.pid.to_string();
    let m = agent.scrape_until(Duration::from_secs(10), |m| {
        let got = by_site(m, "gopulse_map_growths_total", &pid);
        let slices = by_site(m, "gopulse_slice_growths_total", &pid);
        truth
            .maps
            .iter()
            .all(|(site, &n)| got.get(site).copied().unwrap_or(0.0) >= n as f64)
            && truth.slices.iter().all(|(site, &(n, _))| {
                !flags.contains(&"always") || slices.get(site).copied().unwrap_or(0.0) >= n as f64
            })
    });
    agent.stop();
    target.finish();
    (truth, m, pid)
}

/// The map sites of a run: the fixture's counts, at the inlined functions
/// and at the callers of the map types' methods, nothing at the callers of
/// what was inlined nor at the methods.
fn check_maps(what: &str, truth: &Truth, m: &Metrics, pid: &str) {
    let got = by_site(m, "gopulse_map_growths_total", pid);
    println!("RESULT {what} map sites: {got:?}");
    for (site, &n) in &truth.maps {
        assert!(n > 0, "{what}: the fixture grew no map at {site}");
        assert_eq!(
            got.get(site).copied(),
            Some(n as f64),
            "{what}: growths at {site} (agent vs fixture): {got:?}"
        );
    }
    for site in got.keys() {
        assert!(
            !CALLERS.contains(&site.as_str())
                && !site.starts_with("net/url.Values.")
                && !site.starts_with("net/http.Header.")
                && !site.starts_with("net/textproto."),
            "{what}: growths named {site}: {got:?}"
        );
    }
}

/// The slice sites of a run with `--slice-probes always`: reallocations
/// and bytes copied exact at the inlined functions.
fn check_slices(what: &str, truth: &Truth, m: &Metrics, pid: &str) {
    let got = by_site(m, "gopulse_slice_growths_total", pid);
    let copied = by_site(m, "gopulse_slice_copied_bytes_total", pid);
    println!("RESULT {what} slice sites: {got:?}");
    for (site, &(n, bytes)) in &truth.slices {
        assert_eq!(
            got.get(site).copied(),
            Some(n as f64),
            "{what}: {site}: {got:?}"
        );
        assert_eq!(
            copied.get(site).copied(),
            Some(bytes as f64),
            "{what}: {site}"
        );
    }
    for site in ["main.fillPush", "main.fillPushName"] {
        assert!(
            !got.contains_key(site),
            "{what}: slice growths at {site}: {got:?}"
        );
    }
}

fn check(version: &str) {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip(version) else {
        return;
    };
    let said = inlining_report(&go, &[]);
    for line in INLINED {
        assert!(
            said.contains(line),
            "go{version}: the compiler no longer says {line:?}; this test would test nothing"
        );
    }
    for (kind, args) in [("plain", &[][..]), ("stripped", &["-ldflags=-s -w"][..])] {
        let bin = support::build_fixture("inlsites", &go, &format!("{version}-{kind}"), args);
        let what = format!("go{version} {kind}");
        let (truth, m, pid) = run(&bin, &["--slice-probes", "always"]);
        check_maps(&what, &truth, &m, &pid);
        check_slices(&what, &truth, &m, &pid);
    }
}

macro_rules! releases {
    ($($name:ident => $version:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check($version);
            }
        )*
    };
}

releases! {
    inlined_sites_go1_21 => "1.21.13",
    inlined_sites_go1_22 => "1.22.10",
    inlined_sites_go1_23 => "1.23.9",
    inlined_sites_go1_24 => "1.24.11",
    inlined_sites_go1_25 => "1.25.5",
    inlined_sites_go1_26 => "1.26.6",
    inlined_sites_go1_27 => "1.27.3",
}

/// `net/http.Header.Set`, inlined and called: the growths are the caller's;
/// with `--site-keep net/http.Header.` both are Header.Set's again.
#[test]
fn header_set_is_its_callers() {
    if !support::have_root() {
        return;
    }
    let version = "1.27.3";
    let Some(go) = support::go_or_skip(version) else {
        return;
    };
    let said = inlining_report(&go, &["-tags", "header"]);
    assert!(said.contains("inlining call to http.Header.Set"), "{said}");
    let bin = support::build_fixture(
        "inlsites",
        &go,
        &format!("{version}-header"),
        &["-tags", "header", "-ldflags=-s -w"],
    );
    let (truth, m, pid) = run(&bin, &[]);
    assert!(truth.maps.contains_key("main.fillHeaderCalled"));
    check_maps(&format!("go{version} header"), &truth, &m, &pid);

    let (truth, m, pid) = run(&bin, &["--site-keep", "net/http.Header."]);
    let got = by_site(&m, "gopulse_map_growths_total", &pid);
    println!("RESULT go{version} header, --site-keep net/http.Header.: {got:?}");
    let n = truth.maps["main.fillHeaderCalled"] as f64;
    assert_eq!(
        got.get("net/http.Header.Set").copied(),
        Some(2.0 * n),
        "{got:?}"
    );
    assert!(
        !got.contains_key("main.fillHeaderCalled") && !got.contains_key("main.fillHeader"),
        "{got:?}"
    );
}
