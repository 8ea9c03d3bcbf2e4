//! The checked-in struct offset table (`cargo xtask codegen offsets`) against
//! the DWARF of real builds of every supported release.
mod support;

use std::path::{Path, PathBuf};

use gopulse_agent::inspect::{
    self, GoVersion, InspectError, MapImpl, MapOffsets, Offsets,
    offsets::{from_dwarf, from_dwarf_through, from_table},
};

/// Each installed toolchain with its version, or `None` after a skip.
fn toolchains() -> Option<Vec<(&'static str, PathBuf)>> {
    let mut found = Vec::new();
    for version in support::GO_VERSIONS {
        match support::go_tool(version) {
            Some(go) => found.push((*version, go)),
            None => {
                if !support::prerequisite(false, &format!("Go {version} is not installed")) {
                    return None;
                }
            }
        }
    }
    Some(found)
}

fn version_of(bin: &Path) -> GoVersion {
    inspect::inspect(bin, &[])
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()))
        .version
}

/// Offsets from the design notes (shared/design/go-runtime-internals.md
/// §2.1, 3.1, 3.2, 4.2), read there from other builds: an anchor that does
/// not depend on codegen.
fn assert_known_values(what: &str, minor: u32, o: &Offsets) {
    let goid = match minor {
        23 | 24 => 160,
        _ => 152,
    };
    let curg = if minor <= 24 { 192 } else { 184 };
    assert_eq!((o.g_goid, o.g_m, o.m_curg), (goid, 48, curg), "{what}");
    match o.map {
        MapOffsets::Classic {
            count,
            flags,
            b,
            noverflow,
            hash0,
            buckets,
            oldbuckets,
            nevacuate,
            extra,
            size,
            maptype_bucket_size,
        } => {
            assert_eq!(
                (
                    count, flags, b, noverflow, hash0, buckets, oldbuckets, nevacuate
                ),
                (0, 8, 9, 10, 12, 16, 24, 32),
                "{what}"
            );
            // 1.24 put clearSeq before extra.
            let (extra_at, hmap_size) = if minor >= 24 { (48, 56) } else { (40, 48) };
            assert_eq!((extra, size), (extra_at, hmap_size), "{what}");
            // Design notes §2.3: BucketSize at +82 of the 88-byte map type.
            assert_eq!(maptype_bucket_size, 82, "{what}");
        }
        MapOffsets::Swiss {
            map_used,
            map_seed,
            map_dir_ptr,
            map_dir_len,
            map_global_depth,
            map_global_shift,
            map_size,
            table_used,
            table_capacity,
            table_growth_left,
            table_local_depth,
            table_index,
            table_groups_data,
            table_groups_length_mask,
            table_size,
        } => {
            assert_eq!(
                (
                    map_used,
                    map_seed,
                    map_dir_ptr,
                    map_dir_len,
                    map_global_depth,
                    map_global_shift,
                    map_size
                ),
                (0, 8, 16, 24, 32, 33, 48),
                "{what}"
            );
            assert_eq!(
                (
                    table_used,
                    table_capacity,
                    table_growth_left,
                    table_local_depth,
                    table_index,
                    table_groups_data,
                    table_groups_length_mask,
                    table_size
                ),
                (0, 2, 4, 6, 8, 16, 24, 32),
                "{what}"
            );
        }
    }
}

/// Runtime offsets from the research notes (§5 of
/// /work/notes/runtime-state.md, read from other builds): an anchor that
/// does not depend on codegen.
fn assert_runtime_values(what: &str, minor: u32, o: &inspect::RuntimeOffsets) {
    use inspect::layout::FreeGs;
    assert_eq!(
        (
            o.gc_controller_size,
            o.gc_percent,
            o.memory_limit,
            o.heap_marked
        ),
        (392, 0, 8, 152),
        "{what}"
    );
    let (numgc, cycles, ngsys, time_to_run) = match minor {
        21 | 22 => (7704, 400, 72, 320),
        23 | 24 => (7704, 424, 72, 320),
        25 => (7680, 512, 80, 344),
        _ => (7680, 648, 96, 360),
    };
    assert_eq!(
        (o.numgc, o.work_cycles, o.sched_ngsys, o.sched_time_to_run),
        (numgc, cycles, ngsys, time_to_run),
        "{what}"
    );
    match (minor, o.sched_free) {
        (..=24, FreeGs::Counted { sched_n: 184 }) => {}
        (
            25,
            FreeGs::Split {
                sched_stack: 184,
                sched_no_stack: 200,
            },
        ) => {}
        (
            26..,
            FreeGs::Split {
                sched_stack: 200,
                sched_no_stack: 216,
            },
        ) => {}
        (_, other) => panic!("{what}: gFree {other:?}"),
    }
}

