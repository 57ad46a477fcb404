//! Local directory store specifics: on-disk corruption detection, no partial objects, root
//! confinement and staging clean-up.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cbt_store::store::local::TRAILER_LEN;
use cbt_store::store::{ErrorKind, LocalStore, ObjectStore, PutMode, PutOutcome, StoreError};
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
