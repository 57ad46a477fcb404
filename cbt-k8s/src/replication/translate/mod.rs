//! Pure translation between csi-addons replication objects and backend objects.
//!
//! Owns: turning one desired csi-addons object (a [`Subject`]), its class, the
//! PVCs of its namespace and the backend objects observed for it into a
//! [`Plan`]: the backend writes to make, the csi-addons `status` to write, and
//! the events to emit. It decides; it never does I/O, reads no clock (the
//! caller passes `now`) and keeps no state between calls: everything it needs
//! to stay idempotent across restarts is read back from the observed objects
//! (annotations we wrote on them, and the backend's own status).
//!
//! Per backend: [`trident`] (one TridentMirrorRelationship per PVC; a group is
//! N of them moved together), [`dell`] (one DellCSIReplicationGroup per
//! protection group, driven with one-shot `spec.action` verbs) and [`ceph`]
//! (ceph-csi serves csi-addons itself: validate and report, never write).
//! [`conditions`] maps what a backend reports onto csi-addons states and
//! conditions; [`crate::replication::mapping`] renders the tables.
//!
//! Bad input never produces a backend write: the plan carries a [`Rejection`]
//! (a typed reason with what to fix) and a `Validated=False` condition.
//!
//! Status ownership: for Trident and Dell classes we own the csi-addons status.
//! For Ceph the csi-addons controller owns it, so Ceph plans never carry one.
//! A rejection made before the backend is known (class missing, unknown
//! provisioner) does carry a status; whether such an object is ours to write
//! (say, a VolumeGroupReplication with `spec.external: true`) is for the
//! controller to decide before it writes.

pub mod ceph;
pub mod conditions;
pub mod dell;
pub mod trident;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{LocalObjectReference, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference, Time};
use serde_json::Value;

use super::types::{
    DellCSIReplicationGroup, MAX_GROUP_PVCS, PVC_VGR_ANNOTATION, PVC_VR_ANNOTATION,
    RESERVED_PARAMETER_PREFIX, ReplicationState, TridentActionMirrorUpdate,
    TridentMirrorRelationship, VolumeGroupReplication, VolumeGroupReplicationClass,
    VolumeGroupReplicationStatus, VolumeReplication, VolumeReplicationClass,
    VolumeReplicationStatus,
};
use conditions::Report;

/// Prefix of the annotations and labels this translation writes and reads back.
pub const KEY_PREFIX: &str = "replication.cbt.io/";
/// Annotation on backend objects: which csi-addons object owns it (`Kind/namespace/name`).
pub const OWNER_ANNOTATION: &str = "replication.cbt.io/owner";
/// Annotation on backend objects: the class the owner was bound to (detects edited immutable fields).
pub const CLASS_ANNOTATION: &str = "replication.cbt.io/class";
/// Label on objects we create.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "cbt-replicator";
/// PVC annotation: the remote volume handle (`<svm>:<volume>`) of this PVC's peer (Trident).
pub const PVC_REMOTE_HANDLE_ANNOTATION: &str = "replication.cbt.io/remote-volume-handle";
/// PVC annotation: snapshot handle to wait for when promoting (Trident planned failover).
pub const PVC_PROMOTED_SNAPSHOT_ANNOTATION: &str = "replication.cbt.io/promoted-snapshot-handle";

/// Which storage backend serves a class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// NetApp Trident (ONTAP SnapMirror through TridentMirrorRelationship).
    Trident,
    /// Dell PowerStore (protection groups through DellCSIReplicationGroup).
    DellPowerStore,
    /// ceph-csi RBD: serves csi-addons itself; we only validate and report.
    CephRbd,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 3] = [Self::Trident, Self::DellPowerStore, Self::CephRbd];

    /// The backend whose CSI driver is `provisioner`, if we know it.
    pub fn for_provisioner(provisioner: &str) -> Option<Self> {
        if provisioner == trident::DRIVER {
            Some(Self::Trident)
        } else if provisioner == dell::DRIVER {
            Some(Self::DellPowerStore)
        } else if ceph::is_rbd_driver(provisioner) {
            Some(Self::CephRbd)
        } else {
            None
        }
    }

    /// Human name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Trident => "NetApp Trident",
            Self::DellPowerStore => "Dell PowerStore",
            Self::CephRbd => "Ceph RBD",
        }
    }

    /// The CSI driver name (Ceph: the default one; Rook prefixes it with a namespace).
    pub fn driver(self) -> &'static str {
        match self {
            Self::Trident => trident::DRIVER,
            Self::DellPowerStore => dell::DRIVER,
            Self::CephRbd => ceph::DRIVER,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the subject is a VolumeReplication or a VolumeGroupReplication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubjectKind {
    /// A VolumeReplication (one PVC).
    Volume,
    /// A VolumeGroupReplication (the PVCs a selector picks).
    Group,
}

impl SubjectKind {
    /// The Kubernetes kind.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Volume => "VolumeReplication",
            Self::Group => "VolumeGroupReplication",
        }
    }
}

