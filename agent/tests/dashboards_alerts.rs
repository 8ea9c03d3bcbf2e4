//! The dashboards and alert rules against live data: the demo workload
//! (built with a classic-map and a swiss-map release), the agent finding
//! both, and a real Prometheus (Debian's) scraping the agent every second
//! with `deploy/prometheus/gopulse-rules.yml` loaded. Every query of every
//! panel in `dashboards/` must return data; the swiss build storms (each
//! burst grows its maps ~180 times within a second) and must fire
//! GoMapGrowthStorm, naming the process and the site; the classic build
//! grows its maps ~20 times a burst, below the storm threshold, and must fire
//! nothing. The rule files also pass `promtool check rules` and their unit
//! tests (`promtool test rules`).
mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{Agent, prometheus::Prometheus};

/// A workload process, killed on drop.
struct Workload(Child);

impl Workload {
    fn spawn(bin: &Path) -> Self {
        Self(
            Command::new(bin)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display())),
        )
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every (board, panel, query) of the committed dashboards.
fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for file in ["gopulse-fleet.json", "gopulse-process.json"] {
        let text = std::fs::read_to_string(root().join("dashboards").join(file)).unwrap();
        let board: Value = serde_json::from_str(&text).unwrap();
        for p in board["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((
                    file.to_owned(),
                    p["title"].as_str().unwrap().to_owned(),
                    t["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    assert!(out.len() >= 20, "{} queries", out.len());
    out
}

/// A query as Grafana sends it with every variable at "All".
fn as_grafana_sends(expr: &str) -> String {
    let mut q = expr
        .replace("$__rate_interval", "20s")
        .replace("$__range", "5m");
    for v in ["namespace", "pod", "exe", "pid"] {
        q = q.replace(&format!("${v}"), ".*");
    }
    assert!(!q.contains('$'), "unknown variable in {expr}");
    q
}

#[test]
fn dashboards_and_alerts_on_live_data() {
    promtool(&["check", "rules", "gopulse-rules.yml"]);
    promtool(&["test", "rules", "gopulse-rules.test.yml"]);
    if !support::have_root() {
        return;
    }
    let classic = support::go_tool("1.23.9");
    let swiss = support::go_tool("1.27.3");
    if !support::prerequisite(
        classic.is_some() && swiss.is_some(),
        "Go 1.23.9 and 1.27.3 are not installed (cargo xtask setup)",
    ) || !support::prerequisite(
        Path::new(support::prometheus::BIN).exists(),
        "prometheus is not installed (Debian package)",
    ) {
        return;
    }
    let demo = root().join("examples/demo");
    let calm_bin = support::build_go_dir(&demo, "demo-calm-1.23.9", &classic.unwrap(), &[], &[]);
    let storm_bin = support::build_go_dir(&demo, "demo-storm-1.27.3", &swiss.unwrap(), &[], &[]);
    let calm = Workload::spawn(&calm_bin);
    let storm = Workload::spawn(&storm_bin);
    // Discovery finds both; sampled assignment windows every 2 s so the
    // load-factor histogram fills within the test.
    let agent = Agent::spawn_with(
        &[],
        &[
            "--exe-regex",
            "^demo-(calm|storm)-",
            "--assign-period-ms",
            "2000",
            "--assign-window-ms",
            "1000",
        ],
    );
    let m = agent.scrape_until(Duration::from_secs(20), |m| {
        m.value("gopulse_processes_watched", &[]) == 2.0
    });
    assert_eq!(m.value("gopulse_processes_watched", &[]), 2.0);

    let rules = root().join("deploy/prometheus/gopulse-rules.yml");
    let prom = Prometheus::start(
        "dashboards",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: gopulse\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            agent.addr
        ),
    );

    // Every panel's queries return data (some need a storm, a sampling
    // window or a few scrapes first).
    let queries = panel_queries();
    let deadline = Instant::now() + Duration::from_secs(90);
    let empty = loop {
        let empty: Vec<String> = queries
            .iter()
            .filter(|(_, _, expr)| {
                prom.query(&as_grafana_sends(expr))
                    .is_none_or(|r| r.is_empty())
            })
            .map(|(board, panel, expr)| format!("{board} / {panel}: {expr}"))
            .collect();
        if empty.is_empty() || Instant::now() > deadline {
            break empty;
        }
        thread::sleep(Duration::from_secs(2));
    };
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    eprintln!("RESULT {} dashboard queries returned data", queries.len());

    // The storm alert fires for the swiss build, naming it and its site.
    let firing = |name: &str, pid: &str| -> Vec<Value> {
        let alerts = prom.api("/api/v1/alerts").unwrap();
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == name && a["labels"]["pid"] == pid)
            .filter(|a| a["state"] == "firing")
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let storms = loop {
        let storms = firing("GoMapGrowthStorm", &storm.pid());
        if !storms.is_empty() || Instant::now() > deadline {
            break storms;
        }
        thread::sleep(Duration::from_secs(1));
    };
    assert!(
        !storms.is_empty(),
        "GoMapGrowthStorm did not fire for the storming workload"
    );
    let summary = storms[0]["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("(pid {})", storm.pid()))
            && summary.contains("main.(*Cache).Put"),
        "{summary}"
    );

    // The calm build grew maps all along, and fired nothing; nothing else
    // fired for the storming one either.
    let m = agent.scrape();
    let calm_growths: f64 = m
        .samples
        .iter()
        .filter(|s| s.name == "gopulse_map_growths_total")
        .filter(|s| s.labels.get("pid") == Some(&calm.pid()))
        .map(|s| s.value)
        .sum();
    assert!(calm_growths > 0.0, "the calm workload grew no map");
    let alerts = prom.api("/api/v1/alerts").unwrap();
    let others: Vec<&Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["labels"]["alertname"] != "GoMapGrowthStorm"
                || a["labels"]["pid"] != storm.pid().as_str()
        })
        .collect();
    assert!(others.is_empty(), "alerts besides the storm: {others:#?}");
    eprintln!("RESULT GoMapGrowthStorm fired: {summary}");

    drop(calm);
    drop(storm);
    agent.stop();
}
