//! The kernels the real-BPF tests also run on, under QEMU: Debian's own
//! packages, fetched by name through a private apt configuration (the
//! machine's sources and package state are left alone), unpacked into the
//! cache as what a guest boot needs: the kernel decompressed on the host
//! (QEMU enters it through its PVH note, skipping the self-decompression
//! that is very slow under emulation) and the modules for 9p and overlayfs.
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// A kernel line the tests run on.
pub struct GuestKernel {
    /// What `cargo xtask test --kernel` calls it.
    pub name: &'static str,
    /// `apt-cache search --names-only` pattern of its image packages; the
    /// newest match is taken (the mirror drops old ABIs).
    pattern: &'static str,
    /// Why this one: said in the README.
    pub why: &'static str,
}

pub const GUEST_KERNELS: &[GuestKernel] = &[
    GuestKernel {
        name: "6.1",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        why: "Debian 12's kernel",
    },
    GuestKernel {
        name: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        why: "Debian 12's backports kernel, Debian 13's line",
    },
];

pub fn guest_kernel(name: &str) -> Option<&'static GuestKernel> {
    GUEST_KERNELS.iter().find(|k| k.name == name)
}

/// Modules the guest loads, in dependency order: virtio PCI (built in on
/// 6.12), 9p over virtio (the host's files) and overlayfs (a writable layer
/// over them). Those a kernel builds in are simply absent.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "overlay",
];

/// What a guest boot of one kernel needs, as unpacked in the cache.
pub struct Unpacked {
    pub vmlinux: PathBuf,
    pub modules: PathBuf,
    /// The package it came from, e.g. `linux-image-6.1.0-57-amd64 6.1.192-3`.
    pub package: String,
}

fn kernel_dir(cache: &Path, k: &GuestKernel) -> PathBuf {
    cache.join("kernels").join(k.name)
}

/// The unpacked kernel, if setup fetched it.
pub fn unpacked(cache: &Path, k: &GuestKernel) -> Option<Unpacked> {
    let dir = kernel_dir(cache, k);
    let package = fs::read_to_string(dir.join("package")).ok()?;
    let vmlinux = dir.join("vmlinux");
    vmlinux.is_file().then(|| Unpacked {
        vmlinux,
        modules: dir.join("modules"),
        package: package.trim().to_owned(),
    })
}

/// apt with its own sources list, lists and archive cache under
/// `<cache>/kernels/apt`: bookworm, bookworm-backports and security from
/// the mirror the machine uses.
struct PrivateApt {
    dir: PathBuf,
}

const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
";

impl PrivateApt {
    fn new(cache: &Path) -> Result<Self> {
        let dir = cache.join("kernels").join("apt");
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        fs::write(dir.join("sources.list"), SOURCES)?;
        Ok(Self { dir })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let opt = |k: &str, v: &Path| format!("-o{k}={}", v.display());
        cmd.arg(opt("Dir::Etc::SourceList", &self.dir.join("sources.list")))
            .arg("-oDir::Etc::SourceParts=/nonexistent")
            .arg(opt("Dir::State::Lists", &self.dir.join("lists")))
            .arg(opt("Dir::Cache", &self.dir.join("cache")))
            .arg("-oDir::State::status=/dev/null")
            // Downloads land in a root-owned directory; apt's sandbox user
            // could not write there.
            .arg("-oAPT::Sandbox::User=root")
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn update(&self) -> Result<()> {
        output(self.command("apt-get").arg("update")).map(drop)
    }

    /// The newest package whose name matches `pattern`, with its version.
    fn newest(&self, pattern: &str) -> Result<(String, String)> {
        let out = output(
            self.command("apt-cache")
                .args(["search", "--names-only"])
                .arg(pattern),
        )?;
        let name = out
            .lines()
            .filter_map(|l| l.split_once(" - ").map(|(n, _)| n.trim().to_owned()))
            .max_by_key(|n| version_key(n))
            .with_context(|| format!("no Debian package matches {pattern}"))?;
        let policy = output(
            self.command("apt-cache")
                .args(["show", "--no-all-versions"])
                .arg(&name),
        )?;
        let version = policy
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .with_context(|| format!("apt-cache show {name}: no Version"))?
            .to_owned();
        Ok((name, version))
    }

    fn download(&self, name: &str) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        output(
            self.command("apt-get")
                .current_dir(&debs)
                .arg("download")
                .arg(name),
        )?;
        fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&format!("{name}_")) && f.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download {name} left no .deb in {}", debs.display()))
    }
}

