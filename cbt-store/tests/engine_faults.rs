//! Crash/resume and retry behaviour of backups, with counted store calls.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;
use std::time::Duration;

use cbt_store::engine::{self, EngineOptions, FileSource};
use cbt_store::repo::{GcOptions, RepoError, Repository};
use cbt_store::store::fault::{Fault, FaultRule, FaultyStore, When};
use cbt_store::store::{ErrorKind, ObjectStore, Op, RetryPolicy, RetryingStore, list_all};
use engine_support::*;

const SIZE: usize = 40 * CS as usize + 777;

fn serial_opts() -> EngineOptions {
    // One upload in flight: the fault hits a well-defined call and nothing else is in flight.
    EngineOptions {
        transfers: 1,
        ..opts()
    }
}

async fn chunk_count(store: &dyn ObjectStore) -> usize {
    list_all(store, "chunks/").await.unwrap().len()
}

#[tokio::test]
async fn killed_backup_leaves_nothing_visible_and_resumes_without_reupload() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 4);
    let src = fx.write("d.img", &img);
    let (faulty, repo) = fx.through_faults().await;
    let source = Arc::new(FileSource::open(&src).unwrap());

    // The store "dies" after 5 chunk uploads.
    faulty.add_rule(
        FaultRule::new(Op::Put, When::After(5), Fault::Permanent).on_keys_containing("chunks/"),
    );
    let err = engine::backup(
        &repo,
        source.clone(),
        request("v", "s", full(), 1),
        &serial_opts(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::Store { .. }), "{err:?}");
    assert!(
        repo.list_snapshots(None).await.unwrap().is_empty(),
        "no partial snapshot"
    );
    assert!(
        repo.list_locks().await.unwrap().is_empty(),
        "lock released on failure"
    );
    assert_eq!(chunk_count(fx.store.as_ref()).await, 5);

    // Resume: same request, healthy store. The 5 landed chunks are not uploaded again.
    faulty.clear_rules();
    faulty.reset_counts();
    let out = engine::backup(
        &repo,
        source.clone(),
        request("v", "s", full(), 1),
        &serial_opts(),
    )
    .await
    .unwrap();
    let stored = repo
        .load_manifest(&out.head.volume, &out.head.snapshot)
        .await
        .unwrap();
    let unique = stored.chunks.unique_chunks().len() as u64;
    assert_eq!(out.stats.objects_written + 5, unique);
    // Every put of the resumed run: the uploaded chunks, the lock, the manifest's one map
    // segment and its head.
    assert_eq!(faulty.calls(Op::Put), out.stats.objects_written + 3);
    assert_eq!(chunk_count(fx.store.as_ref()).await as u64, unique);

    let target = fx.path("r.img");
    restore_file(&repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap();
    assert!(std::fs::read(&target).unwrap() == img);
}

#[tokio::test]
async fn lost_manifest_write_and_lost_answers_resume_cleanly() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 6);
    let src = fx.write("d.img", &img);
    let (faulty, repo) = fx.through_faults().await;
    let source = Arc::new(FileSource::open(&src).unwrap());

    // Crash exactly at the commit point: every chunk landed, the manifest did not.
    faulty.add_rule(
        FaultRule::new(Op::Put, When::After(0), Fault::Permanent).on_keys_containing("snapshots/"),
    );
    engine::backup(&repo, source.clone(), request("v", "s", full(), 1), &opts())
        .await
        .unwrap_err();
    assert!(!repo.snapshot_exists(&vol("v"), &snap("s")).await.unwrap());
    let landed = chunk_count(fx.store.as_ref()).await;
    assert!(landed > 0);

    // A chunk upload whose answer is lost (it landed): the run fails, the re-run dedups it.
    faulty.clear_rules();
    faulty.add_rule(
        FaultRule::new(Op::Put, When::Nth(1), Fault::TransientAfterCall)
            .on_keys_containing("snapshots/"),
    );
    let err = engine::backup(&repo, source.clone(), request("v", "s", full(), 1), &opts())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    // The manifest did land: the snapshot exists and is complete.
    faulty.clear_rules();
    faulty.reset_counts();
    let err = engine::backup(&repo, source, request("v", "s", full(), 1), &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::SnapshotExists { .. }));
    // The name is checked while the lock is taken (one round trip for both): the lock is the
    // only write, it is gone again, and no chunk was even asked for.
    assert_eq!(
        faulty.calls(Op::Put),
        1,
        "an existing snapshot is refused before any upload"
    );
    assert_eq!(
        faulty.calls(Op::Head),
        1,
        "only the snapshot's name is looked up"
    );
    assert!(repo.list_locks().await.unwrap().is_empty());
    let target = fx.path("r.img");
    restore_file(&repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap();
    assert!(std::fs::read(&target).unwrap() == img);
}

