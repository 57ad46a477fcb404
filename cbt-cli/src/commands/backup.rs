//! `cbt backup`: back up a device or image file as a new snapshot.

use std::path::PathBuf;
use std::sync::Arc;

use cbt_core::manifest::SourceInfo;
use cbt_core::{SnapshotName, Timestamp, VolumeName};
use cbt_store::engine::cbt::plan_cbt_backup;
use cbt_store::engine::{self, BackupMode, BackupRequest, DirectIo, EngineOptions, FileSource};
use clap::{ArgGroup, Args};

use super::parse::{self, RANGES_FORMAT_HELP};
use crate::Ctx;
use crate::error::{CliError, ExitClass};
use crate::output::bytes;

/// Arguments of `cbt backup`.
#[derive(Debug, Args)]
#[command(
    after_long_help = RANGES_FORMAT_HELP,
    group(ArgGroup::new("mode").required(true).args(["full", "changed_ranges", "metadata_endpoint", "pvcs", "selector"]))
)]
pub struct BackupArgs {
    /// Block device or image file to read (e.g. the device of a snapshot-backed PVC).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["pvcs", "selector"], conflicts_with_all = ["pvcs", "selector"])]
    pub device: Option<PathBuf>,
    /// Volume name the snapshot belongs to (letters, digits, `.`, `-`, `_`); with --pvc it is
    /// `<namespace>.<pvc>`.
    #[arg(long, required_unless_present_any = ["pvcs", "selector"])]
    pub volume: Option<String>,
    /// Name of the new snapshot (must not exist yet); with --pvc, the time of the run
    /// (`YYYYMMDDTHHMMSSZ`).
    #[arg(long, required_unless_present_any = ["pvcs", "selector"])]
    pub snapshot: Option<String>,
    /// Read every allocated chunk. All-zero chunks are detected and not stored. With --parent,
    /// the parent is recorded as lineage (for when no delta can be had) and chunks identical to
    /// the parent's cost neither an upload nor an existence check.
    #[arg(long)]
    pub full: bool,
    /// With --full: JSON file of the allocated ranges (CSI GetMetadataAllocated); without it
    /// the device's own data map (SEEK_DATA) or the whole device is read.
    #[arg(long, requires = "full", value_name = "FILE.json")]
    pub allocated_ranges: Option<PathBuf>,
    /// JSON file of the ranges changed since --parent (CSI GetMetadataDelta); only the chunks
    /// they touch are read, every other chunk is taken from the parent.
    #[arg(long, requires = "parent", value_name = "FILE.json")]
    pub changed_ranges: Option<PathBuf>,
    /// Snapshot the changed ranges are relative to (same volume); with --full, the lineage
    /// to record.
    #[arg(long)]
    pub parent: Option<String>,
    /// Label recorded in the snapshot (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Chunk size of a full backup (default: the repository's). Incrementals keep the parent's.
    #[arg(long, value_parser = parse::size)]
    pub chunk_size: Option<u64>,
    /// zstd level for chunk data (0 stores raw; 1, the default, is fastest; higher levels
    /// store less and take longer). Chunks a sample shows incompressible are stored raw.
    #[arg(
        long,
        default_value_t = cbt_store::chunk::DEFAULT_COMPRESSION_LEVEL,
        value_parser = clap::value_parser!(i32).range(0..=19)
    )]
    pub compression_level: i32,
    /// Read --device with O_DIRECT, past the page cache: `auto` does for block devices (no
    /// kernel copy per byte, and the node's cached data is not evicted) and reads image files
    /// through the cache; `always` and `never` force either. Where the kernel refuses
    /// O_DIRECT, the device is read through the cache. (--pvc data movers use `auto`.)
    #[arg(long, value_enum, default_value_t = DirectIoArg::Auto, value_name = "WHEN", conflicts_with_all = ["pvcs", "selector"])]
    pub direct_io: DirectIoArg,
    /// Uploads in flight (and at most this many compression workers).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: Option<u16>,
    /// Ranges from a SnapshotMetadata service (--metadata-endpoint, --snapshot-id, ...).
    #[command(flatten)]
    pub cbt: Box<crate::metadata_cmd::CbtBackupArgs>,
    /// Back up PersistentVolumeClaims in a cluster (--pvc, --selector, ...).
    #[command(flatten, next_help_heading = "Kubernetes PVCs")]
    pub pvc: Box<super::k8s::PvcBackupArgs>,
    /// Cluster and data-mover settings for --pvc.
    #[command(flatten, next_help_heading = "Kubernetes PVCs")]
    pub kube: Box<super::k8s::KubeArgs>,
}

