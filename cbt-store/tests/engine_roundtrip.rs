//! Backup -> change -> incremental -> restore, byte for byte, on a local-store repository.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cbt_core::ChunkState;
use cbt_store::engine::{
    self, BackupMode, EngineOptions, FileSource, Progress, RestoreOptions, TargetKind,
};
use cbt_store::repo::RepoError;
use cbt_store::store::{ErrorKind, LocalStore, ObjectStore, PutOptions, StoreError};
use cbt_store::testing::hooked::{Call, HookedStore, StoreHook};
use engine_support::*;

const SIZE: usize = 8 * 1024 * 1024 + 12_345; // 129 chunks, the last one short

#[tokio::test]
async fn full_then_incremental_restore_byte_identical_and_prune_keeps_second() {
    let fx = Fixture::new().await;
    let mut img = image(SIZE, 1);
    let v1 = img.clone();
    let src = fx.write("disk.img", &img);

    let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let mut o = opts();
    let seen2 = seen.clone();
    o.progress = Some(Arc::new(move |p: &Progress| seen2.lock().unwrap().push(*p)));
    let source = Arc::new(FileSource::open(&src).unwrap());
    let first = engine::backup(&fx.repo, source, request("db", "s1", full(), 10), &o)
        .await
        .unwrap();
    let st = first.stats;
    assert_eq!(
        st.bytes_read, SIZE as u64,
        "image is not sparse: every byte is read"
    );
    assert_eq!(
        st.bytes_in_ranges, SIZE as u64,
        "no allocation map: all of it"
    );
    assert!(st.chunks_zero > 0 && st.objects_written > 0);
    assert_eq!(
        st.chunks_read,
        st.chunks_zero + st.objects_written + st.chunks_deduplicated
    );
    assert!(
        st.bytes_uploaded < st.bytes_read - st.bytes_zero,
        "text compresses"
    );
    let last = *seen.lock().unwrap().last().unwrap();
    assert_eq!(last.chunks_done, last.chunks_total);
    assert_eq!(last.bytes_done, SIZE as u64);

    // Change about 1% of the volume in 8 places.
    let changed = mutate(&mut img, 8, SIZE / 800, 5);
    std::fs::write(&src, &img).unwrap();
    // A full backup hands back its head only; this mode takes the parent whole.
    assert!(first.manifest.is_none());
    let first_map = fx
        .repo
        .load_manifest(&first.head.volume, &first.head.snapshot)
        .await
        .unwrap();
    let parent = Box::new(first_map.clone());
    let mode = BackupMode::Incremental {
        parent,
        changed: changed.clone(),
    };
    let second = backup_file(&fx.repo, &src, request("db", "s2", mode, 20))
        .await
        .unwrap();
    let st2 = second.stats;
    assert!(
        st2.chunks_read <= 16,
        "only changed chunks are read: {st2:?}"
    );
    assert!(st2.objects_written <= st2.chunks_read);
    assert!(st2.bytes_changed > 0 && st2.bytes_changed <= st2.bytes_read);
    assert_eq!(
        st2.bytes_in_ranges,
        changed.total_bytes(),
        "the stats keep what CBT reported, before chunk alignment"
    );
    assert!(st2.bytes_in_ranges <= st2.bytes_read);
    assert_eq!(
        second
            .manifest
            .as_ref()
            .unwrap()
            .parent
            .as_ref()
            .unwrap()
            .snapshot
            .as_str(),
        "s1"
    );
    // Unchanged chunks keep the parent's references.
    let untouched = (0..first_map.chunks.geometry().chunk_count())
        .find(|i| !changed.chunks(first_map.chunks.geometry()).contains(*i))
        .unwrap();
    assert_eq!(
        first_map.chunks.get(untouched),
        second.manifest.as_ref().unwrap().chunks.get(untouched)
    );

    for (name, expected) in [("s1", &v1), ("s2", &img)] {
        let out = fx.path(&format!("restore-{name}.img"));
        let r = restore_file(&fx.repo, &vol("db"), &snap(name), &out)
            .await
            .unwrap();
        assert_eq!(r.kind, TargetKind::NewFile);
        assert!(std::fs::read(&out).unwrap() == *expected, "{name} differs");
    }

    // Keep only the newest: s1 goes, its exclusive chunks are collected, s2 still restores.
    let before = fx.repo.status().await.unwrap();
    let report = prune_to_newest(&fx.repo, 100).await;
    assert_eq!(report.removed, vec!["db/s1".to_string()]);
    assert!(report.gc.deleted_chunks > 0);
    let after = fx.repo.status().await.unwrap();
    assert_eq!(after.snapshots.len(), 1);
    assert_eq!(after.unreferenced_chunks, 0);
    assert_eq!(
        after.stored_chunks,
        before.stored_chunks - report.gc.deleted_chunks
    );
    assert!(fx.restored("db", "s2").await == img);
    let verify = verify_data(&fx.repo).await;
    assert!(verify.is_ok(), "{:?}", verify.problems);
    assert_eq!(
        verify.chunks_read,
        second
            .manifest
            .as_ref()
            .unwrap()
            .chunks
            .unique_chunks()
            .len() as u64
    );
}

