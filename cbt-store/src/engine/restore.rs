//! The restore pipeline: manifest -> downloads (each distinct chunk once) ->
//! verify/decompress -> pwrite to every offset holding that chunk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cbt_core::plan::{RestorePlan, TargetState};
use cbt_core::{Manifest, RangeSet, SnapshotName, VolumeName};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::{EngineOptions, Progress, mb_per_s};
use crate::repo::{ChunkContext, RepoError, Repository, Result, decode_chunk};

/// How the target is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// A file created by the restore: sized to the volume, sparse, zero chunks skipped.
    NewFile,
    /// An existing regular file, replaced atomically: the snapshot is restored into a sparse
    /// temporary file beside it that is renamed over it only once complete and fsynced (the old
    /// file survives a failed restore; the new file gets default permissions).
    ReplacedFile,
    /// A block device (or a file with `in_place`): its size is kept, it must hold the volume,
    /// and zero chunks are zeroed (hole punch, else written zeros) so the result is exact.
    InPlace,
}

/// Options of a restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Allow writing to an existing file or device.
    pub overwrite: bool,
    /// Treat an existing regular file like a device: keep its size, zero what must be zero.
    pub in_place: bool,
    /// Compute and return the plan without touching the target.
    pub dry_run: bool,
}

/// What a restore did (or, for a dry run, would do).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestoreReport {
    /// Volume restored.
    pub volume: VolumeName,
    /// Snapshot restored.
    pub snapshot: SnapshotName,
    /// Target path.
    pub target: PathBuf,
    /// How the target was treated.
    pub kind: TargetKind,
    /// True if nothing was written.
    pub dry_run: bool,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Non-zero chunks written.
    pub chunks: u64,
    /// Stored bytes downloaded (each distinct chunk once).
    pub bytes_downloaded: u64,
    /// Data bytes written.
    pub bytes_written: u64,
    /// Bytes zeroed on the target (in-place targets only).
    pub bytes_zeroed: u64,
    /// Wall time in milliseconds.
    pub wall_ms: u64,
    /// Write throughput in MB/s (bytes written / wall time).
    pub write_mb_per_s: f64,
}

/// Restores `volume/snapshot` to the file or block device at `target`.
///
/// # Errors
/// See [`restore_manifest`]; also [`RepoError::SnapshotNotFound`] and manifest errors.
pub async fn restore(
    repo: &Repository,
    volume: &VolumeName,
    snapshot: &SnapshotName,
    target: &Path,
    opts: &RestoreOptions,
    engine: &EngineOptions,
) -> Result<RestoreReport> {
    let manifest = repo.load_manifest(volume, snapshot).await?;
    restore_manifest(repo, &manifest, target, opts, engine).await
}