/// What the subject replicates.
#[derive(Clone, Debug, PartialEq)]
pub enum SubjectSource {
    /// `spec.dataSource` of a VolumeReplication naming a PVC.
    Pvc(String),
    /// `spec.dataSource` of another kind (csi-addons' own group VR, or bad input).
    Other {
        /// API group of the data source (`""` = core).
        api_group: String,
        /// Kind of the data source.
        kind: String,
        /// Name of the data source.
        name: String,
    },
    /// `spec.source.selector` of a VolumeGroupReplication.
    Selector(LabelSelector),
}

/// The desired csi-addons object, reduced to what translation reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Subject {
    /// VolumeReplication or VolumeGroupReplication.
    pub kind: SubjectKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, for owner references on what we create (absent in tests and dry runs).
    pub uid: Option<String>,
    /// `metadata.generation`.
    pub generation: i64,
    /// True once `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `spec.replicationState`.
    pub desired: ReplicationState,
    /// `spec.autoResync`.
    pub auto_resync: bool,
    /// `spec.dataSource` / `spec.source.selector`.
    pub source: SubjectSource,
    /// `spec.replicationHandle` (VolumeReplication only; `""` if unset).
    pub replication_handle: String,
    /// `spec.external` (VolumeGroupReplication only).
    pub external: bool,
    /// Class name from the spec.
    pub class_name: String,
    /// The current status (the replication part).
    pub status: VolumeReplicationStatus,
    /// The current `persistentVolumeClaimsRefList` (groups).
    pub group_pvcs: Vec<LocalObjectReference>,
}

impl Subject {
    /// Reads a VolumeReplication.
    ///
    /// # Errors
    /// [`TranslateError::MissingMetadata`] when name or namespace is missing.
    pub fn from_volume(vr: &VolumeReplication) -> Result<Self, TranslateError> {
        let (namespace, name) = names(&vr.metadata, "VolumeReplication")?;
        let ds = &vr.spec.data_source;
        let api_group = ds.api_group.clone().unwrap_or_default();
        let source = if api_group.is_empty() && ds.kind == "PersistentVolumeClaim" {
            SubjectSource::Pvc(ds.name.clone())
        } else {
            SubjectSource::Other {
                api_group,
                kind: ds.kind.clone(),
                name: ds.name.clone(),
            }
        };
        Ok(Self {
            kind: SubjectKind::Volume,
            namespace,
            name,
            uid: vr.metadata.uid.clone(),
            generation: vr.metadata.generation.unwrap_or(0),
            deleting: vr.metadata.deletion_timestamp.is_some(),
            desired: vr.spec.replication_state,
            auto_resync: vr.spec.auto_resync,
            source,
            replication_handle: vr.spec.replication_handle.clone(),
            external: false,
            class_name: vr.spec.volume_replication_class.clone(),
            status: vr.status.clone().unwrap_or_default(),
            group_pvcs: Vec::new(),
        })
    }

    /// Reads a VolumeGroupReplication.
    ///
    /// # Errors
    /// [`TranslateError::MissingMetadata`] when name or namespace is missing.
    pub fn from_group(vgr: &VolumeGroupReplication) -> Result<Self, TranslateError> {
        let (namespace, name) = names(&vgr.metadata, "VolumeGroupReplication")?;
        let status = vgr.status.clone().unwrap_or_default();
        Ok(Self {
            kind: SubjectKind::Group,
            namespace,
            name,
            uid: vgr.metadata.uid.clone(),
            generation: vgr.metadata.generation.unwrap_or(0),
            deleting: vgr.metadata.deletion_timestamp.is_some(),
            desired: vgr.spec.replication_state,
            auto_resync: vgr.spec.auto_resync,
            source: SubjectSource::Selector(vgr.spec.source.selector.clone()),
            replication_handle: String::new(),
            external: vgr.spec.external,
            class_name: vgr.spec.volume_group_replication_class_name.clone(),
            status: status.replication,
            group_pvcs: status.persistent_volume_claims_ref_list,
        })
    }

