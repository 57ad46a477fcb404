//! cbt-replicator under exactly the RBAC of `examples/replication/rbac.yaml`, with the samples of
//! `examples/replication/` as the workload.
//!
//! The samples are installed into fake-kube with the real CRDs (so their custom resources pass
//! the CRD schemas; kubernetes-validate in CI only checks the built-in kinds), the controller
//! authenticates as the example's ServiceAccount, holds the Lease in the Deployment's
//! namespace, and runs every flow that needs a distinct right: Trident primary, demote and
//! resync (a TridentActionMirrorUpdate), deletion; the PostgreSQL groups of both backends, a
//! PVC joining one; a Dell planned failover. Proves the manifest complete (nothing denied) and
//! minimal (every granted verb is used).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cbt_k8s::replication::controller::testing::{self, Running};
use cbt_k8s::replication::controller::{Leadership, leader};
use cbt_k8s::replication::translate::conditions::{ramen_accepts_primary, ramen_accepts_secondary};
use cbt_k8s::replication::types::{VolumeGroupReplicationStatus, VolumeReplicationStatus};
use fake_kube::FakeKube;
use fake_kube::rbac::{Policy, UserInfo};
use serde_json::{Value, json};

const TOKEN: &str = "cbt-replicator-sa-token";
const VR_API: &str = "replication.storage.openshift.io/v1alpha1";
const TMR_API: &str = "trident.netapp.io/v1";
const RG_API: &str = "replication.storage.dell.com/v1";
const RG_LABEL: &str = "replication.storage.dell.com/replicationGroupName";

fn example(rel: &str) -> String {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/replication")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn docs(rel: &str) -> Vec<Value> {
    let d: Vec<Value> = serde_saphyr::from_multiple(&example(rel)).unwrap();
    d.into_iter().filter(|v| !v.is_null()).collect()
}

/// (api group, resource[/subresource], verb).
type Grant = (String, String, String);

fn vr_ok(fake: &FakeKube, ns: &str, name: &str, primary: bool) -> bool {
    let Some(o) = fake.get(VR_API, "VolumeReplication", ns, name) else {
        return false;
    };
    let s: VolumeReplicationStatus =
        serde_json::from_value(o["status"].clone()).unwrap_or_default();
    let g = o["metadata"]["generation"].as_i64().unwrap();
    if primary {
        ramen_accepts_primary(&s, g)
    } else {
        ramen_accepts_secondary(&s, g)
    }
}

