//! `cbt backup --pvc` and `cbt restore --to-pvc`: back up a PersistentVolumeClaim through a
//! VolumeSnapshot and a data-mover Job, and restore a backup into a new PVC.
//!
//! Backup of one PVC:
//! 1. check the PVC (bound, `volumeMode: Block`, CSI) and find its driver's
//!    SnapshotMetadataService (without one, only `fallback_full` proceeds, reading everything);
//! 2. cut a VolumeSnapshot (named class, else the driver's default) and wait for `readyToUse`,
//!    surfacing `status.error` verbatim; read the bound content's CSI handle;
//! 3. create a temporary block PVC from the snapshot and a mover Job that attaches it raw and
//!    runs `cbt mover` (see [`crate::mover`]): the mover asks the sidecar for the allocated or
//!    changed ranges (the base is the CSI handle recorded by the volume's latest backup), reads
//!    only those chunks and commits the backup;
//! 4. read the mover's report from its termination message; delete the Job and the temporary
//!    PVC whatever happened; keep the new VolumeSnapshot (the next delta's base) and delete older
//!    ones this tool cut for the same PVC beyond `keep_snapshots`. On failure the new snapshot
//!    is deleted too. Nothing this tool did not create (label and annotation) is ever deleted.
//!
//! The API permissions these flows use are listed in [`ORCHESTRATOR_PERMISSIONS`]; keep it
//! in step with the code (a test compares it with the requests the flows make).
//!
//! # Guarantees
//! - Cancellation (the `cancel` channel, e.g. Ctrl-C) and timeouts run the same cleanup.
//! - The repository changes only through the mover's atomic commit.
//!
//! Several PVCs cut together at one instant (a VolumeGroupSnapshot) are backed up by
//! [`group::back_up_group`], which runs this pipeline from the temporary PVC on per member.

pub mod group;
pub mod objects;
pub mod permissions;

pub use permissions::{MOVER_PERMISSION, ORCHESTRATOR_PERMISSIONS, Permission, rbac_objects};

use std::time::Duration;

use cbt_store::store::S3Options;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, PropagationPolicy};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::connect::Cluster;
use crate::error::{Error, ns_name};
use crate::metadata_service::{MetadataEndpoint, discover};
use crate::mover::{
    BackupTask, MOVER_SPEC_VERSION, MetadataAccess, MoverReport, MoverSpec, MoverTask, RestoreTask,
};
use crate::pvc::{PvcInfo, inspect_pvc};
use crate::retry::RetryPolicy;
use crate::snapshot::{
    SnapshotClass, SnapshotState, VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent,
};
use crate::wait::{Check, WaitError, wait_for};
use objects::{
    MANAGED_BY, MANAGED_BY_LABEL, MoverRuntime, PVC_UID_LABEL, ROLE_LABEL, block_pvc, mover_job,
    object_name, short_hash, volume_snapshot,
};

/// Where the backups go and how movers run.
#[derive(Clone, Debug)]
pub struct RepoTarget {
    /// Repository URL as the mover will open it.
    pub repo: String,
    /// S3 settings (the same type `cbt` builds from its flags); the mover receives the endpoint
    /// and region.
    pub s3: S3Options,
}

/// Options of a PVC backup.
#[derive(Clone, Debug)]
pub struct PvcBackupOptions {
    /// Namespace of the PVCs.
    pub namespace: String,
    /// Repository.
    pub target: RepoTarget,
    /// How movers run (image, ServiceAccount, S3 Secret, deadline).
    pub runtime: MoverRuntime,
    /// VolumeSnapshotClass; `None` = the driver's default class.
    pub snapshot_class: Option<String>,
    /// How long a snapshot may take to become ready.
    pub snapshot_timeout: Duration,
    /// VolumeSnapshots this tool cut for a PVC that are kept (the newest; at least 1, the base
    /// of the next delta).
    pub keep_snapshots: usize,
    /// Without CBT (no metadata service, or a delta refused), take a full backup.
    pub fallback_full: bool,
    /// Repository snapshot name of this run (`YYYYMMDDTHHMMSSZ` by default in the CLI).
    pub run_name: String,
    /// Labels recorded in every manifest.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Print the objects instead of creating them.
    pub dry_run: bool,
}

/// Where each step's time went.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepTimes {
    /// Creating the snapshot until it was ready.
    pub snapshot_wait_s: f64,
    /// Creating the mover until its container started (PVC provisioning, scheduling, pull).
    pub mover_start_s: f64,
    /// The mover's own work (metadata + data).
    pub data_s: f64,
    /// Deleting temporary objects and old snapshots.
    pub cleanup_s: f64,
}

