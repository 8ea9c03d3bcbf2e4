//! The discovery stage: which processes on this host are Go programs the
//! agent can watch, and who they are (container, pod). Each executable is
//! judged once (`exe`); exec and exit events come from the kernel
//! (`events`), with a /proc rescan as the safety net.
pub mod events;
pub mod exe;
pub mod identity;
pub mod pods;
pub mod selector;

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::Arc,
};

use self::{
    exe::{ExeCache, ExeKey, Skip, Verdict},
    pods::{PodDirectory, PodNames},
};
use crate::{
    inspect::Release,
    metrics::{LabelChoice, ProcLabels},
    procfs,
};

/// How processes are named on their series: which optional labels, and
/// where pod names come from.
#[derive(Clone)]
pub struct Naming {
    pub choice: LabelChoice,
    pub pods: Option<PodDirectory>,
}

impl Naming {
    /// The labels of process `pid`: its identity from /proc (container and
    /// pod from its cgroup), and pod names as the API reports them.
    pub fn labels(&self, pid: u32, exe: String, go_version: String) -> ProcLabels {
        let id = identity::of_pid(pid).unwrap_or_else(|e| {
            tracing::debug!(pid, "reading /proc/{pid}/cgroup: {e}");
            identity::Identity::default()
        });
        let names = match (&self.pods, &id.pod_uid) {
            (Some(dir), Some(uid))
                if self.choice.namespace || self.choice.pod || self.choice.container =>
            {
                let names = Arc::new(PodNames::new(self.choice));
                dir.name(&names, uid, id.container_id.as_deref());
                Some(names)
            }
            _ => None,
        };
        ProcLabels {
            pid: self.choice.pid.then(|| pid.to_string()),
            exe,
            go_version,
            container_id: id.container_id.filter(|_| self.choice.container_id),
            pod_uid: id.pod_uid.filter(|_| self.choice.pod_uid),
            names,
        }
    }
}

/// Executables whose verdicts are kept (a node runs a few hundred).
const EXE_CACHE: usize = 4096;

/// Which Go processes to watch (`--exe-regex`, `--namespace`,
/// `--pod-selector`).
#[derive(Clone, Default)]
pub struct Selection {
    /// Matched against the executable's file name.
    pub exe: Option<regex_lite::Regex>,
    /// Pods in these namespaces only (none: any).
    pub namespaces: Vec<String>,
    /// Pods whose labels match.
    pub pod_selector: Option<selector::LabelSelector>,
    /// Where pods are looked up; needed when selecting by pod.
    pub pods: Option<PodDirectory>,
}

/// Whether a process's pod lets it in; `Unknown` while the API has not
/// shown the pod (ask again at the next rescan).
enum PodVerdict {
    Admitted,
    Filtered(String),
    Unknown,
}

impl Selection {
    fn admits(&self, exe_name: &str) -> bool {
        self.exe.as_ref().is_none_or(|r| r.is_match(exe_name))
    }

    /// Whether processes are chosen by their pod (which needs the API).
    pub fn by_pod(&self) -> bool {
        !self.namespaces.is_empty() || self.pod_selector.is_some()
    }

    fn pod_verdict(&self, pid: u32) -> PodVerdict {
        let uid = identity::of_pid(pid).ok().and_then(|id| id.pod_uid);
        let Some(uid) = uid else {
            return PodVerdict::Filtered("not in a Kubernetes pod".into());
        };
        let Some(meta) = self.pods.as_ref().and_then(|d| d.lookup(&uid, None)) else {
            return PodVerdict::Unknown;
        };
        if !self.namespaces.is_empty() && !self.namespaces.contains(&meta.namespace) {
            return PodVerdict::Filtered(format!(
                "pod {}/{} is not in --namespace",
                meta.namespace, meta.pod
            ));
        }
        if let Some(sel) = &self.pod_selector
            && !sel.matches(&meta.labels)
        {
            return PodVerdict::Filtered(format!(
                "pod {}/{} does not match --pod-selector",
                meta.namespace, meta.pod
            ));
        }
        PodVerdict::Admitted
    }
}

/// What discovery decided about one process.
#[derive(Clone, Debug)]
pub enum Decision {
    Watch { exe: ExeKey, release: Release },
    Skip { reason: Skip, why: String },
}

impl Decision {
    fn skip(reason: Skip, why: impl Into<String>) -> Self {
        Decision::Skip {
            reason,
            why: why.into(),
        }
    }

    /// Whether the process is a Go program (watched or not).
    pub fn is_go(&self) -> bool {
        !matches!(
            self,
            Decision::Skip {
                reason: Skip::NotGo | Skip::Gone,
                ..
            }
        )
    }
}

pub struct Discovery {
    cache: ExeCache,
    select: Selection,
    /// Processes judged since their last exec, and when (CLOCK_MONOTONIC
    /// ns): not judged again by a rescan, nor for an exec older than that.
    known: HashMap<u32, u64>,
    /// Executables whose skipping was logged (once each).
    logged: HashSet<ExeKey>,
    /// Processes passed over for --max-processes, asked again at rescans.
    limited: HashSet<u32>,
}

impl Discovery {
    pub fn new(select: Selection) -> Self {
        Self {
            cache: ExeCache::new(EXE_CACHE),
            select,
            known: HashMap::new(),
            logged: HashSet::new(),
            limited: HashSet::new(),
        }
    }

    /// Executables read so far (cache misses).
    pub fn judged(&self) -> u64 {
        self.cache.judged
    }

