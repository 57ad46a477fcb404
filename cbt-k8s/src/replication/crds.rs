//! The CustomResourceDefinitions cbt-replicator needs, for `cbt-replicator crds`.
//!
//! Owns the choice of manifests only; the texts are the upstream files vendored in
//! `tests/crds/` (checked against the shared copies and against our types by
//! `tests/replication_crds.rs`). cbt-replicator installs nothing itself.

/// csi-addons replication CRDs (`replication.storage.openshift.io/v1alpha1`).
pub const CSI_ADDONS: [(&str, &str); 5] = [
    (
        "volumereplications.replication.storage.openshift.io",
        include_str!("../../tests/crds/replication.storage.openshift.io_volumereplications.yaml"),
    ),
    (
        "volumereplicationclasses.replication.storage.openshift.io",
        include_str!(
            "../../tests/crds/replication.storage.openshift.io_volumereplicationclasses.yaml"
        ),
    ),
    (
        "volumegroupreplications.replication.storage.openshift.io",
        include_str!(
            "../../tests/crds/replication.storage.openshift.io_volumegroupreplications.yaml"
        ),
    ),
    (
        "volumegroupreplicationclasses.replication.storage.openshift.io",
        include_str!(
            "../../tests/crds/replication.storage.openshift.io_volumegroupreplicationclasses.yaml"
        ),
    ),
    (
        "volumegroupreplicationcontents.replication.storage.openshift.io",
        include_str!(
            "../../tests/crds/replication.storage.openshift.io_volumegroupreplicationcontents.yaml"
        ),
    ),
];

/// Backend CRDs, normally installed by Trident and by Dell's replication module.
pub const BACKENDS: [(&str, &str); 3] = [
    (
        "tridentmirrorrelationships.trident.netapp.io",
        include_str!("../../tests/crds/trident.netapp.io_tridentmirrorrelationships.yaml"),
    ),
    (
        "tridentactionmirrorupdates.trident.netapp.io",
        include_str!("../../tests/crds/trident.netapp.io_tridentactionmirrorupdates.yaml"),
    ),
    (
        "dellcsireplicationgroups.replication.storage.dell.com",
        include_str!("../../tests/crds/replication.storage.dell.com_dellcsireplicationgroups.yaml"),
    ),
];

/// The multi-document YAML to apply: csi-addons' CRDs unless `csi_addons_installed`, and the
/// backend CRDs when `with_backends` (clusters where the drivers' own installers did not).
pub fn manifest(csi_addons_installed: bool, with_backends: bool) -> String {
    let mut out = String::from(
        "# CustomResourceDefinitions used by cbt-replicator.\n\
         # If csi-addons is installed (kubectl get crd volumereplications.replication.storage.openshift.io),\n\
         # its CRDs are already there: run `cbt-replicator crds --csi-addons-installed` to skip them.\n\
         # Trident and Dell CSM replication install their own CRDs (add --backends to include them).\n",
    );
    let mut docs: Vec<(&str, &str)> = Vec::new();
    if !csi_addons_installed {
        docs.extend(CSI_ADDONS);
    }
    if with_backends {
        docs.extend(BACKENDS);
    }
    for (name, text) in docs {
        out.push_str(&format!("---\n# {name}\n"));
        let body = text.trim_start_matches("---\n");
        out.push_str(body);
        if !body.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}
