//! Repository maintenance: verify, garbage collection, prune and status.
//!
//! Owns executing the pure decisions of `cbt_core::gc` against the store. Every deletion here
//! happens under the exclusive lock, after *all* manifests were read successfully: a manifest
//! that cannot be read aborts GC, because its references would be unknown.
//!
//! GC keeps recently written unreferenced chunks (the grace period, see the `repo` module docs).
//!
//! Manifests are streamed (a few at a time), never all held at once: memory is bounded by the
//! number of *distinct* chunks in the repository (about 150 bytes each for GC and status: the
//! listing keeps each chunk's size and modification time; 56 for `verify`, which keeps each
//! chunk's name and size and the way it was first downloaded, and walks format-2 maps a
//! bounded window of segments at a time), not by the number of snapshots times their size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use cbt_core::gc::{
    RetentionDecision, RetentionPolicy, plan_gc_with_grace, referenced_chunks, trusted_created,
    trusted_now,
};
use cbt_core::{ChunkHash, ChunkRef, Manifest, SnapshotName, Timestamp, VolumeName};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::{
    AbortOnDrop, ChunkContext, EntryGauge, LEAF_WINDOW, RepoError, RepoLock, Repository, Result,
    SnapshotSummary, manifest_key, segment_key, stored_chunks,
};
use crate::chunk;
use crate::store::ObjectStore;
use cbt_core::manifest::{MapLocation, StoredManifest};
use cbt_core::maptree::{LEAF_SPAN, Segment, TreeShape};

/// What makes two chunk references the same check for `verify --read-data`.
type RefKey = (ChunkHash, u64, u32, u64);

fn ref_key(r: &ChunkRef) -> RefKey {
    (r.hash, r.stored_size, r.crc32c, r.raw_len)
}

/// Chunk deletions in flight during GC.
const DELETE_CONCURRENCY: usize = 16;
/// Manifests loaded concurrently while streaming.
const LOAD_CONCURRENCY: usize = 4;

/// What `verify` checks.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Only this volume (all when `None`).
    pub volume: Option<VolumeName>,
    /// Only this snapshot of `volume`.
    pub snapshot: Option<SnapshotName>,
    /// Download every referenced chunk and check its crc32c and content hash, not only its
    /// presence and size.
    pub read_data: bool,
    /// Downloads in flight with `read_data` (0 = 8).
    pub concurrency: usize,
}

/// What is wrong with one reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProblemKind {
    /// The manifest itself cannot be read.
    ManifestUnreadable {
        /// Why.
        message: String,
    },
    /// The chunk object does not exist.
    Missing,
    /// The chunk object has another size than the manifest records.
    SizeMismatch {
        /// Size in the manifest.
        expected: u64,
        /// Size in the store.
        actual: u64,
    },
    /// The chunk's data failed a check.
    Corrupt {
        /// Which check.
        message: String,
    },
}

/// One problem found by `verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyProblem {
    /// `volume/snapshot` (for a chunk shared by several snapshots: the first one checked).
    pub snapshot: String,
    /// Chunk index, when the problem is a chunk.
    pub index: Option<u64>,
    /// Object key.
    pub key: String,
    /// What is wrong.
    pub problem: ProblemKind,
}

/// Result of `verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Manifests checked.
    pub snapshots: u64,
    /// Chunk references checked.
    pub chunk_refs: u64,
    /// Chunk downloads checked (with `read_data`): one per distinct chunk and way it is
    /// referenced (hash, size, checksum, length), so every reference is checked.
    pub chunks_read: u64,
    /// Stored bytes downloaded.
    pub bytes_read: u64,
    /// Everything found wrong.
    pub problems: Vec<VerifyProblem>,
    /// Most chunk-map entries held at once: at most [`VERIFY_MAP_ENTRIES`] for format-2
    /// maps (walked segment by segment), the whole map of the largest format-1 manifest.
    pub map_entries_peak: u64,
}

