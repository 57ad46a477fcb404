//! S3 backend behaviour that the conformance suite cannot express generically: typed errors for
//! bad credentials, missing buckets and unreachable endpoints, multipart uploads, corruption
//! detection, and opening stores by URL. All against a real S3 server on loopback.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::Arc;

use bytes::Bytes;
use cbt_store::store::s3::{S3Store, StaticCredentials};
use cbt_store::store::{ErrorKind, ObjectStore, PutMode, PutOutcome, StoreError, open_url};
use cbt_store::testing::S3TestServer;
use cbt_store::testing::conformance::body;

#[tokio::test]
async fn wrong_secret_is_rejected_with_access_denied() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    let mut cfg = server.config("bkt", "");
    cfg.credentials = Some(StaticCredentials {
        access_key_id: cbt_store::testing::TEST_ACCESS_KEY.into(),
        secret_access_key: "not-the-secret".into(),
    });
    let err = S3Store::connect(cfg.clone()).await.unwrap_err();
    match &err {
        StoreError::AccessDenied { bucket, code, .. } => {
            assert_eq!(bucket, "bkt");
            assert_eq!(code, "SignatureDoesNotMatch");
        }
        other => panic!("expected AccessDenied, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Config);

    // Operations (not only connect) get the same typed error.
    cfg.check_on_connect = false;
    let store = S3Store::connect(cfg).await.unwrap();
    let err = store
        .put("k", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AccessDenied { .. }), "{err:?}");
}

#[tokio::test]
async fn unknown_access_key_is_rejected() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    let mut cfg = server.config("bkt", "");
    cfg.credentials = Some(StaticCredentials {
        access_key_id: "nobody".into(),
        secret_access_key: "whatever".into(),
    });
    let err = S3Store::connect(cfg).await.unwrap_err();
    assert!(matches!(err, StoreError::AccessDenied { .. }), "{err:?}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn missing_bucket_is_a_typed_error() {
    let server = S3TestServer::start().await.unwrap();
    let err = S3Store::connect(server.config("no-such-bucket", "p"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::BucketNotFound { bucket } if bucket == "no-such-bucket"),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn unreachable_endpoint_is_a_typed_transient_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // listener dropped: nothing accepts on this port now
    let server = S3TestServer::start().await.unwrap();
    let mut cfg = server.config("bkt", "");
    cfg.endpoint = Some(format!("http://127.0.0.1:{port}"));
    let err = S3Store::connect(cfg).await.unwrap_err();
    match &err {
        StoreError::Unreachable { endpoint, .. } => assert!(endpoint.contains(&port.to_string())),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(err.is_transient());
}

#[tokio::test]
async fn multipart_upload_round_trips_and_ranges_cross_parts() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("mpart").unwrap();
    let mut cfg = server.config("mpart", "x");
    cfg.multipart_threshold = 5 * 1024 * 1024;
    cfg.part_size = 5 * 1024 * 1024;
    let store = S3Store::connect(cfg).await.unwrap();
    let data = body(42, 11 * 1024 * 1024 + 17);
    assert_eq!(
        store
            .put("big", data.clone(), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(store.get("big").await.unwrap(), data);
    let boundary = 5 * 1024 * 1024u64;
    let got = store
        .get_range("big", boundary - 100..boundary + 100)
        .await
        .unwrap();
    assert_eq!(
        got,
        data.slice(boundary as usize - 100..boundary as usize + 100)
    );
    assert_eq!(
        store.head("big").await.unwrap().unwrap().size,
        data.len() as u64
    );
    // Conditional create of a large body also refuses to replace.
    assert_eq!(
        store
            .put("big", body(43, 6 * 1024 * 1024), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(store.get("big").await.unwrap(), data);
}

#[tokio::test]
async fn corruption_on_the_server_disk_is_detected() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("corrupt").unwrap();
    let store = server.store("corrupt", "").await.unwrap();
    let data = body(7, 100_000);
    store
        .put("obj", data.clone(), PutMode::Overwrite)
        .await
        .unwrap();
    let path = server.object_path("corrupt", "obj");
    let mut raw = std::fs::read(&path).unwrap();
    assert_eq!(raw, data.as_ref(), "s3s-fs stores the plain body");
    raw[50_000] ^= 0x01;
    std::fs::write(&path, &raw).unwrap();
    let err = store.get("obj").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
}

#[tokio::test]
async fn open_url_picks_backends_and_rejects_bad_urls() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("urls").unwrap();
    // Credentials come from the standard chain; here the process environment.
    set_test_credentials(&server);
    let store: Arc<dyn ObjectStore> = open_url("s3://urls/deep/prefix", &server.options())
        .await
        .unwrap();
    store
        .put("k", Bytes::from_static(b"hello"), PutMode::Overwrite)
        .await
        .unwrap();
    assert!(server.object_path("urls", "deep/prefix/k").exists());

    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let local = open_url(&url, &server.options()).await.unwrap();
    local
        .put("k", Bytes::from_static(b"hi"), PutMode::Overwrite)
        .await
        .unwrap();
    assert!(dir.path().join("repo/k").exists());

    for bad in [
        "ftp://x/y",
        "s3://",
        "s3:///prefix",
        "file://relative/path",
        "",
        "s3://b/../x",
    ] {
        let err = open_url(bad, &server.options()).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidUrl { .. }),
            "{bad:?}: {err:?}"
        );
    }
    let err = open_url("s3://missing-bucket/p", &server.options())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::BucketNotFound { .. }), "{err:?}");
}

