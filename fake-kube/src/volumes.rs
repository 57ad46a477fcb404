//! Data-backed volumes: the external-provisioner and the PV controller of a cluster whose
//! [`SharedBackend`] has a data directory.
//!
//! A Pending PVC whose StorageClass this cluster's driver provisions gets a volume file (empty,
//! a copy of a ready VolumeSnapshot's image, or a clone of another PVC's volume), a
//! PersistentVolume `pvc-<claim uid>` bound to it, and is bound itself. A restore smaller than
//! the snapshot's restoreSize stays Pending with a `ProvisioningFailed` event carrying the
//! external-provisioner's message. When a claim goes away its PV is released: `Delete` removes
//! the PV and the volume file, `Retain` leaves the PV `Released`. A class with
//! `volumeBindingMode: WaitForFirstConsumer` provisions only once a pod uses the claim (until
//! then the claim is Pending with a `WaitForFirstConsumer` event).
//!
//! Without a data directory none of this runs (the provisioner in `controller` binds only
//! restores, without PV objects, as before).

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::FakeKube;
use crate::backend::{BackendSnapshot, SharedBackend};
use crate::kinds::{PERSISTENT_VOLUMES, record_event};
use crate::store::{
    ApiError, PVCS, STORAGE_CLASSES, Selector, Store, VOLUME_SNAPSHOT_CONTENTS, VOLUME_SNAPSHOTS,
};
use crate::values::parse_quantity;

/// Annotation the external-provisioner puts on the PVs it creates.
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|x| !x.is_empty())
}

/// Runs the provisioner and the reclaimer once; true if anything changed.
pub(crate) fn reconcile(store: &mut Store, backend: &SharedBackend, driver: &str) -> bool {
    let mut changed = provision(store, backend, driver);
    changed |= reclaim(store, backend, driver);
    changed
}

/// Where a new volume's bytes come from.
enum Source {
    Empty,
    Snapshot(String),
    Volume(String),
}

/// Outcome of resolving a claim's data source.
enum Resolved {
    Ready(Source),
    /// Not provisionable yet; the message (if any) becomes a ProvisioningFailed event.
    Wait(Option<String>),
}

fn resolve_source(store: &Store, pvc: &Value, ns: &str, requested: i64) -> Resolved {
    let ds = if pvc["spec"]["dataSourceRef"].is_object() {
        &pvc["spec"]["dataSourceRef"]
    } else {
        &pvc["spec"]["dataSource"]
    };
    let Some(kind) = s(ds, &["kind"]) else {
        return Resolved::Ready(Source::Empty);
    };
    let name = s(ds, &["name"]).unwrap_or("");
    let group = s(ds, &["apiGroup"]).unwrap_or("");
    match (group, kind) {
        ("snapshot.storage.k8s.io", "VolumeSnapshot") => {
            let prefix =
                format!("error getting handle for DataSource Type VolumeSnapshot by Name {name}");
            let Ok(vs) = store.get(&VOLUME_SNAPSHOTS, ns, name) else {
                return Resolved::Wait(Some(format!(
                    "{prefix}: error getting snapshot {name} from api server: volumesnapshots.snapshot.storage.k8s.io \"{name}\" not found"
                )));
            };
            if vs["status"]["readyToUse"] != json!(true) {
                return Resolved::Wait(Some(format!("{prefix}: snapshot {name} is not Ready")));
            }
            let content = s(&vs, &["status", "boundVolumeSnapshotContentName"])
                .and_then(|c| store.get(&VOLUME_SNAPSHOT_CONTENTS, "", c).ok());
            let Some(content) = content else {
                return Resolved::Wait(Some(format!(
                    "{prefix}: snapshot {name} has no bound VolumeSnapshotContent"
                )));
            };
            let Some(handle) = s(&content, &["status", "snapshotHandle"]) else {
                return Resolved::Wait(Some(format!(
                    "{prefix}: snapshot handle of {name} is not available"
                )));
            };
            let size = content["status"]["restoreSize"].as_i64().unwrap_or(0);
            if requested < size {
                return Resolved::Wait(Some(format!(
                    "{prefix}: requested volume size {requested} is less than the size {size} for the source snapshot {name}"
                )));
            }
            Resolved::Ready(Source::Snapshot(handle.to_string()))
        }
        ("", "PersistentVolumeClaim") => {
            let prefix = format!(
                "error getting handle for DataSource Type PersistentVolumeClaim by Name {name}"
            );
            let src = store.get(&PVCS, ns, name).ok();
            let handle = src
                .as_ref()
                .and_then(|_| volume_handle_of_pvc(store, ns, name));
            let (Some(src), Some(handle)) = (src, handle) else {
                return Resolved::Wait(Some(format!(
                    "{prefix}: claim {name} is not bound to a volume"
                )));
            };
            let size = s(&src, &["status", "capacity", "storage"])
                .and_then(parse_quantity)
                .unwrap_or(0);
            if requested < size {
                return Resolved::Wait(Some(format!(
                    "{prefix}: requested volume size {requested} is less than the size {size} for the source PVC {name}"
                )));
            }
            Resolved::Ready(Source::Volume(handle))
        }
        // Populators and unknown sources: nobody here fills them; the claim waits.
        _ => Resolved::Wait(None),
    }
}

