//! Typed `snapshot.storage.k8s.io/v1` objects: VolumeSnapshot,
//! VolumeSnapshotContent and VolumeSnapshotClass, with the field names and
//! casing of the upstream CRDs (external-snapshotter v8).
//!
//! These types only describe objects; reading and writing them is done with
//! `kube::Api` by the callers. The CRDs are installed by the cluster's snapshot
//! controller, never by us, so no schema is derived.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use kube::Resource;
use kube::core::object::HasStatus;
use serde::{Deserialize, Serialize};

/// API group of the snapshot objects.
pub const GROUP: &str = "snapshot.storage.k8s.io";
/// Annotation marking a VolumeSnapshotClass as its driver's default.
pub const DEFAULT_CLASS_ANNOTATION: &str = "snapshot.storage.kubernetes.io/is-default-class";

/// What happens to the storage snapshot when its content object is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// The backend snapshot is deleted with the content object.
    #[default]
    Delete,
    /// The backend snapshot outlives the content object.
    Retain,
}

/// Volume mode of the volume a snapshot was cut from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeMode {
    /// A mounted filesystem.
    Filesystem,
    /// A raw block device.
    Block,
}

impl VolumeMode {
    /// The string Kubernetes uses.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        }
    }
}

/// `spec` of a VolumeSnapshot.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    plural = "volumesnapshots",
    shortname = "vs",
    namespaced,
    status = "VolumeSnapshotStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    /// Where the snapshot comes from (exactly one member; immutable).
    pub source: VolumeSnapshotSource,
    /// Class to use; absent means the driver's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// `spec.source` of a VolumeSnapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    /// Dynamic snapshot of this PVC (same namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    /// Pre-provisioned: bind to this existing VolumeSnapshotContent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

/// `status.error` of snapshot objects.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotError {
    /// When the error was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// What went wrong, as reported by the controller or driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `status` of a VolumeSnapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    /// Name of the content this snapshot is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// When the storage system cut the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Whether the snapshot can be restored from; absent = unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Minimum size of a volume restored from it (a Quantity here, bytes on the content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<Quantity>,
    /// Last error; cleared on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// Group snapshot this one belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_name: Option<String>,
}

/// `spec` of a VolumeSnapshotContent (cluster scoped).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotContent",
    plural = "volumesnapshotcontents",
    shortname = "vsc",
    status = "VolumeSnapshotContentStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    /// The VolumeSnapshot this content is (or will be) bound to: name and namespace, uid once bound.
    pub volume_snapshot_ref: ObjectReference,
    /// What deleting this object does to the backend snapshot.
    pub deletion_policy: DeletionPolicy,
    /// CSI driver name.
    pub driver: String,
    /// Class the snapshot belongs to (needed for CBT calls and secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// Exactly one of volume handle (dynamic) or snapshot handle (pre-provisioned).
    pub source: VolumeSnapshotContentSource,
    /// Mode of the source volume. Upstream's Go field has no `omitempty`, so an
    /// unset value travels as JSON `null`; we write it the same way.
    #[serde(default)]
    pub source_volume_mode: Option<VolumeMode>,
}

/// `spec.source` of a VolumeSnapshotContent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSource {
    /// CSI volume id to snapshot (dynamic provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
    /// CSI snapshot id of an existing snapshot (pre-provisioned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
}

/// `status` of a VolumeSnapshotContent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    /// CSI snapshot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// Creation time in Unix nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Restore size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// Whether the snapshot is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// Group snapshot handle, if part of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
}

/// Fields of a VolumeSnapshotClass, which has no `spec`: they sit at the top level.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotClass",
    plural = "volumesnapshotclasses",
    shortname = "vsclass",
    no_spec,
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClassFields {
    /// CSI driver that handles snapshots of this class.
    pub driver: String,
    /// Driver-specific parameters (secrets are referenced here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// Policy given to dynamically created contents.
    pub deletion_policy: DeletionPolicy,
}

/// A snapshot class (plain or group): which annotation marks its driver's default.
pub trait SnapshotClass: Resource {
    /// The annotation that, set to `"true"`, makes this class its driver's default.
    const DEFAULT_ANNOTATION: &'static str;

    /// True if annotated as its driver's default class.
    fn is_default(&self) -> bool {
        self.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(Self::DEFAULT_ANNOTATION))
            .is_some_and(|v| v == "true")
    }
}

impl SnapshotClass for VolumeSnapshotClass {
    const DEFAULT_ANNOTATION: &'static str = DEFAULT_CLASS_ANNOTATION;
}

