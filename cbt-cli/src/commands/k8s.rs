//! The Kubernetes flavour of `cbt backup` (`--pvc`, `--selector [--group]`) and `cbt restore`
//! (`--to-pvc`), and the data mover (`cbt mover`) their Jobs run. Flags and printing only; the
//! work is `cbt_k8s::pvc_backup` and `cbt_k8s::mover`.

use std::path::PathBuf;
use std::time::Duration;

use cbt_core::{SnapshotName, Timestamp, VolumeName};
use cbt_k8s::ClusterTarget;
use cbt_k8s::pvc_backup::group::{GroupBackupOptions, GroupBackupOutcome, back_up_group};
use cbt_k8s::pvc_backup::objects::MoverRuntime;
use cbt_k8s::pvc_backup::{
    PvcBackupOptions, PvcBackupReport, PvcRestoreOptions, RepoTarget, back_up_pvc, restore_to_pvc,
};
use clap::Args;
use tokio::sync::watch;

use crate::Ctx;
use crate::error::{CliError, ExitClass};
use crate::output::bytes;

/// Which cluster, and how movers run (shared by `backup --pvc` and `restore --to-pvc`).
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Namespace of the PVC(s) (default: the context's namespace).
    #[arg(
        short = 'n',
        long = "namespace",
        id = "pvc_namespace",
        value_name = "NS"
    )]
    pub namespace: Option<String>,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, else the pod's service account).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
    /// Container image with the `cbt` binary, run as the data mover: built from the
    /// repository's Dockerfile and pushed to a registry the cluster can pull from.
    #[arg(long, env = "CBT_MOVER_IMAGE")]
    pub image: Option<String>,
    /// ServiceAccount the mover runs as: the backup identity whose token the metadata sidecar
    /// checks (it needs `get volumesnapshots` in the namespace).
    #[arg(long, default_value = "cbt-mover")]
    pub service_account: String,
    /// Secret in the namespace holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally
    /// AWS_SESSION_TOKEN) for the repository; passed to the mover by reference only.
    #[arg(long, value_name = "SECRET")]
    pub s3_secret: Option<String>,
    /// Seconds a mover Job may run.
    #[arg(long, default_value_t = 6 * 3600)]
    pub mover_timeout_secs: i64,
}

