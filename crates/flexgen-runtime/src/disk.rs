//! The CUDA executor's disk I/O on the host: parallel direct reads, and the KV-cache rows whose
//! home is disk (stored position-major, read ahead on a thread, appended by new positions).

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use flexgen_tensor::cuda::HostMem;
use flexgen_tensor::host::{DirectFile, align_up};
use half::f16;

use crate::error::{Error, Result};

/// Reads `out.len()` bytes at `offset` with `threads` threads, in 16 MiB direct reads.
pub(crate) fn read_parallel(
    file: &DirectFile,
    offset: u64,
    out: &mut [u8],
    threads: usize,
) -> std::io::Result<()> {
    const PIECE: usize = 16 << 20;
    let chunk = align_up(out.len().div_ceil(threads.max(1))).max(PIECE.min(align_up(out.len())));
    std::thread::scope(|s| {
        let jobs: Vec<_> = out
            .chunks_mut(chunk)
            .enumerate()
            .map(|(i, part)| {
                s.spawn(move || -> std::io::Result<()> {
                    let base = offset + (i * chunk) as u64;
                    for (p, piece) in part.chunks_mut(PIECE).enumerate() {
                        file.read_aligned(base + (p * PIECE) as u64, piece)?;
                    }
                    Ok(())
                })
            })
            .collect();
        jobs.into_iter().try_for_each(|j| j.join().expect("reader thread"))
    })
}

/// Threads per disk read: several requests in flight keep an NVMe queue busy.
pub(crate) const READ_THREADS: usize = 4;

/// The KV-cache rows whose home is disk. The file holds, for each (layer, batch, k|v), a region of
/// `cap` position slots, each slot `pos_bytes` (the disk rows' `hd` values of one position,
/// padded to the direct-I/O alignment): position-major, so a step reads its past as one
/// contiguous span and appends only its new positions. `stage` holds the (layer, batch) being
/// computed row-major (`[rows, cap, hd]`, as pinned CPU rows are) for the copies and CPU attention;
/// `io` are two pairs (k, v) of position-major buffers that the file is read into and written
/// from: while one (layer, batch) uses pair `cur`, a thread reads the next one's past into the
/// other.
pub(crate) struct DiskCache {
    file: Arc<DirectFile>,
    pos_bytes: usize,
    /// Disk rows per (layer, batch), positions per row, values per position and row.
    rows: usize,
    cap: usize,
    hd: usize,
    /// GPU batches per layer (regions are `[layer][batch][k|v]`) and layers.
    batches: usize,
    layers: usize,
    pub(crate) stage: [HostMem; 2],
    io: [[HostMem; 2]; 2],
    cur: Cell<usize>,
    pending: RefCell<Option<Prefetch>>,
}

/// (layer, batch, past) of a read of disk rows.
type ReadKey = (usize, usize, usize);

/// A read of (layer, batch, past)'s disk rows into `io` pair `pair`, under way on a thread.
struct Prefetch {
    key: ReadKey,
    pair: usize,
    handle: std::thread::JoinHandle<std::io::Result<()>>,
}

impl DiskCache {
    /// A disk cache in `file` for `rows` rows of `cap` positions of `hd` values per (layer,
    /// batch); `alloc(n)` gives host memory of `n` fp16 values (pinned by the CUDA executor).
    pub(crate) fn new(
        file: DirectFile,
        (rows, cap, hd): (usize, usize, usize),
        (layers, batches): (usize, usize),
        alloc: impl Fn(usize) -> Result<HostMem>,
    ) -> Result<Self> {
        let pos_bytes = disk_pos_bytes(rows, hd);
        let stage = align_up(rows * cap * hd * 2) / 2;
        let io = cap * pos_bytes / 2;
        Ok(Self {
            file: Arc::new(file),
            pos_bytes,
            rows,
            cap,
            hd,
            batches,
            layers,
            stage: [alloc(stage)?, alloc(stage)?],
            io: [[alloc(io)?, alloc(io)?], [alloc(io)?, alloc(io)?]],
            cur: Cell::new(0),
            pending: RefCell::new(None),
        })
    }

