//! A full backup with a format-2 parent of the same geometry (the PVC mover's full backup
//! when no SnapshotMetadata service answers) streams both maps: it reads the parent's leaves
//! in order, a window at a time, and writes its own map as it goes, so the chunk-map entries
//! it holds (`BackupOutcome::map_entries_peak`) stay under one constant for a 2x larger
//! volume, while it still uploads exactly the chunks that differ from the parent.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;

use futures::StreamExt;

use cbt_core::manifest::ParentRef;
use cbt_core::maptree::LEAF_SPAN;
use cbt_core::{ByteRange, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::engine::{
    self, BackupMode, BackupOutcome, BackupRequest, BlockSource, EngineOptions, MERGE_QUEUE,
    RestoreOptions,
};
use cbt_store::repo::{LEAF_WINDOW, Repository};
use cbt_store::store::{LocalStore, ObjectStore};
use cbt_store::testing::hooked::{Call, HookedStore, StoreHook};
use cbt_store::testing::synthetic::SyntheticSource;
use engine_support::local_repo;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CHUNK: u64 = 4 * KIB;

fn opts() -> EngineOptions {
    EngineOptions {
        compression_level: 0,
        ..EngineOptions::default()
    }
}

async fn run(
    repo: &Repository,
    volume: &VolumeName,
    name: &str,
    source: &SyntheticSource,
    mode: BackupMode,
) -> BackupOutcome {
    let req = BackupRequest {
        volume: volume.clone(),
        snapshot: SnapshotName::new(name).unwrap(),
        mode,
        created: Timestamp(1),
        source_info: Default::default(),
        labels: Default::default(),
        chunk_size: None,
        volume_size: None,
    };
    engine::backup(repo, Arc::new(source.clone()), req, &opts())
        .await
        .unwrap()
}

/// A full backup of `src` without a parent.
async fn full(
    repo: &Repository,
    volume: &VolumeName,
    name: &str,
    src: &SyntheticSource,
) -> BackupOutcome {
    run(
        repo,
        volume,
        name,
        src,
        BackupMode::Full { allocated: None },
    )
    .await
}

/// A fully allocated volume of `size` and its full backup `name`.
async fn full_allocated(
    repo: &Repository,
    volume: &VolumeName,
    name: &str,
    size: u64,
) -> (SyntheticSource, BackupOutcome) {
    let src = SyntheticSource::new(size, RangeSet::full(size));
    let out = full(repo, volume, name, &src).await;
    (src, out)
}

/// Snapshot `name`: an incremental (`IncrementalOf`) of `src` over `parent`'s head as stored,
/// reading the chunks `changed` touches.
async fn incremental_of(
    repo: &Repository,
    volume: &VolumeName,
    name: &str,
    src: &SyntheticSource,
    parent: &BackupOutcome,
    changed: RangeSet,
) -> BackupOutcome {
    let head = repo.load_head(volume, &parent.head.snapshot).await.unwrap();
    let mode = BackupMode::IncrementalOf {
        parent: Box::new(head),
        changed,
    };
    run(repo, volume, name, src, mode).await
}

/// Snapshot `c`: a full backup of `child` with `parent`'s snapshot as its parent.
async fn with_parent(
    repo: &Repository,
    volume: &VolumeName,
    child: &SyntheticSource,
    parent: &BackupOutcome,
    allocated: Option<RangeSet>,
) -> BackupOutcome {
    let mode = BackupMode::FullWithParent {
        allocated,
        parent: parent.head.as_parent(),
    };
    run(repo, volume, "c", child, mode).await
}

/// The backup held at most `bound` map entries at once.
fn assert_within(out: &BackupOutcome, bound: u64) {
    assert!(
        out.map_entries_peak <= bound,
        "{} entries held, bound {bound}",
        out.map_entries_peak
    );
}

fn ranges(list: &[(u64, u64)]) -> RangeSet {
    let mut r = RangeSet::new();
    for (start, len) in list {
        r.insert(ByteRange::new(*start, *len).unwrap());
    }
    r
}

#[tokio::test]
async fn full_with_parent_holds_a_bounded_window_of_both_maps_and_uploads_only_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = local_repo(dir.path(), CHUNK).await;
    let mut peaks = Vec::new();
    for (k, size) in [13 * MIB, 26 * MIB].into_iter().enumerate() {
        let volume = VolumeName::new(format!("vol{k}")).unwrap();
        // The parent has a 1 MiB hole mid-volume: whole leaves without a segment.
        let half = size / 2;
        let parent_src =
            SyntheticSource::new(size, ranges(&[(0, half), (half + MIB, size - half - MIB)]));
        let parent = run(
            &repo,
            &volume,
            "parent",
            &parent_src,
            BackupMode::Full {
                allocated: Some(parent_src.allocated().clone()),
            },
        )
        .await;
        // Changed: single chunks early and late, a run of 3 across a leaf boundary, and one
        // chunk in the parent's hole (zero there, data now). A new generation per volume,
        // so no change is already stored from another volume.
        let changed = ranges(&[
            (7 * CHUNK, 100),
            (127 * CHUNK, 3 * CHUNK),
            (half + 8 * KIB, CHUNK),
            (size - CHUNK, CHUNK),
        ]);
        let child_src = parent_src.rewritten(changed, 10 + k as u64);
        let link = ParentRef {
            snapshot: parent.head.snapshot.clone(),
            snapshot_id: parent.head.snapshot_id.clone(),
        };
        let out = run(
            &repo,
            &volume,
            "child",
            &child_src,
            BackupMode::FullWithParent {
                allocated: Some(child_src.allocated().clone()),
                parent: link.clone(),
            },
        )
        .await;
        assert!(out.manifest.is_none(), "the child's map is not held whole");
        assert_eq!(out.head.parent, Some(link));
        let changed_chunks = 1 + 3 + 1 + 1;
        assert_eq!(out.stats.objects_written, changed_chunks);
        assert_eq!(out.stats.bytes_changed, changed_chunks * CHUNK);
        let stored = out.stats.chunks_read - out.stats.chunks_zero;
        assert_eq!(out.stats.chunks_deduplicated, stored - changed_chunks);
        assert_within(&out, peak_bound(&opts()));
        peaks.push((out.map_entries_peak, stored));

        // The map written is the child's: the restore is the child's image.
        assert_restores(&repo, dir.path(), &volume, "child", &child_src).await;
    }
    // 2x the volume, not 2x the entries; the larger one holds well under half its map.
    assert!(peaks[1].0 < 2 * peaks[0].0, "{peaks:?}");
    assert!(peaks[1].0 * 2 < peaks[1].1, "not streamed: {peaks:?}");
}

