//! The simulated snapshot-controller, csi-snapshotter sidecar and external
//! provisioner of one fake cluster.
//!
//! It follows the upstream behaviour the contracts describe: a dynamic
//! VolumeSnapshot gets a `snapcontent-<uid>` content with a handle cut on the
//! shared backend; a pre-provisioned content is looked up by handle (unknown
//! handle = error status) and its VolumeSnapshot bound; mis-bound or handle-less
//! contents are errors; a PVC restored from a ready snapshot binds when its
//! StorageClass is provisioned by this cluster's driver (with a data-backed backend
//! `volumes` provisions instead, and snapshots copy the volume's file). Deleting a
//! `Delete`-policy content deletes the backend snapshot, `Retain` never does.
//! Only contents whose driver is this cluster's simulated driver are served.
//! Group snapshots are simulated in `groups`, hooked in here.

use serde_json::{Value, json};

use crate::backend::SharedBackend;
use crate::faults::Faults;
use crate::store::{
    ApiError, PVCS, ResourceType, STORAGE_CLASSES, Selector, Store, VOLUME_SNAPSHOT_CLASSES,
    VOLUME_SNAPSHOT_CONTENTS, VOLUME_SNAPSHOTS,
};
use crate::values::{format_quantity, parse_quantity, rfc3339_from_unix_nanos, rfc3339_now};

const DEFAULT_CLASS_ANNOTATION: &str = "snapshot.storage.kubernetes.io/is-default-class";

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|x| !x.is_empty())
}

/// Runs every controller once; returns true if anything changed.
pub(crate) fn reconcile(
    store: &mut Store,
    backend: &SharedBackend,
    faults: &Faults,
    driver: &str,
    scan: &mut ProvisionerScan,
) -> bool {
    let mut changed = false;
    changed |= sidecar(store, backend, faults, driver);
    changed |= snapshot_controller(store, backend, faults, driver);
    changed |= crate::groups::reconcile(store, backend, faults, driver);
    changed |= if backend.data_dir().is_some() {
        crate::volumes::reconcile(store, backend, driver)
    } else {
        provisioner(store, driver, scan)
    };
    changed
}

fn sidecar(store: &mut Store, backend: &SharedBackend, faults: &Faults, driver: &str) -> bool {
    let mut changed = false;
    let never_ready = faults.never_ready();
    for vsc in store.list(&VOLUME_SNAPSHOT_CONTENTS, None, &Selector::default()) {
        if s(&vsc, &["spec", "driver"]) != Some(driver) {
            continue;
        }
        let Some(name) = s(&vsc, &["metadata", "name"]).map(str::to_string) else {
            continue;
        };
        if vsc["status"]["readyToUse"] == json!(true) {
            continue;
        }
        let handle = s(&vsc, &["spec", "source", "snapshotHandle"])
            .or_else(|| s(&vsc, &["status", "snapshotHandle"]))
            .map(str::to_string);
        let Some(handle) = handle else { continue };
        let new_status = match backend.get(&handle) {
            Some(snap) => {
                let mut status = json!({
                    "snapshotHandle": handle,
                    "readyToUse": !never_ready,
                    "restoreSize": snap.size_bytes,
                    "creationTime": snap.created_unix_nanos,
                });
                // A group member keeps the handle of the group it was cut in.
                if let Some(group) = s(&vsc, &["status", "volumeGroupSnapshotHandle"]) {
                    status["volumeGroupSnapshotHandle"] = json!(group);
                }
                status
            }
            None => {
                let message = format!(
                    "failed to list snapshot for content {name}: snapshot {handle} not found on the storage backend"
                );
                if s(&vsc, &["status", "error", "message"]) == Some(message.as_str()) {
                    continue;
                }
                json!({"readyToUse": false, "error": {"time": rfc3339_now(), "message": message}})
            }
        };
        changed |= store.controller_update(&VOLUME_SNAPSHOT_CONTENTS, "", &name, |o| {
            o["status"] = new_status;
        });
    }
    changed
}

