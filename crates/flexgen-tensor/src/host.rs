//! Host-side buffers for the disk tier: page-aligned memory and files read and written with direct
//! I/O (`O_DIRECT`), so that the page cache can neither serve reads nor hide writes. Where a file
//! system refuses `O_DIRECT` (tmpfs), the file falls back to buffered I/O and says so.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Alignment of direct I/O offsets, lengths and buffers.
pub const ALIGN: usize = 4096;

/// Rounds `n` up to a multiple of [`ALIGN`].
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A zeroed, [`ALIGN`]-aligned byte buffer.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is uniquely owned plain memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` bytes (rounded up to [`ALIGN`]), zeroed.
    pub fn new(len: usize) -> Self {
        let layout =
            std::alloc::Layout::from_size_align(align_up(len.max(1)), ALIGN).expect("valid layout");
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    /// The whole buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// A scratch file for the disk tier, opened for direct I/O where the file system allows it. Its
/// name is removed as soon as it is opened: the blocks live as long as the descriptor, so no way
/// out of the process (a return, Ctrl-C, SIGTERM, an abort, SIGKILL) leaves it behind in the
/// offload directory. (`df` shows the space while it is held; `ls` does not show the file.)
pub struct DirectFile {
    path: PathBuf,
    file: File,
    direct: bool,
}

impl DirectFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(_) => (open(false)?, false),
        };
        std::fs::remove_file(path)?;
        Ok(Self { path: path.to_path_buf(), file, direct })
    }

    /// Flushes what was written to the device.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Asks the kernel to drop the file's pages from the page cache (for reads that must come
    /// from the device where direct I/O is not available).
    pub fn drop_cache(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; advice only.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    /// Whether reads and writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path it was created at (its name is gone: see the type's note).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` at `offset` (a multiple of [`ALIGN`]); the tail up to the next [`ALIGN`]
    /// boundary is zero-filled.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(offset % ALIGN as u64, 0);
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut_slice()[..data.len()].copy_from_slice(data);
        self.file.write_all_at(buf.as_slice(), offset)
    }

    /// Writes the whole aligned buffer at `offset` without copying it.
    pub fn write_buf_at(&self, offset: u64, buf: &AlignedBuf) -> io::Result<()> {
        self.file.write_all_at(buf.as_slice(), offset)
    }

    /// Fills the whole aligned buffer from `offset` without copying.
    pub fn read_buf_at(&self, offset: u64, buf: &mut AlignedBuf) -> io::Result<()> {
        self.file.read_exact_at(buf.as_mut_slice(), offset)
    }

    /// Writes `data` (page-aligned memory, a multiple of [`ALIGN`] long) at `offset`.
    pub fn write_aligned(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(data.as_ptr() as usize % ALIGN, 0);
        debug_assert_eq!(data.len() % ALIGN, 0);
        self.file.write_all_at(data, offset)
    }

    /// Fills `out` (page-aligned memory, a multiple of [`ALIGN`] long) from `offset`.
    pub fn read_aligned(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        debug_assert_eq!(out.as_ptr() as usize % ALIGN, 0);
        debug_assert_eq!(out.len() % ALIGN, 0);
        self.file.read_exact_at(out, offset)
    }

    /// Reads `len` bytes at `offset` (a multiple of [`ALIGN`]) into `out`.
    pub fn read_at(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        debug_assert_eq!(offset % ALIGN as u64, 0);
        let mut buf = AlignedBuf::new(len);
        self.file.read_exact_at(buf.as_mut_slice(), offset)?;
        out.clear();
        out.extend_from_slice(&buf.as_slice()[..len]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_lengths_round_trip_at_aligned_offsets_and_the_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        {
            let f = DirectFile::create(&path).unwrap();
            let a: Vec<u8> = (0..5000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
            let b = vec![7u8; 3];
            f.write_at(0, &a).unwrap();
            f.write_at(align_up(a.len()) as u64, &b).unwrap();
            let mut out = Vec::new();
            f.read_at(0, a.len(), &mut out).unwrap();
            assert_eq!(out, a);
            f.read_at(align_up(a.len()) as u64, 3, &mut out).unwrap();
            assert_eq!(out, b);
        }
        assert!(!path.exists());
    }
}
