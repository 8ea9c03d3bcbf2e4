//! Where the probes go in a Go executable, and what the kernel must know
//! of it: the per-process config and the executable's plumbing.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use gopulse_common::{
    MAP_HEADER_BYTES, MAP_IMPL_CLASSIC, MAP_IMPL_SWISS, PLUMBING_BLOCK_SHIFT, PROG_GC_MARK_TERM,
    PROG_GROW_CLASSIC, PROG_GROW_SLICE, PROG_GROW_TABLE, PROG_GROW_TO_TABLE, PROG_MAP_ASSIGN,
    PROG_MAP_DELETE, PROG_MAP_EVACUATE, PROG_PRUNE_BODY, PROG_PRUNE_TABLE, PROG_REHASH_TABLE,
    PROG_SPLIT_TABLE, PROG_STW_START_ENTRY, PROG_STW_START_RET, PROG_STW_STOP, PROGRAMS, PageBits,
    PendingStw, ProcConfig, START_ARGS_NONE, START_ARGS_WORLDSTOP, STW_FLAG_IDLE, StwState,
    TABLE_HEADER_BYTES, TYPE_HEADER_BYTES,
};

use crate::inspect::{Function, GoBinary, MapImpl, MapOffsets, Symbolizer, symname};

pub const STOP_FN: &str = "runtime.stopTheWorldWithSema";
pub const START_FN: &str = "runtime.startTheWorldWithSema";
pub const MARK_TERM_FN: &str = "runtime.gcMarkTermination";
/// Functions the probes need in every supported release.
pub const REQUIRED_FUNCTIONS: &[&str] = &[STOP_FN, START_FN, MARK_TERM_FN];

/// Map growth: the runtime function and the program that watches it.
/// Swiss `(*Map).growToSmall` is not one: it allocates the first group of a
/// map made without a size hint, on its first insert (classic maps do the
/// same inline), and it runs once per new map, so it is not probed.
pub const CLASSIC_GROWTH: &[(&str, usize)] = &[("runtime.hashGrow", PROG_GROW_CLASSIC)];
pub const SWISS_GROWTH: &[(&str, usize)] = &[
    (
        "internal/runtime/maps.(*Map).growToTable",
        PROG_GROW_TO_TABLE,
    ),
    ("internal/runtime/maps.(*table).grow", PROG_GROW_TABLE),
    ("internal/runtime/maps.(*table).split", PROG_SPLIT_TABLE),
];
/// Go 1.25+ prunes tombstones before growing a table.
pub const SWISS_PRUNE_FN: &str = "internal/runtime/maps.(*table).pruneTombstones";
/// The only caller of `grow` and `split` (Go 1.24-1.27), called only when a
/// table must grow: probed instead of them where they have no copy of their
/// own (profile-guided builds inline them into it).
pub const SWISS_REHASH_FN: &str = "internal/runtime/maps.(*table).rehash";

/// Slice growth: every append past a slice's capacity, and `reflect`'s
/// (`Value.Grow`, `Append`), goes through it; Go 1.26+'s `growsliceBuf`
/// (a non-escaping slice's stack buffer) and `growsliceNoAlias` call it
/// when they allocate. Hot: attached as `--slice-probes` says.
pub const SLICE_GROWTH_FN: &str = "runtime.growslice";

/// Map assignment and deletion: hot, attached only as `--map-assign-probes`
/// says. Any of them may be absent (the linker keeps only what is used).
pub const ASSIGN_FUNCTIONS: &[&str] = &[
    "runtime.mapassign",
    "runtime.mapassign_fast32",
    "runtime.mapassign_fast64",
    "runtime.mapassign_fast64ptr",
    "runtime.mapassign_faststr",
];
pub const DELETE_FUNCTIONS: &[&str] = &[
    "runtime.mapdelete",
    "runtime.mapdelete_fast32",
    "runtime.mapdelete_fast64",
    "runtime.mapdelete_faststr",
];

/// Classic maps' incremental evacuation (absent from swiss builds).
pub const EVACUATE_FUNCTIONS: &[&str] = &[
    "runtime.evacuate",
    "runtime.evacuate_fast32",
    "runtime.evacuate_fast64",
    "runtime.evacuate_faststr",
];

/// Every function any release may need, for [`crate::inspect::inspect`]:
/// the lists above, in one.
pub fn wanted_functions() -> Vec<&'static str> {
    let mut all = REQUIRED_FUNCTIONS.to_vec();
    for list in [CLASSIC_GROWTH, SWISS_GROWTH] {
        all.extend(list.iter().map(|(f, _)| *f));
    }
    all.extend([SWISS_PRUNE_FN, SWISS_REHASH_FN, SLICE_GROWTH_FN]);
    all.extend_from_slice(ASSIGN_FUNCTIONS);
    all.extend_from_slice(DELETE_FUNCTIONS);
    all.extend_from_slice(EVACUATE_FUNCTIONS);
    all
}

