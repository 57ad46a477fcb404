//! Lineage of full backups and the parent checks that keep an incremental from referencing
//! chunks that garbage collection removed.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;

use cbt_core::manifest::ParentRef;
use cbt_core::{ChunkState, Timestamp};
use cbt_store::engine::{self, BackupMode, FileSource};
use cbt_store::repo::{GcOptions, RepoError};
use cbt_store::store::Op;
use engine_support::*;

const SIZE: usize = 24 * CS as usize + 1234;

#[tokio::test]
async fn full_backup_records_its_parent_and_reuses_its_chunks_without_checks() {
    let fx = Fixture::new().await;
    let mut img = image(SIZE, 11);
    let path = fx.write("d.img", &img);
    let first = full_backup(&fx.repo, &path, "v", "a", 10).await;
    mutate(&mut img, 3, 5000, 2);
    std::fs::write(&path, &img).unwrap();

    let (faulty, repo) = fx.through_faults().await;
    let parent = ParentRef {
        snapshot: snap("a"),
        snapshot_id: first.manifest.as_ref().unwrap().snapshot_id.clone(),
    };
    let mode = BackupMode::FullWithParent {
        allocated: None,
        parent: parent.clone(),
    };
    faulty.reset_counts();
    let out = backup_file(&repo, &path, request("v", "b", mode, 20))
        .await
        .unwrap();
    assert_eq!(out.manifest.as_ref().unwrap().parent, Some(parent.clone()));
    assert_eq!(
        repo.load_manifest(&vol("v"), &snap("b"))
            .await
            .unwrap()
            .parent,
        Some(parent)
    );
    // Only the 3 mutated chunks are new: they alone are uploaded.
    assert_eq!(out.stats.objects_written, 3);
    // Puts: the lock, 3 chunks, the manifest's one map segment and its head. Heads: the name
    // check and, before the commit, the parent's manifest; the unchanged chunks are vouched
    // for by the parent, whose existence is checked once instead of each of its chunks, and
    // the changed ones (not the parent's at their place) are created without asking first.
    assert_eq!(faulty.calls(Op::Put), 6, "{:?}", faulty.call_counts());
    assert!(out.manifest.as_ref().unwrap().chunks.stored_count() > 10);
    assert_eq!(faulty.calls(Op::Head), 2, "{:?}", faulty.call_counts());
    assert_eq!(out.stats.bytes_changed, 3 * CS);
    assert!(
        out.stats.bytes_read > 3 * CS,
        "a full backup reads everything"
    );

    let target = fx.path("b.img");
    restore_file(&repo, &vol("v"), &snap("b"), &target)
        .await
        .unwrap();
    assert!(std::fs::read(&target).unwrap() == img);
}

#[tokio::test]
async fn full_with_a_wrong_or_missing_parent_is_refused_before_anything_is_stored() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 12);
    let path = fx.write("d.img", &img);
    let first = full_backup(&fx.repo, &path, "v", "a", 10).await;
    let cases = [
        (
            "missing",
            snap("nope"),
            first.manifest.as_ref().unwrap().snapshot_id.clone(),
        ),
        ("other id", snap("a"), "not-the-id".to_string()),
        (
            "itself",
            snap("b"),
            first.manifest.as_ref().unwrap().snapshot_id.clone(),
        ),
    ];
    for (what, snapshot, snapshot_id) in cases {
        let mode = BackupMode::FullWithParent {
            allocated: None,
            parent: ParentRef {
                snapshot,
                snapshot_id,
            },
        };
        let err = backup_file(&fx.repo, &path, request("v", "b", mode, 20))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RepoError::InvalidRequest { .. }),
            "{what}: {err:?}"
        );
        assert!(
            !fx.repo
                .snapshot_exists(&vol("v"), &snap("b"))
                .await
                .unwrap()
        );
    }
}

