//! Where a file's data is: `lseek(SEEK_DATA/SEEK_HOLE)` over a file the caller opened.
//!
//! The one place in this crate that talks to the kernel, because the backup source, the
//! metadata server's image scan, the fake cluster's volume copies and the examples all need the
//! same answer with the same rules:
//!
//! - `ENXIO` from `SEEK_DATA` means no data at or after the offset: the rest is a hole.
//! - `EINVAL` (or `EOPNOTSUPP`) means this file cannot say where its holes are: block devices
//!   (their `lseek` knows only SET/CUR/END), `/proc` files, kernels or file systems without the
//!   two whence values. That is never an error and never "all holes": every byte is data. The
//!   walkers used to disagree here (one failed, one gave up, one failed only on the hole
//!   lookup); a backup of a block device must read it all, not fail or skip it.
//! - Anything else (`EIO`, `EBADF`, ...) is an I/O error for the caller.
//!
//! Opens nothing and reads no file data; all offsets are clipped to the `size` the caller gives.

use std::fs::File;
use std::io;

use rustix::fs::{SeekFrom, seek};
use rustix::io::Errno;

use crate::ranges::{ByteRange, RangeSet};

/// What the kernel answered for one lookup.
enum Answer {
    At(u64),
    /// ENXIO: nothing of the asked kind at or after the offset.
    None,
    /// EINVAL / EOPNOTSUPP: the file cannot report holes.
    Unsupported,
}

fn ask(file: &File, from: SeekFrom) -> io::Result<Answer> {
    match seek(file, from) {
        Ok(at) => Ok(Answer::At(at)),
        Err(Errno::NXIO) => Ok(Answer::None),
        Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => Ok(Answer::Unsupported),
        Err(e) => Err(e.into()),
    }
}

/// Start of the next data at or after `pos` below `size`; `None` if only holes remain.
/// A file that cannot report holes is data everywhere.
///
/// # Errors
/// I/O errors other than "no more data" and "holes not supported".
pub fn next_data(file: &File, pos: u64, size: u64) -> io::Result<Option<u64>> {
    if pos >= size {
        return Ok(None);
    }
    Ok(match ask(file, SeekFrom::Data(pos))? {
        Answer::At(at) => Some(at.max(pos)).filter(|&d| d < size),
        Answer::None => None,
        Answer::Unsupported => Some(pos),
    })
}

/// Start of the next hole at or after `pos`, at most `size` (the end of the file counts as a
/// hole). A file that cannot report holes has none before `size`.
///
/// # Errors
/// I/O errors other than "holes not supported".
pub fn next_hole(file: &File, pos: u64, size: u64) -> io::Result<u64> {
    if pos >= size {
        return Ok(size);
    }
    Ok(match ask(file, SeekFrom::Hole(pos))? {
        Answer::At(at) => at.clamp(pos, size),
        // ENXIO for SEEK_HOLE means `pos` is past the end of the file: all hole from there.
        Answer::None => pos,
        Answer::Unsupported => size,
    })
}

/// The data extents of `file` below `size`, merged, or `None` when the file cannot report
/// holes (then every byte is data, and callers that skip zeros must look at the bytes).
///
/// File systems may report more data than was written (whole blocks or extents), never less.
/// Memory grows with the number of extents.
///
/// # Errors
/// I/O errors other than "no more data" and "holes not supported".
pub fn data_ranges(file: &File, size: u64) -> io::Result<Option<RangeSet>> {
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match ask(file, SeekFrom::Data(pos))? {
            Answer::At(at) => at.max(pos),
            Answer::None => break,
            Answer::Unsupported => return Ok(None),
        };
        if start >= size {
            break;
        }
        let end = match ask(file, SeekFrom::Hole(start))? {
            Answer::At(at) => at.min(size),
            // The file shrank under us between the two calls: the rest is gone.
            Answer::None => break,
            Answer::Unsupported => return Ok(None),
        };
        if let Ok(r) = ByteRange::from_bounds(start, end) {
            ranges.push(r);
        }
        // A hole lookup always moves forward; `+ 1` guards against a kernel that did not.
        pos = end.max(start + 1);
    }
    Ok(Some(RangeSet::from_ranges(ranges)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_file_extents_cover_written_data_and_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let size = 16u64 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[7u8; 4096], 4 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], 12 << 20).unwrap();
        let Some(map) = data_ranges(&f, size).unwrap() else {
            // A file system without hole support (rare for temp dirs): everything is data.
            assert_eq!(next_data(&f, 5, size).unwrap(), Some(5));
            assert_eq!(next_hole(&f, 5, size).unwrap(), size);
            return;
        };
        assert!(map.contains(4 << 20) && map.contains((12 << 20) + 4095));
        assert!(map.total_bytes() < size, "no hole found: {map:?}");
        assert!(!map.contains(0));
        let first = next_data(&f, 0, size).unwrap().unwrap();
        assert!(first <= 4 << 20 && first > 0);
        let hole = next_hole(&f, first, size).unwrap();
        assert!(hole > 4 << 20 && hole <= 12 << 20);
        // Past the last data: only holes remain; offsets clip to `size`.
        assert_eq!(next_data(&f, (12 << 20) + (1 << 20), size).unwrap(), None);
        assert_eq!(next_data(&f, size, size).unwrap(), None);
        assert_eq!(next_hole(&f, size + 5, size).unwrap(), size);
        // A shorter `size` clips the map.
        let clipped = data_ranges(&f, 8 << 20).unwrap().unwrap();
        assert!(clipped.end() <= 8 << 20 && clipped.contains(4 << 20));
    }

    #[test]
    fn file_without_hole_support_is_all_data_not_an_error() {
        // /proc files answer SEEK_DATA and SEEK_HOLE with EINVAL, as block devices do.
        let f = File::open("/proc/version").unwrap();
        assert!(data_ranges(&f, 1 << 20).unwrap().is_none());
        assert_eq!(next_data(&f, 10, 100).unwrap(), Some(10));
        assert_eq!(next_hole(&f, 10, 100).unwrap(), 100);
        assert_eq!(next_data(&f, 100, 100).unwrap(), None);
    }

    #[test]
    fn empty_and_all_hole_files_have_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("e")).unwrap();
        assert_eq!(
            data_ranges(&f, 0).unwrap().map(|m| m.total_bytes()),
            Some(0)
        );
        f.set_len(1 << 20).unwrap();
        if let Some(m) = data_ranges(&f, 1 << 20).unwrap() {
            assert_eq!(m.total_bytes(), 0);
            assert_eq!(next_data(&f, 0, 1 << 20).unwrap(), None);
        }
    }
}