/// Most chunk-map entries [`Repository::verify`] holds at once while walking format-2 maps:
/// the leaves read ahead ([`LEAF_WINDOW`]) and the one being checked, each at most
/// [`LEAF_SPAN`] entries, whatever the volume size.
pub const VERIFY_MAP_ENTRIES: u64 = (LEAF_WINDOW as u64 + 1) * LEAF_SPAN;

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Unreferenced chunks younger than this are not deleted by default: far longer than any
/// backup runs, so GC never races a writer it cannot see (see the `repo` module docs).
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(24 * 3600);

/// What `gc` does.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// The current time (injected); the store's clock is consulted too, the earlier wins.
    pub now: Timestamp,
    /// Report without deleting anything.
    pub dry_run: bool,
    /// Keep unreferenced chunks modified within this long ([`DEFAULT_GC_GRACE`]; zero
    /// deletes every unreferenced chunk, for when no writer can possibly be running).
    pub grace: Duration,
}

/// Result of garbage collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// True if nothing was deleted because it was a dry run.
    pub dry_run: bool,
    /// Chunks deleted (or that would be).
    pub deleted_chunks: u64,
    /// Bytes reclaimed (or that would be).
    pub reclaimed_bytes: u64,
    /// Chunks kept (referenced, or within the grace period).
    pub kept_chunks: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub recent_chunks: u64,
    /// Bytes of those.
    pub recent_bytes: u64,
    /// Unreferenced chunks modified at or after this time were kept (none with no grace).
    pub grace_cutoff: Option<Timestamp>,
    /// Referenced chunks not found in the store (run `verify`).
    pub missing_chunks: Vec<ChunkHash>,
    /// Manifest segments (format 2) deleted (or that would be); their bytes are in
    /// `reclaimed_bytes`.
    pub deleted_segments: u64,
    /// Segments kept (referenced, or within the grace period).
    pub kept_segments: u64,
    /// Unreferenced segments kept because they are younger than the grace period.
    pub recent_segments: u64,
}

/// What `prune` does.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Retention policy applied to each volume.
    pub policy: RetentionPolicy,
    /// The current time (injected).
    pub now: Timestamp,
    /// Only this volume (all when `None`).
    pub volume: Option<VolumeName>,
    /// Report without deleting anything.
    pub dry_run: bool,
    /// Grace period of the garbage collection that follows ([`GcOptions::grace`]).
    pub gc_grace: Duration,
}

/// Result of `prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Per volume: what the policy keeps and removes.
    pub decisions: Vec<(VolumeName, RetentionDecision)>,
    /// Snapshots deleted (or that would be), as `volume/snapshot`.
    pub removed: Vec<String>,
    /// The garbage collection that followed.
    pub gc: GcReport,
}

/// Per-snapshot figures of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotStatus {
    /// The snapshot.
    pub summary: SnapshotSummary,
    /// Stored bytes referenced by no other snapshot (what deleting it would reclaim).
    pub exclusive_stored_bytes: u64,
}

/// Repository totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RepoStatus {
    /// Every snapshot.
    pub snapshots: Vec<SnapshotStatus>,
    /// Chunk objects in the store.
    pub stored_chunks: u64,
    /// Bytes of chunk objects in the store.
    pub stored_bytes: u64,
    /// Sum over snapshots of their allocated (non-zero) bytes.
    pub logical_bytes: u64,
    /// Chunk objects no snapshot references (reclaimed by the next GC).
    pub unreferenced_chunks: u64,
    /// Bytes of those.
    pub unreferenced_bytes: u64,
    /// `logical_bytes / referenced stored bytes`: how much dedup + compression save.
    pub dedup_ratio: f64,
}

/// One chunk download of `verify --read-data`: the first place a distinct reference was seen.
struct ReadJob {
    snapshot: std::sync::Arc<str>,
    index: u64,
    offset: u64,
    chunk: ChunkRef,
}

