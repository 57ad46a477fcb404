//! Which labels and annotations travel to the destination, and the provenance
//! annotations SnapShift stamps on what it creates.

use std::collections::BTreeMap;

/// Prefix of every key SnapShift writes.
pub const PREFIX: &str = "snapshift.cbt.io/";
/// Label on destination objects, so `verify` can find them.
pub const LABEL_MIGRATED: &str = "snapshift.cbt.io/migrated";
/// Annotation on origin snapshots SnapShift cut itself.
pub const ANN_CREATED_BY: &str = "snapshift.cbt.io/created-by";
/// Provenance: origin kubeconfig context.
pub const ANN_ORIGIN_CONTEXT: &str = "snapshift.cbt.io/origin-context";
/// Provenance: origin API server URL.
pub const ANN_ORIGIN_SERVER: &str = "snapshift.cbt.io/origin-server";
/// Provenance: origin VolumeSnapshot namespace.
pub const ANN_ORIGIN_NAMESPACE: &str = "snapshift.cbt.io/origin-namespace";
/// Provenance: origin VolumeSnapshot name.
pub const ANN_ORIGIN_NAME: &str = "snapshift.cbt.io/origin-name";
/// Provenance: CSI snapshot handle shared by both sides.
pub const ANN_ORIGIN_HANDLE: &str = "snapshift.cbt.io/origin-snapshot-handle";
/// Provenance: CSI driver.
pub const ANN_ORIGIN_DRIVER: &str = "snapshift.cbt.io/origin-driver";

/// Keys never copied whatever the options: client bookkeeping, controller
/// internals of snapshots and volumes, and our own keys (re-stamped fresh).
const ALWAYS_SKIPPED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    "snapshot.storage.kubernetes.io/",
    "snapshot.storage.k8s.io/",
    "pv.kubernetes.io/",
    "volume.kubernetes.io/",
    "volume.beta.kubernetes.io/",
    "control-plane.alpha.kubernetes.io/",
    "kubernetes.io/created-for/",
    PREFIX,
];

/// Allow/deny prefixes for copied labels and annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataFilter {
    /// If non-empty, only keys starting with one of these are copied.
    pub copy_prefixes: Vec<String>,
    /// Keys starting with one of these are never copied.
    pub skip_prefixes: Vec<String>,
}

impl MetadataFilter {
    /// True if `key` may be copied.
    pub fn allows(&self, key: &str) -> bool {
        if ALWAYS_SKIPPED.iter().any(|p| key.starts_with(p)) {
            return false;
        }
        if self
            .skip_prefixes
            .iter()
            .any(|p| key.starts_with(p.as_str()))
        {
            return false;
        }
        self.copy_prefixes.is_empty()
            || self
                .copy_prefixes
                .iter()
                .any(|p| key.starts_with(p.as_str()))
    }

    /// The allowed subset of a label or annotation map.
    pub fn filter(&self, map: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
        map.into_iter()
            .flatten()
            .filter(|(k, _)| self.allows(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Where a destination object came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// Origin kubeconfig context.
    pub context: String,
    /// Origin API server URL.
    pub server: String,
    /// Origin VolumeSnapshot namespace.
    pub namespace: String,
    /// Origin VolumeSnapshot name.
    pub name: String,
    /// CSI snapshot handle.
    pub handle: String,
    /// CSI driver.
    pub driver: String,
}

impl Provenance {
    /// The annotations that record it.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        [
            (ANN_ORIGIN_CONTEXT, &self.context),
            (ANN_ORIGIN_SERVER, &self.server),
            (ANN_ORIGIN_NAMESPACE, &self.namespace),
            (ANN_ORIGIN_NAME, &self.name),
            (ANN_ORIGIN_HANDLE, &self.handle),
            (ANN_ORIGIN_DRIVER, &self.driver),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
    }

    /// Reads it back; `None` if any key is missing.
    pub fn from_annotations(map: Option<&BTreeMap<String, String>>) -> Option<Self> {
        let map = map?;
        let get = |k: &str| map.get(k).cloned();
        Some(Self {
            context: get(ANN_ORIGIN_CONTEXT)?,
            server: get(ANN_ORIGIN_SERVER)?,
            namespace: get(ANN_ORIGIN_NAMESPACE)?,
            name: get(ANN_ORIGIN_NAME)?,
            handle: get(ANN_ORIGIN_HANDLE)?,
            driver: get(ANN_ORIGIN_DRIVER)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_rules() {
        let src: BTreeMap<String, String> = [
            ("app", "db"),
            ("team.example.com/owner", "x"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
            ("snapshot.storage.kubernetes.io/deletion-secret-name", "s"),
            ("pv.kubernetes.io/bind-completed", "yes"),
            ("snapshift.cbt.io/origin-name", "old"),
            ("internal.example.com/x", "y"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let all = MetadataFilter::default().filter(Some(&src));
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            ["app", "internal.example.com/x", "team.example.com/owner"]
        );
        let f = MetadataFilter {
            copy_prefixes: vec!["team.".into(), "internal.".into()],
            skip_prefixes: vec!["internal.".into()],
        };
        assert_eq!(
            f.filter(Some(&src)).keys().collect::<Vec<_>>(),
            ["team.example.com/owner"]
        );
        let p = Provenance {
            context: "a".into(),
            server: "https://a".into(),
            namespace: "n".into(),
            name: "s".into(),
            handle: "h".into(),
            driver: "d".into(),
        };
        assert_eq!(
            Provenance::from_annotations(Some(&p.annotations())),
            Some(p)
        );
        assert_eq!(Provenance::from_annotations(Some(&BTreeMap::new())), None);
    }
}
