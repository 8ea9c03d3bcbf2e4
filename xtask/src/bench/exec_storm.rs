//! `cargo xtask bench exec-storm`: what a node's churn of short-lived
//! non-Go programs costs the agent in node mode.
//!
//! The agent runs with no `--pid`: it learns of every exec on the host
//! from a BPF raw tracepoint (`sched_process_exec`) through a ring buffer,
//! judges each executable once and skips non-Go programs. This benchmark
//! starts the agent that way, then, round by round, measures its CPU time
//! (utime + stime of `/proc/PID/stat`) over an idle baseline and over a
//! storm of `/bin/true` execs at a paced rate, and checks what the agent's
//! discovery metrics counted meanwhile (execs handled, skips, ring
//! overflow, executables judged). With two CPUs or more, the agent runs
//! on the first one the harness may use and the generator (xtask, its
//! spawner threads and every `/bin/true`) on the last.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Read as _,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread::{self, sleep},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{
    Agent, Prepared, clock_ticks, describe_load, free_addr, machine, median, parse_stat_cpu_ticks,
    pin_self, prepare,
};
use crate::{openmetrics, project::fmt_elapsed, signal};

/// The program the storm runs: small, not Go, on every Linux host.
const PROGRAM: &str = "/bin/true";
/// The target: at ~1,000 execs/s, the agent under this much of one CPU.
const TARGET_CPU_PERCENT: f64 = 5.0;
/// After `/readyz`: the agent's start-up scan of /proc should not count
/// toward the first idle baseline.
const STARTUP_SETTLE: Duration = Duration::from_secs(3);
/// After a storm, before the scrape: the agent folds the ring's lost
/// count into its metrics every `--poll-interval-ms` (1 s by default) and
/// may still be draining the ring.
const SETTLE: Duration = Duration::from_secs(2);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Execs one spawner thread is given per second: a spawn and wait of
/// `/bin/true` takes ~0.5–1 ms, so a thread at this pace has time to spare
/// and a slow spawn does not hold up the schedule.
const EXECS_PER_THREAD: u32 = 250;
const MAX_THREADS: usize = 16;
/// More executables judged than this in one storm, and more than
/// [`JUDGED_SHARE_MAX`] of its execs, is a finding: the storm runs one
/// executable, judged once (the rest are the host's: a build running
/// beside the benchmark makes new executables all the time).
const JUDGED_EXPECTED_MAX: f64 = 20.0;
const JUDGED_SHARE_MAX: f64 = 0.01;

const EXECS: &str = "gopulse_discovery_execs_total";
const SKIPPED: &str = "gopulse_discovery_skipped_total";
const LOST: &str = "gopulse_discovery_events_lost_total";
const JUDGED: &str = "gopulse_discovery_executables_judged_total";
const WATCHED: &str = "gopulse_processes_watched";
const RESCANS: &str = "gopulse_discovery_rescans_total";
/// One observation per Go program attached after its exec.
const ATTACHED: &str = "gopulse_discovery_attach_delay_seconds_count";

#[derive(clap::Args)]
pub struct ExecStormArgs {
    /// Execs of /bin/true per second during a storm.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: u32,
    /// How long each storm lasts, in seconds.
    #[arg(long, value_name = "N", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    seconds: u32,
    /// Build and run the agent with the release profile.
    #[arg(long)]
    release: bool,
    /// How long each idle baseline (nothing started) lasts, in seconds.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    idle_seconds: u32,
    /// Rounds: each an idle baseline, then a storm.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

/// Which CPU runs what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pinning {
    agent: usize,
    generator: usize,
}

impl Pinning {
    /// The agent on the first CPU this process may use, the generator on
    /// the last (where the other benchmarks put their workload); `None`
    /// with fewer than two.
    fn choose() -> Result<Option<Self>> {
        Ok(super::Pinning::choose()?.map(|p| Self {
            agent: p.agent,
            generator: p.workload,
        }))
    }

    fn describe(pinning: Option<Self>) -> String {
        match pinning {
            Some(p) => format!(
                "agent pinned to CPU {}; exec generator (xtask, its spawner threads and every \
                 {PROGRAM}) to CPU {} (sched_setaffinity); other processes on the machine \
                 unpinned",
                p.agent, p.generator
            ),
            None => "not pinned: fewer than two CPUs to use".to_string(),
        }
    }
}

