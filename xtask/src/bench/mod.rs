//! `cargo xtask bench`: what the agent costs the programs it watches.
//!
//! - `overhead` ([`overhead`]): a map-heavy Go program, phase by phase,
//!   without the agent and with it in several configurations.
//! - `probes` ([`probes`]): what one hit of each BPF program costs.
//! - `exec-storm` ([`exec_storm`]): what a storm of non-Go execs costs the
//!   agent in node mode (its own CPU, not a workload's).
//!
//! The first two drive a Go workload from `bench/` (package `harness` there has the
//! line protocol) one fresh process per run: the workload on one CPU, the
//! agent, the harness and whatever it runs (bpftool) on another, so the
//! agent's own work does not take the workload's CPU.
mod exec_storm;
mod json;
mod overhead;
mod probes;

use std::{
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

pub use self::{
    exec_storm::{ExecStormArgs, exec_storm},
    overhead::{OverheadArgs, overhead},
    probes::{ProbesArgs, probes},
};
use crate::{
    http, openmetrics,
    project::{cargo, go_binary, go_build, is_root, run, target_dir, workspace_root},
    setup::setup,
    signal,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any phase may take (the slowest takes a few seconds with probes).
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The pause after each phase, in every configuration alike: the agent folds
/// kernel counters (hits, lost events) into its metrics every
/// `--poll-interval-ms` (1000 by default), so a scrape this long after the
/// phase ended has them.
const SETTLE: Duration = Duration::from_millis(1300);

/// What every benchmark starts with.
struct Prepared {
    agent_bin: PathBuf,
    /// The agent's `--help`, which tells which flags it has.
    agent_help: String,
    /// `target/bench`, where reports and logs go.
    out_dir: PathBuf,
    started: Instant,
    /// [`load_average`] before anything was built.
    load_at_start: String,
}

/// Checks that `cargo xtask bench <what>` can run (root, a sane
/// `--scale`), runs setup, builds the agent and makes the output directory.
fn prepare(cache: &Path, what: &str, release: bool, scale: f64) -> Result<Prepared> {
    if !is_root() {
        bail!(
            "cargo xtask bench {what} needs root: the agent loads BPF programs and attaches \
             uprobes; run it as root"
        );
    }
    if !(scale > 0.0 && scale.is_finite()) {
        bail!("--scale must be a positive number");
    }
    let started = Instant::now();
    let load_at_start = load_average();
    setup(cache)?;
    let (agent_bin, agent_help) = build_agent(cache, release)?;
    let out_dir = target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    Ok(Prepared {
        agent_bin,
        agent_help,
        out_dir,
        started,
        load_at_start,
    })
}

/// The 1, 5 and 15 minute load averages: anything else running on the
/// machine shows up in the timings.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// For the report header.
fn describe_load(at_start: &str) -> String {
    format!(
        "load average (1, 5, 15 min) {at_start} at the start, {} at the end",
        load_average()
    )
}

/// Builds the agent; returns its binary and its `--help`.
fn build_agent(cache: &Path, release: bool) -> Result<(PathBuf, String)> {
    let profile = if release { "release" } else { "debug" };
    println!("bench: building the agent ({profile})");
    let mut build = cargo(cache)?;
    build.args(["build", "-p", "gopulse-agent"]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let bin = target_dir().join(profile).join("gopulse");
    let help = Command::new(&bin)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", bin.display()))?;
    Ok((bin, String::from_utf8_lossy(&help.stdout).into_owned()))
}

/// Builds the workload `bench/<package>` with Go `go` into `out_dir`.
fn build_workload(cache: &Path, package: &str, go: &str, out_dir: &Path) -> Result<PathBuf> {
    println!("bench: building bench/{package} with Go {go}");
    let bin = out_dir.join(format!("{package}-go{go}"));
    let dir = workspace_root().join("bench");
    run(go_build(cache, &go_binary(cache, go), &dir, &bin).arg(format!("./{package}")))?;
    Ok(bin)
}

/// Which CPU runs what: the workload alone on one, the agent (with the
/// harness and what it runs) on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pinning {
    workload: usize,
    agent: usize,
}

impl Pinning {
    /// The workload on the last CPU this process may use, the agent on the
    /// first; `None` with fewer than two.
    fn choose() -> Result<Option<Self>> {
        let cpus = allowed_cpus()?;
        Ok(match (cpus.first(), cpus.last()) {
            (Some(&agent), Some(&workload)) if agent != workload => Some(Self { workload, agent }),
            _ => None,
        })
    }

    /// Pins the calling thread (xtask's main thread, so every child it
    /// spawns unless told otherwise, and every thread it starts) to the
    /// agent's CPU.
    fn pin_harness(&self) -> Result<()> {
        pin_self(self.agent)
    }
}

/// Pins the calling thread, and so every thread and child it starts
/// afterwards, to `cpu`.
fn pin_self(cpu: usize) -> Result<()> {
    let set = cpu_set(cpu);
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("pinning xtask to CPU {cpu}"));
    }
    Ok(())
}

