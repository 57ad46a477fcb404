//! `cbt backup --selector ... --group`: back up several PVCs from one VolumeGroupSnapshot, so
//! every volume is read at the same crash-consistent instant (a database's data and WAL
//! volumes), each still incrementally against its own previous backup.
//!
//! 1. The PVCs the selector matches are checked as for `--pvc` and must share one CSI driver;
//!    the group snapshot API (`groupsnapshot.storage.k8s.io/v1`) must be served and the driver
//!    must have a VolumeGroupSnapshotClass (the named one, else its default); its
//!    SnapshotMetadataService is found as for `--pvc`, and with one the driver needs a single
//!    default VolumeSnapshotClass (the sidecar takes the secrets of member snapshots, which name
//!    no class, from it).
//! 2. One VolumeGroupSnapshot with that selector (marked ours by label and annotation, like the
//!    per-PVC snapshots) is created and awaited (`status.error` verbatim, or a timeout).
//! 3. Its bound content's `volumeSnapshotInfoList` pairs each volume handle with a snapshot
//!    handle; the member VolumeSnapshot of each pair is the one naming the group in
//!    `status.volumeGroupSnapshotName` whose content has that snapshot handle, and its PVC is
//!    the selected PVC whose PersistentVolume has that volume handle. A volume of the group
//!    that is none of the selected PVCs, or a selected PVC missing from the group, fails the run
//!    (a label changed between the two lists).
//! 4. Each member then runs the per-PVC pipeline from the temporary PVC on (see the parent
//!    module), `concurrency` at a time. Its mover asks for the delta from the handle its own
//!    volume's latest backup recorded ([`cbt_store::engine::cbt::DeltaBase::Latest`]), so each
//!    member is incremental against its own lineage. Manifests record the group's name
//!    (`source.volume_group_snapshot`) and cut time ([`super::GROUP_CUT_TIME_LABEL`]).
//! 5. Success: the group is kept (its members are the next deltas' bases) and older groups this
//!    tool cut for the same namespace and selector beyond `keep_snapshots` are deleted, which
//!    deletes their members. Member VolumeSnapshots are never deleted on their own.
//!
//! # Failure
//! After the first member failure no further member is started (running ones finish: a mover
//! is never killed half way, so whether it committed is known). The run fails naming the
//! member, temporary objects are deleted, and the new group is deleted unless a member already
//! committed a backup: that backup recorded a member's handle as its volume's next delta base,
//! and deleting the group would delete that snapshot and break the volume's next incremental.
//! Such a group stays (the error says so) until retention removes it after a later success.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::objects::{
    MANAGED_BY, MANAGED_BY_LABEL, OWNER_ANNOTATION, ROLE_LABEL, block_pvc, object_name, short_hash,
};
use super::{
    Created, GroupCut, PvcBackupOptions, PvcBackupReport, ReadySnapshot, StepTimes,
    back_up_from_snapshot, backup_job, cleanup, is_not_found, wait_cancel,
};
use crate::connect::Cluster;
use crate::error::{Error, GroupMemberFailure, ns_name};
use crate::group_snapshot::{
    VolumeGroupSnapshot, VolumeGroupSnapshotClass, VolumeGroupSnapshotContent,
    VolumeGroupSnapshotSource, VolumeGroupSnapshotSpec, label_selector,
};
use crate::metadata_service::{MetadataEndpoint, discover};
use crate::pvc::{PvcInfo, inspect_pvc, pvcs_matching};
use crate::retry::RetryPolicy;
use crate::snapshot::{SnapshotClass, SnapshotState, VolumeSnapshot, VolumeSnapshotContent};
use crate::wait::{Check, WaitError, wait_for};

/// Who creates (and so may delete) the group snapshots and their temporary objects.
pub const GROUP_CREATED_BY: &str = "cbt backup --group";
/// Label with a digest of the namespace and selector a group was cut for (retention is per
/// selector).
pub const SELECTOR_HASH_LABEL: &str = "cbt.io/selector-hash";
/// Annotation with the selector text a group was cut for (for people).
pub const SELECTOR_ANNOTATION: &str = "cbt.io/selector";
/// [`ROLE_LABEL`] value of the group snapshots.
pub const GROUP_ROLE: &str = "group-snapshot";

