//! Local directory store specifics: on-disk corruption detection, no partial objects, root
//! confinement and staging clean-up.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cbt_store::store::local::{SyncCounts, TRAILER_LEN};
use cbt_store::store::{
    ErrorKind, LocalStore, ObjectStore, PutMode, PutOptions, PutOutcome, StoreError,
};
use cbt_store::testing::conformance::body;

#[tokio::test]
async fn flipped_byte_on_disk_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    let data = body(1, 5000);
    store
        .put("chunks/ab/cd", data.clone(), PutMode::IfAbsent)
        .await
        .unwrap();
    let path = store.path_of("chunks/ab/cd").unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 5000 + TRAILER_LEN);

    let mut raw = std::fs::read(&path).unwrap();
    raw[1234] ^= 0x80;
    std::fs::write(&path, &raw).unwrap();
    let err = store.get("chunks/ab/cd").await.unwrap_err();
    match &err {
        StoreError::Corrupt {
            key,
            expected,
            actual,
        } => {
            assert_eq!(key, "chunks/ab/cd");
            assert_eq!(*expected, crc32c::crc32c(&data));
            assert_ne!(expected, actual);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Integrity);
}

#[tokio::test]
async fn truncated_file_is_reported_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    store
        .put("a", body(2, 100), PutMode::Overwrite)
        .await
        .unwrap();
    let path = store.path_of("a").unwrap();
    std::fs::write(&path, b"abc").unwrap();
    assert!(matches!(
        store.get("a").await,
        Err(StoreError::Malformed { .. })
    ));
    assert!(matches!(
        store.head("a").await,
        Err(StoreError::Malformed { .. })
    ));
    // A file cut anywhere (trailer lost) fails the checksum or the framing, never passes.
    let data = body(3, 100);
    store.put("b", data, PutMode::Overwrite).await.unwrap();
    let path = store.path_of("b").unwrap();
    let raw = std::fs::read(&path).unwrap();
    std::fs::write(&path, &raw[..raw.len() - 3]).unwrap();
    let err = store.get("b").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
}

#[tokio::test]
async fn keys_never_escape_the_root() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    let store = LocalStore::new(&root).unwrap();
    for key in ["../outside", "x/../../outside", "/etc/passwd", ".cbt-tmp/x"] {
        let err = store
            .put(key, Bytes::from_static(b"x"), PutMode::Overwrite)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidKey { .. }),
            "{key}: {err:?}"
        );
    }
    assert!(!outer.path().join("outside").exists());
    assert_eq!(std::fs::read_dir(outer.path()).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_partial_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path()).unwrap());
    let a = body(10, 2 * 1024 * 1024);
    let b = body(11, 2 * 1024 * 1024);
    store
        .put("obj", a.clone(), PutMode::Overwrite)
        .await
        .unwrap();
    let writer = {
        let (store, a, b) = (store.clone(), a.clone(), b.clone());
        tokio::spawn(async move {
            for i in 0..20 {
                let next = if i % 2 == 0 { b.clone() } else { a.clone() };
                store.put("obj", next, PutMode::Overwrite).await.unwrap();
            }
        })
    };
    for _ in 0..40 {
        let got = store.get("obj").await.unwrap();
        assert!(got == a || got == b, "reader saw a mix or a partial body");
    }
    writer.await.unwrap();
}

#[tokio::test]
async fn stale_staging_files_are_ignored_and_removable() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    // What a writer killed mid-put leaves behind.
    std::fs::write(dir.path().join(".cbt-tmp/12345-0-0"), b"partial").unwrap();
    store
        .put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap();
    let keys: Vec<String> = cbt_store::store::list_all(&store, "")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["k"]);
    assert_eq!(store.remove_stale_staging(Duration::ZERO).unwrap(), 1);
    assert_eq!(store.remove_stale_staging(Duration::ZERO).unwrap(), 0);
}