/// How the kernel handles the instruction a probe sits on, which sets the
/// price of a hit before our program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap {
    /// The `JBE` of a stack check: emulated.
    Emulated,
    /// A `RET`: single-stepped out of line.
    SingleStep,
}

/// The group a program's probes are attached and cut with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// GC and stop-the-world: always attached.
    Core,
    /// Map growth: attached unless the governor cuts them.
    Growth,
    /// Map assignment, deletion and evacuation: as `--map-assign-probes`.
    Access,
    /// Slice growth: as `--slice-probes`.
    Slice,
}

/// One BPF program of the eBPF object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    /// Its name in the object, and the `probe` label of its hits.
    pub name: &'static str,
    pub trap: Trap,
    pub group: Group,
    /// What a hit measures (`gopulse inspect` says it).
    pub what: &'static str,
}

const fn prog(name: &'static str, trap: Trap, group: Group, what: &'static str) -> Program {
    Program {
        name,
        trap,
        group,
        what,
    }
}

/// Every program, by its `PROG_*` index.
pub const PROGRAM_TABLE: [Program; PROGRAMS] = {
    use Group::*;
    use Trap::*;
    let mut t = [prog("", Emulated, Core, ""); PROGRAMS];
    t[PROG_STW_STOP] = prog(
        "stw_stop",
        Emulated,
        Core,
        "a stop of the world begins, and why (Go 1.21)",
    );
    t[PROG_STW_START_ENTRY] = prog(
        "stw_start_entry",
        Emulated,
        Core,
        "the world restarts: the stop's time and reason, as Go passes them (1.22+)",
    );
    t[PROG_STW_START_RET] = prog(
        "stw_start_ret",
        SingleStep,
        Core,
        "the world has restarted: the pause ends, by Go's own clock",
    );
    t[PROG_GC_MARK_TERM] = prog("gc_mark_termination", Emulated, Core, "a GC cycle ends");
    t[PROG_GROW_CLASSIC] = prog(
        "grow_classic",
        Emulated,
        Growth,
        "a classic map doubles or grows at the same size",
    );
    t[PROG_GROW_TO_TABLE] = prog(
        "grow_to_table",
        Emulated,
        Growth,
        "a small swiss map becomes a table",
    );
    t[PROG_GROW_TABLE] = prog(
        "grow_table",
        Emulated,
        Growth,
        "a swiss table grows to twice its capacity",
    );
    t[PROG_SPLIT_TABLE] = prog(
        "split_table",
        Emulated,
        Growth,
        "a full swiss table splits in two",
    );
    t[PROG_PRUNE_TABLE] = prog(
        "prune_table",
        Emulated,
        Growth,
        "a swiss table reclaims deleted slots instead of growing",
    );
    // On the first jump of the body past the guard: emulated.
    t[PROG_PRUNE_BODY] = prog(
        "prune_body",
        Emulated,
        Growth,
        "a swiss table reclaims deleted slots instead of growing",
    );
    t[PROG_REHASH_TABLE] = prog(
        "rehash_table",
        Emulated,
        Growth,
        "a swiss table grows or splits (both inlined into rehash)",
    );
    t[PROG_GROW_SLICE] = prog(
        "grow_slice",
        Emulated,
        Slice,
        "an append past a slice's capacity: a new array, the old one copied",
    );
    t[PROG_MAP_ASSIGN] = prog(
        "map_assign",
        Emulated,
        Access,
        "a map write: which maps exist, their sites and load factors",
    );
    t[PROG_MAP_DELETE] = prog(
        "map_delete",
        Emulated,
        Access,
        "a map delete: which maps exist, their sites and load factors",
    );
    t[PROG_MAP_EVACUATE] = prog(
        "map_evacuate",
        Emulated,
        Access,
        "a classic map moves an old bucket after growing",
    );
    t
};

/// One uprobe to attach: which program, at which file offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// `PROG_*`.
    pub program: usize,
    pub function: &'static str,
    pub file_offset: u64,
}

/// Where an entry probe goes: on the `JBE` of the function's stack check.
/// The kernel emulates that instruction (about 0.8 µs a hit here) where the
/// first one, a CMP, is single-stepped (5-7 µs); the argument registers are
/// the same at both, and the CMP's flags tell the probe whether the function
/// is about to restart through `morestack` (so each call counts once).
pub fn entry_offset(f: &Function) -> anyhow::Result<u64> {
    f.stack_check_jump_offset().with_context(|| {
        format!(
            "{} has no stack check at its entry; refusing to place a probe that could count \
             a call twice",
            f.name
        )
    })
}

/// Which functions the site walk steps over: those that insert into maps
/// on behalf of their caller. The site of a growth is the first caller
/// frame outside them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plumbing {
    prefixes: Vec<String>,
    /// `--site-keep`: prefixes never stepped over, whatever the others say.
    keep: Vec<String>,
}

