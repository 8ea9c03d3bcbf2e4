//! OTLP against a real collector: rotel (an OpenTelemetry collector written
//! in Rust; `cargo xtask setup` installs it from PyPI) receives the agent's
//! pushes over gRPC and HTTP/protobuf, and a Python hook of its own
//! (`support/rotel_dump.py`) writes every data point it receives to a file.
//! What arrives must equal what `/metrics` serves and what the Go programs
//! report about themselves; a collector that is down for 30 s must cost
//! nothing but failed exports.
mod support;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize;
use support::{
    Agent, Target,
    cgroup::{Names, TestCgroup, containerd_path},
    rotel::{Rotel, newest, now_ns, points},
};

#[derive(Debug, Deserialize)]
struct GcTruth {
    numgc: u64,
    pause_total_ns: u64,
}

#[derive(Debug, Deserialize)]
struct MapSite {
    growths: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
struct MapsTruth {
    sites: BTreeMap<String, MapSite>,
}

const GO: &str = "1.27.3";
const PHASES: [&str; 2] = ["sweep_termination", "mark_termination"];

/// One run: the agent pushing over `protocol`, histograms as `histograms`
/// (`exponential` or `explicit`).
fn check(protocol: &str, histograms: &str) {
    if !support::have_root() {
        return;
    }
    let go = support::go_tool(GO);
    let rotel = support::rotel_binary();
    if !support::prerequisite(
        go.is_some(),
        "Go 1.27.3 is not installed (cargo xtask setup)",
    ) || !support::prerequisite(
        rotel.is_some(),
        "rotel is not installed (cargo xtask setup)",
    ) {
        return;
    }
    let mount = support::cgroup::cgroup2_mount();
    if !support::prerequisite(mount.is_some(), "no cgroup2 mount in /proc/self/mountinfo") {
        return;
    }
    let (go, rotel_bin, mount) = (go.unwrap(), rotel.unwrap(), mount.unwrap());
    let gcload = support::build_fixture("gcload", &go, GO, &[]);
    let maps = support::build_fixture("maps", &go, &format!("{GO}-default"), &[]);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "otlp-{}-{}",
        protocol.replace('/', "-"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("points.jsonl");
    let _ = std::fs::remove_file(&dump);
    let (grpc, http) = (support::free_port(), support::free_port());
    let mut rotel = Rotel::start(&rotel_bin, &dump, grpc, http);

    // The GC workload runs in a container's cgroup, as the kubelet names
    // it (containerd, systemd driver): its resource names the container and
    // the pod.
    let names = Names::new(protocol.len() as u64);
    let top = format!("gopulse-test-{}-{}", std::process::id(), protocol.len());
    let cgroup = TestCgroup::create(&mount, &containerd_path(&top, &names)).unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} 3 5",
        cgroup.path().display(),
        gcload.display()
    );
    let mut gc = Target::spawn(Path::new("/bin/sh"), &["-c", &script]);
    let mut mp = Target::spawn(&maps, &[]);
    let endpoint = match protocol {
        "grpc" => format!("http://127.0.0.1:{grpc}"),
        _ => format!("http://127.0.0.1:{http}"),
    };
    let agent = Agent::spawn_env(
        &[gc.pid, mp.pid],
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            protocol,
            "--otlp-histograms",
            histograms,
        ],
        &[
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
            ("OTEL_METRIC_EXPORT_TIMEOUT", "5000"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=gopulse-test",
            ),
        ],
    );
    agent.wait_ready(Duration::from_secs(30));
    gc.send("go");
    mp.send("go");
    let gc_truth: GcTruth = serde_json::from_str(&gc.read_line(Duration::from_secs(60))).unwrap();
    let maps_truth: MapsTruth =
        serde_json::from_str(&mp.read_line(Duration::from_secs(60))).unwrap();
    // Growths the agent counts (not `small`: a new map's first allocation).
    let expected: Vec<(String, String, u64)> = maps_truth
        .sites
        .iter()
        .flat_map(|(site, s)| {
            s.growths
                .iter()
                .filter(|(k, _)| k.as_str() != "small")
                .map(move |(k, &n)| (site.clone(), k.clone(), n))
        })
        .collect();
    assert!(!expected.is_empty());
    let (gc_pid, mp_pid) = (gc.pid.to_string(), mp.pid.to_string());

    // /metrics first: it reaches the truth.
    let prom = agent.scrape_until(Duration::from_secs(15), |m| {
        m.value("go_memory_gc_cycles_total", &[("pid", &gc_pid)]) == gc_truth.numgc as f64
            && expected.iter().all(|(site, kind, n)| {
                m.value(
                    "gopulse_map_growths_total",
                    &[("pid", &mp_pid), ("site", site), ("kind", kind)],
                ) == *n as f64
            })
    });
    assert_eq!(
        prom.value("go_memory_gc_cycles_total", &[("pid", &gc_pid)]),
        gc_truth.numgc as f64
    );
    // The workloads are done: nothing changes from here on, so the next
    // export must carry exactly what this scrape shows.
    let scraped_at = now_ns();
    let deadline = Instant::now() + Duration::from_secs(20);
    let all = loop {
        let all = points(&dump);
        let complete = newest(&all, Some(gc.pid), "go.memory.gc.cycles", &[], scraped_at)
            .is_some()
            && newest(&all, Some(mp.pid), "gopulse.map.growths", &[], scraped_at).is_some()
            // Its own exports counted: a second round at least.
            && newest(
                &all,
                None,
                "gopulse.otlp.exports",
                &[("gopulse.otlp.result", "ok")],
                scraped_at,
            )
            .is_some_and(|p| p["value"].as_u64() >= Some(1));
        if complete {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "no export after the scrape reached rotel ({} points in all)",
            all.len()
        );
        thread::sleep(Duration::from_millis(200));
    };

    // GC cycles: a cumulative monotonic sum, equal to /metrics and to the
    // runtime's own count.
    let cycles = newest(&all, Some(gc.pid), "go.memory.gc.cycles", &[], scraped_at).unwrap();
    assert_eq!(cycles["kind"], "sum");
    assert_eq!(cycles["is_monotonic"], true);
    assert_eq!(cycles["temporality"], "AGGREGATION_TEMPORALITY_CUMULATIVE");
    assert_eq!(cycles["unit"], "{gc_cycle}");
    assert_eq!(cycles["value"].as_u64(), Some(gc_truth.numgc), "{cycles}");

    // Pauses per phase: exponential histograms whose count and sum are the
    // very numbers /metrics serves; their total is the runtime's.
    let mut otlp_ns = 0.0;
    for phase in PHASES {
        let p = newest(
            &all,
            Some(gc.pid),
            "go.memory.gc.pause.duration",
            &[("go.gc.phase", phase)],
            scraped_at,
        )
        .unwrap_or_else(|| panic!("no {phase} pause histogram"));
        assert_eq!(p["unit"], "s");
        let labels = [("pid", gc_pid.as_str()), ("phase", phase)];
        if histograms == "explicit" {
            // The /metrics buckets, count for count.
            assert_eq!(p["kind"], "histogram", "{p}");
            let mut prom_buckets: Vec<(f64, f64)> = prom
                .samples
                .iter()
                .filter(|s| s.name == "gopulse_gc_pause_seconds_bucket")
                .filter(|s| {
                    labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|s| {
                    let le = s.labels["le"].as_str();
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    };
                    (le, s.value)
                })
                .collect();
            prom_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let bounds: Vec<f64> = p["explicit_bounds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_f64().unwrap())
                .chain([f64::INFINITY])
                .collect();
            let mut cumulative = 0.0;
            let otlp_buckets: Vec<(f64, f64)> = bounds
                .iter()
                .zip(p["bucket_counts"].as_array().unwrap())
                .map(|(&b, n)| {
                    cumulative += n.as_f64().unwrap();
                    (b, cumulative)
                })
                .collect();
            assert_eq!(
                otlp_buckets, prom_buckets,
                "{phase} buckets: OTLP vs /metrics"
            );
        } else {
            assert_eq!(p["kind"], "exp_histogram", "{p}");
        }
        let prom_count = prom.value("gopulse_gc_pause_seconds_count", &labels);
        let prom_sum = prom.value("gopulse_gc_pause_seconds_sum", &labels);
        assert_eq!(p["count"].as_f64(), Some(prom_count), "{phase} count");
        assert_eq!(prom_count, gc_truth.numgc as f64, "{phase} count vs truth");
        assert_eq!(
            p["sum"].as_f64(),
            Some(prom_sum),
            "{phase} sum: OTLP vs /metrics"
        );
        otlp_ns += p["sum"].as_f64().unwrap() * 1e9;
    }
    let runtime_ns = gc_truth.pause_total_ns as f64;
    assert!(
        (otlp_ns - runtime_ns).abs() <= 1.0 + runtime_ns * 1e-9,
        "pause total: OTLP {otlp_ns} ns, runtime {runtime_ns} ns"
    );

    // Growths per site and kind.
    for (site, kind, n) in &expected {
        let p = newest(
            &all,
            Some(mp.pid),
            "gopulse.map.growths",
            &[
                ("code.function.name", site),
                ("gopulse.map.growth.kind", kind),
            ],
            scraped_at,
        )
        .unwrap_or_else(|| panic!("no OTLP growths for {site}/{kind}"));
        assert_eq!(p["value"].as_u64(), Some(*n), "{site}/{kind} growths");
    }

    // Each process is its own resource; the agent's metrics have theirs.
    let r = &cycles["resource"];
    assert_eq!(r["process.pid"].as_u64(), Some(u64::from(gc.pid)));
    assert_eq!(r["process.runtime.name"], "go");
    assert_eq!(r["process.runtime.version"], format!("go{GO}"));
    assert_eq!(
        r["process.executable.name"].as_str(),
        gcload.file_name().and_then(|n| n.to_str())
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(r["host.name"], host.trim());
    assert_eq!(r["deployment.environment.name"], "gopulse-test");
    assert_eq!(r["container.id"], names.id.as_str());
    assert_eq!(r["k8s.pod.uid"], names.uid.as_str());
    let exports = newest(
        &all,
        None,
        "gopulse.otlp.exports",
        &[("gopulse.otlp.result", "ok")],
        scraped_at,
    )
    .unwrap();
    assert!(exports["value"].as_u64().unwrap() >= 1);
    assert_eq!(exports["resource"]["service.name"], "gopulse");

    // The collector goes away for 30 s: scrapes keep answering, memory
    // stays put, failures are counted and logged once, and export resumes
    // by itself.
    let rss_before = agent.rss_kib();
    let failed =
        |m: &support::Metrics| m.value("gopulse_otlp_exports_total", &[("result", "failed")]);
    let failed_before = failed(&agent.scrape());
    rotel.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(30) {
        let asked = Instant::now();
        let m = agent.scrape();
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "a scrape took {:?} while the collector was down",
            asked.elapsed()
        );
        assert_eq!(
            m.value("go_memory_gc_cycles_total", &[("pid", &gc_pid)]),
            gc_truth.numgc as f64
        );
        thread::sleep(Duration::from_secs(1));
    }
    let failed_during = failed(&agent.scrape()) - failed_before;
    // One request a round while the collector is down (each ~1 s with the
    // exporter's own retries), rounds every second.
    assert!(
        failed_during >= 10.0,
        "{failed_during} failed exports in 30 s"
    );
    let rss_after = agent.rss_kib();
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB while the collector was down"
    );
    let outage_lines = agent
        .log_lines()
        .iter()
        .filter(|l| l.contains("OTLP export to") && l.contains("failed"))
        .count();
    assert_eq!(outage_lines, 1, "one log line per outage");

    let restarted_at = now_ns();
    let _rotel = Rotel::start(&rotel_bin, &dump, grpc, http);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = points(&dump);
        if let Some(p) = newest(&all, Some(gc.pid), "go.memory.gc.cycles", &[], restarted_at) {
            assert_eq!(p["value"].as_u64(), Some(gc_truth.numgc));
            break;
        }
        assert!(Instant::now() < deadline, "export did not resume");
        thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.logged("OTLP export resumed") {
        assert!(Instant::now() < deadline, "no log line when export resumed");
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{protocol}: {} points received; {failed_during} exports failed in the 30 s outage; \
         RSS {rss_before} -> {rss_after} KiB",
        all.len()
    );

    gc.send("exit");
    mp.send("exit");
    gc.finish();
    mp.finish();
    agent.stop();
    drop(cgroup);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn otlp_grpc_exponential() {
    check("grpc", "exponential");
}

#[test]
fn otlp_http_protobuf_explicit() {
    check("http/protobuf", "explicit");
}

/// `--no-prometheus`: the health endpoints only.
#[test]
fn no_prometheus_serves_health_only() {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_tool(GO) else {
        assert!(!support::prerequisite(
            false,
            "Go 1.27.3 is not installed (cargo xtask setup)"
        ));
        return;
    };
    let gcload = support::build_fixture("gcload", &go, GO, &[]);
    let gc = Target::spawn(&gcload, &["1", "0"]);
    let mut agent = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .args(["--pid", &gc.pid.to_string(), "--no-prometheus"])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gopulse");
    let stderr = std::io::BufReader::new(agent.stderr.take().unwrap());
    let addr = std::io::BufRead::lines(stderr)
        .map_while(Result::ok)
        .find_map(|l| support::served_addr(&l))
        .expect("the agent's address");
    assert_eq!(support::http_get(&addr, "/healthz").0, 200);
    assert_eq!(support::http_get(&addr, "/metrics").0, 404);
    let _ = agent.kill();
    let _ = agent.wait();
    drop(gc); // killed: it waits for a "go" this test never sends
}
