//! Checks of the snapshot machinery CBT stands on: the `snapshot.storage.k8s.io/v1` API
//! (external-snapshotter CRDs), a running snapshot controller, and a VolumeSnapshotClass for
//! the driver.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::{Check, CheckId, Ctx};
use crate::error::{Error, describe};
use crate::pvc_backup::snapshot_class_for;
use crate::snapshot::GROUP;

/// The resources backups use, as discovery names them.
const SNAPSHOT_RESOURCES: [&str; 3] = [
    "volumesnapshots",
    "volumesnapshotcontents",
    "volumesnapshotclasses",
];

/// Labels the upstream snapshot-controller deployments put on their pods.
const CONTROLLER_SELECTORS: [&str; 2] = [
    "app.kubernetes.io/name=snapshot-controller",
    "app=snapshot-controller",
];

const INSTALL_SNAPSHOTTER: &str = "install the external-snapshotter CRDs (client/config/crd, v8 or later) and its snapshot-controller (deploy/kubernetes/snapshot-controller)";

/// (1) The three snapshot resources are served at v1 (API discovery, open to every user).
pub(crate) async fn snapshot_api(ctx: &Ctx<'_>) -> Check {
    let id = CheckId::SnapshotApi;
    let gv = format!("{GROUP}/v1");
    match ctx.client().list_api_group_resources(&gv).await {
        Ok(list) => {
            let missing: Vec<&str> = SNAPSHOT_RESOURCES
                .iter()
                .copied()
                .filter(|r| !list.resources.iter().any(|s| s.name == *r))
                .collect();
            if missing.is_empty() {
                Check::pass(
                    id,
                    "VolumeSnapshot, VolumeSnapshotContent and VolumeSnapshotClass are served",
                )
            } else {
                Check::fail(
                    id,
                    format!("{gv} is served without {}", missing.join(", ")),
                    INSTALL_SNAPSHOTTER,
                )
            }
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Check::fail(
            id,
            format!("{gv} is not served: the VolumeSnapshot CRDs are not installed"),
            INSTALL_SNAPSHOTTER,
        ),
        Err(e) => Check::unchecked(id, &format!("get discovery /apis/{gv}"), &e),
    }
}

/// Phase (and waiting reason of the first waiting container) of a pod, for messages.
fn pod_state(p: &Pod) -> String {
    let status = p.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_else(|| "Unknown".into());
    let waiting = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| c.state.and_then(|s| s.waiting).and_then(|w| w.reason));
    match waiting {
        Some(w) => format!("{phase} ({w})"),
        None => phase,
    }
}

pub(crate) fn pod_name(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

pub(crate) fn is_running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Decides on the snapshot-controller pods found (pure).
fn judge_controller(pods: &[Pod]) -> Check {
    let id = CheckId::SnapshotController;
    if pods.is_empty() {
        return Check::warn(
            id,
            "no pod labelled app.kubernetes.io/name=snapshot-controller or app=snapshot-controller is visible",
            "if VolumeSnapshots never become ready, install the snapshot-controller (external-snapshotter deploy/kubernetes/snapshot-controller); managed control planes may run it out of sight",
        );
    }
    if let Some(p) = pods.iter().find(|p| is_running(p)) {
        return Check::pass(id, format!("{} is Running", pod_name(p)));
    }
    let states: Vec<String> = pods
        .iter()
        .map(|p| format!("{} is {}", pod_name(p), pod_state(p)))
        .collect();
    Check::fail(
        id,
        format!(
            "no snapshot-controller pod is running: {}",
            states.join(", ")
        ),
        "fix the snapshot-controller deployment (kubectl describe pod): without it no VolumeSnapshot becomes ready",
    )
}

/// (2) A snapshot-controller pod runs, in any namespace.
pub(crate) async fn snapshot_controller(ctx: &Ctx<'_>) -> Check {
    let pods: Api<Pod> = Api::all(ctx.client());
    let mut found: Vec<Pod> = Vec::new();
    for sel in CONTROLLER_SELECTORS {
        match pods.list(&ListParams::default().labels(sel)).await {
            Ok(list) => {
                for p in list.items {
                    if !found.iter().any(|f| f.metadata.uid == p.metadata.uid) {
                        found.push(p);
                    }
                }
            }
            Err(e) => {
                return Check::unchecked(
                    CheckId::SnapshotController,
                    "list pods (all namespaces)",
                    &e,
                );
            }
        }
    }
    judge_controller(&found)
}

/// (10) The class backups will use: the named one (of this driver), else exactly one default.
pub(crate) async fn snapshot_class(ctx: &Ctx<'_>, driver: &str) -> Check {
    let id = CheckId::SnapshotClass;
    let named = ctx.opts.snapshot_class.as_deref();
    match snapshot_class_for(ctx.cluster, driver, named).await {
        Ok(name) if named.is_some() => Check::pass(id, format!("{name} (named) is {driver}'s")),
        Ok(name) => Check::pass(id, format!("{name} is {driver}'s default class")),
        Err(Error::Preflight { problem, fix, .. }) => Check::fail(id, problem, fix),
        Err(e) if e.is_forbidden() => {
            let verb = if named.is_some() { "get" } else { "list" };
            Check::forbidden(id, verb, "volumesnapshotclasses.snapshot.storage.k8s.io")
        }
        Err(Error::Api { source, .. }) => Check::warn(
            id,
            format!("cannot check: {}", describe(&source)),
            "retry; if it persists, check the API server",
        ),
        Err(e) => Check::warn(id, format!("cannot check: {e}"), "retry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    fn pod(name: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "kube-system", "uid": name},
            "status": {"phase": phase, "containerStatuses": [{"name": "c", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff"}}}]},
        }))
        .unwrap_or_default()
    }

    #[test]
    fn the_controller_must_run_when_it_is_visible() {
        assert_eq!(judge_controller(&[]).status, Status::Warn);
        let pending = judge_controller(&[pod("a", "Pending")]);
        assert_eq!(pending.status, Status::Fail);
        assert!(
            pending.detail.contains("Pending (ImagePullBackOff)"),
            "{}",
            pending.detail
        );
        assert_eq!(
            judge_controller(&[pod("a", "Pending"), pod("b", "Running")]).status,
            Status::Pass
        );
    }
}
