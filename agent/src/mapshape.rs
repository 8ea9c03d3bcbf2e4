//! How full a map is, read from the target's memory when metrics are
//! collected: entries, capacity, overflow buckets (classic) and tables
//! (swiss). A map's address alone is no lasting identity (maps are freed and
//! their memory reused), so every read checks the map's random seed.
use std::io;

use crate::{inspect::MapOffsets, procfs};

/// Most directory slots a swiss map is walked through (2^16 slots is a map
/// of tens of millions of entries).
const MAX_DIR_LEN: u64 = 1 << 16;

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

fn read<const N: usize>(pid: u32, addr: u64) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    procfs::read_mem(pid, addr, &mut b)?;
    Ok(b)
}

fn u64_at(pid: u32, addr: u64) -> io::Result<u64> {
    Ok(u64::from_le_bytes(read::<8>(pid, addr)?))
}

fn u16_at(pid: u32, addr: u64) -> io::Result<u16> {
    Ok(u16::from_le_bytes(read::<2>(pid, addr)?))
}

fn u8_at(pid: u32, addr: u64) -> io::Result<u8> {
    Ok(read::<1>(pid, addr)?[0])
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads the shape of the map at `map` in process `pid`; `Ok(None)` when
/// the memory there is no longer the map with this seed.
pub fn read_shape(pid: u32, map: u64, seed: u64, o: &MapOffsets) -> io::Result<Option<Shape>> {
    let at = |off: u16| map.wrapping_add(u64::from(off));
    match *o {
        MapOffsets::Classic {
            count,
            b,
            noverflow,
            hash0,
            ..
        } => {
            if u64::from(u32::from_le_bytes(read::<4>(pid, at(hash0))?)) != seed {
                return Ok(None);
            }
            let b = u8_at(pid, at(b))?;
            if b > 56 {
                return Err(bad("B out of range"));
            }
            Ok(Some(Shape {
                entries: u64_at(pid, at(count))?,
                capacity: 8u64 << b,
                overflow: Some(u64::from(u16_at(pid, at(noverflow))?)),
                tables: None,
            }))
        }
        MapOffsets::Swiss {
            map_used,
            map_seed,
            map_dir_ptr,
            map_dir_len,
            map_global_depth,
            table_capacity,
            table_local_depth,
            ..
        } => {
            if u64_at(pid, at(map_seed))? != seed {
                return Ok(None);
            }
            let entries = u64_at(pid, at(map_used))?;
            let dir_ptr = u64_at(pid, at(map_dir_ptr))?;
            let dir_len = u64_at(pid, at(map_dir_len))?;
            if dir_len == 0 {
                return Ok(Some(Shape {
                    entries,
                    capacity: if dir_ptr == 0 { 0 } else { 8 },
                    overflow: None,
                    tables: Some(0),
                }));
            }
            let depth = u8_at(pid, at(map_global_depth))?;
            if dir_len > MAX_DIR_LEN || depth > 16 || dir_len != 1 << depth {
                return Err(bad("directory out of range"));
            }
            let mut slots = vec![0u8; (dir_len * 8) as usize];
            procfs::read_mem(pid, dir_ptr, &mut slots)?;
            let (mut capacity, mut tables, mut i) = (0u64, 0u64, 0u64);
            // A table with local depth L fills 2^(G-L) consecutive slots.
            while i < dir_len {
                let s = (i * 8) as usize;
                let table =
                    u64::from_le_bytes(slots[s..s + 8].try_into().map_err(|_| bad("slot"))?);
                let local = u8_at(pid, table.wrapping_add(u64::from(table_local_depth)))?;
                if local > depth {
                    return Err(bad("table deeper than the directory"));
                }
                capacity += u64::from(u16_at(pid, table.wrapping_add(u64::from(table_capacity)))?);
                tables += 1;
                i += 1 << (depth - local);
            }
            Ok(Some(Shape {
                entries,
                capacity,
                overflow: None,
                tables: Some(tables),
            }))
        }
    }
}