    /// Decides about `pid` (after an exec, or found by a scan).
    pub fn judge(&mut self, pid: u32) -> Decision {
        self.known.insert(pid, events::monotonic_ns());
        let (exe, verdict) = match self.cache.judge(pid) {
            Ok(v) => v,
            Err(e) => return judge_error(pid, &e),
        };
        match verdict {
            Verdict::Skipped(skip, why) => Decision::skip(skip, why),
            Verdict::Go(release) => {
                let name = procfs::exe_name(pid).unwrap_or_default();
                if !self.select.admits(&name) {
                    return Decision::skip(
                        Skip::Filtered,
                        format!("{name} does not match --exe-regex"),
                    );
                }
                if !self.select.by_pod() {
                    return Decision::Watch { exe, release };
                }
                match self.select.pod_verdict(pid) {
                    PodVerdict::Admitted => Decision::Watch { exe, release },
                    PodVerdict::Filtered(why) => Decision::skip(Skip::Filtered, why),
                    PodVerdict::Unknown => {
                        // The API has not shown the pod yet: a rescan asks
                        // again.
                        self.known.remove(&pid);
                        Decision::skip(Skip::Filtered, "its pod is not known to the API yet")
                    }
                }
            }
        }
    }

    /// Whether a skip of this executable is news (to be logged).
    pub fn first_skip(&mut self, exe: Option<ExeKey>) -> bool {
        exe.is_none_or(|k| self.logged.insert(k))
    }

    /// The process exited: judge it afresh next time.
    pub fn forget(&mut self, pid: u32) {
        self.known.remove(&pid);
        self.limited.remove(&pid);
    }

    /// The process was passed over for `--max-processes`: the next rescan
    /// asks again. True the first time (count it then).
    pub fn limited(&mut self, pid: u32) -> bool {
        self.known.remove(&pid);
        self.limited.insert(pid)
    }

    /// Whether an exec at `time_ns` happened before `pid` was last judged:
    /// then the program judged was already the one that exec started (a
    /// shell that execs a Go program at once is judged as the Go program).
    pub fn stale(&self, pid: u32, time_ns: u64) -> bool {
        self.known.get(&pid).is_some_and(|&at| at > time_ns)
    }

    /// Processes in /proc not judged yet; forgets those gone.
    pub fn unjudged(&mut self) -> io::Result<Vec<u32>> {
        let pids = all_pids()?;
        let live: HashSet<u32> = pids.iter().copied().collect();
        self.known.retain(|p, _| live.contains(p));
        self.limited.retain(|p| live.contains(p));
        Ok(pids
            .into_iter()
            .filter(|p| !self.known.contains_key(p))
            .collect())
    }
}

fn judge_error(pid: u32, e: &io::Error) -> Decision {
    match e.kind() {
        // No /proc/PID: it exited. /proc/PID but no exe: a kernel thread
        // (or a zombie), not a program.
        io::ErrorKind::NotFound if std::path::Path::new(&format!("/proc/{pid}")).exists() => {
            Decision::skip(Skip::NotGo, "no executable (a kernel thread)")
        }
        io::ErrorKind::NotFound => Decision::skip(Skip::Gone, "exited before it was looked at"),
        // ESRCH: /proc/PID was there, the process died while it was read.
        _ if e.raw_os_error() == Some(libc::ESRCH) => {
            Decision::skip(Skip::Gone, "exited while it was looked at")
        }
        _ => Decision::skip(Skip::Refused, procfs::describe(e)),
    }
}

/// Every process id in /proc (thread-group ids only).
pub fn all_pids() -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Who a process is, for `--list`: its pod (namespace/name) when the API
/// knows it, else its short container id, else `-`.
fn container_of(pid: u32, pods: Option<&PodDirectory>) -> String {
    let id = identity::of_pid(pid).unwrap_or_default();
    let named = id
        .pod_uid
        .as_deref()
        .and_then(|uid| pods?.lookup(uid, id.container_id.as_deref()));
    match (named, id.container_id) {
        (Some(m), _) => match m.container {
            Some(c) => format!("{}/{}/{c}", m.namespace, m.pod),
            None => format!("{}/{}", m.namespace, m.pod),
        },
        (None, Some(cid)) => cid.chars().take(12).collect(),
        (None, None) => "-".to_owned(),
    }
}

/// `gopulse --list`: every Go process here, and whether the agent would
/// watch it or why not; then how many other processes were passed over.
/// `watch` gives the verdict on a process discovery admits (its pid and
/// executable): what the probes would watch of it.
pub fn list(select: Selection, mut watch: impl FnMut(u32, ExeKey) -> String) -> io::Result<String> {
    use std::fmt::Write as _;
    let pods = select.pods.clone();
    let mut d = Discovery::new(select);
    let mut out = format!(
        "{:>8}  {:<24} {:<12} {:<28} {}\n",
        "PID", "EXE", "GO", "CONTAINER", "VERDICT"
    );
    let (mut go, mut other) = (0usize, 0usize);
    for pid in all_pids()? {
        let decision = d.judge(pid);
        if !decision.is_go() {
            other += 1;
            continue;
        }
        go += 1;
        let exe = procfs::exe_name(pid).unwrap_or_else(|_| "?".into());
        let (version, verdict) = match &decision {
            Decision::Watch { release, exe } => (release.version.short(), watch(pid, *exe)),
            Decision::Skip { reason, why } => {
                let more = if matches!(reason, Skip::Unsupported | Skip::Refused) {
                    format!(" (gopulse inspect --pid {pid} says more)")
                } else {
                    String::new()
                };
                (
                    "-".to_owned(),
                    format!("skip ({}): {why}{more}", reason.label()),
                )
            }
        };
        let _ = writeln!(
            out,
            "{pid:>8}  {exe:<24} {version:<12} {:<28} {verdict}",
            container_of(pid, pods.as_ref())
        );
    }
    let _ = writeln!(
        out,
        "{go} Go process(es); {other} other process(es) are not Go programs or exited"
    );
    Ok(out)
}
