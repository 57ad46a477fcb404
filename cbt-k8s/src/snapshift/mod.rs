//! SnapShift: move a VolumeSnapshot to another cluster that sees the same
//! storage, without copying data, by re-creating a pre-bound `Retain`
//! VolumeSnapshotContent for the same snapshot handle.
//!
//! `plan` and `metadata` are pure (what to create and how existing objects
//! compare); `execute` does the API calls.

pub mod execute;
pub mod metadata;
pub mod plan;

pub use execute::{
    MigrateOptions, MigrationReport, NoProgress, Outcome, PlannedAction, PlannedObject, Progress,
    Side, SnapShift, Stage, VerifyReport,
};
pub use metadata::{MetadataFilter, Provenance};
pub use plan::{MigrationRequest, SnapshotSource};