fn provision(store: &mut Store, backend: &SharedBackend, driver: &str) -> bool {
    let mut changed = false;
    let todo = store.list_where(&PVCS, None, |pvc| {
        !(s(pvc, &["status", "phase"]) == Some("Bound")
            || pvc["metadata"].get("deletionTimestamp").is_some()
            // Pre-bound to a named PV: static binding is not simulated.
            || s(pvc, &["spec", "volumeName"]).is_some())
    });
    for pvc in todo {
        let (Some(ns), Some(name), Some(uid)) = (
            s(&pvc, &["metadata", "namespace"]).map(str::to_string),
            s(&pvc, &["metadata", "name"]).map(str::to_string),
            s(&pvc, &["metadata", "uid"]).map(str::to_string),
        ) else {
            continue;
        };
        if pvc["status"].is_null() {
            changed |= store.controller_update(&PVCS, &ns, &name, |o| {
                o["status"] = json!({"phase": "Pending"});
            });
        }
        let class_name = s(&pvc, &["spec", "storageClassName"]).unwrap_or("");
        let Ok(class) = store.get(&STORAGE_CLASSES, "", class_name) else {
            continue;
        };
        // Only this cluster's driver provisions, and only for its own classes.
        if s(&class, &["provisioner"]) != Some(driver) {
            continue;
        }
        if s(&class, &["volumeBindingMode"]) == Some("WaitForFirstConsumer")
            && !has_consumer(store, &ns, &name)
        {
            changed |= record_event(
                store,
                &pvc,
                "Normal",
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding",
                "persistentvolume-controller",
            );
            continue;
        }
        let request = pvc["spec"]["resources"]["requests"]["storage"].clone();
        let requested = request.as_str().and_then(parse_quantity).unwrap_or(0);
        let source = match resolve_source(store, &pvc, &ns, requested) {
            Resolved::Ready(source) => source,
            Resolved::Wait(message) => {
                if let Some(m) = message {
                    changed |= provisioning_failed(store, &pvc, class_name, &m);
                }
                continue;
            }
        };
        let size = u64::try_from(requested).unwrap_or(0);
        let created = match &source {
            Source::Empty => backend.create_volume(size),
            Source::Snapshot(h) => backend.create_volume_from_snapshot(h, size),
            Source::Volume(h) => backend.clone_volume(h, size),
        };
        let handle = match created {
            Ok(h) => h,
            Err(e) => {
                changed |= provisioning_failed(store, &pvc, class_name, &e.to_string());
                continue;
            }
        };
        let pv_name = format!("pvc-{uid}");
        store.controller_create(
            &PERSISTENT_VOLUMES,
            "",
            pv_object(&pv_name, driver, &handle, &pvc, Some(&class)),
        );
        let modes = pvc["spec"]["accessModes"].clone();
        store.controller_update(&PVCS, &ns, &name, |o| {
            o["spec"]["volumeName"] = json!(pv_name);
            let ann = &mut o["metadata"]["annotations"];
            if !ann.is_object() {
                *ann = json!({});
            }
            ann["pv.kubernetes.io/bind-completed"] = json!("yes");
            ann["pv.kubernetes.io/bound-by-controller"] = json!("yes");
            ann["volume.kubernetes.io/storage-provisioner"] = json!(driver);
            o["status"] =
                json!({"phase": "Bound", "capacity": {"storage": request}, "accessModes": modes});
        });
        if let Ok(bound) = store.get(&PVCS, &ns, &name) {
            record_event(
                store,
                &bound,
                "Normal",
                "ProvisioningSucceeded",
                &format!("Successfully provisioned volume {pv_name}"),
                driver,
            );
        }
        changed = true;
    }
    changed
}

