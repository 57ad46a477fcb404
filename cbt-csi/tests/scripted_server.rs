//! The client against tiny scripted servers: sloppy drivers, protocol violations, every status
//! code, deadlines, a real transport cut, and a 1,000,000-range stream in bounded memory.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cbt_csi::pb::csi::{self, snapshot_metadata_server::SnapshotMetadata};
use cbt_csi::{ClientConfig, CsiError, ErrorKind, MetadataClient, MetadataRequest, Query};
use common::{ext, fast_retry};
use futures::Stream;
use tonic::{Request, Response, Status};

type Msgs = Pin<Box<dyn Stream<Item = Result<csi::GetMetadataAllocatedResponse, Status>> + Send>>;
type Script = Arc<dyn Fn(i64) -> Result<Msgs, Status> + Send + Sync>;

/// A CSI SnapshotMetadata server whose answers come from a closure of the starting offset.
#[derive(Clone)]
struct Scripted {
    script: Script,
}

fn to_delta(m: csi::GetMetadataAllocatedResponse) -> csi::GetMetadataDeltaResponse {
    csi::GetMetadataDeltaResponse {
        block_metadata_type: m.block_metadata_type,
        volume_capacity_bytes: m.volume_capacity_bytes,
        block_metadata: m.block_metadata,
    }
}

#[tonic::async_trait]
impl SnapshotMetadata for Scripted {
    type GetMetadataAllocatedStream = Msgs;
    type GetMetadataDeltaStream =
        Pin<Box<dyn Stream<Item = Result<csi::GetMetadataDeltaResponse, Status>> + Send>>;

    async fn get_metadata_allocated(
        &self,
        request: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        Ok(Response::new((self.script)(
            request.into_inner().starting_offset,
        )?))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        use futures::StreamExt;
        let s = (self.script)(request.into_inner().starting_offset)?;
        Ok(Response::new(Box::pin(s.map(|r| r.map(to_delta)))))
    }
}

fn msg(t: i32, cap: i64, tuples: &[(i64, i64)]) -> csi::GetMetadataAllocatedResponse {
    csi::GetMetadataAllocatedResponse {
        block_metadata_type: t,
        volume_capacity_bytes: cap,
        block_metadata: tuples
            .iter()
            .map(|&(o, s)| csi::BlockMetadata {
                byte_offset: o,
                size_bytes: s,
            })
            .collect(),
    }
}

fn fixed(msgs: Vec<Result<csi::GetMetadataAllocatedResponse, Status>>) -> Script {
    Arc::new(move |_| Ok(Box::pin(futures::stream::iter(msgs.clone())) as Msgs))
}

struct Served {
    endpoint: String,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn serve(script: Script) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(csi::snapshot_metadata_server::SnapshotMetadataServer::new(
                Scripted { script },
            ))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.await;
            }),
    );
    Served {
        endpoint: format!("unix://{}", path.display()),
        _dir: dir,
        shutdown: Some(tx),
    }
}

fn alloc() -> MetadataRequest {
    MetadataRequest::new(Query::CsiAllocated {
        snapshot_id: "snap".into(),
    })
}

fn delta() -> MetadataRequest {
    MetadataRequest::new(Query::CsiDelta {
        base_snapshot_id: "a".into(),
        target_snapshot_id: "b".into(),
    })
}

#[tokio::test]
async fn sloppy_driver_tuples_are_normalized() {
    let s = serve(fixed(vec![
        Ok(msg(2, 1000, &[(500, 100), (0, 50), (20, 100)])),
        Ok(msg(2, 1000, &[(550, 100), (990, 50)])), // overlaps previous; last runs past capacity
        Ok(msg(2, 1000, &[(100, 50)])),             // out of order, partly new
        Ok(msg(2, 1000, &[])),
    ]))
    .await;
    let c = common::client(&s.endpoint).await;
    let r = c.collect(alloc()).await.unwrap();
    assert_eq!(r.extents, vec![ext(0, 150), ext(500, 150), ext(990, 10)]);
    assert_eq!(r.summary.out_of_order_tuples, 1);
    assert_eq!(r.summary.bytes, 310);
    assert_eq!(r.summary.tuples_received, 6);
}

