//! `cargo xtask fuzz`: runs the `cargo fuzz` target of gopulse-inspect
//! (`inspect/fuzz`) for a bounded time, from committed seeds plus seeds made
//! from freshly built Go binaries. A crash fails the task and says how to
//! keep the input as a regression test.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    compact::compact,
    project::{
        EBPF_TOOLCHAIN, cargo, cargo_fuzz_bin_dir, describe, fmt_elapsed, go_binary, go_build,
        path_with_bpf_linker, target_dir, workspace_root,
    },
};

/// How long `cargo xtask fuzz` fuzzes by default, and at most under
/// `cargo xtask test`.
pub const DEFAULT_SECONDS: u64 = 60;
/// The functions the agent asks for (`inspect/fuzz/fuzz_targets/inspect.rs`
/// has the same list).
const WANTED: &[&str] = &[
    "runtime.stopTheWorldWithSema",
    "runtime.startTheWorldWithSema",
    "runtime.gcMarkTermination",
    "runtime.mapassign",
];
/// Releases the generated seeds are built with: the newest, and the oldest
/// (whose pclntab still records where text starts).
const SEED_GO_VERSIONS: &[&str] = &["1.27.3", "1.21.13"];
/// libFuzzer's largest input. Whole Go binaries (2-4 MB) stay out of the
/// corpus: the parser runs under 100 times a second on one (it walks every
/// function in pclntab, and all of the DWARF), and nearly every mutation
/// lands in bytes it never reads. Their compact copies (`compact.rs`, 9 to
/// 15 KB, which the parser accepts all the way) run thousands of times a
/// second, with every mutation in a table the parser reads. The limit
/// leaves mutations room to grow inputs past the largest seed (64 KiB).
/// What this gives up: the parts of the binaries the compact copies drop
/// (the rest of pclntab and DWARF, moduledata) are fuzzed only through
/// the prefixes and mutations; the agent's tests parse whole binaries.
const MAX_LEN: usize = 128 << 10;
/// One input taking longer than this is a hang: libFuzzer reports it.
const INPUT_TIMEOUT_SECS: u64 = 10;
const RSS_LIMIT_MB: u64 = 4096;

fn fuzz_dir() -> PathBuf {
    workspace_root().join("inspect").join("fuzz")
}

fn artifacts_dir() -> PathBuf {
    target_dir().join("fuzz-artifacts").join("inspect")
}