fn set_vs_error(store: &mut Store, ns: &str, name: &str, message: String) -> bool {
    store.controller_update(&VOLUME_SNAPSHOTS, ns, name, |o| {
        if s(o, &["status", "error", "message"]) == Some(message.as_str()) {
            return;
        }
        if !o["status"].is_object() {
            o["status"] = json!({});
        }
        o["status"]["readyToUse"] = json!(false);
        o["status"]["error"] = json!({"time": rfc3339_now(), "message": message});
    })
}

fn sync_vs_from_content(store: &mut Store, ns: &str, name: &str, content: &Value) -> bool {
    let cname = content["metadata"]["name"].clone();
    let cs = &content["status"];
    let mut status = json!({
        "boundVolumeSnapshotContentName": cname,
        "readyToUse": cs["readyToUse"].as_bool().unwrap_or(false),
    });
    if let Some(size) = cs["restoreSize"].as_i64() {
        status["restoreSize"] = json!(format_quantity(size));
    }
    if let Some(ct) = cs["creationTime"].as_i64() {
        status["creationTime"] = json!(rfc3339_from_unix_nanos(ct));
    }
    if cs["error"].is_object() {
        status["error"] = cs["error"].clone();
    }
    store.controller_update(&VOLUME_SNAPSHOTS, ns, name, |o| {
        // Set by the group controller when it made this member; the content does not carry it.
        if let Some(group) = s(o, &["status", "volumeGroupSnapshotName"]) {
            status["volumeGroupSnapshotName"] = json!(group);
        }
        o["status"] = status;
    })
}

/// The classes of `classes` (single or group) for `driver` marked default by `annotation`.
pub(crate) fn default_classes(
    store: &Store,
    classes: &'static ResourceType,
    annotation: &str,
    driver: &str,
) -> Vec<Value> {
    store
        .list(classes, None, &Selector::default())
        .into_iter()
        .filter(|c| {
            s(c, &["driver"]) == Some(driver)
                && s(c, &["metadata", "annotations", annotation]) == Some("true")
        })
        .collect()
}

fn find_class(store: &Store, vs: &Value, driver: &str) -> Result<Value, String> {
    if let Some(class) = s(vs, &["spec", "volumeSnapshotClassName"]) {
        return store
            .get(&VOLUME_SNAPSHOT_CLASSES, "", class)
            .map_err(|_| format!("failed to get snapshot class with name {class}: not found"));
    }
    let defaults = default_classes(
        store,
        &VOLUME_SNAPSHOT_CLASSES,
        DEFAULT_CLASS_ANNOTATION,
        driver,
    );
    match defaults.len() {
        1 => Ok(defaults.into_iter().next().unwrap_or_default()),
        0 => Err(format!(
            "cannot find default snapshot class for driver {driver}"
        )),
        n => Err(format!(
            "default snapshot class: {n} default classes found for driver {driver}"
        )),
    }
}

