//! Builds the eBPF object with the pinned nightly and bpf-linker, as
//! aya-template does; `src/bpf.rs` embeds the result.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The nightly the eBPF side is built with; `cargo xtask setup` installs it
/// with rust-src, and bpf-linker against its LLVM. Keep in sync with
/// `xtask/src/setup.rs`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("GOPULSE_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("gopulse"));
    }
    env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("gopulse"))
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=GOPULSE_CACHE");
    // bpf-linker lives in the project's cache unless the user installed one.
    if let Some(cache) = cache_dir() {
        let bin = cache.join("bpf-linker").join("bin");
        if bin.join("bpf-linker").exists() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![bin];
            dirs.extend(env::split_paths(&path));
            let joined = env::join_paths(dirs).context("PATH")?;
            // SAFETY: build scripts are single-threaded here.
            unsafe { env::set_var("PATH", joined) };
        }
    }
    let in_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").exists()))
        .unwrap_or(false);
    if !in_path && env::var_os("AYA_BUILD_SKIP").is_none() {
        return Err(anyhow!(
            "bpf-linker not found: run `cargo xtask setup` (it builds bpf-linker against \
             {EBPF_TOOLCHAIN}'s LLVM into the gopulse cache)"
        ));
    }
    let manifest = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = PathBuf::from(manifest).join("..").join("ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    let (result, directives) = capture_stdout(&out_dir.join("aya-build.out"), || {
        aya_build::build_ebpf(
            [Package {
                name: "gopulse-ebpf",
                root_dir: ebpf_dir,
                ..Default::default()
            }],
            Toolchain::Custom(EBPF_TOOLCHAIN),
        )
    })?;
    // aya-build relays every line the nested cargo prints as a
    // `cargo:warning`, its progress too: dozens of `warning:` lines on a
    // first build that read as trouble. Progress is held back unless the
    // build failed; the BPF crate's own diagnostics always pass.
    for line in directives.lines() {
        let progress = line
            .strip_prefix("cargo:warning=")
            .is_some_and(is_cargo_progress);
        if result.is_err() || !progress {
            println!("{line}");
        }
    }
    result
}

/// Whether a line is cargo's progress (`   Compiling foo v1.0`, ` Downloading
/// crates ...`): a capitalised status word right-aligned in 12 columns.
fn is_cargo_progress(line: &str) -> bool {
    let (Some(status), Some(b' ')) = (line.get(..12), line.as_bytes().get(12)) else {
        return false;
    };
    let word = status.trim_start();
    let mut chars = word.chars();
    !word.is_empty()
        && chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_lowercase())
}

/// Runs `f` with this process's standard output going to `file`; what `f`
/// printed, with its result.
fn capture_stdout<T>(file: &std::path::Path, f: impl FnOnce() -> T) -> anyhow::Result<(T, String)> {
    use std::{io::Write as _, os::fd::AsRawFd as _};
    let sink = std::fs::File::create(file).with_context(|| format!("{}", file.display()))?;
    std::io::stdout().flush()?;
    // SAFETY: dup/dup2 on descriptors this process owns; stdout is restored
    // before returning. (aya-build's relay thread may outlive a failed
    // build: its last lines then reach cargo directly, which is fine.)
    let saved = unsafe { libc::dup(libc::STDOUT_FILENO) };
    if saved < 0 || unsafe { libc::dup2(sink.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        anyhow::bail!("redirecting stdout: {}", std::io::Error::last_os_error());
    }
    let result = f();
    std::io::stdout().flush()?;
    // SAFETY: as above.
    unsafe {
        libc::dup2(saved, libc::STDOUT_FILENO);
        libc::close(saved);
    }
    let printed = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    Ok((result, printed))
}