/// The runtime and what only carries a caller's map or slice to it:
/// `reflect` (`Value.SetMapIndex`; the runtime's `reflect.mapassign*`,
/// `reflect.growslice`), decoders of the standard library
/// (`encoding/json`, `encoding/gob`, ...), the `maps` and `slices`
/// packages, `sync` (`sync.Map` before Go 1.24), the standard library's
/// internal packages, and its byte and string builders, whose growths are
/// their callers' (`bytes.Buffer`, `strings.Builder`, `bytes.ToLower`,
/// `strconv.AppendInt`, `fmt.Fprintf` into a caller's buffer, `io.ReadAll`,
/// `unicode/utf8.AppendRune`): measured, without them `bytes.ToLower` and
/// `bytes.growSlice` were Hugo's top slice growth sites.
pub const DEFAULT_PLUMBING: &[&str] = &[
    "runtime.",
    "internal/",
    "reflect.",
    "encoding/",
    "maps.",
    "slices.",
    "sync.",
    "sync/atomic.",
    "bytes.",
    "strings.",
    "strconv.",
    "fmt.",
    "io.",
    "unicode/",
];

/// Methods of the standard library's map types that only write into their
/// receiver, whose map belongs to the caller (`h.Set(k, v)` fills the
/// caller's header map): a growth inside one is its caller's. Measured, 53%
/// of Traefik's growths under load land in `net/http.Header.Set`. The rule
/// is a list, not "any method of a map type": which types are maps is not
/// in a stripped binary, and a type of one's own whose methods fill its map
/// is a site worth naming. `--site-skip` adds more, `--site-keep` takes
/// any back.
pub const DEFAULT_MAP_METHODS: &[&str] = &[
    "net/http.Header.",
    "net/textproto.MIMEHeader.",
    "net/url.Values.",
];

impl Default for Plumbing {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl Plumbing {
    /// The default prefixes plus `extra` (for third-party decoders such as
    /// `gopkg.in/yaml.v3.`). Names are matched as their import paths read,
    /// so a prefix in Go's escaped form (`gopkg.in/yaml%2ev3.`) is taken
    /// as that too.
    pub fn new(extra: &[String]) -> Self {
        Self::with_keep(extra, &[])
    }

    /// [`Plumbing::new`], less what `keep` prefixes match (`--site-keep`):
    /// a function they match is a site of its own, even when a default
    /// prefix (`net/http.Header.`) or `extra` matches it too.
    pub fn with_keep(extra: &[String], keep: &[String]) -> Self {
        let unescape = |p: &String| symname::unescape(p).into_owned();
        let mut prefixes: Vec<String> = DEFAULT_PLUMBING
            .iter()
            .chain(DEFAULT_MAP_METHODS)
            .map(|p| (*p).to_owned())
            .collect();
        prefixes.extend(extra.iter().map(unescape));
        Self {
            prefixes,
            keep: keep.iter().map(unescape).collect(),
        }
    }

    /// In (`Some(true)`), out, or neutral (`None`): compiler-generated
    /// functions (`type:.eq.*`), linker markers (`go:*`) and assembly
    /// helpers without a package never grow a map or call code that does, so
    /// they may sit inside a range between two plumbing functions.
    pub fn class(&self, name: &str) -> Option<bool> {
        if self.keep.iter().any(|p| name.starts_with(p.as_str())) {
            Some(false)
        } else if self.prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            Some(true)
        } else if name.starts_with("type:") || name.starts_with("go:") || !name.contains('.') {
            None
        } else {
            Some(false)
        }
    }

    /// The executable's plumbing as the kernel holds it: per page of text
    /// (link-time address >> 12), a bit per 16-byte block. Names from the
    /// executable's bytes `exe`.
    pub fn pages(&self, symbolizer: &Symbolizer, exe: &[u8]) -> BTreeMap<u32, PageBits> {
        pages(&symbolizer.ranges(exe, |n| self.class(n)))
    }
}

/// The blocks of `ranges` as page bitmaps. A block is marked when it
/// starts inside a range: every function starts on a block boundary.
fn pages(ranges: &[(u64, u64)]) -> BTreeMap<u32, PageBits> {
    let block = 1u64 << PLUMBING_BLOCK_SHIFT;
    let mut out: BTreeMap<u32, PageBits> = BTreeMap::new();
    for &(lo, hi) in ranges {
        let mut b = lo.next_multiple_of(block);
        while b < hi {
            let Ok(page) = u32::try_from(b >> 12) else {
                break; // past 16 TiB: no Go text lives there
            };
            let i = ((b >> PLUMBING_BLOCK_SHIFT) & 0xff) as usize;
            out.entry(page).or_default().0[i / 64] |= 1 << (i % 64);
            b += block;
        }
    }
    out
}