/// What happened to one PVC.
#[derive(Clone, Debug, Serialize)]
pub struct PvcBackupReport {
    /// `namespace/name` of the PVC.
    pub pvc: String,
    /// Repository volume name.
    pub volume: String,
    /// The VolumeSnapshot cut (kept on success).
    pub volume_snapshot: Option<String>,
    /// Its CSI handle.
    pub snapshot_handle: Option<String>,
    /// The mover's report (on success, and on failures it reported).
    pub mover: Option<MoverReport>,
    /// Old VolumeSnapshots deleted by retention.
    pub deleted_snapshots: Vec<String>,
    /// Timings.
    pub times: StepTimes,
    /// Objects that would be created (dry run), as JSON values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub planned_objects: Vec<serde_json::Value>,
    /// Warnings for the user.
    pub notes: Vec<String>,
}

/// Objects created by this run, deleted on the way out unless kept.
#[derive(Default)]
pub(crate) struct Created {
    snapshot: Option<String>,
    pvc: Option<String>,
    job: Option<String>,
}

/// How preflight messages name one kind of snapshot class (single or group).
pub(crate) struct ClassWords {
    /// The resource kind, e.g. `VolumeSnapshotClass`.
    pub kind: &'static str,
    /// The flag that names a class.
    pub flag: &'static str,
    /// The annotation that marks a driver's default class.
    pub default_annotation: &'static str,
    /// What else the user can do when the driver has no class at all (`""`: nothing).
    pub otherwise: &'static str,
}

/// A preflight problem and its fix.
pub(crate) type Refusal = (String, String);

impl ClassWords {
    /// The named class `name` does not exist.
    pub(crate) fn missing(&self, name: &str, driver: &str) -> Refusal {
        (
            format!("{} {name} does not exist", self.kind),
            format!("create it for driver {driver}, or omit {}", self.flag),
        )
    }

    /// `name` as the class to use if its driver, `class_driver`, is `driver`.
    pub(crate) fn check_driver(
        &self,
        name: &str,
        class_driver: &str,
        driver: &str,
    ) -> Result<String, Refusal> {
        if class_driver == driver {
            return Ok(name.to_string());
        }
        Err((
            format!(
                "{} {name} is for driver {class_driver}, not {driver}",
                self.kind
            ),
            format!("name a {} of driver {driver}", self.kind),
        ))
    }

    /// The one default among the classes of `driver`, given as (name, annotated default).
    pub(crate) fn only_default<'a>(
        &self,
        driver: &str,
        classes: impl IntoIterator<Item = (&'a str, bool)>,
    ) -> Result<String, Refusal> {
        let (defaults, others): (Vec<_>, Vec<_>) = classes.into_iter().partition(|c| c.1);
        let (kind, flag, annotation) = (self.kind, self.flag, self.default_annotation);
        match defaults.as_slice() {
            [(one, _)] => Ok(one.to_string()),
            [] if others.is_empty() => Err((
                format!("no {kind} for driver {driver}"),
                format!(
                    "create one (driver: {driver}, deletionPolicy: Delete) annotated {annotation}: \"true\"{}",
                    self.otherwise
                ),
            )),
            [] => Err((
                format!(
                    "no default {kind} for driver {driver} (classes: {})",
                    others.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
                ),
                format!("pass {flag}, or annotate one with {annotation}: \"true\""),
            )),
            many => Err((
                format!(
                    "several default {kind}es for driver {driver}: {}",
                    many.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
                ),
                format!("pass {flag}, or keep one default"),
            )),
        }
    }
}

/// The words of [`snapshot_class_for`].
const SNAPSHOT_CLASS: ClassWords = ClassWords {
    kind: "VolumeSnapshotClass",
    flag: "--snapshot-class",
    default_annotation: crate::snapshot::DEFAULT_CLASS_ANNOTATION,
    otherwise: "",
};

/// The driver's default VolumeSnapshotClass, or the named one checked against the driver.
///
/// # Errors
/// [`Error::Preflight`] when none (or several defaults) exist or the named class is another
/// driver's.
pub async fn snapshot_class_for(
    cluster: &Cluster,
    driver: &str,
    named: Option<&str>,
) -> Result<String, Error> {
    let api: Api<VolumeSnapshotClass> = Api::all(cluster.client.clone());
    let preflight = |(problem, fix): Refusal| Error::Preflight {
        cluster: cluster.context.clone(),
        problem,
        fix,
    };
    if let Some(name) = named {
        let class = api
            .get_opt(name)
            .await
            .map_err(|e| Error::api(&cluster.context, "get", "VolumeSnapshotClass", name, e))?
            .ok_or_else(|| preflight(SNAPSHOT_CLASS.missing(name, driver)))?;
        return SNAPSHOT_CLASS
            .check_driver(name, &class.spec.driver, driver)
            .map_err(preflight);
    }
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::api(&cluster.context, "list", "VolumeSnapshotClass", "", e))?;
    let of_driver = all.items.iter().filter(|c| c.spec.driver == driver);
    SNAPSHOT_CLASS
        .only_default(
            driver,
            of_driver.filter_map(|c| Some((c.metadata.name.as_deref()?, c.is_default()))),
        )
        .map_err(preflight)
}

