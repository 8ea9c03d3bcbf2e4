//! `identity::of_pid` against the kernel: a process moved into cgroup v2
//! directories named the way the kubelet and the runtimes name them is told
//! apart by its container id, pod UID and runtime.
//!
//! Only the cgroup2 hierarchy is touched (on hybrid hosts the v1
//! controllers stay as they are), only the `sleep` children are moved, and
//! every directory a test made is removed again, on failure too.
mod support;

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use gopulse_agent::discover::identity::{self, Identity, Runtime};
use support::cgroup::{Names, TestCgroup, cgroup2_mount, containerd_path, unescape_octal};

/// A child process inside a [`TestCgroup`]. Dropping it kills and reaps the
/// child before removing the cgroup.
pub struct Contained {
    pub child: Child,
    // Declared after `child`, dropped after `Drop::drop` reaped it.
    pub cgroup: TestCgroup,
}

impl Contained {
    /// Creates `<mount>/<rel>`, starts `cmd` and moves it there.
    pub fn spawn(mount: &Path, rel: &str, cmd: &mut Command) -> io::Result<Self> {
        let cgroup = TestCgroup::create(mount, rel)?;
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
        let contained = Self { child, cgroup };
        contained.cgroup.add_pid(contained.child.id())?;
        Ok(contained)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cases share ancestors (`kubepods.slice`): one at a time in this
/// binary, so one does not remove what another is about to use.
static SERIAL: Mutex<()> = Mutex::new(());

/// Root, the cgroup2 mount, and this binary's turn; `None` to skip.
fn setup() -> Option<(MutexGuard<'static, ()>, PathBuf)> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !support::prerequisite(root, "needs root to create cgroups and move processes") {
        return None;
    }
    let mount = cgroup2_mount();
    if !support::prerequisite(mount.is_some(), "no cgroup2 mount in /proc/self/mountinfo") {
        return None;
    }
    let turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some((turn, mount?))
}

/// What `of_pid` says of a `sleep` moved into `<mount>/<rel>`.
fn identify_in(mount: &Path, rel: &str) -> Identity {
    let sleeper = Contained::spawn(mount, rel, Command::new("sleep").arg("60"))
        .unwrap_or_else(|e| panic!("putting a sleep into {rel}: {e}"));
    let pid = sleeper.pid();
    let procs = fs::read_to_string(sleeper.cgroup.path().join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("reading {rel}/cgroup.procs: {e}"));
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "{pid} not in {rel}/cgroup.procs: {procs:?}"
    );
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/cgroup: {e}"));
    eprintln!("/proc/{pid}/cgroup:\n{text}");
    let v2_line = format!("0::{}", sleeper.cgroup.rel());
    assert!(
        text.lines().any(|l| l == v2_line),
        "/proc/{pid}/cgroup lacks {v2_line:?}:\n{text}"
    );
    identity::of_pid(pid).unwrap_or_else(|e| panic!("of_pid({pid}): {e}"))
}

#[test]
fn containerd_systemd_driver() {
    let Some((_turn, mount)) = setup() else {
        return;
    };
    let n = Names::new(1);
    let rel = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
        n.uid_underscored(),
        n.id
    );
    assert_eq!(
        identify_in(&mount, &rel),
        Identity {
            container_id: Some(n.id),
            pod_uid: Some(n.uid),
            runtime: Some(Runtime::Containerd),
        }
    );
}

#[test]
fn crio_systemd_driver() {
    let Some((_turn, mount)) = setup() else {
        return;
    };
    let n = Names::new(2);
    let rel = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-{}.scope",
        n.uid_underscored(),
        n.id
    );
    assert_eq!(
        identify_in(&mount, &rel),
        Identity {
            container_id: Some(n.id),
            pod_uid: Some(n.uid),
            runtime: Some(Runtime::CriO),
        }
    );
}

#[test]
fn cgroupfs_driver() {
    let Some((_turn, mount)) = setup() else {
        return;
    };
    let n = Names::new(3);
    let rel = format!("kubepods/besteffort/pod{}/{}", n.uid, n.id);
    assert_eq!(
        identify_in(&mount, &rel),
        Identity {
            container_id: Some(n.id),
            pod_uid: Some(n.uid),
            runtime: None,
        }
    );
}

#[test]
fn cleanup_leaves_nothing_behind() {
    let Some((_turn, mount)) = setup() else {
        return;
    };
    let n = Names::new(4);
    let top = format!("gopulse-test-{}", n.id.get(..16).unwrap_or("x"));
    let rel = format!("{top}/pod{}/{}", n.uid, n.id);
    {
        let sleeper = Contained::spawn(&mount, &rel, Command::new("sleep").arg("60"))
            .unwrap_or_else(|e| panic!("putting a sleep into {rel}: {e}"));
        assert!(sleeper.cgroup.path().is_dir());
    }
    assert!(
        !mount.join(&top).exists(),
        "{} is still there",
        mount.join(&top).display()
    );
}

