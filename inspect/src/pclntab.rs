//! `.gopclntab`: Go's own function table, present in stripped binaries too.
//! Layout of Go 1.20+ (`runtime/symtab.go` `pcHeader`, magic 0xfffffff1).
use super::InspectError;
use crate::symname::unescape;

/// `_func` (Go 1.20+, `runtime/runtime2.go`): 44 bytes, then `npcdata`
/// pcdata offsets and `nfuncdata` funcdata offsets of 4 bytes each.
const FUNC_HEADER: usize = 44;
const FUNC_NPCDATA: usize = 28;
const FUNC_NFUNCDATA: usize = 43;
/// `internal/abi`: the pc-value table of inline-tree indices, and the tree.
const PCDATA_INL_TREE_INDEX: usize = 2;
const FUNCDATA_INL_TREE: usize = 3;

/// Where a function's inline tree and its index are.
#[derive(Clone, Copy, Debug)]
pub struct InlineTree<'a> {
    /// The function the calls were inlined into (its index).
    pub function: usize,
    /// Bytes of its code (the index covers them).
    pub code_len: u32,
    /// Its `PCDATA_InlTreeIndex` table, up to the end of `pctab` (the
    /// table ends itself).
    pub index: &'a [u8],
    /// Its `FUNCDATA_InlTree`, from `moduledata.gofunc`.
    pub tree_offset: u32,
}

/// Magic of Go 1.20+ tables (1.21–1.27 all use it).
pub const MAGIC_GO120: u32 = 0xffff_fff1;
/// magic, two zero pad bytes, minLC = 1 (amd64), ptrSize = 8.
pub const HEADER_PREFIX: [u8; 8] = [0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8];
const HEADER_LEN: usize = 72;

fn corrupt(detail: impl Into<String>) -> InspectError {
    InspectError::Corrupt {
        section: ".gopclntab",
        detail: detail.into(),
    }
}

/// The `pcHeader` fields we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub nfunc: usize,
    /// As written; 0 from Go 1.26 on (it would need a relocation).
    pub text_start: u64,
    pub funcname_offset: usize,
    /// Where the pc-value tables (`pctab`) start.
    pub pctab_offset: usize,
    pub pcln_offset: usize,
}

/// A parsed function table. `data` starts at the header.
#[derive(Clone, Debug)]
pub struct Pclntab<'a> {
    data: &'a [u8],
    header: Header,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn usize_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64_at(b, at)?).ok()
}

impl<'a> Pclntab<'a> {
    /// Parses the header at the start of `data` and checks that the tables
    /// it points to lie inside `data`.
    pub fn parse(data: &'a [u8]) -> Result<Self, InspectError> {
        if data.len() < HEADER_LEN {
            return Err(corrupt("shorter than its header"));
        }
        let magic = u32_at(data, 0).unwrap_or(0);
        if magic != MAGIC_GO120 {
            return Err(corrupt(format!(
                "magic {magic:#x} is not Go 1.20+'s {MAGIC_GO120:#x}"
            )));
        }
        if data[4..8] != HEADER_PREFIX[4..8] {
            return Err(corrupt("not an amd64 (ptrSize 8, minLC 1) table"));
        }
        let field = |at| usize_at(data, at).ok_or_else(|| corrupt("truncated header"));
        let header = Header {
            nfunc: field(8)?,
            text_start: u64_at(data, 24).unwrap_or(0),
            funcname_offset: field(32)?,
            pctab_offset: field(56)?,
            pcln_offset: field(64)?,
        };
        // The function table: nfunc+1 {entryoff, funcoff} pairs.
        let ftab_len = header
            .nfunc
            .checked_add(1)
            .and_then(|n| n.checked_mul(8))
            .ok_or_else(|| corrupt("absurd function count"))?;
        let ftab_end = header
            .pcln_offset
            .checked_add(ftab_len)
            .ok_or_else(|| corrupt("absurd function table offset"))?;
        if header.nfunc == 0 || ftab_end > data.len() || header.funcname_offset >= data.len() {
            return Err(corrupt("function table outside the section"));
        }
        Ok(Self { data, header })
    }

    pub fn header(&self) -> Header {
        self.header
    }

    /// `(entryoff, funcoff)` of function `i` (i == nfunc gives the end of text).
    fn ftab(&self, i: usize) -> Option<(u32, u32)> {
        let at = self.header.pcln_offset + i * 8;
        Some((u32_at(self.data, at)?, u32_at(self.data, at + 4)?))
    }

    /// Where function `i`'s `_func` record starts in the table.
    fn func(&self, i: usize) -> Option<usize> {
        let (_, funcoff) = self.ftab(i)?;
        self.header.pcln_offset.checked_add(funcoff as usize)
    }

