//! The replication controller end to end against fake-kube with the real CRDs and the simulated
//! Trident mirror controller and Dell replication sidecar: per backend new primary, new
//! secondary, planned and unplanned failover, failback with resync, groups (a failing member,
//! members joining and leaving), deletion cleanup, a restart mid-transition, two replicas,
//! and the bad inputs of the issue (each: a condition with an actionable reason, an event, no
//! backend write).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cbt_k8s::replication::controller::testing::{self, Running};
use cbt_k8s::replication::controller::{
    Config, Context, FINALIZER, Leadership, Metrics, OWNER_UID_LABEL, Verdict, leader,
    reconcile_once,
};
use cbt_k8s::replication::translate::SubjectKind;
use cbt_k8s::replication::translate::conditions::{ramen_accepts_primary, ramen_accepts_secondary};
use cbt_k8s::replication::translate::dell::PENDING_EVENT_REASON;
use cbt_k8s::replication::types::{
    PVC_VGR_ANNOTATION, PVC_VGR_FINALIZER, PVC_VR_ANNOTATION, PVC_VR_FINALIZER, ReplicatedState,
    VolumeGroupReplicationContent, VolumeGroupReplicationContentStatus,
    VolumeGroupReplicationStatus, VolumeReplicationStatus,
};
use cbt_k8s::{ClusterTarget, connect};
use fake_kube::FakeKube;
use fake_kube::rbac::UserInfo;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

const NS: &str = "app";
const TRIDENT: &str = "csi.trident.netapp.io";
const DELL: &str = "csi-powerstore.dellemc.com";
const VR_API: &str = "replication.storage.openshift.io/v1alpha1";
const TMR_API: &str = "trident.netapp.io/v1";
const RG_API: &str = "replication.storage.dell.com/v1";
const RG_LABEL: &str = "replication.storage.dell.com/replicationGroupName";

struct Env {
    fake: FakeKube,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

async fn env() -> Env {
    env_with(FakeKube::builder()).await
}

async fn env_with(builder: fake_kube::FakeKubeBuilder) -> Env {
    let fake = builder.replication_api().start().await.unwrap();
    fake.seed_namespace(NS).unwrap();
    fake.seed_storage_class("ontap", TRIDENT, false).unwrap();
    fake.seed_storage_class("powerstore", DELL, false).unwrap();
    fake.seed_storage_class("other", "ebs.csi.aws.com", false)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    fake.write_kubeconfig(&kubeconfig, "test").unwrap();
    Env {
        fake,
        _dir: dir,
        kubeconfig,
    }
}

impl Env {
    /// A kubeconfig for the user of `token`.
    fn kubeconfig_as(&self, token: &str) -> PathBuf {
        let p = self.kubeconfig.with_extension(token);
        self.fake.write_kubeconfig_as(&p, "test", token).unwrap();
        p
    }

    async fn client(&self) -> kube::Client {
        connect(&ClusterTarget {
            kubeconfig: Some(self.kubeconfig.clone()),
            context: None,
        })
        .await
        .unwrap()
        .client
    }

    async fn ctx(&self, config: Config) -> Arc<Context> {
        testing::context(&self.kubeconfig, config, Leadership::always())
            .await
            .unwrap()
    }

