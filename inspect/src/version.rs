//! Go release versions as `.go.buildinfo` spells them.
use std::fmt;

/// Oldest and newest Go minor releases (1.x) gopulse supports.
pub const MIN_MINOR: u32 = 21;
pub const MAX_MINOR: u32 = 27;

/// A Go toolchain version such as `go1.24.11 X:noswissmap`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoVersion {
    /// The whole string, e.g. `go1.24.11 X:noswissmap`.
    pub raw: String,
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// `rc1`, `beta2`, ... for pre-releases.
    pub prerelease: Option<String>,
    /// `GOEXPERIMENT` settings the version string carries after ` X:`.
    pub experiments: Vec<String>,
    /// A development build (`devel go1.28-abcdef ...`).
    pub devel: bool,
}

impl GoVersion {
    /// Parses `go1.21.13`, `go1.22rc1`, `go1.24.11 X:noswissmap,foo`,
    /// `go1.26.6-X:nogreenteagc` (how Go 1.26+ joins the experiments),
    /// `devel go1.28-4d5c3a Tue ...`. Returns `None` for anything else.
    pub fn parse(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        let (devel, rest) = match raw.strip_prefix("devel ") {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        let mut words = rest.split_whitespace();
        let (head, joined) = match words.next()?.split_once("-X:") {
            Some((head, x)) => (head, Some(x)),
            None => (rest.split_whitespace().next()?, None),
        };
        let experiments = joined
            .or_else(|| words.find_map(|w| w.strip_prefix("X:")))
            .map(|x| x.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        let num = head.strip_prefix("go")?;
        // A devel version is `go1.28-<hash>`; the hash is not part of the number.
        let num = if devel { num.split('-').next()? } else { num };
        let (major, tail) = num.split_once('.')?;
        let major: u32 = major.parse().ok()?;
        let digits_end = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        let minor: u32 = tail[..digits_end].parse().ok()?;
        let tail = &tail[digits_end..];
        let (patch, prerelease) = if let Some(p) = tail.strip_prefix('.') {
            (p.parse().ok()?, None)
        } else if tail.is_empty() {
            (0, None)
        } else if tail.starts_with("rc") || tail.starts_with("beta") {
            (0, Some(tail.to_owned()))
        } else {
            return None;
        };
        Some(Self {
            raw: raw.to_owned(),
            major,
            minor,
            patch,
            prerelease,
            experiments,
            devel,
        })
    }

    /// The release as `go1.N.P` without experiments: the metric label.
    pub fn short(&self) -> String {
        match &self.prerelease {
            Some(pre) => format!("go{}.{}{}", self.major, self.minor, pre),
            None => format!("go{}.{}.{}", self.major, self.minor, self.patch),
        }
    }

    /// Whether gopulse knows this release's runtime.
    pub fn is_supported(&self) -> bool {
        self.major == 1 && (MIN_MINOR..=MAX_MINOR).contains(&self.minor) && !self.devel
    }

    /// What to do about an unsupported release: a newer agent for a newer
    /// release (or a development build), a newer Go for an older one.
    pub fn advice(&self) -> &'static str {
        if self.major == 1 && self.minor < MIN_MINOR && !self.devel {
            "build the program with a supported Go release to watch it"
        } else {
            "a newer gopulse may support it"
        }
    }

    /// Go 1.M or later.
    pub fn at_least(&self, minor: u32) -> bool {
        self.major > 1 || (self.major == 1 && self.minor >= minor)
    }
}

impl fmt::Display for GoVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// The supported range, for messages: `go1.21 to go1.27`.
pub fn supported_range() -> String {
    format!("go1.{MIN_MINOR} to go1.{MAX_MINOR}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release() {
        let v = GoVersion::parse("go1.21.13").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (1, 21, 13));
        assert!(v.is_supported());
        assert_eq!(v.short(), "go1.21.13");
        assert!(v.experiments.is_empty());
    }

    #[test]
    fn parses_experiments() {
        let v = GoVersion::parse("go1.24.11 X:noswissmap,aliastypeparams").unwrap();
        assert_eq!(v.minor, 24);
        assert_eq!(v.patch, 11);
        assert_eq!(v.experiments, vec!["noswissmap", "aliastypeparams"]);
        assert_eq!(v.short(), "go1.24.11");
        // Go 1.26+ joins them with a dash.
        let v = GoVersion::parse("go1.26.6-X:nogreenteagc,goroutineleakprofile").unwrap();
        assert_eq!((v.minor, v.patch), (26, 6));
        assert_eq!(v.experiments, vec!["nogreenteagc", "goroutineleakprofile"]);
        assert_eq!(v.short(), "go1.26.6");
        assert!(v.is_supported());
    }

    #[test]
    fn parses_prerelease_and_minor_only() {
        let v = GoVersion::parse("go1.22rc1").unwrap();
        assert_eq!(v.prerelease.as_deref(), Some("rc1"));
        assert_eq!(v.short(), "go1.22rc1");
        let v = GoVersion::parse("go1.21").unwrap();
        assert_eq!((v.minor, v.patch), (21, 0));
    }

    #[test]
    fn range() {
        assert!(!GoVersion::parse("go1.19.8").unwrap().is_supported());
        assert!(!GoVersion::parse("go1.20.14").unwrap().is_supported());
        assert!(GoVersion::parse("go1.27.3").unwrap().is_supported());
        assert!(!GoVersion::parse("go1.28.0").unwrap().is_supported());
        let devel = GoVersion::parse("devel go1.26-abcdef Tue Jan 1 2026").unwrap();
        assert!(devel.devel);
        assert!(!devel.is_supported());
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "go", "1.21", "go1", "go1.x", "go1.21.x", "go1.21-foo"] {
            assert!(GoVersion::parse(s).is_none(), "{s:?}");
        }
    }
}