/// `--direct-io` values (see [`DirectIo`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectIoArg {
    /// Block devices with O_DIRECT, image files through the page cache.
    Auto,
    /// O_DIRECT whenever the kernel accepts it.
    Always,
    /// Through the page cache.
    Never,
}

impl From<DirectIoArg> for DirectIo {
    fn from(a: DirectIoArg) -> Self {
        match a {
            DirectIoArg::Auto => DirectIo::Auto,
            DirectIoArg::Always => DirectIo::Always,
            DirectIoArg::Never => DirectIo::Never,
        }
    }
}

/// Engine options from `--jobs` / `--compression-level`.
pub fn engine_options(jobs: Option<u16>, compression_level: i32) -> EngineOptions {
    let mut opts = EngineOptions {
        compression_level,
        ..EngineOptions::default()
    };
    if let Some(j) = jobs {
        opts.transfers = usize::from(j);
        opts.workers = opts.workers.min(usize::from(j));
    }
    opts
}

/// Runs `cbt backup`.
pub async fn run(ctx: &Ctx, args: BackupArgs) -> Result<(), CliError> {
    if args.pvc.group && args.pvc.selector.is_none() {
        return Err(CliError::usage("--group needs --selector")
            .with_hint("a group snapshot is cut of the PVCs a label selector matches, e.g. --selector app=postgres --group"));
    }
    if !args.pvc.pvcs.is_empty() || args.pvc.selector.is_some() {
        let labels = parse::labels(&args.labels)?;
        return super::k8s::backup(ctx, &args.pvc, &args.kube, labels, args.cbt.fallback_full)
            .await;
    }
    let (Some(device), Some(volume), Some(snapshot)) = (&args.device, &args.volume, &args.snapshot)
    else {
        return Err(CliError::usage(
            "--device, --volume and --snapshot are required without --pvc",
        ));
    };
    if args.cbt.fallback_full && args.cbt.metadata_endpoint.is_none() {
        return Err(CliError::usage(
            "--fallback-full needs --metadata-endpoint (or --pvc): there is no service to fall back from",
        ));
    }
    let volume = VolumeName::new(volume)?;
    let snapshot = SnapshotName::new(snapshot)?;
    let parent = args.parent.as_deref().map(SnapshotName::new).transpose()?;
    let labels = parse::labels(&args.labels)?;
    let allocated = args
        .allocated_ranges
        .as_deref()
        .map(parse::ranges_file)
        .transpose()?;
    let changed = args
        .changed_ranges
        .as_deref()
        .map(parse::ranges_file)
        .transpose()?;

    let source = FileSource::open_with(device, args.direct_io.into()).map_err(|e| {
        let class = if e.kind() == std::io::ErrorKind::NotFound
            || e.kind() == std::io::ErrorKind::PermissionDenied
        {
            ExitClass::Usage
        } else {
            ExitClass::Transient
        };
        CliError {
            reported: false,
            class,
            message: format!("cannot open --device {}: {e}", device.display()),
            hint: None,
        }
    })?;

    let repo = ctx.repo().await?;
    let service = match (
        &args.cbt.metadata_endpoint,
        crate::metadata_cmd::cbt_spec(&args.cbt, &volume, parent.as_ref())?,
    ) {
        (Some(endpoint), Some(spec)) => {
            let client =
                cbt_csi::MetadataClient::connect(args.cbt.conn.client_config(endpoint)?).await?;
            let plan = plan_cbt_backup(&repo, &client, &spec).await?;
            if let (Some(q), Some(s)) = (&plan.query, &plan.metadata) {
                eprintln!("metadata: {}", crate::metadata_cmd::describe_answer(q, s));
            }
            for note in &plan.notes {
                eprintln!("warning: {note}");
            }
            Some(plan)
        }
        (Some(_), None) => {
            return Err(CliError::usage("--metadata-endpoint needs --snapshot-id"));
        }
        _ => None,
    };
    let mut csi_source = SourceInfo::default();
    let (mode, volume_size) = match (service, changed, parent) {
        (Some(plan), _, _) => {
            csi_source = plan.source;
            (plan.mode, plan.volume_size)
        }
        (None, Some(changed), Some(parent)) => {
            // The head only, read once: the engine reads just the map segments the change
            // touches, and checks at the commit that the parent is still this head.
            let parent_head = repo.load_head(&volume, &parent).await?;
            (
                BackupMode::IncrementalOf {
                    parent: Box::new(parent_head),
                    changed: changed.ranges,
                },
                Some(changed.volume_size),
            )
        }
        (None, _, parent) => {
            let size = allocated.as_ref().map(|a| a.volume_size);
            let allocated = allocated.map(|a| a.ranges);
            let mode = match parent {
                Some(parent) => {
                    let parent_head = repo.load_head(&volume, &parent).await?;
                    BackupMode::FullWithParent {
                        allocated,
                        parent: parent_head.as_parent(),
                    }
                }
                None => BackupMode::Full { allocated },
            };
            (mode, size)
        }
    };
    let req = BackupRequest {
        volume,
        snapshot,
        mode,
        created: Timestamp::from_system_time(std::time::SystemTime::now()),
        source_info: SourceInfo {
            path: Some(device.display().to_string()),
            ..csi_source
        },
        labels,
        chunk_size: args.chunk_size,
        volume_size,
    };
    let mut opts = engine_options(args.jobs, args.compression_level);
    let bar = ctx.out.progress("backup");
    if let Some((_, cb)) = &bar {
        opts.progress = Some(cb.clone());
    }
    let source = Arc::new(source);
    let result = engine::backup(&repo, source.clone(), req, &opts).await;
    if let Some((b, _)) = bar {
        b.finish_and_clear();
    }
    let outcome = result?;
    let m = &outcome.head;
    let s = &outcome.stats;
    let read = source.read_counts();
    ctx.out.emit(
        &serde_json::json!({
            "volume": m.volume,
            "snapshot": m.snapshot,
            "snapshot_id": m.snapshot_id,
            "parent": m.parent.as_ref().map(|p| &p.snapshot),
            "volume_size": m.volume_size(),
            "chunk_size": m.chunk_size(),
            "stats": s,
            "read_mb_per_s": outcome.read_mb_per_s,
            "source_read": read,
        }),
        || {
            format!(
                "snapshot {}/{} committed ({}{})\n  ranges cover {}; read {} in whole chunks, of which {} \
                 {}\n  uploaded {} in {} object(s), deduplicated {}, zero {}\n  \
                 {:.1} s, {:.1} MB/s read{}",
                m.volume,
                m.snapshot,
                m.snapshot_id,
                m.parent
                    .as_ref()
                    .map(|p| format!(", parent {}", p.snapshot))
                    .unwrap_or_default(),
                bytes(s.bytes_in_ranges),
                bytes(s.bytes_read),
                bytes(s.bytes_changed),
                if m.parent.is_some() {
                    "differ from the parent"
                } else {
                    "hold data"
                },
                bytes(s.bytes_uploaded),
                s.objects_written,
                bytes(s.bytes_deduplicated),
                bytes(s.bytes_zero),
                s.wall_ms as f64 / 1000.0,
                outcome.read_mb_per_s,
                if read.direct_bytes > 0 {
                    format!(" ({} with O_DIRECT)", bytes(read.direct_bytes))
                } else {
                    String::new()
                }
            )
        },
    );
    Ok(())
}
