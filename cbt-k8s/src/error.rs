//! The crate's error type and its classification.

use std::time::Duration;

/// The toolkit's one error-kind vocabulary ([`Error::kind`] classifies into it).
pub use cbt_core::ErrorKind;

/// Errors of the Kubernetes layer (connection, snapshot objects, SnapShift).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kubeconfig could not be read or parsed.
    #[error("cannot load kubeconfig from {origin}: {source}")]
    Kubeconfig {
        /// Where it was read from (a path or `KUBECONFIG=...`).
        origin: String,
        /// Underlying error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig file was found where kubectl would look.
    #[error("no kubeconfig found: {tried}; {fix}")]
    NoKubeconfig {
        /// Where we looked.
        tried: String,
        /// What to do about it.
        fix: String,
    },
    /// The requested context is not in the kubeconfig.
    #[error("context {context:?} not found in kubeconfig {origin} (available: {available})")]
    ContextNotFound {
        /// Requested context.
        context: String,
        /// Where the kubeconfig came from.
        origin: String,
        /// Contexts that do exist, comma separated.
        available: String,
    },
    /// No context was requested and the kubeconfig has no current-context.
    #[error(
        "no context chosen and kubeconfig {origin} has no current-context; name one explicitly"
    )]
    NoContext {
        /// Where the kubeconfig came from.
        origin: String,
    },
    /// The client for a context could not be built.
    #[error("cannot build a Kubernetes client for context {context:?}: {source}")]
    Client {
        /// Context name.
        context: String,
        /// Underlying error.
        #[source]
        source: Box<kube::Error>,
    },
    /// An API call failed.
    #[error(
        "{verb} {kind} {object} in cluster {cluster:?}: {}{}",
        describe(source),
        api_hint(source, cluster, verb, kind)
    )]
    Api {
        /// Context name of the cluster.
        cluster: String,
        /// What was attempted (get, list, create, delete, watch).
        verb: &'static str,
        /// Object kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        object: String,
        /// Underlying error.
        #[source]
        source: Box<kube::Error>,
    },
    /// A required object does not exist.
    #[error("{kind} {object} not found in cluster {cluster:?}{hint}")]
    NotFound {
        /// Context name of the cluster.
        cluster: String,
        /// Object kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        object: String,
        /// Extra guidance, starting with "; " when present.
        hint: String,
    },
    /// The destination cluster lacks something the migration needs.
    #[error("cluster {cluster:?} is not ready: {problem}. Fix: {fix}")]
    Preflight {
        /// Context name of the cluster.
        cluster: String,
        /// What is missing or wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// An object with the planned name exists and is not the one we would create.
    #[error(
        "{kind} {object} already exists in cluster {cluster:?} and differs ({reason}); it was left untouched"
    )]
    Conflict {
        /// Context name of the cluster.
        cluster: String,
        /// Object kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        object: String,
        /// How it differs.
        reason: String,
    },
    /// An object under a name the operation needs is being deleted (held by finalizers).
    #[error(
        "{kind} {object} in cluster {cluster:?} is being deleted (waiting on finalizers: {finalizers}); run again once it is gone"
    )]
    Terminating {
        /// Context name of the cluster.
        cluster: String,
        /// Object kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        object: String,
        /// Finalizers still present, comma separated ("none" if empty).
        finalizers: String,
    },
    /// The snapshot controller or driver reported an error on a snapshot.
    #[error("VolumeSnapshot {object} in cluster {cluster:?} failed: {message}")]
    SnapshotFailed {
        /// Context name of the cluster.
        cluster: String,
        /// `namespace/name`.
        object: String,
        /// The controller's message.
        message: String,
    },
    /// The snapshot controller or driver reported an error on a group snapshot.
    #[error("VolumeGroupSnapshot {object} in cluster {cluster:?} failed: {message}")]
    GroupSnapshotFailed {
        /// Context name of the cluster.
        cluster: String,
        /// `namespace/name`.
        object: String,
        /// The controller's message, verbatim.
        message: String,
    },
    /// Members of a group backup failed; the others' outcome is in the group's report.
    #[error("{0}")]
    GroupMemberFailed(Box<GroupMemberFailure>),
    /// Work that was not started because the run it belongs to had already failed.
    #[error("{object} was not backed up: {reason}")]
    Skipped {
        /// What was skipped (`namespace/name`).
        object: String,
        /// Why.
        reason: String,
    },
    /// A wait exceeded its deadline.
    #[error(
        "timed out after {waited:?} waiting for {what} in cluster {cluster:?} (last seen: {last_state})"
    )]
    Timeout {
        /// Context name of the cluster.
        cluster: String,
        /// What was awaited.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// The last observed state.
        last_state: String,
    },
    /// Snapshot objects that should agree do not.
    #[error("inconsistent snapshot objects in cluster {cluster:?}: {problem}")]
    Inconsistent {
        /// Context name of the cluster.
        cluster: String,
        /// What disagrees.
        problem: String,
    },
    /// The caller cancelled the operation before it finished.
    #[error("cancelled before completion")]
    Cancelled,
    /// A caller-supplied value is unusable.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which input.
        what: String,
        /// Why.
        reason: String,
    },
    /// The CSI driver has no SnapshotMetadataService object: CBT is not available for it.
    #[error(
        "CSI driver {driver} has no SnapshotMetadataService in cluster {cluster:?} (or the cbt.storage.k8s.io/v1beta1 CRD is not installed): changed block tracking is not available for it; deploy the external-snapshot-metadata sidecar with the driver, or run `cbt doctor --driver {driver}` to see what is missing"
    )]
    NoMetadataService {
        /// Context name of the cluster.
        cluster: String,
        /// CSI driver name.
        driver: String,
    },
    /// The SnapshotMetadataService object (or what it leads to) cannot be used.
    #[error("SnapshotMetadataService {driver}: {problem}")]
    MetadataService {
        /// CSI driver name.
        driver: String,
        /// What is wrong.
        problem: String,
    },
    /// The PersistentVolumeClaim cannot be backed up with CBT as it is.
    #[error("PersistentVolumeClaim {object} in cluster {cluster:?} {problem}; {fix}")]
    PvcUnsuitable {
        /// Context name of the cluster.
        cluster: String,
        /// `namespace/name`.
        object: String,
        /// What is wrong (e.g. "is not bound (phase Pending)").
        problem: String,
        /// What to do.
        fix: String,
    },
    /// A data-mover Job failed.
    #[error("data mover Job {object} in cluster {cluster:?} failed: {reason}{}", log_tail.as_deref().map(|l| format!("\n--- last lines of its log ---\n{l}")).unwrap_or_default())]
    MoverFailed {
        /// Context name of the cluster.
        cluster: String,
        /// `namespace/name` of the Job.
        object: String,
        /// Why (the container's termination reason and message, or the Job's condition).
        reason: String,
        /// The end of the pod's log, when it could be read.
        log_tail: Option<String>,
        /// The class of the mover's own error, when it reported one (its exit class name).
        mover_class: Option<String>,
    },
    /// This replica lost the leader Lease while serving; it stops so it restarts as a follower.
    #[error(
        "lost leadership of Lease {lease} (identity {identity:?}): another replica serves now; restarting is safe"
    )]
    LeadershipLost {
        /// `namespace/name` of the Lease.
        lease: String,
        /// This replica's identity.
        identity: String,
    },
    /// The replication controller refused the change (Validated=False).
    #[error("{object} was refused: {message}")]
    ReplicationRejected {
        /// `namespace/name`.
        object: String,
        /// The controller's reason, saying what to fix.
        message: String,
    },
    /// The storage backend failed to make the change.
    #[error("{object} failed on the backend: {message}")]
    ReplicationFailed {
        /// `namespace/name`.
        object: String,
        /// The status message.
        message: String,
    },
    /// A local listener (metrics endpoint) could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Which members of a group backup failed and what became of the group (boxed in
