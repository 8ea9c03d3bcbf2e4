//! Struct types from an executable's DWARF, read a window at a time:
//! `.debug_info` is decompressed as a stream (Go compresses it with zlib)
//! and walked entry by entry, so reading it costs a window of memory, not
//! the section (Go puts every type of a program in one unit, as large as
//! the program is).
//!
//! Named structs are found by name in one pass. A nested field
//! (`gFree.stack.size`) is found by following the types of the members on
//! its path, which Go gives as `.debug_info` offsets (`DW_FORM_ref_addr`)
//! to the struct, or to the typedef of a named type, which points back at
//! the struct written right before it. The walk keeps the absolute offset
//! of each entry and reads the entries the declared paths lead to as it
//! passes them (a typedef with the struct it just read); one behind it is
//! read by another pass, which stops past the last offset still wanted.
//! Go's runtime takes one more pass: the named types of `gFree.stack`,
//! `heapStats` and `cpuStats` lie before the structs holding them.
use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap},
    io::Read,
};

use gimli::{
    AttributeValue, DebugAbbrev, DebugAbbrevOffset, DebugInfoOffset, DebugStr, Encoding,
    EndianSlice, RunTimeEndian, UnitHeader, UnitType,
};
use object::{CompressionFormat, Object, ObjectSection};

use crate::InspectError;

/// A struct type found in the DWARF.
#[derive(Clone, Debug, Default)]
pub struct Struct {
    pub size: Option<u64>,
    /// Member name → where it is and what it is.
    pub members: HashMap<String, Member>,
}

/// A struct member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// Byte offset in the struct (`None` when not a constant).
    pub offset: Option<u64>,
    /// `.debug_info` offset of the entry describing its type.
    pub ty: Option<u64>,
}

/// What was read: the struct types asked for by name, and the offsets of
/// the nested fields declared.
#[derive(Debug, Default)]
pub struct Structs {
    named: HashMap<String, Struct>,
    /// (struct, dotted path) → the path's offset in the struct: `None`
    /// when a field on it does not exist, an error when the DWARF does
    /// not hold together on the way.
    paths: HashMap<(String, String), Result<Option<u64>, String>>,
    /// Passes over `.debug_info` the read took (tests count them).
    #[cfg_attr(not(test), allow(dead_code))]
    passes: usize,
}

impl Structs {
    /// The struct type of that name, if it was asked for and found.
    pub fn get(&self, name: &str) -> Option<&Struct> {
        self.named.get(name)
    }

    /// How many passes over `.debug_info` the read took.
    #[cfg(test)]
    fn passes(&self) -> usize {
        self.passes
    }

    /// The offset of `path` in the struct `strukt`: a member's name, or a
    /// dotted path through members of struct type (`gFree.stack.size`),
    /// which must have been declared to the read. `Ok(None)` when a field
    /// on the path does not exist (another release's layout); an error
    /// when the struct was not found, the path was not declared, or the
    /// DWARF on the way is inconsistent.
    pub fn path_offset(&self, strukt: &str, path: &str) -> Result<Option<u64>, InspectError> {
        let s = self
            .named
            .get(strukt)
            .ok_or_else(|| InspectError::MissingType(strukt.to_owned()))?;
        if !path.contains('.') {
            return match s.members.get(path) {
                None => Ok(None),
                Some(Member {
                    offset: Some(at), ..
                }) => Ok(Some(*at)),
                Some(_) => Err(corrupt(
                    ".debug_info",
                    format!("{strukt}.{path} has no constant offset"),
                )),
            };
        }
        match self.paths.get(&(strukt.to_owned(), path.to_owned())) {
            Some(Ok(at)) => Ok(*at),
            Some(Err(e)) => Err(corrupt(".debug_info", format!("{strukt}.{path}: {e}"))),
            None => Err(InspectError::MissingType(format!(
                "{strukt}.{path} (a nested field the DWARF was not read for: declare it, \
                 see layout::PATHS)"
            ))),
        }
    }
}

/// `.debug_info` is claimed larger than this uncompressed: taken as corrupt
/// (Go's is tens of MB at most), and no more than this is ever read.
const MAX_INFO: u64 = 1 << 30;

/// What `.debug_abbrev` and `.debug_str` may take decompressed: they are
/// read whole (Go writes a few hundred bytes of abbreviations and names
/// inline; mapped, an uncompressed section costs no memory at all).
const MAX_SMALL: u64 = 16 << 20;

/// The window `.debug_info` is read through.
pub const WINDOW: usize = 256 << 10;

/// The largest single entry the window grows to hold.
const MAX_ENTRY: usize = 16 << 20;

/// A unit header's longest form: 64-bit length, version, unit type,
/// address size, abbreviation offset, type signature and offset.
const MAX_HEADER: usize = 12 + 2 + 1 + 1 + 8 + 8 + 8;

/// Typedefs followed from a member to its struct type: Go writes one (the
/// named type); more is a loop in corrupt DWARF.
const MAX_TYPEDEFS: usize = 8;

/// Members kept of a struct read but not asked for (in case the typedef
/// after it is wanted), and 64 bytes of names each: Go's runtime structs
/// have a few hundred at most.
const MAX_KEPT: usize = 4096;

/// Passes over `.debug_info`: Go's runtime needs two (see the module's
/// doc); what corrupt DWARF leaves unread after this many is reported per
/// path.
const MAX_PASSES: usize = 8;

fn corrupt(section: &'static str, detail: impl ToString) -> InspectError {
    InspectError::Corrupt {
        section,
        detail: detail.to_string(),
    }
}

