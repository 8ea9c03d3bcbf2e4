//! The Go runtime's own metrics read from outside (issue 19), against what
//! `runtime/metrics` says in-process. The `runtime` fixture stops at
//! quiescent checkpoints (idle before its first GC; after heap-driven
//! cycles; after forced ones; 5,000 goroutines up, then gone; GOGC=50;
//! GOMAXPROCS=1; a memory limit; just under it, where the goal is the
//! limit's; GOGC=off without a limit), reads every metric in-process and
//! prints it; the agent is scraped then, and what rotel receives over OTLP
//! after that scrape is compared too. Goal, limit, GOGC, GOMAXPROCS,
//! goroutines, cycles and the live heap must be equal; allocated bytes and
//! allocations within 1%, used memory within 2%, GC CPU within 5%, the
//! scheduling-latency count (and every bucket) within 2%.
//!
//! Every release once (default build); a classic (Go 1.23) and a swiss
//! (Go 1.27) release stripped, PIE and cgo, and 1.25's greenteagc layout
//! stripped; the classic and swiss default builds five times in all. Each
//! set is one agent watching its fixtures side by side. `RESULT` lines
//! (with `--nocapture`) give the worst difference seen per metric.
mod support;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Agent, Metrics, Target,
    rotel::{Latest, Rotel, now_ns},
};

/// The fixture's checkpoints, in order.
const CHECKPOINTS: [&str; 10] = [
    "start",
    "heap-cycles",
    "forced",
    "goroutines-up",
    "goroutines-back",
    "gogc-50",
    "gomaxprocs-1",
    "memory-limit",
    "near-limit",
    "gogc-off",
];

/// The Issue's accuracy bounds (relative).
const ALLOCATED: f64 = 0.01;
const USED: f64 = 0.02;
const CPU: f64 = 0.05;
const LATENCY: f64 = 0.02;

/// How often the agent pushes (ms): each checkpoint waits for one push.
const EXPORT_MS: &str = "500";

#[derive(Clone, Copy)]
struct Build {
    version: &'static str,
    kind: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

const fn build(version: &'static str, kind: &'static str, args: &'static [&'static str]) -> Build {
    Build {
        version,
        kind,
        args,
        env: &[],
    }
}

const STRIPPED: &[&str] = &["-ldflags=-s -w"];
const PIE: &[&str] = &["-buildmode=pie"];
const CGO: &[&str] = &["-tags=gopulse_cgo"];
const CLASSIC: &str = "1.23.9";
const SWISS: &str = "1.27.3";

/// One fixture process.
struct Run {
    what: String,
    minor: u32,
    target: Target,
}

/// The in-process reading of a checkpoint.
struct Truth {
    values: BTreeMap<String, Value>,
    num_goroutine: u64,
    latency: Vec<u64>,
}

impl Truth {
    fn parse(line: &str) -> (String, Self) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("fixture said {line:?}: {e}"));
        let values = v["values"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, x)| (k.clone(), x.clone()))
            .collect();
        let latency: Vec<u64> = v["latency"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(latency.len(), 162, "/sched/latencies has 162 counts");
        let checkpoint = v["checkpoint"].as_str().unwrap().to_owned();
        (
            checkpoint,
            Truth {
                values,
                num_goroutine: v["num_goroutine"].as_u64().unwrap(),
                latency,
            },
        )
    }

    fn u(&self, name: &str) -> u64 {
        self.values[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {:?}", self.values.get(name)))
    }

    fn f(&self, name: &str) -> f64 {
        self.values[name].as_f64().unwrap()
    }
}