    /// `Kind/namespace/name`: the value of [`OWNER_ANNOTATION`] on what we make for it.
    pub fn owner_key(&self) -> String {
        format!("{}/{}/{}", self.kind.kind(), self.namespace, self.name)
    }

    /// The value csi-addons writes in a PVC's owner annotation (`name/namespace`).
    pub fn csi_addons_owner(&self) -> String {
        format!("{}/{}", self.name, self.namespace)
    }

    /// Owner reference for objects made for this subject (None without a UID).
    pub fn owner_reference(&self) -> Option<OwnerReference> {
        Some(OwnerReference {
            api_version: format!("{}/{}", super::types::GROUP, super::types::VERSION),
            kind: self.kind.kind().to_string(),
            name: self.name.clone(),
            uid: self.uid.clone()?,
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
    }
}

fn names(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    kind: &'static str,
) -> Result<(String, String), TranslateError> {
    let name = meta.name.clone().ok_or(TranslateError::MissingMetadata {
        kind,
        field: "metadata.name",
    })?;
    let namespace = meta
        .namespace
        .clone()
        .ok_or(TranslateError::MissingMetadata {
            kind,
            field: "metadata.namespace",
        })?;
    Ok((namespace, name))
}

/// A VolumeReplicationClass or VolumeGroupReplicationClass, reduced to what translation reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassView {
    /// Class name.
    pub name: String,
    /// CSI driver name.
    pub provisioner: String,
    /// Parameters, without the keys csi-addons reserves for itself.
    pub parameters: BTreeMap<String, String>,
}

impl ClassView {
    fn new(
        name: Option<&String>,
        provisioner: &str,
        params: Option<&BTreeMap<String, String>>,
    ) -> Self {
        Self {
            name: name.cloned().unwrap_or_default(),
            provisioner: provisioner.to_string(),
            parameters: params
                .into_iter()
                .flatten()
                .filter(|(k, _)| !k.starts_with(RESERVED_PARAMETER_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Reads a VolumeReplicationClass.
    pub fn from_volume_class(c: &VolumeReplicationClass) -> Self {
        Self::new(
            c.metadata.name.as_ref(),
            &c.spec.provisioner,
            c.spec.parameters.as_ref(),
        )
    }

    /// Reads a VolumeGroupReplicationClass.
    pub fn from_group_class(c: &VolumeGroupReplicationClass) -> Self {
        Self::new(
            c.metadata.name.as_ref(),
            &c.spec.provisioner,
            c.spec.parameters.as_ref(),
        )
    }

    /// A parameter, if set and non-empty.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.parameters
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// A PVC of the subject's namespace, reduced to what translation reads.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PvcInfo {
    /// PVC name.
    pub name: String,
    /// Labels (selectors and Dell's replication group label).
    pub labels: BTreeMap<String, String>,
    /// Annotations (csi-addons owners, our per-PVC inputs).
    pub annotations: BTreeMap<String, String>,
    /// CSI driver of the bound PV, or the StorageClass provisioner while pending; None if unknown.
    pub driver: Option<String>,
    /// Finalizers (csi-addons' protection finalizers of a claimed PVC).
    pub finalizers: Vec<String>,
}

impl PvcInfo {
    /// Reads a PVC; `driver` comes from its PV (`spec.csi.driver`) or its StorageClass.
    pub fn from_pvc(pvc: &PersistentVolumeClaim, driver: Option<String>) -> Self {
        Self {
            name: pvc.metadata.name.clone().unwrap_or_default(),
            labels: pvc.metadata.labels.clone().unwrap_or_default(),
            annotations: pvc.metadata.annotations.clone().unwrap_or_default(),
            driver,
            finalizers: pvc.metadata.finalizers.clone().unwrap_or_default(),
        }
    }
}

/// Everything translation reads about the csi-addons side.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The object to reconcile.
    pub subject: Subject,
    /// Its class; None if the class does not exist.
    pub class: Option<ClassView>,
    /// PVCs of the subject's namespace (all of them for groups and Dell; at least the data source otherwise).
    pub pvcs: Vec<PvcInfo>,
    /// The time to stamp on changed conditions (kept to whole seconds, as the API stores it).
    pub now: Time,
}

/// Backend objects observed for a subject.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Observed {
    /// Nothing read (Ceph, or an unknown backend).
    #[default]
    Nothing,
    /// Trident objects of the subject's namespace.
    Trident(TridentObserved),
    /// Dell objects.
    Dell(DellObserved),
}

/// Trident objects of the subject's namespace.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TridentObserved {
    /// TridentMirrorRelationships (at least those named after member PVCs and those we own).
    pub relationships: Vec<TridentMirrorRelationship>,
    /// TridentActionMirrorUpdates we own.
    pub updates: Vec<TridentActionMirrorUpdate>,
}

/// Dell objects.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DellObserved {
    /// DellCSIReplicationGroups (at least the one the member PVCs are labelled with).
    pub groups: Vec<DellCSIReplicationGroup>,
}

/// Identifies an object a write targets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    /// `group/version`.
    pub api_version: String,
    /// Kind.
    pub kind: String,
    /// Namespace (None for cluster-scoped kinds).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A backend object to create, exactly as it will be sent.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendObject {
    /// A TridentMirrorRelationship.
    MirrorRelationship(Box<TridentMirrorRelationship>),
    /// A TridentActionMirrorUpdate.
    MirrorUpdate(Box<TridentActionMirrorUpdate>),
}