/// `cbt backup --pvc` flags.
#[derive(Debug, Clone, Args)]
pub struct PvcBackupArgs {
    /// PersistentVolumeClaim to back up (repeatable).
    #[arg(long = "pvc", value_name = "NAME")]
    pub pvcs: Vec<String>,
    /// Back up every PVC matching this label selector (e.g. app=postgres).
    #[arg(long, short = 'l', conflicts_with = "pvcs")]
    pub selector: Option<String>,
    /// VolumeSnapshotClass (default: the driver's default class).
    #[arg(long, conflicts_with = "group")]
    pub snapshot_class: Option<String>,
    /// Cut every PVC matching --selector at one crash-consistent instant (a
    /// VolumeGroupSnapshot), then back up each incrementally against its own previous backup.
    // Not `requires = "selector"`: clap lets the "mode" group (which --full or --pvc satisfy)
    // stand in for it, so `cbt backup` checks for --selector itself.
    #[arg(long, conflicts_with = "pvcs")]
    pub group: bool,
    /// VolumeGroupSnapshotClass for --group (default: the driver's default group class).
    #[arg(long, requires = "group", value_name = "CLASS")]
    pub group_snapshot_class: Option<String>,
    /// Seconds to wait for a VolumeSnapshot to become ready.
    #[arg(long, default_value_t = 600)]
    pub snapshot_timeout_secs: u64,
    /// VolumeSnapshots cut by cbt kept per PVC (the newest; at least 1, the next delta's base);
    /// with --group, VolumeGroupSnapshots kept per selector.
    #[arg(long, default_value_t = 1)]
    pub keep_snapshots: usize,
    /// PVCs backed up at once (with --group: members).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Print the objects that would be created, as YAML (JSON with -o json), and create nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `cbt restore --to-pvc` flags.
#[derive(Debug, Clone, Args)]
pub struct PvcRestoreArgs {
    /// Create this PVC and restore the snapshot into it.
    #[arg(long, value_name = "NAME")]
    pub to_pvc: Option<String>,
    /// StorageClass of the new PVC (default: the one recorded at backup).
    #[arg(long, requires = "to_pvc")]
    pub storage_class: Option<String>,
    /// Size of the new PVC (default: the recorded volume size; never smaller).
    #[arg(long, requires = "to_pvc", value_parser = super::parse::size)]
    pub size: Option<u64>,
}

/// Connects to the cluster `kubeconfig` and `context` name (defaults as kubectl's).
pub(crate) async fn connect(
    kubeconfig: &Option<PathBuf>,
    context: &Option<String>,
) -> Result<cbt_k8s::Cluster, CliError> {
    cbt_k8s::connect(&ClusterTarget {
        kubeconfig: kubeconfig.clone(),
        context: context.clone(),
    })
    .await
    .map_err(k8s_error)
}

/// [`connect`], and `namespace` resolved against the context's default namespace.
pub(crate) async fn connect_in(
    kubeconfig: &Option<PathBuf>,
    context: &Option<String>,
    namespace: &Option<String>,
) -> Result<(cbt_k8s::Cluster, String), CliError> {
    let cluster = connect(kubeconfig, context).await?;
    let namespace = namespace
        .clone()
        .unwrap_or_else(|| cluster.default_namespace.clone());
    Ok((cluster, namespace))
}

/// A Kubernetes-layer error as the CLI reports it (class from its kind).
pub(crate) fn k8s_error(e: cbt_k8s::Error) -> CliError {
    let class = ExitClass::from(e.kind());
    CliError {
        reported: false,
        class,
        message: e.to_string(),
        hint: None,
    }
}

/// The mover Job's settings; `key_file`: the repository is opened with a key file, which the
/// Job then takes from the S3 Secret instead of `CBT_PASSWORD`.
fn runtime(kube: &KubeArgs, key_file: bool) -> Result<MoverRuntime, CliError> {
    let image = kube.image.clone().ok_or_else(|| {
        CliError::usage("the data mover needs an image: pass --image (or set CBT_MOVER_IMAGE)")
            .with_hint(
                "build it from the repository's Dockerfile and push it to a registry the cluster pulls from",
            )
    })?;
    Ok(MoverRuntime {
        image,
        service_account: kube.service_account.clone(),
        s3_secret: kube.s3_secret.clone(),
        key_file,
        token_audience: None,
        active_deadline_seconds: kube.mover_timeout_secs.max(60),
    })
}

fn repo_target(ctx: &Ctx) -> Result<RepoTarget, CliError> {
    let repo = ctx.repo_url.clone().ok_or_else(|| {
        CliError::config("no repository given")
            .with_hint("pass --repo s3://bucket/prefix (or set CBT_REPO)")
    })?;
    if repo.starts_with("file://") {
        eprintln!(
            "warning: {repo} is a local path: the mover pod must see the same path (use an s3:// repository in a cluster)"
        );
    }
    Ok(RepoTarget {
        repo,
        s3: ctx.s3.clone(),
    })
}

/// Sets the returned flag on Ctrl-C or SIGTERM, so running work can clean up.
fn cancel_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("interrupted: cleaning up what this run created");
        let _ = tx.send(true);
    });
    rx
}

/// The repository snapshot name of a run at `now`: `YYYYMMDDTHHMMSSZ`.
pub fn run_name(now: Timestamp) -> String {
    let t = now.to_rfc3339();
    // 2026-11-30T10:00:00.123Z -> 20261130T100000Z
    let (date_time, _) = t.split_once('.').unwrap_or((&t, ""));
    format!("{}Z", date_time.replace(['-', ':'], ""))
}

fn print_objects(ctx: &Ctx, objects: &[serde_json::Value]) -> Result<(), CliError> {
    if ctx.out.json() {
        println!(
            "{}",
            serde_json::to_string_pretty(objects).unwrap_or_default()
        );
        return Ok(());
    }
    for o in objects {
        let yaml = serde_saphyr::to_string(o).map_err(|e| CliError {
            reported: false,
            class: ExitClass::Internal,
            message: format!("cannot print an object as YAML: {e}"),
            hint: None,
        })?;
        println!("---\n{}", yaml.trim_end());
    }
    Ok(())
}