/// Restores a loaded manifest to `target`.
///
/// Every chunk is checked (object size and crc32c, raw crc32c, BLAKE3) before it is written.
/// A shared repository lock is held while chunks are read when the store allows it (so GC
/// cannot start meanwhile); without one (read-only credentials, a prune holding the exclusive
/// lock) the restore still runs and a chunk collected under it fails as missing.
/// A new file is created sparse at the volume size and only non-zero chunks are written; it
/// is removed again if the restore fails. An existing file is replaced atomically (unless
/// `in_place`). A device keeps its size and gets zeros where the snapshot has zeros; a failed
/// restore leaves it partially written. The target is fsynced at the end.
///
/// # Errors
/// [`RepoError::TargetExists`] without `overwrite`; [`RepoError::TargetTooSmall`] for a
/// device smaller than the volume; [`RepoError::ChunkMissing`] / [`RepoError::ChunkCorrupt`]
/// naming the chunk index and key; [`RepoError::TargetIo`]; store errors.
pub async fn restore_manifest(
    repo: &Repository,
    manifest: &Manifest,
    target: &Path,
    opts: &RestoreOptions,
    engine: &EngineOptions,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let engine = engine.normalized();
    let volume_size = manifest.volume_size();
    let tio = |offset: Option<u64>| {
        let path = target.to_path_buf();
        move |source: io::Error| RepoError::TargetIo {
            path: path.clone(),
            offset,
            source,
        }
    };
    let kind = match fs::metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => TargetKind::NewFile,
        Err(e) => return Err(tio(None)(e)),
        Ok(meta) => {
            if !opts.overwrite {
                return Err(RepoError::TargetExists {
                    path: target.to_path_buf(),
                });
            }
            let ft = meta.file_type();
            if ft.is_block_device() || ft.is_char_device() || (ft.is_file() && opts.in_place) {
                TargetKind::InPlace
            } else if ft.is_file() {
                TargetKind::ReplacedFile
            } else {
                return Err(tio(None)(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file or block device",
                )));
            }
        }
    };
    if kind == TargetKind::InPlace {
        let size = OpenOptions::new()
            .read(true)
            .open(target)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .map_err(tio(None))?;
        if size < volume_size {
            return Err(RepoError::TargetTooSmall {
                path: target.to_path_buf(),
                target_size: size,
                volume_size,
            });
        }
    }
    let state = match kind {
        TargetKind::InPlace => TargetState::Dirty,
        _ => TargetState::Zeroed,
    };
    let plan = RestorePlan::new(manifest, state);
    let mut report = RestoreReport {
        volume: manifest.volume.clone(),
        snapshot: manifest.snapshot.clone(),
        target: target.to_path_buf(),
        kind,
        dry_run: opts.dry_run,
        volume_size,
        chunks: plan.fetch_count(),
        bytes_downloaded: plan.unique_fetch_bytes(),
        bytes_written: plan.write_bytes(),
        bytes_zeroed: plan.zero_bytes(),
        wall_ms: 0,
        write_mb_per_s: 0.0,
    };
    if opts.dry_run {
        return Ok(report);
    }
    // A shared lock keeps GC from starting while chunks are being read. Restore must work from
    // read-only credentials and next to a stale exclusive lock (disaster recovery), so without
    // the lock it proceeds: every chunk is verified, so a chunk collected meanwhile is a
    // ChunkMissing error, never wrong data.
    let purpose = format!("restore {}/{}", manifest.volume, manifest.snapshot);
    let now = cbt_core::Timestamp::from_system_time(std::time::SystemTime::now());
    let lock = match repo.lock_shared(&purpose, now).await {
        Ok(lock) => Some(lock),
        Err(e) => {
            tracing::warn!(error = %e, "restoring without a repository lock");
            None
        }
    };

    // A replaced file is written as a new file beside it and renamed over it at the end.
    let write_path = match kind {
        TargetKind::ReplacedFile => {
            let mut name = target.file_name().unwrap_or_default().to_os_string();
            name.push(format!(
                ".cbt-restore-{}",
                crate::repo::random_id("restore")
            ));
            target.with_file_name(name)
        }
        _ => target.to_path_buf(),
    };
    let file = match kind {
        TargetKind::NewFile | TargetKind::ReplacedFile => OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&write_path)
            .and_then(|f| f.set_len(volume_size).map(|()| f)),
        TargetKind::InPlace => OpenOptions::new().write(true).open(target),
    }
    .map_err(tio(None))?;
    let file = Arc::new(file);

    // A zeroed (fresh) target already reads as zeros: zero blocks inside chunks stay holes.
    let sparse = state == TargetState::Zeroed;
    let mut result = write_all(
        repo,
        manifest,
        &plan,
        file.clone(),
        &write_path,
        sparse,
        &engine,
    )
    .await;
    if result.is_ok() && kind != TargetKind::InPlace {
        if kind == TargetKind::ReplacedFile {
            result = fs::rename(&write_path, target).map_err(tio(None));
        }
        // The new name must survive a crash too, not only the file's data.
        if result.is_ok() {
            let dir = match target.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            result = File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(tio(None));
        }
    }
    if result.is_err() && kind != TargetKind::InPlace {
        // Never leave a half-restored image that looks like a complete one.
        let _ = fs::remove_file(&write_path);
    }
    if let Some(lock) = lock
        && let Err(e) = lock.release().await
    {
        tracing::warn!(error = %e, "restore finished but its lock stays; break it by hand");
    }
    result?;
    report.wall_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    report.write_mb_per_s = mb_per_s(report.bytes_written, report.wall_ms);
    Ok(report)
}

