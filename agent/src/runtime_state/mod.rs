//! The Go runtime's own state, read from a process's memory whenever
//! metrics are collected (`process_vm_readv`; no probe, nothing the program
//! pays for): heap goal, memory limit, GOGC, live heap, allocations, memory
//! used, GC cycles, GC CPU, goroutines, GOMAXPROCS and scheduling latency,
//! computed as the runtime computes `runtime/metrics` from the same fields.
//!
//! Where the state is comes from the executable ([`crate::inspect::layout`],
//! [`crate::inspect::globals`]). A collection reads it in three system
//! calls (the fixed pieces, then `allp`'s array, then each P's free list),
//! about 6 KB. Each value is checked against what the runtime guarantees
//! (the heap minimum follows GOGC, `work.cycles` is `numgc` or one more,
//! GOMAXPROCS is `len(allp)`, ...): a value whose global is missing, or
//! whose checks fail three reads running, is absent ([`Fault`]), never a
//! number that is not the runtime's.
pub mod latency;

use std::io;

use crate::{
    inspect::{Global, GoBinary, RuntimeOffsets, layout::FreeGs},
    procfs,
};

pub use latency::COUNTS as LATENCY_COUNTS;

/// Reads of a process before a value whose checks keep failing is given
/// up for this collection: the runtime writes the fields one at a time, so
/// a read now and then catches it halfway.
const ATTEMPTS: usize = 3;

/// The most Ps a Go program can have (`_MaxGomaxprocs`).
const MAX_PROCS: u64 = 1 << 10;

/// The heap minimum at GOGC=100 (`defaultHeapMinimum`), and under
/// `GOEXPERIMENT=heapminimum512kib`.
const HEAP_MINIMUM: u64 = 4 << 20;
const HEAP_MINIMUM_512K: u64 = 512 << 10;

/// The memory-limit heap goal's headroom (`memoryLimitHeapGoalHeadroomPercent`,
/// `memoryLimitMinHeapGoalHeadroom`) and the least distance of the goal past
/// the trigger (`minRunway`): the same in Go 1.21 to 1.27.
const LIMIT_HEADROOM_PERCENT: u64 = 3;
const LIMIT_MIN_HEADROOM: u64 = 1 << 20;
const MIN_RUNWAY: u64 = 64 << 10;

/// Two copies of the heap-stats ring whose allocation counts differ by
/// more than this fraction are taken as torn (read while the runtime
/// merged its slots) and read again.
const RING_TOLERANCE: f64 = 1e-3;

/// Why a value is absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A global it needs is not known in this executable (logged once
    /// when the executable was read).
    Missing(Global),
    /// The process's memory could not be read (it may be exiting).
    Read(String),
    /// What was read fails a check the runtime guarantees: not its state
    /// as the agent knows it.
    Check(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Missing(g) => write!(f, "{g} was not found in the executable"),
            Fault::Read(e) => write!(f, "reading the process's memory failed: {e}"),
            Fault::Check(why) => f.write_str(why),
        }
    }
}

/// What of one executable's runtime state can be read: its offsets and
/// where its globals are (link-time addresses).
#[derive(Clone, Debug)]
pub struct Layout {
    offsets: RuntimeOffsets,
    globals: [Option<u64>; Global::ALL.len()],
    allgs: Option<u64>,
    /// Go 1.26+: `/sched/goroutines` counts the runtime's own goroutines.
    counts_system: bool,
    heap_minimum: u64,
}

impl Layout {
    /// What of `bin`'s runtime state can be read; an error when nothing
    /// can (its struct offsets are unknown).
    pub fn of(bin: &GoBinary) -> Result<Self, String> {
        let offsets = bin.runtime.offsets.clone()?;
        let mut globals = [None; Global::ALL.len()];
        for (slot, &g) in globals.iter_mut().zip(&Global::ALL) {
            *slot = bin.runtime.globals.get(g).ok();
        }
        let small_heap = bin
            .version
            .experiments
            .iter()
            .any(|x| x == "heapminimum512kib");
        Ok(Self {
            offsets,
            globals,
            allgs: bin.runtime.globals.allgs,
            counts_system: bin.version.at_least(26),
            heap_minimum: if small_heap {
                HEAP_MINIMUM_512K
            } else {
                HEAP_MINIMUM
            },
        })
    }

