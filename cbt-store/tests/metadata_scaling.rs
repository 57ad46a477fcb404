//! Incremental cost follows the change, not the volume: on a 64 GiB synthetic volume with
//! holes, an incremental of ~0.01% scattered changes writes and reads a bounded amount of
//! manifest metadata (asserted on bytes through a counting store, never on time), far below
//! what a format-1 manifest of the same volume costs, and the same change on a 4x smaller
//! volume costs the same metadata.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use cbt_core::maptree::{TreeShape, max_incremental_segment_bytes};
use cbt_core::{ByteRange, ChunkGeometry, RangeSet};
use cbt_store::engine::{self, BackupMode, EngineOptions};
use cbt_store::store::{LocalStore, ObjectStore, PutOutcome};
use cbt_store::testing::hooked::{Call, HookedStore, StoreHook};
use cbt_store::testing::synthetic::SyntheticSource;
use engine_support::{full, init_sized, request, snap, vol};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// Small chunks make a dense map cheap to produce: 16 Mi chunk slots in 64 GiB.
const CHUNK: u64 = 4 * KIB;
/// Chunk slots per leaf segment, in bytes of volume at this chunk size.
const LEAF_BYTES: u64 = cbt_core::maptree::LEAF_SPAN * CHUNK;
/// Scattered places the incremental changes, 256 KiB each: 6.25 MiB, 0.0095% of 64 GiB.
const PLACES: u64 = 25;
const PLACE_LEN: u64 = 256 * KIB;

/// Metadata bytes moved, by direction; metadata is everything under `segments/` and
/// `snapshots/`.
#[derive(Debug, Default)]
struct Counts {
    meta_put: AtomicU64,
    meta_get: AtomicU64,
    head_put: AtomicU64,
}

fn is_meta(key: &str) -> bool {
    key.starts_with("segments/") || key.starts_with("snapshots/")
}

/// Counts metadata bytes actually stored or read.
impl StoreHook for Counts {
    fn put_done(&self, call: &Call<'_>, outcome: PutOutcome) {
        let Call::Put { key, len, .. } = *call else {
            return;
        };
        if outcome == PutOutcome::Created && is_meta(key) {
            self.meta_put.fetch_add(len, Ordering::Relaxed);
            if key.starts_with("snapshots/") {
                self.head_put.fetch_add(len, Ordering::Relaxed);
            }
        }
    }

