//! `cargo xtask bench probes`: what one hit of each of the agent's BPF
//! programs costs on this machine.
//!
//! `bench/probes` has one timed phase per program family, each calling the
//! probed runtime function over and over (`stw`: ReadMemStats, one stop and
//! start of the world each; `gc`: runtime.GC(); `grow_to_table`: maps of 9
//! entries; ...). It runs on a classic-map build (Go 1.23.9), a swiss build
//! (Go 1.27.3) and, for `stw_stop`, Go 1.21.13, in two sets: `growth` (GC,
//! stop-the-world and growth programs; the agent with
//! `--map-assign-probes=off`) and `access` (assignment, deletion,
//! evacuation; `--map-assign-probes=always`), each without the agent and
//! with it, alternating, the order rotating from round to round, every run
//! a fresh process, the workload pinned to one CPU and the agent to the
//! other.
//!
//! Each phase is timed in 10 parts, and the fastest part's ns/op is what
//! counts: much of this VM's noise comes in bursts (the host, other
//! tenants) that slow a part by tens of percent. (Not all: in
//! allocation-heavy phases one process can run every part much slower than
//! the next, which only more rounds even out.) Per phase the agent's
//! `gopulse_probe_hits_total` (scraped after each phase) says how many hits
//! each program had, the kernel's BPF statistics (`bpftool -j prog show`,
//! for the agent's programs) what each run of a program took, and the time
//! the phase gained with the agent what the hits cost all told: trap,
//! program, and whatever else a hit sets off on the workload's CPU. A
//! phase's hits are mostly of the programs it is there for; the few others
//! (a phase's own GCs, the assignments of the evacuation phase) are costed
//! from their own phases: each round solves `extra time of phase p = Σ hits
//! of program q in p × cost of q` for the phases' programs at once.
//! Programs that always fire together (a stop of the world hits
//! `stw_start_entry` and `stw_start_ret` once each, and `stw_stop` on Go
//! 1.21) are costed together, per stop.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::{
    Agent, Config, Pinning, Prepared, RunSpec, build_workload, describe_load, describe_pinning,
    fmt_ns, json, machine, median, prepare, rotated, run_workload, spread, sum_for_pid,
};
use crate::{project::fmt_elapsed, signal};

const PROBE_HITS: &str = "gopulse_probe_hits_total";
const HIT_COST: &str = "gopulse_probe_hit_cost_seconds";
const GROWTH_ATTACHED: &str = "gopulse_map_growth_probes_attached";
/// bpftool shows this many characters of a program's name at most.
const BPF_NAME_LEN: usize = 15;
/// A program that runs longer than this costs about as much as the trap
/// that runs it (0.8 µs for an emulated JBE here): worth a look.
const SLOW_PROGRAM_NS: f64 = 800.0;
/// The whole cost of a hit is flagged when it is this far from the agent's
/// own estimate (trap + program), either way.
const ESTIMATE_TOLERANCE: f64 = 0.5;

/// The per-phase table leaves out programs hit less often than this per
/// operation (the stops of the world of a phase's own few GCs), unless the
/// phase is there for them.
const MINOR_HITS_PER_OP: f64 = 1e-3;

/// One build of the workload, and what of it runs.
struct Build {
    /// Names it in the report's tables.
    label: &'static str,
    /// Heads its section of the report.
    title: &'static str,
    go: &'static str,
    /// The phase sets it runs.
    sets: &'static [&'static str],
    /// Only these phases (`-phases`), if not all.
    phases: Option<&'static str>,
}

/// Classic maps (Go 1.23.9), swiss tables (1.27.3), and, for `stw_stop`,
/// which the agent attaches to Go 1.21 only (later releases pass the stop
/// to startTheWorldWithSema), Go 1.21.13's stops of the world and GC.
const BUILDS: &[Build] = &[
    Build {
        label: "classic",
        title: "Classic maps, Go 1.23.9",
        go: "1.23.9",
        sets: &["growth", "access"],
        phases: None,
    },
    Build {
        label: "swiss",
        title: "Swiss tables, Go 1.27.3",
        go: "1.27.3",
        sets: &["growth", "access"],
        phases: None,
    },
    Build {
        label: "go1.21",
        title: "Go 1.21.13: stops of the world and GC only",
        go: "1.21.13",
        sets: &["growth"],
        phases: Some("stw,gc"),
    },
];

#[derive(clap::Args)]
pub struct ProbesArgs {
    /// Rounds; each runs every configuration of each build once, in
    /// rotated order.
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Build and run the agent with the release profile.
    #[arg(long)]
    release: bool,
    /// Multiply the workload's operation counts (a quick check: 0.05).
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    scale: f64,
}

/// The workload's phase sets (`-set`), and how the assignment probes run
/// for each.
const SETS: [(&str, &str); 2] = [("growth", "off"), ("access", "always")];

