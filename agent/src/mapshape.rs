//! How full a map is, read from the target's memory when metrics are
//! collected: entries, capacity, overflow buckets (classic) and tables
//! (swiss).
//!
//! An address is no lasting identity for a map. Maps are freed and their
//! memory reused, and a map the compiler proved does not escape has its
//! header in its function's stack frame: once that returns (or the stack is
//! copied to grow), later frames overwrite the header piecemeal, often
//! leaving the seed and clobbering the rest (a heap pointer spilled where
//! `count` was). So a shape is published only when the seed matches and the
//! whole header (and, swiss, its directory and tables) is one the runtime
//! could have made; anything else is a map that is gone.
use std::io;

use crate::{inspect::MapOffsets, procfs};

/// Most directory slots a swiss map is walked through (2^16 slots is a map
/// of tens of millions of entries).
const MAX_DIR_LEN: u64 = 1 << 16;

/// Largest header or table struct read (both are 32-48 bytes in every
/// release); bounds what offsets from an odd binary's DWARF can ask for.
const MAX_STRUCT: usize = 256;

/// Reads of one map before an inconsistent one is given up on: a map being
/// written is caught mid-change now and then, never three times running.
const ATTEMPTS: usize = 3;

/// Classic: log2 of the bucket count is below this, since 2^B buckets of
/// at least 16 bytes must fit in a 48-bit address space.
const MAX_CLASSIC_B: u8 = 44;

/// Classic `hmap.flags` bits (`iterator`, `oldIterator`, `hashWriting`,
/// `sameSizeGrow`; the same in every release with classic maps).
const CLASSIC_FLAGS: u8 = 0x0f;
const SAME_SIZE_GROW: u8 = 0x08;

/// Swiss: slots in a group (a small map is one group), and the capacity
/// bounds of one table (`abi.MapGroupSlots`, `maxTableCapacity`).
const GROUP_SLOTS: u64 = 8;
const MAX_TABLE_CAPACITY: u64 = 1024;

/// A map's shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub entries: u64,
    /// Slots: classic 8·2^B; swiss the summed capacity of its distinct
    /// tables, or 8 for a small map.
    pub capacity: u64,
    /// Classic only: overflow buckets (approximate in Go for B >= 16).
    pub overflow: Option<u64>,
    /// Swiss only: distinct tables (0 for a small map).
    pub tables: Option<u64>,
}

impl Shape {
    pub fn load_factor(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 / self.capacity as f64
        }
    }
}

/// Where map memory is read from: the process (tests use a fake).
trait Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
}

struct Process(u32);

impl Memory for Process {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        procfs::read_mem(self.0, addr, buf)
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Little-endian fields of a struct read in one piece; an offset past it is
/// an error (offsets from DWARF that do not fit the struct's size).
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn get<const N: usize>(&self, off: u16) -> io::Result<[u8; N]> {
        let at = usize::from(off);
        self.0
            .get(at..at + N)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("field offset past the struct"))
    }
    fn u64(&self, off: u16) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.get(off)?))
    }
    fn u32(&self, off: u16) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.get(off)?))
    }
    fn u16(&self, off: u16) -> io::Result<u16> {
        Ok(u16::from_le_bytes(self.get(off)?))
    }
    fn u8(&self, off: u16) -> io::Result<u8> {
        Ok(self.get::<1>(off)?[0])
    }
}

/// Reads a struct of `size` bytes at `addr` in one read, so its fields are
/// from one moment (near enough: the runtime writes them one by one).
fn read_struct<'b>(
    mem: &impl Memory,
    addr: u64,
    size: u16,
    buf: &'b mut [u8; MAX_STRUCT],
) -> io::Result<&'b [u8]> {
    let b = buf
        .get_mut(..usize::from(size))
        .ok_or_else(|| bad("struct larger than expected"))?;
    mem.read(addr, b)?;
    Ok(b)
}

/// A pointer field the runtime could have written: nil, or 8-aligned in
/// user space (no 64-bit Linux gives it more than 56 bits).
fn pointer_ok(p: u64) -> bool {
    p.is_multiple_of(8) && p < 1 << 56
}