fn set_test_credentials(server: &S3TestServer) {
    for (k, v) in server.env() {
        // SAFETY: every test of this binary that sets these variables sets the same values.
        unsafe { std::env::set_var(k, v) };
    }
}

#[tokio::test]
async fn open_url_retries_a_throttled_probe_and_gives_up_after_the_policy() {
    use cbt_store::store::RetryPolicy;
    use cbt_store::testing::InjectedError;
    use std::time::Duration;
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("throttled").unwrap();
    set_test_credentials(&server);
    let mut opts = server.options();
    opts.retry = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(20),
    };
    server.fail_next_connections([
        InjectedError::new(503, "SlowDown"),
        InjectedError::new(500, "InternalError"),
    ]);
    let store = open_url("s3://throttled/p", &opts).await.unwrap();
    store
        .put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap();

    server.fail_next_connections((0..3).map(|_| InjectedError::new(503, "SlowDown")));
    let err = open_url("s3://throttled/p", &opts).await.unwrap_err();
    match &err {
        StoreError::Transient { message, .. } => assert!(message.contains("SlowDown"), "{message}"),
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn http_errors_are_classified_by_s3_code_and_status() {
    use cbt_store::testing::InjectedError;
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("classify").unwrap();
    let mut cfg = server.config("classify", "");
    cfg.check_on_connect = false;
    cfg.attempt_timeout = std::time::Duration::from_millis(500);
    let store = S3Store::connect(cfg).await.unwrap();
    store
        .put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap();

    type Expect = fn(&StoreError) -> bool;
    let cases: Vec<(InjectedError, Expect)> = vec![
        (InjectedError::new(503, "SlowDown"), |e| {
            matches!(e, StoreError::Transient { .. })
        }),
        (InjectedError::new(500, "InternalError"), |e| {
            matches!(e, StoreError::Transient { .. })
        }),
        (InjectedError::new(429, "TooManyRequests"), |e| {
            matches!(e, StoreError::Transient { .. })
        }),
        (InjectedError::new(403, "AccessDenied"), |e| {
            matches!(e, StoreError::AccessDenied { .. })
        }),
        (InjectedError::new(404, "NoSuchBucket"), |e| {
            matches!(e, StoreError::BucketNotFound { .. })
        }),
        (InjectedError::new(400, "InvalidArgument"), |e| {
            matches!(e, StoreError::Backend { .. })
        }),
        (InjectedError::hang(), |e| {
            matches!(e, StoreError::Transient { .. })
        }),
    ];
    for (injected, expected) in cases {
        let label = format!("{} {}", injected.status, injected.code);
        // A fresh client per case, so the request opens a new connection and meets the fault.
        let mut cfg = server.config("classify", "");
        cfg.check_on_connect = false;
        cfg.attempt_timeout = std::time::Duration::from_millis(500);
        let store = S3Store::connect(cfg).await.unwrap();
        server.fail_next_connections([injected]);
        let err = store.get("k").await.unwrap_err();
        assert!(expected(&err), "{label}: got {err:?}");
    }
    // And the object is still readable once the server behaves.
    assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"v"));
}