/// A configuration and the phase set (`-set`) it runs.
struct ProbeConfig {
    config: Config,
    set: &'static str,
}

/// Agent flags that keep every probe attached however much it costs:
/// assignment probes as `mode` says, a budget no phase can spend (the
/// governor would otherwise cut the growth probes in the middle of a
/// growth phase), and the kernel's run-time statistics on throughout (by
/// default the agent keeps them on one second in thirty).
fn agent_flags(help: &str, mode: &str) -> Vec<String> {
    let mut flags = vec![format!("--map-assign-probes={mode}")];
    if help.contains("--overhead-budget") {
        flags.push("--overhead-budget=1".to_string());
    }
    if help.contains("--overhead-window") {
        flags.push("--overhead-window=3600".to_string());
    }
    if help.contains("--bpf-stats") {
        flags.push("--bpf-stats=always".to_string());
    }
    flags
}

/// `none` and the agent for each set, alternating.
fn configs(help: &str) -> Vec<ProbeConfig> {
    let mut out = Vec::new();
    for (set, mode) in SETS {
        out.push(ProbeConfig {
            config: Config {
                name: format!("none-{set}"),
                agent: None,
            },
            set,
        });
        out.push(ProbeConfig {
            config: Config {
                name: mode.to_string(),
                agent: Some(agent_flags(help, mode)),
            },
            set,
        });
    }
    out
}

/// What the agent and the kernel had counted at one point of a run.
#[derive(Clone, Debug, Default, PartialEq)]
struct Snapshot {
    /// `gopulse_probe_hits_total` of the workload, by program.
    hits: BTreeMap<String, f64>,
    /// `gopulse_probe_hit_cost_seconds`, by program.
    hit_cost_s: BTreeMap<String, f64>,
    /// `gopulse_map_growth_probes_attached` of the workload.
    growth_attached: Option<f64>,
    /// The kernel's statistics of the agent's programs, by the (truncated)
    /// name bpftool shows: (run time ns, runs).
    kernel: BTreeMap<String, (f64, f64)>,
}

fn snapshot(agent: &Agent, pid: u32) -> Result<Snapshot> {
    let samples = agent.metrics()?;
    let pid_label = pid.to_string();
    let mut snap = Snapshot {
        kernel: kernel_stats(agent.pid())?,
        ..Snapshot::default()
    };
    for s in &samples {
        let ours = s.label("pid").is_none_or(|p| p == pid_label);
        let Some(probe) = s.label("probe") else {
            continue;
        };
        if s.name == PROBE_HITS && ours {
            *snap.hits.entry(probe.to_string()).or_default() += s.value;
        } else if s.name == HIT_COST && ours {
            snap.hit_cost_s.insert(probe.to_string(), s.value);
        }
    }
    if samples.iter().any(|s| s.name == GROWTH_ATTACHED) {
        snap.growth_attached = Some(sum_for_pid(&samples, GROWTH_ATTACHED, pid));
    }
    Ok(snap)
}

/// The ids of the BPF programs process `pid` holds (`prog_id:` in its
/// fdinfo).
fn prog_ids(pid: u32) -> Result<BTreeSet<u64>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        // An fd closed meanwhile is no program of interest.
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u64>().ok()),
        );
    }
    Ok(ids)
}

