//! Named struct types from an executable's DWARF, read a window at a time:
//! `.debug_info` is decompressed as a stream (Go compresses it with zlib)
//! and walked entry by entry, so reading it costs a window of memory, not
//! the section (Go puts every type of a program in one unit, as large as
//! the program is).
use std::{borrow::Cow, collections::HashMap, io::Read};

use gimli::{
    AttributeValue, DebugAbbrev, DebugAbbrevOffset, DebugInfoOffset, DebugStr, Encoding,
    EndianSlice, RunTimeEndian, UnitHeader, UnitType,
};
use object::{CompressionFormat, Object, ObjectSection};

use crate::InspectError;

/// A struct type found in the DWARF.
#[derive(Default)]
pub struct Struct {
    pub size: Option<u64>,
    /// Member name → byte offset (`None` when not a constant).
    pub members: HashMap<String, Option<u64>>,
}

/// Struct types by name.
pub type Structs = HashMap<String, Struct>;

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

fn corrupt(section: &'static str, detail: impl ToString) -> InspectError {
    InspectError::Corrupt {
        section,
        detail: detail.to_string(),
    }
}

/// The first struct type of each `wanted` name in the executable's DWARF;
/// `None` when it has none (`-ldflags=-w`, or stripped).
pub fn structs(file: &object::File<'_>, wanted: &[&str]) -> Result<Option<Structs>, InspectError> {
    structs_through(file, wanted, WINDOW)
}

pub fn structs_through(
    file: &object::File<'_>,
    wanted: &[&str],
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
    let reader = Reader {
        abbrev: DebugAbbrev::new(&abbrev, endian),
        strings: DebugStr::new(&strings, endian),
        endian,
    };
    // No wider than the section: a small one (a fuzzer's) needs no more.
    let window = window.min(usize::try_from(size).unwrap_or(usize::MAX));
    let mut window = Window::new(stream.take(size), window);
    reader
        .structs(&mut window, wanted)
        .map(Some)
        .map_err(|e| corrupt(".debug_info", e))
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
    fn new(src: R, size: usize) -> Self {
        Self {
            src,
            buf: vec![0; size.max(MAX_HEADER)],
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
    },
}

struct Reader<'d> {
    abbrev: DebugAbbrev<EndianSlice<'d, RunTimeEndian>>,
    strings: DebugStr<EndianSlice<'d, RunTimeEndian>>,
    endian: RunTimeEndian,
}

type Raw<'a, 'u, 'w> = gimli::EntriesRaw<'a, 'u, EndianSlice<'w, RunTimeEndian>>;

