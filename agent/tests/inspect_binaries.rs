//! Binary inspection on real Go builds of every supported release.
mod support;

use std::process::Command;

use gopulse_agent::{
    bpf,
    inspect::{self, InspectError},
};

#[test]
fn build_info_and_probe_sites_of_every_release() {
    for version in support::GO_VERSIONS {
        let Some(go) = support::go_tool(version) else {
            if !support::prerequisite(false, &format!("Go {version} is not installed")) {
                return;
            }
            unreachable!();
        };
        let bin = support::build_fixture("gcload", &go, version, &[]);
        let found = inspect::inspect(&bin, bpf::REQUIRED_FUNCTIONS).unwrap();
        assert_eq!(found.version.raw, format!("go{version}"));
        assert!(found.version.is_supported());
        assert_eq!(
            found.build.path.as_deref(),
            Some("example.com/gopulse/gcload")
        );

        // Ground truth from the toolchain itself.
        let out = Command::new(&go)
            .args(["version", "-m"])
            .arg(&bin)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        for (k, v) in &found.build.settings {
            assert!(
                text.contains(&format!("build\t{k}={v}")),
                "{version}: {k}={v} not in\n{text}"
            );
        }
        let nm = Command::new(&go)
            .args(["tool", "nm", "-size"])
            .arg(&bin)
            .output()
            .unwrap();
        let nm = String::from_utf8(nm.stdout).unwrap();
        for name in bpf::REQUIRED_FUNCTIONS {
            let f = found.function(name).unwrap();
            let line = nm
                .lines()
                .find(|l| l.ends_with(&format!(" T {name}")))
                .unwrap_or_else(|| panic!("{version}: nm has no {name}"));
            let mut cols = line.split_whitespace();
            let addr = u64::from_str_radix(cols.next().unwrap(), 16).unwrap();
            let size: u64 = cols.next().unwrap().parse().unwrap();
            assert_eq!((f.address, f.size), (addr, size), "{version} {name}");
            // Non-PIE amd64: text is mapped at 0x400000 from file offset 0.
            assert_eq!(f.file_offset, addr - 0x400000, "{version} {name}");
            assert!(!f.ret_offsets.is_empty());
            for &ret in &f.ret_offsets {
                assert!(ret > f.file_offset && ret < f.file_offset + f.size);
            }
        }
        let (sites, config) = bpf::plan(&found).unwrap();
        let expected_args = u8::from(found.version.at_least(22));
        assert_eq!(config.start_args, expected_args, "{version}");
        assert!(sites.len() >= 3);
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
    let script = write("script.sh", b"#!/bin/sh\necho hi\n");
    assert!(matches!(
        inspect::inspect(&script, &[]),
        Err(InspectError::NotElf)
    ));
    let c_program = std::path::Path::new("/bin/sleep");
    let e = inspect::inspect(c_program, &[]).unwrap_err();
    assert!(matches!(e, InspectError::NotGo), "{e}");
    let missing = dir.join("missing");
    assert!(matches!(
        inspect::inspect(&missing, &[]),
        Err(InspectError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
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
    let e = inspect::inspect(&bin, bpf::REQUIRED_FUNCTIONS).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, InspectError::UnsupportedVersion { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("go1.19") && msg.contains("go1.21 to go1.27"),
        "{msg}"
    );
}