/// A parent of another chunk size: no chunk can match by index, so its map is not read and
/// the child streams its own; the lineage is recorded and the image restores exactly.
#[tokio::test]
async fn full_with_a_parent_of_another_chunk_size_streams_and_records_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = local_repo(dir.path(), CHUNK).await;
    let volume = VolumeName::new("v").unwrap();
    let size = 3 * MIB;
    let (src, parent) = full_allocated(&repo, &volume, "p", size).await;
    let child_src = src.rewritten(ranges(&[(MIB, CHUNK)]), 7);
    let req = BackupRequest {
        volume: volume.clone(),
        snapshot: SnapshotName::new("c").unwrap(),
        mode: BackupMode::FullWithParent {
            allocated: None,
            parent: parent.head.as_parent(),
        },
        created: Timestamp(2),
        source_info: Default::default(),
        labels: Default::default(),
        chunk_size: Some(4 * CHUNK),
        volume_size: None,
    };
    let out = engine::backup(&repo, Arc::new(child_src.clone()), req, &opts())
        .await
        .unwrap();
    assert!(out.manifest.is_none());
    assert_eq!(out.head.parent, Some(parent.head.as_parent()));
    assert_eq!(out.head.chunk_size(), 4 * CHUNK);
    assert_eq!(out.metadata.parent_segments_read, 0);
    // Nothing compares by index across chunk sizes: every chunk counts as changed.
    assert_eq!(out.stats.bytes_changed, size);
    assert_restores(&repo, dir.path(), &volume, "c", &child_src).await;
}

/// A repository of 4 KiB chunks in `dir`.
async fn repo_in(dir: &std::path::Path) -> Repository {
    local_repo(dir, CHUNK).await.1
}

/// The most map entries a full backup with a parent may hold with `o`, from the constants:
/// the fold's results waiting for an earlier chunk (fewer than the chunks handed out ahead of
/// it, `readers + readahead + workers + 2 * transfers`), its open leaf and the finished leaves
/// not yet stored (`LEAF_WINDOW + 1`), plus the parent's leaves over the chunks handed out
/// (`ceil(ahead / 128)`, one more where they straddle a boundary), the one the fold waits in
/// and the walk's read-ahead (`LEAF_WINDOW`).
fn peak_bound(o: &EngineOptions) -> u64 {
    let leaf = LEAF_SPAN;
    let ahead = (o.readers + o.readahead + o.workers + 2 * o.transfers) as u64;
    let fold = ahead + (LEAF_WINDOW as u64 + 2) * leaf;
    let window = (LEAF_WINDOW as u64 + 2 + ahead.div_ceil(leaf)) * leaf;
    fold + window
}