fn cancelled(cancel: &watch::Receiver<bool>) -> bool {
    *cancel.borrow()
}

/// Backs up one PVC (see the module docs).
///
/// # Errors
/// [`Error`]: the PVC unsuitable, CBT unavailable without fallback, the snapshot failing or
/// timing out, the mover failing (with its report and log tail), cancellation. Temporary
/// objects are deleted in every case.
pub async fn back_up_pvc(
    cluster: &Cluster,
    pvc_name: &str,
    opts: &PvcBackupOptions,
    cancel: watch::Receiver<bool>,
) -> Result<PvcBackupReport, Error> {
    let ns = &opts.namespace;
    let ctx = &cluster.context;
    let pvc = inspect_pvc(&cluster.client, ctx, ns, pvc_name).await?;
    let volume = pvc.repository_volume();
    let mut report = PvcBackupReport {
        pvc: ns_name(ns, pvc_name),
        volume: volume.clone(),
        volume_snapshot: None,
        snapshot_handle: None,
        mover: None,
        deleted_snapshots: Vec::new(),
        times: StepTimes::default(),
        planned_objects: Vec::new(),
        notes: Vec::new(),
    };
    let endpoint = match discover(&cluster.client, ctx, &pvc.driver).await {
        Ok(e) => Some(e),
        Err(e @ Error::NoMetadataService { .. }) if opts.fallback_full => {
            report.notes.push(format!(
                "{e}; taking a full backup that reads the whole volume (--fallback-full)"
            ));
            None
        }
        Err(e) => return Err(e),
    };
    let class = snapshot_class_for(cluster, &pvc.driver, opts.snapshot_class.as_deref()).await?;
    let suffix = short_hash(&[ns, pvc_name, &pvc.uid, &opts.run_name]);
    let vs_name = object_name("cbt", pvc_name, &opts.run_name.to_ascii_lowercase(), 253);
    let src_name = object_name("cbt-src", pvc_name, &suffix[..10], 253);
    let job_name = object_name("cbt-backup", pvc_name, &suffix[..10], 63);
    let vs = volume_snapshot(&vs_name, ns, pvc_name, &pvc.uid, Some(&class), &volume);
    let src = block_pvc(
        &src_name,
        ns,
        pvc.size_bytes,
        pvc.storage_class.as_deref(),
        &[],
        Some(&vs_name),
        "source",
        &volume,
        "cbt backup --pvc",
    );
    if opts.dry_run {
        let handle = "<status.snapshotHandle of the snapshot's content>";
        let job = backup_job(
            &job_name,
            &src_name,
            &vs_name,
            handle,
            &pvc,
            &volume,
            endpoint.as_ref(),
            opts,
            None,
        );
        report.planned_objects = vec![
            serde_json::to_value(&vs).unwrap_or_default(),
            serde_json::to_value(&src).unwrap_or_default(),
            serde_json::to_value(&job).unwrap_or_default(),
        ];
        return Ok(report);
    }

    let mut created = Created::default();
    let result = run_backup(
        cluster,
        &pvc,
        &volume,
        endpoint.as_ref(),
        opts,
        (&vs, &src, &job_name),
        &mut created,
        &mut report,
        cancel,
    )
    .await;
    let t = Instant::now();
    // The snapshot stays only when the backup it serves was committed.
    let keep_snapshot = result.is_ok();
    cleanup(cluster, ns, &created, keep_snapshot, &mut report.notes).await;
    if result.is_ok() {
        match retention(cluster, &pvc, &vs_name, opts.keep_snapshots).await {
            Ok(deleted) => report.deleted_snapshots = deleted,
            Err(e) => report
                .notes
                .push(format!("old snapshots were not pruned: {e}")),
        }
    }
    report.times.cleanup_s = t.elapsed().as_secs_f64();
    result.map(|()| report)
}

/// The group snapshot a member VolumeSnapshot was cut in, as recorded in its backup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupCut {
    /// Name of the VolumeGroupSnapshot.
    pub(crate) name: String,
    /// Its `status.creationTime` (RFC 3339): the instant every member was cut at.
    pub(crate) cut_time: Option<String>,
}

/// Manifest label holding the group snapshot's creation time (the instant every member was
/// cut at): backups with the same value (and the same `source.volume_group_snapshot`) are
/// crash-consistent with each other.
pub const GROUP_CUT_TIME_LABEL: &str = "cbt.io/group-cut-time";