/// What one read of a map found.
enum Read {
    Shape(Shape),
    /// The seed is not there: the memory holds something else now.
    Gone,
    /// The seed is there but the rest is no map the runtime could have
    /// made (or was caught mid-change: read again).
    Implausible(&'static str),
    /// Swiss: the header changed while its tables were read.
    Moving,
}

/// Reads the shape of the map at `map` in process `pid`; `Ok(None)` when
/// the memory there is no longer the map with this seed.
pub fn read_shape(pid: u32, map: u64, seed: u64, o: &MapOffsets) -> io::Result<Option<Shape>> {
    shape_in(&Process(pid), map, seed, o)
}

fn shape_in(mem: &impl Memory, map: u64, seed: u64, o: &MapOffsets) -> io::Result<Option<Shape>> {
    let mut last = Read::Moving;
    for _ in 0..ATTEMPTS {
        last = match *o {
            MapOffsets::Classic { .. } => classic(mem, map, seed, o)?,
            MapOffsets::Swiss { .. } => swiss(mem, map, seed, o)?,
        };
        match last {
            Read::Shape(s) => return Ok(Some(s)),
            Read::Gone => return Ok(None),
            Read::Implausible(_) | Read::Moving => {}
        }
    }
    match last {
        Read::Implausible(why) => {
            tracing::trace!(map, why, "map header no longer plausible: taken as gone");
            Ok(None)
        }
        // Being rebuilt every time we looked: try again next collection.
        _ => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "map changing while read",
        )),
    }
}

/// One read of a classic `hmap`. The header is all the shape needs, read at
/// once: the seed in it vouches for the rest of that read.
fn classic(mem: &impl Memory, map: u64, seed: u64, o: &MapOffsets) -> io::Result<Read> {
    let MapOffsets::Classic {
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
        ..
    } = *o
    else {
        return Err(bad("not classic offsets"));
    };
    let mut buf = [0u8; MAX_STRUCT];
    let h = Fields(read_struct(mem, map, size, &mut buf)?);
    if u64::from(h.u32(hash0)?) != seed {
        return Ok(Read::Gone);
    }
    let (flags, b, count) = (h.u8(flags)?, h.u8(b)?, h.u64(count)?);
    let (buckets, old) = (h.u64(buckets)?, h.u64(oldbuckets)?);
    let (nevacuate, extra) = (h.u64(nevacuate)?, h.u64(extra)?);
    let implausible = |why| Ok(Read::Implausible(why));
    if flags & !CLASSIC_FLAGS != 0 {
        return implausible("unknown flags");
    }
    if b >= MAX_CLASSIC_B {
        return implausible("B out of range");
    }
    // The runtime doubles a map before it averages 6.5 entries a bucket, and
    // a same-size grow adds at most one per old bucket before the next
    // insert doubles it: never more entries than slots.
    if count > GROUP_SLOTS << b {
        return implausible("more entries than slots");
    }
    if !pointer_ok(buckets) || !pointer_ok(old) || !pointer_ok(extra) {
        return implausible("bad pointer");
    }
    // Buckets come with the first entry, or at make when B > 0.
    if buckets == 0 && (count > 0 || b > 0) {
        return implausible("no buckets");
    }
    if old != 0 && old == buckets {
        return implausible("old buckets are the buckets");
    }
    if flags & SAME_SIZE_GROW != 0 && old == 0 {
        return implausible("same-size grow without old buckets");
    }
    // Evacuation counts old buckets: at most 2^B of them.
    if nevacuate > 1 << b {
        return implausible("evacuated past the old buckets");
    }
    Ok(Read::Shape(Shape {
        entries: count,
        capacity: GROUP_SLOTS << b,
        overflow: Some(u64::from(h.u16(noverflow)?)),
        tables: None,
    }))
}

