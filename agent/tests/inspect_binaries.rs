//! Binary inspection on real Go builds of every supported release.
mod support;

use std::{collections::BTreeMap, path::Path, process::Command};

use support::nm;

use gopulse_agent::{
    inspect::{self, InspectError, MapImpl},
    plan,
};

/// Address of a data symbol from `go tool nm`.
fn truth_data(go: &Path, bin: &Path, name: &str) -> u64 {
    let out = Command::new(go)
        .args(["tool", "nm"])
        .arg(bin)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| {
            let mut c = l.split_whitespace();
            let addr = u64::from_str_radix(c.next()?, 16).ok()?;
            let kind = c.next()?;
            (matches!(kind, "D" | "B" | "d" | "b") && c.next()? == name).then_some(addr)
        })
        .unwrap_or_else(|| panic!("nm has no {name}"))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if ".()*+?[]{}|^$\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Addresses of the RET instructions `go tool objdump` shows in a function.
fn objdump_rets(go: &Path, bin: &Path, func: &str) -> Vec<u64> {
    let out = Command::new(go)
        .args([
            "tool",
            "objdump",
            "-s",
            &format!("^{}$", regex_escape(func)),
        ])
        .arg(bin)
        .output()
        .unwrap();
    assert!(out.status.success(), "go tool objdump {}", bin.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "RET"))
        .filter_map(|l| {
            let hex = l.split_whitespace().nth(1)?.strip_prefix("0x")?;
            u64::from_str_radix(hex, 16).ok()
        })
        .collect()
}

/// The four builds of the matrix: default, stripped, PIE, cgo.
const BUILDS: &[(&str, &[&str])] = &[
    ("default", &[]),
    ("stripped", &["-ldflags=-s -w"]),
    ("pie", &["-buildmode=pie"]),
    ("cgo", &["-tags=gopulse_cgo"]),
];