/// The first struct type of each `wanted` name in the executable's DWARF,
/// with the offsets of the nested fields `paths` ((struct, dotted path),
/// the struct among `wanted`); `None` when it has no DWARF (`-ldflags=-w`,
/// or stripped).
pub fn structs(
    file: &object::File<'_>,
    wanted: &[&str],
    paths: &[(&str, &str)],
) -> Result<Option<Structs>, InspectError> {
    structs_through(file, wanted, paths, WINDOW)
}

/// [`structs`] reading `.debug_info` through a window of `window` bytes
/// (tests: any window reads the same).
pub fn structs_through(
    file: &object::File<'_>,
    wanted: &[&str],
    paths: &[(&str, &str)],
    window: usize,
) -> Result<Option<Structs>, InspectError> {
    let Some(info) = file.section_by_name(".debug_info") else {
        return Ok(None);
    };
    let abbrev = small_section(file, ".debug_abbrev")?
        .ok_or_else(|| corrupt(".debug_abbrev", "missing while .debug_info is present"))?;
    let strings = small_section(file, ".debug_str")?.unwrap_or_default();
    let endian = if file.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let info = info
        .compressed_data()
        .map_err(|e| corrupt(".debug_info", e))?;
    if info.uncompressed_size > MAX_INFO {
        return Err(corrupt(
            ".debug_info",
            format!("claims {} bytes uncompressed", info.uncompressed_size),
        ));
    }
    let size = info.uncompressed_size;
    let reader = Reader {
        abbrev: DebugAbbrev::new(&abbrev, endian),
        strings: DebugStr::new(&strings, endian),
        endian,
    };
    // No wider than the section: a small one (a fuzzer's) needs no more.
    let window = window.min(usize::try_from(size).unwrap_or(usize::MAX));
    let mut search = Search::new(wanted, paths);
    // One window's memory for every pass.
    let mut buf = Vec::new();
    let mut passes = 0;
    for pass in 0..MAX_PASSES {
        passes += 1;
        let stream: Box<dyn Read + '_> = match info.format {
            CompressionFormat::None => Box::new(info.data),
            CompressionFormat::Zlib => Box::new(flate2::read::ZlibDecoder::new(info.data)),
            CompressionFormat::Zstandard => Box::new(
                ruzstd::decoding::StreamingDecoder::new(info.data)
                    .map_err(|e| corrupt(".debug_info", e))?,
            ),
            other => {
                return Err(corrupt(
                    ".debug_info",
                    format!("unsupported compression {other:?}"),
                ));
            }
        };
        let mut through = Window::new(stream.take(size), std::mem::take(&mut buf), window);
        let read = search.at.len();
        reader
            .pass(&mut through, &mut search, pass == 0)
            .map_err(|e| corrupt(".debug_info", e))?;
        buf = through.into_buffer();
        // After the first pass every offset wanted is looked for from the
        // start: none read means no entry starts at any of them.
        if pass > 0 && search.at.len() == read {
            search.give_up("no entry starts there");
        }
        if search.wanted.is_empty() {
            break;
        }
    }
    search.give_up(&format!("not reached in {MAX_PASSES} passes"));
    Ok(Some(Structs {
        passes,
        ..search.finish()
    }))
}

/// A section's bytes, decompressed when they are compressed (at most
/// [`MAX_SMALL`]); `None` when absent.
fn small_section<'a>(
    file: &object::File<'a>,
    name: &'static str,
) -> Result<Option<Cow<'a, [u8]>>, InspectError> {
    let Some(section) = file.section_by_name(name) else {
        return Ok(None);
    };
    // `uncompressed_data()`, with the claimed size checked before any allocation.
    let compressed = section.compressed_data().map_err(|e| corrupt(name, e))?;
    if compressed.uncompressed_size > MAX_SMALL {
        return Err(corrupt(
            name,
            format!("claims {} bytes uncompressed", compressed.uncompressed_size),
        ));
    }
    compressed
        .decompress()
        .map(Some)
        .map_err(|e| corrupt(name, e))
}

/// An entry a path leads to.
#[derive(Debug)]
enum Die {
    Struct(Struct),
    /// A typedef, and the entry of the type it names.
    Typedef(Option<u64>),
    /// Another kind of entry.
    Other(gimli::DwTag),
    /// Nothing was found there (why).
    Absent(String),
}

/// Where resolving a path got.
enum Step {
    /// Its offset, or `None`: a field on it does not exist.
    Done(Option<u64>),
    /// The entry at this offset is needed to go on.
    Need(u64),
    /// The DWARF does not hold together.
    Bad(String),
    /// Its struct was not found by name.
    NoStruct,
}

/// What a read looks for, and what it found so far.
struct Search<'q> {
    names: Vec<&'q str>,
    paths: Vec<(&'q str, &'q str)>,
    named: HashMap<String, Struct>,
    /// The entries the paths led to, by offset.
    at: HashMap<u64, Die>,
    /// Offsets the paths lead to next, not read yet.
    wanted: BTreeSet<u64>,
}

impl<'q> Search<'q> {
    fn new(names: &[&'q str], paths: &[(&'q str, &'q str)]) -> Self {
        let mut names = names.to_vec();
        names.sort_unstable();
        names.dedup();
        let mut paths: Vec<_> = paths
            .iter()
            .filter(|(_, p)| p.contains('.'))
            .copied()
            .collect();
        paths.sort_unstable();
        paths.dedup();
        Self {
            names,
            paths,
            named: HashMap::new(),
            at: HashMap::new(),
            wanted: BTreeSet::new(),
        }
    }

    /// The wanted name equal to `name`.
    fn wants(&self, name: &[u8]) -> Option<&'q str> {
        self.names
            .iter()
            .find(|n| n.as_bytes() == name && !self.named.contains_key(**n))
            .copied()
    }

