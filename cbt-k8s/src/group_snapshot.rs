//! Typed `groupsnapshot.storage.k8s.io/v1` objects: VolumeGroupSnapshot,
//! VolumeGroupSnapshotContent and VolumeGroupSnapshotClass, with the field names and casing of
//! the upstream CRDs (external-snapshotter v8.6; checked against copies of them in
//! `tests/crds` by the tests below).
//!
//! How a group ties to its members (v1 / v1beta2): the snapshot controller creates one
//! VolumeSnapshot per volume, owned by the group (ownerReference) and carrying
//! `status.volumeGroupSnapshotName`, bound to a VolumeSnapshotContent whose `spec.source` is
//! the volume's handle and whose `status.snapshotHandle` is the member's CSI snapshot id. The
//! group's content lists the same pairs in `status.volumeSnapshotInfoList`
//! (`volumeHandle` -> `snapshotHandle`).
//!
//! As with [`crate::snapshot`], these types only describe objects; the CRDs are installed by
//! the cluster's snapshot controller, never by us, so no schema is derived.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, Time,
};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::snapshot::{DeletionPolicy, SnapshotClass, VolumeSnapshotError, snapshot_status_fields};

/// API group of the group snapshot objects.
pub const GROUP: &str = "groupsnapshot.storage.k8s.io";
/// The served version these types speak.
pub const VERSION: &str = "v1";
/// Annotation marking a VolumeGroupSnapshotClass as its driver's default.
pub const DEFAULT_CLASS_ANNOTATION: &str = "groupsnapshot.storage.kubernetes.io/is-default-class";
/// Finalizer the snapshot controller puts on member VolumeSnapshots: a member goes only with
/// its group.
pub const MEMBER_FINALIZER: &str =
    "snapshot.storage.kubernetes.io/volumesnapshot-in-group-protection";

/// `spec` of a VolumeGroupSnapshot.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "groupsnapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeGroupSnapshot",
    plural = "volumegroupsnapshots",
    shortname = "vgs",
    namespaced,
    status = "VolumeGroupSnapshotStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotSpec {
    /// What to snapshot (exactly one member; immutable).
    pub source: VolumeGroupSnapshotSource,
    /// Class to use; absent means the driver's default group class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
}

/// `spec.source` of a VolumeGroupSnapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotSource {
    /// Dynamic: the PVCs of the namespace matching this label selector, cut together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Pre-provisioned: bind to this existing VolumeGroupSnapshotContent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_content_name: Option<String>,
}

/// `status` of a VolumeGroupSnapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotStatus {
    /// Name of the content this group is bound to (check that it points back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_group_snapshot_content_name: Option<String>,
    /// When the storage system cut the group (one instant for every member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Last error; cleared on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// True once every member snapshot is ready; absent = unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
}

/// `spec` of a VolumeGroupSnapshotContent (cluster scoped).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "groupsnapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeGroupSnapshotContent",
    plural = "volumegroupsnapshotcontents",
    shortname = "vgsc",
    status = "VolumeGroupSnapshotContentStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentSpec {
    /// The VolumeGroupSnapshot this content is bound to: name and namespace, uid once bound.
    pub volume_group_snapshot_ref: ObjectReference,
    /// What deleting the bound group does to this content and the backend snapshots.
    pub deletion_policy: DeletionPolicy,
    /// CSI driver name.
    pub driver: String,
    /// Class the group was cut with (set for dynamic provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
    /// Exactly one of the volume handles (dynamic) or the group's snapshot handles
    /// (pre-provisioned).
    pub source: VolumeGroupSnapshotContentSource,
}

/// `spec.source` of a VolumeGroupSnapshotContent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentSource {
    /// CSI volume ids snapshotted together (dynamic provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handles: Option<Vec<String>>,
    /// An existing group snapshot on the storage system (pre-provisioned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_handles: Option<GroupSnapshotHandles>,
}

