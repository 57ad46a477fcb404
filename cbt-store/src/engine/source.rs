//! Block sources: what a backup reads from (an image file or a block device), via `pread`.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use cbt_core::RangeSet;

/// Something a backup can read at arbitrary offsets from several threads at once.
pub trait BlockSource: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset` (short reads are errors).
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
}

/// A regular file or block device opened read-only.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
    regular: bool,
}

impl FileSource {
    /// Opens `path` read-only and determines its size (seeking to the end for devices).
    ///
    /// # Errors
    /// The OS error from opening or sizing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
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
        Ok(FileSource {
            file,
            path,
            size,
            regular,
        })
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
        self.file.read_exact_at(buf, offset)
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
}
