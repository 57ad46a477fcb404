//! `cbt restore`: write a snapshot to a device or image file.

use std::path::PathBuf;

use cbt_core::{SnapshotName, VolumeName};
use cbt_store::engine::{self, RestoreOptions};
use clap::Args;

use super::backup::engine_options;
use crate::Ctx;
use crate::error::CliError;
use crate::output::bytes;

/// Arguments of `cbt restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Volume of the snapshot.
    #[arg(long)]
    pub volume: String,
    /// Snapshot to restore.
    #[arg(long)]
    pub snapshot: String,
    /// Image file to create, or block device to write (needs --overwrite if it exists).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "to_pvc",
        conflicts_with = "to_pvc"
    )]
    pub target: Option<PathBuf>,
    /// Allow writing over an existing file or device (with --to-pvc: into an existing block PVC
    /// at least the volume's size; its contents are lost).
    #[arg(long)]
    pub overwrite: bool,
    /// Treat an existing file like a device: keep its size, write zeros where the snapshot
    /// has zeros (instead of truncating it).
    #[arg(long, requires = "overwrite")]
    pub in_place: bool,
    /// Show what would be restored without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Downloads in flight.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: Option<u16>,
    /// Restore into a new PersistentVolumeClaim (--to-pvc, --storage-class, --size).
    #[command(flatten, next_help_heading = "Kubernetes PVCs")]
    pub pvc: Box<super::k8s::PvcRestoreArgs>,
    /// Cluster and data-mover settings for --to-pvc.
    #[command(flatten, next_help_heading = "Kubernetes PVCs")]
    pub kube: Box<super::k8s::KubeArgs>,
}

/// Runs `cbt restore`.
pub async fn run(ctx: &Ctx, args: RestoreArgs) -> Result<(), CliError> {
    if args.pvc.to_pvc.is_some() {
        return super::k8s::restore(
            ctx,
            &args.volume,
            &args.snapshot,
            &args.pvc,
            &args.kube,
            args.dry_run,
            args.overwrite,
        )
        .await;
    }
    let Some(target) = &args.target else {
        return Err(CliError::usage("--target (or --to-pvc) is required"));
    };
    let volume = VolumeName::new(&args.volume)?;
    let snapshot = SnapshotName::new(&args.snapshot)?;
    let repo = ctx.repo().await?;
    let mut opts = engine_options(args.jobs, 3);
    let bar = if args.dry_run {
        None
    } else {
        ctx.out.progress("restore")
    };
    if let Some((_, cb)) = &bar {
        opts.progress = Some(cb.clone());
    }
    let result = engine::restore(
        &repo,
        &volume,
        &snapshot,
        target,
        &RestoreOptions {
            overwrite: args.overwrite,
            in_place: args.in_place,
            dry_run: args.dry_run,
        },
        &opts,
    )
    .await;
    if let Some((b, _)) = bar {
        b.finish_and_clear();
    }
    let r = result?;
    ctx.out.emit(&r, || {
        if r.dry_run {
            format!(
                "dry run: would restore {}/{} ({}) to {} as {:?}: {} chunks, {} to download",
                r.volume,
                r.snapshot,
                bytes(r.volume_size),
                r.target.display(),
                r.kind,
                r.chunks,
                bytes(r.bytes_downloaded)
            )
        } else {
            format!(
                "restored {}/{} ({}) to {}: {} chunks, {} downloaded, {} written, {} zeroed, \
                 {:.1} s, {:.1} MB/s",
                r.volume,
                r.snapshot,
                bytes(r.volume_size),
                r.target.display(),
                r.chunks,
                bytes(r.bytes_downloaded),
                bytes(r.bytes_written),
                bytes(r.bytes_zeroed),
                r.wall_ms as f64 / 1000.0,
                r.write_mb_per_s
            )
        }
    });
    Ok(())
}