/// The worst relative difference seen per metric, and where; and at how
/// many checkpoints the scheduling latency sum could be checked.
#[derive(Default)]
struct Worst(BTreeMap<&'static str, (f64, String)>, SumsChecked);

#[derive(Default)]
struct SumsChecked(usize);

impl Worst {
    /// Records `|ours - theirs| / theirs` (exact zero when both are 0) and
    /// checks it against `bound`.
    fn check(&mut self, metric: &'static str, ours: f64, theirs: f64, bound: f64, at: &str) {
        let rel = if theirs == 0.0 {
            if ours == 0.0 { 0.0 } else { f64::INFINITY }
        } else {
            (ours - theirs).abs() / theirs.abs()
        };
        assert!(
            rel <= bound,
            "{at}: {metric} {ours} vs in-process {theirs} ({:.3}% > {:.1}%)",
            rel * 100.0,
            bound * 100.0
        );
        let e = self.0.entry(metric).or_insert((0.0, String::new()));
        if rel >= e.0 {
            *e = (rel, at.to_owned());
        }
    }
}

/// Upper bound (seconds) of `/sched/latencies` count `i` (0: underflow,
/// 161: overflow), from the runtime's bucketing (`timeHistogram`): 64 ns
/// steps up to 256 ns, then four steps per power of two of nanoseconds.
fn latency_upper(i: usize) -> f64 {
    match i {
        0 => 0.0,
        161 => f64::INFINITY,
        _ => {
            let (bucket, sub) = ((i - 1) / 4, ((i - 1) % 4) as u64);
            let ns = if bucket == 0 {
                (sub + 1) * 64
            } else {
                let l = bucket as u64 + 8;
                (1u64 << (l - 1)) + (sub + 1) * (1u64 << (l - 3))
            };
            ns as f64 / 1e9
        }
    }
}

/// Lower bound (seconds) of `/sched/latencies` count `i`.
fn latency_lower(i: usize) -> f64 {
    match i {
        0 | 1 => 0.0,
        _ => latency_upper(i - 1),
    }
}

/// The agent's histogram of one process: (le, cumulative count), ascending.
fn prom_buckets(m: &Metrics, name: &str, pid: &str) -> Vec<(f64, f64)> {
    let mut b: Vec<(f64, f64)> = m
        .samples
        .iter()
        .filter(|s| {
            s.name == format!("{name}_bucket")
                && s.labels.get("pid").map(String::as_str) == Some(pid)
        })
        .map(|s| {
            let le = match s.labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                le => le.parse().unwrap(),
            };
            (le, s.value)
        })
        .collect();
    b.sort_by(|a, c| a.0.total_cmp(&c.0));
    b
}

