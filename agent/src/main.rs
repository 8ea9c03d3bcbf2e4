//! gopulse: watches Go processes' GC and stop-the-world pauses from outside,
//! with uprobes on the Go runtime, and serves Prometheus metrics.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;

use gopulse_agent::{
    bpf, caps,
    collector::{Collector, CycleSettings, SliceRule, TraceLine},
    discover::{
        Discovery, Naming, Selection,
        events::LifeEvents,
        pods::{ApiAccess, PodDirectory},
        selector::LabelSelector,
    },
    export::otlp::{HistogramKind, Otlp, OtlpConfig, OtlpProtocol},
    gctrace,
    governor::Budget,
    metrics::{self, LabelChoice},
    plan::{DEFAULT_MAP_METHODS, DEFAULT_PLUMBING, Plumbing},
    probes::{AccessMode, Probes, StatsMode, handoff},
    server::{self, App},
    storm::StormRule,
    watch::{Follow, watch},
};

/// Watches Go processes with eBPF uprobes and serves their GC and
/// stop-the-world pause metrics. Needs root, or CAP_BPF, CAP_PERFMON,
/// CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_LEASE, and CAP_SYS_ADMIN on a
/// kernel without uprobe_multi links (deploy/README.md).
#[derive(Debug, Parser)]
#[command(name = "gopulse", version, about, long_about = None,
          args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Say what gopulse makes of a Go executable (or a running process's):
    /// its Go release and build, where the struct offsets come from, every
    /// probe site and what it measures, or why it would not be watched.
    /// Needs no BPF. Exits 0 if it would be watched, 1 if not.
    Inspect(InspectArgs),
    /// Print the runtime's own GODEBUG=gctrace=1 line for each GC cycle of
    /// running Go processes that were started without it: the same fields,
    /// rounding and order, read from the runtime at the end of each cycle
    /// (a time-triggered cycle is preceded by "GC forced", as the runtime
    /// prints it). From attaching until the processes exit or Ctrl-C. Needs
    /// the agent's capabilities.
    Gctrace(GctraceArgs),
}