    /// Whether a pass at `offset` has nothing left to find ahead.
    fn done(&self, names: bool, offset: u64) -> bool {
        (!names || self.named.len() == self.names.len())
            && self.wanted.range(offset..).next().is_none()
    }

    fn store_struct(&mut self, name: Option<&str>, at: Option<u64>, s: Struct) {
        match (name, at) {
            (Some(name), Some(at)) => {
                self.at.insert(at, Die::Struct(s.clone()));
                self.named.insert(name.to_owned(), s);
            }
            (Some(name), None) => {
                self.named.insert(name.to_owned(), s);
            }
            (None, Some(at)) => {
                self.at.insert(at, Die::Struct(s));
            }
            (None, None) => return,
        }
        self.update();
    }

    fn store(&mut self, at: u64, die: Die) {
        self.at.insert(at, die);
        self.update();
    }

    /// The offsets the paths lead to next.
    fn update(&mut self) {
        self.wanted = self
            .paths
            .iter()
            .filter_map(|&(s, p)| match self.resolve(s, p) {
                Step::Need(at) => Some(at),
                _ => None,
            })
            .collect();
    }

    /// Marks what is still wanted as found nowhere.
    fn give_up(&mut self, why: &str) {
        for at in std::mem::take(&mut self.wanted) {
            self.at.insert(at, Die::Absent(why.to_owned()));
        }
        self.update();
    }

    /// Follows `path` from the struct named `strukt` as far as what was read goes.
    fn resolve(&self, strukt: &str, path: &str) -> Step {
        let Some(mut s) = self.named.get(strukt) else {
            return Step::NoStruct;
        };
        let mut total = 0u64;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let Some(member) = s.members.get(part) else {
                return Step::Done(None);
            };
            let Some(offset) = member.offset else {
                return Step::Bad(format!("{part} has no constant offset"));
            };
            let Some(sum) = total.checked_add(offset) else {
                return Step::Bad(format!("{part} lies past the end of the address space"));
            };
            total = sum;
            if parts.peek().is_none() {
                break;
            }
            let Some(mut ty) = member.ty else {
                return Step::Bad(format!("{part} has no type"));
            };
            let mut typedefs = 0;
            s = loop {
                match self.at.get(&ty) {
                    None => return Step::Need(ty),
                    Some(Die::Struct(next)) => break next,
                    Some(Die::Typedef(Some(to))) if typedefs < MAX_TYPEDEFS => {
                        typedefs += 1;
                        ty = *to;
                    }
                    Some(Die::Typedef(Some(_))) => {
                        return Step::Bad(format!("{part}'s type is a loop of typedefs"));
                    }
                    Some(Die::Typedef(None)) => {
                        return Step::Bad(format!("{part}'s type is a typedef of nothing"));
                    }
                    Some(Die::Other(tag)) => {
                        return Step::Bad(format!("{part} is not a struct but a {tag}"));
                    }
                    Some(Die::Absent(why)) => {
                        return Step::Bad(format!("{part}'s type at {ty:#x}: {why}"));
                    }
                }
            };
        }
        Step::Done(Some(total))
    }

    fn finish(self) -> Structs {
        let mut paths = HashMap::new();
        for &(s, p) in &self.paths {
            let found = match self.resolve(s, p) {
                Step::NoStruct => continue,
                Step::Done(at) => Ok(at),
                Step::Bad(e) => Err(e),
                Step::Need(at) => Err(format!("the type at {at:#x} was not read")),
            };
            paths.insert((s.to_owned(), p.to_owned()), found);
        }
        Structs {
            named: self.named,
            paths,
            passes: 0,
        }
    }
}