/// Everything to attach to one process.
#[derive(Clone, Debug)]
pub struct Plan {
    /// GC and stop-the-world probes.
    pub core: Vec<ProbeSite>,
    /// Map growth probes.
    pub growth: Vec<ProbeSite>,
    /// The growth kinds they cannot count, and how they count the others
    /// when not each through its own function.
    pub coverage: Coverage,
    /// Assignment, deletion and evacuation probes (those the binary has).
    pub access: Vec<ProbeSite>,
    /// The slice growth probe (none when `runtime.growslice` has inlined
    /// copies, which it never has: said in `coverage`).
    pub slice: Vec<ProbeSite>,
    /// The map probes' config, but for `exe_id` (set when registered).
    pub config: ProcConfig,
    /// The stop-the-world probes' state, idle.
    pub stw: StwState,
}

/// The assignment, deletion and evacuation probes of this binary (those it
/// has).
fn plan_access(bin: &GoBinary) -> anyhow::Result<Vec<ProbeSite>> {
    let mut sites = Vec::new();
    for (functions, program) in [
        (ASSIGN_FUNCTIONS, PROG_MAP_ASSIGN),
        (DELETE_FUNCTIONS, PROG_MAP_DELETE),
        (EVACUATE_FUNCTIONS, PROG_MAP_EVACUATE),
    ] {
        for &function in functions {
            if let Some(f) = bin.functions.get(function) {
                sites.push(ProbeSite {
                    program,
                    function,
                    file_offset: entry_offset(f)?,
                });
            }
        }
    }
    Ok(sites)
}

/// What the growth probes of an executable cannot count, and how they
/// count what its runtime does not do through a function of its own (and
/// any GC or stop-the-world function only partly seen). Growth counts stay
/// exact: a kind is counted through functions that see every growth of it,
/// or not at all (and said so).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Growth kinds (`kind` label values) no probe counts here.
    pub unwatched: Vec<&'static str>,
    /// One sentence for each kind not counted through its own function:
    /// how it is counted, or why it cannot be.
    pub notes: Vec<String>,
    /// GC and stop-the-world functions also inlined somewhere (none in any
    /// build seen so far): what goes through their copies is missed.
    pub partial: Vec<&'static str>,
    /// `runtime.growslice` cannot be probed whole (never seen): slice
    /// growths are not counted.
    pub slices_unwatched: bool,
    /// The build's `-pgo` profile, when it was profile-guided (the usual
    /// reason for the above).
    pub pgo: Option<String>,
}

impl Coverage {
    fn unwatch(&mut self, kinds: &[&'static str], why: String) {
        self.unwatched.extend_from_slice(kinds);
        self.notes.push(format!(
            "{} growths not watched: {why}",
            kinds.join(" and ")
        ));
    }

    /// Every kind counted through its own function, every probed function
    /// whole.
    pub fn is_plain(&self) -> bool {
        self.notes.is_empty()
    }

    /// Something is not counted: a growth kind, or part of a GC or
    /// stop-the-world signal.
    pub fn misses(&self) -> bool {
        !self.unwatched.is_empty() || !self.partial.is_empty() || self.slices_unwatched
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.notes.join("; "))?;
        match &self.pgo {
            Some(profile) if !self.is_plain() => {
                write!(f, " (a profile-guided build: -pgo={profile})")
            }
            _ => Ok(()),
        }
    }
}

/// `name`, if a probe on its entry sees every call: it is in the
/// executable and no other function holds an inlined copy of it. Else why
/// not.
fn whole<'a>(bin: &'a GoBinary, name: &str) -> Result<&'a Function, String> {
    let copies: Vec<&str> = bin.inlined_into(name).collect();
    match bin.functions.get(name) {
        Some(f) if copies.is_empty() => Ok(f),
        Some(_) => Err(format!(
            "{name} is also inlined into {}, where no probe sees it",
            copies.join(", ")
        )),
        None if copies.is_empty() => Err(format!("{name} is not in the executable")),
        None => Err(format!("{name} is inlined into {}", copies.join(", "))),
    }
}

