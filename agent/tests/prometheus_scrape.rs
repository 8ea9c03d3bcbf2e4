//! A real Prometheus server (Debian's `prometheus`) scrapes the agent and
//! its query API returns the GC counts the target reports about itself:
//! the exposition works with Prometheus's own OpenMetrics parser.
mod support;

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Target};

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of an instant query that should return one sample.
fn query(addr: &str, promql: &str) -> Option<f64> {
    let q: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = support::http_get(addr, &format!("/api/v1/query?query={q}"));
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    result.first()?["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_the_agent() {
    if !support::have_root() {
        return;
    }
    let go = support::go_tool("1.27.3");
    let prom = std::path::Path::new("/usr/bin/prometheus");
    if !support::prerequisite(
        go.is_some(),
        "Go 1.27.3 is not installed (cargo xtask setup)",
    ) || !support::prerequisite(
        prom.exists(),
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

    let dir = std::env::temp_dir().join(format!("gopulse-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gopulse\n    \
             static_configs:\n      - targets: ['{}']\n",
            agent.addr
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let _prom = Prometheus(
        Command::new(prom)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus"),
    );
    let pid = target.pid;
    let deadline = Instant::now() + Duration::from_secs(60);
    let promql = format!("gopulse_gc_cycles_total{{pid=\"{pid}\",go_version=\"go1.27.3\"}}");
    let mut seen = None;
    while Instant::now() < deadline {
        seen = std::net::TcpStream::connect(&web)
            .ok()
            .and_then(|_| query(&web, &promql));
        if seen == Some(cycles) {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(seen, Some(cycles), "Prometheus's view of {promql}");
    let pauses = query(
        &web,
        &format!("gopulse_gc_pause_seconds_count{{pid=\"{pid}\",phase=\"mark_termination\"}}"),
    );
    assert_eq!(pauses, Some(cycles));
    let up = query(&web, "up{job=\"gopulse\"}");
    assert_eq!(up, Some(1.0));

    target.send("exit");
    target.finish();
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
