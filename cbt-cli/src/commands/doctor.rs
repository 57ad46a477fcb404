//! `cbt doctor`: can changed-block-tracking backups work in this cluster, and what is missing?
//! Flags and printing only; the checks are `cbt_k8s::doctor`.

use std::path::PathBuf;
use std::time::Duration;

use cbt_k8s::doctor::{DoctorOptions, DoctorReport, Status, run_doctor};
use clap::Args;

use crate::Ctx;
use crate::commands::k8s::connect_in;
use crate::error::{CliError, ExitClass};

/// `cbt doctor` flags.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// Namespace of the PVCs to back up (default: the context's namespace).
    #[arg(short = 'n', long = "namespace", value_name = "NS")]
    pub namespace: Option<String>,
    /// CSI driver to check (default: the driver of --snapshot, else the drivers of the
    /// namespace's block PVCs, else every CSIDriver).
    #[arg(long, value_name = "NAME")]
    pub driver: Option<String>,
    /// ServiceAccount the data mover runs as (as given to `cbt backup --pvc`).
    #[arg(long, default_value = "cbt-mover")]
    pub service_account: String,
    /// A ready VolumeSnapshot in the namespace: probe GetMetadataAllocated on it through the
    /// metadata sidecar.
    #[arg(long, value_name = "NAME")]
    pub snapshot: Option<String>,
    /// VolumeSnapshotClass backups will name (default: the driver's default class).
    #[arg(long, value_name = "NAME")]
    pub snapshot_class: Option<String>,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, else the pod's service account).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
    /// Seconds each network step to the sidecar may take (the probe gets ten times as long).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout_secs: u64,
}

/// The report for people: one line per check, a `fix:` line under warnings and failures.
fn human(report: &DoctorReport) -> String {
    let many = report.drivers.len() > 1;
    let mut text = String::new();
    for c in &report.checks {
        let title = match (&c.driver, many) {
            (Some(d), true) => format!("{} [{d}]", c.title),
            _ => c.title.clone(),
        };
        text.push_str(&format!("{}  {title}: {}\n", c.status.label(), c.detail));
        if matches!(c.status, Status::Warn | Status::Fail)
            && let Some(fix) = &c.fix
        {
            text.push_str(&format!("      fix: {fix}\n"));
        }
    }
    let failed: Vec<&str> = report.failures().map(|c| c.id.as_str()).collect();
    if failed.is_empty() {
        text.push_str(&format!(
            "\nCBT backups can work in namespace {}.",
            report.namespace
        ));
    } else {
        text.push_str(&format!(
            "\nCBT backups cannot work in namespace {} until these are fixed: {}.",
            report.namespace,
            failed.join(", ")
        ));
    }
    text
}

/// Runs `cbt doctor`; exits 5 (configuration) when a check failed.
pub async fn run(ctx: &Ctx, args: &DoctorArgs) -> Result<(), CliError> {
    let (cluster, namespace) = connect_in(&args.kubeconfig, &args.context, &args.namespace).await?;
    let mut opts = DoctorOptions::new(&namespace);
    opts.driver = args.driver.clone();
    opts.service_account = args.service_account.clone();
    opts.snapshot = args.snapshot.clone();
    opts.snapshot_class = args.snapshot_class.clone();
    opts.network_timeout = Duration::from_secs(args.timeout_secs);
    let report = run_doctor(&cluster, &opts).await;
    ctx.out.emit(&report, || human(&report));
    if report.cbt_usable {
        return Ok(());
    }
    let failed: Vec<&str> = report.failures().map(|c| c.id.as_str()).collect();
    Err(CliError {
        class: ExitClass::Config,
        message: format!("CBT cannot work here: failed checks: {}", failed.join(", ")),
        hint: Some("each FAIL line says how to fix it".into()),
        // The JSON document already holds every check.
        reported: ctx.out.json(),
    })
}