/// The two `status` fields every snapshot object shares, plain or group, snapshot or content.
pub trait SnapshotStatusFields {
    /// `readyToUse`; absent = unknown.
    fn ready_to_use(&self) -> Option<bool>;
    /// `error`, the last one reported.
    fn error(&self) -> Option<&VolumeSnapshotError>;
}

/// Readiness and error of any snapshot object, read through its [`SnapshotStatusFields`]; one
/// definition so a wait on a VolumeSnapshot and one on a group judge alike.
pub trait SnapshotState: HasStatus<Status: SnapshotStatusFields> {
    /// `status.readyToUse == true`.
    fn is_ready(&self) -> bool {
        self.status()
            .and_then(SnapshotStatusFields::ready_to_use)
            .unwrap_or(false)
    }

    /// `status.error.message`, if any.
    fn error_message(&self) -> Option<&str> {
        self.status()
            .and_then(SnapshotStatusFields::error)
            .and_then(|e| e.message.as_deref())
    }
}

impl<T: HasStatus<Status: SnapshotStatusFields>> SnapshotState for T {}

/// Implements [`SnapshotStatusFields`] for status structs with `ready_to_use` and `error`.
macro_rules! snapshot_status_fields {
    ($($status:ty),+ $(,)?) => {$(
        impl $crate::snapshot::SnapshotStatusFields for $status {
            fn ready_to_use(&self) -> Option<bool> {
                self.ready_to_use
            }
            fn error(&self) -> Option<&$crate::snapshot::VolumeSnapshotError> {
                self.error.as_ref()
            }
        }
    )+};
}
pub(crate) use snapshot_status_fields;

snapshot_status_fields!(VolumeSnapshotStatus, VolumeSnapshotContentStatus);

impl VolumeSnapshot {
    /// `status.boundVolumeSnapshotContentName`, if bound.
    pub fn bound_content(&self) -> Option<&str> {
        self.status
            .as_ref()
            .and_then(|s| s.bound_volume_snapshot_content_name.as_deref())
    }
}

