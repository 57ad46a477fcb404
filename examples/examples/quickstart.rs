//! Quickstart: CBT backups over gRPC into the embedded local repository, end to end.
//!
//! `cargo run --release -p cbt-examples --example quickstart`
//!
//! 1. Makes a 256 MiB volume image with data, holes and zero-filled blocks, and snapshots it
//!    (reflink or sparse copy into the snapshot directory the metadata server serves).
//! 2. Starts the file-backed SnapshotMetadata server on a unix socket.
//! 3. Full backup: ranges from GetMetadataAllocated, data read from the snapshot image.
//! 4. Changes ~1% of the volume's 64 KiB blocks, snapshots again.
//! 5. Incremental backup: ranges from GetMetadataDelta(snap-1, snap-2); the parent is the
//!    backup taken from snap-1 (recorded in its manifest as the CSI snapshot id).
//! 6. Restores both backups and proves them byte-identical to their snapshots.

use std::sync::Arc;
use std::time::Instant;

use cbt_core::manifest::SourceInfo;
use cbt_core::{SnapshotName, Timestamp, VolumeName};
use cbt_csi::server::{
    FileMetadataService, Listen, ServerOptions, SnapshotMeta, write_snapshot_meta,
};
use cbt_csi::{ClientConfig, MetadataClient, MetadataRequest, MetadataSummary, Query};
use cbt_examples::{Noise, SnapshotMethod, same_content, snapshot_image};
use cbt_store::engine::{
    self, BackupMode, BackupOutcome, BackupRequest, EngineOptions, FileSource, RestoreOptions,
};
use cbt_store::repo::{InitOptions, Repository};
use cbt_store::store::{LocalStore, ObjectStore};
use std::os::unix::fs::FileExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

const MIB: u64 = 1 << 20;
const VOLUME_SIZE: u64 = 256 * MIB;
const BLOCK: u64 = 64 * 1024;
const CHUNK: u64 = 256 * 1024;

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

/// Writes the initial volume: 48 data regions of 256 KiB..2 MiB (5.3 MiB apart), plus 2 MiB
/// of explicitly written zeros in a gap between two regions (allocated, but nothing to back up).
fn make_volume(path: &std::path::Path) -> std::io::Result<u64> {
    let f = std::fs::File::create(path)?;
    f.set_len(VOLUME_SIZE)?;
    let mut noise = Noise::new(7);
    let mut written = 0;
    for i in 0..48u64 {
        let len = (256 * 1024) << (noise.next_u64() % 4);
        let off = (i * VOLUME_SIZE / 48) & !(BLOCK - 1);
        let mut buf = vec![0u8; len as usize];
        noise.fill(&mut buf);
        // Half of each region is text-like, so compression has something to do.
        for b in &mut buf[..len as usize / 2] {
            *b = b'a' + (*b % 16);
        }
        f.write_all_at(&buf, off)?;
        written += len;
    }
    let gap = ((10 * VOLUME_SIZE / 48) & !(BLOCK - 1)) + 2 * MIB + BLOCK;
    f.write_all_at(&vec![0u8; 2 * MIB as usize], gap)?;
    f.sync_all()?;
    Ok(written)
}

/// Overwrites 4 KiB in ~1% of the 64 KiB blocks, some inside holes.
fn change_volume(path: &std::path::Path) -> std::io::Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = VOLUME_SIZE / BLOCK;
    let changes = blocks / 100;
    let mut noise = Noise::new(99);
    let mut buf = vec![0u8; 4096];
    for _ in 0..changes {
        let block = noise.next_u64() % blocks;
        noise.fill(&mut buf);
        f.write_all_at(&buf, block * BLOCK + (noise.next_u64() % 15) * 4096)?;
    }
    f.sync_all()?;
    Ok(changes)
}

fn snapshot(volume: &std::path::Path, dir: &std::path::Path, id: &str) -> Result<(), Error> {
    let how = snapshot_image(volume, &dir.join(id))?;
    write_snapshot_meta(
        dir,
        id,
        &SnapshotMeta {
            volume_id: Some("pvc-demo".into()),
            namespace: None,
            cbt: None,
        },
    )?;
    match how {
        SnapshotMethod::Reflink => println!("  snapshot {id}: reflink"),
        SnapshotMethod::SparseCopy { bytes } => {
            println!("  snapshot {id}: sparse copy of {}", mib(bytes))
        }
    }
    Ok(())
}

