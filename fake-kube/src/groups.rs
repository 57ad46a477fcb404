//! The simulated group snapshot controller and CSI driver (`groupsnapshot.storage.k8s.io/v1`,
//! served when [`crate::FakeKubeBuilder::group_snapshot_api`] is set).
//!
//! It follows external-snapshotter v8 for a dynamic VolumeGroupSnapshot (`spec.source.selector`)
//! whose class (named, else the driver's default by the
//! `groupsnapshot.storage.kubernetes.io/is-default-class` annotation) is this cluster's driver:
//! - the bound PVCs of its namespace matching the selector are the members (none, or one not
//!   bound: `status.error`, and no retry, like the per-snapshot simulation);
//! - every member's backend snapshot is cut at one instant (with a data directory the volume
//!   files are copied while the store lock is held, see [`SharedBackend::snapshot_group`]);
//! - a VolumeGroupSnapshotContent `groupsnapcontent-<group uid>` lists the volume handles in
//!   `spec.source.volumeHandles` and the `volumeHandle`/`snapshotHandle` pairs in
//!   `status.volumeSnapshotInfoList`;
//! - one member VolumeSnapshot `snapshot-<sha256(group uid + volume handle)>` per volume, owned
//!   by the group, with the in-group finalizer, `spec.source.persistentVolumeClaimName` and
//!   `status.volumeGroupSnapshotName`, bound to a VolumeSnapshotContent
//!   `snapcontent-<same digest>` (source `volumeHandle`, `status.snapshotHandle`,
//!   `status.volumeGroupSnapshotHandle`, the group's deletion policy);
//! - the group gets `boundVolumeGroupSnapshotContentName`, `creationTime` and `readyToUse`.
//!
//! Faults: [`crate::Faults::set_snapshot_error`] fails the group's creation (error status);
//! [`crate::Faults::set_never_ready`] keeps the group, its content and members not ready until
//! healed. Deleting a group deletes its members (the garbage collector's work upstream, done at
//! once here), which with the `Delete` policy deletes their contents and backend snapshots, and
//! its `Delete`-policy content. A member deleted on its own stays terminating, held by the
//! in-group finalizer, until its group goes. Pre-provisioned groups
//! (`volumeGroupSnapshotContentName`) are not simulated: they get an error status.

use serde_json::{Value, json};

use crate::backend::{BackendSnapshot, SharedBackend};
use crate::faults::Faults;
use crate::store::{
    ApiError, Cause, PVCS, ResourceType, Selector, Store, VOLUME_SNAPSHOT_CONTENTS,
    VOLUME_SNAPSHOTS,
};
use crate::values::{format_quantity, parse_quantity, rfc3339_from_unix_nanos, rfc3339_now};

/// VolumeGroupSnapshot (namespaced, status subresource).
pub(crate) static VOLUME_GROUP_SNAPSHOTS: ResourceType = ResourceType {
    group: "groupsnapshot.storage.k8s.io",
    version: "v1",
    plural: "volumegroupsnapshots",
    kind: "VolumeGroupSnapshot",
    namespaced: true,
    status_subresource: true,
    crd: true,
};
/// VolumeGroupSnapshotContent (cluster scoped, status subresource).
pub(crate) static VOLUME_GROUP_SNAPSHOT_CONTENTS: ResourceType = ResourceType {
    group: "groupsnapshot.storage.k8s.io",
    version: "v1",
    plural: "volumegroupsnapshotcontents",
    kind: "VolumeGroupSnapshotContent",
    namespaced: false,
    status_subresource: true,
    crd: true,
};
/// VolumeGroupSnapshotClass (cluster scoped, no spec, no status).
pub(crate) static VOLUME_GROUP_SNAPSHOT_CLASSES: ResourceType = ResourceType {
    group: "groupsnapshot.storage.k8s.io",
    version: "v1",
    plural: "volumegroupsnapshotclasses",
    kind: "VolumeGroupSnapshotClass",
    namespaced: false,
    status_subresource: false,
    crd: true,
};

/// The kinds this module adds to the served table.
pub(crate) static GROUP_TYPES: [&ResourceType; 3] = [
    &VOLUME_GROUP_SNAPSHOTS,
    &VOLUME_GROUP_SNAPSHOT_CONTENTS,
    &VOLUME_GROUP_SNAPSHOT_CLASSES,
];

