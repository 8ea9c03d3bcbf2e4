//! `cargo xtask test`: setup, formatting, lints, then every test with the
//! real-BPF integration tests required to run (not skipped), then a minute
//! of fuzzing the binary parser; and the real-BPF tests again inside QEMU
//! guests booted on Debian's kernels (`--kernel`).
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    fuzz::{DEFAULT_SECONDS, fuzz},
    guest::{GuestRun, GuestTest},
    kernels::{GUEST_KERNELS, GuestKernel, guest_kernel, unpacked},
    project::{EBPF_TOOLCHAIN, cargo, fmt_elapsed, is_root, run, workspace_root},
    setup::setup,
};

/// What runs in every guest (issue 11): GC accuracy on a classic and a
/// swiss build, map growths per site exact (two releases, both assignment
/// probe modes, stripped and not), discovery, and least privilege.
const GUEST_TESTS: &[(&str, &[&str])] = &[
    (
        "gc_accuracy",
        &["gc_go1_23_stripped_classic", "gc_go1_27_stripped_swiss"],
    ),
    ("map_growth", &["growth_go1_23", "growth_go1_27"]),
    ("discovery", &["finds_running_and_new_go_processes"]),
    // Which way uprobes go in, and the capabilities that takes, depend on
    // the kernel (issue 21).
    (
        "least_privilege",
        &["agent_needs_exactly_the_daemonsets_capabilities"],
    ),
];

/// Names test binaries to run in the guests instead of `GUEST_TESTS`.
const GUEST_TESTS_ENV: &str = "GOPULSE_GUEST_TESTS";

/// The counting tests run a second time on the host with perf-event
/// uprobes forced (`GOPULSE_UPROBE_MODE=perf`): GC exact, growths per site
/// exact, and a shutdown in a storm leaving nothing in the kernel.
const PERF_PATH_TESTS: &[&str] = &["gc_accuracy", "map_growth", "shutdown"];

/// Under single-threaded TCG a probe hit costs 15-20 times what it costs
/// natively (issue 11). The tests' latency bounds (e.g. discovery's "attached
/// within 1 s") are scaled by this in the guest; counts stay exact.
const GUEST_SLOWDOWN: &str = "20";

/// One guest boot with every test must end within this.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);

/// Which kernels a run covers.
struct Plan {
    host: bool,
    guests: Vec<&'static GuestKernel>,
}

fn plan(kernels: &[String]) -> Result<Plan> {
    if kernels.is_empty() {
        return plan(&["host".to_owned(), "6.1".to_owned()]);
    }
    let mut p = Plan {
        host: false,
        guests: Vec::new(),
    };
    for k in kernels {
        match k.as_str() {
            "host" => p.host = true,
            "all" => {
                p.host = true;
                p.guests = GUEST_KERNELS.iter().collect();
            }
            name => match guest_kernel(name) {
                Some(g) if !p.guests.iter().any(|x| x.name == g.name) => p.guests.push(g),
                Some(_) => {}
                None => bail!(
                    "--kernel {name}: not a kernel the tests run on; choose host, {}, or all",
                    GUEST_KERNELS
                        .iter()
                        .map(|g| g.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }
    Ok(p)
}

pub fn test(cache: &Path, kernels: &[String], extra: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask test needs root: the integration tests load BPF programs and attach uprobes"
        );
    }
    let plan = plan(kernels)?;
    let mut timings = Vec::new();
    let result = stages(cache, &plan, extra, &mut timings);
    println!("\ntest: stage times");
    for (name, elapsed, ok) in &timings {
        let outcome = if *ok { "ok" } else { "FAILED" };
        println!("  {name:<24} {:>8}  {outcome}", fmt_elapsed(*elapsed));
    }
    result
}

type Timings = Vec<(String, std::time::Duration, bool)>;

fn stages(cache: &Path, plan: &Plan, extra: &[String], timings: &mut Timings) -> Result<()> {
    let mut stage = |name: &str, f: &dyn Fn() -> Result<()>| {
        println!("\ntest: == {name} ==");
        let started = Instant::now();
        let result = f();
        timings.push((name.to_owned(), started.elapsed(), result.is_ok()));
        result.map_err(|err| err.context(format!("cargo xtask test: stage `{name}` failed")))
    };
    stage("setup", &|| setup(cache))?;
    if plan.host {
        stage("fmt", &|| {
            run(cargo(cache)?.args(["fmt", "--all", "--", "--check"]))
        })?;
        // `--workspace` ignores default-members: the eBPF crate (a host build
        // hits its compile_error!) is excluded and linted for its own target.
        stage("clippy", &|| {
            run(cargo(cache)?
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "gopulse-ebpf",
                    "--all-targets",
                ])
                .args(["--", "-D", "warnings"]))
        })?;
        stage("clippy (BPF target)", &|| ebpf_clippy(cache))?;
        stage("cargo test", &|| {
            run(cargo(cache)?
                .args(["test", "--workspace", "--exclude", "gopulse-ebpf"])
                .args(extra)
                // Tests that need root, BPF or the Go toolchains fail instead of
                // skipping.
                .env("GOPULSE_REQUIRE_BPF", "1"))
        })?;
        // The host has uprobe_multi links, which the run above used: the
        // counting tests again on the fallback, perf-event uprobes (issue
        // 21), so that both paths stay tested here (6.1 has only that one).
        if extra.is_empty() {
            stage("cargo test (perf-event uprobes)", &|| {
                let mut cmd = cargo(cache)?;
                cmd.args(["test", "-p", "gopulse-agent"]);
                for t in PERF_PATH_TESTS {
                    cmd.args(["--test", t]);
                }
                run(cmd
                    .env("GOPULSE_REQUIRE_BPF", "1")
                    .env("GOPULSE_UPROBE_MODE", "perf"))
            })?;
        }
    }
    for kernel in &plan.guests {
        stage(&format!("kernel {} (QEMU)", kernel.name), &|| {
            guest_tests(cache, kernel)
        })?;
    }
    if plan.host {
        stage("fuzz", &|| fuzz(cache, DEFAULT_SECONDS))?;
    }
    Ok(())
}