/// One stored chunk in [`ChunkTable`]: its name, its size in the store, and the way (checksum,
/// raw length) it was first referenced, once a reference with the right size was seen.
#[derive(Debug, Clone, Copy)]
struct TableEntry {
    hash: ChunkHash,
    size: u64,
    /// Raw length of the first reference handed to the readers; 0 until then (no chunk is
    /// empty).
    first_len: u64,
    first_crc: u32,
}

/// The store's chunks as `verify` needs them: one listing of `chunks/`, kept sorted by name in
/// [`TableEntry`]s of [`CHUNK_TABLE_ENTRY_BYTES`] each, so a reference is checked for
/// presence and size without a request per chunk, and each chunk is downloaded once per
/// distinct way it is referenced.
struct ChunkTable {
    entries: Vec<TableEntry>,
    /// Further ways a chunk was referenced (another checksum or raw length than its first):
    /// only damaged or inconsistent manifests add any.
    other_ways: std::collections::HashSet<RefKey>,
}

/// Bytes [`Repository::verify`] keeps per stored chunk (see its docs).
pub const CHUNK_TABLE_ENTRY_BYTES: usize = std::mem::size_of::<TableEntry>();

impl ChunkTable {
    /// Lists `chunks/` a page at a time into the table.
    async fn list(store: &dyn ObjectStore) -> Result<Self> {
        let mut entries = Vec::new();
        crate::store::list_pages(store, "chunks/", |page| {
            entries.extend(page.objects.iter().filter_map(|o| {
                Some(TableEntry {
                    hash: chunk::parse_chunk_key(&o.key)?,
                    size: o.size,
                    first_len: 0,
                    first_crc: 0,
                })
            }));
            std::ops::ControlFlow::Continue(())
        })
        .await
        .map_err(|e| RepoError::store("listing chunks/", e))?;
        // Listings come in key order, which is name order; a store that does not keep it
        // costs a sort.
        if !entries.is_sorted_by(|a, b| a.hash < b.hash) {
            entries.sort_unstable_by_key(|e| e.hash);
            entries.dedup_by(|a, b| a.hash == b.hash);
        }
        entries.shrink_to_fit();
        Ok(ChunkTable {
            entries,
            other_ways: Default::default(),
        })
    }

    /// The problem with reference `r` (absent, or another size than stored), and whether it
    /// is the first reference of its kind to download.
    fn check(&mut self, r: &ChunkRef) -> (Option<ProblemKind>, bool) {
        let Ok(at) = self.entries.binary_search_by(|e| e.hash.cmp(&r.hash)) else {
            return (Some(ProblemKind::Missing), false);
        };
        let e = &mut self.entries[at];
        if e.size != r.stored_size {
            let problem = ProblemKind::SizeMismatch {
                expected: r.stored_size,
                actual: e.size,
            };
            return (Some(problem), false);
        }
        if e.first_len == 0 {
            e.first_len = r.raw_len.max(1);
            e.first_crc = r.crc32c;
            return (None, true);
        }
        if (e.first_len, e.first_crc) == (r.raw_len.max(1), r.crc32c) {
            return (None, false);
        }
        (None, self.other_ways.insert(ref_key(r)))
    }
}

