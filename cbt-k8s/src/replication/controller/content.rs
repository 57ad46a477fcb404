//! The VolumeGroupReplicationContent of every group we serve, made as csi-addons makes it for
//! the groups it serves (csi-addons skips `spec.external: true` groups entirely, so for those
//! nobody else would).
//!
//! Owns the content's shape (pure: [`desired`], [`sync`]) and its writes (create, guarded
//! patches, delete, our finalizer on it), the VGR's `spec.volumeGroupReplicationContentName`
//! and its content-name annotation.
//!
//! # Guarantees
//! - One content per group, named `spec.volumeGroupReplicationContentName` or
//!   `vgrcontent-<VGR uid>`; `spec.source.volumeHandles` is the sorted CSI volume handles of
//!   the bound members and follows members joining and leaving.
//! - Only contents we created (our managed-by label) are deleted with the group. A content of
//!   that name made by someone else is bound (its handles kept current, as csi-addons does)
//!   if its `volumeGroupReplicationRef` is unset or names this group, left alone (with a
//!   Warning event) if it names another, and never deleted.
//! - `status.persistentVolumeRefList` and `status.persistentVolumeMappingList` name the PVs
//!   behind those handles (sorted by PV name), as csi-addons' content controller reports them;
//!   written through the status subresource and only when they differ from what is stored, so
//!   a converged group writes nothing and our own status write triggers no further write. A
//!   `destinationVolumeHandle` or `destinationVolumeGroupID` someone else reported is kept.
//! - Every patch carries the `resourceVersion` it was computed from.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource};
use serde_json::{Value, json};

use super::super::translate::{MANAGED_BY, MANAGED_BY_LABEL};
use super::super::types::{
    PersistentVolumeMapping, VolumeGroupReplication, VolumeGroupReplicationContent,
    VolumeGroupReplicationContentSource, VolumeGroupReplicationContentSpec,
    VolumeGroupReplicationContentStatus,
};
use super::{Context, OWNER_UID_LABEL, is_code};
use crate::Error;

/// Finalizer csi-addons puts on the contents it serves; we put it on ours.
pub const CONTENT_FINALIZER: &str = "replication.storage.openshift.io/vgr-protection";
/// Annotation on a content: `<namespace>/<name>` of its VolumeGroupReplication.
pub const VGR_REF_ANNOTATION: &str = "replication.storage.openshift.io/volumegroupref";
/// Annotation on a dynamically made content: the CSI driver that made the group.
pub const PROVISIONED_BY_ANNOTATION: &str = "replication.storage.openshift.io/provisioned-by";
/// Annotation on a VolumeGroupReplication: the name of its content.
pub const VGR_CONTENT_ANNOTATION: &str =
    "replication.storage.openshift.io/volume-group-replication-content-name";
/// Prefix of a content name csi-addons derives from the group's UID.
pub const CONTENT_PREFIX: &str = "vgrcontent-";

/// The content name of a group: the spec's, else `vgrcontent-<uid>` (None without either).
pub fn name_of(vgr: &VolumeGroupReplication) -> Option<String> {
    match vgr.spec.volume_group_replication_content_name.as_deref() {
        Some(n) if !n.is_empty() => Some(n.to_string()),
        _ => vgr
            .metadata
            .uid
            .as_deref()
            .map(|u| format!("{CONTENT_PREFIX}{u}")),
    }
}

