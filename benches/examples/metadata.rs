//! Incremental backup cost against volume size, manifest format 2: the same 100 scattered
//! 1 MiB changes on a fully allocated 1 GiB and 1 TiB volume, at 1 MiB and 256 KiB chunks.
//! Prints the metadata written and read by each incremental, its wall time, the ratio of the
//! 1 TiB time to the 1 GiB time (the issue asks for at most 3x), and the size of a full
//! manifest per TiB in format 2 against format 1.
//!
//! The fully allocated parent is not read from a device (hashing 1 TiB would take the whole
//! run): its map is generated (distinct hashes, realistic sizes) and written through the
//! streaming [`TreeWriter`] exactly as a full backup writes it, then the incremental runs
//! through the real engine against a synthetic source that generates the changed bytes.
//!
//! With `given`, it compares instead what the two incremental modes read of the parent for a
//! 1% change (10 scattered 1 MiB changes) of the 1 GiB volume: `IncrementalOf` (the changed
//! paths) and `Incremental` (the caller hands in the whole parent, which is read whole to be
//! checked).
//!
//! ```sh
//! cargo run --release -p cbt-benches --example metadata            # both chunk sizes
//! cargo run --release -p cbt-benches --example metadata -- 1048576  # one chunk size
//! cargo run --release -p cbt-benches --example metadata -- given    # the two modes at 1 GiB
//! ```
//! Repositories live on tmpfs (`/dev/shm`) when present, so the store's fsyncs do not blur the
//! comparison; pass `CBT_BENCH_DIR` to put them elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cbt_core::manifest::{ManifestHead, MapLocation};
use cbt_core::maptree::{TreeShape, TreeWriter};
use cbt_core::{
    ByteRange, ChunkGeometry, ChunkHash, ChunkRef, RangeSet, SnapshotName, Timestamp, VolumeName,
};
use cbt_store::engine::{self, BackupMode, BackupRequest, EngineOptions};
use cbt_store::repo::{InitOptions, Repository, SEGMENT_BATCH};
use cbt_store::store::{LocalStore, ObjectStore};
use cbt_store::testing::synthetic::SyntheticSource;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const PLACES: u64 = 100;

type Error = Box<dyn std::error::Error>;

struct Parent {
    head: ManifestHead,
    segment_bytes: u64,
    segments: u64,
    took: Duration,
}

/// Writes a fully allocated map of `size` bytes as `full` (streaming, bounded memory).
async fn write_parent(repo: &Repository, size: u64, chunk: u64) -> Result<Parent, Error> {
    let started = Instant::now();
    let geometry = ChunkGeometry::new(size, chunk)?;
    let shape = TreeShape::new(geometry);
    let namer = |b: &[u8]| repo.segment_name(b);
    let mut writer = TreeWriter::new(shape, &namer);
    let (mut segment_bytes, mut segments) = (0u64, 0u64);
    let mut pending = Vec::new();
    for index in 0..geometry.chunk_count() {
        let hash = ChunkHash(*blake3::hash(&index.to_le_bytes()).as_bytes());
        let raw_len = geometry.chunk_len(index);
        writer.push(
            index,
            ChunkRef {
                hash,
                // Incompressible data: the stored size of a raw chunk.
                stored_size: raw_len + 52,
                crc32c: index as u32,
                raw_len,
            },
        )?;
        pending.extend(writer.take_finished());
        if pending.len() >= SEGMENT_BATCH {
            let w = repo.put_segments_of(std::mem::take(&mut pending)).await?;
            segment_bytes += w.segment_bytes;
            segments += w.segments;
        }
    }
    let (root, rest) = writer.finish();
    pending.extend(rest);
    let w = repo.put_segments_of(pending).await?;
    segment_bytes += w.segment_bytes;
    segments += w.segments;
    let head = ManifestHead {
        volume: VolumeName::new("vol")?,
        snapshot: SnapshotName::new("full")?,
        snapshot_id: "full-0001".into(),
        created: Timestamp(1),
        geometry,
        parent: None,
        source: Default::default(),
        labels: Default::default(),
        stats: Default::default(),
        map: MapLocation::Tree { root },
    };
    repo.commit_head(&head).await?;
    Ok(Parent {
        head,
        segment_bytes,
        segments,
        took: started.elapsed(),
    })
}

/// `n` changes of 1 MiB spread over the volume.
fn places(size: u64, n: u64) -> RangeSet {
    let step = size / n;
    RangeSet::from_ranges((0..n).map(|k| {
        let off = (k * step + (k * 7919 * MIB) % step.max(MIB)) / MIB * MIB;
        ByteRange::new(off.min(size - MIB), MIB).expect("a 1 MiB range")
    }))
}

struct Incremental {
    written: u64,
    read: u64,
    segments_written: u64,
    segments_read: u64,
    took: Duration,
    full: Parent,
}

