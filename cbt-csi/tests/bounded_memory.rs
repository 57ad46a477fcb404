//! Measures, with a counting allocator, that a 1,000,000-range delta streams through the client
//! in bounded memory, and that the meter would notice if it did not: collecting the same answer
//! into a list of extents must show up as at least 16 MB.
//!
//! Its own test binary: the allocator counts the whole process, so nothing else may run here.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use cbt_csi::pb::csi::{self, snapshot_metadata_server::SnapshotMetadata};
use cbt_csi::{MetadataRequest, Query};
use futures::Stream;
use tonic::{Request, Response, Status};

/// Live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Restarts the high-water mark at the current live size and returns that size.
fn reset_peak() -> usize {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

const RANGES: i64 = 1_000_000;
const PER_MSG: i64 = 10_000;

/// Streams RANGES disjoint 4 KiB tuples, building each message only when it is polled.
#[derive(Clone)]
struct Generator;

type Msgs<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn tuples(m: i64) -> Vec<csi::BlockMetadata> {
    (0..PER_MSG)
        .map(|i| csi::BlockMetadata {
            byte_offset: (m * PER_MSG + i) * 8192,
            size_bytes: 4096,
        })
        .collect()
}

#[tonic::async_trait]
impl SnapshotMetadata for Generator {
    type GetMetadataAllocatedStream = Msgs<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Msgs<csi::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        _request: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        use futures::StreamExt;
        assert_eq!(request.into_inner().starting_offset, 0);
        let msgs = futures::stream::iter(0..RANGES / PER_MSG).map(|m| {
            Ok(csi::GetMetadataDeltaResponse {
                block_metadata_type: 1,
                volume_capacity_bytes: RANGES * 8192,
                block_metadata: tuples(m),
            })
        });
        Ok(Response::new(Box::pin(msgs)))
    }
}

#[tokio::test]
async fn a_million_range_delta_streams_in_bounded_memory_as_measured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(csi::snapshot_metadata_server::SnapshotMetadataServer::new(
                Generator,
            ))
            .serve_with_incoming(incoming),
    );
    let c = common::client(&format!("unix://{}", path.display())).await;
    let request = || {
        MetadataRequest::new(Query::CsiDelta {
            base_snapshot_id: "a".into(),
            target_snapshot_id: "b".into(),
        })
    };

    // Streaming consumer keeping only counters. Server, transport and client all count here:
    // one message is ~110 KB on the wire and ~160 KB decoded.
    let base = reset_peak();
    let mut ranges = 0u64;
    let mut last_end = 0u64;
    let summary = c
        .for_each_batch(request(), |b| {
            for e in &b.extents {
                assert!(e.offset >= last_end);
                last_end = e.end();
            }
            ranges += b.extents.len() as u64;
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap();
    let streamed = PEAK.load(Ordering::Relaxed) - base;
    assert_eq!(ranges, RANGES as u64);
    assert_eq!(summary.bytes, RANGES as u64 * 4096);

    // Control: collecting the same answer holds 16 bytes per extent, at least 16 MB.
    let base = reset_peak();
    let collected = c.collect(request()).await.unwrap();
    let held = PEAK.load(Ordering::Relaxed) - base;
    assert_eq!(collected.extents.len(), RANGES as usize);
    assert!(
        held >= 16_000_000,
        "the meter missed the collected list: {held} bytes"
    );

    eprintln!(
        "peak heap while streaming 1,000,000 ranges: {streamed} bytes; collecting: {held} bytes"
    );
    assert!(
        streamed < 8 << 20,
        "streaming 1,000,000 ranges peaked at {streamed} bytes of heap (bound: 8 MiB)"
    );
}
