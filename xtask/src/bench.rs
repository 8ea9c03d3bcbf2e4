//! `cargo xtask bench overhead`: what the agent costs the program it watches.
//!
//! `bench/overhead` (a map-heavy Go program in timed phases) runs once per
//! configuration per round, each run a fresh process: without the agent
//! (`none`), with the agent's default flags (`default`) and, once the agent
//! has `--map-assign-probes`, with `off` and `always`. The order of the
//! configurations rotates from round to round so slow drift (thermal, a
//! neighbour's load) spreads over all of them. Per phase the report gives the
//! median ns/op of each configuration, the throughput ratio against `none`,
//! the probe hits the agent saw during the phase and what each hit cost.
use std::{
    fmt::Write as _,
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread::{self, sleep},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    http, openmetrics,
    project::{
        GO_VERSIONS, cargo, fmt_elapsed, go_binary, go_build, is_root, run, target_dir,
        workspace_root,
    },
    setup::setup,
    signal,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any phase may take (the slowest takes a few seconds with probes).
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The pause after each phase, in every configuration alike: the agent folds
/// kernel counters (lost events) into its metrics every `--poll-interval-ms`
/// (1000 by default), so a scrape this long after the phase ended has them.
const SETTLE: Duration = Duration::from_millis(1300);
const GROWTHS: &str = "gopulse_map_growths_total";
const EVENTS_LOST: &str = "gopulse_events_lost_total";
/// Every probe hit, by probe, on agents that have it.
const PROBE_HITS: &str = "gopulse_probe_hits_total";
/// The agent flag that selects the `mapassign` probes, once it exists.
const MAP_ASSIGN_FLAG: &str = "--map-assign-probes";

#[derive(clap::Args)]
pub struct OverheadArgs {
    /// Rounds; each runs every configuration once, in rotated order.
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Go release to build the workload with (1.23.9 for classic maps).
    #[arg(long, value_name = "VERSION", default_value = "1.27.3")]
    go: String,
    /// Build and run the agent with the release profile.
    #[arg(long)]
    release: bool,
    /// Multiply the workload's operation counts (a quick check: 0.05).
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    scale: f64,
    /// Only these phases, comma-separated (small, int-8, ..., grow-heavy).
    #[arg(long, value_name = "LIST")]
    phases: Option<String>,
}

/// One way of running the workload: without the agent (`agent: None`) or
/// with it and these extra flags.
#[derive(Clone, Debug)]
struct Config {
    name: String,
    agent: Option<Vec<String>>,
}

/// The configurations, `none` first (every ratio is against it). `off` and
/// `always` need an agent that knows `--map-assign-probes`.
fn configs(agent_help: &str) -> Vec<Config> {
    let mut table: Vec<(&str, Option<&[&str]>)> = vec![("none", None), ("default", Some(&[]))];
    if agent_help.contains(MAP_ASSIGN_FLAG) {
        table.push(("off", Some(&["--map-assign-probes=off"])));
        table.push(("always", Some(&["--map-assign-probes=always"])));
    }
    table
        .into_iter()
        .map(|(name, args)| Config {
            name: name.to_string(),
            agent: args.map(|a| a.iter().map(|s| (*s).to_string()).collect()),
        })
        .collect()
}

/// One phase of one run.
#[derive(Clone, Debug, PartialEq)]
struct Phase {
    name: String,
    ops: u64,
    ns_per_op: f64,
    gcs: u64,
    /// Probe hits during the phase: `gopulse_probe_hits_total` where the
    /// agent has it, else map growths plus lost events; `None` without the
    /// agent.
    hits: Option<u64>,
    lost: Option<u64>,
}

#[derive(Debug)]
struct RunResult {
    config: String,
    phases: Vec<Phase>,
    phase_ns: f64,
    go_version: String,
}

pub fn overhead(cache: &Path, args: &OverheadArgs) -> Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask bench overhead needs root: the agent loads BPF programs and attaches \
             uprobes; run it as root"
        );
    }
    if !GO_VERSIONS.contains(&args.go.as_str()) {
        bail!(
            "--go {}: not a release setup installs; pick one of {}",
            args.go,
            GO_VERSIONS.join(" ")
        );
    }
    if !(args.scale > 0.0 && args.scale.is_finite()) {
        bail!("--scale must be a positive number");
    }
    let started = Instant::now();
    setup(cache)?;
    let profile = if args.release { "release" } else { "debug" };
    println!("bench: building the agent ({profile})");
    let mut build = cargo(cache)?;
    build.args(["build", "-p", "gopulse-agent"]);
    if args.release {
        build.arg("--release");
    }
    run(&mut build)?;
    let agent_bin = target_dir().join(profile).join("gopulse");
    let help = Command::new(&agent_bin)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", agent_bin.display()))?;
    let configs = configs(&String::from_utf8_lossy(&help.stdout));
    let out_dir = target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let go_bin = build_workload(cache, &args.go, &out_dir)?;

    signal::install();
    let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
    println!(
        "bench: Go {}, {} rounds of {} (rotating), {profile} agent",
        args.go,
        args.rounds,
        names.join(", ")
    );
    let raw_path = out_dir.join(format!("overhead-go{}-runs.txt", args.go));
    let mut raw =
        File::create(&raw_path).with_context(|| format!("creating {}", raw_path.display()))?;
    let mut runs = Vec::new();
    for round in 0..args.rounds as usize {
        for config in rotated(&configs, round) {
            if signal::stop_requested() {
                bail!("interrupted");
            }
            let t = Instant::now();
            let result = run_once(&go_bin, &agent_bin, config, args, &out_dir, round)
                .with_context(|| format!("round {}, config {}", round + 1, config.name))?;
            println!(
                "bench: round {}/{} {:<8} {:>7.3}s of phases ({} run){}",
                round + 1,
                args.rounds,
                config.name,
                result.phase_ns / 1e9,
                fmt_elapsed(t.elapsed()),
                brief(&result)
            );
            writeln!(raw, "round {} {}: {:?}", round + 1, config.name, result)?;
            runs.push(result);
        }
    }
    let go_version = runs
        .first()
        .map_or_else(String::new, |r| r.go_version.clone());
    let report = report(&configs, &runs)?;
    let elapsed = started.elapsed();
    let header = format!(
        "{}\nGo {go_version}, {} rounds, {profile} agent, {} run in total\n",
        machine(),
        args.rounds,
        fmt_elapsed(elapsed)
    );
    let md_path = out_dir.join(format!("overhead-go{}.md", args.go));
    fs::write(&md_path, format!("{header}\n{report}"))
        .with_context(|| format!("writing {}", md_path.display()))?;
    println!("\n{header}\n{report}");
    println!(
        "bench: report in {}, every run in {}",
        md_path.display(),
        raw_path.display()
    );
    Ok(())
}

