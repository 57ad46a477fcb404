//! Computes allocated and changed blocks of snapshot image files.
//!
//! Holes are found with `lseek(SEEK_DATA/SEEK_HOLE)` and never read; inside data extents each
//! block is compared (against zeros for "allocated", against the other image for "delta") in
//! windows of `window` bytes. Memory: two window buffers plus one zero block, whatever the image
//! size. Output is block-aligned ranges in increasing order, clipped to the image size.

use std::fs::File;
use std::io;
use std::ops::{ControlFlow, Range};
use std::os::unix::fs::FileExt;

/// Scan geometry.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Block granularity in bytes (power of two).
    pub block: u64,
    /// Bytes read per window (multiple of `block`).
    pub window: u64,
}

impl Geometry {
    fn align_down(&self, x: u64) -> u64 {
        x - x % self.block
    }
    fn align_up(&self, x: u64) -> u64 {
        x.div_ceil(self.block) * self.block
    }
}

/// Where data and holes are: the shared walker, which treats a file that cannot report holes
/// (a block device, EINVAL) as all data.
pub use cbt_core::extents::{next_data, next_hole};

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            // The image shrank under us; what is gone reads as zeros.
            buf[done..].fill(0);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

/// Collects consecutive block runs and hands out maximal ranges.
struct Runs<'a, F: FnMut(u64, u64) -> ControlFlow<()>> {
    cur: Option<(u64, u64)>,
    emit: &'a mut F,
}

impl<F: FnMut(u64, u64) -> ControlFlow<()>> Runs<'_, F> {
    fn push(&mut self, start: u64, end: u64) -> ControlFlow<()> {
        match &mut self.cur {
            Some((_, e)) if *e == start => {
                *e = end;
                ControlFlow::Continue(())
            }
            _ => {
                let prev = self.cur.replace((start, end));
                match prev {
                    Some((s, e)) => (self.emit)(s, e - s),
                    None => ControlFlow::Continue(()),
                }
            }
        }
    }
    /// Pushes each `block`-sized piece of the window `[ws, ws + len)` that `differs` picks
    /// (given the piece's range within the window buffers).
    fn push_blocks(
        &mut self,
        ws: u64,
        len: usize,
        block: u64,
        differs: impl Fn(Range<usize>) -> bool,
    ) -> ControlFlow<()> {
        let mut off = 0usize;
        while off < len {
            let n = (block as usize).min(len - off);
            if differs(off..off + n) {
                let s = ws + off as u64;
                self.push(s, s + n as u64)?;
            }
            off += n;
        }
        ControlFlow::Continue(())
    }
    fn finish(&mut self) -> ControlFlow<()> {
        match self.cur.take() {
            Some((s, e)) => (self.emit)(s, e - s),
            None => ControlFlow::Continue(()),
        }
    }
}

/// Work counters of one scan.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanStats {
    /// Bytes read from the image(s).
    pub bytes_read: u64,
}

/// Emits `(offset, len)` of every maximal run of blocks at or after the block containing
/// `start` that holds non-zero data. Stops early when `emit` breaks, or when `cancelled` (asked
/// before every window) says the caller is gone: a scan that finds nothing to emit would
/// otherwise read to the end of the image for nobody.
///
/// # Errors
/// I/O errors reading the image.
pub fn allocated(
    file: &File,
    size: u64,
    start: u64,
    g: Geometry,
    cancelled: impl Fn() -> bool,
    mut emit: impl FnMut(u64, u64) -> ControlFlow<()>,
) -> io::Result<ScanStats> {
    let mut stats = ScanStats::default();
    let mut buf = vec![0u8; g.window as usize];
    let zero = vec![0u8; g.block as usize];
    let mut runs = Runs {
        cur: None,
        emit: &mut emit,
    };
    let mut pos = g.align_down(start);
    while pos < size {
        if cancelled() {
            return Ok(stats);
        }
        let Some(d) = next_data(file, pos, size)? else {
            break;
        };
        let ws = g.align_down(d).max(pos);
        let hole = next_hole(file, d, size)?;
        let we = (ws + g.window).min(g.align_up(hole)).min(size).max(ws + 1);
        let we = we.min(size);
        let len = (we - ws) as usize;
        read_full(file, &mut buf[..len], ws)?;
        stats.bytes_read += len as u64;
        let nonzero = |r: Range<usize>| buf[r.clone()] != zero[..r.len()];
        if runs.push_blocks(ws, len, g.block, nonzero).is_break() {
            return Ok(stats);
        }
        pos = we;
    }
    let _ = runs.finish();
    Ok(stats)
}

