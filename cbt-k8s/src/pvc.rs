//! What a PersistentVolumeClaim is, as a CBT backup needs to know it: bound, a raw block
//! volume, provisioned by a CSI driver, and the facts recorded in the backup's manifest.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::api::Api;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ns_name};
use crate::quantity;

/// The facts about a PVC that a backup checks and records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvcInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid` (tells a re-created PVC of the same name apart).
    pub uid: String,
    /// Size of the bound volume in bytes (`status.capacity.storage`, else the request).
    pub size_bytes: u64,
    /// StorageClass name, if any.
    pub storage_class: Option<String>,
    /// Access modes (`ReadWriteOnce`, ...).
    pub access_modes: Vec<String>,
    /// `Block` or `Filesystem`.
    pub volume_mode: String,
    /// The PVC's labels.
    pub labels: BTreeMap<String, String>,
    /// CSI driver of the bound PersistentVolume.
    pub driver: String,
    /// Name of the bound PersistentVolume.
    pub volume_name: String,
    /// CSI volume handle of the bound PersistentVolume.
    pub volume_handle: String,
}

impl PvcInfo {
    /// The repository volume name for this PVC: `<namespace>.<name>`, shortened with a hash
    /// suffix when it would exceed the 253 bytes a repository name allows.
    pub fn repository_volume(&self) -> String {
        let full = format!("{}.{}", self.namespace, self.name);
        if full.len() <= 253 {
            return full;
        }
        let digest = crate::pvc_backup::objects::short_hash(&[&full]);
        format!("{}-{}", &full[..253 - 17], &digest[..16])
    }
}

/// Reads a PVC and its PersistentVolume and checks that CBT can back it up.
///
/// # Errors
/// [`Error::NotFound`] for a missing PVC, [`Error::PvcUnsuitable`] when it is not bound, not a
/// block volume or not provisioned by a CSI driver, [`Error::Api`] for API failures.
pub async fn inspect_pvc(
    client: &Client,
    cluster: &str,
    namespace: &str,
    name: &str,
) -> Result<PvcInfo, Error> {
    let object = ns_name(namespace, name);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pvc = pvcs
        .get_opt(name)
        .await
        .map_err(|e| Error::api(cluster, "get", "PersistentVolumeClaim", &object, e))?
        .ok_or_else(|| Error::NotFound {
            cluster: cluster.to_string(),
            kind: "PersistentVolumeClaim",
            object: object.clone(),
            hint: "; check the name and namespace (-n)".into(),
        })?;
    let unsuitable = |problem: String, fix: &str| Error::PvcUnsuitable {
        cluster: cluster.to_string(),
        object: object.clone(),
        problem,
        fix: fix.to_string(),
    };
    let spec = pvc.spec.clone().unwrap_or_default();
    let status = pvc.status.clone().unwrap_or_default();
    let phase = status.phase.clone().unwrap_or_else(|| "unknown".into());
    let volume_name = spec.volume_name.clone().unwrap_or_default();
    if phase != "Bound" || volume_name.is_empty() {
        return Err(unsuitable(
            format!("is not bound (phase {phase})"),
            "wait until it is Bound (its pod or provisioner may still be starting) and try again",
        ));
    }
    let volume_mode = spec
        .volume_mode
        .clone()
        .unwrap_or_else(|| "Filesystem".into());
    if volume_mode != "Block" {
        return Err(unsuitable(
            format!("has volumeMode {volume_mode}"),
            "changed block tracking is defined for raw block volumes (volumeMode: Block); back up a block PVC, or use a file-level tool for filesystem volumes",
        ));
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs
        .get_opt(&volume_name)
        .await
        .map_err(|e| Error::api(cluster, "get", "PersistentVolume", &volume_name, e))?
        .ok_or_else(|| Error::Inconsistent {
            cluster: cluster.to_string(),
            problem: format!(
                "PVC {object} is bound to PersistentVolume {volume_name}, which does not exist"
            ),
        })?;
    let csi = pv.spec.as_ref().and_then(|s| s.csi.clone()).ok_or_else(|| {
        unsuitable(
            format!("is bound to PersistentVolume {volume_name}, which is not provisioned by a CSI driver"),
            "CBT needs a CSI driver with the SnapshotMetadata service; in-tree and static non-CSI volumes cannot be backed up this way",
        )
    })?;
    let size_bytes = status
        .capacity
        .as_ref()
        .and_then(|c| c.get("storage"))
        .or_else(|| {
            spec.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
        })
        .map(quantity::to_bytes)
        .transpose()?
        .ok_or_else(|| unsuitable("reports no size".into(), "check the PVC's status.capacity"))?;
    Ok(PvcInfo {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: pvc.metadata.uid.clone().unwrap_or_default(),
        size_bytes,
        storage_class: spec.storage_class_name.clone(),
        access_modes: spec.access_modes.clone().unwrap_or_default(),
        volume_mode,
        labels: pvc.metadata.labels.clone().unwrap_or_default(),
        driver: csi.driver,
        volume_name,
        volume_handle: csi.volume_handle,
    })
}

/// Names of the PVCs in `namespace` matching the label `selector`, sorted.
///
/// # Errors
/// [`Error::Api`] for API failures (a malformed selector is the API server's 400).
pub async fn pvcs_matching(
    cluster: &crate::connect::Cluster,
    namespace: &str,
    selector: &str,
) -> Result<Vec<String>, Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), namespace);
    let list = api
        .list(&kube::api::ListParams::default().labels(selector))
        .await
        .map_err(|e| {
            Error::api(
                &cluster.context,
                "list",
                "PersistentVolumeClaim",
                namespace,
                e,
            )
        })?;
    let mut names: Vec<String> = list
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    Ok(names)
}

/// The provisioner of a StorageClass, if it exists.
///
/// # Errors
/// [`Error::Api`] for API failures other than "not found".
pub async fn storage_class_provisioner(
    client: &Client,
    cluster: &str,
    name: &str,
) -> Result<Option<String>, Error> {
    let api: Api<StorageClass> = Api::all(client.clone());
    Ok(api
        .get_opt(name)
        .await
        .map_err(|e| Error::api(cluster, "get", "StorageClass", name, e))?
        .map(|sc| sc.provisioner))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ns: &str, name: &str) -> PvcInfo {
        PvcInfo {
            namespace: ns.into(),
            name: name.into(),
            uid: "u".into(),
            size_bytes: 1,
            storage_class: None,
            access_modes: vec![],
            volume_mode: "Block".into(),
            labels: BTreeMap::new(),
            driver: "d".into(),
            volume_name: "pv".into(),
            volume_handle: "h".into(),
        }
    }

    #[test]
    fn repository_volume_names_fit_the_name_rules() {
        assert_eq!(info("db", "data-0").repository_volume(), "db.data-0");
        let long = info(&"n".repeat(63), &"p".repeat(253)).repository_volume();
        assert_eq!(long.len(), 253);
        assert!(cbt_core::VolumeName::new(&long).is_ok());
        assert_ne!(
            long,
            info(&"n".repeat(63), &"q".repeat(253)).repository_volume()
        );
    }
}
