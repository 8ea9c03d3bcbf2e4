//! `.go.buildinfo`: the Go version and build settings every Go binary
//! carries, stripped or not (format of `debug/buildinfo`).
use std::collections::BTreeMap;

use super::InspectError;

/// `\xff Go buildinf:`
pub const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
const HEADER_LEN: usize = 32;
/// Bit 1 of the flags byte: version and modinfo are inline varint strings
/// (Go 1.18+); otherwise the header holds pointers to Go strings.
const FLAG_INLINE: u8 = 0x2;
const FLAG_BIG_ENDIAN: u8 = 0x1;

/// What `.go.buildinfo` says about a binary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildInfo {
    /// The Go version string, e.g. `go1.24.11 X:noswissmap`.
    pub version: String,
    /// The main module path (`path` line of modinfo), if any.
    pub path: Option<String>,
    /// `build` settings: `-buildmode`, `CGO_ENABLED`, `GOEXPERIMENT`, ...
    pub settings: BTreeMap<String, String>,
}

/// Reads a uvarint; `None` when truncated or longer than 10 bytes.
fn uvarint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut x = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        x |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some((x, i + 1));
        }
    }
    None
}

fn varint_string(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, n) = uvarint(buf)?;
    let len = usize::try_from(len).ok()?;
    let rest = buf.get(n..)?;
    if len > rest.len() {
        return None;
    }
    Some(rest.split_at(len))
}

/// Parses build info starting at the magic. `read_ptr_string` resolves a Go
/// string header at a virtual address, for the pre-1.18 pointer format.
pub fn parse(
    blob: &[u8],
    read_ptr_string: impl Fn(u64, usize, bool) -> Option<Vec<u8>>,
) -> Result<BuildInfo, InspectError> {
    let corrupt = |what: &str| InspectError::Corrupt {
        section: ".go.buildinfo",
        detail: what.to_owned(),
    };
    if blob.len() < HEADER_LEN || &blob[..MAGIC.len()] != MAGIC {
        return Err(corrupt("missing magic"));
    }
    let ptr_size = usize::from(blob[14]);
    let flags = blob[15];
    let big_endian = flags & FLAG_BIG_ENDIAN != 0;
    let (version, modinfo) = if flags & FLAG_INLINE != 0 {
        let body = &blob[HEADER_LEN..];
        let (version, rest) = varint_string(body).ok_or_else(|| corrupt("truncated version"))?;
        let (modinfo, _) = varint_string(rest).ok_or_else(|| corrupt("truncated modinfo"))?;
        (version.to_vec(), modinfo.to_vec())
    } else {
        if ptr_size != 4 && ptr_size != 8 {
            return Err(corrupt("bad pointer size"));
        }
        let word = |at: usize| -> Option<u64> {
            let b = blob.get(at..at + ptr_size)?;
            let mut v = [0u8; 8];
            if big_endian {
                v[8 - ptr_size..].copy_from_slice(b);
                Some(u64::from_be_bytes(v))
            } else {
                v[..ptr_size].copy_from_slice(b);
                Some(u64::from_le_bytes(v))
            }
        };
        let vptr = word(16).ok_or_else(|| corrupt("truncated header"))?;
        let mptr = word(16 + ptr_size).ok_or_else(|| corrupt("truncated header"))?;
        let version = read_ptr_string(vptr, ptr_size, big_endian)
            .ok_or_else(|| corrupt("version pointer outside the file"))?;
        let modinfo = read_ptr_string(mptr, ptr_size, big_endian).unwrap_or_default();
        (version, modinfo)
    };
    let version = String::from_utf8(version).map_err(|_| corrupt("version is not UTF-8"))?;
    if version.is_empty() {
        return Err(corrupt("empty version"));
    }
    let mut info = BuildInfo {
        version,
        ..Default::default()
    };
    parse_modinfo(strip_sentinels(&modinfo), &mut info);
    Ok(info)
}

/// Modinfo is wrapped in 16-byte sentinels (as `debug/buildinfo` strips
/// them: when the byte before the trailing one is a newline).
fn strip_sentinels(modinfo: &[u8]) -> &[u8] {
    let n = modinfo.len();
    if n >= 33 && modinfo[n - 17] == b'\n' {
        &modinfo[16..n - 16]
    } else {
        modinfo
    }
}

/// Tab-separated `path`, `mod`, `dep` and `build` lines.
fn parse_modinfo(modinfo: &[u8], info: &mut BuildInfo) {
    for line in String::from_utf8_lossy(modinfo).lines() {
        if let Some(path) = line.strip_prefix("path\t") {
            info.path = Some(path.to_owned());
        } else if let Some(setting) = line.strip_prefix("build\t")
            && let Some((k, v)) = setting.split_once('=')
        {
            info.settings.insert(k.to_owned(), v.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_uvarint(b: &mut Vec<u8>, mut x: usize) {
        while x >= 0x80 {
            b.push((x as u8) | 0x80);
            x >>= 7;
        }
        b.push(x as u8);
    }

    fn inline_blob(version: &[u8], modinfo: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.push(8);
        b.push(FLAG_INLINE);
        b.resize(HEADER_LEN, 0);
        put_uvarint(&mut b, version.len());
        b.extend_from_slice(version);
        put_uvarint(&mut b, modinfo.len());
        b.extend_from_slice(modinfo);
        b
    }

    fn no_ptrs(_: u64, _: usize, _: bool) -> Option<Vec<u8>> {
        None
    }

    #[test]
    fn inline_format() {
        // Real modinfo: 16-byte sentinels around tab-separated lines.
        let mut modinfo = b"0w\xaf\x0c\x92t\x08\x02A\xe1\xc1\x07\xe6\xd6\x18\xe6".to_vec();
        modinfo.extend_from_slice(
            b"path\texample.com/x\nmod\texample.com/x\t(devel)\t\nbuild\t-buildmode=pie\n\
              build\tCGO_ENABLED=1\nbuild\tGOEXPERIMENT=noswissmap\n",
        );
        modinfo.extend_from_slice(b"\xf92C1\x86\x18 r\x00\x82B\x10A\x16\xd8\xf2");
        let info = parse(&inline_blob(b"go1.24.11 X:noswissmap", &modinfo), no_ptrs).unwrap();
        assert_eq!(info.version, "go1.24.11 X:noswissmap");
        assert_eq!(info.path.as_deref(), Some("example.com/x"));
        assert_eq!(info.settings["-buildmode"], "pie");
        assert_eq!(info.settings["CGO_ENABLED"], "1");
        assert_eq!(info.settings["GOEXPERIMENT"], "noswissmap");
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let blob = inline_blob(b"go1.22.10", b"path\tx\n");
        for cut in 0..blob.len() - 8 {
            let r = parse(&blob[..cut], no_ptrs);
            assert!(r.is_err(), "cut at {cut} parsed: {r:?}");
        }
    }

    #[test]
    fn pointer_format_uses_resolver() {
        let mut b = MAGIC.to_vec();
        b.push(8);
        b.push(0);
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&0x2000u64.to_le_bytes());
        let info = parse(&b, |addr, _, _| match addr {
            0x1000 => Some(b"go1.17.13".to_vec()),
            _ => None,
        })
        .unwrap();
        assert_eq!(info.version, "go1.17.13");
    }

    #[test]
    fn uvarint_bounds() {
        assert_eq!(uvarint(&[0x05]), Some((5, 1)));
        assert_eq!(uvarint(&[0x80, 0x01]), Some((128, 2)));
        assert_eq!(uvarint(&[0x80]), None);
        assert_eq!(uvarint(&[0xff; 11]), None);
    }
}