/// Emits `(offset, len)` of every maximal run of blocks, at or after the block containing
/// `start`, whose content differs between `base` and `target` (both `size` bytes). Regions that
/// are holes in both images are skipped unread; a hole compares as zeros. `cancelled` and `emit`
/// stop the scan early as in [`allocated`].
///
/// # Errors
/// I/O errors reading either image.
pub fn delta(
    base: &File,
    target: &File,
    size: u64,
    start: u64,
    g: Geometry,
    cancelled: impl Fn() -> bool,
    mut emit: impl FnMut(u64, u64) -> ControlFlow<()>,
) -> io::Result<ScanStats> {
    let mut stats = ScanStats::default();
    let mut a = vec![0u8; g.window as usize];
    let mut b = vec![0u8; g.window as usize];
    let mut runs = Runs {
        cur: None,
        emit: &mut emit,
    };
    let mut pos = g.align_down(start);
    while pos < size {
        if cancelled() {
            return Ok(stats);
        }
        let da = next_data(base, pos, size)?;
        let db = next_data(target, pos, size)?;
        let d = match (da, db) {
            (None, None) => break,
            (Some(x), None) | (None, Some(x)) => x,
            (Some(x), Some(y)) => x.min(y),
        };
        let ws = g.align_down(d).max(pos);
        let we = (ws + g.window).min(size);
        // Shorten the window to where both images turn into holes, so trailing holes are skipped.
        let ha = if da.is_some_and(|x| x < we) {
            next_hole(base, da.unwrap_or(ws).max(ws), size)?
        } else {
            ws
        };
        let hb = if db.is_some_and(|x| x < we) {
            next_hole(target, db.unwrap_or(ws).max(ws), size)?
        } else {
            ws
        };
        let we = we.min(g.align_up(ha.max(hb)).max(ws + g.block)).min(size);
        let len = (we - ws) as usize;
        let a_has = da.is_some_and(|x| x < we);
        let b_has = db.is_some_and(|x| x < we);
        if a_has {
            read_full(base, &mut a[..len], ws)?;
            stats.bytes_read += len as u64;
        } else {
            a[..len].fill(0);
        }
        if b_has {
            read_full(target, &mut b[..len], ws)?;
            stats.bytes_read += len as u64;
        } else {
            b[..len].fill(0);
        }
        let differs = |r: Range<usize>| a[r.clone()] != b[r];
        if runs.push_blocks(ws, len, g.block, differs).is_break() {
            return Ok(stats);
        }
        pos = we;
    }
    let _ = runs.finish();
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report
mod tests {
    use super::*;
    use std::io::Write;

    /// 4 KiB blocks read `window` bytes at a time.
    fn geometry(window: u64) -> Geometry {
        Geometry {
            block: 4096,
            window,
        }
    }

    /// Every run an uncancelled scan emits, and what it read.
    fn collect(
        scan: impl FnOnce(&mut dyn FnMut(u64, u64) -> ControlFlow<()>) -> io::Result<ScanStats>,
    ) -> (Vec<(u64, u64)>, ScanStats) {
        let mut v = Vec::new();
        let stats = scan(&mut |o, l| {
            v.push((o, l));
            ControlFlow::Continue(())
        })
        .unwrap();
        (v, stats)
    }

    fn collect_alloc(f: &File, size: u64, start: u64, g: Geometry) -> Vec<(u64, u64)> {
        collect(|emit| allocated(f, size, start, g, || false, emit)).0
    }

    fn collect_delta(a: &File, b: &File, size: u64, g: Geometry) -> (Vec<(u64, u64)>, ScanStats) {
        collect(|emit| delta(a, b, size, 0, g, || false, emit))
    }

    #[test]
    fn allocated_skips_holes_and_zero_blocks() {
        let mut f = tempfile::tempfile().unwrap();
        let size = 1 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[1u8; 10], 4096 * 3 + 5).unwrap();
        f.write_all_at(&[0u8; 4096], 4096 * 4).unwrap(); // allocated but zero
        f.write_all_at(&[2u8; 8192], 4096 * 5).unwrap();
        f.write_all_at(&[3u8; 1], size - 1).unwrap();
        f.flush().unwrap();
        let g = geometry(16384);
        assert_eq!(
            collect_alloc(&f, size, 0, g),
            vec![(4096 * 3, 4096), (4096 * 5, 8192), (size - 4096, 4096)]
        );
        // Starting inside a block includes that block.
        assert_eq!(
            collect_alloc(&f, size, 4096 * 6 + 1, g),
            vec![(4096 * 6, 4096), (size - 4096, 4096)]
        );
    }

    #[test]
    fn last_partial_block_is_clipped_to_size() {
        let f = tempfile::tempfile().unwrap();
        let size = 4096 * 2 + 100;
        f.set_len(size).unwrap();
        f.write_all_at(&[9u8; 3], size - 3).unwrap();
        let g = geometry(8192);
        assert_eq!(collect_alloc(&f, size, 0, g), vec![(8192, 100)]);
    }

    #[test]
    fn holes_are_never_read() {
        // 1 GiB sparse images with two 4 KiB data blocks: each scan reads at most one window
        // per data extent (the window is cut at the next hole).
        let size = 1u64 << 30;
        let a = tempfile::tempfile().unwrap();
        let b = tempfile::tempfile().unwrap();
        for f in [&a, &b] {
            f.set_len(size).unwrap();
            f.write_all_at(&[1u8; 4096], 100 << 20).unwrap();
        }
        b.write_all_at(&[2u8; 4096], 700 << 20).unwrap();
        let g = geometry(1 << 20);
        let (v, stats) = collect(|emit| allocated(&b, size, 0, g, || false, emit));
        assert_eq!(v.len(), 2);
        assert!(
            stats.bytes_read <= 2 * 8192,
            "read {} bytes",
            stats.bytes_read
        );
        let (v, stats) = collect_delta(&a, &b, size, g);
        assert_eq!(v, vec![(700 << 20, 4096)]);
        assert!(
            stats.bytes_read <= 4 * 8192,
            "read {} bytes",
            stats.bytes_read
        );
    }

    #[test]
    fn a_cancelled_scan_stops_reading_even_when_it_finds_nothing() {
        // Two identical, fully written 1 MiB images: the delta is empty, so only the
        // cancellation check can end the scan before the last byte.
        let size = 1u64 << 20;
        let a = tempfile::tempfile().unwrap();
        let b = tempfile::tempfile().unwrap();
        for f in [&a, &b] {
            f.write_all_at(&vec![5u8; size as usize], 0).unwrap();
        }
        let g = geometry(65536);
        let never = |_: u64, _: u64| -> ControlFlow<()> { panic!("nothing differs") };
        let full = delta(&a, &b, size, 0, g, || false, never).unwrap();
        assert_eq!(full.bytes_read, 2 * size);
        // The caller goes away after two windows.
        let asked = std::cell::Cell::new(0u32);
        let gone = || {
            asked.set(asked.get() + 1);
            asked.get() > 2
        };
        let cut = delta(&a, &b, size, 0, g, gone, never).unwrap();
        assert_eq!(cut.bytes_read, 2 * 2 * g.window);
        let cut = allocated(&a, size, 0, g, || true, |_, _| ControlFlow::Continue(())).unwrap();
        assert_eq!(cut.bytes_read, 0);
    }

    #[test]
    fn delta_finds_changed_blocks_including_zeroed_ones() {
        let size = 256 * 1024;
        let a = tempfile::tempfile().unwrap();
        let b = tempfile::tempfile().unwrap();
        a.set_len(size).unwrap();
        b.set_len(size).unwrap();
        let data = vec![7u8; size as usize / 2];
        a.write_all_at(&data, 0).unwrap();
        b.write_all_at(&data, 0).unwrap();
        b.write_all_at(&[8u8], 4096 * 2).unwrap(); // changed
        b.write_all_at(&[0u8; 4096], 4096 * 5).unwrap(); // zeroed in target
        b.write_all_at(&[1u8], size - 1).unwrap(); // new data in a base hole
        let g = geometry(65536);
        let (v, _) = collect_delta(&a, &b, size, g);
        assert_eq!(v, vec![(8192, 4096), (4096 * 5, 4096), (size - 4096, 4096)]);
    }
}