    fn read(&self, call: &Call<'_>, body: Bytes) -> Bytes {
        if is_meta(call.key()) {
            self.meta_get
                .fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        body
    }
}

fn range(start: u64, len: u64) -> ByteRange {
    ByteRange::new(start, len).unwrap()
}

/// The layout: one allocated chunk every 8 leaves across the whole volume (so every level of
/// the tree is populated), and `PLACES` fully allocated leaves in the first 16 GiB, each
/// holding one 256 KiB change.
fn layout(size: u64) -> (RangeSet, RangeSet) {
    let mut allocated = RangeSet::new();
    let mut at = 0;
    while at < size {
        allocated.insert(range(at, CHUNK));
        at += 8 * LEAF_BYTES;
    }
    let mut changed = RangeSet::new();
    for p in 0..PLACES {
        let leaf = (p * 600 * MIB + MIB + LEAF_BYTES) / LEAF_BYTES * LEAF_BYTES;
        allocated.insert(range(leaf, LEAF_BYTES));
        changed.insert(range(leaf + LEAF_BYTES / 4, PLACE_LEN));
    }
    (allocated, changed)
}

struct Run {
    /// Segment + head bytes the incremental wrote.
    written: u64,
    /// Head bytes among them.
    head: u64,
    /// Metadata bytes the incremental read (the parent's head and segments).
    read: u64,
    /// Stored chunks of the parent.
    parent_chunks: u64,
    /// What the parent's map costs as a format-1 manifest object (zstd JSON).
    v1_object: u64,
    shape: TreeShape,
}

async fn run(size: u64) -> Run {
    // Thousands of small chunk objects: on tmpfs where there is one, so the commit's sync
    // costs nothing (bytes are what this test measures, not the disk).
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()).unwrap());
    let store = Arc::new(HookedStore::new(local, Counts::default()));
    let counts = store.hook();
    let repo = init_sized(store.clone(), CHUNK).await;
    let (allocated, changed) = layout(size);
    let base = SyntheticSource::new(size, allocated);
    let request = |name: &str, mode| request("vol", name, mode, 1);
    let opts = EngineOptions::default();
    let full = engine::backup(
        &repo,
        Arc::new(base.clone()),
        request("full", full()),
        &opts,
    )
    .await
    .unwrap();
    // A full backup streams its map; the format-1 comparison needs it whole.
    let parent = repo
        .load_manifest(&full.head.volume, &full.head.snapshot)
        .await
        .unwrap();
    let v1_object = zstd::bulk::compress(&parent.to_json().unwrap(), 3)
        .unwrap()
        .len() as u64;

    counts.meta_put.store(0, Ordering::Relaxed);
    counts.meta_get.store(0, Ordering::Relaxed);
    counts.head_put.store(0, Ordering::Relaxed);
    let out = engine::backup(
        &repo,
        Arc::new(base.rewritten(changed.clone(), 1)),
        request(
            "incr",
            BackupMode::IncrementalOf {
                parent: Box::new(full.head.clone()),
                changed,
            },
        ),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(out.stats.bytes_changed, PLACES * PLACE_LEN);
    let run = Run {
        written: counts.meta_put.load(Ordering::Relaxed),
        head: counts.head_put.load(Ordering::Relaxed),
        read: counts.meta_get.load(Ordering::Relaxed),
        parent_chunks: parent.chunks.stored_count(),
        v1_object,
        shape: TreeShape::new(ChunkGeometry::new(size, CHUNK).unwrap()),
    };
    // The engine's own account agrees with what the store saw.
    let m = out.metadata;
    assert_eq!(m.written.segment_bytes + m.written.head_bytes, run.written);
    assert!(m.parent_segment_bytes_read <= run.read);

    // The child is complete and correct: the changed places read back as the new content.
    let child = repo
        .load_manifest(&vol("vol"), &snap("incr"))
        .await
        .unwrap();
    assert_eq!(child.chunks.stored_count(), parent.chunks.stored_count());
    let changed_chunks = child
        .chunks
        .iter_stored()
        .filter(|(i, r)| parent.chunks.get(*i) != cbt_core::ChunkState::Stored(**r))
        .count() as u64;
    assert_eq!(changed_chunks, PLACES * PLACE_LEN / CHUNK);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_moves_metadata_in_proportion_to_the_change_not_the_volume() {
    let big = run(64 * GIB).await;
    // Each place lies in one leaf: the bound of the design for that many leaves, plus a head.
    let bound = max_incremental_segment_bytes(&big.shape, PLACES);
    assert!(big.head < 4 * KIB, "head of {} bytes", big.head);
    assert!(
        big.written - big.head <= bound,
        "{} segment bytes written, bound {bound}",
        big.written - big.head
    );
    assert!(
        big.read <= bound + big.head,
        "{} bytes of the parent read, bound {}",
        big.read,
        bound + big.head
    );
    // The budget (2 MB each way for 100 places on 1 TiB) holds with room here.
    assert!(big.written <= 2_000_000 && big.read <= 2_000_000);
    // Far below the format-1 cost: the whole map written (and read) again per incremental.
    assert!(
        big.written * 5 < big.v1_object && big.read * 5 < big.v1_object,
        "written {} / read {} against a format-1 manifest of {} bytes ({} chunks)",
        big.written,
        big.read,
        big.v1_object,
        big.parent_chunks
    );

    // The same change on a volume 4x smaller: the same metadata, up to the root (which lists
    // one child per 8 GiB here) and the head's different numbers.
    let small = run(16 * GIB).await;
    assert!(small.parent_chunks * 2 < big.parent_chunks);
    let slack = 8 * 40 + 64; // six more root entries and a few digits
    assert!(
        big.written <= small.written + slack,
        "64 GiB wrote {}, 16 GiB wrote {}",
        big.written,
        small.written
    );
    assert!(
        big.read <= small.read + slack,
        "64 GiB read {}, 16 GiB read {}",
        big.read,
        small.read
    );
    println!(
        "64 GiB: incremental wrote {} B, read {} B (format 1: {} B); 16 GiB: wrote {} B, read {} B",
        big.written, big.read, big.v1_object, small.written, small.read
    );
}
