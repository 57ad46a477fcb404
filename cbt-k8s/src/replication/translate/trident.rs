//! NetApp Trident: csi-addons replication through TridentMirrorRelationships.
//!
//! Owns: the per-PVC decision (which `spec.state` the PVC's TMR must have),
//! building the exact TMR / TridentActionMirrorUpdate we create or the merge
//! patch we send, and mapping Trident's reported state to csi-addons terms.
//! Trident has no consistency groups: one TMR per PVC (its `volumeMappings`
//! holds exactly one entry, named after the PVC), and a group is N TMRs moved
//! together. A group reports `Completed` only when every member is done, and
//! names the failing members in `Degraded`.
//!
//! Mapping (the tables in `MAPPING.md` are rendered from [`step`] and
//! [`member_report`]):
//! - primary: `promoted` (with `promotedSnapshotHandle` from the PVC
//!   annotation `replication.cbt.io/promoted-snapshot-handle` for a planned
//!   failover);
//! - secondary: a new TMR is `established` with the remote volume handle; a
//!   TMR that was `promoted` becomes `reestablished` (a SnapMirror resync that
//!   overwrites the local volume with the peer's data once the peer is the
//!   source); `autoResync` also reestablishes a `failed` destination;
//! - resync: like secondary, plus one TridentActionMirrorUpdate (a transfer
//!   now) per generation for a healthy `established` or `reestablished` destination;
//! - deleting the VolumeReplication deletes its TMRs. **Deleting a TMR makes
//!   Trident promote the volume** (it breaks and releases the SnapMirror
//!   relationship), so on a secondary site the volume becomes writable and
//!   stops receiving data. Removing a PVC from a group does the same to it.
//!
//! The remote volume handle (`<svm>:<volume>`, the peer TMR's
//! `status.conditions[].localVolumeHandle`) comes from, in order: the VR's
//! `spec.replicationHandle`, the PVC annotation
//! `replication.cbt.io/remote-volume-handle`, the class parameter
//! `remoteVolumeHandle` (single-volume classes only). Trident fixes it once
//! set. Class parameters `replicationPolicy` and `replicationSchedule` pass
//! through.
//!
//! Every TMR we make carries our owner and class annotations and the spec we
//! last wrote (`replication.cbt.io/last-applied`): a TMR that is not ours, or
//! ours but edited by hand, is reported and never overwritten.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde_json::json;

use super::conditions::Report;
use super::{
    Backend, BackendObject, BackendWrite, CLASS_ANNOTATION, ClassView, Event, EventType,
    MANAGED_BY, MANAGED_BY_LABEL, OWNER_ANNOTATION, ObjectKey, PVC_PROMOTED_SNAPSHOT_ANNOTATION,
    PVC_REMOTE_HANDLE_ANNOTATION, Plan, Rejection, Request, SubjectKind, TridentObserved,
    annotations, finish, members, pvc, reject,
};
use crate::replication::types::{
    MirrorState, MirrorStatusState, ReplicationState, TridentActionMirrorUpdate,
    TridentActionMirrorUpdateSpec, TridentMirrorRelationship, TridentMirrorRelationshipSpec,
    TridentVolumeMapping, tamu_state,
};

/// Trident's CSI driver name.
pub const DRIVER: &str = "csi.trident.netapp.io";
/// Annotation on our TMRs: JSON of the spec we last wrote (detects hand edits).
pub const LAST_APPLIED_ANNOTATION: &str = "replication.cbt.io/last-applied";
/// PVC annotation Trident needs on a destination PVC: the name of its TMR.
pub const PVC_MIRROR_ANNOTATION: &str = "trident.netapp.io/mirrorRelationship";
const API_VERSION: &str = "trident.netapp.io/v1";