/// True if a pod in `ns` uses claim `name` (what a WaitForFirstConsumer class waits for).
fn has_consumer(store: &Store, ns: &str, name: &str) -> bool {
    store
        .list(&crate::kinds::PODS, Some(ns), &Selector::default())
        .iter()
        .any(|p| {
            p["spec"]["volumes"].as_array().is_some_and(|vs| {
                vs.iter()
                    .any(|v| v["persistentVolumeClaim"]["claimName"].as_str() == Some(name))
            })
        })
}

/// True if claim `ns/name` waits for a consumer (its class binds WaitForFirstConsumer).
pub(crate) fn waits_for_consumer(store: &Store, pvc: &Value) -> bool {
    s(pvc, &["spec", "storageClassName"])
        .and_then(|c| store.get(&STORAGE_CLASSES, "", c).ok())
        .is_some_and(|c| s(&c, &["volumeBindingMode"]) == Some("WaitForFirstConsumer"))
}

fn provisioning_failed(store: &mut Store, pvc: &Value, class: &str, message: &str) -> bool {
    record_event(
        store,
        pvc,
        "Warning",
        "ProvisioningFailed",
        &format!("failed to provision volume with StorageClass \"{class}\": {message}"),
        "fake-kube-external-provisioner",
    )
}

/// A PersistentVolume for `handle` bound to `pvc`, as the external-provisioner writes it.
fn pv_object(name: &str, driver: &str, handle: &str, pvc: &Value, class: Option<&Value>) -> Value {
    let reclaim = class
        .and_then(|c| s(c, &["reclaimPolicy"]))
        .unwrap_or("Delete");
    json!({
        "metadata": {
            "name": name,
            "annotations": {PROVISIONED_BY: driver, "volume.kubernetes.io/provisioner-deletion-secret-name": "", "volume.kubernetes.io/provisioner-deletion-secret-namespace": ""},
        },
        "spec": {
            "accessModes": pvc["spec"]["accessModes"],
            "capacity": {"storage": pvc["spec"]["resources"]["requests"]["storage"]},
            "claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"],
                "uid": pvc["metadata"]["uid"], "resourceVersion": pvc["metadata"]["resourceVersion"],
            },
            "csi": {"driver": driver, "volumeHandle": handle, "volumeAttributes": {"storage.kubernetes.io/csiProvisionerIdentity": format!("fake-kube-{driver}")}},
            "persistentVolumeReclaimPolicy": reclaim,
            "storageClassName": pvc["spec"]["storageClassName"],
            "volumeMode": s(pvc, &["spec", "volumeMode"]).unwrap_or("Filesystem"),
        },
        "status": {"phase": "Bound"},
    })
}

fn reclaim(store: &mut Store, backend: &SharedBackend, driver: &str) -> bool {
    let mut changed = false;
    let todo = store.list_where(&PERSISTENT_VOLUMES, None, |pv| {
        s(pv, &["metadata", "annotations", PROVISIONED_BY]) == Some(driver)
            && s(pv, &["status", "phase"]) == Some("Bound")
    });
    for pv in todo {
        let Some(name) = s(&pv, &["metadata", "name"]).map(str::to_string) else {
            continue;
        };
        let claim = &pv["spec"]["claimRef"];
        let live = store
            .get(
                &PVCS,
                s(claim, &["namespace"]).unwrap_or(""),
                s(claim, &["name"]).unwrap_or(""),
            )
            .ok();
        if live.as_ref().and_then(|p| s(p, &["metadata", "uid"])) == s(claim, &["uid"]) {
            continue;
        }
        match s(&pv, &["spec", "persistentVolumeReclaimPolicy"]) {
            Some("Delete") => {
                let handle = s(&pv, &["spec", "csi", "volumeHandle"]).unwrap_or("");
                match backend.delete_volume(handle) {
                    Ok(_) => {
                        changed |= store.delete(&PERSISTENT_VOLUMES, "", &name, false).is_ok();
                    }
                    Err(e) => {
                        let message = e.to_string();
                        changed |= store.controller_update(&PERSISTENT_VOLUMES, "", &name, |o| {
                            o["status"] = json!({"phase": "Failed", "message": message});
                        });
                    }
                }
            }
            _ => {
                changed |= store.controller_update(&PERSISTENT_VOLUMES, "", &name, |o| {
                    o["status"] = json!({"phase": "Released"});
                });
            }
        }
    }
    changed
}

