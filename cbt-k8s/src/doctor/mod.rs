//! `cbt doctor`: can changed-block-tracking backups work in this cluster, and if not, what
//! exactly is missing? One [`Check`] per question, each Pass / Warn / Fail / Skip with what was
//! seen and the fix.
//!
//! The questions follow the path a backup takes (contracts §2, §4, §5): the snapshot API and
//! its controller; the SnapshotMetadataService CRD at v1beta1 and a CR named after the driver
//! (absent when a driver ships without the external-snapshot-metadata sidecar, as OpenShift
//! Data Foundation did); the sidecar in the driver's pods; the CR's address leading to a
//! Service with ready endpoints; the CA, a TLS handshake and gRPC health check against it; a
//! token for the mover's ServiceAccount with the CR's audience; a snapshot class; the RBAC of
//! the identity running doctor (the one that runs `cbt backup --pvc`, checked against
//! [`crate::pvc_backup::ORCHESTRATOR_PERMISSIONS`]) and of the mover; and, given a ready
//! VolumeSnapshot, a real GetMetadataAllocated call through the sidecar.
//!
//! Rules: a check whose prerequisite failed is [`Status::Skip`] with the reason (no cascade of
//! confusing failures); a lookup the caller may not make (403) is [`Status::Warn`] "cannot
//! check", never an error; only [`Status::Fail`] means CBT cannot work ([`DoctorReport::cbt_usable`]).
//! Doctor only reads, except for what asking needs: access reviews and a TokenRequest (a
//! short-lived token, never printed).
//!
//! Each check is a small function in a submodule; this module owns the types, the driver
//! choice and the order.

mod access;
mod probe;
mod service;
mod snapshots;
mod tls;

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::api::{Api, ListParams};
use serde::Serialize;

pub use access::denied_permissions;

use crate::connect::Cluster;
use crate::error::{describe, is_forbidden};

/// Stable identifier of a check (what scripts and tests match on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckId {
    /// The API server answers.
    ApiServer,
    /// The CSI driver to check exists (CSIDriver object).
    CsiDriver,
    /// snapshot.storage.k8s.io/v1 VolumeSnapshot, VolumeSnapshotContent and VolumeSnapshotClass
    /// are served.
    SnapshotApi,
    /// A snapshot controller pod runs.
    SnapshotController,
    /// The SnapshotMetadataService CRD serves v1beta1.
    MetadataCrd,
    /// A SnapshotMetadataService named after the driver exists and is well-formed.
    MetadataService,
    /// The driver's pods carry the csi-snapshot-metadata sidecar.
    MetadataSidecar,
    /// The CR's address is a Service exposing that port with ready endpoints.
    MetadataEndpoints,
    /// The CR's CA bundle parses as X.509 certificates.
    MetadataCa,
    /// A TLS handshake (only that CA, the address host as name) and gRPC health check succeed.
    MetadataTls,
    /// A TokenRequest for the mover's ServiceAccount with the CR's audience succeeds.
    TokenRequest,
    /// The driver has a usable VolumeSnapshotClass.
    SnapshotClass,
    /// The identity running doctor has every permission backup and restore use.
    OrchestratorRbac,
    /// The mover's ServiceAccount may get VolumeSnapshots (the sidecar's SubjectAccessReview).
    MoverAccess,
    /// GetMetadataAllocated on a ready VolumeSnapshot through the sidecar returns a clean stream.
    MetadataProbe,
}

