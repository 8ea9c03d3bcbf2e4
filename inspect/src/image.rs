//! An executable's bytes, mapped from its file rather than read into
//! memory: the pages are the page cache's (file-backed, shared with every
//! process that runs the program, dropped at unmap and reclaimable before
//! that), so reading a 185 MB binary costs no heap in proportion to it, and
//! only the pages the parser touches are ever read from disk.
//!
//! memmap2 rather than `libc::mmap` by hand: it is the maintained minimal
//! wrapper (used by ripgrep, wasmtime, the Rust compiler), handles the
//! empty file `mmap` refuses, and unmaps on drop.
use std::fs::File;

/// A file mapped read-only.
pub struct Image {
    map: memmap2::Mmap,
}

impl Image {
    /// Maps `file` read-only (private: nothing is ever written through it).
    ///
    /// # Safety
    ///
    /// While the image lives the file must not be truncated (touching a page
    /// past its new end raises SIGBUS) nor written (the bytes would change
    /// under the parser). The agent holds a read lease on the file while it
    /// reads, which makes writers wait, and turns SIGBUS on an image into
    /// zeroed pages (`agent/src/exe_map.rs`); tools and tests read files
    /// nobody writes meanwhile.
    pub unsafe fn map(file: &File) -> std::io::Result<Self> {
        // SAFETY: as the caller promised.
        let map = unsafe { memmap2::MmapOptions::new().map(file) }?;
        Ok(Self { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

impl AsRef<[u8]> for Image {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}