/// Restores `name` of `volume` and checks it is `want`'s image, byte for byte.
async fn assert_restores(
    repo: &Repository,
    dir: &std::path::Path,
    volume: &VolumeName,
    name: &str,
    want: &SyntheticSource,
) {
    let target = dir.join(format!("{volume}-{name}.img"));
    engine::restore(
        repo,
        volume,
        &SnapshotName::new(name).unwrap(),
        &target,
        &RestoreOptions::default(),
        &EngineOptions::default(),
    )
    .await
    .unwrap();
    let got = std::fs::read(&target).unwrap();
    let mut image = vec![0u8; want.size() as usize];
    want.read_exact_at(&mut image, 0).unwrap();
    assert_eq!(got.len(), image.len(), "{name}: restored size");
    assert!(got == image, "{name}: restored image differs");
}

/// The volume grew (about 2x, from a size that ends in a partial chunk): the parent is read in a
/// window of its own shape; below its end, unchanged chunks are deduplicated against it; the
/// partial chunk that became whole and everything past the old end are compared as new.
#[tokio::test]
async fn full_with_a_grown_parent_streams_and_uploads_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path()).await;
    let volume = VolumeName::new("grown").unwrap();
    let old = 2 * MIB + 1000;
    let (parent_src, parent) = full_allocated(&repo, &volume, "p", old).await;
    assert_eq!(parent.stats.objects_written, 2 * MIB / CHUNK + 1);
    // The same bytes below the old end (content depends on the offset only), data up to
    // 3 MiB and in the last 512 KiB, a hole between; one chunk rewritten below the old end.
    let new = 4 * MIB;
    let child_src = SyntheticSource::new(new, ranges(&[(0, 3 * MIB), (new - MIB / 2, MIB / 2)]))
        .rewritten(ranges(&[(10 * CHUNK, CHUNK)]), 3);
    let out = with_parent(
        &repo,
        &volume,
        &child_src,
        &parent,
        Some(child_src.allocated().clone()),
    )
    .await;
    assert!(out.manifest.is_none(), "the parent was read in a window");
    assert_eq!(out.head.parent, Some(parent.head.as_parent()));
    assert_eq!(out.head.volume_size(), new);
    let below = 2 * MIB / CHUNK; // whole chunks below the old end
    let past = (3 * MIB - 2 * MIB) / CHUNK - 1 + MIB / 2 / CHUNK; // whole new ones past it
    // The rewritten chunk, the old partial chunk (now whole), and every chunk past the end.
    let uploaded = 1 + 1 + past;
    assert_eq!(out.stats.chunks_read, below + 1 + past);
    assert_eq!(out.stats.chunks_zero, 0);
    assert_eq!(out.stats.objects_written, uploaded);
    assert_eq!(out.stats.chunks_deduplicated, below - 1);
    assert_eq!(out.stats.bytes_deduplicated, (below - 1) * CHUNK);
    assert_eq!(out.stats.bytes_changed, uploaded * CHUNK);
    let bound = peak_bound(&opts());
    assert_within(&out, bound);
    assert_restores(&repo, dir.path(), &volume, "c", &child_src).await;
    assert_restores(&repo, dir.path(), &volume, "p", &parent_src).await;
}

/// The volume shrank (to half, ending in a partial chunk): the parent's window stops being
/// read at the new end; the new partial last chunk differs from the parent's whole one.
#[tokio::test]
async fn full_with_a_shrunk_parent_streams_and_stops_at_the_new_end() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path()).await;
    let volume = VolumeName::new("shrunk").unwrap();
    let (_, parent) = full_allocated(&repo, &volume, "p", 4 * MIB).await;
    let new = 2 * MIB + 1000;
    let child_src = SyntheticSource::new(new, RangeSet::full(new))
        .rewritten(ranges(&[(3 * CHUNK, CHUNK), (500 * CHUNK, 10)]), 4);
    let out = with_parent(&repo, &volume, &child_src, &parent, None).await;
    assert!(out.manifest.is_none(), "the parent was read in a window");
    assert_eq!(out.head.volume_size(), new);
    let whole = 2 * MIB / CHUNK;
    assert_eq!(out.stats.chunks_read, whole + 1);
    // Two rewritten chunks and the partial last one.
    assert_eq!(out.stats.objects_written, 3);
    assert_eq!(out.stats.chunks_deduplicated, whole - 2);
    assert_eq!(out.stats.bytes_changed, 2 * CHUNK + 1000);
    // Stored raw (level 0): each object is its bytes and the chunk framing.
    let framing = cbt_store::chunk::OVERHEAD as u64;
    assert_eq!(out.stats.bytes_uploaded, 2 * CHUNK + 1000 + 3 * framing);
    let bound = peak_bound(&opts());
    assert_within(&out, bound);
    assert_restores(&repo, dir.path(), &volume, "c", &child_src).await;
}

