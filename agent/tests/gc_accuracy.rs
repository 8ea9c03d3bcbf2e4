//! GC cycles and pauses from real Go processes, through the real kernel,
//! against the runtime's own account (`runtime/metrics`, `ReadMemStats`).
//! Needs root; `cargo xtask test` runs it for every supported Go release.
mod support;

use std::time::Duration;

use serde::Deserialize;
use support::{Agent, Metrics, Target};

/// What the gcload fixture reports about itself (deltas over its run).
#[derive(Debug, Deserialize)]
struct Truth {
    numgc: u64,
    cycles: u64,
    forced: u64,
    pause_total_ns: u64,
    read_mem_stats: u64,
}

fn gc_pause(m: &Metrics, pid: &str, phase: &str, what: &str) -> f64 {
    m.value(
        &format!("gopulse_gc_pause_seconds_{what}"),
        &[("pid", pid), ("phase", phase)],
    )
}

fn check_release(version: &str) {
    check_build(version, "default", &[]);
}

/// The whole check on one build of the fixture (`args` go to `go build`).
fn check_build(version: &str, kind: &str, args: &[&str]) {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip(version) else {
        return;
    };
    let bin = support::build_fixture("gcload", &go, &format!("{version}-{kind}"), args);
    let mut target = Target::spawn(&bin, &["5", "10"]);
    let agent = Agent::spawn(&[target.pid]);
    agent.wait_ready(Duration::from_secs(30));
    let pid = target.pid.to_string();
    let p = pid.as_str();
    let before = agent.scrape();
    assert_eq!(
        before.value(
            "go_memory_gc_cycles_total",
            &[("pid", p), ("go_version", &format!("go{version}"))]
        ),
        0.0,
        "GC is off in the fixture until it is told to go"
    );
    assert!(before.value("gopulse_probes_attached", &[("pid", p)]) >= 3.0);
    // Every growth kind is watched in these builds (PGO ones included).
    assert!(
        !before.has("gopulse_map_growth_unwatched", &[("pid", p)]),
        "go{version} {kind}: a growth kind is not watched"
    );
    assert_eq!(
        before.value("gopulse_map_growth_probes_attached", &[("pid", p)]),
        1.0
    );

    target.send("go");
    let truth: Truth = serde_json::from_str(&target.read_line(Duration::from_secs(120)))
        .expect("fixture truth JSON");
    assert_eq!(
        truth.numgc, truth.cycles,
        "runtime/metrics and MemStats disagree"
    );
    assert_eq!(truth.forced, 5);
    assert!(
        truth.numgc >= 15,
        "fixture ran {} cycles, expected 5 forced + 10 natural",
        truth.numgc
    );

    // Events reach the agent asynchronously: wait until everything expected
    // has arrived (or time runs out), then compare exactly.
    let cycles = truth.numgc as f64;
    let after = agent.scrape_until(Duration::from_secs(15), |m| {
        m.value("go_memory_gc_cycles_total", &[("pid", p)]) >= cycles
            && gc_pause(m, p, "mark_termination", "count") >= cycles
            && gc_pause(m, p, "sweep_termination", "count") >= cycles
            && m.value(
                "gopulse_stw_pause_seconds_count",
                &[("pid", p), ("reason", "read_mem_stats")],
            ) >= truth.read_mem_stats as f64
    });
    let delta = |f: &dyn Fn(&Metrics) -> f64| f(&after) - f(&before);

    // The runtime's own count, read from its memory (since the process
    // started, and GC was off until "go").
    assert_eq!(
        after.value("go_memory_gc_cycles_total", &[("pid", p)]),
        cycles,
        "gc cycles: agent vs runtime"
    );
    for phase in ["sweep_termination", "mark_termination"] {
        assert_eq!(
            delta(&|m| gc_pause(m, p, phase, "count")),
            cycles,
            "{phase} pauses vs cycles"
        );
    }
    assert_eq!(
        delta(&|m| m.value(
            "gopulse_stw_pause_seconds_count",
            &[("pid", p), ("reason", "read_mem_stats")]
        )),
        truth.read_mem_stats as f64,
        "ReadMemStats calls seen with reason read_mem_stats"
    );
    assert_eq!(after.value("gopulse_events_lost_total", &[("pid", p)]), 0.0);

    let agent_ns = delta(&|m| {
        gc_pause(m, p, "sweep_termination", "sum") + gc_pause(m, p, "mark_termination", "sum")
    }) * 1e9;
    let runtime_ns = truth.pause_total_ns as f64;
    let ratio = agent_ns / runtime_ns;
    eprintln!(
        "RESULT go{version} {kind}: {} cycles; GC pause sum agent {:.0} ns, runtime PauseTotalNs {} ns, ratio {:.4}",
        truth.numgc, agent_ns, truth.pause_total_ns, ratio
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "GC pause sum {agent_ns:.0} ns is not within 10% of the runtime's {runtime_ns} ns"
    );
    // Every build tested here gives the probes Go's own pause timestamps
    // (registers from 1.22, work.pauseStart and memstats.last_gc_nanotime
    // in 1.21 with symbols), so the sums agree to float rounding.
    assert!(
        (agent_ns - runtime_ns).abs() <= 1.0 + runtime_ns * 1e-9,
        "GC pause sum {agent_ns:.0} ns differs from the runtime's {runtime_ns} ns"
    );

    target.send("exit");
    target.finish();
    agent.stop();
}