    fn pvc(&self, name: &str, class: &str, labels: Value) {
        self.fake
            .create(json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "namespace": NS, "labels": labels},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                         "resources": {"requests": {"storage": "1Gi"}}},
            }))
            .unwrap();
    }

    fn vrc(&self, name: &str, provisioner: &str, params: Value) {
        self.class("VolumeReplicationClass", name, provisioner, params);
    }

    fn vgrc(&self, name: &str, provisioner: &str, params: Value) {
        self.class("VolumeGroupReplicationClass", name, provisioner, params);
    }

    fn class(&self, kind: &str, name: &str, provisioner: &str, params: Value) {
        self.fake
            .create(json!({
                "apiVersion": VR_API, "kind": kind, "metadata": {"name": name},
                "spec": {"provisioner": provisioner, "parameters": params},
            }))
            .unwrap();
    }

    fn vr(&self, name: &str, class: &str, pvc: &str, state: &str, handle: &str) {
        self.fake
            .create(json!({
                "apiVersion": VR_API, "kind": "VolumeReplication",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"volumeReplicationClass": class, "replicationState": state,
                         "dataSource": {"kind": "PersistentVolumeClaim", "name": pvc},
                         "autoResync": false, "replicationHandle": handle},
            }))
            .unwrap();
    }

    /// An external VolumeGroupReplication of `class` selecting the PVCs labelled `app=<app>`.
    fn vgr(&self, name: &str, class: &str, app: &str, state: &str) {
        self.vgr_with(name, class, app, state, json!({}));
    }

    /// [`Self::vgr`] with more spec fields.
    fn vgr_with(&self, name: &str, class: &str, app: &str, state: &str, more: Value) {
        let mut spec = json!({"volumeGroupReplicationClassName": class, "replicationState": state,
            "source": {"selector": {"matchLabels": {"app": app}}}, "autoResync": false,
            "external": true});
        for (k, v) in more.as_object().unwrap() {
            spec[k] = v.clone();
        }
        self.fake
            .create(json!({
                "apiVersion": VR_API, "kind": "VolumeGroupReplication",
                "metadata": {"name": name, "namespace": NS}, "spec": spec,
            }))
            .unwrap();
    }

    /// Merges `labels` into those of PVC `name` (a null value removes the label).
    fn label_pvc(&self, name: &str, labels: Value) {
        self.fake
            .merge_patch(
                "v1",
                "PersistentVolumeClaim",
                NS,
                name,
                &json!({"metadata": {"labels": labels}}),
            )
            .unwrap();
    }

    /// Deletes the csi-addons object `kind` `name` and waits until it is gone (our finalizer
    /// released).
    async fn delete_and_wait(&self, kind: &str, name: &str) {
        self.fake.delete(VR_API, kind, NS, name).unwrap();
        until(&format!("{kind} {name} gone"), || {
            self.get(VR_API, kind, name).is_none()
        })
        .await;
    }

    fn set_state(&self, kind: &str, name: &str, patch: Value) {
        self.fake
            .merge_patch(VR_API, kind, NS, name, &json!({"spec": patch}))
            .unwrap();
    }

    fn get(&self, api: &str, kind: &str, name: &str) -> Option<Value> {
        self.fake.get(api, kind, NS, name)
    }

    fn vr_status(&self, name: &str) -> (VolumeReplicationStatus, i64) {
        let o = self.get(VR_API, "VolumeReplication", name).unwrap();
        (
            serde_json::from_value(o["status"].clone()).unwrap_or_default(),
            o["metadata"]["generation"].as_i64().unwrap(),
        )
    }

    fn vgr_status(&self, name: &str) -> (VolumeGroupReplicationStatus, i64) {
        let o = self.get(VR_API, "VolumeGroupReplication", name).unwrap();
        (
            serde_json::from_value(o["status"].clone()).unwrap_or_default(),
            o["metadata"]["generation"].as_i64().unwrap(),
        )
    }

    fn events(&self) -> Vec<(String, String, String)> {
        self.fake
            .list("v1", "Event")
            .into_iter()
            .map(|e| {
                (
                    e["involvedObject"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    e["reason"].as_str().unwrap_or("").to_string(),
                    e["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    fn tmr_state(&self, name: &str) -> (String, String) {
        let t = self
            .get(TMR_API, "TridentMirrorRelationship", name)
            .unwrap();
        (
            t["spec"]["state"].as_str().unwrap_or("").to_string(),
            t["status"]["conditions"][0]["state"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    }

    fn local_handle(&self, tmr: &str) -> String {
        self.get(TMR_API, "TridentMirrorRelationship", tmr).unwrap()["status"]["conditions"][0]
            ["localVolumeHandle"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn rg(&self, name: &str, is_source: bool, link: &str, pvcs: &[&str]) {
        self.rg_of(name, ("pg-1", "pg-2"), is_source, link, pvcs);
    }

    /// An RG of protection group `pgs.0` replicating to `pgs.1`, with its PVCs.
    fn rg_of(&self, name: &str, pgs: (&str, &str), is_source: bool, link: &str, pvcs: &[&str]) {
        self.fake
            .create(json!({
                "apiVersion": RG_API, "kind": "DellCSIReplicationGroup",
                "metadata": {"name": name},
                "spec": {"driverName": DELL, "action": "", "remoteClusterId": "self",
                         "protectionGroupId": pgs.0, "remoteProtectionGroupId": pgs.1,
                         "protectionGroupAttributes": {"remoteSystemName": "PS-B"}},
            }))
            .unwrap();
        self.fake.set_status(
            RG_API,
            "DellCSIReplicationGroup",
            "",
            name,
            json!({"state": "Ready", "replicationLinkState": {"state": link, "isSource": is_source}}),
        );
        for p in pvcs {
            self.pvc(p, "powerstore", json!({RG_LABEL: name, "app": "pg"}));
        }
    }
}

const VR: SubjectKind = SubjectKind::Volume;
const VGR: SubjectKind = SubjectKind::Group;
const PRIMARY: bool = true;
const SECONDARY: bool = false;

impl Env {
    /// Whether RamenDR accepts `name` as primary (or secondary) now.
    fn accepts(&self, kind: SubjectKind, name: &str, primary: bool) -> bool {
        let (s, g) = match kind {
            SubjectKind::Volume => self.vr_status(name),
            SubjectKind::Group => {
                let (s, g) = self.vgr_status(name);
                (s.replication, g)
            }
        };
        if primary {
            ramen_accepts_primary(&s, g)
        } else {
            ramen_accepts_secondary(&s, g)
        }
    }

    /// Waits until RamenDR accepts `name` as primary (or secondary).
    async fn accepted(&self, kind: SubjectKind, name: &str, primary: bool) {
        let role = if primary { "primary" } else { "secondary" };
        let what = format!("{} {name} accepted as {role}", kind.kind());
        until(&what, || self.accepts(kind, name, primary)).await;
    }

    /// Waits until an Event `(object, reason, message)` satisfies `f`.
    async fn event(&self, what: &str, f: impl Fn(&(String, String, String)) -> bool) {
        until(what, || self.events().iter().any(&f)).await;
    }

    /// Sets `spec.replicationState` of `name`.
    fn desire(&self, kind: SubjectKind, name: &str, state: &str) {
        self.set_state(kind.kind(), name, json!({"replicationState": state}));
    }

    /// Waits until `name` is `Degraded=True` with `needle` in the message.
    async fn degraded(&self, kind: SubjectKind, name: &str, needle: &str) {
        let status = || match kind {
            SubjectKind::Volume => self.vr_status(name).0,
            SubjectKind::Group => self.vgr_status(name).0.replication,
        };
        until(&format!("{name} degraded: {needle}"), || {
            cond(&status(), "Degraded").is_some_and(|(st, _, m)| st == "True" && m.contains(needle))
        })
        .await;
    }

    /// A PVC of the `ontap` class and its VolumeReplication of class `trident`, both `name`.
    fn trident_volume(&self, name: &str, state: &str, handle: &str) {
        self.pvc(name, "ontap", json!({}));
        self.vr(name, "trident", name, state, handle);
    }
}

fn fast() -> Config {
    let mut c = Config::new(vec![TRIDENT.into(), DELL.into()]);
    c.retry_base = Duration::from_millis(50);
    c.retry_max = Duration::from_millis(400);
    c.conflict_retry = Duration::from_millis(20);
    c.resync = Duration::from_secs(2);
    c
}

fn cond<'a>(s: &'a VolumeReplicationStatus, t: &str) -> Option<(&'a str, &'a str, &'a str)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

/// Polls until `f` holds (10 s at most; the simulated backends act within milliseconds).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn trident_env_classes(e: &Env) {
    e.vrc(
        "trident",
        TRIDENT,
        json!({"replicationPolicy": "MirrorAllSnapshots", "replicationSchedule": "5min"}),
    );
}

/// The class `trident-group`, and PVCs labelled `app=pg` bound to Trident volumes:
/// `(pvc, volume handle)`.
fn trident_group_members(e: &Env, members: &[(&str, &str)]) {
    e.vgrc("trident-group", TRIDENT, json!({}));
    for (pvc, handle) in members {
        e.bound_pvc(pvc, "ontap", TRIDENT, handle, json!({"app": "pg"}));
    }
}

// ---------------------------------------------------------------------------
// Trident
// ---------------------------------------------------------------------------

#[tokio::test]
async fn trident_new_primary_creates_a_promoted_relationship_and_reports_primary() {
    let e = env().await;
    trident_env_classes(&e);
    e.trident_volume("data", "primary", "");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VR, "data", PRIMARY).await;
    let tmr = e.get(TMR_API, "TridentMirrorRelationship", "data").unwrap();
    assert_eq!(tmr["spec"]["state"], "promoted");
    assert_eq!(tmr["spec"]["volumeMappings"][0]["localPVCName"], "data");
    assert_eq!(tmr["spec"]["replicationPolicy"], "MirrorAllSnapshots");
    assert_eq!(
        tmr["metadata"]["annotations"]["replication.cbt.io/owner"],
        "VolumeReplication/app/data"
    );
    assert!(tmr["metadata"]["labels"][OWNER_UID_LABEL].is_string());
    let (s, _) = e.vr_status("data");
    assert_eq!(s.state.map(|s| s.as_str()), Some("Primary"));
    assert_eq!(cond(&s, "Completed").unwrap().1, "Promoted");
    let vr = e.get(VR_API, "VolumeReplication", "data").unwrap();
    assert!(
        vr["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .contains(&json!(FINALIZER))
    );
    let pvc = e.get("v1", "PersistentVolumeClaim", "data").unwrap();
    assert_eq!(
        pvc["metadata"]["annotations"][PVC_VR_ANNOTATION],
        "data/app"
    );
    assert_eq!(pvc["metadata"]["finalizers"], json!([PVC_VR_FINALIZER]));
    e.event("creation event", |(o, r, _)| {
        o == "data" && r == "CreatedMirrorRelationship"
    })
    .await;
    ctl.stop().await;
}

#[tokio::test]
async fn trident_new_secondary_establishes_with_the_remote_handle() {
    let e = env().await;
    trident_env_classes(&e);
    e.trident_volume("data", "secondary", "svm1:trident_app_data");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VR, "data", SECONDARY).await;
    let tmr = e.get(TMR_API, "TridentMirrorRelationship", "data").unwrap();
    assert_eq!(tmr["spec"]["state"], "established");
    assert_eq!(
        tmr["spec"]["volumeMappings"][0]["remoteVolumeHandle"],
        "svm1:trident_app_data"
    );
    assert_eq!(
        e.vr_status("data").0.state.map(|s| s.as_str()),
        Some("Secondary")
    );
    ctl.stop().await;
}

/// Site A primary, site B secondary; planned failover (A demoted, B promoted), then failback
/// with resync (B demoted with a reestablish that overwrites B, A promoted).
#[tokio::test]
async fn trident_planned_failover_and_failback_across_two_clusters() {
    let a = env().await;
    let b = env().await;
    for e in [&a, &b] {
        trident_env_classes(e);
        e.pvc("data", "ontap", json!({}));
    }
    a.vr("data", "trident", "data", "primary", "");
    let ctl_a = Running::start(a.ctx(fast()).await);
    a.accepted(VR, "data", PRIMARY).await;
    let a_handle = a.local_handle("data");
    b.vr("data", "trident", "data", "secondary", &a_handle);
    let ctl_b = Running::start(b.ctx(fast()).await);
    b.accepted(VR, "data", SECONDARY).await;
    let b_handle = b.local_handle("data");

    // Planned failover: demote A (it learns B's handle), then promote B.
    a.set_state(
        "VolumeReplication",
        "data",
        json!({"replicationState": "secondary", "replicationHandle": b_handle}),
    );
    a.accepted(VR, "data", SECONDARY).await;
    assert_eq!(a.tmr_state("data").0, "reestablished");
    b.desire(VR, "data", "primary");
    b.accepted(VR, "data", PRIMARY).await;
    assert_eq!(b.tmr_state("data"), ("promoted".into(), "promoted".into()));

    // Failback with resync: B back to secondary (reestablished: overwritten from A), A primary.
    b.desire(VR, "data", "secondary");
    b.accepted(VR, "data", SECONDARY).await;
    assert_eq!(b.tmr_state("data").0, "reestablished");
    assert!(
        b.events()
            .iter()
            .any(|(_, r, m)| r == "UpdatedMirrorRelationship" && m.contains("overwrites"))
    );
    a.desire(VR, "data", "primary");
    a.accepted(VR, "data", PRIMARY).await;
    ctl_a.stop().await;
    ctl_b.stop().await;
}

/// Unplanned failover: the secondary is promoted while the primary site is gone; when it comes
/// back it is demoted with autoResync and resyncs from the new primary.
#[tokio::test]
async fn trident_unplanned_failover_then_resync_of_the_old_primary() {
    let e = env().await;
    trident_env_classes(&e);
    e.trident_volume("data", "secondary", "svm1:trident_app_data");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VR, "data", SECONDARY).await;
    e.desire(VR, "data", "primary");
    e.accepted(VR, "data", PRIMARY).await;
    assert_eq!(e.tmr_state("data"), ("promoted".into(), "promoted".into()));
    e.set_state(
        "VolumeReplication",
        "data",
        json!({"replicationState": "secondary", "autoResync": true}),
    );
    e.accepted(VR, "data", SECONDARY).await;
    assert_eq!(
        e.tmr_state("data"),
        ("reestablished".into(), "reestablished".into())
    );
    // A resync of the reestablished destination: one transfer now.
    e.desire(VR, "data", "resync");
    until("resync transfer", || {
        let (s, g) = e.vr_status("data");
        ramen_accepts_secondary(&s, g) && s.last_sync_time.is_some()
    })
    .await;
    assert_eq!(e.fake.list(TMR_API, "TridentActionMirrorUpdate").len(), 1);
    ctl.stop().await;
}

/// A group of three: one member fails to promote -> Degraded naming it, nothing reported as
/// done; when the fault clears the group converges.
#[tokio::test]
async fn trident_group_of_three_with_one_member_failing_to_promote() {
    let e = env().await;
    e.vgrc("trident-group", TRIDENT, json!({}));
    for p in ["pg-data", "pg-wal", "pg-config"] {
        e.pvc(p, "ontap", json!({"app": "pg"}));
    }
    let sim = e.fake.replication().unwrap();
    sim.fail_trident_promotion(NS, "pg-wal", true);
    e.vgr("pg", "trident-group", "pg", "primary");
    let ctl = Running::start(e.ctx(fast()).await);
    e.degraded(VGR, "pg", "pg-wal").await;
    let (s, g) = e.vgr_status("pg");
    assert!(!ramen_accepts_primary(&s.replication, g));
    assert_eq!(cond(&s.replication, "Completed").unwrap().0, "False");
    assert_eq!(s.persistent_volume_claims_ref_list.len(), 3);
    e.event("failure event", |(o, r, _)| {
        o == "pg" && r.starts_with("FailedTo")
    })
    .await;
    sim.fail_trident_promotion(NS, "pg-wal", false);
    e.accepted(VGR, "pg", PRIMARY).await;
    for p in ["pg-data", "pg-wal", "pg-config"] {
        assert_eq!(e.tmr_state(p), ("promoted".into(), "promoted".into()));
        let pvc = e.get("v1", "PersistentVolumeClaim", p).unwrap();
        assert_eq!(pvc["metadata"]["annotations"][PVC_VGR_ANNOTATION], "pg/app");
        assert_eq!(pvc["metadata"]["finalizers"], json!([PVC_VGR_FINALIZER]));
    }
    ctl.stop().await;
}

#[tokio::test]
async fn trident_pvcs_join_and_leave_a_group() {
    let e = env().await;
    e.vgrc("trident-group", TRIDENT, json!({}));
    for p in ["pg-data", "pg-wal"] {
        e.pvc(p, "ontap", json!({"app": "pg"}));
    }
    e.vgr("pg", "trident-group", "pg", "primary");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VGR, "pg", PRIMARY).await;
    e.pvc("pg-config", "ontap", json!({"app": "pg"}));
    until("third member", || {
        e.vgr_status("pg").0.persistent_volume_claims_ref_list.len() == 3
            && e.get(TMR_API, "TridentMirrorRelationship", "pg-config")
                .is_some()
    })
    .await;
    // pg-wal leaves: its relationship is deleted (Trident promotes it) and its claim released.
    e.label_pvc("pg-wal", json!({"app": null}));
    until("pg-wal gone", || {
        e.get(TMR_API, "TridentMirrorRelationship", "pg-wal")
            .is_none()
            && e.vgr_status("pg").0.persistent_volume_claims_ref_list.len() == 2
    })
    .await;
    let wal = e.get("v1", "PersistentVolumeClaim", "pg-wal").unwrap();
    assert!(
        wal["metadata"]["annotations"]
            .get(PVC_VGR_ANNOTATION)
            .is_none()
    );
    assert!(
        wal["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
    // Events are recorded after the status write.
    e.event("deletion event", |(_, r, m)| {
        r == "DeletingMirrorRelationship" && m.contains("pg-wal")
    })
    .await;
    e.accepted(VGR, "pg", PRIMARY).await;
    ctl.stop().await;
}

#[tokio::test]
async fn deleting_a_replication_deletes_only_what_it_created() {
    let e = env().await;
    trident_env_classes(&e);
    e.pvc("data", "ontap", json!({}));
    e.pvc("foreign", "ontap", json!({}));
    // A TMR made by hand for another PVC: never ours.
    e.fake
        .create(
            json!({"apiVersion": TMR_API, "kind": "TridentMirrorRelationship",
            "metadata": {"name": "foreign", "namespace": NS},
            "spec": {"state": "promoted", "volumeMappings": [{"localPVCName": "foreign"}]}}),
        )
        .unwrap();
    e.vr("data", "trident", "data", "primary", "");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VR, "data", PRIMARY).await;
    e.delete_and_wait("VolumeReplication", "data").await;
    assert!(
        e.get(TMR_API, "TridentMirrorRelationship", "data")
            .is_none()
    );
    assert!(
        e.get(TMR_API, "TridentMirrorRelationship", "foreign")
            .is_some()
    );
    let pvc = e.get("v1", "PersistentVolumeClaim", "data").unwrap();
    assert!(
        pvc["metadata"]["annotations"]
            .get(PVC_VR_ANNOTATION)
            .is_none()
    );
    assert!(
        pvc["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
    e.event("deletion event", |(_, r, m)| {
        r == "DeletingMirrorRelationship" && m.contains("promotes")
    })
    .await;
    ctl.stop().await;
}

// ---------------------------------------------------------------------------
// Dell
// ---------------------------------------------------------------------------

fn dell_classes(e: &Env) {
    let p = json!({"remoteSystem": "PS-B", "rpo": "Five_Minutes"});
    e.vrc("powerstore", DELL, p.clone());
    e.vgrc("powerstore-group", DELL, p);
}

#[tokio::test]
async fn dell_group_primary_on_the_source_needs_no_verb_and_planned_failover_sends_one() {
    let e = env().await;
    dell_classes(&e);
    e.rg(
        "rg-pg",
        true,
        "SYNCHRONIZED",
        &["pg-data", "pg-wal", "pg-config"],
    );
    e.vgr("pg", "powerstore-group", "pg", "primary");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VGR, "pg", PRIMARY).await;
    let sim = e.fake.replication().unwrap();
    assert!(sim.dell_actions().is_empty());
    // Planned failover from this site: FAILOVER_REMOTE, once.
    e.desire(VGR, "pg", "secondary");
    e.accepted(VGR, "pg", SECONDARY).await;
    assert_eq!(
        sim.dell_actions(),
        vec![("rg-pg".to_string(), "FAILOVER_REMOTE".to_string())]
    );
    e.event("action event", |(o, r, _)| {
        o == "pg" && r == "RequestedAction"
    })
    .await;
    ctl.stop().await;
}

/// On PowerStore the protection group is the unit of replication (Dell's sidecar puts every
/// replicated PVC of the namespace in it and labels it), so the VolumeGroupReplication must
/// select exactly the PVCs of one RG. What a user sees when a PVC joins or leaves:
/// - a labelled PVC not (yet) in the protection group: Validated=False PrerequisiteNotMet
///   naming it and the label, a Warning event, nothing written to the RG; once Dell's sidecar
///   adds it, the group grows with no verb sent;
/// - a PVC unselected while still in the protection group: refused the same way (a failover
///   would move it anyway), the RG untouched; once it leaves the protection group too, the
///   group shrinks with no verb sent, and its claim is released;
/// - the next failover is one verb for the group as it now is.
#[tokio::test]
async fn dell_pvcs_join_and_leave_a_group() {
    let e = env().await;
    dell_classes(&e);
    e.rg("rg-pg", true, "SYNCHRONIZED", &["pg-data", "pg-wal"]);
    e.vgr("pg", "powerstore-group", "pg", "primary");
    let sim = e.fake.replication().unwrap();
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VGR, "pg", PRIMARY).await;
    let members = |e: &Env| -> Vec<String> {
        let mut m: Vec<String> = e
            .vgr_status("pg")
            .0
            .persistent_volume_claims_ref_list
            .into_iter()
            .map(|r| r.name)
            .collect();
        m.sort();
        m
    };
    assert_eq!(members(&e), ["pg-data", "pg-wal"]);
    let rg_before = backend_snapshot(&e);
    let refused = |e: &Env, needle: &str| {
        cond(&e.vgr_status("pg").0.replication, "Validated").is_some_and(|(st, r, m)| {
            st == "False" && r == "PrerequisiteNotMet" && m.contains(needle)
        })
    };

    // Joins: the application labels a new PVC before Dell has put it in the protection group.
    e.bound_pvc(
        "pg-config",
        "powerstore",
        DELL,
        "PS-A/vol-config",
        json!({"app": "pg"}),
    );
    let note = "PVC pg-config not yet in protection group rg-pg";
    until("join pending", || {
        e.vgr_status("pg").0.replication.message.contains(note)
    })
    .await;
    // What RamenDR sees meanwhile: the array's group, its members, and done (the array is
    // still primary); the pending PVC is named in the message and one event.
    assert!(e.accepts(VGR, "pg", PRIMARY));
    let (st, _) = e.vgr_status("pg");
    assert_eq!(st.replication.state, Some(ReplicatedState::Primary));
    assert_eq!(members(&e), ["pg-data", "pg-wal"]);
    assert_eq!(
        cond(&st.replication, "Completed").map(|c| (c.0, c.1)),
        Some(("True", "Promoted"))
    );
    assert_eq!(
        cond(&st.replication, "Validated").map(|c| c.0),
        Some("True")
    );
    assert!(
        st.replication.message.contains(RG_LABEL),
        "{}",
        st.replication.message
    );
    e.event("pending event", |(o, r, m)| {
        o == "pg" && r == PENDING_EVENT_REASON && m.contains("pg-config")
    })
    .await;
    // Selected by the group, it is claimed already, so no other object can take it meanwhile.
    until("pending PVC claimed", || {
        e.get("v1", "PersistentVolumeClaim", "pg-config").unwrap()["metadata"]["annotations"]
            [PVC_VGR_ANNOTATION]
            == format!("pg/{NS}").as_str()
    })
    .await;
    // Not replicated yet, so not in the group's content either.
    let uid = e.get(VR_API, "VolumeGroupReplication", "pg").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let content = format!("vgrcontent-{uid}");
    assert!(e.handles(&content).is_empty(), "{:?}", e.handles(&content));
    assert_eq!(backend_snapshot(&e), rg_before);
    // Dell's sidecar adds it to the protection group: the group takes it, no verb.
    e.label_pvc("pg-config", json!({RG_LABEL: "rg-pg"}));
    until("third member", || {
        members(&e) == ["pg-config", "pg-data", "pg-wal"] && e.accepts(VGR, "pg", PRIMARY)
    })
    .await;
    assert!(!e.vgr_status("pg").0.replication.message.contains(note));
    until("its volume in the content", || {
        e.handles(&content) == ["PS-A/vol-config"]
    })
    .await;
    let pending_events = e
        .events()
        .into_iter()
        .filter(|(o, r, _)| o == "pg" && r == PENDING_EVENT_REASON)
        .count();
    assert_eq!(pending_events, 1, "one event per wait, not per reconcile");
    let config = e.get("v1", "PersistentVolumeClaim", "pg-config").unwrap();
    assert_eq!(
        config["metadata"]["annotations"][PVC_VGR_ANNOTATION],
        format!("pg/{NS}").as_str(),
        "the new member is claimed (csi-addons' `name/namespace`)"
    );

    // Leaves: pg-wal is unselected but still in the protection group.
    e.label_pvc("pg-wal", json!({"app": null}));
    until("partial group refused", || {
        refused(&e, "pg-wal") && refused(&e, "rg-pg")
    })
    .await;
    // One PVC, and the fix for a group: its selector (not "use a VolumeGroupReplication").
    let (_, _, msg) = cond(&e.vgr_status("pg").0.replication, "Validated")
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .unwrap();
    assert!(
        msg.contains("holds PVC pg-wal that this VolumeGroupReplication does not select")
            && msg.contains("spec.source.selector"),
        "{msg}"
    );
    // Still in the protection group, it stays a member (and claimed) until it leaves it.
    assert_eq!(members(&e), ["pg-config", "pg-data", "pg-wal"]);
    let wal = e.get("v1", "PersistentVolumeClaim", "pg-wal").unwrap();
    assert!(
        wal["metadata"]["annotations"]
            .get(PVC_VGR_ANNOTATION)
            .is_some()
    );
    e.event("leave refused event", |(o, r, m)| {
        o == "pg" && r == "PrerequisiteNotMet" && m.contains("pg-wal")
    })
    .await;
    assert_eq!(backend_snapshot(&e), rg_before);
    // It leaves the protection group too: the group shrinks, its claim is released.
    e.label_pvc("pg-wal", json!({RG_LABEL: null}));
    until("pg-wal gone", || {
        members(&e) == ["pg-config", "pg-data"] && e.accepts(VGR, "pg", PRIMARY)
    })
    .await;
    until("pg-wal released", || {
        let wal = e.get("v1", "PersistentVolumeClaim", "pg-wal").unwrap();
        wal["metadata"]["annotations"]
            .get(PVC_VGR_ANNOTATION)
            .is_none()
            && wal["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty)
    })
    .await;
    assert_eq!(backend_snapshot(&e), rg_before);
    assert!(sim.dell_actions().is_empty(), "{:?}", sim.dell_actions());

    // The group as it now is fails over with one verb.
    e.desire(VGR, "pg", "secondary");
    e.accepted(VGR, "pg", SECONDARY).await;
    assert_eq!(
        sim.dell_actions(),
        vec![("rg-pg".to_string(), "FAILOVER_REMOTE".to_string())]
    );
    ctl.stop().await;
}

/// Two clusters on one PowerStore pair: a planned failover of the PostgreSQL group from A to B
/// is one verb on each side (A: FAILOVER_REMOTE, B: REPROTECT_LOCAL), and both sides' RGs and
/// statuses show the move.
#[tokio::test]
async fn dell_planned_failover_across_two_clusters_moves_both_sides() {
    let a = env().await;
    let b = env().await;
    let pvcs = ["pg-data", "pg-wal", "pg-config"];
    a.rg_of("rg-pg", ("pg-a", "pg-b"), true, "SYNCHRONIZED", &pvcs);
    b.rg_of("rg-pg", ("pg-b", "pg-a"), false, "SYNCHRONIZED", &pvcs);
    let (sim_a, sim_b) = (a.fake.replication().unwrap(), b.fake.replication().unwrap());
    sim_a.pair_dell(sim_b);
    for (e, state) in [(&a, "primary"), (&b, "secondary")] {
        dell_classes(e);
        e.vgr("pg", "powerstore-group", "pg", state);
    }
    let ctl_a = Running::start(a.ctx(fast()).await);
    let ctl_b = Running::start(b.ctx(fast()).await);
    until("A primary, B secondary", || {
        a.accepts(VGR, "pg", PRIMARY) && b.accepts(VGR, "pg", SECONDARY)
    })
    .await;
    let link = |e: &Env| {
        let rg = e.get(RG_API, "DellCSIReplicationGroup", "rg-pg").unwrap();
        let l = &rg["status"]["replicationLinkState"];
        (
            l["isSource"].as_bool().unwrap(),
            l["state"].as_str().unwrap().to_string(),
        )
    };
    // Planned failover, as RamenDR orders it: demote A, then promote B.
    a.desire(VGR, "pg", "secondary");
    until("A demoted, B's RG moved with it", || {
        a.accepts(VGR, "pg", SECONDARY) && link(&b) == (true, "FAILEDOVER".into())
    })
    .await;
    b.desire(VGR, "pg", "primary");
    until("B primary, A replicating from it", || {
        b.accepts(VGR, "pg", PRIMARY)
            && link(&b) == (true, "SYNCHRONIZED".into())
            && link(&a) == (false, "SYNCHRONIZED".into())
    })
    .await;
    until("A healthy secondary", || {
        let (s, _) = a.vgr_status("pg");
        a.accepts(VGR, "pg", SECONDARY)
            && cond(&s.replication, "Degraded").is_some_and(|(st, _, _)| st == "False")
    })
    .await;
    assert_eq!(
        sim_a.dell_actions(),
        [("rg-pg".to_string(), "FAILOVER_REMOTE".to_string())]
    );
    assert_eq!(
        sim_b.dell_actions(),
        [("rg-pg".to_string(), "REPROTECT_LOCAL".to_string())]
    );
    ctl_a.stop().await;
    ctl_b.stop().await;
}

/// Unplanned failover to this (target) site: UNPLANNED_FAILOVER_LOCAL then REPROTECT_LOCAL;
/// then failback: planned failover back (REPROTECT is done, FAILOVER_REMOTE), and resync of
/// the secondary (SYNC).
#[tokio::test]
async fn dell_unplanned_failover_failback_and_resync() {
    let e = env().await;
    dell_classes(&e);
    e.rg("rg-1", false, "SYNCHRONIZED", &["vol"]);
    e.vr("vol", "powerstore", "vol", "secondary", "");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VR, "vol", SECONDARY).await;
    e.desire(VR, "vol", "primary");
    e.accepted(VR, "vol", PRIMARY).await;
    let sim = e.fake.replication().unwrap();
    let verbs: Vec<String> = sim.dell_actions().into_iter().map(|(_, v)| v).collect();
    assert_eq!(verbs, ["UNPLANNED_FAILOVER_LOCAL", "REPROTECT_LOCAL"]);
    e.desire(VR, "vol", "secondary");
    e.accepted(VR, "vol", SECONDARY).await;
    // The peer (not simulated) would reprotect; here the link is brought back by hand.
    e.fake.set_status(
        RG_API,
        "DellCSIReplicationGroup",
        "",
        "rg-1",
        json!({"state": "Ready", "replicationLinkState": {"state": "SYNCHRONIZED", "isSource": false}}),
    );
    e.desire(VR, "vol", "resync");
    until("resynced", || {
        let (s, g) = e.vr_status("vol");
        ramen_accepts_secondary(&s, g) && s.observed_generation == g
    })
    .await;
    let verbs: Vec<String> = sim.dell_actions().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        verbs,
        [
            "UNPLANNED_FAILOVER_LOCAL",
            "REPROTECT_LOCAL",
            "FAILOVER_REMOTE",
            "SYNC"
        ]
    );
    ctl.stop().await;
}

/// The controller dies right after sending a verb; a new one must not send it again.
#[tokio::test]
async fn dell_restart_mid_transition_sends_no_verb_twice() {
    let e = env().await;
    dell_classes(&e);
    e.rg("rg-1", false, "SYNCHRONIZED", &["vol"]);
    let sim = e.fake.replication().unwrap();
    sim.set_dell_paused(true);
    e.vr("vol", "powerstore", "vol", "primary", "");
    let ctl = Running::start(e.ctx(fast()).await);
    until("verb requested", || {
        e.fake
            .get(RG_API, "DellCSIReplicationGroup", "", "rg-1")
            .unwrap()["spec"]["action"]
            == "UNPLANNED_FAILOVER_LOCAL"
    })
    .await;
    ctl.kill();
    // A new process, a few reconciles while the sidecar is still away: nothing new is sent.
    let ctx = e.ctx(fast()).await;
    for _ in 0..3 {
        let out = reconcile_once(&ctx, SubjectKind::Volume, NS, "vol")
            .await
            .unwrap();
        assert!(out.plan.writes.is_empty(), "{:?}", out.plan.writes);
    }
    sim.set_dell_paused(false);
    let ctl = Running::start(ctx);
    e.accepted(VR, "vol", PRIMARY).await;
    let verbs: Vec<String> = sim.dell_actions().into_iter().map(|(_, v)| v).collect();
    assert_eq!(verbs, ["UNPLANNED_FAILOVER_LOCAL", "REPROTECT_LOCAL"]);
    ctl.stop().await;
}

// ---------------------------------------------------------------------------
// Replicas and restarts
// ---------------------------------------------------------------------------

/// Trident: killed after creating the relationship, restarted: same objects, converges.
#[tokio::test]
async fn trident_restart_mid_transition_converges_without_duplicates() {
    let e = env().await;
    trident_env_classes(&e);
    e.pvc("data", "ontap", json!({}));
    e.fake.replication().unwrap().set_trident_stuck(true);
    e.vr("data", "trident", "data", "primary", "");
    let ctl = Running::start(e.ctx(fast()).await);
    until("promoting", || {
        e.get(TMR_API, "TridentMirrorRelationship", "data")
            .is_some_and(|t| t["status"]["conditions"][0]["state"] == "promoting")
    })
    .await;
    ctl.kill();
    let uid =
        e.get(TMR_API, "TridentMirrorRelationship", "data").unwrap()["metadata"]["uid"].clone();
    e.fake.replication().unwrap().set_trident_stuck(false);
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VR, "data", PRIMARY).await;
    assert_eq!(
        e.get(TMR_API, "TridentMirrorRelationship", "data").unwrap()["metadata"]["uid"],
        uid
    );
    assert_eq!(e.fake.list(TMR_API, "TridentMirrorRelationship").len(), 1);
    ctl.stop().await;
}

#[tokio::test]
async fn two_replicas_only_the_leader_writes() {
    let e = env_with(
        FakeKube::builder()
            .user("token-a", UserInfo::new("replica-a", &[]))
            .user("token-b", UserInfo::new("replica-b", &[])),
    )
    .await;
    trident_env_classes(&e);
    e.pvc("data", "ontap", json!({}));
    let mut running = Vec::new();
    for (token, id) in [("token-a", "replica-a"), ("token-b", "replica-b")] {
        let leadership = Leadership::elected();
        let ctx = testing::context(&e.kubeconfig_as(token), fast(), leadership.clone())
            .await
            .unwrap();
        let mut lease = leader::LeaseConfig::new(NS, "cbt-replicator", id);
        lease.lease_duration = Duration::from_secs(3);
        lease.retry_period = Duration::from_millis(100);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let hold = tokio::spawn(leader::hold(
            ctx.client.clone(),
            lease,
            leadership,
            stop_rx,
            |_| {},
        ));
        running.push((Running::start(ctx), hold, stop_tx));
    }
    e.vr("data", "trident", "data", "primary", "");
    e.accepted(VR, "data", PRIMARY).await;
    let lease = e
        .get("coordination.k8s.io/v1", "Lease", "cbt-replicator")
        .unwrap();
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let writers: std::collections::BTreeSet<String> = e
        .fake
        .access_log()
        .into_iter()
        .filter(|r| {
            matches!(
                r.attributes.verb.as_str(),
                "create" | "update" | "patch" | "delete"
            ) && r.attributes.resource != "leases"
        })
        .map(|r| r.user)
        .filter(|u| u.starts_with("replica-"))
        .collect();
    assert_eq!(
        writers.into_iter().collect::<Vec<_>>(),
        vec![holder.clone()]
    );
    // The leader stops: the other takes over and serves a new object.
    let idx = if holder == "replica-a" { 0 } else { 1 };
    let (ctl, hold, stop) = running.remove(idx);
    let _ = stop.send(true);
    let _ = hold.await;
    ctl.stop().await;
    e.trident_volume("more", "primary", "");
    e.accepted(VR, "more", PRIMARY).await;
    let lease = e
        .get("coordination.k8s.io/v1", "Lease", "cbt-replicator")
        .unwrap();
    assert_ne!(lease["spec"]["holderIdentity"].as_str().unwrap(), holder);
    for (ctl, hold, stop) in running {
        let _ = stop.send(true);
        let _ = hold.await;
        ctl.stop().await;
    }
}

// ---------------------------------------------------------------------------
// Bad input: a condition with an actionable reason, an event, no backend write
// ---------------------------------------------------------------------------

fn backend_snapshot(e: &Env) -> (Vec<Value>, Vec<Value>) {
    let strip = |mut v: Value| {
        v["status"] = Value::Null;
        v
    };
    (
        e.fake
            .list(TMR_API, "TridentMirrorRelationship")
            .into_iter()
            .map(strip)
            .collect(),
        e.fake
            .list(RG_API, "DellCSIReplicationGroup")
            .into_iter()
            .map(|r| r["spec"].clone())
            .collect(),
    )
}

async fn rejected(e: &Env, kind: SubjectKind, name: &str, needle: &str) {
    let ctx = e.ctx(fast()).await;
    let backend_before = backend_snapshot(e);
    let out = reconcile_once(&ctx, kind, NS, name).await.unwrap();
    assert_eq!(out.result, Verdict::Rejected, "{name}: {:?}", out.plan);
    assert!(out.plan.writes.is_empty());
    let status = match kind {
        SubjectKind::Volume => e.vr_status(name).0,
        SubjectKind::Group => e.vgr_status(name).0.replication,
    };
    let (st, reason, message) = cond(&status, "Validated").unwrap();
    assert_eq!((st, reason), ("False", "PrerequisiteNotMet"), "{name}");
    assert!(
        message.contains(needle),
        "{name}: {message:?} lacks {needle:?}"
    );
    assert!(
        e.events()
            .iter()
            .any(|(o, r, m)| o == name && r == "PrerequisiteNotMet" && m.contains(needle)),
        "{name}: no event: {:?}",
        e.events()
    );
    assert_eq!(
        backend_snapshot(e),
        backend_before,
        "{name}: backend written"
    );
    // Reconciling again changes nothing and repeats no event.
    let before = e.events().len();
    let again = reconcile_once(&ctx, kind, NS, name).await.unwrap();
    assert!(again.plan.is_noop(), "{name}: {:?}", again.plan);
    assert_eq!(e.events().len(), before);
}

#[tokio::test]
async fn bad_inputs_are_reported_and_write_nothing() {
    let e = env().await;
    e.vrc("mystery", "csi.example.com", json!({}));
    e.vrc("trident-nohandle", TRIDENT, json!({}));
    e.vrc("dell-noremote", DELL, json!({"rpo": "Five_Minutes"}));
    e.vrc("dell-norpo", DELL, json!({"remoteSystem": "PS-B"}));
    e.vgrc("trident-group", TRIDENT, json!({}));
    e.pvc("a", "ontap", json!({"app": "mixed"}));
    e.pvc("b", "other", json!({"app": "mixed"}));
    e.pvc("c", "ontap", json!({}));
    e.rg("rg-1", true, "SYNCHRONIZED", &["d"]);

    e.vr("unknown-driver", "mystery", "c", "primary", "");
    rejected(&e, SubjectKind::Volume, "unknown-driver", "csi.example.com").await;
    e.vr("no-class", "does-not-exist", "c", "primary", "");
    rejected(&e, SubjectKind::Volume, "no-class", "does-not-exist").await;
    e.vr("no-handle", "trident-nohandle", "c", "secondary", "");
    rejected(&e, SubjectKind::Volume, "no-handle", "remoteVolumeHandle").await;
    e.vr("no-remote", "dell-noremote", "d", "primary", "");
    rejected(&e, SubjectKind::Volume, "no-remote", "remoteSystem").await;
    e.vr("no-rpo", "dell-norpo", "d", "primary", "");
    rejected(&e, SubjectKind::Volume, "no-rpo", "rpo").await;
    e.vgr("empty", "trident-group", "nothing", "primary");
    rejected(&e, SubjectKind::Group, "empty", "matches no PVC").await;
    e.vgr("mixed", "trident-group", "mixed", "primary");
    rejected(&e, SubjectKind::Group, "mixed", "ebs.csi.aws.com").await;
}

#[tokio::test]
async fn too_many_pvcs_in_a_group_are_refused() {
    let e = env().await;
    e.vgrc("trident-group", TRIDENT, json!({}));
    for i in 0..101 {
        e.pvc(&format!("v{i}"), "ontap", json!({"app": "big"}));
    }
    e.vgr("big", "trident-group", "big", "primary");
    rejected(&e, SubjectKind::Group, "big", "at most 100").await;
}

#[tokio::test]
async fn a_pvc_in_another_replication_is_refused() {
    let e = env().await;
    trident_env_classes(&e);
    e.vgrc("trident-group", TRIDENT, json!({}));
    e.pvc("data", "ontap", json!({"app": "pg"}));
    e.vr("first", "trident", "data", "primary", "");
    let ctx = e.ctx(fast()).await;
    let out = reconcile_once(&ctx, SubjectKind::Volume, NS, "first")
        .await
        .unwrap();
    assert_eq!(out.result, Verdict::InProgress);
    e.vr("second", "trident", "data", "primary", "");
    rejected(&e, SubjectKind::Volume, "second", "already replicated").await;
    e.vgr("group", "trident-group", "pg", "primary");
    let out = reconcile_once(&ctx, SubjectKind::Group, NS, "group")
        .await
        .unwrap();
    assert_eq!(out.result, Verdict::Rejected);
    assert_eq!(e.fake.list(TMR_API, "TridentMirrorRelationship").len(), 1);
}

#[tokio::test]
async fn a_relationship_changed_by_hand_is_reported_not_overwritten() {
    let e = env().await;
    trident_env_classes(&e);
    e.trident_volume("data", "primary", "");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VR, "data", PRIMARY).await;
    ctl.stop().await;
    e.fake
        .merge_patch(
            TMR_API,
            "TridentMirrorRelationship",
            NS,
            "data",
            &json!({"spec": {"replicationSchedule": "1min"}}),
        )
        .unwrap();
    let ctx = e.ctx(fast()).await;
    let out = reconcile_once(&ctx, SubjectKind::Volume, NS, "data")
        .await
        .unwrap();
    assert_eq!(out.result, Verdict::Rejected);
    assert!(out.plan.writes.is_empty());
    let (s, _) = e.vr_status("data");
    assert!(
        cond(&s, "Validated")
            .unwrap()
            .2
            .contains("changed outside cbt-replicator")
    );
    assert_eq!(
        e.get(TMR_API, "TridentMirrorRelationship", "data").unwrap()["spec"]["replicationSchedule"],
        "1min"
    );
}

#[tokio::test]
async fn immutable_fields_and_schema_violations_are_refused_by_the_api() {
    let e = env().await;
    trident_env_classes(&e);
    e.vrc("trident-2", TRIDENT, json!({}));
    e.trident_volume("data", "primary", "");
    let err = e
        .fake
        .merge_patch(
            VR_API,
            "VolumeReplication",
            NS,
            "data",
            &json!({"spec": {"volumeReplicationClass": "trident-2"}}),
        )
        .unwrap_err();
    assert_eq!(err.code, 422);
    let err = e
        .fake
        .create(json!({"apiVersion": VR_API, "kind": "VolumeReplication",
            "metadata": {"name": "bad", "namespace": NS},
            "spec": {"volumeReplicationClass": "trident", "replicationState": "Primary",
                     "dataSource": {"kind": "PersistentVolumeClaim", "name": "data"}}}))
        .unwrap_err();
    assert_eq!(err.code, 422);
    let err = e
        .fake
        .create(json!({"apiVersion": TMR_API, "kind": "TridentMirrorRelationship",
            "metadata": {"name": "two", "namespace": NS},
            "spec": {"state": "promoted", "volumeMappings": [{"localPVCName": "a"}, {"localPVCName": "b"}]}}))
        .unwrap_err();
    assert_eq!(err.code, 422);
}

#[tokio::test]
async fn a_backend_that_never_converges_turns_degraded_with_backoff() {
    let e = env().await;
    trident_env_classes(&e);
    e.pvc("data", "ontap", json!({}));
    e.fake.replication().unwrap().set_trident_stuck(true);
    e.vr("data", "trident", "data", "primary", "");
    let mut config = fast();
    config.converge_timeout = Duration::from_secs(1);
    let ctx = e.ctx(config).await;
    let metrics = ctx.metrics.clone();
    let ctl = Running::start(ctx);
    e.degraded(VR, "data", "not converged").await;
    e.event("NotConverging event", |(o, r, _)| {
        o == "data" && r == "NotConverging"
    })
    .await;
    // Backoff, not a tight loop: a handful of reconciles in a second, not hundreds.
    let n0 = metrics.reconcile_count("VolumeReplication", "not_converging");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n1 = metrics.reconcile_count("VolumeReplication", "not_converging");
    assert!(n1 - n0 <= 5, "{n0} -> {n1}");
    e.fake.replication().unwrap().set_trident_stuck(false);
    e.accepted(VR, "data", PRIMARY).await;
    let (s, _) = e.vr_status("data");
    assert_eq!(cond(&s, "Degraded").unwrap().0, "False");
    ctl.stop().await;
}

#[tokio::test]
async fn trident_resync_of_a_destination_requests_one_mirror_update() {
    let e = env().await;
    trident_env_classes(&e);
    e.trident_volume("data", "secondary", "svm1:trident_app_data");
    let ctx = e.ctx(fast()).await;
    let ctl = Running::start(ctx.clone());
    e.accepted(VR, "data", SECONDARY).await;
    e.desire(VR, "data", "resync");
    until("resynced", || {
        let (s, g) = e.vr_status("data");
        ramen_accepts_secondary(&s, g) && s.last_sync_time.is_some()
    })
    .await;
    let updates = e.fake.list(TMR_API, "TridentActionMirrorUpdate");
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["spec"]["tridentMirrorRelationshipName"], "data");
    ctl.stop().await;
    let out = reconcile_once(&ctx, SubjectKind::Volume, NS, "data")
        .await
        .unwrap();
    assert!(out.plan.is_noop(), "{:?}", out.plan);
}

/// 409s on writes (a status patch, a create that went through but answered Conflict) and 410s
/// on the backend watch: the controller retries from fresh reads and converges, with one TMR.
#[tokio::test]
async fn conflicts_and_stale_watches_are_retried_to_convergence() {
    use fake_kube::HttpFault;
    let e = env().await;
    trident_env_classes(&e);
    e.pvc("data", "ontap", json!({}));
    let faults = e.fake.faults();
    faults.add_http(
        HttpFault::status(409, 2)
            .method("PATCH")
            .path_contains("/volumereplications/data/status"),
    );
    faults.add_http(
        HttpFault::status(409, 1)
            .method("POST")
            .path_contains("/tridentmirrorrelationships")
            .after_processing(),
    );
    faults.add_http(
        HttpFault::status(410, 2)
            .method("GET")
            .path_contains("/tridentmirrorrelationships"),
    );
    e.vr("data", "trident", "data", "primary", "");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VR, "data", PRIMARY).await;
    assert_eq!(e.fake.list(TMR_API, "TridentMirrorRelationship").len(), 1);
    let statuses = e
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/volumereplications/data/status"))
        .count();
    assert!(statuses >= 3, "{statuses}");
    ctl.stop().await;
}