/// The fold's entries and the parent's leaves are counted together as they are held: where
/// the parent has data only up to some point and the child only after it, the two are
/// never held at the same time, so the peak stays under the larger of the two parts (plus a
/// leaf), not their sum; and the parent's leaves over the range the child's plan skips are not
/// kept (they would otherwise pile up until the fold passed them).
#[tokio::test]
async fn full_with_parent_reports_the_peak_of_both_maps_held_together() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path()).await;
    let volume = VolumeName::new("apart").unwrap();
    // 14 leaves of the parent over what the child skips, 2 of the child's after them.
    let (size, split) = (8 * MIB, 7 * MIB);
    let parent_src = SyntheticSource::new(size, ranges(&[(0, split)]));
    let parent = full(&repo, &volume, "p", &parent_src).await;
    let child_src = SyntheticSource::new(size, ranges(&[(split, size - split)]));
    let out = with_parent(
        &repo,
        &volume,
        &child_src,
        &parent,
        Some(child_src.allocated().clone()),
    )
    .await;
    let read = (size - split) / CHUNK;
    assert_eq!(out.stats.chunks_read, read);
    assert_eq!(out.stats.objects_written, read);
    assert_eq!(out.stats.bytes_changed, size - split);
    let o = opts();
    let ahead = (o.readers + o.readahead + o.workers + 2 * o.transfers) as u64;
    let fold = ahead + (LEAF_WINDOW as u64 + 2) * LEAF_SPAN;
    let window = (LEAF_WINDOW as u64 + 1) * LEAF_SPAN;
    let bound = fold.max(window) + LEAF_SPAN;
    assert_within(&out, bound);
    assert_restores(&repo, dir.path(), &volume, "c", &child_src).await;
}

/// One upload stalls (the changed first chunk's, delayed 1 s) while every later chunk is the
/// parent's and completes at once: the results behind it, and the parent's leaves over them,
/// must not pile up until it lands. The readers stop handing out chunks that far ahead of the
/// fold, so the peak stays under the bound from the constants; and the backup is still exact.
#[tokio::test]
async fn full_with_parent_stays_bounded_while_one_upload_stalls() {
    use cbt_store::store::Op;
    use cbt_store::store::fault::{Fault, FaultRule, FaultyStore, When};

    let dir = tempfile::tempdir().unwrap();
    let (local, _) = local_repo(dir.path(), CHUNK).await;
    let faulty = Arc::new(FaultyStore::over(local));
    let repo = Repository::open(faulty.clone()).await.unwrap();
    let volume = VolumeName::new("stall").unwrap();
    let size = 8 * MIB;
    let (parent_src, parent) = full_allocated(&repo, &volume, "p", size).await;
    let child_src = parent_src.rewritten(ranges(&[(0, CHUNK)]), 5);
    faulty.add_rule(
        FaultRule::new(
            Op::Put,
            When::Nth(1),
            Fault::Delay(std::time::Duration::from_secs(1)),
        )
        .on_keys_containing("chunks/"),
    );
    let out = with_parent(&repo, &volume, &child_src, &parent, None).await;
    assert_eq!(
        faulty.injected(),
        1,
        "the changed chunk's upload was delayed"
    );
    assert_eq!(out.stats.objects_written, 1);
    assert_eq!(out.stats.chunks_deduplicated, size / CHUNK - 1);
    let bound = peak_bound(&opts());
    assert_within(&out, bound);
    assert_restores(&repo, dir.path(), &volume, "c", &child_src).await;
}

/// An incremental (`IncrementalOf`) of a format-2 parent whose volume grew, then of one whose
/// volume shrank: the new map is written whole by merging the parent's entries, walked in
/// order, with the chunks read, so neither map is held (no whole manifest handed back, the
/// peak under the bound although each map is larger); only the changed chunks, the grown
/// tail and the boundary chunk are read; every restore is exact.
#[tokio::test]
async fn incremental_of_a_resized_parent_merges_the_maps_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path()).await;
    let volume = VolumeName::new("resized").unwrap();
    // 4,097 chunks: 33 leaves, the last one holding a partial chunk.
    let (first, p) = full_allocated(&repo, &volume, "p", 16 * MIB + 1000).await;

    // Grown by 1 MiB (data in its first half); two chunks rewritten below the old end.
    let new = 17 * MIB;
    let changed = ranges(&[(5 * CHUNK, CHUNK), (3000 * CHUNK, CHUNK)]);
    let grown =
        SyntheticSource::new(new, ranges(&[(0, 16 * MIB + MIB / 2)])).rewritten(changed.clone(), 6);
    let out = incremental_of(&repo, &volume, "g", &grown, &p, changed).await;
    assert!(out.manifest.is_none(), "the maps were merged in order");
    assert_eq!(out.head.volume_size(), new);
    assert_eq!(out.head.parent, Some(p.head.as_parent()));
    // Read: the two changed chunks, the old partial chunk (now whole) and the 255 past it.
    let tail = MIB / CHUNK - 1;
    assert_eq!(out.stats.chunks_read, 2 + 1 + tail);
    let data_past = MIB / 2 / CHUNK - 1; // chunks of the tail holding data
    assert_eq!(out.stats.chunks_zero, tail - data_past);
    assert_eq!(out.stats.objects_written, 2 + 1 + data_past);
    assert_eq!(out.stats.bytes_changed, (2 + 1 + data_past) * CHUNK);
    let bound = merge_bound(&opts());
    assert_within(&out, bound);
    assert_restores(&repo, dir.path(), &volume, "g", &grown).await;

    // Shrunk below the old size, ending in a partial chunk; one more chunk rewritten (the
    // two rewritten before are rewritten again: one generation per synthetic source).
    let small = 12 * MIB + 10;
    let changed = ranges(&[
        (5 * CHUNK, CHUNK),
        (100 * CHUNK, CHUNK),
        (3000 * CHUNK, CHUNK),
    ]);
    let shrunk = SyntheticSource::new(small, RangeSet::full(small)).rewritten(changed.clone(), 7);
    let out = incremental_of(&repo, &volume, "s", &shrunk, &out, changed).await;
    assert!(out.manifest.is_none());
    assert_eq!(out.head.volume_size(), small);
    // Read: the changed chunks and the new partial last chunk.
    assert_eq!(out.stats.chunks_read, 4);
    assert_eq!(out.stats.objects_written, 4);
    assert_eq!(out.stats.bytes_changed, 3 * CHUNK + 10);
    assert_within(&out, bound);
    assert_restores(&repo, dir.path(), &volume, "s", &shrunk).await;
    assert_restores(&repo, dir.path(), &volume, "p", &first).await;
}

