//! `cargo xtask screenshots`: pictures of the two Grafana dashboards'
//! panels for the docs, drawn from live data. Grafana cannot run here, so
//! `xtask/screenshots/render.py` (matplotlib) runs each panel's own PromQL
//! against a real Prometheus and draws it in the board's layout.
//!
//! The scenario is `agent/tests/dashboards_alerts.rs`'s: the demo workload
//! built with a classic-map release (calm) and a swiss-map one (storming),
//! the agent finding both by `--exe-regex`, and Debian's Prometheus scraping
//! it every second with the alert rules loaded.
use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::{
    http,
    managed::Managed,
    openmetrics,
    project::{cargo, fmt_elapsed, go_binary, go_build, is_root, run, target_dir, workspace_root},
    setup::setup,
    signal,
};

/// matplotlib, pinned so that the pictures only change with the data.
const MATPLOTLIB: &str = "3.11.2";
/// The classic-map and the swiss-map build, named so `--exe-regex` finds them.
const WORKLOADS: [(&str, &str); 2] = [("calm", "1.23.9"), ("storm", "1.27.3")];
const AGENT_FLAGS: [&str; 6] = [
    "--exe-regex",
    "^demo-(calm|storm)-",
    "--assign-period-ms",
    "2000",
    "--assign-window-ms",
    "1000",
];
const PROMETHEUS: &str = "/usr/bin/prometheus";
/// What `$__rate_interval` stands for: 30 scrapes, smooth but still quick.
const RATE_INTERVAL_SECS: u64 = 30;
/// The pictures start this long before the workloads, so their start shows.
const LEAD_IN_SECS: u64 = 5;
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The docs embed the pictures; keep them light.
const MAX_PNG_BYTES: u64 = 600 * 1024;

pub fn screenshots(cache: &Path, minutes: u64) -> Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask screenshots needs root: the agent loads BPF programs and attaches \
             uprobes; run it as root"
        );
    }
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    setup(cache)?;
    if !Path::new(PROMETHEUS).exists() {
        bail!("{PROMETHEUS} is missing (Debian's `prometheus`; cargo xtask setup installs it)");
    }
    let python = python_with_matplotlib(cache)?;

    println!("screenshots: building the agent");
    run(cargo(cache)?.args(["build", "-p", "gopulse-agent"]))?;
    let agent_bin = target_dir().join("debug").join("gopulse");
    let out_dir = target_dir().join("screenshots");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut workload_bins = Vec::new();
    for (kind, go) in WORKLOADS {
        println!("screenshots: building examples/demo with Go {go} ({kind})");
        let bin = out_dir.join(format!("demo-{kind}-{go}"));
        let dir = workspace_root().join("examples").join("demo");
        run(go_build(cache, &go_binary(cache, go), &dir, &bin).arg("."))?;
        workload_bins.push(bin);
    }

    signal::install();
    let scratch = Scratch::new()?;
    // Discovery finds the workloads when they start, as on a node.
    let agent_log = out_dir.join("gopulse.log");
    let mut agent = Managed::spawn(
        "agent",
        Command::new(&agent_bin)
            .args(AGENT_FLAGS)
            .args(["--listen", "127.0.0.1:0"]),
        &agent_log,
    )?;
    let agent_addr = agent_address(&mut agent)?;
    let prom_addr = format!("127.0.0.1:{}", free_port()?);
    let mut prometheus = start_prometheus(&scratch.0, &agent_addr, &prom_addr, &out_dir)?;
    wait_scraping(&mut prometheus, &prom_addr)?;
    println!(
        "screenshots: agent at http://{agent_addr}/metrics (log: {}), Prometheus at http://{prom_addr}",
        agent_log.display()
    );

    let start = unix_now()? - LEAD_IN_SECS;
    sleep(Duration::from_secs(LEAD_IN_SECS));
    let mut workloads = Vec::new();
    for ((kind, _), bin) in WORKLOADS.iter().zip(&workload_bins) {
        let log = out_dir.join(format!("demo-{kind}.log"));
        let mut cmd = Command::new(bin);
        // As in the dashboards test: a memory limit (far above its use) for
        // the limit panels to show.
        if *kind == "calm" {
            cmd.env("GOMEMLIMIT", "1GiB");
        }
        workloads.push(Managed::spawn("demo workload", &mut cmd, &log)?);
    }
    println!("screenshots: workloads started; collecting for {minutes} min, Ctrl-C to stop");
    let mut children: Vec<&mut Managed> = vec![&mut agent, &mut prometheus];
    children.extend(workloads.iter_mut());
    if !collect(&mut children, minutes, &agent_addr, &prom_addr)? {
        bail!("interrupted; no pictures written");
    }

    let end = unix_now()?;
    let img_dir = workspace_root().join("docs").join("img");
    fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let boards = ["gopulse-fleet", "gopulse-process"];
    println!("screenshots: rendering");
    run(Command::new(&python)
        .arg(workspace_root().join("xtask/screenshots/render.py"))
        .args(["--prometheus", &prom_addr])
        .args(["--start", &start.to_string(), "--end", &end.to_string()])
        .args(["--rate-interval", &RATE_INTERVAL_SECS.to_string()])
        .arg("--out-dir")
        .arg(&img_dir)
        .args(boards.map(|b| workspace_root().join(format!("dashboards/{b}.json")))))?;
    for b in boards {
        let png = img_dir.join(format!("{b}.png"));
        let size = fs::metadata(&png)
            .with_context(|| format!("{} was not written", png.display()))?
            .len();
        println!("screenshots: {} ({} KB)", png.display(), size / 1024);
        if size > MAX_PNG_BYTES {
            println!("screenshots: warning: {} is over 600 KB", png.display());
        }
    }
    // Workloads first, so the agent sees them go; the guards stop the rest.
    drop(workloads);
    Ok(())
}