/// Why the walk stopped.
#[derive(Debug, thiserror::Error)]
enum WalkError {
    #[error(transparent)]
    Dwarf(#[from] gimli::Error),
    #[error("decompressing: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Bad(String),
}

/// A stream read through a window: what is not consumed yet stays, more
/// is read behind it.
struct Window<R> {
    src: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Window<R> {
    /// A window of `size` bytes over `src`, in `buf`'s memory (a previous
    /// window's, or empty).
    fn new(src: R, mut buf: Vec<u8>, size: usize) -> Self {
        buf.clear();
        buf.resize(size.max(MAX_HEADER), 0);
        Self {
            src,
            buf,
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// The bytes not consumed yet, at least `want` of them unless the
    /// stream ends first; the window grows to `want` when smaller.
    fn fill(&mut self, want: usize) -> std::io::Result<&[u8]> {
        if self.end - self.start < want && !self.eof {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            while self.end < self.buf.len() {
                match self.src.read(&mut self.buf[self.end..]) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => self.end += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(&self.buf[self.start..self.end])
    }

    fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }
}

/// What a unit's header says.
struct Header {
    encoding: Encoding,
    abbrev: DebugAbbrevOffset,
    /// Its bytes, the length field included.
    len: usize,
    /// Bytes of entries after it.
    entries: u64,
}

/// Parses the header at the start of `b` (DWARF 2 to 5).
fn header(b: &[u8], endian: RunTimeEndian) -> Result<Header, WalkError> {
    let mut r = EndianSlice::new(b, endian);
    let truncated = |_| WalkError::Bad("truncated unit header".to_owned());
    let (unit_length, format) = gimli::Reader::read_initial_length(&mut r).map_err(truncated)?;
    let version = gimli::Reader::read_u16(&mut r).map_err(truncated)?;
    let offset = |r: &mut EndianSlice<'_, RunTimeEndian>| gimli::Reader::read_offset(r, format);
    let (abbrev, address_size, extra) = match version {
        2..=4 => {
            let abbrev = offset(&mut r).map_err(truncated)?;
            (
                abbrev,
                gimli::Reader::read_u8(&mut r).map_err(truncated)?,
                0,
            )
        }
        5 => {
            let unit_type = gimli::Reader::read_u8(&mut r).map_err(truncated)?;
            let address_size = gimli::Reader::read_u8(&mut r).map_err(truncated)?;
            let abbrev = offset(&mut r).map_err(truncated)?;
            // Type units add a signature and an offset, split and skeleton
            // units an id.
            let extra = match gimli::DwUt(unit_type) {
                gimli::DW_UT_compile | gimli::DW_UT_partial => 0,
                gimli::DW_UT_skeleton | gimli::DW_UT_split_compile => 8,
                gimli::DW_UT_type | gimli::DW_UT_split_type => 8 + format.word_size() as usize,
                _ => return Err(gimli::Error::UnsupportedUnitType.into()),
            };
            (abbrev, address_size, extra)
        }
        _ => return Err(gimli::Error::UnknownVersion(u64::from(version)).into()),
    };
    if !matches!(address_size, 1 | 2 | 4 | 8) {
        return Err(gimli::Error::UnsupportedAddressSize(address_size).into());
    }
    gimli::Reader::skip(&mut r, extra).map_err(truncated)?;
    let len = b.len() - r.len();
    let after_length = len - format.initial_length_size() as usize;
    let entries = (unit_length as u64)
        .checked_sub(after_length as u64)
        .ok_or_else(|| WalkError::Bad("unit shorter than its header".to_owned()))?;
    Ok(Header {
        encoding: Encoding {
            address_size,
            format,
            version,
        },
        abbrev: DebugAbbrevOffset(abbrev),
        len,
        entries,
    })
}

/// One entry as the walk needs it.
enum Entry<'a> {
    /// The end of a list of children.
    Null,
    Die {
        tag: gimli::DwTag,
        children: bool,
        name: Option<&'a [u8]>,
        size: Option<u64>,
        location: Option<u64>,
        /// `.debug_info` offset of its type's entry.
        ty: Option<u64>,
    },
}

/// The struct being read, or the last one read. Every struct is read (in
/// buffers reused from one to the next), so that a typedef wanted right
/// after its struct, as Go writes a named type, finds it without another
/// pass.
#[derive(Default)]
struct Reading<'q> {
    /// Where its entry is.
    at: u64,
    /// Its depth: members are its children.
    depth: isize,
    size: Option<u64>,
    /// The name it is wanted by.
    name: Option<&'q str>,
    /// Wanted at its offset.
    wanted: bool,
    /// Its children are being read.
    open: bool,
    /// It was read whole (its children ended), in this unit.
    read: bool,
    /// Not asked for and larger than [`MAX_KEPT`]: its members are not kept.
    dropped: bool,
    /// Its members' names, end to end.
    names: Vec<u8>,
    /// Its members: where the name is in `names`, and the member.
    members: Vec<(std::ops::Range<usize>, Member)>,
}

impl<'q> Reading<'q> {
    fn start(
        &mut self,
        at: u64,
        depth: isize,
        size: Option<u64>,
        name: Option<&'q str>,
        wanted: bool,
    ) {
        self.at = at;
        self.depth = depth;
        self.size = size;
        self.name = name;
        self.wanted = wanted;
        self.open = true;
        self.read = false;
        self.dropped = false;
        self.names.clear();
        self.members.clear();
    }

    /// Whether the struct being read is one asked for.
    fn reads_wanted(&self) -> bool {
        self.open && (self.name.is_some() || self.wanted)
    }

    fn member(&mut self, name: &[u8], member: Member) {
        if self.dropped {
            return;
        }
        if self.name.is_none()
            && !self.wanted
            && (self.members.len() >= MAX_KEPT || self.names.len() + name.len() > MAX_KEPT * 64)
        {
            self.dropped = true;
            self.names.clear();
            self.members.clear();
            return;
        }
        let start = self.names.len();
        self.names.extend_from_slice(name);
        self.members.push((start..self.names.len(), member));
    }

    fn to_struct(&self) -> Struct {
        let mut members = HashMap::with_capacity(self.members.len());
        for (name, member) in &self.members {
            let name = String::from_utf8_lossy(&self.names[name.clone()]).into_owned();
            members.entry(name).or_insert(*member);
        }
        Struct {
            size: self.size,
            members,
        }
    }

    /// Its children ended: stores it if it was asked for.
    fn close(&mut self, search: &mut Search<'q>) {
        if !self.open {
            return;
        }
        self.open = false;
        self.read = true;
        if self.name.is_some() || self.wanted {
            search.store_struct(self.name, self.wanted.then_some(self.at), self.to_struct());
        }
    }
}

struct Reader<'d> {
    abbrev: DebugAbbrev<EndianSlice<'d, RunTimeEndian>>,
    strings: DebugStr<EndianSlice<'d, RunTimeEndian>>,
    endian: RunTimeEndian,
}

type Raw<'a, 'u, 'w> = gimli::EntriesRaw<'a, 'u, EndianSlice<'w, RunTimeEndian>>;

impl<'d> Reader<'d> {
    /// One pass over the entries, unit by unit and a window at a time,
    /// reading the first structure type of each name still wanted (when
    /// `names`) and the entries at the offsets `search` wants; stops once
    /// nothing is left to find ahead.
    fn pass<'q, R: Read>(
        &self,
        window: &mut Window<R>,
        search: &mut Search<'q>,
        names: bool,
    ) -> Result<(), WalkError> {
        let size = window.buf.len();
        // Go's linker writes one abbreviation table that every unit shares.
        let mut abbrevs: Option<(DebugAbbrevOffset, gimli::Abbreviations)> = None;
        // Where the unit starts in the section.
        let mut unit = 0u64;
        let mut reading = Reading::default();
        while !search.done(names, unit) {
            let b = window.fill(MAX_HEADER)?;
            if b.is_empty() {
                break;
            }
            let h = header(b, self.endian)?;
            window.consume(h.len);
            let entries = unit.saturating_add(h.len as u64);
            if abbrevs.as_ref().map(|(at, _)| *at) != Some(h.abbrev) {
                abbrevs = Some((h.abbrev, self.abbrev.abbreviations(h.abbrev)?));
            }
            let Some((_, table)) = &abbrevs else {
                continue;
            };
            // Depth of the next entry.
            let mut depth = 0isize;
            reading = Reading {
                names: std::mem::take(&mut reading.names),
                members: std::mem::take(&mut reading.members),
                ..Reading::default()
            };
            let mut left = h.entries;
            let mut want = size;
            while left > 0 {
                let b = window.fill(want)?;
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(b.len());
                if n == 0 {
                    return Err(WalkError::Bad("a unit runs past the section".to_owned()));
                }
                let last = n as u64 == left;
                // Where the window starts in the section.
                let start = entries.saturating_add(h.entries - left);
                let slice = EndianSlice::new(&b[..n], self.endian);
                // The window as a unit of its own: entries parse the same
                // whatever precedes them in the real unit.
                let header = UnitHeader::new(
                    h.encoding,
                    n,
                    UnitType::Compilation,
                    h.abbrev,
                    DebugInfoOffset(0).into(),
                    slice,
                );
                let base = header.header_size();
                let mut raw = header.entries_raw(table, None)?;
                let mut used = 0;
                let mut done = false;
                while !raw.is_empty() {
                    let offset = start.saturating_add((raw.next_offset().0 - base) as u64);
                    let entry = match self.entry(&mut raw, unit) {
                        Ok(e) => e,
                        // Cut by the window's end: read it again with more.
                        Err(gimli::Error::UnexpectedEof(_)) if !last => break,
                        Err(e) => return Err(e.into()),
                    };
                    used = raw.next_offset().0 - base;
                    let Entry::Die {
                        tag,
                        children,
                        name,
                        size,
                        location,
                        ty,
                    } = entry
                    else {
                        depth -= 1;
                        continue;
                    };
                    let at = depth;
                    if children {
                        depth += 1;
                    }
                    if reading.open && at <= reading.depth {
                        reading.close(search);
                    }
                    if !reading.reads_wanted() && search.done(names, offset) {
                        done = true;
                        break;
                    }
                    if reading.open {
                        if tag == gimli::DW_TAG_member
                            && at == reading.depth + 1
                            && let Some(name) = name
                        {
                            reading.member(
                                name,
                                Member {
                                    offset: location,
                                    ty,
                                },
                            );
                        }
                        continue;
                    }
                    let wanted_here = search.wanted.contains(&offset);
                    match tag {
                        gimli::DW_TAG_structure_type => {
                            let name = if names {
                                name.and_then(|n| search.wants(n))
                            } else {
                                None
                            };
                            reading.start(offset, at, size, name, wanted_here);
                        }
                        gimli::DW_TAG_typedef if wanted_here => {
                            // The struct it names read just before (how Go
                            // writes a named struct type): kept too.
                            if let Some(to) = ty
                                && to == reading.at
                                && reading.read
                                && !reading.dropped
                                && !search.at.contains_key(&to)
                            {
                                search.store(to, Die::Struct(reading.to_struct()));
                            }
                            search.store(offset, Die::Typedef(ty));
                        }
                        _ if wanted_here => search.store(offset, Die::Other(tag)),
                        _ => {}
                    }
                }
                if done {
                    return Ok(());
                }
                if used == 0 {
                    // Not one whole entry in the window: widen it.
                    if last || want >= MAX_ENTRY {
                        return Err(WalkError::Bad(format!(
                            "an entry larger than {} bytes",
                            want.min(n)
                        )));
                    }
                    want = want.saturating_mul(2).min(MAX_ENTRY);
                    continue;
                }
                want = size;
                window.consume(used);
                left -= used as u64;
            }
            // A unit's end also ends the struct being read, and the last
            // one read is not the one before the next unit's first typedef.
            reading.close(search);
            unit = entries.saturating_add(h.entries);
        }
        Ok(())
    }

