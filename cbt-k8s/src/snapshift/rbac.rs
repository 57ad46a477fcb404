//! The part of SnapShift's RBAC story that lives in code: the optional checks, each with
//! the permission it needs and what a run loses without it.
//!
//! A migration needs a fixed set of permissions on each side (the manifests in
//! `examples/snapshift/` grant exactly those, and the README lists them). A few calls only
//! catch a problem early or make a message clearer; when RBAC forbids one of them the run
//! goes on without it and reports a [`SkippedCheck`] instead of failing. Every other call
//! is required, and a 403 on it fails the run with the API server's message.
//!
//! This module only describes; `execute` decides when a check is skipped.

use std::fmt;

use serde::Serialize;

use super::execute::Side;

/// A check a migration skips, with a warning, when RBAC forbids the call it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum OptionalCheck {
    /// Origin `get storageclasses`: finds the PVC's CSI driver, so the destination can be
    /// checked before a snapshot is cut, and `--dry-run` can plan a snapshot not cut yet.
    OriginDriver,
    /// Destination `get namespaces`: the destination namespace exists.
    DestinationNamespace,
    /// Destination `get csidrivers`: the snapshot's CSI driver is installed there.
    DestinationDriver,
    /// Destination `get volumesnapshotclasses`: a class named explicitly exists and belongs
    /// to the snapshot's driver.
    NamedSnapshotClass,
    /// Destination `list storageclasses` (restoring a PVC): its StorageClass exists and is
    /// provisioned by the snapshot's driver.
    RestoreStorageClass,
    /// `watch volumesnapshots` on one side: readiness is noticed as it happens.
    WatchSnapshots(Side),
}

impl OptionalCheck {
    /// The cluster the check talks to.
    pub fn side(self) -> Side {
        match self {
            OptionalCheck::OriginDriver => Side::Origin,
            OptionalCheck::WatchSnapshots(side) => side,
            _ => Side::Destination,
        }
    }

    /// The RBAC verb it needs.
    pub fn verb(self) -> &'static str {
        match self {
            OptionalCheck::RestoreStorageClass => "list",
            OptionalCheck::WatchSnapshots(_) => "watch",
            _ => "get",
        }
    }

    /// The resource it needs the verb on, as `kubectl auth can-i` takes it.
    pub fn resource(self) -> &'static str {
        match self {
            OptionalCheck::OriginDriver | OptionalCheck::RestoreStorageClass => {
                "storageclasses.storage.k8s.io"
            }
            OptionalCheck::DestinationNamespace => "namespaces",
            OptionalCheck::DestinationDriver => "csidrivers.storage.k8s.io",
            OptionalCheck::NamedSnapshotClass => "volumesnapshotclasses.snapshot.storage.k8s.io",
            OptionalCheck::WatchSnapshots(_) => "volumesnapshots.snapshot.storage.k8s.io",
        }
    }

    /// What a run loses without it.
    pub fn lost(self) -> &'static str {
        match self {
            OptionalCheck::OriginDriver => {
                "the PVC's CSI driver is unknown until its snapshot exists: the destination is checked only after the origin snapshot is cut (a snapshot that cannot land there stays in the origin), and --dry-run cannot plan a snapshot not cut yet"
            }
            OptionalCheck::DestinationNamespace => {
                "a missing destination namespace is noticed only when the VolumeSnapshot is created there"
            }
            OptionalCheck::DestinationDriver => {
                "a CSI driver missing in the destination shows only as a snapshot that never becomes ready"
            }
            OptionalCheck::NamedSnapshotClass => {
                "the named VolumeSnapshotClass is used unchecked: a missing class or one of another driver is reported by the snapshot controller, not up front"
            }
            OptionalCheck::RestoreStorageClass => {
                "the restored PVC's StorageClass is not checked: one that is missing or belongs to another driver leaves the PVC Pending"
            }
            OptionalCheck::WatchSnapshots(_) => {
                "readiness is polled with get (every 250 ms to 2 s) instead of watched"
            }
        }
    }
}

/// An optional check one run skipped because RBAC forbade it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedCheck {
    /// Which check.
    pub check: OptionalCheck,
    /// Context name of the cluster that refused it.
    pub cluster: String,
}

impl fmt::Display for SkippedCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not allowed to {} {} in cluster {:?}, so {} (optional; grant it to get the check back, see examples/snapshift/)",
            self.check.verb(),
            self.check.resource(),
            self.cluster,
            self.check.lost()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_names_its_permission() {
        let all = [
            OptionalCheck::OriginDriver,
            OptionalCheck::DestinationNamespace,
            OptionalCheck::DestinationDriver,
            OptionalCheck::NamedSnapshotClass,
            OptionalCheck::RestoreStorageClass,
            OptionalCheck::WatchSnapshots(Side::Origin),
            OptionalCheck::WatchSnapshots(Side::Destination),
        ];
        let perms: std::collections::HashSet<_> = all
            .iter()
            .map(|c| (c.side(), c.verb(), c.resource()))
            .collect();
        assert_eq!(perms.len(), all.len(), "no two checks share a permission");
        let s = SkippedCheck {
            check: OptionalCheck::DestinationNamespace,
            cluster: "west".into(),
        };
        assert!(s.to_string().starts_with(
            "not allowed to get namespaces in cluster \"west\", so a missing destination namespace"
        ));
    }
}