const DEFAULT_CLASS_ANNOTATION: &str = "groupsnapshot.storage.kubernetes.io/is-default-class";
/// Finalizer on member VolumeSnapshots (external-snapshotter `VolumeSnapshotInGroupFinalizer`).
pub(crate) const MEMBER_FINALIZER: &str =
    "snapshot.storage.kubernetes.io/volumesnapshot-in-group-protection";

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|x| !x.is_empty())
}

fn invalid(field: &str, message: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        field: field.to_string(),
        message: message.to_string(),
    }
}

fn required(field: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        field: field.to_string(),
        message: "Required value".to_string(),
    }
}

fn present(v: &Value) -> bool {
    !v.is_null()
}

/// The CRDs' create-time rules (schema `required`, enums and the CEL rules without `oldSelf`).
pub(crate) fn validate(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if rt == &VOLUME_GROUP_SNAPSHOTS {
        let source = &obj["spec"]["source"];
        if !source.is_object() {
            causes.push(required("spec.source"));
        } else if present(&source["selector"]) == present(&source["volumeGroupSnapshotContentName"])
        {
            causes.push(invalid(
                "spec.source",
                "exactly one of selector and volumeGroupSnapshotContentName must be set",
            ));
        }
        if obj["spec"]["volumeGroupSnapshotClassName"].as_str() == Some("") {
            causes.push(invalid(
                "spec.volumeGroupSnapshotClassName",
                "volumeGroupSnapshotClassName must not be the empty string when set",
            ));
        }
    } else if rt == &VOLUME_GROUP_SNAPSHOT_CONTENTS {
        let r = &obj["spec"]["volumeGroupSnapshotRef"];
        if !r.is_object() {
            causes.push(required("spec.volumeGroupSnapshotRef"));
        } else if s(r, &["name"]).is_none() || s(r, &["namespace"]).is_none() {
            causes.push(invalid(
                "spec.volumeGroupSnapshotRef",
                "both volumeGroupSnapshotRef.name and volumeGroupSnapshotRef.namespace must be set",
            ));
        }
        if s(obj, &["spec", "driver"]).is_none() {
            causes.push(required("spec.driver"));
        }
        policy(
            obj,
            &["spec", "deletionPolicy"],
            "spec.deletionPolicy",
            &mut causes,
        );
        let source = &obj["spec"]["source"];
        if !source.is_object() {
            causes.push(required("spec.source"));
        } else if present(&source["volumeHandles"]) == present(&source["groupSnapshotHandles"]) {
            causes.push(invalid(
                "spec.source",
                "exactly one of volumeHandles and groupSnapshotHandles must be set",
            ));
        }
    } else if rt == &VOLUME_GROUP_SNAPSHOT_CLASSES {
        if s(obj, &["driver"]).is_none() {
            causes.push(required("driver"));
        }
        policy(obj, &["deletionPolicy"], "deletionPolicy", &mut causes);
    }
    causes
}

fn policy(obj: &Value, path: &[&str], field: &str, causes: &mut Vec<Cause>) {
    match s(obj, path) {
        None => causes.push(required(field)),
        Some("Delete" | "Retain") => {}
        Some(other) => causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: field.to_string(),
            message: format!(
                "Unsupported value: \"{other}\": supported values: \"Delete\", \"Retain\""
            ),
        }),
    }
}

/// The CRDs' update rules (`self == oldSelf` CEL rules).
pub(crate) fn immutability(rt: &ResourceType, old: &Value, new: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let fixed = |path: &[&str], field: &str, once_set: bool, causes: &mut Vec<Cause>| {
        let (mut o, mut n) = (old, new);
        for p in path {
            o = &o[*p];
            n = &n[*p];
        }
        if (!once_set || !o.is_null()) && o != n {
            causes.push(invalid(field, &format!("{field} is immutable")));
        }
    };
    if rt == &VOLUME_GROUP_SNAPSHOTS {
        fixed(&["spec", "source"], "spec.source", false, &mut causes);
        fixed(
            &["spec", "volumeGroupSnapshotClassName"],
            "spec.volumeGroupSnapshotClassName",
            true,
            &mut causes,
        );
    } else if rt == &VOLUME_GROUP_SNAPSHOT_CONTENTS {
        fixed(&["spec", "source"], "spec.source", false, &mut causes);
        fixed(&["spec", "driver"], "spec.driver", false, &mut causes);
    } else if rt == &VOLUME_GROUP_SNAPSHOT_CLASSES {
        for f in ["driver", "parameters", "deletionPolicy"] {
            fixed(&[f], f, false, &mut causes);
        }
    }
    causes
}