#[tokio::test]
async fn a_stream_without_any_message_is_empty_with_unknown_capacity() {
    // Legal: a clean end-of-stream with no message says "nothing allocated/changed", but it
    // carries no capacity; reporting 0 would let a backup record a zero-byte volume.
    let s = serve(fixed(vec![])).await;
    let c = common::client(&s.endpoint).await;
    for req in [alloc(), delta()] {
        let r = c.collect(req).await.unwrap();
        assert!(r.extents.is_empty());
        assert_eq!(r.summary.volume_capacity_bytes, None);
        assert_eq!(r.summary.block_type, None);
        assert_eq!(r.summary.messages, 0);
    }
    let json = serde_json::to_value(c.collect(alloc()).await.unwrap().summary).unwrap();
    assert!(json["volume_capacity_bytes"].is_null(), "{json}");
}

#[tokio::test]
async fn protocol_violations_abort_the_call() {
    let cases = vec![
        (
            "type change",
            vec![Ok(msg(1, 1000, &[(0, 10)])), Ok(msg(2, 1000, &[(10, 10)]))],
        ),
        (
            "capacity change",
            vec![Ok(msg(2, 1000, &[(0, 10)])), Ok(msg(2, 2000, &[(10, 10)]))],
        ),
        ("negative offset", vec![Ok(msg(2, 1000, &[(-5, 10)]))]),
        ("zero size", vec![Ok(msg(2, 1000, &[(5, 0)]))]),
        ("beyond capacity", vec![Ok(msg(2, 1000, &[(1000, 10)]))]),
        ("unknown type", vec![Ok(msg(0, 1000, &[(0, 10)]))]),
        (
            "fixed size change",
            vec![Ok(msg(1, 1000, &[(0, 10), (10, 20)]))],
        ),
    ];
    for (name, msgs) in cases {
        let s = serve(fixed(msgs)).await;
        let e = common::client(&s.endpoint)
            .await
            .collect(alloc())
            .await
            .unwrap_err();
        assert!(
            matches!(e, CsiError::ProtocolViolation { .. }),
            "{name}: {e}"
        );
        assert_eq!(e.kind(), ErrorKind::Protocol, "{name}");
    }
}

#[tokio::test]
async fn every_status_maps_to_a_typed_error() {
    use tonic::Code;
    type Check = fn(&CsiError) -> bool;
    let cases: Vec<(Code, bool, Check)> = vec![
        (Code::InvalidArgument, false, |e| {
            matches!(e, CsiError::InvalidArgument { .. })
        }),
        (Code::NotFound, false, |e| {
            matches!(e, CsiError::SnapshotNotFound { .. })
        }),
        (Code::Unauthenticated, false, |e| {
            matches!(e, CsiError::Unauthenticated { .. })
        }),
        (Code::PermissionDenied, false, |e| {
            matches!(e, CsiError::PermissionDenied { .. })
        }),
        (Code::OutOfRange, false, |e| {
            matches!(e, CsiError::OutOfRange { .. })
        }),
        (Code::FailedPrecondition, true, |e| {
            matches!(e, CsiError::CbtNotEnabled { .. })
        }),
        (Code::FailedPrecondition, false, |e| {
            matches!(e, CsiError::FailedPrecondition { .. })
        }),
        (Code::Unimplemented, false, |e| {
            matches!(e, CsiError::Unimplemented { .. })
        }),
        (Code::AlreadyExists, false, |e| {
            matches!(
                e,
                CsiError::Status {
                    code: Code::AlreadyExists,
                    ..
                }
            )
        }),
        (Code::DataLoss, false, |e| {
            matches!(
                e,
                CsiError::Status {
                    code: Code::DataLoss,
                    ..
                }
            )
        }),
        (Code::Unavailable, false, |e| {
            matches!(
                e,
                CsiError::RetriesExhausted {
                    code: Code::Unavailable,
                    ..
                }
            )
        }),
        (Code::Internal, false, |e| {
            matches!(
                e,
                CsiError::RetriesExhausted {
                    code: Code::Internal,
                    ..
                }
            )
        }),
        (Code::ResourceExhausted, false, |e| {
            matches!(e, CsiError::RetriesExhausted { .. })
        }),
    ];
    for (code, is_delta, check) in cases {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let s = serve(Arc::new(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Err(Status::new(code, "scripted"))
        }))
        .await;
        let c = common::client(&s.endpoint).await;
        let e = c
            .collect(if is_delta { delta() } else { alloc() })
            .await
            .unwrap_err();
        assert!(check(&e), "{code:?}: {e:?}");
        assert!(
            e.to_string().contains("scripted"),
            "{code:?}: message kept: {e}"
        );
        let expected_calls = if cbt_csi::error::is_retryable(code) {
            fast_retry().max_attempts
        } else {
            1
        };
        assert_eq!(calls.load(Ordering::SeqCst), expected_calls, "{code:?}");
        assert_eq!(
            e.is_non_retryable_service_error(),
            !cbt_csi::error::is_retryable(code)
                && !matches!(code, Code::AlreadyExists | Code::DataLoss),
            "{code:?}"
        );
    }
}

