//! Whatever the bytes, the parser returns: `Ok` or an error, never a panic,
//! a hang or an allocation the input size does not justify.
#![no_main]

use gopulse_inspect::{MapImpl, inspect_bytes, offsets};
use libfuzzer_sys::fuzz_target;

/// The functions the agent asks for (`xtask/src/fuzz.rs` and
/// `inspect/tests/fuzz_regressions.rs` have the same list).
const WANTED: &[&str] = &[
    "runtime.stopTheWorldWithSema",
    "runtime.startTheWorldWithSema",
    "runtime.gcMarkTermination",
    "runtime.mapassign",
];

fuzz_target!(|data: &[u8]| {
    let _ = inspect_bytes(data, WANTED);
    for imp in [MapImpl::Classic, MapImpl::Swiss] {
        let _ = offsets::from_dwarf(data, imp);
    }
});
