//! Pure planning for SnapShift: names, the origin snapshot to cut, the
//! destination objects to create, how existing objects compare to them, and the
//! consistency checks `verify` applies. No I/O here; `execute` feeds it objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ObjectReference, PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::metadata::{ANN_CREATED_BY, LABEL_MIGRATED, MetadataFilter, Provenance};
use crate::Error;
use crate::quantity;
use crate::snapshot::{
    DeletionPolicy, GROUP, SnapshotState, VolumeMode, VolumeSnapshot, VolumeSnapshotContent,
    VolumeSnapshotContentSource, VolumeSnapshotContentSpec, VolumeSnapshotSource,
    VolumeSnapshotSpec,
};

/// Value of [`ANN_CREATED_BY`].
pub const CREATED_BY: &str = "snapshift";
/// Stand-in handle in dry-run plans made before the origin snapshot exists.
pub const PENDING_HANDLE: &str = "<assigned when the origin snapshot is ready>";

/// What to move: a PVC (a snapshot is cut first) or an existing snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotSource {
    /// Cut a new VolumeSnapshot of this PVC in the origin, then move it.
    Pvc(String),
    /// Move this existing VolumeSnapshot.
    Snapshot(String),
}

/// One migration: what, from where, to where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationRequest {
    /// Origin namespace.
    pub namespace: String,
    /// What to move.
    pub source: SnapshotSource,
    /// Name of the snapshot cut from a PVC (default `<pvc>-snapshift`, stable so re-runs are idempotent).
    pub origin_snapshot_name: Option<String>,
    /// Class for the origin snapshot (default: the driver's default class).
    pub origin_snapshot_class: Option<String>,
    /// Destination namespace (default: the origin namespace).
    pub to_namespace: Option<String>,
    /// Destination VolumeSnapshotClass (default: the driver's default class there).
    pub snapshot_class: Option<String>,
    /// Also create a PVC restored from the moved snapshot.
    pub create_pvc: bool,
    /// Name of that PVC (default: the origin PVC's name).
    pub pvc_name: Option<String>,
    /// Its StorageClass (default: the destination's default StorageClass).
    pub storage_class: Option<String>,
}

impl MigrationRequest {
    /// Request to snapshot and move a PVC.
    pub fn for_pvc(namespace: &str, pvc: &str) -> Self {
        Self::new(namespace, SnapshotSource::Pvc(pvc.to_string()))
    }

    /// Request to move an existing snapshot.
    pub fn for_snapshot(namespace: &str, snapshot: &str) -> Self {
        Self::new(namespace, SnapshotSource::Snapshot(snapshot.to_string()))
    }

    fn new(namespace: &str, source: SnapshotSource) -> Self {
        Self {
            namespace: namespace.to_string(),
            source,
            origin_snapshot_name: None,
            origin_snapshot_class: None,
            to_namespace: None,
            snapshot_class: None,
            create_pvc: false,
            pvc_name: None,
            storage_class: None,
        }
    }

    /// Short label for progress and reports, e.g. `pvc apps/data`.
    pub fn label(&self) -> String {
        match &self.source {
            SnapshotSource::Pvc(p) => format!("pvc {}/{p}", self.namespace),
            SnapshotSource::Snapshot(s) => format!("snapshot {}/{s}", self.namespace),
        }
    }

    /// Destination namespace.
    pub fn dest_namespace(&self) -> &str {
        self.to_namespace.as_deref().unwrap_or(&self.namespace)
    }

    /// Name of the origin VolumeSnapshot (also the destination one's name).
    pub fn origin_snapshot_name(&self) -> String {
        match &self.source {
            SnapshotSource::Snapshot(s) => s.clone(),
            SnapshotSource::Pvc(p) => self
                .origin_snapshot_name
                .clone()
                .unwrap_or_else(|| default_origin_snapshot_name(p)),
        }
    }

    /// Checks every name is a valid Kubernetes name.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the bad value.
    pub fn validate(&self) -> Result<(), Error> {
        validate_namespace("namespace", &self.namespace)?;
        validate_namespace("destination namespace", self.dest_namespace())?;
        match &self.source {
            SnapshotSource::Pvc(p) => validate_name("PVC name", p)?,
            SnapshotSource::Snapshot(s) => validate_name("snapshot name", s)?,
        }
        validate_name("snapshot name", &self.origin_snapshot_name())?;
        for (what, v) in [
            ("origin snapshot class", &self.origin_snapshot_class),
            ("snapshot class", &self.snapshot_class),
            ("PVC name", &self.pvc_name),
            ("storage class", &self.storage_class),
        ] {
            if let Some(v) = v {
                validate_name(what, v)?;
            }
        }
        if self.pvc_name.is_some() && !self.create_pvc {
            return Err(Error::InvalidInput {
                what: "PVC name".into(),
                reason: "a PVC name only makes sense when creating a PVC".into(),
            });
        }
        Ok(())
    }
}

