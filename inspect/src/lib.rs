//! gopulse's binary inspection. Everything the probes need from a Go executable: Go version and build
//! settings, function entry points as uprobe file offsets, and the RET sites
//! of functions whose return we observe. Nothing else in the agent parses ELF.
pub mod buildinfo;
mod disasm;
mod dwarf;
mod elf;
pub mod globals;
mod image;
mod inline;
pub mod layout;
pub mod offsets;
pub mod pclntab;
mod quick;
pub mod symname;
pub mod version;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

pub use buildinfo::BuildInfo;
pub use disasm::StackCheck;
pub use globals::{Global, GlobalError, Globals};
pub use image::Image;
pub use layout::RuntimeOffsets;
pub use offsets::{MapImpl, MapOffsets, Offsets, TypeOffsets};
pub use pclntab::{Source, Symbolizer};
pub use quick::{Release, go_release, go_release_in};
pub use version::GoVersion;

/// Why a binary cannot be probed. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not an ELF file")]
    NotElf,
    #[error("not a linux/amd64 executable ({0}); gopulse probes amd64 Go programs only")]
    WrongArch(String),
    #[error("not a Go program (no Go build info in the executable)")]
    NotGo,
    #[error("Go release {version} is not supported: gopulse supports {range}; {advice}")]
    UnsupportedVersion {
        version: String,
        range: String,
        /// What to do about it (see [`GoVersion::advice`]).
        advice: &'static str,
    },
    #[error("required function {0} is missing from the executable")]
    MissingFunction(String),
    #[error("{0} is missing from the executable's DWARF")]
    MissingType(String),
    #[error("section {section} is corrupt or truncated: {detail}")]
    Corrupt {
        section: &'static str,
        detail: String,
    },
}

/// A function found in the executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    /// Virtual address of the entry.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
    /// File offset of the entry: what a uprobe attaches to.
    pub file_offset: u64,
    /// File offsets of every RET instruction inside the function.
    pub ret_offsets: Vec<u64>,
    /// The stack check at the entry, when the function has one.
    pub stack_check: Option<StackCheck>,
    /// File offset of the first jump of the function's body, when it starts
    /// with a guard that returns at once (`if cond { return }`) and the
    /// first three argument registers (RAX, RBX, RCX) still hold the
    /// arguments there, with the frame built: a probe there (emulated, like
    /// one on the stack check's jump) sees only calls that pass the guard.
    pub guarded_body: Option<u64>,
}

impl Function {
    /// File offset of the conditional jump of the entry stack check: a
    /// probe there is emulated by the kernel instead of single-stepped,
    /// and still sees the arguments in their registers.
    pub fn stack_check_jump_offset(&self) -> Option<u64> {
        self.stack_check
            .map(|c| self.file_offset + (c.jump - self.address))
    }
}

/// What the agent needs to know about one Go executable.
#[derive(Clone, Debug)]
pub struct GoBinary {
    pub build: BuildInfo,
    pub version: GoVersion,
    /// The requested functions that exist, by name.
    pub functions: BTreeMap<String, Function>,
    /// Address where Go's text starts (`runtime.text`).
    pub text_start: u64,
    /// Built with `-buildmode=pie` (addresses are relative to the load base).
    pub pie: bool,
    /// Link-time address of file offset 0; a process's load bias is where
    /// it mapped offset 0 minus this.
    pub image_base: u64,
    /// No `.symtab` (built with `-ldflags=-s`): functions come from pclntab.
    pub stripped: bool,
    /// PC → function name for every Go function (names read from the
    /// executable's bytes).
    pub symbolizer: Symbolizer,
    /// The map implementation the binary's runtime really contains.
    pub map_impl: MapImpl,
    /// Struct field offsets for the probes: from the binary's DWARF when it
    /// has some, else from the table generated from every supported toolchain.
    pub offsets: Offsets,
    /// Whether [`GoBinary::offsets`] came from the binary's own DWARF.
    pub offsets_from_dwarf: bool,
    /// Go 1.21 only, when the binary has symbols and DWARF: where the
    /// runtime keeps its own GC pause timestamps.
    pub pause_clock: Option<PauseClock>,
    /// The requested functions the compiler inlined somewhere, with the
    /// functions that hold a copy of each (profile-guided builds inline
    /// runtime functions ordinary builds never do): a probe on such a
    /// function's entry misses the calls made through its copies. `None`
    /// when the inline trees could not be found (no `runtime.moduledata`
    /// nor `go:func.*` symbol).
    pub inlined: Option<BTreeMap<String, BTreeSet<String>>>,
    /// Where the runtime's state is, for reading it from a process.
    pub runtime: RuntimeLayout,
}