#[derive(Debug, clap::Args)]
struct GctraceArgs {
    /// The Go process to trace; repeat for several (each line then starts
    /// with its pid).
    #[arg(long = "pid", value_name = "PID", required = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    pids: Vec<u32>,
    /// One JSON object a cycle instead: every value at full precision
    /// (nanoseconds, bytes), what started the cycle (heap, time, forced)
    /// and, for a forced one, the Go function that called runtime.GC.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct InspectArgs {
    /// The executable to read.
    #[arg(value_name = "BINARY", required_unless_present = "pid")]
    binary: Option<std::path::PathBuf>,
    /// Read this process's executable instead.
    #[arg(long, value_name = "PID", conflicts_with = "binary",
          value_parser = clap::value_parser!(u32).range(1..))]
    pid: Option<u32>,
    /// Print JSON, with every field in full.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Process id of a Go program to watch (Go 1.21 to 1.27, linux/amd64).
    /// Repeat for several. A pid that cannot be watched is logged and
    /// skipped. Without --pid the agent watches every Go process it can
    /// see (run it in the host's pid namespace to see the node's).
    #[arg(long = "pid", value_name = "PID",
          value_parser = clap::value_parser!(u32).range(1..))]
    pids: Vec<u32>,

    /// Print the Go processes the agent would watch here, and why each
    /// other Go process would be skipped; then exit. Needs no BPF.
    #[arg(long)]
    list: bool,

    /// Watch only Go programs whose executable's file name matches this
    /// regular expression (discovery and --list).
    #[arg(long, value_name = "REGEX")]
    exe_regex: Option<regex_lite::Regex>,

    /// Watch only processes in pods of this namespace (repeatable; needs
    /// the Kubernetes API).
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,

    /// Watch only processes in pods whose labels match this Kubernetes
    /// label selector (`app=api,tier!=db`, `env in (prod,staging)`; needs
    /// the Kubernetes API).
    #[arg(long, value_name = "SELECTOR", value_parser = LabelSelector::parse)]
    pod_selector: Option<LabelSelector>,

    /// Most processes watched at once; Go processes beyond it are counted
    /// in gopulse_discovery_skipped_total{reason="limit"} and logged once.
    /// The kernel's per-process tables are sized for it (with --pid, for at
    /// least as many as are named).
    #[arg(long, value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_processes: u64,

    /// The optional labels series carry, comma-separated, from: pid,
    /// container_id, pod_uid, namespace, pod, container. Every series also
    /// has exe and go_version. Leave out pid on busy nodes (it churns with
    /// every restart); processes that then share all labels share series.
    #[arg(long, value_name = "LIST", default_value = LabelChoice::ALL,
          value_parser = LabelChoice::parse)]
    labels: LabelChoice,

    /// Name pods from the Kubernetes API (this node's pods only): `auto`
    /// (when running in a pod with a service account, or given
    /// --kubeconfig), `on` (fail if the API cannot be reached), `off`.
    #[arg(long, value_enum, default_value_t = KubeMode::Auto)]
    kubernetes: KubeMode,

    /// A kubeconfig to reach the Kubernetes API with, instead of the pod's
    /// service account.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<std::path::PathBuf>,

    /// This node's name, whose pods are watched (default: $NODE_NAME, set
    /// from the downward API in the DaemonSet, else the host name).
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,

    /// How often, in seconds, discovery rescans /proc for Go processes the
    /// kernel's exec events missed (it also rescans at once when events
    /// are lost), and watched processes are checked for a missed exit.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    rescan_interval: u64,

    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    listen: SocketAddr,

    /// Do not serve /metrics (only /healthz and /readyz): for nodes that
    /// only push OTLP.
    #[arg(long)]
    no_prometheus: bool,

    /// Push metrics over OTLP to this collector (a base URL such as
    /// http://127.0.0.1:4318, or :4317 with --otlp-protocol grpc). Without
    /// it, OTLP is on when OTEL_EXPORTER_OTLP_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_METRICS_ENDPOINT is set. Every export interval
    /// (OTEL_METRIC_EXPORT_INTERVAL, ms, default 60000) each watched process
    /// goes as its own resource; OTEL_RESOURCE_ATTRIBUTES is added to all.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// OTLP protocol (default: OTEL_EXPORTER_OTLP_METRICS_PROTOCOL or
    /// OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf).
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    otlp_protocol: Option<OtlpProtocol>,

    /// How histograms (pauses, load factors, attach delays) go out over OTLP
    /// (default: OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION,
    /// else exponential).
    #[arg(long, value_enum, value_name = "KIND")]
    otlp_histograms: Option<HistogramKind>,

    /// Most distinct map growth sites per process; growths at further sites
    /// are counted under site="other" (and in gopulse_map_sites_dropped_total).
    #[arg(long, value_name = "N",
          default_value_t = gopulse_agent::model::DEFAULT_MAX_SITES as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_map_sites: u64,

    /// A growth storm is more than this many map growths at one site within
    /// --storm-window-ms; each storm increments gopulse_map_growth_storms_total
    /// and logs one line.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    storm_growths: u64,

    /// A forced-GC storm is more than this many forced GC cycles (runtime.GC,
    /// debug.FreeOSMemory) at one site within --storm-window-ms (the
    /// default, 100 in 10 s, is 10 a second); each storm increments
    /// gopulse_gc_forced_storms_total and logs one line.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    gc_storm_cycles: u64,

    /// The window, in milliseconds, for --storm-growths.
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    storm_window_ms: u64,

    /// Probes on map assignment and deletion (runtime.mapassign*,
    /// mapdelete*): `off`; `sampled`: attached for --assign-window-ms every
    /// --assign-period-ms, and cut early when their estimated cost passes
    /// --overhead-budget; `always`: attached all the time, whatever the cost
    /// (a probe hit costs about 1 µs against tens of ns for an insert).
    #[arg(long, value_enum, default_value_t = AccessMode::Sampled)]
    map_assign_probes: AccessMode,

    /// How long the sampled assignment probes stay attached each period.
    #[arg(long, value_name = "MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    assign_window_ms: u64,

    /// The sampling period of the assignment probes: one window in each,
    /// the first at start-up, each later one at a random point of its
    /// period (so that bursts keeping time with the period are not missed
    /// every time).
    #[arg(long, value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    assign_period_ms: u64,

    /// The probe on slice growth (runtime.growslice, every append past a
    /// slice's capacity): `off`; `sampled`: attached for --slice-window-ms
    /// every --slice-period-ms (cut early when its cost passes
    /// --overhead-budget), its counts scaled to the whole period (an
    /// estimate: gopulse_slice_sample_ratio says on what); `always`:
    /// attached all the time, counts exact, whatever it costs.
    #[arg(long, value_enum, default_value_t = AccessMode::Sampled)]
    slice_probes: AccessMode,

    /// How long the sampled slice growth probe stays attached each period.
    #[arg(long, value_name = "MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    slice_window_ms: u64,

    /// The sampling period of the slice growth probe.
    #[arg(long, value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    slice_period_ms: u64,

    /// A slice growth storm is more than this many slice growths at one
    /// site within --storm-window-ms; each storm increments
    /// gopulse_slice_growth_storms_total and logs one line.
    #[arg(long, value_name = "N", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=u64::MAX))]
    slice_storm_growths: u64,

    /// Most CPU the growth probes, and separately the sampled assignment
    /// probes and the sampled slice growth probe, may cost a process on average, as a fraction of one CPU
    /// (hits times each probe's cost on this machine: its trap, timed at
    /// start-up, plus its run time from the kernel's BPF statistics). A
    /// group that spends its budget is detached: growth probes until it has
    /// refilled (gopulse_map_growth_probes_attached says so), sampled
    /// assignment probes until the next window (they may spend the budget's
    /// share of one window).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.01)]
    overhead_budget: f64,

    /// How long the budget is averaged over, in seconds: a burst may spend
    /// up to --overhead-budget × this at once (at the defaults 100 ms of CPU,
    /// some 50,000 growths) before anything is cut.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    overhead_window: u64,

    /// When to keep the kernel's BPF run-time statistics on, from which
    /// each probe's cost is measured: `sampled` (one second in thirty),
    /// `always`, or `off` (costs are then estimates). They are a switch for
    /// the whole host: while on, every BPF program on it pays two clock
    /// reads a run.
    #[arg(long, value_enum, default_value_t = StatsMode::Sampled)]
    bpf_stats: StatsMode,

    /// Log each anomaly the BPF programs meet (a failed read of the
    /// process's memory, a restart of the world without a seen stop, an
    /// implausible map header) from the kernel, through aya-log, as warn
    /// lines. Off, the verifier removes the logging code; the anomalies are
    /// counted either way (gopulse_bpf_anomalies_total).
    #[arg(long)]
    bpf_debug: bool,

    /// At start-up the agent checks it holds CAP_BPF and CAP_PERFMON (or
    /// CAP_SYS_ADMIN), CAP_SYS_PTRACE (other users' processes),
    /// CAP_DAC_READ_SEARCH (executables its user cannot read) and CAP_LEASE,
    /// and CAP_SYS_ADMIN where uprobes go in as perf-event uprobes (no
    /// uprobe_multi links): `enforce` refuses to start without them, naming
    /// each; `warn` logs what is missing and goes on.
    #[arg(long, value_enum, default_value_t = caps::CheckMode::Enforce)]
    capability_check: caps::CheckMode,

    /// A function-name prefix to walk past when looking for the site of a
    /// map growth, besides the runtime, reflect, encoding/*, maps, sync,
    /// the standard library's internal packages and the methods of its map
    /// types that fill their receiver (net/http.Header, net/textproto.MIMEHeader,
    /// net/url.Values): code that fills maps on its caller's behalf, such
    /// as a third-party decoder (`gopkg.in/yaml.v3.`). Repeatable.
    #[arg(long, value_name = "PREFIX")]
    site_skip: Vec<String>,

    /// A function-name prefix never walked past, even where a built-in
    /// prefix or --site-skip matches it: its functions are sites of their
    /// own (e.g. `net/http.Header.` to see growths in Header.Set as
    /// Header.Set's). Repeatable.
    #[arg(long, value_name = "PREFIX")]
    site_keep: Vec<String>,
    /// How uprobes are attached: `auto` (uprobe_multi links where the kernel
    /// has working ones, tried at start-up; else perf-event uprobes),
    /// `multi` (those links or refuse to start), `perf` (perf-event uprobes
    /// only). Default: $GOPULSE_UPROBE_MODE, else auto. For tests and for
    /// kernels whose multi links misbehave; DEVELOPERS.md says more.
    #[arg(long, value_enum, value_name = "MODE", hide = true)]
    uprobe_mode: Option<bpf::UprobeMode>,

    /// How often, in milliseconds, to fold kernel counters into the metrics.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    poll_interval_ms: u64,
}