/// Dell: the group's verb fails on the array. The group reports it failed (Degraded, with the
/// error and how to retry) and the verb is not sent again on its own: a one-shot verb is retried
/// only when a person removes the ledger, after which it converges.
#[tokio::test]
async fn dell_group_verb_failure_is_reported_and_retried_only_on_request() {
    let e = env().await;
    dell_classes(&e);
    e.rg(
        "rg-pg",
        false,
        "SYNCHRONIZED",
        &["pg-data", "pg-wal", "pg-config"],
    );
    let sim = e.fake.replication().unwrap();
    sim.fail_dell_action(
        "UNPLANNED_FAILOVER_LOCAL",
        Some("remote system unreachable"),
    );
    e.vgr("pg", "powerstore-group", "pg", "primary");
    let ctl = Running::start(e.ctx(fast()).await);
    e.degraded(VGR, "pg", "remote system unreachable").await;
    let (s, g) = e.vgr_status("pg");
    assert!(!ramen_accepts_primary(&s.replication, g));
    assert!(
        cond(&s.replication, "Completed")
            .unwrap()
            .2
            .contains("dell-actions")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.dell_actions().len(), 1);
    // The array is back and a person asks for a retry.
    sim.fail_dell_action("UNPLANNED_FAILOVER_LOCAL", None);
    e.fake
        .merge_patch(
            RG_API,
            "DellCSIReplicationGroup",
            "",
            "rg-pg",
            &json!({"metadata": {"annotations": {"replication.cbt.io/dell-actions": null}}}),
        )
        .unwrap();
    e.accepted(VGR, "pg", PRIMARY).await;
    let verbs: Vec<String> = sim.dell_actions().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        verbs,
        [
            "UNPLANNED_FAILOVER_LOCAL",
            "UNPLANNED_FAILOVER_LOCAL",
            "REPROTECT_LOCAL"
        ]
    );
    ctl.stop().await;
}