impl CheckId {
    /// The identifier as printed (`metadata-tls`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ApiServer => "api-server",
            Self::CsiDriver => "csi-driver",
            Self::SnapshotApi => "snapshot-api",
            Self::SnapshotController => "snapshot-controller",
            Self::MetadataCrd => "metadata-crd",
            Self::MetadataService => "metadata-service",
            Self::MetadataSidecar => "metadata-sidecar",
            Self::MetadataEndpoints => "metadata-endpoints",
            Self::MetadataCa => "metadata-ca",
            Self::MetadataTls => "metadata-tls",
            Self::TokenRequest => "token-request",
            Self::SnapshotClass => "snapshot-class",
            Self::OrchestratorRbac => "orchestrator-rbac",
            Self::MoverAccess => "mover-access",
            Self::MetadataProbe => "metadata-probe",
        }
    }

    /// What the check asks, for people.
    pub fn title(self) -> &'static str {
        match self {
            Self::ApiServer => "API server reachable",
            Self::CsiDriver => "CSI driver",
            Self::SnapshotApi => "snapshot API (snapshot.storage.k8s.io/v1)",
            Self::SnapshotController => "snapshot controller running",
            Self::MetadataCrd => "SnapshotMetadataService CRD at v1beta1",
            Self::MetadataService => "SnapshotMetadataService for the driver",
            Self::MetadataSidecar => "csi-snapshot-metadata sidecar in the driver's pods",
            Self::MetadataEndpoints => "metadata Service and endpoints",
            Self::MetadataCa => "metadata CA bundle",
            Self::MetadataTls => "metadata TLS and health",
            Self::TokenRequest => "token for the mover with the service audience",
            Self::SnapshotClass => "VolumeSnapshotClass for the driver",
            Self::OrchestratorRbac => "your RBAC for backup and restore",
            Self::MoverAccess => "mover may get VolumeSnapshots",
            Self::MetadataProbe => "GetMetadataAllocated probe",
        }
    }
}

impl std::fmt::Display for CheckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Pass,
    /// Could not be checked, or works in a degraded way; CBT may still work.
    Warn,
    /// CBT cannot work until this is fixed.
    Fail,
    /// Not checked because a prerequisite failed or an input was not given.
    Skip,
}

impl Status {
    /// `PASS`, `WARN`, `FAIL` or `SKIP`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Which check.
    pub id: CheckId,
    /// The CSI driver it is about (per-driver checks), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The verdict.
    pub status: Status,
    /// What the check asks.
    pub title: String,
    /// What was seen.
    pub detail: String,
    /// What to do (for Warn and Fail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(id: CheckId, status: Status, detail: impl Into<String>, fix: Option<String>) -> Self {
        Self {
            id,
            driver: None,
            status,
            title: id.title().to_string(),
            detail: detail.into(),
            fix,
        }
    }

    /// A passed check.
    pub fn pass(id: CheckId, detail: impl Into<String>) -> Self {
        Self::new(id, Status::Pass, detail, None)
    }

    /// A warning with its fix.
    pub fn warn(id: CheckId, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(id, Status::Warn, detail, Some(fix.into()))
    }

    /// A failure with its fix.
    pub fn fail(id: CheckId, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(id, Status::Fail, detail, Some(fix.into()))
    }

    /// A check not run, with the reason.
    pub fn skip(id: CheckId, reason: impl Into<String>) -> Self {
        Self::new(id, Status::Skip, reason, None)
    }

    /// The Warn for a lookup the caller may not make: the check cannot say anything.
    pub fn forbidden(id: CheckId, verb: &str, resource: &str) -> Self {
        Self::warn(
            id,
            format!("cannot check: {verb} {resource} is forbidden for you"),
            format!("run doctor as an identity that may {verb} {resource}, or check this by hand"),
        )
    }

    /// The Warn for a lookup that failed for another reason.
    pub fn unchecked(id: CheckId, what: &str, e: &kube::Error) -> Self {
        if is_forbidden(e) {
            let (verb, resource) = what.split_once(' ').unwrap_or((what, ""));
            return Self::forbidden(id, verb, resource);
        }
        Self::warn(
            id,
            format!("cannot check: {what} failed: {}", describe(e)),
            "retry; if it persists, check the API server",
        )
    }

    /// This check, about `driver`.
    pub fn for_driver(mut self, driver: &str) -> Self {
        self.driver = Some(driver.to_string());
        self
    }
}

/// What to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoctorOptions {
    /// Namespace of the PVCs to back up (and of the mover's ServiceAccount).
    pub namespace: String,
    /// CSI driver; `None` = the driver of `snapshot`, else the drivers of the namespace's block
    /// PVCs, else every CSIDriver.
    pub driver: Option<String>,
    /// ServiceAccount the data mover runs as (the backup identity whose token the sidecar checks).
    pub service_account: String,
    /// A ready VolumeSnapshot in the namespace to probe GetMetadataAllocated with.
    pub snapshot: Option<String>,
    /// VolumeSnapshotClass backups will name; `None` = the driver's default.
    pub snapshot_class: Option<String>,
    /// Timeout of each network step (DNS, connect, handshake, health; the probe gets 10x).
    pub network_timeout: Duration,
}

