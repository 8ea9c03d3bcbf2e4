//! Inputs the fuzzer (`cargo xtask fuzz`) ever failed on, and hand-made
//! hostile executables, kept in `inspect/fuzz/regressions/`: the parser
//! must answer each with `Ok` or an error, never a panic. A new crash
//! becomes a test by copying the input there (DEVELOPERS.md).
use std::{
    fs,
    panic::catch_unwind,
    path::{Path, PathBuf},
};

use gopulse_inspect::{GoBinary, InspectError, MapImpl, inspect_bytes, offsets};

/// What the fuzz target asks for (`inspect/fuzz/fuzz_targets/inspect.rs`).
const WANTED: &[&str] = &[
    "runtime.stopTheWorldWithSema",
    "runtime.startTheWorldWithSema",
    "runtime.gcMarkTermination",
    "runtime.mapassign",
];

fn fuzz_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(name)
}

/// Every file of `inspect/fuzz/<dir>`, by name.
fn inputs(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir(dir);
    let mut inputs: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    inputs
}

fn input(dir: &str, name: &str) -> Vec<u8> {
    let path = fuzz_dir(dir).join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// What the fuzz target runs: everything that parses an executable.
fn parse(data: &[u8]) -> Result<GoBinary, InspectError> {
    for imp in [MapImpl::Classic, MapImpl::Swiss] {
        let _ = offsets::from_dwarf(data, imp);
    }
    inspect_bytes(data, WANTED)
}

/// Names of the inputs of `dir` the parser panics on (each panic's message
/// is on stderr).
fn panicking(dir: &str) -> Vec<String> {
    inputs(dir)
        .into_iter()
        .filter(|(_, data)| catch_unwind(|| parse(data)).is_err())
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn no_regression_input_panics() {
    assert!(
        inputs("regressions").len() >= 3,
        "the hand-made cases are missing"
    );
    let panicked = panicking("regressions");
    assert!(panicked.is_empty(), "the parser panics on {panicked:?}");
}

#[test]
fn no_seed_panics() {
    let panicked = panicking("seeds");
    assert!(panicked.is_empty(), "the parser panics on {panicked:?}");
}

/// The compact seeds (`xtask/src/compact.rs`) are worth fuzzing from only
/// while the parser accepts them: then mutations start deep in it.
#[test]
fn compact_seeds_parse_all_the_way() {
    for (name, dwarf) in [
        ("compact-go1.27.3", true),
        ("compact-go1.21.13", true),
        ("compact-go1.21.13-stripped", false),
        ("compact-go1.27.3-stripped-headerless", false),
    ] {
        let data = input("seeds", name);
        let bin = inspect_bytes(&data, WANTED).unwrap_or_else(|e| panic!("{name}: {e}"));
        for f in WANTED {
            let f = bin.function(f).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!f.ret_offsets.is_empty(), "{name}: {} has no RET", f.name);
        }
        let offsets = offsets::from_dwarf(&data, MapImpl::of(&bin.version))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            offsets.is_some(),
            dwarf,
            "{name}: DWARF offsets {offsets:?}"
        );
    }
}

fn corrupt_section(name: &str) -> &'static str {
    match parse(&input("regressions", name)) {
        Err(InspectError::Corrupt { section, .. }) => section,
        other => panic!("{name}: expected a corrupt section, got {other:?}"),
    }
}

/// `compact-go1.27.3` whose `.go.buildinfo` says the version string is
/// 2^64-1 bytes long (a 10-byte varint over the string at offset 32).
#[test]
fn buildinfo_with_a_huge_version_length() {
    assert_eq!(
        corrupt_section("buildinfo-huge-varint-go1.27.3"),
        ".go.buildinfo"
    );
}

/// `compact-go1.27.3` whose segment holding `runtime.stopTheWorldWithSema`
/// is cut to 16 bytes in the file: pclntab says the function is longer.
#[test]
fn function_running_past_its_segment() {
    assert_eq!(corrupt_section("function-past-segment-go1.27.3"), ".text");
}

/// `compact-go1.21.13-stripped` whose pclntab claims 2^64-1 functions.
#[test]
fn pclntab_with_an_absurd_function_count() {
    assert_eq!(
        corrupt_section("pclntab-huge-nfunc-go1.21.13-stripped"),
        ".gopclntab"
    );
}

/// `compact-go1.21.13-stripped` whose pclntab says text starts at
/// 0xffff_ffff_ffff_f000: entry + text start overflows.
#[test]
fn text_start_near_the_top_of_the_address_space() {
    assert!(
        parse(&input(
            "regressions",
            "pclntab-text-start-overflow-go1.21.13-stripped"
        ))
        .is_err()
    );
}

/// `compact-go1.21.13-stripped` whose `.gopclntab` section header puts it at
/// 0xffff_ffff_ffff_fff0: its tables' addresses overflow.
#[test]
fn pclntab_at_the_top_of_the_address_space() {
    assert!(
        parse(&input(
            "regressions",
            "pclntab-at-top-of-address-space-go1.21.13-stripped"
        ))
        .is_err()
    );
}