    /// Reads one entry: only a struct's, member's or typedef's attributes
    /// are looked at. `unit` is where its unit starts in the section (what
    /// a unit-relative reference is relative to).
    fn entry<'w>(&self, raw: &mut Raw<'_, '_, 'w>, unit: u64) -> gimli::Result<Entry<'w>>
    where
        'd: 'w,
    {
        let Some(abbrev) = raw.read_abbreviation()? else {
            return Ok(Entry::Null);
        };
        let tag = abbrev.tag();
        let children = abbrev.has_children();
        let (mut name, mut size, mut location, mut ty) = (None, None, None, None);
        if tag == gimli::DW_TAG_structure_type
            || tag == gimli::DW_TAG_member
            || tag == gimli::DW_TAG_typedef
        {
            for spec in abbrev.attributes() {
                let attr = raw.read_attribute(*spec)?;
                match attr.name() {
                    gimli::DW_AT_name => {
                        name = match attr.value() {
                            AttributeValue::String(s) => Some(s.slice()),
                            AttributeValue::DebugStrRef(at) => {
                                Some(self.strings.get_str(at)?.slice())
                            }
                            _ => None,
                        }
                    }
                    gimli::DW_AT_byte_size => size = attr.udata_value(),
                    gimli::DW_AT_data_member_location => location = attr.udata_value(),
                    gimli::DW_AT_type => {
                        ty = match attr.value() {
                            AttributeValue::DebugInfoRef(at) => Some(at.0 as u64),
                            AttributeValue::UnitRef(at) => unit.checked_add(at.0 as u64),
                            _ => None,
                        }
                    }
                    _ => {}
                }
            }
        } else {
            raw.skip_attributes(abbrev.attributes())?;
        }
        Ok(Entry::Die {
            tag,
            children,
            name,
            size,
            location,
            ty,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::offsets::tests::{abbrevs, classic_binary, debug_info, elf};

    type Summary = Vec<(String, Option<u64>, Vec<(String, Member)>)>;

    fn summary(s: &Structs) -> Summary {
        let mut v: Vec<_> = s
            .named
            .iter()
            .map(|(n, s)| {
                let mut m: Vec<_> = s.members.iter().map(|(k, v)| (k.clone(), *v)).collect();
                m.sort();
                (n.clone(), s.size, m)
            })
            .collect();
        v.sort();
        v
    }

    /// Every window size from tiny (an entry per window, and entries cut
    /// at every byte) to the default reads the same structs as the whole
    /// section at once.
    #[test]
    fn any_window_reads_the_same() {
        let bin = classic_binary();
        let file = object::File::parse(&*bin).unwrap();
        let wanted = [
            "runtime.m",
            "runtime.hmap",
            "internal/abi.MapType",
            "runtime.g",
        ];
        let whole = summary(&structs(&file, &wanted, &[]).unwrap().unwrap());
        assert_eq!(whole.len(), 4);
        for window in 1..64 {
            let found = structs_through(&file, &wanted, &[], window)
                .unwrap()
                .unwrap();
            assert_eq!(summary(&found), whole, "window {window}");
        }
    }

    #[test]
    fn a_unit_past_the_section_is_an_error() {
        let mut info = debug_info(&[("runtime.g", 8, &[("m", 0)])]);
        let len = u32::from_le_bytes(info[..4].try_into().unwrap());
        info[..4].copy_from_slice(&(len + 100).to_le_bytes());
        let bin = elf(&[(".debug_abbrev", &abbrevs()), (".debug_info", &info)]);
        let file = object::File::parse(&*bin).unwrap();
        for window in [1, 5, WINDOW] {
            assert!(structs_through(&file, &["runtime.m"], &[], window).is_err());
        }
    }

    const DW_TAG_COMPILE_UNIT: u8 = 0x11;
    const DW_TAG_STRUCTURE_TYPE: u8 = 0x13;
    const DW_TAG_MEMBER: u8 = 0x0d;
    const DW_TAG_TYPEDEF: u8 = 0x16;
    const DW_TAG_BASE_TYPE: u8 = 0x24;
    const DW_AT_NAME: u8 = 0x03;
    const DW_AT_BYTE_SIZE: u8 = 0x0b;
    const DW_AT_DATA_MEMBER_LOCATION: u8 = 0x38;
    const DW_AT_TYPE: u8 = 0x49;
    const DW_FORM_STRING: u8 = 0x08;
    const DW_FORM_DATA1: u8 = 0x0b;
    const DW_FORM_REF_ADDR: u8 = 0x10;
    const DW_FORM_REF4: u8 = 0x13;

    /// Go's forms (types referenced by `DW_FORM_ref_addr`), plus a member
    /// whose type is unit-relative (`DW_FORM_ref4`) and one without type.
    #[rustfmt::skip]
    fn typed_abbrevs() -> Vec<u8> {
        vec![
            1, DW_TAG_COMPILE_UNIT, 1, DW_AT_NAME, DW_FORM_STRING, 0, 0,
            2, DW_TAG_STRUCTURE_TYPE, 1, DW_AT_NAME, DW_FORM_STRING, DW_AT_BYTE_SIZE,
            DW_FORM_DATA1, 0, 0,
            3, DW_TAG_MEMBER, 0, DW_AT_NAME, DW_FORM_STRING, DW_AT_DATA_MEMBER_LOCATION,
            DW_FORM_DATA1, DW_AT_TYPE, DW_FORM_REF_ADDR, 0, 0,
            4, DW_TAG_TYPEDEF, 0, DW_AT_NAME, DW_FORM_STRING, DW_AT_TYPE, DW_FORM_REF_ADDR, 0, 0,
            5, DW_TAG_MEMBER, 0, DW_AT_NAME, DW_FORM_STRING, DW_AT_DATA_MEMBER_LOCATION,
            DW_FORM_DATA1, DW_AT_TYPE, DW_FORM_REF4, 0, 0,
            6, DW_TAG_BASE_TYPE, 0, DW_AT_NAME, DW_FORM_STRING, DW_AT_BYTE_SIZE, DW_FORM_DATA1,
            0, 0,
            7, DW_TAG_MEMBER, 0, DW_AT_NAME, DW_FORM_STRING, DW_AT_DATA_MEMBER_LOCATION,
            DW_FORM_DATA1, 0, 0,
            0,
        ]
    }

    /// A type reference: the label of the entry, bytes past its start, and
    /// whether it is unit-relative.
    type Ref = (&'static str, usize, bool);

    /// `.debug_info` written entry by entry (DWARF 4, 32-bit), type
    /// references patched to where their labels end up.
    #[derive(Default)]
    struct Info {
        out: Vec<u8>,
        unit: Option<usize>,
        labels: HashMap<&'static str, usize>,
        /// Where a reference goes, to what, and its unit's start.
        fixups: Vec<(usize, Ref, usize)>,
    }

    impl Info {
        fn unit(&mut self) -> &mut Self {
            self.close();
            self.unit = Some(self.out.len());
            self.out.extend_from_slice(&[0; 4]);
            self.out.extend_from_slice(&4u16.to_le_bytes());
            self.out.extend_from_slice(&0u32.to_le_bytes());
            self.out.push(8);
            self.out.push(1);
            self.str("runtime");
            self
        }

        fn close(&mut self) {
            if let Some(start) = self.unit.take() {
                self.out.push(0);
                let len = u32::try_from(self.out.len() - start - 4).unwrap();
                self.out[start..start + 4].copy_from_slice(&len.to_le_bytes());
            }
        }

        fn str(&mut self, s: &str) {
            self.out.extend_from_slice(s.as_bytes());
            self.out.push(0);
        }

        fn label(&mut self, label: &'static str) {
            assert!(self.labels.insert(label, self.out.len()).is_none());
        }

        fn reference(&mut self, r: Ref) {
            self.fixups.push((self.out.len(), r, self.unit.unwrap()));
            self.out.extend_from_slice(&[0; 4]);
        }

        fn strukt(&mut self, label: &'static str, name: &str, size: u8) -> &mut Self {
            self.label(label);
            self.out.push(2);
            self.str(name);
            self.out.push(size);
            self
        }

        fn member(&mut self, name: &str, offset: u8, ty: Option<Ref>) -> &mut Self {
            self.out.push(match ty {
                None => 7,
                Some((_, _, false)) => 3,
                Some((_, _, true)) => 5,
            });
            self.str(name);
            self.out.push(offset);
            if let Some(r) = ty {
                self.reference(r);
            }
            self
        }

        fn end(&mut self) -> &mut Self {
            self.out.push(0);
            self
        }

        fn typedef(&mut self, label: &'static str, name: &str, to: &'static str) -> &mut Self {
            self.label(label);
            self.out.push(4);
            self.str(name);
            self.reference((to, 0, false));
            self
        }

        fn base(&mut self, label: &'static str, name: &str, size: u8) -> &mut Self {
            self.label(label);
            self.out.push(6);
            self.str(name);
            self.out.push(size);
            self
        }

        fn finish(mut self) -> Vec<u8> {
            self.close();
            for (at, (label, plus, relative), unit) in std::mem::take(&mut self.fixups) {
                let mut to = self.labels[label] + plus;
                if relative {
                    to -= unit;
                }
                self.out[at..at + 4].copy_from_slice(&u32::try_from(to).unwrap().to_le_bytes());
            }
            self.out
        }
    }

    const SCHED: &str = "runtime.schedt";
    const P: &str = "runtime.p";

    /// Paths through Go's shapes: `schedt.gFree` an anonymous struct
    /// written after `schedt` (read in the same pass), its `stack` of a
    /// named type written before (through its typedef, another pass, then
    /// the struct the typedef names, a third), in another unit; `noStack`
    /// through a typedef of that typedef; `p.gFree` unit-relative.
    fn nested_binary() -> Vec<u8> {
        let mut i = Info::default();
        i.unit()
            .strukt("filler", "runtime.other", 8)
            .member("a", 0, None)
            .end()
            .base("int32", "int32", 4)
            .strukt("gList", "runtime.gList", 16)
            .member("head", 0, Some(("int32", 0, false)))
            .member("size", 8, Some(("int32", 0, false)))
            .end()
            .typedef("gListT", "runtime.gList", "gList")
            .typedef("alias", "runtime.gListAlias", "gListT")
            .typedef("loop", "runtime.loop", "loop");
        i.unit()
            .strukt("pfree", "struct { runtime.gList; n int32 }", 24)
            .member("gList", 0, Some(("gListT", 0, false)))
            .member("n", 16, Some(("int32", 0, false)))
            .end()
            .strukt("sched", SCHED, 250)
            .member("lock", 0, None)
            .member("gFree", 168, Some(("anon", 0, false)))
            .member("cycle", 208, Some(("loop", 0, false)))
            .member("num", 216, Some(("int32", 0, false)))
            .member("bogus", 224, Some(("gList", 1, false)))
            .end()
            .typedef("schedT", SCHED, "sched")
            .strukt("anon", "struct { runtime.stack runtime.gList }", 40)
            .member("lock", 0, None)
            .member("stack", 8, Some(("gListT", 0, false)))
            .member("noStack", 24, Some(("alias", 0, false)))
            .end()
            .strukt("p", P, 64)
            .member("gFree", 32, Some(("pfree", 0, true)))
            .end();
        let info = i.finish();
        elf(&[(".debug_abbrev", &typed_abbrevs()), (".debug_info", &info)])
    }

    const PATHS: &[(&str, &str)] = &[
        (SCHED, "gFree.stack.size"),
        (SCHED, "gFree.noStack.size"),
        (SCHED, "gFree.noStack.head"),
        (SCHED, "gFree.n"),
        (SCHED, "nothing.x"),
        (SCHED, "cycle.x"),
        (SCHED, "num.x"),
        (SCHED, "lock.x"),
        (SCHED, "bogus.x"),
        (P, "gFree.n"),
        (P, "gFree.gList.size"),
    ];

    fn read(bin: &[u8], window: usize) -> Structs {
        let file = object::File::parse(bin).unwrap();
        structs_through(&file, &[SCHED, P, SCHED], PATHS, window)
            .unwrap()
            .unwrap()
    }

    /// What each path gives: its offset, `None` for a missing field, or an
    /// error's text.
    fn outcomes(s: &Structs) -> Vec<Result<Option<u64>, String>> {
        PATHS
            .iter()
            .map(|(strukt, path)| s.path_offset(strukt, path).map_err(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn nested_fields_follow_member_types() {
        let s = read(&nested_binary(), WINDOW);
        let o = outcomes(&s);
        assert_eq!(o[0], Ok(Some(168 + 8 + 8)));
        assert_eq!(o[1], Ok(Some(168 + 24 + 8)));
        assert_eq!(o[2], Ok(Some(168 + 24)));
        assert_eq!(o[3], Ok(None), "a field missing in the nested struct");
        assert_eq!(o[4], Ok(None), "a field missing in the struct");
        assert!(o[5].as_ref().unwrap_err().contains("loop"), "{:?}", o[5]);
        assert!(
            o[6].as_ref().unwrap_err().contains("not a struct"),
            "{:?}",
            o[6]
        );
        assert!(o[7].as_ref().unwrap_err().contains("no type"), "{:?}", o[7]);
        assert!(
            o[8].as_ref().unwrap_err().contains("no entry"),
            "{:?}",
            o[8]
        );
        assert_eq!(o[9], Ok(Some(32 + 16)), "unit-relative reference");
        assert_eq!(o[10], Ok(Some(32 + 8)));
        // Members: by name, and the other cases of `path_offset`.
        assert_eq!(s.path_offset(SCHED, "gFree").unwrap(), Some(168));
        assert_eq!(s.path_offset(SCHED, "absent").unwrap(), None);
        assert!(matches!(
            s.path_offset("runtime.nope", "a.b"),
            Err(InspectError::MissingType(_))
        ));
        // A nested field not declared to the read is an error, never `None`.
        let undeclared = s.path_offset(SCHED, "gFree.lock").unwrap_err();
        assert!(
            undeclared.to_string().contains("not read for"),
            "{undeclared}"
        );
    }

    /// Go's shapes take two passes: `schedt`, then `gFree`'s anonymous
    /// struct written after it in the first; `gList`'s typedef, written
    /// before, in the second, with the struct it names read right before it.
    #[test]
    fn go_shapes_take_two_passes() {
        let mut i = Info::default();
        i.unit()
            .base("int32", "int32", 4)
            .strukt("gList", "runtime.gList", 16)
            .member("head", 0, Some(("int32", 0, false)))
            .member("size", 8, Some(("int32", 0, false)))
            .end()
            .typedef("gListT", "runtime.gList", "gList")
            .strukt("sched", SCHED, 250)
            .member("gFree", 168, Some(("anon", 0, false)))
            .end()
            .typedef("schedT", SCHED, "sched")
            .strukt("anon", "struct { runtime.stack runtime.gList }", 40)
            .member("stack", 8, Some(("gListT", 0, false)))
            .end();
        let bin = elf(&[
            (".debug_abbrev", &typed_abbrevs()),
            (".debug_info", &i.finish()),
        ]);
        let file = object::File::parse(&*bin).unwrap();
        for window in [1, 9, WINDOW] {
            let s = structs_through(&file, &[SCHED], &[(SCHED, "gFree.stack.size")], window)
                .unwrap()
                .unwrap();
            assert_eq!(
                s.path_offset(SCHED, "gFree.stack.size").unwrap(),
                Some(168 + 8 + 8)
            );
            assert_eq!(s.passes(), 2, "window {window}");
        }
    }

    #[test]
    fn nested_fields_read_the_same_through_any_window() {
        let bin = nested_binary();
        let whole = read(&bin, WINDOW);
        assert_eq!(summary(&whole).len(), 2);
        for window in 1..96 {
            let s = read(&bin, window);
            assert_eq!(summary(&s), summary(&whole), "window {window}");
            assert_eq!(outcomes(&s), outcomes(&whole), "window {window}");
        }
    }

    /// Member types are the entries' offsets in the section, whatever unit
    /// they are in and however they are referenced.
    #[test]
    fn member_types_are_section_offsets() {
        let bin = nested_binary();
        let s = read(&bin, 7);
        let file = object::File::parse(&*bin).unwrap();
        let info = file.section_by_name(".debug_info").unwrap().data().unwrap();
        let name_at = |at: u64| {
            // Abbreviation code, then the name.
            let rest = &info[at as usize + 1..];
            String::from_utf8_lossy(&rest[..rest.iter().position(|&b| b == 0).unwrap()])
                .into_owned()
        };
        let ty = |strukt: &str, member: &str| s.get(strukt).unwrap().members[member].ty.unwrap();
        assert_eq!(
            name_at(ty(SCHED, "gFree")),
            "struct { runtime.stack runtime.gList }"
        );
        assert_eq!(name_at(ty(SCHED, "cycle")), "runtime.loop");
        assert_eq!(name_at(ty(P, "gFree")), "struct { runtime.gList; n int32 }");
        assert_eq!(s.get(SCHED).unwrap().members["lock"].ty, None);
    }
}