/// The caller loads the parent, then (before the backup takes its lock) a prune deletes it
/// and GC removes the chunks only it referenced, and a new snapshot takes its name. The
/// incremental must refuse: committing it would reference chunks that are gone.
#[tokio::test]
async fn incremental_refuses_a_parent_replaced_while_it_was_not_locked() {
    let fx = Fixture::new().await;
    let mut img = image(SIZE, 13);
    let path = fx.write("d.img", &img);
    let a = full_backup(&fx.repo, &path, "v", "a", 10).await;
    let loaded = fx.repo.load_manifest(&vol("v"), &snap("a")).await.unwrap();
    assert_eq!(loaded, a.manifest.unwrap());

    // Meanwhile: "a" is deleted and collected, and a different image is backed up as "a".
    fx.repo
        .delete_snapshot(&vol("v"), &snap("a"))
        .await
        .unwrap();
    let other = fx.write("other.img", &image(SIZE, 99));
    full_backup(&fx.repo, &other, "v", "a", 15).await;
    let gc = collect(&fx.repo, Timestamp(16)).await;
    assert!(gc.deleted_chunks > 0, "the old parent's chunks are gone");

    let changed = mutate(&mut img, 2, 3000, 5);
    std::fs::write(&path, &img).unwrap();
    let mode = BackupMode::Incremental {
        parent: Box::new(loaded.clone()),
        changed: changed.clone(),
    };
    let err = backup_file(&fx.repo, &path, request("v", "b", mode, 20))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest { .. }), "{err:?}");
    assert!(
        !fx.repo
            .snapshot_exists(&vol("v"), &snap("b"))
            .await
            .unwrap()
    );

    // Deleted outright (pruned) before the lock: refused the same way.
    let prune = prune_to_newest(&fx.repo, 100).await;
    assert!(prune.removed.is_empty());
    fx.repo
        .delete_snapshot(&vol("v"), &snap("a"))
        .await
        .unwrap();
    let mode = BackupMode::Incremental {
        parent: Box::new(loaded),
        changed,
    };
    let err = backup_file(&fx.repo, &path, request("v", "b", mode, 20))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest { .. }), "{err:?}");
    assert!(fx.repo.list_snapshots(None).await.unwrap().is_empty());
}

/// [`BackupMode::IncrementalOf`] is handed the parent's head and does not read it again
/// before the commit: whatever happened to the parent since the caller read it (deleted,
/// replaced under its name, collected) is caught, and nothing is committed or left locked.
#[tokio::test]
async fn incremental_of_a_given_head_refuses_a_parent_that_no_longer_stands() {
    let fx = Fixture::new().await;
    let mut img = image(SIZE, 21);
    let path = fx.write("d.img", &img);
    let a = full_backup(&fx.repo, &path, "v", "a", 10).await;
    let head_a = a.head.clone();
    let changed = mutate(&mut img, 2, 3000, 6);
    std::fs::write(&path, &img).unwrap();
    let incremental = |parent: &cbt_core::manifest::ManifestHead| BackupMode::IncrementalOf {
        parent: Box::new(parent.clone()),
        changed: changed.clone(),
    };
    let refused = |mode: BackupMode| {
        let (repo, path) = (fx.repo.clone(), path.clone());
        async move {
            let err = backup_file(&repo, &path, request("v", "b", mode, 20))
                .await
                .unwrap_err();
            assert!(matches!(err, RepoError::InvalidRequest { .. }), "{err:?}");
            assert!(!repo.snapshot_exists(&vol("v"), &snap("b")).await.unwrap());
            assert!(repo.list_locks().await.unwrap().is_empty());
        }
    };

    // Deleted (not yet collected): its segments are still there; the commit finds it gone.
    fx.repo
        .delete_snapshot(&vol("v"), &snap("a"))
        .await
        .unwrap();
    refused(incremental(&head_a)).await;

    // Replaced under its name: the commit finds another id.
    let other = fx.write("other.img", &image(SIZE, 98));
    full_backup(&fx.repo, &other, "v", "a", 15).await;
    refused(incremental(&head_a)).await;

    // ... and collected: its map segments are gone before the lock is even taken, which is
    // reported as the parent replaced, not as damage.
    let gc = collect(&fx.repo, Timestamp(16)).await;
    assert!(gc.deleted_chunks > 0, "the old parent's chunks are gone");
    refused(incremental(&head_a)).await;

    // A head that is not the stored one: the right id, but another snapshot's map.
    let head_new = fx.repo.load_head(&vol("v"), &snap("a")).await.unwrap();
    let c = full_backup(&fx.repo, &path, "v", "c", 17).await;
    let forged = cbt_core::manifest::ManifestHead {
        map: c.head.map,
        ..head_new.clone()
    };
    assert_ne!(forged.map, head_new.map);
    refused(incremental(&forged)).await;

    // A head of another volume is refused before anything is written.
    let wrong_volume = cbt_core::manifest::ManifestHead {
        volume: vol("w"),
        ..head_new.clone()
    };
    refused(incremental(&wrong_volume)).await;

    // The head as stored now: committed, with that parent.
    let b = backup_file(
        &fx.repo,
        &path,
        request("v", "b", incremental(&head_new), 20),
    )
    .await
    .unwrap();
    assert_eq!(b.head.parent, Some(head_new.as_parent()));
    assert!(fx.repo.list_locks().await.unwrap().is_empty());
}

