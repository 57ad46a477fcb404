//! Volume replication across storage backends, in csi-addons terms.
//!
//! Owns the csi-addons replication kinds as Rust types ([`types`]), the pure
//! translation from those objects to each backend's own objects and back
//! ([`translate`]), and the mapping tables rendered from that translation
//! ([`mapping`], committed as `MAPPING.md` beside this file).
//!
//! Users (or RamenDR) write VolumeReplication / VolumeGroupReplication objects;
//! a controller (`cbt-replicator`, not in this module) reads them with their
//! class, the PVCs and the backend objects, calls [`translate::plan`], and
//! executes the resulting [`translate::Plan`]. Nothing here does I/O.

pub mod controller;
pub mod crds;
pub mod mapping;
pub mod ops;
pub mod translate;
pub mod types;

pub use translate::{
    Backend, BackendObject, BackendWrite, ClassView, DellObserved, Event, EventType, ObjectKey,
    Observed, Plan, PvcInfo, Rejection, RejectionKind, Request, Subject, SubjectKind,
    SubjectStatus, TranslateError, TridentObserved, plan,
};
