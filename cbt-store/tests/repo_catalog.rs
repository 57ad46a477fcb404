//! Listing, showing, deleting and status figures of a repository with several volumes.
#![allow(clippy::unwrap_used)]

mod engine_support;

use cbt_core::Timestamp;
use cbt_core::gc::RetentionPolicy;
use cbt_store::engine::BackupMode;
use cbt_store::repo::{GcOptions, PruneOptions, RepoError, VerifyOptions};
use engine_support::*;

#[tokio::test]
async fn list_show_delete_latest_status_and_dry_run_prune() {
    let fx = Fixture::new().await;
    let a = image(10 * CS as usize, 31);
    let b = image(6 * CS as usize + 5, 32);
    let pa = fx.write("a.img", &a);
    let pb = fx.write("b.img", &b);
    let mut req = request("vol-a", "mon", full(), 100);
    req.labels.insert("team".into(), "db".into());
    req.source_info.csi_snapshot_id = Some("snap-handle-1".into());
    let a1 = backup_file(&fx.repo, &pa, req).await.unwrap();
    let mode = BackupMode::Incremental {
        parent: Box::new(a1.manifest.as_ref().unwrap().clone()),
        changed: cbt_core::RangeSet::new(),
    };
    let a2 = backup_file(&fx.repo, &pa, request("vol-a", "tue", mode, 200))
        .await
        .unwrap();
    assert_eq!(a2.stats.chunks_read, 0, "nothing changed, nothing read");
    assert_eq!(
        a2.manifest.as_ref().unwrap().chunks,
        a1.manifest.as_ref().unwrap().chunks
    );
    backup_file(&fx.repo, &pb, request("vol-b", "mon", full(), 150))
        .await
        .unwrap();

    assert_eq!(
        fx.repo
            .list_volumes()
            .await
            .unwrap()
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>(),
        vec!["vol-a", "vol-b"]
    );
    let all = fx.repo.list_snapshots(None).await.unwrap();
    let names: Vec<String> = all
        .iter()
        .map(|s| format!("{}/{}", s.volume, s.snapshot))
        .collect();
    assert_eq!(names, vec!["vol-a/mon", "vol-a/tue", "vol-b/mon"]);
    assert_eq!(all[0].labels["team"], "db");
    assert_eq!(
        all[0].source.csi_snapshot_id.as_deref(),
        Some("snap-handle-1")
    );
    assert_eq!(
        all[1].parent.as_ref().unwrap().snapshot_id,
        a1.manifest.as_ref().unwrap().snapshot_id
    );
    assert_eq!(
        fx.repo
            .list_snapshots(Some(&vol("vol-b")))
            .await
            .unwrap()
            .len(),
        1
    );
    let latest = fx
        .repo
        .latest_snapshot(&vol("vol-a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.snapshot.as_str(), "tue");
    assert!(
        fx.repo
            .latest_snapshot(&vol("vol-c"))
            .await
            .unwrap()
            .is_none()
    );
    let found = fx
        .repo
        .find_by_csi_snapshot_id(&vol("vol-a"), "snap-handle-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.snapshot.as_str(), "mon");
    let none = fx
        .repo
        .find_by_csi_snapshot_id(&vol("vol-a"), "other")
        .await;
    assert!(none.unwrap().is_none());
    let shown = fx
        .repo
        .load_manifest(&vol("vol-a"), &snap("mon"))
        .await
        .unwrap();
    assert_eq!(shown, a1.manifest.unwrap());

    let st = fx.repo.status().await.unwrap();
    assert_eq!(st.snapshots.len(), 3);
    assert_eq!(st.unreferenced_chunks, 0);
    let logical: u64 = st.snapshots.iter().map(|s| s.summary.allocated_bytes).sum();
    assert_eq!(st.logical_bytes, logical);
    assert!(
        st.dedup_ratio > 1.5,
        "vol-a's two snapshots share everything: {}",
        st.dedup_ratio
    );
    let b_status = st
        .snapshots
        .iter()
        .find(|s| s.summary.volume.as_str() == "vol-b")
        .unwrap();
    // vol-b's random chunks are its own; its text chunks equal vol-a's and are shared.
    assert!(b_status.exclusive_stored_bytes > 0);
    assert!(b_status.exclusive_stored_bytes < b_status.summary.referenced_stored_bytes);

    // Dry-run prune: reports, deletes nothing.
    let policy = RetentionPolicy {
        keep_last: Some(1),
        keep_within: None,
    };
    let dry = fx
        .repo
        .prune(&PruneOptions {
            policy,
            now: Timestamp::from_unix_secs(300),
            volume: None,
            dry_run: true,
            gc_grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(dry.removed, vec!["vol-a/mon".to_string()]);
    assert_eq!(
        dry.gc.deleted_chunks, 0,
        "tue references all of mon's chunks"
    );
    assert_eq!(fx.repo.list_snapshots(None).await.unwrap().len(), 3);

    // Deleting the parent never breaks the child: manifests are self-contained.
    fx.repo
        .delete_snapshot(&vol("vol-a"), &snap("mon"))
        .await
        .unwrap();
    let err = fx
        .repo
        .delete_snapshot(&vol("vol-a"), &snap("mon"))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::SnapshotNotFound { .. }));
    fx.repo
        .gc(&GcOptions {
            now: Timestamp::from_unix_secs(301),
            dry_run: false,
            grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap();
    let out = fx.path("tue.img");
    restore_file(&fx.repo, &vol("vol-a"), &snap("tue"), &out)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == a);

    // Verify one snapshot; a snapshot without its volume is a usage error.
    let one = VerifyOptions {
        volume: Some(vol("vol-b")),
        snapshot: Some(snap("mon")),
        read_data: true,
        concurrency: 2,
    };
    let r = fx.repo.verify(&one).await.unwrap();
    assert_eq!(r.snapshots, 1);
    assert!(r.is_ok() && r.chunks_read > 0);
    let bad = VerifyOptions {
        snapshot: Some(snap("mon")),
        ..Default::default()
    };
    assert!(matches!(
        fx.repo.verify(&bad).await.unwrap_err(),
        RepoError::InvalidRequest { .. }
    ));
}