#[tokio::test]
async fn deadline_covers_a_stalled_stream() {
    let s = serve(Arc::new(|_| {
        let first = futures::stream::iter(vec![Ok(msg(2, 1 << 20, &[(0, 4096)]))]);
        use futures::StreamExt;
        Ok(Box::pin(first.chain(futures::stream::pending())) as Msgs)
    }))
    .await;
    let c = MetadataClient::connect(
        ClientConfig::new(&s.endpoint).with_deadline(Duration::from_millis(1000)),
    )
    .await
    .unwrap();
    let e = c.collect(alloc()).await.unwrap_err();
    match &e {
        CsiError::DeadlineExceeded {
            resume_offset,
            capacity,
            attempts,
            ..
        } => {
            assert_eq!(*resume_offset, 4096);
            assert_eq!(*capacity, Some(1 << 20));
            assert_eq!(*attempts, 1);
        }
        other => panic!("unexpected {other:?}"),
    }
    // The message names the limit that fired (ours, not the server's) and how far it got.
    let text = e.to_string();
    assert!(text.contains("this client's own deadline of 1s"), "{text}");
    assert!(text.contains("4096 of 1048576 (0.4%"), "{text}");
}

#[tokio::test]
async fn a_server_deadline_before_ours_is_resumed_not_reported_as_ours() {
    // A scripted driver that ends each stream with DEADLINE_EXCEEDED after one block, and a
    // client whose own deadline is far away: the listing completes.
    let s = serve(Arc::new(|start| {
        let first = start - start % 4096;
        let mut v: Vec<Result<_, Status>> = Vec::new();
        if first < 40960 {
            v.push(Ok(msg(1, 40960, &[(first, 4096)])));
        }
        if first + 4096 < 40960 {
            v.push(Err(Status::deadline_exceeded("stream time limit")));
        }
        Ok(Box::pin(futures::stream::iter(v)) as Msgs)
    }))
    .await;
    let c = MetadataClient::connect(
        ClientConfig::new(&s.endpoint)
            .with_retry(fast_retry())
            .with_deadline(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    for req in [alloc(), delta()] {
        let r = c.collect(req).await.unwrap();
        assert_eq!(r.extents, vec![ext(0, 40960)]);
        assert_eq!(r.summary.attempts, 10);
    }
}

#[tokio::test]
async fn resume_sends_the_same_request_from_the_end_of_the_last_tuple() {
    // Allocated 10-byte blocks at multiples of 20 in [0, 200). The server sends two messages per
    // attempt, then breaks; it restarts at the block slot containing the offset, so it repeats
    // the last block already received (a tuple starting before the offset, as drivers may).
    let offsets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = offsets.clone();
    let s = serve(Arc::new(move |start| {
        seen.lock().unwrap().push(start);
        let first = start - start % 20;
        let mut v: Vec<Result<_, Status>> = (first..200)
            .step_by(20)
            .map(|o| Ok(msg(1, 200, &[(o, 10)])))
            .take(2)
            .collect();
        if first + 40 < 200 {
            v.push(Err(Status::unavailable("connection reset")));
        }
        Ok(Box::pin(futures::stream::iter(v)) as Msgs)
    }))
    .await;
    let c = MetadataClient::connect(ClientConfig::new(&s.endpoint).with_retry(
        cbt_csi::RetryPolicy {
            max_attempts: 2,
            ..fast_retry()
        },
    ))
    .await
    .unwrap();
    let r = c.collect(alloc().starting_at(5)).await.unwrap();
    let expected: Vec<_> = std::iter::once(ext(5, 5))
        .chain((20..200).step_by(20).map(|o| ext(o, 10)))
        .collect();
    assert_eq!(r.extents, expected);
    assert_eq!(
        *offsets.lock().unwrap(),
        vec![5, 30, 50, 70, 90, 110, 130, 150, 170]
    );
}

/// Proxies a unix socket, cutting the first connection after `cut` bytes from the server.
async fn cutting_proxy(upstream: std::path::PathBuf, dir: &std::path::Path, cut: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = dir.join("proxy.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let limit = if first { Some(cut) } else { None };
            first = false;
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::UnixStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut buf = vec![0u8; 512];
                let mut sent = 0usize;
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let n = match limit {
                        Some(l) if sent + n >= l => {
                            let _ = cw.write_all(&buf[..l - sent]).await;
                            break;
                        }
                        _ => n,
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                up.abort();
                let _ = cw.shutdown().await;
            });
        }
    });
    format!("unix://{}", path.display())
}

