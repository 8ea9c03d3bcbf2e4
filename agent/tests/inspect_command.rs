//! `gopulse inspect` (issue 24): what the agent makes of an executable,
//! said right for a stripped swiss build, a PIE classic build, a running
//! process, a program that is not Go and Debian's Go 1.19 (refused); and
//! whether the Go runtime's state can be read (issue 19), also for a
//! stripped build of a layout the table does not know.
mod support;

use std::{path::Path, process::Command};

use gopulse_agent::inspect::{self, Global};
use serde_json::{Value, json};

/// `gopulse inspect --json ARGS`: its exit code and report.
fn inspect(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .arg("inspect")
        .arg("--json")
        .args(args)
        .output()
        .expect("running gopulse inspect");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "gopulse inspect {args:?}: no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("an exit code"), report)
}

/// Every probe lies inside the function it names, by the symbol table of a
/// build whose text is the same (`-s -w` drops only symbols and DWARF).
fn probes_inside_functions(report: &Value, go: &Path, symbols_of: &Path) {
    let nm = support::nm(go, symbols_of);
    let probes = report["probes"].as_array().expect("probes");
    assert!(probes.len() >= 6, "{report:#}");
    for p in probes {
        let function = p["function"].as_str().unwrap();
        let address = p["address"].as_u64().unwrap();
        let (entry, size) = nm[function];
        assert!(
            (entry..entry + size).contains(&address),
            "{} at {address:#x}: {function} is {entry:#x}+{size:#x}",
            p["program"]
        );
    }
    for program in ["gc_mark_termination", "stw_start_entry", "stw_start_ret"] {
        assert!(
            probes.iter().any(|p| p["program"] == program),
            "no {program}: {report:#}"
        );
    }
    let single_stepped: Vec<&Value> = probes
        .iter()
        .filter(|p| p["trap"] == "single-stepped")
        .collect();
    assert!(
        single_stepped
            .iter()
            .all(|p| p["program"] == "stw_start_ret"),
        "only the RET probes are single-stepped: {single_stepped:?}"
    );
}

