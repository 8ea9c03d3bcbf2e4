//! Shrinks a real Go executable (linux/amd64, Go 1.20+ pclntab) to a few
//! kilobytes that the parser still accepts: the fuzzer's best seeds. A whole
//! Go binary is megabytes, and libFuzzer spends nearly all of each run on
//! bytes the parser never reads; a compact copy keeps only what it reads.
//!
//! The copy has the original's ELF header, one PT_LOAD per function body it
//! keeps (the functions gopulse probes and `runtime.main`, at their original
//! addresses), `.go.buildinfo` as is, a `.gopclntab` rebuilt with only those
//! functions (and their successors, which give their ends) and, unless the
//! input is stripped, a `.symtab` with only their symbols, and, when its
//! DWARF is not compressed, a `.debug_info` with only the runtime structs
//! whose field offsets the agent reads.
use std::collections::BTreeSet;

use anyhow::{Context as _, Result, bail, ensure};

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const SHDR_LEN: usize = 64;
const SYM_LEN: usize = 24;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
const SHT_PROGBITS: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHF_WRITE: u64 = 1;
const SHF_ALLOC: u64 = 2;
const SHF_COMPRESSED: u64 = 0x800;
const SHN_ABS: u16 = 0xfff1;
const STT_FUNC: u8 = 2;
const STB_GLOBAL: u8 = 1;

/// pclntab header: magic, pad, minLC 1, ptrSize 8 (Go 1.20+, amd64).
const PCLN_PREFIX: [u8; 8] = [0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8];
const PCLN_HEADER_LEN: usize = 72;
/// Fixed part of a `_func` record; `npcdata` and `nfuncdata` are cleared
/// so that it is all there is.
const FUNC_LEN: usize = 44;
/// The structs `offsets::from_dwarf` reads.
const DWARF_STRUCTS: &[&str] = &[
    "runtime.hmap",
    "internal/abi.MapType",
    "internal/abi.OldMapType",
    "internal/runtime/maps.Map",
    "internal/runtime/maps.table",
    "internal/runtime/maps.groupsReference",
    "runtime.g",
    "runtime.m",
];

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    let bytes = b.get(at..at + 2).context("truncated")?;
    Ok(u16::from_le_bytes(bytes.try_into()?))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    let bytes = b.get(at..at + 4).context("truncated")?;
    Ok(u32::from_le_bytes(bytes.try_into()?))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    let bytes = b.get(at..at + 8).context("truncated")?;
    Ok(u64::from_le_bytes(bytes.try_into()?))
}

fn usize_at(b: &[u8], at: usize) -> Result<usize> {
    Ok(usize::try_from(u64_at(b, at)?)?)
}

fn cstr(b: &[u8], at: usize) -> Result<&[u8]> {
    let rest = b.get(at..).context("string outside its table")?;
    let len = rest.iter().position(|&c| c == 0).context("unterminated")?;
    Ok(&rest[..len])
}

struct Section<'a> {
    name: &'a [u8],
    flags: u64,
    addr: u64,
    data: &'a [u8],
}

fn sections(elf: &[u8]) -> Result<Vec<Section<'_>>> {
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01") && u16_at(elf, 18)? == 62,
        "not a little-endian ELF64 for x86-64"
    );
    let shoff = usize_at(elf, 0x28)?;
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    let header = |i: usize| -> Result<(u32, u32, u64, u64, usize, usize)> {
        let at = shoff + i * SHDR_LEN;
        Ok((
            u32_at(elf, at)?,
            u32_at(elf, at + 4)?,
            u64_at(elf, at + 8)?,
            u64_at(elf, at + 0x10)?,
            usize_at(elf, at + 0x18)?,
            usize_at(elf, at + 0x20)?,
        ))
    };
    let (_, _, _, _, stroff, strsize) = header(shstrndx)?;
    let names = elf
        .get(stroff..stroff + strsize)
        .context("section names outside the file")?;
    (0..shnum)
        .map(|i| {
            let (name, kind, flags, addr, offset, size) = header(i)?;
            // NOBITS (.bss) has no bytes in the file.
            let data = if kind == 8 {
                &[][..]
            } else {
                elf.get(offset..offset + size)
                    .context("section outside the file")?
            };
            Ok(Section {
                name: cstr(names, name as usize)?,
                flags,
                addr,
                data,
            })
        })
        .collect()
}