/// Racing create-if-absent puts of one key: exactly one is created and its body is the one
/// stored, whole; neither the object's directory nor the staging directory keeps any other
/// name (the unnamed-file path leaves nothing behind, the staging path removes its name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_if_absent_puts_leave_one_whole_object_and_no_other_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path()).unwrap());
    for round in 0..10u8 {
        let key = format!("chunks/{round:02x}/obj");
        let bodies: Vec<Bytes> = (0..4)
            .map(|i| body(u64::from(round) * 4 + i, 256 * 1024))
            .collect();
        let puts: Vec<_> = bodies
            .iter()
            .map(|b| {
                let (store, key, b) = (store.clone(), key.clone(), b.clone());
                tokio::spawn(async move { store.put(&key, b, PutMode::IfAbsent).await.unwrap() })
            })
            .collect();
        let mut created = 0;
        for p in puts {
            if p.await.unwrap() == PutOutcome::Created {
                created += 1;
            }
        }
        assert_eq!(created, 1, "round {round}");
        let got = store.get(&key).await.unwrap();
        assert!(
            bodies.contains(&got),
            "round {round}: stored body is none of the puts"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path().join(format!("chunks/{round:02x}")))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("obj")]);
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join(".cbt-tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn if_absent_on_existing_object_does_not_touch_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    store
        .put("m", Bytes::from_static(b"first"), PutMode::IfAbsent)
        .await
        .unwrap();
    let before = std::fs::metadata(store.path_of("m").unwrap())
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        store
            .put("m", Bytes::from_static(b"second"), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    let after = std::fs::metadata(store.path_of("m").unwrap())
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(store.get("m").await.unwrap(), Bytes::from_static(b"first"));
}

#[tokio::test]
async fn object_and_prefix_clash_is_a_clear_error_and_reads_see_no_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    store
        .put("a", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .unwrap();
    let err = store
        .put("a/b", Bytes::from_static(b"y"), PutMode::Overwrite)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err:?}");
    store
        .put("d/e", Bytes::from_static(b"y"), PutMode::Overwrite)
        .await
        .unwrap();
    let err = store
        .put("d", Bytes::from_static(b"x"), PutMode::IfAbsent)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err:?}");
    // "d" is a directory, "a/b" runs through a file: neither is an object.
    assert!(matches!(
        store.get("d").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.get("a/b").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.get_range("d", 0..1).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.head("d").await.unwrap().is_none());
    assert!(store.head("a/b").await.unwrap().is_none());
    store.delete("d").await.unwrap();
    store.delete("a/b").await.unwrap();
    assert_eq!(store.get("d/e").await.unwrap(), Bytes::from_static(b"y"));
    assert_eq!(store.get("a").await.unwrap(), Bytes::from_static(b"x"));
}