impl VolumeSnapshotContent {
    /// The CSI snapshot id: status first, else the pre-provisioned source.
    pub fn snapshot_handle(&self) -> Option<&str> {
        self.status
            .as_ref()
            .and_then(|s| s.snapshot_handle.as_deref())
            .or(self.spec.source.snapshot_handle.as_deref())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::{Value, json};

    #[test]
    fn wire_shapes_match_the_crds() {
        let vsc: VolumeSnapshotContent = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "c"},
            "spec": {"volumeSnapshotRef": {"name": "s", "namespace": "n", "uid": "u"},
                     "deletionPolicy": "Retain", "driver": "d",
                     "source": {"snapshotHandle": "h"}, "sourceVolumeMode": null},
            "status": {"snapshotHandle": "h", "creationTime": 1700000000000000000i64,
                       "restoreSize": 1073741824, "readyToUse": true}
        }))
        .unwrap();
        assert_eq!(vsc.spec.source_volume_mode, None);
        assert_eq!(vsc.snapshot_handle(), Some("h"));
        assert!(vsc.is_ready());
        let back = serde_json::to_value(&vsc).unwrap();
        // No omitempty upstream: null is written, not dropped.
        assert!(
            back["spec"]
                .as_object()
                .unwrap()
                .contains_key("sourceVolumeMode")
        );
        assert_eq!(back["spec"]["deletionPolicy"], "Retain");
        assert_eq!(back["status"]["restoreSize"], 1073741824);

        let vs: VolumeSnapshot = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "s", "namespace": "n"},
            "spec": {"source": {"persistentVolumeClaimName": "p"}},
            "status": {"readyToUse": false, "restoreSize": "1Gi",
                       "error": {"time": "2024-01-01T00:00:00Z", "message": "boom"}}
        }))
        .unwrap();
        assert_eq!(vs.error_message(), Some("boom"));
        // restoreSize is int-or-string in the CRD.
        let numeric: VolumeSnapshotStatus =
            serde_json::from_value(json!({"restoreSize": 1073741824, "readyToUse": true})).unwrap();
        assert_eq!(
            crate::quantity::to_bytes(&numeric.restore_size.unwrap()).unwrap(),
            1 << 30
        );
        assert_eq!(VolumeSnapshot::plural(&()), "volumesnapshots");

        let class: VolumeSnapshotClass = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
            "metadata": {"name": "k", "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
            "driver": "d", "deletionPolicy": "Delete", "parameters": {"a": "b"}
        }))
        .unwrap();
        assert!(class.is_default());
        let back = serde_json::to_value(&class).unwrap();
        assert_eq!(back["driver"], "d");
        assert!(back.get("spec").is_none());
        assert_eq!(back["kind"], "VolumeSnapshotClass");
    }

    /// The shared accessors answer for all four snapshot objects from their own wire shape,
    /// and each class kind honours only its own default annotation.
    #[test]
    fn every_snapshot_object_reads_ready_and_error_through_the_shared_traits() {
        use crate::group_snapshot::{
            self as g, VolumeGroupSnapshot, VolumeGroupSnapshotClass, VolumeGroupSnapshotContent,
        };
        fn state<K: SnapshotState>(k: &K) -> (bool, Option<&str>) {
            (k.is_ready(), k.error_message())
        }
        let status = json!({"readyToUse": true, "error": {"message": "late"}});
        let failed = json!({"readyToUse": false, "error": {"message": "boom"}});
        let obj = |api: &str, kind: &str, spec: Value, status: &Value| {
            json!({"apiVersion": api, "kind": kind, "metadata": {"name": "x"},
                   "spec": spec, "status": status})
        };
        let vs_spec = json!({"source": {"persistentVolumeClaimName": "p"}});
        let vsc_spec = json!({"volumeSnapshotRef": {"name": "s"}, "deletionPolicy": "Delete",
                              "driver": "d", "source": {"snapshotHandle": "h"}});
        let vgs_spec = json!({"source": {"selector": {"matchLabels": {"a": "b"}}}});
        let vgsc_spec = json!({"volumeGroupSnapshotRef": {"name": "g"},
                               "deletionPolicy": "Delete", "driver": "d",
                               "source": {"volumeHandles": ["v"]}});
        let v1 = "snapshot.storage.k8s.io/v1";
        let gv1 = "groupsnapshot.storage.k8s.io/v1";
        for (st, want) in [
            (&status, (true, Some("late"))),
            (&failed, (false, Some("boom"))),
        ] {
            let vs: VolumeSnapshot =
                serde_json::from_value(obj(v1, "VolumeSnapshot", vs_spec.clone(), st)).unwrap();
            let vsc: VolumeSnapshotContent =
                serde_json::from_value(obj(v1, "VolumeSnapshotContent", vsc_spec.clone(), st))
                    .unwrap();
            let vgs: VolumeGroupSnapshot =
                serde_json::from_value(obj(gv1, "VolumeGroupSnapshot", vgs_spec.clone(), st))
                    .unwrap();
            let vgsc: VolumeGroupSnapshotContent = serde_json::from_value(obj(
                gv1,
                "VolumeGroupSnapshotContent",
                vgsc_spec.clone(),
                st,
            ))
            .unwrap();
            assert_eq!(state(&vs), want);
            assert_eq!(state(&vsc), want);
            assert_eq!(state(&vgs), want);
            assert_eq!(state(&vgsc), want);
        }
        let unset: VolumeSnapshot = serde_json::from_value(json!({
            "apiVersion": v1, "kind": "VolumeSnapshot", "metadata": {"name": "x"},
            "spec": vs_spec
        }))
        .unwrap();
        assert_eq!(state(&unset), (false, None));

        let class = |api: &str, kind: &str, annotation: &str| {
            json!({"apiVersion": api, "kind": kind,
                   "metadata": {"name": "k", "annotations": {annotation: "true"}},
                   "driver": "d", "deletionPolicy": "Delete"})
        };
        let own: VolumeSnapshotClass =
            serde_json::from_value(class(v1, "VolumeSnapshotClass", DEFAULT_CLASS_ANNOTATION))
                .unwrap();
        let other: VolumeSnapshotClass = serde_json::from_value(class(
            v1,
            "VolumeSnapshotClass",
            g::DEFAULT_CLASS_ANNOTATION,
        ))
        .unwrap();
        assert!(own.is_default());
        assert!(!other.is_default());
        let own: VolumeGroupSnapshotClass = serde_json::from_value(class(
            gv1,
            "VolumeGroupSnapshotClass",
            g::DEFAULT_CLASS_ANNOTATION,
        ))
        .unwrap();
        let other: VolumeGroupSnapshotClass = serde_json::from_value(class(
            gv1,
            "VolumeGroupSnapshotClass",
            DEFAULT_CLASS_ANNOTATION,
        ))
        .unwrap();
        assert!(own.is_default());
        assert!(!other.is_default());
    }
}