    /// Byte offsets of (layer `j`, batch `kb`)'s k and v regions in the file.
    fn offsets(&self, j: usize, kb: usize) -> [u64; 2] {
        [0, 1].map(|i| (((j * self.batches + kb) * 2 + i) * self.cap * self.pos_bytes) as u64)
    }

    fn io_error(&self, e: &std::io::Error) -> Error {
        Error::Io { path: self.file.path().to_path_buf(), message: e.to_string() }
    }

    /// Reads (layer `j`, batch `kb`)'s positions `0..past` into the row-major staging: from the
    /// read the previous call started, or now; then starts reading the next (layer, batch) of
    /// the step into the other pair. `free_stage` returns once nothing uses the staging (the
    /// CUDA executor waits for its stream); it runs after the next read has started. Returns
    /// the bytes read for this (layer, batch).
    pub(crate) fn load(
        &self,
        j: usize,
        kb: usize,
        past: usize,
        free_stage: impl FnOnce() -> Result<()>,
    ) -> Result<u64> {
        let span = past * self.pos_bytes;
        // This (layer, batch)'s past: read ahead by the previous call, or read now (the same
        // read, waited for at once); a stray read ahead (another step's) is let end first.
        let key = (j, kb, past);
        if self.pending.borrow().as_ref().map(|p| p.key) != Some(key) {
            let _ = self.finish();
            self.start(key, self.cur.get(), self.offsets(j, kb), span);
        }
        let (_, pair, read) = self.finish().expect("a read of this (layer, batch) under way");
        read.map_err(|e| self.io_error(&e))?;
        self.cur.set(pair);
        let next = if kb + 1 < self.batches {
            Some((j, kb + 1))
        } else {
            (j + 1 < self.layers).then_some((j + 1, 0))
        };
        if let Some((nj, nkb)) = next {
            self.start((nj, nkb, past), 1 - pair, self.offsets(nj, nkb), span);
        }
        free_stage()?;
        let (rows, cap, hd) = (self.rows, self.cap, self.hd);
        for i in 0..2 {
            // SAFETY: the staging is free (`free_stage`), this pair is not being read into, and
            // no reference to either buffer is live.
            let (io, stage) = unsafe {
                (
                    std::slice::from_raw_parts(self.io[pair][i].ptr().cast_const(), span / 2),
                    std::slice::from_raw_parts_mut(self.stage[i].ptr(), rows * cap * hd),
                )
            };
            positions_to_rows(io, stage, self.pos_bytes / 2, (rows, cap, hd), 0..past);
        }
        Ok(2 * span as u64)
    }

    /// Appends positions `past..past + t` of the staging to (layer `j`, batch `kb`)'s regions;
    /// the caller has made sure the staging holds them (the copies into it have landed). Returns
    /// the bytes written.
    pub(crate) fn append(&self, j: usize, kb: usize, past: usize, t: usize) -> Result<u64> {
        let (rows, cap, hd) = (self.rows, self.cap, self.hd);
        let span = t * self.pos_bytes;
        // `cur` is the pair this (layer, batch) was read into; a read under way fills the other.
        let pair = self.cur.get();
        if self.pending.borrow().as_ref().is_some_and(|p| p.pair == pair) {
            let _ = self.finish(); // a stale read (another step's) into this pair: let it end
        }
        for (i, at) in self.offsets(j, kb).into_iter().enumerate() {
            // SAFETY: nothing else uses the staging or this pair now; no reference is live.
            let (stage, io) = unsafe {
                (
                    std::slice::from_raw_parts(self.stage[i].ptr().cast_const(), rows * cap * hd),
                    std::slice::from_raw_parts_mut(self.io[pair][i].ptr(), span / 2),
                )
            };
            rows_to_positions(stage, io, self.pos_bytes / 2, (rows, cap, hd), past..past + t);
            // SAFETY: the same bytes, now written.
            let bytes = unsafe {
                std::slice::from_raw_parts(self.io[pair][i].ptr().cast::<u8>().cast_const(), span)
            };
            self.file
                .write_aligned(at + (past * self.pos_bytes) as u64, bytes)
                .map_err(|e| self.io_error(&e))?;
        }
        Ok(2 * span as u64)
    }