/// Reads of every `segments/` key: how many times, and the bytes each read returned; and
/// how many times each manifest object (`snapshots/`) was read.
#[derive(Debug, Default)]
struct SegmentReads {
    segments: std::sync::Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
    manifests: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl SegmentReads {
    fn take(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        std::mem::take(&mut *self.segments.lock().unwrap())
    }

    fn take_manifests(&self) -> std::collections::BTreeMap<String, u64> {
        std::mem::take(&mut *self.manifests.lock().unwrap())
    }
}

impl StoreHook for SegmentReads {
    fn read(&self, call: &Call<'_>, body: bytes::Bytes) -> bytes::Bytes {
        let key = call.key();
        if key.starts_with("segments/") {
            let mut reads = self.segments.lock().unwrap();
            let e = reads.entry(key.to_string()).or_default();
            e.0 += 1;
            e.1 += body.len() as u64;
        } else if key.starts_with("snapshots/") {
            *self
                .manifests
                .lock()
                .unwrap()
                .entry(key.to_string())
                .or_default() += 1;
        }
        body
    }
}

/// A repository of 4 KiB chunks whose segment reads are counted.
async fn counted_repo(dir: &std::path::Path) -> (Arc<HookedStore<SegmentReads>>, Repository) {
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.join("repo")).unwrap());
    let store = Arc::new(HookedStore::new(local, SegmentReads::default()));
    let repo = engine_support::init_sized(store.clone(), CHUNK).await;
    (store, repo)
}

/// The stored segments and their sizes (of the only snapshot, when called after it).
async fn segment_sizes(store: &dyn ObjectStore) -> std::collections::BTreeMap<String, u64> {
    cbt_store::store::list_all(store, "segments/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect()
}

/// The most map entries a resized incremental may hold: as a full backup with a parent
/// (`peak_bound`), plus the parent's entries queued for the merge and the leaf being merged.
fn merge_bound(o: &EngineOptions) -> u64 {
    peak_bound(o) + (MERGE_QUEUE as u64 + 1) * LEAF_SPAN
}

/// An incremental of a resized parent walks the parent once: the lookups of the chunks read
/// and the merge of the kept entries share the walk, so every parent segment is fetched
/// exactly once (grown: the whole parent is kept; the first chunk read is 2,000 chunks in, so
/// the merge reads ahead of every lookup from the start), and a shrunk parent's segments at
/// most once; the peak stays within the documented bound; both restore byte for byte.
#[tokio::test]
async fn incremental_of_a_resized_parent_reads_each_parent_segment_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = counted_repo(dir.path()).await;
    let volume = VolumeName::new("once").unwrap();
    // 4,097 chunks: 33 leaves under one node, the last leaf holding a partial chunk.
    let (_, p) = full_allocated(&repo, &volume, "p", 16 * MIB + 1000).await;
    let parent_segments = segment_sizes(store.as_ref()).await;
    assert!(parent_segments.len() > 33, "leaves and a node");
    // Two children of the same parent: grown, then shrunk.
    for (name, grow) in [("g", true), ("s", false)] {
        let (size, changed) = if grow {
            (
                17 * MIB,
                ranges(&[(2000 * CHUNK, CHUNK), (3000 * CHUNK, CHUNK)]),
            )
        } else {
            (
                12 * MIB + 10,
                ranges(&[(2000 * CHUNK, CHUNK), (2500 * CHUNK, CHUNK)]),
            )
        };
        // A generation per child: nothing one uploaded is found stored by the other (that
        // would have the commit re-check walk the child's own new segments).
        let generation = if grow { 9 } else { 10 };
        let src =
            SyntheticSource::new(size, RangeSet::full(size)).rewritten(changed.clone(), generation);
        store.hook().take();
        let out = incremental_of(&repo, &volume, name, &src, &p, changed).await;
        let reads = store.hook().take();
        assert!(out.manifest.is_none(), "the maps were merged in order");
        for (key, (n, _)) in &reads {
            assert!(
                parent_segments.contains_key(key),
                "read {key}, not the parent's"
            );
            assert_eq!(*n, 1, "{key} read {n} times (grow {grow})");
        }
        if grow {
            assert_eq!(
                reads.len(),
                parent_segments.len(),
                "every parent segment read"
            );
            let listed: u64 = parent_segments.values().sum();
            assert_eq!(out.metadata.parent_segment_bytes_read, listed);
        } else {
            // The 25 leaves below the new end (3,073 chunks) and their node, none past it.
            assert_eq!(reads.len(), 26, "{} segments read", reads.len());
        }
        assert_counted(&out, &reads);
        assert_within(&out, merge_bound(&opts()));
        assert_restores(&repo, dir.path(), &volume, name, &src).await;
    }
}

