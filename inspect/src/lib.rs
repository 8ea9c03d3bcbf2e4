//! gopulse's binary inspection. Everything the probes need from a Go executable: Go version and build
//! settings, function entry points as uprobe file offsets, and the RET sites
//! of functions whose return we observe. Nothing else in the agent parses ELF.
pub mod buildinfo;
mod disasm;
mod elf;
pub mod globals;
pub mod layout;
pub mod offsets;
pub mod pclntab;
mod quick;
pub mod symname;
pub mod version;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

pub use buildinfo::BuildInfo;
pub use disasm::StackCheck;
pub use globals::{Global, GlobalError, Globals};
pub use layout::RuntimeOffsets;
pub use offsets::{MapImpl, MapOffsets, Offsets};
pub use pclntab::Symbolizer;
pub use quick::{Release, go_release};
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
    #[error(
        "Go release {version} is not supported: gopulse supports {range}; upgrade the agent for newer releases"
    )]
    UnsupportedVersion { version: String, range: String },
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
    /// PC → function name for every Go function.
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
}

/// Reads `path` and resolves `wanted` functions (those missing are simply
/// absent from [`GoBinary::functions`]). Refuses non-Go, non-amd64 and
/// unsupported Go releases.
pub fn inspect(path: &Path, wanted: &[&str]) -> Result<GoBinary, InspectError> {
    let data = std::fs::read(path).map_err(|source| InspectError::Io {
        path: path.to_owned(),
        source,
    })?;
    inspect_bytes(&data, wanted)
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
        });
    }
    Ok(version)
}

/// [`inspect`] on bytes already read.
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
    let text_start = text_start(&elf, &pcln)?;
    let symbolizer = pcln.table.symbolizer(text_start)?;
    // A wrong text start shifts every function: refuse rather than attach
    // probes mid-instruction. runtime.main is in every Go program and
    // starts with the stack check.
    let main = symbolizer
        .entry_of("runtime.main")
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
        // Bounds were checked when the symbolizer was built.
        let address = text_start + entry;
        let size = end - entry;
        if let Some(&known) = globals::ANCHORS
            .iter()
            .chain(globals::CALLEES)
            .find(|&&n| n == name)
            && let Ok(code) = elf.code(address, size)
        {
            runtime_code.push((known, address, code));
        }
        if !wanted.contains(&name) || functions.contains_key(name) {
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
    let map_impl = map_impl(&symbolizer, &version);
    let (offsets, runtime_offsets, offsets_from_dwarf) =
        match offsets::all_from_dwarf(data, map_impl)? {
            Some((o, runtime)) => (o, runtime.map_err(|e| e.to_string()), true),
            None => (
                offsets::from_table(&version, map_impl).ok_or_else(|| {
                    InspectError::UnsupportedVersion {
                        version: format!("{} ({map_impl:?} maps)", version.raw),
                        range: version::supported_range(),
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
            elf.moduledata_bss(&pcln).as_ref(),
        ),
        Err(e) => Globals::none(GlobalError::NoOffsets(e.clone())),
    };
    let pause_clock = if version.minor == 21 {
        pause_clock(&elf, data)?
    } else {
        None
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
        runtime: RuntimeLayout {
            offsets: runtime_offsets,
            offsets_from_dwarf,
            globals,
        },
    })
}

fn pause_clock(elf: &elf::Elf<'_>, data: &[u8]) -> Result<Option<PauseClock>, InspectError> {
    let (Some(work), Some(memstats)) = (
        elf.symtab_data_address("runtime.work"),
        elf.symtab_data_address("runtime.memstats"),
    ) else {
        return Ok(None);
    };
    let (Some(pause_start), Some(last_gc)) = (
        offsets::field_offset(data, "runtime.workType", "pauseStart")?,
        offsets::field_offset(data, "runtime.mstats", "last_gc_nanotime")?,
    ) else {
        return Ok(None);
    };
    Ok(Some(PauseClock {
        pause_start: work.wrapping_add(pause_start),
        last_gc_nanotime: memstats.wrapping_add(last_gc),
    }))
}

/// Classic maps have `runtime.hashGrow`, swiss tables
/// `internal/runtime/maps.(*table).grow`; the linker keeps both in every
/// program (the runtime itself uses maps). The version rule (1.24+ swiss
/// unless `X:noswissmap`) only decides when neither is there.
fn map_impl(symbolizer: &Symbolizer, version: &GoVersion) -> MapImpl {
    let classic = symbolizer.entry_of("runtime.hashGrow").is_some();
    let swiss = symbolizer
        .entry_of("internal/runtime/maps.(*table).grow")
        .is_some();
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
fn text_start(elf: &elf::Elf<'_>, pcln: &elf::PclnLocation<'_>) -> Result<u64, InspectError> {
    let corrupt = |detail: String| InspectError::Corrupt {
        section: ".gopclntab",
        detail,
    };
    let moduledata = elf.moduledata_text(pcln);
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