/// The growth probes of this binary, and what they cannot count.
fn plan_growth(bin: &GoBinary) -> anyhow::Result<(Vec<ProbeSite>, Coverage)> {
    let mut sites = Vec::new();
    let mut coverage = Coverage::default();
    let mut probe = |program, function: &'static str, f: &Function| -> anyhow::Result<()> {
        sites.push(ProbeSite {
            program,
            function,
            file_offset: entry_offset(f)?,
        });
        Ok(())
    };
    if bin.map_impl == MapImpl::Classic {
        let [(function, program)] = CLASSIC_GROWTH else {
            unreachable!("one classic growth function");
        };
        match whole(bin, function) {
            Ok(f) => probe(*program, function, f)?,
            Err(why) => coverage.unwatch(&["double", "same_size"], why),
        }
        return Ok((sites, coverage));
    }
    let [to_table, grow, split] = SWISS_GROWTH else {
        unreachable!("three swiss growth functions");
    };
    match whole(bin, to_table.0) {
        Ok(f) => probe(to_table.1, to_table.0, f)?,
        Err(why) => coverage.unwatch(&["to_table"], why),
    }
    // grow and split: each through its own function, else both through
    // rehash (their only caller), else each that can be.
    match (whole(bin, grow.0), whole(bin, split.0)) {
        (Ok(g), Ok(s)) => {
            probe(grow.1, grow.0, g)?;
            probe(split.1, split.0, s)?;
        }
        (g, s) => {
            let whys: Vec<String> = [&g, &s]
                .into_iter()
                .filter_map(|r| r.clone().err())
                .collect();
            match whole(bin, SWISS_REHASH_FN) {
                Ok(r) => {
                    probe(PROG_REHASH_TABLE, SWISS_REHASH_FN, r)?;
                    coverage.notes.push(format!(
                        "grow and split growths counted through {SWISS_REHASH_FN} (their only \
                         caller), by the table's capacity: {}",
                        whys.join(", ")
                    ));
                }
                Err(rehash) => {
                    for ((function, program), found, kind) in
                        [(grow, g, "grow"), (split, s, "split")]
                    {
                        match found {
                            Ok(f) => probe(*program, function, f)?,
                            Err(why) => coverage.unwatch(&[kind], format!("{why}, and {rehash}")),
                        }
                    }
                }
            }
        }
    }
    // The runtime calls pruneTombstones before every grow and split, and it
    // returns at once unless a tenth of the table is tombstones: probed
    // past that return, only the prunes that happen trap; where the code has
    // another shape, at the entry, with the runtime's test in the probe.
    if bin.version.at_least(25) {
        match whole(bin, SWISS_PRUNE_FN) {
            Ok(f) => sites.push(match f.guarded_body {
                Some(body) => ProbeSite {
                    program: PROG_PRUNE_BODY,
                    function: SWISS_PRUNE_FN,
                    file_offset: body,
                },
                None => ProbeSite {
                    program: PROG_PRUNE_TABLE,
                    function: SWISS_PRUNE_FN,
                    file_offset: entry_offset(f)?,
                },
            }),
            Err(why) => coverage.unwatch(&["prune"], why),
        }
    }
    coverage.pgo = bin.build.settings.get("-pgo").cloned();
    Ok((sites, coverage))
}

/// A header field the probes read, checked to lie within what they read.
fn header_field(name: &str, off: u16, bytes: usize, header: usize) -> anyhow::Result<u16> {
    if usize::from(off) + bytes > header || usize::from(off) % bytes != 0 {
        bail!(
            "unexpected map layout: {name} at offset {off} ({bytes} bytes) is not an aligned \
             field of the first {header} bytes the probes read"
        );
    }
    Ok(off)
}

