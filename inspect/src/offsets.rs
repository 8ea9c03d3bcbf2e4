//! Field offsets of the runtime structs the eBPF probes read (maps,
//! goroutines, Ms), per Go release: from a binary's own DWARF when it has
//! any, else from a table generated from the DWARF of every supported
//! toolchain (`cargo xtask codegen offsets`).
use crate::{
    GoVersion, InspectError,
    dwarf::{self, Structs},
    layout::{self, RuntimeOffsets},
};

#[path = "offsets_table.rs"]
mod table;

/// Which map implementation a binary uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapImpl {
    /// `runtime.hmap`: the only one up to Go 1.23, `GOEXPERIMENT=noswissmap`
    /// in 1.24 and 1.25.
    Classic,
    /// `internal/runtime/maps`: the default from Go 1.24, the only one from 1.26.
    Swiss,
}

impl MapImpl {
    /// The implementation a binary of `version` uses (its version string
    /// carries ` X:noswissmap` when built with that experiment).
    pub fn of(version: &GoVersion) -> Self {
        if !version.at_least(24) || version.experiments.iter().any(|x| x == "noswissmap") {
            Self::Classic
        } else {
            Self::Swiss
        }
    }
}

/// Field offsets (bytes) the eBPF probes read, for one Go release + map implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub map: MapOffsets,
    /// `runtime.g.goid`
    pub g_goid: u16,
    /// `runtime.g.m`
    pub g_m: u16,
    /// `runtime.m.curg`
    pub m_curg: u16,
    /// `internal/abi.Type` (a slice's element type): `None` from a DWARF
    /// without it (only cut-down copies lack it), then taken from the
    /// table.
    pub types: Option<TypeOffsets>,
}

/// `internal/abi.Type`: its size and the bytes of it that can hold
/// pointers (0 for a type without pointers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeOffsets {
    pub size: u16,
    pub ptr_bytes: u16,
}

/// Offsets of the map header (and, for Swiss maps, of a table). `size`
/// fields are the struct sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOffsets {
    /// `runtime.hmap`
    Classic {
        count: u16,
        flags: u16,
        b: u16,
        noverflow: u16,
        /// The map's random hash seed: with the address, its identity.
        hash0: u16,
        buckets: u16,
        oldbuckets: u16,
        nevacuate: u16,
        extra: u16,
        size: u16,
        /// `BucketSize` in the map type (`internal/abi.MapType`, or
        /// `OldMapType` in Go 1.24/1.25 noswissmap builds).
        maptype_bucket_size: u16,
    },
    /// `internal/runtime/maps.Map` and `.table`; `table_groups_*` are
    /// `table.groups` plus the field's offset in `groupsReference`.
    Swiss {
        map_used: u16,
        /// The map's random hash seed: with the address, its identity.
        map_seed: u16,
        map_dir_ptr: u16,
        map_dir_len: u16,
        map_global_depth: u16,
        map_global_shift: u16,
        map_size: u16,
        table_used: u16,
        table_capacity: u16,
        table_growth_left: u16,
        table_local_depth: u16,
        table_index: u16,
        table_groups_data: u16,
        table_groups_length_mask: u16,
        table_size: u16,
    },
}

const HMAP: &str = "runtime.hmap";
const MAPTYPE: &str = "internal/abi.MapType";
const OLD_MAPTYPE: &str = "internal/abi.OldMapType";
const SWISS_MAP: &str = "internal/runtime/maps.Map";
const SWISS_TABLE: &str = "internal/runtime/maps.table";
const SWISS_GROUPS: &str = "internal/runtime/maps.groupsReference";
const G: &str = "runtime.g";
const M: &str = "runtime.m";
const ABI_TYPE: &str = "internal/abi.Type";

/// The offsets in the checked-in table for a release (`None` outside the
/// supported range, for devel builds, and for a map implementation the
/// release does not have).
pub fn from_table(version: &GoVersion, imp: MapImpl) -> Option<Offsets> {
    if version.major != 1 || version.devel {
        return None;
    }
    table::TABLE
        .iter()
        .find(|(minor, i, _)| *minor == version.minor && *i == imp)
        .map(|(_, _, offsets)| *offsets)
}

/// The structs [`from_structs`] reads for `imp`.
pub fn wanted(imp: MapImpl) -> &'static [&'static str] {
    match imp {
        MapImpl::Classic => &[HMAP, MAPTYPE, OLD_MAPTYPE, G, M, ABI_TYPE],
        MapImpl::Swiss => &[SWISS_MAP, SWISS_TABLE, SWISS_GROUPS, G, M, ABI_TYPE],
    }
}

