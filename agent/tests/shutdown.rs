//! Stopping the agent in the middle of a map growth storm: SIGTERM with
//! stuck HTTP clients connected exits 0 within 2 s; a second signal during
//! a slowed shutdown exits at once, nonzero; and kill -9. Each time the
//! watched Go program goes on unharmed (its own account of its maps is
//! what it is without the agent) and the kernel keeps nothing of the
//! agent's: no program, map, link, perf event, uprobe or pin.
mod support;

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Target};

/// One test at a time: the bounds are about the agent, not about three
/// agents and storms sharing two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const GO: &str = "1.27.3";

/// The maps fixture's arguments: bursts at three sites (their growths are
/// the same on every run, which the fixture checks insert by insert), then
/// a storm of small maps, each growing, for `STORM_MS`.
const STORM_MS: u64 = 8000;

fn fixture_args() -> Vec<String> {
    [
        "20000",
        "5000",
        "300",
        "0",
        "0",
        "2",
        &STORM_MS.to_string(),
        "0",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The fixture's account of its sites, from a run without the agent: what
/// every run must print.
fn baseline(bin: &Path) -> serde_json::Value {
    let args = fixture_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // No storm: the sites come first and do not depend on it.
    let mut quiet = args.clone();
    quiet[6] = "0";
    let mut t = Target::spawn(bin, &quiet);
    t.send("go");
    let truth: serde_json::Value =
        serde_json::from_str(&t.read_line(Duration::from_secs(120))).expect("truth JSON");
    t.send("exit");
    t.finish();
    truth["sites"].clone()
}

struct Setup {
    bin: PathBuf,
    bpftool: PathBuf,
    sites: serde_json::Value,
}

fn setup(name: &str) -> Option<Setup> {
    let (go, bpftool) = support::root_go_bpftool(GO)?;
    let built = support::build_fixture("maps", &go, &format!("{GO}-default"), &[]);
    // A copy of our own: kernel objects naming it are this test's.
    let bin = support::private_copy(&built, name);
    let sites = baseline(&bin);
    Some(Setup {
        bin,
        bpftool,
        sites,
    })
}

/// Starts the fixture under the agent and returns once the agent counts
/// growths of the storm (the probes are busy).
fn storm_under_agent(s: &Setup, flags: &[&str], envs: &[(&str, &str)]) -> (Target, Agent) {
    let args = fixture_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut target = Target::spawn(&s.bin, &args);
    let agent = Agent::spawn_env(&[target.pid], flags, envs);
    agent.wait_ready(support::scaled(Duration::from_secs(30)));
    target.send("go");
    let pid = target.pid.to_string();
    let storming = |m: &support::Metrics| {
        m.samples.iter().any(|x| {
            x.name == "gopulse_map_growths_total"
                && x.labels.get("pid") == Some(&pid)
                && x.labels.get("site").map(String::as_str) == Some("main.stormSmallMaps")
                && x.value > 0.0
        })
    };
    let m = agent.scrape_until(support::scaled(Duration::from_secs(20)), storming);
    assert!(storming(&m), "the agent saw no growth of the storm");
    (target, agent)
}

/// The fixture finishes its workload with the right account of it, and
/// exits cleanly.
fn target_unharmed(s: &Setup, mut target: Target) {
    let line = target.read_line(Duration::from_secs(120));
    let truth: serde_json::Value = serde_json::from_str(&line).expect("truth JSON");
    assert_eq!(
        support::seed_free(&truth["sites"]),
        support::seed_free(&s.sites),
        "the fixture's maps differ from its run without the agent"
    );
    assert!(
        truth["small_maps"].as_u64().is_some_and(|n| n > 0),
        "no storm: {truth}"
    );
    target.send("exit");
    target.finish();
}

/// What the kernel holds of the agent's programs and maps, polled until
/// gone (it frees them after a grace period).
fn assert_nothing_left(
    s: &Setup,
    progs: &std::collections::BTreeSet<u32>,
    maps: &std::collections::BTreeSet<u32>,
) -> Duration {
    assert!(!progs.is_empty() && !maps.is_empty());
    let (left, took) = support::kernel_cleared(
        &s.bpftool,
        progs,
        maps,
        &s.bin,
        support::scaled(Duration::from_secs(10)),
    );
    assert!(left.is_empty(), "left in the kernel:\n{}", left.join("\n"));
    took
}

/// Clients that would hold a graceful shutdown up: one pipelining
/// requests without reading a byte (the agent's writes stall), one that
/// sent half a request head, one that only connected.
fn stuck_clients(addr: &str) -> Vec<TcpStream> {
    let mut pipelined = TcpStream::connect(addr).unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    pipelined.write_all(request.repeat(500).as_bytes()).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap();
    let silent = TcpStream::connect(addr).unwrap();
    // Let the agent start answering the pipelined requests.
    thread::sleep(Duration::from_millis(300));
    vec![pipelined, half, silent]
}

#[test]
fn sigterm_in_a_storm_with_stuck_clients() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = setup("sigterm") else { return };
    let (target, mut agent) = storm_under_agent(&s, &[], &[]);
    let (progs, maps) = (agent.bpf_prog_ids(), agent.bpf_map_ids());
    let _clients = stuck_clients(&agent.addr);
    let sent = Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(20));
    let took = sent.elapsed();
    let status = status.expect("gopulse did not exit within 20 s of SIGTERM");
    assert!(status.success(), "gopulse exited with {status} on SIGTERM");
    assert!(agent.logged("SIGTERM: shutting down"));
    let bound = support::scaled(Duration::from_secs(2));
    assert!(took < bound, "shutdown took {took:?} (bound {bound:?})");
    let detached = agent
        .log_lines()
        .into_iter()
        .find_map(|l| {
            l.split("detached ")
                .nth(1)?
                .split(" uprobes in ")
                .next()?
                .parse::<u32>()
                .ok()
        })
        .expect("no `detached N uprobes in` line");
    assert!(detached > 0, "detached {detached} uprobes");
    let cleared = assert_nothing_left(&s, &progs, &maps);
    target_unharmed(&s, target);
    eprintln!(
        "RESULT sigterm: exit 0 in {:.0} ms ({detached} uprobes detached, 3 stuck clients); \
         kernel clear {:.0} ms after the exit",
        took.as_secs_f64() * 1e3,
        cleared.as_secs_f64() * 1e3
    );
}

