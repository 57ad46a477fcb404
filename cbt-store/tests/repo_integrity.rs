//! Broken-on-purpose repositories: corrupted, truncated, missing and future-format objects,
//! hostile names, and the lock protocol.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;

use bytes::Bytes;
use cbt_core::{ChunkState, CoreError, Manifest, Timestamp};
use cbt_store::chunk::{self, ChunkDecodeError};
use cbt_store::engine::{self, BackupOutcome, RestoreOptions};
use cbt_store::repo::{
    BreakMode, ChunkNovelty, GcOptions, HolderState, ProblemKind, RepoError, Repository,
    VerifyOptions, manifest_key,
};
use cbt_store::store::fault::{Fault, FaultRule, FaultyStore, When};
use cbt_store::store::{ErrorKind, ObjectStore, Op, StoreError};
use cbt_store::testing::hooked::{Call, HookedStore, StoreHook};
use engine_support::*;

const SIZE: usize = 16 * CS as usize;

async fn setup() -> (Fixture, BackupOutcome, Vec<u8>) {
    let fx = Fixture::new().await;
    let img = image(SIZE, 11);
    let src = fx.write("d.img", &img);
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    (fx, out, img)
}

/// First stored chunk of the manifest: (index, key).
fn first_chunk(out: &BackupOutcome) -> (u64, String) {
    let (i, r) = nth_stored(out, 0);
    (i, chunk::chunk_key(&r.hash))
}

