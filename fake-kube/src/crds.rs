//! `apiextensions.k8s.io/v1` CustomResourceDefinitions, and serving what they define.
//!
//! A CRD object is validated as the API server does for the fields that decide what gets
//! served (name `<plural>.<group>`, group, names, scope, versions with exactly one storage
//! version) and is then "established": while it exists, every version it marks `served` is
//! routed like a built-in type (CRUD, list, watch, patch; objects are checked against the
//! version's schema by the `schema` module). Deleting or editing the CRD changes what is served from the
//! next request on; objects written through it stay in the store, as etcd keeps them. All
//! versions of one CRD share their objects (one key per plural), like the API server's
//! storage version without conversion webhooks.
//!
//! Built-in types win over a CRD serving the same group, version and resource, so installing
//! the upstream snapshot CRDs into a fake that already serves them changes nothing.
//!
//! It must not run controllers beyond setting the CRD's own status (Established,
//! NamesAccepted, acceptedNames, storedVersions).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::store::{Cause, ResourceType, Store};
use crate::values::rfc3339_now;

/// `apiextensions.k8s.io/v1` CustomResourceDefinition.
pub(crate) static CUSTOM_RESOURCE_DEFINITIONS: ResourceType = ResourceType {
    group: "apiextensions.k8s.io",
    version: "v1",
    plural: "customresourcedefinitions",
    kind: "CustomResourceDefinition",
    namespaced: false,
    status_subresource: true,
    crd: false,
};

/// The upstream CRD manifests the project targets, byte-identical copies (see
/// `fake-kube/crds/`), for tests that install them with [`crate::FakeKube::install_yaml`].
pub mod upstream {
    /// `snapshotmetadataservices.cbt.storage.k8s.io` (external-snapshot-metadata v1.1.0:
    /// v1beta1 only).
    pub const SNAPSHOT_METADATA_SERVICES: &str =
        include_str!("../crds/cbt.storage.k8s.io_snapshotmetadataservices.yaml");
    /// `volumesnapshots.snapshot.storage.k8s.io` (external-snapshotter v8.6.0).
    pub const VOLUME_SNAPSHOTS: &str =
        include_str!("../crds/snapshot.storage.k8s.io_volumesnapshots.yaml");
    /// `volumesnapshotcontents.snapshot.storage.k8s.io` (external-snapshotter v8.6.0).
    pub const VOLUME_SNAPSHOT_CONTENTS: &str =
        include_str!("../crds/snapshot.storage.k8s.io_volumesnapshotcontents.yaml");
    /// `volumesnapshotclasses.snapshot.storage.k8s.io` (external-snapshotter v8.6.0).
    pub const VOLUME_SNAPSHOT_CLASSES: &str =
        include_str!("../crds/snapshot.storage.k8s.io_volumesnapshotclasses.yaml");
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return "",
        }
    }
    cur.as_str().unwrap_or("")
}

fn required(field: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        field: field.to_string(),
        message: "Required value".to_string(),
    }
}

fn invalid(field: &str, message: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        field: field.to_string(),
        message,
    }
}

