//! Starting to watch one process: read its executable, plan the probes,
//! hand it to the attach stage, then to the collector.
use anyhow::Context as _;

use crate::{
    collector::NewProc,
    inspect,
    metrics::ProcLabels,
    plan::{self, Plumbing},
    probes::{ExeKey, Target},
    procfs,
    server::App,
    stw,
};

/// Starts watching `pid`; the error says why it cannot be watched.
pub fn watch(app: &App, pid: u32, plumbing: &Plumbing) -> anyhow::Result<()> {
    let io = |e: std::io::Error| anyhow::anyhow!(procfs::describe(&e));
    let start_time = procfs::start_time(pid).map_err(io)?;
    let exe = procfs::exe_name(pid).map_err(io)?;
    let exe_key = ExeKey::of(pid).map_err(io)?;
    let bin = inspect::inspect(&procfs::exe_path(pid), &plan::wanted_functions())
        .with_context(|| exe.clone())?;
    let load_bias = procfs::exe_mapping_start(pid)
        .map_err(io)?
        .wrapping_sub(bin.image_base);
    let plan = plan::plan(&bin, load_bias).with_context(|| format!("{exe} ({})", bin.version))?;
    let pages = plumbing.pages(&bin.symbolizer);
    let labels = ProcLabels {
        pid: pid.to_string(),
        exe,
        go_version: bin.version.short(),
    };
    let probes = app.with_probes(|p| {
        p.attach(Target {
            pid,
            labels: labels.clone(),
            exe: exe_key,
            plan: &plan,
            pages: &pages,
        })
    })?;
    tracing::info!(
        pid,
        exe = %labels.exe,
        go_version = %bin.version,
        build_mode = bin.build.settings.get("-buildmode").map_or("exe", String::as_str),
        cgo = bin.build.settings.get("CGO_ENABLED").map_or("?", String::as_str),
        pie = bin.pie,
        stripped = bin.stripped,
        maps = ?bin.map_impl,
        probes,
        plumbing_pages = pages.len(),
        "watching process"
    );
    app.with_collector(|c| {
        c.add(NewProc {
            pid,
            labels,
            reasons: stw::table_for(&bin.version),
            start_time,
            symbolizer: bin.symbolizer,
            map_offsets: bin.offsets.map,
        })
    });
    Ok(())
}