/// Class parameters read for Trident.
pub mod params {
    /// Remote volume handle `<svm>:<volume>` (single-volume classes only).
    pub const REMOTE_VOLUME_HANDLE: &str = "remoteVolumeHandle";
    /// ONTAP SnapMirror policy.
    pub const REPLICATION_POLICY: &str = "replicationPolicy";
    /// ONTAP job schedule.
    pub const REPLICATION_SCHEDULE: &str = "replicationSchedule";
}

/// One member's TMR, reduced to what decisions and the tables read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TmrView {
    /// `spec.state`; None when there is no TMR.
    pub spec: Option<MirrorState>,
    /// `status.conditions[].state` for the PVC.
    pub status: MirrorStatusState,
    /// True when that condition describes an older generation than the TMR's.
    pub stale: bool,
}

/// The one-shot mirror update of a resync, as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TamuView {
    /// Not created (for this generation).
    Absent,
    /// Created, not finished.
    InProgress,
    /// Finished; when.
    Succeeded(Option<Time>),
    /// Failed; Trident's message.
    Failed(String),
}

/// What one member's TMR needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Leave it.
    Keep,
    /// Create it, or patch it, with this state.
    Set(MirrorState),
    /// Create a TridentActionMirrorUpdate (transfer now).
    MirrorUpdate,
}

/// The decision for one member: desired csi-addons state, `autoResync`, observed TMR.
pub fn step(
    desired: ReplicationState,
    auto_resync: bool,
    view: &TmrView,
    update_exists: bool,
) -> Step {
    use MirrorState as M;
    use MirrorStatusState as S;
    let healthy = !view.stale && matches!(view.status, S::Established | S::Reestablished);
    let failed = !view.stale && view.status == S::Failed;
    match (desired, view.spec) {
        (ReplicationState::Primary, Some(M::Promoted)) => Step::Keep,
        (ReplicationState::Primary, _) => Step::Set(M::Promoted),
        (_, None | Some(M::Unset)) => Step::Set(M::Established),
        // The volume was a source (or failed over to): only a resync makes it a destination.
        (_, Some(M::Promoted)) => Step::Set(M::Reestablished),
        (ReplicationState::Secondary, Some(M::Established)) if auto_resync && failed => {
            Step::Set(M::Reestablished)
        }
        (ReplicationState::Resync, Some(M::Established)) if failed => Step::Set(M::Reestablished),
        (ReplicationState::Resync, Some(M::Established | M::Reestablished))
            if healthy && !update_exists =>
        {
            Step::MirrorUpdate
        }
        (_, Some(M::Established | M::Reestablished)) => Step::Keep,
    }
}

/// How far one member got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemberKind {
    /// Promoted, as asked.
    PrimaryOk,
    /// Destination, in sync.
    SecondaryOk,
    /// Destination, transfer running.
    Resyncing,
    /// Trident is working on it.
    InProgress,
    /// Trident failed.
    Failed,
    /// Trident says the spec can never work.
    Invalid,
}

/// One member's state with Trident's explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberReport {
    /// Classification.
    pub kind: MemberKind,
    /// Explanation (Trident's message where it gave one).
    pub detail: String,
    /// Completion of the last mirror update, if any.
    pub last_sync: Option<Time>,
}

fn member(kind: MemberKind, detail: impl Into<String>) -> MemberReport {
    MemberReport {
        kind,
        detail: detail.into(),
        last_sync: None,
    }
}

