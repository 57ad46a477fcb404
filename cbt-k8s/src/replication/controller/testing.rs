//! The replication controller run in-process, for tests and benchmarks (feature `testing`).
//!
//! Owns what every in-process run repeats: settings that retry within milliseconds (the
//! simulated backends of fake-kube answer within milliseconds, where the production backoff
//! would make a test wait seconds), a context built from a kubeconfig as `cbt-replicator`
//! builds its own, and a handle that stops the controller. It decides nothing the controller
//! decides; production runs go through [`super::process::run_replicator`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{Config, Context, Leadership, Metrics, run};
use crate::{ClusterTarget, Error, connect};

/// How long [`Running::stop`] waits for the controller to return before it calls that a hang.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Production settings for `provisioners`, except that retries start after 50 ms and wait
/// 300 ms at the most.
pub fn fast_config(provisioners: Vec<String>) -> Config {
    let mut config = Config::new(provisioners);
    config.retry_base = Duration::from_millis(50);
    config.retry_max = Duration::from_millis(300);
    config
}

/// A context for the current context of `kubeconfig`, named after it (as `cbt-replicator`
/// names its cluster), counting into fresh [`Metrics`] (read them through `ctx.metrics`).
///
/// # Errors
/// Those of [`connect`]: a missing or malformed kubeconfig, an unusable client.
pub async fn context(
    kubeconfig: &Path,
    config: Config,
    leadership: Leadership,
) -> Result<Arc<Context>, Error> {
    let cluster = connect(&ClusterTarget {
        kubeconfig: Some(kubeconfig.to_path_buf()),
        context: None,
    })
    .await?;
    Ok(Arc::new(Context::new(
        cluster.client,
        &cluster.context,
        config,
        Arc::new(Metrics::default()),
        leadership,
    )))
}

/// The controller ([`run`]) on a task of the current runtime. Dropping the handle asks it to
/// stop without waiting for it.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Spawns the controller on `ctx`.
    pub fn start(ctx: Arc<Context>) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(ctx, async move {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Asks the controller to stop and waits until it has returned (its reconciles in flight
    /// finished), so that nothing it does outlives the call.
    ///
    /// # Panics
    /// When it has not returned within [`STOP_TIMEOUT`]: a shutdown that hangs is a bug the
    /// caller must see.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // A controller that panicked has stopped too; its panic is reported by the runtime.
        if tokio::time::timeout(STOP_TIMEOUT, &mut self.task)
            .await
            .is_err()
        {
            panic!(
                "the replication controller did not stop within {}s",
                STOP_TIMEOUT.as_secs()
            );
        }
    }

    /// Aborts the controller task at once, as a crash would: no graceful shutdown.
    pub fn kill(self) {
        self.task.abort();
    }
}
