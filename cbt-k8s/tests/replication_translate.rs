//! Translation behaviour: examples for each backend and each kind of bad input,
//! and properties run against simulated backends that apply our plans
//! (a Trident that settles relationships, a Dell sidecar that runs verbs).

use std::collections::BTreeMap;

use cbt_k8s::replication::translate::conditions::{self, ReportKind, reasons, types as ctypes};
use cbt_k8s::replication::translate::dell::{self, LEDGER_ANNOTATION, Ledger};
use cbt_k8s::replication::translate::trident::{self, LAST_APPLIED_ANNOTATION};
use cbt_k8s::replication::translate::{
    CLASS_ANNOTATION, OWNER_ANNOTATION, PVC_PROMOTED_SNAPSHOT_ANNOTATION,
    PVC_REMOTE_HANDLE_ANNOTATION,
};
use cbt_k8s::replication::types::*;
use cbt_k8s::replication::*;
use k8s_openapi::api::core::v1::TypedLocalObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use proptest::prelude::*;
use serde_json::{Value, json};

const NS: &str = "app";
const TRIDENT: &str = "csi.trident.netapp.io";
const DELL: &str = "csi-powerstore.dellemc.com";

fn at(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_767_225_600 + secs).expect("time"))
}

fn vr(pvc: &str, state: ReplicationState, auto: bool, handle: &str) -> VolumeReplication {
    let mut o = VolumeReplication::new(
        "vr-db",
        VolumeReplicationSpec {
            volume_replication_class: "vrc".into(),
            replication_state: state,
            data_source: TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".into(),
                name: pvc.into(),
            },
            auto_resync: auto,
            replication_handle: handle.into(),
        },
    );
    o.metadata.namespace = Some(NS.into());
    o.metadata.uid = Some("uid-vr".into());
    o.metadata.generation = Some(1);
    o
}

fn vgr(state: ReplicationState, auto: bool, external: bool) -> VolumeGroupReplication {
    let mut o = VolumeGroupReplication::new(
        "vgr-app",
        VolumeGroupReplicationSpec {
            volume_group_replication_class_name: "vgrc".into(),
            volume_replication_class_name: String::new(),
            volume_replication_name: None,
            volume_group_replication_content_name: None,
            source: VolumeGroupReplicationSource {
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".into(), "shop".into())])),
                    match_expressions: None,
                },
            },
            replication_state: state,
            auto_resync: auto,
            external,
        },
    );
    o.metadata.namespace = Some(NS.into());
    o.metadata.uid = Some("uid-vgr".into());
    o.metadata.generation = Some(1);
    o
}