/// `spec.source.groupSnapshotHandles` of a pre-provisioned VolumeGroupSnapshotContent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotHandles {
    /// CSI `group_snapshot_id`.
    pub volume_group_snapshot_handle: String,
    /// CSI `snapshot_id` of each member.
    pub volume_snapshot_handles: Vec<String>,
}

/// `status` of a VolumeGroupSnapshotContent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentStatus {
    /// When the group was cut. An RFC 3339 time here, unlike a VolumeSnapshotContent's
    /// nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// True once every member snapshot is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// CSI `group_snapshot_id` (immutable once set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
    /// One entry per member: which volume, which snapshot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_snapshot_info_list: Vec<VolumeSnapshotInfo>,
}

/// One member of a group as the driver reported it (`status.volumeSnapshotInfoList[]`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotInfo {
    /// When the member was cut, Unix nanoseconds (an integer, unlike the group's own time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Whether the member is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Minimum size in bytes of a volume restored from the member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// CSI `snapshot_id` of the member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// CSI `volume_id` the member was cut from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
}

/// Fields of a VolumeGroupSnapshotClass, which has no `spec`: they sit at the top level.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "groupsnapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeGroupSnapshotClass",
    plural = "volumegroupsnapshotclasses",
    shortname = "vgsclass",
    no_spec,
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotClassFields {
    /// CSI driver that cuts groups of this class.
    pub driver: String,
    /// Driver-specific parameters (immutable).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// Policy given to dynamically created group contents (immutable).
    pub deletion_policy: DeletionPolicy,
}

impl SnapshotClass for VolumeGroupSnapshotClass {
    const DEFAULT_ANNOTATION: &'static str = DEFAULT_CLASS_ANNOTATION;
}

snapshot_status_fields!(VolumeGroupSnapshotStatus, VolumeGroupSnapshotContentStatus);

impl VolumeGroupSnapshot {
    /// `status.boundVolumeGroupSnapshotContentName`, if bound.
    pub fn bound_content(&self) -> Option<&str> {
        self.status
            .as_ref()
            .and_then(|s| s.bound_volume_group_snapshot_content_name.as_deref())
    }

    /// `status.creationTime`: the one instant every member was cut at.
    pub fn creation_time(&self) -> Option<&Time> {
        self.status.as_ref().and_then(|s| s.creation_time.as_ref())
    }
}

impl VolumeGroupSnapshotContent {
    /// The `(volumeHandle, snapshotHandle)` pair of every member the driver reported complete.
    pub fn member_handles(&self) -> Vec<(String, String)> {
        self.status
            .iter()
            .flat_map(|s| s.volume_snapshot_info_list.iter())
            .filter_map(|i| Some((i.volume_handle.clone()?, i.snapshot_handle.clone()?)))
            .collect()
    }

    /// True if `spec.volumeGroupSnapshotRef` names this group (uid included once set).
    pub fn points_at(&self, group: &VolumeGroupSnapshot) -> bool {
        let r = &self.spec.volume_group_snapshot_ref;
        r.name == group.metadata.name
            && r.namespace == group.metadata.namespace
            && (r.uid.is_none() || r.uid == group.metadata.uid)
    }
}