/// One read of a swiss `Map`: the header, its directory and each distinct
/// table, then the header again (the seed still there, or the memory was
/// reused meanwhile).
fn swiss(mem: &impl Memory, map: u64, seed: u64, o: &MapOffsets) -> io::Result<Read> {
    let MapOffsets::Swiss {
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
    } = *o
    else {
        return Err(bad("not swiss offsets"));
    };
    let mut first = [0u8; MAX_STRUCT];
    let h = Fields(read_struct(mem, map, map_size, &mut first)?);
    if h.u64(map_seed)? != seed {
        return Ok(Read::Gone);
    }
    let entries = h.u64(map_used)?;
    let dir_ptr = h.u64(map_dir_ptr)?;
    let dir_len = h.u64(map_dir_len)?;
    let depth = h.u8(map_global_depth)?;
    if !pointer_ok(dir_ptr) {
        return Ok(Read::Implausible("bad directory pointer"));
    }
    if dir_len == 0 {
        // A small map: one group (allocated with the first entry) at
        // dirPtr, and no directory depth.
        let why = if entries > GROUP_SLOTS {
            "small map with more entries than slots"
        } else if dir_ptr == 0 && entries > 0 {
            "entries without a group"
        } else if depth != 0 {
            "small map with a directory depth"
        } else {
            return Ok(Read::Shape(Shape {
                entries,
                capacity: if dir_ptr == 0 { 0 } else { GROUP_SLOTS },
                overflow: None,
                tables: Some(0),
            }));
        };
        return Ok(Read::Implausible(why));
    }
    // The directory has 2^globalDepth slots and hashes shift by 64 - depth.
    if dir_len > MAX_DIR_LEN
        || depth > 16
        || dir_len != 1 << depth
        || u32::from(h.u8(map_global_shift)?) != 64 - u32::from(depth)
        || dir_ptr == 0
    {
        return Ok(Read::Implausible("directory out of range"));
    }
    // The header was readable: memory its pointers lead to that is not
    // (unmapped since) holds no directory or table.
    let mut slots = vec![0u8; (dir_len * 8) as usize];
    if mem.read(dir_ptr, &mut slots).is_err() {
        return Ok(Read::Implausible("directory unreadable"));
    }
    let slot = |i: u64| -> u64 {
        let s = (i * 8) as usize;
        slots
            .get(s..s + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let (mut capacity, mut tables, mut used, mut i) = (0u64, 0u64, 0u64, 0u64);
    let mut tbuf = [0u8; MAX_STRUCT];
    let mut broken = None;
    // A table with local depth L fills the 2^(G-L) slots from its index.
    while i < dir_len {
        let table = slot(i);
        if table == 0 || !pointer_ok(table) {
            broken = Some("bad table pointer");
            break;
        }
        let Ok(t) = read_struct(mem, table, table_size, &mut tbuf).map(Fields) else {
            broken = Some("table unreadable");
            break;
        };
        let local = t.u8(table_local_depth)?;
        let cap = u64::from(t.u16(table_capacity)?);
        let t_used = u64::from(t.u16(table_used)?);
        let span = 1u64 << depth.saturating_sub(local);
        let why = if local > depth {
            "table deeper than the directory"
        } else if t.u64(table_index)? != i || !i.is_multiple_of(span) {
            "table not where its index says"
        } else if (i..i + span).any(|j| slot(j) != table) {
            "table missing from its slots"
        } else if !cap.is_power_of_two() || !(GROUP_SLOTS..=MAX_TABLE_CAPACITY).contains(&cap) {
            "table capacity out of range"
        } else if t_used > cap || u64::from(t.u16(table_growth_left)?) > cap {
            "table fuller than its capacity"
        } else if t.u64(table_groups_length_mask)? != cap / GROUP_SLOTS - 1
            || t.u64(table_groups_data)? == 0
            || !pointer_ok(t.u64(table_groups_data)?)
        {
            "table groups do not match its capacity"
        } else {
            capacity += cap;
            used += t_used;
            tables += 1;
            i += span;
            continue;
        };
        broken = Some(why);
        break;
    }
    let mut second = [0u8; MAX_STRUCT];
    let again = read_struct(mem, map, map_size, &mut second)?;
    if Fields(again).u64(map_seed)? != seed {
        return Ok(Read::Gone);
    }
    let still = again == h.0;
    Ok(match broken {
        // Tables only ever grow, so the entries counted before they were
        // read cannot outnumber their slots even if the map moved since.
        None if entries > capacity => Read::Implausible("more entries than slots"),
        // Unchanged throughout: the tables must hold exactly the entries.
        None if still && used != entries => Read::Implausible("tables disagree with the map"),
        None => Read::Shape(Shape {
            entries,
            capacity,
            overflow: None,
            tables: Some(tables),
        }),
        Some(_) if !still => Read::Moving,
        Some(why) => Read::Implausible(why),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::inspect::{GoVersion, MapImpl, offsets};

    use super::*;

    /// Memory made of byte regions by start address.
    #[derive(Default)]
    struct Fake(BTreeMap<u64, Vec<u8>>);

    impl Fake {
        fn put(&mut self, addr: u64, bytes: Vec<u8>) {
            self.0.insert(addr, bytes);
        }
    }

    impl Memory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            let (start, bytes) = self
                .0
                .range(..=addr)
                .next_back()
                .ok_or_else(|| bad("unmapped"))?;
            let at = (addr - start) as usize;
            let src = bytes
                .get(at..at + buf.len())
                .ok_or_else(|| bad("unmapped"))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// The checked-in layout of a release (the fake maps below are laid out
    /// as the runtime lays them out).
    fn layout(version: &str, imp: MapImpl) -> MapOffsets {
        let v = GoVersion::parse(version).unwrap();
        offsets::from_table(&v, imp).unwrap().map
    }

    fn classic_layout() -> MapOffsets {
        layout("go1.23.9", MapImpl::Classic)
    }

    fn swiss_layout() -> MapOffsets {
        layout("go1.27.3", MapImpl::Swiss)
    }

    fn hmap(
        count: u64,
        flags: u8,
        b: u8,
        nover: u16,
        hash0: u32,
        buckets: u64,
        old: u64,
    ) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(count.to_le_bytes());
        h.extend([flags, b]);
        h.extend(nover.to_le_bytes());
        h.extend(hash0.to_le_bytes());
        h.extend(buckets.to_le_bytes());
        h.extend(old.to_le_bytes());
        h.extend(0u64.to_le_bytes());
        h.extend(0u64.to_le_bytes());
        h
    }

    fn classic_at(h: Vec<u8>, seed: u64) -> Option<Shape> {
        let mut m = Fake::default();
        m.put(0x1000, h);
        shape_in(&m, 0x1000, seed, &classic_layout()).unwrap()
    }

    #[test]
    fn classic_live_map() {
        let s = classic_at(
            hmap(53248, 0, 13, 10, 0xbd65_3ad9, 0xc000_772000, 0),
            0xbd65_3ad9,
        );
        assert_eq!(
            s,
            Some(Shape {
                entries: 53248,
                capacity: 65536,
                overflow: Some(10),
                tables: None
            })
        );
        // Mid-grow: old buckets, part evacuated.
        let mut h = hmap(53249, 0, 14, 0, 7, 0xc001_000000, 0xc000_772000);
        h[32..40].copy_from_slice(&100u64.to_le_bytes());
        assert!(classic_at(h, 7).is_some());
        // Empty, never written.
        assert!(classic_at(hmap(0, 0, 0, 0, 7, 0, 0), 7).is_some());
    }

    #[test]
    fn classic_stale_stack_header() {
        // Seen in the demo: a dead frame's map, its seed intact, a spilled
        // heap pointer where count was.
        let h = hmap(0xc0_0008_8a20, 0, 13, 10, 0xbd65_3ad9, 0xc000_772000, 0);
        assert_eq!(classic_at(h, 0xbd65_3ad9), None);
        // A misaligned or non-user pointer, unknown flags, huge B.
        assert_eq!(classic_at(hmap(5, 0, 1, 0, 7, 0xc000_772004, 0), 7), None);
        assert_eq!(
            classic_at(hmap(5, 0, 1, 0, 7, 0x0700_00c0_0077_2000, 0), 7),
            None
        );
        assert_eq!(
            classic_at(hmap(5, 0x40, 1, 0, 7, 0xc000_772000, 0), 7),
            None
        );
        assert_eq!(classic_at(hmap(5, 0, 167, 0, 7, 0xc000_772000, 0), 7), None);
        assert_eq!(classic_at(hmap(5, 0, 1, 0, 7, 0, 0), 7), None);
        assert_eq!(classic_at(hmap(5, 8, 1, 0, 7, 0xc000_772000, 0), 7), None);
        // Another seed: another map.
        assert_eq!(classic_at(hmap(5, 0, 1, 0, 8, 0xc000_772000, 0), 7), None);
    }

    fn map_header(used: u64, seed: u64, dir: u64, dir_len: u64, depth: u8) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(used.to_le_bytes());
        h.extend(seed.to_le_bytes());
        h.extend(dir.to_le_bytes());
        h.extend(dir_len.to_le_bytes());
        let shift = if dir_len == 0 { 0 } else { 64 - depth };
        h.extend([depth, shift, 0, 0, 0, 0, 0, 0]);
        h.extend(0u64.to_le_bytes());
        h
    }

    fn table(used: u16, cap: u16, local: u8, index: u64) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend(used.to_le_bytes());
        t.extend(cap.to_le_bytes());
        t.extend((cap / 8 * 7 - used).to_le_bytes());
        t.extend([local, 0]);
        t.extend(index.to_le_bytes());
        t.extend(0xc000_900000u64.to_le_bytes());
        t.extend((u64::from(cap) / 8 - 1).to_le_bytes());
        t
    }

    /// A map of three tables over a 4-slot directory: A (depth 1) in slots
    /// 0-1, B and C (depth 2) in 2 and 3.
    fn swiss_mem(used: u64, tables: [(u16, u16); 3]) -> Fake {
        let mut m = Fake::default();
        m.put(0x1000, map_header(used, 42, 0x2000, 4, 2));
        let (a, b, c) = (0x3000u64, 0x4000u64, 0x5000u64);
        m.put(
            0x2000,
            [a, a, b, c].iter().flat_map(|p| p.to_le_bytes()).collect(),
        );
        m.put(a, table(tables[0].0, tables[0].1, 1, 0));
        m.put(b, table(tables[1].0, tables[1].1, 2, 2));
        m.put(c, table(tables[2].0, tables[2].1, 2, 3));
        m
    }

    #[test]
    fn swiss_live_map() {
        let m = swiss_mem(1200, [(800, 1024), (300, 512), (100, 128)]);
        assert_eq!(
            shape_in(&m, 0x1000, 42, &swiss_layout()).unwrap(),
            Some(Shape {
                entries: 1200,
                capacity: 1664,
                overflow: None,
                tables: Some(3)
            })
        );
        let mut small = Fake::default();
        small.put(0x1000, map_header(5, 42, 0xc000_1000, 0, 0));
        assert_eq!(
            shape_in(&small, 0x1000, 42, &swiss_layout())
                .unwrap()
                .map(|s| s.capacity),
            Some(8)
        );
    }

    /// A map being written: every read of its header finds one more entry.
    struct Inserting(Fake, std::cell::Cell<u64>);

    impl Memory for Inserting {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read(addr, buf)?;
            if addr == 0x1000 {
                self.1.set(self.1.get() + 1);
                buf[..8].copy_from_slice(&(1200 + self.1.get()).to_le_bytes());
            }
            Ok(())
        }
    }

    #[test]
    fn swiss_map_written_while_read() {
        // Consistent tables: published, entries as first read.
        let m = Inserting(
            swiss_mem(0, [(800, 1024), (300, 512), (100, 128)]),
            0.into(),
        );
        let s = shape_in(&m, 0x1000, 42, &swiss_layout()).unwrap();
        assert_eq!(s.map(|s| (s.entries, s.capacity)), Some((1201, 1664)));
        // Caught mid-split every time: no verdict this time, not gone.
        let mut f = swiss_mem(0, [(800, 1024), (300, 512), (100, 128)]);
        f.put(0x4000, table(300, 512, 2, u64::MAX));
        let e = shape_in(&Inserting(f, 0.into()), 0x1000, 42, &swiss_layout()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn swiss_stale_header() {
        // `used` overwritten with more entries than the tables hold.
        let m = swiss_mem(5900, [(800, 1024), (300, 512), (100, 128)]);
        assert_eq!(shape_in(&m, 0x1000, 42, &swiss_layout()).unwrap(), None);
        // Plausible, but not what the tables hold.
        let m = swiss_mem(1000, [(800, 1024), (300, 512), (100, 128)]);
        assert_eq!(shape_in(&m, 0x1000, 42, &swiss_layout()).unwrap(), None);
        // Its directory reused: a table not where its index says.
        let mut m = swiss_mem(1200, [(800, 1024), (300, 512), (100, 128)]);
        m.put(0x4000, table(300, 512, 2, 7));
        assert_eq!(shape_in(&m, 0x1000, 42, &swiss_layout()).unwrap(), None);
        // A capacity no table has.
        let m = swiss_mem(1200, [(800, 1024), (300, 500), (100, 128)]);
        assert_eq!(shape_in(&m, 0x1000, 42, &swiss_layout()).unwrap(), None);
        // Its directory pointing at unmapped memory.
        let mut m = swiss_mem(1200, [(800, 1024), (300, 512), (100, 128)]);
        m.put(
            0x2000,
            [0x3000u64, 0x3000, 0x9000, 0x5000]
                .iter()
                .flat_map(|p| p.to_le_bytes())
                .collect(),
        );
        assert_eq!(shape_in(&m, 0x1000, 42, &swiss_layout()).unwrap(), None);
        // A small map with more than a group holds.
        let mut small = Fake::default();
        small.put(0x1000, map_header(250_000, 42, 0xc000_1000, 0, 0));
        assert_eq!(shape_in(&small, 0x1000, 42, &swiss_layout()).unwrap(), None);
        // Directory length not 2^depth.
        let mut m = swiss_mem(1200, [(800, 1024), (300, 512), (100, 128)]);
        m.put(0x1000, map_header(1200, 42, 0x2000, 4, 3));
        assert_eq!(shape_in(&m, 0x1000, 42, &swiss_layout()).unwrap(), None);
    }
}
