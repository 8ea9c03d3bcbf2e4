//! `gopulse inspect`: what gopulse makes of one executable, without BPF:
//! the Go release and build, where the struct offsets come from, every
//! probe site it would attach and what each measures, whether the Go
//! runtime's own state can be read from its processes, and, for a program
//! it would refuse, why.
use std::{collections::BTreeMap, fmt::Write as _, fs::File, path::Path};

use serde::Serialize;

use crate::{
    discover::exe::ExeKey,
    exe_map::Mapped,
    inspect::{self, Global, GoBinary, MapImpl},
    plan::{self, Group, PROGRAM_TABLE, Plan, Plumbing, ProbeSite, Trap},
    procfs,
};

/// Everything `gopulse inspect` says of one executable.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The file read (for `--pid`, the process's executable).
    pub path: String,
    pub pid: Option<u32>,
    /// Whether the agent would watch processes running it.
    pub watchable: bool,
    /// Why not, when it would not.
    pub refused: Option<String>,
    /// Build info, when the file has Go's.
    pub go: Option<GoFacts>,
    /// What reading it found, when gopulse supports its release.
    pub binary: Option<BinaryFacts>,
    /// Whether the Go runtime's state (the `go_*` metrics) can be read from
    /// its processes, when gopulse supports its release.
    pub runtime: Option<RuntimeFacts>,
    /// Where each probe goes, when it is watchable.
    pub probes: Vec<Probe>,
    /// Growth kinds no probe counts, and how the others are counted when
    /// not each through its own function (profile-guided builds).
    pub growth_unwatched: Vec<String>,
    pub coverage_notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct GoFacts {
    pub version: String,
    pub main_module: Option<String>,
    /// `-buildmode`, `CGO_ENABLED`, `GOEXPERIMENT`, `-pgo`, ... as recorded.
    pub settings: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub struct BinaryFacts {
    /// `classic` or `swiss`.
    pub maps: &'static str,
    pub pie: bool,
    pub stripped: bool,
    pub cgo: bool,
    /// `dwarf` (the binary's own) or `table` (generated per release).
    pub offsets_from: &'static str,
    pub text_start: u64,
    pub functions: usize,
    /// Pages of text holding plumbing the site walk steps over.
    pub plumbing_pages: usize,
}

/// What of the Go runtime's state the agent can read from a process's
/// memory (see README, "The Go runtime's own metrics").
#[derive(Debug, Serialize)]
pub struct RuntimeFacts {
    /// Every `go_*` runtime metric can be read: the struct offsets are
    /// known and every global was found.
    pub readable: bool,
    /// `dwarf` (the binary's own) or `table` (generated per release);
    /// `null` when the offsets are unknown.
    pub offsets_from: Option<&'static str>,
    /// Why the offsets are unknown: then none of the metrics is read.
    pub offsets_unknown: Option<String>,
    /// `symbols` (the symbol table) or `code` (a stripped binary: found
    /// from the machine code of runtime functions).
    pub globals_from: &'static str,
    /// The globals found: symbol → link-time address.
    pub globals: BTreeMap<&'static str, u64>,
    /// The globals not found, with why: the metrics that need one are
    /// absent.
    pub globals_missing: BTreeMap<&'static str, String>,
}

impl RuntimeFacts {
    fn of(bin: &GoBinary) -> Self {
        let rt = &bin.runtime;
        let mut globals = BTreeMap::new();
        let mut globals_missing = BTreeMap::new();
        for g in Global::ALL {
            match rt.globals.get(g) {
                Ok(at) => {
                    globals.insert(g.symbol(), at);
                }
                Err(e) => {
                    globals_missing.insert(g.symbol(), e.to_string());
                }
            }
        }
        Self {
            readable: rt.offsets.is_ok() && globals_missing.is_empty(),
            offsets_from: rt.offsets.as_ref().ok().map(|_| {
                if rt.offsets_from_dwarf {
                    "dwarf"
                } else {
                    "table"
                }
            }),
            offsets_unknown: rt.offsets.as_ref().err().cloned(),
            globals_from: if rt.globals.from_symbols {
                "symbols"
            } else {
                "code"
            },
            globals,
            globals_missing,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Probe {
    /// The BPF program (the `probe` label of its hits).
    pub program: &'static str,
    pub function: &'static str,
    /// Link-time address of the instruction probed.
    pub address: u64,
    pub file_offset: u64,
    /// `emulated` (a jump the kernel emulates) or `single-stepped` (a RET).
    pub trap: &'static str,
    /// `gc` (always attached), `growth` (unless the budget cuts them) or
    /// `access` (as `--map-assign-probes` says).
    pub group: &'static str,
    pub measures: &'static str,
}

/// Reads `path` (or, with `pid`, that process's executable) and says what
/// gopulse makes of it. An unreadable file is an error; a refused program
/// is a report.
pub fn report(path: Option<&Path>, pid: Option<u32>) -> anyhow::Result<Report> {
    let io = |e: std::io::Error| anyhow::anyhow!(procfs::describe(&e));
    let (file, shown) = match (path, pid) {
        (_, Some(pid)) => {
            let (file, _, _) = ExeKey::open(pid).map_err(io)?;
            let name = std::fs::read_link(procfs::exe_path(pid))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| procfs::exe_path(pid).display().to_string());
            (file, name)
        }
        (Some(p), None) => (
            File::open(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            p.display().to_string(),
        ),
        (None, None) => anyhow::bail!("give an executable or --pid"),
    };
    let mapped = Mapped::new(&file).map_err(io)?;
    let data = mapped.bytes();
    let mut report = Report {
        path: shown,
        pid,
        watchable: false,
        refused: None,
        go: None,
        binary: None,
        runtime: None,
        probes: Vec::new(),
        growth_unwatched: Vec::new(),
        coverage_notes: Vec::new(),
    };
    // What the build says, whether or not the release is supported.
    if let Ok(info) = inspect::build_info(data) {
        report.go = Some(GoFacts {
            version: info.version,
            main_module: info.path,
            settings: info.settings,
        });
    }
    let planned = inspect::inspect_bytes(data, &plan::wanted_functions()).map(|bin| {
        let plan = plan::plan(&bin, 0);
        (bin, plan)
    });
    let (bin, plan) = match planned {
        Ok(found) => found,
        Err(e) => {
            report.refused = Some(format!("{e:#}"));
            return torn(&mapped, report);
        }
    };
    report.binary = Some(BinaryFacts {
        maps: match bin.map_impl {
            MapImpl::Classic => "classic",
            MapImpl::Swiss => "swiss",
        },
        pie: bin.pie,
        stripped: bin.stripped,
        cgo: bin.build.settings.get("CGO_ENABLED").map(String::as_str) == Some("1"),
        offsets_from: if bin.offsets_from_dwarf {
            "dwarf"
        } else {
            "table"
        },
        text_start: bin.text_start,
        functions: bin.symbolizer.len(),
        plumbing_pages: Plumbing::default().pages(&bin.symbolizer, data).len(),
    });
    report.runtime = Some(RuntimeFacts::of(&bin));
    match plan {
        Ok(plan) => {
            report.watchable = true;
            report.probes = probes(&bin, &plan);
            report.growth_unwatched = plan
                .coverage
                .unwatched
                .iter()
                .map(|k| (*k).to_owned())
                .collect();
            report.coverage_notes = plan.coverage.notes.clone();
        }
        Err(e) => report.refused = Some(format!("{e:#}")),
    }
    torn(&mapped, report)
}

/// The report, unless the file was truncated while read (then nothing it
/// says can be trusted).
fn torn(mapped: &Mapped<'_>, report: Report) -> anyhow::Result<Report> {
    if mapped.torn() {
        anyhow::bail!("{} was truncated while it was read", report.path);
    }
    Ok(report)
}

fn probes(bin: &GoBinary, plan: &Plan) -> Vec<Probe> {
    let one = |site: &ProbeSite| {
        let program = &PROGRAM_TABLE[site.program];
        // The link-time address: the function's, moved as far as the
        // file offset is past its entry.
        let address = bin.functions.get(site.function).map_or(0, |f| {
            f.address
                .wrapping_add(site.file_offset.wrapping_sub(f.file_offset))
        });
        Probe {
            program: program.name,
            function: site.function,
            address,
            file_offset: site.file_offset,
            trap: match program.trap {
                Trap::Emulated => "emulated",
                Trap::SingleStep => "single-stepped",
            },
            group: match program.group {
                Group::Core => "gc",
                Group::Growth => "growth",
                Group::Access => "access",
                Group::Slice => "slice",
            },
            measures: program.what,
        }
    };
    plan.core
        .iter()
        .chain(&plan.growth)
        .chain(&plan.access)
        .chain(&plan.slice)
        .map(one)
        .collect()
}

impl Report {
    /// The report as an operator reads it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let target = match self.pid {
            Some(pid) => format!("pid {pid}: {}", self.path),
            None => self.path.clone(),
        };
        let _ = writeln!(out, "{target}");
        let verdict = match (&self.refused, self.growth_unwatched.is_empty()) {
            (Some(why), _) => format!("cannot watch: {why}"),
            (None, true) => "watch: GC, stop-the-world and every map growth kind".to_owned(),
            (None, false) => format!(
                "watch, but {} growths are not counted (see coverage)",
                self.growth_unwatched.join(" and ")
            ),
        };
        let _ = writeln!(out, "  {:<14}{verdict}", "verdict");
        if let Some(go) = &self.go {
            let _ = writeln!(out, "  {:<14}{}", "go", go.version);
            if let Some(m) = &go.main_module {
                let _ = writeln!(out, "  {:<14}{m}", "main module");
            }
            let settings: Vec<String> = ["-buildmode", "CGO_ENABLED", "GOEXPERIMENT", "-pgo"]
                .iter()
                .filter_map(|k| go.settings.get(*k).map(|v| format!("{k}={v}")))
                .collect();
            if !settings.is_empty() {
                let _ = writeln!(out, "  {:<14}{}", "build", settings.join(" "));
            }
        }
        if let Some(b) = &self.binary {
            let yes = |x: bool| if x { "yes" } else { "no" };
            let _ = writeln!(
                out,
                "  {:<14}{} maps; PIE {}, stripped {}, cgo {}",
                "binary",
                b.maps,
                yes(b.pie),
                yes(b.stripped),
                yes(b.cgo)
            );
            let from = if b.offsets_from == "dwarf" {
                "the binary's DWARF"
            } else {
                "the table generated for its release (no DWARF)"
            };
            let _ = writeln!(out, "  {:<14}from {from}", "offsets");
            let _ = writeln!(
                out,
                "  {:<14}{} functions from {:#x}; plumbing on {} pages of text",
                "text", b.functions, b.text_start, b.plumbing_pages
            );
        }
        if let Some(rt) = &self.runtime {
            for line in rt.text() {
                let _ = writeln!(out, "  {:<14}{line}", "runtime");
            }
        }
        for note in &self.coverage_notes {
            let _ = writeln!(out, "  {:<14}{note}", "coverage");
        }
        if !self.probes.is_empty() {
            let _ = writeln!(
                out,
                "  probes        (program, function, address, file offset, trap, group: what a hit measures)"
            );
            for p in &self.probes {
                let _ = writeln!(
                    out,
                    "    {:<20} {:<48} {:#10x} {:#10x} {:<14} {:<6} {}",
                    p.program, p.function, p.address, p.file_offset, p.trap, p.group, p.measures
                );
            }
        }
        out
    }
}

impl RuntimeFacts {
    /// What the text report says of it, a line each.
    fn text(&self) -> Vec<String> {
        let Some(from) = self.offsets_from else {
            return vec![format!(
                "not read: {}; its go_* metrics are absent",
                self.offsets_unknown.as_deref().unwrap_or("offsets unknown")
            )];
        };
        let from = if from == "dwarf" {
            "the binary's DWARF"
        } else {
            "the table for its release"
        };
        let found = if self.globals_from == "symbols" {
            "the symbol table"
        } else {
            "the machine code (no symbols)"
        };
        let mut lines = vec![format!(
            "{}: offsets from {from}, {} of {} globals found from {found}",
            if self.readable {
                "read from the process's memory"
            } else {
                "partly read"
            },
            self.globals.len(),
            self.globals.len() + self.globals_missing.len()
        )];
        for (g, why) in &self.globals_missing {
            lines.push(format!(
                "{g} not found ({why}): the metrics that need it are absent"
            ));
        }
        lines
    }
}