#[test]
fn build_matrix_of_every_release() {
    let mut checked = 0;
    for version in support::GO_VERSIONS {
        let Some(go) = support::go_tool(version) else {
            if !support::prerequisite(false, &format!("Go {version} is not installed")) {
                return;
            }
            unreachable!();
        };
        let mut default: Option<inspect::GoBinary> = None;
        let mut default_nm = BTreeMap::new();
        for &(kind, args) in BUILDS {
            let bin = support::build_fixture("gcload", &go, &format!("{version}-{kind}"), args);
            let found = inspect::inspect(&bin, &plan::wanted_functions())
                .unwrap_or_else(|e| panic!("go{version} {kind}: {e}"));
            let what = format!("go{version} {kind}");
            assert_eq!(found.version.raw, format!("go{version}"), "{what}");
            // Discovery's quick check (headers and .go.buildinfo only) agrees.
            let quick = inspect::go_release(&bin).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(quick.version, found.version, "{what}");
            assert_eq!(quick.main_path, found.build.path, "{what}");
            assert_eq!(
                found.build.path.as_deref(),
                Some("example.com/gopulse/gcload"),
                "{what}"
            );
            assert_eq!(found.stripped, kind == "stripped", "{what}");
            assert_eq!(found.pie, kind == "pie", "{what}");
            if kind == "cgo" {
                assert_eq!(
                    found.build.settings.get("CGO_ENABLED").map(String::as_str),
                    Some("1")
                );
            }
            // Build settings agree with the toolchain's own reading.
            let out = Command::new(&go)
                .args(["version", "-m"])
                .arg(&bin)
                .output()
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            for (k, v) in &found.build.settings {
                assert!(
                    text.contains(&format!("build\t{k}={v}")),
                    "{what}: {k}={v} not in\n{text}"
                );
            }
            // Functions: against nm of this build, or of the default build
            // for the stripped one (same code, no symbols).
            let truth = if kind == "stripped" {
                default_nm.clone()
            } else {
                nm(&go, &bin)
            };
            assert_eq!(
                truth.get("runtime.text").map(|t| t.0),
                Some(found.text_start),
                "{what}"
            );
            let growth = match found.map_impl {
                MapImpl::Classic => plan::CLASSIC_GROWTH,
                MapImpl::Swiss => plan::SWISS_GROWTH,
            };
            let mut probed: Vec<&str> = plan::REQUIRED_FUNCTIONS.to_vec();
            probed.extend(growth.iter().map(|(f, _)| *f));
            if found.version.at_least(25) && found.map_impl == MapImpl::Swiss {
                probed.push(plan::SWISS_PRUNE_FN);
                // Probed past its "too few tombstones" return, inside the
                // function, after the frame is built.
                let prune = found.function(plan::SWISS_PRUNE_FN).unwrap();
                let body = prune
                    .guarded_body
                    .unwrap_or_else(|| panic!("{what}: no body found in pruneTombstones"));
                let jump = prune.stack_check_jump_offset().unwrap();
                assert!(
                    body > jump + 8 && body < prune.file_offset + prune.size,
                    "{what}: pruneTombstones body at {body:#x}"
                );
            }
            for name in &probed {
                let f = found.function(name).unwrap();
                // Placement: every entry probe sits on the stack check's
                // jump, which the kernel emulates.
                let jump = f.stack_check_jump_offset().expect("stack check");
                assert_eq!(plan::entry_offset(f).unwrap(), jump, "{what} {name}");
                assert!(
                    jump > f.file_offset && jump < f.file_offset + 16,
                    "{what} {name}"
                );
                let (addr, size) = truth[*name];
                assert_eq!(f.address, addr, "{what} {name}");
                assert!(
                    f.size >= size && f.size < size + 64,
                    "{what} {name}: {} vs nm {size}",
                    f.size
                );
                assert!(f.stack_check.is_some(), "{what} {name} has no stack check");
                let rets: Vec<u64> = f
                    .ret_offsets
                    .iter()
                    .map(|off| off - f.file_offset + f.address)
                    .collect();
                if kind == "stripped" {
                    let d = default.as_ref().unwrap().function(name).unwrap();
                    assert_eq!(f, d, "{what} {name} differs from the default build");
                } else {
                    assert_eq!(rets, objdump_rets(&go, &bin, name), "{what} {name} RETs");
                }
            }
            // The map implementation, decided from the binary's own code.
            let expected = if found.version.at_least(24) {
                MapImpl::Swiss
            } else {
                MapImpl::Classic
            };
            assert_eq!(found.map_impl, expected, "{what}");
            assert_eq!(found.offsets_from_dwarf, kind != "stripped", "{what}");
            assert_eq!(
                Some(found.offsets),
                inspect::offsets::from_table(&found.version, found.map_impl),
                "{what}: struct offsets"
            );
            check_runtime_layout(&go, &bin, &found, kind, &what);
            // Go 1.21's own pause clock, found with symbols and DWARF.
            assert_eq!(
                found.pause_clock.is_some(),
                found.version.minor == 21 && kind != "stripped",
                "{what}: pause clock"
            );
            if let Some(clock) = found.pause_clock {
                let work = truth_data(&go, &bin, "runtime.work");
                let memstats = truth_data(&go, &bin, "runtime.memstats");
                assert!(
                    clock.pause_start > work && clock.pause_start < work + 4096,
                    "{what}"
                );
                assert_eq!(
                    clock.last_gc_nanotime,
                    memstats + 7720,
                    "{what}: design notes §4.3"
                );
            }
            // PC -> function name, for call-site attribution: from the
            // executable's bytes, and read from its file.
            let data = std::fs::read(&bin).unwrap();
            let file = std::fs::File::open(&bin).unwrap();
            let main = truth["runtime.main"].0;
            for (pc, name) in [
                (main + 1, "runtime.main"),
                (truth["main.main"].0, "main.main"),
            ] {
                let s = &found.symbolizer;
                assert_eq!(s.function_at(&data, pc), Some(name), "{what}");
                let i = s.index_at(pc).unwrap();
                assert_eq!(s.name_in_file(&file, i).as_deref(), Some(name), "{what}");
            }
            let planned = plan::plan(&found, 0).unwrap();
            // An ordinary build keeps every growth function whole: each kind
            // is counted through its own.
            assert!(found.inlined.is_some(), "{what}: no inline trees found");
            assert!(planned.coverage.is_plain(), "{what}: {}", planned.coverage);
            assert_eq!(
                planned.stw.start_args,
                u8::from(found.version.at_least(22)),
                "{what}"
            );
            assert!(planned.core.len() >= 3, "{what}");
            // The site walk's plumbing: a few hundred pages at most,
            // covering the runtime but not main.
            let pages = plan::Plumbing::default().pages(&found.symbolizer, &data);
            assert!(
                (1..1000).contains(&pages.len()),
                "{what}: {} pages",
                pages.len()
            );
            let covered = |a: u64| {
                pages.get(&((a >> 12) as u32)).is_some_and(|bits| {
                    let i = ((a >> 4) & 0xff) as usize;
                    bits.0[i / 64] & (1 << (i % 64)) != 0
                })
            };
            for name in probed.iter().chain(["runtime.main"].iter()) {
                assert!(covered(truth[*name].0), "{what}: {name} not plumbing");
            }
            assert!(
                !covered(truth["main.main"].0),
                "{what}: main.main is plumbing"
            );
            if kind == "default" {
                default_nm = truth;
                default = Some(found);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, support::GO_VERSIONS.len() * BUILDS.len());
}

/// The runtime's state (issue 19): its offsets (DWARF or the table, which
/// agree), and every global, from symbols where there are some, from the
/// code alone otherwise; the code's answer equals the symbols' in every
/// build that has them.
fn check_runtime_layout(go: &Path, bin: &Path, found: &inspect::GoBinary, kind: &str, what: &str) {
    let rt = &found.runtime;
    assert_eq!(rt.offsets_from_dwarf, kind != "stripped", "{what}");
    let offsets = rt
        .offsets
        .as_ref()
        .unwrap_or_else(|e| panic!("{what}: runtime offsets: {e}"));
    assert_eq!(
        Some(*offsets),
        inspect::layout::from_table(&found.version),
        "{what}: runtime offsets vs the table"
    );
    assert_eq!(rt.globals.from_symbols, kind != "stripped", "{what}");
    assert!(
        rt.globals.missing().is_empty(),
        "{what}: {:?}",
        rt.globals.missing()
    );
    assert!(rt.globals.allgs.is_some(), "{what}: runtime.allgs");
    let by_code = inspect::globals_from_code(&std::fs::read(bin).unwrap())
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(!by_code.from_symbols, "{what}");
    for g in inspect::Global::ALL {
        let code = by_code
            .get(g)
            .unwrap_or_else(|e| panic!("{what}: {g} from code: {e}"));
        assert_eq!(Ok(code), rt.globals.get(g), "{what}: {g} by code vs found");
        if kind != "stripped" {
            assert_eq!(
                code,
                truth_data(go, bin, g.symbol()),
                "{what}: {g} by code vs nm"
            );
        }
    }
    assert_eq!(by_code.allgs, rt.globals.allgs, "{what}: runtime.allgs");
    // gctrace's `@` (issue 20).
    assert_eq!(
        by_code.runtime_init_time, rt.globals.runtime_init_time,
        "{what}: runtime.runtimeInitTime"
    );
    assert!(
        by_code.runtime_init_time.is_some(),
        "{what}: runtime.runtimeInitTime"
    );
    if kind != "stripped" {
        assert_eq!(
            by_code.allgs,
            Some(truth_data(go, bin, "runtime.allgs")),
            "{what}: runtime.allgs vs nm"
        );
        assert_eq!(
            by_code.runtime_init_time,
            Some(truth_data(go, bin, "runtime.runtimeInitTime")),
            "{what}: runtime.runtimeInitTime vs nm"
        );
    }
}

/// Builds with experiments: 1.25's greenteagc moves `workType`'s fields
/// (a table row of its own); the others move nothing the agent reads
/// (`cargo xtask codegen offsets` checks that on their DWARF). Stripped, the
/// table must give what the unstripped build's DWARF says, and the globals
/// must be found from the code.
#[test]
fn experiment_builds_read_their_runtime_layout() {
    for (version, experiment) in [
        ("1.25.5", "greenteagc"),
        ("1.25.5", "noswissmap"),
        ("1.26.6", "goroutineleakprofile"),
        ("1.26.6", "nogreenteagc"),
        ("1.27.3", "nogreenteagc"),
    ] {
        let Some(go) = support::go_tool(version) else {
            if !support::prerequisite(false, &format!("Go {version} is not installed")) {
                return;
            }
            unreachable!();
        };
        let build = |kind: &str, args: &[&str]| {
            let bin = support::build_fixture_env(
                "gcload",
                &go,
                &format!("{version}-{experiment}-{kind}"),
                args,
                &[("GOEXPERIMENT", experiment)],
            );
            inspect::inspect(&bin, &[]).unwrap_or_else(|e| panic!("{version} {experiment}: {e}"))
        };
        let full = build("default", &[]);
        let stripped = build("stripped", &["-ldflags=-s -w"]);
        let what = format!("go{version} X:{experiment}");
        assert!(
            full.version.experiments.iter().any(|x| x == experiment),
            "{what}: {}",
            full.version
        );
        assert!(full.runtime.offsets_from_dwarf && !stripped.runtime.offsets_from_dwarf);
        assert_eq!(
            full.runtime.offsets.as_ref().ok(),
            stripped.runtime.offsets.as_ref().ok(),
            "{what}: the table vs DWARF"
        );
        assert!(full.runtime.offsets.is_ok(), "{what}");
        assert!(
            stripped.runtime.globals.missing().is_empty(),
            "{what}: {:?}",
            stripped.runtime.globals.missing()
        );
    }
}

/// Which functions the compiler inlined where, as the agent reads it from
/// pclntab's inline trees (stripped binaries keep them), against the
/// compiler's own account in the DWARF (`fixtures/inlined`, built with the
/// same release): the maps fixture built plainly and with `-pgo` from its
/// own profile, with and without symbols, on every release; and what the
/// growth probes then count through what (swiss `-pgo` builds: grow and
/// split through rehash; classic ones: hashGrow's kinds not at all when
/// the profile got it copied into a `mapassign`).
#[test]
fn inlined_functions_agree_with_the_dwarf() {
    for version in support::GO_VERSIONS {
        let Some(go) = support::go_tool(version) else {
            assert!(!support::prerequisite(
                false,
                &format!("Go {version} is not installed")
            ));
            return;
        };
        let reader = support::build_fixture("inlined", &go, version, &[]);
        let pgo = support::pgo_flag(&go, version);
        for (kind, args) in [("default", vec![]), ("pgo", vec![pgo.as_str()])] {
            let what = format!("go{version} {kind}");
            let bin = support::build_fixture("maps", &go, &format!("{version}-{kind}"), &args);
            let wanted = plan::wanted_functions();
            let out = Command::new(&reader)
                .arg(&bin)
                .args(&wanted)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let truth: Vec<(String, String)> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| {
                    let (f, holder) = l.split_once('\t').unwrap();
                    (f.to_owned(), holder.to_owned())
                })
                .collect();
            let found = inspect::inspect(&bin, &wanted).unwrap();
            let ours: Vec<(String, String)> = found
                .inlined
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: no inline trees found"))
                .iter()
                .flat_map(|(f, holders)| holders.iter().map(|h| (f.clone(), h.clone())))
                .collect();
            assert_eq!(ours, truth, "{what}: inlined functions (pclntab vs DWARF)");
            // Without symbols and DWARF, the same from pclntab alone.
            let mut stripped_args = args.clone();
            stripped_args.push("-ldflags=-s -w");
            let stripped = support::build_fixture(
                "maps",
                &go,
                &format!("{version}-{kind}-stripped"),
                &stripped_args,
            );
            let found_stripped = inspect::inspect(&stripped, &wanted).unwrap();
            assert_eq!(found_stripped.inlined, found.inlined, "{what} stripped");
            let coverage = plan::plan(&found, 0).unwrap().coverage;
            eprintln!("RESULT {what}: inlined {ours:?}; growth: {coverage}");
            match (kind, found.map_impl) {
                // Whether this profile makes the compiler copy hashGrow
                // into mapassign_fast64 varies from one recording to the
                // next (its own code is a sliver of the samples): both
                // kinds are then not probed, whichever it was.
                ("pgo", MapImpl::Classic) => {
                    let hash_grow = plan::CLASSIC_GROWTH[0].0;
                    let copied = found.inlined_into(hash_grow).next().is_some();
                    let unwatched: &[&str] = if copied {
                        &["double", "same_size"]
                    } else {
                        &[]
                    };
                    assert_eq!(coverage.unwatched, unwatched, "{what}: {coverage}");
                    assert_eq!(coverage.is_plain(), !copied, "{what}: {coverage}");
                }
                ("pgo", MapImpl::Swiss) => {
                    assert!(coverage.unwatched.is_empty(), "{what}: {coverage}");
                    for f in [support::SWISS_GROW_FN, support::SWISS_SPLIT_FN] {
                        assert_eq!(
                            found.inlined_into(f).collect::<Vec<_>>(),
                            [support::SWISS_REHASH_FN],
                            "{what}: {f}"
                        );
                    }
                    assert!(
                        coverage
                            .to_string()
                            .contains("counted through internal/runtime/maps.(*table).rehash"),
                        "{what}: {coverage}"
                    );
                }
                _ => assert!(coverage.is_plain(), "{what}: {coverage}"),
            }
        }
    }
}

/// Go 1.24 and 1.25 can still be built with classic maps; the binary, not
/// the version number, decides.
#[test]
fn noswissmap_builds_are_classic() {
    for version in ["1.24.11", "1.25.5"] {
        let Some(go) = support::go_tool(version) else {
            if !support::prerequisite(false, &format!("Go {version} is not installed")) {
                return;
            }
            unreachable!();
        };
        for (kind, args) in [
            ("noswissmap", &[][..]),
            ("noswissmap-stripped", &["-ldflags=-s -w"][..]),
        ] {
            let bin = support::build_fixture_env(
                "gcload",
                &go,
                &format!("{version}-{kind}"),
                args,
                &[("GOEXPERIMENT", "noswissmap")],
            );
            let found = inspect::inspect(&bin, plan::REQUIRED_FUNCTIONS).unwrap();
            assert_eq!(
                found.version.experiments,
                vec!["noswissmap"],
                "{version} {kind}"
            );
            assert_eq!(found.map_impl, MapImpl::Classic, "{version} {kind}");
            assert_eq!(
                Some(found.offsets),
                inspect::offsets::from_table(&found.version, MapImpl::Classic)
            );
            let data = std::fs::read(&bin).unwrap();
            let s = &found.symbolizer;
            assert!(s.entry_of(&data, "runtime.hashGrow").is_some());
            assert!(
                s.entry_of(&data, "internal/runtime/maps.(*table).grow")
                    .is_none()
            );
        }
    }
}

#[test]
fn bad_input_gets_the_right_error() {
    let dir = std::env::temp_dir().join(format!("gopulse-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let empty = write("empty", b"");
    assert!(matches!(
        inspect::inspect(&empty, &[]),
        Err(InspectError::NotElf)
    ));
    // Random bytes (a fixed xorshift stream, so a failure reproduces), bare
    // and behind an ELF magic.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let random: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let noise = write("random", &random);
    assert!(matches!(
        inspect::inspect(&noise, &[]),
        Err(InspectError::NotElf)
    ));
    let mut elf_noise = b"\x7fELF\x02\x01\x01".to_vec();
    elf_noise.extend_from_slice(&random);
    let elf_noise = write("random-elf", &elf_noise);
    let e = inspect::inspect(&elf_noise, &plan::wanted_functions()).unwrap_err();
    assert!(matches!(e, InspectError::Corrupt { .. }), "{e}");
    let script = write("script.sh", b"#!/bin/sh\necho hi\n");
    assert!(matches!(
        inspect::inspect(&script, &[]),
        Err(InspectError::NotElf)
    ));
    let c_program = std::path::Path::new("/bin/sleep");
    let e = inspect::inspect(c_program, &[]).unwrap_err();
    assert!(matches!(e, InspectError::NotGo), "{e}");
    // Discovery's quick check gives the same answers.
    for (path, want) in [
        (&empty, "NotElf"),
        (&noise, "NotElf"),
        (&script, "NotElf"),
        (&c_program.to_path_buf(), "NotGo"),
    ] {
        let e = inspect::go_release(path).unwrap_err();
        assert!(
            format!("{e:?}").starts_with(want),
            "{}: {e:?}",
            path.display()
        );
    }
    assert!(inspect::go_release(&elf_noise).is_err());
    let missing = dir.join("missing");
    assert!(matches!(
        inspect::inspect(&missing, &[]),
        Err(InspectError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_go_binaries_are_refused() {
    let Some(go) = support::go_tool("1.27.3") else {
        assert!(!support::prerequisite(false, "Go 1.27.3 is not installed"));
        return;
    };
    for (kind, args) in [("default", &[][..]), ("stripped", &["-ldflags=-s -w"][..])] {
        let bin = support::build_fixture("gcload", &go, &format!("1.27.3-{kind}"), args);
        let data = std::fs::read(&bin).unwrap();
        assert!(inspect::inspect_bytes(&data, plan::REQUIRED_FUNCTIONS).is_ok());
        let n = data.len();
        for cut in [
            1,
            63,
            64,
            1024,
            64 << 10,
            n / 4,
            n / 2,
            3 * n / 4,
            n - 4096,
            n - 1,
        ] {
            let Err(e) = inspect::inspect_bytes(&data[..cut], plan::REQUIRED_FUNCTIONS) else {
                panic!("{kind} cut at {cut} of {n} was accepted");
            };
            match e {
                InspectError::Corrupt { .. } => {}
                InspectError::NotElf if cut < 4 => {}
                other => panic!("{kind} cut at {cut}: unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn old_go_is_refused_with_the_range() {
    let Some(go) = support::debian_go() else {
        assert!(!support::prerequisite(
            false,
            "Debian's golang-go (Go 1.19) is not installed"
        ));
        return;
    };
    let bin = support::build_fixture("idle", &go, "debian", &[]);
    let e = inspect::inspect(&bin, plan::REQUIRED_FUNCTIONS).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, InspectError::UnsupportedVersion { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("go1.19") && msg.contains("go1.21 to go1.27"),
        "{msg}"
    );
    let quick = inspect::go_release(&bin).unwrap_err();
    assert_eq!(quick.to_string(), msg, "the quick check refuses it alike");
}