#[allow(clippy::too_many_arguments)] // the values the Job is built from
fn backup_job(
    job_name: &str,
    src_name: &str,
    vs_name: &str,
    handle: &str,
    pvc: &PvcInfo,
    volume: &str,
    endpoint: Option<&MetadataEndpoint>,
    opts: &PvcBackupOptions,
    group: Option<&GroupCut>,
) -> Job {
    let source = cbt_core::manifest::SourceInfo {
        csi_driver: Some(pvc.driver.clone()),
        namespace: Some(pvc.namespace.clone()),
        pvc: Some(pvc.name.clone()),
        pvc_uid: Some(pvc.uid.clone()),
        storage_class: pvc.storage_class.clone(),
        access_modes: pvc.access_modes.clone(),
        volume_mode: Some(pvc.volume_mode.clone()),
        pvc_labels: pvc.labels.clone(),
        volume_snapshot: Some(vs_name.to_string()),
        volume_group_snapshot: group.map(|g| g.name.clone()),
        csi_snapshot_id: Some(handle.to_string()),
        ..Default::default()
    };
    let mut labels = opts.labels.clone();
    if let Some(t) = group.and_then(|g| g.cut_time.as_ref()) {
        labels.insert(GROUP_CUT_TIME_LABEL.to_string(), t.clone());
    }
    let spec = MoverSpec {
        version: MOVER_SPEC_VERSION,
        repo: opts.target.repo.clone(),
        s3_endpoint: opts.target.s3.endpoint.clone(),
        s3_region: opts.target.s3.region.clone(),
        device: objects::DEVICE_PATH.into(),
        task: MoverTask::Backup(Box::new(BackupTask {
            volume: volume.to_string(),
            snapshot: opts.run_name.clone(),
            metadata: endpoint.map(|e| MetadataAccess {
                address: e.address.clone(),
                ca_pem: String::from_utf8_lossy(&e.ca_pem).into_owned(),
                server_name: e.server_name.clone(),
                token_file: format!("{}/{}", objects::TOKEN_DIR, objects::TOKEN_FILE),
                namespace: pvc.namespace.clone(),
                snapshot_name: vs_name.to_string(),
                snapshot_handle: handle.to_string(),
            }),
            fallback_full: opts.fallback_full,
            source,
            labels,
            compression_level: cbt_store::chunk::DEFAULT_COMPRESSION_LEVEL,
        })),
    };
    let mut rt = opts.runtime.clone();
    rt.token_audience = endpoint.map(|e| e.audience.clone());
    mover_job(
        job_name,
        &pvc.namespace,
        src_name,
        &spec,
        &rt,
        "mover",
        volume,
        "cbt backup --pvc",
    )
}

#[allow(clippy::too_many_arguments)] // one run's state, threaded through its steps
async fn run_backup(
    cluster: &Cluster,
    pvc: &PvcInfo,
    volume: &str,
    endpoint: Option<&MetadataEndpoint>,
    opts: &PvcBackupOptions,
    (vs, src, job_name): (&VolumeSnapshot, &PersistentVolumeClaim, &str),
    created: &mut Created,
    report: &mut PvcBackupReport,
    cancel: watch::Receiver<bool>,
) -> Result<(), Error> {
    let handle = cut_snapshot(cluster, opts, vs, created, report, cancel.clone()).await?;
    let vs_name = vs.metadata.name.clone().unwrap_or_default();
    let ready = ReadySnapshot {
        name: &vs_name,
        handle: &handle,
        group: None,
    };
    back_up_from_snapshot(
        cluster, pvc, volume, endpoint, opts, &ready, src, job_name, created, report, cancel,
    )
    .await
}

/// Creates `vs`, waits until it is ready (its `status.error` verbatim on failure) and returns
/// the CSI handle of its bound content.
async fn cut_snapshot(
    cluster: &Cluster,
    opts: &PvcBackupOptions,
    vs: &VolumeSnapshot,
    created: &mut Created,
    report: &mut PvcBackupReport,
    cancel: watch::Receiver<bool>,
) -> Result<String, Error> {
    let ctx = &cluster.context;
    let ns = &opts.namespace;
    let retry = RetryPolicy::default();
    let vs_name = vs.metadata.name.clone().unwrap_or_default();
    let vss: Api<VolumeSnapshot> = Api::namespaced(cluster.client.clone(), ns);
    let t = Instant::now();
    vss.create(&PostParams::default(), vs)
        .await
        .map_err(|e| Error::api(ctx, "create", "VolumeSnapshot", ns_name(ns, &vs_name), e))?;
    created.snapshot = Some(vs_name.clone());
    report.volume_snapshot = Some(vs_name.clone());
    let deadline = Instant::now() + opts.snapshot_timeout;
    let mut notice = crate::wait::Notice::default();
    let ready = tokio::select! {
        r = wait_for(&vss, &vs_name, &retry, deadline, &mut notice, |s: &VolumeSnapshot| {
            if let Some(msg) = s.error_message() {
                return Check::Failed(msg.to_string());
            }
            if s.is_ready() { Check::Done } else { Check::Pending("not ready".into()) }
        }) => r,
        _ = wait_cancel(cancel.clone()) => return Err(Error::Cancelled),
    };
    let ready = ready.map_err(|e| match e {
        WaitError::Failed(message) => Error::SnapshotFailed {
            cluster: ctx.clone(),
            object: ns_name(ns, &vs_name),
            message,
        },
        WaitError::Timeout(last_state) => Error::Timeout {
            cluster: ctx.clone(),
            what: format!("VolumeSnapshot {} to be readyToUse", ns_name(ns, &vs_name)),
            waited: opts.snapshot_timeout,
            last_state,
        },
        WaitError::Gone => Error::Inconsistent {
            cluster: ctx.clone(),
            problem: format!(
                "VolumeSnapshot {} disappeared while waiting",
                ns_name(ns, &vs_name)
            ),
        },
        WaitError::Api(e) => Error::api(ctx, "get", "VolumeSnapshot", ns_name(ns, &vs_name), e),
    })?;
    report.times.snapshot_wait_s = t.elapsed().as_secs_f64();
    let content_name = ready.bound_content().unwrap_or_default().to_string();
    let vscs: Api<VolumeSnapshotContent> = Api::all(cluster.client.clone());
    let content = vscs
        .get_opt(&content_name)
        .await
        .map_err(|e| Error::api(ctx, "get", "VolumeSnapshotContent", &content_name, e))?;
    content
        .as_ref()
        .and_then(|c| c.snapshot_handle())
        .map(str::to_string)
        .ok_or_else(|| Error::Inconsistent {
            cluster: ctx.clone(),
            problem: format!(
                "VolumeSnapshot {} is ready but its content {content_name:?} has no snapshot handle",
                ns_name(ns, &vs_name)
            ),
        })
}

