//! The client against the project's file-backed server over a real unix socket and TCP+TLS.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use std::time::Duration;

use cbt_csi::server::{
    FaultPlan, FaultStatus, FileMetadataService, Listen, ServerOptions, TlsIdentity, spawn,
};
use cbt_csi::{
    BlockType, ClientConfig, CsiError, ErrorKind, MetadataClient, MetadataRequest, Query,
};
use common::{client, copy, ext, image, serve_unix, write};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn alloc(id: &str) -> Query {
    Query::CsiAllocated {
        snapshot_id: id.into(),
    }
}

fn delta(base: &str, target: &str) -> Query {
    Query::CsiDelta {
        base_snapshot_id: base.into(),
        target_snapshot_id: target.into(),
    }
}

/// 4 MiB image: data at 0..100 KiB, a zero-filled (allocated) block, data at 1 MiB and the tail.
fn standard_image(dir: &std::path::Path, id: &str) {
    image(
        dir,
        id,
        4 * MIB,
        &[
            (0, vec![1u8; 100 * KIB as usize]),
            (512 * KIB, vec![0u8; 64 * KIB as usize]),
            (MIB + 5, vec![2u8; 10]),
            (4 * MIB - 1, vec![3u8]),
        ],
    );
}

fn opts(dir: &std::path::Path, block: u64, t: BlockType) -> ServerOptions {
    let mut o = ServerOptions::new(dir);
    o.block_size = block;
    o.block_type = t;
    o
}

