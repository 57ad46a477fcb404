//! The data mover: what runs inside the Job that `cbt backup --pvc` and `cbt restore --to-pvc`
//! create, next to the volume it reads or writes.
//!
//! The orchestrator hands it a [`MoverSpec`] (JSON in an environment variable: no secret in it;
//! S3 credentials come from a Secret as the standard AWS variables, the metadata token from a
//! projected ServiceAccount token file) and reads back a [`MoverReport`] from the container's
//! termination message. The mover talks to the repository and to the SnapshotMetadata service,
//! never to the Kubernetes API, so its ServiceAccount needs no Kubernetes rights beyond what the
//! metadata sidecar checks for its token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbt_core::ErrorKind;
use cbt_core::exit::ExitClass;
use cbt_core::manifest::ParentRef;
use cbt_core::manifest::SourceInfo;
use cbt_core::manifest::StoredManifest;
use cbt_core::{SnapshotName, Timestamp, VolumeName};
use cbt_csi::MetadataClient;
use cbt_store::engine::cbt::{
    CbtBackupPlan, CbtBackupSpec, CbtPlanError, CbtTarget, DeltaBase, plan_cbt_backup,
};
use cbt_store::engine::{
    self, BackupMode, BackupRequest, EngineOptions, FileSource, RestoreOptions, TargetVerifyReport,
    verify_target_stored,
};
use cbt_store::repo::{RepoError, Repository};
use cbt_store::store::{S3Options, StoreError, open_url};
use serde::{Deserialize, Serialize};

/// Version of the spec format, so a mover image older than its orchestrator refuses clearly.
pub const MOVER_SPEC_VERSION: u32 = 1;
/// Environment variable holding the JSON [`MoverSpec`].
pub const SPEC_ENV: &str = "CBT_MOVER_SPEC";
/// Largest termination message the kubelet keeps; the report is cut to fit.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Everything a mover needs, except secrets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoverSpec {
    /// Format version ([`MOVER_SPEC_VERSION`]).
    pub version: u32,
    /// Repository URL (`s3://bucket/prefix` or `file:///path`).
    pub repo: String,
    /// S3 endpoint for S3-compatible servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// Path of the attached raw block device inside the container.
    pub device: String,
    /// What to do.
    pub task: MoverTask,
}

impl MoverSpec {
    /// The S3 settings the spec carries, as the store takes them.
    pub fn s3_options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            ..S3Options::default()
        }
    }
}

/// A mover's job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MoverTask {
    /// Back up the device (a volume restored from a VolumeSnapshot) with CBT.
    Backup(Box<BackupTask>),
    /// Restore a snapshot onto the device and read it back.
    Restore(RestoreTask),
    /// Read the device back against a snapshot without writing to it: the check a restore
    /// ends with, for a volume restored earlier (or by other means).
    Verify(RestoreTask),
}

/// How the backup mover reaches the SnapshotMetadata service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataAccess {
    /// `host:port` of the sidecar.
    pub address: String,
    /// PEM CA bundle (the SnapshotMetadataService `caCert`; public).
    pub ca_pem: String,
    /// TLS server name (the host of the address).
    pub server_name: String,
    /// File holding the audience-scoped token (a projected ServiceAccount token).
    pub token_file: String,
    /// Namespace of the VolumeSnapshot.
    pub namespace: String,
    /// VolumeSnapshot being backed up.
    pub snapshot_name: String,
    /// Its CSI handle, recorded as the next delta's base.
    pub snapshot_handle: String,
}

/// A CBT backup of the attached device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupTask {
    /// Repository volume name.
    pub volume: String,
    /// Repository snapshot name.
    pub snapshot: String,
    /// Where the ranges come from; `None` (no SnapshotMetadata service, `--fallback-full`)
    /// reads the whole device.
    #[serde(default)]
    pub metadata: Option<MetadataAccess>,
    /// Take a full backup when the service refuses a delta.
    #[serde(default)]
    pub fallback_full: bool,
    /// Provenance recorded in the manifest (PVC facts, driver, VolumeSnapshot).
    #[serde(default)]
    pub source: SourceInfo,
    /// Labels recorded in the manifest.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// zstd level of chunk data.
    #[serde(default = "default_level")]
    pub compression_level: i32,
}