#[tokio::test]
async fn sparse_source_reads_only_data_and_same_image_dedups() {
    let fx = Fixture::new().await;
    let path = fx.path("sparse.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 * CS).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(3, 100_000), 10 * CS).unwrap();
    f.sync_all().unwrap();
    let one = full_backup(&fx.repo, &path, "v", "a", 1).await;
    assert!(one.manifest.as_ref().unwrap().chunks.stored_count() >= 2);
    assert_eq!(
        one.manifest.as_ref().unwrap().chunks.get(0),
        ChunkState::Zero
    );
    // SEEK_DATA is honoured where the file system supports it (tmpfs, ext4, xfs, btrfs).
    if FileSource::open(&path).unwrap().data_ranges_supported() {
        assert!(
            one.stats.bytes_read < 8 * CS,
            "holes were read: {:?}",
            one.stats
        );
    }
    // The restored file is sparse: zero chunks and zero blocks inside chunks stay holes.
    let restored = fx.path("sparse-restored.img");
    restore_file(&fx.repo, &vol("v"), &snap("a"), &restored)
        .await
        .unwrap();
    assert!(std::fs::read(&restored).unwrap() == std::fs::read(&path).unwrap());
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&restored).unwrap().blocks() * 512;
    assert!(
        allocated <= 100_000 + 8192,
        "restored file holds {allocated} bytes of blocks"
    );

    let two = full_backup(&fx.repo, &path, "v", "b", 2).await;
    assert_eq!(two.stats.objects_written, 0);
    assert_eq!(two.stats.bytes_uploaded, 0);
    assert_eq!(two.stats.chunks_deduplicated, one.stats.objects_written);
    assert_eq!(
        two.manifest.as_ref().unwrap().chunks,
        one.manifest.as_ref().unwrap().chunks
    );

    // Same name twice is refused and the first snapshot is untouched.
    let err = backup_file(&fx.repo, &path, request("v", "b", full(), 3))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::SnapshotExists { .. }));
    assert_eq!(err.kind(), ErrorKind::Conflict);
}

