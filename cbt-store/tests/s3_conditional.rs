//! Knowing the store: an S3-compatible server that ignores `If-None-Match: *` is detected at
//! connect, and exclusive writes (locks, manifests, the config) are refused with an error
//! naming it, instead of silently overwriting. Against the in-process S3 server, once as is
//! and once as a stand-in that drops the condition.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::Arc;

use bytes::Bytes;
use cbt_core::Timestamp;
use cbt_store::repo::{InitOptions, RepoError, Repository};
use cbt_store::store::s3::{PROBE_KEY, S3Config, S3Store};
use cbt_store::store::{
    ConditionalWrites, ErrorKind, ObjectStore, PutMode, PutOutcome, RetryPolicy, RetryingStore,
    StoreError, list_all,
};
use cbt_store::testing::S3TestServer;

#[tokio::test]
async fn a_server_that_honours_conditional_writes_is_recognised_and_left_clean() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    let store = server.store("bkt", "repo").await.unwrap();
    assert_eq!(
        store.conditional_writes().await.unwrap(),
        ConditionalWrites::Honoured
    );
    assert!(
        list_all(&store, "").await.unwrap().is_empty(),
        "probe object left behind"
    );
    let k = "locks/exclusive";
    let b = Bytes::from_static(b"x");
    assert_eq!(
        store.put(k, b.clone(), PutMode::IfAbsent).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store.put(k, b, PutMode::IfAbsent).await.unwrap(),
        PutOutcome::AlreadyExists
    );
}

#[tokio::test]
async fn a_server_that_ignores_conditional_writes_gets_no_exclusive_writes() {
    let server = S3TestServer::start_ignoring_conditional_writes()
        .await
        .unwrap();
    server.create_bucket("bkt").unwrap();

    // What happens without the probe: both "creates" succeed, the second overwrites.
    let mut blind = server.config("bkt", "blind");
    blind.check_on_connect = false;
    let blind = S3Store::connect(blind).await.unwrap();
    assert_eq!(
        blind.conditional_writes().await.unwrap(),
        ConditionalWrites::Unknown
    );
    for body in [&b"first"[..], b"second"] {
        let out = blind
            .put("k", Bytes::copy_from_slice(body), PutMode::IfAbsent)
            .await
            .unwrap();
        assert_eq!(out, PutOutcome::Created);
    }
    assert_eq!(blind.get("k").await.unwrap(), Bytes::from_static(b"second"));

    // With the probe: detected, and exclusive writes are refused, naming the server.
    let store = server.store("bkt", "repo").await.unwrap();
    assert_eq!(
        store.conditional_writes().await.unwrap(),
        ConditionalWrites::Ignored
    );
    let err = store
        .put(
            "locks/exclusive",
            Bytes::from_static(b"x"),
            PutMode::IfAbsent,
        )
        .await
        .unwrap_err();
    match &err {
        StoreError::ConditionalWritesUnsupported { endpoint, .. } => {
            assert_eq!(endpoint, &server.endpoint());
        }
        other => panic!("expected ConditionalWritesUnsupported, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(!err.is_transient());
    assert!(err.to_string().contains(&server.endpoint()));
    assert!(
        list_all(&store, "").await.unwrap().is_empty(),
        "nothing was written"
    );
    // Plain writes and reads still work.
    store
        .put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"v"));
    store.delete("k").await.unwrap();

    // A repository cannot be created (or locked, or committed to) there.
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let err = Repository::init(
        store,
        InitOptions {
            chunk_size: None,
            now: Timestamp(0),
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &err,
            RepoError::Store {
                source: StoreError::ConditionalWritesUnsupported { .. },
                ..
            }
        ),
        "{err:?}"
    );
    // The store in use is the configuration to change (the same kind the store reports).
    assert_eq!(err.kind(), ErrorKind::Config);
}

/// The conditional-write probe runs after `connect` returns; when it fails on a transient
/// error, no exclusive write goes out unprobed: the first one probes again (directly, or on
/// its retry when its own probe was the one that failed) and then succeeds.
#[tokio::test]
async fn a_probe_that_failed_transiently_is_run_again_before_an_exclusive_write() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    // The marker exists from now on (and this store's probe is over).
    let first = server.store("bkt", "repo").await.unwrap();
    first.conditional_writes().await.unwrap();
    let probe = format!("repo/{PROBE_KEY}");
    server.slow_down_puts(&probe, 1);
    let seen = server.request_log().len();
    let s3 = server.store("bkt", "repo").await.unwrap();
    let retry = RetryPolicy {
        max_attempts: 3,
        base_delay: std::time::Duration::from_millis(5),
        max_delay: std::time::Duration::from_millis(20),
    };
    let store = RetryingStore::new(Arc::new(s3.clone()), retry);
    let out = store
        .put(
            "locks/exclusive",
            Bytes::from_static(b"x"),
            PutMode::IfAbsent,
        )
        .await
        .unwrap();
    assert_eq!(out, PutOutcome::Created);
    assert_eq!(
        s3.conditional_writes().await.unwrap(),
        ConditionalWrites::Honoured
    );
    let puts: Vec<String> = server.request_log()[seen..]
        .iter()
        .filter(|r| r.starts_with("PUT "))
        .cloned()
        .collect();
    let probe_put = format!("PUT {probe}");
    assert_eq!(
        puts,
        [
            probe_put.clone(),
            probe_put,
            "PUT repo/locks/exclusive".to_string()
        ]
    );
}

/// A store dropped right after `connect` (with every clone) aborts the conditional-write probe
/// it left running. On a fresh prefix the probe's first create is held by the server while the
/// store is dropped, then released: a probe still running would send its second create and its
/// read-back. While a clone is kept, it does; once every clone is gone, it does not.
#[tokio::test]
async fn dropping_the_store_aborts_its_background_probe() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    // The GETs that release a held create are sent by a store that does not probe.
    let quiet = S3Store::connect(S3Config {
        check_on_connect: false,
        ..server.config("bkt", "")
    })
    .await
    .unwrap();
    let probe_requests = |prefix: &str| {
        let probe = format!("{prefix}/{PROBE_KEY}");
        (server.request_log().iter())
            .filter(|r| r.ends_with(&probe))
            .map(|r| r.split(' ').next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    // Waits (at most 5 s) until the probe requests under `prefix` are `want`.
    let wait_for = |prefix: &'static str, want: &'static [&'static str]| async move {
        for _ in 0..500 {
            if probe_requests(prefix) == want {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(probe_requests(prefix), want, "{prefix}");
    };
    for (prefix, keep_a_clone) in [("kept", true), ("dropped", false)] {
        server.hold_put_until_get(&format!("{prefix}/{PROBE_KEY}"), "release");
        let s3 = server.store("bkt", prefix).await.unwrap();
        let clone = keep_a_clone.then(|| s3.clone());
        wait_for(prefix, &["PUT"]).await; // the first create, held
        drop(s3);
        assert!(quiet.get("release").await.is_err());
        match clone {
            Some(clone) => {
                wait_for(prefix, &["PUT", "PUT", "GET"]).await;
                assert_eq!(
                    clone.conditional_writes().await.unwrap(),
                    ConditionalWrites::Honoured
                );
            }
            None => {
                // Time for a probe still running to send its next requests.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                assert_eq!(probe_requests(prefix), ["PUT"], "the probe went on");
            }
        }
    }
}