    fn global(&self, g: Global) -> Option<u64> {
        self.globals[g as usize]
    }
}

/// Values from `gcController`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcValues {
    /// GOGC; -1 when off.
    pub gogc: i32,
    /// `None` when no limit is set (`math.MaxInt64`).
    pub memory_limit: Option<i64>,
    pub heap_goal: u64,
    pub heap_live: u64,
    /// Bytes allocated since the process started.
    pub allocated: u64,
}

/// Values from `memstats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemValues {
    pub gc_cycles: u32,
    /// Heap allocations since the process started.
    pub allocations: u64,
    /// `/memory/classes/total - /memory/classes/heap/released`.
    pub used: u64,
    /// `/memory/classes/heap/stacks + /memory/classes/os-stacks`.
    pub used_stack: u64,
}

/// `work.cpuStats`, in seconds (the runtime's estimate as of the end of
/// the last GC cycle).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuValues {
    pub user: f64,
    pub gc: f64,
    pub scavenge: f64,
    pub idle: f64,
}

/// Goroutines, as `/sched/goroutines` counts them, and the runtime's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Goroutines {
    pub count: u64,
    pub system: u64,
}

/// One collection's reading of a process: each value or why it is absent.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub gc: Result<GcValues, Fault>,
    pub memory: Result<MemValues, Fault>,
    pub cpu: Result<CpuValues, Fault>,
    pub goroutines: Result<Goroutines, Fault>,
    pub gomaxprocs: Result<u32, Fault>,
    /// `/sched/latencies:seconds`' counts ([`latency`]).
    pub latency: Result<Box<[u64; LATENCY_COUNTS]>, Fault>,
}

impl Reading {
    fn failed(f: Fault) -> Self {
        Self {
            gc: Err(f.clone()),
            memory: Err(f.clone()),
            cpu: Err(f.clone()),
            goroutines: Err(f.clone()),
            gomaxprocs: Err(f.clone()),
            latency: Err(f),
        }
    }

    /// Keeps each value already read right; takes `other`'s otherwise.
    /// Whether every value is now read right or cannot be by reading again
    /// (only a failed check can pass on a second read: the runtime was
    /// caught between two writes).
    fn merge(&mut self, other: Reading) -> bool {
        fn keep<T>(a: &mut Result<T, Fault>, b: Result<T, Fault>) -> bool {
            if a.is_err() {
                *a = b;
            }
            !matches!(a, Err(Fault::Check(_)))
        }
        // Every one, not stopping at the first still failing.
        [
            keep(&mut self.gc, other.gc),
            keep(&mut self.memory, other.memory),
            keep(&mut self.cpu, other.cpu),
            keep(&mut self.goroutines, other.goroutines),
            keep(&mut self.gomaxprocs, other.gomaxprocs),
            keep(&mut self.latency, other.latency),
        ]
        .iter()
        .all(|&settled| settled)
    }
}

/// Where a process's memory is read from: the process (tests use a fake).
pub trait Memory {
    /// Fills each buffer from its address, all or nothing.
    fn read(&self, pieces: &mut [(u64, &mut [u8])]) -> io::Result<()>;
}

/// A process's memory.
pub struct Process(pub u32);

impl Memory for Process {
    fn read(&self, pieces: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        procfs::read_pieces(self.0, pieces)
    }
}

/// The fixed pieces of one read, in the order of [`Reader::pieces`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    /// `gcController`, whole.
    Gc,
    /// `memstats` from the heap-stats ring to the last `*_sys` field.
    Mem,
    /// The ring again, right after: a copy torn by the runtime's own
    /// merging of its slots shows as a difference.
    Ring,
    /// `memstats.numgc`, `numforcedgc`.
    Cycles,
    /// `work.cycles`, `stwprocs`, `maxprocs`.
    Work,
    /// `work.cpuStats`' four classes.
    Cpu,
    /// `sched` from `ngsys` to the end of `timeToRun`.
    Sched,
    Allp,
    Allglen,
    /// `allgs`' length.
    AllgsLen,
    Gomaxprocs,
}

/// One piece: where it is (link-time; the load bias is added at read),
/// where it starts in its struct, how long, and where it goes in the
/// scratch buffer.
#[derive(Clone, Copy, Debug)]
struct Span {
    piece: Piece,
    addr: u64,
    start: u64,
    len: usize,
    at: usize,
}