/// Symbolic links planted inside the repository are never followed: writes and deletes through
/// a linked directory, the staging directory or a linked object fail with `UnsafePath` and
/// leave the link's target untouched; a delete of a linked key removes only the link.
#[tokio::test]
async fn symlinks_inside_the_root_are_never_followed() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"precious").unwrap();
    let store = LocalStore::new(dir.path().join("repo")).unwrap();
    let root = store.root().to_path_buf();

    // A directory on the way is a link to a directory outside the root.
    std::fs::create_dir(root.join("chunks")).unwrap();
    symlink(&outside, root.join("chunks/ab")).unwrap();
    let unsafe_path = |r: Result<_, StoreError>| matches!(r, Err(StoreError::UnsafePath { .. }));
    assert!(unsafe_path(
        store
            .put("chunks/ab/victim", body(1, 10), PutMode::Overwrite)
            .await
            .map(|_| ())
    ));
    assert!(unsafe_path(
        store
            .put("chunks/ab/new", body(1, 10), PutMode::IfAbsent)
            .await
            .map(|_| ())
    ));
    assert!(unsafe_path(store.delete("chunks/ab/victim").await));
    assert!(unsafe_path(store.get("chunks/ab/victim").await.map(|_| ())));
    assert!(unsafe_path(
        store.head("chunks/ab/victim").await.map(|_| ())
    ));
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");
    assert!(!outside.join("new").exists());
    // Listings skip the link instead of descending into it.
    let listed = cbt_store::store::list_all(&store, "chunks/").await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");

    // An object that is a link to a file outside: not read, not overwritten; deleting the key
    // removes the link only.
    std::fs::create_dir(root.join("snapshots")).unwrap();
    symlink(outside.join("victim"), root.join("snapshots/m")).unwrap();
    assert!(unsafe_path(store.get("snapshots/m").await.map(|_| ())));
    assert!(unsafe_path(
        store
            .put("snapshots/m", body(2, 10), PutMode::Overwrite)
            .await
            .map(|_| ())
    ));
    store.delete("snapshots/m").await.unwrap();
    assert!(std::fs::symlink_metadata(root.join("snapshots/m")).is_err());
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");

    // The staging directory replaced by a link: writes refuse to stage outside, and the
    // stale-staging sweep refuses to delete there.
    std::fs::remove_dir_all(root.join(".cbt-tmp")).unwrap();
    symlink(&outside, root.join(".cbt-tmp")).unwrap();
    assert!(unsafe_path(
        store
            .put("x", body(3, 10), PutMode::Overwrite)
            .await
            .map(|_| ())
    ));
    assert!(matches!(
        store.remove_stale_staging(Duration::ZERO),
        Err(StoreError::UnsafePath { .. })
    ));
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
}

/// A bounded read refuses an object larger than its limit from the file size, before reading
/// it; a key linked to a device (`/dev/zero` reads forever) is refused, not streamed.
#[tokio::test]
async fn bounded_reads_refuse_large_objects_before_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    store
        .put("locks/exclusive", body(5, 1 << 20), PutMode::Overwrite)
        .await
        .unwrap();
    assert!(matches!(
        store.get_bounded("locks/exclusive", 64 * 1024).await,
        Err(StoreError::TooLarge {
            size: Some(1_048_576),
            limit: 65_536,
            ..
        })
    ));
    std::fs::create_dir_all(dir.path().join("dev")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("dev/zero")).unwrap();
    assert!(matches!(
        store.get_bounded("dev/zero", 10).await,
        Err(StoreError::UnsafePath { .. })
    ));
}

/// Large bodies take the direct-I/O path (an aligned prefix bypassing the page cache, the rest
/// and the trailer buffered); every length around the block and threshold edges must come
/// back byte for byte, deferred or durable, created or overwritten, and the file must be
/// exactly body plus trailer.
#[tokio::test]
async fn large_bodies_round_trip_at_every_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    let sizes = [
        (256 << 10) - 1,
        256 << 10,
        (256 << 10) + 1,
        (1 << 20) + 4095,
        (1 << 20) + 52,
        4 << 20,
    ];
    for (i, len) in sizes.into_iter().enumerate() {
        let key = format!("chunks/{i:02}/obj");
        let data = body(i as u64 + 10, len);
        let opts = |mode| cbt_store::store::PutOptions {
            mode,
            crc32c: Some(crc32c::crc32c(&data)),
            defer_sync: i % 2 == 0,
        };
        let put = store
            .put_with(&key, data.clone(), opts(PutMode::IfAbsent))
            .await
            .unwrap();
        assert_eq!(put, PutOutcome::Created, "size {len}");
        let path = store.path_of(&key).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len as u64 + TRAILER_LEN
        );
        assert_eq!(store.get(&key).await.unwrap(), data, "size {len}");
        // Overwrite with different bytes of the same length: the staging path.
        let other = body(i as u64 + 100, len);
        store
            .put_with(
                &key,
                other.clone(),
                cbt_store::store::PutOptions {
                    crc32c: Some(crc32c::crc32c(&other)),
                    ..opts(PutMode::Overwrite)
                },
            )
            .await
            .unwrap();
        assert_eq!(store.get(&key).await.unwrap(), other, "size {len}");
    }
    store.sync().await.unwrap();
}