/// Every segment of the parent (`listed`) was read exactly once, and nothing else.
fn assert_read_once(
    reads: &std::collections::BTreeMap<String, (u64, u64)>,
    listed: &std::collections::BTreeMap<String, u64>,
) {
    for (key, (n, _)) in reads {
        assert!(listed.contains_key(key), "read {key}, not the parent's");
        assert_eq!(*n, 1, "{key} read {n} times");
    }
    assert_eq!(reads.len(), listed.len(), "every parent segment read");
}

/// An `Incremental` (the caller hands in the whole parent) of a format-2 parent reads the
/// stored parent once: the walk that checks the caller's map against it keeps the paths the
/// new map is derived along, so every parent segment is fetched exactly once, `MetadataIo`
/// reports exactly those reads, and the child's map is the one an `IncrementalOf` of the same
/// change derives (same root), restoring byte for byte. A caller's map that differs from the
/// stored one is still refused, with nothing committed and the parent still read once.
#[tokio::test]
async fn incremental_with_the_whole_parent_reads_each_parent_segment_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = counted_repo(dir.path()).await;
    let volume = VolumeName::new("given").unwrap();
    // 513 chunks: 5 leaves under one node, the last leaf holding only a partial chunk.
    let (first, p) = full_allocated(&repo, &volume, "p", 2 * MIB + 1000).await;
    let parent_segments = segment_sizes(store.as_ref()).await;
    assert_eq!(parent_segments.len(), 5 + 1, "leaves and a node");
    let whole = repo.load_manifest(&volume, &p.head.snapshot).await.unwrap();
    // Changes in four of the five leaves (one the partial last chunk), one a run across a
    // leaf boundary: the walk keeps the node and those leaves, not the one left unchanged.
    let changed = ranges(&[
        (5 * CHUNK, CHUNK),
        (127 * CHUNK, 2 * CHUNK),
        (300 * CHUNK, 10),
        (512 * CHUNK, 1000),
    ]);
    let src = first.rewritten(changed.clone(), 11);

    // A forged parent: one chunk reference the repository does not hold.
    let mut forged = whole.clone();
    let (index, r) = forged
        .chunks
        .iter_stored()
        .nth(400)
        .map(|(i, r)| (i, *r))
        .unwrap();
    let fake = cbt_core::ChunkRef {
        hash: cbt_core::ChunkHash([0x5a; 32]),
        ..r
    };
    forged
        .chunks
        .set(index, cbt_core::ChunkState::Stored(fake))
        .unwrap();
    store.hook().take();
    let req = BackupRequest {
        volume: volume.clone(),
        snapshot: SnapshotName::new("forged").unwrap(),
        mode: BackupMode::Incremental {
            parent: Box::new(forged),
            changed: changed.clone(),
        },
        created: Timestamp(1),
        source_info: Default::default(),
        labels: Default::default(),
        chunk_size: None,
        volume_size: None,
    };
    let err = engine::backup(&repo, Arc::new(src.clone()), req, &opts())
        .await
        .unwrap_err();
    assert!(
        matches!(err, cbt_store::repo::RepoError::InvalidRequest { .. }),
        "{err:?}"
    );
    assert_read_once(&store.hook().take(), &parent_segments);
    let forged_name = SnapshotName::new("forged").unwrap();
    assert!(!repo.snapshot_exists(&volume, &forged_name).await.unwrap());
    assert!(repo.list_locks().await.unwrap().is_empty());

    // The stored parent handed in: each of its segments read once, and counted as read, and
    // its manifest object once.
    store.hook().take_manifests();
    let out = run(
        &repo,
        &volume,
        "w",
        &src,
        BackupMode::Incremental {
            parent: Box::new(whole),
            changed: changed.clone(),
        },
    )
    .await;
    let reads = store.hook().take();
    assert_read_once(&reads, &parent_segments);
    assert_counted(&out, &reads);
    let parent_key = cbt_store::repo::manifest_key(&volume, &p.head.snapshot);
    assert_eq!(store.hook().take_manifests().get(&parent_key), Some(&1));
    assert_eq!(out.stats.chunks_read, 1 + 2 + 1 + 1);
    assert_eq!(out.stats.objects_written, 5);
    let child = out
        .manifest
        .as_ref()
        .expect("the whole child is handed back");
    let stored = repo
        .load_manifest(&volume, &out.head.snapshot)
        .await
        .unwrap();
    assert!(
        child.chunks == stored.chunks,
        "the map handed back is the one committed"
    );
    assert_restores(&repo, dir.path(), &volume, "w", &src).await;

    // The same change as an `IncrementalOf` derives the same map.
    let of = incremental_of(&repo, &volume, "o", &src, &p, changed).await;
    assert_eq!(of.head.map, out.head.map);
}