/// What Trident's report for one member means, given what was asked. Total over every state.
pub fn member_report(
    desired: ReplicationState,
    view: &TmrView,
    update: &TamuView,
    trident_message: &str,
) -> MemberReport {
    use MirrorState as M;
    use MirrorStatusState as S;
    let with_msg = |what: String| {
        if trident_message.is_empty() {
            what
        } else {
            format!("{what}: {trident_message}")
        }
    };
    let Some(spec) = view.spec else {
        return member(
            MemberKind::InProgress,
            "TridentMirrorRelationship not created yet",
        );
    };
    if view.stale {
        return member(
            MemberKind::InProgress,
            format!(
                "Trident has not acted on spec.state {:?} yet",
                spec.as_str()
            ),
        );
    }
    let destination_spec = matches!(spec, M::Established | M::Reestablished);
    match (&view.status, desired) {
        (S::Failed, ReplicationState::Secondary) if spec == M::Established => member(
            MemberKind::Failed,
            format!(
                "{}; autoResync: true or replicationState: resync reestablishes it (a resync that overwrites the local volume)",
                with_msg("Trident reports failed".into())
            ),
        ),
        (S::Failed, _) => member(
            MemberKind::Failed,
            with_msg("Trident reports failed".into()),
        ),
        (S::Invalid, _) => member(
            MemberKind::Invalid,
            with_msg("Trident reports the relationship invalid".into()),
        ),
        (S::Other(s), _) => member(
            MemberKind::Failed,
            with_msg(format!("Trident reports unrecognised state {s:?}")),
        ),
        (S::Promoted, ReplicationState::Primary) if spec == M::Promoted => {
            member(MemberKind::PrimaryOk, "promoted")
        }
        (
            S::Established | S::Reestablished,
            ReplicationState::Secondary | ReplicationState::Resync,
        ) if destination_spec => {
            if desired == ReplicationState::Resync {
                match update {
                    TamuView::Absent => {
                        member(MemberKind::InProgress, "mirror update not requested yet")
                    }
                    TamuView::InProgress => member(MemberKind::Resyncing, "mirror update running"),
                    TamuView::Succeeded(t) => MemberReport {
                        kind: MemberKind::SecondaryOk,
                        detail: "mirror update done".into(),
                        last_sync: t.clone(),
                    },
                    TamuView::Failed(m) => {
                        member(MemberKind::Failed, format!("mirror update failed: {m}"))
                    }
                }
            } else {
                member(MemberKind::SecondaryOk, view.status.as_str())
            }
        }
        (
            S::Establishing | S::Reestablishing,
            ReplicationState::Secondary | ReplicationState::Resync,
        ) if destination_spec => member(
            MemberKind::Resyncing,
            format!("SnapMirror transfer running ({})", view.status.as_str()),
        ),
        (S::Empty, _) => member(
            MemberKind::InProgress,
            "Trident has not reported a state yet",
        ),
        (status, _) => member(
            MemberKind::InProgress,
            format!(
                "Trident reports {:?}, spec.state is {:?}",
                status.as_str(),
                spec.as_str()
            ),
        ),
    }
}

/// The csi-addons report of a group of members (a VR is a group of one): all or nothing.
pub fn aggregate(desired: ReplicationState, members: &[(String, MemberReport)]) -> Report {
    let list = |kind: MemberKind| -> Option<String> {
        let hits: Vec<String> = members
            .iter()
            .filter(|(_, r)| r.kind == kind)
            .map(|(name, r)| format!("PVC {name}: {}", r.detail))
            .collect();
        (!hits.is_empty()).then(|| hits.join("; "))
    };
    if let Some(detail) = list(MemberKind::Invalid) {
        return Report::invalid(desired, &detail);
    }
    if let Some(detail) = list(MemberKind::Failed) {
        return Report::failed(desired, &detail);
    }
    if let Some(detail) = list(MemberKind::InProgress) {
        return Report::in_progress(desired, &detail);
    }
    // The group's last sync is its oldest member's.
    let last_sync = members
        .iter()
        .map(|(_, r)| r.last_sync.clone())
        .min()
        .flatten();
    let n = members.len();
    let report = if desired == ReplicationState::Primary {
        Report::primary(None, &format!("{n} TridentMirrorRelationship(s) promoted"))
    } else if let Some(detail) = list(MemberKind::Resyncing) {
        Report::secondary_resyncing(&detail)
    } else {
        Report::secondary(&format!("{n} TridentMirrorRelationship(s) established"))
    };
    report.with_last_sync(last_sync)
}