fn snapshot_controller(
    store: &mut Store,
    backend: &SharedBackend,
    faults: &Faults,
    driver: &str,
) -> bool {
    let mut changed = false;
    for vs in store.list(&VOLUME_SNAPSHOTS, None, &Selector::default()) {
        let (Some(ns), Some(name)) = (
            s(&vs, &["metadata", "namespace"]).map(str::to_string),
            s(&vs, &["metadata", "name"]).map(str::to_string),
        ) else {
            continue;
        };
        let uid = s(&vs, &["metadata", "uid"]).unwrap_or("").to_string();
        if let Some(bound) = s(&vs, &["status", "boundVolumeSnapshotContentName"]) {
            if let Ok(content) = store.get(&VOLUME_SNAPSHOT_CONTENTS, "", bound) {
                changed |= sync_vs_from_content(store, &ns, &name, &content);
            }
            continue;
        }
        if let Some(pvc_name) = s(&vs, &["spec", "source", "persistentVolumeClaimName"]) {
            if vs["status"]["error"].is_object() {
                continue;
            }
            let pvc_name = pvc_name.to_string();
            changed |= dynamic_snapshot(
                store, backend, faults, driver, &vs, &ns, &name, &uid, &pvc_name,
            );
        } else if let Some(cname) = s(&vs, &["spec", "source", "volumeSnapshotContentName"]) {
            let cname = cname.to_string();
            let content = match store.get(&VOLUME_SNAPSHOT_CONTENTS, "", &cname) {
                Ok(c) => c,
                Err(_) => {
                    changed |= set_vs_error(
                        store,
                        &ns,
                        &name,
                        format!("VolumeSnapshotContent {cname} is missing"),
                    );
                    continue;
                }
            };
            let r = &content["spec"]["volumeSnapshotRef"];
            let ref_uid = s(r, &["uid"]);
            if s(r, &["name"]) != Some(name.as_str())
                || s(r, &["namespace"]) != Some(ns.as_str())
                || ref_uid.is_some_and(|u| u != uid)
            {
                changed |= set_vs_error(
                    store,
                    &ns,
                    &name,
                    format!(
                        "SnapshotContentMisbound: VolumeSnapshotContent {cname} is bound to a different snapshot"
                    ),
                );
                continue;
            }
            if s(&content, &["spec", "source", "snapshotHandle"]).is_none() {
                changed |= set_vs_error(
                    store,
                    &ns,
                    &name,
                    format!(
                        "SnapshotContentMismatch: VolumeSnapshotContent {cname} has no snapshotHandle"
                    ),
                );
                continue;
            }
            if ref_uid.is_none() {
                let vs_class = s(&vs, &["spec", "volumeSnapshotClassName"]).map(str::to_string);
                changed |= store.controller_update(&VOLUME_SNAPSHOT_CONTENTS, "", &cname, |o| {
                    o["spec"]["volumeSnapshotRef"]["uid"] = json!(uid);
                    if let Some(class) = vs_class
                        && s(o, &["spec", "volumeSnapshotClassName"]).is_none()
                    {
                        o["spec"]["volumeSnapshotClassName"] = json!(class);
                    }
                });
            }
            // Binding is recorded even before the content is ready.
            if let Ok(content) = store.get(&VOLUME_SNAPSHOT_CONTENTS, "", &cname) {
                changed |= sync_vs_from_content(store, &ns, &name, &content);
            }
        }
    }
    changed
}

#[allow(clippy::too_many_arguments)]
fn dynamic_snapshot(
    store: &mut Store,
    backend: &SharedBackend,
    faults: &Faults,
    driver: &str,
    vs: &Value,
    ns: &str,
    name: &str,
    uid: &str,
    pvc_name: &str,
) -> bool {
    let class = match find_class(store, vs, driver) {
        Ok(c) => c,
        Err(message) => return set_vs_error(store, ns, name, message),
    };
    if s(&class, &["driver"]) != Some(driver) {
        // Another driver's snapshot: nobody here serves it.
        return false;
    }
    let pvc = match store.get(&PVCS, ns, pvc_name) {
        Ok(p) => p,
        Err(_) => {
            return set_vs_error(
                store,
                ns,
                name,
                format!(
                    "failed to get input parameters to create snapshot {name}: PersistentVolumeClaim {ns}/{pvc_name} not found"
                ),
            );
        }
    };
    if s(&pvc, &["status", "phase"]) != Some("Bound") {
        return set_vs_error(
            store,
            ns,
            name,
            format!(
                "the PVC {pvc_name} is not yet bound to a PV, will not attempt to take a snapshot"
            ),
        );
    }
    if let Some(message) = faults.snapshot_error() {
        return set_vs_error(
            store,
            ns,
            name,
            format!("failed to take snapshot of the volume: {message}"),
        );
    }
    let (volume, snap) = if backend.data_dir().is_some() {
        // Data-backed: the bytes of the PV's volume file are copied.
        match crate::volumes::snapshot_pvc(store, backend, &pvc) {
            Ok(cut) => cut,
            Err(message) => return set_vs_error(store, ns, name, message),
        }
    } else {
        let size = s(&pvc, &["status", "capacity", "storage"])
            .or_else(|| s(&pvc, &["spec", "resources", "requests", "storage"]))
            .and_then(parse_quantity)
            .unwrap_or(0);
        let volume = s(&pvc, &["spec", "volumeName"])
            .unwrap_or(pvc_name)
            .to_string();
        let snap = backend.create_snapshot(&volume, size);
        (volume, snap)
    };
    let cname = format!("snapcontent-{uid}");
    let content = json!({
        "metadata": {"name": cname},
        "spec": {
            "volumeSnapshotRef": {
                "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                "name": name, "namespace": ns, "uid": uid,
            },
            "deletionPolicy": class["deletionPolicy"].clone(),
            "driver": driver,
            "source": {"volumeHandle": volume},
            "volumeSnapshotClassName": class["metadata"]["name"].clone(),
            "sourceVolumeMode": s(&pvc, &["spec", "volumeMode"]).unwrap_or("Filesystem"),
        },
        "status": {
            "snapshotHandle": snap.handle,
            "readyToUse": !faults.never_ready(),
            "restoreSize": snap.size_bytes,
            "creationTime": snap.created_unix_nanos,
        },
    });
    store.controller_create(&VOLUME_SNAPSHOT_CONTENTS, "", content.clone());
    let class_name = class["metadata"]["name"].clone();
    store.controller_update(&VOLUME_SNAPSHOTS, ns, name, |o| {
        if s(o, &["spec", "volumeSnapshotClassName"]).is_none() {
            o["spec"]["volumeSnapshotClassName"] = class_name;
        }
    });
    if let Ok(content) = store.get(&VOLUME_SNAPSHOT_CONTENTS, "", &cname) {
        sync_vs_from_content(store, ns, name, &content);
    }
    true
}

