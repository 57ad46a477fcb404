//! The backup pipeline: source -> chunks -> repository -> manifest.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::borrow::Cow;
use std::collections::BTreeSet;

use cbt_core::manifest::{
    BackupStats, ChunkMap, ManifestHead, MapLocation, ParentRef, SnapshotMeta, SourceInfo,
    StoredManifest,
};
use cbt_core::maptree::{
    EncodedSegment, LEAF_SPAN, LoadedTree, SegmentRef, TreeShape, TreeWriter, derive_tree,
};
use cbt_core::plan::{BackupPlan, ChunkRead};
use cbt_core::ranges::ChunkSet;
use cbt_core::{
    ChunkGeometry, ChunkHash, ChunkState, Manifest, RangeSet, SnapshotName, Timestamp, VolumeName,
};
use futures::{StreamExt, TryStreamExt};

use super::{BlockSource, EngineOptions, Progress, is_zero, mb_per_s};
use crate::aligned::{AlignedBuf, Shelf};
use crate::chunk::{self, EncodedChunk, RawChunk};
use crate::repo::{
    ChunkAt, ChunkNovelty, EntryGauge, HeldLeaf, LEAF_WINDOW, MetadataWritten, RepoError, RepoLock,
    Repository, Result, WalkReads, random_id,
};

/// Full or incremental.
#[derive(Debug, Clone)]
pub enum BackupMode {
    /// Read every chunk that may hold data. `allocated` are the allocated ranges (CSI
    /// `GetMetadataAllocated`); when `None`, the source's own data map (SEEK_DATA) is used, or
    /// the whole volume. All-zero chunks are detected and never stored.
    Full {
        /// Allocated byte ranges, if known.
        allocated: Option<RangeSet>,
    },
    /// Read only the chunks touched by `changed` (CSI `GetMetadataDelta` against the parent's
    /// snapshot); every other chunk keeps the parent's state. The caller holds the parent's
    /// whole map, and the engine reads the stored parent whole to check it is the same; the
    /// outcome carries the child's whole map. Prefer [`BackupMode::IncrementalOf`], whose
    /// metadata cost follows the change (both write only the changed segments of a format-2
    /// parent).
    Incremental {
        /// The snapshot this one is based on.
        parent: Box<Manifest>,
        /// Byte ranges changed since the parent.
        changed: RangeSet,
    },
    /// An incremental against the stored parent whose head the caller loaded
    /// ([`Repository::load_head`], or the [`BackupOutcome::head`] of the backup that made it),
    /// reading as little of the parent as possible: in format 2, only the map segments on the
    /// paths to the chunks `changed` touches; the head is not read again before the commit,
    /// which checks that the stored head is still this one (a parent deleted or replaced since
    /// the caller read it fails the backup, nothing committed). The new snapshot's map shares
    /// every other segment with the parent, so the metadata written and read follows the
    /// change, not the volume (see [`cbt_core::maptree`]). After a resize (same chunk size)
    /// the map is written whole instead, merging the parent's entries, walked in order, with
    /// the chunks read: metadata once in proportion to the volume, memory still bounded. A
    /// format-1 parent is read whole. The outcome carries the head ([`BackupOutcome::head`]),
    /// not a full map (except with a format-1 parent).
    IncrementalOf {
        /// The stored snapshot this one is based on, as loaded from the repository.
        parent: Box<ManifestHead>,
        /// Byte ranges changed since the parent.
        changed: RangeSet,
    },
    /// A full backup (read like [`BackupMode::Full`]) that records `parent` as its lineage:
    /// for when the previous backup is known but no delta can be had (its CSI snapshot was
    /// deleted, CBT refused, the chunk size changes). The parent must exist in the repository
    /// with this id and belong to the same volume; its chunks seed deduplication, so chunks
    /// that did not change cost neither an upload nor an existence check. A format-2 parent of
    /// the same chunk size, of the same volume size or resized, is read in index order beside
    /// the backup, a window of leaves at a time, and the new map is written as it goes (the
    /// outcome carries no whole map); so is a parent of another chunk size, whose map is not
    /// read at all (no chunk can match by index). A format-1 parent of the same chunk size is
    /// held whole.
    FullWithParent {
        /// Allocated byte ranges, if known (as for [`BackupMode::Full`]).
        allocated: Option<RangeSet>,
        /// The previous snapshot of this volume in the repository.
        parent: ParentRef,
    },
}

/// What to back up and how to name it.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// Volume name (manifest prefix).
    pub volume: VolumeName,
    /// New snapshot name (must not exist yet).
    pub snapshot: SnapshotName,
    /// Full or incremental.
    pub mode: BackupMode,
    /// Creation time recorded in the manifest (injected).
    pub created: Timestamp,
    /// Kubernetes/CSI provenance recorded in the manifest.
    pub source_info: SourceInfo,
    /// Labels recorded in the manifest.
    pub labels: BTreeMap<String, String>,
    /// Chunk size of a full backup (default: the repository's, also with
    /// [`BackupMode::FullWithParent`]). Incrementals use the parent's; giving a different one is
    /// an error.
    pub chunk_size: Option<u64>,
    /// Volume size (default: the source size). May not exceed the source size.
    pub volume_size: Option<u64>,
}

/// The committed snapshot and the figures of the run.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// The manifest as committed, with its whole map; `None` when the run never held the
    /// whole map (see `head`): a full backup, and a [`BackupMode::IncrementalOf`] or
    /// [`BackupMode::FullWithParent`] unless its parent is format 1 (with the same chunk
    /// size).
    pub manifest: Option<Manifest>,
    /// The committed snapshot's metadata (always present).
    pub head: ManifestHead,
    /// Manifest metadata this run wrote, and read of its parent's.
    pub metadata: MetadataIo,
    /// Figures of the run (also stored in the manifest).
    pub stats: BackupStats,
    /// Read throughput in MB/s (bytes read / wall time).
    pub read_mb_per_s: f64,
    /// Raw chunk buffers allocated by the run (buffers are reused; at most
    /// `readers + readahead + workers + transfers` whatever the volume size: an incompressible
    /// chunk is uploaded from the buffer it was read into).
    pub raw_buffers_allocated: u64,
    /// Most chunk-map entries held at once. The readers hand out at most `ahead = readers +
    /// readahead + workers + 2 * transfers` chunks the fold has not taken yet (24 to 30 with
    /// the defaults), even while one upload stalls. A full backup without a parent writes its
    /// map as it goes: results waiting for an earlier chunk (fewer than `ahead`), the open leaf
    /// and the finished leaves not yet stored (fewer than `LEAF_WINDOW + 2`), at most
    /// `ahead + 10 * 128` whatever the volume size. A [`BackupMode::FullWithParent`] of a
    /// format-2 parent of the same chunk size also holds the parent's entries at the planned
    /// chunks from the leaf the fold waits in to the leaf of the highest chunk handed out,
    /// plus [`LEAF_WINDOW`] leaves read ahead, 128 entries each: at most
    /// `(LEAF_WINDOW + 2 + ceil(ahead / 128)) * 128` more. Both are counted in one gauge as
    /// they are held, so this is the peak of their sum (at most 2,718 with the defaults). An
    /// [`BackupMode::IncrementalOf`] of a resized format-2 parent holds the same, plus the
    /// parent's entries queued for the merge and the leaf being merged: at most
    /// `(MERGE_QUEUE + 1) * 128` more.
    /// Other modes hold a whole map (this run's or the parent's) and report its stored
    /// chunks.
    pub map_entries_peak: u64,
}

/// Manifest metadata moved by one backup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetadataIo {
    /// Segments and head written.
    pub written: MetadataWritten,
    /// Bytes of the parent's map segments read, as the store returned them (format 2
    /// parents: the paths to the changed chunks of an incremental, the whole parent read
    /// once by a [`BackupMode::Incremental`] (to check the map given, keeping those paths),
    /// or the parent walked in order by a resized incremental or a full backup with a parent;
    /// a format-1 parent is read whole and counted here as 0 segment bytes).
    pub parent_segment_bytes_read: u64,
    /// Parent map segments read (nodes and leaves), counted like
    /// [`MetadataIo::parent_segment_bytes_read`].
    pub parent_segments_read: u64,
}

/// Result of the CPU stage for one chunk.
enum Encoded {
    Zero(ChunkRead),
    Data(ChunkRead, EncodedChunk),
}

/// Result of the upload stage for one chunk.
struct Done {
    index: u64,
    state: ChunkState,
    raw_len: u64,
    uploaded_bytes: u64,
    deduplicated: bool,
    /// Deduplicated because the parent has the same chunk at the same index (the parent's
    /// existence vouches for it) rather than because it was found stored.
    from_parent: bool,
}