/// For the report header.
fn describe_pinning(pinning: Option<Pinning>) -> String {
    match pinning {
        Some(p) => format!(
            "workload pinned to CPU {}; agent, harness and bpftool to CPU {} (sched_setaffinity)",
            p.workload, p.agent
        ),
        None => "not pinned: fewer than two CPUs to use".to_string(),
    }
}

fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET checks `cpu` against the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// The CPUs this thread may run on, ascending.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: as in `cpu_set`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    let bits = 8 * size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the set within its size.
    Ok((0..bits)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// One way of running a workload: without the agent (`agent: None`) or
/// with it and these extra flags.
#[derive(Clone, Debug, PartialEq)]
struct Config {
    name: String,
    agent: Option<Vec<String>>,
}

/// The configurations of round `round`, rotated by it, so that slow drift
/// (thermal, a neighbour's load) spreads over all of them.
fn rotated<T>(configs: &[T], round: usize) -> impl Iterator<Item = &T> {
    let n = configs.len();
    (0..n).map(move |i| &configs[(i + round) % n])
}

/// What one run of a workload needs.
struct RunSpec<'a> {
    workload: &'a Path,
    /// Its flags (`-scale=...`, `-phases=...`).
    args: Vec<String>,
    agent_bin: &'a Path,
    config: &'a Config,
    out_dir: &'a Path,
    /// Names the run's log files.
    tag: String,
    pinning: Option<Pinning>,
}

/// One run: the workload's report and, with the agent, what `snapshot`
/// returned before the first phase and after each phase.
struct Run<T> {
    report: Report,
    /// Workload pid.
    pid: u32,
    /// (phase, snapshot): the first, before any phase, is named "".
    snapshots: Vec<(String, T)>,
    agent_log: Option<PathBuf>,
}

/// One fresh workload process, with the agent attached if the config says
/// so. After each phase (and once before the first), everything waits
/// [`SETTLE`]; with the agent, `snapshot` then reads what it needs.
fn run_workload<T>(
    spec: &RunSpec,
    mut snapshot: impl FnMut(&Agent, u32) -> Result<T>,
) -> Result<Run<T>> {
    let mut cmd = Command::new(spec.workload);
    cmd.args(&spec.args);
    let log = spec.out_dir.join(format!("workload-{}.log", spec.tag));
    let mut go = Workload::spawn(&mut cmd, &log, spec.pinning.map(|p| p.workload))?;
    let line = go.line(READY_TIMEOUT)?;
    let pid: u32 = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("the workload said {line:?}, not `ready <pid>`"))?;

    let mut agent = None;
    if let Some(extra) = &spec.config.agent {
        let listen = free_addr()?;
        let mut cmd = Command::new(spec.agent_bin);
        cmd.arg("--pid")
            .arg(pid.to_string())
            .arg("--listen")
            .arg(&listen)
            .args(extra);
        let log = spec.out_dir.join(format!("agent-{}.log", spec.tag));
        let mut a = Agent::spawn(&mut cmd, &log, listen, spec.pinning.map(|p| p.agent))?;
        a.wait_ready()?;
        agent = Some(a);
    }
    let mut snapshots = Vec::new();
    if let Some(a) = &agent {
        snapshots.push((String::new(), snapshot(a, pid)?));
    }

    go.send("go")?;
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
            snapshots.push((phase.to_string(), snapshot(a, pid)?));
        }
        go.send("next")?;
    };
    let agent_log = match agent {
        Some(mut a) => {
            a.stop()?;
            Some(a.log.clone())
        }
        None => None,
    };
    Ok(Run {
        report: parse_report(&json)?,
        pid,
        snapshots,
        agent_log,
    })
}

