//! Directory-backed object store: the embedded default backend.
//!
//! Owns the on-disk object format and its atomicity. Each object is one file at
//! `<root>/<key>` holding the body followed by an 8-byte trailer (`CBTC` magic + crc32c of the
//! body, little endian), so body and checksum are always replaced together. Writes go to a
//! staging file in `<root>/.cbt-tmp/` (same file system), are fsynced, then made visible with
//! `rename` (overwrite) or `link` (create-if-absent: the kernel refuses to link over an existing
//! name, so of two racers exactly one wins). A create-if-absent put writes to an unnamed
//! `O_TMPFILE` in the object's own directory instead, linked to its name through
//! `/proc/self/fd` when complete, where the file system allows it. A reader therefore never
//! sees a partial object. Bodies of 256 KiB or more (chunks) are written with `O_DIRECT` where
//! the file system allows it (their block-aligned prefix; the rest and the trailer through the
//! page cache), so they are neither copied into the page cache nor left for the sync to write.
//! Unlike S3, a key cannot be both an object and a "directory" of other keys (`a` and `a/b`);
//! such a put is refused with [`StoreError::InvalidKey`].
//! A put with deferred durability ([`super::PutOptions::defer_sync`]) is not fsynced; the
//! store keeps the object's file and every directory on its way open, and
//! [`ObjectStore::sync`] fsyncs exactly those (objects a `head` or a losing create-if-absent
//! found are kept too: a backup references them, and their writer may not have synced them
//! yet). Past [`DEFAULT_SYNC_EACH_MAX`] handles it drops them and calls `syncfs` once instead,
//! which is cheaper for a large batch but also waits for every other process's dirty data.
//! A crash can leave staging files behind in `.cbt-tmp/`; they are never listed, and those
//! older than [`STALE_STAGING_AGE`] are deleted when the store is opened
//! ([`LocalStore::remove_stale_staging`] does it on demand).
//!
//! # Staying inside the root
//! Keys are validated ([`super::validate_key`]), but whoever can write into the repository
//! directory can also plant a symbolic link (`chunks/ab -> /etc`). Every operation therefore
//! walks from the root one path segment at a time with `openat(O_NOFOLLOW | O_DIRECTORY)` and
//! acts on names relative to the directory it opened (`renameat`, `linkat`, `unlinkat`,
//! `openat(O_NOFOLLOW)`): a link anywhere below the root is never followed, and meeting one is
//! [`StoreError::UnsafePath`]. A delete of a key that is itself a link removes the link, never
//! its target. Only the root path itself is resolved normally (it was chosen by the operator
//! and canonicalized at open). Listings skip links.

use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::aligned::{self, AlignedBuf, DIRECT_ALIGN};

use super::{
    ListPage, ObjectMeta, ObjectStore, PutMode, PutOptions, PutOutcome, StoreError, UncheckedBody,
    validate_key, validate_prefix,
};

/// First read of an object file; each read that fills its piece doubles the next.
const READ_PIECE_START: usize = 8 * 1024;

/// Name of the staging directory under the root (reserved: no key may start with it).
pub(crate) const TEMP_DIR: &str = ".cbt-tmp";
const TRAILER_MAGIC: [u8; 4] = *b"CBTC";
/// Bytes of framing after every body.
pub const TRAILER_LEN: u64 = 8;
/// Staging files older than this are removed when a store is opened.
pub const STALE_STAGING_AGE: Duration = Duration::from_secs(24 * 3600);
/// Default number of objects per listing page.
pub const DEFAULT_PAGE_SIZE: usize = 1000;

/// Why a key that is both an object and a "directory" of other keys is refused.
const PREFIX_CLASH: &str =
    "the local store cannot hold both an object `a` and objects under `a/` (S3 can)";

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Object store in a local directory (see the module docs for the format and guarantees).
#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// The root, opened once: every walk starts from a duplicate of it, not from the path.
    root_fd: Arc<OwnedFd>,
    page_size: usize,
    /// Files and directories the next [`ObjectStore::sync`] must make durable.
    pending: std::sync::Mutex<Pending>,
    /// At most this many handles are kept in [`Inner::pending`]; beyond, `sync` is a `syncfs`.
    sync_each_max: usize,
    counts: SyncCounters,
}

/// Threads that fsync a batch at once (see [`Inner::fsync_all`]).
const SYNC_THREADS: usize = 16;

/// Handles kept until the next sync by default: past a few hundred fsyncs one `syncfs` is
/// cheaper, and the handles stay well under the usual limit of 1,024 open files.
pub const DEFAULT_SYNC_EACH_MAX: usize = 256;

