//! The ELF side of inspection: segments, sections, symbols, relocations,
//! and where Go's tables are.
use object::{
    Architecture, Object, ObjectKind, ObjectSection, ObjectSegment, ObjectSymbol,
    ObjectSymbolTable, RelocationFlags, SegmentFlags, SymbolKind,
    elf::{PF_W, PF_X, R_X86_64_RELATIVE},
};

use super::{InspectError, buildinfo, pclntab};

/// `runtime.moduledata` offsets, the same in Go 1.21 to 1.27
/// (`runtime/symtab.go`): pcHeader +0, funcnametab.ptr +8, ftab.ptr +128,
/// ftab.len +136, text +176.
const MD_FUNCNAMETAB: u64 = 8;
const MD_FTAB: u64 = 128;
const MD_FTAB_LEN: u64 = 136;
const MD_TEXT: u64 = 176;
/// `moduledata.gofunc`: +320 in Go 1.21 to 1.26; Go 1.27 added
/// `typedesclen`, `itaboffset` and `itabsize` before it.
const MD_GOFUNC: u64 = 320;
const MD_GOFUNC_GO127: u64 = 344;

/// `bss`, `ebss`, `noptrbss`, `enoptrbss` (the same in Go 1.21 to 1.27; the
/// `offsets_table` test checks them against each release's DWARF).
pub const MD_BSS: u64 = 224;
pub const MD_EBSS: u64 = 232;
pub const MD_NOPTRBSS: u64 = 240;
pub const MD_ENOPTRBSS: u64 = 248;

/// Go's zeroed data sections, link-time addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSections {
    /// `.bss`: zeroed data with pointers.
    pub bss: std::ops::Range<u64>,
    /// `.noptrbss`: zeroed data without pointers.
    pub noptrbss: std::ops::Range<u64>,
}

/// A PT_LOAD segment.
#[derive(Clone, Copy, Debug)]
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    flags: u32,
}

pub struct Elf<'a> {
    data: &'a [u8],
    file: object::File<'a>,
    segments: Vec<Segment>,
}