/// Clock ticks per second, the unit of /proc's CPU times.
pub(super) fn clock_ticks() -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t <= 0 {
        bail!("sysconf(_SC_CLK_TCK) returned {t}");
    }
    Ok(t as f64)
}

/// utime + stime, in clock ticks, from the text of `/proc/PID/stat`.
/// The command name (field 2) is in parentheses and may itself hold spaces
/// and parentheses, so the fields are counted from the last `)`.
pub(super) fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no `)` after the command name")?;
    // After the name: state (field 3), ..., utime (14), stime (15).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        let s = fields.get(n - 3).with_context(|| format!("no field {n}"))?;
        s.parse()
            .with_context(|| format!("field {n} is {s:?}, not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// utime + stime of process `pid` (all its threads), in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(
        parse_stat_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))? as f64
            / clock_ticks()?,
    )
}

/// A loopback address with a port free right now.
fn free_addr() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.to_string())
}

/// Sets up a child the way the demo does: own process group, dies with
/// xtask; and, given a CPU, runs only there.
fn spawn_child(cmd: &mut Command, name: &str, cpu: Option<usize>) -> Result<Child> {
    cmd.process_group(0);
    let set = cpu.map(cpu_set);
    // SAFETY: prctl and sched_setaffinity are async-signal-safe system
    // calls; nothing else runs between fork and exec (the set was built
    // before the fork).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(set) = &set
                && libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) != 0
            {
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
    fn spawn(cmd: &mut Command, log: &Path, cpu: Option<usize>) -> Result<Self> {
        let err = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(err);
        let mut child = spawn_child(cmd, "workload", cpu)?;
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
    fn spawn(cmd: &mut Command, log: &Path, listen: String, cpu: Option<usize>) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Ok(Self {
            child: spawn_child(cmd, "agent", cpu)?,
            listen,
            log: log.to_path_buf(),
            exited: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
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

    /// Every sample of `/metrics`.
    fn metrics(&self) -> Result<Vec<openmetrics::Sample>> {
        let r = http::get(&self.listen, "/metrics", HTTP_TIMEOUT)?;
        if r.status != 200 {
            bail!("/metrics: HTTP {}: {}", r.status, r.body.trim());
        }
        openmetrics::parse(&r.body)
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

/// Sum of the samples named `name` whose `pid` label is `pid`.
fn sum_for_pid(samples: &[openmetrics::Sample], name: &str, pid: u32) -> f64 {
    let pid = pid.to_string();
    samples
        .iter()
        .filter(|s| s.name == name && s.label("pid") == Some(pid.as_str()))
        .fold(0.0, |acc, s| acc + s.value)
}

/// The workload's JSON line.
#[derive(Clone, Debug, PartialEq)]
struct Report {
    go_version: String,
    gomaxprocs: u64,
    phases: Vec<PhaseReport>,
    /// The sum of the phases' times.
    phase_ns: f64,
}

/// One phase of the JSON line.
#[derive(Clone, Debug, PartialEq)]
struct PhaseReport {
    name: String,
    ops: u64,
    ns_per_op: f64,
    gcs: u64,
    /// The programs the phase measures (`bench/probes`); empty elsewhere.
    probes: Vec<String>,
    /// ns/op of each part, for a phase timed in parts; else empty.
    batch_ns_per_op: Vec<f64>,
}

impl PhaseReport {
    /// ns/op of the fastest part, for a phase timed in parts (the part no
    /// burst of outside noise slowed down); else of the whole phase.
    fn fastest_ns_per_op(&self) -> f64 {
        self.batch_ns_per_op
            .iter()
            .copied()
            .reduce(f64::min)
            .unwrap_or(self.ns_per_op)
    }
}

fn parse_report(line: &str) -> Result<Report> {
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
        let probes = p
            .get("probes")
            .and_then(json::Value::as_array)
            .unwrap_or_default()
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .context("report: a phase's probes are not all strings")?;
        let batch_ns_per_op = p
            .get("batch_ns_per_op")
            .and_then(json::Value::as_array)
            .unwrap_or_default()
            .iter()
            .map(json::Value::as_f64)
            .collect::<Option<Vec<_>>>()
            .context("report: a phase's batch_ns_per_op are not all numbers")?;
        phases.push(PhaseReport {
            name: p
                .get("name")
                .and_then(json::Value::as_str)
                .context("report: phase without a name")?
                .to_string(),
            ops: field(p, "ops")? as u64,
            ns_per_op: field(p, "ns_per_op")?,
            gcs: field(p, "gcs")? as u64,
            probes,
            batch_ns_per_op,
        });
    }
    Ok(Report {
        go_version: v
            .get("go_version")
            .and_then(json::Value::as_str)
            .unwrap_or_default()
            .to_string(),
        gomaxprocs: v
            .get("gomaxprocs")
            .and_then(json::Value::as_f64)
            .unwrap_or_default() as u64,
        phases,
        phase_ns: field(&v, "phase_ns")?,
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

/// How per-round values spread: their range and their sample standard
/// deviation (n − 1 in the denominator; 0 for a single value).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    min: f64,
    max: f64,
    sd: f64,
}

fn spread(values: &[f64]) -> Option<Spread> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = values.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    Some(Spread { min, max, sd })
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
    // Not available_parallelism: the harness runs pinned to one CPU.
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{date}: {model}, {cpus} CPUs, Linux {}", kernel.trim())
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 100.0 {
        format!("{ns:.0}")
    } else {
        format!("{ns:.1}")
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
    fn spread_is_range_and_sample_sd() {
        let s = spread(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!((s.min, s.max), (2.0, 9.0));
        // Mean 5, squared deviations sum to 32, over 7.
        assert!((s.sd - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(spread(&[3.0]).unwrap().sd, 0.0);
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn rotation_changes_who_goes_first() {
        let cs = ["none", "default", "off", "always"];
        let order = |r| rotated(&cs, r).copied().collect::<Vec<_>>();
        assert_eq!(order(0), ["none", "default", "off", "always"]);
        assert_eq!(order(1), ["default", "off", "always", "none"]);
        assert_eq!(order(4), order(0));
    }

    #[test]
    fn parses_the_workload_report() {
        let line = r#"{"go_version":"go1.27.3","gomaxprocs":1,"phases":[{"name":"small","ops":100,"ns":5000,"ns_per_op":50.5,"gcs":3},{"name":"stw","ops":16,"ns":160,"ns_per_op":1e1,"gcs":0,"probes":["stw_stop","stw_start_ret"],"batch_ns_per_op":[12,8.5]}],"phase_ns":5160,"wall_ns":9000}"#;
        let r = parse_report(line).unwrap();
        assert_eq!(r.go_version, "go1.27.3");
        assert_eq!(r.gomaxprocs, 1);
        assert_eq!(r.phase_ns, 5160.0);
        assert_eq!(r.phases.len(), 2);
        assert_eq!(r.phases[0].name, "small");
        assert_eq!((r.phases[0].ops, r.phases[0].gcs), (100, 3));
        assert_eq!(r.phases[0].ns_per_op, 50.5);
        assert!(r.phases[0].probes.is_empty());
        assert_eq!(r.phases[1].ns_per_op, 10.0);
        assert_eq!(r.phases[1].probes, ["stw_stop", "stw_start_ret"]);
        assert_eq!(r.phases[0].fastest_ns_per_op(), 50.5);
        assert_eq!(r.phases[1].fastest_ns_per_op(), 8.5);
        assert!(parse_report(r#"{"phases":[{"name":"x"}]}"#).is_err());
    }

    #[test]
    fn cpu_sets() {
        let set = cpu_set(1);
        // SAFETY: reads within the set.
        assert!(unsafe { libc::CPU_ISSET(1, &set) });
        // SAFETY: as above.
        assert!(!unsafe { libc::CPU_ISSET(0, &set) });
        assert!(!allowed_cpus().unwrap().is_empty());
    }
}