/// A ready VolumeSnapshot a backup reads: its name, CSI handle and, for a group member, the
/// group.
pub(crate) struct ReadySnapshot<'a> {
    /// VolumeSnapshot name (in the backup's namespace).
    pub(crate) name: &'a str,
    /// CSI snapshot handle of its bound content.
    pub(crate) handle: &'a str,
    /// The group it was cut in, if any.
    pub(crate) group: Option<&'a GroupCut>,
}

/// The backup from a ready snapshot on: the temporary PVC `src` restored from it, then the
/// mover Job. The caller owns cleanup (everything made is recorded in `created`).
#[allow(clippy::too_many_arguments)] // one run's state, threaded through its steps
pub(crate) async fn back_up_from_snapshot(
    cluster: &Cluster,
    pvc: &PvcInfo,
    volume: &str,
    endpoint: Option<&MetadataEndpoint>,
    opts: &PvcBackupOptions,
    snapshot: &ReadySnapshot<'_>,
    src: &PersistentVolumeClaim,
    job_name: &str,
    created: &mut Created,
    report: &mut PvcBackupReport,
    cancel: watch::Receiver<bool>,
) -> Result<(), Error> {
    let ctx = &cluster.context;
    let ns = &opts.namespace;
    report.volume_snapshot = Some(snapshot.name.to_string());
    report.snapshot_handle = Some(snapshot.handle.to_string());
    if cancelled(&cancel) {
        return Err(Error::Cancelled);
    }

    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), ns);
    let src_name = src.metadata.name.clone().unwrap_or_default();
    let t = Instant::now();
    pvcs.create(&PostParams::default(), src)
        .await
        .map_err(|e| {
            Error::api(
                ctx,
                "create",
                "PersistentVolumeClaim",
                ns_name(ns, &src_name),
                e,
            )
        })?;
    created.pvc = Some(src_name.clone());
    let job = backup_job(
        job_name,
        &src_name,
        snapshot.name,
        snapshot.handle,
        pvc,
        volume,
        endpoint,
        opts,
        snapshot.group,
    );
    let mover = run_mover(cluster, ns, &job, created, &mut report.times, t, cancel).await?;
    report.mover = Some(mover);
    Ok(())
}

/// Creates the mover Job, waits for it, and returns its report.
async fn run_mover(
    cluster: &Cluster,
    ns: &str,
    job: &Job,
    created: &mut Created,
    times: &mut StepTimes,
    started: Instant,
    cancel: watch::Receiver<bool>,
) -> Result<MoverReport, Error> {
    let ctx = &cluster.context;
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    jobs.create(&PostParams::default(), job)
        .await
        .map_err(|e| Error::api(ctx, "create", "Job", ns_name(ns, &job_name), e))?;
    created.job = Some(job_name.clone());
    let deadline_secs = job
        .spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds)
        .unwrap_or(3600);
    // The Job's own deadline stops the pod; ours adds a margin for status to arrive.
    let deadline = Instant::now() + Duration::from_secs(deadline_secs.unsigned_abs() + 30);
    let watch = watch_mover(cluster, ns, &job_name, deadline, times, started);
    tokio::select! {
        r = watch => r,
        _ = wait_cancel(cancel) => Err(Error::Cancelled),
    }
}