/// An incremental of `n` scattered 1 MiB changes over a fully allocated parent of `size`,
/// given the parent's head (`IncrementalOf`) or, with `given`, its whole manifest
/// (`Incremental`).
async fn run(size: u64, chunk: u64, n: u64, given: bool) -> Result<Incremental, Error> {
    let base = std::env::var_os("CBT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let shm = std::path::Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            }
        });
    let dir = tempfile::tempdir_in(base)?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path())?);
    let repo = Repository::init(
        store,
        InitOptions {
            chunk_size: Some(chunk),
            now: Timestamp(0),
        },
    )
    .await?;
    let full = write_parent(&repo, size, chunk).await?;
    let changed = places(size, n);
    let source = SyntheticSource::new(size, RangeSet::full(size)).rewritten(changed.clone(), 1);
    let mode = if given {
        let whole = repo
            .load_manifest(&full.head.volume, &full.head.snapshot)
            .await?;
        BackupMode::Incremental {
            parent: Box::new(whole),
            changed,
        }
    } else {
        BackupMode::IncrementalOf {
            parent: Box::new(full.head.clone()),
            changed,
        }
    };
    let started = Instant::now();
    let out = engine::backup(
        &repo,
        Arc::new(source),
        BackupRequest {
            volume: full.head.volume.clone(),
            snapshot: SnapshotName::new("incr")?,
            mode,
            created: Timestamp(2),
            source_info: Default::default(),
            labels: Default::default(),
            chunk_size: None,
            volume_size: None,
        },
        &EngineOptions::default(),
    )
    .await?;
    let took = started.elapsed();
    let m = out.metadata;
    Ok(Incremental {
        written: m.written.segment_bytes + m.written.head_bytes,
        read: m.parent_segment_bytes_read,
        segments_written: m.written.segments,
        segments_read: m.parent_segments_read,
        took,
        full,
    })
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let arg = std::env::args().nth(1);
    if arg.as_deref() == Some("given") {
        return given().await;
    }
    let chunks: Vec<u64> = match arg {
        Some(c) => vec![c.parse()?],
        None => vec![MIB, 256 * 1024],
    };
    for chunk in chunks {
        println!(
            "chunk size {} KiB, {PLACES} scattered 1 MiB changes",
            chunk / 1024
        );
        let small = run(GIB, chunk, PLACES, false).await?;
        let big = run(TIB, chunk, PLACES, false).await?;
        for (name, r) in [("1 GiB", &small), ("1 TiB", &big)] {
            println!(
                "  {name}: incremental wrote {:.3} MB ({} segments + head), read {:.3} MB of the parent ({} segments), {:.3} s",
                mb(r.written),
                r.segments_written,
                mb(r.read),
                r.segments_read,
                r.took.as_secs_f64()
            );
        }
        println!(
            "  1 TiB / 1 GiB incremental time: {:.2}x",
            big.took.as_secs_f64() / small.took.as_secs_f64()
        );
        // Format 1 stored about 100 bytes of JSON per entry, ~48 after zstd (hashes do not
        // compress); measured on the 1 GiB map and scaled per TiB.
        let entries = TIB / chunk;
        println!(
            "  full manifest per fully allocated TiB: format 2 {:.1} MB in {} segments (written in {:.1} s); format 1 ~{:.1} MB",
            mb(big.full.segment_bytes),
            big.full.segments,
            big.full.took.as_secs_f64(),
            mb(v1_bytes_per_entry(chunk)? * entries / 1000),
        );
    }
    Ok(())
}

/// What each incremental mode reads of a 1 GiB parent for a 1% change, at both chunk sizes.
async fn given() -> Result<(), Error> {
    let n = 10;
    for chunk in [MIB, 256 * 1024] {
        let of = run(GIB, chunk, n, false).await?;
        let whole = run(GIB, chunk, n, true).await?;
        println!(
            "chunk size {} KiB, 1 GiB, {n} scattered 1 MiB changes: parent map {:.3} MB in {} segments",
            chunk / 1024,
            mb(of.full.segment_bytes),
            of.full.segments
        );
        for (name, r) in [
            ("IncrementalOf", &of),
            ("Incremental (whole parent given)", &whole),
        ] {
            println!(
                "  {name}: read {:.3} MB of the parent ({} segments), {:.2}x the map",
                mb(r.read),
                r.segments_read,
                r.read as f64 / r.full.segment_bytes as f64
            );
        }
    }
    Ok(())
}

/// Stored bytes per 1000 entries of a format-1 manifest (zstd JSON) of a fully allocated map
/// with distinct hashes, measured on 16,384 entries.
fn v1_bytes_per_entry(chunk: u64) -> Result<u64, Error> {
    let n = 16_384u64;
    let g = ChunkGeometry::new(n * chunk, chunk)?;
    let mut map = cbt_core::ChunkMap::new(g);
    for index in 0..n {
        let hash = ChunkHash(*blake3::hash(&index.to_le_bytes()).as_bytes());
        map.set(
            index,
            cbt_core::ChunkState::Stored(ChunkRef {
                hash,
                stored_size: chunk + 52,
                crc32c: index as u32,
                raw_len: chunk,
            }),
        )?;
    }
    let m = cbt_core::Manifest::new(
        cbt_core::manifest::SnapshotMeta {
            volume: VolumeName::new("vol")?,
            snapshot: SnapshotName::new("v1")?,
            snapshot_id: "v1-0001".into(),
            created: Timestamp(1),
            source: Default::default(),
            labels: Default::default(),
            stats: Default::default(),
        },
        map,
        None,
    )?;
    let z = zstd::bulk::compress(&m.to_json()?, 3)?;
    Ok(z.len() as u64 * 1000 / n)
}
