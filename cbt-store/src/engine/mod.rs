//! The backup/restore engine: moves bytes between block sources/targets and a repository.
//!
//! Owns the pipelines and their memory bounds; decisions come from `cbt_core::plan`.
//!
//! * backup: plan -> read (`readers` threads, `readahead` chunks ahead) -> zero check, BLAKE3,
//!   crc32c and zstd on `workers` blocking tasks -> `transfers` uploads in flight -> manifest.
//! * restore: manifest -> `transfers` downloads in flight -> verify + decompress + `pwrite` on
//!   blocking tasks -> fsync.
//!
//! # Memory bound
//! Backup holds at most `readers + readahead + 2 * workers + transfers` chunk buffers of at
//! most [`backup_buffer_bound`] bytes each: the chunk plus zstd's worst-case growth
//! (`ZSTD_compressBound`, about size/256: a body is given that room before compressing), or
//! the chunk plus one alignment unit when the source reads with `O_DIRECT` (the raw bytes then
//! start an alignment unit in, see [`DirectIo`]), plus 52 bytes of framing, rounded up to 4 KiB
//! (1,056,768 bytes for 1 MiB chunks, a 0.8% margin over the chunk). Raw buffers are pooled and
//! reused
//! (at most `readers + readahead + workers + transfers` exist, see
//! [`BackupOutcome::raw_buffers_allocated`]); an incompressible chunk is framed where it was
//! read and its read buffer is the body uploaded, returning to the pool when the upload
//! finishes; a compressed body is written into a buffer of its own, which lives until its
//! upload finishes and is then kept for the next chunk (at most 64 MiB of them, never more
//! than were in flight at once). Every chunk in flight holds one buffer, two while it is
//! compressed. Compressed bodies come from a process-wide pool (at most 64 MiB kept) that
//! hands out a kept buffer up to twice the size asked for: in a process that also restored, or
//! backed up with a larger chunk size, a body may be such a buffer, memory the pool already
//! held, which the bound does not count again. Restore holds at most `2 * transfers * (chunk_size + 52 +
//! 4096)` (a body and its decode buffer per chunk in flight; a body read for direct writes
//! starts up to 4 KiB into its buffer). A restore into a new file also keeps up to 4,096 skipped
//! zero runs (64 KiB) until it punches them back into holes.
//! On top come pooled zstd contexts (one per concurrent encode/decode, at most 16 kept).
//! In an encrypted repository each buffer holds 64 bytes more (the sealed envelope: header,
//! GCM tag, checksum); [`EngineOptions::backup_memory_bound`] and
//! [`EngineOptions::restore_memory_bound`] include it.
//!
//! Chunk maps are held in a bounded window too, except where noted:
//! * A full backup without a parent folds results in plan order into a
//!   [`cbt_core::maptree::TreeWriter`] (results wait for an earlier one, fewer than `ahead =
//!   readers + readahead + workers + 2 * transfers`: the readers hand out no more chunks the
//!   fold has not taken, so a stalled upload does not let later results pile up) and stores
//!   each finished segment as it passes its range: at most `ahead + 10 * 128` entries
//!   (1,310 with the defaults), whatever the volume size ([`BackupOutcome::map_entries_peak`]). Chunks it
//!   found already stored are remembered as index ranges (16 bytes per run of consecutive
//!   such chunks) and re-checked before the commit by walking the written tree in order.
//! * A full backup with a parent ([`BackupMode::FullWithParent`]) of format 2 and the same
//!   chunk size (resized or not) folds its map the same way and reads the parent's leaves in
//!   index order beside it: it holds the leaves from the chunk the fold waits for up to the
//!   highest chunk read (the stages reorder at most `readers + readahead + workers +
//!   transfers` chunks, so about two leaves) plus [`crate::repo::LEAF_WINDOW`] read ahead, 128
//!   entries each, whatever the volume size. [`BackupOutcome::map_entries_peak`] is the peak
//!   of the fold's and the window's entries counted together as they are held. With a parent
//!   of another chunk size it does not read the parent's map at all.
//! * An incremental ([`BackupMode::IncrementalOf`] against a format-2 parent of the same size)
//!   holds only the states of the chunks it reads plus the parent's segments on their paths
//!   (about 10 KB per touched 128-chunk range, see `cbt_core::maptree`), never the parent's
//!   whole map. Against a resized format-2 parent (same chunk size) it writes the whole new
//!   map instead, merging the parent's entries walked in order with the chunks read. One walk
//!   serves both the window above (the comparisons) and the merge, so every parent segment
//!   is read once: the walk queues the entries at chunks not read for the fold, at most
//!   [`MERGE_QUEUE`] leaves (a lookup that would read past a full queue waits for the fold,
//!   which reads the walk itself up to the chunk it waits for). Bounded as a full backup with
//!   a parent plus `(MERGE_QUEUE + 1) * 128` entries (the queue and the leaf being merged):
//!   at most 3,102 with the defaults ([`BackupOutcome::map_entries_peak`]).
//! * A restore of a format-2 snapshot ([`restore`]) walks the map segment by segment in index
//!   order, once for the totals (and, in place, the check that every chunk is stored) and
//!   once for the writes: at most
//!   `3 * 8 * 128` = 3,072 entries ([`RestoreReport::map_entries_peak`]), plus the byte ranges
//!   restored so far for the error of a failed in-place restore.
//! * Reading a restored target back against a stored snapshot ([`verify_target_stored`], what
//!   the PVC mover does after its restore) walks a format-2 map the same way: at most
//!   [`READ_BACK_ENTRIES`] = `(8 + 1) * 128` = 1,152 entries
//!   ([`TargetVerifyReport::map_entries_peak`]) and one chunk buffer.
//! * `Repository::verify` checks one snapshot at a time, walking a format-2 map the same
//!   way (at most `(8 + 1) * 128` = 1,152 entries, `VerifyReport::map_entries_peak`). It
//!   keeps a table of the store's chunks from one listing: 56 bytes per *stored* chunk
//!   (`repo::CHUNK_TABLE_ENTRY_BYTES`; up to twice that while the listing grows it), which
//!   grows with the repository, not with a volume: it saves a request per reference and
//!   downloads a chunk shared by many snapshots once.
//! * Still whole: a full backup or an incremental with a format-1 parent of the same chunk
//!   size, and [`BackupMode::Incremental`] (the caller hands in the whole parent), hold the
//!   parent's map (about 70 bytes per stored chunk) and build the child's.
//!   [`BackupMode::Incremental`] also reads the stored parent whole, once, to check the
//!   caller's against it; of a format-2 parent of the same size it keeps the segments on the
//!   changed paths as that walk passes them (what an [`BackupMode::IncrementalOf`] holds) and
//!   writes only the changed segments. [`restore_manifest`], [`verify_target`] and the
//!   restore, read-back or verify of a format-1 manifest hold the given map (a format-1 map
//!   is bounded by its own object).
//!
//! Hashes this run stored are remembered for deduplication in a table capped at 65,536
//! entries (about 4 MiB). With the defaults (1 MiB chunks,
//! 2 readers, readahead 4, 2 workers, 8 transfers) a backup uses at most 18 buffers of
//! 1,056,768 bytes (18.1 MiB) of chunk buffers; the
//! whole `cbt-benches` e2e process (512 MiB image, backup + incremental + restore) peaked at
//! about 160 MB RSS.
//!
//! # Choosing the chunk size
//! A changed byte costs its whole chunk: re-read, and re-uploaded unless identical content is
//! stored. Smaller chunks upload less per change but make every manifest (written in full by
//! each backup) and every in-memory chunk map larger. Measured with
//! `cargo test --release -p cbt-store --test engine_measure -- --ignored --nocapture`: 1 GiB
//! of incompressible data, 289 scattered writes of 8..64 KiB (4 KiB aligned) covering 1%:
//!
//! | chunk size      | chunks touched | uploaded per changed byte | manifest per fully allocated TiB |
//! |-----------------|----------------|---------------------------|----------------------------------|
//! | 4 MiB           | 65% (166/256)  | 64.8                      | 11.9 MB stored, ~18 MiB in memory |
//! | 1 MiB (default) | 25% (257/1024) | 25.1                      | 47 MB stored, ~73 MiB in memory   |
//! | 256 KiB         | 7.7% (317/4096)| 7.7                       | 190 MB stored, ~290 MiB in memory |
//!
//! Writes that cluster (logs, sequential files, most file systems) touch far fewer chunks than
//! this uniform scatter, and compressible data uploads less. The manifest column is format 1
//! (one JSON map per snapshot); format 2 stores about 40 bytes per chunk in shared segments
//! and an incremental writes only the segments it changes, so the 1 MiB default costs memory
//! and a larger full manifest, not per-incremental metadata. 256 KiB chunks cost a file or
//! request each, which halved full-backup throughput on S3 (a full backup picks the size, its
//! incrementals keep it).
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//! use cbt_core::{RangeSet, SnapshotName, Timestamp, VolumeName};
//! use cbt_store::engine::{self, BackupMode, BackupRequest, EngineOptions, FileSource, RestoreOptions};
//! use cbt_store::repo::{InitOptions, Repository};
//! use cbt_store::store::{LocalStore, ObjectStore};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new("/backups/repo")?);
//! let now = Timestamp::from_system_time(std::time::SystemTime::now());
//! let repo = Repository::init(store, InitOptions { chunk_size: None, now }).await?;
//! let volume = VolumeName::from_pvc("prod", "db-0")?;
//! let request = |name: &str, mode| -> Result<BackupRequest, cbt_core::CoreError> {
//!     Ok(BackupRequest {
//!         volume: volume.clone(),
//!         snapshot: SnapshotName::new(name)?,
//!         mode,
//!         created: now,
//!         source_info: Default::default(),
//!         labels: Default::default(),
//!         chunk_size: None,
//!         volume_size: None,
//!     })
//! };
//! let opts = EngineOptions::default();
//! let source = Arc::new(FileSource::open("/dev/vdb")?);
//! let full = engine::backup(&repo, source.clone(), request("mon", BackupMode::Full { allocated: None })?, &opts).await?;
//! // Ranges changed since "mon", e.g. from CSI GetMetadataDelta as (offset, length) pairs.
//! let changed = RangeSet::try_from_extents([(0, 4096), (1 << 30, 65536)])?;
//! // Reads only the map segments the change touches (the head is the one just committed;
//! // `repo.load_head` gives it in a later process).
//! let parent = Box::new(full.head);
//! engine::backup(&repo, source, request("tue", BackupMode::IncrementalOf { parent, changed })?, &opts).await?;
//! engine::restore(&repo, &volume, &SnapshotName::new("tue")?, "/tmp/db.img".as_ref(),
//!     &RestoreOptions::default(), &opts).await?;
//! # Ok(())
//! # }
//! ```

