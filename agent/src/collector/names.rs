//! Go function names for growth sites. The symbolizer keeps where each
//! name is in the executable, not the names (15 MB in a big binary, for as
//! long as it runs); a site's name is read from the file its process runs
//! when the site is first seen, and kept. That file cannot change while the
//! process runs (the kernel refuses to write a running program: ETXTBSY).
use std::{collections::HashMap, sync::Mutex};

use crate::{
    discover::exe::{ExeKey, Stamp},
    inspect::{Symbolizer, symname},
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
}

/// Names kept at most (past it, read again each time they are asked for).
const MAX_KEPT: usize = 1 << 16;

impl FunctionNames {
    pub fn new(symbolizer: Symbolizer, exe: ExeKey, stamp: Stamp) -> Self {
        Self {
            symbolizer,
            exe,
            stamp,
            read: Mutex::default(),
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
}
