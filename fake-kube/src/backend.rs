//! The simulated storage backend: the one thing two fake clusters share.
//!
//! It owns snapshot handles and their sizes, as a storage array would. Each fake
//! API server's simulated CSI driver cuts snapshots here and looks handles up here,
//! so a handle created through one cluster is visible to the other.
//!
//! With a data directory ([`SharedBackend::with_data_dir`]) volumes and snapshots hold
//! bytes: block volumes are sparse files `<data>/volumes/<volumeHandle>`, snapshots are
//! copies `<data>/snapshots/<snapshotHandle>` (holes preserved) beside
//! `<snapshotHandle>.meta.json` naming the source volume, the layout `cbt serve-metadata
//! --dir <data>/snapshots` serves. Files are written under `<data>/tmp` and renamed into
//! place, so the snapshots directory never shows a half-written image.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// One snapshot held by the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSnapshot {
    /// CSI snapshot id (the `snapshotHandle`).
    pub handle: String,
    /// Volume the snapshot was cut from (CSI volume id).
    pub source_volume: String,
    /// Size in bytes (reported as `restoreSize`).
    pub size_bytes: i64,
    /// Creation time, Unix nanoseconds.
    pub created_unix_nanos: i64,
}

/// Why a data-backed backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The operation needs bytes, but the backend was made without a data directory.
    #[error("the storage backend has no data directory (use SharedBackend::with_data_dir)")]
    NoDataDir,
    /// No volume file for this handle.
    #[error("volume {handle} not found on the storage backend")]
    VolumeNotFound {
        /// CSI volume handle.
        handle: String,
    },
    /// No snapshot file for this handle.
    #[error("snapshot {handle} not found on the storage backend")]
    SnapshotNotFound {
        /// CSI snapshot handle.
        handle: String,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BackendError {
    let context = context.into();
    move |source| BackendError::Io { context, source }
}

#[derive(Default, Debug)]
struct Inner {
    next: u64,
    next_volume: u64,
    snapshots: BTreeMap<String, BackendSnapshot>,
}

/// Storage shared by any number of fake clusters; clones share state.
#[derive(Clone, Default, Debug)]
pub struct SharedBackend {
    inner: Arc<Mutex<Inner>>,
    data: Option<Arc<PathBuf>>,
}

impl SharedBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty backend whose volumes and snapshots are files under `dir` (created if missing).
    ///
    /// # Errors
    /// [`BackendError::Io`] when the `volumes`, `snapshots` or `tmp` subdirectory cannot be made.
    pub fn with_data_dir(dir: impl Into<PathBuf>) -> Result<Self, BackendError> {
        let dir = dir.into();
        for sub in ["volumes", "snapshots", "tmp"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(io_err(format!("creating {}", path.display())))?;
        }
        Ok(Self {
            inner: Arc::default(),
            data: Some(Arc::new(dir)),
        })
    }

    /// The data directory, if this backend holds bytes.
    pub fn data_dir(&self) -> Option<&Path> {
        self.data.as_deref().map(PathBuf::as_path)
    }

    /// `<data>/volumes`: one sparse file per volume, named by volume handle.
    pub fn volumes_dir(&self) -> Option<PathBuf> {
        self.data_dir().map(|d| d.join("volumes"))
    }

    /// `<data>/snapshots`: snapshot images named by handle plus `<handle>.meta.json`, nothing else.
    pub fn snapshots_dir(&self) -> Option<PathBuf> {
        self.data_dir().map(|d| d.join("snapshots"))
    }

    /// Where the file of volume `handle` lives (whether or not it exists).
    pub fn volume_path(&self, handle: &str) -> Option<PathBuf> {
        self.volumes_dir().map(|d| d.join(handle))
    }

    /// Where the image of snapshot `handle` lives (whether or not it exists).
    pub fn snapshot_path(&self, handle: &str) -> Option<PathBuf> {
        self.snapshots_dir().map(|d| d.join(handle))
    }

    fn require_data(&self) -> Result<&Path, BackendError> {
        self.data_dir().ok_or(BackendError::NoDataDir)
    }

    fn next_volume_handle(&self) -> String {
        let mut inner = self.lock();
        inner.next_volume += 1;
        format!("vol-{:06}", inner.next_volume)
    }

    /// Creates an all-zero (sparse) volume of `size_bytes` and returns its handle (CreateVolume).
    ///
    /// # Errors
    /// [`BackendError::NoDataDir`], or [`BackendError::Io`] when the file cannot be made.
    pub fn create_volume(&self, size_bytes: u64) -> Result<String, BackendError> {
        let data = self.require_data()?;
        let handle = self.next_volume_handle();
        let tmp = data.join("tmp").join(&handle);
        let file = File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        file.set_len(size_bytes)
            .map_err(io_err(format!("sizing {}", tmp.display())))?;
        self.publish(&tmp, &data.join("volumes").join(&handle))?;
        Ok(handle)
    }

    /// Creates a volume holding a copy of snapshot `snapshot`, grown to `size_bytes`
    /// (CreateVolume with a snapshot content source); returns the new volume's handle.
    ///
    /// # Errors
    /// [`BackendError::SnapshotNotFound`], [`BackendError::NoDataDir`] or [`BackendError::Io`].
    pub fn create_volume_from_snapshot(
        &self,
        snapshot: &str,
        size_bytes: u64,
    ) -> Result<String, BackendError> {
        let data = self.require_data()?;
        let src = data.join("snapshots").join(snapshot);
        if self.get(snapshot).is_none() || !src.is_file() {
            return Err(BackendError::SnapshotNotFound {
                handle: snapshot.to_string(),
            });
        }
        let handle = self.next_volume_handle();
        let tmp = data.join("tmp").join(&handle);
        copy_sparse(&src, &tmp, Some(size_bytes))?;
        self.publish(&tmp, &data.join("volumes").join(&handle))?;
        Ok(handle)
    }

    /// Creates a volume holding a copy of volume `source`, grown to `size_bytes` (a clone).
    ///
    /// # Errors
    /// [`BackendError::VolumeNotFound`], [`BackendError::NoDataDir`] or [`BackendError::Io`].
    pub fn clone_volume(&self, source: &str, size_bytes: u64) -> Result<String, BackendError> {
        let data = self.require_data()?;
        let src = data.join("volumes").join(source);
        if !src.is_file() {
            return Err(BackendError::VolumeNotFound {
                handle: source.to_string(),
            });
        }
        let handle = self.next_volume_handle();
        let tmp = data.join("tmp").join(&handle);
        copy_sparse(&src, &tmp, Some(size_bytes))?;
        self.publish(&tmp, &data.join("volumes").join(&handle))?;
        Ok(handle)
    }

    /// Size in bytes of volume `handle`.
    ///
    /// # Errors
    /// [`BackendError::VolumeNotFound`] or [`BackendError::NoDataDir`].
    pub fn volume_size(&self, handle: &str) -> Result<u64, BackendError> {
        let path = self.require_data()?.join("volumes").join(handle);
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|_| BackendError::VolumeNotFound {
                handle: handle.to_string(),
            })
    }

    /// Deletes volume `handle` (DeleteVolume); true if it existed.
    ///
    /// # Errors
    /// [`BackendError::NoDataDir`], or [`BackendError::Io`] when the file cannot be removed.
    pub fn delete_volume(&self, handle: &str) -> Result<bool, BackendError> {
        let path = self.require_data()?.join("volumes").join(handle);
        remove_if_present(&path)
    }

    /// Cuts a snapshot of volume `volume_handle` by copying its file (holes stay holes);
    /// `restoreSize` is the volume's size. The data-backed CreateSnapshot.
    ///
    /// # Errors
    /// [`BackendError::VolumeNotFound`], [`BackendError::NoDataDir`] or [`BackendError::Io`].
    pub fn snapshot_volume(&self, volume_handle: &str) -> Result<BackendSnapshot, BackendError> {
        self.cut(volume_handle, crate::values::unix_nanos_now())
    }

    /// Cuts one snapshot of each volume in `volume_handles`, all stamped with the same creation
    /// time (the data-backed CreateVolumeGroupSnapshot). The copies are one point in time only if
    /// nothing writes the volumes meanwhile: the simulated controller calls this holding the
    /// store lock, so no API-driven change interleaves (container processes writing their
    /// devices directly are not stopped). If any copy fails, the ones already made are deleted.
    ///
    /// # Errors
    /// [`BackendError::VolumeNotFound`], [`BackendError::NoDataDir`] or [`BackendError::Io`].
    pub fn snapshot_group(
        &self,
        volume_handles: &[String],
    ) -> Result<Vec<BackendSnapshot>, BackendError> {
        let created = crate::values::unix_nanos_now();
        let mut cut = Vec::with_capacity(volume_handles.len());
        for handle in volume_handles {
            match self.cut(handle, created) {
                Ok(snap) => cut.push(snap),
                Err(e) => {
                    for snap in &cut {
                        self.delete(&snap.handle);
                    }
                    return Err(e);
                }
            }
        }
        Ok(cut)
    }

    fn cut(&self, volume_handle: &str, created: i64) -> Result<BackendSnapshot, BackendError> {
        let data = self.require_data()?;
        let src = data.join("volumes").join(volume_handle);
        if !src.is_file() {
            return Err(BackendError::VolumeNotFound {
                handle: volume_handle.to_string(),
            });
        }
        let handle = {
            let mut inner = self.lock();
            inner.next += 1;
            format!("snap-{:06}", inner.next)
        };
        let tmp = data.join("tmp").join(&handle);
        let size = copy_sparse(&src, &tmp, None)?;
        // Meta first: a reader that sees the image also sees which volume it belongs to.
        // Same shape as cbt-csi's SnapshotMeta (other fields default).
        let meta = serde_json::to_vec_pretty(&serde_json::json!({"volume_id": volume_handle}))
            .unwrap_or_default();
        let meta_tmp = data.join("tmp").join(format!("{handle}.meta.json"));
        std::fs::write(&meta_tmp, meta)
            .map_err(io_err(format!("writing {}", meta_tmp.display())))?;
        let snaps = data.join("snapshots");
        self.publish(&meta_tmp, &snaps.join(format!("{handle}.meta.json")))?;
        self.publish(&tmp, &snaps.join(&handle))?;
        let snap = BackendSnapshot {
            handle: handle.clone(),
            source_volume: volume_handle.to_string(),
            size_bytes: i64::try_from(size).unwrap_or(i64::MAX),
            created_unix_nanos: created,
        };
        self.lock().snapshots.insert(handle, snap.clone());
        Ok(snap)
    }

    fn publish(&self, tmp: &Path, dst: &Path) -> Result<(), BackendError> {
        std::fs::rename(tmp, dst).map_err(io_err(format!(
            "renaming {} to {}",
            tmp.display(),
            dst.display()
        )))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in another test thread must not hide this test's own result.
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Cuts a snapshot of `source_volume` and returns it (the simulated CreateSnapshot RPC).
    pub fn create_snapshot(&self, source_volume: &str, size_bytes: i64) -> BackendSnapshot {
        let mut inner = self.lock();
        inner.next += 1;
        let snap = BackendSnapshot {
            handle: format!("snap-{:06}", inner.next),
            source_volume: source_volume.to_string(),
            size_bytes,
            created_unix_nanos: crate::values::unix_nanos_now(),
        };
        inner.snapshots.insert(snap.handle.clone(), snap.clone());
        snap
    }

    /// Cuts a snapshot of each `(volume, size)` at one instant and returns them (the simulated
    /// CreateVolumeGroupSnapshot RPC of a backend without bytes).
    pub fn create_group_snapshot(&self, volumes: &[(String, i64)]) -> Vec<BackendSnapshot> {
        let created = crate::values::unix_nanos_now();
        let mut inner = self.lock();
        volumes
            .iter()
            .map(|(volume, size)| {
                inner.next += 1;
                let snap = BackendSnapshot {
                    handle: format!("snap-{:06}", inner.next),
                    source_volume: volume.clone(),
                    size_bytes: *size,
                    created_unix_nanos: created,
                };
                inner.snapshots.insert(snap.handle.clone(), snap.clone());
                snap
            })
            .collect()
    }

    /// Looks a handle up (the simulated ListSnapshots-by-id RPC).
    pub fn get(&self, handle: &str) -> Option<BackendSnapshot> {
        self.lock().snapshots.get(handle).cloned()
    }

    /// Deletes a snapshot (the simulated DeleteSnapshot RPC) and its files; true if it existed.
    pub fn delete(&self, handle: &str) -> bool {
        let existed = self.lock().snapshots.remove(handle).is_some();
        if let Some(snaps) = self.snapshots_dir() {
            // The handle is gone either way; a file that cannot be removed only costs disk in a
            // test directory, and DeleteSnapshot has no caller that could act on the error.
            let _ = remove_if_present(&snaps.join(format!("{handle}.meta.json")));
            let _ = remove_if_present(&snaps.join(handle));
        }
        existed
    }

    /// All handles currently held, sorted.
    pub fn handles(&self) -> Vec<String> {
        self.lock().snapshots.keys().cloned().collect()
    }
}

