//! `cargo xtask codegen offsets`: regenerates `inspect/src/offsets_table.rs`,
//! the struct field offsets per Go release, from the DWARF of the `gcload`
//! fixture built with every toolchain in the cache: the probes' offsets per
//! map implementation, and the runtime state's ([`gopulse_inspect::layout`])
//! per layout (a release, or a release built with an experiment that moves
//! fields). Builds with experiments said to move nothing are checked to.
use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use gopulse_inspect::{
    GoVersion, MapImpl, MapOffsets, Offsets, RuntimeOffsets,
    layout::{HARMLESS_EXPERIMENTS, LAYOUT_EXPERIMENTS},
    offsets,
};

use crate::project::{
    GO_VERSIONS, check, describe, go_binary, go_build, run, target_dir, workspace_root,
};

const TABLE_PATH: &str = "inspect/src/offsets_table.rs";
const FIXTURE: &str = "agent/tests/fixtures/gcload";
/// Releases that can still build classic maps with `GOEXPERIMENT=noswissmap`.
const NOSWISSMAP_MINORS: &[u32] = &[24, 25];

pub fn offsets(cache: &Path, check_only: bool) -> Result<()> {
    let mut rows = Vec::new();
    let mut runtime_rows = Vec::new();
    for version in GO_VERSIONS {
        let go = go_binary(cache, version);
        if !go.exists() {
            bail!(
                "Go {version} is not installed at {}; run `cargo xtask setup`",
                go.display()
            );
        }
        let minor = minor_of(version)?;
        let mut builds = vec![(None, default_impl(minor))];
        if NOSWISSMAP_MINORS.contains(&minor) {
            builds.push((Some("noswissmap"), MapImpl::Classic));
        }
        // Builds for the runtime layout only: their own rows, or checked
        // against the default's.
        for &(m, x) in LAYOUT_EXPERIMENTS.iter().chain(HARMLESS_EXPERIMENTS) {
            if m == minor && !builds.iter().any(|(e, _)| *e == Some(x)) {
                builds.push((Some(x), default_impl(minor)));
            }
        }
        let mut default_runtime = None;
        for (experiment, imp) in builds {
            let bin = build(cache, &go, version, experiment)?;
            let data = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
            // The build must say what we asked for, or the row is mislabelled.
            let found = gopulse_inspect::inspect_bytes(&data, &[])
                .with_context(|| format!("inspecting {}", bin.display()))?;
            let has_experiment =
                experiment.is_none_or(|x| found.version.experiments.iter().any(|e| e == x));
            if found.version.minor != minor || MapImpl::of(&found.version) != imp || !has_experiment
            {
                bail!(
                    "{} reports {} ({:?} maps), expected Go {version} with {imp:?} maps{}",
                    bin.display(),
                    found.version,
                    MapImpl::of(&found.version),
                    experiment.map_or(String::new(), |x| format!(" and X:{x}"))
                );
            }
            let runtime = offsets::runtime_from_dwarf(&data)
                .with_context(|| format!("reading the runtime's DWARF of {}", bin.display()))?
                .with_context(|| format!("{} has no DWARF", bin.display()))?;
            runtime
                .check()
                .map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
            match experiment {
                None => {
                    default_runtime = Some(runtime);
                    runtime_rows.push((minor, None, runtime, found.version.clone()));
                }
                Some(x) if LAYOUT_EXPERIMENTS.contains(&(minor, x)) => {
                    runtime_rows.push((minor, Some(x), runtime, found.version.clone()));
                }
                Some(x) => {
                    if default_runtime != Some(runtime) {
                        bail!(
                            "Go {version} built with GOEXPERIMENT={x} moves runtime fields: give it \
                             a row of its own (LAYOUT_EXPERIMENTS in inspect/src/layout.rs), not \
                             HARMLESS_EXPERIMENTS"
                        );
                    }
                }
            }
            if experiment.is_some() && imp == default_impl(minor) {
                continue; // no map table row of its own
            }
            let offs = offsets::from_dwarf(&data, imp)
                .with_context(|| format!("reading DWARF of {}", bin.display()))?
                .with_context(|| format!("{} has no DWARF", bin.display()))?;
            rows.push(Row {
                version: found.version,
                imp,
                offsets: offs,
            });
        }
    }
    let mut source = render(&rows);
    render_runtime(&mut source, &runtime_rows);
    let text = rustfmt(&source)?;
    let path = workspace_root().join(TABLE_PATH);
    if check_only {
        let current = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if current != text {
            bail!("{TABLE_PATH} is stale: run `cargo xtask codegen offsets`");
        }
        println!("codegen: {TABLE_PATH} is up to date");
    } else {
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("codegen: wrote {TABLE_PATH} ({} rows)", rows.len());
    }
    Ok(())
}

struct Row {
    version: GoVersion,
    imp: MapImpl,
    offsets: Offsets,
}

fn minor_of(version: &str) -> Result<u32> {
    GoVersion::parse(&format!("go{version}"))
        .map(|v| v.minor)
        .with_context(|| format!("bad Go version {version}"))
}

