//! Schema drift: the replication types against the CRDs a cluster installs.
//!
//! For every kind: (1) every field a maximally filled value serializes to
//! exists in the CRD's `openAPIV3Schema` with the same type (and enum value,
//! `date-time` format, item bounds), so the API server neither rejects nor
//! prunes what we write; (2) a minimally filled value still writes every field
//! the CRD requires; (3) reading a served object without a required field
//! fails (unless the CRD defaults it, so the server always fills it in);
//! (4) reading a served object without any optional field succeeds.
//!
//! The CRDs are the copies in `tests/crds/`; `vendored_crds_match_shared` checks
//! them against `../shared/crds/` when that directory exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cbt_k8s::replication::types::*;
use k8s_openapi::api::core::v1::{
    LocalObjectReference, ObjectReference, TypedLocalObjectReference,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, LabelSelectorRequirement, ObjectMeta, Time,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crds")
}

/// The `openAPIV3Schema` of `version` in a CRD file.
fn schema(file: &str, version: &str) -> Value {
    let path = crd_dir().join(file);
    let text = std::fs::read_to_string(&path).expect("read CRD");
    let crd: Value = serde_saphyr::from_str(&text).expect("parse CRD YAML");
    crd["spec"]["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .find(|v| v["name"] == version)
        .expect("version present")["schema"]["openAPIV3Schema"]
        .clone()
}

fn time() -> Time {
    serde_json::from_value(json!("2026-01-02T03:04:05Z")).expect("time")
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(str::to_string),
        generation: Some(2),
        annotations: Some(BTreeMap::from([("a".into(), "b".into())])),
        ..ObjectMeta::default()
    }
}

fn condition() -> Condition {
    Condition {
        last_transition_time: time(),
        message: "m".into(),
        observed_generation: Some(2),
        reason: "Promoted".into(),
        status: "True".into(),
        type_: "Completed".into(),
    }
}

fn condition_min() -> Condition {
    Condition {
        last_transition_time: time(),
        message: String::new(),
        observed_generation: None,
        reason: String::new(),
        status: "Unknown".into(),
        type_: String::new(),
    }
}

fn vr_status() -> VolumeReplicationStatus {
    VolumeReplicationStatus {
        state: Some(ReplicatedState::Primary),
        message: "m".into(),
        conditions: vec![condition()],
        observed_generation: 2,
        last_start_time: Some(time()),
        last_completion_time: Some(time()),
        last_sync_time: Some(time()),
        last_sync_bytes: Some(1),
        last_sync_duration: Some(GoDuration::from_std(Duration::from_secs(90))),
        destination_volume_id: Some("d".into()),
    }
}

fn vr_status_min() -> VolumeReplicationStatus {
    VolumeReplicationStatus {
        conditions: vec![condition_min()],
        ..VolumeReplicationStatus::default()
    }
}

fn selector() -> LabelSelector {
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "k".into(),
            operator: "In".into(),
            values: Some(vec!["v".into()]),
        }]),
        match_labels: Some(BTreeMap::from([("app".into(), "db".into())])),
    }
}

fn params() -> Option<BTreeMap<String, String>> {
    Some(BTreeMap::from([("k".into(), "v".into())]))
}

fn vr(max: bool) -> VolumeReplication {
    let mut o = VolumeReplication::new(
        "vr",
        VolumeReplicationSpec {
            volume_replication_class: if max { "c" } else { "" }.into(),
            replication_state: ReplicationState::Secondary,
            data_source: TypedLocalObjectReference {
                api_group: max.then(|| "".into()),
                kind: if max { "PersistentVolumeClaim" } else { "" }.into(),
                name: if max { "p" } else { "" }.into(),
            },
            auto_resync: max,
            replication_handle: if max { "svm:vol" } else { "" }.into(),
        },
    );
    if max {
        o.metadata = meta("vr", Some("ns"));
    }
    o.status = Some(if max { vr_status() } else { vr_status_min() });
    o
}

