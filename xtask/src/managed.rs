//! Child processes of xtask's long tasks (`demo`, `screenshots`): each in
//! its own process group, dying with xtask, stopped in order and on drop.
use std::{
    fs::{self, File},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// How often a stopping child is checked.
const POLL: Duration = Duration::from_millis(100);
/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A child in its own process group (Ctrl-C reaches only xtask, which stops
/// the children in order) that dies with xtask and is stopped on drop.
pub struct Managed {
    name: &'static str,
    pub child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Managed {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork
        // and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Don't outlive xtask if it is killed outright.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name,
            child,
            log: log.to_path_buf(),
            exited: None,
        })
    }

    /// An error (with the child's log) if it has exited on its own.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.exited = Some(status);
            bail!("the {} exited ({status})\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        const LINES: usize = 40;
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
        format!("--- last lines of {} ---\n{tail}", self.log.display())
    }

    /// SIGTERM, then SIGKILL after a grace period; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        if let Some(status) = self.child.try_wait()? {
            self.exited = Some(status);
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // child, not yet reaped, so it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(status);
            }
            sleep(POLL);
        }
        eprintln!("xtask: the {} ignored SIGTERM; killing it", self.name);
        self.child.kill()?;
        let status = self.child.wait()?;
        self.exited = Some(status);
        Ok(status)
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // Error paths get here with the child running; stop it regardless.
        if let Err(err) = self.stop() {
            eprintln!("xtask: stopping the {}: {err:#}", self.name);
        }
    }
}