/// What the snapshot provisioner has looked at: claims restoring a snapshot that are not bound
/// yet, and the store's resourceVersion up to which changed claims were added to them.
#[derive(Default)]
pub(crate) struct ProvisionerScan {
    seen_rv: Option<u64>,
    waiting: std::collections::BTreeSet<(String, String)>,
}

/// A claim the provisioner has to act on: restoring a snapshot, not bound yet.
fn restores_unbound(pvc: &Value) -> bool {
    // The data source first: most claims have none, and that lookup fails fastest.
    pvc["spec"].get("dataSource").is_some()
        && s(pvc, &["spec", "dataSource", "kind"]) == Some("VolumeSnapshot")
        && s(pvc, &["status", "phase"]) != Some("Bound")
}

fn provisioner(store: &mut Store, driver: &str, scan: &mut ProvisionerScan) -> bool {
    let mut changed = false;
    // A pass looks at the claims changed since the last one plus those still waiting for their
    // snapshot: what changed, not every PVC (a full list only when the change log no longer
    // reaches back, or on the first pass).
    let key = |o: &Value| {
        (
            s(o, &["metadata", "namespace"]).unwrap_or("").to_string(),
            s(o, &["metadata", "name"]).unwrap_or("").to_string(),
        )
    };
    let now = store.resource_version();
    let fresh: Option<Vec<(String, String)>> = scan
        .seen_rv
        .and_then(|rv| store.changes_since(rv))
        .map(|events| {
            events
                .filter(|e| e.rt.plural == PVCS.plural && e.kind != "DELETED")
                .filter(|e| restores_unbound(&e.object))
                .map(|e| key(&e.object))
                .collect()
        });
    match fresh {
        Some(keys) => scan.waiting.extend(keys),
        None => {
            scan.waiting = store
                .list_where(&PVCS, None, restores_unbound)
                .iter()
                .map(key)
                .collect();
        }
    }
    scan.seen_rv = Some(now);
    let todo: Vec<Value> = std::mem::take(&mut scan.waiting)
        .into_iter()
        .filter_map(|(ns, name)| store.get(&PVCS, &ns, &name).ok())
        .filter(restores_unbound)
        .collect();
    for pvc in todo {
        // Only this cluster's driver provisions, and only for classes it is the provisioner of;
        // any other PVC stays Pending, as with a real external-provisioner.
        let class_driver = s(&pvc, &["spec", "storageClassName"])
            .and_then(|c| store.get(&STORAGE_CLASSES, "", c).ok())
            .and_then(|c| s(&c, &["provisioner"]).map(str::to_string));
        if class_driver.as_deref() != Some(driver) {
            // Its class may yet appear (or be this driver's): keep looking at it.
            scan.waiting.insert(key(&pvc));
            if pvc["status"].is_null() {
                let (ns, name) = (
                    s(&pvc, &["metadata", "namespace"])
                        .unwrap_or("")
                        .to_string(),
                    s(&pvc, &["metadata", "name"]).unwrap_or("").to_string(),
                );
                changed |= store.controller_update(&PVCS, &ns, &name, |o| {
                    o["status"] = json!({"phase": "Pending"});
                });
            }
            continue;
        }
        let (Some(ns), Some(name), Some(vs_name)) = (
            s(&pvc, &["metadata", "namespace"]).map(str::to_string),
            s(&pvc, &["metadata", "name"]).map(str::to_string),
            s(&pvc, &["spec", "dataSource", "name"]).map(str::to_string),
        ) else {
            continue;
        };
        let requested = s(&pvc, &["spec", "resources", "requests", "storage"])
            .and_then(parse_quantity)
            .unwrap_or(0);
        let ready_size = store
            .get(&VOLUME_SNAPSHOTS, &ns, &vs_name)
            .ok()
            .and_then(|vs| {
                (vs["status"]["readyToUse"] == json!(true)).then(|| {
                    s(&vs, &["status", "restoreSize"])
                        .and_then(parse_quantity)
                        .unwrap_or(0)
                })
            });
        let uid = s(&pvc, &["metadata", "uid"]).unwrap_or("").to_string();
        let request = pvc["spec"]["resources"]["requests"]["storage"].clone();
        let modes = pvc["spec"]["accessModes"].clone();
        if !matches!(ready_size, Some(size) if requested >= size) {
            scan.waiting.insert((ns.clone(), name.clone()));
        }
        changed |= store.controller_update(&PVCS, &ns, &name, |o| match ready_size {
            Some(size) if requested >= size => {
                o["spec"]["volumeName"] = json!(format!("pv-{uid}"));
                o["status"] = json!({"phase": "Bound", "capacity": {"storage": request}, "accessModes": modes});
            }
            _ => o["status"] = json!({"phase": "Pending"}),
        });
    }
    changed
}