fn vrc(max: bool) -> VolumeReplicationClass {
    let mut o = VolumeReplicationClass::new(
        "vrc",
        VolumeReplicationClassSpec {
            provisioner: if max { "csi.trident.netapp.io" } else { "" }.into(),
            parameters: if max { params() } else { None },
        },
    );
    if max {
        o.metadata = meta("vrc", None);
    }
    o
}

fn vgr(max: bool) -> VolumeGroupReplication {
    let mut o = VolumeGroupReplication::new(
        "vgr",
        VolumeGroupReplicationSpec {
            volume_group_replication_class_name: if max { "g" } else { "" }.into(),
            volume_replication_class_name: if max { "c" } else { "" }.into(),
            volume_replication_name: max.then(|| "vr-1".into()),
            volume_group_replication_content_name: max.then(|| "vgrcontent-1".into()),
            source: VolumeGroupReplicationSource {
                selector: if max {
                    selector()
                } else {
                    LabelSelector::default()
                },
            },
            replication_state: ReplicationState::Primary,
            auto_resync: max,
            external: max,
        },
    );
    if max {
        o.metadata = meta("vgr", Some("ns"));
    }
    o.status = Some(VolumeGroupReplicationStatus {
        replication: if max { vr_status() } else { vr_status_min() },
        persistent_volume_claims_ref_list: vec![LocalObjectReference {
            name: if max { "p" } else { "" }.into(),
        }],
    });
    o
}

fn vgrc(max: bool) -> VolumeGroupReplicationClass {
    let mut o = VolumeGroupReplicationClass::new(
        "vgrc",
        VolumeGroupReplicationClassSpec {
            provisioner: if max {
                "csi-powerstore.dellemc.com"
            } else {
                ""
            }
            .into(),
            parameters: if max { params() } else { None },
        },
    );
    if max {
        o.metadata = meta("vgrc", None);
    }
    o
}

fn vgrcontent(max: bool) -> VolumeGroupReplicationContent {
    let mut o = VolumeGroupReplicationContent::new(
        "content",
        VolumeGroupReplicationContentSpec {
            volume_group_replication_ref: max.then(|| ObjectReference {
                api_version: Some("replication.storage.openshift.io/v1alpha1".into()),
                field_path: Some("f".into()),
                kind: Some("VolumeGroupReplication".into()),
                name: Some("vgr".into()),
                namespace: Some("ns".into()),
                resource_version: Some("1".into()),
                uid: Some("u".into()),
            }),
            volume_group_replication_handle: if max { "h" } else { "" }.into(),
            provisioner: if max { "p" } else { "" }.into(),
            volume_group_replication_class_name: if max { "g" } else { "" }.into(),
            volume_group_attributes: if max { params() } else { None },
            source: VolumeGroupReplicationContentSource {
                volume_handles: if max { vec!["v".into()] } else { vec![] },
            },
        },
    );
    if max {
        o.metadata = meta("content", None);
    }
    o.status = Some(VolumeGroupReplicationContentStatus {
        persistent_volume_ref_list: vec![LocalObjectReference {
            name: if max { "pv" } else { "" }.into(),
        }],
        persistent_volume_mapping_list: vec![PersistentVolumeMapping {
            name: if max { "pv" } else { "" }.into(),
            volume_handle: if max { "h" } else { "" }.into(),
            destination_volume_handle: max.then(|| "d".into()),
        }],
        destination_volume_group_id: max.then(|| "g".into()),
    });
    o
}