#[test]
fn stripped_swiss_build() {
    let Some(go) = support::go_or_skip("1.27.3") else {
        return;
    };
    let bin = support::build_fixture("maps", &go, "1.27.3-inspect-stripped", &["-ldflags=-s -w"]);
    let twin = support::build_fixture("maps", &go, "1.27.3-inspect-symbols", &[]);
    let (code, r) = inspect(&[bin.to_str().unwrap()]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["watchable"], true);
    assert!(
        r["go"]["version"].as_str().unwrap().starts_with("go1.27.3"),
        "{r:#}"
    );
    let b = &r["binary"];
    assert_eq!(b["maps"], "swiss");
    assert_eq!(b["stripped"], true);
    assert_eq!(b["pie"], false);
    assert_eq!(b["offsets_from"], "table");
    let programs: Vec<&str> = r["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["program"].as_str().unwrap())
        .collect();
    for growth in ["grow_to_table", "grow_table", "split_table"] {
        assert!(programs.contains(&growth), "{programs:?}");
    }
    assert!(!programs.contains(&"grow_classic"), "{programs:?}");
    probes_inside_functions(&r, &go, &twin);
    // The runtime's state: offsets from the table, every global found from
    // the code alone, where the symbols of the same build put it.
    let rt = &r["runtime"];
    assert_eq!(rt["readable"], true, "{r:#}");
    assert_eq!(rt["offsets_from"], "table", "{r:#}");
    assert!(rt["offsets_unknown"].is_null(), "{r:#}");
    assert_eq!(rt["globals_from"], "code", "{r:#}");
    assert_eq!(rt["globals_missing"], json!({}), "{r:#}");
    let symbols = inspect::inspect(&twin, &[]).unwrap().runtime.globals;
    assert!(symbols.from_symbols);
    for g in Global::ALL {
        assert_eq!(
            rt["globals"][g.symbol()].as_u64(),
            Some(symbols.get(g).unwrap()),
            "{g}: {r:#}"
        );
    }
}

#[test]
fn pie_classic_build() {
    let Some(go) = support::go_or_skip("1.23.9") else {
        return;
    };
    let bin = support::build_fixture("maps", &go, "1.23.9-inspect-pie", &["-buildmode=pie"]);
    let (code, r) = inspect(&[bin.to_str().unwrap()]);
    assert_eq!(code, 0, "{r:#}");
    let b = &r["binary"];
    assert_eq!(b["maps"], "classic");
    assert_eq!(b["pie"], true);
    assert_eq!(b["stripped"], false);
    assert_eq!(b["offsets_from"], "dwarf");
    assert_eq!(r["go"]["settings"]["-buildmode"], "pie");
    let rt = &r["runtime"];
    assert_eq!(rt["readable"], true, "{r:#}");
    assert_eq!(rt["offsets_from"], "dwarf", "{r:#}");
    assert_eq!(rt["globals_from"], "symbols", "{r:#}");
    assert_eq!(
        rt["globals"].as_object().unwrap().len(),
        Global::ALL.len(),
        "{r:#}"
    );
    assert!(
        r["probes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["program"] == "grow_classic" && p["group"] == "growth"),
        "{r:#}"
    );
    probes_inside_functions(&r, &go, &bin);
}

#[test]
fn running_process_and_text() {
    let Some(go) = support::go_or_skip("1.27.3") else {
        return;
    };
    let bin = support::build_fixture("idle", &go, "1.27.3", &[]);
    let target = support::Target::spawn(&bin, &[]);
    let pid = target.pid.to_string();
    let (code, r) = inspect(&["--pid", &pid]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["pid"], target.pid);
    assert_eq!(r["path"], bin.to_str().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .args(["inspect", "--pid", &pid])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with(&format!("pid {pid}: ")), "{text}");
    assert!(text.contains("verdict       watch"), "{text}");
    assert!(text.contains("stw_start_ret"), "{text}");
    assert!(
        text.contains(
            "runtime       read from the process's memory: offsets from the binary's DWARF, \
             7 of 7 globals found from the symbol table"
        ),
        "{text}"
    );
    target.finish();
}

/// A stripped build of a layout the table does not know
/// (`GOEXPERIMENT=staticlockranking`): watched, but its runtime's state is
/// not read, and the report says why; with its DWARF it is.
#[test]
fn runtime_state_of_an_unknown_layout() {
    let Some(go) = support::go_or_skip("1.27.3") else {
        return;
    };
    let env = [("GOEXPERIMENT", "staticlockranking")];
    let build = |kind: &str, args: &[&str]| {
        support::build_fixture_env(
            "maps",
            &go,
            &format!("1.27.3-inspect-staticlockranking-{kind}"),
            args,
            &env,
        )
    };
    let stripped = build("stripped", &["-ldflags=-s -w"]);
    let (code, r) = inspect(&[stripped.to_str().unwrap()]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["watchable"], true, "{r:#}");
    let rt = &r["runtime"];
    assert_eq!(rt["readable"], false, "{r:#}");
    assert!(rt["offsets_from"].is_null(), "{r:#}");
    let why = rt["offsets_unknown"].as_str().unwrap();
    assert!(
        why.contains("no DWARF") && why.contains("staticlockranking"),
        "{why}"
    );
    assert!(rt["globals"].as_object().unwrap().is_empty(), "{r:#}");
    assert_eq!(
        rt["globals_missing"].as_object().unwrap().len(),
        Global::ALL.len(),
        "{r:#}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .arg("inspect")
        .arg(&stripped)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("runtime       not read: no DWARF")
            && text.contains("its go_* metrics are absent"),
        "{text}"
    );

    let full = build("default", &[]);
    let (_, r) = inspect(&[full.to_str().unwrap()]);
    assert_eq!(r["runtime"]["readable"], true, "{r:#}");
    assert_eq!(r["runtime"]["offsets_from"], "dwarf", "{r:#}");
}

#[test]
fn not_go_and_unsupported_are_refused_with_the_reason() {
    let (code, r) = inspect(&["/bin/true"]);
    assert_eq!(code, 1);
    assert_eq!(r["watchable"], false);
    assert!(r["go"].is_null(), "{r:#}");
    assert!(
        r["refused"].as_str().unwrap().contains("not a Go program"),
        "{r:#}"
    );
    let Some(old) = support::debian_go() else {
        assert!(!support::prerequisite(
            false,
            "Debian's golang-go (Go 1.19) is not installed"
        ));
        return;
    };
    let old = std::fs::canonicalize(old).unwrap();
    let (code, r) = inspect(&[old.to_str().unwrap()]);
    assert_eq!(code, 1, "{r:#}");
    assert!(
        r["go"]["version"].as_str().unwrap().starts_with("go1.19"),
        "{r:#}"
    );
    let why = r["refused"].as_str().unwrap();
    assert!(
        why.contains("go1.19") && why.contains("not supported") && why.contains("go1.21 to go1.27"),
        "{why}"
    );
    assert!(
        why.contains("build the program with a supported Go release"),
        "{why}"
    );
    assert!(r["probes"].as_array().unwrap().is_empty());
    // Bad input: one clear line, exit 1.
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .args(["inspect", "/no/such/file"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("/no/such/file") && err.lines().count() == 1,
        "{err}"
    );
}