fn main() -> ExitCode {
    // The helper a shutting-down agent leaves its probes to (see
    // `hand_off_links`).
    if let Some(fds) = std::env::var_os(handoff::CLOSE_LINKS) {
        return handoff::close_links(&fds.to_string_lossy());
    }
    gopulse_agent::memory::hold_mmap_threshold();
    let cli = Cli::parse();
    // gctrace's stdout is its lines: only what goes wrong on stderr.
    let quiet = matches!(cli.command, Some(Command::Gctrace(_)));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if quiet { "error" } else { "info" })
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (args, trace) = match cli.command {
        Some(Command::Inspect(a)) => return inspect(&a),
        Some(Command::Gctrace(a)) => match gctrace_args(&a) {
            Ok(args) => (args, Some(a.json)),
            Err(e) => {
                eprintln!("gopulse gctrace: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => (cli.args, None),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.list {
        runtime.block_on(list(args))
    } else {
        runtime.block_on(run(args, trace))
    };
    // Tasks still running (a connection that would not close, an export
    // that would not end) are not waited for.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The agent's settings for `gopulse gctrace`: the named processes, no
/// port, no sampled probes.
fn gctrace_args(a: &GctraceArgs) -> anyhow::Result<Args> {
    let mut argv: Vec<String> = [
        "gopulse",
        "--listen",
        "127.0.0.1:0",
        "--no-prometheus",
        "--map-assign-probes",
        "off",
        "--slice-probes",
        "off",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for pid in &a.pids {
        argv.extend(["--pid".to_owned(), pid.to_string()]);
    }
    Ok(Cli::try_parse_from(argv)?.args)
}

/// Prints each cycle's line as it comes, until the collector is dropped.
fn print_cycles(lines: std::sync::mpsc::Receiver<TraceLine>, json: bool, several: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for l in lines {
        let text = if json {
            gctrace::json(l.pid, &l.cycle, l.init_time, l.trigger, l.site.as_deref()).to_string()
        } else {
            let prefix = if several {
                format!("{}: ", l.pid)
            } else {
                String::new()
            };
            let mut t = String::new();
            if l.trigger == Some(gctrace::Trigger::Time) {
                t.push_str(&format!("{prefix}GC forced\n"));
            }
            t.push_str(&prefix);
            t.push_str(&gctrace::line(&l.cycle, l.init_time));
            t
        };
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return; // stdout closed
        }
    }
}

/// `gopulse inspect`.
fn inspect(a: &InspectArgs) -> ExitCode {
    let report = match gopulse_agent::commands::inspect::report(a.binary.as_deref(), a.pid) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gopulse inspect: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("gopulse inspect: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.text());
    }
    if report.watchable {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KubeMode {
    Auto,
    On,
    Off,
}

/// The pod directory, if the Kubernetes API is to be used and reachable.
async fn pod_directory(args: &Args) -> anyhow::Result<Option<PodDirectory>> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let wanted = match args.kubernetes {
        KubeMode::Off => false,
        KubeMode::On => true,
        KubeMode::Auto => in_cluster || args.kubeconfig.is_some(),
    };
    if !wanted {
        return Ok(None);
    }
    let node = match args
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
    {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("this node's name (give --node-name)")?
            .trim()
            .to_owned(),
    };
    let access = ApiAccess {
        kubeconfig: args.kubeconfig.clone(),
        node,
    };
    match PodDirectory::start(access).await {
        Ok(dir) => Ok(Some(dir)),
        Err(e) if args.kubernetes == KubeMode::Auto => {
            tracing::warn!("{e:#}; series carry container and pod ids, not pod names");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What discovery is to watch, from the flags; pods are looked up in
/// `pods`, which selecting by namespace or pod labels needs.
fn selection(args: &Args, pods: Option<PodDirectory>) -> anyhow::Result<Selection> {
    let select = Selection {
        exe: args.exe_regex.clone(),
        namespaces: args.namespaces.clone(),
        pod_selector: args.pod_selector.clone(),
        pods,
    };
    if select.by_pod() && select.pods.is_none() {
        anyhow::bail!(
            "--namespace and --pod-selector need the Kubernetes API (in a pod with a service \
             account, or --kubeconfig)"
        );
    }
    Ok(select)
}

/// `--list`.
async fn list(args: Args) -> anyhow::Result<()> {
    let pods = pod_directory(&args).await?;
    if let Some(dir) = &pods {
        dir.wait_ready(Duration::from_secs(10)).await;
    }
    let select = selection(&args, pods)?;
    let table = tokio::task::spawn_blocking(move || {
        let mut known = std::collections::HashMap::new();
        gopulse_agent::discover::list(select, |pid, exe| {
            gopulse_agent::watch::list_verdict(&mut known, pid, exe)
        })
    })
    .await
    .context("listing processes")?
    .context("listing processes")?;
    print!("{table}");
    Ok(())
}

/// The agent, or with `trace` (`Some(json)`) `gopulse gctrace`: the same
/// watching, each cycle's line printed, ending when the processes have.
async fn run(args: Args, trace: Option<bool>) -> anyhow::Result<()> {
    // The probes report pids of the host's namespace; /proc here would
    // name other ones (or none).
    if !gopulse_agent::procfs::in_host_pid_namespace().unwrap_or(true) {
        anyhow::bail!(
            "gopulse runs in a nested pid namespace, but its probes see the host's pids: run it \
             in the host's pid namespace (hostPID: true on Kubernetes, --pid=host with docker)"
        );
    }
    // Name a missing capability now rather than let it fail later as a
    // bare EPERM: what every way of attaching needs now, what the way the
    // kernel allows needs once it is known (after loading).
    let capability_check = |needs: Result<(), caps::CapError>| match (needs, args.capability_check)
    {
        (Ok(()), _) => Ok(()),
        (Err(e), caps::CheckMode::Enforce) => {
            Err(anyhow::Error::new(e).context("--capability-check enforce"))
        }
        (Err(e), caps::CheckMode::Warn) => {
            tracing::warn!("{e}; going on (--capability-check warn)");
            Ok(())
        }
    };
    capability_check(caps::check(None))?;
    let uprobe_mode = match args.uprobe_mode {
        Some(m) => m,
        None => bpf::UprobeMode::from_env()?,
    };
    if !(args.overhead_budget > 0.0 && args.overhead_budget <= 1.0) {
        anyhow::bail!(
            "--overhead-budget must be in (0, 1], got {}",
            args.overhead_budget
        );
    }
    if args.assign_window_ms > args.assign_period_ms {
        anyhow::bail!("--assign-window-ms must not exceed --assign-period-ms");
    }
    if args.slice_window_ms > args.slice_period_ms {
        anyhow::bail!("--slice-window-ms must not exceed --slice-period-ms");
    }
    if let Some(bad) = args.site_skip.iter().find(|p| p.is_empty()) {
        anyhow::bail!("--site-skip {bad:?}: a prefix must not be empty");
    }
    if let Some(bad) = args.site_keep.iter().find(|p| p.is_empty()) {
        anyhow::bail!("--site-keep {bad:?}: a prefix must not be empty");
    }
    let explicit_node = args
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok());
    let otlp = OtlpConfig::resolve(
        args.otlp_endpoint.clone(),
        args.otlp_protocol,
        args.otlp_histograms,
        explicit_node,
    )
    .context("OTLP configuration")?;
    // Bind first: a busy port should fail before anything is attached.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let pods = pod_directory(&args).await?;
    let select = selection(&args, pods.clone())?;
    if select.by_pod() {
        // Selecting by pod before the first list would filter every pod out.
        if let Some(dir) = &pods {
            dir.wait_ready(Duration::from_secs(10)).await;
        }
    }
    let naming = Naming {
        choice: args.labels,
        pods,
    };
    let max_processes =
        u32::try_from(args.max_processes.max(args.pids.len() as u64)).unwrap_or(u32::MAX);
    let (bpf, maps, life) = bpf::Bpf::load(max_processes, args.bpf_debug, uprobe_mode)?;
    capability_check(caps::check(Some(bpf.attacher().path())))?;
    let discovering = args.pids.is_empty();
    // Exec events with --pid too: a named process that runs exec must not
    // keep the series (or the counts) of the program it left.
    bpf.attacher().attach_lifecycle(true)?;
    let model = gopulse_agent::model::Model::new();
    let registry = gopulse_agent::export::prometheus::registry(&model);
    let metrics = metrics::Metrics::new(&model);
    let max_sites = usize::try_from(args.max_map_sites).unwrap_or(usize::MAX);
    let otlp = match otlp {
        Some(config) => {
            tracing::info!("OTLP: pushing to {}", config.describe());
            let config = config.with_max_sites(max_sites);
            Some(Otlp::new(&model, config).context("OTLP exporter")?)
        }
        None => None,
    };
    let discovery_metrics = metrics::DiscoveryMetrics::new(&model);
    let budget = Budget {
        fraction: args.overhead_budget,
        window: Duration::from_secs(args.overhead_window),
    };
    let access_budget = Budget {
        fraction: args.overhead_budget,
        window: Duration::from_millis(args.assign_window_ms),
    };
    let slice_budget = Budget {
        fraction: args.overhead_budget,
        window: Duration::from_millis(args.slice_window_ms),
    };
    let (probes, costs) = Probes::new(
        bpf,
        metrics.clone(),
        budget,
        (access_budget, args.map_assign_probes),
        (slice_budget, args.slice_probes),
        args.bpf_stats,
    );
    let collector = Collector::new(
        maps,
        metrics,
        costs,
        max_sites,
        StormRule {
            growths: args.storm_growths,
            window: Duration::from_millis(args.storm_window_ms),
        },
        SliceRule {
            sampled: args.slice_probes == AccessMode::Sampled,
            storm: StormRule {
                growths: args.slice_storm_growths,
                window: Duration::from_millis(args.storm_window_ms),
            },
        },
    );
    let mut collector = collector;
    let (sink, lines) = std::sync::mpsc::channel();
    collector.set_cycles(CycleSettings {
        storm: StormRule {
            growths: args.gc_storm_cycles,
            window: Duration::from_millis(args.storm_window_ms),
        },
        sink: trace.is_some().then_some(sink),
    });
    if let Some(json) = trace {
        let several = args.pids.len() > 1;
        std::thread::Builder::new()
            .name("gctrace".into())
            .spawn(move || print_cycles(lines, json, several))
            .context("starting the gctrace printer")?;
    }
    let app = Arc::new(App {
        collector: Mutex::new(collector),
        probes: Mutex::new(probes),
        registry,
        scanned: std::sync::atomic::AtomicBool::new(!discovering),
        binaries: Mutex::new(Default::default()),
    });
    tracing::debug!(
        plumbing = ?DEFAULT_PLUMBING,
        map_methods = ?DEFAULT_MAP_METHODS,
        extra = ?args.site_skip,
        keep = ?args.site_keep,
        "site walk"
    );
    let plumbing = Plumbing::with_keep(&args.site_skip, &args.site_keep);
    for &pid in &args.pids {
        app.with_collector(|c| c.request(pid));
        if let Err(e) = watch(&app, pid, &plumbing, &naming) {
            let hint = caps::target_hint(pid).map_or_else(String::new, |h| format!(" ({h})"));
            if trace.is_some() {
                anyhow::bail!("pid {pid}: cannot trace: {e:#}{hint}");
            }
            tracing::error!(pid, "pid {pid}: cannot watch: {e:#}{hint}");
            if gopulse_agent::procfs::start_time(pid).is_ok() {
                discovery_metrics.watch_failed(pid);
            }
        }
    }
    if discovering {
        tracing::info!(
            "no --pid: watching every Go process on this host (exec events, /proc rescans \
             every {}s)",
            args.rescan_interval
        );
    }
    let follow_app = app.clone();
    let follow = Follow {
        discovery: discovering.then(|| Discovery::new(select)),
        events: LifeEvents::new(life),
        pids: args.pids.clone(),
        max_processes: usize::try_from(args.max_processes).unwrap_or(usize::MAX),
        rescan_every: Duration::from_secs(args.rescan_interval),
        plumbing,
        naming,
        metrics: discovery_metrics,
    };
    std::thread::Builder::new()
        .name("follow".into())
        .spawn(move || gopulse_agent::watch::follow(&follow_app, follow))
        .context("starting the discovery thread")?;

    // The pauses the probes log: read four times a second (a process's
    // log holds 128), or every poll interval if that is shorter.
    let drain_app = app.clone();
    let drain_every = Duration::from_millis(args.poll_interval_ms.min(250));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(drain_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            drain_app.with_collector(|c| c.drain());
        }
    });

    // Housekeeping: kernel counters and tables; and, as a safety net for
    // a lost exit event, a check that watched processes still run (every
    // rescan interval: exits arrive as events).
    let house_app = app.clone();
    let period = Duration::from_millis(args.poll_interval_ms);
    let reap_every = Duration::from_secs(args.rescan_interval);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reaped = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            house_app.with_collector(|c| {
                c.drain();
                c.sync();
            });
            if reaped.elapsed() >= reap_every {
                house_app.reap();
                reaped = tokio::time::Instant::now();
            }
        }
    });

    // The budget, ten times a second (every 5 ms while probes spend), on
    // its own thread: it takes only the attach stage's lock, so collection
    // never delays it.
    // Opening a sampling window wakes it at once.
    let govern_app = app.clone();
    let (wake_governor, woken) = std::sync::mpsc::channel::<()>();
    let wake_for_slices = wake_governor.clone();
    std::thread::Builder::new()
        .name("governor".into())
        .spawn(move || {
            let mut next = gopulse_agent::probes::IDLE_CHECK;
            loop {
                if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                    woken.recv_timeout(next)
                {
                    std::thread::sleep(next);
                }
                let (n, jobs) = govern_app.with_probes(|p| p.govern());
                next = n;
                // Re-attaching can wait on the kernel for seconds: the
                // checks go on meanwhile.
                if !jobs.is_empty() {
                    let app = govern_app.clone();
                    let spawned = std::thread::Builder::new()
                        .name("reattach".into())
                        .spawn(move || app.run_jobs(jobs));
                    if let Err(e) = spawned {
                        tracing::warn!("re-attaching map growth probes: {e}");
                    }
                }
            }
        })
        .context("starting the governor thread")?;

    // Sampled assignment probes: a window every period, on a thread of its
    // own (attaching them waits on the kernel).
    if args.map_assign_probes == AccessMode::Sampled {
        let sample_app = app.clone();
        let window = Duration::from_millis(args.assign_window_ms);
        let period = Duration::from_millis(args.assign_period_ms);
        std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                // The first window opens at once (a new agent sees the
                // shapes of maps soon); the others at a random point of
                // their period (see WindowPhase).
                let mut phase = gopulse_agent::probes::WindowPhase::new(
                    gopulse_agent::probes::WindowPhase::seed(),
                );
                let mut first = true;
                loop {
                    let start = std::time::Instant::now();
                    if !std::mem::take(&mut first) {
                        std::thread::sleep(phase.lead(period, window));
                    }
                    let jobs = sample_app.with_probes(|p| p.open_window());
                    sample_app.run_jobs(jobs);
                    let _ = wake_governor.send(());
                    std::thread::sleep(window);
                    sample_app.with_probes(|p| p.close_window());
                    sample_app.with_collector(|c| c.sync());
                    if let Some(rest) =
                        (start + period).checked_duration_since(std::time::Instant::now())
                    {
                        std::thread::sleep(rest);
                    }
                }
            })
            .context("starting the sampling thread")?;
    }

    // The sampled slice growth probe: a window every period, on a thread
    // of its own; each closed window's counts are scaled and folded in.
    if args.slice_probes == AccessMode::Sampled {
        let sample_app = app.clone();
        let window = Duration::from_millis(args.slice_window_ms);
        let period = Duration::from_millis(args.slice_period_ms);
        std::thread::Builder::new()
            .name("slice-sampler".into())
            .spawn(move || {
                loop {
                    let start = std::time::Instant::now();
                    let jobs = sample_app.with_probes(|p| p.open_slice_window());
                    sample_app.run_jobs(jobs);
                    let _ = wake_for_slices.send(());
                    std::thread::sleep(window);
                    let samples = sample_app.with_probes(|p| p.close_slice_window());
                    sample_app.with_collector(|c| {
                        c.sync();
                        c.fold_slice_samples(&samples);
                    });
                    if let Some(rest) =
                        (start + period).checked_duration_since(std::time::Instant::now())
                    {
                        std::thread::sleep(rest);
                    }
                }
            })
            .context("starting the slice sampling thread")?;
    }

    // OTLP: an export every interval, with fresh counters; a last one at
    // shutdown.
    let stop_otlp = Arc::new(tokio::sync::Notify::new());
    let otlp_task = otlp.map(|mut otlp| {
        let (otlp_app, stop) = (app.clone(), stop_otlp.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(otlp.interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    _ = stop.notified() => true,
                };
                otlp_app.with_collector(|c| {
                    c.drain();
                    c.sync();
                });
                otlp.export().await;
                if stopping {
                    otlp.shutdown();
                    return;
                }
            }
        })
    });

    let local = listener.local_addr().context("listener address")?;
    if args.no_prometheus {
        tracing::info!("serving http://{local}/healthz and /readyz (--no-prometheus)");
    } else {
        tracing::info!("serving http://{local}/metrics");
    }
    // Shutdown, from the first SIGTERM or SIGINT, all at once: open
    // requests get HTTP_DRAIN, probes are detached, OTLP makes its last
    // export, the agent's parts within SHUTDOWN. A second signal meanwhile
    // ends the process.
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel();
    let (detach_app, stop_otlp_now) = (app.clone(), stop_otlp.clone());
    let gone_app = app.clone();
    let stop = async move {
        // gctrace ends with its processes too.
        let all_gone = async {
            if trace.is_none() {
                return std::future::pending().await;
            }
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if gone_app.with_collector(|c| c.count()) == 0 {
                    gone_app.with_collector(|c| c.drain());
                    return tokio::time::Instant::now();
                }
            }
        };
        let at = tokio::select! {
            at = shutdown_signal() => at,
            at = all_gone => at,
        };
        // Off the async workers: without the helper, closing a uprobe waits
        // out the kernel's RCU grace period (seconds on a loaded machine),
        // and a worker must stay free to see a second signal.
        let detaching = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let helper = handoff::hand_off_links();
            let n = detach_app.with_probes(|p| p.detach_all());
            let ms = started.elapsed().as_millis();
            match helper {
                Ok(helper) => tracing::info!(
                    helper,
                    "detached {n} uprobes in {ms} ms (a helper, pid {helper}, closes the agent's \
                     BPF links: the kernel removes each uprobe after an RCU grace period)"
                ),
                Err(e) => tracing::info!("detached {n} uprobes in {ms} ms (no helper: {e:#})"),
            }
        });
        stop_otlp_now.notify_one();
        let _ = signalled_tx.send((at, detaching));
    };
    server::serve(
        listener,
        server::router(app.clone(), !args.no_prometheus),
        server::Limits::default(),
        stop,
        HTTP_DRAIN,
    )
    .await
    .context("HTTP server")?;
    let (signalled, detaching) = signalled_rx
        .await
        .context("the HTTP server stopped without a signal")?;
    let deadline = signalled + SHUTDOWN;
    let last_export = async {
        if let Some(mut task) = otlp_task {
            // A collector that does not answer must not hold the exit up.
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(_) => tracing::info!("OTLP: last export done"),
                Err(_) => {
                    task.abort();
                    tracing::warn!(
                        "OTLP: the last export did not finish within {SHUTDOWN:?} of the \
                         signal; dropped"
                    );
                }
            }
        }
    };
    let (detached, ()) = tokio::join!(detaching, last_export);
    if let Err(e) = detached {
        tracing::warn!("detaching probes: {e}");
    }
    tracing::info!("shut down in {:.0?} after the signal", signalled.elapsed());
    Ok(())
}