    /// The name of function `i`.
    pub fn name(&self, i: usize) -> Option<&'a str> {
        let func = self.func(i)?;
        self.name_at(u32_at(self.data, func.checked_add(4)?)? as i32)
    }

    /// The name at `name_off` in the function name table (`_func.nameOff`,
    /// `inlinedCall.nameOff`).
    pub fn name_at(&self, name_off: i32) -> Option<&'a str> {
        let start = self
            .header
            .funcname_offset
            .checked_add(usize::try_from(name_off).ok()?)?;
        let rest = self.data.get(start..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..len]).ok()
    }

    /// Function `i`'s name, its code's length, and where its inline tree
    /// is: the pc-value table of inline-tree indices (from the start of
    /// `pctab`) and the tree itself (from `moduledata.gofunc`). `Ok(None)`
    /// when the compiler inlined nothing into it.
    pub fn inline_tree(&self, i: usize) -> Result<Option<InlineTree<'a>>, InspectError> {
        let truncated = || corrupt(format!("function {i}'s record is truncated"));
        let func = self.func(i).ok_or_else(truncated)?;
        let word = |at: usize| {
            func.checked_add(at)
                .and_then(|at| u32_at(self.data, at))
                .ok_or_else(truncated)
        };
        let (entry, _) = self.ftab(i).ok_or_else(truncated)?;
        let (end, _) = self.ftab(i + 1).ok_or_else(truncated)?;
        let npcdata = word(FUNC_NPCDATA)? as usize;
        let nfuncdata = usize::from(
            *self
                .data
                .get(func.checked_add(FUNC_NFUNCDATA).ok_or_else(truncated)?)
                .ok_or_else(truncated)?,
        );
        if npcdata <= PCDATA_INL_TREE_INDEX || nfuncdata <= FUNCDATA_INL_TREE {
            return Ok(None);
        }
        let pcdata = word(FUNC_HEADER + 4 * PCDATA_INL_TREE_INDEX)?;
        let funcdata = word(FUNC_HEADER + 4 * (npcdata + FUNCDATA_INL_TREE))?;
        if pcdata == 0 || funcdata == u32::MAX {
            return Ok(None);
        }
        let index = self
            .header
            .pctab_offset
            .checked_add(pcdata as usize)
            .and_then(|at| self.data.get(at..))
            .ok_or_else(|| {
                corrupt(format!(
                    "function {i}'s inline-tree index lies outside pctab"
                ))
            })?;
        Ok(Some(InlineTree {
            function: i,
            code_len: end.saturating_sub(entry),
            index,
            tree_offset: funcdata,
        }))
    }

    /// Every function as (name, entry offset from text start, end offset).
    pub fn functions(
        &self,
    ) -> impl Iterator<Item = Result<(&'a str, u64, u64), InspectError>> + '_ {
        (0..self.header.nfunc).map(move |i| {
            let (entry, _) = self
                .ftab(i)
                .ok_or_else(|| corrupt("truncated function table"))?;
            let (end, _) = self
                .ftab(i + 1)
                .ok_or_else(|| corrupt("truncated function table"))?;
            let name = self
                .name(i)
                .ok_or_else(|| corrupt(format!("function {i} has no readable name")))?;
            if end < entry {
                return Err(corrupt(format!("function table not sorted at {name}")));
            }
            Ok((name, u64::from(entry), u64::from(end)))
        })
    }

    /// Entries and name offsets, sorted by entry, for PC lookups. `offset`
    /// is where the table starts in the executable, whose bytes the
    /// symbolizer reads names from.
    pub fn symbolizer(&self, text_start: u64, offset: u64) -> Result<Symbolizer, InspectError> {
        let mut entries = Vec::with_capacity(self.header.nfunc);
        for (i, f) in self.functions().enumerate() {
            let (_, entry, _) = f?;
            // Readable: `functions` read the name through it.
            let name = self
                .name_offset(i)
                .ok_or_else(|| corrupt(format!("function {i} has no readable name")))?;
            text_start
                .checked_add(entry)
                .ok_or_else(|| corrupt("function past the end of the address space"))?;
            // From a u32 of the table.
            entries.push((entry as u32, name));
        }
        let (end, _) = self
            .ftab(self.header.nfunc)
            .ok_or_else(|| corrupt("truncated function table"))?;
        let text_end = text_start
            .checked_add(u64::from(end))
            .ok_or_else(|| corrupt("text past the end of the address space"))?;
        let at = |rel: usize| {
            offset
                .checked_add(rel as u64)
                .ok_or_else(|| corrupt("table past the end of the file"))
        };
        Ok(Symbolizer {
            text_start,
            text_end,
            entries,
            names: (at(self.header.funcname_offset)?, at(self.data.len())?),
        })
    }

    /// Where function `i`'s name starts in funcnametab.
    fn name_offset(&self, i: usize) -> Option<u32> {
        let func = self.func(i)?;
        u32::try_from(u32_at(self.data, func.checked_add(4)?)? as i32).ok()
    }
}