pub fn exec_storm(cache: &Path, args: &ExecStormArgs) -> Result<()> {
    check_program()?;
    let Prepared {
        agent_bin,
        agent_help: help,
        out_dir,
        started,
        load_at_start,
    } = prepare(cache, "exec-storm", args.release, 1.0)?;
    if !help.contains("--rescan-interval") {
        bail!("the agent has no node mode (no --rescan-interval in --help): nothing to measure");
    }
    let profile = if args.release { "release" } else { "debug" };
    let version = Command::new(&agent_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let tck = clock_ticks()?;
    let pinning = Pinning::choose()?;
    // After the build (which should use every CPU): from here on xtask's
    // threads and the programs they start share the generator's CPU.
    if let Some(p) = pinning {
        pin_self(p.generator)?;
    }
    signal::install();
    let threads = spawner_threads(args.rate);
    println!(
        "bench: exec-storm, {} round(s) of {} s idle then {} s of {PROGRAM} at {}/s ({threads} \
         spawner threads), {profile} agent; {}",
        args.rounds,
        args.idle_seconds,
        args.seconds,
        args.rate,
        Pinning::describe(pinning)
    );

    let listen = free_addr()?;
    let log = out_dir.join("exec-storm-agent.log");
    let mut cmd = Command::new(&agent_bin);
    cmd.arg("--listen").arg(&listen);
    let mut agent = Agent::spawn(&mut cmd, &log, listen, pinning.map(|p| p.agent))?;
    agent.wait_ready()?;
    let first = counters(&agent.metrics()?)?;
    println!(
        "bench: agent ready (pid {}), watching {} Go process(es); settling {} s",
        agent.pid(),
        first.watched,
        STARTUP_SETTLE.as_secs()
    );
    wait(&mut agent, STARTUP_SETTLE)?;

    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let tag = format!("round {round}/{}", args.rounds);
        rounds.push(run_round(&mut agent, args, &tag, tck, threads)?);
    }
    let last = counters(&agent.metrics()?)?;
    agent.stop()?;
    let esrch_refusals = fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("No such process") && l.contains("refused"))
        .count();

    let text = report(&ReportInput {
        args,
        profile,
        version: &version,
        pinning,
        threads,
        load_at_start: &load_at_start,
        elapsed: started.elapsed(),
        rounds: &rounds,
        first,
        last,
        log: &agent.log,
        esrch_refusals,
    })?;
    let md_path = out_dir.join("exec-storm.md");
    fs::write(&md_path, &text).with_context(|| format!("writing {}", md_path.display()))?;
    println!("\n{text}");
    println!(
        "bench: report in {}, the agent's log in {}",
        md_path.display(),
        agent.log.display()
    );
    Ok(())
}

/// Fails early, and clearly, if the storm has nothing to run.
fn check_program() -> Result<()> {
    let mut magic = [0u8; 4];
    fs::File::open(PROGRAM)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| {
            format!("the storm runs {PROGRAM}, a small non-Go program, and it cannot be read")
        })?;
    if magic != *b"\x7fELF" {
        bail!("{PROGRAM} is not an ELF executable: the storm needs a small non-Go program there");
    }
    Ok(())
}

/// Sleeps `d` in small steps, stopping early on Ctrl-C or if the agent
/// dies.
fn wait(agent: &mut Agent, d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    loop {
        if signal::stop_requested() {
            bail!("interrupted");
        }
        agent.check_alive()?;
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        sleep((until - now).min(Duration::from_millis(100)));
    }
}

/// What one round measured.
struct Round {
    idle: Window,
    storm: Window,
    /// Execs of the storm's schedule.
    due: u64,
    /// Execs done (spawned and waited for).
    made: u64,
    /// What the agent counted over the idle baseline (from a scrape just
    /// before it to one just after).
    idle_counted: Counters,
    /// What the agent counted from just before the storm to [`SETTLE`]
    /// after it.
    counted: Counters,
}

impl Round {
    fn rate(&self) -> f64 {
        per_second(self.made, self.storm.wall_s)
    }

    /// Agent CPU during the storm beyond its idle rate, in seconds.
    fn excess_cpu_s(&self) -> f64 {
        self.storm.agent_cpu_s - self.idle.agent_percent() / 100.0 * self.storm.wall_s
    }
}

fn run_round(
    agent: &mut Agent,
    args: &ExecStormArgs,
    tag: &str,
    tck: f64,
    threads: usize,
) -> Result<Round> {
    println!("bench: {tag}: idle baseline, {} s", args.idle_seconds);
    let before_idle = counters(&agent.metrics()?)?;
    let start = Reading::take(agent.pid(), tck)?;
    wait(agent, Duration::from_secs(args.idle_seconds.into()))?;
    let idle = Reading::take(agent.pid(), tck)?.since(&start);
    println!(
        "bench: {tag}: agent idle {:.2}% of one CPU",
        idle.agent_percent()
    );

    let before = counters(&agent.metrics()?)?;
    let idle_counted = before.since(&before_idle);
    println!(
        "bench: {tag}: storm, {PROGRAM} at {}/s for {} s",
        args.rate, args.seconds
    );
    let start = Reading::take(agent.pid(), tck)?;
    let schedule = Schedule {
        start: start.at,
        rate: args.rate,
        total: u64::from(args.rate) * u64::from(args.seconds),
        length: Duration::from_secs(args.seconds.into()),
    };
    let made = storm(agent, &schedule, threads, tag)?;
    let storm = Reading::take(agent.pid(), tck)?.since(&start);
    wait(agent, SETTLE)?;
    let counted = counters(&agent.metrics()?)?.since(&before);
    let round = Round {
        idle,
        storm,
        due: schedule.total,
        made,
        idle_counted,
        counted,
    };
    println!(
        "bench: {tag}: {made} execs in {:.1} s ({:.0}/s); agent {:.2}% of one CPU; it handled \
         {:.0} execs, lost {:.0} events, judged {:.0} executables",
        round.storm.wall_s,
        round.rate(),
        round.storm.agent_percent(),
        counted.execs,
        counted.lost,
        counted.judged
    );
    Ok(round)
}