fn class(name: &str, provisioner: &str, params: &[(&str, &str)]) -> ClassView {
    ClassView {
        name: name.into(),
        provisioner: provisioner.into(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn pvc(name: &str, driver: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PvcInfo {
    PvcInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        driver: Some(driver.into()),
        finalizers: Vec::new(),
    }
}

fn req(subject: Subject, class: ClassView, pvcs: Vec<PvcInfo>) -> Request {
    Request {
        subject,
        class: Some(class),
        pvcs,
        now: at(0),
    }
}

fn vol(vr: &VolumeReplication) -> Subject {
    Subject::from_volume(vr).expect("subject")
}

fn grp(vgr: &VolumeGroupReplication) -> Subject {
    Subject::from_group(vgr).expect("subject")
}

fn cond<'a>(
    plan: &'a Plan,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    plan.status
        .as_ref()?
        .replication()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Applies a status to the subject (what the controller's status write does).
fn with_status(mut r: Request, plan: &Plan) -> Request {
    if let Some(s) = &plan.status {
        r.subject.status = s.replication().clone();
        if let SubjectStatus::Group(g) = s {
            r.subject.group_pvcs = g.persistent_volume_claims_ref_list.clone();
        }
    }
    r
}

// ---------------------------------------------------------------------------
// Simulated API server: merge patches, resourceVersion, generation
// ---------------------------------------------------------------------------

fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// Applies a merge patch like the API server: refuses a stale resourceVersion,
/// bumps generation when spec changes. Returns false on conflict.
fn patch_object<T: serde::Serialize + serde::de::DeserializeOwned>(
    obj: &mut T,
    patch: &Value,
) -> bool {
    let mut v = serde_json::to_value(&*obj).expect("to json");
    let rv = v["metadata"]["resourceVersion"].clone();
    if let Some(want) = patch["metadata"].get("resourceVersion")
        && *want != rv
    {
        return false;
    }
    let before_spec = v["spec"].clone();
    merge(&mut v, patch);
    let n: u64 = rv.as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
    v["metadata"]["resourceVersion"] = json!((n + 1).to_string());
    if v["spec"] != before_spec {
        let g = v["metadata"]["generation"].as_i64().unwrap_or(1);
        v["metadata"]["generation"] = json!(g + 1);
    }
    *obj = serde_json::from_value(v).expect("from json");
    true
}

fn apply_trident(obs: &mut TridentObserved, writes: &[BackendWrite]) {
    for w in writes {
        match w {
            BackendWrite::Create(BackendObject::MirrorRelationship(t)) => {
                let mut t = t.clone();
                t.metadata.resource_version = Some("1".into());
                t.metadata.generation = Some(1);
                t.metadata.uid = Some(format!(
                    "uid-{}",
                    t.metadata.name.clone().unwrap_or_default()
                ));
                assert!(
                    !obs.relationships
                        .iter()
                        .any(|o| o.metadata.name == t.metadata.name),
                    "create of an existing TMR"
                );
                obs.relationships.push(*t);
            }
            BackendWrite::Create(BackendObject::MirrorUpdate(u)) => {
                assert!(
                    !obs.updates
                        .iter()
                        .any(|o| o.metadata.name == u.metadata.name),
                    "create of an existing TAMU"
                );
                obs.updates.push((**u).clone());
            }
            BackendWrite::Patch { target, patch } => {
                let t = obs
                    .relationships
                    .iter_mut()
                    .find(|o| o.metadata.name.as_deref() == Some(target.name.as_str()))
                    .expect("patch target");
                assert!(patch_object(t, patch), "stale patch");
            }
            BackendWrite::Delete { target } => {
                obs.relationships
                    .retain(|o| o.metadata.name.as_deref() != Some(target.name.as_str()));
                obs.updates
                    .retain(|o| o.metadata.name.as_deref() != Some(target.name.as_str()));
            }
        }
    }
}

/// Trident does its work: every TMR reaches its spec state, every update succeeds.
fn settle_trident(obs: &mut TridentObserved, t: &Time) {
    for tmr in &mut obs.relationships {
        let state = match tmr.spec.state {
            MirrorState::Unset => MirrorStatusState::Empty,
            MirrorState::Promoted => MirrorStatusState::Promoted,
            MirrorState::Established => MirrorStatusState::Established,
            MirrorState::Reestablished => MirrorStatusState::Reestablished,
        };
        let pvc = tmr.spec.volume_mappings[0].local_pvc_name.clone();
        tmr.status = Some(TridentMirrorRelationshipStatus {
            conditions: vec![TridentMirrorCondition {
                state,
                observed_generation: tmr.metadata.generation.unwrap_or(1),
                local_pvc_name: pvc.clone(),
                local_volume_handle: format!("svm1:{pvc}"),
                ..Default::default()
            }],
        });
    }
    for u in &mut obs.updates {
        u.status = Some(TridentActionMirrorUpdateStatus {
            state: tamu_state::SUCCEEDED.into(),
            completion_time: Some(t.clone()),
            ..Default::default()
        });
    }
}

// ---------------------------------------------------------------------------
// Trident examples
// ---------------------------------------------------------------------------

fn trident_class() -> ClassView {
    class(
        "vrc",
        TRIDENT,
        &[("replicationPolicy", "MirrorAllSnapshots")],
    )
}

#[test]
fn trident_primary_creates_a_promoted_tmr_then_reports_primary() {
    let r = req(
        vol(&vr("db", ReplicationState::Primary, false, "")),
        trident_class(),
        vec![pvc("db", TRIDENT, &[], &[])],
    );
    let mut obs = TridentObserved::default();
    let p = plan(&r, &Observed::Trident(obs.clone())).expect("plan");
    assert_eq!(p.backend, Some(Backend::Trident));
    let [BackendWrite::Create(BackendObject::MirrorRelationship(tmr))] = p.writes.as_slice() else {
        panic!("expected one create: {:?}", p.writes);
    };
    assert_eq!(tmr.metadata.name.as_deref(), Some("db"));
    assert_eq!(tmr.spec.state, MirrorState::Promoted);
    assert_eq!(tmr.spec.replication_policy, "MirrorAllSnapshots");
    assert_eq!(tmr.spec.volume_mappings.len(), 1);
    let ann = tmr.metadata.annotations.clone().expect("annotations");
    assert_eq!(ann[OWNER_ANNOTATION], "VolumeReplication/app/vr-db");
    assert_eq!(ann[CLASS_ANNOTATION], "vrc");
    assert_eq!(
        serde_json::from_str::<TridentMirrorRelationshipSpec>(&ann[LAST_APPLIED_ANNOTATION])
            .expect("json"),
        tmr.spec
    );
    let owner = &tmr.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("VolumeReplication", "uid-vr")
    );
    assert_eq!(
        cond(&p, ctypes::COMPLETED).expect("completed").status,
        "False"
    );
    let st = p.status.as_ref().expect("status").replication();
    assert_eq!(st.last_start_time, Some(at(0)));
    assert_eq!(st.observed_generation, 1);

    apply_trident(&mut obs, &p.writes);
    settle_trident(&mut obs, &at(5));
    let r = with_status(Request { now: at(10), ..r }, &p);
    let p2 = plan(&r, &Observed::Trident(obs.clone())).expect("plan");
    assert!(p2.writes.is_empty());
    let st = p2.status.as_ref().expect("status").replication();
    assert_eq!(st.state, Some(ReplicatedState::Primary));
    assert_eq!(st.last_completion_time, Some(at(10)));
    assert_eq!(st.last_start_time, Some(at(0)));
    assert!(conditions::ramen_accepts_primary(st, 1));
    assert!(p2.events.iter().any(|e| e.reason == reasons::PROMOTED));
    let p3 = plan(
        &with_status(Request { now: at(20), ..r }, &p2),
        &Observed::Trident(obs),
    )
    .expect("plan");
    assert!(p3.is_noop(), "{p3:?}");
}

#[test]
fn trident_secondary_needs_a_remote_handle_and_uses_the_first_source() {
    let r = req(
        vol(&vr("db", ReplicationState::Secondary, false, "")),
        trident_class(),
        vec![pvc("db", TRIDENT, &[], &[])],
    );
    let p = plan(&r, &Observed::Nothing).expect("plan");
    assert!(p.writes.is_empty());
    assert!(
        matches!(p.rejection, Some(Rejection::MissingParameter { ref key, .. }) if key == "remoteVolumeHandle")
    );
    let v = cond(&p, ctypes::VALIDATED).expect("validated");
    assert_eq!(
        (v.status.as_str(), v.reason.as_str()),
        ("False", reasons::PREREQUISITE_NOT_MET)
    );
    assert!(
        v.message.contains("spec.replicationHandle"),
        "{}",
        v.message
    );

    // spec.replicationHandle wins over the PVC annotation.
    let r = req(
        vol(&vr(
            "db",
            ReplicationState::Secondary,
            false,
            "svmB:trident_pvc_1",
        )),
        trident_class(),
        vec![pvc(
            "db",
            TRIDENT,
            &[],
            &[(PVC_REMOTE_HANDLE_ANNOTATION, "svmB:other")],
        )],
    );
    let p = plan(&r, &Observed::Nothing).expect("plan");
    let [BackendWrite::Create(BackendObject::MirrorRelationship(tmr))] = p.writes.as_slice() else {
        panic!("{:?}", p.writes)
    };
    assert_eq!(tmr.spec.state, MirrorState::Established);
    assert_eq!(
        tmr.spec.volume_mappings[0].remote_volume_handle,
        "svmB:trident_pvc_1"
    );

    // A handle that is not <svm>:<volume> is refused.
    let r = req(
        vol(&vr("db", ReplicationState::Secondary, false, "nocolon")),
        trident_class(),
        vec![],
    );
    let p = plan(&r, &Observed::Nothing).expect("plan");
    assert!(matches!(
        p.rejection,
        Some(Rejection::InvalidRemoteHandle { .. })
    ));
    assert!(p.writes.is_empty());
}

/// A TMR as we would have made it, in `state`, reported by Trident as `status`.
fn our_tmr(
    subject: &Subject,
    pvc: &str,
    state: MirrorState,
    status: MirrorStatusState,
) -> TridentMirrorRelationship {
    let spec = TridentMirrorRelationshipSpec {
        state,
        replication_policy: "MirrorAllSnapshots".into(),
        replication_schedule: String::new(),
        volume_mappings: vec![TridentVolumeMapping {
            remote_volume_handle: if state == MirrorState::Promoted {
                String::new()
            } else {
                format!("svmB:{pvc}")
            },
            local_pvc_name: pvc.into(),
            promoted_snapshot_handle: String::new(),
        }],
    };
    TridentMirrorRelationship {
        metadata: ObjectMeta {
            name: Some(pvc.into()),
            namespace: Some(NS.into()),
            generation: Some(3),
            resource_version: Some("7".into()),
            uid: Some(format!("uid-{pvc}")),
            annotations: Some(BTreeMap::from([
                (OWNER_ANNOTATION.into(), subject.owner_key()),
                (CLASS_ANNOTATION.into(), subject.class_name.clone()),
                (
                    LAST_APPLIED_ANNOTATION.into(),
                    serde_json::to_string(&spec).expect("json"),
                ),
            ])),
            ..ObjectMeta::default()
        },
        spec,
        status: Some(TridentMirrorRelationshipStatus {
            conditions: vec![TridentMirrorCondition {
                state: status,
                message: "trident says hi".into(),
                observed_generation: 3,
                local_pvc_name: pvc.into(),
                ..Default::default()
            }],
        }),
    }
}

/// The plan for `r` with `relationships` observed and no mirror update.
fn plan_with_tmrs(r: &Request, relationships: Vec<TridentMirrorRelationship>) -> Plan {
    plan(
        r,
        &Observed::Trident(TridentObserved {
            relationships,
            updates: vec![],
        }),
    )
    .expect("plan")
}

#[test]
fn trident_destination_pvc_may_come_after_its_tmr_but_a_primary_needs_its_pvc() {
    let r = req(
        vol(&vr("db", ReplicationState::Secondary, false, "svmB:db")),
        trident_class(),
        vec![],
    );
    let mut obs = TridentObserved::default();
    let p = plan(&r, &Observed::Trident(obs.clone())).expect("plan");
    assert_eq!(p.writes.len(), 1);
    apply_trident(&mut obs, &p.writes);
    settle_trident(&mut obs, &at(1));
    let p = plan(&with_status(r, &p), &Observed::Trident(obs)).expect("plan");
    assert!(p.writes.is_empty());
    let c = cond(&p, ctypes::COMPLETED).expect("completed");
    assert_eq!(c.status, "False");
    assert!(
        c.message
            .contains("trident.netapp.io/mirrorRelationship: db"),
        "{}",
        c.message
    );

    let r = req(
        vol(&vr("db", ReplicationState::Primary, false, "")),
        trident_class(),
        vec![],
    );
    let p = plan(&r, &Observed::Nothing).expect("plan");
    assert!(matches!(p.rejection, Some(Rejection::PvcMissing { .. })));
    assert!(p.writes.is_empty());
}

#[test]
fn conditions_are_stamped_in_whole_seconds() {
    let mut r = req(
        vol(&vr("db", ReplicationState::Primary, false, "")),
        trident_class(),
        vec![pvc("db", TRIDENT, &[], &[])],
    );
    r.now = Time(k8s_openapi::jiff::Timestamp::new(1_767_225_600, 123_456_789).expect("time"));
    let p = plan(&r, &Observed::Nothing).expect("plan");
    let st = p.status.expect("status");
    assert_eq!(st.replication().last_start_time, Some(at(0)));
    assert!(
        st.replication()
            .conditions
            .iter()
            .all(|c| c.last_transition_time == at(0))
    );
}

#[test]
fn trident_demoting_a_promoted_volume_reestablishes_it() {
    let s = vol(&vr("db", ReplicationState::Secondary, false, ""));
    let tmr = our_tmr(&s, "db", MirrorState::Promoted, MirrorStatusState::Promoted);
    let r = req(
        s,
        trident_class(),
        vec![pvc(
            "db",
            TRIDENT,
            &[],
            &[(PVC_REMOTE_HANDLE_ANNOTATION, "svmB:db")],
        )],
    );
    let p = plan_with_tmrs(&r, vec![tmr]);
    let [BackendWrite::Patch { target, patch }] = p.writes.as_slice() else {
        panic!("{:?}", p.writes)
    };
    assert_eq!(target.name, "db");
    assert_eq!(patch["spec"]["state"], "reestablished");
    assert_eq!(patch["metadata"]["resourceVersion"], "7");
    assert_eq!(
        patch["spec"]["volumeMappings"][0]["remoteVolumeHandle"],
        "svmB:db"
    );
    assert!(
        p.events
            .iter()
            .any(|e| e.message.contains("overwrites its local data"))
    );
}

/// Planned failover on the destination: promoting with the snapshot the PVC annotation names
/// (the last one replicated) sends it as `promotedSnapshotHandle`; once promoted it is kept.
#[test]
fn trident_planned_promotion_sends_the_snapshot_handle_of_the_pvc_annotation() {
    let s = vol(&vr("db", ReplicationState::Primary, false, ""));
    let tmr = our_tmr(
        &s,
        "db",
        MirrorState::Established,
        MirrorStatusState::Established,
    );
    let snap = "snapshot-4f2a/svm0:trident_app_db";
    let r = req(
        s.clone(),
        trident_class(),
        vec![pvc(
            "db",
            TRIDENT,
            &[],
            &[(PVC_PROMOTED_SNAPSHOT_ANNOTATION, snap)],
        )],
    );
    let p = plan_with_tmrs(&r, vec![tmr]);
    let [BackendWrite::Patch { patch, .. }] = p.writes.as_slice() else {
        panic!("{:?}", p.writes)
    };
    assert_eq!(patch["spec"]["state"], "promoted");
    assert_eq!(
        patch["spec"]["volumeMappings"][0]["promotedSnapshotHandle"],
        snap
    );
    // Without the annotation: an unplanned promotion (no snapshot handle).
    let r = req(
        s.clone(),
        trident_class(),
        vec![pvc("db", TRIDENT, &[], &[])],
    );
    let tmr = our_tmr(
        &s,
        "db",
        MirrorState::Established,
        MirrorStatusState::Established,
    );
    let p = plan_with_tmrs(&r, vec![tmr]);
    let [BackendWrite::Patch { patch, .. }] = p.writes.as_slice() else {
        panic!("{:?}", p.writes)
    };
    assert_eq!(
        patch["spec"]["volumeMappings"][0]["promotedSnapshotHandle"]
            .as_str()
            .unwrap_or(""),
        ""
    );
}

#[test]
fn trident_resync_of_a_healthy_destination_is_one_mirror_update_per_generation() {
    let s = vol(&vr("db", ReplicationState::Resync, false, ""));
    let tmr = our_tmr(
        &s,
        "db",
        MirrorState::Established,
        MirrorStatusState::Established,
    );
    let r = req(s, trident_class(), vec![pvc("db", TRIDENT, &[], &[])]);
    let mut obs = TridentObserved {
        relationships: vec![tmr],
        updates: vec![],
    };
    let p = plan(&r, &Observed::Trident(obs.clone())).expect("plan");
    let [BackendWrite::Create(BackendObject::MirrorUpdate(u))] = p.writes.as_slice() else {
        panic!("{:?}", p.writes)
    };
    assert_eq!(u.metadata.name.as_deref(), Some("db-resync-g1"));
    assert_eq!(u.spec.trident_mirror_relationship_name, "db");
    assert_eq!(
        u.metadata.owner_references.as_ref().expect("owner")[0].uid,
        "uid-db"
    );
    apply_trident(&mut obs, &p.writes);
    let r = with_status(r, &p);
    let p = plan(&r, &Observed::Trident(obs.clone())).expect("plan");
    assert!(p.writes.is_empty(), "no second update: {:?}", p.writes);
    settle_trident(&mut obs, &at(30));
    let p = plan(&with_status(r, &p), &Observed::Trident(obs)).expect("plan");
    let st = p.status.expect("status");
    assert_eq!(st.replication().last_sync_time, Some(at(30)));
    assert_eq!(st.replication().state, Some(ReplicatedState::Secondary));
}

#[test]
fn trident_reports_failed_and_invalid_members_by_name() {
    let v = vgr(ReplicationState::Secondary, false, true);
    let s = grp(&v);
    let pvcs = vec![
        pvc("a", TRIDENT, &[("app", "shop")], &[]),
        pvc("b", TRIDENT, &[("app", "shop")], &[]),
    ];
    let mut b = our_tmr(&s, "b", MirrorState::Established, MirrorStatusState::Failed);
    b.status.as_mut().expect("status").conditions[0].message = "SnapMirror broken-off".into();
    let obs = TridentObserved {
        relationships: vec![
            our_tmr(
                &s,
                "a",
                MirrorState::Established,
                MirrorStatusState::Established,
            ),
            b,
        ],
        updates: vec![],
    };
    let r = req(s, class("vgrc", TRIDENT, &[]), pvcs);
    let p = plan(&r, &Observed::Trident(obs)).expect("plan");
    assert!(p.writes.is_empty());
    let d = cond(&p, ctypes::DEGRADED).expect("degraded");
    assert_eq!(d.status, "True");
    assert!(
        d.message.contains("PVC b") && d.message.contains("SnapMirror broken-off"),
        "{}",
        d.message
    );
    assert!(!d.message.contains("PVC a"));
    let c = cond(&p, ctypes::COMPLETED).expect("completed");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", reasons::FAILED_TO_DEMOTE)
    );
    let SubjectStatus::Group(g) = p.status.expect("status") else {
        panic!()
    };
    let names: Vec<_> = g
        .persistent_volume_claims_ref_list
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn trident_group_is_all_or_nothing_on_bad_members() {
    let s = grp(&vgr(ReplicationState::Primary, false, true));
    let pvcs = vec![
        pvc("a", TRIDENT, &[("app", "shop")], &[]),
        pvc("b", "ebs.csi.aws.com", &[("app", "shop")], &[]),
    ];
    let p = plan(
        &req(s, class("vgrc", TRIDENT, &[]), pvcs),
        &Observed::Nothing,
    )
    .expect("plan");
    assert!(p.writes.is_empty(), "no write for the good member either");
    assert!(matches!(p.rejection, Some(Rejection::ForeignDriver { ref pvc, .. }) if pvc == "b"));
    assert_eq!(
        p.rejection.as_ref().map(Rejection::kind),
        Some(RejectionKind::Pvc)
    );
}

#[test]
fn trident_refuses_tmrs_not_ours_edited_or_bound_to_another_class() {
    let s = vol(&vr("db", ReplicationState::Primary, false, ""));
    let r = req(
        s.clone(),
        trident_class(),
        vec![pvc("db", TRIDENT, &[], &[])],
    );
    let run = |t: TridentMirrorRelationship| plan_with_tmrs(&r, vec![t]);
    let mine = our_tmr(
        &s,
        "db",
        MirrorState::Established,
        MirrorStatusState::Established,
    );

    let mut foreign = mine.clone();
    foreign.metadata.annotations = None;
    let p = run(foreign);
    assert!(matches!(p.rejection, Some(Rejection::NotOurs { .. })));
    assert!(p.writes.is_empty());

    let mut edited = mine.clone();
    edited.spec.replication_schedule = "1min".into();
    let p = run(edited);
    let Some(Rejection::ChangedByHand { detail, .. }) = &p.rejection else {
        panic!("{p:?}")
    };
    assert!(detail.contains("replicationSchedule"), "{detail}");
    assert!(p.writes.is_empty());

    let mut other_owner = mine.clone();
    other_owner
        .metadata
        .annotations
        .as_mut()
        .expect("ann")
        .insert(
            OWNER_ANNOTATION.into(),
            "VolumeReplication/app/other".into(),
        );
    let p = run(other_owner);
    assert!(matches!(
        p.rejection,
        Some(Rejection::ClaimedElsewhere { .. })
    ));

    let mut rebound = mine;
    rebound
        .metadata
        .annotations
        .as_mut()
        .expect("ann")
        .insert(CLASS_ANNOTATION.into(), "old-class".into());
    let p = run(rebound);
    assert!(
        matches!(p.rejection, Some(Rejection::ImmutableFieldChanged { ref was, .. }) if was == "old-class")
    );
    assert!(p.writes.is_empty());
}

#[test]
fn trident_remote_handle_is_immutable_once_set() {
    let s = vol(&vr("db", ReplicationState::Secondary, false, "svmB:new"));
    let tmr = our_tmr(&s, "db", MirrorState::Promoted, MirrorStatusState::Promoted);
    let mut tmr2 = tmr.clone();
    tmr2.spec.volume_mappings[0].remote_volume_handle = "svmB:old".into();
    tmr2.metadata.annotations.as_mut().expect("ann").insert(
        LAST_APPLIED_ANNOTATION.into(),
        serde_json::to_string(&tmr2.spec).expect("json"),
    );
    let p = plan_with_tmrs(
        &req(s, trident_class(), vec![pvc("db", TRIDENT, &[], &[])]),
        vec![tmr2],
    );
    assert!(
        matches!(p.rejection, Some(Rejection::ImmutableFieldChanged { ref field, .. }) if field == "spec.replicationHandle")
    );
    assert!(p.writes.is_empty());
}

#[test]
fn trident_deletion_deletes_our_tmrs_and_says_it_promotes() {
    let mut v = vr("db", ReplicationState::Secondary, false, "");
    v.metadata.deletion_timestamp = Some(at(0));
    let s = vol(&v);
    let mine = our_tmr(
        &s,
        "db",
        MirrorState::Established,
        MirrorStatusState::Established,
    );
    let mut not_mine = mine.clone();
    not_mine.metadata.name = Some("other".into());
    not_mine.metadata.annotations = None;
    let mut obs = TridentObserved {
        relationships: vec![mine, not_mine],
        updates: vec![],
    };
    let r = req(s, trident_class(), vec![]);
    let p = plan(&r, &Observed::Trident(obs.clone())).expect("plan");
    assert_eq!(p.writes.len(), 1);
    assert!(matches!(&p.writes[0], BackendWrite::Delete { target } if target.name == "db"));
    assert!(p.events.iter().any(|e| e.message.contains("promotes")));
    assert!(!p.deletion_complete);
    assert!(p.status.is_none());
    apply_trident(&mut obs, &p.writes);
    let p = plan(&r, &Observed::Trident(obs)).expect("plan");
    assert!(p.deletion_complete && p.writes.is_empty());
}

#[test]
fn group_shrink_deletes_the_dropped_members_tmr() {
    let s = grp(&vgr(ReplicationState::Primary, false, true));
    let obs = TridentObserved {
        relationships: vec![
            our_tmr(&s, "a", MirrorState::Promoted, MirrorStatusState::Promoted),
            our_tmr(
                &s,
                "gone",
                MirrorState::Promoted,
                MirrorStatusState::Promoted,
            ),
        ],
        updates: vec![],
    };
    let p = plan(
        &req(
            s,
            class(
                "vgrc",
                TRIDENT,
                &[("replicationPolicy", "MirrorAllSnapshots")],
            ),
            vec![pvc("a", TRIDENT, &[("app", "shop")], &[])],
        ),
        &Observed::Trident(obs),
    )
    .expect("plan");
    assert_eq!(p.writes.len(), 1, "{:?}", p.writes);
    assert!(matches!(&p.writes[0], BackendWrite::Delete { target } if target.name == "gone"));
}

// ---------------------------------------------------------------------------
// Bad input common to backends
// ---------------------------------------------------------------------------

/// Which rejection a case expects.
type Expect = fn(&Rejection) -> bool;

#[test]
fn bad_input_is_reported_and_never_written() {
    let shop = |n: &str| pvc(n, TRIDENT, &[("app", "shop")], &[]);
    let g = |external| grp(&vgr(ReplicationState::Primary, false, external));
    let cases: Vec<(&str, Request, Expect)> = vec![
        (
            "class missing",
            Request {
                class: None,
                ..req(g(true), trident_class(), vec![shop("a")])
            },
            |r| matches!(r, Rejection::ClassNotFound { .. }),
        ),
        (
            "unknown provisioner",
            req(g(true), class("x", "ebs.csi.aws.com", &[]), vec![shop("a")]),
            |r| matches!(r, Rejection::UnknownProvisioner { .. }),
        ),
        (
            "selector matches none",
            req(g(true), trident_class(), vec![pvc("a", TRIDENT, &[], &[])]),
            |r| matches!(r, Rejection::SelectorMatchedNone { .. }),
        ),
        (
            "selector matches 101",
            req(
                g(true),
                trident_class(),
                (0..101).map(|i| shop(&format!("p{i:03}"))).collect(),
            ),
            |r| {
                matches!(
                    r,
                    Rejection::TooManyPvcs {
                        matched: 101,
                        max: 100
                    }
                )
            },
        ),
        (
            "not external",
            req(g(false), trident_class(), vec![shop("a")]),
            |r| matches!(r, Rejection::ExternalRequired { .. }),
        ),
        (
            "claimed by a VR",
            req(
                g(true),
                trident_class(),
                vec![pvc(
                    "a",
                    TRIDENT,
                    &[("app", "shop")],
                    &[(PVC_VR_ANNOTATION, "vr-x/app")],
                )],
            ),
            |r| matches!(r, Rejection::ClaimedElsewhere { .. }),
        ),
        (
            "remote handle for a group",
            req(
                g(true),
                class("vgrc", TRIDENT, &[("remoteVolumeHandle", "svm:v")]),
                vec![shop("a"), shop("b")],
            ),
            |r| matches!(r, Rejection::InvalidParameter { .. }),
        ),
    ];
    for (name, r, expect) in cases {
        let p = plan(&r, &Observed::Nothing).expect(name);
        let rej = p
            .rejection
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no rejection"));
        assert!(expect(rej), "{name}: {rej:?}");
        assert!(p.writes.is_empty(), "{name}");
        let v = cond(&p, ctypes::VALIDATED).unwrap_or_else(|| panic!("{name}: no Validated"));
        assert_eq!(
            (v.status.as_str(), v.reason.as_str()),
            ("False", reasons::PREREQUISITE_NOT_MET),
            "{name}"
        );
        assert_eq!(v.message, rej.to_string());
        assert!(
            p.events.iter().any(|e| e.type_ == EventType::Warning),
            "{name}"
        );
    }
}

#[test]
fn a_bad_selector_operator_is_refused() {
    let mut v = vgr(ReplicationState::Primary, false, true);
    v.spec.source.selector.match_expressions = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
            key: "app".into(),
            operator: "Like".into(),
            values: Some(vec!["shop".into()]),
        },
    ]);
    let p = plan(
        &req(
            grp(&v),
            trident_class(),
            vec![pvc("a", TRIDENT, &[("app", "shop")], &[])],
        ),
        &Observed::Nothing,
    )
    .expect("plan");
    assert!(matches!(
        p.rejection,
        Some(Rejection::InvalidSelector { .. })
    ));
}

