//! The Linux capabilities the agent needs, checked at start-up so a
//! missing one is named before anything fails with a bare EPERM or EACCES:
//! what every path needs before the programs load, and what the way
//! uprobes go in needs once it is known (CAP_SYS_ADMIN for perf-event
//! uprobes; uprobe_multi links need only CAP_BPF and CAP_PERFMON). The
//! DaemonSet's list (`deploy/kubernetes/base/daemonset.yaml`) is the
//! uprobe_multi path's, the `cap-sys-admin` overlay's the perf path's;
//! `agent/tests/least_privilege.rs` runs the agent as a non-root user with
//! exactly the list for its kernel, and with each one left out.
use std::{fmt, fs, io};

use crate::bpf::UprobePath;

/// One capability: its name as the kernel documents it and its bit in the
/// capability sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
}

pub const CAP_DAC_READ_SEARCH: Capability = Capability {
    name: "CAP_DAC_READ_SEARCH",
    bit: 2,
};
pub const CAP_SYS_PTRACE: Capability = Capability {
    name: "CAP_SYS_PTRACE",
    bit: 19,
};
pub const CAP_LEASE: Capability = Capability {
    name: "CAP_LEASE",
    bit: 28,
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    name: "CAP_SYS_ADMIN",
    bit: 21,
};
pub const CAP_PERFMON: Capability = Capability {
    name: "CAP_PERFMON",
    bit: 38,
};
pub const CAP_BPF: Capability = Capability {
    name: "CAP_BPF",
    bit: 39,
};

/// A capability the agent needs, and what for.
#[derive(Debug, PartialEq, Eq)]
pub struct Need {
    pub cap: Capability,
    pub why: &'static str,
}

/// What the agent needs whichever way it attaches uprobes, in the order
/// the DaemonSet lists it.
pub const NEEDED: [Need; 3] = [
    Need {
        cap: CAP_SYS_PTRACE,
        why: "reading other users' processes: /proc/PID/exe, /proc/PID/maps and their memory",
    },
    Need {
        cap: CAP_DAC_READ_SEARCH,
        why: "opening executables the agent's user may not read",
    },
    Need {
        cap: CAP_LEASE,
        why: "holding a read lease on each probed executable of another user, so that a \
              rewrite in place (cp over it) waits until its uprobes are gone: without it, the \
              rewritten program started at once may run into the old breakpoints and crash",
    },
];

/// Loading the BPF programs, and uprobe_multi links (which ask for nothing
/// more); CAP_SYS_ADMIN stands for both.
pub const NEEDED_TO_LOAD: [Need; 2] = [
    Need {
        cap: CAP_BPF,
        why: "loading the BPF programs and creating their maps and uprobe_multi links \
              (CAP_SYS_ADMIN would do too)",
    },
    Need {
        cap: CAP_PERFMON,
        why: "loading tracing BPF programs (uprobes, raw tracepoints) that read process memory \
              (CAP_SYS_ADMIN would do too)",
    },
];

/// Perf-event uprobes, the path where the kernel has no working
/// uprobe_multi links (before Linux 6.6, or refused) or `--uprobe-mode
/// perf` asks for them.
pub const NEEDED_FOR_PERF: Need = Need {
    cap: CAP_SYS_ADMIN,
    why: "creating perf-event uprobes (perf_event_open asks for it since Linux 6.16 and the \
          stable kernels patched in July 2025), the way uprobes go in where the kernel has no \
          working uprobe_multi links (before Linux 6.6), which need only CAP_BPF and \
          CAP_PERFMON",
};

/// What to do when a needed capability is missing (`--capability-check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckMode {
    /// Refuse to start, naming what is missing.
    Enforce,
    /// Log what is missing once and go on (e.g. watching only processes of
    /// the agent's own user, or on a kernel where CAP_BPF and CAP_PERFMON
    /// still allow uprobes): whatever needs it fails later.
    Warn,
}

