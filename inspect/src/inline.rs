//! Where the compiler inlined the functions the probes want, read from the
//! inline trees pclntab keeps for every function (the runtime reads them
//! for tracebacks). A probe on a function's entry sees every call of it
//! only if no caller holds a copy of its body; profile-guided builds inline
//! runtime functions that ordinary builds keep out of line, some into
//! every caller (the function is then gone), some into a few.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{
    InspectError,
    pclntab::{InlineTree, Pclntab},
};

/// An `inlinedCall` record (`runtime/symtabinl.go`, Go 1.20+): funcID,
/// padding, nameOff (i32 at 4), parentPc, startLine.
const INLINED_CALL: usize = 16;
const INLINED_CALL_NAME: usize = 4;

/// Most calls inlined into one function (the compiler's own trees stay in
/// the thousands); beyond, the table is not what it claims to be.
const MAX_TREE: i32 = 1 << 20;

fn corrupt(detail: String) -> InspectError {
    InspectError::Corrupt {
        section: ".gopclntab",
        detail,
    }
}

/// For each of `wanted` inlined somewhere, the functions holding a copy of
/// it (sorted). `gofunc` is the executable's `go:func.*` data, from
/// `moduledata.gofunc` to the end of its segment.
pub fn inlined_into(
    pcln: &Pclntab<'_>,
    gofunc: &[u8],
    wanted: &[&str],
) -> Result<BTreeMap<String, BTreeSet<String>>, InspectError> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // nameOff → the wanted name it is, if any: each name read once.
    let mut names: HashMap<i32, Option<&str>> = HashMap::new();
    // Each function's tree is its own in go:func.* (the linker writes one
    // per function): together they fit in it, which bounds the work on
    // any input.
    let mut entries_left = gofunc.len() / INLINED_CALL;
    for i in 0..pcln.header().nfunc {
        let Some(tree) = pcln.inline_tree(i)? else {
            continue;
        };
        let Some(last) = largest_index(tree.index, tree.code_len) else {
            return Err(corrupt(format!(
                "function {i}'s inline-tree index table is unreadable"
            )));
        };
        let entries = usize::try_from(last + 1).unwrap_or(0);
        entries_left = entries_left.checked_sub(entries).ok_or_else(|| {
            corrupt(format!(
                "the inline trees, up to function {i}'s, do not fit in go:func.*"
            ))
        })?;
        for k in 0..=last {
            let name_off = entry_name(gofunc, &tree, k)?;
            let name = *names.entry(name_off).or_insert_with(|| {
                let name = pcln.name_at(name_off);
                wanted.iter().copied().find(|w| Some(*w) == name)
            });
            let Some(name) = name else {
                continue;
            };
            let caller = pcln
                .name(tree.function)
                .ok_or_else(|| corrupt(format!("function {i} has no readable name")))?;
            if name != caller {
                out.entry(name.to_owned())
                    .or_default()
                    .insert(caller.to_owned());
            }
        }
    }
    Ok(out)
}

/// The `nameOff` of entry `k` of a function's inline tree.
fn entry_name(gofunc: &[u8], tree: &InlineTree<'_>, k: i32) -> Result<i32, InspectError> {
    let at = (tree.tree_offset as usize)
        .checked_add(k as usize * INLINED_CALL + INLINED_CALL_NAME)
        .and_then(|at| gofunc.get(at..at.checked_add(4)?))
        .ok_or_else(|| {
            corrupt(format!(
                "function {}'s inline tree runs past the end of go:func.*",
                tree.function
            ))
        })?;
    Ok(i32::from_le_bytes([at[0], at[1], at[2], at[3]]))
}

/// The largest inline-tree index a function's table gives any of its
/// `code_len` bytes (-1: none inlined), or `None` if the table is corrupt.
/// A pc-value table (`runtime/symtab.go`, `step`) is a run of (value delta,
/// pc delta) pairs of varints, the value delta zig-zag encoded, from value
/// -1 at pc 0, ended by a zero value delta after the first pair. Every pc
/// delta is at least 1 (the linker writes one pair per run of code): the
/// table is read no further than the code it covers.
fn largest_index(table: &[u8], code_len: u32) -> Option<i32> {
    let mut p = table;
    let (mut value, mut pc, mut largest) = (-1i32, 0u64, -1i32);
    let mut first = true;
    loop {
        let (delta, n) = varint(p)?;
        if delta == 0 && !first {
            return Some(largest);
        }
        first = false;
        p = p.get(n..)?;
        value = value.wrapping_add(((delta >> 1) as i32) ^ -((delta & 1) as i32));
        let (pc_delta, n) = varint(p)?;
        p = p.get(n..)?;
        if pc_delta == 0 || !(-1..MAX_TREE).contains(&value) {
            return None;
        }
        largest = largest.max(value);
        pc += u64::from(pc_delta);
        if pc >= u64::from(code_len) {
            return Some(largest);
        }
    }
}

/// A little-endian base-128 u32 and its length.
fn varint(p: &[u8]) -> Option<(u32, usize)> {
    let mut v = 0u32;
    for (i, &b) in p.iter().enumerate().take(5) {
        v |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zigzag(d: i32) -> u32 {
        ((d << 1) ^ (d >> 31)) as u32
    }

    fn put(out: &mut Vec<u8>, mut v: u32) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A table of (value, length) runs, as the linker writes it.
    fn table(runs: &[(i32, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut value = -1;
        for &(v, len) in runs {
            put(&mut out, zigzag(v - value));
            put(&mut out, len);
            value = v;
        }
        out.push(0);
        out
    }

    #[test]
    fn largest_index_of_a_table() {
        assert_eq!(largest_index(&table(&[(-1, 10)]), 10), Some(-1));
        assert_eq!(
            largest_index(&table(&[(-1, 4), (0, 8), (2, 300), (1, 2)]), 314),
            Some(2)
        );
        // The first pair may have a zero value delta (value -1 at pc 0).
        assert_eq!(largest_index(&table(&[(-1, 4), (3, 4)]), 8), Some(3));
        // A table is read no further than the code it covers.
        let mut t = table(&[(0, 4), (5, 4)]);
        t.truncate(t.len() - 1);
        assert_eq!(largest_index(&t, 8), Some(5));
        assert_eq!(largest_index(&t, 9), None);
    }

    #[test]
    fn corrupt_tables_are_refused() {
        assert_eq!(largest_index(&[], 4), None);
        // A zero pc delta would cover no code.
        assert_eq!(largest_index(&[2, 0, 0], 4), None);
        assert_eq!(
            largest_index(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], 4),
            None
        );
        // An index past any real tree.
        let mut t = Vec::new();
        put(&mut t, zigzag(MAX_TREE + 1));
        put(&mut t, 4);
        assert_eq!(largest_index(&t, 4), None);
        assert_eq!(varint(&[0xff, 0x01]), Some((0xff, 2)));
    }
}
