//! SnapShift: move a VolumeSnapshot to another cluster that sees the same
//! storage, without copying data, by re-creating a pre-bound `Retain`
//! VolumeSnapshotContent for the same snapshot handle.
//!
//! `plan` and `metadata` are pure (what to create and how existing objects
//! compare); `execute` does the API calls; `rbac` names the checks a run skips,
//! with a warning, when RBAC forbids them.
//!
//! # Example
//! ```no_run
//! use cbt_k8s::snapshift::{MigrateOptions, MigrationRequest, Outcome, SnapShift};
//! use cbt_k8s::{ClusterTarget, connect};
//!
//! # async fn run() -> Result<(), cbt_k8s::Error> {
//! let side = |ctx: &str| ClusterTarget { kubeconfig: None, context: Some(ctx.to_string()) };
//! let shift = SnapShift::new(
//!     connect(&side("east")).await?,
//!     connect(&side("west")).await?,
//!     MigrateOptions::default(),
//! );
//! let mut request = MigrationRequest::for_pvc("apps", "db");
//! request.to_namespace = Some("dr".into());
//! let report = shift.migrate(&request).await;
//! for warning in &report.warnings {
//!     eprintln!("warning: {warning}");
//! }
//! match report.result? {
//!     Outcome::Migrated { created } => println!("created {created:?}"),
//!     Outcome::AlreadyMigrated => println!("already migrated"),
//!     Outcome::DryRun(plan) => println!("{} objects planned", plan.len()),
//! }
//! # Ok(())
//! # }
//! ```

pub mod execute;
pub mod metadata;
pub mod plan;
pub mod rbac;

pub use execute::{
    MigrateOptions, MigrationReport, NoProgress, Outcome, PlannedAction, PlannedObject, Progress,
    Side, SnapShift, Stage, VerifyReport,
};
pub use metadata::{MetadataFilter, Provenance};
pub use plan::{MigrationRequest, SnapshotSource};
pub use rbac::{OptionalCheck, SkippedCheck};