/// The longest name read from a file (Go's longest, generic
/// instantiations, run to a few KB).
const MAX_NAME: u64 = 64 << 10;

/// Program counter → Go function name, from pclntab. Kept for as long as
/// an executable is watched, so compact: per function its entry and where
/// its name starts in the executable (8 bytes; Traefik 3.7 has 206,000
/// functions and 15 MB of names), the names read from the executable's
/// bytes when asked for.
#[derive(Clone, Debug, Default)]
pub struct Symbolizer {
    text_start: u64,
    text_end: u64,
    /// (entry - text start, name offset in funcnametab), sorted by entry.
    entries: Vec<(u32, u32)>,
    /// File offsets of funcnametab and of the end of pclntab: names lie
    /// between.
    names: (u64, u64),
}

impl Symbolizer {
    /// The function containing `pc` (a virtual address of the binary), by
    /// index.
    pub fn index_at(&self, pc: u64) -> Option<usize> {
        if pc >= self.text_end {
            return None;
        }
        let rel = pc.checked_sub(self.text_start)?;
        let i = self
            .entries
            .partition_point(|&(entry, _)| u64::from(entry) <= rel);
        i.checked_sub(1)
    }

    /// Where function `i`'s name starts in the executable.
    fn name_at(&self, i: usize) -> Option<u64> {
        let &(_, name) = self.entries.get(i)?;
        self.names.0.checked_add(u64::from(name))
    }