fn vgr_ref(vgr: &VolumeGroupReplication) -> ObjectReference {
    ObjectReference {
        api_version: Some(VolumeGroupReplication::api_version(&()).into_owned()),
        kind: Some(VolumeGroupReplication::kind(&()).into_owned()),
        name: vgr.metadata.name.clone(),
        namespace: vgr.metadata.namespace.clone(),
        uid: vgr.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

fn ref_annotation(vgr: &VolumeGroupReplication) -> String {
    format!(
        "{}/{}",
        vgr.metadata.namespace.as_deref().unwrap_or_default(),
        vgr.metadata.name.as_deref().unwrap_or_default()
    )
}

/// One bound member of a group: its PersistentVolume and that PV's CSI volume handle.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemberVolume {
    /// Name of the PersistentVolume.
    pub pv: String,
    /// `spec.csi.volumeHandle` of the PV.
    pub handle: String,
}

/// The status a content of these members carries (pure): PVs sorted by name.
pub fn status_of(volumes: &[MemberVolume]) -> VolumeGroupReplicationContentStatus {
    let mut v = volumes.to_vec();
    v.sort();
    v.dedup();
    VolumeGroupReplicationContentStatus {
        persistent_volume_ref_list: v
            .iter()
            .map(|m| LocalObjectReference { name: m.pv.clone() })
            .collect(),
        persistent_volume_mapping_list: v
            .iter()
            .map(|m| PersistentVolumeMapping {
                name: m.pv.clone(),
                volume_handle: m.handle.clone(),
                destination_volume_handle: None,
            })
            .collect(),
        destination_volume_group_id: None,
    }
}

/// The content we make for `vgr` (pure): handles sorted and deduplicated, status from
/// [`status_of`].
pub fn desired(
    vgr: &VolumeGroupReplication,
    provisioner: &str,
    volumes: &[MemberVolume],
) -> Option<VolumeGroupReplicationContent> {
    let name = name_of(vgr)?;
    let mut handles: Vec<String> = volumes.iter().map(|m| m.handle.clone()).collect();
    handles.sort();
    handles.dedup();
    let mut labels = BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())]);
    if let Some(uid) = &vgr.metadata.uid {
        labels.insert(OWNER_UID_LABEL.to_string(), uid.clone());
    }
    Some(VolumeGroupReplicationContent {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([
                (VGR_REF_ANNOTATION.to_string(), ref_annotation(vgr)),
                (
                    PROVISIONED_BY_ANNOTATION.to_string(),
                    provisioner.to_string(),
                ),
            ])),
            finalizers: Some(vec![CONTENT_FINALIZER.to_string()]),
            ..ObjectMeta::default()
        },
        spec: VolumeGroupReplicationContentSpec {
            volume_group_replication_ref: Some(vgr_ref(vgr)),
            volume_group_replication_handle: String::new(),
            provisioner: provisioner.to_string(),
            volume_group_replication_class_name: vgr
                .spec
                .volume_group_replication_class_name
                .clone(),
            volume_group_attributes: None,
            source: VolumeGroupReplicationContentSource {
                volume_handles: handles,
            },
        },
        status: Some(status_of(volumes)),
    })
}