#[tokio::test]
async fn restore_targets_existing_files_in_place_and_dry_run() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 9);
    let src = fx.write("disk.img", &img);
    full_backup(&fx.repo, &src, "v", "s", 1).await;
    let (v, s) = (vol("v"), snap("s"));

    // Dry run: the plan, nothing written.
    let target = fx.path("new.img");
    let dry = RestoreOptions {
        dry_run: true,
        ..Default::default()
    };
    let plan = engine::restore(&fx.repo, &v, &s, &target, &dry, &opts())
        .await
        .unwrap();
    assert!(plan.dry_run && plan.chunks > 0 && plan.bytes_written > 0);
    assert!(!target.exists());

    // Existing target without overwrite: refused, untouched.
    let garbage = vec![0xA5u8; SIZE + 1000];
    let existing = fx.write("existing.img", &garbage);
    let err = restore_file(&fx.repo, &v, &s, &existing).await.unwrap_err();
    assert!(matches!(err, RepoError::TargetExists { .. }));
    assert!(std::fs::read(&existing).unwrap() == garbage);

    // Overwrite a file: replaced, exact size and content.
    let over = RestoreOptions {
        overwrite: true,
        ..Default::default()
    };
    let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let mut with_progress = opts();
    let seen2 = seen.clone();
    with_progress.progress = Some(Arc::new(move |p: &Progress| seen2.lock().unwrap().push(*p)));
    let r = engine::restore(&fx.repo, &v, &s, &existing, &over, &with_progress)
        .await
        .unwrap();
    assert_eq!(r.kind, TargetKind::ReplacedFile);
    let last = *seen.lock().unwrap().last().unwrap();
    assert_eq!(
        (last.chunks_done, last.bytes_done),
        (r.chunks, r.bytes_written)
    );
    assert_eq!(last.bytes_transferred, r.bytes_downloaded);
    assert!(std::fs::read(&existing).unwrap() == img);

    // In place (device-like): size kept, zero chunks really zeroed, data exact.
    let dev = fx.write("device.img", &garbage);
    let in_place = RestoreOptions {
        overwrite: true,
        in_place: true,
        dry_run: false,
    };
    let r = engine::restore(&fx.repo, &v, &s, &dev, &in_place, &opts())
        .await
        .unwrap();
    assert_eq!(r.kind, TargetKind::InPlace);
    assert!(r.bytes_zeroed > 0);
    let got = std::fs::read(&dev).unwrap();
    assert_eq!(got.len(), garbage.len());
    assert!(got[..SIZE] == img[..], "in-place restore is not exact");
    assert!(
        got[SIZE..].iter().all(|b| *b == 0xA5),
        "bytes past the volume are left alone"
    );

    // A device smaller than the volume is refused before anything is written.
    let small = fx.write("small.img", &vec![1u8; SIZE - 1]);
    let err = engine::restore(&fx.repo, &v, &s, &small, &in_place, &opts())
        .await
        .unwrap_err();
    match err {
        RepoError::TargetTooSmall {
            target_size,
            volume_size,
            ..
        } => {
            assert_eq!((target_size, volume_size), (SIZE as u64 - 1, SIZE as u64));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(std::fs::read(&small).unwrap().iter().all(|b| *b == 1));
}

#[tokio::test]
async fn bad_requests_are_clear_errors() {
    let fx = Fixture::new().await;
    let img = image(4 * CS as usize, 2);
    let src = fx.write("d.img", &img);

    // Allocated ranges past the end of the volume.
    let past = cbt_core::RangeSet::try_from_extents([(3 * CS, 2 * CS)]).unwrap();
    let err = backup_file(
        &fx.repo,
        &src,
        request(
            "v",
            "s",
            BackupMode::Full {
                allocated: Some(past),
            },
            1,
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        RepoError::Core(cbt_core::CoreError::RangePastEnd { .. })
    ));
    assert_eq!(err.kind(), ErrorKind::Usage);

    // Volume larger than the source.
    let mut req = request("v", "s", full(), 1);
    req.volume_size = Some(5 * CS);
    let err = backup_file(&fx.repo, &src, req).await.unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest { .. }));

    // Parent of another volume.
    let base = full_backup(&fx.repo, &src, "v", "base", 1).await;
    let mode = BackupMode::Incremental {
        parent: Box::new(base.manifest.as_ref().unwrap().clone()),
        changed: cbt_core::RangeSet::new(),
    };
    let err = backup_file(&fx.repo, &src, request("other", "x", mode, 2))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest { .. }));

    // An incremental cannot change the chunk size.
    let mode = BackupMode::Incremental {
        parent: Box::new(base.manifest.as_ref().unwrap().clone()),
        changed: cbt_core::RangeSet::new(),
    };
    let mut req = request("v", "z", mode, 2);
    req.chunk_size = Some(2 * CS);
    let err = backup_file(&fx.repo, &src, req).await.unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest { .. }));

    // Deleted parent: refused (its chunks may be gone after GC).
    fx.repo
        .delete_snapshot(&vol("v"), &snap("base"))
        .await
        .unwrap();
    let mode = BackupMode::Incremental {
        parent: Box::new(base.manifest.unwrap()),
        changed: cbt_core::RangeSet::new(),
    };
    let err = backup_file(&fx.repo, &src, request("v", "y", mode, 2))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest { .. }));
    assert!(fx.repo.list_snapshots(None).await.unwrap().is_empty());
    assert!(
        fx.repo.list_locks().await.unwrap().is_empty(),
        "failed runs release their lock"
    );

    // Missing snapshot.
    let err = engine::restore(
        &fx.repo,
        &vol("v"),
        &snap("nope"),
        &fx.path("o"),
        &RestoreOptions::default(),
        &EngineOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::SnapshotNotFound { .. }));
}

