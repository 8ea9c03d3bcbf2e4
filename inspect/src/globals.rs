//! Where the Go runtime's global state is in an executable: `gcController`,
//! `memstats`, `work`, `sched`, `allp`, `allglen`, `gomaxprocs`, whose
//! fields the agent reads from a process's memory at collection time
//! (link-time addresses; add a process's load bias).
//!
//! From the symbol table when there is one. Stripped binaries have none, so
//! each global is recovered from the machine code of runtime functions that
//! every Go program links: a RIP-relative operand matched by a structural
//! pattern (the receiver loaded into RAX right before a call to a known
//! method, a slice's pointer and length loaded together, ...), never by
//! position. Where a pattern yields a field's address, the field's offset
//! is subtracted. Each global is then used only if every rule that matched
//! agrees, the address is aligned and the global lies in the data section
//! the linker puts it in (from `runtime.moduledata`); otherwise it is an
//! error that names why, and what needs it is not read.
use std::{collections::HashMap, fmt, ops::Range};

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use crate::{elf::DataSections, layout::RuntimeOffsets};

/// The fields of `runtime.moduledata` that bound Go's zeroed data sections,
/// with the offsets the agent assumes (the `offsets_table` test checks them
/// against every release's DWARF).
pub const MODULEDATA_FIELDS: [(&str, u64); 4] = [
    ("bss", crate::elf::MD_BSS),
    ("ebss", crate::elf::MD_EBSS),
    ("noptrbss", crate::elf::MD_NOPTRBSS),
    ("enoptrbss", crate::elf::MD_ENOPTRBSS),
];

/// A runtime global the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Global {
    /// `runtime.gcController` (`gcControllerState`).
    GcController,
    /// `runtime.memstats` (`mstats`).
    Memstats,
    /// `runtime.work` (`workType`).
    Work,
    /// `runtime.sched` (`schedt`).
    Sched,
    /// `runtime.allp` (`[]*p`: pointer, length, capacity).
    Allp,
    /// `runtime.allglen` (`uintptr`).
    Allglen,
    /// `runtime.gomaxprocs` (`int32`).
    Gomaxprocs,
}

impl Global {
    pub const ALL: [Global; 7] = [
        Global::GcController,
        Global::Memstats,
        Global::Work,
        Global::Sched,
        Global::Allp,
        Global::Allglen,
        Global::Gomaxprocs,
    ];

    /// Its symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Global::GcController => "runtime.gcController",
            Global::Memstats => "runtime.memstats",
            Global::Work => "runtime.work",
            Global::Sched => "runtime.sched",
            Global::Allp => "runtime.allp",
            Global::Allglen => "runtime.allglen",
            Global::Gomaxprocs => "runtime.gomaxprocs",
        }
    }

    /// Whether the linker puts it in `.noptrbss` (no pointers) rather
    /// than `.bss`.
    fn in_noptrbss(self) -> bool {
        matches!(
            self,
            Global::GcController | Global::Memstats | Global::Allglen | Global::Gomaxprocs
        )
    }

    fn alignment(self) -> u64 {
        match self {
            Global::Gomaxprocs => 4,
            _ => 8,
        }
    }

    /// The bytes of it the agent reads, from its start.
    fn extent(self, o: &RuntimeOffsets) -> u64 {
        let end = |fields: &[u16], size: u64| {
            fields
                .iter()
                .map(|&f| u64::from(f) + size)
                .max()
                .unwrap_or(size)
        };
        match self {
            Global::GcController => u64::from(o.gc_controller_size),
            Global::Memstats => end(&[o.other_sys, o.numgc, o.numforcedgc], 8),
            Global::Work => end(
                &[
                    o.work_cycles,
                    o.work_stwprocs,
                    o.work_maxprocs,
                    o.work_cpu_gc_total,
                    o.work_cpu_scavenge_total,
                    o.work_cpu_idle,
                    o.work_cpu_user,
                ],
                8,
            ),
            Global::Sched => u64::from(o.sched_time_to_run) + u64::from(o.hist_overflow) + 8,
            Global::Allp => 24,
            Global::Allglen => 8,
            Global::Gomaxprocs => 4,
        }
    }
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