/// Classic up to 1.23, Swiss from 1.24 on.
fn default_impl(minor: u32) -> MapImpl {
    if minor < 24 {
        MapImpl::Classic
    } else {
        MapImpl::Swiss
    }
}

/// Builds the fixture into `target/codegen/`, as the tests build fixtures.
fn build(cache: &Path, go: &Path, version: &str, experiment: Option<&str>) -> Result<PathBuf> {
    let out_dir = target_dir().join("codegen");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let name = match experiment {
        Some(x) => format!("gcload-{version}-{x}"),
        None => format!("gcload-{version}"),
    };
    let out = out_dir.join(name);
    let mut cmd = go_build(cache, go, &workspace_root().join(FIXTURE), &out);
    cmd.arg(".");
    match experiment {
        Some(x) => cmd.env("GOEXPERIMENT", x),
        None => cmd.env_remove("GOEXPERIMENT"),
    };
    let env = experiment.map_or(String::new(), |x| format!("GOEXPERIMENT={x} "));
    println!("codegen: {env}{}", describe(&cmd));
    run(&mut cmd)?;
    Ok(out)
}

/// The table as Rust source (then normalized by rustfmt).
fn render(rows: &[Row]) -> String {
    let mut s = String::from(
        "// generated by `cargo xtask codegen offsets`; do not edit.\n\
         //! Struct field offsets per Go release: the probes' per map\n\
         //! implementation (`TABLE`), the runtime state's per layout\n\
         //! (`RUNTIME_TABLE`), read from the DWARF of\n\
         //! `agent/tests/fixtures/gcload` built with each toolchain below\n\
         //! (linux/amd64).\n\n\
         use super::{MapImpl, MapOffsets, Offsets, TypeOffsets};\n\
         use crate::layout::{FreeGs::{Counted, Split}, RuntimeOffsets};\n\n\
         pub(crate) const TABLE: &[(u32, MapImpl, Offsets)] = &[\n",
    );
    for row in rows {
        let o = &row.offsets;
        let map = match o.map {
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
            } => format!(
                "MapOffsets::Classic {{ count: {count}, flags: {flags}, b: {b}, \
                 noverflow: {noverflow}, hash0: {hash0}, buckets: {buckets}, oldbuckets: {oldbuckets}, \
                 nevacuate: {nevacuate}, extra: {extra}, size: {size}, \
                 maptype_bucket_size: {maptype_bucket_size} }}"
            ),
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
            } => format!(
                "MapOffsets::Swiss {{ map_used: {map_used}, map_seed: {map_seed}, map_dir_ptr: {map_dir_ptr}, \
                 map_dir_len: {map_dir_len}, map_global_depth: {map_global_depth}, \
                 map_global_shift: {map_global_shift}, map_size: {map_size}, \
                 table_used: {table_used}, table_capacity: {table_capacity}, \
                 table_growth_left: {table_growth_left}, table_local_depth: {table_local_depth}, \
                 table_index: {table_index}, table_groups_data: {table_groups_data}, \
                 table_groups_length_mask: {table_groups_length_mask}, table_size: {table_size} }}"
            ),
        };
        let types = match o.types {
            Some(t) => format!(
                "Some(TypeOffsets {{ size: {}, ptr_bytes: {} }})",
                t.size, t.ptr_bytes
            ),
            None => "None".to_owned(),
        };
        let _ = write!(
            s,
            "    // {}\n    ({}, MapImpl::{:?}, Offsets {{ map: {map}, g_goid: {}, g_m: {}, m_curg: {}, types: {types} }}),\n",
            row.version, row.version.minor, row.imp, o.g_goid, o.g_m, o.m_curg
        );
    }
    s.push_str("];\n");
    s
}

/// Appends the runtime layouts' table: each row's offsets as their `Debug`
/// form, which is a Rust struct expression.
fn render_runtime(s: &mut String, rows: &[(u32, Option<&str>, RuntimeOffsets, GoVersion)]) {
    s.push_str(
        "\n/// The runtime state's offsets per release and layout experiment.\n\
         pub(crate) const RUNTIME_TABLE: &[(u32, Option<&str>, RuntimeOffsets)] = &[\n",
    );
    for (minor, experiment, offsets, version) in rows {
        let _ = write!(
            s,
            "    // {version}\n    ({minor}, {experiment:?}, {offsets:?}),\n"
        );
    }
    s.push_str("];\n");
}

/// `rustfmt` on a string, so the file passes `cargo fmt --check` as written.
fn rustfmt(source: &str) -> Result<String> {
    let mut cmd = Command::new("rustfmt");
    cmd.current_dir(workspace_root())
        .args(["--edition", "2024", "--emit", "stdout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {}", describe(&cmd)))?;
    child
        .stdin
        .take()
        .context("rustfmt stdin")?
        .write_all(source.as_bytes())
        .context("writing to rustfmt")?;
    let out = child.wait_with_output().context("waiting for rustfmt")?;
    check(&cmd, out.status)?;
    String::from_utf8(out.stdout).context("rustfmt printed non-UTF-8")
}