// ---------------------------------------------------------------------------
// VolumeGroupReplicationContent
// ---------------------------------------------------------------------------

impl Env {
    /// A PV of `driver` with CSI handle `handle`, and `pvc` bound to it.
    fn bound_pvc(&self, pvc: &str, class: &str, driver: &str, handle: &str, labels: Value) {
        self.bind(pvc, driver, handle);
        self.fake
            .create(json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": pvc, "namespace": NS, "labels": labels},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                         "volumeName": format!("pv-{pvc}"),
                         "resources": {"requests": {"storage": "1Gi"}}},
            }))
            .unwrap();
    }

    /// Creates the PV `pv-<pvc>` (the PVC, if it exists, is pointed at it).
    fn bind(&self, pvc: &str, driver: &str, handle: &str) {
        self.fake
            .create(json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": format!("pv-{pvc}")},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                         "csi": {"driver": driver, "volumeHandle": handle}},
            }))
            .unwrap();
        if self.get("v1", "PersistentVolumeClaim", pvc).is_some() {
            self.fake
                .merge_patch(
                    "v1",
                    "PersistentVolumeClaim",
                    NS,
                    pvc,
                    &json!({"spec": {"volumeName": format!("pv-{pvc}")}}),
                )
                .unwrap();
        }
    }

    fn content(&self, name: &str) -> Option<Value> {
        self.fake
            .get(VR_API, "VolumeGroupReplicationContent", "", name)
    }

    fn handles(&self, name: &str) -> Vec<String> {
        self.content(name).map_or_else(Vec::new, |c| {
            serde_json::from_value(c["spec"]["source"]["volumeHandles"].clone()).unwrap()
        })
    }

    /// The content's status as (PV ref names, (PV, handle, destination handle) mappings).
    #[allow(clippy::type_complexity)]
    fn content_pvs(&self, name: &str) -> (Vec<String>, Vec<(String, String, Option<String>)>) {
        let Some(c) = self.content(name) else {
            return (Vec::new(), Vec::new());
        };
        let s: VolumeGroupReplicationContentStatus =
            serde_json::from_value(c["status"].clone()).unwrap_or_default();
        (
            s.persistent_volume_ref_list
                .into_iter()
                .map(|r| r.name)
                .collect(),
            s.persistent_volume_mapping_list
                .into_iter()
                .map(|m| (m.name, m.volume_handle, m.destination_volume_handle))
                .collect(),
        )
    }
}