/// Options of a group backup.
#[derive(Clone, Debug)]
pub struct GroupBackupOptions {
    /// Everything a per-PVC backup takes; `keep_snapshots` counts groups here and
    /// `snapshot_class` is unused (the group's class decides).
    pub pvc: PvcBackupOptions,
    /// Label selector of the PVCs (`kubectl -l` syntax).
    pub selector: String,
    /// VolumeGroupSnapshotClass; `None` = the driver's default group class.
    pub group_class: Option<String>,
    /// Members backed up at once (at least 1).
    pub concurrency: usize,
}

/// What happened to the group as a whole.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupBackupReport {
    /// Namespace of the PVCs.
    pub namespace: String,
    /// The selector.
    pub selector: String,
    /// The VolumeGroupSnapshot (created, or planned in a dry run).
    pub group: Option<String>,
    /// Its class.
    pub group_class: Option<String>,
    /// Its bound VolumeGroupSnapshotContent.
    pub group_content: Option<String>,
    /// The instant every member was cut at (`status.creationTime`).
    pub cut_time: Option<String>,
    /// The PVCs the selector matched, sorted (the members once the group is cut).
    pub pvcs: Vec<String>,
    /// True when the new group was deleted because the run failed.
    pub group_deleted: bool,
    /// Older groups deleted by retention.
    pub deleted_groups: Vec<String>,
    /// Creating the group until it was ready, and deleting what had to go.
    pub times: StepTimes,
    /// Objects that would be created (dry run), as JSON values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub planned_objects: Vec<serde_json::Value>,
    /// Warnings for the user.
    pub notes: Vec<String>,
}

/// One member's outcome.
#[derive(Debug)]
pub struct GroupMemberResult {
    /// PVC name.
    pub pvc: String,
    /// The per-PVC report, or why the member failed (or was not started).
    pub result: Result<PvcBackupReport, Error>,
}

/// Everything a group backup did.
#[derive(Debug, Default)]
pub struct GroupBackupOutcome {
    /// The group.
    pub report: GroupBackupReport,
    /// Each member (empty when the run stopped before the members, and in a dry run).
    pub members: Vec<GroupMemberResult>,
}

/// A failed group backup: why, and what happened up to then.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct GroupBackupFailure {
    /// What had happened when it failed.
    pub outcome: GroupBackupOutcome,
    /// Why it failed ([`Error::GroupMemberFailed`] once members ran).
    #[source]
    pub error: Error,
}

/// Backs up the PVCs matching the selector from one VolumeGroupSnapshot (see the module docs).
///
/// # Errors
/// [`GroupBackupFailure`]: the selection unsuitable or matching nothing, the group API or a
/// class missing ([`Error::Preflight`]), the group failing or timing out, members failing
/// ([`Error::GroupMemberFailed`]), cancellation. Temporary objects are deleted in every case.
pub async fn back_up_group(
    cluster: &Cluster,
    opts: &GroupBackupOptions,
    cancel: watch::Receiver<bool>,
) -> Result<GroupBackupOutcome, Box<GroupBackupFailure>> {
    let mut outcome = GroupBackupOutcome {
        report: GroupBackupReport {
            namespace: opts.pvc.namespace.clone(),
            selector: opts.selector.clone(),
            ..GroupBackupReport::default()
        },
        members: Vec::new(),
    };
    match run(cluster, opts, &mut outcome, cancel).await {
        Ok(()) => Ok(outcome),
        Err(error) => Err(Box::new(GroupBackupFailure { outcome, error })),
    }
}

/// The driver's default VolumeGroupSnapshotClass, or the named one checked against the driver;
/// first checks that the group snapshot API is served at all.
///
/// # Errors
/// [`Error::Preflight`] naming what is missing: the API (CRDs), the named class, a default
/// class (or several defaults); [`Error::Api`] for other API failures.
pub async fn group_snapshot_class_for(
    cluster: &Cluster,
    driver: &str,
    named: Option<&str>,
) -> Result<String, Error> {
    let ctx = &cluster.context;
    let preflight = |(problem, fix): super::Refusal| Error::Preflight {
        cluster: ctx.clone(),
        problem,
        fix,
    };
    let api: Api<VolumeGroupSnapshotClass> = Api::all(cluster.client.clone());
    let all = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        // The API server answers 404 for a resource nobody registered: no CRD.
        Err(e) if is_not_found(&e) => {
            return Err(preflight((
                "the group snapshot API (groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshot, VolumeGroupSnapshotContent, VolumeGroupSnapshotClass) is not served: the CRDs are not installed".into(),
                "install the external-snapshotter group snapshot CRDs and run the snapshot-controller and csi-snapshotter with group snapshots enabled, or back up without --group".into(),
            )));
        }
        Err(e) => return Err(Error::api(ctx, "list", "VolumeGroupSnapshotClass", "", e)),
    };
    if let Some(name) = named {
        let class = all
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| preflight(GROUP_CLASS.missing(name, driver)))?;
        return GROUP_CLASS
            .check_driver(name, &class.spec.driver, driver)
            .map_err(preflight);
    }
    let of_driver = all.iter().filter(|c| c.spec.driver == driver);
    GROUP_CLASS
        .only_default(
            driver,
            of_driver.filter_map(|c| Some((c.metadata.name.as_deref()?, c.is_default()))),
        )
        .map_err(preflight)
}