fn section<'a>(sections: &'a [Section<'a>], name: &str) -> Option<&'a Section<'a>> {
    sections.iter().find(|s| s.name == name.as_bytes())
}

/// The function table of `.gopclntab`.
struct Pcln<'a> {
    data: &'a [u8],
    nfunc: usize,
    text_start: u64,
    names: usize,
    ftab: usize,
}

impl<'a> Pcln<'a> {
    fn parse(data: &'a [u8]) -> Result<Self> {
        ensure!(
            data.starts_with(&PCLN_PREFIX),
            "not a Go 1.20+ amd64 pclntab"
        );
        Ok(Self {
            data,
            nfunc: usize_at(data, 8)?,
            text_start: u64_at(data, 24)?,
            names: usize_at(data, 32)?,
            ftab: usize_at(data, 64)?,
        })
    }

    /// (entry offset, `_func` offset from the function table) of function `i`.
    fn ftab(&self, i: usize) -> Result<(u32, u32)> {
        let at = self.ftab + 8 * i;
        Ok((u32_at(self.data, at)?, u32_at(self.data, at + 4)?))
    }

    fn func(&self, i: usize) -> Result<&'a [u8]> {
        let at = self.ftab + self.ftab(i)?.1 as usize;
        self.data
            .get(at..at + FUNC_LEN)
            .context("_func outside pclntab")
    }

    fn name(&self, i: usize) -> Result<&'a [u8]> {
        let off = usize::try_from(i32::from_le_bytes(self.func(i)?[4..8].try_into()?))?;
        cstr(self.data, self.names + off)
    }
}