#[test]
fn mountinfo_escapes() {
    assert_eq!(unescape_octal(r"/a\040b\134c"), r"/a b\c");
    assert_eq!(unescape_octal(r"/trailing\04"), r"/trailing\04");
    assert_eq!(unescape_octal("/plain"), "/plain");
}

/// The agent's series name a Go process by the container it runs in: Go
/// programs started inside cgroups named as the kubelet names them with
/// containerd and CRI-O (systemd driver) and with the cgroupfs driver, found
/// by discovery, carry the container id and pod UID; a Go program outside
/// any container carries neither. With `--labels` leaving out `pid`, the
/// series have no pid label.
#[test]
fn series_carry_container_ids() {
    let Some((_turn, mount)) = setup() else {
        return;
    };
    if !support::have_root() {
        return;
    }
    let Some(go) = support::go_or_skip("1.27.3") else {
        return;
    };
    let built = support::build_fixture("gcload", &go, "1.27.3-default", &[]);
    // A copy only this run uses: the agent watches it alone.
    let name = format!("cid{}-gcload", std::process::id());
    let bin = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&name);
    fs::copy(&built, &bin).unwrap();
    let top = format!("gopulse-test-{}", std::process::id());
    let cases = [
        (Names::new(11), "containerd"),
        (Names::new(12), "cri-o"),
        (Names::new(13), "cgroupfs"),
    ];
    let rel = |n: &Names, kind: &str| match kind {
        "containerd" => containerd_path(&top, n),
        "cri-o" => format!(
            "{top}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-{}.scope",
            n.uid_underscored(),
            n.id
        ),
        _ => format!("{top}/kubepods/burstable/pod{}/{}", n.uid, n.id),
    };
    for labels in [None, Some("container_id,pod_uid")] {
        let mut flags = vec!["--exe-regex", name.as_str(), "--map-assign-probes", "off"];
        if let Some(l) = labels {
            flags.extend(["--labels", l]);
        }
        let agent = support::Agent::spawn_with(&[], &flags);
        let cgroups: Vec<TestCgroup> = cases
            .iter()
            .map(|(n, kind)| TestCgroup::create(&mount, &rel(n, kind)).unwrap())
            .collect();
        // Each program joins its cgroup before it execs, as in a container.
        let targets: Vec<support::Target> = cgroups
            .iter()
            .map(|cg| {
                let script = format!(
                    "echo $$ > {}/cgroup.procs && exec {} 1 1",
                    cg.path().display(),
                    bin.display()
                );
                support::Target::spawn(Path::new("/bin/sh"), &["-c", &script])
            })
            .collect();
        let outside = support::Target::spawn(&bin, &["1", "1"]);
        let m = agent.scrape_until(Duration::from_secs(10), |m| {
            m.value("gopulse_processes_watched", &[]) >= 4.0
        });
        assert_eq!(m.value("gopulse_processes_watched", &[]), 4.0);
        for ((n, kind), t) in cases.iter().zip(&targets) {
            let want = [("container_id", n.id.as_str()), ("pod_uid", n.uid.as_str())];
            let series = m
                .samples
                .iter()
                .find(|s| {
                    s.name == "go_memory_gc_cycles_total"
                        && want
                            .iter()
                            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .unwrap_or_else(|| panic!("{kind}: no series with {want:?}\n{}", m.text));
            match labels {
                None => assert_eq!(
                    series.labels.get("pid"),
                    Some(&t.pid.to_string()),
                    "{kind}: pid label"
                ),
                Some(_) => assert!(!series.labels.contains_key("pid"), "{kind}: pid label"),
            }
        }
        let bare: Vec<_> = m
            .samples
            .iter()
            .filter(|s| s.name == "go_memory_gc_cycles_total")
            .filter(|s| !s.labels.contains_key("container_id"))
            .collect();
        assert_eq!(bare.len(), 1, "one process outside containers:\n{}", m.text);
        assert!(!bare[0].labels.contains_key("pod_uid"));
        if labels.is_none() {
            assert_eq!(bare[0].labels.get("pid"), Some(&outside.pid.to_string()));
        }
        drop(outside);
        drop(targets);
        // Leaves before the ancestors the first of them made.
        for cg in cgroups.into_iter().rev() {
            drop(cg);
        }
        agent.stop();
    }
}