/// Why a label selector string could not be turned into a `LabelSelector`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read label selector {selector:?}: {reason}")]
pub struct SelectorError {
    /// The text given.
    pub selector: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Turns a `kubectl -l` selector (`k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`,
/// `!k`, comma separated) into the `LabelSelector` a VolumeGroupSnapshot carries: equalities
/// become `matchLabels` (what every controller version honours), the rest `matchExpressions`.
///
/// # Errors
/// [`SelectorError`] for an empty selector or a malformed requirement.
pub fn label_selector(text: &str) -> Result<LabelSelector, SelectorError> {
    let fail = |reason: String| SelectorError {
        selector: text.to_string(),
        reason,
    };
    let mut labels = BTreeMap::new();
    let mut exprs = Vec::new();
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    for raw in parts {
        let part = raw.trim();
        if part.is_empty() {
            return Err(fail("an empty requirement".into()));
        }
        let set_op = [" notin ", " in "]
            .iter()
            .find_map(|op| part.find(op).map(|at| (at, op.trim())));
        if let Some((at, op)) = set_op {
            let key = part[..at].trim();
            let rest = part[at + op.len() + 2..].trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| fail(format!("{part:?}: the values of {op} go in parentheses")))?;
            let values: Vec<String> = inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if !valid_key(key) || values.is_empty() {
                return Err(fail(format!("{part:?} needs a key and at least one value")));
            }
            exprs.push(LabelSelectorRequirement {
                key: key.to_string(),
                operator: if op == "in" { "In" } else { "NotIn" }.into(),
                values: Some(values),
            });
        } else if let Some((key, value)) = part.split_once("!=") {
            let key = key.trim();
            if !valid_key(key) {
                return Err(fail(format!("{part:?} has no valid key")));
            }
            exprs.push(LabelSelectorRequirement {
                key: key.to_string(),
                operator: "NotIn".into(),
                values: Some(vec![value.trim().to_string()]),
            });
        } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
            let key = key.trim();
            if !valid_key(key) {
                return Err(fail(format!("{part:?} has no valid key")));
            }
            labels.insert(key.to_string(), value.trim().to_string());
        } else if let Some(key) = part.strip_prefix('!') {
            let key = key.trim();
            if !valid_key(key) {
                return Err(fail(format!("{part:?} has no valid key")));
            }
            exprs.push(LabelSelectorRequirement {
                key: key.to_string(),
                operator: "DoesNotExist".into(),
                values: None,
            });
        } else if valid_key(part) {
            exprs.push(LabelSelectorRequirement {
                key: part.to_string(),
                operator: "Exists".into(),
                values: None,
            });
        } else {
            return Err(fail(format!("{part:?} is not a requirement")));
        }
    }
    Ok(LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!exprs.is_empty()).then_some(exprs),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::snapshot::SnapshotState;
    use kube::Resource;
    use serde_json::{Value, json};