/// When each exec of a storm is due.
struct Schedule {
    start: Instant,
    rate: u32,
    /// Execs due in all.
    total: u64,
    /// No exec starts after `start + length`, however far behind.
    length: Duration,
}

/// When exec `i` (from 0) is due, after the storm's start: evenly spaced
/// at `rate` per second.
fn due_after(i: u64, rate: u32) -> Duration {
    let ns = u128::from(i) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// Spawner threads for `rate` execs per second: enough that each has
/// slack ([`EXECS_PER_THREAD`]), so a slow spawn delays no other exec.
fn spawner_threads(rate: u32) -> usize {
    (rate.div_ceil(EXECS_PER_THREAD) as usize).clamp(1, MAX_THREADS)
}

/// Runs the storm; returns how many execs were done. The spawner threads
/// share one schedule: each takes the next exec number, sleeps until it is
/// due, runs the program and waits for it.
fn storm(agent: &mut Agent, schedule: &Schedule, threads: usize, tag: &str) -> Result<u64> {
    let next = AtomicU64::new(0);
    let made = AtomicU64::new(0);
    let halt = AtomicBool::new(false);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| spawner(schedule, &next, &made, &halt)))
            .collect();
        let end = schedule.start + schedule.length;
        let mut progress_at = schedule.start + PROGRESS_EVERY;
        let mut first_err = loop {
            let now = Instant::now();
            // No exec is due after `end`: the workers are finishing their
            // last one, so join them now and the window ends with them,
            // not up to a polling step later.
            if now >= end || workers.iter().all(|w| w.is_finished()) {
                break None;
            }
            if signal::stop_requested() {
                break Some(anyhow!("interrupted"));
            }
            if let Err(err) = agent.check_alive() {
                break Some(err);
            }
            if now >= progress_at {
                let n = made.load(Ordering::Relaxed);
                let secs = (now - schedule.start).as_secs_f64();
                println!(
                    "bench: {tag}: {n} execs in {secs:.1} s ({:.0}/s)",
                    per_second(n, secs)
                );
                progress_at += PROGRESS_EVERY;
            }
            sleep((end - now).min(Duration::from_millis(100)));
        };
        if first_err.is_some() {
            halt.store(true, Ordering::Relaxed);
        }
        for w in workers {
            let result = w
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a spawner thread panicked")));
            if let Err(err) = result {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    })?;
    Ok(made.load(Ordering::Relaxed))
}

fn spawner(
    schedule: &Schedule,
    next: &AtomicU64,
    made: &AtomicU64,
    halt: &AtomicBool,
) -> Result<()> {
    let result = spawn_due(schedule, next, made, halt);
    if result.is_err() {
        // The others stop too: the round is lost anyway.
        halt.store(true, Ordering::Relaxed);
    }
    result
}

fn spawn_due(
    schedule: &Schedule,
    next: &AtomicU64,
    made: &AtomicU64,
    halt: &AtomicBool,
) -> Result<()> {
    // A plain Command, not `spawn_child`: with no pre_exec hook std spawns
    // it with posix_spawn (vfork), the cheapest way, and /bin/true exits
    // before anything could orphan it.
    let mut cmd = Command::new(PROGRAM);
    let end = schedule.start + schedule.length;
    loop {
        if halt.load(Ordering::Relaxed) || signal::stop_requested() {
            return Ok(());
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= schedule.total {
            return Ok(());
        }
        let due = schedule.start + due_after(i, schedule.rate);
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        if let Some(early) = due.checked_duration_since(now) {
            sleep(early);
        }
        let status = cmd.status().with_context(|| format!("running {PROGRAM}"))?;
        if !status.success() {
            if signal::stop_requested() {
                // Ctrl-C reached it too.
                return Ok(());
            }
            bail!("{PROGRAM} failed ({status})");
        }
        made.fetch_add(1, Ordering::Relaxed);
    }
}

fn per_second(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// CPU time of one line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

/// The `cpu` (all CPUs) and `cpuN` lines of `/proc/stat`.
fn parse_proc_stat(text: &str) -> Result<BTreeMap<String, CpuTimes>> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("cpu")) {
        let mut words = line.split_whitespace();
        let name = words.next().context("empty line")?.to_string();
        let v = words
            .map(str::parse::<u64>)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("/proc/stat: {line:?}"))?;
        // user nice system idle iowait irq softirq steal; guest and
        // guest_nice are already in user and nice.
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        out.insert(
            name,
            CpuTimes {
                busy: total.saturating_sub(idle),
                total,
            },
        );
    }
    if !out.contains_key("cpu") {
        bail!("/proc/stat has no `cpu` line");
    }
    Ok(out)
}