/// Runs `cbt backup --pvc ...`.
pub async fn backup(
    ctx: &Ctx,
    pvcs: &PvcBackupArgs,
    kube: &KubeArgs,
    labels: std::collections::BTreeMap<String, String>,
    fallback_full: bool,
) -> Result<(), CliError> {
    let dry_run = pvcs.dry_run;
    let target = repo_target(ctx)?;
    if !dry_run {
        // Fail on a wrong repository or credentials before anything is created in the cluster.
        ctx.repo().await?;
    }
    let (cluster, namespace) = connect_in(&kube.kubeconfig, &kube.context, &kube.namespace).await?;
    let names: Vec<String> = match &pvcs.selector {
        Some(sel) => cbt_k8s::pvc::pvcs_matching(&cluster, &namespace, sel)
            .await
            .map_err(k8s_error)?,
        None => pvcs.pvcs.clone(),
    };
    if names.is_empty() {
        return Err(
            CliError::usage(format!("no PVC to back up in namespace {namespace}"))
                .with_hint("name PVCs with --pvc, or check the --selector"),
        );
    }
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    let opts = PvcBackupOptions {
        namespace: namespace.clone(),
        target,
        runtime: runtime(kube, ctx.key_file.is_some())?,
        snapshot_class: pvcs.snapshot_class.clone(),
        snapshot_timeout: Duration::from_secs(pvcs.snapshot_timeout_secs.max(1)),
        keep_snapshots: pvcs.keep_snapshots.max(1),
        fallback_full,
        run_name: run_name(now),
        labels,
        dry_run,
    };
    let cancel = cancel_on_signal();
    if let (true, Some(selector)) = (pvcs.group, &pvcs.selector) {
        let opts = GroupBackupOptions {
            pvc: opts,
            selector: selector.clone(),
            group_class: pvcs.group_snapshot_class.clone(),
            concurrency: usize::from(pvcs.concurrency),
        };
        return group_backup(ctx, &cluster, &opts, cancel).await;
    }
    let results: Vec<(String, Result<PvcBackupReport, CliError>)> = {
        use futures::StreamExt;
        futures::stream::iter(names.iter().cloned())
            .map(|name| {
                let (cluster, opts, cancel) = (cluster.clone(), opts.clone(), cancel.clone());
                async move {
                    let r = back_up_pvc(&cluster, &name, &opts, cancel)
                        .await
                        .map_err(k8s_error);
                    (name, r)
                }
            })
            .buffered(usize::from(pvcs.concurrency))
            .collect()
            .await
    };
    if dry_run {
        let mut objects = Vec::new();
        for (_, r) in &results {
            if let Ok(rep) = r {
                objects.extend(rep.planned_objects.iter().cloned());
            }
        }
        print_objects(ctx, &objects)?;
    } else {
        let doc: Vec<serde_json::Value> = results
            .iter()
            .map(|(name, r)| match r {
                Ok(rep) => serde_json::json!({"pvc": name, "ok": true, "report": rep}),
                Err(e) => serde_json::json!({"pvc": name, "ok": false, "error": e.to_json()}),
            })
            .collect();
        ctx.out.emit(
            &serde_json::json!({ "namespace": namespace, "results": doc }),
            || human_backup_summary(&namespace, &results),
        );
    }
    let failures: Vec<CliError> = results.into_iter().filter_map(|(_, r)| r.err()).collect();
    // One class for the batch: the items' common class, or "partial" when they differ.
    let Some(class) = ExitClass::of_batch(failures.iter().map(|e| e.class)) else {
        return Ok(());
    };
    let mut failures = failures.into_iter();
    let Some(first) = failures.next() else {
        return Ok(());
    };
    let others = failures.count();
    let mut err = if others == 0 || names.len() == 1 {
        first
    } else {
        CliError {
            reported: false,
            class,
            message: format!(
                "{} of {} PVC backups failed (first: {})",
                others + 1,
                names.len(),
                first.message
            ),
            hint: first.hint,
        }
    };
    // The JSON document above already carries every error.
    err.reported = ctx.out.json() && !dry_run;
    Err(err)
}