/// Reads the offsets from the executable's DWARF. `Ok(None)` when it has
/// none (`-ldflags=-w`, or stripped); an error when the DWARF is unreadable
/// or lacks a struct or field (e.g. `imp` is not the binary's map
/// implementation).
pub fn from_dwarf(data: &[u8], imp: MapImpl) -> Result<Option<Offsets>, InspectError> {
    from_dwarf_through(data, imp, dwarf::WINDOW)
}

/// [`from_dwarf`] reading `.debug_info` through a window of `window` bytes
/// (tests: any window reads the same).
#[doc(hidden)]
pub fn from_dwarf_through(
    data: &[u8],
    imp: MapImpl,
    window: usize,
) -> Result<Option<Offsets>, InspectError> {
    match read(data, wanted(imp), &[], window)? {
        Some(structs) => Ok(Some(from_structs(&structs, imp)?)),
        None => Ok(None),
    }
}

/// The runtime state's offsets ([`crate::layout`]) from the executable's
/// DWARF: `Ok(None)` without DWARF, an error when a struct or field is
/// missing.
pub fn runtime_from_dwarf(data: &[u8]) -> Result<Option<RuntimeOffsets>, InspectError> {
    runtime_from_dwarf_through(data, dwarf::WINDOW)
}

/// [`runtime_from_dwarf`] reading `.debug_info` through a window of
/// `window` bytes (tests: any window reads the same).
#[doc(hidden)]
pub fn runtime_from_dwarf_through(
    data: &[u8],
    window: usize,
) -> Result<Option<RuntimeOffsets>, InspectError> {
    match read(data, layout::STRUCTS, layout::PATHS, window)? {
        Some(structs) => Ok(Some(layout::from_structs(&structs)?)),
        None => Ok(None),
    }
}

/// The offset of one field of a struct type from the executable's DWARF
/// (a test's check of a constant); `Ok(None)` when the binary has no
/// DWARF, an error when it lacks the struct or field.
pub fn field_from_dwarf(
    data: &[u8],
    strukt: &str,
    field: &str,
) -> Result<Option<u64>, InspectError> {
    match read(data, &[strukt], &[], dwarf::WINDOW)? {
        Some(structs) => field_offset(&structs, strukt, field).map(Some),
        None => Ok(None),
    }
}

/// The structs `wanted` and nested fields `paths` of the executable's DWARF.
fn read(
    data: &[u8],
    wanted: &[&str],
    paths: &[(&str, &str)],
    window: usize,
) -> Result<Option<Structs>, InspectError> {
    if !data.starts_with(b"\x7fELF") {
        return Err(InspectError::NotElf);
    }
    let file = object::File::parse(data).map_err(|e| InspectError::Corrupt {
        section: "ELF header",
        detail: e.to_string(),
    })?;
    dwarf::structs_through(&file, wanted, paths, window)
}

/// The runtime state's offsets of every release, as generated.
pub(crate) fn runtime_table() -> &'static [(u32, Option<&'static str>, RuntimeOffsets)] {
    table::RUNTIME_TABLE
}

/// The offset of one field of a struct type read from the DWARF; an error
/// when the struct or the field is missing.
pub(crate) fn field_offset(
    structs: &Structs,
    strukt: &str,
    field: &str,
) -> Result<u64, InspectError> {
    structs
        .get(strukt)
        .ok_or_else(|| InspectError::MissingType(strukt.to_owned()))?
        .members
        .get(field)
        .and_then(|m| m.offset)
        .ok_or_else(|| InspectError::MissingType(format!("{strukt}.{field}")))
}

