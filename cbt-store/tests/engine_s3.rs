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