    /// Waits for the read under way, if any: whether it was (key)'s and succeeded, and its pair.
    fn finish(&self) -> Option<(ReadKey, usize, std::io::Result<()>)> {
        let p = self.pending.borrow_mut().take()?;
        let r = p.handle.join().unwrap_or_else(|_| Err(std::io::Error::other("reader panicked")));
        Some((p.key, p.pair, r))
    }

    /// Starts reading `span` bytes at `offsets` (k, v) into pair `pair` on a thread.
    fn start(&self, key: ReadKey, pair: usize, offsets: [u64; 2], span: usize) {
        let file = Arc::clone(&self.file);
        let ptrs = self.io[pair].each_ref().map(|m| m.ptr() as usize);
        let handle = std::thread::spawn(move || {
            for (at, ptr) in offsets.into_iter().zip(ptrs) {
                // SAFETY: the pair's buffers hold `cap` slots (≥ span bytes) of host memory
                // that nothing else touches until `finish` joins this thread (`Drop` joins too).
                let bytes = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, span) };
                read_parallel(&file, at, bytes, READ_THREADS)?;
            }
            Ok(())
        });
        *self.pending.borrow_mut() = Some(Prefetch { key, pair, handle });
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        let _ = self.finish(); // the thread writes into `io`: never free it under a read
    }
}

/// Bytes of one position of `rows` disk rows of `hd` values, padded for direct I/O.
pub(crate) fn disk_pos_bytes(rows: usize, hd: usize) -> usize {
    align_up(rows * hd * 2)
}

/// Positions `range` of position-major `src` (slots of `slot` values, each `[rows, hd]` first) into
/// row-major `dst` `[rows, cap, hd]`.
fn positions_to_rows(
    src: &[f16],
    dst: &mut [f16],
    slot: usize,
    (rows, cap, hd): (usize, usize, usize),
    range: std::ops::Range<usize>,
) {
    // Rows split among the cores: each thread writes its own rows, reading every slot.
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (c, part) in dst[..rows * cap * hd].chunks_mut(per * cap * hd).enumerate() {
            let range = range.clone();
            s.spawn(move || {
                for p in range.clone() {
                    let from = &src[(p - range.start) * slot + c * per * hd..];
                    for (r, row) in part.chunks_exact_mut(cap * hd).enumerate() {
                        row[p * hd..][..hd].copy_from_slice(&from[r * hd..][..hd]);
                    }
                }
            });
        }
    });
}