impl BackendObject {
    /// Where it goes.
    pub fn key(&self) -> ObjectKey {
        let (kind, meta) = match self {
            Self::MirrorRelationship(o) => ("TridentMirrorRelationship", &o.metadata),
            Self::MirrorUpdate(o) => ("TridentActionMirrorUpdate", &o.metadata),
        };
        ObjectKey {
            api_version: "trident.netapp.io/v1".into(),
            kind: kind.into(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// The JSON body of the create call.
    pub fn to_json(&self) -> Value {
        // Serializing these plain data types cannot fail; Null is only a fallback.
        match self {
            Self::MirrorRelationship(o) => serde_json::to_value(o),
            Self::MirrorUpdate(o) => serde_json::to_value(o),
        }
        .unwrap_or(Value::Null)
    }
}

/// One write to a backend object.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendWrite {
    /// Create this object.
    Create(BackendObject),
    /// Apply this JSON merge patch (it carries `metadata.resourceVersion`, so a
    /// patch computed from a stale observation fails with a conflict instead of
    /// acting twice).
    Patch {
        /// Target.
        target: ObjectKey,
        /// RFC 7386 merge patch body.
        patch: Value,
    },
    /// Delete this object.
    Delete {
        /// Target.
        target: ObjectKey,
    },
}

impl BackendWrite {
    /// The object written.
    pub fn target(&self) -> ObjectKey {
        match self {
            Self::Create(o) => o.key(),
            Self::Patch { target, .. } | Self::Delete { target } => target.clone(),
        }
    }
}

/// The csi-addons status to write.
#[derive(Clone, Debug, PartialEq)]
pub enum SubjectStatus {
    /// For a VolumeReplication.
    Volume(VolumeReplicationStatus),
    /// For a VolumeGroupReplication.
    Group(VolumeGroupReplicationStatus),
}

impl SubjectStatus {
    /// The replication part (shared by both kinds).
    pub fn replication(&self) -> &VolumeReplicationStatus {
        match self {
            Self::Volume(s) => s,
            Self::Group(s) => &s.replication,
        }
    }
}

/// Kubernetes event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Progress.
    Normal,
    /// Something a person should look at.
    Warning,
}

/// An event to record on the subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason.
    pub reason: String,
    /// What happened.
    pub message: String,
}

/// What to do for one subject.
///
/// # Guarantees
/// - A plan with a [`Rejection`] has no writes.
/// - Planning again from the same observation and the status this plan wrote
///   gives an empty plan ([`Plan::is_noop`]); so does planning from the
///   observation after the writes were applied, until the backend moves.
/// - Dell verbs: one verb is requested at most once per transition (desired
///   state at a generation), derived from the objects alone.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Plan {
    /// The backend that serves the class, if known.
    pub backend: Option<Backend>,
    /// Backend writes, in order.
    pub writes: Vec<BackendWrite>,
    /// New status, only when it differs from the current one (None for Ceph: csi-addons owns it).
    pub status: Option<SubjectStatus>,
    /// Events to record.
    pub events: Vec<Event>,
    /// Why nothing was written, when the input is bad.
    pub rejection: Option<Rejection>,
    /// For a subject being deleted: true once nothing of ours is left (the finalizer may go).
    pub deletion_complete: bool,
}

impl Plan {
    /// True when the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.writes.is_empty() && self.status.is_none() && self.events.is_empty()
    }
}