#[tokio::test]
async fn allocated_over_unix_socket_fixed_and_variable() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "snap-1");
    for t in [BlockType::FixedLength, BlockType::VariableLength] {
        let srv = serve_unix(opts(snaps.path(), 4 * KIB, t), sock.path()).await;
        let c = client(srv.endpoint()).await;
        let r = c
            .collect(MetadataRequest::new(alloc("snap-1")))
            .await
            .unwrap();
        // 100 KiB = 25 blocks; the zero-filled block is not reported.
        assert_eq!(
            r.extents,
            vec![
                ext(0, 100 * KIB),
                ext(MIB, 4 * KIB),
                ext(4 * MIB - 4 * KIB, 4 * KIB)
            ]
        );
        assert_eq!(r.summary.volume_capacity_bytes, Some(4 * MIB));
        assert_eq!(r.summary.block_type, Some(t));
        assert_eq!(r.summary.bytes, 108 * KIB);
        let expected_tuples = if t == BlockType::FixedLength { 27 } else { 3 };
        assert_eq!(r.summary.tuples_received, expected_tuples);
        if t == BlockType::FixedLength {
            assert_eq!(r.summary.block_size, Some(4 * KIB));
        }
        let set = r.to_range_set();
        assert_eq!(set.total_bytes(), 108 * KIB);
        srv.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn paging_edge_cases() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    // 10 allocated 4 KiB blocks, each separated by a hole, in a volume whose size is not a
    // multiple of the block size; the last (partial) block holds data too.
    let size = 100 * 4 * KIB + 1000;
    let mut writes: Vec<(u64, Vec<u8>)> =
        (0..9).map(|i| (i * 8 * 4 * KIB, vec![7u8; 10])).collect();
    writes.push((size - 1, vec![1u8]));
    image(snaps.path(), "paged", size, &writes);
    image(snaps.path(), "empty", 8 * MIB, &[]);
    let mut o = opts(snaps.path(), 4 * KIB, BlockType::FixedLength);
    o.max_results = 4;
    let srv = serve_unix(o, sock.path()).await;
    let c = client(srv.endpoint()).await;

    let full = c
        .collect(MetadataRequest::new(alloc("paged")))
        .await
        .unwrap();
    let mut expected: Vec<_> = (0..9).map(|i| ext(i * 32 * KIB, 4 * KIB)).collect();
    expected.push(ext(100 * 4 * KIB, 1000)); // last partial block, clipped to the capacity
    assert_eq!(full.extents, expected);
    // Server cap of 4 per message: 10 tuples -> 3 messages.
    assert_eq!(full.summary.messages, 3);

    // Requests above the server cap (4) get the cap.
    for (max, messages) in [(1u32, 10u64), (2, 5), (3, 4), (5, 3), (1000, 3)] {
        let r = c
            .collect(MetadataRequest::new(alloc("paged")).max_results(max))
            .await
            .unwrap();
        assert_eq!(r.extents, expected, "max_results {max}");
        assert_eq!(r.summary.messages, messages, "max_results {max}");
    }

    // Starting inside a block: the block containing the offset is clipped to the offset.
    let r = c
        .collect(MetadataRequest::new(alloc("paged")).starting_at(32 * KIB + 100))
        .await
        .unwrap();
    assert_eq!(r.extents.first(), Some(&ext(32 * KIB + 100, 4 * KIB - 100)));
    assert_eq!(r.extents.len(), 9);
    // Starting exactly at capacity is valid and empty.
    let r = c
        .collect(MetadataRequest::new(alloc("paged")).starting_at(size))
        .await
        .unwrap();
    assert!(r.extents.is_empty());

    // Empty volume: a clean stream with no ranges, but capacity and type are known.
    let r = c
        .collect(MetadataRequest::new(alloc("empty")).max_results(1))
        .await
        .unwrap();
    assert!(r.extents.is_empty());
    assert_eq!(r.summary.volume_capacity_bytes, Some(8 * MIB));
    assert_eq!(r.summary.block_type, Some(BlockType::FixedLength));
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn delta_over_unix_socket() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "s1");
    copy(snaps.path(), "s1", "s2");
    write(snaps.path(), "s2", 8 * KIB, &[9u8; 3]); // changed
    write(snaps.path(), "s2", 2 * MIB, &[1u8; 5000]); // new data in a hole (2 blocks)
    write(snaps.path(), "s2", 4 * MIB - 1, &[0u8]); // zeroed
    let srv = serve_unix(
        opts(snaps.path(), 4 * KIB, BlockType::FixedLength),
        sock.path(),
    )
    .await;
    let c = client(srv.endpoint()).await;
    let r = c
        .collect(MetadataRequest::new(delta("s1", "s2")).max_results(1))
        .await
        .unwrap();
    assert_eq!(
        r.extents,
        vec![
            ext(8 * KIB, 4 * KIB),
            ext(2 * MIB, 8 * KIB),
            ext(4 * MIB - 4 * KIB, 4 * KIB)
        ]
    );
    let same = c
        .collect(MetadataRequest::new(delta("s1", "s1")))
        .await
        .unwrap();
    assert!(same.extents.is_empty());
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn kubernetes_api_with_token_and_namespaces() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "vs-1");
    copy(snaps.path(), "vs-1", "vs-2");
    write(snaps.path(), "vs-2", 0, &[5u8]);
    for id in ["vs-1", "vs-2"] {
        cbt_csi::server::write_snapshot_meta(
            snaps.path(),
            id,
            &cbt_csi::server::SnapshotMeta {
                volume_id: Some("pvc-a".into()),
                namespace: Some("apps".into()),
                cbt: None,
            },
        )
        .unwrap();
    }
    let mut o = opts(snaps.path(), 64 * KIB, BlockType::VariableLength);
    o.token = Some("s3cret".into());
    let srv = serve_unix(o, sock.path()).await;
    let ep = srv.endpoint().to_string();
    let with_token = MetadataClient::connect(
        ClientConfig::new(&ep)
            .with_token("s3cret")
            .with_retry(common::fast_retry()),
    )
    .await
    .unwrap();
    let q = Query::K8sAllocated {
        namespace: "apps".into(),
        snapshot_name: "vs-1".into(),
    };
    let r = with_token
        .collect(MetadataRequest::new(q.clone()))
        .await
        .unwrap();
    assert_eq!(
        r.extents,
        vec![
            ext(0, 128 * KIB),
            ext(MIB, 64 * KIB),
            ext(4 * MIB - 64 * KIB, 64 * KIB)
        ]
    );
    let d = Query::K8sDelta {
        namespace: "apps".into(),
        base_snapshot_id: "vs-1".into(),
        target_snapshot_name: "vs-2".into(),
    };
    let r = with_token.collect(MetadataRequest::new(d)).await.unwrap();
    assert_eq!(r.extents, vec![ext(0, 64 * KIB)]);

    // The CSI API on the same server takes the token as bearer metadata.
    let r = with_token
        .collect(MetadataRequest::new(alloc("vs-1")))
        .await
        .unwrap();
    assert_eq!(r.summary.bytes, 256 * KIB);

    let wrong = MetadataClient::connect(ClientConfig::new(&ep).with_token("nope"))
        .await
        .unwrap();
    assert!(matches!(
        wrong.collect(MetadataRequest::new(q.clone())).await,
        Err(CsiError::Unauthenticated { .. })
    ));
    let none = common::client(&ep).await;
    let e = none.collect(MetadataRequest::new(q)).await.unwrap_err();
    assert!(matches!(e, CsiError::InvalidArgument { .. }), "{e}");
    assert!(matches!(
        none.collect(MetadataRequest::new(alloc("vs-1"))).await,
        Err(CsiError::Unauthenticated { .. })
    ));

    // A VolumeSnapshot in another namespace is "not found or not ready": UNAVAILABLE from the
    // sidecar, mapped (after retries) to SnapshotUnavailable with guidance.
    let other = Query::K8sAllocated {
        namespace: "default".into(),
        snapshot_name: "vs-1".into(),
    };
    let e = with_token
        .collect(MetadataRequest::new(other))
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::SnapshotUnavailable { .. }), "{e}");
    assert!(e.to_string().contains("readyToUse"));
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn tls_with_private_ca_and_server_name_override() {
    let snaps = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "snap-1");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tls = TlsIdentity {
        cert_pem: std::fs::read(fixtures.join("server.pem")).unwrap(),
        key_pem: std::fs::read(fixtures.join("server.key")).unwrap(),
    };
    let ca = std::fs::read(fixtures.join("ca.pem")).unwrap();
    let svc =
        FileMetadataService::new(opts(snaps.path(), 64 * KIB, BlockType::VariableLength)).unwrap();
    let srv = spawn(svc, Listen::Tcp("127.0.0.1:0".parse().unwrap()), Some(tls))
        .await
        .unwrap();
    let addr = srv.local_addr().unwrap();
    assert!(srv.endpoint().starts_with("https://"));

    // Verified by IP SAN.
    let c = MetadataClient::connect(
        ClientConfig::new(format!("https://{addr}")).with_ca_pem(ca.clone()),
    )
    .await
    .unwrap();
    let r = c
        .collect(MetadataRequest::new(alloc("snap-1")))
        .await
        .unwrap();
    assert_eq!(r.summary.bytes, 256 * KIB);

    // Bare host:port (as in SnapshotMetadataService.spec.address) with a server name override,
    // as used when connecting through a port-forward to a Service DNS name.
    let c = MetadataClient::connect(
        ClientConfig::new(format!("{addr}"))
            .with_ca_pem(ca.clone())
            .with_server_name("snapshot-metadata.cbt-test.svc"),
    )
    .await
    .unwrap();
    assert_eq!(
        c.collect(MetadataRequest::new(alloc("snap-1")))
            .await
            .unwrap()
            .summary
            .bytes,
        256 * KIB
    );

    // Wrong name, wrong CA, garbage CA: refused.
    let bad_name = MetadataClient::connect(
        ClientConfig::new(format!("https://{addr}"))
            .with_ca_pem(ca.clone())
            .with_server_name("evil.example.com"),
    )
    .await;
    assert!(
        matches!(bad_name, Err(CsiError::Tls { .. })),
        "{bad_name:?}"
    );
    let other = std::fs::read(fixtures.join("other-ca.pem")).unwrap();
    let bad_ca =
        MetadataClient::connect(ClientConfig::new(format!("https://{addr}")).with_ca_pem(other))
            .await;
    assert!(matches!(bad_ca, Err(CsiError::Tls { .. })), "{bad_ca:?}");
    let garbage = MetadataClient::connect(
        ClientConfig::new(format!("https://{addr}")).with_ca_pem(b"not a pem".to_vec()),
    )
    .await;
    assert!(matches!(garbage, Err(CsiError::Tls { .. })));
    srv.shutdown().await.unwrap();

    // Paging and resume over TLS: one tuple per message, two streams dropped mid-way.
    let mut o = opts(snaps.path(), 4 * KIB, BlockType::FixedLength);
    o.fault = Some(FaultPlan {
        drop_after_messages: 5,
        times: 2,
        status: FaultStatus::Unavailable,
    });
    let svc = FileMetadataService::new(o).unwrap();
    let tls = TlsIdentity {
        cert_pem: std::fs::read(fixtures.join("server.pem")).unwrap(),
        key_pem: std::fs::read(fixtures.join("server.key")).unwrap(),
    };
    let srv = spawn(svc, Listen::Tcp("127.0.0.1:0".parse().unwrap()), Some(tls))
        .await
        .unwrap();
    let c = MetadataClient::connect(
        ClientConfig::new(srv.endpoint())
            .with_ca_pem(ca)
            .with_retry(common::fast_retry()),
    )
    .await
    .unwrap();
    let r = c
        .collect(MetadataRequest::new(alloc("snap-1")).max_results(1))
        .await
        .unwrap();
    assert_eq!(
        r.extents,
        vec![
            ext(0, 100 * KIB),
            ext(MIB, 4 * KIB),
            ext(4 * MIB - 4 * KIB, 4 * KIB)
        ]
    );
    assert_eq!(r.summary.attempts, 3);
    assert_eq!(r.summary.tuples_received, 27, "no tuple received twice");
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn resume_after_dropped_streams_loses_and_duplicates_nothing() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    // 64 allocated blocks separated by holes.
    let writes: Vec<(u64, Vec<u8>)> = (0..64)
        .map(|i| (i * 2 * 4 * KIB, vec![1u8; 4096]))
        .collect();
    image(snaps.path(), "s", 64 * 2 * 4 * KIB, &writes);
    copy(snaps.path(), "s", "t");
    for i in (0..64).step_by(3) {
        write(snaps.path(), "t", i * 2 * 4 * KIB + 7, &[2u8]);
    }
    for q in [alloc("s"), delta("s", "t")] {
        for t in [BlockType::FixedLength, BlockType::VariableLength] {
            let baseline = {
                let srv = serve_unix(opts(snaps.path(), 4 * KIB, t), sock.path()).await;
                let r = client(srv.endpoint())
                    .await
                    .collect(MetadataRequest::new(q.clone()).max_results(3))
                    .await
                    .unwrap();
                srv.shutdown().await.unwrap();
                r
            };
            let mut o = opts(snaps.path(), 4 * KIB, t);
            o.fault = Some(FaultPlan {
                drop_after_messages: 2,
                times: 3,
                status: FaultStatus::Unavailable,
            });
            let srv = serve_unix(o, sock.path()).await;
            let c = client(srv.endpoint()).await;
            // Streaming consumer: batches must be strictly increasing and disjoint.
            let mut last_end = 0u64;
            let mut total = 0u64;
            let summary = c
                .for_each_batch(MetadataRequest::new(q.clone()).max_results(3), |b| {
                    for e in &b.extents {
                        assert!(
                            e.offset >= last_end,
                            "overlap or disorder at {e:?} after {last_end}"
                        );
                        last_end = e.end();
                        total += e.len;
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await
                .unwrap();
            assert_eq!(summary.attempts, 4, "{q:?} {t:?}");
            assert_eq!(total, baseline.summary.bytes, "{q:?} {t:?}");
            srv.shutdown().await.unwrap();
        }
    }
}

#[tokio::test]
async fn retries_are_bounded_without_progress() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "s");
    let mut o = opts(snaps.path(), 4 * KIB, BlockType::FixedLength);
    o.fault = Some(FaultPlan {
        drop_after_messages: 0,
        times: 1000,
        status: FaultStatus::Unavailable,
    });
    let srv = serve_unix(o, sock.path()).await;
    let c = client(srv.endpoint()).await;
    let e = c
        .collect(MetadataRequest::new(alloc("s")))
        .await
        .unwrap_err();
    match &e {
        CsiError::RetriesExhausted {
            attempts,
            code,
            resume_offset,
            ..
        } => {
            assert_eq!(*attempts, 4);
            assert_eq!(*code, tonic::Code::Unavailable);
            assert_eq!(*resume_offset, 0);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::Transient);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn server_status_codes_map_to_typed_errors() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "a");
    copy(snaps.path(), "a", "b");
    image(snaps.path(), "small", MIB, &[]);
    image(snaps.path(), "other-vol", 4 * MIB, &[]);
    image(snaps.path(), "no-cbt", 4 * MIB, &[]);
    let meta = |v: &str, cbt: Option<bool>| cbt_csi::server::SnapshotMeta {
        volume_id: Some(v.into()),
        namespace: None,
        cbt,
    };
    cbt_csi::server::write_snapshot_meta(snaps.path(), "a", &meta("v1", None)).unwrap();
    cbt_csi::server::write_snapshot_meta(snaps.path(), "other-vol", &meta("v2", None)).unwrap();
    cbt_csi::server::write_snapshot_meta(snaps.path(), "no-cbt", &meta("v1", Some(false))).unwrap();
    let srv = serve_unix(
        opts(snaps.path(), 4 * KIB, BlockType::FixedLength),
        sock.path(),
    )
    .await;
    let c = client(srv.endpoint()).await;
    let run = |q: Query, off: u64| {
        let c = c.clone();
        async move {
            c.collect(MetadataRequest::new(q).starting_at(off))
                .await
                .unwrap_err()
        }
    };
    let e = run(alloc("missing"), 0).await;
    assert!(matches!(e, CsiError::SnapshotNotFound { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(matches!(
        run(alloc("../etc/passwd"), 0).await,
        CsiError::InvalidArgument { .. }
    ));
    assert!(matches!(
        run(alloc(""), 0).await,
        CsiError::InvalidArgument { .. }
    ));
    let e = run(alloc("a"), 4 * MIB + 1).await;
    assert!(
        matches!(e, CsiError::OutOfRange { offset, .. } if offset == 4 * MIB + 1),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Usage);
    let e = run(delta("small", "a"), 0).await;
    assert!(matches!(e, CsiError::CbtNotEnabled { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("full backup"));
    assert!(matches!(
        run(delta("no-cbt", "a"), 0).await,
        CsiError::CbtNotEnabled { .. }
    ));
    assert!(matches!(
        run(delta("other-vol", "a"), 0).await,
        CsiError::InvalidArgument { .. }
    ));
    assert!(matches!(
        run(delta("a", "missing"), 0).await,
        CsiError::SnapshotNotFound { .. }
    ));
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn identity_and_health_report_the_snapshot_metadata_service() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    let srv = serve_unix(ServerOptions::new(snaps.path()), sock.path()).await;
    let c = client(srv.endpoint()).await;
    let info = c.plugin_info().await.unwrap();
    assert!(info.snapshot_metadata);
    assert_eq!(info.name, "file.cbt.example.com");
    assert!(c.health("").await.unwrap());
    assert!(c.health("snapshotmetadata.SnapshotMetadata").await.unwrap());
    assert!(!c.health("no.such.Service").await.unwrap());
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn connect_errors_are_typed() {
    let e = MetadataClient::connect(ClientConfig::new("unix:///nonexistent/dir/sock"))
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::Connect { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::Transient);
    let e = MetadataClient::connect(ClientConfig::new("gopher://x:1"))
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::InvalidEndpoint { .. }));
    let e = MetadataClient::connect(ClientConfig::new("unix:///x").with_ca_pem(b"x".to_vec()))
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::Tls { .. }));
    let _ = Duration::ZERO;
}

#[derive(Debug, Default)]
struct CountingToken(std::sync::atomic::AtomicU32);

#[async_trait::async_trait]
impl cbt_csi::client::TokenSource for CountingToken {
    async fn token(&self) -> Result<String, String> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok("tok".into())
    }
}

#[tokio::test]
async fn a_fresh_token_is_fetched_for_every_attempt_and_consumer_errors_cancel() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    let writes: Vec<(u64, Vec<u8>)> = (0..10).map(|i| (i * 8 * KIB, vec![1u8; 10])).collect();
    image(snaps.path(), "s", 80 * KIB, &writes);
    let mut o = opts(snaps.path(), 4 * KIB, BlockType::FixedLength);
    o.token = Some("tok".into());
    o.fault = Some(FaultPlan {
        drop_after_messages: 1,
        times: 2,
        status: FaultStatus::Unavailable,
    });
    let srv = serve_unix(o, sock.path()).await;
    let tokens = std::sync::Arc::new(CountingToken::default());
    let c = MetadataClient::connect(
        ClientConfig::new(srv.endpoint())
            .with_token_source(tokens.clone())
            .with_retry(common::fast_retry()),
    )
    .await
    .unwrap();
    let r = c
        .collect(MetadataRequest::new(alloc("s")).max_results(2))
        .await
        .unwrap();
    assert_eq!(r.summary.ranges, 10);
    assert_eq!(r.summary.attempts, 3);
    assert_eq!(tokens.0.load(std::sync::atomic::Ordering::SeqCst), 3);

    let e = c
        .for_each_batch(MetadataRequest::new(alloc("s")).max_results(1), |_| {
            Err(std::io::Error::other("disk full"))
        })
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::Consumer { .. }));
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn batches_as_a_futures_stream() {
    use futures::TryStreamExt;
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "s");
    let srv = serve_unix(
        opts(snaps.path(), 4 * KIB, BlockType::FixedLength),
        sock.path(),
    )
    .await;
    let c = client(srv.endpoint()).await;
    let batches: Vec<_> = c
        .stream(MetadataRequest::new(alloc("s")).max_results(5))
        .into_stream()
        .try_collect()
        .await
        .unwrap();
    // 27 blocks, 5 per message.
    assert_eq!(batches.len(), 6);
    assert!(
        batches
            .iter()
            .all(|b| b.capacity == 4 * MIB && b.block_type == BlockType::FixedLength)
    );
    let bytes: u64 = batches.iter().flat_map(|b| &b.extents).map(|e| e.len).sum();
    assert_eq!(bytes, 108 * KIB);
    let e = c
        .stream(MetadataRequest::new(alloc("nope")))
        .into_stream()
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::SnapshotNotFound { .. }));
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn hostile_snapshot_ids_are_rejected_before_touching_the_filesystem() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "s");
    cbt_csi::server::write_snapshot_meta(snaps.path(), "s", &Default::default()).unwrap();
    // A real file next to the snapshot directory that traversal would reach.
    image(
        snaps.path().parent().unwrap(),
        "outside",
        MIB,
        &[(0, vec![1])],
    );
    std::fs::create_dir(snaps.path().join("a-directory")).unwrap();
    let srv = serve_unix(
        opts(snaps.path(), 4 * KIB, BlockType::FixedLength),
        sock.path(),
    )
    .await;
    // The Kubernetes API requires some token even when the server checks none.
    let c = MetadataClient::connect(
        ClientConfig::new(srv.endpoint())
            .with_token("t")
            .with_retry(common::fast_retry()),
    )
    .await
    .unwrap();
    let outside = format!(
        "../{}",
        snaps.path().parent().unwrap().join("outside").display()
    );
    let long = "x".repeat(129);
    let hostile = [
        "../outside",
        outside.as_str(),
        "/etc/passwd",
        "a/b",
        ".",
        "..",
        ".hidden",
        "s.meta.json",
        "s\0",
        "s\n",
        "s ",
        long.as_str(),
    ];
    for id in hostile {
        let e = c
            .collect(MetadataRequest::new(alloc(id)))
            .await
            .unwrap_err();
        assert!(matches!(e, CsiError::InvalidArgument { .. }), "{id:?}: {e}");
        let e = c
            .collect(MetadataRequest::new(delta(id, "s")))
            .await
            .unwrap_err();
        assert!(matches!(e, CsiError::InvalidArgument { .. }), "{id:?}: {e}");
        let e = c
            .collect(MetadataRequest::new(delta("s", id)))
            .await
            .unwrap_err();
        assert!(matches!(e, CsiError::InvalidArgument { .. }), "{id:?}: {e}");
        // Kubernetes API: a name that cannot exist is an unavailable VolumeSnapshot, as the
        // sidecar answers; the base handle is checked like a CSI id.
        let e = c
            .collect(MetadataRequest::new(Query::K8sAllocated {
                namespace: "default".into(),
                snapshot_name: id.into(),
            }))
            .await
            .unwrap_err();
        assert!(
            matches!(e, CsiError::SnapshotUnavailable { .. }),
            "{id:?}: {e}"
        );
        let e = c
            .collect(MetadataRequest::new(Query::K8sDelta {
                namespace: "default".into(),
                base_snapshot_id: id.into(),
                target_snapshot_name: "s".into(),
            }))
            .await
            .unwrap_err();
        assert!(matches!(e, CsiError::InvalidArgument { .. }), "{id:?}: {e}");
    }
    // Well-formed but absent (the longest legal id, a directory): NOT_FOUND.
    for id in ["x".repeat(128), "a-directory".to_string()] {
        let e = c
            .collect(MetadataRequest::new(alloc(&id)))
            .await
            .unwrap_err();
        assert!(matches!(e, CsiError::SnapshotNotFound { .. }), "{id}: {e}");
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn delta_at_the_edges_of_a_volume_with_a_partial_last_block() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    // 100 blocks of 4 KiB plus a 1000-byte tail, fully written (no holes to skip).
    let size = 100 * 4 * KIB + 1000;
    image(snaps.path(), "a", size, &[(0, vec![3u8; size as usize])]);
    copy(snaps.path(), "a", "b");
    write(snaps.path(), "b", 0, &[4u8]); // first byte
    write(snaps.path(), "b", 4 * KIB - 1, &[4u8]); // last byte of block 0 (same block)
    write(snaps.path(), "b", 4 * KIB, &[4u8]); // first byte of block 1
    write(snaps.path(), "b", 64 * KIB - 1, &[4u8]); // last byte of a scan window
    write(snaps.path(), "b", size - 1, &[4u8]); // last byte of the volume
    for t in [BlockType::FixedLength, BlockType::VariableLength] {
        let mut o = opts(snaps.path(), 4 * KIB, t);
        o.window = 64 * KIB;
        let srv = serve_unix(o, sock.path()).await;
        let c = client(srv.endpoint()).await;
        let r = c
            .collect(MetadataRequest::new(delta("a", "b")).max_results(1))
            .await
            .unwrap();
        assert_eq!(
            r.extents,
            vec![
                ext(0, 8 * KIB),
                ext(60 * KIB, 4 * KIB),
                ext(100 * 4 * KIB, 1000)
            ],
            "{t:?}"
        );
        assert_eq!(r.summary.volume_capacity_bytes, Some(size));
        // From inside the partial last block: only its tail, clipped to the offset.
        let r = c
            .collect(MetadataRequest::new(delta("a", "b")).starting_at(size - 10))
            .await
            .unwrap();
        assert_eq!(r.extents, vec![ext(size - 10, 10)], "{t:?}");
        // From the capacity itself: a clean, empty answer; one byte further: OUT_OF_RANGE.
        let r = c
            .collect(MetadataRequest::new(delta("a", "b")).starting_at(size))
            .await
            .unwrap();
        assert!(r.extents.is_empty());
        let e = c
            .collect(MetadataRequest::new(delta("a", "b")).starting_at(size + 1))
            .await
            .unwrap_err();
        assert!(matches!(e, CsiError::OutOfRange { .. }), "{e}");
        // Base and target swapped: the same blocks differ.
        let r = c
            .collect(MetadataRequest::new(delta("b", "a")))
            .await
            .unwrap();
        assert_eq!(r.summary.bytes, 12 * KIB + 1000);
        srv.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn csi_secrets_are_sent_and_checked() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    standard_image(snaps.path(), "s");
    copy(snaps.path(), "s", "t");
    let mut o = opts(snaps.path(), 64 * KIB, BlockType::VariableLength);
    o.secrets = Some([("userKey".to_string(), "k3y".to_string())].into());
    let srv = serve_unix(o, sock.path()).await;
    let c = client(srv.endpoint()).await;
    let secrets = |v: &str| -> std::collections::HashMap<String, String> {
        [
            ("userID".to_string(), "admin".to_string()),
            ("userKey".to_string(), v.to_string()),
        ]
        .into()
    };
    let r = c
        .collect(MetadataRequest::new(alloc("s")).with_secrets(secrets("k3y")))
        .await
        .unwrap();
    assert_eq!(r.summary.bytes, 256 * KIB);
    let r = c
        .collect(MetadataRequest::new(delta("s", "t")).with_secrets(secrets("k3y")))
        .await
        .unwrap();
    assert!(r.extents.is_empty());
    let e = c
        .collect(MetadataRequest::new(alloc("s")))
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("userKey"), "{e}");
    let e = c
        .collect(MetadataRequest::new(delta("s", "t")).with_secrets(secrets("wrong")))
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::PermissionDenied { .. }), "{e}");
    // Secret values never appear when a request is logged.
    let dbg = format!(
        "{:?}",
        MetadataRequest::new(alloc("s")).with_secrets(secrets("k3y"))
    );
    assert!(
        dbg.contains("userKey") && !dbg.contains("k3y") && !dbg.contains("admin"),
        "{dbg}"
    );
    srv.shutdown().await.unwrap();
}