/// The backup's `MetadataIo` reports exactly the segment reads the store saw.
fn assert_counted(out: &BackupOutcome, reads: &std::collections::BTreeMap<String, (u64, u64)>) {
    let bytes: u64 = reads.values().map(|(_, b)| b).sum();
    let count: u64 = reads.values().map(|(n, _)| n).sum();
    assert!(count > 0, "the parent was read");
    assert_eq!(out.metadata.parent_segment_bytes_read, bytes);
    assert_eq!(out.metadata.parent_segments_read, count);
}

/// `MetadataIo::parent_segment_bytes_read` and `parent_segments_read` count what each path
/// actually fetched of a format-2 parent, as the store saw it: the changed paths of a
/// same-size incremental, and the in-order walk of a full backup with a parent (same size and
/// grown), each segment once.
#[tokio::test]
async fn metadata_io_counts_the_parent_segments_each_path_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = counted_repo(dir.path()).await;
    let volume = VolumeName::new("counted").unwrap();
    let old = 16 * MIB + 1000;
    let (first, p) = full_allocated(&repo, &volume, "p", old).await;
    let parent_segments = segment_sizes(store.as_ref()).await;

    // Same size: the root and the two leaves holding the changed chunks.
    let changed = ranges(&[(5 * CHUNK, CHUNK), (3000 * CHUNK, CHUNK)]);
    let src = first.rewritten(changed.clone(), 3);
    store.hook().take();
    let out = incremental_of(&repo, &volume, "i", &src, &p, changed).await;
    let reads = store.hook().take();
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert_counted(&out, &reads);

    // The whole parent handed in (`Incremental`): the stored parent is read whole to check
    // it, once, keeping the changed paths as the walk passes them.
    let whole = repo
        .load_manifest(&volume, &SnapshotName::new("p").unwrap())
        .await
        .unwrap();
    let changed = ranges(&[(5 * CHUNK, CHUNK)]);
    let src = first.rewritten(changed.clone(), 5);
    store.hook().take();
    let out = run(
        &repo,
        &volume,
        "w",
        &src,
        BackupMode::Incremental {
            parent: Box::new(whole),
            changed,
        },
    )
    .await;
    let reads = store.hook().take();
    assert_counted(&out, &reads);
    assert_read_once(&reads, &parent_segments);

    // Full backups with the parent, of the same size and grown: the whole parent, once.
    for (name, size) in [("f", old), ("g", 17 * MIB)] {
        let src = SyntheticSource::new(size, RangeSet::full(size));
        store.hook().take();
        let out = with_parent_named(&repo, &volume, name, &src, &p).await;
        let reads = store.hook().take();
        assert_counted(&out, &reads);
        let listed: u64 = parent_segments.values().sum();
        assert_eq!(out.metadata.parent_segment_bytes_read, listed, "{name}");
        assert_eq!(
            out.metadata.parent_segments_read,
            parent_segments.len() as u64
        );
        assert!(reads.keys().all(|k| parent_segments.contains_key(k)));
    }
}

/// As `with_parent`, naming the new snapshot.
async fn with_parent_named(
    repo: &Repository,
    volume: &VolumeName,
    name: &str,
    child: &SyntheticSource,
    parent: &BackupOutcome,
) -> BackupOutcome {
    let mode = BackupMode::FullWithParent {
        allocated: None,
        parent: parent.head.as_parent(),
    };
    run(repo, volume, name, child, mode).await
}