fn default_level() -> i32 {
    EngineOptions::default().compression_level
}

/// A restore onto the attached device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTask {
    /// Repository volume name.
    pub volume: String,
    /// Repository snapshot name.
    pub snapshot: String,
}

/// What a mover did, as the orchestrator reads it back (kept under 4 KiB).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MoverReport {
    /// True on success.
    pub ok: bool,
    /// Snapshot written (backup) or restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Its unique id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Parent of a backup (an incremental's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Volume size in bytes.
    #[serde(default)]
    pub volume_size: u64,
    /// `GetMetadataAllocated` or `GetMetadataDelta`, when a backup asked the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_call: Option<String>,
    /// Bytes the service reported (allocated or changed).
    #[serde(default)]
    pub bytes_in_ranges: u64,
    /// Bytes read from the device: by a backup, or by the read-back of a verify (a
    /// regular file's holes are not read).
    #[serde(default)]
    pub bytes_read: u64,
    /// Bytes uploaded (backup) or downloaded (restore).
    #[serde(default)]
    pub bytes_transferred: u64,
    /// Bytes written to the device (restore).
    #[serde(default)]
    pub bytes_written: u64,
    /// Chunk objects a backup uploaded.
    #[serde(default)]
    pub chunks_uploaded: u64,
    /// Chunks a backup did not upload because they were already stored (most often unchanged
    /// since the parent).
    #[serde(default)]
    pub chunks_deduplicated: u64,
    /// Bytes of a backup in chunks whose content differs from the parent's.
    #[serde(default)]
    pub bytes_changed: u64,
    /// Most chunk-map entries a backup held at once: bounded by configuration where the maps
    /// are streamed (see `cbt_store::engine::BackupOutcome::map_entries_peak`), the stored
    /// chunks of a whole map otherwise.
    #[serde(default)]
    pub map_entries_peak: u64,
    /// Chunks read back and matched after a restore.
    #[serde(default)]
    pub chunks_verified: u64,
    /// Seconds the work took.
    #[serde(default)]
    pub seconds: f64,
    /// Notes for the user (fallbacks and the like).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// On failure: the error class (`usage`, `config`, `transient`, `integrity`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    /// On failure: what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MoverReport {
    /// The report as JSON no longer than [`TERMINATION_MESSAGE_LIMIT`]: notes, then the error
    /// text, are shortened until it fits.
    pub fn to_termination_message(&self) -> String {
        let mut r = self.clone();
        loop {
            let text = serde_json::to_string(&r).unwrap_or_else(|_| "{\"ok\":false}".into());
            if text.len() <= TERMINATION_MESSAGE_LIMIT {
                return text;
            }
            if r.notes.pop().is_some() {
                continue;
            }
            match &mut r.error {
                Some(e) if e.len() > 64 => {
                    let keep = e.len() / 2;
                    let cut = (0..=keep)
                        .rev()
                        .find(|i| e.is_char_boundary(*i))
                        .unwrap_or(0);
                    e.truncate(cut);
                    e.push_str("...");
                }
                _ => return "{\"ok\":false,\"error\":\"report too large\"}".into(),
            }
        }
    }
}

/// Why a mover failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoverError {
    /// The spec cannot be used.
    #[error("mover spec: {0}")]
    Spec(String),
    /// The repository could not be reached or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A repository operation failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Planning the CBT backup failed.
    #[error(transparent)]
    Plan(Box<CbtPlanError>),
    /// The metadata service could not be reached.
    #[error(transparent)]
    Metadata(#[from] cbt_csi::CsiError),
    /// Local I/O (the device, the token file).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The restored device does not hold the snapshot.
    #[error(
        "the restored device differs from snapshot {snapshot} in {count} chunk(s) (first: {first:?})"
    )]
    VerifyFailed {
        /// The snapshot.
        snapshot: String,
        /// Mismatched chunks.
        count: u64,
        /// The first mismatched chunk indexes.
        first: Vec<u64>,
    },
}

impl From<CbtPlanError> for MoverError {
    fn from(e: CbtPlanError) -> Self {
        Self::Plan(Box::new(e))
    }
}