/// The share of `end − start` that was busy, from 0 to 1.
fn busy_share(start: CpuTimes, end: CpuTimes) -> f64 {
    let total = end.total.saturating_sub(start.total);
    if total == 0 {
        return 0.0;
    }
    end.busy.saturating_sub(start.busy) as f64 / total as f64
}

/// CPU seconds as a percentage of one CPU over `wall_s`.
fn percent_of_one_cpu(cpu_s: f64, wall_s: f64) -> f64 {
    if wall_s > 0.0 {
        100.0 * cpu_s / wall_s
    } else {
        0.0
    }
}

/// Milliseconds of CPU per 1,000 execs.
fn ms_per_1000(cpu_s: f64, execs: u64) -> Option<f64> {
    (execs > 0).then(|| cpu_s * 1e6 / execs as f64)
}

/// xtask's own CPU time and that of its children waited for (every
/// `/bin/true`; the agent only once it has been reaped), in seconds.
fn own_cpu_s() -> Result<f64> {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: rusage is plain data; all zeros is valid.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a writable rusage.
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return Err(std::io::Error::last_os_error()).context("getrusage");
        }
        for tv in [ru.ru_utime, ru.ru_stime] {
            total += tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        }
    }
    Ok(total)
}

/// CPU counters at one moment.
struct Reading {
    at: Instant,
    /// The agent's utime + stime, in seconds.
    agent_s: f64,
    cpus: BTreeMap<String, CpuTimes>,
    own_s: f64,
}

impl Reading {
    fn take(agent_pid: u32, tck: f64) -> Result<Self> {
        let path = format!("/proc/{agent_pid}/stat");
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let agent_s =
            parse_stat_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))? as f64 / tck;
        let cpus = parse_proc_stat(&fs::read_to_string("/proc/stat").context("/proc/stat")?)?;
        Ok(Self {
            at: Instant::now(),
            agent_s,
            cpus,
            own_s: own_cpu_s()?,
        })
    }

    fn since(&self, start: &Self) -> Window {
        let machine = self
            .cpus
            .iter()
            .filter_map(|(name, end)| {
                let begin = start.cpus.get(name)?;
                Some((name.clone(), busy_share(*begin, *end)))
            })
            .collect();
        Window {
            wall_s: (self.at - start.at).as_secs_f64(),
            agent_cpu_s: self.agent_s - start.agent_s,
            machine,
            generator_cpu_s: self.own_s - start.own_s,
        }
    }
}

/// What a stretch of time cost.
struct Window {
    wall_s: f64,
    agent_cpu_s: f64,
    /// Busy share (0 to 1) of all CPUs (`cpu`) and of each (`cpuN`).
    machine: BTreeMap<String, f64>,
    /// xtask and the programs it ran.
    generator_cpu_s: f64,
}

impl Window {
    fn agent_percent(&self) -> f64 {
        percent_of_one_cpu(self.agent_cpu_s, self.wall_s)
    }

    fn generator_percent(&self) -> f64 {
        percent_of_one_cpu(self.generator_cpu_s, self.wall_s)
    }

    /// Busy share of all CPUs, in percent.
    fn machine_percent(&self) -> f64 {
        100.0 * self.machine.get("cpu").copied().unwrap_or(0.0)
    }