impl Env {
    /// Requests that wrote the status of content `name`.
    fn status_writes(&self, name: &str) -> usize {
        let path = format!("/volumegroupreplicationcontents/{name}/status");
        self.fake
            .requests()
            .iter()
            .filter(|r| r.method != "GET" && r.path.ends_with(&path))
            .count()
    }
}

fn pvs(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_string()).collect()
}

fn mapping(pairs: &[(&str, &str)]) -> Vec<(String, String, Option<String>)> {
    pairs
        .iter()
        .map(|(p, h)| ((*p).to_string(), (*h).to_string(), None))
        .collect()
}

#[tokio::test]
async fn a_group_gets_its_content_kept_current_and_deleted_with_it() {
    let e = env().await;
    trident_group_members(
        &e,
        &[("pg-wal", "svm0:vol_wal"), ("pg-data", "svm0:vol_data")],
    );
    // Pending: no handle yet, so not in the content until bound.
    e.pvc("pg-config", "ontap", json!({"app": "pg"}));
    e.vgr("pg", "trident-group", "pg", "primary");
    let vgr = e.get(VR_API, "VolumeGroupReplication", "pg").unwrap();
    let uid = vgr["metadata"]["uid"].as_str().unwrap().to_string();
    let name = format!("vgrcontent-{uid}");
    let ctl = Running::start(e.ctx(fast()).await);
    until("group primary with its content", || {
        let (s, g) = e.vgr_status("pg");
        ramen_accepts_primary(&s.replication, g) && e.content(&name).is_some()
    })
    .await;
    let c = e.content(&name).unwrap();
    assert_eq!(
        c["metadata"]["annotations"]["replication.storage.openshift.io/volumegroupref"],
        "app/pg"
    );
    assert_eq!(
        c["metadata"]["annotations"]["replication.storage.openshift.io/provisioned-by"],
        TRIDENT
    );
    assert_eq!(
        c["metadata"]["finalizers"],
        json!(["replication.storage.openshift.io/vgr-protection"])
    );
    assert_eq!(c["metadata"]["labels"][OWNER_UID_LABEL], uid.as_str());
    let r = &c["spec"]["volumeGroupReplicationRef"];
    assert_eq!(
        (&r["kind"], &r["name"], &r["namespace"], &r["uid"]),
        (
            &json!("VolumeGroupReplication"),
            &json!("pg"),
            &json!(NS),
            &json!(uid)
        )
    );
    assert_eq!(r["apiVersion"], VR_API);
    assert_eq!(c["spec"]["provisioner"], TRIDENT);
    assert_eq!(
        c["spec"]["volumeGroupReplicationClassName"],
        "trident-group"
    );
    assert_eq!(c["spec"]["volumeGroupReplicationHandle"], "");
    assert_eq!(e.handles(&name), ["svm0:vol_data", "svm0:vol_wal"]);
    // The status names the PVs behind the handles, as csi-addons' content controller does.
    until("content status", || {
        e.content_pvs(&name)
            == (
                pvs(&["pv-pg-data", "pv-pg-wal"]),
                mapping(&[
                    ("pv-pg-data", "svm0:vol_data"),
                    ("pv-pg-wal", "svm0:vol_wal"),
                ]),
            )
    })
    .await;
    // The group names its content, in the spec and the annotation, as csi-addons leaves it.
    let vgr = e.get(VR_API, "VolumeGroupReplication", "pg").unwrap();
    assert_eq!(
        vgr["spec"]["volumeGroupReplicationContentName"],
        name.as_str()
    );
    assert_eq!(
        vgr["metadata"]["annotations"]["replication.storage.openshift.io/volume-group-replication-content-name"],
        name.as_str()
    );

    // A member is bound, another leaves: the handles follow.
    e.bind("pg-config", TRIDENT, "svm0:vol_config");
    until("three handles and PVs", || {
        e.handles(&name) == ["svm0:vol_config", "svm0:vol_data", "svm0:vol_wal"]
            && e.content_pvs(&name).0 == pvs(&["pv-pg-config", "pv-pg-data", "pv-pg-wal"])
    })
    .await;
    // Destination info reported by someone talking to the driver is kept across our writes.
    let mut st = e.content(&name).unwrap()["status"].clone();
    st["persistentVolumeMappingList"][1]["destinationVolumeHandle"] = json!("svm1:vol_data");
    st["destinationVolumeGroupID"] = json!("cg-remote");
    assert!(
        e.fake
            .set_status(VR_API, "VolumeGroupReplicationContent", "", &name, st)
    );
    e.label_pvc("pg-wal", json!({"app": null}));
    until("wal left", || {
        e.handles(&name) == ["svm0:vol_config", "svm0:vol_data"]
            && e.content_pvs(&name).0 == pvs(&["pv-pg-config", "pv-pg-data"])
    })
    .await;
    e.accepted(VGR, "pg", PRIMARY).await;
    assert_eq!(
        e.content_pvs(&name).1,
        vec![
            ("pv-pg-config".into(), "svm0:vol_config".into(), None),
            (
                "pv-pg-data".into(),
                "svm0:vol_data".into(),
                Some("svm1:vol_data".into())
            ),
        ]
    );
    assert_eq!(
        e.content(&name).unwrap()["status"]["destinationVolumeGroupID"],
        "cg-remote"
    );
    // The status is written through the status subresource, which validates it against the
    // real CRD: an entry without its required volumeHandle is refused there.
    let contents = Api::<VolumeGroupReplicationContent>::all(e.client().await);
    let bad = contents
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"persistentVolumeMappingList": [{"name": "pv-x"}]}})),
        )
        .await;
    assert!(matches!(bad, Err(kube::Error::Api(r)) if r.code == 422));
    // A converged group writes nothing more: its own status write (which wakes it through
    // the content watch) starts no loop. Counted as requests: a no-op patch leaves the
    // resourceVersion alone, so that would not show one.
    let writes = e.status_writes(&name);
    assert!(writes >= 3, "{writes} status writes");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(e.status_writes(&name), writes);

    // A restart finds everything in place: nothing is written to the content again.
    ctl.kill();
    let rv = e.content(&name).unwrap()["metadata"]["resourceVersion"].clone();
    let writes = e.status_writes(&name);
    let ctx = e.ctx(fast()).await;
    let out = reconcile_once(&ctx, SubjectKind::Group, NS, "pg")
        .await
        .unwrap();
    assert_eq!(out.result, Verdict::Converged);
    assert_eq!(e.content(&name).unwrap()["metadata"]["resourceVersion"], rv);
    assert_eq!(e.status_writes(&name), writes);
    assert_eq!(
        e.fake.list(VR_API, "VolumeGroupReplicationContent").len(),
        1
    );

    // Deleting the group deletes its content (our finalizer released) before the group goes.
    let ctl = Running::start(ctx);
    e.fake
        .delete(VR_API, "VolumeGroupReplication", NS, "pg")
        .unwrap();
    until("group and content gone", || {
        e.get(VR_API, "VolumeGroupReplication", "pg").is_none() && e.content(&name).is_none()
    })
    .await;
    ctl.stop().await;
}

