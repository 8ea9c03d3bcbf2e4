//! Tables that mirror the Go runtime, checked against each installed
//! toolchain's own source, so a new release that changes them fails here.
mod support;

use std::collections::BTreeMap;

use gopulse_agent::{inspect::GoVersion, stw};

/// `stwReason` constants in order and their `stwReasonStrings`, parsed from
/// `src/runtime/proc.go`.
fn go_reasons(proc_go: &str) -> Vec<String> {
    let consts = proc_go
        .split("stwUnknown ")
        .nth(1)
        .and_then(|rest| rest.split("\n)").next())
        .expect("stwReason const block");
    let mut order = vec!["stwUnknown".to_owned()];
    for line in consts.lines().skip(1) {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with("stw") {
            order.push(name.to_owned());
        }
    }
    let table = proc_go
        .split("var stwReasonStrings = [...]string{")
        .nth(1)
        .and_then(|rest| rest.split("\n}").next())
        .expect("stwReasonStrings");
    let strings: BTreeMap<&str, &str> = table
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            Some((k.trim(), v.trim().trim_end_matches(',').trim_matches('"')))
        })
        .collect();
    order
        .iter()
        .map(|name| {
            strings
                .get(name.as_str())
                .unwrap_or_else(|| panic!("no string for {name}"))
                .to_string()
        })
        .collect()
}

#[test]
fn stw_reason_table_matches_every_toolchain() {
    let mut checked = 0;
    for version in support::GO_VERSIONS {
        let Some(go) = support::go_tool(version) else {
            if !support::prerequisite(false, &format!("Go {version} is not installed")) {
                return;
            }
            unreachable!();
        };
        let root = go.parent().unwrap().parent().unwrap();
        let src = std::fs::read_to_string(root.join("src/runtime/proc.go")).unwrap();
        let ours = stw::table_for(&GoVersion::parse(&format!("go{version}")).unwrap());
        let theirs = go_reasons(&src);
        let ours_go: Vec<&str> = ours.iter().map(|r| r.go_name).collect();
        assert_eq!(ours_go, theirs, "stwReasonStrings of Go {version}");
        checked += 1;
    }
    assert_eq!(checked, support::GO_VERSIONS.len());
}

/// The `uint{8,16}` array `var name = [...]{...}` of a Go source.
fn go_array(src: &str, name: &str) -> Vec<u64> {
    let body = src
        .split(&format!("var {name} = ["))
        .nth(1)
        .and_then(|rest| rest.split_once('{'))
        .and_then(|(_, rest)| rest.split('}').next())
        .unwrap_or_else(|| panic!("no {name}"));
    body.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or_else(|e| panic!("{name}: {s}: {e}")))
        .collect()
}

/// The slice growth probe rounds new capacities up to the allocator's size
/// classes as the runtime does: its tables are each toolchain's (Go 1.25
/// moved them to internal/runtime/gc and renamed them).
#[test]
fn size_classes_match_every_toolchain() {
    let mut checked = 0;
    for version in support::GO_VERSIONS {
        let Some(go) = support::go_tool(version) else {
            if !support::prerequisite(false, &format!("Go {version} is not installed")) {
                return;
            }
            unreachable!();
        };
        let root = go.parent().unwrap().parent().unwrap().join("src");
        let (src, names) =
            match std::fs::read_to_string(root.join("internal/runtime/gc/sizeclasses.go")) {
                Ok(s) => (
                    s,
                    ["SizeClassToSize", "SizeToSizeClass8", "SizeToSizeClass128"],
                ),
                Err(_) => (
                    std::fs::read_to_string(root.join("runtime/sizeclasses.go")).unwrap(),
                    ["class_to_size", "size_to_class8", "size_to_class128"],
                ),
            };
        let sizes = go_array(&src, names[0]);
        for (ours, table) in [
            (&gopulse_common::SIZE_CLASS_BYTES8[..], names[1]),
            (&gopulse_common::SIZE_CLASS_BYTES128[..], names[2]),
        ] {
            let theirs: Vec<u64> = go_array(&src, table)
                .into_iter()
                .map(|class| sizes[class as usize])
                .collect();
            let ours: Vec<u64> = ours.iter().map(|&b| u64::from(b)).collect();
            assert_eq!(ours, theirs, "Go {version}: {table}");
        }
        checked += 1;
    }
    assert_eq!(checked, support::GO_VERSIONS.len());
}