fn build_workload(cache: &Path, go: &str, out_dir: &Path) -> Result<PathBuf> {
    println!("bench: building bench/overhead with Go {go}");
    let bin = out_dir.join(format!("overhead-go{go}"));
    let dir = workspace_root().join("bench").join("overhead");
    run(go_build(cache, &go_binary(cache, go), &dir, &bin).arg("."))?;
    Ok(bin)
}

/// The configurations of round `round`, rotated by it.
fn rotated(configs: &[Config], round: usize) -> impl Iterator<Item = &Config> {
    let n = configs.len();
    (0..n).map(move |i| &configs[(i + round) % n])
}

fn brief(r: &RunResult) -> String {
    let hits: Option<u64> = r.phases.iter().map(|p| p.hits).sum();
    let lost: Option<u64> = r.phases.iter().map(|p| p.lost).sum();
    match (hits, lost) {
        (Some(h), Some(l)) => format!(", {h} probe hits, {l} events lost"),
        _ => String::new(),
    }
}

/// One fresh workload process, with the agent attached if the config says so.
fn run_once(
    go_bin: &Path,
    agent_bin: &Path,
    config: &Config,
    args: &OverheadArgs,
    out_dir: &Path,
    round: usize,
) -> Result<RunResult> {
    let tag = format!("r{}-{}", round + 1, config.name);
    let mut cmd = Command::new(go_bin);
    cmd.arg(format!("-scale={}", args.scale));
    if let Some(phases) = &args.phases {
        cmd.arg(format!("-phases={phases}"));
    }
    let mut go = Workload::spawn(&mut cmd, &out_dir.join(format!("workload-{tag}.log")))?;
    let line = go.line(READY_TIMEOUT)?;
    let pid: u32 = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("the workload said {line:?}, not `ready <pid>`"))?;

    let mut agent = None;
    if let Some(extra) = &config.agent {
        let listen = free_addr()?;
        let mut cmd = Command::new(agent_bin);
        cmd.arg("--pid")
            .arg(pid.to_string())
            .arg("--listen")
            .arg(&listen)
            .args(extra);
        let log = out_dir.join(format!("agent-{tag}.log"));
        let mut a = Agent::spawn(&mut cmd, &log, listen)?;
        a.wait_ready()?;
        agent = Some(a);
    }
    let mut counted = match &mut agent {
        Some(a) => Some(a.hits(pid)?),
        None => None,
    };

    go.send("go")?;
    let mut hits = Vec::new();
    // `done <phase>` after each phase; the `next` after the last one is
    // answered with the JSON line.
    let json = loop {
        let line = go.line(PHASE_TIMEOUT)?;
        if line.starts_with('{') {
            go.wait()?;
            break line;
        }
        let phase = line
            .strip_prefix("done ")
            .with_context(|| format!("the workload said {line:?}"))?;
        sleep(SETTLE);
        if let Some(a) = &mut agent {
            a.check_alive()?;
            let now = a.hits(pid)?;
            let before = counted.unwrap_or_default();
            hits.push((
                phase.to_string(),
                now.0.saturating_sub(before.0),
                now.1.saturating_sub(before.1),
            ));
            counted = Some(now);
        }
        go.send("next")?;
    };
    if let Some(mut a) = agent {
        a.stop()?;
    }
    let mut result = parse_report(&json, &config.name)?;
    if config.agent.is_some() {
        for p in &mut result.phases {
            let (_, probe_hits, lost) = hits
                .iter()
                .find(|(name, ..)| *name == p.name)
                .with_context(|| format!("no metrics scraped after phase {}", p.name))?;
            p.hits = Some(*probe_hits);
            p.lost = Some(*lost);
        }
    }
    Ok(result)
}