/// Checks a DNS-1123 subdomain (what object names must be).
///
/// # Errors
/// [`Error::InvalidInput`] with the reason.
pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::InvalidInput {
        what: format!("{what} {name:?}"),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.len() > 253 {
        return Err(bad("must be at most 253 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(bad(
            "may only contain lower-case letters, digits, '-' and '.'",
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

/// Checks a namespace name: a DNS-1123 label (at most 63 characters, no '.').
///
/// # Errors
/// [`Error::InvalidInput`] with the reason.
pub fn validate_namespace(what: &str, name: &str) -> Result<(), Error> {
    validate_name(what, name)?;
    let bad = |reason: &str| Error::InvalidInput {
        what: format!("{what} {name:?}"),
        reason: reason.to_string(),
    };
    if name.len() > 63 {
        return Err(bad("must be at most 63 characters"));
    }
    if name.contains('.') {
        return Err(bad("may not contain '.'"));
    }
    Ok(())
}

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// Long names are cut and suffixed with a hash of the full name, so they stay unique and stable.
fn bounded_name(full: String, max: usize) -> String {
    if full.len() <= max {
        return full;
    }
    let keep = max - 17;
    let head = full[..keep].trim_end_matches(['-', '.']);
    format!("{head}-{:016x}", fnv1a64(&full))
}

/// Default name of the snapshot cut from `pvc`.
pub fn default_origin_snapshot_name(pvc: &str) -> String {
    bounded_name(format!("{pvc}-snapshift"), 253)
}

/// Name of the destination VolumeSnapshotContent (cluster scoped, so it carries the namespace).
///
/// Namespaces cannot contain '.', so the first '.' separates it from the snapshot
/// name and distinct pairs never share a name (`a-b`/`c` vs `a`/`b-c`).
pub fn dest_content_name(dest_namespace: &str, snapshot: &str) -> String {
    bounded_name(format!("snapshift-{dest_namespace}.{snapshot}"), 253)
}

/// The VolumeSnapshot to cut from `pvc` in the origin.
pub fn plan_origin_snapshot(
    req: &MigrationRequest,
    pvc: &PersistentVolumeClaim,
    filter: &MetadataFilter,
) -> VolumeSnapshot {
    let pvc_name = pvc.metadata.name.clone().unwrap_or_default();
    let mut snap = VolumeSnapshot::new(
        &req.origin_snapshot_name(),
        VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: Some(pvc_name),
                volume_snapshot_content_name: None,
            },
            volume_snapshot_class_name: req.origin_snapshot_class.clone(),
        },
    );
    snap.metadata.namespace = Some(req.namespace.clone());
    snap.metadata.labels = non_empty(filter.filter(pvc.metadata.labels.as_ref()));
    snap.metadata.annotations = Some(BTreeMap::from([(
        ANN_CREATED_BY.to_string(),
        CREATED_BY.to_string(),
    )]));
    snap
}

/// True if `vs` is a snapshot SnapShift cut from PVC `pvc`.
pub fn is_own_origin_snapshot(vs: &VolumeSnapshot, pvc: &str) -> bool {
    vs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_CREATED_BY))
        .is_some_and(|v| v == CREATED_BY)
        && vs.spec.source.persistent_volume_claim_name.as_deref() == Some(pvc)
}

fn non_empty(map: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then_some(map)
}

/// The parts of the origin PVC a restored PVC copies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PvcShape {
    /// PVC name.
    pub name: String,
    /// Access modes.
    pub access_modes: Vec<String>,
    /// Volume mode.
    pub volume_mode: Option<String>,
    /// StorageClass name.
    pub storage_class: Option<String>,
    /// Requested size in bytes.
    pub requested_bytes: Option<u64>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

impl PvcShape {
    /// Extracts the shape of a PVC.
    ///
    /// # Errors
    /// A malformed storage request.
    pub fn from_pvc(pvc: &PersistentVolumeClaim) -> Result<Self, Error> {
        let spec = pvc.spec.clone().unwrap_or_default();
        let requested_bytes = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(quantity::to_bytes)
            .transpose()?;
        Ok(Self {
            name: pvc.metadata.name.clone().unwrap_or_default(),
            access_modes: spec.access_modes.unwrap_or_default(),
            volume_mode: spec.volume_mode,
            storage_class: spec.storage_class_name,
            requested_bytes,
            labels: pvc.metadata.labels.clone().unwrap_or_default(),
            annotations: pvc.metadata.annotations.clone().unwrap_or_default(),
        })
    }
}

