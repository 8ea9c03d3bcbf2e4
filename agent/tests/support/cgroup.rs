//! Cgroups for tests: directories made under the cgroup2 mount the way the
//! kubelet and the container runtimes name them, removed again afterwards.
use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones), from
/// /proc/self/mountinfo. Only a mount of the hierarchy's root counts: then a
/// directory `<mount>/a/b` shows as `0::/a/b` in /proc/PID/cgroup.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (mount, fs) = line.split_once(" - ")?;
        let fstype = fs.split_whitespace().next()?;
        let mut fields = mount.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
pub fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup a test made under the cgroup2 mount. Dropping it removes the
/// directories this value created, leaf first; ancestors that already
/// existed (or that another run still uses) are left alone.
pub struct TestCgroup {
    path: PathBuf,
    rel: String,
    created: Vec<PathBuf>,
}

impl TestCgroup {
    /// Creates `<mount>/<rel>` and whichever ancestors are missing. The leaf
    /// must be new: a test owns its leaf.
    pub fn create(mount: &Path, rel: &str) -> io::Result<Self> {
        let rel = rel.trim_matches('/');
        let mut cgroup = Self {
            path: mount.join(rel),
            rel: format!("/{rel}"),
            created: Vec::new(),
        };
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        let mut attempts = 0;
        'again: loop {
            let mut dir = mount.to_path_buf();
            for (i, part) in parts.iter().enumerate() {
                dir.push(part);
                let leaf = i + 1 == parts.len();
                match fs::create_dir(&dir) {
                    Ok(()) => cgroup.created.push(dir.clone()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !leaf => {}
                    // Another run removed an empty shared ancestor it had
                    // made between our two mkdirs: make it ourselves.
                    Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 10 => {
                        attempts += 1;
                        continue 'again;
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("creating {}: {e}", dir.display()),
                        ));
                    }
                }
            }
            return Ok(cgroup);
        }
    }

    /// Moves `pid` (and only it) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> io::Result<()> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("writing {pid} to {}: {e}", procs.display()),
            )
        })
    }

    /// The directory under the mount.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a process inside shows it on its `0::` line.
    pub fn rel(&self) -> &str {
        &self.rel
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // A just-reaped process can keep a cgroup busy for a moment.
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        // Still in use (another run's cgroups below it, or a
                        // process that is not ours): not ours to empty.
                        eprintln!("leaving {}: {e}", dir.display());
                        break;
                    }
                }
            }
        }
    }
}

/// A container id and a pod UID no other run uses: hashed from this
/// process's pid, the time and `case`.
pub struct Names {
    pub id: String,
    pub uid: String,
}

impl Names {
    pub fn new(case: u64) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut state = nanos ^ (u64::from(std::process::id()) << 32) ^ case;
        let mut hex = String::new();
        while hex.len() < 96 {
            hex.push_str(&format!("{:016x}", splitmix64(&mut state)));
        }
        let (id, u) = hex.split_at(64);
        let uid = format!(
            "{}-{}-{}-{}-{}",
            &u[..8],
            &u[8..12],
            &u[12..16],
            &u[16..20],
            &u[20..32]
        );
        Self {
            id: id.to_owned(),
            uid,
        }
    }

    /// The systemd driver's spelling (systemd reserves `-`).
    pub fn uid_underscored(&self) -> String {
        self.uid.replace('-', "_")
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The path the kubelet's systemd driver gives a containerd container of a
/// best-effort pod, under `top`.
pub fn containerd_path(top: &str, n: &Names) -> String {
    format!(
        "{top}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
        n.uid_underscored(),
        n.id
    )
}