/// The words of [`group_snapshot_class_for`].
const GROUP_CLASS: super::ClassWords = super::ClassWords {
    kind: "VolumeGroupSnapshotClass",
    flag: "--group-snapshot-class",
    default_annotation: crate::group_snapshot::DEFAULT_CLASS_ANNOTATION,
    otherwise: ", or back up without --group",
};

/// The VolumeGroupSnapshot a group backup creates.
pub fn group_snapshot_object(
    name: &str,
    namespace: &str,
    selector: LabelSelector,
    selector_text: &str,
    selector_hash: &str,
    class: &str,
) -> VolumeGroupSnapshot {
    let mut vgs = VolumeGroupSnapshot::new(
        name,
        VolumeGroupSnapshotSpec {
            source: VolumeGroupSnapshotSource {
                selector: Some(selector),
                volume_group_snapshot_content_name: None,
            },
            // Named even when it is the default, so the object says what it was cut with.
            volume_group_snapshot_class_name: Some(class.to_string()),
        },
    );
    vgs.metadata = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            (ROLE_LABEL.to_string(), GROUP_ROLE.to_string()),
            (SELECTOR_HASH_LABEL.to_string(), selector_hash.to_string()),
        ])),
        annotations: Some(BTreeMap::from([
            (OWNER_ANNOTATION.to_string(), GROUP_CREATED_BY.to_string()),
            (SELECTOR_ANNOTATION.to_string(), selector_text.to_string()),
        ])),
        ..ObjectMeta::default()
    };
    vgs
}

/// One member ready to back up: its PVC and its VolumeSnapshot in the group.
#[derive(Clone, Debug)]
struct Member {
    pvc: PvcInfo,
    snapshot: String,
    handle: String,
}

