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
//!    Both backups are planned by `cbt_store::engine::cbt::plan_cbt_backup` with
//!    `DeltaBase::Latest`, as `cbt backup --pvc` does: the first finds no backup and asks for
//!    the allocated ranges, the second finds the first and asks for the delta from its handle.
//! 6. Restores both backups and proves them byte-identical to their snapshots.
//!
//! It fails unless the delta is exactly the blocks it changed, each backup read exactly the
//! repository chunks holding the service's ranges (and uploaded no more), and both restores
//! are byte-identical.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use cbt_core::{SnapshotName, Timestamp, VolumeName};
use cbt_csi::ranges::merge_extents;
use cbt_csi::server::{
    FileMetadataService, Listen, ServerOptions, SnapshotMeta, write_snapshot_meta,
};
use cbt_csi::{ClientConfig, Extent, MetadataClient, MetadataResult};
use cbt_examples::{Noise, SnapshotMethod, same_content, snapshot_image};
use cbt_store::engine::cbt::{CbtBackupSpec, CbtTarget, DeltaBase, plan_cbt_backup};
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
    let mut noise = Noise::from_state(7);
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

/// Overwrites 4 KiB of random bytes in ~1% of the 64 KiB blocks, some inside holes, and
/// returns the indices of the blocks written: the truth the delta is checked against.
fn change_volume(path: &std::path::Path) -> std::io::Result<BTreeSet<u64>> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = VOLUME_SIZE / BLOCK;
    let mut noise = Noise::from_state(99);
    let mut buf = vec![0u8; 4096];
    let mut changed = BTreeSet::new();
    for _ in 0..blocks / 100 {
        let block = noise.next_u64() % blocks;
        noise.fill(&mut buf);
        f.write_all_at(&buf, block * BLOCK + (noise.next_u64() % 15) * 4096)?;
        changed.insert(block);
    }
    f.sync_all()?;
    Ok(changed)
}

/// The blocks of `blocks` as sorted, merged extents (what a correct delta must report).
fn block_extents(blocks: &BTreeSet<u64>) -> Vec<Extent> {
    let mut v: Vec<Extent> = blocks
        .iter()
        .map(|b| Extent::new(b * BLOCK, BLOCK))
        .collect();
    merge_extents(&mut v);
    v
}