#[tokio::test]
async fn transient_store_errors_are_retried_by_the_retrying_store() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 8);
    let src = fx.write("d.img", &img);
    let faulty = Arc::new(FaultyStore::over(fx.store.clone()));
    // Every third chunk upload and every fifth chunk download fails once.
    faulty.add_rule(
        FaultRule::new(Op::Put, When::Nth(3), Fault::Transient).on_keys_containing("chunks/"),
    );
    faulty.add_rule(
        FaultRule::new(Op::Get, When::Nth(5), Fault::Transient).on_keys_containing("chunks/"),
    );
    // The manifest write lands but its answer is lost; the retry sees "already exists" and
    // must recognise its own manifest instead of reporting a conflict.
    faulty.add_rule(
        FaultRule::new(Op::Put, When::Nth(1), Fault::TransientAfterCall)
            .on_keys_containing("snapshots/"),
    );
    // Same for the exclusive lock of a GC.
    faulty.add_rule(
        FaultRule::new(Op::Put, When::Nth(1), Fault::TransientAfterCall)
            .on_keys_containing("locks/exclusive"),
    );
    let policy = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    let store: Arc<dyn ObjectStore> = Arc::new(RetryingStore::new(faulty.clone(), policy));
    let repo = Repository::open(store).await.unwrap();
    engine::backup(
        &repo,
        Arc::new(FileSource::open(&src).unwrap()),
        request("v", "s", full(), 1),
        &opts(),
    )
    .await
    .unwrap();
    let target = fx.path("r.img");
    restore_file(&repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap();
    assert!(std::fs::read(&target).unwrap() == img);
    let gc = repo
        .gc(&GcOptions {
            now: cbt_core::Timestamp(5),
            dry_run: false,
            grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(gc.deleted_chunks, 0);
    assert!(faulty.injected() >= 4, "faults were injected");
}

#[tokio::test]
async fn concurrent_backups_share_the_repository_and_same_name_races_have_one_winner() {
    let fx = Fixture::new().await;
    let a = fx.write("a.img", &image(SIZE, 51));
    let b = fx.write("b.img", &image(SIZE, 52));
    let (ra, rb, rc) = tokio::join!(
        backup_file(&fx.repo, &a, request("va", "s", full(), 1)),
        backup_file(&fx.repo, &b, request("vb", "s", full(), 1)),
        backup_file(&fx.repo, &b, request("vb", "s", full(), 1)),
    );
    ra.unwrap();
    // Of the two writers of vb/s exactly one commits; the other is told it exists.
    let outcomes = [rb, rc];
    assert_eq!(outcomes.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        outcomes
            .iter()
            .any(|r| matches!(r, Err(RepoError::SnapshotExists { .. })))
    );
    assert_eq!(fx.repo.list_snapshots(None).await.unwrap().len(), 2);
    assert!(fx.repo.list_locks().await.unwrap().is_empty());
    let report = fx
        .repo
        .verify(&cbt_store::repo::VerifyOptions {
            read_data: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[tokio::test]
async fn a_lost_lock_write_does_not_leave_a_stale_lock() {
    let fx = Fixture::new().await;
    let src = fx.write("d.img", &image(4 * CS as usize, 3));
    let (faulty, repo) = fx.through_faults().await;
    for key in ["locks/shared/", "locks/exclusive"] {
        faulty.clear_rules();
        faulty.add_rule(
            FaultRule::new(Op::Put, When::Nth(1), Fault::TransientAfterCall)
                .on_keys_containing(key),
        );
        if key.contains("shared") {
            backup_file(&repo, &src, request("v", "s", full(), 1))
                .await
                .unwrap_err();
        } else {
            repo.gc(&GcOptions {
                now: cbt_core::Timestamp(1),
                dry_run: false,
                grace: std::time::Duration::ZERO,
            })
            .await
            .unwrap_err();
        }
        assert!(repo.list_locks().await.unwrap().is_empty(), "{key}");
    }
    faulty.clear_rules();
    backup_file(&repo, &src, request("v", "s", full(), 1))
        .await
        .unwrap();
    repo.gc(&GcOptions {
        now: cbt_core::Timestamp(2),
        dry_run: false,
        grace: std::time::Duration::ZERO,
    })
    .await
    .unwrap();
}