fn tmr(max: bool) -> TridentMirrorRelationship {
    let s = |v: &str| if max { v.to_string() } else { String::new() };
    let mut o = TridentMirrorRelationship::new(
        "tmr",
        TridentMirrorRelationshipSpec {
            state: if max {
                MirrorState::Reestablished
            } else {
                MirrorState::Unset
            },
            replication_policy: s("MirrorAllSnapshots"),
            replication_schedule: s("5min"),
            volume_mappings: vec![TridentVolumeMapping {
                remote_volume_handle: s("svm:vol"),
                local_pvc_name: s("p"),
                promoted_snapshot_handle: s("snap"),
            }],
        },
    );
    if max {
        o.metadata = meta("tmr", Some("ns"));
    }
    o.status = Some(TridentMirrorRelationshipStatus {
        conditions: vec![TridentMirrorCondition {
            state: if max {
                MirrorStatusState::Reestablishing
            } else {
                MirrorStatusState::Empty
            },
            message: s("m"),
            last_transition_time: s("2026-01-02T03:04:05Z"),
            observed_generation: i64::from(max),
            local_pvc_name: s("p"),
            local_volume_handle: s("svm:local"),
            remote_volume_handle: s("svm:vol"),
            replication_policy: s("MirrorAllSnapshots"),
            replication_schedule: s("5min"),
        }],
    });
    o
}

fn tamu(max: bool) -> TridentActionMirrorUpdate {
    let s = |v: &str| if max { v.to_string() } else { String::new() };
    let mut o = TridentActionMirrorUpdate::new(
        "tamu",
        TridentActionMirrorUpdateSpec {
            trident_mirror_relationship_name: s("tmr"),
            snapshot_handle: s("snap"),
        },
    );
    if max {
        o.metadata = meta("tamu", Some("ns"));
    }
    o.status = Some(TridentActionMirrorUpdateStatus {
        local_volume_handle: s("svm:l"),
        remote_volume_handle: s("svm:r"),
        snapshot_handle: s("snap"),
        state: s(tamu_state::SUCCEEDED),
        message: s("m"),
        completion_time: max.then(time),
        previous_transfer_time: max.then(time),
    });
    o
}

fn rg(max: bool) -> DellCSIReplicationGroup {
    let s = |v: &str| if max { v.to_string() } else { String::new() };
    let attrs = || {
        if max {
            BTreeMap::from([("remoteSystemName".into(), "RT-1".into())])
        } else {
            BTreeMap::new()
        }
    };
    let action = |cond: &str| LastAction {
        condition: s(cond),
        first_failure: max.then(time),
        time: max.then(time),
        error_message: s("e"),
    };
    let mut o = DellCSIReplicationGroup::new(
        "rg",
        DellCSIReplicationGroupSpec {
            driver_name: s("csi-powerstore.dellemc.com"),
            request_parameters_class: s("c"),
            action: s("SYNC"),
            remote_cluster_id: s("self"),
            protection_group_id: s("pg"),
            protection_group_attributes: attrs(),
            remote_protection_group_id: s("rpg"),
            remote_protection_group_attributes: attrs(),
        },
    );
    if max {
        o.metadata = meta("rg", None);
    }
    o.status = Some(DellCSIReplicationGroupStatus {
        state: s("Ready"),
        remote_state: s("Ready"),
        replication_link_state: ReplicationLinkState {
            state: s("SYNCHRONIZED"),
            is_source: max,
            last_successful_update: max.then(time),
            error_message: s("e"),
        },
        last_action: action("Action SYNC succeeded"),
        conditions: vec![action("Action SYNC succeeded")],
    });
    o
}

/// One kind: its CRD, its max and min values, and how to read it back.
struct Case {
    file: &'static str,
    version: &'static str,
    max: Value,
    min: Value,
    read: fn(Value) -> Result<(), String>,
    /// Nodes typed by k8s-openapi, which reads absent required strings as empty by design.
    k8s_owned: &'static [&'static str],
}

fn read<T: DeserializeOwned>(v: Value) -> Result<(), String> {
    serde_json::from_value::<T>(v)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn to_json<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("serialize")
}