fn remove_if_present(path: &Path) -> Result<bool, BackendError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(BackendError::Io {
            context: format!("removing {}", path.display()),
            source: e,
        }),
    }
}

/// Copy granularity; all-zero blocks of this size are skipped, so they stay holes.
const BLOCK: usize = 64 << 10;

/// Copies `src` to a new file `dst` writing only non-zero data, so holes stay holes; the copy
/// is `size` bytes long (default: the source's length; a larger size grows it with a hole).
/// Returns the copy's length.
fn copy_sparse(src: &Path, dst: &Path, size: Option<u64>) -> Result<u64, BackendError> {
    let input = File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    let src_len = input
        .metadata()
        .map_err(io_err(format!("stat of {}", src.display())))?
        .len();
    let out_len = size.unwrap_or(src_len);
    let output = File::create(dst).map_err(io_err(format!("creating {}", dst.display())))?;
    output
        .set_len(out_len)
        .map_err(io_err(format!("sizing {}", dst.display())))?;
    let copy_len = src_len.min(out_len);
    // A source that cannot report holes is all data; its zero blocks are still skipped below.
    let extents = cbt_core::extents::data_ranges(&input, copy_len)
        .map_err(io_err(format!("finding the data of {}", src.display())))?
        .unwrap_or_else(|| cbt_core::RangeSet::full(copy_len));
    let mut buf = vec![0u8; BLOCK];
    for (start, end) in extents.iter().map(|r| (r.start(), r.end())) {
        let mut off = start;
        while off < end {
            let n = usize::try_from(end - off).unwrap_or(BLOCK).min(BLOCK);
            let chunk = &mut buf[..n];
            input
                .read_exact_at(chunk, off)
                .map_err(io_err(format!("reading {} at {off}", src.display())))?;
            if chunk.iter().any(|&b| b != 0) {
                output
                    .write_all_at(chunk, off)
                    .map_err(io_err(format!("writing {} at {off}", dst.display())))?;
            }
            off += n as u64;
        }
    }
    output
        .sync_all()
        .map_err(io_err(format!("syncing {}", dst.display())))?;
    Ok(out_len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn snapshot_and_restore_copy_data_and_keep_holes() {
        let dir = tempfile::tempdir().unwrap();
        let b = SharedBackend::with_data_dir(dir.path()).unwrap();
        let vol = b.create_volume(32 << 20).unwrap();
        let path = b.volume_path(&vol).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 4096], 20 << 20).unwrap();
        drop(f);
        let snap = b.snapshot_volume(&vol).unwrap();
        assert_eq!(snap.size_bytes, 32 << 20);
        let sp = b.snapshot_path(&snap.handle).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&sp).unwrap());
        // Two small extents, not 32 MiB of blocks.
        assert!(std::fs::metadata(&sp).unwrap().blocks() * 512 < 1 << 20);
        let meta_path = b
            .snapshots_dir()
            .unwrap()
            .join(format!("{}.meta.json", snap.handle));
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(meta_path).unwrap()).unwrap();
        assert_eq!(meta["volume_id"], vol.as_str());
        let restored = b
            .create_volume_from_snapshot(&snap.handle, 64 << 20)
            .unwrap();
        let rp = b.volume_path(&restored).unwrap();
        let bytes = std::fs::read(&rp).unwrap();
        assert_eq!(bytes.len(), 64 << 20);
        assert_eq!(&bytes[..32 << 20], &std::fs::read(&path).unwrap()[..]);
        let mut names: Vec<String> = std::fs::read_dir(b.snapshots_dir().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [snap.handle.clone(), format!("{}.meta.json", snap.handle)]
        );
        assert!(b.delete(&snap.handle));
        assert!(!sp.exists());
        assert!(b.delete_volume(&restored).unwrap());
        assert!(matches!(
            b.create_volume_from_snapshot(&snap.handle, 1),
            Err(BackendError::SnapshotNotFound { .. })
        ));
        assert!(matches!(
            SharedBackend::new().create_volume(1),
            Err(BackendError::NoDataDir)
        ));
    }
}