/// Whether we made this content.
pub fn is_ours(c: &VolumeGroupReplicationContent) -> bool {
    c.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

/// What to do about a group's content.
#[derive(Clone, Debug, PartialEq)]
pub enum ContentSync {
    /// It is as it should be.
    Current,
    /// Create it.
    Create(Box<VolumeGroupReplicationContent>),
    /// Merge-patch it (the patch carries the `resourceVersion` read).
    Patch(Value),
    /// The name is taken by a content bound to another group: leave it, say so.
    Foreign(String),
}

/// Compares the content found (if any) with the one wanted (pure).
pub fn sync(
    found: Option<&VolumeGroupReplicationContent>,
    want: &VolumeGroupReplicationContent,
) -> ContentSync {
    let Some(found) = found else {
        return ContentSync::Create(Box::new(want.clone()));
    };
    let want_ref = want.spec.volume_group_replication_ref.as_ref();
    match &found.spec.volume_group_replication_ref {
        Some(r) if r.uid.is_some() && r.uid != want_ref.and_then(|w| w.uid.clone()) => {
            return ContentSync::Foreign(format!(
                "VolumeGroupReplicationContent {} is bound to VolumeGroupReplication {}/{} (uid {}); \
                 name another content in spec.volumeGroupReplicationContentName or delete that one",
                found.metadata.name.as_deref().unwrap_or_default(),
                r.namespace.as_deref().unwrap_or_default(),
                r.name.as_deref().unwrap_or_default(),
                r.uid.as_deref().unwrap_or_default(),
            ));
        }
        _ => {}
    }
    let mut spec = serde_json::Map::new();
    if found.spec.volume_group_replication_ref.is_none() {
        spec.insert(
            "volumeGroupReplicationRef".into(),
            serde_json::to_value(want_ref).unwrap_or(Value::Null),
        );
    }
    if found.spec.source.volume_handles != want.spec.source.volume_handles {
        spec.insert(
            "source".into(),
            json!({"volumeHandles": want.spec.source.volume_handles}),
        );
    }
    let mut annotations = serde_json::Map::new();
    let have = found.metadata.annotations.clone().unwrap_or_default();
    for (k, v) in want.metadata.annotations.iter().flatten() {
        if have.get(k) != Some(v) {
            annotations.insert(k.clone(), json!(v));
        }
    }
    let mut meta = serde_json::Map::new();
    if !annotations.is_empty() {
        meta.insert("annotations".into(), Value::Object(annotations));
    }
    let finalizers = found.metadata.finalizers.clone().unwrap_or_default();
    if is_ours(found)
        && found.metadata.deletion_timestamp.is_none()
        && !finalizers.iter().any(|f| f == CONTENT_FINALIZER)
    {
        let mut f = finalizers;
        f.push(CONTENT_FINALIZER.to_string());
        meta.insert("finalizers".into(), json!(f));
    }
    if spec.is_empty() && meta.is_empty() {
        return ContentSync::Current;
    }
    meta.insert(
        "resourceVersion".into(),
        json!(found.metadata.resource_version),
    );
    let mut patch = json!({ "metadata": meta });
    if !spec.is_empty() {
        patch["spec"] = Value::Object(spec);
    }
    ContentSync::Patch(patch)
}

/// The status merge patch that brings `found`'s PV lists to `want`'s (pure), or None when
/// they already match.
///
/// A destination handle already reported for the same PV and source handle is kept, and
/// `destinationVolumeGroupID` is never touched: they come from whoever talks to the driver.
/// The patch carries `found`'s `resourceVersion`.
pub fn status_sync(
    found: &VolumeGroupReplicationContent,
    want: &VolumeGroupReplicationContent,
) -> Option<Value> {
    let have = found.status.clone().unwrap_or_default();
    let want = want.status.clone().unwrap_or_default();
    let mappings: Vec<PersistentVolumeMapping> = want
        .persistent_volume_mapping_list
        .into_iter()
        .map(|mut m| {
            m.destination_volume_handle = have
                .persistent_volume_mapping_list
                .iter()
                .find(|h| h.name == m.name && h.volume_handle == m.volume_handle)
                .and_then(|h| h.destination_volume_handle.clone());
            m
        })
        .collect();
    if have.persistent_volume_ref_list == want.persistent_volume_ref_list
        && have.persistent_volume_mapping_list == mappings
    {
        return None;
    }
    Some(json!({
        "metadata": {"resourceVersion": found.metadata.resource_version},
        "status": {
            "persistentVolumeRefList": want.persistent_volume_ref_list,
            "persistentVolumeMappingList": mappings,
        },
    }))
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Applied {
    /// The content is current and the group names it.
    Done,
    /// A write met a newer object: retry from a fresh read.
    Conflict,
    /// The group's spec or annotation was written: its generation moved, so status must be
    /// computed again from a fresh read.
    GroupChanged,
    /// The name is taken by another group's content (message for an event).
    Foreign(String),
}

fn api(ctx: &Context) -> Api<VolumeGroupReplicationContent> {
    Api::all(ctx.client.clone())
}

async fn get(ctx: &Context, name: &str) -> Result<Option<VolumeGroupReplicationContent>, Error> {
    api(ctx).get_opt(name).await.map_err(|e| {
        Error::api(
            &ctx.cluster,
            "get",
            "VolumeGroupReplicationContent",
            name,
            e,
        )
    })
}

/// Brings the group's content to `want` and makes the group name it.
///
/// `vgr_rv` is the group's `resourceVersion` as last written by this reconcile (its patch is
/// guarded by it).
pub(super) async fn apply(
    ctx: &Context,
    vgr: &VolumeGroupReplication,
    vgr_rv: Option<&str>,
    want: &VolumeGroupReplicationContent,
) -> Result<Applied, Error> {
    let name = want.metadata.name.clone().unwrap_or_default();
    // Read from the API: the patch is guarded by this read, and the watch that triggered us
    // may be ahead of any cache.
    let found = get(ctx, &name).await?;
    let res = match sync(found.as_ref(), want) {
        ContentSync::Current => Ok(found),
        ContentSync::Foreign(msg) => return Ok(Applied::Foreign(msg)),
        // The API server drops `status` on create (status subresource): it is written below.
        ContentSync::Create(c) => api(ctx).create(&PostParams::default(), &c).await.map(Some),
        ContentSync::Patch(p) => api(ctx)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&p))
            .await
            .map(Some),
    };
    let current = match res {
        Ok(c) => c,
        Err(e) if is_code(&e, 409) => return Ok(Applied::Conflict),
        Err(e) => {
            return Err(Error::api(
                &ctx.cluster,
                "write",
                "VolumeGroupReplicationContent",
                name,
                e,
            ));
        }
    };
    // Guarded by the resourceVersion the spec step left: a member change meanwhile makes it
    // a conflict, and the retry computes the lists again.
    if let Some(patch) = current
        .as_ref()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .and_then(|c| status_sync(c, want))
    {
        match api(ctx)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(e) if is_code(&e, 409) || is_code(&e, 404) => return Ok(Applied::Conflict),
            Err(e) => {
                return Err(Error::api(
                    &ctx.cluster,
                    "write status of",
                    "VolumeGroupReplicationContent",
                    name,
                    e,
                ));
            }
        }
    }
    // The group names its content as csi-addons leaves it: in the spec (set once, immutable
    // after) and in the annotation its content controller writes.
    let spec_named = vgr
        .spec
        .volume_group_replication_content_name
        .as_deref()
        .is_some_and(|n| !n.is_empty());
    let annotated = vgr
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VGR_CONTENT_ANNOTATION))
        .is_some_and(|v| *v == name);
    // A spec that names no content (`""`) cannot be set any more (immutable): the
    // annotation alone then names it.
    let spec_done = spec_named || vgr.spec.volume_group_replication_content_name.is_some();
    if spec_done && annotated {
        return Ok(Applied::Done);
    }
    let mut patch = json!({"metadata": {
        "annotations": {VGR_CONTENT_ANNOTATION: name},
        "resourceVersion": vgr_rv,
    }});
    if !spec_done {
        patch["spec"] = json!({"volumeGroupReplicationContentName": name});
    }
    let ns = vgr.metadata.namespace.clone().unwrap_or_default();
    let vgr_name = vgr.metadata.name.clone().unwrap_or_default();
    match Api::<VolumeGroupReplication>::namespaced(ctx.client.clone(), &ns)
        .patch(&vgr_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(Applied::GroupChanged),
        Err(e) if is_code(&e, 409) || is_code(&e, 404) => Ok(Applied::Conflict),
        Err(e) => Err(Error::api(
            &ctx.cluster,
            "patch",
            "VolumeGroupReplication",
            crate::error::ns_name(&ns, &vgr_name),
            e,
        )),
    }
}