/// The compact copy of `elf` (see the module doc), keeping `wanted` and
/// `runtime.main`. An error when the input does not look like a Go 1.20+
/// linux/amd64 executable.
pub fn compact(elf: &[u8], wanted: &[&str]) -> Result<Vec<u8>> {
    let sections = sections(elf)?;
    let get = |name| section(&sections, name).with_context(|| format!("no {name} section"));
    let buildinfo = get(".go.buildinfo")?;
    let pcln_section = get(".gopclntab")?;
    let pcln = Pcln::parse(pcln_section.data)?;
    // Go 1.26+ write 0 here (the runtime takes it from moduledata); the
    // compact copy has no moduledata, so it says where text starts.
    let text_start = match pcln.text_start {
        0 => get(".text")?.addr,
        t => t,
    };

    let mut keep = BTreeSet::new();
    let mut code = Vec::new();
    for i in 0..pcln.nfunc {
        let name = pcln.name(i)?;
        if name == b"runtime.main" || wanted.iter().any(|w| w.as_bytes() == name) {
            // Its successor's entry is where it ends.
            keep.extend([i, i + 1]);
            code.push((pcln.ftab(i)?.0, pcln.ftab(i + 1)?.0));
        }
    }
    if code.is_empty() {
        bail!("none of the functions is in the pclntab");
    }
    let keep: Vec<usize> = keep.into_iter().filter(|&i| i < pcln.nfunc).collect();
    let text_end = pcln.ftab(keep.last().copied().unwrap_or(0) + 1)?.0;

    // pclntab: header, names, function table, `_func` records.
    let mut names = Vec::new();
    let mut funcs = Vec::new();
    let mut ftab = Vec::new();
    let func_base = 8 * (keep.len() + 1);
    for &i in &keep {
        let mut func = pcln.func(i)?.to_vec();
        func[4..8].copy_from_slice(&u32::try_from(names.len())?.to_le_bytes());
        func[28..32].fill(0); // npcdata
        func[43] = 0; // nfuncdata
        ftab.extend_from_slice(&pcln.ftab(i)?.0.to_le_bytes());
        ftab.extend_from_slice(&u32::try_from(func_base + funcs.len())?.to_le_bytes());
        names.extend_from_slice(pcln.name(i)?);
        names.push(0);
        funcs.extend_from_slice(&func);
    }
    ftab.extend_from_slice(&text_end.to_le_bytes());
    ftab.extend_from_slice(&0u32.to_le_bytes());
    let mut table = pcln_section.data[..PCLN_HEADER_LEN].to_vec();
    let names_at = PCLN_HEADER_LEN;
    let ftab_at = names_at + names.len();
    table[8..16].copy_from_slice(&(keep.len() as u64).to_le_bytes());
    table[24..32].copy_from_slice(&text_start.to_le_bytes());
    table[32..40].copy_from_slice(&(names_at as u64).to_le_bytes());
    table[64..72].copy_from_slice(&(ftab_at as u64).to_le_bytes());
    // The other tables (files, pc-value) are gone: point them at the end.
    let end = (ftab_at + ftab.len() + funcs.len()) as u64;
    for field in [16, 40, 48, 56] {
        table[field..field + 8].copy_from_slice(&end.to_le_bytes());
    }
    table.extend_from_slice(&names);
    table.extend_from_slice(&ftab);
    table.extend_from_slice(&funcs);

    let symtab = match (section(&sections, ".symtab"), section(&sections, ".strtab")) {
        (Some(symtab), Some(strtab)) => Some(symbols(symtab.data, strtab.data, wanted)?),
        _ => None,
    };

    let mut out = Writer::new(elf);
    // Bodies of adjacent functions share a segment.
    code.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (start, end) in code {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let text = get(".text")?;
    for (start, end) in merged {
        let vaddr = text_start + u64::from(start);
        let at = usize::try_from(vaddr - text.addr)?;
        let body = text
            .data
            .get(at..at + (end - start) as usize)
            .context("function outside .text")?;
        out.segment(PF_R | PF_X, vaddr, body);
    }
    let bi = out.segment(PF_R | PF_W, buildinfo.addr, buildinfo.data);
    out.section(
        ".go.buildinfo",
        SHT_PROGBITS,
        SHF_ALLOC | SHF_WRITE,
        bi,
        0,
        0,
    );
    let pt = out.segment(PF_R, pcln_section.addr, &table);
    out.section(".gopclntab", SHT_PROGBITS, SHF_ALLOC, pt, 0, 0);
    if let Some((syms, strs)) = symtab {
        let strtab_index = out.sections.len() as u32 + 2;
        let at = out.blob(&syms);
        // sh_info: index of the first global symbol (all but the null one).
        out.section(".symtab", SHT_SYMTAB, 0, at, strtab_index, 1);
        let at = out.blob(&strs);
        out.section(".strtab", SHT_STRTAB, 0, at, 0, 0);
    }
    // Go compresses DWARF unless linked with -compressdwarf=false.
    let plain = |name| section(&sections, name).filter(|s| s.flags & SHF_COMPRESSED == 0);
    if let (Some(info), Some(abbrev)) = (plain(".debug_info"), plain(".debug_abbrev")) {
        let info = debug_info(info.data, abbrev.data)?;
        let at = out.blob(&info);
        out.section(".debug_info", SHT_PROGBITS, 0, at, 0, 0);
        let at = out.blob(abbrev.data);
        out.section(".debug_abbrev", SHT_PROGBITS, 0, at, 0, 0);
    }
    Ok(out.finish())
}

/// `.debug_info` cut down to one unit: the header and root entry of the
/// first unit holding one of `DWARF_STRUCTS`, then the subtree of the first
/// struct of each of those names. Their members' type references now point
/// elsewhere: `offsets::from_dwarf` reads names, sizes and member offsets,
/// not types.
fn debug_info(info: &[u8], abbrev: &[u8]) -> Result<Vec<u8>> {
    use gimli::{AttributeValue, DW_AT_name, DW_TAG_structure_type, DebugAbbrev, DebugInfo};
    let debug_abbrev = DebugAbbrev::new(abbrev, gimli::LittleEndian);
    let mut units = DebugInfo::new(info, gimli::LittleEndian).units();
    let mut head: Option<&[u8]> = None;
    let mut trees: Vec<&[u8]> = Vec::new();
    let mut found = BTreeSet::new();
    while let Some(unit) = units.next()? {
        let start = unit
            .offset()
            .as_debug_info_offset()
            .context("not a .debug_info unit")?
            .0;
        let abbrevs = unit.abbreviations(&debug_abbrev)?;
        let mut cursor = unit.entries(&abbrevs);
        let mut depth = 0isize;
        let mut unit_head = None;
        // The struct being copied: its offset and depth.
        let mut open: Option<(usize, isize, &[u8])> = None;
        while let Some((delta, entry)) = cursor.next_dfs()? {
            depth += delta;
            let at = start + entry.offset().0;
            if depth == 1 && unit_head.is_none() {
                unit_head = Some(&info[start..at]);
            }
            if let Some((from, level, _)) = open
                && depth <= level
            {
                trees.push(&info[from..at]);
                head = head.or(unit_head);
                open = None;
            }
            if open.is_none()
                && entry.tag() == DW_TAG_structure_type
                && let Some(AttributeValue::String(name)) = entry.attr_value(DW_AT_name)?
                && DWARF_STRUCTS.iter().any(|s| s.as_bytes() == name.slice())
                && found.insert(name.slice())
            {
                open = Some((at, depth, name.slice()));
            }
        }
        // A struct that ends its unit would take the unit's end with it.
        if let Some((_, _, name)) = open {
            found.remove(name);
        }
    }
    let head = head.context("none of the runtime structs is in .debug_info")?;
    ensure!(u32_at(head, 0)? < 0xffff_fff0, "64-bit DWARF");
    let mut out = head.to_vec();
    for tree in trees {
        out.extend_from_slice(tree);
    }
    out.push(0); // end of the root's children
    let len = u32::try_from(out.len() - 4)?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// `.symtab` and `.strtab` with only the function symbols named in
/// `wanted`, `runtime.main` and `runtime.text`.
fn symbols(symtab: &[u8], strtab: &[u8], wanted: &[&str]) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut syms = vec![0u8; SYM_LEN];
    let mut strs = vec![0u8];
    for sym in symtab.chunks_exact(SYM_LEN) {
        let name = cstr(strtab, u32_at(sym, 0)? as usize)?;
        let keep = name == b"runtime.main"
            || name == b"runtime.text"
            || wanted.iter().any(|w| w.as_bytes() == name);
        if !keep || sym[4] & 0xf != STT_FUNC {
            continue;
        }
        let mut sym = sym.to_vec();
        sym[..4].copy_from_slice(&u32::try_from(strs.len())?.to_le_bytes());
        sym[4] = (STB_GLOBAL << 4) | STT_FUNC;
        sym[6..8].copy_from_slice(&SHN_ABS.to_le_bytes());
        strs.extend_from_slice(name);
        strs.push(0);
        syms.extend_from_slice(&sym);
    }
    Ok((syms, strs))
}

/// Where a blob landed: (file offset, virtual address, size).
type Placed = (u64, u64, u64);

/// Lays out an ELF64: header, program headers, blobs, section headers.
struct Writer {
    ehdr: Vec<u8>,
    phdrs: Vec<[u64; 5]>,
    phdr_flags: Vec<u32>,
    blobs: Vec<Vec<u8>>,
    sections: Vec<(String, u32, u64, Placed, u32, u32)>,
}

impl Writer {
    fn new(original: &[u8]) -> Self {
        Self {
            ehdr: original[..EHDR_LEN].to_vec(),
            phdrs: Vec::new(),
            phdr_flags: Vec::new(),
            blobs: Vec::new(),
            sections: Vec::new(),
        }
    }

    /// Blob offsets are known once the program header count is: store them
    /// relative to the end of the headers, fixed up in `finish`.
    fn blob(&mut self, data: &[u8]) -> Placed {
        let at: usize = self.blobs.iter().map(Vec::len).sum();
        let len = data.len() as u64;
        let mut data = data.to_vec();
        data.resize(data.len().next_multiple_of(16), 0);
        self.blobs.push(data);
        (at as u64, 0, len)
    }

    fn segment(&mut self, flags: u32, vaddr: u64, data: &[u8]) -> Placed {
        let (at, _, _) = self.blob(data);
        let size = data.len() as u64;
        self.phdrs.push([at, vaddr, vaddr, size, size]);
        self.phdr_flags.push(flags);
        (at, vaddr, size)
    }

    fn section(&mut self, name: &str, kind: u32, flags: u64, at: Placed, link: u32, info: u32) {
        self.sections
            .push((name.to_owned(), kind, flags, at, link, info));
    }

    fn finish(mut self) -> Vec<u8> {
        let base = (EHDR_LEN + PHDR_LEN * self.phdrs.len()) as u64;
        let mut shstrtab = vec![0u8];
        let mut name_at = Vec::new();
        for (name, ..) in &self.sections {
            name_at.push(shstrtab.len() as u32);
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
        }
        name_at.push(shstrtab.len() as u32);
        shstrtab.extend_from_slice(b".shstrtab\0");
        let shstr = self.blob(&shstrtab);
        let shstr_len = shstrtab.len() as u64;
        self.sections.push((
            ".shstrtab".to_owned(),
            SHT_STRTAB,
            0,
            (shstr.0, 0, shstr_len),
            0,
            0,
        ));
        let blobs_len: usize = self.blobs.iter().map(Vec::len).sum();
        let shoff = base + blobs_len as u64;

        let mut out = self.ehdr;
        out[0x20..0x28].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x36..0x38].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(self.phdrs.len() as u16).to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&(SHDR_LEN as u16).to_le_bytes());
        let shnum = self.sections.len() + 1;
        out[0x3c..0x3e].copy_from_slice(&(shnum as u16).to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&((shnum - 1) as u16).to_le_bytes());
        for (&[at, vaddr, paddr, filesz, memsz], &flags) in self.phdrs.iter().zip(&self.phdr_flags)
        {
            out.extend_from_slice(&PT_LOAD.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            for word in [base + at, vaddr, paddr, filesz, memsz, 0x1000] {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
        for blob in &self.blobs {
            out.extend_from_slice(blob);
        }
        out.extend_from_slice(&[0u8; SHDR_LEN]);
        for ((_, kind, flags, (at, addr, size), link, info), name) in
            self.sections.iter().zip(name_at)
        {
            out.extend_from_slice(&name.to_le_bytes());
            out.extend_from_slice(&kind.to_le_bytes());
            let entsize = if *kind == SHT_SYMTAB {
                SYM_LEN as u64
            } else {
                0
            };
            for word in [*flags, *addr, base + at, *size] {
                out.extend_from_slice(&word.to_le_bytes());
            }
            out.extend_from_slice(&link.to_le_bytes());
            out.extend_from_slice(&info.to_le_bytes());
            out.extend_from_slice(&8u64.to_le_bytes()); // sh_addralign
            out.extend_from_slice(&entsize.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_lays_out_headers_blobs_and_sections() {
        let mut ehdr = b"\x7fELF\x02\x01\x01".to_vec();
        ehdr.resize(EHDR_LEN, 0);
        ehdr[18] = 62; // x86-64
        let mut w = Writer::new(&ehdr);
        let seg = w.segment(PF_R | PF_X, 0x401000, &[0xc3]);
        w.section(".text", SHT_PROGBITS, SHF_ALLOC, seg, 0, 0);
        let out = w.finish();
        assert_eq!(u32_at(&out, EHDR_LEN).unwrap(), PT_LOAD);
        let body = usize_at(&out, EHDR_LEN + 8).unwrap();
        assert_eq!(body, EHDR_LEN + PHDR_LEN);
        let sections = sections(&out).unwrap();
        let names: Vec<&[u8]> = sections.iter().map(|s| s.name).collect();
        assert_eq!(names, [&b""[..], b".text", b".shstrtab"]);
        assert_eq!(
            (sections[1].addr, sections[1].data),
            (0x401000, &[0xc3][..])
        );
    }
}
