//! `cargo xtask test`: setup, formatting, lints, then every test with the
//! real-BPF integration tests required to run (not skipped), then a minute
//! of fuzzing the binary parser.
use std::{path::Path, time::Instant};

use anyhow::{Result, bail};

use crate::{
    fuzz::{DEFAULT_SECONDS, fuzz},
    project::{EBPF_TOOLCHAIN, cargo, fmt_elapsed, is_root, run},
    setup::setup,
};

pub fn test(cache: &Path, extra: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask test needs root: the integration tests load BPF programs and attach uprobes"
        );
    }
    let mut timings = Vec::new();
    let result = stages(cache, extra, &mut timings);
    println!("\ntest: stage times");
    for (name, elapsed, ok) in &timings {
        let outcome = if *ok { "ok" } else { "FAILED" };
        println!("  {name:<24} {:>8}  {outcome}", fmt_elapsed(*elapsed));
    }
    result
}

type Timings = Vec<(&'static str, std::time::Duration, bool)>;

fn stages(cache: &Path, extra: &[String], timings: &mut Timings) -> Result<()> {
    let mut stage = |name: &'static str, f: &dyn Fn() -> Result<()>| {
        println!("\ntest: == {name} ==");
        let started = Instant::now();
        let result = f();
        timings.push((name, started.elapsed(), result.is_ok()));
        result.map_err(|err| err.context(format!("cargo xtask test: stage `{name}` failed")))
    };
    stage("setup", &|| setup(cache))?;
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
    stage("fuzz", &|| fuzz(cache, DEFAULT_SECONDS))?;
    Ok(())
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
