//! Measures metadata throughput of the client and delta speed of the file-backed server.
//!
//! `cargo run --release -p cbt-csi --example metadata_throughput [-- RANGES IMAGE_MIB]`
//!
//! 1. Protocol: a generator server streams RANGES disjoint FIXED_LENGTH tuples (10,000 per
//!    message) over a unix socket; the client normalizes and hands them to a counting consumer.
//!    Prints ranges/s and MB/s of encoded metadata.
//! 2. Server: two IMAGE_MIB images (target = base with 1% of 64 KiB blocks changed). Prints the
//!    time of a plain sequential read of both images (page cache warm, same run) and of
//!    GetMetadataDelta through the client, and their ratio.
//! 3. A sparse image 8x that size with 1% of its blocks allocated: a plain read of it against
//!    GetMetadataAllocated, which skips the holes with SEEK_DATA.

use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cbt_csi::pb::csi;
use cbt_csi::server::{FileMetadataService, Listen, ServerOptions};
use cbt_csi::{BlockType, ClientConfig, MetadataClient, MetadataRequest, Query};
use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status};

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
struct Generator {
    ranges: u64,
    wire_bytes: Arc<AtomicU64>,
}

const PER_MSG: u64 = 10_000;

impl Generator {
    fn messages(&self) -> impl Iterator<Item = csi::GetMetadataAllocatedResponse> + Send + 'static {
        let (ranges, wire) = (self.ranges, self.wire_bytes.clone());
        (0..ranges.div_ceil(PER_MSG)).map(move |m| {
            let n = PER_MSG.min(ranges - m * PER_MSG);
            let msg = csi::GetMetadataAllocatedResponse {
                block_metadata_type: BlockType::FixedLength.to_wire(),
                volume_capacity_bytes: (ranges * 8192) as i64,
                block_metadata: (0..n)
                    .map(|i| csi::BlockMetadata {
                        byte_offset: ((m * PER_MSG + i) * 8192) as i64,
                        size_bytes: 4096,
                    })
                    .collect(),
            };
            wire.fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
            msg
        })
    }
}