/// `cbt backup --selector ... --group`: one VolumeGroupSnapshot, then each member.
async fn group_backup(
    ctx: &Ctx,
    cluster: &cbt_k8s::Cluster,
    opts: &GroupBackupOptions,
    cancel: watch::Receiver<bool>,
) -> Result<(), CliError> {
    let dry_run = opts.pvc.dry_run;
    let (outcome, error) = match back_up_group(cluster, opts, cancel).await {
        Ok(outcome) => (outcome, None),
        Err(failure) => (failure.outcome, Some(k8s_error(failure.error))),
    };
    let GroupBackupOutcome { report, members } = outcome;
    if dry_run && error.is_none() {
        return print_objects(ctx, &report.planned_objects);
    }
    let results: Vec<(String, Result<PvcBackupReport, CliError>)> = members
        .into_iter()
        .map(|m| (m.pvc, m.result.map_err(k8s_error)))
        .collect();
    let namespace = report.namespace.clone();
    let doc: Vec<serde_json::Value> = results
        .iter()
        .map(|(name, r)| match r {
            Ok(rep) => serde_json::json!({"pvc": name, "ok": true, "report": rep}),
            Err(e) => serde_json::json!({"pvc": name, "ok": false, "error": e.to_json()}),
        })
        .collect();
    let mut json = serde_json::json!({ "namespace": namespace, "group": report, "results": doc });
    if let Some(e) = &error {
        json["error"] = e.to_json();
    }
    ctx.out.emit(&json, || {
        let mut text = format!(
            "VolumeGroupSnapshot {namespace}/{} (class {}, cut at {}): {} member(s)\n",
            report.group.as_deref().unwrap_or("?"),
            report.group_class.as_deref().unwrap_or("?"),
            report.cut_time.as_deref().unwrap_or("?"),
            results.len()
        );
        let members = human_backup_summary(&namespace, &results);
        if !members.is_empty() {
            text.push_str(&members);
            text.push('\n');
        }
        for n in &report.notes {
            text.push_str(&format!("note: {n}\n"));
        }
        if !report.deleted_groups.is_empty() {
            text.push_str(&format!(
                "deleted old group snapshots: {}\n",
                report.deleted_groups.join(", ")
            ));
        }
        if report.group_deleted {
            text.push_str("the new group snapshot was deleted\n");
        }
        text
    });
    match error {
        None => Ok(()),
        Some(mut e) => {
            // The JSON document above already carries the error.
            e.reported = ctx.out.json();
            Err(e)
        }
    }
}

fn human_backup_summary(
    namespace: &str,
    results: &[(String, Result<PvcBackupReport, CliError>)],
) -> String {
    let mut text = String::new();
    for (name, r) in results {
        match r {
            Ok(rep) => {
                let m = rep.mover.clone().unwrap_or_default();
                text.push_str(&format!(
                    "{namespace}/{name}: backup {}/{}{} from VolumeSnapshot {}\n  {}: {} in ranges, read {}, uploaded {}\n  chunks: {} uploaded, {} deduplicated; {} changed; at most {} map entries held\n  snapshot wait {:.1} s, mover start {:.1} s, data {:.1} s, cleanup {:.1} s\n",
                    rep.volume,
                    m.snapshot.as_deref().unwrap_or("?"),
                    m.parent
                        .as_ref()
                        .map(|p| format!(" (incremental, parent {p})"))
                        .unwrap_or_else(|| " (full)".into()),
                    rep.volume_snapshot.as_deref().unwrap_or("?"),
                    m.metadata_call.as_deref().unwrap_or("no metadata service"),
                    bytes(m.bytes_in_ranges),
                    bytes(m.bytes_read),
                    bytes(m.bytes_transferred),
                    m.chunks_uploaded,
                    m.chunks_deduplicated,
                    bytes(m.bytes_changed),
                    m.map_entries_peak,
                    rep.times.snapshot_wait_s,
                    rep.times.mover_start_s,
                    rep.times.data_s,
                    rep.times.cleanup_s,
                ));
                for n in rep.notes.iter().chain(m.notes.iter()) {
                    text.push_str(&format!("  note: {n}\n"));
                }
                if !rep.deleted_snapshots.is_empty() {
                    text.push_str(&format!(
                        "  deleted old snapshots: {}\n",
                        rep.deleted_snapshots.join(", ")
                    ));
                }
            }
            Err(e) => text.push_str(&format!("{namespace}/{name}: FAILED: {}\n", e.message)),
        }
    }
    text.trim_end().to_string()
}