#[tokio::test]
async fn a_content_name_taken_by_another_group_is_left_alone() {
    let e = env().await;
    trident_group_members(&e, &[("pg-data", "svm0:vol_data")]);
    let taken = json!({
        "apiVersion": VR_API, "kind": "VolumeGroupReplicationContent",
        "metadata": {"name": "shared"},
        "spec": {"provisioner": TRIDENT, "volumeGroupReplicationClassName": "trident-group",
                 "volumeGroupReplicationHandle": "grp-1",
                 "volumeGroupReplicationRef": {"kind": "VolumeGroupReplication",
                     "name": "other", "namespace": "elsewhere", "uid": "0000-other"},
                 "source": {"volumeHandles": ["svm0:vol_other"]}},
    });
    e.fake.create(taken).unwrap();
    e.vgr_with(
        "pg",
        "trident-group",
        "pg",
        "primary",
        json!({"volumeGroupReplicationContentName": "shared"}),
    );
    let before = e.content("shared").unwrap();
    let ctl = Running::start(e.ctx(fast()).await);
    until("warning event", || {
        e.events().iter().any(|(o, r, m)| {
            o == "pg" && r == "VolumeGroupReplicationContentTaken" && m.contains("elsewhere/other")
        })
    })
    .await;
    assert_eq!(e.content("shared").unwrap(), before);
    e.delete_and_wait("VolumeGroupReplication", "pg").await;
    assert_eq!(e.content("shared").unwrap(), before);
    ctl.stop().await;
}