/// `<cache>/screenshots-venv` with matplotlib `MATPLOTLIB`, made if missing
/// or different. `--without-pip` plus the outer pip's `--python` works on
/// Debian's python3 without `python3-venv` (which setup does not install).
fn python_with_matplotlib(cache: &Path) -> Result<PathBuf> {
    let venv = cache.join("screenshots-venv");
    let python = venv.join("bin").join("python");
    let check =
        format!("import sys, matplotlib; sys.exit(matplotlib.__version__ != '{MATPLOTLIB}')");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", &check])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ok(&python) {
        return Ok(python);
    }
    println!(
        "screenshots: installing matplotlib {MATPLOTLIB} into {}",
        venv.display()
    );
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    run(Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv))?;
    run(Command::new("python3")
        .args(["-m", "pip", "--python"])
        .arg(&python)
        .args([
            "install",
            "--no-input",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("matplotlib=={MATPLOTLIB}")))?;
    if !ok(&python) {
        bail!(
            "matplotlib {MATPLOTLIB} does not import in {}",
            venv.display()
        );
    }
    Ok(python)
}

/// The address the agent serves on (`--listen 127.0.0.1:0` picks a port;
/// the agent logs `serving http://ADDR/metrics`).
fn agent_address(agent: &mut Managed) -> Result<String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if signal::stop_requested() {
            bail!("interrupted");
        }
        agent.check_alive()?;
        let log = fs::read_to_string(&agent.log).unwrap_or_default();
        let addr = log
            .lines()
            .filter_map(|l| l.split("serving http://").nth(1))
            .find_map(|rest| rest.strip_suffix("/metrics"));
        if let Some(addr) = addr {
            return Ok(addr.to_owned());
        }
        sleep(POLL);
    }
    Err(anyhow!(
        "the agent logged no address within 30 s\n{}",
        agent.log_tail()
    ))
}

fn free_port() -> Result<u16> {
    // Bound and released at once: a small race, as in the agent's tests.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_prometheus(dir: &Path, agent: &str, web: &str, out_dir: &Path) -> Result<Managed> {
    let rules = workspace_root().join("deploy/prometheus/gopulse-rules.yml");
    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: gopulse\n    static_configs:\n      - targets: ['{agent}']\n",
            rules.display()
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    Managed::spawn(
        "prometheus",
        Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}")),
        &out_dir.join("prometheus.log"),
    )
}

/// Waits until Prometheus has scraped the agent (`up` is 1).
fn wait_scraping(prometheus: &mut Managed, web: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if signal::stop_requested() {
            bail!("interrupted");
        }
        prometheus.check_alive()?;
        let up = query(web, "up").ok().and_then(|r| {
            r.first()
                .and_then(|s| s["value"][1].as_str().map(|v| v == "1"))
        });
        if up == Some(true) {
            return Ok(());
        }
        sleep(Duration::from_millis(200));
    }
    Err(anyhow!(
        "Prometheus did not scrape the agent within 30 s\n{}",
        prometheus.log_tail()
    ))
}

/// The result of an instant query (`expr` must need no URL encoding).
fn query(web: &str, expr: &str) -> Result<Vec<Value>> {
    let r = http::get(web, &format!("/api/v1/query?query={expr}"), HTTP_TIMEOUT)?;
    let v: Value = serde_json::from_str(&r.body)?;
    v["data"]["result"]
        .as_array()
        .cloned()
        .with_context(|| format!("HTTP {}: {}", r.status, r.body.trim()))
}

/// Lets the data pile up for `minutes`, printing progress; `Ok(false)` if
/// interrupted, an error if a child dies.
fn collect(children: &mut [&mut Managed], minutes: u64, agent: &str, web: &str) -> Result<bool> {
    let started = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let mut next = started + PROGRESS_EVERY;
    while started.elapsed() < total {
        if signal::stop_requested() {
            return Ok(false);
        }
        for c in children.iter_mut() {
            c.check_alive()?;
        }
        if Instant::now() >= next {
            println!(
                "screenshots: {} of {minutes}m: {}",
                fmt_elapsed(started.elapsed()),
                progress(agent, web)
            );
            next += PROGRESS_EVERY;
        }
        sleep(POLL);
    }
    Ok(true)
}

/// One line on what the agent counts and Prometheus has made of it.
fn progress(agent: &str, web: &str) -> String {
    let scraped =
        http::get(agent, "/metrics", HTTP_TIMEOUT).and_then(|r| openmetrics::parse(&r.body));
    let sum = |samples: &[openmetrics::Sample], name: &str| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    };
    let agent_part = match scraped {
        Ok(s) => format!(
            "{} processes watched, {} GC cycles, {} map growths",
            sum(&s, "gopulse_processes_watched"),
            sum(&s, "go_memory_gc_cycles_total"),
            sum(&s, "gopulse_map_growths_total")
        ),
        Err(err) => format!("agent scrape failed: {err:#}"),
    };
    let firing = query(web, "ALERTS%7Balertstate%3D%22firing%22%7D")
        .map(|r| {
            let names: Vec<&str> = r
                .iter()
                .filter_map(|a| a["metric"]["alertname"].as_str())
                .collect();
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        })
        .unwrap_or_else(|err| format!("query failed: {err:#}"));
    format!("{agent_part}; alerts firing: {firing}")
}

fn unix_now() -> Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())
}

/// A temporary directory for Prometheus's config and data, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("gopulse-screenshots-{}", std::process::id()));
        // A crashed earlier run with the same pid would leave its data here.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