impl MoverError {
    /// Classifies the failure in the toolkit's one vocabulary.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Plan(p) => match p.as_ref() {
                CbtPlanError::Metadata { source, .. } => source.kind(),
                CbtPlanError::Lineage(_) | CbtPlanError::ParentWithoutBase { .. } => {
                    ErrorKind::Usage
                }
                _ => ErrorKind::Transient,
            },
            Self::Spec(_) => ErrorKind::Usage,
            Self::Store(e) => e.kind(),
            Self::Repo(e) => e.kind(),
            Self::Metadata(source) => source.kind(),
            Self::Io { .. } => ErrorKind::Transient,
            Self::VerifyFailed { .. } => ErrorKind::Integrity,
        }
    }

    /// The exit-class name for the report ([`ExitClass::name`]), which the orchestrator reads
    /// back.
    pub fn class(&self) -> &'static str {
        ExitClass::from(self.kind()).name()
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> MoverError {
    let context = context.into();
    move |source| MoverError::Io { context, source }
}

/// Reads the spec from [`SPEC_ENV`].
///
/// # Errors
/// [`MoverError::Spec`] when it is missing, not JSON, or of another version.
pub fn spec_from_env() -> Result<MoverSpec, MoverError> {
    let text = std::env::var(SPEC_ENV)
        .map_err(|_| MoverError::Spec(format!("environment variable {SPEC_ENV} is not set")))?;
    parse_spec(&text)
}

/// Parses a spec and checks its version.
///
/// # Errors
/// [`MoverError::Spec`].
pub fn parse_spec(text: &str) -> Result<MoverSpec, MoverError> {
    let spec: MoverSpec = serde_json::from_str(text)
        .map_err(|e| MoverError::Spec(format!("not a mover spec: {e}")))?;
    if spec.version != MOVER_SPEC_VERSION {
        return Err(MoverError::Spec(format!(
            "spec version {} but this mover understands {MOVER_SPEC_VERSION}: use the same cbt version for the orchestrator and the mover image",
            spec.version
        )));
    }
    Ok(spec)
}

/// Runs the spec's task; `now` is the creation time recorded for a backup.
///
/// # Errors
/// [`MoverError`] for any failure; nothing is committed to the repository unless the backup
/// completed.
pub async fn run(spec: &MoverSpec, now: Timestamp) -> Result<MoverReport, MoverError> {
    run_with_key(spec, None, now).await
}