/// Builds the guest's test binaries (nothing to do after the host's
/// `cargo test`) and runs them in a guest on `kernel`.
fn guest_tests(cache: &Path, kernel: &GuestKernel) -> Result<()> {
    let unpacked = unpacked(cache, kernel).with_context(|| {
        format!(
            "kernel {} is not in the cache: run cargo xtask setup",
            kernel.name
        )
    })?;
    // GOPULSE_GUEST_TESTS=a,b: those test binaries, every test in them
    // printing its output, instead of the list (a one-off measurement on a
    // guest's kernel, e.g. uprobe_paths).
    let chosen = std::env::var(GUEST_TESTS_ENV).ok();
    let list: Vec<(String, Vec<String>)> = match &chosen {
        Some(names) => names
            .split(',')
            .map(|n| {
                let args = ["--test-threads", "1", "--nocapture"];
                (n.trim().to_owned(), args.map(String::from).to_vec())
            })
            .collect(),
        None => GUEST_TESTS
            .iter()
            .map(|(n, filters)| {
                let args = ["--exact", "--test-threads", "1"].iter().chain(*filters);
                ((*n).to_owned(), args.map(|a| (*a).to_owned()).collect())
            })
            .collect(),
    };
    let exes = test_binaries(cache, list.iter().map(|(n, _)| n.as_str()))?;
    let agent_dir = workspace_root().join("agent");
    let tests: Vec<GuestTest> = list
        .into_iter()
        .map(|(name, args)| {
            let exe = exes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, e)| e.clone())
                .with_context(|| format!("cargo built no test binary {name}"))?;
            Ok(GuestTest {
                name,
                exe,
                args,
                cwd: agent_dir.clone(),
            })
        })
        .collect::<Result<_>>()?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let env = [
        ("HOME", home),
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ),
        ("GOPULSE_CACHE", cache.to_string_lossy().into_owned()),
        ("GOPULSE_REQUIRE_BPF", "1".to_owned()),
        ("GOPULSE_TEST_SLOWDOWN", GUEST_SLOWDOWN.to_owned()),
        ("RUST_BACKTRACE", "1".to_owned()),
    ];
    println!(
        "test: booting {} ({}) under QEMU TCG; latency bounds scaled by {GUEST_SLOWDOWN} \
         (GOPULSE_TEST_SLOWDOWN), counts exact; the overhead governor keeps its default budget \
         and the tests fail if it cuts a probe they count with",
        unpacked.package, kernel.why
    );
    crate::guest::run(
        &GuestRun {
            label: kernel.name,
            kernel: &unpacked,
            tests: &tests,
            env: &env,
            agent: &workspace_root().join("target/debug/gopulse"),
            timeout: GUEST_TIMEOUT,
        },
        &workspace_root().join("target").join("guest"),
    )
}

/// The named integration test binaries of the agent, built (or found up
/// to date) by cargo.
fn test_binaries<'a>(
    cache: &Path,
    names: impl Iterator<Item = &'a str>,
) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo(cache)?;
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json",
        "-p",
        "gopulse-agent",
    ]);
    for n in names {
        cmd.args(["--test", n]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("could not run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact"
            || !msg["profile"]["test"].as_bool().unwrap_or(false)
        {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

/// The eBPF crate is not a default member and only builds for the BPF
/// target, so lint it the way aya-build compiles it.
fn ebpf_clippy(cache: &Path) -> Result<()> {
    run(cargo(cache)?
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args([
            "clippy",
            "-p",
            "gopulse-ebpf",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--release", "--", "-D", "warnings"])
        .env("CARGO_CFG_BPF_TARGET_ARCH", "x86_64")
        .env("RUSTFLAGS", r#"--cfg bpf_target_arch="x86_64""#)
        // The caller's toolchain choice must not override `+nightly`.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO_ENCODED_RUSTFLAGS"))
}