/// An integer series as written (exact beyond 2^53).
fn exact(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<i128> {
    m.raw(name, labels).map(|r| {
        r.parse::<i128>()
            .unwrap_or_else(|e| panic!("{name} {labels:?} = {r}: {e}"))
    })
}

/// The values that must be equal, as (metric, in-process value): `None`
/// when the series must be absent (no memory limit).
fn exact_values(t: &Truth) -> Vec<(&'static str, &'static str, Option<i128>)> {
    // The runtime exports GOGC=off as uint64(int32(-1)).
    let gogc = match t.u("/gc/gogc:percent") {
        u64::MAX => -1,
        n => i128::from(n),
    };
    let limit = t.u("/gc/gomemlimit:bytes");
    let limit = (limit != i64::MAX as u64).then_some(i128::from(limit));
    vec![
        (
            "go_memory_gc_goal_bytes",
            "go.memory.gc.goal",
            Some(i128::from(t.u("/gc/heap/goal:bytes"))),
        ),
        ("go_memory_limit_bytes", "go.memory.limit", limit),
        ("go_config_gogc_percent", "go.config.gogc", Some(gogc)),
        (
            "go_processor_limit",
            "go.processor.limit",
            Some(i128::from(t.u("/sched/gomaxprocs:threads"))),
        ),
        (
            "go_goroutine_count",
            "go.goroutine.count",
            Some(i128::from(t.u("/sched/goroutines:goroutines"))),
        ),
        (
            "go_memory_gc_cycles_total",
            "go.memory.gc.cycles",
            Some(i128::from(t.u("/gc/cycles/total:gc-cycles"))),
        ),
        (
            "gopulse_gc_heap_live_bytes",
            "gopulse.gc.heap.live",
            Some(i128::from(t.u("/gc/heap/live:bytes"))),
        ),
    ]
}

/// /metrics against the in-process reading.
fn check_prometheus(m: &Metrics, run: &Run, cp: &str, t: &Truth, worst: &mut Worst) {
    let pid = run.target.pid.to_string();
    let at = format!("{} @{cp}", run.what);
    let p = [("pid", pid.as_str())];
    for (name, _, want) in exact_values(t) {
        assert_eq!(exact(m, name, &p), want, "{at}: {name}");
    }
    // runtime.NumGoroutine() leaves out the runtime's own goroutines, which
    // /sched/goroutines counts from Go 1.26 on.
    let count = exact(m, "go_goroutine_count", &p).unwrap();
    let system = exact(m, "gopulse_goroutine_system", &p).unwrap_or_else(|| panic!("{at}"));
    let num = i128::from(t.num_goroutine);
    if run.minor >= 26 {
        assert_eq!(count - system, num, "{at}: NumGoroutine");
    } else {
        assert_eq!(count, num, "{at}: NumGoroutine");
    }
    assert!(system >= 1, "{at}: {system} system goroutines");
    worst.check(
        "allocated bytes",
        m.value("go_memory_allocated_bytes_total", &p),
        t.f_or_u("/gc/heap/allocs:bytes"),
        ALLOCATED,
        &at,
    );
    worst.check(
        "allocations",
        m.value("go_memory_allocations_total", &p),
        t.f_or_u("/gc/heap/allocs:objects"),
        ALLOCATED,
        &at,
    );
    let used = |kind: &str| {
        m.value(
            "go_memory_used_bytes",
            &[("pid", pid.as_str()), ("go_memory_type", kind)],
        )
    };
    let stack =
        t.f_or_u("/memory/classes/heap/stacks:bytes") + t.f_or_u("/memory/classes/os-stacks:bytes");
    let total =
        t.f_or_u("/memory/classes/total:bytes") - t.f_or_u("/memory/classes/heap/released:bytes");
    worst.check(
        "used memory",
        used("stack") + used("other"),
        total,
        USED,
        &at,
    );
    worst.check("used memory (stack)", used("stack"), stack, USED, &at);
    for (state, name) in [
        ("user", "/cpu/classes/user:cpu-seconds"),
        ("gc", "/cpu/classes/gc/total:cpu-seconds"),
        ("scavenge", "/cpu/classes/scavenge/total:cpu-seconds"),
        ("idle", "/cpu/classes/idle:cpu-seconds"),
    ] {
        let ours = m.value(
            "go_cpu_time_seconds_total",
            &[("pid", pid.as_str()), ("go_cpu_state", state)],
        );
        worst.check(cpu_metric(state), ours, t.f(name), CPU, &at);
    }
    // Scheduling latency: the count, each bucket (the runtime's counts
    // folded by its own boundaries), and the estimated sum within what
    // the counts allow.
    let n: u64 = t.latency.iter().sum();
    worst.check(
        "scheduling latency count",
        m.value("go_schedule_duration_seconds_count", &p),
        n as f64,
        LATENCY,
        &at,
    );
    let buckets = prom_buckets(m, "go_schedule_duration_seconds", &pid);
    assert_eq!(buckets.len(), 23, "{at}: buckets");
    for &(le, ours) in &buckets {
        let theirs: u64 = t
            .latency
            .iter()
            .enumerate()
            .filter(|&(i, _)| latency_upper(i) <= le)
            .map(|(_, c)| c)
            .sum();
        assert!(
            (ours - theirs as f64).abs() <= LATENCY * n as f64,
            "{at}: latency bucket le={le}: {ours} vs in-process {theirs} of {n}"
        );
    }
    // The sum is estimated from the runtime's own bucket of each
    // observation: within what the counts allow (when no observation came
    // between the two reads; one of any length may).
    if m.value("go_schedule_duration_seconds_count", &p) == n as f64 {
        let (lo, hi) = t
            .latency
            .iter()
            .enumerate()
            .fold((0.0, 0.0), |(lo, hi), (i, &c)| {
                let upper = if i == 161 {
                    latency_lower(i)
                } else {
                    latency_upper(i)
                };
                (lo + c as f64 * latency_lower(i), hi + c as f64 * upper)
            });
        let sum = m.value("go_schedule_duration_seconds_sum", &p);
        assert!(
            sum >= lo * (1.0 - 1e-9) && sum <= hi * (1.0 + 1e-9),
            "{at}: latency sum {sum} outside [{lo}, {hi}]"
        );
        worst.1.0 += 1;
    }
}

fn cpu_metric(state: &str) -> &'static str {
    match state {
        "user" => "CPU user",
        "gc" => "CPU gc",
        "scavenge" => "CPU scavenge",
        _ => "CPU idle",
    }
}

