//! Is this executable a Go program gopulse supports? Answered from the ELF
//! header, the section headers and `.go.buildinfo` alone, a few pages read,
//! so a node agent can judge every program that execs without reading
//! whole binaries.
use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
};

use object::{Architecture, Object as _, ObjectSection as _, read::ReadCache};

use crate::{InspectError, buildinfo, version::GoVersion};

/// What [`go_release`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The Go release the program was built with.
    pub version: GoVersion,
    /// The main module's path, when the build recorded it.
    pub main_path: Option<String>,
}

/// The Go release of the executable at `path`, or why gopulse cannot watch
/// it: not ELF, not amd64, not Go, an unsupported release. Executables
/// without section headers are mapped whole; for tools and tests, like
/// [`crate::inspect`] (the agent calls [`go_release_in`]).
pub fn go_release(path: &Path) -> Result<Release, InspectError> {
    let io = |source| InspectError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    go_release_in(&file, path, || {
        // SAFETY: the caller reads a file nobody writes meanwhile (above).
        unsafe { crate::Image::map(&file) }.map_err(io)
    })
}

/// [`go_release`] of an open file (`path` names it in errors). `whole`
/// gives the executable's bytes, asked for only when it has no section
/// headers.
pub fn go_release_in<B: AsRef<[u8]>>(
    mut file: &File,
    path: &Path,
    whole: impl FnOnce() -> Result<B, InspectError>,
) -> Result<Release, InspectError> {
    let io = |source| InspectError::Io {
        path: path.to_owned(),
        source,
    };
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
        return Err(InspectError::NotElf);
    }
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|e| InspectError::Corrupt {
        section: "ELF header",
        detail: e.to_string(),
    })?;
    if elf.architecture() != Architecture::X86_64 || !elf.is_64() {
        return Err(InspectError::WrongArch(format!("{:?}", elf.architecture())));
    }
    let info = match elf.section_by_name(".go.buildinfo") {
        Some(section) => {
            let blob = section.data().map_err(|e| InspectError::Corrupt {
                section: ".go.buildinfo",
                detail: e.to_string(),
            })?;
            if !blob.starts_with(buildinfo::MAGIC) {
                return Err(InspectError::NotGo);
            }
            // Go 1.18+ keeps the strings inline; older formats point
            // elsewhere, and those releases are unsupported anyway.
            buildinfo::parse(blob, |_, _, _| None)?
        }
        // Section headers gone (index 0 is the null section): the slow way.
        None if elf.sections().count() <= 1 => {
            drop(elf);
            let data = whole()?;
            crate::elf::Elf::parse(data.as_ref())?.build_info()?
        }
        None => return Err(InspectError::NotGo),
    };
    Ok(Release {
        version: crate::supported_version(&info)?,
        main_path: info.path,
    })
}