#[test]
fn dwarf_agrees_with_the_table_for_every_release() {
    let Some(toolchains) = toolchains() else {
        return;
    };
    for (version, go) in &toolchains {
        let mut builds = vec![("default", vec![])];
        if ["1.24.", "1.25."].iter().any(|p| version.starts_with(p)) {
            builds.push(("noswissmap", vec![("GOEXPERIMENT", "noswissmap")]));
        }
        // Other link modes write the DWARF differently (external linking
        // goes through the host linker); the oldest and newest suffice.
        if version == &support::GO_VERSIONS[0] || Some(version) == support::GO_VERSIONS.last() {
            builds.push(("cgo", vec![]));
            builds.push(("pie", vec![]));
        }
        for (kind, envs) in builds {
            let args: &[&str] = match kind {
                "cgo" => &["-tags=gopulse_cgo"],
                "pie" => &["-buildmode=pie"],
                _ => &[],
            };
            let tag = format!("{version}-{kind}");
            let bin = support::build_fixture_env("gcload", go, &tag, args, &envs);
            let what = format!("go{version} {kind}");
            let found = version_of(&bin);
            let imp = MapImpl::of(&found);
            let expected_imp = if found.minor < 24 || kind == "noswissmap" {
                MapImpl::Classic
            } else {
                MapImpl::Swiss
            };
            assert_eq!(imp, expected_imp, "{what}: {found}");

            let data = std::fs::read(&bin).unwrap();
            let dwarf = from_dwarf(&data, imp)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .unwrap_or_else(|| panic!("{what}: no DWARF"));
            let table = from_table(&found, imp).unwrap_or_else(|| {
                panic!("{what}: no table row; run `cargo xtask codegen offsets`")
            });
            assert_eq!(
                dwarf, table,
                "{what}: stale table; run `cargo xtask codegen offsets`"
            );
            assert_known_values(&what, found.minor, &dwarf);
            // Read through small windows (entries cut at their ends, the
            // window widened for none): the same.
            for window in [1 << 10, 4093] {
                assert_eq!(
                    from_dwarf_through(&data, imp, window).unwrap(),
                    Some(dwarf),
                    "{what}: window {window}"
                );
            }
            // The runtime state's offsets (issue 19), and the moduledata
            // fields that bound the sections its globals lie in.
            let runtime = inspect::offsets::runtime_from_dwarf(&data)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .unwrap_or_else(|| panic!("{what}: no DWARF"));
            assert_eq!(
                Some(runtime),
                inspect::layout::from_table(&found),
                "{what}: stale runtime table; run `cargo xtask codegen offsets`"
            );
            runtime.check().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_runtime_values(&what, found.minor, &runtime);
            // Its nested fields (`gFree.stack.size`, `heapStats.gen`,
            // `cpuStats.GCTotalTime`: member types followed to structs read
            // in later passes) through small windows too.
            for window in [1 << 10, 4093] {
                assert_eq!(
                    inspect::offsets::runtime_from_dwarf_through(&data, window).unwrap(),
                    Some(runtime),
                    "{what}: runtime offsets through a window of {window}"
                );
            }
            for (field, offset) in inspect::globals::MODULEDATA_FIELDS {
                assert_eq!(
                    inspect::offsets::field_from_dwarf(&data, "runtime.moduledata", field)
                        .unwrap_or_else(|e| panic!("{what}: {e}")),
                    Some(offset),
                    "{what}: runtime.moduledata.{field}"
                );
            }
            // The arrays the agent sums have the lengths it assumes.
            let largefree =
                inspect::offsets::field_from_dwarf(&data, "runtime.heapStatsDelta", "largeFree")
                    .unwrap()
                    .unwrap();
            assert_eq!(
                largefree - u64::from(runtime.delta_small_alloc_count),
                8 * inspect::layout::SIZE_CLASSES as u64,
                "{what}: heapStatsDelta.smallAllocCount is [68]uint64"
            );

            // The other implementation's structs are not in the binary.
            let other = match imp {
                MapImpl::Classic => MapImpl::Swiss,
                MapImpl::Swiss => MapImpl::Classic,
            };
            match from_dwarf(&data, other) {
                Err(InspectError::MissingType(_)) => {}
                r => panic!("{what}: reading {other:?} offsets gave {r:?}"),
            }
        }
    }
}

#[test]
fn stripped_builds_have_no_dwarf() {
    let Some(toolchains) = toolchains() else {
        return;
    };
    for (version, go) in &toolchains {
        let tag = format!("{version}-stripped");
        let bin = support::build_fixture("gcload", go, &tag, &["-ldflags=-s -w"]);
        let data = std::fs::read(&bin).unwrap();
        for imp in [MapImpl::Classic, MapImpl::Swiss] {
            let r = from_dwarf(&data, imp);
            assert!(matches!(r, Ok(None)), "go{version} stripped: {r:?}");
        }
    }
}
