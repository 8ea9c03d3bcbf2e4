//! Exec and exit events from the kernel's tracepoints, read from their
//! ring buffer.
use std::{os::fd::AsRawFd as _, time::Duration};

use gopulse_common::{LIFE_EXEC, LIFE_EXIT, LifeEvent};

use crate::bpf::LifeMaps;

/// What happened to a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    /// It ran a new program (a new process, or an old one re-exec'd).
    Exec { pid: u32, time_ns: u64 },
    /// A watched process exited.
    Exit { pid: u32 },
}

pub struct LifeEvents {
    maps: LifeMaps,
}

impl LifeEvents {
    pub fn new(maps: LifeMaps) -> Self {
        Self { maps }
    }

    /// Every event waiting, after waiting up to `timeout` for the first.
    pub fn wait(&mut self, timeout: Duration) -> Vec<Life> {
        let mut out = self.drain();
        if out.is_empty() {
            let mut fd = libc::pollfd {
                fd: self.maps.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd; an error or timeout just means no
            // events yet.
            unsafe { libc::poll(&mut fd, 1, ms) };
            out = self.drain();
        }
        out
    }

    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<Life> {
        let mut out = Vec::new();
        while let Some(item) = self.maps.ring.next() {
            let Some(e) = parse(&item) else { continue };
            match e.kind {
                LIFE_EXEC => out.push(Life::Exec {
                    pid: e.pid,
                    time_ns: e.time_ns,
                }),
                LIFE_EXIT => out.push(Life::Exit { pid: e.pid }),
                _ => {}
            }
        }
        out
    }

    /// Events the ring had no room for, since the agent started.
    pub fn lost(&self) -> u64 {
        self.maps
            .lost
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

fn parse(bytes: &[u8]) -> Option<LifeEvent> {
    if bytes.len() < std::mem::size_of::<LifeEvent>() {
        return None;
    }
    // SAFETY: LifeEvent is repr(C) plain integers, and the length was
    // checked; the ring's records are 8-byte aligned but read_unaligned
    // does not need it.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<LifeEvent>()) })
}

/// CLOCK_MONOTONIC now, in the ns the probes stamp events with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
