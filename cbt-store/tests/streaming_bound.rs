//! Restore walks a format-2 map segment by segment: the chunk-map entries it holds at once
//! (counted by the engine, [`RestoreReport::map_entries_peak`]) stay under a constant that
//! does not depend on the volume size, while every restore guarantee holds (exact image, zeros
//! where the snapshot has none on a dirty target, the pre-check of every chunk before the
//! first write). Asserted on counts, never on time.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;

use cbt_core::{ByteRange, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::engine::{
    self, BackupMode, BackupRequest, BlockSource, EngineOptions, RestoreOptions, RestoreReport,
};
use cbt_store::repo::{LEAF_WINDOW, RepoError, Repository};
use cbt_store::store::LocalStore;
use cbt_store::testing::synthetic::SyntheticSource;
use engine_support::local_repo;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Small chunks give many map entries per byte of volume: 4,096 per 16 MiB.
const CHUNK: u64 = 4 * KIB;
/// The documented restore bound: leaves read ahead, the batch gathered, the batch written.
const BOUND: u64 = 3 * LEAF_WINDOW as u64 * 128;
/// The documented full-backup bound: results waiting (fewer than the chunks the readers may
/// hand out ahead of the fold, `readers + readahead + workers + 2 * transfers`), the open leaf
/// and fewer than `LEAF_WINDOW + 2` finished leaves not yet stored.
fn backup_bound() -> u64 {
    let o = EngineOptions::default();
    (o.readers + o.readahead + o.workers + 2 * o.transfers) as u64 + 10 * 128
}

struct Fx {
    dir: tempfile::TempDir,
    local: Arc<LocalStore>,
    repo: Repository,
}

async fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let (local, repo) = local_repo(dir.path(), CHUNK).await;
    Fx { dir, local, repo }
}

fn vol() -> VolumeName {
    VolumeName::new("vol").unwrap()
}

/// A full backup; asserts it held a bounded part of its map and returned no whole map.
async fn backup(fx: &Fx, source: &SyntheticSource, name: &str) {
    let req = BackupRequest {
        volume: vol(),
        snapshot: SnapshotName::new(name).unwrap(),
        mode: BackupMode::Full {
            allocated: Some(source.allocated().clone()),
        },
        created: Timestamp(1),
        source_info: Default::default(),
        labels: Default::default(),
        chunk_size: None,
        volume_size: None,
    };
    let out = engine::backup(
        &fx.repo,
        Arc::new(source.clone()),
        req,
        // Stored raw: the test is about the map, not the codec (and stays fast unoptimised).
        &EngineOptions {
            compression_level: 0,
            ..EngineOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(
        out.manifest.is_none(),
        "a full backup hands back its head only"
    );
    let stored = out.stats.chunks_read - out.stats.chunks_zero;
    let bound = backup_bound();
    assert!(
        out.map_entries_peak <= bound,
        "{name}: {} entries held, bound {bound}",
        out.map_entries_peak
    );
    assert!(
        stored < 2 * bound || out.map_entries_peak * 2 < stored,
        "{name}: not streamed"
    );
}

async fn restore(fx: &Fx, name: &str, target: &str, opts: RestoreOptions) -> RestoreReport {
    engine::restore(
        &fx.repo,
        &vol(),
        &SnapshotName::new(name).unwrap(),
        &fx.dir.path().join(target),
        &opts,
        &EngineOptions::default(),
    )
    .await
    .unwrap()
}

/// The restored image equals the source, 1 MiB at a time.
fn assert_same(source: &SyntheticSource, path: &std::path::Path) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len() as u64, source.size());
    let mut want = vec![0u8; MIB as usize];
    for (k, piece) in got.chunks(MIB as usize).enumerate() {
        source
            .read_exact_at(&mut want[..piece.len()], k as u64 * MIB)
            .unwrap();
        assert!(piece == &want[..piece.len()], "MiB {k} differs");
    }
}

