//! CBT-driven backup planning: asks a SnapshotMetadata service which ranges to read, picks the
//! parent, and decides when a full backup replaces a delta. Feature `csi`.
//!
//! Every caller that backs up from CBT goes through [`plan_cbt_backup`]: `cbt backup --device`
//! with a metadata endpoint, the in-cluster data mover of `cbt backup --pvc`, and embedding
//! tools. It returns a [`CbtBackupPlan`] (a value: what will be read, against which parent,
//! recorded as what) that [`crate::engine::backup`] then performs. It never reads the device
//! and never writes to the repository.
//!
//! # Decisions
//! - No delta base: a full backup of the allocated ranges (`GetMetadataAllocated`).
//! - A base handle: the parent is the backup read from that handle, and it must be the
//!   volume's latest unless allowed ([`cbt_core::lineage::choose_parent`]).
//! - [`DeltaBase::Latest`]: the base is the handle the latest backup recorded; with no backup
//!   it is a full backup, with a latest backup that recorded no handle a full backup that keeps
//!   the latest as lineage (its chunks are not re-uploaded).
//! - A refusal the service will repeat (CBT off, unknown snapshot, bad request) fails the plan,
//!   unless `fallback_full`: then a full backup from the allocated ranges, or from the device's
//!   own data map if those are refused too. A transient failure never falls back.

use std::collections::HashMap;

use cbt_core::lineage::{self, LineageError};
use cbt_core::manifest::{ParentRef, SourceInfo};
use cbt_core::{SnapshotName, VolumeName};
use cbt_csi::{CsiError, MetadataClient, MetadataRequest, MetadataSummary, Query};

use crate::engine::BackupMode;
use crate::repo::{RepoError, Repository};

/// The snapshot being backed up, as the metadata service names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CbtTarget {
    /// CSI API (a driver socket): the snapshot's CSI handle.
    Csi {
        /// CSI snapshot handle.
        snapshot_id: String,
    },
    /// Kubernetes SnapshotMetadata API (the sidecar): a VolumeSnapshot in a namespace.
    Kubernetes {
        /// Namespace of the VolumeSnapshot.
        namespace: String,
        /// VolumeSnapshot name.
        snapshot_name: String,
        /// CSI handle of that snapshot (its content's `status.snapshotHandle`), recorded so a
        /// later incremental can name this backup as its base.
        snapshot_handle: Option<String>,
    },
}

impl CbtTarget {
    /// The CSI handle recorded in the manifest, if known.
    pub fn handle(&self) -> Option<&str> {
        match self {
            Self::Csi { snapshot_id } => Some(snapshot_id),
            Self::Kubernetes {
                snapshot_handle, ..
            } => snapshot_handle.as_deref(),
        }
    }

    fn allocated(&self) -> Query {
        match self {
            Self::Csi { snapshot_id } => Query::CsiAllocated {
                snapshot_id: snapshot_id.clone(),
            },
            Self::Kubernetes {
                namespace,
                snapshot_name,
                ..
            } => Query::K8sAllocated {
                namespace: namespace.clone(),
                snapshot_name: snapshot_name.clone(),
            },
        }
    }

    fn delta(&self, base: &str) -> Query {
        match self {
            Self::Csi { snapshot_id } => Query::CsiDelta {
                base_snapshot_id: base.to_string(),
                target_snapshot_id: snapshot_id.clone(),
            },
            Self::Kubernetes {
                namespace,
                snapshot_name,
                ..
            } => Query::K8sDelta {
                namespace: namespace.clone(),
                base_snapshot_id: base.to_string(),
                target_snapshot_name: snapshot_name.clone(),
            },
        }
    }
}

/// What the delta is computed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaBase {
    /// No delta: a full backup of the allocated ranges.
    Full,
    /// A delta from this CSI snapshot handle.
    Handle(String),
    /// A delta from the handle the volume's latest backup recorded; full when there is none.
    Latest,
}