#[tokio::test]
async fn repeated_chunks_are_stored_once_and_downloaded_once() {
    use cbt_store::store::Op;
    let fx = Fixture::new().await;
    let block = noise(42, CS as usize);
    let mut img = Vec::new();
    for _ in 0..8 {
        img.extend_from_slice(&block);
        img.extend(std::iter::repeat_n(0u8, CS as usize));
    }
    let src = fx.write("rep.img", &img);
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    assert_eq!(out.stats.objects_written, 1);
    assert_eq!(out.stats.chunks_deduplicated, 7);
    assert_eq!(out.stats.chunks_zero, 8);

    let (counting, repo) = fx.through_faults().await;
    counting.reset_counts();
    let target = fx.path("rep-restored.img");
    let r = restore_file(&repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap();
    assert_eq!(
        counting.calls(Op::Get),
        4,
        "the manifest head, its one map segment, the lock's check for an exclusive holder and one chunk download (the \
         shared lock is released without reading it back: its key is its own)"
    );
    assert_eq!(r.chunks, 8);
    assert_eq!(r.bytes_written, 8 * CS);
    assert!(std::fs::read(&target).unwrap() == img);
}

#[tokio::test]
async fn buffers_are_bounded_by_options_not_volume_size() {
    let fx = Fixture::new().await;
    raw_buffers_are_bounded(&fx, &fx.repo).await;
}

#[tokio::test]
async fn empty_and_tiny_volumes_round_trip() {
    let fx = Fixture::new().await;
    for (name, data) in [
        ("empty", Vec::new()),
        ("tiny", b"x".to_vec()),
        ("odd", noise(1, 4097)),
    ] {
        let src = fx.write(&format!("{name}.img"), &data);
        let out = backup_file(&fx.repo, &src, request(name, "s", full(), 1))
            .await
            .unwrap();
        assert_eq!(
            out.manifest.as_ref().unwrap().volume_size(),
            data.len() as u64
        );
        let target = fx.path(&format!("{name}.restored"));
        restore_file(&fx.repo, &vol(name), &snap("s"), &target)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), data, "{name}");
    }
}

/// Records, in order, every put (with its options) and sync.
#[derive(Debug, Default)]
struct Recording {
    log: Mutex<Vec<(String, Option<PutOptions>)>>,
}

#[async_trait::async_trait]
impl StoreHook for Recording {
    async fn before(&self, _inner: &dyn ObjectStore, call: &Call<'_>) -> Result<(), StoreError> {
        let entry = match call {
            Call::Put { key, opts, .. } => (key.to_string(), Some(*opts)),
            Call::Sync => ("<sync>".to_string(), None),
            _ => return Ok(()),
        };
        self.log.lock().unwrap().push(entry);
        Ok(())
    }
}

#[tokio::test]
async fn chunks_are_put_with_their_crc_and_deferred_durability_and_synced_before_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().join("repo")).unwrap());
    let rec = Arc::new(HookedStore::new(local, Recording::default()));
    let repo = init(rec.clone()).await;
    let img = image(20 * CS as usize, 5);
    let path = dir.path().join("img");
    std::fs::write(&path, &img).unwrap();
    rec.hook().log.lock().unwrap().clear();
    backup_file(&repo, &path, request("v", "s1", full(), 2_000))
        .await
        .unwrap();
    let log = rec.hook().log.lock().unwrap().clone();
    let chunk_puts: Vec<usize> = (0..log.len())
        .filter(|&i| log[i].0.starts_with("chunks/"))
        .collect();
    assert!(chunk_puts.len() > 5, "{log:?}");
    for &i in &chunk_puts {
        let o = log[i].1.unwrap();
        assert!(o.defer_sync && o.crc32c.is_some(), "{:?}", log[i]);
    }
    let manifest = log
        .iter()
        .position(|(k, _)| k.starts_with("snapshots/"))
        .expect("manifest written");
    assert!(!log[manifest].1.unwrap().defer_sync);
    let last_chunk = *chunk_puts.last().unwrap();
    assert!(
        log[last_chunk..manifest].iter().any(|(k, _)| k == "<sync>"),
        "no sync between the last chunk and the manifest: {log:?}"
    );
    // What was written that way reads back (the crc handed over was right).
    let restored = dir.path().join("out");
    restore_file(&repo, &vol("v"), &snap("s1"), &restored)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&restored).unwrap(), img);
}