/// Backs up `source` into `repo` as a new snapshot.
///
/// # Guarantees
/// The snapshot becomes visible only when its manifest is written, last, with `IfAbsent`,
/// after every chunk it references is stored. If the run fails or is killed at any point no
/// snapshot is visible; re-running the same request re-reads the source but uploads only the
/// chunks that had not landed. A shared repository lock is held throughout, so GC cannot
/// remove chunks the run relies on; just before committing, the run checks that the lock is
/// still held (an operator may have broken it), that the parent still exists, and that every
/// chunk it deduplicated against instead of uploading is still stored, and fails with
/// [`RepoError::LockLost`] / [`RepoError::ChunkMissing`] instead of committing otherwise.
///
/// # Errors
/// [`RepoError::SnapshotExists`]; [`RepoError::Locked`] while prune/GC runs;
/// [`RepoError::LockLost`] if the lock was broken while it ran;
/// [`RepoError::InvalidRequest`] (parent of another volume, deleted parent, volume larger than
/// the source); [`RepoError::Core`] for ranges past the end; [`RepoError::SourceIo`]; store
/// errors with the chunk key.
pub async fn backup(
    repo: &Repository,
    source: Arc<dyn BlockSource>,
    req: BackupRequest,
    opts: &EngineOptions,
) -> Result<BackupOutcome> {
    let started = Instant::now();
    let opts = opts.normalized();
    let source_size = source.size();
    let volume_size = req.volume_size.unwrap_or(source_size);
    if volume_size > source_size {
        return Err(RepoError::InvalidRequest {
            reason: format!(
                "volume size {volume_size} exceeds the size of {} ({source_size} bytes)",
                source.describe()
            ),
        });
    }
    let (plan, bytes_in_ranges) = match &req.mode {
        BackupMode::Full { allocated } | BackupMode::FullWithParent { allocated, .. } => {
            if let BackupMode::FullWithParent { parent, .. } = &req.mode
                && parent.snapshot == req.snapshot
            {
                return Err(RepoError::InvalidRequest {
                    reason: format!("snapshot {} cannot be its own parent", req.snapshot),
                });
            }
            let chunk_size = req.chunk_size.unwrap_or(repo.config().chunk_size);
            let detected;
            let allocated = match allocated {
                Some(a) => Some(a),
                None => {
                    // Walking extents is a syscall per extent: keep it off the async threads.
                    let src = source.clone();
                    detected = tokio::task::spawn_blocking(move || src.data_ranges())
                        .await
                        .map_err(|e| RepoError::Internal {
                            message: format!("extent scan task failed: {e}"),
                        })?
                        .map_err(|e| RepoError::SourceIo {
                            path: source.describe(),
                            offset: 0,
                            len: 0,
                            source: e,
                        })?
                        .map(|r| r.clip(volume_size));
                    detected.as_ref()
                }
            };
            let in_ranges = allocated.map_or(volume_size, |a| a.clip(volume_size).total_bytes());
            (
                BackupPlan::full(volume_size, chunk_size, allocated)?,
                in_ranges,
            )
        }
        BackupMode::IncrementalOf {
            parent: head,
            changed,
        } => {
            check_incremental_parent(&req, &head.volume, &head.snapshot, head.chunk_size())?;
            if head.snapshot == req.snapshot {
                return Err(RepoError::InvalidRequest {
                    reason: format!("snapshot {} cannot be its own parent", req.snapshot),
                });
            }
            let in_ranges = changed.clip(volume_size).total_bytes();
            (
                BackupPlan::incremental_of(&head.geometry, changed, volume_size)?,
                in_ranges,
            )
        }
        BackupMode::Incremental { parent, changed } => {
            check_incremental_parent(&req, &parent.volume, &parent.snapshot, parent.chunk_size())?;
            let in_ranges = changed.clip(volume_size).total_bytes();
            (
                BackupPlan::incremental(parent, changed, volume_size)?,
                in_ranges,
            )
        }
    };
    let purpose = format!("backup {}/{}", req.volume, req.snapshot);
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    // Three independent steps go together (each is a round trip or more on S3): whether the
    // name is taken, the lock, and the parent's map segments on the changed paths. Reading
    // those segments before the lock is safe: they are immutable and named by their content,
    // so what is read is right whenever it is read, and the commit checks that the parent
    // still stands as the caller read it, so they are still there (see `ParentCheck::Same`).
    let lean = match &req.mode {
        BackupMode::IncrementalOf { parent, .. } => {
            lean_root(parent, plan.geometry()).map(|root| (parent.as_ref(), root))
        }
        _ => None,
    };
    let preload = async {
        match lean {
            Some((head, root)) => load_lean(repo, head, root, &plan).await.map(Some),
            None => Ok(None),
        }
    };
    let (exists, lock, preloaded) = tokio::join!(
        repo.snapshot_exists(&req.volume, &req.snapshot),
        repo.lock_shared(&purpose, now),
        preload
    );
    let early = match (exists, preloaded) {
        (Ok(true), _) => Err(RepoError::SnapshotExists {
            volume: req.volume.to_string(),
            snapshot: req.snapshot.to_string(),
        }),
        (Err(e), _) => Err(e),
        (Ok(false), Err(e)) => Err(match lean {
            // A segment gone missing is most likely a parent pruned (and collected) since the
            // caller read its head: say so rather than report damage.
            Some((head, _)) => match check_parent_same(repo, head).await {
                Err(gone) => gone,
                Ok(()) => e,
            },
            None => e,
        }),
        (Ok(false), Ok(p)) => Ok(p),
    };
    let (lock, preloaded) = match (lock, early) {
        (Ok(lock), Ok(p)) => (lock, p),
        (Ok(lock), Err(e)) => {
            // The original error matters more than a failure to release.
            let _ = lock.release().await;
            return Err(e);
        }
        // The name taken, or the parent gone, is the more useful answer than a held lock.
        (Err(_), Err(e)) | (Err(e), Ok(_)) => return Err(e),
    };
    let result = run_locked(
        repo,
        source,
        req,
        &opts,
        plan,
        bytes_in_ranges,
        started,
        &lock,
        preloaded,
    )
    .await;
    match result {
        Ok(outcome) => {
            // The snapshot is committed: reporting failure now would make a caller retry a
            // backup that exists. A shared lock left behind only delays GC, which names it.
            if let Err(e) = lock.release().await {
                tracing::warn!(error = %e, "backup committed but its lock stays; break it with `cbt lock break` once no backup runs");
            }
            Ok(outcome)
        }
        Err(e) => {
            // The original error matters more than a failure to release.
            let _ = lock.release().await;
            Err(e)
        }
    }
}

/// The parent as this run holds it: a whole manifest, or (format 2, same geometry) its head
/// and the segments on the paths to the planned chunks.
enum Parent<'a> {
    Whole(Cow<'a, Manifest>),
    Lean {
        head: ManifestHead,
        shape: TreeShape,
        root: Option<SegmentRef>,
        loaded: LoadedTree,
        /// The whole parent, when the caller handed it in ([`BackupMode::Incremental`]).
        given: Option<&'a Manifest>,
    },
    /// The parent of a full backup ([`BackupMode::FullWithParent`]) that streams its map: a
    /// format-2 parent of the same geometry held as a sliding window of its leaves, or (no
    /// window) one of another chunk size, whose chunks cannot match by index.
    Window {
        head: ManifestHead,
        window: Option<Box<ParentWindow>>,
    },
}

impl Parent<'_> {
    fn view(&self) -> Option<ParentView<'_>> {
        Some(match self {
            Parent::Whole(m) => ParentView::Full(&m.chunks),
            Parent::Lean { shape, loaded, .. } => ParentView::Lean(shape, loaded),
            Parent::Window { window, .. } => ParentView::Window(&window.as_ref()?.state),
        })
    }

    fn link(&self) -> ParentRef {
        match self {
            Parent::Whole(m) => ParentRef {
                snapshot: m.snapshot.clone(),
                snapshot_id: m.snapshot_id.clone(),
            },
            Parent::Lean { head, .. } | Parent::Window { head, .. } => head.as_parent(),
        }
    }

    fn names(&self) -> (&VolumeName, &SnapshotName) {
        match self {
            Parent::Whole(m) => (&m.volume, &m.snapshot),
            Parent::Lean { head, .. } | Parent::Window { head, .. } => {
                (&head.volume, &head.snapshot)
            }
        }
    }
}

/// The parent's chunk states the pipeline compares against (only planned indices are asked).
#[derive(Clone, Copy)]
enum ParentView<'a> {
    Full(&'a ChunkMap),
    Lean(&'a TreeShape, &'a LoadedTree),
    Window(&'a WindowState),
}

impl ParentView<'_> {
    fn get(&self, index: u64) -> ChunkState {
        match self {
            ParentView::Full(m) => m.get(index),
            ParentView::Lean(shape, loaded) => loaded.get(shape, index),
            ParentView::Window(w) => w.get(index),
        }
    }

    fn chunk_size(&self) -> u64 {
        match self {
            ParentView::Full(m) => m.geometry().chunk_size(),
            ParentView::Lean(shape, _) => shape.geometry().chunk_size(),
            ParentView::Window(w) => w.shape.geometry().chunk_size(),
        }
    }
}

/// An incremental's parent must be a snapshot of the same volume, and a chunk size given
/// with the request must be the parent's (an incremental keeps it).
fn check_incremental_parent(
    req: &BackupRequest,
    volume: &VolumeName,
    snapshot: &SnapshotName,
    chunk_size: u64,
) -> Result<()> {
    if *volume != req.volume {
        return Err(RepoError::InvalidRequest {
            reason: format!(
                "parent {volume}/{snapshot} belongs to another volume than {}",
                req.volume
            ),
        });
    }
    if let Some(cs) = req.chunk_size.filter(|cs| *cs != chunk_size) {
        return Err(RepoError::InvalidRequest {
            reason: format!(
                "chunk size {cs} differs from the parent's {chunk_size}; an incremental keeps its parent's chunk size"
            ),
        });
    }
    Ok(())
}