/// What to plan.
#[derive(Debug, Clone)]
pub struct CbtBackupSpec {
    /// Volume the backup belongs to in the repository.
    pub volume: VolumeName,
    /// The snapshot being backed up.
    pub target: CbtTarget,
    /// What the delta is computed against.
    pub base: DeltaBase,
    /// The parent, when the caller names it (must have been read from the base).
    pub explicit_parent: Option<SnapshotName>,
    /// Accept a base that is not the volume's latest backup.
    pub allow_non_latest_base: bool,
    /// Turn a refusal of the service into a full backup instead of an error.
    pub fallback_full: bool,
    /// Tuples per response message (0 = the service chooses).
    pub max_results: u32,
    /// CSI secrets sent with every call (CSI API only).
    pub secrets: HashMap<String, String>,
}

impl CbtBackupSpec {
    /// A spec with defaults: full backup, no parent, no fallback.
    pub fn new(volume: VolumeName, target: CbtTarget) -> Self {
        Self {
            volume,
            target,
            base: DeltaBase::Full,
            explicit_parent: None,
            allow_non_latest_base: false,
            fallback_full: false,
            max_results: 0,
            secrets: HashMap::new(),
        }
    }

    fn request(&self, query: Query) -> MetadataRequest {
        MetadataRequest::new(query)
            .max_results(self.max_results)
            .with_secrets(self.secrets.clone())
    }
}

/// The decided backup: hand `mode`, `volume_size` and `source` to the engine.
#[derive(Debug)]
pub struct CbtBackupPlan {
    /// Full (with or without lineage) or incremental, with the ranges to read.
    pub mode: BackupMode,
    /// Volume size reported by the service (`None`: use the device's size).
    pub volume_size: Option<u64>,
    /// Provenance to record in the manifest.
    pub source: SourceInfo,
    /// The query whose answer the ranges are (`None` after a fallback to the device's map).
    pub query: Option<Query>,
    /// Totals of that answer.
    pub metadata: Option<MetadataSummary>,
    /// Things the user should know (fallbacks, unrecorded handles), one sentence each.
    pub notes: Vec<String>,
}

/// Why a CBT backup could not be planned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CbtPlanError {
    /// No usable parent for the delta.
    #[error(transparent)]
    Lineage(#[from] LineageError),
    /// A parent was named without a delta base: it would be a full backup ignoring it.
    #[error(
        "parent {parent} needs a delta base (the CSI snapshot that backup was taken from); without one this is a full backup"
    )]
    ParentWithoutBase {
        /// The named parent.
        parent: SnapshotName,
    },
    /// Reading the repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The metadata service failed.
    #[error("{source}")]
    Metadata {
        /// The client's error.
        source: CsiError,
        /// The service refused in a way a retry will not change (and no fallback was allowed).
        refused: bool,
    },
}