/// Where the runtime keeps the state the agent reads from a process's
/// memory ([`layout`], [`globals`]).
#[derive(Clone, Debug)]
pub struct RuntimeLayout {
    /// Its structs' field offsets, or why they are unknown for this build.
    pub offsets: Result<RuntimeOffsets, String>,
    /// Whether [`RuntimeLayout::offsets`] came from the binary's own DWARF.
    pub offsets_from_dwarf: bool,
    /// Its globals.
    pub globals: Globals,
}

/// Link-time addresses of Go 1.21's pause bookkeeping: `work.pauseStart`
/// (start of the current GC pause) and `memstats.last_gc_nanotime` (end of
/// the last cycle's mark-termination pause). Later releases pass these
/// times to `startTheWorldWithSema`, so the probes read them from registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PauseClock {
    pub pause_start: u64,
    pub last_gc_nanotime: u64,
}

impl GoBinary {
    /// The function, or the error that names it.
    pub fn function(&self, name: &str) -> Result<&Function, InspectError> {
        self.functions
            .get(name)
            .ok_or_else(|| InspectError::MissingFunction(name.to_owned()))
    }

    /// The functions holding an inlined copy of `name` (empty when none
    /// does, or when the inline trees were not found).
    pub fn inlined_into(&self, name: &str) -> impl Iterator<Item = &str> {
        self.inlined
            .as_ref()
            .and_then(|m| m.get(name))
            .into_iter()
            .flatten()
            .map(String::as_str)
    }
}

/// Maps `path` and resolves `wanted` functions (those missing are simply
/// absent from [`GoBinary::functions`]). Refuses non-Go, non-amd64 and
/// unsupported Go releases. For tools and tests: the file must not be
/// truncated or written meanwhile (see [`Image::map`]); the agent maps
/// executables its own way and calls [`inspect_bytes`].
pub fn inspect(path: &Path, wanted: &[&str]) -> Result<GoBinary, InspectError> {
    let io = |source| InspectError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the caller reads a file nobody writes meanwhile (above).
    let image = unsafe { Image::map(&file) }.map_err(io)?;
    inspect_bytes(image.bytes(), wanted)
}

/// What `.go.buildinfo` says of an amd64 ELF executable, whatever its Go
/// release (to say what a program refused is).
pub fn build_info(data: &[u8]) -> Result<BuildInfo, InspectError> {
    elf::Elf::parse(data)?.build_info()
}

/// The Go release a build says it was made with, if gopulse supports it.
fn supported_version(build: &BuildInfo) -> Result<GoVersion, InspectError> {
    let version = GoVersion::parse(&build.version).ok_or_else(|| InspectError::Corrupt {
        section: ".go.buildinfo",
        detail: format!("unreadable Go version {:?}", build.version),
    })?;
    if !version.is_supported() {
        return Err(InspectError::UnsupportedVersion {
            version: version.raw.clone(),
            range: version::supported_range(),
            advice: version.advice(),
        });
    }
    Ok(version)
}

/// [`inspect`] on the executable's bytes (mapped, or read). Everything it
/// keeps is its own: the bytes can go once it returns (the symbolizer
/// reads names from the executable again, see [`Symbolizer`]).
pub fn inspect_bytes(data: &[u8], wanted: &[&str]) -> Result<GoBinary, InspectError> {
    inspect_with(data, wanted, true)
}

/// The runtime's globals as the machine code alone gives them, as for a
/// stripped binary even when this one has symbols (to check the rules
/// against the symbols).
pub fn globals_from_code(data: &[u8]) -> Result<Globals, InspectError> {
    Ok(inspect_with(data, &[], false)?.runtime.globals)
}