/// A parent whose map was edited by the caller (not what the repository holds) is refused:
/// the child would otherwise reference chunks nobody checked.
#[tokio::test]
async fn incremental_refuses_a_parent_that_differs_from_the_stored_one() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 14);
    let path = fx.write("d.img", &img);
    let a = full_backup(&fx.repo, &path, "v", "a", 10).await;
    let mut forged = a.manifest.as_ref().unwrap().clone();
    let (index, r) = forged
        .chunks
        .iter_stored()
        .map(|(i, r)| (i, *r))
        .next()
        .unwrap();
    let mut fake = r;
    fake.hash = cbt_core::ChunkHash([0x5a; 32]);
    forged.chunks.set(index, ChunkState::Stored(fake)).unwrap();
    let mode = BackupMode::Incremental {
        parent: Box::new(forged),
        changed: cbt_core::RangeSet::new(),
    };
    let src = Arc::new(FileSource::open(&path).unwrap());
    let err = engine::backup(&fx.repo, src, request("v", "b", mode, 20), &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest { .. }), "{err:?}");
}

/// A source that fails at one offset with a chosen error kind.
struct Failing {
    size: u64,
    at: u64,
    kind: std::io::ErrorKind,
}

impl cbt_store::engine::BlockSource for Failing {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset == self.at {
            return Err(std::io::Error::new(self.kind, "injected"));
        }
        buf.fill(7);
        Ok(())
    }
    fn describe(&self) -> String {
        "failing-source".into()
    }
}

#[tokio::test]
async fn source_errors_carry_offset_and_a_class_that_says_whether_to_retry() {
    use cbt_store::store::ErrorKind;
    let fx = Fixture::new().await;
    for (kind, class) in [
        (std::io::ErrorKind::UnexpectedEof, ErrorKind::Usage),
        (std::io::ErrorKind::PermissionDenied, ErrorKind::Usage),
        (std::io::ErrorKind::Other, ErrorKind::Transient),
    ] {
        let src = Arc::new(Failing {
            size: 8 * CS,
            at: 5 * CS,
            kind,
        });
        let err = engine::backup(&fx.repo, src, request("v", "s", full(), 1), &opts())
            .await
            .unwrap_err();
        match &err {
            RepoError::SourceIo { offset, len, .. } => assert_eq!((*offset, *len), (5 * CS, CS)),
            other => panic!("{kind:?}: {other:?}"),
        }
        assert_eq!(err.kind(), class, "{kind:?}");
        assert!(fx.repo.list_snapshots(None).await.unwrap().is_empty());
    }
}

/// Incrementals across a volume resize: the grown area and the chunks whose length changed at
/// the old or new end are re-read even though CBT reports no change there; the restored
/// images are exact.
#[tokio::test]
async fn incrementals_across_grow_and_shrink_restore_exactly() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 15);
    let path = fx.write("d.img", &img);
    let base = full_backup(&fx.repo, &path, "v", "a", 10).await;

    // Grow by 3 chunks and a bit (the new area holds data, the old tail is untouched), then
    // shrink to 10 chunks and 5 bytes. Growing turns 25 chunks into 28: the old short last
    // chunk (24) is re-read with the new 25..28; shrinking re-reads only the new short last
    // chunk.
    let mut grown = img.clone();
    grown.extend_from_slice(&noise(3, 3 * CS as usize + 100));
    let shrunk = grown[..10 * CS as usize + 5].to_vec();
    let mut parent = base;
    for (name, t, resized, chunks, reread) in [("b", 20, &grown, 28, 4), ("c", 30, &shrunk, 11, 1)]
    {
        std::fs::write(&path, resized).unwrap();
        let mode = incremental(&parent, cbt_core::RangeSet::new());
        let out = backup_file(&fx.repo, &path, request("v", name, mode, t))
            .await
            .unwrap();
        let map = out.manifest.as_ref().unwrap();
        assert_eq!(map.chunks.geometry().chunk_count(), chunks, "{name}");
        assert_eq!(map.volume_size(), resized.len() as u64, "{name}");
        assert_eq!(out.stats.chunks_read, reread, "{name}");
        assert!(fx.restored("v", name).await == *resized, "{name}");
        parent = out;
    }
    // The older snapshots are unaffected.
    assert!(fx.restored("v", "a").await == img);
}