/// The buffer reads land in, shared by every process a collector reads
/// (one process at a time): about 10 KB, not 10 KB a process.
#[derive(Default)]
pub struct Scratch(Vec<u8>);

/// `[min, max + size)` of some fields, relative to their struct.
fn range(fields: &[u16], size: usize) -> (u64, usize) {
    let lo = fields.iter().copied().min().unwrap_or(0);
    let hi = fields.iter().copied().max().unwrap_or(0);
    (u64::from(lo), usize::from(hi - lo) + size)
}

/// Reads one process's runtime state; keeps what is needed between
/// collections (the last latency counts).
pub struct Reader {
    layout: std::sync::Arc<Layout>,
    bias: u64,
    spans: Vec<Span>,
    /// The pieces' bytes in all.
    total: usize,
    /// Latency counts at the last reading, to check they only grow.
    last_latency: Option<Box<[u64; LATENCY_COUNTS]>>,
}

impl Reader {
    /// A reader for a process of `layout`'s executable loaded at `bias`.
    pub fn new(layout: std::sync::Arc<Layout>, bias: u64) -> Self {
        let o = &layout.offsets;
        let mut spans = Vec::new();
        let mut total = 0;
        let mut add = |piece: Piece, global: Option<u64>, (start, len): (u64, usize)| {
            if let Some(base) = global {
                spans.push(Span {
                    piece,
                    addr: base.wrapping_add(start),
                    start,
                    len,
                    at: total,
                });
                total += len;
            }
        };
        let gc = layout.global(Global::GcController);
        let mem = layout.global(Global::Memstats);
        let work = layout.global(Global::Work);
        let sched = layout.global(Global::Sched);
        add(Piece::Gc, gc, (0, usize::from(o.gc_controller_size)));
        add(
            Piece::Mem,
            mem,
            range(
                &[
                    o.heap_stats,
                    o.heap_stats_gen,
                    o.stacks_sys,
                    o.mspan_sys,
                    o.mcache_sys,
                    o.buckhash_sys,
                    o.gc_misc_sys,
                    o.other_sys,
                ],
                8,
            ),
        );
        add(
            Piece::Ring,
            mem,
            (u64::from(o.heap_stats), 3 * usize::from(o.delta_size)),
        );
        add(Piece::Cycles, mem, range(&[o.numgc, o.numforcedgc], 4));
        add(
            Piece::Work,
            work,
            range(&[o.work_cycles, o.work_stwprocs, o.work_maxprocs], 4),
        );
        add(
            Piece::Cpu,
            work,
            range(
                &[
                    o.work_cpu_gc_total,
                    o.work_cpu_scavenge_total,
                    o.work_cpu_idle,
                    o.work_cpu_user,
                ],
                8,
            ),
        );
        let mut sched_fields = vec![o.sched_ngsys, o.sched_time_to_run];
        match o.sched_free {
            FreeGs::Counted { sched_n } => sched_fields.push(sched_n),
            FreeGs::Split {
                sched_stack,
                sched_no_stack,
            } => sched_fields.extend([sched_stack, sched_no_stack]),
        }
        let (start, _) = range(&sched_fields, 0);
        let end = u64::from(o.sched_time_to_run) + u64::from(o.hist_overflow) + 8;
        add(
            Piece::Sched,
            sched,
            (start, usize::try_from(end - start).unwrap_or(0)),
        );
        add(Piece::Allp, layout.global(Global::Allp), (0, 24));
        add(Piece::Allglen, layout.global(Global::Allglen), (0, 8));
        add(Piece::AllgsLen, layout.allgs, (8, 8));
        add(Piece::Gomaxprocs, layout.global(Global::Gomaxprocs), (0, 4));
        Self {
            layout,
            bias,
            spans,
            total,
            last_latency: None,
        }
    }

    /// Reads the process's state now.
    pub fn read(&mut self, mem: &impl Memory, scratch: &mut Scratch) -> Reading {
        if scratch.0.len() < self.total {
            scratch.0.resize(self.total, 0);
        }
        let buf = &mut scratch.0[..self.total];
        let mut reading = self.read_once(mem, buf);
        for _ in 1..ATTEMPTS {
            if reading.merge(self.read_once(mem, buf)) {
                break;
            }
        }
        // Counts that went down are not the runtime's histogram.
        if let Ok(now) = &reading.latency {
            if let Some(before) = &self.last_latency
                && latency::new_since(before, now).is_none()
            {
                reading.latency = Err(Fault::Check(
                    "a count of sched.timeToRun went down".to_owned(),
                ));
            } else {
                self.last_latency = Some(now.clone());
            }
        }
        reading
    }

