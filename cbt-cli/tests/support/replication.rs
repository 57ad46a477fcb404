//! What the `cbt replication` tests share: running the CLI, and the replication controller
//! in-process against a fake cluster (simulated Trident backend).

use std::path::Path;
use std::process::{Command, Output};

use cbt_k8s::replication::controller::Leadership;
use cbt_k8s::replication::controller::testing::{self, Running};

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