/// Assembles [`Offsets`] from the structs found, naming what is missing.
pub(crate) fn from_structs(structs: &Structs, imp: MapImpl) -> Result<Offsets, InspectError> {
    let get = |name: &str| {
        structs
            .get(name)
            .ok_or_else(|| InspectError::MissingType(name.to_owned()))
    };
    let small = |what: String, v: u64| {
        u16::try_from(v).map_err(|_| InspectError::Corrupt {
            section: ".debug_info",
            detail: format!("{what} is {v}, beyond any runtime struct"),
        })
    };
    let field = |owner: &str, name: &str| -> Result<u16, InspectError> {
        let what = format!("{owner}.{name}");
        match get(owner)?.members.get(name).map(|m| m.offset) {
            Some(Some(v)) => small(what, v),
            Some(None) => Err(InspectError::Corrupt {
                section: ".debug_info",
                detail: format!("{what} has no constant offset"),
            }),
            None => Err(InspectError::MissingType(what)),
        }
    };
    let size = |owner: &str| -> Result<u16, InspectError> {
        let what = format!("size of {owner}");
        match get(owner)?.size {
            Some(v) => small(what, v),
            None => Err(InspectError::MissingType(what)),
        }
    };
    let map = match imp {
        MapImpl::Classic => MapOffsets::Classic {
            count: field(HMAP, "count")?,
            flags: field(HMAP, "flags")?,
            b: field(HMAP, "B")?,
            noverflow: field(HMAP, "noverflow")?,
            hash0: field(HMAP, "hash0")?,
            buckets: field(HMAP, "buckets")?,
            oldbuckets: field(HMAP, "oldbuckets")?,
            nevacuate: field(HMAP, "nevacuate")?,
            extra: field(HMAP, "extra")?,
            // 1.24/1.25 keep the classic type as OldMapType (MapType is
            // then the swiss one, under another name); before, MapType.
            maptype_bucket_size: if structs.get(OLD_MAPTYPE).is_some() {
                field(OLD_MAPTYPE, "BucketSize")?
            } else {
                field(MAPTYPE, "BucketSize")?
            },
            size: size(HMAP)?,
        },
        MapImpl::Swiss => {
            let groups = field(SWISS_TABLE, "groups")?;
            let in_groups = |name: &str| -> Result<u16, InspectError> {
                let v = u32::from(groups) + u32::from(field(SWISS_GROUPS, name)?);
                small(format!("{SWISS_TABLE}.groups.{name}"), u64::from(v))
            };
            MapOffsets::Swiss {
                map_used: field(SWISS_MAP, "used")?,
                map_seed: field(SWISS_MAP, "seed")?,
                map_dir_ptr: field(SWISS_MAP, "dirPtr")?,
                map_dir_len: field(SWISS_MAP, "dirLen")?,
                map_global_depth: field(SWISS_MAP, "globalDepth")?,
                map_global_shift: field(SWISS_MAP, "globalShift")?,
                map_size: size(SWISS_MAP)?,
                table_used: field(SWISS_TABLE, "used")?,
                table_capacity: field(SWISS_TABLE, "capacity")?,
                table_growth_left: field(SWISS_TABLE, "growthLeft")?,
                table_local_depth: field(SWISS_TABLE, "localDepth")?,
                table_index: field(SWISS_TABLE, "index")?,
                table_groups_data: in_groups("data")?,
                table_groups_length_mask: in_groups("lengthMask")?,
                table_size: size(SWISS_TABLE)?,
            }
        }
    };
    let types = match structs.get(ABI_TYPE) {
        Some(_) => Some(TypeOffsets {
            size: field(ABI_TYPE, "Size_")?,
            ptr_bytes: field(ABI_TYPE, "PtrBytes")?,
        }),
        None => None,
    };
    Ok(Offsets {
        map,
        g_goid: field(G, "goid")?,
        g_m: field(G, "m")?,
        m_curg: field(M, "curg")?,
        types,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const DW_TAG_COMPILE_UNIT: u8 = 0x11;
    const DW_TAG_STRUCTURE_TYPE: u8 = 0x13;
    const DW_TAG_MEMBER: u8 = 0x0d;
    const DW_AT_NAME: u8 = 0x03;
    const DW_AT_BYTE_SIZE: u8 = 0x0b;
    const DW_AT_DATA_MEMBER_LOCATION: u8 = 0x38;
    const DW_FORM_STRING: u8 = 0x08;
    const DW_FORM_UDATA: u8 = 0x0f;

    /// Abbreviations 1 (unit), 2 (struct), 3 (member), as Go's linker writes them.
    #[rustfmt::skip]
    pub(crate) fn abbrevs() -> Vec<u8> {
        vec![
            1, DW_TAG_COMPILE_UNIT, 1, DW_AT_NAME, DW_FORM_STRING, 0, 0, //
            2, DW_TAG_STRUCTURE_TYPE, 1, DW_AT_NAME, DW_FORM_STRING, DW_AT_BYTE_SIZE,
            DW_FORM_UDATA, 0, 0, //
            3, DW_TAG_MEMBER, 0, DW_AT_NAME, DW_FORM_STRING, DW_AT_DATA_MEMBER_LOCATION,
            DW_FORM_UDATA, 0, 0, //
            0,
        ]
    }

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    /// A struct for [`debug_info`]: name, size, members (name, offset).
    pub(crate) type TestStruct<'a> = (&'a str, u8, &'a [(&'a str, u8)]);

    /// One DWARF 4 unit holding `structs`; sizes and offsets < 128.
    pub(crate) fn debug_info(structs: &[TestStruct]) -> Vec<u8> {
        let mut dies = vec![1];
        cstr(&mut dies, "runtime");
        for (name, size, members) in structs {
            dies.push(2);
            cstr(&mut dies, name);
            dies.push(*size);
            for (member, offset) in *members {
                dies.push(3);
                cstr(&mut dies, member);
                dies.push(*offset);
            }
            dies.push(0);
        }
        dies.push(0);
        let mut unit = Vec::new();
        unit.extend_from_slice(&u32::try_from(dies.len() + 7).unwrap().to_le_bytes());
        unit.extend_from_slice(&4u16.to_le_bytes());
        unit.extend_from_slice(&0u32.to_le_bytes());
        unit.push(8);
        unit.extend_from_slice(&dies);
        unit
    }

    /// A minimal x86-64 ELF with the given sections and no segments.
    pub(crate) fn elf(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut shstrtab = vec![0u8];
        let mut names = Vec::new();
        for name in [".shstrtab"]
            .into_iter()
            .chain(sections.iter().map(|s| s.0))
        {
            names.push(u32::try_from(shstrtab.len()).unwrap());
            cstr(&mut shstrtab, name);
        }
        let mut out = vec![0u8; 64];
        let mut headers = vec![[0u64; 8]]; // the null section
        for (i, data) in std::iter::once(&shstrtab[..])
            .chain(sections.iter().map(|s| s.1))
            .enumerate()
        {
            let kind = if i == 0 { 3 } else { 1 }; // SHT_STRTAB, SHT_PROGBITS
            let name_type = u64::from(names[i]) | (kind << 32);
            headers.push([
                name_type,
                0,
                0,
                out.len() as u64,
                data.len() as u64,
                0,
                1,
                0,
            ]);
            out.extend_from_slice(data);
        }
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let shoff = out.len() as u64;
        for h in &headers {
            for w in h {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        let e = &mut out[..64];
        e[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[40..48].copy_from_slice(&shoff.to_le_bytes());
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[58..60].copy_from_slice(&64u16.to_le_bytes());
        e[60..62].copy_from_slice(&u16::try_from(headers.len()).unwrap().to_le_bytes());
        e[62..64].copy_from_slice(&1u16.to_le_bytes());
        out
    }

    const HMAP_MEMBERS: &[(&str, u8)] = &[
        ("count", 0),
        ("flags", 8),
        ("B", 9),
        ("noverflow", 10),
        ("hash0", 12),
        ("buckets", 16),
        ("oldbuckets", 24),
        ("nevacuate", 32),
        ("extra", 40),
    ];

    pub(crate) fn classic_binary() -> Vec<u8> {
        let info = debug_info(&[
            ("runtime.m", 100, &[("g0", 0), ("curg", 92)]),
            ("runtime.hmap", 48, HMAP_MEMBERS),
            (
                "internal/abi.MapType",
                88,
                &[("Key", 48), ("BucketSize", 82)],
            ),
            ("runtime.g", 120, &[("stack", 0), ("m", 48), ("goid", 112)]),
            ("internal/abi.Type", 48, &[("Size_", 0), ("PtrBytes", 8)]),
        ]);
        elf(&[(".debug_abbrev", &abbrevs()), (".debug_info", &info)])
    }

    #[test]
    fn reads_struct_members() {
        let offsets = from_dwarf(&classic_binary(), MapImpl::Classic).unwrap();
        let expected = Offsets {
            map: MapOffsets::Classic {
                count: 0,
                flags: 8,
                b: 9,
                noverflow: 10,
                hash0: 12,
                buckets: 16,
                oldbuckets: 24,
                nevacuate: 32,
                extra: 40,
                size: 48,
                maptype_bucket_size: 82,
            },
            g_goid: 112,
            g_m: 48,
            m_curg: 92,
            types: Some(TypeOffsets {
                size: 0,
                ptr_bytes: 8,
            }),
        };
        assert_eq!(offsets, Some(expected));
    }

    #[test]
    fn swiss_fields_add_up() {
        let info = debug_info(&[
            ("runtime.g", 120, &[("m", 48), ("goid", 112)]),
            ("runtime.m", 100, &[("curg", 92)]),
            (
                "internal/runtime/maps.Map",
                48,
                &[
                    ("used", 0),
                    ("seed", 8),
                    ("dirPtr", 16),
                    ("dirLen", 24),
                    ("globalDepth", 32),
                    ("globalShift", 33),
                ],
            ),
            (
                "internal/runtime/maps.table",
                32,
                &[
                    ("used", 0),
                    ("capacity", 2),
                    ("growthLeft", 4),
                    ("localDepth", 6),
                    ("index", 8),
                    ("groups", 16),
                ],
            ),
            (
                "internal/runtime/maps.groupsReference",
                16,
                &[("data", 0), ("lengthMask", 8)],
            ),
        ]);
        let bin = elf(&[(".debug_abbrev", &abbrevs()), (".debug_info", &info)]);
        let offsets = from_dwarf(&bin, MapImpl::Swiss).unwrap().unwrap();
        let MapOffsets::Swiss {
            table_groups_data,
            table_groups_length_mask,
            map_size,
            ..
        } = offsets.map
        else {
            panic!("{offsets:?}");
        };
        assert_eq!((table_groups_data, table_groups_length_mask), (16, 24));
        assert_eq!(map_size, 48);
        // The classic header is not in this binary.
        let err = from_dwarf(&bin, MapImpl::Classic).unwrap_err();
        assert!(
            matches!(&err, InspectError::MissingType(t) if t == "runtime.hmap"),
            "{err}"
        );
    }

    #[test]
    fn missing_field_is_named() {
        let info = debug_info(&[
            ("runtime.g", 120, &[("m", 48)]),
            ("runtime.m", 100, &[("curg", 92)]),
            ("runtime.hmap", 48, HMAP_MEMBERS),
            ("internal/abi.MapType", 88, &[("BucketSize", 82)]),
        ]);
        let bin = elf(&[(".debug_abbrev", &abbrevs()), (".debug_info", &info)]);
        let err = from_dwarf(&bin, MapImpl::Classic).unwrap_err();
        assert!(
            matches!(&err, InspectError::MissingType(t) if t == "runtime.g.goid"),
            "{err}"
        );
    }

    #[test]
    fn no_dwarf_is_none() {
        let bin = elf(&[(".text", &[0xc3])]);
        assert_eq!(from_dwarf(&bin, MapImpl::Swiss).unwrap(), None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            from_dwarf(&[], MapImpl::Classic),
            Err(InspectError::NotElf)
        ));
        // A deterministic pseudo-random byte soup, with and without the ELF magic.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut soup: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(from_dwarf(&soup, MapImpl::Classic).is_err());
        soup[..4].copy_from_slice(b"\x7fELF");
        assert!(from_dwarf(&soup, MapImpl::Swiss).is_err());
    }

    /// Every truncation and many single-byte corruptions of a valid binary:
    /// errors or `Ok`, never a panic.
    #[test]
    fn damage_never_panics() {
        let bin = classic_binary();
        for cut in 0..bin.len() {
            let _ = from_dwarf(&bin[..cut], MapImpl::Classic);
        }
        for at in 0..bin.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = bin.clone();
                bad[at] ^= flip;
                let _ = from_dwarf(&bad, MapImpl::Classic);
            }
        }
    }

    /// A real (Rust) executable with its section headers cut off.
    #[test]
    fn truncated_real_binary_is_an_error() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        for cut in [64, 4096, exe.len() / 2] {
            assert!(
                from_dwarf(&exe[..cut], MapImpl::Classic).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn table_covers_exactly_the_releases_with_each_map() {
        for minor in 18..=30 {
            let v = GoVersion::parse(&format!("go1.{minor}.1")).unwrap();
            let supported = v.is_supported();
            let classic = from_table(&v, MapImpl::Classic);
            let swiss = from_table(&v, MapImpl::Swiss);
            assert_eq!(classic.is_some(), supported && minor <= 25, "go1.{minor}");
            assert_eq!(swiss.is_some(), supported && minor >= 24, "go1.{minor}");
            assert!(classic.is_none_or(|o| matches!(o.map, MapOffsets::Classic { .. })));
            assert!(swiss.is_none_or(|o| matches!(o.map, MapOffsets::Swiss { .. })));
        }
        let devel = GoVersion::parse("devel go1.27-abcdef Tue Jan 1 2026").unwrap();
        assert_eq!(from_table(&devel, MapImpl::Swiss), None);
    }

    #[test]
    fn map_impl_of_version() {
        let v = |s| GoVersion::parse(s).unwrap();
        assert_eq!(MapImpl::of(&v("go1.23.9")), MapImpl::Classic);
        assert_eq!(MapImpl::of(&v("go1.24.11")), MapImpl::Swiss);
        assert_eq!(MapImpl::of(&v("go1.25.5 X:noswissmap")), MapImpl::Classic);
        assert_eq!(MapImpl::of(&v("go1.27.3")), MapImpl::Swiss);
    }
}
