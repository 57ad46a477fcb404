//! The engine against a real S3 HTTP server (s3s-fs on loopback, started by the test).
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;

use cbt_core::Timestamp;
use cbt_core::gc::RetentionPolicy;
use cbt_store::engine::BackupMode;
use cbt_store::repo::{PruneOptions, RepoError, Repository, VerifyOptions};
use cbt_store::store::ObjectStore;
use cbt_store::testing::S3TestServer;
use engine_support::*;

#[tokio::test]
async fn backup_incremental_restore_verify_prune_over_s3() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("backups").unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(server.store("backups", "team/repo").await.unwrap());
    let repo = init(store.clone()).await;
    let fx = Fixture::new().await; // only for its temp dir

    let size = 24 * CS as usize + 4321;
    let mut img = image(size, 21);
    let v1 = img.clone();
    let src = fx.write("d.img", &img);
    let first = backup_file(&repo, &src, request("pvc", "one", full(), 1))
        .await
        .unwrap();
    assert!(first.stats.objects_written > 0);

    let changed = mutate(&mut img, 3, 5000, 2);
    std::fs::write(&src, &img).unwrap();
    let mode = BackupMode::Incremental {
        parent: Box::new(first.manifest.as_ref().unwrap().clone()),
        changed,
    };
    let second = backup_file(&repo, &src, request("pvc", "two", mode, 2))
        .await
        .unwrap();
    assert!(second.stats.chunks_read <= 6);

    // A second handle sees the same repository (nothing is cached client-side).
    let reopened = Repository::open(store.clone()).await.unwrap();
    assert_eq!(reopened.config().id, repo.config().id);
    for (name, expected) in [("one", &v1), ("two", &img)] {
        let out = fx.path(name);
        restore_file(&reopened, &vol("pvc"), &snap(name), &out)
            .await
            .unwrap();
        assert!(std::fs::read(&out).unwrap() == *expected, "{name} differs");
    }
    let report = repo
        .verify(&VerifyOptions {
            read_data: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);

    let pruned = repo
        .prune(&PruneOptions {
            policy: RetentionPolicy {
                keep_last: Some(1),
                keep_within: None,
            },
            now: Timestamp::from_unix_secs(10),
            volume: Some(vol("pvc")),
            dry_run: false,
            gc_grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(pruned.removed, vec!["pvc/one".to_string()]);
    let out = fx.path("two-after-prune");
    restore_file(&repo, &vol("pvc"), &snap("two"), &out)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == img);

    // Damage one chunk on the server's disk: restore names it.
    let (index, r) = nth_stored(&second, 0);
    let path = server.object_path(
        "backups",
        &format!("team/repo/{}", cbt_store::chunk::chunk_key(&r.hash)),
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let err = restore_file(&repo, &vol("pvc"), &snap("two"), &fx.path("bad"))
        .await
        .unwrap_err();
    match err {
        RepoError::ChunkCorrupt { index: i, .. } => assert_eq!(i, index),
        other => panic!("unexpected {other:?}"),
    }
}

/// Every stored chunk of a full backup, through the local store and over S3, is byte for byte
/// the object the copying encoder (`chunk::encode`) makes of the same bytes, whether it was
/// stored raw (framed where it was read) or compressed, including the volume's short last
/// chunk; and both restore the image exactly. Chunks of 512 KiB take the local store's
/// direct-I/O path.
#[tokio::test]
async fn stored_chunks_are_the_copying_encoders_objects_in_both_stores() {
    const BIG: u64 = 512 * 1024;
    let cs = BIG as usize;
    let mut img = Vec::with_capacity(7 * cs + 12_345);
    for i in 0..7u64 {
        match i % 3 {
            0 => img.extend(noise(100 + i, cs)),
            1 => img.extend(b"in place, not copied ".repeat(cs / 21 + 1)[..cs].iter()),
            _ => img.extend(std::iter::repeat_n(0u8, cs)),
        }
    }
    img.extend(noise(200, 12_345)); // a short last chunk, not a multiple of 4 KiB
    let fx = Fixture::new().await;
    let src = fx.write("mixed.img", &img);

    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("in-place").unwrap();
    let s3: Arc<dyn ObjectStore> = Arc::new(server.store("in-place", "r").await.unwrap());
    let local: Arc<dyn ObjectStore> =
        Arc::new(cbt_store::store::LocalStore::new(fx.path("local-repo")).unwrap());
    for (name, store) in [("local", local), ("s3", s3)] {
        let repo = init_sized(store.clone(), BIG).await;
        let out = backup_file(&repo, &src, request("pvc", "one", full(), 1))
            .await
            .unwrap();
        let map = &out.manifest.as_ref().unwrap().chunks;
        let (stored, raw_codec) =
            assert_stored_as_encoded(store.as_ref(), map, &img, BIG, name).await;
        // Chunks 0, 3, 6 and the short tail are random (stored raw); 1 and 4 compress.
        assert_eq!((raw_codec, stored), (4, 6), "{name}");
        let target = fx.path(&format!("{name}-restored.img"));
        restore_file(&repo, &vol("pvc"), &snap("one"), &target)
            .await
            .unwrap();
        assert!(
            std::fs::read(&target).unwrap() == img,
            "{name}: restore differs"
        );
    }
}

/// The raw-buffer limit holds over S3 too: the client lets go of an upload's body (a pooled
/// read buffer) when the put returns, so the next read reuses it instead of allocating.
#[tokio::test]
async fn raw_buffers_are_bounded_over_s3() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("buffers").unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(server.store("buffers", "r").await.unwrap());
    let repo = init(store).await;
    let fx = Fixture::new().await; // only for its temp dir
    raw_buffers_are_bounded(&fx, &repo).await;
}
