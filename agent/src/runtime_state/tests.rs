//! The reader on a fake process memory laid out as each release lays out
//! its runtime (the real thing is tested against real processes in
//! `agent/tests/runtime_metrics.rs`).
use std::{cell::Cell, sync::Arc};

use super::*;
use crate::inspect::{GoVersion, layout};

const MIB: u64 = 1 << 20;

/// Where the fake process keeps each global.
const GC: u64 = 0x10_0000;
const MEM: u64 = 0x20_0000;
const WORK: u64 = 0x30_0000;
const SCHED: u64 = 0x40_0000;
const ALLP: u64 = 0x50_0000;
const ALLGLEN: u64 = 0x50_1000;
const ALLGS: u64 = 0x50_2000;
const GOMAXPROCS: u64 = 0x50_3000;
const PS: u64 = 0x60_0000;
const P_SIZE: u64 = 0x1_0000;

/// A process's memory: regions of bytes; a read outside them fails.
#[derive(Default)]
struct Fake {
    regions: Vec<(u64, Vec<u8>)>,
    /// Reads to fail from now on.
    fail: Cell<bool>,
}

impl Fake {
    fn region(&mut self, addr: u64, len: usize) {
        self.regions.push((addr, vec![0; len]));
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let (base, r) = self
            .regions
            .iter_mut()
            .find(|(a, r)| addr >= *a && addr + bytes.len() as u64 <= a + r.len() as u64)
            .unwrap_or_else(|| panic!("no region at {addr:#x}"));
        let at = (addr - *base) as usize;
        r[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn u64(&mut self, addr: u64, v: u64) {
        self.put(addr, &v.to_le_bytes());
    }

    fn u32(&mut self, addr: u64, v: u32) {
        self.put(addr, &v.to_le_bytes());
    }
}

impl Memory for Fake {
    fn read(&self, pieces: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        if self.fail.get() {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        for (addr, buf) in pieces.iter_mut() {
            let (base, r) = self
                .regions
                .iter()
                .find(|(a, r)| *addr >= *a && *addr + buf.len() as u64 <= a + r.len() as u64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let at = (*addr - base) as usize;
            buf.copy_from_slice(&r[at..at + buf.len()]);
        }
        Ok(())
    }
}

fn offsets(version: &str) -> RuntimeOffsets {
    layout::from_table(&GoVersion::parse(version).unwrap()).unwrap()
}

fn layout_of(version: &str) -> Layout {
    let v = GoVersion::parse(version).unwrap();
    let mut globals = [None; Global::ALL.len()];
    for (slot, g) in globals.iter_mut().zip(Global::ALL) {
        *slot = Some(match g {
            Global::GcController => GC,
            Global::Memstats => MEM,
            Global::Work => WORK,
            Global::Sched => SCHED,
            Global::Allp => ALLP,
            Global::Allglen => ALLGLEN,
            Global::Gomaxprocs => GOMAXPROCS,
        });
    }
    Layout {
        offsets: offsets(version),
        globals,
        allgs: Some(ALLGS),
        counts_system: v.at_least(26),
        heap_minimum: HEAP_MINIMUM,
    }
}

/// A quiet process of `version`: GOGC=100, no limit, 2 Ps, 30 goroutine
/// descriptors of which 4 are free, 5 system goroutines, 3 GC cycles.
fn process(version: &str) -> Fake {
    let o = offsets(version);
    let mut m = Fake::default();
    m.region(GC, 4096);
    m.region(MEM, 8192);
    m.region(WORK, 4096);
    m.region(SCHED, 4096);
    for a in [ALLP, ALLGLEN, ALLGS, GOMAXPROCS] {
        m.region(a, 64);
    }
    m.region(PS, 2 * P_SIZE as usize);
    let gc = |f: u16| GC + u64::from(f);
    m.u32(gc(o.gc_percent), 100);
    m.u64(gc(o.memory_limit), i64::MAX as u64);
    m.u64(gc(o.heap_minimum), 4 * MIB);
    m.u64(gc(o.gc_percent_heap_goal), 8 * MIB);
    m.u64(gc(o.triggered), u64::MAX);
    m.u64(gc(o.heap_marked), 4 * MIB);
    m.u64(gc(o.heap_free), MIB);
    m.u64(gc(o.total_alloc), 10 * MIB);
    m.u64(gc(o.total_free), 6 * MIB);
    m.u64(gc(o.mapped_ready), 8 * MIB);
    // The ring: counts spread over the slots, summed by the reader.
    for (slot, (committed, stacks, large, small)) in
        [(6 * MIB, 64 << 10, 3, 100), (MIB, 0, 1, 20), (0, 0, 0, 0)]
            .into_iter()
            .enumerate()
    {
        let base = MEM + u64::from(o.heap_stats) + slot as u64 * u64::from(o.delta_size);
        m.u64(base + u64::from(o.delta_committed), committed);
        m.u64(base + u64::from(o.delta_in_stacks), stacks);
        m.u64(base + u64::from(o.delta_large_alloc_count), large);
        // Small allocations in size classes 1 and 67.
        m.u64(base + u64::from(o.delta_small_alloc_count) + 8, small);
        m.u64(base + u64::from(o.delta_small_alloc_count) + 8 * 67, 1);
    }
    let mem = |f: u16| MEM + u64::from(f);
    m.u32(mem(o.heap_stats_gen), 1);
    for (f, v) in [
        (o.stacks_sys, 256 << 10),
        (o.mspan_sys, 100),
        (o.mcache_sys, 200),
        (o.buckhash_sys, 300),
        (o.gc_misc_sys, 400),
        (o.other_sys, 500),
    ] {
        m.u64(mem(f), v);
    }
    m.u32(mem(o.numgc), 3);
    m.u32(mem(o.numforcedgc), 1);
    let work = |f: u16| WORK + u64::from(f);
    m.u32(work(o.work_cycles), 3);
    m.u32(work(o.work_stwprocs), 2);
    m.u32(work(o.work_maxprocs), 2);
    m.u64(work(o.work_cpu_user), 2_000_000_000);
    m.u64(work(o.work_cpu_gc_total), 500_000_000);
    m.u64(work(o.work_cpu_scavenge_total), 1_000_000);
    m.u64(work(o.work_cpu_idle), 3_000_000_000);
    let sched = |f: u16| SCHED + u64::from(f);
    m.u32(sched(o.sched_ngsys), 5);
    match o.sched_free {
        FreeGs::Counted { sched_n } => m.u32(sched(sched_n), 3),
        FreeGs::Split {
            sched_stack,
            sched_no_stack,
        } => {
            m.u32(sched(sched_stack), 2);
            m.u32(sched(sched_no_stack), 1);
        }
    }
    let hist = SCHED + u64::from(o.sched_time_to_run);
    m.u64(hist + u64::from(o.hist_counts) + 8 * 20, 40); // 1280-1536 ns
    m.u64(hist + u64::from(o.hist_overflow), 1);
    m.u64(ALLP, PS);
    m.u64(ALLP + 8, 2);
    m.u64(ALLP + 16, 2);
    m.u64(PS, PS + P_SIZE);
    m.u64(PS + 8, PS + P_SIZE + 0x100);
    // Ps at PS+P_SIZE and PS+P_SIZE+0x100 hold one free descriptor in all.
    m.u32(PS + P_SIZE + u64::from(o.p_free_count), 1);
    m.u64(ALLGLEN, 30);
    m.u64(ALLGS + 8, 30);
    m.u32(GOMAXPROCS, 2);
    m
}

fn reader(version: &str) -> Reader {
    Reader::new(Arc::new(layout_of(version)), 0)
}

#[test]
fn reads_every_value_as_the_runtime_computes_it() {
    for version in ["go1.21.13", "go1.24.11", "go1.25.5", "go1.26.6", "go1.27.3"] {
        let mem = process(version);
        let r = reader(version).read(&mem, &mut Scratch::default());
        assert_eq!(
            r.gc,
            Ok(GcValues {
                gogc: 100,
                memory_limit: None,
                heap_goal: 8 * MIB,
                heap_live: 4 * MIB,
                allocated: 10 * MIB,
            }),
            "{version}"
        );
        let o = offsets(version);
        assert_eq!(
            r.memory,
            Ok(MemValues {
                gc_cycles: 3,
                allocations: (3 + 100 + 1) + (1 + 20 + 1) + 1,
                used: 7 * MIB + (256 << 10) + 1500,
                used_stack: (64 << 10) + (256 << 10),
            }),
            "{version} {o:?}"
        );
        assert_eq!(
            r.cpu,
            Ok(CpuValues {
                user: 2.0,
                gc: 0.5,
                scavenge: 0.001,
                idle: 3.0
            })
        );
        // 30 descriptors, 3 free in sched, 1 in a P; the 5 system ones
        // counted from Go 1.26 on.
        let count = if version >= "go1.26" { 26 } else { 21 };
        assert_eq!(
            r.goroutines,
            Ok(Goroutines { count, system: 5 }),
            "{version}"
        );
        assert_eq!(r.gomaxprocs, Ok(2));
        let lat = r.latency.unwrap();
        assert_eq!((lat[21], lat[LATENCY_COUNTS - 1]), (40, 1));
        assert_eq!(lat.iter().sum::<u64>(), 41);
    }
}

/// The three ways the heap goal ends up: GOGC's (raised to the sweep
/// distance, or to the trigger's runway), the memory limit's, or the live
/// heap when everything else already exceeds the limit.
#[test]
fn heap_goal_branches() {
    let base = GcController {
        gc_percent: 100,
        memory_limit: i64::MAX,
        heap_minimum: 4 * MIB,
        gc_percent_heap_goal: 8 * MIB,
        sweep_dist_min_trigger: 0,
        triggered: u64::MAX,
        heap_marked: 4 * MIB,
        heap_free: MIB,
        total_alloc: 10 * MIB,
        total_free: 6 * MIB,
        mapped_ready: 8 * MIB,
    };
    assert_eq!(base.heap_goal(), Some(8 * MIB));
    let sweep = GcController {
        sweep_dist_min_trigger: 9 * MIB,
        ..base
    };
    assert_eq!(sweep.heap_goal(), Some(9 * MIB));
    let runway = GcController {
        triggered: 8 * MIB - 1000,
        ..base
    };
    assert_eq!(runway.heap_goal(), Some(8 * MIB - 1000 + (64 << 10)));
    // 64 MiB limit, 8 MiB mapped of which 4 MiB heap and 1 MiB free:
    // 3 MiB non-heap, goal 61 MiB less 3% headroom (integer division first).
    let limited = GcController {
        memory_limit: 64 << 20,
        gc_percent_heap_goal: 100 * MIB,
        ..base
    };
    let g = 61 * MIB;
    assert_eq!(limited.heap_goal(), Some(g - g / 100 * 3));
    // Small limit: at least 1 MiB of headroom; what is left below that is
    // the headroom itself.
    let small = GcController {
        memory_limit: (2 * MIB + MIB / 4) as i64,
        gc_percent_heap_goal: 100 * MIB,
        heap_marked: MIB / 2,
        mapped_ready: 2 * MIB,
        heap_free: 0,
        total_alloc: MIB + MIB / 2,
        total_free: 0,
        ..base
    };
    assert_eq!(small.heap_goal(), Some(MIB));
    // Never below the live heap.
    let live = GcController {
        heap_marked: 3 * MIB,
        ..small
    };
    assert_eq!(live.heap_goal(), Some(3 * MIB));
    // Non-heap memory (and what is mapped past the limit) already past the
    // limit: the live heap.
    let over = GcController {
        memory_limit: (3 * MIB) as i64,
        ..base
    };
    assert_eq!(over.heap_goal(), Some(4 * MIB));
    // GOGC=off and no limit: the limit's goal from MaxInt64.
    let off = GcController {
        gc_percent: -1,
        gc_percent_heap_goal: u64::MAX,
        ..base
    };
    let g = i64::MAX as u64 - 3 * MIB;
    assert_eq!(off.heap_goal(), Some(g - g / 100 * 3));
    // Torn: free and allocated heap past mapped memory.
    let torn = GcController {
        heap_free: 5 * MIB,
        ..base
    };
    assert_eq!(torn.heap_goal(), None);
}

#[test]
fn checks_keep_foreign_numbers_out() {
    let version = "go1.27.3";
    let o = offsets(version);
    // A heap minimum GOGC does not give: not gcController as we know it.
    let mut mem = process(version);
    mem.u64(GC + u64::from(o.heap_minimum), 123);
    let r = reader(version).read(&mem, &mut Scratch::default());
    assert!(matches!(r.gc, Err(Fault::Check(_))), "{:?}", r.gc);
    assert!(r.memory.is_ok() && r.goroutines.is_ok());
    // GOGC=off: the heap minimum wraps as the runtime's uint64 does.
    let mut mem = process(version);
    mem.u32(GC + u64::from(o.gc_percent), u32::MAX);
    mem.u64(
        GC + u64::from(o.heap_minimum),
        (4 * MIB).wrapping_mul(u64::MAX) / 100,
    );
    assert_eq!(
        reader(version)
            .read(&mem, &mut Scratch::default())
            .gc
            .unwrap()
            .gogc,
        -1
    );
    // GOMAXPROCS is not len(allp) (procresize caught halfway, three times).
    let mut mem = process(version);
    mem.u32(GOMAXPROCS, 3);
    let r = reader(version).read(&mem, &mut Scratch::default());
    assert!(matches!(r.gomaxprocs, Err(Fault::Check(_))));
    // More cycles completed than started.
    let mut mem = process(version);
    mem.u32(WORK + u64::from(o.work_cycles), 1);
    assert!(matches!(
        reader(version).read(&mem, &mut Scratch::default()).memory,
        Err(Fault::Check(_))
    ));
    // The two copies of the ring disagree: caught mid-merge.
    struct Torn(Fake, Cell<u32>);
    impl Memory for Torn {
        fn read(&self, pieces: &mut [(u64, &mut [u8])]) -> io::Result<()> {
            self.0.read(pieces)?;
            // The ring's second copy is the third piece of the first read.
            if pieces.len() > 3 {
                let n = self.1.get() + 1;
                self.1.set(n);
                pieces[2].1[..8].copy_from_slice(&(7 * MIB * u64::from(n)).to_le_bytes());
                pieces[2].1[64..72].copy_from_slice(&(1u64 << 40).to_le_bytes());
            }
            Ok(())
        }
    }
    let torn = Torn(process(version), Cell::new(0));
    let r = reader(version).read(&torn, &mut Scratch::default());
    assert!(matches!(r.memory, Err(Fault::Check(_))), "{:?}", r.memory);
    assert_eq!(torn.1.get(), 3, "read three times before giving up");
    assert!(r.gc.is_ok());
    // allglen and len(allgs) disagree.
    let mut mem = process(version);
    mem.u64(ALLGS + 8, 31);
    assert!(matches!(
        reader(version)
            .read(&mem, &mut Scratch::default())
            .goroutines,
        Err(Fault::Check(_))
    ));
}

#[test]
fn missing_globals_and_failed_reads() {
    let version = "go1.26.6";
    let mut layout = layout_of(version);
    layout.globals[Global::Work as usize] = None;
    layout.globals[Global::Allp as usize] = None;
    let mut r = Reader::new(Arc::new(layout), 0);
    let mem = process(version);
    let got = r.read(&mem, &mut Scratch::default());
    assert_eq!(got.cpu, Err(Fault::Missing(Global::Work)));
    assert_eq!(got.goroutines, Err(Fault::Missing(Global::Allp)));
    assert_eq!(got.gomaxprocs, Err(Fault::Missing(Global::Allp)));
    // Without work, the memory values stand on memstats' own checks.
    assert!(got.memory.is_ok() && got.gc.is_ok() && got.latency.is_ok());
    mem.fail.set(true);
    let got = r.read(&mem, &mut Scratch::default());
    assert!(matches!(got.gc, Err(Fault::Read(_))));
    assert!(matches!(got.latency, Err(Fault::Read(_))));
}

#[test]
fn load_bias_moves_every_piece() {
    let version = "go1.23.9";
    let mem = process(version);
    let mut layout = layout_of(version);
    for g in layout.globals.iter_mut().flatten() {
        *g -= 0x1000;
    }
    layout.allgs = layout.allgs.map(|a| a - 0x1000);
    let r = Reader::new(Arc::new(layout), 0x1000).read(&mem, &mut Scratch::default());
    assert_eq!(r.gomaxprocs, Ok(2));
    assert_eq!(r.gc.unwrap().heap_goal, 8 * MIB);
}

#[test]
fn latency_counts_only_grow() {
    let version = "go1.27.3";
    let o = offsets(version);
    let count = SCHED + u64::from(o.sched_time_to_run) + u64::from(o.hist_counts) + 8 * 20;
    let mut mem = process(version);
    let mut r = reader(version);
    assert!(r.read(&mem, &mut Scratch::default()).latency.is_ok());
    mem.u64(count, 45);
    assert_eq!(
        r.read(&mem, &mut Scratch::default()).latency.unwrap()[21],
        45
    );
    assert_eq!(r.last_latency().unwrap()[21], 45);
    mem.u64(count, 44);
    assert!(matches!(
        r.read(&mem, &mut Scratch::default()).latency,
        Err(Fault::Check(_))
    ));
    // The baseline stays the last good reading.
    assert_eq!(r.last_latency().unwrap()[21], 45);
}