impl Repository {
    /// Checks snapshots: every referenced chunk exists with the recorded size, and with
    /// `read_data` its bytes match crc32c and content hash. Problems are collected, not
    /// returned as errors.
    ///
    /// # Memory
    /// Snapshots are checked one at a time (the next four heads are read meanwhile), each map in index order a leaf at a time: a
    /// format-2 map holds at most [`VERIFY_MAP_ENTRIES`] entries
    /// ([`VerifyReport::map_entries_peak`]), a format-1 map is held whole (bounded by its own
    /// object; up to five at once: the one walked and the heads read ahead). Downloads (`read_data`) are handed to `concurrency` readers through a queue of
    /// `2 * concurrency` jobs. What grows is the table of the store's chunks, from one listing
    /// of `chunks/`: [`CHUNK_TABLE_ENTRY_BYTES`] (56) bytes per stored chunk (its name, stored
    /// size, and the checksum and length it was first downloaded for), up to twice that while
    /// the listing grows it; 1 GiB of table per ~19 million chunks (19 TiB of distinct data at
    /// the 1 MiB default). It is what makes the check one listing instead of a request per
    /// reference (a 1 TiB volume at 1 MiB chunks: a million existence requests per snapshot),
    /// and what lets a chunk shared by every snapshot be downloaded once instead of once per
    /// snapshot; a bounded table would trade either away. A chunk referenced with another
    /// checksum or length than its first (only damaged manifests do that) costs one more
    /// entry of about 100 bytes.
    ///
    /// # Errors
    /// Only failures to list or talk to the store, a missing requested snapshot, or a
    /// snapshot given without its volume.
    pub async fn verify(&self, opts: &VerifyOptions) -> Result<VerifyReport> {
        if let (None, Some(s)) = (&opts.volume, &opts.snapshot) {
            return Err(RepoError::InvalidRequest {
                reason: format!("snapshot {s} given without its volume"),
            });
        }
        let keys = async {
            match (&opts.volume, &opts.snapshot) {
                (Some(v), Some(s)) => Ok(vec![(v.clone(), s.clone())]),
                _ => self.manifest_keys(opts.volume.as_ref()).await,
            }
        };
        // The two listings do not depend on each other: side by side, and when both fail the
        // snapshots' error is the one returned, as when they ran one after the other.
        let (keys, table) = futures::join!(keys, ChunkTable::list(self.store().as_ref()));
        let keys = keys?;
        let mut table = table?;
        let concurrency = if opts.concurrency == 0 {
            8
        } else {
            opts.concurrency
        };
        if !opts.read_data {
            return self.verify_walk(keys, opts, &mut table, None).await;
        }
        // The walk hands each reference to download to the readers as it finds it, through a
        // channel of a few jobs per reader: downloads overlap the walk, and neither the jobs
        // nor the map pile up.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ReadJob>(2 * concurrency);
        let walk = self.verify_walk(keys, opts, &mut table, Some(tx));
        let jobs = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let reads = jobs
            .map(|job| self.verify_read(job))
            .buffer_unordered(concurrency)
            // Folded as they finish: nothing per chunk is kept but the problems.
            .try_fold(
                VerifyReport::default(),
                |mut report, (len, problem)| async move {
                    report.chunks_read += 1;
                    report.bytes_read += len;
                    report.problems.extend(problem);
                    Ok(report)
                },
            );
        let (mut report, read) = futures::try_join!(walk, reads)?;
        report.chunks_read = read.chunks_read;
        report.bytes_read = read.bytes_read;
        report.problems.extend(read.problems);
        Ok(report)
    }

