//! SnapShift I/O: runs migrations and verifications against two clusters.
//!
//! Order of a migration: origin snapshot (cut or taken) -> wait readyToUse ->
//! read its content -> destination preflight -> compare what already exists ->
//! create content, then snapshot -> wait readyToUse -> optional PVC. Objects
//! this run created in the destination are removed again on failure (unless
//! `keep_partial`); the storage snapshot never is, because the destination
//! content is `Retain` and origin objects are never deleted.
//!
//! # Guarantees
//! - Idempotent: a re-run finds its own objects by name and provenance and
//!   reports [`Outcome::AlreadyMigrated`]; a foreign object under a planned name
//!   is a [`Error::Conflict`] and is never modified.
//! - Nothing is written in a dry run; reads (including the destination preflight) still happen.
//! - Memory per migration is a handful of objects; a batch holds `concurrency` migrations at once.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;

use super::metadata::{LABEL_MIGRATED, MetadataFilter, Provenance};
use super::plan::{
    DestinationContext, Existing, MigrationRequest, OriginSnapshot, PvcShape, SnapshotSource,
    check_migrated_pair, compare_content, compare_pvc, compare_snapshot, is_own_origin_snapshot,
    origin_from_objects, plan_destination, plan_origin_snapshot, stale_binding, validate_name,
    validate_namespace,
};
use super::rbac::{OptionalCheck, SkippedCheck};
use crate::Error;
use crate::connect::Cluster;
use crate::error::ns_name;
use crate::retry::RetryPolicy;
use crate::snapshot::{
    DeletionPolicy, GROUP, SnapshotClass, SnapshotState, VolumeMode, VolumeSnapshot,
    VolumeSnapshotClass, VolumeSnapshotContent,
};
use crate::wait::{Check, Notice, WaitError, wait_for};

/// A step of one migration, for progress display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Checking the destination cluster.
    Preflight,
    /// Creating the origin VolumeSnapshot (`namespace/name`).
    CreatingOriginSnapshot(String),
    /// Waiting for the origin snapshot to be ready.
    WaitingOrigin(String),
    /// Creating a destination object (`Kind name`).
    Creating(String),
    /// Waiting for the destination snapshot to be ready.
    WaitingDestination(String),
    /// Removing what this run created after a failure.
    CleaningUp,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Preflight => write!(f, "checking destination"),
            Stage::CreatingOriginSnapshot(o) => write!(f, "creating origin snapshot {o}"),
            Stage::WaitingOrigin(o) => write!(f, "waiting for origin snapshot {o}"),
            Stage::Creating(o) => write!(f, "creating {o}"),
            Stage::WaitingDestination(o) => write!(f, "waiting for destination snapshot {o}"),
            Stage::CleaningUp => write!(f, "cleaning up"),
        }
    }
}

/// Receives progress; implemented by the CLI (spinners) or by tests.
pub trait Progress: Send + Sync {
    /// `item` (a request label) entered `stage`.
    fn stage(&self, item: &str, stage: &Stage);
}

/// Discards progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _item: &str, _stage: &Stage) {}
}

/// Knobs of a migration run.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Deadline for one migration, waits included.
    pub timeout: Duration,
    /// Leave destination objects in place after a failure.
    pub keep_partial: bool,
    /// Plan and print only.
    pub dry_run: bool,
    /// Which labels/annotations travel.
    pub filter: MetadataFilter,
    /// Retry policy for API calls.
    pub retry: RetryPolicy,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            keep_partial: false,
            dry_run: false,
            filter: MetadataFilter::default(),
            retry: RetryPolicy::default(),
        }
    }
}

/// Which cluster a planned object belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Side {
    /// The origin cluster.
    Origin,
    /// The destination cluster.
    Destination,
}

/// What a dry run would do with an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PlannedAction {
    /// It would be created.
    Create,
    /// It exists already and would be used as is.
    Exists,
    /// It exists and is ours, but its `volumeSnapshotRef.uid` names a destination snapshot
    /// deleted since; the uid would be cleared so the re-created snapshot can bind it.
    Rebind,
}

/// One object of a dry-run plan.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedObject {
    /// Which side.
    pub side: Side,
    /// Context name of that side.
    pub cluster: String,
    /// Create or reuse.
    pub action: PlannedAction,
    /// Kind.
    pub kind: &'static str,
    /// `namespace/name` or `name`.
    pub name: String,
    /// The object as it would be sent.
    pub object: serde_json::Value,
}

/// How a migration ended when it did not fail.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Objects were created (listed as `Kind name`).
    Migrated {
        /// What this run created in the destination.
        created: Vec<String>,
    },
    /// Every destination object already existed, matched, and the snapshot is ready.
    AlreadyMigrated,
    /// Dry run: what would be done.
    DryRun(Vec<PlannedObject>),
}

/// Result of one migration.
#[derive(Debug)]
pub struct MigrationReport {
    /// Request label, e.g. `pvc apps/data`.
    pub item: String,
    /// Destination snapshot `namespace/name`, once known.
    pub destination: Option<String>,
    /// Snapshot handle, once known.
    pub handle: Option<String>,
    /// Outcome or error.
    pub result: Result<Outcome, Error>,
    /// Destination objects removed after a failure.
    pub removed: Vec<String>,
    /// Destination objects left behind after a failure (`keep_partial`, or removal failed).
    pub kept: Vec<String>,
    /// Things that worked but deserve attention (e.g. an origin content that can delete the shared snapshot).
    pub warnings: Vec<String>,
    /// Optional checks RBAC forbade, so the run went on without them (each also in `warnings`).
    pub skipped_checks: Vec<SkippedCheck>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Result of verifying one migrated snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Destination snapshot `namespace/name`.
    pub snapshot: String,
    /// Origin snapshot `namespace/name`, from provenance.
    pub origin: Option<String>,
    /// Destination snapshot handle.
    pub handle: Option<String>,
    /// Problems found; empty means healthy.
    pub problems: Vec<String>,
}

/// What exists under the planned destination names.
struct Found {
    content: Existing,
    snapshot: Existing,
    pvc: Existing,
    /// The content is ours but still bound (by uid) to a destination snapshot that was
    /// deleted since; the controller would report it misbound to a re-created one.
    rebind_content: bool,
}

#[derive(Clone, Debug)]
enum Created {
    Content(String),
    Snapshot(String, String),
    Pvc(String, String),
}

impl fmt::Display for Created {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Created::Content(n) => write!(f, "VolumeSnapshotContent {n}"),
            Created::Snapshot(ns, n) => write!(f, "VolumeSnapshot {ns}/{n}"),
            Created::Pvc(ns, n) => write!(f, "PersistentVolumeClaim {ns}/{n}"),
        }
    }
}

#[derive(Default)]
struct RunState {
    created: Vec<Created>,
    destination: Option<String>,
    handle: Option<String>,
    warnings: Vec<String>,
    skipped: Vec<SkippedCheck>,
}