/// Everything the destination needs to know about the origin snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginSnapshot {
    /// Origin namespace.
    pub namespace: String,
    /// Origin VolumeSnapshot name.
    pub name: String,
    /// Origin VolumeSnapshotContent name (empty before the snapshot exists).
    pub content_name: String,
    /// CSI snapshot handle; `None` in a dry run before the snapshot is cut.
    pub handle: Option<String>,
    /// CSI driver.
    pub driver: String,
    /// Restore size in bytes, when the driver reports it.
    pub restore_size: Option<u64>,
    /// Source volume mode.
    pub source_volume_mode: Option<VolumeMode>,
    /// Origin VolumeSnapshotClass.
    pub class: Option<String>,
    /// Origin snapshot labels.
    pub labels: BTreeMap<String, String>,
    /// Origin snapshot annotations.
    pub annotations: BTreeMap<String, String>,
    /// The origin PVC, when it still exists.
    pub pvc: Option<PvcShape>,
}

fn inconsistent(cluster: &str, problem: String) -> Error {
    Error::Inconsistent {
        cluster: cluster.to_string(),
        problem,
    }
}

/// Reads a ready origin snapshot, its content and (optionally) its PVC.
///
/// # Errors
/// [`Error::Inconsistent`] when the objects do not point at each other or lack a handle.
pub fn origin_from_objects(
    cluster: &str,
    vs: &VolumeSnapshot,
    vsc: &VolumeSnapshotContent,
    pvc: Option<&PersistentVolumeClaim>,
) -> Result<OriginSnapshot, Error> {
    let ns = vs.metadata.namespace.clone().unwrap_or_default();
    let name = vs.metadata.name.clone().unwrap_or_default();
    let content_name = vsc.metadata.name.clone().unwrap_or_default();
    if vs.bound_content() != Some(content_name.as_str()) {
        return Err(inconsistent(
            cluster,
            format!(
                "VolumeSnapshot {ns}/{name} is not bound to VolumeSnapshotContent {content_name}"
            ),
        ));
    }
    let r = &vsc.spec.volume_snapshot_ref;
    if r.name.as_deref() != Some(name.as_str())
        || r.namespace.as_deref() != Some(ns.as_str())
        || r.uid.is_some() && r.uid != vs.metadata.uid
    {
        return Err(inconsistent(
            cluster,
            format!(
                "VolumeSnapshotContent {content_name} points at {}/{} (uid {}), not at VolumeSnapshot {ns}/{name}",
                r.namespace.as_deref().unwrap_or("?"),
                r.name.as_deref().unwrap_or("?"),
                r.uid.as_deref().unwrap_or("unset"),
            ),
        ));
    }
    let handle = vsc.snapshot_handle().map(str::to_string).ok_or_else(|| {
        inconsistent(
            cluster,
            format!("VolumeSnapshotContent {content_name} has no snapshot handle"),
        )
    })?;
    let restore_size = match vsc.status.as_ref().and_then(|s| s.restore_size) {
        Some(bytes) => u64::try_from(bytes).ok(),
        None => vs
            .status
            .as_ref()
            .and_then(|s| s.restore_size.as_ref())
            .map(quantity::to_bytes)
            .transpose()?,
    };
    let pvc = pvc.map(PvcShape::from_pvc).transpose()?;
    let source_volume_mode = vsc.spec.source_volume_mode.or_else(|| {
        match pvc.as_ref().and_then(|p| p.volume_mode.as_deref()) {
            Some("Block") => Some(VolumeMode::Block),
            Some("Filesystem") => Some(VolumeMode::Filesystem),
            _ => None,
        }
    });
    Ok(OriginSnapshot {
        namespace: ns,
        name,
        content_name,
        handle: Some(handle),
        driver: vsc.spec.driver.clone(),
        restore_size,
        source_volume_mode,
        class: vsc
            .spec
            .volume_snapshot_class_name
            .clone()
            .or_else(|| vs.spec.volume_snapshot_class_name.clone()),
        labels: vs.metadata.labels.clone().unwrap_or_default(),
        annotations: vs.metadata.annotations.clone().unwrap_or_default(),
        pvc,
    })
}

/// Destination-side settings a plan needs.
#[derive(Clone, Debug)]
pub struct DestinationContext<'a> {
    /// Origin context name (provenance).
    pub origin_context: &'a str,
    /// Origin API server (provenance).
    pub origin_server: &'a str,
    /// Resolved destination VolumeSnapshotClass.
    pub dest_class: Option<&'a str>,
    /// Which labels/annotations travel.
    pub filter: &'a MetadataFilter,
}

/// The objects to create in the destination, in creation order.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationPlan {
    /// Pre-bound, `Retain` content carrying the origin's handle.
    pub content: VolumeSnapshotContent,
    /// Snapshot bound to that content.
    pub snapshot: VolumeSnapshot,
    /// Optional PVC restored from the snapshot.
    pub pvc: Option<PersistentVolumeClaim>,
}

