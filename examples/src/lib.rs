//! Support code shared by this package's examples: making volume images and "snapshotting" them
//! the way a storage backend would (reflink where the filesystem can, else a sparse copy).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// How a snapshot image was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMethod {
    /// Shared extents (FICLONE): instant, no data copied.
    Reflink,
    /// Data extents copied, holes kept.
    SparseCopy {
        /// Bytes copied.
        bytes: u64,
    },
}

/// Copies `src` to a new file `dst` as a point-in-time image: a reflink if the filesystem
/// supports it, otherwise only the data extents (holes stay holes).
///
/// # Errors
/// I/O errors of either file.
pub fn snapshot_image(src: &Path, dst: &Path) -> io::Result<SnapshotMethod> {
    let s = File::open(src)?;
    let d = File::options().write(true).create_new(true).open(dst)?;
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both are open.
    let r = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) };
    if r == 0 {
        return Ok(SnapshotMethod::Reflink);
    }
    let size = s.metadata()?.len();
    d.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    let mut copied = 0;
    while pos < size {
        let Some(data) = cbt_core::extents::next_data(&s, pos, size)? else {
            break;
        };
        let hole = cbt_core::extents::next_hole(&s, data, size)?;
        let mut off = data;
        while off < hole {
            let n = ((hole - off) as usize).min(buf.len());
            s.read_exact_at(&mut buf[..n], off)?;
            d.write_all_at(&buf[..n], off)?;
            off += n as u64;
            copied += n as u64;
        }
        pos = hole;
    }
    d.sync_all()?;
    Ok(SnapshotMethod::SparseCopy { bytes: copied })
}

/// Deterministic pseudo-random bytes (the workspace's xorshift64), so examples are
/// reproducible: `Noise::from_state(seed)`.
pub use cbt_core::testing::XorShift as Noise;

/// True if the two files have the same length and bytes (compared in 1 MiB pieces).
///
/// # Errors
/// I/O errors of either file.
pub fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let size = fa.metadata()?.len();
    if size != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(ba.len());
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}
