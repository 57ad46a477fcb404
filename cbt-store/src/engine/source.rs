//! Block sources: what a backup reads from (an image file or a block device), via `pread`.
//!
//! # Direct I/O
//!
//! Reading a device through the page cache costs a kernel copy per byte and, worse on a busy
//! node, evicts everything else cached there (a 1 TiB backup flushes the database's cache).
//! So a [`FileSource`] on a block device reads with `O_DIRECT` by default; an image file is
//! read through the cache (it usually is hot there). [`DirectIo`] forces either way.
//!
//! - A source says it reads directly through [`BlockSource::direct_alignment`] (default
//!   `None`, so embedders' sources compile and behave as before): the alignment of memory
//!   address, file offset and length its direct reads need. The backup engine then lays each
//!   chunk buffer out with the raw bytes at such a boundary (the 48-byte chunk header just
//!   before them). Chunk offsets are multiples of the chunk size (a power of two of at least
//!   64 KiB), so every read is aligned but the volume's last chunk, which may be short: a
//!   device's size is a multiple of its logical block size, an image file's need not be.
//! - [`BlockSource::read_exact_at`] still takes any buffer. A [`FileSource`] reads the
//!   aligned prefix of an aligned request with its `O_DIRECT` descriptor and the rest (a tail
//!   shorter than an alignment unit, or a request that is not aligned at all) with the
//!   ordinary one.
//! - The `O_DIRECT` descriptor is a second open of the same inode (through `/proc/self/fd`,
//!   never the path again). When that open fails (a file system without direct I/O, no
//!   `/proc`) or a direct read fails with `EINVAL` (an alignment the device does not take),
//!   the source logs it once at debug level and reads everything through the ordinary
//!   descriptor from then on, the refused read included. A backup never fails for it.
//! - Cost of the layout: with the raw bytes aligned, a chunk object (header, raw bytes,
//!   trailer) starts 48 bytes before an alignment boundary. An S3 upload needs no alignment
//!   and sends it as it is; the local store's own `O_DIRECT` write needs the object's start
//!   aligned and copies it once, in place of the copy the kernel made for a buffered read.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cbt_core::RangeSet;

use crate::aligned::{self, DIRECT_ALIGN};