type LeafStream = futures::stream::BoxStream<'static, Result<HeldLeaf>>;

/// A format-2 parent read in index order alongside a backup, holding only the leaves
/// between the chunk the fold waits for and the highest chunk handed to the upload stage
/// (plus the walk's read-ahead), and of those only the entries at planned chunks, whatever
/// the volume size.
///
/// Readers hand out chunks in ascending order and the stages reorder at most `readers +
/// readahead + workers + transfers` of them, so the window spans that many planned chunks'
/// leaves. The parent may be of another volume size (same chunk size): leaves cover the same
/// indexes in both, and past the parent's end its walk has ended, so nothing is found there.
///
/// For an incremental of a resized parent the same walk also feeds the merge: the entries at
/// chunks not read (below the new end) are queued for the fold, which pushes them into the
/// new map between the chunks read, so every parent segment is read once. The queue holds at
/// most [`MERGE_QUEUE`] leaves: a lookup that would read past it waits until the fold drains
/// it, and the fold reads ahead itself up to the chunk it waits for, so it never waits on a
/// lookup (see [`ParentWindow::merge_below`]).
struct ParentWindow {
    state: WindowState,
    leaves: futures::lock::Mutex<LeafStream>,
    /// The chunk indexes the backup reads: only the parent's entries at these are ever asked.
    planned: ChunkSet,
    gauge: Arc<EntryGauge>,
    /// For an incremental of a resized parent: the merge.
    merge: Option<Merge>,
    /// Woken when the fold takes a leaf from the merge queue.
    drained: tokio::sync::Notify,
    /// What the walk read of the parent (reported in [`MetadataIo`]).
    reads: Arc<WalkReads>,
}

/// Leaves of the parent's entries at chunks not read that a resized incremental's walk holds
/// for the fold to merge, besides the one being merged.
pub const MERGE_QUEUE: usize = 2;

/// A resized incremental's merge of the parent's kept entries into the new map.
struct Merge {
    /// The new map's chunk count: entries at or past it are dropped (a shrunk volume). Fixed,
    /// so lookups read it without the lock.
    end: u64,
    /// Where the merge stands (only the fold takes it).
    at: futures::lock::Mutex<ParentMerge>,
}

/// The parent's entries an incremental keeps (every index it does not read, below the new
/// end), taken from the window's queue in order and pushed into the new map between the
/// chunks read.
struct ParentMerge {
    /// The leaf being merged and the position of its next entry.
    current: Option<(HeldLeaf, usize)>,
    /// Every parent entry below this index has been pushed (or dropped).
    done_below: u64,
}

/// What the pipeline's lookups see of a [`ParentWindow`].
struct WindowState {
    shape: TreeShape,
    held: Mutex<WindowHeld>,
    /// The next index the fold waits for: leaves ending at or below it are no longer asked.
    fold_next: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct WindowHeld {
    /// Held leaves, ascending, each with the end of its index span.
    leaves: std::collections::VecDeque<(u64, HeldLeaf)>,
    /// Indexes below this are covered by the leaves read so far (or by none: all zero).
    covered_to: u64,
    /// The parent's entries at chunks not read, below the new end, that the merge has not
    /// taken yet (a resized incremental only), ascending.
    unmerged: std::collections::VecDeque<HeldLeaf>,
}

impl ParentWindow {
    fn new(
        repo: &Repository,
        shape: TreeShape,
        root: Option<SegmentRef>,
        planned: &ChunkSet,
        gauge: &Arc<EntryGauge>,
        end: u64,
        merge: bool,
    ) -> Self {
        let reads = Arc::new(WalkReads::default());
        ParentWindow {
            planned: planned.clone(),
            gauge: gauge.clone(),
            merge: merge.then(|| Merge {
                end,
                at: futures::lock::Mutex::new(ParentMerge {
                    current: None,
                    done_below: 0,
                }),
            }),
            drained: tokio::sync::Notify::new(),
            reads: reads.clone(),
            leaves: futures::lock::Mutex::new(
                repo.leaves_in_order_counted(shape, root, LEAF_WINDOW, gauge.clone(), reads, end)
                    .boxed(),
            ),
            state: WindowState {
                shape,
                held: Mutex::new(WindowHeld::default()),
                fold_next: std::sync::atomic::AtomicU64::new(0),
            },
        }
    }

    /// The new map's chunk count when merging, else 0 (nothing is queued for a merge).
    fn merge_end(&self) -> u64 {
        self.merge.as_ref().map_or(0, |m| m.end)
    }

    /// Whether a lookup must leave the next leaf to the fold (the merge queue is full).
    fn queue_full(&self, held: &WindowHeld) -> bool {
        self.merge.is_some() && held.unmerged.len() >= MERGE_QUEUE
    }

    /// Reads leaves until `index` is covered, dropping those behind the fold first. With a
    /// full merge queue it waits for the fold to take from it instead of reading on.
    async fn advance(&self, index: u64) -> Result<()> {
        loop {
            // Registered before the check, so a drain between the two is not missed.
            let drained = self.drained.notified();
            match self.covered_or_full(index) {
                Err(Covered) => return Ok(()),
                Ok(true) => {
                    drained.await;
                    continue;
                }
                Ok(false) => {}
            }
            let mut stream = self.leaves.lock().await;
            // Another lookup, or the fold, may have read while this one waited for the walk.
            match self.covered_or_full(index) {
                Err(Covered) => return Ok(()),
                Ok(true) => continue,
                Ok(false) => self.read_leaf(&mut stream).await?,
            }
        }
    }

    /// `Err(Covered)` when `index` is covered; whether the merge queue is full otherwise.
    fn covered_or_full(&self, index: u64) -> std::result::Result<bool, Covered> {
        let st = &self.state;
        let mut held = st.held();
        let next = st.fold_next.load(std::sync::atomic::Ordering::Relaxed);
        while held.leaves.front().is_some_and(|(end, _)| *end <= next) {
            held.leaves.pop_front();
        }
        if held.covered_to > index {
            return Err(Covered);
        }
        Ok(self.queue_full(&held))
    }

    /// Reads the walk's next leaf: its entries at planned chunks join the window, those a
    /// resized incremental keeps from the parent join the merge queue, the rest are dropped.
    async fn read_leaf(&self, stream: &mut LeafStream) -> Result<()> {
        let st = &self.state;
        let leaf = stream.try_next().await?;
        let mut held = st.held();
        let Some(leaf) = leaf else {
            held.covered_to = u64::MAX;
            return Ok(());
        };
        let Some(&(last, _)) = leaf.entries.last() else {
            return Ok(());
        };
        let end = st.shape.pos_of(0, last).first.saturating_add(LEAF_SPAN);
        held.covered_to = held.covered_to.max(end);
        let merge_end = self.merge_end();
        let planned = leaf
            .entries
            .iter()
            .filter(|(i, _)| self.planned.contains(*i))
            .count();
        if planned == leaf.entries.len() {
            held.leaves.push_back((end, leaf));
            return Ok(());
        }
        // Entries the plan skips are never asked for: not kept in the window, so a long gap
        // in the plan does not pile up the parent's leaves over it until the fold passes it.
        let split = |keep: &dyn Fn(u64) -> bool| -> Vec<(u64, cbt_core::ChunkRef)> {
            leaf.entries
                .iter()
                .filter(|(i, _)| keep(*i))
                .copied()
                .collect()
        };
        if planned > 0 {
            let entries = split(&|i| self.planned.contains(i));
            held.leaves
                .push_back((end, HeldLeaf::new(entries, self.gauge.clone())));
        }
        let kept = split(&|i| i < merge_end && !self.planned.contains(i));
        if !kept.is_empty() {
            held.unmerged
                .push_back(HeldLeaf::new(kept, self.gauge.clone()));
        }
        Ok(())
    }