    /// "cpu0 12%, cpu1 98%".
    fn per_cpu(&self) -> String {
        self.machine
            .iter()
            .filter(|(name, _)| *name != "cpu")
            .map(|(name, share)| format!("{name} {:.0}%", 100.0 * share))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The agent's discovery metrics at one moment, or the change between two.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counters {
    execs: f64,
    not_go: f64,
    gone: f64,
    /// Kept apart: a process that exits while the agent looks at it can
    /// land here instead of in `gone`.
    refused: f64,
    /// Skips for any other reason (unsupported, filtered, limit).
    other_skips: f64,
    lost: f64,
    judged: f64,
    rescans: f64,
    /// Go programs attached after their exec: the host's, not the storm's.
    attached: f64,
    /// A gauge: [`Counters::since`] keeps the later value.
    watched: f64,
}

impl Counters {
    fn since(&self, before: &Self) -> Self {
        Self {
            execs: self.execs - before.execs,
            not_go: self.not_go - before.not_go,
            gone: self.gone - before.gone,
            refused: self.refused - before.refused,
            other_skips: self.other_skips - before.other_skips,
            lost: self.lost - before.lost,
            judged: self.judged - before.judged,
            rescans: self.rescans - before.rescans,
            attached: self.attached - before.attached,
            watched: self.watched,
        }
    }
}

fn counters(samples: &[openmetrics::Sample]) -> Result<Counters> {
    let sum = |name: &str, keep: &dyn Fn(&openmetrics::Sample) -> bool| {
        samples
            .iter()
            .filter(|s| s.name == name && keep(s))
            .fold(0.0, |acc, s| acc + s.value)
    };
    let all = |_: &openmetrics::Sample| true;
    if !samples.iter().any(|s| s.name == EXECS) {
        bail!("the agent's /metrics has no {EXECS}: is it in node mode?");
    }
    let reason = |r: &'static str| move |s: &openmetrics::Sample| s.label("reason") == Some(r);
    Ok(Counters {
        execs: sum(EXECS, &all),
        not_go: sum(SKIPPED, &reason("not_go")),
        gone: sum(SKIPPED, &reason("gone")),
        refused: sum(SKIPPED, &reason("refused")),
        other_skips: sum(SKIPPED, &|s| {
            !matches!(s.label("reason"), Some("not_go" | "gone" | "refused"))
        }),
        lost: sum(LOST, &all),
        judged: sum(JUDGED, &all),
        rescans: sum(RESCANS, &all),
        attached: sum(ATTACHED, &all),
        watched: sum(WATCHED, &all),
    })
}

struct ReportInput<'a> {
    args: &'a ExecStormArgs,
    profile: &'a str,
    version: &'a str,
    pinning: Option<Pinning>,
    threads: usize,
    load_at_start: &'a str,
    elapsed: Duration,
    rounds: &'a [Round],
    /// The metrics right after /readyz, and after the last round.
    first: Counters,
    last: Counters,
    log: &'a Path,
    /// Lines of the agent's log refusing a process for ESRCH.
    esrch_refusals: usize,
}