/// [`Error::GroupMemberFailed`] to keep [`Error`] small).
#[derive(Debug, thiserror::Error)]
#[error(
    "{failed} of {total} members of VolumeGroupSnapshot {group} in cluster {cluster:?} failed (first: PVC {pvc}: {message}); {fate}"
)]
pub struct GroupMemberFailure {
    /// Context name of the cluster.
    pub cluster: String,
    /// `namespace/name` of the VolumeGroupSnapshot.
    pub group: String,
    /// `namespace/name` of the first member PVC that failed.
    pub pvc: String,
    /// How many members failed or were not started.
    pub failed: usize,
    /// How many members the group has.
    pub total: usize,
    /// That member's error message.
    pub message: String,
    /// Its classification, which the whole run takes.
    pub kind: ErrorKind,
    /// What became of the group snapshot.
    pub fate: String,
}

impl Error {
    /// Classifies the error for retry decisions and exit codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Api { source, .. } | Error::Client { source, .. } => classify(source),
            Error::Timeout { .. }
            | Error::Terminating { .. }
            | Error::Skipped { .. }
            | Error::LeadershipLost { .. } => ErrorKind::Transient,
            Error::GroupMemberFailed(f) => f.kind,
            Error::GroupSnapshotFailed { .. } => ErrorKind::Backend,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::SnapshotFailed { .. } | Error::Inconsistent { .. } => ErrorKind::Backend,
            Error::Kubeconfig { .. }
            | Error::NoKubeconfig { .. }
            | Error::ContextNotFound { .. }
            | Error::NoContext { .. }
            | Error::NotFound { .. }
            | Error::Preflight { .. }
            | Error::NoMetadataService { .. }
            | Error::MetadataService { .. }
            | Error::PvcUnsuitable { .. }
            | Error::Listen { .. }
            | Error::ReplicationRejected { .. }
            | Error::InvalidInput { .. } => ErrorKind::Config,
            Error::ReplicationFailed { .. } => ErrorKind::Backend,
            Error::MoverFailed { mover_class, .. } => {
                use cbt_core::exit::ExitClass as X;
                match mover_class.as_deref().map(X::from_name) {
                    // A mover that died without a report (killed, out of memory): retry.
                    None => ErrorKind::Transient,
                    // The mover's request is built from the user's setup, so a request it
                    // refuses is configuration, not the user's typing.
                    Some(Some(X::Usage | X::Config)) => ErrorKind::Config,
                    Some(Some(X::Integrity)) => ErrorKind::Integrity,
                    Some(Some(X::Conflict)) => ErrorKind::Conflict,
                    Some(Some(X::Unsupported)) => ErrorKind::Unsupported,
                    Some(Some(X::Transient)) => ErrorKind::Transient,
                    Some(Some(X::Internal)) => ErrorKind::Bug,
                    Some(_) => ErrorKind::Backend,
                }
            }
        }
    }

    /// True if the API server refused the call for lack of permission (HTTP 403 Forbidden):
    /// RBAC, not the object, is what needs fixing.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Error::Api { source, .. } if is_forbidden(source))
    }

    pub(crate) fn api(
        cluster: &str,
        verb: &'static str,
        kind: &'static str,
        object: impl Into<String>,
        source: kube::Error,
    ) -> Self {
        Error::Api {
            cluster: cluster.to_string(),
            verb,
            kind,
            object: object.into(),
            source: Box::new(source),
        }
    }
}