/// A loopback address with a port free right now.
fn free_addr() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.to_string())
}

/// Sets up a child the way the demo does: own process group, dies with xtask.
fn spawn_child(cmd: &mut Command, name: &str) -> Result<Child> {
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and
    // exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting the {name} ({:?})", cmd.get_program()))
}

fn log_tail(log: &Path) -> String {
    const LINES: usize = 30;
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
    format!("--- last lines of {} ---\n{tail}", log.display())
}

/// The Go workload: its stdout arrives line by line through a thread.
struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    log: PathBuf,
}

impl Workload {
    fn spawn(cmd: &mut Command, log: &Path) -> Result<Self> {
        let err = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(err);
        let mut child = spawn_child(cmd, "workload")?;
        let stdout = child.stdout.take().context("workload stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            lines,
            log: log.to_path_buf(),
        })
    }

    fn line(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if signal::stop_requested() {
                bail!("interrupted");
            }
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => return Ok(line),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!(
                        "the workload exited ({status}) mid-run\n{}",
                        log_tail(&self.log)
                    );
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    bail!("the workload said nothing for {}s", timeout.as_secs());
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn send(&mut self, word: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("workload stdin closed")?;
        writeln!(stdin, "{word}")
            .and_then(|()| stdin.flush())
            .context("writing to the workload")
    }

    fn wait(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the workload failed ({status})\n{}", log_tail(&self.log));
        }
        Ok(())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Agent {
    child: Child,
    listen: String,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Agent {
    fn spawn(cmd: &mut Command, log: &Path, listen: String) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Ok(Self {
            child: spawn_child(cmd, "agent")?,
            listen,
            log: log.to_path_buf(),
            exited: None,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.exited = Some(status);
            bail!("the agent exited ({status})\n{}", log_tail(&self.log));
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if signal::stop_requested() {
                bail!("interrupted");
            }
            self.check_alive()?;
            match http::get(&self.listen, "/readyz", Duration::from_secs(1)) {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("HTTP {}: {}", r.status, r.body.trim()),
                Err(err) => last = format!("{err:#}"),
            }
            sleep(Duration::from_millis(100));
        }
        Err(anyhow!(
            "the agent was not ready within {}s (last /readyz: {last})\n{}",
            READY_TIMEOUT.as_secs(),
            log_tail(&self.log)
        ))
    }

    /// (probe hits, events lost) the agent has counted for `pid` so far.
    fn hits(&self, pid: u32) -> Result<(u64, u64)> {
        let r = http::get(&self.listen, "/metrics", HTTP_TIMEOUT)?;
        if r.status != 200 {
            bail!("/metrics: HTTP {}: {}", r.status, r.body.trim());
        }
        let samples = openmetrics::parse(&r.body)?;
        let pid = pid.to_string();
        let sum = |name: &str| {
            samples
                .iter()
                .filter(|s| s.name == name && s.label("pid") == Some(pid.as_str()))
                .fold(0.0, |acc, s| acc + s.value)
        };
        let lost = sum(EVENTS_LOST);
        // An agent that counts every probe hit (GC, growth, assignment)
        // says so; an older one counts growths, and a lost event was a hit.
        let hits = if samples.iter().any(|s| s.name == PROBE_HITS) {
            sum(PROBE_HITS)
        } else {
            sum(GROWTHS) + lost
        };
        // Counters of whole events: exact in an f64 far past any run's count.
        Ok((hits as u64, lost as u64))
    }

    fn stop(&mut self) -> Result<()> {
        if self.exited.is_some() || self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // child, not yet reaped, so it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(());
            }
            sleep(Duration::from_millis(50));
        }
        eprintln!("bench: the agent ignored SIGTERM; killing it");
        self.child.kill()?;
        self.exited = Some(self.child.wait()?);
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("bench: stopping the agent: {err:#}");
        }
    }
}

