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
    aya_build::build_ebpf(
        [Package {
            name: "gopulse-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