/// A backup whose manifest landed reports success even if its lock cannot be removed (a
/// retry would only hit "snapshot exists"); the lock stays visible to GC, which names it.
#[tokio::test]
async fn a_committed_backup_succeeds_even_if_its_lock_cannot_be_released() {
    use cbt_store::store::fault::{Fault, FaultRule, When};
    let fx = Fixture::new().await;
    let path = fx.write("d.img", &image(SIZE, 16));
    let (faulty, repo) = fx.through_faults().await;
    faulty.add_rule(
        FaultRule::new(Op::Delete, When::FirstN(1), Fault::Permanent).on_keys_containing("locks/"),
    );
    let out = backup_file(&repo, &path, request("v", "s", full(), 1)).await;
    assert!(out.is_ok(), "{out:?}");
    assert!(repo.snapshot_exists(&vol("v"), &snap("s")).await.unwrap());
    let locks = repo.list_locks().await.unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].purpose, "backup v/s");
    let err = repo
        .gc(&GcOptions {
            now: Timestamp(5),
            dry_run: false,
            grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Locked { .. }), "{err:?}");
}

/// Restore takes a shared lock (one lock write, removed afterwards) so GC cannot start under
/// it, yet still restores next to a (possibly stale) exclusive lock.
#[tokio::test]
async fn restore_locks_when_it_can_and_still_restores_when_it_cannot() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 17);
    let path = fx.write("d.img", &img);
    full_backup(&fx.repo, &path, "v", "s", 1).await;
    let (faulty, repo) = fx.through_faults().await;
    faulty.reset_counts();
    let target = fx.path("r1.img");
    let run = |target: std::path::PathBuf| {
        let repo = repo.clone();
        async move {
            restore_file(&repo, &vol("v"), &snap("s"), &target)
                .await
                .unwrap();
            std::fs::read(&target).unwrap()
        }
    };
    assert!(run(target).await == img);
    assert_eq!(faulty.calls(Op::Put), 1, "{:?}", faulty.call_counts());
    assert_eq!(faulty.calls(Op::Delete), 1, "{:?}", faulty.call_counts());
    assert!(repo.list_locks().await.unwrap().is_empty());

    let excl = repo.lock_exclusive("prune", Timestamp(3)).await.unwrap();
    assert!(run(fx.path("r2.img")).await == img);
    let locks = repo.list_locks().await.unwrap();
    assert_eq!(locks.len(), 1, "only the exclusive lock: {locks:?}");
    excl.release().await.unwrap();
}

/// A lock's holder can be told dead when it ran on this host; locks of live processes and of
/// other hosts are never reported gone.
#[tokio::test]
async fn locks_of_dead_local_processes_are_recognised() {
    let fx = Fixture::new().await;
    let lock = fx
        .repo
        .lock_shared("backup v/x", Timestamp(1))
        .await
        .unwrap();
    let mine = lock.info().clone();
    if mine.holder_gone_here().is_none() {
        return; // no /proc: nothing to tell
    }
    assert_eq!(
        mine.holder_gone_here(),
        Some(false),
        "this process is alive"
    );
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let dead = cbt_store::repo::LockInfo {
        pid: dead_pid,
        ..mine.clone()
    };
    assert_eq!(dead.holder_gone_here(), Some(true));
    let elsewhere = cbt_store::repo::LockInfo {
        host: "some-other-host-name".into(),
        pid: dead_pid,
        ..mine
    };
    assert_eq!(elsewhere.holder_gone_here(), None);
    lock.release().await.unwrap();
}

/// `verify --read-data` names the snapshot and index where a damaged chunk is first used.
#[tokio::test]
async fn verify_read_data_names_the_snapshot_of_a_damaged_chunk() {
    use cbt_store::repo::ProblemKind;
    let fx = Fixture::new().await;
    let img = image(SIZE, 18);
    let path = fx.write("d.img", &img);
    let a = full_backup(&fx.repo, &path, "a-vol", "s1", 1).await;
    full_backup(&fx.repo, &path, "b-vol", "s2", 2).await;
    let (index, r) = nth_stored(&a, 2);
    let key = cbt_store::chunk::chunk_key(&r.hash);
    flip_stored_byte(&fx.local, &key, 70, 0x10);
    let report = verify_data(&fx.repo).await;
    assert_eq!(report.snapshots, 2);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(
        (p.snapshot.as_str(), p.index, p.key.as_str()),
        ("a-vol/s1", Some(index), key.as_str())
    );
    assert!(matches!(p.problem, ProblemKind::Corrupt { .. }));
    assert_eq!(
        report.chunks_read,
        a.manifest.as_ref().unwrap().chunks.unique_chunks().len() as u64
    );
}