    /// The latency counts of the last reading that had them (the baseline
    /// for the next one's new observations).
    pub fn last_latency(&self) -> Option<&[u64; LATENCY_COUNTS]> {
        self.last_latency.as_deref()
    }

    fn read_once(&self, mem: &impl Memory, buf: &mut [u8]) -> Reading {
        let bias = self.bias;
        // The spans lie one after another in `buf`, in order.
        let mut pieces: Vec<(u64, &mut [u8])> = Vec::with_capacity(self.spans.len());
        let mut rest = &mut buf[..];
        for s in &self.spans {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(s.len);
            pieces.push((s.addr.wrapping_add(bias), piece));
            rest = tail;
        }
        if let Err(e) = mem.read(&mut pieces) {
            return Reading::failed(Fault::Read(e.to_string()));
        }
        drop(pieces);
        let view = View {
            spans: &self.spans,
            buf,
        };
        let o = &self.layout.offsets;
        let missing = |g: Global| Fault::Missing(g);
        let gc = view
            .get(Piece::Gc)
            .ok_or(missing(Global::GcController))
            .and_then(|b| gc_values(o, b, self.layout.heap_minimum));
        let memory = match (
            view.get(Piece::Mem),
            view.get(Piece::Ring),
            view.get(Piece::Cycles),
        ) {
            (Some(m), Some(r), Some(c)) => mem_values(o, m, r, c, view.get(Piece::Work)),
            _ => Err(missing(Global::Memstats)),
        };
        let cpu = view
            .get(Piece::Cpu)
            .ok_or(missing(Global::Work))
            .and_then(|b| cpu_values(o, b));
        let procs = self.procs(mem, &view);
        let gomaxprocs = match (&procs, view.get(Piece::Gomaxprocs)) {
            (_, None) => Err(missing(Global::Gomaxprocs)),
            (Err(f), _) => Err(f.clone()),
            (Ok(ps), Some(b)) => {
                let n = b.i32(0);
                // procresize changes both; outside it they agree.
                if n >= 1 && n as usize == ps.len() {
                    Ok(n as u32)
                } else {
                    Err(Fault::Check(format!(
                        "gomaxprocs is {n} but len(allp) is {}",
                        ps.len()
                    )))
                }
            }
        };
        let goroutines = match (view.get(Piece::Sched), view.get(Piece::Allglen), procs) {
            (None, _, _) => Err(missing(Global::Sched)),
            (_, None, _) => Err(missing(Global::Allglen)),
            (_, _, Err(f)) => Err(f),
            (Some(s), Some(a), Ok(ps)) => {
                let allgs_len = view.get(Piece::AllgsLen).map(|b| b.u64(8));
                self.goroutines(s, a.u64(0), allgs_len, mem, &ps)
            }
        };
        let latency = view
            .get(Piece::Sched)
            .ok_or(missing(Global::Sched))
            .map(|s| latency_counts(o, s));
        Reading {
            gc,
            memory,
            cpu,
            goroutines,
            gomaxprocs,
            latency,
        }
    }

    /// The Ps (`allp`'s pointers), read through the slice header.
    fn procs(&self, mem: &impl Memory, view: &View<'_>) -> Result<Vec<u64>, Fault> {
        let header = view.get(Piece::Allp).ok_or(Fault::Missing(Global::Allp))?;
        let (ptr, len) = (header.u64(0), header.u64(8));
        if !(1..=MAX_PROCS).contains(&len) || ptr == 0 || !ptr.is_multiple_of(8) {
            return Err(Fault::Check(format!(
                "allp is {len} Ps at {ptr:#x}: no slice the runtime makes"
            )));
        }
        let mut buf = vec![0u8; len as usize * 8];
        mem.read(&mut [(ptr, &mut buf[..])])
            .map_err(|e| Fault::Read(e.to_string()))?;
        let ps: Vec<u64> = buf
            .chunks_exact(8)
            .map(|c| c.try_into().map_or(0, u64::from_le_bytes))
            .collect();
        if ps.iter().any(|&p| p == 0 || !p.is_multiple_of(8)) {
            return Err(Fault::Check("allp holds a pointer no P has".to_owned()));
        }
        Ok(ps)
    }