/// A caller error: the inputs are not what translation expects (not bad user input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// An object lacks a field the API server always sets.
    #[error("{kind} has no {field}")]
    MissingMetadata {
        /// Kind of the object.
        kind: &'static str,
        /// Missing field.
        field: &'static str,
    },
    /// The observation passed does not belong to the class's backend.
    #[error("class is served by {backend} but {observed} objects were passed")]
    ObservationMismatch {
        /// Backend of the class.
        backend: Backend,
        /// What was passed.
        observed: &'static str,
    },
}

/// What kind of fix a [`Rejection`] needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectionKind {
    /// Fix the VolumeReplication / VolumeGroupReplication.
    Spec,
    /// Fix (or pick another) class.
    Class,
    /// Fix PVCs (labels, annotations, drivers).
    Pvc,
    /// A backend object was changed outside cbt-replicator, or belongs to someone else.
    Backend,
    /// The desired state conflicts with what the storage is.
    Conflict,
}

/// Bad input: reported as `Validated=False` with this text, and nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The class named by the spec does not exist.
    #[error(
        "replication class {class:?} does not exist; create it or fix the class name (immutable: recreate the object)"
    )]
    ClassNotFound {
        /// Class name.
        class: String,
    },
    /// The class names a driver no backend here serves.
    #[error(
        "class {class:?} names provisioner {provisioner:?}, which cbt-replicator does not serve (supported: {supported}); use a class of a supported driver"
    )]
    UnknownProvisioner {
        /// Class name.
        class: String,
        /// Its provisioner.
        provisioner: String,
        /// Supported drivers.
        supported: String,
    },
    /// A parameter the backend needs is missing.
    #[error("class {class:?} lacks parameter {key:?}: {why}")]
    MissingParameter {
        /// Class name.
        class: String,
        /// Parameter key.
        key: String,
        /// What it is for and how to set it.
        why: String,
    },
    /// A parameter has a value the backend cannot use.
    #[error("class {class:?} parameter {key:?} = {value:?} is invalid: expected {expected}")]
    InvalidParameter {
        /// Class name.
        class: String,
        /// Parameter key.
        key: String,
        /// Value given.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// A remote volume handle is not `<svm>:<volume>`.
    #[error(
        "remote volume handle {value:?} from {origin} is not <svm>:<volume> (the peer TridentMirrorRelationship's status localVolumeHandle)"
    )]
    InvalidRemoteHandle {
        /// Where it came from.
        origin: String,
        /// The value.
        value: String,
    },
    /// The data source is not a PVC.
    #[error(
        "dataSource {kind} {name:?} is not supported for {backend}: only PersistentVolumeClaim (use a VolumeGroupReplication for groups)"
    )]
    UnsupportedDataSource {
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        /// Backend.
        backend: Backend,
    },
    /// The group selector is malformed.
    #[error("spec.source.selector is invalid: {problem}")]
    InvalidSelector {
        /// What is wrong.
        problem: String,
    },
    /// The group selector matches no PVC.
    #[error(
        "spec.source.selector matches no PVC in namespace {namespace:?}; label the PVCs to replicate"
    )]
    SelectorMatchedNone {
        /// Namespace searched.
        namespace: String,
    },
    /// The group selector matches too many PVCs.
    #[error(
        "spec.source.selector matches {matched} PVCs; a group holds at most {max}: narrow the selector or split the group"
    )]
    TooManyPvcs {
        /// How many matched.
        matched: usize,
        /// The limit.
        max: usize,
    },
    /// A PVC needed by the backend does not exist.
    #[error("PVC {pvc:?} does not exist; {hint}")]
    PvcMissing {
        /// PVC name.
        pvc: String,
        /// What to do.
        hint: String,
    },
    /// A member PVC belongs to another CSI driver.
    #[error(
        "PVC {pvc:?} is provisioned by {driver:?}, not {expected:?}; remove it from the group (labels) or use a class for its driver"
    )]
    ForeignDriver {
        /// PVC name.
        pvc: String,
        /// Its driver.
        driver: String,
        /// The class's driver.
        expected: String,
    },
    /// A PVC or backend object is already driven by another csi-addons object.
    #[error(
        "{object} is already replicated by {owner}; a PVC may be in one VolumeReplication or one VolumeGroupReplication only"
    )]
    ClaimedElsewhere {
        /// The PVC or backend object.
        object: String,
        /// Who has it.
        owner: String,
    },
    /// A backend object with the name we need exists and was not made by us.
    #[error(
        "{object} exists and was not created by cbt-replicator; delete it (deleting a TridentMirrorRelationship promotes its volume) or replicate this PVC with it by hand"
    )]
    NotOurs {
        /// The object.
        object: String,
    },
    /// An immutable input differs from what the backend objects were made with.
    #[error(
        "{field} changed from {was:?} to {now:?}, but it is immutable for {object}; restore it, or delete and recreate the replication"
    )]
    ImmutableFieldChanged {
        /// The backend object bound to the old value.
        object: String,
        /// The field.
        field: String,
        /// Old value.
        was: String,
        /// New value.
        now: String,
    },
    /// A backend object we own differs from what we last wrote.
    #[error(
        "{object} was changed outside cbt-replicator ({detail}); undo the change, or delete the object to let cbt-replicator recreate it"
    )]
    ChangedByHand {
        /// The object.
        object: String,
        /// What differs.
        detail: String,
    },
    /// The desired state cannot be reached from what the storage is.
    #[error("{detail}")]
    ConflictingState {
        /// What conflicts and what to do.
        detail: String,
    },
    /// A VolumeGroupReplication for a vendor backend must be marked external.
    #[error(
        "VolumeGroupReplication uses {backend} (class {class:?}) but spec.external is false, so the csi-addons controller would drive it too; recreate it with spec.external: true (immutable)"
    )]
    ExternalRequired {
        /// Backend.
        backend: Backend,
        /// Class name.
        class: String,
    },
    /// A Ceph group marked external: nobody would reconcile it.
    #[error(
        "VolumeGroupReplication is external but its class {class:?} is Ceph, which the csi-addons controller serves and cbt-replicator never drives; recreate it with spec.external: false"
    )]
    ExternalOnCeph {
        /// Class name.
        class: String,
    },
    /// Dell: a member PVC is not in any protection group.
    #[error(
        "PVC {pvc:?} has no label {label}: it is not replicated by Dell (StorageClass needs isReplicationEnabled: \"true\"), or the Dell sidecar has not labelled it yet"
    )]
    NotInProtectionGroup {
        /// PVC name.
        pvc: String,
        /// The label looked for.
        label: &'static str,
    },
    /// Dell: members are in different protection groups.
    #[error(
        "the PVCs span protection groups {groups}; Dell fails over whole protection groups, so one VolumeGroupReplication must match exactly one"
    )]
    SpansProtectionGroups {
        /// The groups, comma separated.
        groups: String,
    },
    /// Dell: the protection group holds PVCs the subject does not select.
    #[error("{}", partial_group_message(*subject, group, others))]
    PartialProtectionGroup {
        /// What the refused object is (the fix differs: widen a selector, or use a group).
        subject: SubjectKind,
        /// RG name.
        group: String,
        /// The unselected PVCs (at least one, sorted).
        others: Vec<String>,
    },
}

