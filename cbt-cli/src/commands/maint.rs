//! Maintenance and inspection commands: verify, list, show, delete, prune, status, lock.

use std::fmt::Write as _;

use cbt_core::gc::RetentionPolicy;
use cbt_core::text::Escaped;
use cbt_core::{SnapshotName, Timestamp, VolumeName};
use cbt_store::repo::{BreakMode, PruneOptions, RepoError, SnapshotSummary, VerifyOptions};
use clap::{ArgGroup, Args, Subcommand};

use super::parse;
use crate::Ctx;
use crate::error::{CliError, ExitClass};
use crate::output::bytes;

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// Arguments of `cbt verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this volume.
    #[arg(long)]
    pub volume: Option<String>,
    /// Only this snapshot (needs --volume).
    #[arg(long, requires = "volume")]
    pub snapshot: Option<String>,
    /// Download every referenced chunk and check crc32c and content hash (not only presence
    /// and size).
    #[arg(long)]
    pub read_data: bool,
    /// Downloads in flight with --read-data.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

/// Runs `cbt verify`; exits 3 if anything is wrong.
pub async fn verify(ctx: &Ctx, args: VerifyArgs) -> Result<(), CliError> {
    let volume = args.volume.as_deref().map(VolumeName::new).transpose()?;
    let snapshot = args
        .snapshot
        .as_deref()
        .map(SnapshotName::new)
        .transpose()?;
    let repo = ctx.repo().await?;
    let report = repo
        .verify(&VerifyOptions {
            volume,
            snapshot,
            read_data: args.read_data,
            concurrency: args.jobs,
        })
        .await?;
    ctx.out.emit(&report, || {
        let mut s = format!(
            "checked {} snapshots, {} chunk references{}",
            report.snapshots,
            report.chunk_refs,
            if args.read_data {
                format!(
                    ", read {} chunks ({})",
                    report.chunks_read,
                    bytes(report.bytes_read)
                )
            } else {
                String::new()
            }
        );
        if report.is_ok() {
            s.push_str("\nno problems found");
        }
        for p in &report.problems {
            let _ = write!(
                s,
                "\nPROBLEM {} chunk {} ({}): {:?}",
                p.snapshot,
                p.index.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                p.key,
                p.problem
            );
        }
        s
    });
    if report.is_ok() {
        Ok(())
    } else {
        Err(CliError {
            reported: false,
            class: ExitClass::Integrity,
            message: format!("verify found {} problem(s)", report.problems.len()),
            hint: Some(
                "snapshots listed above cannot be fully restored; re-run their backups as full \
                 backups under new names"
                    .into(),
            ),
        })
    }
}

/// Arguments of `cbt list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this volume.
    #[arg(long)]
    pub volume: Option<String>,
}

fn summary_line(s: &SnapshotSummary) -> String {
    format!(
        "{:<24} {:<28} {:<25} {:>10} {:>10} {}",
        s.volume.as_str(),
        s.snapshot.as_str(),
        s.created.to_rfc3339(),
        bytes(s.volume_size),
        bytes(s.allocated_bytes),
        s.parent
            .as_ref()
            .map(|p| p.snapshot.as_str())
            .unwrap_or("-")
    )
}

/// Runs `cbt list`.
pub async fn list(ctx: &Ctx, args: ListArgs) -> Result<(), CliError> {
    let volume = args.volume.as_deref().map(VolumeName::new).transpose()?;
    let repo = ctx.repo().await?;
    let snaps = repo.list_snapshots(volume.as_ref()).await?;
    ctx.out.emit(&snaps, || {
        let mut s = format!(
            "{:<24} {:<28} {:<25} {:>10} {:>10} {}",
            "VOLUME", "SNAPSHOT", "CREATED", "SIZE", "ALLOCATED", "PARENT"
        );
        for snap in &snaps {
            s.push('\n');
            s.push_str(&summary_line(snap));
        }
        s
    });
    Ok(())
}

/// Arguments of `cbt show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Volume of the snapshot.
    #[arg(long)]
    pub volume: String,
    /// Snapshot to show.
    #[arg(long)]
    pub snapshot: String,
}

