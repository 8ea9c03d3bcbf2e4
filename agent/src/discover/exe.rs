//! Executables as the kernel knows them (device and inode), and the
//! verdict on each — Go or not, which release, watchable or why not —
//! decided once and kept while the file is unchanged.
use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use crate::{
    inspect::{self, InspectError, Release},
    procfs,
};

/// An executable: device and inode.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExeKey {
    pub dev: u64,
    pub ino: u64,
}

impl ExeKey {
    /// The executable process `pid` runs.
    pub fn of(pid: u32) -> io::Result<Self> {
        Ok(Self::stat(pid)?.0)
    }

    /// The key and the file's stamp (a file rewritten in place keeps its
    /// inode, not its mtime and size).
    pub fn stat(pid: u32) -> io::Result<(Self, Stamp)> {
        Ok(Self::of_metadata(&std::fs::metadata(procfs::exe_path(
            pid,
        ))?))
    }

    /// The executable of `pid` opened, with its key and stamp. Read it
    /// through this file, not by path again: the process may exec meanwhile,
    /// and what is read must be the file the key names.
    pub fn open(pid: u32) -> io::Result<(File, Self, Stamp)> {
        let file = File::open(procfs::exe_path(pid))?;
        let (key, stamp) = Self::of_metadata(&file.metadata()?);
        Ok((file, key, stamp))
    }

    fn of_metadata(m: &std::fs::Metadata) -> (Self, Stamp) {
        (
            Self {
                dev: m.dev(),
                ino: m.ino(),
            },
            Stamp {
                mtime_ns: m.mtime() as i128 * 1_000_000_000 + i128::from(m.mtime_nsec()),
                ctime_ns: m.ctime() as i128 * 1_000_000_000 + i128::from(m.ctime_nsec()),
                size: m.size(),
            },
        )
    }
}

/// A path to `file` itself, through /proc: the same file whatever becomes
/// of its path, in any mount namespace (what probes are attached to, and
/// what errors about reading it say).
pub fn fd_path(file: &File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd as _;
    std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// What changes when a file is rewritten in place. The ctime too: `cp -p`
/// puts the old mtime back, a build of the same size is common, but no one
/// can set the ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    mtime_ns: i128,
    ctime_ns: i128,
    size: u64,
}

impl Stamp {
    /// The stamp of an open file now (a write since it was opened shows).
    pub fn of(file: &File) -> io::Result<Self> {
        Ok(ExeKey::of_metadata(&file.metadata()?).1)
    }
}

/// Why an executable is not watched; the `reason` label of
/// `gopulse_discovery_skipped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    /// Not a Go program (or not ELF at all: scripts).
    NotGo,
    /// A Go release, or an architecture, gopulse does not probe.
    Unsupported,
    /// Go, but its executable could not be read or made sense of.
    Refused,
    /// Left out by `--exe-regex`, `--namespace` or `--pod-selector`.
    Filtered,
    /// Beyond `--max-processes`.
    Limit,
    /// Exited before it was looked at.
    Gone,
}

impl Skip {
    pub fn label(self) -> &'static str {
        match self {
            Skip::NotGo => "not_go",
            Skip::Unsupported => "unsupported",
            Skip::Refused => "refused",
            Skip::Filtered => "filtered",
            Skip::Limit => "limit",
            Skip::Gone => "gone",
        }
    }
}

/// The verdict on one executable.
#[derive(Clone, Debug)]
pub enum Verdict {
    Go(Release),
    Skipped(Skip, String),
}

impl Verdict {
    fn of(e: InspectError) -> Self {
        let skip = match e {
            InspectError::NotElf | InspectError::NotGo => Skip::NotGo,
            InspectError::WrongArch(_) | InspectError::UnsupportedVersion { .. } => {
                Skip::Unsupported
            }
            _ => Skip::Refused,
        };
        Verdict::Skipped(skip, e.to_string())
    }
}

struct Entry {
    stamp: Stamp,
    verdict: Verdict,
    used: Instant,
}

/// Verdicts by executable. Bounded: the least recently used go first.
pub struct ExeCache {
    entries: HashMap<ExeKey, Entry>,
    capacity: usize,
    /// Verdicts decided (cache misses), for the metrics.
    pub judged: u64,
}

impl ExeCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            judged: 0,
        }
    }

    /// The executable of `pid` and the verdict on it; the error is from
    /// /proc (the process is gone, or not ours to read).
    pub fn judge(&mut self, pid: u32) -> io::Result<(ExeKey, Verdict)> {
        let (file, key, stamp) = ExeKey::open(pid)?;
        let now = Instant::now();
        if let Some(e) = self.entries.get_mut(&key)
            && e.stamp == stamp
        {
            e.used = now;
            return Ok((key, e.verdict.clone()));
        }
        // Executables without section headers are mapped whole.
        let whole = || {
            crate::exe_map::Mapped::new(&file).map_err(|source| InspectError::Io {
                path: fd_path(&file),
                source,
            })
        };
        let verdict = match inspect::go_release_in(&file, &fd_path(&file), whole) {
            Ok(release) => Verdict::Go(release),
            Err(InspectError::Io { source, .. }) => return Err(source),
            Err(e) => Verdict::of(e),
        };
        self.judged += 1;
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.evict();
        }
        self.entries.insert(
            key,
            Entry {
                stamp,
                verdict: verdict.clone(),
                used: now,
            },
        );
        Ok((key, verdict))
    }

    fn evict(&mut self) {
        // Rare (thousands of distinct executables): a scan is fine.
        if let Some(oldest) = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.used)
            .map(|(k, _)| *k)
        {
            self.entries.remove(&oldest);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets verdicts unused for `idle` (binaries upgraded away).
    pub fn expire(&mut self, idle: Duration) {
        let now = Instant::now();
        self.entries
            .retain(|_, e| now.duration_since(e.used) < idle);
    }
}