/// Plans a subject whose class is served by Trident.
///
/// # Guarantees
/// See [`super::Plan`]: a rejection writes nothing; from the same observation
/// the plan is empty once applied.
pub fn plan(req: &Request, class: &ClassView, obs: &TridentObserved) -> Plan {
    let backend = Some(Backend::Trident);
    let s = &req.subject;
    if let Some(rejected) = super::reject_unless_external_group(req, class, Backend::Trident) {
        return rejected;
    }
    let owner = s.owner_key();
    let ours = |meta: &ObjectMeta| {
        meta.namespace.as_deref() == Some(s.namespace.as_str())
            && annotations(meta).get(OWNER_ANNOTATION) == Some(&owner)
    };
    if s.deleting {
        return deletion_plan(req, obs, &ours);
    }
    let names = match members(req, Backend::Trident) {
        Ok(m) => m,
        Err(r) => return reject(req, backend, r),
    };
    if let Some(h) = class.param(params::REMOTE_VOLUME_HANDLE) {
        if names.len() > 1 {
            return reject(
                req,
                backend,
                Rejection::InvalidParameter {
                    class: class.name.clone(),
                    key: params::REMOTE_VOLUME_HANDLE.into(),
                    value: h.into(),
                    expected: format!(
                        "no value for a group of {} PVCs (one handle cannot serve several volumes); annotate each PVC with {PVC_REMOTE_HANDLE_ANNOTATION}",
                        names.len()
                    ),
                },
            );
        }
        if !is_volume_handle(h) {
            return reject(
                req,
                backend,
                Rejection::InvalidParameter {
                    class: class.name.clone(),
                    key: params::REMOTE_VOLUME_HANDLE.into(),
                    value: h.into(),
                    expected: "<svm>:<volume> (the peer TMR's status localVolumeHandle)".into(),
                },
            );
        }
    }
    let mut writes = Vec::new();
    let mut events = Vec::new();
    let mut reports = Vec::new();
    for name in &names {
        match plan_member(req, class, name, obs) {
            Ok((w, e, r)) => {
                writes.extend(w);
                events.extend(e);
                reports.push((name.clone(), r));
            }
            // All or nothing: one bad member stops every write of the group.
            Err(r) => return reject(req, backend, r),
        }
    }
    for tmr in obs.relationships.iter().filter(|t| ours(&t.metadata)) {
        let name = tmr.metadata.name.clone().unwrap_or_default();
        if !names.contains(&name) && tmr.metadata.deletion_timestamp.is_none() {
            events.push(delete_event(&name));
            writes.push(BackendWrite::Delete {
                target: tmr_key(&s.namespace, &name),
            });
        }
    }
    let report = aggregate(s.desired, &reports);
    finish(req, backend, writes, events, &report, Some(&names))
}

fn deletion_plan(req: &Request, obs: &TridentObserved, ours: &dyn Fn(&ObjectMeta) -> bool) -> Plan {
    let ns = &req.subject.namespace;
    let mut writes = Vec::new();
    let mut events = Vec::new();
    let mut left = 0;
    for tmr in obs.relationships.iter().filter(|t| ours(&t.metadata)) {
        left += 1;
        if tmr.metadata.deletion_timestamp.is_none() {
            let name = tmr.metadata.name.clone().unwrap_or_default();
            events.push(delete_event(&name));
            writes.push(BackendWrite::Delete {
                target: tmr_key(ns, &name),
            });
        }
    }
    for u in obs.updates.iter().filter(|u| ours(&u.metadata)) {
        left += 1;
        if u.metadata.deletion_timestamp.is_none() {
            writes.push(BackendWrite::Delete {
                target: ObjectKey {
                    api_version: API_VERSION.into(),
                    kind: "TridentActionMirrorUpdate".into(),
                    namespace: Some(ns.clone()),
                    name: u.metadata.name.clone().unwrap_or_default(),
                },
            });
        }
    }
    Plan {
        backend: Some(Backend::Trident),
        writes,
        events,
        deletion_complete: left == 0,
        ..Plan::default()
    }
}

