//! Attaching off the attach stage's lock: the kernel can take seconds to
//! attach a uprobe (attaches queue behind its one-at-a-time removals), so
//! [`Probes`](super::Probes) plans under its lock what to attach ([`Job`] for a group of a
//! probed executable, [`Prepare`] for a new one), the caller attaches with
//! no lock of the stage held, and hands the links back
//! ([`Probes::install`](super::Probes::install), [`Probes::attach`](super::Probes::attach)).
use anyhow::Context as _;

use super::{
    ExeKey,
    lease::{drop_then_close, lease},
};
use crate::{
    bpf::{Attacher, Links},
    discover::exe::fd_path,
    plan::{Group, Plan, ProbeSite},
};

/// A group of an executable's probes to attach off the attach stage's
/// lock ([`Job::run`]), then hand back with [`Probes::install`](super::Probes::install).
pub struct Job {
    pub(super) attacher: Attacher,
    pub(super) key: ExeKey,
    pub(super) serial: u64,
    pub(super) group: Group,
    /// A descriptor of the executable of its own, so the path stays this
    /// file whatever happens to the executable's entry meanwhile.
    pub(super) file: std::fs::File,
    pub(super) sites: Vec<ProbeSite>,
}

/// A job done: its links, or why it failed.
pub struct Done {
    pub(super) job: Job,
    pub(super) links: anyhow::Result<Links>,
}

impl Job {
    /// Attaches the group (the slow part; takes no lock of the stage).
    pub fn run(self) -> Done {
        let links = self
            .attacher
            .attach_sites(&fd_path(&self.file), &self.sites);
        Done { job: self, links }
    }
}

/// The probes of an executable not probed yet, attached off the attach
/// stage's lock by [`NewExe::attach`] and handed to [`Probes::attach`](super::Probes::attach).
pub struct NewExe {
    pub(super) file: std::fs::File,
    pub(super) leased: bool,
    pub(super) core: Links,
    pub(super) growth: Links,
    /// With the access probes, if they were on when planned.
    pub(super) access: Option<Links>,
    /// With the slice growth probe, with `--slice-probes always`.
    pub(super) slice: Option<Links>,
}

/// What attaching a new executable needs ([`Probes::attach`](super::Probes::attach) says).
#[derive(Debug)]
pub struct Prepare {
    pub(super) attacher: Attacher,
    pub(super) access: bool,
    pub(super) slice: bool,
}

/// Why [`Probes::attach`](super::Probes::attach) did not attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The executable's probes are not attached: attach them with
    /// [`NewExe::attach`] (off the lock) and call again.
    #[error("the executable's probes must be attached first")]
    NeedExe(Prepare),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl NewExe {
    /// Opens the executable of `pid` (refusing another file than `key`),
    /// takes a lease on it and attaches its GC, growth and (as `prepare`
    /// says) access probes; all or nothing.
    pub fn attach(prepare: Prepare, pid: u32, key: ExeKey, plan: &Plan) -> anyhow::Result<Self> {
        let (file, opened, _) =
            ExeKey::open(pid).with_context(|| format!("opening the executable of pid {pid}"))?;
        // The plan is for the file `key`: after an exec the probes would
        // land mid-instruction in another program.
        if opened != key {
            return Err(crate::watch::Changed.into());
        }
        let leased = lease(&file);
        let path = fd_path(&file);
        let attacher = &prepare.attacher;
        let core = attacher.attach_sites(&path, &plan.core)?;
        let growth = match attacher.attach_sites(&path, &plan.growth) {
            Ok(g) => g,
            Err(e) => {
                drop_then_close(core.into_inner(), file);
                return Err(e);
            }
        };
        let access = prepare.access.then(|| {
            attacher
                .attach_sites(&path, &plan.access)
                .inspect_err(|e| tracing::warn!("attaching map assignment probes: {e:#}"))
                .ok()
        });
        let slice = prepare.slice.then(|| {
            attacher
                .attach_sites(&path, &plan.slice)
                .inspect_err(|e| tracing::warn!("attaching the slice growth probe: {e:#}"))
                .ok()
        });
        Ok(Self {
            file,
            leased,
            core,
            growth,
            access: access.flatten(),
            slice: slice.flatten(),
        })
    }

    /// Detaches its probes, then lets go of the file.
    pub(super) fn discard(self) {
        let mut links = self.core.into_inner();
        links.extend(self.growth.into_inner());
        links.extend(self.access.map(Links::into_inner).unwrap_or_default());
        links.extend(self.slice.map(Links::into_inner).unwrap_or_default());
        drop_then_close(links, self.file);
    }
}