/// Provenance for a plan.
pub fn provenance(origin: &OriginSnapshot, ctx: &DestinationContext<'_>) -> Provenance {
    Provenance {
        context: ctx.origin_context.to_string(),
        server: ctx.origin_server.to_string(),
        namespace: origin.namespace.clone(),
        name: origin.name.clone(),
        handle: origin
            .handle
            .clone()
            .unwrap_or_else(|| PENDING_HANDLE.to_string()),
        driver: origin.driver.clone(),
    }
}

/// Plans the destination objects.
///
/// # Errors
/// [`Error::InvalidInput`] when a PVC is requested but cannot be named or sized.
pub fn plan_destination(
    origin: &OriginSnapshot,
    req: &MigrationRequest,
    ctx: &DestinationContext<'_>,
) -> Result<DestinationPlan, Error> {
    let dest_ns = req.dest_namespace().to_string();
    let vs_name = origin.name.clone();
    let content_name = dest_content_name(&dest_ns, &vs_name);
    let prov = provenance(origin, ctx);
    let prov_ann = prov.annotations();
    let migrated = BTreeMap::from([(LABEL_MIGRATED.to_string(), "true".to_string())]);
    let dest_class = ctx.dest_class.map(str::to_string);

    let mut content = VolumeSnapshotContent::new(
        &content_name,
        VolumeSnapshotContentSpec {
            volume_snapshot_ref: ObjectReference {
                name: Some(vs_name.clone()),
                namespace: Some(dest_ns.clone()),
                ..Default::default()
            },
            deletion_policy: DeletionPolicy::Retain,
            driver: origin.driver.clone(),
            volume_snapshot_class_name: dest_class.clone(),
            source: VolumeSnapshotContentSource {
                volume_handle: None,
                snapshot_handle: Some(prov.handle.clone()),
            },
            source_volume_mode: origin.source_volume_mode,
        },
    );
    content.metadata.labels = Some(migrated.clone());
    content.metadata.annotations = Some(prov_ann.clone());

    let mut snapshot = VolumeSnapshot::new(
        &vs_name,
        VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: None,
                volume_snapshot_content_name: Some(content_name),
            },
            volume_snapshot_class_name: dest_class,
        },
    );
    snapshot.metadata.namespace = Some(dest_ns.clone());
    let mut labels = ctx.filter.filter(Some(&origin.labels));
    labels.extend(migrated.clone());
    let mut annotations = ctx.filter.filter(Some(&origin.annotations));
    annotations.extend(prov_ann.clone());
    snapshot.metadata.labels = Some(labels);
    snapshot.metadata.annotations = Some(annotations);

    let pvc = if req.create_pvc {
        let shape = origin.pvc.clone().unwrap_or_default();
        let name = req
            .pvc_name
            .clone()
            .or_else(|| (!shape.name.is_empty()).then(|| shape.name.clone()))
            .ok_or_else(|| Error::InvalidInput {
                what: "PVC name".into(),
                reason: format!(
                    "the origin PVC of snapshot {}/{} is unknown; name the new PVC explicitly",
                    origin.namespace, origin.name
                ),
            })?;
        // Some drivers report 0 when they do not know the size; a 0-byte PVC is invalid.
        let bytes = origin
            .restore_size
            .filter(|b| *b > 0)
            .or(shape.requested_bytes.filter(|b| *b > 0))
            .ok_or_else(|| Error::InvalidInput {
                what: "PVC size".into(),
                reason: format!(
                    "neither the driver's restoreSize nor the origin PVC size is known for snapshot {}/{}",
                    origin.namespace, origin.name
                ),
            })?;
        let access_modes = if shape.access_modes.is_empty() {
            vec!["ReadWriteOnce".to_string()]
        } else {
            shape.access_modes.clone()
        };
        let volume_mode = shape
            .volume_mode
            .clone()
            .or_else(|| origin.source_volume_mode.map(|m| m.as_str().to_string()));
        let mut labels = ctx.filter.filter(Some(&shape.labels));
        labels.extend(migrated);
        let mut annotations = ctx.filter.filter(Some(&shape.annotations));
        annotations.extend(prov_ann);
        Some(PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(dest_ns),
                labels: Some(labels),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(access_modes),
                volume_mode,
                storage_class_name: req.storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        quantity::from_bytes(bytes),
                    )])),
                    ..Default::default()
                }),
                data_source: Some(TypedLocalObjectReference {
                    api_group: Some(GROUP.to_string()),
                    kind: "VolumeSnapshot".to_string(),
                    name: vs_name,
                }),
                ..Default::default()
            }),
            status: None,
        })
    } else {
        None
    };
    Ok(DestinationPlan {
        content,
        snapshot,
        pvc,
    })
}

/// How an object found under a planned name relates to the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Nothing there.
    Absent,
    /// The object a previous run of the same migration created.
    Matches,
    /// Something else; the string says what differs.
    Differs(String),
}

