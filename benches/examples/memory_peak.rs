//! Peak resident memory (VmHWM, the kernel's getrusage maxrss) of a full backup and of a
//! restore, each in its own process, for a 1 TiB sparse and a 64 GiB dense synthetic volume.
//! The issue's bound is 256 MiB whatever the volume size. The `load-whole` phase is the
//! baseline of the same run: a process that only loads the snapshot's map whole.
//!
//! * sparse: 1 TiB with 1 GiB allocated in 1,024 scattered 1 MiB extents
//!   ([`SyntheticSource`]), restored to a new sparse file.
//! * dense: 64 GiB, every chunk stored (a full map: 1,048,576 entries at 64 KiB chunks). Its
//!   chunks repeat every 64 so the repository stays small, and only each chunk's first 4 KiB
//!   is non-zero so the restored file (sparse blocks are skipped) stays at 4 GiB on disk.
//!
//! ```sh
//! cargo run --release -p cbt-benches --example memory_peak            # both volumes
//! cargo run --release -p cbt-benches --example memory_peak -- dense   # one
//! ```
//! `CBT_MEMORY_PHASES` picks phases (default `backup,dry-run,restore,verify,load-whole`;
//! `verify` is `cbt verify --read-data` over the repository).
//! The work directory is `CBT_BENCH_DIR` (default: a temporary directory under `/var/tmp`);
//! the dense restore needs about 4.5 GB free there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use cbt_core::{ByteRange, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::engine::{
    self, BackupMode, BackupRequest, BlockSource, EngineOptions, RestoreOptions,
};
use cbt_store::repo::{InitOptions, Repository, VerifyOptions};
use cbt_store::store::{LocalStore, ObjectStore};
use cbt_store::testing::synthetic::SyntheticSource;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
/// Small chunks make the map large per byte of volume: the case the bound is about.
const CHUNK: u64 = 64 * KIB;

type Error = Box<dyn std::error::Error>;

/// Every chunk holds data; chunk `k` equals chunk `k mod 64`; only its first 4 KiB is not zero.
#[derive(Debug)]
struct DenseRepeating {
    size: u64,
}

impl BlockSource for DenseRepeating {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            let in_chunk = pos % CHUNK;
            let len = ((CHUNK - in_chunk) as usize).min(buf.len() - at);
            if in_chunk < 4 * KIB {
                let tag = ((pos / CHUNK) % 64) as u8 + 1;
                let n = ((4 * KIB - in_chunk) as usize).min(len);
                buf[at..at + n].fill(tag);
            }
            at += len;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "dense repeating synthetic volume".into()
    }

    fn data_ranges(&self) -> std::io::Result<Option<RangeSet>> {
        Ok(None)
    }
}

fn sparse_source() -> SyntheticSource {
    let mut allocated = RangeSet::new();
    for k in 0..1024u64 {
        // Spread over the whole TiB, 1 MiB each.
        if let Ok(r) = ByteRange::new(k * (TIB / 1024) + (k % 7) * MIB, MIB) {
            allocated.insert(r);
        }
    }
    SyntheticSource::new(TIB, allocated)
}

fn source(case: &str) -> Result<Arc<dyn BlockSource>, Error> {
    Ok(match case {
        "sparse" => Arc::new(sparse_source()),
        "dense" => Arc::new(DenseRepeating { size: 64 * GIB }),
        other => return Err(format!("unknown case {other} (sparse or dense)").into()),
    })
}