/// Numbers in a package name, compared as numbers (`6.1.0-57` > `6.1.0-9`).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Fetches and unpacks every guest kernel not yet in the cache. Returns
/// the packages it installed now.
pub fn fetch_missing(cache: &Path) -> Result<Vec<String>> {
    let missing: Vec<&GuestKernel> = GUEST_KERNELS
        .iter()
        .filter(|k| unpacked(cache, k).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let apt = PrivateApt::new(cache)?;
    apt.update()?;
    let mut installed = Vec::new();
    for k in missing {
        let (name, version) = apt.newest(k.pattern)?;
        let deb = apt.download(&name)?;
        unpack(cache, k, &deb, &format!("{name} {version}"))
            .with_context(|| format!("unpacking {}", deb.display()))?;
        // The .deb is 70-110 MB and no longer needed.
        let _ = fs::remove_file(&deb);
        installed.push(format!("{name} {version}"));
    }
    Ok(installed)
}

fn unpack(cache: &Path, k: &GuestKernel, deb: &Path, package: &str) -> Result<()> {
    let dir = kernel_dir(cache, k);
    let _ = fs::remove_dir_all(&dir);
    let tree = dir.join("tree");
    fs::create_dir_all(&tree)?;
    output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;
    let vmlinuz = only_file(&tree.join("boot"), "vmlinuz-")?;
    let bz = fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let elf =
        decompress_bzimage(&bz).with_context(|| format!("decompressing {}", vmlinuz.display()))?;
    fs::write(dir.join("vmlinux"), elf)?;
    let modules_root = only_file(&tree.join("lib/modules"), "")?;
    let out = dir.join("modules");
    fs::create_dir_all(&out)?;
    for name in GUEST_MODULES {
        if let Some(ko) = find_module(&modules_root.join("kernel"), name)? {
            let bytes = if ko.extension().is_some_and(|e| e == "xz") {
                pipe("xz", &["-dc"], &fs::read(&ko)?)?
            } else {
                fs::read(&ko)?
            };
            fs::write(out.join(format!("{name}.ko")), bytes)?;
        }
    }
    for required in ["9p", "9pnet_virtio", "overlay"] {
        if !out.join(format!("{required}.ko")).is_file() {
            bail!("{package} has no {required} module (built in?); the guest needs it as a module");
        }
    }
    fs::remove_dir_all(&tree)?;
    // Written last: its presence means the rest is complete.
    fs::write(dir.join("package"), format!("{package}\n"))?;
    Ok(())
}

fn only_file(dir: &Path, prefix: &str) -> Result<PathBuf> {
    fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

fn find_module(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name)? {
                return Ok(Some(found));
            }
        } else if let Some(file) = path.file_name().and_then(|f| f.to_str())
            && (file == format!("{name}.ko") || file == format!("{name}.ko.xz"))
        {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The ELF `vmlinux` inside an x86 bzImage: the boot protocol's header
/// says where the compressed payload is and how long (2.08+).
fn decompress_bzimage(bz: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |off: usize| -> Result<usize> {
        let b = bz.get(off..off + 4).context("bzImage too short")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage (no HdrS)");
    }
    let setup_sects = match bz.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => bail!("bzImage too short"),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = bz
        .get(start..start + u32_at(0x24c)?)
        .context("bzImage payload out of bounds")?;
    // The kernel's build appends the decompressed size (32 bits, little
    // endian) to the compressed stream.
    let (payload, size) = payload
        .split_last_chunk::<4>()
        .context("bzImage payload too short")?;
    let size = u32::from_le_bytes(*size) as usize;
    let tool: &[&str] = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => bail!("bzImage payload in a compression this does not know"),
    };
    let elf = pipe(tool[0], &tool[1..], payload)?;
    if !elf.starts_with(b"\x7fELF") || elf.len() != size {
        bail!(
            "decompressed payload is not the ELF file of {size} bytes the image announces ({} bytes)",
            elf.len()
        );
    }
    Ok(elf)
}

/// Runs `program` with `input` on stdin; its stdout.
fn pipe(program: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {program}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    // Written from a thread: the child fills its stdout pipe meanwhile.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("{program}: writer thread panicked"))?
        .with_context(|| format!("writing to {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {}", crate::project::describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}{}",
            crate::project::describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_by_number() {
        let mut names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.1.0-56-amd64",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names.last(), Some(&"linux-image-6.1.0-57-amd64"));
    }

    #[test]
    fn a_bzimage_header_is_checked() {
        assert!(decompress_bzimage(&[0u8; 1024]).is_err());
    }
}