async fn run(
    cluster: &Cluster,
    opts: &GroupBackupOptions,
    outcome: &mut GroupBackupOutcome,
    cancel: watch::Receiver<bool>,
) -> Result<(), Error> {
    let ctx = &cluster.context;
    let ns = &opts.pvc.namespace;
    let selector = label_selector(&opts.selector).map_err(|e| Error::InvalidInput {
        what: "--selector".into(),
        reason: e.to_string(),
    })?;
    let names = pvcs_matching(cluster, ns, &opts.selector).await?;
    if names.is_empty() {
        return Err(Error::InvalidInput {
            what: "--selector".into(),
            reason: format!("{} matches no PVC in namespace {ns}", opts.selector),
        });
    }
    let mut pvcs = Vec::with_capacity(names.len());
    for name in &names {
        pvcs.push(inspect_pvc(&cluster.client, ctx, ns, name).await?);
    }
    outcome.report.pvcs = names.clone();
    let driver = pvcs[0].driver.clone();
    if pvcs.iter().any(|p| p.driver != driver) {
        let each: Vec<String> = pvcs
            .iter()
            .map(|p| format!("{} ({})", p.name, p.driver))
            .collect();
        return Err(Error::Preflight {
            cluster: ctx.clone(),
            problem: format!(
                "the PVCs selected by {} use different CSI drivers: {}; a group snapshot is cut by one driver",
                opts.selector,
                each.join(", ")
            ),
            fix: "narrow the selector to one driver's PVCs, or back up without --group".into(),
        });
    }
    let class = group_snapshot_class_for(cluster, &driver, opts.group_class.as_deref()).await?;
    outcome.report.group_class = Some(class.clone());
    let endpoint = match discover(&cluster.client, ctx, &driver).await {
        Ok(e) => Some(e),
        Err(e @ Error::NoMetadataService { .. }) if opts.pvc.fallback_full => {
            outcome.report.notes.push(format!(
                "{e}; taking full backups that read each whole volume (--fallback-full)"
            ));
            None
        }
        Err(e) => return Err(e),
    };
    if endpoint.is_some() {
        // Member VolumeSnapshots name no VolumeSnapshotClass (the controller makes them), so
        // the SnapshotMetadata sidecar takes the secrets from the driver's default class and
        // refuses every call without exactly one: catch that before cutting anything.
        match super::snapshot_class_for(cluster, &driver, None).await {
            Ok(_) => {}
            Err(Error::Preflight {
                cluster, problem, ..
            }) => {
                return Err(Error::Preflight {
                    cluster,
                    problem: format!(
                        "{problem}: the SnapshotMetadata sidecar reads the secrets of a group's member snapshots, which name no class, from the driver's default VolumeSnapshotClass"
                    ),
                    fix: format!(
                        "annotate exactly one VolumeSnapshotClass of {driver} with snapshot.storage.kubernetes.io/is-default-class: \"true\""
                    ),
                });
            }
            Err(e) => return Err(e),
        }
    }
    // The selector object (sorted maps) is the canonical form: `a=1,b=2` and `b=2,a=1` are
    // one selector for retention.
    let canonical = serde_json::to_string(&selector).unwrap_or_default();
    let selector_hash = short_hash(&[ns, &canonical]);
    let group_name = object_name(
        "cbt-group",
        &opts.pvc.run_name.to_ascii_lowercase(),
        &selector_hash[..10],
        253,
    );
    let vgs = group_snapshot_object(
        &group_name,
        ns,
        selector,
        &opts.selector,
        &selector_hash,
        &class,
    );
    outcome.report.group = Some(group_name.clone());
    if opts.pvc.dry_run {
        outcome.report.planned_objects = plan(&vgs, &pvcs, endpoint.as_ref(), opts);
        return Ok(());
    }
    if *cancel.borrow() {
        return Err(Error::Cancelled);
    }

    let groups: Api<VolumeGroupSnapshot> = Api::namespaced(cluster.client.clone(), ns);
    let t = Instant::now();
    groups
        .create(&PostParams::default(), &vgs)
        .await
        .map_err(|e| {
            Error::api(
                ctx,
                "create",
                "VolumeGroupSnapshot",
                ns_name(ns, &group_name),
                e,
            )
        })?;
    let cut = tokio::select! {
        r = wait_for_members(cluster, opts, &group_name, &pvcs, &mut outcome.report) => r,
        _ = wait_cancel(cancel.clone()) => Err(Error::Cancelled),
    };
    outcome.report.times.snapshot_wait_s = t.elapsed().as_secs_f64();
    let (cut, members) = match cut {
        Ok(found) => found,
        Err(e) => {
            delete_group(cluster, ns, &group_name, &mut outcome.report).await;
            return Err(e);
        }
    };

    let waited = outcome.report.times.snapshot_wait_s;
    outcome.members = back_up_members(
        cluster,
        opts,
        endpoint.as_ref(),
        &cut,
        waited,
        members,
        &cancel,
    )
    .await;
    let t = Instant::now();
    let result = settle(cluster, opts, &group_name, outcome, &cancel).await;
    outcome.report.times.cleanup_s = t.elapsed().as_secs_f64();
    result
}

/// The objects a run would create, for `--dry-run` (member names are the controller's, so
/// they appear as placeholders).
fn plan(
    vgs: &VolumeGroupSnapshot,
    pvcs: &[PvcInfo],
    endpoint: Option<&MetadataEndpoint>,
    opts: &GroupBackupOptions,
) -> Vec<serde_json::Value> {
    let mut planned = vec![serde_json::to_value(vgs).unwrap_or_default()];
    let cut = GroupCut {
        name: vgs.metadata.name.clone().unwrap_or_default(),
        cut_time: None,
    };
    for pvc in pvcs {
        let (src, job_name) = temp_names(pvc, opts);
        let member = format!("<member VolumeSnapshot of {}>", pvc.name);
        let handle = "<status.snapshotHandle of the member's content>";
        let volume = pvc.repository_volume();
        planned
            .push(serde_json::to_value(source_pvc(&src, pvc, &member, opts)).unwrap_or_default());
        planned.push(
            serde_json::to_value(backup_job(
                &job_name,
                &src,
                &member,
                handle,
                pvc,
                &volume,
                endpoint,
                &opts.pvc,
                Some(&cut),
            ))
            .unwrap_or_default(),
        );
    }
    planned
}

/// Names of a member's temporary PVC and Job (stable per PVC and run, like `--pvc`'s).
fn temp_names(pvc: &PvcInfo, opts: &GroupBackupOptions) -> (String, String) {
    let suffix = short_hash(&[&pvc.namespace, &pvc.name, &pvc.uid, &opts.pvc.run_name]);
    (
        object_name("cbt-src", &pvc.name, &suffix[..10], 253),
        object_name("cbt-backup", &pvc.name, &suffix[..10], 63),
    )
}