/// DELETE with the controllers' side effects: a dynamic snapshot takes its
/// content along, and a `Delete`-policy content takes the backend snapshot along.
pub(crate) fn delete_with_effects(
    store: &mut Store,
    backend: &SharedBackend,
    driver: &str,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let deleted = store.delete(rt, ns, name, dry_run)?;
    // Dry run, or held by finalizers: nothing is gone yet.
    if dry_run || store.get(rt, ns, name).is_ok() {
        return Ok(deleted);
    }
    if rt == &VOLUME_SNAPSHOTS
        && s(&deleted, &["spec", "source", "persistentVolumeClaimName"]).is_some()
        && let Some(cname) = s(&deleted, &["status", "boundVolumeSnapshotContentName"])
        && let Ok(content) = store.get(&VOLUME_SNAPSHOT_CONTENTS, "", cname)
        && s(&content, &["spec", "deletionPolicy"]) == Some("Delete")
    {
        let cname = cname.to_string();
        delete_with_effects(
            store,
            backend,
            driver,
            &VOLUME_SNAPSHOT_CONTENTS,
            "",
            &cname,
            false,
        )?;
    }
    crate::groups::after_delete(store, backend, driver, rt, &deleted)?;
    if rt == &VOLUME_SNAPSHOT_CONTENTS
        && s(&deleted, &["spec", "deletionPolicy"]) == Some("Delete")
        && s(&deleted, &["spec", "driver"]) == Some(driver)
        && let Some(handle) = s(&deleted, &["status", "snapshotHandle"])
    {
        backend.delete(handle);
    }
    Ok(deleted)
}
