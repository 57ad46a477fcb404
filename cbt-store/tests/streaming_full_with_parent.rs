//! A full backup with a format-2 parent of the same geometry (the PVC mover's full backup
//! when no SnapshotMetadata service answers) streams both maps: it reads the parent's leaves
//! in order, a window at a time, and writes its own map as it goes, so the chunk-map entries
//! it holds (`BackupOutcome::map_entries_peak`) stay under one constant for a 2x larger
//! volume, while it still uploads exactly the chunks that differ from the parent.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;

use cbt_core::manifest::ParentRef;
use cbt_core::{ByteRange, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::engine::{
    self, BackupMode, BackupOutcome, BackupRequest, BlockSource, EngineOptions, RestoreOptions,
};
use cbt_store::repo::{LEAF_WINDOW, Repository};
use cbt_store::testing::synthetic::SyntheticSource;
use engine_support::local_repo;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CHUNK: u64 = 4 * KIB;
/// The full-backup bound (results waiting, open leaf, unstored leaves) plus the parent's
/// window: leaves spanning the reordered chunks (at most 2), the one the fold waits in, and
/// the walk's read-ahead.
const BOUND: u64 = 8 + 10 * 128 + (LEAF_WINDOW as u64 + 4) * 128;

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
        assert!(
            out.map_entries_peak <= BOUND,
            "{size}: {} entries held, bound {BOUND}",
            out.map_entries_peak
        );
        peaks.push((out.map_entries_peak, stored));

        // The map written is the child's: the restore is the child's image.
        let target = dir.path().join(format!("child{k}.img"));
        engine::restore(
            &repo,
            &volume,
            &SnapshotName::new("child").unwrap(),
            &target,
            &RestoreOptions::default(),
            &EngineOptions::default(),
        )
        .await
        .unwrap();
        let got = std::fs::read(&target).unwrap();
        let mut want = vec![0u8; size as usize];
        child_src.read_exact_at(&mut want, 0).unwrap();
        assert!(got == want, "{size}: restored image differs");
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
    let src = SyntheticSource::new(size, RangeSet::full(size));
    let parent = run(
        &repo,
        &volume,
        "p",
        &src,
        BackupMode::Full { allocated: None },
    )
    .await;
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
    let target = dir.path().join("c.img");
    engine::restore(
        &repo,
        &volume,
        &SnapshotName::new("c").unwrap(),
        &target,
        &RestoreOptions::default(),
        &EngineOptions::default(),
    )
    .await
    .unwrap();
    let mut want = vec![0u8; size as usize];
    child_src.read_exact_at(&mut want, 0).unwrap();
    assert!(std::fs::read(&target).unwrap() == want);
}