impl CbtPlanError {
    /// What the user can do about it.
    pub fn guidance(&self) -> Option<String> {
        match self {
            Self::Lineage(e) => Some(e.guidance()),
            Self::ParentWithoutBase { .. } => {
                Some("name the delta base, or omit the parent for a full backup".into())
            }
            Self::Metadata { refused: true, .. } => Some(
                "the service refused the request, so retrying will not help: allow a fallback to a full backup instead of failing"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// Decides a CBT backup: asks the service for ranges, picks the parent.
///
/// # Errors
/// [`CbtPlanError`]: no usable parent, a service failure (refusals only without
/// `fallback_full`), or a repository read failure.
pub async fn plan_cbt_backup(
    repo: &Repository,
    client: &MetadataClient,
    spec: &CbtBackupSpec,
) -> Result<CbtBackupPlan, CbtPlanError> {
    let mut notes = Vec::new();
    let mut source = SourceInfo {
        csi_snapshot_id: spec.target.handle().map(str::to_string),
        ..Default::default()
    };
    if let CbtTarget::Kubernetes {
        namespace,
        snapshot_name,
        snapshot_handle,
    } = &spec.target
    {
        source.namespace = Some(namespace.clone());
        source.volume_snapshot = Some(snapshot_name.clone());
        if snapshot_handle.is_none() {
            notes.push(format!(
                "the CSI handle of {namespace}/{snapshot_name} is not known, so it is not recorded and a later incremental cannot name this backup as its base"
            ));
        }
    }

    // Which base, and which parent.
    let (base, parent, lineage_only) = match &spec.base {
        DeltaBase::Full => {
            if let Some(p) = &spec.explicit_parent {
                return Err(CbtPlanError::ParentWithoutBase { parent: p.clone() });
            }
            (None, None, None)
        }
        DeltaBase::Handle(base) => {
            // Heads only: choosing a parent needs names, times and provenance, not maps.
            let manifests = repo.load_heads(Some(&spec.volume)).await?;
            let parent = lineage::choose_parent(
                manifests,
                &spec.volume,
                base,
                spec.explicit_parent.as_ref(),
                spec.allow_non_latest_base,
            )?;
            (Some(base.clone()), Some(parent), None)
        }
        DeltaBase::Latest => {
            let manifests = repo.load_heads(Some(&spec.volume)).await?;
            match lineage::latest_delta_base(manifests) {
                None => (None, None, None),
                Some((latest, Some(handle))) => (Some(handle), Some(latest), None),
                Some((latest, None)) => {
                    notes.push(format!(
                        "the latest backup {} of volume {} recorded no CSI snapshot handle, so no delta can be asked for: taking a full backup with it as lineage",
                        latest.snapshot, spec.volume
                    ));
                    let lineage = ParentRef {
                        snapshot: latest.snapshot.clone(),
                        snapshot_id: latest.snapshot_id.clone(),
                    };
                    (None, None, Some(lineage))
                }
            }
        }
    };
    source.base_csi_snapshot_id = base.clone();

    let query = match &base {
        Some(b) => spec.target.delta(b),
        None => spec.target.allocated(),
    };
    match client.collect_range_set(spec.request(query.clone())).await {
        Ok((ranges, summary)) => {
            let mode = match (parent, lineage_only) {
                (Some(p), _) => BackupMode::IncrementalOf {
                    parent: Box::new(p),
                    changed: ranges,
                },
                (None, Some(lineage)) => BackupMode::FullWithParent {
                    allocated: Some(ranges),
                    parent: lineage,
                },
                (None, None) => BackupMode::Full {
                    allocated: Some(ranges),
                },
            };
            Ok(CbtBackupPlan {
                mode,
                // A stream without any message reports no capacity: the device's size is used.
                volume_size: summary.volume_capacity_bytes,
                source,
                query: Some(query),
                metadata: Some(summary),
                notes,
            })
        }
        Err(e) if e.is_non_retryable_service_error() && spec.fallback_full => {
            notes.push(format!("{e}; falling back to a full backup"));
            source.base_csi_snapshot_id = None;
            // A refused delta may still leave the allocated map available.
            let allocated = if base.is_some() {
                let q = spec.target.allocated();
                match client.collect_range_set(spec.request(q.clone())).await {
                    Ok((r, s)) => Some((q, r, s)),
                    Err(e2) => {
                        notes.push(format!(
                            "allocated ranges unavailable too ({e2}); reading the device's data map"
                        ));
                        None
                    }
                }
            } else {
                notes.push(
                    "reading the device's data map (or every byte) instead of service metadata"
                        .into(),
                );
                None
            };
            let (query, allocated, metadata) = match allocated {
                Some((q, r, s)) => (Some(q), Some(r), Some(s)),
                None => (None, None, None),
            };
            Ok(CbtBackupPlan {
                mode: BackupMode::Full { allocated },
                volume_size: metadata.as_ref().and_then(|s| s.volume_capacity_bytes),
                source,
                query,
                metadata,
                notes,
            })
        }
        Err(e) => Err(CbtPlanError::Metadata {
            refused: e.is_non_retryable_service_error(),
            source: e,
        }),
    }
}
