//! `cargo xtask bench overhead`: what the agent costs the program it watches.
//!
//! `bench/overhead` (a map-heavy Go program in timed phases) runs once per
//! configuration per round, each run a fresh process: without the agent
//! (`none`), with the agent's default flags (`default`) and, once the agent
//! has `--map-assign-probes`, with `off` and `always`. Runs with and without
//! the agent alternate, and the order of the configurations rotates from
//! round to round so slow drift (thermal, a neighbour's load) spreads over
//! all of them. The workload runs on one CPU, the agent on the other. Per
//! phase the report gives the median ns/op of each configuration, the
//! throughput ratio against `none` with the range and standard deviation of
//! the per-round ratios, the probe hits the agent saw during the phase and
//! what each hit cost.
use std::{
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::{
    Agent, Config, Pinning, Prepared, RunSpec, build_workload, cpu_seconds, describe_load,
    describe_pinning, fmt_ns, machine, median, prepare, rotated, run_workload, spread, sum_for_pid,
};
use crate::{
    project::{GO_VERSIONS, fmt_elapsed},
    signal,
};

const GROWTHS: &str = "gopulse_map_growths_total";
const EVENTS_LOST: &str = "gopulse_events_lost_total";
/// Every probe hit, by probe, on agents that have it.
const PROBE_HITS: &str = "gopulse_probe_hits_total";
/// CPU time the agent accounts its probes, per process.
const PROBE_OVERHEAD: &str = "gopulse_probe_overhead_seconds_total";
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
    /// Only these phases, comma-separated (small, int-8, ..., grow-heavy,
    /// append-heavy, storm).
    #[arg(long, value_name = "LIST")]
    phases: Option<String>,
    /// Only these configurations besides `none`, comma-separated (default,
    /// off, always): `always` probes every insert and takes most of a run.
    #[arg(long, value_name = "LIST")]
    configs: Option<String>,
}