fn compare_provenance(
    desired: Option<&BTreeMap<String, String>>,
    existing: Option<&BTreeMap<String, String>>,
) -> Result<(), String> {
    let want = Provenance::from_annotations(desired);
    match Provenance::from_annotations(existing) {
        None => Err("it was not created by snapshift (no provenance annotations)".into()),
        Some(have) => match want {
            Some(want) if want.handle != have.handle => Err(format!(
                "it holds snapshot handle {}, this migration moves {}",
                have.handle, want.handle
            )),
            Some(want)
                if (want.namespace.as_str(), want.name.as_str())
                    != (have.namespace.as_str(), have.name.as_str()) =>
            {
                Err(format!(
                    "it was migrated from {}/{}, not {}/{}",
                    have.namespace, have.name, want.namespace, want.name
                ))
            }
            _ => Ok(()),
        },
    }
}

fn verdict(r: Result<(), String>) -> Existing {
    match r {
        Ok(()) => Existing::Matches,
        Err(why) => Existing::Differs(why),
    }
}

/// Compares an existing destination content with the planned one.
pub fn compare_content(
    desired: &VolumeSnapshotContent,
    existing: &VolumeSnapshotContent,
) -> Existing {
    verdict((|| {
        compare_provenance(
            desired.metadata.annotations.as_ref(),
            existing.metadata.annotations.as_ref(),
        )?;
        let (d, e) = (&desired.spec, &existing.spec);
        if d.source.snapshot_handle != e.source.snapshot_handle {
            return Err(format!(
                "spec.source.snapshotHandle is {:?}, expected {:?}",
                e.source.snapshot_handle, d.source.snapshot_handle
            ));
        }
        if d.driver != e.driver {
            return Err(format!("driver is {}, expected {}", e.driver, d.driver));
        }
        if d.volume_snapshot_ref.name != e.volume_snapshot_ref.name
            || d.volume_snapshot_ref.namespace != e.volume_snapshot_ref.namespace
        {
            return Err("spec.volumeSnapshotRef points at another snapshot".into());
        }
        if e.deletion_policy != DeletionPolicy::Retain {
            return Err("deletionPolicy is not Retain".into());
        }
        Ok(())
    })())
}

/// True if `content` is bound by uid to a snapshot other than `snapshot` (or to one that
/// no longer exists): a snapshot re-created under the same name would be refused as misbound.
pub fn stale_binding(content: &VolumeSnapshotContent, snapshot: Option<&VolumeSnapshot>) -> bool {
    match &content.spec.volume_snapshot_ref.uid {
        None => false,
        Some(uid) => snapshot.and_then(|s| s.metadata.uid.as_ref()) != Some(uid),
    }
}

/// Compares an existing destination snapshot with the planned one.
pub fn compare_snapshot(desired: &VolumeSnapshot, existing: &VolumeSnapshot) -> Existing {
    verdict((|| {
        compare_provenance(
            desired.metadata.annotations.as_ref(),
            existing.metadata.annotations.as_ref(),
        )?;
        if desired.spec.source != existing.spec.source {
            return Err(format!(
                "spec.source is {:?}, expected {:?}",
                existing.spec.source, desired.spec.source
            ));
        }
        Ok(())
    })())
}

/// Compares an existing destination PVC with the planned one.
pub fn compare_pvc(desired: &PersistentVolumeClaim, existing: &PersistentVolumeClaim) -> Existing {
    verdict((|| {
        compare_provenance(
            desired.metadata.annotations.as_ref(),
            existing.metadata.annotations.as_ref(),
        )?;
        let source =
            |p: &PersistentVolumeClaim| p.spec.as_ref().and_then(|s| s.data_source.clone());
        if source(desired) != source(existing) {
            return Err("spec.dataSource names another snapshot".into());
        }
        Ok(())
    })())
}