    /// `gcount`, as `/sched/goroutines` calls it in this release.
    fn goroutines(
        &self,
        sched: Part<'_>,
        allglen: u64,
        allgs_len: Option<u64>,
        mem: &impl Memory,
        ps: &[u64],
    ) -> Result<Goroutines, Fault> {
        let o = &self.layout.offsets;
        let field = |off: u16| sched.i32(off);
        if allgs_len.is_some_and(|n| n != allglen) {
            return Err(Fault::Check(format!(
                "allglen is {allglen} but len(allgs) is {allgs_len:?}"
            )));
        }
        let mut counts = vec![[0u8; 4]; ps.len()];
        let off = u64::from(o.p_free_count);
        let mut pieces: Vec<(u64, &mut [u8])> = ps
            .iter()
            .zip(counts.iter_mut())
            .map(|(&p, c)| (p.wrapping_add(off), &mut c[..]))
            .collect();
        mem.read(&mut pieces)
            .map_err(|e| Fault::Read(e.to_string()))?;
        let system = field(o.sched_ngsys);
        // int32 arithmetic, as the runtime's.
        let mut n = allglen as i32;
        n = match o.sched_free {
            FreeGs::Counted { sched_n } => n.wrapping_sub(field(sched_n)),
            FreeGs::Split {
                sched_stack,
                sched_no_stack,
            } => n
                .wrapping_sub(field(sched_stack))
                .wrapping_sub(field(sched_no_stack)),
        };
        if !self.layout.counts_system {
            n = n.wrapping_sub(system);
        }
        for c in &counts {
            n = n.wrapping_sub(i32::from_le_bytes(*c));
        }
        // The runtime clamps to 1 what a torn read gives; a count this low
        // is one.
        if n < 1 || system < 0 || allglen == 0 {
            return Err(Fault::Check(format!(
                "goroutine count {n} from allglen {allglen} and ngsys {system}"
            )));
        }
        Ok(Goroutines {
            count: n as u64,
            system: system as u64,
        })
    }
}

/// What one read put in the scratch buffer, by piece.
struct View<'a> {
    spans: &'a [Span],
    buf: &'a [u8],
}

impl View<'_> {
    fn get(&self, piece: Piece) -> Option<Part<'_>> {
        let s = self.spans.iter().find(|s| s.piece == piece)?;
        Some(Part {
            start: s.start as usize,
            bytes: self.buf.get(s.at..s.at + s.len)?,
        })
    }
}

/// A piece as read: its bytes, and where they start in their struct, so
/// fields are read by their offsets in the struct. (Pieces are planned
/// from the same offsets, so every field read lies inside its piece.)
#[derive(Clone, Copy)]
struct Part<'a> {
    start: usize,
    bytes: &'a [u8],
}

impl<'a> Part<'a> {
    fn slice(&self, off: u16, len: usize) -> &'a [u8] {
        let at = usize::from(off).wrapping_sub(self.start);
        self.bytes
            .get(at..at.saturating_add(len))
            .unwrap_or_default()
    }
    fn u64(&self, off: u16) -> u64 {
        self.slice(off, 8).try_into().map_or(0, u64::from_le_bytes)
    }
    fn i64(&self, off: u16) -> i64 {
        self.u64(off) as i64
    }
    fn u32(&self, off: u16) -> u32 {
        self.slice(off, 4).try_into().map_or(0, u32::from_le_bytes)
    }
    fn i32(&self, off: u16) -> i32 {
        self.u32(off) as i32
    }
}

/// The fields of `gcControllerState` the values come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GcController {
    gc_percent: i32,
    memory_limit: i64,
    heap_minimum: u64,
    gc_percent_heap_goal: u64,
    sweep_dist_min_trigger: u64,
    triggered: u64,
    heap_marked: u64,
    heap_free: u64,
    total_alloc: u64,
    total_free: u64,
    mapped_ready: u64,
}

impl GcController {
    fn parse(o: &RuntimeOffsets, b: Part<'_>) -> Self {
        let u = |off: u16| b.u64(off);
        Self {
            gc_percent: b.i32(o.gc_percent),
            memory_limit: b.i64(o.memory_limit),
            heap_minimum: u(o.heap_minimum),
            gc_percent_heap_goal: u(o.gc_percent_heap_goal),
            sweep_dist_min_trigger: u(o.sweep_dist_min_trigger),
            triggered: u(o.triggered),
            heap_marked: u(o.heap_marked),
            heap_free: u(o.heap_free),
            total_alloc: u(o.total_alloc),
            total_free: u(o.total_free),
            mapped_ready: u(o.mapped_ready),
        }
    }