fn delete_event(name: &str) -> Event {
    Event {
        type_: EventType::Warning,
        reason: "DeletingMirrorRelationship".into(),
        message: format!(
            "deleting TridentMirrorRelationship {name}: Trident promotes volume {name} (breaks and releases the SnapMirror relationship); it stops receiving data"
        ),
    }
}

fn tmr_key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        api_version: API_VERSION.into(),
        kind: "TridentMirrorRelationship".into(),
        namespace: Some(namespace.to_string()),
        name: name.to_string(),
    }
}

fn is_volume_handle(h: &str) -> bool {
    h.split_once(':')
        .is_some_and(|(svm, vol)| !svm.is_empty() && !vol.is_empty() && !vol.contains(':'))
}

/// The summary of the TMR for PVC `pvc`: its view and Trident's message.
pub fn view_of(tmr: Option<&TridentMirrorRelationship>, pvc: &str) -> (TmrView, String) {
    let Some(tmr) = tmr else {
        return (
            TmrView {
                spec: None,
                status: MirrorStatusState::Empty,
                stale: false,
            },
            String::new(),
        );
    };
    let cond = tmr.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.local_pvc_name == pvc)
            .or_else(|| s.conditions.first())
    });
    let generation = tmr.metadata.generation.unwrap_or(0);
    match cond {
        Some(c) => (
            TmrView {
                spec: Some(tmr.spec.state),
                status: c.state.clone(),
                stale: c.observed_generation < generation,
            },
            c.message.clone(),
        ),
        None => (
            TmrView {
                spec: Some(tmr.spec.state),
                status: MirrorStatusState::Empty,
                stale: false,
            },
            String::new(),
        ),
    }
}

type MemberPlan = (Vec<BackendWrite>, Vec<Event>, MemberReport);

fn plan_member(
    req: &Request,
    class: &ClassView,
    name: &str,
    obs: &TridentObserved,
) -> Result<MemberPlan, Rejection> {
    let s = &req.subject;
    let tmr = obs.relationships.iter().find(|t| {
        t.metadata.name.as_deref() == Some(name)
            && t.metadata.namespace.as_deref() == Some(s.namespace.as_str())
    });
    if let Some(tmr) = tmr {
        check_ours(req, class, tmr)?;
    }
    let pvc_exists = pvc(req, name).is_some();
    if !pvc_exists && s.desired == ReplicationState::Primary {
        return Err(Rejection::PvcMissing {
            pvc: name.to_string(),
            hint: "a primary replicates an existing volume: create the PVC or fix spec.dataSource"
                .into(),
        });
    }
    let (view, message) = view_of(tmr, name);
    let update_name = format!("{name}-resync-g{}", s.generation);
    let update = obs.updates.iter().find(|u| {
        u.metadata.name.as_deref() == Some(update_name.as_str())
            && u.metadata.namespace.as_deref() == Some(s.namespace.as_str())
    });
    if tmr.is_some_and(|t| t.metadata.deletion_timestamp.is_some()) {
        return Ok((
            Vec::new(),
            Vec::new(),
            member(
                MemberKind::InProgress,
                "TridentMirrorRelationship is being deleted; it is recreated once gone",
            ),
        ));
    }
    match step(s.desired, s.auto_resync, &view, update.is_some()) {
        Step::Keep => {}
        Step::Set(state) => {
            let want = want_spec(req, class, name, state, tmr.map(|t| &t.spec))?;
            if tmr.map(|t| &t.spec) != Some(&want) {
                return Ok(write_tmr(req, class, name, tmr, want));
            }
        }
        Step::MirrorUpdate => {
            let Some(tmr) = tmr else {
                return Ok((
                    Vec::new(),
                    Vec::new(),
                    member(MemberKind::InProgress, "no TMR"),
                ));
            };
            return Ok(mirror_update(req, name, &update_name, tmr));
        }
    }
    let update_view = match update.and_then(|u| u.status.as_ref()) {
        None if update.is_none() => TamuView::Absent,
        None => TamuView::InProgress,
        Some(st) => match st.state.as_str() {
            tamu_state::SUCCEEDED => TamuView::Succeeded(st.completion_time.clone()),
            tamu_state::FAILED => TamuView::Failed(st.message.clone()),
            _ => TamuView::InProgress,
        },
    };
    if !pvc_exists {
        // Trident makes the destination volume when the PVC is created after its TMR.
        return Ok((
            Vec::new(),
            Vec::new(),
            member(
                MemberKind::InProgress,
                format!(
                    "PVC {name} does not exist yet: create it with annotation {PVC_MIRROR_ANNOTATION}: {name} so Trident makes it the destination volume"
                ),
            ),
        ));
    }
    Ok((
        Vec::new(),
        Vec::new(),
        member_report(s.desired, &view, &update_view, &message),
    ))
}