// ---------------------------------------------------------------------------
// Triggers
// ---------------------------------------------------------------------------

fn reconciles(m: &Metrics) -> u64 {
    m.reconcile_total("VolumeReplication")
}

/// A converged VR is reconciled again for a spec change or a change of its PVC, not for a
/// status write (ours, mostly), nor for a change of another PVC.
#[tokio::test]
async fn only_spec_changes_and_its_own_pvc_trigger_a_reconcile() {
    let e = env().await;
    trident_env_classes(&e);
    e.trident_volume("data", "primary", "svm1:trident_app_data");
    e.pvc("other", "ontap", json!({}));
    let mut config = fast();
    config.resync = Duration::from_secs(3600);
    let ctx = e.ctx(config).await;
    let metrics = ctx.metrics.clone();
    let ctl = Running::start(ctx);
    e.accepted(VR, "data", PRIMARY).await;
    // Settled: nothing is scheduled before the resync.
    let quiet = || async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        reconciles(&metrics)
    };
    let mut n = quiet().await;
    while quiet().await != n {
        n = reconciles(&metrics);
    }
    let (mut status, _) = e.vr_status("data");
    status.message = "touched by hand".into();
    e.fake.set_status(
        VR_API,
        "VolumeReplication",
        NS,
        "data",
        serde_json::to_value(&status).unwrap(),
    );
    e.label_pvc("other", json!({"touched": "yes"}));
    assert_eq!(
        quiet().await,
        n,
        "a status write or another PVC triggered it"
    );
    e.label_pvc("data", json!({"touched": "yes"}));
    until("its PVC triggered it", || reconciles(&metrics) > n).await;
    let n = quiet().await;
    e.desire(VR, "data", "secondary");
    e.accepted(VR, "data", SECONDARY).await;
    assert!(reconciles(&metrics) > n);
    ctl.stop().await;
}