/// Something a backup can read at arbitrary offsets from several threads at once.
pub trait BlockSource: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset` (short reads are errors). Any buffer, offset and length are
    /// accepted, aligned or not (see [`BlockSource::direct_alignment`]).
    ///
    /// # Errors
    /// The OS error, or `UnexpectedEof` past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The ranges that may hold data, if the source can tell (holes of a sparse file read as
    /// zeros and need not be read). `None` means "assume everything".
    ///
    /// # Errors
    /// The OS error.
    fn data_ranges(&self) -> io::Result<Option<RangeSet>> {
        Ok(None)
    }
    /// A human description for error messages (usually the path).
    fn describe(&self) -> String;
    /// `Some(alignment)` when reads whose buffer address, offset and length are multiples of
    /// `alignment` (a power of two) bypass the page cache, so the engine should read into
    /// memory aligned so; `None` (the default) when placement does not matter.
    fn direct_alignment(&self) -> Option<usize> {
        None
    }
}

/// Whether a [`FileSource`] reads with `O_DIRECT`, bypassing the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// Block devices directly, everything else through the page cache.
    #[default]
    Auto,
    /// Directly whenever the kernel accepts it, image files too.
    Always,
    /// Through the page cache.
    Never,
}

impl std::str::FromStr for DirectIo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DirectIo::Auto),
            "always" => Ok(DirectIo::Always),
            "never" => Ok(DirectIo::Never),
            other => Err(format!(
                "unknown direct I/O mode {other:?} (auto, always or never)"
            )),
        }
    }
}

impl std::fmt::Display for DirectIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DirectIo::Auto => "auto",
            DirectIo::Always => "always",
            DirectIo::Never => "never",
        })
    }
}

/// Bytes a [`FileSource`] has read so far, by the way they were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ReadCounts {
    /// Read with `O_DIRECT`, past the page cache.
    pub direct_bytes: u64,
    /// Read through the page cache.
    pub buffered_bytes: u64,
}

/// A regular file or block device opened read-only.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    /// The same inode opened with `O_DIRECT`, when asked for and the kernel accepts it.
    direct: Option<File>,
    /// Set once a direct read was refused: every read goes through `file` from then on.
    refused: AtomicBool,
    /// Test support: direct reads fail with `EINVAL` (see [`FileSource::refusing_direct_reads`]).
    refuse_direct: bool,
    direct_bytes: AtomicU64,
    buffered_bytes: AtomicU64,
    path: PathBuf,
    size: u64,
    regular: bool,
}

impl FileSource {
    /// Opens `path` read-only and determines its size (seeking to the end for devices); a
    /// block device is read with `O_DIRECT` ([`DirectIo::Auto`]).
    ///
    /// # Errors
    /// The OS error from opening or sizing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        FileSource::open_with(path, DirectIo::Auto)
    }

    /// Like [`FileSource::open`], reading with `O_DIRECT` as `direct` says (where the kernel
    /// refuses it, through the page cache: see the module docs).
    ///
    /// # Errors
    /// The OS error from opening or sizing (never for direct I/O being refused).
    pub fn open_with(path: impl AsRef<Path>, direct: DirectIo) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = File::open(&path)?;
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let regular = ft.is_file();
        let size = if regular {
            meta.len()
        } else if ft.is_block_device() || ft.is_char_device() {
            file.seek(SeekFrom::End(0))?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        let wanted = match direct {
            DirectIo::Auto => ft.is_block_device(),
            DirectIo::Always => true,
            DirectIo::Never => false,
        };
        let direct = if wanted {
            open_direct(&file, &path)
        } else {
            None
        };
        Ok(FileSource {
            file,
            direct,
            refused: AtomicBool::new(false),
            refuse_direct: false,
            direct_bytes: AtomicU64::new(0),
            buffered_bytes: AtomicU64::new(0),
            path,
            size,
            regular,
        })
    }

    /// Test support: this source's direct reads fail with `EINVAL`, as on a device refusing
    /// the alignment, so a test can watch it fall back (it opens a stand-in direct
    /// descriptor where the file system refused a real one, so the fallback is exercised on
    /// every machine).
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn refusing_direct_reads(mut self) -> Self {
        if self.direct.is_none() {
            self.direct = self.file.try_clone().ok();
        }
        self.refuse_direct = true;
        self
    }

    /// Whether reads currently go past the page cache (asked for, accepted by the kernel at
    /// open and not refused by a read since).
    pub fn reads_direct(&self) -> bool {
        self.direct.is_some() && !self.refused.load(Ordering::Relaxed)
    }

    /// Bytes read so far, directly and through the page cache.
    pub fn read_counts(&self) -> ReadCounts {
        ReadCounts {
            direct_bytes: self.direct_bytes.load(Ordering::Relaxed),
            buffered_bytes: self.buffered_bytes.load(Ordering::Relaxed),
        }
    }

    /// Length of the prefix of a read of `buf` at `offset` that can go through the direct
    /// descriptor: 0 unless direct reads are on and `buf` and `offset` are aligned.
    fn direct_prefix(&self, buf: &[u8], offset: u64) -> usize {
        if !self.reads_direct()
            || !aligned::is_aligned(buf)
            || !offset.is_multiple_of(DIRECT_ALIGN as u64)
        {
            return 0;
        }
        buf.len() / DIRECT_ALIGN * DIRECT_ALIGN
    }

    fn read_direct(&self, direct: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.refuse_direct {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::INVAL.raw_os_error(),
            ));
        }
        direct.read_exact_at(buf, offset)
    }

    fn read_buffered(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        self.buffered_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether hole detection (`SEEK_DATA`) works for this source.
    pub fn data_ranges_supported(&self) -> bool {
        matches!(self.data_ranges(), Ok(Some(_)))
    }
}

impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let whole = self.direct_prefix(buf, offset);
        if let (Some(direct), true) = (&self.direct, whole > 0) {
            match self.read_direct(direct, &mut buf[..whole], offset) {
                Ok(()) => {
                    self.direct_bytes.fetch_add(whole as u64, Ordering::Relaxed);
                    if whole == buf.len() {
                        return Ok(());
                    }
                    // The unaligned tail (a volume's end), through the page cache.
                    let at = offset.checked_add(whole as u64).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "read past 2^64")
                    })?;
                    return self.read_buffered(&mut buf[whole..], at);
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    if !self.refused.swap(true, Ordering::Relaxed) {
                        tracing::debug!(
                            path = %self.path.display(),
                            offset,
                            error = %e,
                            "direct read refused; reading through the page cache from now on"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.read_buffered(buf, offset)
    }

    fn data_ranges(&self) -> io::Result<Option<RangeSet>> {
        if !self.regular {
            return Ok(None);
        }
        cbt_core::extents::data_ranges(&self.file, self.size)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn direct_alignment(&self) -> Option<usize> {
        self.reads_direct().then_some(DIRECT_ALIGN)
    }
}

/// `file` opened again with `O_DIRECT` (the same inode, through `/proc/self/fd`), or `None`,
/// logged at debug level, where that is refused.
fn open_direct(file: &File, path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| {
            tracing::debug!(
                path = %path.display(),
                error = %e,
                "source refuses O_DIRECT; reading through the page cache"
            );
        })
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_and_finds_data_in_sparse_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 4 << 20).unwrap();
        f.flush().unwrap();
        let src = FileSource::open(&path).unwrap();
        assert_eq!(src.size(), 8 << 20);
        let mut buf = [0u8; 10];
        src.read_exact_at(&mut buf, (4 << 20) + 5).unwrap();
        assert_eq!(buf, [7u8; 10]);
        assert!(src.read_exact_at(&mut buf, (8 << 20) - 5).is_err());
        if let Some(data) = src.data_ranges().unwrap() {
            // File systems may report larger extents, but never miss written data.
            assert!(data.contains(4 << 20));
            assert!(data.total_bytes() < 8 << 20, "hole not detected: {data:?}");
        }
    }

    /// `len` bytes that differ at every offset, so a read from the wrong place shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    /// An image file of `len` pattern bytes in `dir`.
    fn image(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
        let path = dir.join("img");
        let data = pattern(len);
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    /// Whether `file`'s open file description has `O_DIRECT` set.
    fn has_o_direct(file: &File) -> bool {
        rustix::fs::fcntl_getfl(file)
            .unwrap()
            .contains(rustix::fs::OFlags::DIRECT)
    }

    #[test]
    fn image_files_are_read_through_the_cache_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = image(dir.path(), 3 * DIRECT_ALIGN);
        for src in [
            FileSource::open(&path).unwrap(),
            FileSource::open_with(&path, DirectIo::Never).unwrap(),
        ] {
            assert!(!src.reads_direct());
            assert_eq!(src.direct_alignment(), None);
            let mut buf = aligned::AlignedBuf::default();
            src.read_exact_at(buf.resize(2 * DIRECT_ALIGN), 0).unwrap();
            assert_eq!(
                src.read_counts(),
                ReadCounts {
                    direct_bytes: 0,
                    buffered_bytes: 2 * DIRECT_ALIGN as u64
                }
            );
        }
    }

    /// With `DirectIo::Always` an aligned read goes through a descriptor that really has
    /// `O_DIRECT` set, an unaligned tail and unaligned requests through the page cache, and
    /// every read returns the file's bytes.
    #[test]
    fn always_reads_aligned_requests_directly_and_tails_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let len = 5 * DIRECT_ALIGN + 100;
        let (path, data) = image(dir.path(), len);
        let src = FileSource::open_with(&path, DirectIo::Always).unwrap();
        let Some(direct) = &src.direct else {
            eprintln!(
                "skipping the O_DIRECT checks: {} refuses O_DIRECT",
                dir.path().display()
            );
            return;
        };
        assert!(has_o_direct(direct), "the direct descriptor lacks O_DIRECT");
        assert!(!has_o_direct(&src.file));
        assert_eq!(src.direct_alignment(), Some(DIRECT_ALIGN));

        // The whole file into aligned memory: five blocks directly, the 100-byte tail not.
        let mut buf = aligned::AlignedBuf::default();
        src.read_exact_at(buf.resize(len), 0).unwrap();
        assert_eq!(buf.as_slice(), &data[..]);
        let direct_bytes = 5 * DIRECT_ALIGN as u64;
        assert_eq!(
            src.read_counts(),
            ReadCounts {
                direct_bytes,
                buffered_bytes: 100
            }
        );
        // An unaligned offset and an unaligned address: through the page cache.
        src.read_exact_at(&mut buf.resize(2 * DIRECT_ALIGN)[..DIRECT_ALIGN], 512)
            .unwrap();
        assert_eq!(
            &buf.as_slice()[..DIRECT_ALIGN],
            &data[512..512 + DIRECT_ALIGN]
        );
        src.read_exact_at(&mut buf.as_mut_slice()[1..=DIRECT_ALIGN], 0)
            .unwrap();
        assert_eq!(&buf.as_slice()[1..=DIRECT_ALIGN], &data[..DIRECT_ALIGN]);
        assert_eq!(src.read_counts().direct_bytes, direct_bytes);
        assert_eq!(
            src.read_counts().buffered_bytes,
            100 + 2 * DIRECT_ALIGN as u64
        );
        // Past the end is still an error.
        assert!(
            src.read_exact_at(buf.resize(2 * DIRECT_ALIGN), 5 * DIRECT_ALIGN as u64)
                .is_err()
        );
        assert!(src.reads_direct());
    }

    /// A direct read refused with `EINVAL` is redone through the page cache, and every read
    /// after it goes there too: the reader never sees the refusal.
    #[test]
    fn a_refused_direct_read_falls_back_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let len = 4 * DIRECT_ALIGN;
        let (path, data) = image(dir.path(), len);
        let mut src = FileSource::open_with(&path, DirectIo::Always).unwrap();
        if src.direct.is_none() {
            src.direct = Some(src.file.try_clone().unwrap());
        }
        src.refuse_direct = true;
        assert_eq!(src.direct_alignment(), Some(DIRECT_ALIGN));
        let mut buf = aligned::AlignedBuf::default();
        for at in [0, 2 * DIRECT_ALIGN] {
            src.read_exact_at(buf.resize(2 * DIRECT_ALIGN), at as u64)
                .unwrap();
            assert_eq!(buf.as_slice(), &data[at..at + 2 * DIRECT_ALIGN]);
        }
        assert!(!src.reads_direct());
        assert_eq!(src.direct_alignment(), None);
        assert_eq!(
            src.read_counts(),
            ReadCounts {
                direct_bytes: 0,
                buffered_bytes: len as u64
            }
        );
    }

    #[test]
    fn direct_io_modes_parse_and_print() {
        for mode in [DirectIo::Auto, DirectIo::Always, DirectIo::Never] {
            assert_eq!(mode.to_string().parse::<DirectIo>(), Ok(mode));
        }
        assert!("sometimes".parse::<DirectIo>().is_err());
    }
}