    /// `gcControllerState.heapGoal()` (the same code in Go 1.21 to 1.27);
    /// `None` for a torn read (free and allocated heap past what is mapped,
    /// which the runtime itself reads again).
    fn heap_goal(&self) -> Option<u64> {
        let goal = self.gc_percent_heap_goal;
        let limited = self.memory_limit_heap_goal()?;
        if limited < goal {
            return Some(limited);
        }
        let mut goal = goal.max(self.sweep_dist_min_trigger);
        if self.triggered != u64::MAX && goal < self.triggered.wrapping_add(MIN_RUNWAY) {
            goal = self.triggered.wrapping_add(MIN_RUNWAY);
        }
        Some(goal)
    }

    /// `memoryLimitHeapGoal()`, in the runtime's wrapping uint64 arithmetic.
    fn memory_limit_heap_goal(&self) -> Option<u64> {
        let heap_alloc = self.total_alloc.wrapping_sub(self.total_free);
        if self.heap_free.wrapping_add(heap_alloc) > self.mapped_ready {
            return None;
        }
        let limit = self.memory_limit as u64;
        let non_heap = self
            .mapped_ready
            .wrapping_sub(self.heap_free)
            .wrapping_sub(heap_alloc);
        let overage = self.mapped_ready.saturating_sub(limit);
        if non_heap.wrapping_add(overage) >= limit {
            return Some(self.heap_marked);
        }
        let mut goal = limit.wrapping_sub(non_heap.wrapping_add(overage));
        let headroom = (goal / 100 * LIMIT_HEADROOM_PERCENT).max(LIMIT_MIN_HEADROOM);
        if goal < headroom || goal - headroom < headroom {
            goal = headroom;
        } else {
            goal -= headroom;
        }
        Some(goal.max(self.heap_marked))
    }
}

fn gc_values(o: &RuntimeOffsets, b: Part<'_>, heap_minimum: u64) -> Result<GcValues, Fault> {
    let c = GcController::parse(o, b);
    // setGCPercent: heapMinimum = defaultHeapMinimum * uint64(gcPercent) / 100.
    let expected = heap_minimum.wrapping_mul(i64::from(c.gc_percent) as u64) / 100;
    if c.gc_percent < -1 || c.memory_limit < 0 || c.heap_minimum != expected {
        return Err(Fault::Check(format!(
            "gcController: GOGC {}, memory limit {}, heap minimum {} (GOGC gives {expected})",
            c.gc_percent, c.memory_limit, c.heap_minimum
        )));
    }
    let heap_goal = c.heap_goal().ok_or_else(|| {
        Fault::Check("gcController: free and allocated heap exceed mapped memory".to_owned())
    })?;
    Ok(GcValues {
        gogc: c.gc_percent,
        memory_limit: (c.memory_limit != i64::MAX).then_some(c.memory_limit),
        heap_goal,
        heap_live: c.heap_marked,
        allocated: c.total_alloc,
    })
}

/// The heap-stats ring's totals: the sum of its three slots is the running
/// total (`consistentHeapStats`), except while the runtime merges them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ring {
    committed: i64,
    in_stacks: i64,
    allocations: u64,
}

impl Ring {
    /// The totals of the three `heapStatsDelta` slots in `ring`.
    fn parse(o: &RuntimeOffsets, ring: &[u8]) -> Self {
        let mut r = Ring::default();
        for bytes in ring.chunks_exact(usize::from(o.delta_size)).take(3) {
            let slot = Part { start: 0, bytes };
            r.committed = r.committed.wrapping_add(slot.i64(o.delta_committed));
            r.in_stacks = r.in_stacks.wrapping_add(slot.i64(o.delta_in_stacks));
            r.allocations = r
                .allocations
                .wrapping_add(slot.u64(o.delta_large_alloc_count));
            let small = slot.slice(
                o.delta_small_alloc_count,
                8 * crate::inspect::layout::SIZE_CLASSES,
            );
            for c in small.chunks_exact(8) {
                r.allocations = r
                    .allocations
                    .wrapping_add(c.try_into().map_or(0, u64::from_le_bytes));
            }
        }
        r
    }
}