/// What the next [`ObjectStore::sync`] has to make durable.
///
/// `syncfs` would cover it all, but it also waits for every other process's dirty data on the
/// same file system (measured at 0.23-2.5 s inside a 50 ms incremental backup on a busy
/// machine), so a small batch fsyncs just its own files and directories instead.
#[derive(Debug, Default)]
struct Pending {
    /// Objects put with deferred durability, or found existing by a deferred put or a `head`
    /// (a backup may reference them; another writer may not have synced them yet).
    files: std::collections::HashMap<String, File>,
    /// Every directory on the way to those objects (root-relative, `""` for the root): new
    /// entries in them, including new fan-out directories, must be durable too.
    dirs: std::collections::HashMap<String, OwnedFd>,
    /// More than `sync_each_max` handles were wanted: the handles were dropped and the next
    /// sync is a `syncfs`.
    overflow: bool,
}

impl Pending {
    fn len(&self) -> usize {
        self.files.len() + self.dirs.len()
    }
}

#[derive(Debug, Default)]
struct SyncCounters {
    files: AtomicU64,
    dirs: AtomicU64,
    syncfs: AtomicU64,
}

/// Durability calls a [`LocalStore`] has made in [`ObjectStore::sync`] (for tests and
/// diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounts {
    /// Object files fsynced one by one.
    pub file_fsyncs: u64,
    /// Directories fsynced one by one.
    pub dir_fsyncs: u64,
    /// `syncfs` calls (the fallback for large batches).
    pub syncfs: u64,
}

/// Directories on the way to `key` in walk order, root-relative (`""`, `a`, `a/b` for `a/b/c`).
fn dir_paths(key: &str) -> impl Iterator<Item = &str> {
    std::iter::once("").chain(key.match_indices('/').map(|(i, _)| &key[..i]))
}

impl LocalStore {
    /// Opens the store rooted at `root`, creating the directory (and parents) if needed.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the directory cannot be created or is not a directory.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_path_buf();
        let io_err = |source| StoreError::Io {
            key: root.display().to_string(),
            source,
        };
        fs::create_dir_all(root.join(TEMP_DIR)).map_err(io_err)?;
        let root = root.canonicalize().map_err(io_err)?;
        let store = Self {
            inner: Arc::new(Inner::new(root, DEFAULT_PAGE_SIZE, DEFAULT_SYNC_EACH_MAX)?),
        };
        // No live writer keeps a staging file for a day; older ones are crash leftovers.
        if let Err(e) = store.remove_stale_staging(STALE_STAGING_AGE) {
            tracing::warn!(error = %e, "could not clean up stale staging files");
        }
        Ok(store)
    }

    /// Same store with at most `page_size` (>= 1) objects per [`ObjectStore::list_page`].
    pub fn with_page_size(self, page_size: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                page_size: page_size.max(1),
                ..self.inner.fresh()
            }),
        }
    }

    /// Same store whose [`ObjectStore::sync`] fsyncs deferred objects and their directories
    /// one by one while they need at most `max` handles, and calls `syncfs` beyond.
    /// `0` always uses `syncfs`.
    pub fn with_sync_each_max(self, max: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                sync_each_max: max,
                ..self.inner.fresh()
            }),
        }
    }

    /// Durability calls made by [`ObjectStore::sync`] so far.
    pub fn sync_counts(&self) -> SyncCounts {
        let c = &self.inner.counts;
        SyncCounts {
            file_fsyncs: c.files.load(Ordering::Relaxed),
            dir_fsyncs: c.dirs.load(Ordering::Relaxed),
            syncfs: c.syncfs.load(Ordering::Relaxed),
        }
    }

    /// Root directory of the store.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// File holding `key` (for tools and tests that inspect the on-disk format).
    ///
    /// # Errors
    /// [`StoreError::InvalidKey`] for a key that breaks the key rules.
    pub fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.inner.root.join(key))
    }

    /// Deletes staging files older than `min_age` left by crashed writers; returns how many.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the staging directory cannot be read.
    pub fn remove_stale_staging(&self, min_age: Duration) -> Result<usize, StoreError> {
        let dir = self.inner.root.join(TEMP_DIR);
        let io_err = |source| StoreError::Io {
            key: TEMP_DIR.to_string(),
            source,
        };
        // Deleting inside a linked-to directory would delete outside the root.
        if !fs::symlink_metadata(&dir).map_err(io_err)?.is_dir() {
            return Err(StoreError::UnsafePath {
                key: TEMP_DIR.to_string(),
                path: TEMP_DIR.to_string(),
            });
        }
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&dir).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let old = entry.file_type().is_ok_and(|t| t.is_file())
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age >= min_age);
            if old && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn blocking<T, F>(&self, key: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Io {
                key: key.to_string(),
                source: io::Error::other(format!("local store worker failed: {e}")),
            })?
    }
}

fn io_at(key: &str) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| {
        if matches!(
            source.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory
        ) {
            StoreError::NotFound {
                key: key.to_string(),
            }
        } else {
            StoreError::Io {
                key: key.to_string(),
                source,
            }
        }
    }
}

fn body_size(key: &str, file_len: u64) -> Result<u64, StoreError> {
    file_len
        .checked_sub(TRAILER_LEN)
        .ok_or_else(|| StoreError::Malformed {
            key: key.to_string(),
            reason: format!(
                "file is {file_len} bytes, shorter than the {TRAILER_LEN}-byte checksum trailer"
            ),
        })
}