/// Runs `cbt restore --to-pvc ...`.
pub async fn restore(
    ctx: &Ctx,
    volume: &str,
    snapshot: &str,
    args: &PvcRestoreArgs,
    kube: &KubeArgs,
    dry_run: bool,
    overwrite: bool,
) -> Result<(), CliError> {
    let Some(pvc) = &args.to_pvc else {
        return Err(CliError::usage("--to-pvc is required"));
    };
    let target = repo_target(ctx)?;
    let repo = ctx.repo().await?;
    let manifest = repo
        .load_manifest(&VolumeName::new(volume)?, &SnapshotName::new(snapshot)?)
        .await?;
    let recorded = manifest.volume_size();
    let size = match args.size {
        Some(s) if s < recorded => {
            return Err(CliError::usage(format!(
                "--size {} is smaller than the backed-up volume ({})",
                bytes(s),
                bytes(recorded)
            )));
        }
        Some(s) => s,
        None => recorded,
    };
    let (cluster, namespace) = connect_in(&kube.kubeconfig, &kube.context, &kube.namespace).await?;
    let opts = PvcRestoreOptions {
        namespace,
        pvc: pvc.clone(),
        target,
        runtime: runtime(kube, ctx.key_file.is_some())?,
        volume: volume.to_string(),
        snapshot: snapshot.to_string(),
        size_bytes: size,
        storage_class: args
            .storage_class
            .clone()
            .or_else(|| manifest.source.storage_class.clone()),
        access_modes: manifest.source.access_modes.clone(),
        dry_run,
        overwrite,
    };
    let report = restore_to_pvc(&cluster, &opts, cancel_on_signal())
        .await
        .map_err(k8s_error)?;
    if dry_run {
        return print_objects(ctx, &report.planned_objects);
    }
    ctx.out.emit(&report, || {
        let m = report.mover.clone().unwrap_or_default();
        format!(
            "restored {volume}/{snapshot} into PVC {} ({}): wrote {}, downloaded {}, {} chunks read back and verified\n  mover start {:.1} s, data {:.1} s",
            report.pvc,
            bytes(m.volume_size),
            bytes(m.bytes_written),
            bytes(m.bytes_transferred),
            m.chunks_verified,
            report.times.mover_start_s,
            report.times.data_s
        )
    });
    Ok(())
}

/// `cbt mover`: run inside a data-mover Job (spec in `CBT_MOVER_SPEC`).
#[derive(Debug, Args)]
pub struct MoverArgs {
    /// Also write the report here (the container's terminationMessagePath).
    #[arg(long, value_name = "PATH")]
    pub result_file: Option<PathBuf>,
}

/// The key of an encrypted repository, from the Job's Secret: the password as CBT_PASSWORD,
/// or the key file's contents as [`cbt_k8s::pvc_backup::objects::KEY_FILE_ENV`]; outside a
/// Job, a key file named by `--key-file` / CBT_KEY_FILE works too.
fn mover_key(
    key_file_path: Option<&std::path::Path>,
) -> Result<Option<cbt_store::repo::RepoKey>, CliError> {
    use cbt_k8s::pvc_backup::objects::{KEY_FILE_ENV, KEY_FILE_SECRET_KEY};
    let password = crate::password_from("CBT_PASSWORD", None, "")?;
    let key_file = match (std::env::var_os(KEY_FILE_ENV), key_file_path) {
        (Some(_), Some(_)) => {
            return Err(CliError::config(format!(
                "both {KEY_FILE_ENV} and --key-file (CBT_KEY_FILE) are set; set only one"
            )));
        }
        (None, Some(path)) => Some(
            cbt_store::crypto::KeyFile::from_file(path)
                .map_err(cbt_store::repo::RepoError::from)?,
        ),
        (None, None) => None,
        (Some(text), None) => Some(
            cbt_store::crypto::KeyFile::parse(text.as_encoded_bytes()).map_err(|e| {
                CliError::config(format!(
                    "the Secret's {KEY_FILE_SECRET_KEY} is not a key file: {e}"
                ))
                .with_hint(format!(
                    "store the file written by `cbt repo init --key-file-out` or `cbt key add --key-file-out` under key {KEY_FILE_SECRET_KEY}"
                ))
            })?,
        ),
    };
    match (password, key_file) {
        (Some(_), Some(_)) => Err(CliError::config(format!(
            "both CBT_PASSWORD and {KEY_FILE_ENV} are set; set only one"
        ))),
        (Some(p), None) => Ok(Some(cbt_store::repo::RepoKey::Password(p))),
        (None, Some(k)) => Ok(Some(cbt_store::repo::RepoKey::KeyFile(k))),
        (None, None) => Ok(None),
    }
}

/// Runs the mover and reports; the exit code follows the error class.
pub async fn mover(args: &MoverArgs, key_file: Option<&std::path::Path>) -> Result<(), CliError> {
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    let key = mover_key(key_file)?;
    let result = match cbt_k8s::mover::spec_from_env() {
        Ok(spec) => cbt_k8s::mover::run_with_key(&spec, key.as_ref(), now).await,
        Err(e) => Err(e),
    };
    let report = match &result {
        Ok(r) => r.clone(),
        Err(e) => cbt_k8s::mover::failure_report(e),
    };
    let text = report.to_termination_message();
    if let Some(p) = &args.result_file
        && let Err(e) = std::fs::write(p, &text)
    {
        eprintln!("warning: cannot write the report to {}: {e}", p.display());
    }
    println!("{text}");
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            let class = ExitClass::from(e.kind());
            Err(CliError {
                reported: false,
                class,
                message: e.to_string(),
                hint: None,
            })
        }
    }
}