/// The CSI volume handle behind a bound claim (its PV's `spec.csi.volumeHandle`).
pub(crate) fn volume_handle_of_pvc(store: &Store, ns: &str, name: &str) -> Option<String> {
    let pvc = store.get(&PVCS, ns, name).ok()?;
    let pv_name = s(&pvc, &["spec", "volumeName"])?;
    let pv = store.get(&PERSISTENT_VOLUMES, "", pv_name).ok()?;
    s(&pv, &["spec", "csi", "volumeHandle"]).map(str::to_string)
}

/// CreateSnapshot of a claim's volume on a data-backed backend: the volume handle and the
/// snapshot. The error is the message the csi-snapshotter puts in the snapshot's status.
pub(crate) fn snapshot_pvc(
    store: &Store,
    backend: &SharedBackend,
    pvc: &Value,
) -> Result<(String, BackendSnapshot), String> {
    let ns = s(pvc, &["metadata", "namespace"]).unwrap_or("");
    let name = s(pvc, &["metadata", "name"]).unwrap_or("");
    let handle = volume_handle_of_pvc(store, ns, name).ok_or_else(|| {
        format!(
            "failed to get input parameters to create snapshot: PersistentVolume {} of claim {ns}/{name} not found",
            s(pvc, &["spec", "volumeName"]).unwrap_or("")
        )
    })?;
    let snap = backend
        .snapshot_volume(&handle)
        .map_err(|e| format!("failed to take snapshot of the volume {handle}: {e}"))?;
    Ok((handle, snap))
}

/// Gives a PVC that `seed_pvc` bound directly a real PV and volume file (data-backed only).
pub(crate) fn back_seeded_pvc(
    store: &mut Store,
    backend: &SharedBackend,
    driver: &str,
    ns: &str,
    name: &str,
) -> Result<(), ApiError> {
    let pvc = store.get(&PVCS, ns, name)?;
    let size = s(&pvc, &["spec", "resources", "requests", "storage"])
        .and_then(parse_quantity)
        .unwrap_or(0);
    let handle = backend
        .create_volume(u64::try_from(size).unwrap_or(0))
        .map_err(|e| ApiError {
            code: 500,
            reason: "InternalError",
            message: e.to_string(),
            details: None,
        })?;
    let pv_name = s(&pvc, &["spec", "volumeName"]).unwrap_or(name).to_string();
    let class = s(&pvc, &["spec", "storageClassName"])
        .and_then(|c| store.get(&STORAGE_CLASSES, "", c).ok());
    store.controller_create(
        &PERSISTENT_VOLUMES,
        "",
        pv_object(&pv_name, driver, &handle, &pvc, class.as_ref()),
    );
    Ok(())
}

impl FakeKube {
    /// The file backing a bound PVC's volume (what a pod sees at its `devicePath`); None
    /// without a data directory or while the claim is unbound.
    pub fn pvc_backing_file(&self, ns: &str, name: &str) -> Option<PathBuf> {
        let handle = volume_handle_of_pvc(&self.state.lock_store(), ns, name)?;
        self.state.backend.volume_path(&handle)
    }

    /// The image file of a VolumeSnapshot (through its bound content's `snapshotHandle`).
    pub fn volume_snapshot_file(&self, ns: &str, name: &str) -> Option<PathBuf> {
        let store = self.state.lock_store();
        let vs = store.get(&VOLUME_SNAPSHOTS, ns, name).ok()?;
        let content = store
            .get(
                &VOLUME_SNAPSHOT_CONTENTS,
                "",
                s(&vs, &["status", "boundVolumeSnapshotContentName"])?,
            )
            .ok()?;
        self.state
            .backend
            .snapshot_path(s(&content, &["status", "snapshotHandle"])?)
    }

    /// `<data>/snapshots`, the directory `cbt serve-metadata --dir` can serve.
    pub fn snapshots_dir(&self) -> Option<PathBuf> {
        self.state.backend.snapshots_dir()
    }
}