impl RunState {
    /// Records that RBAC forbade an optional check (once per run: preflight runs twice).
    fn skip(&mut self, check: OptionalCheck, cluster: &Cluster) {
        let skipped = SkippedCheck {
            check,
            cluster: cluster.context.clone(),
        };
        if !self.skipped.contains(&skipped) {
            tracing::warn!(check = ?check, cluster = %cluster.context, "optional check forbidden by RBAC, skipped");
            self.warnings.push(skipped.to_string());
            self.skipped.push(skipped);
        }
    }
}

fn is_default_storage_class(class: &StorageClass) -> bool {
    class.metadata.annotations.as_ref().is_some_and(|a| {
        [
            "storageclass.kubernetes.io/is-default-class",
            "storageclass.beta.kubernetes.io/is-default-class",
        ]
        .iter()
        .any(|k| a.get(*k).is_some_and(|v| v == "true"))
    })
}

/// Moves snapshots from one cluster to another that shares the storage.
pub struct SnapShift {
    origin: Cluster,
    dest: Cluster,
    opts: MigrateOptions,
    progress: Arc<dyn Progress>,
    cancel: Option<watch::Receiver<bool>>,
}

fn to_json<K: Serialize>(obj: &K) -> serde_json::Value {
    serde_json::to_value(obj).unwrap_or(serde_json::Value::Null)
}

/// `Err(Terminating)` if `obj` is being deleted: reusing it, or waiting on it, would fail later
/// in a confusing way.
fn not_terminating<K: Resource>(
    cluster: &Cluster,
    kind: &'static str,
    object: &str,
    obj: &K,
) -> Result<(), Error> {
    let meta = obj.meta();
    if meta.deletion_timestamp.is_none() {
        return Ok(());
    }
    let finalizers = meta.finalizers.clone().unwrap_or_default();
    Err(Error::Terminating {
        cluster: cluster.context.clone(),
        kind,
        object: object.to_string(),
        finalizers: if finalizers.is_empty() {
            "none".into()
        } else {
            finalizers.join(", ")
        },
    })
}

