//! Everything the probes need from a Go executable: Go version and build
//! settings, function entry points as uprobe file offsets, and the RET sites
//! of functions whose return we observe. Nothing else in the agent parses ELF.
pub mod buildinfo;
mod disasm;
mod elf;
pub mod version;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

pub use buildinfo::BuildInfo;
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
    #[error(
        "the executable is stripped (no symbol table); stripped Go binaries are not supported yet, \
         build without -ldflags='-s'"
    )]
    Stripped,
    #[error("required function {0} is missing from the executable")]
    MissingFunction(String),
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
}

/// What the agent needs to know about one Go executable.
#[derive(Clone, Debug)]
pub struct GoBinary {
    pub build: BuildInfo,
    pub version: GoVersion,
    /// The requested functions that exist, by name.
    pub functions: BTreeMap<String, Function>,
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

/// [`inspect`] on bytes already read.
pub fn inspect_bytes(data: &[u8], wanted: &[&str]) -> Result<GoBinary, InspectError> {
    let elf = elf::Elf::parse(data)?;
    let build = elf.build_info()?;
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
    let mut functions = BTreeMap::new();
    for sym in elf.functions(wanted)? {
        let code = elf.code(sym.address, sym.size)?;
        let rets =
            disasm::ret_addresses(code, sym.address).map_err(|detail| InspectError::Corrupt {
                section: ".text",
                detail: format!("{}: {detail}", sym.name),
            })?;
        let ret_offsets = rets
            .into_iter()
            .map(|a| elf.file_offset(a))
            .collect::<Result<Vec<_>, _>>()?;
        functions.insert(
            sym.name.clone(),
            Function {
                file_offset: elf.file_offset(sym.address)?,
                name: sym.name,
                address: sym.address,
                size: sym.size,
                ret_offsets,
            },
        );
    }
    Ok(GoBinary {
        build,
        version,
        functions,
    })
}