#[test]
fn second_signal_during_shutdown_exits_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = setup("second") else { return };
    // An OTLP collector that accepts connections and never answers: the
    // last export holds shutdown up (to its bound) while the agent waits.
    let collector = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let held = std::sync::Arc::new(Mutex::new(Vec::new()));
    let holder = held.clone();
    thread::spawn(move || {
        for conn in collector.incoming().flatten() {
            holder.lock().unwrap().push(conn);
        }
    });
    // No probe group is detached in the background before the signal (a
    // sampling window closing, the budget cutting growth probes): the
    // kernel removes such uprobes after an RCU grace period, seconds on a
    // loaded host, and any exit, however immediate, waits for removals in
    // flight.
    let (target, mut agent) = storm_under_agent(
        &s,
        &[
            "--otlp-endpoint",
            &endpoint,
            "--map-assign-probes",
            "off",
            "--overhead-budget",
            "1",
        ],
        // No export before the last one.
        &[("OTEL_METRIC_EXPORT_INTERVAL", "600000")],
    );
    let (progs, maps) = (agent.bpf_prog_ids(), agent.bpf_map_ids());
    agent.signal(libc::SIGTERM);
    agent.wait_log("SIGTERM: shutting down", Duration::from_secs(5));
    // Once the probes are off, the agent only waits for the collector,
    // which holds shutdown up.
    agent.wait_log(" uprobes in ", Duration::from_secs(5));
    assert!(
        agent.wait_exit(Duration::ZERO).is_none(),
        "gopulse exited before the second signal: shutdown was not slowed"
    );
    assert!(
        !held.lock().unwrap().is_empty(),
        "the last OTLP export never reached the collector"
    );
    let sent = Instant::now();
    agent.signal(libc::SIGINT);
    let status = agent.wait_exit(Duration::from_secs(20));
    let took = sent.elapsed();
    let status = status.expect("gopulse did not exit within 20 s of a second signal");
    let bound = support::scaled(Duration::from_millis(300));
    assert!(
        took < bound,
        "exit took {took:?} after the second signal (bound {bound:?})"
    );
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "status {status}");
    assert!(agent.logged("SIGINT during shutdown: exiting at once"));
    let cleared = assert_nothing_left(&s, &progs, &maps);
    target_unharmed(&s, target);
    eprintln!(
        "RESULT second signal: exit {} in {:.0} ms after it; kernel clear {:.0} ms after the exit",
        128 + libc::SIGINT,
        took.as_secs_f64() * 1e3,
        cleared.as_secs_f64() * 1e3
    );
}

#[test]
fn kill_9_in_a_storm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = setup("kill9") else { return };
    let (target, mut agent) = storm_under_agent(&s, &[], &[]);
    let (progs, maps) = (agent.bpf_prog_ids(), agent.bpf_map_ids());
    let sent = Instant::now();
    agent.signal(libc::SIGKILL);
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .expect("gopulse outlived SIGKILL by 20 s");
    let took = sent.elapsed();
    assert!(!status.success());
    let cleared = assert_nothing_left(&s, &progs, &maps);
    target_unharmed(&s, target);
    eprintln!(
        "RESULT kill -9: gone in {:.0} ms; kernel clear {:.0} ms after",
        took.as_secs_f64() * 1e3,
        cleared.as_secs_f64() * 1e3
    );
}