mod backup;
mod restore;
mod source;
mod verify_target;

use std::sync::Arc;

#[cfg(feature = "csi")]
pub mod cbt;

pub use backup::{BackupMode, BackupOutcome, BackupRequest, MERGE_QUEUE, MetadataIo, backup};
pub use restore::{RestoreOptions, RestoreReport, TargetKind, restore, restore_manifest};
pub use source::{BlockSource, DirectIo, FileSource, ReadCounts};
pub use verify_target::{
    READ_BACK_ENTRIES, TargetVerifyReport, verify_target, verify_target_stored,
};

use crate::chunk::OVERHEAD;
use crate::crypto::SEALED_OVERHEAD;

/// Bytes a chunk buffer holds beyond the chunk: its framing, and in an encrypted repository
/// the sealed envelope.
const BUFFER_OVERHEAD: u64 = (OVERHEAD + SEALED_OVERHEAD) as u64;

/// Progress of a running backup or restore, passed to the progress callback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Chunks finished.
    pub chunks_done: u64,
    /// Chunks planned.
    pub chunks_total: u64,
    /// Raw bytes finished.
    pub bytes_done: u64,
    /// Raw bytes planned.
    pub bytes_total: u64,
    /// Stored bytes transferred so far (uploaded or downloaded).
    pub bytes_transferred: u64,
}