fn vgr_ok(fake: &FakeKube, ns: &str, name: &str, members: usize) -> bool {
    let Some(o) = fake.get(VR_API, "VolumeGroupReplication", ns, name) else {
        return false;
    };
    let s: VolumeGroupReplicationStatus =
        serde_json::from_value(o["status"].clone()).unwrap_or_default();
    ramen_accepts_primary(
        &s.replication,
        o["metadata"]["generation"].as_i64().unwrap(),
    ) && s.persistent_volume_claims_ref_list.len() == members
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn every_sample_passes_the_crd_schemas() {
    // Each sample in a fresh cluster, as `kubectl apply -f` would create it (StorageClasses the
    // groups need come from the single-volume samples).
    for (file, needs) in [
        ("trident-primary.yaml", None),
        ("trident-secondary.yaml", Some("trident-primary.yaml")),
        ("powerstore.yaml", None),
        ("postgres-group-trident.yaml", Some("trident-primary.yaml")),
        ("postgres-group-powerstore.yaml", Some("powerstore.yaml")),
    ] {
        let fake = FakeKube::builder().replication_api().start().await.unwrap();
        if let Some(n) = needs {
            for d in docs(n) {
                if matches!(
                    d["kind"].as_str(),
                    Some("StorageClass" | "VolumeReplicationClass")
                ) {
                    fake.create(d).unwrap();
                }
            }
        }
        for d in docs(file) {
            let kind = d["kind"].as_str().unwrap().to_string();
            fake.create(d)
                .unwrap_or_else(|e| panic!("{file}: {kind}: {e:?}"));
        }
    }
}

#[tokio::test]
async fn the_controller_works_with_exactly_the_example_rbac() {
    let policy = Policy::from_yaml(&example("rbac.yaml")).unwrap();
    let deployment = docs("deployment.yaml");
    let dep = deployment
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let ns = dep["metadata"]["namespace"].as_str().unwrap().to_string();
    let sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap()
        .to_string();
    let args: Vec<String> = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let provisioners: Vec<String> = args
        .iter()
        .find_map(|a| a.strip_prefix("--provisioners="))
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    let user = UserInfo::service_account(&ns, &sa);
    let fake = FakeKube::builder()
        .replication_api()
        .rbac(policy.clone())
        .user(TOKEN, user.clone())
        .start()
        .await
        .unwrap();
    for d in deployment.iter().filter(|d| d["kind"] == "Namespace") {
        fake.create(d.clone()).unwrap();
    }
    for file in [
        "trident-primary.yaml",
        "powerstore.yaml",
        "postgres-group-trident.yaml",
        "postgres-group-powerstore.yaml",
    ] {
        for d in docs(file) {
            fake.create(d).unwrap();
        }
    }
    // What Dell's sidecar does for the PowerStore samples: one protection group per namespace.
    for (rg, pvc_ns, pvcs) in [
        ("rg-ledger", "billing", vec!["ledger"]),
        (
            "rg-postgres",
            "pg-powerstore",
            vec!["postgres-data", "postgres-wal", "postgres-config"],
        ),
    ] {
        fake.create(json!({"apiVersion": RG_API, "kind": "DellCSIReplicationGroup",
            "metadata": {"name": rg},
            "spec": {"driverName": "csi-powerstore.dellemc.com", "action": "", "remoteClusterId": "target",
                     "protectionGroupId": format!("{rg}-pg"), "remoteProtectionGroupId": "remote-pg",
                     "protectionGroupAttributes": {"remoteSystemName": "PS-B"}}}))
            .unwrap();
        fake.set_status(
            RG_API,
            "DellCSIReplicationGroup",
            "",
            rg,
            json!({"state": "Ready", "replicationLinkState": {"state": "SYNCHRONIZED", "isSource": true}}),
        );
        for p in pvcs {
            fake.merge_patch(
                "v1",
                "PersistentVolumeClaim",
                pvc_ns,
                p,
                &json!({"metadata": {"labels": {RG_LABEL: rg}}}),
            )
            .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    fake.write_kubeconfig_as(&kubeconfig, "test", TOKEN)
        .unwrap();
    let leadership = Leadership::elected();
    let ctx = testing::context(
        &kubeconfig,
        testing::fast_config(provisioners),
        leadership.clone(),
    )
    .await
    .unwrap();
    let mut lease = leader::LeaseConfig::new(&ns, "cbt-replicator", "pod-0");
    lease.retry_period = Duration::from_millis(100);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let hold = tokio::spawn(leader::hold(
        ctx.client.clone(),
        lease,
        leadership,
        stop_rx,
        |_| {},
    ));
    let ctl = Running::start(ctx);

    until("trident sample primary", || {
        vr_ok(&fake, "shop", "orders", true)
    })
    .await;
    until("powerstore sample primary", || {
        vr_ok(&fake, "billing", "ledger", true)
    })
    .await;
    until("trident group", || {
        vgr_ok(&fake, "pg-trident", "postgres", 3)
    })
    .await;
    until("powerstore group", || {
        vgr_ok(&fake, "pg-powerstore", "postgres", 3)
    })
    .await;

    // A bound PVC (its driver is read from its PV) joins the Trident group.
    fake.create(json!({"apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "pv-archive"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": "csi.trident.netapp.io", "volumeHandle": "pvc-archive"}}}))
        .unwrap();
    fake.create(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "postgres-archive", "namespace": "pg-trident",
                     "labels": {"app.kubernetes.io/name": "postgres"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "ontap-replicated",
                 "volumeName": "pv-archive", "resources": {"requests": {"storage": "1Gi"}}}}))
        .unwrap();
    until("group of four", || {
        vgr_ok(&fake, "pg-trident", "postgres", 4)
    })
    .await;
    // Its content's status (through the status subresource) names the bound member's PV.
    until("content status", || {
        fake.list(VR_API, "VolumeGroupReplicationContent")
            .iter()
            .filter(|c| c["spec"]["volumeGroupReplicationRef"]["namespace"] == "pg-trident")
            .any(|c| {
                c["status"]["persistentVolumeRefList"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|r| r["name"] == "pv-archive"))
            })
    })
    .await;

    // Dell planned failover of the single volume.
    fake.merge_patch(
        VR_API,
        "VolumeReplication",
        "billing",
        "ledger",
        &json!({"spec": {"replicationState": "secondary"}}),
    )
    .unwrap();
    until("ledger secondary", || {
        vr_ok(&fake, "billing", "ledger", false)
    })
    .await;

    // Trident: demote, then resync (a TridentActionMirrorUpdate), then delete everything ours.
    fake.merge_patch(VR_API, "VolumeReplication", "shop", "orders",
        &json!({"spec": {"replicationState": "secondary", "replicationHandle": "svm_b:trident_shop_orders"}}))
        .unwrap();
    until("orders secondary", || vr_ok(&fake, "shop", "orders", false)).await;
    // A new destination (established), then a resync of it: a TridentActionMirrorUpdate.
    fake.create(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "replica", "namespace": "shop"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "ontap-replicated",
                 "resources": {"requests": {"storage": "1Gi"}}}}))
        .unwrap();
    fake.create(json!({"apiVersion": VR_API, "kind": "VolumeReplication",
        "metadata": {"name": "replica", "namespace": "shop"},
        "spec": {"volumeReplicationClass": "trident-mirror", "replicationState": "secondary",
                 "dataSource": {"kind": "PersistentVolumeClaim", "name": "replica"},
                 "autoResync": false, "replicationHandle": "svm_b:trident_shop_replica"}}))
        .unwrap();
    until("replica secondary", || {
        vr_ok(&fake, "shop", "replica", false)
    })
    .await;
    fake.merge_patch(
        VR_API,
        "VolumeReplication",
        "shop",
        "replica",
        &json!({"spec": {"replicationState": "resync"}}),
    )
    .unwrap();
    until("mirror update", || {
        !fake.list(TMR_API, "TridentActionMirrorUpdate").is_empty()
    })
    .await;
    until("resynced", || vr_ok(&fake, "shop", "replica", false)).await;
    fake.delete(VR_API, "VolumeReplication", "shop", "orders")
        .unwrap();
    fake.delete(VR_API, "VolumeReplication", "shop", "replica")
        .unwrap();
    fake.delete(VR_API, "VolumeGroupReplication", "pg-trident", "postgres")
        .unwrap();
    until("deleted", || {
        fake.get(VR_API, "VolumeReplication", "shop", "orders")
            .is_none()
            && fake
                .get(VR_API, "VolumeGroupReplication", "pg-trident", "postgres")
                .is_none()
            && fake.list(TMR_API, "TridentMirrorRelationship").is_empty()
            && fake.list(TMR_API, "TridentActionMirrorUpdate").is_empty()
            // The Trident group's content went with it; the PowerStore group keeps its own.
            && fake.list(VR_API, "VolumeGroupReplicationContent").len() == 1
    })
    .await;

    ctl.stop().await;
    let _ = stop_tx.send(true);
    hold.await.unwrap().unwrap();

    let denied = fake.denied();
    assert!(
        denied.is_empty(),
        "requests rbac.yaml does not grant: {denied:#?}"
    );
    let used: BTreeSet<Grant> = fake
        .access_log()
        .into_iter()
        .filter(|r| r.user == user.name)
        .map(|r| {
            (
                r.attributes.api_group.clone(),
                r.attributes.combined_resource(),
                r.attributes.verb.clone(),
            )
        })
        .collect();
    assert!(!policy.has_wildcards());
    let granted = policy.grants();
    let unused: Vec<&Grant> = granted.difference(&used).collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
    assert_eq!(used, granted);
}