/// Bytes of the repository chunks the extents touch: what a backup of them must read, since
/// the engine reads and stores whole chunks.
fn chunk_cover(extents: &[Extent]) -> u64 {
    let mut chunks = 0;
    let mut last: Option<u64> = None;
    for e in extents {
        let (first, end) = (e.offset / CHUNK, (e.end() - 1) / CHUNK);
        let first = match last {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        if end >= first {
            chunks += end - first + 1;
            last = Some(end);
        }
    }
    (chunks * CHUNK).min(VOLUME_SIZE)
}

fn pct(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

fn snapshot(volume: &std::path::Path, dir: &std::path::Path, id: &str) -> Result<String, Error> {
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
    Ok(match how {
        SnapshotMethod::Reflink => format!("snapshot {id} (reflink)"),
        SnapshotMethod::SparseCopy { bytes } => {
            format!("snapshot {id} (sparse copy of {})", mib(bytes))
        }
    })
}

/// Prints what a backup asked the service, read, skipped and uploaded, and checks that it read
/// exactly the chunks holding the service's ranges.
fn report(
    call: &str,
    meta: &MetadataResult,
    out: &BackupOutcome,
    secs: f64,
    what: &str,
    note: &str,
) -> Result<(), Error> {
    let (m, s) = (&meta.summary, &out.stats);
    let expected_read = chunk_cover(&meta.extents);
    println!(
        "     {call:<20} {} ranges, {} {what} ({:.1}% of the volume){note}",
        m.ranges,
        mib(m.bytes),
        pct(m.bytes, VOLUME_SIZE)
    );
    println!(
        "     {:<20} {} = the {} chunks of {} KiB holding those ranges; skipped {} ({:.1}%)",
        "read",
        mib(s.bytes_read),
        s.chunks_read,
        CHUNK / 1024,
        mib(VOLUME_SIZE - s.bytes_read.min(VOLUME_SIZE)),
        pct(VOLUME_SIZE - s.bytes_read.min(VOLUME_SIZE), VOLUME_SIZE)
    );
    println!(
        "     {:<20} {} (zstd) in {} objects; {:.2} s",
        "uploaded",
        mib(s.bytes_uploaded),
        s.objects_written,
        secs
    );
    if s.objects_written > s.chunks_read {
        return Err(format!(
            "uploaded {} objects for {} chunks read",
            s.objects_written, s.chunks_read
        )
        .into());
    }
    if s.bytes_read != expected_read {
        return Err(format!(
            "read {} bytes, but the chunks holding the service's ranges are {expected_read} bytes",
            s.bytes_read
        )
        .into());
    }
    Ok(())
}

/// Plans a backup of snapshot `id` with the library planner (base: the volume's latest backup)
/// and runs it; returns the outcome and the service's answer as extents.
async fn cbt_backup(
    repo: &Repository,
    client: &MetadataClient,
    volume: &VolumeName,
    snaps: &std::path::Path,
    id: &str,
    name: &str,
) -> Result<(BackupOutcome, MetadataResult), Error> {
    let mut spec = CbtBackupSpec::new(
        volume.clone(),
        CbtTarget::Csi {
            snapshot_id: id.into(),
        },
    );
    spec.base = DeltaBase::Latest;
    let plan = plan_cbt_backup(repo, client, &spec).await?;
    let ranges = match &plan.mode {
        BackupMode::Full { allocated: Some(r) } => r.clone(),
        BackupMode::IncrementalOf { changed, .. } => changed.clone(),
        other => return Err(format!("unexpected plan {other:?}").into()),
    };
    let summary = plan.metadata.clone().ok_or("no metadata answer")?;
    let extents = ranges
        .iter()
        .map(|r| Extent::new(r.start(), r.len()))
        .collect();
    let outcome = engine::backup(
        repo,
        Arc::new(FileSource::open(snaps.join(id))?),
        BackupRequest {
            volume: volume.clone(),
            snapshot: SnapshotName::new(name)?,
            mode: plan.mode,
            created: Timestamp::from_system_time(std::time::SystemTime::now()),
            source_info: plan.source,
            labels: Default::default(),
            chunk_size: None,
            volume_size: plan.volume_size,
        },
        &EngineOptions::default(),
    )
    .await?;
    Ok((outcome, MetadataResult { extents, summary }))
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
    println!(
        "cbt quickstart: CBT backups over gRPC into a local repository (in {})",
        work.path().display()
    );

    // 1. Volume and first snapshot.
    let volume_path = volumes.join("pvc-demo.img");
    let data = make_volume(&volume_path)?;
    let snap1 = snapshot(&volume_path, &snaps, "snap-1")?;
    println!(
        "1. volume pvc-demo: {}, {} of data + 2 MiB of written zeros, the rest holes\n   {snap1}",
        mib(VOLUME_SIZE),
        mib(data)
    );

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
    println!(
        "2. file-backed SnapshotMetadata server on {} ({} KiB blocks)",
        server.endpoint(),
        BLOCK / 1024
    );

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

    println!("3. full backup full-1 of snap-1");
    let t = Instant::now();
    let (full, allocated) = cbt_backup(&repo, &client, &volume, &snaps, "snap-1", "full-1").await?;
    report(
        "GetMetadataAllocated",
        &allocated,
        &full,
        t.elapsed().as_secs_f64(),
        "allocated",
        "; the written zeros are not",
    )?;

    // 4. Change ~1% of the blocks, second snapshot.
    let changed = change_volume(&volume_path)?;
    let snap2 = snapshot(&volume_path, &snaps, "snap-2")?;
    println!(
        "4. changed 4 KiB inside {} of the {} blocks ({:.1}%)\n   {snap2}",
        changed.len(),
        VOLUME_SIZE / BLOCK,
        pct(changed.len() as u64, VOLUME_SIZE / BLOCK)
    );

    // 5. Incremental: the planner finds the latest backup of the volume, asks for the delta from
    // the CSI snapshot it recorded, and makes that backup the parent.
    let t = Instant::now();
    println!("5. incremental backup incr-2 of snap-2 (base: the latest backup's CSI snapshot)");
    let (incr, delta) = cbt_backup(&repo, &client, &volume, &snaps, "snap-2", "incr-2").await?;
    let parent = incr.head.parent.as_ref().map(|p| p.snapshot.as_str());
    if parent != Some("full-1") {
        return Err(format!("the incremental's parent is {parent:?}, not full-1").into());
    }
    let exact = delta.extents == block_extents(&changed);
    report(
        "GetMetadataDelta",
        &delta,
        &incr,
        t.elapsed().as_secs_f64(),
        "changed",
        &format!(
            " = exactly the {} blocks written: {}",
            changed.len(),
            if exact { "yes" } else { "NO" }
        ),
    )?;
    server.shutdown().await?;

    // 6. Restore both and compare with their snapshots.
    let mut all_ok = exact;
    for (i, (name, snap)) in [("full-1", "snap-1"), ("incr-2", "snap-2")]
        .into_iter()
        .enumerate()
    {
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
            "{} restore {name}: downloaded {}, wrote {}; byte-identical to {snap}: {}",
            if i == 0 { "6." } else { "  " },
            mib(r.bytes_downloaded),
            mib(r.bytes_written),
            if same { "yes" } else { "NO" }
        );
    }

    let (f, n) = (&full.stats, &incr.stats);
    println!(
        "incremental vs full: read {} vs {} ({:.1}%), uploaded {} vs {} ({:.1}%); total {:.1} s",
        mib(n.bytes_read),
        mib(f.bytes_read),
        pct(n.bytes_read, f.bytes_read),
        mib(n.bytes_uploaded),
        mib(f.bytes_uploaded),
        pct(n.bytes_uploaded, f.bytes_uploaded),
        started.elapsed().as_secs_f64()
    );
    if !all_ok {
        return Err("a check failed (see NO above)".into());
    }
    println!("OK: the incremental read and uploaded only the chunks holding the changed blocks");
    Ok(())
}
