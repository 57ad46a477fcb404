//! `Repository::verify` walks format-2 maps segment by segment: for a snapshot whose map spans
//! many leaves it holds a bounded window of entries (`VerifyReport::map_entries_peak`) and
//! still finds a missing chunk, a chunk of the wrong size and (reading data) a corrupt chunk,
//! each at its index. Asserted on counts, never on time.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;

use cbt_core::{ChunkState, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::chunk::chunk_key;
use cbt_store::engine::{self, BackupMode, BackupRequest, EngineOptions};
use cbt_store::repo::{
    CHUNK_TABLE_ENTRY_BYTES, ProblemKind, Repository, VERIFY_MAP_ENTRIES, VerifyOptions,
    VerifyReport,
};
use cbt_store::store::ObjectStore;
use cbt_store::testing::synthetic::SyntheticSource;
use engine_support::local_repo;

const CHUNK: u64 = 4096;
/// Chunks of the volume: more than twice the verify window.
const CHUNKS: u64 = 2600;

async fn verify(repo: &Repository, read_data: bool, snapshot: Option<&str>) -> VerifyReport {
    repo.verify(&VerifyOptions {
        volume: snapshot.map(|_| VolumeName::new("vol").unwrap()),
        snapshot: snapshot.map(|s| SnapshotName::new(s).unwrap()),
        read_data,
        concurrency: 3,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn verify_walks_a_large_map_in_a_bounded_window_and_finds_each_problem() {
    assert_eq!(
        CHUNK_TABLE_ENTRY_BYTES, 56,
        "the documented cost per stored chunk"
    );
    let dir = tempfile::tempdir().unwrap();
    let (local, repo) = local_repo(dir.path(), CHUNK).await;
    // Two snapshots of the same content (shared chunks), the second with a hole.
    let size = CHUNKS * CHUNK;
    let dense = SyntheticSource::new(size, RangeSet::full(size));
    let hole = RangeSet::try_from_extents([(100 * CHUNK, 50 * CHUNK)]).unwrap();
    let holed = SyntheticSource::new(size, RangeSet::full(size).subtract(&hole));
    for (name, source) in [("a", &dense), ("b", &holed)] {
        engine::backup(
            &repo,
            Arc::new(source.clone()),
            BackupRequest {
                volume: VolumeName::new("vol").unwrap(),
                snapshot: SnapshotName::new(name).unwrap(),
                mode: BackupMode::Full {
                    allocated: Some(source.allocated().clone()),
                },
                created: Timestamp(1),
                source_info: Default::default(),
                labels: Default::default(),
                chunk_size: None,
                volume_size: None,
            },
            &EngineOptions {
                compression_level: 0,
                ..EngineOptions::default()
            },
        )
        .await
        .unwrap();
    }
    let clean = verify(&repo, true, None).await;
    assert!(clean.is_ok(), "{:?}", clean.problems);
    assert_eq!(clean.snapshots, 2);
    assert_eq!(clean.chunk_refs, 2 * CHUNKS - 50);
    // Shared chunks are downloaded once.
    assert_eq!(clean.chunks_read, CHUNKS);
    assert!(clean.map_entries_peak > 0);
    assert!(
        clean.map_entries_peak <= VERIFY_MAP_ENTRIES && VERIFY_MAP_ENTRIES * 2 < CHUNKS,
        "held {} entries of a {CHUNKS}-entry map",
        clean.map_entries_peak
    );

    // Damage three chunks far into the map: one deleted, one cut short, one with a flipped
    // byte (same size: only reading it shows).
    let map = repo
        .load_manifest(
            &VolumeName::new("vol").unwrap(),
            &SnapshotName::new("a").unwrap(),
        )
        .await
        .unwrap();
    let key = |i: u64| match map.chunks.get(i) {
        ChunkState::Stored(r) => chunk_key(&r.hash),
        ChunkState::Zero => panic!("chunk {i} is stored"),
    };
    let (missing, short, corrupt) = (1500, 2000, 2500);
    local.delete(&key(missing)).await.unwrap();
    let path = local.path_of(&key(short)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let path = local.path_of(&key(corrupt)).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[70] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    drop(map);

    let found = |r: &VerifyReport, snapshot: &str| {
        let mut v: Vec<(u64, &'static str)> = r
            .problems
            .iter()
            .filter(|p| p.snapshot == format!("vol/{snapshot}"))
            .map(|p| {
                let kind = match p.problem {
                    ProblemKind::Missing => "missing",
                    ProblemKind::SizeMismatch { .. } => "size",
                    ProblemKind::Corrupt { .. } => "corrupt",
                    ProblemKind::ManifestUnreadable { .. } => "manifest",
                };
                (p.index.unwrap(), kind)
            })
            .collect();
        v.sort();
        v
    };
    // Presence and sizes only: both snapshots reference the deleted and the short chunk.
    let r = verify(&repo, false, None).await;
    for s in ["a", "b"] {
        assert_eq!(
            found(&r, s),
            vec![(missing, "missing"), (short, "size")],
            "{s}"
        );
    }
    assert_eq!(r.chunks_read, 0);
    assert!(r.map_entries_peak <= VERIFY_MAP_ENTRIES);
    // Reading data also finds the flipped byte, once (the chunk is downloaded once, for the
    // first snapshot that references it).
    let r = verify(&repo, true, None).await;
    assert_eq!(
        found(&r, "a"),
        vec![(missing, "missing"), (short, "size"), (corrupt, "corrupt")]
    );
    assert_eq!(found(&r, "b"), vec![(missing, "missing"), (short, "size")]);
    assert_eq!(r.chunks_read, CHUNKS - 2);
    // One snapshot alone.
    let r = verify(&repo, true, Some("b")).await;
    assert_eq!(r.snapshots, 1);
    assert_eq!(
        found(&r, "b"),
        vec![(missing, "missing"), (short, "size"), (corrupt, "corrupt")]
    );
    assert!(r.map_entries_peak <= VERIFY_MAP_ENTRIES);
}
