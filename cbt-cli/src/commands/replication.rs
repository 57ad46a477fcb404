//! `cbt replication status|promote|demote|resync`: csi-addons volume replication for people.
//! Flags and printing only; the work is `cbt_k8s::replication::ops`.

use std::path::PathBuf;
use std::time::Duration;

use cbt_k8s::replication::ops::{self, ChangeReport};
use cbt_k8s::replication::types::ReplicationState;
use clap::{Args, Subcommand};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::Ctx;
use crate::commands::k8s::{connect, connect_in, k8s_error};
use crate::error::CliError;

/// Which cluster.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Namespace (default: the context's namespace; `status` without -n lists all namespaces).
    #[arg(short = 'n', long = "namespace", value_name = "NS")]
    pub namespace: Option<String>,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, else the pod's service account).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
}

/// `cbt replication` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplicationCommand {
    /// VolumeReplications and VolumeGroupReplications: desired and observed state, backend,
    /// last sync, lag, conditions.
    Status(ClusterArgs),
    /// Make NAME (a VolumeReplication, else a VolumeGroupReplication) primary and wait.
    Promote(ChangeArgs),
    /// Make NAME secondary and wait.
    Demote(ChangeArgs),
    /// Resync NAME from its peer (its local data is overwritten) and wait.
    Resync(ChangeArgs),
}

/// Arguments of a state change.
#[derive(Debug, Clone, Args)]
pub struct ChangeArgs {
    /// The VolumeReplication or VolumeGroupReplication.
    pub name: String,
    /// Cluster and namespace.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Seconds to wait for the controller to report the result.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Runs a `cbt replication` command.
///
/// # Errors
/// Connection, API, rejection, backend failure and timeout, as [`CliError`]s.
pub async fn run(ctx: &Ctx, cmd: ReplicationCommand) -> Result<(), CliError> {
    let (args, desired) = match cmd {
        ReplicationCommand::Status(c) => return status(ctx, &c).await,
        ReplicationCommand::Promote(a) => (a, ReplicationState::Primary),
        ReplicationCommand::Demote(a) => (a, ReplicationState::Secondary),
        ReplicationCommand::Resync(a) => (a, ReplicationState::Resync),
    };
    if args.timeout == 0 {
        return Err(CliError::usage("--timeout must be at least 1 second"));
    }
    let c = &args.cluster;
    let (cluster, ns) = connect_in(&c.kubeconfig, &c.context, &c.namespace).await?;
    let report = ops::set_state(
        &cluster.client,
        &cluster.context,
        &ns,
        &args.name,
        desired,
        Duration::from_secs(args.timeout),
        now,
    )
    .await
    .map_err(k8s_error)?;
    ctx.out.emit(&report, || human_change(&report));
    Ok(())
}

fn human_change(r: &ChangeReport) -> String {
    let mut s = format!(
        "{} {}: {} -> {} (generation {}): {}; {}\n",
        r.kind, r.object, r.from, r.to, r.generation, r.result.observed, r.result.conditions
    );
    if r.backend_changes.is_empty() {
        s.push_str("backend: no object changed (already in that state)\n");
    }
    for c in &r.backend_changes {
        s.push_str(&format!("backend: {c}\n"));
    }
    s
}

async fn status(ctx: &Ctx, c: &ClusterArgs) -> Result<(), CliError> {
    let cluster = connect(&c.kubeconfig, &c.context).await?;
    let rows = ops::status(
        &cluster.client,
        &cluster.context,
        c.namespace.as_deref(),
        &now(),
    )
    .await
    .map_err(k8s_error)?;
    ctx.out.emit(&ops::rows_json(&rows), || {
        if rows.is_empty() {
            "no VolumeReplication or VolumeGroupReplication found\n".into()
        } else {
            ops::render_table(&rows)
        }
    });
    Ok(())
}
