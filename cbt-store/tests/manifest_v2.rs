//! Manifest format 2 through the repository: incrementals write and read only the segments
//! their change touches, GC deletes segments no snapshot references (under the chunk grace
//! rules) and keeps shared ones, verify and restore catch missing or damaged segments.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::time::Duration;

use bytes::Bytes;
use cbt_core::{CoreError, ErrorKind, Timestamp};
use cbt_store::engine::{self, BackupMode};
use cbt_store::repo::{GcOptions, ProblemKind, RepoError, VerifyOptions, segment_key};
use cbt_store::store::{ObjectStore, list_all};
use engine_support::*;

/// 384 chunks of 64 KiB: three leaf segments under a root node.
const SIZE: usize = 384 * CS as usize;

async fn segment_keys(store: &dyn ObjectStore) -> Vec<String> {
    list_all(store, "segments/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// A full backup and an incremental changing one chunk of the first leaf.
async fn two_snapshots(fx: &Fixture) -> (Vec<u8>, Vec<u8>, engine::BackupOutcome) {
    let img = image(SIZE, 21);
    let path = fx.write("d.img", &img);
    let a = backup_file(&fx.repo, &path, request("v", "a", full(), 10))
        .await
        .unwrap();
    assert_eq!(a.metadata.written.segments, 4);
    let mut next = img.clone();
    next[100..110].copy_from_slice(b"0123456789");
    std::fs::write(&path, &next).unwrap();
    let mode = BackupMode::IncrementalOf {
        parent: Box::new(a.head.clone()),
        changed: cbt_core::RangeSet::try_from_extents([(100, 10)]).unwrap(),
    };
    let b = backup_file(&fx.repo, &path, request("v", "b", mode, 20))
        .await
        .unwrap();
    (img, next, b)
}

#[tokio::test]
async fn an_incremental_touches_only_the_segments_on_its_path() {
    let fx = Fixture::new().await;
    let (_, next, b) = two_snapshots(&fx).await;
    assert!(
        b.manifest.is_none(),
        "the lean incremental holds no whole map"
    );
    // Read: the parent's root and first leaf. Written: a new first leaf and a new root.
    assert_eq!(b.metadata.parent_segments_read, 2);
    assert_eq!(b.metadata.written.segments, 2);
    assert_eq!(segment_keys(fx.store.as_ref()).await.len(), 6);
    assert_eq!(b.stats.bytes_changed, CS);
    let target = fx.path("b.img");
    restore_file(&fx.repo, &vol("v"), &snap("b"), &target)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), next);
    let m = fx.repo.load_manifest(&vol("v"), &snap("b")).await.unwrap();
    assert_eq!(m.parent, b.head.parent);
    assert_eq!(m.snapshot_id, b.head.snapshot_id);
}

#[tokio::test]
async fn gc_deletes_unreferenced_segments_after_the_grace_and_keeps_shared_ones() {
    let fx = Fixture::new().await;
    let (_, next, _) = two_snapshots(&fx).await;
    fx.repo
        .delete_snapshot(&vol("v"), &snap("a"))
        .await
        .unwrap();
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    // Within the grace period, the segments only `a` used stay, like chunks do.
    let kept = fx
        .repo
        .gc(&GcOptions {
            now,
            dry_run: false,
            grace: Duration::from_secs(3600),
        })
        .await
        .unwrap();
    assert_eq!((kept.deleted_segments, kept.recent_segments), (0, 2));
    let gc = fx
        .repo
        .gc(&GcOptions {
            now,
            dry_run: false,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    // `a`'s first leaf and root go; the two leaves `b` shares with it stay.
    assert_eq!(gc.deleted_segments, 2);
    assert_eq!(gc.kept_segments, 4);
    assert_eq!(segment_keys(fx.store.as_ref()).await.len(), 4);
    let target = fx.path("b.img");
    restore_file(&fx.repo, &vol("v"), &snap("b"), &target)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), next);
}

