//! Kubernetes side of the toolkit: typed snapshot objects, client construction
//! from kubeconfig, retries and waits, and the SnapShift core,
//! and the csi-addons volume replication types and their translation to backends.
//!
//! Library crates leave the k8s-openapi version feature to the final binary.

pub mod connect;
pub mod error;
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