/// Deletes the group's content if we made it and takes our finalizer off it. True once it is
/// gone (or is not ours); false on a conflict.
pub(super) async fn release(ctx: &Context, vgr: &VolumeGroupReplication) -> Result<bool, Error> {
    let Some(name) = name_of(vgr) else {
        return Ok(true);
    };
    let Some(found) = get(ctx, &name).await? else {
        return Ok(true);
    };
    let bound_here = found
        .spec
        .volume_group_replication_ref
        .as_ref()
        .is_some_and(|r| r.uid == vgr.metadata.uid);
    if !is_ours(&found) || !bound_here {
        return Ok(true);
    }
    let wrap = |verb: &'static str, e| {
        Error::api(
            &ctx.cluster,
            verb,
            "VolumeGroupReplicationContent",
            &name,
            e,
        )
    };
    let found = if found.metadata.deletion_timestamp.is_none() {
        match api(ctx).delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_code(&e, 404) => return Ok(true),
            Err(e) if is_code(&e, 409) => return Ok(false),
            Err(e) => return Err(wrap("delete", e)),
        }
        // The delete moved its resourceVersion (or removed it): read again.
        match get(ctx, &name).await? {
            Some(f) => f,
            None => return Ok(true),
        }
    } else {
        found
    };
    let finalizers: Vec<String> = found
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != CONTENT_FINALIZER)
        .cloned()
        .collect();
    if finalizers.len() == found.metadata.finalizers.as_ref().map_or(0, Vec::len) {
        return Ok(true);
    }
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": found.metadata.resource_version,
    }});
    match api(ctx)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_code(&e, 404) => Ok(true),
        Err(e) if is_code(&e, 409) => Ok(false),
        Err(e) => Err(wrap("patch", e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::replication::types::{
        ReplicationState, VolumeGroupReplicationSource, VolumeGroupReplicationSpec,
    };
    use proptest::prelude::*;

    fn group() -> VolumeGroupReplication {
        let mut g = VolumeGroupReplication::new(
            "pg",
            VolumeGroupReplicationSpec {
                volume_group_replication_class_name: "c".into(),
                volume_replication_class_name: String::new(),
                volume_replication_name: None,
                volume_group_replication_content_name: None,
                source: VolumeGroupReplicationSource::default(),
                replication_state: ReplicationState::Primary,
                auto_resync: false,
                external: true,
            },
        );
        g.metadata.namespace = Some("app".into());
        g.metadata.uid = Some("u1".into());
        g
    }

    /// `found` as the API returns it after `status` was merge-patched in.
    fn stored(
        want: &VolumeGroupReplicationContent,
        patch: &Value,
    ) -> VolumeGroupReplicationContent {
        let mut found = want.clone();
        found.metadata.resource_version = Some("7".into());
        let mut v = serde_json::to_value(&found).unwrap();
        v["status"] = patch["status"].clone();
        serde_json::from_value(v).unwrap()
    }

    fn volume() -> impl Strategy<Value = MemberVolume> {
        ("pv-[a-e]", "h[a-e]").prop_map(|(pv, handle)| MemberVolume { pv, handle })
    }

    #[test]
    fn a_new_content_gets_its_status_written_once() {
        let vols = vec![
            MemberVolume {
                pv: "pv-wal".into(),
                handle: "h2".into(),
            },
            MemberVolume {
                pv: "pv-data".into(),
                handle: "h1".into(),
            },
        ];
        let want = desired(&group(), "d", &vols).unwrap();
        // As created: the API server dropped the status.
        let mut created = want.clone();
        created.status = None;
        created.metadata.resource_version = Some("7".into());
        let patch = status_sync(&created, &want).unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(
            patch["status"]["persistentVolumeRefList"],
            json!([{"name": "pv-data"}, {"name": "pv-wal"}])
        );
        assert_eq!(
            patch["status"]["persistentVolumeMappingList"],
            json!([{"name": "pv-data", "volumeHandle": "h1"}, {"name": "pv-wal", "volumeHandle": "h2"}])
        );
        assert_eq!(status_sync(&stored(&want, &patch), &want), None);
    }

    #[test]
    fn a_reported_destination_is_kept_until_its_member_changes() {
        let vols = vec![MemberVolume {
            pv: "pv-data".into(),
            handle: "h1".into(),
        }];
        let want = desired(&group(), "d", &vols).unwrap();
        let mut found = want.clone();
        let status = found.status.as_mut().unwrap();
        status.persistent_volume_mapping_list[0].destination_volume_handle = Some("r1".into());
        status.destination_volume_group_id = Some("g".into());
        assert_eq!(status_sync(&found, &want), None);
        // Another member joins: the write keeps the destination of the one that stayed.
        let more = vec![
            vols[0].clone(),
            MemberVolume {
                pv: "pv-wal".into(),
                handle: "h2".into(),
            },
        ];
        let want = desired(&group(), "d", &more).unwrap();
        let patch = status_sync(&found, &want).unwrap();
        assert_eq!(
            patch["status"]["persistentVolumeMappingList"][0]["destinationVolumeHandle"],
            "r1"
        );
        assert!(patch["status"].get("destinationVolumeGroupID").is_none());
    }

    proptest! {
        /// Whatever the stored status, one write converges it: the next comparison is a no-op.
        #[test]
        fn one_status_write_converges(
            have in prop::collection::vec(volume(), 0..6),
            now in prop::collection::vec(volume(), 0..6),
        ) {
            let g = group();
            let found = desired(&g, "d", &have).unwrap();
            let want = desired(&g, "d", &now).unwrap();
            match status_sync(&found, &want) {
                None => prop_assert_eq!(status_of(&have), status_of(&now)),
                Some(patch) => {
                    prop_assert_eq!(status_sync(&stored(&found, &patch), &want), None);
                }
            }
        }
    }
}