#[tokio::test]
async fn a_real_transport_cut_is_resumed_without_gaps_or_duplicates() {
    let snaps = tempfile::tempdir().unwrap();
    let sock = tempfile::tempdir().unwrap();
    let writes: Vec<(u64, Vec<u8>)> = (0..200).map(|i| (i * 8192, vec![1u8; 10])).collect();
    common::image(snaps.path(), "s", 200 * 8192, &writes);
    let mut o = cbt_csi::server::ServerOptions::new(snaps.path());
    o.block_size = 4096;
    o.block_type = cbt_csi::BlockType::FixedLength;
    let srv = common::serve_unix(o, sock.path()).await;
    let upstream = srv.endpoint().trim_start_matches("unix://").into();
    let proxy = cutting_proxy(upstream, sock.path(), 3000).await;
    let c = common::client(&proxy).await;
    let mut last_end = 0;
    let summary = c
        .for_each_batch(alloc_of("s").max_results(1), |b| {
            for e in &b.extents {
                assert!(e.offset >= last_end);
                last_end = e.end();
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap();
    assert_eq!(summary.attempts, 2, "one cut, one resume");
    assert_eq!(summary.bytes, 200 * 4096);
    assert_eq!(summary.ranges, 200);
    srv.shutdown().await.unwrap();
}

fn alloc_of(id: &str) -> MetadataRequest {
    MetadataRequest::new(Query::CsiAllocated {
        snapshot_id: id.into(),
    })
}

/// One million disjoint 4 KiB ranges, 10,000 per message, generated lazily by the server.
/// The client holds one message at a time: every batch has at most 10,000 extents, and the
/// streaming consumer keeps only counters.
#[tokio::test]
async fn a_million_range_delta_streams_in_bounded_memory() {
    const RANGES: i64 = 1_000_000;
    const PER_MSG: i64 = 10_000;
    let s = serve(Arc::new(|start| {
        assert_eq!(start, 0);
        let msgs = (0..RANGES / PER_MSG).map(|m| {
            let tuples: Vec<(i64, i64)> = (0..PER_MSG)
                .map(|i| ((m * PER_MSG + i) * 8192, 4096))
                .collect();
            Ok(msg(1, RANGES * 8192, &tuples))
        });
        Ok(Box::pin(futures::stream::iter(msgs)) as Msgs)
    }))
    .await;
    let c = common::client(&s.endpoint).await;
    let mut ranges = 0u64;
    let mut largest_batch = 0usize;
    let mut last_end = 0u64;
    let summary = c
        .for_each_batch(delta(), |b| {
            largest_batch = largest_batch.max(b.extents.len());
            for e in &b.extents {
                assert!(e.offset >= last_end);
                last_end = e.end();
            }
            ranges += b.extents.len() as u64;
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap();
    assert_eq!(ranges, RANGES as u64);
    assert_eq!(summary.bytes, RANGES as u64 * 4096);
    assert_eq!(summary.messages, (RANGES / PER_MSG) as u64);
    assert!(largest_batch <= PER_MSG as usize);
}

#[tokio::test]
async fn an_oversized_message_is_a_protocol_violation_not_an_offset_error() {
    let tuples: Vec<(i64, i64)> = (0..500).map(|i| (i * 8192, 4096)).collect();
    let s = serve(fixed(vec![Ok(msg(1, 500 * 8192, &tuples))])).await;
    let mut cfg = ClientConfig::new(&s.endpoint);
    cfg.max_message_bytes = 1024;
    let c = MetadataClient::connect(cfg).await.unwrap();
    let e = c.collect(alloc()).await.unwrap_err();
    assert!(matches!(e, CsiError::ProtocolViolation { .. }), "{e}");
    assert!(e.to_string().contains("max_results"));
}

/// A driver that sends one range, then the same lower range again and again without end.
fn endless_out_of_order(repeats: Option<usize>) -> Script {
    Arc::new(move |_| {
        use futures::StreamExt;
        let first = futures::stream::iter(vec![Ok(msg(2, 1 << 30, &[(1 << 20, 4096)]))]);
        let again = futures::stream::repeat_with(|| Ok(msg(2, 1 << 30, &[(0, 4096)])));
        Ok(match repeats {
            Some(n) => Box::pin(first.chain(again.take(n))) as Msgs,
            None => Box::pin(first.chain(again)) as Msgs,
        })
    })
}

#[tokio::test]
async fn the_client_has_a_deadline_and_bounds_unless_told_otherwise() {
    let c = ClientConfig::new("unix:///x");
    assert_eq!(c.deadline, Some(cbt_csi::DEFAULT_DEADLINE));
    assert_eq!(c.max_out_of_order, cbt_csi::DEFAULT_MAX_OUT_OF_ORDER);
    assert_eq!(
        c.max_collected_ranges,
        cbt_csi::DEFAULT_MAX_COLLECTED_RANGES
    );
    assert_eq!(c.without_deadline().deadline, None);
}

#[tokio::test]
async fn endless_out_of_order_ranges_are_a_protocol_violation_naming_them() {
    let s = serve(endless_out_of_order(None)).await;
    let mut config = ClientConfig::new(&s.endpoint);
    config.max_out_of_order = 1000;
    let c = MetadataClient::connect(config).await.unwrap();
    for streamed in [false, true] {
        let e = if streamed {
            let mut st = c.stream(alloc());
            loop {
                match st.next_batch().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("the endless stream ended"),
                    Err(e) => break e,
                }
            }
        } else {
            c.collect(alloc()).await.unwrap_err()
        };
        assert!(
            matches!(
                e,
                CsiError::ProtocolViolation {
                    offset: Some(0),
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("out of order"), "{e}");
    }
}

#[tokio::test]
async fn collected_memory_follows_the_answer_not_what_the_server_repeats() {
    // 20,000 out-of-order repeats of one range, collected under a bound of 100 ranges: the
    // repeats are merged as they come, so the answer (2 ranges) is all that is held.
    let s = serve(endless_out_of_order(Some(20_000))).await;
    let mut config = ClientConfig::new(&s.endpoint);
    config.max_collected_ranges = 100;
    let c = MetadataClient::connect(config).await.unwrap();
    let r = c.collect(alloc()).await.unwrap();
    assert_eq!(r.extents, vec![ext(0, 4096), ext(1 << 20, 4096)]);
    assert_eq!(r.summary.out_of_order_tuples, 20_000);

    // An answer that really has more distinct ranges than the bound fails, naming it.
    let many: Vec<(i64, i64)> = (0..300).map(|i| (i * 8192, 4096)).collect();
    let s = serve(fixed(vec![Ok(msg(2, 1 << 30, &many))])).await;
    let mut config = ClientConfig::new(&s.endpoint);
    config.max_collected_ranges = 100;
    let c = MetadataClient::connect(config).await.unwrap();
    let e = c.collect(alloc()).await.unwrap_err();
    assert!(
        matches!(e, CsiError::AnswerTooLarge { limit: 100, .. }),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Protocol);
}
