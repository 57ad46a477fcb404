//! Which backup an incremental builds on: the parent of a CBT delta, chosen from the volume's
//! manifests by the CSI snapshot handle each backup recorded.
//!
//! A delta from CSI snapshot `B` to the snapshot being backed up is only correct on top of the
//! backup that was read from `B`; building on any other backup would silently mix two states of
//! the volume. These functions make that decision (and explain a refusal); they read nothing.

use crate::manifest::{Manifest, ManifestHead, SourceInfo};
use crate::names::{SnapshotName, VolumeName};
use crate::time::Timestamp;

/// Why no parent could be chosen for a delta.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineageError {
    /// The volume has no backup at all, so a delta has nothing to build on.
    #[error(
        "volume {volume} has no backup in this repository, so there is no parent for a delta from {base}"
    )]
    NoBackup {
        /// The volume.
        volume: VolumeName,
        /// The requested delta base (CSI handle).
        base: String,
    },
    /// No backup of the volume was read from the requested base snapshot.
    #[error(
        "no backup of volume {volume} was taken from CSI snapshot {base} (the latest, {latest}, was taken from {latest_from})"
    )]
    NoBackupFromBase {
        /// The volume.
        volume: VolumeName,
        /// The requested delta base.
        base: String,
        /// The volume's latest backup.
        latest: SnapshotName,
        /// The CSI snapshot that backup was read from, or a description if unrecorded.
        latest_from: String,
    },
    /// The parent named by the caller does not exist.
    #[error("parent {parent}: no such backup of volume {volume}")]
    ParentNotFound {
        /// The volume.
        volume: VolumeName,
        /// The named parent.
        parent: SnapshotName,
    },
    /// The parent named by the caller was not read from the delta's base.
    #[error("parent {parent} was taken from {parent_from}, not from the delta base {base}")]
    ParentFromOtherBase {
        /// The named parent.
        parent: SnapshotName,
        /// What that parent was read from.
        parent_from: String,
        /// The requested delta base.
        base: String,
    },
    /// The base is an older backup while a newer one exists.
    #[error(
        "base CSI snapshot {base} is backup {candidate} of volume {volume}, but the latest backup is {latest} (taken from {latest_from})"
    )]
    BaseNotLatest {
        /// The volume.
        volume: VolumeName,
        /// The requested delta base.
        base: String,
        /// The backup read from the base.
        candidate: SnapshotName,
        /// The volume's latest backup.
        latest: SnapshotName,
        /// What the latest backup was read from.
        latest_from: String,
    },
}

impl LineageError {
    /// What the user can do about it.
    pub fn guidance(&self) -> String {
        match self {
            Self::NoBackup { .. } | Self::NoBackupFromBase { .. } => {
                "take a full backup instead (no delta base)".into()
            }
            Self::ParentNotFound { .. } | Self::ParentFromOtherBase { .. } => {
                "name the backup that was taken from the delta base, or omit the parent".into()
            }
            Self::BaseNotLatest { latest_from, .. } => format!(
                "use base {latest_from} to build on the latest backup, or allow a base that is not the latest"
            ),
        }
    }
}

/// What lineage decisions need of a backup: a whole [`Manifest`] or only its
/// [`ManifestHead`] (which is all a format-2 manifest object holds).
pub trait BackupRecord {
    /// Snapshot name.
    fn snapshot(&self) -> &SnapshotName;
    /// Unique id.
    fn snapshot_id(&self) -> &str;
    /// Creation time.
    fn created(&self) -> Timestamp;
    /// Provenance.
    fn source(&self) -> &SourceInfo;
}

impl BackupRecord for Manifest {
    fn snapshot(&self) -> &SnapshotName {
        &self.snapshot
    }
    fn snapshot_id(&self) -> &str {
        &self.snapshot_id
    }
    fn created(&self) -> Timestamp {
        self.created
    }
    fn source(&self) -> &SourceInfo {
        &self.source
    }
}

impl BackupRecord for ManifestHead {
    fn snapshot(&self) -> &SnapshotName {
        &self.snapshot
    }
    fn snapshot_id(&self) -> &str {
        &self.snapshot_id
    }
    fn created(&self) -> Timestamp {
        self.created
    }
    fn source(&self) -> &SourceInfo {
        &self.source
    }
}

/// The CSI snapshot a backup was read from, or a description for messages.
fn taken_from<M: BackupRecord>(m: &M) -> String {
    m.source()
        .csi_snapshot_id
        .clone()
        .unwrap_or_else(|| "an unrecorded snapshot".into())
}

/// Orders backups of one volume oldest first (creation time, then name for equal times).
fn by_age<M: BackupRecord>(manifests: &mut [M]) {
    manifests.sort_by(|a, b| (a.created(), a.snapshot()).cmp(&(b.created(), b.snapshot())));
}

/// The volume's latest backup and the CSI handle it was read from, if it recorded one: the
/// base of the next delta when the caller does not name one.
pub fn latest_delta_base<M: BackupRecord>(mut manifests: Vec<M>) -> Option<(M, Option<String>)> {
    by_age(&mut manifests);
    let latest = manifests.pop()?;
    let handle = latest.source().csi_snapshot_id.clone();
    Some((latest, handle))
}