    /// Pushes the kept parent entries below `limit` into `tree`, storing finished segments
    /// as they fill a window. Reads the walk on itself when the queue runs dry, into the
    /// window too, until `limit` is covered: with `limit` one past the chunk the fold waits
    /// for, that chunk's lookup then finds it covered and never waits for a full queue.
    async fn merge_below(
        &self,
        merge: &mut ParentMerge,
        tree: &mut TreeFold<'_>,
        limit: u64,
        repo: &Repository,
    ) -> Result<()> {
        let limit = limit.min(self.merge_end());
        while merge.done_below < limit {
            if merge
                .current
                .as_ref()
                .is_none_or(|(leaf, at)| *at >= leaf.entries.len())
            {
                merge.current = None;
                tree.flush(repo).await?;
                let (next, covered) = {
                    let mut held = self.state.held();
                    (held.unmerged.pop_front(), held.covered_to)
                };
                match next {
                    Some(leaf) => {
                        self.drained.notify_waiters();
                        merge.current = Some((leaf, 0));
                    }
                    None if covered >= limit => merge.done_below = limit,
                    None => {
                        let mut stream = self.leaves.lock().await;
                        // A lookup may have read the next leaf while this waited for the walk.
                        let idle = {
                            let held = self.state.held();
                            held.unmerged.is_empty() && held.covered_to < limit
                        };
                        if idle {
                            self.read_leaf(&mut stream).await?;
                        }
                    }
                }
                continue;
            }
            let Some((leaf, at)) = merge.current.as_mut() else {
                continue;
            };
            let (index, chunk) = leaf.entries[*at];
            if index >= limit {
                merge.done_below = limit;
                break;
            }
            *at += 1;
            tree.push(index, chunk)?;
            merge.done_below = index + 1;
        }
        tree.sync();
        Ok(())
    }
}

/// The index asked is covered by the leaves read.
struct Covered;

impl WindowState {
    fn held(&self) -> std::sync::MutexGuard<'_, WindowHeld> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The parent's state of `index` (covered by [`ParentWindow::advance`], not yet folded).
    fn get(&self, index: u64) -> ChunkState {
        let held = self.held();
        held.leaves
            .iter()
            .find(|(end, _)| *end > index)
            .and_then(|(_, leaf)| {
                leaf.entries
                    .binary_search_by_key(&index, |(i, _)| *i)
                    .ok()
                    .map(|at| ChunkState::Stored(leaf.entries[at].1))
            })
            .unwrap_or(ChunkState::Zero)
    }
}

/// The root of a format-2 parent whose geometry equals the new snapshot's: then only the
/// paths to the changed leaves are needed. `None` when the whole parent must be read.
fn lean_root(head: &ManifestHead, geometry: &ChunkGeometry) -> Option<Option<SegmentRef>> {
    match head.map {
        MapLocation::Tree { root } if head.geometry == *geometry => Some(root),
        _ => None,
    }
}

/// A format-2 parent's paths to the planned chunks, and what reading them cost.
struct LeanParent {
    head: ManifestHead,
    shape: TreeShape,
    root: Option<SegmentRef>,
    loaded: LoadedTree,
    metadata: MetadataIo,
}

impl LeanParent {
    fn into_parent<'a>(self, given: Option<&'a Manifest>, metadata: &mut MetadataIo) -> Parent<'a> {
        metadata.parent_segment_bytes_read = self.metadata.parent_segment_bytes_read;
        metadata.parent_segments_read = self.metadata.parent_segments_read;
        Parent::Lean {
            head: self.head,
            shape: self.shape,
            root: self.root,
            loaded: self.loaded,
            given,
        }
    }
}

/// Loads the paths of a format-2 parent to the planned chunks.
async fn load_lean(
    repo: &Repository,
    head: &ManifestHead,
    root: Option<SegmentRef>,
    plan: &BackupPlan,
) -> Result<LeanParent> {
    let shape = TreeShape::new(head.geometry);
    let changed: BTreeSet<u64> = plan.chunks().iter().collect();
    let (loaded, bytes) = repo.load_paths(&shape, root, &changed).await?;
    let metadata = MetadataIo {
        parent_segment_bytes_read: bytes,
        parent_segments_read: (loaded.nodes.len() + loaded.leaves.len()) as u64,
        ..MetadataIo::default()
    };
    Ok(LeanParent {
        head: head.clone(),
        shape,
        root,
        loaded,
        metadata,
    })
}

#[allow(clippy::too_many_arguments)] // one private call site; the pieces are distinct
async fn run_locked(
    repo: &Repository,
    source: Arc<dyn BlockSource>,
    req: BackupRequest,
    opts: &EngineOptions,
    plan: BackupPlan,
    bytes_in_ranges: u64,
    started: Instant,
    lock: &RepoLock,
    preloaded: Option<LeanParent>,
) -> Result<BackupOutcome> {
    // Under the lock no GC can start, so the parent (and every chunk it references) stays
    // as long as it still exists now, with the same id: a parent deleted and re-created under
    // the same name before we got here may have lost chunks the caller's copy references.
    // A parent read before the lock (`preloaded`) is checked at the commit instead.
    let geometry = *plan.geometry();
    let mut metadata = MetadataIo::default();
    // One count of the map entries held by the fold and by the parent's window together.
    let gauge = Arc::new(EntryGauge::default());
    // A format-2 parent of the same chunk size read in order beside the backup, in its own
    // shape; `merge` also feeds its kept entries to the new map (a resized incremental).
    let window = |head: ManifestHead, root, merge| Parent::Window {
        window: Some(Box::new(ParentWindow::new(
            repo,
            TreeShape::new(head.geometry),
            root,
            plan.chunks(),
            &gauge,
            geometry.chunk_count(),
            merge,
        ))),
        head,
    };
    let parent: Option<Parent<'_>> = match &req.mode {
        BackupMode::Incremental { parent: given, .. } => {
            // The caller's whole parent must be what the repository holds, or the child would
            // reference chunks nobody checked: this mode reads the stored parent whole, once,
            // keeping of a format-2 one the paths the new map is derived along.
            let (stored, lean, read) = load_given_parent(repo, &req.volume, given, &plan).await?;
            if stored.chunks != given.chunks {
                return Err(RepoError::InvalidRequest {
                    reason: format!(
                        "the parent manifest given for {}/{} differs from the stored one; load it from the repository",
                        given.volume, given.snapshot
                    ),
                });
            }
            drop(stored);
            metadata = read;
            Some(match lean {
                // Format 2: the new map is still written as the changed segments only.
                Some(lean) => lean.into_parent(Some(given), &mut metadata),
                None => Parent::Whole(Cow::Borrowed(given.as_ref())),
            })
        }
        BackupMode::IncrementalOf { parent: head, .. } => match (preloaded, head.map) {
            (Some(lean), _) => Some(lean.into_parent(None, &mut metadata)),
            // Format 2 resized (same chunk size, `lean_root` refused it for the size): the new
            // map is written whole, merging the parent's entries read in order with the chunks
            // read, so neither map is held. The parent is checked under the lock to be the
            // head the caller gave (the walk reads what that head names).
            (None, MapLocation::Tree { root }) if head.chunk_size() == geometry.chunk_size() => {
                check_parent_same(repo, head).await?;
                // One walk serves the lookups and the merge (see `ParentWindow`).
                Some(window(head.as_ref().clone(), root, true))
            }
            // Format 1: read whole under the lock, and checked to be the caller's.
            (None, _) => Some(Parent::Whole(Cow::Owned(
                load_parent(repo, &req.volume, &head.snapshot, &head.snapshot_id).await?,
            ))),
        },
        BackupMode::FullWithParent { parent, .. } => {
            let head = load_parent_head(repo, &req.volume, parent).await?;
            match head.map {
                // Another chunk size: no chunk can match by index, so only the link is kept
                // (and the parent's existence checked before the commit).
                _ if head.chunk_size() != geometry.chunk_size() => {
                    Some(Parent::Window { head, window: None })
                }
                // Format 2 of the same chunk size: read in order beside the backup, a window
                // at a time, in the parent's own shape. A leaf covers the same 128 indexes
                // whatever the volume size, so a resized parent lines up index by index: a
                // grown volume finds no parent entry past the parent's end (its walk has
                // ended), a shrunk one stops reading the parent early.
                // The walk ends at the new end: a shrunk volume reads no parent leaf past it.
                MapLocation::Tree { root } => Some(window(head, root, false)),
                // Format 1: held whole (checked to be the same id again).
                MapLocation::Inline => Some(Parent::Whole(Cow::Owned(
                    load_parent(repo, &req.volume, &parent.snapshot, &parent.snapshot_id).await?,
                ))),
            }
        }
        BackupMode::Full { .. } => None,
    };
    let view = parent.as_ref().and_then(Parent::view);
    // A full backup without a parent, or with one it reads in order, writes its map as it
    // goes and never holds it.
    let stream_tree = matches!(parent, None | Some(Parent::Window { .. }));
    let link = parent.as_ref().map(Parent::link);
    let snapshot_id = random_id("snapshot");
    let head_of = |stats: BackupStats, root: Option<SegmentRef>| ManifestHead {
        volume: req.volume.clone(),
        snapshot: req.snapshot.clone(),
        snapshot_id: snapshot_id.clone(),
        created: req.created,
        geometry,
        parent: link.clone(),
        source: req.source_info.clone(),
        labels: req.labels.clone(),
        stats,
        map: MapLocation::Tree { root },
    };
    if stream_tree {
        // Refused before any segment is written, like every other invalid manifest.
        head_of(BackupStats::default(), None).to_json()?;
    }
    let feed = match &parent {
        Some(Parent::Window { window, .. }) => window.as_deref(),
        _ => None,
    };
    let (map, mut stats, raw_buffers_allocated) = run_pipeline(
        repo,
        source,
        &plan,
        view,
        feed,
        opts,
        stream_tree.then_some(&gauge),
    )
    .await?;
    let (read, found_stored) = match map {
        PipelineMap::Whole(read, found) => (read, FoundStored::ByHash(found)),
        PipelineMap::Tree {
            shape,
            root,
            written,
            found,
        } => {
            stats.wall_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            stats.bytes_in_ranges = bytes_in_ranges;
            let head = head_of(stats, root);
            let name = format!("{}/{}", req.volume, req.snapshot);
            let found = FoundStored::InTree { shape, root, found };
            let parent_check = parent.as_ref().map(|p| {
                let (volume, snapshot) = p.names();
                ParentCheck::Exists(volume, snapshot)
            });
            recheck_before_commit(repo, lock, &name, parent_check, found, opts).await?;
            if let Some(Parent::Window {
                window: Some(w), ..
            }) = &parent
            {
                metadata.parent_segment_bytes_read = w.reads.bytes();
                metadata.parent_segments_read = w.reads.segments();
            }
            metadata.written = written;
            metadata.written.head_bytes = repo.commit_head(&head).await?;
            return Ok(BackupOutcome {
                read_mb_per_s: mb_per_s(head.stats.bytes_read, head.stats.wall_ms),
                raw_buffers_allocated,
                stats: head.stats,
                head,
                manifest: None,
                metadata,
                // The fold's entries and the parent's leaves, counted together as they are held.
                map_entries_peak: gauge.peak(),
            });
        }
    };
    let map_entries_peak = read.stored_count();
    stats.wall_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    stats.bytes_in_ranges = bytes_in_ranges;

    let meta = SnapshotMeta {
        volume: req.volume.clone(),
        snapshot: req.snapshot.clone(),
        snapshot_id,
        created: req.created,
        source: req.source_info.clone(),
        labels: req.labels.clone(),
        stats,
    };
    let name = format!("{}/{}", req.volume, req.snapshot);
    let parent_check = match (&req.mode, &parent) {
        // Read before the lock: the stored head must still be the one read.
        (BackupMode::IncrementalOf { .. }, Some(Parent::Lean { head, .. })) => {
            Some(ParentCheck::Same(head))
        }
        (_, Some(p)) => {
            let (volume, snapshot) = p.names();
            Some(ParentCheck::Exists(volume, snapshot))
        }
        (_, None) => None,
    };
    let incremental = matches!(
        req.mode,
        BackupMode::Incremental { .. } | BackupMode::IncrementalOf { .. }
    );
    let (head, manifest) = match &parent {
        Some(
            p @ Parent::Lean {
                shape,
                root,
                loaded,
                given,
                ..
            },
        ) => {
            // Every planned chunk was read: its new state replaces the parent's.
            let changes: BTreeMap<u64, ChunkState> =
                plan.chunks().iter().map(|i| (i, read.get(i))).collect();
            drop(read);
            let namer = |b: &[u8]| repo.segment_name(b);
            let (new_root, segments) = derive_tree(shape, *root, loaded, &changes, &namer)?;
            let manifest = match given {
                Some(g) => Some(Manifest::derive_child(
                    g,
                    meta.clone(),
                    geometry.volume_size(),
                    changes.iter().map(|(i, s)| (*i, *s)),
                )?),
                None => None,
            };
            let head = ManifestHead {
                volume: meta.volume,
                snapshot: meta.snapshot,
                snapshot_id: meta.snapshot_id,
                created: meta.created,
                geometry,
                parent: Some(p.link()),
                source: meta.source,
                labels: meta.labels,
                stats: meta.stats,
                map: MapLocation::Tree { root: new_root },
            };
            // Refused before anything is written, like every other invalid manifest.
            head.to_json()?;
            // The new segments are immutable and named by their content, and nothing refers
            // to them before the head: they are stored while the checks run (if a check
            // fails, they are garbage that GC's grace period lets it collect later).
            let (written, ()) = futures::try_join!(
                repo.put_segments_of(segments),
                recheck_before_commit(repo, lock, &name, parent_check, found_stored, opts),
            )?;
            metadata.written = written;
            metadata.written.head_bytes = repo.commit_head(&head).await?;
            (head, manifest)
        }
        p => {
            let manifest = match p {
                Some(Parent::Whole(pm)) if incremental => {
                    let changes = plan.chunks().iter().map(|i| (i, read.get(i)));
                    Manifest::derive_child(pm, meta, geometry.volume_size(), changes)?
                }
                _ => Manifest::new(meta, read, p.as_ref().map(|p| p.link()))?,
            };
            recheck_before_commit(repo, lock, &name, parent_check, found_stored, opts).await?;
            let (head, written) = repo.commit_manifest_head(&manifest).await?;
            metadata.written = written;
            (head, Some(manifest))
        }
    };
    Ok(BackupOutcome {
        read_mb_per_s: mb_per_s(head.stats.bytes_read, head.stats.wall_ms),
        raw_buffers_allocated,
        stats: head.stats,
        head,
        manifest,
        metadata,
        map_entries_peak,
    })
}