/// The text of [`Rejection::PartialProtectionGroup`]: one PVC or several, and the fix that
/// fits the object refused.
fn partial_group_message(subject: SubjectKind, group: &str, others: &[String]) -> String {
    let list = others.join(", ");
    let (pvcs, them) = match others {
        [_] => (format!("PVC {list}"), "it"),
        _ => (format!("PVCs {list}"), "them"),
    };
    match subject {
        SubjectKind::Volume => format!(
            "protection group {group} also holds {pvcs}; Dell fails over whole protection groups, so a VolumeReplication serves only a group of one PVC: replicate the group with a VolumeGroupReplication that selects every PVC in it"
        ),
        SubjectKind::Group => format!(
            "protection group {group} also holds {pvcs} that this VolumeGroupReplication does not select; Dell fails over whole protection groups, so widen spec.source.selector to select {them} too"
        ),
    }
}

impl Rejection {
    /// What kind of fix it needs.
    pub fn kind(&self) -> RejectionKind {
        match self {
            Self::UnsupportedDataSource { .. }
            | Self::InvalidSelector { .. }
            | Self::SelectorMatchedNone { .. }
            | Self::TooManyPvcs { .. }
            | Self::ExternalRequired { .. }
            | Self::ExternalOnCeph { .. }
            | Self::InvalidRemoteHandle { .. }
            | Self::ImmutableFieldChanged { .. } => RejectionKind::Spec,
            Self::ClassNotFound { .. }
            | Self::UnknownProvisioner { .. }
            | Self::MissingParameter { .. }
            | Self::InvalidParameter { .. } => RejectionKind::Class,
            Self::PvcMissing { .. }
            | Self::ForeignDriver { .. }
            | Self::NotInProtectionGroup { .. }
            | Self::SpansProtectionGroups { .. }
            | Self::PartialProtectionGroup { .. } => RejectionKind::Pvc,
            Self::NotOurs { .. } | Self::ChangedByHand { .. } => RejectionKind::Backend,
            Self::ClaimedElsewhere { .. } | Self::ConflictingState { .. } => {
                RejectionKind::Conflict
            }
        }
    }
}