#[tokio::test]
async fn a_dry_run_checks_that_every_chunk_is_stored() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 11);
    let src = fx.write("disk.img", &img);
    let m = full_backup(&fx.repo, &src, "v", "s", 1)
        .await
        .manifest
        .unwrap();
    let (index, gone) = m.chunks.iter_stored().map(|(i, r)| (i, *r)).nth(5).unwrap();
    fx.store
        .delete(&cbt_store::chunk::chunk_key(&gone.hash))
        .await
        .unwrap();
    let target = fx.path("never.img");
    let dry = RestoreOptions {
        dry_run: true,
        ..Default::default()
    };
    let err = engine::restore(&fx.repo, &vol("v"), &snap("s"), &target, &dry, &opts())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RepoError::ChunkMissing { index: i, .. } if *i <= index),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(!target.exists());
}

/// Hands every object out at a different misalignment whatever alignment is asked for, as
/// a store that ignores [`ObjectStore::get_bounded_aligned`] may.
#[derive(Debug, Default)]
struct Misaligning {
    calls: std::sync::atomic::AtomicUsize,
}

impl StoreHook for Misaligning {
    fn read(&self, call: &Call<'_>, body: Bytes) -> Bytes {
        let Call::Get {
            aligned_at: Some(aligned_at),
            ..
        } = *call
        else {
            return body;
        };
        let n = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // 0 (what was asked for), then steps through every residue mod 4096 (509 is prime).
        let shift = n * 509 % 4096;
        let mut v = vec![0u8; body.len() + 2 * 4096];
        let base = v.as_ptr() as usize + aligned_at;
        let start = (4096 - base % 4096) % 4096 + shift;
        v[start..start + body.len()].copy_from_slice(&body);
        assert_eq!((v.as_ptr() as usize + start + aligned_at) % 4096, shift);
        Bytes::from(v).slice(start..start + body.len())
    }
}

/// Chunks stored raw are written from the buffer the store read them into when it placed
/// their payload aligned (the local store does), and copied into an aligned buffer when it
/// did not, at every misalignment: a new file, a dirty file in place and a restore through
/// a store that ignores the alignment wish all come out byte for byte. Chunk lengths include
/// a last chunk that is not a whole number of blocks (a direct prefix and a buffered tail).
#[tokio::test]
async fn raw_chunks_restore_exactly_whether_or_not_the_store_aligned_them() {
    let fx = Fixture::new().await;
    let size = 40 * CS as usize + 3 * 4096 + 123;
    let mut img = noise(41, size);
    // Some zero blocks inside a chunk: a new file keeps them as holes.
    img[5 * CS as usize + 4096..5 * CS as usize + 3 * 4096].fill(0);
    let src = fx.write("d.img", &img);
    let m = full_backup(&fx.repo, &src, "v", "s", 1)
        .await
        .manifest
        .unwrap();
    let raw = m
        .chunks
        .iter_stored()
        .filter(|(_, r)| r.stored_size == r.raw_len + cbt_store::chunk::OVERHEAD as u64)
        .count();
    // 41 chunks; all but the one with zeros (it compresses) are random data, stored raw.
    assert_eq!(raw, 40, "chunks stored raw");
    let aligned = fx
        .store
        .get_bounded_aligned("config", 1 << 20, 48)
        .await
        .unwrap();
    assert_eq!((aligned.as_ptr() as usize + 48) % 4096, 0);

    let new = fx.path("new.img");
    restore_file(&fx.repo, &vol("v"), &snap("s"), &new)
        .await
        .unwrap();
    assert!(std::fs::read(&new).unwrap() == img);

    let dirty = fx.write("dirty.img", &noise(42, size));
    let in_place = RestoreOptions {
        overwrite: true,
        in_place: true,
        dry_run: false,
    };
    engine::restore(&fx.repo, &vol("v"), &snap("s"), &dirty, &in_place, &opts())
        .await
        .unwrap();
    assert!(std::fs::read(&dirty).unwrap() == img);

    let mis = Arc::new(HookedStore::new(fx.store.clone(), Misaligning::default()));
    let repo = cbt_store::repo::Repository::open(mis.clone())
        .await
        .unwrap();
    let shifted = fx.path("shifted.img");
    restore_file(&repo, &vol("v"), &snap("s"), &shifted)
        .await
        .unwrap();
    assert!(std::fs::read(&shifted).unwrap() == img);
    assert!(mis.hook().calls.load(std::sync::atomic::Ordering::Relaxed) >= 41);
}