/// `none` and the configurations `list` names (all when `None`).
fn select(all: Vec<Config>, list: Option<&str>) -> Result<Vec<Config>> {
    let Some(list) = list else {
        return Ok(all);
    };
    let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
    for w in &wanted {
        if !all.iter().any(|c| c.name == *w) {
            let known: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
            bail!(
                "--configs: no configuration {w:?}; this agent has {}",
                known.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|c| c.name == "none" || wanted.contains(&c.name.as_str()))
        .collect())
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
    /// CPU seconds the probes cost during the phase, as the agent accounts
    /// them (`gopulse_probe_overhead_seconds_total`: each hit at its trap,
    /// timed at start-up, plus its program's run time from the kernel's
    /// statistics); `None` without the agent.
    probe_s: Option<f64>,
    /// The agent's own CPU (utime + stime) over the phase and the settle
    /// after it, and that wall time, in seconds; `None` without the agent.
    agent_cpu: Option<(f64, f64)>,
}

#[derive(Debug)]
struct RunResult {
    config: String,
    phases: Vec<Phase>,
    phase_ns: f64,
    go_version: String,
    gomaxprocs: u64,
}

pub fn overhead(cache: &Path, args: &OverheadArgs) -> Result<()> {
    if !GO_VERSIONS.contains(&args.go.as_str()) {
        bail!(
            "--go {}: not a release setup installs; pick one of {}",
            args.go,
            GO_VERSIONS.join(" ")
        );
    }
    let Prepared {
        agent_bin,
        agent_help,
        out_dir,
        started,
        load_at_start,
    } = prepare(cache, "overhead", args.release, args.scale)?;
    let profile = if args.release { "release" } else { "debug" };
    let configs = select(configs(&agent_help), args.configs.as_deref())?;
    let go_bin = build_workload(cache, "overhead", &args.go, &out_dir)?;
    let pinning = Pinning::choose()?;
    if let Some(p) = pinning {
        p.pin_harness()?;
    }

    signal::install();
    let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
    println!(
        "bench: Go {}, {} rounds of {} (rotating), {profile} agent; {}",
        args.go,
        args.rounds,
        names.join(", "),
        describe_pinning(pinning)
    );
    let raw_path = out_dir.join(format!("overhead-go{}-runs.txt", args.go));
    let mut raw =
        File::create(&raw_path).with_context(|| format!("creating {}", raw_path.display()))?;
    let mut workload_args = vec![format!("-scale={}", args.scale)];
    if let Some(phases) = &args.phases {
        workload_args.push(format!("-phases={phases}"));
    }
    let mut runs = Vec::new();
    for round in 0..args.rounds as usize {
        for config in rotated(&configs, round) {
            if signal::stop_requested() {
                bail!("interrupted");
            }
            let t = Instant::now();
            let spec = RunSpec {
                workload: &go_bin,
                args: workload_args.clone(),
                agent_bin: &agent_bin,
                config,
                out_dir: &out_dir,
                tag: format!("r{}-{}", round + 1, config.name),
                pinning,
            };
            let result = run_once(&spec)
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
    let (go_version, gomaxprocs) = runs
        .first()
        .map_or_else(Default::default, |r| (r.go_version.clone(), r.gomaxprocs));
    let report = report(&configs, &runs)?;
    let elapsed = started.elapsed();
    let header = format!(
        "{}\nGo {go_version}, {} rounds, {profile} agent, {} run in total\n\
         Pinning: {}; the workload ran with GOMAXPROCS {gomaxprocs}\n{}\n",
        machine(),
        args.rounds,
        fmt_elapsed(elapsed),
        describe_pinning(pinning),
        describe_load(&load_at_start),
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

fn brief(r: &RunResult) -> String {
    let hits: Option<u64> = r.phases.iter().map(|p| p.hits).sum();
    let lost: Option<u64> = r.phases.iter().map(|p| p.lost).sum();
    match (hits, lost) {
        (Some(h), Some(l)) => format!(", {h} probe hits, {l} events lost"),
        _ => String::new(),
    }
}

/// One fresh workload process, with the agent attached if the config says
/// so; the probe hits and lost events of each phase from the agent's
/// counters.
fn run_once(spec: &RunSpec) -> Result<RunResult> {
    let run = run_workload(spec, hits)?;
    let mut phases = Vec::new();
    for p in &run.report.phases {
        let (hits, lost, probe_s, agent_cpu) = if spec.config.agent.is_some() {
            let at = |i: usize| run.snapshots.get(i).map(|(_, s)| *s);
            let i = run
                .snapshots
                .iter()
                .position(|(name, _)| *name == p.name)
                .with_context(|| format!("no metrics scraped after phase {}", p.name))?;
            let now = at(i).unwrap_or_default();
            let before = i.checked_sub(1).and_then(at).unwrap_or_default();
            (
                Some(now.hits.saturating_sub(before.hits)),
                Some(now.lost.saturating_sub(before.lost)),
                Some((now.probe_s - before.probe_s).max(0.0)),
                Some((
                    (now.agent_s - before.agent_s).max(0.0),
                    now.at_s - before.at_s,
                )),
            )
        } else {
            (None, None, None, None)
        };
        phases.push(Phase {
            name: p.name.clone(),
            ops: p.ops,
            ns_per_op: p.ns_per_op,
            gcs: p.gcs,
            hits,
            lost,
            probe_s,
            agent_cpu,
        });
    }
    Ok(RunResult {
        config: spec.config.name.clone(),
        phases,
        phase_ns: run.report.phase_ns,
        go_version: run.report.go_version,
        gomaxprocs: run.report.gomaxprocs,
    })
}

/// What the agent has counted for a process so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counted {
    hits: u64,
    lost: u64,
    probe_s: f64,
    /// The agent's utime + stime so far, in seconds.
    agent_s: f64,
    /// When: seconds since the first reading of the run.
    at_s: f64,
}

/// The probe hits, lost events and probe CPU the agent has counted for
/// `pid` so far, and the agent's own CPU.
fn hits(agent: &Agent, pid: u32) -> Result<Counted> {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let at_s = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    let agent_s = cpu_seconds(agent.pid())?;
    let samples = agent.metrics()?;
    let lost = sum_for_pid(&samples, EVENTS_LOST, pid);
    // An agent that counts every probe hit (GC, growth, assignment) says
    // so; an older one counts growths, and a lost event was a hit.
    let hits = if samples.iter().any(|s| s.name == PROBE_HITS) {
        sum_for_pid(&samples, PROBE_HITS, pid)
    } else {
        sum_for_pid(&samples, GROWTHS, pid) + lost
    };
    // Counters of whole events: exact in an f64 far past any run's count.
    Ok(Counted {
        hits: hits as u64,
        lost: lost as u64,
        probe_s: sum_for_pid(&samples, PROBE_OVERHEAD, pid),
        agent_s,
        at_s,
    })
}

/// The median over runs of the agent's CPU, as a percentage of one CPU,
/// from each run's (CPU seconds, wall seconds); `-` without the agent.
fn agent_cpu_percent(runs: impl Iterator<Item = Option<(f64, f64)>>) -> String {
    let fractions: Vec<f64> = runs
        .flatten()
        .filter(|&(_, wall)| wall > 0.0)
        .map(|(cpu, wall)| cpu / wall)
        .collect();
    median(&fractions).map_or_else(|| "-".to_string(), |f| format!("{:.2}%", f * 100.0))
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
/// its median ns/op, the throughput ratio of the medians (with the range
/// and standard deviation of the per-round ratios), the median probe hits
/// and the cost per hit.
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
            " {n} ns/op | {n} throughput ratio (per-round range, sd) | {n} probe hits | \
             {n} cost per hit | {n} probe CPU, accounted (% of the phase) | \
             {n} agent's own CPU (% of a CPU) |"
        );
        rule.push_str("--:|--:|--:|--:|--:|--:|");
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
            // baseline.
            let per_round: Vec<f64> = base_ns
                .iter()
                .zip(&ns)
                .map(|(&b, &x)| throughput_ratio(b, x))
                .collect();
            let s = spread(&per_round).context("no rounds")?;
            // Unless every round was slower with the agent, the difference
            // is not told apart from run-to-run noise.
            let mark = if s.max < 1.0 { "" } else { " †" };
            let cost = cost_per_hit(base_med, med, p.ops, hits_med).map_or_else(
                || "-".to_string(),
                |ns| format!("{:.2} µs{mark}", ns / 1000.0),
            );
            // What the probes cost as the agent accounts them, against the
            // phase's time without the agent: resolves what the throughput
            // ratio cannot on a noisy machine.
            let probe_s: Vec<f64> = phases.iter().filter_map(|q| q.probe_s).collect();
            let phase_s = base_med * p.ops as f64 / 1e9;
            let pct: Vec<f64> = probe_s.iter().map(|s| 100.0 * s / phase_s).collect();
            let accounted = median(&probe_s).map_or_else(
                || "-".to_string(),
                |secs| {
                    // With its spread over the rounds: sampled probes (the
                    // slice probe's windows) land in some rounds' phases
                    // and not others'.
                    let range = spread(&pct)
                        .map_or_else(String::new, |s| format!(", {:.2}–{:.2}%", s.min, s.max));
                    format!(
                        "{:.1} ms ({:.2}%{range})",
                        secs * 1e3,
                        100.0 * secs / phase_s
                    )
                },
            );
            let agent_cpu = agent_cpu_percent(phases.iter().map(|q| q.agent_cpu));
            let _ = write!(
                out,
                " {} | {:.3} ({:.2}–{:.2}, sd {:.3}) | {hits_med} | {cost} | {accounted} | \
                 {agent_cpu} |",
                fmt_ns(med),
                throughput_ratio(base_med, med),
                s.min,
                s.max,
                s.sd,
            );
        }
        out.push('\n');
    }
    // Whole run: the sum of the phases' times.
    let total = |name: &str| -> Vec<f64> { of(name).iter().map(|r| r.phase_ns / 1e9).collect() };
    let base_totals = total(&base.name);
    let base_total = median(&base_totals).unwrap_or(f64::NAN);
    let _ = write!(out, "| all phases (s) | | | {base_total:.3} s |");
    for c in others {
        let totals = total(&c.name);
        let t = median(&totals).unwrap_or(f64::NAN);
        let per_round: Vec<f64> = base_totals
            .iter()
            .zip(&totals)
            .map(|(&b, &x)| throughput_ratio(b, x))
            .collect();
        let range = spread(&per_round).map_or_else(String::new, |s| {
            format!(" ({:.2}–{:.2}, sd {:.3})", s.min, s.max, s.sd)
        });
        let hits: Vec<f64> = of(&c.name)
            .iter()
            .map(|r| r.phases.iter().filter_map(|p| p.hits).sum::<u64>() as f64)
            .collect();
        let probe_s: Vec<f64> = of(&c.name)
            .iter()
            .map(|r| r.phases.iter().filter_map(|p| p.probe_s).sum::<f64>())
            .collect();
        let accounted = median(&probe_s).map_or_else(String::new, |secs| {
            format!(
                "{:.1} ms ({:.2}%)",
                secs * 1e3,
                100.0 * secs / base_total.max(f64::MIN_POSITIVE)
            )
        });
        let agent_cpu = agent_cpu_percent(of(&c.name).iter().map(|r| {
            r.phases.iter().try_fold((0.0, 0.0), |(cpu, wall), p| {
                p.agent_cpu.map(|(c, w)| (cpu + c, wall + w))
            })
        }));
        let _ = write!(
            out,
            " {t:.3} s | {:.3}{range} | {} | | {accounted} | {agent_cpu} |",
            throughput_ratio(base_total, t),
            median(&hits).unwrap_or_default()
        );
    }
    out.push('\n');
    out.push_str(
        "\nThroughput ratio: none ns/op over the config's (medians; 1 = no change); in \
         brackets the range of the per-round ratios (round i of the config against round i \
         of none) and their sample standard deviation (sd). Cost per hit: (config - none) \
         ns/op × ops / hits. †: not every round was slower with the agent, so the difference \
         is not told apart from run-to-run noise. Probe CPU, accounted: the rise of \
         gopulse_probe_overhead_seconds_total over the phase (each hit at its trap, timed by \
         the agent, plus its program's run time from the kernel's statistics; median of the \
         rounds), and that against the phase's time without the agent, with its range over \
         the rounds. Agent's own CPU: \
         the agent process's utime + stime (/proc/PID/stat, every thread) from the scrape \
         before the phase to the scrape after it (the phase and the settle after it), over \
         that wall time; median of the rounds.\n",
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn configs_can_be_picked() {
        let all = configs("  --map-assign-probes <MODE>  off, sampled or always\n");
        let names = |c: Vec<Config>| c.into_iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(
            names(select(all.clone(), Some("default, off")).unwrap()),
            ["none", "default", "off"]
        );
        assert_eq!(names(select(all.clone(), None).unwrap()).len(), 4);
        assert!(select(all, Some("sometimes")).is_err());
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
                probe_s: hits.map(|h| h as f64 * 100e-9),
                // 20 ms of the agent's CPU over a 2 s phase: 1%.
                agent_cpu: hits.map(|_| (0.02, 2.0)),
            }],
            phase_ns: ns * 1000.0,
            go_version: "go1.27.3".into(),
            gomaxprocs: 1,
        };
        let runs = [
            run("none", 100.0, None),
            run("default", 125.0, Some(50)),
            run("default", 130.0, Some(50)),
            run("none", 110.0, None),
        ];
        let table = report(&configs(""), &runs).unwrap();
        // Medians 105 and 127.5: ratio 0.824, (22.5 ns × 1000) / 50 = 0.45
        // µs; per-round ratios 0.8 and 0.846, sd 0.0325.
        // 50 hits at 100 ns: 5 µs of a 105 µs phase.
        assert!(
            table.contains(
                "| small | 1000 | 2 | 105 | 128 | 0.824 (0.80–0.85, sd 0.033) | 50 | 0.45 µs | \
                 0.0 ms (4.76%, 4.76–4.76%) | 1.00% |"
            ),
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
        assert!(
            table.contains("| 50 | 0.00 µs † | 0.0 ms (4.76%, 4.76–4.76%) | 1.00% |"),
            "{table}"
        );
    }
}
