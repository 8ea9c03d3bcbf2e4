//! Runs integration test binaries inside a QEMU guest booted on another
//! kernel. The guest sees the host's whole file tree read-only over 9p,
//! under a RAM-backed overlayfs for what the tests write, and runs the very
//! binaries the host built at their host paths: the same tests, the same
//! agent, only the kernel differs.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::kernels::{GUEST_MODULES, Unpacked};

/// One test binary to run in the guest, with its arguments.
pub struct GuestTest {
    pub name: String,
    pub exe: PathBuf,
    pub args: Vec<String>,
    /// Where cargo would run it (the package's directory).
    pub cwd: PathBuf,
}

pub struct GuestRun<'a> {
    pub label: &'a str,
    pub kernel: &'a Unpacked,
    pub tests: &'a [GuestTest],
    pub env: &'a [(&'a str, String)],
    /// The agent: started once before the tests to log what loading its
    /// programs costs on this kernel (the verifier's time and work).
    pub agent: &'a Path,
    /// The whole run, boot included, is stopped after this.
    pub timeout: Duration,
}

/// What the guest's script prints, so the host can tell a result from a
/// test's own output (and a crashed guest from a failed test).
const RESULT: &str = "GOPULSE-GUEST-RESULT";
const DONE: &str = "GOPULSE-GUEST-DONE";

/// Single-threaded TCG: multi-threaded TCG oopsed 6.12 while programs
/// loaded (issue 11); the machine's KVM is nested in software and slower
/// than TCG.
fn qemu(run: &GuestRun<'_>, initrd: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-no-reboot"])
        .args([
            "-machine",
            "pc",
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max",
        ])
        .args(["-smp", "1", "-m", "6G"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&run.kernel.vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet rdinit=/init"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Boots the kernel, runs every test, and says which failed. The guest's
/// console is printed as it comes, each line prefixed with the label.
pub fn run(run: &GuestRun<'_>, scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    let initrd = scratch.join(format!("initrd-{}.cpio", run.label));
    std::fs::write(&initrd, initramfs(run)?)
        .with_context(|| format!("writing {}", initrd.display()))?;
    let started = Instant::now();
    let mut child = qemu(run, &initrd)
        .spawn()
        .context("could not start qemu-system-x86_64 (package qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let (tx, lines) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx2.send(format!("qemu: {line}")).is_err() {
                break;
            }
        }
    });
    let mut results: Vec<(String, i32)> = Vec::new();
    let mut done = false;
    let deadline = started + run.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                // Terminal control sequences from the firmware and the
                // console are noise in a CI log.
                let clean: String = line.chars().filter(|c| !c.is_control()).collect();
                println!("[{}] {clean}", run.label);
                if let Some(rest) = clean.strip_prefix(RESULT) {
                    results.push(parse_result(rest)?);
                } else if clean.starts_with(DONE) {
                    done = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{}: the guest did not finish within {:?}; killed",
                    run.label,
                    run.timeout
                );
            }
        }
    }
    let status = child.wait()?;
    println!(
        "[{}] guest ran {:.0}s ({}, qemu {status})",
        run.label,
        started.elapsed().as_secs_f64(),
        run.kernel.package
    );
    if !done {
        bail!(
            "{}: the guest ended before its tests did (kernel panic or qemu failure: see its \
             console above)",
            run.label
        );
    }
    let failed: Vec<String> = run
        .tests
        .iter()
        .filter(|t| !results.iter().any(|(n, rc)| *n == t.name && *rc == 0))
        .map(|t| t.name.clone())
        .collect();
    if !failed.is_empty() {
        bail!("{}: failed in the guest: {}", run.label, failed.join(", "));
    }
    Ok(())
}

fn parse_result(rest: &str) -> Result<(String, i32)> {
    let mut words = rest.split_whitespace();
    let (Some(name), Some(rc)) = (words.next(), words.next()) else {
        bail!("malformed guest result line {rest:?}");
    };
    let rc = rc
        .strip_prefix("rc=")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("malformed guest result line {rest:?}"))?;
    Ok((name.to_owned(), rc))
}