/// Deleting a PowerStore group releases its PVCs and its content, and leaves Dell's RG (and the
/// replication it runs) alone: no verb, no delete.
#[tokio::test]
async fn dell_deletion_releases_the_group_and_leaves_the_rg() {
    let e = env().await;
    dell_classes(&e);
    e.rg("rg-pg", true, "SYNCHRONIZED", &["pg-data", "pg-wal"]);
    e.vgr("pg", "powerstore-group", "pg", "primary");
    let ctl = Running::start(e.ctx(fast()).await);
    e.accepted(VGR, "pg", PRIMARY).await;
    let content = e.get(VR_API, "VolumeGroupReplication", "pg").unwrap()["spec"]
        ["volumeGroupReplicationContentName"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.content(&content).is_some());
    e.delete_and_wait("VolumeGroupReplication", "pg").await;
    assert!(e.content(&content).is_none());
    let rg = e.get(RG_API, "DellCSIReplicationGroup", "rg-pg").unwrap();
    assert_eq!(rg["spec"]["action"], "");
    assert_eq!(
        rg["status"]["replicationLinkState"]["state"],
        "SYNCHRONIZED"
    );
    assert!(e.fake.replication().unwrap().dell_actions().is_empty());
    for p in ["pg-data", "pg-wal"] {
        let pvc = e.get("v1", "PersistentVolumeClaim", p).unwrap();
        assert!(
            pvc["metadata"]["annotations"]
                .get(PVC_VGR_ANNOTATION)
                .is_none()
        );
        assert!(
            pvc["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty)
        );
    }
    ctl.stop().await;
}

/// A group whose spec names its content `""` (set, so immutable): the content gets the
/// default name, the annotation names it, and the group converges (no endless rewrite).
#[tokio::test]
async fn an_empty_content_name_in_the_spec_gets_the_default_name() {
    let e = env().await;
    trident_group_members(&e, &[("pg-data", "svm0:vol_data")]);
    e.vgr_with(
        "pg",
        "trident-group",
        "pg",
        "primary",
        json!({"volumeGroupReplicationContentName": ""}),
    );
    let uid = e.get(VR_API, "VolumeGroupReplication", "pg").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let ctx = e.ctx(fast()).await;
    let ctl = Running::start(ctx.clone());
    e.accepted(VGR, "pg", PRIMARY).await;
    let name = format!("vgrcontent-{uid}");
    assert_eq!(e.handles(&name), ["svm0:vol_data"]);
    let vgr = e.get(VR_API, "VolumeGroupReplication", "pg").unwrap();
    assert_eq!(
        vgr["metadata"]["annotations"]["replication.storage.openshift.io/volume-group-replication-content-name"],
        name.as_str()
    );
    ctl.stop().await;
    let out = reconcile_once(&ctx, SubjectKind::Group, NS, "pg")
        .await
        .unwrap();
    assert_eq!(out.result, Verdict::Converged);
}