    /// The walk of [`Repository::verify`]: every snapshot of `keys` in turn, its map in index
    /// order a leaf at a time, each reference looked up in `table`; references to download
    /// (the first of each distinct way a present chunk is referenced) go to `reads`.
    async fn verify_walk(
        &self,
        keys: Vec<(VolumeName, SnapshotName)>,
        opts: &VerifyOptions,
        table: &mut ChunkTable,
        reads: Option<tokio::sync::mpsc::Sender<ReadJob>>,
    ) -> Result<VerifyReport> {
        let single = opts.snapshot.is_some();
        let mut report = VerifyReport::default();
        let gauge = std::sync::Arc::new(EntryGauge::default());
        // The next heads are read while one is walked, a few at a time and handed over in the
        // listing's order, so the report (and the first error returned) is the same as one at
        // a time: a round trip per snapshot is what a repository of many small snapshots cost.
        // Each read is a task of its own: a buffered future would only make progress while the
        // walk waits for it, not while the walk reads segments.
        let mut heads = futures::stream::iter(keys)
            .map(|(v, s)| {
                let repo = self.clone();
                AbortOnDrop(tokio::spawn(async move {
                    let loaded = repo.load_stored(&v, &s).await;
                    (v, s, loaded)
                }))
            })
            .buffered(LOAD_CONCURRENCY);
        while let Some(joined) = heads.next().await {
            let (v, s, loaded) = joined.map_err(|e| RepoError::Internal {
                message: format!("reading a snapshot head: {e}"),
            })?;
            let unreadable = |e: &RepoError| VerifyProblem {
                snapshot: format!("{v}/{s}"),
                index: None,
                key: manifest_key(&v, &s),
                problem: ProblemKind::ManifestUnreadable {
                    message: e.to_string(),
                },
            };
            let stored = match loaded {
                Ok(m) => m,
                Err(e) if single || e.is_transient() => return Err(e),
                Err(RepoError::SnapshotNotFound { .. }) => continue, // deleted since listed
                Err(e) => {
                    report.problems.push(unreadable(&e));
                    continue;
                }
            };
            report.snapshots += 1;
            let name: std::sync::Arc<str> = format!("{v}/{s}").into();
            let geometry = stored.head().geometry;
            let mut leaves = self.stored_leaves(&stored, &gauge)?;
            loop {
                let leaf = match leaves.try_next().await {
                    Ok(Some(leaf)) => leaf,
                    Ok(None) => break,
                    Err(e) if single || e.is_transient() => return Err(e),
                    // A damaged or missing segment: what was walked so far is reported, the
                    // rest of this map cannot be known.
                    Err(e) => {
                        report.problems.push(unreadable(&e));
                        break;
                    }
                };
                let refs = leaf.entries.iter().map(|(i, r)| (*i, r));
                if let Err(e) = cbt_core::manifest::check_chunk_refs(&geometry, refs) {
                    let e = RepoError::Core(e);
                    if single {
                        return Err(e);
                    }
                    report.problems.push(unreadable(&e));
                    break;
                }
                for (index, r) in &leaf.entries {
                    report.chunk_refs += 1;
                    let (problem, read) = table.check(r);
                    if let Some(problem) = problem {
                        report.problems.push(VerifyProblem {
                            snapshot: name.to_string(),
                            index: Some(*index),
                            key: chunk::chunk_key(&r.hash),
                            problem,
                        });
                    }
                    if let (true, Some(tx)) = (read, &reads) {
                        let job = ReadJob {
                            snapshot: name.clone(),
                            index: *index,
                            offset: geometry.chunk_offset(*index),
                            chunk: *r,
                        };
                        if tx.send(job).await.is_err() {
                            // The readers stopped on an error, which the caller returns.
                            return Ok(report);
                        }
                    }
                }
            }
        }
        report.map_entries_peak = gauge.peak();
        Ok(report)
    }

    /// Downloads and checks one chunk for [`Repository::verify`]: its stored bytes read, and
    /// the problem found, if any. Only a transient failure is an error.
    async fn verify_read(&self, job: ReadJob) -> Result<(u64, Option<VerifyProblem>)> {
        let ReadJob {
            snapshot,
            index,
            offset,
            chunk: r,
        } = job;
        let at = ChunkContext {
            snapshot: &snapshot,
            index,
            offset,
        };
        // Read into pooled buffers (the restore's), and checked without keeping the raw bytes:
        // no allocation, zeroing or copy per chunk.
        let outcome = match self.fetch_chunk_for_write(&r, at).await {
            Ok(body) => {
                let len = body.len() as u64;
                let snap = snapshot.clone();
                let codec = self.codec().clone();
                tokio::task::spawn_blocking(move || {
                    let at = ChunkContext {
                        snapshot: &snap,
                        index,
                        offset,
                    };
                    codec.check_chunk(body, &r, at).map(|()| len)
                })
                .await
                .map_err(|e| RepoError::Internal {
                    message: e.to_string(),
                })?
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(len) => Ok((len, None)),
            Err(e) if e.is_transient() => Err(e),
            Err(e) => Ok((
                0,
                Some(VerifyProblem {
                    snapshot: snapshot.to_string(),
                    index: Some(index),
                    key: chunk::chunk_key(&r.hash),
                    problem: match e {
                        RepoError::ChunkMissing { .. } => ProblemKind::Missing,
                        other => ProblemKind::Corrupt {
                            message: other.to_string(),
                        },
                    },
                }),
            )),
        }
    }

    /// Deletes chunk objects no manifest references, under the exclusive lock, except those
    /// within the grace period.
    ///
    /// # Errors
    /// [`RepoError::Locked`] while a backup runs or a crashed one left its lock; any
    /// unreadable manifest (GC never guesses references); store errors.
    pub async fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        let lock = self.lock_exclusive("gc", opts.now).await?;
        let result = async {
            let cutoff = grace_cutoff(&lock, opts.now, opts.grace).await?;
            let keys = self.manifest_keys(None).await?;
            self.collect_garbage(keys, opts.dry_run, cutoff).await
        }
        .await;
        // The run's own error comes first; a lock that stays behind blocks every backup, so
        // failing to release it is reported even after a successful run.
        let released = lock.release().await;
        let report = result?;
        released?;
        Ok(report)
    }