impl Truth {
    /// A value runtime/metrics gives as uint64 or float64, as f64.
    fn f_or_u(&self, name: &str) -> f64 {
        self.values[name].as_f64().unwrap()
    }
}

/// What rotel received after `after` against the in-process reading, as
/// /metrics is checked; `base` is the scrape's and rotel's scheduling
/// latency count and sum at the first checkpoint: OTLP's histogram counts
/// from the agent's first reading (the runtime's history before is in the
/// /metrics totals only), so their growth since must agree.
#[allow(clippy::too_many_arguments)]
fn check_otlp(
    points: &Latest,
    run: &Run,
    cp: &str,
    t: &Truth,
    m: &Metrics,
    after: u64,
    base: Option<[f64; 4]>,
    worst: &mut Worst,
) -> [f64; 4] {
    let pid = run.target.pid;
    let spid = pid.to_string();
    let at = format!("{} @{cp} (OTLP)", run.what);
    let point = |name: &str, attrs: &[(&str, &str)]| points.newest(pid, name, attrs, after);
    for (_, name, want) in exact_values(t) {
        let got = point(name, &[]).map(|p| {
            assert_eq!(p["value_type"], "int", "{at}: {name} {p}");
            i128::from(p["value"].as_i64().unwrap())
        });
        assert_eq!(got, want, "{at}: {name}");
    }
    let goal = point("go.memory.gc.goal", &[]).unwrap();
    assert_eq!(
        (goal["kind"].as_str(), goal["is_monotonic"].as_bool()),
        (Some("sum"), Some(false)),
        "{at}: an UpDownCounter"
    );
    assert_eq!(goal["unit"], "By");
    let cycles = point("go.memory.gc.cycles", &[]).unwrap();
    assert_eq!(cycles["is_monotonic"], true, "{at}");
    assert_eq!(cycles["temporality"], "AGGREGATION_TEMPORALITY_CUMULATIVE");
    assert_eq!(cycles["unit"], "{gc_cycle}");
    let value = |name: &str, attrs: &[(&str, &str)]| {
        point(name, attrs).unwrap_or_else(|| panic!("{at}: no {name} {attrs:?}"))["value"]
            .as_f64()
            .unwrap()
    };
    worst.check(
        "allocated bytes (OTLP)",
        value("go.memory.allocated", &[]),
        t.f_or_u("/gc/heap/allocs:bytes"),
        ALLOCATED,
        &at,
    );
    worst.check(
        "allocations (OTLP)",
        value("go.memory.allocations", &[]),
        t.f_or_u("/gc/heap/allocs:objects"),
        ALLOCATED,
        &at,
    );
    let used = value("go.memory.used", &[("go.memory.type", "stack")])
        + value("go.memory.used", &[("go.memory.type", "other")]);
    let total =
        t.f_or_u("/memory/classes/total:bytes") - t.f_or_u("/memory/classes/heap/released:bytes");
    worst.check("used memory (OTLP)", used, total, USED, &at);
    for (state, name) in [
        ("user", "/cpu/classes/user:cpu-seconds"),
        ("gc", "/cpu/classes/gc/total:cpu-seconds"),
        ("scavenge", "/cpu/classes/scavenge/total:cpu-seconds"),
        ("idle", "/cpu/classes/idle:cpu-seconds"),
    ] {
        let ours = value("go.cpu.time", &[("go.cpu.state", state)]);
        worst.check("CPU (OTLP)", ours, t.f(name), CPU, &at);
    }
    // The scheduling histogram: the /metrics buckets; its observations since
    // the first checkpoint are those /metrics counts (but for the few
    // between the scrape and the push).
    let h = point("go.schedule.duration", &[]).unwrap_or_else(|| panic!("{at}: no histogram"));
    assert_eq!(h["kind"], "histogram", "{at}: {h}");
    let prom = prom_buckets(m, "go_schedule_duration_seconds", &spid);
    let bounds: Vec<f64> = h["explicit_bounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_f64().unwrap())
        .collect();
    let prom_bounds: Vec<f64> = prom.iter().map(|b| b.0).filter(|b| b.is_finite()).collect();
    assert_eq!(bounds, prom_bounds, "{at}: bucket bounds");
    let p = [("pid", spid.as_str())];
    let now = [
        m.value("go_schedule_duration_seconds_count", &p),
        h["count"].as_f64().unwrap(),
        m.value("go_schedule_duration_seconds_sum", &p),
        h["sum"].as_f64().unwrap(),
    ];
    if let Some(b) = base {
        let (d_prom, d_otlp) = (now[0] - b[0], now[1] - b[1]);
        assert!(
            (d_prom - d_otlp).abs() <= LATENCY * d_prom + 3.0,
            "{at}: {d_otlp} scheduling latencies since the first checkpoint over OTLP, {d_prom} \
             on /metrics"
        );
        // The same observations at the same values: the same sum.
        if d_prom == d_otlp {
            let (s_prom, s_otlp) = (now[2] - b[2], now[3] - b[3]);
            assert!(
                (s_prom - s_otlp).abs() <= 1e-9 * s_prom.abs().max(1e-6),
                "{at}: latency sum since the first checkpoint {s_otlp} over OTLP, {s_prom} on \
                 /metrics"
            );
        }
    }
    now
}

/// One set at a time: a still fixture's state is only still while the
/// machine leaves it time to finish what it does in the background.
static ONE_SET: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds, runs and checks one set of fixtures under one agent.
fn check_set(name: &str, builds: &[Build], runs: usize) {
    if !support::have_root() {
        return;
    }
    let _one = ONE_SET
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(rotel_bin) = support::rotel_binary() else {
        assert!(!support::prerequisite(
            false,
            "rotel is not installed (cargo xtask setup)"
        ));
        return;
    };
    let mut set = Vec::new();
    for b in builds {
        let Some(go) = support::go_or_skip(b.version) else {
            return;
        };
        let bin = support::build_fixture_env(
            "runtime",
            &go,
            &format!("{}-{}", b.version, b.kind),
            b.args,
            b.env,
        );
        let minor = b.version.split('.').nth(1).unwrap().parse().unwrap();
        for n in 0..runs {
            set.push(Run {
                what: format!("go{} {} #{}", b.version, b.kind, n + 1),
                minor,
                target: Target::spawn(&bin, &[]),
            });
        }
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("runtime-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("points.jsonl");
    let _ = std::fs::remove_file(&dump);
    let (grpc, http) = (support::free_port(), support::free_port());
    let _rotel = Rotel::start(&rotel_bin, &dump, grpc, http);
    let pids: Vec<u32> = set.iter().map(|r| r.target.pid).collect();
    let endpoint = format!("http://127.0.0.1:{http}");
    let agent = Agent::spawn_env(
        &pids,
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-histograms",
            "explicit",
        ],
        &[("OTEL_METRIC_EXPORT_INTERVAL", EXPORT_MS)],
    );
    agent.wait_ready(Duration::from_secs(60));
    let mut points = Latest::default();
    let mut worst: BTreeMap<String, Worst> = BTreeMap::new();
    let mut base: Vec<Option<[f64; 4]>> = vec![None; set.len()];
    for cp in CHECKPOINTS {
        for r in &mut set {
            r.target.send("next");
        }
        // Each fixture is compared with a scrape taken as soon as it has
        // printed: the others may still be busy, and a still fixture's
        // runtime still returns memory to the OS in the background.
        let mut truths: Vec<Option<Truth>> = set.iter().map(|_| None).collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while truths.iter().any(Option::is_none) {
            let mut idle = true;
            for (r, slot) in set.iter_mut().zip(truths.iter_mut()) {
                if slot.is_some() {
                    continue;
                }
                let Some(line) = r.target.try_read_line() else {
                    continue;
                };
                idle = false;
                let m = agent.scrape();
                let (got, t) = Truth::parse(&line);
                assert_eq!(got, cp, "{}", r.what);
                check_checkpoint(r, cp, &t);
                check_prometheus(&m, r, cp, &t, worst.entry(release(r)).or_default());
                *slot = Some(t);
            }
            assert!(
                Instant::now() < deadline,
                "@{cp}: a fixture printed nothing"
            );
            if idle {
                thread::sleep(Duration::from_millis(5));
            }
        }
        let truths: Vec<Truth> = truths.into_iter().flatten().collect();
        // A push after this scrape, which OTLP's latency count is
        // compared with.
        let m = agent.scrape();
        let scraped_at = now_ns();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            points.update(&dump);
            let all = set.iter().all(|r| {
                points
                    .newest(r.target.pid, "go.schedule.duration", &[], scraped_at)
                    .is_some()
            });
            if all {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "@{cp}: no push after the scrape reached rotel"
            );
            thread::sleep(Duration::from_millis(100));
        }
        for ((r, t), b) in set.iter().zip(&truths).zip(base.iter_mut()) {
            let now = check_otlp(
                &points,
                r,
                cp,
                t,
                &m,
                scraped_at,
                *b,
                worst.entry(release(r)).or_default(),
            );
            b.get_or_insert(now);
        }
    }
    // The agent first: it hands its probes to its helper and is gone at
    // once (the fixtures' exits would have it remove them itself, one RCU
    // grace period each).
    agent.stop();
    for r in &mut set {
        r.target.send("exit");
    }
    for r in set {
        r.target.finish();
    }
    for (release, w) in worst {
        // Checkpoints where no scheduling event came between the two reads
        // (the fixture parks on its input, but the runtime's own goroutines
        // may run): a few in every run at least.
        assert!(
            w.1.0 >= 2,
            "{release}: the latency sum was checked at {} checkpoints only",
            w.1.0
        );
        let line: Vec<String> =
            w.0.iter()
                .map(|(metric, (rel, _))| format!("{metric} {:.3}%", rel * 100.0))
                .collect();
        eprintln!(
            "RESULT {name} {release}: goal, limit, GOGC, GOMAXPROCS, goroutines, cycles, live heap \
             exact at {} checkpoints, over OTLP too; worst: {}; latency sum within the runtime's \
             buckets at {} checkpoints",
            CHECKPOINTS.len(),
            line.join(", "),
            w.1.0
        );
    }
}

/// What each checkpoint is about holds in-process.
fn check_checkpoint(r: &Run, cp: &str, t: &Truth) {
    match cp {
        // Fresh from the first scrape: nothing of a GC before the first one.
        "start" => assert_eq!(
            t.u("/gc/cycles/total:gc-cycles"),
            0,
            "{}: a GC before start",
            r.what
        ),
        // The goal is the memory limit's: under what GOGC=50 would give.
        "near-limit" => assert!(
            t.u("/gc/heap/goal:bytes") < t.u("/gc/heap/live:bytes") * 3 / 2,
            "{}: the near-limit goal {} is not the limit's (live {})",
            r.what,
            t.u("/gc/heap/goal:bytes"),
            t.u("/gc/heap/live:bytes")
        ),
        "goroutines-up" => assert!(t.num_goroutine > 5000, "{}", r.what),
        "gogc-off" => assert_eq!(t.u("/gc/gogc:percent"), u64::MAX, "{}", r.what),
        _ => {}
    }
}

/// `go1.N.P kind`, without the run number: results are per release and build.
fn release(r: &Run) -> String {
    r.what
        .rsplit_once(" #")
        .map_or(r.what.clone(), |(w, _)| w.to_owned())
}

#[test]
fn every_release() {
    let builds: Vec<Build> = support::GO_VERSIONS
        .iter()
        .map(|&v| build(v, "default", &[]))
        .collect();
    check_set("releases", &builds, 1);
}

#[test]
fn stripped_pie_and_cgo_builds() {
    check_set(
        "builds",
        &[
            build(CLASSIC, "stripped", STRIPPED),
            build(CLASSIC, "pie", PIE),
            build(CLASSIC, "cgo", CGO),
            build(SWISS, "stripped", STRIPPED),
            build(SWISS, "pie", PIE),
            build(SWISS, "cgo", CGO),
            // Its own layout of `work` (a table row of its own).
            Build {
                version: "1.25.5",
                kind: "greenteagc-stripped",
                args: STRIPPED,
                env: &[("GOEXPERIMENT", "greenteagc")],
            },
        ],
        1,
    );
}

/// With `every_release`, five runs of each.
#[test]
fn classic_and_swiss_again() {
    check_set(
        "repeated",
        &[build(CLASSIC, "default", &[]), build(SWISS, "default", &[])],
        4,
    );
}

/// A build whose layout the table does not know (`GOEXPERIMENT=
/// staticlockranking` grows every runtime mutex): with its DWARF the
/// agent reads it right; stripped, it reads nothing of its runtime state,
/// says so once, and watches it for the rest as usual.
#[test]
fn unknown_layout_is_read_only_with_dwarf() {
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip(SWISS) else {
        return;
    };
    let env = [("GOEXPERIMENT", "staticlockranking")];
    let build = |kind: &str, args: &[&str]| {
        support::build_fixture_env(
            "runtime",
            &go,
            &format!("{SWISS}-staticlockranking-{kind}"),
            args,
            &env,
        )
    };
    let (full_bin, stripped_bin) = (build("default", &[]), build("stripped", STRIPPED));
    let mut full = Target::spawn(&full_bin, &[]);
    let mut stripped = Target::spawn(&stripped_bin, &[]);
    let mut agent = Agent::spawn(&[full.pid, stripped.pid]);
    agent.wait_ready(Duration::from_secs(60));
    full.send("next");
    stripped.send("next");
    let (_, truth) = Truth::parse(&full.read_line(Duration::from_secs(60)));
    let _ = stripped.read_line(Duration::from_secs(60));
    let m = agent.scrape();
    let (f, s) = (full.pid.to_string(), stripped.pid.to_string());
    for (name, _, want) in exact_values(&truth) {
        assert_eq!(exact(&m, name, &[("pid", &f)]), want, "with DWARF: {name}");
    }
    let theirs: Vec<&str> = m
        .samples
        .iter()
        .filter(|x| x.labels.get("pid") == Some(&s))
        .map(|x| x.name.as_str())
        .filter(|n| {
            n.starts_with("go_")
                || n.starts_with("gopulse_gc_heap")
                || n.starts_with("gopulse_goroutine")
        })
        .collect();
    assert!(theirs.is_empty(), "stripped, read anyway: {theirs:?}");
    assert!(m.value("gopulse_probes_attached", &[("pid", &s)]) >= 3.0);
    let line = agent.wait_log(
        "cannot be read from this executable",
        Duration::from_secs(5),
    );
    assert!(line.contains("staticlockranking"), "{line}");
    let lines = agent
        .log_lines()
        .iter()
        .filter(|l| l.contains("cannot be read from this executable"))
        .count();
    assert_eq!(lines, 1, "one line for the executable");
    agent.stop();
    for t in [&mut full, &mut stripped] {
        t.send("exit");
    }
    full.finish();
    stripped.finish();
}
