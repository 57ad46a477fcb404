//! One cbt-replicator process: metrics endpoint, leader election, then the controllers.
//!
//! Owns the order of start-up and shut-down: the metrics endpoint comes up first (so probes
//! pass while the replica waits as a follower), the Lease is contended, and only once this
//! replica leads do the controllers start. Losing the Lease while serving ends the process
//! with [`Error::LeadershipLost`] (as client-go's elector does), so it restarts as a
//! follower instead of writing beside the new leader.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::leader::{self, Leadership, LeaseConfig};
use super::metrics::Metrics;
use super::{Config, Context, run, serve};
use crate::{ClusterTarget, Error, connect};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Cluster to serve.
    pub target: ClusterTarget,
    /// Controller settings (served drivers, timeouts).
    pub config: Config,
    /// Where to serve `/metrics` and `/healthz` (None: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// The leader Lease (None: no election, this replica always writes).
    pub lease: Option<LeaseConfig>,
}

/// Runs until `shutdown` resolves (then returns Ok after releasing the Lease).
///
/// # Errors
/// Connection or listener failures, an unusable Lease API, or [`Error::LeadershipLost`].
pub async fn run_replicator(
    opts: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let cluster = connect(&opts.target).await?;
    super::preflight(&cluster.client, &cluster.context, &opts.config).await?;
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let shutdown_tx = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    });
    if let Some(addr) = opts.metrics_addr {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen {
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving /metrics and /healthz");
        tokio::spawn(serve::serve(listener, metrics.clone(), stop_rx.clone()));
    }
    let (leadership, election) = match opts.lease.clone() {
        None => {
            metrics.set_leader(true);
            (Leadership::always(), None)
        }
        Some(lease) => {
            let leadership = Leadership::elected();
            let m = metrics.clone();
            let task = tokio::spawn(leader::hold(
                cluster.client.clone(),
                lease,
                leadership.clone(),
                stop_rx.clone(),
                move |lead| m.set_leader(lead),
            ));
            (leadership, Some(task))
        }
    };
    // Follow until we lead (or are told to stop).
    let mut stop = stop_rx.clone();
    while !leadership.is_leader() {
        if *stop.borrow() {
            return finish(election).await;
        }
        if let Some(task) = &election
            && task.is_finished()
        {
            return finish(election).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
    }
    tracing::info!("leading: starting the controllers");
    let ctx = Arc::new(Context::new(
        cluster.client.clone(),
        &cluster.context,
        opts.config.clone(),
        metrics.clone(),
        leadership.clone(),
    ));
    let (lost_tx, lost_rx) = watch::channel(false);
    let watch_leadership = {
        let leadership = leadership.clone();
        let stop = stop_rx.clone();
        async move {
            loop {
                if *stop.borrow() {
                    return;
                }
                if !leadership.is_leader() {
                    let _ = lost_tx.send(true);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut end = stop_rx.clone();
    let mut lost = lost_rx.clone();
    let controllers = run(ctx, async move {
        tokio::select! {
            _ = end.wait_for(|s| *s) => {}
            _ = lost.wait_for(|l| *l) => {}
        }
    });
    tokio::join!(controllers, watch_leadership);
    if *lost_rx.borrow() && !*stop_rx.borrow() {
        let _ = stop_tx.send(true);
        let lease = opts.lease.unwrap_or_else(|| LeaseConfig::new("", "", ""));
        let _ = finish(election).await;
        return Err(Error::LeadershipLost {
            lease: format!("{}/{}", lease.namespace, lease.name),
            identity: lease.identity,
        });
    }
    finish(election).await
}

async fn finish(election: Option<tokio::task::JoinHandle<Result<(), Error>>>) -> Result<(), Error> {
    match election {
        Some(task) => match task.await {
            Ok(r) => r,
            Err(e) => Err(Error::InvalidInput {
                what: "leader election task".into(),
                reason: e.to_string(),
            }),
        },
        None => Ok(()),
    }
}