/// Plans one subject.
///
/// # Errors
/// [`TranslateError::ObservationMismatch`] when `observed` is not of the class's backend.
///
/// # Guarantees
/// See [`Plan`].
pub fn plan(req: &Request, observed: &Observed) -> Result<Plan, TranslateError> {
    let Some(class) = &req.class else {
        return Ok(reject(
            req,
            None,
            Rejection::ClassNotFound {
                class: req.subject.class_name.clone(),
            },
        ));
    };
    let Some(backend) = Backend::for_provisioner(&class.provisioner) else {
        return Ok(reject(
            req,
            None,
            Rejection::UnknownProvisioner {
                class: class.name.clone(),
                provisioner: class.provisioner.clone(),
                supported: Backend::ALL.map(Backend::driver).join(", "),
            },
        ));
    };
    match (backend, observed) {
        (Backend::CephRbd, _) => Ok(ceph::plan(req, class)),
        (Backend::Trident, Observed::Trident(obs)) => Ok(trident::plan(req, class, obs)),
        (Backend::Trident, Observed::Nothing) => {
            Ok(trident::plan(req, class, &TridentObserved::default()))
        }
        (Backend::DellPowerStore, Observed::Dell(obs)) => Ok(dell::plan(req, class, obs)),
        (Backend::DellPowerStore, Observed::Nothing) => {
            Ok(dell::plan(req, class, &DellObserved::default()))
        }
        (backend, Observed::Trident(_)) => Err(TranslateError::ObservationMismatch {
            backend,
            observed: "Trident",
        }),
        (backend, Observed::Dell(_)) => Err(TranslateError::ObservationMismatch {
            backend,
            observed: "Dell",
        }),
    }
}

/// The rejection of a group this tool would have to create on `backend`, which replicates
/// groups only when adopted from outside (`None`: the subject may go on).
pub(crate) fn reject_unless_external_group(
    req: &Request,
    class: &ClassView,
    backend: Backend,
) -> Option<Plan> {
    let s = &req.subject;
    (s.kind == SubjectKind::Group && !s.external && !s.deleting).then(|| {
        reject(
            req,
            Some(backend),
            Rejection::ExternalRequired {
                backend,
                class: class.name.clone(),
            },
        )
    })
}

/// A plan that writes nothing and reports `rejection` (status owned by us).
pub(crate) fn reject(req: &Request, backend: Option<Backend>, rejection: Rejection) -> Plan {
    if req.subject.deleting {
        // Nothing of ours can be identified; let the object go.
        return Plan {
            backend,
            events: vec![Event {
                type_: EventType::Warning,
                reason: "DeletedWithoutCleanup".into(),
                message: format!("deleted while invalid, backend objects left alone: {rejection}"),
            }],
            rejection: Some(rejection),
            deletion_complete: true,
            ..Plan::default()
        };
    }
    let report = Report::rejected(req.subject.desired, &rejection);
    let mut plan = finish(req, backend, Vec::new(), Vec::new(), &report, None);
    plan.rejection = Some(rejection);
    plan
}

/// Builds the plan from writes and a report: status only if changed, events for changes.
pub(crate) fn finish(
    req: &Request,
    backend: Option<Backend>,
    writes: Vec<BackendWrite>,
    mut events: Vec<Event>,
    report: &Report,
    members: Option<&[String]>,
) -> Plan {
    let started = !writes.is_empty();
    let replication = conditions::merge_status(&req.subject, report, &req.now, started);
    events.extend(conditions::transition_events(
        &req.subject.status,
        &replication,
    ));
    let status = match req.subject.kind {
        SubjectKind::Volume => {
            (replication != req.subject.status).then_some(SubjectStatus::Volume(replication))
        }
        SubjectKind::Group => {
            let refs = match members {
                Some(m) => m
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect(),
                None => req.subject.group_pvcs.clone(),
            };
            (replication != req.subject.status || refs != req.subject.group_pvcs).then_some(
                SubjectStatus::Group(VolumeGroupReplicationStatus {
                    replication,
                    persistent_volume_claims_ref_list: refs,
                }),
            )
        }
    };
    Plan {
        backend,
        writes,
        status,
        events,
        rejection: None,
        deletion_complete: false,
    }
}