/// Builds the seeds, then fuzzes for `seconds`.
pub fn fuzz(cache: &Path, seconds: u64) -> Result<()> {
    let corpus = target_dir().join("fuzz-corpus").join("inspect");
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let started = Instant::now();
    let count = generate_seeds(cache, &corpus)?;
    println!(
        "fuzz: {count} generated seeds in {} ({})",
        corpus.display(),
        fmt_elapsed(started.elapsed())
    );

    let artifacts = artifacts_dir();
    fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    let before = list(&artifacts)?;
    let mut cmd = fuzz_command(cache)?;
    // New inputs go to the first directory: the generated one, not the
    // committed seeds.
    cmd.args(["fuzz", "run", "--target-dir"])
        .arg(target_dir().join("fuzz"))
        .arg("inspect")
        .arg(&corpus)
        .arg(fuzz_dir().join("seeds"))
        .arg(fuzz_dir().join("regressions"))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1");
    println!("fuzz: {}", describe(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", describe(&cmd)))?;
    if status.success() {
        return Ok(());
    }
    let new: Vec<PathBuf> = list(&artifacts)?.difference(&before).cloned().collect();
    if new.is_empty() {
        bail!(
            "{} failed ({status}) without writing an input to {}",
            describe(&cmd),
            artifacts.display()
        );
    }
    for input in &new {
        println!("\nfuzz: the parser fails on {}", input.display());
    }
    let fuzz_path = cargo_fuzz_bin_dir(cache);
    println!(
        "\nfuzz: to turn it into a regression test, copy it into inspect/fuzz/regressions/ \
         under a name that says what it is, fix the parser, and check with\n\
         \n    cargo test -p gopulse-inspect --test fuzz_regressions\n\
         \nReproduce or minimize one input (cargo-fuzz is in {}):\n\
         \n    cd inspect && cargo +{EBPF_TOOLCHAIN} fuzz run inspect PATH\
         \n    cd inspect && cargo +{EBPF_TOOLCHAIN} fuzz tmin inspect PATH",
        fuzz_path.display()
    );
    bail!("the fuzzer found {} failing input(s)", new.len())
}

/// `cargo +<nightly>` in `inspect/` with cargo-fuzz on `PATH`. cargo-fuzz
/// builds with `-Z` flags, so the pinned nightly rather than stable.
fn fuzz_command(cache: &Path) -> Result<Command> {
    let mut dirs = vec![cargo_fuzz_bin_dir(cache)];
    dirs.extend(std::env::split_paths(&path_with_bpf_linker(cache)?));
    let path = std::env::join_paths(dirs).context("PATH contains a directory with ':' in it")?;
    let mut cmd = cargo(cache)?;
    cmd.arg(format!("+{EBPF_TOOLCHAIN}"))
        .current_dir(workspace_root().join("inspect"))
        .env("PATH", path)
        // The caller's toolchain choice must not override `+nightly`.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    Ok(cmd)
}

fn list(dir: &Path) -> Result<BTreeSet<PathBuf>> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    entries
        .map(|e| Ok(e?.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))
}

/// Builds the `gcload` fixture with each seed release, unstripped and
/// stripped, and writes its seeds to `corpus`. Returns how many.
fn generate_seeds(cache: &Path, corpus: &Path) -> Result<usize> {
    let bin_dir = target_dir().join("fuzz-corpus").join("bin");
    fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let mut count = 0;
    for go in SEED_GO_VERSIONS {
        // Uncompressed DWARF, which the compact copy keeps a part of.
        for (suffix, flags) in [("", "-compressdwarf=false"), ("-stripped", "-s -w")] {
            let name = format!("go{go}{suffix}");
            let bin = bin_dir.join(format!("gcload-{name}"));
            build_gcload(cache, go, &[&format!("-ldflags={flags}")], &bin)?;
            let data = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
            for (label, seed) in seeds(&data) {
                if label == "compact"
                    && let Err(err) = gopulse_inspect::inspect_bytes(&seed, WANTED)
                {
                    println!(
                        "fuzz: warning: the parser rejects the compact {name} seed, \
                         so fuzzing starts shallower: {err}"
                    );
                }
                let path = corpus.join(format!("{name}-{label}"));
                fs::write(&path, seed).with_context(|| format!("writing {}", path.display()))?;
                count += 1;
            }
        }
    }
    Ok(count)
}

/// The seeds one Go binary gives (label, bytes), each at most `MAX_LEN`.
fn seeds(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    match compact(data, WANTED) {
        Ok(small) => {
            // Without section headers the parser scans the segments for
            // build info and pclntab.
            let mut headerless = small.clone();
            drop_section_headers(&mut headerless);
            seeds.push(("compact".to_owned(), small));
            seeds.push(("compact-headerless".to_owned(), headerless));
        }
        // The parser changes; the seeds that still work are worth a run.
        Err(err) => println!("fuzz: warning: no compact seed: {err:#}"),
    }
    // Prefixes: the ELF header and program headers, then the first text.
    // Go puts section headers last, so a prefix has none: with the header
    // fields that point at them cleared, the parser scans the segments.
    for (label, len) in [("1k", 1 << 10), ("4k", 4 << 10), ("64k", 64 << 10)] {
        let mut prefix = data[..len.min(data.len())].to_vec();
        drop_section_headers(&mut prefix);
        seeds.push((format!("{label}-headerless"), prefix));
    }
    seeds
}

/// Clears `e_shoff`, `e_shnum` and `e_shstrndx` of an ELF64 header.
fn drop_section_headers(elf: &mut [u8]) {
    for field in [0x28..0x30, 0x3c..0x3e, 0x3e..0x40] {
        if let Some(bytes) = elf.get_mut(field) {
            bytes.fill(0);
        }
    }
}

fn build_gcload(cache: &Path, go: &str, args: &[&str], out: &Path) -> Result<()> {
    let go_bin = go_binary(cache, go);
    if !go_bin.exists() {
        bail!(
            "Go {go} is not installed ({} is missing); run `cargo xtask setup`",
            go_bin.display()
        );
    }
    let fixture = workspace_root().join("agent/tests/fixtures/gcload");
    let mut cmd = go_build(cache, &go_bin, &fixture, out);
    cmd.args(args).arg(".");
    let output = cmd
        .output()
        .with_context(|| format!("could not start {}", describe(&cmd)))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}):\n{}",
            describe(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
