//! A real Prometheus server (Debian's `prometheus`) for the tests, and its
//! query API.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Debian's server, if installed.
pub const BIN: &str = "/usr/bin/prometheus";

/// A Prometheus with its own data directory, stopped (and the directory
/// removed) on drop.
pub struct Prometheus {
    child: Child,
    /// `host:port` of its web API.
    pub web: String,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus on `config` (YAML text) in a fresh directory named
    /// after `tag`, and waits until it is ready.
    pub fn start(tag: &str, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gopulse-prom-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let web = format!("127.0.0.1:{}", super::free_port());
        let child = Command::new(BIN)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let prom = Self { child, web, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&prom.web).is_err()
            || super::http_get(&prom.web, "/-/ready").0 != 200
        {
            assert!(Instant::now() < deadline, "prometheus did not get ready");
            thread::sleep(Duration::from_millis(100));
        }
        prom
    }

    /// The data directory (for files the config refers to).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// GET `path` of the API; the `data` of a successful answer.
    pub fn api(&self, path: &str) -> Option<serde_json::Value> {
        let (status, body) = super::http_get(&self.web, path);
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }

    /// The samples of an instant query (`None` if the query failed).
    pub fn query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        data["result"].as_array().cloned()
    }

    /// The value of an instant query that should return one sample.
    pub fn value(&self, promql: &str) -> Option<f64> {
        self.query(promql)?.first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