/// How the parent is checked just before the commit.
enum ParentCheck<'a> {
    /// Read under the lock and found to be the one meant: it must still exist (a `head`).
    Exists(&'a VolumeName, &'a SnapshotName),
    /// Known from a head read before the lock ([`BackupMode::IncrementalOf`]): the stored head
    /// must still be that one (a `get`, the same one round trip). Its snapshot id is random, so
    /// a head found the same now is the object that was read, and it stood all the time in
    /// between: any GC that ran before our lock saw it and kept its segments and chunks, and
    /// none ran after (the lock check follows).
    Same(&'a ManifestHead),
}

/// The last checks before a backup commits, for the case the lock protocol cannot cover: an
/// operator broke the lock while the backup ran, and a prune deleted data under it.
///
/// The lock object must still be ours (nobody recreates a broken lock, so if it is there it
/// was there all along and no GC can have run); the parent must still exist (its chunks and
/// segments, which the new manifest inherits, are then still referenced and kept by any GC);
/// and every chunk this run found already stored instead of uploading must still be stored.
/// Chunks and segments this run uploaded itself are protected by GC's grace period.
async fn recheck_before_commit(
    repo: &Repository,
    lock: &RepoLock,
    name: &str,
    parent: Option<ParentCheck<'_>>,
    found_stored: FoundStored,
    opts: &EngineOptions,
) -> Result<()> {
    let lost = || RepoError::LockLost {
        purpose: lock.info().purpose.clone(),
    };
    let parent_check = async {
        match parent {
            Some(ParentCheck::Exists(v, s)) if !repo.snapshot_exists(v, s).await? => {
                Err(RepoError::InvalidRequest {
                    reason: format!(
                        "parent snapshot {v}/{s} was deleted while the backup ran; nothing was committed: back up in full"
                    ),
                })
            }
            Some(ParentCheck::Same(head)) => check_parent_same(repo, head).await,
            _ => Ok(()),
        }
    };
    let chunk_check = async {
        match found_stored {
            FoundStored::ByHash(found) => {
                let mut refs: Vec<ChunkAt> = found.into_values().collect();
                refs.sort_by_key(|r| r.index);
                repo.check_chunks_stored(name, &refs, opts.transfers)
                    .await?;
            }
            FoundStored::InTree { shape, root, found } if !found.is_empty() => {
                // The tree just written is walked in order, a window of leaves at a time; the
                // chunks of each batch that were found stored are checked together.
                let g = *shape.geometry();
                let gauge = Arc::new(EntryGauge::default());
                let mut batches = repo
                    .leaves_in_order(shape, root, LEAF_WINDOW, gauge)
                    .try_chunks(LEAF_WINDOW)
                    .map_err(|e| e.1)
                    .boxed();
                let mut runs = found.iter().peekable();
                while let Some(batch) = batches.try_next().await? {
                    let mut refs = Vec::new();
                    for (index, chunk) in batch.iter().flat_map(|l| l.entries.iter()) {
                        while runs.next_if(|r| r.end <= *index).is_some() {}
                        if runs.peek().is_some_and(|r| r.contains(index)) {
                            refs.push(ChunkAt {
                                index: *index,
                                offset: g.chunk_offset(*index),
                                chunk: *chunk,
                            });
                        }
                    }
                    if !refs.is_empty() {
                        repo.check_chunks_stored(name, &refs, opts.transfers)
                            .await?;
                    }
                }
            }
            FoundStored::InTree { .. } => {}
        }
        Ok::<(), RepoError>(())
    };
    // Independent reads, so they run together (round trips on S3).
    let checks = futures::try_join!(parent_check, chunk_check);
    // Read after the checks: a lock still there now was there all along (nobody recreates a
    // broken one), so no GC can have run before or during them. One read covers both ends,
    // and a lost lock is reported before what it let happen (a missing chunk or parent).
    if !lock.still_held().await? {
        return Err(lost());
    }
    checks.map(|_| ())
}

/// Loads the parent's head and checks it is the snapshot the caller meant (same id, same
/// volume).
async fn load_parent_head(
    repo: &Repository,
    volume: &VolumeName,
    parent: &ParentRef,
) -> Result<ManifestHead> {
    load_parent_stored(repo, volume, &parent.snapshot, &parent.snapshot_id)
        .await
        .map(|s| s.head())
}

/// Reads the parent's manifest object under the backup's lock and checks it is the snapshot
/// the caller meant (same id, same volume), before any segment of it is read.
async fn load_parent_stored(
    repo: &Repository,
    volume: &VolumeName,
    snapshot: &SnapshotName,
    snapshot_id: &str,
) -> Result<StoredManifest> {
    let gone = |what: &str| RepoError::InvalidRequest {
        reason: format!("parent snapshot {volume}/{snapshot} {what}; back up in full"),
    };
    match repo.load_stored(volume, snapshot).await {
        Ok(s) => {
            let id = match &s {
                StoredManifest::V1(m) => &m.snapshot_id,
                StoredManifest::V2(h) => &h.snapshot_id,
            };
            if id == snapshot_id {
                Ok(s)
            } else {
                Err(gone(&format!(
                    "was replaced (id {snapshot_id} is now {id}): it may have lost chunks to GC"
                )))
            }
        }
        Err(RepoError::SnapshotNotFound { .. }) => Err(gone("does not exist (deleted?)")),
        Err(e) => Err(e),
    }
}

