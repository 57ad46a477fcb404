//! End-to-end throughput: generate an image, back it up to a local repository, change 1% of
//! its chunks, back up incrementally, restore, and print MB/s of each step beside the MB/s of
//! a plain sequential read of the same image measured in the same run.
//!
//! Usage: `cargo run --release -p cbt-benches --example e2e [SIZE]` where SIZE is like `2G`
//! (default) or `256M`; `CBT_E2E_SIZE` works too. Set `CBT_E2E_DIR` to pick the temp dir's
//! parent (the default temp dir may be a RAM disk). `CBT_E2E_STORE=s3` runs the same steps
//! against an in-process S3 server on loopback (s3s-fs, through the real SDK and HTTP)
//! instead of the local directory store.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cbt_core::testing::XorShift;
use cbt_core::{ByteRange, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::engine::{
    self, BackupMode, BackupRequest, EngineOptions, FileSource, RestoreOptions,
};
use cbt_store::repo::{InitOptions, Repository};
use cbt_store::store::{LocalStore, ObjectStore, RetryPolicy, RetryingStore};
use cbt_store::testing::S3TestServer;

const CHUNK: u64 = 4 * 1024 * 1024;
const BUF: usize = 4 * 1024 * 1024;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The benchmark image: 3/8 random, 3/8 compressible text, 1/4 holes (never written).
fn generate(path: &Path, size: u64) -> Res<()> {
    let text = b"kubernetes block volume snapshot changed block tracking 0123456789\n";
    Ok(cbt_benches::write_mixed_image(
        path,
        size,
        CHUNK,
        0x5eed_1234_abcd_0001,
        text,
    )?)
}

/// Overwrites 256 KiB in 1% of the chunks (every 100th, data and holes alike); returns the
/// changed ranges.
fn change(path: &Path, size: u64) -> Res<RangeSet> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut rng = XorShift::from_state(0xc0ff_ee00_0000_0001);
    let mut changed = RangeSet::new();
    let mut buf = vec![0u8; 256 * 1024];
    let chunks = size.div_ceil(CHUNK);
    let mut i = 37 % chunks.max(1);
    while i < chunks {
        let start = i * CHUNK + 4096 * 7;
        let len = (buf.len() as u64).min(size.saturating_sub(start));
        if len > 0 {
            rng.fill(&mut buf);
            f.seek(SeekFrom::Start(start))?;
            f.write_all(&buf[..len as usize])?;
            changed.insert(ByteRange::new(start, len)?);
        }
        i += 100;
    }
    f.sync_all()?;
    Ok(changed)
}

fn sequential_read(path: &Path) -> Res<(u64, f64)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; BUF];
    let t = Instant::now();
    let mut total = 0u64;
    let mut acc = 0u8;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        acc ^= buf[n - 1];
        total += n as u64;
    }
    std::hint::black_box(acc);
    Ok((total, t.elapsed().as_secs_f64()))
}

fn file_hash(path: &Path) -> Res<blake3::Hash> {
    let mut f = File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

fn vm_hwm() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l[6..].trim().to_string())
        })
        .unwrap_or_else(|| "n/a".into())
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / 1e6 / secs
    } else {
        0.0
    }
}

