//! /metrics under 100 concurrent scrapes while slow and stuck clients hold
//! connections: every scrape gets a complete, consistent body in time; the
//! slow clients are cut at the server's limits (`server::Limits`); past the
//! connection limit new connections are refused and counted; and the
//! agent's memory stays bounded.
mod support;

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use gopulse_agent::server::Limits;
use support::{Agent, Metrics, Target};

const SCRAPERS: usize = 100;
/// Of each kind of slow client, but for those that pipeline requests and
/// never read (each costs the agent hundreds of renders before it stalls).
const SLOW: usize = 20;
const PIPELINED: usize = 5;

/// A series: name and labels.
fn series(m: &Metrics) -> BTreeSet<String> {
    m.samples
        .iter()
        .map(|s| format!("{}{:?}", s.name, s.labels))
        .collect()
}

/// Whether a sample only grows (counters, histogram parts).
fn grows(name: &str) -> bool {
    ["_total", "_count", "_sum", "_bucket"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Reads what a client was sent until the server closes the connection;
/// false if it is still open after `wait`.
fn closed_by_server(mut s: &TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn hundred_scrapes_beside_slow_clients() {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip("1.27.3") else {
        return;
    };
    let limits = Limits::default();
    let bin = support::build_fixture("gcload", &go, "1.27.3-default", &[]);
    let mut target = Target::spawn(&bin, &["5", "20"]);
    // No sampling windows: the series set stays the same throughout.
    let mut agent = Agent::spawn_with(&[target.pid], &["--map-assign-probes", "off"]);
    agent.wait_ready(support::scaled(Duration::from_secs(30)));
    target.send("go");
    let truth: serde_json::Value =
        serde_json::from_str(&target.read_line(Duration::from_secs(60))).unwrap();
    let numgc = truth["numgc"].as_f64().unwrap();
    let pid = target.pid.to_string();
    let cycles = |m: &Metrics| m.cycles_seen(&[("pid", &pid)]);
    let before = agent.scrape_until(support::scaled(Duration::from_secs(10)), |m| {
        cycles(m) == numgc
    });
    assert_eq!(cycles(&before), numgc);
    // One scrape alone, for the bound below.
    let t = Instant::now();
    let _ = agent.scrape();
    let single = t.elapsed();
    let rss_before = agent.rss_kib();

    // Slow clients: request heads dribbled a byte a second, requests
    // pipelined and never read (the agent's writes stall), connections
    // that send nothing.
    let addr = agent.addr.clone();
    let opened = Instant::now();
    let dribblers: Vec<thread::JoinHandle<Option<Duration>>> = (0..SLOW)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                // Waiting a second for the server between bytes: a close
                // is seen when it happens.
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let start = Instant::now();
                let mut buf = [0u8; 256];
                for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n\r\n"
                    .iter()
                    .take(40)
                {
                    if s.write_all(&[*b]).is_err() {
                        return Some(start.elapsed());
                    }
                    match s.read(&mut buf) {
                        Ok(0) => return Some(start.elapsed()),
                        Ok(_) => return None,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            return Some(start.elapsed());
                        }
                        Err(_) => {}
                    }
                }
                None
            })
        })
        .collect();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let pipelined: Vec<TcpStream> = (0..PIPELINED)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            // A small receive buffer (autotuning lets loopback's grow to
            // tens of MiB): the responses fill it and the kernel's send
            // buffer, and the agent's writes stall.
            let size: libc::c_int = 4096;
            // SAFETY: setsockopt(2) on an open socket with a valid int.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&raw const size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_RCVBUF");
            s.write_all(request.repeat(1000).as_bytes()).unwrap();
            s
        })
        .collect();
    let silent: Vec<TcpStream> = (0..SLOW)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(500));

    // 100 scrapes at once.
    let go = Arc::new(Barrier::new(SCRAPERS));
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            let (addr, go) = (addr.clone(), go.clone());
            thread::spawn(move || {
                go.wait();
                let t = Instant::now();
                let (status, body) = support::http_get(&addr, "/metrics");
                (status, body, t.elapsed())
            })
        })
        .collect();
    let mut bodies = Vec::new();
    let mut latencies = Vec::new();
    for s in scrapers {
        let (status, body, took) = s.join().unwrap();
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
        latencies.push(took);
    }
    let rss_busy = agent.rss_kib();
    let after = agent.scrape();
    let expected = series(&before);
    for body in &bodies {
        assert!(body.ends_with("# EOF\n"), "a body is cut short");
        let m = Metrics::parse(body);
        assert_eq!(series(&m), expected, "a scrape's series differ");
        assert_eq!(cycles(&m), numgc);
        for s in &m.samples {
            if grows(&s.name) {
                let l: Vec<(&str, &str)> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let (lo, hi) = (before.value(&s.name, &l), after.value(&s.name, &l));
                assert!(
                    lo <= s.value && s.value <= hi,
                    "{} {:?} = {} outside [{lo}, {hi}]",
                    s.name,
                    s.labels,
                    s.value
                );
            }
        }
    }
    latencies.sort();
    let (median, slowest) = (latencies[SCRAPERS / 2], latencies[SCRAPERS - 1]);
    // Renders take the collector's lock one at a time, on two workers: the
    // last of 100 waits for at most 100 renders. Three times that, and a
    // second for connecting and thread start-up on a loaded machine.
    let bound = support::scaled(single * 3 * SCRAPERS as u32 + Duration::from_secs(1));
    assert!(
        slowest < bound,
        "the slowest of {SCRAPERS} scrapes took {slowest:?} (bound {bound:?}, one alone \
         {single:?})"
    );

    // The slow clients are cut at the limits: request heads (and silent
    // connections) after `head`, unread responses after `stall`.
    let slack = support::scaled(Duration::from_secs(3));
    let mut cuts = Vec::new();
    for d in dribblers {
        let cut = d.join().unwrap().expect("a dribbling client was never cut");
        assert!(
            cut < limits.head + slack,
            "a dribbled head was cut after {cut:?}"
        );
        cuts.push(cut);
    }
    cuts.sort();
    let deadline = opened + limits.stall + slack;
    for s in &silent {
        let wait = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_by_server(s, wait.max(Duration::from_millis(100))),
            "a silent connection is still open {:?} after it was opened",
            opened.elapsed()
        );
    }
    // A pipelined connection is read only once its deadline has passed:
    // reading it earlier would take the responses it stalled on and let
    // the agent write again (how soon depends on how many responses the
    // kernel's buffers hold, so on the body's size). Then the buffered
    // responses come, and the end.
    thread::sleep(deadline.saturating_duration_since(Instant::now()));
    for s in &pipelined {
        assert!(
            closed_by_server(s, Duration::from_millis(500)),
            "a pipelined connection is still open {:?} after it was opened",
            opened.elapsed()
        );
    }
    drop((silent, pipelined));
    assert!(agent.logged("whose request head took over"));
    assert!(agent.logged("that took none of their response"));

    // Past the connection limit: refused at once, and counted.
    let held: Vec<TcpStream> = (0..limits.max_connections)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (status, _) = support::http_get(&addr, "/metrics");
    assert_eq!(status, 503, "a connection past the limit was served");
    let refused_in = t.elapsed();
    let line = agent.wait_log("connections over the limit", Duration::from_secs(5));
    assert!(line.contains("refused 1 connections"), "{line}");
    drop(held);
    // The places are free again.
    let m = agent.scrape_until(support::scaled(Duration::from_secs(5)), |m| {
        cycles(m) == numgc
    });
    assert_eq!(cycles(&m), numgc);

    let rss_after = agent.rss_kib();
    let growth = rss_after.saturating_sub(rss_before);
    // Each connection holds at most one rendered body (here some 10s of
    // KiB) and hyper's buffers: bounded by the connection limit. What is
    // left after they are all gone is the allocator's keeping.
    assert!(
        growth < 8 * 1024,
        "RSS grew {growth} KiB ({rss_before} -> {rss_after} KiB)"
    );
    eprintln!(
        "RESULT {SCRAPERS} concurrent scrapes beside {} slow clients: median {:.0} ms, slowest \
         {:.0} ms (one alone {:.1} ms, bound {:.0} ms); body {} bytes; dribbled heads cut after \
         {:.1} to {:.1} s; refused past {} connections in {:.1} ms; RSS {rss_before} KiB -> \
         {rss_busy} KiB busy -> {rss_after} KiB",
        2 * SLOW + PIPELINED,
        median.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3,
        single.as_secs_f64() * 1e3,
        bound.as_secs_f64() * 1e3,
        bodies[0].len(),
        cuts[0].as_secs_f64(),
        cuts[cuts.len() - 1].as_secs_f64(),
        limits.max_connections,
        refused_in.as_secs_f64() * 1e3,
    );
    target.send("exit");
    target.finish();
    agent.stop();
}