/// Flags of every directory opened on the way to an object: never through a symbolic link.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// What a name inside a directory is, without following it (`None`: it does not exist).
fn kind_at(dir: &OwnedFd, name: &str) -> io::Result<Option<FileType>> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Where the directory walk to a key's parent ended.
enum Parent {
    /// The directory holding the key's last segment, and that segment.
    Found(OwnedFd, String),
    /// A directory on the way does not exist (or is a regular file): no such object.
    Missing,
    /// A directory on the way is a regular file: the key clashes with an object `a` of `a/b`.
    Clash,
}

/// Whether `/proc/self/fd` links can name open files (to link an unnamed file into place).
fn proc_fd_links() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// Create-if-absent without a staging name: the object is written to an unnamed file
/// (`O_TMPFILE`) in the directory that will hold it and linked to `name` once complete, so a
/// crash leaves nothing behind and concurrent puts do not all create and delete names in one
/// staging directory (on ext4 that serialises them on its lock: measured at a fifth of a
/// backup's CPU time with 256 KiB chunks). `None` where the file system or a missing `/proc`
/// does not allow it: the caller then uses a staging file.
fn put_unnamed(
    parent: &OwnedFd,
    name: &str,
    body: &[u8],
    trailer: &[u8],
    durable: bool,
    io: &impl Fn(io::Error) -> StoreError,
) -> Result<Option<(PutOutcome, Option<File>)>, StoreError> {
    if !proc_fd_links() {
        return Ok(None);
    }
    let fd = match rfs::openat(
        parent,
        ".",
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    ) {
        Ok(fd) => fd,
        // No O_TMPFILE in this file system (or kernel).
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => return Ok(None),
        Err(e) => return Err(io(e.into())),
    };
    let file = File::from(fd);
    write_object(&file, body, trailer).map_err(io)?;
    if durable {
        file.sync_all().map_err(io)?;
    }
    // The /proc link names exactly this open inode; the new name is relative to the
    // directory opened without following links. Linking never replaces an existing name.
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    match rfs::linkat(
        rfs::CWD,
        link.as_str(),
        parent,
        name,
        AtFlags::SYMLINK_FOLLOW,
    ) {
        Ok(()) => {}
        Err(Errno::EXIST) => return Ok(Some((PutOutcome::AlreadyExists, None))),
        Err(e) => return Err(io(e.into())),
    }
    if durable {
        rfs::fsync(parent).map_err(|e| io(e.into()))?;
    }
    Ok(Some((PutOutcome::Created, Some(file))))
}

/// Bodies at least this large bypass the page cache (chunks; never segments or heads).
const DIRECT_MIN: usize = 256 << 10;
/// Aligned copies kept for reuse: as many as the engine has uploads in flight by default.
const MAX_POOLED_ALIGNED: usize = 8;

/// Aligned copies of bodies that were not aligned already (the chunk encoder's are), reused
/// between writes (at most as many exist as objects are written at once).
static ALIGNED: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

/// `bytes`, aligned for `O_DIRECT`, handed to `f`: as they are when they already start at an
/// aligned address, else copied into a buffer taken from [`ALIGNED`].
fn with_aligned<T>(bytes: &[u8], f: impl FnOnce(&[u8]) -> T) -> T {
    if aligned::is_aligned(bytes) {
        return f(bytes);
    }
    let mut buf = ALIGNED
        .lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_default();
    buf.resize(bytes.len()).copy_from_slice(bytes);
    let out = f(buf.as_slice());
    if let Ok(mut p) = ALIGNED.lock()
        && p.len() < MAX_POOLED_ALIGNED
    {
        p.push(buf);
    }
    out
}

/// Writes `body` then `trailer` into the empty file `file`.
///
/// A large body's aligned prefix is written with `O_DIRECT`: straight from memory to the
/// disk, without copying it into the page cache (a fifth of a full backup's CPU time) and
/// without leaving it for the commit's sync to write back after the last chunk (the
/// writes overlap the reading and hashing instead). The unaligned rest and the trailer go
/// through the page cache as before; durability is unchanged (the caller's fsync or the
/// store's sync still covers the file's metadata and its tail). Where the file system
/// refuses `O_DIRECT`, everything is written through the page cache.
fn write_object(file: &File, body: &[u8], trailer: &[u8]) -> io::Result<()> {
    let direct_len = if body.len() >= DIRECT_MIN {
        body.len() / DIRECT_ALIGN * DIRECT_ALIGN
    } else {
        0
    };
    if direct_len > 0 && write_direct(file, &body[..direct_len])? {
        // The rest is under a block: one write for it and the trailer.
        let mut rest = Vec::with_capacity(body.len() - direct_len + trailer.len());
        rest.extend_from_slice(&body[direct_len..]);
        rest.extend_from_slice(trailer);
        return file.write_all_at(&rest, direct_len as u64);
    }
    file.write_all_at(body, 0)?;
    file.write_all_at(trailer, body.len() as u64)
}