#[test]
fn a_mismatched_observation_is_a_caller_error() {
    let r = req(
        vol(&vr("db", ReplicationState::Primary, false, "")),
        trident_class(),
        vec![],
    );
    assert!(matches!(
        plan(&r, &Observed::Dell(DellObserved::default())),
        Err(TranslateError::ObservationMismatch {
            backend: Backend::Trident,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------
// Ceph
// ---------------------------------------------------------------------------

#[test]
fn ceph_is_validated_and_never_driven() {
    let c = |params: &[(&str, &str)]| class("vrc", "openshift-storage.rbd.csi.ceph.com", params);
    let r = req(
        vol(&vr("db", ReplicationState::Primary, false, "")),
        c(&[("schedulingInterval", "5m")]),
        vec![],
    );
    let p = plan(&r, &Observed::Nothing).expect("plan");
    assert_eq!(p.backend, Some(Backend::CephRbd));
    assert!(p.is_noop() && p.rejection.is_none(), "{p:?}");

    let r = req(
        vol(&vr("db", ReplicationState::Primary, false, "")),
        c(&[("schedulingInterval", "5x")]),
        vec![],
    );
    let p = plan(&r, &Observed::Nothing).expect("plan");
    assert!(p.writes.is_empty() && p.status.is_none());
    assert!(
        matches!(p.rejection, Some(Rejection::InvalidParameter { ref key, .. }) if key == "schedulingInterval")
    );
    assert_eq!(p.events.len(), 1);

    let r = req(
        grp(&vgr(ReplicationState::Primary, false, true)),
        c(&[]),
        vec![],
    );
    let p = plan(&r, &Observed::Nothing).expect("plan");
    assert!(matches!(
        p.rejection,
        Some(Rejection::ExternalOnCeph { .. })
    ));
    assert!(p.status.is_none());
}

// ---------------------------------------------------------------------------
// Dell: a simulated sidecar
// ---------------------------------------------------------------------------

fn dell_class() -> ClassView {
    class(
        "vgrc",
        DELL,
        &[("remoteSystem", "RT-B"), ("rpo", "Five_Minutes")],
    )
}

fn rg_named(name: &str, is_source: bool, link: &str) -> DellCSIReplicationGroup {
    let mut rg = DellCSIReplicationGroup::new(
        name,
        DellCSIReplicationGroupSpec {
            driver_name: DELL.into(),
            action: String::new(),
            remote_cluster_id: "self".into(),
            protection_group_id: "pg-1".into(),
            remote_protection_group_id: "pg-2".into(),
            protection_group_attributes: BTreeMap::from([(
                "remoteSystemName".into(),
                "RT-B".into(),
            )]),
            ..Default::default()
        },
    );
    rg.metadata.resource_version = Some("1".into());
    rg.metadata.generation = Some(1);
    rg.status = Some(DellCSIReplicationGroupStatus {
        state: "Ready".into(),
        replication_link_state: ReplicationLinkState {
            state: link.into(),
            is_source,
            last_successful_update: Some(at(0)),
            error_message: String::new(),
        },
        ..Default::default()
    });
    rg
}

fn dell_pvcs(names: &[&str]) -> Vec<PvcInfo> {
    names
        .iter()
        .map(|n| pvc(n, DELL, &[("app", "shop"), (dell::RG_LABEL, "rg-1")], &[]))
        .collect()
}

fn dell_req(state: ReplicationState, auto: bool) -> Request {
    req(
        grp(&vgr(state, auto, true)),
        dell_class(),
        dell_pvcs(&["a", "b"]),
    )
}

fn dell_verbs(p: &Plan) -> Vec<String> {
    p.writes
        .iter()
        .filter_map(|w| match w {
            BackendWrite::Patch { patch, .. } => {
                patch["spec"]["action"].as_str().map(str::to_string)
            }
            _ => None,
        })
        .collect()
}

fn bump_rv(rg: &mut DellCSIReplicationGroup) {
    let n: u64 = rg
        .metadata
        .resource_version
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    rg.metadata.resource_version = Some((n + 1).to_string());
}

/// What the Dell sidecar does with `spec.action`, and what the verb does to the link.
fn sidecar_finish(rg: &mut DellCSIReplicationGroup, t: &Time, ok: bool, fresh_poll: bool) {
    let verb = std::mem::take(&mut rg.spec.action).to_ascii_uppercase();
    if verb.is_empty() {
        return;
    }
    let status = rg.status.get_or_insert_with(Default::default);
    let link = &mut status.replication_link_state;
    if ok {
        match verb.as_str() {
            "FAILOVER_REMOTE" => (link.is_source, link.state) = (false, "FAILEDOVER".into()),
            "UNPLANNED_FAILOVER_LOCAL" => {
                (link.is_source, link.state) = (true, "FAILEDOVER".into())
            }
            "REPROTECT_LOCAL" => (link.is_source, link.state) = (true, "SYNCHRONIZED".into()),
            "RESUME" | "SYNC" => link.state = "SYNCHRONIZED".into(),
            "SUSPEND" => link.state = "SUSPENDED".into(),
            _ => {}
        }
    }
    if fresh_poll {
        link.last_successful_update = Some(t.clone());
    }
    status.state = if ok { "Ready" } else { "Error" }.into();
    status.last_action = LastAction {
        condition: if ok {
            format!("Action {verb} succeeded")
        } else {
            format!("Action {verb} failed with error boom")
        },
        time: Some(t.clone()),
        error_message: if ok { String::new() } else { "boom".into() },
        first_failure: None,
    };
    let ann = json!({"name": verb, "completed": true, "finalError": if ok { "" } else { "boom" },
        "finishTime": "", "protectionGroupStatus": ""});
    rg.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("Action".into(), ann.to_string());
    bump_rv(rg);
}

fn apply_dell(obs: &mut DellObserved, writes: &[BackendWrite]) -> bool {
    let mut all = true;
    for w in writes {
        let BackendWrite::Patch { target, patch } = w else {
            panic!("Dell plans only patch: {w:?}")
        };
        let rg = obs
            .groups
            .iter_mut()
            .find(|g| g.metadata.name.as_deref() == Some(target.name.as_str()))
            .expect("rg");
        all &= patch_object(rg, patch);
    }
    all
}

#[test]
fn dell_planned_demotion_sends_failover_remote_once() {
    let r = dell_req(ReplicationState::Secondary, false);
    let mut obs = DellObserved {
        groups: vec![rg_named("rg-1", true, "SYNCHRONIZED")],
    };
    let p = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
    assert_eq!(dell_verbs(&p), ["FAILOVER_REMOTE"]);
    let BackendWrite::Patch { patch, target } = &p.writes[0] else {
        panic!()
    };
    assert_eq!(target.namespace, None);
    assert_eq!(patch["metadata"]["resourceVersion"], "1");
    let ledger: Ledger = serde_json::from_str(
        patch["metadata"]["annotations"][LEDGER_ANNOTATION]
            .as_str()
            .expect("ledger"),
    )
    .expect("json");
    assert_eq!(ledger.transition, "secondary@1");
    assert_eq!(ledger.sent, ["FAILOVER_REMOTE"]);
    assert!(apply_dell(&mut obs, &p.writes));
    let r = with_status(r, &p);
    // Pending, then in progress, then done: never sent again.
    let p = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
    assert!(p.writes.is_empty());
    obs.groups[0].status.as_mut().expect("st").state = "FAILOVER_REMOTE_IN_PROGRESS".into();
    assert!(
        plan(&r, &Observed::Dell(obs.clone()))
            .expect("plan")
            .writes
            .is_empty()
    );
    sidecar_finish(&mut obs.groups[0], &at(5), true, true);
    let p = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
    assert!(p.writes.is_empty());
    let st = p.status.as_ref().expect("status").replication();
    assert_eq!(st.state, Some(ReplicatedState::Secondary));
    assert!(conditions::ramen_accepts_secondary(st, 1), "{st:?}");
}

#[test]
fn dell_failed_verb_is_reported_not_resent_until_the_ledger_is_removed() {
    let r = dell_req(ReplicationState::Primary, false);
    let mut obs = DellObserved {
        groups: vec![rg_named("rg-1", false, "SYNCHRONIZED")],
    };
    let p = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
    assert_eq!(dell_verbs(&p), ["UNPLANNED_FAILOVER_LOCAL"]);
    apply_dell(&mut obs, &p.writes);
    sidecar_finish(&mut obs.groups[0], &at(5), false, true);
    let p = plan(&with_status(r.clone(), &p), &Observed::Dell(obs.clone())).expect("plan");
    assert!(p.writes.is_empty());
    let c = cond(&p, ctypes::COMPLETED).expect("completed");
    assert_eq!(c.reason, reasons::FAILED_TO_PROMOTE);
    assert!(
        c.message.contains("boom") && c.message.contains(LEDGER_ANNOTATION),
        "{}",
        c.message
    );
    obs.groups[0]
        .metadata
        .annotations
        .as_mut()
        .expect("ann")
        .remove(LEDGER_ANNOTATION);
    let p = plan(&r, &Observed::Dell(obs)).expect("plan");
    assert_eq!(
        dell_verbs(&p),
        ["UNPLANNED_FAILOVER_LOCAL"],
        "retried once the ledger is gone"
    );
}

#[test]
fn dell_refuses_partial_groups_hand_actions_and_resync_on_the_source() {
    // A PVC of the protection group left out of the selection.
    let mut pvcs = dell_pvcs(&["a", "b"]);
    pvcs.push(pvc("c", DELL, &[(dell::RG_LABEL, "rg-1")], &[]));
    let r = req(
        grp(&vgr(ReplicationState::Primary, false, true)),
        dell_class(),
        pvcs,
    );
    let obs = Observed::Dell(DellObserved {
        groups: vec![rg_named("rg-1", true, "SYNCHRONIZED")],
    });
    let p = plan(&r, &obs).expect("plan");
    assert!(
        matches!(p.rejection, Some(Rejection::PartialProtectionGroup { subject: SubjectKind::Group, ref group, ref others }) if group == "rg-1" && others == &["c"])
    );

    // Someone else set spec.action.
    let mut g = rg_named("rg-1", true, "SYNCHRONIZED");
    g.spec.action = "SUSPEND".into();
    let p = plan(
        &dell_req(ReplicationState::Primary, false),
        &Observed::Dell(DellObserved { groups: vec![g] }),
    )
    .expect("plan");
    assert!(matches!(p.rejection, Some(Rejection::ChangedByHand { .. })));
    assert!(p.writes.is_empty());

    // resync on the source.
    let p = plan(&dell_req(ReplicationState::Resync, false), &obs).expect("plan");
    assert!(matches!(
        p.rejection,
        Some(Rejection::ConflictingState { .. })
    ));
    assert_eq!(
        p.rejection.as_ref().map(Rejection::kind),
        Some(RejectionKind::Conflict)
    );

    // Missing rpo.
    let r = req(
        grp(&vgr(ReplicationState::Primary, false, true)),
        class("vgrc", DELL, &[("remoteSystem", "RT-B")]),
        dell_pvcs(&["a", "b"]),
    );
    let p = plan(&r, &obs).expect("plan");
    assert!(
        matches!(p.rejection, Some(Rejection::MissingParameter { ref key, .. }) if key == "rpo")
    );

    // A suspension made by a person is reported, not undone.
    let mut g = rg_named("rg-1", false, "SYNCHRONIZED");
    g.spec.action = "SUSPEND".into();
    sidecar_finish(&mut g, &at(1), true, true);
    let p = plan(
        &dell_req(ReplicationState::Secondary, true),
        &Observed::Dell(DellObserved { groups: vec![g] }),
    )
    .expect("plan");
    assert!(p.writes.is_empty());
    let d = cond(&p, ctypes::DEGRADED).expect("degraded");
    assert!(d.message.contains("RESUME"), "{}", d.message);
}

#[test]
fn dell_waits_for_a_link_poll_after_an_action() {
    let r = dell_req(ReplicationState::Primary, false);
    let mut obs = DellObserved {
        groups: vec![rg_named("rg-1", false, "SYNCHRONIZED")],
    };
    let p = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
    apply_dell(&mut obs, &p.writes);
    // The verb ran but the link state is from before it (isSource still false).
    let g = &mut obs.groups[0];
    g.status
        .as_mut()
        .expect("st")
        .replication_link_state
        .last_successful_update = Some(at(0));
    let verb = g.spec.action.clone();
    g.spec.action.clear();
    g.status.as_mut().expect("st").last_action = LastAction {
        condition: format!("Action {verb} succeeded"),
        time: Some(at(9)),
        ..Default::default()
    };
    let p = plan(&r, &Observed::Dell(obs)).expect("plan");
    assert!(p.writes.is_empty());
    assert!(
        cond(&p, ctypes::COMPLETED)
            .expect("c")
            .message
            .contains("poll")
    );
}

#[test]
fn dell_deletion_leaves_the_rg_alone() {
    let mut v = vgr(ReplicationState::Primary, false, true);
    v.metadata.deletion_timestamp = Some(at(0));
    let p = plan(
        &req(grp(&v), dell_class(), dell_pvcs(&["a", "b"])),
        &Observed::Dell(DellObserved {
            groups: vec![rg_named("rg-1", true, "SYNCHRONIZED")],
        }),
    )
    .expect("plan");
    assert!(p.writes.is_empty() && p.deletion_complete && p.status.is_none());
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

fn any_state() -> impl Strategy<Value = ReplicationState> {
    prop::sample::select(ReplicationState::ALL.to_vec())
}

fn any_mirror_status() -> impl Strategy<Value = MirrorStatusState> {
    prop_oneof![
        prop::sample::select(MirrorStatusState::NAMED.to_vec()),
        "[a-z_ -]{0,12}".prop_map(MirrorStatusState::from),
    ]
}

fn any_link() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "SYNCHRONIZED",
            "SYNC_IN_PROGRESS",
            "SUSPENDED",
            "FAILEDOVER",
            "INVALID",
            "UNKNOWN",
            "EMPTY",
            ""
        ])
        .prop_map(str::to_string),
        "[A-Z_]{0,12}",
    ]
}

fn any_rg_state() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "Ready",
            "Error",
            "Invalid",
            "Deleting",
            "SYNC_IN_PROGRESS",
            "FAILOVER_REMOTE_IN_PROGRESS"
        ])
        .prop_map(str::to_string),
        "[A-Za-z_]{0,12}",
    ]
}