/// Why a global is not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlobalError {
    #[error("the runtime's struct offsets are unknown for this build ({0})")]
    NoOffsets(String),
    #[error("runtime.moduledata (the data sections' bounds) was not found")]
    NoSections,
    #[error("not found: no symbol, and {0}")]
    NotFound(&'static str),
    #[error("the code gives {0:#x} and {1:#x}")]
    Disagree(u64, u64),
    #[error("{addr:#x} is not {align}-byte aligned")]
    Misaligned { addr: u64, align: u64 },
    #[error("{addr:#x} (+{extent} bytes) lies outside {section} {range:#x?}")]
    OutsideSection {
        addr: u64,
        extent: u64,
        section: &'static str,
        range: Range<u64>,
    },
}

/// The globals of one executable: link-time addresses, or why each is not
/// used.
#[derive(Clone, Debug)]
pub struct Globals {
    found: HashMap<Global, Result<u64, GlobalError>>,
    /// `runtime.allgs` (a slice: its length must equal `allglen`), when known.
    pub allgs: Option<u64>,
    /// Taken from the symbol table (else from code).
    pub from_symbols: bool,
    /// `runtime.runtimeInitTime` (`int64`: the monotonic clock when
    /// `runtime.main` began; gctrace's `@` is counted from it), when known.
    pub runtime_init_time: Option<u64>,
}

impl Globals {
    /// Where `g` is, or why it is not used.
    pub fn get(&self, g: Global) -> Result<u64, &GlobalError> {
        match self.found.get(&g) {
            Some(Ok(a)) => Ok(*a),
            Some(Err(e)) => Err(e),
            None => Err(&GlobalError::NotFound("never looked for")),
        }
    }

    /// Every global that is not used, with why.
    pub fn missing(&self) -> Vec<(Global, &GlobalError)> {
        Global::ALL
            .iter()
            .filter_map(|&g| self.get(g).err().map(|e| (g, e)))
            .collect()
    }

    /// None of them, all for the same reason.
    pub fn none(why: GlobalError) -> Self {
        Self {
            found: Global::ALL.iter().map(|&g| (g, Err(why.clone()))).collect(),
            allgs: None,
            from_symbols: false,
            runtime_init_time: None,
        }
    }
}

/// Functions whose code the rules read.
pub(crate) const ANCHORS: &[&str] = &[
    "runtime.gcinit",
    "runtime.gcControllerCommit",
    "runtime.(*mcache).refill",
    "runtime.(*mcache).releaseAll",
    "runtime.putfull",
    "runtime.putempty",
    "runtime.casgstatus",
    "runtime.mcommoninit",
    "runtime.gcStart",
    "runtime.stopTheWorldWithSema",
    "runtime.allgadd",
    "runtime.procresize",
    "runtime.main",
];

/// Functions the rules look for as call targets.
pub(crate) const CALLEES: &[&str] = &[
    GC_INIT,
    GC_COMMIT,
    HEAP_STATS_ACQUIRE,
    HEAP_STATS_RELEASE,
    LFSTACK_PUSH,
    TIME_HISTOGRAM_RECORD,
    LOCK2,
    NANOTIME1,
];

const GC_INIT: &str = "runtime.(*gcControllerState).init";
const GC_COMMIT: &str = "runtime.(*gcControllerState).commit";
const HEAP_STATS_ACQUIRE: &str = "runtime.(*consistentHeapStats).acquire";
const HEAP_STATS_RELEASE: &str = "runtime.(*consistentHeapStats).release";
const LFSTACK_PUSH: &str = "runtime.(*lfstack).push";
const TIME_HISTOGRAM_RECORD: &str = "runtime.(*timeHistogram).record";
const LOCK2: &str = "runtime.lock2";
const NANOTIME1: &str = "runtime.nanotime1";

/// The code the rules read: [`ANCHORS`] decoded, and the entries of
/// [`CALLEES`].
pub(crate) struct Text {
    code: HashMap<&'static str, Vec<Instruction>>,
    callees: HashMap<u64, &'static str>,
}

impl Text {
    /// `functions` yields (name, entry address, machine code) of whatever
    /// of [`ANCHORS`] and [`CALLEES`] the executable has.
    pub(crate) fn new<'a>(
        functions: impl IntoIterator<Item = (&'static str, u64, &'a [u8])>,
    ) -> Self {
        let mut text = Text {
            code: HashMap::new(),
            callees: HashMap::new(),
        };
        for (name, addr, code) in functions {
            if CALLEES.contains(&name) {
                text.callees.insert(addr, name);
            }
            if ANCHORS.contains(&name) {
                text.code.insert(name, decode(code, addr));
            }
        }
        text
    }

    fn code(&self, name: &str) -> &[Instruction] {
        self.code.get(name).map_or(&[], Vec::as_slice)
    }

    fn calls(&self, insn: &Instruction, targets: &[&str]) -> bool {
        insn.mnemonic() == Mnemonic::Call
            && insn.op0_kind() == OpKind::NearBranch64
            && self
                .callees
                .get(&insn.near_branch_target())
                .is_some_and(|n| targets.contains(n))
    }
}