async fn restore_err(fx: &Fixture, repo: &Repository) -> RepoError {
    let target = fx.path("restored.img");
    let err = restore_file(repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap_err();
    assert!(
        !target.exists(),
        "a failed restore removes the file it created"
    );
    err
}

async fn verify(repo: &Repository, read_data: bool) -> Vec<(Option<u64>, ProblemKind)> {
    repo.verify(&VerifyOptions {
        read_data,
        ..Default::default()
    })
    .await
    .unwrap()
    .problems
    .into_iter()
    .map(|p| (p.index, p.problem))
    .collect()
}

#[tokio::test]
async fn flipped_byte_on_disk_is_caught_by_restore_and_verify() {
    let (fx, out, _) = setup().await;
    let (index, key) = first_chunk(&out);
    let path = fx.local.path_of(&key).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[60] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    match restore_err(&fx, &fx.repo).await {
        e @ RepoError::ChunkCorrupt { .. } => {
            assert_eq!(e.kind(), ErrorKind::Integrity);
            let RepoError::ChunkCorrupt {
                index: i, key: k, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!((i, k), (index, key.clone()));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Replacing an existing file: a failed restore leaves the old file as it was.
    let old = fx.write("old.img", b"previous contents");
    let over = RestoreOptions {
        overwrite: true,
        ..Default::default()
    };
    let err = engine::restore(&fx.repo, &vol("v"), &snap("s"), &old, &over, &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::ChunkCorrupt { .. }));
    assert_eq!(std::fs::read(&old).unwrap(), b"previous contents");
    let leftovers: Vec<_> = std::fs::read_dir(fx.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("cbt-restore"))
        .collect();
    assert!(leftovers.is_empty(), "temporary restore file left behind");

    assert!(verify(&fx.repo, false).await.is_empty(), "sizes are intact");
    let problems = verify(&fx.repo, true).await;
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].0, Some(index));
    assert!(matches!(problems[0].1, ProblemKind::Corrupt { .. }));
}

#[tokio::test]
async fn damage_behind_the_store_checksum_is_caught_by_the_chunk_format() {
    let (fx, out, _) = setup().await;
    let (index, _) = first_chunk(&out);
    // The bytes come back damaged although the store believes them intact.
    let faulty = Arc::new(FaultyStore::over(fx.store.clone()));
    faulty.add_rule(
        FaultRule::new(Op::Get, When::Nth(1), Fault::FlipBit).on_keys_containing("chunks/"),
    );
    let repo = Repository::open(faulty.clone() as Arc<dyn ObjectStore>)
        .await
        .unwrap();
    let mut opts1 = opts();
    opts1.transfers = 1;
    let target = fx.path("x.img");
    let err = engine::restore(
        &repo,
        &vol("v"),
        &snap("s"),
        &target,
        &RestoreOptions::default(),
        &opts1,
    )
    .await
    .unwrap_err();
    match err {
        RepoError::ChunkCorrupt {
            index: i, reason, ..
        } => {
            assert_eq!(i, index);
            assert!(
                matches!(reason, ChunkDecodeError::ObjectCrc { .. }),
                "{reason:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // A truncated body fails the size check first.
    faulty.clear_rules();
    faulty.add_rule(
        FaultRule::new(Op::Get, When::After(0), Fault::Truncate(100)).on_keys_containing("chunks/"),
    );
    let problems = verify(&repo, true).await;
    assert_eq!(
        problems.len() as u64,
        out.manifest.as_ref().unwrap().chunks.unique_chunks().len() as u64
    );
    assert!(
        problems.iter().all(
            |(_, p)| matches!(p, ProblemKind::Corrupt { message } if message.contains("bytes"))
        )
    );
}

#[tokio::test]
async fn truncated_and_missing_objects() {
    let (fx, out, _) = setup().await;
    let mut stored = out.manifest.as_ref().unwrap().chunks.iter_stored();
    let (i1, r1) = stored.next().unwrap();
    let (i2, r2) = stored.next().unwrap();
    // Truncate one chunk file on disk and delete another.
    let p1 = fx.local.path_of(&chunk::chunk_key(&r1.hash)).unwrap();
    let len = std::fs::metadata(&p1).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p1)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    fx.store.delete(&chunk::chunk_key(&r2.hash)).await.unwrap();

    let problems = verify(&fx.repo, false).await;
    assert!(
        problems.contains(&(
            Some(i1),
            ProblemKind::SizeMismatch {
                expected: r1.stored_size,
                actual: r1.stored_size - 10
            }
        )),
        "{problems:?}"
    );
    assert!(
        problems.contains(&(Some(i2), ProblemKind::Missing)),
        "{problems:?}"
    );
    let err = restore_err(&fx, &fx.repo).await;
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
    assert!(matches!(
        err,
        RepoError::ChunkCorrupt { .. } | RepoError::ChunkMissing { .. }
    ));

    // Backing up the same data again repairs the damaged chunk and re-uploads the missing one.
    let src = fx.path("d.img");
    let again = full_backup(&fx.repo, &src, "v", "s2", 2).await;
    assert_eq!(again.stats.objects_written, 2, "{:?}", again.stats);
    assert!(verify(&fx.repo, true).await.is_empty());
}

#[tokio::test]
async fn future_formats_are_typed_errors_not_misreads() {
    let (fx, out, _) = setup().await;
    let key = manifest_key(&vol("v"), &snap("s"));

    // A manifest of format version 99.
    let mut json: serde_json::Value =
        serde_json::from_slice(&out.manifest.as_ref().unwrap().to_json().unwrap()).unwrap();
    json["format_version"] = 99.into();
    let mut body = b"CBMF\x01".to_vec();
    body.extend(zstd::bulk::compress(&serde_json::to_vec(&json).unwrap(), 1).unwrap());
    put_raw(fx.store.as_ref(), &key, Bytes::from(body)).await;
    let err = fx
        .repo
        .load_manifest(&vol("v"), &snap("s"))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        RepoError::Manifest {
            source: CoreError::UnsupportedManifestVersion { found: 99, .. },
            ..
        }
    ));
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let problems = verify(&fx.repo, false).await;
    assert!(matches!(
        problems[0].1,
        ProblemKind::ManifestUnreadable { .. }
    ));
    // GC must not guess what an unreadable manifest references.
    let err = fx
        .repo
        .gc(&GcOptions {
            now: Timestamp(0),
            dry_run: false,
            grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(fx.repo.list_locks().await.unwrap().is_empty());

    // An unknown manifest encoding.
    put_raw(fx.store.as_ref(), &key, Bytes::from_static(b"CBMF\x07junk")).await;
    let err = fx
        .repo
        .load_manifest(&vol("v"), &snap("s"))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::UnsupportedObject { .. }));

    // A chunk object of a future format version.
    put_raw(
        fx.store.as_ref(),
        &key,
        Bytes::from(fx_manifest_body(out.manifest.as_ref().unwrap())),
    )
    .await;
    let (_, ckey) = first_chunk(&out);
    let mut cbody = fx.store.get(&ckey).await.unwrap().to_vec();
    cbody[4] = 2;
    put_raw(fx.store.as_ref(), &ckey, Bytes::from(cbody)).await;
    let err = restore_err(&fx, &fx.repo).await;
    assert!(matches!(
        err,
        RepoError::ChunkCorrupt {
            reason: ChunkDecodeError::Version(2),
            ..
        }
    ));
    assert_eq!(err.kind(), ErrorKind::Unsupported);

    // A repository config of a future version.
    let cfg = fx.store.get("config").await.unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
    cfg["version"] = 3.into(); // 2 is the encrypted format
    put_raw(
        fx.store.as_ref(),
        "config",
        Bytes::from(serde_json::to_vec(&cfg).unwrap()),
    )
    .await;
    let err = Repository::open(fx.store.clone()).await.unwrap_err();
    assert!(matches!(
        err,
        RepoError::BadConfig {
            unsupported: true,
            ..
        }
    ));
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}

fn fx_manifest_body(m: &Manifest) -> Vec<u8> {
    let mut body = b"CBMF\x01".to_vec();
    body.extend(zstd::bulk::compress(&m.to_json().unwrap(), 1).unwrap());
    body
}

#[tokio::test]
async fn hostile_names_never_reach_keys() {
    let (fx, out, _) = setup().await;
    for bad in ["../../etc", "a/b", "..", "", "x\0y", "snap\n", "../config"] {
        assert!(cbt_core::VolumeName::new(bad).is_err(), "{bad:?}");
        assert!(cbt_core::SnapshotName::new(bad).is_err(), "{bad:?}");
    }
    // A manifest stored under another name than it describes is rejected, not trusted.
    let other = manifest_key(&vol("v"), &snap("renamed"));
    put_raw(
        fx.store.as_ref(),
        &other,
        Bytes::from(fx_manifest_body(out.manifest.as_ref().unwrap())),
    )
    .await;
    let err = fx
        .repo
        .load_manifest(&vol("v"), &snap("renamed"))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::ManifestFraming { .. }));
    fx.store.delete(&other).await.unwrap();
    // Foreign keys under snapshots/ that are not valid names are ignored by listings.
    put_raw(
        fx.store.as_ref(),
        "snapshots/v/bad name",
        Bytes::from_static(b"x"),
    )
    .await;
    put_raw(
        fx.store.as_ref(),
        "snapshots/v/-dash",
        Bytes::from_static(b"x"),
    )
    .await;
    let list = fx.repo.list_snapshots(None).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].snapshot.as_str(), "s");
    // Names in a manifest are validated on read.
    let mut json: serde_json::Value =
        serde_json::from_slice(&out.manifest.as_ref().unwrap().to_json().unwrap()).unwrap();
    json["volume"] = "../x".into();
    assert!(Manifest::from_json(&serde_json::to_vec(&json).unwrap()).is_err());
}