/// Checks that the stored head of `given`'s snapshot is still `given`: the same snapshot id
/// and the same map (what a child inherits).
///
/// # Errors
/// [`RepoError::InvalidRequest`] if the parent was deleted or replaced; store errors.
async fn check_parent_same(repo: &Repository, given: &ManifestHead) -> Result<()> {
    let (volume, snapshot) = (&given.volume, &given.snapshot);
    let gone = |what: &str| RepoError::InvalidRequest {
        reason: format!(
            "parent snapshot {volume}/{snapshot} {what}; nothing was committed: back up in full"
        ),
    };
    match repo.load_head(volume, snapshot).await {
        Ok(h)
            if h.snapshot_id == given.snapshot_id
                && h.geometry == given.geometry
                && h.map == given.map =>
        {
            Ok(())
        }
        Ok(h) if h.snapshot_id == given.snapshot_id => Err(gone(
            "is not the head given for it (its map differs): pass the head loaded from this repository",
        )),
        Ok(h) => Err(gone(&format!(
            "was replaced (id {} is now {}): it may have lost chunks to GC",
            given.snapshot_id, h.snapshot_id
        ))),
        Err(RepoError::SnapshotNotFound { .. }) => Err(gone("was deleted (or does not exist)")),
        Err(e) => Err(e),
    }
}

/// Loads the parent under the backup's lock and checks it is the snapshot the caller meant.
async fn load_parent(
    repo: &Repository,
    volume: &VolumeName,
    snapshot: &SnapshotName,
    snapshot_id: &str,
) -> Result<Manifest> {
    match load_parent_stored(repo, volume, snapshot, snapshot_id).await? {
        StoredManifest::V1(m) => Ok(m),
        StoredManifest::V2(head) => repo.load_tree_manifest(head).await,
    }
}

/// The stored parent of a [`BackupMode::Incremental`], read once: whole, to check the
/// caller's copy against it, and for a format-2 parent of the new snapshot's geometry also
/// the segments on the paths to the planned chunks, kept as the walk passes them (what
/// [`load_lean`] would read again). The segments read are counted in the metadata.
async fn load_given_parent(
    repo: &Repository,
    volume: &VolumeName,
    given: &Manifest,
    plan: &BackupPlan,
) -> Result<(Manifest, Option<LeanParent>, MetadataIo)> {
    let stored = load_parent_stored(repo, volume, &given.snapshot, &given.snapshot_id).await?;
    let reads = WalkReads::default();
    let (whole, lean) = match stored {
        StoredManifest::V1(m) => (m, None),
        StoredManifest::V2(head) => {
            let root = lean_root(&head, plan.geometry());
            let changed: BTreeSet<u64> = match root {
                Some(_) => plan.chunks().iter().collect(),
                None => BTreeSet::new(),
            };
            let (whole, loaded) = repo
                .load_tree_manifest_keeping(head.clone(), &reads, &changed)
                .await?;
            let lean = root.map(|root| LeanParent {
                shape: TreeShape::new(head.geometry),
                head,
                root,
                loaded,
                metadata: MetadataIo::default(),
            });
            (whole, lean)
        }
    };
    let metadata = MetadataIo {
        parent_segment_bytes_read: reads.bytes(),
        parent_segments_read: reads.segments(),
        ..MetadataIo::default()
    };
    // The whole walk is what reading the paths cost.
    let lean = lean.map(|l| LeanParent { metadata, ..l });
    Ok((whole, lean, metadata))
}

/// What the pipeline hands back: the new state of every chunk read, folded as results arrive
/// (stored chunks only, exactly the memory of the chunk map they become), and the figures.
/// A full backup without a parent folds into a [`TreeFold`] instead and holds no map.
struct Folded<'w> {
    read: ChunkMap,
    tree: Option<TreeFold<'w>>,
    /// Freed a place for each chunk taken.
    ahead: Arc<Ahead>,
    stats: BackupStats,
    /// Distinct chunks this run found already stored instead of uploading (not those the
    /// parent vouches for), re-checked before the commit (whole-map runs only; a tree fold
    /// keeps their index ranges).
    found_stored: HashMap<ChunkHash, ChunkAt>,
}

/// A full backup's map written as it is produced: results are put back in plan order (fewer
/// than [`ahead_limit`] wait for an earlier one), pushed into a [`TreeWriter`], and finished
/// segments are stored [`LEAF_WINDOW`] at a time as the backup passes their range.
struct TreeFold<'w> {
    shape: TreeShape,
    writer: TreeWriter<'w>,
    /// Planned indices not yet folded, ascending.
    order: std::iter::Peekable<Box<dyn Iterator<Item = u64> + Send + 'w>>,
    /// Results that arrived before an earlier planned chunk's.
    waiting: BTreeMap<u64, Done>,
    /// Finished segments not yet stored.
    pending: Vec<EncodedSegment>,
    written: MetadataWritten,
    /// Index ranges of the chunks found already stored (ascending, merged): what the
    /// pre-commit re-check looks up, 16 bytes per run instead of an entry per chunk.
    found: Vec<std::ops::Range<u64>>,
    /// Entries in the open leaf (first index of that leaf, count).
    open_leaf: (u64, u64),
    /// Counts the map entries held (waiting results, the open leaf, unstored leaves) beside
    /// those of the parent's window, if any, so their peak is of the sum as it was held.
    gauge: Arc<EntryGauge>,
    /// What this fold last counted in `gauge`.
    counted: u64,
    /// The parent's kept entries are merged below this index (`u64::MAX` when nothing is
    /// merged: every mode but an incremental of a resized parent).
    merged_below: u64,
    /// The next chunk to fold waits for the parent's entries below it to be merged.
    need_merge: Option<u64>,
}

impl TreeFold<'_> {
    fn held(&self) -> u64 {
        let pending: u64 = self
            .pending
            .iter()
            .filter(|s| s.pos.level == 0)
            .map(|s| s.seg.stored)
            .sum();
        self.waiting.len() as u64 + self.open_leaf.1 + pending
    }

    /// Adds a stored chunk to the map being written.
    fn push(&mut self, index: u64, r: cbt_core::ChunkRef) -> Result<()> {
        self.writer.push(index, r)?;
        let leaf = self.shape.pos_of(0, index).first;
        self.open_leaf = match self.open_leaf {
            (first, n) if first == leaf => (first, n + 1),
            _ => (leaf, 1),
        };
        self.pending.extend(self.writer.take_finished());
        Ok(())
    }

    /// Brings the fold's share of the gauge up to date with what it holds now.
    fn sync(&mut self) {
        let now = self.held();
        if now > self.counted {
            self.gauge.add(now - self.counted);
        } else {
            self.gauge.sub(self.counted - now);
        }
        self.counted = now;
    }

    fn note_found(&mut self, index: u64) {
        match self.found.last_mut() {
            Some(r) if r.end == index => r.end += 1,
            _ => self.found.push(index..index + 1),
        }
    }

    /// Stores the finished segments once a window of them is ready.
    async fn flush(&mut self, repo: &Repository) -> Result<()> {
        if self.pending.len() >= LEAF_WINDOW {
            let w = repo
                .put_segments_of(std::mem::take(&mut self.pending))
                .await?;
            self.written.segments += w.segments;
            self.written.segment_bytes += w.segment_bytes;
            self.sync();
        }
        Ok(())
    }
}

