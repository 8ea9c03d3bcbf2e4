//! The ELF side of inspection: segments, sections, symbols.
use object::{
    Architecture, Object, ObjectSection, ObjectSegment, ObjectSymbol, ObjectSymbolTable,
    SegmentFlags, SymbolKind,
    elf::{PF_W, PF_X},
};

use super::{InspectError, buildinfo};

/// A PT_LOAD segment.
#[derive(Clone, Copy, Debug)]
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    flags: u32,
}

/// A function symbol.
pub struct Symbol {
    pub name: String,
    pub address: u64,
    pub size: u64,
}

pub struct Elf<'a> {
    data: &'a [u8],
    file: object::File<'a>,
    segments: Vec<Segment>,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, InspectError> {
        if !data.starts_with(b"\x7fELF") {
            return Err(InspectError::NotElf);
        }
        let file = object::File::parse(data).map_err(|e| InspectError::Corrupt {
            section: "ELF header",
            detail: e.to_string(),
        })?;
        if file.architecture() != Architecture::X86_64 || !file.is_64() {
            return Err(InspectError::WrongArch(format!(
                "{:?}",
                file.architecture()
            )));
        }
        let segments = file
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                let flags = match s.flags() {
                    SegmentFlags::Elf { p_flags } => p_flags,
                    _ => 0,
                };
                Segment {
                    vaddr: s.address(),
                    memsz: s.size(),
                    offset,
                    filesz,
                    flags,
                }
            })
            .collect();
        Ok(Self {
            data,
            file,
            segments,
        })
    }

    fn segment_of(&self, vaddr: u64) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz.min(s.memsz))
    }

    /// File offset of a virtual address inside a loaded, file-backed segment.
    pub fn file_offset(&self, vaddr: u64) -> Result<u64, InspectError> {
        let seg = self
            .segment_of(vaddr)
            .ok_or_else(|| InspectError::Corrupt {
                section: "program headers",
                detail: format!("address {vaddr:#x} is in no loaded segment"),
            })?;
        Ok(vaddr - seg.vaddr + seg.offset)
    }

    /// Bytes at `[vaddr, vaddr+len)` when all of them are in the file.
    fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&'a [u8]> {
        let seg = self.segment_of(vaddr)?;
        let rel = vaddr - seg.vaddr;
        if len > seg.filesz - rel {
            return None;
        }
        let start = usize::try_from(seg.offset + rel).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.data.get(start..end)
    }

    /// Machine code of a function, which must lie in an executable segment.
    pub fn code(&self, vaddr: u64, size: u64) -> Result<&'a [u8], InspectError> {
        let corrupt = |detail: String| InspectError::Corrupt {
            section: ".text",
            detail,
        };
        let seg = self
            .segment_of(vaddr)
            .ok_or_else(|| corrupt(format!("function at {vaddr:#x} is in no loaded segment")))?;
        if seg.flags & PF_X == 0 {
            return Err(corrupt(format!(
                "function at {vaddr:#x} is not in an executable segment"
            )));
        }
        self.bytes_at(vaddr, size).ok_or_else(|| {
            corrupt(format!(
                "function at {vaddr:#x}+{size:#x} runs past its segment"
            ))
        })
    }

    /// Go build info: from `.go.buildinfo`, or by scanning writable segments
    /// for the magic (16-byte aligned) when section headers are gone.
    pub fn build_info(&self) -> Result<buildinfo::BuildInfo, InspectError> {
        let blob = match self.file.section_by_name(".go.buildinfo") {
            Some(section) => section.data().map_err(|e| InspectError::Corrupt {
                section: ".go.buildinfo",
                detail: e.to_string(),
            })?,
            None => self.scan_for_buildinfo().ok_or(InspectError::NotGo)?,
        };
        if !blob.starts_with(buildinfo::MAGIC) {
            return Err(InspectError::NotGo);
        }
        buildinfo::parse(blob, |addr, ptr_size, big_endian| {
            let hdr = self.bytes_at(addr, 2 * ptr_size as u64)?;
            let word = |b: &[u8]| {
                let mut v = [0u8; 8];
                if big_endian {
                    v[8 - ptr_size..].copy_from_slice(b);
                    u64::from_be_bytes(v)
                } else {
                    v[..ptr_size].copy_from_slice(b);
                    u64::from_le_bytes(v)
                }
            };
            let ptr = word(&hdr[..ptr_size]);
            let len = word(&hdr[ptr_size..]);
            self.bytes_at(ptr, len).map(<[u8]>::to_vec)
        })
    }

    fn scan_for_buildinfo(&self) -> Option<&'a [u8]> {
        self.segments
            .iter()
            .filter(|s| s.flags & PF_W != 0)
            .find_map(|s| {
                let start = usize::try_from(s.offset).ok()?;
                let end = start.checked_add(usize::try_from(s.filesz).ok()?)?;
                let seg = self.data.get(start..end)?;
                (0..seg.len())
                    .step_by(16)
                    .find(|&i| seg[i..].starts_with(buildinfo::MAGIC))
                    .map(|i| &seg[i..])
            })
    }

    /// Function symbols named in `wanted` from `.symtab`.
    pub fn functions(&self, wanted: &[&str]) -> Result<Vec<Symbol>, InspectError> {
        let Some(symtab) = self.file.symbol_table() else {
            return Err(InspectError::Stripped);
        };
        let mut found = Vec::new();
        for sym in symtab.symbols() {
            if sym.kind() != SymbolKind::Text {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            if wanted.contains(&name) && !found.iter().any(|s: &Symbol| s.name == name) {
                found.push(Symbol {
                    name: name.to_owned(),
                    address: sym.address(),
                    size: sym.size(),
                });
            }
        }
        Ok(found)
    }
}