/// The invariants of any status we write.
fn check_status(st: &VolumeReplicationStatus, generation: i64) -> Result<(), TestCaseError> {
    prop_assert_eq!(st.observed_generation, generation);
    let pattern = |r: &str| {
        r.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_,:".contains(c))
    };
    for t in conditions::MANAGED_TYPES {
        prop_assert!(
            st.conditions.iter().filter(|c| c.type_ == t).count() <= 1,
            "duplicate {}",
            t
        );
    }
    prop_assert!(
        st.conditions.iter().any(|c| c.type_ == ctypes::COMPLETED),
        "no Completed"
    );
    for c in &st.conditions {
        prop_assert!(
            reasons::CSI_ADDONS.contains(&c.reason.as_str())
                || reasons::OWN.contains(&c.reason.as_str()),
            "reason {} is not a known constant",
            c.reason
        );
        prop_assert!(pattern(&c.reason));
        prop_assert!(["True", "False", "Unknown"].contains(&c.status.as_str()));
        prop_assert!(c.message.len() <= 32768);
        prop_assert_eq!(c.observed_generation, Some(generation));
    }
    Ok(())
}

/// Ramen accepts the status exactly when the report says the role is reached.
fn check_ramen(
    desired: ReplicationState,
    kind: ReportKind,
    st: &VolumeReplicationStatus,
) -> Result<(), TestCaseError> {
    match desired {
        ReplicationState::Primary => prop_assert_eq!(
            conditions::ramen_accepts_primary(st, st.observed_generation),
            matches!(kind, ReportKind::Converged | ReportKind::ConvergedDegraded),
            "primary {:?} {:?}",
            kind,
            st
        ),
        _ => prop_assert_eq!(
            conditions::ramen_accepts_secondary(st, st.observed_generation),
            matches!(kind, ReportKind::Converged | ReportKind::Resyncing),
            "secondary {:?} {:?}",
            kind,
            st
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Trident status mapping is total: any spec/status/staleness gives a valid status.
    #[test]
    fn trident_status_mapping_is_total(
        desired in any_state(),
        spec in prop::option::of(prop::sample::select(MirrorState::ALL.to_vec())),
        status in any_mirror_status(),
        stale in any::<bool>(),
        members in 1usize..4,
    ) {
        let view = trident::TmrView { spec, status, stale };
        let m = trident::member_report(desired, &view, &trident::TamuView::Absent, "msg");
        let report = trident::aggregate(desired, &vec![("p".to_string(), m); members]);
        let mut s = vol(&vr("p", desired, false, ""));
        s.generation = 4;
        let st = conditions::merge_status(&s, &report, &at(0), false);
        check_status(&st, 4)?;
        check_ramen(desired, report.kind, &st)?;
    }

    /// Dell status mapping is total over every RG state, link state and source role.
    #[test]
    fn dell_status_mapping_is_total(
        desired in any_state(),
        auto in any::<bool>(),
        is_source in any::<bool>(),
        link in any_link(),
        state in any_rg_state(),
        pending in prop::option::of("[A-Z_]{1,10}"),
    ) {
        let mut g = rg_named("rg-1", is_source, &link);
        g.status.as_mut().expect("st").state = state;
        g.spec.action = pending.unwrap_or_default();
        let view = dell::RgView::of(&g);
        let report = match dell::decide(desired, auto, &view, &[], &[], "rg-1") {
            dell::Decision::Report(r) => r,
            dell::Decision::Request(v) => conditions::Report::in_progress(desired, v.as_str()),
            dell::Decision::Reject(r) => conditions::Report::rejected(desired, &r),
        };
        let mut s = grp(&vgr(desired, auto, true));
        s.generation = 2;
        let st = conditions::merge_status(&s, &report, &at(0), false);
        check_status(&st, 2)?;
        check_ramen(desired, report.kind, &st)?;
    }

    /// Trident: from any of our TMR states, applying plans and letting Trident
    /// settle converges with writes only while not converged; then the same
    /// observation plans nothing at all.
    #[test]
    fn trident_converges_and_then_plans_nothing(
        desired in any_state(),
        auto in any::<bool>(),
        group in any::<bool>(),
        initial in prop::collection::vec(
            prop::option::of((prop::sample::select(vec![MirrorState::Promoted, MirrorState::Established, MirrorState::Reestablished]), any_mirror_status())),
            1..4),
    ) {
        let names: Vec<String> = (0..initial.len()).map(|i| format!("p{i}")).collect();
        let subject = if group {
            grp(&vgr(desired, auto, true))
        } else {
            vol(&vr(&names[0], desired, auto, ""))
        };
        let names = if group { names } else { vec![names[0].clone()] };
        let pvcs: Vec<PvcInfo> = names.iter().map(|n| pvc(n, TRIDENT, &[("app", "shop")], &[(PVC_REMOTE_HANDLE_ANNOTATION, &format!("svmB:{n}"))])).collect();
        let mut obs = TridentObserved::default();
        for (n, init) in names.iter().zip(&initial) {
            if let Some((state, status)) = init {
                obs.relationships.push(our_tmr(&subject, n, *state, status.clone()));
            }
        }
        let c = class(if group { "vgrc" } else { "vrc" }, TRIDENT, &[("replicationPolicy", "MirrorAllSnapshots")]);
        let mut r = req(subject, c, pvcs);
        let mut converged = false;
        for round in 0..6i64 {
            r.now = at(round * 10);
            let p = plan(&r, &Observed::Trident(obs.clone())).expect("plan");
            prop_assert!(p.rejection.is_none(), "{:?}", p.rejection);
            if let Some(st) = &p.status { check_status(st.replication(), 1)?; }
            // A repeated reconcile of the same observation plans the same writes.
            let again = plan(&Request { now: at(round * 10 + 1), ..r.clone() }, &Observed::Trident(obs.clone())).expect("plan");
            prop_assert_eq!(&again.writes, &p.writes);
            r = with_status(r, &p);
            if p.writes.is_empty() {
                let st = &r.subject.status;
                if st.conditions.iter().any(|c| c.type_ == ctypes::COMPLETED && c.status == "True") {
                    converged = true;
                    break;
                }
            }
            apply_trident(&mut obs, &p.writes);
            // The writes are applied, Trident has not moved yet: nothing more to write.
            let after = plan(&r, &Observed::Trident(obs.clone())).expect("plan");
            prop_assert!(after.writes.is_empty(), "round {} wrote again: {:?}", round, after.writes);
            settle_trident(&mut obs, &at(round * 10 + 5));
        }
        prop_assert!(converged, "did not converge: {:?}", r.subject.status);
        r.now = at(1000);
        let p = plan(&r, &Observed::Trident(obs)).expect("plan");
        prop_assert!(p.is_noop(), "converged but planned {:?}", p);
    }

    /// Dell: whatever the sidecar and the peer do (pick up late, fail, poll
    /// late, flip the link, conflict on resourceVersion), no verb is sent twice
    /// for one transition, and the same observation plans the same thing.
    #[test]
    fn dell_never_sends_a_verb_twice_per_transition(
        start_source in any::<bool>(),
        start_link in prop::sample::select(vec!["SYNCHRONIZED", "SYNC_IN_PROGRESS", "SUSPENDED", "FAILEDOVER", "UNKNOWN"]),
        steps in prop::collection::vec((0u8..8, any::<bool>(), any::<bool>(), 0usize..3), 1..40),
        auto in any::<bool>(),
    ) {
        let states = [ReplicationState::Primary, ReplicationState::Secondary, ReplicationState::Resync];
        let mut desired = ReplicationState::Primary;
        let mut r = dell_req(desired, auto);
        let mut obs = DellObserved { groups: vec![rg_named("rg-1", start_source, start_link)] };
        let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, (event, ok, fresh, pick)) in steps.into_iter().enumerate() {
            let t = at(i as i64 * 10 + 1);
            r.now = t.clone();
            let p = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
            let again = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
            prop_assert_eq!(&p, &again);
            prop_assert!(p.writes.len() <= 1);
            let transition = format!("{desired}@{}", r.subject.generation);
            for verb in dell_verbs(&p) {
                prop_assert!(verb != "SUSPEND", "we never suspend");
                let seen = sent.entry(transition.clone()).or_default();
                prop_assert!(!seen.contains(&verb), "{} sent twice for {}: {:?}", verb, transition, seen);
                seen.push(verb);
            }
            if !p.writes.is_empty() {
                prop_assert!(apply_dell(&mut obs, &p.writes), "patch from a fresh observation conflicted");
                // Applied and re-observed before the sidecar moves: nothing more to send.
                let after = plan(&with_status(r.clone(), &p), &Observed::Dell(obs.clone())).expect("plan");
                prop_assert!(after.writes.is_empty(), "wrote again: {:?}", after.writes);
            }
            r = with_status(r, &p);
            let g = &mut obs.groups[0];
            match event {
                0 | 1 => sidecar_finish(g, &t, ok, fresh),
                2 if !g.spec.action.is_empty() => {
                    g.status.as_mut().expect("st").state =
                        format!("{}_IN_PROGRESS", g.spec.action);
                    bump_rv(g);
                }
                3 => {
                    g.status.as_mut().expect("st").replication_link_state.last_successful_update = Some(t.clone());
                    bump_rv(g);
                }
                4 => {
                    // The peer or the array moves the link.
                    let link = &mut g.status.as_mut().expect("st").replication_link_state;
                    link.state = ["SYNCHRONIZED", "SUSPENDED", "FAILEDOVER"][pick].into();
                    link.last_successful_update = Some(t.clone());
                    bump_rv(g);
                }
                5 => {
                    // The user changes the desired state (a new transition).
                    desired = states[pick];
                    let mut v = vgr(desired, auto, true);
                    v.metadata.generation = Some(r.subject.generation + 1);
                    let status = r.subject.status.clone();
                    r.subject = grp(&v);
                    r.subject.status = status;
                }
                _ => {}
            }
        }
    }

    /// Dell: with a cooperative sidecar and peer, every desired state converges
    /// and then plans nothing.
    #[test]
    fn dell_converges_and_then_plans_nothing(
        desired in any_state(),
        auto in any::<bool>(),
        start_source in any::<bool>(),
        start_link in prop::sample::select(vec!["SYNCHRONIZED", "SYNC_IN_PROGRESS", "SUSPENDED", "FAILEDOVER"]),
    ) {
        prop_assume!(!(desired == ReplicationState::Resync && start_source));
        let mut r = dell_req(desired, auto);
        let mut obs = DellObserved { groups: vec![rg_named("rg-1", start_source, start_link)] };
        let mut done = false;
        for i in 0..8i64 {
            let t = at(i * 10 + 1);
            r.now = t.clone();
            let p = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
            prop_assert!(p.rejection.is_none(), "{:?}", p.rejection);
            r = with_status(r, &p);
            apply_dell(&mut obs, &p.writes);
            sidecar_finish(&mut obs.groups[0], &t, true, true);
            // The cooperative peer: reprotects after our planned failover, and syncs.
            let link = &mut obs.groups[0].status.as_mut().expect("st").replication_link_state;
            if !link.is_source && link.state == "FAILEDOVER" || link.state == "SYNC_IN_PROGRESS" {
                link.state = "SYNCHRONIZED".into();
                link.last_successful_update = Some(t.clone());
            }
            if link.state == "SUSPENDED" && !(auto || desired != ReplicationState::Secondary || link.is_source) {
                // Left suspended on purpose: reported as degraded, not driven.
                done = true;
                break;
            }
            let st = &r.subject.status;
            if p.writes.is_empty() && st.conditions.iter().any(|c| c.type_ == ctypes::COMPLETED && c.status == "True")
                && st.conditions.iter().any(|c| c.type_ == ctypes::DEGRADED && c.status == "False") {
                done = true;
                break;
            }
        }
        prop_assert!(done, "did not converge: {:?} {:?}", r.subject.status, obs.groups[0].status);
        r.now = at(1000);
        let p = plan(&r, &Observed::Dell(obs.clone())).expect("plan");
        let p2 = plan(&with_status(r.clone(), &p), &Observed::Dell(obs)).expect("plan");
        prop_assert!(p2.is_noop(), "{:?}", p2);
    }

    /// Ceph plans never write and never touch status, whatever the parameters.
    #[test]
    fn ceph_never_writes(
        desired in any_state(),
        params in prop::collection::btree_map("[a-zA-Z]{1,20}", "[a-z0-9:]{0,8}", 0..6),
        group in any::<bool>(),
        external in any::<bool>(),
    ) {
        let subject = if group { grp(&vgr(desired, false, external)) } else { vol(&vr("p", desired, false, "")) };
        let mut c = class("c", "rbd.csi.ceph.com", &[]);
        c.parameters = params;
        let p = plan(&req(subject, c, vec![]), &Observed::Nothing).expect("plan");
        prop_assert!(p.writes.is_empty());
        prop_assert!(p.status.is_none());
        prop_assert_eq!(p.events.is_empty(), p.rejection.is_none());
    }
}

/// The partial-group refusal names one PVC or several and the fix for the object refused.
#[test]
fn dell_partial_group_wording_fits_the_object_and_the_count() {
    let params = [("remoteSystem", "RT-B"), ("rpo", "Five_Minutes")];
    let obs = Observed::Dell(DellObserved {
        groups: vec![rg_named("rg-1", true, "SYNCHRONIZED")],
    });
    let refusal = |subject: Subject, class_name: &str, pvcs: Vec<PvcInfo>| {
        plan(&req(subject, class(class_name, DELL, &params), pvcs), &obs)
            .expect("plan")
            .rejection
            .expect("refused")
    };
    // A VolumeReplication of one PVC of a two-PVC group: the fix is a group.
    let r = refusal(
        vol(&vr("a", ReplicationState::Primary, false, "")),
        "vrc",
        dell_pvcs(&["a", "b"]),
    );
    let Rejection::PartialProtectionGroup {
        subject,
        ref group,
        ref others,
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!((subject, group.as_str()), (SubjectKind::Volume, "rg-1"));
    assert_eq!(others, &["b"]);
    let text = r.to_string();
    assert!(text.contains("PVC b;"), "{text}");
    assert!(!text.contains("PVCs"), "{text}");
    assert!(text.contains("with a VolumeGroupReplication"), "{text}");
    assert_eq!(r.kind(), RejectionKind::Pvc);

    // A VolumeGroupReplication leaving two out: plural, and the fix is its selector.
    let mut pvcs = dell_pvcs(&["a"]);
    pvcs.push(pvc("c", DELL, &[(dell::RG_LABEL, "rg-1")], &[]));
    pvcs.push(pvc("b", DELL, &[(dell::RG_LABEL, "rg-1")], &[]));
    let r = refusal(
        grp(&vgr(ReplicationState::Primary, false, true)),
        "vgrc",
        pvcs,
    );
    let Rejection::PartialProtectionGroup {
        subject,
        ref others,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(subject, SubjectKind::Group);
    assert_eq!(others, &["b", "c"]);
    let text = r.to_string();
    assert!(
        text.contains("PVCs b, c that this VolumeGroupReplication"),
        "{text}"
    );
    assert!(
        text.contains("spec.source.selector to select them"),
        "{text}"
    );
    assert!(!text.contains("(a VolumeGroupReplication)"), "{text}");

    // One left out of a group: singular.
    let mut pvcs = dell_pvcs(&["a"]);
    pvcs.push(pvc("b", DELL, &[(dell::RG_LABEL, "rg-1")], &[]));
    let r = refusal(
        grp(&vgr(ReplicationState::Primary, false, true)),
        "vgrc",
        pvcs,
    );
    let text = r.to_string();
    assert!(
        text.contains("PVC b that this VolumeGroupReplication"),
        "{text}"
    );
    assert!(text.contains("select it too"), "{text}");
}

/// A selected PVC the Dell sidecar has not labelled yet waits: the group keeps its
/// state and Completed for its labelled members (RamenDR still accepts it), the
/// message names the PVC, and it joins once labelled, without a verb.
#[test]
fn dell_unlabelled_new_pvc_is_pending_not_refused() {
    let obs = Observed::Dell(DellObserved {
        groups: vec![rg_named("rg-1", true, "SYNCHRONIZED")],
    });
    let r = dell_req(ReplicationState::Primary, false);
    let p = plan(&r, &obs).expect("plan");
    let r = with_status(r, &p);
    assert!(conditions::ramen_accepts_primary(&r.subject.status, 1));

    let mut r = r;
    r.pvcs.push(pvc("c", DELL, &[("app", "shop")], &[]));
    let p = plan(&r, &obs).expect("plan");
    assert_eq!(p.rejection, None);
    assert!(p.writes.is_empty(), "no verb for a pending PVC");
    let Some(SubjectStatus::Group(g)) = &p.status else {
        panic!("{:?}", p.status)
    };
    assert!(
        conditions::ramen_accepts_primary(&g.replication, 1),
        "{g:?}"
    );
    assert_eq!(g.replication.state, Some(ReplicatedState::Primary));
    let refs: Vec<&str> = g
        .persistent_volume_claims_ref_list
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        refs,
        ["a", "b"],
        "members are what the protection group holds"
    );
    let completed = cond(&p, ctypes::COMPLETED).expect("completed");
    assert_eq!(
        (completed.status.as_str(), completed.reason.as_str()),
        ("True", reasons::PROMOTED)
    );
    let validated = cond(&p, ctypes::VALIDATED).expect("validated");
    assert_eq!(validated.status, "True");
    assert!(
        g.replication
            .message
            .contains("PVC c not yet in protection group rg-1"),
        "{}",
        g.replication.message
    );
    let pending: Vec<&Event> = p
        .events
        .iter()
        .filter(|e| e.reason == dell::PENDING_EVENT_REASON)
        .collect();
    assert_eq!(pending.len(), 1, "{:?}", p.events);
    assert!(
        pending[0].message.contains("PVC c "),
        "{}",
        pending[0].message
    );
    // The next reconcile of the same wait: nothing changes, no second event.
    let r = with_status(r, &p);
    let p = plan(&r, &obs).expect("plan");
    assert!(p.is_noop(), "{p:?}");

    // Two pending: plural, and the event says so once more.
    let mut r2 = r.clone();
    r2.pvcs.push(pvc("d", DELL, &[("app", "shop")], &[]));
    let p = plan(&r2, &obs).expect("plan");
    let msg = &p.status.as_ref().expect("status").replication().message;
    assert!(
        msg.contains("PVCs c, d not yet in protection group rg-1"),
        "{msg}"
    );
    assert!(
        p.events
            .iter()
            .any(|e| e.reason == dell::PENDING_EVENT_REASON)
    );

    // Labelled: it joins, the note goes, still no verb.
    let mut r = r;
    r.pvcs
        .iter_mut()
        .find(|p| p.name == "c")
        .expect("c")
        .labels
        .insert(dell::RG_LABEL.into(), "rg-1".into());
    let p = plan(&r, &obs).expect("plan");
    assert!(p.writes.is_empty());
    let Some(SubjectStatus::Group(g)) = &p.status else {
        panic!("{:?}", p.status)
    };
    let refs: Vec<&str> = g
        .persistent_volume_claims_ref_list
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(refs, ["a", "b", "c"]);
    assert!(
        !g.replication.message.contains("not yet"),
        "{}",
        g.replication.message
    );
    assert!(conditions::ramen_accepts_primary(&g.replication, 1));

    // A requested transition is not held back by a pending PVC (a failover must not wait
    // on a PVC Dell may never label): the verb goes to the protection group as it is.
    let mut r3 = dell_req(ReplicationState::Secondary, false);
    r3.pvcs.push(pvc("c", DELL, &[("app", "shop")], &[]));
    let p = plan(&r3, &obs).expect("plan");
    assert_eq!(dell_verbs(&p), ["FAILOVER_REMOTE"]);
    let msg = &p.status.as_ref().expect("status").replication().message;
    assert!(
        msg.contains("PVC c not yet in protection group rg-1"),
        "{msg}"
    );

    // No labelled member at all: no group to report, the PVC is refused.
    let r = req(
        grp(&vgr(ReplicationState::Primary, false, true)),
        dell_class(),
        vec![pvc("c", DELL, &[("app", "shop")], &[])],
    );
    let p = plan(&r, &obs).expect("plan");
    assert!(
        matches!(p.rejection, Some(Rejection::NotInProtectionGroup { ref pvc, .. }) if pvc == "c"),
        "{:?}",
        p.rejection
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Dell: selected PVCs the sidecar has not labelled yet change nothing but the message
    /// (and one event): same verb, same refusal, same state and conditions, members are
    /// the labelled PVCs; and the note's event is not repeated by the next reconcile.
    #[test]
    fn dell_pending_pvcs_change_only_the_message(
        desired in any_state(),
        auto in any::<bool>(),
        is_source in any::<bool>(),
        link in any_link(),
        state in any_rg_state(),
        pending in 1usize..4,
    ) {
        let mut g = rg_named("rg-1", is_source, &link);
        g.status.as_mut().expect("st").state = state;
        let obs = Observed::Dell(DellObserved { groups: vec![g] });
        let base = dell_req(desired, auto);
        let mut with = base.clone();
        let names: Vec<String> = (0..pending).map(|i| format!("new{i}")).collect();
        for n in &names {
            with.pvcs.push(pvc(n, DELL, &[("app", "shop")], &[]));
        }
        let p0 = plan(&base, &obs).expect("plan");
        let p1 = plan(&with, &obs).expect("plan");
        prop_assert_eq!(&p1.writes, &p0.writes);
        prop_assert_eq!(&p1.rejection, &p0.rejection);
        let (Some(SubjectStatus::Group(s0)), Some(SubjectStatus::Group(s1))) = (&p0.status, &p1.status) else {
            return Err(TestCaseError::fail(format!("{:?} / {:?}", p0.status, p1.status)));
        };
        prop_assert_eq!(&s1.replication.state, &s0.replication.state);
        prop_assert_eq!(&s1.replication.conditions, &s0.replication.conditions);
        prop_assert_eq!(&s1.persistent_volume_claims_ref_list, &s0.persistent_volume_claims_ref_list);
        if p0.rejection.is_none() {
            let refs: Vec<&str> = s1.persistent_volume_claims_ref_list.iter().map(|r| r.name.as_str()).collect();
            prop_assert_eq!(refs, ["a", "b"]);
            for n in &names {
                prop_assert!(s1.replication.message.contains(n.as_str()), "{}", s1.replication.message);
            }
            let waits = |p: &Plan| p.events.iter().filter(|e| e.reason == dell::PENDING_EVENT_REASON).count();
            prop_assert_eq!(waits(&p1), 1);
            let again = plan(&with_status(with.clone(), &p1), &obs).expect("plan");
            prop_assert_eq!(waits(&again), 0);
        }
    }
}