impl DoctorOptions {
    /// Defaults for `namespace`: mover ServiceAccount `cbt-mover`, 5 s network steps.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            driver: None,
            service_account: "cbt-mover".into(),
            snapshot: None,
            snapshot_class: None,
            network_timeout: Duration::from_secs(5),
        }
    }
}

/// Everything doctor found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DoctorReport {
    /// Namespace checked.
    pub namespace: String,
    /// Drivers checked.
    pub drivers: Vec<String>,
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// False if any check failed: CBT backups cannot work as things are.
    pub cbt_usable: bool,
}

impl DoctorReport {
    /// The first check with this id.
    pub fn check(&self, id: CheckId) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    fn finish(namespace: &str, drivers: Vec<String>, checks: Vec<Check>) -> Self {
        let cbt_usable = !checks.iter().any(|c| c.status == Status::Fail);
        Self {
            namespace: namespace.to_string(),
            drivers,
            checks,
            cbt_usable,
        }
    }
}

/// What the checks of one run share.
pub(crate) struct Ctx<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) opts: &'a DoctorOptions,
}

impl Ctx<'_> {
    pub(crate) fn client(&self) -> kube::Client {
        self.cluster.client.clone()
    }
}

/// Runs every check (see the module docs) and reports; never fails: what cannot be checked is
/// a Warn, what is broken a Fail.
pub async fn run_doctor(cluster: &Cluster, opts: &DoctorOptions) -> DoctorReport {
    let ctx = Ctx { cluster, opts };
    let mut checks = Vec::new();
    match cluster.client.apiserver_version().await {
        Ok(v) => checks.push(Check::pass(
            CheckId::ApiServer,
            format!("{} (Kubernetes {})", cluster.server, v.git_version),
        )),
        Err(e) => {
            checks.push(Check::fail(
                CheckId::ApiServer,
                format!("cannot reach {}: {}", cluster.server, describe(&e)),
                "check the kubeconfig context, the network path to the API server and your credentials",
            ));
            return DoctorReport::finish(&opts.namespace, Vec::new(), checks);
        }
    }

    let (drivers, driver_checks) = choose_drivers(&ctx).await;
    checks.extend(driver_checks);
    let snapshot_api = snapshots::snapshot_api(&ctx).await;
    let snapshot_api_ok = snapshot_api.status != Status::Fail;
    checks.push(snapshot_api);
    checks.push(snapshots::snapshot_controller(&ctx).await);
    let (crd, v1beta1_served) = service::metadata_crd(&ctx).await;
    checks.push(crd);

    let mut reachable = Vec::new();
    for driver in &drivers {
        let found = service::driver_checks(&ctx, driver, v1beta1_served).await;
        checks.extend(found.checks.into_iter().map(|c| c.for_driver(driver)));
        let class = if snapshot_api_ok {
            snapshots::snapshot_class(&ctx, driver).await
        } else {
            Check::skip(
                CheckId::SnapshotClass,
                "the snapshot API is not served (see snapshot-api)",
            )
        };
        checks.push(class.for_driver(driver));
        reachable.push((driver.clone(), found.reachable));
    }

    checks.push(access::orchestrator_rbac(&ctx).await);
    checks.push(access::mover_access(&ctx).await);

    for (driver, reach) in &reachable {
        let c = match &opts.snapshot {
            None => Check::skip(
                CheckId::MetadataProbe,
                "no snapshot given: pass --snapshot NAME (a ready VolumeSnapshot of the driver) to probe GetMetadataAllocated",
            ),
            Some(_) if !snapshot_api_ok => Check::skip(
                CheckId::MetadataProbe,
                "the snapshot API is not served (see snapshot-api)",
            ),
            Some(name) => probe::probe(&ctx, driver, name, reach.as_ref()).await,
        };
        checks.push(c.for_driver(driver));
    }
    DoctorReport::finish(&opts.namespace, drivers, checks)
}