impl Folded<'_> {
    fn add(&mut self, d: Done, compare: Option<ParentView<'_>>) -> Result<()> {
        let Some(tree) = &mut self.tree else {
            self.ahead.leave();
            return self.account(d, compare);
        };
        tree.waiting.insert(d.index, d);
        tree.sync();
        self.fold(compare)
    }

    /// Folds the results that are next in plan order, until one is missing or waits for a
    /// merge of the parent's entries ([`TreeFold::need_merge`]).
    fn fold(&mut self, compare: Option<ParentView<'_>>) -> Result<()> {
        loop {
            let tree = self.tree.as_mut().ok_or_else(|| RepoError::Internal {
                message: "tree fold vanished".into(),
            })?;
            let Some(next) = tree.order.peek().copied() else {
                break;
            };
            if tree.merged_below <= next {
                // The parent's kept entries below it go first (an incremental of a resized
                // parent): the caller merges them, before the chunk's result is even here
                // (its lookup may wait for the walk's queue that merge drains), and folds
                // again.
                tree.need_merge = Some(next);
                break;
            }
            let Some(d) = tree.waiting.remove(&next) else {
                break;
            };
            tree.order.next();
            self.ahead.leave();
            if let ChunkState::Stored(r) = d.state {
                tree.push(d.index, r)?;
                if d.deduplicated && !d.from_parent {
                    tree.note_found(d.index);
                }
            }
            self.account(d, compare)?;
        }
        if let Some(tree) = &mut self.tree {
            tree.sync();
            if let Some(ParentView::Window(w)) = compare {
                let next = tree.order.peek().copied().unwrap_or(u64::MAX);
                w.fold_next
                    .store(next, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn account(&mut self, d: Done, compare: Option<ParentView<'_>>) -> Result<()> {
        let stats = &mut self.stats;
        stats.bytes_read += d.raw_len;
        stats.chunks_read += 1;
        match d.state {
            ChunkState::Zero => {
                stats.bytes_zero += d.raw_len;
                stats.chunks_zero += 1;
            }
            ChunkState::Stored(chunk) => {
                if d.deduplicated {
                    stats.bytes_deduplicated += d.raw_len;
                    stats.chunks_deduplicated += 1;
                    if !d.from_parent && self.tree.is_none() {
                        self.found_stored.entry(chunk.hash).or_insert(ChunkAt {
                            index: d.index,
                            offset: self.read.geometry().chunk_offset(d.index),
                            chunk,
                        });
                    }
                } else {
                    stats.objects_written += 1;
                    stats.bytes_uploaded += d.uploaded_bytes;
                }
            }
        }
        let before = compare.map_or(ChunkState::Zero, |p| p.get(d.index));
        if !same_content(&before, &d.state) {
            stats.bytes_changed += d.raw_len;
        }
        if self.tree.is_none() {
            self.read.set(d.index, d.state)?;
        }
        Ok(())
    }
}

/// The map a pipeline produced.
enum PipelineMap {
    /// Held whole, with the chunks found stored by hash.
    Whole(ChunkMap, HashMap<ChunkHash, ChunkAt>),
    /// Written as a tree while the backup ran.
    Tree {
        shape: TreeShape,
        root: Option<SegmentRef>,
        written: MetadataWritten,
        found: Vec<std::ops::Range<u64>>,
    },
}

/// Chunks a backup found stored, for the pre-commit re-check.
enum FoundStored {
    ByHash(HashMap<ChunkHash, ChunkAt>),
    /// Index ranges into the tree just written (walked in order, a window of leaves at once).
    InTree {
        shape: TreeShape,
        root: Option<SegmentRef>,
        found: Vec<std::ops::Range<u64>>,
    },
}

fn same_content(a: &ChunkState, b: &ChunkState) -> bool {
    match (a, b) {
        (ChunkState::Zero, ChunkState::Zero) => true,
        (ChunkState::Stored(x), ChunkState::Stored(y)) => x.hash == y.hash,
        _ => false,
    }
}

/// Shared position in a backup plan: hands out its reads in ascending order.
struct ReadCursor {
    plan: BackupPlan,
    run: usize,
    next: u64,
}

impl ReadCursor {
    fn new(plan: BackupPlan) -> Self {
        let next = plan.chunks().runs().first().map_or(0, |r| r.start);
        ReadCursor { plan, run: 0, next }
    }

    fn next(&mut self) -> Option<ChunkRead> {
        let runs = self.plan.chunks().runs();
        loop {
            let run = runs.get(self.run)?;
            if self.next < run.end {
                let index = self.next;
                self.next += 1;
                let g = self.plan.geometry();
                return Some(ChunkRead {
                    index,
                    offset: g.chunk_offset(index),
                    len: g.chunk_len(index),
                });
            }
            self.run += 1;
            self.next = runs.get(self.run).map_or(0, |r| r.start);
        }
    }
}

/// Chunks the readers handed out that the fold has not taken yet, kept under a limit: the
/// upload stage finishes chunks out of order, and without it one stalled upload would let
/// every later result (and the parent's leaves over them) pile up until it lands.
struct Ahead {
    count: Mutex<u64>,
    freed: std::sync::Condvar,
    limit: u64,
}

impl Ahead {
    /// At most `readers + readahead + workers + 2 * transfers`: the stages full, plus as many
    /// again finished early while an earlier upload is still in flight.
    fn new(opts: &EngineOptions) -> Self {
        Ahead {
            count: Mutex::new(0),
            freed: std::sync::Condvar::new(),
            limit: ahead_limit(opts),
        }
    }

    fn count(&self) -> std::sync::MutexGuard<'_, u64> {
        self.count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks (a reader thread) until one more chunk may be handed out and counts it; false
    /// once `stopped` says the pipeline is gone (nothing would ever free a place).
    fn enter(&self, stopped: impl Fn() -> bool) -> bool {
        let mut n = self.count();
        while *n >= self.limit {
            if stopped() {
                return false;
            }
            n = self
                .freed
                .wait_timeout(n, std::time::Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        *n += 1;
        true
    }

    /// The fold took a chunk.
    fn leave(&self) {
        let mut n = self.count();
        *n = n.saturating_sub(1);
        self.freed.notify_one();
    }
}

/// Most chunks handed out and not yet folded (see [`Ahead`]).
fn ahead_limit(opts: &EngineOptions) -> u64 {
    let o = opts.normalized();
    (o.readers + o.readahead + o.workers + 2 * o.transfers) as u64
}

/// Buffers of one chunk size, reused between the readers, the CPU stage and (as the bodies of
/// incompressible chunks, encoded where they were read) the uploads.
#[derive(Clone, Default)]
struct BufferPool {
    free: Shelf,
    allocated: Arc<std::sync::atomic::AtomicU64>,
}

impl BufferPool {
    /// A buffer for a chunk of `len` raw bytes, placed at `raw_at` (see [`raw_offset`]).
    fn take(&self, len: usize, raw_at: usize) -> RawChunk {
        let reused = self.free.lock().map(|mut p| p.pop()).ok().flatten();
        let buf = reused.unwrap_or_else(|| {
            self.allocated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            AlignedBuf::default()
        });
        RawChunk::with_raw_at(buf, len, raw_at)
    }

    fn give(&self, buf: AlignedBuf) {
        if let Ok(mut p) = self.free.lock() {
            p.push(buf);
        }
    }

    fn allocated(&self) -> u64 {
        self.allocated.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where a chunk's raw bytes go in its buffer for reads from a source wanting
/// `direct_alignment`: right after the chunk header (the object then starts aligned, as the
/// local store's direct write wants it), or, for a source reading with `O_DIRECT`, at the first
/// boundary of its alignment after the header, so the read itself can bypass the page cache
/// (see the `source` module docs). An alignment the buffers cannot honour (not a power of two,
/// or above theirs) gets the plain layout: the source then reads those buffers as it can.
fn raw_offset(direct_alignment: Option<usize>) -> usize {
    match direct_alignment {
        Some(a) if a.is_power_of_two() && a <= crate::aligned::DIRECT_ALIGN => {
            chunk::HEADER_LEN.next_multiple_of(a)
        }
        Some(a) => {
            tracing::debug!(
                alignment = a,
                "source alignment above the buffers'; reading into unaligned memory"
            );
            chunk::HEADER_LEN
        }
        None => chunk::HEADER_LEN,
    }
}

async fn run_pipeline(
    repo: &Repository,
    source: Arc<dyn BlockSource>,
    plan: &BackupPlan,
    parent: Option<ParentView<'_>>,
    feed: Option<&ParentWindow>,
    opts: &EngineOptions,
    // Some: the map is folded into a tree as it goes, its entries held counted in the gauge.
    tree_gauge: Option<&Arc<EntryGauge>>,
) -> Result<(PipelineMap, BackupStats, u64)> {
    let stream_tree = tree_gauge.is_some();
    let pool = BufferPool::default();
    let geometry = *plan.geometry();
    let namer = |b: &[u8]| repo.segment_name(b);
    let tree = tree_gauge.map(|gauge| {
        let shape = TreeShape::new(geometry);
        let order: Box<dyn Iterator<Item = u64> + Send + '_> = Box::new(plan.chunks().iter());
        TreeFold {
            shape,
            writer: TreeWriter::new(shape, &namer),
            order: order.peekable(),
            waiting: BTreeMap::new(),
            pending: Vec::new(),
            written: MetadataWritten::default(),
            found: Vec::new(),
            open_leaf: (u64::MAX, 0),
            gauge: gauge.clone(),
            counted: 0,
            merged_below: if feed.is_some_and(|w| w.merge.is_some()) {
                0
            } else {
                u64::MAX
            },
            need_merge: None,
        }
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<(ChunkRead, RawChunk)>>(opts.readahead);

    // Readers: `readers` blocking threads taking the next planned chunk in offset order and
    // issuing preads, at most `readahead` chunks ahead of the hashing stage. Several readers
    // keep several requests in flight, which network block devices (RBD, iSCSI) need.
    let cursor = Arc::new(Mutex::new(ReadCursor::new(plan.clone())));
    let ahead = Arc::new(Ahead::new(opts));
    let mut readers = Vec::with_capacity(opts.readers);
    let raw_at = raw_offset(source.direct_alignment());
    for _ in 0..opts.readers {
        let (cursor, pool, source, tx) = (cursor.clone(), pool.clone(), source.clone(), tx.clone());
        let ahead = ahead.clone();
        readers.push(tokio::task::spawn_blocking(move || {
            loop {
                if !ahead.enter(|| tx.is_closed()) {
                    return;
                }
                let next = cursor.lock().ok().and_then(|mut c| c.next());
                let Some(r) = next else { return };
                let mut buf = pool.take(r.len as usize, raw_at);
                let item = source
                    .read_exact_at(buf.raw_mut(), r.offset)
                    .map(|()| (r, buf))
                    .map_err(|e| RepoError::SourceIo {
                        path: source.describe(),
                        offset: r.offset,
                        len: r.len,
                        source: e,
                    });
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return; // the pipeline stopped (error downstream) or we reported ours
                }
            }
        }));
    }
    drop(tx);

    // Chunks this run stored or found stored, so repeats cost no existence check. Capped:
    // past the cap the table starts over (a repeat then costs one HEAD, never an upload).
    let known: Arc<Mutex<HashMap<ChunkHash, u64>>> = Arc::default();
    let total = Progress {
        chunks_total: plan.chunk_count(),
        bytes_total: plan.read_bytes(),
        ..Progress::default()
    };
    let progress = Arc::new(Mutex::new(total));
    let level = opts.compression_level;

    let mut init = Folded {
        read: ChunkMap::new(if stream_tree {
            ChunkGeometry::new(0, geometry.chunk_size())?
        } else {
            geometry
        }),
        tree,
        stats: BackupStats::default(),
        found_stored: HashMap::new(),
        ahead: ahead.clone(),
    };
    // Chunk-by-chunk comparison with the parent only makes sense in the same geometry.
    let compare = parent.filter(|p| p.chunk_size() == plan.geometry().chunk_size());
    // The parent's kept entries below the first chunk read are merged before any lookup can
    // wait for the merge queue.
    if init.tree.is_some() && feed.is_some_and(|w| w.merge.is_some()) {
        init.fold(compare)?;
        merge_needed(&mut init, feed, compare, repo).await?;
    }

    let raw_stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let cpu_pool = pool.clone();
    let codec = repo.codec().clone();
    let uploads = raw_stream
        .map(move |item| {
            let pool = cpu_pool.clone();
            let codec = codec.clone();
            async move {
                let (r, raw) = item?;
                tokio::task::spawn_blocking(move || {
                    if is_zero(raw.raw()) {
                        pool.give(raw.into_buf());
                        return Ok(Encoded::Zero(r));
                    }
                    let (e, unused) = codec.encode_chunk_in_place(raw, level, &pool.free)?;
                    if let Some(buf) = unused {
                        pool.give(buf);
                    }
                    Ok::<_, RepoError>(Encoded::Data(r, e))
                })
                .await
                .map_err(|e| RepoError::Internal {
                    message: format!("chunk encoder task failed: {e}"),
                })?
            }
        })
        .buffered(opts.workers)
        .map(|encoded| {
            let known = known.clone();
            let progress = progress.clone();
            async move {
                let encoded = encoded?;
                if let (Some(w), Encoded::Zero(r) | Encoded::Data(r, _)) = (feed, &encoded) {
                    // Idempotent (covers up to the highest index asked), so the order the
                    // uploads poll it in does not matter; nothing at or above the fold's next
                    // index is dropped, so every chunk in flight stays covered.
                    w.advance(r.index).await?;
                }
                let done = match encoded {
                    Encoded::Zero(r) => Done {
                        index: r.index,
                        state: ChunkState::Zero,
                        raw_len: r.len,
                        uploaded_bytes: 0,
                        deduplicated: false,
                        from_parent: false,
                    },
                    Encoded::Data(r, e) => upload(repo, parent, compare, &known, r, e).await?,
                };
                let snapshot = {
                    let mut p = progress.lock().map_err(|_| RepoError::Internal {
                        message: "progress lock poisoned".into(),
                    })?;
                    p.chunks_done += 1;
                    p.bytes_done += done.raw_len;
                    p.bytes_transferred += done.uploaded_bytes;
                    *p
                };
                opts.report(&snapshot);
                Ok::<_, RepoError>(done)
            }
        })
        .buffer_unordered(opts.transfers)
        .fuse();
    // The stream (and the channel from the readers) ends with this block.
    let mut folded = {
        let mut uploads = std::pin::pin!(uploads);
        let mut folded = init;
        let mut stash = Vec::new();
        while let Some(done) = uploads.next().await {
            folded.add(done?, compare)?;
            merge_polling(&mut folded, feed, compare, repo, &mut uploads, &mut stash).await?;
            if let Some(tree) = &mut folded.tree {
                tree.flush(repo).await?;
            }
        }
        folded
    };
    for reader in readers {
        reader.await.map_err(|e| RepoError::Internal {
            message: format!("reader task failed: {e}"),
        })?;
    }
    if let (Some(tree), Some(w)) = (&mut folded.tree, feed)
        && let Some(merge) = &w.merge
    {
        let mut merge = merge.at.lock().await;
        w.merge_below(&mut merge, tree, u64::MAX, repo).await?;
        tree.merged_below = merge.done_below;
    }
    let map = match folded.tree {
        None => PipelineMap::Whole(folded.read, folded.found_stored),
        Some(mut tree) => {
            if !tree.waiting.is_empty() || tree.order.peek().is_some() {
                return Err(RepoError::Internal {
                    message: "the pipeline ended before every planned chunk was folded".into(),
                });
            }
            let TreeFold {
                shape,
                writer,
                mut pending,
                mut written,
                found,
                ..
            } = tree;
            let (root, rest) = writer.finish();
            pending.extend(rest);
            let w = repo.put_segments_of(pending).await?;
            written.segments += w.segments;
            written.segment_bytes += w.segment_bytes;
            PipelineMap::Tree {
                shape,
                root,
                written,
                found,
            }
        }
    };
    Ok((map, folded.stats, pool.allocated()))
}

/// Merges the parent's kept entries below the chunk the fold waits for, as often as the fold
/// asks ([`TreeFold::need_merge`]), and folds what that lets through.
async fn merge_needed(
    acc: &mut Folded<'_>,
    feed: Option<&ParentWindow>,
    compare: Option<ParentView<'_>>,
    repo: &Repository,
) -> Result<()> {
    let Some((w, merge)) = feed.and_then(|w| w.merge.as_ref().map(|m| (w, m))) else {
        return Ok(());
    };
    while let Some(tree) = &mut acc.tree {
        let Some(next) = tree.need_merge.take() else {
            break;
        };
        let mut merge = merge.at.lock().await;
        w.merge_below(&mut merge, tree, next.saturating_add(1), repo)
            .await?;
        tree.merged_below = merge.done_below;
        drop(merge);
        acc.fold(compare)?;
    }
    Ok(())
}

/// [`merge_needed`], while the uploads go on: their results are kept in `stash` (fewer than
/// the chunks handed out ahead of the fold) and folded once the merge is done. A lookup may
/// hold the parent's walk while it reads a leaf, and the merge may wait for the walk: the
/// lookup's future must be polled meanwhile, or neither would finish.
async fn merge_polling(
    acc: &mut Folded<'_>,
    feed: Option<&ParentWindow>,
    compare: Option<ParentView<'_>>,
    repo: &Repository,
    uploads: &mut (impl futures::stream::FusedStream<Item = Result<Done>> + Unpin),
    stash: &mut Vec<Done>,
) -> Result<()> {
    loop {
        {
            let mut merge = std::pin::pin!(merge_needed(acc, feed, compare, repo));
            loop {
                tokio::select! {
                    biased;
                    merged = &mut merge => {
                        merged?;
                        break;
                    }
                    Some(done) = uploads.next(), if !uploads.is_terminated() => {
                        stash.push(done?);
                        // Held like the fold's waiting results (both fewer than `ahead`).
                        if let Some(w) = feed {
                            w.gauge.add(1);
                        }
                    }
                }
            }
        }
        if stash.is_empty() {
            return Ok(());
        }
        if let Some(w) = feed {
            w.gauge.sub(stash.len() as u64);
        }
        for done in stash.drain(..) {
            acc.add(done, compare)?;
        }
    }
}

/// Most entries of a backup's table of chunks known to be stored (about 60 bytes each).
const KNOWN_CHUNKS_CAP: usize = 65_536;

async fn upload(
    repo: &Repository,
    parent: Option<ParentView<'_>>,
    compare: Option<ParentView<'_>>,
    known: &Mutex<HashMap<ChunkHash, u64>>,
    r: ChunkRead,
    e: EncodedChunk,
) -> Result<Done> {
    let poisoned = || RepoError::Internal {
        message: "dedup table lock poisoned".into(),
    };
    let hash = e.chunk.hash;
    // An unchanged chunk has the parent's hash at the same index; the parent (kept alive by
    // our lock) vouches that it is stored, without a table of the parent's hashes.
    let from_parent = parent.and_then(|p| match p.get(r.index) {
        ChunkState::Stored(c) if c.hash == hash => Some(c.stored_size),
        _ => None,
    });
    let known_size = match from_parent {
        Some(size) => Some(size),
        None => known.lock().map_err(|_| poisoned())?.get(&hash).copied(),
    };
    let from_parent = from_parent.is_some();
    if let Some(stored_size) = known_size {
        let mut chunk = e.chunk;
        chunk.stored_size = stored_size;
        return Ok(Done {
            index: r.index,
            state: ChunkState::Stored(chunk),
            raw_len: r.len,
            uploaded_bytes: 0,
            deduplicated: true,
            from_parent,
        });
    }
    // Not the parent's chunk at this place (same geometry): changed since the parent, and
    // most likely stored nowhere yet, so not asked for before it is created.
    let novelty = if compare.is_some() {
        ChunkNovelty::Changed
    } else {
        ChunkNovelty::Unknown
    };
    let body_len = e.body.len() as u64;
    let put = repo.put_chunk_as(e, novelty).await?;
    {
        let mut known = known.lock().map_err(|_| poisoned())?;
        if known.len() >= KNOWN_CHUNKS_CAP {
            known.clear();
        }
        known.insert(hash, put.chunk.stored_size);
    }
    Ok(Done {
        index: r.index,
        state: ChunkState::Stored(put.chunk),
        raw_len: r.len,
        uploaded_bytes: if put.uploaded { body_len } else { 0 },
        deduplicated: !put.uploaded,
        from_parent: false,
    })
}