/// Callback receiving [`Progress`] after each chunk (called from async tasks: keep it cheap).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Tuning of the pipelines (see the module docs for the memory bound).
#[derive(Clone)]
pub struct EngineOptions {
    /// Threads reading the source concurrently (backup); more than one keeps several
    /// requests in flight on network block devices.
    pub readers: usize,
    /// Chunks read ahead of the hashing stage (backup).
    pub readahead: usize,
    /// Blocking tasks hashing/compressing (backup) at once.
    pub workers: usize,
    /// Uploads (backup) or downloads (restore) in flight.
    pub transfers: usize,
    /// zstd level for chunk data (0 stores raw; default
    /// [`crate::chunk::DEFAULT_COMPRESSION_LEVEL`]).
    pub compression_level: i32,
    /// Called after each chunk.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("readers", &self.readers)
            .field("readahead", &self.readahead)
            .field("workers", &self.workers)
            .field("transfers", &self.transfers)
            .field("compression_level", &self.compression_level)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        EngineOptions {
            readers: 2,
            readahead: 4,
            workers: cpus.clamp(1, 8),
            transfers: 8,
            compression_level: crate::chunk::DEFAULT_COMPRESSION_LEVEL,
            progress: None,
        }
    }
}

impl EngineOptions {
    fn normalized(&self) -> EngineOptions {
        EngineOptions {
            readers: self.readers.max(1),
            readahead: self.readahead.max(1),
            workers: self.workers.max(1),
            transfers: self.transfers.max(1),
            compression_level: self.compression_level,
            progress: self.progress.clone(),
        }
    }