/// Runs an optional check's API call: `Ok(Some(answer))`, or `Ok(None)` when RBAC forbids it
/// (recorded in `state`, so the run goes on without the check, and not asked again in this
/// run); other errors stay errors. `call` is a future, so it is not sent when skipped.
async fn optional<T>(
    check: OptionalCheck,
    cluster: &Cluster,
    state: &mut RunState,
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<Option<T>, Error> {
    if state.skipped.iter().any(|s| s.check == check) {
        return Ok(None);
    }
    match call.await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_forbidden() => {
            state.skip(check, cluster);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn describe_snapshot(vs: &VolumeSnapshot) -> String {
    match vs.bound_content() {
        Some(c) => format!("bound to {c}, readyToUse={}", vs.is_ready()),
        None => "not bound to a content yet".to_string(),
    }
}

impl SnapShift {
    /// A migrator between two connected clusters.
    pub fn new(origin: Cluster, dest: Cluster, opts: MigrateOptions) -> Self {
        Self {
            origin,
            dest,
            opts,
            progress: Arc::new(NoProgress),
            cancel: None,
        }
    }

    /// Stops migrations once `cancel` turns true (e.g. on Ctrl-C): waits end at once, no
    /// further object is created, and what a run already created is removed as after any
    /// other failure. An API call in flight is finished first, so nothing is left half-known.
    pub fn with_cancel(mut self, cancel: watch::Receiver<bool>) -> Self {
        self.cancel = Some(cancel);
        self
    }

    fn check_cancelled(&self) -> Result<(), Error> {
        match &self.cancel {
            Some(rx) if *rx.borrow() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }

    /// Resolves when cancellation is requested; never if it cannot be any more.
    async fn cancelled(&self) {
        if let Some(mut rx) = self.cancel.clone()
            && rx.wait_for(|c| *c).await.is_ok()
        {
            return;
        }
        std::future::pending::<()>().await;
    }

    /// Reports progress to `progress`.
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Self {
        self.progress = progress;
        self
    }

    /// The options in use.
    pub fn options(&self) -> &MigrateOptions {
        &self.opts
    }

    /// Names of PVCs in the origin namespace matching a label selector, sorted.
    ///
    /// # Errors
    /// API failures.
    pub async fn pvcs_matching(
        &self,
        namespace: &str,
        selector: &str,
    ) -> Result<Vec<String>, Error> {
        let api: Api<PersistentVolumeClaim> =
            Api::namespaced(self.origin.client.clone(), namespace);
        let lp = ListParams::default().labels(selector);
        let list = self
            .opts
            .retry
            .run(None, || api.list(&lp))
            .await
            .map_err(|e| match e {
                // The server parses the selector: a 400 means the user's selector is malformed.
                kube::Error::Api(status) if status.code == 400 => Error::InvalidInput {
                    what: format!("label selector {selector:?}"),
                    reason: format!(
                        "{} (expected e.g. app=db, tier in (a,b), !legacy)",
                        status.message
                    ),
                },
                e => Error::api(
                    &self.origin.context,
                    "list",
                    "PersistentVolumeClaim",
                    format!("{namespace} (selector {selector})"),
                    e,
                ),
            })?;
        let mut names: Vec<String> = list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Runs several migrations, at most `concurrency` at a time; one failure does not stop the others.
    /// Reports come back in request order.
    pub async fn migrate_all(
        &self,
        requests: &[MigrationRequest],
        concurrency: usize,
    ) -> Vec<MigrationReport> {
        let mut reports: Vec<(usize, MigrationReport)> =
            futures::stream::iter(requests.iter().enumerate())
                .map(|(i, r)| async move { (i, self.migrate(r).await) })
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
        reports.sort_by_key(|(i, _)| *i);
        reports.into_iter().map(|(_, r)| r).collect()
    }

    /// Runs one migration. Never panics on API answers; every failure is in the report.
    pub async fn migrate(&self, req: &MigrationRequest) -> MigrationReport {
        let started = Instant::now();
        let item = req.label();
        let mut state = RunState::default();
        let result = self.run(req, &item, &mut state).await;
        let (mut removed, mut kept) = (Vec::new(), Vec::new());
        if result.is_err() && !state.created.is_empty() {
            if self.opts.keep_partial {
                kept = state.created.iter().map(ToString::to_string).collect();
            } else {
                self.progress.stage(&item, &Stage::CleaningUp);
                (removed, kept) = self.cleanup(&state.created).await;
            }
        }
        MigrationReport {
            item,
            destination: state.destination,
            handle: state.handle,
            result,
            removed,
            kept,
            warnings: state.warnings,
            skipped_checks: state.skipped,
            elapsed: started.elapsed(),
        }
    }

    async fn get_opt<K>(
        &self,
        cluster: &Cluster,
        api: &Api<K>,
        kind: &'static str,
        ns: Option<&str>,
        name: &str,
        deadline: Instant,
    ) -> Result<Option<K>, Error>
    where
        K: Resource + Clone + DeserializeOwned + fmt::Debug,
    {
        let object = ns.map_or_else(|| name.to_string(), |ns| ns_name(ns, name));
        self.opts
            .retry
            .run(Some(deadline), || api.get_opt(name))
            .await
            .map_err(|e| Error::api(&cluster.context, "get", kind, object, e))
    }

    /// Creates `desired`; if a retried POST finds it already there, adopts it when
    /// `compare` says it is ours.
    #[allow(clippy::too_many_arguments)]
    async fn create_or_adopt<K>(
        &self,
        cluster: &Cluster,
        api: &Api<K>,
        kind: &'static str,
        object: &str,
        desired: &K,
        compare: impl Fn(&K, &K) -> Existing,
        deadline: Instant,
    ) -> Result<K, Error>
    where
        K: Resource + Clone + DeserializeOwned + Serialize + fmt::Debug,
    {
        let pp = PostParams::default();
        let created = self
            .opts
            .retry
            .run(Some(deadline), || api.create(&pp, desired))
            .await;
        match created {
            Ok(k) => Ok(k),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let name = desired.meta().name.clone().unwrap_or_default();
                let existing = self
                    .opts
                    .retry
                    .run(Some(deadline), || api.get(&name))
                    .await
                    .map_err(|e| Error::api(&cluster.context, "get", kind, object, e))?;
                match compare(desired, &existing) {
                    Existing::Matches => Ok(existing),
                    Existing::Differs(reason) => Err(Error::Conflict {
                        cluster: cluster.context.clone(),
                        kind,
                        object: object.to_string(),
                        reason: format!("created concurrently by someone else: {reason}"),
                    }),
                    Existing::Absent => Err(Error::api(
                        &cluster.context,
                        "create",
                        kind,
                        object,
                        kube::Error::Api(status),
                    )),
                }
            }
            Err(e) => Err(Error::api(&cluster.context, "create", kind, object, e)),
        }
    }
}

impl SnapShift {
    async fn run(
        &self,
        req: &MigrationRequest,
        item: &str,
        state: &mut RunState,
    ) -> Result<Outcome, Error> {
        req.validate()?;
        self.check_cancelled()?;
        let deadline = Instant::now() + self.opts.timeout;
        let (o, d) = (&self.origin, &self.dest);
        let ons = req.namespace.as_str();
        let dns = req.dest_namespace();
        // Both contexts default to current-context: forgetting the destination must not
        // "migrate" a snapshot onto itself.
        if o.server == d.server && ons == dns {
            return Err(Error::InvalidInput {
                what: "destination".into(),
                reason: format!(
                    "origin (context {:?}) and destination (context {:?}) are the same cluster ({}) and namespace {ons}; choose another destination context or namespace",
                    o.context, d.context, o.server
                ),
            });
        }
        let vs_name = req.origin_snapshot_name();
        let vs_object = ns_name(ons, &vs_name);
        state.destination = Some(ns_name(dns, &vs_name));
        let o_vs: Api<VolumeSnapshot> = Api::namespaced(o.client.clone(), ons);
        let o_pvc: Api<PersistentVolumeClaim> = Api::namespaced(o.client.clone(), ons);
        let mut planned = Vec::new();

        // 1. The origin snapshot: taken as named, or cut from the PVC (reusing our own from an earlier run).
        let existing = self
            .get_opt(o, &o_vs, "VolumeSnapshot", Some(ons), &vs_name, deadline)
            .await?;
        if let Some(vs) = &existing {
            not_terminating(o, "VolumeSnapshot", &vs_object, vs)?;
        }
        let mut origin_pvc = None;
        let existing = match &req.source {
            SnapshotSource::Snapshot(_) => Some(existing.ok_or_else(|| Error::NotFound {
                cluster: o.context.clone(),
                kind: "VolumeSnapshot",
                object: vs_object.clone(),
                hint: format!(
                    "; list them with: kubectl --context {} -n {ons} get volumesnapshots",
                    o.context
                ),
            })?),
            SnapshotSource::Pvc(pvc_name) => {
                let pvc = self
                    .get_opt(
                        o,
                        &o_pvc,
                        "PersistentVolumeClaim",
                        Some(ons),
                        pvc_name,
                        deadline,
                    )
                    .await?
                    .ok_or_else(|| Error::NotFound {
                        cluster: o.context.clone(),
                        kind: "PersistentVolumeClaim",
                        object: ns_name(ons, pvc_name),
                        hint: "; check the namespace and the PVC name".into(),
                    })?;
                origin_pvc = Some(pvc);
                match existing {
                    Some(vs) if is_own_origin_snapshot(&vs, pvc_name) => Some(vs),
                    Some(_) => {
                        return Err(Error::Conflict {
                            cluster: o.context.clone(),
                            kind: "VolumeSnapshot",
                            object: vs_object,
                            reason: format!(
                                "it was not cut by snapshift from PVC {pvc_name}; move it as an existing snapshot, or choose another snapshot name"
                            ),
                        });
                    }
                    None => None,
                }
            }
        };
        if let Some(vs) = &existing
            && self.opts.dry_run
        {
            planned.push(self.planned(
                Side::Origin,
                PlannedAction::Exists,
                "VolumeSnapshot",
                vs_object.clone(),
                vs,
            ));
        }
        if existing.is_none() {
            let Some(pvc) = origin_pvc.as_ref() else {
                return Err(Error::NotFound {
                    cluster: o.context.clone(),
                    kind: "VolumeSnapshot",
                    object: vs_object,
                    hint: String::new(),
                });
            };
            let desired = plan_origin_snapshot(req, pvc, &self.opts.filter);
            // Check the destination before cutting a snapshot that could not land there.
            let driver = self.driver_of_pvc(pvc, state, deadline).await;
            let dest_class = match &driver {
                Some(driver) => {
                    self.progress.stage(item, &Stage::Preflight);
                    Some(self.preflight_request(driver, req, state, deadline).await?)
                }
                None => None,
            };
            let shape = PvcShape::from_pvc(pvc)?;
            let pending = OriginSnapshot {
                namespace: ons.to_string(),
                name: vs_name.clone(),
                content_name: String::new(),
                handle: None,
                driver: driver.clone().unwrap_or_default(),
                restore_size: None,
                source_volume_mode: match shape.volume_mode.as_deref() {
                    Some("Block") => Some(VolumeMode::Block),
                    _ => Some(VolumeMode::Filesystem),
                },
                class: req.origin_snapshot_class.clone(),
                labels: desired.metadata.labels.clone().unwrap_or_default(),
                annotations: desired.metadata.annotations.clone().unwrap_or_default(),
                pvc: Some(shape),
            };
            if self.opts.dry_run {
                let (Some(_), Some(dest_class)) = (driver, dest_class) else {
                    return Err(Error::InvalidInput {
                        what: "dry run".into(),
                        reason: format!(
                            "the CSI driver of PVC {} is unknown (its StorageClass is missing, or reading it is forbidden: `get storageclasses` in the origin), so the destination cannot be planned before the snapshot exists",
                            ns_name(ons, &pvc.metadata.name.clone().unwrap_or_default())
                        ),
                    });
                };
                planned.push(self.planned(
                    Side::Origin,
                    PlannedAction::Create,
                    "VolumeSnapshot",
                    vs_object,
                    &desired,
                ));
                return self
                    .plan_and_compare(req, &pending, dest_class, planned, state, deadline)
                    .await;
            }
            // A snapshot not cut yet cannot match anything already in the destination:
            // refuse before cutting one that could never land.
            let ctx = DestinationContext {
                origin_context: &o.context,
                origin_server: &o.server,
                dest_class: dest_class.as_deref(),
                filter: &self.opts.filter,
            };
            self.names_taken(&plan_destination(&pending, req, &ctx)?, dns, deadline)
                .await?;
            self.check_cancelled()?;
            self.progress
                .stage(item, &Stage::CreatingOriginSnapshot(vs_object.clone()));
            let pvc_name = pvc.metadata.name.clone().unwrap_or_default();
            self.create_or_adopt(
                o,
                &o_vs,
                "VolumeSnapshot",
                &vs_object,
                &desired,
                |_, e| {
                    if is_own_origin_snapshot(e, &pvc_name) {
                        Existing::Matches
                    } else {
                        Existing::Differs("it was not cut by snapshift from this PVC".into())
                    }
                },
                deadline,
            )
            .await?;
        }

        // 2. Wait for it, then read its content.
        self.progress
            .stage(item, &Stage::WaitingOrigin(vs_object.clone()));
        let vs = self
            .wait_snapshot_ready(o, Side::Origin, &o_vs, ons, &vs_name, state, deadline)
            .await
            .map_err(|e| match (e, &req.source) {
                // Our own failed snapshot would be found again by the next run: say how to retry.
                (Error::SnapshotFailed { cluster, object, message }, SnapshotSource::Pvc(_)) => {
                    Error::SnapshotFailed {
                        message: format!(
                            "{message} (snapshift cut this snapshot; delete it with `kubectl --context {cluster} -n {ons} delete volumesnapshot {vs_name}` before retrying)"
                        ),
                        cluster,
                        object,
                    }
                }
                (e, _) => e,
            })?;
        let content_name = vs.bound_content().unwrap_or_default().to_string();
        let o_vsc: Api<VolumeSnapshotContent> = Api::all(o.client.clone());
        let vsc = self
            .get_opt(o, &o_vsc, "VolumeSnapshotContent", None, &content_name, deadline)
            .await?
            .ok_or_else(|| Error::Inconsistent {
                cluster: o.context.clone(),
                problem: format!(
                    "VolumeSnapshot {vs_object} is bound to VolumeSnapshotContent {content_name:?}, which does not exist"
                ),
            })?;
        if origin_pvc.is_none()
            && let Some(pvc_name) = vs.spec.source.persistent_volume_claim_name.as_deref()
        {
            origin_pvc = self
                .get_opt(
                    o,
                    &o_pvc,
                    "PersistentVolumeClaim",
                    Some(ons),
                    pvc_name,
                    deadline,
                )
                .await?;
        }
        let origin = origin_from_objects(&o.context, &vs, &vsc, origin_pvc.as_ref())?;
        state.handle = origin.handle.clone();
        if vsc.spec.deletion_policy == DeletionPolicy::Delete {
            state.warnings.push(format!(
                "origin VolumeSnapshotContent {} has deletionPolicy Delete: deleting origin snapshot {} deletes the storage snapshot the destination copy uses; to decouple them: kubectl --context {} patch volumesnapshotcontent {} --type merge -p '{{\"spec\":{{\"deletionPolicy\":\"Retain\"}}}}'",
                origin.content_name, vs_object, o.context, origin.content_name
            ));
        }

        // 3. Destination.
        self.progress.stage(item, &Stage::Preflight);
        let dest_class = self
            .preflight_request(&origin.driver, req, state, deadline)
            .await?;
        if self.opts.dry_run {
            return self
                .plan_and_compare(req, &origin, dest_class, planned, state, deadline)
                .await;
        }
        let ctx = DestinationContext {
            origin_context: &o.context,
            origin_server: &o.server,
            dest_class: Some(&dest_class),
            filter: &self.opts.filter,
        };
        let plan = plan_destination(&origin, req, &ctx)?;
        let found = self.existing(&plan, dns, deadline).await?;
        let (ex_content, ex_snapshot, ex_pvc) = (&found.content, &found.snapshot, &found.pvc);
        let d_vsc: Api<VolumeSnapshotContent> = Api::all(d.client.clone());
        let d_vs: Api<VolumeSnapshot> = Api::namespaced(d.client.clone(), dns);
        let d_pvc: Api<PersistentVolumeClaim> = Api::namespaced(d.client.clone(), dns);
        let content_name = plan.content.metadata.name.clone().unwrap_or_default();
        if found.rebind_content {
            self.check_cancelled()?;
            self.progress.stage(
                item,
                &Stage::Creating(format!(
                    "VolumeSnapshotContent {content_name} (re-binding after its snapshot was deleted)"
                )),
            );
            // Ours and Retain: clearing the uid lets the snapshot-controller bind the new snapshot.
            let patch =
                Patch::Merge(serde_json::json!({"spec": {"volumeSnapshotRef": {"uid": null}}}));
            let pp = PatchParams::default();
            self.opts
                .retry
                .run(Some(deadline), || d_vsc.patch(&content_name, &pp, &patch))
                .await
                .map_err(|e| {
                    Error::api(
                        &d.context,
                        "patch",
                        "VolumeSnapshotContent",
                        &content_name,
                        e,
                    )
                })?;
        }
        if *ex_content == Existing::Absent {
            self.check_cancelled()?;
            let what = format!("VolumeSnapshotContent {content_name}");
            self.progress.stage(item, &Stage::Creating(what));
            self.create_or_adopt(
                d,
                &d_vsc,
                "VolumeSnapshotContent",
                &content_name,
                &plan.content,
                compare_content,
                deadline,
            )
            .await?;
            state.created.push(Created::Content(content_name.clone()));
        }
        let dest_object = ns_name(dns, &vs_name);
        if *ex_snapshot == Existing::Absent {
            self.check_cancelled()?;
            self.progress.stage(
                item,
                &Stage::Creating(format!("VolumeSnapshot {dest_object}")),
            );
            self.create_or_adopt(
                d,
                &d_vs,
                "VolumeSnapshot",
                &dest_object,
                &plan.snapshot,
                compare_snapshot,
                deadline,
            )
            .await?;
            state
                .created
                .push(Created::Snapshot(dns.to_string(), vs_name.clone()));
        }
        self.progress
            .stage(item, &Stage::WaitingDestination(dest_object.clone()));
        self.wait_snapshot_ready(d, Side::Destination, &d_vs, dns, &vs_name, state, deadline)
            .await?;
        if let Some(pvc) = &plan.pvc
            && *ex_pvc == Existing::Absent
        {
            self.check_cancelled()?;
            let pvc_name = pvc.metadata.name.clone().unwrap_or_default();
            let object = ns_name(dns, &pvc_name);
            self.progress.stage(
                item,
                &Stage::Creating(format!("PersistentVolumeClaim {object}")),
            );
            self.create_or_adopt(
                d,
                &d_pvc,
                "PersistentVolumeClaim",
                &object,
                pvc,
                compare_pvc,
                deadline,
            )
            .await?;
            state.created.push(Created::Pvc(dns.to_string(), pvc_name));
        }
        if state.created.is_empty() {
            Ok(Outcome::AlreadyMigrated)
        } else {
            Ok(Outcome::Migrated {
                created: state.created.iter().map(ToString::to_string).collect(),
            })
        }
    }

    fn planned<K: Serialize>(
        &self,
        side: Side,
        action: PlannedAction,
        kind: &'static str,
        name: String,
        obj: &K,
    ) -> PlannedObject {
        let cluster = match side {
            Side::Origin => self.origin.context.clone(),
            Side::Destination => self.dest.context.clone(),
        };
        let mut object = to_json(obj);
        // Server-assigned fields say nothing about the plan.
        if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            for k in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "managedFields",
            ] {
                meta.remove(k);
            }
        }
        PlannedObject {
            side,
            cluster,
            action,
            kind,
            name,
            object,
        }
    }

    /// Dry-run tail: plan the destination and mark what already exists.
    async fn plan_and_compare(
        &self,
        req: &MigrationRequest,
        origin: &OriginSnapshot,
        dest_class: String,
        mut planned: Vec<PlannedObject>,
        state: &mut RunState,
        deadline: Instant,
    ) -> Result<Outcome, Error> {
        let ctx = DestinationContext {
            origin_context: &self.origin.context,
            origin_server: &self.origin.server,
            dest_class: Some(&dest_class),
            filter: &self.opts.filter,
        };
        let plan = plan_destination(origin, req, &ctx)?;
        let dns = req.dest_namespace();
        state.handle = origin.handle.clone();
        let found = if origin.handle.is_some() {
            self.existing(&plan, dns, deadline).await?
        } else {
            // Without a handle nothing can match; report names that are taken.
            self.names_taken(&plan, dns, deadline).await?
        };
        let action = |e: &Existing| match e {
            Existing::Matches => PlannedAction::Exists,
            _ => PlannedAction::Create,
        };
        let content_name = plan.content.metadata.name.clone().unwrap_or_default();
        let content_action = if found.rebind_content {
            PlannedAction::Rebind
        } else {
            action(&found.content)
        };
        planned.push(self.planned(
            Side::Destination,
            content_action,
            "VolumeSnapshotContent",
            content_name,
            &plan.content,
        ));
        let vs_name = ns_name(
            dns,
            &plan.snapshot.metadata.name.clone().unwrap_or_default(),
        );
        planned.push(self.planned(
            Side::Destination,
            action(&found.snapshot),
            "VolumeSnapshot",
            vs_name,
            &plan.snapshot,
        ));
        if let Some(pvc) = &plan.pvc {
            let name = ns_name(dns, &pvc.metadata.name.clone().unwrap_or_default());
            planned.push(self.planned(
                Side::Destination,
                action(&found.pvc),
                "PersistentVolumeClaim",
                name,
                pvc,
            ));
        }
        Ok(Outcome::DryRun(planned))
    }

    /// Looks up the planned destination names; a differing object is a conflict.
    async fn existing(
        &self,
        plan: &super::plan::DestinationPlan,
        dns: &str,
        deadline: Instant,
    ) -> Result<Found, Error> {
        let d = &self.dest;
        let d_vsc: Api<VolumeSnapshotContent> = Api::all(d.client.clone());
        let d_vs: Api<VolumeSnapshot> = Api::namespaced(d.client.clone(), dns);
        let d_pvc: Api<PersistentVolumeClaim> = Api::namespaced(d.client.clone(), dns);
        let content_name = plan.content.metadata.name.clone().unwrap_or_default();
        let vs_name = plan.snapshot.metadata.name.clone().unwrap_or_default();
        let found_content = self
            .get_opt(
                d,
                &d_vsc,
                "VolumeSnapshotContent",
                None,
                &content_name,
                deadline,
            )
            .await?;
        let c = match &found_content {
            Some(e) => {
                not_terminating(d, "VolumeSnapshotContent", &content_name, e)?;
                compare_content(&plan.content, e)
            }
            None => Existing::Absent,
        };
        let found_snapshot = self
            .get_opt(d, &d_vs, "VolumeSnapshot", Some(dns), &vs_name, deadline)
            .await?;
        let s = match &found_snapshot {
            Some(e) => {
                not_terminating(d, "VolumeSnapshot", &ns_name(dns, &vs_name), e)?;
                compare_snapshot(&plan.snapshot, e)
            }
            None => Existing::Absent,
        };
        let rebind_content = c == Existing::Matches
            && found_content
                .as_ref()
                .is_some_and(|vsc| stale_binding(vsc, found_snapshot.as_ref()));
        let p = match &plan.pvc {
            Some(pvc) => {
                let name = pvc.metadata.name.clone().unwrap_or_default();
                match self
                    .get_opt(
                        d,
                        &d_pvc,
                        "PersistentVolumeClaim",
                        Some(dns),
                        &name,
                        deadline,
                    )
                    .await?
                {
                    Some(e) => {
                        not_terminating(d, "PersistentVolumeClaim", &ns_name(dns, &name), &e)?;
                        compare_pvc(pvc, &e)
                    }
                    None => Existing::Absent,
                }
            }
            None => Existing::Absent,
        };
        let conflicts = [
            ("VolumeSnapshotContent", content_name, &c),
            ("VolumeSnapshot", ns_name(dns, &vs_name), &s),
            (
                "PersistentVolumeClaim",
                ns_name(
                    dns,
                    &plan
                        .pvc
                        .as_ref()
                        .and_then(|p| p.metadata.name.clone())
                        .unwrap_or_default(),
                ),
                &p,
            ),
        ];
        for (kind, object, e) in conflicts {
            if let Existing::Differs(reason) = e {
                return Err(Error::Conflict {
                    cluster: d.context.clone(),
                    kind,
                    object,
                    reason: reason.clone(),
                });
            }
        }
        Ok(Found {
            content: c,
            snapshot: s,
            pvc: p,
            rebind_content,
        })
    }

    async fn names_taken(
        &self,
        plan: &super::plan::DestinationPlan,
        dns: &str,
        deadline: Instant,
    ) -> Result<Found, Error> {
        let d = &self.dest;
        let taken = |kind: &'static str, object: String| Error::Conflict {
            cluster: d.context.clone(),
            kind,
            object,
            reason: "the name is taken, and a snapshot that is not cut yet cannot be what it holds"
                .into(),
        };
        let d_vsc: Api<VolumeSnapshotContent> = Api::all(d.client.clone());
        let d_vs: Api<VolumeSnapshot> = Api::namespaced(d.client.clone(), dns);
        let d_pvc: Api<PersistentVolumeClaim> = Api::namespaced(d.client.clone(), dns);
        let content_name = plan.content.metadata.name.clone().unwrap_or_default();
        let kind = "VolumeSnapshotContent";
        if let Some(e) = self
            .get_opt(d, &d_vsc, kind, None, &content_name, deadline)
            .await?
        {
            not_terminating(d, kind, &content_name, &e)?;
            return Err(taken(kind, content_name));
        }
        let vs_name = plan.snapshot.metadata.name.clone().unwrap_or_default();
        let kind = "VolumeSnapshot";
        if let Some(e) = self
            .get_opt(d, &d_vs, kind, Some(dns), &vs_name, deadline)
            .await?
        {
            let object = ns_name(dns, &vs_name);
            not_terminating(d, kind, &object, &e)?;
            return Err(taken(kind, object));
        }
        if let Some(pvc) = &plan.pvc {
            let name = pvc.metadata.name.clone().unwrap_or_default();
            let kind = "PersistentVolumeClaim";
            if let Some(e) = self
                .get_opt(d, &d_pvc, kind, Some(dns), &name, deadline)
                .await?
            {
                let object = ns_name(dns, &name);
                not_terminating(d, kind, &object, &e)?;
                return Err(taken(kind, object));
            }
        }
        Ok(Found {
            content: Existing::Absent,
            snapshot: Existing::Absent,
            pvc: Existing::Absent,
            rebind_content: false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn wait_snapshot_ready(
        &self,
        cluster: &Cluster,
        side: Side,
        api: &Api<VolumeSnapshot>,
        ns: &str,
        name: &str,
        state: &mut RunState,
        deadline: Instant,
    ) -> Result<VolumeSnapshot, Error> {
        let object = ns_name(ns, name);
        let check = |vs: &VolumeSnapshot| {
            if vs.is_ready() && vs.bound_content().is_some() {
                Check::Done
            } else if let Some(message) = vs.error_message() {
                Check::Failed(message.to_string())
            } else {
                Check::Pending(describe_snapshot(vs))
            }
        };
        let started = Instant::now();
        let mut notice = Notice::Watch;
        let waited = tokio::select! {
            biased;
            () = self.cancelled() => None,
            r = wait_for(api, name, &self.opts.retry, deadline, &mut notice, check) => Some(r),
        };
        if notice == Notice::Poll {
            state.skip(OptionalCheck::WatchSnapshots(side), cluster);
        }
        let Some(waited) = waited else {
            return Err(Error::Cancelled);
        };
        match waited {
            Ok(vs) => Ok(vs),
            Err(WaitError::Failed(message)) => Err(Error::SnapshotFailed {
                cluster: cluster.context.clone(),
                object,
                message,
            }),
            Err(WaitError::Timeout(last_state)) => Err(Error::Timeout {
                cluster: cluster.context.clone(),
                what: format!("VolumeSnapshot {object} to become readyToUse"),
                waited: started.elapsed(),
                last_state,
            }),
            Err(WaitError::Gone) => Err(Error::NotFound {
                cluster: cluster.context.clone(),
                kind: "VolumeSnapshot",
                object,
                hint: "; it disappeared while waiting for it".into(),
            }),
            Err(WaitError::Api(e)) => Err(Error::api(
                &cluster.context,
                "watch",
                "VolumeSnapshot",
                object,
                e,
            )),
        }
    }

    /// The CSI driver that provisions a PVC, from its StorageClass; `None` if unknown
    /// (no class, class gone, or reading it forbidden: then the check is recorded as skipped).
    async fn driver_of_pvc(
        &self,
        pvc: &PersistentVolumeClaim,
        state: &mut RunState,
        deadline: Instant,
    ) -> Option<String> {
        let class = pvc.spec.as_ref()?.storage_class_name.clone()?;
        let api: Api<StorageClass> = Api::all(self.origin.client.clone());
        match self
            .opts
            .retry
            .run(Some(deadline), || api.get_opt(&class))
            .await
        {
            Ok(sc) => sc.map(|sc| sc.provisioner),
            Err(e) if crate::error::is_forbidden(&e) => {
                state.skip(OptionalCheck::OriginDriver, &self.origin);
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, class, "cannot read the PVC's StorageClass");
                None
            }
        }
    }

    /// Everything the destination needs for `req`: [`Self::preflight`], plus a usable
    /// StorageClass when a PVC is to be restored. Returns the VolumeSnapshotClass to use.
    async fn preflight_request(
        &self,
        driver: &str,
        req: &MigrationRequest,
        state: &mut RunState,
        deadline: Instant,
    ) -> Result<String, Error> {
        let class = self
            .preflight(
                driver,
                req.dest_namespace(),
                req.snapshot_class.as_deref(),
                state,
                deadline,
            )
            .await?;
        if req.create_pvc {
            self.restore_storage_class(driver, req.storage_class.as_deref(), state, deadline)
                .await?;
        }
        Ok(class)
    }

    /// Checks that a PVC restored from a snapshot of `driver` can be provisioned: the named
    /// StorageClass (or the default one) exists and belongs to that driver. A PVC whose class
    /// has another provisioner would stay Pending forever.
    async fn restore_storage_class(
        &self,
        driver: &str,
        named: Option<&str>,
        state: &mut RunState,
        deadline: Instant,
    ) -> Result<(), Error> {
        let d = &self.dest;
        let api: Api<StorageClass> = Api::all(d.client.clone());
        let lp = ListParams::default();
        let list = async {
            self.opts
                .retry
                .run(Some(deadline), || api.list(&lp))
                .await
                .map_err(|e| Error::api(&d.context, "list", "StorageClass", "(all)", e))
        };
        // Only a check: the PVC is created either way.
        let Some(list) = optional(OptionalCheck::RestoreStorageClass, d, state, list).await? else {
            return Ok(());
        };
        let classes = list.items;
        let of_driver: Vec<String> = classes
            .iter()
            .filter(|c| c.provisioner == driver)
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        let choose = if of_driver.is_empty() {
            format!(
                "no StorageClass there is provisioned by {driver}; create one (kubectl --context {} get storageclasses lists them)",
                d.context
            )
        } else {
            format!(
                "name a StorageClass provisioned by {driver}: {}",
                of_driver.join(", ")
            )
        };
        let fail = |problem: String| Error::Preflight {
            cluster: d.context.clone(),
            problem,
            fix: choose.clone(),
        };
        let found = match named {
            Some(name) => match classes
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
            {
                Some(c) => c,
                None => return Err(fail(format!("StorageClass {name} does not exist"))),
            },
            None => {
                let defaults: Vec<&StorageClass> = classes
                    .iter()
                    .filter(|c| is_default_storage_class(c))
                    .collect();
                match defaults.as_slice() {
                    [only] => *only,
                    [] => {
                        return Err(fail(
                            "no StorageClass is marked default, so the restored PVC would not be provisioned"
                                .into(),
                        ));
                    }
                    _ => {
                        return Err(fail(format!(
                            "{} StorageClasses are marked default",
                            defaults.len()
                        )));
                    }
                }
            }
        };
        if found.provisioner != driver {
            return Err(fail(format!(
                "StorageClass {} is provisioned by {}, but the snapshot belongs to driver {driver}; the restored PVC would stay Pending",
                found.metadata.name.as_deref().unwrap_or("?"),
                found.provisioner
            )));
        }
        Ok(())
    }

    /// True when the cluster-scoped `K` named `name` is known to be missing on the destination;
    /// a forbidden lookup proves nothing, so it is recorded in `state` as skipped and passes.
    async fn dest_lacks<K>(
        &self,
        check: OptionalCheck,
        kind: &'static str,
        name: &str,
        state: &mut RunState,
        deadline: Instant,
    ) -> Result<bool, Error>
    where
        K: Resource<Scope = kube::core::ClusterResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + fmt::Debug,
    {
        let d = &self.dest;
        let api: Api<K> = Api::all(d.client.clone());
        let found = self.get_opt(d, &api, kind, None, name, deadline);
        Ok(optional(check, d, state, found)
            .await?
            .is_some_and(|found| found.is_none()))
    }

    /// Checks the destination can take a snapshot of `driver` in `ns`; returns the class to use.
    ///
    /// The namespace, CSIDriver and named-class lookups only catch problems early: when RBAC
    /// forbids one it is skipped (recorded in `state`). Choosing the driver's default class
    /// needs `list volumesnapshotclasses`: without it there is no class to put on the content.
    async fn preflight(
        &self,
        driver: &str,
        ns: &str,
        class: Option<&str>,
        state: &mut RunState,
        deadline: Instant,
    ) -> Result<String, Error> {
        let d = &self.dest;
        let kubectl = format!("kubectl --context {}", d.context);
        let fail = |problem: String, fix: String| Error::Preflight {
            cluster: d.context.clone(),
            problem,
            fix,
        };
        if self
            .dest_lacks::<Namespace>(
                OptionalCheck::DestinationNamespace,
                "Namespace",
                ns,
                state,
                deadline,
            )
            .await?
        {
            return Err(fail(
                format!("namespace {ns} does not exist"),
                format!(
                    "create it ({kubectl} create namespace {ns}) or pick another destination namespace"
                ),
            ));
        }
        if self
            .dest_lacks::<CSIDriver>(
                OptionalCheck::DestinationDriver,
                "CSIDriver",
                driver,
                state,
                deadline,
            )
            .await?
        {
            return Err(fail(
                format!("CSIDriver {driver} is not installed"),
                format!(
                    "install the {driver} CSI driver there, attached to the same storage as the origin ({kubectl} get csidrivers shows what is installed)"
                ),
            ));
        }
        let classes: Api<VolumeSnapshotClass> = Api::all(d.client.clone());
        let lp = ListParams::default();
        // A 404 on the collection means the snapshot CRDs are not installed at all.
        let no_api = |e: kube::Error| {
            match e {
            kube::Error::Api(status) if status.code == 404 => fail(
                format!("the {GROUP}/v1 API is not served: the VolumeSnapshot CRDs are not installed"),
                "install the external-snapshotter CRDs and snapshot-controller there, and a VolumeSnapshotClass for the driver".into(),
            ),
            e => Error::api(&d.context, "list", "VolumeSnapshotClass", "(all)", e),
        }
        };
        if let Some(class) = class {
            let named = self.get_opt(d, &classes, "VolumeSnapshotClass", None, class, deadline);
            let Some(named) = optional(OptionalCheck::NamedSnapshotClass, d, state, named).await?
            else {
                return Ok(class.to_string());
            };
            return match named {
                None => {
                    // Tell "no such class" from "no snapshot API" (only on this error path,
                    // so a named class needs no list permission: a forbidden list says nothing).
                    match self
                        .opts
                        .retry
                        .run(Some(deadline), || classes.list(&lp))
                        .await
                    {
                        Err(e) if crate::error::is_forbidden(&e) => {}
                        other => {
                            other.map_err(no_api)?;
                        }
                    }
                    Err(fail(
                        format!("VolumeSnapshotClass {class} does not exist"),
                        format!(
                            "create it for driver {driver}, or leave the class out to use the driver's default"
                        ),
                    ))
                }
                Some(k) if k.spec.driver != driver => Err(fail(
                    format!(
                        "VolumeSnapshotClass {class} belongs to driver {}, but the snapshot was taken by {driver}",
                        k.spec.driver
                    ),
                    format!("name a VolumeSnapshotClass of driver {driver}"),
                )),
                Some(_) => Ok(class.to_string()),
            };
        }
        let list = self
            .opts
            .retry
            .run(Some(deadline), || classes.list(&lp))
            .await
            .map_err(no_api)?;
        let for_driver: Vec<VolumeSnapshotClass> = list
            .items
            .into_iter()
            .filter(|k| k.spec.driver == driver)
            .collect();
        let names = |ks: &[&VolumeSnapshotClass]| -> String {
            ks.iter()
                .filter_map(|k| k.metadata.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let defaults: Vec<&VolumeSnapshotClass> =
            for_driver.iter().filter(|k| k.is_default()).collect();
        match (defaults.len(), for_driver.len()) {
            (1, _) => Ok(defaults[0].metadata.name.clone().unwrap_or_default()),
            (0, 1) => Ok(for_driver[0].metadata.name.clone().unwrap_or_default()),
            (0, 0) => Err(fail(
                format!("no VolumeSnapshotClass for driver {driver}"),
                format!(
                    "create one for {driver} (annotated snapshot.storage.kubernetes.io/is-default-class=true); the moved snapshot needs it for restores and CBT"
                ),
            )),
            (0, _) => Err(fail(
                format!(
                    "{} VolumeSnapshotClasses for driver {driver} ({}) and none is the default",
                    for_driver.len(),
                    names(&for_driver.iter().collect::<Vec<_>>())
                ),
                "name one explicitly".into(),
            )),
            (n, _) => Err(fail(
                format!(
                    "{n} VolumeSnapshotClasses are marked default for driver {driver} ({})",
                    names(&defaults)
                ),
                "name one explicitly, or unmark all but one".into(),
            )),
        }
    }

    /// Deletes `name` through `api`, retried until `deadline`; the caller judges the error.
    async fn delete_retried<K>(
        &self,
        api: &Api<K>,
        name: &str,
        deadline: Instant,
    ) -> Result<(), kube::Error>
    where
        K: Resource + Clone + DeserializeOwned + fmt::Debug,
    {
        let dp = DeleteParams::default();
        self.opts
            .retry
            .run(Some(deadline), || api.delete(name, &dp))
            .await
            .map(|_| ())
    }

    /// Deletes what a failed run created, newest first. Returns (removed, kept).
    async fn cleanup(&self, created: &[Created]) -> (Vec<String>, Vec<String>) {
        // The run's deadline may be spent; cleanup gets its own.
        let deadline = Instant::now() + Duration::from_secs(60);
        let d = &self.dest;
        let (mut removed, mut kept) = (Vec::new(), Vec::new());
        let mut snapshot_kept = false;
        for obj in created.iter().rev() {
            let result = match obj {
                // A snapshot left behind keeps its content, so it is not left pointing at nothing.
                Created::Content(_) if snapshot_kept => {
                    kept.push(format!("{obj} (its VolumeSnapshot could not be removed)"));
                    continue;
                }
                Created::Content(n) => {
                    let api: Api<VolumeSnapshotContent> = Api::all(d.client.clone());
                    self.delete_retried(&api, n, deadline).await
                }
                Created::Snapshot(ns, n) => {
                    let api: Api<VolumeSnapshot> = Api::namespaced(d.client.clone(), ns);
                    self.delete_retried(&api, n, deadline).await
                }
                // Not reached today: the PVC is a run's last step, so no later failure undoes it.
                // The example RBAC manifests therefore grant no `delete` on PVCs; should a step
                // ever follow it, the 403 would be reported in `kept` and the manifests need it.
                Created::Pvc(ns, n) => {
                    let api: Api<PersistentVolumeClaim> = Api::namespaced(d.client.clone(), ns);
                    self.delete_retried(&api, n, deadline).await
                }
            };
            match result {
                Ok(()) => removed.push(obj.to_string()),
                Err(kube::Error::Api(s)) if s.code == 404 => removed.push(obj.to_string()),
                Err(e) => {
                    snapshot_kept |= matches!(obj, Created::Snapshot(..));
                    kept.push(format!(
                        "{obj} (delete failed: {})",
                        crate::error::describe(&e)
                    ));
                }
            }
        }
        (removed, kept)
    }

    /// Checks migrated snapshots in `dest_namespace`: `names`, or every snapshot SnapShift labelled.
    ///
    /// # Errors
    /// Invalid names; API failures listing or reading either side.
    pub async fn verify(
        &self,
        dest_namespace: &str,
        names: &[String],
    ) -> Result<Vec<VerifyReport>, Error> {
        validate_namespace("namespace", dest_namespace)?;
        for name in names {
            validate_name("snapshot name", name)?;
        }
        let deadline = Instant::now() + self.opts.timeout;
        let (o, d) = (&self.origin, &self.dest);
        let d_vs: Api<VolumeSnapshot> = Api::namespaced(d.client.clone(), dest_namespace);
        let d_vsc: Api<VolumeSnapshotContent> = Api::all(d.client.clone());
        let o_vsc: Api<VolumeSnapshotContent> = Api::all(o.client.clone());
        let mut snapshots = Vec::new();
        let mut reports = Vec::new();
        if names.is_empty() {
            let lp = ListParams::default().labels(&format!("{LABEL_MIGRATED}=true"));
            let list = self
                .opts
                .retry
                .run(Some(deadline), || d_vs.list(&lp))
                .await
                .map_err(|e| Error::api(&d.context, "list", "VolumeSnapshot", dest_namespace, e))?;
            snapshots = list.items;
        } else {
            for name in names {
                match self
                    .get_opt(
                        d,
                        &d_vs,
                        "VolumeSnapshot",
                        Some(dest_namespace),
                        name,
                        deadline,
                    )
                    .await?
                {
                    Some(vs) => snapshots.push(vs),
                    None => reports.push(VerifyReport {
                        snapshot: ns_name(dest_namespace, name),
                        origin: None,
                        handle: None,
                        problems: vec![format!(
                            "VolumeSnapshot does not exist in cluster {:?}",
                            d.context
                        )],
                    }),
                }
            }
        }
        for dvs in snapshots {
            let name = dvs.metadata.name.clone().unwrap_or_default();
            let mut report = VerifyReport {
                snapshot: ns_name(dest_namespace, &name),
                origin: None,
                handle: None,
                problems: Vec::new(),
            };
            let content_name = dvs
                .bound_content()
                .map(str::to_string)
                .or_else(|| dvs.spec.source.volume_snapshot_content_name.clone());
            let dvsc = match &content_name {
                Some(c) => {
                    self.get_opt(d, &d_vsc, "VolumeSnapshotContent", None, c, deadline)
                        .await?
                }
                None => None,
            };
            report.handle = dvsc
                .as_ref()
                .and_then(|c| c.snapshot_handle().map(str::to_string));
            let Some(prov) = Provenance::from_annotations(dvs.metadata.annotations.as_ref()) else {
                report
                    .problems
                    .push("no provenance annotations: not migrated by snapshift".into());
                reports.push(report);
                continue;
            };
            report.origin = Some(ns_name(&prov.namespace, &prov.name));
            if prov.server != o.server {
                report.problems.push(format!(
                    "migrated from API server {}, but the origin context {:?} points at {}",
                    prov.server, o.context, o.server
                ));
            }
            let o_vs: Api<VolumeSnapshot> = Api::namespaced(o.client.clone(), &prov.namespace);
            let Some(ovs) = self
                .get_opt(
                    o,
                    &o_vs,
                    "VolumeSnapshot",
                    Some(&prov.namespace),
                    &prov.name,
                    deadline,
                )
                .await?
            else {
                report.problems.push(format!(
                    "origin VolumeSnapshot {}/{} no longer exists in cluster {:?}",
                    prov.namespace, prov.name, o.context
                ));
                reports.push(report);
                continue;
            };
            let ovsc = match ovs.bound_content() {
                Some(c) => {
                    self.get_opt(o, &o_vsc, "VolumeSnapshotContent", None, c, deadline)
                        .await?
                }
                None => None,
            };
            report.problems.extend(check_migrated_pair(
                &ovs,
                ovsc.as_ref(),
                &dvs,
                dvsc.as_ref(),
            ));
            reports.push(report);
        }
        Ok(reports)
    }
}