/// A hook that lets reads on the caller's thread through, as the local store offers them, but
/// fails every third such read transiently; counts reads of each kind.
#[derive(Debug, Default)]
struct FlakyNow {
    now: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicUsize,
    fetched: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl StoreHook for FlakyNow {
    async fn before(&self, _inner: &dyn ObjectStore, call: &Call<'_>) -> Result<(), StoreError> {
        if matches!(call, Call::Get { key, .. } if key.starts_with("chunks/")) {
            self.fetched
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn reads_now(&self) -> bool {
        true
    }

    fn before_now(&self, call: &Call<'_>) -> Result<(), StoreError> {
        let n = self.now.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % 3 == 2 {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(StoreError::Transient {
                op: cbt_store::store::Op::Get,
                key: call.key().to_string(),
                message: "injected".into(),
            });
        }
        Ok(())
    }
}

/// A store that reads on the caller's thread is read inside the restore's blocking task, and
/// a chunk whose read there fails transiently is fetched again through the async path (which
/// the retrying wrapper retries): the restore comes out byte for byte, every chunk read once
/// on the blocking thread, and exactly the refused ones fetched again.
#[tokio::test]
async fn a_store_read_in_the_writer_task_falls_back_to_the_async_fetch_on_transient_errors() {
    let fx = Fixture::new().await;
    let size = 24 * CS as usize + 777;
    let img = image(size, 12);
    let src = fx.write("d.img", &img);
    let m = full_backup(&fx.repo, &src, "v", "s", 1)
        .await
        .manifest
        .unwrap();
    // Chunks of equal content are read once and written to each of their places.
    let chunks = (m.chunks.iter_stored())
        .map(|(_, r)| r.hash)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let hooked = Arc::new(HookedStore::new(fx.store.clone(), FlakyNow::default()));
    let repo = cbt_store::repo::Repository::open(hooked.clone())
        .await
        .unwrap();
    let flaky = hooked.hook();
    assert!(repo.chunk_reader().reads_now());
    let out = fx.path("flaky.img");
    restore_file(&repo, &vol("v"), &snap("s"), &out)
        .await
        .unwrap();
    assert!(
        std::fs::read(&out).unwrap() == img,
        "restored image differs"
    );
    let load = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        load(&flaky.now),
        chunks,
        "one read per chunk on the blocking thread"
    );
    assert!(
        load(&flaky.refused) >= chunks / 3,
        "{}",
        load(&flaky.refused)
    );
    assert_eq!(load(&flaky.fetched), load(&flaky.refused));
}

/// A new file restored from chunks striped with zero blocks holds only the data blocks: the
/// chunks are allocated a batch at a time ahead of their writes and their zero runs are given
/// back, at the next batch, at the end, and at once past the pending limit.
#[tokio::test]
async fn restored_file_gives_back_the_zero_runs_inside_chunks() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let fx = Fixture::new().await;
    let path = fx.path("striped.img");
    // 1,100 chunks (two restore batches of up to 1,024), each with data in blocks 0, 2, 4, 6
    // and 8 of its 16: five zero runs per chunk, 5,500 in all (more than the 4,096 pending).
    let chunks = 1_100u64;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(chunks * CS).unwrap();
    for c in 0..chunks {
        for b in (0..10u64).step_by(2) {
            f.write_all_at(&noise(c * 16 + b, 4096), c * CS + b * 4096)
                .unwrap();
        }
    }
    f.sync_all().unwrap();
    full_backup(&fx.repo, &path, "v", "a", 1).await;
    let restored = fx.path("striped-restored.img");
    restore_file(&fx.repo, &vol("v"), &snap("a"), &restored)
        .await
        .unwrap();
    assert!(std::fs::read(&restored).unwrap() == std::fs::read(&path).unwrap());
    let allocated = std::fs::metadata(&restored).unwrap().blocks() * 512;
    let data = chunks * 5 * 4096;
    // The slack is the file system's extent tree (5,500 extents); without the give-back the
    // file would hold its whole 72 MB.
    assert!(
        allocated <= data + data / 32,
        "restored file holds {allocated} bytes of blocks for {data} of data"
    );
}