/// The workload's JSON line.
fn parse_report(line: &str, config: &str) -> Result<RunResult> {
    let v = json::parse(line).with_context(|| format!("the workload's report {line:?}"))?;
    let field = |v: &json::Value, key: &str| -> Result<f64> {
        v.get(key)
            .and_then(json::Value::as_f64)
            .with_context(|| format!("report: no number {key:?}"))
    };
    let mut phases = Vec::new();
    for p in v
        .get("phases")
        .and_then(json::Value::as_array)
        .context("report: no phases")?
    {
        phases.push(Phase {
            name: p
                .get("name")
                .and_then(json::Value::as_str)
                .context("report: phase without a name")?
                .to_string(),
            ops: field(p, "ops")? as u64,
            ns_per_op: field(p, "ns_per_op")?,
            gcs: field(p, "gcs")? as u64,
            hits: None,
            lost: None,
        });
    }
    Ok(RunResult {
        config: config.to_string(),
        phases,
        phase_ns: field(&v, "phase_ns")?,
        go_version: v
            .get("go_version")
            .and_then(json::Value::as_str)
            .unwrap_or_default()
            .to_string(),
    })
}

/// The median; the mean of the middle two for an even count. `None` if empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Throughput of `config` relative to the baseline: baseline ns/op over
/// config ns/op (0.8 = 20% fewer operations per second).
fn throughput_ratio(baseline_ns: f64, config_ns: f64) -> f64 {
    baseline_ns / config_ns
}

/// What each probe hit added, in ns: the extra time of the phase spread over
/// its hits. `None` without hits.
fn cost_per_hit(
    baseline_ns_per_op: f64,
    config_ns_per_op: f64,
    ops: u64,
    hits: f64,
) -> Option<f64> {
    (hits > 0.0).then(|| (config_ns_per_op - baseline_ns_per_op) * ops as f64 / hits)
}