#[tokio::test]
async fn locks_keep_gc_and_backups_apart_until_broken() {
    let (fx, out, img) = setup().await;
    // A backup that crashed left its shared lock behind.
    let stale = fx
        .repo
        .lock_shared("backup v/crashed", Timestamp(5))
        .await
        .unwrap();
    let stale_id = stale.info().id.clone();
    std::mem::forget(stale);
    let err = fx
        .repo
        .gc(&GcOptions {
            now: Timestamp(6),
            dry_run: false,
            grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Locked { .. }));
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let locks = fx.repo.list_locks().await.unwrap();
    assert_eq!(
        locks.len(),
        1,
        "the failed GC removed its own exclusive lock"
    );
    assert_eq!(locks[0].purpose, "backup v/crashed");

    // Its holder (this very process) is alive: breaking needs force.
    let refused = fx
        .repo
        .break_lock(&stale_id, BreakMode::IfHolderGone)
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        RepoError::LockInUse {
            state: HolderState::AliveHere,
            ..
        }
    ));
    assert_eq!(refused.kind(), ErrorKind::Conflict);
    // Explicitly breaking it lets GC run.
    assert!(
        fx.repo
            .break_lock(&stale_id, BreakMode::Force)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        fx.repo
            .break_lock(&stale_id, BreakMode::Force)
            .await
            .unwrap()
            .is_none()
    );
    let gc = fx
        .repo
        .gc(&GcOptions {
            now: Timestamp(7),
            dry_run: false,
            grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(gc.deleted_chunks, 0);
    assert_eq!(
        gc.kept_chunks,
        out.manifest.as_ref().unwrap().chunks.unique_chunks().len() as u64
    );

    // While GC holds the exclusive lock, a backup is refused and leaves nothing behind.
    let excl = fx.repo.lock_exclusive("gc", Timestamp(8)).await.unwrap();
    let src = fx.write("d2.img", &img);
    let err = backup_file(&fx.repo, &src, request("v", "s2", full(), 9))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Locked { .. }));
    assert!(fx.repo.lock_exclusive("gc2", Timestamp(8)).await.is_err());
    excl.release().await.unwrap();
    assert!(fx.repo.list_locks().await.unwrap().is_empty());
    full_backup(&fx.repo, &src, "v", "s2", 9).await;

    // Orphans of a killed backup are collected; referenced chunks never are.
    let orphan = chunk::encode(&noise(77, 5000), 1);
    fx.repo.put_chunk(orphan.clone()).await.unwrap();
    let dry = fx
        .repo
        .gc(&GcOptions {
            now: Timestamp(10),
            dry_run: true,
            grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!((dry.deleted_chunks, dry.dry_run), (1, true));
    assert!(
        fx.store
            .head(&chunk::chunk_key(&orphan.chunk.hash))
            .await
            .unwrap()
            .is_some()
    );
    let real = fx
        .repo
        .gc(&GcOptions {
            now: Timestamp(10),
            dry_run: false,
            grace: std::time::Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(real.deleted_chunks, 1);
    assert!(
        fx.store
            .head(&chunk::chunk_key(&orphan.chunk.hash))
            .await
            .unwrap()
            .is_none()
    );
    assert!(verify(&fx.repo, true).await.is_empty());
    let st = fx.repo.status().await.unwrap();
    assert_eq!(st.snapshots.len(), 2);
    assert!(
        st.dedup_ratio > 1.0,
        "two identical snapshots share chunks: {}",
        st.dedup_ratio
    );
    assert!(st.snapshots.iter().all(|s| s.exclusive_stored_bytes == 0));
    assert!(
        matches!(
            out.manifest.as_ref().unwrap().chunks.get(3),
            ChunkState::Zero
        ),
        "image() leaves chunks 3..6 zero"
    );
}

#[tokio::test]
async fn init_twice_and_open_empty() {
    let fx = Fixture::new().await;
    let err = Repository::init(
        fx.store.clone(),
        cbt_store::repo::InitOptions {
            chunk_size: None,
            now: Timestamp(0),
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::AlreadyInitialized { ref id } if id == &fx.repo.config().id));
    let empty = tempfile::tempdir().unwrap();
    let store = Arc::new(cbt_store::store::LocalStore::new(empty.path()).unwrap());
    assert!(matches!(
        Repository::open(store.clone()).await.unwrap_err(),
        RepoError::NotInitialized
    ));
    let bad = Repository::init(
        store,
        cbt_store::repo::InitOptions {
            chunk_size: Some(1000),
            now: Timestamp(0),
        },
    )
    .await;
    assert!(matches!(
        bad.unwrap_err(),
        RepoError::Core(CoreError::InvalidChunkSize { .. })
    ));
}

#[tokio::test]
async fn chunk_puts_stop_asking_after_new_chunks_and_still_repair_a_damaged_copy() {
    let fx = Fixture::new().await;
    let (faulty, repo) = fx.through_faults().await;

    // A damaged copy of a chunk is already stored (another size: a torn or altered object).
    let victim = chunk::encode(&noise(500, 3000), 1);
    let key = chunk::chunk_key(&victim.chunk.hash);
    put_raw(fx.store.as_ref(), &key, Bytes::from_static(b"not a chunk")).await;

    // New chunks: asked for first until enough of them in a row were missing.
    for i in 0..20 {
        let put = repo
            .put_chunk(chunk::encode(&noise(600 + i, 3000), 1))
            .await
            .unwrap();
        assert!(put.uploaded);
    }
    let heads = faulty.calls(Op::Head);
    assert!(heads < 10, "a head for each of 20 new chunks: {heads}");

    // Created directly, refused, found damaged, replaced by the intact copy.
    let put = repo.put_chunk(victim.clone()).await.unwrap();
    assert!(put.uploaded);
    assert_eq!(put.chunk, victim.chunk);
    let stored = fx.store.get(&key).await.unwrap();
    assert_eq!(stored, victim.body);

    // A chunk found stored brings the heads back: an intact copy is not uploaded again.
    faulty.reset_counts();
    let again = repo.put_chunk(victim.clone()).await.unwrap();
    assert!(!again.uploaded);
    let put_calls = faulty.calls(Op::Put);
    assert_eq!(put_calls, 0, "the stored chunk was sent again");
}

#[tokio::test]
async fn changed_chunks_are_created_without_asking_and_stored_copies_still_count() {
    let fx = Fixture::new().await;
    let (faulty, repo) = fx.through_faults().await;
    let changed = |seed: u64| chunk::encode(&noise(seed, 3000), 1);

    // New content an incremental reports changed: created at once, one request each.
    for i in 0..5 {
        let put = repo
            .put_chunk_as(changed(700 + i), ChunkNovelty::Changed)
            .await
            .unwrap();
        assert!(put.uploaded);
    }
    assert_eq!(faulty.calls(Op::Head), 0);
    assert_eq!(faulty.calls(Op::Put), 5);

    // A damaged copy is stored: the refused create finds it, and it is replaced.
    let victim = changed(800);
    let key = chunk::chunk_key(&victim.chunk.hash);
    put_raw(fx.store.as_ref(), &key, Bytes::from_static(b"not a chunk")).await;
    let put = repo
        .put_chunk_as(victim.clone(), ChunkNovelty::Changed)
        .await
        .unwrap();
    assert!(put.uploaded);
    assert_eq!(put.chunk, victim.chunk);
    assert_eq!(fx.store.get(&key).await.unwrap(), victim.body);

    // A copy was just found stored (as when a failed run is resumed): the next changed chunk
    // is asked for first, and an intact stored copy is not sent again.
    faulty.reset_counts();
    let again = repo
        .put_chunk_as(victim.clone(), ChunkNovelty::Changed)
        .await
        .unwrap();
    assert!(!again.uploaded);
    assert_eq!(again.chunk, victim.chunk);
    assert_eq!(faulty.calls(Op::Put), 0, "the stored chunk was sent again");
    assert_eq!(faulty.calls(Op::Head), 1);

    // Once a chunk is missing again, changed chunks go straight to the create once more.
    faulty.reset_counts();
    for i in 0..3 {
        let put = repo
            .put_chunk_as(changed(900 + i), ChunkNovelty::Changed)
            .await
            .unwrap();
        assert!(put.uploaded);
    }
    assert_eq!(
        faulty.calls(Op::Head),
        1,
        "only the first after the stored one asks"
    );
    assert_eq!(faulty.calls(Op::Put), 3);
}

/// A hook that counts the manifest reads in flight at once, each held for a moment so that
/// reads issued together overlap, and holds the listings of `snapshots/` and `chunks/` until
/// both have started (at most 5 s), recording whether they did.
#[derive(Debug)]
struct HeadReads {
    in_flight: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    /// Bit 1: a `snapshots/` listing started; bit 2: a `chunks/` listing started.
    listings: tokio::sync::watch::Sender<u8>,
    /// Whether every listing saw the other start while it was held.
    listings_overlapped: std::sync::atomic::AtomicBool,
}

impl Default for HeadReads {
    fn default() -> Self {
        Self {
            in_flight: Default::default(),
            peak: Default::default(),
            listings: tokio::sync::watch::Sender::new(0),
            listings_overlapped: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

impl HeadReads {
    /// Ready for another verify: counts and listings forgotten.
    fn reset(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.peak.store(0, SeqCst);
        self.listings.send_replace(0);
        self.listings_overlapped.store(true, SeqCst);
    }
}

/// A bounded read of a manifest head: the reads whose overlap is measured.
fn is_head_read(call: &Call<'_>) -> bool {
    matches!(call, Call::Get { key, max_len: Some(_), .. } if key.starts_with("snapshots/"))
}

#[async_trait::async_trait]
impl StoreHook for HeadReads {
    async fn before(&self, _inner: &dyn ObjectStore, call: &Call<'_>) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if is_head_read(call) {
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.peak.fetch_max(now, SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            return Ok(());
        }
        let bit = match call {
            Call::List { prefix, .. } if prefix.starts_with("snapshots/") => 1,
            Call::List { prefix, .. } if prefix.starts_with("chunks/") => 2,
            _ => return Ok(()),
        };
        self.listings.send_modify(|v| *v |= bit);
        let mut seen = self.listings.subscribe();
        let both = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            seen.wait_for(|v| *v == 3),
        )
        .await
        .is_ok();
        if !both {
            self.listings_overlapped.store(false, SeqCst);
        }
        Ok(())
    }

    fn finished(&self, call: &Call<'_>) {
        if is_head_read(call) {
            self.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn verify_lists_and_reads_heads_side_by_side_and_reports_each_problem_once_in_order() {
    let fx = Fixture::new().await;
    // Twelve snapshots of two chunks each, no chunk shared.
    let names: Vec<String> = (0..12).map(|i| format!("s{i:02}")).collect();
    let mut outs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let src = fx.write("d.img", &noise(100 + i as u64, 2 * CS as usize));
        let out = backup_file(&fx.repo, &src, request("v", name, full(), i as i64))
            .await
            .unwrap();
        outs.push(out);
    }
    let chunk_of = |snapshot: usize, index: u64| {
        let r = match outs[snapshot].manifest.as_ref().unwrap().chunks.get(index) {
            ChunkState::Stored(r) => r,
            ChunkState::Zero => panic!("chunk {index} of {snapshot} is stored"),
        };
        (chunk::chunk_key(&r.hash), r.stored_size)
    };
    // s03 loses a chunk, s07's manifest is garbage, s10 has a chunk cut short, s11 another.
    fx.store.delete(&chunk_of(3, 1).0).await.unwrap();
    put_raw(
        fx.store.as_ref(),
        &manifest_key(&vol("v"), &snap("s07")),
        Bytes::from_static(b"not a manifest"),
    )
    .await;
    for (s, i) in [(10, 0), (11, 1)] {
        let p = fx.local.path_of(&chunk_of(s, i).0).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
    }

    let watched = Arc::new(HookedStore::new(fx.store.clone(), HeadReads::default()));
    let repo = Repository::open(watched.clone()).await.unwrap();
    let watched = watched.hook();
    for read_data in [false, true] {
        watched.reset();
        let report = repo
            .verify(&VerifyOptions {
                read_data,
                ..Default::default()
            })
            .await
            .unwrap();
        let got: Vec<(String, Option<u64>, &str)> = report
            .problems
            .iter()
            .map(|p| {
                let kind = match p.problem {
                    ProblemKind::Missing => "missing",
                    ProblemKind::SizeMismatch { .. } => "size",
                    ProblemKind::Corrupt { .. } => "corrupt",
                    ProblemKind::ManifestUnreadable { .. } => "manifest",
                };
                (p.snapshot.clone(), p.index, kind)
            })
            .collect();
        let expected = [
            ("v/s03", Some(1), "missing"),
            ("v/s07", None, "manifest"),
            ("v/s10", Some(0), "size"),
            ("v/s11", Some(1), "size"),
        ]
        .map(|(s, i, k)| (s.to_string(), i, k));
        assert_eq!(got, expected, "read_data {read_data}");
        assert_eq!(report.snapshots, 11, "the unreadable one is not counted");
        // Heads are read four at a time, never more.
        let peak = watched.peak.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(peak, 4, "manifest reads in flight at once");
        // The snapshot listing and the chunk listing go out side by side.
        assert!(
            watched
                .listings_overlapped
                .load(std::sync::atomic::Ordering::SeqCst)
        );
    }
}