/// Where pclntab is and what its header says.
pub struct PclnLocation<'a> {
    pub table: pclntab::Pclntab<'a>,
    pub vaddr: u64,
    /// Where it starts in the file.
    pub offset: u64,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, InspectError> {
        if !data.starts_with(b"\x7fELF") {
            return Err(InspectError::NotElf);
        }
        check_tables_in_file(data)?;
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
        let segments: Vec<Segment> = file
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
        if segments.iter().any(|s| {
            s.offset
                .checked_add(s.filesz)
                .is_none_or(|e| e > data.len() as u64)
        }) {
            return Err(InspectError::Corrupt {
                section: "program headers",
                detail: "a loaded segment runs past the end of the file (truncated?)".to_owned(),
            });
        }
        // Section headers sit at the start of Go binaries; the data of the
        // last sections (symbols, DWARF) is what a truncation loses.
        if file.sections().any(|s| {
            s.file_range().is_some_and(|(off, size)| {
                off.checked_add(size).is_none_or(|e| e > data.len() as u64)
            })
        }) {
            return Err(InspectError::Corrupt {
                section: "section headers",
                detail: "a section runs past the end of the file (truncated?)".to_owned(),
            });
        }
        Ok(Self {
            data,
            file,
            segments,
        })
    }

    /// The parsed file, for the DWARF reader.
    pub fn file(&self) -> &object::File<'a> {
        &self.file
    }

    /// R_X86_64_RELATIVE relocations (position-independent builds): each
    /// address and the value the loader writes there. Scanned on each use
    /// rather than kept: a big PIE has a million of them, and a handful of
    /// words is all that is looked up.
    fn relative(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.file
            .dynamic_relocations()
            .into_iter()
            .flatten()
            .filter(|(_, reloc)| {
                matches!(reloc.flags(), RelocationFlags::Elf { r_type } if r_type == R_X86_64_RELATIVE)
            })
            .map(|(at, reloc)| (at, reloc.addend() as u64))
    }

    /// Link-time address of file offset 0 (the first loaded segment's
    /// `vaddr - offset`): a process maps offset 0 at this plus its load bias.
    pub fn image_base(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.vaddr.wrapping_sub(s.offset) & !0xfff)
            .min()
            .unwrap_or(0)
    }

    /// Position-independent (ET_DYN): `-buildmode=pie`.
    pub fn is_pie(&self) -> bool {
        self.file.kind() == ObjectKind::Dynamic
    }

    /// Has a `.symtab` (not built with `-ldflags=-s`).
    pub fn has_symtab(&self) -> bool {
        self.file.symbol_table().is_some()
    }

    /// The pointer-sized word the loaded program sees at `vaddr`.
    fn word(&self, vaddr: u64) -> Option<u64> {
        if let Some((_, v)) = self.relative().find(|&(at, _)| at == vaddr) {
            return Some(v);
        }
        let b = self.bytes_at(vaddr, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// Virtual address of a file offset inside a loaded segment.
    fn vaddr_of(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| offset >= s.offset && offset - s.offset < s.filesz)
            .and_then(|s| (offset - s.offset).checked_add(s.vaddr))
    }

    /// pclntab: the `.gopclntab` section, or (external-linked PIE builds have
    /// none) the first valid header found by its magic.
    pub fn pclntab(&self) -> Result<PclnLocation<'a>, InspectError> {
        if let Some(section) = self.file.section_by_name(".gopclntab") {
            let data = section.data().map_err(|e| InspectError::Corrupt {
                section: ".gopclntab",
                detail: e.to_string(),
            })?;
            let (offset, _) = section.file_range().ok_or_else(|| InspectError::Corrupt {
                section: ".gopclntab",
                detail: "has no bytes in the file".to_owned(),
            })?;
            return Ok(PclnLocation {
                table: pclntab::Pclntab::parse(data)?,
                vaddr: section.address(),
                offset,
            });
        }
        let mut at = 0;
        while let Some(pos) = find(&self.data[at..], &pclntab::HEADER_PREFIX) {
            let offset = at + pos;
            if let Ok(table) = pclntab::Pclntab::parse(&self.data[offset..])
                && let Some(vaddr) = self.vaddr_of(offset as u64)
            {
                return Ok(PclnLocation {
                    table,
                    vaddr,
                    offset: offset as u64,
                });
            }
            at = offset + 1;
        }
        Err(InspectError::Corrupt {
            section: ".gopclntab",
            detail: "no Go 1.20+ function table in the executable".to_owned(),
        })
    }

    /// Where `runtime.moduledata` is: the data word pointing at pclntab
    /// whose neighbours point at pclntab's tables.
    pub fn moduledata(&self, pcln: &PclnLocation<'_>) -> Option<u64> {
        let h = pcln.table.header();
        let names = pcln.vaddr.checked_add(h.funcname_offset as u64)?;
        let ftab = pcln.vaddr.checked_add(h.pcln_offset as u64)?;
        let nftab = h.nfunc as u64 + 1;
        let word = |md: u64, field: u64| self.word(md.checked_add(field)?);
        let check = |md: u64| {
            word(md, MD_FUNCNAMETAB) == Some(names)
                && word(md, MD_FTAB) == Some(ftab)
                && word(md, MD_FTAB_LEN) == Some(nftab)
        };
        let from_relocs = self
            .relative()
            .filter(|&(_, v)| v == pcln.vaddr)
            .map(|(at, _)| at)
            .find(|&md| check(md));
        from_relocs.or_else(|| {
            let needle = pcln.vaddr.to_le_bytes();
            // moduledata is a variable: writable segments first, a few MB,
            // before the read-only data (pclntab itself, 60 MB in a big
            // binary: pages a scan would fault in for nothing).
            let writable = |s: &&Segment| s.flags & PF_W != 0;
            let data = self.segments.iter().filter(|s| s.flags & PF_X == 0);
            data.clone()
                .filter(writable)
                .chain(data.filter(|s| !writable(s)))
                .find_map(|s| {
                    let start = usize::try_from(s.offset).ok()?;
                    let end = start.checked_add(usize::try_from(s.filesz).ok()?)?;
                    let seg = self.data.get(start..end)?;
                    (0..seg.len().saturating_sub(7))
                        .step_by(8)
                        .filter(|&i| seg[i..i + 8] == needle)
                        .filter_map(|i| s.vaddr.checked_add(i as u64))
                        .find(|&md| check(md))
                })
        })
    }

    /// `runtime.moduledata.text` of the moduledata at `md`. This is what
    /// the runtime itself uses; pclntab's own textStart is 0 from Go 1.26
    /// on, and the `.text` section also holds C code in cgo builds.
    pub fn moduledata_text(&self, md: u64) -> Option<u64> {
        self.word(md.checked_add(MD_TEXT)?)
    }

    /// Go's zeroed data sections as the moduledata at `md` bounds them
    /// (`bss`/`ebss`, `noptrbss`/`enoptrbss`), link-time addresses: where
    /// the runtime's globals must lie.
    pub fn moduledata_bss(&self, md: u64) -> Option<DataSections> {
        let word = |field: u64| self.word(md.checked_add(field)?);
        let range = |lo: u64, hi: u64| {
            let (lo, hi) = (word(lo)?, word(hi)?);
            (lo <= hi).then_some(lo..hi)
        };
        Some(DataSections {
            bss: range(MD_BSS, MD_EBSS)?,
            noptrbss: range(MD_NOPTRBSS, MD_ENOPTRBSS)?,
        })
    }

    /// The executable's `go:func.*` data (inline trees and the other
    /// funcdata pclntab points at), from `moduledata.gofunc` (Go 1.27's
    /// layout when `go127`) to the end of its segment; else from the
    /// symbol table. Cross-checked when both are there.
    pub fn gofunc(&self, md: Option<u64>, go127: bool) -> Option<&'a [u8]> {
        let field = if go127 { MD_GOFUNC_GO127 } else { MD_GOFUNC };
        let from_md = md.and_then(|md| self.word(md.checked_add(field)?));
        let from_symtab = self.symtab_any_address("go:func.*");
        let addr = match (from_md, from_symtab) {
            (Some(m), Some(s)) if m != s => return None,
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        let seg = self.segment_of(addr)?;
        if seg.flags & PF_X != 0 {
            return None;
        }
        self.bytes_at(addr, seg.filesz.min(seg.memsz) - (addr - seg.vaddr))
    }

    /// pclntab's textStart as the loaded program sees it (relocated in PIE).
    pub fn pcln_header_text_start(&self, pcln: &PclnLocation<'_>) -> Option<u64> {
        self.word(pcln.vaddr.checked_add(24)?)
    }

    /// Address of the `.text` section, if there are section headers.
    pub fn text_section(&self) -> Option<u64> {
        self.file.section_by_name(".text").map(|s| s.address())
    }

    /// A data symbol's address from `.symtab`, when there is one.
    pub fn symtab_data_address(&self, name: &str) -> Option<u64> {
        let symtab = self.file.symbol_table()?;
        symtab
            .symbols()
            .find(|s| s.kind() == SymbolKind::Data && s.name() == Ok(name))
            .map(|s| s.address())
    }

    /// Any symbol's address from `.symtab`, when there is one.
    fn symtab_any_address(&self, name: &str) -> Option<u64> {
        let symtab = self.file.symbol_table()?;
        symtab
            .symbols()
            .find(|s| s.name() == Ok(name))
            .map(|s| s.address())
    }

    /// A function symbol's address from `.symtab`, when there is one.
    pub fn symtab_address(&self, name: &str) -> Option<u64> {
        let symtab = self.file.symbol_table()?;
        symtab
            .symbols()
            .find(|s| s.kind() == SymbolKind::Text && s.name() == Ok(name))
            .map(|s| s.address())
    }

    fn segment_of(&self, vaddr: u64) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz.min(s.memsz))
    }

    /// File offset of a virtual address inside a loaded, file-backed segment.
    pub fn file_offset(&self, vaddr: u64) -> Result<u64, InspectError> {
        let corrupt = |detail: String| InspectError::Corrupt {
            section: "program headers",
            detail,
        };
        let seg = self
            .segment_of(vaddr)
            .ok_or_else(|| corrupt(format!("address {vaddr:#x} is in no loaded segment")))?;
        (vaddr - seg.vaddr)
            .checked_add(seg.offset)
            .ok_or_else(|| corrupt(format!("address {vaddr:#x} maps past the end of the file")))
    }

    /// Bytes at `[vaddr, vaddr+len)` when all of them are in the file.
    fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&'a [u8]> {
        let seg = self.segment_of(vaddr)?;
        let rel = vaddr - seg.vaddr;
        if len > seg.filesz - rel {
            return None;
        }
        let start = usize::try_from(seg.offset.checked_add(rel)?).ok()?;
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
}

