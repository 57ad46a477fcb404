//! What the `cbt replication` tests share: running the CLI, and the replication controller
//! in-process against a fake cluster (simulated Trident backend).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cbt_core::exit::ExitClass;
use cbt_k8s::replication::controller::Leadership;
use cbt_k8s::replication::controller::testing::{self, Running};
use fake_kube::FakeKube;
use serde_json::{Value, json};

/// The Trident CSI driver.
pub const TRIDENT: &str = "csi.trident.netapp.io";
/// apiVersion of the csi-addons kinds.
pub const VR_API: &str = "replication.storage.openshift.io/v1alpha1";

/// Runs `cbt ARGS --kubeconfig KUBECONFIG`.
pub async fn cbt(kubeconfig: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cbt"));
    cmd.args(args).arg("--kubeconfig").arg(kubeconfig);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Stdout and stderr of a run, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Starts the controller (serving Trident, fast retries) as the user of `kubeconfig`; it runs
/// until the returned handle is dropped or stopped.
pub async fn start_controller(kubeconfig: &Path) -> Running {
    let config = testing::fast_config(vec![TRIDENT.into()]);
    let ctx = testing::context(kubeconfig, config, Leadership::always())
        .await
        .unwrap();
    Running::start(ctx)
}

/// Asserts that the run ended with the exit code of `class` (showing its output if not).
pub fn assert_exit(out: &Output, class: ExitClass) {
    assert_eq!(
        out.status.code(),
        Some(i32::from(class.code())),
        "{}",
        text(out)
    );
}

/// Namespace `ns`, the Trident StorageClass `ontap` and its VolumeReplicationClass `trident`.
pub fn seed_trident(fake: &FakeKube, ns: &str) {
    fake.seed_namespace(ns).unwrap();
    fake.seed_storage_class("ontap", TRIDENT, false).unwrap();
    fake.create(
        json!({"apiVersion": VR_API, "kind": "VolumeReplicationClass",
        "metadata": {"name": "trident"}, "spec": {"provisioner": TRIDENT}}),
    )
    .unwrap();
}

/// A 1Gi PVC `ns/name` of class `ontap` with `labels`.
pub fn ontap_pvc(fake: &FakeKube, ns: &str, name: &str, labels: Value) {
    fake.create(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "ontap",
                 "resources": {"requests": {"storage": "1Gi"}}}}))
        .unwrap();
}

/// A VolumeReplication `ns/name` of class `trident`, desired primary, of the PVC `name`.
pub fn primary_vr(fake: &FakeKube, ns: &str, name: &str, handle: &str) {
    fake.create(json!({"apiVersion": VR_API, "kind": "VolumeReplication",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"volumeReplicationClass": "trident", "replicationState": "primary",
                 "dataSource": {"kind": "PersistentVolumeClaim", "name": name},
                 "autoResync": false, "replicationHandle": handle}}))
        .unwrap();
}

/// Waits until `kind` `ns/name` reports state Primary (10 s at most).
pub async fn until_primary(fake: &FakeKube, ns: &str, kind: &str, name: &str) {
    for _ in 0..400 {
        let o = fake.get(VR_API, kind, ns, name).unwrap();
        if o["status"]["state"] == "Primary" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{kind} {name} never primary");
}