/// Runs `cbt show`.
pub async fn show(ctx: &Ctx, args: ShowArgs) -> Result<(), CliError> {
    let volume = VolumeName::new(&args.volume)?;
    let snapshot = SnapshotName::new(&args.snapshot)?;
    let repo = ctx.repo().await?;
    let m = repo.load_manifest(&volume, &snapshot).await?;
    let s = SnapshotSummary::of(&m);
    ctx.out.emit(&s, || {
        let mut t = String::new();
        let _ = writeln!(t, "volume:        {}", s.volume);
        let _ = writeln!(t, "snapshot:      {} ({})", s.snapshot, s.snapshot_id);
        let _ = writeln!(t, "created:       {}", s.created.to_rfc3339());
        let _ = writeln!(
            t,
            "parent:        {}",
            s.parent
                .as_ref()
                .map(|p| p.snapshot.as_str())
                .unwrap_or("-")
        );
        let _ = writeln!(t, "volume size:   {}", bytes(s.volume_size));
        let _ = writeln!(t, "chunk size:    {}", bytes(s.chunk_size));
        let _ = writeln!(
            t,
            "allocated:     {} in {} chunks",
            bytes(s.allocated_bytes),
            s.stored_chunks
        );
        let _ = writeln!(t, "stored:        {}", bytes(s.referenced_stored_bytes));
        // Labels are free text from the repository: escaped, like everything it wrote.
        for (k, v) in &s.labels {
            let _ = writeln!(t, "label:         {}={}", Escaped(k), Escaped(v));
        }
        let st = &s.stats;
        let _ = write!(
            t,
            "backup run:    read {}, uploaded {}, deduplicated {}, {:.1} s",
            bytes(st.bytes_read),
            bytes(st.bytes_uploaded),
            bytes(st.bytes_deduplicated),
            st.wall_ms as f64 / 1000.0
        );
        t
    });
    Ok(())
}

/// Arguments of `cbt delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Volume of the snapshot.
    #[arg(long)]
    pub volume: String,
    /// Snapshot to delete. Other snapshots never depend on it.
    #[arg(long)]
    pub snapshot: String,
}

/// Runs `cbt delete`.
pub async fn delete(ctx: &Ctx, args: DeleteArgs) -> Result<(), CliError> {
    let volume = VolumeName::new(&args.volume)?;
    let snapshot = SnapshotName::new(&args.snapshot)?;
    let repo = ctx.repo().await?;
    repo.delete_snapshot(&volume, &snapshot).await?;
    ctx.out.emit(
        &serde_json::json!({"deleted": format!("{volume}/{snapshot}")}),
        || format!("deleted {volume}/{snapshot}; run `cbt prune` to reclaim its data"),
    );
    Ok(())
}

/// Arguments of `cbt prune`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("policy").required(true).multiple(true).args(["keep_last", "keep_within"])))]
pub struct PruneArgs {
    /// Keep the N newest snapshots of each volume.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep snapshots created within this long (e.g. 7d, 12h, 2w).
    #[arg(long, value_parser = parse::duration, value_name = "DURATION")]
    pub keep_within: Option<std::time::Duration>,
    /// Only this volume.
    #[arg(long)]
    pub volume: Option<String>,
    /// Show what would be deleted without deleting anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep unreferenced data written within this long (e.g. 24h, 2d; 0s deletes all of
    /// it): protects backups prune cannot see (a broken lock). Keep it well above the
    /// longest backup.
    #[arg(long, value_parser = parse::duration, value_name = "DURATION", default_value = "24h")]
    pub gc_grace: std::time::Duration,
}

/// Runs `cbt prune`.
pub async fn prune(ctx: &Ctx, args: PruneArgs) -> Result<(), CliError> {
    let volume = args.volume.as_deref().map(VolumeName::new).transpose()?;
    let repo = ctx.repo().await?;
    let report = repo
        .prune(&PruneOptions {
            policy: RetentionPolicy {
                keep_last: args.keep_last,
                keep_within: args.keep_within,
            },
            now: now(),
            volume,
            dry_run: args.dry_run,
            gc_grace: args.gc_grace,
        })
        .await?;
    ctx.out.emit(&report, || {
        let verb = if report.gc.dry_run {
            "would remove"
        } else {
            "removed"
        };
        let mut s = String::new();
        for (vol, d) in &report.decisions {
            for (snap, reasons) in &d.keep {
                let _ = writeln!(s, "keep   {vol}/{snap} ({reasons:?})");
            }
            for snap in &d.remove {
                let _ = writeln!(s, "remove {vol}/{snap}");
            }
        }
        let _ = write!(
            s,
            "{verb} {} snapshot(s) and {} chunk(s) ({}); kept {} chunk(s)",
            report.removed.len(),
            report.gc.deleted_chunks,
            bytes(report.gc.reclaimed_bytes),
            report.gc.kept_chunks
        );
        if report.gc.recent_chunks > 0 {
            let _ = write!(
                s,
                "\n{} unreferenced chunk(s) ({}) are younger than the grace period and stay",
                report.gc.recent_chunks,
                bytes(report.gc.recent_bytes)
            );
        }
        if !report.gc.missing_chunks.is_empty() {
            let _ = write!(
                s,
                "\nwarning: {} referenced chunk(s) are missing; run `cbt verify`",
                report.gc.missing_chunks.len()
            );
        }
        s
    });
    Ok(())
}