/// The member PVCs of the subject: its data source, or what its selector matches (sorted).
///
/// A VolumeReplication's PVC may not exist yet (Trident makes the destination
/// PVC after the relationship), so members are names; callers look the PVC up.
///
/// # Errors
/// A [`Rejection`] for a non-PVC data source, a bad selector, 0 or more than
/// [`MAX_GROUP_PVCS`] matches, a PVC of another driver, or a PVC already
/// claimed by another csi-addons object.
pub fn members(req: &Request, backend: Backend) -> Result<Vec<String>, Rejection> {
    let subject = &req.subject;
    let names: Vec<String> = match &subject.source {
        SubjectSource::Pvc(name) => vec![name.clone()],
        SubjectSource::Other { kind, name, .. } => {
            return Err(Rejection::UnsupportedDataSource {
                kind: kind.clone(),
                name: name.clone(),
                backend,
            });
        }
        SubjectSource::Selector(sel) => {
            let mut matched = Vec::new();
            for pvc in &req.pvcs {
                if selector_matches(sel, &pvc.labels)
                    .map_err(|problem| Rejection::InvalidSelector { problem })?
                {
                    matched.push(pvc.name.clone());
                }
            }
            matched.sort();
            matched.dedup();
            if matched.is_empty() {
                return Err(Rejection::SelectorMatchedNone {
                    namespace: subject.namespace.clone(),
                });
            }
            if matched.len() > MAX_GROUP_PVCS {
                return Err(Rejection::TooManyPvcs {
                    matched: matched.len(),
                    max: MAX_GROUP_PVCS,
                });
            }
            matched
        }
    };
    for name in &names {
        let Some(pvc) = pvc(req, name) else { continue };
        if let Some(driver) = &pvc.driver
            && !driver_matches(backend, driver)
        {
            return Err(Rejection::ForeignDriver {
                pvc: name.clone(),
                driver: driver.clone(),
                expected: backend.driver().to_string(),
            });
        }
        let me = subject.csi_addons_owner();
        let (mine, other) = match subject.kind {
            SubjectKind::Volume => (PVC_VR_ANNOTATION, PVC_VGR_ANNOTATION),
            SubjectKind::Group => (PVC_VGR_ANNOTATION, PVC_VR_ANNOTATION),
        };
        if let Some(owner) = pvc.annotations.get(mine).filter(|o| **o != me) {
            return Err(Rejection::ClaimedElsewhere {
                object: format!("PVC {name}"),
                owner: format!("{} {owner}", subject.kind.kind()),
            });
        }
        if let Some(owner) = pvc.annotations.get(other) {
            let kind = match subject.kind {
                SubjectKind::Volume => SubjectKind::Group,
                SubjectKind::Group => SubjectKind::Volume,
            };
            return Err(Rejection::ClaimedElsewhere {
                object: format!("PVC {name}"),
                owner: format!("{} {owner}", kind.kind()),
            });
        }
    }
    Ok(names)
}

fn driver_matches(backend: Backend, driver: &str) -> bool {
    match backend {
        Backend::CephRbd => ceph::is_rbd_driver(driver),
        _ => driver == backend.driver(),
    }
}

/// The PVC with this name, if the caller passed it.
pub(crate) fn pvc<'a>(req: &'a Request, name: &str) -> Option<&'a PvcInfo> {
    req.pvcs.iter().find(|p| p.name == name)
}

/// Evaluates a label selector like the API server (`matchLabels` and `matchExpressions`, ANDed).
///
/// # Errors
/// A description of the problem for an unknown operator or a value list that
/// does not fit the operator.
pub fn selector_matches(
    sel: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let mut ok = true;
    for (k, v) in sel.match_labels.iter().flatten() {
        ok &= labels.get(k) == Some(v);
    }
    for req in sel.match_expressions.iter().flatten() {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        let hit = match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "operator {} on key {:?} needs values",
                    req.operator, req.key
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!(
                    "operator {} on key {:?} takes no values",
                    req.operator, req.key
                ));
            }
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => {
                return Err(format!(
                    "unknown operator {other:?} on key {:?} (In, NotIn, Exists, DoesNotExist)",
                    req.key
                ));
            }
        };
        ok &= hit;
    }
    Ok(ok)
}

/// The annotations of a backend object.
pub(crate) fn annotations(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> BTreeMap<String, String> {
    meta.annotations.clone().unwrap_or_default()
}
