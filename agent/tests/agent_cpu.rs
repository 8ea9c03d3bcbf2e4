//! The agent's own CPU while it watches an idle Go process, with `--pid`
//! and by discovery (issue 18: with `--pid` the follow loop never slept and
//! burnt a whole CPU). Watching an idle process costs the agent well under
//! 1% of a CPU (docs/performance.md); the bound is far from that and far
//! from the bug, so a busy machine never trips it.
mod support;

use std::{thread, time::Duration};

use support::{Agent, Target};

/// Most of one CPU the agent may use, idle, over [`WINDOW`].
const BOUND: f64 = 0.05;
const WINDOW: Duration = Duration::from_secs(20);

/// The agent's CPU, as a fraction of one CPU, over [`WINDOW`] once it
/// watches `target` (scraped once before, so start-up is not counted).
fn idle_cpu(agent: &Agent, target: &Target) -> f64 {
    let pid = target.pid.to_string();
    let watched = |m: &support::Metrics| m.has("gopulse_probes_attached", &[("pid", &pid)]);
    let m = agent.scrape_until(support::scaled(Duration::from_secs(10)), watched);
    assert!(watched(&m), "pid {} not watched", target.pid);
    let before = support::cpu_seconds(agent.pid());
    thread::sleep(WINDOW);
    let used = support::cpu_seconds(agent.pid()) - before;
    used / WINDOW.as_secs_f64()
}

fn idle_target(tag: &str) -> Option<(Target, String)> {
    if !support::have_root() {
        return None;
    }
    let go = support::go_or_skip("1.27.3")?;
    let bin = support::build_fixture("idle", &go, "1.27.3", &[]);
    // A name of its own, so discovery watches this copy only.
    let name = format!("idle-cpu-{tag}-{}", std::process::id());
    let copy = support::private_copy(&bin, &name);
    Some((Target::spawn(&copy, &[]), name))
}

#[test]
fn idle_with_pid() {
    let Some((target, _)) = idle_target("pid") else {
        return;
    };
    let agent = Agent::spawn(&[target.pid]);
    agent.wait_ready(support::scaled(Duration::from_secs(10)));
    let cpu = idle_cpu(&agent, &target);
    println!(
        "RESULT agent CPU, --pid, idle target: {:.2}% of a CPU",
        cpu * 100.0
    );
    assert!(
        cpu <= BOUND,
        "the agent used {:.1}% of a CPU watching an idle process with --pid (bound {:.0}%)",
        cpu * 100.0,
        BOUND * 100.0
    );
    agent.stop();
    target.finish();
}

#[test]
fn idle_by_discovery() {
    let Some((target, name)) = idle_target("discovery") else {
        return;
    };
    let agent = Agent::spawn_with(&[], &["--exe-regex", &format!("^{name}$")]);
    agent.wait_ready(support::scaled(Duration::from_secs(10)));
    let cpu = idle_cpu(&agent, &target);
    println!(
        "RESULT agent CPU, discovery, idle target: {:.2}% of a CPU",
        cpu * 100.0
    );
    assert!(
        cpu <= BOUND,
        "the agent used {:.1}% of a CPU watching an idle process by discovery (bound {:.0}%)",
        cpu * 100.0,
        BOUND * 100.0
    );
    agent.stop();
    target.finish();
}
