//! `cargo xtask demo`: the agent on a bundled Go workload, with a live
//! summary of what it measures.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    http,
    managed::Managed,
    openmetrics,
    project::{GO_VERSIONS, cargo, go_binary, go_build, is_root, run, target_dir, workspace_root},
    setup::setup_demo,
    signal, summary,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const SUMMARY_EVERY: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct DemoArgs {
    pub duration: Option<u64>,
    pub listen: String,
    pub go: String,
}

pub fn demo(cache: &Path, args: &DemoArgs) -> Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask demo needs root to load BPF programs and attach uprobes; run it as root"
        );
    }
    if !GO_VERSIONS.contains(&args.go.as_str()) {
        bail!(
            "--go {}: not a release setup installs; pick one of {}",
            args.go,
            GO_VERSIONS.join(" ")
        );
    }
    setup_demo(cache, &args.go)?;

    println!("demo: building the agent");
    run(cargo(cache)?.args(["build", "-p", "gopulse-agent"]))?;
    let agent_bin = target_dir().join("debug").join("gopulse");
    let out_dir = target_dir().join("demo");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let demo_bin = build_workload(cache, &args.go, &out_dir)?;

    signal::install();
    let demo_log = out_dir.join("demo.log");
    let agent_log = out_dir.join("gopulse.log");
    let mut demo = Managed::spawn("demo workload", &mut Command::new(&demo_bin), &demo_log)?;
    let mut agent = Managed::spawn(
        "agent",
        Command::new(&agent_bin)
            .arg("--pid")
            .arg(demo.child.id().to_string())
            .arg("--listen")
            .arg(&args.listen),
        &agent_log,
    )?;
    println!(
        "demo: Go {} workload pid {} (output: {}), agent pid {} (log: {})",
        args.go,
        demo.child.id(),
        demo_log.display(),
        agent.child.id(),
        agent_log.display()
    );
    println!("demo: metrics at http://{}/metrics", args.listen);
    if !wait_ready(&mut agent, &args.listen)? {
        return Ok(());
    }
    println!("demo: agent ready; a summary every 5s, Ctrl-C to stop");
    watch(&mut agent, &mut demo, args)?;
    let status = agent.stop()?;
    if status.code().is_some_and(|code| code != 0) {
        println!(
            "demo: the agent exited with {status} when stopped; see {}",
            agent_log.display()
        );
    }
    demo.stop()?;
    Ok(())
}

fn build_workload(cache: &Path, go: &str, out_dir: &Path) -> Result<PathBuf> {
    println!("demo: building examples/demo with Go {go}");
    let bin = out_dir.join(format!("demo-go{go}"));
    let dir = workspace_root().join("examples").join("demo");
    run(go_build(cache, &go_binary(cache, go), &dir, &bin).arg("."))?;
    Ok(bin)
}

/// Polls `/readyz` until it answers 200. `Ok(false)` if interrupted.
fn wait_ready(agent: &mut Managed, listen: &str) -> Result<bool> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if signal::stop_requested() {
            return Ok(false);
        }
        agent.check_alive()?;
        match http::get(listen, "/readyz", Duration::from_secs(1)) {
            Ok(r) if r.status == 200 => return Ok(true),
            Ok(r) => last = format!("HTTP {}: {}", r.status, r.body.trim()),
            Err(err) => last = format!("{err:#}"),
        }
        sleep(Duration::from_millis(200));
    }
    Err(anyhow!(
        "the agent was not ready within {}s (last /readyz: {last})\n{}",
        READY_TIMEOUT.as_secs(),
        agent.log_tail()
    ))
}

/// Prints a summary every 5 s until Ctrl-C, `--duration`, or a child dies.
fn watch(agent: &mut Managed, demo: &mut Managed, args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs(d));
    let mut next = started + SUMMARY_EVERY;
    let mut last_printed = None;
    loop {
        if signal::stop_requested() {
            println!("demo: interrupted, stopping");
            return Ok(());
        }
        agent.check_alive()?;
        demo.check_alive()?;
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            // A last look unless one was just printed.
            if last_printed.is_none_or(|t: Instant| now - t > Duration::from_secs(1)) {
                print_summary(&args.listen, now - started);
            }
            return Ok(());
        }
        if now >= next {
            print_summary(&args.listen, now - started);
            last_printed = Some(now);
            next += SUMMARY_EVERY;
        }
        sleep(POLL);
    }
}

fn print_summary(listen: &str, elapsed: Duration) {
    let scraped = http::get(listen, "/metrics", HTTP_TIMEOUT).and_then(|r| {
        if r.status != 200 {
            bail!("HTTP {}: {}", r.status, r.body.trim());
        }
        openmetrics::parse(&r.body)
    });
    match scraped {
        Ok(samples) => print!(
            "[{:>4}s] {}",
            elapsed.as_secs(),
            summary::summarize(&samples)
        ),
        Err(err) => println!("[{:>4}s] scrape failed: {err:#}", elapsed.as_secs()),
    }
}
