//! A real Prometheus server (Debian's `prometheus`) scrapes the agent and
//! its query API returns the GC counts the target reports about itself:
//! the exposition works with Prometheus's own OpenMetrics parser.
mod support;

use std::{
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Target, prometheus::Prometheus};

#[test]
fn prometheus_scrapes_the_agent() {
    if !support::have_root() {
        return;
    }
    let go = support::go_tool("1.27.3");
    if !support::prerequisite(
        go.is_some(),
        "Go 1.27.3 is not installed (cargo xtask setup)",
    ) || !support::prerequisite(
        std::path::Path::new(support::prometheus::BIN).exists(),
        "prometheus is not installed (Debian package)",
    ) {
        return;
    }
    let bin = support::build_fixture("gcload", &go.unwrap(), "1.27.3", &[]);
    let mut target = Target::spawn(&bin, &["3", "0"]);
    let agent = Agent::spawn(&[target.pid]);
    agent.wait_ready(Duration::from_secs(30));
    target.send("go");
    let truth: serde_json::Value =
        serde_json::from_str(&target.read_line(Duration::from_secs(60))).unwrap();
    let cycles = truth["numgc"].as_f64().unwrap();

    let prom = Prometheus::start(
        "scrape",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gopulse\n    \
             static_configs:\n      - targets: ['{}']\n",
            agent.addr
        ),
    );
    let pid = target.pid;
    let deadline = Instant::now() + Duration::from_secs(60);
    let promql = format!("go_memory_gc_cycles_total{{pid=\"{pid}\",go_version=\"go1.27.3\"}}");
    let mut seen = None;
    while Instant::now() < deadline {
        seen = prom.value(&promql);
        if seen == Some(cycles) {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(seen, Some(cycles), "Prometheus's view of {promql}");
    let pauses = prom.value(&format!(
        "gopulse_gc_pause_seconds_count{{pid=\"{pid}\",phase=\"mark_termination\"}}"
    ));
    assert_eq!(pauses, Some(cycles));
    let up = prom.value("up{job=\"gopulse\"}");
    assert_eq!(up, Some(1.0));

    target.send("exit");
    target.finish();
    agent.stop();
}