/// Single quotes for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `/init`: mounts the host's tree under a writable overlay with the
/// guest's own /proc, /sys, bpffs and tracefs, runs the tests in a chroot
/// there, prints a result line per test, and powers off. Nothing is
/// mounted over a host directory the workspace may live in (`/tmp` is the
/// overlay's, backed by guest RAM).
fn init_script(run: &GuestRun<'_>) -> String {
    let modules = GUEST_MODULES.join(" ");
    let env: Vec<String> = run
        .env
        .iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() {{ echo "guest setup failed: $*"; echo "{DONE}"; poweroff -f; }}
for m in {modules}; do
  [ -f /lib/gopulse/$m.ko ] && {{ insmod /lib/gopulse/$m.ko || fail "insmod $m"; }}
done
mkdir -p /host /rw /merged
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /host || fail "9p"
mount -t tmpfs -o size=16g,mode=0755 rw /rw || fail tmpfs
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /merged || fail overlay
M=/merged
mount -t proc proc $M/proc
mount -t sysfs sys $M/sys
mount -t devtmpfs dev $M/dev
mount -t bpf bpf $M/sys/fs/bpf
mount -t tracefs tracefs $M/sys/kernel/tracing
mount -t debugfs debugfs $M/sys/kernel/debug
mount -t cgroup2 cgroup2 $M/sys/fs/cgroup 2>/dev/null
ip link set lo up
cp /run-tests.sh $M/tmp/run-tests.sh
echo "guest: Linux $(uname -r), $(nproc) CPU, $(awk '/MemTotal/ {{print $2}}' /proc/meminfo) kB"
chroot $M /usr/bin/env -i {env} /bin/sh /tmp/run-tests.sh
echo "{DONE}"
poweroff -f
"#,
        env = env.join(" "),
    )
}

fn run_script(run: &GuestRun<'_>) -> String {
    let mut s = format!(
        r#"#!/bin/sh
echo "guest: starting the agent once to time its program loading"
{agent} --pid 1 --listen 127.0.0.1:0 >/tmp/startup.log 2>&1 &
agent=$!
i=0
while [ $i -lt 300 ] && kill -0 $agent 2>/dev/null && ! grep -q "serving http" /tmp/startup.log; do
  sleep 1; i=$((i+1))
done
grep -E "BPF programs|ERROR" /tmp/startup.log
kill $agent; wait $agent
"#,
        agent = quote(&run.agent.to_string_lossy())
    );
    for t in run.tests {
        let args: Vec<String> = t.args.iter().map(|a| quote(a)).collect();
        s.push_str(&format!(
            "echo \"guest: running {name}\"\n(cd {cwd} && exec {exe} {args})\necho \"{RESULT} {name} rc=$?\"\n",
            cwd = quote(&t.cwd.to_string_lossy()),
            exe = quote(&t.exe.to_string_lossy()),
            args = args.join(" "),
            name = t.name,
        ));
    }
    s
}

/// A newc cpio archive (what the kernel unpacks as its initramfs): busybox,
/// the modules, `/init` and the test script.
fn initramfs(run: &GuestRun<'_>) -> Result<Vec<u8>> {
    let busybox =
        std::fs::read("/bin/busybox").context("reading /bin/busybox (package busybox-static)")?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "lib", "lib/gopulse", "tmp"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    for m in GUEST_MODULES {
        let path = run.kernel.modules.join(format!("{m}.ko"));
        if path.is_file() {
            cpio.file(
                &format!("lib/gopulse/{m}.ko"),
                0o644,
                &std::fs::read(&path)?,
            );
        }
    }
    cpio.file("init", 0o755, init_script(run).as_bytes());
    cpio.file("run-tests.sh", 0o755, run_script(run).as_bytes());
    Ok(cpio.finish())
}

#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse() {
        assert_eq!(
            parse_result(" gc_accuracy rc=101").unwrap(),
            ("gc_accuracy".to_owned(), 101)
        );
        assert!(parse_result(" gc_accuracy").is_err());
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut c = Cpio::default();
        c.file("a", 0o644, b"xyz");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
    }
}