fn inspect_with(data: &[u8], wanted: &[&str], symbols: bool) -> Result<GoBinary, InspectError> {
    let elf = elf::Elf::parse(data)?;
    let build = elf.build_info()?;
    let version = supported_version(&build)?;
    let pcln = elf.pclntab()?;
    let moduledata = elf.moduledata(&pcln);
    let text_start = text_start(&elf, &pcln, moduledata)?;
    let mut symbolizer = pcln.table.symbolizer(text_start, pcln.offset)?;
    // A wrong text start shifts every function: refuse rather than attach
    // probes mid-instruction. runtime.main is in every Go program and
    // starts with the stack check.
    let main = symbolizer
        .entry_of(data, "runtime.main")
        .ok_or_else(|| InspectError::Corrupt {
            section: ".gopclntab",
            detail: "no runtime.main".to_owned(),
        })?;
    let main_code = elf.code(main, 32)?;
    if disasm::stack_check(main_code, main).is_none() {
        return Err(InspectError::Corrupt {
            section: ".gopclntab",
            detail: format!(
                "runtime.main at {main:#x} does not start like a Go function; \
                 text start {text_start:#x} is wrong, refusing to attach"
            ),
        });
    }

    let mut functions = BTreeMap::new();
    let mut runtime_code = Vec::new();
    for f in pcln.table.functions() {
        let (name, entry, end) = f?;
        let runtime_fn = globals::ANCHORS
            .iter()
            .chain(globals::CALLEES)
            .find(|&&n| n == name);
        let wanted_fn = wanted.contains(&name) && !functions.contains_key(name);
        if runtime_fn.is_none() && !wanted_fn {
            continue;
        }
        // Checked when the symbolizer was built, from the same bytes.
        let address = text_start
            .checked_add(entry)
            .ok_or_else(|| InspectError::Corrupt {
                section: ".gopclntab",
                detail: format!("{name} past the end of the address space"),
            })?;
        let size = end.saturating_sub(entry);
        if let Some(&known) = runtime_fn
            && let Ok(code) = elf.code(address, size)
        {
            runtime_code.push((known, address, code));
        }
        if !wanted_fn {
            continue;
        }
        if let Some(sym) = elf.symtab_address(name)
            && sym != address
        {
            return Err(InspectError::Corrupt {
                section: ".gopclntab",
                detail: format!("{name} is at {address:#x} by pclntab but {sym:#x} by .symtab"),
            });
        }
        let code = elf.code(address, size)?;
        let rets =
            disasm::ret_addresses(code, address).map_err(|detail| InspectError::Corrupt {
                section: ".text",
                detail: format!("{name}: {detail}"),
            })?;
        let ret_offsets = rets
            .into_iter()
            .map(|a| elf.file_offset(a))
            .collect::<Result<Vec<_>, _>>()?;
        functions.insert(
            name.to_owned(),
            Function {
                name: name.to_owned(),
                address,
                size,
                file_offset: elf.file_offset(address)?,
                ret_offsets,
                stack_check: disasm::stack_check(code, address),
                guarded_body: disasm::guarded_body(
                    code,
                    address,
                    &[
                        iced_x86::Register::RAX,
                        iced_x86::Register::RBX,
                        iced_x86::Register::RCX,
                    ],
                )
                .map(|a| elf.file_offset(a))
                .transpose()?,
            },
        );
    }
    let gofunc = elf.gofunc(moduledata, version.at_least(27));
    let inlined = match gofunc {
        Some(gofunc) => Some(inline::inlined_into(&pcln.table, gofunc, wanted)?),
        None => None,
    };
    // Sites are named through the inline trees: the symbolizer reads them
    // from the file, where go:func.* is a part of `data`.
    if let Some(offset) =
        gofunc.and_then(|g| (g.as_ptr() as usize).checked_sub(data.as_ptr() as usize))
        && let Some(g) = gofunc
    {
        symbolizer.set_gofunc(offset as u64, g.len() as u64);
    }
    let map_impl = map_impl(&symbolizer, data, &version);
    // One pass over the DWARF for everything read from it (more only for
    // the runtime's nested fields whose types lie behind them).
    let mut wanted_structs = offsets::wanted(map_impl).to_vec();
    wanted_structs.extend(layout::STRUCTS);
    if version.minor == 21 {
        wanted_structs.extend([WORK_TYPE, MSTATS]);
    }
    let structs = dwarf::structs(elf.file(), &wanted_structs, layout::PATHS)?;
    let (offsets, runtime_offsets, offsets_from_dwarf) = match &structs {
        // The runtime's offsets may fail on their own: then only what is
        // read from the process's memory is lost.
        Some(s) => (
            offsets::from_structs(s, map_impl)?,
            layout::from_structs(s).map_err(|e| e.to_string()),
            true,
        ),
        None => (
            offsets::from_table(&version, map_impl).ok_or_else(|| {
                InspectError::UnsupportedVersion {
                    version: format!("{} ({map_impl:?} maps)", version.raw),
                    range: version::supported_range(),
                    advice: "a build with its own DWARF (not stripped with -ldflags=-w) can be \
                             watched",
                }
            })?,
            layout::from_table(&version).ok_or_else(|| {
                format!(
                    "no DWARF, and no table row for {} (an experiment not known to leave \
                     the runtime's layout alone)",
                    version.raw
                )
            }),
            false,
        ),
    };
    // A cut-down DWARF without internal/abi.Type: the release's own.
    let mut offsets = offsets;
    if offsets.types.is_none() {
        offsets.types = offsets::from_table(&version, map_impl).and_then(|o| o.types);
    }
    let runtime_offsets = runtime_offsets.and_then(|o| {
        o.check()
            .map(|()| o)
            .map_err(|e| format!("unexpected runtime layout: {e}"))
    });
    let globals = match &runtime_offsets {
        Ok(o) => globals::locate(
            &globals::Text::new(runtime_code),
            |name| symbols.then(|| elf.symtab_data_address(name)).flatten(),
            o,
            moduledata.and_then(|md| elf.moduledata_bss(md)).as_ref(),
        ),
        Err(e) => Globals::none(GlobalError::NoOffsets(e.clone())),
    };
    let pause_clock = match &structs {
        Some(s) if version.minor == 21 => pause_clock(&elf, s)?,
        _ => None,
    };
    Ok(GoBinary {
        pause_clock,
        build,
        version,
        functions,
        text_start,
        pie: elf.is_pie(),
        image_base: elf.image_base(),
        stripped: !elf.has_symtab(),
        symbolizer,
        map_impl,
        offsets,
        offsets_from_dwarf,
        inlined,
        runtime: RuntimeLayout {
            offsets: runtime_offsets,
            offsets_from_dwarf,
            globals,
        },
    })
}

