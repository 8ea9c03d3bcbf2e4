//! Go function names as their packages' import paths read.
//!
//! The Go linker escapes, in a symbol's package path, control characters,
//! space, `%`, `"`, bytes of 0x7F and above, and the dots of the path's last
//! element, as `%xx` (`cmd/internal/objabi.PathToPrefix`):
//! `gopkg.in/yaml.v3.(*decoder).mapping` is stored as
//! `gopkg.in/yaml%2ev3.(*decoder).mapping`, and the runtime, panics and
//! `go tool pprof` print it that way. gopulse names sites, and matches
//! `--site-skip` prefixes, by the import path users write instead.
use std::borrow::Cow;

/// `name` with every `%xx` escape decoded. A `%` is itself escaped in
/// symbol names, so any `%` followed by two hex digits is an escape.
pub fn unescape(name: &str) -> Cow<'_, str> {
    if !name.contains('%') {
        return Cow::Borrowed(name);
    }
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |j: usize| bytes.get(j).and_then(|&b| char::from(b).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits: at most 0xff.
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_dots_and_bytes() {
        assert_eq!(
            unescape("gopkg.in/yaml%2ev3.(*decoder).mapping"),
            "gopkg.in/yaml.v3.(*decoder).mapping"
        );
        assert_eq!(
            unescape("example.com/a%2eb%2ec.F[go.shape.int]"),
            "example.com/a.b.c.F[go.shape.int]"
        );
        assert_eq!(unescape("example.com/x%25y.F"), "example.com/x%y.F");
        assert_eq!(unescape("example.com/caf%c3%a9.F"), "example.com/café.F");
        assert!(matches!(unescape("main.(*Cache).Put"), Cow::Borrowed(_)));
        // Not an escape: left as it is.
        assert_eq!(unescape("a%2"), "a%2");
        assert_eq!(unescape("a%zz.F"), "a%zz.F");
        // Bytes that are no UTF-8 do not panic.
        assert_eq!(unescape("a%ff.F"), "a\u{fffd}.F");
    }
}