/// The API server's checks of a CRD that decide what it serves.
pub(crate) fn validate(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let group = text(obj, &["spec", "group"]);
    let plural = text(obj, &["spec", "names", "plural"]);
    if group.is_empty() {
        causes.push(required("spec.group"));
    } else if !group.contains('.') {
        causes.push(invalid(
            "spec.group",
            format!("Invalid value: \"{group}\": should be a domain with at least one dot"),
        ));
    }
    if plural.is_empty() {
        causes.push(required("spec.names.plural"));
    }
    if text(obj, &["spec", "names", "kind"]).is_empty() {
        causes.push(required("spec.names.kind"));
    }
    let name = text(obj, &["metadata", "name"]);
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        causes.push(invalid(
            "metadata.name",
            format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    match text(obj, &["spec", "scope"]) {
        "Namespaced" | "Cluster" => {}
        "" => causes.push(required("spec.scope")),
        other => causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: "spec.scope".into(),
            message: format!(
                "Unsupported value: \"{other}\": supported values: \"Cluster\", \"Namespaced\""
            ),
        }),
    }
    let versions = obj["spec"]["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(required("spec.versions"));
    }
    let storage = versions
        .iter()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .count();
    if !versions.is_empty() && storage != 1 {
        causes.push(invalid(
            "spec.versions",
            format!(
                "Invalid value: {storage}: must have exactly one version marked as storage version"
            ),
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        if text(v, &["name"]).is_empty() {
            causes.push(required(&format!("spec.versions[{i}].name")));
        }
    }
    causes
}

/// What makes two CRD-served types the same: group, version, plural, kind, namespaced, status.
type TypeKey = (String, String, String, String, bool, bool);

/// Interned resource types of CRD-served versions: each distinct shape is leaked once, so
/// routes can hold `&'static` types like the built-ins however often CRDs come and go.
#[derive(Default)]
pub(crate) struct CrdTypes {
    interned: Mutex<BTreeMap<TypeKey, &'static ResourceType>>,
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

impl CrdTypes {
    fn intern(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
    ) -> &'static ResourceType {
        let key = (
            group.to_string(),
            version.to_string(),
            plural.to_string(),
            kind.to_string(),
            namespaced,
            status,
        );
        let mut map = self.interned.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key).or_insert_with(|| {
            Box::leak(Box::new(ResourceType {
                group: leak(group),
                version: leak(version),
                plural: leak(plural),
                kind: leak(kind),
                namespaced,
                status_subresource: status,
                crd: true,
            }))
        })
    }

    /// The types the CRDs in `store` serve right now.
    pub(crate) fn served(&self, store: &Store) -> Vec<&'static ResourceType> {
        let mut out = Vec::new();
        for crd in store.iter_type(&CUSTOM_RESOURCE_DEFINITIONS) {
            if crd["metadata"]["deletionTimestamp"].is_string() {
                continue;
            }
            let group = text(crd, &["spec", "group"]);
            let plural = text(crd, &["spec", "names", "plural"]);
            let kind = text(crd, &["spec", "names", "kind"]);
            let namespaced = text(crd, &["spec", "scope"]) == "Namespaced";
            for v in crd["spec"]["versions"].as_array().into_iter().flatten() {
                if v["served"].as_bool() != Some(true) {
                    continue;
                }
                let status = v["subresources"]["status"].is_object();
                out.push(self.intern(group, text(v, &["name"]), plural, kind, namespaced, status));
            }
        }
        out
    }
}

/// Sets the status the apiextensions controllers write: names accepted, established, and the
/// storage version recorded. Returns true if anything changed.
pub(crate) fn reconcile(store: &mut Store) -> bool {
    let mut changed = false;
    // Borrowed first (CRDs are large): only those whose status is behind are copied.
    let behind: Vec<Value> = store
        .iter_type(&CUSTOM_RESOURCE_DEFINITIONS)
        .filter(|crd| {
            !crd["status"]["conditions"].is_array()
                || crd["status"]["acceptedNames"] != crd["spec"]["names"]
                || crd["status"]["storedVersions"]
                    .as_array()
                    .map_or(0, Vec::len)
                    == 0
                || crd["spec"]["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|v| {
                        v["storage"].as_bool() == Some(true)
                            && !crd["status"]["storedVersions"]
                                .as_array()
                                .is_some_and(|a| a.iter().any(|x| *x == v["name"]))
                    })
        })
        .cloned()
        .collect();
    for crd in behind {
        let name = text(&crd, &["metadata", "name"]).to_string();
        let names = crd["spec"]["names"].clone();
        let storage: Vec<String> = crd["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["storage"].as_bool() == Some(true))
            .map(|v| text(v, &["name"]).to_string())
            .collect();
        if crd["status"]["acceptedNames"] == names
            && crd["status"]["conditions"].is_array()
            && storage.iter().all(|s| {
                crd["status"]["storedVersions"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == s))
            })
        {
            continue;
        }
        let now = rfc3339_now();
        changed |= store.controller_update(&CUSTOM_RESOURCE_DEFINITIONS, "", &name, |o| {
            let mut stored: Vec<Value> = o["status"]["storedVersions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for s in &storage {
                if !stored.iter().any(|x| x == s) {
                    stored.push(json!(s));
                }
            }
            o["status"] = json!({
                "acceptedNames": names,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now},
                ],
                "storedVersions": stored,
            });
        });
    }
    changed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_crds_are_valid_and_name_what_they_serve() {
        for text in [
            upstream::SNAPSHOT_METADATA_SERVICES,
            upstream::VOLUME_SNAPSHOTS,
            upstream::VOLUME_SNAPSHOT_CONTENTS,
            upstream::VOLUME_SNAPSHOT_CLASSES,
        ] {
            let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
            let crds: Vec<&Value> = docs.iter().filter(|d| !d.is_null()).collect();
            assert_eq!(crds.len(), 1);
            assert_eq!(
                validate(crds[0]),
                Vec::<Cause>::new(),
                "{}",
                crds[0]["metadata"]["name"]
            );
        }
    }

    #[test]
    fn a_crd_must_be_named_after_its_plural_and_group_with_one_storage_version() {
        let crd = json!({"metadata": {"name": "things.example.com"}, "spec": {
            "group": "example.com", "scope": "Cluster",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": false}]}});
        let fields: Vec<String> = validate(&crd).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["metadata.name", "spec.versions"]);
    }
}