/// Profile-guided builds (`-pgo`, the maps fixture's profile of a
/// map-growth-heavy loop): the runtime's `(*table).grow` and `split` are
/// inlined away. GC and stop-the-world pauses are watched as in any build
/// (a refusal to watch would fail `wait_ready`).
fn check_pgo(version: &str) {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip(version) else {
        return;
    };
    let pgo = support::pgo_flag(&go, version);
    let bin = support::build_fixture("gcload", &go, &format!("{version}-pgo"), &[&pgo]);
    support::assert_grow_split_inlined(&go, &bin, &format!("gcload go{version}"));
    check_build(version, "pgo", &[&pgo]);
}

#[test]
fn gc_pgo_go1_24() {
    check_pgo("1.24.11");
}

#[test]
fn gc_pgo_go1_25() {
    check_pgo("1.25.5");
}

#[test]
fn gc_pgo_go1_26() {
    check_pgo("1.26.6");
}

#[test]
fn gc_pgo_go1_27() {
    check_pgo("1.27.3");
}

macro_rules! releases {
    ($($name:ident => $version:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_release($version);
            }
        )*

        #[test]
        fn every_supported_release_has_a_test() {
            assert_eq!(&[$($version),*], support::GO_VERSIONS);
        }
    };
}

/// Stripped binaries have no symbols and no DWARF: probes come from pclntab.
#[test]
fn gc_go1_23_stripped_classic() {
    check_build("1.23.9", "stripped", &["-ldflags=-s -w"]);
}

#[test]
fn gc_go1_27_stripped_swiss() {
    check_build("1.27.3", "stripped", &["-ldflags=-s -w"]);
}

/// The hardest layout: external linking (C code before Go's text), PIE
/// (relocated tables), no symbols, and Go 1.26+'s zero pclntab textStart.
#[test]
fn gc_go1_27_cgo_pie_stripped() {
    check_build(
        "1.27.3",
        "cgo-pie-stripped",
        &["-tags=gopulse_cgo", "-buildmode=pie", "-ldflags=-s -w"],
    );
}

#[test]
fn gc_go1_21_pie() {
    check_build("1.21.13", "pie", &["-buildmode=pie"]);
}

releases! {
    gc_go1_21 => "1.21.13",
    gc_go1_22 => "1.22.10",
    gc_go1_23 => "1.23.9",
    gc_go1_24 => "1.24.11",
    gc_go1_25 => "1.25.5",
    gc_go1_26 => "1.26.6",
    gc_go1_27 => "1.27.3",
}