/// A Markdown table: per phase, the baseline and, for each agent config,
/// its median ns/op, the throughput ratio of the medians (with the range of
/// the per-round ratios), the median probe hits and the cost per hit.
fn report(configs: &[Config], runs: &[RunResult]) -> Result<String> {
    let (base, others) = configs.split_first().context("no configurations")?;
    let of = |name: &str| -> Vec<&RunResult> { runs.iter().filter(|r| r.config == name).collect() };
    let base_runs = of(&base.name);
    let first = base_runs.first().context("no baseline run")?;
    let mut head = format!("| phase | ops | GCs | {} ns/op |", base.name);
    let mut rule = String::from("|---|--:|--:|--:|");
    for c in others {
        let n = &c.name;
        let _ = write!(
            head,
            " {n} ns/op | {n} throughput ratio (per-round range) | {n} probe hits | {n} cost per hit |"
        );
        rule.push_str("--:|--:|--:|--:|");
    }
    let mut out = format!("{head}\n{rule}\n");
    let phase_of = |r: &RunResult, name: &str| -> Result<Phase> {
        r.phases
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .with_context(|| format!("run of {} lacks phase {name}", r.config))
    };
    for p in &first.phases {
        let base_ns: Vec<f64> = base_runs
            .iter()
            .map(|r| phase_of(r, &p.name).map(|q| q.ns_per_op))
            .collect::<Result<_>>()?;
        let gcs: Vec<f64> = base_runs
            .iter()
            .map(|r| phase_of(r, &p.name).map(|q| q.gcs as f64))
            .collect::<Result<_>>()?;
        let base_med = median(&base_ns).unwrap_or(f64::NAN);
        let _ = write!(
            out,
            "| {} | {} | {} | {} |",
            p.name,
            p.ops,
            median(&gcs).unwrap_or_default(),
            fmt_ns(base_med)
        );
        for c in others {
            let phases: Vec<Phase> = of(&c.name)
                .iter()
                .map(|r| phase_of(r, &p.name))
                .collect::<Result<_>>()?;
            let ns: Vec<f64> = phases.iter().map(|q| q.ns_per_op).collect();
            let hits: Vec<f64> = phases
                .iter()
                .filter_map(|q| q.hits)
                .map(|h| h as f64)
                .collect();
            let med = median(&ns).unwrap_or(f64::NAN);
            let hits_med = median(&hits).unwrap_or_default();
            // Per-round ratios: round i of this config against round i of the
            // baseline (the same rotation slot).
            let per_round: Vec<f64> = base_ns
                .iter()
                .zip(&ns)
                .map(|(&b, &x)| throughput_ratio(b, x))
                .collect();
            let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            // Unless every round was slower with the agent, the difference
            // is not told apart from run-to-run noise.
            let mark = if hi < 1.0 { "" } else { " †" };
            let cost = cost_per_hit(base_med, med, p.ops, hits_med).map_or_else(
                || "-".to_string(),
                |ns| format!("{:.2} µs{mark}", ns / 1000.0),
            );
            let _ = write!(
                out,
                " {} | {:.3} ({lo:.2}–{hi:.2}) | {hits_med} | {cost} |",
                fmt_ns(med),
                throughput_ratio(base_med, med),
            );
        }
        out.push('\n');
    }
    // Whole run: the sum of the phases' times.
    let total = |name: &str| -> Vec<f64> { of(name).iter().map(|r| r.phase_ns / 1e9).collect() };
    let base_total = median(&total(&base.name)).unwrap_or(f64::NAN);
    let _ = write!(out, "| all phases (s) | | | {base_total:.3} s |");
    for c in others {
        let t = median(&total(&c.name)).unwrap_or(f64::NAN);
        let hits: Vec<f64> = of(&c.name)
            .iter()
            .map(|r| r.phases.iter().filter_map(|p| p.hits).sum::<u64>() as f64)
            .collect();
        let _ = write!(
            out,
            " {t:.3} s | {:.3} | {} | |",
            throughput_ratio(base_total, t),
            median(&hits).unwrap_or_default()
        );
    }
    out.push('\n');
    out.push_str(
        "\nThroughput ratio: none ns/op over the config's (medians; 1 = no change). \
         Cost per hit: (config - none) ns/op × ops / hits. †: not every round was slower \
         with the agent, so the difference is not told apart from run-to-run noise.\n",
    );
    Ok(out)
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 100.0 {
        format!("{ns:.0}")
    } else {
        format!("{ns:.1}")
    }
}

/// CPU model, vCPUs, kernel and date, for the report's header.
fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cpus = thread::available_parallelism().map_or(0, usize::from);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{date}: {model}, {cpus} CPUs, Linux {}", kernel.trim())
}

/// Just enough JSON for the workload's report line.
mod json {
    use anyhow::{Context as _, Result, bail};