fn mem_values(
    o: &RuntimeOffsets,
    mem: Part<'_>,
    ring: Part<'_>,
    cycles: Part<'_>,
    work: Option<Part<'_>>,
) -> Result<MemValues, Fault> {
    let ring_len = 3 * usize::from(o.delta_size);
    let first = Ring::parse(o, mem.slice(o.heap_stats, ring_len));
    let second = Ring::parse(o, ring.slice(o.heap_stats, ring_len));
    let apart = first.allocations.abs_diff(second.allocations) as f64;
    if apart > RING_TOLERANCE * (second.allocations.max(1) as f64) {
        return Err(Fault::Check(format!(
            "heap stats ring read twice gives {} and {} allocations",
            first.allocations, second.allocations
        )));
    }
    let gen_ = mem.u32(o.heap_stats_gen);
    let numgc = cycles.u32(o.numgc);
    let forced = cycles.u32(o.numforcedgc);
    if gen_ > 2 || forced > numgc {
        return Err(Fault::Check(format!(
            "memstats: heap stats generation {gen_}, {forced} forced of {numgc} GC cycles"
        )));
    }
    if let Some(w) = work {
        let started = w.u32(o.work_cycles);
        let (stw, max) = (w.i32(o.work_stwprocs), w.i32(o.work_maxprocs));
        // work.cycles counts cycles started: the completed ones, or one more.
        let cycles_ok = started == numgc || started == numgc.wrapping_add(1);
        let procs_ok = numgc == 0 || (1 <= stw && stw <= max);
        if !cycles_ok || !procs_ok {
            return Err(Fault::Check(format!(
                "work: {started} cycles started, {numgc} done; {stw} of {max} Ps stopped"
            )));
        }
    }
    if second.committed < 0 || second.in_stacks < 0 {
        return Err(Fault::Check(format!(
            "heap stats: {} bytes committed, {} in stacks",
            second.committed, second.in_stacks
        )));
    }
    let sys = [
        o.stacks_sys,
        o.mspan_sys,
        o.mcache_sys,
        o.buckhash_sys,
        o.gc_misc_sys,
        o.other_sys,
    ]
    .iter()
    .fold(0u64, |s, &f| s.wrapping_add(mem.u64(f)));
    Ok(MemValues {
        gc_cycles: numgc,
        allocations: second.allocations,
        used: (second.committed as u64).wrapping_add(sys),
        used_stack: (second.in_stacks as u64).wrapping_add(mem.u64(o.stacks_sys)),
    })
}

fn cpu_values(o: &RuntimeOffsets, b: Part<'_>) -> Result<CpuValues, Fault> {
    let [gc, scavenge, idle, user] = [
        o.work_cpu_gc_total,
        o.work_cpu_scavenge_total,
        o.work_cpu_idle,
        o.work_cpu_user,
    ]
    .map(|f| b.i64(f));
    if [gc, scavenge, idle, user].iter().any(|&t| t < 0) {
        return Err(Fault::Check(format!(
            "work.cpuStats: user {user} gc {gc} scavenge {scavenge} idle {idle} ns"
        )));
    }
    let s = |t: i64| t as f64 / 1e9;
    Ok(CpuValues {
        user: s(user),
        gc: s(gc),
        scavenge: s(scavenge),
        idle: s(idle),
    })
}

/// `[underflow, counts..., overflow]` of `sched.timeToRun`.
fn latency_counts(o: &RuntimeOffsets, sched: Part<'_>) -> Box<[u64; LATENCY_COUNTS]> {
    let hist = |off: u16| o.sched_time_to_run.saturating_add(off);
    let mut out = Box::new([0u64; LATENCY_COUNTS]);
    out[0] = sched.u64(hist(o.hist_underflow));
    let counts = sched.slice(hist(o.hist_counts), 8 * (LATENCY_COUNTS - 2));
    for (slot, c) in out[1..LATENCY_COUNTS - 1]
        .iter_mut()
        .zip(counts.chunks_exact(8))
    {
        *slot = c.try_into().map_or(0, u64::from_le_bytes);
    }
    out[LATENCY_COUNTS - 1] = sched.u64(hist(o.hist_overflow));
    out
}

#[cfg(test)]
mod tests;