/// Every instruction of a function (an undecodable byte is stepped over:
/// the patterns then simply do not match there).
fn decode(code: &[u8], addr: u64) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if !insn.is_invalid() {
            out.push(insn);
        }
    }
    out
}

/// The RIP-relative address an instruction's memory operand names.
fn rip_target(insn: &Instruction) -> Option<u64> {
    insn.is_ip_rel_memory_operand()
        .then(|| insn.ip_rel_memory_address())
}

/// The index of the first instruction at or after `i` that is no NOP.
fn skip_nops(insns: &[Instruction], mut i: usize) -> usize {
    while insns.get(i).is_some_and(|x| x.mnemonic() == Mnemonic::Nop) {
        i += 1;
    }
    i
}

/// `LEA RAX, [RIP+X]` followed (NOPs skipped) by a call to one of
/// `methods`: the receiver of a method call (the register ABI passes it in
/// RAX). Every X, in order.
fn receiver(text: &Text, function: &str, methods: &[&str]) -> Vec<u64> {
    let insns = text.code(function);
    insns
        .iter()
        .enumerate()
        .filter(|(_, i)| i.mnemonic() == Mnemonic::Lea && i.op0_register() == Register::RAX)
        .filter_map(|(k, i)| {
            let x = rip_target(i)?;
            let next = insns.get(skip_nops(insns, k + 1))?;
            text.calls(next, methods).then_some(x)
        })
        .collect()
}

/// A slice header loaded as a pair: `MOV r64, [RIP+A]` and
/// `MOV r64, [RIP+A+8]` (pointer and length) within six instructions. The
/// first such A.
fn slice_pair(text: &Text, function: &str) -> Option<u64> {
    let loads: Vec<(usize, u64)> = text
        .code(function)
        .iter()
        .enumerate()
        .filter(|(_, i)| {
            i.mnemonic() == Mnemonic::Mov
                && i.op0_kind() == OpKind::Register
                && i.op0_register().is_gpr64()
        })
        .filter_map(|(k, i)| Some((k, rip_target(i)?)))
        .collect();
    for (a, &(ka, ta)) in loads.iter().enumerate() {
        for &(_, tb) in loads[a + 1..].iter().take_while(|(kb, _)| kb - ka <= 6) {
            if tb == ta.wrapping_add(8) {
                return Some(ta);
            }
            if ta == tb.wrapping_add(8) {
                return Some(tb);
            }
        }
    }
    None
}

/// In `allgadd`: `XCHG [Ra], Rv` (the atomic store of `allglen`) where Ra
/// came from `LEA Ra, [RIP+X]` and Rv from `MOV Rv, [RIP+Y]` within the
/// three instructions before. Every (X, Y): X is `allglen`, Y `allgs.len`.
fn atomic_store_of_load(text: &Text, function: &str) -> Vec<(u64, u64)> {
    let insns = text.code(function);
    let mut out = Vec::new();
    for (k, i) in insns.iter().enumerate() {
        if i.mnemonic() != Mnemonic::Xchg || i.op_count() != 2 {
            continue;
        }
        // The register operand; the other is the memory one.
        let reg = match (i.op0_kind(), i.op1_kind()) {
            (OpKind::Memory, OpKind::Register) => 1,
            (OpKind::Register, OpKind::Memory) => 0,
            _ => continue,
        };
        if i.memory_displacement64() != 0 || i.memory_index() != Register::None {
            continue;
        }
        let (ra, rv) = (i.memory_base(), i.op_register(reg));
        let (mut lea, mut mov) = (None, None);
        for p in &insns[k.saturating_sub(3)..k] {
            if p.mnemonic() == Mnemonic::Lea && p.op0_register() == ra {
                lea = rip_target(p);
            }
            if p.mnemonic() == Mnemonic::Mov
                && p.op0_kind() == OpKind::Register
                && p.op0_register() == rv
            {
                mov = rip_target(p);
            }
        }
        if let (Some(x), Some(y)) = (lea, mov) {
            out.push((x, y));
        }
    }
    out
}