/// From the first signal to the exit, for the agent's own work: requests in
/// flight and the last OTLP export (the promise is 2 s; the rest is the
/// process's own teardown).
const SHUTDOWN: Duration = Duration::from_millis(1800);
/// How long requests in flight may take to finish after the signal.
const HTTP_DRAIN: Duration = Duration::from_millis(300);

/// Waits for SIGTERM or SIGINT and returns when it came; from then on a
/// second one ends the process at once, nonzero (128 + its number, as a
/// shell reports a death by signal), whatever shutdown is doing.
async fn shutdown_signal() -> tokio::time::Instant {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            // Without handlers the signals keep their default action: they
            // still stop the agent, only without a clean shutdown.
            tracing::warn!("listening for SIGTERM and SIGINT: {e}; they will kill the agent");
            return std::future::pending().await;
        }
    };
    async fn next(
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> (&'static str, i32) {
        tokio::select! {
            _ = term.recv() => ("SIGTERM", 128 + libc::SIGTERM),
            _ = int.recv() => ("SIGINT", 128 + libc::SIGINT),
        }
    }
    let (name, _) = next(&mut term, &mut int).await;
    let at = tokio::time::Instant::now();
    tracing::info!("{name}: shutting down (another SIGTERM or SIGINT exits at once)");
    tokio::spawn(async move {
        let (name, code) = next(&mut term, &mut int).await;
        tracing::error!("{name} during shutdown: exiting at once with status {code}");
        std::process::exit(code);
    });
    at
}