/// Delays every segment GET (while `slow` is set) and counts those in flight, their peak, and
/// those finished.
#[derive(Debug, Default)]
struct SlowSegments {
    slow: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicU64,
    peak: std::sync::atomic::AtomicU64,
    finished: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl StoreHook for SlowSegments {
    async fn before(
        &self,
        _: &dyn ObjectStore,
        call: &Call<'_>,
    ) -> Result<(), cbt_store::store::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if matches!(call, Call::Get { .. })
            && call.key().starts_with("segments/")
            && self.slow.load(SeqCst)
        {
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.peak.fetch_max(now, SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn finished(&self, call: &Call<'_>) {
        use std::sync::atomic::Ordering::SeqCst;
        if matches!(call, Call::Get { .. })
            && call.key().starts_with("segments/")
            && self.slow.load(SeqCst)
        {
            self.in_flight.fetch_sub(1, SeqCst);
            self.finished.fetch_add(1, SeqCst);
        }
    }
}

/// `Repository::leaves_in_order` reads its window ahead in tasks of their own: with every
/// segment GET delayed, the reads overlap (more than one in flight, never more than the
/// window plus the node being read), and they complete while the consumer holds a leaf
/// without polling the walk (a buffered future would stall until polled again: the wait
/// below would never end). The entries held stay within the window's bound, and the walk
/// still yields every leaf in order.
#[tokio::test]
async fn leaves_in_order_reads_ahead_in_tasks_that_overlap_within_the_window() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()).unwrap());
    let store = Arc::new(HookedStore::new(local, SlowSegments::default()));
    let repo = engine_support::init_sized(store.clone(), CHUNK).await;
    let volume = VolumeName::new("ahead").unwrap();
    // 4,097 chunks: 33 leaves under one node.
    let (_, p) = full_allocated(&repo, &volume, "p", 16 * MIB + 1000).await;
    let cbt_core::manifest::MapLocation::Tree { root } = p.head.map else {
        panic!("a format-2 head");
    };
    let hook = store.hook();
    hook.slow.store(true, SeqCst);
    let gauge = Arc::new(cbt_store::repo::EntryGauge::default());
    let shape = cbt_core::maptree::TreeShape::new(p.head.geometry);
    let mut walk = Box::pin(repo.leaves_in_order(shape, root, LEAF_WINDOW, gauge.clone()));
    let first = walk.next().await.unwrap().unwrap();
    assert_eq!(first.entries.first().map(|e| e.0), Some(0));
    // The root and the whole window, read while the walk is not polled. The timeout only
    // keeps a stalled walk from hanging the suite.
    let window_read = async {
        while hook.finished.load(SeqCst) < 1 + LEAF_WINDOW as u64 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), window_read)
        .await
        .expect("the read-ahead progressed while the walk was not polled");
    let mut leaves = 1;
    let mut next = LEAF_SPAN;
    while let Some(leaf) = walk.next().await {
        let leaf = leaf.unwrap();
        assert_eq!(leaf.entries.first().map(|e| e.0), Some(next));
        next += LEAF_SPAN;
        leaves += 1;
    }
    drop(first);
    assert_eq!(leaves, 33);
    let peak = hook.peak.load(SeqCst);
    assert!(peak > 1, "reads overlapped: {peak} in flight at most");
    assert!(peak <= LEAF_WINDOW as u64 + 1, "{peak} reads in flight");
    assert!(
        gauge.peak() <= (LEAF_WINDOW as u64 + 1) * LEAF_SPAN,
        "{}",
        gauge.peak()
    );
}

/// A resized incremental whose parent segments come slowly: a lookup holds the parent's walk
/// while its leaf is read, and the fold's merge waits for the walk meanwhile, so the backup
/// only finishes if the uploads are still driven while the merge waits (the timeout keeps a
/// hang from stalling the suite; it measures nothing). The result restores exactly.
#[tokio::test]
async fn incremental_of_a_resized_parent_finishes_with_slow_segment_reads() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().join("repo")).unwrap());
    let store = Arc::new(HookedStore::new(local, SlowSegments::default()));
    let repo = engine_support::init_sized(store.clone(), CHUNK).await;
    let volume = VolumeName::new("slow").unwrap();
    let (_, p) = full_allocated(&repo, &volume, "p", 16 * MIB + 1000).await;
    // Changed chunks spread over the parent, so lookups run ahead of the merge throughout.
    let new = 17 * MIB;
    let places: Vec<(u64, u64)> = (0..16).map(|k| ((k * 250 + 7) * CHUNK, CHUNK)).collect();
    let changed = ranges(&places);
    let src = SyntheticSource::new(new, RangeSet::full(new)).rewritten(changed.clone(), 4);
    store.hook().slow.store(true, SeqCst);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        incremental_of(&repo, &volume, "c", &src, &p, changed),
    )
    .await
    .expect("the backup finished");
    store.hook().slow.store(false, SeqCst);
    assert!(
        store.hook().peak.load(SeqCst) > 1,
        "segment reads overlapped"
    );
    assert_within(&out, merge_bound(&opts()));
    assert_restores(&repo, dir.path(), &volume, "c", &src).await;
}