/// Runs `cbt status`.
pub async fn status(ctx: &Ctx) -> Result<(), CliError> {
    let repo = ctx.repo().await?;
    let st = repo.status().await?;
    ctx.out.emit(&st, || {
        let mut s = format!(
            "repository {} (chunk size {})\n{} snapshot(s), {} logical, {} stored in {} chunk(s), \
             ratio {:.2}",
            Escaped(&repo.config().id),
            bytes(repo.config().chunk_size),
            st.snapshots.len(),
            bytes(st.logical_bytes),
            bytes(st.stored_bytes),
            st.stored_chunks,
            st.dedup_ratio
        );
        if st.unreferenced_chunks > 0 {
            let _ = write!(
                s,
                "\n{} unreferenced chunk(s) ({}) will be reclaimed by the next prune",
                st.unreferenced_chunks,
                bytes(st.unreferenced_bytes)
            );
        }
        for snap in &st.snapshots {
            let _ = write!(
                s,
                "\n  {}/{}: {} allocated, {} exclusive",
                snap.summary.volume,
                snap.summary.snapshot,
                bytes(snap.summary.allocated_bytes),
                bytes(snap.exclusive_stored_bytes)
            );
        }
        s
    });
    Ok(())
}

/// `cbt lock` subcommands.
#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// List the locks held on the repository.
    List,
    /// Remove a lock left by a process that died. Refuses while the holder is alive on this
    /// host, or when that cannot be told (another host), unless --force.
    Break {
        /// Id of the lock to remove.
        id: String,
        /// Break it even if its holder may still be running: that backup then fails before
        /// committing, and a prune it was protecting against may delete data it uses.
        #[arg(long)]
        force: bool,
    },
}

/// Runs a `cbt lock` subcommand.
pub async fn lock(ctx: &Ctx, cmd: LockCommand) -> Result<(), CliError> {
    let repo = ctx.repo().await?;
    match cmd {
        LockCommand::List => {
            let locks = repo.list_locks().await?;
            ctx.out.emit(&locks, || {
                if locks.is_empty() {
                    return "no locks".into();
                }
                locks
                    .iter()
                    .map(|l| {
                        format!(
                            "{} {:?} {} on {} pid {} since {}",
                            Escaped(&l.id),
                            l.kind,
                            Escaped(&l.purpose),
                            Escaped(&l.host),
                            l.pid,
                            l.created.to_rfc3339()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        LockCommand::Break { id, force } => {
            let mode = if force {
                BreakMode::Force
            } else {
                BreakMode::IfHolderGone
            };
            match repo.break_lock(&id, mode).await {
                Ok(Some(info)) => {
                    if force && info.holder_gone_here() != Some(true) {
                        eprintln!(
                            "warning: broke {} although its holder may still be running; if it \
                             is, its backup will fail before committing, or its prune may have \
                             deleted data: run `cbt verify` once it has finished",
                            info.describe()
                        );
                    }
                    ctx.out.emit(&serde_json::json!({"broken": id}), || {
                        format!("removed lock {}", Escaped(&id))
                    });
                    Ok(())
                }
                Ok(None) => Err(
                    CliError::usage(format!("no lock with id `{}`", Escaped(&id)))
                        .with_hint("see `cbt lock list`"),
                ),
                Err(e @ RepoError::LockInUse { .. }) => Err(CliError::from(e)
                    .with_hint("wait for it to finish; if you are sure it is gone, pass --force")),
                Err(e) => Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prune_grace_default_is_the_library_default() {
        assert_eq!(
            super::parse::duration("24h"),
            Ok(cbt_store::repo::DEFAULT_GC_GRACE)
        );
    }
}