    /// Streams the manifests of `keys` (a few loaded concurrently), in key order.
    fn manifest_stream(
        &self,
        keys: Vec<(VolumeName, SnapshotName)>,
    ) -> impl futures::Stream<Item = (VolumeName, SnapshotName, Result<Manifest>)> + '_ {
        futures::stream::iter(keys)
            .map(move |(v, s)| async move {
                let m = self.load_manifest(&v, &s).await;
                (v, s, m)
            })
            .buffered(LOAD_CONCURRENCY)
    }

    /// Every chunk and segment referenced by the manifests of `keys`; fails on the first
    /// unreadable one. A segment shared by several manifests (same name, same content) is read
    /// once: its subtree's references are already collected.
    async fn referenced(
        &self,
        keys: Vec<(VolumeName, SnapshotName)>,
    ) -> Result<(BTreeMap<ChunkHash, u64>, BTreeMap<ChunkHash, u64>)> {
        let mut referenced = BTreeMap::new();
        let mut segments: BTreeMap<ChunkHash, u64> = BTreeMap::new();
        for (v, s) in keys {
            match self.load_stored(&v, &s).await {
                Ok(StoredManifest::V1(m)) => referenced.append(&mut referenced_chunks([&m])),
                Ok(StoredManifest::V2(head)) => {
                    let MapLocation::Tree { root } = head.map else {
                        continue;
                    };
                    let shape = TreeShape::new(head.geometry);
                    let seen = std::cell::RefCell::new(&mut segments);
                    self.walk_tree(
                        &shape,
                        root,
                        |r| seen.borrow().contains_key(&r.name),
                        |_, r, seg| {
                            seen.borrow_mut().insert(r.name, u64::from(r.len));
                            if let Segment::Leaf(entries) = seg {
                                for (_, c) in entries {
                                    referenced.insert(c.hash, c.stored_size);
                                }
                            }
                            Ok(())
                        },
                        &super::WalkReads::default(),
                    )
                    .await?;
                }
                // Deleted since the listing: its chunks need no protection any more.
                Err(RepoError::SnapshotNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((referenced, segments))
    }

    async fn collect_garbage(
        &self,
        keys: Vec<(VolumeName, SnapshotName)>,
        dry_run: bool,
        recent_since: Option<Timestamp>,
    ) -> Result<GcReport> {
        let (referenced, referenced_segments) = self.referenced(keys).await?;
        let stored = stored_chunks(self.store().as_ref()).await?;
        let plan = plan_gc_with_grace(&referenced, stored.into_values(), recent_since);
        // Segments follow the same rules as chunks: unreferenced and older than the grace.
        let stored_segments = self.stored_segments().await?;
        let seg_plan = plan_gc_with_grace(
            &referenced_segments,
            stored_segments.into_values(),
            recent_since,
        );
        if !dry_run {
            let store = self.store();
            let keys = plan
                .delete
                .iter()
                .map(chunk::chunk_key)
                .chain(seg_plan.delete.iter().map(segment_key));
            futures::stream::iter(keys)
                .map(|key| async move {
                    store
                        .delete(&key)
                        .await
                        .map_err(|e| RepoError::store(format!("deleting {key}"), e))
                })
                .buffer_unordered(DELETE_CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await?;
        }
        Ok(GcReport {
            dry_run,
            deleted_chunks: plan.delete.len() as u64,
            reclaimed_bytes: plan.reclaim_bytes.saturating_add(seg_plan.reclaim_bytes),
            kept_chunks: plan.kept,
            recent_chunks: plan.recent,
            recent_bytes: plan.recent_bytes,
            grace_cutoff: recent_since,
            missing_chunks: plan.missing,
            deleted_segments: seg_plan.delete.len() as u64,
            kept_segments: seg_plan.kept,
            recent_segments: seg_plan.recent,
        })
    }

    /// Applies a retention policy to each volume, deletes the snapshots it removes, then
    /// garbage-collects, all under one exclusive lock.
    ///
    /// # Errors
    /// [`RepoError::Locked`]; [`cbt_core::CoreError::EmptyRetentionPolicy`]; any unreadable
    /// manifest; store errors.
    pub async fn prune(&self, opts: &PruneOptions) -> Result<PruneReport> {
        // Reject an empty policy before taking any lock.
        opts.policy.evaluate(&[], opts.now)?;
        let lock = self.lock_exclusive("prune", opts.now).await?;
        let result = self.prune_locked(opts, &lock).await;
        // The run's own error comes first; a lock that stays behind blocks every backup, so
        // failing to release it is reported even after a successful run.
        let released = lock.release().await;
        let report = result?;
        released?;
        Ok(report)
    }

    async fn prune_locked(&self, opts: &PruneOptions, lock: &RepoLock) -> Result<PruneReport> {
        let store_now = lock.stored_at().await?;
        let now = trusted_now(opts.now, store_now);
        let listed = self.manifest_listing(None).await?;
        let stored_at: BTreeMap<(VolumeName, SnapshotName), Option<Timestamp>> =
            listed.into_iter().map(|(v, s, t)| ((v, s), t)).collect();
        let keys: Vec<(VolumeName, SnapshotName)> = stored_at.keys().cloned().collect();
        let mut by_volume: BTreeMap<VolumeName, Vec<(SnapshotName, Timestamp)>> = BTreeMap::new();
        // Heads only: retention needs names and times, not maps.
        let mut manifests = futures::stream::iter(keys.clone())
            .map(|(v, s)| async move {
                let h = self.load_head(&v, &s).await;
                (v, s, h)
            })
            .buffered(LOAD_CONCURRENCY);
        while let Some((v, s, m)) = manifests.next().await {
            let m = match m {
                Ok(m) => m,
                Err(RepoError::SnapshotNotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            if opts.volume.as_ref().is_none_or(|want| want == &v) {
                // Never later than the store received it: a writer's clock running ahead
                // cannot make its snapshot outlive newer ones.
                let at = stored_at.get(&(v.clone(), s.clone())).copied().flatten();
                by_volume
                    .entry(v)
                    .or_default()
                    .push((s, trusted_created(m.created, at)));
            }
        }
        drop(manifests);
        let mut report = PruneReport::default();
        let mut removed: BTreeSet<(VolumeName, SnapshotName)> = BTreeSet::new();
        for (volume, snaps) in by_volume {
            let decision = opts.policy.evaluate(&snaps, now)?;
            removed.extend(decision.remove.iter().map(|s| (volume.clone(), s.clone())));
            report.decisions.push((volume, decision));
        }
        if !opts.dry_run {
            for (v, s) in &removed {
                let key = manifest_key(v, s);
                self.store()
                    .delete(&key)
                    .await
                    .map_err(|e| RepoError::store(format!("deleting manifest {key}"), e))?;
            }
        }
        report.removed = removed.iter().map(|(v, s)| format!("{v}/{s}")).collect();
        let remaining = keys.into_iter().filter(|k| !removed.contains(k)).collect();
        let cutoff = (!opts.gc_grace.is_zero()).then(|| now.saturating_sub(opts.gc_grace));
        report.gc = self
            .collect_garbage(remaining, opts.dry_run, cutoff)
            .await?;
        Ok(report)
    }

    /// Totals: per-snapshot sizes, stored bytes, unreferenced data and the dedup ratio.
    ///
    /// # Errors
    /// Any unreadable manifest; store errors.
    pub async fn status(&self) -> Result<RepoStatus> {
        let keys = self.manifest_keys(None).await?;
        let stored = stored_chunks(self.store().as_ref()).await?;
        // Pass 1: how many snapshots reference each chunk, plus the summaries.
        let mut refcount: HashMap<ChunkHash, u32> = HashMap::new();
        let mut summaries = Vec::new();
        let mut manifests = self.manifest_stream(keys);
        while let Some((_, _, m)) = manifests.next().await {
            let m = match m {
                Ok(m) => m,
                Err(RepoError::SnapshotNotFound { .. }) => continue, // deleted since listed
                Err(e) => return Err(e),
            };
            for h in m.chunks.unique_chunks().keys() {
                *refcount.entry(*h).or_default() += 1;
            }
            summaries.push(SnapshotSummary::of(&m));
        }
        drop(manifests);
        // Sizes come from the store and sums over many manifests: saturate, never wrap.
        let mut status = RepoStatus {
            stored_chunks: stored.len() as u64,
            stored_bytes: stored.values().fold(0u64, |a, c| a.saturating_add(c.size)),
            ..Default::default()
        };
        for (h, c) in &stored {
            if !refcount.contains_key(h) {
                status.unreferenced_chunks += 1;
                status.unreferenced_bytes = status.unreferenced_bytes.saturating_add(c.size);
            }
        }
        // Pass 2: bytes only one snapshot references.
        let mut exclusive = Vec::with_capacity(summaries.len());
        let seen: Vec<(VolumeName, SnapshotName)> = summaries
            .iter()
            .map(|s: &SnapshotSummary| (s.volume.clone(), s.snapshot.clone()))
            .collect();
        let mut manifests = self.manifest_stream(seen);
        while let Some((_, _, m)) = manifests.next().await {
            let bytes = match m {
                Ok(m) => m
                    .chunks
                    .unique_chunks()
                    .iter()
                    .filter(|(h, _)| refcount.get(*h) == Some(&1))
                    .fold(0u64, |a, (_, s)| a.saturating_add(*s)),
                Err(RepoError::SnapshotNotFound { .. }) => 0,
                Err(e) => return Err(e),
            };
            exclusive.push(bytes);
        }
        for (summary, exclusive_stored_bytes) in summaries.into_iter().zip(exclusive) {
            status.logical_bytes = status.logical_bytes.saturating_add(summary.allocated_bytes);
            status.snapshots.push(SnapshotStatus {
                summary,
                exclusive_stored_bytes,
            });
        }
        let referenced = status
            .stored_bytes
            .saturating_sub(status.unreferenced_bytes);
        status.dedup_ratio = if referenced == 0 {
            0.0
        } else {
            status.logical_bytes as f64 / referenced as f64
        };
        status.snapshots.sort_by(|a, b| {
            (&a.summary.volume, a.summary.created).cmp(&(&b.summary.volume, b.summary.created))
        });
        Ok(status)
    }
}

/// The grace cutoff for a GC run holding `lock`: `grace` before the earlier of `now` and the
/// store's time of the lock object; `None` (delete every unreferenced chunk) for no grace.
async fn grace_cutoff(
    lock: &RepoLock,
    now: Timestamp,
    grace: Duration,
) -> Result<Option<Timestamp>> {
    if grace.is_zero() {
        return Ok(None);
    }
    let store_now = lock.stored_at().await?;
    Ok(Some(trusted_now(now, store_now).saturating_sub(grace)))
}