/// Problems with a migrated pair (empty = healthy): both ready, both bound,
/// same handle and driver, destination content `Retain`.
pub fn check_migrated_pair(
    origin_vs: &VolumeSnapshot,
    origin_vsc: Option<&VolumeSnapshotContent>,
    dest_vs: &VolumeSnapshot,
    dest_vsc: Option<&VolumeSnapshotContent>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if !origin_vs.is_ready() {
        problems.push(format!(
            "origin snapshot is not ready{}",
            origin_vs
                .error_message()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    if !dest_vs.is_ready() {
        problems.push(format!(
            "destination snapshot is not ready{}",
            dest_vs
                .error_message()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    let (Some(ovsc), Some(dvsc)) = (origin_vsc, dest_vsc) else {
        if origin_vsc.is_none() {
            problems.push("origin snapshot is not bound to a content".into());
        }
        if dest_vsc.is_none() {
            problems.push("destination snapshot is not bound to a content".into());
        }
        return problems;
    };
    if ovsc.snapshot_handle() != dvsc.snapshot_handle() {
        problems.push(format!(
            "handles differ: origin {:?}, destination {:?}",
            ovsc.snapshot_handle(),
            dvsc.snapshot_handle()
        ));
    }
    if ovsc.spec.driver != dvsc.spec.driver {
        problems.push(format!(
            "drivers differ: origin {}, destination {}",
            ovsc.spec.driver, dvsc.spec.driver
        ));
    }
    let r = &dvsc.spec.volume_snapshot_ref;
    if r.name != dest_vs.metadata.name || r.namespace != dest_vs.metadata.namespace {
        problems.push(format!(
            "destination content points at {}/{}, not at this snapshot",
            r.namespace.as_deref().unwrap_or("?"),
            r.name.as_deref().unwrap_or("?")
        ));
    }
    if dvsc.spec.volume_snapshot_class_name.is_none() {
        problems.push(
            "destination content has no VolumeSnapshotClass: CBT calls on it need one".into(),
        );
    }
    if dvsc.spec.deletion_policy != DeletionPolicy::Retain {
        problems.push(
            "destination content is not Retain: deleting it would delete the shared snapshot"
                .into(),
        );
    }
    if let Some(p) = Provenance::from_annotations(dest_vs.metadata.annotations.as_ref())
        && Some(p.handle.as_str()) != dvsc.snapshot_handle()
    {
        problems.push(format!(
            "provenance records handle {}, content holds {:?}",
            p.handle,
            dvsc.snapshot_handle()
        ));
    }
    problems
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::snapshot::{VolumeSnapshotContentStatus, VolumeSnapshotStatus};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn origin_objects() -> (VolumeSnapshot, VolumeSnapshotContent, PersistentVolumeClaim) {
        let mut vs = VolumeSnapshot::new(
            "db-snap",
            VolumeSnapshotSpec {
                source: VolumeSnapshotSource {
                    persistent_volume_claim_name: Some("db".into()),
                    volume_snapshot_content_name: None,
                },
                volume_snapshot_class_name: Some("fast".into()),
            },
        );
        vs.metadata.namespace = Some("apps".into());
        vs.metadata.uid = Some("uid-1".into());
        vs.metadata.labels = Some(BTreeMap::from([("app".into(), "db".into())]));
        vs.metadata.annotations = Some(BTreeMap::from([
            (
                "kubectl.kubernetes.io/last-applied-configuration".into(),
                "{}".into(),
            ),
            ("owner".into(), "team-a".into()),
        ]));
        vs.status = Some(VolumeSnapshotStatus {
            bound_volume_snapshot_content_name: Some("snapcontent-uid-1".into()),
            ready_to_use: Some(true),
            restore_size: Some(Quantity("2Gi".into())),
            ..Default::default()
        });
        let mut vsc = VolumeSnapshotContent::new(
            "snapcontent-uid-1",
            VolumeSnapshotContentSpec {
                volume_snapshot_ref: ObjectReference {
                    name: Some("db-snap".into()),
                    namespace: Some("apps".into()),
                    uid: Some("uid-1".into()),
                    ..Default::default()
                },
                deletion_policy: DeletionPolicy::Delete,
                driver: "hostpath.csi.k8s.io".into(),
                volume_snapshot_class_name: Some("fast".into()),
                source: VolumeSnapshotContentSource {
                    volume_handle: Some("vol-1".into()),
                    snapshot_handle: None,
                },
                source_volume_mode: Some(VolumeMode::Block),
            },
        );
        vsc.status = Some(VolumeSnapshotContentStatus {
            snapshot_handle: Some("snap-1".into()),
            restore_size: Some(3 << 30),
            ready_to_use: Some(true),
            ..Default::default()
        });
        let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "apps", "labels": {"app": "db", "pv.kubernetes.io/x": "y"}},
            "spec": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block", "storageClassName": "sc",
                     "resources": {"requests": {"storage": "1Gi"}}}
        }))
        .unwrap();
        (vs, vsc, pvc)
    }

    fn ctx(filter: &MetadataFilter) -> DestinationContext<'_> {
        DestinationContext {
            origin_context: "east",
            origin_server: "https://east:6443",
            dest_class: Some("dr-class"),
            filter,
        }
    }

    #[test]
    fn destination_plan_has_the_contract_shape() {
        let (vs, vsc, pvc) = origin_objects();
        let origin = origin_from_objects("east", &vs, &vsc, Some(&pvc)).unwrap();
        assert_eq!(origin.handle.as_deref(), Some("snap-1"));
        assert_eq!(
            origin.restore_size,
            Some(3 << 30),
            "content bytes win over the VS quantity"
        );
        let mut req = MigrationRequest::for_snapshot("apps", "db-snap");
        req.to_namespace = Some("dr".into());
        req.create_pvc = true;
        let filter = MetadataFilter::default();
        let plan = plan_destination(&origin, &req, &ctx(&filter)).unwrap();

        let c = serde_json::to_value(&plan.content).unwrap();
        assert_eq!(c["metadata"]["name"], "snapshift-dr.db-snap");
        assert_eq!(
            c["spec"]["volumeSnapshotRef"],
            serde_json::json!({"name": "db-snap", "namespace": "dr"})
        );
        assert_eq!(c["spec"]["deletionPolicy"], "Retain");
        assert_eq!(c["spec"]["driver"], "hostpath.csi.k8s.io");
        assert_eq!(
            c["spec"]["source"],
            serde_json::json!({"snapshotHandle": "snap-1"})
        );
        assert_eq!(c["spec"]["sourceVolumeMode"], "Block");
        assert_eq!(c["spec"]["volumeSnapshotClassName"], "dr-class");
        assert_eq!(
            c["metadata"]["annotations"]["snapshift.cbt.io/origin-snapshot-handle"],
            "snap-1"
        );

        let s = serde_json::to_value(&plan.snapshot).unwrap();
        assert_eq!(s["metadata"]["namespace"], "dr");
        assert_eq!(
            s["spec"]["source"],
            serde_json::json!({"volumeSnapshotContentName": "snapshift-dr.db-snap"})
        );
        assert_eq!(s["metadata"]["labels"]["app"], "db");
        assert_eq!(s["metadata"]["annotations"]["owner"], "team-a");
        assert!(
            s["metadata"]["annotations"]
                .get("kubectl.kubernetes.io/last-applied-configuration")
                .is_none()
        );

        let p = serde_json::to_value(plan.pvc.as_ref().unwrap()).unwrap();
        assert_eq!(p["metadata"]["name"], "db");
        assert_eq!(p["spec"]["resources"]["requests"]["storage"], "3Gi");
        assert_eq!(
            p["spec"]["accessModes"],
            serde_json::json!(["ReadWriteMany"])
        );
        assert_eq!(p["spec"]["volumeMode"], "Block");
        assert_eq!(p["spec"]["dataSource"]["kind"], "VolumeSnapshot");
        assert_eq!(
            p["spec"]["dataSource"]["apiGroup"],
            "snapshot.storage.k8s.io"
        );
        assert!(p["metadata"]["labels"].get("pv.kubernetes.io/x").is_none());

        // Same plan again matches; another handle differs; a foreign object differs.
        assert_eq!(
            compare_content(&plan.content, &plan.content),
            Existing::Matches
        );
        let mut other = plan.content.clone();
        other.spec.source.snapshot_handle = Some("snap-2".into());
        other.metadata.annotations.as_mut().unwrap().insert(
            super::super::metadata::ANN_ORIGIN_HANDLE.into(),
            "snap-2".into(),
        );
        assert!(
            matches!(compare_content(&plan.content, &other), Existing::Differs(r) if r.contains("snap-2"))
        );
        let mut foreign = plan.snapshot.clone();
        foreign.metadata.annotations = None;
        assert!(matches!(
            compare_snapshot(&plan.snapshot, &foreign),
            Existing::Differs(_)
        ));
        assert_eq!(
            compare_pvc(plan.pvc.as_ref().unwrap(), plan.pvc.as_ref().unwrap()),
            Existing::Matches
        );

        // Binding by uid: unbound is fine, bound to this snapshot is fine, anything else is stale.
        let mut bound = plan.content.clone();
        let mut snap = plan.snapshot.clone();
        snap.metadata.uid = Some("u1".into());
        assert!(!stale_binding(&bound, Some(&snap)));
        assert!(!stale_binding(&bound, None));
        bound.spec.volume_snapshot_ref.uid = Some("u1".into());
        assert!(!stale_binding(&bound, Some(&snap)));
        assert!(stale_binding(&bound, None));
        snap.metadata.uid = Some("u2".into());
        assert!(stale_binding(&bound, Some(&snap)));
    }

    #[test]
    fn origin_inconsistencies_are_reported() {
        let (vs, mut vsc, _) = origin_objects();
        vsc.spec.volume_snapshot_ref.uid = Some("someone-else".into());
        assert!(matches!(
            origin_from_objects("east", &vs, &vsc, None),
            Err(Error::Inconsistent { .. })
        ));
        let (vs, mut vsc, _) = origin_objects();
        vsc.status = None;
        assert!(matches!(
            origin_from_objects("east", &vs, &vsc, None),
            Err(Error::Inconsistent { .. })
        ));
        // Without the PVC, a requested PVC needs a name.
        let (vs, vsc, _) = origin_objects();
        let origin = origin_from_objects("east", &vs, &vsc, None).unwrap();
        let mut req = MigrationRequest::for_snapshot("apps", "db-snap");
        req.create_pvc = true;
        let filter = MetadataFilter::default();
        assert!(matches!(
            plan_destination(&origin, &req, &ctx(&filter)),
            Err(Error::InvalidInput { .. })
        ));
        req.pvc_name = Some("restored".into());
        let plan = plan_destination(&origin, &req, &ctx(&filter)).unwrap();
        assert_eq!(
            plan.pvc.unwrap().spec.unwrap().access_modes.unwrap(),
            ["ReadWriteOnce"]
        );
        // A driver reporting restoreSize 0: the origin PVC's size is used, else it is an error.
        let (vs, mut vsc, pvc) = origin_objects();
        vsc.status.as_mut().unwrap().restore_size = Some(0);
        let origin = origin_from_objects("east", &vs, &vsc, Some(&pvc)).unwrap();
        let plan = plan_destination(&origin, &req, &ctx(&filter)).unwrap();
        let size = &plan
            .pvc
            .unwrap()
            .spec
            .unwrap()
            .resources
            .unwrap()
            .requests
            .unwrap()["storage"];
        assert_eq!(size.0, "1Gi");
        let origin = origin_from_objects("east", &vs, &vsc, None).unwrap();
        assert!(matches!(
            plan_destination(&origin, &req, &ctx(&filter)),
            Err(Error::InvalidInput { what, .. }) if what == "PVC size"
        ));
    }

    #[test]
    fn names_are_valid_and_bounded() {
        assert!(validate_name("x", "ok-name.1").is_ok());
        for bad in ["", "Upper", "-lead", "trail-", "a_b", &"a".repeat(254)] {
            assert!(validate_name("x", bad).is_err(), "{bad}");
        }
        let long = "a".repeat(250);
        let n1 = dest_content_name("ns", &long);
        let n2 = dest_content_name("ns2", &long);
        assert!(n1.len() <= 253 && validate_name("x", &n1).is_ok());
        assert_ne!(n1, n2);
        assert_ne!(dest_content_name("a-b", "c"), dest_content_name("a", "b-c"));
        assert_eq!(dest_content_name("dr", "db"), "snapshift-dr.db");
        // The longest legal inputs still give a valid, distinct name.
        let ns = "n".repeat(63);
        let max = "s".repeat(253);
        let n3 = dest_content_name(&ns, &max);
        assert!(n3.len() <= 253 && validate_name("x", &n3).is_ok(), "{n3}");
        assert_ne!(n3, dest_content_name(&ns, &"s".repeat(252)));
        let snap = default_origin_snapshot_name(&max);
        assert!(
            snap.len() <= 253 && validate_name("x", &snap).is_ok(),
            "{snap}"
        );
        assert_eq!(default_origin_snapshot_name("db"), "db-snapshift");
        let mut req = MigrationRequest::for_pvc("apps", "db");
        req.pvc_name = Some("x".into());
        assert!(req.validate().is_err(), "pvc name without create_pvc");
        req.create_pvc = true;
        assert!(req.validate().is_ok());
        assert!(
            MigrationRequest::for_pvc("apps", "../etc")
                .validate()
                .is_err()
        );
        assert!(validate_namespace("ns", &"n".repeat(63)).is_ok());
        for bad in ["a.b", &"n".repeat(64), "Apps"] {
            assert!(validate_namespace("ns", bad).is_err(), "{bad}");
            let mut req = MigrationRequest::for_pvc("apps", "db");
            req.to_namespace = Some(bad.to_string());
            assert!(req.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn verify_checks() {
        let (vs, vsc, _) = origin_objects();
        let origin = origin_from_objects("east", &vs, &vsc, None).unwrap();
        let filter = MetadataFilter::default();
        let plan = plan_destination(
            &origin,
            &MigrationRequest::for_snapshot("apps", "db-snap"),
            &ctx(&filter),
        )
        .unwrap();
        let mut dvs = plan.snapshot.clone();
        dvs.status = Some(VolumeSnapshotStatus {
            bound_volume_snapshot_content_name: Some("snapshift-apps.db-snap".into()),
            ready_to_use: Some(true),
            ..Default::default()
        });
        let dvsc = plan.content.clone();
        assert!(check_migrated_pair(&vs, Some(&vsc), &dvs, Some(&dvsc)).is_empty());
        let mut wrong = dvsc.clone();
        wrong.spec.source.snapshot_handle = Some("snap-x".into());
        wrong.spec.driver = "other".into();
        wrong.spec.deletion_policy = DeletionPolicy::Delete;
        let problems = check_migrated_pair(&vs, Some(&vsc), &dvs, Some(&wrong));
        assert_eq!(problems.len(), 4, "{problems:?}");
        let mut misbound = dvsc.clone();
        misbound.spec.volume_snapshot_ref.name = Some("other".into());
        misbound.spec.volume_snapshot_class_name = None;
        let problems = check_migrated_pair(&vs, Some(&vsc), &dvs, Some(&misbound));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("points at apps/other"), "{problems:?}");
        assert!(
            problems[1].contains("no VolumeSnapshotClass"),
            "{problems:?}"
        );
        assert_eq!(check_migrated_pair(&vs, Some(&vsc), &dvs, None).len(), 1);
    }
}