/// A LabelSelector object as a `labelSelector` query string (what the controller lists with).
fn selector_query(sel: &Value) -> Result<String, String> {
    let mut parts = Vec::new();
    if let Some(labels) = sel["matchLabels"].as_object() {
        for (k, v) in labels {
            parts.push(format!("{k}={}", v.as_str().unwrap_or("")));
        }
    }
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = s(e, &["key"]).ok_or("a matchExpression without a key")?;
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match s(e, &["operator"]) {
            Some("In") => format!("{key} in ({})", values.join(",")),
            Some("NotIn") => format!("{key} notin ({})", values.join(",")),
            Some("Exists") => key.to_string(),
            Some("DoesNotExist") => format!("!{key}"),
            other => return Err(format!("unknown operator {other:?} in the selector")),
        });
    }
    Ok(parts.join(","))
}

fn set_group_error(store: &mut Store, ns: &str, name: &str, message: String) -> bool {
    store.controller_update(&VOLUME_GROUP_SNAPSHOTS, ns, name, |o| {
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

fn find_class(store: &Store, vgs: &Value, driver: &str) -> Result<Value, String> {
    if let Some(class) = s(vgs, &["spec", "volumeGroupSnapshotClassName"]) {
        return store
            .get(&VOLUME_GROUP_SNAPSHOT_CLASSES, "", class)
            .map_err(|_| {
                format!("failed to get group snapshot class with name {class}: not found")
            });
    }
    let defaults = crate::controller::default_classes(
        store,
        &VOLUME_GROUP_SNAPSHOT_CLASSES,
        DEFAULT_CLASS_ANNOTATION,
        driver,
    );
    match defaults.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err("cannot find default group snapshot class".into()),
        many => Err(format!(
            "{} default snapshot classes were found",
            many.len()
        )),
    }
}

/// Runs the group snapshot controller once; returns true if anything changed.
pub(crate) fn reconcile(
    store: &mut Store,
    backend: &SharedBackend,
    faults: &Faults,
    driver: &str,
) -> bool {
    let mut changed = false;
    for vgs in store.list(&VOLUME_GROUP_SNAPSHOTS, None, &Selector::default()) {
        let (Some(ns), Some(name)) = (
            s(&vgs, &["metadata", "namespace"]).map(str::to_string),
            s(&vgs, &["metadata", "name"]).map(str::to_string),
        ) else {
            continue;
        };
        if vgs["metadata"].get("deletionTimestamp").is_some() {
            continue;
        }
        if let Some(bound) = s(&vgs, &["status", "boundVolumeGroupSnapshotContentName"]) {
            let bound = bound.to_string();
            changed |= sync_from_content(store, faults, &ns, &name, &bound);
            continue;
        }
        if vgs["status"]["error"].is_object() {
            continue;
        }
        if present(&vgs["spec"]["source"]["volumeGroupSnapshotContentName"]) {
            changed |= set_group_error(
                store,
                &ns,
                &name,
                "fake-kube does not simulate pre-provisioned VolumeGroupSnapshots".into(),
            );
            continue;
        }
        changed |= dynamic_group(store, backend, faults, driver, &vgs, &ns, &name);
    }
    changed
}

/// Keeps a bound group's status in step with its content (readiness once the never-ready
/// fault heals).
fn sync_from_content(
    store: &mut Store,
    faults: &Faults,
    ns: &str,
    name: &str,
    content_name: &str,
) -> bool {
    let Ok(content) = store.get(&VOLUME_GROUP_SNAPSHOT_CONTENTS, "", content_name) else {
        return set_group_error(
            store,
            ns,
            name,
            "VolumeGroupSnapshotContent is missing".into(),
        );
    };
    let mut changed = false;
    if content["status"]["readyToUse"] != json!(true) && !faults.never_ready() {
        changed |=
            store.controller_update(&VOLUME_GROUP_SNAPSHOT_CONTENTS, "", content_name, |o| {
                o["status"]["readyToUse"] = json!(true);
                for info in o["status"]["volumeSnapshotInfoList"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                {
                    info["readyToUse"] = json!(true);
                }
            });
    }
    let Ok(content) = store.get(&VOLUME_GROUP_SNAPSHOT_CONTENTS, "", content_name) else {
        return changed;
    };
    let ready = content["status"]["readyToUse"].clone();
    let created = content["status"]["creationTime"].clone();
    changed |= store.controller_update(&VOLUME_GROUP_SNAPSHOTS, ns, name, |o| {
        o["status"]["readyToUse"] = ready;
        o["status"]["creationTime"] = created;
    });
    changed
}

/// One member as cut: its claim, volume and backend snapshot.
struct Member {
    pvc: String,
    volume_handle: String,
    volume_mode: String,
    snap: BackendSnapshot,
}

/// external-snapshotter's member names: `<prefix>-<sha256(group uid + volume handle)>`.
fn member_name(prefix: &str, group_uid: &str, volume_handle: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{group_uid}{volume_handle}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

#[allow(clippy::too_many_arguments)]
fn dynamic_group(
    store: &mut Store,
    backend: &SharedBackend,
    faults: &Faults,
    driver: &str,
    vgs: &Value,
    ns: &str,
    name: &str,
) -> bool {
    let uid = s(vgs, &["metadata", "uid"]).unwrap_or("").to_string();
    let query = match selector_query(&vgs["spec"]["source"]["selector"]) {
        Ok(q) => q,
        Err(message) => return set_group_error(store, ns, name, message),
    };
    let selector = match Selector::parse(Some(&query), None) {
        Ok(sel) => sel,
        Err(e) => return set_group_error(store, ns, name, e.message),
    };
    let pvcs = store.list(&PVCS, Some(ns), &selector);
    if pvcs.is_empty() {
        return set_group_error(
            store,
            ns,
            name,
            format!("label selector {query} for group snapshot not applied to any PVC"),
        );
    }
    if let Some(unbound) = pvcs
        .iter()
        .find(|p| s(p, &["status", "phase"]) != Some("Bound"))
    {
        return set_group_error(
            store,
            ns,
            name,
            format!(
                "the PVC {} is not yet bound to a PV, will not attempt to take a group snapshot",
                s(unbound, &["metadata", "name"]).unwrap_or("")
            ),
        );
    }
    let class = match find_class(store, vgs, driver) {
        Ok(c) => c,
        Err(message) => return set_group_error(store, ns, name, message),
    };
    if s(&class, &["driver"]) != Some(driver) {
        // Another driver's group: nobody here serves it.
        return false;
    }
    if let Some(message) = faults.snapshot_error() {
        return set_group_error(
            store,
            ns,
            name,
            format!("failed to take group snapshot of the volumes: {message}"),
        );
    }
    let members = match cut(store, backend, &pvcs) {
        Ok(m) => m,
        Err(message) => return set_group_error(store, ns, name, message),
    };
    let created = members
        .first()
        .map(|m| m.snap.created_unix_nanos)
        .unwrap_or_default();
    let ready = !faults.never_ready();
    let policy = class["deletionPolicy"].clone();
    let class_name = class["metadata"]["name"].clone();
    let group_handle = format!("groupsnap-{uid}");
    let content_name = format!("groupsnapcontent-{uid}");
    let infos: Vec<Value> = members
        .iter()
        .map(|m| {
            json!({
                "volumeHandle": m.volume_handle, "snapshotHandle": m.snap.handle,
                "creationTime": m.snap.created_unix_nanos, "restoreSize": m.snap.size_bytes,
                "readyToUse": ready,
            })
        })
        .collect();
    store.controller_create(
        &VOLUME_GROUP_SNAPSHOT_CONTENTS,
        "",
        json!({
            "metadata": {"name": content_name},
            "spec": {
                "volumeGroupSnapshotRef": {
                    "apiVersion": VOLUME_GROUP_SNAPSHOTS.api_version(),
                    "kind": "VolumeGroupSnapshot", "name": name, "namespace": ns, "uid": uid,
                },
                "deletionPolicy": policy, "driver": driver,
                "source": {"volumeHandles": members.iter().map(|m| m.volume_handle.clone()).collect::<Vec<_>>()},
                "volumeGroupSnapshotClassName": class_name,
            },
            "status": {
                "volumeGroupSnapshotHandle": group_handle,
                "creationTime": rfc3339_from_unix_nanos(created),
                "readyToUse": ready,
                "volumeSnapshotInfoList": infos,
            },
        }),
    );
    for m in &members {
        let vs_name = member_name("snapshot", &uid, &m.volume_handle);
        let vsc_name = member_name("snapcontent", &uid, &m.volume_handle);
        store.controller_create(
            &VOLUME_SNAPSHOTS,
            ns,
            json!({
                "metadata": {
                    "name": vs_name, "namespace": ns,
                    "ownerReferences": [{
                        "apiVersion": VOLUME_GROUP_SNAPSHOTS.api_version(),
                        "kind": "VolumeGroupSnapshot", "name": name, "uid": uid,
                    }],
                    "finalizers": [MEMBER_FINALIZER],
                },
                "spec": {"source": {"persistentVolumeClaimName": m.pvc}},
                "status": {
                    "boundVolumeSnapshotContentName": vsc_name,
                    "readyToUse": ready,
                    "restoreSize": format_quantity(m.snap.size_bytes),
                    "creationTime": rfc3339_from_unix_nanos(m.snap.created_unix_nanos),
                    "volumeGroupSnapshotName": name,
                },
            }),
        );
        let vs_uid = store
            .get(&VOLUME_SNAPSHOTS, ns, &vs_name)
            .ok()
            .and_then(|v| s(&v, &["metadata", "uid"]).map(str::to_string))
            .unwrap_or_default();
        store.controller_create(
            &VOLUME_SNAPSHOT_CONTENTS,
            "",
            json!({
                "metadata": {"name": vsc_name},
                "spec": {
                    "volumeSnapshotRef": {
                        "kind": "VolumeSnapshot", "name": vs_name, "namespace": ns, "uid": vs_uid,
                    },
                    "deletionPolicy": policy, "driver": driver,
                    "source": {"volumeHandle": m.volume_handle},
                    "sourceVolumeMode": m.volume_mode,
                },
                "status": {
                    "snapshotHandle": m.snap.handle,
                    "volumeGroupSnapshotHandle": group_handle,
                    "creationTime": m.snap.created_unix_nanos,
                    "restoreSize": m.snap.size_bytes,
                    "readyToUse": ready,
                },
            }),
        );
    }
    store.controller_update(&VOLUME_GROUP_SNAPSHOTS, ns, name, |o| {
        if s(o, &["spec", "volumeGroupSnapshotClassName"]).is_none() {
            o["spec"]["volumeGroupSnapshotClassName"] = class_name;
        }
        o["status"] = json!({
            "boundVolumeGroupSnapshotContentName": content_name,
            "creationTime": rfc3339_from_unix_nanos(created),
            "readyToUse": ready,
        });
    });
    true
}

/// CreateVolumeGroupSnapshot: one backend snapshot per claim, one instant for all (the caller
/// holds the store lock). The error is the message the group's status gets.
fn cut(store: &Store, backend: &SharedBackend, pvcs: &[Value]) -> Result<Vec<Member>, String> {
    let mut volumes = Vec::new();
    for pvc in pvcs {
        let pvc_ns = s(pvc, &["metadata", "namespace"]).unwrap_or("");
        let pvc_name = s(pvc, &["metadata", "name"]).unwrap_or("").to_string();
        let mode = s(pvc, &["spec", "volumeMode"])
            .unwrap_or("Filesystem")
            .to_string();
        let size = s(pvc, &["status", "capacity", "storage"])
            .or_else(|| s(pvc, &["spec", "resources", "requests", "storage"]))
            .and_then(parse_quantity)
            .unwrap_or(0);
        let handle = match crate::volumes::volume_handle_of_pvc(store, pvc_ns, &pvc_name) {
            Some(h) => h,
            // Without a data directory seeded claims have no PV: the volume is named as the
            // per-snapshot simulation names it.
            None if backend.data_dir().is_none() => s(pvc, &["spec", "volumeName"])
                .unwrap_or(&pvc_name)
                .to_string(),
            None => {
                return Err(format!(
                    "failed to get input parameters to create group snapshot: PersistentVolume of claim {pvc_ns}/{pvc_name} not found"
                ));
            }
        };
        volumes.push((pvc_name, handle, mode, size));
    }
    let snaps = if backend.data_dir().is_some() {
        let handles: Vec<String> = volumes.iter().map(|v| v.1.clone()).collect();
        backend
            .snapshot_group(&handles)
            .map_err(|e| format!("failed to take group snapshot of the volumes {handles:?}: {e}"))?
    } else {
        let sized: Vec<(String, i64)> = volumes.iter().map(|v| (v.1.clone(), v.3)).collect();
        backend.create_group_snapshot(&sized)
    };
    Ok(volumes
        .into_iter()
        .zip(snaps)
        .map(|((pvc, volume_handle, volume_mode, _), snap)| Member {
            pvc,
            volume_handle,
            volume_mode,
            snap,
        })
        .collect())
}

/// After a DELETE that removed a group: its members go (releasing the in-group finalizer; a
/// `Delete`-policy member takes its content and backend snapshot along), then its content when
/// the policy is `Delete`. After a DELETE that removed a `Delete`-policy group content of this
/// driver: the backend snapshots it lists.
pub(crate) fn after_delete(
    store: &mut Store,
    backend: &SharedBackend,
    driver: &str,
    rt: &ResourceType,
    deleted: &Value,
) -> Result<(), ApiError> {
    if rt == &VOLUME_GROUP_SNAPSHOTS {
        let ns = s(deleted, &["metadata", "namespace"]).unwrap_or("");
        let uid = s(deleted, &["metadata", "uid"]).unwrap_or("");
        for vs in store.list(&VOLUME_SNAPSHOTS, Some(ns), &Selector::default()) {
            let owned = vs["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| {
                    refs.iter()
                        .any(|r| r["kind"] == "VolumeGroupSnapshot" && r["uid"] == uid)
                });
            let Some(vs_name) = s(&vs, &["metadata", "name"]).map(str::to_string) else {
                continue;
            };
            if !owned {
                continue;
            }
            store.controller_update(&VOLUME_SNAPSHOTS, ns, &vs_name, |o| {
                if let Some(f) = o["metadata"]["finalizers"].as_array_mut() {
                    f.retain(|f| f != MEMBER_FINALIZER);
                }
            });
            crate::controller::delete_with_effects(
                store,
                backend,
                driver,
                &VOLUME_SNAPSHOTS,
                ns,
                &vs_name,
                false,
            )?;
        }
        if let Some(content) = s(deleted, &["status", "boundVolumeGroupSnapshotContentName"])
            && let Ok(c) = store.get(&VOLUME_GROUP_SNAPSHOT_CONTENTS, "", content)
            && s(&c, &["spec", "deletionPolicy"]) == Some("Delete")
        {
            let content = content.to_string();
            let gone = store.delete(&VOLUME_GROUP_SNAPSHOT_CONTENTS, "", &content, false)?;
            if store
                .get(&VOLUME_GROUP_SNAPSHOT_CONTENTS, "", &content)
                .is_err()
            {
                after_delete(
                    store,
                    backend,
                    driver,
                    &VOLUME_GROUP_SNAPSHOT_CONTENTS,
                    &gone,
                )?;
            }
        }
    } else if rt == &VOLUME_GROUP_SNAPSHOT_CONTENTS
        && s(deleted, &["spec", "deletionPolicy"]) == Some("Delete")
        && s(deleted, &["spec", "driver"]) == Some(driver)
    {
        // DeleteVolumeGroupSnapshot removes every member snapshot on the storage system.
        for info in deleted["status"]["volumeSnapshotInfoList"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(h) = s(info, &["snapshotHandle"]) {
                backend.delete(h);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_round_trip_to_queries() {
        let sel = json!({"matchLabels": {"app": "pg"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                 {"key": "old", "operator": "DoesNotExist"}]});
        assert_eq!(
            selector_query(&sel).as_deref(),
            Ok("app=pg,tier in (a,b),!old")
        );
        assert!(
            selector_query(&json!({"matchExpressions": [{"key": "k", "operator": "Near"}]}))
                .is_err()
        );
    }

    #[test]
    fn member_names_are_upstreams() {
        let n = member_name("snapshot", "uid", "vol");
        assert_eq!(n.len(), "snapshot-".len() + 64);
        assert_ne!(n, member_name("snapshot", "uid", "vol2"));
    }
}