/// Writes `prefix` (a multiple of [`DIRECT_ALIGN`] long) at offset 0 of `file` with
/// `O_DIRECT`, then turns `O_DIRECT` off again. False, with nothing written, if the file
/// system refuses direct I/O.
fn write_direct(file: &File, prefix: &[u8]) -> io::Result<bool> {
    let flags = rfs::fcntl_getfl(file)?;
    match rfs::fcntl_setfl(file, flags | OFlags::DIRECT) {
        Ok(()) => {}
        // No direct I/O on this file system (tmpfs on older kernels, some FUSE mounts).
        Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let written = with_aligned(prefix, |buf| file.write_all_at(buf, 0));
    rfs::fcntl_setfl(file, flags)?;
    match written {
        Ok(()) => Ok(true),
        // Alignment the device does not accept: the caller rewrites it all buffered.
        Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The crc32c stored in the trailer after the first `size` bytes of `data` (a whole object
/// file), once the trailer's framing is checked.
fn stored_crc(key: &str, data: &[u8], size: usize) -> Result<u32, StoreError> {
    let trailer = &data[size..];
    if trailer[..4] != TRAILER_MAGIC {
        return Err(StoreError::Malformed {
            key: key.to_string(),
            reason: "checksum trailer magic is missing (not written by this store, or truncated)"
                .into(),
        });
    }
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&trailer[4..]);
    Ok(u32::from_le_bytes(stored))
}

impl Inner {
    fn new(root: PathBuf, page_size: usize, sync_each_max: usize) -> Result<Self, StoreError> {
        let root_fd = rfs::open(&root, dir_flags(), Mode::empty()).map_err(|e| StoreError::Io {
            key: root.display().to_string(),
            source: e.into(),
        })?;
        Ok(Inner {
            root,
            root_fd: Arc::new(root_fd),
            page_size,
            pending: std::sync::Mutex::new(Pending::default()),
            sync_each_max,
            counts: SyncCounters::default(),
        })
    }

    /// The same settings and root, nothing pending, no counts.
    fn fresh(&self) -> Self {
        Inner {
            root: self.root.clone(),
            root_fd: self.root_fd.clone(),
            page_size: self.page_size,
            pending: std::sync::Mutex::new(Pending::default()),
            sync_each_max: self.sync_each_max,
            counts: SyncCounters::default(),
        }
    }

    /// Keeps `file` (the object at `key`) and the directories on its way for the next sync.
    /// `dirs` are the directories the walk opened, in walk order (see [`dir_paths`]).
    fn keep_for_sync(&self, key: &str, file: Option<File>, dirs: Vec<OwnedFd>) {
        let Ok(mut p) = self.pending.lock() else {
            return;
        };
        if p.overflow {
            return;
        }
        if let Some(file) = file {
            // The newest file under `key` replaces an older one (a repaired chunk): only what
            // the name now holds is referenced.
            p.files.insert(key.to_string(), file);
        }
        for (path, fd) in dir_paths(key).zip(dirs) {
            if !p.dirs.contains_key(path) {
                p.dirs.insert(path.to_string(), fd);
            }
        }
        if p.len() > self.sync_each_max {
            *p = Pending {
                overflow: true,
                ..Pending::default()
            };
        }
    }

    /// Makes everything kept since the last sync durable: each file then each directory, or
    /// one `syncfs` if too many were wanted.
    fn sync(&self) -> Result<(), StoreError> {
        let taken = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            // A panic while holding the lock: nothing is known, sync the file system.
            Err(_) => Pending {
                overflow: true,
                ..Pending::default()
            },
        };
        let result = if taken.overflow {
            self.counts.syncfs.fetch_add(1, Ordering::Relaxed);
            let root = self.root_dir("")?;
            rfs::syncfs(&root).map_err(|e| io_at("")(e.into()))
        } else {
            let jobs: Vec<(&str, std::os::fd::BorrowedFd<'_>, bool)> = (taken.files.iter())
                .map(|(key, file)| (key.as_str(), file.as_fd(), false))
                .chain(
                    taken
                        .dirs
                        .iter()
                        .map(|(p, d)| (p.as_str(), d.as_fd(), true)),
                )
                .collect();
            self.fsync_all(&jobs)
        };
        if result.is_err()
            && let Ok(mut p) = self.pending.lock()
        {
            // Nothing synced is known durable: the next sync must cover it all again.
            p.overflow = true;
            p.files.clear();
            p.dirs.clear();
        }
        result
    }

    /// Fsyncs `jobs` (name, handle, is a directory) from up to [`SYNC_THREADS`] threads at
    /// once: each fsync waits for a journal commit or a device cache flush, and concurrent
    /// ones share them (measured: 45 one after another took 56 ms on a virtio disk).
    fn fsync_all(
        &self,
        jobs: &[(&str, std::os::fd::BorrowedFd<'_>, bool)],
    ) -> Result<(), StoreError> {
        let run = |part: &[(&str, std::os::fd::BorrowedFd<'_>, bool)]| -> Result<(), StoreError> {
            for (name, fd, is_dir) in part {
                rfs::fsync(fd).map_err(|e| io_at(name)(e.into()))?;
                let counter = if *is_dir {
                    &self.counts.dirs
                } else {
                    &self.counts.files
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        };
        if jobs.len() <= 1 {
            return run(jobs);
        }
        let per_thread = jobs.len().div_ceil(SYNC_THREADS);
        std::thread::scope(|scope| {
            let workers: Vec<_> = jobs
                .chunks(per_thread)
                .map(|part| scope.spawn(move || run(part)))
                .collect();
            let mut result = Ok(());
            for worker in workers {
                let outcome = worker.join().unwrap_or_else(|_| {
                    Err(StoreError::Io {
                        key: String::new(),
                        source: io::Error::other("local store fsync thread panicked"),
                    })
                });
                if result.is_ok() {
                    result = outcome;
                }
            }
            result
        })
    }

    fn unsafe_path(key: &str, segments: &[&str]) -> StoreError {
        StoreError::UnsafePath {
            key: key.to_string(),
            path: segments.join("/"),
        }
    }

    /// The root directory itself (the one path that is resolved normally: the operator chose
    /// it, and it was canonicalized and opened when the store was opened). A duplicate of the
    /// handle opened then: one cheap call instead of resolving the path for every operation
    /// (a full backup did it ~1,500 times).
    fn root_dir(&self, key: &str) -> Result<OwnedFd, StoreError> {
        self.root_fd.try_clone().map_err(io_at(key))
    }

    /// Walks from the root to the directory holding `key`'s last segment one segment at a
    /// time, relative to the directory before, never following a symbolic link (a link
    /// anywhere on the way is [`StoreError::UnsafePath`]). With `create`, missing directories
    /// are made; with `durable` too, their parents are fsynced at once so the new entries
    /// survive a crash (a deferred put leaves that to the next [`ObjectStore::sync`], which
    /// fsyncs every directory on the way, or calls `syncfs`, once for the whole batch).
    ///
    /// With `passed`, the directories walked through before the last one (root first) are
    /// moved into it instead of being closed, for [`Inner::keep_for_sync`].
    fn parent_of(
        &self,
        key: &str,
        create: bool,
        durable: bool,
        mut passed: Option<&mut Vec<OwnedFd>>,
    ) -> Result<Parent, StoreError> {
        let io = io_at(key);
        let segments: Vec<&str> = key.split('/').collect();
        let Some((last, dirs)) = segments.split_last() else {
            return Err(StoreError::InvalidKey {
                key: key.to_string(),
                reason: "key is empty",
            });
        };
        let mut dir = self.root_dir(key)?;
        for (i, seg) in dirs.iter().enumerate() {
            let mut made = false;
            loop {
                match rfs::openat(&dir, *seg, dir_flags(), Mode::empty()) {
                    Ok(next) => {
                        if made && durable {
                            rfs::fsync(&dir).map_err(|e| io(e.into()))?;
                        }
                        let prev = std::mem::replace(&mut dir, next);
                        if let Some(passed) = passed.as_deref_mut() {
                            passed.push(prev);
                        }
                        break;
                    }
                    Err(Errno::NOENT) if create && !made => {
                        match rfs::mkdirat(&dir, *seg, Mode::from_raw_mode(0o777)) {
                            Ok(()) | Err(Errno::EXIST) => made = true,
                            Err(e) => return Err(io(e.into())),
                        }
                    }
                    Err(Errno::NOENT) => return Ok(Parent::Missing),
                    // O_NOFOLLOW | O_DIRECTORY fail with ELOOP or ENOTDIR on a link; ENOTDIR
                    // also on a regular file. Look at what is there to tell them apart.
                    Err(Errno::LOOP | Errno::NOTDIR) => {
                        return match kind_at(&dir, seg).map_err(&io)? {
                            Some(FileType::RegularFile) => Ok(Parent::Clash),
                            None => Ok(Parent::Missing),
                            Some(_) => Err(Self::unsafe_path(key, &segments[..=i])),
                        };
                    }
                    Err(e) => return Err(io(e.into())),
                }
            }
        }
        Ok(Parent::Found(dir, (*last).to_string()))
    }

    /// Opens an object's file for reading without following a link; `None` if absent.
    fn open_object(&self, key: &str) -> Result<Option<File>, StoreError> {
        self.open_object_in(key, None)
    }

    /// [`Inner::open_object`], also handing back every directory on the way (root first)
    /// when `dirs` is given and the object exists.
    fn open_object_in(
        &self,
        key: &str,
        mut dirs: Option<&mut Vec<OwnedFd>>,
    ) -> Result<Option<File>, StoreError> {
        let io = io_at(key);
        let (dir, name) = match self.parent_of(key, false, false, dirs.as_deref_mut())? {
            Parent::Found(dir, name) => (dir, name),
            Parent::Missing | Parent::Clash => return Ok(None),
        };
        let opened = rfs::openat(
            &dir,
            name.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        );
        if let Some(dirs) = dirs {
            dirs.push(dir);
        }
        match opened {
            Ok(fd) => {
                let file = File::from(fd);
                // A directory opens fine read-only; it is not an object.
                if file.metadata().map_err(&io)?.is_file() {
                    Ok(Some(file))
                } else {
                    Ok(None)
                }
            }
            Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(Errno::LOOP) => Err(Self::unsafe_path(key, &key.split('/').collect::<Vec<_>>())),
            Err(e) => Err(io(e.into())),
        }
    }

    /// The staging directory, opened without following a link.
    fn staging_dir(&self, key: &str) -> Result<OwnedFd, StoreError> {
        let root = self.root_dir(key)?;
        rfs::openat(&root, TEMP_DIR, dir_flags(), Mode::empty()).map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => Self::unsafe_path(key, &[TEMP_DIR]),
            e => io_at(key)(e.into()),
        })
    }

    fn put(
        &self,
        key: &str,
        body: &[u8],
        crc: u32,
        mode: PutMode,
        durable: bool,
    ) -> Result<PutOutcome, StoreError> {
        let clash = || StoreError::InvalidKey {
            key: key.to_string(),
            reason: PREFIX_CLASH,
        };
        let mut dirs = Vec::new();
        let passed = if durable { None } else { Some(&mut dirs) };
        let (parent, name) = match self.parent_of(key, true, durable, passed)? {
            Parent::Found(dir, name) => (dir, name),
            Parent::Missing | Parent::Clash => return Err(clash()),
        };
        let (outcome, file) = self.put_in(&parent, &name, key, body, crc, mode, durable)?;
        if !durable {
            // What a reader now sees under `key` (ours, or an equal object another writer put
            // and may not have synced yet) and every directory entry leading to it must be
            // durable before the next sync returns.
            let file = file.or_else(|| {
                rfs::openat(
                    &parent,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ok()
                .map(File::from)
            });
            dirs.push(parent);
            self.keep_for_sync(key, file, dirs);
        }
        Ok(outcome)
    }

    /// Writes the object named `name` in `parent` (see [`Inner::put`]); returns the new file
    /// when this put created it.
    #[allow(clippy::too_many_arguments)]
    fn put_in(
        &self,
        parent: &OwnedFd,
        name: &str,
        key: &str,
        body: &[u8],
        crc: u32,
        mode: PutMode,
        durable: bool,
    ) -> Result<(PutOutcome, Option<File>), StoreError> {
        let io = io_at(key);
        let clash = || StoreError::InvalidKey {
            key: key.to_string(),
            reason: PREFIX_CLASH,
        };
        match kind_at(parent, name).map_err(&io)? {
            Some(FileType::Directory) => return Err(clash()),
            Some(FileType::RegularFile) if mode == PutMode::IfAbsent => {
                return Ok((PutOutcome::AlreadyExists, None));
            }
            Some(FileType::RegularFile) | None => {}
            // A link (or anything else) where an object belongs was not written by us.
            Some(_) => return Err(Self::unsafe_path(key, &key.split('/').collect::<Vec<_>>())),
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        trailer[..4].copy_from_slice(&TRAILER_MAGIC);
        trailer[4..].copy_from_slice(&crc.to_le_bytes());
        if mode == PutMode::IfAbsent
            && let Some(outcome) = put_unnamed(parent, name, body, &trailer, durable, &io)?
        {
            return Ok(outcome);
        }
        let staging_dir = self.staging_dir(key)?;
        let staging = format!(
            "{}-{}-{}",
            std::process::id(),
            STAGING_COUNTER.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let result = (|| {
            let fd = rfs::openat(
                &staging_dir,
                staging.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o666),
            )
            .map_err(|e| io(e.into()))?;
            let file = File::from(fd);
            write_object(&file, body, &trailer).map_err(&io)?;
            if durable {
                file.sync_all().map_err(&io)?;
            }
            // Both calls work on names inside directories we opened without following links:
            // the new entry lands exactly at `key` under the root.
            let outcome = match mode {
                PutMode::Overwrite => {
                    rfs::renameat(&staging_dir, staging.as_str(), parent, name)
                        .map_err(|e| io(e.into()))?;
                    (PutOutcome::Created, Some(file))
                }
                PutMode::IfAbsent => match rfs::linkat(
                    &staging_dir,
                    staging.as_str(),
                    parent,
                    name,
                    AtFlags::empty(),
                ) {
                    Ok(()) => (PutOutcome::Created, Some(file)),
                    Err(Errno::EXIST) => (PutOutcome::AlreadyExists, None),
                    Err(e) => return Err(io(e.into())),
                },
            };
            // The new directory entry must survive a crash before we report success (or, for
            // a deferred put, before the next `sync`).
            if durable {
                rfs::fsync(parent).map_err(|e| io(e.into()))?;
            }
            Ok(outcome)
        })();
        // After rename the staging name is gone; after link (or any failure) remove it.
        let _ = rfs::unlinkat(&staging_dir, staging.as_str(), AtFlags::empty());
        result
    }

    /// Reads and checks a whole object; refuses one whose body exceeds `max_len` before
    /// reading it, and never reads more than the file's size at open, into a buffer of
    /// exactly that size. With `aligned_at`, the body is read into a pooled aligned buffer so
    /// that its byte `aligned_at` sits at an aligned address (see
    /// [`ObjectStore::get_bounded_aligned`]).
    fn get(&self, key: &str, max_len: u64, aligned_at: Option<usize>) -> Result<Bytes, StoreError> {
        let read = self.get_unchecked(key, max_len, aligned_at)?;
        read.into_checked()
    }

    /// Like [`Inner::get`], leaving the comparison of the body with its stored crc32c to the
    /// caller (see [`ObjectStore::get_unchecked`]); the trailer's framing is checked here.
    fn get_unchecked(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Result<UncheckedBody, StoreError> {
        let io = io_at(key);
        let file = self.open_object(key)?.ok_or_else(|| StoreError::NotFound {
            key: key.to_string(),
        })?;
        let file_len = file.metadata().map_err(&io)?.len();
        let body_len = body_size(key, file_len)?;
        if body_len > max_len {
            return Err(StoreError::TooLarge {
                key: key.to_string(),
                size: Some(body_len),
                limit: max_len,
            });
        }
        let too_large = || StoreError::TooLarge {
            key: key.to_string(),
            size: Some(body_len),
            limit: max_len,
        };
        let len = usize::try_from(file_len).map_err(|_| too_large())?;
        let size = len - TRAILER_LEN as usize;
        // Into the exact buffer, in pieces growing from 8 KiB: on a cold file the kernel's
        // readahead then overlaps the pieces, where one read of the whole file waits for one
        // large request (measured on this project's VM, 8 threads reading 392 MiB of 1 MiB
        // chunk files: 0.28 s against 0.39 s). A file that shrank since it was measured is
        // damage seen mid-read, like a bad trailer.
        let read = |data: &mut [u8]| {
            let (mut done, mut piece) = (0, READ_PIECE_START);
            while done < data.len() {
                let end = data.len().min(done + piece);
                match file.read_at(&mut data[done..end], done as u64) {
                    Ok(0) => {
                        return Err(StoreError::Malformed {
                            key: key.to_string(),
                            reason: format!(
                                "file shrank below the {file_len} bytes it had when opened"
                            ),
                        });
                    }
                    Ok(n) => {
                        done += n;
                        if done == end {
                            piece = piece.saturating_mul(2);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(e)),
                }
            }
            Ok(())
        };
        match aligned_at {
            Some(at) => {
                let pad = (DIRECT_ALIGN - at % DIRECT_ALIGN) % DIRECT_ALIGN;
                let total = pad.checked_add(len).ok_or_else(too_large)?;
                let mut buf = aligned::take(total);
                let data = &mut buf.resize(total)[pad..];
                read(data)?;
                let stored = stored_crc(key, data, size)?;
                Ok(UncheckedBody::pending(
                    key,
                    aligned::into_bytes(buf, pad..pad + size),
                    stored,
                ))
            }
            None => {
                let mut data = vec![0u8; len];
                read(&mut data)?;
                let stored = stored_crc(key, &data, size)?;
                data.truncate(size);
                Ok(UncheckedBody::pending(key, Bytes::from(data), stored))
            }
        }
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let io = io_at(key);
        let file = self.open_object(key)?.ok_or_else(|| StoreError::NotFound {
            key: key.to_string(),
        })?;
        let size = body_size(key, file.metadata().map_err(&io)?.len())?;
        if range.start >= range.end || range.end > size {
            return Err(StoreError::RangeNotSatisfiable {
                key: key.to_string(),
                start: range.start,
                end: range.end,
                size: Some(size),
            });
        }
        let len = usize::try_from(range.end - range.start).map_err(|_| {
            StoreError::RangeNotSatisfiable {
                key: key.to_string(),
                start: range.start,
                end: range.end,
                size: Some(size),
            }
        })?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, range.start).map_err(&io)?;
        Ok(Bytes::from(buf))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let mut dirs = Vec::new();
        let Some(file) = self.open_object_in(key, Some(&mut dirs))? else {
            return Ok(None);
        };
        let meta = file.metadata().map_err(io_at(key))?;
        let found = ObjectMeta {
            key: key.to_string(),
            size: body_size(key, meta.len())?,
            last_modified: meta.modified().ok(),
        };
        // A backup that finds a chunk stored references it without writing it; whoever
        // wrote it may not have synced it yet, so the next sync covers it too (a file
        // already on disk costs one quick fsync).
        self.keep_for_sync(key, Some(file), dirs);
        Ok(Some(found))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let (dir, name) = match self.parent_of(key, false, false, None)? {
            Parent::Found(dir, name) => (dir, name),
            // A missing directory or a file-in-the-path means no object has this key.
            Parent::Missing | Parent::Clash => return Ok(()),
        };
        // unlinkat removes the name itself: a link there is removed, never what it points to.
        match rfs::unlinkat(&dir, name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT | Errno::ISDIR | Errno::NOTDIR) => Ok(()),
            Err(e) => Err(io_at(key)(e.into())),
        }
    }

    fn list_page(&self, prefix: &str, after: Option<&str>) -> Result<ListPage, StoreError> {
        let mut out = Vec::with_capacity(self.page_size.min(4096) + 1);
        self.walk(&self.root, "", prefix, after, &mut out)?;
        let next = if out.len() > self.page_size {
            out.truncate(self.page_size);
            out.last().map(|m| m.key.clone())
        } else {
            None
        };
        Ok(ListPage { objects: out, next })
    }

    /// Depth-first walk in key order. Children are sorted by the string their keys start with
    /// (`name/` for a directory, `name` for a file); because a name never contains `/`, every
    /// key under a directory compares the same way against a sibling as that string does, so
    /// the walk yields keys in global byte order and whole subtrees before `after` are skipped.
    fn walk(
        &self,
        dir: &Path,
        key_prefix: &str,
        prefix: &str,
        after: Option<&str>,
        out: &mut Vec<ObjectMeta>,
    ) -> Result<(), StoreError> {
        let io = io_at(key_prefix);
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let mut children = Vec::new();
        for entry in entries {
            let entry = entry.map_err(&io)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue; // not a key this store could have written
            };
            if key_prefix.is_empty() && name == TEMP_DIR {
                continue;
            }
            let ft = entry.file_type().map_err(&io)?;
            if ft.is_dir() {
                children.push((format!("{key_prefix}{name}/"), true, entry.path()));
            } else if ft.is_file() {
                children.push((format!("{key_prefix}{name}"), false, entry.path()));
            }
        }
        children.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, is_dir, path) in children {
            if out.len() > self.page_size {
                return Ok(());
            }
            if is_dir {
                if !(key.starts_with(prefix) || prefix.starts_with(key.as_str())) {
                    continue;
                }
                if after.is_some_and(|a| key.as_str() < a && !a.starts_with(key.as_str())) {
                    continue;
                }
                self.walk(&path, &key, prefix, after, out)?;
            } else {
                if !key.starts_with(prefix) || after.is_some_and(|a| key.as_str() <= a) {
                    continue;
                }
                let meta = match fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // deleted meanwhile
                    Err(e) => return Err(io_at(&key)(e)),
                };
                out.push(ObjectMeta {
                    size: meta.len().saturating_sub(TRAILER_LEN),
                    last_modified: meta.modified().ok(),
                    key,
                });
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        validate_key(key)?;
        let k = key.to_string();
        self.blocking(key, move |inner| {
            inner.put(&k, &body, crate::crc::crc32c(&body), mode, true)
        })
        .await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        opts: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        validate_key(key)?;
        if let Some(crc) = opts.crc32c {
            debug_assert_eq!(crc, crc32c::crc32c(&body), "put_with: wrong crc32c");
        }
        let k = key.to_string();
        self.blocking(key, move |inner| {
            let crc = opts.crc32c.unwrap_or_else(|| crate::crc::crc32c(&body));
            inner.put(&k, &body, crc, opts.mode, !opts.defer_sync)
        })
        .await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.blocking("", |inner| inner.sync()).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let k = key.to_string();
        self.blocking(key, move |inner| inner.get(&k, u64::MAX, None))
            .await
    }

    async fn get_bounded(&self, key: &str, max_len: u64) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let k = key.to_string();
        self.blocking(key, move |inner| inner.get(&k, max_len, None))
            .await
    }

    async fn get_bounded_aligned(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: usize,
    ) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let k = key.to_string();
        self.blocking(key, move |inner| inner.get(&k, max_len, Some(aligned_at)))
            .await
    }

    fn reads_now(&self) -> bool {
        true
    }

    fn get_unchecked_now(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Option<Result<UncheckedBody, StoreError>> {
        Some(validate_key(key).and_then(|()| self.inner.get_unchecked(key, max_len, aligned_at)))
    }

    async fn get_unchecked(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Result<UncheckedBody, StoreError> {
        validate_key(key)?;
        let k = key.to_string();
        self.blocking(key, move |inner| {
            inner.get_unchecked(&k, max_len, aligned_at)
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let k = key.to_string();
        self.blocking(key, move |inner| inner.get_range(&k, range))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        validate_key(key)?;
        let k = key.to_string();
        self.blocking(key, move |inner| inner.head(&k)).await
    }

    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, StoreError> {
        validate_prefix(prefix)?;
        let p = prefix.to_string();
        self.blocking(prefix, move |inner| {
            inner.list_page(&p, continuation.as_deref())
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        let k = key.to_string();
        self.blocking(key, move |inner| inner.delete(&k)).await
    }
}