/// Which drivers to check and a `csi-driver` check for each (or one Fail if none is found).
async fn choose_drivers(ctx: &Ctx<'_>) -> (Vec<String>, Vec<Check>) {
    let opts = ctx.opts;
    let (drivers, origin) = if let Some(d) = &opts.driver {
        (vec![d.clone()], "named with --driver".to_string())
    } else if let Some(d) = match &opts.snapshot {
        Some(s) => probe::snapshot_driver(ctx, s).await,
        None => None,
    } {
        (
            vec![d],
            format!(
                "the driver of VolumeSnapshot {}/{}",
                opts.namespace,
                opts.snapshot.as_deref().unwrap_or_default()
            ),
        )
    } else {
        match pvc_drivers(ctx).await {
            Some(ds) if !ds.is_empty() => (
                ds,
                format!("provisions block PVCs in namespace {}", opts.namespace),
            ),
            _ => (
                all_csi_drivers(ctx).await,
                "a CSIDriver of the cluster".into(),
            ),
        }
    };
    if drivers.is_empty() {
        return (
            drivers,
            vec![Check::fail(
                CheckId::CsiDriver,
                format!(
                    "no CSI driver found (no block PVC in namespace {} and no CSIDriver object visible)",
                    opts.namespace
                ),
                "name the driver with --driver (kubectl get csidrivers)",
            )],
        );
    }
    let api: Api<CSIDriver> = Api::all(ctx.client());
    let mut checks = Vec::new();
    for d in &drivers {
        let c = match api.get_opt(d).await {
            Ok(Some(_)) => Check::pass(CheckId::CsiDriver, format!("{d} ({origin})")),
            Ok(None) => Check::warn(
                CheckId::CsiDriver,
                format!("{d} ({origin}) has no CSIDriver object"),
                "check the driver name (kubectl get csidrivers); most drivers register one",
            ),
            Err(e) => Check::unchecked(CheckId::CsiDriver, "get csidrivers.storage.k8s.io", &e),
        };
        checks.push(c.for_driver(d));
    }
    (drivers, checks)
}

/// The CSI drivers of the namespace's block PVCs (bound PV's driver, else the StorageClass's
/// provisioner), sorted; `None` if they cannot be listed.
async fn pvc_drivers(ctx: &Ctx<'_>) -> Option<Vec<String>> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client(), &ctx.opts.namespace);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client());
    let classes: Api<k8s_openapi::api::storage::v1::StorageClass> = Api::all(ctx.client());
    let list = pvcs.list(&ListParams::default()).await.ok()?;
    let mut drivers = Vec::new();
    for pvc in list.items {
        let spec = pvc.spec.unwrap_or_default();
        if spec.volume_mode.as_deref() != Some("Block") {
            continue;
        }
        let from_pv = match &spec.volume_name {
            Some(pv) => pvs
                .get_opt(pv)
                .await
                .ok()
                .flatten()
                .and_then(|pv| pv.spec)
                .and_then(|s| s.csi)
                .map(|c| c.driver),
            None => None,
        };
        let driver = match from_pv {
            Some(d) => Some(d),
            None => match &spec.storage_class_name {
                Some(sc) => classes
                    .get_opt(sc)
                    .await
                    .ok()
                    .flatten()
                    .map(|c| c.provisioner),
                None => None,
            },
        };
        drivers.extend(driver);
    }
    drivers.sort();
    drivers.dedup();
    Some(drivers)
}

async fn all_csi_drivers(ctx: &Ctx<'_>) -> Vec<String> {
    let api: Api<CSIDriver> = Api::all(ctx.client());
    let mut names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter_map(|d| d.metadata.name)
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_statuses_serialize_as_printed() {
        let c = Check::fail(CheckId::MetadataTls, "d", "f").for_driver("x");
        let v = serde_json::to_value(&c).unwrap_or_default();
        assert_eq!(v["id"], "metadata-tls");
        assert_eq!(v["status"], "fail");
        assert_eq!(v["driver"], "x");
        assert_eq!(CheckId::MetadataTls.to_string(), "metadata-tls");
        let skip =
            serde_json::to_value(Check::skip(CheckId::MetadataProbe, "r")).unwrap_or_default();
        assert!(skip.get("fix").is_none() && skip.get("driver").is_none());
    }

    #[test]
    fn only_a_failure_makes_cbt_unusable() {
        let warn = DoctorReport::finish(
            "ns",
            vec![],
            vec![Check::warn(CheckId::SnapshotController, "d", "f")],
        );
        assert!(warn.cbt_usable);
        let fail = DoctorReport::finish(
            "ns",
            vec![],
            vec![Check::fail(CheckId::SnapshotClass, "d", "f")],
        );
        assert!(!fail.cbt_usable);
        assert_eq!(fail.failures().count(), 1);
    }
}
