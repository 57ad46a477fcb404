//! Kubernetes side of the toolkit: typed snapshot and group snapshot objects, client construction
//! from kubeconfig, retries and waits, PVC backup and restore, `cbt doctor`, the SnapShift core,
//! and the csi-addons volume replication types and their translation to backends.
//!
//! Library crates leave the k8s-openapi version feature to the final binary.

pub mod connect;
pub mod doctor;
pub mod error;
pub mod group_snapshot;
pub mod metadata_service;
pub mod mover;
pub mod pvc;
pub mod pvc_backup;
pub mod quantity;
pub mod replication;
pub mod retry;
pub mod sidecar;
pub mod snapshift;
pub mod snapshot;
pub mod wait;

pub use connect::{Cluster, ClusterTarget, connect};
pub use error::{Error, ErrorKind};
pub use retry::RetryPolicy;