/// A truncated file loses its section headers first (they are at the end):
/// say so instead of quietly working from what is left.
fn check_tables_in_file(data: &[u8]) -> Result<(), InspectError> {
    let truncated = |what: &str| InspectError::Corrupt {
        section: "ELF header",
        detail: format!("{what} beyond the end of the file (truncated?)"),
    };
    let u16_at = |at: usize| {
        data.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u64)
    };
    let u64_at = |at: usize| {
        data.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // ELF64 header: e_phoff 0x20, e_shoff 0x28, e_phentsize 0x36,
    // e_phnum 0x38, e_shentsize 0x3a, e_shnum 0x3c.
    let (Some(phoff), Some(shoff), Some(phent), Some(phnum), Some(shent), Some(shnum)) = (
        u64_at(0x20),
        u64_at(0x28),
        u16_at(0x36),
        u16_at(0x38),
        u16_at(0x3a),
        u16_at(0x3c),
    ) else {
        return Err(truncated("ELF header"));
    };
    let len = data.len() as u64;
    let end = |off: u64, n: u64, size: u64| off.checked_add(n.checked_mul(size)?);
    if end(phoff, phnum, phent).is_none_or(|e| e > len) {
        return Err(truncated("program headers"));
    }
    if shoff != 0 && end(shoff, shnum, shent).is_none_or(|e| e > len) {
        return Err(truncated("section headers"));
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