/// 64 allocated 4 KiB blocks separated by holes in "s"; "t" changes every third one. Both carry
/// Kubernetes metadata (namespace "apps") so the sidecar API can name them too.
fn scattered_pair(dir: &std::path::Path) {
    let writes: Vec<(u64, Vec<u8>)> = (0..64)
        .map(|i| (i * 2 * 4 * KIB, vec![1u8; 4096]))
        .collect();
    image(dir, "s", 64 * 2 * 4 * KIB, &writes);
    copy(dir, "s", "t");
    for i in (0..64).step_by(3) {
        write(dir, "t", i * 2 * 4 * KIB + 7, &[2u8]);
    }
    for id in ["s", "t"] {
        cbt_csi::server::write_snapshot_meta(
            dir,
            id,
            &cbt_csi::server::SnapshotMeta {
                volume_id: Some("pvc-a".into()),
                namespace: Some("apps".into()),
                cbt: None,
            },
        )
        .unwrap();
    }
}

/// Server options requiring the token "tok" (the Kubernetes API always carries one).
fn tok(mut o: ServerOptions) -> ServerOptions {
    o.token = Some("tok".into());
    o
}

/// A fast-retrying client sending the token "tok".
async fn tok_client(endpoint: &str) -> MetadataClient {
    MetadataClient::connect(
        ClientConfig::new(endpoint)
            .with_token("tok")
            .with_retry(common::fast_retry()),
    )
    .await
    .unwrap()
}