/// `MOV r32, [RIP+X]; TEST r32, r32; JL`: in `procresize`, the check that
/// the old GOMAXPROCS is not negative. Every X.
fn load_test_jl(text: &Text, function: &str) -> Vec<u64> {
    let insns = text.code(function);
    insns
        .windows(3)
        .filter_map(|w| {
            let (mov, test, jl) = (&w[0], &w[1], &w[2]);
            let r = mov.op0_register();
            let shape = mov.mnemonic() == Mnemonic::Mov
                && mov.op0_kind() == OpKind::Register
                && r.is_gpr32()
                && test.mnemonic() == Mnemonic::Test
                && test.op0_kind() == OpKind::Register
                && test.op1_kind() == OpKind::Register
                && test.op0_register() == r
                && test.op1_register() == r
                && jl.mnemonic() == Mnemonic::Jl;
            if shape { rip_target(mov) } else { None }
        })
        .collect()
}

/// What the rules of one global found: every candidate address (already
/// the global's start), or the rule that found nothing.
fn candidates(text: &Text, g: Global, o: &RuntimeOffsets) -> (Vec<u64>, &'static str) {
    let minus = |xs: Vec<u64>, off: u16| -> Vec<u64> {
        xs.into_iter()
            .map(|x| x.wrapping_sub(u64::from(off)))
            .collect()
    };
    match g {
        Global::GcController => {
            let mut c = receiver(text, "runtime.gcinit", &[GC_INIT]);
            c.extend(receiver(text, "runtime.gcControllerCommit", &[GC_COMMIT]));
            (
                c,
                "runtime.gcinit does not call (*gcControllerState).init on it",
            )
        }
        Global::Memstats => {
            let methods = [HEAP_STATS_ACQUIRE, HEAP_STATS_RELEASE];
            let mut c = receiver(text, "runtime.(*mcache).refill", &methods);
            c.extend(receiver(text, "runtime.(*mcache).releaseAll", &methods));
            (
                minus(c, o.heap_stats),
                "runtime.(*mcache).refill does not call (*consistentHeapStats).acquire on it",
            )
        }
        Global::Work => {
            let mut c = minus(
                receiver(text, "runtime.putfull", &[LFSTACK_PUSH]),
                o.work_full,
            );
            c.extend(minus(
                receiver(text, "runtime.putempty", &[LFSTACK_PUSH]),
                o.work_empty,
            ));
            (
                c,
                "runtime.putfull does not call (*lfstack).push on work.full",
            )
        }
        Global::Sched => {
            let mut c = minus(
                receiver(text, "runtime.casgstatus", &[TIME_HISTOGRAM_RECORD]),
                o.sched_time_to_run,
            );
            // mcommoninit takes sched.lock first.
            if let Some(&first) = receiver(text, "runtime.mcommoninit", &[LOCK2]).first() {
                c.push(first.wrapping_sub(u64::from(o.sched_lock)));
            }
            (
                c,
                "runtime.casgstatus does not call (*timeHistogram).record on sched.timeToRun",
            )
        }
        Global::Allp => {
            let c = [
                slice_pair(text, "runtime.gcStart"),
                slice_pair(text, "runtime.stopTheWorldWithSema"),
            ]
            .into_iter()
            .flatten()
            .collect();
            (c, "runtime.gcStart loads no slice header")
        }
        Global::Allglen => (
            atomic_store_of_load(text, "runtime.allgadd")
                .into_iter()
                .map(|(x, _)| x)
                .collect(),
            "runtime.allgadd stores no loaded value atomically",
        ),
        Global::Gomaxprocs => (
            load_test_jl(text, "runtime.procresize"),
            "runtime.procresize has no load, test and signed jump",
        ),
    }
}

/// The one address every candidate agrees on.
fn agreed(mut c: Vec<u64>, none: &'static str) -> Result<u64, GlobalError> {
    c.sort_unstable();
    c.dedup();
    match c.as_slice() {
        [] => Err(GlobalError::NotFound(none)),
        [one] => Ok(*one),
        [a, b, ..] => Err(GlobalError::Disagree(*a, *b)),
    }
}

