//! Go function names for growth sites. The symbolizer keeps where each
//! name is in the executable, not the names (15 MB in a big binary, for as
//! long as it runs); a site's name is read from the file its process runs
//! when the site is first seen, and kept. That file cannot change while the
//! process runs (the kernel refuses to write a running program: ETXTBSY).
//!
//! A site is named as `go tool pprof` names the pc: the innermost of the
//! functions the compiler inlined there (read from pclntab's inline
//! trees, which stripped binaries keep), past those that are plumbing (an
//! inlined `net/http.Header.Set` names its caller, as a called one does).
use std::{collections::HashMap, sync::Mutex};

use crate::{
    discover::exe::{ExeKey, Stamp},
    inspect::{Symbolizer, symname},
    plan::Plumbing,
};

/// The function names of one executable.
#[derive(Debug)]
pub struct FunctionNames {
    symbolizer: Symbolizer,
    /// The file the symbolizer was made from.
    exe: ExeKey,
    stamp: Stamp,
    /// Names read so far, by function index: sites are call sites of
    /// functions that insert into maps, a few hundred in a big program.
    read: Mutex<HashMap<usize, String>>,
    /// Site names read so far, by return address.
    sites: Mutex<HashMap<u64, String>>,
    /// What the site walk steps over, for the inlined frames of a site.
    plumbing: Plumbing,
}

/// Names kept at most (past it, read again each time they are asked for).
const MAX_KEPT: usize = 1 << 16;

impl FunctionNames {
    pub fn new(symbolizer: Symbolizer, exe: ExeKey, stamp: Stamp, plumbing: Plumbing) -> Self {
        Self {
            symbolizer,
            exe,
            stamp,
            read: Mutex::default(),
            sites: Mutex::default(),
            plumbing,
        }
    }

    pub fn symbolizer(&self) -> &Symbolizer {
        &self.symbolizer
    }

    /// The Go function containing `pc` (a link-time address), as its import
    /// path reads, read from the executable process `pid` runs; `None` when `pc` is in no function,
    /// or that file is gone or not the one the symbolizer was made from
    /// (the process exited, or ran exec, a moment ago).
    pub fn function_at(&self, pid: u32, pc: u64) -> Option<String> {
        let i = self.symbolizer.index_at(pc)?;
        let lock = || self.read.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = lock().get(&i) {
            return Some(name.clone());
        }
        let (file, exe, stamp) = ExeKey::open(pid).ok()?;
        if (exe, stamp) != (self.exe, self.stamp) {
            return None;
        }
        // As the import path reads (`yaml.v3`, not Go's `yaml%2ev3`).
        let name = symname::unescape(&self.symbolizer.name_in_file(&file, i)?).into_owned();
        let mut read = lock();
        if read.len() < MAX_KEPT {
            read.insert(i, name.clone());
        }
        Some(name)
    }

    /// The site a probe's return address `ret` (link-time) names: of the
    /// functions at its call (`ret - 1`), inlined ones innermost first, the
    /// first that is not plumbing, as its import path reads; the
    /// executable's own function there when all are (the walk stopped in
    /// it: an outermost site). `None` as for [`FunctionNames::function_at`].
    pub fn site_at(&self, pid: u32, ret: u64) -> Option<String> {
        let lock = || self.sites.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = lock().get(&ret) {
            return Some(name.clone());
        }
        let (file, exe, stamp) = ExeKey::open(pid).ok()?;
        if (exe, stamp) != (self.exe, self.stamp) {
            return None;
        }
        let frames = self.symbolizer.frames_in(&file, ret.wrapping_sub(1))?;
        let name = pick_site(&self.plumbing, frames)?;
        let mut sites = lock();
        if sites.len() < MAX_KEPT {
            sites.insert(ret, name.clone());
        }
        Some(name)
    }
}

impl FunctionNames {
    /// The functions at the call before return address `ret` (link-time),
    /// inlined ones innermost first, as their import paths read.
    pub fn frames_at(&self, pid: u32, ret: u64) -> Option<Vec<String>> {
        let (file, exe, stamp) = ExeKey::open(pid).ok()?;
        if (exe, stamp) != (self.exe, self.stamp) {
            return None;
        }
        let frames = self.symbolizer.frames_in(&file, ret.wrapping_sub(1))?;
        Some(
            frames
                .into_iter()
                .map(|f| symname::unescape(&f).into_owned())
                .collect(),
        )
    }

    /// Whether a function is plumbing to the site walk.
    pub fn is_plumbing(&self, function: &str) -> bool {
        self.plumbing.class(function) == Some(true)
    }
}

/// Of the functions at a pc, innermost first (escaped), the site: the
/// first not plumbing, else the last (the function whose code it is).
fn pick_site(plumbing: &Plumbing, frames: Vec<String>) -> Option<String> {
    let names: Vec<String> = frames
        .into_iter()
        .map(|f| symname::unescape(&f).into_owned())
        .collect();
    names
        .iter()
        .find(|n| plumbing.class(n) != Some(true))
        .or(names.last())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_function_not_plumbing_is_the_site() {
        let p = Plumbing::default();
        let frames = |f: &[&str]| f.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let pick = |f: &[&str]| pick_site(&p, frames(f));
        assert_eq!(
            pick(&["main.(*Registry).add", "main.fill"]).as_deref(),
            Some("main.(*Registry).add")
        );
        // An inlined Header.Set (and the MIMEHeader.Set inlined into it)
        // names its caller.
        assert_eq!(
            pick(&[
                "net/textproto.MIMEHeader.Set",
                "net/http.Header.Set",
                "main.fillHeader"
            ])
            .as_deref(),
            Some("main.fillHeader")
        );
        assert_eq!(
            pick(&["example.com/a%2eb.F", "main.g"]).as_deref(),
            Some("example.com/a.b.F")
        );
        // All plumbing: the function whose code it is.
        assert_eq!(
            pick(&["runtime.add", "runtime.mapassign"]).as_deref(),
            Some("runtime.mapassign")
        );
        assert_eq!(pick(&[]), None);
    }
}