/// Run time and runs of each of the agent's programs, from the kernel's
/// statistics (which the agent turns on while it runs).
fn kernel_stats(agent_pid: u32) -> Result<BTreeMap<String, (f64, f64)>> {
    let ids = prog_ids(agent_pid)?;
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool (`cargo xtask setup` installs Debian's bpftool)")?;
    if !out.status.success() {
        bail!(
            "bpftool -j prog show failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_bpftool(&String::from_utf8_lossy(&out.stdout), &ids)
}

fn parse_bpftool(text: &str, ids: &BTreeSet<u64>) -> Result<BTreeMap<String, (f64, f64)>> {
    let v = json::parse(text).context("bpftool's JSON")?;
    let mut stats = BTreeMap::new();
    for p in v.as_array().context("bpftool: not a list of programs")? {
        let num = |key| p.get(key).and_then(json::Value::as_f64);
        let Some(id) = num("id") else { continue };
        if !ids.contains(&(id as u64)) {
            continue;
        }
        let name = p.get("name").and_then(json::Value::as_str).unwrap_or("?");
        let e: &mut (f64, f64) = stats.entry(name.to_string()).or_default();
        // bpftool leaves both out while the statistics are off.
        e.0 += num("run_time_ns").unwrap_or(0.0);
        e.1 += num("run_cnt").unwrap_or(0.0);
    }
    Ok(stats)
}

/// A program's kernel statistics: bpftool shows the whole name where the
/// kernel has the program's BTF, else the first 15 characters.
fn kernel_of(kernel: &BTreeMap<String, (f64, f64)>, program: &str) -> Option<(f64, f64)> {
    kernel
        .get(program)
        .or_else(|| kernel.get(program.get(..BPF_NAME_LEN).unwrap_or(program)))
        .copied()
}

/// The trap timing the agent logs at start-up: (JBE µs, RET µs).
fn trap_timing(log: &Path) -> Option<(f64, f64)> {
    const KEY: &str = "uprobe traps:";
    let text = fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains(KEY))?;
    let rest = &line[line.find(KEY)? + KEY.len()..];
    let words: Vec<&str> = rest.split_whitespace().collect();
    let nums: Vec<f64> = words
        .windows(2)
        .filter(|w| w[1] == "µs")
        .filter_map(|w| w[0].parse().ok())
        .collect();
    match nums[..] {
        [jbe, ret, ..] => Some((jbe, ret)),
        _ => None,
    }
}

/// One phase of one round: its time without and with the agent, and what
/// the agent and the kernel saw during it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Obs {
    phase: String,
    ops: u64,
    /// The programs the phase is there for (that the agent attached).
    targets: Vec<String>,
    /// Those the phase is there for that never hit: not attached to this
    /// build.
    unattached: Vec<String>,
    none_ns: f64,
    agent_ns: f64,
    hits: BTreeMap<String, f64>,
    kernel: BTreeMap<String, (f64, f64)>,
    /// The agent's cost per hit after the phase, s.
    hit_cost_s: BTreeMap<String, f64>,
    growth_cut: bool,
}

impl Obs {
    fn extra_ns(&self) -> f64 {
        (self.agent_ns - self.none_ns) * self.ops as f64
    }

    /// Mean run time of `program` in the kernel during this phase, ns.
    fn run_ns(&self, program: &str) -> Option<f64> {
        kernel_of(&self.kernel, program)
            .filter(|&(_, runs)| runs > 0.0)
            .map(|(ns, runs)| ns / runs)
    }

    fn target_hits(&self) -> f64 {
        self.targets.iter().filter_map(|t| self.hits.get(t)).sum()
    }

    /// Hits of the targets per hit of the first: 3 for a stop of the world.
    fn hits_per_event(&self) -> f64 {
        let first = self
            .targets
            .first()
            .and_then(|t| self.hits.get(t))
            .copied()
            .unwrap_or_default();
        if first > 0.0 {
            self.target_hits() / first
        } else {
            f64::NAN
        }
    }
}

/// One round of one build: every phase of both sets.
#[derive(Clone, Debug, Default)]
struct Round {
    obs: Vec<Obs>,
    /// The agents' trap timings (JBE µs, RET µs).
    traps: Vec<(f64, f64)>,
}

/// What one round says a hit costs.
#[derive(Clone, Debug, PartialEq)]
struct Solution {
    /// ns per hit of each phase's targets (their mean), in phase order.
    per_hit_ns: Vec<f64>,
    /// Programs that were hit but are no phase's target: costed at the
    /// agent's own estimate.
    assumed: BTreeSet<String>,
}

/// Solves, for one round, the extra time of every phase as the sum of its
/// hits times each program's cost: one unknown per phase (the cost per hit
/// of its targets), other programs at the agent's estimate.
///
/// A program's run time depends on what it finds (the assignment program
/// does more for a map it has not seen, the prune program more when the
/// table really prunes), and the kernel says by how much: where a program
/// hits outside its own phase, its cost there is its own phase's, plus
/// what the kernel says each run took more (or less) there.
fn solve(obs: &[Obs]) -> Result<Solution> {
    let mut owner: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, o) in obs.iter().enumerate() {
        for t in &o.targets {
            if let Some(j) = owner.insert(t, i) {
                bail!("{t} is a target of phases {} and {}", obs[j].phase, o.phase);
            }
        }
        if o.target_hits() <= 0.0 {
            bail!(
                "phase {} saw no hits of {} (is the agent attaching it?)",
                o.phase,
                o.unattached.join(", ")
            );
        }
    }
    let n = obs.len();
    let mut a = vec![vec![0.0; n]; n];
    let mut b = vec![0.0; n];
    let mut assumed = BTreeSet::new();
    for (p, o) in obs.iter().enumerate() {
        b[p] = o.extra_ns();
        for (q, &h) in &o.hits {
            if h == 0.0 {
                continue;
            }
            match owner.get(q.as_str()) {
                Some(&s) => {
                    a[p][s] += h;
                    if s != p
                        && let (Some(here), Some(own)) = (o.run_ns(q), obs[s].run_ns(q))
                    {
                        b[p] -= h * (here - own);
                    }
                }
                None => {
                    let est = o.hit_cost_s.get(q).copied().unwrap_or_default() * 1e9;
                    b[p] -= h * est;
                    assumed.insert(q.clone());
                }
            }
        }
    }
    let per_hit_ns =
        solve_linear(a, b).context("the phases' hits do not determine the programs' costs")?;
    Ok(Solution {
        per_hit_ns,
        assumed,
    })
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting; `None`
/// if `a` is singular.
#[allow(clippy::needless_range_loop)] // row operations index two rows at once
fn solve_linear(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < f64::EPSILON {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            if f == 0.0 {
                continue;
            }
            for k in col..n {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let rest: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    Some(x)
}

pub fn probes(cache: &Path, args: &ProbesArgs) -> Result<()> {
    let Prepared {
        agent_bin,
        agent_help: help,
        out_dir,
        started,
        load_at_start,
    } = prepare(cache, "probes", args.release, args.scale)?;
    let profile = if args.release { "release" } else { "debug" };
    if !help.contains("--map-assign-probes") {
        bail!("the agent has no --map-assign-probes: this benchmark needs it");
    }
    let configs = configs(&help);
    let mut workloads = Vec::new();
    for build in BUILDS {
        workloads.push((build, build_workload(cache, "probes", build.go, &out_dir)?));
    }
    let pinning = Pinning::choose()?;
    if let Some(p) = pinning {
        p.pin_harness()?;
    }
    signal::install();
    println!(
        "bench: probes, {} rounds of {} per build (rotating), {profile} agent; {}",
        args.rounds,
        configs
            .iter()
            .map(|c| c.config.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        describe_pinning(pinning)
    );
    let raw_path = out_dir.join("probes-runs.txt");
    let mut raw =
        File::create(&raw_path).with_context(|| format!("creating {}", raw_path.display()))?;

    let mut sections = Vec::new();
    let mut gomaxprocs = BTreeSet::new();
    for (build, bin) in &workloads {
        let configs: Vec<&ProbeConfig> = configs
            .iter()
            .filter(|c| build.sets.contains(&c.set))
            .collect();
        let mut rounds = Vec::new();
        for round in 0..args.rounds as usize {
            let r = Ctx {
                build,
                workload: bin,
                agent_bin: &agent_bin,
                out_dir: &out_dir,
                pinning,
                args,
            }
            .round(&configs, round, &mut raw, &mut gomaxprocs)?;
            rounds.push(r);
        }
        sections.push(report_build(build, &rounds)?);
    }

    let elapsed = started.elapsed();
    let flags = agent_flags(&help, "off|always").join(" ");
    let header = format!(
        "{}\n{profile} agent (`gopulse --pid PID {flags}`), {} rounds, --scale {}, {} run in \
         total\nPinning: {}; the workload ran with GOMAXPROCS {}\n{}\n",
        machine(),
        args.rounds,
        args.scale,
        fmt_elapsed(elapsed),
        describe_pinning(pinning),
        gomaxprocs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        describe_load(&load_at_start),
    );
    let text = format!("{header}\n{}\n{NOTES}", sections.join("\n"));
    let md_path = out_dir.join("probes.md");
    fs::write(&md_path, &text).with_context(|| format!("writing {}", md_path.display()))?;
    println!("\n{text}");
    println!(
        "bench: report in {}, every run in {}",
        md_path.display(),
        raw_path.display()
    );
    Ok(())
}

/// What every run of one build shares.
struct Ctx<'a> {
    build: &'a Build,
    workload: &'a Path,
    agent_bin: &'a Path,
    out_dir: &'a Path,
    pinning: Option<Pinning>,
    args: &'a ProbesArgs,
}

impl Ctx<'_> {
    /// One round: every configuration once, in rotated order.
    fn round(
        &self,
        configs: &[&ProbeConfig],
        round: usize,
        raw: &mut File,
        gomaxprocs: &mut BTreeSet<u64>,
    ) -> Result<Round> {
        let label = self.build.label;
        let mut none: BTreeMap<&str, Vec<(String, f64)>> = BTreeMap::new();
        let mut with: BTreeMap<&str, Vec<Obs>> = BTreeMap::new();
        let mut traps = Vec::new();
        for pc in rotated(configs, round) {
            if signal::stop_requested() {
                bail!("interrupted");
            }
            let t = Instant::now();
            let spec = RunSpec {
                workload: self.workload,
                args: [
                    format!("-scale={}", self.args.scale),
                    format!("-set={}", pc.set),
                ]
                .into_iter()
                .chain(self.build.phases.map(|p| format!("-phases={p}")))
                .collect(),
                agent_bin: self.agent_bin,
                config: &pc.config,
                out_dir: self.out_dir,
                tag: format!("probes-{label}-r{}-{}", round + 1, pc.config.name),
                pinning: self.pinning,
            };
            let run = run_workload(&spec, snapshot).with_context(|| {
                format!("{label}, round {}, config {}", round + 1, pc.config.name)
            })?;
            gomaxprocs.insert(run.report.gomaxprocs);
            writeln!(
                raw,
                "{label} round {} {}: pid {} {:?} {:?}",
                round + 1,
                pc.config.name,
                run.pid,
                run.report,
                run.snapshots
            )?;
            let mut hits = 0.0;
            if pc.config.agent.is_some() {
                let obs = observations(&run.report, &run.snapshots)?;
                hits = obs.iter().map(|o| o.hits.values().sum::<f64>()).sum();
                with.insert(pc.set, obs);
                traps.extend(run.agent_log.as_deref().and_then(trap_timing));
            } else {
                let ns = run
                    .report
                    .phases
                    .iter()
                    .map(|p| (p.name.clone(), p.fastest_ns_per_op()))
                    .collect();
                none.insert(pc.set, ns);
            }
            println!(
                "bench: {label} round {}/{} {:<12} {:>7.3}s of phases ({} run){}",
                round + 1,
                self.args.rounds,
                pc.config.name,
                run.report.phase_ns / 1e9,
                fmt_elapsed(t.elapsed()),
                if pc.config.agent.is_some() {
                    format!(", {hits} probe hits")
                } else {
                    String::new()
                }
            );
        }
        let mut obs = Vec::new();
        for set in self.build.sets {
            let base = none.get(set).context("no run without the agent")?;
            let agent_obs = with.remove(set).context("no run with the agent")?;
            for mut o in agent_obs {
                o.none_ns = base
                    .iter()
                    .find(|(name, _)| *name == o.phase)
                    .map(|(_, ns)| *ns)
                    .with_context(|| format!("no run without the agent of {}", o.phase))?;
                obs.push(o);
            }
        }
        Ok(Round { obs, traps })
    }
}

const NOTES: &str = "\
Whole µs per hit: what the phase's time gained with the agent, (ns/op with − without) × ops, \
each ns/op the fastest of the 10 parts the phase is timed in (a burst of noise from the host \
spoils a part, not the phase), over the hits the agent counted (gopulse_probe_hits_total) in the phase, less the hits of other \
programs in it at their own phases' cost (corrected by the difference in their kernel run time \
between the two phases), solved per round; the median over rounds, in brackets the range. For \
the stop-the-world programs, which always fire together, per stop of the world (one hit of \
each) and the hits column counts stops. Kernel ns/run: the program's own run time from the \
kernel's BPF statistics (run_time_ns / run_cnt of `bpftool prog show`) during its phase. The \
agent's estimate: its gopulse_probe_hit_cost_seconds after the phase (the trap it timed at \
start-up plus the program's mean run time). Whole − kernel: what a hit costs beyond running the \
program: the trap, and whatever else the hit sets off on the workload's CPU. The second table: \
each phase's median ns/op, and its hits per operation of every program hit at least once per \
1000 operations, with that program's kernel run time in the phase. †: some round found the hits \
free or the phase faster with the agent: the phase's run-to-run noise is larger than what its \
hits cost, and the number is not resolved.\n";

/// Each phase's observation of one run with the agent: deltas between the
/// snapshots around it.
fn observations(report: &super::Report, snapshots: &[(String, Snapshot)]) -> Result<Vec<Obs>> {
    let mut out = Vec::new();
    for p in &report.phases {
        let i = snapshots
            .iter()
            .position(|(name, _)| *name == p.name)
            .with_context(|| format!("no metrics scraped after phase {}", p.name))?;
        let now = &snapshots[i].1;
        let before = i
            .checked_sub(1)
            .map(|j| &snapshots[j].1)
            .context("no snapshot before the first phase")?;
        let hits: BTreeMap<String, f64> = now
            .hits
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - before.hits.get(k).copied().unwrap_or_default(),
                )
            })
            .filter(|(_, d)| *d != 0.0)
            .collect();
        let kernel = now
            .kernel
            .iter()
            .map(|(k, &(t, n))| {
                let (t0, n0) = before.kernel.get(k).copied().unwrap_or_default();
                (k.clone(), (t - t0, n - n0))
            })
            .filter(|(_, (_, n))| *n != 0.0)
            .collect();
        let (targets, unattached) = p
            .probes
            .iter()
            .cloned()
            .partition(|t| hits.get(t).is_some_and(|&h: &f64| h > 0.0));
        out.push(Obs {
            phase: p.name.clone(),
            ops: p.ops,
            targets,
            unattached,
            none_ns: f64::NAN,
            agent_ns: p.fastest_ns_per_op(),
            hits,
            kernel,
            hit_cost_s: now.hit_cost_s.clone(),
            growth_cut: now.growth_attached == Some(0.0),
        });
    }
    Ok(out)
}