async fn wait_cancel(mut cancel: watch::Receiver<bool>) {
    loop {
        if *cancel.borrow() {
            return;
        }
        if cancel.changed().await.is_err() {
            // No sender left: nobody can cancel any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Polls the Job and its pod until it finishes; fails fast on states that never resolve
/// (image pull errors, a missing Secret).
async fn watch_mover(
    cluster: &Cluster,
    ns: &str,
    job_name: &str,
    deadline: Instant,
    times: &mut StepTimes,
    started: Instant,
) -> Result<MoverReport, Error> {
    let ctx = &cluster.context;
    let object = ns_name(ns, job_name);
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let selector = ListParams::default().labels(&format!("cbt.io/job={job_name}"));
    let mut running_since: Option<Instant> = None;
    let mut delay = Duration::from_millis(100);
    loop {
        let pod = pods
            .list(&selector)
            .await
            .map_err(|e| Error::api(ctx, "list", "Pod", &object, e))?
            .items
            .into_iter()
            .next_back();
        if let Some(p) = &pod {
            let cs = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|v| v.first());
            if let Some(state) = cs.and_then(|c| c.state.as_ref()) {
                if state.running.is_some() || state.terminated.is_some() {
                    running_since.get_or_insert_with(|| {
                        times.mover_start_s = started.elapsed().as_secs_f64();
                        Instant::now()
                    });
                }
                if let Some(w) = &state.waiting {
                    let reason = w.reason.clone().unwrap_or_default();
                    if matches!(
                        reason.as_str(),
                        "ErrImagePull"
                            | "ImagePullBackOff"
                            | "InvalidImageName"
                            | "CreateContainerConfigError"
                            | "CreateContainerError"
                    ) {
                        return Err(Error::MoverFailed {
                            cluster: ctx.clone(),
                            object,
                            reason: format!("{reason}: {}", w.message.clone().unwrap_or_default()),
                            log_tail: None,
                            mover_class: Some("config".into()),
                        });
                    }
                }
                if let Some(t) = &state.terminated {
                    let parsed: Option<MoverReport> = t
                        .message
                        .as_deref()
                        .and_then(|m| serde_json::from_str(m.trim()).ok());
                    if let Some(since) = running_since {
                        times.data_s = since.elapsed().as_secs_f64();
                    }
                    if t.exit_code == 0 {
                        return parsed.filter(|r| r.ok).ok_or_else(|| Error::MoverFailed {
                            cluster: ctx.clone(),
                            object: object.clone(),
                            reason: "the mover exited 0 without a report".into(),
                            log_tail: None,
                            mover_class: None,
                        });
                    }
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let log_tail = pods
                        .logs(
                            &name,
                            &LogParams {
                                tail_lines: Some(20),
                                ..Default::default()
                            },
                        )
                        .await
                        .ok()
                        .filter(|l| !l.trim().is_empty());
                    let why = match &parsed {
                        Some(r) => r.error.clone().unwrap_or_default(),
                        None => t.message.clone().unwrap_or_default(),
                    };
                    return Err(Error::MoverFailed {
                        cluster: ctx.clone(),
                        object,
                        reason: format!(
                            "{} (exit {}): {why}",
                            t.reason.clone().unwrap_or_else(|| "Error".into()),
                            t.exit_code
                        ),
                        log_tail,
                        mover_class: parsed.and_then(|r| r.error_class),
                    });
                }
            }
        }
        let job = jobs
            .get_opt(job_name)
            .await
            .map_err(|e| Error::api(ctx, "get", "Job", &object, e))?;
        if let Some(c) = job
            .as_ref()
            .and_then(|j| j.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Failed" && c.status == "True"))
            && pod.is_none()
        {
            return Err(Error::MoverFailed {
                cluster: ctx.clone(),
                object,
                reason: format!(
                    "{}: {}",
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default()
                ),
                log_tail: None,
                mover_class: None,
            });
        }
        if job.is_none() {
            return Err(Error::Inconsistent {
                cluster: ctx.clone(),
                problem: format!("mover Job {object} disappeared"),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                cluster: ctx.clone(),
                what: format!("mover Job {object}"),
                waited: deadline.saturating_duration_since(started),
                last_state: match &pod {
                    Some(p) => p
                        .status
                        .as_ref()
                        .and_then(|s| s.phase.clone())
                        .unwrap_or_else(|| "pod without status".into()),
                    None => "no pod yet".into(),
                },
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Deletes what this run created (the snapshot only when `keep_snapshot` is false).
async fn cleanup(
    cluster: &Cluster,
    ns: &str,
    created: &Created,
    keep_snapshot: bool,
    notes: &mut Vec<String>,
) {
    let background = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    if let Some(j) = &created.job {
        let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
        if let Err(e) = jobs.delete(j, &background).await
            && !is_not_found(&e)
        {
            notes.push(format!("could not delete mover Job {ns}/{j}: {e}"));
        }
    }
    if let Some(p) = &created.pvc {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), ns);
        if let Err(e) = pvcs.delete(p, &DeleteParams::default()).await
            && !is_not_found(&e)
        {
            notes.push(format!("could not delete temporary PVC {ns}/{p}: {e}"));
        }
    }
    if !keep_snapshot && let Some(s) = &created.snapshot {
        let vss: Api<VolumeSnapshot> = Api::namespaced(cluster.client.clone(), ns);
        if let Err(e) = vss.delete(s, &DeleteParams::default()).await
            && !is_not_found(&e)
        {
            notes.push(format!("could not delete VolumeSnapshot {ns}/{s}: {e}"));
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Deletes VolumeSnapshots this tool cut for the PVC, oldest first, keeping the newest `keep`
/// (and always `current`). Returns the names deleted.
async fn retention(
    cluster: &Cluster,
    pvc: &PvcInfo,
    current: &str,
    keep: usize,
) -> Result<Vec<String>, Error> {
    let vss: Api<VolumeSnapshot> = Api::namespaced(cluster.client.clone(), &pvc.namespace);
    let selector = format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY},{ROLE_LABEL}=snapshot,{PVC_UID_LABEL}={}",
        pvc.uid
    );
    delete_oldest(
        cluster,
        &vss,
        ("VolumeSnapshot", &pvc.namespace),
        &selector,
        "cbt backup --pvc",
        (keep, current),
    )
    .await
}

/// Deletes the objects of `kind` in namespace `ns` that `api` lists under `selector` and this
/// tool cut (owner annotation `owner`: labels alone could be copied by hand), oldest first,
/// keeping the newest `keep` (at least one) and always `current`. Returns the names deleted.
pub(crate) async fn delete_oldest<K>(
    cluster: &Cluster,
    api: &Api<K>,
    (kind, ns): (&'static str, &str),
    selector: &str,
    owner: &str,
    (keep, current): (usize, &str),
) -> Result<Vec<String>, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut ours: Vec<K> = api
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|e| Error::api(&cluster.context, "list", kind, ns, e))?
        .items
        .into_iter()
        .filter(|o| {
            o.meta()
                .annotations
                .as_ref()
                .and_then(|a| a.get(objects::OWNER_ANNOTATION))
                .is_some_and(|o| o == owner)
        })
        .collect();
    let age = |o: &K| {
        let m = o.meta();
        (m.creation_timestamp.as_ref().map(|t| t.0), m.name.clone())
    };
    ours.sort_by_key(age);
    let excess = ours.len().saturating_sub(keep.max(1));
    let mut deleted = Vec::new();
    for o in ours.iter().take(excess) {
        let Some(name) = o.meta().name.as_deref() else {
            continue;
        };
        if name == current {
            continue;
        }
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => deleted.push(name.to_string()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(Error::api(
                    &cluster.context,
                    "delete",
                    kind,
                    ns_name(ns, name),
                    e,
                ));
            }
        }
    }
    Ok(deleted)
}

/// Options of a restore into a new PVC.
#[derive(Clone, Debug)]
pub struct PvcRestoreOptions {
    /// Namespace of the new PVC.
    pub namespace: String,
    /// Name of the new PVC.
    pub pvc: String,
    /// Repository.
    pub target: RepoTarget,
    /// How the mover runs.
    pub runtime: MoverRuntime,
    /// Repository volume and snapshot to restore.
    pub volume: String,
    /// Snapshot name.
    pub snapshot: String,
    /// Size of the volume in bytes (at least the recorded size; from the manifest).
    pub size_bytes: u64,
    /// StorageClass (the recorded one unless overridden).
    pub storage_class: Option<String>,
    /// Access modes (the recorded ones).
    pub access_modes: Vec<String>,
    /// Print the objects instead of creating them.
    pub dry_run: bool,
    /// Write into an existing PVC of that name (Block, at least the volume's size) instead of
    /// refusing it; its previous contents are lost.
    pub overwrite: bool,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct PvcRestoreReport {
    /// `namespace/name` of the new PVC.
    pub pvc: String,
    /// The mover's report.
    pub mover: Option<MoverReport>,
    /// Timings (mover start and data).
    pub times: StepTimes,
    /// Objects that would be created (dry run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub planned_objects: Vec<serde_json::Value>,
    /// Warnings.
    pub notes: Vec<String>,
}

/// Creates a block PVC and fills it from the repository through a mover Job that also reads it
/// back. An existing PVC of that name is refused. On failure the new PVC is deleted.
///
/// # Errors
/// [`Error::Conflict`] for an existing PVC, [`Error::MoverFailed`], [`Error::Timeout`],
/// [`Error::Cancelled`], API errors.
pub async fn restore_to_pvc(
    cluster: &Cluster,
    opts: &PvcRestoreOptions,
    cancel: watch::Receiver<bool>,
) -> Result<PvcRestoreReport, Error> {
    let ns = &opts.namespace;
    let ctx = &cluster.context;
    let object = ns_name(ns, &opts.pvc);
    let mut report = PvcRestoreReport {
        pvc: object.clone(),
        mover: None,
        times: StepTimes::default(),
        planned_objects: Vec::new(),
        notes: Vec::new(),
    };
    let pvc = block_pvc(
        &opts.pvc,
        ns,
        opts.size_bytes,
        opts.storage_class.as_deref(),
        &opts.access_modes,
        None,
        "restore-target",
        &opts.volume,
        "cbt restore --to-pvc",
    );
    let suffix = short_hash(&[ns, &opts.pvc, &opts.volume, &opts.snapshot]);
    let job_name = object_name("cbt-restore", &opts.pvc, &suffix[..10], 63);
    let spec = MoverSpec {
        version: MOVER_SPEC_VERSION,
        repo: opts.target.repo.clone(),
        s3_endpoint: opts.target.s3.endpoint.clone(),
        s3_region: opts.target.s3.region.clone(),
        device: objects::DEVICE_PATH.into(),
        task: MoverTask::Restore(RestoreTask {
            volume: opts.volume.clone(),
            snapshot: opts.snapshot.clone(),
        }),
    };
    let mut rt = opts.runtime.clone();
    rt.token_audience = None;
    let job = mover_job(
        &job_name,
        ns,
        &opts.pvc,
        &spec,
        &rt,
        "mover",
        &opts.volume,
        "cbt restore --to-pvc",
    );
    if opts.dry_run {
        report.planned_objects = vec![
            serde_json::to_value(&pvc).unwrap_or_default(),
            serde_json::to_value(&job).unwrap_or_default(),
        ];
        return Ok(report);
    }
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), ns);
    let existing = pvcs
        .get_opt(&opts.pvc)
        .await
        .map_err(|e| Error::api(ctx, "get", "PersistentVolumeClaim", &object, e))?;
    let mut created = Created::default();
    match existing {
        Some(_) if !opts.overwrite => {
            return Err(Error::Conflict {
                cluster: ctx.clone(),
                kind: "PersistentVolumeClaim",
                object,
                reason: "a restore creates a new PVC and writes into an existing one only with --overwrite; choose another name, delete it, or pass --overwrite".into(),
            });
        }
        Some(_) => {
            // Someone else's PVC: checked like a backup source, never deleted by us.
            let info = inspect_pvc(&cluster.client, ctx, ns, &opts.pvc).await?;
            if info.size_bytes < opts.size_bytes {
                return Err(Error::PvcUnsuitable {
                    cluster: ctx.clone(),
                    object,
                    problem: format!(
                        "holds {} bytes, less than the {} bytes of the backed-up volume",
                        info.size_bytes, opts.size_bytes
                    ),
                    fix: "expand it, or restore into a new PVC".into(),
                });
            }
            report
                .notes
                .push(format!("overwrote the existing PVC {object}"));
        }
        None => {
            pvcs.create(&PostParams::default(), &pvc)
                .await
                .map_err(|e| Error::api(ctx, "create", "PersistentVolumeClaim", &object, e))?;
            created.pvc = Some(opts.pvc.clone());
        }
    }
    let started = Instant::now();
    let result = run_mover(
        cluster,
        ns,
        &job,
        &mut created,
        &mut report.times,
        started,
        cancel,
    )
    .await;
    // The filled PVC is the product: only the Job goes on success.
    if result.is_ok() {
        created.pvc = None;
    }
    let t = Instant::now();
    cleanup(cluster, ns, &created, true, &mut report.notes).await;
    report.times.cleanup_s = t.elapsed().as_secs_f64();
    report.mover = Some(result?);
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn the_class_chosen_is_the_one_default_of_the_driver_or_a_refusal_naming_the_way_out() {
        let w = &SNAPSHOT_CLASS;
        let d = "hostpath.csi.k8s.io";
        assert_eq!(w.only_default(d, [("a", false), ("b", true)]).unwrap(), "b");
        let (problem, fix) = w.only_default(d, []).unwrap_err();
        assert_eq!(problem, format!("no VolumeSnapshotClass for driver {d}"));
        assert!(
            fix.contains(crate::snapshot::DEFAULT_CLASS_ANNOTATION),
            "{fix}"
        );
        let (problem, fix) = w.only_default(d, [("a", false), ("c", false)]).unwrap_err();
        assert!(problem.ends_with("(classes: a, c)"), "{problem}");
        assert!(fix.starts_with("pass --snapshot-class"), "{fix}");
        let (problem, _) = w.only_default(d, [("a", true), ("c", true)]).unwrap_err();
        assert!(problem.ends_with("VolumeSnapshotClasses for driver hostpath.csi.k8s.io: a, c"));
        assert_eq!(w.check_driver("a", d, d).unwrap(), "a");
        let (problem, _) = w.check_driver("a", "other", d).unwrap_err();
        assert_eq!(
            problem,
            "VolumeSnapshotClass a is for driver other, not hostpath.csi.k8s.io"
        );
    }
}