/// Refuses a TMR that is not ours, belongs to another subject, was bound to
/// another class, or was edited since we wrote it.
fn check_ours(
    req: &Request,
    class: &ClassView,
    tmr: &TridentMirrorRelationship,
) -> Result<(), Rejection> {
    let s = &req.subject;
    let object = format!(
        "TridentMirrorRelationship {}/{}",
        s.namespace,
        tmr.metadata.name.as_deref().unwrap_or_default()
    );
    let ann = annotations(&tmr.metadata);
    match ann.get(OWNER_ANNOTATION) {
        None => return Err(Rejection::NotOurs { object }),
        Some(o) if *o != s.owner_key() => {
            return Err(Rejection::ClaimedElsewhere {
                object,
                owner: o.clone(),
            });
        }
        Some(_) => {}
    }
    if let Some(bound) = ann.get(CLASS_ANNOTATION)
        && *bound != class.name
    {
        return Err(Rejection::ImmutableFieldChanged {
            object,
            field: match s.kind {
                SubjectKind::Volume => "spec.volumeReplicationClass".into(),
                SubjectKind::Group => "spec.volumeGroupReplicationClassName".into(),
            },
            was: bound.clone(),
            now: class.name.clone(),
        });
    }
    let last: Option<TridentMirrorRelationshipSpec> = ann
        .get(LAST_APPLIED_ANNOTATION)
        .and_then(|raw| serde_json::from_str(raw).ok());
    match last {
        None => Err(Rejection::ChangedByHand {
            object,
            detail: format!("annotation {LAST_APPLIED_ANNOTATION} is missing or unreadable"),
        }),
        Some(last) if last != tmr.spec => Err(Rejection::ChangedByHand {
            object,
            detail: describe_diff(&last, &tmr.spec),
        }),
        Some(_) => Ok(()),
    }
}

fn describe_diff(
    last: &TridentMirrorRelationshipSpec,
    now: &TridentMirrorRelationshipSpec,
) -> String {
    let a = serde_json::to_value(last).unwrap_or_default();
    let b = serde_json::to_value(now).unwrap_or_default();
    let mut diffs = Vec::new();
    for key in [
        "state",
        "replicationPolicy",
        "replicationSchedule",
        "volumeMappings",
    ] {
        if a.get(key) != b.get(key) {
            diffs.push(format!(
                "spec.{key} is {} but cbt-replicator wrote {}",
                b.get(key).cloned().unwrap_or_default(),
                a.get(key).cloned().unwrap_or_default()
            ));
        }
    }
    diffs.join("; ")
}