    #[derive(Clone, Debug, PartialEq)]
    pub enum Value {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<Value>),
        Obj(Vec<(String, Value)>),
    }

    impl Value {
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }

        pub fn as_f64(&self) -> Option<f64> {
            match self {
                Value::Num(n) => Some(*n),
                _ => None,
            }
        }

        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::Str(s) => Some(s),
                _ => None,
            }
        }

        pub fn as_array(&self) -> Option<&[Value]> {
            match self {
                Value::Arr(a) => Some(a),
                _ => None,
            }
        }
    }

    pub fn parse(text: &str) -> Result<Value> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.s.len() {
            bail!("trailing characters at {}", p.i);
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
                self.i += 1;
            }
        }

        fn eat(&mut self, b: u8) -> bool {
            self.ws();
            if self.s.get(self.i) == Some(&b) {
                self.i += 1;
                true
            } else {
                false
            }
        }

        fn value(&mut self, depth: usize) -> Result<Value> {
            if depth > 32 {
                bail!("nested too deeply");
            }
            self.ws();
            let rest = &self.s[self.i..];
            match rest.first().copied() {
                Some(b'{') => {
                    self.i += 1;
                    let mut fields = Vec::new();
                    if self.eat(b'}') {
                        return Ok(Value::Obj(fields));
                    }
                    loop {
                        self.ws();
                        let key = self.string()?;
                        if !self.eat(b':') {
                            bail!("expected ':' at {}", self.i);
                        }
                        fields.push((key, self.value(depth + 1)?));
                        if self.eat(b'}') {
                            return Ok(Value::Obj(fields));
                        }
                        if !self.eat(b',') {
                            bail!("expected ',' or '}}' at {}", self.i);
                        }
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    let mut items = Vec::new();
                    if self.eat(b']') {
                        return Ok(Value::Arr(items));
                    }
                    loop {
                        items.push(self.value(depth + 1)?);
                        if self.eat(b']') {
                            return Ok(Value::Arr(items));
                        }
                        if !self.eat(b',') {
                            bail!("expected ',' or ']' at {}", self.i);
                        }
                    }
                }
                Some(b'"') => Ok(Value::Str(self.string()?)),
                _ if rest.starts_with(b"true") => {
                    self.i += 4;
                    Ok(Value::Bool(true))
                }
                _ if rest.starts_with(b"false") => {
                    self.i += 5;
                    Ok(Value::Bool(false))
                }
                _ if rest.starts_with(b"null") => {
                    self.i += 4;
                    Ok(Value::Null)
                }
                _ => {
                    let len = rest
                        .iter()
                        .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                        .unwrap_or(rest.len());
                    let num = std::str::from_utf8(&rest[..len])?;
                    let n = num
                        .parse()
                        .with_context(|| format!("bad value at {}: {num:?}", self.i))?;
                    self.i += len;
                    Ok(Value::Num(n))
                }
            }
        }

        fn string(&mut self) -> Result<String> {
            if self.s.get(self.i) != Some(&b'"') {
                bail!("expected a string at {}", self.i);
            }
            self.i += 1;
            let mut out = Vec::new();
            loop {
                let b = *self.s.get(self.i).context("unterminated string")?;
                self.i += 1;
                match b {
                    b'"' => return Ok(String::from_utf8(out)?),
                    b'\\' => {
                        let e = *self.s.get(self.i).context("unterminated escape")?;
                        self.i += 1;
                        let c = match e {
                            b'"' | b'\\' | b'/' => char::from(e),
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'u' => {
                                let hex = self.s.get(self.i..self.i + 4).context("short \\u")?;
                                self.i += 4;
                                let code = u32::from_str_radix(std::str::from_utf8(hex)?, 16)?;
                                char::from_u32(code).unwrap_or('\u{fffd}')
                            }
                            _ => bail!("unknown escape \\{}", char::from(e)),
                        };
                        let mut buf = [0; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => out.push(b),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratio_and_cost_per_hit() {
        // 100 ns/op without the agent, 125 with it: 80% of the throughput.
        assert_eq!(throughput_ratio(100.0, 125.0), 0.8);
        assert_eq!(throughput_ratio(50.0, 50.0), 1.0);
        // 1000 ops 25 ns slower each = 25 µs over 50 hits = 500 ns a hit.
        assert_eq!(cost_per_hit(100.0, 125.0, 1000, 50.0), Some(500.0));
        assert_eq!(cost_per_hit(100.0, 125.0, 1000, 0.0), None);
        // Noise can make a run with the agent faster; the cost goes negative.
        assert_eq!(cost_per_hit(100.0, 99.0, 1000, 10.0), Some(-100.0));
    }

    #[test]
    fn configs_follow_the_agent_flags() {
        let names = |help| {
            configs(help)
                .into_iter()
                .map(|c| (c.name, c.agent))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names("  --pid PID\n"),
            [("none".into(), None), ("default".into(), Some(vec![]))]
        );
        let all = names("  --map-assign-probes <MODE>  off, sampled or always\n");
        assert_eq!(all.len(), 4);
        assert_eq!(all[3].0, "always");
        assert_eq!(
            all[3].1,
            Some(vec!["--map-assign-probes=always".to_string()])
        );
    }

    #[test]
    fn rotation_changes_who_goes_first() {
        let cs = configs("--map-assign-probes");
        let order = |r| rotated(&cs, r).map(|c| c.name.as_str()).collect::<Vec<_>>();
        assert_eq!(order(0), ["none", "default", "off", "always"]);
        assert_eq!(order(1), ["default", "off", "always", "none"]);
        assert_eq!(order(4), order(0));
    }

    #[test]
    fn parses_the_workload_report() {
        let line = r#"{"go_version":"go1.27.3","gomaxprocs":2,"phases":[{"name":"small","ops":100,"ns":5000,"ns_per_op":50.5,"gcs":3},{"name":"int-8","ops":16,"ns":160,"ns_per_op":1e1,"gcs":0}],"phase_ns":5160,"wall_ns":9000}"#;
        let r = parse_report(line, "none").unwrap();
        assert_eq!(r.go_version, "go1.27.3");
        assert_eq!(r.phase_ns, 5160.0);
        assert_eq!(r.phases.len(), 2);
        assert_eq!(r.phases[0].name, "small");
        assert_eq!((r.phases[0].ops, r.phases[0].gcs), (100, 3));
        assert_eq!(r.phases[0].ns_per_op, 50.5);
        assert_eq!(r.phases[1].ns_per_op, 10.0);
        assert!(parse_report(r#"{"phases":[{"name":"x"}]}"#, "none").is_err());
        assert!(json::parse(r#"{"a":1"#).is_err());
        assert!(json::parse(r#"{"a":1} x"#).is_err());
        assert_eq!(
            json::parse(r#"["a\"\u00e9", true, null, -2.5e-1]"#).unwrap(),
            json::Value::Arr(vec![
                json::Value::Str("a\"é".into()),
                json::Value::Bool(true),
                json::Value::Null,
                json::Value::Num(-0.25),
            ])
        );
    }

    #[test]
    fn report_table() {
        let run = |config: &str, ns: f64, hits: Option<u64>| RunResult {
            config: config.into(),
            phases: vec![Phase {
                name: "small".into(),
                ops: 1000,
                ns_per_op: ns,
                gcs: 2,
                hits,
                lost: hits.map(|_| 0),
            }],
            phase_ns: ns * 1000.0,
            go_version: "go1.27.3".into(),
        };
        let runs = [
            run("none", 100.0, None),
            run("default", 125.0, Some(50)),
            run("default", 130.0, Some(50)),
            run("none", 110.0, None),
        ];
        let table = report(&configs(""), &runs).unwrap();
        // Medians 105 and 127.5: ratio 0.824, (22.5 ns × 1000) / 50 = 0.45 µs.
        assert!(
            table.contains("| small | 1000 | 2 | 105 | 128 | 0.824 (0.80–0.85) | 50 | 0.45 µs |"),
            "{table}"
        );
        // One round faster, one slower: noise.
        let runs = [
            run("none", 100.0, None),
            run("default", 95.0, Some(50)),
            run("default", 115.0, Some(50)),
            run("none", 110.0, None),
        ];
        let table = report(&configs(""), &runs).unwrap();
        assert!(table.contains("| 50 | 0.00 µs † |"), "{table}");
    }
}