    fn crd(file: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/crds/groupsnapshot.storage.k8s.io")
            .join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Value = serde_saphyr::from_str(&text).unwrap();
        let version = doc["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == VERSION)
            .unwrap_or_else(|| panic!("{file} has no {VERSION}"));
        assert_eq!(version["served"], true, "{file}: {VERSION} is not served");
        version["schema"]["openAPIV3Schema"].clone()
    }

    /// Every field of `value` must exist in `schema` with the same JSON type, and every field
    /// the schema requires must be present; returns the differences.
    fn drift(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
        let ty = schema["type"].as_str().unwrap_or("");
        let int_or_string = schema["x-kubernetes-int-or-string"] == true;
        let ok = match (ty, value) {
            (_, Value::Null) => false,
            _ if int_or_string => value.is_string() || value.is_i64() || value.is_u64(),
            ("object", Value::Object(_)) | ("array", Value::Array(_)) => true,
            ("string", Value::String(_)) | ("boolean", Value::Bool(_)) => true,
            ("integer", v) => v.is_i64() || v.is_u64(),
            _ => false,
        };
        if !ok {
            out.push(format!("{path}: {value} is not a {ty}"));
            return;
        }
        match value {
            Value::Object(map) => {
                for req in schema["required"].as_array().into_iter().flatten() {
                    let req = req.as_str().unwrap_or("");
                    if !map.contains_key(req) {
                        out.push(format!("{path}.{req}: required by the CRD, not written"));
                    }
                }
                let props = schema["properties"].as_object();
                let extra = schema["additionalProperties"].is_object();
                if props.is_none() && !extra {
                    // An opaque object (metadata): the API server's own type.
                    return;
                }
                for (k, v) in map {
                    let sub = match props.and_then(|p| p.get(k)) {
                        Some(s) => s,
                        None if extra => &schema["additionalProperties"],
                        None => {
                            out.push(format!("{path}.{k}: not in the CRD"));
                            continue;
                        }
                    };
                    drift(v, sub, &format!("{path}.{k}"), out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    drift(v, &schema["items"], &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }

    fn assert_fits(value: &impl Serialize, file: &str) {
        let json = serde_json::to_value(value).unwrap();
        let mut out = Vec::new();
        drift(&json, &crd(file), "", &mut out);
        assert!(out.is_empty(), "{file}:\n{}\n{json:#}", out.join("\n"));
    }

    fn time() -> Time {
        serde_json::from_value(json!("2026-01-02T03:04:05Z")).unwrap()
    }

    fn error() -> VolumeSnapshotError {
        VolumeSnapshotError {
            time: Some(time()),
            message: Some("boom".into()),
        }
    }

    #[test]
    fn every_serialized_field_is_in_the_upstream_crds() {
        // Every optional field filled in.
        let mut vgs = VolumeGroupSnapshot::new(
            "g",
            VolumeGroupSnapshotSpec {
                source: VolumeGroupSnapshotSource {
                    selector: Some(label_selector("app=pg,tier in (db, wal),!old").unwrap()),
                    volume_group_snapshot_content_name: Some("c".into()),
                },
                volume_group_snapshot_class_name: Some("k".into()),
            },
        );
        vgs.metadata.namespace = Some("ns".into());
        vgs.status = Some(VolumeGroupSnapshotStatus {
            bound_volume_group_snapshot_content_name: Some("c".into()),
            creation_time: Some(time()),
            error: Some(error()),
            ready_to_use: Some(true),
        });
        assert_fits(
            &vgs,
            "groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml",
        );

        let mut content = VolumeGroupSnapshotContent::new(
            "c",
            VolumeGroupSnapshotContentSpec {
                volume_group_snapshot_ref: ObjectReference {
                    api_version: Some(format!("{GROUP}/{VERSION}")),
                    field_path: Some("f".into()),
                    kind: Some("VolumeGroupSnapshot".into()),
                    name: Some("g".into()),
                    namespace: Some("ns".into()),
                    resource_version: Some("1".into()),
                    uid: Some("u".into()),
                },
                deletion_policy: DeletionPolicy::Retain,
                driver: "d".into(),
                volume_group_snapshot_class_name: Some("k".into()),
                source: VolumeGroupSnapshotContentSource {
                    volume_handles: Some(vec!["v1".into()]),
                    group_snapshot_handles: Some(GroupSnapshotHandles {
                        volume_group_snapshot_handle: "gh".into(),
                        volume_snapshot_handles: vec!["s1".into()],
                    }),
                },
            },
        );
        content.status = Some(VolumeGroupSnapshotContentStatus {
            creation_time: Some(time()),
            error: Some(error()),
            ready_to_use: Some(true),
            volume_group_snapshot_handle: Some("gh".into()),
            volume_snapshot_info_list: vec![VolumeSnapshotInfo {
                creation_time: Some(1_700_000_000_000_000_000),
                ready_to_use: Some(true),
                restore_size: Some(1 << 30),
                snapshot_handle: Some("s1".into()),
                volume_handle: Some("v1".into()),
            }],
        });
        assert_fits(
            &content,
            "groupsnapshot.storage.k8s.io_volumegroupsnapshotcontents.yaml",
        );

        let mut class = VolumeGroupSnapshotClass::new(
            "k",
            VolumeGroupSnapshotClassFields {
                driver: "d".into(),
                parameters: BTreeMap::from([("a".into(), "b".into())]),
                deletion_policy: DeletionPolicy::Delete,
            },
        );
        class.metadata.annotations = Some(BTreeMap::from([(
            DEFAULT_CLASS_ANNOTATION.to_string(),
            "true".to_string(),
        )]));
        assert!(class.is_default());
        assert_fits(
            &class,
            "groupsnapshot.storage.k8s.io_volumegroupsnapshotclasses.yaml",
        );

        // Every optional field left out: what the CRD requires is still written.
        assert_fits(
            &VolumeGroupSnapshot::new("g", VolumeGroupSnapshotSpec::default()),
            "groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml",
        );
        assert_fits(
            &VolumeGroupSnapshotContent::new("c", VolumeGroupSnapshotContentSpec::default()),
            "groupsnapshot.storage.k8s.io_volumegroupsnapshotcontents.yaml",
        );
        assert_eq!(
            VolumeGroupSnapshotContent::plural(&()),
            "volumegroupsnapshotcontents"
        );
        assert_eq!(
            VolumeGroupSnapshot::api_version(&()),
            "groupsnapshot.storage.k8s.io/v1"
        );
    }

    #[test]
    fn the_drift_check_catches_a_wrong_name_and_a_wrong_type() {
        let schema = crd("groupsnapshot.storage.k8s.io_volumegroupsnapshotcontents.yaml");
        let mut out = Vec::new();
        let bad = json!({"spec": {"volumeGroupSnapshotRef": {}, "deletionPolicy": "Delete",
            "driver": "d", "source": {"volumeHandle": "x"}},
            "status": {"volumeSnapshotInfoList": [{"creationTime": "2026-01-01T00:00:00Z"}]}});
        drift(&bad, &schema, "", &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].contains("source.volumeHandle: not in the CRD"),
            "{out:?}"
        );
        assert!(out[1].contains("creationTime"), "{out:?}");
    }

    #[test]
    fn members_and_state_are_read_from_the_wire_shape() {
        let content: VolumeGroupSnapshotContent = serde_json::from_value(json!({
            "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshotContent",
            "metadata": {"name": "groupsnapcontent-u"},
            "spec": {"volumeGroupSnapshotRef": {"name": "g", "namespace": "ns", "uid": "u"},
                     "deletionPolicy": "Delete", "driver": "d",
                     "source": {"volumeHandles": ["v1", "v2"]}},
            "status": {"readyToUse": true, "creationTime": "2026-01-02T03:04:05Z",
                       "volumeGroupSnapshotHandle": "gh",
                       "volumeSnapshotInfoList": [
                           {"volumeHandle": "v1", "snapshotHandle": "s1", "creationTime": 1},
                           {"volumeHandle": "v2", "snapshotHandle": "s2", "restoreSize": 5}]}
        }))
        .unwrap();
        assert!(content.is_ready());
        assert_eq!(
            content.member_handles(),
            [("v1".into(), "s1".into()), ("v2".into(), "s2".into())]
        );
        let mut vgs: VolumeGroupSnapshot = serde_json::from_value(json!({
            "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshot",
            "metadata": {"name": "g", "namespace": "ns", "uid": "u"},
            "spec": {"source": {"selector": {"matchLabels": {"app": "pg"}}}},
            "status": {"boundVolumeGroupSnapshotContentName": "groupsnapcontent-u",
                       "readyToUse": false, "error": {"message": "no PVC"}}
        }))
        .unwrap();
        assert!(content.points_at(&vgs));
        assert_eq!(vgs.error_message(), Some("no PVC"));
        assert_eq!(vgs.bound_content(), Some("groupsnapcontent-u"));
        vgs.metadata.uid = Some("other".into());
        assert!(
            !content.points_at(&vgs),
            "a re-created group of the same name"
        );
    }

    #[test]
    fn selectors_become_match_labels_and_expressions() {
        let s = label_selector("app=pg, tier==db,env!=dev,zone in (a, b),x notin (y),has,!gone")
            .unwrap();
        assert_eq!(
            s.match_labels.unwrap(),
            BTreeMap::from([("app".into(), "pg".into()), ("tier".into(), "db".into())])
        );
        let ops: Vec<(String, String, Option<Vec<String>>)> = s
            .match_expressions
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.operator, e.values))
            .collect();
        assert_eq!(
            ops,
            [
                ("env".into(), "NotIn".into(), Some(vec!["dev".into()])),
                (
                    "zone".into(),
                    "In".into(),
                    Some(vec!["a".into(), "b".into()])
                ),
                ("x".into(), "NotIn".into(), Some(vec!["y".into()])),
                ("has".into(), "Exists".into(), None),
                ("gone".into(), "DoesNotExist".into(), None),
            ]
        );
        assert!(label_selector("").is_err());
        assert!(label_selector("a=b,,c=d").is_err());
        assert!(label_selector("k in a,b").is_err());
    }
}