    /// Function `i`'s name, as Go prints it (`main.(*Cache).Put`), in the
    /// executable's bytes `exe` (those it was made from).
    pub fn name_in<'d>(&self, exe: &'d [u8], i: usize) -> Option<&'d str> {
        let start = usize::try_from(self.name_at(i)?).ok()?;
        let end = usize::try_from(self.names.1).ok()?.min(exe.len());
        let rest = exe.get(start..end)?;
        let len = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..len]).ok()
    }

    /// Function `i`'s name, read from the executable's file (the one it was
    /// made from, unchanged).
    pub fn name_in_file(&self, exe: &std::fs::File, i: usize) -> Option<String> {
        use std::os::unix::fs::FileExt as _;
        let mut at = self.name_at(i)?;
        let end = self.names.1.min(at.saturating_add(MAX_NAME));
        let mut name = Vec::new();
        let mut buf = [0u8; 256];
        while at < end {
            let want = usize::try_from((end - at).min(buf.len() as u64)).ok()?;
            let n = exe.read_at(&mut buf[..want], at).ok()?;
            if n == 0 {
                return None;
            }
            if let Some(len) = buf[..n].iter().position(|&b| b == 0) {
                name.extend_from_slice(&buf[..len]);
                return String::from_utf8(name).ok();
            }
            name.extend_from_slice(&buf[..n]);
            at += n as u64;
        }
        None
    }

    /// The Go function containing `pc`, named from the executable's bytes
    /// `exe`.
    pub fn function_at<'d>(&self, exe: &'d [u8], pc: u64) -> Option<&'d str> {
        self.name_in(exe, self.index_at(pc)?)
    }

    /// Entry address of a function by name (first match), from the
    /// executable's bytes `exe`.
    pub fn entry_of(&self, exe: &[u8], name: &str) -> Option<u64> {
        (0..self.entries.len())
            .find(|&i| self.name_in(exe, i) == Some(name))
            .map(|i| self.text_start + u64::from(self.entries[i].0))
    }

    /// The address ranges `[start, end)` covered by runs of consecutive
    /// functions that `class` puts in (`Some(true)`), in ascending order,
    /// names from the executable's bytes `exe`, as their import paths read
    /// ([`crate::symname`]). Functions it calls neutral
    /// (`None`) join a range only between two that are in; those out
    /// (`Some(false)`) end it.
    pub fn ranges(
        &self,
        exe: &[u8],
        mut class: impl FnMut(&str) -> Option<bool>,
    ) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        // The open range: its start and the end of its last function in.
        let mut open: Option<(u64, u64)> = None;
        for (i, &(entry, _)) in self.entries.iter().enumerate() {
            let name = self.name_in(exe, i).unwrap_or("");
            let entry = self.text_start + u64::from(entry);
            let end = self.entries.get(i + 1).map_or(self.text_end, |&(next, _)| {
                self.text_start + u64::from(next)
            });
            match (class(&unescape(name)), open) {
                (Some(true), None) => open = Some((entry, end)),
                (Some(true), Some((start, _))) => open = Some((start, end)),
                (Some(false), Some(range)) => {
                    out.push(range);
                    open = None;
                }
                _ => {}
            }
        }
        out.extend(open);
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes it keeps on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(u32, u32)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table with two functions `a` (0x0..0x20) and `b` (0x20..0x60).
    fn table() -> Vec<u8> {
        let mut t = vec![0u8; HEADER_LEN];
        t[..8].copy_from_slice(&HEADER_PREFIX);
        let funcname_offset = HEADER_LEN;
        let names = b"a\0b\0";
        let pcln_offset = funcname_offset + names.len();
        t[8..16].copy_from_slice(&2u64.to_le_bytes());
        t[24..32].copy_from_slice(&0x401000u64.to_le_bytes());
        t[32..40].copy_from_slice(&(funcname_offset as u64).to_le_bytes());
        t[64..72].copy_from_slice(&(pcln_offset as u64).to_le_bytes());
        t.extend_from_slice(names);
        // ftab: 3 entries; _func records follow at funcoff (relative to pcln).
        let func0 = 24u32;
        let func1 = 32u32;
        for (entry, funcoff) in [(0u32, func0), (0x20, func1), (0x60, 0)] {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&funcoff.to_le_bytes());
        }
        for (entry, name_off) in [(0u32, 0i32), (0x20, 2)] {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&name_off.to_le_bytes());
        }
        t
    }

    #[test]
    fn parses_functions_and_symbolizes() {
        let data = table();
        let p = Pclntab::parse(&data).unwrap();
        assert_eq!(p.header().text_start, 0x401000);
        let funcs: Vec<_> = p.functions().map(Result::unwrap).collect();
        assert_eq!(funcs, vec![("a", 0, 0x20), ("b", 0x20, 0x60)]);
        let s = p.symbolizer(0x401000, 0).unwrap();
        assert_eq!(s.function_at(&data, 0x401000), Some("a"));
        assert_eq!(s.function_at(&data, 0x40101f), Some("a"));
        assert_eq!(s.function_at(&data, 0x401020), Some("b"));
        assert_eq!(s.function_at(&data, 0x40105f), Some("b"));
        assert_eq!(s.function_at(&data, 0x401060), None);
        assert_eq!(s.function_at(&data, 0x400fff), None);
        assert_eq!(s.entry_of(&data, "b"), Some(0x401020));
        let ranges = |class: &dyn Fn(&str) -> Option<bool>| s.ranges(&data, class);
        assert_eq!(ranges(&|n| Some(n == "a")), vec![(0x401000, 0x401020)]);
        assert_eq!(ranges(&|n| Some(n == "b")), vec![(0x401020, 0x401060)]);
        assert_eq!(ranges(&|_| Some(true)), vec![(0x401000, 0x401060)]);
        assert!(ranges(&|_| Some(false)).is_empty());
        // A neutral function neither starts nor ends a range.
        assert_eq!(
            ranges(&|n| (n == "a").then_some(true)),
            vec![(0x401000, 0x401020)]
        );
        assert!(ranges(&|n| (n == "b").then_some(false)).is_empty());
        assert_eq!(s.heap_bytes(), 16);
    }

    /// The table at an offset in a file, names read from the file.
    #[test]
    fn names_from_a_file() {
        let mut file = vec![0xaau8; 100];
        file.extend(table());
        let path = std::env::temp_dir().join(format!("pclntab-{}", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let p = Pclntab::parse(&file[100..]).unwrap();
        let s = p.symbolizer(0x401000, 100).unwrap();
        let from_file = |pc| s.name_in_file(&f, s.index_at(pc)?);
        assert_eq!(from_file(0x401000).as_deref(), Some("a"));
        assert_eq!(from_file(0x401021).as_deref(), Some("b"));
        assert_eq!(from_file(0x401060), None);
        assert_eq!(s.function_at(&file, 0x401021), Some("b"));
        // Another file (shorter): no name rather than a wrong one.
        std::fs::write(&path, &file[..100]).unwrap();
        assert_eq!(from_file(0x401000), None);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn truncations_are_errors() {
        let data = table();
        for cut in 0..data.len() {
            let Ok(p) = Pclntab::parse(&data[..cut]) else {
                continue;
            };
            // The header may fit while names do not: iteration must say so.
            let all: Result<Vec<_>, _> = p.functions().collect();
            assert!(all.is_err(), "cut {cut}");
            assert!(p.symbolizer(0, 0).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn wrong_magic() {
        let mut data = table();
        data[0] = 0xf0;
        assert!(Pclntab::parse(&data).is_err());
    }
}