/// The spec the member's TMR must have in `state`.
fn want_spec(
    req: &Request,
    class: &ClassView,
    name: &str,
    state: MirrorState,
    existing: Option<&TridentMirrorRelationshipSpec>,
) -> Result<TridentMirrorRelationshipSpec, Rejection> {
    let s = &req.subject;
    let object = format!("TridentMirrorRelationship {}/{name}", s.namespace);
    let existing_mapping = existing.and_then(|e| e.volume_mappings.first());
    let existing_remote = existing_mapping
        .map(|m| m.remote_volume_handle.clone())
        .filter(|h| !h.is_empty());
    let annotations = pvc(req, name).map(|p| &p.annotations);
    let given = remote_handle(req, class, annotations)?;
    let remote = match (existing_remote, given) {
        (Some(was), Some((now, origin))) if was != now => {
            return Err(Rejection::ImmutableFieldChanged {
                object,
                field: origin,
                was,
                now,
            });
        }
        (Some(was), _) => was,
        (None, Some((now, _))) => now,
        (None, None) => String::new(),
    };
    if matches!(state, MirrorState::Established | MirrorState::Reestablished) && remote.is_empty() {
        return Err(Rejection::MissingParameter {
            class: class.name.clone(),
            key: params::REMOTE_VOLUME_HANDLE.into(),
            why: format!(
                "a Trident destination needs the remote volume handle <svm>:<volume> of PVC {name} (the peer TMR's status localVolumeHandle): set spec.replicationHandle, the PVC annotation {PVC_REMOTE_HANDLE_ANNOTATION}, or this class parameter"
            ),
        });
    }
    let promoted_snapshot = match state {
        MirrorState::Promoted => match existing {
            Some(e) if e.state == MirrorState::Promoted => existing_mapping
                .map(|m| m.promoted_snapshot_handle.clone())
                .unwrap_or_default(),
            _ => annotations
                .and_then(|a| a.get(PVC_PROMOTED_SNAPSHOT_ANNOTATION))
                .cloned()
                .unwrap_or_default(),
        },
        _ => String::new(),
    };
    Ok(TridentMirrorRelationshipSpec {
        state,
        replication_policy: class
            .param(params::REPLICATION_POLICY)
            .unwrap_or_default()
            .to_string(),
        replication_schedule: class
            .param(params::REPLICATION_SCHEDULE)
            .unwrap_or_default()
            .to_string(),
        volume_mappings: vec![TridentVolumeMapping {
            remote_volume_handle: remote,
            local_pvc_name: name.to_string(),
            promoted_snapshot_handle: promoted_snapshot,
        }],
    })
}

/// The remote handle the inputs give, with where it came from.
fn remote_handle(
    req: &Request,
    class: &ClassView,
    pvc_annotations: Option<&BTreeMap<String, String>>,
) -> Result<Option<(String, String)>, Rejection> {
    let s = &req.subject;
    let candidates = [
        (
            (s.kind == SubjectKind::Volume && !s.replication_handle.is_empty())
                .then(|| s.replication_handle.clone()),
            "spec.replicationHandle".to_string(),
        ),
        (
            pvc_annotations
                .and_then(|a| a.get(PVC_REMOTE_HANDLE_ANNOTATION))
                .filter(|h| !h.is_empty())
                .cloned(),
            format!("PVC annotation {PVC_REMOTE_HANDLE_ANNOTATION}"),
        ),
        (
            class
                .param(params::REMOTE_VOLUME_HANDLE)
                .map(str::to_string),
            format!("class parameter {}", params::REMOTE_VOLUME_HANDLE),
        ),
    ];
    for (value, origin) in candidates {
        if let Some(v) = value {
            if !is_volume_handle(&v) {
                return Err(Rejection::InvalidRemoteHandle { origin, value: v });
            }
            return Ok(Some((v, origin)));
        }
    }
    Ok(None)
}

fn our_annotations(req: &Request, class: &ClassView) -> BTreeMap<String, String> {
    BTreeMap::from([
        (OWNER_ANNOTATION.to_string(), req.subject.owner_key()),
        (CLASS_ANNOTATION.to_string(), class.name.clone()),
    ])
}