/// Picks the parent of an incremental whose delta base is CSI snapshot `base`.
///
/// The parent is the backup read from `base` (or `explicit`, which must have been read from
/// `base`); unless `allow_non_latest`, it must be the volume's latest backup, so an incremental
/// never silently builds on an older state.
///
/// # Errors
/// A [`LineageError`] naming the volume, the base and the latest backup.
pub fn choose_parent<M: BackupRecord + Clone>(
    mut manifests: Vec<M>,
    volume: &VolumeName,
    base: &str,
    explicit: Option<&SnapshotName>,
    allow_non_latest: bool,
) -> Result<M, LineageError> {
    by_age(&mut manifests);
    let Some(latest) = manifests.last() else {
        return Err(LineageError::NoBackup {
            volume: volume.clone(),
            base: base.to_string(),
        });
    };
    let candidate = match explicit {
        Some(p) => manifests
            .iter()
            .find(|m| m.snapshot() == p)
            .ok_or_else(|| LineageError::ParentNotFound {
                volume: volume.clone(),
                parent: p.clone(),
            })?,
        None => manifests
            .iter()
            .rev()
            .find(|m| m.source().csi_snapshot_id.as_deref() == Some(base))
            .ok_or_else(|| LineageError::NoBackupFromBase {
                volume: volume.clone(),
                base: base.to_string(),
                latest: latest.snapshot().clone(),
                latest_from: taken_from(latest),
            })?,
    };
    if candidate.source().csi_snapshot_id.as_deref() != Some(base) {
        return Err(LineageError::ParentFromOtherBase {
            parent: candidate.snapshot().clone(),
            parent_from: taken_from(candidate),
            base: base.to_string(),
        });
    }
    if candidate.snapshot_id() != latest.snapshot_id() && !allow_non_latest {
        return Err(LineageError::BaseNotLatest {
            volume: volume.clone(),
            base: base.to_string(),
            candidate: candidate.snapshot().clone(),
            latest: latest.snapshot().clone(),
            latest_from: taken_from(latest),
        });
    }
    Ok(candidate.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::manifest::{ChunkMap, SnapshotMeta, SourceInfo};
    use crate::ranges::ChunkGeometry;
    use crate::time::Timestamp;

    fn m(name: &str, secs: i64, from: Option<&str>) -> Manifest {
        let geometry = ChunkGeometry::new(1 << 20, 1 << 20).unwrap();
        Manifest::new(
            SnapshotMeta {
                volume: VolumeName::new("v").unwrap(),
                snapshot: SnapshotName::new(name).unwrap(),
                snapshot_id: format!("id-{name}"),
                created: Timestamp::from_unix_secs(secs),
                source: SourceInfo {
                    csi_snapshot_id: from.map(str::to_string),
                    ..Default::default()
                },
                labels: Default::default(),
                stats: Default::default(),
            },
            ChunkMap::new(geometry),
            None,
        )
        .unwrap()
    }

    fn v() -> VolumeName {
        VolumeName::new("v").unwrap()
    }

    #[test]
    fn the_backup_read_from_the_base_is_the_parent_when_it_is_the_latest() {
        let ms = vec![m("b2", 20, Some("h2")), m("b1", 10, Some("h1"))];
        assert_eq!(
            choose_parent(ms.clone(), &v(), "h2", None, false)
                .unwrap()
                .snapshot
                .as_str(),
            "b2"
        );
        let e = choose_parent(ms.clone(), &v(), "h1", None, false).unwrap_err();
        assert!(
            matches!(e, LineageError::BaseNotLatest { ref latest, .. } if latest.as_str() == "b2")
        );
        assert_eq!(
            choose_parent(ms.clone(), &v(), "h1", None, true)
                .unwrap()
                .snapshot
                .as_str(),
            "b1"
        );
        assert!(matches!(
            choose_parent(ms.clone(), &v(), "h9", None, false),
            Err(LineageError::NoBackupFromBase { .. })
        ));
        assert!(matches!(
            choose_parent::<Manifest>(vec![], &v(), "h1", None, false),
            Err(LineageError::NoBackup { .. })
        ));
        let b1 = SnapshotName::new("b1").unwrap();
        assert!(matches!(
            choose_parent(ms.clone(), &v(), "h2", Some(&b1), true),
            Err(LineageError::ParentFromOtherBase { .. })
        ));
        let nope = SnapshotName::new("zz").unwrap();
        assert!(matches!(
            choose_parent(ms, &v(), "h2", Some(&nope), true),
            Err(LineageError::ParentNotFound { .. })
        ));
    }

    #[test]
    fn the_latest_backup_names_the_next_base() {
        let ms = vec![
            m("b1", 10, Some("h1")),
            m("b3", 30, None),
            m("b2", 20, Some("h2")),
        ];
        let (latest, handle) = latest_delta_base(ms).unwrap();
        assert_eq!(latest.snapshot.as_str(), "b3");
        assert_eq!(
            handle, None,
            "a backup without a recorded handle cannot be a delta base"
        );
        assert!(latest_delta_base::<Manifest>(vec![]).is_none());
    }
}