/// One repository for every case (the synthetic content depends only on the offset, so the
/// volumes share their chunks and the test stays quick on a local store).
#[tokio::test]
async fn restores_hold_a_bounded_window_of_the_map_whatever_the_volume_size() {
    let fx = fixture().await;
    // Dense volumes restored to new files: the entries held stay under the same constant for
    // a 2x larger volume, below the map's size, and the image is exact.
    let mut peaks = Vec::new();
    for (name, size) in [("small", 13 * MIB), ("large", 26 * MIB)] {
        let source = SyntheticSource::new(size, RangeSet::full(size));
        backup(&fx, &source, name).await;
        let dry = restore(
            &fx,
            name,
            name,
            RestoreOptions {
                dry_run: true,
                ..Default::default()
            },
        )
        .await;
        let r = restore(&fx, name, name, RestoreOptions::default()).await;
        let chunks = size / CHUNK;
        assert_eq!(r.chunks, chunks);
        assert_eq!(r.bytes_written, size);
        assert_eq!((dry.chunks, dry.bytes_written), (r.chunks, r.bytes_written));
        assert!(r.map_entries_peak > 0);
        assert!(
            r.map_entries_peak <= BOUND && dry.map_entries_peak <= BOUND,
            "{name}: {} / {} entries held, bound {BOUND}",
            r.map_entries_peak,
            dry.map_entries_peak
        );
        assert!(r.map_entries_peak < chunks, "{name}: not streamed");
        assert_same(&source, &fx.dir.path().join(name));
        peaks.push(r.map_entries_peak);
    }
    // 2x the volume, not 2x the entries: the window does not grow with the map.
    assert!(peaks[1] * 2 < 26 * MIB / CHUNK, "{peaks:?}");
    assert!(peaks[1] < 2 * peaks[0], "{peaks:?}");

    in_place_gaps(&fx).await;
    missing_chunk(&fx).await;
}

/// In place over a dirty device: holes between and after stored chunks (whole leaves and
/// whole level-1 ranges without any segment among them) read as zeros afterwards.
async fn in_place_gaps(fx: &Fx) {
    let size = 24 * MIB + 3 * KIB;
    let mut allocated = RangeSet::new();
    // Runs of data, a hole spanning several leaves, a lone chunk, a hole to the end.
    for (start, len) in [
        (0, 3 * MIB),
        (3 * MIB + 8 * KIB, 5 * MIB),
        (14 * MIB + 4 * KIB, 4 * KIB),
        (15 * MIB, 6 * MIB),
    ] {
        allocated.insert(ByteRange::new(start, len).unwrap());
    }
    let source = SyntheticSource::new(size, allocated);
    backup(fx, &source, "holes").await;
    let device = fx.dir.path().join("device");
    std::fs::write(&device, vec![0xAAu8; (size + 5 * KIB) as usize]).unwrap();
    let r = restore(
        fx,
        "holes",
        "device",
        RestoreOptions {
            overwrite: true,
            in_place: true,
            dry_run: false,
        },
    )
    .await;
    assert!(r.map_entries_peak <= BOUND, "{}", r.map_entries_peak);
    assert!(r.map_entries_peak < r.chunks, "not streamed");
    assert_eq!(r.bytes_zeroed, size - r.bytes_written);
    let got = std::fs::read(&device).unwrap();
    // The device keeps its size; the bytes past the volume are not the restore's.
    assert!(got[size as usize..].iter().all(|b| *b == 0xAA));
    std::fs::write(&device, &got[..size as usize]).unwrap();
    assert_same(&source, &device);
}

/// A chunk missing deep in a streamed map fails the restore before anything is written,
/// naming that chunk's index, as it does for a map held whole.
async fn missing_chunk(fx: &Fx) {
    let size = 26 * MIB;
    let source = SyntheticSource::new(size, RangeSet::full(size));
    // Chunk 5,000 (past the first batches, and the first volume's end) leaves the store.
    let index = 5000u64;
    let mut raw = vec![0u8; CHUNK as usize];
    source.read_exact_at(&mut raw, index * CHUNK).unwrap();
    let hash = fx.repo.codec().chunk_hash(&raw);
    let file = fx
        .local
        .path_of(&cbt_store::chunk::chunk_key(&hash))
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    let device = fx.dir.path().join("device2");
    std::fs::write(&device, vec![0xAAu8; size as usize]).unwrap();
    let err = engine::restore(
        &fx.repo,
        &vol(),
        &SnapshotName::new("large").unwrap(),
        &device,
        &RestoreOptions {
            overwrite: true,
            in_place: true,
            dry_run: false,
        },
        &EngineOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, RepoError::ChunkMissing { index: i, .. } if i == index),
        "{err:?}"
    );
    assert!(std::fs::read(&device).unwrap().iter().all(|b| *b == 0xAA));
}
