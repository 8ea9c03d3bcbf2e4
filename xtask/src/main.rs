//! gopulse's developer tasks, run as `cargo xtask <command>`.
mod bench;
mod codegen;
mod compact;
mod demo;
mod fuzz;
mod guest;
mod histogram;
mod http;
mod kernels;
mod managed;
mod monitoring;
mod openmetrics;
mod project;
mod screenshots;
mod setup;
mod signal;
mod summary;
mod test;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "gopulse's developer tasks",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and tests need (idempotent): the pinned nightly,
    /// bpf-linker, Debian packages, Go toolchains.
    Setup,
    /// Setup, then fmt, clippy and every test including the real-BPF
    /// integration tests (root). Args after `--` go to `cargo test`.
    Test {
        /// Kernels to run the real-BPF tests on: `host` (this machine's:
        /// fmt, clippy, every test, fuzzing), `6.1` or `6.12` (Debian's
        /// kernels booted under QEMU, running the GC, map-growth and
        /// discovery tests), or `all`. Repeatable; default `host` and `6.1`.
        #[arg(long = "kernel", value_name = "K")]
        kernels: Vec<String>,
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run the agent on a bundled Go workload and print a live summary (root).
    Demo {
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long, value_name = "SECS")]
        duration: Option<u64>,
        /// Address the agent serves /metrics on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
        listen: String,
        /// Go release to build the workload with.
        #[arg(long, value_name = "VERSION", default_value = "1.27.3")]
        go: String,
    },
    /// Setup, then fuzz the binary parser (gopulse-inspect) from seed
    /// inputs; fails on any crash.
    Fuzz {
        /// How long to fuzz.
        #[arg(long, value_name = "N", default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
    },
    /// Benchmarks (root): what the agent costs the programs it watches.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// Pictures of the Grafana dashboards' panels (docs/img/*.png), drawn
    /// from a live Prometheus scraping the agent on the demo workload (root).
    Screenshots {
        /// How long to collect data before drawing.
        #[arg(long, value_name = "N", default_value_t = 3)]
        minutes: u64,
    },
    /// Regenerate checked-in source from the Go toolchains in the cache.
    Codegen {
        #[command(subcommand)]
        what: Codegen,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// A map-heavy Go program without the agent and with it, alternating:
    /// per-phase throughput ratios and the cost per probe hit.
    Overhead(bench::OverheadArgs),
    /// What one hit of each BPF program costs here: kernel run time, and
    /// the whole cost from a Go loop on the probed path, with and without
    /// the agent, classic and swiss builds.
    Probes(bench::ProbesArgs),
    /// What a node's churn of non-Go programs costs the agent in node mode:
    /// its CPU idle and during a paced storm of /bin/true execs, and what
    /// its discovery metrics counted.
    ExecStorm(bench::ExecStormArgs),
}

#[derive(Subcommand)]
enum Codegen {
    /// `inspect/src/offsets_table.rs`: runtime struct field offsets per Go
    /// release, from the DWARF of a fixture built with each toolchain.
    Offsets {
        /// Fail if the file differs from what would be generated; write nothing.
        #[arg(long)]
        check: bool,
    },
    /// `dashboards/*.json` (the Grafana dashboards, from
    /// xtask/src/monitoring.rs) and the PrometheusRule made of
    /// deploy/prometheus/gopulse-rules.yml.
    Monitoring {
        /// Fail if a file differs from what would be generated; write nothing.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> Result<()> {
    let cache = project::cache_dir()?;
    match command {
        Cmd::Setup => setup::setup(&cache),
        Cmd::Test {
            kernels,
            cargo_test_args,
        } => test::test(&cache, &kernels, &cargo_test_args),
        Cmd::Demo {
            duration,
            listen,
            go,
        } => demo::demo(
            &cache,
            &demo::DemoArgs {
                duration,
                listen,
                go,
            },
        ),
        Cmd::Fuzz { seconds } => {
            setup::setup(&cache)?;
            fuzz::fuzz(&cache, seconds)
        }
        Cmd::Bench {
            what: Bench::Overhead(args),
        } => bench::overhead(&cache, &args),
        Cmd::Bench {
            what: Bench::Probes(args),
        } => bench::probes(&cache, &args),
        Cmd::Bench {
            what: Bench::ExecStorm(args),
        } => bench::exec_storm(&cache, &args),
        Cmd::Screenshots { minutes } => screenshots::screenshots(&cache, minutes),
        Cmd::Codegen {
            what: Codegen::Offsets { check },
        } => codegen::offsets(&cache, check),
        Cmd::Codegen {
            what: Codegen::Monitoring { check },
        } => monitoring::generate(check),
    }
}