#[tokio::test]
async fn missing_or_damaged_segments_are_integrity_errors_in_verify_and_restore() {
    let fx = Fixture::new().await;
    let (_, _, b) = two_snapshots(&fx).await;
    let a = fx.repo.load_head(&vol("v"), &snap("a")).await.unwrap();
    let cbt_core::manifest::MapLocation::Tree { root: Some(b_root) } = b.head.map else {
        panic!("b has a tree")
    };
    // Damage b's root: the bytes are rewritten with a valid store checksum, so only the
    // content-to-name check can notice.
    let key = segment_key(&b_root.name);
    let mut body = fx.store.get(&key).await.unwrap().to_vec();
    body[20] ^= 1;
    put_raw(fx.store.as_ref(), &key, Bytes::from(body)).await;
    let err = fx
        .repo
        .load_manifest(&vol("v"), &snap("b"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            RepoError::Manifest {
                source: CoreError::SegmentInvalid { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);
    let report = fx
        .repo
        .verify(&VerifyOptions {
            read_data: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].snapshot, "v/b");
    assert!(matches!(
        report.problems[0].problem,
        ProblemKind::ManifestUnreadable { .. }
    ));
    // A missing shared segment breaks both snapshots, and restore refuses before writing.
    let cbt_core::manifest::MapLocation::Tree { root: Some(a_root) } = a.map else {
        panic!("a has a tree")
    };
    let shape = cbt_core::maptree::TreeShape::new(a.geometry);
    let cbt_core::maptree::Segment::Node(children) = fx
        .repo
        .read_segment(&shape, shape.root_pos(), &a_root)
        .await
        .unwrap()
    else {
        panic!("a's root is a node")
    };
    fx.store
        .delete(&segment_key(&children[2].1.name))
        .await
        .unwrap();
    let target = fx.path("a.img");
    let err = restore_file(&fx.repo, &vol("v"), &snap("a"), &target)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
    assert!(!target.exists());
    // GC never guesses: an unreadable manifest stops it before it deletes anything.
    let before = segment_keys(fx.store.as_ref()).await.len();
    assert!(
        fx.repo
            .gc(&GcOptions {
                now: Timestamp::from_system_time(std::time::SystemTime::now()),
                dry_run: false,
                grace: Duration::ZERO,
            })
            .await
            .is_err()
    );
    assert_eq!(segment_keys(fx.store.as_ref()).await.len(), before);
}

/// In an encrypted repository segments are sealed and named by a keyed hash: the store sees
/// neither the map's plain bytes nor names it could recompute, and a lean incremental works
/// the same way.
#[tokio::test]
async fn encrypted_segments_are_sealed_and_keyed() {
    use cbt_store::crypto::{KdfParams, Password};
    let fx = Fixture::new().await;
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn ObjectStore> =
        std::sync::Arc::new(cbt_store::store::LocalStore::new(dir.path()).unwrap());
    let repo = cbt_store::repo::Repository::init_encrypted(
        store.clone(),
        cbt_store::repo::InitOptions {
            chunk_size: Some(CS),
            now: Timestamp::from_unix_secs(1),
        },
        &Password::new("segment secrets").unwrap(),
        KdfParams {
            memory_kib: 256,
            iterations: 1,
            parallelism: 1,
        },
    )
    .await
    .unwrap();
    let img = image(SIZE, 22);
    let path = fx.write("e.img", &img);
    let a = backup_file(&repo, &path, request("v", "a", full(), 10))
        .await
        .unwrap();
    let mut next = img.clone();
    next[SIZE - 50..SIZE - 40].copy_from_slice(b"0123456789");
    std::fs::write(&path, &next).unwrap();
    let mode = BackupMode::IncrementalOf {
        parent: Box::new(a.head.clone()),
        changed: cbt_core::RangeSet::try_from_extents([((SIZE - 50) as u64, 10)]).unwrap(),
    };
    let b = backup_file(&repo, &path, request("v", "b", mode, 20))
        .await
        .unwrap();
    assert_eq!(b.metadata.written.segments, 2);
    for key in segment_keys(store.as_ref()).await {
        let body = store.get(&key).await.unwrap();
        assert!(
            !body.windows(4).any(|w| w == b"CBTS"),
            "{key} is not sealed"
        );
        let name = key.rsplit('/').next().unwrap();
        assert_ne!(name, cbt_store::chunk::hash_raw(&body).to_hex());
    }
    let target = fx.path("e-restored.img");
    restore_file(&repo, &vol("v"), &snap("b"), &target)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), next);
}