fn write_tmr(
    req: &Request,
    class: &ClassView,
    name: &str,
    existing: Option<&TridentMirrorRelationship>,
    spec: TridentMirrorRelationshipSpec,
) -> MemberPlan {
    let s = &req.subject;
    let last_applied = serde_json::to_string(&spec).unwrap_or_default();
    let state = spec.state.as_str();
    let (write, event) = match existing {
        None => {
            let mut ann = our_annotations(req, class);
            ann.insert(LAST_APPLIED_ANNOTATION.into(), last_applied);
            let tmr = TridentMirrorRelationship {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(s.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        MANAGED_BY_LABEL.to_string(),
                        MANAGED_BY.to_string(),
                    )])),
                    annotations: Some(ann),
                    owner_references: s.owner_reference().map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                spec,
                status: None,
            };
            (
                BackendWrite::Create(BackendObject::MirrorRelationship(Box::new(tmr))),
                Event {
                    type_: EventType::Normal,
                    reason: "CreatedMirrorRelationship".into(),
                    message: format!(
                        "creating TridentMirrorRelationship {name} with state {state:?}"
                    ),
                },
            )
        }
        Some(tmr) => {
            let mut metadata = json!({"annotations": {LAST_APPLIED_ANNOTATION: last_applied}});
            if let Some(rv) = &tmr.metadata.resource_version {
                metadata["resourceVersion"] = json!(rv);
            }
            let overwrite = if spec.state == MirrorState::Reestablished {
                "; this resyncs the volume from the peer and overwrites its local data"
            } else {
                ""
            };
            (
                BackendWrite::Patch {
                    target: tmr_key(&s.namespace, name),
                    patch: json!({"metadata": metadata, "spec": spec}),
                },
                Event {
                    type_: EventType::Normal,
                    reason: "UpdatedMirrorRelationship".into(),
                    message: format!(
                        "setting TridentMirrorRelationship {name} state {:?} -> {state:?}{overwrite}",
                        tmr.spec.state.as_str()
                    ),
                },
            )
        }
    };
    (
        vec![write],
        vec![event],
        member(
            MemberKind::InProgress,
            format!("TridentMirrorRelationship {name} set to {state:?}"),
        ),
    )
}

fn mirror_update(
    req: &Request,
    name: &str,
    update_name: &str,
    tmr: &TridentMirrorRelationship,
) -> MemberPlan {
    let s = &req.subject;
    // Owned by the TMR so Kubernetes removes it with the TMR.
    let owner = tmr.metadata.uid.clone().map(|uid| {
        vec![OwnerReference {
            api_version: API_VERSION.into(),
            kind: "TridentMirrorRelationship".into(),
            name: name.to_string(),
            uid,
            controller: Some(false),
            block_owner_deletion: None,
        }]
    });
    let update = TridentActionMirrorUpdate {
        metadata: ObjectMeta {
            name: Some(update_name.to_string()),
            namespace: Some(s.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            annotations: Some(BTreeMap::from([(
                OWNER_ANNOTATION.to_string(),
                s.owner_key(),
            )])),
            owner_references: owner,
            ..ObjectMeta::default()
        },
        spec: TridentActionMirrorUpdateSpec {
            trident_mirror_relationship_name: name.to_string(),
            snapshot_handle: String::new(),
        },
        status: None,
    };
    (
        vec![BackendWrite::Create(BackendObject::MirrorUpdate(Box::new(
            update,
        )))],
        vec![Event {
            type_: EventType::Normal,
            reason: "RequestedMirrorUpdate".into(),
            message: format!(
                "requesting a SnapMirror transfer for TridentMirrorRelationship {name} ({update_name})"
            ),
        }],
        member(MemberKind::InProgress, "mirror update requested"),
    )
}
