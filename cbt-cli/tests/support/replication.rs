//! What the `cbt replication` tests share: running the CLI, and the replication controller
//! in-process against a fake cluster (simulated Trident backend).

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use cbt_k8s::replication::controller::{Config, Context, Leadership, Metrics, run};
use cbt_k8s::{ClusterTarget, connect};

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
/// until the returned sender is dropped or used.
pub async fn start_controller(kubeconfig: &Path) -> tokio::sync::oneshot::Sender<()> {
    let client = connect(&ClusterTarget {
        kubeconfig: Some(kubeconfig.to_path_buf()),
        context: None,
    })
    .await
    .unwrap()
    .client;
    let mut config = Config::new(vec![TRIDENT.into()]);
    config.retry_base = Duration::from_millis(50);
    config.retry_max = Duration::from_millis(300);
    let ctx = Arc::new(Context::new(
        client,
        "test",
        config,
        Arc::new(Metrics::default()),
        Leadership::always(),
    ));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run(ctx, async move {
        let _ = rx.await;
    }));
    stop
}