/// True for a 403 Forbidden answer.
pub(crate) fn is_forbidden(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 403)
}

fn classify(err: &kube::Error) -> ErrorKind {
    if crate::retry::is_transient(err) {
        return ErrorKind::Transient;
    }
    match err {
        kube::Error::Api(status) => match status.code {
            409 => ErrorKind::Conflict,
            400 | 422 | 415 => ErrorKind::Bug,
            _ => ErrorKind::Config,
        },
        kube::Error::SerdeError(_) => ErrorKind::Bug,
        _ => ErrorKind::Config,
    }
}

// kube's Display of an API error ends with a Debug dump of the whole Status; users need
// the server's message, reason and code.
pub(crate) fn describe(source: &kube::Error) -> String {
    match source {
        kube::Error::Api(status) => {
            let reason = if status.reason.is_empty() {
                String::new()
            } else {
                format!("{}, ", status.reason)
            };
            format!("{} ({reason}HTTP {})", status.message, status.code)
        }
        other => other.to_string(),
    }
}

/// Plural resource name for `kubectl auth can-i`.
fn resource_of(kind: &str) -> String {
    match kind {
        "VolumeSnapshot" => "volumesnapshots.snapshot.storage.k8s.io".into(),
        "VolumeSnapshotContent" => "volumesnapshotcontents.snapshot.storage.k8s.io".into(),
        "VolumeSnapshotClass" => "volumesnapshotclasses.snapshot.storage.k8s.io".into(),
        "VolumeGroupSnapshot" => "volumegroupsnapshots.groupsnapshot.storage.k8s.io".into(),
        "VolumeGroupSnapshotContent" => {
            "volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io".into()
        }
        "VolumeGroupSnapshotClass" => {
            "volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io".into()
        }
        "PersistentVolumeClaim" => "persistentvolumeclaims".into(),
        "StorageClass" => "storageclasses.storage.k8s.io".into(),
        "CSIDriver" => "csidrivers.storage.k8s.io".into(),
        "SnapshotMetadataService" => "snapshotmetadataservices.cbt.storage.k8s.io".into(),
        "ServiceAccount" => "serviceaccounts/token".into(),
        "Job" => "jobs.batch".into(),
        "VolumeReplication"
        | "VolumeReplicationClass"
        | "VolumeGroupReplication"
        | "VolumeGroupReplicationClass"
        | "VolumeGroupReplicationContent" => format!(
            "{}s.replication.storage.openshift.io",
            kind.to_ascii_lowercase()
        ),
        "TridentMirrorRelationship" | "TridentActionMirrorUpdate" => {
            format!("{}s.trident.netapp.io", kind.to_ascii_lowercase())
        }
        "DellCSIReplicationGroup" => "dellcsireplicationgroups.replication.storage.dell.com".into(),
        other => format!("{}s", other.to_ascii_lowercase()),
    }
}

// Credentials and RBAC are what users most often have to fix; say how.
fn api_hint(source: &kube::Error, cluster: &str, verb: &str, kind: &str) -> String {
    let kube::Error::Api(status) = source else {
        return String::new();
    };
    match status.code {
        401 => format!(
            ". The credentials of context {cluster:?} were rejected: refresh them (log in again, or renew the token/certificate in the kubeconfig)"
        ),
        403 => format!(
            ". Permission denied: check with `kubectl --context {cluster} auth can-i {verb} {}` and grant it to that user",
            resource_of(kind)
        ),
        _ => String::new(),
    }
}

/// `namespace/name`.
pub(crate) fn ns_name(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}