/// Median, min and max of a column.
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(values: &[f64]) -> Option<Stats> {
    Some(Stats {
        median: median(values)?,
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

fn report(r: &ReportInput) -> Result<String> {
    let a = r.args;
    let mut out = String::new();
    writeln!(
        out,
        "# Exec storm: what non-Go exec churn costs the agent\n"
    )?;
    writeln!(out, "- Machine: {}", machine())?;
    writeln!(
        out,
        "- Agent: {} build ({}), node mode: `gopulse --listen ADDR`, no `--pid`, default flags \
         otherwise; its log in `{}`",
        r.profile,
        if r.version.is_empty() {
            "version unknown"
        } else {
            r.version
        },
        r.log.display()
    )?;
    writeln!(out, "- Pinning: {}", Pinning::describe(r.pinning))?;
    writeln!(out, "- Load: {}", describe_load(r.load_at_start))?;
    writeln!(
        out,
        "- Storm: `{PROGRAM}` at {}/s for {} s, from {} spawner threads; rounds: {}, each a {} \
         s idle baseline then a storm; {} in all",
        a.rate,
        a.seconds,
        r.threads,
        a.rounds,
        a.idle_seconds,
        fmt_elapsed(r.elapsed)
    )?;

    let col = |f: &dyn Fn(&Round) -> f64| r.rounds.iter().map(f).collect::<Vec<_>>();
    let rows: [(&str, Vec<f64>, usize); 6] = [
        ("execs made per second", col(&Round::rate), 0),
        (
            "agent CPU, idle (% of one CPU)",
            col(&|x| x.idle.agent_percent()),
            2,
        ),
        (
            "agent CPU, storm (% of one CPU)",
            col(&|x| x.storm.agent_percent()),
            2,
        ),
        (
            "agent CPU per 1,000 execs, storm (ms)",
            col(&|x| ms_per_1000(x.storm.agent_cpu_s, x.made).unwrap_or(f64::NAN)),
            2,
        ),
        (
            "the same, above the idle rate (ms)",
            col(&|x| ms_per_1000(x.excess_cpu_s(), x.made).unwrap_or(f64::NAN)),
            2,
        ),
        (
            "machine busy, storm (% of all CPUs)",
            col(&|x| x.storm.machine_percent()),
            0,
        ),
    ];
    writeln!(out, "\n## Result\n")?;
    writeln!(out, "| rounds: {} | median | min | max |", r.rounds.len())?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (name, values, digits) in &rows {
        if let Some(s) = stats(values) {
            writeln!(
                out,
                "| {name} | {:.p$} | {:.p$} | {:.p$} |",
                s.median,
                s.min,
                s.max,
                p = *digits
            )?;
        }
    }
    let storm_pct = stats(&rows[2].1).map_or(f64::NAN, |s| s.median);
    let rate = stats(&rows[0].1).map_or(f64::NAN, |s| s.median);
    writeln!(out)?;
    writeln!(out, "{}", verdict(storm_pct, rate, a.rate))?;

    writeln!(out, "\n## Rounds\n")?;
    writeln!(
        out,
        "| round | execs made / due | per s | agent idle % | agent storm % | ms / 1,000 execs \
         | above idle | generator % | machine busy % | per CPU |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")?;
    for (i, x) in r.rounds.iter().enumerate() {
        let ms = |s: f64| ms_per_1000(s, x.made).map_or("-".to_string(), |v| format!("{v:.2}"));
        writeln!(
            out,
            "| {} | {} / {} | {:.0} | {:.2} | {:.2} | {} | {} | {:.0} | {:.0} | {} |",
            i + 1,
            x.made,
            x.due,
            x.rate(),
            x.idle.agent_percent(),
            x.storm.agent_percent(),
            ms(x.storm.agent_cpu_s),
            ms(x.excess_cpu_s()),
            x.storm.generator_percent(),
            x.storm.machine_percent(),
            x.storm.per_cpu()
        )?;
    }

    writeln!(
        out,
        "\n## What the agent counted\n\nPer storm, from a scrape of /metrics just before it to \
         one {} s after it.\n",
        SETTLE.as_secs()
    )?;
    writeln!(
        out,
        "| round | execs made | execs handled | skipped not_go | skipped gone | skipped \
         refused | other skips | events lost | executables judged | rescans | Go programs \
         attached (idle / storm) |"
    )?;
    writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for (i, x) in r.rounds.iter().enumerate() {
        let c = &x.counted;
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} \
             / {:.0} |",
            i + 1,
            x.made,
            c.execs,
            c.not_go,
            c.gone,
            c.refused,
            c.other_skips,
            c.lost,
            c.judged,
            c.rescans,
            x.idle_counted.attached,
            c.attached
        )?;
    }
    let total = r.last.since(&r.first);
    writeln!(
        out,
        "\nFrom /readyz to the end: {:.0} execs handled, {:.0} events lost, {:.0} executables \
         judged, {:.0} rescans; {:.0} Go process(es) watched at the end ({:.0} at the start: the \
         host's own, whose events the agent handles in the idle baselines and storms alike).",
        total.execs, total.lost, total.judged, total.rescans, r.last.watched, r.first.watched
    )?;
    writeln!(out, "\nChecks:\n")?;
    for line in checks(r.rounds, r.esrch_refusals) {
        writeln!(out, "- {line}")?;
    }

    writeln!(out, "\n## How it is measured\n")?;
    writeln!(out, "{NOTES}")?;
    Ok(out)
}

/// One line on the target.
fn verdict(storm_pct: f64, rate: f64, target_rate: u32) -> String {
    let met = storm_pct <= TARGET_CPU_PERCENT;
    let mut s = format!(
        "Target (issue): ~1,000 execs/s of a small non-Go program, the agent at most \
         {TARGET_CPU_PERCENT}% of one CPU: **{}** (median {storm_pct:.2}% at {rate:.0} execs/s).",
        if met { "met" } else { "not met" }
    );
    if rate < 0.95 * f64::from(target_rate) {
        let _ = write!(
            s,
            " The generator fell short of the {target_rate}/s asked for, so the agent saw less \
             churn than the target's."
        );
    }
    s
}

/// Findings about what the agent counted: events lost, execs missed,
/// short-lived processes skipped as `refused`, more executables judged
/// than one. `esrch_refusals`: lines of the agent's log refusing a process
/// for ESRCH.
fn checks(rounds: &[Round], esrch_refusals: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (i, x) in rounds.iter().enumerate() {
        let n = i + 1;
        let c = &x.counted;
        if c.lost > 0.0 {
            out.push(format!(
                "round {n}: **{:.0} exec/exit events lost** (ring buffer full); the agent \
                 rescanned /proc {:.0} times",
                c.lost, c.rescans
            ));
        }
        if c.execs < x.made as f64 {
            out.push(format!(
                "round {n}: **the agent handled {:.0} execs, fewer than the {} made** ({:.0} \
                 events reported lost)",
                c.execs, x.made, c.lost
            ));
        }
        if c.not_go + c.gone + c.refused < x.made as f64 && c.lost == 0.0 {
            out.push(format!(
                "round {n}: skipped not_go + gone + refused is {:.0}, fewer than the {} execs of \
                 {PROGRAM}",
                c.not_go + c.gone + c.refused,
                x.made
            ));
        }
        if c.refused > 0.0 {
            out.push(format!(
                "round {n}: {:.0} process(es) skipped as `refused` during the storm",
                c.refused
            ));
        }
        if c.judged > JUDGED_EXPECTED_MAX.max(JUDGED_SHARE_MAX * x.made as f64) {
            out.push(format!(
                "round {n}: **{:.0} executables judged** during the storm (one expected: \
                 {PROGRAM}'s verdict should be cached)",
                c.judged
            ));
        }
    }
    if esrch_refusals > 0 {
        out.push(format!(
            "the agent's log refuses {esrch_refusals} process(es) with `No such process (os \
             error 3)`: a process that exits while the agent reads its /proc entry (ESRCH) is \
             counted as `refused`, not `gone`"
        ));
    }
    if out.is_empty() {
        out.push(format!(
            "every round: no events lost; the agent handled at least as many execs as were \
             made (it also sees the host's other execs); executables judged per storm at most \
             {JUDGED_EXPECTED_MAX:.0} or {:.0}% of its execs (the cache holds)",
            100.0 * JUDGED_SHARE_MAX
        ));
    }
    out
}

const NOTES: &str = "\
The agent runs in node mode for the whole benchmark; each round first leaves it alone for the \
idle baseline, then starts /bin/true (a small dynamically linked C program) at a fixed pace: \
exec number i is due i/rate seconds into the storm, several spawner threads take the next \
number in turn, sleep until it is due, spawn the program (posix_spawn) and wait for it, and none \
starts after the storm's length, so a generator that falls behind shows as a lower rate, not a \
longer storm. Agent CPU is utime + stime of /proc/PID/stat (all its threads, in clock ticks of \
sysconf(_SC_CLK_TCK)) read at the start and end of each window, as a percentage of one CPU over \
the window's wall time; per 1,000 execs it is the storm's CPU over the execs made, and above \
idle the storm's CPU less the idle baseline's rate over the same time. The BPF program on \
sched_process_exec runs in the exec'ing process, so its kernel time is charged to the generator, \
not to the agent; what the agent pays is waking up for the ring buffer, reading each event and \
judging the pid (its executable's verdict is cached by device, inode, mtime and size, so \
/bin/true is read once; a /bin/true that has already exited when the agent looks is counted as \
skipped `gone` instead of `not_go`). Generator CPU is xtask's own time plus its waited-for \
children's (getrusage); machine busy is from /proc/stat over the storm, all CPUs and each, and \
includes whatever else runs on the machine. The agent's metrics are scraped just before each \
storm and 2 s after it (it folds the ring's lost-event count in every second); its exec count \
includes every other exec on the host in that time.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_ticks_count_fields_after_the_last_paren() {
        // Real layout: pid (comm) state ppid pgrp session tty tpgid flags
        // minflt cminflt majflt cmajflt utime stime cutime cstime ...
        let plain = "1234 (gopulse) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 3 4 20 0 9 0";
        assert_eq!(parse_stat_cpu_ticks(plain).unwrap(), 325);
        let odd = "77 (a b) (c) )x) R 1 77 77 0 -1 0 0 0 0 0 11 22 0 0 20 0 1 0\n";
        assert_eq!(parse_stat_cpu_ticks(odd).unwrap(), 33);
        assert!(parse_stat_cpu_ticks("1 (x) S 1 2").is_err());
        assert!(parse_stat_cpu_ticks("no parens at all").is_err());
        assert!(parse_stat_cpu_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 u 2 0 0").is_err());
    }

    #[test]
    fn proc_stat_busy_and_total() {
        let text = "cpu  100 5 50 800 20 3 2 10 7 0\n\
                    cpu0 60 5 30 380 10 2 1 5 7 0\n\
                    cpu1 40 0 20 420 10 1 1 5 0 0\n\
                    intr 12345 0\nctxt 999\n";
        let m = parse_proc_stat(text).unwrap();
        // total: user..steal (guest is inside user); idle: idle + iowait.
        assert_eq!(
            m["cpu"],
            CpuTimes {
                busy: 170,
                total: 990
            }
        );
        assert_eq!(m["cpu0"].total, 493);
        assert_eq!(m.len(), 3);
        assert!(parse_proc_stat("intr 1\n").is_err());
        assert!(parse_proc_stat("cpu 1 x 3\n").is_err());
    }

    #[test]
    fn busy_share_of_a_window() {
        let a = CpuTimes {
            busy: 100,
            total: 1000,
        };
        let b = CpuTimes {
            busy: 150,
            total: 1200,
        };
        assert_eq!(busy_share(a, b), 0.25);
        assert_eq!(busy_share(a, a), 0.0);
    }

    #[test]
    fn percent_arithmetic() {
        // 1.5 s of CPU over 30 s: 5% of one CPU.
        assert!((percent_of_one_cpu(1.5, 30.0) - 5.0).abs() < 1e-12);
        assert_eq!(percent_of_one_cpu(1.0, 0.0), 0.0);
        // 0.3 s over 30,000 execs: 10 ms per 1,000.
        assert!((ms_per_1000(0.3, 30_000).unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(ms_per_1000(1.0, 0), None);
        assert_eq!(per_second(3000, 3.0), 1000.0);
        assert_eq!(per_second(5, 0.0), 0.0);
    }

    #[test]
    fn excess_over_idle() {
        let window = |agent_cpu_s, wall_s| Window {
            wall_s,
            agent_cpu_s,
            machine: BTreeMap::new(),
            generator_cpu_s: 0.0,
        };
        let round = Round {
            // 1% idle.
            idle: window(0.1, 10.0),
            // 3% during a 30 s storm: 0.6 s above the idle rate.
            storm: window(0.9, 30.0),
            due: 30_000,
            made: 30_000,
            idle_counted: Counters::default(),
            counted: Counters::default(),
        };
        assert!((round.excess_cpu_s() - 0.6).abs() < 1e-9);
        assert!((round.rate() - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn pacing_schedule() {
        assert_eq!(due_after(0, 1000), Duration::ZERO);
        assert_eq!(due_after(1, 1000), Duration::from_millis(1));
        assert_eq!(due_after(1000, 1000), Duration::from_secs(1));
        assert_eq!(due_after(29_999, 1000), Duration::from_millis(29_999));
        assert_eq!(due_after(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(due_after(3, 3), Duration::from_secs(1));
        // No overflow at the largest storm the flags allow.
        assert_eq!(
            due_after(100_000 * 3600, 100_000),
            Duration::from_secs(3600)
        );
        // Evenly spaced: never earlier than the one before.
        let times: Vec<_> = (0..1000).map(|i| due_after(i, 7)).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn spawner_thread_counts() {
        assert_eq!(spawner_threads(1), 1);
        assert_eq!(spawner_threads(250), 1);
        assert_eq!(spawner_threads(251), 2);
        assert_eq!(spawner_threads(1000), 4);
        assert_eq!(spawner_threads(100_000), MAX_THREADS);
    }

    #[test]
    fn counters_from_metrics() {
        let text = "\
gopulse_discovery_execs_total 1200
gopulse_discovery_skipped_total{reason=\"not_go\"} 300
gopulse_discovery_skipped_total{reason=\"gone\"} 800
gopulse_discovery_skipped_total{reason=\"limit\"} 2
gopulse_discovery_skipped_total{reason=\"refused\"} 1
gopulse_discovery_events_lost_total 0
gopulse_discovery_executables_judged_total 40
gopulse_discovery_rescans_total 3
gopulse_discovery_attach_delay_seconds_bucket{le=\"0.2\"} 4
gopulse_discovery_attach_delay_seconds_count 5
gopulse_processes_watched 2
";
        let c = counters(&openmetrics::parse(text).unwrap()).unwrap();
        assert_eq!(
            c,
            Counters {
                execs: 1200.0,
                not_go: 300.0,
                gone: 800.0,
                refused: 1.0,
                other_skips: 2.0,
                lost: 0.0,
                judged: 40.0,
                rescans: 3.0,
                attached: 5.0,
                watched: 2.0,
            }
        );
        let d = c.since(&Counters {
            execs: 200.0,
            watched: 9.0,
            ..Counters::default()
        });
        assert_eq!((d.execs, d.watched), (1000.0, 2.0));
        assert!(counters(&openmetrics::parse("up 1\n").unwrap()).is_err());
    }

    #[test]
    fn checks_flag_losses_misses_and_judging() {
        let window = || Window {
            wall_s: 30.0,
            agent_cpu_s: 0.3,
            machine: BTreeMap::new(),
            generator_cpu_s: 0.0,
        };
        let round = |made, counted| Round {
            idle: window(),
            storm: window(),
            due: made,
            made,
            idle_counted: Counters::default(),
            counted,
        };
        let fine = Counters {
            execs: 120.0,
            not_go: 40.0,
            gone: 60.0,
            judged: 1.0,
            ..Counters::default()
        };
        let found = checks(&[round(100, fine)], 0);
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("every round"));
        let lossy = Counters {
            execs: 90.0,
            lost: 10.0,
            ..Counters::default()
        };
        let found = checks(&[round(100, lossy)], 0);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("10 exec/exit events lost"));
        // 25 judged: too many for 100 execs, a build's worth beside 30,000.
        let judging = |made: u64| Counters {
            execs: made as f64,
            not_go: made as f64,
            judged: 25.0,
            ..Counters::default()
        };
        let found = checks(&[round(100, judging(100))], 0);
        assert!(found[0].contains("25 executables judged"), "{found:?}");
        assert!(checks(&[round(30_000, judging(30_000))], 0)[0].starts_with("every round"));
        // A /bin/true refused (ESRCH) instead of gone: counted, and flagged.
        let refused = Counters {
            execs: 100.0,
            gone: 99.0,
            refused: 1.0,
            ..Counters::default()
        };
        let found = checks(&[round(100, refused)], 1);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("1 process(es) skipped as `refused`"));
        assert!(found[1].contains("No such process"));
    }

    #[test]
    fn verdict_mentions_a_short_rate() {
        assert!(verdict(1.0, 1000.0, 1000).contains("**met**"));
        assert!(verdict(6.0, 1000.0, 1000).contains("**not met**"));
        assert!(verdict(1.0, 700.0, 1000).contains("fell short"));
        assert!(!verdict(1.0, 990.0, 1000).contains("fell short"));
    }
}