    /// Upper bound of chunk-buffer memory of a backup with these options, encrypted or not:
    /// `readers + readahead + 2 * workers + transfers` buffers of at most
    /// [`backup_buffer_bound`] bytes each. The chunk map adds at most `readers + readahead +
    /// workers + 2 * transfers + 10 * 128` entries for a full backup (see the module docs).
    pub fn backup_memory_bound(&self, chunk_size: u64) -> u64 {
        let o = self.normalized();
        ((o.readers + o.readahead + 2 * o.workers + o.transfers) as u64)
            .saturating_mul(backup_buffer_bound(chunk_size))
    }

    /// Upper bound of chunk-buffer memory of a restore with these options, encrypted or not.
    /// A format-2 map adds at most 3,072 entries (see the module docs).
    pub fn restore_memory_bound(&self, chunk_size: u64) -> u64 {
        // A body read for direct writes starts up to an alignment unit into its buffer.
        2 * self.normalized().transfers as u64
            * (chunk_size + BUFFER_OVERHEAD + crate::aligned::DIRECT_ALIGN as u64)
    }

    fn report(&self, p: &Progress) {
        if let Some(cb) = &self.progress {
            cb(p);
        }
    }
}

/// Largest chunk buffer a backup allocates for chunks of `chunk_size` bytes, encrypted or not.
///
/// A compressed body is given room for zstd's worst case before it is known whether the
/// chunk shrinks (`ZSTD_compressBound`: the size plus 1/256 of it plus up to 64 bytes for
/// small inputs, so 4 KiB more for a 1 MiB chunk), a raw one the chunk itself, one alignment
/// unit in when the source reads with `O_DIRECT` (4 KiB more); either adds the
/// framing and, in an encrypted repository, the sealed envelope. Buffers written by direct I/O
/// are whole 4 KiB units (the direct I/O alignment).
pub fn backup_buffer_bound(chunk_size: u64) -> u64 {
    let size = usize::try_from(chunk_size).unwrap_or(usize::MAX);
    let direct = chunk_size.saturating_add(crate::aligned::DIRECT_ALIGN as u64);
    let payload = (zstd::zstd_safe::compress_bound(size) as u64).max(direct);
    payload
        .saturating_add(BUFFER_OVERHEAD)
        .checked_next_multiple_of(crate::aligned::DIRECT_ALIGN as u64)
        .unwrap_or(u64::MAX)
}

/// Megabytes (10^6 bytes) per second of `bytes` over `ms` milliseconds.
pub(crate) fn mb_per_s(bytes: u64, ms: u64) -> f64 {
    if ms == 0 {
        0.0
    } else {
        bytes as f64 / 1e6 / (ms as f64 / 1e3)
    }
}

/// Whether a buffer is all zeros (16 bytes at a time).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|b| *b == 0)
}