fn report(label: &str, meta: &MetadataSummary, out: &BackupOutcome, secs: f64) {
    let s = &out.stats;
    println!(
        "{label}: metadata {} ranges / {} in {} message(s); read {}, skipped {} of {}, zero {}, \
         uploaded {} in {} objects, deduplicated {}; {:.2} s",
        meta.ranges,
        mib(meta.bytes),
        meta.messages,
        mib(s.bytes_read),
        mib(VOLUME_SIZE - s.bytes_read.min(VOLUME_SIZE)),
        mib(VOLUME_SIZE),
        mib(s.bytes_zero),
        mib(s.bytes_uploaded),
        s.objects_written,
        mib(s.bytes_deduplicated),
        secs
    );
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let started = Instant::now();
    let work = tempfile::tempdir()?;
    let (volumes, snaps, repo_dir, restored) = (
        work.path().join("volumes"),
        work.path().join("snapshots"),
        work.path().join("repo"),
        work.path().join("restored"),
    );
    for d in [&volumes, &snaps, &repo_dir, &restored] {
        std::fs::create_dir_all(d)?;
    }
    println!("working in {}", work.path().display());

    // 1. Volume and first snapshot.
    let volume_path = volumes.join("pvc-demo.img");
    let data = make_volume(&volume_path)?;
    println!(
        "volume: {} with {} of data, holes and 2 MiB of written zeros",
        mib(VOLUME_SIZE),
        mib(data)
    );
    snapshot(&volume_path, &snaps, "snap-1")?;

    // 2. Metadata server on a unix socket.
    let mut opts = ServerOptions::new(&snaps);
    opts.block_size = BLOCK;
    let server = cbt_csi::server::spawn(
        FileMetadataService::new(opts)?,
        Listen::Unix(work.path().join("csi.sock")),
        None,
    )
    .await?;
    let client = MetadataClient::connect(ClientConfig::new(server.endpoint())).await?;
    println!("metadata server: {}", server.endpoint());

    // 3. Repository (embedded default: a local directory) and the full backup.
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&repo_dir)?);
    let now = || Timestamp::from_system_time(std::time::SystemTime::now());
    let repo = Repository::init(
        store,
        InitOptions {
            chunk_size: Some(CHUNK),
            now: now(),
        },
    )
    .await?;
    let volume = VolumeName::new("pvc-demo")?;
    let engine_opts = EngineOptions::default();

    let t = Instant::now();
    let (allocated, meta1) = client
        .collect_range_set(MetadataRequest::new(Query::CsiAllocated {
            snapshot_id: "snap-1".into(),
        }))
        .await?;
    let full = engine::backup(
        &repo,
        Arc::new(FileSource::open(snaps.join("snap-1"))?),
        BackupRequest {
            volume: volume.clone(),
            snapshot: SnapshotName::new("full-1")?,
            mode: BackupMode::Full {
                allocated: Some(allocated),
            },
            created: now(),
            source_info: SourceInfo {
                csi_snapshot_id: Some("snap-1".into()),
                ..SourceInfo::default()
            },
            labels: Default::default(),
            chunk_size: None,
            volume_size: Some(meta1.volume_capacity_bytes),
        },
        &engine_opts,
    )
    .await?;
    report(
        "full backup       ",
        &meta1,
        &full,
        t.elapsed().as_secs_f64(),
    );

    // 4. Change ~1% of the blocks, second snapshot.
    let changed = change_volume(&volume_path)?;
    println!(
        "changed {changed} of {} 64 KiB blocks (4 KiB each)",
        VOLUME_SIZE / BLOCK
    );
    snapshot(&volume_path, &snaps, "snap-2")?;

    // 5. Incremental: the parent is the backup whose recorded CSI snapshot id is the delta base.
    let t = Instant::now();
    let base = "snap-1";
    let parent = repo
        .latest_snapshot(&volume)
        .await?
        .filter(|m| m.source.csi_snapshot_id.as_deref() == Some(base))
        .ok_or("the latest backup was not taken from the delta base")?;
    let (delta, meta2) = client
        .collect_range_set(MetadataRequest::new(Query::CsiDelta {
            base_snapshot_id: base.into(),
            target_snapshot_id: "snap-2".into(),
        }))
        .await?;
    let incr = engine::backup(
        &repo,
        Arc::new(FileSource::open(snaps.join("snap-2"))?),
        BackupRequest {
            volume: volume.clone(),
            snapshot: SnapshotName::new("incr-2")?,
            mode: BackupMode::Incremental {
                parent: Box::new(parent),
                changed: delta,
            },
            created: now(),
            source_info: SourceInfo {
                csi_snapshot_id: Some("snap-2".into()),
                base_csi_snapshot_id: Some(base.into()),
                ..SourceInfo::default()
            },
            labels: Default::default(),
            chunk_size: None,
            volume_size: Some(meta2.volume_capacity_bytes),
        },
        &engine_opts,
    )
    .await?;
    report(
        "incremental backup",
        &meta2,
        &incr,
        t.elapsed().as_secs_f64(),
    );
    server.shutdown().await?;

    // 6. Restore both and compare with their snapshots.
    let mut all_ok = true;
    for (name, snap) in [("full-1", "snap-1"), ("incr-2", "snap-2")] {
        let target = restored.join(format!("{name}.img"));
        let r = engine::restore(
            &repo,
            &volume,
            &SnapshotName::new(name)?,
            &target,
            &RestoreOptions::default(),
            &engine_opts,
        )
        .await?;
        let same = same_content(&target, &snaps.join(snap))?;
        all_ok &= same;
        println!(
            "restore {name}: wrote {}, downloaded {}, {:.2} s; byte-identical to {snap}: {}",
            mib(r.bytes_written),
            mib(r.bytes_downloaded),
            r.wall_ms as f64 / 1000.0,
            if same { "yes" } else { "NO" }
        );
    }

    println!(
        "summary: incremental read {} ({:.1}% of the volume) for {} changed per the service; total {:.1} s",
        mib(incr.stats.bytes_read),
        100.0 * incr.stats.bytes_read as f64 / VOLUME_SIZE as f64,
        mib(meta2.bytes),
        started.elapsed().as_secs_f64()
    );
    if !all_ok {
        return Err("a restored image differs from its snapshot".into());
    }
    Ok(())
}