/// Peak resident set of this process so far, in bytes (VmHWM).
fn peak_rss() -> Result<u64, Error> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// One phase in this process: prints `phase case peak_bytes seconds detail`.
async fn child(phase: &str, case: &str, dir: &Path) -> Result<(), Error> {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.join(format!("repo-{case}")))?);
    let volume = VolumeName::new(case)?;
    let snapshot = SnapshotName::new("full")?;
    let opts = EngineOptions {
        compression_level: 1,
        ..EngineOptions::default()
    };
    let started = Instant::now();
    let detail = match phase {
        "backup" => {
            let repo = Repository::init(
                store,
                InitOptions {
                    chunk_size: Some(CHUNK),
                    now: Timestamp(0),
                },
            )
            .await?;
            let src = source(case)?;
            let allocated = match case {
                "sparse" => Some(sparse_source().allocated().clone()),
                _ => None,
            };
            let req = BackupRequest {
                volume,
                snapshot,
                mode: BackupMode::Full { allocated },
                created: Timestamp(1),
                source_info: Default::default(),
                labels: Default::default(),
                chunk_size: None,
                volume_size: None,
            };
            let out = engine::backup(&repo, src, req, &opts).await?;
            format!(
                "{} chunks read, {} stored in the map",
                out.stats.chunks_read,
                out.stats.chunks_read - out.stats.chunks_zero
            )
        }
        "restore" | "dry-run" => {
            let repo = Repository::open(store).await?;
            let target = dir.join(format!("restored-{case}.img"));
            let _ = std::fs::remove_file(&target);
            let r = engine::restore(
                &repo,
                &volume,
                &snapshot,
                &target,
                &RestoreOptions {
                    dry_run: phase == "dry-run",
                    ..RestoreOptions::default()
                },
                &opts,
            )
            .await?;
            let _ = std::fs::remove_file(&target);
            format!(
                "{} chunks, {} map entries held at most",
                r.chunks, r.map_entries_peak
            )
        }
        "verify" => {
            // `cbt verify --read-data`: every map walked segment by segment, each distinct
            // chunk downloaded once; the store's chunk table is what grows (56 bytes per
            // stored chunk), not the map.
            let repo = Repository::open(store).await?;
            let r = repo
                .verify(&VerifyOptions {
                    read_data: true,
                    ..VerifyOptions::default()
                })
                .await?;
            if !r.is_ok() {
                return Err(format!("verify found problems: {:?}", r.problems).into());
            }
            format!(
                "{} references, {} chunks read, {} map entries held at most",
                r.chunk_refs, r.chunks_read, r.map_entries_peak
            )
        }
        "load-whole" => {
            // Baseline of the same run: what holding the whole map costs (how restore worked
            // before it walked segments, and how a full backup held its map).
            let repo = Repository::open(store).await?;
            let m = repo.load_manifest(&volume, &snapshot).await?;
            format!("{} entries loaded whole", m.chunks.stored_count())
        }
        other => return Err(format!("unknown phase {other}").into()),
    };
    println!(
        "{phase} {case} {} {:.1} {detail}",
        peak_rss()?,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let (phase, case, dir) = (&args[1], &args[2], PathBuf::from(&args[3]));
        let rt = tokio::runtime::Runtime::new()?;
        return rt.block_on(child(phase, case, &dir));
    }
    let cases: Vec<String> = if args.is_empty() {
        vec!["sparse".into(), "dense".into()]
    } else {
        args
    };
    let base =
        std::env::var_os("CBT_BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let work = tempfile::Builder::new()
        .prefix("cbt-memory-peak-")
        .tempdir_in(base)?;
    let exe = std::env::current_exe()?;
    // `CBT_MEMORY_PHASES=backup,load-whole` runs some phases only (backup always comes first).
    let phases: Vec<String> = std::env::var("CBT_MEMORY_PHASES")
        .unwrap_or_else(|_| "backup,dry-run,restore,verify,load-whole".into())
        .split(',')
        .map(str::to_string)
        .collect();
    println!("peak RSS per phase (each in its own process); bound 256 MiB");
    println!(
        "{:<8} {:<7} {:>10} {:>8}  detail",
        "phase", "volume", "peak MiB", "seconds"
    );
    for case in &cases {
        for phase in &phases {
            let out = Command::new(&exe)
                .args(["--child", phase, case])
                .arg(work.path())
                .output()?;
            if !out.status.success() {
                return Err(format!(
                    "{phase} {case} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let mut f = line.trim().splitn(5, ' ');
            let (p, c, peak, secs, detail) = (
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or("0").parse::<u64>().unwrap_or(0),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
            );
            println!(
                "{p:<8} {c:<7} {:>10.1} {secs:>8}  {detail}",
                peak as f64 / MIB as f64
            );
        }
    }
    Ok(())
}
