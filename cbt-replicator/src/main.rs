//! `cbt-replicator`: serves csi-addons VolumeReplication / VolumeGroupReplication objects on
//! NetApp Trident and Dell PowerStore. Parses arguments and calls one library function
//! (`cbt_k8s::replication::controller::process::run_replicator` or
//! `cbt_k8s::replication::crds::manifest`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cbt_core::exit::ExitClass;
use cbt_k8s::ClusterTarget;
use cbt_k8s::replication::controller::Config;
use cbt_k8s::replication::controller::leader::LeaseConfig;
use cbt_k8s::replication::controller::process::{RunOptions, run_replicator};
use clap::{Parser, Subcommand};

/// Volume replication controller (csi-addons API on Trident and PowerStore).
#[derive(Parser)]
#[command(name = "cbt-replicator", version, after_long_help = cbt_core::exit::HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions it needs (YAML, for kubectl apply).
    Crds {
        /// csi-addons is installed: leave its CRDs out.
        #[arg(long)]
        csi_addons_installed: bool,
        /// Also print Trident's and Dell's CRDs (normally installed by those drivers).
        #[arg(long)]
        backends: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// CSI drivers to serve, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "csi.trident.netapp.io,csi-powerstore.dellemc.com"
    )]
    provisioners: Vec<String>,
    /// Serve /metrics and /healthz here (e.g. 0.0.0.0:8080).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Kubeconfig (default: KUBECONFIG, ~/.kube/config, or the pod's service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long)]
    context: Option<String>,
    /// Disable leader election (only with a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "cbt-replicator")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "cbt-replicator")]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Seconds a transition may stay in progress before Degraded=True.
    #[arg(long, default_value_t = 600)]
    converge_timeout_seconds: u64,
    /// Log level (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log_level: String,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds {
            csi_addons_installed,
            backends,
        } => {
            print!(
                "{}",
                cbt_k8s::replication::crds::manifest(csi_addons_installed, backends)
            );
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_target(false)
                .init();
            let identity = args.identity.clone().unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "cbt-replicator".into()),
                    std::process::id()
                )
            });
            let mut config = Config::new(args.provisioners.clone());
            config.converge_timeout = Duration::from_secs(args.converge_timeout_seconds);
            let lease = (!args.no_leader_election).then(|| {
                let mut l = LeaseConfig::new(&args.lease_namespace, &args.lease_name, &identity);
                l.lease_duration = Duration::from_secs(args.lease_seconds.max(2));
                l.retry_period = (l.lease_duration / 5).max(Duration::from_millis(200));
                l
            });
            let opts = RunOptions {
                target: ClusterTarget {
                    kubeconfig: args.kubeconfig,
                    context: args.context,
                },
                config,
                metrics_addr: args.metrics_addr,
                lease,
            };
            match run_replicator(opts, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cbt-replicator: {e}");
                    ExitCode::from(ExitClass::from(e.kind()).code())
                }
            }
        }
    }
}