/// Where each program goes in this binary, and the per-process config.
/// `load_bias` turns the binary's addresses into the process's (PIE).
pub fn plan(bin: &GoBinary, load_bias: u64) -> anyhow::Result<Plan> {
    let stop = bin.function(STOP_FN)?;
    let start = bin.function(START_FN)?;
    let mark = bin.function(MARK_TERM_FN)?;
    // Go 1.22 added `(now int64, w worldStop)` to startTheWorldWithSema.
    let start_args = if bin.version.at_least(22) {
        START_ARGS_WORLDSTOP
    } else {
        START_ARGS_NONE
    };
    let mut core = vec![
        ProbeSite {
            program: PROG_GC_MARK_TERM,
            function: MARK_TERM_FN,
            file_offset: entry_offset(mark)?,
        },
        // 1.22+: Go's own stop time and reason; 1.21: when the restart began.
        ProbeSite {
            program: PROG_STW_START_ENTRY,
            function: START_FN,
            file_offset: entry_offset(start)?,
        },
    ];
    // Go 1.21 passes nothing to startTheWorldWithSema: the stop and its
    // reason are taken when the world stops. Later releases need no probe
    // there.
    if start_args == START_ARGS_NONE {
        core.push(ProbeSite {
            program: PROG_STW_STOP,
            function: STOP_FN,
            file_offset: entry_offset(stop)?,
        });
    }
    for &ret in &start.ret_offsets {
        core.push(ProbeSite {
            program: PROG_STW_START_RET,
            function: START_FN,
            file_offset: ret,
        });
    }
    let mut stw = StwState {
        start_args,
        pending: PendingStw {
            flags: STW_FLAG_IDLE,
            ..PendingStw::default()
        },
        ..StwState::default()
    };
    let mut config = ProcConfig {
        map_impl: match bin.map_impl {
            MapImpl::Classic => MAP_IMPL_CLASSIC,
            MapImpl::Swiss => MAP_IMPL_SWISS,
        },
        // Go 1.22 raised loadFactorNum from 12 to 13 (6.5 entries a bucket).
        load_factor_num: if bin.version.at_least(22) { 13 } else { 12 },
        load_bias,
        ..ProcConfig::default()
    };
    // Cycle records (gctrace, triggers) where the runtime's state is known.
    if let Ok(layout) = crate::gctrace::Layout::of(bin) {
        stw.trace = layout.config(load_bias);
    }
    if let Some(clock) = bin.pause_clock {
        stw.pause_start_addr = clock.pause_start.wrapping_add(load_bias);
        stw.last_gc_nanotime_addr = clock.last_gc_nanotime.wrapping_add(load_bias);
    }
    let (growth, mut coverage) = plan_growth(bin)?;
    // The core functions have always been whole; were one inlined
    // somewhere too, what passes through that copy is missed: said so.
    let probed_core = [
        (MARK_TERM_FN, "GC cycles completed there are not counted"),
        (START_FN, "pauses ended there are not seen"),
        (
            STOP_FN,
            "pauses begun there are seen as stw_unmatched anomalies",
        ),
    ];
    for (function, missed) in probed_core {
        if function == STOP_FN && start_args != START_ARGS_NONE {
            continue; // not probed
        }
        let copies: Vec<&str> = bin.inlined_into(function).collect();
        if !copies.is_empty() {
            coverage.partial.push(function);
            coverage.notes.push(format!(
                "{function} is also inlined into {}, where no probe sees it: {missed}",
                copies.join(", ")
            ));
        }
    }
    const M: usize = MAP_HEADER_BYTES;
    const T: usize = TABLE_HEADER_BYTES;
    match bin.offsets.map {
        MapOffsets::Classic {
            count,
            flags,
            b,
            noverflow,
            hash0,
            oldbuckets,
            maptype_bucket_size,
            ..
        } => {
            config.hmap_count = header_field("hmap.count", count, 8, M)?;
            config.hmap_flags = header_field("hmap.flags", flags, 1, M)?;
            config.hmap_b = header_field("hmap.B", b, 1, M)?;
            config.hmap_noverflow = header_field("hmap.noverflow", noverflow, 2, M)?;
            config.hmap_hash0 = header_field("hmap.hash0", hash0, 4, M)?;
            config.hmap_oldbuckets = oldbuckets;
            config.maptype_bucket_size = maptype_bucket_size;
        }
        MapOffsets::Swiss {
            map_used,
            map_seed,
            map_dir_ptr,
            map_dir_len,
            map_global_depth,
            table_used,
            table_capacity,
            table_growth_left,
            table_local_depth,
            ..
        } => {
            config.map_used = header_field("Map.used", map_used, 8, M)?;
            config.map_seed = header_field("Map.seed", map_seed, 8, M)?;
            config.map_dir_ptr = header_field("Map.dirPtr", map_dir_ptr, 8, M)?;
            config.map_dir_len = header_field("Map.dirLen", map_dir_len, 8, M)?;
            config.map_global_depth = header_field("Map.globalDepth", map_global_depth, 1, M)?;
            config.table_used = header_field("table.used", table_used, 2, T)?;
            config.table_capacity = header_field("table.capacity", table_capacity, 2, T)?;
            config.table_growth_left = header_field("table.growthLeft", table_growth_left, 2, T)?;
            config.table_local_depth = header_field("table.localDepth", table_local_depth, 1, T)?;
        }
    }
    let slice = match whole(bin, SLICE_GROWTH_FN) {
        Ok(f) => vec![ProbeSite {
            program: PROG_GROW_SLICE,
            function: SLICE_GROWTH_FN,
            file_offset: entry_offset(f)?,
        }],
        Err(why) => {
            coverage
                .notes
                .push(format!("slice growths not watched: {why}"));
            coverage.slices_unwatched = true;
            Vec::new()
        }
    };
    let types = bin.offsets.types.context(
        "no internal/abi.Type layout for this binary (neither in its DWARF nor in the table)",
    )?;
    const Y: usize = TYPE_HEADER_BYTES;
    config.type_size = header_field("Type.Size_", types.size, 8, Y)?;
    config.type_ptr_bytes = header_field("Type.PtrBytes", types.ptr_bytes, 8, Y)?;
    // Go 1.22 put a malloc header in objects over 512 bytes with
    // pointers (GOEXPERIMENT=allocheaders, on by default, the only way
    // from 1.23).
    config.malloc_header = u8::from(
        bin.version.at_least(22)
            && !(bin.version.minor == 22
                && bin
                    .build
                    .settings
                    .get("GOEXPERIMENT")
                    .is_some_and(|x| x.split(',').any(|e| e == "noallocheaders"))),
    );
    Ok(Plan {
        core,
        growth,
        coverage,
        access: plan_access(bin)?,
        slice,
        config,
        stw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{
        BuildInfo, GlobalError, Globals, GoVersion, RuntimeLayout, StackCheck, offsets,
    };

    const GROW: &str = "internal/runtime/maps.(*table).grow";
    const SPLIT: &str = "internal/runtime/maps.(*table).split";
    const TO_TABLE: &str = "internal/runtime/maps.(*Map).growToTable";

    /// A binary of Go `version` with `functions` (each with a stack check),
    /// where each `(callee, holder)` of `inlined` has a copy of callee.
    fn binary(version: &str, extra: &[&str], inlined: &[(&str, &str)], pgo: bool) -> GoBinary {
        let version = GoVersion::parse(version).unwrap();
        let map_impl = MapImpl::of(&version);
        let mut settings = BTreeMap::new();
        if pgo {
            settings.insert("-pgo".to_owned(), "default.pgo".to_owned());
        }
        let functions = REQUIRED_FUNCTIONS
            .iter()
            .chain(&[SLICE_GROWTH_FN])
            .chain(extra)
            .enumerate()
            .map(|(i, name)| {
                let address = 0x1000 * (i as u64 + 1);
                let f = Function {
                    name: (*name).to_owned(),
                    address,
                    size: 0x100,
                    file_offset: address,
                    ret_offsets: vec![address + 0x80],
                    stack_check: Some(StackCheck {
                        cmp: address + 4,
                        jump: address + 8,
                    }),
                    guarded_body: None,
                };
                ((*name).to_owned(), f)
            })
            .collect();
        let mut copies: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for (callee, holder) in inlined {
            copies
                .entry((*callee).to_owned())
                .or_default()
                .insert((*holder).to_owned());
        }
        GoBinary {
            build: BuildInfo {
                version: version.raw.clone(),
                settings,
                ..BuildInfo::default()
            },
            offsets: offsets::from_table(&version, map_impl).unwrap(),
            version,
            functions,
            text_start: 0,
            pie: false,
            image_base: 0,
            stripped: false,
            symbolizer: Symbolizer::default(),
            map_impl,
            offsets_from_dwarf: false,
            pause_clock: None,
            inlined: Some(copies),
            runtime: RuntimeLayout {
                offsets: Err("not read".to_owned()),
                offsets_from_dwarf: false,
                globals: Globals::none(GlobalError::NoSections),
            },
        }
    }

    fn programs(p: &Plan) -> Vec<&'static str> {
        p.growth
            .iter()
            .map(|s| PROGRAM_TABLE[s.program].name)
            .collect()
    }

    #[test]
    fn ordinary_builds_count_each_kind_through_its_own_function() {
        let b = binary(
            "go1.27.3",
            &[TO_TABLE, GROW, SPLIT, SWISS_REHASH_FN, SWISS_PRUNE_FN],
            &[],
            false,
        );
        let p = plan(&b, 0).unwrap();
        assert_eq!(
            programs(&p),
            ["grow_to_table", "grow_table", "split_table", "prune_table"]
        );
        assert!(p.coverage.is_plain() && !p.coverage.misses());
        assert_eq!(p.coverage.to_string(), "");
        let classic = binary("go1.23.9", &[CLASSIC_GROWTH[0].0], &[], false);
        assert_eq!(programs(&plan(&classic, 0).unwrap()), ["grow_classic"]);
    }

    #[test]
    fn grow_and_split_inlined_into_rehash_are_counted_through_it() {
        // Both gone (Go's own compile, 1.24-1.27), or one kept: rehash
        // sees both, and neither is probed besides (no double count).
        for kept in [&[][..], &[GROW][..], &[SPLIT][..]] {
            let mut functions = vec![TO_TABLE, SWISS_REHASH_FN, SWISS_PRUNE_FN];
            functions.extend_from_slice(kept);
            let inlined: Vec<(&str, &str)> = [GROW, SPLIT]
                .iter()
                .map(|f| (*f, SWISS_REHASH_FN))
                .collect();
            let b = binary("go1.26.6", &functions, &inlined, true);
            let p = plan(&b, 0).unwrap();
            assert_eq!(
                programs(&p),
                ["grow_to_table", "rehash_table", "prune_table"],
                "kept {kept:?}"
            );
            assert!(p.coverage.unwatched.is_empty() && !p.coverage.misses());
            let said = p.coverage.to_string();
            assert!(
                said.starts_with("grow and split growths counted through ")
                    && said.ends_with("(a profile-guided build: -pgo=default.pgo)"),
                "{said}"
            );
        }
    }

    #[test]
    fn kinds_nothing_sees_whole_are_unwatched_and_said_so() {
        // rehash inlined into a mapassign too, grow gone: split keeps its
        // own probe, grow is not counted at all.
        let b = binary(
            "go1.25.5",
            &[TO_TABLE, SPLIT, SWISS_REHASH_FN],
            &[
                (GROW, SWISS_REHASH_FN),
                (SWISS_REHASH_FN, "runtime.mapassign_fast64"),
                (SWISS_PRUNE_FN, "runtime.mapassign_fast64"),
            ],
            true,
        );
        let p = plan(&b, 0).unwrap();
        assert_eq!(programs(&p), ["grow_to_table", "split_table"]);
        assert_eq!(p.coverage.unwatched, ["grow", "prune"]);
        assert!(p.coverage.misses());
        let said = p.coverage.to_string();
        assert!(said.contains("grow growths not watched: internal/runtime/maps.(*table).grow is inlined into internal/runtime/maps.(*table).rehash, and internal/runtime/maps.(*table).rehash is also inlined into runtime.mapassign_fast64"), "{said}");
        assert!(said.contains("prune growths not watched: internal/runtime/maps.(*table).pruneTombstones is inlined into runtime.mapassign_fast64"), "{said}");
        // Go 1.24 has no prune to miss.
        let b = binary("go1.24.11", &[TO_TABLE, GROW, SPLIT], &[], false);
        assert!(plan(&b, 0).unwrap().coverage.is_plain());
        // Classic hashGrow partly inlined (Go 1.22's own compile): neither
        // classic kind is probed.
        let b = binary(
            "go1.22.10",
            &[CLASSIC_GROWTH[0].0],
            &[(CLASSIC_GROWTH[0].0, "runtime.mapassign")],
            true,
        );
        let p = plan(&b, 0).unwrap();
        assert!(p.growth.is_empty());
        assert_eq!(p.coverage.unwatched, ["double", "same_size"]);
        // GC and stop-the-world: still watched, the gap said so.
        let b = binary(
            "go1.21.13",
            &[CLASSIC_GROWTH[0].0],
            &[(STOP_FN, "runtime.gcStart.func2")],
            false,
        );
        let p = plan(&b, 0).unwrap();
        assert_eq!(p.coverage.partial, [STOP_FN]);
        assert!(p.coverage.misses() && p.coverage.unwatched.is_empty());
        // From Go 1.22 the stop is not probed: its copies miss nothing.
        let b = binary(
            "go1.27.3",
            &[TO_TABLE, GROW, SPLIT, SWISS_PRUNE_FN],
            &[(STOP_FN, "runtime.gcStart.func2")],
            false,
        );
        assert!(plan(&b, 0).unwrap().coverage.is_plain());
    }

    #[test]
    fn every_program_has_a_name() {
        let mut names: Vec<&str> = PROGRAM_TABLE.iter().map(|p| p.name).collect();
        assert!(names.iter().all(|n| !n.is_empty()));
        assert!(PROGRAM_TABLE.iter().all(|p| !p.what.is_empty()));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PROGRAMS);
    }

    #[test]
    fn plumbing_classes() {
        let p = Plumbing::new(&[
            "gopkg.in/yaml.v3.".to_owned(),
            "example.com/a%2eb.".to_owned(),
        ]);
        for name in [
            "runtime.mapassign_faststr",
            "internal/runtime/maps.(*Map).growToTable",
            "reflect.mapassign_faststr0",
            "reflect.Value.SetMapIndex",
            "encoding/json.(*decodeState).object",
            "maps.Copy[go.shape.map[string]int,string,int]",
            "sync.(*Map).Store",
            "bytes.ToLower",
            "bytes.(*Buffer).grow",
            "strings.(*Builder).WriteString",
            "slices.Grow[go.shape.[]int,int]",
            "gopkg.in/yaml.v3.(*decoder).mapping",
            "example.com/a.b.Decode",
        ] {
            assert_eq!(p.class(name), Some(true), "{name}");
        }
        for name in [
            "main.fill",
            "net/http.HeaderFoo",
            "github.com/foo/reflectx.Do",
            "mainx.runtime",
        ] {
            assert_eq!(p.class(name), Some(false), "{name}");
        }
        // Methods of map types that fill their receiver: stepped over,
        // unless kept.
        for name in [
            "net/http.Header.Set",
            "net/http.Header.Add",
            "net/textproto.MIMEHeader.Set",
            "net/url.Values.Add",
        ] {
            assert_eq!(p.class(name), Some(true), "{name}");
        }
        let kept = Plumbing::with_keep(&[], &["net/http.Header.".to_owned()]);
        assert_eq!(kept.class("net/http.Header.Set"), Some(false));
        assert_eq!(kept.class("net/url.Values.Set"), Some(true));
        assert_eq!(kept.class("runtime.growslice"), Some(true));
        for name in ["type:.eq.main.T", "go:buildid", "cmpbody", "gogo"] {
            assert_eq!(p.class(name), None, "{name}");
        }
    }

    #[test]
    fn page_bitmaps() {
        let p = pages(&[(0x401000, 0x401030), (0x401ff0, 0x402020)]);
        assert_eq!(p.len(), 2);
        let first = p[&0x401].0;
        // Blocks 0..3 of page 0x401 and its last block (0xff).
        assert_eq!(first[0], 0b111);
        assert_eq!(first[3], 1 << 63);
        assert_eq!(p[&0x402].0, [0b11, 0, 0, 0]);
        assert!(pages(&[]).is_empty());
    }

    #[test]
    fn header_fields_must_fit() {
        assert_eq!(header_field("x", 40, 8, 48).unwrap(), 40);
        assert!(header_field("x", 41, 8, 48).is_err());
        assert!(header_field("x", 44, 8, 48).is_err());
        assert!(header_field("x", 3, 2, 32).is_err());
        assert_eq!(header_field("x", 6, 1, 32).unwrap(), 6);
    }
}
