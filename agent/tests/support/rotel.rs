//! rotel (an OpenTelemetry collector written in Rust; `cargo xtask setup`
//! installs it from PyPI) for the OTLP tests: it receives the agent's pushes
//! and a Python hook of its own (`rotel_dump.py`) writes every data point it
//! receives to a file, read back here.
use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

/// A running rotel.
pub struct Rotel {
    child: Child,
}

impl Rotel {
    /// rotel listening on 127.0.0.1 (`grpc`, `http` ports), appending every
    /// data point to `dump`.
    pub fn start(bin: &Path, dump: &Path, grpc: u16, http: u16) -> Self {
        let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/rotel_dump.py");
        let child = super::rotel_command(bin)
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
            .args([
                "--otlp-receiver-traces-disabled",
                "--otlp-receiver-logs-disabled",
            ])
            .arg("--otlp-with-metrics-processor")
            .arg(&hook)
            .env("GOPULSE_ROTEL_DUMP", dump)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting rotel-agent");
        let mut rotel = Self { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                rotel.child.try_wait().unwrap().is_none(),
                "rotel exited at start"
            );
            let up = |p: u16| TcpStream::connect(("127.0.0.1", p)).is_ok();
            if up(grpc) && up(http) {
                break;
            }
            assert!(Instant::now() < deadline, "rotel did not listen");
            thread::sleep(Duration::from_millis(50));
        }
        rotel
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Now, as OTLP stamps points.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Every data point rotel has written so far.
pub fn points(dump: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dump).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert!(v.get("error").is_none(), "rotel's hook failed: {l}");
            v
        })
        .collect()
}

/// The newest point of `name` stamped after `after` in the resource of
/// `pid` (or the agent's own, `None`) whose attributes include `attrs`.
pub fn newest<'a>(
    all: &'a [Value],
    pid: Option<u32>,
    name: &str,
    attrs: &[(&str, &str)],
    after: u64,
) -> Option<&'a Value> {
    all.iter()
        .filter(|p| p["name"] == name)
        .filter(|p| p["time_unix_nano"].as_u64().unwrap_or(0) > after)
        .filter(|p| match pid {
            Some(pid) => p["resource"]["process.pid"].as_u64() == Some(u64::from(pid)),
            None => p["resource"]["service.name"] == "gopulse",
        })
        .filter(|p| attrs.iter().all(|(k, v)| p["attributes"][*k] == *v))
        .max_by_key(|p| p["time_unix_nano"].as_u64())
}

/// The newest point of every series rotel received, read from its dump as
/// it grows (a long run writes tens of megabytes: each line is read once).
#[derive(Default)]
pub struct Latest {
    read: usize,
    /// By (resource pid, name, attributes): the newest point.
    points: std::collections::HashMap<(Option<u64>, String, String), Value>,
}

impl Latest {
    /// Reads what rotel wrote since the last call.
    pub fn update(&mut self, dump: &Path) {
        let text = std::fs::read(dump).unwrap_or_default();
        // Only whole lines: the hook may be writing the last one.
        let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if end <= self.read {
            return;
        }
        for line in text[self.read..end].split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_slice(line)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(line)));
            assert!(v.get("error").is_none(), "rotel's hook failed: {v}");
            let key = (
                v["resource"]["process.pid"].as_u64(),
                v["name"].as_str().unwrap_or_default().to_owned(),
                v["attributes"].to_string(),
            );
            let newer = self
                .points
                .get(&key)
                .is_none_or(|old| old["time_unix_nano"].as_u64() <= v["time_unix_nano"].as_u64());
            if newer {
                self.points.insert(key, v);
            }
        }
        self.read = end;
    }

    /// The newest point of `name` in the resource of `pid` whose attributes
    /// include `attrs`, if it is stamped after `after`.
    pub fn newest(
        &self,
        pid: u32,
        name: &str,
        attrs: &[(&str, &str)],
        after: u64,
    ) -> Option<&Value> {
        self.points
            .iter()
            .filter(|((p, n, _), _)| *p == Some(u64::from(pid)) && n == name)
            .map(|(_, v)| v)
            .filter(|v| attrs.iter().all(|(k, x)| v["attributes"][*k] == *x))
            .filter(|v| v["time_unix_nano"].as_u64().unwrap_or(0) > after)
            .max_by_key(|v| v["time_unix_nano"].as_u64())
    }
}