/// The capabilities needed and missing.
#[derive(Debug, thiserror::Error)]
pub enum CapError {
    #[error("reading the agent's capabilities from /proc/self/status: {0}")]
    Read(#[from] io::Error),
    #[error("{}", Missing(.0))]
    Missing(Vec<&'static Need>),
}

/// Names each missing capability and what it is for.
struct Missing<'a>(&'a [&'static Need]);

impl fmt::Display for Missing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the agent lacks ")?;
        for (i, need) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{}, needed for {}", need.cap.name, need.why)?;
        }
        write!(
            f,
            "; run it as root or grant it {} (deploy/README.md)",
            self.0
                .iter()
                .map(|n| n.cap.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The effective set from the `CapEff:` line of /proc/self/status.
fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// This process's effective capabilities.
pub fn effective() -> io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status).ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

pub fn has(effective: u64, cap: Capability) -> bool {
    effective & (1 << cap.bit) != 0
}

/// The needs an effective set leaves unmet: those of every path, and with
/// `path` (once the kernel's is known) that path's.
pub fn missing(effective: u64, path: Option<UprobePath>) -> Vec<&'static Need> {
    let admin = has(effective, CAP_SYS_ADMIN);
    let mut lacking: Vec<&'static Need> =
        NEEDED.iter().filter(|n| !has(effective, n.cap)).collect();
    if !admin {
        lacking.extend(NEEDED_TO_LOAD.iter().filter(|n| !has(effective, n.cap)));
    }
    if path == Some(UprobePath::Perf) && !admin {
        lacking.push(&NEEDED_FOR_PERF);
    }
    lacking
}

/// The start-up check, before the programs are loaded (`None`) and again
/// once the way uprobes go in is known: an error naming what is missing.
pub fn check(path: Option<UprobePath>) -> Result<(), CapError> {
    let lacking = missing(effective()?, path);
    if lacking.is_empty() {
        Ok(())
    } else {
        Err(CapError::Missing(lacking))
    }
}

/// Why loading BPF programs may have failed: ` (...)` naming what the agent
/// lacks of what the kernel asks for, else empty.
pub fn bpf_load_hint() -> String {
    let Ok(e) = effective() else {
        return String::new();
    };
    if has(e, CAP_SYS_ADMIN) {
        return String::new();
    }
    let lacking: Vec<&str> = NEEDED_TO_LOAD
        .iter()
        .filter(|n| !has(e, n.cap))
        .map(|n| n.cap.name)
        .collect();
    if lacking.is_empty() {
        return String::new();
    }
    format!(
        " (loading BPF programs needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN; the agent lacks \
         {})",
        lacking.join(" and ")
    )
}

/// Why creating a uprobe may have been refused: ` (...)` when the error is
/// a permission error and the agent lacks CAP_SYS_ADMIN, else empty.
pub fn uprobe_hint(err: &anyhow::Error) -> &'static str {
    let denied = err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|io| matches!(io.kind(), io::ErrorKind::PermissionDenied))
    });
    match effective() {
        Ok(e) if denied && !has(e, CAP_SYS_ADMIN) => {
            " (creating uprobes needs CAP_SYS_ADMIN on Linux 6.16+ and patched stable kernels)"
        }
        _ => "",
    }
}

/// Which capability a permission error about process `pid` points at:
/// /proc/PID/exe unreadable as a link is the ptrace check (CAP_SYS_PTRACE),
/// readable but not openable is the file's mode (CAP_DAC_READ_SEARCH).
/// `None` when neither is denied, or the agent holds the one denied (then
/// an LSM or Yama said no).
pub fn target_hint(pid: u32) -> Option<String> {
    let eff = effective().ok()?;
    let exe = format!("/proc/{pid}/exe");
    let denied =
        |r: io::Result<()>| matches!(r, Err(e) if e.kind() == io::ErrorKind::PermissionDenied);
    let cap = if denied(fs::read_link(&exe).map(drop)) {
        CAP_SYS_PTRACE
    } else if denied(fs::File::open(&exe).map(drop)) {
        CAP_DAC_READ_SEARCH
    } else {
        return None;
    };
    let need = NEEDED.iter().find(|n| n.cap == cap)?;
    (!has(eff, cap)).then(|| format!("the agent lacks {}, needed for {}", cap.name, need.why))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tgopulse\nCapInh:\t0000000000000000\nCapPrm:\t0000000000280004\n\
                          CapEff:\t0000000010280004\nCapBnd:\t0000000010280004\n";

    #[test]
    fn parses_the_effective_set() {
        assert_eq!(parse_cap_eff(STATUS), Some(0x1028_0004));
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    fn set(caps: &[Capability]) -> u64 {
        caps.iter().fold(0, |s, c| s | (1 << c.bit))
    }

    fn names(lacking: &[&Need]) -> Vec<&'static str> {
        lacking.iter().map(|n| n.cap.name).collect()
    }

    #[test]
    fn names_what_is_missing() {
        let common = set(&[CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_LEASE]);
        let multi = common | set(&[CAP_BPF, CAP_PERFMON]);
        let admin = common | set(&[CAP_SYS_ADMIN]);
        for path in [None, Some(UprobePath::Multi)] {
            assert!(missing(multi, path).is_empty());
            assert!(missing(admin, path).is_empty());
        }
        assert!(missing(admin, Some(UprobePath::Perf)).is_empty());
        // Root's full set.
        assert!(missing(0x1ff_ffff_ffff, Some(UprobePath::Perf)).is_empty());
        // CAP_BPF and CAP_PERFMON load the programs and make uprobe_multi
        // links, but not perf-event uprobes.
        assert_eq!(
            names(&missing(multi, Some(UprobePath::Perf))),
            ["CAP_SYS_ADMIN"]
        );
        assert_eq!(
            names(&missing(multi & !set(&[CAP_SYS_PTRACE]), None)),
            ["CAP_SYS_PTRACE"]
        );
        assert_eq!(
            names(&missing(multi & !set(&[CAP_BPF]), Some(UprobePath::Multi))),
            ["CAP_BPF"]
        );
        assert_eq!(
            names(&missing(common, Some(UprobePath::Perf))),
            ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"]
        );
        let text = CapError::Missing(missing(0, Some(UprobePath::Perf))).to_string();
        for name in [
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_DAC_READ_SEARCH",
            "CAP_LEASE",
            "CAP_BPF",
            "CAP_PERFMON",
        ] {
            assert_eq!(
                text.matches(&format!("{name}, needed for")).count(),
                1,
                "{name} in {text}"
            );
        }
    }

    #[test]
    fn own_process() {
        // Whatever this runs as, it can read its own set, and its own
        // executable needs no capability.
        assert!(effective().is_ok());
        assert_eq!(target_hint(std::process::id()), None);
    }
}