/// The inverse of [`positions_to_rows`]: positions `range` of row-major `src` into position-major
/// `dst`, the first of them in slot 0.
fn rows_to_positions(
    src: &[f16],
    dst: &mut [f16],
    slot: usize,
    (rows, cap, hd): (usize, usize, usize),
    range: std::ops::Range<usize>,
) {
    let first = range.start;
    for p in range {
        let to = &mut dst[(p - first) * slot..][..rows * hd];
        for (r, v) in to.chunks_exact_mut(hd).enumerate() {
            v.copy_from_slice(&src[(r * cap + p) * hd..][..hd]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The disk rows' file through a whole generation in the executor's order (prefill of every
    /// (layer, batch), then decode steps visiting them layer by layer with the next one read
    /// ahead), with a warm-up's stray read ahead first: every load gives back exactly what was
    /// appended, and only new positions are written.
    #[test]
    fn disk_rows_read_back_what_was_appended_with_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let file = DirectFile::create(&dir.path().join("kv.bin")).unwrap();
        let (rows, cap, hd, layers, batches, prompt) = (3, 9, 8, 3, 2, 4);
        let alloc = |n| HostMem::new_f16(n).map_err(|e| Error::Model(flexgen_model::Error::Gpu(e)));
        let dc = DiskCache::new(file, (rows, cap, hd), (layers, batches), alloc).unwrap();
        let value = |j: usize, kb: usize, i: usize, r: usize, p: usize, d: usize| {
            #[expect(clippy::cast_precision_loss, reason = "small test values")]
            f16::from_f32((((j * 7 + kb * 5 + i * 3 + r) * 16 + p) * 8 + d) as f32 % 2000.0)
        };
        // SAFETY: each use of the staging ends before the next call; no read touches it.
        let stage = |i: usize| unsafe {
            std::slice::from_raw_parts_mut(dc.stage[i].ptr(), rows * cap * hd)
        };
        let put = |j, kb, range: std::ops::Range<usize>| {
            for i in 0..2 {
                let st = stage(i);
                for r in 0..rows {
                    for p in range.clone() {
                        for d in 0..hd {
                            st[(r * cap + p) * hd + d] = value(j, kb, i, r, p, d);
                        }
                    }
                }
            }
        };
        let check = |j, kb, past: usize| {
            for i in 0..2 {
                let st = stage(i);
                for r in 0..rows {
                    for p in 0..past {
                        for d in 0..hd {
                            let (got, want) =
                                (st[(r * cap + p) * hd + d], value(j, kb, i, r, p, d));
                            assert_eq!(got, want, "layer {j} batch {kb} {i} row {r} pos {p}");
                        }
                    }
                }
            }
        };
        let mut written = 0;
        // A warm-up on (0, 0) leaves a read ahead of (0, 1) under way into the other pair.
        put(0, 0, 0..prompt);
        written += dc.append(0, 0, 0, prompt).unwrap();
        dc.load(0, 0, prompt, || Ok(())).unwrap();
        check(0, 0, prompt);
        // Prefill: every (layer, batch) appends its prompt's positions.
        for j in 0..layers {
            for kb in 0..batches {
                put(j, kb, 0..prompt);
                written += dc.append(j, kb, 0, prompt).unwrap();
            }
        }
        // Decode: load the past, add one position.
        let mut read = 0;
        for past in prompt..cap {
            for j in 0..layers {
                for kb in 0..batches {
                    read += dc.load(j, kb, past, || Ok(())).unwrap();
                    check(j, kb, past);
                    put(j, kb, past..past + 1);
                    written += dc.append(j, kb, past, 1).unwrap();
                }
            }
        }
        let slot = disk_pos_bytes(rows, hd) as u64;
        let visits = (layers * batches) as u64;
        let decode_positions: u64 = (prompt..cap).map(|p| p as u64).sum();
        assert_eq!(
            written,
            2 * slot * (prompt as u64 * (visits + 1) + (cap - prompt) as u64 * visits)
        );
        assert_eq!(read, 2 * slot * decode_positions * visits);
    }

    #[test]
    fn disk_rows_go_to_position_slots_and_back() {
        let (rows, cap, hd, slot) = (3, 5, 4, 16); // a slot pads 12 values to 16
        let src: Vec<f16> = (0..rows * cap * hd).map(|i| f16::from_f32(i as f32)).collect();
        // Positions 1..4 out to slots 0..3: slot s holds every row's values of position 1 + s.
        let mut slots = vec![f16::ZERO; 3 * slot];
        rows_to_positions(&src, &mut slots, slot, (rows, cap, hd), 1..4);
        for s in 0..3 {
            for r in 0..rows {
                let want = &src[(r * cap + 1 + s) * hd..][..hd];
                assert_eq!(&slots[s * slot + r * hd..][..hd], want, "slot {s}, row {r}");
            }
        }
        // And back: the same positions land where they came from, the others stay zero.
        let mut back = vec![f16::ZERO; rows * cap * hd];
        positions_to_rows(&slots, &mut back, slot, (rows, cap, hd), 1..4);
        for (i, (a, b)) in back.iter().zip(&src).enumerate() {
            let p = i / hd % cap;
            assert_eq!(*a, if (1..4).contains(&p) { *b } else { f16::ZERO }, "value {i}");
        }
    }
}