async fn run(size: u64) -> Res<()> {
    let parent = std::env::var_os("CBT_E2E_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("cbt-e2e-")
        .tempdir_in(parent)?;
    let image = dir.path().join("disk.img");
    let t = Instant::now();
    generate(&image, size)?;
    println!(
        "image: {} MiB at {} (generated in {:.1} s)",
        size >> 20,
        image.display(),
        t.elapsed().as_secs_f64()
    );

    let (read_bytes, read_secs) = sequential_read(&image)?;
    let baseline = mbps(read_bytes, read_secs);
    println!(
        "baseline sequential read: {:>8.1} MB/s ({} MiB)",
        baseline,
        read_bytes >> 20
    );

    let use_s3 = std::env::var("CBT_E2E_STORE").is_ok_and(|v| v == "s3");
    let mut _server = None;
    let store: Arc<dyn ObjectStore> = if use_s3 {
        let server = S3TestServer::start().await?;
        server.create_bucket("bench")?;
        let s3 = server.store("bench", "repo").await?;
        _server = Some(server);
        println!("store: in-process S3 server (s3s-fs) on loopback");
        Arc::new(RetryingStore::new(Arc::new(s3), RetryPolicy::default()))
    } else {
        println!("store: local directory");
        Arc::new(LocalStore::new(dir.path().join("repo"))?)
    };
    let repo = Repository::init(
        store,
        InitOptions {
            chunk_size: Some(CHUNK),
            now: Timestamp::from_unix_secs(1),
        },
    )
    .await?;
    let opts = EngineOptions::default();
    let volume = VolumeName::new("bench")?;

    let t = Instant::now();
    let full = engine::backup(
        &repo,
        Arc::new(FileSource::open(&image)?),
        BackupRequest {
            volume: volume.clone(),
            snapshot: SnapshotName::new("full")?,
            mode: BackupMode::Full { allocated: None },
            created: Timestamp::from_unix_secs(2),
            source_info: Default::default(),
            labels: Default::default(),
            chunk_size: None,
            volume_size: None,
        },
        &opts,
    )
    .await?;
    let full_secs = t.elapsed().as_secs_f64();
    let s = full.stats;
    println!(
        "full backup:              {:>8.1} MB/s of volume, {:>8.1} MB/s of data read ({} MiB read, {} MiB uploaded, {} zero chunks) in {:.2} s",
        mbps(size, full_secs),
        mbps(s.bytes_read, full_secs),
        s.bytes_read >> 20,
        s.bytes_uploaded >> 20,
        s.chunks_zero,
        full_secs
    );

    let changed = change(&image, size)?;
    let changed_bytes = changed.total_bytes();
    let changed_ranges = changed.len();
    let t = Instant::now();
    let inc = engine::backup(
        &repo,
        Arc::new(FileSource::open(&image)?),
        BackupRequest {
            volume: volume.clone(),
            snapshot: SnapshotName::new("incr")?,
            mode: BackupMode::IncrementalOf {
                parent: Box::new(full.head.clone()),
                changed,
            },
            created: Timestamp::from_unix_secs(3),
            source_info: Default::default(),
            labels: Default::default(),
            chunk_size: None,
            volume_size: None,
        },
        &opts,
    )
    .await?;
    let inc_secs = t.elapsed().as_secs_f64();
    let s = inc.stats;
    println!(
        "incremental backup:       {:>8.1} MB/s of data read ({} KiB changed in {} ranges, {} KiB read, {} KiB uploaded) in {:.2} s",
        mbps(s.bytes_read, inc_secs),
        changed_bytes >> 10,
        changed_ranges,
        s.bytes_read >> 10,
        s.bytes_uploaded >> 10,
        inc_secs
    );
    println!(
        "bytes uploaded per changed byte: {:.3} (chunk-granular reads: {:.1} bytes read per changed byte)",
        s.bytes_uploaded as f64 / changed_bytes.max(1) as f64,
        s.bytes_read as f64 / changed_bytes.max(1) as f64
    );

    let target = dir.path().join("restored.img");
    let t = Instant::now();
    let r = engine::restore(
        &repo,
        &volume,
        &SnapshotName::new("incr")?,
        &target,
        &RestoreOptions::default(),
        &opts,
    )
    .await?;
    let restore_secs = t.elapsed().as_secs_f64();
    println!(
        "restore:                  {:>8.1} MB/s of volume, {:>8.1} MB/s of data written ({} MiB written, {} MiB downloaded) in {:.2} s",
        mbps(size, restore_secs),
        mbps(r.bytes_written, restore_secs),
        r.bytes_written >> 20,
        r.bytes_downloaded >> 20,
        restore_secs
    );
    let same = file_hash(&image)? == file_hash(&target)?;
    println!("restored image identical: {same}");
    println!("peak memory (VmHWM): {}", vm_hwm());
    if !same {
        return Err("restored image differs from the source".into());
    }
    Ok(())
}

fn main() -> Res<()> {
    let arg = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("CBT_E2E_SIZE").ok());
    let size = match arg {
        Some(s) => cbt_core::units::parse_size(&s)?,
        None => 2 << 30,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(size))
}