/// Where a global is by the code alone (for a stripped binary, and to check
/// the rules against the symbols of an unstripped one).
pub(crate) fn from_code(text: &Text, g: Global, o: &RuntimeOffsets) -> Result<u64, GlobalError> {
    let (c, none) = candidates(text, g, o);
    agreed(c, none)
}

/// `runtime.allgs` by the code: the slice whose length `allgadd` stores
/// into `allglen`.
fn allgs_from_code(text: &Text) -> Option<u64> {
    let mut ys: Vec<u64> = atomic_store_of_load(text, "runtime.allgadd")
        .into_iter()
        .map(|(_, y)| y.wrapping_sub(8))
        .collect();
    ys.sort_unstable();
    ys.dedup();
    match ys.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// `runtime.runtimeInitTime` by the code: `runtime.main` begins with
/// `runtimeInitTime = nanotime()`, the first store of RAX to a RIP-relative
/// place right after a call to `runtime.nanotime1`.
fn init_time_from_code(text: &Text) -> Option<u64> {
    let insns = text.code("runtime.main");
    let k = insns.iter().position(|i| text.calls(i, &[NANOTIME1]))?;
    // nanotime1 is assembly (ABI0): its result comes back on the stack and
    // is loaded into RAX (restoring X15 and R14 first) before the store.
    insns[k + 1..].iter().take(6).find_map(|store| {
        let shape = store.mnemonic() == Mnemonic::Mov
            && store.op0_kind() == OpKind::Memory
            && store.op1_kind() == OpKind::Register
            && store.op1_register() == Register::RAX;
        if shape { rip_target(store) } else { None }
    })
}

/// Checks a global's address against where the linker puts it.
fn placed(g: Global, addr: u64, o: &RuntimeOffsets, s: &DataSections) -> Result<u64, GlobalError> {
    let align = g.alignment();
    if !addr.is_multiple_of(align) {
        return Err(GlobalError::Misaligned { addr, align });
    }
    let (section, range) = if g.in_noptrbss() {
        (".noptrbss", &s.noptrbss)
    } else {
        (".bss", &s.bss)
    };
    let extent = g.extent(o);
    let fits = range.contains(&addr) && addr.checked_add(extent).is_some_and(|e| e <= range.end);
    if !fits {
        return Err(GlobalError::OutsideSection {
            addr,
            extent,
            section,
            range: range.clone(),
        });
    }
    Ok(addr)
}

/// Finds every global: by `symbol` (the symbol table's address of a data
/// symbol) when it has them, else by the code; then checks each.
pub(crate) fn locate(
    text: &Text,
    symbol: impl Fn(&str) -> Option<u64>,
    offsets: &RuntimeOffsets,
    sections: Option<&DataSections>,
) -> Globals {
    let Some(sections) = sections else {
        return Globals::none(GlobalError::NoSections);
    };
    let from_symbols = symbol(Global::Memstats.symbol()).is_some();
    let found = Global::ALL
        .iter()
        .map(|&g| {
            let addr = match symbol(g.symbol()) {
                Some(a) => Ok(a),
                None => from_code(text, g, offsets),
            };
            (g, addr.and_then(|a| placed(g, a, offsets, sections)))
        })
        .collect();
    let allgs = symbol("runtime.allgs").or_else(|| allgs_from_code(text));
    // An int64 in .noptrbss, as every release declares it.
    let runtime_init_time = symbol("runtime.runtimeInitTime")
        .or_else(|| init_time_from_code(text))
        .filter(|&a| {
            a.is_multiple_of(8) && sections.noptrbss.contains(&a) && a + 8 <= sections.noptrbss.end
        });
    Globals {
        found,
        allgs,
        from_symbols,
        runtime_init_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Assembles `(address, bytes)` pieces into a `Text` of one anchor and
    /// the callees at the given entries.
    fn text(anchor: &'static str, at: u64, code: &[u8], callees: &[(&'static str, u64)]) -> Text {
        let mut t = Text::new([(anchor, at, code)]);
        for &(name, entry) in callees {
            t.callees.insert(entry, name);
        }
        t
    }

    /// `lea rax, [rip+disp]` at `at` (7 bytes).
    fn lea_rax(at: u64, target: u64) -> Vec<u8> {
        let disp = (target as i64 - (at as i64 + 7)) as i32;
        let mut v = vec![0x48, 0x8d, 0x05];
        v.extend_from_slice(&disp.to_le_bytes());
        v
    }

    /// `call rel32` at `at` (5 bytes).
    fn call(at: u64, target: u64) -> Vec<u8> {
        let rel = (target as i64 - (at as i64 + 5)) as i32;
        let mut v = vec![0xe8];
        v.extend_from_slice(&rel.to_le_bytes());
        v
    }

    #[test]
    fn receiver_of_a_method_call() {
        let at = 0x401000;
        let mut code = lea_rax(at, 0x5a0100);
        code.push(0x90); // nop
        code.extend(call(at + 8, 0x402000));
        code.extend(lea_rax(at + 13, 0x5a0200)); // not followed by the call
        code.push(0xc3);
        let t = text("runtime.gcinit", at, &code, &[(GC_INIT, 0x402000)]);
        assert_eq!(receiver(&t, "runtime.gcinit", &[GC_INIT]), vec![0x5a0100]);
        // Another callee: nothing.
        assert!(receiver(&t, "runtime.gcinit", &[GC_COMMIT]).is_empty());
    }

    #[test]
    fn slice_header_pair() {
        let at = 0x401000;
        // mov rcx, [rip+a]; xor eax, eax; mov rdx, [rip+a+8]
        let a = 0x5b0000u64;
        let mut code = vec![0x48, 0x8b, 0x0d];
        code.extend(((a as i64 - (at as i64 + 7)) as i32).to_le_bytes());
        code.extend([0x31, 0xc0]);
        code.extend([0x48, 0x8b, 0x15]);
        code.extend(((a as i64 + 8 - (at as i64 + 16)) as i32).to_le_bytes());
        let t = text("runtime.gcStart", at, &code, &[]);
        assert_eq!(slice_pair(&t, "runtime.gcStart"), Some(a));
    }

    #[test]
    fn load_test_and_signed_jump() {
        let at = 0x401000;
        let x = 0x5c0010u64;
        // mov eax, [rip+x]; test eax, eax; jl +2
        let mut code = vec![0x8b, 0x05];
        code.extend(((x as i64 - (at as i64 + 6)) as i32).to_le_bytes());
        code.extend([0x85, 0xc0, 0x7c, 0x02]);
        let t = text("runtime.procresize", at, &code, &[]);
        assert_eq!(load_test_jl(&t, "runtime.procresize"), vec![x]);
    }

    #[test]
    fn atomic_store_of_a_loaded_length() {
        let at = 0x401000;
        let (x, y) = (0x5d0000u64, 0x5e0008u64);
        // mov rcx, [rip+y]; lea rdx, [rip+x]; xchg [rdx], rcx
        let mut code = vec![0x48, 0x8b, 0x0d];
        code.extend(((y as i64 - (at as i64 + 7)) as i32).to_le_bytes());
        code.extend([0x48, 0x8d, 0x15]);
        code.extend(((x as i64 - (at as i64 + 14)) as i32).to_le_bytes());
        code.extend([0x48, 0x87, 0x0a]);
        let t = text("runtime.allgadd", at, &code, &[]);
        assert_eq!(atomic_store_of_load(&t, "runtime.allgadd"), vec![(x, y)]);
        assert_eq!(allgs_from_code(&t), Some(y - 8));
    }

    #[test]
    fn rules_must_agree_and_fit() {
        assert_eq!(agreed(vec![8, 8], "x"), Ok(8));
        assert_eq!(agreed(vec![], "x"), Err(GlobalError::NotFound("x")));
        assert_eq!(agreed(vec![16, 8], "x"), Err(GlobalError::Disagree(8, 16)));
        let o = crate::layout::from_table(&crate::GoVersion::parse("go1.27.3").unwrap()).unwrap();
        let s = DataSections {
            bss: 0x1000..0x8000,
            noptrbss: 0x8000..0x10000,
        };
        assert_eq!(placed(Global::Sched, 0x1000, &o, &s), Ok(0x1000));
        assert!(matches!(
            placed(Global::Sched, 0x8000, &o, &s),
            Err(GlobalError::OutsideSection {
                section: ".bss",
                ..
            })
        ));
        // In the section, but running past its end.
        assert!(matches!(
            placed(Global::GcController, 0xfff0, &o, &s),
            Err(GlobalError::OutsideSection { .. })
        ));
        assert!(matches!(
            placed(Global::Memstats, 0x8004, &o, &s),
            Err(GlobalError::Misaligned { .. })
        ));
        assert_eq!(placed(Global::Gomaxprocs, 0x8004, &o, &s), Ok(0x8004));
    }
}