#[tonic::async_trait]
impl csi::snapshot_metadata_server::SnapshotMetadata for Generator {
    type GetMetadataAllocatedStream = Out<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Out<csi::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        _r: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::iter(
            self.messages().map(Ok),
        ))))
    }

    async fn get_metadata_delta(
        &self,
        _r: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        Err(Status::unimplemented("generator serves allocated only"))
    }
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let ranges: u64 = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2_000_000);
    let image_mib: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let dir = tempfile::tempdir()?;

    // 1. Protocol throughput.
    let wire = Arc::new(AtomicU64::new(0));
    let gen_sock = dir.path().join("gen.sock");
    let listener = tokio::net::UnixListener::bind(&gen_sock)?;
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let generator = Generator {
        ranges,
        wire_bytes: wire.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(csi::snapshot_metadata_server::SnapshotMetadataServer::new(
                generator,
            ))
            .serve_with_incoming(incoming),
    );
    let client =
        MetadataClient::connect(ClientConfig::new(format!("unix://{}", gen_sock.display())))
            .await?;
    let t = Instant::now();
    let mut seen = 0u64;
    let summary = client
        .for_each_batch(
            MetadataRequest::new(Query::CsiAllocated {
                snapshot_id: "gen".into(),
            }),
            |b| {
                seen += b.extents.len() as u64;
                Ok::<_, std::io::Error>(())
            },
        )
        .await?;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(seen, ranges);
    println!(
        "client metadata: {} ranges in {:.2} s = {:.0} ranges/s, {:.1} MB/s of encoded metadata ({} messages)",
        ranges,
        secs,
        ranges as f64 / secs,
        mb_per_s(wire.load(Ordering::Relaxed), secs),
        summary.messages
    );

    // 2. Server delta vs plain read.
    let snaps = dir.path().join("snaps");
    std::fs::create_dir(&snaps)?;
    let size = image_mib << 20;
    let block = 64 * 1024u64;
    {
        let base = std::fs::File::create(snaps.join("base"))?;
        let mut stream = cbt_core::testing::XorShift::from_state(0x2545_f491_4f6c_dd1d);
        let mut buf = vec![0u8; 1 << 20];
        for off in (0..size).step_by(buf.len()) {
            stream.fill(&mut buf);
            base.write_all_at(&buf, off)?;
        }
    }
    std::fs::copy(snaps.join("base"), snaps.join("target"))?;
    let target = std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("target"))?;
    let blocks = size / block;
    let changed = (blocks / 100).max(1);
    for i in 0..changed {
        target.write_all_at(&[0xAB; 16], (i * 97 % blocks) * block + 123)?;
    }
    drop(target);
    let read_both = || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        for name in ["base", "target"] {
            let f = std::fs::File::open(snaps.join(name))?;
            let mut off = 0;
            loop {
                let r = f.read_at(&mut buf, off)?;
                if r == 0 {
                    break;
                }
                off += r as u64;
                n += r as u64;
            }
        }
        Ok(n)
    };
    read_both()?; // warm the page cache so both measurements see the same cache state
    let t = Instant::now();
    let n = read_both()?;
    let read_secs = t.elapsed().as_secs_f64();

    let mut opts = ServerOptions::new(&snaps);
    opts.block_size = block;
    opts.block_type = BlockType::VariableLength;
    let server = cbt_csi::server::spawn(
        FileMetadataService::new(opts)?,
        Listen::Unix(dir.path().join("file.sock")),
        None,
    )
    .await?;
    let client = MetadataClient::connect(ClientConfig::new(server.endpoint())).await?;
    let t = Instant::now();
    let r = client
        .collect(MetadataRequest::new(Query::CsiDelta {
            base_snapshot_id: "base".into(),
            target_snapshot_id: "target".into(),
        }))
        .await?;
    let delta_secs = t.elapsed().as_secs_f64();
    println!(
        "plain read of both images: {} MiB in {:.3} s = {:.0} MB/s",
        n >> 20,
        read_secs,
        mb_per_s(n, read_secs)
    );
    println!(
        "server GetMetadataDelta:   {} MiB compared in {:.3} s = {:.0} MB/s ({:.2}x the plain read time); {} changed ranges, {} MiB",
        n >> 20,
        delta_secs,
        mb_per_s(n, delta_secs),
        delta_secs / read_secs,
        r.summary.ranges,
        r.summary.bytes >> 20
    );
    assert_eq!(r.summary.bytes, changed * block);

    // 3. Allocated on a sparse image: holes are skipped with SEEK_DATA instead of read.
    let sparse_size = 8 * size;
    let sparse = std::fs::File::create(snaps.join("sparse"))?;
    sparse.set_len(sparse_size)?;
    let data = vec![0x5Au8; block as usize];
    let extents = sparse_size / block / 100;
    for i in 0..extents {
        sparse.write_all_at(&data, (i * 101 % (sparse_size / block)) * block)?;
    }
    drop(sparse);
    let t = Instant::now();
    let f = std::fs::File::open(snaps.join("sparse"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < sparse_size {
        off += f.read_at(&mut buf, off)? as u64;
    }
    let plain_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r = client
        .collect(MetadataRequest::new(Query::CsiAllocated {
            snapshot_id: "sparse".into(),
        }))
        .await?;
    let alloc_secs = t.elapsed().as_secs_f64();
    println!(
        "sparse {} MiB image, 1% allocated: plain read {:.3} s, GetMetadataAllocated {:.3} s ({:.0}x faster); {} ranges, {} MiB",
        sparse_size >> 20,
        plain_secs,
        alloc_secs,
        plain_secs / alloc_secs,
        r.summary.ranges,
        r.summary.bytes >> 20
    );
    assert_eq!(r.summary.bytes, extents * block);
    server.shutdown().await?;
    Ok(())
}