fn cases() -> Vec<(&'static str, Case)> {
    vec![
        (
            "VolumeReplication",
            Case {
                file: "replication.storage.openshift.io_volumereplications.yaml",
                version: VERSION,
                max: to_json(&vr(true)),
                min: to_json(&vr(false)),
                read: read::<VolumeReplication>,
                k8s_owned: &["spec.dataSource", "status.conditions[]"],
            },
        ),
        (
            "VolumeReplicationClass",
            Case {
                file: "replication.storage.openshift.io_volumereplicationclasses.yaml",
                version: VERSION,
                max: to_json(&vrc(true)),
                min: to_json(&vrc(false)),
                read: read::<VolumeReplicationClass>,
                k8s_owned: &[],
            },
        ),
        (
            "VolumeGroupReplication",
            Case {
                file: "replication.storage.openshift.io_volumegroupreplications.yaml",
                version: VERSION,
                max: to_json(&vgr(true)),
                min: to_json(&vgr(false)),
                read: read::<VolumeGroupReplication>,
                k8s_owned: &[
                    "spec.source.selector",
                    "status.conditions[]",
                    "status.persistentVolumeClaimsRefList[]",
                ],
            },
        ),
        (
            "VolumeGroupReplicationClass",
            Case {
                file: "replication.storage.openshift.io_volumegroupreplicationclasses.yaml",
                version: VERSION,
                max: to_json(&vgrc(true)),
                min: to_json(&vgrc(false)),
                read: read::<VolumeGroupReplicationClass>,
                k8s_owned: &[],
            },
        ),
        (
            "VolumeGroupReplicationContent",
            Case {
                file: "replication.storage.openshift.io_volumegroupreplicationcontents.yaml",
                version: VERSION,
                max: to_json(&vgrcontent(true)),
                min: to_json(&vgrcontent(false)),
                read: read::<VolumeGroupReplicationContent>,
                k8s_owned: &[
                    "spec.volumeGroupReplicationRef",
                    "status.persistentVolumeRefList[]",
                ],
            },
        ),
        (
            "TridentMirrorRelationship",
            Case {
                file: "trident.netapp.io_tridentmirrorrelationships.yaml",
                version: "v1",
                max: to_json(&tmr(true)),
                min: to_json(&tmr(false)),
                read: read::<TridentMirrorRelationship>,
                k8s_owned: &[],
            },
        ),
        (
            "TridentActionMirrorUpdate",
            Case {
                file: "trident.netapp.io_tridentactionmirrorupdates.yaml",
                version: "v1",
                max: to_json(&tamu(true)),
                min: to_json(&tamu(false)),
                read: read::<TridentActionMirrorUpdate>,
                k8s_owned: &[],
            },
        ),
        (
            "DellCSIReplicationGroup",
            Case {
                file: "replication.storage.dell.com_dellcsireplicationgroups.yaml",
                version: "v1",
                max: to_json(&rg(true)),
                min: to_json(&rg(false)),
                read: read::<DellCSIReplicationGroup>,
                k8s_owned: &[],
            },
        ),
    ]
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Root keys every object has whether or not the schema lists them.
const ROOT_META: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// (1): every value node exists in the schema with the same type.
fn check_fields(v: &Value, schema: &Value, path: &str, errs: &mut Vec<String>) {
    let ty = schema["type"].as_str();
    let type_ok = match ty {
        Some("object") | None if v.is_object() => true,
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        None => true,
        Some(_) => false,
    };
    if !type_ok {
        errs.push(format!("{path}: we write {v}, the CRD says type {ty:?}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        errs.push(format!("{path}: {v} is not in the CRD enum {allowed:?}"));
    }
    if schema["format"] == "date-time"
        && let Some(s) = v.as_str()
        && s.parse::<k8s_openapi::jiff::Timestamp>().is_err()
    {
        errs.push(format!("{path}: {s:?} is not a date-time"));
    }
    if schema["x-kubernetes-preserve-unknown-fields"] == true && schema.get("properties").is_none()
    {
        return;
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let p = join(path, k);
                if path.is_empty() && ROOT_META.contains(&k.as_str()) {
                    continue;
                }
                if let Some(s) = schema["properties"].get(k) {
                    check_fields(child, s, &p, errs);
                } else if schema["additionalProperties"].is_object() {
                    check_fields(child, &schema["additionalProperties"], &p, errs);
                } else {
                    errs.push(format!(
                        "{p}: we write it, the CRD has no such field (it would be pruned)"
                    ));
                }
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if schema["minItems"].as_u64().is_some_and(|m| n < m)
                || schema["maxItems"].as_u64().is_some_and(|m| n > m)
            {
                errs.push(format!("{path}: {n} items outside the CRD bounds"));
            }
            for item in items {
                check_fields(item, &schema["items"], &format!("{path}[]"), errs);
            }
        }
        _ => {}
    }
}

/// (2): every required field is present in each object node we write.
fn check_required_written(v: &Value, schema: &Value, path: &str, errs: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap_or_default();
                if !map.contains_key(r) {
                    errs.push(format!(
                        "{}: required by the CRD, not written",
                        join(path, r)
                    ));
                }
            }
            for (k, child) in map {
                if let Some(s) = schema["properties"].get(k) {
                    check_required_written(child, s, &join(path, k), errs);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                check_required_written(item, &schema["items"], &format!("{path}[]"), errs);
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Every key of every object node: (segments, dotted path, required, has CRD default).
fn keys(
    v: &Value,
    schema: &Value,
    segs: &[Seg],
    path: &str,
    out: &mut Vec<(Vec<Seg>, String, bool, bool)>,
) {
    match v {
        Value::Object(map) => {
            let required: Vec<&str> = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for (k, child) in map {
                let mut s = segs.to_vec();
                s.push(Seg::Key(k.clone()));
                let child_schema = schema["properties"]
                    .get(k)
                    .or_else(|| {
                        schema["additionalProperties"]
                            .as_object()
                            .map(|_| &schema["additionalProperties"])
                    })
                    .cloned()
                    .unwrap_or(Value::Null);
                let p = join(path, k);
                let is_map_entry = schema["properties"].get(k).is_none();
                if !is_map_entry {
                    out.push((
                        s.clone(),
                        p.clone(),
                        required.contains(&k.as_str()),
                        child_schema.get("default").is_some(),
                    ));
                }
                keys(child, &child_schema, &s, &p, out);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let mut s = segs.to_vec();
                s.push(Seg::Index(i));
                keys(item, &schema["items"], &s, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

fn remove(v: &mut Value, segs: &[Seg]) {
    let Some((last, parents)) = segs.split_last() else {
        return;
    };
    let mut node = v;
    for s in parents {
        node = match s {
            Seg::Key(k) => &mut node[k.as_str()],
            Seg::Index(i) => &mut node[*i],
        };
    }
    if let (Seg::Key(k), Some(map)) = (last, node.as_object_mut()) {
        map.remove(k);
    }
}

#[test]
fn every_written_field_exists_in_the_crd_with_the_same_type() {
    let mut errs = Vec::new();
    for (kind, case) in cases() {
        let schema = schema(case.file, case.version);
        for (label, value) in [("max", &case.max), ("min", &case.min)] {
            let mut e = Vec::new();
            check_fields(value, &schema, "", &mut e);
            errs.extend(e.into_iter().map(|e| format!("{kind} ({label}): {e}")));
        }
        // The max value must survive a read: it is a shape the API server serves.
        (case.read)(case.max.clone())
            .unwrap_or_else(|e| panic!("{kind}: max value does not read back: {e}"));
    }
    assert!(errs.is_empty(), "drift:\n{}", errs.join("\n"));
}

#[test]
fn every_required_field_is_written() {
    let mut errs = Vec::new();
    for (kind, case) in cases() {
        let schema = schema(case.file, case.version);
        for (label, value) in [("max", &case.max), ("min", &case.min)] {
            let mut e = Vec::new();
            check_required_written(value, &schema, "", &mut e);
            errs.extend(e.into_iter().map(|e| format!("{kind} ({label}): {e}")));
        }
    }
    assert!(
        errs.is_empty(),
        "missing required fields:\n{}",
        errs.join("\n")
    );
}

#[test]
fn required_fields_are_required_and_optional_ones_optional_when_read() {
    let mut errs = Vec::new();
    for (kind, case) in cases() {
        let schema = schema(case.file, case.version);
        let mut all = Vec::new();
        keys(&case.max, &schema, &[], "", &mut all);
        for (segs, path, required, defaulted) in all {
            // The server always fills defaulted fields and the identity fields.
            if defaulted || ROOT_META.contains(&path.as_str()) {
                continue;
            }
            // kube's CustomResource has a mandatory spec; every upstream writer
            // (a non-pointer Go struct) always writes one.
            if path == "spec" {
                continue;
            }
            let inside_k8s = case.k8s_owned.iter().any(|o| {
                path.strip_prefix(o)
                    .is_some_and(|rest| rest.starts_with('.'))
            });
            let mut v = case.max.clone();
            remove(&mut v, &segs);
            let result = (case.read)(v);
            match (required, result) {
                (true, Ok(())) if !inside_k8s => errs.push(format!(
                    "{kind}: {path} is required by the CRD but reads as optional"
                )),
                (false, Err(e)) => errs.push(format!(
                    "{kind}: {path} is optional in the CRD but required when read: {e}"
                )),
                _ => {}
            }
        }
    }
    assert!(errs.is_empty(), "required-ness drift:\n{}", errs.join("\n"));
}

#[test]
fn vendored_crds_match_shared() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/crds");
    if !shared.is_dir() {
        eprintln!("{} absent: vendored CRDs not compared", shared.display());
        return;
    }
    for entry in std::fs::read_dir(crd_dir()).expect("read tests/crds") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let group = name.split('_').next().expect("group prefix");
        let theirs = std::fs::read(shared.join(group).join(&name)).expect("shared copy");
        assert_eq!(
            std::fs::read(&path).expect("vendored copy"),
            theirs,
            "{name} differs from shared/crds: refresh tests/crds and rerun"
        );
    }
}

#[test]
fn the_checker_catches_drift() {
    // A field the CRD does not have, a wrong type, a missing required field.
    let schema = schema(
        "replication.storage.openshift.io_volumereplications.yaml",
        VERSION,
    );
    let mut v = to_json(&vr(true));
    v["spec"]["extra"] = json!("x");
    v["status"]["lastSyncBytes"] = json!("12");
    let mut errs = Vec::new();
    check_fields(&v, &schema, "", &mut errs);
    assert_eq!(errs.len(), 2, "{errs:?}");
    let mut v = to_json(&vr(false));
    v["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("autoResync");
    let mut errs = Vec::new();
    check_required_written(&v, &schema, "", &mut errs);
    assert_eq!(
        errs,
        vec!["spec.autoResync: required by the CRD, not written".to_string()]
    );
    // Reading: a required field is refused when absent, an optional one is not.
    let mut all = Vec::new();
    keys(&to_json(&vr(true)), &schema, &[], "", &mut all);
    let find = |p: &str| all.iter().find(|k| k.1 == p).cloned().expect("path");
    let (segs, _, required, _) = find("spec.dataSource");
    assert!(required);
    let mut v = to_json(&vr(true));
    remove(&mut v, &segs);
    assert!(read::<VolumeReplication>(v).is_err());
    let (segs, _, required, _) = find("spec.replicationHandle");
    assert!(!required);
    let mut v = to_json(&vr(true));
    remove(&mut v, &segs);
    assert!(read::<VolumeReplication>(v).is_ok());
    assert!(find("spec.autoResync").3, "autoResync has a CRD default");
}