/// The report of one build: the cost table, then each phase's times.
fn report_build(build: &Build, rounds: &[Round]) -> Result<String> {
    let label = build.label;
    let first = rounds.first().context("no rounds")?;
    let solutions: Vec<Solution> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| solve(&r.obs).with_context(|| format!("{label}, round {}", i + 1)))
        .collect::<Result<_>>()?;
    let mut out = format!("### {}\n\n", build.title);
    let traps: Vec<&(f64, f64)> = rounds.iter().flat_map(|r| &r.traps).collect();
    if traps.is_empty() {
        out.push_str("The agent logged no trap timing.\n\n");
    } else {
        let jbe: Vec<f64> = traps.iter().map(|t| t.0).collect();
        let ret: Vec<f64> = traps.iter().map(|t| t.1).collect();
        let _ = writeln!(
            out,
            "The agent timed the traps at start-up (median of {} runs): {:.2} µs on a JBE \
             (entry probes), {:.2} µs on a RET (single-stepped).\n",
            traps.len(),
            median(&jbe).unwrap_or(f64::NAN),
            median(&ret).unwrap_or(f64::NAN)
        );
    }
    out.push_str(
        "| program | build | hits per op | hits | kernel ns/run | whole µs per hit (range) | \
         agent's estimate µs | whole − kernel µs |\n|---|---|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut notes = Vec::new();
    for o in &first.obs {
        // Per phase, over the rounds.
        let of = |r: &Round| r.obs.iter().find(|x| x.phase == o.phase).cloned();
        let all: Vec<Obs> = rounds.iter().filter_map(of).collect();
        let joint = o.targets.len() > 1;
        let events: Vec<f64> = all
            .iter()
            .map(|x| x.target_hits() / x.hits_per_event())
            .collect();
        let per_event = median(
            &all.iter()
                .map(Obs::hits_per_event)
                .filter(|v| v.is_finite())
                .collect::<Vec<_>>(),
        )
        .unwrap_or(1.0);
        let whole: Vec<f64> = solutions
            .iter()
            .zip(rounds)
            .filter_map(|(s, r)| {
                let k = r.obs.iter().position(|x| x.phase == o.phase)?;
                Some(s.per_hit_ns.get(k)? * r.obs[k].hits_per_event() / 1e3)
            })
            .collect();
        // Kernel run time over all rounds, per run of each target, then
        // per event.
        let mut kernel_parts = Vec::new();
        let mut kernel_event_ns = 0.0;
        for t in &o.targets {
            let (ns, runs) = all
                .iter()
                .filter_map(|x| kernel_of(&x.kernel, t))
                .fold((0.0, 0.0), |acc, (t, n)| (acc.0 + t, acc.1 + n));
            let per_run = if runs > 0.0 { ns / runs } else { f64::NAN };
            let hits: f64 = all.iter().filter_map(|x| x.hits.get(t)).sum();
            let firsts: f64 = all
                .iter()
                .filter_map(|x| x.targets.first().and_then(|f| x.hits.get(f)))
                .sum();
            kernel_event_ns += per_run * hits / firsts;
            kernel_parts.push(fmt_ns(per_run));
            if per_run > SLOW_PROGRAM_NS {
                notes.push(format!(
                    "{t} ({label}) runs {per_run:.0} ns a hit in the kernel: more than \
                     {SLOW_PROGRAM_NS:.0} ns"
                ));
            }
            if (runs - hits).abs() > 0.01 * hits.max(1.0) {
                notes.push(format!(
                    "{t} ({label}): the kernel counted {runs} runs in phase {}, the agent {hits} \
                     hits",
                    o.phase
                ));
            }
        }
        let estimate: Vec<f64> = all
            .iter()
            .map(|x| {
                let first = x
                    .targets
                    .first()
                    .and_then(|f| x.hits.get(f))
                    .copied()
                    .unwrap_or(f64::NAN);
                x.targets
                    .iter()
                    .map(|t| {
                        x.hit_cost_s.get(t).copied().unwrap_or(f64::NAN)
                            * x.hits.get(t).copied().unwrap_or_default()
                            / first
                    })
                    .sum::<f64>()
                    * 1e6
            })
            .collect();
        let est = median(&estimate).unwrap_or(f64::NAN);
        let whole_med = median(&whole).unwrap_or(f64::NAN);
        let spread = spread(&whole);
        // A round that found the hits free (or the phase faster with the
        // agent) says the phase's run-to-run noise is larger than what the
        // hits cost.
        let resolved = spread.is_some_and(|s| s.min > 0.0);
        let range = spread.map_or_else(String::new, |s| {
            format!(
                " ({:.2}–{:.2}){}",
                s.min,
                s.max,
                if resolved { "" } else { " †" }
            )
        });
        if resolved && ((whole_med - est) / est).abs() > ESTIMATE_TOLERANCE {
            notes.push(format!(
                "{} ({label}): a hit costs {whole_med:.2} µs all told, the agent estimates \
                 {est:.2} µs",
                o.targets.join(" + ")
            ));
        }
        if all.iter().any(|x| x.growth_cut) {
            notes.push(format!(
                "phase {} ({label}): the governor had cut the growth probes",
                o.phase
            ));
        }
        let name = match (joint, o.phase.as_str()) {
            (false, _) => o.targets.join(" + "),
            (true, "stw") => format!("{} (per stop of the world)", o.targets.join(" + ")),
            (true, _) => format!("{} (per hit of the first)", o.targets.join(" + ")),
        };
        for t in &o.unattached {
            notes.push(format!(
                "{t} ({label}): no hits in phase {}: the agent does not attach it to this build",
                o.phase
            ));
        }
        let hits_med = median(&events).unwrap_or(f64::NAN);
        let per_op = hits_med * per_event / o.ops as f64;
        let _ = writeln!(
            out,
            "| {name} | {label} | {} | {hits_med:.0} | {} | {whole_med:.2}{range} | {est:.2} | \
             {:.2} |",
            fmt_per_op(per_op),
            kernel_parts.join(" + "),
            whole_med - kernel_event_ns / 1e3,
        );
    }
    let assumed: BTreeSet<&String> = solutions.iter().flat_map(|s| &s.assumed).collect();
    if !assumed.is_empty() {
        notes.push(format!(
            "no phase of their own, costed at the agent's estimate: {}",
            assumed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    out.push_str(
        "\n| phase | ops | none ns/op (fastest part) | agent ns/op (fastest part) | throughput ratio | hits per op, by \
         program (kernel ns/run) |\n|---|--:|--:|--:|--:|---|\n",
    );
    for o in &first.obs {
        let all: Vec<&Obs> = rounds
            .iter()
            .filter_map(|r| r.obs.iter().find(|x| x.phase == o.phase))
            .collect();
        let none = median(&all.iter().map(|x| x.none_ns).collect::<Vec<_>>()).unwrap_or(f64::NAN);
        let with = median(&all.iter().map(|x| x.agent_ns).collect::<Vec<_>>()).unwrap_or(f64::NAN);
        let mut programs: BTreeSet<&String> = BTreeSet::new();
        for x in &all {
            programs.extend(x.hits.keys());
        }
        let mut per_op = Vec::new();
        for q in programs {
            let h: Vec<f64> = all
                .iter()
                .map(|x| x.hits.get(q).copied().unwrap_or_default())
                .collect();
            let v = median(&h).unwrap_or_default() / o.ops as f64;
            if v < MINOR_HITS_PER_OP && !o.targets.contains(q) {
                continue;
            }
            let (ns, runs) = all
                .iter()
                .filter_map(|x| kernel_of(&x.kernel, q))
                .fold((0.0, 0.0), |acc, (t, n)| (acc.0 + t, acc.1 + n));
            per_op.push(format!("{q} {} ({:.0} ns)", fmt_per_op(v), ns / runs));
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.3} | {} |",
            o.phase,
            o.ops,
            fmt_ns(none),
            fmt_ns(with),
            none / with,
            per_op.join(", ")
        );
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    Ok(out)
}

/// Hits per operation: exact-looking counts stay short.
fn fmt_per_op(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(phase: &str, targets: &[&str], extra_ns: f64, hits: &[(&str, f64)]) -> Obs {
        Obs {
            phase: phase.into(),
            ops: 1000,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            none_ns: 100.0,
            agent_ns: 100.0 + extra_ns / 1000.0,
            hits: hits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            hit_cost_s: [("stray".to_string(), 2e-6)].into(),
            ..Obs::default()
        }
    }

    #[test]
    fn costs_are_solved_across_phases() {
        // assign costs 1000 ns, delete 1500, evacuate 3000; the evacuation
        // phase also assigns and deletes, and a stray program at the agent's
        // 2 µs estimate.
        let phases = [
            obs(
                "assign",
                &["map_assign"],
                1000.0 * 1000.0,
                &[("map_assign", 1000.0)],
            ),
            obs(
                "evacuate",
                &["map_evacuate"],
                53.0 * 1000.0 + 8.0 * 1500.0 + 12.0 * 3000.0 + 2000.0,
                &[
                    ("map_assign", 53.0),
                    ("map_delete", 8.0),
                    ("map_evacuate", 12.0),
                    ("stray", 1.0),
                ],
            ),
            obs(
                "delete",
                &["map_delete"],
                500.0 * 1500.0,
                &[("map_delete", 500.0)],
            ),
        ];
        let s = solve(&phases).unwrap();
        let want = [1000.0, 3000.0, 1500.0];
        for (got, want) in s.per_hit_ns.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?}", s.per_hit_ns);
        }
        assert_eq!(s.assumed, ["stray".to_string()].into());
    }

    #[test]
    fn run_time_differences_carry_over() {
        // Assignments cost 1000 ns in their phase, where each run takes 300
        // ns in the kernel; in the evacuation phase each takes 500 ns, so
        // 1200 ns there.
        let mut assign = obs(
            "assign",
            &["map_assign"],
            1000.0 * 1000.0,
            &[("map_assign", 1000.0)],
        );
        assign.kernel = [("map_assign".to_string(), (300.0 * 1000.0, 1000.0))].into();
        let mut evac = obs(
            "evacuate",
            &["map_evacuate"],
            50.0 * 1200.0 + 10.0 * 3000.0,
            &[("map_assign", 50.0), ("map_evacuate", 10.0)],
        );
        evac.kernel = [("map_assign".to_string(), (500.0 * 50.0, 50.0))].into();
        let s = solve(&[assign, evac]).unwrap();
        assert!(
            (s.per_hit_ns[0] - 1000.0).abs() < 1e-6,
            "{:?}",
            s.per_hit_ns
        );
        assert!(
            (s.per_hit_ns[1] - 3000.0).abs() < 1e-6,
            "{:?}",
            s.per_hit_ns
        );
    }

    #[test]
    fn joint_targets_share_one_cost() {
        let stw = obs(
            "stw",
            &["stw_stop", "stw_start_entry", "stw_start_ret"],
            // 100 stops at 9 µs each: 3 µs a hit on average.
            100.0 * 9000.0,
            &[
                ("stw_stop", 100.0),
                ("stw_start_entry", 100.0),
                ("stw_start_ret", 100.0),
            ],
        );
        assert_eq!(stw.hits_per_event(), 3.0);
        let s = solve(&[stw]).unwrap();
        assert!((s.per_hit_ns[0] - 3000.0).abs() < 1e-9);
    }

    #[test]
    fn a_phase_without_hits_is_an_error() {
        let p = obs("gc", &["gc_mark_termination"], 1e6, &[("stw_stop", 3.0)]);
        assert!(solve(&[p]).is_err());
        let twice = [
            obs("a", &["x"], 1.0, &[("x", 1.0)]),
            obs("b", &["x"], 1.0, &[("x", 1.0)]),
        ];
        assert!(solve(&twice).is_err());
    }

    #[test]
    fn linear_solver() {
        let x = solve_linear(
            vec![vec![2.0, 1.0], vec![1.0, 3.0]],
            vec![5.0, 10.0], // x = 1, y = 3
        )
        .unwrap();
        assert!((x[0] - 1.0).abs() < 1e-12 && (x[1] - 3.0).abs() < 1e-12);
        assert!(solve_linear(vec![vec![1.0, 2.0], vec![2.0, 4.0]], vec![1.0, 2.0]).is_none());
    }

    #[test]
    fn bpftool_output() {
        let text = r#"[{"id":3,"type":"kprobe","name":"other","run_time_ns":5,"run_cnt":1},
            {"id":41,"type":"kprobe","name":"gc_mark_termina","tag":"ab","gpl_compatible":true,
             "run_time_ns":123400,"run_cnt":200,"loaded_at":1,"uid":0,"map_ids":[1,2]},
            {"id":42,"type":"kprobe","name":"stw_stop"}]"#;
        let stats = parse_bpftool(text, &[41, 42].into()).unwrap();
        assert_eq!(stats.len(), 2);
        assert_eq!(
            kernel_of(&stats, "gc_mark_termination"),
            Some((123_400.0, 200.0))
        );
        assert_eq!(kernel_of(&stats, "stw_stop"), Some((0.0, 0.0)));
        assert_eq!(kernel_of(&stats, "grow_table"), None);
    }

    #[test]
    fn names_and_trap_line() {
        let dir = std::env::temp_dir().join(format!("xtask-trap-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("agent.log");
        fs::write(
            &log,
            "2026-11-22T10:00:00Z  INFO gopulse_agent::probes: timed this machine's uprobe \
             traps: 0.81 µs on a JBE (entry probes), 5.80 µs on a RET jbe_ns=810 ret_ns=5800\n",
        )
        .unwrap();
        assert_eq!(trap_timing(&log), Some((0.81, 5.8)));
        fs::write(&log, "nothing\n").unwrap();
        assert_eq!(trap_timing(&log), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flags_follow_the_agent() {
        assert_eq!(
            agent_flags("--map-assign-probes", "always"),
            ["--map-assign-probes=always"]
        );
        assert_eq!(
            agent_flags("--overhead-budget F --overhead-window S", "off"),
            [
                "--map-assign-probes=off",
                "--overhead-budget=1",
                "--overhead-window=3600"
            ]
        );
        assert_eq!(
            agent_flags("--overhead-budget --overhead-window --bpf-stats", "off").last(),
            Some(&"--bpf-stats=always".to_string())
        );
        let names: Vec<String> = configs("").into_iter().map(|c| c.config.name).collect();
        assert_eq!(names, ["none-growth", "off", "none-access", "always"]);
    }
}