impl<'d> Reader<'d> {
    /// One pass over every entry, unit by unit and a window at a time,
    /// keeping the first structure type of each wanted name with its
    /// members; stops once all are found.
    fn structs<R: Read>(
        &self,
        window: &mut Window<R>,
        wanted: &[&str],
    ) -> Result<Structs, WalkError> {
        let size = window.buf.len();
        let mut found = Structs::new();
        // Go's linker writes one abbreviation table that every unit shares.
        let mut abbrevs: Option<(DebugAbbrevOffset, gimli::Abbreviations)> = None;
        while found.len() < wanted.len() {
            let b = window.fill(MAX_HEADER)?;
            if b.is_empty() {
                break;
            }
            let h = header(b, self.endian)?;
            window.consume(h.len);
            if abbrevs.as_ref().map(|(at, _)| *at) != Some(h.abbrev) {
                abbrevs = Some((h.abbrev, self.abbrev.abbreviations(h.abbrev)?));
            }
            let Some((_, table)) = &abbrevs else {
                continue;
            };
            // Depth of the next entry, and the struct being read with its
            // depth: members are its children.
            let mut depth = 0isize;
            let mut current: Option<(String, isize)> = None;
            let mut left = h.entries;
            let mut want = size;
            while left > 0 {
                let b = window.fill(want)?;
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(b.len());
                if n == 0 {
                    return Err(WalkError::Bad("a unit runs past the section".to_owned()));
                }
                let last = n as u64 == left;
                let slice = EndianSlice::new(&b[..n], self.endian);
                // The window as a unit of its own: entries parse the same
                // whatever precedes them in the real unit.
                let unit = UnitHeader::new(
                    h.encoding,
                    n,
                    UnitType::Compilation,
                    h.abbrev,
                    DebugInfoOffset(0).into(),
                    slice,
                );
                let base = unit.header_size();
                let mut raw = unit.entries_raw(table, None)?;
                let mut used = 0;
                let mut done = false;
                while !raw.is_empty() {
                    let entry = match self.entry(&mut raw) {
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
                    } = entry
                    else {
                        depth -= 1;
                        continue;
                    };
                    let at = depth;
                    if children {
                        depth += 1;
                    }
                    if let Some((_, start)) = &current
                        && at <= *start
                    {
                        current = None;
                    }
                    if current.is_none() && found.len() == wanted.len() {
                        done = true;
                        break;
                    }
                    let name = || name.map(|n| String::from_utf8_lossy(n).into_owned());
                    match tag {
                        gimli::DW_TAG_structure_type if current.is_none() => {
                            let Some(name) = name() else {
                                continue;
                            };
                            if !wanted.contains(&name.as_str()) || found.contains_key(&name) {
                                continue;
                            }
                            found.insert(
                                name.clone(),
                                Struct {
                                    size,
                                    ..Default::default()
                                },
                            );
                            current = Some((name, at));
                        }
                        gimli::DW_TAG_member => {
                            let Some((owner, start)) = &current else {
                                continue;
                            };
                            if at != start + 1 {
                                continue;
                            }
                            let Some(name) = name() else {
                                continue;
                            };
                            if let Some(s) = found.get_mut(owner) {
                                s.members.entry(name).or_insert(location);
                            }
                        }
                        _ => {}
                    }
                }
                if done {
                    return Ok(found);
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
            // A unit's end also ends the struct being read.
        }
        Ok(found)
    }

    /// Reads one entry: only a struct's or member's attributes are looked at.
    fn entry<'w>(&self, raw: &mut Raw<'_, '_, 'w>) -> gimli::Result<Entry<'w>>
    where
        'd: 'w,
    {
        let Some(abbrev) = raw.read_abbreviation()? else {
            return Ok(Entry::Null);
        };
        let tag = abbrev.tag();
        let children = abbrev.has_children();
        let (mut name, mut size, mut location) = (None, None, None);
        if tag == gimli::DW_TAG_structure_type || tag == gimli::DW_TAG_member {
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
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every window size from tiny (an entry per window, and entries cut
    /// at every byte) to the default reads the same structs as the whole
    /// section at once.
    #[test]
    fn any_window_reads_the_same() {
        let bin = crate::offsets::tests::classic_binary();
        let file = object::File::parse(&*bin).unwrap();
        let wanted = [
            "runtime.m",
            "runtime.hmap",
            "internal/abi.MapType",
            "runtime.g",
        ];
        let summary = |s: &Structs| {
            let mut v: Vec<_> = s
                .iter()
                .map(|(n, s)| {
                    let mut m: Vec<_> = s.members.iter().map(|(k, v)| (k.clone(), *v)).collect();
                    m.sort();
                    (n.clone(), s.size, m)
                })
                .collect();
            v.sort();
            v
        };
        let whole = summary(&structs(&file, &wanted).unwrap().unwrap());
        assert_eq!(whole.len(), 4);
        for window in 1..64 {
            let found = structs_through(&file, &wanted, window).unwrap().unwrap();
            assert_eq!(summary(&found), whole, "window {window}");
        }
    }

    #[test]
    fn a_unit_past_the_section_is_an_error() {
        let mut info = crate::offsets::tests::debug_info(&[("runtime.g", 8, &[("m", 0)])]);
        let len = u32::from_le_bytes(info[..4].try_into().unwrap());
        info[..4].copy_from_slice(&(len + 100).to_le_bytes());
        let bin = crate::offsets::tests::elf(&[
            (".debug_abbrev", &crate::offsets::tests::abbrevs()),
            (".debug_info", &info),
        ]);
        let file = object::File::parse(&*bin).unwrap();
        for window in [1, 5, WINDOW] {
            assert!(structs_through(&file, &["runtime.m"], window).is_err());
        }
    }
}