async fn write_all(
    repo: &Repository,
    manifest: &Manifest,
    plan: &RestorePlan<'_>,
    file: Arc<File>,
    target: &Path,
    sparse: bool,
    engine: &EngineOptions,
) -> Result<()> {
    let path = target.to_path_buf();
    if !plan.zero_ranges().is_empty() {
        let (f, p, zero) = (file.clone(), path.clone(), plan.zero_ranges().clone());
        let chunk = plan.geometry().chunk_size() as usize;
        tokio::task::spawn_blocking(move || zero_ranges(&f, &p, &zero, chunk))
            .await
            .map_err(|e| RepoError::Internal {
                message: format!("zeroing task failed: {e}"),
            })??;
    }
    let name = format!("{}/{}", manifest.volume, manifest.snapshot);
    let pool: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let progress = Arc::new(Mutex::new(Progress {
        chunks_total: plan.fetch_count(),
        bytes_total: plan.write_bytes(),
        ..Progress::default()
    }));
    futures::stream::iter(plan.fetch_groups())
        .map(|g| {
            let (file, path, pool, name) = (file.clone(), path.clone(), pool.clone(), name.clone());
            let progress = progress.clone();
            async move {
                let (index, offset) = g.targets[0];
                let at = ChunkContext {
                    snapshot: &name,
                    index,
                    offset,
                };
                let body = repo.fetch_chunk(&g.chunk, at).await?;
                let downloaded = body.len() as u64;
                let copies = g.targets.len() as u64;
                let name2 = name.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = pool
                        .lock()
                        .ok()
                        .and_then(|mut p| p.pop())
                        .unwrap_or_default();
                    let at = ChunkContext {
                        snapshot: &name2,
                        index,
                        offset,
                    };
                    decode_chunk(&body, &g.chunk, at, &mut buf)?;
                    for (_, off) in &g.targets {
                        write_chunk(&file, &buf, *off, sparse).map_err(|(at, source)| {
                            RepoError::TargetIo {
                                path: path.clone(),
                                offset: Some(at),
                                source,
                            }
                        })?;
                    }
                    if let Ok(mut p) = pool.lock() {
                        p.push(buf);
                    }
                    Ok::<_, RepoError>(())
                })
                .await
                .map_err(|e| RepoError::Internal {
                    message: format!("restore writer task failed: {e}"),
                })??;
                let snapshot = {
                    let mut p = progress.lock().map_err(|_| RepoError::Internal {
                        message: "progress lock poisoned".into(),
                    })?;
                    p.chunks_done += copies;
                    p.bytes_done += g.chunk.raw_len * copies;
                    p.bytes_transferred += downloaded;
                    *p
                };
                engine.report(&snapshot);
                Ok::<_, RepoError>(())
            }
        })
        .buffer_unordered(engine.transfers)
        .try_collect::<Vec<()>>()
        .await?;
    let p = path.clone();
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|e| RepoError::Internal {
            message: format!("fsync task failed: {e}"),
        })?
        .map_err(|source| RepoError::TargetIo {
            path: p,
            offset: None,
            source,
        })
}

/// Block size below which zero runs inside a chunk are written rather than skipped.
const SPARSE_BLOCK: usize = 4096;

/// Writes one chunk at `offset`. With `sparse` (the target already reads as zeros), runs of
/// all-zero 4 KiB blocks are skipped so they stay holes. Errors carry the failing offset.
fn write_chunk(file: &File, buf: &[u8], offset: u64, sparse: bool) -> Result<(), (u64, io::Error)> {
    if !sparse {
        return file.write_all_at(buf, offset).map_err(|e| (offset, e));
    }
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < buf.len() {
        let end = (pos + SPARSE_BLOCK).min(buf.len());
        let zero = super::is_zero(&buf[pos..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                let at = offset + start as u64;
                file.write_all_at(&buf[start..pos], at)
                    .map_err(|e| (at, e))?;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(start) = run_start {
        let at = offset + start as u64;
        file.write_all_at(&buf[start..], at).map_err(|e| (at, e))?;
    }
    Ok(())
}

/// Makes `ranges` read as zeros: punch holes where the file system or device supports it,
/// otherwise write zeros in pieces of at most `piece` bytes.
fn zero_ranges(file: &File, path: &Path, ranges: &RangeSet, piece: usize) -> Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    let mut zeros: Vec<u8> = Vec::new();
    for r in ranges {
        let punched = fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            r.start(),
            r.len(),
        );
        if punched.is_ok() {
            continue;
        }
        if zeros.is_empty() {
            zeros = vec![0u8; piece.max(4096)];
        }
        let mut off = r.start();
        while off < r.end() {
            let n = (r.end() - off).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], off)
                .map_err(|source| RepoError::TargetIo {
                    path: path.to_path_buf(),
                    offset: Some(off),
                    source,
                })?;
            off += n as u64;
        }
    }
    Ok(())
}