fn deferred(mode: PutMode) -> PutOptions {
    PutOptions {
        defer_sync: true,
        ..PutOptions::new(mode)
    }
}

fn counts(file_fsyncs: u64, dir_fsyncs: u64, syncfs: u64) -> SyncCounts {
    SyncCounts {
        file_fsyncs,
        dir_fsyncs,
        syncfs,
    }
}

#[tokio::test]
async fn small_batch_sync_fsyncs_exactly_its_objects_and_their_directories() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    // Durable puts are synced by the put itself: nothing is left for `sync`.
    store
        .put("manifests/m", body(9, 10), PutMode::IfAbsent)
        .await
        .unwrap();
    store.sync().await.unwrap();
    assert_eq!(store.sync_counts(), counts(0, 0, 0));

    let keys = ["chunks/aa/1", "chunks/aa/2", "chunks/bb/3", "segs/4"];
    for (i, key) in keys.iter().enumerate() {
        let mode = if i == 1 {
            PutMode::Overwrite // through a staging file rather than an unnamed one
        } else {
            PutMode::IfAbsent
        };
        store
            .put_with(key, body(i as u64, 300 + i), deferred(mode))
            .await
            .unwrap();
    }
    store.sync().await.unwrap();
    // 4 files; directories: the root, chunks, chunks/aa, chunks/bb, segs.
    assert_eq!(store.sync_counts(), counts(4, 5, 0));
    store.sync().await.unwrap();
    assert_eq!(store.sync_counts(), counts(4, 5, 0), "nothing new to sync");

    // An object a backup finds (by `head`, or losing an if-absent race) may have been put by
    // a writer that has not synced yet: it is covered too, with its directories.
    assert!(store.head("chunks/aa/1").await.unwrap().is_some());
    assert!(store.head("chunks/cc/none").await.unwrap().is_none());
    store.sync().await.unwrap();
    assert_eq!(store.sync_counts(), counts(5, 8, 0));
    let outcome = store
        .put_with("chunks/bb/3", body(2, 302), deferred(PutMode::IfAbsent))
        .await
        .unwrap();
    assert_eq!(outcome, PutOutcome::AlreadyExists);
    store.sync().await.unwrap();
    assert_eq!(store.sync_counts(), counts(6, 11, 0));

    let reopened = LocalStore::new(dir.path()).unwrap();
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(reopened.get(key).await.unwrap(), body(i as u64, 300 + i));
    }
}

#[tokio::test]
async fn large_batch_sync_is_one_syncfs_and_the_next_small_one_fsyncs_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap().with_sync_each_max(10);
    // 12 files in 12 directories: past 10 handles.
    let keys: Vec<String> = (0..12u8).map(|i| format!("chunks/{i:02x}/c{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        store
            .put_with(key, body(i as u64, 1000), deferred(PutMode::IfAbsent))
            .await
            .unwrap();
    }
    store.sync().await.unwrap();
    assert_eq!(store.sync_counts(), counts(0, 0, 1));

    store
        .put_with("segs/s", body(50, 70), deferred(PutMode::Overwrite))
        .await
        .unwrap();
    store.sync().await.unwrap();
    assert_eq!(store.sync_counts(), counts(1, 2, 1));

    let always = LocalStore::new(dir.path()).unwrap().with_sync_each_max(0);
    always
        .put_with("segs/t", body(51, 70), deferred(PutMode::Overwrite))
        .await
        .unwrap();
    always.sync().await.unwrap();
    assert_eq!(always.sync_counts(), counts(0, 0, 1));

    let reopened = LocalStore::new(dir.path()).unwrap();
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(reopened.get(key).await.unwrap(), body(i as u64, 1000));
    }
    assert_eq!(reopened.get("segs/s").await.unwrap(), body(50, 70));
    assert_eq!(reopened.get("segs/t").await.unwrap(), body(51, 70));
}