/// Like [`run`], opening the repository with `key` when one is given (an encrypted repository;
/// the Job gets the password as `CBT_PASSWORD` from the S3 credentials Secret, see
/// [`crate::pvc_backup::objects::S3_SECRET_KEYS`], or the key file's contents as
/// [`crate::pvc_backup::objects::KEY_FILE_ENV`]).
///
/// # Errors
/// As [`run`]; [`RepoError::KeyRequired`] for an encrypted repository without a key.
pub async fn run_with_key(
    spec: &MoverSpec,
    key: Option<&cbt_store::repo::RepoKey>,
    now: Timestamp,
) -> Result<MoverReport, MoverError> {
    let started = std::time::Instant::now();
    let store = open_url(&spec.repo, &spec.s3_options()).await?;
    let repo = match key {
        Some(k) => Repository::open_with_key(store, k).await?,
        None => Repository::open(store).await?,
    };
    let device = PathBuf::from(&spec.device);
    let mut report = match &spec.task {
        MoverTask::Backup(t) => backup(&repo, &device, t, now).await?,
        MoverTask::Restore(t) => restore(&repo, &device, t).await?,
        MoverTask::Verify(t) => {
            let (volume, snapshot) = restore_names(t)?;
            let stored = repo.load_stored(&volume, &snapshot).await?;
            let head = stored.head();
            let check = read_back(&repo, device.as_path(), t, &stored).await?;
            MoverReport {
                ok: true,
                snapshot: Some(head.snapshot.to_string()),
                snapshot_id: Some(head.snapshot_id.clone()),
                volume_size: head.volume_size(),
                bytes_read: check.bytes_read,
                chunks_verified: check.chunks_ok,
                ..MoverReport::default()
            }
        }
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn backup(
    repo: &Repository,
    device: &Path,
    t: &BackupTask,
    now: Timestamp,
) -> Result<MoverReport, MoverError> {
    let volume = VolumeName::new(&t.volume).map_err(|e| MoverError::Spec(e.to_string()))?;
    let snapshot = SnapshotName::new(&t.snapshot).map_err(|e| MoverError::Spec(e.to_string()))?;
    let plan = match &t.metadata {
        Some(m) => plan_from_service(repo, &volume, m, t.fallback_full).await?,
        None => full_without_service(repo, &volume).await?,
    };
    let source = FileSource::open(device).map_err(io(format!("opening {}", device.display())))?;
    let mut recorded = t.source.clone();
    // What the planner learnt wins; the orchestrator's facts fill the rest.
    let planned = plan.source.clone();
    recorded.csi_snapshot_id = planned.csi_snapshot_id.or(recorded.csi_snapshot_id);
    recorded.base_csi_snapshot_id = planned.base_csi_snapshot_id;
    recorded.namespace = planned.namespace.or(recorded.namespace);
    recorded.volume_snapshot = planned.volume_snapshot.or(recorded.volume_snapshot);
    let opts = EngineOptions {
        compression_level: t.compression_level,
        ..EngineOptions::default()
    };
    let outcome = engine::backup(
        repo,
        Arc::new(source),
        BackupRequest {
            volume,
            snapshot,
            mode: plan.mode,
            created: now,
            source_info: recorded,
            labels: t.labels.clone(),
            chunk_size: None,
            volume_size: plan.volume_size,
        },
        &opts,
    )
    .await?;
    let man = &outcome.head;
    Ok(MoverReport {
        ok: true,
        snapshot: Some(man.snapshot.to_string()),
        snapshot_id: Some(man.snapshot_id.clone()),
        parent: man.parent.as_ref().map(|p| p.snapshot.to_string()),
        volume_size: man.volume_size(),
        metadata_call: plan.query.as_ref().map(|q| q.call().to_string()),
        bytes_in_ranges: outcome.stats.bytes_in_ranges,
        bytes_read: outcome.stats.bytes_read,
        bytes_transferred: outcome.stats.bytes_uploaded,
        chunks_uploaded: outcome.stats.objects_written,
        chunks_deduplicated: outcome.stats.chunks_deduplicated,
        bytes_changed: outcome.stats.bytes_changed,
        map_entries_peak: outcome.map_entries_peak,
        notes: plan.notes,
        ..MoverReport::default()
    })
}

/// Plans from the SnapshotMetadata service: a delta from the volume's latest backup's handle,
/// or the allocated ranges for a first backup.
async fn plan_from_service(
    repo: &Repository,
    volume: &VolumeName,
    m: &MetadataAccess,
    fallback_full: bool,
) -> Result<CbtBackupPlan, MoverError> {
    let token = std::fs::read_to_string(&m.token_file)
        .map_err(io(format!("reading the metadata token {}", m.token_file)))?;
    let config = crate::metadata_service::sidecar_client_config(
        &m.address,
        m.ca_pem.clone().into_bytes(),
        &m.server_name,
    )
    .with_token(token.trim().to_string())
    .with_deadline(std::time::Duration::from_secs(3600));
    let client = MetadataClient::connect(config).await?;
    let mut spec = CbtBackupSpec::new(
        volume.clone(),
        CbtTarget::Kubernetes {
            namespace: m.namespace.clone(),
            snapshot_name: m.snapshot_name.clone(),
            snapshot_handle: Some(m.snapshot_handle.clone()),
        },
    );
    spec.base = DeltaBase::Latest;
    spec.fallback_full = fallback_full;
    Ok(plan_cbt_backup(repo, &client, &spec).await?)
}

/// Without a metadata service: read the whole device, with the latest backup as lineage so
/// unchanged chunks are not uploaded again.
async fn full_without_service(
    repo: &Repository,
    volume: &VolumeName,
) -> Result<CbtBackupPlan, MoverError> {
    let latest = cbt_core::lineage::latest_delta_base(repo.load_heads(Some(volume)).await?);
    let mode = match latest {
        Some((m, _)) => BackupMode::FullWithParent {
            allocated: None,
            parent: ParentRef {
                snapshot: m.snapshot,
                snapshot_id: m.snapshot_id,
            },
        },
        None => BackupMode::Full { allocated: None },
    };
    Ok(CbtBackupPlan {
        mode,
        volume_size: None,
        source: SourceInfo::default(),
        query: None,
        metadata: None,
        notes: vec!["no SnapshotMetadata service: the whole volume was read".into()],
    })
}

fn restore_names(t: &RestoreTask) -> Result<(VolumeName, SnapshotName), MoverError> {
    let volume = VolumeName::new(&t.volume).map_err(|e| MoverError::Spec(e.to_string()))?;
    let snapshot = SnapshotName::new(&t.snapshot).map_err(|e| MoverError::Spec(e.to_string()))?;
    Ok((volume, snapshot))
}

/// Restores in place, streaming a format-2 map segment by segment, then reads the device
/// back the same way: the mover's memory does not grow with the volume.
async fn restore(
    repo: &Repository,
    device: &Path,
    t: &RestoreTask,
) -> Result<MoverReport, MoverError> {
    let (volume, snapshot) = restore_names(t)?;
    let head = repo.load_head(&volume, &snapshot).await?;
    // The device exists (a PVC at least the recorded size): write in place, zeroing what the
    // snapshot holds as zeros, since a provisioned volume need not read as zeros.
    let opts = RestoreOptions {
        overwrite: true,
        in_place: true,
        dry_run: false,
    };
    let r = engine::restore(
        repo,
        &volume,
        &snapshot,
        device,
        &opts,
        &EngineOptions::default(),
    )
    .await?;
    // Loaded again rather than kept: a format-1 map is held once, by the restore or here.
    let stored = repo.load_stored(&volume, &snapshot).await?;
    let chunks_verified = read_back(repo, device, t, &stored).await?.chunks_ok;
    Ok(MoverReport {
        ok: true,
        snapshot: Some(head.snapshot.to_string()),
        snapshot_id: Some(head.snapshot_id.clone()),
        volume_size: head.volume_size(),
        bytes_transferred: r.bytes_downloaded,
        bytes_written: r.bytes_written,
        chunks_verified,
        ..MoverReport::default()
    })
}

/// Reads `device` back against the snapshot (its map walked in a bounded window, see
/// [`verify_target_stored`]); returns what it found when every chunk matched.
///
/// # Errors
/// [`MoverError::VerifyFailed`] when any chunk differs; [`MoverError::Io`] reading the device.
async fn read_back(
    repo: &Repository,
    device: &Path,
    t: &RestoreTask,
    stored: &StoredManifest,
) -> Result<TargetVerifyReport, MoverError> {
    let check = match verify_target_stored(repo, stored, device).await {
        Ok(check) => check,
        Err(RepoError::TargetIo { offset, source, .. }) => {
            let at = offset
                .map(|o| format!(" at offset {o}"))
                .unwrap_or_default();
            return Err(io(format!("reading back {}{at}", device.display()))(source));
        }
        Err(e) => return Err(e.into()),
    };
    if !check.is_ok() {
        return Err(MoverError::VerifyFailed {
            snapshot: t.snapshot.clone(),
            count: check.mismatched_count,
            first: check.mismatched,
        });
    }
    Ok(check)
}

/// The report of a failed run.
pub fn failure_report(e: &MoverError) -> MoverReport {
    MoverReport {
        ok: false,
        error_class: Some(e.class().to_string()),
        error: Some(e.to_string()),
        ..MoverReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_report_is_cut_to_the_termination_message_limit() {
        let r = MoverReport {
            notes: vec!["n".repeat(1000); 10],
            error: Some("e".repeat(10_000)),
            ..MoverReport::default()
        };
        let text = r.to_termination_message();
        assert!(text.len() <= TERMINATION_MESSAGE_LIMIT);
        let back: MoverReport = serde_json::from_str(&text).expect("still JSON");
        assert!(back.error.is_some_and(|e| e.ends_with("...")));
    }

    #[test]
    fn another_spec_version_is_refused() {
        let spec = MoverSpec {
            version: 99,
            repo: "file:///r".into(),
            s3_endpoint: None,
            s3_region: None,
            device: "/dev/x".into(),
            task: MoverTask::Restore(RestoreTask {
                volume: "v".into(),
                snapshot: "s".into(),
            }),
        };
        let text = serde_json::to_string(&spec).expect("serializes");
        assert!(matches!(parse_spec(&text), Err(MoverError::Spec(_))));
        let ok = text.replace("\"version\":99", "\"version\":1");
        assert_eq!(parse_spec(&ok).expect("parses").device, "/dev/x");
    }
}