/// Every query flavour over the scattered pair: CSI and Kubernetes API, allocated and delta.
fn all_queries() -> Vec<Query> {
    vec![
        alloc("s"),
        delta("s", "t"),
        Query::K8sAllocated {
            namespace: "apps".into(),
            snapshot_name: "s".into(),
        },
        Query::K8sDelta {
            namespace: "apps".into(),
            base_snapshot_id: "s".into(),
            target_snapshot_name: "t".into(),
        },
    ]
}

#[tokio::test]
async fn a_stream_cut_at_the_servers_time_limit_is_resumed_exactly() {
    // The Kubernetes sidecar ends every call at its stream time limit with DEADLINE_EXCEEDED
    // after the messages sent so far. Here every stream is cut after 2 messages, so a listing
    // of N messages takes about N/2 attempts, all of which make progress.
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    scattered_pair(snaps.path());
    for q in all_queries() {
        for t in [BlockType::FixedLength, BlockType::VariableLength] {
            let baseline = {
                let srv = serve_unix(tok(opts(snaps.path(), 4 * KIB, t)), sock.path()).await;
                let r = tok_client(srv.endpoint())
                    .await
                    .collect(MetadataRequest::new(q.clone()).max_results(1))
                    .await
                    .unwrap();
                srv.shutdown().await.unwrap();
                r
            };
            assert!(
                baseline.summary.messages >= 6,
                "{q:?} {t:?}: enough messages to cut"
            );
            let mut o = tok(opts(snaps.path(), 4 * KIB, t));
            o.fault = Some(FaultPlan {
                drop_after_messages: 2,
                times: u32::MAX,
                status: FaultStatus::DeadlineExceeded,
            });
            let srv = serve_unix(o, sock.path()).await;
            // A client deadline far in the future: the cuts must not be taken for it.
            let c = MetadataClient::connect(
                ClientConfig::new(srv.endpoint())
                    .with_token("tok")
                    .with_retry(common::fast_retry())
                    .with_deadline(Duration::from_secs(600)),
            )
            .await
            .unwrap();
            let mut last_end = 0u64;
            let mut streamed = Vec::new();
            let summary = c
                .for_each_batch(MetadataRequest::new(q.clone()).max_results(1), |b| {
                    for e in &b.extents {
                        assert!(e.offset >= last_end, "{e:?} repeats or precedes {last_end}");
                        last_end = e.end();
                        streamed.push(*e);
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await
                .unwrap();
            cbt_csi::ranges::merge_extents(&mut streamed);
            assert_eq!(streamed, baseline.extents, "{q:?} {t:?}");
            assert_eq!(summary.bytes, baseline.summary.bytes, "{q:?} {t:?}");
            // More cuts than the retry policy's attempts: progress resets the count.
            let cuts = summary.attempts - 1;
            assert!(
                cuts >= common::fast_retry().max_attempts,
                "{q:?} {t:?}: {cuts} cuts"
            );
            let collected = c
                .collect(MetadataRequest::new(q.clone()).max_results(1))
                .await
                .unwrap();
            assert_eq!(collected.extents, baseline.extents, "{q:?} {t:?}");
            srv.shutdown().await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_time_limit_that_cuts_before_any_message_fails_after_bounded_attempts() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    scattered_pair(snaps.path());
    for q in all_queries() {
        let mut o = tok(opts(snaps.path(), 4 * KIB, BlockType::FixedLength));
        o.fault = Some(FaultPlan {
            drop_after_messages: 0,
            times: u32::MAX,
            status: FaultStatus::DeadlineExceeded,
        });
        let srv = serve_unix(o, sock.path()).await;
        let c = tok_client(srv.endpoint()).await;
        let e = c
            .collect(MetadataRequest::new(q.clone()))
            .await
            .unwrap_err();
        match &e {
            CsiError::ServerTimeLimit {
                attempts,
                resume_offset,
                ..
            } => {
                assert_eq!(*attempts, common::fast_retry().max_attempts, "{q:?}");
                assert_eq!(*resume_offset, 0);
            }
            other => panic!("{q:?}: unexpected {other:?}"),
        }
        assert_eq!(e.kind(), ErrorKind::Transient);
        srv.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_real_stream_time_limit_is_resumed_to_the_same_answer() {
    // The time-based limit (serve-metadata --max-stream-secs) rather than the message-count
    // hook: a zero limit lets every stream deliver nothing, a tiny one cuts at some point that
    // depends on timing; either way the answer is exact or the failure names the server's limit.
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    scattered_pair(snaps.path());
    let q = delta("s", "t");
    let baseline = {
        let srv = serve_unix(
            opts(snaps.path(), 4 * KIB, BlockType::FixedLength),
            sock.path(),
        )
        .await;
        let r = client(srv.endpoint())
            .await
            .collect(MetadataRequest::new(q.clone()).max_results(1))
            .await
            .unwrap();
        srv.shutdown().await.unwrap();
        r
    };
    let mut o = opts(snaps.path(), 4 * KIB, BlockType::FixedLength);
    o.max_stream_duration = Some(Duration::ZERO);
    let srv = serve_unix(o, sock.path()).await;
    let e = client(srv.endpoint())
        .await
        .collect(MetadataRequest::new(q.clone()).max_results(1))
        .await
        .unwrap_err();
    assert!(matches!(e, CsiError::ServerTimeLimit { .. }), "{e:?}");
    srv.shutdown().await.unwrap();

    let mut o = opts(snaps.path(), 4 * KIB, BlockType::FixedLength);
    o.max_stream_duration = Some(Duration::from_millis(5));
    let srv = serve_unix(o, sock.path()).await;
    let c = MetadataClient::connect(ClientConfig::new(srv.endpoint()).with_retry(
        cbt_csi::RetryPolicy {
            max_attempts: 1000,
            ..common::fast_retry()
        },
    ))
    .await
    .unwrap();
    let r = c
        .collect(MetadataRequest::new(q).max_results(1))
        .await
        .unwrap();
    assert_eq!(r.extents, baseline.extents);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn calls_beyond_the_servers_limit_are_refused_until_one_ends() {
    use cbt_csi::pb::csi::snapshot_metadata_server::SnapshotMetadata;
    let snaps = tempfile::tempdir().unwrap();
    scattered_pair(snaps.path());
    let mut o = opts(snaps.path(), 4 * KIB, BlockType::FixedLength);
    o.max_concurrent_calls = 1;
    let svc = FileMetadataService::new(o).unwrap();
    // The service itself, without a network in between: a response stream that nobody reads is
    // a call in progress (over a connection, flow-control buffers could let it finish early).
    let call = || {
        tonic::Request::new(cbt_csi::pb::csi::GetMetadataAllocatedRequest {
            snapshot_id: "s".into(),
            starting_offset: 0,
            max_results: 1,
            secrets: Default::default(),
        })
    };
    let first = svc.get_metadata_allocated(call()).await.unwrap();
    let refused = svc.get_metadata_allocated(call()).await.err().unwrap();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    // The delta call shares the limit.
    let delta = svc
        .get_metadata_delta(tonic::Request::new(
            cbt_csi::pb::csi::GetMetadataDeltaRequest {
                base_snapshot_id: "s".into(),
                target_snapshot_id: "t".into(),
                starting_offset: 0,
                max_results: 0,
                secrets: Default::default(),
            },
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(delta.code(), tonic::Code::ResourceExhausted);
    // When the first call's stream is gone, the next call is admitted.
    drop(first);
    assert!(svc.get_metadata_allocated(call()).await.is_ok());
}

#[tokio::test]
async fn connections_beyond_the_servers_limit_are_closed_until_one_ends() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    scattered_pair(snaps.path());
    let mut o = opts(snaps.path(), 4 * KIB, BlockType::FixedLength);
    o.max_connections = 1;
    let srv = serve_unix(o, sock.path()).await;
    let alloc = || {
        MetadataRequest::new(Query::CsiAllocated {
            snapshot_id: "s".into(),
        })
    };
    // The first client holds the only connection and is served.
    let first = common::client(srv.endpoint()).await;
    let expected = first.collect(alloc()).await.unwrap();
    assert_eq!(expected.extents.len(), 64);
    // A second one is closed as soon as it connects, however often it retries.
    let second = match MetadataClient::connect(
        ClientConfig::new(srv.endpoint()).with_retry(common::fast_retry()),
    )
    .await
    {
        Ok(c) => Some(c.collect(alloc()).await),
        Err(e) => {
            assert!(matches!(e, CsiError::Connect { .. }), "{e}");
            None
        }
    };
    if let Some(r) = second {
        assert!(r.is_err(), "a connection beyond the limit was served");
    }
    // The first connection still works; once it is gone, a new client is admitted.
    assert_eq!(first.collect(alloc()).await.unwrap(), expected);
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let third = MetadataClient::connect(
            ClientConfig::new(srv.endpoint()).with_retry(common::fast_retry()),
        )
        .await;
        if let Ok(c) = third
            && let Ok(r) = c.collect(alloc()).await
        {
            assert_eq!(r, expected);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the released connection permit was never reused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.shutdown().await.unwrap();
}