fn source_pvc(
    name: &str,
    pvc: &PvcInfo,
    snapshot: &str,
    opts: &GroupBackupOptions,
) -> k8s_openapi::api::core::v1::PersistentVolumeClaim {
    block_pvc(
        name,
        &opts.pvc.namespace,
        pvc.size_bytes,
        pvc.storage_class.as_deref(),
        &[],
        Some(snapshot),
        "source",
        &pvc.repository_volume(),
        GROUP_CREATED_BY,
    )
}

/// Why the members cannot be listed yet (`Pending`) or at all.
enum NotYet {
    Pending(String),
    Failed(Error),
}

/// Waits for the group to be ready (its error verbatim, or a timeout) and for every member to
/// be found and ready; returns the cut and the members, one per selected PVC.
async fn wait_for_members(
    cluster: &Cluster,
    opts: &GroupBackupOptions,
    group_name: &str,
    pvcs: &[PvcInfo],
    report: &mut GroupBackupReport,
) -> Result<(GroupCut, Vec<Member>), Error> {
    let ctx = &cluster.context;
    let ns = &opts.pvc.namespace;
    let object = ns_name(ns, group_name);
    let groups: Api<VolumeGroupSnapshot> = Api::namespaced(cluster.client.clone(), ns);
    let deadline = Instant::now() + opts.pvc.snapshot_timeout;
    let mut notice = crate::wait::Notice::default();
    let timeout = |what: String, last_state: String| Error::Timeout {
        cluster: ctx.clone(),
        what,
        waited: opts.pvc.snapshot_timeout,
        last_state,
    };
    let ready = wait_for(
        &groups,
        group_name,
        &RetryPolicy::default(),
        deadline,
        &mut notice,
        |g: &VolumeGroupSnapshot| {
            if let Some(msg) = g.error_message() {
                return Check::Failed(msg.to_string());
            }
            if g.is_ready() {
                Check::Done
            } else {
                Check::Pending(match g.bound_content() {
                    Some(c) => format!("bound to {c}, not ready"),
                    None => "not bound to a content yet".into(),
                })
            }
        },
    )
    .await
    .map_err(|e| match e {
        WaitError::Failed(message) => Error::GroupSnapshotFailed {
            cluster: ctx.clone(),
            object: object.clone(),
            message,
        },
        WaitError::Timeout(last) => timeout(
            format!("VolumeGroupSnapshot {object} to be readyToUse"),
            last,
        ),
        WaitError::Gone => Error::Inconsistent {
            cluster: ctx.clone(),
            problem: format!("VolumeGroupSnapshot {object} disappeared while waiting"),
        },
        WaitError::Api(e) => Error::api(ctx, "get", "VolumeGroupSnapshot", &object, e),
    })?;
    let cut = GroupCut {
        name: group_name.to_string(),
        cut_time: ready
            .creation_time()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_string)),
    };
    report.cut_time = cut.cut_time.clone();
    report.group_content = ready.bound_content().map(str::to_string);
    // Ready means the members exist, but their own status may trail the group's; poll briefly
    // within the same deadline.
    let mut delay = Duration::from_millis(100);
    loop {
        match find_members(cluster, ns, &ready, pvcs).await {
            Ok(members) => return Ok((cut, members)),
            Err(NotYet::Failed(e)) => return Err(e),
            Err(NotYet::Pending(state)) => {
                if Instant::now() >= deadline {
                    return Err(timeout(
                        format!("the member VolumeSnapshots of {object} to be ready"),
                        state,
                    ));
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Maps the group's `(volume handle, snapshot handle)` pairs to the selected PVCs and to the
/// member VolumeSnapshots (see the module docs).
async fn find_members(
    cluster: &Cluster,
    ns: &str,
    group: &VolumeGroupSnapshot,
    pvcs: &[PvcInfo],
) -> Result<Vec<Member>, NotYet> {
    let ctx = &cluster.context;
    let group_name = group.metadata.name.clone().unwrap_or_default();
    let object = ns_name(ns, &group_name);
    let inconsistent = |problem: String| {
        NotYet::Failed(Error::Inconsistent {
            cluster: ctx.clone(),
            problem,
        })
    };
    let content_name = group.bound_content().unwrap_or_default().to_string();
    let contents: Api<VolumeGroupSnapshotContent> = Api::all(cluster.client.clone());
    let content = contents
        .get_opt(&content_name)
        .await
        .map_err(|e| {
            NotYet::Failed(Error::api(ctx, "get", "VolumeGroupSnapshotContent", &content_name, e))
        })?
        .ok_or_else(|| {
            inconsistent(format!(
                "VolumeGroupSnapshot {object} is ready but its content {content_name:?} does not exist"
            ))
        })?;
    // Both objects must point at each other before either is trusted (the CRD's own advice).
    if !content.points_at(group) {
        return Err(inconsistent(format!(
            "VolumeGroupSnapshotContent {content_name} does not point back at VolumeGroupSnapshot {object}"
        )));
    }
    let pairs = content.member_handles();
    let vss: Api<VolumeSnapshot> = Api::namespaced(cluster.client.clone(), ns);
    let in_group: Vec<VolumeSnapshot> = vss
        .list(&ListParams::default())
        .await
        .map_err(|e| NotYet::Failed(Error::api(ctx, "list", "VolumeSnapshot", ns, e)))?
        .items
        .into_iter()
        .filter(|vs| is_member_of(vs, group))
        .collect();
    let vscs: Api<VolumeSnapshotContent> = Api::all(cluster.client.clone());
    // snapshot handle -> member VolumeSnapshot name (and its readiness)
    let mut by_handle = BTreeMap::new();
    for vs in &in_group {
        let name = vs.metadata.name.clone().unwrap_or_default();
        if let Some(msg) = vs.error_message() {
            return Err(NotYet::Failed(Error::SnapshotFailed {
                cluster: ctx.clone(),
                object: ns_name(ns, &name),
                message: msg.to_string(),
            }));
        }
        let Some(bound) = vs.bound_content() else {
            continue;
        };
        let handle = vscs
            .get_opt(bound)
            .await
            .map_err(|e| NotYet::Failed(Error::api(ctx, "get", "VolumeSnapshotContent", bound, e)))?
            .and_then(|c| c.snapshot_handle().map(str::to_string));
        if let Some(h) = handle {
            by_handle.insert(h, (name, vs.is_ready()));
        }
    }
    let mut members = Vec::with_capacity(pairs.len());
    for (volume_handle, snapshot_handle) in &pairs {
        let pvc = pvcs
            .iter()
            .find(|p| &p.volume_handle == volume_handle)
            .ok_or_else(|| {
                inconsistent(format!(
                    "VolumeGroupSnapshot {object} holds volume {volume_handle}, which is none of the PVCs the selector matched when the backup started (was a PVC labelled meanwhile?)"
                ))
            })?;
        match by_handle.get(snapshot_handle) {
            Some((name, true)) => members.push(Member {
                pvc: pvc.clone(),
                snapshot: name.clone(),
                handle: snapshot_handle.clone(),
            }),
            Some((name, false)) => {
                return Err(NotYet::Pending(format!(
                    "member VolumeSnapshot {name} of PVC {} is not ready",
                    pvc.name
                )));
            }
            None => {
                return Err(NotYet::Pending(format!(
                    "no member VolumeSnapshot for PVC {} (snapshot {snapshot_handle}) yet",
                    pvc.name
                )));
            }
        }
    }
    if let Some(missing) = pvcs
        .iter()
        .find(|p| !members.iter().any(|m| m.pvc.name == p.name))
    {
        return Err(inconsistent(format!(
            "PVC {} matched the selector but is not in VolumeGroupSnapshot {object} (was its label removed meanwhile?)",
            ns_name(ns, &missing.name)
        )));
    }
    Ok(members)
}

/// True if `vs` names `group` as its group and, when it has a group owner reference, that
/// reference is this group (not an earlier one of the same name).
fn is_member_of(vs: &VolumeSnapshot, group: &VolumeGroupSnapshot) -> bool {
    let named = vs
        .status
        .as_ref()
        .and_then(|s| s.volume_group_snapshot_name.as_deref())
        == group.metadata.name.as_deref();
    let owners: Vec<_> = vs
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.kind == "VolumeGroupSnapshot")
        .collect();
    named
        && (owners.is_empty()
            || owners
                .iter()
                .any(|o| Some(&o.uid) == group.metadata.uid.as_ref()))
}

/// Runs each member's pipeline, `concurrency` at a time; none starts after one failed.
async fn back_up_members(
    cluster: &Cluster,
    opts: &GroupBackupOptions,
    endpoint: Option<&MetadataEndpoint>,
    cut: &GroupCut,
    waited: f64,
    members: Vec<Member>,
    cancel: &watch::Receiver<bool>,
) -> Vec<GroupMemberResult> {
    let failed = Arc::new(AtomicBool::new(false));
    futures::stream::iter(members)
        .map(|m| {
            let failed = failed.clone();
            let cancel = cancel.clone();
            async move {
                let ns = &opts.pvc.namespace;
                if failed.load(Ordering::SeqCst) {
                    return GroupMemberResult {
                        pvc: m.pvc.name.clone(),
                        result: Err(Error::Skipped {
                            object: ns_name(ns, &m.pvc.name),
                            reason: "another member of the group failed first".into(),
                        }),
                    };
                }
                let result = back_up_member(cluster, opts, endpoint, cut, &m, cancel)
                    .await
                    .map(|mut r| {
                        // Every member waited for the same group snapshot.
                        r.times.snapshot_wait_s = waited;
                        r
                    });
                if result.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                GroupMemberResult {
                    pvc: m.pvc.name,
                    result,
                }
            }
        })
        .buffered(opts.concurrency.max(1))
        .collect()
        .await
}

/// One member: the per-PVC pipeline from the temporary PVC on, then its cleanup (the member
/// VolumeSnapshot belongs to the group and is never deleted here).
async fn back_up_member(
    cluster: &Cluster,
    opts: &GroupBackupOptions,
    endpoint: Option<&MetadataEndpoint>,
    cut: &GroupCut,
    m: &Member,
    cancel: watch::Receiver<bool>,
) -> Result<PvcBackupReport, Error> {
    let ns = &opts.pvc.namespace;
    let volume = m.pvc.repository_volume();
    let mut report = PvcBackupReport {
        pvc: ns_name(ns, &m.pvc.name),
        volume: volume.clone(),
        volume_snapshot: Some(m.snapshot.clone()),
        snapshot_handle: Some(m.handle.clone()),
        mover: None,
        deleted_snapshots: Vec::new(),
        times: StepTimes::default(),
        planned_objects: Vec::new(),
        notes: Vec::new(),
    };
    let (src_name, job_name) = temp_names(&m.pvc, opts);
    let src = source_pvc(&src_name, &m.pvc, &m.snapshot, opts);
    let ready = ReadySnapshot {
        name: &m.snapshot,
        handle: &m.handle,
        group: Some(cut),
    };
    let mut created = Created::default();
    let result = back_up_from_snapshot(
        cluster,
        &m.pvc,
        &volume,
        endpoint,
        &opts.pvc,
        &ready,
        &src,
        &job_name,
        &mut created,
        &mut report,
        cancel,
    )
    .await;
    let t = Instant::now();
    // `created.snapshot` is never set for a member: only the Job and the temporary PVC go.
    cleanup(cluster, ns, &created, true, &mut report.notes).await;
    report.times.cleanup_s = t.elapsed().as_secs_f64();
    result.map(|()| report)
}

/// After the members: retention on success; on failure the error naming the first failed
/// member, and the group deleted unless a member committed.
async fn settle(
    cluster: &Cluster,
    opts: &GroupBackupOptions,
    group_name: &str,
    outcome: &mut GroupBackupOutcome,
    cancel: &watch::Receiver<bool>,
) -> Result<(), Error> {
    let ns = &opts.pvc.namespace;
    let total = outcome.members.len();
    let committed: Vec<String> = outcome
        .members
        .iter()
        .filter(|m| m.result.is_ok())
        .map(|m| m.pvc.clone())
        .collect();
    if committed.len() == total {
        match group_retention(cluster, ns, opts, group_name).await {
            Ok(deleted) => outcome.report.deleted_groups = deleted,
            Err(e) => outcome
                .report
                .notes
                .push(format!("old group snapshots were not pruned: {e}")),
        }
        return Ok(());
    }
    let fate = if committed.is_empty() {
        delete_group(cluster, ns, group_name, &mut outcome.report).await;
        if outcome.report.group_deleted {
            "the group snapshot was deleted".to_string()
        } else {
            "the group snapshot could not be deleted (see the notes)".to_string()
        }
    } else {
        let fate = format!(
            "the group snapshot was kept: the committed backups of {} use its members as their next delta base; retention removes it after a later successful run",
            committed.join(", ")
        );
        outcome.report.notes.push(fate.clone());
        fate
    };
    if *cancel.borrow() {
        return Err(Error::Cancelled);
    }
    let failures: Vec<&GroupMemberResult> = outcome
        .members
        .iter()
        .filter(|m| matches!(&m.result, Err(e) if !matches!(e, Error::Skipped { .. })))
        .collect();
    let Some(first) = failures.first() else {
        return Err(Error::Cancelled);
    };
    let Err(e) = &first.result else {
        return Err(Error::Cancelled);
    };
    Err(Error::GroupMemberFailed(Box::new(GroupMemberFailure {
        cluster: cluster.context.clone(),
        group: ns_name(ns, group_name),
        pvc: ns_name(ns, &first.pvc),
        failed: total - committed.len(),
        total,
        message: e.to_string(),
        kind: e.kind(),
        fate,
    })))
}

/// Deletes the group this run created (its members go with it), recording the outcome.
async fn delete_group(cluster: &Cluster, ns: &str, name: &str, report: &mut GroupBackupReport) {
    let groups: Api<VolumeGroupSnapshot> = Api::namespaced(cluster.client.clone(), ns);
    match groups.delete(name, &DeleteParams::default()).await {
        Ok(_) => report.group_deleted = true,
        Err(e) if is_not_found(&e) => report.group_deleted = true,
        Err(e) => report.notes.push(format!(
            "could not delete VolumeGroupSnapshot {}: {}",
            ns_name(ns, name),
            crate::error::describe(&e)
        )),
    }
}

/// Deletes groups this tool cut for the same namespace and selector, oldest first, keeping the
/// newest `keep_snapshots` (and always `current`). Deleting a group deletes its members.
async fn group_retention(
    cluster: &Cluster,
    ns: &str,
    opts: &GroupBackupOptions,
    current: &str,
) -> Result<Vec<String>, Error> {
    let groups: Api<VolumeGroupSnapshot> = Api::namespaced(cluster.client.clone(), ns);
    let hash = groups
        .get(current)
        .await
        .map_err(|e| {
            Error::api(
                &cluster.context,
                "get",
                "VolumeGroupSnapshot",
                ns_name(ns, current),
                e,
            )
        })?
        .metadata
        .labels
        .and_then(|l| l.get(SELECTOR_HASH_LABEL).cloned())
        .unwrap_or_default();
    let selector = format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY},{ROLE_LABEL}={GROUP_ROLE},{SELECTOR_HASH_LABEL}={hash}"
    );
    // Deleting a group deletes its members.
    super::delete_oldest(
        cluster,
        &groups,
        ("VolumeGroupSnapshot", ns),
        &selector,
        GROUP_CREATED_BY,
        (opts.pvc.keep_snapshots, current),
    )
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    #[test]
    fn the_group_object_is_marked_ours_and_names_its_class() {
        let sel = label_selector("app=pg").unwrap();
        let vgs = group_snapshot_object("cbt-group-x", "db", sel, "app=pg", "abc", "csi-group");
        let json = serde_json::to_value(&vgs).unwrap();
        assert_eq!(
            json["spec"]["source"]["selector"]["matchLabels"]["app"],
            "pg"
        );
        assert_eq!(json["spec"]["volumeGroupSnapshotClassName"], "csi-group");
        assert_eq!(json["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(json["metadata"]["labels"][ROLE_LABEL], GROUP_ROLE);
        assert_eq!(json["metadata"]["labels"][SELECTOR_HASH_LABEL], "abc");
        assert_eq!(
            json["metadata"]["annotations"][OWNER_ANNOTATION],
            GROUP_CREATED_BY
        );
        assert_eq!(json["metadata"]["namespace"], "db");
    }

    #[test]
    fn membership_needs_the_group_name_and_its_uid() {
        let mut group = VolumeGroupSnapshot::new("g", VolumeGroupSnapshotSpec::default());
        group.metadata.uid = Some("u1".into());
        let mut vs = VolumeSnapshot::new("m", Default::default());
        assert!(!is_member_of(&vs, &group));
        vs.status = Some(crate::snapshot::VolumeSnapshotStatus {
            volume_group_snapshot_name: Some("g".into()),
            ..Default::default()
        });
        assert!(is_member_of(&vs, &group));
        vs.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "groupsnapshot.storage.k8s.io/v1".into(),
            kind: "VolumeGroupSnapshot".into(),
            name: "g".into(),
            uid: "u0".into(),
            ..Default::default()
        }]);
        assert!(
            !is_member_of(&vs, &group),
            "a member of an earlier group of that name"
        );
        group.metadata.uid = Some("u0".into());
        assert!(is_member_of(&vs, &group));
    }
}