const WORK_TYPE: &str = "runtime.workType";
const MSTATS: &str = "runtime.mstats";

fn pause_clock(
    elf: &elf::Elf<'_>,
    structs: &dwarf::Structs,
) -> Result<Option<PauseClock>, InspectError> {
    let (Some(work), Some(memstats)) = (
        elf.symtab_data_address("runtime.work"),
        elf.symtab_data_address("runtime.memstats"),
    ) else {
        return Ok(None);
    };
    let pause_start = offsets::field_offset(structs, WORK_TYPE, "pauseStart")?;
    let last_gc = offsets::field_offset(structs, MSTATS, "last_gc_nanotime")?;
    Ok(Some(PauseClock {
        pause_start: work.wrapping_add(pause_start),
        last_gc_nanotime: memstats.wrapping_add(last_gc),
    }))
}

/// Functions only a runtime with classic maps has, and only one with swiss
/// tables has; the linker keeps some of each kind in every program (the
/// runtime itself uses maps), though a profile-guided build may inline any
/// one of them away.
const CLASSIC_MARKERS: &[&str] = &["runtime.hashGrow", "runtime.growWork", "runtime.evacuate"];
const SWISS_MARKERS: &[&str] = &[
    "internal/runtime/maps.(*table).grow",
    "internal/runtime/maps.(*table).split",
    "internal/runtime/maps.(*table).rehash",
    "internal/runtime/maps.(*Map).growToTable",
    "internal/runtime/maps.newTable",
];

/// Which map implementation the runtime has, by its functions. The version
/// rule (1.24+ swiss unless `X:noswissmap`) only decides when the functions
/// say nothing clear.
fn map_impl(symbolizer: &Symbolizer, data: &[u8], version: &GoVersion) -> MapImpl {
    let has = |names: &[&str]| names.iter().any(|n| symbolizer.entry_of(data, n).is_some());
    let classic = has(CLASSIC_MARKERS);
    let swiss = has(SWISS_MARKERS);
    match (classic, swiss) {
        (true, false) => MapImpl::Classic,
        (false, true) => MapImpl::Swiss,
        _ => MapImpl::of(version),
    }
}

/// Where Go's text starts, which pclntab's entry offsets are relative to:
/// `runtime.moduledata.text` when found, else pclntab's own header (0 from
/// Go 1.26 on), else the `.text` section. Cross-checked with the
/// `runtime.text` symbol when there is a symbol table.
fn text_start(
    elf: &elf::Elf<'_>,
    pcln: &elf::PclnLocation<'_>,
    moduledata: Option<u64>,
) -> Result<u64, InspectError> {
    let corrupt = |detail: String| InspectError::Corrupt {
        section: ".gopclntab",
        detail,
    };
    let moduledata = moduledata.and_then(|md| elf.moduledata_text(md));
    let header = elf.pcln_header_text_start(pcln).filter(|&t| t != 0);
    let start = match (moduledata, header) {
        (Some(m), Some(h)) if m != h => {
            return Err(corrupt(format!(
                "text start {m:#x} in moduledata but {h:#x} in the pclntab header"
            )));
        }
        (Some(m), _) => m,
        (None, Some(h)) => h,
        (None, None) => elf
            .text_section()
            .ok_or_else(|| corrupt("cannot tell where Go's text starts".to_owned()))?,
    };
    if let Some(sym) = elf.symtab_address("runtime.text")
        && sym != start
    {
        return Err(corrupt(format!(
            "text start {start:#x} but runtime.text is at {sym:#x}"
        )));
    }
    Ok(start)
}
